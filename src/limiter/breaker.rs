//! A circuit breaker for the store: after repeated failures it stops calling the store for a
//! short back-off (decisions fail at once and the route's `on_store_error` applies), then lets
//! a single probe through; the probe's success closes it, its failure doubles the back-off (up
//! to a ceiling). A long outage thus costs no waiting requests, no piled-up connection attempts
//! and no memory, and recovery takes at most one back-off after the store returns.
//!
//! [`call`] is the limiter's third layer: every store call goes through it, under the breaker of
//! the call's keys and the store timeout.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Decision, Item, Limiter, StoreError};

/// Consecutive failures that open the circuit.
const THRESHOLD: u32 = 5;
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub struct Breaker {
    origin: Instant,
    failures: AtomicU32,
    /// Milliseconds since `origin` until which the circuit is open; 0 = closed.
    open_until: AtomicU64,
    backoff_ms: AtomicU64,
    probing: AtomicBool,
}

/// What the breaker says about one call.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<'a> {
    /// Closed: call the store.
    Call,
    /// The back-off has passed: this call is the one probe; report its result through it.
    Probe(ProbeGuard<'a>),
    /// Open: do not call the store.
    Open,
}

/// Releases the probe slot if the probe's result is never reported (the request went away).
#[derive(Debug)]
pub struct ProbeGuard<'a>(Option<&'a Breaker>);

impl PartialEq for ProbeGuard<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.is_some() == other.0.is_some()
    }
}
impl Eq for ProbeGuard<'_> {}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("open", &self.is_open())
            .finish()
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.probing.store(false, Ordering::Release);
        }
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            origin: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(MIN_BACKOFF.as_millis() as u64),
            probing: AtomicBool::new(false),
        }
    }
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    pub fn admit(&self) -> Admission<'_> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Call;
        }
        if self.now_ms() < until {
            return Admission::Open;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Admission::Probe(ProbeGuard(Some(self))),
            Err(_) => Admission::Open,
        }
    }

    /// Another breaker of the same store saw it answer again: probe at the next call instead of
    /// waiting out the back-off.
    pub fn nudge(&self) {
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 {
            let _ = self.open_until.compare_exchange(
                until,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The store answered. Returns whether this closed an open circuit.
    pub fn success(&self, probe: Option<ProbeGuard<'_>>) -> bool {
        self.failures.store(0, Ordering::Release);
        let closed = self.open_until.swap(0, Ordering::AcqRel) != 0;
        if closed {
            self.backoff_ms
                .store(MIN_BACKOFF.as_millis() as u64, Ordering::Release);
            tracing::info!("store answers again: circuit closed");
        }
        drop(probe);
        closed
    }

    /// The store failed or timed out.
    pub fn failure(&self, probe: Option<ProbeGuard<'_>>) {
        if probe.is_some() {
            let backoff =
                (self.backoff_ms.load(Ordering::Acquire) * 2).min(MAX_BACKOFF.as_millis() as u64);
            self.backoff_ms.store(backoff, Ordering::Release);
            self.open_until
                .store(self.now_ms() + backoff, Ordering::Release);
            drop(probe);
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= THRESHOLD
            && self
                .open_until
                .compare_exchange(
                    0,
                    self.now_ms() + self.backoff_ms.load(Ordering::Acquire),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            tracing::warn!(
                failures,
                "store failing: circuit open, decisions fail fast until a probe succeeds"
            );
        }
    }
}

/// The breaker layer: one store decision for `items`, refused at once while the breaker of
/// their keys is open, bounded by the limiter's timeout; its duration, errors and the open
/// breakers go to the metrics. Also returns when the store was asked (retry-afters count from
/// then).
pub(super) async fn call(
    limiter: &Limiter,
    items: &[Item],
) -> (Result<Decision, StoreError>, Instant) {
    let asked = Instant::now();
    let breaker = items.first().and_then(|i| limiter.store.breaker(&i.tag));
    let probe = match breaker.map(|b| b.admit()) {
        None | Some(Admission::Call) => None,
        Some(Admission::Probe(guard)) => Some(guard),
        Some(Admission::Open) => {
            limiter.record_error(&StoreError::CircuitOpen);
            return (Err(StoreError::CircuitOpen), asked);
        }
    };
    let asked = Instant::now();
    let result =
        match tokio::time::timeout(limiter.timeout, limiter.store.decide(items, None)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(limiter.timeout)),
        };
    limiter
        .metrics
        .store_duration
        .observe(asked.elapsed().as_secs_f64());
    if let Some(b) = breaker {
        match &result {
            Ok(_) => {
                if b.success(probe) {
                    // One group of slots answers again: let the others probe now too.
                    limiter.store.nudge_breakers();
                }
            }
            Err(_) => b.failure(probe),
        }
        limiter
            .metrics
            .circuit_open
            .set(limiter.store.open_breakers() as i64);
    }
    if let Err(e) = &result {
        limiter.record_error(e);
    }
    (result, asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_probes_once() {
        let b = Breaker::default();
        for _ in 0..THRESHOLD - 1 {
            assert_eq!(b.admit(), Admission::Call);
            b.failure(None);
        }
        assert!(!b.is_open());
        b.failure(None);
        assert!(b.is_open());
        assert_eq!(b.admit(), Admission::Open);
        std::thread::sleep(MIN_BACKOFF + Duration::from_millis(20));
        let Admission::Probe(probe) = b.admit() else {
            panic!("expected a probe")
        };
        assert_eq!(b.admit(), Admission::Open, "one probe at a time");
        b.success(Some(probe));
        assert!(!b.is_open());
        assert_eq!(b.admit(), Admission::Call);
    }

    #[test]
    fn a_failed_probe_backs_off_longer_and_an_abandoned_one_frees_the_slot() {
        let b = Breaker::default();
        for _ in 0..THRESHOLD {
            b.failure(None);
        }
        std::thread::sleep(MIN_BACKOFF + Duration::from_millis(20));
        let Admission::Probe(probe) = b.admit() else {
            panic!("expected a probe")
        };
        b.failure(Some(probe));
        std::thread::sleep(MIN_BACKOFF + Duration::from_millis(20));
        assert_eq!(b.admit(), Admission::Open, "the back-off doubled");
        std::thread::sleep(MIN_BACKOFF);
        let Admission::Probe(probe) = b.admit() else {
            panic!("expected a probe")
        };
        drop(probe);
        assert!(
            matches!(b.admit(), Admission::Probe(_)),
            "an abandoned probe is released"
        );
    }
}
