//! The Redis store: one EVALSHA of the decision script (lua/) per request, on a single server
//! (a bb8 pool of multiplexed redis-rs connections) or on a Redis Cluster (redis-rs's async
//! cluster connection).
//!
//! Single server: connections are multiplexed, so a checkout only picks a connection: the handle
//! is cloned and the pool slot returned at once, and any number of decisions pipeline over few
//! sockets. A connection that fails with an I/O error is flagged and bb8 replaces it on the next
//! checkout (bb8-redis's own manager never reports a broken connection and opens connections
//! without tollgate's timeouts, hence the small manager here).
//!
//! Cluster: no pool. redis-rs's `ClusterConnection` already multiplexes one connection per node,
//! follows MOVED/ASK, refreshes the slot map and reconnects; a pool of them would only multiply
//! topology refreshes. Its retries and timeouts are set to fit one decision's budget (its
//! defaults: 16 retries, no overall limit). A request whose limits are keyed by different
//! identities has keys in different slots: each slot gets its own call (concurrently), and when
//! any slot rejects, what the others committed is given back by the refund script.
//!
//! Either way a script cache that lost the script (restart, `SCRIPT FLUSH`, failover to a
//! replica that never loaded it) answers NOSCRIPT: redis-rs's `Script` loads it (on every
//! primary, for a cluster) and retries once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::join_all;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionInfo, IntoConnectionInfo, RedisError,
    Script, TlsCertificates,
};

use super::algorithm::{Algorithm, Kind, Micros, Outcome};
use super::{Decision, Item, Settle, StoreError};
use crate::identity::Tag;
use crate::policy::{RedisNodes, RedisSettings};

/// `prelude.lua`, every algorithm's file in table order, then the dispatch tables decide.lua
/// and refund.lua index by algorithm code (built from [`Kind::ALL`], so the order of the
/// files, the codes and the tables cannot disagree), then `tail`.
fn with_algorithms(tail: &str) -> String {
    let mut script = String::from(PRELUDE);
    for kind in Kind::ALL {
        script.push_str(kind.lua());
    }
    let table = |suffix: &str, name: fn(Kind) -> &'static str| {
        let entries: Vec<String> = Kind::ALL
            .into_iter()
            .map(|k| format!("{}{suffix}", name(k)))
            .collect();
        entries.join(", ")
    };
    script.push_str(&format!(
        "-- Indexed by algorithm code (tollgate's Kind::ALL order).\n\
         local checks = {{ {} }}\nlocal commits = {{ {} }}\nlocal refunds = {{ {} }}\n\
         local charges = {{ {} }}\n",
        table("", Kind::name),
        table("", Kind::lua_commit),
        table("_refund", Kind::name),
        table("", Kind::lua_charge),
    ));
    script.push_str(tail);
    script
}

const PRELUDE: &str = include_str!("../../lua/prelude.lua");

/// The decision script: prelude, the five algorithms, the dispatch tables, then `decide.lua`.
/// Each file states its own contract; `decide.lua` states the whole script's KEYS, ARGV and
/// reply.
pub static SCRIPT: LazyLock<String> =
    LazyLock::new(|| with_algorithms(include_str!("../../lua/decide.lua")));

/// The refund script (cluster only): gives back what a decision committed in one slot when
/// another slot rejected the request.
pub static REFUND_SCRIPT: LazyLock<String> =
    LazyLock::new(|| with_algorithms(include_str!("../../lua/refund.lua")));

/// The settlement script: after the response, one call gives back what a request did not use
/// or charges what it used beyond its reservation (`count`, `cost_from`, concurrency slots).
pub static SETTLE_SCRIPT: LazyLock<String> =
    LazyLock::new(|| with_algorithms(include_str!("../../lua/settle.lua")));

/// One script per algorithm for routes with a single limit (the common case), indexed by
/// position in [`Kind::ALL`]: the same KEYS, ARGV and reply as [`SCRIPT`], a quarter less Lua
/// work per call (measured with `INFO commandstats`: 6.5 us instead of 8.8 us for a token
/// bucket). Each is the prelude, one algorithm's file, a line binding its check and commit,
/// and `single.lua`.
pub static SINGLE_SCRIPTS: LazyLock<[String; Kind::ALL.len()]> = LazyLock::new(|| {
    Kind::ALL.map(|kind| {
        format!(
            "{PRELUDE}{}local check, commit = {}, {}\n{}",
            kind.lua(),
            kind.name(),
            kind.lua_commit(),
            include_str!("../../lua/single.lua")
        )
    })
});

