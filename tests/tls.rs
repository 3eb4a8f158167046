//! TLS termination and HTTP/2, end to end over loopback: certificates made at test time with
//! rcgen (tests/common/pki.rs: a CA and leaves for 127.0.0.1 / localhost), a rustls client that trusts
//! only that CA, HTTP/1.1 and HTTP/2 (ALPN) over TLS, h2c by prior knowledge on a plain
//! listener, one limit counting h1 and h2 requests alike, clear startup errors for unusable
//! certificate files, and a certificate renewed by a reload.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::Pki;
use common::*;
use http::{HeaderMap, Request, Response, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Upper bound for any single network exchange in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Certificates (tests/common/pki.rs)
// ---------------------------------------------------------------------------------------------

fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A rustls client config (ring) whose only root is `ca`, offering `alpn`.
fn client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certs(ca) {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    tokio::time::timeout(IO_TIMEOUT, async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        TlsConnector::from(config).connect(name, tcp).await
    })
    .await
    .expect("TLS handshake within the timeout")
    .expect("TLS handshake succeeds")
}

/// The DER of the leaf certificate the server presented.
fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    let (_, conn) = stream.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .expect("the server presented a certificate")
        .as_ref()
        .to_vec()
}

fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

async fn h1_over<T>(io: T) -> http1::SendRequest<Empty<Bytes>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

async fn h2_over<T>(io: T) -> http2::SendRequest<Empty<Bytes>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// A response, collected.
#[derive(Debug)]
struct Got {
    status: u16,
    version: http::Version,
    headers: HeaderMap,
    body: Bytes,
}

async fn collect(
    response: impl std::future::Future<Output = hyper::Result<Response<Incoming>>>,
) -> Got {
    tokio::time::timeout(IO_TIMEOUT, async {
        let response = response.await.expect("a response");
        let status = response.status().as_u16();
        let version = response.version();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Got {
            status,
            version,
            headers,
            body,
        }
    })
    .await
    .expect("response within the timeout")
}

/// GET `path` over an HTTP/1.1 connection.
async fn h1_get(sender: &mut http1::SendRequest<Empty<Bytes>>, host: &str, path: &str) -> Got {
    sender.ready().await.expect("connection ready");
    let request = Request::get(path)
        .header(header::HOST, host)
        .body(Empty::new())
        .unwrap();
    collect(sender.send_request(request)).await
}

/// GET `scheme://authority/path` as an HTTP/2 stream.
fn h2_get(
    sender: &mut http2::SendRequest<Empty<Bytes>>,
    url: &str,
) -> impl std::future::Future<Output = Got> + use<> {
    let request = Request::get(url).body(Empty::new()).unwrap();
    let sent = sender.send_request(request);
    collect(sent)
}

/// `"name";r=R;t=T` → R.
fn remaining(got: &Got) -> u64 {
    common::parse::remaining(
        got.headers
            .get("ratelimit")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("a RateLimit header: {got:?}")),
    )
}

// ---------------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------------

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\")
}

fn tls_table(cert: &str, key: &str) -> String {
    format!("[server.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n")
}

/// One upstream `api`, one route `r` with `limits` (may be empty).
fn config_text(upstream: &str, tls: &str, limits: &str) -> String {
    let limits = if limits.is_empty() {
        String::new()
    } else {
        format!("limits = [ {limits} ]\n")
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{tls}\n[store]\nbackend = \"memory\"\n\n\
         [upstreams.api]\ntargets = [\"{upstream}\"]\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"r\"\nupstream = \"api\"\n{limits}"
    )
}

