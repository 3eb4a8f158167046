//! Upstream connections: per target, a pool of keep-alive HTTP/1.1 connections (hyper's
//! low-level client), at most `max_connections_per_target` of them kept idle, and the HTTP/2
//! connections that multiplex requests, over TCP or TLS ([`tls`]).
//!
//! HTTP/2 (`protocol = "h2"`, or `"auto"` when a TLS target picks `h2` in ALPN): one
//! connection per target carries every request; another is opened only while each open one
//! has [`STREAMS_PER_CONNECTION`] requests in flight (hyper queues past the peer's own
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, commonly 100 or more). Concurrent first requests wait
//! for one dial instead of opening a connection each. A protocol switch (WebSocket) always
//! goes over HTTP/1.1: HTTP/2 connections do not carry `Upgrade`.
//!
//! A connection goes back to the pool only when its exchange is over both ways: the response
//! body read to the end *and* the request body written whole. A backend that answers before it
//! has read the body (an early 401 or 413, nginx `return`) leaves a connection still busy with
//! a slow client's upload: that one is closed, never handed to the next request. Idle
//! connections are taken newest first (O(1) at both ends of a deque) and closed after 90 s
//! idle by a reaper, so a quiet pool holds no sockets. A request that could not even be written
//! on a pooled connection (the upstream closed it meanwhile) is retried once on a fresh one;
//! its body was never touched. hyper-util's general-purpose pool (hashing a key, locks, an
//! extra task hop per request) cost about a fifth of tollgate's own instructions per request;
//! this does only what a proxy with a fixed set of targets needs.

pub mod health;
pub mod tls;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use crate::body::{BodyWatch, RequestBody};
use crate::policy::{HealthCheck, Protocol, Target};

/// A request that got no response, and the request itself when nothing of it was sent (the
/// target could not be reached): the caller may send it to another target.
pub struct SendError {
    pub error: UpstreamError,
    pub unsent: Option<Request<RequestBody>>,
}

impl SendError {
    fn sent(error: UpstreamError) -> SendError {
        SendError {
            error,
            unsent: None,
        }
    }
}

impl From<hyper::Error> for SendError {
    fn from(e: hyper::Error) -> SendError {
        SendError::sent(e.into())
    }
}

