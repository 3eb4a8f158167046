//! `cost_from = "openai:…"` end to end: an OpenAI-compatible upstream written here answers
//! JSON completions and `text/event-stream` streams (100 chunk events, then the usage event,
//! then `[DONE]`), and tollgate settles each reservation to the reported tokens while the
//! client receives every byte unchanged: on Redis across two replicas, on the memory store
//! with a debt, with a gzip body (no usable figure: the reservation stands), and for a 64 MiB
//! stream through the tollgate binary, whose resident memory must not grow with the body.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{Binary, Http, Redis, memory_store, redis_store, start_tollgate};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A response body sent frame by frame: `block` `repeat` times, then each of `tail`.
struct Frames {
    block: Bytes,
    repeat: usize,
    tail: VecDeque<Bytes>,
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.repeat > 0 {
            self.repeat -= 1;
            return Poll::Ready(Some(Ok(Frame::data(self.block.clone()))));
        }
        Poll::Ready(self.tail.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn usage(prompt: u64, completion: u64) -> String {
    format!(
        r#"{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}"#,
        prompt + completion
    )
}

/// A completion as one JSON object; `usage` last, after a nested decoy.
fn completion_json(prompt: u64, completion: u64) -> String {
    format!(
        "{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"choices\":[{{\"index\":0,\
         \"message\":{{\"role\":\"assistant\",\"content\":\"a \\\"usage\\\" of 1\",\
         \"usage\":{{\"total_tokens\":999999}}}}}}],\n  \"usage\": {}}}",
        usage(prompt, completion)
    )
}

/// One streamed chunk event, as OpenAI sends them with `include_usage` (usage null).
fn chunk_event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\
         \"delta\":{{\"content\":\"token number {i} of the answer\"}}}}],\"usage\":null}}\n\n"
    )
}

fn usage_event(prompt: u64, completion: u64) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{}}}\n\n",
        usage(prompt, completion)
    )
}