// ---------------------------------------------------------------------------------------------
// HTTPS: HTTP/1.1 and HTTP/2 by ALPN, one limit across both
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn https_h1_and_h2_are_served_and_one_limit_counts_both() {
    let pki = Pki::new();
    let leaf = pki.server("a", 1001);
    let upstream = Upstream::start().await;
    let cfg = config_text(
        &upstream.target(),
        &tls_table(&toml_path(&leaf.chain), &toml_path(&leaf.key)),
        "{ by = \"ip\", algorithm = \"fixed_window\", rate = \"5/hour\" }",
    );
    let tg = start_tollgate(&cfg).await;
    let port = tg.addr.port();

    // HTTP/1.1 by ALPN.
    let stream = tls_connect(tg.addr, client_config(&pki.ca(), &[b"http/1.1"])).await;
    assert_eq!(alpn(&stream).as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(
        peer_leaf(&stream),
        leaf.der,
        "the configured leaf is served"
    );
    let mut h1 = h1_over(stream).await;
    let first = h1_get(&mut h1, "localhost", "/one").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.version, http::Version::HTTP_11);
    assert_eq!(remaining(&first), 4);
    assert!(
        String::from_utf8_lossy(&first.body).contains("\"uri\":\"/one\""),
        "the upstream's answer is relayed: {first:?}"
    );
    let seen = upstream.last();
    assert_eq!(seen.uri, "/one");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], "localhost");

    // HTTP/2 by ALPN: two streams at once on one connection, then a third.
    let stream = tls_connect(tg.addr, client_config(&pki.ca(), &[b"h2", b"http/1.1"])).await;
    assert_eq!(
        alpn(&stream).as_deref(),
        Some(&b"h2"[..]),
        "h2 is preferred"
    );
    let mut h2 = h2_over(stream).await;
    let url = |p: &str| format!("https://localhost:{port}{p}");
    // Two streams at once on the same connection.
    let mut h2b = h2.clone();
    let (a, b) = tokio::join!(
        h2_get(&mut h2, &url("/two")),
        h2_get(&mut h2b, &url("/three"))
    );
    for got in [&a, &b] {
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.version, http::Version::HTTP_2);
    }
    let mut left = [remaining(&a), remaining(&b)];
    left.sort();
    assert_eq!(left, [2, 3], "each h2 stream counts once");
    let h2_seen: Vec<Received> = upstream.received.lock().unwrap()[1..].to_vec();
    assert_eq!(h2_seen.len(), 2);
    for r in &h2_seen {
        assert_eq!(r.headers["x-forwarded-proto"], "https", "{r:?}");
        assert_eq!(
            r.headers["host"],
            format!("localhost:{port}"),
            ":authority becomes Host"
        );
    }

    let fourth = h1_get(&mut h1, "localhost", "/four").await;
    assert_eq!(fourth.status, 200);
    assert_eq!(remaining(&fourth), 1);
    let fifth = h2_get(&mut h2, &url("/five")).await;
    assert_eq!(fifth.status, 200, "{fifth:?}");
    assert_eq!(remaining(&fifth), 0);

    // The sixth, by either protocol, is over the limit.
    let over_h2 = h2_get(&mut h2, &url("/six")).await;
    assert_eq!(over_h2.status, 429, "{over_h2:?}");
    assert!(over_h2.headers.contains_key("retry-after"));
    let problem: serde_json::Value = serde_json::from_slice(&over_h2.body).unwrap();
    assert_eq!(problem["status"], 429, "{problem}");
    let over_h1 = h1_get(&mut h1, "localhost", "/seven").await;
    assert_eq!(over_h1.status, 429, "{over_h1:?}");
    assert_eq!(
        upstream.count(),
        5,
        "exactly five reached the upstream: h1 and h2 count alike"
    );
    drop((h1, h2));
    tg.stop().await;
}

