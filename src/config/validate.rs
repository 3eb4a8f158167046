//! Raw config → `Policy`. Checks everything once, collects every error (not just the first) with
//! the line and column of the offending value, and prepares what the hot path needs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Scheme, Uri};
use http::{HeaderValue, Method};
use ipnet::IpNet;

use super::raw::*;
use super::units::{self, Rate};
use super::{ConfigError, ConfigErrors};
use crate::consumers::Consumers;
use crate::limiter::algorithm::{Algorithm, Kind};
use crate::policy::*;
use crate::usage::Field;

/// Largest value any algorithm's arithmetic may reach, with room to add a timestamp: Lua's
/// doubles are exact integers up to 2^53.
const EXACT_LIMIT: u128 = 1 << 52;

/// Collects every error of one file, each at its line and column.
pub(super) struct Validator<'a> {
    file: &'a str,
    source: &'a str,
    pub(super) base_dir: &'a Path,
    pub(super) errors: Vec<ConfigError>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(file: &'a str, source: &'a str, base_dir: &'a Path) -> Validator<'a> {
        Validator {
            file,
            source,
            base_dir,
            errors: Vec::new(),
        }
    }

    pub(super) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_column(self.source, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        });
    }

    pub(super) fn duration(&mut self, value: &Option<S<String>>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => match units::parse_duration(v.get_ref()) {
                Ok(d) => d,
                Err(message) => {
                    self.error(v.span(), message);
                    default
                }
            },
        }
    }

    fn positive_duration(&mut self, value: &Option<S<String>>, default: Duration) -> Duration {
        let d = self.duration(value, default);
        if d.is_zero() {
            if let Some(v) = value {
                self.error(v.span(), "must be longer than zero");
            }
            return default;
        }
        d
    }

    pub(super) fn one_of<T: Copy>(
        &mut self,
        value: &Option<S<String>>,
        what: &str,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(v) = value else { return default };
        if let Some((_, t)) = choices.iter().find(|(name, _)| *name == v.get_ref()) {
            return *t;
        }
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        self.error(
            v.span(),
            format!(
                "unknown {what} \"{}\"; expected one of {}",
                v.get_ref(),
                names.join(", ")
            ),
        );
        default
    }
}

/// A route, consumer or plan name: letters, digits, `-`, `_`, `.`, at least one.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = source[line_start..offset].chars().count() + 1;
    (line, column)
}

/// Validates a parsed file. `file` is the name errors carry; `base_dir` resolves relative paths.
pub fn validate(
    raw: RawConfig,
    file: &str,
    source: &str,
    base_dir: &Path,
) -> Result<Policy, ConfigErrors> {
    let mut v = Validator::new(file, source, base_dir);
    let server = server(&mut v, &raw.server);
    let store = store(&mut v, raw.store.as_ref());
    let upstreams = upstreams(&mut v, &raw.upstreams);
    // The JWT claims the policy reads, collected as consumers and limits name them.
    let mut claims: Vec<String> = Vec::new();
    let mut jwt_claims = raw.jwt.is_some().then_some(&mut claims);
    let (consumers, mut also_read) = match raw.consumers.as_ref() {
        None => (None, Vec::new()),
        Some(c) => match super::consumers::consumers(&mut v, c, jwt_claims.as_deref_mut()) {
            Some((table, file)) => (Some(table), file.into_iter().collect()),
            None => (None, Vec::new()),
        },
    };
    let consumers_failed = raw.consumers.is_some() && consumers.is_none();
    let routes = routes(
        &mut v,
        &raw.routes,
        &upstreams,
        consumers.as_ref(),
        consumers_failed,
        jwt_claims,
    );
    let jwt = raw.jwt.as_ref().and_then(|j| {
        let (jwt, file) = super::jwt::jwt(&mut v, j, claims)?;
        also_read.extend(file);
        Some(jwt)
    });
    let telemetry = raw
        .telemetry
        .as_ref()
        .and_then(|t| super::telemetry::telemetry(&mut v, t));
    if v.errors.is_empty() {
        let mut key_headers: Vec<HeaderName> = Vec::new();
        if let Some(crate::consumers::KeyFrom::Header(name)) = consumers.as_ref().map(|c| &c.key) {
            key_headers.push(name.clone());
        }
        for source in routes
            .iter()
            .flat_map(|r| r.keys.iter().flat_map(|k| k.0.iter()))
        {
            if let KeySource::Header(name) = source
                && !key_headers.contains(name)
            {
                key_headers.push(name.clone());
            }
        }
        Ok(Policy {
            server,
            store,
            upstreams: upstreams.into_values().collect(),
            routes,
            key_headers,
            source_hash: super::source_hash(source.as_bytes()),
            consumers,
            jwt,
            telemetry,
            also_read,
        })
    } else {
        Err(ConfigErrors(v.errors))
    }
}

