//! JWT identities: the `[jwt]` table's keys (a JWKS file of public keys, or an HMAC secret from
//! the environment) and the verification of a request's bearer token, with the claims the
//! policy counts by. Verified (and refused) tokens are cached by a hash of the token until they
//! expire, so a hot token costs one hash and one map probe, not a signature check. A token is
//! never logged, stored or echoed: the cache holds its hash and the claims tollgate needs.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use http::header::HeaderName;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::limiter::shards::{Expires, Hashed, Shards};

/// A refused token is remembered this long (a flood of one bad token costs one check).
const REFUSED_FOR_SECS: u64 = 60;

/// Tokens remembered at most; past it, expired entries are swept, and a new token is checked
/// without being remembered until there is room.
pub const CACHE_MAX: usize = 100_000;

/// One verification key.
struct Key {
    kid: Option<String>,
    /// The algorithms this key may verify (its `alg`, or every one of its type and curve).
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// The claims of a verified token that the policy uses, by slot ([`Jwt::claims`] order).
#[derive(Debug, PartialEq, Eq)]
pub struct Claims(pub Vec<Option<Box<str>>>);

impl Claims {
    pub fn get(&self, slot: usize) -> Option<&str> {
        self.0.get(slot).and_then(|v| v.as_deref())
    }
}

/// What a token came to.
pub type Checked = Result<Arc<Claims>, Refused>;

/// Why a token did not verify (for `explain` and debug logs; never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no bearer token")]
    Absent,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm is not one tollgate accepts for its key (\"none\" never is)")]
    Algorithm,
    #[error("no configured key matches the token")]
    NoKey,
    #[error("the signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYet,
    #[error("the token's issuer is not the configured one")]
    Issuer,
    #[error("the token's audience does not contain the configured one")]
    Audience,
    #[error("the token has no exp claim")]
    NoExpiry,
}

struct Cached {
    /// Unix seconds until which the answer stands.
    until: u64,
    checked: Checked,
}

impl Expires for Cached {
    type Time = u64;
    fn live_at(&self, now: u64) -> bool {
        now < self.until
    }
}

/// The validated `[jwt]` table.
pub struct Jwt {
    /// Where the token is: `Authorization: Bearer <token>` by default.
    pub header: HeaderName,
    keys: Vec<Key>,
    secret: Option<DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    /// The claims the policy reads (`by = "jwt:CLAIM"`, `[consumers] key`, `plan_from`).
    pub claims: Vec<String>,
    cache: Shards<Cached>,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("header", &self.header)
            .field("keys", &self.keys.len())
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("claims", &self.claims)
            .finish()
    }
}

/// Why a JWKS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {index}: {reason}")]
    Key { index: usize, reason: String },
    #[error("the JWKS file lists no keys")]
    Empty,
}

/// The algorithms a JWK may verify.
fn algorithms_of(jwk: &Jwk) -> Result<Vec<Algorithm>, String> {
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported curve (P-256 and P-384 are)".into()),
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric key does not belong in a JWKS file; use hs256_secret_env".into(),
            );
        }
    };
    match jwk.common.key_algorithm {
        None => Ok(family),
        Some(alg) => {
            let named = format!("{alg:?}");
            family
                .into_iter()
                .find(|a| format!("{a:?}") == named)
                .map(|a| vec![a])
                .ok_or_else(|| format!("`alg` {named} does not fit the key's type"))
        }
    }
}

/// Settings of `[jwt]`, validated by `config`.
pub struct Settings {
    pub header: HeaderName,
    pub jwks: Option<jsonwebtoken::jwk::JwkSet>,
    pub secret: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: u64,
    pub claims: Vec<String>,
}

