//! OpenTelemetry traces against a real OTLP/HTTP receiver: a hyper server on a loopback port
//! that decodes each export with the official protobuf types (opentelemetry-proto), asserting
//! span names, parentage, kinds and attributes, what the upstream receives as `traceparent`,
//! parent-based sampling, and that a collector that is down or silent costs requests nothing
//! while its spans are counted as dropped.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Http, Redis, Upstream, eventually, memory_store, redis_store, start_tollgate};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use tokio::net::TcpListener;

/// One span as received, with the resource's service name.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.clone())
    }
    fn str_attr(&self, key: &str) -> Option<String> {
        match self.attr(key) {
            Some(Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }
    fn int_attr(&self, key: &str) -> Option<i64> {
        match self.attr(key) {
            Some(Value::IntValue(i)) => Some(i),
            _ => None,
        }
    }
}

/// A real OTLP/HTTP trace receiver on a free loopback port.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    /// Export requests received, and what their content type said.
    posts: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (spans.clone(), posts.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |r: Request<Incoming>| {
                        let (s, p) = (s.clone(), p.clone());
                        async move {
                            let path = r.uri().path().to_string();
                            let content_type = r
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = r.into_body().collect().await.unwrap().to_bytes();
                            p.lock().unwrap().push((path, content_type));
                            let request = ExportTraceServiceRequest::decode(body)
                                .expect("a valid ExportTraceServiceRequest");
                            let mut got = s.lock().unwrap();
                            for rs in request.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|kv| kv.key == "service.name")
                                    .and_then(|kv| kv.value.as_ref())
                                    .and_then(|v| match &v.value {
                                        Some(Value::StringValue(s)) => Some(s.clone()),
                                        _ => None,
                                    })
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    assert_eq!(ss.scope.as_ref().unwrap().name, "tollgate");
                                    for span in ss.spans {
                                        got.push(Got {
                                            service: service.clone(),
                                            span,
                                        });
                                    }
                                }
                            }
                            let mut response = Response::new(Full::new(Bytes::new()));
                            response
                                .headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            spans,
            posts,
            task,
        }
    }

    fn of_trace(&self, trace_id: &[u8]) -> Vec<Got> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.span.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until the trace has `n` spans.
    async fn wait_for(&self, trace_id: &[u8], n: usize) -> Vec<Got> {
        eventually(Duration::from_secs(10), || async {
            self.of_trace(trace_id).len() >= n
        })
        .await;
        self.of_trace(trace_id)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A config whose one route `api` allows a burst of `burst` per IP, with `[telemetry]`.
fn config(upstream: &Upstream, store: &str, telemetry: &str, burst: u32) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{store}\n\n{telemetry}\n\n\
         [upstreams.api]\ntargets = [\"{}\"]\ntimeout = \"2s\"\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"api\"\n\
         [[routes.limits]]\nby = \"ip\"\nalgorithm = \"token_bucket\"\nrate = \"{burst}/hour\"\nburst = {burst}\n",
        upstream.target()
    )
}

fn telemetry(receiver: &Receiver, ratio: &str) -> String {
    format!(
        "[telemetry]\notlp_endpoint = \"http://{}\"\nservice_name = \"edge\"\nsample_ratio = {ratio}\n",
        receiver.addr
    )
}

/// The `traceparent` the upstream received last: (trace id, span id, flags).
fn upstream_traceparent(upstream: &Upstream) -> (String, String, String) {
    let last = upstream.last();
    let value = last
        .headers
        .get("traceparent")
        .expect("the upstream receives a traceparent")
        .to_str()
        .unwrap()
        .to_string();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    (
        parts[1].to_string(),
        parts[2].to_string(),
        parts[3].to_string(),
    )
}

fn by_name<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    spans
        .iter()
        .find(|g| g.span.name == name)
        .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
}

