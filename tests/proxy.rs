//! Forwarding end to end, over real loopback sockets: tollgate in process in front of a
//! recording upstream (and, where a test needs exact bytes, a small raw TCP upstream).
//! Error responses (404 / 502 / 504 / 413 / 400) and their problem+json bodies, the request
//! and response headers the other side sees, path normalisation against limit evasion,
//! streamed bodies both ways and WebSocket upgrades.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::*;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Upper bound for any single network exchange in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Config helpers
// ---------------------------------------------------------------------------------------------

/// A whole config: `[server]` (listen on 127.0.0.1:0 plus `server` lines), the memory store,
/// the given upstream tables and routes.
fn config_with(server: &str, upstreams: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n[store]\nbackend = \"memory\"\n\n{upstreams}\n{routes}\n"
    )
}

/// One `[upstreams.NAME]` table.
fn upstream_table(name: &str, target: &str, extra: &str) -> String {
    format!("[upstreams.{name}]\ntargets = [\"{target}\"]\ntimeout = \"5s\"\n{extra}\n")
}

/// One `[[routes]]` entry; an empty `matcher` matches everything, empty `limits` is unlimited.
fn route(name: &str, upstream: &str, matcher: &str, limits: &str) -> String {
    let mut out = format!("[[routes]]\nname = \"{name}\"\nupstream = \"{upstream}\"\n");
    if !matcher.is_empty() {
        out.push_str(&format!("match = {matcher}\n"));
    }
    if !limits.is_empty() {
        out.push_str(&format!("limits = [{limits}]\n"));
    }
    out
}

/// The simplest setup: every request goes, unlimited, to `upstream` as `api`.
fn open_config(server: &str, upstream: &Upstream) -> String {
    config_with(
        server,
        &upstream_table("api", &upstream.target(), ""),
        &route("all", "api", "", ""),
    )
}

/// Asserts a problem+json response: content type, and `type`, `title`, `status` (equal to the
/// HTTP status) and `detail` members.
fn assert_problem(status: u16, content_type: Option<&str>, body: &[u8], expected: u16) {
    assert_eq!(status, expected, "body: {}", String::from_utf8_lossy(body));
    assert_eq!(
        content_type,
        Some("application/problem+json"),
        "status {status}"
    );
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "problem body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    assert_eq!(v["status"], expected, "{v}");
    for member in ["type", "title", "detail"] {
        assert!(
            v[member].as_str().is_some_and(|s| !s.is_empty()),
            "{member} missing or empty in {v}"
        );
    }
}

fn assert_reply_problem(reply: &Reply, expected: u16) {
    assert_problem(
        reply.status,
        reply.header("content-type"),
        &reply.body,
        expected,
    );
}

/// `len` bytes of a non-repeating-looking pattern (so misplaced chunks would show).
fn pattern(len: usize, seed: usize) -> Bytes {
    (0..len)
        .map(|i| ((i.wrapping_mul(31) + seed) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1 over TCP: exact bytes out, a parsed response back
// ---------------------------------------------------------------------------------------------

/// Opens a connection to `addr`, writes `request` exactly, reads one response.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawReply {
    tokio::time::timeout(IO_TIMEOUT, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request).await?;
        read_response(&mut s).await
    })
    .await
    .expect("raw exchange within the timeout")
    .expect("raw exchange succeeds")
}

// ---------------------------------------------------------------------------------------------
// A raw upstream: fixed bytes for hop-by-hop responses, resets, and 101 + echo
// ---------------------------------------------------------------------------------------------

/// An upstream speaking HTTP/1.1 by hand. By request:
/// - an `Upgrade: websocket` request: `101`, then every byte received is echoed back;
/// - `/hop`: a 200 carrying hop-by-hop headers (`Connection: close, x-hop`, `x-hop`,
///   `Keep-Alive`, `Proxy-Connection`, `Trailer`, `Upgrade`) next to an end-to-end `x-end`;
/// - `/reset`: the connection is closed without a response;
/// - anything else: `200 plain`.
///
/// Every request head it reads is recorded in `heads`.
struct RawUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

const HOP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Length: 3\r\n\
Connection: close, x-hop\r\n\
x-hop: 1\r\n\
Keep-Alive: timeout=5\r\n\
Proxy-Connection: keep-alive\r\n\
Trailer: x-sum\r\n\
Upgrade: h2c\r\n\
x-end: kept\r\n\
\r\n\
hop";

