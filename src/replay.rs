//! `tollgate replay`: a policy tried on recorded traffic. Access logs (nginx/Apache "combined",
//! or tollgate's own JSON access log) are read, put in time order and run through the policy's
//! routes and limits on a memory store, each decision at the log line's own time (through the
//! store's `now` argument, the one the tests use). Nothing is contacted: no store, no upstream.
//! The report says, per route and limit, what was seen, admitted and rejected, and who was
//! rejected most.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use http::{Method, Request};

use crate::identity::{self, Subject, Tag};
use crate::limiter::algorithm::Micros;
use crate::limiter::memory::MemoryStore;
use crate::policy::{Admission, KeySource, Policy};
use crate::route::RequestView;

/// One request of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// µs since the Unix epoch.
    pub at: Micros,
    pub client: IpAddr,
    pub method: Method,
    pub host: Option<String>,
    pub path: String,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn month(name: &str) -> Option<i64> {
    const NAMES: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as i64 + 1)
}

/// µs since the epoch of a civil time at a UTC offset of `offset_secs`.
fn micros_at(
    date: (i64, i64, i64),
    (h, mi, s): (i64, i64, i64),
    frac_us: i64,
    offset_secs: i64,
) -> Option<Micros> {
    let (y, m, d) = date;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let secs = days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    u64::try_from(secs * 1_000_000 + frac_us).ok()
}

