//! Model test: the reference algorithms, the memory store and the Redis scripts give the same
//! decisions, field by field, for the same requests at the same times.
//!
//! - The reference model is a plain map from (limit id, identity) to [`State`], driven by
//!   [`Algorithm::check`] and [`Rolled::commit`] directly, with the all-or-nothing rule of
//!   `decide.lua`: a request is admitted when every enforced (non-shadow) limit allows it, and only
//!   then are the limits that allowed it charged (their rolled-forward states written). Otherwise
//!   nothing is written but the sliding log's trim, and the model never forgets a key.
//! - [`Store::Memory`] and [`Store::Redis`] (a real redis-server from the harness) are called
//!   through [`Store::decide`] with an explicit `now`, the interface production uses with `None`.
//!
//! The stores forget keys `ttl + TTL_SLACK` after their last change: the memory store by the `now`
//! it is given, Redis by its own clock, in real time, which the requests' times outrun (so the
//! scripts keep deciding on states the memory store has already forgotten). Agreeing with a model
//! that never forgets holds both to the claim that an expired state equals a fresh one.
//!
//! Property tests: random sequences of requests (a few identities, a few sets of limits, costs,
//! time steps from 0 µs to whole windows) for every algorithm with small quotas, and requests that
//! mix algorithms and shadow limits; between requests, reloads that give a limit a new N, burst
//! or mode while keeping its counters (its id: the same algorithm and window). Times start near the wall clock and only move forward, so the
//! memory store's sweeper (which never expires past the newest `now` it saw) cannot overtake them.
//! Deterministic tests pin the tricky spots: sliding_log requests in the same microsecond with a
//! cost above one (and whether their `retry_after` and `reset` hold), a clock that steps back, a
//! token bucket idle far longer than its fill time.

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use tokio::runtime::Runtime;
use tollgate::identity::Tag;
use tollgate::limiter::algorithm::{Algorithm, Kind, Micros, Outcome, Rolled, State};
use tollgate::limiter::{Decision, Item, Settle, Store, wall_clock};
use tollgate::policy::{RedisNodes, RedisSettings, Secret, StoreSettings};

use common::Redis;

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;

/// Windows, periods and intervals that divide a second: their edges fall at the same offsets
/// from the (second-aligned) start of every run, so a persisted failure replays alike.
const ROUND_WINDOWS: [Micros; 11] = [
    MS,
    2 * MS,
    5 * MS,
    10 * MS,
    20 * MS,
    50 * MS,
    100 * MS,
    125 * MS,
    250 * MS,
    500 * MS,
    SEC,
];

// ---------------------------------------------------------------------------------------------
// The reference model.

#[derive(Default)]
struct Model {
    states: HashMap<(u64, Tag), State>,
    /// Bans: until when (µs) each (limit, identity) is refused.
    bans: HashMap<(u64, Tag), Micros>,
}

impl Model {
    /// A settlement after the response: what was not used given back, an excess charged.
    fn settle(&mut self, settles: &[Settle], now: Micros) {
        for s in settles {
            let (item, reserved) = (&s.item, s.item.cost);
            let key = (item.id, item.tag);
            if s.cost < reserved {
                if let Some(state) = self.states.get_mut(&key)
                    && item.algorithm.owns(state)
                {
                    item.algorithm.refund(state, s.receipt, reserved - s.cost);
                }
            } else if s.cost > reserved {
                let state = self
                    .states
                    .entry(key)
                    .or_insert_with(|| item.algorithm.fresh(now));
                item.algorithm.charge(state, now, s.cost - reserved);
            }
        }
    }

