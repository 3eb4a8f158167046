//! Prometheus metrics. One registry per tollgate instance (no globals, so several instances in
//! one test process keep their own counts). Series a request touches are resolved once per
//! policy load into plain atomic handles; the hot path never looks a label up. Labels are route
//! names, decisions, classes and results only: never a client IP or key.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];

/// What happened to a request at the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Rejected,
    ShadowRejected,
    StoreError,
    /// The route's `bypass` list: forwarded, not counted.
    Bypassed,
    /// The route's `deny` list: 403.
    Denied,
    /// `unknown = "reject"`: 401.
    UnknownConsumer,
}

impl Outcome {
    /// Every outcome, in the order of their series in [`RouteMetrics`].
    pub const ALL: [Outcome; 7] = [
        Outcome::Allowed,
        Outcome::Rejected,
        Outcome::ShadowRejected,
        Outcome::StoreError,
        Outcome::Bypassed,
        Outcome::Denied,
        Outcome::UnknownConsumer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Rejected => "rejected",
            Outcome::ShadowRejected => "shadow_rejected",
            Outcome::StoreError => "store_error",
            Outcome::Bypassed => "bypassed",
            Outcome::Denied => "denied",
            Outcome::UnknownConsumer => "unknown_consumer",
        }
    }
}

/// The series of one route, resolved at load.
#[derive(Clone)]
pub struct RouteMetrics {
    decisions: [Counter; Outcome::ALL.len()],
    classes: [Counter; 5],
    pub upstream_duration: Histogram,
}

impl RouteMetrics {
    pub fn decision(&self, outcome: Outcome) {
        self.decisions[outcome as usize].inc();
    }

    /// Requests counted per decision so far (for `/v1/status`).
    pub fn decision_counts(&self) -> [(Outcome, u64); Outcome::ALL.len()] {
        Outcome::ALL.map(|o| (o, self.decisions[o as usize].get()))
    }

    pub fn response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.classes[class].inc();
    }
}

/// All of an instance's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Labels2, Counter>,
    responses: Family<Labels2, Counter>,
    upstream_duration: Family<Labels1, Histogram, fn() -> Histogram>,
    target_duration: Family<Labels2, Histogram, fn() -> Histogram>,
    store_duration: Family<Labels1, Histogram, fn() -> Histogram>,
    pub in_flight: Gauge,
    pub open_connections: Gauge,
    reloads: Family<Labels1, Counter>,
    config_info: Family<Labels1, Gauge>,
    store_errors: Family<Labels1, Counter>,
    /// Requests tollgate answered before routing (404, 400).
    pub unrouted: Family<Labels1, Counter>,
    pub local_denials: Counter,
    pub leased: Counter,
    pub circuit_open: Gauge,
    upstream_healthy: Family<Labels2, Gauge>,
    /// What the trace exporter sent and dropped.
    pub traces: crate::telemetry::export::ExportMetrics,
    /// The last reload: whether it was taken, and when (Unix seconds); for `/v1/status`.
    last_reload: Mutex<Option<(bool, u64)>>,
}

fn store_histogram() -> Histogram {
    // 25 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_025, 2.0, 17))
}

