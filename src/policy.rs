//! The validated policy: what proxy.toml means, as typed values built once per (re)load.
//!
//! Nothing here is parsed on the hot path: header names, matchers, key specifications, the
//! arguments each limit sends to the store and the `RateLimit-Policy` header value are all
//! prepared by `config::validate`. A reload builds a whole new `Policy` and swaps it in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method};
use ipnet::IpNet;

use crate::consumers::{Consumers, PlanId, Resolved};
use crate::limiter::algorithm::Algorithm;

/// Everything one proxy.toml says.
#[derive(Debug)]
pub struct Policy {
    pub server: Server,
    pub store: StoreSettings,
    pub upstreams: Vec<Arc<Upstream>>,
    pub routes: Vec<Route>,
    /// Every header some limit is keyed by: a `Connection` nomination cannot strip them.
    pub key_headers: Vec<HeaderName>,
    /// blake3 of the file's bytes, hex: shown by `check` and as a metric label.
    pub source_hash: String,
    /// `[consumers]` with its file, when configured.
    pub consumers: Option<Consumers>,
    /// `[jwt]`, when configured.
    pub jwt: Option<crate::jwt::Jwt>,
    /// `[telemetry]`, when configured: where traces go, and how many.
    pub telemetry: Option<crate::telemetry::Settings>,
    /// Other files the policy was read from (the consumers file), with the content hash that
    /// was loaded: the reload watcher reloads when one changes.
    pub also_read: Vec<(PathBuf, String)>,
}

/// The `[server]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// `admin_token_env`: the bearer token every `/v1/` admin endpoint needs (none: reads are
    /// open on the admin listener and `DELETE` is refused).
    pub admin_token: Option<Secret>,
    pub trusted_proxies: Vec<IpNet>,
    pub rate_limit_headers: HeaderStyle,
    pub ipv6_prefix: u8,
    pub max_body: Option<u64>,
    pub shutdown_grace: Duration,
    pub workers: Option<usize>,
    pub header_read_timeout: Duration,
    pub tls: Option<Tls>,
    /// One log line per request (target `tollgate::access`).
    pub access_log: bool,
    /// Reload when the config file's content changes (SIGHUP always reloads).
    pub watch_config: bool,
    /// A request body that sends nothing for this long is answered 408.
    pub body_idle_timeout: Duration,
    /// A client that accepts no response bytes for this long is disconnected.
    pub send_timeout: Duration,
    /// An upgraded (WebSocket) connection with no bytes either way for this long is closed.
    pub upgrade_idle_timeout: Duration,
    /// Open client connections at most; at the limit tollgate stops accepting until one closes.
    pub max_connections: usize,
    /// `Upgrade` protocols passed to upstreams (lower case); any other is stripped and the
    /// request served as plain HTTP/1.1, so no tunnel opens past the limiter.
    pub upgrades: Vec<String>,
    /// What `%2F` / `%5C` in a path mean for routing.
    pub escaped_slashes: EscapedSlashes,
}

/// `[server] escaped_slashes`: how routing reads `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Routes match them as `/` (as most backends read them); forwarded as sent.
    Decode,
    /// 400: the request is refused.
    Reject,
}

/// `[server.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which rate-limit headers responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    Ietf,
    Legacy,
    Both,
    None,
}

impl HeaderStyle {
    pub fn ietf(self) -> bool {
        matches!(self, HeaderStyle::Ietf | HeaderStyle::Both)
    }
    pub fn legacy(self) -> bool {
        matches!(self, HeaderStyle::Legacy | HeaderStyle::Both)
    }
}

/// The `[store]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    Memory { max_keys: usize, timeout: Duration },
    Redis(RedisSettings),
}

/// A value that must never be printed: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A Redis URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

/// Where Redis is: one server, or the seed nodes of a Redis Cluster. URLs may carry
/// credentials, so they are secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisNodes {
    Single(Secret),
    Cluster(Vec<Secret>),
}

/// `[store] backend = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub nodes: RedisNodes,
    /// ACL user and password given apart from the URL (`username`, `password_env`).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// For `rediss://`: a CA bundle to trust instead of the system roots, and a client
    /// certificate and key for mutual TLS.
    pub tls_ca: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub pool_size: u32,
    pub timeout: Duration,
    pub prefix: String,
}

impl StoreSettings {
    /// The budget for one decision.
    pub fn timeout(&self) -> Duration {
        match self {
            StoreSettings::Memory { timeout, .. } => *timeout,
            StoreSettings::Redis(r) => r.timeout,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            StoreSettings::Memory { .. } => "memory",
            StoreSettings::Redis(_) => "redis",
        }
    }
}

/// One `[upstreams.NAME]`: targets tried round robin.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// Position in `Policy::upstreams` (connection pools are looked up by it, not by name).
    pub index: usize,
    pub targets: Vec<Target>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Idle keep-alive connections kept per target at most.
    pub max_connections_per_target: usize,
    pub protocol: Protocol,
    /// For `https://` targets: what verifies them (system roots without `ca`).
    pub tls: UpstreamTls,
    pub health_check: Option<HealthCheck>,
    next: AtomicUsize,
}