async fn continues_and_records(store: &str, backend: &str) {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start().await;
    // Ratio 0: only the caller's sampled traceparent makes these traces sampled.
    let tg = start_tollgate(&config(&upstream, store, &telemetry(&receiver, "0"), 1)).await;
    let http = Http::new();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let incoming = format!("00-{trace}-{caller}-01");
    let url = format!("http://{}/orders/7?api_key=secret", tg.addr);
    let r = http
        .get(&url, &[("traceparent", &incoming), ("tracestate", "k=v")])
        .await;
    assert_eq!(r.status, 200);

    // The upstream continues the same trace, from tollgate's upstream span, sampled.
    let (up_trace, up_span, flags) = upstream_traceparent(&upstream);
    assert_eq!(up_trace, trace);
    assert_ne!(up_span, caller);
    assert_eq!(flags, "01");
    assert_eq!(
        upstream.last().headers.get("tracestate").unwrap(),
        "k=v",
        "tracestate passes as sent"
    );

    let spans = receiver.wait_for(&unhex(trace), 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let request = by_name(&spans, "request");
    let decision = by_name(&spans, "decision");
    let call = by_name(&spans, "upstream");
    assert!(spans.iter().all(|g| g.service == "edge"));

    assert_eq!(request.span.kind, SpanKind::Server as i32);
    assert_eq!(request.span.parent_span_id, unhex(caller));
    assert_eq!(request.str_attr("tollgate.route").as_deref(), Some("api"));
    assert_eq!(
        request.str_attr("tollgate.decision").as_deref(),
        Some("allowed")
    );
    assert_eq!(request.int_attr("http.response.status_code"), Some(200));
    assert_eq!(
        request.str_attr("http.request.method").as_deref(),
        Some("GET")
    );
    // The path, never the query string (which may carry a key).
    assert_eq!(request.str_attr("url.path").as_deref(), Some("/orders/7"));
    assert!(
        request
            .span
            .attributes
            .iter()
            .all(|kv| !format!("{:?}", kv.value).contains("secret"))
    );
    assert_eq!(
        request.str_attr("client.address").as_deref(),
        Some("127.0.0.1")
    );
    // The parent came from another process.
    assert_eq!(request.span.flags & 0x300, 0x300);

    assert_eq!(decision.span.kind, SpanKind::Internal as i32);
    assert_eq!(decision.span.parent_span_id, request.span.span_id);
    assert_eq!(
        decision.str_attr("tollgate.store").as_deref(),
        Some(backend)
    );
    assert_eq!(
        decision.str_attr("tollgate.decision").as_deref(),
        Some("allowed")
    );
    assert_eq!(decision.int_attr("tollgate.limits"), Some(1));

    assert_eq!(call.span.kind, SpanKind::Client as i32);
    assert_eq!(call.span.parent_span_id, request.span.span_id);
    assert_eq!(call.span.span_id, unhex(&up_span));
    assert_eq!(call.int_attr("http.response.status_code"), Some(200));
    assert_eq!(call.str_attr("tollgate.upstream").as_deref(), Some("api"));
    assert_eq!(call.span.flags & 0x300, 0x100, "a local parent");

    // Children lie within the request, the decision before the upstream call.
    let r = &request.span;
    for child in [&decision.span, &call.span] {
        assert!(r.start_time_unix_nano <= child.start_time_unix_nano);
        assert!(child.start_time_unix_nano <= child.end_time_unix_nano);
        assert!(child.end_time_unix_nano <= r.end_time_unix_nano);
    }
    assert!(decision.span.end_time_unix_nano <= call.span.start_time_unix_nano);
    let status = |g: &Got| g.span.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(status(request), StatusCode::Unset as i32);

    // Over the limit: a request span with the rejection and its decision, no upstream call.
    let second = "a3ce929d0e0e47364bf92f3577b34da6";
    let r = http
        .get(
            &url,
            &[("traceparent", &format!("00-{second}-{caller}-01"))],
        )
        .await;
    assert_eq!(r.status, 429);
    let spans = receiver.wait_for(&unhex(second), 2).await;
    let request = by_name(&spans, "request");
    assert_eq!(
        request.str_attr("tollgate.decision").as_deref(),
        Some("rejected")
    );
    assert_eq!(request.int_attr("http.response.status_code"), Some(429));
    assert_eq!(
        by_name(&spans, "decision")
            .str_attr("tollgate.decision")
            .as_deref(),
        Some("rejected")
    );
    assert!(spans.iter().all(|g| g.span.name != "upstream"));

    let posts = receiver.posts.lock().unwrap().clone();
    assert!(
        posts
            .iter()
            .all(|(path, ct)| path == "/v1/traces" && ct == "application/x-protobuf"),
        "{posts:?}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_sampled_caller_is_continued_with_request_decision_and_upstream_spans_memory() {
    continues_and_records(&memory_store(), "memory").await;
}

#[tokio::test]
async fn a_sampled_caller_is_continued_with_request_decision_and_upstream_spans_redis() {
    let redis = Redis::start();
    continues_and_records(&redis_store(&redis), "redis").await;
}

#[tokio::test]
async fn unsampled_traces_are_propagated_and_never_exported() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config(
        &upstream,
        &memory_store(),
        &telemetry(&receiver, "0"),
        100,
    ))
    .await;
    let http = Http::new();
    let url = format!("http://{}/x", tg.addr);

    // No traceparent, ratio 0: a fresh trace, not sampled, still propagated.
    assert_eq!(http.get(&url, &[]).await.status, 200);
    let (fresh, _, flags) = upstream_traceparent(&upstream);
    assert_eq!(flags, "00");
    assert_ne!(fresh, "0".repeat(32));

    // The caller did not sample: neither does tollgate, and the upstream is told so.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let incoming = format!("00-{trace}-b7ad6b7169203331-00");
    assert_eq!(
        http.get(&url, &[("traceparent", &incoming)]).await.status,
        200
    );
    let (up_trace, up_span, flags) = upstream_traceparent(&upstream);
    assert_eq!((up_trace.as_str(), flags.as_str()), (trace, "00"));
    assert_ne!(up_span, "b7ad6b7169203331");

    // An invalid traceparent (upper-case hex) starts a trace of tollgate's own.
    let invalid = "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01";
    assert_eq!(
        http.get(&url, &[("traceparent", invalid)]).await.status,
        200
    );
    let (own, _, flags) = upstream_traceparent(&upstream);
    assert_ne!(own.to_uppercase(), "0AF7651916CD43DD8448EB211C80319C");
    assert_eq!(flags, "00", "ratio 0 samples no new trace");

    // A sampled one after them: once its spans are in, nothing else was exported (the
    // queue is sent in order).
    let barrier = "11111111111111111111111111111111";
    let sampled = format!("00-{barrier}-2222222222222222-01");
    assert_eq!(
        http.get(&url, &[("traceparent", &sampled)]).await.status,
        200
    );
    receiver.wait_for(&unhex(barrier), 3).await;
    let all = receiver.spans.lock().unwrap().clone();
    assert!(
        all.iter().all(|g| g.span.trace_id == unhex(barrier)),
        "{all:#?}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn ratio_one_starts_root_traces_and_flushes_at_shutdown() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config(
        &upstream,
        &memory_store(),
        &telemetry(&receiver, "1"),
        100,
    ))
    .await;
    let http = Http::new();
    let r = http
        .get(&format!("http://{}/status/503", tg.addr), &[])
        .await;
    assert_eq!(r.status, 503);
    let (trace, up_span, flags) = upstream_traceparent(&upstream);
    assert_eq!(flags, "01");
    // Stopping sends what is queued at once, without waiting out the batch delay.
    tg.stop().await;
    let spans = receiver.of_trace(&unhex(&trace));
    assert_eq!(spans.len(), 3, "flushed at shutdown: {spans:#?}");
    let request = by_name(&spans, "request");
    assert!(request.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(request.span.flags & 0x300, 0x100, "no remote parent");
    let error = |g: &Got| g.span.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(error(request), StatusCode::Error as i32, "a 5xx answer");
    let call = by_name(&spans, "upstream");
    assert_eq!(call.span.span_id, unhex(&up_span));
    assert_eq!(error(call), StatusCode::Error as i32);
}

