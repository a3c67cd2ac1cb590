//! The control plane's metrics (control side) and the Prometheus endpoint that serves them.
//!
//! Everything is registered under the `ferry_control_` prefix:
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `routes_installed{next_hop}` | gauge | pod CIDRs in the published table, `local` or `tunnel` |
//! | `nodes` | gauge | nodes with at least one installed CIDR |
//! | `source_up{source}` | gauge | 1 while the source is connected and synced |
//! | `source_reconnects_total{source}` | counter | sessions that ended in an error |
//! | `source_events_total{source}` | counter | updates received from the source |
//! | `rejected_objects_total{source,field}` | counter | objects refused (bad field, overlap, outside the network) |
//! | `publications_total` | counter | tables published |
//! | `convergence_seconds` | histogram | event seen by a source -> table containing it published |
//!
//! The endpoint is off unless an address is configured (`--metrics-addr`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::model::SourceKind;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectLabels {
    source: &'static str,
    field: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NextHopLabels {
    next_hop: &'static str,
}

/// More metric families, served after the control plane's: a registry of their own (no prefix),
/// typically holding a [`Collector`] that reads the data plane's counters at each scrape.
struct Extra(std::sync::Mutex<Option<Registry>>);

/// What `/healthz` and `/readyz` answer: see [`Metrics::set_health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The process works (`/healthz` answers 200; otherwise 503).
    pub live: bool,
    /// It is ready to carry traffic (`/readyz` answers 200; otherwise 503).
    pub ready: bool,
    /// Why not, when it is not live or not ready (the response body).
    pub detail: String,
}

/// Computes the agent's [`Health`] each time a probe asks.
pub type HealthCheck = Box<dyn Fn() -> Health + Send + Sync>;

struct HealthSlot(std::sync::Mutex<Option<HealthCheck>>);

impl std::fmt::Debug for HealthSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HealthSlot")
    }
}

impl std::fmt::Debug for Extra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Extra")
    }
}

#[derive(Debug)]
struct Inner {
    extra: Extra,
    health: HealthSlot,
    registry: Registry,
    routes: Family<NextHopLabels, Gauge>,
    nodes: Gauge,
    source_up: Family<SourceLabels, Gauge>,
    reconnects: Family<SourceLabels, Counter>,
    events: Family<SourceLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    publications: Counter,
    convergence: Histogram,
}

