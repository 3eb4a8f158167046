//! The five rate-limit algorithms as small pure functions of (state, now, cost).
//!
//! This file is the reference: the memory store runs these functions, and every script in `lua/`
//! performs the same integer arithmetic step for step (a property test holds them to it). Times
//! are microseconds since the Unix epoch. Every quantity stays below 2^53 so that Lua's numbers
//! (IEEE doubles) represent it exactly; `policy` validation guarantees the bounds.
//!
//! A decision has two phases, so that a request with several limits is all-or-nothing:
//! [`Algorithm::check`] reads a state and says what admitting `cost` at `now` would do, and what
//! the state would then be (a [`Rolled`]); [`Rolled::commit`] writes it, and is called only when
//! every limit of the request allowed. A request not admitted writes nothing but the sliding
//! log's trim ([`Rolled::tidy`]), so no store copies a state to restore it.

use std::collections::{BTreeMap, VecDeque};

/// Microseconds since the Unix epoch.
pub type Micros = u64;

/// Extra time every stored state lives past the moment it becomes equivalent to a fresh one, so
/// that a store's expiry never races a decision that still needs the state.
pub const TTL_SLACK: Micros = 1_000_000;

/// A concurrency limit's Retry-After: a slot frees when some request ends, which nobody can
/// tell in advance.
pub const CONCURRENCY_RETRY: Micros = 1_000_000;

/// Every algorithm tollgate has, in the contract's order: the one table that validation, the
/// `check` summaries, the key hints, the Lua scripts (their order, dispatch codes and commit
/// functions) and the tests' list of algorithms are read from. Adding an algorithm is a row
/// here, an [`Algorithm`] variant and its `lua/` file; every `match` that must learn about it
/// is exhaustive, so the compiler lists the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    FixedWindow,
    SlidingLog,
    SlidingWindow,
    TokenBucket,
    Gcra,
    Concurrency,
}

impl Kind {
    /// All of them, in the contract's order (also the order of the scripts' dispatch tables).
    pub const ALL: [Kind; 6] = [
        Kind::FixedWindow,
        Kind::SlidingLog,
        Kind::SlidingWindow,
        Kind::TokenBucket,
        Kind::Gcra,
        Kind::Concurrency,
    ];

    /// The name in `algorithm = "..."`, in counter identities, and of the Lua functions
    /// (`NAME`, `NAME_refund`).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::FixedWindow => "fixed_window",
            Kind::SlidingLog => "sliding_log",
            Kind::SlidingWindow => "sliding_window",
            Kind::TokenBucket => "token_bucket",
            Kind::Gcra => "gcra",
            Kind::Concurrency => "concurrency",
        }
    }

    /// Whether the limit takes `burst` (the window algorithms admit `rate` per window).
    pub const fn takes_burst(self) -> bool {
        match self {
            Kind::TokenBucket | Kind::Gcra => true,
            Kind::FixedWindow | Kind::SlidingLog | Kind::SlidingWindow | Kind::Concurrency => false,
        }
    }

    /// Whether the limit takes `rate` (a concurrency limit takes `max` instead).
    pub const fn takes_rate(self) -> bool {
        !matches!(self, Kind::Concurrency)
    }

    /// Whether a limit can be settled to a cost the response reports (`cost_from`): the
    /// algorithms that count units in a number, which can also hold a debt.
    pub const fn takes_cost_from(self) -> bool {
        matches!(
            self,
            Kind::FixedWindow | Kind::SlidingWindow | Kind::TokenBucket | Kind::Gcra
        )
    }

    /// Whether the limit can hold a request for its slot (`delay`).
    pub const fn takes_delay(self) -> bool {
        matches!(self, Kind::TokenBucket | Kind::Gcra)
    }

    /// The algorithm's Lua file, which defines `NAME` and `NAME_refund` (see `lua/prelude.lua`).
    pub const fn lua(self) -> &'static str {
        match self {
            Kind::FixedWindow => include_str!("../../lua/fixed_window.lua"),
            Kind::SlidingLog => include_str!("../../lua/sliding_log.lua"),
            Kind::SlidingWindow => include_str!("../../lua/sliding_window.lua"),
            Kind::TokenBucket => include_str!("../../lua/token_bucket.lua"),
            Kind::Gcra => include_str!("../../lua/gcra.lua"),
            Kind::Concurrency => include_str!("../../lua/concurrency.lua"),
        }
    }

    /// The Lua function that writes an admitted state: `set_state` (one SET ... PX, in
    /// prelude.lua) for the algorithms whose state is a string, the sorted set's own otherwise.
    pub const fn lua_commit(self) -> &'static str {
        match self {
            Kind::SlidingLog => "sliding_log_commit",
            Kind::Concurrency => "concurrency_commit",
            Kind::FixedWindow | Kind::SlidingWindow | Kind::TokenBucket | Kind::Gcra => "set_state",
        }
    }

    /// The Lua function that charges units past a reservation (settle.lua): `NAME_charge`, or
    /// `no_charge` (prelude.lua) for the algorithms `cost_from` does not take.
    pub const fn lua_charge(self) -> &'static str {
        match self {
            Kind::FixedWindow => "fixed_window_charge",
            Kind::SlidingWindow => "sliding_window_charge",
            Kind::TokenBucket => "token_bucket_charge",
            Kind::Gcra => "gcra_charge",
            Kind::SlidingLog | Kind::Concurrency => "no_charge",
        }
    }

    /// The code the scripts dispatch on: the position in [`Kind::ALL`], from 1 as Lua counts.
    pub const fn code(self) -> u8 {
        self as u8 + 1
    }

    /// The algorithm called `name`, if any.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// `fixed_window, sliding_log, ...`: the names for messages that list what is allowed.
    pub fn names() -> String {
        Kind::ALL.map(Kind::name).join(", ")
    }
}

