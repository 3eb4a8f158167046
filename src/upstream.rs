//! Upstream connections: per target, a pool of keep-alive HTTP/1.1 connections (hyper's
//! low-level client). A connection goes back to the pool when its response body has been read
//! to the end, and is taken newest first. A request that could not even be written on a pooled
//! connection (the upstream closed it meanwhile) is retried once on a fresh one; its body was
//! never touched. hyper-util's general-purpose pool (hashing a key, locks, an extra task hop per
//! request) cost about a fifth of tollgate's own instructions per request; this does only what
//! a proxy with a fixed set of targets needs.

use std::collections::HashMap;
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

use crate::proxy::RequestBody;

/// Idle connections kept per target.
const MAX_IDLE: usize = 8192;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// The connections to one target.
pub struct TargetPool {
    authority: Authority,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

impl TargetPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest idle connection that is still open.
    fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.lock();
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() && entry.since.elapsed() < IDLE_TIMEOUT {
                return Some(entry.sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        // The oldest sit at the bottom: drop one that has idled too long, or the oldest when
        // full, so the pool neither grows nor keeps dead weight.
        if idle
            .first()
            .is_some_and(|e| e.since.elapsed() >= IDLE_TIMEOUT)
            || idle.len() >= MAX_IDLE
        {
            idle.remove(0);
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
        .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `request` and waits for the response head.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let mut pooled = self.checkout();
        loop {
            let reused = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(s) => s,
                None => self.connect().await?,
            };
            // A pooled sender is ready once its connection has finished the previous exchange;
            // a closed one errors here and a fresh connection is used.
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Connect(std::io::Error::other(
                    "connection closed during handshake",
                )));
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let keep = response.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                    let pool = keep.then(|| (sender, Arc::downgrade(self)));
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
    pools: Mutex<HashMap<(Authority, Duration), Arc<TargetPool>>>,
}

impl Pools {
    /// The pool of one target (created on first use).
    pub fn get(&self, authority: &Authority, connect_timeout: Duration) -> Arc<TargetPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry((authority.clone(), connect_timeout))
            .or_insert_with(|| {
                Arc::new(TargetPool {
                    authority: authority.clone(),
                    connect_timeout,
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }
}

/// An upstream response body that hands its connection back to the pool once read to the end.
pub struct PooledBody {
    inner: Incoming,
    pool: Option<(SendRequest<RequestBody>, Weak<TargetPool>)>,
}

impl PooledBody {
    fn new(inner: Incoming, pool: Option<(SendRequest<RequestBody>, Weak<TargetPool>)>) -> Self {
        let mut body = PooledBody { inner, pool };
        // hyper never polls a body that is already at its end (204, 304, HEAD, empty).
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((sender, pool)) = self.pool.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.put(sender);
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
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
