//! Every response tollgate makes itself (problem+json bodies, one named constructor per
//! situation) and the rate-limit headers it adds to responses of limited routes.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::limiter::algorithm::{Micros, Outcome};
use crate::limiter::{Decision, Item};
use crate::policy::{HeaderStyle, Limit, Mode, Rejection};

/// Responses carry either the upstream's streamed body or one of ours, built whole.
pub type Body = Either<crate::settle::Settled, Full<Bytes>>;

pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// Whole seconds, rounded up.
pub fn ceil_secs(us: Micros) -> u64 {
    us.div_ceil(1_000_000)
}

/// A body tollgate made.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(bytes.into()))
}

/// An RFC 9457 problem document with `type`, `title`, `status`, `detail` and extra members.
fn problem(
    status: StatusCode,
    kind: &str,
    detail: &str,
    extra: &[(&str, serde_json::Value)],
) -> Response<Body> {
    let mut doc = serde_json::Map::new();
    doc.insert("type".into(), format!("urn:tollgate:problem:{kind}").into());
    doc.insert(
        "title".into(),
        status.canonical_reason().unwrap_or("Error").into(),
    );
    doc.insert("status".into(), status.as_u16().into());
    doc.insert("detail".into(), detail.into());
    for (k, v) in extra {
        doc.insert((*k).into(), v.clone());
    }
    let body = serde_json::to_vec(&serde_json::Value::Object(doc)).unwrap_or_default();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, PROBLEM_JSON);
    response
}