/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the reaper looks for connections idle longer than [`IDLE_TIMEOUT`].
const REAP_EVERY: Duration = Duration::from_secs(10);
/// What one upstream connection reads at a time (and buffers of a response at most): hyper's
/// adaptive default grows to about 400 KiB, which a client that stops reading would pin per
/// connection. 4 KiB, nginx's `proxy_buffer_size` on most systems.
const READ_BUFFER: usize = 4 * 1024;
/// Requests in flight on one HTTP/2 connection before another is opened.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// Why a request got no response from a target.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed (a certificate that does not verify, an alert).
    #[error("TLS handshake: {0}")]
    Tls(String),
    /// `max_connections_per_target` HTTP/1.1 connections were busy for the whole
    /// `connect_timeout`.
    #[error("all {0} connections to the target stayed busy for {1:?}")]
    Saturated(usize, Duration),
    /// `protocol = "h2"` and the target did not choose `h2` in ALPN.
    #[error("the target did not agree to HTTP/2 in ALPN")]
    NoH2,
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One open connection: the handle to send on and the task driving it (aborted to close it at
/// once).
struct Conn {
    sender: SendRequest<RequestBody>,
    task: AbortHandle,
    /// Its place among the target's open connections.
    _slot: Option<Slot>,
}

/// The HTTP/1.1 connections open to one target, at most `max` (`max_connections_per_target`).
struct Cap {
    open: AtomicUsize,
    max: usize,
    /// Woken when a connection closes or goes back to the idle set.
    freed: tokio::sync::Notify,
}

impl Cap {
    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// One open connection's place under the [`Cap`]; given back when the connection is dropped.
struct Slot(Arc<Cap>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// What a request waiting for an HTTP/1.1 connection gets.
enum Acquired {
    Idle(Conn),
    New(Slot),
}

impl Conn {
    /// Closes the socket now, whatever the connection is still doing.
    fn close(self) {
        self.task.abort();
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One HTTP/2 connection and its requests in flight.
struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    streams: Arc<AtomicUsize>,
    task: AbortHandle,
}

/// A request in flight on an HTTP/2 connection, counted until its response body is done.
struct Stream(Arc<AtomicUsize>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a target is reached: its address, TLS (connectors and the name verified) and protocol.
#[derive(Clone)]
pub struct Dial {
    pub connect_timeout: Duration,
    pub protocol: Protocol,
    pub tls: Option<(tls::Connectors, ServerName<'static>)>,
}

impl Dial {
    /// Plain TCP, HTTP/1.1.
    pub fn plain(connect_timeout: Duration) -> Dial {
        Dial {
            connect_timeout,
            protocol: Protocol::Http1,
            tls: None,
        }
    }

    /// For `target`, with the upstream's connectors (needed for `https://`).
    pub fn for_target(
        target: &Target,
        connect_timeout: Duration,
        protocol: Protocol,
        connectors: Option<&tls::Connectors>,
    ) -> Dial {
        let tls = (target.scheme == Scheme::HTTPS)
            .then_some(connectors)
            .flatten()
            .map(|c| {
                let name = c.server_name.clone().unwrap_or_else(|| {
                    let host = target
                        .authority
                        .host()
                        .trim_matches(|c| c == '[' || c == ']');
                    ServerName::try_from(host.to_string())
                        .unwrap_or_else(|_| ServerName::try_from("invalid.").expect("a DNS name"))
                });
                (c.clone(), name)
            });
        let protocol = match (protocol, &tls) {
            // `auto` on http:// is HTTP/1.1 (no ALPN to ask).
            (Protocol::Auto, None) => Protocol::Http1,
            (p, _) => p,
        };
        Dial {
            connect_timeout,
            protocol,
            tls,
        }
    }

    fn fingerprint(&self) -> Option<[u8; 32]> {
        self.tls.as_ref().map(|(c, _)| c.fingerprint)
    }
}

/// Which protocol an `auto` TLS target settled on in ALPN.
const UNKNOWN: u8 = 0;
const SETTLED_H1: u8 = 1;
const SETTLED_H2: u8 = 2;

/// The connections to one target.
pub struct TargetPool {
    authority: Authority,
    /// `host:port`, the port defaulted from the scheme.
    address: String,
    dial: Dial,
    /// Idle connections kept at most (`max_connections_per_target`).
    max_idle: usize,
    cap: Arc<Cap>,
    /// Oldest at the front, newest at the back.
    idle: Mutex<VecDeque<Idle>>,
    /// The HTTP/2 connections (usually one).
    h2: Mutex<Vec<H2Conn>>,
    /// Held while an HTTP/2 connection (or an `auto` target's first) is being opened.
    dialing: tokio::sync::Mutex<()>,
    settled: AtomicU8,
    pub health: health::Health,
}

impl TargetPool {
    fn new(authority: Authority, dial: Dial, max_idle: usize) -> TargetPool {
        let port = authority
            .port_u16()
            .unwrap_or(if dial.tls.is_some() { 443 } else { 80 });
        let address = format!("{}:{port}", authority.host());
        let settled = match dial.protocol {
            Protocol::Http1 => SETTLED_H1,
            Protocol::H2 => SETTLED_H2,
            Protocol::Auto => UNKNOWN,
        };
        TargetPool {
            authority,
            address,
            dial,
            max_idle,
            cap: Arc::new(Cap {
                open: AtomicUsize::new(0),
                max: max_idle,
                freed: tokio::sync::Notify::new(),
            }),
            idle: Mutex::new(VecDeque::new()),
            h2: Mutex::new(Vec::new()),
            dialing: tokio::sync::Mutex::new(()),
            settled: AtomicU8::new(settled),
            health: health::Health::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.lock();
        while let Some(entry) = idle.pop_back() {
            if !entry.conn.sender.is_closed() && entry.since.elapsed() < IDLE_TIMEOUT {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= self.max_idle
            && let Some(oldest) = idle.pop_front()
        {
            oldest.conn.close();
        }
        idle.push_back(Idle {
            conn,
            since: Instant::now(),
        });
        drop(idle);
        self.cap.freed.notify_one();
    }

    /// An idle connection, or a place for a new one, waiting up to the connect timeout while
    /// all `max_connections_per_target` are busy.
    async fn acquire(&self) -> Result<Acquired, UpstreamError> {
        let timeout = self.dial.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let freed = self.cap.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(conn) = self.checkout() {
                return Ok(Acquired::Idle(conn));
            }
            if let Some(slot) = self.cap.try_take() {
                return Ok(Acquired::New(slot));
            }
            // Idle connections the target closed still hold places: let them go.
            self.lock().retain(|e| !e.conn.sender.is_closed());
            if let Some(slot) = self.cap.try_take() {
                return Ok(Acquired::New(slot));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(UpstreamError::Saturated(self.cap.max, timeout));
            }
        }
    }

    /// Closes the connections idle for [`IDLE_TIMEOUT`] (they sit at the front).
    fn reap(&self, now: Instant) -> usize {
        let mut idle = self.lock();
        let mut closed = 0;
        while idle.front().is_some_and(|e| {
            e.conn.sender.is_closed() || now.duration_since(e.since) >= IDLE_TIMEOUT
        }) {
            if let Some(e) = idle.pop_front() {
                e.conn.close();
                closed += 1;
            }
        }
        closed
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// A TCP connection, and over it the TLS handshake for an `https://` target (offering
    /// `h2` in ALPN unless `http1_only`), both within the connect timeout.
    async fn open(&self, http1_only: bool) -> Result<Transport, UpstreamError> {
        let timeout = self.dial.connect_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let stream = TcpStream::connect(&self.address).await.map_err(|e| {
                self.health.refused(&self.authority);
                UpstreamError::Connect(e)
            })?;
            self.health.connected(&self.authority);
            let _ = stream.set_nodelay(true);
            let Some((connectors, name)) = &self.dial.tls else {
                return Ok(Transport::Plain(stream));
            };
            let connector = if http1_only {
                &connectors.http1
            } else {
                &connectors.preferred
            };
            let tls = connector
                .connect(name.clone(), stream)
                .await
                .map_err(|e| UpstreamError::Tls(tls::reason(&e)))?;
            Ok(Transport::Tls(Box::new(tls)))
        })
        .await;
        opened.map_err(|_| {
            self.health.refused(&self.authority);
            UpstreamError::ConnectTimeout(timeout)
        })?
    }

    /// A new HTTP/1.1 connection, holding `slot` among the target's open ones.
    async fn connect(&self, slot: Option<Slot>) -> Result<Conn, UpstreamError> {
        // Boxed: a TLS handshake's state is large, and every request's future would carry it.
        let mut conn = match Box::pin(self.open(true)).await? {
            Transport::Plain(s) => h1_handshake(s).await?,
            Transport::Tls(s) => h1_handshake(*s).await?,
        };
        conn._slot = slot;
        Ok(conn)
    }

    /// Whether requests to this target go over HTTP/2; an `auto` TLS target's first
    /// connection decides (and is kept for the request that opened it).
    async fn speaks_h2(&self) -> Result<bool, UpstreamError> {
        match self.settled.load(Ordering::Acquire) {
            SETTLED_H1 => return Ok(false),
            SETTLED_H2 => return Ok(true),
            _ => {}
        }
        let _dialing = self.dialing.lock().await;
        if self.settled.load(Ordering::Acquire) == UNKNOWN {
            let transport = Box::pin(self.open(false)).await?;
            if transport.is_h2() {
                let conn = h2_handshake(transport).await?;
                self.lock_h2().push(conn);
                self.settled.store(SETTLED_H2, Ordering::Release);
            } else {
                let mut conn = match transport {
                    Transport::Plain(s) => h1_handshake(s).await?,
                    Transport::Tls(s) => h1_handshake(*s).await?,
                };
                conn._slot = self.cap.try_take();
                self.put(conn);
                self.settled.store(SETTLED_H1, Ordering::Release);
            }
        }
        Ok(self.settled.load(Ordering::Acquire) == SETTLED_H2)
    }

    fn lock_h2(&self) -> std::sync::MutexGuard<'_, Vec<H2Conn>> {
        self.h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An open HTTP/2 connection with room for one more request (closed ones dropped).
    fn h2_checkout(&self) -> Option<(http2::SendRequest<RequestBody>, Stream)> {
        let mut conns = self.lock_h2();
        conns.retain(|c| {
            let open = !c.sender.is_closed();
            if !open {
                c.task.abort();
            }
            open
        });
        let c = conns
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION)?;
        c.streams.fetch_add(1, Ordering::Relaxed);
        Some((c.sender.clone(), Stream(c.streams.clone())))
    }

    /// An HTTP/2 connection to send on: an open one with room, else a new one (one dial at a
    /// time; whoever waited for it uses it too).
    async fn h2_sender(
        &self,
    ) -> Result<(http2::SendRequest<RequestBody>, Stream, bool), UpstreamError> {
        if let Some((sender, stream)) = self.h2_checkout() {
            return Ok((sender, stream, true));
        }
        let _dialing = self.dialing.lock().await;
        if let Some((sender, stream)) = self.h2_checkout() {
            return Ok((sender, stream, false));
        }
        let transport = Box::pin(self.open(false)).await?;
        if matches!(transport, Transport::Tls(_)) && !transport.is_h2() {
            return Err(UpstreamError::NoH2);
        }
        let conn = h2_handshake(transport).await?;
        self.lock_h2().push(conn);
        let (sender, stream) = self.h2_checkout().ok_or(UpstreamError::NoH2)?;
        Ok((sender, stream, false))
    }

    /// Sends `request` over HTTP/2: absolute URI (`:scheme`, `:authority` from the Host the
    /// client sent), `te: trailers` kept for gRPC.
    async fn send_h2(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let scheme = if self.dial.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let authority = request
            .headers_mut()
            .remove(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| self.authority.clone());
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
            .expect("scheme, authority and path make a URI");
        *request.version_mut() = Version::HTTP_2;
        if request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        {
            request
                .headers_mut()
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let mut retried = false;
        loop {
            let (mut sender, stream, reused) = match self.h2_sender().await {
                Ok(s) => s,
                Err(error) => {
                    return Err(SendError {
                        error,
                        unsent: Some(request),
                    });
                }
            };
            if sender.ready().await.is_err() {
                if reused && !retried {
                    retried = true;
                    continue;
                }
                return Err(SendError {
                    error: UpstreamError::Connect(std::io::Error::other(
                        "HTTP/2 connection closed",
                    )),
                    unsent: Some(request),
                });
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(response.map(|body| PooledBody::multiplexed(body, stream)));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent (the connection was going away): once more, on another.
                    Some(unsent) if reused && !retried => {
                        retried = true;
                        request = unsent;
                    }
                    _ => return Err(SendError::sent(e.into_error().into())),
                },
            }
        }
    }

    /// An active health check: `GET path` on a connection of its own (closed afterwards), in
    /// the protocol the target speaks; the status it answered.
    pub async fn probe(&self, path: &PathAndQuery) -> Result<http::StatusCode, UpstreamError> {
        self.one_shot(http::Method::GET, path, None).await
    }

    /// One request on a connection of its own (closed once the response head is in), in the
    /// protocol the target speaks: health checks, and trace exports with `body` (its content
    /// type and bytes). The status it answered.
    pub async fn one_shot(
        &self,
        method: http::Method,
        path: &PathAndQuery,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<http::StatusCode, UpstreamError> {
        async fn over<T>(
            io: T,
            h2: bool,
            uri: Uri,
            host: &Authority,
            method: http::Method,
            body: Option<(&'static str, Bytes)>,
        ) -> Result<http::StatusCode, UpstreamError>
        where
            T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        {
            let mut request = Request::builder().method(method);
            if let Some((content_type, _)) = &body {
                request = request.header(header::CONTENT_TYPE, *content_type);
            }
            let body = http_body_util::Full::new(body.map(|(_, b)| b).unwrap_or_default());
            let response = if h2 {
                let (mut sender, conn) =
                    http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
                let task = tokio::spawn(conn);
                let r = sender
                    .send_request(request.uri(uri).body(body).expect("a request"))
                    .await;
                task.abort();
                r?
            } else {
                let (mut sender, conn) = http1::handshake(TokioIo::new(io)).await?;
                let task = tokio::spawn(conn);
                let request = request
                    .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
                    .header(header::HOST, host.as_str())
                    .header(header::CONNECTION, "close")
                    .body(body)
                    .expect("a request");
                let r = sender.send_request(request).await;
                task.abort();
                r?
            };
            Ok(response.status())
        }
        let h2 = self.settled.load(Ordering::Acquire) == SETTLED_H2;
        let scheme = if self.dial.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let uri: Uri = format!("{scheme}://{}{path}", self.authority)
            .parse()
            .map_err(|_| UpstreamError::Connect(std::io::Error::other("bad request URI")))?;
        match Box::pin(self.open(!h2)).await? {
            Transport::Plain(s) => over(s, h2, uri, &self.authority, method, body).await,
            Transport::Tls(s) => {
                let h2 = h2 && s.get_ref().1.alpn_protocol() == Some(b"h2");
                over(*s, h2, uri, &self.authority, method, body).await
            }
        }
    }

    /// Sends `request` and waits for the response head.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        // The HTTP/2 paths are boxed: an HTTP/1.1 request's future stays as small as it was
        // (a client that reads nothing holds its request's allocation while it waits).
        if self.settled.load(Ordering::Acquire) != SETTLED_H1
            && !crate::proxy::wants_upgrade(request.headers())
        {
            match Box::pin(self.speaks_h2()).await {
                Ok(true) => return Box::pin(self.send_h2(request)).await,
                Ok(false) => {}
                Err(error) => {
                    return Err(SendError {
                        error,
                        unsent: Some(request),
                    });
                }
            }
        }
        self.send_h1(request).await
    }

    /// Sends `request` over an HTTP/1.1 connection of the pool.
    async fn send_h1(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let watch = request.body().watch().clone();
        let mut pooled = self.checkout();
        loop {
            let acquired = match pooled.take() {
                Some(c) => Ok(Acquired::Idle(c)),
                // Boxed, as the dial paths are: its timer and waker stay out of every
                // request's future (needed only when no idle connection is at hand).
                None => Box::pin(self.acquire()).await,
            };
            let reused = matches!(acquired, Ok(Acquired::Idle(_)));
            let connected = match acquired {
                Ok(Acquired::Idle(c)) => Ok(c),
                Ok(Acquired::New(slot)) => self.connect(Some(slot)).await,
                Err(e) => Err(e),
            };
            let mut conn = match connected {
                Ok(c) => c,
                Err(error) => {
                    return Err(SendError {
                        error,
                        unsent: Some(request),
                    });
                }
            };
            // A pooled sender is ready once its connection has finished the previous exchange;
            // a closed one errors here and a fresh connection is used.
            if conn.sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(SendError {
                    error: UpstreamError::Connect(std::io::Error::other(
                        "connection closed during handshake",
                    )),
                    unsent: Some(request),
                });
            }
            match conn.sender.try_send_request(request).await {
                Ok(response) => {
                    let keep = response.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                    let pool = keep.then(|| Return {
                        conn,
                        pool: Arc::downgrade(self),
                        request: watch,
                    });
                    return Ok(response.map(|body| PooledBody::new(body, pool)));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on a new connection, once.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::sent(e.into_error().into())),
                },
            }
        }
    }
}

/// What identifies a pool: a reload that changes none of it keeps the pool's connections.
type PoolKey = (
    Authority,
    Duration,
    usize,
    Protocol,
    Option<[u8; 32]>,
    Option<HealthCheck>,
);

/// Pools for every target, kept across reloads (a reload keeps its upstream connections).
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<TargetPool>>>,
}

impl Pools {
    /// Forgets the pools no runtime uses any more (their reapers and checkers end with them).
    pub fn prune(&self) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|_, pool| Arc::strong_count(pool) > 1);
    }

    /// The pool of one target (created on first use, with its reaper when a runtime runs).
    pub fn get(
        &self,
        authority: &Authority,
        dial: Dial,
        max_idle: usize,
        check: Option<&HealthCheck>,
    ) -> Arc<TargetPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (
            authority.clone(),
            dial.connect_timeout,
            max_idle,
            dial.protocol,
            dial.fingerprint(),
            check.cloned(),
        );
        pools
            .entry(key)
            .or_insert_with(|| {
                let pool = Arc::new(TargetPool::new(authority.clone(), dial, max_idle));
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(reaper(Arc::downgrade(&pool)));
                    if let Some(check) = check {
                        runtime.spawn(health::checker(Arc::downgrade(&pool), check.clone()));
                    }
                }
                pool
            })
            .clone()
    }
}

