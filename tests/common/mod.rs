//! Test harness: real processes and sockets on loopback, each stopped on drop.
//!
//! - [`Redis`]: a `redis-server` on a free port in a temp dir (no persistence), readiness by
//!   PING, killed and reaped by its own PID.
//! - [`Upstream`]: a hyper server that records what it received and answers by path:
//!   `/status/N`, `/slow/MS`, `/echo` (body back, streamed), `/size/N` (N bytes), anything else
//!   200 with a JSON description of the request.
//! - [`start_tollgate`]: tollgate in this process on 127.0.0.1:0.
//! - [`Http`]: a small keep-alive client.
#![allow(dead_code)]

pub mod grpc_codec;
pub mod origins;
pub mod parse;
pub mod pki;
pub mod raw;
pub mod reach;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
pub use tollgate::limiter::algorithm::Kind;

/// A free TCP port on 127.0.0.1 (bound, then released for the caller).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A redis-server of this test's own, plain or TLS only ([`Redis::start_tls`]).
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    tls: Option<Box<RedisTls>>,
}

/// What a TLS-only [`Redis`] presents and trusts: a private CA (tests/common/pki.rs) with
/// `ca.pem`, `server.pem` / `server.key` for 127.0.0.1 and `client.pem` / `client.key`.
pub struct RedisTls {
    pub pki: pki::Pki,
    /// Whether the server demands a client certificate (`--tls-auth-clients yes`).
    pub mutual: bool,
}

impl RedisTls {
    fn new(mutual: bool) -> RedisTls {
        use pki::Usage;
        let pki = pki::Pki::new();
        // Redis presents the server certificate as a client too (replication, cluster bus).
        pki.leaf(
            "server",
            "127.0.0.1",
            &["127.0.0.1"],
            &[Usage::ServerAuth, Usage::ClientAuth],
            2,
        );
        pki.leaf("client", "tollgate", &[], &[Usage::ClientAuth], 3);
        RedisTls { pki, mutual }
    }

    /// The CA and client certificate, for a test's own connections.
    fn certificates(&self) -> redis::TlsCertificates {
        let read = |name: &str| std::fs::read(self.pki.path(name)).expect("test certificate");
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read("client.pem"),
                client_key: read("client.key"),
            }),
            root_cert: Some(read("ca.pem")),
        }
    }

    fn server_args(&self, port: u16) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> =
            ["--port", "0", "--tls-port"].map(Into::into).to_vec();
        args.push(port.to_string().into());
        for (flag, file) in [
            ("--tls-cert-file", "server.pem"),
            ("--tls-key-file", "server.key"),
            ("--tls-ca-cert-file", "ca.pem"),
        ] {
            args.push(flag.into());
            args.push(self.pki.path(file).into());
        }
        args.push("--tls-auth-clients".into());
        args.push(if self.mutual { "yes" } else { "no" }.into());
        args
    }
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// Starts on a given port (one a test configured before the server existed).
    pub fn start_on(port: u16) -> Redis {
        let mut redis = Redis {
            port,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            extra: Vec::new(),
            tls: None,
        };
        redis.spawn();
        redis
    }

    /// Starts with extra `redis-server` arguments, on a free port: if another process takes
    /// that port between the look-up and the bind, it tries again on another one.
    pub fn start_with(extra: &[&str]) -> Redis {
        Self::start_free(extra, None)
    }

    /// A server that speaks TLS only (`--port 0 --tls-port P`) with certificates of its own
    /// private CA ([`Redis::tls`]), demanding a client certificate when `mutual`.
    pub fn start_tls(mutual: bool) -> Redis {
        Self::start_free(&[], Some(Box::new(RedisTls::new(mutual))))
    }

    /// The TLS material of a [`Redis::start_tls`] server.
    pub fn tls(&self) -> &RedisTls {
        self.tls.as_ref().expect("a TLS server")
    }

    fn start_free(extra: &[&str], tls: Option<Box<RedisTls>>) -> Redis {
        let mut redis = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
        };
        for _ in 0..3 {
            if redis.try_spawn().is_ok() {
                return redis;
            }
            redis.kill();
            redis.port = free_port();
        }
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts the server and waits until it answers, and is ours: its `dir` is this fixture's
    /// (a port taken by another server would answer PING too).
    fn try_spawn(&mut self) -> Result<(), String> {
        let listen: Vec<std::ffi::OsString> = match &self.tls {
            Some(tls) => tls.server_args(self.port),
            None => vec!["--port".into(), self.port.to_string().into()],
        };
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ours = self
            .dir
            .path()
            .canonicalize()
            .unwrap_or(self.dir.path().into());
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "redis-server on port {} exited with {status}: {}",
                    self.port,
                    self.log()
                ));
            }
            if let Ok(client) = self.client()
                && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200))
                && let Ok((_, dir)) = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("dir")
                    .query::<(String, String)>(&mut conn)
            {
                if std::path::Path::new(&dir) == ours {
                    return Ok(());
                }
                return Err(format!("port {} is another server's", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "redis-server on port {} did not become ready",
            self.port
        ))
    }

    /// `redis://` or, for a TLS server, `rediss://`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// A client for this server (trusting its CA and presenting the client certificate when
    /// it speaks TLS).
    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls {
            Some(tls) => redis::Client::build_with_tls(self.url(), tls.certificates()),
            None => redis::Client::open(self.url()),
        }
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh, empty server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The server's process id (for SIGSTOP / SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// A synchronous connection for test assertions.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("redis connection")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