fn upstream_histogram() -> Histogram {
    // 0.5 ms .. ~65 s
    Histogram::new(exponential_buckets(0.000_5, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels2, Counter>::default();
        let responses = Family::<Labels2, Counter>::default();
        let upstream_duration =
            Family::<Labels1, Histogram, fn() -> Histogram>::new_with_constructor(
                upstream_histogram as fn() -> Histogram,
            );
        let target_duration = Family::<Labels2, Histogram, fn() -> Histogram>::new_with_constructor(
            upstream_histogram as fn() -> Histogram,
        );
        registry.register(
            "tollgate_upstream_target_duration_seconds",
            "Time to the response head of each upstream target",
            target_duration.clone(),
        );
        let store_duration = Family::<Labels1, Histogram, fn() -> Histogram>::new_with_constructor(
            store_histogram as fn() -> Histogram,
        );
        let in_flight = Gauge::default();
        let open_connections = Gauge::default();
        let reloads = Family::<Labels1, Counter>::default();
        let config_info = Family::<Labels1, Gauge>::default();
        let store_errors = Family::<Labels1, Counter>::default();
        let unrouted = Family::<Labels1, Counter>::default();
        let local_denials = Counter::default();
        let leased = Counter::default();
        registry.register(
            "tollgate_leased_admissions",
            "Requests admitted from a lease of budget taken in advance (limits with `batch`), without a store call",
            leased.clone(),
        );
        let circuit_open = Gauge::default();
        let upstream_healthy = Family::<Labels2, Gauge>::default();
        registry.register(
            "tollgate_upstream_healthy",
            "Whether an upstream target gets requests (1) or is out after failed health checks or refused connections (0)",
            upstream_healthy.clone(),
        );
        registry.register(
            "tollgate_local_denials",
            "Requests rejected from the local over-limit cache, without a store call",
            local_denials.clone(),
        );
        registry.register(
            "tollgate_store_circuit_open",
            "Store circuit breakers open, deciding nothing for a short back-off (single server: 0 or 1; cluster: one per 1/64 of the slots)",
            circuit_open.clone(),
        );
        registry.register(
            "tollgate_requests",
            "Requests by route and limiter decision",
            requests.clone(),
        );
        registry.register(
            "tollgate_responses",
            "Responses by route and status class",
            responses.clone(),
        );
        registry.register(
            "tollgate_upstream_duration_seconds",
            "Time to the upstream's response head, by route",
            upstream_duration.clone(),
        );
        registry.register(
            "tollgate_store_duration_seconds",
            "Duration of one limiter decision in the store, by backend",
            store_duration.clone(),
        );
        registry.register(
            "tollgate_in_flight_requests",
            "Requests being handled",
            in_flight.clone(),
        );
        registry.register(
            "tollgate_open_connections",
            "Client connections open",
            open_connections.clone(),
        );
        registry.register(
            "tollgate_config_reloads",
            "Config reloads by result",
            reloads.clone(),
        );
        registry.register(
            "tollgate_config_info",
            "The loaded config: 1 for the hash of the file in force",
            config_info.clone(),
        );
        registry.register(
            "tollgate_store_errors",
            "Failed store decisions by kind",
            store_errors.clone(),
        );
        registry.register(
            "tollgate_unrouted_responses",
            "Requests answered before routing, by status",
            unrouted.clone(),
        );
        let dropped = Family::<Labels1, Counter>::default();
        registry.register(
            "tollgate_trace_spans_dropped",
            "Spans dropped: the export queue was full (queue_full), or the collector failed or did not answer in time (export_failed)",
            dropped.clone(),
        );
        let reason = |r: &str| dropped.get_or_create_owned(&[("reason", r.to_string())]);
        let traces = crate::telemetry::export::ExportMetrics {
            exported: Counter::default(),
            queue_full: reason("queue_full"),
            export_failed: reason("export_failed"),
        };
        registry.register(
            "tollgate_trace_spans_exported",
            "Spans the OTLP collector accepted",
            traces.exported.clone(),
        );
        // Both results exist from the start, so a dashboard sees 0 rather than no series.
        for result in ["ok", "failed"] {
            let _ = reloads.get_or_create(&[("result", result.to_string())]);
        }
        Metrics {
            registry: Mutex::new(registry),
            requests,
            responses,
            upstream_duration,
            target_duration,
            store_duration,
            in_flight,
            open_connections,
            reloads,
            config_info,
            store_errors,
            unrouted,
            local_denials,
            leased,
            circuit_open,
            upstream_healthy,
            traces,
            last_reload: Mutex::new(None),
        }
    }

    /// The response-head time of one target of one upstream.
    pub fn target_duration(&self, upstream: &str, target: &str) -> Histogram {
        self.target_duration.get_or_create_owned(&[
            ("upstream", upstream.to_string()),
            ("target", target.to_string()),
        ])
    }

    /// The health gauge of one target of one upstream.
    pub fn upstream_healthy(&self, upstream: &str, target: &str) -> Gauge {
        self.upstream_healthy.get_or_create_owned(&[
            ("upstream", upstream.to_string()),
            ("target", target.to_string()),
        ])
    }

    /// Resolves the series of a route (created at zero so dashboards see every route).
    pub fn route(&self, route: &str) -> RouteMetrics {
        let decision = |d: Outcome| {
            self.requests.get_or_create_owned(&[
                ("route", route.to_string()),
                ("decision", d.as_str().to_string()),
            ])
        };
        let class = |c: &str| {
            self.responses
                .get_or_create_owned(&[("route", route.to_string()), ("class", c.to_string())])
        };
        RouteMetrics {
            decisions: Outcome::ALL.map(decision),
            classes: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            upstream_duration: self
                .upstream_duration
                .get_or_create_owned(&[("route", route.to_string())]),
        }
    }

    /// The store latency histogram of a backend.
    pub fn store_histogram(&self, backend: &str) -> Histogram {
        self.store_duration
            .get_or_create_owned(&[("backend", backend.to_string())])
    }

    /// The handles the limiter records into, for a store `backend`.
    pub fn limiter(&self, backend: &str) -> LimiterMetrics {
        LimiterMetrics {
            store_duration: self.store_histogram(backend),
            local_denials: self.local_denials.clone(),
            leased: self.leased.clone(),
            circuit_open: self.circuit_open.clone(),
            errors: self.store_errors.clone(),
        }
    }

    pub fn reload(&self, ok: bool) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some((ok, at));
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&[("result", result.to_string())])
            .inc();
    }

    /// The last reload (taken or refused) and its Unix time, if there was one.
    pub fn last_reload(&self) -> Option<(bool, u64)> {
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `hash` as the config in force.
    pub fn config_loaded(&self, hash: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&[("hash", hash.to_string())])
            .set(1);
    }

    /// The OpenMetrics / Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The `q` quantile (0..1) of histogram `name` in rendered text, over the series whose label