/// Closes a pool's long-idle connections every [`REAP_EVERY`] until the pool is gone.
async fn reaper(pool: Weak<TargetPool>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let closed = pool.reap(Instant::now());
        if closed > 0 {
            tracing::debug!(target = %pool.authority, closed, "closed idle upstream connections");
        }
    }
}

/// What a response body gives back when it ends: the connection, to its pool, if the request
/// that went out on it was written whole.
struct Return {
    conn: Conn,
    pool: Weak<TargetPool>,
    request: BodyWatch,
}

/// An upstream response body that hands its connection back to the pool once read to the end,
/// and reads the upstream only while the client takes bytes (HTTP/1 clients).
pub struct PooledBody {
    inner: Incoming,
    pool: Option<Return>,
    /// On an HTTP/2 connection: this request's place among its streams.
    stream: Option<Stream>,
    client: Option<Arc<crate::timeouts::ClientWrites>>,
}

impl PooledBody {
    fn new(inner: Incoming, pool: Option<Return>) -> Self {
        let mut body = PooledBody {
            inner,
            pool,
            stream: None,
            client: None,
        };
        // hyper never polls a body that is already at its end (204, 304, HEAD, empty).
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    /// A response on an HTTP/2 connection (nothing to give back but the stream).
    fn multiplexed(inner: Incoming, stream: Stream) -> Self {
        let mut body = PooledBody {
            inner,
            pool: None,
            stream: Some(stream),
            client: None,
        };
        if body.inner.is_end_stream() {
            body.stream = None;
        }
        body
    }

    /// Streams only while `client`'s socket takes bytes.
    pub fn paced_by(mut self, client: Option<Arc<crate::timeouts::ClientWrites>>) -> Self {
        self.client = client;
        self
    }

    fn release(&mut self) {
        let Some(r) = self.pool.take() else { return };
        if !r.request.finished() {
            // The response ended before the request body did: the connection is still busy
            // writing a (maybe slow) upload nobody will read. Close it.
            r.conn.close();
            return;
        }
        if let Some(pool) = r.pool.upgrade() {
            pool.put(r.conn);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(client) = &self.client
            && client.poll_writable(cx).is_pending()
        {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Some(client), Poll::Ready(Some(Ok(_)))) = (&self.client, &polled) {
            // One chunk at a time in the client's write buffer: the next waits for this one
            // to reach the socket.
            client.block();
        }
        match &polled {
            Poll::Ready(None) => {
                self.release();
                self.stream = None;
            }
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                self.release();
                self.stream = None;
            }
            Poll::Ready(Some(Err(_))) => {
                self.pool = None;
                self.stream = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection to a target before HTTP is spoken over it.
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Transport {
    /// Whether ALPN settled on `h2` (a plain connection: only by prior knowledge).
    fn is_h2(&self) -> bool {
        match self {
            Transport::Plain(_) => true,
            Transport::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

async fn h1_handshake<T>(io: T) -> Result<Conn, UpstreamError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .read_buf_exact_size(Some(READ_BUFFER))
        .handshake(TokioIo::new(io))
        .await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(Conn {
        sender,
        task: task.abort_handle(),
        _slot: None,
    })
}

async fn h2_handshake(transport: Transport) -> Result<H2Conn, UpstreamError> {
    async fn run<T>(io: T) -> Result<H2Conn, UpstreamError>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(H2Conn {
            sender,
            streams: Arc::new(AtomicUsize::new(0)),
            task: task.abort_handle(),
        })
    }
    match transport {
        Transport::Plain(s) => run(s).await,
        Transport::Tls(s) => run(*s).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target that accepts and keeps every connection, counting those still open.
    async fn holding_target() -> (Authority, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counter = counter.clone();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                        .await
                        .is_ok_and(|n| n > 0)
                    {}
                    counter.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr.to_string().parse().unwrap(), open)
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    }

    #[tokio::test]
    async fn the_idle_set_is_bounded_newest_first_and_reaped() {
        use std::sync::atomic::Ordering;
        let (authority, open) = holding_target().await;
        let pool = Arc::new(TargetPool::new(
            authority,
            Dial::plain(Duration::from_secs(1)),
            2,
        ));
        let conns = [
            pool.connect(None).await.unwrap(),
            pool.connect(None).await.unwrap(),
            pool.connect(None).await.unwrap(),
        ];
        until("three connections open", || {
            open.load(Ordering::SeqCst) == 3
        })
        .await;
        for c in conns {
            pool.put(c);
        }
        assert_eq!(pool.idle_count(), 2, "the idle set is capped");
        until("the oldest idle connection is closed", || {
            open.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(pool.reap(Instant::now()), 0, "nothing idle for 90 s yet");
        let taken = pool.checkout().expect("an idle connection");
        pool.put(taken);
        assert_eq!(pool.reap(Instant::now() + IDLE_TIMEOUT), 2);
        assert_eq!(pool.idle_count(), 0);
        until("reaped connections are closed", || {
            open.load(Ordering::SeqCst) == 0
        })
        .await;
    }
}
