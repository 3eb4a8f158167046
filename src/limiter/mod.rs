//! The limiter decision: all the limits of a route, decided together in one store call.
//!
//! Owns the [`Decision`] (a denial is data, not an error), the two stores behind one enum, the
//! timeout around every call and the mapping of a route's limits to store items. What happens
//! on a store error (`on_store_error`) is the pipeline's call: this module reports it.

pub mod algorithm;
pub mod breaker;
pub mod deny_cache;
pub mod lease;
pub mod memory;
pub mod redis;
pub mod shards;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::identity::{self, Subject, Tag};
pub use crate::metrics::LimiterMetrics;
use crate::policy::{Mode, Route, StoreSettings};
use algorithm::{Algorithm, Micros, Outcome};

/// One limit of one request, as a store sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub algorithm: Algorithm,
    pub cost: u64,
    /// A shadow limit is decided and counted but never rejects.
    pub shadow: bool,
    /// The limit's stable id (`policy::Limit::id`).
    pub id: u64,
    /// Who is counted.
    pub tag: Tag,
    /// Approximate mode: take budget from the store this many units at a time (0: exact,
    /// every request decided by the store).
    pub batch: u64,
}

/// A store's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Every enforced limit allowed: the request goes through and was counted.
    pub admitted: bool,
    /// One per item, in order.
    pub outcomes: Vec<Outcome>,
}

impl Decision {
    /// Combines per-limit outcomes: admitted when every enforced limit allows.
    pub fn from_outcomes(items: &[Item], outcomes: Vec<Outcome>) -> Decision {
        let admitted = items
            .iter()
            .zip(&outcomes)
            .all(|(item, o)| item.shadow || o.allowed);
        Decision { admitted, outcomes }
    }

    /// Whether a shadow limit would have rejected this request.
    pub fn shadow_rejected(&self, items: &[Item]) -> bool {
        items
            .iter()
            .zip(&self.outcomes)
            .any(|(item, o)| item.shadow && !o.allowed)
    }
}

/// Why a store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("redis connection pool: {0}")]
    Pool(String),
    #[error("redis replied with an unexpected shape: {0}")]
    Reply(String),
    #[error("memory store is full ({0} keys); raise [store] max_keys")]
    Full(usize),
    #[error("{0}")]
    Config(String),
    #[error("store circuit open after repeated failures; not calling it for a short back-off")]
    CircuitOpen,
}

impl StoreError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Redis(_) => "redis",
            StoreError::Pool(_) => "pool",
            StoreError::Reply(_) => "reply",
            StoreError::Full(_) => "full",
            StoreError::Config(_) => "config",
            StoreError::CircuitOpen => "circuit_open",
        }
    }
}

/// The two backends. An enum, not a trait object: there are two and both are known.
pub enum Store {
    Memory(memory::MemoryStore),
    Redis(redis::RedisStore),
}

impl Store {
    /// Builds the store for `settings`. Never contacts Redis: connections are made on first use,
    /// so tollgate starts while Redis is down.
    pub fn new(settings: &StoreSettings) -> Result<Store, StoreError> {
        Ok(match settings {
            StoreSettings::Memory { max_keys, .. } => {
                Store::Memory(memory::MemoryStore::new(*max_keys))
            }
            StoreSettings::Redis(settings) => Store::Redis(redis::RedisStore::new(settings)?),
        })
    }

    /// Decides `items` all-or-nothing. `now` is None in production (the store's clock); tests
    /// pass a time through the same call.
    pub async fn decide(
        &self,
        items: &[Item],
        now: Option<Micros>,
    ) -> Result<Decision, StoreError> {
        match self {
            Store::Memory(m) => m.decide(items, now),
            Store::Redis(r) => r.decide(items, now, false).await,
        }
    }

    /// Decides `items` as [`Store::decide`] would, but changes nothing (`tollgate explain`).
    pub async fn peek(&self, items: &[Item], now: Option<Micros>) -> Result<Decision, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.peek(items, now)),
            Store::Redis(r) => r.decide(items, now, true).await,
        }
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.ping().await,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    /// The circuit breaker guarding a decision about `tag`, for a store that can fail (Redis).
    pub fn breaker(&self, tag: &Tag) -> Option<&breaker::Breaker> {
        match self {
            Store::Memory(_) => None,
            Store::Redis(r) => Some(r.breaker_for(tag)),
        }
    }

    /// Lets every open breaker of the store probe at its next call.
    pub fn nudge_breakers(&self) {
        if let Store::Redis(r) = self {
            r.breakers.iter().for_each(breaker::Breaker::nudge);
        }
    }

    /// How many of the store's circuit breakers are open.
    pub fn open_breakers(&self) -> usize {
        match self {
            Store::Memory(_) => 0,
            Store::Redis(r) => r.breakers.iter().filter(|b| b.is_open()).count(),
        }
    }
}

/// The store, the budget of one decision, the circuit breaker in front of the store and the
/// local over-limit cache.
pub struct Limiter {
    pub store: Arc<Store>,
    pub timeout: Duration,
    pub denials: deny_cache::DenyCache,
    pub leases: lease::Leases,
    pub metrics: LimiterMetrics,
}

