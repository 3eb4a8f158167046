//! What ships beside the binary: the Docker image's built-in config (listens on every
//! interface), the two-replica compose example, and the Grafana dashboard and Prometheus alert
//! rules, whose every metric must exist in a real `/metrics` scrape (and the rules must pass
//! `promtool check rules` where promtool is installed).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_image_config_listens_on_every_interface_and_the_compose_config_is_valid() {
    let image = tollgate::config::load(&repo("deploy/docker/proxy.toml")).expect("valid");
    assert_eq!(image.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(
        image.server.admin.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:9901")
    );
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("COPY deploy/docker/proxy.toml /etc/tollgate/proxy.toml"),
        "the image carries the built-in config"
    );
    // The local example keeps loopback.
    let local = tollgate::config::load(&repo("proxy.toml")).expect("valid");
    assert!(local.server.listen.ip().is_loopback());

    let compose = tollgate::config::load(&repo("deploy/compose/proxy.toml")).expect("valid");
    assert!(matches!(
        compose.store,
        tollgate::policy::StoreSettings::Redis(_)
    ));
    let yaml = std::fs::read_to_string(repo("deploy/compose/compose.yaml")).unwrap();
    for needed in [
        "tollgate-a:",
        "tollgate-b:",
        "redis:",
        "./proxy.toml:/etc/tollgate/compose.toml:ro",
    ] {
        assert!(yaml.contains(needed), "compose.yaml names {needed}");
    }
}

/// Every `tollgate_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tollgate_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        // A whole name, not the tail of a longer word.
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The series names a scrape exposes: sample names and `# TYPE` names (a family with no
/// sample yet, such as store errors before the first one, still has its TYPE line).
fn exposed(scrape: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in scrape.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| n.starts_with("tollgate_")) {
            out.insert(name.to_string());
        }
    }
    out
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_in_a_real_scrape() {
    let upstream = Upstream::start().await;
    // A store nobody answers (port 9 of loopback) and one route for /x only, so that the
    // families that exist only once something happened (store errors, unrouted answers) do.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:9/0\"\ntimeout = \"100ms\"\n\n\
         [upstreams.api]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"api\"\nmatch = {{ path = \"/x\" }}\n\
         limits = [{{ algorithm = \"fixed_window\", rate = \"1/hour\" }}]\n",
        upstream.target()
    );
    let tg = start_tollgate(&text).await;
    let http = Http::new();
    for path in ["/x", "/x", "/nowhere"] {
        http.get(&format!("http://{}{path}", tg.addr), &[]).await;
    }
    let admin = tg.admin_addr.expect("admin listener");
    let scrape = http.scrape(admin).await;
    let have = exposed(&scrape);
    for file in [
        "deploy/grafana/tollgate.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        let named = metric_names(&text);
        assert!(!named.is_empty(), "{file} names metrics");
        for name in &named {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                have.contains(name.as_str()) || have.contains(base),
                "{file} names {name}, which /metrics does not expose; it has {have:?}"
            );
        }
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/tollgate.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(
        json["panels"].as_array().is_some_and(|p| p.len() >= 8),
        "a dashboard with panels"
    );
    tg.stop().await;
}

#[test]
fn the_alert_rules_pass_promtool_where_it_is_installed() {
    let rules = repo("deploy/prometheus/alerts.yml");
    match std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!(
            "skipped: promtool is not installed ({e}); the test script does not install Debian's prometheus package for it (96 MB with its web UI)"
        ),
    }
}
