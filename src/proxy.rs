//! Forwarding to the upstream: hop-by-hop headers stripped both ways (including those named in
//! `Connection`), `X-Forwarded-*` and `Via` set, `Host` passed through, only allowed upgrades
//! kept and spliced, and upstream failures turned into [`ProxyError`]s that the pipeline maps
//! to 502/504/413/408/400. Connections come from [`crate::upstream`], the streamed request body
//! from [`crate::body`].

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::histogram::Histogram;

use crate::body::{BodyFault, BodyWatch, RequestBody, error_chain};
use crate::conn::{ConnInfo, Cut};
use crate::consumers::{Consumers, Resolved};
use crate::policy::Upstream;
use crate::timeouts::{Activity, Tracked};
use crate::upstream::{PooledBody, SendError, TargetPool, UpstreamError, health};

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream {0} refused the connection or could not be reached")]
    Connect(String),
    /// Every connection allowed to the target stayed busy: 503, try again shortly.
    #[error("upstream {0}: {1}")]
    Saturated(String, String),
    #[error("upstream {0} did not send a response head within {1:?}")]
    Timeout(String, Duration),
    #[error("upstream {0} failed: {1}")]
    Upstream(String, String),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("request body stalled")]
    BodyIdle,
    /// The client's body does not parse (bad chunk framing): the client's fault.
    #[error("malformed request body: {0}")]
    BadRequestBody(String),
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers a `Connection` nomination may not remove: framing and routing stay what tollgate
/// decided on, and a header a limit is keyed by reaches the upstream as it was counted.
fn protected(name: &HeaderName, key_headers: &[HeaderName]) -> bool {
    matches!(
        *name,
        header::HOST | header::CONTENT_LENGTH | header::TRANSFER_ENCODING
    ) || key_headers.contains(name)
}

/// Whether the request asks to switch to a protocol in `allowed` (lower-case names; the
/// `[server] upgrades` list). The `Upgrade` header is cut down to the allowed protocols; when
/// none is left the caller strips it with its `Connection` nominations (`HTTP2-Settings`) and
/// the request is served as plain HTTP/1.1: an `h2c` upgrade would open a tunnel whose
/// requests no limit sees.
pub fn allowed_upgrade(headers: &mut HeaderMap, allowed: &[String]) -> bool {
    if !wants_upgrade(headers) {
        return false;
    }
    let offered: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let kept: Vec<&str> = offered
        .iter()
        .copied()
        .filter(|t| {
            let name = t.split('/').next().unwrap_or_default().trim();
            allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
        })
        .collect();
    if kept.is_empty() {
        return false;
    }
    if kept.len() != offered.len()
        && let Ok(value) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(header::UPGRADE, value);
    }
    true
}

/// Whether the request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The consumer headers upstreams may trust: a client's own copies removed from every
/// request, tollgate's set when the request named a known consumer.
pub fn set_consumer_headers(
    headers: &mut HeaderMap,
    consumers: Option<&Consumers>,
    who: &Resolved,
) {
    headers.remove(X_TOLLGATE_CONSUMER);
    headers.remove(X_TOLLGATE_PLAN);
    let (Some(table), Some(name)) = (consumers, who.name) else {
        return;
    };
    let header = match who.consumer {
        Some(index) => Some(table.get(index).header.clone()),
        // A JWT consumer not listed in the file: its claim, when it is a valid header value.
        None => HeaderValue::from_str(name).ok(),
    };
    let Some(header) = header else { return };
    headers.insert(X_TOLLGATE_CONSUMER, header);
    if let Some(plan) = who.plan {
        headers.insert(
            X_TOLLGATE_PLAN,
            table.plan_headers[usize::from(plan)].clone(),
        );
    }
}

pub const X_TOLLGATE_CONSUMER: HeaderName = HeaderName::from_static("x-tollgate-consumer");
pub const X_TOLLGATE_PLAN: HeaderName = HeaderName::from_static("x-tollgate-plan");

