//! Proxy hardening, end to end over loopback with exact bytes: request framing and smuggling
//! attempts (each answered 400 / 501 with nothing reaching the recording upstream), `Connection`
//! nominations that must not remove protected headers, upstream responses with invalid framing
//! (502), slow and abusive clients (header read, body idle and send timeouts, max_connections),
//! a real WebSocket echo through tollgate with its idle timeout, and bounded memory for 64 MiB
//! bodies and 5,000 idle connections (measured on the binary, figures printed).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::*;
use common::*;

/// The tests that open thousands of connections and read this process's memory take this
/// exclusively: run beside the others they would share the descriptors and the two cores.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for any single network exchange in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Config helpers
// ---------------------------------------------------------------------------------------------

/// `[server]` (listen on 127.0.0.1:0 plus `server` lines), the memory store, one upstream `api`
/// at `upstream`, and `routes`.
fn config_with(upstream: &str, server: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n[store]\nbackend = \"memory\"\n\n\
         [upstreams.api]\ntargets = [\"{upstream}\"]\ntimeout = \"5s\"\n\n{routes}\n"
    )
}

/// One route for every request, no limits.
const OPEN_ROUTE: &str = "[[routes]]\nname = \"all\"\nupstream = \"api\"\n";

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1 over TCP
// ---------------------------------------------------------------------------------------------

/// Reads until the peer closes (EOF or reset) or `limit` passes. Returns the first 64 KiB that
/// arrived, the total count, and whether the connection closed.
async fn until_closed<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> (Vec<u8>, u64, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (kept, total, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (kept, total, true),
            Ok(Ok(n)) => {
                total += n as u64;
                let room = (64 * 1024usize).saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
            }
        }
    }
}

/// Connects, writes `request`, reads one response (bounded).
async fn exchange(addr: SocketAddr, request: &[u8]) -> RawReply {
    tokio::time::timeout(IO_TIMEOUT, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request).await?;
        read_response(&mut s).await
    })
    .await
    .expect("exchange within the timeout")
    .expect("exchange succeeds")
}

fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().next()?;
    if !line.starts_with("HTTP/1.") {
        return None;
    }
    line.split_whitespace().nth(1)?.parse().ok()
}