/// One algorithm with its parameters, in the units the arithmetic uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// At most `quota` units per aligned window of `window` µs.
    FixedWindow { quota: u64, window: Micros },
    /// The current window's count plus the previous window's, weighted by how much of it the
    /// sliding window still covers (rounded up), must stay within `quota`.
    SlidingWindow { quota: u64, window: Micros },
    /// Exact: at most `quota` units in any `window` µs, one timestamp per admitted unit.
    SlidingLog { quota: u64, window: Micros },
    /// A bucket of `burst` tokens refilled at `refill` units per µs, where one token is `unit`
    /// units (the rate N/P reduced by gcd(N, P): refill = N', unit = P'). Integers throughout.
    TokenBucket { burst: u64, refill: u64, unit: u64 },
    /// Generic cell rate: emission interval `interval` µs, `burst` back-to-back cells.
    Gcra { burst: u64, interval: Micros },
    /// At most `max` requests in flight; a slot not released within `lease` µs (a replica that
    /// died) frees itself.
    Concurrency { max: u64, lease: Micros },
}

/// What one limit keeps between requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Fixed window: window number and units counted in it.
    Window { index: u64, count: u64 },
    /// Sliding window: current window number, its count, and the previous window's count.
    TwoWindows {
        index: u64,
        current: u64,
        previous: u64,
    },
    /// Sliding log: the timestamp of every admitted unit, oldest first, strictly increasing.
    Log(VecDeque<Micros>),
    /// Token bucket: level in units at time `last`, with the parameters of the limit that wrote
    /// it (a token is `unit` units; `refill` units per µs; `burst` tokens at most). A reload
    /// may change N, and with it the unit: the state says which unit its level is counted in.
    Bucket {
        level: u64,
        last: Micros,
        burst: u64,
        refill: u64,
        unit: u64,
    },
    /// GCRA: the theoretical arrival time of the next cell, with the emission interval of the
    /// limit that wrote it (a reload that changes N changes the interval).
    Tat { tat: Micros, interval: Micros },
    /// Concurrency: the slots taken, by member (a unique number: the time it was taken,
    /// made unique per key as the sliding log's stamps are), each with the time it frees
    /// itself.
    Slots(BTreeMap<Micros, Micros>),
}

/// What a limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Units left after this request (if allowed) or now (if not).
    pub remaining: u64,
    /// µs until the limit's whole quota is available again.
    pub reset: Micros,
    /// µs until this request could be admitted, when rejected. When allowed: 0, or the µs
    /// the request is held before it is forwarded (a limit with `delay`).
    pub retry_after: Micros,
}

/// What an admission makes of a state, as [`Algorithm::check`] computed it: written by
/// [`Rolled::commit`] only when every limit of the request allowed (governor's
/// measure-and-replace, in two steps so that several limits can be all-or-nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a check changes nothing until its Rolled is committed"]
pub enum Rolled {
    /// The limit rejected: nothing to write.
    Nothing,
    /// The whole new state.
    State(State),
    /// Sliding log: forget the `expired` oldest stamps, then add `first .. first + cost` (the
    /// log is not copied to be checked). A denial carries the trim alone (`cost` 0).
    Log {
        expired: usize,
        first: Micros,
        cost: u64,
    },
    /// Concurrency: forget the slots that freed themselves by `now`, then take `member` until
    /// `until`.
    Slot {
        now: Micros,
        member: Micros,
        until: Micros,
    },
}

impl Rolled {
    /// What identifies the units an admission takes, for giving them back (the same number
    /// each Lua check returns as its receipt): the window of the window algorithms, the first
    /// stamp of the sliding log, the member of a concurrency slot, 0 for the others.
    pub fn receipt(&self) -> u64 {
        match self {
            Rolled::State(State::Window { index, .. } | State::TwoWindows { index, .. }) => *index,
            Rolled::Log { first, .. } => *first,
            Rolled::Slot { member, .. } => *member,
            Rolled::Nothing | Rolled::State(_) => 0,
        }
    }

    /// Applies an admitted request to the state it was checked against (or, for a key that
    /// was absent, expired or of another algorithm, to anything: the state is replaced).
    pub fn commit(self, state: &mut State) {
        match self {
            Rolled::Nothing => {}
            Rolled::State(new) => *state = new,
            Rolled::Log {
                expired,
                first,
                cost,
            } => {
                if !matches!(state, State::Log(_)) {
                    *state = State::Log(VecDeque::new());
                }
                if let State::Log(log) = state {
                    log.drain(..expired.min(log.len()));
                    log.extend(first..first + cost);
                }
            }
            Rolled::Slot { now, member, until } => {
                if !matches!(state, State::Slots(_)) {
                    *state = State::Slots(BTreeMap::new());
                }
                if let State::Slots(slots) = state {
                    slots.retain(|_, &mut t| t > now);
                    slots.insert(member, until);
                }
            }
        }
    }

    /// What a request that was not admitted still leaves in a live state: the sliding log
    /// forgets the stamps that left its window (as the script's ZREMRANGEBYSCORE does, which
    /// shows once a clock steps back); every other state stays as it was.
    pub fn tidy(self, state: &mut State) {
        match (self, state) {
            (Rolled::Log { expired, .. }, State::Log(log)) => {
                log.drain(..expired.min(log.len()));
            }
            (Rolled::Slot { now, .. }, State::Slots(slots)) => slots.retain(|_, &mut t| t > now),
            _ => {}
        }
    }
}

