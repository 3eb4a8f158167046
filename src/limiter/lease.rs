//! Approximate mode (`batch = N` on a route's limits): a replica takes budget from the store N
//! units at a time and spends it locally, so the store sees about one call per N requests.
//!
//! A lease is taken through the ordinary all-or-nothing decision with `cost = N` (so the store
//! counts the whole batch at once); when a full batch no longer fits, exactly the request's own
//! cost is asked for instead, so the last units of a limit are never lost to rounding. A lease
//! expires with its fixed window (the units belong to that window), within one window length
//! for the sliding algorithms, and after at most [`MAX_LEASE`] in any case. The bounds, per limit and identity: at most
//! N x replicas admitted beyond the limit in any window (units taken in one window and spent
//! in the next), and at most N x replicas fewer (leases that expire unspent).
//!
//! The limiter's second layer: [`Leases::decide`] spends, fetches and tops up leases, asking the
//! layers below (breaker, store) through the limiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::sync::Notify;

use super::algorithm::{Algorithm, Micros, Outcome};
use super::shards::{Expires, Hashed, Shards};
use super::{Decision, Item, Limiter, StoreError};
use crate::identity::Tag;

/// The longest a lease lives when its window does not end sooner.
pub const MAX_LEASE: Duration = Duration::from_secs(1);
const SHARDS: usize = 16;
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Lease {
    units: u64,
    /// The store's remaining units when the lease was taken (for headers).
    store_remaining: u64,
    reset_at: Instant,
    expires: Instant,
}

impl Expires for Lease {
    type Time = Instant;
    fn live_at(&self, now: Instant) -> bool {
        self.expires > now
    }
}

/// Leases held by this replica.
pub struct Leases {
    map: Shards<Lease>,
    /// Limits and identities with a lease request under way, and who waits for it: one batch
    /// in flight per key and replica, so a burst of requests does not take many batches at
    /// once (which would leave that many units unspent when the limit runs out).
    fetching: Mutex<HashMap<(u64, Tag), Arc<Notify>>>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            map: Shards::new(SHARDS),
            fetching: Mutex::new(HashMap::new()),
        }
    }
}

/// The right to fetch leases for some keys; waiters are woken when it is dropped.
pub struct Fetch<'a> {
    leases: &'a Leases,
    keys: Vec<(u64, Tag)>,
    notify: Arc<Notify>,
}

impl Drop for Fetch<'_> {
    fn drop(&mut self) {
        let mut fetching = self
            .leases
            .fetching
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for key in &self.keys {
            fetching.remove(key);
        }
        drop(fetching);
        self.notify.notify_waiters();
    }
}

/// Whether this request fetches, or waits for another request's fetch.
pub enum Claim<'a> {
    Fetch(Fetch<'a>),
    Wait(tokio::sync::futures::OwnedNotified),
}

fn key(item: &Item) -> Hashed {
    Hashed::new(item.id, item.tag)
}

fn micros(d: Duration) -> Micros {
    d.as_micros() as Micros
}

impl Leases {
    /// Drops this replica's leases of `items` (an operator reset them; unspent units are not
    /// given back: the store's state they came from is gone).
    pub fn forget(&self, items: &[Item]) {
        for item in items {
            let key = key(item);
            self.map.lock(&key).remove(&key);
        }
    }

    /// Units this replica holds for `item` at `now`.
    pub fn available(&self, item: &Item, now: Instant) -> u64 {
        let key = key(item);
        self.map
            .lock(&key)
            .get(&key)
            .filter(|l| l.expires > now)
            .map_or(0, |l| l.units)
    }

