//! JWT identities end to end: tokens signed with RS256 (a fixture key) and ES256 (a key made
//! here) verified against a JWKS file, HS256 with a secret from the environment; every kind of
//! invalid token counted under the client IP and forwarded untouched; two replicas on one
//! Redis admitting exactly the limit for one `sub`; consumers named by a claim with their plan
//! from another; the token never in a log line, at debug level either.

mod common;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The signing keys of a test: the RSA fixture and a P-256 key made now, with their JWKS.
struct Keys {
    rsa: EncodingKey,
    ec: EncodingKey,
    jwks: String,
}

impl Keys {
    fn new() -> Keys {
        let rsa_pem = std::fs::read(Path::new(FIXTURES).join("rsa-private.pem")).unwrap();
        let rsa_jwk: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(FIXTURES).join("rsa-public.jwk.json")).unwrap(),
        )
        .unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = ec.public_key_raw(); // 0x04 || x || y
        let ec_jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "ec-test-1", "alg": "ES256", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        Keys {
            rsa: EncodingKey::from_rsa_pem(&rsa_pem).unwrap(),
            ec: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
            jwks: serde_json::json!({ "keys": [rsa_jwk, ec_jwk] }).to_string(),
        }
    }

    fn rs256(&self, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-test-1".into());
        encode(&header, &claims, &self.rsa).unwrap()
    }

    fn es256(&self, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("ec-test-1".into());
        encode(&header, &claims, &self.ec).unwrap()
    }
}

fn hs256(secret: &[u8], claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// Claims that verify under [`jwt_table`], with `extra` merged in.
fn claims(sub: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "sub": sub, "iss": "https://id.example.com", "aud": "api", "exp": now() + 600,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn jwt_table(keys: &str) -> String {
    format!(
        "[jwt]\n{keys}\nissuer = \"https://id.example.com\"\naudience = \"api\"\nleeway = \"5s\"\n"
    )
}

/// A proxy.toml with `store`, `[jwt]` keyed by `keys`, `extra` tables, and one route `api` to
/// `target` with `limits`.
fn proxy_text(store: &str, keys: &str, extra: &str, target: &str, limits: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{store}\n{}\n{extra}\n[upstreams.api]\ntargets = [\"{target}\"]\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"api\"\nlimits = [{limits}]\n",
        jwt_table(keys)
    )
}

/// proxy.toml (and jwks.json) in a directory: route `api`, `n` per hour per `sub`.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(jwks: Option<&str>, text: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        if let Some(jwks) = jwks {
            std::fs::write(dir.path().join("jwks.json"), jwks).unwrap();
        }
        std::fs::write(dir.path().join("proxy.toml"), text).unwrap();
        Setup { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn rs256_and_es256_tokens_count_per_sub_and_bad_ones_under_the_ip() {
    let keys = Keys::new();
    let upstream = Upstream::start().await;
    let text = proxy_text(
        &memory_store(),
        "jwks_file = \"jwks.json\"",
        "",
        &upstream.target(),
        "{ by = \"jwt:sub\", algorithm = \"fixed_window\", rate = \"3/hour\" }",
    );
    let setup = Setup::new(Some(&keys.jwks), &text);
    let tg = start_file(&setup.path()).await;
    let http = Http::new();
    let url = format!("http://{}/x", tg.addr);
    let admitted = |statuses: &[u16]| statuses.iter().filter(|s| **s == 200).count();

    for (who, token) in [
        (
            "alice (RS256)",
            keys.rs256(claims("alice", serde_json::json!({}))),
        ),
        (
            "bob (ES256)",
            keys.es256(claims("bob", serde_json::json!({}))),
        ),
    ] {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(
                http.get(&url, &[("authorization", &bearer(&token))])
                    .await
                    .status,
            );
        }
        assert_eq!(admitted(&statuses), 3, "{who}: {statuses:?}");
        assert_eq!(
            upstream.last().headers.get("authorization").unwrap(),
            bearer(&token).as_str(),
            "{who}: the token is forwarded untouched"
        );
    }

    // Every invalid kind is an absent source: they share the client IP's budget of 3.
    let n = now();
    let bad = [
        keys.rs256(claims("mallory", serde_json::json!({"exp": n - 100}))),
        keys.rs256(claims("mallory", serde_json::json!({"nbf": n + 600}))),
        keys.es256(claims(
            "mallory",
            serde_json::json!({"iss": "https://evil.example"}),
        )),
        keys.es256(claims("mallory", serde_json::json!({"aud": "other"}))),
        // Signed with a key the JWKS does not have.
        hs256(b"guess", claims("mallory", serde_json::json!({}))),
        // alg "none".
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims("mallory", serde_json::json!({}))
                .to_string()
                .as_bytes())
        ),
        // A valid RS256 token with its payload swapped.
        {
            let good = keys.rs256(claims("alice", serde_json::json!({})));
            let parts: Vec<&str> = good.split('.').collect();
            let forged = b64(claims("mallory", serde_json::json!({}))
                .to_string()
                .as_bytes());
            format!("{}.{forged}.{}", parts[0], parts[2])
        },
        "garbage".to_string(),
    ];
    let mut statuses = Vec::new();
    for token in &bad {
        let reply = http.get(&url, &[("authorization", &bearer(token))]).await;
        statuses.push(reply.status);
        if reply.status == 200 {
            assert_eq!(
                upstream.last().headers.get("authorization").unwrap(),
                bearer(token).as_str()
            );
        }
    }
    assert_eq!(
        admitted(&statuses),
        3,
        "bad tokens count under the IP: {statuses:?}"
    );
    // No token at all: the same IP budget, now spent.
    assert_eq!(http.get(&url, &[]).await.status, 429);
    // alice's and bob's budgets were theirs, not the IP's.
    tg.stop().await;
}

