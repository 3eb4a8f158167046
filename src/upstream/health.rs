//! Target health: passive ejection of a target that refuses connections (with a back-off
//! from 1 s doubling to 30 s, after which one request tries it again) and active checks
//! (`health_check`: a GET of `path` every `interval`, each within `timeout`; a 2xx or 3xx
//! passes; `unhealthy_after` failures in a row take the target out, `healthy_after` passes
//! bring it back). Round robin skips targets that are not [`Health::usable`]; when none is,
//! every target is still tried before a 502. Each transition is logged and shown in
//! `tollgate_upstream_healthy{upstream, target}`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use http::uri::Authority;
use prometheus_client::metrics::gauge::Gauge;

use super::TargetPool;
use crate::policy::HealthCheck;

/// Longest passive back-off.
const BACKOFF_MAX_MS: u64 = 30_000;

/// The health of one target.
pub struct Health {
    /// The active checks' verdict (true without active checks).
    checked: AtomicBool,
    /// Connections refused in a row.
    refused: AtomicU32,
    /// No requests before this (ms since `epoch`): the passive back-off.
    ejected_until: AtomicU64,
    epoch: Instant,
    gauges: Mutex<Vec<Gauge>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            checked: AtomicBool::new(true),
            refused: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
            gauges: Mutex::new(Vec::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether round robin sends requests to the target now.
    pub fn usable(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
            && self.now_ms() >= self.ejected_until.load(Ordering::Relaxed)
    }

    /// Healthy as the gauge shows it: passing its checks and not ejected.
    pub fn healthy(&self) -> bool {
        self.checked.load(Ordering::Relaxed) && self.refused.load(Ordering::Relaxed) == 0
    }

    /// Shows this target's health in `gauge` from now on.
    pub fn attach(&self, gauge: Gauge) {
        gauge.set(i64::from(self.healthy()));
        let mut gauges = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        if !gauges
            .iter()
            .any(|g| std::ptr::eq(g.inner(), gauge.inner()))
        {
            gauges.push(gauge);
        }
    }

    fn show(&self) {
        let value = i64::from(self.healthy());
        for g in self.gauges.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            g.set(value);
        }
    }

    /// A connection to the target was refused (or timed out): ejected for the back-off.
    pub fn refused(&self, target: &Authority) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let backoff = (1000u64 << (n - 1).min(5)).min(BACKOFF_MAX_MS);
        self.ejected_until
            .store(self.now_ms() + backoff, Ordering::Relaxed);
        if n == 1 {
            tracing::warn!(target_addr = %target, backoff_ms = backoff, "upstream target unhealthy: it refused a connection; no requests to it during the back-off");
            self.show();
        }
    }

    /// A connection to the target was opened.
    pub fn connected(&self, target: &Authority) {
        if self.refused.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.refused.swap(0, Ordering::Relaxed) > 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
            tracing::info!(target_addr = %target, "upstream target accepts connections again");
            self.show();
        }
    }

    /// An active check's verdict, once `unhealthy_after` / `healthy_after` agree.
    fn set_checked(&self, target: &Authority, healthy: bool, why: &str) {
        if self.checked.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!(target_addr = %target, "upstream target healthy: {why}");
            } else {
                tracing::warn!(target_addr = %target, "upstream target unhealthy: {why}");
            }
            self.show();
        }
    }
}

/// The target to send to: the first usable one from round robin's `next`, or `next` itself
/// when none is (every target is still tried).
pub fn choose(next: usize, pools: &[Arc<TargetPool>]) -> usize {
    let n = pools.len();
    (0..n)
        .map(|i| (next + i) % n)
        .find(|&i| pools[i].health.usable())
        .unwrap_or(next % n.max(1))
}

/// Another target than `failed` for a request that could not be sent: a usable one if any,
/// else any other.
pub fn another(failed: usize, pools: &[Arc<TargetPool>]) -> Option<usize> {
    let n = pools.len();
    let others = (1..n).map(|i| (failed + i) % n);
    others
        .clone()
        .find(|&i| pools[i].health.usable())
        .or_else(|| others.into_iter().next())
}

/// Checks the pool's target every `check.interval` until the pool is gone.
pub async fn checker(pool: Weak<TargetPool>, check: HealthCheck) {
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passes, mut failures) = (0u32, 0u32);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let outcome = tokio::time::timeout(check.timeout, pool.probe(&check.path)).await;
        let result = match outcome {
            Err(_) => Err(format!(
                "no answer to {} within {:?}",
                check.path, check.timeout
            )),
            Ok(Err(e)) => Err(format!("{} failed: {e}", check.path)),
            Ok(Ok(status)) if status.is_success() || status.is_redirection() => Ok(status),
            Ok(Ok(status)) => Err(format!("{} answered {status}", check.path)),
        };
        match result {
            Ok(status) => {
                failures = 0;
                passes = passes.saturating_add(1);
                if passes >= check.healthy_after {
                    let why = format!("{passes} checks of {} passed ({status})", check.path);
                    pool.health.set_checked(&pool.authority, true, &why);
                }
            }
            Err(why) => {
                passes = 0;
                failures = failures.saturating_add(1);
                if failures >= check.unhealthy_after {
                    let why = format!("{failures} checks failed in a row, the last: {why}");
                    pool.health.set_checked(&pool.authority, false, &why);
                }
            }
        }
    }
}

/// How long a check waits at most, for tests of the arithmetic.
#[cfg(test)]
fn backoff_ms(n: u32) -> u64 {
    (1000u64 << (n - 1).min(5)).min(BACKOFF_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_thirty_seconds() {
        let got: Vec<u64> = (1..=7).map(backoff_ms).collect();
        assert_eq!(got, [1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
    }

    #[test]
    fn a_refused_target_is_ejected_then_back_on_connect() {
        let h = Health::new();
        let target: Authority = "127.0.0.1:1".parse().unwrap();
        let gauge = Gauge::default();
        h.attach(gauge.clone());
        assert!(h.usable() && gauge.get() == 1);
        h.refused(&target);
        assert!(!h.usable() && !h.healthy() && gauge.get() == 0);
        h.connected(&target);
        assert!(h.usable() && gauge.get() == 1);
        h.set_checked(&target, false, "test");
        assert!(!h.usable() && gauge.get() == 0);
        h.set_checked(&target, true, "test");
        assert!(h.usable());
    }

    #[test]
    fn the_same_gauge_is_attached_once() {
        let h = Health::new();
        let gauge = Gauge::default();
        h.attach(gauge.clone());
        h.attach(gauge.clone());
        assert_eq!(h.gauges.lock().unwrap().len(), 1);
    }
}