/// The algorithm code and p1..p3 that the scripts expect for one limit.
pub fn script_args(algorithm: &Algorithm) -> (u8, u64, u64, u64) {
    let code = algorithm.kind().code();
    match *algorithm {
        Algorithm::FixedWindow { quota, window }
        | Algorithm::SlidingWindow { quota, window }
        | Algorithm::SlidingLog { quota, window } => (code, quota, window, 0),
        Algorithm::TokenBucket {
            burst,
            refill,
            unit,
        } => (code, burst, refill, unit),
        Algorithm::Gcra { burst, interval } => (code, burst, interval, 0),
        Algorithm::Concurrency { max, lease } => (code, max, lease, 0),
    }
}

/// The ARGV slots every script starts a limit with: algorithm code, p1, p2, p3, cost.
fn push_params(invocation: &mut redis::ScriptInvocation<'_>, item: &Item) {
    let (code, p1, p2, p3) = script_args(&item.algorithm);
    invocation.arg(code).arg(p1).arg(p2).arg(p3).arg(item.cost);
}

/// One limit's ARGV slots for decide.lua (and single.lua): the params, shadow flag, ban µs,
/// delay µs.
fn push_limit(invocation: &mut redis::ScriptInvocation<'_>, item: &Item) {
    push_params(invocation, item);
    invocation
        .arg(u8::from(item.shadow))
        .arg(item.ban)
        .arg(item.delay);
}

/// One limit's ARGV slots for refund.lua (and, followed by the cost to settle to, for
/// settle.lua): the params and the receipt.
fn push_refund(invocation: &mut redis::ScriptInvocation<'_>, item: &Item, receipt: u64) {
    push_params(invocation, item);
    invocation.arg(receipt);
}

/// The key of a limit's ban (prelude.lua's `banned`): its state key + `:ban`, in the same slot.
fn ban_key(state_key: &str) -> String {
    format!("{state_key}:ban")
}

/// `{prefix}:{identity}:{limit}`: the prefix first (so `SCAN MATCH prefix:*` finds every key),
/// the hashed identity as the cluster hash tag (limits keyed by the same identity share a slot),
/// then the limit's id. 22 + 11 characters of base64url after the prefix.
pub fn key_name(prefix: &str, id: u64, tag: &Tag) -> String {
    let mut key = String::with_capacity(prefix.len() + 40);
    key.push_str(prefix);
    key.push_str(":{");
    URL_SAFE_NO_PAD.encode_string(tag, &mut key);
    key.push_str("}:");
    URL_SAFE_NO_PAD.encode_string(id.to_le_bytes(), &mut key);
    key
}

/// Cluster slots are grouped into this many buckets for the circuit breakers.
const SLOT_BUCKETS: usize = 64;

/// CRC16/XMODEM, the checksum Redis Cluster maps keys to slots with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of every key of an identity (its hash tag is the base64 of the tag).
pub fn slot_of(tag: &Tag) -> u16 {
    let mut encoded = [0u8; 22];
    let n = URL_SAFE_NO_PAD
        .encode_slice(tag, &mut encoded)
        .expect("16 bytes fit 22 base64 characters");
    crc16(&encoded[..n]) % 16384
}

/// A multiplexed connection and whether it has failed.
pub struct Conn {
    inner: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

/// Opens connections with tollgate's timeouts and reports broken ones to bb8.
pub struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = RedisError;

