//! ferry's control plane (control side only; it never links the AF_XDP crates): learns which node
//! owns which pod CIDR and publishes forwarding tables for the data plane.
//!
//! ```text
//!  sources (tasks)                      engine (one task)                 publisher
//!  kube: list+watch Nodes  ─┐
//!  etcd: Flannel leases     ├─ Update ─> batch -> Engine::apply ... finish -> Publish::publish
//!  static: TOML file       ─┘   (mpsc)            (diff, last good state)    (compile + swap)
//!  kube: Services + EndpointSlices, static: [[service]]
//!                           ── Update::Services{,Changed} ───────────────> Publish::services{,_changed}
//! ```
//!
//! - [`ControlPlane::spawn`] starts a thread named `ferry-control` running its own single-threaded
//!   tokio runtime; the data plane stays synchronous and only loads published snapshots.
//! - Sources ([`source`]) reconnect with backoff and resync in full; the [`engine`] turns updates
//!   into a diff, idempotently, resolving overlapping claims by seniority the same way on every
//!   agent and keeping the last good state of nodes whose new data does not parse;
//!   a [`Publish`]er hands the table over: [`TablesPublisher`] into the data plane's
//!   `ferry_tables::Tables` (what workers read).
//! - Every event carries the instant its source saw it; the engine loop records the time until
//!   the table reflecting it is published in the `convergence_seconds` histogram ([`metrics`]).

pub mod config;
pub mod deployment;
pub mod engine;
pub mod flannel;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod publish;
mod shutdown;
pub mod source;
pub mod tables;

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

pub use config::{ConfigError, ControlArgs, ControlConfig, EtcdConfig, KubeAuth, KubeConfig};
pub use engine::{Diff, Engine};
pub use metrics::Metrics;
pub use model::{NextHop, NodeKey, NodeSpec, Rejection, Route, ServiceDelta, SourceKind, TunnelEndpoint, Update};
pub use publish::{Publish, RouteTable};
pub use tables::{PodDirectory, SkippedNodes, TablesPublisher};

use source::{EventTx, SourceEvent};

/// Largest number of queued updates applied as one batch (one publication).
const MAX_BATCH: usize = 4096;
/// How long shutdown waits for sources to finish (the etcd source releases its lease).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The metrics address cannot be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// Kubernetes credentials are unusable.
    #[error(transparent)]
    Kube(#[from] source::kube::KubeClientError),
    /// The thread or its runtime could not be created.
    #[error("cannot start the control thread: {0}")]
    Runtime(#[source] std::io::Error),
    /// The control thread ended during startup.
    #[error("the control thread stopped during startup")]
    Startup,
}

/// A running control plane. Dropping it (or [`ControlPlane::shutdown`]) stops the sources,
/// releases this node's etcd lease and joins the thread; published snapshots stay readable.
#[derive(Debug)]
pub struct ControlPlane {
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    metrics: Metrics,
    metrics_addr: Option<SocketAddr>,
}

impl ControlPlane {
    /// Starts the control thread with the configured sources, publishing through `publisher`.
    ///
    /// Returns once the sources are started; it does not wait for any server to answer (sources
    /// connect and retry in the background).
    ///
    /// # Errors
    /// [`ControlError`] for a configuration without a source, unusable credentials, a metrics
    /// address that cannot be bound, or a thread that cannot start.
    pub fn spawn(config: ControlConfig, publisher: impl Publish) -> Result<Self, ControlError> {
        if config.kube.is_none() && config.etcd.is_none() && config.static_file.is_none() {
            return Err(ConfigError::NoSource.into());
        }
        let metrics = Metrics::new();
        let listener = match config.metrics_addr {
            Some(addr) => Some(metrics::bind(addr).map_err(|source| ControlError::MetricsBind { addr, source })?),
            None => None,
        };
        let metrics_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-control".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(ControlError::Runtime(e)));
                        return;
                    }
                };
                rt.block_on(run(config, publisher, m, listener, shutdown_rx, ready_tx));
            })
            .map_err(ControlError::Runtime)?;
        let cp = ControlPlane { shutdown: shutdown_tx, thread: Some(thread), metrics, metrics_addr };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(cp),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ControlError::Startup),
        }
    }

    /// The control plane's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The address the metrics endpoint listens on, when enabled (useful with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops the sources (releasing this node's etcd lease) and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn run(
    config: ControlConfig,
    publisher: impl Publish,
    metrics: Metrics,
    listener: Option<std::net::TcpListener>,
    shutdown: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), ControlError>>,
) {
    let (tx, rx) = mpsc::channel::<SourceEvent>(MAX_BATCH);
    let tx = EventTx(tx);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(l) = listener {
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => {
                tasks.spawn(metrics::serve(l, metrics.clone(), shutdown.clone()));
            }
            Err(e) => {
                let addr = config.metrics_addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                let _ = ready.send(Err(ControlError::MetricsBind { addr, source: e }));
                return;
            }
        }
    }
    if let Some(k) = &config.kube {
        let client = match source::kube::client(&k.auth).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        let announce = if k.announce { source::kube::Announcement::from_config(&config) } else { None };
        {
            use source::kube_policy as kp;
            let (tx, metrics, shutdown) = (tx.clone(), metrics.clone(), shutdown.clone());
            tasks.spawn(
                kp::KindWatcher {
                    api: kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()),
                    kind: model::ObjectKind::Namespace,
                    key: kp::namespace_key,
                    convert: kp::namespace_convert,
                    tx: tx.clone(),
                    metrics: metrics.clone(),
                    shutdown: shutdown.clone(),
                }
                .run(),
            );
            tasks.spawn(
                kp::KindWatcher {
                    api: kube::Api::<k8s_openapi::api::core::v1::Pod>::all(client.clone()),
                    kind: model::ObjectKind::Pod,
                    key: kp::pod_key_of,
                    convert: kp::pod_object,
                    tx: tx.clone(),
                    metrics: metrics.clone(),
                    shutdown: shutdown.clone(),
                }
                .run(),
            );
            tasks.spawn(
                kp::KindWatcher {
                    api: kube::Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::all(client.clone()),
                    kind: model::ObjectKind::NetworkPolicy,
                    key: kp::policy_key,
                    convert: kp::policy_convert,
                    tx,
                    metrics,
                    shutdown,
                }
                .run(),
            );
        }
        tasks.spawn(
            source::kube_services::KubeServiceSource {
                client: client.clone(),
                own_node: config.node_name.clone(),
                tx: tx.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            }
            .run(),
        );
        tasks.spawn(
            source::kube::KubeSource {
                api: kube::Api::all(client),
                ctx: source::kube::ParseCtx::from_config(&config),
                announce,
                tx: tx.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            }
            .run(),
        );
    }
    if let Some(e) = &config.etcd {
        let src = source::etcd::EtcdSource::new(&config, e.clone(), tx.clone(), metrics.clone(), shutdown.clone());
        tasks.spawn(src.run());
    }
    if let Some(path) = &config.static_file {
        tasks.spawn(
            source::static_file::StaticSource {
                path: path.clone(),
                defaults: source::static_file::Defaults::from_config(&config),
                tx: tx.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            }
            .run(),
        );
    }
    drop(tx);
    let _ = ready.send(Ok(()));
    tracing::info!(node = %config.node_name, "control plane started");

    let engine = Engine::new(config.cluster_cidrs.clone(), metrics.clone());
    engine_loop(engine, rx, publisher, &metrics, shutdown).await;
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("control plane sources did not stop within {SHUTDOWN_GRACE:?}");
    }
}