fn server(v: &mut Validator, raw: &S<RawServer>) -> Server {
    let s = raw.get_ref();
    let listen = match SocketAddr::from_str(s.listen.get_ref()) {
        Ok(a) => a,
        Err(_) => {
            v.error(
                s.listen.span(),
                format!(
                    "invalid listen address \"{}\"; expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
                    s.listen.get_ref()
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    let admin = s
        .admin
        .as_ref()
        .and_then(|a| match SocketAddr::from_str(a.get_ref()) {
            Ok(addr) => Some(addr),
            Err(_) => {
                v.error(
                    a.span(),
                    format!(
                        "invalid admin address \"{}\"; expected IP:PORT, e.g. \"127.0.0.1:9901\"",
                        a.get_ref()
                    ),
                );
                None
            }
        });
    let admin_token = match &s.admin_token_env {
        None => None,
        Some(name) => match std::env::var(name.get_ref()) {
            Ok(token) if !token.is_empty() => Some(Secret(token)),
            _ => {
                v.error(
                    name.span(),
                    format!(
                        "the environment variable {} (the admin API token) is not set or empty",
                        name.get_ref()
                    ),
                );
                None
            }
        },
    };
    let mut trusted_proxies = Vec::new();
    for entry in &s.trusted_proxies {
        let text = entry.get_ref().trim();
        let parsed = IpNet::from_str(text)
            .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
            .map(|net| net.trunc());
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => v.error(
                entry.span(),
                format!(
                    "invalid trusted proxy \"{text}\"; expected an IP address or a CIDR block such as \"10.0.0.0/8\" or \"fd00::/8\""
                ),
            ),
        }
    }
    let rate_limit_headers = v.one_of(
        &s.rate_limit_headers,
        "rate_limit_headers",
        &[
            ("ietf", HeaderStyle::Ietf),
            ("legacy", HeaderStyle::Legacy),
            ("both", HeaderStyle::Both),
            ("none", HeaderStyle::None),
        ],
        HeaderStyle::Ietf,
    );
    let ipv6_prefix = match &s.ipv6_prefix {
        None => 64,
        Some(p) if (1..=128).contains(p.get_ref()) => *p.get_ref() as u8,
        Some(p) => {
            v.error(
                p.span(),
                format!(
                    "invalid ipv6_prefix {}; expected a prefix length from 1 to 128",
                    p.get_ref()
                ),
            );
            64
        }
    };
    let max_body = s.max_body.as_ref().and_then(|m| {
        let parsed = match m.get_ref() {
            toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
            toml::Value::String(text) => units::parse_size(text),
            other => Err(format!(
                "invalid max_body {other}; expected a whole number of bytes or a size such as \"10MiB\""
            )),
        };
        parsed.map_err(|message| v.error(m.span(), message)).ok()
    });
    let shutdown_grace = v.duration(&s.shutdown_grace, Duration::from_secs(30));
    let header_read_timeout = v.positive_duration(&s.header_read_timeout, Duration::from_secs(10));
    let workers = match &s.workers {
        None => None,
        Some(w) if (1..=1024).contains(w.get_ref()) => Some(*w.get_ref() as usize),
        Some(w) => {
            v.error(
                w.span(),
                format!(
                    "invalid workers {}; expected a number of threads from 1 to 1024",
                    w.get_ref()
                ),
            );
            None
        }
    };
    let tls = s.tls.as_ref().map(|t| {
        let t = t.get_ref();
        // Named here, with their position: whether the pair is usable is checked when the
        // acceptor is built (startup, reload, `check`).
        for (what, value) in [("certificate", &t.cert), ("private key", &t.key)] {
            let path = v.base_dir.join(value.get_ref());
            if let Err(e) = std::fs::File::open(&path) {
                v.error(
                    value.span(),
                    format!("cannot read TLS {what} {}: {e}", path.display()),
                );
            }
        }
        Tls {
            cert: v.base_dir.join(t.cert.get_ref()),
            key: v.base_dir.join(t.key.get_ref()),
        }
    });
    let upgrades = match &s.upgrades {
        None => vec!["websocket".to_string()],
        Some(list) => {
            let mut names = Vec::new();
            for name in list.get_ref() {
                let text = name.get_ref().trim();
                if text.is_empty() || !text.bytes().all(is_token_byte) {
                    v.error(
                        name.span(),
                        format!(
                            "invalid upgrade protocol \"{text}\"; expected a protocol name such as \"websocket\""
                        ),
                    );
                } else {
                    names.push(text.to_ascii_lowercase());
                }
            }
            names
        }
    };
    let escaped_slashes = v.one_of(
        &s.escaped_slashes,
        "escaped_slashes",
        &[
            ("decode", EscapedSlashes::Decode),
            ("reject", EscapedSlashes::Reject),
        ],
        EscapedSlashes::Decode,
    );
    Server {
        listen,
        admin,
        admin_token,
        trusted_proxies,
        rate_limit_headers,
        ipv6_prefix,
        max_body,
        shutdown_grace,
        workers,
        header_read_timeout,
        tls,
        access_log: s.access_log.unwrap_or(false),
        watch_config: s.watch_config.unwrap_or(true),
        body_idle_timeout: v.positive_duration(&s.body_idle_timeout, Duration::from_secs(30)),
        send_timeout: v.positive_duration(&s.send_timeout, Duration::from_secs(60)),
        upgrade_idle_timeout: v
            .positive_duration(&s.upgrade_idle_timeout, Duration::from_secs(300)),
        max_connections: match &s.max_connections {
            None => 10_000,
            Some(m) if *m.get_ref() >= 1 => *m.get_ref() as usize,
            Some(m) => {
                v.error(
                    m.span(),
                    format!(
                        "invalid max_connections {}; expected at least 1",
                        m.get_ref()
                    ),
                );
                10_000
            }
        },
        upgrades,
        escaped_slashes,
    }
}

/// A `tchar` of RFC 9110 §5.6.2: what an `Upgrade` protocol name is made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)
}

fn store(v: &mut Validator, raw: Option<&S<RawStore>>) -> StoreSettings {
    let Some(raw) = raw else {
        return StoreSettings::Memory {
            max_keys: 1_000_000,
            timeout: Duration::from_millis(50),
        };
    };
    let s = raw.get_ref();
    #[derive(Clone, Copy, PartialEq)]
    enum Backend {
        Memory,
        Redis,
    }
    let backend = v.one_of(
        &s.backend,
        "store backend",
        &[("memory", Backend::Memory), ("redis", Backend::Redis)],
        Backend::Memory,
    );
    let timeout = v.positive_duration(&s.timeout, Duration::from_millis(50));
    match backend {
        Backend::Memory => {
            let redis_only = [
                ("url", s.url.as_ref().map(|x| x.span())),
                ("url_env", s.url_env.as_ref().map(|x| x.span())),
                ("cluster", s.cluster.as_ref().map(|x| x.span())),
                ("username", s.username.as_ref().map(|x| x.span())),
                ("password_env", s.password_env.as_ref().map(|x| x.span())),
                ("tls_ca", s.tls_ca.as_ref().map(|x| x.span())),
                ("tls_cert", s.tls_cert.as_ref().map(|x| x.span())),
                ("tls_key", s.tls_key.as_ref().map(|x| x.span())),
                ("pool_size", s.pool_size.as_ref().map(|x| x.span())),
                ("prefix", s.prefix.as_ref().map(|x| x.span())),
            ];
            for (name, span) in redis_only {
                if let Some(span) = span {
                    v.error(
                        span,
                        format!("`{name}` applies only to backend = \"redis\""),
                    );
                }
            }
            let max_keys = match &s.max_keys {
                None => 1_000_000,
                Some(m) if *m.get_ref() >= 1 => *m.get_ref() as usize,
                Some(m) => {
                    v.error(m.span(), "max_keys must be at least 1");
                    1_000_000
                }
            };
            StoreSettings::Memory { max_keys, timeout }
        }
        Backend::Redis => StoreSettings::Redis(redis_settings(v, raw, timeout)),
    }
}

/// An environment variable's value, or an error at the key naming it.
fn env_value(v: &mut Validator, name: &S<String>) -> Option<String> {
    match std::env::var(name.get_ref()) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            v.error(
                name.span(),
                format!("environment variable {} is not set", name.get_ref()),
            );
            None
        }
    }
}

/// Checks one Redis URL; the error never repeats the URL (it may hold a password).
fn redis_url(v: &mut Validator, span: Range<usize>, text: &str) -> Secret {
    let text = text.trim();
    if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
        v.error(
            span,
            "invalid Redis url; expected redis://[user:password@]host:port[/db] or rediss://...",
        );
    } else if let Err(e) = redis::IntoConnectionInfo::into_connection_info(text) {
        // The message may quote the URL: never repeat a password.
        let message = e.to_string().replace(text, &crate::policy::redact(text));
        v.error(span, format!("invalid Redis url: {message}"));
    }
    Secret(text.to_string())
}