#[tokio::test]
async fn two_replicas_on_one_redis_admit_exactly_the_limit_for_one_sub_hs256_from_the_env() {
    let redis = Redis::start();
    let upstream = Upstream::start().await;
    let secret = "a-test-hmac-secret-of-some-length";
    let text = proxy_text(
        &redis_store(&redis),
        "hs256_secret_env = \"TOLLGATE_TEST_JWT_SECRET\"",
        "",
        &upstream.target(),
        "{ by = \"jwt:sub\", algorithm = \"gcra\", rate = \"10/hour\", burst = 10 }",
    );
    let setup = Setup::new(None, &text);
    let env = [("TOLLGATE_TEST_JWT_SECRET", secret), ("RUST_LOG", "debug")];
    let mut a = Binary::start_with_env(&setup.path(), &env);
    let mut b = Binary::start_with_env(&setup.path(), &env);
    let token = hs256(secret.as_bytes(), claims("carol", serde_json::json!({})));
    let http = Http::new();
    let mut admitted = 0;
    for i in 0..30 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let reply = http
            .get(
                &format!("http://{addr}/x"),
                &[("authorization", &bearer(&token))],
            )
            .await;
        if reply.status == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "one budget for carol across both replicas");
    // Another sub has its own.
    let dave = hs256(secret.as_bytes(), claims("dave", serde_json::json!({})));
    let reply = http
        .get(
            &format!("http://{}/x", a.addr),
            &[("authorization", &bearer(&dave))],
        )
        .await;
    assert_eq!(reply.status, 200);
    for replica in [&mut a, &mut b] {
        replica.signal("TERM");
        replica.wait_exit(std::time::Duration::from_secs(10));
        let logs = serde_json::to_string(&replica.logs()).unwrap();
        assert!(
            !logs.contains(&token) && !logs.contains(&dave),
            "a token was logged"
        );
        assert!(!logs.contains(secret), "the secret was logged");
        assert!(!logs.contains("carol"), "a claim value was logged");
    }
}

