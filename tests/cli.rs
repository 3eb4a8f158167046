//! The `tollgate` binary: `check` output and exit codes, global options, `run` as the default
//! command, and SIGTERM draining an in-flight request before exiting 0.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
    path
}

const VALID: &str = r#"[server]
listen = "127.0.0.1:0"

[upstreams.api]
targets = ["http://127.0.0.1:3000"]

[[routes]]
name = "login"
upstream = "api"
match = { path = "/login", methods = ["POST"] }
limits = [{ by = "ip", algorithm = "sliding_log", rate = "5/min" }]
"#;

#[test]
fn check_prints_a_summary_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", VALID);
    let out = tollgate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(
        stdout.contains("login -> api: path /login, methods POST"),
        "{stdout}"
    );
    assert!(stdout.contains("sliding_log 5/min by ip"), "{stdout}");
}

#[test]
fn check_reports_file_line_column_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = VALID.replace("sliding_log", "token-bucket");
    let path = write(dir.path(), "bad.toml", &bad);
    let out = tollgate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:11:36: unknown algorithm \"token-bucket\"; expected one of fixed_window, sliding_log, sliding_window, token_bucket, gcra",
        path.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn check_never_needs_the_store_and_a_missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: check must not care.
    let text = VALID.replace(
        "[upstreams.api]",
        "[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1/0\"\n\n[upstreams.api]",
    );
    let path = write(dir.path(), "proxy.toml", &text);
    let out = tollgate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tollgate()
        .args(["check", "--config"])
        .arg(dir.path().join("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml:1:1: cannot read"));
}

#[test]
fn log_format_is_accepted_before_and_after_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", VALID);
    for args in [
        vec!["--log-format", "json", "check", "--config"],
        vec!["check", "--log-format", "json", "--config"],
        vec!["--log-format", "text", "check", "--config"],
    ] {
        let out = tollgate().args(&args).arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = tollgate()
        .args(["--log-format", "xml", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_default_config_path_is_proxy_toml_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "proxy.toml", VALID);
    let out = tollgate()
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("proxy.toml: OK"));
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_request_then_exits_0() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &upstream,
        &memory_store(),
        "[[routes]]\nname = \"all\"\nupstream = \"api\"\n",
    );
    let path = write(dir.path(), "proxy.toml", &text);
    let mut tg = Binary::start(&path);
    let addr = tg.addr;
    let http = Http::new();
    let slow = tokio::spawn({
        let http = http.clone();
        async move { http.get(&format!("http://{addr}/slow/800"), &[]).await }
    });
    // The request is in flight once the upstream has recorded it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tg.signal("TERM");
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request completes");
    assert_eq!(&reply.body[..], b"slow\n");
    let status = tokio::task::spawn_blocking(move || tg.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("tollgate exits after draining");
    assert_eq!(status.code(), Some(0));
    // And the listener is closed.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn plain_tollgate_runs_the_default_config() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "proxy.toml", VALID);
    let mut child = tollgate()
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let serving = lines.any(|l| l.is_ok_and(|l| l.contains("tollgate serving")));
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving);
}

/// Runs `tollgate hash-key` with `input` on standard input.
fn hash_key(input: &[u8]) -> std::process::Output {
    let mut child = tollgate()
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn hash_key_prints_the_blake3_of_the_key_without_its_newline() {
    let expected = format!("b3:{}\n", blake3::hash(b"sk-live-7f3a9c").to_hex());
    for input in [
        &b"sk-live-7f3a9c"[..],
        b"sk-live-7f3a9c\n",
        b"sk-live-7f3a9c\r\n",
    ] {
        let out = hash_key(input);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }
    let mut child = tollgate()
        .args(["hash-key", "--each-line"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a\nb\r\n\nc")
        .unwrap();
    let many = child.wait_with_output().unwrap();
    let lines: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|k| format!("b3:{}", blake3::hash(k.as_bytes()).to_hex()))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&many.stdout),
        lines.join("\n") + "\n"
    );
    let empty = hash_key(b"\n");
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no key on standard input"));
}