fn redis_settings(v: &mut Validator, raw: &S<RawStore>, timeout: Duration) -> RedisSettings {
    let s = raw.get_ref();
    if let Some(m) = &s.max_keys {
        v.error(m.span(), "`max_keys` applies only to backend = \"memory\"");
    }
    let given = [s.url.is_some(), s.url_env.is_some(), s.cluster.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given != 1 {
        v.error(
            raw.span(),
            "backend = \"redis\" needs exactly one of `url` (e.g. url = \"redis://127.0.0.1:6379/0\"), `url_env` (the name of an environment variable holding the URL) or `cluster` (a list of node URLs)",
        );
    }
    let nodes = if let Some(u) = &s.url {
        RedisNodes::Single(redis_url(v, u.span(), u.get_ref()))
    } else if let Some(name) = &s.url_env {
        let url = env_value(v, name).unwrap_or_default();
        let secret = if url.is_empty() {
            Secret(url)
        } else {
            redis_url(v, name.span(), &url)
        };
        RedisNodes::Single(secret)
    } else if let Some(list) = &s.cluster {
        if list.get_ref().is_empty() {
            v.error(list.span(), "`cluster` needs at least one node URL");
        }
        RedisNodes::Cluster(
            list.get_ref()
                .iter()
                .map(|u| redis_url(v, u.span(), u.get_ref()))
                .collect(),
        )
    } else {
        RedisNodes::Single(Secret(String::new()))
    };
    let password = s
        .password_env
        .as_ref()
        .and_then(|name| env_value(v, name))
        .map(Secret);
    let tls_urls = match &nodes {
        RedisNodes::Single(u) => u.0.starts_with("rediss://"),
        RedisNodes::Cluster(us) => us.iter().any(|u| u.0.starts_with("rediss://")),
    };
    for (name, value) in [
        ("tls_ca", &s.tls_ca),
        ("tls_cert", &s.tls_cert),
        ("tls_key", &s.tls_key),
    ] {
        if let Some(value) = value
            && !tls_urls
        {
            v.error(value.span(), format!("`{name}` needs rediss:// URLs (TLS)"));
        }
    }
    let tls_client = match (&s.tls_cert, &s.tls_key) {
        (Some(c), Some(k)) => Some((v.base_dir.join(c.get_ref()), v.base_dir.join(k.get_ref()))),
        (Some(one), None) | (None, Some(one)) => {
            v.error(one.span(), "`tls_cert` and `tls_key` go together");
            None
        }
        (None, None) => None,
    };
    let pool_size = match &s.pool_size {
        None => 4,
        Some(p) if (1..=1024).contains(p.get_ref()) => *p.get_ref() as u32,
        Some(p) => {
            v.error(
                p.span(),
                format!(
                    "invalid pool_size {}; expected 1 to 1024 connections",
                    p.get_ref()
                ),
            );
            4
        }
    };
    let prefix = match &s.prefix {
        None => "tollgate".to_string(),
        Some(p) => {
            let text = p.get_ref();
            if text.is_empty()
                || text.contains(['{', '}'])
                || text.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                v.error(
                    p.span(),
                    format!(
                        "invalid prefix \"{text}\"; expected a non-empty name without spaces or braces (braces would change the cluster hash tag)"
                    ),
                );
            }
            text.clone()
        }
    };
    RedisSettings {
        nodes,
        username: s.username.as_ref().map(|u| u.get_ref().clone()),
        password,
        tls_ca: s.tls_ca.as_ref().map(|c| v.base_dir.join(c.get_ref())),
        tls_client,
        pool_size,
        timeout,
        prefix,
    }
}

fn upstreams(
    v: &mut Validator,
    raw: &BTreeMap<String, S<RawUpstream>>,
) -> BTreeMap<String, Arc<Upstream>> {
    let mut out = BTreeMap::new();
    for (name, up) in raw {
        let u = up.get_ref();
        let mut targets = Vec::new();
        if u.targets.get_ref().is_empty() {
            v.error(
                u.targets.span(),
                format!("upstream \"{name}\" has no targets; expected at least one, e.g. targets = [\"http://127.0.0.1:3000\"]"),
            );
        }
        for t in u.targets.get_ref() {
            match parse_target(t.get_ref()) {
                Ok(target) => targets.push(target),
                Err(message) => v.error(t.span(), message),
            }
        }
        let connect_timeout = v.positive_duration(&u.connect_timeout, Duration::from_secs(2));
        let timeout = v.positive_duration(&u.timeout, Duration::from_secs(30));
        let max_connections_per_target = match &u.max_connections_per_target {
            None => 256,
            Some(m) if (1..=65_536).contains(m.get_ref()) => *m.get_ref() as usize,
            Some(m) => {
                v.error(
                    m.span(),
                    format!(
                        "invalid max_connections_per_target {}; expected 1 to 65536",
                        m.get_ref()
                    ),
                );
                256
            }
        };
        let protocol = v.one_of(
            &u.protocol,
            "protocol",
            &[
                ("http1", Protocol::Http1),
                ("h2", Protocol::H2),
                ("auto", Protocol::Auto),
            ],
            Protocol::Auto,
        );
        let tls = match &u.tls {
            None => UpstreamTls::default(),
            Some(t) => {
                if !targets.iter().any(|t| t.scheme == Scheme::HTTPS) {
                    v.error(
                        t.span(),
                        format!("`tls` of upstream \"{name}\" applies to https:// targets, and it has none"),
                    );
                }
                upstream_tls(v, t.get_ref())
            }
        };
        out.insert(
            name.clone(),
            Arc::new(Upstream::new(
                name.clone(),
                out.len(),
                targets,
                connect_timeout,
                timeout,
                max_connections_per_target,
                protocol,
                tls,
                u.health_check
                    .as_ref()
                    .and_then(|h| health_check(v, h.get_ref())),
            )),
        );
    }
    out
}

/// `health_check = { path, interval, timeout, unhealthy_after, healthy_after }`.
fn health_check(v: &mut Validator, h: &RawHealthCheck) -> Option<HealthCheck> {
    let path = match http::uri::PathAndQuery::from_str(h.path.get_ref()) {
        Ok(p) if h.path.get_ref().starts_with('/') => Some(p),
        _ => {
            v.error(
                h.path.span(),
                format!("invalid health_check path \"{}\"; expected an absolute path such as \"/healthz\"", h.path.get_ref()),
            );
            None
        }
    };
    let interval = v.positive_duration(&h.interval, Duration::from_secs(5));
    let timeout = v.positive_duration(&h.timeout, Duration::from_secs(1));
    if timeout > interval
        && let Some(t) = &h.timeout
    {
        v.error(t.span(), "health_check timeout is longer than its interval");
    }
    let mut count = |value: &Option<S<i64>>, what: &str, default: u32| match value {
        None => default,
        Some(n) if (1..=100).contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => {
            v.error(
                n.span(),
                format!(
                    "invalid health_check {what} {}; expected 1 to 100",
                    n.get_ref()
                ),
            );
            default
        }
    };
    let unhealthy_after = count(&h.unhealthy_after, "unhealthy_after", 3);
    let healthy_after = count(&h.healthy_after, "healthy_after", 2);
    Some(HealthCheck {
        path: path?,
        interval,
        timeout,
        unhealthy_after,
        healthy_after,
    })
}

/// `tls = { ca, cert, key, server_name }`: paths resolved against the config's directory
/// (read when the config is put into service, so a bad file refuses a reload).
fn upstream_tls(v: &mut Validator, t: &RawUpstreamTls) -> UpstreamTls {
    let client = match (&t.cert, &t.key) {
        (Some(c), Some(k)) => Some((v.base_dir.join(c.get_ref()), v.base_dir.join(k.get_ref()))),
        (Some(c), None) => {
            v.error(
                c.span(),
                "`tls.cert` needs `tls.key` (the client certificate's private key)",
            );
            None
        }
        (None, Some(k)) => {
            v.error(
                k.span(),
                "`tls.key` needs `tls.cert` (the client certificate chain)",
            );
            None
        }
        (None, None) => None,
    };
    let server_name = t.server_name.as_ref().and_then(|n| {
        match rustls::pki_types::ServerName::try_from(n.get_ref().as_str()) {
            Ok(_) => Some(n.get_ref().clone()),
            Err(_) => {
                v.error(
                    n.span(),
                    format!(
                        "invalid tls.server_name \"{}\"; expected a DNS name or an IP address",
                        n.get_ref()
                    ),
                );
                None
            }
        }
    });
    UpstreamTls {
        ca: t.ca.as_ref().map(|c| v.base_dir.join(c.get_ref())),
        client,
        server_name,
    }
}

