//! The life of one request, in order: sanity checks → route → identity (client IP, consumer
//! and plan) → access lists (deny, bypass) → limiter decision → reject (429 / 503 / 403 / 401)
//! or forward → rate-limit headers → metrics and access log, recorded once.
//!
//! [`phases`] runs the steps and leaves by one [`Exit`] when a request cannot go on; [`respond`]
//! maps each exit to its response in one `match`; [`handle`] adds the rate-limit headers and
//! records metrics and the access log once, from the final response.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::app::{App, Runtime};
use crate::body::RequestBody;
use crate::conn::ConnInfo;
use crate::consumers::{PlanId, Resolved};
use crate::framing;
use crate::identity::{self, Subject};
use crate::limiter::{self, Decision, Item, StoreError};
use crate::logging::{self, Access};
use crate::metrics::Outcome;
use crate::policy::{Admission, OnStoreError, Route};
use crate::proxy::{self, ProxyError};
use crate::response::{self, Body};
use crate::route::RequestView;
use crate::settle::{Pending, Settled};
use crate::telemetry::{self, RequestTrace};
use crate::upstream::PooledBody;

/// What the limiter (or an access rule before it) said about one request.
enum Verdict {
    /// The route has no limits (or none for the request's plan).
    Unlimited,
    /// The route's `bypass` list names the client: forwarded, not counted.
    Bypassed,
    /// The route's `deny` list names the client: 403.
    Denied,
    /// `unknown = "reject"` and the request names no known consumer: 401.
    UnknownConsumer,
    /// Every enforced limit allowed (and counted) the request.
    Admitted(Vec<Item>, Decision),
    /// A limit rejected it; nothing was counted.
    Rejected(Vec<Item>, Decision),
    /// The store failed or was too slow; the route's `on_store_error` applies.
    StoreFailed(OnStoreError),
}