const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
Connection: Upgrade\r\n\
Upgrade: websocket\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
\r\n";

const PLAIN: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nplain";

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let log = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(raw_serve(stream, log.clone()));
            }
        });
        RawUpstream { addr, heads, task }
    }

    fn target(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_serve(mut s: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let Ok(Ok(head)) = tokio::time::timeout(IO_TIMEOUT, read_head(&mut s)).await else {
        return;
    };
    heads.lock().unwrap().push(head.clone());
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let upgrade = head
        .to_ascii_lowercase()
        .split("\r\n")
        .any(|l| l.starts_with("upgrade:") && l.contains("websocket"));
    if upgrade {
        if s.write_all(SWITCHING).await.is_err() {
            return;
        }
        // Echo until the other side closes (the task ends with the connection).
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    match path.as_str() {
        "/reset" => {
            // Linger 0: the close is a reset (RST), not an orderly FIN.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
        "/hop" => {
            let _ = s.write_all(HOP_RESPONSE).await;
            let _ = s.shutdown().await;
        }
        _ => {
            let _ = s.write_all(PLAIN).await;
            let _ = s.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Error responses
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn no_matching_route_is_a_404_problem_and_nothing_is_forwarded() {
    let upstream = Upstream::start().await;
    let cfg = config_with(
        "",
        &upstream_table("api", &upstream.target(), ""),
        &route("only", "api", "{ path = \"/only\" }", ""),
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    for path in ["/other", "/", "/only/x", "/onlyx"] {
        let reply = http.get(&format!("http://{}{path}", tg.addr), &[]).await;
        assert_reply_problem(&reply, 404);
    }
    let post = http
        .send(
            "POST",
            &format!("http://{}/nope", tg.addr),
            &[],
            Bytes::from_static(b"body"),
        )
        .await;
    assert_reply_problem(&post, 404);
    assert_eq!(upstream.count(), 0, "nothing reaches the upstream");
    // Sanity: the route itself does forward.
    let ok = http.get(&format!("http://{}/only", tg.addr), &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(upstream.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn refused_upstream_is_a_502_problem() {
    let closed = free_port();
    let cfg = config_with(
        "",
        &upstream_table("dead", &format!("http://127.0.0.1:{closed}"), ""),
        &route("all", "dead", "", ""),
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    for _ in 0..2 {
        let reply = http.get(&format!("http://{}/x", tg.addr), &[]).await;
        assert_reply_problem(&reply, 502);
    }
    tg.stop().await;
}

#[tokio::test]
async fn upstream_closing_without_a_response_is_a_502_problem() {
    let raw = RawUpstream::start().await;
    let cfg = config_with(
        "",
        &upstream_table("raw", &raw.target(), ""),
        &route("all", "raw", "", ""),
    );
    let tg = start_tollgate(&cfg).await;
    let reply = Http::new()
        .get(&format!("http://{}/reset", tg.addr), &[])
        .await;
    assert_reply_problem(&reply, 502);
    assert!(
        raw.heads().iter().any(|h| h.starts_with("GET /reset ")),
        "the request did reach the upstream: {:?}",
        raw.heads()
    );
    tg.stop().await;
}

#[tokio::test]
async fn upstream_slower_than_its_timeout_is_a_504_at_the_timeout() {
    let upstream = Upstream::start().await;
    let cfg = config_with(
        "",
        &format!(
            "[upstreams.api]\ntargets = [\"{}\"]\ntimeout = \"300ms\"\n",
            upstream.target()
        ),
        &route("all", "api", "", ""),
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    let started = Instant::now();
    let reply = http
        .get(&format!("http://{}/slow/5000", tg.addr), &[])
        .await;
    let elapsed = started.elapsed();
    assert_reply_problem(&reply, 504);
    assert!(
        elapsed >= Duration::from_millis(290),
        "504 before the timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(2500),
        "504 should arrive near the 300 ms timeout, not after the 5 s response: {elapsed:?}"
    );
    assert_eq!(upstream.count(), 1, "the request was forwarded");
    // A response inside the timeout goes through.
    let fast = http.get(&format!("http://{}/slow/10", tg.addr), &[]).await;
    assert_eq!(fast.status, 200);
    assert_eq!(&fast.body[..], b"slow\n");
    tg.stop().await;
}

#[tokio::test]
async fn content_length_over_max_body_is_a_413_and_nothing_is_forwarded() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("max_body = 1024", &upstream)).await;
    let url = format!("http://{}/upload", tg.addr);

    let over = Http::new().send("POST", &url, &[], pattern(1025, 0)).await;
    assert_reply_problem(&over, 413);
    assert_eq!(upstream.count(), 0, "an oversized body is never forwarded");

    // Announced but never sent: the 413 comes from the head alone.
    let announced = raw_exchange(
        tg.addr,
        b"POST /upload HTTP/1.1\r\nHost: t.test\r\nContent-Length: 50000000\r\n\r\n",
    )
    .await;
    assert_problem(
        announced.status,
        announced.header("content-type"),
        &announced.body,
        413,
    );
    assert_eq!(upstream.count(), 0);

    // Exactly at the limit is accepted and arrives whole.
    let at = Http::new().send("POST", &url, &[], pattern(1024, 1)).await;
    assert_eq!(at.status, 200, "{:?}", at.body);
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.last().body_len, 1024);
    tg.stop().await;
}

/// A chunked request body of the given chunk sizes, terminated.
fn chunked_request(path: &str, chunks: &[usize]) -> Vec<u8> {
    let mut out =
        format!("POST {path} HTTP/1.1\r\nHost: t.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for (i, &n) in chunks.iter().enumerate() {
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&pattern(n, i));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn chunked_body_passing_max_body_mid_stream_is_a_413() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("max_body = 1024", &upstream)).await;

    let over = raw_exchange(tg.addr, &chunked_request("/upload", &[600, 600, 600])).await;
    assert_problem(over.status, over.header("content-type"), &over.body, 413);
    // The upstream may have seen the start of the body, never the whole of it.
    for received in upstream.received.lock().unwrap().iter() {
        assert!(
            received.body_len <= 1024,
            "more than max_body was forwarded: {received:?}"
        );
    }

    // Exactly at the limit, chunked, is accepted and forwarded whole.
    let before = upstream.count();
    let at = raw_exchange(tg.addr, &chunked_request("/upload", &[512, 500, 12])).await;
    assert_eq!(at.status, 200, "{}", String::from_utf8_lossy(&at.body));
    assert_eq!(upstream.count(), before + 1);
    assert_eq!(upstream.last().body_len, 1024);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Headers as the other side sees them
// ---------------------------------------------------------------------------------------------

/// All values of `name` in what the upstream received, as strings.
fn values(received: &Received, name: &str) -> Vec<String> {
    received
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<non-ascii>").to_string())
        .collect()
}

#[tokio::test]
async fn request_headers_as_the_upstream_sees_them() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let reply = Http::new()
        .get(
            &format!("http://{}/headers?q=1", tg.addr),
            &[
                ("host", "example.test:8080"),
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-proto", "https"),
                ("connection", "keep-alive, x-drop"),
                ("x-drop", "nominated"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers"),
                ("trailer", "x-sum"),
                ("upgrade", "h2c"),
                ("x-keep", "end-to-end"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let seen = upstream.last();
    assert_eq!(
        seen.uri, "/headers?q=1",
        "the path is forwarded as received"
    );
    assert_eq!(
        values(&seen, "x-forwarded-for"),
        ["203.0.113.9, 127.0.0.1"],
        "the TCP peer is appended"
    );
    assert_eq!(
        values(&seen, "x-forwarded-proto"),
        ["http"],
        "an untrusted peer's X-Forwarded-Proto is overwritten"
    );
    assert_eq!(values(&seen, "x-forwarded-host"), ["example.test:8080"]);
    assert_eq!(
        values(&seen, "host"),
        ["example.test:8080"],
        "Host passes through"
    );
    let via = values(&seen, "via").join(", ");
    assert!(via.contains("1.1 tollgate"), "via: {via:?}");
    assert_eq!(values(&seen, "x-keep"), ["end-to-end"]);
    for hop in [
        "connection",
        "x-drop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !seen.headers.contains_key(hop),
            "hop-by-hop header {hop} was forwarded: {:?}",
            seen.headers
        );
    }
    tg.stop().await;
}

#[tokio::test]
async fn forwarding_headers_without_client_values_and_an_existing_via() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let reply = Http::new()
        .get(&format!("http://{}/plain", tg.addr), &[("via", "1.0 edge")])
        .await;
    assert_eq!(reply.status, 200);
    let seen = upstream.last();
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    let host = format!("{}", tg.addr);
    assert_eq!(values(&seen, "x-forwarded-host"), [host.as_str()]);
    assert_eq!(values(&seen, "host"), [host.as_str()]);
    let via = values(&seen, "via").join(", ");
    assert!(
        via.starts_with("1.0 edge") && via.ends_with("1.1 tollgate"),
        "tollgate appends to Via: {via:?}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_trusted_peer_keeps_its_forwarded_proto() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &upstream,
    ))
    .await;
    let reply = Http::new()
        .get(
            &format!("http://{}/trusted", tg.addr),
            &[
                ("host", "public.example"),
                ("x-forwarded-for", "198.51.100.7"),
                ("x-forwarded-proto", "https"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let seen = upstream.last();
    assert_eq!(values(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(
        values(&seen, "x-forwarded-for"),
        ["198.51.100.7, 127.0.0.1"],
        "the peer is appended even when trusted"
    );
    assert_eq!(values(&seen, "x-forwarded-host"), ["public.example"]);
    tg.stop().await;
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_stripped() {
    let raw = RawUpstream::start().await;
    let cfg = config_with(
        "",
        &upstream_table("raw", &raw.target(), ""),
        &route("all", "raw", "", ""),
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    for _ in 0..2 {
        let reply = http.get(&format!("http://{}/hop", tg.addr), &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(&reply.body[..], b"hop");
        assert_eq!(reply.header("x-end"), Some("kept"));
        for hop in [
            "connection",
            "x-hop",
            "keep-alive",
            "proxy-connection",
            "trailer",
            "upgrade",
        ] {
            assert!(
                !reply.headers.contains_key(hop),
                "hop-by-hop response header {hop} reached the client: {:?}",
                reply.headers
            );
        }
        let via = reply.header("via").unwrap_or_default();
        assert!(via.contains("1.1 tollgate"), "response via: {via:?}");
    }
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Malformed requests, on raw sockets
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http11_without_host_is_a_400() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let reply = raw_exchange(tg.addr, b"GET /nohost HTTP/1.1\r\n\r\n").await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn two_host_headers_are_a_400() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let reply = raw_exchange(
        tg.addr,
        b"GET /twohosts HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn http10_without_host_is_forwarded() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let reply = raw_exchange(tg.addr, b"GET /ten HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(upstream.count(), 1);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/ten");
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    let via = values(&seen, "via").join(", ");
    assert!(via.contains("tollgate"), "via: {via:?}");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("upstream JSON");
    assert_eq!(body["uri"], "/ten");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Routing and limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn path_normalisation_cannot_dodge_a_routes_limit() {
    let upstream = Upstream::start().await;
    let routes = route(
        "login",
        "api",
        "{ path = \"/login\" }",
        "{ by = \"ip\", algorithm = \"fixed_window\", rate = \"1/hour\" }",
    ) + &route("rest", "api", "", "");
    let cfg = config_with("", &upstream_table("api", &upstream.target(), ""), &routes);
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    let first = http.get(&format!("http://{}/login", tg.addr), &[]).await;
    assert_eq!(first.status, 200);
    assert!(
        first.header("ratelimit").is_some(),
        "limited by the login route"
    );
    for dodge in [
        "//login",
        "/x/../login",
        "/%6cogin",
        "/./login",
        "/%2e%2e/login",
        "/login",
    ] {
        let reply = http.get(&format!("http://{}{dodge}", tg.addr), &[]).await;
        assert_eq!(reply.status, 429, "{dodge} escaped the limit of /login");
        assert_eq!(reply.json()["route"], "login", "{dodge}");
    }
    // Raw bytes too, in case a client library tidied the path.
    let raw = raw_exchange(
        tg.addr,
        b"GET /a/b/../..//%6Cogin HTTP/1.1\r\nHost: t.test\r\n\r\n",
    )
    .await;
    assert_eq!(raw.status, 429, "{raw:?}");
    assert_eq!(upstream.count(), 1, "only the first /login was forwarded");
    // Other paths still go to the unlimited route.
    let other = http.get(&format!("http://{}/logout", tg.addr), &[]).await;
    assert_eq!(other.status, 200);
    assert_eq!(upstream.count(), 2);
    tg.stop().await;
}

#[tokio::test]
async fn a_route_without_limits_sends_no_rate_limit_headers() {
    let upstream = Upstream::start().await;
    let routes = route(
        "limited",
        "api",
        "{ path = \"/limited\" }",
        "{ by = \"ip\", algorithm = \"fixed_window\", rate = \"100/hour\" }",
    ) + &route("open", "api", "", "");
    let cfg = config_with(
        "rate_limit_headers = \"both\"",
        &upstream_table("api", &upstream.target(), ""),
        &routes,
    );
    let tg = start_tollgate(&cfg).await;
    let http = Http::new();
    let limited = http.get(&format!("http://{}/limited", tg.addr), &[]).await;
    assert_eq!(limited.status, 200);
    assert!(
        limited.header("ratelimit").is_some(),
        "sanity: limited route has headers"
    );
    assert!(limited.header("x-ratelimit-limit").is_some());
    for path in ["/open", "/status/404", "/status/500"] {
        let reply = http.get(&format!("http://{}{path}", tg.addr), &[]).await;
        for name in [
            "ratelimit",
            "ratelimit-policy",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "retry-after",
        ] {
            assert!(
                !reply.headers.contains_key(name),
                "{path}: unlimited route sent {name}: {:?}",
                reply.headers
            );
        }
    }
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Streaming bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_8_mib_body_echoes_back_byte_identical() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let body = pattern(8 << 20, 7);
    let reply = Http::new()
        .send(
            "POST",
            &format!("http://{}/echo", tg.addr),
            &[],
            body.clone(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "echoed body differs");
    tg.stop().await;
}

#[tokio::test]
async fn a_16_mib_response_arrives_whole() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let n = 16usize << 20;
    let reply = Http::new()
        .get(&format!("http://{}/size/{n}", tg.addr), &[])
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), n);
    assert!(reply.body.iter().all(|&b| b == b'x'));
    tg.stop().await;
}

/// Reads response body frames until at least `want` bytes arrived or the body ended.
async fn read_at_least(body: &mut hyper::body::Incoming, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        match tokio::time::timeout(IO_TIMEOUT, body.frame()).await {
            Err(_) => panic!(
                "no body data within {IO_TIMEOUT:?}; got {} bytes",
                got.len()
            ),
            Ok(None) => break,
            Ok(Some(frame)) => {
                if let Ok(data) = frame.expect("body frame").into_data() {
                    got.extend_from_slice(&data);
                }
            }
        }
    }
    got
}

#[tokio::test]
async fn bodies_stream_both_ways_before_the_request_ends() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let stream = TcpStream::connect(tg.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let request = Request::post("/echo")
        .header("host", "stream.test")
        .body(ChannelBody(rx))
        .unwrap();
    let first = pattern(1 << 20, 1);
    tx.send(first.clone()).await.unwrap();
    let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(request))
        .await
        .expect("response head while the request body is still open")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // The first MiB comes back while the request body is still open: nothing waits for
    // the whole request.
    let echoed = read_at_least(&mut body, first.len()).await;
    assert_eq!(echoed.len(), first.len());
    assert!(echoed[..] == first[..], "first MiB differs");
    let second = pattern(3 << 20, 2);
    tx.send(second.clone()).await.unwrap();
    drop(tx);
    let rest = read_at_least(&mut body, usize::MAX).await;
    assert_eq!(rest.len(), second.len());
    assert!(rest[..] == second[..], "rest differs");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Upgrades
// ---------------------------------------------------------------------------------------------

const WS_REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\n\
Host: ws.test\r\n\
Connection: Upgrade\r\n\
Upgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
\r\n";

/// `"name";r=R;t=T` → R.
fn remaining(ratelimit: Option<&str>) -> u64 {
    common::parse::remaining(ratelimit.expect("a RateLimit header"))
}

#[tokio::test]
async fn websocket_upgrade_passes_through_and_counts_once() {
    let raw = RawUpstream::start().await;
    let cfg = config_with(
        "",
        &upstream_table("raw", &raw.target(), ""),
        &route(
            "ws",
            "raw",
            "",
            "{ by = \"ip\", algorithm = \"fixed_window\", rate = \"2/hour\" }",
        ),
    );
    let tg = start_tollgate(&cfg).await;

    let mut client = TcpStream::connect(tg.addr).await.unwrap();
    client.write_all(WS_REQUEST).await.unwrap();
    let switched = tokio::time::timeout(IO_TIMEOUT, read_response(&mut client))
        .await
        .expect("101 within the timeout")
        .expect("a response head");
    assert_eq!(switched.status, 101, "{switched:?}");
    assert_eq!(
        switched
            .header("upgrade")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("websocket")
    );
    assert!(
        switched
            .header("connection")
            .is_some_and(|c| c.to_ascii_lowercase().contains("upgrade")),
        "{switched:?}"
    );
    assert_eq!(remaining(switched.header("ratelimit")), 1, "{switched:?}");

    // After the switch: raw bytes, echoed by the upstream through tollgate, several times.
    for (i, message) in [
        &b"hello over the switch"[..],
        &[0u8, 255, 13, 10, 0],
        &pattern(100_000, 3),
    ]
    .into_iter()
    .enumerate()
    {
        client.write_all(message).await.unwrap();
        let mut back = vec![0; message.len()];
        tokio::time::timeout(IO_TIMEOUT, client.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("echo {i} within the timeout"))
            .unwrap();
        assert!(back == message, "echo {i} differs");
    }

    let heads = raw.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = heads[0].to_ascii_lowercase();
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(
        head.split("\r\n")
            .any(|l| l.starts_with("connection:") && l.contains("upgrade")),
        "{head}"
    );
    assert!(head.contains("\r\nsec-websocket-key: "), "{head}");

    // The bytes exchanged cost nothing: the upgrade took one unit of two.
    let http = Http::new();
    let second = http.get(&format!("http://{}/plain", tg.addr), &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(&second.body[..], b"plain");
    assert_eq!(remaining(second.header("ratelimit")), 0);
    let third = http.get(&format!("http://{}/plain", tg.addr), &[]).await;
    assert_eq!(third.status, 429);
    assert_eq!(raw.heads().len(), 2);

    // The upgraded connection still works while other requests come and go.
    client.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(IO_TIMEOUT, client.read_exact(&mut back))
        .await
        .expect("echo within the timeout")
        .unwrap();
    assert_eq!(&back, b"still here");
    drop(client);
    tg.stop().await;
}

#[tokio::test]
async fn the_host_that_picks_the_route_is_the_host_the_upstream_gets() {
    let upstream = Upstream::start().await;
    let routes = route(
        "vhost",
        "api",
        "{ host = \"example.com\" }",
        "{ by = \"ip\", algorithm = \"fixed_window\", rate = \"1/hour\" }",
    ) + &route("rest", "api", "", "");
    let cfg = config_with("", &upstream_table("api", &upstream.target(), ""), &routes);
    let tg = start_tollgate(&cfg).await;
    // An absolute-form target names the host; a Host header naming another one is refused
    // (RFC 9112 §3.2.2 leaves it to the server; a proxy that routed on one and forwarded the
    // other could be walked around).
    let reply = raw_exchange(
        tg.addr,
        b"GET http://example.com/h HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(upstream.count(), 0, "nothing forwarded");
    // The same host spelt differently (case, trailing dot, port) agrees, and the route is the
    // one of that host.
    for expected in [200, 429] {
        let reply = raw_exchange(
            tg.addr,
            b"GET http://example.com/h HTTP/1.1\r\nHost: EXAMPLE.com.:80\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(reply.status, expected, "{reply:?}");
    }
    let seen = upstream.last();
    assert_eq!(values(&seen, "host"), ["example.com"]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["example.com"]);
    assert_eq!(upstream.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn every_via_line_is_kept() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&open_config("", &upstream)).await;
    let reply = raw_exchange(
        tg.addr,
        b"GET /v HTTP/1.1\r\nHost: a\r\nVia: 1.0 first\r\nVia: 1.1 second\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        values(&upstream.last(), "via"),
        ["1.0 first, 1.1 second, 1.1 tollgate"]
    );
    tg.stop().await;
}
