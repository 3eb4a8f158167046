//! How tollgate reaches its upstreams: `https://` targets verified against a configured CA
//! (SNI from `server_name`, client certificates for mTLS), `protocol = "http1" | "h2" | "auto"`
//! (ALPN on TLS, h2c by prior knowledge in clear), HTTP/2 multiplexing on one connection, TLS
//! session resumption on reconnect, verification failures answered 502 and logged with the
//! target and the reason (never a plaintext retry), reloads refusing an unusable CA file, and
//! gRPC end to end (unary, both streaming directions, bidirectional interleaving, trailers,
//! metadata, a deadline capped by the upstream timeout) over h2c and TLS upstreams.
//!
//! The origins are tests/common/reach.rs: hyper servers that record per connection what their
//! handshake said and per request the HTTP version and headers.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::grpc_codec::Raw;
use common::pki::{Pki, Usage};
use common::reach::{Origin, expired_server, foreign_server};
use common::*;
use http::{Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::HandshakeKind;
use tokio::net::TcpStream;
use tonic::Code;

/// Upper bound for any single exchange in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------------

/// `tls = { ca = "…", … }` from (key, value) pairs; empty for none.
fn tls(fields: &[(&str, &Path)]) -> String {
    if fields.is_empty() {
        return String::new();
    }
    let fields: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k} = \"{}\"", v.display()))
        .collect();
    format!("tls = {{ {} }}\n", fields.join(", "))
}

/// An `[upstreams.NAME]` table.
fn upstream(name: &str, target: &str, protocol: &str, tls: &str, timeout: &str) -> String {
    format!(
        "[upstreams.{name}]\ntargets = [\"{target}\"]\nprotocol = \"{protocol}\"\n{tls}timeout = \"{timeout}\"\n\n"
    )
}

/// A whole config: `upstreams` tables, then one route per (name, path prefix, upstream); a
/// prefix of "" matches every path.
fn config(server_extra: &str, upstreams: &str, routes: &[(&str, &str, &str)]) -> String {
    let routes: String = routes
        .iter()
        .map(|(name, prefix, upstream)| {
            let matcher = if prefix.is_empty() {
                String::new()
            } else {
                format!("match = {{ path_prefix = \"{prefix}\" }}\n")
            };
            format!("[[routes]]\nname = \"{name}\"\nupstream = \"{upstream}\"\n{matcher}\n")
        })
        .collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[store]\nbackend = \"memory\"\n\n{upstreams}{routes}"
    )
}

/// One upstream `api` and one route taking every path.
fn single(target: &str, protocol: &str, tls: &str) -> String {
    config(
        "",
        &upstream("api", target, protocol, tls, "5s"),
        &[("r", "", "api")],
    )
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// An HTTP/2 connection to tollgate's plain listener by prior knowledge (h2c).
async fn h2c_to(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake with tollgate");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// GET `url` on an HTTP/2 connection: (status, version, body).
async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    url: &str,
) -> (u16, Version, Bytes) {
    tokio::time::timeout(IO_TIMEOUT, async {
        let request = Request::get(url).body(Empty::new()).unwrap();
        let response = sender.send_request(request).await.expect("a response");
        let status = response.status().as_u16();
        let version = response.version();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, version, body)
    })
    .await
    .expect("a response within the timeout")
}

type Grpc = tonic::client::Grpc<tonic::transport::Channel>;

/// A gRPC client on tollgate's plain listener (h2c).
async fn grpc_client(addr: SocketAddr) -> Grpc {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("h2c connection to tollgate");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc
}

fn path(p: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(p)
}

fn trailer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get("x-echo-trailer").and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// The string values of a JSON log line (not its keys: a key such as `server_name` must not
/// pass for the word "name"), lowercased and joined.
fn values_text(line: &serde_json::Value) -> String {
    fn walk(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::String(s) => {
                out.push_str(&s.to_lowercase());
                out.push(' ');
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            other => {
                out.push_str(&other.to_string());
                out.push(' ');
            }
        }
    }
    let mut out = String::new();
    walk(line, &mut out);
    out
}

/// Spaces, `_` and `-` dropped, so that "unknown issuer", "UnknownIssuer" and "unknown_issuer"
/// are one word.
fn squeezed(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-'))
        .collect()
}