/// A token bucket's level at `base` = max(now, its time), in the units of the limit's
/// parameters `(burst, refill, unit)`. A state written under other parameters (a reload changed
/// N or burst) is first brought to `base` under the parameters that wrote it, as its TTL was
/// (the store cannot know when the reload happened); then its tokens carry over (rounded
/// down), at most the new burst. A bucket that was full is full (as an expired key would be).
fn bucket_at(
    (burst, refill, unit): (u64, u64, u64),
    (level, last, was_burst, was_refill, was_unit): (u64, Micros, u64, u64, u64),
    now: Micros,
) -> (u64, Micros) {
    let capacity = burst * unit;
    let base = now.max(last);
    let (level, last) = if (was_burst, was_refill, was_unit) != (burst, refill, unit) {
        let was_capacity = was_burst * was_unit;
        let then = refilled(level, base - last, was_capacity, was_refill);
        let level = if then >= was_capacity {
            capacity
        } else if was_unit == unit {
            then.min(capacity)
        } else {
            lua_mul_div_floor(then, unit, was_unit).min(capacity)
        };
        (level, base)
    } else {
        (level, last)
    };
    (refilled(level, base - last, capacity, refill), base)
}

/// A GCRA's TAT in the limit's `interval`. One written under another N moved at the old rate
/// until now; what it still holds is a number of cells used, which carries over (rounded up,
/// in doubles as Lua computes it), at most a whole burst (`tolerance`).
fn tat_at(tolerance: Micros, interval: Micros, tat: Micros, was: Micros, now: Micros) -> Micros {
    if was != interval && tat > now {
        let used = lua_mul_div_ceil(tat - now, interval, was);
        now + used.min(tolerance)
    } else {
        tat
    }
}

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// `ceil(a * b / c)` evaluated exactly as Lua does it: in IEEE doubles, left to right. Used where
/// the product may pass 2^53 (the sliding-window approximation, and carrying a GCRA's TAT over to
/// another interval); doing it the same way on both sides keeps the memory store and the scripts
/// in agreement to the bit.
fn lua_mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    (a as f64 * b as f64 / c as f64).ceil() as u64
}

/// `floor(a * b / c)`, in doubles, as Lua does it.
fn lua_mul_div_floor(a: u64, b: u64, c: u64) -> u64 {
    (a as f64 * b as f64 / c as f64).floor() as u64
}

/// A bucket's level `elapsed` µs after it was `level`, at most `capacity`. Compares before
/// multiplying so that a long idle time cannot overflow (or, in Lua, leave exact integers).
fn refilled(level: u64, elapsed: Micros, capacity: u64, refill: u64) -> u64 {
    if elapsed >= div_ceil(capacity.saturating_sub(level), refill) {
        capacity
    } else {
        level + elapsed * refill
    }
}

impl Algorithm {
    /// Which row of the table this algorithm is.
    pub const fn kind(&self) -> Kind {
        match self {
            Algorithm::FixedWindow { .. } => Kind::FixedWindow,
            Algorithm::SlidingLog { .. } => Kind::SlidingLog,
            Algorithm::SlidingWindow { .. } => Kind::SlidingWindow,
            Algorithm::TokenBucket { .. } => Kind::TokenBucket,
            Algorithm::Gcra { .. } => Kind::Gcra,
            Algorithm::Concurrency { .. } => Kind::Concurrency,
        }
    }

    /// The state of a key nobody has used, at `now`.
    pub fn fresh(&self, now: Micros) -> State {
        match *self {
            Algorithm::FixedWindow { window, .. } => State::Window {
                index: now / window,
                count: 0,
            },
            Algorithm::SlidingWindow { window, .. } => State::TwoWindows {
                index: now / window,
                current: 0,
                previous: 0,
            },
            Algorithm::SlidingLog { .. } => State::Log(VecDeque::new()),
            Algorithm::TokenBucket {
                burst,
                refill,
                unit,
            } => State::Bucket {
                level: burst * unit,
                last: now,
                burst,
                refill,
                unit,
            },
            Algorithm::Gcra { interval, .. } => State::Tat { tat: now, interval },
            Algorithm::Concurrency { .. } => State::Slots(BTreeMap::new()),
        }
    }

    /// Whether `state` is the kind of state this algorithm keeps (a reload may change the
    /// algorithm behind a key; a mismatched state is then treated as fresh).
    pub fn owns(&self, state: &State) -> bool {
        matches!(
            (self, state),
            (Algorithm::FixedWindow { .. }, State::Window { .. })
                | (Algorithm::SlidingWindow { .. }, State::TwoWindows { .. })
                | (Algorithm::SlidingLog { .. }, State::Log(_))
                | (Algorithm::TokenBucket { .. }, State::Bucket { .. })
                | (Algorithm::Gcra { .. }, State::Tat { .. })
                | (Algorithm::Concurrency { .. }, State::Slots(_))
        )
    }

    /// Says whether `cost` units fit in `state` at `now`, and what the state becomes if the
    /// request is admitted: the state rolled up to `now` (windows moved on, bucket refilled,
    /// expired log entries gone) with `cost` charged. Pure: `state` is only read. The store
    /// hands the [`Rolled`] to [`Rolled::commit`] when the whole request is admitted, else to
    /// [`Rolled::tidy`], which keeps the state as it was but for the sliding log's trim — as the
    /// Lua scripts write a state only on admission (what matters when a clock steps back).
    pub fn check(&self, state: &State, now: Micros, cost: u64) -> (Outcome, Rolled) {
        self.check_held(state, now, cost, 0)
    }