/// Removes hop-by-hop headers: the fixed list (with `X-Tollgate-Consumer` / `-Plan`) and
/// whatever `Connection` names (except the [`protected`] ones). `keep_upgrade` keeps
/// `Upgrade` (and sets `Connection: upgrade`) for a protocol switch. One pass over the names finds what is present, so the common message
/// (none, or just `Connection: keep-alive`) costs no lookups beyond its own removal.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool, key_headers: &[HeaderName]) {
    // The hop-by-hop headers, and the consumer headers only tollgate may set (removed in the
    // same pass, so that a client's copies never reach the upstream).
    const FIXED: [HeaderName; 9] = [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        X_TOLLGATE_CONSUMER,
        X_TOLLGATE_PLAN,
    ];
    let mut present = [false; 9];
    for name in headers.keys() {
        if let Some(i) = FIXED.iter().position(|f| f == name) {
            present[i] = true;
        }
    }
    if present[0] {
        let nominated: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `close` and `keep-alive` are options, not header names worth a lookup (a
            // Keep-Alive header goes with the fixed list anyway).
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !protected(n, key_headers) && !FIXED.contains(n))
            .collect();
        for name in nominated {
            headers.remove(&name);
        }
    }
    for (name, present) in FIXED.iter().zip(present) {
        let keep = keep_upgrade && *name == header::UPGRADE;
        if present && !keep {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// tollgate's `Via` entry for a message received over `version` (RFC 9110 §7.6.3: the
/// protocol received): `1.0 tollgate`, `1.1 tollgate` or `2 tollgate`.
fn via_entry(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9 tollgate",
        Version::HTTP_10 => "1.0 tollgate",
        Version::HTTP_2 => "2 tollgate",
        Version::HTTP_3 => "3 tollgate",
        _ => "1.1 tollgate",
    }
}

fn append_via(headers: &mut HeaderMap, version: Version) {
    let ours = via_entry(version);
    // Every Via line, in order, as one list.
    let joined: Vec<&str> = headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let existing = (!joined.is_empty()).then(|| joined.join(", "));
    let value = match existing.as_deref() {
        Some(existing) => HeaderValue::from_str(&format!("{existing}, {ours}"))
            .unwrap_or(HeaderValue::from_static(ours)),
        _ => HeaderValue::from_static(ours),
    };
    headers.insert(header::VIA, value);
}

/// Sets the forwarding headers on a request about to leave.
pub fn set_forwarding_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    peer_trusted: bool,
    host: Option<&HeaderValue>,
    version: Version,
) {
    let xff = if headers.contains_key(&X_FORWARDED_FOR) {
        let mut list: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        list.push(conn.peer_entry.to_str().unwrap_or_default());
        HeaderValue::from_str(&list.join(", ")).ok()
    } else {
        Some(conn.peer_entry.clone())
    };
    if let Some(xff) = xff {
        headers.insert(X_FORWARDED_FOR, xff);
    }
    if !(peer_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if conn.scheme == Scheme::HTTPS {
            "https"
        } else {
            "http"
        };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    append_via(headers, version);
}

/// A request body's fault as a forwarding error.
fn body_error(fault: BodyFault, max_body: Option<u64>) -> ProxyError {
    match fault {
        BodyFault::TooLarge => ProxyError::BodyTooLarge(max_body.unwrap_or(0)),
        BodyFault::Idle => ProxyError::BodyIdle,
        BodyFault::Malformed(message) => ProxyError::BadRequestBody(message),
    }
}

/// How an upgraded connection is spliced: closed after `idle` without traffic, and run under
/// the listener's shutdown `cut`.
#[derive(Clone, Copy)]
pub struct Tunnel<'a> {
    pub idle: Duration,
    pub cut: &'a Cut,
}

/// The targets of one upstream as forwarding uses them: the one chosen for this request, each
/// one's pool and response-time histogram (same order as the upstream's `targets`).
#[derive(Clone, Copy)]
pub struct Targets<'a> {
    pub chosen: usize,
    pub pools: &'a [Arc<TargetPool>],
    pub durations: &'a [Histogram],
}