/// What an upstream speaks (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// HTTP/2: ALPN `h2` over TLS, prior knowledge (h2c) over `http://`.
    H2,
    /// `https://`: whatever ALPN settles (`h2` or `http/1.1`); `http://`: HTTP/1.1.
    Auto,
}

/// `health_check = { path, interval, timeout, unhealthy_after, healthy_after }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// `tls = { ca, cert, key, server_name }` of an upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// Trusted roots instead of the system's.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (mTLS).
    pub client: Option<(PathBuf, PathBuf)>,
    /// The name sent as SNI and verified, instead of the target's host.
    pub server_name: Option<String>,
}

/// One upstream address, split once so that forwarding only assembles a URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl Upstream {
    // One argument per `[upstreams.NAME]` key: validation builds it in one place.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        index: usize,
        targets: Vec<Target>,
        connect_timeout: Duration,
        timeout: Duration,
        max_connections_per_target: usize,
        protocol: Protocol,
        tls: UpstreamTls,
        health_check: Option<HealthCheck>,
    ) -> Self {
        Upstream {
            name,
            index,
            targets,
            connect_timeout,
            timeout,
            max_connections_per_target,
            protocol,
            tls,
            health_check,
            next: AtomicUsize::new(0),
        }
    }

    /// The next target's index, round robin.
    pub fn pick(&self) -> usize {
        if self.targets.len() == 1 {
            return 0;
        }
        self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len()
    }
}

/// One `[[routes]]` entry.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub matcher: Matcher,
    pub upstream: Arc<Upstream>,
    pub limits: Vec<Limit>,
    /// The distinct key specifications of the limits; each limit points at one by index, so a
    /// request derives each identity once however many limits share it.
    pub keys: Vec<KeySpec>,
    pub on_store_error: OnStoreError,
    /// `RateLimit-Policy` for this route (enforced limits only), prepared at load.
    pub policy_header: Option<HeaderValue>,
    /// Per plan ([`PlanId`]): the limits as that plan overrides them, or `None` where the plan
    /// overrides none of this route's limits (then [`Route::limits`] apply).
    pub plans: Vec<Option<PlanLimits>>,
    /// A limit is keyed by consumer or has a `plans` table: `unknown = "reject"` applies.
    pub needs_consumer: bool,
    /// A limit is keyed by a JWT claim: the request's token is verified.
    pub needs_token: bool,
    /// `bypass`: forwarded, not counted.
    pub bypass: AccessList,
    /// `deny`: 403, not forwarded (checked before `bypass`).
    pub deny: AccessList,
    /// `rejection`: what a 429 of this route looks like instead of the default.
    pub rejection: Option<Rejection>,
}

/// A route's limits for one plan: plan overrides applied, `"unlimited"` ones left out.
#[derive(Debug)]
pub struct PlanLimits {
    pub limits: Vec<Limit>,
    pub policy_header: Option<HeaderValue>,
}

impl Route {
    /// Whether any limit of this route is enforced or measured.
    pub fn is_limited(&self) -> bool {
        !self.limits.is_empty()
    }

    /// The limits that apply to a request of `plan`, and their `RateLimit-Policy`.
    pub fn limits_for(&self, plan: Option<PlanId>) -> (&[Limit], Option<&HeaderValue>) {
        match plan.and_then(|p| self.plans.get(usize::from(p))) {
            Some(Some(own)) => (&own.limits, own.policy_header.as_ref()),
            _ => (&self.limits, self.policy_header.as_ref()),
        }
    }
}

/// What a route's access rules say about a request, before any limit: in this order, the deny
/// list, the bypass list, and `unknown = "reject"` on a consumer-keyed route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// `deny` names the client or its consumer: 403.
    Denied,
    /// `bypass` names them: forwarded, not counted.
    Bypassed,
    /// The route needs a known consumer and the request names none: 401.
    UnknownConsumer,
    /// On to the limits.
    Limited,
}

impl Route {
    /// The access rules for a request from `client` resolved to `who`.
    pub fn access(
        &self,
        client: std::net::IpAddr,
        who: &Resolved<'_>,
        consumers: Option<&Consumers>,
    ) -> Admission {
        if self.deny.matches(client, who) {
            Admission::Denied
        } else if self.bypass.matches(client, who) {
            Admission::Bypassed
        } else if self.needs_consumer
            && who.name.is_none()
            && consumers.is_some_and(|c| c.unknown == crate::consumers::Unknown::Reject)
        {
            Admission::UnknownConsumer
        } else {
            Admission::Limited
        }
    }
}

/// A route's `bypass` or `deny` list.
#[derive(Debug, Default)]
pub struct AccessList {
    pub ips: Vec<IpNet>,
    /// Consumer names.
    pub consumers: Vec<Arc<str>>,
}