/// The exact stream `/v1/stream/P/C` sends.
fn stream_body(prompt: u64, completion: u64) -> Vec<Bytes> {
    let mut frames: Vec<Bytes> = (0..100).map(|i| Bytes::from(chunk_event(i))).collect();
    frames.push(Bytes::from(usage_event(prompt, completion)));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

/// A block of chunk events about 64 KiB long (the 64 MiB stream repeats it).
fn block() -> Bytes {
    let mut b = String::new();
    let mut i = 0;
    while b.len() < 64 * 1024 - 200 {
        b.push_str(&chunk_event(i));
        i += 1;
    }
    Bytes::from(b)
}

/// The answer to `path`:
/// - `/v1/chat/P/C`: a JSON completion reporting P prompt and C completion tokens;
/// - `/v1/stream/P/C`: the same usage at the end of an event stream, one frame per event;
/// - `/v1/gzip/P/C`: the JSON labelled `content-encoding: gzip` (no usable figure);
/// - `/v1/big/MIB`: MIB MiB of chunk events, then a usage of 7 total tokens.
fn answer(path: &str) -> Response<Frames> {
    let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let figure = |i: usize| {
        parts
            .get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (content_type, body) = match parts[0] {
        "chat" | "gzip" => (
            "application/json",
            Frames {
                block: Bytes::new(),
                repeat: 0,
                tail: [Bytes::from(completion_json(figure(1), figure(2)))].into(),
            },
        ),
        "stream" => (
            "text/event-stream",
            Frames {
                block: Bytes::new(),
                repeat: 0,
                tail: stream_body(figure(1), figure(2)).into(),
            },
        ),
        _ => {
            let block = block();
            let repeat = (figure(1) as usize * 1024 * 1024).div_ceil(block.len());
            (
                "text/event-stream",
                Frames {
                    block,
                    repeat,
                    tail: [Bytes::from(usage_event(3, 4))].into(),
                },
            )
        }
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert("content-type", content_type.parse().unwrap());
    if parts[0] == "gzip" {
        headers.insert("content-encoding", "gzip".parse().unwrap());
    }
    response
}

async fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|r: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer(r.uri().path()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

fn config(target: &str, store: &str, limit: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrate_limit_headers = \"both\"\n\n{store}\n\n\
         [upstreams.llm]\ntargets = [\"{target}\"]\ntimeout = \"30s\"\n\n\
         [[routes]]\nname = \"llm\"\nupstream = \"llm\"\nlimits = [{limit}]\n"
    )
}

fn remaining(reply: &common::Reply) -> u64 {
    reply
        .header("x-ratelimit-remaining")
        .expect("x-ratelimit-remaining")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_tokens_settle_across_replicas_and_every_byte_arrives() {
    let redis = Redis::start();
    let target = upstream().await;
    let limit = r#"{ by = "ip", algorithm = "token_bucket", rate = "1000/min", burst = 1000, reserve = 100, cost_from = "openai:total_tokens" }"#;
    let text = config(&target, &redis_store(&redis), limit);
    let (a, b) = (start_tollgate(&text).await, start_tollgate(&text).await);
    let http = Http::new();

    let first = http
        .get(&format!("http://{}/v1/chat/10/20", a.addr), &[])
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.body,
        completion_json(10, 20).as_bytes(),
        "passed unchanged"
    );
    assert_eq!(remaining(&first), 900, "after the reservation");

    // Settled to 30 when the body ended, before the client had its last byte: the other
    // replica sees it (1000 - 30 - 100, and the refill of the milliseconds between).
    let second = http
        .get(&format!("http://{}/v1/stream/15/25", b.addr), &[])
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(
        second.body,
        stream_body(15, 25).concat(),
        "every byte, unchanged"
    );
    let left = remaining(&second);
    assert!((870..=880).contains(&left), "remaining {left}");

    // Settled to 40; a gzip body gives no figure: its reservation of 100 stands.
    let third = http
        .get(&format!("http://{}/v1/gzip/1/1", a.addr), &[])
        .await;
    assert_eq!(third.body, completion_json(1, 1).as_bytes());
    assert_eq!(third.header("content-encoding"), Some("gzip"));
    let left = remaining(&third);
    assert!((830..=845).contains(&left), "remaining {left}");

    let fourth = http
        .get(&format!("http://{}/v1/chat/0/0", b.addr), &[])
        .await;
    let left = remaining(&fourth);
    assert!((730..=750).contains(&left), "remaining {left}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_tokens_past_the_budget_are_a_debt_waited_out() {
    let target = upstream().await;
    let limit = r#"{ by = "ip", algorithm = "token_bucket", rate = "1000/min", burst = 1000, reserve = 10, cost_from = "openai:completion_tokens" }"#;
    let tollgate = start_tollgate(&config(&target, &memory_store(), limit)).await;
    let http = Http::new();
    let url = |path: &str| format!("http://{}{path}", tollgate.addr);

    // Only the completion tokens count: 500 prompt tokens are free under this limit.
    let first = http.get(&url("/v1/stream/500/40"), &[]).await;
    assert_eq!(first.body, stream_body(500, 40).concat());
    let left = remaining(&http.get(&url("/v1/chat/0/0"), &[]).await);
    assert!((950..=960).contains(&left), "remaining {left}");

    // 2,000 completion tokens: about 1,000 past zero.
    let big = http.get(&url("/v1/stream/1/2000"), &[]).await;
    assert_eq!(big.status, 200, "admitted on its reservation");
    let rejected = http.get(&url("/v1/chat/0/0"), &[]).await;
    assert_eq!(rejected.status, 429);
    // ~1,050 tokens short of the next reservation at 1000/min: about 63 s.
    let retry: u64 = rejected.header("retry-after").unwrap().parse().unwrap();
    assert!((61..=64).contains(&retry), "Retry-After {retry}");
    tollgate.stop().await;
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_stream_is_scanned_without_growing_memory() {
    let target = upstream().await;
    let limit = r#"{ by = "ip", algorithm = "token_bucket", rate = "1000/min", burst = 1000, reserve = 500, cost_from = "openai:total_tokens" }"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(&target, &memory_store(), limit)).unwrap();
    let mut tollgate = Binary::start(&path);
    let pid = tollgate.child.id();
    let http = Http::new();
    // Warm: a first streamed answer sets up the connection and its buffers.
    let warm = http
        .get(&format!("http://{}/v1/stream/1/1", tollgate.addr), &[])
        .await;
    assert_eq!(warm.status, 200);
    let before = rss_kib(pid);

    let stream = tokio::net::TcpStream::connect(tollgate.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/v1/big/64")
        .header("host", "llm")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut received, mut peak, mut next_sample) = (0usize, before, 0usize);
    let mut last = Bytes::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
        .await
        .expect("the stream within 60 s")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len();
            last = data;
        }
        if received >= next_sample {
            peak = peak.max(rss_kib(pid));
            next_sample += 1024 * 1024;
        }
    }
    let expected =
        block().len() * (64usize * 1024 * 1024).div_ceil(block().len()) + usage_event(3, 4).len();
    assert_eq!(received, expected, "every byte");
    assert!(last.ends_with(usage_event(3, 4).as_bytes()));
    let growth = peak.saturating_sub(before);
    eprintln!("RSS {before} KiB before, peak {peak} KiB: growth {growth} KiB");
    assert!(
        growth < 8 * 1024,
        "RSS grew {growth} KiB over a 64 MiB stream"
    );

    // Settled to the 7 tokens at the end of 64 MiB (unsettled, its 500 would stand and this
    // reservation of 500 would find about nothing left).
    let after = http
        .get(&format!("http://{}/v1/chat/0/0", tollgate.addr), &[])
        .await;
    let left = remaining(&after);
    assert!((485..=500).contains(&left), "remaining {left}");
    tollgate.signal("TERM");
    tollgate.wait_exit(Duration::from_secs(10));
}
