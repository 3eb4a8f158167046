//! Logging: the tracing subscriber (`RUST_LOG`, text or one JSON object per line), the access
//! log, and throttled messages for events a flood or an outage repeats thousands of times a
//! second (rejections, store errors, upstream errors): at most one line per second per kind,
//! carrying the count of lines suppressed since the last one.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Request, Uri};
use tracing_subscriber::EnvFilter;

use crate::conn::ConnInfo;
use crate::metrics::Outcome;
use crate::proxy::ProxyError;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` filters (default `info`).
pub fn init(format: Format) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // Already installed (tests that start several instances): keep the first.
    let _ = result;
}

/// Lets one event through per second; counts the rest.
pub struct Throttle {
    start: std::sync::OnceLock<Instant>,
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            start: std::sync::OnceLock::new(),
            last_second: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let start = *self.start.get_or_init(Instant::now);
        let second = start.elapsed().as_secs();
        let last = self.last_second.load(Ordering::Relaxed);
        if last != second
            && self
                .last_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

static REJECTED: Throttle = Throttle::new();
static SHADOW: Throttle = Throttle::new();
static STORE: Throttle = Throttle::new();
static UPSTREAM: Throttle = Throttle::new();
static BAD_BODY: Throttle = Throttle::new();
static CONNECT: Throttle = Throttle::new();

pub fn store_connect_error(error: &redis::RedisError) {
    if let Some(suppressed) = CONNECT.allow() {
        tracing::warn!(%error, suppressed, "cannot connect to Redis");
    }
}

pub fn rejected(route: &str, client: IpAddr, retry_after: u64) {
    if let Some(suppressed) = REJECTED.allow() {
        tracing::info!(route, %client, retry_after, suppressed, "request rejected by a limit");
    }
}

pub fn shadow_rejected(route: &str, client: IpAddr) {
    if let Some(suppressed) = SHADOW.allow() {
        tracing::info!(route, %client, suppressed, "shadow limit would have rejected a request");
    }
}

pub fn store_error(route: &str, error: &dyn std::fmt::Display) {
    if let Some(suppressed) = STORE.allow() {
        tracing::warn!(route, %error, suppressed, "rate-limit store failed; applying on_store_error");
    }
}

/// A client sent a request body that does not parse (bad chunk framing): its fault, a 400.
pub fn bad_request_body(route: &str, error: &str) {
    if let Some(suppressed) = BAD_BODY.allow() {
        tracing::info!(route, error, suppressed, "malformed request body");
    }
}

pub fn upstream_error(route: &str, error: &ProxyError) {
    if let Some(suppressed) = UPSTREAM.allow() {
        tracing::warn!(route, %error, suppressed, "forwarding failed");
    }
}

/// One access-log line, filled in as the request goes (only when the access log is on).
pub struct Access {
    on: bool,
    method: Option<Method>,
    uri: Option<Uri>,
    /// The Host (or :authority) as received, for `tollgate replay`.
    host: Option<http::HeaderValue>,
    peer: IpAddr,
    pub route: Option<std::sync::Arc<str>>,
    pub client: Option<IpAddr>,
    pub upstream: Option<Duration>,
}

impl Access {
    pub fn begin<B>(request: &Request<B>, conn: &ConnInfo, on: bool) -> Access {
        Access {
            on,
            method: on.then(|| request.method().clone()),
            uri: on.then(|| request.uri().clone()),
            host: on
                .then(|| {
                    request
                        .headers()
                        .get(http::header::HOST)
                        .cloned()
                        .or_else(|| {
                            request
                                .uri()
                                .authority()
                                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
                        })
                })
                .flatten(),
            peer: conn.peer.ip(),
            route: None,
            client: None,
            upstream: None,
        }
    }

    /// The route, kept only when the access log is on (no reference count taken otherwise).
    pub fn set_route(&mut self, route: &std::sync::Arc<str>) {
        if self.on {
            self.route = Some(route.clone());
        }
    }

    /// Writes the line (when the access log is on); `started` gives the total time, read only
    /// then.
    pub fn finish(&self, status: u16, outcome: Option<Outcome>, started: Option<Instant>) {
        if !self.on {
            return;
        }
        let total = started.map(|s| s.elapsed());
        tracing::info!(
            target: "tollgate::access",
            method = %self.method.as_ref().map_or("-", Method::as_str),
            host = self.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("-"),
            path = %self.uri.as_ref().map_or("-", Uri::path),
            route = self.route.as_deref().unwrap_or("-"),
            status,
            decision = outcome.map_or("-", Outcome::as_str),
            client = %self.client.unwrap_or(self.peer),
            upstream_ms = self.upstream.map(|d| d.as_secs_f64() * 1000.0),
            total_ms = total.map(|d| d.as_secs_f64() * 1000.0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_line_through_per_second() {
        let t = Throttle::new();
        assert_eq!(t.allow(), Some(0));
        for _ in 0..100 {
            assert_eq!(t.allow(), None);
        }
    }
}
