//! serde structs that mirror proxy.toml one to one. Unknown keys are refused
//! (`deny_unknown_fields`), and every value a later check may complain about keeps its span so
//! the error can name its line and column. Private to `config`: the rest of tollgate sees only
//! `policy`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: S<RawServer>,
    #[serde(default)]
    pub store: Option<S<RawStore>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, S<RawUpstream>>,
    #[serde(default)]
    pub routes: Vec<S<RawRoute>>,
    pub consumers: Option<S<RawConsumers>>,
    pub jwt: Option<S<RawJwt>>,
    pub telemetry: Option<S<RawTelemetry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: S<String>,
    pub service_name: Option<S<String>>,
    pub sample_ratio: Option<S<f64>>,
    pub tls_ca: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub header: Option<S<String>>,
    pub jwks_file: Option<S<String>>,
    pub hs256_secret_env: Option<S<String>>,
    pub issuer: Option<S<String>>,
    pub audience: Option<S<String>>,
    pub leeway: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumers {
    pub key: S<String>,
    pub file: Option<S<String>>,
    #[serde(default)]
    pub plans: Vec<S<String>>,
    pub default_plan: Option<S<String>>,
    pub unknown: Option<S<String>>,
    pub plan_from: Option<S<String>>,
}

/// consumers.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumersFile {
    #[serde(default)]
    pub consumer: Vec<S<RawConsumer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    pub name: S<String>,
    pub plan: Option<S<String>>,
    #[serde(default)]
    pub keys: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: S<String>,
    pub admin: Option<S<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<S<String>>,
    pub rate_limit_headers: Option<S<String>>,
    pub ipv6_prefix: Option<S<i64>>,
    pub max_body: Option<S<toml::Value>>,
    pub shutdown_grace: Option<S<String>>,
    pub workers: Option<S<i64>>,
    pub header_read_timeout: Option<S<String>>,
    pub tls: Option<S<RawTls>>,
    pub access_log: Option<bool>,
    pub watch_config: Option<bool>,
    pub body_idle_timeout: Option<S<String>>,
    pub send_timeout: Option<S<String>>,
    pub upgrade_idle_timeout: Option<S<String>>,
    pub max_connections: Option<S<i64>>,
    pub upgrades: Option<S<Vec<S<String>>>>,
    pub escaped_slashes: Option<S<String>>,
    pub admin_token_env: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: S<String>,
    pub key: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<S<String>>,
    pub url: Option<S<String>>,
    pub url_env: Option<S<String>>,
    pub cluster: Option<S<Vec<S<String>>>>,
    pub username: Option<S<String>>,
    pub password_env: Option<S<String>>,
    pub tls_ca: Option<S<String>>,
    pub tls_cert: Option<S<String>>,
    pub tls_key: Option<S<String>>,
    pub pool_size: Option<S<i64>>,
    pub timeout: Option<S<String>>,
    pub prefix: Option<S<String>>,
    pub max_keys: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub targets: S<Vec<S<String>>>,
    pub connect_timeout: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub max_connections_per_target: Option<S<i64>>,
    /// `http1`, `h2` or `auto`.
    pub protocol: Option<S<String>>,
    pub tls: Option<S<RawUpstreamTls>>,
    pub health_check: Option<S<RawHealthCheck>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: S<String>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub unhealthy_after: Option<S<i64>>,
    pub healthy_after: Option<S<i64>>,
}

/// How tollgate verifies (and presents itself to) `https://` targets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub server_name: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: S<String>,
    pub upstream: S<String>,
    #[serde(rename = "match")]
    pub matcher: Option<S<RawMatch>>,
    pub on_store_error: Option<S<String>>,
    #[serde(default)]
    pub limits: Vec<S<RawLimit>>,
    pub bypass: Option<S<RawAccess>>,
    pub deny: Option<S<RawAccess>>,
    pub rejection: Option<S<RawRejection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    #[serde(default)]
    pub ips: Vec<S<String>>,
    #[serde(default)]
    pub consumers: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRejection {
    pub status: Option<S<i64>>,
    pub content_type: Option<S<String>>,
    pub body: Option<S<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub host: Option<S<String>>,
    pub path: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub methods: Option<Vec<S<String>>>,
    pub headers: Option<BTreeMap<String, S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    /// A string or a list of strings; checked by validation.
    pub by: Option<S<toml::Value>>,
    pub algorithm: S<String>,
    /// Required but for `concurrency` (which takes `max`).
    pub rate: Option<S<String>>,
    pub burst: Option<S<i64>>,
    pub cost: Option<S<i64>>,
    pub mode: Option<S<String>>,
    pub batch: Option<S<i64>>,
    /// `concurrency`: requests in flight at most.
    pub max: Option<S<i64>>,
    /// Statuses (`"401"`) or classes (`"4xx"`) that count; the others are given back.
    pub count: Option<S<Vec<S<String>>>>,
    /// With `cost_from`: what admission reserves (default `cost`).
    pub reserve: Option<S<i64>>,
    /// `header:NAME` or `openai:FIELD`: the cost the response reports.
    pub cost_from: Option<S<String>>,
    pub ban: Option<S<String>>,
    pub delay: Option<S<String>>,
    /// Per plan: `"unlimited"` or `{ rate, burst }`; checked by validation.
    pub plans: Option<S<BTreeMap<String, S<toml::Value>>>>,
}
