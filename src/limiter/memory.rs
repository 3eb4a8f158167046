//! The embedded store (`backend = "memory"`): the algorithms of `algorithm.rs`, in process, for
//! one tollgate instance. A [`Shards`] map from (limit id, identity) to state; each entry expires
//! when its state is equivalent to a fresh one, a sweeper frees expired entries every second,
//! and `max_keys` bounds the whole map.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::algorithm::{Micros, Outcome, Rolled, State, TTL_SLACK};
use super::shards::{Expires, Hashed, Shards};
use super::{Decision, Item, Settle, StoreError, wall_clock};

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

/// A ban (`ban` on a limit): the identity is refused by that limit until then.
struct Ban {
    until: Micros,
}

impl Expires for Ban {
    type Time = Micros;
    fn live_at(&self, now: Micros) -> bool {
        self.until > now
    }
}

struct Inner {
    map: Shards<Entry>,
    /// Bans by (limit id, identity), beside the states (prelude.lua's `banned`).
    bans: Shards<Ban>,
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
            bans: Shards::new(SHARDS),
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
                let banned = self.inner.bans.lock(&key).remove(&key).is_some();
                self.inner.map.lock(&key).remove(&key).is_some() || banned
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
        if let [item] = items
            && item.ban == 0
        {
            return self.decide_one(item, now);
        }
        let keys: Vec<Hashed> = items.iter().map(|i| Hashed::new(i.id, i.tag)).collect();
        let mut locked = self.inner.map.lock_all(&keys);

