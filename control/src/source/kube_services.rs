//! The Kubernetes source's Services (control side): list+watch Services and EndpointSlices, join
//! them into [`ServiceSpec`]s and send what changed as [`Update::ServicesChanged`], so that the
//! publisher rebuilds only the changed services' Maglev tables.
//!
//! - **EndpointSlices** are read as `discovery.k8s.io/v1`, or `v1beta1` when the server does not
//!   serve v1 (before 1.21; v1beta1 was removed in 1.25). Both are read through one parser: the
//!   fields ferry uses have the same shape in both (`nodeName` in v1, the
//!   `kubernetes.io/hostname` topology key in v1beta1).
//! - **Join**: a slice belongs to the Service its `kubernetes.io/service-name` label names; a
//!   Service port takes, from each slice of its address family, the slice port with the same name
//!   and protocol: that is how a named `targetPort` is resolved per endpoint (the EndpointSlice
//!   controller puts endpoints whose named port resolves differently in different slices). One
//!   [`ServiceSpec`] per cluster IP and port, named `namespace/name:port` (`port` is the port's
//!   name, or its number when unnamed), `@IP` appended for a dual-stack service's second IP.
//! - **Conditions**, as kube-proxy reads them: `ready` unset is ready, `serving` unset is serving,
//!   `terminating` unset is not terminating. The first address of an endpoint is used.
//! - **Policies**: `sessionAffinity: ClientIP` with its timeout (default 10,800 s).
//!   `internalTrafficPolicy: Local` sends traffic from inside the cluster to endpoints on this
//!   node only (ferry translates at the client's node, so that is exactly the policy's meaning);
//!   traffic from outside follows `externalTrafficPolicy` alone, as with kube-proxy. Every
//!   endpoint stays in the spec, those on this node marked local ([`ServiceSpec::internal_local`]).
//! - **From outside** (types NodePort and LoadBalancer): each port's `nodePort`, `spec.externalIPs`
//!   and `status.loadBalancer.ingress[].ip` (those of the cluster IP's family) go into the spec's
//!   [`ExternalSpec`] with `externalTrafficPolicy` and `healthCheckNodePort`; an endpoint on this
//!   node (`nodeName`) is marked local.
//! - **Ignored**: headless Services (`clusterIP: None`), `ExternalName` Services, Services without
//!   a cluster IP yet, ports of other protocols than TCP, UDP and SCTP, slices of `addressType: FQDN` and slices without the
//!   service-name label (as kube-proxy ignores them).
//! - **Bad data** (an address that is not one, or a special one: unspecified, loopback, link-local,
//!   multicast, broadcast; a port out of range; an unknown address type; a body that does not
//!   decode): the object keeps its last good state (none, if it never had one), one warning names
//!   the object and field, and `rejected_objects{source="kube",field=...}` counts it, once per
//!   distinct bad state.
//! - **Sessions**: like the Node watcher, each session lists then watches; nothing is sent until
//!   both lists are in, and then the difference from what was sent before (services deleted while
//!   disconnected are removed). Any error ends the session; forwarding goes on with the published
//!   services, and the next session resyncs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferry_tables::{EndpointSpec, ExternalSpec, Protocol, ServiceSpec};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use serde::Deserialize;
use tokio::sync::watch;

use super::{Backoff, EngineGone, EventTx};
use crate::metrics::Metrics;
use crate::model::{Rejection, ServiceDelta, SourceKind, Update};
use crate::shutdown::{sleep_or_shutdown, stopped};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The v1beta1 topology key that carried the node's name.
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (Kubernetes' default).
const DEFAULT_AFFINITY: Duration = Duration::from_secs(10_800);

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// The port's name (empty when the Service has one unnamed port).
    pub name: String,
    /// The service port.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its `nodePort` (a Service's port of type NodePort or LoadBalancer; never a slice's).
    pub node_port: Option<u16>,
}