impl Verdict {
    /// The decision as the metrics count it.
    fn outcome(&self) -> Outcome {
        match self {
            Verdict::Unlimited => Outcome::Allowed,
            Verdict::Bypassed => Outcome::Bypassed,
            Verdict::Denied => Outcome::Denied,
            Verdict::UnknownConsumer => Outcome::UnknownConsumer,
            Verdict::Admitted(items, d) if d.shadow_rejected(items) => Outcome::ShadowRejected,
            Verdict::Admitted(..) => Outcome::Allowed,
            Verdict::Rejected(..) => Outcome::Rejected,
            Verdict::StoreFailed(_) => Outcome::StoreError,
        }
    }
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

/// Why a request ends before (or instead of) an upstream response: every way out of the
/// pipeline, each mapped to its response in [`respond`].
enum Exit {
    /// A request head or target tollgate will not forward (400, 405, 501).
    Malformed(framing::FramingError),
    /// No route matches (404).
    NoRoute,
    /// `Content-Length` says the body is over `max_body` (413), before any budget is spent.
    TooLarge(u64),
    /// A limit rejected the request (429, or the route's own `rejection`).
    RateLimited { retry_after: u64 },
    /// The route's `deny` list names the client (403).
    Denied,
    /// The route needs a known consumer and the request names none (401).
    UnknownConsumer,
    /// The store failed and the route fails closed (503).
    StoreDown,
    /// Forwarding failed (502, 504, 413, 408, or the client's own 400 for a bad body).
    Upstream(ProxyError),
}

/// What one request came to, filled in as the phases run; recorded once at the end.
#[derive(Default)]
struct Trail<'r> {
    route: Option<(usize, &'r Route)>,
    verdict: Option<Verdict>,
    /// The plan whose limits applied.
    plan: Option<PlanId>,
    /// The request's trace, with `[telemetry]`.
    trace: Option<RequestTrace>,
}

/// Handles one request end to end. Never fails: every failure is a response by now.
pub async fn handle(app: &App, conn: &ConnInfo, request: Request<Incoming>) -> Response<Body> {
    app.metrics.in_flight.inc();
    let _in_flight = InFlight(&app.metrics.in_flight);
    let rt = app.runtime();
    let started = Instant::now();
    let mut access = Access::begin(&request, conn, rt.policy.server.access_log);
    let mut trail = Trail {
        trace: rt
            .tracer
            .as_ref()
            .map(|t| t.start(request.headers(), started)),
        ..Trail::default()
    };
    let grpc = response::is_grpc(request.headers());

    let mut response = match phases(&rt, conn, request, &mut trail, &mut access).await {
        Ok(response) => response,
        Err(exit) => respond(exit, trail.route.map(|(_, r)| r), grpc),
    };

    // Recorded once, from the final response.
    let status = response.status().as_u16();
    let outcome = trail.verdict.as_ref().map(Verdict::outcome);
    if let (Some(tracer), Some(mut trace)) = (&rt.tracer, trail.trace.take()) {
        if let Some(outcome) = outcome {
            trace.decided(outcome.as_str());
        }
        tracer.finish(trace, status, Instant::now());
    }
    let Some((index, route)) = trail.route else {
        app.metrics
            .unrouted
            .get_or_create(&[("status", response.status().as_str().into())])
            .inc();
        access.finish(status, None, None);
        return response;
    };
    if let Some(Verdict::Admitted(items, d) | Verdict::Rejected(items, d)) = &trail.verdict {
        response::add_rate_limit_headers(
            response.headers_mut(),
            rt.policy.server.rate_limit_headers,
            route.limits_for(trail.plan),
            items,
            d,
        );
    }
    let route_metrics = &rt.route_metrics[index];
    if let Some(outcome) = outcome {
        route_metrics.decision(outcome);
    }
    route_metrics.response(status);
    access.finish(status, outcome, trail.verdict.is_some().then_some(started));
    response
}

/// The phases of one request, in order, up to the upstream's response; any phase may exit.
async fn phases<'r>(
    rt: &'r Arc<Runtime>,
    conn: &ConnInfo,
    request: Request<Incoming>,
    trail: &mut Trail<'r>,
    access: &mut Access,
) -> Result<Response<Body>, Exit> {
    if conn.ambiguous.next_is_ambiguous() {
        return Err(Exit::Malformed(framing::FramingError::Ambiguous));
    }
    framing::check(request.version(), request.headers()).map_err(Exit::Malformed)?;
    let (mut parts, body) = request.into_parts();
    if let Some(t) = trail.trace.as_mut() {
        t.head(&parts);
    }
    framing::check_target(&parts, rt.policy.server.escaped_slashes).map_err(Exit::Malformed)?;
    select_host(&mut parts);

    let (index, route) = rt
        .policy
        .route_for(&RequestView::new(&parts))
        .ok_or(Exit::NoRoute)?;
    trail.route = Some((index, route));
    access.set_route(&route.name);
    if let Some(t) = trail.trace.as_mut() {
        t.route(&route.name);
    }

    // A body that says up front it is too large is refused before it costs any budget.
    let max_body = rt.policy.server.max_body;
    if let (Some(max), Some(len)) = (max_body, content_length(&parts.headers))
        && len > max
    {
        return Err(Exit::TooLarge(max));
    }

    let client = identity::client_ip(
        conn.peer.ip(),
        &parts.headers,
        &rt.policy.server.trusted_proxies,
    );
    access.client = Some(client);
    let consumers = rt.policy.consumers.as_ref();
    // The bearer token is verified (or found in the cache) once, when anything reads it.
    let token = rt.policy.jwt.as_ref().and_then(|jwt| {
        let wanted = route.needs_token
            || consumers.is_some_and(|c| matches!(c.key, crate::consumers::KeyFrom::Jwt(..)));
        wanted.then(|| jwt.check(&parts.headers))
    });
    let who = consumers.map_or_else(Resolved::default, |c| c.resolve(&parts, token.as_ref()));
    trail.plan = who.plan;
    if let Some(t) = trail.trace.as_mut() {
        t.client(client);
        let plan = who
            .plan
            .zip(consumers)
            .map(|(p, c)| &c.plans[usize::from(p)]);
        t.consumer(who.name, plan);
    }
    let verdict = match route.access(client, &who, consumers) {
        Admission::Denied => Verdict::Denied,
        Admission::Bypassed => Verdict::Bypassed,
        Admission::UnknownConsumer => Verdict::UnknownConsumer,
        Admission::Limited => {
            let claims = match &token {
                Some(Ok(claims)) => Some(&**claims),
                _ => None,
            };
            let sampled = trail.trace.as_ref().is_some_and(RequestTrace::sampled);
            let asked = sampled.then(Instant::now);
            let verdict = decide(rt, index, &parts, client, &who, claims).await;
            if let (Some(asked), Some(t)) = (asked, trail.trace.as_mut()) {
                decision_span(t, asked, &verdict, rt.limiter.store().backend_name());
            }
            verdict
        }
    };
    let stop = match &verdict {
        Verdict::Unlimited | Verdict::Bypassed | Verdict::StoreFailed(OnStoreError::Allow) => None,
        Verdict::Denied => Some(Exit::Denied),
        Verdict::UnknownConsumer => Some(Exit::UnknownConsumer),
        Verdict::Admitted(items, d) => {
            if d.shadow_rejected(items) {
                logging::shadow_rejected(&route.name, client);
            }
            None
        }
        Verdict::Rejected(items, d) => {
            let retry_after = response::retry_after_secs(items, d);
            logging::rejected(&route.name, client, retry_after);
            Some(Exit::RateLimited { retry_after })
        }
        Verdict::StoreFailed(OnStoreError::Deny) => Some(Exit::StoreDown),
    };
    // Reservations the response settles (count, cost_from, concurrency, held requests).
    let (mut pending, hold) = match &verdict {
        Verdict::Admitted(items, d) => {
            let (limits, _) = route.limits_for(trail.plan);
            let hold = d.hold();
            (Pending::new(rt, limits, items, d, hold > 0), hold)
        }
        _ => (None, 0),
    };
    trail.verdict = Some(verdict);
    if let Some(exit) = stop {
        return Err(exit);
    }
    if hold > 0 {
        // A `delay` limit took this request's slot ahead of time: it waits for it here,
        // holding no upstream connection; a client that leaves now gives the slot back.
        tokio::time::sleep(Duration::from_micros(hold)).await;
    }
    if let Some(p) = pending.as_mut() {
        p.forwarded();
    }

    let traceparent = trail.trace.as_mut().map(RequestTrace::upstream_traceparent);
    let upstream_started = Instant::now();
    let version = parts.version;
    let forwarded = forward(rt, route, conn, parts, body, &who, traceparent).await;
    let elapsed = upstream_started.elapsed();
    if let Some(t) = trail.trace.as_mut().filter(|t| t.sampled()) {
        let result = match &forwarded {
            Ok(response) => Ok(response.status().as_u16()),
            Err(e) => Err(e.to_string()),
        };
        let ended = upstream_started + elapsed;
        t.upstream_span(upstream_started, ended, &route.upstream.name, result);
    }
    rt.route_metrics[index]
        .upstream_duration
        .observe(elapsed.as_secs_f64());
    access.upstream = Some(elapsed);
    let response = match forwarded {
        Ok(response) => response,
        Err(e) => {
            if let Some(p) = pending.as_mut() {
                p.at_head(upstream_error_status(&e), &HeaderMap::new())
                    .await;
            }
            return Err(Exit::Upstream(e));
        }
    };
    if let Some(p) = pending.as_mut() {
        p.at_head(response.status().as_u16(), response.headers())
            .await;
    }
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        // What follows on this connection is not HTTP/1 any more.
        conn.ambiguous.switched();
    }
    // An HTTP/1 client's socket paces the upstream body (HTTP/2 has its own flow control).
    let pace = (version != http::Version::HTTP_2)
        .then(|| conn.writes.clone())
        .flatten();
    Ok(response.map(|b| Either::Left(Settled::new(b.paced_by(pace), pending))))
}