impl AccessList {
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.consumers.is_empty()
    }

    /// Whether the client (IP as resolved through trusted proxies) or its consumer is listed.
    pub fn matches(&self, client: std::net::IpAddr, who: &Resolved<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let ip = client.to_canonical();
        self.ips.iter().any(|net| net.contains(&ip))
            || who
                .name
                .is_some_and(|name| self.consumers.iter().any(|c| &**c == name))
    }
}

/// A route's own 429: status, body, content type and extra headers.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub status: http::StatusCode,
    pub content_type: HeaderValue,
    pub body: bytes::Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// What a route does when the store fails or is slower than its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    Allow,
    Deny,
}

/// A compiled `match` table; every present condition must hold.
#[derive(Debug, Default)]
pub struct Matcher {
    /// Lower-case host name without port.
    pub host: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Where one part of a limit's key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    Ip,
    Header(HeaderName),
    Query(String),
    Global,
    /// The consumer's name (`by = "consumer"`); the client IP for anonymous requests.
    Consumer,
    /// A claim of the verified JWT (`by = "jwt:CLAIM"`): its slot, and its name.
    Jwt(usize, String),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Ip => f.write_str("ip"),
            KeySource::Header(name) => write!(f, "header:{name}"),
            KeySource::Query(name) => write!(f, "query:{name}"),
            KeySource::Global => f.write_str("global"),
            KeySource::Consumer => f.write_str("consumer"),
            KeySource::Jwt(_, claim) => write!(f, "jwt:{claim}"),
        }
    }
}

/// A limit's `by`: one source, or several for a composite key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySpec(pub Vec<KeySource>);

impl std::fmt::Display for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() == 1 {
            return write!(f, "{}", self.0[0]);
        }
        f.write_str("[")?;
        for (i, source) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{source}")?;
        }
        f.write_str("]")
    }
}

/// Enforce, or only measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Shadow,
}

/// One entry of a route's `limits`.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The policy name in headers: the route's name, or `route/N` when the route has several.
    pub name: String,
    pub algorithm: Algorithm,
    /// `rate` as written, for summaries.
    pub rate_text: String,
    /// Index into `Route::keys`.
    pub key: usize,
    pub cost: u64,
    pub mode: Mode,
    /// Stable identity of this limit's counters (see `config::validate::limit_id`): kept across
    /// reloads while route name, algorithm, key and window stay the same.
    pub id: u64,
    /// Approximate mode: units taken from the store at a time (0: exact).
    pub batch: u64,
    /// `q` and `w` of RateLimit-Policy.
    pub quota: u64,
    pub window_secs: u64,
    /// What the response settles (`count`, `cost_from`; a concurrency slot is released).
    pub settle: Settlement,
    /// `ban`, µs (0: none).
    pub ban: u64,
    /// `delay`, µs (0: never held).
    pub delay: u64,
}

/// What happens to a limit's reservation when the response comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Every response counts: the reservation stands.
    Stands,
    /// `count`: only the listed statuses count; the others are given back.
    Count(StatusSet),
    /// `cost_from`: settled to what the response reports.
    CostFrom(CostFrom),
    /// A concurrency slot: released when the response ends.
    Release,
}

/// Where a response reports its cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CostFrom {
    /// An integer in the upstream's response header.
    Header(HeaderName),
    /// A figure of the `usage` object an OpenAI-compatible body reports (JSON, or the last
    /// event of an event stream that carries one).
    OpenAi(crate::usage::Field),
}

impl std::fmt::Display for CostFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CostFrom::Header(name) => write!(f, "header {name}"),
            CostFrom::OpenAi(field) => write!(f, "usage.{} of the body", field.key()),
        }
    }
}

impl std::fmt::Display for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let classes = (1..=5u8)
            .filter(|c| self.classes & (1 << c) != 0)
            .map(|c| format!("{c}xx"));
        let codes = self.codes.iter().map(u16::to_string);
        let all: Vec<String> = classes.chain(codes).collect();
        f.write_str(&all.join(", "))
    }
}

/// `count = ["401", "4xx", ...]`: statuses and classes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusSet {
    /// Bit N: the class Nxx is listed.
    classes: u8,
    codes: Vec<u16>,
}

impl StatusSet {
    /// Adds `"401"` or `"4xx"`; false when the text is neither.
    pub fn add(&mut self, text: &str) -> bool {
        let b = text.as_bytes();
        match b {
            [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                self.classes |= 1 << (c - b'0');
                true
            }
            _ => match text.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) && text.len() == 3 => {
                    self.codes.push(code);
                    true
                }
                _ => false,
            },
        }
    }

    /// Whether a response with `status` counts.
    pub fn counts(&self, status: u16) -> bool {
        let class = status / 100;
        (class < 8 && self.classes & (1 << class) != 0) || self.codes.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redact("rediss://:secret@h"), "rediss://:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
