//! The embedded store (`backend = "memory"`): the algorithms of `algorithm.rs`, in process, for
//! one tollgate instance. A [`Shards`] map from (limit id, identity) to state; each entry expires
//! when its state is equivalent to a fresh one, a sweeper frees expired entries every second,
//! and `max_keys` bounds the whole map.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::algorithm::{Micros, Outcome, Rolled, State, TTL_SLACK};
use super::shards::{Expires, Hashed, Shards};
use super::{Decision, Item, StoreError, wall_clock};

const SHARDS: usize = 64;

struct Entry {
    state: State,
    expires_at: Micros,
}

impl Expires for Entry {
    type Time = Micros;
    fn live_at(&self, now: Micros) -> bool {
        self.expires_at > now
    }
}

struct Inner {
    map: Shards<Entry>,
    max_keys: AtomicUsize,
    /// The newest `now` any decision used: the sweeper never expires past it, so a caller that
    /// supplies its own times (tests) is not overtaken by the wall clock.
    latest: AtomicU64,
}

/// The in-process store. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl MemoryStore {
    pub fn new(max_keys: usize) -> MemoryStore {
        let inner = Arc::new(Inner {
            map: Shards::new(SHARDS),
            max_keys: AtomicUsize::new(max_keys),
            latest: AtomicU64::new(0),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(sweep(Arc::downgrade(&inner)));
        }
        MemoryStore { inner }
    }

    /// A reload changed `[store] max_keys`: the counters stay, the bound moves.
    pub fn set_max_keys(&self, max_keys: usize) {
        self.inner.max_keys.store(max_keys, Ordering::Relaxed);
    }

    fn max_keys(&self) -> usize {
        self.inner.max_keys.load(Ordering::Relaxed)
    }

    /// Forgets the state of every item (an operator's reset): each starts afresh. Returns how
    /// many states there were.
    pub fn reset(&self, items: &[Item]) -> usize {
        items
            .iter()
            .filter(|item| {
                let key = Hashed::new(item.id, item.tag);
                self.inner.map.lock(&key).remove(&key).is_some()
            })
            .count()
    }

    /// Number of live keys (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides all items together: their shards locked at once (in order, no deadlock), every
    /// limit checked against its state as it is, and states written only when the request is
    /// admitted.
    pub fn decide(&self, items: &[Item], now: Option<Micros>) -> Result<Decision, StoreError> {
        let now = now.unwrap_or_else(wall_clock);
        self.inner.latest.fetch_max(now, Ordering::Relaxed);
        if let [item] = items {
            return self.decide_one(item, now);
        }
        let keys: Vec<Hashed> = items.iter().map(|i| Hashed::new(i.id, i.tag)).collect();
        let mut locked = self.inner.map.lock_all(&keys);

        // Per item: what admitting it writes, and whether its stored entry is live.
        let mut rolled: Vec<(Rolled, bool)> = Vec::with_capacity(items.len());
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(items.len());
        let mut fresh = 0usize;
        for (item, key) in items.iter().zip(&keys) {
            let (outcome, next, live) = match locked.get(key) {
                Some(e) if e.expires_at > now && item.algorithm.owns(&e.state) => {
                    let (o, r) = item.algorithm.check(&e.state, now, item.cost);
                    (o, r, true)
                }
                _ => {
                    fresh += 1;
                    let (o, r) = item
                        .algorithm
                        .check(&item.algorithm.fresh(now), now, item.cost);
                    (o, r, false)
                }
            };
            outcomes.push(outcome);
            rolled.push((next, live));
        }
        let decision = Decision::from_outcomes(items, outcomes);
        let full = decision.admitted && fresh > 0 && self.inner.map.len() + fresh > self.max_keys();
        for ((item, key), ((next, live), outcome)) in items
            .iter()
            .zip(&keys)
            .zip(rolled.into_iter().zip(&decision.outcomes))
        {
            let shard = locked.shard(key);
            if decision.admitted && outcome.allowed && !full {
                let entry = shard.get_or_insert_with(*key, || Entry {
                    state: item.algorithm.fresh(now),
                    expires_at: 0,
                });
                if !live {
                    // Expired or another algorithm's: the commit starts from a fresh state.
                    entry.state = item.algorithm.fresh(now);
                }
                next.commit(&mut entry.state);
                entry.expires_at = now + item.algorithm.ttl(&entry.state, now) + TTL_SLACK;
            } else if live {
                if let Some(entry) = shard.get_mut(key) {
                    next.tidy(&mut entry.state);
                }
            } else {
                // An expired or foreign state that did not change: equivalent to absent.
                shard.remove(key);
            }
        }
        drop(locked);
        if full {
            return Err(StoreError::Full(self.max_keys()));
        }
        Ok(decision)
    }

    /// The common case, one limit: one shard, the state updated in place.
    fn decide_one(&self, item: &Item, now: Micros) -> Result<Decision, StoreError> {
        let key = Hashed::new(item.id, item.tag);
        let mut shard = self.inner.map.lock(&key);
        let outcome = match shard.get_mut(&key) {
            Some(entry) if entry.expires_at > now && item.algorithm.owns(&entry.state) => {
                let (outcome, next) = item.algorithm.check(&entry.state, now, item.cost);
                if outcome.allowed {
                    next.commit(&mut entry.state);
                    entry.expires_at = now + item.algorithm.ttl(&entry.state, now) + TTL_SLACK;
                } else {
                    next.tidy(&mut entry.state);
                }
                outcome
            }
            found => {
                let existed = found.is_some();
                let mut state = item.algorithm.fresh(now);
                let (outcome, next) = item.algorithm.check(&state, now, item.cost);
                if outcome.allowed {
                    if !existed && self.inner.map.len() >= self.max_keys() {
                        return Err(StoreError::Full(self.max_keys()));
                    }
                    next.commit(&mut state);
                    let expires_at = now + item.algorithm.ttl(&state, now) + TTL_SLACK;
                    shard.insert(key, Entry { state, expires_at });
                } else if existed {
                    // An expired or foreign state: equivalent to absent.
                    shard.remove(&key);
                }
                outcome
            }
        };
        drop(shard);
        Ok(Decision::from_outcomes(
            std::slice::from_ref(item),
            vec![outcome],
        ))
    }

    /// What [`MemoryStore::decide`] would answer, changing nothing.
    pub fn peek(&self, items: &[Item], now: Option<Micros>) -> Decision {
        let now = now.unwrap_or_else(wall_clock);
        let outcomes = items
            .iter()
            .map(|item| {
                let key = Hashed::new(item.id, item.tag);
                let shard = self.inner.map.lock(&key);
                match shard.get(&key) {
                    Some(e) if e.expires_at > now && item.algorithm.owns(&e.state) => {
                        item.algorithm.check(&e.state, now, item.cost).0
                    }
                    _ => {
                        let fresh = item.algorithm.fresh(now);
                        item.algorithm.check(&fresh, now, item.cost).0
                    }
                }
            })
            .collect();
        Decision::from_outcomes(items, outcomes)
    }

    /// Runs one sweep now (tests and benchmarks use it to measure memory deterministically).
    pub fn sweep_now(&self) -> usize {
        self.inner.sweep()
    }
}

impl Inner {
    /// Removes entries that expired by the wall clock, never past the newest decision's time.
    fn sweep(&self) -> usize {
        let cutoff = wall_clock().min(self.latest.load(Ordering::Relaxed));
        self.map.retain(cutoff)
    }
}

async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.sweep();
    }
}
