//! Human-readable renderings of a policy: the summary `tollgate check` prints.

use std::fmt::Write as _;

use crate::config::{shadowed_routes, units::format_duration};
use crate::limiter::algorithm::Algorithm;
use crate::policy::{
    HeaderStyle, KeySpec, Limit, Matcher, Mode, OnStoreError, Policy, Settlement, StoreSettings,
};

fn describe_match(m: &Matcher) -> String {
    let mut parts = Vec::new();
    if let Some(h) = &m.host {
        parts.push(format!("host {h}"));
    }
    if let Some(p) = &m.path {
        parts.push(format!("path {p}"));
    }
    if let Some(p) = &m.path_prefix {
        parts.push(format!("path prefix {p}"));
    }
    if !m.methods.is_empty() {
        let methods: Vec<&str> = m.methods.iter().map(|m| m.as_str()).collect();
        parts.push(format!("methods {}", methods.join("|")));
    }
    for (name, value) in &m.headers {
        parts.push(format!("header {name} = {}", value.to_str().unwrap_or("?")));
    }
    if parts.is_empty() {
        "every request".to_string()
    } else {
        parts.join(", ")
    }
}

/// `gcra 50/s, burst 20 by ip, cost 2, shadow (quota 20 per 1 s)`, with what the response
/// settles, the ban and the delay after it.
fn describe_limit(l: &Limit, spec: &KeySpec) -> String {
    let kind = l.algorithm.kind();
    let mut extra = String::new();
    match &l.settle {
        Settlement::Stands => {}
        Settlement::Count(set) => {
            let _ = write!(
                extra,
                "; counts only responses {set}, the others given back"
            );
        }
        Settlement::CostFrom(from) => {
            let _ = write!(
                extra,
                "; reserves {} at admission, settled to {from} (unused given back, excess owed)",
                l.cost
            );
        }
        Settlement::Release => {}
    }
    if l.ban > 0 {
        let _ = write!(
            extra,
            "; a rejection bans the identity for {}",
            format_duration(std::time::Duration::from_micros(l.ban))
        );
    }
    if l.delay > 0 {
        let _ = write!(
            extra,
            "; holds a request up to {} for its slot",
            format_duration(std::time::Duration::from_micros(l.delay))
        );
    }
    if let Algorithm::Concurrency { max, lease } = l.algorithm {
        return format!(
            "concurrency: at most {max} in flight by {spec} (a slot not released frees itself after {}){extra}",
            format_duration(std::time::Duration::from_micros(lease))
        );
    }
    let burst = if kind.takes_burst() {
        format!(", burst {}", l.quota)
    } else {
        String::new()
    };
    format!(
        "{} {}{burst} by {spec}{}{} (quota {} per {} s)",
        kind.name(),
        l.rate_text,
        if l.cost != 1 {
            format!(", cost {}", l.cost)
        } else {
            String::new()
        },
        if l.mode == Mode::Shadow {
            ", shadow: never rejects"
        } else {
            ""
        },
        l.quota,
        l.window_secs
    ) + &extra
}

/// The summary of a valid policy.
/// A ratio as a percentage without needless digits: 0.05 → "5 %", 0.125 → "12.5 %".
fn percent(ratio: f64) -> String {
    let p = ratio * 100.0;
    if (p - p.round()).abs() < 1e-9 {
        format!("{} %", p.round())
    } else {
        format!("{} %", (p * 1000.0).round() / 1000.0)
    }
}

