//! OpenTelemetry traces of requests (`[telemetry]`): each request's trace context
//! ([`context`]), the spans it records ([`RequestTrace`]: the request, its store decision, its
//! upstream call), and their export over OTLP/HTTP protobuf ([`otlp`], [`export`]) from a
//! bounded queue, off the hot path. Without `[telemetry]` none of this runs.

pub mod context;
pub mod export;
pub mod otlp;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

use crate::policy::Target;
use context::{Sampler, SpanId, TraceId};

/// The `traceparent` header (W3C Trace Context).
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The `[telemetry]` table, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where spans go: the collector's scheme and authority, and the path (`/v1/traces` when
    /// the endpoint named none).
    pub endpoint: Target,
    pub path: http::uri::PathAndQuery,
    /// `tls.ca` for an `https://` collector with a private CA (the system roots otherwise).
    pub ca: Option<PathBuf>,
    pub service_name: String,
    pub sample_ratio: f64,
}

impl Settings {
    /// The endpoint as written back, for logs.
    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            self.endpoint.scheme, self.endpoint.authority, self.path
        )
    }
}

/// What a runtime traces with: its sampler, and the exporter (kept across reloads that do
/// not change where spans go).
pub struct Tracer {
    sampler: Sampler,
    pub exporter: Arc<export::Exporter>,
}

impl Tracer {
    pub fn new(settings: &Settings, exporter: Arc<export::Exporter>) -> Tracer {
        Tracer {
            sampler: Sampler::new(settings.sample_ratio),
            exporter,
        }
    }

    /// The trace of a request that began at `started`, continuing its `traceparent` if it has
    /// a valid one (several `traceparent` headers are no valid one).
    pub fn start(&self, headers: &HeaderMap, started: Instant) -> RequestTrace {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let parent = match (values.next(), values.next()) {
            (Some(v), None) => context::parse_traceparent(v.as_bytes()),
            _ => None,
        };
        let trace_id = parent.map_or_else(context::trace_id, |p| p.trace_id);
        let sampled = self.sampler.sample(parent.as_ref(), &trace_id);
        RequestTrace {
            trace_id,
            span_id: context::span_id(),
            upstream_span: None,
            recording: sampled.then(|| {
                Box::new(Recording {
                    remote_parent: parent.map(|p| p.span_id),
                    started,
                    start_unix_nanos: unix_nanos(),
                    spans: Vec::new(),
                    facts: Facts::default(),
                })
            }),
        }
    }

    /// Queues a finished request's spans for export (dropped and counted when the queue is
    /// full; never waits).
    pub fn finish(&self, trace: RequestTrace, status: u16, now: Instant) {
        let Some(recording) = trace.recording else {
            return;
        };
        let Recording {
            remote_parent,
            started,
            start_unix_nanos,
            mut spans,
            facts: f,
        } = *recording;
        let mut attributes = Vec::with_capacity(10);
        if let Some(method) = f.method {
            attributes.push(("http.request.method", Value::Str(method)));
        }
        if let Some(path) = f.path {
            attributes.push(("url.path", Value::Str(path)));
        }
        if let Some(host) = f.host {
            attributes.push(("server.address", Value::Str(host)));
        }
        if let Some(version) = f.version {
            attributes.push(("network.protocol.version", Value::Static(version)));
        }
        if let Some(client) = f.client {
            attributes.push(("client.address", Value::Str(client.to_string().into())));
        }
        attributes.push(("http.response.status_code", Value::Int(i64::from(status))));
        if let Some(route) = f.route {
            attributes.push(("tollgate.route", Value::Str(route)));
        }
        if let Some(decision) = f.decision {
            attributes.push(("tollgate.decision", Value::Static(decision)));
        }
        if let Some(consumer) = f.consumer {
            attributes.push(("tollgate.consumer", Value::Str(consumer)));
        }
        if let Some(plan) = f.plan {
            attributes.push(("tollgate.plan", Value::Str(plan)));
        }
        spans.push(SpanRecord {
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            parent: remote_parent,
            remote_parent: remote_parent.is_some(),
            name: "request",
            kind: Kind::Server,
            start_unix_nanos,
            end_unix_nanos: start_unix_nanos + nanos_between(started, now),
            attributes,
            error: (status >= 500).then(|| format!("HTTP {status}")),
        });
        for span in spans {
            self.exporter.offer(span);
        }
    }
}

/// What the request span reports, filled in as the pipeline learns it (sampled requests only).
#[derive(Default)]
struct Facts {
    method: Option<Arc<str>>,
    path: Option<Arc<str>>,
    host: Option<Arc<str>>,
    version: Option<&'static str>,
    client: Option<IpAddr>,
    route: Option<Arc<str>>,
    decision: Option<&'static str>,
    consumer: Option<Arc<str>>,
    plan: Option<Arc<str>>,
}

/// One request's place in its trace; when sampled, what it records.
pub struct RequestTrace {
    trace_id: TraceId,
    /// The request span's id.
    span_id: SpanId,
    /// The upstream call's span id, once the request is forwarded.
    upstream_span: Option<SpanId>,
    /// Only a sampled request records (boxed: an unsampled one stays a few words).
    recording: Option<Box<Recording>>,
}

