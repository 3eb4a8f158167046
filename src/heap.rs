//! Gives freed heap memory back to the operating system. glibc's allocator keeps the pages it
//! freed inside each thread's arena (only the very top of a heap is trimmed by itself), so a
//! burst of slow clients leaves its peak RSS behind long after they left. When many connections
//! have closed since the last look, [`Trimmer`] asks glibc (`malloc_trim`) to release free pages
//! in every arena; it costs a few milliseconds, off the request path on a blocking thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How often open connections are compared with the last trim's count.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// Connections that must have closed since the last trim (or since the peak) to trim again.
const CLOSED_ENOUGH: usize = 64;

/// Watches a connection count and trims the heap after it fell.
pub struct Trimmer {
    peak: AtomicUsize,
}

impl Trimmer {
    pub fn new() -> Trimmer {
        Trimmer {
            peak: AtomicUsize::new(0),
        }
    }

    /// A connection opened: `open` are open now (the peak between two looks is not missed).
    pub fn saw(&self, open: usize) {
        self.peak.fetch_max(open, Ordering::Relaxed);
    }

    /// Called every [`LOOK_EVERY`] with the connections open now: true when enough of them
    /// closed since the highest count seen after the last trim.
    fn should_trim(&self, open: usize) -> bool {
        let peak = self.peak.fetch_max(open, Ordering::Relaxed).max(open);
        if peak >= open + CLOSED_ENOUGH {
            self.peak.store(open, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Runs until `stop` resolves, looking at `open()` every [`LOOK_EVERY`].
    pub async fn run(
        self: std::sync::Arc<Self>,
        open: impl Fn() -> usize,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(LOOK_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            let now = open();
            if self.should_trim(now) {
                let _ = tokio::task::spawn_blocking(trim).await;
                tracing::info!(open = now, "returned freed heap memory to the system");
            }
        }
    }
}

impl Default for Trimmer {
    fn default() -> Self {
        Trimmer::new()
    }
}

/// Releases the free pages of every malloc arena to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread at any time;
    // it only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own terms: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_enough_connections_closed() {
        let t = Trimmer::new();
        assert!(!t.should_trim(0));
        assert!(!t.should_trim(500));
        assert!(!t.should_trim(480), "20 closed: not enough");
        assert!(t.should_trim(400), "100 closed since the peak");
        assert!(!t.should_trim(400), "nothing closed since the trim");
        assert!(!t.should_trim(350));
        assert!(t.should_trim(300));
        // A peak between two looks counts.
        t.saw(900);
        assert!(t.should_trim(10));
    }
}
