//! Upstream target health end to end: a target that refuses connections is ejected (its
//! request sent to the other target, nothing lost), active health checks take a failing target
//! out of round robin and bring it back, every target is still tried when none is healthy, a
//! request that reached a target is never sent to another, `tollgate_upstream_healthy`,
//! `/v1/status` and the log follow each transition, and `max_connections_per_target` caps
//! the connections open to a target (a request past it waits, then gets 503).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Binary, Http, eventually, start_tollgate};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A target whose `/healthz` answers 200 or 503 as the test says; counts other requests.
struct Target {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

async fn target() -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let healthy = Arc::new(AtomicBool::new(true));
    let served = Arc::new(AtomicUsize::new(0));
    let checks = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (h, s, c, n) = (
        healthy.clone(),
        served.clone(),
        checks.clone(),
        accepted.clone(),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            let (h, s, c) = (h.clone(), s.clone(), c.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |r: Request<Incoming>| {
                    let (h, s, c) = (h.clone(), s.clone(), c.clone());
                    async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                        if r.uri().path() == "/healthz" {
                            c.fetch_add(1, Ordering::SeqCst);
                            if !h.load(Ordering::SeqCst) {
                                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                        } else {
                            s.fetch_add(1, Ordering::SeqCst);
                            if let Some(ms) = r.uri().path().strip_prefix("/slow/") {
                                let ms = ms.parse().unwrap_or(0);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Target {
        addr,
        healthy,
        served,
        checks,
        accepted,
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn config(targets: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = targets.iter().map(|a| format!("\"http://{a}\"")).collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[store]\nbackend = \"memory\"\n\n\
         [upstreams.api]\ntargets = [{}]\ntimeout = \"2s\"\nconnect_timeout = \"500ms\"\n{extra}\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"api\"\n",
        list.join(", ")
    )
}

/// The value of `tollgate_upstream_healthy` for `target`.
fn healthy_gauge(metrics: &str, target: SocketAddr) -> Option<i64> {
    let series = format!("tollgate_upstream_healthy{{upstream=\"api\",target=\"{target}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_target_is_ejected_and_its_requests_go_to_the_other() {
    let live = target().await;
    let dead = closed_port();
    let tollgate = start_tollgate(&config(&[dead, live.addr], "")).await;
    let admin = tollgate.admin_addr.unwrap();
    let http = Http::new();
    let scraped = http.scrape(admin).await;
    assert_eq!(
        healthy_gauge(&scraped, dead),
        Some(1),
        "healthy until shown otherwise"
    );

    for i in 0..20 {
        let reply = http
            .get(&format!("http://{}/r/{i}", tollgate.addr), &[])
            .await;
        assert_eq!(
            reply.status, 200,
            "request {i}: the refused one is sent to the live target"
        );
    }
    assert_eq!(live.served.load(Ordering::SeqCst), 20);
    let scraped = http.scrape(admin).await;
    assert_eq!(healthy_gauge(&scraped, dead), Some(0));
    assert_eq!(healthy_gauge(&scraped, live.addr), Some(1));
    let status = http
        .get(&format!("http://{admin}/v1/status"), &[])
        .await
        .json();
    let targets = &status["upstreams"][0]["targets"];
    assert_eq!(targets[0]["target"], format!("http://{dead}"));
    assert_eq!(targets[0]["healthy"], false);
    assert_eq!(targets[1]["healthy"], true);
    // Each target's p99 time to a response head: none for the dead one (it never answered),
    // a figure for the live one.
    assert!(targets[0]["p99_ms"].is_null(), "{targets}");
    let p99 = targets[1]["p99_ms"]
        .as_f64()
        .expect("a p99 for the live target");
    assert!(p99 > 0.0 && p99 < 2000.0, "{p99}");
    assert!(scraped.contains(&format!(
        "tollgate_upstream_target_duration_seconds_count{{upstream=\"api\",target=\"{}\"}} 20",
        live.addr
    )));
    tollgate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_a_failing_target_out_and_bring_it_back() {
    let (a, b) = (target().await, target().await);
    let check = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"80ms\", unhealthy_after = 2, healthy_after = 2 }";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(&[a.addr, b.addr], check)).unwrap();
    let bin = Binary::start(&path);
    let admin = bin.admin.unwrap();
    let http = Http::new();
    eventually(Duration::from_secs(5), || async {
        b.checks.load(Ordering::SeqCst) >= 2
    })
    .await;

    b.healthy.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(5), || async {
        healthy_gauge(&http.scrape(admin).await, b.addr) == Some(0)
    })
    .await;
    let before = (
        a.served.load(Ordering::SeqCst),
        b.served.load(Ordering::SeqCst),
    );
    for _ in 0..20 {
        assert_eq!(
            http.get(&format!("http://{}/", bin.addr), &[]).await.status,
            200
        );
    }
    assert_eq!(
        a.served.load(Ordering::SeqCst) - before.0,
        20,
        "all to the healthy target"
    );
    assert_eq!(
        b.served.load(Ordering::SeqCst),
        before.1,
        "none to the failing one"
    );
    let logs = bin.logs();
    assert!(
        logs.iter().any(|l| {
            let text = l.to_string();
            text.contains("unhealthy") && text.contains(&b.addr.to_string()) && text.contains("503")
        }),
        "a log line names the target and why: {logs:?}"
    );

    b.healthy.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(5), || async {
        healthy_gauge(&http.scrape(admin).await, b.addr) == Some(1)
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            http.get(&format!("http://{}/", bin.addr), &[]).await.status,
            200
        );
    }
    assert!(
        b.served.load(Ordering::SeqCst) > before.1,
        "back in round robin"
    );
    assert!(
        bin.logs()
            .iter()
            .any(|l| l.to_string().contains("upstream target healthy"))
    );
    drop(bin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_healthy_target_every_target_is_still_tried() {
    let (a, b) = (target().await, target().await);
    a.healthy.store(false, Ordering::SeqCst);
    b.healthy.store(false, Ordering::SeqCst);
    let check = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"80ms\", unhealthy_after = 1, healthy_after = 1 }";
    let tollgate = start_tollgate(&config(&[a.addr, b.addr], check)).await;
    let admin = tollgate.admin_addr.unwrap();
    let http = Http::new();
    eventually(Duration::from_secs(5), || async {
        let m = http.scrape(admin).await;
        healthy_gauge(&m, a.addr) == Some(0) && healthy_gauge(&m, b.addr) == Some(0)
    })
    .await;
    for _ in 0..10 {
        assert_eq!(
            http.get(&format!("http://{}/", tollgate.addr), &[])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        a.served.load(Ordering::SeqCst) + b.served.load(Ordering::SeqCst),
        10
    );
    tollgate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_reached_a_target_is_never_sent_to_another() {
    // The first target takes the request and closes without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude = listener.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let t = taken.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1024];
            if s.read(&mut buf).await.is_ok_and(|n| n > 0) {
                t.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let other = target().await;
    let tollgate = start_tollgate(&config(&[rude, other.addr], "")).await;
    let http = Http::new();
    // Round robin starts at the first target.
    let reply = http
        .get(&format!("http://{}/once", tollgate.addr), &[])
        .await;
    assert_eq!(reply.status, 502);
    assert_eq!(taken.load(Ordering::SeqCst), 1);
    assert_eq!(
        other.served.load(Ordering::SeqCst),
        0,
        "not retried once sent"
    );
    tollgate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_connection_cap_waits_then_gets_503() {
    let t = target().await;
    let cap = "max_connections_per_target = 2";
    let text = config(&[t.addr], cap)
        .replace("connect_timeout = \"500ms\"", "connect_timeout = \"300ms\"");
    let tollgate = start_tollgate(&text).await;
    let http = Http::new();
    let url = format!("http://{}/slow/1000", tollgate.addr);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(&url, &[]).await.status })
        })
        .collect();
    eventually(Duration::from_secs(5), || async {
        t.served.load(Ordering::SeqCst) == 2
    })
    .await;
    let started = std::time::Instant::now();
    let third = http.get(&url, &[]).await;
    let waited = started.elapsed();
    assert_eq!(third.status, 503);
    assert_eq!(third.header("retry-after"), Some("1"));
    assert!(
        waited >= Duration::from_millis(290),
        "waited {waited:?} for a connection"
    );
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(
        t.accepted.load(Ordering::SeqCst),
        2,
        "never more than 2 connections"
    );
    tollgate.stop().await;

    // Within the connect timeout, a request gets the connection another one frees.
    let text =
        config(&[t.addr], cap).replace("connect_timeout = \"500ms\"", "connect_timeout = \"2s\"");
    let tollgate = start_tollgate(&text).await;
    let url = format!("http://{}/slow/200", tollgate.addr);
    let all: Vec<_> = (0..6)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(&url, &[]).await.status })
        })
        .collect();
    for h in all {
        assert_eq!(h.await.unwrap(), 200, "waited for a free connection");
    }
    assert!(t.accepted.load(Ordering::SeqCst) <= 4, "2 more at most");
    tollgate.stop().await;
}