/// A recording upstream HTTP server.
pub struct Upstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

type UpBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn upstream_handle(
    request: Request<Incoming>,
    log: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<UpBody>, Infallible> {
    let path = request.uri().path().to_string();
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let headers = request.headers().clone();
    let record = |body_len| {
        log.lock().unwrap().push(Received {
            method: method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
            body_len,
        })
    };
    if path == "/echo" {
        record(0);
        // Streams the body back frame by frame without collecting it.
        return Ok(Response::new(request.into_body().boxed()));
    }
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    record(body.len());
    if let Some(code) = path.strip_prefix("/status/") {
        let status = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        let mut r = Response::new(full(format!("status {code}\n")));
        *r.status_mut() = status;
        return Ok(r);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
        return Ok(Response::new(full("slow\n")));
    }
    if let Some(n) = path.strip_prefix("/size/") {
        let n: usize = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_stream(n, chunk);
        return Ok(Response::new(stream));
    }
    let mut description = BTreeMap::new();
    description.insert(
        "method".to_string(),
        serde_json::Value::from(method.clone()),
    );
    description.insert("uri".to_string(), uri.clone().into());
    description.insert("body_len".to_string(), body.len().into());
    let mut hs = serde_json::Map::new();
    for (k, v) in &headers {
        hs.insert(k.to_string(), v.to_str().unwrap_or("").into());
    }
    description.insert("headers".to_string(), hs.into());
    let mut r = Response::new(full(serde_json::to_vec(&description).unwrap()));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert("x-upstream", "yes".parse().unwrap());
    Ok(r)
}

/// A body of `n` bytes produced in 64 KiB frames, never held whole.
struct Generated {
    left: usize,
    chunk: Bytes,
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let take = self.left.min(self.chunk.len());
        self.left -= take;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.slice(..take)))))
    }
}

