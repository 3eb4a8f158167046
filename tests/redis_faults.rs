//! Distributed and fault-tolerant limiting against real redis-servers on loopback.
//!
//! - Outages, bounded: Redis paused (`CLIENT PAUSE .. WRITE`) and stopped (SIGSTOP for ~3 s
//!   under a steady request loop). Every request waits at most the store timeout, the route's
//!   `on_store_error` applies (allow: the upstream's 200 without rate-limit headers; deny: 503
//!   with `Retry-After: 1`), the circuit breaker makes most requests fail fast, nothing piles up
//!   (Redis connections, runtime tasks, in-flight requests, memory) and limits are decided
//!   again within seconds of Redis returning, without restarting tollgate.
//! - Flood protection: a key over its limit is answered from the local over-limit cache; Redis
//!   sees about one call per key per retry-after period (`INFO commandstats`), other keys keep
//!   their exact limit during the flood.
//! - Clock skew: a replica under `faketime -f '+30s'` and one in process share a Redis; exactly
//!   the limit is admitted for every algorithm (time comes from Redis).
//! - Connection security: TLS Redis with a private CA, mutual TLS, ACL users by URL or by
//!   `username` + `password_env`, a wrong password, and passwords never in `check` output or logs.
//! - Key hygiene: fixed-length hashed names, a TTL on every key, no API key in clear, and the
//!   Redis memory that 100,000 identities take per algorithm.
//!
//! Timing-sensitive tests and the bulk-memory test take [`ALONE`] exclusively so that they do
//! not measure each other; the rest share it.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use tollgate::limiter::algorithm::Algorithm;
use tollgate::limiter::{Item, Store};
use tollgate::policy::{RedisNodes, RedisSettings, Secret, StoreSettings};

/// Exclusive for tests that measure time or load the machine; shared for the others.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The store timeout of the fault tests.
const TIMEOUT_MS: u64 = 150;
/// What a request may take beyond the store timeout (proxying, a loaded 2-core machine).
const SLACK_MS: u64 = 350;
/// How long one request may take while the store fails.
const BOUND: Duration = Duration::from_millis(TIMEOUT_MS + SLACK_MS);
/// The longest breaker back-off (2 s) plus a probe's timeout plus slack.
const RECOVERY_BOUND: Duration = Duration::from_millis(2000 + TIMEOUT_MS + 1000);

const PASSWORD: &str = "s3cret";

/// `open` fails open, `closed` fails closed (both with limits no test reaches), `limited`
/// admits 3 per key and fails closed.
const ROUTES: &str = "[[routes]]\nname = \"open\"\nupstream = \"api\"\nmatch = { path = \"/open\" }\non_store_error = \"allow\"\nlimits = [{ by = \"header:x-k\", algorithm = \"gcra\", rate = \"100000/s\", burst = 100000 }]\n\n\
[[routes]]\nname = \"closed\"\nupstream = \"api\"\nmatch = { path = \"/closed\" }\non_store_error = \"deny\"\nlimits = [{ by = \"header:x-k\", algorithm = \"fixed_window\", rate = \"1000000/hour\" }]\n\n\
[[routes]]\nname = \"limited\"\nupstream = \"api\"\nmatch = { path = \"/limited\" }\non_store_error = \"deny\"\nlimits = [{ by = \"header:x-k\", algorithm = \"gcra\", rate = \"3/hour\", burst = 3 }]\n";

/// A config on `url` with [`ROUTES`]; `extra` adds lines to `[store]`.
fn redis_config(upstream: &Upstream, url: &str, extra: &str) -> String {
    redis_config_with(upstream, url, extra, ROUTES)
}

fn redis_config_with(upstream: &Upstream, url: &str, extra: &str, routes: &str) -> String {
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{url}\"\ntimeout = \"{TIMEOUT_MS}ms\"\nprefix = \"rf\"\n{extra}"
    );
    config(upstream, &store, routes)
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// Sends a signal to a process this test started, by its id.
fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{name} {pid} failed");
}

/// A process stopped with SIGSTOP; continued with SIGCONT when thawed or dropped, so that a
/// failing test never leaves it stopped (and its own drop can then kill it).
struct Frozen {
    pid: u32,
    frozen: bool,
}

impl Frozen {
    fn stop(pid: u32) -> Frozen {
        signal(pid, "STOP");
        Frozen { pid, frozen: true }
    }

    fn thaw(&mut self) {
        if self.frozen {
            signal(self.pid, "CONT");
            self.frozen = false;
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.frozen {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.pid.to_string())
                .status();
        }
    }
}

use common::parse::{evalsha_calls, info, info_u64};

/// Redis's clock, in µs since the epoch.
fn redis_time_us(conn: &mut redis::Connection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(conn).expect("TIME");
    secs * 1_000_000 + micros
}

/// The value of one sample line (`series` exactly, labels included) of a metrics text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics:\n{text}"))
}

/// This process's resident memory (VmRSS), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Stops an in-process tollgate after dropping the test's client: a connection the client
/// opened but never sent a request on would hold tollgate's drain for the header read timeout
/// (10 s; the sniffing of a new connection's protocol does not watch for shutdown).
async fn stop(tg: tollgate::Running, http: Http) {
    drop(http);
    tg.stop().await;
}

async fn timed(http: &Http, url: &str, key: &str) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = http.get(url, &[("x-k", key)]).await;
    (reply, started.elapsed())
}