pub fn summary(policy: &Policy, file: &str) -> String {
    let mut out = String::new();
    let s = &policy.server;
    let _ = writeln!(out, "{file}: OK (config hash {})", policy.source_hash);
    let _ = writeln!(
        out,
        "listen {}{}{}",
        s.listen,
        if s.tls.is_some() { " (TLS)" } else { "" },
        s.admin.map(|a| format!(", admin {a}")).unwrap_or_default()
    );
    let headers = match s.rate_limit_headers {
        HeaderStyle::Ietf => "ietf",
        HeaderStyle::Legacy => "legacy",
        HeaderStyle::Both => "both",
        HeaderStyle::None => "none",
    };
    let _ = writeln!(
        out,
        "headers {headers}, IPv6 counted per /{}, {} trusted prox{}",
        s.ipv6_prefix,
        s.trusted_proxies.len(),
        if s.trusted_proxies.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    match &policy.store {
        StoreSettings::Memory { max_keys, timeout } => {
            let _ = writeln!(
                out,
                "store memory (max {max_keys} keys, timeout {})",
                format_duration(*timeout)
            );
        }
        StoreSettings::Redis(r) => {
            let _ = writeln!(
                out,
                "store redis {} (pool {}, timeout {}, prefix {}{})",
                describe_nodes(&r.nodes),
                r.pool_size,
                format_duration(r.timeout),
                r.prefix,
                if r.tls_ca.is_some() || r.tls_client.is_some() {
                    ", TLS files set"
                } else {
                    ""
                }
            );
        }
    }
    for u in &policy.upstreams {
        let targets: Vec<String> = u
            .targets
            .iter()
            .map(|t| format!("{}://{}", t.scheme, t.authority))
            .collect();
        let _ = writeln!(
            out,
            "upstream {}: {} (connect timeout {}, timeout {})",
            u.name,
            targets.join(", "),
            format_duration(u.connect_timeout),
            format_duration(u.timeout)
        );
    }
    if let Some(t) = &policy.telemetry {
        let _ = writeln!(
            out,
            "traces to {} as service {}, {} of new traces sampled (a caller's sampled flag is followed)",
            t.url(),
            t.service_name,
            percent(t.sample_ratio)
        );
    }
    if let Some(jwt) = &policy.jwt {
        let _ = writeln!(out, "{}", jwt.describe());
    }
    if let Some(c) = &policy.consumers {
        let key = c.key.to_string();
        let plan_name = |p: Option<crate::consumers::PlanId>| {
            p.map_or("none".to_string(), |p| c.plans[usize::from(p)].to_string())
        };
        let _ = writeln!(
            out,
            "consumers: {} with {} key hash(es), named by {key}; plans {}; default plan {}; unknown keys: {}",
            c.list.len(),
            c.keys,
            if c.plans.is_empty() {
                "none".to_string()
            } else {
                c.plans.join(", ")
            },
            plan_name(c.default_plan),
            match c.unknown {
                crate::consumers::Unknown::Anonymous => "anonymous (counted by IP)",
                crate::consumers::Unknown::Reject => "rejected with 401 on consumer-keyed routes",
            }
        );
        for (i, plan) in c.plans.iter().enumerate() {
            let members = c
                .list
                .iter()
                .filter(|m| m.plan == Some(i as crate::consumers::PlanId))
                .count();
            let _ = writeln!(out, "  plan {plan}: {members} consumer(s)");
        }
    }
    let _ = writeln!(out, "{} route(s), first match wins:", policy.routes.len());
    for r in &policy.routes {
        let on_error = match r.on_store_error {
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        };
        let _ = writeln!(
            out,
            "  {} -> {}: {}; on store error: {on_error}",
            r.name,
            r.upstream.name,
            describe_match(&r.matcher)
        );
        if r.limits.is_empty() {
            let _ = writeln!(out, "    no limits: everything is forwarded");
        }
        for l in &r.limits {
            let _ = writeln!(out, "    {}: {}", l.name, describe_limit(l, &r.keys[l.key]));
            let Some(c) = &policy.consumers else { continue };
            for (p, plan) in c.plans.iter().enumerate() {
                let Some(own) = &r.plans[p] else { continue };
                // The plan's view keeps the limits it does not make unlimited, in order.
                let kept = own.limits.iter().find(|o| o.name == l.name);
                let line = match kept {
                    None => "unlimited (not counted)".to_string(),
                    Some(o) if o.quota == l.quota && o.algorithm == l.algorithm => continue,
                    Some(o) => format!(
                        "{} (quota {} per {} s)",
                        o.rate_text, o.quota, o.window_secs
                    ),
                };
                let _ = writeln!(out, "      plan {plan}: {line}");
            }
        }
        for (what, list) in [("deny", &r.deny), ("bypass", &r.bypass)] {
            if list.is_empty() {
                continue;
            }
            let mut names: Vec<String> = list.ips.iter().map(|n| n.to_string()).collect();
            names.extend(list.consumers.iter().map(|n| format!("consumer {n}")));
            let _ = writeln!(out, "    {what}: {}", names.join(", "));
        }
        if let Some(j) = &r.rejection {
            let _ = writeln!(
                out,
                "    rejection: {} {} ({} byte body)",
                j.status.as_u16(),
                j.content_type.to_str().unwrap_or("?"),
                j.body.len()
            );
        }
    }
    for (route, earlier) in shadowed_routes(policy) {
        let _ = writeln!(
            out,
            "warning: route {route} can never match: route {earlier} before it matches every request"
        );
    }
    out
}

/// Redis nodes as shown to people: passwords replaced by `***`.
fn describe_nodes(nodes: &crate::policy::RedisNodes) -> String {
    match nodes {
        crate::policy::RedisNodes::Single(url) => crate::policy::redact(&url.0),
        crate::policy::RedisNodes::Cluster(urls) => format!(
            "cluster [{}]",
            urls.iter()
                .map(|u| crate::policy::redact(&u.0))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What `tollgate explain` says about one request: the route, the client IP, each limit with
/// the key it would use (hashed, as stored) and, when the store is Redis and answers, each
/// limit's current budget. Nothing is consumed.
pub async fn explain(
    policy: &Policy,
    request: &http::Request<()>,
    peer: std::net::IpAddr,
) -> String {
    use crate::identity::{self, Subject};
    use crate::limiter::{self, Store, redis::key_name};
    use crate::response::ceil_secs;
    use crate::route::RequestView;

    let mut out = String::new();
    let (parts, ()) = request.clone().into_parts();
    let _ = writeln!(out, "{} {}", parts.method, parts.uri);
    let server = &policy.server;
    let client = identity::client_ip(peer, &parts.headers, &server.trusted_proxies);
    let counted = identity::counted_ip(client, server.ipv6_prefix);
    let trusted = identity::is_trusted(peer, &server.trusted_proxies);
    let _ = writeln!(
        out,
        "client {client} (TCP peer {peer}{}){}",
        if trusted {
            ", a trusted proxy: forwarding headers believed"
        } else {
            ""
        },
        if counted != client {
            format!(", counted as {counted}")
        } else {
            String::new()
        }
    );
    let Some((_, route)) = policy.route_for(&RequestView::new(&parts)) else {
        let _ = writeln!(
            out,
            "no route matches: tollgate answers 404 and forwards nothing"
        );
        return out;
    };
    let _ = writeln!(
        out,
        "route {} ({}) -> upstream {}",
        route.name,
        describe_match(&route.matcher),
        route.upstream.name
    );
    let token = policy.jwt.as_ref().map(|jwt| jwt.check(&parts.headers));
    match &token {
        Some(Ok(_)) => {
            let _ = writeln!(out, "token: verified");
        }
        Some(Err(why)) => {
            let _ = writeln!(
                out,
                "token: not verified ({why}): limits keyed by its claims count under the client IP"
            );
        }
        None => {}
    }
    let who = policy
        .consumers
        .as_ref()
        .map_or_else(Default::default, |c| c.resolve(&parts, token.as_ref()));
    let consumer = who.name;
    if let Some(c) = &policy.consumers {
        let plan = who
            .plan
            .map_or("none".to_string(), |p| c.plans[usize::from(p)].to_string());
        let _ = match consumer {
            Some(name) => writeln!(out, "consumer {name} (plan {plan})"),
            None if who.presented => {
                writeln!(out, "consumer: the key names no consumer (plan {plan})")
            }
            None => writeln!(out, "consumer: no key presented (plan {plan})"),
        };
    }
    let refused = match route.access(client, &who, policy.consumers.as_ref()) {
        crate::policy::Admission::Denied => {
            Some("denied: the route's deny list names this client: 403, not forwarded")
        }
        crate::policy::Admission::Bypassed => {
            Some("bypassed: the route's bypass list names this client: forwarded, not counted")
        }
        crate::policy::Admission::UnknownConsumer => Some("unknown consumer: 401, not forwarded"),
        crate::policy::Admission::Limited => None,
    };
    if let Some(line) = refused {
        let _ = writeln!(out, "{line}");
        return out;
    }
    let (limits, _) = route.limits_for(who.plan);
    if limits.is_empty() {
        let _ = writeln!(out, "no limits: forwarded as is");
        return out;
    }
    let claims = match &token {
        Some(Ok(claims)) => Some(&**claims),
        _ => None,
    };
    let subject = Subject {
        parts: &parts,
        ip: counted,
        consumer,
        claims,
    };
    let items = limiter::items_for(limits, &route.keys, &subject);
    let (store_line, decision) = match &policy.store {
        StoreSettings::Memory { .. } => (
            "store memory: the counters live inside the running tollgate process; explain cannot read them".to_string(),
            None,
        ),
        StoreSettings::Redis(r) => {
            let timeout = &r.timeout;
            let started = std::time::Instant::now();
            let answer = match Store::new(&policy.store) {
                Ok(store) => {
                    match tokio::time::timeout((*timeout).max(std::time::Duration::from_secs(2)), store.peek(&items, None)).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err("no answer within 2 s".to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(d) => (
                    format!(
                        "store redis {}: answered in {:.1} ms; nothing was consumed",
                        describe_nodes(&r.nodes),
                        started.elapsed().as_secs_f64() * 1000.0
                    ),
                    Some(d),
                ),
                Err(e) => (
                    format!("store redis {}: unavailable ({e})", describe_nodes(&r.nodes)),
                    None,
                ),
            }
        }
    };
    let _ = writeln!(
        out,
        "limits, decided together (admitted only if every enforced limit admits; on store error: {}):",
        match route.on_store_error {
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny (503)",
        }
    );
    for (i, (limit, item)) in limits.iter().zip(&items).enumerate() {
        let spec = &route.keys[limit.key];
        let sources: Vec<String> = spec
            .0
            .iter()
            .map(|s| describe_source(s, &parts, counted, &subject))
            .collect();
        let _ = writeln!(out, "  {}: {}", limit.name, describe_limit(limit, spec));
        let _ = writeln!(out, "    identity: {}", sources.join(", "));
        let key = match &policy.store {
            StoreSettings::Redis(r) => key_name(&r.prefix, item.id, &item.tag),
            StoreSettings::Memory { .. } => format!(
                "limit {:016x}, identity {}",
                item.id,
                item.tag
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        };
        let _ = writeln!(out, "    key {key}");
        if let Some(d) = &decision {
            let o = &d.outcomes[i];
            if o.allowed && o.retry_after > 0 {
                let _ = writeln!(
                    out,
                    "    now: would hold the request {} ms for its slot, then admit",
                    o.retry_after.div_ceil(1000)
                );
            } else if o.allowed {
                let _ = writeln!(
                    out,
                    "    now: would admit; {} of {} left after this request; full again in {} s",
                    o.remaining,
                    limit.quota,
                    ceil_secs(o.reset)
                );
            } else {
                let _ = writeln!(
                    out,
                    "    now: would reject; {} left; retry after {} s",
                    o.remaining,
                    ceil_secs(o.retry_after).max(1)
                );
            }
        }
    }
    let _ = writeln!(out, "{store_line}");
    if let Some(d) = &decision {
        let _ = writeln!(
            out,
            "verdict: {}",
            if d.admitted {
                "admitted"
            } else {
                "rejected with 429"
            }
        );
    }
    out
}

fn describe_source(
    source: &crate::policy::KeySource,
    parts: &http::request::Parts,
    ip: std::net::IpAddr,
    subject: &crate::identity::Subject<'_>,
) -> String {
    use crate::policy::KeySource;
    match source {
        KeySource::Consumer => match subject.consumer {
            Some(name) => format!("consumer {name}"),
            None => format!("no known consumer: counted under ip {ip}"),
        },
        KeySource::Jwt(slot, claim) => match subject.claims.and_then(|c| c.get(*slot)) {
            Some(_) => {
                format!("claim {claim} of the verified token (its value is hashed, never stored)")
            }
            None => format!("no verified claim {claim}: counted under ip {ip}"),
        },
        KeySource::Ip => format!("ip {ip}"),
        KeySource::Global => "global (one counter for the route)".to_string(),
        KeySource::Header(name) => {
            let present = parts.headers.get_all(name).iter().any(|v| !v.is_empty());
            if present {
                format!("header {name} present (its value is hashed, never stored)")
            } else {
                format!("header {name} absent: counted under ip {ip}")
            }
        }
        KeySource::Query(name) => {
            let present = parts.uri.query().is_some_and(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .any(|(k, v)| k == name.as_str() && !v.is_empty())
            });
            if present {
                format!("query {name} present (its value is hashed, never stored)")
            } else {
                format!("query {name} absent: counted under ip {ip}")
            }
        }
    }
}
