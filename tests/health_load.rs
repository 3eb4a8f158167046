//! Target health under load, end to end with real sockets: a target that refuses connections
//! costs no client a failed request (its refused requests go to the others), and a target
//! killed in the middle of steady load costs at most the requests that were in flight on it,
//! is taken out by the active checks (`tollgate_upstream_healthy` drops to 0, then nothing
//! fails and everything reaches the other target) and, restarted on the same port, is brought
//! back and gets traffic again once the gauge is 1.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Http, eventually, start_tollgate};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Phases of the kill test; a request's path names the phase it was sent in.
const PHASES: usize = 5;
/// Bound on one request of the load.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A target that can be killed and started again on its port
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 target counting `/load/P` requests per phase P and `/healthz` checks.
struct Target {
    addr: SocketAddr,
    served: Arc<[AtomicUsize; PHASES]>,
    checks: Arc<AtomicUsize>,
    /// Connections open now.
    conns: Arc<AtomicUsize>,
    kill: watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl Target {
    async fn start() -> Target {
        Target::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr` with SO_REUSEADDR, so a port a killed target left (its closed
    /// connections in TIME_WAIT) can be bound again.
    async fn start_on(addr: SocketAddr) -> Target {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(addr)
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let listener = socket.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let served: Arc<[AtomicUsize; PHASES]> = Arc::new(Default::default());
        let checks = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let (kill, killed) = watch::channel(false);
        let (s, c, n) = (served.clone(), checks.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, c, n) = (s.clone(), c.clone(), n.clone());
                let mut killed = killed.clone();
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |r: Request<Incoming>| {
                        let (s, c) = (s.clone(), c.clone());
                        async move {
                            let path = r.uri().path();
                            if path == "/healthz" {
                                c.fetch_add(1, Ordering::SeqCst);
                            } else if let Some(phase) = path
                                .strip_prefix("/load/")
                                .and_then(|p| p.parse::<usize>().ok())
                            {
                                s[phase.min(PHASES - 1)].fetch_add(1, Ordering::SeqCst);
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"ok\n",
                            ))))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    // Killed: the connection (and its socket) is dropped whatever it was doing.
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.wait_for(|k| *k) => {}
                    }
                    n.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Target {
            addr,
            served,
            checks,
            conns,
            kill,
            accept: Some(accept),
        }
    }

    fn served(&self, phase: usize) -> usize {
        self.served[phase].load(Ordering::SeqCst)
    }

    fn total(&self) -> usize {
        (0..PHASES).map(|p| self.served(p)).sum()
    }

    /// Closes the listener (connections are refused from then on) and every open connection,
    /// keep-alive ones included, and waits until all are closed.
    async fn kill(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        self.kill.send_replace(true);
        let conns = self.conns.clone();
        eventually(Duration::from_secs(5), || {
            let conns = conns.clone();
            async move { conns.load(Ordering::SeqCst) == 0 }
        })
        .await;
        let refused = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.addr))
            .await
            .expect("connect answered at once");
        assert!(refused.is_err(), "a killed target refuses connections");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.kill.send_replace(true);
    }
}

/// A loopback port nothing listens on: bound, its port taken, the listener dropped.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn config(targets: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = targets.iter().map(|a| format!("\"http://{a}\"")).collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[store]\nbackend = \"memory\"\n\n\
         [upstreams.api]\ntargets = [{}]\ntimeout = \"2s\"\nconnect_timeout = \"500ms\"\n{extra}\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"api\"\n",
        list.join(", ")
    )
}

/// The value of `tollgate_upstream_healthy` for `target`.
fn healthy_gauge(metrics: &str, target: SocketAddr) -> Option<i64> {
    let series = format!("tollgate_upstream_healthy{{upstream=\"api\",target=\"{target}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

async fn gauge_becomes(http: &Http, admin: SocketAddr, target: SocketAddr, value: i64) -> Duration {
    eventually(Duration::from_secs(10), || async {
        healthy_gauge(&http.scrape(admin).await, target) == Some(value)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

type Pool = Client<HttpConnector, Empty<Bytes>>;

/// One GET through tollgate: `Err` for anything but a 200 with its whole body.
async fn get(client: &Pool, url: &str) -> Result<(), String> {
    let request = Request::get(url).body(Empty::new()).unwrap();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        if status != 200 {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_LIMIT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_LIMIT:?}")))
}

/// A failed request of the steady load.
#[derive(Debug, Clone)]
struct Failure {
    phase: usize,
    started: Instant,
    ended: Instant,
    error: String,
}

/// Workers each sending one request at a time on a keep-alive client of their own, to
/// `/load/PHASE` with the phase current when it is sent, until stopped (or a bound).
struct Load {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    ok: Arc<[AtomicUsize; PHASES]>,
    failures: Arc<Mutex<Vec<Failure>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(tollgate: SocketAddr, workers: usize) -> Load {
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ok: Arc<[AtomicUsize; PHASES]> = Arc::new(Default::default());
        let failures: Arc<Mutex<Vec<Failure>>> = Arc::default();
        let workers = (0..workers)
            .map(|_| {
                let (phase, stop, ok, failures) =
                    (phase.clone(), stop.clone(), ok.clone(), failures.clone());
                tokio::spawn(async move {
                    let client: Pool = Client::builder(TokioExecutor::new()).build_http();
                    let deadline = Instant::now() + Duration::from_secs(90);
                    for _ in 0..200_000 {
                        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                            break;
                        }
                        let p = phase.load(Ordering::SeqCst);
                        let started = Instant::now();
                        match get(&client, &format!("http://{tollgate}/load/{p}")).await {
                            Ok(()) => {
                                ok[p].fetch_add(1, Ordering::SeqCst);
                            }
                            Err(error) => failures.lock().unwrap().push(Failure {
                                phase: p,
                                started,
                                ended: Instant::now(),
                                error,
                            }),
                        }
                    }
                })
            })
            .collect();
        Load {
            phase,
            stop,
            ok,
            failures,
            workers,
        }
    }

    fn enter(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    fn ok(&self, phase: usize) -> usize {
        self.ok[phase].load(Ordering::SeqCst)
    }

    fn failures(&self) -> Vec<Failure> {
        self.failures.lock().unwrap().clone()
    }

    /// Stops the workers and waits for their last requests.
    async fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for worker in std::mem::take(&mut self.workers) {
            tokio::time::timeout(REQUEST_LIMIT * 2, worker)
                .await
                .expect("workers stop")
                .expect("worker ran");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Passive: a refusing target costs no request
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_with_one_target_refusing_all_answer_200() {
    let (a, b) = (Target::start().await, Target::start().await);
    let dead = closed_port();
    let tollgate = start_tollgate(&config(&[a.addr, dead, b.addr], "")).await;
    let addr = tollgate.addr;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            tokio::spawn(async move {
                let client: Pool = Client::builder(TokioExecutor::new()).build_http();
                let mut failures = Vec::new();
                for i in 0..125 {
                    if let Err(e) = get(&client, &format!("http://{addr}/load/0?c={c}&i={i}")).await
                    {
                        failures.push(format!("client {c} request {i}: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.expect("client task"));
    }
    assert!(
        failures.is_empty(),
        "{} of 1000 failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        a.served(0) + b.served(0),
        1000,
        "every request reached a live target once (a: {}, b: {})",
        a.served(0),
        b.served(0)
    );
    assert!(a.served(0) > 0 && b.served(0) > 0, "both live targets used");
    let metrics = Http::new().scrape(tollgate.admin_addr.unwrap()).await;
    assert_eq!(healthy_gauge(&metrics, dead), Some(0), "{metrics}");
    tollgate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A target killed under load, and brought back
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_under_load_costs_only_its_in_flight_requests_and_comes_back() {
    // Four workers, one request in flight each at any time.
    const WORKERS: usize = 4;
    let a = Target::start().await;
    let mut b = Target::start().await;
    let check = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", unhealthy_after = 2, healthy_after = 2 }";
    let tollgate = start_tollgate(&config(&[a.addr, b.addr], check)).await;
    let admin = tollgate.admin_addr.unwrap();
    let http = Http::new();
    eventually(Duration::from_secs(5), || async {
        b.checks.load(Ordering::SeqCst) >= 2
    })
    .await;

    // Phase 0: steady load on both.
    let mut load = Load::start(tollgate.addr, WORKERS);
    eventually(Duration::from_secs(10), || async {
        a.served(0) >= 100 && b.served(0) >= 100
    })
    .await;

    // Phase 1: B killed, until its gauge says 0.
    load.enter(1);
    let kill_started = Instant::now();
    b.kill().await;
    let killed = Instant::now();
    let out_after = gauge_becomes(&http, admin, b.addr, 0).await;
    let b_dead_total = b.total();

    // Phase 2: B out. Nothing fails, all reach A.
    load.enter(2);
    eventually(Duration::from_secs(10), || async { load.ok(2) >= 300 }).await;

    // Phase 3: B restarted on the same port, until its gauge says 1.
    load.enter(3);
    let b_port = b.addr;
    drop(b);
    let b2 = Target::start_on(b_port).await;
    assert_eq!(b2.addr, b_port);
    let back_after = gauge_becomes(&http, admin, b2.addr, 1).await;

    // Phase 4: B back in round robin.
    load.enter(4);
    eventually(Duration::from_secs(10), || async { b2.served(4) >= 50 }).await;
    load.finish().await;

    let failures = load.failures();
    let ok: Vec<usize> = (0..PHASES).map(|p| load.ok(p)).collect();
    eprintln!(
        "ok per phase {ok:?}; gauge 0 {out_after:?} after the kill (kill took {:?}), \
         1 {back_after:?} after the restart; A served {:?}, B {b_dead_total} before the kill, \
         restarted B {:?}; failures: {failures:#?}",
        killed - kill_started,
        (0..PHASES).map(|p| a.served(p)).collect::<Vec<_>>(),
        (0..PHASES).map(|p| b2.served(p)).collect::<Vec<_>>(),
    );

    // The only requests allowed to fail are those B had taken when it was killed: each worker
    // has one request in flight at a time, so at most WORKERS of them were (tollgate never
    // resends a request that reached a target, and a refused connection is resent to A).
    assert!(
        failures.len() <= WORKERS,
        "{} failures, more than the {WORKERS} requests that can be in flight: {failures:#?}",
        failures.len()
    );
    for failure in &failures {
        // Phase 0 too: a request sent just before the phase changed may be on B at the kill.
        assert!(
            failure.phase <= 1,
            "a failure after B was out ({}): {failure:?}",
            failure.error
        );
        assert!(
            failure.started < killed && failure.ended >= kill_started,
            "a failure of a request that was not in flight when B was killed \
             (started {:?} after the kill began, ended {:?} after): {failure:?}",
            failure.started.checked_duration_since(kill_started),
            failure.ended.checked_duration_since(kill_started),
        );
    }
    // Out of round robin: every phase-2 request was answered by A, none by B (dead, and its
    // restarted self counts from phase 3 on).
    assert_eq!(a.served(2), ok[2], "every phase-2 request reached A");
    assert_eq!(b2.served(2), 0);
    // Back: the restarted B takes its share, and nothing was lost on the way.
    assert!(b2.served(4) >= 50);
    assert_eq!(a.served(4) + b2.served(4), ok[4]);
    assert_eq!(a.served(3) + b2.served(3), ok[3]);
    tollgate.stop().await;
}