/// Handle to the control plane's metrics; cheap to clone, shared by the sources and the engine.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferry_control");
        let routes = Family::<NextHopLabels, Gauge>::default();
        let nodes = Gauge::default();
        let source_up = Family::<SourceLabels, Gauge>::default();
        let reconnects = Family::<SourceLabels, Counter>::default();
        let events = Family::<SourceLabels, Counter>::default();
        let rejected = Family::<RejectLabels, Counter>::default();
        let publications = Counter::default();
        // 100 us .. ~26 s.
        let convergence = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register("routes_installed", "Pod CIDRs in the published table, by next hop", routes.clone());
        registry.register("nodes", "Nodes with at least one installed pod CIDR", nodes.clone());
        registry.register("source_up", "1 while the source is connected and synced", source_up.clone());
        registry.register("source_reconnects", "Source sessions that ended in an error", reconnects.clone());
        registry.register("source_events", "Updates received from the source", events.clone());
        registry.register("rejected_objects", "Objects refused, by source and field", rejected.clone());
        registry.register("publications", "Forwarding tables published", publications.clone());
        registry.register(
            "convergence_seconds",
            "Time from a source seeing an event to the publication of the table reflecting it",
            convergence.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                extra: Extra(std::sync::Mutex::new(None)),
                health: HealthSlot(std::sync::Mutex::new(None)),
                registry,
                routes,
                nodes,
                source_up,
                reconnects,
                events,
                rejected,
                publications,
                convergence,
            }),
        }
    }

    pub(crate) fn set_routes(&self, local: usize, tunnel: usize, nodes: usize) {
        let i = &self.inner;
        i.routes.get_or_create(&NextHopLabels { next_hop: "local" }).set(gauge_value(local));
        i.routes.get_or_create(&NextHopLabels { next_hop: "tunnel" }).set(gauge_value(tunnel));
        i.nodes.set(gauge_value(nodes));
    }

    pub(crate) fn set_source_up(&self, source: SourceKind, up: bool) {
        self.inner.source_up.get_or_create(&SourceLabels { source: source.name() }).set(i64::from(up));
    }

    pub(crate) fn source_reconnect(&self, source: SourceKind) {
        self.inner.reconnects.get_or_create(&SourceLabels { source: source.name() }).inc();
    }

    pub(crate) fn source_event(&self, source: SourceKind) {
        self.inner.events.get_or_create(&SourceLabels { source: source.name() }).inc();
    }

    pub(crate) fn rejected(&self, source: SourceKind, field: &str) {
        self.inner.rejected.get_or_create(&RejectLabels { source: source.name(), field: field.to_owned() }).inc();
    }

    pub(crate) fn published(&self) {
        self.inner.publications.inc();
    }

    pub(crate) fn converged(&self, latency: Duration) {
        self.inner.convergence.observe(latency.as_secs_f64());
    }

    /// Whether the source is up (1) or down (0); `None` before it reported anything.
    pub fn source_up(&self, source: SourceKind) -> Option<bool> {
        let family = &self.inner.source_up;
        // get_or_create would report a never-set source as down.
        family.get(&SourceLabels { source: source.name() }).map(|g| g.get() == 1)
    }

    /// Rejections counted for a source and field.
    pub fn rejected_total(&self, source: SourceKind, field: &str) -> u64 {
        let family = &self.inner.rejected;
        family.get(&RejectLabels { source: source.name(), field: field.to_owned() }).map_or(0, |c| c.get())
    }

    /// Rejections counted for a source, all fields.
    pub fn rejected_all(&self, source: SourceKind) -> u64 {
        let text = self.encode();
        let prefix = format!("ferry_control_rejected_objects_total{{source=\"{}\"", source.name());
        text.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
    }

    /// Source sessions that ended in an error.
    pub fn reconnects(&self, source: SourceKind) -> u64 {
        self.inner.reconnects.get(&SourceLabels { source: source.name() }).map_or(0, |c| c.get())
    }

    /// Tables published so far.
    pub fn publications(&self) -> u64 {
        self.inner.publications.get()
    }

    /// Serve more metric families with `collector` (the data plane's counters, say), asked at
    /// each scrape. Its names are its own: the control plane's prefix is not added. Calling it
    /// again adds another.
    pub fn add_collector(&self, collector: Box<dyn Collector>) {
        let mut extra = self.inner.extra.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        extra.get_or_insert_with(Registry::default).register_collector(collector);
    }

    /// Answer `/healthz` and `/readyz` with `f`. Until it is set, the endpoint is live and ready
    /// once the control plane has published a table.
    pub fn set_health(&self, f: HealthCheck) {
        *self.inner.health.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(f);
    }

    /// The health the probes see now.
    pub fn health(&self) -> Health {
        let slot = self.inner.health.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.as_ref() {
            Some(f) => f(),
            None => {
                let ready = self.publications() > 0;
                let detail = if ready { String::new() } else { "no table published yet".into() };
                Health { live: true, ready, detail }
            }
        }
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text;
        let mut out = String::new();
        // Writing into a String cannot fail; a collector that fails leaves its families out.
        let _ = text::encode_registry(&mut out, &self.inner.registry);
        let extra = self.inner.extra.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = extra.as_ref() {
            let mark = out.len();
            if text::encode_registry(&mut out, r).is_err() {
                out.truncate(mark);
            }
        }
        let _ = text::encode_eof(&mut out);
        out
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Serves `GET /metrics`, `GET /healthz` and `GET /readyz` on `listener` until `shutdown` turns
/// true. One task per connection; anything else answers 404.
pub(crate) async fn serve(listener: TcpListener, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "metrics endpoint: connection ended with an error");
            }
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    if req.method() != Method::GET {
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    }
    match req.uri().path() {
        "/metrics" => {}
        "/healthz" | "/readyz" => {
            let h = metrics.health();
            let ok = if req.uri().path() == "/healthz" { h.live } else { h.live && h.ready };
            let body = if ok { "ok\n".to_owned() } else { format!("{}\n", h.detail) };
            *resp.body_mut() = Full::new(Bytes::from(body));
            if !ok {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            return resp;
        }
        _ => {
            *resp.status_mut() = StatusCode::NOT_FOUND;
            return resp;
        }
    }
    *resp.body_mut() = Full::new(Bytes::from(metrics.encode()));
    if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Binds the metrics listener (synchronously, so that a bad address fails at startup).
///
/// # Errors
/// The bind error.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Seven;

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Why {
        why: String,
    }

    impl Collector for Seven {
        fn encode(
            &self,
            mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
        ) -> Result<(), std::fmt::Error> {
            use prometheus_client::encoding::EncodeMetric;
            use prometheus_client::metrics::counter::ConstCounter;
            let c = ConstCounter::new(7u64);
            let mut family = encoder.encode_descriptor("x", "Seven", None, c.metric_type())?;
            c.encode(family.encode_family(&Why { why: "a \"quoted\" \\ value".into() })?)?;
            Ok(())
        }
    }

    #[test]
    fn collected_families_come_before_the_end_marker_unprefixed_and_escaped() {
        let m = Metrics::new();
        m.add_collector(Box::new(Seven));
        let text = m.encode();
        assert!(text.contains("ferry_control_publications_total 0\n"), "{text}");
        assert!(text.ends_with("x_total{why=\"a \\\"quoted\\\" \\\\ value\"} 7\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    #[test]
    fn registry_names_every_metric() {
        let m = Metrics::new();
        m.set_routes(1, 2, 3);
        m.set_source_up(SourceKind::Kube, true);
        m.rejected(SourceKind::Kube, "spec.podCIDRs");
        m.rejected(SourceKind::Kube, "spec.podCIDRs");
        m.rejected(SourceKind::Kube, "status.addresses");
        m.published();
        m.converged(Duration::from_millis(3));
        let text = m.encode();
        for name in [
            "ferry_control_routes_installed{next_hop=\"tunnel\"} 2",
            "ferry_control_nodes 3",
            "ferry_control_source_up{source=\"kube\"} 1",
            "ferry_control_rejected_objects_total{source=\"kube\",field=\"spec.podCIDRs\"} 2",
            "ferry_control_publications_total 1",
            "ferry_control_convergence_seconds_count 1",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
        assert_eq!(m.rejected_total(SourceKind::Kube, "spec.podCIDRs"), 2);
        assert_eq!(m.rejected_all(SourceKind::Kube), 3);
        assert_eq!(m.source_up(SourceKind::Kube), Some(true));
        assert_eq!(m.source_up(SourceKind::Etcd), None);
    }
}