/// The store decision's span (none for a route without limits for the request).
fn decision_span(t: &mut RequestTrace, asked: Instant, verdict: &Verdict, store: &'static str) {
    let (limits, error) = match verdict {
        Verdict::Admitted(items, _) | Verdict::Rejected(items, _) => (items.len(), None),
        Verdict::StoreFailed(_) => (0, Some("the store failed or did not answer in time".into())),
        _ => return,
    };
    t.decision_span(
        asked,
        Instant::now(),
        store,
        verdict.outcome().as_str(),
        limits,
        error,
    );
}

/// The status tollgate answers a failed forward with (what a `count` limit sees).
fn upstream_error_status(e: &ProxyError) -> u16 {
    match e {
        ProxyError::Connect(_) | ProxyError::Upstream(..) => 502,
        ProxyError::Saturated(..) => 503,
        ProxyError::Timeout(..) => 504,
        ProxyError::BodyTooLarge(_) => 413,
        ProxyError::BodyIdle => 408,
        ProxyError::BadRequestBody(_) => 400,
    }
}

/// One host for routing and forwarding: a request target or `:authority` with a host wins
/// over a Host header (RFC 9112 §3.2.2; [`framing::check_target`] has made sure they agree
/// once normalised), so a route matched on one host cannot forward to another.
fn select_host(parts: &mut Parts) {
    if let Some(authority) = parts.uri.authority()
        && parts.headers.get(header::HOST).map(|h| h.as_bytes())
            != Some(authority.as_str().as_bytes())
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
}