/// What a response of the `open` or `closed` route shows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Decided by the store: rate-limit headers present.
    Decided,
    /// `on_store_error = "allow"`: the upstream's 200, no rate-limit headers.
    FailedOpen,
    /// `on_store_error = "deny"`: 503, `Retry-After: 1`, problem+json.
    FailedClosed,
}

fn classify(route: &str, reply: &Reply) -> Result<Seen, String> {
    let headers = reply.header("ratelimit").is_some() || reply.header("ratelimit-policy").is_some();
    match (route, reply.status) {
        (_, 200) if headers => Ok(Seen::Decided),
        ("open", 200) if reply.header("x-upstream") == Some("yes") => Ok(Seen::FailedOpen),
        ("closed" | "limited", 503)
            if reply.header("retry-after") == Some("1")
                && !headers
                && serde_json::from_slice::<serde_json::Value>(&reply.body)
                    .is_ok_and(|v| v["status"] == 503) =>
        {
            Ok(Seen::FailedClosed)
        }
        _ => Err(format!(
            "{route}: unexpected {} {:?} {}",
            reply.status,
            reply.headers,
            String::from_utf8_lossy(&reply.body)
        )),
    }
}

/// The policy a route must apply while the store fails.
fn failed(route: &str) -> Seen {
    if route == "open" {
        Seen::FailedOpen
    } else {
        Seen::FailedClosed
    }
}

