//! Limits end to end, on both stores: tollgate in process, a real upstream, a real
//! redis-server. Each algorithm admits exactly its limit and then answers 429 with the right
//! headers; keys, composite keys, cost, shadow mode and all-or-nothing decisions.

mod common;

use common::*;

/// Which store a test runs against (the Redis server lives as long as the value).
enum Backend {
    Memory,
    Redis(Redis),
}

impl Backend {
    fn store(&self) -> String {
        match self {
            Backend::Memory => memory_store(),
            Backend::Redis(r) => redis_store(r),
        }
    }
}

fn backends() -> Vec<Backend> {
    vec![Backend::Memory, Backend::Redis(Redis::start())]
}

fn parse_ratelimit(value: &str) -> (String, u64, u64) {
    // "name";r=R;t=T
    let mut parts = value.split(';');
    let name = parts.next().unwrap().trim_matches('"').to_string();
    let mut r = None;
    let mut t = None;
    for p in parts {
        if let Some(v) = p.strip_prefix("r=") {
            r = v.parse().ok();
        }
        if let Some(v) = p.strip_prefix("t=") {
            t = v.parse().ok();
        }
    }
    (name, r.expect("r"), t.expect("t"))
}

#[tokio::test]
async fn each_algorithm_admits_exactly_its_limit_then_429s() {
    let upstream = Upstream::start().await;
    for backend in backends() {
        let routes = algorithm_routes("ip", 5, "", "")
            .replace("match = { path = ", "match = { path_prefix = ");
        let tg = start_tollgate(&config(&upstream, &backend.store(), &routes)).await;
        let http = Http::new();
        for alg in ALGORITHMS {
            let url = format!("http://{}/{alg}/x", tg.addr);
            for expected_remaining in (0..5).rev() {
                let reply = http.get(&url, &[]).await;
                assert_eq!(reply.status, 200, "{alg}: {:?}", reply.body);
                assert_eq!(reply.header("x-upstream"), Some("yes"));
                assert_eq!(
                    reply.header("ratelimit-policy"),
                    Some(format!("\"{alg}\";q=5;w=3600").as_str()),
                    "{alg}"
                );
                let (name, r, t) = parse_ratelimit(reply.header("ratelimit").unwrap());
                assert_eq!(name, alg);
                assert_eq!(r, expected_remaining, "{alg}");
                assert!((1..=7200).contains(&t), "{alg}: t={t}");
            }
            for _ in 0..3 {
                let reply = http.get(&url, &[]).await;
                assert_eq!(reply.status, 429, "{alg}");
                assert_eq!(
                    reply.header("content-type"),
                    Some("application/problem+json")
                );
                let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
                assert!((1..=7200).contains(&retry), "{alg}: retry {retry}");
                let body = reply.json();
                assert_eq!(body["status"], 429);
                assert_eq!(body["route"], alg);
                assert_eq!(body["retry_after"], retry, "{alg}");
                for member in ["type", "title", "detail"] {
                    assert!(body[member].is_string(), "{alg}: {member}");
                }
                let (_, r, _) = parse_ratelimit(reply.header("ratelimit").unwrap());
                assert_eq!(r, 0);
            }
        }
        assert_eq!(
            upstream.count() % 25,
            0,
            "rejected requests never reach the upstream"
        );
        tg.stop().await;
    }
}

#[tokio::test]
async fn api_key_budgets_are_independent_and_a_missing_key_counts_under_the_ip() {
    let upstream = Upstream::start().await;
    for backend in backends() {
        let routes = "[[routes]]\nname = \"api\"\nupstream = \"api\"\nlimits = [{ by = \"header:x-api-key\", algorithm = \"fixed_window\", rate = \"2/hour\" }]\n";
        let tg = start_tollgate(&config(&upstream, &backend.store(), routes)).await;
        let http = Http::new();
        let url = format!("http://{}/v1/things", tg.addr);
        let statuses = |key: Option<&'static str>, n: usize| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let mut out = Vec::new();
                for _ in 0..n {
                    let headers: Vec<(&str, &str)> =
                        key.map(|k| ("x-api-key", k)).into_iter().collect();
                    out.push(http.get(&url, &headers).await.status);
                }
                out
            }
        };
        assert_eq!(statuses(Some("alpha"), 3).await, [200, 200, 429]);
        assert_eq!(statuses(Some("beta"), 3).await, [200, 200, 429]);
        assert_eq!(
            statuses(None, 3).await,
            [200, 200, 429],
            "no key: counted under the IP"
        );
        assert_eq!(
            statuses(Some("alpha"), 1).await,
            [429],
            "alpha stays exhausted"
        );
        tg.stop().await;
    }
}