fn uris(upstream: &Upstream) -> Vec<String> {
    upstream
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.uri.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Framing: every case refused, the connection closed, nothing forwarded
// ---------------------------------------------------------------------------------------------

/// A second request hidden where a parser that disagreed about framing would find it.
const HIDDEN: &str = "GET /smuggled HTTP/1.1\r\nHost: tollgate.test\r\n\r\n";

/// `POST /front` with the given framing header lines (`{len}` = the body's length) and a body
/// that ends a chunked message at once and then carries [`HIDDEN`].
fn smuggle(framing: &str) -> Vec<u8> {
    let body = format!("0\r\n\r\n{HIDDEN}");
    let framing = framing.replace("{len}", &body.len().to_string());
    format!("POST /front HTTP/1.1\r\nHost: tollgate.test\r\n{framing}\r\n{body}").into_bytes()
}

struct Case {
    name: &'static str,
    request: Vec<u8>,
    expect: u16,
}

fn case(name: &'static str, request: Vec<u8>, expect: u16) -> Case {
    Case {
        name,
        request,
        expect,
    }
}

/// Sends one case on a fresh connection. Returns what was wrong, if anything: the status, a
/// second response, a connection left open, or anything reaching the upstream.
async fn refused(addr: SocketAddr, upstream: &Upstream, case: &Case) -> Option<String> {
    let before = upstream.count();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // tollgate may answer and close before the whole request is written: that is fine.
    let _ = s.write_all(&case.request).await;
    let (bytes, _, closed) = until_closed(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&bytes);
    let mut wrong = Vec::new();
    match status_of(&bytes) {
        Some(status) if status == case.expect => {}
        other => wrong.push(format!("status {other:?}, expected {}", case.expect)),
    }
    // Whatever follows the first response would be the answer to a second request.
    let mut rest: &[u8] = &bytes;
    if read_response(&mut rest).await.is_ok() && !rest.is_empty() {
        wrong.push(format!(
            "more after the first response: {:?}",
            String::from_utf8_lossy(rest)
        ));
    }
    if !closed {
        wrong.push("the connection was left open".to_string());
    }
    let after = uris(upstream);
    if after.iter().any(|u| u.contains("smuggled")) {
        wrong.push("THE HIDDEN REQUEST REACHED THE UPSTREAM".to_string());
    }
    if after.len() != before {
        wrong.push(format!(
            "forwarded to the upstream: {:?}",
            &after[before.min(after.len())..]
        ));
    }
    if wrong.is_empty() {
        None
    } else {
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_string();
        Some(format!(
            "{}: {} (tollgate answered {head:?})",
            case.name,
            wrong.join("; ")
        ))
    }
}

/// Runs every case against one tollgate; fails listing every case that went wrong.
async fn all_refused(cases: Vec<Case>) {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(&upstream.target(), "", OPEN_ROUTE)).await;
    let mut failures = Vec::new();
    for case in &cases {
        if let Some(failure) = refused(tg.addr, &upstream, case).await {
            failures.push(failure);
        }
    }
    // tollgate still serves normally afterwards.
    let ok = exchange(
        tg.addr,
        b"GET /after HTTP/1.1\r\nHost: tollgate.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(ok.status, 200);
    tg.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {} cases went wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn transfer_encoding_other_than_one_chunked_is_refused_and_nothing_is_forwarded() {
    let _shared = ALONE.read().await;
    all_refused(vec![
        case(
            "chunked, chunked",
            smuggle("Transfer-Encoding: chunked, chunked\r\n"),
            400,
        ),
        case(
            "chunked on two lines",
            smuggle("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
            400,
        ),
        case(",chunked", smuggle("Transfer-Encoding: ,chunked\r\n"), 400),
        case("gzip", smuggle("Transfer-Encoding: gzip\r\n"), 400),
        case("identity", smuggle("Transfer-Encoding: identity\r\n"), 400),
        case("xchunked", smuggle("Transfer-Encoding: xchunked\r\n"), 400),
        case(
            "gzip, chunked",
            smuggle("Transfer-Encoding: gzip, chunked\r\n"),
            501,
        ),
        case(
            "x then chunked on two lines",
            smuggle("Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n"),
            501,
        ),
        case(
            "chunked then x on two lines (TE.TE)",
            smuggle("Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"),
            400,
        ),
        case(
            "space before the colon",
            smuggle("Transfer-Encoding : chunked\r\n"),
            400,
        ),
        case(
            "obsolete line folding",
            smuggle("Transfer-Encoding:\r\n chunked\r\n"),
            400,
        ),
        case(
            "chunked on HTTP/1.0",
            format!(
                "POST /front HTTP/1.0\r\nHost: tollgate.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{HIDDEN}"
            )
            .into_bytes(),
            400,
        ),
    ])
    .await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_a_400_and_nothing_is_forwarded() {
    let _shared = ALONE.read().await;
    all_refused(vec![
        case(
            "CL then TE (CL.TE)",
            smuggle("Content-Length: {len}\r\nTransfer-Encoding: chunked\r\n"),
            400,
        ),
        case(
            "TE then CL (TE.CL)",
            smuggle("Transfer-Encoding: chunked\r\nContent-Length: {len}\r\n"),
            400,
        ),
        case(
            "TE with a tab before chunked, and CL",
            smuggle("Content-Length: {len}\r\nTransfer-Encoding: \tchunked\r\n"),
            400,
        ),
        case(
            "TE Chunked (capitalised), and CL",
            smuggle("Transfer-Encoding: Chunked\r\nContent-Length: {len}\r\n"),
            400,
        ),
        case(
            "TE chunked, CL 0",
            smuggle("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"),
            400,
        ),
    ])
    .await;
}

#[tokio::test]
async fn malformed_content_length_is_refused_and_nothing_is_forwarded() {
    let _shared = ALONE.read().await;
    all_refused(vec![
        case(
            "two different lengths",
            smuggle("Content-Length: 5\r\nContent-Length: {len}\r\n"),
            400,
        ),
        case(
            "a list of lengths",
            smuggle("Content-Length: 5, 6\r\n"),
            400,
        ),
        case("a signed length", smuggle("Content-Length: +5\r\n"), 400),
        case("a negative length", smuggle("Content-Length: -1\r\n"), 400),
        case(
            "a hexadecimal length",
            smuggle("Content-Length: 0x5\r\n"),
            400,
        ),
        case("two numbers", smuggle("Content-Length: 5 5\r\n"), 400),
    ])
    .await;
}

#[tokio::test]
async fn missing_or_repeated_host_is_a_400_and_nothing_is_forwarded() {
    let _shared = ALONE.read().await;
    // Each carries a pipelined request behind it: after a 400 the connection must close, so
    // it is never read.
    all_refused(vec![
        case(
            "no Host",
            format!("GET /front HTTP/1.1\r\nAccept: */*\r\n\r\n{HIDDEN}").into_bytes(),
            400,
        ),
        case(
            "absolute form without Host",
            format!("GET http://tollgate.test/front HTTP/1.1\r\n\r\n{HIDDEN}").into_bytes(),
            400,
        ),
        case(
            "two Host lines",
            format!("GET /front HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n{HIDDEN}")
                .into_bytes(),
            400,
        ),
        case(
            "Host and host",
            format!("GET /front HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n{HIDDEN}")
                .into_bytes(),
            400,
        ),
        case(
            "two Host lines on a POST with a body",
            format!(
                "POST /front HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\nHost: b.test\r\n\r\nok{HIDDEN}"
            )
            .into_bytes(),
            400,
        ),
    ])
    .await;
}

// ---------------------------------------------------------------------------------------------
// Connection nominations and the upstream request's own framing
// ---------------------------------------------------------------------------------------------

/// `"name";r=R;t=T` → R.
fn remaining(reply: &RawReply) -> u64 {
    common::parse::remaining(
        reply
            .header("ratelimit")
            .unwrap_or_else(|| panic!("a RateLimit header: {reply:?}")),
    )
}

async fn next_reply(s: &mut TcpStream) -> RawReply {
    tokio::time::timeout(IO_TIMEOUT, read_response(s))
        .await
        .expect("response within the timeout")
        .expect("a response")
}

fn header<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn connection_cannot_remove_framing_routing_or_key_headers() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let routes = "[[routes]]\nname = \"keyed\"\nupstream = \"api\"\n\
                  limits = [ { by = \"header:x-api-key\", algorithm = \"fixed_window\", rate = \"100/hour\" } ]\n";
    let tg = start_tollgate(&config_with(&upstream.target(), "", routes)).await;
    // All on one keep-alive connection: framing must stay in step throughout.
    let mut s = TcpStream::connect(tg.addr).await.unwrap();

    s.write_all(
        b"POST /one HTTP/1.1\r\nHost: tollgate.test\r\nx-api-key: k1\r\nx-secret: s\r\n\
          Connection: keep-alive, x-api-key, host, content-length, transfer-encoding, x-secret\r\n\
          Content-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let one = next_reply(&mut s).await;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(remaining(&one), 99, "counted under the key");
    let seen = upstream.last();
    assert_eq!(seen.uri, "/one");
    assert_eq!(header(&seen, "x-api-key"), Some("k1"), "{seen:?}");
    assert_eq!(header(&seen, "host"), Some("tollgate.test"), "{seen:?}");
    assert_eq!(header(&seen, "content-length"), Some("5"), "{seen:?}");
    assert_eq!(seen.body_len, 5);
    assert_eq!(
        header(&seen, "x-secret"),
        None,
        "an ordinary nominated header is removed"
    );
    assert_eq!(header(&seen, "connection"), None);

    s.write_all(
        b"POST /two HTTP/1.1\r\nHost: tollgate.test\r\nx-api-key: k1\r\n\
          Connection: transfer-encoding, x-api-key\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let two = next_reply(&mut s).await;
    assert_eq!(two.status, 200, "{two:?}");
    assert_eq!(remaining(&two), 98, "the same key's counter");
    let seen = upstream.last();
    assert_eq!(seen.uri, "/two");
    assert_eq!(header(&seen, "x-api-key"), Some("k1"));
    assert_eq!(seen.body_len, 7);

    // Another key has its own counter: the nomination did not turn the key into the IP.
    s.write_all(
        b"GET /three HTTP/1.1\r\nHost: tollgate.test\r\nx-api-key: k2\r\nConnection: x-api-key\r\n\r\n",
    )
    .await
    .unwrap();
    let three = next_reply(&mut s).await;
    assert_eq!(three.status, 200);
    assert_eq!(remaining(&three), 99);
    assert_eq!(header(&upstream.last(), "x-api-key"), Some("k2"));
    assert_eq!(upstream.count(), 3);
    drop(s);
    tg.stop().await;
}

#[tokio::test]
async fn the_upstream_request_is_framed_by_tollgate_not_the_client() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(&upstream.target(), "", OPEN_ROUTE)).await;
    let mut s = TcpStream::connect(tg.addr).await.unwrap();

    // A length with leading zeros is re-stated, not copied.
    s.write_all(b"POST /zeros HTTP/1.1\r\nHost: t\r\nContent-Length: 0005\r\n\r\nhello")
        .await
        .unwrap();
    assert_eq!(next_reply(&mut s).await.status, 200);
    let seen = upstream.last();
    assert_eq!(header(&seen, "content-length"), Some("5"), "{seen:?}");
    assert_eq!(seen.body_len, 5);

    // A chunked body (capitalised coding, chunk extensions) is re-chunked by hyper.
    s.write_all(
        b"POST /chunks HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n\
          3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(next_reply(&mut s).await.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/chunks");
    assert_eq!(seen.body_len, 5);
    assert_eq!(header(&seen, "content-length"), None, "{seen:?}");
    assert_eq!(
        header(&seen, "transfer-encoding"),
        Some("chunked"),
        "{seen:?}"
    );

    // Two identical lengths are one length upstream.
    s.write_all(
        b"POST /twice HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await
    .unwrap();
    assert_eq!(next_reply(&mut s).await.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/twice");
    assert_eq!(seen.headers.get_all("content-length").iter().count(), 1);
    assert_eq!(seen.body_len, 3);
    assert_eq!(upstream.count(), 3);
    drop(s);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Upstream responses with invalid framing
// ---------------------------------------------------------------------------------------------

/// An upstream that answers `GET /case/N` with `responses[N]`, byte for byte, then closes.
struct ScriptedUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedUpstream {
    async fn start(responses: &'static [&'static [u8]]) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(Ok(head)) = tokio::time::timeout(IO_TIMEOUT, read_head(&mut s)).await
                    else {
                        return;
                    };
                    let path = head.split_whitespace().nth(1).unwrap_or("/");
                    let n: usize = path
                        .strip_prefix("/case/")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let _ = s.write_all(responses[n]).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        ScriptedUpstream { addr, task }
    }

    fn target(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asks for each case (on its own connection, `Connection: close`) and lists every case that
/// did not come back as a 502.
async fn all_bad_gateway(responses: &'static [&'static [u8]], names: &[&str]) {
    let upstream = ScriptedUpstream::start(responses).await;
    let tg = start_tollgate(&config_with(&upstream.target(), "", OPEN_ROUTE)).await;
    let mut failures = Vec::new();
    for (n, name) in names.iter().enumerate() {
        let mut s = TcpStream::connect(tg.addr).await.unwrap();
        s.write_all(
            format!("GET /case/{n} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let (bytes, _, closed) = until_closed(&mut s, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if status_of(&bytes) != Some(502) {
            failures.push(format!(
                "{name}: expected 502, the client got {text:?}{}",
                if closed {
                    ""
                } else {
                    " (and the connection hung)"
                }
            ));
        }
    }
    tg.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {} cases went wrong:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn an_upstream_with_a_garbage_status_line_or_bad_lengths_is_a_502() {
    let _shared = ALONE.read().await;
    const RESPONSES: &[&[u8]] = &[
        b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",
        b"garbage garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabc",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    all_bad_gateway(
        RESPONSES,
        &[
            "a status that is not a number",
            "no status line at all",
            "a four-digit status",
            "two different Content-Lengths",
            "a Content-Length that is not a number",
            "a negative Content-Length",
            "Transfer-Encoding on HTTP/1.0",
        ],
    )
    .await;
}

#[tokio::test]
async fn an_upstream_with_ambiguous_transfer_encoding_is_a_502() {
    let _shared = ALONE.read().await;
    const RESPONSES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n\
          33\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    all_bad_gateway(
        RESPONSES,
        &[
            "Content-Length and Transfer-Encoding: chunked, with a bad chunk",
            "Content-Length 50 and Transfer-Encoding: chunked with 5 bytes",
            "Content-Length 2 and Transfer-Encoding: chunked with a response in the chunk",
            "Transfer-Encoding: chunked, chunked",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_broken_upstream_body_is_cut_never_completed() {
    let _shared = ALONE.read().await;
    // The head is fine (so it is relayed); the body breaks mid-way.
    const RESPONSES: &[&[u8]] =
        &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nmore\r\n"];
    let upstream = ScriptedUpstream::start(RESPONSES).await;
    let tg = start_tollgate(&config_with(&upstream.target(), "", OPEN_ROUTE)).await;
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(b"GET /case/0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let got = tokio::time::timeout(IO_TIMEOUT, read_response(&mut s))
        .await
        .expect("tollgate answers or closes within the timeout");
    assert!(
        got.is_err(),
        "the client must not see a complete response: {got:?}"
    );
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Slow and abusive clients
// ---------------------------------------------------------------------------------------------

/// A plain GET on its own connection (`Connection: close`), with the time it took.
async fn normal_get(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let reply = exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    (reply.status, started.elapsed())
}

fn assert_about(what: &str, took: Duration, expected: Duration) {
    let low = expected.mul_f64(0.8);
    let high = expected + Duration::from_secs(2);
    assert!(
        took >= low && took <= high,
        "{what}: took {took:?}, expected about {expected:?} ({low:?}..{high:?})"
    );
}

#[tokio::test]
async fn slowloris_and_idle_keep_alive_are_cut_at_the_header_read_timeout() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(
        &upstream.target(),
        "header_read_timeout = \"1s\"",
        OPEN_ROUTE,
    ))
    .await;
    let addr = tg.addr;

    // Half a request head, then nothing.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /slow-head HTTP/1.1\r\nHost: t\r\nX-Half: ")
        .await
        .unwrap();
    let started = Instant::now();
    let half_task = tokio::spawn(async move {
        let (bytes, _, closed) = until_closed(&mut half, Duration::from_secs(8)).await;
        (started.elapsed(), bytes, closed)
    });

    // A keep-alive connection that goes idle after one complete request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(next_reply(&mut idle).await.status, 200);
    let idle_since = Instant::now();
    let idle_task = tokio::spawn(async move {
        let (bytes, _, closed) = until_closed(&mut idle, Duration::from_secs(8)).await;
        (idle_since.elapsed(), bytes, closed)
    });

    // A normal client is served while those hang.
    let (status, took) = normal_get(addr, "/normal").await;
    let normal_done = started.elapsed();
    assert_eq!(status, 200);

    let (half_closed, half_bytes, closed) = half_task.await.unwrap();
    assert!(closed, "the half-head connection was never closed");
    eprintln!(
        "slowloris (half a head): closed after {half_closed:?}, sent back {:?}; \
         normal client served in {took:?} meanwhile",
        String::from_utf8_lossy(&half_bytes)
    );
    assert_about(
        "half a head is cut at header_read_timeout",
        half_closed,
        Duration::from_secs(1),
    );
    assert!(
        normal_done < half_closed,
        "the normal client was served while the slow one hung"
    );

    let (idle_closed, idle_bytes, closed) = idle_task.await.unwrap();
    assert!(closed, "the idle keep-alive connection was never closed");
    eprintln!("idle keep-alive: closed {idle_closed:?} after its last response");
    assert!(idle_bytes.is_empty(), "{idle_bytes:?}");
    assert_about(
        "an idle keep-alive connection is cut at header_read_timeout",
        idle_closed,
        Duration::from_secs(1),
    );
    assert!(
        !uris(&upstream).iter().any(|u| u == "/slow-head"),
        "the partial request was never forwarded"
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_cut_at_the_header_read_timeout() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(
        &upstream.target(),
        "header_read_timeout = \"1s\"",
        OPEN_ROUTE,
    ))
    .await;
    let started = Instant::now();
    // Connects and sends nothing at all.
    let mut silent = TcpStream::connect(tg.addr).await.unwrap();
    // Sends the start of the HTTP/2 preface (so far indistinguishable from h2c), then stalls.
    let mut preface = TcpStream::connect(tg.addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (a, b) = tokio::join!(
        async {
            let (_, _, closed) = until_closed(&mut silent, Duration::from_secs(4)).await;
            (closed, started.elapsed())
        },
        async {
            let (_, _, closed) = until_closed(&mut preface, Duration::from_secs(4)).await;
            (closed, started.elapsed())
        }
    );
    eprintln!("silent connection: closed={} at {:?}", a.0, a.1);
    eprintln!("half an h2 preface: closed={} at {:?}", b.0, b.1);
    let open = tg.app.metrics.open_connections.get();
    tg.stop().await;
    assert!(
        a.0 && a.1 <= Duration::from_secs(3),
        "a connection that sends nothing is never cut (still open after {:?}; tollgate \
         counts {open} open connections): it holds a max_connections slot forever",
        a.1
    );
    assert!(
        b.0 && b.1 <= Duration::from_secs(3),
        "a connection that stalls inside the HTTP/2 preface is never cut (still open after {:?})",
        b.1
    );
}

#[tokio::test]
async fn a_stalled_body_is_a_408_at_the_body_idle_timeout() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(
        &upstream.target(),
        "body_idle_timeout = \"1s\"",
        OPEN_ROUTE,
    ))
    .await;
    let addr = tg.addr;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    // The default upstream path collects the whole body before answering, so it keeps asking.
    slow.write_all(b"POST /collect HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let slow_task = tokio::spawn(async move {
        let reply = tokio::time::timeout(IO_TIMEOUT, read_response(&mut slow)).await;
        let at = started.elapsed();
        let (_, _, closed) = until_closed(&mut slow, Duration::from_secs(3)).await;
        (reply, at, closed)
    });
    let (status, took) = normal_get(addr, "/normal").await;
    let normal_done = started.elapsed();
    assert_eq!(status, 200);

    let (reply, at, closed) = slow_task.await.unwrap();
    let reply = reply
        .expect("a response within the timeout")
        .expect("a response");
    eprintln!(
        "stalled body: {} after {at:?}; normal client served in {took:?} meanwhile",
        reply.status
    );
    assert_eq!(reply.status, 408, "{reply:?}");
    assert_about("the stalled body's 408", at, Duration::from_secs(1));
    assert!(normal_done < at, "the normal client was served meanwhile");
    assert!(closed, "the connection is closed after the 408");
    tg.stop().await;
}

#[tokio::test]
async fn a_slow_but_steady_body_is_not_cut() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(
        &upstream.target(),
        "body_idle_timeout = \"1s\"",
        OPEN_ROUTE,
    ))
    .await;
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(b"POST /steady HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // Ten bytes every 300 ms: 3 s in all, three times the idle timeout, never idle for it.
    for _ in 0..10 {
        s.write_all(b"0123456789").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let reply = next_reply(&mut s).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(started.elapsed() > Duration::from_secs(2));
    let seen = upstream.last();
    assert_eq!(seen.uri, "/steady");
    assert_eq!(seen.body_len, 100);
    tg.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_send_timeout() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(
        &upstream.target(),
        "send_timeout = \"1s\"",
        OPEN_ROUTE,
    ))
    .await;
    let addr = tg.addr;
    const SIZE: u64 = 64 * 1024 * 1024;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(format!("GET /size/{SIZE} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();

    let (status, took) = normal_get(addr, "/normal").await;
    assert_eq!(status, 200);
    let normal_done = started.elapsed();

    // tollgate's side of the slow connection goes away while this side still holds it.
    let open = &tg.app.metrics.open_connections;
    let mut cut_at = None;
    while started.elapsed() < Duration::from_secs(15) {
        if open.get() == 0 {
            cut_at = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let cut_at = cut_at.unwrap_or_else(|| {
        panic!(
            "the connection of a client that stopped reading was still open after {:?}",
            started.elapsed()
        )
    });
    // What the client can still read is what sat in the buffers, then the end.
    let (_, received, closed) = until_closed(&mut slow, IO_TIMEOUT).await;
    eprintln!(
        "slow reader: cut after {cut_at:?} having taken {received} of {SIZE} bytes; \
         normal client served in {took:?} meanwhile"
    );
    assert!(closed, "the slow reader's connection ends");
    assert!(received < SIZE, "the whole body was not delivered");
    assert!(
        cut_at < Duration::from_secs(6),
        "cut at about the 1 s send timeout (plus the time to fill the buffers), not the 60 s default"
    );
    assert!(
        normal_done < cut_at,
        "the normal client was served meanwhile"
    );
    tg.stop().await;
}

#[tokio::test]
async fn at_max_connections_a_new_client_waits_until_a_slot_frees() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(
        &upstream.target(),
        "max_connections = 2\nheader_read_timeout = \"30s\"",
        OPEN_ROUTE,
    ))
    .await;
    let addr = tg.addr;
    let mut first = TcpStream::connect(addr).await.unwrap();
    first
        .write_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(next_reply(&mut first).await.status, 200);
    let mut second = TcpStream::connect(addr).await.unwrap();
    second
        .write_all(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(next_reply(&mut second).await.status, 200);

    // The third connects (the kernel's backlog) but is not served while both are open.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /third HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_secs(1), read_response(&mut third)).await;
    assert!(
        early.is_err(),
        "the third client was answered at the limit: {early:?}"
    );
    assert_eq!(uris(&upstream), ["/first", "/second"]);
    assert_eq!(tg.app.metrics.open_connections.get(), 2);

    // One closes: the third is served.
    drop(first);
    let freed = Instant::now();
    let reply = next_reply(&mut third).await;
    eprintln!(
        "max_connections: the waiting client was served {:?} after a slot freed",
        freed.elapsed()
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(upstream.last().uri, "/third");
    // The second is still served on its connection.
    second
        .write_all(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(next_reply(&mut second).await.status, 200);
    drop((second, third));
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

/// A WebSocket echo server (tokio-tungstenite); counts the sessions it accepted.
async fn ws_echo_upstream() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sessions = Arc::new(AtomicU64::new(0));
    let count = sessions.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(message)) = ws.next().await {
                    let echo = matches!(message, Message::Text(_) | Message::Binary(_));
                    if message.is_close() || (echo && ws.send(message).await.is_err()) {
                        return;
                    }
                }
            });
        }
    });
    (addr, sessions, task)
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_connect(
    addr: SocketAddr,
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        IO_TIMEOUT,
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp),
    )
    .await
    .expect("handshake within the timeout")
}

async fn echo(ws: &mut Ws, message: Message) {
    ws.send(message.clone()).await.unwrap();
    let back = tokio::time::timeout(IO_TIMEOUT, ws.next())
        .await
        .expect("echo within the timeout")
        .expect("a message")
        .expect("a message");
    assert!(back == message, "echoed {back:?} for {message:?}");
}

#[tokio::test]
async fn websocket_messages_echo_through_tollgate_and_an_idle_session_is_closed() {
    let _shared = ALONE.read().await;
    let (ws_addr, sessions, ws_task) = ws_echo_upstream().await;
    let routes = "[[routes]]\nname = \"ws\"\nupstream = \"api\"\n\
                  limits = [ { by = \"ip\", algorithm = \"fixed_window\", rate = \"2/hour\" } ]\n";
    let tg = start_tollgate(&config_with(
        &format!("http://{ws_addr}"),
        "upgrade_idle_timeout = \"1s\"",
        routes,
    ))
    .await;

    let (mut ws, response) = ws_connect(tg.addr).await.expect("the upgrade succeeds");
    assert_eq!(response.status(), 101);
    let policy = response
        .headers()
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(policy.contains("r=1"), "the upgrade counted once: {policy}");

    echo(&mut ws, Message::text("hello through tollgate")).await;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 253, 254, 255])).await;
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    echo(&mut ws, Message::binary(big)).await;
    echo(&mut ws, Message::text("ünïcödé ✓")).await;

    // Steady traffic for longer than the idle timeout keeps the session.
    let steady = Instant::now();
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        echo(&mut ws, Message::text(format!("tick {i}"))).await;
    }
    assert!(steady.elapsed() > Duration::from_secs(2));

    // Then nothing either way: tollgate closes it at about the idle timeout.
    let idle = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let after = idle.elapsed();
    eprintln!("idle WebSocket closed after {after:?}: {end:?}");
    let end = end.expect("the idle session ends within 5 s");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    assert_about(
        "an idle upgraded connection is closed at upgrade_idle_timeout",
        after,
        Duration::from_secs(1),
    );

    // The many messages cost nothing: a second upgrade is the second (and last) unit.
    let (ws2, response) = ws_connect(tg.addr).await.expect("a second upgrade");
    assert_eq!(response.status(), 101);
    drop(ws2);
    match ws_connect(tg.addr).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("the third upgrade is over the limit: {other:?}"),
    }
    assert_eq!(sessions.load(Ordering::SeqCst), 2);
    tg.stop().await;
    ws_task.abort();
}

// ---------------------------------------------------------------------------------------------
// Bounded memory (on the binary)
// ---------------------------------------------------------------------------------------------

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Reads a response body to its end, counting and dropping each frame.
async fn drain(mut body: hyper::body::Incoming) -> u64 {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            total += data.len() as u64;
        }
    }
    total
}