/// Sends `request` (whose headers the caller has prepared) to the chosen target of `upstream`
/// through its connection pool and waits for the response head, bounded by the upstream's
/// timeout. A request that could not be sent at all (the target refused the connection) is
/// sent once more, to another target ([`health::another`]). The response's hop-by-hop
/// headers are stripped and `Via` added; a `101` is spliced to the client connection.
pub async fn forward(
    upstream: &Upstream,
    Targets {
        chosen: target,
        pools,
        durations,
    }: Targets<'_>,
    mut request: Request<RequestBody>,
    watch: &BodyWatch,
    max_body: Option<u64>,
    tunnel: Tunnel<'_>,
) -> Result<Response<PooledBody>, ProxyError> {
    // The upstream gets origin-form (`/path?query`), whatever form the client used.
    if request.uri().scheme().is_some() || request.uri().authority().is_some() {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
    }
    *request.version_mut() = Version::HTTP_11;
    if !request.headers().contains_key(header::HOST) {
        // An HTTP/1.0 client may omit Host; an HTTP/1.1 upstream requires one.
        if let Ok(host) = HeaderValue::from_str(upstream.targets[target].authority.as_str()) {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    let client_upgrade = if wants_upgrade(request.headers()) {
        Some(hyper::upgrade::on(&mut request))
    } else {
        None
    };
    let limit = grpc_deadline(request.headers_mut(), upstream.timeout);
    let started = std::time::Instant::now();
    let mut used = target;
    let attempts = async {
        match pools[target].send(request).await {
            Err(SendError {
                error: first @ (UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_)),
                unsent: Some(request),
            }) => match health::another(target, pools) {
                Some(other) => {
                    tracing::debug!(failed = %upstream.targets[target].authority, retry = %upstream.targets[other].authority, "upstream target unreachable; sending to another");
                    used = other;
                    // Boxed: the rare second attempt must not double every request's future.
                    Box::pin(pools[other].send(request))
                        .await
                        .map_err(|e| e.error)
                }
                None => Err(first),
            },
            other => other.map_err(|e| e.error),
        }
    };
    let sent = tokio::time::timeout(limit, attempts).await;
    let authority = &upstream.targets[used].authority;
    let mut response = match sent {
        Err(_) => {
            return Err(ProxyError::Timeout(authority.to_string(), limit));
        }
        Ok(Err(e)) => {
            if let Some(fault) = watch.fault() {
                return Err(body_error(fault, max_body));
            }
            return Err(match e {
                UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_) => {
                    ProxyError::Connect(authority.to_string())
                }
                UpstreamError::Http(e) => {
                    ProxyError::Upstream(authority.to_string(), error_chain(&e))
                }
                e @ UpstreamError::Saturated(..) => {
                    ProxyError::Saturated(authority.to_string(), e.to_string())
                }
                e @ (UpstreamError::Tls(_) | UpstreamError::NoH2) => {
                    ProxyError::Upstream(authority.to_string(), e.to_string())
                }
            });
        }
        Ok(Ok(r)) => {
            durations[used].observe(started.elapsed().as_secs_f64());
            r
        }
    };
    if let Some(fault) = watch.fault() {
        return Err(body_error(fault, max_body));
    }
    if let Err(e) = crate::framing::check_response(response.headers()) {
        return Err(ProxyError::Upstream(authority.to_string(), e.to_string()));
    }
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && let Some(client_upgrade) = client_upgrade {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tunnel
            .cut
            .spawn(splice(client_upgrade, upstream_upgrade, tunnel.idle));
    }
    strip_hop_by_hop(response.headers_mut(), switching, &[]);
    let version = response.version();
    append_via(response.headers_mut(), version);
    Ok(response)
}

