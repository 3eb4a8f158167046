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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::sync::Notify;

use super::algorithm::{Algorithm, Micros, Outcome};
use super::{Decision, Item};
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

type Shard = HashMap<(u64, Tag), Lease>;

/// Leases held by this replica.
pub struct Leases {
    shards: Vec<Mutex<Shard>>,
    len: AtomicUsize,
    /// Limits and identities with a lease request under way, and who waits for it: one batch
    /// in flight per key and replica, so a burst of requests does not take many batches at
    /// once (which would leave that many units unspent when the limit runs out).
    fetching: Mutex<HashMap<(u64, Tag), Arc<Notify>>>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            len: AtomicUsize::new(0),
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

fn shard(item: &Item) -> usize {
    ((item.id ^ u64::from(item.tag[1])) % SHARDS as u64) as usize
}

fn micros(d: Duration) -> Micros {
    d.as_micros() as Micros
}

impl Leases {
    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Units this replica holds for `item` right now.
    pub fn available(&self, item: &Item, now: Instant) -> u64 {
        self.lock(shard(item))
            .get(&(item.id, item.tag))
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
    pub fn low(&self, items: &[Item]) -> Vec<usize> {
        let now = Instant::now();
        (0..items.len())
            .filter(|&i| self.available(&items[i], now) * 2 < items[i].batch)
            .collect()
    }

    /// The items whose lease cannot cover their cost.
    pub fn short(&self, items: &[Item]) -> Vec<usize> {
        let now = Instant::now();
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
            Algorithm::TokenBucket { .. } | Algorithm::Gcra { .. } => MAX_LEASE,
        };
        let expires = asked + life.min(MAX_LEASE);
        let mut map = self.lock(shard(item));
        let key = (item.id, item.tag);
        match map.get_mut(&key) {
            Some(l) if l.expires > asked => {
                l.units += units;
                l.store_remaining = outcome.remaining;
                l.reset_at = reset_at;
                l.expires = l.expires.min(expires);
            }
            _ => {
                if self.len.load(Ordering::Relaxed) >= MAX_ENTRIES {
                    let now = Instant::now();
                    let before = map.len();
                    map.retain(|_, l| l.expires > now);
                    self.len.fetch_sub(before - map.len(), Ordering::Relaxed);
                }
                if map
                    .insert(
                        key,
                        Lease {
                            units,
                            store_remaining: outcome.remaining,
                            reset_at,
                            expires,
                        },
                    )
                    .is_none()
                {
                    self.len.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Spends each item's cost from its lease, all or nothing: the admitted decision, or None
    /// when some lease cannot cover its item (then nothing is spent).
    pub fn spend(&self, items: &[Item]) -> Option<Decision> {
        let now = Instant::now();
        let mut order: Vec<usize> = items.iter().map(shard).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, std::sync::MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, self.lock(i))).collect();
        let find = |s: usize| order.binary_search(&s).expect("locked");
        for item in items {
            let map = &guards[find(shard(item))].1;
            match map.get(&(item.id, item.tag)) {
                Some(l) if l.expires > now && l.units >= item.cost => {}
                _ => return None,
            }
        }
        let outcomes = items
            .iter()
            .map(|item| {
                let map = &mut guards[find(shard(item))].1;
                let lease = map.get_mut(&(item.id, item.tag)).expect("checked");
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
        })
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
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
        let items = [item(1, 3)];
        assert_eq!(leases.short(&items), [0]);
        leases.grant(&items[0], 10, &granted(90, 60_000_000), Instant::now());
        for left in [97, 94, 91] {
            let d = leases.spend(&items).expect("covered by the lease");
            assert!(d.admitted);
            assert_eq!(d.outcomes[0].remaining, left);
        }
        assert!(leases.spend(&items).is_none(), "1 unit left, cost 3");
        assert_eq!(leases.short(&items), [0]);
    }

    #[test]
    fn all_or_nothing_across_limits() {
        let leases = Leases::default();
        let items = [item(1, 1), item(2, 1)];
        leases.grant(&items[0], 5, &granted(0, 60_000_000), Instant::now());
        assert!(leases.spend(&items).is_none());
        assert_eq!(leases.short(&items), [1]);
        leases.grant(&items[1], 1, &granted(0, 60_000_000), Instant::now());
        assert!(leases.spend(&items).is_some());
        assert!(
            leases.spend(&items).is_none(),
            "the second lease is used up"
        );
        assert_eq!(leases.short(&items), [1], "and the first kept its units");
    }

    #[test]
    fn a_lease_ends_with_its_window() {
        let leases = Leases::default();
        let items = [item(1, 1)];
        leases.grant(&items[0], 10, &granted(0, 30_000), Instant::now());
        assert!(leases.spend(&items).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            leases.spend(&items).is_none(),
            "the window reset: the units are gone"
        );
    }
}