    fn decide(&mut self, items: &[Item], now: Micros) -> Decision {
        let fresh: Vec<State> = items.iter().map(|item| item.algorithm.fresh(now)).collect();
        let (outcomes, rolled): (Vec<Outcome>, Vec<Rolled>) = items
            .iter()
            .zip(&fresh)
            .map(|(item, fresh)| {
                let state = match self.states.get(&(item.id, item.tag)) {
                    Some(state) if item.algorithm.owns(state) => state,
                    _ => fresh,
                };
                let ban = self.bans.get(&(item.id, item.tag)).copied();
                match ban.filter(|&until| item.ban > 0 && until > now) {
                    Some(until) => (
                        Outcome {
                            allowed: false,
                            remaining: 0,
                            reset: until - now,
                            retry_after: until - now,
                        },
                        Rolled::Nothing,
                    ),
                    None => {
                        let (mut o, r) =
                            item.algorithm.check_held(state, now, item.cost, item.delay);
                        if !o.allowed && item.ban > 0 && !item.shadow {
                            self.bans.insert((item.id, item.tag), now + item.ban);
                            (o.reset, o.retry_after) = (item.ban, item.ban);
                        }
                        (o, r)
                    }
                }
            })
            .unzip();
        let receipts: Vec<u64> = rolled.iter().map(Rolled::receipt).collect();
        let admitted = items
            .iter()
            .zip(&outcomes)
            .all(|(item, outcome)| item.shadow || outcome.allowed);
        for ((item, rolled), outcome) in items.iter().zip(rolled).zip(&outcomes) {
            if admitted && outcome.allowed {
                let state = self
                    .states
                    .entry((item.id, item.tag))
                    .or_insert_with(|| item.algorithm.fresh(now));
                if !item.algorithm.owns(state) {
                    *state = item.algorithm.fresh(now);
                }
                rolled.commit(state);
            } else if let Some(state) = self.states.get_mut(&(item.id, item.tag))
                && item.algorithm.owns(state)
            {
                // A request not admitted writes nothing but the sliding log's trim.
                rolled.tidy(state);
            }
        }
        Decision {
            admitted,
            outcomes,
            receipts,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The three implementations side by side.

/// A request's time and limits.
type Request = (Micros, Vec<Item>);

/// One redis-server, one Redis store and one runtime for a whole test function.
struct Backends {
    redis_store: Store,
    flush: Mutex<redis::Connection>,
    runtime: Runtime,
    /// Dropped last: kills the server.
    _server: Redis,
}

impl Backends {
    fn start() -> Backends {
        let server = Redis::start();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let redis_store = {
            let _entered = runtime.enter();
            Store::new(&StoreSettings::Redis(RedisSettings {
                nodes: RedisNodes::Single(Secret(server.url())),
                username: None,
                password: None,
                tls_ca: None,
                tls_client: None,
                pool_size: 2,
                timeout: Duration::from_secs(5),
                prefix: "model".into(),
            }))
            .expect("redis store")
        };
        Backends {
            redis_store,
            flush: Mutex::new(server.conn()),
            runtime,
            _server: server,
        }
    }

    /// Empty everywhere: Redis flushed, a new memory store, a new model.
    fn fresh(&self) -> Trio<'_> {
        let mut conn = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        redis::cmd("FLUSHALL")
            .query::<()>(&mut conn)
            .expect("FLUSHALL");
        let memory = {
            // The memory store spawns its sweeper on the current runtime.
            let _entered = self.runtime.enter();
            Store::new(&StoreSettings::Memory {
                max_keys: 1 << 20,
                timeout: Duration::from_secs(5),
            })
            .expect("memory store")
        };
        Trio {
            model: Model::default(),
            memory,
            redis: &self.redis_store,
        }
    }

    /// Runs `requests` (absolute times) against fresh backends; stops at the first disagreement.
    fn replay(&self, requests: &[Request]) -> Result<Vec<Decision>, String> {
        let mut trio = self.fresh();
        self.runtime.block_on(async {
            let mut decisions = Vec::new();
            for (n, (now, items)) in requests.iter().enumerate() {
                let decision = trio
                    .decide(items, *now)
                    .await
                    .map_err(|e| format!("request {n} at {now} µs: {}\n{e}", show_items(items)))?;
                decisions.push(decision);
            }
            Ok(decisions)
        })
    }
}

struct Trio<'a> {
    model: Model,
    memory: Store,
    redis: &'a Store,
}

impl Trio<'_> {
    /// Decides with all three; the model's decision if both stores agree with it.
    async fn decide(&mut self, items: &[Item], now: Micros) -> Result<Decision, String> {
        // A peek (what `tollgate explain` uses) sees the decision that follows and changes
        // nothing: both stores are asked twice before the real decision.
        let mut peeks = Vec::new();
        for _ in 0..2 {
            peeks.push(("memory peek", self.memory.peek(items, Some(now)).await));
            peeks.push(("redis peek", self.redis.peek(items, Some(now)).await));
        }
        let model = self.model.decide(items, now);
        for (name, peek) in peeks {
            match peek {
                // A peek takes nothing: its receipts are not compared.
                Ok(p) if (p.admitted, &p.outcomes) == (model.admitted, &model.outcomes) => {}
                Ok(p) => {
                    return Err(format!(
                        "  model: {}
≠ {name}: {}",
                        show(&model),
                        show(&p)
                    ));
                }
                Err(e) => return Err(format!("{name} failed: {e}")),
            }
        }
        let memory = self
            .memory
            .decide(items, Some(now))
            .await
            .map_err(|e| format!("memory store failed: {e}"))?;
        let redis = self
            .redis
            .decide(items, Some(now))
            .await
            .map_err(|e| format!("redis store failed: {e}"))?;
        if memory == model && redis == model {
            return Ok(model);
        }
        self.mismatch(&model, &memory, &redis)
    }

    /// Settles with all three (then the next decisions show whether they agree).
    async fn settle(&mut self, settles: &[Settle], now: Micros) -> Result<(), String> {
        self.model.settle(settles, now);
        self.memory
            .settle(settles, Some(now))
            .await
            .map_err(|e| format!("memory settle failed: {e}"))?;
        self.redis
            .settle(settles, Some(now))
            .await
            .map_err(|e| format!("redis settle failed: {e}"))
    }

    fn mismatch(
        &self,
        model: &Decision,
        memory: &Decision,
        redis: &Decision,
    ) -> Result<Decision, String> {
        let mark = |d: &Decision| if d == model { "  " } else { "≠ " };
        Err(format!(
            "  model:  {}\n{}memory: {}\n{}redis:  {}",
            show(model),
            mark(memory),
            show(memory),
            mark(redis),
            show(redis)
        ))
    }
}

fn show(d: &Decision) -> String {
    let outcomes: Vec<String> = d
        .outcomes
        .iter()
        .map(|o| {
            format!(
                "{} remaining {} reset {} retry {}",
                if o.allowed { "allow" } else { "deny" },
                o.remaining,
                o.reset,
                o.retry_after
            )
        })
        .collect();
    format!(
        "admitted {} [{}] receipts {:?}",
        d.admitted,
        outcomes.join("; "),
        d.receipts
    )
}