/// A proxy.toml with consumers (acme on pro with two keys, globex on the default plan) and a
/// consumer-keyed limit with per-plan rates.
fn with_consumers(dir: &Path) -> std::path::PathBuf {
    let key = |k: &str| format!("b3:{}", blake3::hash(k.as_bytes()).to_hex());
    write(
        dir,
        "consumers.toml",
        &format!(
            "[[consumer]]\nname = \"acme\"\nplan = \"pro\"\nkeys = [\"{}\", \"{}\"]\n\n[[consumer]]\nname = \"globex\"\nkeys = [\"{}\"]\n",
            key("acme-secret-1"),
            key("acme-secret-2"),
            key("globex-secret")
        ),
    );
    write(
        dir,
        "proxy.toml",
        r#"[server]
listen = "127.0.0.1:0"

[consumers]
key = "header:x-api-key"
file = "consumers.toml"
plans = ["free", "pro", "internal"]
default_plan = "free"

[upstreams.api]
targets = ["http://127.0.0.1:3000"]

[[routes]]
name = "api"
upstream = "api"
deny = { consumers = ["globex"] }
limits = [{ by = "consumer", algorithm = "gcra", rate = "10/s", burst = 20, plans = { pro = { rate = "100/s", burst = 200 }, internal = "unlimited" } }]
"#,
    )
}

#[test]
fn check_and_explain_show_consumers_and_plans_never_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_consumers(dir.path());
    let out = tollgate()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("consumers: 2 with 3 key hash(es), named by header:x-api-key; plans free, pro, internal; default plan free"),
        "{text}"
    );
    assert!(
        text.contains(
            "  plan free: 1 consumer(s)\n  plan pro: 1 consumer(s)\n  plan internal: 0 consumer(s)"
        ),
        "{text}"
    );
    assert!(
        text.contains("      plan pro: 100/s (quota 200 per 2 s)"),
        "{text}"
    );
    assert!(
        text.contains("      plan internal: unlimited (not counted)"),
        "{text}"
    );
    assert!(text.contains("    deny: consumer globex"), "{text}");
    assert!(
        !text.contains("secret") && !text.contains("b3:"),
        "no key or hash printed: {text}"
    );

    let explain = |key: &str| {
        let out = tollgate()
            .args(["explain", "--config"])
            .arg(&config)
            .args(["GET", "http://api.example.com/x", "-H"])
            .arg(format!("X-Api-Key: {key}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let acme = explain("acme-secret-2");
    assert!(acme.contains("consumer acme (plan pro)"), "{acme}");
    assert!(acme.contains("identity: consumer acme"), "{acme}");
    assert!(acme.contains("gcra 100/s, burst 200"), "{acme}");
    assert!(!acme.contains("acme-secret"), "{acme}");
    let globex = explain("globex-secret");
    assert!(
        globex.contains("denied: the route's deny list names this client"),
        "{globex}"
    );
    let unknown = explain("nope");
    assert!(
        unknown.contains("consumer: the key names no consumer (plan free)"),
        "{unknown}"
    );
    assert!(
        unknown.contains("no known consumer: counted under ip 127.0.0.1"),
        "{unknown}"
    );
}

#[test]
fn check_names_where_traces_go_and_refuses_an_unreadable_collector_ca() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{VALID}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 0.05\n"
    );
    let path = write(dir.path(), "proxy.toml", &text);
    let out = tollgate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "traces to http://127.0.0.1:4318/v1/traces as service tollgate, 5 % of new traces sampled"
        ),
        "{stdout}"
    );
    let text = format!(
        "{VALID}\n[telemetry]\notlp_endpoint = \"https://otel.example\"\ntls_ca = \"missing-ca.pem\"\n"
    );
    let path = write(dir.path(), "proxy.toml", &text);
    let out = tollgate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing-ca.pem"), "{stderr}");
}
