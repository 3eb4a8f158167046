//! The timeouts hyper does not provide: a client that stops reading its response (write
//! stalls), a request body that stops arriving (body idle), and an upgraded connection with no
//! traffic either way. Each measures a stall from its start, so a busy connection never pays
//! for a timer and a slow one is cut exactly at its timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Measures one kind of stall: armed when an operation first returns `Pending`, disarmed by
/// progress, expired when a stall lasts `timeout`.
pub struct StallTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl StallTimer {
    pub fn new(timeout: Duration) -> StallTimer {
        StallTimer {
            timeout,
            sleep: None,
            stalled: false,
        }
    }

    /// The operation made progress.
    pub fn progress(&mut self) {
        self.stalled = false;
    }

    /// The operation is pending: returns true once the stall has lasted the timeout. Registers
    /// the task's waker with the timer, so the caller is polled again when it expires.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = Instant::now() + self.timeout;
        if !self.stalled {
            self.stalled = true;
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match &mut self.sleep {
            Some(s) => s.as_mut().poll(cx).is_ready(),
            None => false,
        }
    }
}

/// A client connection whose writes may stall at most `timeout` (a client that does not read
/// its response is disconnected instead of holding an upstream connection forever).
pub struct WriteStall<T> {
    inner: T,
    timer: StallTimer,
}

impl<T> WriteStall<T> {
    pub fn new(inner: T, timeout: Duration) -> WriteStall<T> {
        WriteStall {
            inner,
            timer: StallTimer::new(timeout),
        }
    }
}

fn stalled() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "client stopped reading (send timeout)",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> WriteStall<T> {
    fn track(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Pending if self.timer.poll_expired(cx) => Poll::Ready(Err(stalled())),
            Poll::Pending => Poll::Pending,
            ready => {
                self.timer.progress();
                ready
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending if self.timer.poll_expired(cx) => Poll::Ready(Err(stalled())),
            Poll::Pending => Poll::Pending,
            ready => {
                self.timer.progress();
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The last time bytes moved on an upgraded connection, shared by both directions.
#[derive(Clone)]
pub struct Activity {
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An IO whose reads and writes count as activity.
pub struct Tracked<T> {
    pub inner: T,
    pub activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_writer_nobody_reads_times_out() {
        let (client, _server) = tokio::io::duplex(1024);
        let mut guarded = WriteStall::new(client, Duration::from_secs(5));
        let started = Instant::now();
        let big = vec![0u8; 64 * 1024];
        let err = guarded.write_all(&big).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_reader_is_not_cut() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut guarded = WriteStall::new(client, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut total = 0;
            while total < 16 * 1024 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                total += server.read(&mut buf).await.unwrap();
            }
            total
        });
        guarded.write_all(&vec![1u8; 16 * 1024]).await.unwrap();
        drop(guarded);
        assert!(reader.await.unwrap() >= 16 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_idles_from_the_last_byte() {
        let activity = Activity::default();
        let (a, mut b) = tokio::io::duplex(64);
        let mut tracked = Tracked {
            inner: a,
            activity: activity.clone(),
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        tracked.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        let started = Instant::now();
        activity.idle_for(Duration::from_secs(10)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