/// Time until both `open` and `closed` are decided by the store again (always with the key
/// `recovered`: at most two keys in Redis).
async fn until_decided(http: &Http, base: &str) -> Duration {
    eventually(Duration::from_secs(10), || {
        let http = http.clone();
        let base = base.to_string();
        async move {
            for route in ["open", "closed"] {
                let reply = http
                    .get(&format!("{base}/{route}"), &[("x-k", "recovered")])
                    .await;
                if classify(route, &reply) != Ok(Seen::Decided) {
                    return false;
                }
            }
            true
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The tollgate binary, optionally under a wrapper (faketime), with its raw log lines.

struct Spawned {
    child: Child,
    /// The tollgate process: `child` itself, or the program the wrapper forked.
    pid: u32,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

/// The first child of `parent` (faketime forks the program it runs and waits for it).
fn child_of(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no child of {parent}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Spawned {
    /// `[wrapper..] tollgate --log-format json run --config PATH`, waited for until it serves.
    fn start(wrapper: &[&str], config: &Path, env: &[(&str, &str)], rust_log: &str) -> Spawned {
        use std::io::BufRead;
        let bin = env!("CARGO_BIN_EXE_tollgate");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {wrapper:?} {bin}: {e}"));
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let parsed = serde_json::from_str::<serde_json::Value>(&line);
                // Kept before readiness is told, so a reader woken by it sees this line.
                sink.lock().unwrap().push(line);
                if let Ok(value) = parsed
                    && value["message"] == "tollgate serving"
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(value);
                }
            }
        });
        let serving = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tollgate ({wrapper:?}) did not start; logs:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
        };
        let pid = if wrapper.is_empty() {
            child.id()
        } else {
            child_of(child.id())
        };
        Spawned {
            addr: serving["listen"].as_str().unwrap().parse().unwrap(),
            child,
            pid,
            lines,
        }
    }

    fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.pid != self.child.id() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.pid.to_string())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Outages.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause_write_bounds_every_request_by_the_timeout_and_recovers_after_it() {
    let _alone = ALONE.write().await;
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let tg = start_tollgate(&redis_config(&upstream, &redis.url(), "")).await;
    let http = Http::new();
    let base = format!("http://{}", tg.addr);
    for route in ["open", "closed"] {
        let (reply, _) = timed(&http, &format!("{base}/{route}"), "warm").await;
        assert_eq!(classify(route, &reply), Ok(Seen::Decided));
    }

    let mut ctl = redis.conn();
    let keys_before: u64 = redis::cmd("DBSIZE").query(&mut ctl).unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "30000", "WRITE"])
        .query(&mut ctl)
        .unwrap();
    let paused = Instant::now();
    let (mut n, mut waited, mut worst) = (0u64, 0u64, Duration::ZERO);
    while paused.elapsed() < Duration::from_millis(1500) {
        for route in ["open", "closed"] {
            let (reply, took) = timed(&http, &format!("{base}/{route}"), &format!("p{n}")).await;
            assert_eq!(
                classify(route, &reply),
                Ok(failed(route)),
                "{route} while Redis is paused"
            );
            assert!(took <= BOUND, "{route} took {took:?} while paused");
            worst = worst.max(took);
            if took >= Duration::from_millis(TIMEOUT_MS) {
                waited += 1;
            }
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut ctl).unwrap();
    let recovery = until_decided(&http, &base).await;
    // Each request that waited had sent its EVALSHA before timing out: Redis ran it after the
    // pause (each paused request had a key of its own; recovery added at most two).
    let keys_after: u64 = redis::cmd("DBSIZE").query(&mut ctl).unwrap();
    let late = keys_after.saturating_sub(keys_before + 2);
    eprintln!(
        "CLIENT PAUSE WRITE: {n} requests over 1.5 s ({waited} waited for the timeout, the rest failed fast behind the breaker), \
         slowest {worst:?} (timeout {TIMEOUT_MS} ms); decided again {recovery:?} after UNPAUSE; \
         {late} decisions that had timed out were applied by Redis after the pause"
    );
    assert!(recovery < RECOVERY_BOUND, "recovery took {recovery:?}");
    stop(tg, http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_outage_fails_fast_behind_the_breaker_without_pile_up_and_recovers_after_sigcont() {
    const WORKERS: usize = 4;
    const POOL: u64 = 4;
    const OUTAGE: Duration = Duration::from_secs(3);
    let _alone = ALONE.write().await;
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let tg = start_tollgate(&redis_config(
        &upstream,
        &redis.url(),
        &format!("pool_size = {POOL}"),
    ))
    .await;
    let http = Http::new();
    let base = format!("http://{}", tg.addr);
    // Warm up concurrently, so the pool holds what it needs under this load.
    let warm: Vec<_> = (0..2 * WORKERS)
        .map(|i| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let reply = http
                    .get(&format!("{base}/open"), &[("x-k", &format!("w{i}"))])
                    .await;
                classify("open", &reply)
            })
        })
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap(), Ok(Seen::Decided));
    }
    let mut ctl = redis.conn();
    let own = 1; // `ctl`
    let clients_before = info_u64(&info(&mut ctl, "clients"), "connected_clients") - own;
    let received_before = info_u64(&info(&mut ctl, "stats"), "total_connections_received");
    assert_eq!(
        metric(&tg.app.metrics.render(), "tollgate_store_circuit_open"),
        0.0
    );

    let mut frozen = Frozen::stop(redis.pid());
    let stopped = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut n = 0usize;
                while stopped.elapsed() < OUTAGE && n < 20_000 {
                    let route = if (n + w).is_multiple_of(2) {
                        "open"
                    } else {
                        "closed"
                    };
                    let at = stopped.elapsed();
                    let (reply, took) =
                        timed(&http, &format!("{base}/{route}"), &format!("s{w}-{n}")).await;
                    out.push((at, took, route, classify(route, &reply)));
                    n += 1;
                    // A steady loop, not a spin: ~150 requests a second per worker.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                out
            })
        })
        .collect();
    // Sample the breaker gauge, in-flight requests and live tasks through the outage.
    let mut gauge = Vec::new();
    let mut tasks = Vec::new();
    let mut max_in_flight = 0f64;
    while stopped.elapsed() < OUTAGE - Duration::from_millis(100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = tg.app.metrics.render();
        gauge.push((
            stopped.elapsed(),
            metric(&text, "tollgate_store_circuit_open"),
        ));
        max_in_flight = max_in_flight.max(metric(&text, "tollgate_in_flight_requests"));
        tasks.push((
            stopped.elapsed(),
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            rss_kib(),
        ));
    }
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.unwrap());
    }
    frozen.thaw();
    // Right after SIGCONT Redis first accepts whatever queued in its backlog: counted here.
    let clients_after = info_u64(&info(&mut ctl, "clients"), "connected_clients") - own;
    let received_after = info_u64(&info(&mut ctl, "stats"), "total_connections_received");
    let recovery = until_decided(&http, &base).await;
    let circuit_after = metric(&tg.app.metrics.render(), "tollgate_store_circuit_open");

    let total = samples.len();
    let mut worst = Duration::ZERO;
    let mut fast = 0;
    for (at, took, route, seen) in &samples {
        assert_eq!(
            seen,
            &Ok(failed(route)),
            "{route} at {at:?} into the outage"
        );
        assert!(*took <= BOUND, "{route} at {at:?} took {took:?}");
        worst = worst.max(*took);
        if *took < Duration::from_millis(TIMEOUT_MS / 3) {
            fast += 1;
        }
    }
    let slow = total - fast;
    let open_from = gauge.iter().find(|(_, v)| *v == 1.0).map(|(t, _)| *t);
    let (_, early_tasks, early_rss) = *tasks
        .iter()
        .find(|(t, _, _)| *t >= Duration::from_millis(500))
        .expect("a task sample");
    let (_, late_tasks, late_rss) = *tasks.last().expect("a task sample");
    eprintln!(
        "SIGSTOP {OUTAGE:?}: {total} requests, {fast} fast (< {} ms), {slow} waited, slowest {worst:?}; \
         circuit open from {open_from:?}; max in flight {max_in_flight}; live tasks {early_tasks} -> {late_tasks}, RSS {early_rss} -> {late_rss} KiB; \
         tollgate's Redis connections {clients_before} before, {clients_after} after SIGCONT, {} new during the outage; \
         decided again {recovery:?} after SIGCONT",
        TIMEOUT_MS / 3,
        received_after - received_before
    );
    assert!(total > 100, "a steady loop: {total}");
    assert!(
        fast * 10 >= total * 9,
        "most requests fail fast once the breaker opens: {fast} of {total}"
    );
    assert!(slow <= 25, "{slow} requests waited for the store");
    let open_from = open_from.expect("tollgate_store_circuit_open reached 1 during the outage");
    assert!(
        open_from <= Duration::from_secs(1),
        "breaker opened only at {open_from:?}"
    );
    for (t, v) in &gauge {
        if *t >= open_from {
            assert_eq!(*v, 1.0, "circuit gauge at {t:?} into the outage");
        }
    }
    assert!(
        max_in_flight <= WORKERS as f64,
        "in flight piled up: {max_in_flight}"
    );
    assert!(
        late_tasks <= early_tasks + 8,
        "tasks piled up: {early_tasks} -> {late_tasks}"
    );
    assert!(
        late_rss <= early_rss + 32 * 1024,
        "memory grew during the outage: {early_rss} -> {late_rss} KiB"
    );
    assert!(
        clients_after <= POOL,
        "Redis connections piled up: {clients_after} (pool {POOL})"
    );
    assert!(
        received_after - received_before <= POOL,
        "{} connection attempts during the outage",
        received_after - received_before
    );
    assert!(recovery < RECOVERY_BOUND, "recovery took {recovery:?}");
    assert_eq!(circuit_after, 0.0, "circuit closed after recovery");
    assert_eq!(
        metric(&tg.app.metrics.render(), "tollgate_in_flight_requests"),
        0.0
    );
    stop(tg, http).await;
}

