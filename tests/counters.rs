//! The operator API on the admin listener, against the tollgate binary: `GET /v1/counters`
//! reads an identity's budgets without spending them, `DELETE` unblocks it (for every algorithm,
//! on both stores, and on a second replica sharing the Redis within a second), `ip=`, `value=`
//! and `consumer=` identities, bearer-token auth, 400s naming the bad parameter, and
//! `/v1/status`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TOKEN_ENV: &str = "TOLLGATE_TEST_ADMIN_TOKEN";
const TOKEN: &str = "an-admin-token-for-tests";

fn write_config(
    dir: &Path,
    upstream: &Upstream,
    store: &str,
    extra_server: &str,
    routes: &str,
) -> std::path::PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{extra_server}\n{store}\n\n\
             [upstreams.api]\ntargets = [\"{}\"]\ntimeout = \"2s\"\n\n{routes}",
            upstream.target()
        ),
    )
    .unwrap();
    path
}

fn with_token(path: &Path) -> Binary {
    Binary::start_with_env(path, &[(TOKEN_ENV, TOKEN)])
}

async fn admin(http: &Http, bin: &Binary, method: &str, path: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http.send(
        method,
        &format!("http://{}{path}", bin.admin.expect("admin listener")),
        &headers,
        bytes::Bytes::new(),
    )
    .await
}

fn remaining(reply: &Reply, limit: usize) -> u64 {
    let doc = reply.json();
    doc["limits"][limit]["remaining"]
        .as_u64()
        .unwrap_or_else(|| panic!("{doc}"))
}

#[tokio::test]
async fn delete_unblocks_an_ip_for_every_algorithm_on_both_stores() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let http = Http::new();
    for store in [memory_store(), redis_store(&redis)] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            &upstream,
            &store,
            &format!("admin_token_env = \"{TOKEN_ENV}\""),
            &algorithm_routes("ip", 3, "", ""),
        );
        let bin = with_token(&path);
        for alg in ALGORITHMS {
            let url = format!("http://{}/{alg}", bin.addr);
            for _ in 0..3 {
                assert_eq!(http.get(&url, &[]).await.status, 200, "{alg}");
            }
            assert_eq!(http.get(&url, &[]).await.status, 429, "{alg}");
            let query = format!("/v1/counters?route={alg}&ip=127.0.0.1");
            let read = admin(&http, &bin, "GET", &query, Some(TOKEN)).await;
            assert_eq!(read.status, 200, "{alg}: {:?}", read.body);
            assert_eq!(remaining(&read, 0), 0, "{alg}");
            assert_eq!(read.json()["limits"][0]["would_admit"], false, "{alg}");
            // Reading spent nothing.
            assert_eq!(
                remaining(&admin(&http, &bin, "GET", &query, Some(TOKEN)).await, 0),
                0
            );

            let reset = admin(&http, &bin, "DELETE", &query, Some(TOKEN)).await;
            assert_eq!(reset.status, 200, "{alg}: {:?}", reset.body);
            assert_eq!(reset.json()["reset"][0], alg);
            assert_eq!(
                http.get(&url, &[]).await.status,
                200,
                "{alg}: unblocked at once"
            );
            let after = admin(&http, &bin, "GET", &query, Some(TOKEN)).await;
            assert_eq!(remaining(&after, 0), 2, "{alg}: a fresh budget, one spent");
        }
    }
}