impl Limiter {
    /// Decides: from the over-limit cache when an enforced limit is known to reject, else by
    /// the store, bounded by the store timeout and guarded by the circuit breaker.
    pub async fn decide(&self, items: &[Item]) -> Result<Decision, StoreError> {
        if let Some(local) = self.denials.check(items) {
            self.metrics.local_denials.inc();
            return Ok(local);
        }
        if !items.is_empty() && items.iter().all(|i| i.batch > 0) {
            return self.decide_leased(items).await;
        }
        self.ask_store(items).await
    }

    /// Approximate mode: spend from this replica's leases; ask the store only for the limits
    /// whose lease ran out (one request per key at a time, the others wait for its result),
    /// for a whole batch or, near the limit, just this request's cost.
    async fn decide_leased(&self, items: &[Item]) -> Result<Decision, StoreError> {
        for _ in 0..4 {
            if let Some(decision) = self.leases.spend(items) {
                self.metrics.leased.inc();
                self.refill_low(items).await;
                return Ok(decision);
            }
            let short = self.leases.short(items);
            let fetch = match self.leases.claim(items, &short) {
                lease::Claim::Fetch(fetch) => fetch,
                lease::Claim::Wait(done) => {
                    // Bounded like any decision; then look at the leases again.
                    let _ = tokio::time::timeout(self.timeout, done).await;
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
                let asked = std::time::Instant::now();
                let decision = self.ask_store(&asking).await?;
                if decision.admitted {
                    for ((item, outcome), &i) in asking.iter().zip(&decision.outcomes).zip(&short) {
                        if outcome.allowed {
                            self.leases.grant(&items[i], item.cost, outcome, asked);
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
        self.ask_store(items).await
    }

    /// Tops up leases that are running low while they still cover other requests (this request
    /// is decided already; it only carries the fetch). A rejected top-up changes nothing.
    async fn refill_low(&self, items: &[Item]) {
        let low = self.leases.low(items);
        if low.is_empty() {
            return;
        }
        let lease::Claim::Fetch(fetch) = self.leases.claim(items, &low) else {
            return;
        };
        // Up to a whole batch, never more: a replica holds at most `batch` units of a key.
        let now = std::time::Instant::now();
        let asking: Vec<Item> = low
            .iter()
            .map(|&i| Item {
                cost: items[i].batch - self.leases.available(&items[i], now),
                ..items[i]
            })
            .collect();
        let asked = std::time::Instant::now();
        if let Ok(decision) = self.ask_store(&asking).await
            && decision.admitted
        {
            for ((item, outcome), &i) in asking.iter().zip(&decision.outcomes).zip(&low) {
                self.leases.grant(&items[i], item.cost, outcome, asked);
            }
        }
        drop(fetch);
    }

    /// One store decision, bounded by the timeout and guarded by the circuit breaker; a
    /// rejection is remembered in the over-limit cache.
    async fn ask_store(&self, items: &[Item]) -> Result<Decision, StoreError> {
        let breaker = items.first().and_then(|i| self.store.breaker(&i.tag));
        let probe = match breaker.map(|b| b.admit()) {
            None | Some(breaker::Admission::Call) => None,
            Some(breaker::Admission::Probe(guard)) => Some(guard),
            Some(breaker::Admission::Open) => {
                self.record_error(&StoreError::CircuitOpen);
                return Err(StoreError::CircuitOpen);
            }
        };
        let asked = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.store.decide(items, None)).await
        {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        self.metrics
            .store_duration
            .observe(asked.elapsed().as_secs_f64());
        if let Some(b) = breaker {
            match &result {
                Ok(_) => {
                    if b.success(probe) {
                        // One group of slots answers again: let the others probe now too.
                        self.store.nudge_breakers();
                    }
                }
                Err(_) => b.failure(probe),
            }
            self.metrics
                .circuit_open
                .set(self.store.open_breakers() as i64);
        }
        match &result {
            Ok(decision) => self.denials.remember(items, decision, asked),
            Err(e) => self.record_error(e),
        }
        result
    }

    fn record_error(&self, e: &StoreError) {
        self.metrics
            .errors
            .get_or_create(&[("kind", e.kind().to_string())])
            .inc();
    }

    /// Whether the store answers within its timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match tokio::time::timeout(self.timeout, self.store.ping()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

/// The store items of a route's limits for one request: each distinct key specification is
/// hashed once.
pub fn items_for(route: &Route, subject: &Subject<'_>) -> Vec<Item> {
    let mut tags: [Option<Tag>; 8] = [None; 8];
    route
        .limits
        .iter()
        .map(|limit| {
            let spec = &route.keys[limit.key];
            let tag = if limit.key < tags.len() {
                *tags[limit.key].get_or_insert_with(|| identity::tag(spec, subject))
            } else {
                identity::tag(spec, subject)
            };
            Item {
                algorithm: limit.algorithm,
                cost: limit.cost,
                shadow: limit.mode == Mode::Shadow,
                id: limit.id,
                tag,
                batch: limit.batch,
            }
        })
        .collect()
}

/// The wall clock in µs since the Unix epoch.
pub fn wall_clock() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as Micros)
        .unwrap_or(0)
}
