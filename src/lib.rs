//! tollgate: a reverse proxy that rate-limits an HTTP API from one TOML policy.
//!
//! A request flows through these modules, in this order:
//!
//! - [`server`]: accepts connections (TLS, HTTP/1.1, HTTP/2, upgrades), drains on shutdown;
//!   what it knows of each connection is a [`conn::ConnInfo`].
//! - [`pipeline`]: the life of one request, phase by phase, in one function.
//! - [`framing`]: head checks beyond hyper's (Host, Transfer-Encoding): no smuggling.
//! - [`route`]: the first route whose `match` fits (on a normalised path).
//! - [`identity`]: the client IP (trusted-proxy walk) and the hashed identity of each limit;
//!   [`consumers`]: the consumer and plan a request's API key (or [`jwt`] token) names.
//! - [`limiter`]: all limits of the route decided together, through layers in this order: the
//!   deny cache ([`limiter::deny_cache`]), the leases of approximate mode ([`limiter::lease`]),
//!   the circuit breaker and timeout ([`limiter::breaker`]), then one store call — the
//!   [`limiter::algorithm`]s in process ([`limiter::memory`]) or as Lua scripts in Redis
//!   ([`limiter::redis`], scripts in `lua/`).
//! - [`response`]: 429 / 503 / 404 / 502 / 504 / 413 / 400 as problem+json, rate-limit headers.
//! - [`proxy`]: forwarding — hop-by-hop headers, `X-Forwarded-*`, `Via`, streaming, upgrades —
//!   over [`upstream`]'s keep-alive connection pools, the request [`body`] streamed as it comes.
//! - [`settle`]: what the response settles (`count`, `cost_from`, concurrency slots, held
//!   requests), at its head or at the end of its body; [`usage`] reads the token figure an
//!   OpenAI-compatible body reports, as it streams.
//! - [`metrics`] and [`logging`]: recorded once per request at the end of the pipeline;
//!   [`telemetry`]: its trace spans (request, decision, upstream), exported over OTLP.
//!
//! Around them: [`config`] parses and validates proxy.toml into a typed [`policy::Policy`];
//! [`app`] holds the policy in force with its store and swaps it whole on reload; [`reload`]
//! watches for SIGHUP and file changes; [`admin`] serves /healthz, /readyz, /metrics and the
//! operator API of [`counters`];
//! [`tls`] builds the rustls acceptor; [`timeouts`] holds the stall timers hyper lacks; [`report`] renders `check`'s summary; [`replay`] runs access logs through a policy;
//! [`heap`] gives freed memory back to the system after bursts of connections.

// No unsafe code, but for the one FFI call that returns freed memory (heap::trim).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod conn;
pub mod consumers;
pub mod counters;
pub mod framing;
pub mod heap;
pub mod identity;
pub mod jwt;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod replay;
pub mod report;
pub mod response;
pub mod route;
pub mod server;
pub mod settle;
pub mod telemetry;
pub mod timeouts;
pub mod tls;
pub mod upstream;
pub mod usage;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use app::App;
pub use policy::Policy;

/// Serves until `shutdown` resolves: the proxy on `listener`, the admin endpoints on `admin`,
/// and the reload watcher. Returns when in-flight requests have drained (or the grace expired).
pub async fn run(
    app: Arc<App>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    if let Some(admin) = admin {
        tokio::spawn(admin::serve(
            app.clone(),
            admin,
            until_stopped(stopped.clone()),
        ));
    }
    tokio::spawn(reload::watch(app.clone(), until_stopped(stopped.clone())));
    server::serve(app.clone(), listener, shutdown).await;
    // The spans of the last requests go out before the process ends.
    if let Some(tracer) = &app.runtime().tracer {
        tracer
            .exporter
            .flush(std::time::Duration::from_secs(2))
            .await;
    }
    let _ = stop.send(true);
}

/// Why tollgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] app::BuildError),
}

/// A tollgate started in this process (tests, benchmarks, `main`).
pub struct Running {
    /// The proxy's bound address (useful when the config said port 0).
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts draining and waits until tollgate has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until tollgate stops by itself.
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Binds with a listen backlog of 4096 (the kernel caps it at somaxconn): the default 128
/// overflows under connection bursts, and clients waiting while tollgate is at
/// `max_connections` queue there.
async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    bind().map_err(|source| StartError::Bind { addr, source })
}

/// Binds the listeners `policy` names and serves in the background until [`Running::stop`]
/// or `shutdown` (whichever comes first).
pub async fn start(
    policy: Policy,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    let listener = bind(policy.server.listen).await?;
    let admin = match policy.server.admin {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: policy.server.listen,
        source,
    })?;
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let app = Arc::new(App::new(policy, config_path)?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(app.clone(), listener, admin, async move {
        tokio::select! {
            _ = stopped => {}
            () = shutdown => {}
        }
    }));
    Ok(Running {
        addr,
        admin_addr,
        app,
        stop: Some(stop),
        task,
    })
}
