//! The export side of tracing: a bounded queue that requests drop their spans into without
//! waiting (full: the span is dropped and counted), and one task that sends them in batches
//! (up to [`MAX_BATCH`], or what gathered within [`DELAY`] of the first) as OTLP/HTTP
//! protobuf POSTs to the collector, one at a time, each within [`EXPORT_TIMEOUT`]. A collector
//! that is down or slow costs requests nothing: its spans are dropped and counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

use super::{Settings, SpanRecord, otlp};
use crate::policy::{Protocol, UpstreamTls};
use crate::upstream::tls::{self as upstream_tls, UpstreamTlsError};
use crate::upstream::{Dial, Pools, TargetPool};

/// Spans waiting at most (OpenTelemetry's SDK default queue size).
pub const QUEUE: usize = 2048;
/// Spans in one export request at most.
pub const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for others.
pub const DELAY: Duration = Duration::from_secs(1);
/// One export request, its connection included, at most.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The counters of `tollgate_trace_spans_exported_total` and
/// `tollgate_trace_spans_dropped_total{reason}`.
#[derive(Clone, Default)]
pub struct ExportMetrics {
    pub exported: Counter,
    pub queue_full: Counter,
    pub export_failed: Counter,
}

enum Item {
    Span(Box<SpanRecord>),
    /// Answered once everything queued before it was sent (or failed).
    Flush(oneshot::Sender<()>),
}

/// The queue's sending end, shared by the runtimes that export to the same collector.
pub struct Exporter {
    queue: mpsc::Sender<Item>,
    metrics: ExportMetrics,
    /// Where this exporter sends, to tell whether a reload can keep it.
    destination: (
        super::Target,
        http::uri::PathAndQuery,
        Option<std::path::PathBuf>,
        String,
    ),
}

fn destination(
    s: &Settings,
) -> (
    super::Target,
    http::uri::PathAndQuery,
    Option<std::path::PathBuf>,
    String,
) {
    (
        s.endpoint.clone(),
        s.path.clone(),
        s.ca.clone(),
        s.service_name.clone(),
    )
}

impl Exporter {
    /// Reads the CA file (for `https://`) and starts the export task on the current Tokio
    /// runtime (without one, every span is dropped and counted).
    pub fn start(
        settings: &Settings,
        metrics: ExportMetrics,
    ) -> Result<Arc<Exporter>, UpstreamTlsError> {
        let connectors = connectors(settings)?;
        let (queue, rx) = mpsc::channel(QUEUE);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let dial = Dial::for_target(
                &settings.endpoint,
                CONNECT_TIMEOUT,
                Protocol::Http1,
                connectors.as_ref(),
            );
            let pool = Pools::default().get(&settings.endpoint.authority, dial, 1, None);
            let sink = Sink {
                pool,
                path: settings.path.clone(),
                url: settings.url(),
                service_name: settings.service_name.clone(),
                metrics: metrics.clone(),
                warned: None,
            };
            runtime.spawn(run(rx, sink));
        }
        Ok(Arc::new(Exporter {
            queue,
            metrics,
            destination: destination(settings),
        }))
    }

    /// Whether this exporter sends where `settings` say (a reload then keeps it).
    pub fn sends_to(&self, settings: &Settings) -> bool {
        self.destination == destination(settings)
    }

    /// Queues one span; never waits.
    pub fn offer(&self, span: SpanRecord) {
        if self.queue.try_send(Item::Span(Box::new(span))).is_err() {
            self.metrics.queue_full.inc();
        }
    }

    /// Sends what is queued, waiting at most `within` (at shutdown).
    pub async fn flush(&self, within: Duration) {
        let (tx, rx) = oneshot::channel();
        let _ = tokio::time::timeout(within, async {
            if self.queue.send(Item::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        })
        .await;
    }
}

/// The TLS connector of an `https://` collector (its `tls_ca` read now).
pub fn connectors(
    settings: &Settings,
) -> Result<Option<upstream_tls::Connectors>, UpstreamTlsError> {
    (settings.endpoint.scheme == http::uri::Scheme::HTTPS)
        .then(|| {
            let tls = UpstreamTls {
                ca: settings.ca.clone(),
                client: None,
                server_name: None,
            };
            upstream_tls::connectors("OTLP collector", &tls, Protocol::Http1)
        })
        .transpose()
}

/// Where batches go, and what the task counts.
struct Sink {
    pool: Arc<TargetPool>,
    path: http::uri::PathAndQuery,
    url: String,
    service_name: String,
    metrics: ExportMetrics,
    /// When a failure was last logged (at most one warning every 10 s).
    warned: Option<Instant>,
}

/// The export task: until every sender is gone, batch and send.
async fn run(mut rx: mpsc::Receiver<Item>, mut sink: Sink) {
    let mut batch: Vec<SpanRecord> = Vec::with_capacity(MAX_BATCH);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let Some(first) = rx.recv().await else { return };
        take(first, &mut batch, &mut flushes);
        let deadline = tokio::time::sleep(DELAY);
        tokio::pin!(deadline);
        let mut closed = false;
        while batch.len() < MAX_BATCH && flushes.is_empty() {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => take(item, &mut batch, &mut flushes),
                    None => {
                        closed = true;
                        break;
                    }
                },
                () = &mut deadline => break,
            }
        }
        if !batch.is_empty() {
            sink.export(&batch).await;
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        if closed {
            return;
        }
    }
}

fn take(item: Item, batch: &mut Vec<SpanRecord>, flushes: &mut Vec<oneshot::Sender<()>>) {
    match item {
        Item::Span(span) => batch.push(*span),
        Item::Flush(done) => flushes.push(done),
    }
}

/// Whether a failed export may be tried again (OTLP/HTTP: 429, 502, 503, 504).
fn retryable(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

impl Sink {
    /// Sends one batch (tried twice, a second apart, when the collector is unreachable or
    /// says to retry), counting its spans exported or dropped.
    async fn export(&mut self, batch: &[SpanRecord]) {
        let body = Bytes::from(otlp::export_request(&self.service_name, batch));
        let attempt = || {
            self.pool.one_shot(
                http::Method::POST,
                &self.path,
                Some(("application/x-protobuf", body.clone())),
            )
        };
        let started = Instant::now();
        let mut result = tokio::time::timeout(EXPORT_TIMEOUT, attempt()).await;
        let again = match &result {
            Ok(Ok(status)) => retryable(*status),
            Ok(Err(_)) => true,
            Err(_) => false,
        };
        if again {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let left = EXPORT_TIMEOUT.saturating_sub(started.elapsed());
            result = tokio::time::timeout(left, attempt()).await;
        }
        let why = match result {
            Ok(Ok(status)) if status.is_success() => {
                self.metrics.exported.inc_by(batch.len() as u64);
                return;
            }
            Ok(Ok(status)) => format!("the collector answered {status}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}s", EXPORT_TIMEOUT.as_secs()),
        };
        self.metrics.export_failed.inc_by(batch.len() as u64);
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            self.warned = Some(Instant::now());
            tracing::warn!(
                endpoint = %self.url,
                spans = batch.len(),
                "trace export failed, spans dropped: {why}"
            );
        }
    }
}
