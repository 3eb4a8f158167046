//! Who the consumer is: the `[consumers]` table and `consumers.toml`, validated into a map from
//! key hash to consumer, and the per-request lookup (one BLAKE3 hash of the presented key and
//! one map probe, no allocation). Keys exist only as hashes: in the file, in memory, in Redis.
//! With `key = "jwt:CLAIM"` the consumer is the claim of a verified token ([`crate::jwt`]);
//! the file, if any, then maps those names to plans.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use http::HeaderValue;
use http::header::HeaderName;
use http::request::Parts;

/// A plan's index in `[consumers] plans`.
pub type PlanId = u16;

/// BLAKE3 of a key's bytes: what `tollgate hash-key` prints (as `b3:` + hex) and what the
/// consumers file lists.
pub type KeyHash = [u8; 32];

/// The `b3:` form of a key's hash.
pub fn hash_key(key: &[u8]) -> String {
    format!("b3:{}", blake3::hash(key).to_hex())
}

/// Reads a `b3:` + 64 lowercase hex digits hash; `None` when it is not one.
pub fn parse_hash(text: &str) -> Option<KeyHash> {
    let hex = text.strip_prefix("b3:")?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| {
            if b.is_ascii_digit() {
                b - b'0'
            } else {
                b - b'a' + 10
            }
        };
        out[i] = digit(pair[0]) << 4 | digit(pair[1]);
    }
    Some(out)
}

/// Where a request names its consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFrom {
    Header(HeaderName),
    Query(String),
    /// A claim of the verified JWT: its slot in [`crate::jwt::Claims`], and its name.
    Jwt(usize, String),
}

impl std::fmt::Display for KeyFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyFrom::Header(name) => write!(f, "header:{name}"),
            KeyFrom::Query(name) => write!(f, "query:{name}"),
            KeyFrom::Jwt(_, claim) => write!(f, "jwt:{claim}"),
        }
    }
}

/// What an absent or unknown key means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// No consumer: counted under the client IP, with the default plan.
    Anonymous,
    /// 401 on routes with a consumer-keyed limit.
    Reject,
}

/// One `[[consumer]]`.
#[derive(Debug)]
pub struct Consumer {
    pub name: Arc<str>,
    /// The consumer's own plan, or the default plan.
    pub plan: Option<PlanId>,
    /// `X-Tollgate-Consumer`, prepared at load.
    pub header: HeaderValue,
}

/// The key hashes are already uniformly distributed: their first 8 bytes are the map's hash.
#[derive(Default)]
pub struct FirstBytes(u64);