#[tokio::test]
async fn composite_and_query_keys() {
    let upstream = Upstream::start().await;
    for backend in backends() {
        let routes = "[[routes]]\nname = \"tenant\"\nupstream = \"api\"\nmatch = { path = \"/t\" }\nlimits = [{ by = [\"ip\", \"header:x-tenant\"], algorithm = \"sliding_log\", rate = \"1/hour\" }]\n[[routes]]\nname = \"q\"\nupstream = \"api\"\nmatch = { path = \"/q\" }\nlimits = [{ by = \"query:key\", algorithm = \"gcra\", rate = \"1/hour\", burst = 1 }]\n";
        let tg = start_tollgate(&config(&upstream, &backend.store(), routes)).await;
        let http = Http::new();
        let t = format!("http://{}/t", tg.addr);
        assert_eq!(http.get(&t, &[("x-tenant", "a")]).await.status, 200);
        assert_eq!(http.get(&t, &[("x-tenant", "a")]).await.status, 429);
        assert_eq!(http.get(&t, &[("x-tenant", "b")]).await.status, 200);
        assert_eq!(
            http.get(&t, &[]).await.status,
            200,
            "absent part replaced by the IP"
        );
        assert_eq!(http.get(&t, &[]).await.status, 429);
        let q = |k: &str| format!("http://{}/q?x=1&key={k}", tg.addr);
        assert_eq!(http.get(&q("one"), &[]).await.status, 200);
        assert_eq!(http.get(&q("one"), &[]).await.status, 429);
        assert_eq!(http.get(&q("two"), &[]).await.status, 200);
        assert_eq!(
            http.get(&q("%74wo"), &[]).await.status,
            429,
            "query values are decoded"
        );
        tg.stop().await;
    }
}

#[tokio::test]
async fn cost_takes_several_units() {
    let upstream = Upstream::start().await;
    for backend in backends() {
        let routes = "[[routes]]\nname = \"c\"\nupstream = \"api\"\nlimits = [{ algorithm = \"token_bucket\", rate = \"5/hour\", burst = 5, cost = 2 }]\n";
        let tg = start_tollgate(&config(&upstream, &backend.store(), routes)).await;
        let http = Http::new();
        let url = format!("http://{}/x", tg.addr);
        let first = http.get(&url, &[]).await;
        assert_eq!(first.status, 200);
        assert_eq!(parse_ratelimit(first.header("ratelimit").unwrap()).1, 3);
        let second = http.get(&url, &[]).await;
        assert_eq!(parse_ratelimit(second.header("ratelimit").unwrap()).1, 1);
        assert_eq!(http.get(&url, &[]).await.status, 429, "1 unit left, cost 2");
        tg.stop().await;
    }
}

#[tokio::test]
async fn shadow_limits_count_but_never_reject() {
    let upstream = Upstream::start().await;
    for backend in backends() {
        let routes = "[[routes]]\nname = \"s\"\nupstream = \"api\"\nlimits = [{ algorithm = \"fixed_window\", rate = \"3/hour\" }, { algorithm = \"fixed_window\", rate = \"1/hour\", mode = \"shadow\" }]\n";
        let tg = start_tollgate(&config(&upstream, &backend.store(), routes)).await;
        let http = Http::new();
        let url = format!("http://{}/x", tg.addr);
        let statuses: Vec<u16> = {
            let mut v = Vec::new();
            for _ in 0..5 {
                v.push(http.get(&url, &[]).await.status);
            }
            v
        };
        assert_eq!(
            statuses,
            [200, 200, 200, 429, 429],
            "only the enforced limit rejects"
        );
        let reply = http.get(&url, &[]).await;
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"s/0\";q=3;w=3600, \"s/1\";q=1;w=3600"),
            "every limit is listed, shadow ones too"
        );
        let metrics = tg.app.metrics.render();
        assert!(
            metrics.contains("tollgate_requests_total{route=\"s\",decision=\"allowed\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tollgate_requests_total{route=\"s\",decision=\"shadow_rejected\"} 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tollgate_requests_total{route=\"s\",decision=\"rejected\"} 3"),
            "{metrics}"
        );
        tg.stop().await;
    }
}

