//! The Redis store: one EVALSHA of the decision script (lua/) per request, over a bb8 pool of
//! multiplexed redis-rs connections.
//!
//! Connections are multiplexed, so a checkout only picks a connection: the handle is cloned and
//! the pool slot returned at once, and any number of decisions pipeline over few sockets. A
//! connection that fails with an I/O error is flagged and bb8 replaces it on the next checkout
//! (bb8-redis's own manager never reports a broken connection and opens connections without
//! tollgate's timeouts, hence the small manager here). A script cache that lost the script
//! (restart, `SCRIPT FLUSH`, failover) answers NOSCRIPT: the script is loaded and the call retried
//! once, by redis-rs's `Script`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};

use super::algorithm::{Algorithm, Micros, Outcome};
use super::{Decision, Item, StoreError};
use crate::identity::Tag;

/// The decision script: prelude, the five algorithms, then the dispatcher. Each file states its
/// own contract; `decide.lua` states the whole script's KEYS, ARGV and reply.
pub const SCRIPT: &str = concat!(
    include_str!("../../lua/prelude.lua"),
    include_str!("../../lua/fixed_window.lua"),
    include_str!("../../lua/sliding_window.lua"),
    include_str!("../../lua/sliding_log.lua"),
    include_str!("../../lua/token_bucket.lua"),
    include_str!("../../lua/gcra.lua"),
    include_str!("../../lua/decide.lua"),
);

/// The algorithm code and p1..p3 that `decide.lua` expects for one limit.
pub fn script_args(algorithm: &Algorithm) -> (u8, u64, u64, u64) {
    match *algorithm {
        Algorithm::FixedWindow { quota, window } => (1, quota, window, 0),
        Algorithm::SlidingWindow { quota, window } => (2, quota, window, 0),
        Algorithm::SlidingLog { quota, window } => (3, quota, window, 0),
        Algorithm::TokenBucket {
            burst,
            refill,
            unit,
        } => (4, burst, refill, unit),
        Algorithm::Gcra { burst, interval } => (5, burst, interval, 0),
    }
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

/// The Redis backend.
pub struct RedisStore {
    pool: bb8::Pool<Manager>,
    script: Script,
    prefix: String,
}

/// Errors after which a connection is not reused.
fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

impl RedisStore {
    pub fn new(
        url: &str,
        pool_size: u32,
        timeout: Duration,
        prefix: &str,
    ) -> Result<RedisStore, StoreError> {
        let client = Client::open(url)?;
        let config = AsyncConnectionConfig::new()
            // Connecting happens in the background; a slow handshake may take longer than one
            // decision's budget without failing the decision that is waiting.
            .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
            // The caller's own timeout bounds each call; this only reclaims a stuck slot.
            .set_response_timeout(Some(timeout.max(Duration::from_secs(1))));
        let pool = bb8::Pool::builder()
            .max_size(pool_size)
            // bb8 waits 30 s for a connection by default: far beyond any decision's budget.
            .connection_timeout(timeout)
            .test_on_check_out(true)
            .build_unchecked(Manager { client, config });
        Ok(RedisStore {
            pool,
            script: Script::new(SCRIPT),
            prefix: prefix.to_string(),
        })
    }

    async fn connection(&self) -> Result<(MultiplexedConnection, Arc<AtomicBool>), StoreError> {
        let pooled = self.pool.get().await.map_err(|e| match e {
            bb8::RunError::User(e) => StoreError::Redis(e),
            bb8::RunError::TimedOut => StoreError::Pool("no connection available in time".into()),
        })?;
        Ok((pooled.inner.clone(), pooled.broken.clone()))
    }

    /// One script call for all items. With `peek` the script decides but writes nothing.
    pub async fn decide(
        &self,
        items: &[Item],
        now: Option<Micros>,
        peek: bool,
    ) -> Result<Decision, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        for item in items {
            invocation.key(key_name(&self.prefix, item.id, &item.tag));
        }
        match now {
            Some(t) => invocation.arg(t),
            None => invocation.arg(""),
        };
        invocation.arg(if peek { "1" } else { "0" });
        for item in items {
            let (code, p1, p2, p3) = script_args(&item.algorithm);
            invocation
                .arg(code)
                .arg(p1)
                .arg(p2)
                .arg(p3)
                .arg(item.cost)
                .arg(u8::from(item.shadow));
        }
        let (mut conn, broken) = self.connection().await?;
        let reply: Vec<i64> = match invocation.invoke_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                if breaks_connection(&e) {
                    broken.store(true, Ordering::Relaxed);
                }
                return Err(e.into());
            }
        };
        parse_reply(items, &reply)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let (mut conn, broken) = self.connection().await?;
        let result: Result<String, RedisError> = redis::cmd("PING").query_async(&mut conn).await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                if breaks_connection(&e) {
                    broken.store(true, Ordering::Relaxed);
                }
                Err(e.into())
            }
        }
    }
}

fn parse_reply(items: &[Item], reply: &[i64]) -> Result<Decision, StoreError> {
    if reply.len() != 1 + 4 * items.len() {
        return Err(StoreError::Reply(format!(
            "{} integers for {} limits",
            reply.len(),
            items.len()
        )));
    }
    let outcomes = reply[1..]
        .chunks_exact(4)
        .map(|c| Outcome {
            allowed: c[0] == 1,
            remaining: c[1].max(0) as u64,
            reset: c[2].max(0) as u64,
            retry_after: c[3].max(0) as u64,
        })
        .collect();
    let decision = Decision::from_outcomes(items, outcomes);
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
    fn script_is_assembled_in_order() {
        let prelude = SCRIPT.find("local function expire_in").unwrap();
        let decide = SCRIPT.find("local algorithms =").unwrap();
        for name in [
            "fixed_window",
            "sliding_window",
            "sliding_log",
            "token_bucket",
            "gcra",
        ] {
            let at = SCRIPT.find(&format!("local function {name}(")).unwrap();
            assert!(prelude < at && at < decide, "{name}");
        }
    }
}
