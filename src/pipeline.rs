//! The life of one request, in order: sanity checks → route → identity → limiter decision →
//! reject (429 / 503) or forward → rate-limit headers → metrics and access log, recorded once.

use std::net::IpAddr;
use std::time::Instant;

use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::app::{App, Runtime};
use crate::framing;
use crate::identity::{self, Subject};
use crate::limiter::{self, Decision, Item};
use crate::logging::{self, Access};
use crate::metrics::Outcome;
use crate::policy::{OnStoreError, Route};
use crate::proxy::{self, ConnInfo, ProxyError, RequestBody};
use crate::response::{self, Body};
use crate::route::RequestView;
use crate::upstream::PooledBody;

/// What the limiter said about one request.
enum Verdict {
    /// The route has no limits.
    Unlimited,
    /// Every enforced limit allowed (and counted) the request.
    Admitted(Vec<Item>, Decision),
    /// A limit rejected it; nothing was counted.
    Rejected(Vec<Item>, Decision),
    /// The store failed or was too slow; the route's `on_store_error` applies.
    StoreFailed(OnStoreError),
}

/// Decrements the in-flight gauge however the request ends (also when the client goes away).
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Content-Length when present and well formed.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Handles one request end to end. Never fails: every failure is a response by now.
pub async fn handle(app: &App, conn: &ConnInfo, request: Request<Incoming>) -> Response<Body> {
    app.metrics.in_flight.inc();
    let _in_flight = InFlight(&app.metrics.in_flight);
    let rt = app.runtime();
    let started = Instant::now();
    let mut access = Access::begin(&request, conn, rt.policy.server.access_log);

    let head = if conn.ambiguous.next_is_ambiguous() {
        Err(framing::FramingError::Ambiguous)
    } else {
        framing::check(request.version(), request.headers())
    };
    if let Err(e) = head {
        let status = e.status();
        app.metrics
            .unrouted
            .get_or_create(&[("status", status.as_str().into())])
            .inc();
        access.finish(status.as_u16(), None, None);
        return response::malformed(e);
    }
    let (mut parts, body) = request.into_parts();
    if let Err(e) = framing::check_target(&parts, rt.policy.server.escaped_slashes) {
        let status = e.status();
        app.metrics
            .unrouted
            .get_or_create(&[("status", status.as_str().into())])
            .inc();
        access.finish(status.as_u16(), None, None);
        return response::malformed(e);
    }
    // One host for routing and forwarding: a request target or :authority with a host wins
    // over a Host header (RFC 9112 §3.2.2), so a route matched on one host cannot forward
    // to another.
    if let Some(authority) = parts.uri.authority()
        && parts.headers.get(header::HOST).map(|h| h.as_bytes())
            != Some(authority.as_str().as_bytes())
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
    let found = rt.policy.route_for(&RequestView::new(&parts));
    let Some((index, route)) = found else {
        app.metrics
            .unrouted
            .get_or_create(&[("status", "404".into())])
            .inc();
        access.finish(404, None, None);
        return response::no_route();
    };
    let route_metrics = &rt.route_metrics[index];
    access.route = Some(route.name.clone());
    let max_body = rt.policy.server.max_body;

    // A body that says up front it is too large is refused before it costs any budget.
    if let (Some(max), Some(len)) = (max_body, content_length(&parts.headers))
        && len > max
    {
        route_metrics.response(413);
        access.finish(413, None, None);
        return response::payload_too_large(max);
    }

    let client = identity::client_ip(
        conn.peer.ip(),
        &parts.headers,
        &rt.policy.server.trusted_proxies,
    );
    access.client = Some(client);
    let verdict = decide(&rt, route, &parts, client).await;
    let (outcome, early) = match &verdict {
        Verdict::Unlimited => (Some(Outcome::Allowed), None),
        Verdict::Admitted(items, d) if d.shadow_rejected(items) => {
            logging::shadow_rejected(&route.name, client);
            (Some(Outcome::ShadowRejected), None)
        }
        Verdict::Admitted(..) => (Some(Outcome::Allowed), None),
        Verdict::Rejected(items, d) => {
            let retry = response::retry_after_secs(items, d);
            logging::rejected(&route.name, client, retry);
            (
                Some(Outcome::Rejected),
                Some(response::rate_limited(&route.name, retry)),
            )
        }
        Verdict::StoreFailed(OnStoreError::Allow) => (Some(Outcome::StoreError), None),
        Verdict::StoreFailed(OnStoreError::Deny) => (
            Some(Outcome::StoreError),
            Some(response::store_unavailable(&route.name)),
        ),
    };

    let mut response = match early {
        Some(r) => r,
        None => {
            let upstream_started = Instant::now();
            let parts_version = parts.version;
            let forwarded = forward(&rt, route, conn, parts, body).await;
            let elapsed = upstream_started.elapsed();
            route_metrics
                .upstream_duration
                .observe(elapsed.as_secs_f64());
            access.upstream = Some(elapsed);
            match forwarded {
                Ok(r) => {
                    if r.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        // What follows on this connection is not HTTP/1 any more.
                        conn.ambiguous.switched();
                    }
                    let pace = (parts_version != http::Version::HTTP_2)
                        .then(|| conn.writes.clone())
                        .flatten();
                    r.map(|b| Either::Left(b.paced_by(pace)))
                }
                Err(ProxyError::BadRequestBody(e)) => {
                    logging::bad_request_body(&route.name, &e);
                    response::malformed(framing::FramingError::MalformedBody)
                }
                Err(e) => {
                    logging::upstream_error(&route.name, &e);
                    proxy_error(&e)
                }
            }
        }
    };

    if let Verdict::Admitted(items, d) | Verdict::Rejected(items, d) = &verdict {
        response::add_rate_limit_headers(
            response.headers_mut(),
            rt.policy.server.rate_limit_headers,
            route,
            items,
            d,
        );
    }
    if let Some(outcome) = outcome {
        route_metrics.decision(outcome);
    }
    let status = response.status().as_u16();
    route_metrics.response(status);
    access.finish(status, outcome, Some(started.elapsed()));
    response
}