    /// Claims the fetch of `short` items' leases, or returns what to wait on when another
    /// request is fetching one of them.
    pub fn claim(&self, items: &[Item], short: &[usize]) -> Claim<'_> {
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        for &i in short {
            if let Some(notify) = fetching.get(&(items[i].id, items[i].tag)) {
                return Claim::Wait(notify.clone().notified_owned());
            }
        }
        let notify = Arc::new(Notify::new());
        let keys: Vec<(u64, Tag)> = short.iter().map(|&i| (items[i].id, items[i].tag)).collect();
        for key in &keys {
            fetching.insert(*key, notify.clone());
        }
        Claim::Fetch(Fetch {
            leases: self,
            keys,
            notify,
        })
    }

    /// The items whose lease is down to less than half a batch: worth refilling before it
    /// runs out, so that requests do not wait for a fetch.
    pub fn low(&self, items: &[Item], now: Instant) -> Vec<usize> {
        (0..items.len())
            .filter(|&i| self.available(&items[i], now) * 2 < items[i].batch)
            .collect()
    }

    /// The items whose lease cannot cover their cost.
    pub fn short(&self, items: &[Item], now: Instant) -> Vec<usize> {
        (0..items.len())
            .filter(|&i| self.available(&items[i], now) < items[i].cost)
            .collect()
    }

    /// Adds a lease of `units` taken for `item` at `asked`, as the store's `outcome` describes.
    pub fn grant(&self, item: &Item, units: u64, outcome: &Outcome, asked: Instant) {
        let reset_at = asked + Duration::from_micros(outcome.reset);
        // Units counted in a window are spent within it: a fixed window's lease ends with the
        // window, a sliding one's within one window length. A bucket's tokens are simply taken
        // early; the lease only bounds how early.
        let life = match item.algorithm {
            Algorithm::FixedWindow { .. } => Duration::from_micros(outcome.reset),
            Algorithm::SlidingWindow { window, .. } | Algorithm::SlidingLog { window, .. } => {
                Duration::from_micros(window)
            }
            // Never leased (validation refuses `batch` with concurrency); a slot is not units.
            Algorithm::TokenBucket { .. }
            | Algorithm::Gcra { .. }
            | Algorithm::Concurrency { .. } => MAX_LEASE,
        };
        let expires = asked + life.min(MAX_LEASE);
        let key = key(item);
        if self.map.len() >= MAX_ENTRIES {
            self.map.retain(asked);
        }
        let mut map = self.map.lock(&key);
        match map.get_mut(&key) {
            Some(l) if l.expires > asked => {
                l.units += units;
                l.store_remaining = outcome.remaining;
                l.reset_at = reset_at;
                l.expires = l.expires.min(expires);
            }
            _ => {
                map.insert(
                    key,
                    Lease {
                        units,
                        store_remaining: outcome.remaining,
                        reset_at,
                        expires,
                    },
                );
            }
        }
    }

    /// Spends each item's cost from its lease, all or nothing: the admitted decision, or None
    /// when some lease cannot cover its item (then nothing is spent).
    pub fn spend(&self, items: &[Item], now: Instant) -> Option<Decision> {
        let keys: Vec<Hashed> = items.iter().map(key).collect();
        let mut locked = self.map.lock_all(&keys);
        for (item, key) in items.iter().zip(&keys) {
            match locked.get(key) {
                Some(l) if l.expires > now && l.units >= item.cost => {}
                _ => return None,
            }
        }
        let outcomes = items
            .iter()
            .zip(&keys)
            .map(|(item, key)| {
                let lease = locked.shard(key).get_mut(key).expect("checked");
                lease.units -= item.cost;
                Outcome {
                    allowed: true,
                    remaining: lease.store_remaining + lease.units,
                    reset: micros(lease.reset_at.saturating_duration_since(now)),
                    retry_after: 0,
                }
            })
            .collect();
        Some(Decision {
            admitted: true,
            outcomes,
            receipts: Vec::new(),
        })
    }

    /// Approximate mode: spend from this replica's leases; ask the store only for the limits
    /// whose lease ran out (one request per key at a time, the others wait for its result),
    /// for a whole batch or, near the limit, just this request's cost.
    pub(super) async fn decide(
        &self,
        limiter: &Limiter,
        items: &[Item],
    ) -> Result<Decision, StoreError> {
        for _ in 0..4 {
            if let Some(decision) = self.spend(items, Instant::now()) {
                limiter.metrics.leased.inc();
                self.refill_low(limiter, items).await;
                return Ok(decision);
            }
            let short = self.short(items, Instant::now());
            let fetch = match self.claim(items, &short) {
                Claim::Fetch(fetch) => fetch,
                Claim::Wait(done) => {
                    // Bounded like any decision; then look at the leases again.
                    let _ = tokio::time::timeout(limiter.timeout, done).await;
                    continue;
                }
            };
            for whole_batch in [true, false] {
                let asking: Vec<Item> = short
                    .iter()
                    .map(|&i| Item {
                        cost: if whole_batch {
                            items[i].batch.max(items[i].cost)
                        } else {
                            items[i].cost
                        },
                        ..items[i]
                    })
                    .collect();
                let asked = Instant::now();
                let decision = limiter.ask_store(&asking).await?;
                if decision.admitted {
                    for ((item, outcome), &i) in asking.iter().zip(&decision.outcomes).zip(&short) {
                        if outcome.allowed {
                            self.grant(&items[i], item.cost, outcome, asked);
                        }
                    }
                    break;
                }
                if !whole_batch {
                    // Rejected for this request's own cost: the request is rejected.
                    let mut outcomes: Vec<Outcome> = items
                        .iter()
                        .map(|i| Outcome {
                            allowed: true,
                            remaining: i.algorithm.quota(),
                            reset: 0,
                            retry_after: 0,
                        })
                        .collect();
                    for (&i, o) in short.iter().zip(&decision.outcomes) {
                        outcomes[i] = *o;
                    }
                    return Ok(Decision::from_outcomes(items, outcomes));
                }
            }
            drop(fetch);
        }
        // Concurrent spenders kept winning the fresh units: decide this request exactly.
        limiter.ask_store(items).await
    }

    /// Tops up leases that are running low while they still cover other requests (this request
    /// is decided already; it only carries the fetch). A rejected top-up changes nothing.
    async fn refill_low(&self, limiter: &Limiter, items: &[Item]) {
        let low = self.low(items, Instant::now());
        if low.is_empty() {
            return;
        }
        let Claim::Fetch(fetch) = self.claim(items, &low) else {
            return;
        };
        // Up to a whole batch, never more: a replica holds at most `batch` units of a key.
        let now = Instant::now();
        let asking: Vec<Item> = low
            .iter()
            .map(|&i| Item {
                cost: items[i].batch - self.available(&items[i], now),
                ..items[i]
            })
            .collect();
        let asked = Instant::now();
        if let Ok(decision) = limiter.ask_store(&asking).await
            && decision.admitted
        {
            for ((item, outcome), &i) in asking.iter().zip(&decision.outcomes).zip(&low) {
                self.grant(&items[i], item.cost, outcome, asked);
            }
        }
        drop(fetch);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::algorithm::Algorithm;

    fn item(id: u64, cost: u64) -> Item {
        Item {
            algorithm: Algorithm::FixedWindow {
                quota: 100,
                window: 60_000_000,
            },
            cost,
            shadow: false,
            id,
            tag: [id as u8; 16],
            batch: 10,
            ban: 0,
            delay: 0,
            settles: false,
        }
    }

    fn granted(remaining: u64, reset: Micros) -> Outcome {
        Outcome {
            allowed: true,
            remaining,
            reset,
            retry_after: 0,
        }
    }

    #[test]
    fn a_lease_is_spent_down_then_asked_again() {
        let leases = Leases::default();
        let t0 = Instant::now();
        let items = [item(1, 3)];
        assert_eq!(leases.short(&items, t0), [0]);
        leases.grant(&items[0], 10, &granted(90, 60_000_000), t0);
        for left in [97, 94, 91] {
            let d = leases.spend(&items, t0).expect("covered by the lease");
            assert!(d.admitted);
            assert_eq!(d.outcomes[0].remaining, left);
        }
        assert!(leases.spend(&items, t0).is_none(), "1 unit left, cost 3");
        assert_eq!(leases.short(&items, t0), [0]);
    }

    #[test]
    fn all_or_nothing_across_limits() {
        let leases = Leases::default();
        let t0 = Instant::now();
        let items = [item(1, 1), item(2, 1)];
        leases.grant(&items[0], 5, &granted(0, 60_000_000), t0);
        assert!(leases.spend(&items, t0).is_none());
        assert_eq!(leases.short(&items, t0), [1]);
        leases.grant(&items[1], 1, &granted(0, 60_000_000), t0);
        assert!(leases.spend(&items, t0).is_some());
        assert!(
            leases.spend(&items, t0).is_none(),
            "the second lease is used up"
        );
        assert_eq!(
            leases.short(&items, t0),
            [1],
            "and the first kept its units"
        );
    }

    #[test]
    fn a_lease_ends_with_its_window() {
        let leases = Leases::default();
        let t0 = Instant::now();
        let items = [item(1, 1)];
        leases.grant(&items[0], 10, &granted(0, 30_000), t0);
        assert!(leases.spend(&items, t0).is_some());
        assert!(
            leases
                .spend(&items, t0 + Duration::from_millis(40))
                .is_none(),
            "the window reset: the units are gone"
        );
    }
}
