//! Consumers and plans end to end, on both stores: API keys listed only as hashes, each plan
//! its own quota, `unlimited`, two keys sharing a budget, a plan change on reload keeping the
//! count, unknown keys (anonymous or 401), the consumer headers the upstream receives, and the
//! route access rules (deny, bypass, rejection) with their metrics.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// What `tollgate hash-key` prints for `key`.
fn b3(key: &str) -> String {
    tollgate::consumers::hash_key(key.as_bytes())
}

/// A proxy.toml and consumers.toml in a directory of their own.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(proxy: &str, consumers: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("proxy.toml"), proxy).unwrap();
        std::fs::write(dir.path().join("consumers.toml"), consumers).unwrap();
        Files { dir }
    }

    fn proxy(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
    }

    fn write_consumers(&self, text: &str) {
        std::fs::write(self.dir.path().join("consumers.toml"), text).unwrap();
    }

    async fn start(&self) -> tollgate::Running {
        start_file(&self.proxy()).await
    }
}

/// acme (pro, two keys), globex (free), batch (internal), revoked (free).
fn consumers_file() -> String {
    format!(
        "[[consumer]]\nname = \"acme\"\nplan = \"pro\"\nkeys = [\"{}\", \"{}\"]\n\n\
         [[consumer]]\nname = \"globex\"\nkeys = [\"{}\"]\n\n\
         [[consumer]]\nname = \"batch\"\nplan = \"internal\"\nkeys = [\"{}\"]\n\n\
         [[consumer]]\nname = \"revoked\"\nkeys = [\"{}\"]\n",
        b3("acme-key-1"),
        b3("acme-key-2"),
        b3("globex-key"),
        b3("batch-key"),
        b3("revoked-key"),
    )
}

fn consumers_table(unknown: &str) -> String {
    format!(
        "[consumers]\nkey = \"header:x-api-key\"\nfile = \"consumers.toml\"\n\
         plans = [\"free\", \"pro\", \"internal\"]\ndefault_plan = \"free\"\nunknown = \"{unknown}\"\n"
    )
}

/// Route `api` (per consumer: free 3, pro 6, internal unlimited) and route `open` (per IP, 2).
fn proxy_file(upstream: &Upstream, store: &str, unknown: &str, algorithm: &str) -> String {
    let burst = |n: u64| burst(algorithm, n);
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{store}\n\n{}\n\
         [upstreams.api]\ntargets = [\"{}\"]\ntimeout = \"2s\"\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"api\"\nmatch = {{ path_prefix = \"/api\" }}\n\
         limits = [{{ by = \"consumer\", algorithm = \"{algorithm}\", rate = \"3/hour\"{}, \
         plans = {{ pro = {{ rate = \"6/hour\"{} }}, internal = \"unlimited\" }} }}]\n\n\
         [[routes]]\nname = \"open\"\nupstream = \"api\"\n\
         limits = [{{ algorithm = \"fixed_window\", rate = \"2/hour\" }}]\n",
        consumers_table(unknown),
        upstream.target(),
        burst(3),
        burst(6),
    )
}

/// tollgate on [`proxy_file`] with the memory store and [`consumers_file`].
async fn on_memory(unknown: &str, algorithm: &str) -> (Upstream, Files, tollgate::Running) {
    let upstream = Upstream::start().await;
    let files = Files::new(
        &proxy_file(&upstream, &memory_store(), unknown, algorithm),
        &consumers_file(),
    );
    let tg = files.start().await;
    (upstream, files, tg)
}

/// Statuses of `n` requests to `path` with `key` (none when empty).
async fn statuses(
    http: &Http,
    tg: &tollgate::Running,
    path: &str,
    key: &str,
    n: usize,
) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        let headers: Vec<(&str, &str)> = if key.is_empty() {
            vec![]
        } else {
            vec![("x-api-key", key)]
        };
        out.push(
            http.get(&format!("http://{}{path}", tg.addr), &headers)
                .await
                .status,
        );
    }
    out
}