pub(super) fn parse_target(text: &str) -> Result<Target, String> {
    let bad = || {
        format!(
            "invalid target \"{text}\"; expected http://HOST:PORT or https://HOST:PORT, e.g. \"http://127.0.0.1:3000\""
        )
    };
    let uri = Uri::from_str(text.trim()).map_err(|_| bad())?;
    let scheme = uri.scheme().ok_or_else(bad)?.clone();
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!(
            "invalid target \"{text}\": expected an http:// or https:// URL"
        ));
    }
    let authority = uri.authority().ok_or_else(bad)?.clone();
    if authority.as_str().contains('@') {
        return Err(format!(
            "invalid target \"{text}\": credentials in the URL are not supported"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "invalid target \"{text}\": a target is scheme, host and port only; requests keep their own path"
        ));
    }
    Ok(Target { scheme, authority })
}

fn routes(
    v: &mut Validator,
    raw: &[S<RawRoute>],
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    consumers: Option<&Consumers>,
    consumers_failed: bool,
    mut claims: Option<&mut Vec<String>>,
) -> Vec<Route> {
    let mut seen: HashMap<String, ()> = HashMap::new();
    let mut out = Vec::new();
    for r in raw {
        let r = r.get_ref();
        let name = r.name.get_ref().clone();
        if !valid_name(&name) {
            v.error(
                r.name.span(),
                format!("invalid route name \"{name}\"; expected letters, digits, '-', '_' or '.'"),
            );
        } else if seen.insert(name.clone(), ()).is_some() {
            v.error(
                r.name.span(),
                format!("duplicate route name \"{name}\"; route names must be unique"),
            );
        }
        let upstream = match upstreams.get(r.upstream.get_ref()) {
            Some(u) => u.clone(),
            None => {
                let defined: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                let list = if defined.is_empty() {
                    "none are defined; add an [upstreams.NAME] table".to_string()
                } else {
                    format!("defined upstreams: {}", defined.join(", "))
                };
                v.error(
                    r.upstream.span(),
                    format!("unknown upstream \"{}\"; {list}", r.upstream.get_ref()),
                );
                Arc::new(Upstream::new(
                    String::new(),
                    usize::MAX,
                    Vec::new(),
                    Duration::ZERO,
                    Duration::ZERO,
                    1,
                    Protocol::Auto,
                    UpstreamTls::default(),
                    None,
                ))
            }
        };
        let matcher = r
            .matcher
            .as_ref()
            .map(|m| matcher(v, m.get_ref()))
            .unwrap_or_default();
        let on_store_error = v.one_of(
            &r.on_store_error,
            "on_store_error",
            &[("allow", OnStoreError::Allow), ("deny", OnStoreError::Deny)],
            OnStoreError::Allow,
        );
        let mut keys: Vec<KeySpec> = Vec::new();
        let mut limits = Vec::new();
        let mut rules: Vec<Vec<PlanRule>> = Vec::new();
        let mut identities: HashMap<String, u32> = HashMap::new();
        let several = r.limits.len() > 1;
        for (index, l) in r.limits.iter().enumerate() {
            let policy_name = if several {
                format!("{name}/{index}")
            } else {
                name.clone()
            };
            let context = LimitContext {
                route_name: &name,
                upstream_timeout: upstream.timeout,
                consumers,
                consumers_failed,
            };
            if let Some((limit, plan_rules)) = limit(
                v,
                l,
                policy_name,
                &mut keys,
                &mut identities,
                &context,
                claims.as_deref_mut(),
            ) {
                limits.push(limit);
                rules.push(plan_rules);
            }
        }
        let plans = plan_limits(&limits, &rules, consumers.map_or(0, |c| c.plans.len()));
        let needs_consumer = keys.iter().any(|k| k.0.contains(&KeySource::Consumer))
            || r.limits.iter().any(|l| l.get_ref().plans.is_some());
        let needs_token = keys
            .iter()
            .any(|k| k.0.iter().any(|s| matches!(s, KeySource::Jwt(..))));
        let bypass = access_list(v, r.bypass.as_ref(), "bypass", consumers);
        let deny = access_list(v, r.deny.as_ref(), "deny", consumers);
        let rejection = r.rejection.as_ref().and_then(|j| rejection(v, j));
        // Approximate mode is per route: a route whose every decision goes to the store anyway
        // would gain nothing from leasing some of its limits.
        let batched = r
            .limits
            .iter()
            .filter(|l| l.get_ref().batch.is_some())
            .count();
        if batched > 0 && batched < r.limits.len() {
            let first = r
                .limits
                .iter()
                .find(|l| l.get_ref().batch.is_none())
                .expect("one without batch");
            v.error(
                first.span(),
                "`batch` must be set on every limit of the route or on none (approximate mode is per route)",
            );
        }
        let policy_header = policy_header(&limits);
        out.push(Route {
            name: Arc::from(name.as_str()),
            matcher,
            upstream,
            limits,
            keys,
            on_store_error,
            policy_header,
            plans,
            needs_consumer,
            needs_token,
            bypass,
            deny,
            rejection,
        });
    }
    out
}

/// Each plan's view of a route's limits; `None` for a plan that overrides none of them.
fn plan_limits(limits: &[Limit], rules: &[Vec<PlanRule>], plans: usize) -> Vec<Option<PlanLimits>> {
    (0..plans)
        .map(|plan| {
            if rules
                .iter()
                .all(|r| matches!(r.get(plan), None | Some(PlanRule::Same)))
            {
                return None;
            }
            let own: Vec<Limit> = limits
                .iter()
                .zip(rules)
                .filter_map(|(limit, r)| match r.get(plan) {
                    None | Some(PlanRule::Same) => Some(limit.clone()),
                    Some(PlanRule::Unlimited) => None,
                    Some(PlanRule::Own(l)) => Some((**l).clone()),
                })
                .collect();
            Some(PlanLimits {
                policy_header: policy_header(&own),
                limits: own,
            })
        })
        .collect()
}

/// A route's `bypass` / `deny`: IP networks (or single addresses) and consumer names.
fn access_list(
    v: &mut Validator,
    raw: Option<&S<RawAccess>>,
    what: &str,
    consumers: Option<&Consumers>,
) -> AccessList {
    let mut out = AccessList::default();
    let Some(raw) = raw else { return out };
    let a = raw.get_ref();
    for ip in &a.ips {
        let text = ip.get_ref().trim();
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match net {
            Ok(net) => out.ips.push(net),
            Err(_) => v.error(
                ip.span(),
                format!("invalid address \"{text}\" in `{what}`; expected an IP or a CIDR such as \"10.0.0.0/8\""),
            ),
        }
    }
    for c in &a.consumers {
        let name = c.get_ref();
        // JWT consumers are named by their tokens: any name may come.
        let jwt = consumers.is_some_and(|t| matches!(t.key, crate::consumers::KeyFrom::Jwt(..)));
        match consumers.map(|t| t.by_name.contains_key(name.as_str()) || jwt) {
            Some(true) => out.consumers.push(name.as_str().into()),
            Some(false) => v.error(
                c.span(),
                format!("unknown consumer \"{name}\" in `{what}`; it is not in the consumers file"),
            ),
            None => v.error(
                c.span(),
                format!("`{what}` names consumers, but there is no [consumers] table"),
            ),
        }
    }
    out
}