    /// [`Algorithm::check`] for a limit with `delay`: a token bucket or GCRA request that
    /// would be admitted within `delay` µs is admitted now, its slot taken ahead of time, with
    /// the wait in its outcome's `retry_after` (the pipeline holds it that long). The other
    /// algorithms ignore `delay`.
    pub fn check_held(
        &self,
        state: &State,
        now: Micros,
        cost: u64,
        delay: Micros,
    ) -> (Outcome, Rolled) {
        match (*self, state) {
            (Algorithm::FixedWindow { quota, window }, &State::Window { index, count }) => {
                // A clock that stepped back keeps counting in the newest window seen.
                let current = (now / window).max(index);
                let count = if current == index { count } else { 0 };
                let end = (current + 1) * window;
                let reset = end.saturating_sub(now);
                if count + cost <= quota {
                    let outcome = Outcome {
                        allowed: true,
                        remaining: quota - count - cost,
                        reset,
                        retry_after: 0,
                    };
                    let rolled = State::Window {
                        index: current,
                        count: count + cost,
                    };
                    (outcome, Rolled::State(rolled))
                } else {
                    let outcome = Outcome {
                        allowed: false,
                        remaining: quota.saturating_sub(count),
                        reset,
                        retry_after: reset,
                    };
                    (outcome, Rolled::Nothing)
                }
            }
            (
                Algorithm::SlidingWindow { quota, window },
                &State::TwoWindows {
                    index,
                    current,
                    previous,
                },
            ) => {
                let idx = (now / window).max(index);
                let (current, previous) = if idx == index {
                    (current, previous)
                } else if idx == index + 1 {
                    (0, current)
                } else {
                    (0, 0)
                };
                let start = idx * window;
                let elapsed = now.saturating_sub(start).min(window);
                let weighted = if previous > 0 {
                    lua_mul_div_ceil(previous, window - elapsed, window)
                } else {
                    0
                };
                let estimate = weighted + current;
                if estimate + cost <= quota {
                    let outcome = Outcome {
                        allowed: true,
                        remaining: quota - estimate - cost,
                        // After the commit the current window holds units: they weigh on the
                        // estimate until the end of the next window.
                        reset: (start + 2 * window).saturating_sub(now),
                        retry_after: 0,
                    };
                    let rolled = State::TwoWindows {
                        index: idx,
                        current: current + cost,
                        previous,
                    };
                    (outcome, Rolled::State(rolled))
                } else {
                    let reset = if current > 0 {
                        (start + 2 * window).saturating_sub(now)
                    } else if previous > 0 {
                        (start + window).saturating_sub(now)
                    } else {
                        0
                    };
                    // Units the weighted previous window may still hold for `cost` to fit now.
                    let retry_after = if quota >= cost + current && previous > 0 {
                        let room = quota - cost - current;
                        // Smallest elapsed e with ceil(previous * (window - e) / window) <= room.
                        let earliest = window - lua_mul_div_floor(room, window, previous);
                        earliest.saturating_sub(elapsed).max(1)
                    } else {
                        // Wait for the next window, where this window's count becomes the
                        // weighted previous one and the current count starts from zero.
                        let room = quota - cost;
                        let earliest = if current > 0 {
                            window - lua_mul_div_floor(room, window, current).min(window)
                        } else {
                            0
                        };
                        (window - elapsed) + earliest
                    };
                    let outcome = Outcome {
                        allowed: false,
                        remaining: quota.saturating_sub(estimate),
                        reset,
                        retry_after,
                    };
                    (outcome, Rolled::Nothing)
                }
            }
            (Algorithm::SlidingLog { quota, window }, State::Log(log)) => {
                let base = match log.back() {
                    Some(&newest) => now.max(newest),
                    None => now,
                };
                let cutoff = base.saturating_sub(window);
                // The oldest entries that left the window: dropped by the commit, counted out
                // here.
                let expired = log.iter().take_while(|&&t| t <= cutoff).count();
                let count = (log.len() - expired) as u64;
                if count + cost <= quota {
                    let first = match log.back() {
                        Some(&newest) if expired < log.len() => base.max(newest + 1),
                        _ => base,
                    };
                    let last = first + cost - 1;
                    let outcome = Outcome {
                        allowed: true,
                        remaining: quota - count - cost,
                        reset: last + window - now,
                        retry_after: 0,
                    };
                    (
                        outcome,
                        Rolled::Log {
                            expired,
                            first,
                            cost,
                        },
                    )
                } else {
                    // The unit that must expire before `cost` fits: the j-th oldest still in.
                    let j = (count + cost - quota) as usize;
                    let oldest_needed = log[expired + j - 1];
                    let newest = *log.back().expect("a denied log is not empty");
                    let outcome = Outcome {
                        allowed: false,
                        remaining: quota.saturating_sub(count),
                        reset: newest + window - now,
                        retry_after: oldest_needed + window - now,
                    };
                    let trim = Rolled::Log {
                        expired,
                        first: 0,
                        cost: 0,
                    };
                    (outcome, trim)
                }
            }
            (
                Algorithm::TokenBucket {
                    burst,
                    refill,
                    unit,
                },
                &State::Bucket {
                    level,
                    last,
                    burst: was_burst,
                    refill: was_refill,
                    unit: was_unit,
                },
            ) => {
                let capacity = burst * unit;
                let (level, base) = bucket_at(
                    (burst, refill, unit),
                    (level, last, was_burst, was_refill, was_unit),
                    now,
                );
                let need = cost * unit;
                // A state ahead of now (a debt, a held request, a clock that stepped back)
                // counts from its own time: every wait is measured from now.
                let ahead = base - now;
                if level >= need {
                    let after = level - need;
                    let outcome = Outcome {
                        allowed: true,
                        remaining: after / unit,
                        reset: ahead + div_ceil(capacity - after, refill),
                        retry_after: 0,
                    };
                    let rolled = State::Bucket {
                        level: after,
                        last: base,
                        burst,
                        refill,
                        unit,
                    };
                    return (outcome, Rolled::State(rolled));
                }
                let wait = div_ceil(need - level, refill);
                if ahead + wait <= delay {
                    // Held: at `base + wait` the bucket holds enough; the tokens are taken
                    // then, and the state's time moves there.
                    let after = level + wait * refill - need;
                    let outcome = Outcome {
                        allowed: true,
                        remaining: 0,
                        reset: ahead + wait + div_ceil(capacity - after, refill),
                        retry_after: ahead + wait,
                    };
                    let rolled = State::Bucket {
                        level: after,
                        last: base + wait,
                        burst,
                        refill,
                        unit,
                    };
                    return (outcome, Rolled::State(rolled));
                }
                let outcome = Outcome {
                    allowed: false,
                    remaining: level / unit,
                    reset: ahead + div_ceil(capacity - level, refill),
                    retry_after: ahead + wait,
                };
                (outcome, Rolled::Nothing)
            }
            (
                Algorithm::Gcra { burst, interval },
                &State::Tat {
                    tat,
                    interval: was_interval,
                },
            ) => {
                let tolerance = burst * interval;
                let tat = tat_at(tolerance, interval, tat, was_interval, now);
                let start = tat.max(now);
                let next = start + cost * interval;
                if next - now <= tolerance + delay {
                    // Within `delay` past the tolerance: held until the cells conform.
                    let held = (next - now).saturating_sub(tolerance);
                    let outcome = Outcome {
                        allowed: true,
                        remaining: tolerance.saturating_sub(next - now) / interval,
                        reset: next - now,
                        retry_after: held,
                    };
                    let rolled = State::Tat {
                        tat: next,
                        interval,
                    };
                    (outcome, Rolled::State(rolled))
                } else {
                    let outcome = Outcome {
                        allowed: false,
                        remaining: tolerance.saturating_sub(start - now) / interval,
                        reset: start - now,
                        retry_after: next - now - tolerance,
                    };
                    (outcome, Rolled::Nothing)
                }
            }
            (Algorithm::Concurrency { max, lease }, State::Slots(slots)) => {
                let live = |t: &Micros| *t > now;
                let taken = slots.values().filter(|t| live(t)).count() as u64;
                if taken < max {
                    // A member no live slot has: the first free microsecond from now.
                    let mut member = now;
                    while slots.get(&member).is_some_and(live) {
                        member += 1;
                    }
                    let outcome = Outcome {
                        allowed: true,
                        remaining: max - taken - 1,
                        reset: 0,
                        retry_after: 0,
                    };
                    let until = now + lease;
                    (outcome, Rolled::Slot { now, member, until })
                } else {
                    let outcome = Outcome {
                        allowed: false,
                        remaining: 0,
                        reset: 0,
                        retry_after: CONCURRENCY_RETRY,
                    };
                    let trim = Rolled::Slot {
                        now,
                        member: 0,
                        until: 0,
                    };
                    (outcome, trim)
                }
            }
            (alg, _) => {
                // A state of another algorithm (the limit changed algorithm on reload): decide
                // as on a fresh state (the commit replaces the foreign one).
                alg.check_held(&alg.fresh(now), now, cost, delay)
            }
        }
    }

