//! The operator's view of counters (`GET` / `DELETE /v1/counters?route=R&ID`) and of the proxy
//! (`GET /v1/status`): an identity named in a query string (`ip=`, `consumer=` or `value=`)
//! turned into the store items a real request of that identity would use, limit by limit, so
//! that what is read or reset is exactly what requests count. A raw `value=` is hashed like
//! any key and never echoed.

use std::net::IpAddr;

use http::request::Parts;
use serde_json::{Value, json};

use crate::app::Runtime;
use crate::identity::{self, Subject};
use crate::jwt::Claims;
use crate::limiter::{Decision, Item, StoreError};
use crate::policy::{KeySource, KeySpec, Limit, Route};
use crate::response::ceil_secs;

/// Who the operator asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A client address: limits by IP, and the anonymous counters (no key, no consumer) of it.
    Ip(IpAddr),
    /// A consumer by name: limits by consumer, with the consumer's plan.
    Consumer(String),
    /// A raw key value: limits by a header, a query parameter or a JWT claim.
    Value(String),
}

/// A query string the counters API cannot use: the parameter and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct QueryError {
    pub param: &'static str,
    pub message: String,
}

fn bad(param: &'static str, message: impl Into<String>) -> QueryError {
    QueryError {
        param,
        message: message.into(),
    }
}

/// The longest query string read.
pub const MAX_QUERY: usize = 8 * 1024;

/// `route=R` and exactly one of `ip=`, `consumer=`, `value=`.
pub fn parse_query(query: &str) -> Result<(String, Identity), QueryError> {
    if query.len() > MAX_QUERY {
        return Err(bad("query", format!("longer than {MAX_QUERY} bytes")));
    }
    let mut route = None;
    let mut identity = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let found = match &*name {
            "route" => {
                if route.replace(value.into_owned()).is_some() {
                    return Err(bad("route", "given twice"));
                }
                continue;
            }
            "ip" => match value.trim().parse::<IpAddr>() {
                Ok(ip) => Identity::Ip(ip),
                Err(_) => return Err(bad("ip", "not an IP address")),
            },
            "consumer" if !value.is_empty() => Identity::Consumer(value.into_owned()),
            "value" if !value.is_empty() => Identity::Value(value.into_owned()),
            "consumer" => return Err(bad("consumer", "empty")),
            "value" => return Err(bad("value", "empty")),
            _ => {
                return Err(bad(
                    "query",
                    "unknown parameter; expected route and one of ip, consumer, value",
                ));
            }
        };
        if identity.replace(found).is_some() {
            return Err(bad("ip", "give exactly one of ip, consumer, value"));
        }
    }
    let route = route.ok_or_else(|| bad("route", "missing"))?;
    let identity = identity.ok_or_else(|| bad("ip", "give one of ip, consumer, value"))?;
    Ok((route, identity))
}

/// Whether `identity` names a counter of `spec`, and the subject that reproduces it.
fn addressable(spec: &KeySpec, identity: &Identity) -> bool {
    spec.0.iter().all(|source| match (source, identity) {
        // One counter for everybody: not one identity's to read or reset.
        (KeySource::Global, _) => false,
        (KeySource::Ip, Identity::Ip(_)) => true,
        (KeySource::Ip, _) => false,
        // An IP identity reads the anonymous counters: the source absent, counted by IP.
        (KeySource::Header(_) | KeySource::Query(_) | KeySource::Jwt(..), Identity::Ip(_)) => true,
        (KeySource::Header(_) | KeySource::Query(_) | KeySource::Jwt(..), Identity::Value(_)) => {
            true
        }
        (
            KeySource::Header(_) | KeySource::Query(_) | KeySource::Jwt(..),
            Identity::Consumer(_),
        ) => false,
        (KeySource::Consumer, Identity::Consumer(_) | Identity::Ip(_)) => true,
        (KeySource::Consumer, Identity::Value(_)) => false,
    })
}

/// A request of `identity` as the limits of `spec` see it.
fn request_parts(spec: &KeySpec, identity: &Identity) -> Parts {
    let mut request = http::Request::builder();
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Identity::Value(raw) = identity {
        for source in &spec.0 {
            match source {
                KeySource::Header(name) => {
                    request = request.header(name, raw.as_str());
                }
                KeySource::Query(name) => {
                    query.append_pair(name, raw);
                }
                _ => {}
            }
        }
    }
    let query = query.finish();
    let uri = if query.is_empty() {
        "/".to_string()
    } else {
        format!("/?{query}")
    };
    request
        .uri(uri)
        .body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| http::Request::new(()).into_parts().0)
}

