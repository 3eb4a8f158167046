//! Upstream connections: per target, a pool of keep-alive HTTP/1.1 connections (hyper's
//! low-level client), at most `max_connections_per_target` of them kept idle.
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

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use crate::body::{BodyWatch, RequestBody};

/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the reaper looks for connections idle longer than [`IDLE_TIMEOUT`].
const REAP_EVERY: Duration = Duration::from_secs(10);
/// What one upstream connection buffers of a response at most: hyper's default (about 400 KiB)
/// is what a client that stops reading would pin per connection.
const READ_BUFFER_MAX: usize = 8 * 1024;

/// Why a request got no response from a target.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One open connection: the handle to send on and the task driving it (aborted to close it at
/// once).
struct Conn {
    sender: SendRequest<RequestBody>,
    task: AbortHandle,
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

/// The connections to one target.
pub struct TargetPool {
    authority: Authority,
    connect_timeout: Duration,
    /// Idle connections kept at most (`max_connections_per_target`).
    max_idle: usize,
    /// Oldest at the front, newest at the back.
    idle: Mutex<VecDeque<Idle>>,
}

impl TargetPool {
    fn new(authority: Authority, connect_timeout: Duration, max_idle: usize) -> TargetPool {
        TargetPool {
            authority,
            connect_timeout,
            max_idle,
            idle: Mutex::new(VecDeque::new()),
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

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
        .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(READ_BUFFER_MAX)
            .handshake(TokioIo::new(stream))
            .await?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Conn {
            sender,
            task: task.abort_handle(),
        })
    }

    /// Sends `request` and waits for the response head.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let watch = request.body().watch().clone();
        let mut pooled = self.checkout();
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            // A pooled sender is ready once its connection has finished the previous exchange;
            // a closed one errors here and a fresh connection is used.
            if conn.sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Connect(std::io::Error::other(
                    "connection closed during handshake",
                )));
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
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// Pools for every target, kept across reloads (a reload keeps its upstream connections).
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<(Authority, Duration, usize), Arc<TargetPool>>>,
}

impl Pools {
    /// The pool of one target (created on first use, with its reaper when a runtime runs).
    pub fn get(
        &self,
        authority: &Authority,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> Arc<TargetPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry((authority.clone(), connect_timeout, max_idle))
            .or_insert_with(|| {
                let pool = Arc::new(TargetPool::new(
                    authority.clone(),
                    connect_timeout,
                    max_idle,
                ));
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(reaper(Arc::downgrade(&pool)));
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
    client: Option<Arc<crate::timeouts::ClientWrites>>,
}

impl PooledBody {
    fn new(inner: Incoming, pool: Option<Return>) -> Self {
        let mut body = PooledBody {
            inner,
            pool,
            client: None,
        };
        // hyper never polls a body that is already at its end (204, 304, HEAD, empty).
        if body.inner.is_end_stream() {
            body.release();
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
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.pool = None,
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
        let pool = Arc::new(TargetPool::new(authority, Duration::from_secs(1), 2));
        let conns = [
            pool.connect().await.unwrap(),
            pool.connect().await.unwrap(),
            pool.connect().await.unwrap(),
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