#[tokio::test]
async fn a_tls_client_without_alpn_is_served_http11() {
    let pki = Pki::new();
    let leaf = pki.server("a", 1002);
    let upstream = Upstream::start().await;
    let cfg = config_text(
        &upstream.target(),
        &tls_table(&toml_path(&leaf.chain), &toml_path(&leaf.key)),
        "",
    );
    let tg = start_tollgate(&cfg).await;
    let stream = tls_connect(tg.addr, client_config(&pki.ca(), &[])).await;
    assert_eq!(alpn(&stream), None);
    let mut h1 = h1_over(stream).await;
    let got = h1_get(&mut h1, "localhost", "/plain").await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(upstream.last().headers["x-forwarded-proto"], "https");
    drop(h1);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// h2c: HTTP/2 by prior knowledge on a plain listener
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_is_served_and_limited_with_h1() {
    let upstream = Upstream::start().await;
    let cfg = config_text(
        &upstream.target(),
        "",
        "{ by = \"ip\", algorithm = \"fixed_window\", rate = \"3/hour\" }",
    );
    let tg = start_tollgate(&cfg).await;
    let port = tg.addr.port();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");

    let mut h2 = h2_over(TcpStream::connect(tg.addr).await.unwrap()).await;
    let first = h2_get(&mut h2, &url("/a")).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.version, http::Version::HTTP_2);
    assert_eq!(remaining(&first), 2);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/a");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["host"], format!("127.0.0.1:{port}"));

    let mut h1 = h1_over(TcpStream::connect(tg.addr).await.unwrap()).await;
    let second = h1_get(&mut h1, "127.0.0.1", "/b").await;
    assert_eq!(second.status, 200);
    assert_eq!(remaining(&second), 1);
    let third = h2_get(&mut h2, &url("/c")).await;
    assert_eq!(third.status, 200);
    assert_eq!(remaining(&third), 0);

    let over = h2_get(&mut h2, &url("/d")).await;
    assert_eq!(over.status, 429, "{over:?}");
    assert_eq!(over.version, http::Version::HTTP_2);
    let over_h1 = h1_get(&mut h1, "127.0.0.1", "/e").await;
    assert_eq!(over_h1.status, 429);
    assert_eq!(upstream.count(), 3);
    drop((h1, h2));
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Startup errors and `check`
// ---------------------------------------------------------------------------------------------

/// Runs `tollgate run` on `config` and waits (bounded) for it to exit; returns its status and
/// stderr. Panics (after killing it) if it keeps running.
fn run_expecting_exit(config: &Path) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tollgate binary");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status, stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate run kept running with {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unusable_certificate_files_are_a_clear_startup_error() {
    let pki = Pki::new();
    let a = pki.server("a", 2001);
    let b = pki.server("b", 2002);
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let missing_cert = dir.path().join("missing-cert.pem");
    let missing_key = dir.path().join("missing-key.pem");

    let cases: [(&str, &Path, &Path, &[&Path]); 4] = [
        (
            "missing certificate",
            &missing_cert,
            &a.key,
            &[&missing_cert],
        ),
        (
            "certificate file without PEM",
            &garbage,
            &a.key,
            &[&garbage],
        ),
        ("missing key", &a.chain, &missing_key, &[&missing_key]),
        // a's certificate with b's key: the names of both files.
        (
            "key of another certificate",
            &a.chain,
            &b.key,
            &[&a.chain, &b.key],
        ),
    ];
    for (what, cert, key, named) in cases {
        let cfg = config_text(
            "http://127.0.0.1:9",
            &tls_table(&toml_path(cert), &toml_path(key)),
            "",
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, &cfg).unwrap();
        let (status, stderr) = run_expecting_exit(&path);
        assert!(!status.success(), "{what}: exited 0\n{stderr}");
        for file in named {
            assert!(
                stderr.contains(&file.display().to_string()),
                "{what}: the error names {}:\n{stderr}",
                file.display()
            );
        }
        let lower = stderr.to_lowercase();
        let topic = if what.contains("key") && named.len() == 1 {
            "key"
        } else {
            "certificate"
        };
        assert!(
            lower.contains(topic),
            "{what}: the error says what is wrong ({topic}):\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{what}: a clear error, not a panic:\n{stderr}"
        );
    }

    // `check` on a config whose files are fine (relative paths, from the config's directory).
    let good = pki.server("good", 2003);
    std::fs::copy(&good.chain, dir.path().join("cert.pem")).unwrap();
    std::fs::copy(&good.key, dir.path().join("key.pem")).unwrap();
    let path = dir.path().join("good.toml");
    std::fs::write(
        &path,
        config_text("http://127.0.0.1:9", &tls_table("cert.pem", "key.pem"), ""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check exits 0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The error is said once: not repeated by each layer that wraps it.
#[test]
fn a_tls_startup_error_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-cert.pem");
    let cfg = config_text(
        "http://127.0.0.1:9",
        &tls_table(
            &toml_path(&missing),
            &toml_path(&dir.path().join("key.pem")),
        ),
        "",
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &cfg).unwrap();
    let (status, stderr) = run_expecting_exit(&path);
    assert!(!status.success(), "{stderr}");
    let named = stderr.matches(&missing.display().to_string()).count();
    assert_eq!(
        named, 1,
        "the missing file is named once, not once per wrapping error layer:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Certificate reload
// ---------------------------------------------------------------------------------------------

/// Replaces `path`'s content atomically (write a sibling, rename over).
fn replace(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls until a new TLS connection presents `want`, at most `limit`; returns the time taken.
async fn until_serving(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    want: &[u8],
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let stream = tls_connect(addr, config.clone()).await;
        if peer_leaf(&stream) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "the new certificate was not served within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) for a log line whose message starts with `prefix`, beyond the first `skip`.
async fn until_logged(bin: &Binary, skip: usize, prefix: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        if let Some(line) = bin.logs().into_iter().skip(skip).find(|l| {
            l["message"]
                .as_str()
                .or_else(|| l["fields"]["message"].as_str())
                .is_some_and(|m| m.starts_with(prefix))
        }) {
            return line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no log line {prefix:?}: {:?}",
            bin.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_renewed_certificate_and_refuses_a_bad_pair() {
    let pki = Pki::new();
    let a = pki.server("a", 3001);
    let b = pki.server("b", 3002);
    assert_ne!(a.der, b.der);
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::copy(&a.chain, &cert).unwrap();
    std::fs::copy(&a.key, &key).unwrap();
    let config = dir.path().join("proxy.toml");
    let text = config_text(&upstream.target(), &tls_table("cert.pem", "key.pem"), "");
    std::fs::write(&config, &text).unwrap();
    let bin = Binary::start(&config);
    let client = client_config(&pki.ca(), &[b"http/1.1"]);

    let stream = tls_connect(bin.addr, client.clone()).await;
    assert_eq!(peer_leaf(&stream), a.der, "certificate A at start");
    let mut h1 = h1_over(stream).await;
    assert_eq!(h1_get(&mut h1, "localhost", "/a").await.status, 200);

    // Renewal: new files, then the config file changes (the watcher reloads it).
    replace(&key, &std::fs::read(&b.key).unwrap());
    replace(&cert, &std::fs::read(&b.chain).unwrap());
    replace(
        &config,
        format!("{text}\n# renewed certificate\n").as_bytes(),
    );
    let took = until_serving(bin.addr, &client, &b.der, Duration::from_secs(5)).await;
    eprintln!("certificate B served {took:?} after the config file changed");
    // The connection opened before the reload still works.
    assert_eq!(h1_get(&mut h1, "localhost", "/still").await.status, 200);

    // A mismatched pair (A's certificate, B's key) is refused; B keeps serving.
    let before = bin.logs().len();
    replace(&cert, &std::fs::read(&a.chain).unwrap());
    bin.signal("HUP");
    let refused = until_logged(&bin, before, "config reload refused").await;
    let message = refused.to_string();
    assert!(message.contains("cert.pem"), "{message}");
    let stream = tls_connect(bin.addr, client.clone()).await;
    assert_eq!(
        peer_leaf(&stream),
        b.der,
        "the old certificate keeps serving"
    );
    let mut fresh = h1_over(stream).await;
    assert_eq!(h1_get(&mut fresh, "localhost", "/b").await.status, 200);

    // Fixing the key and sending SIGHUP brings A back.
    replace(&key, &std::fs::read(&a.key).unwrap());
    bin.signal("HUP");
    let took = until_serving(bin.addr, &client, &a.der, Duration::from_secs(5)).await;
    eprintln!("certificate A served {took:?} after SIGHUP");
    drop((h1, fresh));
    drop(bin);
}
