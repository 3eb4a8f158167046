//! `tollgate replay`: golden output for a combined log and for tollgate's own JSON access log
//! (written by a real tollgate a moment before), time order across files, lines it cannot read,
//! and limits keyed by what logs do not carry.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::*;

const POLICY: &str = r#"[server]
listen = "127.0.0.1:0"

[upstreams.api]
targets = ["http://127.0.0.1:9"]

[[routes]]
name = "login"
upstream = "api"
match = { path = "/login", methods = ["POST"] }
limits = [{ by = "ip", algorithm = "fixed_window", rate = "2/min" }]

[[routes]]
name = "api"
upstream = "api"
match = { path_prefix = "/v1/" }
limits = [
  { by = "header:x-api-key", algorithm = "token_bucket", rate = "1/s", burst = 3 },
  { by = "global", algorithm = "sliding_log", rate = "100/hour" },
]
"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
    path
}

fn replay(config: &Path, files: &[&Path]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("replay")
        .arg("--config")
        .arg(config)
        .args(files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A combined-format line at `second` past 2026-12-01T10:00:00Z.
fn line(ip: &str, second: u32, method: &str, path: &str) -> String {
    format!(
        "{ip} - - [01/Dec/2026:10:{:02}:{:02} +0000] \"{method} {path} HTTP/1.1\" 200 12 \"-\" \"test\"\n",
        second / 60,
        second % 60
    )
}

#[test]
fn a_combined_log_replays_in_time_order_with_golden_output() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "proxy.toml", POLICY);
    // Two files whose lines interleave in time; replay must merge them.
    let mut a = String::new();
    let mut b = String::new();
    for i in 0..5 {
        // 203.0.113.7 logs in five times within a minute: 2 admitted, 3 rejected.
        a.push_str(&line("203.0.113.7", i * 2, "POST", "/login"));
    }
    // 198.51.100.2 once, in the same minute: admitted.
    b.push_str(&line("198.51.100.2", 3, "POST", "/login"));
    // Six API calls from one IP in one second: a burst of 3, then 3 rejected.
    for _ in 0..6 {
        b.push_str(&line("203.0.113.9", 30, "GET", "/v1/users"));
    }
    // Two seconds later one more token has come back (1/s, the bucket refills).
    b.push_str(&line("203.0.113.9", 32, "GET", "/v1/users"));
    b.push_str(&line("192.0.2.1", 40, "GET", "/elsewhere"));
    b.push_str("this is not a log line\n");
    let fa = write(dir.path(), "a.log", &a);
    let fb = write(dir.path(), "b.log", &b);
    let out = replay(&config, &[&fb, &fa]);
    let expected = format!(
        "14 requests from 2026-12-01T10:00:00Z to 2026-12-01T10:00:40Z, replayed in time order on the memory store\n\
         1 line(s) not understood (neither combined nor tollgate JSON), the first at {}:10\n\
         route login: 6 requests, 3 admitted, 3 rejected\n\
         \x20 login (fixed_window 2/min by ip): seen 6, admitted 3, rejected 3\n\
         \x20   most rejected: 203.0.113.7 3\n\
         route api: 7 requests, 4 admitted, 3 rejected\n\
         \x20 api/0 (token_bucket 1/s by header:x-api-key): seen 7, admitted 4, rejected 3\n\
         \x20   header:x-api-key is not in the log: counted by client IP instead\n\
         \x20   most rejected: 203.0.113.9 3\n\
         \x20 api/1 (sliding_log 100/hour by global): seen 7, admitted 7, rejected 0\n\
         no route: 1 requests\n",
        fb.display()
    );
    assert_eq!(out, expected);
}

#[tokio::test]
async fn tollgates_own_json_access_log_replays_to_what_it_decided() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let live = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\naccess_log = true\n\n[upstreams.api]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"api\"\nmatch = {{ host = \"api.example.com\" }}\n\
         limits = [{{ algorithm = \"fixed_window\", rate = \"3/hour\" }}]\n",
        upstream.target()
    );
    let config = write(dir.path(), "live.toml", &live);
    let mut bin = Binary::start(&config);
    let http = Http::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            http.get(
                &format!("http://{}/x", bin.addr),
                &[("host", "api.example.com")],
            )
            .await
            .status,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    bin.signal("TERM");
    bin.wait_exit(std::time::Duration::from_secs(10));
    let log: String = bin.logs().iter().map(|v| format!("{v}\n")).collect();
    assert!(
        log.contains("\"host\":\"api.example.com\""),
        "the access log carries the host"
    );
    let file = write(dir.path(), "access.json", &log);
    let out = replay(&config, &[&file]);
    assert!(
        out.contains("route api: 5 requests, 3 admitted, 2 rejected\n"),
        "the replay decides as tollgate did:\n{out}"
    );
    assert!(
        !out.contains("not understood"),
        "other log events are skipped quietly:\n{out}"
    );
}