// ---------------------------------------------------------------------------------------------
// Flood protection.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_key_is_answered_locally_while_other_keys_keep_their_exact_limit() {
    const WORKERS: usize = 4;
    const OTHERS: usize = 20;
    const QUOTA: u64 = 5;
    const FLOOD: Duration = Duration::from_secs(3);
    let _alone = ALONE.write().await;
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let routes = format!(
        "[[routes]]\nname = \"flood\"\nupstream = \"api\"\nmatch = {{ path = \"/flood\" }}\non_store_error = \"deny\"\nlimits = [{{ by = \"header:x-k\", algorithm = \"fixed_window\", rate = \"{QUOTA}/s\" }}]\n"
    );
    let tg = start_tollgate(&redis_config_with(&upstream, &redis.url(), "", &routes)).await;
    let http = Http::new();
    let url = format!("http://{}/flood", tg.addr);
    // Loads the script (a NOSCRIPT round counts as an EVALSHA call too).
    assert_eq!(http.get(&url, &[("x-k", "warm")]).await.status, 200);

    let mut ctl = redis.conn();
    let calls_before = evalsha_calls(&mut ctl);
    let local_before = metric(&tg.app.metrics.render(), "tollgate_local_denials_total");
    let t_start = redis_time_us(&mut ctl);
    let started = Instant::now();
    let hot: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let (mut ok, mut rejected, mut n) = (0u64, 0u64, 0u32);
                while started.elapsed() < FLOOD && n < 200_000 {
                    match http.get(&url, &[("x-k", "hot")]).await.status {
                        200 => ok += 1,
                        429 => rejected += 1,
                        other => panic!("hot key got {other}"),
                    }
                    n += 1;
                }
                (ok, rejected)
            })
        })
        .collect();
    // One second into the flood, other keys send their burst inside one aligned window of
    // Redis's clock (fixed windows are aligned on it): each must get exactly its quota.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let into = redis_time_us(&mut ctl) % 1_000_000;
    tokio::time::sleep(Duration::from_micros(1_000_000 - into + 30_000)).await;
    let window_at_start = redis_time_us(&mut ctl) / 1_000_000;
    let others: Vec<_> = (0..OTHERS)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..8 {
                    statuses.push(
                        http.get(&url, &[("x-k", &format!("other-{i}"))])
                            .await
                            .status,
                    );
                }
                statuses
            })
        })
        .collect();
    let mut other_statuses = Vec::new();
    for o in others {
        other_statuses.push(o.await.unwrap());
    }
    let window_at_end = redis_time_us(&mut ctl) / 1_000_000;
    let (mut hot_ok, mut hot_rejected) = (0u64, 0u64);
    for h in hot {
        let (ok, rejected) = h.await.unwrap();
        hot_ok += ok;
        hot_rejected += rejected;
    }
    let t_end = redis_time_us(&mut ctl);
    let calls = evalsha_calls(&mut ctl) - calls_before;
    let local = metric(&tg.app.metrics.render(), "tollgate_local_denials_total") - local_before;

    assert_eq!(
        window_at_start, window_at_end,
        "the other keys' burst straddled a window: the machine is too slow for this check"
    );
    let expected: Vec<u16> = [200; QUOTA as usize].into_iter().chain([429; 3]).collect();
    for (i, statuses) in other_statuses.iter().enumerate() {
        assert_eq!(statuses, &expected, "other-{i} during the flood");
    }
    let windows = t_end / 1_000_000 - t_start / 1_000_000 + 1;
    let admitted = hot_ok + OTHERS as u64 * QUOTA;
    let rejected = hot_rejected + OTHERS as u64 * 3;
    let redis_rejections = calls - admitted;
    // Sequential others: QUOTA admissions and one rejection each reach Redis, then the cache.
    let hot_redis_rejections = redis_rejections.saturating_sub(OTHERS as u64);
    eprintln!(
        "flood: {} requests from one key over {FLOOD:?} ({windows} windows of 1 s): {hot_ok} admitted, {hot_rejected} rejected, \
         {hot_redis_rejections} of them by Redis ({:.5} Redis calls per rejected request; {:.1} per window); \
         all keys: {calls} EVALSHA for {admitted} admitted + {rejected} rejected ({:.5} Redis calls per rejected request), \
         tollgate_local_denials_total +{local}; {OTHERS} other keys: exactly {QUOTA} admitted each",
        hot_ok + hot_rejected,
        hot_redis_rejections as f64 / hot_rejected as f64,
        hot_redis_rejections as f64 / windows as f64,
        redis_rejections as f64 / rejected as f64,
    );
    assert!(hot_rejected > 1000, "a flood: {hot_rejected} rejections");
    assert!(
        hot_ok <= QUOTA * windows && hot_ok + 2 * QUOTA >= QUOTA * windows,
        "hot key admitted {hot_ok} in {windows} windows"
    );
    assert_eq!(
        local as u64,
        rejected - redis_rejections,
        "every rejection Redis did not decide came from the local cache"
    );
    assert!(
        hot_redis_rejections <= 2 * WORKERS as u64 * windows,
        "Redis decided {hot_redis_rejections} rejections of the hot key in {windows} windows"
    );
    stop(tg, http).await;
}