/// 429: a limit rejected the request.
pub fn rate_limited(route: &str, retry_after_secs: u64) -> Response<Body> {
    let mut r = problem(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        &format!("Rate limit of route \"{route}\" exceeded; retry in {retry_after_secs} s."),
        &[
            ("route", route.into()),
            ("retry_after", retry_after_secs.into()),
        ],
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    r
}

/// A route's own rejection (`rejection = { ... }`) instead of the 429 problem document;
/// `Retry-After` as on the default one.
pub fn custom_rejection(rejection: &Rejection, retry_after_secs: u64) -> Response<Body> {
    let mut r = Response::new(full(rejection.body.clone()));
    *r.status_mut() = rejection.status;
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, rejection.content_type.clone());
    for (name, value) in &rejection.headers {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    r
}

/// 403: the route's `deny` list names the client or its consumer.
pub fn denied(route: &str) -> Response<Body> {
    problem(
        StatusCode::FORBIDDEN,
        "denied",
        &format!("Route \"{route}\" does not serve this client."),
        &[("route", route.into())],
    )
}

/// 401: the route counts per consumer, and the request names none that is known.
pub fn unknown_consumer(route: &str) -> Response<Body> {
    problem(
        StatusCode::UNAUTHORIZED,
        "unknown-consumer",
        &format!("Route \"{route}\" needs a known API key."),
        &[("route", route.into())],
    )
}

/// gRPC status codes tollgate answers with (grpc/doc/statuscodes.md).
pub mod grpc_code {
    pub const DEADLINE_EXCEEDED: u8 = 4;
    pub const PERMISSION_DENIED: u8 = 7;
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    pub const UNIMPLEMENTED: u8 = 12;
    pub const UNAVAILABLE: u8 = 14;
    pub const UNAUTHENTICATED: u8 = 16;
}

const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// Whether a request speaks gRPC (`content-type: application/grpc`, `application/grpc+proto`…).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A trailers-only gRPC answer: HTTP 200, `grpc-status` and `grpc-message` in the only header
/// block, no body (over HTTP/2 the block ends the stream). `message` is printable ASCII
/// without `%`, so it needs no percent-encoding.
pub fn grpc(status: u8, message: &'static str, retry_after_secs: Option<u64>) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, GRPC);
    headers.insert("grpc-status", HeaderValue::from(u16::from(status)));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    if let Some(secs) = retry_after_secs {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// 404: no route matches.
pub fn no_route() -> Response<Body> {
    problem(
        StatusCode::NOT_FOUND,
        "no-route",
        "No route matches this request.",
        &[],
    )
}

/// 503: the store failed and the route fails closed.
pub fn store_unavailable(route: &str) -> Response<Body> {
    let mut r = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
        "The rate-limit store is unavailable and this route does not admit requests without a decision.",
        &[("route", route.into())],
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 503: every connection tollgate may open to the target stayed busy for the connect
/// timeout (`max_connections_per_target`).
pub fn upstream_saturated(route: &str) -> Response<Body> {
    let mut r = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream-busy",
        "Every connection to the upstream is busy; try again shortly.",
        &[("route", route.into())],
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 502: the upstream refused, reset or answered with something unusable.
pub fn bad_gateway(detail: &str) -> Response<Body> {
    problem(StatusCode::BAD_GATEWAY, "bad-gateway", detail, &[])
}

/// 504: the upstream's response head did not arrive in time.
pub fn gateway_timeout(detail: &str) -> Response<Body> {
    problem(StatusCode::GATEWAY_TIMEOUT, "gateway-timeout", detail, &[])
}

/// 413: the request body is larger than `[server] max_body`.
pub fn payload_too_large(max: u64) -> Response<Body> {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        &format!("The request body is larger than {max} bytes."),
        &[],
    )
}

/// 400 (501 for an unsupported transfer coding, 405 for CONNECT): a request tollgate will not
/// forward. The connection is closed after it: its framing cannot be trusted.
pub fn malformed(e: crate::framing::FramingError) -> Response<Body> {
    let status = e.status();
    let kind = match status {
        StatusCode::NOT_IMPLEMENTED => "not-implemented",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        _ => "bad-request",
    };
    let mut r = problem(status, kind, &e.to_string(), &[]);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut().insert(
            http::header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
        );
    }
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// 408: the client stopped sending its body.
pub fn request_timeout() -> Response<Body> {
    let mut r = problem(
        StatusCode::REQUEST_TIMEOUT,
        "request-timeout",
        "The request body stalled longer than the body idle timeout.",
        &[],
    );
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// 500: tollgate's own fault.
pub fn internal_error() -> Response<Body> {
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal-error",
        "tollgate failed to handle this request.",
        &[],
    )
}

/// The limit closest to rejecting: smallest remaining (a denying limit counts as 0), ties to
/// the one that resets soonest. Enforced limits are preferred: a shadow limit is reported only
/// on a route that has no enforced one (it binds nobody).
fn closest<'a>(
    limits: &'a [Limit],
    items: &[Item],
    decision: &Decision,
) -> Option<(&'a Limit, u64, u64)> {
    limits
        .iter()
        .zip(items.iter().zip(&decision.outcomes))
        // Requests in flight are not a rate: a concurrency limit is not in the headers.
        .filter(|(limit, _)| limit.settle != crate::policy::Settlement::Release)
        .map(|(limit, (_, o)): (&Limit, (&Item, &Outcome))| {
            let remaining = if o.allowed { o.remaining } else { 0 };
            (limit, remaining, ceil_secs(o.reset))
        })
        .min_by_key(|&(l, r, t)| (l.mode == Mode::Shadow, r, t))
}

/// Seconds until every denying enforced limit would admit the request: the largest wait.
pub fn retry_after_secs(items: &[Item], decision: &Decision) -> u64 {
    items
        .iter()
        .zip(&decision.outcomes)
        .filter(|(item, o)| !item.shadow && !o.allowed)
        .map(|(_, o)| ceil_secs(o.retry_after))
        .max()
        .unwrap_or(1)
        .max(1)
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Adds `RateLimit-Policy` / `RateLimit` (IETF draft 11) and/or `X-RateLimit-*` per `style`.
/// `limits` are the limits that applied to the request (its plan's, see
/// [`Route::limits_for`](crate::policy::Route::limits_for)) with their `RateLimit-Policy`.
pub fn add_rate_limit_headers(
    headers: &mut HeaderMap,
    style: HeaderStyle,
    (limits, policy_header): (&[Limit], Option<&HeaderValue>),
    items: &[Item],
    decision: &Decision,
) {
    if style == HeaderStyle::None {
        return;
    }
    let Some((limit, remaining, reset)) = closest(limits, items, decision) else {
        return;
    };
    if style.ietf() {
        if let Some(policy) = policy_header {
            headers.insert(RATELIMIT_POLICY, policy.clone());
        }
        // Written by hand: this runs on every response, and `format!` was a third of the
        // limiter's own cost per request (callgrind).
        let mut value = Vec::with_capacity(limit.name.len() + 32);
        value.push(b'"');
        value.extend_from_slice(limit.name.as_bytes());
        value.extend_from_slice(b"\";r=");
        push_decimal(&mut value, remaining);
        value.extend_from_slice(b";t=");
        push_decimal(&mut value, reset);
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
            headers.insert(RATELIMIT, v);
        }
    }
    if style.legacy() {
        headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(limit.quota));
        headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(remaining));
        headers.insert(X_RATELIMIT_RESET, HeaderValue::from(reset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::policy::Route;
    use http_body_util::BodyExt;
    use std::path::Path;

    fn route(limits: &str) -> crate::policy::Policy {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\ntargets = [\"http://127.0.0.1:1\"]\n[[routes]]\nname = \"api\"\nupstream = \"api\"\nlimits = [{limits}]\n"
        );
        config::parse(&text, "t.toml", Path::new(".")).unwrap()
    }

    fn items(route: &Route) -> Vec<Item> {
        route
            .limits
            .iter()
            .map(|l| Item {
                algorithm: l.algorithm,
                cost: l.cost,
                shadow: l.mode == Mode::Shadow,
                id: l.id,
                tag: [0; 16],
                batch: 0,
                ban: 0,
                delay: 0,
                settles: false,
            })
            .collect()
    }

    fn outcome(allowed: bool, remaining: u64, reset: u64, retry: u64) -> Outcome {
        Outcome {
            allowed,
            remaining,
            reset,
            retry_after: retry,
        }
    }

    #[test]
    fn policy_header_lists_each_limit() {
        let p = route(
            "{ by = \"header:x-api-key\", algorithm = \"token_bucket\", rate = \"10/s\", burst = 100 }, { by = \"header:x-api-key\", algorithm = \"fixed_window\", rate = \"10000/day\" }",
        );
        let r = &p.routes[0];
        assert_eq!(
            r.policy_header.as_ref().unwrap(),
            "\"api/0\";q=100;w=10, \"api/1\";q=10000;w=86400"
        );
        let one = route("{ algorithm = \"gcra\", rate = \"50/s\", burst = 20 }");
        assert_eq!(
            one.routes[0].policy_header.as_ref().unwrap(),
            "\"api\";q=20;w=1"
        );
    }

    #[test]
    fn ratelimit_names_the_closest_limit() {
        let p = route(
            "{ algorithm = \"token_bucket\", rate = \"10/s\", burst = 100 }, { algorithm = \"fixed_window\", rate = \"10000/day\" }",
        );
        let r = &p.routes[0];
        let items = items(r);
        let d = Decision {
            admitted: true,
            receipts: Vec::new(),
            outcomes: vec![
                outcome(true, 97, 300_000, 0),
                outcome(true, 9_990, 5_000_000_000, 0),
            ],
        };
        let mut h = HeaderMap::new();
        add_rate_limit_headers(&mut h, HeaderStyle::Both, r.limits_for(None), &items, &d);
        assert_eq!(h[RATELIMIT], "\"api/0\";r=97;t=1");
        assert_eq!(h[X_RATELIMIT_LIMIT], "100");
        assert_eq!(h[X_RATELIMIT_REMAINING], "97");
        assert_eq!(h[X_RATELIMIT_RESET], "1");
        // Ties on remaining go to the sooner reset.
        let d = Decision {
            admitted: true,
            receipts: Vec::new(),
            outcomes: vec![
                outcome(true, 5, 9_000_000, 0),
                outcome(true, 5, 2_000_000, 0),
            ],
        };
        let mut h = HeaderMap::new();
        add_rate_limit_headers(&mut h, HeaderStyle::Ietf, r.limits_for(None), &items, &d);
        assert_eq!(h[RATELIMIT], "\"api/1\";r=5;t=2");
        assert!(!h.contains_key(X_RATELIMIT_LIMIT));
        // A denying limit shows r=0 even when some units remain (cost larger than them).
        let d = Decision {
            admitted: false,
            receipts: Vec::new(),
            outcomes: vec![
                outcome(true, 50, 1, 0),
                outcome(false, 3, 4_000_000, 4_000_000),
            ],
        };
        let mut h = HeaderMap::new();
        add_rate_limit_headers(&mut h, HeaderStyle::Legacy, r.limits_for(None), &items, &d);
        assert_eq!(h[X_RATELIMIT_REMAINING], "0");
        assert!(!h.contains_key(RATELIMIT));
        assert_eq!(retry_after_secs(&items, &d), 4);
    }

    #[test]
    fn decimals() {
        for n in [0u64, 7, 10, 4_294_967_296, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        let p = route("{ algorithm = \"fixed_window\", rate = \"1/s\" }");
        let items = items(&p.routes[0]);
        for (us, secs) in [(1, 1), (999_999, 1), (1_000_000, 1), (1_000_001, 2), (0, 1)] {
            let d = Decision {
                admitted: false,
                receipts: Vec::new(),
                outcomes: vec![outcome(false, 0, us, us)],
            };
            assert_eq!(retry_after_secs(&items, &d), secs, "{us}");
        }
    }

    #[test]
    fn shadow_limits_are_listed_and_reported_after_enforced_ones() {
        let p = route("{ algorithm = \"fixed_window\", rate = \"1/s\", mode = \"shadow\" }");
        assert_eq!(
            p.routes[0].policy_header.as_ref().unwrap(),
            "\"api\";q=1;w=1"
        );
        let one = items(&p.routes[0]);
        let d = Decision {
            admitted: true,
            receipts: Vec::new(),
            outcomes: vec![outcome(false, 0, 1, 1)],
        };
        let mut h = HeaderMap::new();
        add_rate_limit_headers(
            &mut h,
            HeaderStyle::Ietf,
            p.routes[0].limits_for(None),
            &one,
            &d,
        );
        assert_eq!(
            h[RATELIMIT], "\"api\";r=0;t=1",
            "a shadow-only route reports its shadow limit"
        );
        let p = route(
            "{ algorithm = \"fixed_window\", rate = \"1/s\", mode = \"shadow\" }, { algorithm = \"fixed_window\", rate = \"9/s\" }",
        );
        let both = items(&p.routes[0]);
        let d = Decision {
            admitted: true,
            receipts: Vec::new(),
            outcomes: vec![outcome(false, 0, 1, 1), outcome(true, 8, 1, 0)],
        };
        let mut h = HeaderMap::new();
        add_rate_limit_headers(
            &mut h,
            HeaderStyle::Ietf,
            p.routes[0].limits_for(None),
            &both,
            &d,
        );
        assert_eq!(h[RATELIMIT_POLICY], "\"api/0\";q=1;w=1, \"api/1\";q=9;w=1");
        assert_eq!(
            h[RATELIMIT], "\"api/1\";r=8;t=1",
            "the enforced limit is reported"
        );
    }

    #[tokio::test]
    async fn problem_bodies_have_the_required_members() {
        let r = rate_limited("login", 7);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "7");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 429);
        assert_eq!(v["route"], "login");
        assert_eq!(v["retry_after"], 7);
        assert!(v["type"].is_string() && v["title"].is_string() && v["detail"].is_string());
        for (r, status) in [
            (no_route(), 404),
            (store_unavailable("x"), 503),
            (bad_gateway("x"), 502),
            (gateway_timeout("x"), 504),
            (payload_too_large(5), 413),
            (malformed(crate::framing::FramingError::NoHost), 400),
            (
                malformed(crate::framing::FramingError::UnsupportedCoding),
                501,
            ),
            (request_timeout(), 408),
        ] {
            assert_eq!(r.status(), status);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["status"], status);
        }
    }
}
