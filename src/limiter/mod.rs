//! The limiter decision: all the limits of a route, decided together, all-or-nothing.
//!
//! A [`Limiter`] runs a request's [`Item`]s through these layers, in order, each in its own file:
//!
//! 1. [`deny_cache`]: identities the store rejected a moment ago are rejected here, until their
//!    retry-after, with no store call.
//! 2. [`lease`]: in approximate mode (`batch` on every limit) units the store granted this
//!    replica in advance are spent locally; the store is asked only to top them up.
//! 3. [`breaker`]: the store call itself, refused at once while the store keeps failing (the
//!    circuit breaker), bounded by the store timeout, measured.
//! 4. [`Store`]: the [`memory`] store or [`redis`], both running the [`algorithm`]s (in Rust or
//!    in `lua/`); [`shards`] is the map the memory store, the leases and the deny cache keep
//!    their entries in.
//!
//! This module owns the [`Decision`] (a denial is data, not an error), the two stores behind one
//! enum and the mapping of a route's limits to store items. What happens on a store error
//! (`on_store_error`) is the pipeline's call: this module reports it.

pub mod algorithm;
pub mod breaker;
pub mod deny_cache;
pub mod lease;
pub mod memory;
pub mod redis;
pub mod shards;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::identity::{self, Subject, Tag};
pub use crate::metrics::LimiterMetrics;
use crate::policy::{KeySpec, Limit, Mode, StoreSettings};
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
    /// `ban`: µs a rejection by this limit refuses the identity for (0: no ban).
    pub ban: Micros,
    /// `delay`: µs a request may be held for its slot instead of rejected (0: never held).
    pub delay: Micros,
    /// The response may give units back (`count`, `cost_from`, a concurrency slot): a
    /// rejection can end at any moment, so the deny cache never remembers one.
    pub settles: bool,
}

impl Item {
    /// Whether the pipeline settles this item after admission ([`crate::settle`]): its
    /// response can change what it cost, or it may be held for its slot.
    pub fn settles_later(&self) -> bool {
        self.settles || self.delay > 0
    }
}

/// One admitted item brought to what its response cost ([`Limiter::settle`]): `cost` units
/// instead of the `item.cost` reserved at admission (0 gives the reservation back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settle {
    pub item: Item,
    /// What the store answered for the item at admission ([`Decision::receipts`]).
    pub receipt: u64,
    pub cost: u64,
}

/// A store's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Every enforced limit allowed: the request goes through and was counted.
    pub admitted: bool,
    /// One per item, in order.
    pub outcomes: Vec<Outcome>,
    /// What identifies the units each admitted item took (for settling it), in order. Empty
    /// for a decision the store did not make (the deny cache, a lease), and from the memory
    /// store when no item [`Item::settles_later`] (no allocation on its hot path); Redis
    /// always returns them (cross-slot refunds use them).
    pub receipts: Vec<u64>,
}

impl Decision {
    /// Combines per-limit outcomes: admitted when every enforced limit allows.
    pub fn from_outcomes(items: &[Item], outcomes: Vec<Outcome>) -> Decision {
        let admitted = items
            .iter()
            .zip(&outcomes)
            .all(|(item, o)| item.shadow || o.allowed);
        Decision {
            admitted,
            outcomes,
            receipts: Vec::new(),
        }
    }

    /// How long an admitted request is held before it is forwarded (a limit with `delay`
    /// admitted it ahead of its slot): the longest wait of its limits.
    pub fn hold(&self) -> Micros {
        if !self.admitted {
            return 0;
        }
        self.outcomes
            .iter()
            .filter(|o| o.allowed)
            .map(|o| o.retry_after)
            .max()
            .unwrap_or(0)
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
// One store per policy, behind an Arc: its size is never copied, and boxing the Redis side
// would add a pointer hop to every decision.
#[allow(clippy::large_enum_variant)]
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

    /// Settles admitted items to what their responses cost (see [`Settle`]).
    pub async fn settle(&self, settles: &[Settle], now: Option<Micros>) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.settle(settles, now);
                Ok(())
            }
            Store::Redis(r) => r.settle(settles, now).await,
        }
    }

    /// Forgets the state of `items` (an operator's reset); how many states there were.
    pub async fn reset(&self, items: &[Item]) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.reset(items)),
            Store::Redis(r) => r.reset(items).await,
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

