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