#[tokio::test]
async fn consumers_named_by_a_claim_with_their_plan_from_another() {
    let keys = Keys::new();
    let upstream = Upstream::start().await;
    let text = proxy_text(
        &memory_store(),
        "jwks_file = \"jwks.json\"",
        "[consumers]\nkey = \"jwt:sub\"\nplan_from = \"jwt:plan\"\nplans = [\"free\", \"pro\"]\n\
         default_plan = \"free\"\nunknown = \"reject\"\n",
        &upstream.target(),
        "{ by = \"consumer\", algorithm = \"fixed_window\", rate = \"2/hour\", plans = { pro = { rate = \"4/hour\" } } }",
    );
    let setup = Setup::new(Some(&keys.jwks), &text);
    let tg = start_file(&setup.path()).await;
    let http = Http::new();
    let url = format!("http://{}/x", tg.addr);
    let count = |who: &str, plan: &str| {
        let token = keys.rs256(claims(who, serde_json::json!({ "plan": plan })));
        let (http, url) = (&http, &url);
        async move {
            let mut ok = 0;
            for _ in 0..6 {
                if http
                    .get(url, &[("authorization", &bearer(&token))])
                    .await
                    .status
                    == 200
                {
                    ok += 1;
                }
            }
            ok
        }
    };
    assert_eq!(count("erin", "pro").await, 4, "pro from the plan claim");
    let seen = upstream.last();
    assert_eq!(seen.headers.get("x-tollgate-consumer").unwrap(), "erin");
    assert_eq!(seen.headers.get("x-tollgate-plan").unwrap(), "pro");
    assert_eq!(
        count("frank", "gold").await,
        2,
        "an unlisted plan is the default plan"
    );
    // Without a verified token the consumer is unknown: 401.
    let expired = keys.rs256(claims("erin", serde_json::json!({"exp": now() - 100})));
    assert_eq!(
        http.get(&url, &[("authorization", &bearer(&expired))])
            .await
            .status,
        401
    );
    assert_eq!(http.get(&url, &[]).await.status, 401);
    tg.stop().await;
}

#[test]
fn check_describes_the_jwt_table_without_the_secret() {
    let keys = Keys::new();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n[upstreams.api]\ntargets = [\"http://127.0.0.1:9\"]\n\
         [[routes]]\nname = \"r\"\nupstream = \"api\"\nlimits = [{{ by = \"jwt:tenant\", algorithm = \"gcra\", rate = \"1/s\" }}]\n",
        jwt_table("jwks_file = \"jwks.json\"")
    );
    let setup = Setup::new(Some(&keys.jwks), &text);
    let policy = tollgate::config::load(&setup.path()).unwrap();
    let summary = tollgate::report::summary(&policy, "proxy.toml");
    assert!(
        summary.contains(
            "jwt: token in authorization; keys rsa-test-1 (RS256), ec-test-1 (ES256); issuer https://id.example.com; audience api; leeway 5 s; claims read: tenant"
        ),
        "{summary}"
    );
}

#[test]
fn jwt_config_errors_name_their_file_line_and_column() {
    let text = |jwt: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{jwt}\n[upstreams.api]\ntargets = [\"http://127.0.0.1:9\"]\n\
             [[routes]]\nname = \"r\"\nupstream = \"api\"\nlimits = [{{ by = \"jwt:sub\", algorithm = \"gcra\", rate = \"1/s\" }}]\n"
        )
    };
    // A JWKS that is not JSON.
    let setup = Setup::new(
        Some("{\"keys\": [\n  {\"kty\": \"RSA\",}\n]}"),
        &text("[jwt]\njwks_file = \"jwks.json\""),
    );
    let e = tollgate::config::load(&setup.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("jwks.json:2:"), "{e}");
    // A key of no usable kind: at its line.
    let setup = Setup::new(
        Some("{\"keys\": [\n  {\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}\n]}"),
        &text("[jwt]\njwks_file = \"jwks.json\""),
    );
    let e = tollgate::config::load(&setup.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("jwks.json:2:3: key 0: a symmetric key does not belong in a JWKS file"),
        "{e}"
    );
    // A secret variable that is not set.
    let setup = Setup::new(
        None,
        &text("[jwt]\nhs256_secret_env = \"TOLLGATE_TEST_UNSET_VARIABLE\""),
    );
    let e = tollgate::config::load(&setup.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("proxy.toml:4:20: the environment variable TOLLGATE_TEST_UNSET_VARIABLE"),
        "{e}"
    );
    // jwt:CLAIM without [jwt].
    let setup = Setup::new(None, &text(""));
    let e = tollgate::config::load(&setup.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`by = \"jwt:sub\"` needs a [jwt] table"), "{e}");
}