/// The layers of a decision, in the order they run: the deny cache ([`deny_cache`]), the leases
/// of approximate mode ([`lease`]), the circuit breaker and timeout around the store
/// ([`breaker`]), the store ([`Store`]).
pub struct Limiter {
    denials: deny_cache::DenyCache,
    leases: lease::Leases,
    store: Arc<Store>,
    timeout: Duration,
    metrics: LimiterMetrics,
}

impl Limiter {
    /// A limiter over `store`, each decision bounded by `timeout`; the deny cache and the leases
    /// start empty (one limiter per loaded policy).
    pub fn new(store: Arc<Store>, timeout: Duration, metrics: LimiterMetrics) -> Limiter {
        Limiter {
            denials: Default::default(),
            leases: Default::default(),
            store,
            timeout,
            metrics,
        }
    }

    /// The store behind the layers (kept across a reload that does not change it).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Decides: from the deny cache when an enforced limit is known to reject, from the leases
    /// when every limit is in approximate mode, else by the store, bounded by the store timeout
    /// and guarded by the circuit breaker.
    pub async fn decide(&self, items: &[Item]) -> Result<Decision, StoreError> {
        if let Some(local) = self.denials.check(items, Instant::now()) {
            self.metrics.local_denials.inc();
            return Ok(local);
        }
        if !items.is_empty() && items.iter().all(|i| i.batch > 0) {
            return self.leases.decide(self, items).await;
        }
        self.ask_store(items).await
    }

    /// The layers below the leases: one store decision behind the breaker; a rejection is
    /// remembered in the deny cache.
    async fn ask_store(&self, items: &[Item]) -> Result<Decision, StoreError> {
        let (result, asked) = breaker::call(self, items).await;
        if let Ok(decision) = &result {
            self.denials.remember(items, decision, asked);
        }
        result
    }

    fn record_error(&self, e: &StoreError) {
        self.metrics
            .errors
            .get_or_create(&[("kind", e.kind().to_string())])
            .inc();
    }

    /// Settles admitted items after their responses, in one store call (per cluster slot),
    /// bounded by the store timeout. What is given back also leaves this replica's deny cache.
    /// A failure leaves the reservations as they are (never an unbounded refund); it is
    /// counted as `tollgate_store_errors_total{kind="settle"}`.
    pub async fn settle(&self, settles: &[Settle]) {
        if settles.iter().all(|s| s.cost == s.item.cost) {
            return;
        }
        let refunded: Vec<Item> = settles
            .iter()
            .filter(|s| s.cost < s.item.cost)
            .map(|s| s.item)
            .collect();
        self.denials.forget(&refunded);
        let result = tokio::time::timeout(self.timeout, self.store.settle(settles, None)).await;
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => StoreError::Timeout(self.timeout),
        };
        tracing::warn!(error = %error, "settling a request's limits failed; its reservations stand");
        self.metrics
            .errors
            .get_or_create(&[("kind", "settle".to_string())])
            .inc();
    }

    /// Reads `items`' current budgets without changing anything (the store's answer, not the
    /// local layers': `GET /v1/counters`).
    pub async fn peek(&self, items: &[Item]) -> Result<Decision, StoreError> {
        match tokio::time::timeout(self.timeout, self.store.peek(items, None)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Resets `items` everywhere this replica keeps them: the store (shared by every replica),
    /// and this replica's deny cache and leases. Other replicas' deny caches ask the store
    /// again within [`deny_cache::REASK`], so a reset reaches them within that time.
    pub async fn reset(&self, items: &[Item]) -> Result<usize, StoreError> {
        self.denials.forget(items);
        self.leases.forget(items);
        match tokio::time::timeout(self.timeout, self.store.reset(items)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
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
pub fn items_for(limits: &[Limit], keys: &[KeySpec], subject: &Subject<'_>) -> Vec<Item> {
    let mut tags: [Option<Tag>; 8] = [None; 8];
    limits
        .iter()
        .map(|limit| {
            let spec = &keys[limit.key];
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
                ban: limit.ban,
                delay: limit.delay,
                settles: limit.settle != crate::policy::Settlement::Stands,
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