    /// µs from `now` after which `state` is equivalent to a fresh one and may be forgotten; the
    /// stores add [`TTL_SLACK`].
    pub fn ttl(&self, state: &State, now: Micros) -> Micros {
        match (*self, state) {
            (Algorithm::FixedWindow { window, .. }, State::Window { index, .. }) => {
                ((index + 1) * window).saturating_sub(now)
            }
            (Algorithm::SlidingWindow { window, .. }, State::TwoWindows { index, .. }) => {
                ((index + 2) * window).saturating_sub(now)
            }
            (Algorithm::SlidingLog { window, .. }, State::Log(log)) => log
                .back()
                .map_or(0, |&newest| (newest + window).saturating_sub(now)),
            (
                Algorithm::TokenBucket {
                    burst,
                    refill,
                    unit,
                },
                State::Bucket { level, last, .. },
            ) => {
                let full_at = last + div_ceil((burst * unit).saturating_sub(*level), refill);
                full_at.saturating_sub(now)
            }
            (Algorithm::Gcra { .. }, State::Tat { tat, .. }) => tat.saturating_sub(now),
            (Algorithm::Concurrency { .. }, State::Slots(slots)) => slots
                .values()
                .max()
                .map_or(0, |&until| until.saturating_sub(now)),
            _ => 0,
        }
    }

    /// The number of units the limit grants in a full quota (`q` in RateLimit-Policy).
    pub fn quota(&self) -> u64 {
        match *self {
            Algorithm::FixedWindow { quota, .. }
            | Algorithm::SlidingWindow { quota, .. }
            | Algorithm::SlidingLog { quota, .. } => quota,
            Algorithm::TokenBucket { burst, .. } | Algorithm::Gcra { burst, .. } => burst,
            Algorithm::Concurrency { max, .. } => max,
        }
    }