/// One limit of the route for the identity: its item, or `None` where the identity does not
/// name one of its counters.
pub struct Addressed<'p> {
    pub limit: &'p Limit,
    pub item: Option<Item>,
}

/// The route's limits (as the identity's plan has them) with the items of the identity.
pub fn address<'p>(rt: &'p Runtime, route: &'p Route, identity: &Identity) -> Vec<Addressed<'p>> {
    let consumers = rt.policy.consumers.as_ref();
    let plan = match identity {
        Identity::Consumer(name) => consumers.and_then(|c| {
            c.by_name
                .get(name.as_str())
                .and_then(|&i| c.get(i).plan)
                .or(c.default_plan)
        }),
        _ => consumers.and_then(|c| c.default_plan),
    };
    let (limits, _) = route.limits_for(plan);
    let ip = match identity {
        Identity::Ip(ip) => identity::counted_ip(*ip, rt.policy.server.ipv6_prefix),
        _ => IpAddr::from([0, 0, 0, 0]),
    };
    let jwt = rt.policy.jwt.as_ref();
    limits
        .iter()
        .map(|limit| {
            let spec = &route.keys[limit.key];
            if !addressable(spec, identity) {
                return Addressed { limit, item: None };
            }
            let parts = request_parts(spec, identity);
            let claims = match (identity, jwt) {
                (Identity::Value(raw), Some(jwt)) => Some(Claims(
                    (0..jwt.claims.len())
                        .map(|_| Some(raw.as_str().into()))
                        .collect(),
                )),
                _ => None,
            };
            let subject = Subject {
                parts: &parts,
                ip,
                consumer: match identity {
                    Identity::Consumer(name) => Some(name.as_str()),
                    _ => None,
                },
                claims: claims.as_ref(),
            };
            let item =
                crate::limiter::items_for(std::slice::from_ref(limit), &route.keys, &subject).pop();
            Addressed { limit, item }
        })
        .collect()
}

/// What the identity is called in answers: never a raw value.
fn identity_json(identity: &Identity) -> Value {
    match identity {
        Identity::Ip(ip) => json!({ "ip": ip.to_string() }),
        Identity::Consumer(name) => json!({ "consumer": name }),
        Identity::Value(_) => json!({ "value": "(hashed, not shown)" }),
    }
}

fn limit_json(limit: &Limit) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("name".into(), limit.name.clone().into());
    m.insert("algorithm".into(), limit.algorithm.kind().name().into());
    m.insert("rate".into(), limit.rate_text.clone().into());
    m.insert("quota".into(), limit.quota.into());
    m.insert("window".into(), limit.window_secs.into());
    m
}

/// The `GET` answer: each limit's budget for the identity, as the store has it now.
pub async fn read(rt: &Runtime, route: &Route, identity: &Identity) -> Result<Value, StoreError> {
    let addressed = address(rt, route, identity);
    let items: Vec<Item> = addressed.iter().filter_map(|a| a.item).collect();
    let decision = if items.is_empty() {
        Decision {
            admitted: true,
            outcomes: Vec::new(),
            receipts: Vec::new(),
        }
    } else {
        rt.limiter.peek(&items).await?
    };
    let mut outcomes = decision.outcomes.into_iter();
    let limits: Vec<Value> = addressed
        .iter()
        .map(|a| {
            let mut m = limit_json(a.limit);
            match a.item.and_then(|item| outcomes.next().map(|o| (item, o))) {
                Some((item, o)) => {
                    // The store answers as if one more request came (what it would leave);
                    // the budget now is that plus the request's cost.
                    let now = if o.allowed {
                        o.remaining + item.cost
                    } else {
                        o.remaining
                    };
                    m.insert("addressed".into(), true.into());
                    m.insert("remaining".into(), now.into());
                    m.insert("reset".into(), ceil_secs(o.reset).into());
                    m.insert("retry_after".into(), ceil_secs(o.retry_after).into());
                    m.insert("would_admit".into(), o.allowed.into());
                }
                None => {
                    m.insert("addressed".into(), false.into());
                }
            }
            Value::Object(m)
        })
        .collect();
    Ok(json!({
        "route": &*route.name,
        "identity": identity_json(identity),
        "store": rt.limiter.store().backend_name(),
        "limits": limits,
    }))
}