/// Every way out, mapped to its response in one place. Forwarding details (addresses, parser
/// messages) go to the log, never into a body a client reads.
/// A gRPC request (`grpc`) gets each refusal tollgate makes as a trailers-only gRPC answer.
fn respond(exit: Exit, route: Option<&Route>, grpc: bool) -> Response<Body> {
    let rejection = route.and_then(|r| r.rejection.as_ref());
    let route = route.map_or("-", |r| &*r.name);
    if let Exit::Upstream(e) = &exit {
        match e {
            ProxyError::BadRequestBody(message) => logging::bad_request_body(route, message),
            ProxyError::Connect(_)
            | ProxyError::Timeout(..)
            | ProxyError::Upstream(..)
            | ProxyError::Saturated(..)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::BodyIdle => logging::upstream_error(route, e),
        }
    }
    if grpc && let Some((status, message, retry_after)) = grpc_status(&exit) {
        return response::grpc(status, message, retry_after);
    }
    match exit {
        Exit::Malformed(e) => response::malformed(e),
        Exit::NoRoute => response::no_route(),
        Exit::TooLarge(max) => response::payload_too_large(max),
        Exit::RateLimited { retry_after } => match rejection {
            Some(own) => response::custom_rejection(own, retry_after),
            None => response::rate_limited(route, retry_after),
        },
        Exit::Denied => response::denied(route),
        Exit::UnknownConsumer => response::unknown_consumer(route),
        Exit::StoreDown => response::store_unavailable(route),
        Exit::Upstream(e) => match e {
            ProxyError::Connect(_) => response::bad_gateway("The upstream could not be reached."),
            ProxyError::Saturated(..) => response::upstream_saturated(route),
            ProxyError::Upstream(..) => {
                response::bad_gateway("The upstream failed or sent an invalid response.")
            }
            ProxyError::Timeout(..) => {
                response::gateway_timeout("The upstream did not send a response in time.")
            }
            ProxyError::BodyTooLarge(max) => response::payload_too_large(max),
            ProxyError::BodyIdle => response::request_timeout(),
            ProxyError::BadRequestBody(_) => {
                response::malformed(framing::FramingError::MalformedBody)
            }
        },
    }
}

/// The gRPC status (code, message, Retry-After seconds) of a refusal; `None` where the answer
/// stays plain HTTP (a malformed request, a bad request body, a stalled upload).
fn grpc_status(exit: &Exit) -> Option<(u8, &'static str, Option<u64>)> {
    use response::grpc_code as code;
    Some(match exit {
        Exit::RateLimited { retry_after } => (
            code::RESOURCE_EXHAUSTED,
            "rate limit exceeded",
            Some(*retry_after),
        ),
        Exit::StoreDown => (
            code::UNAVAILABLE,
            "the rate-limit store is unavailable",
            Some(1),
        ),
        Exit::Denied => (
            code::PERMISSION_DENIED,
            "denied by the route's deny list",
            None,
        ),
        Exit::UnknownConsumer => (code::UNAUTHENTICATED, "a known API key is needed", None),
        Exit::NoRoute => (code::UNIMPLEMENTED, "no route matches", None),
        Exit::TooLarge(_) | Exit::Upstream(ProxyError::BodyTooLarge(_)) => {
            (code::RESOURCE_EXHAUSTED, "the request is too large", None)
        }
        Exit::Upstream(ProxyError::Timeout(..)) => (
            code::DEADLINE_EXCEEDED,
            "the upstream did not answer in time",
            None,
        ),
        Exit::Upstream(ProxyError::Connect(_) | ProxyError::Upstream(..)) => {
            (code::UNAVAILABLE, "the upstream is unavailable", None)
        }
        Exit::Upstream(ProxyError::Saturated(..)) => (
            code::UNAVAILABLE,
            "every connection to the upstream is busy",
            Some(1),
        ),
        Exit::Malformed(_)
        | Exit::Upstream(ProxyError::BadRequestBody(_) | ProxyError::BodyIdle) => return None,
    })
}

