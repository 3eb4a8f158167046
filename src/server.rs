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
use tokio::net::{TcpListener, TcpStream};

use crate::app::App;
use crate::pipeline;
use crate::proxy::ConnInfo;

/// How long a TLS client may take to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` until `shutdown` resolves, then drains.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let app = app.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        app.metrics.open_connections.inc();
                        connection(app.clone(), stream, peer, watcher).await;
                        app.metrics.open_connections.dec();
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
    let tls = app.runtime().tls.clone();
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
