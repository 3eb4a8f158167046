//! The request body as forwarded: the client's body streamed to the upstream with `max_body`
//! enforced as it streams, an idle timer while the upstream waits for it, and a [`BodyWatch`]
//! telling the forwarder what went wrong and the upstream pool whether it went out whole.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use crate::timeouts::StallTimer;

/// What happened to a request body on its way to the upstream, shared between the body (which
/// sees it), the forwarder (which turns a fault into a response) and the upstream pool (which
/// reuses a connection only once its request was written whole).
#[derive(Clone, Default)]
pub struct BodyWatch(Arc<WatchState>);

#[derive(Default)]
struct WatchState {
    /// 0: no fault, else one of the `BODY_*` codes.
    fault: AtomicU8,
    /// The body was read to its end (so the upstream request was written whole).
    finished: AtomicBool,
    /// The parser's message for a malformed body, for the log.
    message: std::sync::OnceLock<String>,
}

/// What went wrong with a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFault {
    /// It passed `max_body`.
    TooLarge,
    /// It sent nothing for the body idle timeout.
    Idle,
    /// It did not parse (the parser's message, for the log).
    Malformed(String),
}

const BODY_TOO_LARGE: u8 = 1;
const BODY_IDLE: u8 = 2;
const BODY_MALFORMED: u8 = 3;

impl BodyWatch {
    fn set(&self, fault: u8) {
        self.0.fault.store(fault, Ordering::Relaxed);
    }

    fn finish(&self) {
        self.0.finished.store(true, Ordering::Release);
    }

    /// Whether the whole body went out: only then may its connection carry another request.
    pub fn finished(&self) -> bool {
        self.0.finished.load(Ordering::Acquire)
    }

    /// What went wrong with the body, if anything did.
    pub fn fault(&self) -> Option<BodyFault> {
        match self.0.fault.load(Ordering::Relaxed) {
            BODY_TOO_LARGE => Some(BodyFault::TooLarge),
            BODY_IDLE => Some(BodyFault::Idle),
            BODY_MALFORMED => Some(BodyFault::Malformed(
                self.0.message.get().cloned().unwrap_or_default(),
            )),
            _ => None,
        }
    }
}

/// The request body as forwarded: the client's body, failing once it passes `max_body` or
/// sends nothing for the body idle timeout (counted only while the upstream is asking for it).
pub struct RequestBody {
    inner: Incoming,
    remaining: Option<u64>,
    max: u64,
    idle: StallTimer,
    watch: BodyWatch,
}

/// A request body passed `max_body` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// A request body stopped arriving.
#[derive(Debug, thiserror::Error)]
#[error("request body idle for longer than the body idle timeout")]
pub struct BodyIdle;

impl RequestBody {
    /// What the pool watches: whether this body was sent whole.
    pub fn watch(&self) -> &BodyWatch {
        &self.watch
    }

    pub fn new(
        inner: Incoming,
        max_body: Option<u64>,
        idle_timeout: Duration,
    ) -> (RequestBody, BodyWatch) {
        let watch = BodyWatch::default();
        if inner.is_end_stream() {
            watch.finish();
        }
        (
            RequestBody {
                inner,
                remaining: max_body,
                max: max_body.unwrap_or(u64::MAX),
                idle: StallTimer::new(idle_timeout),
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.progress();
                if let (Some(remaining), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                    let n = data.len() as u64;
                    if n > *remaining {
                        this.watch.set(BODY_TOO_LARGE);
                        return Poll::Ready(Some(Err(Box::new(TooLarge(this.max)))));
                    }
                    *remaining -= n;
                }
                if this.inner.is_end_stream() {
                    this.watch.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // hyper's server read this body from the client: bad chunk framing or a
                // connection cut mid-body is the client's doing, never the upstream's.
                let _ = this.watch.0.message.set(error_chain(&e));
                this.watch.set(BODY_MALFORMED);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.watch.finish();
                Poll::Ready(None)
            }
            Poll::Pending if this.idle.poll_expired(cx) => {
                this.watch.set(BODY_IDLE);
                Poll::Ready(Some(Err(Box::new(BodyIdle))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An error and its sources on one line, for the log.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