        // Per item: what admitting it writes, and whether its stored entry is live.
        let mut rolled: Vec<(Rolled, bool)> = Vec::with_capacity(items.len());
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(items.len());
        let mut fresh = 0usize;
        let mut bans_due = false;
        for (item, key) in items.iter().zip(&keys) {
            let banned = self.banned(item, key, now);
            let (mut outcome, next, live) = match locked.get(key) {
                Some(e) if e.expires_at > now && item.algorithm.owns(&e.state) => {
                    let (o, r) = item
                        .algorithm
                        .check_held(&e.state, now, item.cost, item.delay);
                    (o, r, true)
                }
                _ => {
                    fresh += 1;
                    let (o, r) = item.algorithm.check_held(
                        &item.algorithm.fresh(now),
                        now,
                        item.cost,
                        item.delay,
                    );
                    (o, r, false)
                }
            };
            let next = match banned {
                Some(banned) => {
                    outcome = banned;
                    Rolled::Nothing
                }
                None if !outcome.allowed && item.ban > 0 && !item.shadow => {
                    // Rejected by a limit with a ban: the ban starts now and is the answer.
                    bans_due = true;
                    (outcome.reset, outcome.retry_after) = (item.ban, item.ban);
                    next
                }
                None => next,
            };
            outcomes.push(outcome);
            rolled.push((next, live));
        }
        let mut decision = Decision::from_outcomes(items, outcomes);
        if items.iter().any(Item::settles_later) {
            decision.receipts = rolled.iter().map(|(r, _)| r.receipt()).collect();
        }
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
        if bans_due {
            self.ban_rejected(items, &keys, &decision, now);
        }
        Ok(decision)
    }

    /// The outcome of an item whose identity a ban of its limit refuses at `now`.
    fn banned(&self, item: &Item, key: &Hashed, now: Micros) -> Option<Outcome> {
        if item.ban == 0 {
            return None;
        }
        let bans = self.inner.bans.lock(key);
        let left = bans.get(key)?.until.checked_sub(now).filter(|&l| l > 0)?;
        Some(Outcome {
            allowed: false,
            remaining: 0,
            reset: left,
            retry_after: left,
        })
    }

    /// Starts the bans of the limits that rejected (those whose outcome is a new ban: a
    /// retry_after of exactly the ban, not one left from an earlier ban).
    fn ban_rejected(&self, items: &[Item], keys: &[Hashed], decision: &Decision, now: Micros) {
        for ((item, key), o) in items.iter().zip(keys).zip(&decision.outcomes) {
            if item.ban == 0 || item.shadow || o.allowed {
                continue;
            }
            let mut bans = self.inner.bans.lock(key);
            if bans.get(key).is_none_or(|b| b.until <= now) {
                bans.insert(
                    *key,
                    Ban {
                        until: now + item.ban,
                    },
                );
            }
        }
    }

    /// Brings admitted items to what their responses cost, as settle.lua does: a refund of
    /// what was not used (nothing once the state expired), a charge past the quota for what
    /// was used beyond the reservation.
    pub fn settle(&self, settles: &[Settle], now: Option<Micros>) {
        let now = now.unwrap_or_else(wall_clock);
        self.inner.latest.fetch_max(now, Ordering::Relaxed);
        for s in settles {
            let (item, reserved) = (&s.item, s.item.cost);
            if s.cost == reserved {
                continue;
            }
            let key = Hashed::new(item.id, item.tag);
            let mut shard = self.inner.map.lock(&key);
            let live = shard
                .get(&key)
                .is_some_and(|e| e.expires_at > now && item.algorithm.owns(&e.state));
            if s.cost < reserved {
                if live && let Some(entry) = shard.get_mut(&key) {
                    item.algorithm
                        .refund(&mut entry.state, s.receipt, reserved - s.cost);
                }
                continue;
            }
            let entry = shard.get_or_insert_with(key, || Entry {
                state: item.algorithm.fresh(now),
                expires_at: 0,
            });
            if !live {
                entry.state = item.algorithm.fresh(now);
            }
            let ttl = item
                .algorithm
                .charge(&mut entry.state, now, s.cost - reserved);
            entry.expires_at = now + ttl + TTL_SLACK;
        }
    }

    /// The common case, one limit: one shard, the state updated in place.
    fn decide_one(&self, item: &Item, now: Micros) -> Result<Decision, StoreError> {
        let key = Hashed::new(item.id, item.tag);
        let mut shard = self.inner.map.lock(&key);
        let receipt;
        let outcome = match shard.get_mut(&key) {
            Some(entry) if entry.expires_at > now && item.algorithm.owns(&entry.state) => {
                let (outcome, next) =
                    item.algorithm
                        .check_held(&entry.state, now, item.cost, item.delay);
                receipt = next.receipt();
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
                let (outcome, next) = item
                    .algorithm
                    .check_held(&state, now, item.cost, item.delay);
                receipt = next.receipt();
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
        let mut decision = Decision::from_outcomes(std::slice::from_ref(item), vec![outcome]);
        if item.settles_later() {
            decision.receipts = vec![receipt];
        }
        Ok(decision)
    }

    /// What [`MemoryStore::decide`] would answer, changing nothing.
    pub fn peek(&self, items: &[Item], now: Option<Micros>) -> Decision {
        let now = now.unwrap_or_else(wall_clock);
        let outcomes = items
            .iter()
            .map(|item| {
                let key = Hashed::new(item.id, item.tag);
                if let Some(banned) = self.banned(item, &key, now) {
                    return banned;
                }
                let shard = self.inner.map.lock(&key);
                let (delay, cost) = (item.delay, item.cost);
                let mut outcome = match shard.get(&key) {
                    Some(e) if e.expires_at > now && item.algorithm.owns(&e.state) => {
                        item.algorithm.check_held(&e.state, now, cost, delay).0
                    }
                    _ => {
                        let fresh = item.algorithm.fresh(now);
                        item.algorithm.check_held(&fresh, now, cost, delay).0
                    }
                };
                if !outcome.allowed && item.ban > 0 && !item.shadow {
                    (outcome.reset, outcome.retry_after) = (item.ban, item.ban);
                }
                outcome
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
        self.bans.retain(cutoff);
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