/// The `DELETE` answer: the identity's counters on the route reset, here and in the store.
pub async fn reset(rt: &Runtime, route: &Route, identity: &Identity) -> Result<Value, StoreError> {
    let addressed = address(rt, route, identity);
    let items: Vec<Item> = addressed.iter().filter_map(|a| a.item).collect();
    let deleted = if items.is_empty() {
        0
    } else {
        rt.limiter.reset(&items).await?
    };
    let names: Vec<&str> = addressed
        .iter()
        .filter(|a| a.item.is_some())
        .map(|a| a.limit.name.as_str())
        .collect();
    Ok(json!({
        "route": &*route.name,
        "identity": identity_json(identity),
        "reset": names,
        "states_deleted": deleted,
    }))
}

/// `GET /v1/status`: config hash and last reload, store (breakers, p99 decision time), each
/// upstream's targets and their health, and every route with its limits, decision counts and p99 upstream time (from the histograms,
/// interpolated within a bucket).
pub fn status(rt: &Runtime, metrics: &crate::metrics::Metrics) -> Value {
    let text = metrics.render();
    let routes: Vec<Value> = rt
        .policy
        .routes
        .iter()
        .zip(&rt.route_metrics)
        .map(|(route, metrics)| {
            let mut decisions = serde_json::Map::new();
            for (outcome, n) in metrics.decision_counts() {
                decisions.insert(outcome.as_str().into(), n.into());
            }
            let p99 = crate::metrics::quantile(
                &text,
                "tollgate_upstream_duration_seconds",
                &[("route", &route.name)],
                0.99,
            );
            json!({
                "name": &*route.name,
                "upstream": route.upstream.name,
                "upstream_p99_ms": p99.map(|s| s * 1000.0),
                "limits": route.limits.iter().map(|l| Value::Object(limit_json(l))).collect::<Vec<_>>(),
                "decisions": decisions,
            })
        })
        .collect();
    let store = rt.limiter.store();
    let upstreams = upstreams_json(rt, &text);
    let backend = store.backend_name();
    let p99 = crate::metrics::quantile(
        &text,
        "tollgate_store_duration_seconds",
        &[("backend", backend)],
        0.99,
    );
    let last_reload = metrics
        .last_reload()
        .map(|(ok, at)| json!({ "result": if ok { "ok" } else { "failed" }, "unix": at }));
    json!({
        "config_hash": rt.policy.source_hash,
        "last_reload": last_reload,
        "store": {
            "backend": backend,
            "open_breakers": store.open_breakers(),
            "decision_p99_ms": p99.map(|s| s * 1000.0),
        },
        "upstreams": upstreams,
        "routes": routes,
    })
}

/// Every upstream with its targets: whether each gets requests (health checks, refused
/// connections), and its p99 time to a response head.
fn upstreams_json(rt: &Runtime, text: &str) -> Vec<Value> {
    rt.policy
        .upstreams
        .iter()
        .zip(&rt.upstream_pools)
        .map(|(u, pools)| {
            let targets: Vec<Value> = u
                .targets
                .iter()
                .zip(pools)
                .map(|(t, pool)| {
                    let p99 = crate::metrics::quantile(
                        text,
                        "tollgate_upstream_target_duration_seconds",
                        &[("upstream", &u.name), ("target", t.authority.as_str())],
                        0.99,
                    );
                    json!({
                        "target": format!("{}://{}", t.scheme, t.authority),
                        "healthy": pool.health.healthy(),
                        "p99_ms": p99.map(|s| s * 1000.0),
                    })
                })
                .collect();
            json!({ "name": u.name, "health_check": u.health_check.is_some(), "targets": targets })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_name_one_identity_of_one_route() {
        assert_eq!(
            parse_query("route=api&ip=203.0.113.7"),
            Ok(("api".into(), Identity::Ip("203.0.113.7".parse().unwrap())))
        );
        assert_eq!(
            parse_query("consumer=acme&route=api"),
            Ok(("api".into(), Identity::Consumer("acme".into())))
        );
        assert_eq!(
            parse_query("route=api&value=sk%20live"),
            Ok(("api".into(), Identity::Value("sk live".into())))
        );
        let param = |q: &str| parse_query(q).unwrap_err().param;
        assert_eq!(param("ip=1.2.3.4"), "route");
        assert_eq!(param("route=api"), "ip");
        assert_eq!(param("route=api&ip=nope"), "ip");
        assert_eq!(param("route=api&ip=1.2.3.4&value=k"), "ip");
        assert_eq!(param("route=api&route=b&ip=1.2.3.4"), "route");
        assert_eq!(param("route=api&key=1"), "query");
        assert_eq!(param(&"x".repeat(MAX_QUERY + 1)), "query");
    }
}
