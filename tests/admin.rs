//! The admin listener: /healthz, /readyz and /metrics parsed back into numbers that must equal
//! the requests the test sent; `tollgate check` and `explain` output for a fixed config.

mod common;

use std::collections::HashMap;

use common::*;

/// `name{labels}` → value, for every sample line of a Prometheus / OpenMetrics text.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_what_was_sent_by_route_and_decision() {
    let upstream = Upstream::start().await;
    let routes = "[[routes]]\nname = \"limited\"\nupstream = \"api\"\nmatch = { path_prefix = \"/l\" }\nlimits = [{ algorithm = \"fixed_window\", rate = \"3/hour\" }]\n\
                  [[routes]]\nname = \"shadowed\"\nupstream = \"api\"\nmatch = { path_prefix = \"/s\" }\nlimits = [{ algorithm = \"gcra\", rate = \"1/hour\", burst = 1, mode = \"shadow\" }]\n\
                  [[routes]]\nname = \"open\"\nupstream = \"api\"\nmatch = { path_prefix = \"/status\" }\n";
    let text = config(&upstream, &memory_store(), routes)
        .replace("[server]\n", "[server]\nadmin = \"127.0.0.1:0\"\n");
    let tg = start_tollgate(&text).await;
    let admin = tg.admin_addr.unwrap();
    let http = Http::new();
    for _ in 0..7 {
        http.get(&format!("http://{}/l", tg.addr), &[]).await;
    }
    for _ in 0..4 {
        http.get(&format!("http://{}/s", tg.addr), &[]).await;
    }
    for _ in 0..2 {
        http.get(&format!("http://{}/status/503", tg.addr), &[])
            .await;
    }
    let reply = http.get(&format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().contains("text"));
    let m = samples(&String::from_utf8_lossy(&reply.body));
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no series {k}"));
    assert_eq!(
        get(r#"tollgate_requests_total{route="limited",decision="allowed"}"#),
        3.0
    );
    assert_eq!(
        get(r#"tollgate_requests_total{route="limited",decision="rejected"}"#),
        4.0
    );
    assert_eq!(
        get(r#"tollgate_requests_total{route="limited",decision="store_error"}"#),
        0.0
    );
    assert_eq!(
        get(r#"tollgate_requests_total{route="shadowed",decision="allowed"}"#),
        1.0
    );
    assert_eq!(
        get(r#"tollgate_requests_total{route="shadowed",decision="shadow_rejected"}"#),
        3.0
    );
    assert_eq!(
        get(r#"tollgate_responses_total{route="limited",class="2xx"}"#),
        3.0
    );
    assert_eq!(
        get(r#"tollgate_responses_total{route="limited",class="4xx"}"#),
        4.0
    );
    assert_eq!(
        get(r#"tollgate_responses_total{route="shadowed",class="2xx"}"#),
        4.0
    );
    assert_eq!(
        get(r#"tollgate_responses_total{route="open",class="5xx"}"#),
        2.0
    );
    // Store calls only: 3 admissions and the first rejection on "limited" (its other 3
    // rejections come from the local over-limit cache), and 4 on "shadowed".
    assert_eq!(
        get(r#"tollgate_store_duration_seconds_count{backend="memory"}"#),
        8.0
    );
    assert_eq!(get("tollgate_local_denials_total"), 3.0);
    // A route without limits counts its requests as allowed.
    assert_eq!(
        get(r#"tollgate_requests_total{route="open",decision="allowed"}"#),
        2.0
    );
    assert_eq!(
        get(r#"tollgate_upstream_duration_seconds_count{route="limited"}"#),
        3.0
    );
    assert_eq!(
        get(r#"tollgate_upstream_duration_seconds_count{route="open"}"#),
        2.0
    );
    assert_eq!(get("tollgate_in_flight_requests"), 0.0);
    assert!(m.contains_key("tollgate_open_connections"));
    assert_eq!(get(r#"tollgate_config_reloads_total{result="ok"}"#), 0.0);
    assert_eq!(
        get(r#"tollgate_config_reloads_total{result="failed"}"#),
        0.0
    );
    let hash = &tg.app.runtime().policy.source_hash;
    assert_eq!(
        get(&format!("tollgate_config_info{{hash=\"{hash}\"}}")),
        1.0
    );
    // No client address or key ever becomes a label (the upstream targets, from the config,
    // label their health gauge and response-time histogram).
    let text = String::from_utf8_lossy(&reply.body);
    assert!(
        text.lines()
            .filter(|l| !l.starts_with("tollgate_upstream_healthy{"))
            .filter(|l| !l.starts_with("tollgate_upstream_target_duration_seconds_"))
            .all(|l| !l.contains("127.0.0.1")),
        "{text}"
    );
    assert!(text.contains("tollgate_upstream_healthy{upstream=\"api\",target=\"127.0.0.1:"));
    tg.stop().await;
}

#[tokio::test]
async fn health_and_readiness_with_the_memory_store() {
    let upstream = Upstream::start().await;
    let text = config(&upstream, &memory_store(), "")
        .replace("[server]\n", "[server]\nadmin = \"127.0.0.1:0\"\n");
    let tg = start_tollgate(&text).await;
    let admin = tg.admin_addr.unwrap();
    let http = Http::new();
    assert_eq!(
        http.get(&format!("http://{admin}/healthz"), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        http.get(&format!("http://{admin}/readyz"), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        http.get(&format!("http://{admin}/nope"), &[]).await.status,
        404
    );
    tg.stop().await;
}

const FIXED: &str = r#"[server]
listen = "127.0.0.1:0"
trusted_proxies = ["10.0.0.0/8"]

[upstreams.api]
targets = ["http://127.0.0.1:3000"]

[[routes]]
name = "api"
upstream = "api"
match = { path_prefix = "/v1/" }
limits = [
  { by = "header:x-api-key", algorithm = "token_bucket", rate = "10/s", burst = 100 },
  { by = ["ip", "query:tenant"], algorithm = "fixed_window", rate = "10000/day", mode = "shadow" },
]
"#;

fn tollgate_cmd(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn check_and_explain_golden_output() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("proxy.toml"), FIXED).unwrap();
    let (code, out) = tollgate_cmd(dir.path(), &["check"]);
    assert_eq!(code, 0);
    let hash = &out["proxy.toml: OK (config hash ".len()..][..16];
    let expected = format!(
        "proxy.toml: OK (config hash {hash})
listen 127.0.0.1:0
headers ietf, IPv6 counted per /64, 1 trusted proxy
store memory (max 1000000 keys, timeout 50ms)
upstream api: http://127.0.0.1:3000 (connect timeout 2s, timeout 30s)
1 route(s), first match wins:
  api -> api: path prefix /v1/; on store error: allow
    api/0: token_bucket 10/s, burst 100 by header:x-api-key (quota 100 per 10 s)
    api/1: fixed_window 10000/day by [ip, query:tenant], shadow: never rejects (quota 10000 per 86400 s)
"
    );
    assert_eq!(out, expected);

    let (code, out) = tollgate_cmd(
        dir.path(),
        &[
            "explain",
            "GET",
            "http://api.example.com/v1/users?tenant=acme",
            "-H",
            "X-Forwarded-For: 198.51.100.7",
            "--client-ip",
            "10.1.2.3",
        ],
    );
    assert_eq!(code, 0);
    let expected = "GET /v1/users?tenant=acme
client 198.51.100.7 (TCP peer 10.1.2.3, a trusted proxy: forwarding headers believed)
route api (path prefix /v1/) -> upstream api
limits, decided together (admitted only if every enforced limit admits; on store error: allow):
  api/0: token_bucket 10/s, burst 100 by header:x-api-key (quota 100 per 10 s)
    identity: header x-api-key absent: counted under ip 198.51.100.7
    key limit 1b7e9d3c6a1e1f38, identity 0000
  api/1: fixed_window 10000/day by [ip, query:tenant], shadow: never rejects (quota 10000 per 86400 s)
    identity: ip 198.51.100.7, query tenant present (its value is hashed, never stored)
    key limit 0000, identity 0000
store memory: the counters live inside the running tollgate process; explain cannot read them
";
    // Hash-valued fields vary with the scheme, not with the run: compare with them masked.
    let mask = |s: &str| {
        s.lines()
            .map(|l| match l.find("key limit ") {
                Some(i) => format!("{}key limit …", &l[..i]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(mask(&out), mask(expected));
    // The same request twice gives the same keys (stable hashing).
    let (_, again) = tollgate_cmd(
        dir.path(),
        &[
            "explain",
            "GET",
            "http://api.example.com/v1/users?tenant=acme",
            "-H",
            "X-Forwarded-For: 198.51.100.7",
            "--client-ip",
            "10.1.2.3",
        ],
    );
    assert_eq!(out, again);
}

#[tokio::test]
async fn explain_reads_the_budget_from_redis_without_consuming_it() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let text = FIXED.replace(
        "[upstreams.api]",
        &format!(
            "[store]\nbackend = \"redis\"\nurl = \"{}\"\n\n[upstreams.api]",
            redis.url()
        ),
    );
    std::fs::write(dir.path().join("proxy.toml"), text).unwrap();
    let args = [
        "explain",
        "GET",
        "http://api.example.com/v1/x",
        "-H",
        "x-api-key: k1",
    ];
    for _ in 0..3 {
        let (code, out) = tollgate_cmd(dir.path(), &args);
        assert_eq!(code, 0);
        assert!(out.contains("now: would admit; 99 of 100 left"), "{out}");
        assert!(out.contains("key tollgate:{"), "{out}");
        assert!(out.contains("nothing was consumed"), "{out}");
        assert!(out.contains("verdict: admitted"), "{out}");
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.conn())
        .unwrap();
    assert!(keys.is_empty(), "explain wrote {keys:?}");
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_rejections_are_throttled() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &upstream,
        &memory_store(),
        "[[routes]]\nname = \"tight\"\nupstream = \"api\"\nlimits = [{ algorithm = \"fixed_window\", rate = \"1/hour\" }]\n",
    )
    .replace("[server]\n", "[server]\naccess_log = true\n");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let tg = Binary::start(&path);
    let http = Http::new();
    let url = format!("http://{}/thing?x=1", tg.addr);
    for _ in 0..200 {
        http.get(&url, &[]).await;
    }
    let access = |logs: &[serde_json::Value]| {
        logs.iter()
            .filter(|l| l["target"] == "tollgate::access")
            .cloned()
            .collect::<Vec<_>>()
    };
    eventually(std::time::Duration::from_secs(5), || {
        let n = access(&tg.logs()).len();
        async move { n == 200 }
    })
    .await;
    let logs = tg.logs();
    let lines = access(&logs);
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/thing");
    assert_eq!(first["route"], "tight");
    assert_eq!(first["status"], 200);
    assert_eq!(first["decision"], "allowed");
    assert_eq!(first["client"], "127.0.0.1");
    assert!(first["upstream_ms"].is_number() && first["total_ms"].is_number());
    assert_eq!(lines[1]["status"], 429);
    assert_eq!(lines[1]["decision"], "rejected");
    // 199 rejections in well under a second: at most a couple of rejection lines, the rest
    // counted as suppressed.
    let rejection_lines = logs
        .iter()
        .filter(|l| l["message"] == "request rejected by a limit")
        .count();
    assert!(
        (1..=3).contains(&rejection_lines),
        "{rejection_lines} rejection lines"
    );
}