    async fn connect(&self) -> Result<Conn, RedisError> {
        let inner = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(Conn {
            inner,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    /// No PING: a flag set by a failed call is enough, and costs nothing per checkout.
    async fn is_valid(&self, conn: &mut Conn) -> Result<(), RedisError> {
        if conn.broken.load(Ordering::Relaxed) {
            Err(RedisError::from((
                redis::ErrorKind::Io,
                "connection failed earlier",
            )))
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

/// bb8 retries failed connects until a checkout times out, which then reports only the
/// timeout: the cause (refused, wrong password, TLS) is logged here instead, at most once a
/// second.
#[derive(Debug, Clone, Copy)]
struct LogConnectErrors;

impl bb8::ErrorSink<RedisError> for LogConnectErrors {
    fn sink(&self, error: RedisError) {
        crate::logging::store_connect_error(&error);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<RedisError>> {
        Box::new(*self)
    }
}

enum Backend {
    Single(bb8::Pool<Manager>),
    Cluster(ClusterConnection),
}

/// The Redis backend.
pub struct RedisStore {
    /// Circuit breakers, shared with every policy that keeps this store across reloads: one
    /// for a single server; for a cluster one per 1/64 of the slots, so a dead primary opens
    /// only the breakers of its own slots and the other primaries keep deciding.
    pub breakers: Vec<super::breaker::Breaker>,
    backend: Backend,
    decide: Script,
    single: Vec<Script>,
    refund: Script,
    settle: Script,
    prefix: String,
}

/// Errors after which a connection is not reused.
fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// Reads the TLS files of `settings`, if any.
pub fn tls_certificates(settings: &RedisSettings) -> Result<Option<TlsCertificates>, StoreError> {
    if settings.tls_ca.is_none() && settings.tls_client.is_none() {
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| StoreError::Config(format!("cannot read {}: {e}", path.display())))
    };
    let root_cert = settings.tls_ca.as_deref().map(read).transpose()?;
    let client_tls = match &settings.tls_client {
        Some((cert, key)) => Some(ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        None => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A node's connection info with the separately given credentials applied.
fn connection_info(url: &str, settings: &RedisSettings) -> Result<ConnectionInfo, StoreError> {
    let info = url.into_connection_info()?;
    let mut redis = info.redis_settings().clone();
    if let Some(user) = &settings.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &settings.password {
        redis = redis.set_password(&password.0);
    }
    Ok(info.set_redis_settings(redis))
}

impl RedisStore {
    /// The breaker guarding a decision about `tag`'s keys.
    pub fn breaker_for(&self, tag: &Tag) -> &super::breaker::Breaker {
        if self.breakers.len() == 1 {
            return &self.breakers[0];
        }
        &self.breakers[usize::from(slot_of(tag)) * self.breakers.len() / 16384]
    }

    /// Builds the store. Never connects: connections are made on first use (bb8) or in the
    /// background (cluster), so tollgate starts while Redis is down.
    pub fn new(settings: &RedisSettings) -> Result<RedisStore, StoreError> {
        let timeout = settings.timeout;
        let certs = tls_certificates(settings)?;
        let backend = match &settings.nodes {
            RedisNodes::Single(url) => {
                let info = connection_info(&url.0, settings)?;
                let client = match certs {
                    Some(certs) => Client::build_with_tls(info, certs)?,
                    None => Client::open(info)?,
                };
                let config = AsyncConnectionConfig::new()
                    // Connecting happens in the background; a slow handshake may take longer
                    // than one decision's budget without failing the decision that waits.
                    .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
                    // The caller's own timeout bounds each call; this reclaims a stuck slot.
                    .set_response_timeout(Some(timeout.max(Duration::from_secs(1))));
                let pool = bb8::Pool::builder()
                    .error_sink(Box::new(LogConnectErrors))
                    .max_size(settings.pool_size)
                    // bb8 waits 30 s for a connection by default: far beyond a decision's budget.
                    .connection_timeout(timeout)
                    .test_on_check_out(true)
                    .build_unchecked(Manager { client, config });
                Backend::Single(pool)
            }
            RedisNodes::Cluster(urls) => {
                let nodes = urls
                    .iter()
                    .map(|u| connection_info(&u.0, settings))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut builder = ClusterClientBuilder::new(nodes)
                    // One retry (a MOVED/ASK redirect or a reconnect) fits a decision's budget;
                    // the caller's timeout bounds the whole call anyway.
                    .retries(1)
                    .min_retry_wait(1)
                    .max_retry_wait(timeout.as_millis().max(2) as u64)
                    .connection_timeout(timeout.max(Duration::from_secs(1)))
                    .response_timeout(timeout.max(Duration::from_millis(250)));
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                let client = builder.build()?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(timeout.max(Duration::from_secs(1)))
                    .set_response_timeout(timeout.max(Duration::from_millis(250)));
                Backend::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        let breakers = match backend {
            Backend::Single(_) => 1,
            Backend::Cluster(_) => SLOT_BUCKETS,
        };
        Ok(RedisStore {
            breakers: (0..breakers).map(|_| Default::default()).collect(),
            backend,
            decide: Script::new(&SCRIPT),
            single: SINGLE_SCRIPTS.iter().map(|s| Script::new(s)).collect(),
            refund: Script::new(&REFUND_SCRIPT),
            settle: Script::new(&SETTLE_SCRIPT),
            prefix: settings.prefix.clone(),
        })
    }

    async fn connection(&self) -> Result<(MultiplexedConnection, Arc<AtomicBool>), StoreError> {
        let Backend::Single(pool) = &self.backend else {
            unreachable!("single-server backend");
        };
        let pooled = pool.get().await.map_err(|e| match e {
            bb8::RunError::User(e) => StoreError::Redis(e),
            bb8::RunError::TimedOut => StoreError::Pool("no connection available in time".into()),
        })?;
        Ok((pooled.inner.clone(), pooled.broken.clone()))
    }

    /// Decides all items, all-or-nothing. With `peek` nothing is written.
    pub async fn decide(
        &self,
        items: &[Item],
        now: Option<Micros>,
        peek: bool,
    ) -> Result<Decision, StoreError> {
        match &self.backend {
            Backend::Single(_) => {
                let (mut conn, broken) = self.connection().await?;
                let result = self.call(&mut conn, items, now, peek).await;
                if let Err(StoreError::Redis(e)) = &result
                    && breaks_connection(e)
                {
                    broken.store(true, Ordering::Relaxed);
                }
                result
            }
            Backend::Cluster(conn) => self.decide_cluster(conn, items, now, peek).await,
        }
    }

    /// One decide.lua call: the decision and each item's receipt.
    async fn call<C: ConnectionLike>(
        &self,
        conn: &mut C,
        items: &[Item],
        now: Option<Micros>,
        peek: bool,
    ) -> Result<Decision, StoreError> {
        let script = match items {
            [one] => &self.single[usize::from(one.algorithm.kind().code()) - 1],
            _ => &self.decide,
        };
        let mut invocation = script.prepare_invoke();
        for item in items {
            invocation.key(key_name(&self.prefix, item.id, &item.tag));
        }
        match now {
            Some(t) => invocation.arg(t),
            None => invocation.arg(""),
        };
        invocation.arg(if peek { "1" } else { "0" });
        for item in items {
            push_limit(&mut invocation, item);
        }
        let reply: Vec<i64> = invocation.invoke_async(conn).await?;
        parse_reply(items, &reply)
    }

    /// Cluster: one call per slot group, concurrently; refunds when a group rejected.
    async fn decide_cluster(
        &self,
        conn: &ClusterConnection,
        items: &[Item],
        now: Option<Micros>,
        peek: bool,
    ) -> Result<Decision, StoreError> {
        let mut groups: Vec<(Tag, Vec<usize>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match groups.iter_mut().find(|(tag, _)| *tag == item.tag) {
                Some((_, members)) => members.push(i),
                None => groups.push((item.tag, vec![i])),
            }
        }
        if groups.len() == 1 {
            let mut conn = conn.clone();
            return self.call(&mut conn, items, now, peek).await;
        }
        let calls = groups.iter().map(|(_, members)| {
            let group: Vec<Item> = members.iter().map(|&i| items[i]).collect();
            let mut conn = conn.clone();
            async move {
                self.call(&mut conn, &group, now, peek)
                    .await
                    .map(|r| (group, r))
            }
        });
        let answers = join_all(calls).await;
        let mut outcomes = vec![None; items.len()];
        let mut receipts = vec![0; items.len()];
        let mut committed: Vec<(Vec<Item>, Vec<u64>)> = Vec::new();
        let mut first_error = None;
        for ((_, members), answer) in groups.iter().zip(answers) {
            match answer {
                Ok((group, decision)) => {
                    for (k, &i) in members.iter().enumerate() {
                        outcomes[i] = Some(decision.outcomes[k]);
                        receipts[i] = decision.receipts[k];
                    }
                    if decision.admitted && !peek {
                        let kept: Vec<(Item, u64)> = group
                            .iter()
                            .zip(&decision.outcomes)
                            .zip(&decision.receipts)
                            .filter(|((_, o), _)| o.allowed)
                            .map(|((item, _), r)| (*item, *r))
                            .collect();
                        committed.push(kept.into_iter().unzip());
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let decision = match (first_error, outcomes.iter().all(Option::is_some)) {
            (None, true) => {
                let mut d =
                    Decision::from_outcomes(items, outcomes.into_iter().flatten().collect());
                d.receipts = receipts;
                d
            }
            (error, _) => {
                // Nothing may stay charged for a request that was not decided.
                self.refund_all(conn, committed).await;
                return Err(error.unwrap_or_else(|| StoreError::Reply("missing outcome".into())));
            }
        };
        if !decision.admitted {
            self.refund_all(conn, committed).await;
        }
        Ok(decision)
    }

    async fn refund_all(&self, conn: &ClusterConnection, committed: Vec<(Vec<Item>, Vec<u64>)>) {
        let calls = committed
            .into_iter()
            .filter(|(items, _)| !items.is_empty())
            .map(|(items, receipts)| {
                let mut conn = conn.clone();
                async move {
                    let mut invocation = self.refund.prepare_invoke();
                    for item in &items {
                        invocation.key(key_name(&self.prefix, item.id, &item.tag));
                    }
                    for (item, receipt) in items.iter().zip(&receipts) {
                        push_refund(&mut invocation, item, *receipt);
                    }
                    let result: Result<i64, RedisError> = invocation.invoke_async(&mut conn).await;
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "refund of a rejected cross-slot request failed");
                    }
                }
            });
        join_all(calls).await;
    }

    /// Settles admitted items after their response (settle.lua): each [`Settle`] names the
    /// item, its receipt, what was reserved and what the response cost. One call per cluster
    /// slot (one in all on a single server).
    pub async fn settle(&self, settles: &[Settle], now: Option<Micros>) -> Result<(), StoreError> {
        let mut groups: Vec<(Tag, Vec<&Settle>)> = Vec::new();
        for s in settles.iter().filter(|s| s.cost != s.item.cost) {
            match groups.iter_mut().find(|(tag, _)| *tag == s.item.tag) {
                Some((_, members)) => members.push(s),
                None => groups.push((s.item.tag, vec![s])),
            }
        }
        for (_, group) in groups {
            let mut invocation = self.settle.prepare_invoke();
            for s in &group {
                invocation.key(key_name(&self.prefix, s.item.id, &s.item.tag));
            }
            match now {
                Some(t) => invocation.arg(t),
                None => invocation.arg(""),
            };
            for s in &group {
                push_refund(&mut invocation, &s.item, s.receipt);
                invocation.arg(s.cost);
            }
            let result: Result<i64, RedisError> = match &self.backend {
                Backend::Single(_) => {
                    let (mut conn, broken) = self.connection().await?;
                    let r = invocation.invoke_async(&mut conn).await;
                    if let Err(e) = &r
                        && breaks_connection(e)
                    {
                        broken.store(true, Ordering::Relaxed);
                    }
                    r
                }
                Backend::Cluster(conn) => invocation.invoke_async(&mut conn.clone()).await,
            };
            result?;
        }
        Ok(())
    }

    /// Deletes the state of every item (an operator's reset): one `DEL` per cluster slot (the
    /// keys of one identity share a slot), one in all on a single server. Returns how many
    /// keys existed.
    pub async fn reset(&self, items: &[Item]) -> Result<usize, StoreError> {
        let mut groups: Vec<(Tag, Vec<String>)> = Vec::new();
        for item in items {
            let key = key_name(&self.prefix, item.id, &item.tag);
            let ban = ban_key(&key);
            match groups.iter_mut().find(|(tag, _)| *tag == item.tag) {
                Some((_, keys)) => keys.extend([key, ban]),
                None => groups.push((item.tag, vec![key, ban])),
            }
        }
        let mut deleted = 0;
        match &self.backend {
            Backend::Single(_) => {
                let keys: Vec<String> = groups.into_iter().flat_map(|(_, k)| k).collect();
                if keys.is_empty() {
                    return Ok(0);
                }
                let (mut conn, broken) = self.connection().await?;
                let r: Result<usize, RedisError> =
                    redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                if let Err(e) = &r
                    && breaks_connection(e)
                {
                    broken.store(true, Ordering::Relaxed);
                }
                deleted += r?;
            }
            Backend::Cluster(conn) => {
                for (_, keys) in groups {
                    let n: usize = redis::cmd("DEL")
                        .arg(&keys)
                        .query_async(&mut conn.clone())
                        .await?;
                    deleted += n;
                }
            }
        }
        Ok(deleted)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let result: Result<String, RedisError> = match &self.backend {
            Backend::Single(_) => {
                let (mut conn, broken) = self.connection().await?;
                let r = redis::cmd("PING").query_async(&mut conn).await;
                if let Err(e) = &r
                    && breaks_connection(e)
                {
                    broken.store(true, Ordering::Relaxed);
                }
                r
            }
            Backend::Cluster(conn) => redis::cmd("PING").query_async(&mut conn.clone()).await,
        };
        result.map(|_| ()).map_err(StoreError::from)
    }
}

fn parse_reply(items: &[Item], reply: &[i64]) -> Result<Decision, StoreError> {
    if reply.len() != 1 + 5 * items.len() {
        return Err(StoreError::Reply(format!(
            "{} integers for {} limits",
            reply.len(),
            items.len()
        )));
    }
    let mut receipts = Vec::with_capacity(items.len());
    let outcomes = reply[1..]
        .chunks_exact(5)
        .map(|c| {
            receipts.push(c[4].max(0) as u64);
            Outcome {
                allowed: c[0] == 1,
                remaining: c[1].max(0) as u64,
                reset: c[2].max(0) as u64,
                retry_after: c[3].max(0) as u64,
            }
        })
        .collect();
    let mut decision = Decision::from_outcomes(items, outcomes);
    decision.receipts = receipts;
    if decision.admitted != (reply[0] == 1) {
        return Err(StoreError::Reply(
            "admission flag disagrees with the limits".into(),
        ));
    }
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_start_with_the_prefix_and_carry_a_hash_tag() {
        let key = key_name("tollgate", 42, &[7u8; 16]);
        assert!(key.starts_with("tollgate:{"), "{key}");
        let tag = &key[key.find('{').unwrap() + 1..key.find('}').unwrap()];
        assert_eq!(tag.len(), 22);
        assert_eq!(key.len(), "tollgate".len() + 2 + 22 + 2 + 11);
        assert_ne!(key, key_name("tollgate", 43, &[7u8; 16]));
        assert_ne!(key, key_name("tollgate", 42, &[8u8; 16]));
    }

    #[test]
    fn slots_match_redis() {
        // CLUSTER KEYSLOT values from Redis for these strings.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b"foo") % 16384, 12182);
        assert_eq!(crc16(b"user1000") % 16384, 3443);
    }

    #[test]
    fn scripts_are_assembled_in_order() {
        for (script, tail) in [
            (&*SCRIPT, "-- decide:"),
            (&*REFUND_SCRIPT, "-- refund:"),
            (&*SETTLE_SCRIPT, "-- settle:"),
        ] {
            let prelude = script.find("local function set_state(").unwrap();
            let tables = script.find("local checks = {").unwrap();
            let end = script.find(tail).unwrap();
            let mut last = prelude;
            for kind in Kind::ALL {
                let name = kind.name();
                let at = script.find(&format!("local function {name}(")).unwrap();
                let refund = script
                    .find(&format!("local function {name}_refund("))
                    .unwrap();
                assert!(last < at && at < refund && refund < tables, "{name}");
                last = refund;
            }
            assert!(tables < end);
        }
        let tables = &SCRIPT[SCRIPT.find("local checks").unwrap()..];
        assert!(tables.starts_with(
            "local checks = { fixed_window, sliding_log, sliding_window, token_bucket, gcra, concurrency }\n\
             local commits = { set_state, sliding_log_commit, set_state, set_state, set_state, concurrency_commit }\n\
             local refunds = { fixed_window_refund, sliding_log_refund, sliding_window_refund, token_bucket_refund, gcra_refund, concurrency_refund }\n\
             local charges = { fixed_window_charge, no_charge, sliding_window_charge, token_bucket_charge, gcra_charge, no_charge }\n"
        ));
        for (kind, single) in Kind::ALL.into_iter().zip(SINGLE_SCRIPTS.iter()) {
            let line = format!(
                "local check, commit = {}, {}\n",
                kind.name(),
                kind.lua_commit()
            );
            assert!(single.contains(&line), "{kind:?}");
            for other in Kind::ALL.into_iter().filter(|o| *o != kind) {
                let name = other.name();
                assert!(
                    !single.contains(&format!("local function {name}(")),
                    "{name}"
                );
            }
        }
    }
}