fn show_items(items: &[Item]) -> String {
    let items: Vec<String> = items
        .iter()
        .map(|i| {
            format!(
                "{{ {:?}, cost {}, id {}, who {}{} }}",
                i.algorithm,
                i.cost,
                i.id,
                i.tag[0],
                if i.shadow { ", shadow" } else { "" },
            ) + &format!(" ban {} delay {}", i.ban, i.delay)
        })
        .collect();
    items.join(", ")
}

fn tag(who: u8) -> Tag {
    let mut tag = [0x5a; 16];
    tag[0] = who;
    tag
}

fn item(algorithm: Algorithm, cost: u64) -> Item {
    Item {
        algorithm,
        cost,
        shadow: false,
        id: 1,
        tag: tag(0),
        batch: 0,
        ban: 0,
        delay: 0,
        // The model settles its items: each decision carries its receipts.
        settles: true,
    }
}

/// A time a few seconds ahead of the wall clock, aligned to `align`.
fn start_time(align: Micros) -> Micros {
    (wall_clock() / align + 2) * align
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

// ---------------------------------------------------------------------------------------------
// Random cases.

#[derive(Debug, Clone, Copy)]
struct Limit {
    algorithm: Algorithm,
    shadow: bool,
    /// µs (0: none); never on a shadow limit (validation refuses it).
    ban: Micros,
    /// µs (0: none); token_bucket and gcra only.
    delay: Micros,
}

/// New parameters for a limit, as a reload that keeps its counters may give it: the same
/// algorithm and window (they make the limit's id), any count, burst and mode. A token bucket's
/// or a GCRA's period is not part of what the stores see, so any refill, unit or interval does.
#[derive(Debug, Clone, Copy)]
struct Reload {
    /// The new N (windows) or burst (token_bucket, gcra).
    quota: u64,
    /// token_bucket: the new rate is `count` per `period`.
    count: u64,
    period: Micros,
    /// gcra: the new emission interval.
    interval: Micros,
    shadow: bool,
}

impl Reload {
    fn apply(&self, limit: Limit) -> Limit {
        let quota = self.quota;
        let algorithm = match limit.algorithm {
            Algorithm::FixedWindow { window, .. } => Algorithm::FixedWindow { quota, window },
            Algorithm::SlidingWindow { window, .. } => Algorithm::SlidingWindow { quota, window },
            Algorithm::SlidingLog { window, .. } => Algorithm::SlidingLog {
                quota: quota.min(window),
                window,
            },
            Algorithm::TokenBucket { .. } => {
                let g = gcd(self.count, self.period);
                Algorithm::TokenBucket {
                    burst: quota,
                    refill: self.count / g,
                    unit: self.period / g,
                }
            }
            Algorithm::Gcra { .. } => Algorithm::Gcra {
                burst: quota,
                interval: self.interval,
            },
            Algorithm::Concurrency { lease, .. } => Algorithm::Concurrency { max: quota, lease },
        };
        Limit {
            algorithm,
            shadow: self.shadow,
            ban: if self.shadow { 0 } else { limit.ban },
            delay: limit.delay,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Request(Step),
    /// A reload changes limit `limit`; later requests face the new parameters.
    Reload {
        limit: usize,
        to: Reload,
    },
    /// The response of an earlier admitted request (the `back`-th most recent one not yet
    /// settled) settles its limits: each to `percent` % of its reservation (0: given back,
    /// as `count` does for an unlisted status and a concurrency slot on release; above 100:
    /// a debt, for the algorithms `cost_from` takes).
    Settle {
        dt: Micros,
        back: usize,
        percent: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Step {
    /// µs since the previous request (the first: since the case's start).
    dt: Micros,
    /// Which identity asks.
    who: u8,
    /// Which set of limits applies (an index into `Case::sets`).
    set: usize,
    /// Requested cost, capped at each limit's quota.
    cost: u64,
}

#[derive(Debug, Clone)]
struct Case {
    /// µs from the run's second-aligned start to the case's.
    offset: Micros,
    /// The limits; limit `i` has id `i + 1`.
    limits: Vec<Limit>,
    /// The sets of limits a request can face (like routes): indices into `limits`, distinct.
    sets: Vec<Vec<usize>>,
    steps: Vec<Action>,
}

impl Case {
    fn items(&self, limits: &[Limit], step: &Step) -> Vec<Item> {
        self.sets[step.set]
            .iter()
            .map(|&i| {
                let limit = limits[i];
                Item {
                    algorithm: limit.algorithm,
                    cost: step.cost.min(limit.algorithm.quota()),
                    shadow: limit.shadow,
                    id: i as u64 + 1,
                    tag: tag(step.who),
                    batch: 0,
                    ban: limit.ban,
                    delay: limit.delay,
                    settles: true,
                }
            })
            .collect()
    }

    fn run(&self, backends: &Backends, base: Micros) -> Result<(), String> {
        let mut trio = backends.fresh();
        let start = base + self.offset;
        backends.runtime.block_on(async {
            let mut now = start;
            let mut limits = self.limits.clone();
            // Admitted requests whose response has not come yet: their settlements.
            let mut open: Vec<Vec<Settle>> = Vec::new();
            for (n, action) in self.steps.iter().enumerate() {
                let step = match action {
                    Action::Request(step) => step,
                    Action::Reload { limit, to } => {
                        limits[*limit] = to.apply(limits[*limit]);
                        continue;
                    }
                    Action::Settle { dt, back, percent } => {
                        now += dt;
                        if open.is_empty() {
                            continue;
                        }
                        let reserved = open.remove(open.len() - 1 - back % open.len());
                        let settles: Vec<Settle> = reserved
                            .into_iter()
                            .map(|s| Settle {
                                cost: settled_cost(&s.item, *percent),
                                ..s
                            })
                            .collect();
                        trio.settle(&settles, now).await.map_err(|e| {
                            format!("step {n} (settle) at start + {} µs: {e}", now - start)
                        })?;
                        continue;
                    }
                };
                now += step.dt;
                let items = self.items(&limits, step);
                let decision = trio.decide(&items, now).await.map_err(|e| {
                    format!(
                        "step {n} at start + {} µs (absolute {now}): {}\n{e}",
                        now - start,
                        show_items(&items)
                    )
                })?;
                if decision.admitted {
                    let settles = items
                        .iter()
                        .zip(&decision.outcomes)
                        .zip(&decision.receipts)
                        .filter(|((item, o), _)| o.allowed && !item.shadow)
                        .map(|((item, _), &receipt)| Settle {
                            item: *item,
                            receipt,
                            cost: item.cost,
                        })
                        .collect();
                    open.push(settles);
                }
            }
            Ok(())
        })
    }
}

/// What a settlement at `percent` % of the reservation comes to for `item`: a sliding log is
/// only given back (it takes no `cost_from`), a concurrency slot released.
fn settled_cost(item: &Item, percent: u64) -> u64 {
    let cost = item.cost * percent / 100;
    match item.algorithm.kind() {
        Kind::SlidingLog => cost.min(item.cost),
        Kind::Concurrency => 0,
        _ => cost,
    }
}

/// A window or period: mostly round ones, some arbitrary, a few shorter than a millisecond.
fn window() -> impl Strategy<Value = Micros> {
    prop_oneof![
        3 => select(&ROUND_WINDOWS[..]),
        2 => MS..=2 * SEC,
        1 => 1..MS,
    ]
}

fn quota() -> impl Strategy<Value = u64> {
    1..=6u64
}

fn fixed_window() -> BoxedStrategy<Algorithm> {
    (quota(), window())
        .prop_map(|(quota, window)| Algorithm::FixedWindow { quota, window })
        .boxed()
}

fn sliding_window() -> BoxedStrategy<Algorithm> {
    (quota(), window())
        .prop_map(|(quota, window)| Algorithm::SlidingWindow { quota, window })
        .boxed()
}

fn sliding_log() -> BoxedStrategy<Algorithm> {
    // At most one unit per µs of the window (policy validation).
    (quota(), window())
        .prop_map(|(quota, window)| Algorithm::SlidingLog {
            quota,
            window: window.max(quota),
        })
        .boxed()
}

fn token_bucket() -> BoxedStrategy<Algorithm> {
    // `count` per `period`, reduced by gcd as policy validation does.
    (quota(), 1..=12u64, window())
        .prop_map(|(burst, count, period)| {
            let g = gcd(count, period);
            Algorithm::TokenBucket {
                burst,
                refill: count / g,
                unit: period / g,
            }
        })
        .boxed()
}

fn gcra() -> BoxedStrategy<Algorithm> {
    let interval = prop_oneof![
        2 => select(&ROUND_WINDOWS[..]),
        1 => 1..=20u64,
        1 => 20..=2_000u64,
        2 => 2_000..=500_000u64,
    ];
    (quota(), interval)
        .prop_map(|(burst, interval)| Algorithm::Gcra { burst, interval })
        .boxed()
}

/// The strategy for one row of the algorithm table (exhaustive: a new algorithm needs one).
fn strategy(kind: Kind) -> BoxedStrategy<Algorithm> {
    match kind {
        Kind::FixedWindow => fixed_window(),
        Kind::SlidingLog => sliding_log(),
        Kind::SlidingWindow => sliding_window(),
        Kind::TokenBucket => token_bucket(),
        Kind::Gcra => gcra(),
        Kind::Concurrency => (1..=4u64, window())
            .prop_map(|(max, lease)| Algorithm::Concurrency { max, lease })
            .boxed(),
    }
}

/// Every algorithm in the table, equally often.
fn any_algorithm() -> BoxedStrategy<Algorithm> {
    proptest::strategy::Union::new(Kind::ALL.map(strategy)).boxed()
}

/// Time between requests: often none or a few µs, sometimes whole windows.
fn dt() -> impl Strategy<Value = Micros> {
    prop_oneof![
        3 => Just(0),
        5 => 1..MS,
        3 => MS..200 * MS,
        2 => 200 * MS..3 * SEC,
        1 => 3 * SEC..30 * SEC,
    ]
}

fn cost() -> impl Strategy<Value = u64> {
    prop_oneof![4 => Just(1u64), 2 => 2..=3u64, 1 => 4..=6u64]
}

/// An [`Action`] before its indices are resolved against the case's sets and limits.
#[derive(Debug, Clone)]
enum RawAction {
    Request {
        dt: Micros,
        who: u8,
        set: Index,
        cost: u64,
    },
    Reload {
        limit: Index,
        to: Reload,
    },
    Settle {
        dt: Micros,
        back: usize,
        percent: u64,
    },
}

/// `pool` limits drawn from `algorithms` (each shadow with probability `shadow`), up to three
/// sets of up to `per_request` of them, up to 40 requests.
fn case(
    algorithms: BoxedStrategy<Algorithm>,
    pool: usize,
    per_request: usize,
    shadow: f64,
) -> impl Strategy<Value = Case> {
    // One limit in four has a ban; one held limit in two has a delay.
    let ban = prop_oneof![3 => Just(0u64), 1 => 1..3 * SEC];
    let delay = prop_oneof![1 => Just(0u64), 1 => 1..2 * SEC];
    let limit = (algorithms, prop::bool::weighted(shadow), ban, delay).prop_map(
        |(algorithm, shadow, ban, delay)| Limit {
            algorithm,
            shadow,
            ban: if shadow { 0 } else { ban },
            delay: if algorithm.kind().takes_delay() {
                delay
            } else {
                0
            },
        },
    );
    let step = (dt(), 0..3u8, any::<Index>(), cost());
    let reload = (
        quota(),
        1..=12u64,
        window(),
        prop_oneof![select(&ROUND_WINDOWS[..]), 1..=500_000u64],
        prop::bool::weighted(shadow),
    )
        .prop_map(|(quota, count, period, interval, shadow)| Reload {
            quota,
            count,
            period,
            interval,
            shadow,
        });
    let percent = prop_oneof![2 => Just(0u64), 1 => Just(50), 1 => Just(100), 2 => 101..=300u64];
    // A request, a reload of one limit, or the response of an earlier request settling it.
    let action = prop_oneof![
        7 => step.prop_map(|(dt, who, set, cost)| RawAction::Request { dt, who, set, cost }),
        1 => (any::<Index>(), reload).prop_map(|(limit, to)| RawAction::Reload { limit, to }),
        3 => (dt(), 0..4usize, percent)
            .prop_map(|(dt, back, percent)| RawAction::Settle { dt, back, percent }),
    ];
    (
        0..10 * SEC,
        prop::collection::vec(limit, 1..=pool),
        prop::collection::vec(
            prop::collection::vec(any::<Index>(), 1..=per_request),
            1..=3,
        ),
        prop::collection::vec(action, 1..=40),
    )
        .prop_map(|(offset, limits, sets, steps)| {
            let sets: Vec<Vec<usize>> = sets
                .iter()
                .map(|set| {
                    let mut chosen = Vec::new();
                    for index in set {
                        let i = index.index(limits.len());
                        if !chosen.contains(&i) {
                            chosen.push(i);
                        }
                    }
                    chosen
                })
                .collect();
            let steps = steps
                .into_iter()
                .map(|action| match action {
                    RawAction::Request { dt, who, set, cost } => Action::Request(Step {
                        dt,
                        who,
                        set: set.index(sets.len()),
                        cost,
                    }),
                    RawAction::Reload { limit, to } => Action::Reload {
                        limit: limit.index(limits.len()),
                        to,
                    },
                    RawAction::Settle { dt, back, percent } => Action::Settle { dt, back, percent },
                })
                .collect();
            Case {
                offset,
                limits,
                sets,
                steps,
            }
        })
}

/// Runs `cases` random cases of `strategy` against one redis-server.
fn agree_on_random_cases(strategy: impl Strategy<Value = Case>, cases: u32) {
    let backends = Backends::start();
    let base = start_time(SEC);
    let config = ProptestConfig {
        cases,
        // tests/model.proptest-regressions, next to this file.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    };
    proptest!(config, |(case in strategy)| {
        if let Err(e) = case.run(&backends, base) {
            return Err(TestCaseError::fail(e));
        }
    });
}

#[test]
fn fixed_window_stores_agree_with_the_model() {
    agree_on_random_cases(case(fixed_window(), 3, 2, 0.2), 96);
}

#[test]
fn sliding_window_stores_agree_with_the_model() {
    agree_on_random_cases(case(sliding_window(), 3, 2, 0.2), 96);
}

#[test]
fn sliding_log_stores_agree_with_the_model() {
    agree_on_random_cases(case(sliding_log(), 3, 2, 0.2), 96);
}

#[test]
fn token_bucket_stores_agree_with_the_model() {
    agree_on_random_cases(case(token_bucket(), 3, 2, 0.2), 96);
}

#[test]
fn gcra_stores_agree_with_the_model() {
    agree_on_random_cases(case(gcra(), 3, 2, 0.2), 96);
}

#[test]
fn concurrency_stores_agree_with_the_model() {
    agree_on_random_cases(case(strategy(Kind::Concurrency), 3, 2, 0.2), 96);
}

/// Requests facing several algorithms at once, some limits in shadow mode: all-or-nothing.
#[test]
fn mixed_requests_agree_with_the_model() {
    agree_on_random_cases(case(any_algorithm(), 4, 3, 0.3), 128);
}

// ---------------------------------------------------------------------------------------------
// Pinned cases.

/// Units admitted in the same microsecond take the following microseconds (timestamps stay
/// distinct), so they leave the window one by one, µs after µs.
#[test]
fn sliding_log_same_microsecond_requests_with_cost_above_one() {
    let backends = Backends::start();
    let t = start_time(SEC);
    let log = Algorithm::SlidingLog {
        quota: 6,
        window: 10,
    };
    let at = |dt: Micros, cost: u64| (t + dt, vec![item(log, cost)]);
    let requests = vec![
        at(0, 2),  // units at t, t+1
        at(0, 2),  // t+2, t+3
        at(0, 3),  // denied: 4 + 3 > 6
        at(0, 2),  // t+4, t+5
        at(1, 1),  // denied: the log's newest is t+5, nothing has left
        at(10, 1), // t has left: t+10
        at(11, 2), // t+1 has left, 5 + 2 > 6: denied
        at(12, 2), // t+2 has left: t+12, t+13
        at(12, 1), // the newest is t+13: the window ends there, t+3 has left: t+14
        at(25, 6), // everything up to t+14 has left
    ];
    let decisions = backends.replay(&requests).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(bool, u64)> = decisions
        .iter()
        .map(|d| (d.outcomes[0].allowed, d.outcomes[0].remaining))
        .collect();
    assert_eq!(
        got,
        [
            (true, 4),
            (true, 2),
            (false, 2),
            (true, 0),
            (false, 0),
            (true, 0),
            (false, 1),
            (true, 0),
            (true, 0),
            (true, 0),
        ]
    );

    // A window as short as the quota (one unit per µs), and a request whose other limit denies:
    // the log is not charged, so the next request in the same µs still fits.
    let tight = Algorithm::SlidingLog {
        quota: 3,
        window: 3,
    };
    let once = Algorithm::FixedWindow {
        quota: 1,
        window: SEC,
    };
    let both = |dt: Micros, cost: u64| {
        let mut second = item(once, 1);
        second.id = 2;
        (t + dt, vec![item(tight, cost), second])
    };
    let requests = vec![
        both(0, 2),                    // admitted: log t, t+1; window 1/1
        both(0, 1),                    // window denies: log not charged
        (t, vec![item(tight, 1)]),     // log alone: t+2
        (t, vec![item(tight, 1)]),     // full
        (t + 2, vec![item(tight, 2)]), // nothing has left yet
        (t + 3, vec![item(tight, 2)]), // t has left, 2 + 2 > 3
        (t + 4, vec![item(tight, 2)]), // t+1 has left too: t+4, t+5
    ];
    let decisions = backends.replay(&requests).unwrap_or_else(|e| panic!("{e}"));
    let allowed: Vec<Vec<bool>> = decisions
        .iter()
        .map(|d| d.outcomes.iter().map(|o| o.allowed).collect())
        .collect();
    assert_eq!(
        allowed,
        [
            vec![true, true],
            vec![true, false],
            vec![true],
            vec![false],
            vec![false],
            vec![false],
            vec![true],
        ]
    );
}

/// A bucket idle far longer than it takes to fill is full, never overfull, and the arithmetic
/// does not overflow (the memory store has forgotten the key by then; Redis has not).
#[test]
fn token_bucket_idle_far_longer_than_its_fill_time() {
    let backends = Backends::start();
    let t = start_time(SEC);
    // 7 per 3 ms, burst 3: refill 7 units per µs, a token is 3000 units.
    let fast = Algorithm::TokenBucket {
        burst: 3,
        refill: 7,
        unit: 3_000,
    };
    // 1 per 1000 s, burst 6.
    let slow = Algorithm::TokenBucket {
        burst: 6,
        refill: 1,
        unit: 1_000_000_000,
    };
    let gcra = Algorithm::Gcra {
        burst: 4,
        interval: 250 * MS,
    };
    for alg in [fast, slow, gcra] {
        let burst = alg.quota();
        let at = |now: Micros, cost: u64| (now, vec![item(alg, cost)]);
        let requests = vec![
            at(t, burst),
            at(t + 1, 1),
            at(t + 10 * SEC, burst),
            at(t + 10 * SEC + 1, 1),
            at(t + 10 * SEC + 1_000 * SEC, 1),
            at(t + 10 * SEC + 1_000 * SEC + 5, 1),
            // Decades later, still below 2^53 µs.
            at(t + 3_000_000_000 * SEC, 1),
            at(t + 3_000_000_000 * SEC, burst - 1),
            at(t + 3_000_000_000 * SEC, 1),
        ];
        let decisions = backends
            .replay(&requests)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        let remaining: Vec<Option<u64>> = decisions
            .iter()
            .map(|d| d.outcomes[0].allowed.then_some(d.outcomes[0].remaining))
            .collect();
        assert_eq!(remaining[0], Some(0), "{alg:?}");
        assert_eq!(remaining[1], None, "{alg:?}");
        assert_eq!(remaining[6], Some(burst - 1), "{alg:?}: full, not overfull");
        assert_eq!(remaining[7], Some(0), "{alg:?}");
        assert_eq!(remaining[8], None, "{alg:?}");
    }
    let slow_decisions = backends
        .replay(&[
            (t, vec![item(slow, 6)]),
            (t + 10 * SEC, vec![item(slow, 1)]),
            (t + 10 * SEC + 1_000 * SEC, vec![item(slow, 1)]),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!slow_decisions[1].admitted);
    assert_eq!(slow_decisions[1].outcomes[0].retry_after, 990 * SEC);
    assert!(slow_decisions[2].admitted);
}

/// A reload that slows a limit down. The key's TTL was set under the old rate, so the memory
/// store forgets it (by the `now` it is given) when the old rate would have filled the bucket,
/// while Redis (by its own clock) still holds it: both must read that state as a fresh one. A
/// request soon after the reload sees the tokens carried over.
#[test]
fn a_reload_that_slows_a_limit_down_past_its_old_ttl() {
    let backends = Backends::start();
    let t = start_time(SEC);
    // 100/s (full again 40 ms after a drain), then 1 per 10 s; burst 4.
    let fast = Algorithm::TokenBucket {
        burst: 4,
        refill: 1,
        unit: 10_000,
    };
    let slow = Algorithm::TokenBucket {
        burst: 4,
        refill: 1,
        unit: 10_000_000,
    };
    let fast_gcra = Algorithm::Gcra {
        burst: 4,
        interval: 10 * MS,
    };
    let slow_gcra = Algorithm::Gcra {
        burst: 4,
        interval: 10 * SEC,
    };
    for (from, to) in [(fast, slow), (fast_gcra, slow_gcra)] {
        // What each request leaves (None: rejected), the backends agreeing step for step.
        let remaining_after = |requests: &[Request]| -> Vec<Option<u64>> {
            backends
                .replay(requests)
                .unwrap_or_else(|e| panic!("{from:?} -> {to:?}: {e}"))
                .iter()
                .map(|d| d.outcomes[0].allowed.then_some(d.outcomes[0].remaining))
                .collect()
        };
        let requests = [
            (t, vec![item(from, 3)]),
            // 1 left; 10 ms later (under the old rate, as the state was written) 2, carried over.
            (t + 10 * MS, vec![item(to, 1)]),
            (t + 10 * MS, vec![item(to, 1)]),
            (t + 10 * MS, vec![item(to, 1)]),
        ];
        let remaining = remaining_after(&requests);
        assert_eq!(
            remaining,
            [Some(1), Some(1), Some(0), None],
            "{from:?} -> {to:?}"
        );

        // Drained, then nothing until the old rate would have refilled it and the memory
        // store's entry has expired (40 ms + the 1 s slack): a full bucket under the new rate.
        let requests = [
            (t, vec![item(from, 4)]),
            (t + 2 * SEC, vec![item(to, 1)]),
            (t + 2 * SEC, vec![item(to, 3)]),
            (t + 2 * SEC, vec![item(to, 1)]),
        ];
        let remaining = remaining_after(&requests);
        assert_eq!(
            remaining,
            [Some(0), Some(3), Some(0), None],
            "{from:?} -> {to:?}"
        );
    }
}

/// Keys written by an older tollgate hold a token bucket as "<level>:<time>" and a GCRA as
/// "<TAT>", without the parameters: they are read as written under the limit's own (what that
/// tollgate meant).
#[test]
fn states_of_an_older_tollgate() {
    let backends = Backends::start();
    let t = start_time(SEC);
    // 10/s, burst 50: a token is 100_000 units, a cell 100_000 µs; 21 left at t either way.
    let bucket = Algorithm::TokenBucket {
        burst: 50,
        refill: 1,
        unit: 100_000,
    };
    let gcra = Algorithm::Gcra {
        burst: 50,
        interval: 100_000,
    };
    let cases = [
        (bucket, format!("{}:{t}", 21 * 100_000)),
        (gcra, format!("{}", t + 29 * 100_000)),
    ];
    for (alg, old_state) in cases {
        let request = item(alg, 1);
        let key = tollgate::limiter::redis::key_name("model", request.id, &request.tag);
        {
            let mut conn = backends.flush.lock().unwrap_or_else(|e| e.into_inner());
            redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
            redis::cmd("SET")
                .arg(&key)
                .arg(old_state)
                .arg("PX")
                .arg(60_000)
                .query::<()>(&mut conn)
                .unwrap();
        }
        // 100 ms later: one more token (cell), one taken.
        let decision = backends
            .runtime
            .block_on(backends.redis_store.decide(&[request], Some(t + 100 * MS)))
            .unwrap();
        assert!(decision.admitted, "{alg:?}");
        assert_eq!(decision.outcomes[0].remaining, 21, "{alg:?}");
    }
}

/// Clock steps back when only admitted requests came before: every store keeps counting from the
/// newest state written, and they agree.
#[test]
fn clock_step_back_after_admitted_requests() {
    let backends = Backends::start();
    let t = start_time(10 * SEC);
    let scenarios: Vec<(&str, Algorithm, Vec<Micros>)> = vec![
        (
            "fixed_window",
            Algorithm::FixedWindow {
                quota: 2,
                window: SEC,
            },
            vec![1_500 * MS, 500 * MS, 200 * MS, 1_700 * MS],
        ),
        (
            "sliding_window",
            Algorithm::SlidingWindow {
                quota: 3,
                window: SEC,
            },
            vec![1_500 * MS, 500 * MS, 200 * MS, 600 * MS, 2_100 * MS],
        ),
        (
            "sliding_log",
            Algorithm::SlidingLog {
                quota: 2,
                window: SEC,
            },
            vec![1_500 * MS, 500 * MS, 600 * MS, 2_600 * MS],
        ),
        (
            "token_bucket",
            Algorithm::TokenBucket {
                burst: 2,
                refill: 1,
                unit: 100_000,
            },
            vec![500 * MS, 200 * MS, 300 * MS, 600 * MS, 650 * MS],
        ),
        (
            "gcra",
            Algorithm::Gcra {
                burst: 2,
                interval: 100 * MS,
            },
            vec![500 * MS, 200 * MS, 300 * MS, 600 * MS, 650 * MS],
        ),
    ];
    let mut failures = Vec::new();
    for (name, alg, times) in scenarios {
        let requests: Vec<_> = times
            .iter()
            .map(|&dt| (t + dt, vec![item(alg, 1)]))
            .collect();
        if let Err(e) = backends.replay(&requests) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Clock steps back after a denied request. `check` normalises a state to `now` (rolls windows,
/// refills buckets) and the memory store writes that back even when the request is denied; the
/// Redis scripts write nothing on a denial (only sliding_log's trim). With a forward clock the
/// difference is invisible; once the clock steps back, the stores decide differently.
#[test]
fn clock_step_back_after_a_denied_request() {
    let backends = Backends::start();
    let t = start_time(10 * SEC);
    let bucket = Algorithm::TokenBucket {
        burst: 2,
        refill: 1,
        unit: 100_000,
    };
    let sliding = Algorithm::SlidingWindow {
        quota: 2,
        window: SEC,
    };
    let log = Algorithm::SlidingLog {
        quota: 2,
        window: SEC,
    };
    let gcra = Algorithm::Gcra {
        burst: 2,
        interval: 100 * MS,
    };
    let fixed = Algorithm::FixedWindow {
        quota: 1,
        window: SEC,
    };
    let mut slow = item(
        Algorithm::Gcra {
            burst: 1,
            interval: 10 * SEC,
        },
        1,
    );
    slow.id = 2;
    let one = |dt: Micros, alg: Algorithm, cost: u64| (t + dt, vec![item(alg, cost)]);
    let scenarios: Vec<(&str, Vec<Request>)> = vec![
        (
            "token_bucket: drained at t, denied at t+50ms (refilled to t+50ms), asked at t+20ms",
            vec![
                one(0, bucket, 2),
                one(50 * MS, bucket, 1),
                one(20 * MS, bucket, 1),
            ],
        ),
        (
            "sliding_window: 2 at t+100ms, denied at t+1.2s (window rolled), asked at t+900ms",
            vec![
                one(100 * MS, sliding, 2),
                one(1_200 * MS, sliding, 2),
                one(900 * MS, sliding, 1),
            ],
        ),
        (
            "fixed_window + gcra: admitted at t+500ms, denied by gcra at t+1.5s (window rolled), \
             fixed_window alone at t+700ms",
            vec![
                (t + 500 * MS, vec![item(fixed, 1), slow]),
                (t + 1_500 * MS, vec![item(fixed, 1), slow]),
                one(700 * MS, fixed, 1),
            ],
        ),
        (
            "sliding_log: denied at t+1.2s (trimmed everywhere), asked at t+100ms",
            vec![
                one(0, log, 1),
                one(500 * MS, log, 1),
                one(1_200 * MS, log, 2),
                one(100 * MS, log, 1),
            ],
        ),
        (
            "gcra: denied at t+50ms (nothing to normalise), asked at t+20ms",
            vec![
                one(0, gcra, 2),
                one(50 * MS, gcra, 1),
                one(20 * MS, gcra, 1),
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (name, requests) in scenarios {
        if let Err(e) = backends.replay(&requests) {
            failures.push(format!("{name}:\n{e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 5 scenarios disagree:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// `retry_after` promises that the same request fits that long from now, and `reset` that the
/// whole quota does. Units admitted in the same microsecond take the following microseconds, so a
/// sliding_log's newest unit can be ahead of `now`; the three implementations agree, but measure
/// both from that newest unit instead of from `now`, and the promise is broken by as many µs.
#[test]
fn sliding_log_retry_after_and_reset_hold_after_a_same_microsecond_burst() {
    let backends = Backends::start();
    let t = start_time(SEC);
    let log = Algorithm::SlidingLog {
        quota: 3,
        window: SEC,
    };
    let burst = [(t, vec![item(log, 3)]), (t, vec![item(log, 1)])];
    let decisions = backends.replay(&burst).unwrap_or_else(|e| panic!("{e}"));
    let denied = decisions[1].outcomes[0];
    assert!(!denied.allowed);

    // The units sit at t, t+1 and t+2: the first leaves the window at t + 1 s, the last at
    // t + 1 s + 2 µs.
    let mut retry = burst.to_vec();
    retry.push((t + denied.retry_after, vec![item(log, 1)]));
    let retried = backends.replay(&retry).unwrap_or_else(|e| panic!("{e}"));
    let mut reset = burst.to_vec();
    reset.push((t + denied.reset, vec![item(log, 3)]));
    let after_reset = backends.replay(&reset).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        retried[2].admitted && after_reset[2].admitted,
        "denied at t with retry_after {} µs and reset {} µs (expected {} and {}); \
         retried then: {}; whole quota at t + reset: {}",
        denied.retry_after,
        denied.reset,
        SEC,
        SEC + 2,
        show(&retried[2]),
        show(&after_reset[2])
    );
}