/// A route's `rejection`: its own status (400–599), body, content type and headers for 429s.
fn rejection(v: &mut Validator, raw: &S<RawRejection>) -> Option<Rejection> {
    let j = raw.get_ref();
    let status = match &j.status {
        None => http::StatusCode::TOO_MANY_REQUESTS,
        Some(s) => match u16::try_from(*s.get_ref())
            .ok()
            .filter(|n| (400..=599).contains(n))
            .and_then(|n| http::StatusCode::from_u16(n).ok())
        {
            Some(code) => code,
            None => {
                v.error(
                    s.span(),
                    format!(
                        "invalid rejection status {}; expected 400 to 599",
                        s.get_ref()
                    ),
                );
                return None;
            }
        },
    };
    let content_type = match &j.content_type {
        None => HeaderValue::from_static("text/plain; charset=utf-8"),
        Some(t) => match HeaderValue::from_str(t.get_ref()) {
            Ok(h) => h,
            Err(_) => {
                v.error(t.span(), "invalid content_type; expected a header value");
                return None;
            }
        },
    };
    let mut headers = Vec::new();
    for (name, value) in &j.headers {
        let Ok(header) = HeaderName::from_str(name) else {
            v.error(
                value.span(),
                format!("invalid header name \"{name}\" in `rejection`"),
            );
            continue;
        };
        let reserved = [
            "content-type",
            "content-length",
            "retry-after",
            "transfer-encoding",
            "connection",
        ];
        if reserved.contains(&header.as_str()) || header.as_str().starts_with("ratelimit") {
            v.error(
                value.span(),
                format!("`rejection` cannot set {header}: tollgate sets it"),
            );
            continue;
        }
        match HeaderValue::from_str(value.get_ref()) {
            Ok(h) => headers.push((header, h)),
            Err(_) => v.error(value.span(), format!("invalid value for header {name}")),
        }
    }
    Some(Rejection {
        status,
        content_type,
        body: bytes::Bytes::from(j.body.clone().map(|b| b.into_inner()).unwrap_or_default()),
        headers,
    })
}

fn matcher(v: &mut Validator, m: &RawMatch) -> Matcher {
    let mut out = Matcher::default();
    if let Some(h) = &m.host {
        let host = h.get_ref().trim().to_ascii_lowercase();
        let has_port = if host.starts_with('[') {
            host.contains("]:")
        } else {
            host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err()
        };
        if host.is_empty() || has_port || host.contains('/') {
            v.error(
                h.span(),
                format!(
                    "invalid host \"{}\"; expected a host name without port or path, e.g. \"api.example.com\"",
                    h.get_ref()
                ),
            );
        }
        out.host = Some(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        );
    }
    for (field, value) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(p) = value {
            let text = p.get_ref();
            if !text.starts_with('/') || text.contains(['?', '#']) {
                v.error(
                    p.span(),
                    format!("invalid {field} \"{text}\"; expected a path starting with '/', without query"),
                );
            }
            let normalized = crate::route::normalize_path(text).into_owned();
            if field == "path" {
                out.path = Some(normalized);
            } else {
                out.path_prefix = Some(normalized);
            }
        }
    }
    if let Some(methods) = &m.methods {
        for method in methods {
            let upper = method.get_ref().to_ascii_uppercase();
            match Method::from_bytes(upper.as_bytes()) {
                Ok(m) if !upper.is_empty() => out.methods.push(m),
                _ => v.error(
                    method.span(),
                    format!(
                        "invalid method \"{}\"; expected a token such as GET or POST",
                        method.get_ref()
                    ),
                ),
            }
        }
    }
    if let Some(headers) = &m.headers {
        for (name, value) in headers {
            let Ok(header) = HeaderName::from_str(name) else {
                v.error(value.span(), format!("invalid header name \"{name}\""));
                continue;
            };
            match HeaderValue::from_str(value.get_ref()) {
                Ok(hv) => out.headers.push((header, hv)),
                Err(_) => v.error(
                    value.span(),
                    format!("invalid value for header \"{name}\": only visible ASCII and spaces are allowed"),
                ),
            }
        }
    }
    out
}

/// A limit's `by`. `claims` collects the JWT claims the policy reads (None: no [jwt] table).
fn key_spec(
    v: &mut Validator,
    by: Option<&S<toml::Value>>,
    consumers: bool,
    claims: Option<&mut Vec<String>>,
) -> Option<KeySpec> {
    let mut claims = claims;
    let Some(by) = by else {
        return Some(KeySpec(vec![KeySource::Ip]));
    };
    let help = "expected \"ip\", \"header:NAME\", \"query:NAME\", \"global\", \"consumer\", \"jwt:CLAIM\", or a list of these";
    let items: Vec<&str> = match by.get_ref() {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(a) if !a.is_empty() => {
            let mut items = Vec::new();
            for item in a {
                match item.as_str() {
                    Some(s) => items.push(s),
                    None => {
                        v.error(by.span(), format!("invalid `by` entry {item}; {help}"));
                        return None;
                    }
                }
            }
            items
        }
        other => {
            v.error(by.span(), format!("invalid `by` {other}; {help}"));
            return None;
        }
    };
    let mut sources = Vec::new();
    for item in items {
        let source = match item.split_once(':') {
            None if item == "ip" => KeySource::Ip,
            None if item == "global" => KeySource::Global,
            None if item == "consumer" => {
                if !consumers {
                    v.error(
                        by.span(),
                        "`by = \"consumer\"` needs a [consumers] table (where requests name their consumer)",
                    );
                    return None;
                }
                KeySource::Consumer
            }
            Some(("header", name)) => match HeaderName::from_str(name.trim()) {
                Ok(h) => KeySource::Header(h),
                Err(_) => {
                    v.error(by.span(), format!("invalid header name \"{name}\" in `by`"));
                    return None;
                }
            },
            Some(("query", name)) if !name.trim().is_empty() => {
                KeySource::Query(name.trim().to_string())
            }
            Some(("jwt", claim)) if !claim.trim().is_empty() => {
                let Some(list) = claims.as_deref_mut() else {
                    v.error(
                        by.span(),
                        format!("`by = \"{item}\"` needs a [jwt] table (how tokens are verified)"),
                    );
                    return None;
                };
                KeySource::Jwt(claim_slot(list, claim.trim()), claim.trim().to_string())
            }
            _ => {
                v.error(by.span(), format!("invalid `by` \"{item}\"; {help}"));
                return None;
            }
        };
        if sources.contains(&source) {
            v.error(by.span(), format!("`by` names \"{item}\" twice"));
            return None;
        }
        sources.push(source);
    }
    if sources.len() > 1 && sources.contains(&KeySource::Global) {
        v.error(
            by.span(),
            "\"global\" is one counter for the whole route; it cannot be part of a composite key",
        );
        return None;
    }
    Some(KeySpec(sources))
}