#[tokio::test]
async fn values_and_consumers_are_addressed_and_never_echoed() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("consumers.toml"),
        format!(
            "[[consumer]]\nname = \"acme\"\nkeys = [\"{}\"]\n",
            tollgate::consumers::hash_key(b"acme-secret")
        ),
    )
    .unwrap();
    let routes = "[consumers]\nkey = \"header:x-api-key\"\nfile = \"consumers.toml\"\n\n\
         [[routes]]\nname = \"keyed\"\nupstream = \"api\"\nmatch = { path = \"/keyed\" }\n\
         limits = [{ by = \"header:x-k\", algorithm = \"gcra\", rate = \"2/hour\", burst = 2 }]\n\n\
         [[routes]]\nname = \"members\"\nupstream = \"api\"\nmatch = { path = \"/members\" }\n\
         limits = [{ by = \"consumer\", algorithm = \"fixed_window\", rate = \"2/hour\" }, \
                   { by = \"global\", algorithm = \"fixed_window\", rate = \"1000/hour\" }]\n";
    let path = write_config(
        dir.path(),
        &upstream,
        &memory_store(),
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
        routes,
    );
    let bin = with_token(&path);
    let http = Http::new();
    let keyed = format!("http://{}/keyed", bin.addr);
    for _ in 0..2 {
        assert_eq!(
            http.get(&keyed, &[("x-k", "sk-raw-value")]).await.status,
            200
        );
    }
    assert_eq!(
        http.get(&keyed, &[("x-k", "sk-raw-value")]).await.status,
        429
    );
    let read = admin(
        &http,
        &bin,
        "GET",
        "/v1/counters?route=keyed&value=sk-raw-value",
        Some(TOKEN),
    )
    .await;
    assert_eq!(remaining(&read, 0), 0);
    assert!(
        !String::from_utf8_lossy(&read.body).contains("sk-raw-value"),
        "the value is never echoed"
    );
    // Another value is untouched.
    let other = admin(
        &http,
        &bin,
        "GET",
        "/v1/counters?route=keyed&value=other",
        Some(TOKEN),
    )
    .await;
    assert_eq!(remaining(&other, 0), 2);
    assert_eq!(
        admin(
            &http,
            &bin,
            "DELETE",
            "/v1/counters?route=keyed&value=sk-raw-value",
            Some(TOKEN)
        )
        .await
        .status,
        200
    );
    assert_eq!(
        http.get(&keyed, &[("x-k", "sk-raw-value")]).await.status,
        200
    );

    let members = format!("http://{}/members", bin.addr);
    for _ in 0..2 {
        assert_eq!(
            http.get(&members, &[("x-api-key", "acme-secret")])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        http.get(&members, &[("x-api-key", "acme-secret")])
            .await
            .status,
        429
    );
    let read = admin(
        &http,
        &bin,
        "GET",
        "/v1/counters?route=members&consumer=acme",
        Some(TOKEN),
    )
    .await;
    let doc = read.json();
    assert_eq!(doc["limits"][0]["remaining"], 0, "{doc}");
    assert_eq!(
        doc["limits"][1]["addressed"], false,
        "a global counter is nobody's: {doc}"
    );
    let reset = admin(
        &http,
        &bin,
        "DELETE",
        "/v1/counters?route=members&consumer=acme",
        Some(TOKEN),
    )
    .await;
    assert_eq!(reset.json()["reset"].as_array().unwrap().len(), 1);
    assert_eq!(
        http.get(&members, &[("x-api-key", "acme-secret")])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn the_token_guards_every_v1_endpoint_and_bad_queries_name_their_parameter() {
    let upstream = Upstream::start().await;
    let routes = algorithm_routes("ip", 3, "", "");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &upstream,
        &memory_store(),
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
        &routes,
    );
    let bin = with_token(&path);
    let http = Http::new();
    for (method, path) in [
        ("GET", "/v1/status"),
        ("GET", "/v1/counters?route=gcra&ip=127.0.0.1"),
        ("DELETE", "/v1/counters?route=gcra&ip=127.0.0.1"),
    ] {
        for token in [None, Some("wrong"), Some("an-admin-token-for-test")] {
            let reply = admin(&http, &bin, method, path, token).await;
            assert_eq!(reply.status, 401, "{method} {path} with {token:?}");
            assert_eq!(
                reply.header("content-type"),
                Some("application/problem+json")
            );
        }
    }
    for (query, param) in [
        ("/v1/counters?ip=127.0.0.1", "route"),
        ("/v1/counters?route=gcra", "ip"),
        ("/v1/counters?route=gcra&ip=not-an-ip", "ip"),
        ("/v1/counters?route=gcra&ip=127.0.0.1&value=x", "ip"),
        ("/v1/counters?route=gcra&secret=1", "query"),
    ] {
        let reply = admin(&http, &bin, "GET", query, Some(TOKEN)).await;
        assert_eq!(reply.status, 400, "{query}");
        assert_eq!(reply.json()["parameter"], param, "{query}");
    }
    let long = format!("/v1/counters?route=gcra&value={}", "v".repeat(9000));
    assert_eq!(
        admin(&http, &bin, "GET", &long, Some(TOKEN)).await.json()["parameter"],
        "query"
    );
    assert_eq!(
        admin(
            &http,
            &bin,
            "GET",
            "/v1/counters?route=nope&ip=127.0.0.1",
            Some(TOKEN)
        )
        .await
        .status,
        404
    );

    // /v1/status counts what happened.
    for _ in 0..4 {
        http.get(&format!("http://{}/gcra", bin.addr), &[]).await;
    }
    let status = admin(&http, &bin, "GET", "/v1/status", Some(TOKEN))
        .await
        .json();
    let gcra = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gcra")
        .unwrap()
        .clone();
    assert_eq!(gcra["decisions"]["allowed"], 3, "{gcra}");
    assert_eq!(gcra["decisions"]["rejected"], 1, "{gcra}");
    assert_eq!(gcra["limits"][0]["algorithm"], "gcra");
    assert_eq!(status["store"]["backend"], "memory");
    // Times from the histograms: requests were forwarded and decided.
    assert!(
        gcra["upstream_p99_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{gcra}"
    );
    assert!(
        status["store"]["decision_p99_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{status}"
    );
    assert!(status["last_reload"].is_null(), "no reload yet: {status}");
    bin.signal("HUP");
    let reloaded = eventually(Duration::from_secs(5), || {
        let (http, bin) = (&http, &bin);
        async move {
            admin(http, bin, "GET", "/v1/status", Some(TOKEN))
                .await
                .json()["last_reload"]["result"]
                == "ok"
        }
    })
    .await;
    assert!(reloaded < Duration::from_secs(5));
    assert!(
        !serde_json::to_string(&bin.logs()).unwrap().contains(TOKEN),
        "the token is never logged"
    );

    // Without admin_token_env: reads are open, DELETE is refused.
    let open = write_config(dir.path(), &upstream, &memory_store(), "", &routes);
    let bin = Binary::start(&open);
    assert_eq!(
        admin(
            &http,
            &bin,
            "GET",
            "/v1/counters?route=gcra&ip=127.0.0.1",
            None
        )
        .await
        .status,
        200
    );
    assert_eq!(
        admin(
            &http,
            &bin,
            "DELETE",
            "/v1/counters?route=gcra&ip=127.0.0.1",
            None
        )
        .await
        .status,
        403
    );
}

#[tokio::test]
async fn a_reset_on_one_replica_unblocks_the_other_within_a_second() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let routes = "[[routes]]\nname = \"api\"\nupstream = \"api\"\n\
                  limits = [{ algorithm = \"fixed_window\", rate = \"2/hour\" }]\n";
    let path = write_config(
        dir.path(),
        &upstream,
        &redis_store(&redis),
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
        routes,
    );
    let a = with_token(&path);
    let b = with_token(&path);
    let http = Http::new();
    let (url_a, url_b) = (format!("http://{}/", a.addr), format!("http://{}/", b.addr));
    assert_eq!(http.get(&url_a, &[]).await.status, 200);
    assert_eq!(http.get(&url_b, &[]).await.status, 200);
    // Both replicas now answer 429 from their local over-limit cache.
    assert_eq!(http.get(&url_a, &[]).await.status, 429);
    assert_eq!(http.get(&url_b, &[]).await.status, 429);
    assert_eq!(
        admin(
            &http,
            &a,
            "DELETE",
            "/v1/counters?route=api&ip=127.0.0.1",
            Some(TOKEN)
        )
        .await
        .status,
        200
    );
    let took = eventually(Duration::from_secs(3), || {
        let (http, url) = (&http, &url_b);
        async move { http.get(url, &[]).await.status == 200 }
    })
    .await;
    // Its local cache re-asks the store at least every second (deny_cache::REASK).
    assert!(
        took <= Duration::from_millis(2_500),
        "B unblocked after {took:?}"
    );
}

#[tokio::test]
async fn the_dashboard_is_one_self_contained_page_reading_what_v1_status_has() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &upstream,
        &memory_store(),
        "",
        &algorithm_routes("ip", 3, "", ""),
    );
    let bin = Binary::start(&path);
    let http = Http::new();
    let page = admin(&http, &bin, "GET", "/", None).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    // The SVG namespace is a name, not a fetch.
    let fetched = html.replace("http://www.w3.org/2000/svg", "");
    for external in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "@import",
        "<link",
    ] {
        assert!(
            !fetched.contains(external),
            "the page fetches nothing from elsewhere: {external}"
        );
    }
    assert!(
        !html.contains("innerHTML"),
        "route names are drawn as text, never HTML"
    );
    // Every field the page reads is in /v1/status.
    let status = admin(&http, &bin, "GET", "/v1/status", None).await.json();
    assert!(status["config_hash"].is_string());
    assert!(status["store"]["backend"].is_string() && status["store"]["open_breakers"].is_number());
    let route = &status["routes"][0];
    for field in ["name", "upstream", "limits", "decisions"] {
        assert!(!route[field].is_null(), "{field}: {route}");
    }
    for kind in ["allowed", "rejected", "store_error"] {
        assert!(route["decisions"][kind].is_number(), "{kind}");
        assert!(
            html.contains(&format!("\"{kind}\"")),
            "the page shows {kind}"
        );
    }
    for field in ["name", "algorithm", "rate", "quota", "window"] {
        assert!(!route["limits"][0][field].is_null(), "{field}");
    }
}