impl Hasher for FirstBytes {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A [u8; 32] is hashed as its length, then its bytes.
        if bytes.len() >= 8 {
            self.0 = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

/// The validated `[consumers]` table with its file.
#[derive(Debug)]
pub struct Consumers {
    pub key: KeyFrom,
    /// Plan names, in `plans` order ([`PlanId`] indexes this).
    pub plans: Vec<Arc<str>>,
    /// `X-Tollgate-Plan` of each plan, prepared at load.
    pub plan_headers: Vec<HeaderValue>,
    pub default_plan: Option<PlanId>,
    pub unknown: Unknown,
    pub list: Vec<Consumer>,
    pub by_key: HashMap<KeyHash, u32, BuildHasherDefault<FirstBytes>>,
    /// Consumer names to their index (for JWT consumers, whose name is a claim).
    pub by_name: HashMap<Arc<str>, u32>,
    /// How many key hashes the file lists (for `check`).
    pub keys: usize,
    /// `plan_from = "jwt:CLAIM"`: the claim slot whose value names the plan.
    pub plan_from: Option<usize>,
}

/// Who a request is, as far as consumers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resolved<'a> {
    /// Index into [`Consumers::list`], when the consumer is listed there.
    pub consumer: Option<u32>,
    /// The consumer's name: its entry's, or (JWT) the claim's. `None`: anonymous.
    pub name: Option<&'a str>,
    pub plan: Option<PlanId>,
    /// A key (or token) was presented, known or not.
    pub presented: bool,
}

impl Consumers {
    /// The consumer (and plan) of a request; `token` is the request's verified JWT claims,
    /// or why there are none (only read with `key = "jwt:…"`).
    pub fn resolve<'a>(
        &'a self,
        parts: &Parts,
        token: Option<&'a crate::jwt::Checked>,
    ) -> Resolved<'a> {
        let anonymous = |presented| Resolved {
            consumer: None,
            name: None,
            plan: self.default_plan,
            presented,
        };
        let hash = match &self.key {
            KeyFrom::Header(name) => parts
                .headers
                .get_all(name)
                .iter()
                .find(|v| !v.is_empty())
                .map(|v| blake3::hash(v.as_bytes())),
            KeyFrom::Query(name) => {
                crate::identity::query_value(parts, name).map(|v| blake3::hash(v.as_bytes()))
            }
            KeyFrom::Jwt(slot, _) => {
                let presented = !matches!(token, None | Some(Err(crate::jwt::Refused::Absent)));
                let Some(Ok(claims)) = token else {
                    return anonymous(presented);
                };
                let Some(name) = claims.get(*slot) else {
                    return anonymous(true);
                };
                let consumer = self.by_name.get(name).copied();
                let claimed = self
                    .plan_from
                    .and_then(|p| claims.get(p))
                    .and_then(|plan| self.plan_id(plan));
                return Resolved {
                    consumer,
                    name: Some(name),
                    plan: claimed
                        .or_else(|| consumer.and_then(|i| self.list[i as usize].plan))
                        .or(self.default_plan),
                    presented: true,
                };
            }
        };
        let Some(hash) = hash else {
            return anonymous(false);
        };
        match self.by_key.get(hash.as_bytes()) {
            Some(&i) => Resolved {
                consumer: Some(i),
                name: Some(&self.list[i as usize].name),
                plan: self.list[i as usize].plan,
                presented: true,
            },
            None => anonymous(true),
        }
    }

    /// The consumer at `index`.
    pub fn get(&self, index: u32) -> &Consumer {
        &self.list[index as usize]
    }

    /// The index of the plan named `name`.
    pub fn plan_id(&self, name: &str) -> Option<PlanId> {
        self.plans
            .iter()
            .position(|p| &**p == name)
            .map(|i| i as PlanId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip() {
        let text = hash_key(b"sk-live-123");
        assert_eq!(text.len(), 3 + 64);
        let parsed = parse_hash(&text).unwrap();
        assert_eq!(&parsed, blake3::hash(b"sk-live-123").as_bytes());
        assert_eq!(parse_hash("b3:abc"), None);
        assert_eq!(parse_hash(&text.to_uppercase()), None);
        assert_eq!(parse_hash(&text[3..]), None);
    }

    #[test]
    fn lookup_by_header_and_query() {
        let mut by_key = HashMap::default();
        by_key.insert(*blake3::hash(b"k1").as_bytes(), 0);
        by_key.insert(*blake3::hash(b"k2").as_bytes(), 0);
        let mut consumers = Consumers {
            key: KeyFrom::Header(HeaderName::from_static("x-api-key")),
            plans: vec!["free".into(), "pro".into()],
            plan_headers: vec![
                HeaderValue::from_static("free"),
                HeaderValue::from_static("pro"),
            ],
            default_plan: Some(0),
            unknown: Unknown::Anonymous,
            list: vec![Consumer {
                name: "acme".into(),
                plan: Some(1),
                header: HeaderValue::from_static("acme"),
            }],
            by_name: HashMap::new(),
            by_key,
            keys: 2,
            plan_from: None,
        };
        let parts = |uri: &str, key: Option<&str>| {
            let mut b = http::Request::builder().uri(uri);
            if let Some(k) = key {
                b = b.header("x-api-key", k);
            }
            b.body(()).unwrap().into_parts().0
        };
        let acme = Resolved {
            consumer: Some(0),
            name: Some("acme"),
            plan: Some(1),
            presented: true,
        };
        assert_eq!(consumers.resolve(&parts("/", Some("k1")), None), acme);
        assert_eq!(consumers.resolve(&parts("/", Some("k2")), None), acme);
        assert_eq!(
            consumers.resolve(&parts("/", Some("nope")), None),
            Resolved {
                consumer: None,
                name: None,
                plan: Some(0),
                presented: true
            }
        );
        assert_eq!(
            consumers.resolve(&parts("/", None), None),
            Resolved {
                consumer: None,
                name: None,
                plan: Some(0),
                presented: false
            }
        );
        consumers.key = KeyFrom::Query("api_key".into());
        assert_eq!(consumers.resolve(&parts("/x?api_key=k2", None), None), acme);
        assert_eq!(consumers.plan_id("pro"), Some(1));
        assert_eq!(consumers.plan_id("gold"), None);
    }
}