/// The slot of JWT claim `name`, added to the claims the policy reads if new.
pub(super) fn claim_slot(claims: &mut Vec<String>, name: &str) -> usize {
    match claims.iter().position(|c| c == name) {
        Some(i) => i,
        None => {
            claims.push(name.to_string());
            claims.len() - 1
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// What a rate and burst make of one algorithm: its parameters, the quota and window of
/// `RateLimit-Policy`, and the approximate-mode batch (which must fit the quota).
struct Shape {
    algorithm: Algorithm,
    quota: u64,
    window_secs: u64,
    period_us: u64,
    batch: u64,
}

/// Validates `rate` (+ `burst`) for `kind`, with the limit's `cost` and `batch`.
fn shape(
    v: &mut Validator,
    kind: Kind,
    rate: &S<String>,
    burst: Option<&S<i64>>,
    (cost, cost_span): (u64, Range<usize>),
    batch: Option<&S<i64>>,
) -> Option<Shape> {
    let parsed = match units::parse_rate(rate.get_ref()) {
        Ok(r) => Some(r),
        Err(message) => {
            v.error(rate.span(), message);
            None
        }
    };
    let algorithm_name = kind.name();
    let takes_burst = kind.takes_burst();
    if let (Some(b), false) = (burst, takes_burst) {
        let with_burst: Vec<&str> = Kind::ALL
            .into_iter()
            .filter(|k| k.takes_burst())
            .map(Kind::name)
            .collect();
        v.error(
            b.span(),
            format!("`burst` is not taken by {algorithm_name}; only {} have a burst (the window algorithms admit `rate` per window)", with_burst.join(" and ")),
        );
    }
    let burst = match burst {
        Some(b) if takes_burst && *b.get_ref() < 1 => {
            v.error(
                b.span(),
                format!(
                    "invalid burst {}; expected a whole number of at least 1",
                    b.get_ref()
                ),
            );
            return None;
        }
        Some(b) if takes_burst && *b.get_ref() as u64 > units::MAX_COUNT => {
            v.error(
                b.span(),
                format!(
                    "invalid burst {}; at most {}",
                    b.get_ref(),
                    units::MAX_COUNT
                ),
            );
            return None;
        }
        Some(b) if takes_burst => Some(*b.get_ref() as u64),
        _ => None,
    };
    let Rate { count, period } = parsed?;
    let period_us = period.as_micros() as u64;
    let quota = burst.unwrap_or(count);
    let rate_span = rate.span();
    let too_large = |what: &str| {
        format!(
            "rate \"{}\" with {what} is too large for exact arithmetic; use a smaller count or a shorter period",
            rate.get_ref()
        )
    };
    let algorithm = match kind {
        Kind::FixedWindow => Algorithm::FixedWindow {
            quota: count,
            window: period_us,
        },
        Kind::SlidingWindow => Algorithm::SlidingWindow {
            quota: count,
            window: period_us,
        },
        Kind::SlidingLog => {
            if count > period_us {
                v.error(rate_span, "sliding_log counts at most one request per microsecond of its window; use a longer window or another algorithm");
                return None;
            }
            Algorithm::SlidingLog {
                quota: count,
                window: period_us,
            }
        }
        Kind::TokenBucket => {
            let g = gcd(count, period_us);
            let (refill, unit) = (count / g, period_us / g);
            if quota as u128 * unit as u128 >= EXACT_LIMIT {
                v.error(rate_span, too_large(&format!("burst {quota}")));
                return None;
            }
            Algorithm::TokenBucket {
                burst: quota,
                refill,
                unit,
            }
        }
        Kind::Gcra => {
            let interval = period_us / count;
            if interval == 0 {
                v.error(rate_span, "gcra spaces requests at least one microsecond apart; this rate is faster than that: use token_bucket");
                return None;
            }
            if quota as u128 * interval as u128 >= EXACT_LIMIT {
                v.error(rate_span, too_large(&format!("burst {quota}")));
                return None;
            }
            Algorithm::Gcra {
                burst: quota,
                interval,
            }
        }
        Kind::Concurrency => {
            v.error(rate_span, "concurrency takes `max`, not `rate`");
            return None;
        }
    };
    if cost > quota {
        let what = if takes_burst { "burst" } else { "rate" };
        v.error(
            cost_span,
            format!("cost {cost} is more than the limit ever grants at once ({what} {quota}): every request would be rejected"),
        );
        return None;
    }
    let batch = match batch {
        None => 0,
        Some(b)
            if *b.get_ref() >= 1 && *b.get_ref() as u64 <= quota && *b.get_ref() as u64 >= cost =>
        {
            *b.get_ref() as u64
        }
        Some(b) => {
            v.error(
                b.span(),
                format!(
                    "invalid batch {}; expected from the cost ({cost}) up to the quota ({quota})",
                    b.get_ref()
                ),
            );
            return None;
        }
    };
    let window_secs = if takes_burst {
        (quota as u128 * period_us as u128)
            .div_ceil(count as u128 * 1_000_000)
            .max(1) as u64
    } else {
        period_us.div_ceil(1_000_000).max(1)
    };
    Some(Shape {
        algorithm,
        quota,
        window_secs,
        period_us,
        batch,
    })
}

/// What one plan makes of a limit.
#[derive(Debug)]
pub(super) enum PlanRule {
    /// The plan is not listed: the limit's own rate.
    Same,
    /// `"unlimited"`: the limit does not apply.
    Unlimited,
    /// `{ rate, burst }`.
    Own(Box<Limit>),
}

/// What a limit's validation needs to know of its route and of `[consumers]`.
struct LimitContext<'a> {
    route_name: &'a str,
    /// The route's upstream `timeout`: a concurrency slot lives that long plus 10 s.
    upstream_timeout: Duration,
    consumers: Option<&'a Consumers>,
    /// `[consumers]` is there but invalid (its errors are reported already).
    consumers_failed: bool,
}

/// One limit, with its per-plan rules (one per `[consumers] plans` entry).
fn limit(
    v: &mut Validator,
    raw: &S<RawLimit>,
    policy_name: String,
    keys: &mut Vec<KeySpec>,
    identities: &mut HashMap<String, u32>,
    context: &LimitContext,
    claims: Option<&mut Vec<String>>,
) -> Option<(Limit, Vec<PlanRule>)> {
    let l = raw.get_ref();
    let consumers = context.consumers;
    let spec = key_spec(
        v,
        l.by.as_ref(),
        consumers.is_some() || context.consumers_failed,
        claims,
    );
    let Some(kind) = Kind::from_name(l.algorithm.get_ref()) else {
        v.error(
            l.algorithm.span(),
            format!(
                "unknown algorithm \"{}\"; expected one of {}",
                l.algorithm.get_ref(),
                Kind::names()
            ),
        );
        return None;
    };
    let mode = v.one_of(
        &l.mode,
        "mode",
        &[("enforce", Mode::Enforce), ("shadow", Mode::Shadow)],
        Mode::Enforce,
    );
    let cost = match &l.cost {
        None => 1,
        Some(c) if *c.get_ref() >= 1 => *c.get_ref() as u64,
        Some(c) => {
            v.error(
                c.span(),
                format!(
                    "invalid cost {}; expected a whole number of at least 1",
                    c.get_ref()
                ),
            );
            1
        }
    };
    let reserve = match &l.reserve {
        None => None,
        Some(r) if l.cost_from.is_none() => {
            v.error(
                r.span(),
                "`reserve` goes with `cost_from`: it is what admission takes before the response reports the cost",
            );
            None
        }
        Some(r) if *r.get_ref() >= 1 => Some(*r.get_ref() as u64),
        Some(r) => {
            v.error(
                r.span(),
                format!(
                    "invalid reserve {}; expected a whole number of at least 1",
                    r.get_ref()
                ),
            );
            None
        }
    };
    // What admission takes: `reserve` when the response settles the cost, else `cost`.
    let cost = reserve.unwrap_or(cost);
    let cost_at = match &l.reserve {
        Some(r) if reserve.is_some() => (cost, r.span()),
        _ => (cost, l.cost.as_ref().map_or(raw.span(), |c| c.span())),
    };
    let base = if kind == Kind::Concurrency {
        concurrency_shape(v, raw, context.upstream_timeout)
    } else {
        match &l.rate {
            Some(rate) => shape(
                v,
                kind,
                rate,
                l.burst.as_ref(),
                cost_at.clone(),
                l.batch.as_ref(),
            ),
            None => {
                v.error(
                    l.algorithm.span(),
                    format!("a {} limit needs `rate` (\"N/unit\")", kind.name()),
                );
                None
            }
        }
    };
    let settle = settlement(v, l, kind);
    let ban = limit_duration(v, &l.ban, "ban");
    let delay = limit_duration(v, &l.delay, "delay");
    if let (Some(d), false) = (&l.delay, kind.takes_delay()) {
        v.error(
            d.span(),
            format!(
                "`delay` is taken by token_bucket and gcra only, not {}",
                kind.name()
            ),
        );
    }
    if let (Some(b), Mode::Shadow) = (&l.ban, mode) {
        v.error(
            b.span(),
            "`ban` on a shadow limit would never start: a shadow limit never rejects",
        );
    }
    let responsive = settle != Settlement::Stands || ban > 0 || delay > 0;
    if let (Some(b), true) = (&l.batch, responsive) {
        v.error(
            b.span(),
            "`batch` (approximate mode, decided locally) cannot be combined with count, cost_from, concurrency, ban or delay, which need the store's exact answer",
        );
    }
    let spec = spec?;
    let key = match keys.iter().position(|k| *k == spec) {
        Some(i) => i,
        None => {
            keys.push(spec.clone());
            keys.len() - 1
        }
    };
    let rules = if context.consumers_failed {
        None
    } else {
        plan_rules(v, l, kind, cost_at, consumers)
    };
    let base = base?;
    let id = limit_id(
        context.route_name,
        kind.name(),
        &spec,
        base.period_us,
        identities,
    );
    let limit = Limit {
        name: policy_name,
        algorithm: base.algorithm,
        rate_text: l
            .rate
            .as_ref()
            .map_or_else(|| format!("max {}", base.quota), |r| r.get_ref().clone()),
        key,
        cost,
        mode,
        id,
        batch: base.batch,
        quota: base.quota,
        window_secs: base.window_secs,
        settle,
        ban,
        delay,
    };
    let rules = rules?
        .into_iter()
        .map(|rule| match rule {
            RawRule::Same => PlanRule::Same,
            RawRule::Unlimited => PlanRule::Unlimited,
            RawRule::Own(shape, rate_text) => PlanRule::Own(Box::new(Limit {
                algorithm: shape.algorithm,
                rate_text,
                batch: shape.batch,
                quota: shape.quota,
                window_secs: shape.window_secs,
                ..limit.clone()
            })),
        })
        .collect();
    Some((limit, rules))
}

/// A concurrency limit: `max` requests in flight, each slot freeing itself after the
/// upstream's timeout plus 10 s. It takes nothing else.
fn concurrency_shape(v: &mut Validator, raw: &S<RawLimit>, timeout: Duration) -> Option<Shape> {
    let l = raw.get_ref();
    let refused = [
        ("rate", l.rate.as_ref().map(S::span)),
        ("burst", l.burst.as_ref().map(S::span)),
        ("cost", l.cost.as_ref().map(S::span)),
        ("batch", l.batch.as_ref().map(S::span)),
        ("reserve", l.reserve.as_ref().map(S::span)),
        ("cost_from", l.cost_from.as_ref().map(S::span)),
        ("count", l.count.as_ref().map(S::span)),
        ("plans", l.plans.as_ref().map(S::span)),
    ];
    let mut ok = true;
    for (key, span) in refused {
        if let Some(span) = span {
            v.error(
                span,
                format!("`{key}` is not taken by concurrency, which takes `max` (requests in flight at most)"),
            );
            ok = false;
        }
    }
    let max = match &l.max {
        None => {
            v.error(
                raw.span(),
                "a concurrency limit needs `max` (requests in flight at most)",
            );
            return None;
        }
        Some(m) if (1..=units::MAX_COUNT as i64).contains(m.get_ref()) => *m.get_ref() as u64,
        Some(m) => {
            v.error(
                m.span(),
                format!(
                    "invalid max {}; expected a whole number from 1 to {}",
                    m.get_ref(),
                    units::MAX_COUNT
                ),
            );
            return None;
        }
    };
    let lease = (timeout + Duration::from_secs(10)).as_micros() as u64;
    ok.then_some(Shape {
        algorithm: Algorithm::Concurrency { max, lease },
        quota: max,
        window_secs: 1,
        period_us: 0,
        batch: 0,
    })
}

/// `count` or `cost_from` (one of them at most), or a concurrency slot's release.
fn settlement(v: &mut Validator, l: &RawLimit, kind: Kind) -> Settlement {
    if kind == Kind::Concurrency {
        return Settlement::Release;
    }
    if let (Some(_), Some(from)) = (&l.count, &l.cost_from) {
        v.error(
            from.span(),
            "`count` and `cost_from` cannot be combined: a response either counts or reports its cost",
        );
        return Settlement::Stands;
    }
    if let Some(list) = &l.count {
        let mut set = StatusSet::default();
        if list.get_ref().is_empty() {
            v.error(
                list.span(),
                "`count` lists no status; list statuses (\"401\") or classes (\"4xx\"), or leave it out to count every response",
            );
        }
        for entry in list.get_ref() {
            if !set.add(entry.get_ref()) {
                v.error(
                    entry.span(),
                    format!(
                        "invalid status \"{}\" in `count`; expected a status from 100 to 599 (\"401\") or a class (\"4xx\")",
                        entry.get_ref()
                    ),
                );
            }
        }
        return Settlement::Count(set);
    }
    let Some(from) = &l.cost_from else {
        return Settlement::Stands;
    };
    if !kind.takes_cost_from() {
        v.error(
            from.span(),
            format!("`cost_from` is taken by fixed_window, sliding_window, token_bucket and gcra (which can hold a debt), not {}", kind.name()),
        );
        return Settlement::Stands;
    }
    match cost_from(from.get_ref()) {
        Ok(source) => Settlement::CostFrom(source),
        Err(message) => {
            v.error(from.span(), message);
            Settlement::Stands
        }
    }
}

/// `header:NAME` or `openai:FIELD`.
fn cost_from(text: &str) -> Result<CostFrom, String> {
    if let Some(name) = text.strip_prefix("header:") {
        return HeaderName::from_bytes(name.as_bytes())
            .map(CostFrom::Header)
            .map_err(|_| format!("invalid header name \"{name}\" in cost_from"));
    }
    if let Some(field) = text.strip_prefix("openai:") {
        return match field {
            "total_tokens" => Ok(CostFrom::OpenAi(Field::Total)),
            "prompt_tokens" => Ok(CostFrom::OpenAi(Field::Prompt)),
            "completion_tokens" => Ok(CostFrom::OpenAi(Field::Completion)),
            _ => Err(format!(
                "invalid cost_from \"{text}\"; expected openai:total_tokens, openai:prompt_tokens or openai:completion_tokens"
            )),
        };
    }
    Err(format!(
        "invalid cost_from \"{text}\"; expected \"header:NAME\" (an integer the upstream sends in a response header) or \"openai:total_tokens\" (the usage an OpenAI-compatible response body reports)"
    ))
}

/// `ban` or `delay`: a duration longer than zero and at most a year, in µs (0 when absent).
fn limit_duration(v: &mut Validator, value: &Option<S<String>>, what: &str) -> u64 {
    const YEAR: Duration = Duration::from_secs(366 * 24 * 3600);
    let Some(raw) = value else { return 0 };
    match units::parse_duration(raw.get_ref()) {
        Ok(d) if !d.is_zero() && d <= YEAR => d.as_micros() as u64,
        Ok(_) => {
            v.error(
                raw.span(),
                format!(
                    "invalid {what} \"{}\"; expected more than zero and at most a year",
                    raw.get_ref()
                ),
            );
            0
        }
        Err(message) => {
            v.error(raw.span(), message);
            0
        }
    }
}

enum RawRule {
    Same,
    Unlimited,
    Own(Shape, String),
}

/// A limit's `plans` table, one rule per plan of `[consumers] plans`.
fn plan_rules(
    v: &mut Validator,
    l: &RawLimit,
    kind: Kind,
    cost_at: (u64, Range<usize>),
    consumers: Option<&Consumers>,
) -> Option<Vec<RawRule>> {
    let Some(table) = &l.plans else {
        let plans = consumers.map_or(0, |c| c.plans.len());
        return Some((0..plans).map(|_| RawRule::Same).collect());
    };
    let Some(consumers) = consumers else {
        v.error(
            table.span(),
            "`plans` needs a [consumers] table that lists the plans",
        );
        return None;
    };
    let mut rules: Vec<RawRule> = consumers.plans.iter().map(|_| RawRule::Same).collect();
    let mut ok = true;
    for (name, value) in table.get_ref() {
        let Some(plan) = consumers.plan_id(name) else {
            v.error(
                value.span(),
                format!(
                    "unknown plan \"{name}\"; [consumers] plans lists: {}",
                    consumers.plans.join(", ")
                ),
            );
            ok = false;
            continue;
        };
        let rule = match value.get_ref() {
            toml::Value::String(s) if s == "unlimited" => Some(RawRule::Unlimited),
            toml::Value::Table(t) => plan_override(v, value.span(), t, kind, cost_at.clone(), l),
            _ => {
                v.error(
                    value.span(),
                    format!("invalid plan rule for \"{name}\"; expected \"unlimited\" or {{ rate = \"N/unit\", burst = N }}"),
                );
                None
            }
        };
        match rule {
            Some(rule) => rules[usize::from(plan)] = rule,
            None => ok = false,
        }
    }
    ok.then_some(rules)
}

/// `{ rate = "...", burst = N }` for one plan: the limit's algorithm with that rate.
fn plan_override(
    v: &mut Validator,
    span: Range<usize>,
    table: &toml::Table,
    kind: Kind,
    cost_at: (u64, Range<usize>),
    l: &RawLimit,
) -> Option<RawRule> {
    if let Some(key) = table.keys().find(|k| *k != "rate" && *k != "burst") {
        v.error(
            span,
            format!("unknown key `{key}` in a plan rule; expected `rate` and, for token_bucket and gcra, `burst`"),
        );
        return None;
    }
    let Some(toml::Value::String(rate)) = table.get("rate") else {
        v.error(
            span,
            "a plan rule needs rate = \"N/unit\" (or the plan = \"unlimited\")",
        );
        return None;
    };
    let burst = match table.get("burst") {
        None => None,
        Some(toml::Value::Integer(n)) => Some(S::new(span.clone(), *n)),
        Some(other) => {
            v.error(
                span,
                format!("invalid burst {other}; expected a whole number"),
            );
            return None;
        }
    };
    let rate_value = S::new(span.clone(), rate.clone());
    // The batch is the limit's; the same bounds hold against the plan's quota.
    let batch = l.batch.as_ref().map(|b| S::new(span.clone(), *b.get_ref()));
    let shape = shape(
        v,
        kind,
        &rate_value,
        burst.as_ref(),
        (cost_at.0, span.clone()),
        batch.as_ref(),
    )?;
    Some(RawRule::Own(shape, rate.clone()))
}

/// A limit's counters are identified by its route name, algorithm, key specification and
/// period (plus an occurrence number when a route repeats all four). Changing a limit's count,
/// burst, cost or mode, reordering limits, or editing other routes keeps its counters across a
/// reload; renaming the route or changing any of the four starts it afresh.
fn limit_id(
    route: &str,
    algorithm: &str,
    spec: &KeySpec,
    period_us: u64,
    seen: &mut HashMap<String, u32>,
) -> u64 {
    let identity = format!("{route}\0{algorithm}\0{spec}\0{period_us}");
    let occurrence = seen.entry(identity.clone()).or_insert(0);
    let text = format!("{identity}\0{occurrence}");
    *occurrence += 1;
    let hash = blake3::hash(text.as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// `"name";q=N;w=S, ...`, one item per limit of the route (shadow limits included: the
/// contract lists each limit; `RateLimit` reports enforced limits first).
fn policy_header(limits: &[Limit]) -> Option<HeaderValue> {
    let items: Vec<String> = limits
        .iter()
        .filter(|l| l.settle != Settlement::Release)
        .map(|l| format!("\"{}\";q={};w={}", l.name, l.quota, l.window_secs))
        .collect();
    if items.is_empty() {
        return None;
    }
    HeaderValue::from_str(&items.join(", ")).ok()
}

/// Names of routes that can never match because an earlier route matches everything they do.
/// Reported by `check` as warnings.
pub fn shadowed_routes(policy: &Policy) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut catch_all: Option<&str> = None;
    let mut seen = HashSet::new();
    for route in &policy.routes {
        if let Some(earlier) = catch_all {
            out.push((route.name.to_string(), earlier.to_string()));
        }
        let m = &route.matcher;
        let matches_all = m.host.is_none()
            && m.path.is_none()
            && m.methods.is_empty()
            && m.headers.is_empty()
            && m.path_prefix.as_deref().is_none_or(|p| p == "/");
        if matches_all && catch_all.is_none() {
            catch_all = Some(&route.name);
        }
        seen.insert(route.name.clone());
    }
    out
}