    /// Gives back `units` of what an admission with `receipt` took (its [`Rolled::receipt`]),
    /// as each script's `NAME_refund` does: never more than the request took, nothing when
    /// the window it was counted in has passed. The state's expiry stays as it was.
    pub fn refund(&self, state: &mut State, receipt: u64, units: u64) {
        match state {
            State::Window { index, count } if *index == receipt => {
                *count = count.saturating_sub(units);
            }
            State::TwoWindows {
                index,
                current,
                previous,
            } => {
                if *index == receipt {
                    *current = current.saturating_sub(units);
                } else if *index == receipt + 1 {
                    *previous = previous.saturating_sub(units);
                }
            }
            State::Log(log) => log.retain(|t| !(receipt..receipt + units).contains(t)),
            State::Bucket {
                level, burst, unit, ..
            } => *level = (*level + units * *unit).min(*burst * *unit),
            State::Tat { tat, interval } => *tat = tat.saturating_sub(units * *interval),
            State::Slots(slots) => {
                slots.remove(&receipt);
            }
            State::Window { .. } => {}
        }
    }

    /// Charges `units` more than were reserved, at `now`, even past the quota: a debt that
    /// later requests wait out. Returns the state's new TTL in µs. The sliding log and the
    /// concurrency slots take no such charge (`cost_from` is refused for them).
    pub fn charge(&self, state: &mut State, now: Micros, units: u64) -> Micros {
        if !self.owns(state) {
            *state = self.fresh(now);
        }
        match (*self, &mut *state) {
            (Algorithm::FixedWindow { window, .. }, State::Window { index, count }) => {
                let current = (now / window).max(*index);
                if current != *index {
                    (*index, *count) = (current, 0);
                }
                *count += units;
            }
            (
                Algorithm::SlidingWindow { window, .. },
                State::TwoWindows {
                    index,
                    current,
                    previous,
                },
            ) => {
                let idx = (now / window).max(*index);
                if idx == *index + 1 {
                    (*previous, *current) = (*current, 0);
                } else if idx > *index + 1 {
                    (*previous, *current) = (0, 0);
                }
                *index = idx;
                *current += units;
            }
            (
                Algorithm::TokenBucket {
                    burst,
                    refill,
                    unit,
                },
                &mut State::Bucket {
                    level,
                    last,
                    burst: was_burst,
                    refill: was_refill,
                    unit: was_unit,
                },
            ) => {
                // In the limit's parameters, as a check converts them.
                let (have, base) = bucket_at(
                    (burst, refill, unit),
                    (level, last, was_burst, was_refill, was_unit),
                    now,
                );
                let need = units * unit;
                let (level, last) = if have >= need {
                    (have - need, base)
                } else {
                    // The debt: the state's time moves ahead by the µs the refill needs to
                    // pay it back (rounded up; what the rounding adds is kept as level).
                    let wait = div_ceil(need - have, refill);
                    (have + wait * refill - need, base + wait)
                };
                *state = State::Bucket {
                    level,
                    last,
                    burst,
                    refill,
                    unit,
                };
            }
            (Algorithm::Gcra { burst, interval }, &mut State::Tat { tat, interval: was }) => {
                let tat = tat_at(burst * interval, interval, tat, was, now);
                *state = State::Tat {
                    tat: tat.max(now) + units * interval,
                    interval,
                };
            }
            _ => {}
        }
        self.ttl(state, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Micros = 1_000_000;
    const T0: Micros = 1_700_000_000 * SEC;

    /// Runs one request through check + commit, as a store would.
    fn hit(alg: &Algorithm, state: &mut State, now: Micros, cost: u64) -> Outcome {
        let (outcome, rolled) = alg.check(state, now, cost);
        if outcome.allowed {
            rolled.commit(state);
        } else {
            rolled.tidy(state);
        }
        outcome
    }

    #[test]
    fn the_table_is_consistent() {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(kind.code()), i + 1, "{kind:?}");
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
            let lua = kind.lua();
            let name = kind.name();
            assert!(lua.contains(&format!("local function {name}(")), "{name}");
            assert!(
                lua.contains(&format!("local function {name}_refund(")),
                "{name}"
            );
            let charge = kind.lua_charge();
            assert!(
                charge == "no_charge" || lua.contains(&format!("local function {charge}(")),
                "{name}: {charge}"
            );
            assert_eq!(charge != "no_charge", kind.takes_cost_from(), "{name}");
            let commit = kind.lua_commit();
            assert!(
                commit == "set_state" || lua.contains(&format!("local function {commit}(")),
                "{name}: {commit}"
            );
        }
        assert_eq!(Kind::from_name("token-bucket"), None);
        assert_eq!(
            Kind::names(),
            "fixed_window, sliding_log, sliding_window, token_bucket, gcra, concurrency"
        );
    }

    fn admitted_back_to_back(alg: Algorithm, tries: u64) -> u64 {
        let mut state = alg.fresh(T0);
        (0..tries)
            .filter(|_| hit(&alg, &mut state, T0, 1).allowed)
            .count() as u64
    }

