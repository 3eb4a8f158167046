//! The state one tollgate instance shares across connections: the policy in force with its
//! store and metric handles (a [`Runtime`], swapped whole on reload), the metrics registry and
//! the upstream clients. In-flight requests keep the `Runtime` they started with.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{self, ConfigErrors};
use crate::limiter::{Limiter, Store, StoreError};
use crate::metrics::{Metrics, RouteMetrics};
use crate::policy::{Policy, RedisSettings, StoreSettings};
use crate::telemetry::Tracer;
use crate::telemetry::export::Exporter;
use crate::tls::{self, TlsError};
use crate::upstream::tls::{self as upstream_tls, UpstreamTlsError};
use crate::upstream::{Dial, Pools, TargetPool};

/// One loaded policy and what serving it needs.
pub struct Runtime {
    pub policy: Policy,
    pub limiter: Limiter,
    /// Per route, same order as `policy.routes`.
    pub route_metrics: Vec<RouteMetrics>,
    /// The TLS acceptor when `[server.tls]` is set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// `[upstream index][target index]`: the connection pool of each target.
    pub upstream_pools: Vec<Vec<Arc<TargetPool>>>,
    /// `[upstream index][target index]`: its response-head time histogram.
    pub target_durations: Vec<Vec<prometheus_client::metrics::histogram::Histogram>>,
    /// Sampler and span exporter, with `[telemetry]`.
    pub tracer: Option<Tracer>,
}

/// Why a policy could not be put into service.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    UpstreamTls(#[from] UpstreamTlsError),
}

/// The TLS connectors of each upstream with an `https://` target (read from its files now).
fn upstream_connectors(
    policy: &Policy,
) -> Result<Vec<Option<upstream_tls::Connectors>>, UpstreamTlsError> {
    policy
        .upstreams
        .iter()
        .map(|u| {
            u.targets
                .iter()
                .any(|t| t.scheme == http::uri::Scheme::HTTPS)
                .then(|| upstream_tls::connectors(&u.name, &u.tls, u.protocol))
                .transpose()
        })
        .collect()
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("no config file to reload from")]
    NoFile,
}

pub struct App {
    current: ArcSwap<Runtime>,
    pub metrics: Metrics,
    /// Upstream connection pools, kept across reloads.
    pub pools: Pools,
    /// Where the policy came from, for reloads.
    pub config_path: Option<PathBuf>,
}

impl App {
    /// Builds the first runtime. Never contacts the store.
    pub fn new(policy: Policy, config_path: Option<PathBuf>) -> Result<App, BuildError> {
        let metrics = Metrics::new();
        let pools = Pools::default();
        let runtime = Runtime::build(policy, &metrics, &pools, None, None)?;
        metrics.config_loaded(&runtime.policy.source_hash);
        Ok(App {
            current: ArcSwap::from_pointee(runtime),
            metrics,
            pools,
            config_path,
        })
    }

    /// The runtime in force; hold it for the whole request.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Swaps in a new policy. The store is kept (with its connections and, for the memory
    /// store, its counters) when the `[store]` table did not change.
    pub fn install(&self, policy: Policy) -> Result<(), BuildError> {
        let old = self.current.load();
        if policy.server.listen != old.policy.server.listen {
            tracing::warn!(
                old = %old.policy.server.listen,
                new = %policy.server.listen,
                "a changed listen address takes effect only after a restart"
            );
        }
        // The store (its connections; for memory, every counter) is kept unless its backend
        // or Redis connection settings changed: a new timeout or max_keys is no reason to
        // hand every client a fresh quota.
        let reuse = match (&policy.store, &**old.limiter.store()) {
            (StoreSettings::Memory { max_keys, .. }, Store::Memory(m)) => {
                m.set_max_keys(*max_keys);
                Some(old.limiter.store().clone())
            }
            (StoreSettings::Redis(new), _) => match &old.policy.store {
                StoreSettings::Redis(was)
                    if RedisSettings {
                        timeout: was.timeout,
                        ..new.clone()
                    } == *was =>
                {
                    Some(old.limiter.store().clone())
                }
                _ => None,
            },
            _ => None,
        };
        // The exporter (its queue and connection) is kept while spans go to the same place.
        let exporter = match (&old.tracer, &policy.telemetry) {
            (Some(t), Some(settings)) if t.exporter.sends_to(settings) => Some(t.exporter.clone()),
            _ => None,
        };
        let runtime = Runtime::build(policy, &self.metrics, &self.pools, reuse, exporter)?;
        self.metrics.config_loaded(&runtime.policy.source_hash);
        self.current.store(Arc::new(runtime));
        Ok(())
    }