/// Asks the store, within its timeout.
async fn decide(rt: &Runtime, route: &Route, parts: &Parts, client: IpAddr) -> Verdict {
    if !route.is_limited() {
        return Verdict::Unlimited;
    }
    let subject = Subject {
        parts,
        ip: identity::counted_ip(client, rt.policy.server.ipv6_prefix),
    };
    let items = limiter::items_for(route, &subject);
    let result = rt.limiter.decide(&items).await;
    match result {
        Ok(d) if d.admitted => Verdict::Admitted(items, d),
        Ok(d) => Verdict::Rejected(items, d),
        Err(e) => {
            logging::store_error(&route.name, &e);
            Verdict::StoreFailed(route.on_store_error)
        }
    }
}

/// Prepares the request's headers for the upstream and sends it.
async fn forward(
    rt: &Runtime,
    route: &Route,
    conn: &ConnInfo,
    mut parts: Parts,
    body: Incoming,
) -> Result<Response<PooledBody>, ProxyError> {
    let server = &rt.policy.server;
    // The received Host as is (a refcount, no copy); HTTP/2 carries it as :authority.
    let host = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let upgrade = proxy::allowed_upgrade(&mut parts.headers, &server.upgrades);
    let peer_trusted = identity::is_trusted(conn.peer.ip(), &server.trusted_proxies);
    proxy::strip_hop_by_hop(&mut parts.headers, upgrade, &rt.policy.key_headers);
    // The upstream request's framing is hyper's, computed from the body: never the client's.
    parts.headers.remove(header::CONTENT_LENGTH);
    proxy::set_forwarding_headers(
        &mut parts.headers,
        conn,
        peer_trusted,
        host.as_ref(),
        parts.version,
    );
    if let Some(host) = host
        && !parts.headers.contains_key(header::HOST)
    {
        // HTTP/2 carries the host as :authority; HTTP/1.1 upstreams need it as Host.
        parts.headers.insert(header::HOST, host);
    }
    let (body, watch) = RequestBody::new(body, server.max_body, server.body_idle_timeout);
    let upstream = &route.upstream;
    let target = upstream.pick();
    proxy::forward(
        upstream,
        target,
        &rt.upstream_pools[upstream.index][target],
        Request::from_parts(parts, body),
        &watch,
        server.max_body,
        proxy::Tunnel {
            idle: server.upgrade_idle_timeout,
            cut: &conn.cut,
        },
    )
    .await
}

/// Every forwarding failure, mapped to its response in one place. The details (addresses,
/// parser messages) go to the log, never into a body a client reads.
fn proxy_error(e: &ProxyError) -> Response<Body> {
    match e {
        ProxyError::Connect(_) => response::bad_gateway("The upstream could not be reached."),
        ProxyError::Upstream(..) => {
            response::bad_gateway("The upstream failed or sent an invalid response.")
        }
        ProxyError::Timeout(..) => {
            response::gateway_timeout("The upstream did not send a response in time.")
        }
        ProxyError::BodyTooLarge(max) => response::payload_too_large(*max),
        ProxyError::BodyIdle => response::request_timeout(),
        ProxyError::BadRequestBody(_) => response::malformed(framing::FramingError::MalformedBody),
    }
}
