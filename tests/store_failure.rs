//! Store failures: Redis killed, restarted empty, its script cache flushed, or unreachable at
//! start. Every decision waits at most the store timeout; `on_store_error` decides what then.

mod common;

use std::time::{Duration, Instant};

use common::*;

const TIMEOUT_MS: u64 = 150;

fn routes() -> String {
    "[[routes]]\nname = \"open\"\nupstream = \"api\"\nmatch = { path = \"/open\" }\non_store_error = \"allow\"\nlimits = [{ by = \"header:x-k\", algorithm = \"gcra\", rate = \"1/hour\", burst = 1 }]\n\
     [[routes]]\nname = \"closed\"\nupstream = \"api\"\nmatch = { path = \"/closed\" }\non_store_error = \"deny\"\nlimits = [{ algorithm = \"fixed_window\", rate = \"1/hour\" }]\n"
        .to_string()
}

fn text(upstream: &Upstream, redis_url: &str) -> String {
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{redis_url}\"\ntimeout = \"{TIMEOUT_MS}ms\"\nprefix = \"f\""
    );
    config(upstream, &store, &routes()).replace("[server]\n", "[server]\nadmin = \"127.0.0.1:0\"\n")
}

#[tokio::test]
async fn killed_redis_follows_on_store_error_within_the_timeout_and_recovers_after_restart() {
    let upstream = Upstream::start().await;
    let mut redis = Redis::start();
    let tg = start_tollgate(&text(&upstream, &redis.url())).await;
    let http = Http::new();
    let open = format!("http://{}/open", tg.addr);
    let closed = format!("http://{}/closed", tg.addr);
    let ready = format!("http://{}/readyz", tg.admin_addr.unwrap());

    assert_eq!(http.get(&open, &[("x-k", "a")]).await.status, 200);
    assert_eq!(http.get(&open, &[("x-k", "a")]).await.status, 429);
    assert_eq!(http.get(&closed, &[]).await.status, 200);
    assert_eq!(http.get(&ready, &[]).await.status, 200);

    redis.kill();
    for _ in 0..5 {
        let started = Instant::now();
        // A key never rejected before (key "a" is remembered over its limit locally and
        // needs no store to be rejected again).
        let reply = http.get(&open, &[("x-k", "b")]).await;
        let took = started.elapsed();
        assert_eq!(reply.status, 200, "fail open forwards");
        assert_eq!(reply.header("x-upstream"), Some("yes"));
        assert!(
            reply.header("ratelimit").is_none(),
            "nothing was decided: no headers"
        );
        assert!(reply.header("ratelimit-policy").is_none());
        assert!(
            took < Duration::from_millis(TIMEOUT_MS + 500),
            "took {took:?}"
        );

        let started = Instant::now();
        let reply = http.get(&closed, &[]).await;
        let took = started.elapsed();
        assert_eq!(reply.status, 503, "fail closed");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.json()["status"], 503);
        assert!(
            took < Duration::from_millis(TIMEOUT_MS + 500),
            "took {took:?}"
        );
    }
    assert_eq!(http.get(&ready, &[]).await.status, 503);
    let metrics = tg.app.metrics.render();
    assert!(
        metrics.contains("tollgate_requests_total{route=\"open\",decision=\"store_error\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_requests_total{route=\"closed\",decision=\"store_error\"} 5"),
        "{metrics}"
    );

    redis.restart();
    // Limits are enforced again without restarting tollgate: the first decided request is
    // admitted (empty Redis), the next one rejected.
    let recovered = eventually(Duration::from_secs(10), || {
        let http = http.clone();
        let closed = closed.clone();
        async move { http.get(&closed, &[]).await.status == 200 }
    })
    .await;
    assert_eq!(http.get(&closed, &[]).await.status, 429);
    let reply = http.get(&open, &[("x-k", "c")]).await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("ratelimit").is_some(), "decided again");
    assert_eq!(http.get(&open, &[("x-k", "c")]).await.status, 429);
    assert_eq!(
        http.get(&open, &[("x-k", "a")]).await.status,
        429,
        "remembered over its limit through the outage"
    );
    assert_eq!(http.get(&ready, &[]).await.status, 200);
    eprintln!("recovered {recovered:?} after the restart");
    tg.stop().await;
}

#[tokio::test]
async fn script_flush_is_recovered_transparently() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let tg = start_tollgate(&text(&upstream, &redis.url())).await;
    let http = Http::new();
    let closed = format!("http://{}/closed", tg.addr);
    assert_eq!(http.get(&closed, &[]).await.status, 200);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.conn())
        .unwrap();
    let reply = http.get(&closed, &[]).await;
    assert_eq!(
        reply.status, 429,
        "decided by the reloaded script, not a store error"
    );
    let metrics = tg.app.metrics.render();
    assert!(
        metrics.contains("tollgate_requests_total{route=\"closed\",decision=\"store_error\"} 0"),
        "{metrics}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn starts_while_redis_is_unreachable_and_uses_it_once_it_answers() {
    let upstream = Upstream::start().await;
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let tg = start_tollgate(&text(&upstream, &url)).await;
    let http = Http::new();
    let ready = format!("http://{}/readyz", tg.admin_addr.unwrap());
    assert_eq!(
        http.get(&format!("http://{}/open", tg.addr), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        http.get(&format!("http://{}/closed", tg.addr), &[])
            .await
            .status,
        503
    );
    assert_eq!(http.get(&ready, &[]).await.status, 503);
    // A server appears on the configured port: tollgate picks it up by itself.
    let _redis = Redis::start_on(port);
    eventually(Duration::from_secs(10), || {
        let http = http.clone();
        let ready = ready.clone();
        async move { http.get(&ready, &[]).await.status == 200 }
    })
    .await;
    assert_eq!(
        http.get(&format!("http://{}/closed", tg.addr), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        http.get(&format!("http://{}/closed", tg.addr), &[])
            .await
            .status,
        429
    );
    tg.stop().await;
}