/// A gRPC call's `grpc-timeout`, honoured no longer than the upstream's `timeout`: the header
/// the upstream receives is capped to it, and the wait for the response head is the shorter
/// of the two.
fn grpc_deadline(headers: &mut HeaderMap, timeout: Duration) -> Duration {
    let Some(asked) = headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
    else {
        return timeout;
    };
    if asked <= timeout {
        return asked;
    }
    let millis = timeout.as_millis().min(99_999_999);
    if let Ok(v) = HeaderValue::from_str(&format!("{millis}m")) {
        headers.insert(GRPC_TIMEOUT, v);
    }
    timeout
}

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `grpc-timeout` = at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Copies bytes both ways between an upgraded client and upstream until either side closes or
/// nothing moves either way for `idle`.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
) {
    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
        return;
    };
    let activity = Activity::default();
    let mut client = Tracked {
        inner: TokioIo::new(client),
        activity: activity.clone(),
    };
    let mut upstream = Tracked {
        inner: TokioIo::new(upstream),
        activity: activity.clone(),
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        () = activity.idle_for(idle) => {
            tracing::debug!(?idle, "upgraded connection idle: closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_including_nominated_ones() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret, host, content-length"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("host", "example.com"),
            ("content-length", "5"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false, &[]);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "host", "x-keep"], "{left:?}");
    }

    #[test]
    fn upgrade_survives_for_a_protocol_switch() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true, &[]);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarding_headers() {
        let conn = ConnInfo::new(
            "192.0.2.1:5555".parse().unwrap(),
            Scheme::HTTP,
            Default::default(),
        );
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("via", "1.0 edge"),
        ]);
        let host = HeaderValue::from_static("api.example.com");
        set_forwarding_headers(&mut h, &conn, false, Some(&host), Version::HTTP_11);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 192.0.2.1");
        assert_eq!(
            h["x-forwarded-proto"], "http",
            "an untrusted client's value is overwritten"
        );
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["via"], "1.0 edge, 1.1 tollgate");
        let mut h = map(&[("x-forwarded-proto", "https")]);
        set_forwarding_headers(&mut h, &conn, true, None, Version::HTTP_11);
        assert_eq!(
            h["x-forwarded-proto"], "https",
            "a trusted proxy's value is kept"
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["via"], "1.1 tollgate");
        for (version, via) in [
            (Version::HTTP_10, "1.0 tollgate"),
            (Version::HTTP_11, "1.1 tollgate"),
            (Version::HTTP_2, "2 tollgate"),
        ] {
            let mut h = HeaderMap::new();
            set_forwarding_headers(&mut h, &conn, false, None, version);
            assert_eq!(h["via"], via, "{version:?}");
        }
    }

    #[test]
    fn grpc_timeouts_are_capped_by_the_upstream_timeout() {
        assert_eq!(parse_grpc_timeout(b"10S"), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        for bad in [&b"S"[..], b"123456789S", b"10s", b"-1S", b""] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let mut h = map(&[("grpc-timeout", "10S")]);
        assert_eq!(
            grpc_deadline(&mut h, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(h["grpc-timeout"], "1000m", "capped for the upstream too");
        let mut h = map(&[("grpc-timeout", "200m")]);
        assert_eq!(
            grpc_deadline(&mut h, Duration::from_secs(1)),
            Duration::from_millis(200)
        );
        assert_eq!(
            h["grpc-timeout"], "200m",
            "a shorter deadline passes as sent"
        );
        let mut h = map(&[]);
        assert_eq!(
            grpc_deadline(&mut h, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn only_allowed_upgrades_survive() {
        let ws = ["websocket".to_string()];
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ]);
        assert!(!allowed_upgrade(&mut h, &ws));
        strip_hop_by_hop(&mut h, false, &[]);
        assert!(h.is_empty(), "{h:?}");
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "WebSocket")]);
        assert!(allowed_upgrade(&mut h, &ws), "names are case-insensitive");
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "h2c, websocket/13")]);
        assert!(allowed_upgrade(&mut h, &ws));
        assert_eq!(h["upgrade"], "websocket/13");
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(!allowed_upgrade(&mut h, &[]), "an empty list allows none");
    }
}