/// Waits (at most 5 s) for a log line of `bin` whose values name `target` and `reason`.
async fn logged(bin: &Binary, target: &str, reason: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(line) = bin.logs().into_iter().find(|l| {
            let text = values_text(l);
            text.contains(target) && squeezed(&text).contains(&squeezed(reason))
        }) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line names {target} and {reason:?}: {:#?}",
            bin.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn metric(http: &Http, admin: SocketAddr, series: &str) -> u64 {
    common::parse::metric(&http.scrape(admin).await, series).unwrap_or(0.0) as u64
}

// ---------------------------------------------------------------------------------------------
// 1. https, protocol http1
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_http1_verifies_the_ca_sends_sni_and_speaks_http11() {
    let pki = Pki::new();
    let leaf = pki.server("origin", 2);
    // The origin would take h2: protocol = "http1" must not offer it.
    let origin = Origin::tls(&leaf, &["h2", "http/1.1"]).start().await;
    let host = Path::new("localhost");
    let cfg = single(
        &origin.https(),
        "http1",
        &tls(&[("ca", &pki.ca()), ("server_name", host)]),
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    for i in 0..3 {
        let reply = http.get(&format!("http://{}/one/{i}", tg.addr), &[]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(&reply.body[..], b"HTTP/1.1");
    }
    let (seen, conn) = origin.last();
    assert_eq!(seen.path, "/one/2");
    assert_eq!(seen.version, Version::HTTP_11);
    assert!(conn.tls);
    assert_eq!(conn.sni.as_deref(), Some("localhost"));
    assert_ne!(conn.alpn.as_deref(), Some("h2"), "{conn:?}");
    assert_eq!(origin.plaintext(), 0);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. https, protocol auto, ALPN h2: one multiplexed connection
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_auto_negotiates_h2_and_multiplexes_50_requests_on_one_connection() {
    let pki = Pki::new();
    let leaf = pki.server("origin", 2);
    let origin = Origin::tls(&leaf, &["h2", "http/1.1"]).start().await;
    let cfg = single(&origin.https(), "auto", &tls(&[("ca", &pki.ca())]));
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    // One request first: the connection exists, its protocol known, before the burst.
    let first = http.get(&format!("http://{}/first", tg.addr), &[]).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(&first.body[..], b"HTTP/2.0");

    // Each of the 50 is held at the origin until all 50 are there: in flight at once.
    let url = format!("http://{}/hold/50", tg.addr);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(&url, &[]).await })
        })
        .collect();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            reply.header("x-held-all"),
            Some("yes"),
            "the 50 were not in flight together"
        );
    }
    assert_eq!(
        origin.accepted(),
        1,
        "one TLS connection: {:?}",
        origin.conns()
    );
    let conns = origin.conns();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].alpn.as_deref(), Some("h2"));
    let requests = origin.requests();
    assert_eq!(requests.len(), 51);
    assert!(
        requests
            .iter()
            .all(|r| r.version == Version::HTTP_2 && r.conn == 0)
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_auto_speaks_http11_to_an_origin_that_offers_only_http11() {
    let pki = Pki::new();
    let leaf = pki.server("origin", 2);
    let origin = Origin::tls(&leaf, &["http/1.1"]).start().await;
    let cfg = single(&origin.https(), "auto", &tls(&[("ca", &pki.ca())]));
    let tg = start_tollgate(&cfg).await;
    let reply = Http::new().get(&format!("http://{}/x", tg.addr), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(&reply.body[..], b"HTTP/1.1");
    let (seen, conn) = origin.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert!(conn.tls);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. h2c upstreams, and h2 clients to HTTP/1.1 upstreams
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_upstream_and_any_client_version_to_any_upstream() {
    let h2c = Origin::h2c().start().await;
    let h1 = Origin::http1().start().await;
    // "auto" on http:// is HTTP/1.1: the h1 origin fails anything else.
    let auto = Origin::http1().start().await;
    let upstreams = format!(
        "{}{}{}",
        upstream("h2c", &h2c.http(), "h2", "", "5s"),
        upstream("h1", &h1.http(), "http1", "", "5s"),
        upstream("auto", &auto.http(), "auto", "", "5s"),
    );
    let cfg = config(
        "",
        &upstreams,
        &[
            ("h2c", "/h2c", "h2c"),
            ("h1", "/h1", "h1"),
            ("auto", "/auto", "auto"),
        ],
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    let mut h2 = h2c_to(tg.addr).await;
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", tg.addr.port());
    for (prefix, origin, version) in [
        ("/h2c", &h2c, Version::HTTP_2),
        ("/h1", &h1, Version::HTTP_11),
        ("/auto", &auto, Version::HTTP_11),
    ] {
        let reply = http.get(&url(&format!("{prefix}/from-h1")), &[]).await;
        assert_eq!(reply.status, 200, "HTTP/1.1 client to {prefix}: {reply:?}");
        assert_eq!(reply.body, format!("{version:?}"));
        let (seen, conn) = origin.last();
        assert_eq!(seen.path, format!("{prefix}/from-h1"));
        assert_eq!(seen.version, version, "{prefix}");
        assert!(!conn.tls);

        let (status, client_version, body) =
            h2_get(&mut h2, &url(&format!("{prefix}/from-h2"))).await;
        assert_eq!(status, 200, "HTTP/2 client to {prefix}");
        assert_eq!(client_version, Version::HTTP_2);
        assert_eq!(body, format!("{version:?}"));
        let (seen, _) = origin.last();
        assert_eq!(seen.path, format!("{prefix}/from-h2"));
        assert_eq!(seen.version, version, "{prefix}");
    }
    drop(h2);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. mTLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_presents_the_client_certificate_and_without_one_is_502() {
    let pki = Pki::new();
    let server = pki.server("origin", 2);
    let client = pki.leaf("client", "tollgate-client", &[], &[Usage::ClientAuth], 3);
    let origin = Origin::tls(&server, &["http/1.1"])
        .client_ca(&pki.ca())
        .start()
        .await;
    let with = tls(&[
        ("ca", &pki.ca()),
        ("cert", &client.cert),
        ("key", &client.key),
    ]);
    let upstreams = format!(
        "{}{}",
        upstream("mtls", &origin.https(), "http1", &with, "5s"),
        upstream(
            "bare",
            &origin.https(),
            "http1",
            &tls(&[("ca", &pki.ca())]),
            "5s"
        ),
    );
    let cfg = config(
        "",
        &upstreams,
        &[("cert", "/cert", "mtls"), ("nocert", "/nocert", "bare")],
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();

    let reply = http.get(&format!("http://{}/cert/a", tg.addr), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (seen, conn) = origin.last();
    assert_eq!(seen.path, "/cert/a");
    assert_eq!(conn.client_cn.as_deref(), Some("tollgate-client"));

    let refused = http.get(&format!("http://{}/nocert/a", tg.addr), &[]).await;
    assert_eq!(refused.status, 502, "{refused:?}");
    assert_eq!(origin.requests().len(), 1, "{:?}", origin.requests());
    // Counted after the origin's alert went out: a moment after tollgate saw it.
    eventually(Duration::from_secs(5), || async {
        origin.failed_handshakes() >= 1
    })
    .await;
    assert_eq!(origin.plaintext(), 0);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Verification failures
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_failures_are_502_logged_with_target_and_reason_and_never_plaintext() {
    let pki = Pki::new();
    // Signed by a CA tollgate does not trust (named differently from the trusted one).
    let unknown = foreign_server(&pki, "stranger", 2);
    let good = pki.server("origin", 3);
    let expired = expired_server(&pki, "expired", 4);
    let wrong = Path::new("wrong.example");
    let ca = pki.ca();
    let cases = [
        ("unknown issuer", &unknown, vec![("ca", ca.as_path())]),
        (
            "name",
            &good,
            vec![("ca", ca.as_path()), ("server_name", wrong)],
        ),
        ("expired", &expired, vec![("ca", ca.as_path())]),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (reason, leaf, fields) in cases {
        let origin = Origin::tls(leaf, &["h2", "http/1.1"]).start().await;
        let file = dir.path().join("proxy.toml");
        std::fs::write(&file, single(&origin.https(), "auto", &tls(&fields))).unwrap();
        let tg = Binary::start(&file);
        let http = Http::new();
        for _ in 0..2 {
            let reply = http.get(&format!("http://{}/x", tg.addr), &[]).await;
            assert_eq!(reply.status, 502, "{reason}: {reply:?}");
        }
        let line = logged(&tg, &origin.addr.to_string(), reason).await;
        assert!(origin.accepted() >= 1, "{reason}: tollgate never connected");
        assert_eq!(origin.plaintext(), 0, "{reason}: a plaintext fallback");
        assert!(origin.requests().is_empty(), "{reason}: {line}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Session resumption
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_resumes_the_tls_session() {
    let pki = Pki::new();
    let leaf = pki.server("origin", 2);
    let origin = Origin::tls(&leaf, &["http/1.1"]).close_each().start().await;
    let cfg = single(&origin.https(), "http1", &tls(&[("ca", &pki.ca())]));
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    for i in 0..3 {
        let reply = http.get(&format!("http://{}/r/{i}", tg.addr), &[]).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
    let conns = origin.conns();
    assert_eq!(conns.len(), 3, "one connection per request: {conns:?}");
    assert_eq!(conns[0].handshake, Some(HandshakeKind::Full), "{conns:?}");
    for conn in &conns[1..] {
        assert_eq!(conn.handshake, Some(HandshakeKind::Resumed), "{conns:?}");
    }
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Reload
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_missing_or_garbage_ca_is_refused_and_the_old_config_serves() {
    let pki = Pki::new();
    let leaf = pki.server("origin", 2);
    let origin = Origin::tls(&leaf, &["h2", "http/1.1"]).start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let text = |ca: &Path| {
        config(
            "admin = \"127.0.0.1:0\"\nwatch_config = false\n",
            &upstream("api", &origin.https(), "auto", &tls(&[("ca", ca)]), "5s"),
            &[("r", "", "api")],
        )
    };
    std::fs::write(&file, text(&pki.ca())).unwrap();
    let tg = Binary::start(&file);
    let admin = tg.admin.expect("an admin listener");
    let http = Http::new();
    let url = format!("http://{}/x", tg.addr);
    assert_eq!(http.get(&url, &[]).await.status, 200);

    let missing = dir.path().join("missing-ca.pem");
    let garbage = dir.path().join("garbage-ca.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    for (n, bad) in [(1, &missing), (2, &garbage)] {
        std::fs::write(&file, text(bad)).unwrap();
        tg.signal("HUP");
        eventually(Duration::from_secs(5), || async {
            metric(
                &http,
                admin,
                "tollgate_config_reloads_total{result=\"failed\"}",
            )
            .await
                >= n
        })
        .await;
        let name = bad.file_name().unwrap().to_str().unwrap();
        let refused = tg.logs().into_iter().any(|l| {
            let text = values_text(&l);
            text.contains("refused") && text.contains(name)
        });
        assert!(refused, "no refusal naming {name}: {:#?}", tg.logs());
        let before = origin.requests().len();
        let reply = http.get(&url, &[]).await;
        assert_eq!(reply.status, 200, "the old config serves: {reply:?}");
        assert_eq!(origin.requests().len(), before + 1);
    }
    assert_eq!(
        metric(&http, admin, "tollgate_config_reloads_total{result=\"ok\"}").await,
        0
    );
    // The good file again: SIGHUP reloads, so the refusals were the CA's.
    std::fs::write(&file, text(&pki.ca())).unwrap();
    tg.signal("HUP");
    eventually(Duration::from_secs(5), || async {
        metric(&http, admin, "tollgate_config_reloads_total{result=\"ok\"}").await == 1
    })
    .await;
    assert_eq!(http.get(&url, &[]).await.status, 200);
}

// ---------------------------------------------------------------------------------------------
// 8. gRPC end to end
// ---------------------------------------------------------------------------------------------

/// Every echo method through tollgate at `addr` to `origin`, with metadata both ways.
async fn grpc_round(addr: SocketAddr, origin: &Origin) {
    let mut grpc = grpc_client(addr).await;

    // Unary, with request metadata; the trailers are merged into the response metadata.
    let mut request = tonic::Request::new(Bytes::from_static(b"hello"));
    request
        .metadata_mut()
        .insert("x-echo-meta", "from-client".parse().unwrap());
    let reply = tokio::time::timeout(
        IO_TIMEOUT,
        grpc.unary(request, path("/echo.Echo/Unary"), Raw),
    )
    .await
    .expect("unary within the timeout")
    .expect("unary call");
    assert_eq!(&reply.get_ref()[..], b"hello");
    assert_eq!(
        trailer(reply.metadata()),
        Some("yes"),
        "{:?}",
        reply.metadata()
    );
    let seen = origin
        .requests()
        .into_iter()
        .find(|r| r.path == "/echo.Echo/Unary")
        .expect("the unary call reached the origin");
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.headers["x-echo-meta"], "from-client");
    assert_eq!(seen.headers["te"], "trailers");
    assert!(
        seen.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc")
    );

    // Server streaming: N copies, N the first byte.
    grpc.ready().await.unwrap();
    let message = Bytes::from_static(b"\x04four");
    let mut stream = tokio::time::timeout(
        IO_TIMEOUT,
        grpc.server_streaming(
            tonic::Request::new(message.clone()),
            path("/echo.Echo/ServerStream"),
            Raw,
        ),
    )
    .await
    .expect("server streaming within the timeout")
    .expect("server streaming call")
    .into_inner();
    let mut copies = 0;
    while let Some(m) = tokio::time::timeout(IO_TIMEOUT, stream.message())
        .await
        .expect("a message within the timeout")
        .expect("a message")
    {
        assert_eq!(m, message);
        copies += 1;
    }
    assert_eq!(copies, 4);
    let trailers = stream.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailer(&trailers), Some("yes"));

    // Client streaming: the messages concatenated.
    grpc.ready().await.unwrap();
    let parts = ["ab", "cd", "ef"].map(|s| Bytes::from_static(s.as_bytes()));
    let reply = tokio::time::timeout(
        IO_TIMEOUT,
        grpc.client_streaming(
            tonic::Request::new(futures_util::stream::iter(parts)),
            path("/echo.Echo/ClientStream"),
            Raw,
        ),
    )
    .await
    .expect("client streaming within the timeout")
    .expect("client streaming call");
    assert_eq!(&reply.get_ref()[..], b"abcdef");
    assert_eq!(trailer(reply.metadata()), Some("yes"));

    // Bidirectional, interleaved: each message is sent only after the echo of the one before
    // it came back, which a proxy that buffered either direction would never deliver.
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(Bytes::from_static(b"ping 0")).await.unwrap();
    let mut echoes = tokio::time::timeout(
        IO_TIMEOUT,
        grpc.streaming(tonic::Request::new(outgoing), path("/echo.Echo/Bidi"), Raw),
    )
    .await
    .expect("bidi response head within the timeout")
    .expect("bidi call")
    .into_inner();
    for i in 0..5 {
        let echo = tokio::time::timeout(IO_TIMEOUT, echoes.message())
            .await
            .unwrap_or_else(|_| panic!("echo {i} within the timeout"))
            .expect("an echo")
            .expect("the stream is open");
        assert_eq!(echo, format!("ping {i}"));
        if i < 4 {
            tx.send(Bytes::from(format!("ping {}", i + 1)))
                .await
                .unwrap();
        }
    }
    drop(tx);
    let end = tokio::time::timeout(IO_TIMEOUT, echoes.message())
        .await
        .expect("the end within the timeout")
        .expect("a clean end");
    assert!(end.is_none());
    let trailers = echoes.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailer(&trailers), Some("yes"));
    assert!(
        origin
            .requests()
            .iter()
            .all(|r| r.version == Version::HTTP_2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_end_to_end_over_an_h2c_upstream() {
    let origin = Origin::h2c().start().await;
    let tg = start_tollgate(&single(&origin.http(), "h2", "")).await;
    grpc_round(tg.addr, &origin).await;
    assert!(origin.conns().iter().all(|c| !c.tls));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_end_to_end_over_a_tls_upstream() {
    let pki = Pki::new();
    let leaf = pki.server("origin", 2);
    let origin = Origin::tls(&leaf, &["h2", "http/1.1"]).start().await;
    let cfg = single(&origin.https(), "auto", &tls(&[("ca", &pki.ca())]));
    let tg = start_tollgate(&cfg).await;
    grpc_round(tg.addr, &origin).await;
    let conns = origin.conns();
    assert!(!conns.is_empty());
    assert!(
        conns
            .iter()
            .all(|c| c.tls && c.alpn.as_deref() == Some("h2")),
        "{conns:?}"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_deadline_is_capped_by_the_upstream_timeout() {
    let origin = Origin::h2c().start().await;
    let cfg = config(
        "",
        &upstream("api", &origin.http(), "h2", "", "1s"),
        &[("r", "", "api")],
    );
    let tg = start_tollgate(&cfg).await;
    let mut grpc = grpc_client(tg.addr).await;
    let mut request = tonic::Request::new(Bytes::from_static(b"slow"));
    request
        .metadata_mut()
        .insert("grpc-timeout", "10S".parse().unwrap());
    let start = Instant::now();
    let result = tokio::time::timeout(
        IO_TIMEOUT,
        grpc.unary(request, path("/echo.Echo/Slow"), Raw),
    )
    .await
    .expect("an answer within the timeout");
    let took = start.elapsed();
    let status = result.expect_err("the origin takes 3 s, the upstream timeout is 1 s");
    assert_ne!(status.code(), Code::Ok);
    assert!(
        took < Duration::from_millis(2500),
        "the 10 s client deadline was not capped by the 1 s upstream timeout: {took:?}, {status:?}"
    );
    assert!(
        origin
            .requests()
            .iter()
            .any(|r| r.path == "/echo.Echo/Slow"),
        "the call reached the origin"
    );
    tg.stop().await;
}