impl Jwt {
    pub fn new(s: Settings) -> Result<Jwt, KeyError> {
        let mut keys = Vec::new();
        if let Some(set) = &s.jwks {
            if set.keys.is_empty() && s.secret.is_none() {
                return Err(KeyError::Empty);
            }
            for (index, jwk) in set.keys.iter().enumerate() {
                let algorithms =
                    algorithms_of(jwk).map_err(|reason| KeyError::Key { index, reason })?;
                let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError::Key {
                    index,
                    reason: e.to_string(),
                })?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithms,
                    key,
                });
            }
        }
        Ok(Jwt {
            header: s.header,
            keys,
            secret: s.secret.as_deref().map(DecodingKey::from_secret),
            issuer: s.issuer,
            audience: s.audience,
            leeway: s.leeway,
            claims: s.claims,
            cache: Shards::new(16),
        })
    }

    /// The slot of claim `name` in [`Claims`].
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.claims.iter().position(|c| c == name)
    }

    /// The request's token, verified (from the cache when it was seen before).
    pub fn check(&self, headers: &HeaderMap) -> Checked {
        let Some(token) = bearer(headers, &self.header) else {
            return Err(Refused::Absent);
        };
        let now = unix_now();
        let hash = blake3::hash(token.as_bytes());
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&hash.as_bytes()[..16]);
        let key = Hashed::new(0, tag);
        {
            let shard = self.cache.lock(&key);
            if let Some(hit) = shard.get(&key)
                && hit.live_at(now)
            {
                return hit.checked.clone();
            }
        }
        let (checked, until) = match self.verify(token) {
            Ok((claims, exp)) => (Ok(Arc::new(claims)), exp.saturating_add(self.leeway)),
            Err(refused) => (Err(refused), now + REFUSED_FOR_SECS),
        };
        if self.cache.len() >= CACHE_MAX {
            self.cache.retain(now);
        }
        if self.cache.len() < CACHE_MAX {
            self.cache.lock(&key).insert(
                key,
                Cached {
                    until,
                    checked: checked.clone(),
                },
            );
        }
        checked
    }

    /// Signature and claims, without the cache: the claims tollgate reads and `exp`.
    fn verify(&self, token: &str) -> Result<(Claims, u64), Refused> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            // A header that parses but names an algorithm tollgate has no use for ("none",
            // say) is an algorithm refusal; anything else is not a JWT at all.
            if names_an_algorithm(token) {
                Refused::Algorithm
            } else {
                Refused::Malformed
            }
        })?;
        let alg = header.alg;
        let mut candidates: Vec<&DecodingKey> = Vec::new();
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            candidates.extend(self.secret.as_ref());
        } else {
            candidates.extend(
                self.keys
                    .iter()
                    .filter(|k| k.algorithms.contains(&alg))
                    .filter(|k| match (&header.kid, &k.kid) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    })
                    .map(|k| &k.key),
            );
        }
        if candidates.is_empty() {
            return Err(
                if self.keys.iter().any(|k| k.algorithms.contains(&alg)) || self.secret.is_some() {
                    Refused::NoKey
                } else {
                    Refused::Algorithm
                },
            );
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let mut last = Refused::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                key,
                &validation,
            ) {
                Ok(data) => {
                    let exp = data.claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
                    let claims = self
                        .claims
                        .iter()
                        .map(|name| match data.claims.get(name) {
                            Some(serde_json::Value::String(s)) if !s.is_empty() => {
                                Some(s.as_str().into())
                            }
                            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => {
                                Some(n.to_string().into())
                            }
                            _ => None,
                        })
                        .collect();
                    return Ok((Claims(claims), exp));
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => Refused::Signature,
                        K::ExpiredSignature => Refused::Expired,
                        K::ImmatureSignature => Refused::NotYet,
                        K::InvalidIssuer => Refused::Issuer,
                        K::InvalidAudience => Refused::Audience,
                        K::MissingRequiredClaim(_) => Refused::NoExpiry,
                        K::InvalidAlgorithm => Refused::Algorithm,
                        _ => Refused::Malformed,
                    };
                    if last != Refused::Signature {
                        // The signature held (or the token is unusable whatever the key).
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// `check`'s line: keys, issuer, audience, leeway and claims read; never the secret.
    pub fn describe(&self) -> String {
        let mut kinds: Vec<String> = self
            .keys
            .iter()
            .map(|k| {
                let algs: Vec<String> = k.algorithms.iter().map(|a| format!("{a:?}")).collect();
                match &k.kid {
                    Some(kid) => format!("{kid} ({})", algs.join("/")),
                    None => algs.join("/"),
                }
            })
            .collect();
        if self.secret.is_some() {
            kinds.push("an HMAC secret from the environment (HS256/384/512)".into());
        }
        format!(
            "jwt: token in {}; keys {}; issuer {}; audience {}; leeway {} s; claims read: {}",
            self.header,
            kinds.join(", "),
            self.issuer.as_deref().unwrap_or("any"),
            self.audience.as_deref().unwrap_or("any"),
            self.leeway,
            if self.claims.is_empty() {
                "none".to_string()
            } else {
                self.claims.join(", ")
            }
        )
    }

    /// Tokens remembered now (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive), or of any other
/// header as its whole value.
fn bearer<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    let token = if *name == http::header::AUTHORIZATION {
        let (scheme, rest) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        rest.trim()
    } else {
        value
    };
    (!token.is_empty()).then_some(token)
}

/// Whether the token's header is JSON with a string `alg`.
fn names_an_algorithm(token: &str) -> bool {
    use base64::Engine;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|v| v.get("alg").is_some_and(|a| a.is_string()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn hs(claims: &[&str]) -> Jwt {
        Jwt::new(Settings {
            header: http::header::AUTHORIZATION,
            jwks: None,
            secret: Some(b"test-secret".to_vec()),
            issuer: Some("https://id.example.com".into()),
            audience: Some("api".into()),
            leeway: 0,
            claims: claims.iter().map(|c| c.to_string()).collect(),
        })
        .unwrap()
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn good(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "sub": "user-1", "tenant": 42, "iss": "https://id.example.com", "aud": ["api", "web"],
            "exp": unix_now() + 600,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    #[test]
    fn a_valid_token_yields_its_claims_and_is_cached() {
        let jwt = hs(&["sub", "tenant", "missing"]);
        let t = token(b"test-secret", good(serde_json::json!({})));
        let claims = jwt.check(&headers(&t)).unwrap();
        assert_eq!(claims.get(0), Some("user-1"));
        assert_eq!(claims.get(1), Some("42"));
        assert_eq!(claims.get(2), None);
        assert_eq!(jwt.cached(), 1);
        let again = jwt.check(&headers(&t)).unwrap();
        assert!(
            Arc::ptr_eq(&claims, &again),
            "the second check is the cached answer"
        );
    }

    #[test]
    fn every_kind_of_bad_token_is_refused_with_its_reason() {
        let jwt = hs(&["sub"]);
        let now = unix_now();
        let cases = [
            (
                token(b"other-secret", good(serde_json::json!({}))),
                Refused::Signature,
            ),
            (
                token(b"test-secret", good(serde_json::json!({"exp": now - 100}))),
                Refused::Expired,
            ),
            (
                token(b"test-secret", good(serde_json::json!({"nbf": now + 100}))),
                Refused::NotYet,
            ),
            (
                token(b"test-secret", good(serde_json::json!({"iss": "evil"}))),
                Refused::Issuer,
            ),
            (
                token(b"test-secret", good(serde_json::json!({"aud": "other"}))),
                Refused::Audience,
            ),
            ("garbage".to_string(), Refused::Malformed),
            // alg "none": header {"alg":"none","typ":"JWT"}, claims {"sub":"x"}, no signature.
            (
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4In0.".to_string(),
                Refused::Algorithm,
            ),
        ];
        for (t, expected) in cases {
            assert_eq!(jwt.check(&headers(&t)), Err(expected), "{expected:?}");
        }
        let mut no_exp = good(serde_json::json!({}));
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            jwt.check(&headers(&token(b"test-secret", no_exp))),
            Err(Refused::NoExpiry)
        );
        assert_eq!(jwt.check(&HeaderMap::new()), Err(Refused::Absent));
        let mut basic = HeaderMap::new();
        basic.insert(http::header::AUTHORIZATION, "Basic dTpw".parse().unwrap());
        assert_eq!(jwt.check(&basic), Err(Refused::Absent));
    }

    #[test]
    fn an_rsa_public_key_is_never_used_as_an_hmac_secret() {
        // No secret configured: an HS256 token is refused whatever it is signed with.
        let jwt = Jwt::new(Settings {
            header: http::header::AUTHORIZATION,
            jwks: Some(jsonwebtoken::jwk::JwkSet { keys: vec![] }),
            secret: Some(b"s".to_vec()),
            issuer: None,
            audience: None,
            leeway: 0,
            claims: vec![],
        })
        .unwrap();
        let t = token(b"not-it", good(serde_json::json!({})));
        assert_eq!(jwt.check(&headers(&t)), Err(Refused::Signature));
    }
}