fn futures_stream(n: usize, chunk: Bytes) -> UpBody {
    Generated { left: n, chunk }.boxed()
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |r| upstream_handle(r, log.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            addr,
            received,
            task,
        }
    }

    pub fn target(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn last(&self) -> Received {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts tollgate in this process from config text; `listen` must be "127.0.0.1:0".
pub async fn start_tollgate(config: &str) -> tollgate::Running {
    let policy = tollgate::config::parse(config, "test.toml", Path::new("."))
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{config}"));
    tollgate::start(policy, None, std::future::pending())
        .await
        .expect("tollgate starts")
}

/// Starts tollgate in this process from the config file at `path` (relative files such as a
/// consumers file or a JWKS beside it), with the path kept for reloads.
pub async fn start_file(path: &Path) -> tollgate::Running {
    let policy =
        tollgate::config::load(path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    tollgate::start(policy, Some(path.to_path_buf()), std::future::pending())
        .await
        .expect("tollgate starts")
}

/// A config with one upstream named `api` and the given store and routes.
pub fn config(upstream: &Upstream, store: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{store}\n\n[upstreams.api]\ntargets = [\"{}\"]\ntimeout = \"2s\"\n\n{routes}\n",
        upstream.target()
    )
}

/// `[store]` tables for both backends.
pub fn memory_store() -> String {
    "[store]\nbackend = \"memory\"".to_string()
}

pub fn redis_store(redis: &Redis) -> String {
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"200ms\"\nprefix = \"t\"",
        redis.url()
    )
}

/// A response, collected.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A keep-alive HTTP/1.1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(body.into())).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .expect("response within 10 s")
            .expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", url, headers, Bytes::new()).await
    }

    /// The admin listener's `/metrics` text.
    pub async fn scrape(&self, admin: SocketAddr) -> String {
        let body = self.get(&format!("http://{admin}/metrics"), &[]).await.body;
        String::from_utf8(body.to_vec()).expect("metrics are text")
    }
}

/// The tollgate binary running as a child process (for signals, reloads and the CLI), with
/// its JSON log lines collected.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Binary {
    /// Starts `tollgate --log-format json run --config PATH` and waits for it to serve.
    pub fn start(config: &Path) -> Binary {
        Self::start_with_open_files(config, None)
    }

    /// Like [`Binary::start`], with at most `limit` open files (util-linux `prlimit`, which
    /// execs tollgate: the PID is tollgate's).
    pub fn start_with_open_files(config: &Path, limit: Option<u32>) -> Binary {
        Self::launch(config, limit, &[])
    }

    /// Like [`Binary::start`], with extra environment variables (they override `RUST_LOG`).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Binary {
        Self::launch(config, None, env)
    }

    fn launch(config: &Path, limit: Option<u32>, env: &[(&str, &str)]) -> Binary {
        use std::io::BufRead;
        let mut command = match limit {
            None => Command::new(env!("CARGO_BIN_EXE_tollgate")),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_tollgate"));
                c
            }
        };
        let mut child = command
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tollgate binary");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let value: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line }));
                // Kept before readiness is told, so a reader woken by it sees this line.
                sink.lock().unwrap().push(value.clone());
                if value["message"] == "tollgate serving"
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
                panic!("tollgate did not start; logs: {:?}", logs.lock().unwrap());
            }
        };
        let addr = serving["listen"].as_str().unwrap().parse().unwrap();
        let admin = serving["admin"].as_str().and_then(|s| s.parse().ok());
        Binary {
            child,
            addr,
            admin,
            logs,
        }
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{name} failed");
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 25 ms until it holds or `limit` passes; returns the time it took.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("condition not reached within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A Redis Cluster of this test's own: `primaries` primaries with `replicas` replicas each,
/// every node a [`Redis`] with `--cluster-enabled yes` on a free loopback port, joined with
/// `redis-cli --cluster create`. Ready when every node reports `cluster_state:ok`.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start(primaries: usize, replicas: usize) -> Cluster {
        let total = primaries * (1 + replicas);
        let nodes: Vec<Redis> = (0..total)
            .map(|_| {
                Redis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (the README's test command installs it)");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_ok(Duration::from_secs(20));
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and knows all slots.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let Ok(client) = redis::Client::open(n.url()) else {
                    return false;
                };
                let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(300))
                else {
                    return false;
                };
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut c)
                    .map(|info| {
                        info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                    })
                    .unwrap_or(false)
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster not ok within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `[store]` table for tollgate: every node as a seed.
    pub fn store(&self, timeout: &str) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"redis://127.0.0.1:{}\"", n.port))
            .collect();
        format!(
            "[store]\nbackend = \"redis\"\ncluster = [{}]\ntimeout = \"{timeout}\"\nprefix = \"c\"",
            urls.join(", ")
        )
    }

    /// The node serving `key`'s slot as primary.
    pub fn primary_for(&self, key: &str) -> &Redis {
        let mut any = self.nodes[0].conn();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut any)
            .unwrap();
        let shards: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut any).unwrap();
        let redis::Value::Array(ranges) = shards else {
            panic!("CLUSTER SLOTS")
        };
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let (redis::Value::Int(lo), redis::Value::Int(hi)) = (&parts[0], &parts[1]) else {
                continue;
            };
            if (*lo..=*hi).contains(&slot) {
                let redis::Value::Array(primary) = &parts[2] else {
                    continue;
                };
                let redis::Value::Int(port) = primary[1] else {
                    continue;
                };
                return self
                    .nodes
                    .iter()
                    .find(|n| n.port as i64 == port)
                    .expect("known node");
            }
        }
        panic!("no primary for slot {slot}");
    }
}

