//! The sharded map every local layer keeps its entries in: the memory store's states, the
//! leases and the deny cache. Keyed by (limit id, identity tag), hashed once
//! ([`Hashed::new`]); one mutex per shard; several keys locked together in shard order
//! ([`Shards::lock_all`], so that two requests never deadlock and a route's limits are decided
//! all-or-nothing); expired entries swept by [`Shards::retain`] at a `now` the caller gives (so
//! tests need no real clock); the number of entries kept in [`Shards::len`].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::identity::Tag;

/// A limit's id and an identity's tag, with its hash computed once. Both halves are already
/// uniform hashes (blake3), so mixing them is enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashed {
    id: u64,
    tag: Tag,
    hash: u64,
}

impl Hashed {
    pub fn new(id: u64, tag: Tag) -> Hashed {
        let lo = u64::from_le_bytes(tag[..8].try_into().expect("8 bytes"));
        let h = (lo ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Hashed {
            id,
            tag,
            hash: h ^ (h >> 29),
        }
    }

    /// The shard: from the middle bits, which the map inside a shard does not lean on
    /// (hashbrown takes its bucket from the low bits and its tag from the top seven).
    fn shard(&self, shards: usize) -> usize {
        (self.hash >> 32) as usize % shards
    }
}

impl Hash for Hashed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes a [`Hashed`]'s precomputed hash through.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `Hashed`; anything else is still hashed, if slowly.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map<V> = HashMap<Hashed, V, BuildHasherDefault<PassThrough>>;

/// An entry that stops mattering at some time.
pub trait Expires {
    /// The clock the entry is measured by (µs since the epoch, or an `Instant`).
    type Time: Copy;
    /// Whether the entry still matters at `now`; [`Shards::retain`] drops the others.
    fn live_at(&self, now: Self::Time) -> bool;
}

pub struct Shards<V> {
    shards: Box<[Mutex<Map<V>>]>,
    len: AtomicUsize,
}

impl<V> Shards<V> {
    pub fn new(shards: usize) -> Shards<V> {
        Shards {
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
            len: AtomicUsize::new(0),
        }
    }

    fn lock_shard(&self, i: usize) -> Guard<'_, V> {
        // A panic while holding a shard cannot leave an entry half-written (entries are
        // replaced whole or updated by plain stores), so a poisoned lock is still safe to use.
        Guard {
            map: self.shards[i].lock().unwrap_or_else(|e| e.into_inner()),
            len: &self.len,
        }
    }

    /// Locks the shard of `key`.
    pub fn lock(&self, key: &Hashed) -> Guard<'_, V> {
        self.lock_shard(key.shard(self.shards.len()))
    }

    /// Locks the shards of all `keys` together, in shard order (no deadlock between two
    /// callers), for an all-or-nothing change.
    pub fn lock_all(&self, keys: &[Hashed]) -> Locked<'_, V> {
        let n = self.shards.len();
        let mut order: Vec<usize> = keys.iter().map(|k| k.shard(n)).collect();
        order.sort_unstable();
        order.dedup();
        let guards = order.iter().map(|&i| self.lock_shard(i)).collect();
        Locked {
            order,
            guards,
            shards: n,
        }
    }

    /// Entries kept (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: Expires> Shards<V> {
    /// Drops every entry no longer live at `now`, a shard at a time; returns how many.
    pub fn retain(&self, now: V::Time) -> usize {
        (0..self.shards.len())
            .map(|i| self.lock_shard(i).retain(|v| v.live_at(now)))
            .sum()
    }
}

/// One locked shard. Changes through it keep [`Shards::len`] right.
pub struct Guard<'a, V> {
    map: MutexGuard<'a, Map<V>>,
    len: &'a AtomicUsize,
}

