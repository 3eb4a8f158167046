//! gRPC requests refused by tollgate get trailers-only gRPC answers (HTTP 200,
//! `grpc-status`, `grpc-message`, `Retry-After` and rate-limit headers kept), read by a real
//! gRPC client (tonic, over h2c with prior knowledge, and over TLS with ALPN h2): RESOURCE_EXHAUSTED for a rate limit,
//! PERMISSION_DENIED for a deny list, UNAUTHENTICATED for an unknown consumer, UNAVAILABLE when
//! the store fails closed, UNIMPLEMENTED for no route.

mod common;

use bytes::Bytes;
use common::grpc_codec::Raw;
use common::*;
use tonic::{Code, Status};

/// One unary call to `path` with `metadata`; the status tollgate answered with.
async fn call(
    addr: std::net::SocketAddr,
    path: &'static str,
    metadata: &[(&'static str, &str)],
) -> Status {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("h2c connection");
    call_on(channel, path, metadata).await
}

/// One unary call on `channel`.
async fn call_on(
    channel: tonic::transport::Channel,
    path: &'static str,
    metadata: &[(&'static str, &str)],
) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Bytes::from_static(b"\x0a\x03abc"));
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    grpc.unary(request, http::uri::PathAndQuery::from_static(path), Raw)
        .await
        .expect_err("tollgate refuses this call")
}

fn routes(dir: &std::path::Path, upstream: &Upstream, store: &str) -> std::path::PathBuf {
    routes_with(dir, upstream, store, "")
}

fn routes_with(
    dir: &std::path::Path,
    upstream: &Upstream,
    store: &str,
    tls: &str,
) -> std::path::PathBuf {
    std::fs::write(
        dir.join("consumers.toml"),
        format!(
            "[[consumer]]\nname = \"acme\"\nkeys = [\"{}\"]\n",
            tollgate::consumers::hash_key(b"acme-key")
        ),
    )
    .unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{tls}\n{store}\n\n\
         [consumers]\nkey = \"header:x-api-key\"\nfile = \"consumers.toml\"\nunknown = \"reject\"\n\n\
         [upstreams.api]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"limited\"\nupstream = \"api\"\nmatch = {{ path_prefix = \"/test.Limited\" }}\n\
         on_store_error = \"deny\"\n\
         limits = [{{ by = \"header:x-key\", algorithm = \"fixed_window\", rate = \"1/hour\" }}]\n\n\
         [[routes]]\nname = \"denied\"\nupstream = \"api\"\nmatch = {{ path_prefix = \"/test.Denied\" }}\n\
         deny = {{ ips = [\"127.0.0.0/8\"] }}\n\n\
         [[routes]]\nname = \"members\"\nupstream = \"api\"\nmatch = {{ path_prefix = \"/test.Members\" }}\n\
         limits = [{{ by = \"consumer\", algorithm = \"gcra\", rate = \"10/s\" }}]\n",
        upstream.target()
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn refusals_are_trailers_only_grpc_statuses() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = routes(dir.path(), &upstream, &memory_store());
    let tg = start_file(&path).await;

    // The one request of the hour, over plain HTTP; the gRPC call after it is over the limit.
    let http = Http::new();
    let first = http
        .get(
            &format!("http://{}/test.Limited/Call", tg.addr),
            &[("x-key", "k1")],
        )
        .await;
    assert_eq!(first.status, 200);
    let limited = call(tg.addr, "/test.Limited/Call", &[("x-key", "k1")]).await;
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert_eq!(limited.message(), "rate limit exceeded");
    let retry: u64 = limited
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    assert!(
        limited
            .metadata()
            .get("ratelimit")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("r=0")
    );

    let denied = call(tg.addr, "/test.Denied/Call", &[]).await;
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let unknown = call(tg.addr, "/test.Members/Call", &[("x-api-key", "nope")]).await;
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    // A path none of the three prefixes matches.
    let nowhere = call(tg.addr, "/nothing/Here", &[]).await;
    assert_eq!(nowhere.code(), Code::Unimplemented, "{nowhere:?}");

    // The same refusals to a plain HTTP client stay problem+json.
    let plain = http
        .get(&format!("http://{}/test.Denied/Call", tg.addr), &[])
        .await;
    assert_eq!(plain.status, 403);
    assert_eq!(
        plain.header("content-type"),
        Some("application/problem+json")
    );
    let text = tg.app.metrics.render();
    assert_eq!(
        common::parse::metric(
            &text,
            "tollgate_requests_total{route=\"limited\",decision=\"rejected\"}"
        ),
        Some(1.0)
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_store_that_fails_closed_is_unavailable() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 of loopback: every decision fails, the route denies.
    let store =
        "[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:9/0\"\ntimeout = \"100ms\"";
    let path = routes(dir.path(), &upstream, store);
    let tg = start_file(&path).await;
    let down = call(tg.addr, "/test.Limited/Call", &[("x-key", "k1")]).await;
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert_eq!(down.metadata().get("retry-after").unwrap(), "1");
    tg.stop().await;
}

#[tokio::test]
async fn over_tls_the_refusal_is_the_same_grpc_status() {
    let pki = common::pki::Pki::new();
    let leaf = pki.server("grpc", 2001);
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        leaf.chain.display(),
        leaf.key.display()
    );
    let path = routes_with(dir.path(), &upstream, &memory_store(), &tls);
    let tg = start_file(&path).await;
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(pki.ca()).unwrap());
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", tg.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(ca)
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS connection with ALPN h2");
    let denied = call_on(channel, "/test.Denied/Call", &[]).await;
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    tg.stop().await;
}