#[tokio::test]
async fn without_telemetry_the_traceparent_passes_unchanged() {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config(&upstream, &memory_store(), "", 100)).await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = Http::new()
        .get(
            &format!("http://{}/x", tg.addr),
            &[("traceparent", incoming)],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream.last().headers.get("traceparent").unwrap(),
        incoming
    );
    tg.stop().await;
}

/// The value of one sample of `/metrics`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_silent_or_refusing_collector_costs_requests_nothing_and_drops_are_counted() {
    // Silent: accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let upstream = Upstream::start().await;
    let config_for = |addr: SocketAddr| {
        config(
            &upstream,
            &memory_store(),
            &format!("[telemetry]\notlp_endpoint = \"http://{addr}\"\n"),
            1_000_000,
        )
    };
    let tg = start_tollgate(&config_for(silent_addr)).await;
    let admin = tg.admin_addr.unwrap();
    let http = Http::new();
    let url = format!("http://{}/x", tg.addr);
    // 3 spans a request: 1,000 requests overflow the 2,048-span queue while the first
    // export hangs.
    for _ in 0..1_000 {
        assert_eq!(http.get(&url, &[]).await.status, 200);
    }
    let metrics = http.scrape(admin).await;
    let full = sample(
        &metrics,
        "tollgate_trace_spans_dropped_total{reason=\"queue_full\"}",
    );
    assert!(full > 0.0, "{metrics}");
    assert_eq!(sample(&metrics, "tollgate_trace_spans_exported_total"), 0.0);
    tg.stop().await;
    held.abort();

    // Refusing: nothing listens on the port; the batch is tried twice, then counted.
    let port = common::free_port();
    let tg = start_tollgate(&config_for(SocketAddr::from(([127, 0, 0, 1], port)))).await;
    let admin = tg.admin_addr.unwrap();
    let url = format!("http://{}/x", tg.addr);
    for _ in 0..10 {
        assert_eq!(http.get(&url, &[]).await.status, 200);
    }
    eventually(Duration::from_secs(10), || async {
        let m = http.scrape(admin).await;
        sample(
            &m,
            "tollgate_trace_spans_dropped_total{reason=\"export_failed\"}",
        ) >= 30.0
    })
    .await;
    tg.stop().await;
}