    /// Reloads from `config_path` (or from `text`, the file's content already read by the
    /// watcher); on any error the old policy keeps serving. Counts and logs the result.
    pub fn reload(&self, text: Option<&str>) -> Result<(), ReloadError> {
        let result = match (&self.config_path, text) {
            (None, _) => Err(ReloadError::NoFile),
            (Some(path), None) => config::load(path).map_err(ReloadError::from),
            (Some(path), Some(text)) => config::parse(
                text,
                &path.display().to_string(),
                path.parent().unwrap_or(std::path::Path::new(".")),
            )
            .map_err(ReloadError::from),
        }
        .and_then(|p| self.install(p).map_err(ReloadError::from));
        match &result {
            Ok(()) => {
                self.metrics.reload(true);
                tracing::info!(hash = %self.runtime().policy.source_hash, "config reloaded");
            }
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!("config reload refused, the previous config keeps serving:\n{e}");
            }
        }
        result
    }
}

/// Reads every file the policy names (TLS certificates and keys, the store's TLS files)
/// without contacting anything: what `tollgate check` verifies beyond the config text.
pub fn check_files(policy: &Policy) -> Result<(), BuildError> {
    if let Some(t) = &policy.server.tls {
        tls::acceptor(t)?;
    }
    if let crate::policy::StoreSettings::Redis(r) = &policy.store {
        crate::limiter::redis::tls_certificates(r)?;
    }
    upstream_connectors(policy)?;
    if let Some(t) = &policy.telemetry {
        crate::telemetry::export::connectors(t)?;
    }
    Ok(())
}

impl Runtime {
    fn build(
        policy: Policy,
        metrics: &Metrics,
        pools: &Pools,
        store: Option<Arc<Store>>,
        exporter: Option<Arc<Exporter>>,
    ) -> Result<Runtime, BuildError> {
        let connectors = upstream_connectors(&policy)?;
        let tracer = match &policy.telemetry {
            None => None,
            Some(settings) => {
                let exporter = match exporter {
                    Some(e) => e,
                    None => Exporter::start(settings, metrics.traces.clone())?,
                };
                Some(Tracer::new(settings, exporter))
            }
        };
        pools.prune();
        let upstream_pools = policy
            .upstreams
            .iter()
            .zip(&connectors)
            .map(|(u, connectors)| {
                u.targets
                    .iter()
                    .map(|t| {
                        let dial =
                            Dial::for_target(t, u.connect_timeout, u.protocol, connectors.as_ref());
                        let pool = pools.get(
                            &t.authority,
                            dial,
                            u.max_connections_per_target,
                            u.health_check.as_ref(),
                        );
                        pool.health
                            .attach(metrics.upstream_healthy(&u.name, t.authority.as_str()));
                        pool
                    })
                    .collect()
            })
            .collect();
        let target_durations = policy
            .upstreams
            .iter()
            .map(|u| {
                u.targets
                    .iter()
                    .map(|t| metrics.target_duration(&u.name, t.authority.as_str()))
                    .collect()
            })
            .collect();
        let tls = policy.server.tls.as_ref().map(tls::acceptor).transpose()?;
        let store = match store {
            Some(s) => s,
            None => Arc::new(Store::new(&policy.store)?),
        };
        let route_metrics = policy
            .routes
            .iter()
            .map(|r| metrics.route(&r.name))
            .collect();
        let limiter_metrics = metrics.limiter(store.backend_name());
        Ok(Runtime {
            limiter: Limiter::new(store, policy.store.timeout(), limiter_metrics),
            policy,
            route_metrics,
            tls,
            upstream_pools,
            target_durations,
            tracer,
        })
    }
}