fn admitted(statuses: &[u16]) -> usize {
    statuses.iter().filter(|s| **s == 200).count()
}

#[tokio::test]
async fn each_plan_gets_its_own_quota_on_both_stores() {
    let upstream = Upstream::start().await;
    for (store, redis) in [(memory_store(), None), {
        let r = Redis::start();
        (redis_store(&r), Some(r))
    }] {
        for alg in ALGORITHMS {
            let files = Files::new(
                &proxy_file(&upstream, &store, "anonymous", alg),
                &consumers_file(),
            );
            let tg = files.start().await;
            let http = Http::new();
            // free (by default plan): 3; pro: 6 shared by both of acme's keys; internal: all.
            assert_eq!(
                admitted(&statuses(&http, &tg, "/api/x", "globex-key", 5).await),
                3,
                "{alg}: free"
            );
            let first = statuses(&http, &tg, "/api/x", "acme-key-1", 4).await;
            let second = statuses(&http, &tg, "/api/x", "acme-key-2", 4).await;
            assert_eq!(
                admitted(&first) + admitted(&second),
                6,
                "{alg}: pro shared by two keys"
            );
            assert_eq!(
                admitted(&second),
                2,
                "{alg}: the second key continues the first's budget"
            );
            assert_eq!(
                admitted(&statuses(&http, &tg, "/api/x", "batch-key", 20).await),
                20,
                "{alg}: internal is unlimited"
            );

            // RateLimit-Policy shows the request's own plan's quota; unlimited sends none.
            let pro = http
                .get(
                    &format!("http://{}/api/x", tg.addr),
                    &[("x-api-key", "acme-key-1")],
                )
                .await;
            assert_eq!(pro.status, 429);
            let policy = pro
                .header("ratelimit-policy")
                .unwrap_or_default()
                .to_string();
            assert!(policy.contains("q=6"), "{alg}: {policy}");
            let free = http
                .get(
                    &format!("http://{}/api/x", tg.addr),
                    &[("x-api-key", "globex-key")],
                )
                .await;
            assert!(
                free.header("ratelimit-policy")
                    .unwrap_or_default()
                    .contains("q=3"),
                "{alg}"
            );
            let internal = http
                .get(
                    &format!("http://{}/api/x", tg.addr),
                    &[("x-api-key", "batch-key")],
                )
                .await;
            assert_eq!(internal.status, 200);
            assert_eq!(
                internal.header("ratelimit-policy"),
                None,
                "{alg}: an unlimited plan is not in the headers"
            );
            assert_eq!(internal.header("ratelimit"), None);

            // Unknown and absent keys are anonymous: counted per IP under the default plan (3).
            let unknown = statuses(&http, &tg, "/api/x", "no-such-key", 2).await;
            let absent = statuses(&http, &tg, "/api/x", "", 2).await;
            assert_eq!(
                admitted(&unknown) + admitted(&absent),
                3,
                "{alg}: anonymous share the IP's budget"
            );
            tg.stop().await;
            if let Some(r) = &redis {
                let _: () = redis::cmd("FLUSHALL").query(&mut r.conn()).unwrap();
            }
        }
    }
}