    #[test]
    fn each_algorithm_admits_exactly_its_quota_at_once() {
        let window = 60 * SEC;
        assert_eq!(
            admitted_back_to_back(Algorithm::FixedWindow { quota: 5, window }, 20),
            5
        );
        assert_eq!(
            admitted_back_to_back(Algorithm::SlidingWindow { quota: 5, window }, 20),
            5
        );
        assert_eq!(
            admitted_back_to_back(Algorithm::SlidingLog { quota: 5, window }, 20),
            5
        );
        // 10/s, burst 7: one token per 100 ms.
        let bucket = Algorithm::TokenBucket {
            burst: 7,
            refill: 1,
            unit: 100_000,
        };
        assert_eq!(admitted_back_to_back(bucket, 20), 7);
        // 3/s burst 4: interval 333_333 µs (rounded down).
        assert_eq!(
            admitted_back_to_back(
                Algorithm::Gcra {
                    burst: 4,
                    interval: 333_333
                },
                20
            ),
            4
        );
    }

    #[test]
    fn fixed_window_resets_at_the_boundary() {
        let alg = Algorithm::FixedWindow {
            quota: 2,
            window: 10 * SEC,
        };
        let start = T0 - T0 % (10 * SEC);
        let mut s = alg.fresh(start);
        assert!(hit(&alg, &mut s, start + 1, 1).allowed);
        assert!(hit(&alg, &mut s, start + 2, 1).allowed);
        let denied = hit(&alg, &mut s, start + 3 * SEC, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, 7 * SEC);
        assert_eq!(denied.remaining, 0);
        let next = hit(&alg, &mut s, start + 10 * SEC, 1);
        assert!(next.allowed);
        assert_eq!(next.remaining, 1);
    }

    #[test]
    fn sliding_log_frees_units_one_by_one() {
        let alg = Algorithm::SlidingLog {
            quota: 3,
            window: 10 * SEC,
        };
        let mut s = alg.fresh(T0);
        for i in 0..3 {
            assert!(hit(&alg, &mut s, T0 + i * SEC, 1).allowed);
        }
        let denied = hit(&alg, &mut s, T0 + 5 * SEC, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, 5 * SEC);
        assert_eq!(denied.reset, 7 * SEC);
        // Exactly when the oldest unit leaves the window, one more fits.
        assert!(!hit(&alg, &mut s, T0 + 10 * SEC - 1, 1).allowed);
        assert!(hit(&alg, &mut s, T0 + 10 * SEC, 1).allowed);
        // A cost of 2 needs two old units gone.
        let denied = hit(&alg, &mut s, T0 + 10 * SEC, 2);
        assert_eq!(denied.retry_after, 2 * SEC);
    }

    #[test]
    fn sliding_log_same_microsecond_entries_stay_distinct() {
        let alg = Algorithm::SlidingLog {
            quota: 10,
            window: SEC,
        };
        let mut s = alg.fresh(T0);
        for _ in 0..4 {
            assert!(hit(&alg, &mut s, T0, 2).allowed);
        }
        let State::Log(log) = &s else { unreachable!() };
        let v: Vec<_> = log.iter().copied().collect();
        assert_eq!(v, (T0..T0 + 8).collect::<Vec<_>>());
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let alg = Algorithm::SlidingWindow {
            quota: 10,
            window: 10 * SEC,
        };
        let start = T0 - T0 % (10 * SEC);
        let mut s = alg.fresh(start);
        for _ in 0..10 {
            assert!(hit(&alg, &mut s, start, 1).allowed);
        }
        assert!(!hit(&alg, &mut s, start + 9 * SEC, 1).allowed);
        // 30% into the next window, the previous 10 weigh ceil(7) = 7: three fit.
        let t = start + 13 * SEC;
        let first = hit(&alg, &mut s, t, 1);
        assert!(first.allowed);
        assert_eq!(first.remaining, 2);
        assert!(hit(&alg, &mut s, t, 1).allowed);
        assert!(hit(&alg, &mut s, t, 1).allowed);
        let denied = hit(&alg, &mut s, t, 1);
        assert!(!denied.allowed);
        // ceil(10 * (10 - e) / 10) <= 10 - 1 - 3 = 6 from e = 4 s: 1 s from now.
        assert_eq!(denied.retry_after, SEC);
        assert!(hit(&alg, &mut s, t + SEC, 1).allowed);
    }

    #[test]
    fn sliding_window_never_passes_quota_inside_one_window() {
        let alg = Algorithm::SlidingWindow {
            quota: 7,
            window: SEC,
        };
        let mut s = alg.fresh(T0);
        let mut per_window = std::collections::HashMap::<u64, u64>::new();
        let mut t = T0;
        for i in 0..5_000u64 {
            t += (i * 7919) % 50_000;
            if hit(&alg, &mut s, t, 1 + i % 3).allowed {
                *per_window.entry(t / SEC).or_default() += 1 + i % 3;
            }
        }
        assert!(per_window.values().all(|&n| n <= 7), "{per_window:?}");
    }

    #[test]
    fn token_bucket_refills_at_its_rate() {
        // 2 per second, burst 4: token = 1 unit... reduced: N'=1, P'=500_000.
        let alg = Algorithm::TokenBucket {
            burst: 4,
            refill: 1,
            unit: 500_000,
        };
        let mut s = alg.fresh(T0);
        for _ in 0..4 {
            assert!(hit(&alg, &mut s, T0, 1).allowed);
        }
        let denied = hit(&alg, &mut s, T0, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, 500_000);
        assert_eq!(denied.reset, 2 * SEC);
        assert!(!hit(&alg, &mut s, T0 + 499_999, 1).allowed);
        let ok = hit(&alg, &mut s, T0 + 500_000, 1);
        assert!(ok.allowed);
        assert_eq!(ok.remaining, 0);
        // After a long idle the bucket is full again, not overfull.
        let later = hit(&alg, &mut s, T0 + 3_600 * SEC, 1);
        assert_eq!(later.remaining, 3);
    }