/// labels are all `labels`, interpolated within its bucket as PromQL's `histogram_quantile`
/// does; `None` before any observation. For `/v1/status`, never the hot path.
pub fn quantile(text: &str, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let wanted: Vec<String> = labels
        .iter()
        .map(|(label, value)| format!("{label}=\"{value}\""))
        .collect();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, count)) = rest.split_once("} ") else {
            continue;
        };
        if !wanted.iter().all(|w| labels.split(',').any(|l| l == w)) {
            continue;
        }
        let le = labels
            .split(',')
            .find_map(|l| l.strip_prefix("le=\""))
            .and_then(|l| l.strip_suffix('"'))?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count.split_whitespace().next()?.parse().ok()?));
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(below.0);
            }
            let share = if count > below.1 {
                (rank - below.1) / (count - below.1)
            } else {
                1.0
            };
            return Some(below.0 + (le - below.0) * share);
        }
        below = (le, count);
    }
    None
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition: counter families
/// named after their `_total` samples, `le` as the last label of a bucket, no `# EOF`. What a
/// scraper that does not ask for OpenMetrics (and a person with curl) gets.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let renamed = |line: &str, prefix: &str| -> Option<String> {
        let rest = line.strip_prefix(prefix)?;
        let name = counters
            .iter()
            .find(|n| rest.strip_prefix(**n).is_some_and(|r| r.starts_with(' ')))?;
        Some(format!("{prefix}{name}_total{}", &rest[name.len()..]))
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        match renamed(line, "# TYPE ").or_else(|| renamed(line, "# HELP ")) {
            Some(l) => out.push_str(&l),
            None => out.push_str(&move_le_last(line)),
        }
        out.push('\n');
    }
    out
}

/// `x_bucket{le="0.1",route="a"} 3` -> `x_bucket{route="a",le="0.1"} 3`.
fn move_le_last(line: &str) -> std::borrow::Cow<'_, str> {
    let Some(open) = line.find("{le=\"") else {
        return line.into();
    };
    let Some(close) = line[open..].find('}').map(|c| open + c) else {
        return line.into();
    };
    let labels = &line[open + 1..close];
    let Some(first_end) = labels.find("\",").map(|i| i + 1) else {
        return line.into();
    };
    let (le, rest) = (&labels[..first_end], &labels[first_end + 1..]);
    format!("{}{{{rest},{le}}}{}", &line[..open], &line[close + 1..]).into()
}

/// Seconds as the histograms want them.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The metric handles the limiter records into.
#[derive(Clone)]
pub struct LimiterMetrics {
    /// Requests rejected from the local over-limit cache, without a store call.
    pub local_denials: prometheus_client::metrics::counter::Counter,
    /// Requests admitted from a lease (approximate mode), without a store call.
    pub leased: prometheus_client::metrics::counter::Counter,
    /// Duration of calls that reached the store (not local cache or lease answers).
    pub store_duration: prometheus_client::metrics::histogram::Histogram,
    /// Store circuit breakers open (one for a single server, one per 1/64 of a cluster's slots).
    pub circuit_open: prometheus_client::metrics::gauge::Gauge,
    /// Failed decisions by kind.
    pub errors: prometheus_client::metrics::family::Family<
        [(&'static str, String); 1],
        prometheus_client::metrics::counter::Counter,
    >,
}

#[cfg(test)]
mod quantile_tests {
    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let text = "h_bucket{route=\"a\",le=\"0.1\"} 50\nh_bucket{route=\"a\",le=\"0.2\"} 100\n\
                    h_bucket{route=\"a\",le=\"+Inf\"} 100\nh_bucket{route=\"b\",le=\"0.1\"} 0\n\
                    h_bucket{route=\"b\",le=\"+Inf\"} 0\n";
        let q = |route, q| super::quantile(text, "h", &[("route", route)], q);
        assert_eq!(q("a", 0.5), Some(0.1));
        assert!((q("a", 0.99).unwrap() - 0.198).abs() < 1e-9);
        assert_eq!(q("b", 0.99), None);
        assert_eq!(q("c", 0.99), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples_and_puts_le_last() {
        let m = Metrics::new();
        let r = m.route("api");
        r.decision(Outcome::Allowed);
        r.upstream_duration.observe(0.001);
        let text = to_prometheus_text(&m.render());
        assert!(
            text.contains("# TYPE tollgate_requests_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP tollgate_requests_total "), "{text}");
        assert!(
            text.contains("tollgate_requests_total{route=\"api\",decision=\"allowed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "tollgate_upstream_duration_seconds_bucket{route=\"api\",le=\"0.001\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tollgate_in_flight_requests gauge"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("{le="), "{text}");
    }
}