/// `10/Oct/2000:13:55:36 -0700`.
fn parse_clf_time(text: &str) -> Option<Micros> {
    let (stamp, zone) = text.split_once(' ')?;
    let mut parts = stamp.splitn(4, [':', '/']);
    let (d, mon, y) = (parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next()?;
    let mut hms = rest.split(':');
    let (h, mi, s) = (hms.next()?, hms.next()?, hms.next()?);
    let sign = match zone.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let zone = &zone[1..];
    if zone.len() != 4 {
        return None;
    }
    let offset =
        sign * (zone[..2].parse::<i64>().ok()? * 3600 + zone[2..].parse::<i64>().ok()? * 60);
    micros_at(
        (y.parse().ok()?, month(mon)?, d.parse().ok()?),
        (h.parse().ok()?, mi.parse().ok()?, s.parse().ok()?),
        0,
        offset,
    )
}

/// RFC 3339: `2026-12-02T16:30:00.123456Z` or with `+01:00`.
fn parse_rfc3339(text: &str) -> Option<Micros> {
    let (date, time) = text.split_once(['T', ' '])?;
    let mut ymd = date.split('-');
    let (y, m, d) = (
        ymd.next()?.parse().ok()?,
        ymd.next()?.parse().ok()?,
        ymd.next()?.parse().ok()?,
    );
    let (clock, offset) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, z) = time.split_at(at);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (zh, zm) = z[1..].split_once(':')?;
        (
            c,
            sign * (zh.parse::<i64>().ok()? * 3600 + zm.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut p = hms.split(':');
    let (h, mi, s) = (
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
    );
    let digits: String = frac.chars().take(6).collect();
    let frac_us = if digits.is_empty() {
        0
    } else {
        digits.parse::<i64>().ok()? * 10_i64.pow(6 - digits.len() as u32)
    };
    micros_at((y, m, d), (h, mi, s), frac_us, offset)
}

/// `IP - user [time] "METHOD PATH PROTO" status bytes "referer" "agent"`.
fn parse_combined(line: &str) -> Option<Entry> {
    let (client, rest) = line.split_once(' ')?;
    let open = rest.find('[')?;
    let close = open + rest[open..].find(']')?;
    let at = parse_clf_time(&rest[open + 1..close])?;
    let after = &rest[close + 1..];
    let q = after.find('"')?;
    let request_end = q + 1 + after[q + 1..].find('"')?;
    let mut request = after[q + 1..request_end].split(' ');
    let method = Method::from_bytes(request.next()?.as_bytes()).ok()?;
    let path = request.next()?.to_string();
    Some(Entry {
        at,
        client: client.parse().ok()?,
        method,
        host: None,
        path,
    })
}

/// One line of tollgate's JSON access log (target `tollgate::access`).
fn parse_json(line: &str) -> Option<Entry> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("target").and_then(|t| t.as_str()) != Some("tollgate::access") {
        return None;
    }
    let text = |k: &str| v.get(k).and_then(|x| x.as_str());
    Some(Entry {
        at: parse_rfc3339(text("timestamp")?)?,
        client: text("client")?.parse().ok()?,
        method: Method::from_bytes(text("method")?.as_bytes()).ok()?,
        host: text("host").filter(|h| *h != "-").map(str::to_string),
        path: text("path")?.to_string(),
    })
}

/// A log line of either format; `None` for a line that is neither.
pub fn parse_line(line: &str) -> Option<Entry> {
    if line.trim_start().starts_with('{') {
        parse_json(line)
    } else {
        parse_combined(line)
    }
}

#[derive(Default)]
struct LimitTally {
    seen: u64,
    rejected: u64,
    /// Rejections per identity: who, and how many.
    by_identity: HashMap<Tag, (String, u64)>,
}

#[derive(Default)]
struct RouteTally {
    requests: u64,
    admitted: u64,
    rejected: u64,
    denied: u64,
    bypassed: u64,
    /// Refused with 401 (`unknown = "reject"`): a log's requests name no consumer.
    unknown_consumer: u64,
    limits: Vec<LimitTally>,
}

/// What a replay found.
pub struct Report {
    routes: Vec<RouteTally>,
    unrouted: u64,
    requests: u64,
    first: Option<Micros>,
    last: Option<Micros>,
}

/// Runs `entries` (any order: they are sorted by time, stably) through `policy`.
pub fn replay(policy: &Policy, mut entries: Vec<Entry>) -> Report {
    entries.sort_by_key(|e| e.at);
    let store = MemoryStore::new(usize::MAX);
    let mut report = Report {
        routes: policy
            .routes
            .iter()
            .map(|r| RouteTally {
                limits: r.limits.iter().map(|_| LimitTally::default()).collect(),
                ..Default::default()
            })
            .collect(),
        unrouted: 0,
        requests: entries.len() as u64,
        first: entries.first().map(|e| e.at),
        last: entries.last().map(|e| e.at),
    };
    let default_plan = policy.consumers.as_ref().and_then(|c| c.default_plan);
    for entry in entries {
        let mut request = Request::builder()
            .method(entry.method.clone())
            .uri(&entry.path);
        if let Some(host) = &entry.host {
            request = request.header(http::header::HOST, host.as_str());
        }
        let Ok(request) = request.body(()) else {
            report.unrouted += 1;
            continue;
        };
        let (parts, ()) = request.into_parts();
        let Some((index, route)) = policy.route_for(&RequestView::new(&parts)) else {
            report.unrouted += 1;
            continue;
        };
        let tally = &mut report.routes[index];
        tally.requests += 1;
        let client = identity::client_ip(entry.client, &parts.headers, &[]);
        // Logs carry no keys: every request is anonymous.
        let nobody = crate::consumers::Resolved::default();
        match route.access(client, &nobody, policy.consumers.as_ref()) {
            Admission::Denied => {
                tally.denied += 1;
                continue;
            }
            Admission::Bypassed => {
                tally.bypassed += 1;
                continue;
            }
            Admission::UnknownConsumer => {
                tally.unknown_consumer += 1;
                continue;
            }
            Admission::Limited => {}
        }
        // Anonymous requests: the default plan's limits, shown under the route's own.
        let (limits, _) = route.limits_for(default_plan);
        let subject = Subject {
            parts: &parts,
            ip: identity::counted_ip(client, policy.server.ipv6_prefix),
            consumer: None,
            claims: None,
        };
        let items = crate::limiter::items_for(limits, &route.keys, &subject);
        let Ok(decision) = store.decide(&items, Some(entry.at)) else {
            continue;
        };
        if decision.admitted {
            tally.admitted += 1;
        } else {
            tally.rejected += 1;
        }
        for ((limit, item), outcome) in limits.iter().zip(&items).zip(&decision.outcomes) {
            let Some(slot) = route.limits.iter().position(|l| l.name == limit.name) else {
                continue;
            };
            let t = &mut tally.limits[slot];
            t.seen += 1;
            if !outcome.allowed {
                t.rejected += 1;
                let global = route.keys[limit.key].0 == [KeySource::Global];
                let who = t.by_identity.entry(item.tag).or_insert_with(|| {
                    let name = if global {
                        "global".to_string()
                    } else {
                        subject.ip.to_string()
                    };
                    (name, 0)
                });
                who.1 += 1;
            }
        }
    }
    report
}

fn date(us: Micros) -> String {
    let secs = (us / 1_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The report as `tollgate replay` prints it.
pub fn render(policy: &Policy, report: &Report, unparsed: &[(String, usize)]) -> String {
    let mut out = String::new();
    let span = match (report.first, report.last) {
        (Some(a), Some(b)) => format!(" from {} to {}", date(a), date(b)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "{} requests{span}, replayed in time order on the memory store",
        report.requests
    );
    if let Some((first_file, first_line)) = unparsed.first() {
        let _ = writeln!(
            out,
            "{} line(s) not understood (neither combined nor tollgate JSON), the first at {first_file}:{first_line}",
            unparsed.len()
        );
    }
    for (route, tally) in policy.routes.iter().zip(&report.routes) {
        let _ = writeln!(
            out,
            "route {}: {} requests, {} admitted, {} rejected{}{}{}",
            route.name,
            tally.requests,
            tally.admitted,
            tally.rejected,
            if tally.denied > 0 {
                format!(", {} denied", tally.denied)
            } else {
                String::new()
            },
            if tally.bypassed > 0 {
                format!(", {} bypassed", tally.bypassed)
            } else {
                String::new()
            },
            if tally.unknown_consumer > 0 {
                format!(
                    ", {} refused as unknown consumers (401)",
                    tally.unknown_consumer
                )
            } else {
                String::new()
            },
        );
        for (limit, t) in route.limits.iter().zip(&tally.limits) {
            let spec = &route.keys[limit.key];
            let missing: Vec<String> = spec
                .0
                .iter()
                .filter(|s| !matches!(s, KeySource::Ip | KeySource::Global))
                .map(|s| s.to_string())
                .collect();
            let _ = writeln!(
                out,
                "  {} ({} {} by {spec}): seen {}, admitted {}, rejected {}",
                limit.name,
                limit.algorithm.kind().name(),
                limit.rate_text,
                t.seen,
                t.seen - t.rejected,
                t.rejected
            );
            if !missing.is_empty() {
                let _ = writeln!(
                    out,
                    "    {} is not in the log: counted by client IP instead",
                    missing.join(", ")
                );
            }
            let mut top: Vec<&(String, u64)> = t.by_identity.values().collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            if !top.is_empty() {
                let list: Vec<String> = top
                    .iter()
                    .take(10)
                    .map(|(who, n)| format!("{who} {n}"))
                    .collect();
                let _ = writeln!(out, "    most rejected: {}", list.join(", "));
            }
        }
    }
    if report.unrouted > 0 {
        let _ = writeln!(out, "no route: {} requests", report.unrouted);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_log_formats_parse_to_the_same_entry() {
        let combined = r#"203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] "GET /v1/users?page=2 HTTP/1.1" 200 2326 "-" "curl/8""#;
        let e = parse_line(combined).unwrap();
        assert_eq!(e.client, "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(e.method, Method::GET);
        assert_eq!(e.path, "/v1/users?page=2");
        // 2000-10-10T20:55:36Z
        assert_eq!(e.at, 971_211_336_000_000);
        let json = r#"{"timestamp":"2000-10-10T20:55:36.250000Z","level":"INFO","target":"tollgate::access","method":"GET","host":"api.example.com","path":"/v1/users","client":"203.0.113.7","status":200}"#;
        let j = parse_line(json).unwrap();
        assert_eq!(j.at, 971_211_336_250_000);
        assert_eq!(j.host.as_deref(), Some("api.example.com"));
        assert_eq!(
            parse_rfc3339("2000-10-10T13:55:36-07:00"),
            Some(971_211_336_000_000)
        );
        assert_eq!(date(971_211_336_000_000), "2000-10-10T20:55:36Z");
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(
            parse_line(r#"{"target":"tollgate","message":"serving"}"#),
            None
        );
    }
}