impl<V> Guard<'_, V> {
    pub fn get(&self, key: &Hashed) -> Option<&V> {
        self.map.get(key)
    }

    pub fn get_mut(&mut self, key: &Hashed) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    pub fn insert(&mut self, key: Hashed, value: V) -> Option<V> {
        let old = self.map.insert(key, value);
        if old.is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        old
    }

    /// The entry of `key`, made by `make` when absent.
    pub fn get_or_insert_with(&mut self, key: Hashed, make: impl FnOnce() -> V) -> &mut V {
        let len = self.len;
        self.map.entry(key).or_insert_with(|| {
            len.fetch_add(1, Ordering::Relaxed);
            make()
        })
    }

    pub fn remove(&mut self, key: &Hashed) -> Option<V> {
        let old = self.map.remove(key);
        if old.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        old
    }

    /// Keeps the entries `keep` says to; returns how many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|_, v| keep(v));
        let removed = before - self.map.len();
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

/// The shards of several keys, locked together.
pub struct Locked<'a, V> {
    order: Vec<usize>,
    guards: Vec<Guard<'a, V>>,
    shards: usize,
}

impl<'a, V> Locked<'a, V> {
    /// The locked shard holding `key` (which must be one of the keys locked).
    pub fn shard(&mut self, key: &Hashed) -> &mut Guard<'a, V> {
        let i = self
            .order
            .binary_search(&key.shard(self.shards))
            .expect("the key's shard is locked");
        &mut self.guards[i]
    }

    pub fn get(&mut self, key: &Hashed) -> Option<&V> {
        self.shard(key).map.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Until(u64);

    impl Expires for Until {
        type Time = u64;
        fn live_at(&self, now: u64) -> bool {
            self.0 > now
        }
    }

    fn key(i: u64) -> Hashed {
        let mut tag = [0u8; 16];
        tag[..8].copy_from_slice(&i.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        Hashed::new(i, tag)
    }

    #[test]
    fn len_follows_inserts_removals_and_sweeps() {
        let map = Shards::new(8);
        for i in 0..100 {
            map.lock(&key(i)).insert(key(i), Until(i));
        }
        assert_eq!(map.len(), 100);
        assert!(map.lock(&key(3)).insert(key(3), Until(1_000)).is_some());
        assert_eq!(map.len(), 100, "a replacement is not a new entry");
        assert!(map.lock(&key(4)).remove(&key(4)).is_some());
        assert!(map.lock(&key(4)).remove(&key(4)).is_none());
        assert_eq!(map.len(), 99);
        // Live while their time is ahead of `now`: 50..100 stay, and 3 (replaced).
        assert_eq!(map.retain(50), 49);
        assert_eq!(map.len(), 50);
        assert!(map.lock(&key(3)).get(&key(3)).is_some());
        assert!(map.lock(&key(49)).get(&key(49)).is_none());
        assert_eq!(map.retain(u64::MAX), 50);
        assert!(map.is_empty());
    }

    #[test]
    fn keys_spread_over_the_shards() {
        let shards = 16;
        let mut counts = vec![0usize; shards];
        for i in 0..16_000 {
            counts[key(i).shard(shards)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (700..1300).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn lock_all_reaches_every_key_and_repeated_shards_lock_once() {
        let map: Shards<Until> = Shards::new(4);
        // More keys than shards: some share a shard, which is locked once.
        let keys: Vec<Hashed> = (0..10).map(key).collect();
        let mut locked = map.lock_all(&keys);
        assert!(locked.guards.len() <= 4);
        for (i, k) in keys.iter().enumerate() {
            locked.shard(k).insert(*k, Until(i as u64));
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(locked.get(k).map(|u| u.0), Some(i as u64));
        }
        let n = locked
            .shard(&keys[0])
            .get_or_insert_with(keys[0], || Until(99))
            .0;
        assert_eq!(n, 0, "present: not made again");
        drop(locked);
        assert_eq!(map.len(), 10);
    }

    #[test]
    fn two_callers_locking_overlapping_shards_do_not_deadlock() {
        let map: std::sync::Arc<Shards<Until>> = std::sync::Arc::new(Shards::new(8));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    for round in 0..2_000u64 {
                        // Keys in a different order per thread.
                        let mut keys: Vec<Hashed> =
                            (0..6).map(|i| key((i + t + round) % 12)).collect();
                        if t % 2 == 1 {
                            keys.reverse();
                        }
                        let mut locked = map.lock_all(&keys);
                        for k in &keys {
                            locked.shard(k).get_or_insert_with(*k, || Until(0)).0 += 1;
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        assert_eq!(map.len(), 12);
    }
}