#[tokio::test]
async fn a_rejected_request_consumes_nothing_from_any_limit() {
    let upstream = Upstream::start().await;
    for backend in backends() {
        // Limit 0: 2 per key. Limit 1: 3 per IP. The third request with key k1 is rejected by
        // limit 0; if it had taken a unit from limit 1, k2 would get nothing.
        let routes = "[[routes]]\nname = \"both\"\nupstream = \"api\"\nlimits = [{ by = \"header:x-api-key\", algorithm = \"sliding_window\", rate = \"2/hour\" }, { by = \"ip\", algorithm = \"token_bucket\", rate = \"3/hour\", burst = 3 }]\n";
        let tg = start_tollgate(&config(&upstream, &backend.store(), routes)).await;
        let http = Http::new();
        let url = format!("http://{}/x", tg.addr);
        let k1 = [("x-api-key", "k1")];
        let k2 = [("x-api-key", "k2")];
        assert_eq!(http.get(&url, &k1).await.status, 200);
        assert_eq!(http.get(&url, &k1).await.status, 200);
        for _ in 0..5 {
            assert_eq!(http.get(&url, &k1).await.status, 429);
        }
        let third = http.get(&url, &k2).await;
        assert_eq!(third.status, 200, "the IP budget still has its third unit");
        assert_eq!(third.header("ratelimit"), Some("\"both/1\";r=0;t=3600"));
        assert_eq!(http.get(&url, &k2).await.status, 429);
        tg.stop().await;
    }
}

#[tokio::test]
async fn legacy_and_no_headers() {
    let upstream = Upstream::start().await;
    for (style, expect_ietf, expect_legacy) in [
        ("legacy", false, true),
        ("both", true, true),
        ("none", false, false),
    ] {
        let text = config(
            &upstream,
            &memory_store(),
            "[[routes]]\nname = \"h\"\nupstream = \"api\"\nlimits = [{ algorithm = \"gcra\", rate = \"10/min\", burst = 4 }]\n",
        )
        .replace("[server]\n", &format!("[server]\nrate_limit_headers = \"{style}\"\n"));
        let tg = start_tollgate(&text).await;
        let reply = Http::new().get(&format!("http://{}/", tg.addr), &[]).await;
        assert_eq!(
            reply.headers.contains_key("ratelimit"),
            expect_ietf,
            "{style}"
        );
        assert_eq!(
            reply.headers.contains_key("ratelimit-policy"),
            expect_ietf,
            "{style}"
        );
        if expect_legacy {
            assert_eq!(reply.header("x-ratelimit-limit"), Some("4"));
            assert_eq!(reply.header("x-ratelimit-remaining"), Some("3"));
            assert_eq!(
                reply.header("x-ratelimit-reset"),
                Some("6"),
                "a delta in seconds"
            );
        } else {
            assert!(!reply.headers.contains_key("x-ratelimit-limit"), "{style}");
        }
        tg.stop().await;
    }
}

#[tokio::test]
async fn redis_keys_are_prefixed_hash_tagged_expiring_and_never_hold_a_key_in_clear() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let routes = algorithm_routes("header:x-api-key", 5, "", "");
    let tg = start_tollgate(&config(&upstream, &redis_store(&redis), &routes)).await;
    let http = Http::new();
    let secret = "sk_live_SECRET123";
    for alg in ALGORITHMS {
        for _ in 0..2 {
            http.get(
                &format!("http://{}/{alg}", tg.addr),
                &[("x-api-key", secret)],
            )
            .await;
        }
    }
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert_eq!(keys.len(), 5, "{keys:?}");
    for key in &keys {
        assert!(key.starts_with("t:{"), "{key}");
        assert!(key.contains("}:"), "{key}");
        assert!(!key.contains(secret));
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
        assert!(ttl > 0, "{key} has no TTL");
        let dump: Vec<u8> = redis::cmd("DUMP").arg(key).query(&mut conn).unwrap();
        assert!(!String::from_utf8_lossy(&dump).contains("SECRET"), "{key}");
    }
    tg.stop().await;
}
