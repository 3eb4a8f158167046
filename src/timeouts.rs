//! The timeouts hyper does not provide: a client that stops reading its response (write
//! stalls), a request body that stops arriving (body idle), and an upgraded connection with no
//! traffic either way. Each measures a stall from its start, so a busy connection never pays
//! for a timer and a slow one is cut exactly at its timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
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

/// The least a client must accept in each `send_timeout` while tollgate has bytes waiting for
/// it: 4 KiB (68 bytes a second at the default 60 s). A reader that takes a few bytes a second
/// would otherwise hold its connection, and the upstream connection behind it, forever.
pub const MIN_SEND_PROGRESS: u64 = 4096;

/// A minimum-progress rule for writes. A window opens when a write has to wait (the client's
/// socket is full) and lasts `timeout`; it closes as soon as the client has taken
/// [`MIN_SEND_PROGRESS`] bytes in it. A window that runs out under the minimum while writes
/// still wait for the client is a stall; one that runs out while tollgate itself had nothing
/// to send (a slow upstream stream) just closes.
struct ProgressTimer {
    timeout: Duration,
    min: u64,
    /// The open window: its end and the bytes the client took in it.
    window: Option<(Instant, u64)>,
    /// The last write had to wait for the client.
    waited: bool,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ProgressTimer {
    fn new(timeout: Duration, min: u64) -> ProgressTimer {
        ProgressTimer {
            timeout,
            min,
            window: None,
            waited: false,
            sleep: None,
        }
    }

    fn open(&mut self, now: Instant) {
        let deadline = now + self.timeout;
        self.window = Some((deadline, 0));
        match &mut self.sleep {
            Some(s) => s.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// The client took `n` bytes: true when that came too late (the window ran out under the
    /// minimum with the client as the bottleneck). The clock is read only while a window is
    /// open.
    fn progress(&mut self, n: usize) -> bool {
        let waited = std::mem::take(&mut self.waited);
        if let Some((deadline, bytes)) = &mut self.window {
            *bytes += n as u64;
            if *bytes >= self.min {
                self.window = None;
            } else if Instant::now() >= *deadline {
                if waited {
                    return true;
                }
                self.window = None;
            }
        }
        false
    }

    /// A write has to wait: true when the window ran out under the minimum.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        self.waited = true;
        loop {
            let now = Instant::now();
            match self.window {
                None => self.open(now),
                Some((deadline, bytes)) if now >= deadline => {
                    if bytes < self.min {
                        return true;
                    }
                    self.open(now);
                }
                Some(_) => {}
            }
            let Some(sleep) = self.sleep.as_mut() else {
                return false;
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

/// Whether a client connection's socket is full, shared with the upstream bodies streaming to
/// it: while the client does not read, they stop reading the upstream, so what tollgate holds
/// for a slow reader is a chunk or two, not hyper's whole write buffer (the rest stays in the
/// upstream's socket and, past that, the upstream).
#[derive(Debug, Default)]
pub struct ClientWrites {
    blocked: AtomicBool,
    waiting: std::sync::Mutex<Option<Waker>>,
}

impl ClientWrites {
    /// Marks the socket full until the next write goes through.
    pub fn block(&self) {
        self.blocked.store(true, Ordering::Release);
    }

    fn unblock(&self) {
        if self.blocked.swap(false, Ordering::AcqRel)
            && let Some(w) = self
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        {
            w.wake();
        }
    }

    /// Ready while the client takes bytes; else registers the task to be woken when it does.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.blocked.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // Unblocked between the check and the registration: go on.
        if self.blocked.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// A client connection held to a minimum rate while it has bytes waiting: a client that does
/// not read its response, or reads a few bytes a second, is disconnected instead of holding an
/// upstream connection forever. It also tells [`ClientWrites`] when the socket is full.
pub struct WriteStall<T> {
    inner: T,
    timer: ProgressTimer,
    writes: Option<Arc<ClientWrites>>,
}

impl<T> WriteStall<T> {
    pub fn new(inner: T, timeout: Duration) -> WriteStall<T> {
        WriteStall {
            inner,
            timer: ProgressTimer::new(timeout, MIN_SEND_PROGRESS),
            writes: None,
        }
    }

    /// Reports the socket's fullness to `writes`.
    pub fn reporting(mut self, writes: Arc<ClientWrites>) -> WriteStall<T> {
        self.writes = Some(writes);
        self
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
        if let Some(w) = &self.writes {
            match r {
                Poll::Pending => w.block(),
                Poll::Ready(_) => w.unblock(),
            }
        }
        match r {
            Poll::Pending if self.timer.poll_stalled(cx) => Poll::Ready(Err(stalled())),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(n)) if self.timer.progress(n) => Poll::Ready(Err(stalled())),
            ready => ready,
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
            Poll::Pending if self.timer.poll_stalled(cx) => Poll::Ready(Err(stalled())),
            other => other,
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

    /// A reader taking `chunk` bytes every `every`; returns what the writer's `write_all` gave
    /// and after how long, and how much the reader got.
    async fn reader_at(
        chunk: usize,
        every: Duration,
        total: usize,
    ) -> (io::Result<()>, Duration, usize) {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut guarded = WriteStall::new(client, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; chunk];
            let mut got = 0;
            while got < total {
                tokio::time::sleep(every).await;
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        });
        let started = Instant::now();
        let written = guarded.write_all(&vec![1u8; total]).await;
        let took = started.elapsed();
        drop(guarded);
        (written, took, reader.await.unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_reader_is_not_cut() {
        // 1 KiB a second: 5 KiB per 5 s window, above the 4 KiB minimum.
        let (written, _, got) = reader_at(1024, Duration::from_secs(1), 32 * 1024).await;
        written.unwrap();
        assert_eq!(got, 32 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_taking_a_few_bytes_a_second_is_cut() {
        // 64 bytes a second: 320 bytes per 5 s window, under the minimum.
        let (written, took, got) = reader_at(64, Duration::from_secs(1), 32 * 1024).await;
        assert_eq!(written.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(got < 32 * 1024);
        assert_eq!(
            took,
            Duration::from_secs(5),
            "cut when the first window runs out"
        );
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
