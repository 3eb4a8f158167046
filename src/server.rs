//! The client-facing listener: accept loop, TLS handshake, HTTP/1.1 and HTTP/2 (hyper-util's
//! auto builder; h2c by prior knowledge on plain listeners, ALPN over TLS), upgrades, timeouts,
//! and graceful shutdown: stop accepting, let in-flight requests finish up to the grace period,
//! then cut what remains.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::timeouts::WriteStall;

use crate::app::App;
use crate::pipeline;
use crate::proxy::ConnInfo;

/// How long a TLS client may take to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections, and a wake-up for the accept loop when one closes.
#[derive(Default)]
struct Capacity {
    open: AtomicUsize,
    freed: Notify,
}

/// Counts one connection for as long as it lives.
struct Slot(Arc<Capacity>, Arc<App>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
        self.1.metrics.open_connections.dec();
    }
}

impl Capacity {
    /// Waits until fewer than `max` connections are open. At the limit tollgate stops
    /// accepting: new clients wait in the kernel's listen backlog (as with HAProxy's maxconn)
    /// instead of being accepted and dropped.
    async fn room(&self, max: usize) {
        loop {
            let freed = self.freed.notified();
            if self.open.load(Ordering::Acquire) < max {
                return;
            }
            freed.await;
        }
    }
}

/// Serves `listener` until `shutdown` resolves, then drains.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let capacity = Arc::new(Capacity::default());
    tokio::pin!(shutdown);
    loop {
        let max = app.runtime().policy.server.max_connections;
        tokio::select! {
            () = capacity.room(max) => {}
            () = &mut shutdown => break,
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    capacity.open.fetch_add(1, Ordering::AcqRel);
                    app.metrics.open_connections.inc();
                    let slot = Slot(capacity.clone(), app.clone());
                    let app = app.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        connection(app, stream, peer, watcher).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Accept errors are transient (EMFILE, ECONNABORTED): pause briefly
                    // rather than spin, and keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace = app.runtime().policy.server.shutdown_grace;
    tracing::info!(grace = ?grace, connections = graceful.count(), "draining");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace expired; cutting the remaining requests");
        }
    }
}

fn builder(app: &App) -> auto::Builder<TokioExecutor> {
    let rt = app.runtime();
    let server = &rt.policy.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

async fn connection(
    app: Arc<App>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = stream.set_nodelay(true);
    let rt = app.runtime();
    let tls = rt.tls.clone();
    let stream = WriteStall::new(stream, rt.policy.server.send_timeout);
    drop(rt);
    let scheme = if tls.is_some() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let conn = Arc::new(ConnInfo { peer, scheme });
    let svc_app = app.clone();
    let service = service_fn(move |request| {
        let app = svc_app.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(pipeline::handle(&app, &conn, request).await) }
    });
    let builder = builder(&app);
    let result = match tls {
        None => {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            watcher.watch(conn.into_owned()).await
        }
        Some(acceptor) => {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            watcher.watch(conn.into_owned()).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