#[tokio::test]
async fn unknown_reject_answers_401_and_forwards_nothing() {
    let (upstream, _files, tg) = on_memory("reject", "token_bucket").await;
    let http = Http::new();
    let before = upstream.count();
    for key in ["", "no-such-key"] {
        let headers: Vec<(&str, &str)> = if key.is_empty() {
            vec![]
        } else {
            vec![("x-api-key", key)]
        };
        let reply = http
            .get(&format!("http://{}/api/x", tg.addr), &headers)
            .await;
        assert_eq!(reply.status, 401, "{key:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(reply.json()["status"], 401);
        assert!(
            !String::from_utf8_lossy(&reply.body).contains("no-such-key"),
            "the key is never echoed"
        );
    }
    assert_eq!(upstream.count(), before, "nothing forwarded");
    // A route without consumer-keyed limits serves anonymous requests as before.
    assert_eq!(
        http.get(&format!("http://{}/other", tg.addr), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        http.get(
            &format!("http://{}/api/x", tg.addr),
            &[("x-api-key", "acme-key-1")]
        )
        .await
        .status,
        200
    );
    let text = tg.app.metrics.render();
    assert_eq!(
        common::parse::metric(
            &text,
            "tollgate_requests_total{route=\"api\",decision=\"unknown_consumer\"}"
        ),
        Some(2.0)
    );
    tg.stop().await;
}

#[tokio::test]
async fn the_upstream_learns_the_consumer_and_never_a_forged_one() {
    let (upstream, _files, tg) = on_memory("anonymous", "gcra").await;
    let http = Http::new();
    let forged = [
        ("x-tollgate-consumer", "batch"),
        ("x-tollgate-plan", "internal"),
        ("connection", "x-tollgate-consumer"),
    ];
    let mut headers = vec![("x-api-key", "acme-key-2")];
    headers.extend(forged);
    assert_eq!(
        http.get(&format!("http://{}/api/x", tg.addr), &headers)
            .await
            .status,
        200
    );
    let seen = upstream.last();
    assert_eq!(seen.headers.get("x-tollgate-consumer").unwrap(), "acme");
    assert_eq!(seen.headers.get("x-tollgate-plan").unwrap(), "pro");
    assert_eq!(
        seen.headers.get_all("x-tollgate-consumer").iter().count(),
        1
    );
    assert_eq!(
        seen.headers.get("x-api-key").unwrap(),
        "acme-key-2",
        "the key is forwarded as sent"
    );

    // Without a consumer (and on a route without consumer limits) the forged ones are gone.
    for path in ["/api/x", "/other"] {
        assert_eq!(
            http.get(&format!("http://{}{path}", tg.addr), &forged)
                .await
                .status,
            200
        );
        let seen = upstream.last();
        assert_eq!(seen.headers.get("x-tollgate-consumer"), None, "{path}");
        assert_eq!(seen.headers.get("x-tollgate-plan"), None, "{path}");
    }
    tg.stop().await;
}

#[tokio::test]
async fn a_plan_change_on_reload_keeps_the_count_and_applies_the_new_quota() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    for store in [memory_store(), redis_store(&redis)] {
        for alg in ALGORITHMS {
            let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
            let files = Files::new(
                &proxy_file(&upstream, &store, "anonymous", alg),
                &consumers_file().replace("plan = \"pro\"", "plan = \"free\""),
            );
            let tg = files.start().await;
            let http = Http::new();
            assert_eq!(
                admitted(&statuses(&http, &tg, "/api/x", "acme-key-1", 2).await),
                2,
                "{alg}"
            );
            // acme moves from free (3) to pro (6), not to a fresh 6: the windows and gcra keep
            // what it used (2 of 6: 4 left), the token bucket keeps the tokens it had left (1),
            // as on any reload (README, "A limit's counters keep going").
            files.write_consumers(&consumers_file());
            tg.app
                .reload(None)
                .expect("the new consumers file is valid");
            let after = statuses(&http, &tg, "/api/x", "acme-key-2", 6).await;
            let expected = if alg == "token_bucket" { 1 } else { 4 };
            assert_eq!(admitted(&after), expected, "{alg}: {after:?}");
            tg.stop().await;
        }
    }
}

#[tokio::test]
async fn a_bad_consumers_file_on_reload_keeps_the_old_config_serving() {
    let (_upstream, files, tg) = on_memory("reject", "fixed_window").await;
    let http = Http::new();
    files.write_consumers("[[consumer]]\nname = \"acme\"\nkeys = [\"acme-key-1\"]\n");
    let error = tg
        .app
        .reload(None)
        .expect_err("a clear-text key is refused")
        .to_string();
    assert!(error.contains("consumers.toml:3:9:"), "{error}");
    assert!(
        !error.contains("acme-key-1"),
        "the key is never echoed: {error}"
    );
    // The old consumers still resolve.
    assert_eq!(
        http.get(
            &format!("http://{}/api/x", tg.addr),
            &[("x-api-key", "globex-key")]
        )
        .await
        .status,
        200
    );
    let text = tg.app.metrics.render();
    assert_eq!(
        common::parse::metric(&text, "tollgate_config_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_changed_consumers_file_is_picked_up_by_the_watcher() {
    let (upstream, files, tg) = on_memory("reject", "fixed_window").await;
    let http = Http::new();
    let url = format!("http://{}/api/x", tg.addr);
    assert_eq!(
        http.get(&url, &[("x-api-key", "new-key")]).await.status,
        401
    );
    files.write_consumers(&format!(
        "{}\n[[consumer]]\nname = \"initech\"\nkeys = [\"{}\"]\n",
        consumers_file(),
        b3("new-key")
    ));
    let took = eventually(std::time::Duration::from_secs(5), || {
        let (http, url) = (&http, &url);
        async move { http.get(url, &[("x-api-key", "new-key")]).await.status == 200 }
    })
    .await;
    assert!(took < std::time::Duration::from_secs(5));
    assert_eq!(
        upstream.last().headers.get("x-tollgate-consumer").unwrap(),
        "initech"
    );
    tg.stop().await;
}

/// Route `guarded` (1 per hour per consumer) with `access` rules, upstream at `target`.
fn access_file(target: &str, access: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{}\n{}\n\
         [upstreams.api]\ntargets = [\"{}\"]\ntimeout = \"2s\"\n\n\
         [[routes]]\nname = \"guarded\"\nupstream = \"api\"\n{access}\n\
         limits = [{{ by = \"consumer\", algorithm = \"fixed_window\", rate = \"1/hour\" }}]\n",
        memory_store(),
        consumers_table("anonymous"),
        target,
    )
}

/// An address nothing listens on, for configs that are only validated.
const NOWHERE: &str = "http://127.0.0.1:9";

#[tokio::test]
async fn deny_bypass_and_a_custom_rejection_with_their_metrics() {
    let upstream = Upstream::start().await;
    let files = Files::new(
        &access_file(
            &upstream.target(),
            "deny = { consumers = [\"revoked\"] }\nbypass = { consumers = [\"batch\"] }\n\
             rejection = { status = 503, content_type = \"text/plain\", body = \"slow down\\n\", headers = { x-quota = \"exceeded\" } }",
        ),
        &consumers_file(),
    );
    let tg = files.start().await;
    let http = Http::new();
    let url = format!("http://{}/", tg.addr);
    let before = upstream.count();
    let denied = http.get(&url, &[("x-api-key", "revoked-key")]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(
        denied.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        upstream.count(),
        before,
        "a denied request is not forwarded"
    );

    for _ in 0..3 {
        let bypassed = http.get(&url, &[("x-api-key", "batch-key")]).await;
        assert_eq!(bypassed.status, 200);
        assert_eq!(
            bypassed.header("ratelimit"),
            None,
            "no rate-limit headers when bypassed"
        );
        assert_eq!(bypassed.header("ratelimit-policy"), None);
    }
    assert_eq!(
        http.get(&url, &[("x-api-key", "globex-key")]).await.status,
        200
    );
    let rejected = http.get(&url, &[("x-api-key", "globex-key")]).await;
    assert_eq!(rejected.status, 503);
    assert_eq!(rejected.header("content-type"), Some("text/plain"));
    assert_eq!(rejected.header("x-quota"), Some("exceeded"));
    assert_eq!(&rejected.body[..], b"slow down\n");
    let retry: u64 = rejected.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    assert!(rejected.header("ratelimit").unwrap().contains("r=0"));

    let text = tg.app.metrics.render();
    let count = |decision: &str| {
        common::parse::metric(
            &text,
            &format!("tollgate_requests_total{{route=\"guarded\",decision=\"{decision}\"}}"),
        )
    };
    assert_eq!(count("denied"), Some(1.0));
    assert_eq!(count("bypassed"), Some(3.0));
    assert_eq!(count("allowed"), Some(1.0));
    assert_eq!(count("rejected"), Some(1.0));
    tg.stop().await;
}

#[tokio::test]
async fn ip_lists_use_the_client_ip_and_deny_wins_over_bypass() {
    let upstream = Upstream::start().await;
    // The test client is 127.0.0.1: listed in both, deny first.
    let files = Files::new(
        &access_file(
            &upstream.target(),
            "deny = { ips = [\"127.0.0.0/8\"] }\nbypass = { ips = [\"127.0.0.1\"] }",
        ),
        &consumers_file(),
    );
    let tg = files.start().await;
    let http = Http::new();
    assert_eq!(
        http.get(&format!("http://{}/", tg.addr), &[]).await.status,
        403
    );
    tg.stop().await;

    let files = Files::new(
        &access_file(&upstream.target(), "bypass = { ips = [\"127.0.0.0/8\"] }"),
        &consumers_file(),
    );
    let tg = files.start().await;
    for _ in 0..5 {
        assert_eq!(
            http.get(&format!("http://{}/", tg.addr), &[]).await.status,
            200
        );
    }
    tg.stop().await;
}

/// The error of loading proxy.toml with `consumers` as consumers.toml.
fn consumers_error(consumers: &str) -> String {
    let files = Files::new(&access_file(NOWHERE, ""), consumers);
    let error = tollgate::config::load(&files.proxy())
        .expect_err("the consumers file is invalid")
        .to_string();
    let prefix = format!("{}:", files.dir.path().join("consumers.toml").display());
    error
        .lines()
        .map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn each_consumers_file_error_has_its_line_and_column() {
    let good = b3("k1");
    let cases = [
        (
            format!("[[consumer]]\nname = \"a\"\nplan = \"gold\"\nkeys = [\"{good}\"]\n"),
            "3:8: unknown plan \"gold\"; [consumers] plans lists: free, pro, internal",
        ),
        (
            format!(
                "[[consumer]]\nname = \"a\"\nkeys = [\"{good}\"]\n[[consumer]]\nname = \"a\"\n"
            ),
            "5:8: duplicate consumer \"a\"; consumer names must be unique",
        ),
        (
            format!(
                "[[consumer]]\nname = \"a\"\nkeys = [\"{good}\"]\n[[consumer]]\nname = \"b\"\nkeys = [\n  \"{good}\"]\n"
            ),
            "7:3: duplicate key hash: already a key of \"a\"",
        ),
        (
            "[[consumer]]\nname = \"a\"\nkeys = [\"sk-live-secret\"]\n".to_string(),
            "3:9: a key in clear text is refused; list its hash instead (`tollgate hash-key` prints it)",
        ),
        (
            "[[consumer]]\nname = \"a\"\nkeys = [\"b3:00ff\"]\n".to_string(),
            "3:9: malformed key hash; expected b3: and 64 lowercase hex digits, as `tollgate hash-key` prints",
        ),
        (
            "[[consumer]]\nname = \"a b\"\n".to_string(),
            "2:8: invalid consumer name \"a b\"; expected letters, digits, '-', '_' or '.'",
        ),
        (
            "[[consumer]]\nname = \"a\"\nkey = []\n".to_string(),
            "3:1: unknown field `key`, expected one of `name`, `plan`, `keys`",
        ),
        (
            "[[consumer]]\nname = \"a\n".to_string(),
            "2:8: unterminated string",
        ),
    ];
    for (text, expected) in cases {
        let error = consumers_error(&text);
        assert!(
            error.starts_with(expected),
            "expected {expected}\n     got {error}"
        );
        assert!(
            !error.contains("sk-live-secret"),
            "a key is never echoed: {error}"
        );
    }
}

#[test]
fn consumer_settings_in_proxy_toml_are_validated() {
    let cases = [
        (
            "limits = [{ by = \"consumer\", algorithm = \"gcra\", rate = \"1/s\", plans = { gold = \"unlimited\" } }]",
            "unknown plan \"gold\"",
        ),
        (
            "limits = [{ by = \"consumer\", algorithm = \"gcra\", rate = \"1/s\", plans = { pro = { rate = \"x\" } } }]",
            "invalid rate",
        ),
        (
            "limits = [{ by = \"consumer\", algorithm = \"fixed_window\", rate = \"1/s\", plans = { pro = { rate = \"2/s\", burst = 4 } } }]",
            "`burst` is not taken by fixed_window",
        ),
        (
            "deny = { consumers = [\"nobody\"] }",
            "unknown consumer \"nobody\" in `deny`",
        ),
        (
            "bypass = { ips = [\"10.0.0.0/33\"] }",
            "invalid address \"10.0.0.0/33\" in `bypass`",
        ),
        (
            "rejection = { status = 200 }",
            "invalid rejection status 200; expected 400 to 599",
        ),
        (
            "rejection = { headers = { retry-after = \"5\" } }",
            "`rejection` cannot set retry-after",
        ),
    ];
    for (route, expected) in cases {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{}\n[upstreams.api]\ntargets = [\"{}\"]\n[[routes]]\nname = \"r\"\nupstream = \"api\"\n{route}\n",
            consumers_table("anonymous"),
            NOWHERE
        );
        let files = Files::new(&text, &consumers_file());
        let error = tollgate::config::load(&files.proxy())
            .expect_err(expected)
            .to_string();
        assert!(
            error.contains(expected),
            "expected {expected}\n     got {error}"
        );
        assert!(error.contains("proxy.toml:"), "{error}");
    }
    // `by = "consumer"` without [consumers].
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\ntargets = [\"{}\"]\n[[routes]]\nname = \"r\"\nupstream = \"api\"\nlimits = [{{ by = \"consumer\", algorithm = \"gcra\", rate = \"1/s\" }}]\n",
        NOWHERE
    );
    let error = tollgate::config::parse(&text, "p.toml", Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("p.toml:8:18: `by = \"consumer\"` needs a [consumers] table"),
        "{error}"
    );
}

/// Sends a request whose `name` header carries `size` bytes of garbage, writing and reading at
/// once (tollgate answers before the client has finished sending); the status line, or the
/// connection closed.
async fn huge_header(addr: std::net::SocketAddr, name: &str, size: usize) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!("GET /api/x HTTP/1.1\r\nHost: t\r\n{name}: ");
    let writer = tokio::spawn(async move {
        let _ = write.write_all(head.as_bytes()).await;
        let chunk = vec![b'z'; 64 * 1024];
        let mut sent = 0;
        while sent < size {
            if write.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
    });
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), read.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap_or(0);
    writer.abort();
    (n > 0).then(|| {
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

#[tokio::test]
async fn a_ten_megabyte_key_or_token_is_refused_with_431_at_once() {
    let (upstream, _files, tg) = on_memory("anonymous", "gcra").await;
    for name in ["x-api-key", "authorization"] {
        let status = huge_header(tg.addr, name, 10 << 20).await;
        assert_eq!(
            status.as_deref(),
            Some("HTTP/1.1 431 Request Header Fields Too Large"),
            "{name}"
        );
        // Refused once the head passes 64 KiB, before any of it is hashed or forwarded.
        assert_eq!(upstream.count(), 0, "nothing forwarded");
    }
    // The proxy still serves.
    let http = Http::new();
    let ok = http
        .get(
            &format!("http://{}/api/x", tg.addr),
            &[("x-api-key", "acme-key-1")],
        )
        .await;
    assert_eq!(ok.status, 200);
    tg.stop().await;
}