/// How many algorithms of the table take a `rate` (all but `concurrency`).
const RATE_KINDS: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < Kind::ALL.len() {
        if Kind::ALL[i].takes_rate() {
            n += 1;
        }
        i += 1;
    }
    n
};

/// Every rate algorithm's name, from tollgate's algorithm table (in the order the contract
/// lists them), so that a new one is covered by every test that loops over them and admits
/// N per period. `concurrency` (requests in flight, not a rate) is tested on its own
/// (tests/response_limits.rs, tests/model.rs).
pub const ALGORITHMS: [&str; RATE_KINDS] = {
    let mut names = [""; RATE_KINDS];
    let (mut i, mut k) = (0, 0);
    while i < Kind::ALL.len() {
        if Kind::ALL[i].takes_rate() {
            names[k] = Kind::ALL[i].name();
            k += 1;
        }
        i += 1;
    }
    names
};

/// `, burst = N` where the algorithm takes one, so that every algorithm admits exactly N from
/// a fresh key.
pub fn burst(algorithm: &str, n: u64) -> String {
    match Kind::from_name(algorithm) {
        Some(kind) if kind.takes_burst() => format!(", burst = {n}"),
        _ => String::new(),
    }
}

/// One route per algorithm (named after it, matching `/ALG`), keyed by `by`, `n` per hour;
/// `route_extra` goes into each route table, `limit_extra` into each limit.
pub fn algorithm_routes(by: &str, n: u64, route_extra: &str, limit_extra: &str) -> String {
    ALGORITHMS
        .iter()
        .map(|alg| {
            format!(
                "[[routes]]\nname = \"{alg}\"\nupstream = \"api\"\nmatch = {{ path = \"/{alg}\" }}\n{route_extra}\
                 limits = [{{ by = \"{by}\", algorithm = \"{alg}\", rate = \"{n}/hour\"{}{limit_extra} }}]\n",
                burst(alg, n)
            )
        })
        .collect()
}

/// Window algorithms restart at aligned hour edges; keep a run clear of one.
pub async fn clear_of_an_hour_edge() {
    let now = tollgate::limiter::wall_clock() / 1_000_000;
    let into_hour = now % 3600;
    if into_hour > 3590 {
        tokio::time::sleep(Duration::from_secs(3600 - into_hour + 1)).await;
    }
}

/// `clients` concurrent clients each send `per_client` GETs, client c's i-th to
/// `urls[(c + i) % urls.len()]`: (admitted, rejected). Any status but 200 or 429 panics.
pub async fn hammer(
    urls: &[String],
    headers: &[(&'static str, &'static str)],
    clients: usize,
    per_client: usize,
) -> (u64, u64) {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let urls = urls.to_vec();
        let headers = headers.to_vec();
        tasks.push(tokio::spawn(async move {
            let http = Http::new();
            let (mut admitted, mut rejected) = (0u64, 0u64);
            for i in 0..per_client {
                let url = &urls[(client + i) % urls.len()];
                let reply = http.get(url, &headers).await;
                match reply.status {
                    200 => admitted += 1,
                    429 => rejected += 1,
                    other => panic!("{url}: unexpected status {other}: {reply:?}"),
                }
            }
            (admitted, rejected)
        }));
    }
    let (mut admitted, mut rejected) = (0, 0);
    for t in tasks {
        let (a, r) = t.await.expect("client task");
        admitted += a;
        rejected += r;
    }
    (admitted, rejected)
}

/// A request body fed from a channel: frames are sent when the test decides.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}