/// Asks the store, within its timeout, about the limits of the request's plan.
async fn decide(
    rt: &Arc<Runtime>,
    index: usize,
    parts: &Parts,
    client: IpAddr,
    who: &Resolved<'_>,
    claims: Option<&crate::jwt::Claims>,
) -> Verdict {
    let route = &rt.policy.routes[index];
    let (limits, _) = route.limits_for(who.plan);
    if limits.is_empty() {
        return Verdict::Unlimited;
    }
    let subject = Subject {
        parts,
        ip: identity::counted_ip(client, rt.policy.server.ipv6_prefix),
        consumer: who.name,
        claims,
    };
    let items = limiter::items_for(limits, &route.keys, &subject);
    let result = if items.iter().any(Item::settles_later) {
        detached_decision(rt, index, who.plan, items.clone()).await
    } else {
        rt.limiter.decide(&items).await
    };
    match result {
        Ok(d) if d.admitted => Verdict::Admitted(items, d),
        Ok(d) => Verdict::Rejected(items, d),
        Err(e) => {
            logging::store_error(&route.name, &e);
            Verdict::StoreFailed(route.on_store_error)
        }
    }
}

/// A decision that takes reservations the response settles, made in a task of its own: a
/// client that goes away while the store decides (its request's future dropped) must not
/// leave them behind. The decision travels as an [`Unclaimed`]: whether nobody is left to
/// receive it, or the request is dropped after it arrived but before it was read, what it
/// took is given back, as for a request never forwarded.
async fn detached_decision(
    rt: &Arc<Runtime>,
    index: usize,
    plan: Option<PlanId>,
    items: Vec<Item>,
) -> Result<Decision, StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = rt.clone();
    tokio::spawn(async move {
        let result = rt.limiter.decide(&items).await;
        let _ = tx.send(result.map(|decision| Unclaimed {
            rt,
            index,
            plan,
            items,
            decision: Some(decision),
        }));
    });
    match rx.await {
        Ok(result) => result.map(Unclaimed::claim),
        Err(_) => Err(StoreError::Reply("the decision task ended early".into())),
    }
}

/// A decision on its way to its request; dropped unread, it gives back what it took.
struct Unclaimed {
    rt: Arc<Runtime>,
    index: usize,
    plan: Option<PlanId>,
    items: Vec<Item>,
    decision: Option<Decision>,
}

impl Unclaimed {
    fn claim(mut self) -> Decision {
        self.decision.take().expect("claimed once")
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(decision) = self.decision.take()
            && decision.admitted
        {
            let (limits, _) = self.rt.policy.routes[self.index].limits_for(self.plan);
            drop(Pending::new(&self.rt, limits, &self.items, &decision, true));
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
    who: &Resolved<'_>,
    traceparent: Option<HeaderValue>,
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
    // After the hop-by-hop pass: a `Connection` nomination cannot remove what tollgate sets.
    proxy::set_consumer_headers(&mut parts.headers, rt.policy.consumers.as_ref(), who);
    if let Some(traceparent) = traceparent {
        // The client's own `traceparent` (continued in ours) gives way to the one naming
        // tollgate's upstream span.
        parts.headers.insert(&telemetry::TRACEPARENT, traceparent);
    }
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
    let pools = &rt.upstream_pools[upstream.index];
    let target = crate::upstream::health::choose(upstream.pick(), pools);
    proxy::forward(
        upstream,
        proxy::Targets {
            chosen: target,
            pools,
            durations: &rt.target_durations[upstream.index],
        },
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
