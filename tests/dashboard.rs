//! The dashboard in a real headless Chromium, driven over the DevTools protocol (the WebSocket
//! client the upgrade tests already use): while traffic flows, the rejected count the page shows
//! for a route is the one `/metrics` has, a burst of 429s makes the chart's rejected series rise
//! within 4 s, and a screenshot is saved as `target/dashboard.png`.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium with its DevTools endpoint, stopped (by PID) on drop.
struct Chromium {
    child: Child,
    devtools: String,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn start() -> Chromium {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1100,700",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium must be installed (the README's test command installs it)");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].trim().to_string());
                }
            }
        });
        let ws = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("chromium prints its DevTools address");
        let devtools = ws
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        Chromium {
            child,
            devtools,
            _profile: profile,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page of the browser, over its DevTools WebSocket.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Page {
    async fn open(chromium: &Chromium, url: &str) -> Page {
        let http = Http::new();
        let target = http
            .send(
                "PUT",
                &format!("http://{}/json/new?{url}", chromium.devtools),
                &[],
                bytes::Bytes::new(),
            )
            .await;
        assert_eq!(target.status, 200, "{:?}", target.body);
        let ws_url = target.json()["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        Page { ws, next: 1 }
    }

    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next;
        self.next += 1;
        let request = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a DevTools answer")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = message {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                if v["id"] == id {
                    return v["result"].clone();
                }
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }
}

/// Polls `expression` until it equals `want`, for 4 s at most.
async fn wait_until(page: &mut Page, expression: &str, want: serde_json::Value) {
    let started = std::time::Instant::now();
    loop {
        let got = page.eval(expression).await;
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{expression} is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rejected_in_metrics(scrape: &str) -> u64 {
    common::parse::metric(
        scrape,
        "tollgate_requests_total{route=\"login\",decision=\"rejected\"}",
    )
    .unwrap_or(0.0) as u64
}

#[tokio::test]
async fn the_page_shows_what_metrics_say_and_charts_a_burst_of_429s() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[upstreams.api]\ntargets = [\"{}\"]\n\n\
             [[routes]]\nname = \"login\"\nupstream = \"api\"\nmatch = {{ path = \"/login\" }}\n\
             limits = [{{ algorithm = \"fixed_window\", rate = \"5/hour\" }}]\n\n\
             [[routes]]\nname = \"rest\"\nupstream = \"api\"\n",
            upstream.target()
        ),
    )
    .unwrap();
    let bin = Binary::start(&config);
    let admin = bin.admin.unwrap();
    let chromium = Chromium::start();
    let mut page = Page::open(&chromium, &format!("http://{admin}/")).await;
    let http = Http::new();
    let login = format!("http://{}/login", bin.addr);
    let shown = "(() => { const e = document.querySelector('[data-route=\"login\"] [data-total=\"rejected\"]'); \
                 return e ? Number(e.textContent.replace(/[^0-9]/g, '')) : -1; })()";
    let rising = "(() => { const l = document.querySelector('[data-route=\"login\"] polyline.rejected'); \
                  if (!l) return false; const p = l.getAttribute('points').trim().split(' '); \
                  return Number(p[p.length - 1].split(',')[1]) < 58; })()";

    // Traffic under the limit: the page shows no rejection yet.
    for _ in 0..3 {
        assert_eq!(http.get(&login, &[]).await.status, 200);
    }
    wait_until(&mut page, shown, serde_json::json!(0)).await;

    // A burst of 429s: the count matches /metrics and the chart's rejected line rises, within 4 s.
    for _ in 0..12 {
        http.get(&login, &[]).await;
    }
    let scrape = http.scrape(admin).await;
    let rejected = rejected_in_metrics(&scrape);
    assert_eq!(rejected, 10, "2 more admitted, then 10 rejected");
    let started = std::time::Instant::now();
    loop {
        let count = page.eval(shown).await;
        let up = page.eval(rising).await;
        if count == rejected && up == true {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the page shows {count} rejected (metrics: {rejected}), chart rising: {up}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The upstream target, healthy, with its p99 time to a response head.
    let target = "(() => { const e = document.querySelector('[data-upstream=\"api\"] [data-target]'); \
                  return e ? [e.dataset.healthy, e.dataset.p99 !== '', e.textContent.includes('p99')] : null; })()";
    wait_until(&mut page, target, serde_json::json!(["true", true, true])).await;
    let shot = page
        .call(
            "Page.captureScreenshot",
            serde_json::json!({ "format": "png" }),
        )
        .await;
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    std::fs::write(&out, png).unwrap();
}
