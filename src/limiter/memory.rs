//! The embedded store (`backend = "memory"`): the algorithms of `algorithm.rs`, in process, for
//! one tollgate instance. A sharded map from (limit id, identity) to state; each entry expires
//! when its state is equivalent to a fresh one, a sweeper frees expired entries every second,
//! and `max_keys` bounds the whole map.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::algorithm::{Micros, Outcome, State, TTL_SLACK};
use super::{Decision, Item, StoreError, wall_clock};
use crate::identity::Tag;

const SHARDS: usize = 64;

type Key = (u64, Tag);

struct Entry {
    state: State,
    expires_at: Micros,
}

/// Keys are already uniform hashes (a blake3 tag and a blake3 id): mixing them is enough.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(buf)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Shard = HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>;

struct Inner {
    shards: Vec<Mutex<Shard>>,
    len: AtomicUsize,
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

fn shard_of(key: &Key) -> usize {
    let t = u64::from_le_bytes(key.1[..8].try_into().expect("8 bytes"));
    ((t ^ key.0) % SHARDS as u64) as usize
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard cannot leave a state half-written (entries are replaced
    // whole), so a poisoned lock is still safe to use.
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    pub fn new(max_keys: usize) -> MemoryStore {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            len: AtomicUsize::new(0),
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

    /// Number of live keys (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides all items together: shards are locked in index order (no deadlock), every limit is
    /// checked, and states are committed only when the request is admitted.
    pub fn decide(&self, items: &[Item], now: Option<Micros>) -> Result<Decision, StoreError> {
        let now = now.unwrap_or_else(wall_clock);
        self.inner.latest.fetch_max(now, Ordering::Relaxed);
        if let [item] = items {
            return self.decide_one(item, now);
        }
        let keys: Vec<Key> = items.iter().map(|i| (i.id, i.tag)).collect();
        let mut order: Vec<usize> = keys.iter().map(shard_of).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> = order
            .iter()
            .map(|&i| (i, lock(&self.inner.shards[i])))
            .collect();
        let guard_of = |shard: usize| order.binary_search(&shard).expect("locked");

        // Take each state out (a route's limits may share a shard), decide, then put back.
        // (state after check, its expiry, the state before check where a denial must restore it)
        let mut taken: Vec<(State, Option<Micros>, Option<State>)> =
            Vec::with_capacity(items.len());
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(items.len());
        let mut existed = 0usize;
        let mut fresh = 0usize;
        for (item, key) in items.iter().zip(&keys) {
            let map = &mut guards[guard_of(shard_of(key))].1;
            let removed = map.remove(key);
            existed += usize::from(removed.is_some());
            let (mut state, expires_at) = match removed {
                Some(e) if e.expires_at > now && item.algorithm.owns(&e.state) => {
                    (e.state, Some(e.expires_at))
                }
                _ => {
                    fresh += 1;
                    (item.algorithm.fresh(now), None)
                }
            };
            // A denial keeps the state as it was (as the scripts do), except the log's trim.
            let before = match &state {
                State::Log(_) => None,
                other => Some(other.clone()),
            };
            outcomes.push(item.algorithm.check(&mut state, now, item.cost));
            taken.push((state, expires_at, before));
        }
        let decision = Decision::from_outcomes(items, outcomes);
        let full = decision.admitted
            && fresh > 0
            && self.inner.len.load(Ordering::Relaxed) + fresh
                > self.inner.max_keys.load(Ordering::Relaxed);
        let mut stored = 0usize;
        for ((item, key), ((mut state, expires_at, before), outcome)) in items
            .iter()
            .zip(&keys)
            .zip(taken.into_iter().zip(&decision.outcomes))
        {
            let commit = decision.admitted && outcome.allowed && !full;
            let expires_at = if commit {
                item.algorithm.commit(&mut state, now, item.cost);
                Some(now + item.algorithm.ttl(&state, now) + TTL_SLACK)
            } else {
                if let Some(before) = before {
                    state = before;
                }
                expires_at
            };
            // A key that was not stored (or had expired) and did not change stays absent.
            if let Some(expires_at) = expires_at {
                guards[guard_of(shard_of(key))]
                    .1
                    .insert(*key, Entry { state, expires_at });
                stored += 1;
            }
        }
        if stored >= existed {
            self.inner
                .len
                .fetch_add(stored - existed, Ordering::Relaxed);
        } else {
            self.inner
                .len
                .fetch_sub(existed - stored, Ordering::Relaxed);
        }
        drop(guards);
        if full {
            return Err(StoreError::Full(
                self.inner.max_keys.load(Ordering::Relaxed),
            ));
        }
        Ok(decision)
    }

    /// The common case, one limit: one shard, the state updated in place, no bookkeeping.
    fn decide_one(&self, item: &Item, now: Micros) -> Result<Decision, StoreError> {
        let key = (item.id, item.tag);
        let mut map = lock(&self.inner.shards[shard_of(&key)]);
        let outcome = match map.get_mut(&key) {
            Some(entry) if entry.expires_at > now && item.algorithm.owns(&entry.state) => {
                let before = match &entry.state {
                    State::Log(_) => None,
                    other => Some(other.clone()),
                };
                let outcome = item.algorithm.check(&mut entry.state, now, item.cost);
                if outcome.allowed {
                    item.algorithm.commit(&mut entry.state, now, item.cost);
                    entry.expires_at = now + item.algorithm.ttl(&entry.state, now) + TTL_SLACK;
                } else if let Some(before) = before {
                    // A denial keeps the state as it was (as the scripts do).
                    entry.state = before;
                }
                outcome
            }
            found => {
                let existed = found.is_some();
                let mut state = item.algorithm.fresh(now);
                let outcome = item.algorithm.check(&mut state, now, item.cost);
                if outcome.allowed {
                    if !existed
                        && self.inner.len.load(Ordering::Relaxed)
                            >= self.inner.max_keys.load(Ordering::Relaxed)
                    {
                        return Err(StoreError::Full(
                            self.inner.max_keys.load(Ordering::Relaxed),
                        ));
                    }
                    item.algorithm.commit(&mut state, now, item.cost);
                    let expires_at = now + item.algorithm.ttl(&state, now) + TTL_SLACK;
                    if map.insert(key, Entry { state, expires_at }).is_none() {
                        self.inner.len.fetch_add(1, Ordering::Relaxed);
                    }
                } else if existed {
                    // An expired or foreign state: equivalent to absent.
                    map.remove(&key);
                    self.inner.len.fetch_sub(1, Ordering::Relaxed);
                }
                outcome
            }
        };
        drop(map);
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
                let key = (item.id, item.tag);
                let map = lock(&self.inner.shards[shard_of(&key)]);
                let mut state = match map.get(&key) {
                    Some(e) if e.expires_at > now && item.algorithm.owns(&e.state) => {
                        e.state.clone()
                    }
                    _ => item.algorithm.fresh(now),
                };
                drop(map);
                item.algorithm.check(&mut state, now, item.cost)
            })
            .collect();
        Decision::from_outcomes(items, outcomes)
    }

    /// Removes entries that expired before `cutoff`; returns how many.
    fn sweep_once(inner: &Inner, cutoff: Micros) -> usize {
        let mut removed = 0;
        for shard in &inner.shards {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|_, e| e.expires_at > cutoff);
            removed += before - map.len();
        }
        inner.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Runs one sweep now (tests and benchmarks use it to measure memory deterministically).
    pub fn sweep_now(&self) -> usize {
        let cutoff = wall_clock().min(self.inner.latest.load(Ordering::Relaxed));
        Self::sweep_once(&self.inner, cutoff)
    }
}

async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let cutoff = wall_clock().min(inner.latest.load(Ordering::Relaxed));
        MemoryStore::sweep_once(&inner, cutoff);
    }
}
