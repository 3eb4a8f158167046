//! The local over-limit cache: identities a store has just rejected, remembered until their
//! retry-after. A client hammering a rejected key is answered from here without a store round
//! trip, and exactly: no unit of a limit frees before its retry-after (costs are fixed per
//! limit), and other replicas' requests can only push it further. Kept per loaded policy (a
//! reload starts empty) and bounded in size.

use std::time::{Duration, Instant};

use super::algorithm::{Kind, Outcome};
use super::shards::{Expires, Hashed, Shards};
use super::{Decision, Item};

const SHARDS: usize = 16;
/// The longest a denial is answered locally before the store is asked again, whatever its
/// retry-after: an operator's reset (`DELETE /v1/counters` on any replica) reaches every
/// replica within this time, at the price of one store call per second per rejected key.
pub const REASK: Duration = Duration::from_secs(1);
/// Entries at most; beyond it new denials are not cached (the store still decides them).
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Copy)]
struct Denial {
    retry_at: Instant,
    reset_at: Instant,
    /// Answered locally until then (the retry-after, or [`REASK`] if sooner).
    until: Instant,
}

impl Expires for Denial {
    type Time = Instant;
    fn live_at(&self, now: Instant) -> bool {
        self.until > now
    }
}

pub struct DenyCache {
    map: Shards<Denial>,
}

impl Default for DenyCache {
    fn default() -> Self {
        DenyCache {
            map: Shards::new(SHARDS),
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl DenyCache {
    /// A rejection for `items` if an enforced one is known to be over its limit at `now`.
    pub fn check(&self, items: &[Item], now: Instant) -> Option<Decision> {
        if self.map.is_empty() {
            return None;
        }
        let mut denied: Vec<Option<Denial>> = Vec::with_capacity(items.len());
        let mut any = false;
        for item in items {
            let found = if item.shadow {
                None
            } else {
                let key = Hashed::new(item.id, item.tag);
                let mut map = self.map.lock(&key);
                match map.get(&key) {
                    Some(d) if d.until > now => Some(*d),
                    Some(_) => {
                        map.remove(&key);
                        None
                    }
                    None => None,
                }
            };
            any |= found.is_some();
            denied.push(found);
        }
        if !any {
            return None;
        }
        // Limits not in the cache were not asked: they are shown as untouched (their
        // remaining is unknown here, and the rejecting limit is the one headers report).
        let outcomes = items
            .iter()
            .zip(denied)
            .map(|(item, d)| match d {
                Some(d) => Outcome {
                    allowed: false,
                    remaining: 0,
                    reset: micros(d.reset_at.saturating_duration_since(now)),
                    retry_after: micros(d.retry_at.saturating_duration_since(now)),
                },
                None => Outcome {
                    allowed: true,
                    remaining: item.algorithm.quota(),
                    reset: 0,
                    retry_after: 0,
                },
            })
            .collect();
        Some(Decision {
            admitted: false,
            outcomes,
            receipts: Vec::new(),
        })
    }

    /// Forgets what is remembered for `items` (an operator reset them).
    pub fn forget(&self, items: &[Item]) {
        for item in items {
            let key = Hashed::new(item.id, item.tag);
            self.map.lock(&key).remove(&key);
        }
    }

    /// Remembers the enforced limits that rejected `items`; `asked` is when the store was
    /// asked (its retry-after counts from then).
    pub fn remember(&self, items: &[Item], decision: &Decision, asked: Instant) {
        if decision.admitted {
            return;
        }
        for (item, o) in items.iter().zip(&decision.outcomes) {
            // Units given back when a response comes (a concurrency slot, a reservation a
            // `count` or `cost_from` settles) free a rejection at any moment.
            let slots = item.settles || item.algorithm.kind() == Kind::Concurrency;
            // A limit with `delay` holds requests again once the wait fits in it.
            let wait = o.retry_after.saturating_sub(item.delay);
            if item.shadow || o.allowed || wait == 0 || slots {
                continue;
            }
            if self.map.len() >= MAX_ENTRIES {
                // Entries whose retry-after passed by the time of this answer are gone.
                self.map.retain(asked);
                if self.map.len() >= MAX_ENTRIES {
                    return;
                }
            }
            let denial = Denial {
                retry_at: asked + Duration::from_micros(o.retry_after),
                until: asked + Duration::from_micros(wait).min(REASK),
                reset_at: asked + Duration::from_micros(o.reset),
            };
            let key = Hashed::new(item.id, item.tag);
            self.map.lock(&key).insert(key, denial);
        }
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

    fn item(id: u64, shadow: bool) -> Item {
        Item {
            algorithm: Algorithm::FixedWindow {
                quota: 5,
                window: 1_000_000,
            },
            cost: 1,
            shadow,
            id,
            tag: [id as u8; 16],
            batch: 0,
            ban: 0,
            delay: 0,
            settles: false,
        }
    }

    fn denial(retry_us: u64) -> Outcome {
        Outcome {
            allowed: false,
            remaining: 0,
            reset: retry_us,
            retry_after: retry_us,
        }
    }

    #[test]
    fn remembers_a_rejection_until_its_retry_after() {
        let cache = DenyCache::default();
        let t0 = Instant::now();
        let items = [item(1, false), item(2, false)];
        assert!(cache.check(&items, t0).is_none());
        let d = Decision {
            admitted: false,
            receipts: Vec::new(),
            outcomes: vec![
                Outcome {
                    allowed: true,
                    remaining: 3,
                    reset: 1,
                    retry_after: 0,
                },
                denial(200_000),
            ],
        };
        cache.remember(&items, &d, t0);
        assert_eq!(cache.len(), 1, "only the rejecting limit");
        let local = cache.check(&items, t0).expect("rejected locally");
        assert!(!local.admitted);
        assert!(!local.outcomes[1].allowed);
        assert!(local.outcomes[1].retry_after <= 200_000 && local.outcomes[1].retry_after > 0);
        assert!(
            cache.check(&items[..1], t0).is_none(),
            "other limits are not affected"
        );
        assert!(
            cache
                .check(&items, t0 + Duration::from_millis(210))
                .is_none(),
            "forgotten after the retry-after"
        );
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn shadow_limits_and_admissions_are_never_cached() {
        let cache = DenyCache::default();
        let t0 = Instant::now();
        let items = [item(1, true)];
        let d = Decision {
            admitted: true,
            outcomes: vec![denial(1_000_000)],
            receipts: Vec::new(),
        };
        cache.remember(&items, &d, t0);
        let d = Decision {
            admitted: false,
            outcomes: vec![denial(1_000_000)],
            receipts: Vec::new(),
        };
        cache.remember(&items, &d, t0);
        assert!(cache.is_empty());
    }
}