/// POSTs `size` bytes to /echo, streamed from a channel, reading the echo as it arrives.
async fn upload_echo(addr: SocketAddr, size: u64) -> u64 {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = http1::handshake::<_, ChannelBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let producer = tokio::spawn(async move {
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if tx.send(chunk.slice(..n)).await.is_err() {
                return;
            }
            left -= n as u64;
        }
    });
    let request = Request::post("/echo")
        .header("host", "t")
        .header("content-length", size.to_string())
        .body(ChannelBody(rx))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let echoed = drain(response.into_body()).await;
    producer.await.unwrap();
    echoed
}

async fn download(addr: SocketAddr, size: u64) -> u64 {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get(format!("/size/{size}"))
        .header("host", "t")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drain(response.into_body()).await
}

/// Samples a process's VmRSS every 10 ms on a thread until dropped; keeps the maximum.
struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(proc_kib(pid, "VmRSS")));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(proc_kib(pid, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `tollgate_open_connections` from the admin listener.
async fn open_connections(http: &Http, admin: SocketAddr) -> u64 {
    let metrics = http.get(&format!("http://{admin}/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("tollgate_open_connections "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no tollgate_open_connections in /metrics:\n{text}"))
}

/// Polls the gauge until it equals `want` (bounded).
async fn until_open(http: &Http, admin: SocketAddr, want: u64, limit: Duration) {
    let started = Instant::now();
    loop {
        let open = open_connections(http, admin).await;
        if open == want {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "tollgate_open_connections is {open}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a connection that sends one complete keep-alive request and reads its answer
/// (buffered: byte-by-byte reads would make 2,500 of these slow).
async fn keep_alive_connection(addr: SocketAddr) -> tokio::io::BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut s = tokio::io::BufReader::new(s);
    let reply = tokio::time::timeout(IO_TIMEOUT, read_response(&mut s))
        .await
        .expect("answer within the timeout")
        .expect("an answer");
    assert_eq!(reply.status, 404, "no route for /idle: {reply:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_for_64_mib_bodies_and_5000_idle_connections() {
    let _alone = ALONE.write().await;
    const BIG: u64 = 64 * 1024 * 1024;
    const CONNECTIONS: usize = 5_000;
    let started = Instant::now();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    let routes = "[[routes]]\nname = \"echo\"\nupstream = \"api\"\nmatch = { path = \"/echo\" }\n\n\
                  [[routes]]\nname = \"size\"\nupstream = \"api\"\nmatch = { path_prefix = \"/size\" }\n";
    std::fs::write(
        &config,
        config_with(
            &upstream.target(),
            "admin = \"127.0.0.1:0\"\nheader_read_timeout = \"60s\"",
            routes,
        )
        .replace("timeout = \"5s\"", "timeout = \"30s\""),
    )
    .unwrap();
    let bin = Binary::start(&config);
    let pid = bin.child.id();
    let admin = bin.admin.expect("the admin listener");
    let addr = bin.addr;
    let http = Http::new();

    // Warm up: pools, buffers and lazily built state exist before the baseline.
    assert_eq!(upload_echo(addr, 1024 * 1024).await, 1024 * 1024);
    assert_eq!(download(addr, 1024 * 1024).await, 1024 * 1024);
    let base = proc_kib(pid, "VmRSS");

    let sampler = RssSampler::start(pid);
    let t = Instant::now();
    let echoed = upload_echo(addr, BIG).await;
    let upload_took = t.elapsed();
    assert_eq!(echoed, BIG, "the whole upload echoed back");
    let after_upload = proc_kib(pid, "VmRSS");
    let t = Instant::now();
    let downloaded = download(addr, BIG).await;
    let download_took = t.elapsed();
    assert_eq!(downloaded, BIG, "the whole download arrived");
    let after_download = proc_kib(pid, "VmRSS");
    let peak = sampler.finish().max(after_download);
    let hwm = proc_kib(pid, "VmHWM");
    let growth = peak.saturating_sub(base);
    eprintln!(
        "memory: RSS {base} KiB before; {after_upload} KiB after a 64 MiB echo ({upload_took:?}); \
         {after_download} KiB after a 64 MiB download ({download_took:?}); sampled peak {peak} KiB \
         (growth {growth} KiB); VmHWM {hwm} KiB"
    );
    assert!(
        growth < 32 * 1024,
        "RSS grew by {growth} KiB while streaming 64 MiB each way"
    );

    // 5,000 idle connections: half after one complete keep-alive request, half silent.
    until_open(&http, admin, 0, Duration::from_secs(5)).await;
    let before_idle = proc_kib(pid, "VmRSS");
    let t = Instant::now();
    let mut kept: Vec<tokio::io::BufReader<TcpStream>> = Vec::with_capacity(CONNECTIONS / 2);
    // In batches of 100: tollgate's listen backlog is 128, and a burst past it costs 1 s SYN
    // retransmissions.
    for _ in 0..(CONNECTIONS / 2) / 100 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..100 {
            batch.spawn(keep_alive_connection(addr));
        }
        while let Some(s) = batch.join_next().await {
            kept.push(s.unwrap());
        }
    }
    until_open(&http, admin, kept.len() as u64, Duration::from_secs(10)).await;
    let with_kept = proc_kib(pid, "VmRSS");
    let mut silent: Vec<TcpStream> = Vec::with_capacity(CONNECTIONS - kept.len());
    for _ in kept.len()..CONNECTIONS {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    until_open(&http, admin, CONNECTIONS as u64, Duration::from_secs(10)).await;
    let opened_in = t.elapsed();
    let with_idle = proc_kib(pid, "VmRSS");
    let per_connection = with_idle.saturating_sub(before_idle) * 1024 / CONNECTIONS as u64;
    eprintln!(
        "idle connections: RSS {before_idle} KiB before, {with_kept} KiB with {} kept-alive \
         after a request ({} bytes each), {with_idle} KiB with {} silent ones too ({} bytes \
         each); {per_connection} bytes per connection overall; opened in {opened_in:?}",
        kept.len(),
        with_kept.saturating_sub(before_idle) * 1024 / kept.len() as u64,
        silent.len(),
        with_idle.saturating_sub(with_kept) * 1024 / silent.len() as u64,
    );
    assert!(
        per_connection < 64 * 1024,
        "{per_connection} bytes per idle connection"
    );

    drop((kept, silent));
    until_open(&http, admin, 0, Duration::from_secs(10)).await;
    eprintln!(
        "after closing them: RSS {} KiB; whole test {:?}",
        proc_kib(pid, "VmRSS"),
        started.elapsed()
    );
    drop(bin);
}

// ---------------------------------------------------------------------------------------------
// No way to starve a neighbour
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_slow_upload_answered_early_never_holds_up_the_next_request() {
    let _shared = ALONE.read().await;
    // nginx answers /early before reading the body, as an app rejecting with 401 does.
    let origin = common::origins::Nginx::start(
        "server { listen 127.0.0.1:{port}; location /early { return 401 \"no\\n\"; } \
         location / { return 200 \"ok\\n\"; } }",
    );
    let tg = start_tollgate(&config_with(&origin.target(), "", OPEN_ROUTE)).await;
    let mut slow = TcpStream::connect(tg.addr).await.unwrap();
    slow.write_all(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nh")
        .await
        .unwrap();
    let mut reader = tokio::io::BufReader::new(slow);
    let early = tokio::time::timeout(IO_TIMEOUT, read_response(&mut reader))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(early.status, 401);
    // The rest of the body dribbles in over 4 s while another client asks for something.
    let mut slow = reader.into_inner();
    let dribble = tokio::spawn(async move {
        for b in b"ello" {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    for path in ["/b", "/c", "/d"] {
        let (status, took) = normal_get(tg.addr, path).await;
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_millis(500),
            "{path} waited {took:?} behind a slow upload"
        );
    }
    dribble.abort();
    tg.stop().await;
}

#[tokio::test]
async fn run_cuts_what_is_left_when_the_grace_expires() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config_with(
        &upstream.target(),
        "shutdown_grace = \"300ms\"",
        OPEN_ROUTE,
    ))
    .await;
    let mut client = TcpStream::connect(tg.addr).await.unwrap();
    client
        .write_all(b"GET /slow/20000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let app = tg.app.clone();
    eventually(Duration::from_secs(5), || {
        let n = app.metrics.in_flight.get();
        async move { n == 1 }
    })
    .await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), tg.stop())
        .await
        .expect("stop returns once the grace has expired");
    let stopped_in = started.elapsed();
    assert!(stopped_in < Duration::from_secs(2), "{stopped_in:?}");
    // The request in flight was cut by `run` itself: this runtime lives on, and the client's
    // connection closes without an answer.
    let (_, received, closed) = until_closed(&mut client, Duration::from_secs(2)).await;
    assert!(closed, "the connection was cut");
    assert_eq!(received, 0, "no answer was sent");
    assert_eq!(app.metrics.in_flight.get(), 0, "the cut request ended");
}

/// Raises this process's soft limit on open files towards `want` (within the hard limit) and
/// returns the soft limit now in force.
fn raise_open_files(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want.min(limit.rlim_max),
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_a_large_response_cost_little_and_give_it_back() {
    let _alone = ALONE.write().await;
    const SIZE: u64 = 10 * 1024 * 1024;
    // 1,500 clients need about 3,000 descriptors here (client sockets, the upstream's) and as
    // many in tollgate; a machine whose hard limit forbids it runs fewer, and says so.
    const WANT: usize = 1500;
    let files = raise_open_files(8192);
    let clients_possible = ((files.saturating_sub(200)) / 2) as usize;
    let n_clients = WANT.min(clients_possible);
    if n_clients < WANT {
        eprintln!("only {n_clients} clients: the open-file limit here is {files}");
    }
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        // Every slow reader holds an upstream connection: the cap is raised past them, and
        // the connect timeout too (1,500 connects at once on a loaded 2-core machine may see
        // a SYN retransmitted after 1 s; a 502 would leave the test waiting for its request).
        config_with(&upstream.target(), "admin = \"127.0.0.1:0\"", OPEN_ROUTE).replace(
            "timeout = \"5s\"",
            "timeout = \"60s\"\nconnect_timeout = \"10s\"\nmax_connections_per_target = 2000",
        ),
    )
    .unwrap();
    // tollgate inherits the raised limit from this process.
    let bin = Binary::start(&config);
    let pid = bin.child.id();
    let admin = bin.admin.expect("the admin listener");
    let http = Http::new();
    assert_eq!(download(bin.addr, 1024 * 1024).await, 1024 * 1024);
    until_open(&http, admin, 0, Duration::from_secs(5)).await;
    let base = proc_kib(pid, "RssAnon");
    let mut clients = Vec::with_capacity(n_clients);
    for _ in 0..n_clients {
        // A small receive buffer: the client's kernel takes little, as a slow reader's would.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(bin.addr).await.unwrap();
        s.write_all(format!("GET /size/{SIZE} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        clients.push(s);
    }
    let up = &upstream;
    eventually(Duration::from_secs(20), || {
        let n = up.count();
        async move { n > n_clients }
    })
    .await;
    // Let the pipes fill: RSS is read once it stops growing (bounded). Anonymous memory only:
    // the file-backed part is the binary's own code, paged in as it runs.
    let mut loaded = proc_kib(pid, "RssAnon");
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = proc_kib(pid, "RssAnon");
        if now <= loaded + loaded / 200 {
            loaded = loaded.max(now);
            break;
        }
        loaded = now;
    }
    let per_client = loaded.saturating_sub(base) * 1024 / n_clients as u64;
    drop(clients);
    until_open(&http, admin, 0, Duration::from_secs(20)).await;
    let mut after = proc_kib(pid, "RssAnon");
    for _ in 0..40 {
        if after <= base + 20 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = proc_kib(pid, "RssAnon");
    }
    eprintln!(
        "slow readers: anonymous RSS {base} KiB before, {loaded} KiB with {n_clients} non-reading \
         clients of a 10 MiB response ({per_client} bytes each), {after} KiB after they left \
         (VmRSS with the binary's file pages: {} KiB)",
        proc_kib(pid, "VmRSS")
    );
    assert!(
        per_client <= 64 * 1024,
        "{per_client} bytes per non-reading client"
    );
    assert!(
        after <= base + 20 * 1024,
        "RSS {after} KiB a few seconds after the clients left (before: {base} KiB)"
    );
    drop(bin);
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test]
async fn accept_errors_back_off_on_both_listeners() {
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        config_with(&upstream.target(), "admin = \"127.0.0.1:0\"", OPEN_ROUTE),
    )
    .unwrap();
    // Few open files: connections soon exhaust them, and accept fails with EMFILE while
    // more clients wait in the backlogs.
    let bin = Binary::start_with_open_files(&config, Some(48));
    let pid = bin.child.id();
    let admin = bin.admin.unwrap();
    let mut held = Vec::new();
    for addr in [admin, bin.addr] {
        for _ in 0..40 {
            if let Ok(s) = TcpStream::connect(addr).await {
                held.push(s);
            }
        }
    }
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.3,
        "tollgate used {used:.2} s of CPU in 1 s while accept kept failing"
    );
    assert!(
        bin.logs().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("accept failed"))),
        "the accept errors were logged"
    );
    // Both listeners serve again once files are free.
    drop(held);
    async fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
        let attempt = async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            let head = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            s.write_all(head.as_bytes()).await.ok()?;
            read_response(&mut s).await.ok().map(|r| r.status)
        };
        tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .ok()
            .flatten()
    }
    let main = bin.addr;
    eventually(Duration::from_secs(15), || async move {
        status_of(admin, "/healthz").await == Some(200) && status_of(main, "/x").await == Some(200)
    })
    .await;
    drop(bin);
}