/// What ferry takes from a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its cluster IPs (the first is `spec.clusterIP`).
    pub ips: Vec<IpAddr>,
    /// Its TCP and UDP ports.
    pub ports: Vec<ServicePortInfo>,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity: Option<Duration>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip` (those of the cluster IPs'
    /// families).
    pub external_ips: Vec<IpAddr>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `healthCheckNodePort`.
    pub health_check_node_port: Option<u16>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its (first) address.
    pub addr: IpAddr,
    /// `conditions.ready` (unset: true).
    pub ready: bool,
    /// `conditions.serving` (unset: true).
    pub serving: bool,
    /// `conditions.terminating` (unset: false).
    pub terminating: bool,
    /// The node it runs on, when the slice says.
    pub node: Option<String>,
}

/// What ferry takes from an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// `namespace/name` of its Service.
    pub service: String,
    /// Whether its addresses are IPv4 (`addressType: IPv4`) or IPv6.
    pub ipv4: bool,
    /// Its ports with a number, TCP or UDP: (name, port, protocol).
    pub ports: Vec<ServicePortInfo>,
    /// Its endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

fn object_key(ns: Option<&str>, name: Option<&str>) -> String {
    format!("{}/{}", ns.unwrap_or_default(), name.unwrap_or_default())
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(_) => None,
    }
}

fn port_number(p: i32) -> Result<u16, String> {
    u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| format!("{p} is not a port"))
}

/// Turns a Service into what ferry translates; `Ok(None)` for one it leaves alone (headless,
/// ExternalName, no cluster IP yet).
///
/// # Errors
/// A [`Rejection`] naming the Service (`Service namespace/name`) and the field.
pub fn service_info(svc: &Service) -> Result<Option<ServiceInfo>, Rejection> {
    let key = object_key(svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref());
    let reject = |field: &str, reason: String| Rejection::new(format!("Service {key}"), field, reason);
    let Some(spec) = &svc.spec else { return Ok(None) };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let raw: Vec<&str> = match spec.cluster_ips.as_ref().filter(|v| !v.is_empty()) {
        Some(ips) => ips.iter().map(String::as_str).collect(),
        None => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if raw.is_empty() || raw.iter().any(|ip| ip.is_empty() || *ip == "None") {
        return Ok(None);
    }
    let ips = raw
        .iter()
        .map(|ip| ip.trim().parse::<IpAddr>().map_err(|_| format!("{ip:?} is not an IP address")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|r| reject("spec.clusterIPs", r))?;
    let external_kind = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(protocol) = protocol(p.protocol.as_deref()) else { continue };
        let port = port_number(p.port).map_err(|r| reject("spec.ports[].port", r))?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) if external_kind => Some(port_number(n).map_err(|r| reject("spec.ports[].nodePort", r))?),
            Some(_) => None,
        };
        ports.push(ServicePortInfo { name: p.name.clone().unwrap_or_default(), port, protocol, node_port });
    }
    let mut external_ips = Vec::new();
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref());
    let ext = spec.external_ips.iter().flatten().map(|a| ("spec.externalIPs", a.as_str()));
    for (field, a) in ext.chain(lb_ips.map(|a| ("status.loadBalancer.ingress[].ip", a))) {
        let ip = a.trim().parse::<IpAddr>().map_err(|_| reject(field, format!("{a:?} is not an IP address")))?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(reject(field, format!("{ip} cannot be a service's address")));
        }
        if !external_ips.contains(&ip) {
            external_ips.push(ip);
        }
    }
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(reject("spec.externalTrafficPolicy", format!("{other:?} is not one of Cluster, Local")));
        }
    };
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => Some(port_number(n).map_err(|r| reject("spec.healthCheckNodePort", r))?),
    };
    let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t =
            spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
        match t {
            None => Some(DEFAULT_AFFINITY),
            Some(s @ 1..=86_400) => Some(Duration::from_secs(s.unsigned_abs().into())),
            Some(s) => {
                return Err(reject(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{s} is not in 1..=86400"),
                ));
            }
        }
    } else {
        None
    };
    Ok(Some(ServiceInfo {
        ips,
        ports,
        affinity,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_ips,
        external_local,
        health_check_node_port,
    }))
}

/// The part of an EndpointSlice (v1 or v1beta1) ferry reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceBody {
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<EndpointBody>>,
    #[serde(default)]
    ports: Option<Vec<PortBody>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointBody {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<ConditionsBody>,
    #[serde(default)]
    node_name: Option<String>,
    /// v1beta1 only.
    #[serde(default)]
    topology: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct ConditionsBody {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct PortBody {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

/// Whether an address can be a pod's: not unspecified, loopback, link-local, multicast or
/// broadcast (the addresses Kubernetes refuses for core Endpoints).
fn usable_endpoint(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_loopback() || a.is_link_local() || a.is_multicast() || a.is_broadcast())
        }
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_unicast_link_local()),
    }
}

/// Turns an EndpointSlice (as a dynamic object, v1 or v1beta1) into what ferry joins; `Ok(None)`
/// for one it leaves alone (no service-name label, `addressType: FQDN`).
///
/// # Errors
/// A [`Rejection`] naming the slice (`EndpointSlice namespace/name`) and the field.
pub fn slice_info(obj: &DynamicObject) -> Result<Option<SliceInfo>, Rejection> {
    let ns = obj.metadata.namespace.as_deref();
    let key = object_key(ns, obj.metadata.name.as_deref());
    let reject = |field: &str, reason: String| Rejection::new(format!("EndpointSlice {key}"), field, reason);
    let Some(service) = obj.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Ok(None);
    };
    let body: SliceBody =
        serde_json::from_value(obj.data.clone()).map_err(|e| reject("endpointslice", e.to_string()))?;
    let ipv4 = match body.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return Ok(None),
        other => return Err(reject("addressType", format!("{other:?} is not IPv4, IPv6 or FQDN"))),
    };
    let mut ports = Vec::new();
    for p in body.ports.iter().flatten() {
        // A port without a number stands for "all ports", which kube-proxy ignores too.
        let (Some(number), Some(protocol)) = (p.port, protocol(p.protocol.as_deref())) else { continue };
        let port = port_number(number).map_err(|r| reject("ports[].port", r))?;
        ports.push(ServicePortInfo { name: p.name.clone().unwrap_or_default(), port, protocol, node_port: None });
    }
    let mut endpoints = Vec::new();
    for e in body.endpoints.iter().flatten() {
        let Some(first) = e.addresses.first() else { continue };
        let addr = first
            .trim()
            .parse::<IpAddr>()
            .map_err(|_| reject("endpoints[].addresses", format!("{first:?} is not an IP address")))?;
        if addr.is_ipv4() != ipv4 {
            return Err(reject("endpoints[].addresses", format!("{addr} is not of addressType {}", body.address_type)));
        }
        if !usable_endpoint(addr) {
            return Err(reject("endpoints[].addresses", format!("{addr} cannot be a pod's address")));
        }
        let c = e.conditions.as_ref();
        let node = e.node_name.clone().or_else(|| e.topology.as_ref().and_then(|t| t.get(HOSTNAME_TOPOLOGY).cloned()));
        endpoints.push(SliceEndpoint {
            addr,
            ready: c.and_then(|c| c.ready).unwrap_or(true),
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            node,
        });
    }
    Ok(Some(SliceInfo { service: format!("{}/{service}", ns.unwrap_or_default()), ipv4, ports, endpoints }))
}

/// The specs of one Service (`key` is `namespace/name`) from its slices, one per cluster IP and
/// port; `own_node` is this node's name (for `internalTrafficPolicy: Local`).
pub fn join<'a>(
    key: &str,
    svc: &ServiceInfo,
    slices: impl Iterator<Item = &'a SliceInfo> + Clone,
    own_node: &str,
) -> Vec<ServiceSpec> {
    let mut specs = Vec::with_capacity(svc.ips.len() * svc.ports.len());
    for (k, &vip) in svc.ips.iter().enumerate() {
        for p in &svc.ports {
            let mut endpoints = Vec::new();
            for slice in slices.clone().filter(|s| s.ipv4 == vip.is_ipv4()) {
                let Some(target) = slice.ports.iter().find(|sp| sp.name == p.name && sp.protocol == p.protocol) else {
                    continue;
                };
                for e in &slice.endpoints {
                    endpoints.push(EndpointSpec {
                        addr: e.addr,
                        port: target.port,
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                        local: e.node.as_deref() == Some(own_node),
                    });
                }
            }
            endpoints.sort_by_key(|e| (e.addr, e.port));
            endpoints.dedup_by_key(|e| (e.addr, e.port));
            let label = if p.name.is_empty() { p.port.to_string() } else { p.name.clone() };
            let name = if k == 0 { format!("{key}:{label}") } else { format!("{key}:{label}@{vip}") };
            specs.push(ServiceSpec {
                name,
                vip,
                port: p.port,
                protocol: p.protocol,
                endpoints,
                affinity: svc.affinity,
                external: ExternalSpec {
                    node_port: p.node_port,
                    ips: svc.external_ips.iter().copied().filter(|a| a.is_ipv4() == vip.is_ipv4()).collect(),
                    local: svc.external_local,
                    health_check_node_port: svc.health_check_node_port.filter(|_| svc.external_local),
                },
                internal_local: svc.internal_local,
            });
        }
    }
    specs
}

/// Which EndpointSlice API the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceVersion {
    /// `discovery.k8s.io/v1` (1.21 and later).
    V1,
    /// `discovery.k8s.io/v1beta1` (before 1.25).
    V1beta1,
}

impl SliceVersion {
    fn resource(self) -> ApiResource {
        let version = match self {
            SliceVersion::V1 => "v1",
            SliceVersion::V1beta1 => "v1beta1",
        };
        ApiResource::from_gvk(&GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"))
    }
}

/// Asks the server whether it serves EndpointSlices as v1.
///
/// # Errors
/// The client's error when the server cannot be asked.
pub async fn slice_version(client: &kube::Client) -> Result<SliceVersion, kube::Error> {
    match client.list_api_group_resources("discovery.k8s.io/v1").await {
        Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => Ok(SliceVersion::V1),
        Ok(_) => Ok(SliceVersion::V1beta1),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(SliceVersion::V1beta1),
        Err(e) => Err(e),
    }
}

/// The objects of one kind, as last accepted, and the bad states already reported.
#[derive(Debug)]
struct Store<T> {
    good: HashMap<String, T>,
    warned: HashMap<String, Rejection>,
    /// The list in progress (between `Init` and `InitDone`).
    listing: Option<HashMap<String, T>>,
    synced: bool,
}

impl<T: Clone> Store<T> {
    fn new() -> Self {
        Store { good: HashMap::new(), warned: HashMap::new(), listing: None, synced: false }
    }

    /// Records a parse result for `key`; a rejection keeps the last good state and is reported
    /// (warned and counted) once per distinct bad state. Returns whether the good state changed.
    fn apply(&mut self, key: String, parsed: Result<Option<T>, Rejection>, metrics: &Metrics) -> bool {
        match parsed {
            Ok(v) => {
                self.warned.remove(&key);
                let map = self.listing.as_mut().unwrap_or(&mut self.good);
                match v {
                    Some(v) => {
                        map.insert(key, v);
                    }
                    None => {
                        map.remove(&key);
                    }
                }
                true
            }
            Err(r) => {
                if self.warned.get(&key) != Some(&r) {
                    tracing::warn!(object = %r.node, field = %r.field, reason = %r.reason, "rejected; keeping its last good state");
                    metrics.rejected(SourceKind::Kube, &r.field);
                    self.warned.insert(key.clone(), r);
                }
                if let Some(listing) = self.listing.as_mut()
                    && let Some(old) = self.good.get(&key)
                {
                    listing.insert(key, old.clone());
                }
                false
            }
        }
    }

    fn delete(&mut self, key: &str) {
        self.warned.remove(key);
        self.good.remove(key);
    }
}

/// The Services half of the Kubernetes source.
pub(crate) struct KubeServiceSource {
    pub(crate) client: kube::Client,
    pub(crate) own_node: String,
    pub(crate) tx: EventTx,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for KubeServiceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeServiceSource").field("own_node", &self.own_node).finish_non_exhaustive()
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("shutting down")]
    Shutdown,
    #[error(transparent)]
    EngineGone(#[from] EngineGone),
    #[error("cannot ask the server for its EndpointSlice version: {0}")]
    Discovery(kube::Error),
    #[error("watch failed: {0}")]
    Watch(#[from] watcher::Error),
    #[error("watch stream ended")]
    StreamEnded,
}

/// The joined state: both stores, which slices belong to which Service, what was sent.
#[derive(Debug)]
struct State {
    services: Store<ServiceInfo>,
    slices: Store<SliceInfo>,
    /// Service key -> its slices' keys (from the good slices).
    by_service: HashMap<String, BTreeSet<String>>,
    /// What was last sent per Service key.
    sent: HashMap<String, Vec<ServiceSpec>>,
    own_node: String,
}

impl State {
    fn specs(&self, key: &str) -> Vec<ServiceSpec> {
        let Some(svc) = self.services.good.get(key) else { return Vec::new() };
        let slices = self.by_service.get(key).into_iter().flatten().filter_map(|s| self.slices.good.get(s));
        join(key, svc, slices, &self.own_node)
    }

    fn reindex(&mut self) {
        self.by_service.clear();
        for (k, s) in &self.slices.good {
            self.by_service.entry(s.service.clone()).or_default().insert(k.clone());
        }
    }

    fn index_slice(&mut self, key: &str, old: Option<&SliceInfo>) {
        if let Some(old) = old
            && let Some(set) = self.by_service.get_mut(&old.service)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_service.remove(&old.service);
            }
        }
        if let Some(new) = self.slices.good.get(key) {
            self.by_service.entry(new.service.clone()).or_default().insert(key.to_owned());
        }
    }

    /// Recomputes `keys` and adds what differs from what was sent to `delta`.
    fn diff_into<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>, delta: &mut ServiceDelta) {
        for key in keys {
            let new = self.specs(key);
            let old = self.sent.remove(key).unwrap_or_default();
            for o in &old {
                if !new.iter().any(|n| n.name == o.name) {
                    delta.removed.push(o.name.clone());
                }
            }
            for n in &new {
                if !old.iter().any(|o| o == n) {
                    delta.upserted.push(n.clone());
                }
            }
            if !new.is_empty() {
                self.sent.insert(key.to_owned(), new);
            }
        }
    }

    /// Everything known or sent, recomputed (after both lists are in).
    fn full_delta(&mut self) -> ServiceDelta {
        let mut keys: BTreeSet<String> = self.services.good.keys().cloned().collect();
        keys.extend(self.sent.keys().cloned());
        let mut delta = ServiceDelta::default();
        self.diff_into(keys.iter().map(String::as_str), &mut delta);
        delta
    }
}

impl KubeServiceSource {
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut state = State {
            services: Store::new(),
            slices: Store::new(),
            by_service: HashMap::new(),
            sent: HashMap::new(),
            own_node: self.own_node.clone(),
        };
        loop {
            match self.session(&mut backoff, &mut state).await {
                SessionEnd::Shutdown | SessionEnd::EngineGone(_) => return,
                e => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %e, retry_in = ?delay,
                        "kubernetes services watch disconnected; forwarding continues on the last services"
                    );
                    if sleep_or_shutdown(delay, &mut self.shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    async fn session(&mut self, backoff: &mut Backoff, state: &mut State) -> SessionEnd {
        let version = tokio::select! {
            v = slice_version(&self.client) => match v {
                Ok(v) => v,
                Err(e) => return SessionEnd::Discovery(e),
            },
            _ = stopped(&mut self.shutdown) => return SessionEnd::Shutdown,
        };
        tracing::info!(version = ?version, "watching Services and EndpointSlices");
        let services = kube::runtime::watcher(Api::<Service>::all(self.client.clone()), watcher::Config::default());
        let slices = kube::runtime::watcher(
            Api::<DynamicObject>::all_with(self.client.clone(), &version.resource()),
            watcher::Config::default(),
        );
        let mut services = std::pin::pin!(services);
        let mut slices = std::pin::pin!(slices);
        state.services.synced = false;
        state.slices.synced = false;
        loop {
            let mut delta = ServiceDelta::default();
            tokio::select! {
                ev = services.next() => {
                    let ev = match ev {
                        None => return SessionEnd::StreamEnded,
                        Some(Err(e)) => return SessionEnd::Watch(e),
                        Some(Ok(ev)) => ev,
                    };
                    self.metrics.source_event(SourceKind::Kube);
                    let touched = self.on_service(state, ev);
                    if state.services.synced && state.slices.synced {
                        match touched {
                            Touched::All => delta = state.full_delta(),
                            Touched::One(key) => state.diff_into([key.as_str()], &mut delta),
                            Touched::None => {}
                        }
                    }
                }
                ev = slices.next() => {
                    let ev = match ev {
                        None => return SessionEnd::StreamEnded,
                        Some(Err(e)) => return SessionEnd::Watch(e),
                        Some(Ok(ev)) => ev,
                    };
                    self.metrics.source_event(SourceKind::Kube);
                    let touched = self.on_slice(state, ev);
                    if state.services.synced && state.slices.synced {
                        match touched {
                            SliceTouched::All => delta = state.full_delta(),
                            SliceTouched::Services(keys) => state.diff_into(keys.iter().map(String::as_str), &mut delta),
                        }
                    }
                }
                _ = stopped(&mut self.shutdown) => return SessionEnd::Shutdown,
            }
            if !delta.is_empty() {
                backoff.reset();
                if let Err(e) = self.tx.send(Instant::now(), Update::ServicesChanged(SourceKind::Kube, delta)).await {
                    return SessionEnd::EngineGone(e);
                }
            }
        }
    }

    fn on_service(&self, state: &mut State, ev: Event<Service>) -> Touched {
        let key = |s: &Service| object_key(s.metadata.namespace.as_deref(), s.metadata.name.as_deref());
        let store = &mut state.services;
        match ev {
            Event::Init => {
                store.listing = Some(HashMap::new());
                Touched::None
            }
            Event::InitApply(s) => {
                store.apply(key(&s), service_info(&s), &self.metrics);
                Touched::None
            }
            Event::InitDone => {
                store.good = store.listing.take().unwrap_or_default();
                store.warned.retain(|k, _| store.good.contains_key(k));
                store.synced = true;
                tracing::info!(services = store.good.len(), "kubernetes services listed");
                Touched::All
            }
            Event::Apply(s) => {
                let k = key(&s);
                if store.apply(k.clone(), service_info(&s), &self.metrics) { Touched::One(k) } else { Touched::None }
            }
            Event::Delete(s) => {
                let k = key(&s);
                store.delete(&k);
                Touched::One(k)
            }
        }
    }

    fn on_slice(&self, state: &mut State, ev: Event<DynamicObject>) -> SliceTouched {
        let key = |s: &DynamicObject| object_key(s.metadata.namespace.as_deref(), s.metadata.name.as_deref());
        match ev {
            Event::Init => {
                state.slices.listing = Some(HashMap::new());
                SliceTouched::Services(Vec::new())
            }
            Event::InitApply(s) => {
                state.slices.apply(key(&s), slice_info(&s), &self.metrics);
                SliceTouched::Services(Vec::new())
            }
            Event::InitDone => {
                let store = &mut state.slices;
                store.good = store.listing.take().unwrap_or_default();
                store.warned.retain(|k, _| store.good.contains_key(k));
                store.synced = true;
                tracing::info!(slices = store.good.len(), "kubernetes endpoint slices listed");
                state.reindex();
                SliceTouched::All
            }
            Event::Apply(s) => {
                let k = key(&s);
                let old = state.slices.good.get(&k).cloned();
                if !state.slices.apply(k.clone(), slice_info(&s), &self.metrics) {
                    return SliceTouched::Services(Vec::new());
                }
                state.index_slice(&k, old.as_ref());
                let new = state.slices.good.get(&k).map(|s| s.service.clone());
                let mut keys: Vec<String> = old.map(|o| o.service).into_iter().chain(new).collect();
                keys.dedup();
                SliceTouched::Services(keys)
            }
            Event::Delete(s) => {
                let k = key(&s);
                let old = state.slices.good.get(&k).cloned();
                state.slices.delete(&k);
                state.index_slice(&k, old.as_ref());
                SliceTouched::Services(old.map(|o| o.service).into_iter().collect())
            }
        }
    }
}

/// Which Services a Service event changed.
enum Touched {
    None,
    One(String),
    All,
}

/// Which Services a slice event changed.
enum SliceTouched {
    Services(Vec<String>),
    All,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service json")
    }

    fn slice(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).expect("slice json")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// A `discovery.k8s.io/v1` EndpointSlice as a 1.25+ server returns it (the shape of the API
    /// reference's example, with the v1-only `nodeName`, `zone`, `hints` and all three
    /// conditions): the test server (1.20) serves only v1beta1, so v1 is tested from this.
    const V1_SLICE: &str = include_str!("../../tests/fixtures/endpointslice-v1.json");

    #[test]
    fn v1_slice_with_conditions_and_named_ports() {
        let s = slice_info(&slice(serde_json::from_str(V1_SLICE).expect("fixture"))).expect("valid").expect("some");
        assert_eq!(s.service, "shop/web");
        assert!(s.ipv4);
        assert_eq!(
            s.ports,
            [
                ServicePortInfo { name: "http".into(), port: 8080, protocol: Protocol::Tcp, node_port: None },
                ServicePortInfo { name: "dns".into(), port: 5353, protocol: Protocol::Udp, node_port: None },
            ]
        );
        let conditions: Vec<_> = s.endpoints.iter().map(|e| (e.ready, e.serving, e.terminating)).collect();
        assert_eq!(conditions, [(true, true, false), (false, true, true), (false, false, true), (true, true, false)]);
        assert_eq!(s.endpoints[0].node.as_deref(), Some("node-a"));
        // The last endpoint sets no conditions: ready and serving, as kube-proxy reads it.
        assert_eq!(s.endpoints[3].addr, ip("10.244.2.9"));
    }

    fn web() -> Service {
        svc(json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                    {"name": "sig", "port": 9, "protocol": "SCTP"}
                ],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}
            }
        }))
    }

    #[test]
    fn join_resolves_named_ports_per_slice_and_keeps_conditions() {
        let info = service_info(&web()).expect("valid").expect("some");
        assert_eq!(info.ports.len(), 3, "TCP, UDP and SCTP");
        assert_eq!(info.ports[2].protocol, Protocol::Sctp);
        assert_eq!(info.affinity, Some(Duration::from_secs(60)));
        let a = slice_info(&slice(serde_json::from_str(V1_SLICE).expect("fixture"))).expect("valid").expect("some");
        // A second slice: pods whose named port `http` resolves to 9090.
        let b = slice_info(&slice(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": "web-2", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.3.3"], "conditions": {"ready": true}, "nodeName": "node-c"}],
            "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}]
        })))
        .expect("valid")
        .expect("some");
        let specs = join("shop/web", &info, [&a, &b].into_iter(), "node-a");
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shop/web:http", "shop/web:dns", "shop/web:sig"]);
        // No slice has a port named `sig`: the SCTP port has no endpoint (rejected, as kube-proxy).
        assert_eq!((specs[2].protocol, specs[2].endpoints.len()), (Protocol::Sctp, 0));
        let http = &specs[0];
        assert_eq!((http.vip, http.port, http.protocol), (ip("10.96.0.10"), 80, Protocol::Tcp));
        let eps: Vec<_> = http.endpoints.iter().map(|e| (e.addr.to_string(), e.port, e.ready, e.terminating)).collect();
        assert_eq!(
            eps,
            [
                ("10.244.1.2".to_owned(), 8080, true, false),
                ("10.244.1.3".to_owned(), 8080, false, true),
                ("10.244.1.4".to_owned(), 8080, false, true),
                ("10.244.2.9".to_owned(), 8080, true, false),
                ("10.244.3.3".to_owned(), 9090, true, false),
            ]
        );
        assert!(specs[1].endpoints.iter().all(|e| e.port == 5353));
        assert_eq!(http.affinity, Some(Duration::from_secs(60)));

        // internalTrafficPolicy: Local keeps every endpoint, this node's marked local (the
        // compiled service narrows traffic from inside to them; traffic from outside does not).
        let local = ServiceInfo { internal_local: true, ..info.clone() };
        let specs = join("shop/web", &local, [&a, &b].into_iter(), "node-a");
        assert!(specs[0].internal_local);
        let marked: Vec<IpAddr> = specs[0].endpoints.iter().filter(|e| e.local).map(|e| e.addr).collect();
        assert_eq!(marked, [ip("10.244.1.2"), ip("10.244.1.3")]);
        assert!(specs[0].endpoints.len() > 2, "the other node's endpoints stay: {:?}", specs[0].endpoints);
    }

    #[test]
    fn node_ports_external_ips_and_the_external_policy() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalIPs": ["203.0.113.1"],
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32001,
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"hostname": "lb.example"}]}}
        }))
        .expect("service");
        let info = service_info(&svc).expect("valid").expect("some");
        assert_eq!(info.ports[0].node_port, Some(30080));
        assert_eq!(info.external_ips, [ip("203.0.113.1"), ip("203.0.113.9")]);
        assert!(info.external_local);
        assert_eq!(info.health_check_node_port, Some(32001));
        let slice = slice_info(&slice(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": "web-1", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.2"], "nodeName": "node-a"},
                          {"addresses": ["10.244.2.2"], "nodeName": "node-b"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        })))
        .expect("valid")
        .expect("some");
        let specs = join("shop/web", &info, [&slice].into_iter(), "node-a");
        let e = &specs[0].external;
        assert_eq!((e.node_port, e.local, e.health_check_node_port), (Some(30080), true, Some(32001)));
        assert_eq!(e.ips.len(), 2);
        let local: Vec<bool> = specs[0].endpoints.iter().map(|e| e.local).collect();
        assert_eq!(local, [true, false], "the endpoint on this node is the local one");
        // A bad policy or node port names its field.
        for (patch, field) in [
            (json!({"externalTrafficPolicy": "Nearby"}), "spec.externalTrafficPolicy"),
            (json!({"ports": [{"port": 80, "nodePort": 70000}]}), "spec.ports[].nodePort"),
            (json!({"externalIPs": ["not-an-ip"]}), "spec.externalIPs"),
        ] {
            let mut v = serde_json::to_value(&svc).expect("json");
            for (k, val) in patch.as_object().expect("object") {
                v["spec"][k] = val.clone();
            }
            let bad: Service = serde_json::from_value(v).expect("service");
            assert_eq!(service_info(&bad).expect_err("rejected").field, field);
        }
    }

    #[test]
    fn v1beta1_topology_gives_the_node() {
        let s = slice_info(&slice(json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"namespace": "d", "name": "s", "labels": {SERVICE_NAME_LABEL: "x"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00:10:244:1::5"], "conditions": {"ready": false},
                           "topology": {"kubernetes.io/hostname": "n1"}}],
            "ports": [{"port": 80}]
        })))
        .expect("valid")
        .expect("some");
        assert_eq!((s.service.as_str(), s.ipv4, s.endpoints[0].node.as_deref()), ("d/x", false, Some("n1")));
        assert!(!s.endpoints[0].ready && s.endpoints[0].serving);
        assert_eq!(
            s.ports,
            [ServicePortInfo { name: String::new(), port: 80, protocol: Protocol::Tcp, node_port: None }]
        );
    }

    #[test]
    fn ignored_services_and_slices() {
        let headless = svc(json!({"metadata": {"namespace": "d", "name": "h"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}));
        assert_eq!(service_info(&headless), Ok(None));
        let external = svc(json!({"metadata": {"namespace": "d", "name": "e"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}));
        assert_eq!(service_info(&external), Ok(None));
        let unlabelled =
            slice(json!({"metadata": {"namespace": "d", "name": "s"}, "addressType": "IPv4", "endpoints": []}));
        assert_eq!(slice_info(&unlabelled), Ok(None));
        let fqdn = slice(json!({"metadata": {"namespace": "d", "name": "s", "labels": {SERVICE_NAME_LABEL: "x"}},
            "addressType": "FQDN", "endpoints": [{"addresses": ["example.com"]}]}));
        assert_eq!(slice_info(&fqdn), Ok(None));
    }

    #[test]
    fn bad_fields_are_named() {
        let bad_svc = |spec: serde_json::Value, field: &str| {
            let s = svc(json!({"metadata": {"namespace": "d", "name": "bad"}, "spec": spec}));
            let e = service_info(&s).expect_err(field);
            assert_eq!((e.node.as_str(), e.field.as_str()), ("Service d/bad", field));
        };
        bad_svc(json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}), "spec.clusterIPs");
        bad_svc(json!({"clusterIP": "10.96.0.3", "ports": [{"port": 70000}]}), "spec.ports[].port");
        bad_svc(
            json!({"clusterIP": "10.96.0.3", "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        );
        let bad_slice = |body: serde_json::Value, field: &str| {
            let mut v = json!({"metadata": {"namespace": "d", "name": "bad", "labels": {SERVICE_NAME_LABEL: "x"}}});
            for (k, val) in body.as_object().expect("object") {
                v[k] = val.clone();
            }
            let e = slice_info(&slice(v)).expect_err(field);
            assert_eq!((e.node.as_str(), e.field.as_str()), ("EndpointSlice d/bad", field));
        };
        for addr in ["10.244.1.300", "127.0.0.1", "0.0.0.0", "224.0.0.1", "169.254.1.1", "fd00::1"] {
            bad_slice(json!({"addressType": "IPv4", "endpoints": [{"addresses": [addr]}]}), "endpoints[].addresses");
        }
        bad_slice(json!({"addressType": "IPv5", "endpoints": []}), "addressType");
        bad_slice(json!({"addressType": "IPv4", "ports": [{"port": 0}]}), "ports[].port");
        bad_slice(json!({"addressType": "IPv4", "endpoints": [{"addresses": "10.0.0.1"}]}), "endpointslice");
        bad_slice(json!({"endpoints": []}), "endpointslice");
    }

    #[test]
    fn a_rejection_keeps_the_last_good_state_and_is_reported_once() {
        let m = Metrics::new();
        let mut store: Store<u32> = Store::new();
        assert!(store.apply("a".into(), Ok(Some(1)), &m));
        let r = || Err(Rejection::new("a", "f", "bad"));
        assert!(!store.apply("a".into(), r(), &m));
        assert!(!store.apply("a".into(), r(), &m));
        assert_eq!((store.good.get("a"), m.rejected_total(SourceKind::Kube, "f")), (Some(&1), 1));
        // A relist keeps the last good state of an object still bad.
        store.listing = Some(HashMap::new());
        assert!(!store.apply("a".into(), r(), &m));
        assert_eq!(store.listing.as_ref().and_then(|l| l.get("a")), Some(&1));
        assert_eq!(m.rejected_total(SourceKind::Kube, "f"), 1);
    }
}