// ---------------------------------------------------------------------------------------------
// Clock skew.

fn require_faketime() {
    match Command::new("faketime")
        .args(["-f", "+0s", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "`faketime -f +0s true` failed ({s}): the clock-skew test needs a working faketime"
        ),
        Err(e) => panic!(
            "faketime is not installed ({e}): the clock-skew test runs a replica under `faketime -f '+30s'`; \
             install it (apt-get install faketime), as the README's test command does"
        ),
    }
}

/// Seconds of the day of an RFC 3339 UTC timestamp (`2026-01-02T03:04:05.678Z`).
fn seconds_of_day(timestamp: &str) -> f64 {
    let time = timestamp.split('T').nth(1).expect("a T in the timestamp");
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().unwrap().parse().unwrap();
    let m: f64 = parts.next().unwrap().parse().unwrap();
    let s: f64 = parts.next().unwrap().parse().unwrap();
    h * 3600.0 + m * 60.0 + s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_skewed_clocks_admit_exactly_the_limit_for_every_algorithm() {
    require_faketime();
    let _shared = ALONE.read().await;
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    // Windows shorter than the skew: a replica deciding by its own clock would count in other
    // windows, or find buckets refilled, and admit more.
    let algorithms = [
        ("fixed_window", "rate = \"10/10s\""),
        ("sliding_window", "rate = \"10/10s\""),
        ("sliding_log", "rate = \"10/10s\""),
        ("token_bucket", "rate = \"1/5s\", burst = 10"),
        ("gcra", "rate = \"1/5s\", burst = 10"),
    ];
    let routes: String = algorithms
        .iter()
        .map(|(name, rate)| {
            format!(
                "[[routes]]\nname = \"{name}\"\nupstream = \"api\"\nmatch = {{ path = \"/{name}\" }}\non_store_error = \"deny\"\nlimits = [{{ by = \"global\", algorithm = \"{name}\", {rate} }}]\n\n"
            )
        })
        .collect();
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"1s\"\nprefix = \"skew\"",
        redis.url()
    );
    let text = config(&upstream, &store, &routes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skew.toml");
    std::fs::write(&path, &text).unwrap();
    let skewed = Spawned::start(&["faketime", "-f", "+30s"], &path, &[], "info");
    let local = start_tollgate(&text).await;

    // The wrapped replica's clock really is 30 s ahead: its log timestamps say so.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let logged = skewed
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["timestamp"].as_str().map(str::to_string))
        .expect("a timestamp in the JSON logs");
    let mut skew = seconds_of_day(&logged) - (now.as_secs_f64() % 86_400.0);
    if skew < -43_200.0 {
        skew += 86_400.0;
    }
    assert!(
        (25.0..40.0).contains(&skew),
        "faketime replica's clock is {skew:.1} s off (log timestamp {logged})"
    );

    // Keep the traffic inside one 10 s window of Redis's clock.
    let mut ctl = redis.conn();
    let into = redis_time_us(&mut ctl) % 10_000_000;
    if into > 6_000_000 {
        tokio::time::sleep(Duration::from_micros(10_000_000 - into + 100_000)).await;
    }
    let window = redis_time_us(&mut ctl) / 10_000_000;
    let replicas = [skewed.addr, local.addr];
    const PER_ROUTE: usize = 30;
    let jobs = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let jobs = jobs.clone();
            let http = Http::new();
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let job = jobs.fetch_add(1, Ordering::Relaxed);
                    if job >= PER_ROUTE * algorithms.len() {
                        break;
                    }
                    let (route, replica) = (job % algorithms.len(), job % 2);
                    let url = format!("http://{}/{}", replicas[replica], algorithms[route].0);
                    out.push((route, replica, http.get(&url, &[]).await.status));
                }
                out
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in clients {
        results.extend(c.await.unwrap());
    }
    assert_eq!(
        redis_time_us(&mut ctl) / 10_000_000,
        window,
        "the traffic straddled a 10 s window: the machine is too slow for this check"
    );
    let mut by_replica = [0usize; 2];
    for (i, (name, _)) in algorithms.iter().enumerate() {
        let mine: Vec<_> = results.iter().filter(|(r, _, _)| *r == i).collect();
        assert_eq!(mine.len(), PER_ROUTE);
        for (_, _, status) in &mine {
            assert!(*status == 200 || *status == 429, "{name}: status {status}");
        }
        let admitted: Vec<_> = mine.iter().filter(|(_, _, s)| *s == 200).collect();
        for (_, replica, _) in &admitted {
            by_replica[*replica] += 1;
        }
        eprintln!(
            "clock skew +30 s: {name}: {} of {PER_ROUTE} admitted ({} by the skewed replica)",
            admitted.len(),
            admitted.iter().filter(|(_, r, _)| *r == 0).count()
        );
        assert_eq!(
            admitted.len(),
            10,
            "{name}: exactly the limit across both replicas"
        );
    }
    assert!(
        by_replica.iter().all(|n| *n > 0),
        "both replicas admitted requests: {by_replica:?}"
    );
    local.stop().await;
    drop(skewed);
}