/// What a sampled request records as it goes.
struct Recording {
    /// The caller's span, from its `traceparent`.
    remote_parent: Option<SpanId>,
    started: Instant,
    start_unix_nanos: u64,
    /// The child spans finished so far.
    spans: Vec<SpanRecord>,
    facts: Facts,
}

impl RequestTrace {
    pub fn sampled(&self) -> bool {
        self.recording.is_some()
    }

    pub fn trace_id(&self) -> &TraceId {
        &self.trace_id
    }

    /// The request's head as the request span reports it: method, path (never the query
    /// string, which may carry a key), host and protocol.
    pub fn head(&mut self, parts: &http::request::Parts) {
        let Some(r) = self.recording.as_deref_mut() else {
            return;
        };
        r.facts.method = Some(parts.method.as_str().into());
        r.facts.path = Some(parts.uri.path().into());
        r.facts.host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .map(Into::into);
        r.facts.version = Some(match parts.version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        });
    }

    pub fn route(&mut self, name: &Arc<str>) {
        if let Some(r) = self.recording.as_deref_mut() {
            r.facts.route = Some(name.clone());
        }
    }

    pub fn client(&mut self, ip: IpAddr) {
        if let Some(r) = self.recording.as_deref_mut() {
            r.facts.client = Some(ip);
        }
    }

    pub fn consumer(&mut self, name: Option<&str>, plan: Option<&Arc<str>>) {
        if let Some(r) = self.recording.as_deref_mut() {
            r.facts.consumer = name.map(Into::into);
            r.facts.plan = plan.cloned();
        }
    }

    /// The decision the request span reports (`allowed`, `rejected`, …).
    pub fn decided(&mut self, outcome: &'static str) {
        if let Some(r) = self.recording.as_deref_mut() {
            r.facts.decision = Some(outcome);
        }
    }

    /// The store decision's span, from `start` to `end`.
    pub fn decision_span(
        &mut self,
        start: Instant,
        end: Instant,
        store: &'static str,
        outcome: &'static str,
        limits: usize,
        error: Option<String>,
    ) {
        if self.recording.is_none() {
            return;
        }
        let attributes = vec![
            ("tollgate.store", Value::Static(store)),
            ("tollgate.decision", Value::Static(outcome)),
            ("tollgate.limits", Value::Int(limits as i64)),
        ];
        let id = context::span_id();
        self.child(
            "decision",
            Kind::Internal,
            id,
            (start, end),
            attributes,
            error,
        );
    }

    /// The `traceparent` the upstream receives: this trace, naming the upstream call's span
    /// (a fresh id for an unsampled trace too, so the upstream follows the decision).
    pub fn upstream_traceparent(&mut self) -> HeaderValue {
        let id = *self.upstream_span.get_or_insert_with(context::span_id);
        let value = context::format_traceparent(&self.trace_id, &id, self.sampled());
        HeaderValue::from_bytes(&value).expect("hex and dashes")
    }

    /// The upstream call's span, from `start` to `end`: the status it answered, or why it
    /// failed.
    pub fn upstream_span(
        &mut self,
        start: Instant,
        end: Instant,
        upstream: &str,
        result: Result<u16, String>,
    ) {
        let (Some(id), true) = (self.upstream_span, self.sampled()) else {
            return;
        };
        let mut attributes = vec![("tollgate.upstream", Value::Str(upstream.into()))];
        let error = match result {
            Ok(status) => {
                attributes.push(("http.response.status_code", Value::Int(i64::from(status))));
                (status >= 400).then(|| format!("HTTP {status}"))
            }
            Err(why) => Some(why),
        };
        self.child(
            "upstream",
            Kind::Client,
            id,
            (start, end),
            attributes,
            error,
        );
    }

    fn child(
        &mut self,
        name: &'static str,
        kind: Kind,
        span_id: SpanId,
        (start, end): (Instant, Instant),
        attributes: Vec<(&'static str, Value)>,
        error: Option<String>,
    ) {
        let trace_id = self.trace_id;
        let parent = self.span_id;
        let Some(r) = self.recording.as_deref_mut() else {
            return;
        };
        let start_unix_nanos = r.start_unix_nanos + nanos_between(r.started, start);
        r.spans.push(SpanRecord {
            trace_id,
            span_id,
            parent: Some(parent),
            remote_parent: false,
            name,
            kind,
            start_unix_nanos,
            end_unix_nanos: start_unix_nanos + nanos_between(start, end),
            attributes,
            error,
        });
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn nanos_between(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_nanos() as u64
}

/// A span's kind, as OTLP numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal,
    Server,
    Client,
}

/// An attribute's value.
#[derive(Debug, Clone)]
pub enum Value {
    Str(Arc<str>),
    Static(&'static str),
    Int(i64),
}

/// One finished span, as it waits in the export queue.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    /// The parent came from another service's `traceparent`.
    pub remote_parent: bool,
    pub name: &'static str,
    pub kind: Kind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// Status ERROR with this message; none is status UNSET.
    pub error: Option<String>,
}
