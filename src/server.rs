//! The client-facing listener: accept loop (bounded by `max_connections`, backing off on
//! errors), TLS handshake, HTTP/1.1 and HTTP/2 with hyper's own builders (the protocol sniffed
//! from the first bytes on plain listeners, h2c by prior knowledge; ALPN over TLS), upgrades,
//! timeouts, and graceful shutdown: stop accepting, let in-flight requests finish up to the
//! grace period, then cut what remains (every task runs under the listener's [`Cut`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::framing::{AmbiguousHeads, HeadScanner};
use crate::timeouts::{ClientWrites, WriteStall};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::app::App;
use crate::conn::{ConnInfo, Cut};
use crate::pipeline;

/// How long a TLS client may take to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause after a failed accept (EMFILE, ECONNABORTED): transient errors, not worth a spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// hyper's HTTP/2 server spawns a task per stream: under the cut like the rest.
#[derive(Clone)]
struct CutExecutor(Cut);

impl<F> hyper::rt::Executor<F> for CutExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

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
    let capacity = Arc::new(Capacity::default());
    // Tells every connection that draining started: one still sniffing or in its TLS handshake
    // gives up, an HTTP/1 one closes after its in-flight request, an HTTP/2 one sends GOAWAY and
    // finishes its open streams.
    let (draining, drain) = tokio::sync::watch::channel(false);
    let (cutting, cut) = tokio::sync::watch::channel(false);
    let cut = Cut::on(cut);
    let counted = capacity.clone();
    let mut trim_stop = drain.clone();
    let trimmer = Arc::new(crate::heap::Trimmer::new());
    tokio::spawn(
        trimmer
            .clone()
            .run(move || counted.open.load(Ordering::Relaxed), async move {
                let _ = trim_stop.wait_for(|d| *d).await;
            }),
    );
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
                    trimmer.saw(capacity.open.fetch_add(1, Ordering::AcqRel) + 1);
                    app.metrics.open_connections.inc();
                    let slot = Slot(capacity.clone(), app.clone());
                    let app = app.clone();
                    let drain = drain.clone();
                    let conn_cut = cut.clone();
                    cut.spawn(async move {
                        connection(app, stream, peer, drain, conn_cut).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Accept errors are transient (EMFILE, ECONNABORTED): pause briefly
                    // rather than spin, and keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = draining.send(true);
    let grace = app.runtime().policy.server.shutdown_grace;
    let open = capacity.open.load(Ordering::Acquire);
    tracing::info!(grace = ?grace, connections = open, "draining");
    tokio::select! {
        () = capacity.room(1) => tracing::info!("drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace expired; cutting the remaining requests");
        }
    }
    // Whatever is left (connections, streams, tunnels) ends now, not when the runtime does.
    let _ = cutting.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), capacity.room(1)).await;
}

/// Connection settings taken from the policy in force when the connection starts.
#[derive(Clone, Copy)]
struct Settings {
    header_read_timeout: Duration,
}

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/1 from HTTP/2 prior knowledge by peeking at the first bytes, within the header
/// read timeout: hyper-util's own sniffing waits for 24 bytes without any timer, so a client that
/// sends nothing (or a few bytes) would hold a connection slot forever. None: closed or silent.
async fn sniff(stream: &TcpStream, limit: Duration) -> Option<Protocol> {
    let peeking = async {
        let mut buf = [0u8; 24];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(Protocol::Http1);
            }
            if n == buf.len() {
                return Some(Protocol::Http2);
            }
            // A partial preface: wait for the rest (peek returns at once while data is queued).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(limit, peeking).await.ok().flatten()
}

/// An HTTP/1 connection's read side, watched by a [`HeadScanner`] for heads that carry both
/// framing headers (hyper hides those from the service).
struct Scanned<T> {
    inner: T,
    scanner: HeadScanner,
    heads: Arc<AmbiguousHeads>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Scanned<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            this.scanner.feed(&buf.filled()[before..], &this.heads);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Scanned<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn connection(
    app: Arc<App>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    mut drain: tokio::sync::watch::Receiver<bool>,
    cut: Cut,
) {
    let _ = stream.set_nodelay(true);
    let rt = app.runtime();
    let tls = rt.tls.clone();
    let send_timeout = rt.policy.server.send_timeout;
    let header_timeout = rt.policy.server.header_read_timeout;
    drop(rt);
    let scheme = if tls.is_some() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let heads = Arc::new(AmbiguousHeads::default());
    let writes = Arc::new(ClientWrites::default());
    let conn = Arc::new(
        ConnInfo::new(peer, scheme, heads.clone())
            .with_cut(cut.clone())
            .with_writes(writes.clone()),
    );
    let svc_app = app.clone();
    let service = service_fn(move |request| {
        let app = svc_app.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(pipeline::handle(&app, &conn, request).await) }
    });
    let settings = Settings {
        header_read_timeout: header_timeout,
    };
    let result = match tls {
        None => {
            let sniffed = tokio::select! {
                p = sniff(&stream, header_timeout) => p,
                _ = drain.wait_for(|d| *d) => None,
            };
            let Some(protocol) = sniffed else {
                tracing::debug!(%peer, "closed, silent or draining before a request");
                return;
            };
            let io = WriteStall::new(stream, send_timeout).reporting(writes);
            serve_io(settings, protocol, io, heads, service, drain, cut).await
        }
        Some(acceptor) => {
            let io = WriteStall::new(stream, send_timeout).reporting(writes);
            let handshake = tokio::select! {
                r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)) => r,
                _ = drain.wait_for(|d| *d) => return,
            };
            let stream = match handshake {
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
            // ALPN decided the protocol: no sniffing, so hyper's header timer runs at once.
            let protocol = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Protocol::Http2,
                _ => Protocol::Http1,
            };
            serve_io(settings, protocol, stream, heads, service, drain, cut).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one connection with hyper's HTTP/1 or HTTP/2 server directly: the protocol is known
/// already (sniffed or from ALPN), so hyper-util's auto layer (a rewind buffer and a second
/// dispatch on every read) is not needed.
async fn serve_io<I, S>(
    settings: Settings,
    protocol: Protocol,
    io: I,
    heads: Arc<AmbiguousHeads>,
    service: S,
    mut drain: tokio::sync::watch::Receiver<bool>,
    cut: Cut,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::response::Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    match protocol {
        Protocol::Http1 => {
            let io = Scanned {
                inner: io,
                scanner: HeadScanner::default(),
                heads,
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout)
                .keep_alive(true)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => return r.map_err(Into::into),
                _ = drain.wait_for(|d| *d) => conn.as_mut().graceful_shutdown(),
            }
            conn.await.map_err(Into::into)
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(CutExecutor(cut))
                .timer(TokioTimer::new())
                .max_concurrent_streams(256)
                .max_header_list_size(64 * 1024)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20))
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => return r.map_err(Into::into),
                _ = drain.wait_for(|d| *d) => conn.as_mut().graceful_shutdown(),
            }
            conn.await.map_err(Into::into)
        }
    }
}