// ---------------------------------------------------------------------------------------------
// Connection security: TLS, mutual TLS, ACL users.

/// Sends `limited` requests for one key: 3 admitted then 429, decided by the store.
async fn assert_enforced(tg: &tollgate::Running, key: &str, what: &str) {
    let http = Http::new();
    let url = format!("http://{}/limited", tg.addr);
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let reply = http.get(&url, &[("x-k", key)]).await;
            assert!(
                reply.header("ratelimit").is_some(),
                "{what}: decided by the store: {reply:?}"
            );
            v.push(reply.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 200, 429, 429], "{what}");
    let text = tg.app.metrics.render();
    assert_eq!(
        metric(
            &text,
            "tollgate_requests_total{route=\"limited\",decision=\"store_error\"}"
        ),
        0.0,
        "{what}"
    );
}

/// `limited` fails closed within the timeout: the store cannot be used.
async fn assert_store_fails(tg: &tollgate::Running, what: &str) {
    let http = Http::new();
    for route in ["open", "closed", "limited"] {
        let (reply, took) = timed(&http, &format!("http://{}/{route}", tg.addr), "x").await;
        assert_eq!(
            classify(route, &reply),
            Ok(failed(route)),
            "{what}: {route}"
        );
        assert!(took <= BOUND, "{what}: {route} took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_a_private_ca_enforces_limits() {
    let _shared = ALONE.read().await;
    let redis = Redis::start_tls(false);
    let pki = &redis.tls().pki;
    let upstream = Upstream::start().await;
    let ca = format!("tls_ca = \"{}\"", pki.path("ca.pem").display());
    let tg = start_tollgate(&redis_config(&upstream, &redis.url(), &ca)).await;
    assert_enforced(&tg, "tls", "rediss:// with tls_ca").await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("rf:*")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(
        keys.len(),
        1,
        "the decision is stored in the TLS Redis: {keys:?}"
    );
    tg.stop().await;

    // Without the private CA the server is not trusted: the store fails, routes follow policy.
    let tg = start_tollgate(&redis_config(&upstream, &redis.url(), "")).await;
    assert_store_fails(&tg, "rediss:// without tls_ca").await;
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_redis_accepts_tollgate_with_its_client_certificate_only() {
    let _shared = ALONE.read().await;
    let redis = Redis::start_tls(true);
    let pki = &redis.tls().pki;
    let upstream = Upstream::start().await;
    let ca = format!("tls_ca = \"{}\"", pki.path("ca.pem").display());
    let mutual = format!(
        "{ca}\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    );
    let tg = start_tollgate(&redis_config(&upstream, &redis.url(), &mutual)).await;
    assert_enforced(&tg, "mtls", "mutual TLS with tls_cert and tls_key").await;
    tg.stop().await;

    let tg = start_tollgate(&redis_config(&upstream, &redis.url(), &ca)).await;
    assert_store_fails(&tg, "mutual TLS without a client certificate").await;
    tg.stop().await;
}

/// A Redis whose only user is `tollgate` with [`PASSWORD`] (`default` is off).
fn acl_redis() -> Redis {
    let redis = Redis::start();
    let mut conn = redis.conn();
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "tollgate",
            "on",
            &format!(">{PASSWORD}"),
            "~*",
            "+@all",
        ])
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"])
        .query(&mut conn)
        .unwrap();
    // A new connection without credentials is refused.
    let anonymous = redis::Client::open(redis.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    assert!(anonymous.is_err(), "default user is off: {anonymous:?}");
    redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_by_url_or_by_username_and_password_env_and_a_wrong_password_follows_policy() {
    {
        // Nothing else in this binary runs while the environment changes.
        let _alone = ALONE.write().await;
        // SAFETY: every other test of this binary is parked on ALONE.
        unsafe { std::env::set_var("TG_TEST_PW", PASSWORD) };
    }
    let _shared = ALONE.read().await;
    let redis = acl_redis();
    let upstream = Upstream::start().await;

    let in_url = format!("redis://tollgate:{PASSWORD}@127.0.0.1:{}/0", redis.port);
    let tg = start_tollgate(&redis_config(&upstream, &in_url, "")).await;
    assert_enforced(&tg, "url", "password in the URL").await;
    tg.stop().await;

    let tg = start_tollgate(&redis_config(
        &upstream,
        &redis.url(),
        "username = \"tollgate\"\npassword_env = \"TG_TEST_PW\"",
    ))
    .await;
    assert_enforced(&tg, "env", "username + password_env").await;
    tg.stop().await;

    let wrong = format!("redis://tollgate:not-{PASSWORD}@127.0.0.1:{}/0", redis.port);
    let tg = start_tollgate(&redis_config(&upstream, &wrong, "")).await;
    assert_store_fails(&tg, "wrong password").await;
    tg.stop().await;

    let tg = start_tollgate(&redis_config(&upstream, &redis.url(), "")).await;
    assert_store_fails(&tg, "no credentials, default user off").await;
    tg.stop().await;

    let mut conn = redis::Client::open(in_url)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("rf:*").query(&mut conn).unwrap();
    assert_eq!(
        keys.len(),
        2,
        "one key per authenticated tollgate: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passwords_never_appear_in_check_output_or_logs() {
    let _shared = ALONE.read().await;
    const URL_SECRET: &str = "urlPw-Q7v9Lk2";
    const ENV_SECRET: &str = "envPw-X3m8Rt5";
    let mut redis = acl_redis();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let by_url = dir.path().join("by-url.toml");
    let by_env = dir.path().join("by-env.toml");
    std::fs::write(
        &by_url,
        redis_config(
            &upstream,
            &format!("redis://tollgate:{URL_SECRET}@127.0.0.1:{}/0", redis.port),
            "",
        ),
    )
    .unwrap();
    std::fs::write(
        &by_env,
        redis_config(
            &upstream,
            &redis.url(),
            "username = \"tollgate\"\npassword_env = \"TG_LOG_PW\"",
        ),
    )
    .unwrap();
    let env = [("TG_LOG_PW", ENV_SECRET)];

    for path in [&by_url, &by_env] {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check", "--config"])
            .arg(path)
            .envs(env)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "check {}: {text}", path.display());
        for secret in [URL_SECRET, ENV_SECRET] {
            assert!(!text.contains(secret), "check prints a password:\n{text}");
        }
    }

    // Debug logging, a wrong password, then an outage: as many error paths as possible.
    let binaries = [
        Spawned::start(&[], &by_url, &env, "debug"),
        Spawned::start(&[], &by_env, &env, "debug"),
    ];
    let http = Http::new();
    let failures = "rate-limit store failed";
    let drive = |phase: &'static str| {
        let http = http.clone();
        let addrs: Vec<SocketAddr> = binaries.iter().map(|b| b.addr).collect();
        async move {
            for addr in addrs {
                for route in ["open", "closed"] {
                    let reply = http
                        .get(&format!("http://{addr}/{route}"), &[("x-k", phase)])
                        .await;
                    assert_eq!(
                        classify(route, &reply),
                        Ok(failed(route)),
                        "{phase}: {route}"
                    );
                }
            }
        }
    };
    drive("wrong password").await;
    let before: Vec<usize> = binaries.iter().map(|b| b.count(failures)).collect();
    assert!(
        before.iter().all(|n| *n > 0),
        "store failures are logged: {before:?}"
    );
    redis.kill();
    // Store-failure lines are throttled to one a second: drive until each binary logged one
    // more, now for the outage.
    eventually(Duration::from_secs(5), || {
        let drive = drive("outage");
        let binaries = &binaries;
        let before = &before;
        async move {
            drive.await;
            binaries
                .iter()
                .zip(before)
                .all(|(b, n)| b.count(failures) > *n)
        }
    })
    .await;
    for (binary, name) in binaries.iter().zip(["password in the URL", "password_env"]) {
        let logs = binary.logs();
        for secret in [URL_SECRET, ENV_SECRET] {
            let leaked: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
            assert!(
                leaked.is_empty(),
                "{name}: the logs hold a password: {leaked:#?}"
            );
        }
        eprintln!(
            "{name}: {} log lines, {} store-failure lines, no password",
            logs.lines().count(),
            binary.count(failures)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Key hygiene.

/// `{prefix}:{22 base64url}:{11 base64url}`.
fn well_formed(key: &str, prefix: &str) -> bool {
    let b64 = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    key.strip_prefix(prefix)
        .and_then(|k| k.strip_prefix(":{"))
        .and_then(|k| k.split_once("}:"))
        .is_some_and(|(tag, id)| b64(tag, 22) && b64(id, 11))
}

/// A key's value as text, whatever its type.
fn value_text(conn: &mut redis::Connection, key: &str) -> String {
    let kind: String = redis::cmd("TYPE").arg(key).query(conn).unwrap();
    let value: redis::Value = match kind.as_str() {
        "string" => redis::cmd("GET").arg(key).query(conn).unwrap(),
        "hash" => redis::cmd("HGETALL").arg(key).query(conn).unwrap(),
        "zset" => redis::cmd("ZRANGE")
            .arg(key)
            .arg(&["0", "-1", "WITHSCORES"])
            .query(conn)
            .unwrap(),
        other => panic!("{key}: unexpected type {other}"),
    };
    format!("{kind} {value:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_hashed_to_a_fixed_length_with_a_ttl_and_never_hold_an_api_key() {
    let _shared = ALONE.read().await;
    let redis = Redis::start();
    let upstream = Upstream::start().await;
    let algorithms = [
        ("fixed_window", "rate = \"100/hour\""),
        ("sliding_window", "rate = \"100/hour\""),
        ("sliding_log", "rate = \"100/hour\""),
        ("token_bucket", "rate = \"100/hour\", burst = 100"),
        ("gcra", "rate = \"100/hour\", burst = 100"),
    ];
    let mut routes: String = algorithms
        .iter()
        .map(|(name, rate)| {
            format!(
                "[[routes]]\nname = \"{name}\"\nupstream = \"api\"\nmatch = {{ path = \"/{name}\" }}\nlimits = [{{ by = \"header:x-api-key\", algorithm = \"{name}\", {rate} }}]\n\n"
            )
        })
        .collect();
    routes.push_str("[[routes]]\nname = \"composite\"\nupstream = \"api\"\nmatch = { path = \"/composite\" }\nlimits = [{ by = [\"header:x-api-key\", \"query:tenant\"], algorithm = \"fixed_window\", rate = \"100/hour\" }]\n");
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"1s\"\nprefix = \"hk\"",
        redis.url()
    );
    let tg = start_tollgate(&config(&upstream, &store, &routes)).await;
    let http = Http::new();
    let long_key = format!("sk_live_{}", "Z".repeat(2000));
    let api_keys = ["sk_live_4f9QxW2mPa7Hq", long_key.as_str()];
    for api_key in api_keys {
        for (name, _) in algorithms.iter().chain([&("composite", "")]) {
            for _ in 0..2 {
                let reply = http
                    .get(
                        &format!("http://{}/{name}?tenant=acme-tenant-secret", tg.addr),
                        &[("x-api-key", api_key)],
                    )
                    .await;
                assert_eq!(reply.status, 200, "{name}");
            }
        }
    }
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert_eq!(keys.len(), 12, "one key per (limit, identity): {keys:?}");
    let forbidden = ["sk_live", "ZZZZ", "acme-tenant", "x-api-key"];
    let mut max_ttl = 0;
    for key in &keys {
        assert!(well_formed(key, "hk"), "key name {key:?}");
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
        assert!(
            ttl > 0 && ttl <= 2 * 3_600_000 + 2_000,
            "{key}: PTTL {ttl} ms (a TTL on every key; at most two windows (sliding_window keeps the previous one) plus slack)"
        );
        max_ttl = max_ttl.max(ttl);
        let value = value_text(&mut conn, key);
        for word in forbidden {
            assert!(
                !key.contains(word) && !value.contains(word),
                "{key} = {value} holds {word:?} in clear"
            );
        }
    }
    eprintln!(
        "key hygiene: {} keys, every name {} bytes for API keys of {} and {} bytes (e.g. {}); longest PTTL {max_ttl} ms",
        keys.len(),
        keys[0].len(),
        api_keys[0].len(),
        api_keys[1].len(),
        keys[0]
    );
    stop(tg, http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_identities_per_algorithm_keep_redis_memory_bounded() {
    const KEYS: u64 = 100_000;
    /// Concurrent calls (pipelined on the multiplexed connections) of BATCH identities each.
    const TASKS: u64 = 16;
    const BATCH: u64 = 50;
    const HOUR: u64 = 3_600_000_000;
    let _alone = ALONE.write().await;
    let algorithms = [
        (
            "fixed_window",
            Algorithm::FixedWindow {
                quota: 100,
                window: HOUR,
            },
        ),
        (
            "sliding_window",
            Algorithm::SlidingWindow {
                quota: 100,
                window: HOUR,
            },
        ),
        (
            "sliding_log (quota 1)",
            Algorithm::SlidingLog {
                quota: 1,
                window: HOUR,
            },
        ),
        (
            "token_bucket",
            // 100/hour: 1 unit a µs refilled, 36,000,000 units a token.
            Algorithm::TokenBucket {
                burst: 100,
                refill: 1,
                unit: HOUR / 100,
            },
        ),
        (
            "gcra",
            Algorithm::Gcra {
                burst: 100,
                interval: HOUR / 100,
            },
        ),
    ];
    let started_all = Instant::now();
    let mut report = Vec::new();
    for (name, algorithm) in algorithms {
        let redis = Redis::start();
        let store = Arc::new(
            Store::new(&StoreSettings::Redis(RedisSettings {
                nodes: RedisNodes::Single(Secret(redis.url())),
                username: None,
                password: None,
                tls_ca: None,
                tls_client: None,
                pool_size: 4,
                timeout: Duration::from_secs(5),
                prefix: "m".into(),
            }))
            .expect("redis store"),
        );
        let item = move |i: u64| {
            let mut tag = [0u8; 16];
            tag[..8].copy_from_slice(&i.to_le_bytes());
            Item {
                algorithm,
                cost: 1,
                shadow: false,
                id: 7,
                tag,
                batch: 0,
                ban: 0,
                delay: 0,
                settles: false,
            }
        };
        // Loads the script without writing a key.
        store.peek(&[item(u64::MAX)], None).await.expect("peek");
        let mut conn = redis.conn();
        let before = info_u64(&info(&mut conn, "memory"), "used_memory");
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    for batch in (t * BATCH..KEYS).step_by((TASKS * BATCH) as usize) {
                        let items: Vec<Item> =
                            (batch..(batch + BATCH).min(KEYS)).map(item).collect();
                        let decision = store.decide(&items, None).await.expect("decide");
                        assert!(decision.admitted, "fresh identities are admitted");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        let after = info_u64(&info(&mut conn, "memory"), "used_memory");
        let dbsize: u64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
        assert_eq!(dbsize, KEYS, "{name}: one key per identity");
        for _ in 0..200 {
            let key: String = redis::cmd("RANDOMKEY").query(&mut conn).unwrap();
            assert!(well_formed(&key, "m"), "{name}: key name {key:?}");
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
            assert!(ttl > 0, "{name}: {key} has PTTL {ttl}");
        }
        let per_key = after.saturating_sub(before) as f64 / KEYS as f64;
        eprintln!(
            "memory: {name}: {per_key:.0} bytes per key ({KEYS} keys, used_memory {before} -> {after}, {took:?})"
        );
        report.push((name, per_key));
        drop(store);
    }
    for (name, per_key) in &report {
        assert!(*per_key < 400.0, "{name}: {per_key:.0} bytes per key");
    }
    eprintln!("memory test took {:?}", started_all.elapsed());
}