fn flush_services(publisher: &mut impl Publish, pending: &mut ServiceDelta, metrics: &Metrics) {
    if !pending.is_empty() {
        publisher.services_changed(pending);
        metrics.published();
        *pending = ServiceDelta::default();
    }
}

/// Receives updates, applies them in batches and publishes each batch that changed the table.
async fn engine_loop(
    mut engine: Engine,
    mut rx: mpsc::Receiver<SourceEvent>,
    mut publisher: impl Publish,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut mattered = Vec::with_capacity(MAX_BATCH);
    let mut store = policy::PolicyStore::new(metrics.clone());
    loop {
        let first = tokio::select! {
            ev = rx.recv() => ev,
            _ = shutdown::stopped(&mut shutdown) => None,
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        // Service changes in a row are merged into one publication (a burst of EndpointSlice
        // events rebuilds the service index once), in order with the other updates.
        let mut pending = ServiceDelta::default();
        for ev in batch.drain(..) {
            let SourceEvent { seen, update } = ev;
            if let crate::model::Update::ServicesChanged(_, delta) = update {
                pending.merge(delta);
                continue;
            }
            flush_services(&mut publisher, &mut pending, metrics);
            if let crate::model::Update::Services(_, services) = &update {
                publisher.services(services);
                metrics.published();
                continue;
            }
            if store.apply(&update) {
                continue;
            }
            if engine.apply(update) {
                mattered.push(seen);
            }
        }
        flush_services(&mut publisher, &mut pending, metrics);
        let objects = store.take_changes();
        if !objects.is_empty() {
            publisher.objects(&store, &objects);
        }
        let diff = engine.finish();
        if diff.is_empty() {
            mattered.clear();
            continue;
        }
        let started = Instant::now();
        publisher.publish(&RouteTable { generation: engine.generation(), routes: engine.routes(), diff: &diff });
        let published = Instant::now();
        metrics.published();
        for seen in mattered.drain(..) {
            metrics.converged(published.saturating_duration_since(seen));
        }
        tracing::debug!(
            generation = engine.generation(),
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            routes = engine.routes().len(),
            publish_us = (published - started).as_micros() as u64,
            "published"
        );
    }
}