    #[test]
    fn gcra_spaces_requests_by_its_interval() {
        let alg = Algorithm::Gcra {
            burst: 2,
            interval: SEC,
        };
        let mut s = alg.fresh(T0);
        assert_eq!(hit(&alg, &mut s, T0, 1).remaining, 1);
        assert_eq!(hit(&alg, &mut s, T0, 1).remaining, 0);
        let denied = hit(&alg, &mut s, T0, 1);
        assert_eq!(denied.retry_after, SEC);
        assert_eq!(denied.reset, 2 * SEC);
        assert!(hit(&alg, &mut s, T0 + SEC, 1).allowed);
        assert!(!hit(&alg, &mut s, T0 + SEC, 1).allowed);
    }

    #[test]
    fn a_denied_request_changes_nothing_observable() {
        let algs = [
            Algorithm::FixedWindow {
                quota: 3,
                window: SEC,
            },
            Algorithm::SlidingWindow {
                quota: 3,
                window: SEC,
            },
            Algorithm::SlidingLog {
                quota: 3,
                window: SEC,
            },
            Algorithm::TokenBucket {
                burst: 3,
                refill: 3,
                unit: 1_000_000,
            },
            Algorithm::Gcra {
                burst: 3,
                interval: 333_333,
            },
        ];
        for alg in algs {
            let mut s = alg.fresh(T0);
            for _ in 0..3 {
                hit(&alg, &mut s, T0, 1);
            }
            let before = alg.check(&s, T0 + 10, 1).0;
            for _ in 0..5 {
                assert!(!hit(&alg, &mut s, T0 + 10, 1).allowed, "{alg:?}");
            }
            assert_eq!(alg.check(&s, T0 + 10, 1).0, before, "{alg:?}");
        }
    }

    #[test]
    fn ttl_covers_the_state() {
        let alg = Algorithm::TokenBucket {
            burst: 10,
            refill: 1,
            unit: 100_000,
        };
        let mut s = alg.fresh(T0);
        hit(&alg, &mut s, T0, 3);
        assert_eq!(alg.ttl(&s, T0), 300_000);
        let alg = Algorithm::Gcra {
            burst: 5,
            interval: 1_000,
        };
        let mut s = alg.fresh(T0);
        hit(&alg, &mut s, T0, 2);
        assert_eq!(alg.ttl(&s, T0), 2_000);
    }

    /// `rate = "7/s", burst = 50` and `"10/s"`, as policy validation builds them: a token is
    /// 1_000_000 units at 7/s (gcd 1) but 100_000 units at 10/s (gcd 10).
    const SEVEN_PER_S: Algorithm = Algorithm::TokenBucket {
        burst: 50,
        refill: 7,
        unit: 1_000_000,
    };
    const TEN_PER_S: Algorithm = Algorithm::TokenBucket {
        burst: 50,
        refill: 1,
        unit: 100_000,
    };

    /// A bucket with 21 tokens left under `from`, then requests of one token under `to` (a
    /// reload changed N) at `T0` and one second later: the tokens left each time. (GCRA too.)
    fn remaining_across_a_reload(from: Algorithm, to: Algorithm) -> (u64, u64) {
        let mut s = from.fresh(T0);
        assert_eq!(hit(&from, &mut s, T0, 29).remaining, 21);
        let mut later = s.clone();
        let at_once = hit(&to, &mut s, T0, 1);
        let after_a_second = hit(&to, &mut later, T0 + SEC, 1);
        assert!(at_once.allowed && after_a_second.allowed);
        (at_once.remaining, after_a_second.remaining)
    }

    #[test]
    fn token_bucket_keeps_its_tokens_when_a_reload_changes_n() {
        // The 21 tokens are kept; the second since the state was written refills at the rate
        // that wrote it (the store cannot know when the reload happened): 21 + 7 - 1.
        assert_eq!(remaining_across_a_reload(SEVEN_PER_S, TEN_PER_S), (20, 27));
        // 21 + 10 - 1.
        assert_eq!(remaining_across_a_reload(TEN_PER_S, SEVEN_PER_S), (20, 30));
    }

    #[test]
    fn gcra_keeps_what_a_client_used_when_a_reload_changes_n() {
        // 7/s and 10/s with burst 50: intervals 142_857 µs and 100_000 µs.
        let seven = Algorithm::Gcra {
            burst: 50,
            interval: 142_857,
        };
        let ten = Algorithm::Gcra {
            burst: 50,
            interval: 100_000,
        };
        // 29 cells used, 21 left, as for the token bucket: 20 after one more, and a second
        // later (the TAT moves at the old rate until the new config reads it) 21 + 7 - 1 and
        // 21 + 10 - 1.
        assert_eq!(remaining_across_a_reload(seven, ten), (20, 27));
        assert_eq!(remaining_across_a_reload(ten, seven), (20, 30));
        // Drained at 10/s, then 1/s: still drained (the TAT alone said 45 cells were free).
        let one = Algorithm::Gcra {
            burst: 50,
            interval: SEC,
        };
        let mut s = ten.fresh(T0);
        assert_eq!(hit(&ten, &mut s, T0, 50).remaining, 0);
        let denied = hit(&one, &mut s, T0, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, SEC);
    }

    #[test]
    fn clock_stepping_back_does_not_reopen_a_window() {
        let alg = Algorithm::FixedWindow {
            quota: 1,
            window: SEC,
        };
        let mut s = alg.fresh(T0 + SEC);
        assert!(hit(&alg, &mut s, T0 + SEC, 1).allowed);
        assert!(!hit(&alg, &mut s, T0, 1).allowed);
    }
}
