//! The static file source (control side), for labs and tests: a TOML file of nodes, reloaded when
//! it changes (inotify on its directory, so editors' rename-over-the-file is seen, plus a slow poll
//! as a safety net).
//!
//! ```toml
//! cluster_cidrs = ["10.244.0.0/16"]      # optional: every pod CIDR must lie in one of these
//!
//! [[node]]
//! name = "node-a"
//! pod_cidrs = ["10.244.1.0/24", "fd00:10:244:1::/64"]
//! underlay = "192.168.0.10"             # or one of each family: ["192.168.0.10", "fd00::10"]
//! vtep_mac = "02:00:c0:a8:00:0a"         # optional
//! vni = 1                                 # optional (default: --vni)
//! tunnel = "vxlan"                        # optional (default: --tunnel)
//! port = 4789                             # optional (default: --tunnel-port)
//!
//! [[service]]                             # a ClusterIP service (the data plane translates it)
//! name = "default/web"
//! vip = "10.244.255.10"
//! port = 80
//! protocol = "TCP"                        # optional: TCP (default) | UDP
//! endpoints = ["10.244.1.2:8080"]         # ready endpoints
//! terminating = ["10.244.1.3:8080"]       # optional: serving and terminating
//! session_affinity_seconds = 10800        # optional: sessionAffinity ClientIP
//!
//! [[namespace]]                           # NetworkPolicy's objects (see below)
//! name = "x"
//! labels = { team = "a" }                 # `kubernetes.io/metadata.name` is implied
//!
//! [[pod]]
//! namespace = "x"
//! name = "a"
//! labels = { pod = "a" }
//! ips = ["10.244.1.2"]
//! node = "node-a"
//! ports = [{ name = "http", port = 80, protocol = "TCP" }]   # named container ports
//!
//! [[network_policy]]                      # networking.k8s.io/v1, field names in snake_case
//! namespace = "x"
//! name = "allow-b"
//! pod_selector = { match_labels = { pod = "a" } }
//! policy_types = ["Ingress"]              # optional, defaulted as Kubernetes does
//! [[network_policy.ingress]]
//! ports = [{ protocol = "TCP", port = 80, end_port = 81 }, { port = "http" }]
//! from = [{ pod_selector = { match_expressions = [{ key = "pod", operator = "In", values = ["b"] }] },
//!           namespace_selector = { match_labels = { team = "a" } } },
//!         { ip_block = { cidr = "10.0.0.0/8", except = ["10.1.0.0/16"] } }]
//! [[network_policy.egress]]
//! to = [{ namespace_selector = {} }]
//! ```
//!
//! Each load is a full resync. A file that does not parse as a whole keeps the last good routes
//! (one warning, counted under field `file`); a bad node entry is rejected on its own, naming the
//! node and the field. A bad `[[namespace]]`, `[[pod]]` or `[[network_policy]]` entry (a wrong
//! type or an unknown key too) is rejected on its own, naming the object and the field; the policy
//! store logs it once, counts it and keeps the object's last good state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_encap::TunnelKind;
use ferry_tables::policy::{
    IpBlockSpec, LabelSelectorSpec, NamedPort, NamespaceSpec, NetworkPolicySpec, PeerSpec, PodSpec, Policy,
    PolicyProtocol, PortSpec, PortValue, RequirementSpec, RuleSpec,
};
use ferry_tables::{EndpointSpec, ExternalSpec, Protocol, ServiceSpec};
use ipnet::IpNet;
use notify::Watcher;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use super::EventTx;
use crate::config::ControlConfig;
use crate::metrics::Metrics;
use crate::model::{
    NodeSpec, Rejection, Seniority, SourceKind, check_vni, parse_cidr, parse_tunnel, parse_vtep_mac, underlay_pair,
};
use crate::model::{ObjectKind, PolicyObject, Update};

/// How often the file is checked even without an inotify event. Short, because a missed event
/// was seen with agents started under `ip netns exec` (the end-to-end lab): a peer that has not
/// reloaded drops a new node's traffic as from an unknown node until it does. Reading a small
/// file and comparing its bytes four times a second costs nothing.
const POLL: Duration = Duration::from_millis(250);
/// How long the file must be quiet after a change before it is read.
const SETTLE: Duration = Duration::from_millis(50);
/// How many times a changed file is read again, at most, waiting for two reads to agree.
const SETTLE_READS: usize = 20;

/// The file's bytes once two reads `settle` apart agree, starting from `text`, the first read (a
/// file still changing after [`SETTLE_READS`] more reads is taken as last read).
async fn settled(
    mut text: Vec<u8>,
    settle: Duration,
    mut read: impl FnMut() -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Vec<u8>> {
    for _ in 0..SETTLE_READS {
        tokio::time::sleep(settle).await;
        let again = read()?;
        if again == text {
            break;
        }
        text = again;
    }
    Ok(text)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    cluster_cidrs: Vec<String>,
    #[serde(default, rename = "node")]
    nodes: Vec<Entry>,
    #[serde(default, rename = "service")]
    services: Vec<ServiceEntry>,
    // NetworkPolicy's objects are read one entry at a time, so that one bad entry (a wrong type,
    // an unknown key) is rejected alone rather than the whole file.
    #[serde(default, rename = "namespace")]
    namespaces: Vec<toml::Value>,
    #[serde(default, rename = "pod")]
    pods: Vec<toml::Value>,
    #[serde(default, rename = "network_policy")]
    policies: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceEntry {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodEntry {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    ports: Vec<PodPortEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodPortEntry {
    name: String,
    port: i64,
    protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorEntry {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<ExpressionEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpressionEntry {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyEntry {
    namespace: String,
    name: String,
    #[serde(default)]
    pod_selector: SelectorEntry,
    policy_types: Option<Vec<String>>,
    #[serde(default)]
    ingress: Vec<RuleEntry>,
    #[serde(default)]
    egress: Vec<RuleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    #[serde(default)]
    ports: Vec<PortEntry>,
    // `from` in ingress rules, `to` in egress rules (the other one is refused).
    #[serde(default)]
    from: Option<Vec<PeerEntry>>,
    #[serde(default)]
    to: Option<Vec<PeerEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerEntry {
    pod_selector: Option<SelectorEntry>,
    namespace_selector: Option<SelectorEntry>,
    ip_block: Option<IpBlockEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlockEntry {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortEntry {
    protocol: Option<String>,
    port: Option<PortEntryValue>,
    end_port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortEntryValue {
    Number(i64),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    vip: String,
    port: u16,
    protocol: Option<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    terminating: Vec<String>,
    session_affinity_seconds: Option<u64>,
    /// `type`: ClusterIP (default), NodePort or LoadBalancer.
    #[serde(rename = "type")]
    kind: Option<String>,
    node_port: Option<u32>,
    #[serde(default)]
    external_ips: Vec<String>,
    /// `status.loadBalancer.ingress[].ip`.
    #[serde(default)]
    load_balancer_ips: Vec<String>,
    external_traffic_policy: Option<String>,
    health_check_node_port: Option<u32>,
    /// `internalTrafficPolicy`: Cluster (default) or Local.
    internal_traffic_policy: Option<String>,
}

/// A node's `underlay`: one address, or a list of one per family.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrTwo {
    One(String),
    List(Vec<String>),
}

impl OneOrTwo {
    fn as_slice(&self) -> &[String] {
        match self {
            OneOrTwo::One(a) => std::slice::from_ref(a),
            OneOrTwo::List(l) => l,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    pod_cidrs: Vec<String>,
    underlay: Option<OneOrTwo>,
    vtep_mac: Option<String>,
    vni: Option<u64>,
    tunnel: Option<String>,
    port: Option<u16>,
}

/// Defaults for fields a node entry leaves out.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// This node's name: its entry is local.
    pub own_name: String,
    /// Tunnel type.
    pub tunnel: TunnelKind,
    /// VNI.
    pub vni: u32,
    /// Port, when configured.
    pub port: Option<u16>,
}

impl Defaults {
    /// From the control plane's configuration.
    pub fn from_config(c: &ControlConfig) -> Self {
        Defaults { own_name: c.node_name.clone(), tunnel: c.tunnel, vni: c.vni, port: c.tunnel_port }
    }
}

/// A parsed file: the cluster networks, one result per node entry, one per service entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// `cluster_cidrs`.
    pub networks: Vec<IpNet>,
    /// One per `[[node]]`.
    pub nodes: Vec<Result<NodeSpec, Rejection>>,
    /// One per `[[service]]` (a rejection names the service in its `node` field).
    pub services: Vec<Result<ServiceSpec, Rejection>>,
    /// One per `[[namespace]]` (a rejection names the object by its key in its `node` field).
    pub namespaces: Vec<Result<PolicyObject, Rejection>>,
    /// One per `[[pod]]`.
    pub pods: Vec<Result<PolicyObject, Rejection>>,
    /// One per `[[network_policy]]`.
    pub policies: Vec<Result<PolicyObject, Rejection>>,
}

/// Parses the file's text.
///
/// # Errors
/// A reason (with TOML's line and column) when the file as a whole is unusable.
pub fn parse(text: &str, d: &Defaults) -> Result<Parsed, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let networks = file
        .cluster_cidrs
        .iter()
        .map(|c| parse_cidr(c).map_err(|e| format!("cluster_cidrs: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = BTreeSet::new();
    let nodes: Vec<Result<NodeSpec, Rejection>> = file
        .nodes
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if !seen.insert(e.name.clone()) {
                return Err(Rejection::new(e.name, "name", "appears twice in the file"));
            }
            // The entry's position ranks overlapping claims: the earlier entry keeps the CIDR.
            entry_spec(e, d).map(|s| NodeSpec { seniority: Seniority { created: i as i64, uid: String::new() }, ..s })
        })
        .collect();
    // This node's pod CIDRs: its endpoints are the local ones (`external_traffic_policy = "Local"`).
    let own_cidrs: Vec<IpNet> = nodes
        .iter()
        .filter_map(|n| n.as_ref().ok())
        .filter(|n| n.local)
        .flat_map(|n| n.pod_cidrs.iter().copied())
        .collect();
    let mut seen = BTreeSet::new();
    let services = file
        .services
        .into_iter()
        .map(|e| {
            if !seen.insert(e.name.clone()) {
                return Err(Rejection::new(e.name, "name", "appears twice in the file"));
            }
            service_spec(e, &own_cidrs)
        })
        .collect();
    let namespaces = objects(file.namespaces, ObjectKind::Namespace);
    let pods = objects(file.pods, ObjectKind::Pod);
    let policies = objects(file.policies, ObjectKind::NetworkPolicy);
    Ok(Parsed { networks, nodes, services, namespaces, pods, policies })
}

/// The key of an entry that may not have deserialized: `namespace/name`, or `name` for a
/// namespace; `#i` (its position) without a name.
fn entry_key(v: &toml::Value, kind: ObjectKind, i: usize) -> String {
    let s = |k: &str| v.get(k).and_then(toml::Value::as_str);
    match (kind, s("namespace"), s("name")) {
        (ObjectKind::Namespace, _, Some(n)) => n.to_owned(),
        (_, Some(ns), Some(n)) => format!("{ns}/{n}"),
        _ => format!("#{i}"),
    }
}

/// Each entry of one kind, converted and checked on its own; a key listed twice is refused.
fn objects(values: Vec<toml::Value>, kind: ObjectKind) -> Vec<Result<PolicyObject, Rejection>> {
    let mut seen = BTreeSet::new();
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let key = entry_key(&v, kind, i);
            if !seen.insert(key.clone()) {
                return Err(Rejection::new(key, "name", "appears twice in the file"));
            }
            // serde names the offending key in its message ("unknown field `form`", "invalid type").
            let bad = |e: toml::de::Error| Rejection::new(key.clone(), "entry", e.message().to_owned());
            match kind {
                ObjectKind::Namespace => {
                    let e = NamespaceEntry::deserialize(v).map_err(bad)?;
                    Ok(PolicyObject::Namespace(NamespaceSpec { name: e.name, labels: e.labels }))
                }
                ObjectKind::Pod => pod_spec(PodEntry::deserialize(v).map_err(bad)?).map(PolicyObject::Pod),
                ObjectKind::NetworkPolicy => {
                    policy_spec(PolicyEntry::deserialize(v).map_err(bad)?).map(PolicyObject::NetworkPolicy)
                }
            }
        })
        .collect()
}

fn pod_spec(e: PodEntry) -> Result<PodSpec, Rejection> {
    let key = format!("{}/{}", e.namespace, e.name);
    let reject = |field: String, reason: String| Rejection::new(key.clone(), field, reason);
    let ips = e
        .ips
        .iter()
        .map(|a| a.trim().parse::<IpAddr>().map_err(|_| reject("ips".into(), format!("{a:?} is not an IP address"))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::with_capacity(e.ports.len());
    for (i, p) in e.ports.iter().enumerate() {
        let protocol = match &p.protocol {
            None => PolicyProtocol::Tcp,
            Some(s) => PolicyProtocol::parse(s).map_err(|r| reject(format!("ports[{i}].protocol"), r))?,
        };
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| reject(format!("ports[{i}].port"), format!("{} is not in 1-65535", p.port)))?;
        if p.name.is_empty() {
            return Err(reject(format!("ports[{i}].name"), "empty".into()));
        }
        ports.push(NamedPort { name: p.name.clone(), protocol, port });
    }
    Ok(PodSpec { namespace: e.namespace, name: e.name, labels: e.labels, ips, node: e.node, ports })
}

fn selector_spec(s: SelectorEntry) -> LabelSelectorSpec {
    LabelSelectorSpec {
        match_labels: s.match_labels,
        match_expressions: s
            .match_expressions
            .into_iter()
            .map(|e| RequirementSpec { key: e.key, operator: e.operator, values: e.values })
            .collect(),
    }
}

fn rule_spec(r: RuleEntry, field: String, ingress: bool) -> Result<RuleSpec, (String, String)> {
    let peers = match (ingress, r.from, r.to) {
        (true, _, Some(_)) => return Err((format!("{field}.to"), "an ingress rule has `from`, not `to`".into())),
        (false, Some(_), _) => return Err((format!("{field}.from"), "an egress rule has `to`, not `from`".into())),
        (_, Some(p), None) | (_, None, Some(p)) => p,
        (_, None, None) => Vec::new(),
    };
    Ok(RuleSpec {
        ports: r
            .ports
            .into_iter()
            .map(|p| PortSpec {
                protocol: p.protocol,
                port: p.port.map(|v| match v {
                    PortEntryValue::Number(n) => PortValue::Number(n),
                    PortEntryValue::Name(n) => PortValue::Name(n),
                }),
                end_port: p.end_port,
            })
            .collect(),
        peers: peers
            .into_iter()
            .map(|p| PeerSpec {
                pod_selector: p.pod_selector.map(selector_spec),
                namespace_selector: p.namespace_selector.map(selector_spec),
                ip_block: p.ip_block.map(|b| IpBlockSpec { cidr: b.cidr, except: b.except }),
            })
            .collect(),
    })
}

/// The spec, checked here too so that the rejection is named as the file's entry is.
fn policy_spec(e: PolicyEntry) -> Result<NetworkPolicySpec, Rejection> {
    let key = format!("{}/{}", e.namespace, e.name);
    let rules = |list: Vec<RuleEntry>, dir: &str, ingress: bool| {
        list.into_iter()
            .enumerate()
            .map(|(i, r)| rule_spec(r, format!("spec.{dir}[{i}]"), ingress))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|(f, r)| Rejection::new(key.clone(), f, r))
    };
    let spec = NetworkPolicySpec {
        ingress: rules(e.ingress, "ingress", true)?,
        egress: rules(e.egress, "egress", false)?,
        namespace: e.namespace,
        name: e.name,
        pod_selector: selector_spec(e.pod_selector),
        policy_types: e.policy_types,
    };
    Policy::from_spec(&spec).map_err(|err| Rejection::new(key.clone(), err.field, err.reason))?;
    Ok(spec)
}

/// `ADDRESS:PORT` or `[V6]:PORT`.
fn endpoint(s: &str) -> Result<(IpAddr, u16), String> {
    let a: std::net::SocketAddr = s.trim().parse().map_err(|_| format!("{s:?} is not ADDRESS:PORT"))?;
    Ok((a.ip(), a.port()))
}

/// A port number from the file (1..=65535), or why not.
fn port_value(v: u32) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{v} is not a port (1..=65535)")),
    }
}

/// The external half of a `[[service]]` entry (NodePort, external and load-balancer IPs,
/// `externalTrafficPolicy`), checked as Kubernetes' API checks a Service.
fn external_spec(e: &ServiceEntry, vip: IpAddr) -> Result<ExternalSpec, (&'static str, String)> {
    let kind = e.kind.as_deref().map(str::trim).unwrap_or("ClusterIP");
    if !matches!(kind, "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(("type", format!("`{kind}` is not one of ClusterIP, NodePort, LoadBalancer")));
    }
    let node_port = e.node_port.map(port_value).transpose().map_err(|r| ("node_port", r))?;
    if node_port.is_some() && kind == "ClusterIP" {
        return Err(("node_port", "needs type = \"NodePort\" or \"LoadBalancer\"".into()));
    }
    let mut ips = Vec::new();
    for (field, list) in [("external_ips", &e.external_ips), ("load_balancer_ips", &e.load_balancer_ips)] {
        for a in list {
            let ip = a.trim().parse::<IpAddr>().map_err(|_| (field, format!("{a:?} is not an IP address")))?;
            if ip.is_ipv4() != vip.is_ipv4() {
                return Err((field, format!("{ip} is not in the VIP's address family")));
            }
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err((field, format!("{ip} cannot be a service's address")));
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if !e.load_balancer_ips.is_empty() && kind != "LoadBalancer" {
        return Err(("load_balancer_ips", "needs type = \"LoadBalancer\"".into()));
    }
    let local = match e.external_traffic_policy.as_deref().map(str::trim) {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => return Err(("external_traffic_policy", format!("`{other}` is not one of Cluster, Local"))),
    };
    let health_check_node_port =
        e.health_check_node_port.map(port_value).transpose().map_err(|r| ("health_check_node_port", r))?;
    if health_check_node_port.is_some() && !(local && kind == "LoadBalancer") {
        return Err((
            "health_check_node_port",
            "needs type = \"LoadBalancer\" and external_traffic_policy = \"Local\"".into(),
        ));
    }
    Ok(ExternalSpec { node_port, ips, local, health_check_node_port })
}

fn service_spec(e: ServiceEntry, own_cidrs: &[IpNet]) -> Result<ServiceSpec, Rejection> {
    let reject = |field: &str, reason: String| Rejection::new(e.name.clone(), field, reason);
    let vip = e.vip.trim().parse::<IpAddr>().map_err(|_| reject("vip", format!("{:?} is not an IP address", e.vip)))?;
    let protocol = match e.protocol.as_deref().map(str::trim) {
        None | Some("TCP" | "tcp") => Protocol::Tcp,
        Some("UDP" | "udp") => Protocol::Udp,
        Some("SCTP" | "sctp") => Protocol::Sctp,
        Some(other) => return Err(reject("protocol", format!("`{other}` is not one of TCP, UDP, SCTP"))),
    };
    if e.port == 0 {
        return Err(reject("port", "0 is not a port".into()));
    }
    let mut endpoints = Vec::with_capacity(e.endpoints.len() + e.terminating.len());
    for (field, list, ready) in [("endpoints", &e.endpoints, true), ("terminating", &e.terminating, false)] {
        for s in list {
            let (addr, port) = endpoint(s).map_err(|r| reject(field, r))?;
            if addr.is_ipv4() != vip.is_ipv4() {
                return Err(reject(field, format!("{s} is not in the VIP's address family")));
            }
            if port == 0 {
                return Err(reject(field, format!("{s}: 0 is not a port")));
            }
            let local = own_cidrs.iter().any(|n| n.contains(&addr));
            endpoints.push(EndpointSpec { addr, port, ready, serving: true, terminating: !ready, local });
        }
    }
    let external = external_spec(&e, vip).map_err(|(f, r)| reject(f, r))?;
    let internal_local = match e.internal_traffic_policy.as_deref().map(str::trim) {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(reject("internal_traffic_policy", format!("`{other}` is not one of Cluster, Local")));
        }
    };
    Ok(ServiceSpec {
        external,
        name: e.name,
        vip,
        port: e.port,
        protocol,
        endpoints,
        affinity: e.session_affinity_seconds.map(Duration::from_secs),
        internal_local,
    })
}

fn entry_spec(e: Entry, d: &Defaults) -> Result<NodeSpec, Rejection> {
    let reject = |field: &str, reason: String| Rejection::new(e.name.clone(), field, reason);
    let pod_cidrs =
        e.pod_cidrs.iter().map(|c| parse_cidr(c)).collect::<Result<Vec<_>, _>>().map_err(|r| reject("pod_cidrs", r))?;
    let (underlay, other_underlay) = match &e.underlay {
        Some(u) => {
            let addrs = u
                .as_slice()
                .iter()
                .map(|a| {
                    a.trim().parse::<IpAddr>().map_err(|_| reject("underlay", format!("{a:?} is not an IP address")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            underlay_pair(&addrs).map_err(|r| reject("underlay", r))?
        }
        None if pod_cidrs.is_empty() || e.name == d.own_name => (IpAddr::from([0, 0, 0, 0]), None),
        None => return Err(reject("underlay", "missing".into())),
    };
    let vtep_mac = e.vtep_mac.as_deref().map(parse_vtep_mac).transpose().map_err(|r| reject("vtep_mac", r))?;
    let vni = e.vni.map(check_vni).transpose().map_err(|r| reject("vni", r))?.unwrap_or(d.vni);
    let tunnel =
        e.tunnel.as_deref().map(parse_tunnel).transpose().map_err(|r| reject("tunnel", r))?.unwrap_or(d.tunnel);
    Ok(NodeSpec {
        local: e.name == d.own_name,
        name: e.name,
        pod_cidrs,
        underlay,
        other_underlay,
        vtep_mac,
        vni,
        tunnel,
        port: e.port.or(d.port).unwrap_or(tunnel.default_port()),
        seniority: Seniority::default(),
    }
    .normalized())
}

/// The static file source task.
#[derive(Debug)]
pub(crate) struct StaticSource {
    pub(crate) path: PathBuf,
    pub(crate) defaults: Defaults,
    pub(crate) tx: EventTx,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl StaticSource {
    pub(crate) async fn run(mut self) {
        let (ntx, mut nrx) = mpsc::unbounded_channel::<()>();
        let file_name = self.path.file_name().map(ToOwned::to_owned);
        let handler = move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|ev| ev.paths.iter().any(|p| p.file_name() == file_name.as_deref())) {
                let _ = ntx.send(());
            }
        };
        // Keep the watcher alive for the task's lifetime; without it the poll still works.
        let _watcher = match notify::recommended_watcher(handler) {
            Ok(mut w) => {
                let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the static routes' directory; polling");
                }
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no file notifications; polling the static routes file");
                None
            }
        };
        let mut last: Option<Vec<u8>> = None;
        let mut warned: Option<String> = None;
        let mut poll = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut self.shutdown) => return,
                _ = poll.tick() => {}
                Some(()) = nrx.recv() => {
                    // Read once the file has been quiet for SETTLE: an in-place rewrite (truncate,
                    // then write) caught half-way would otherwise publish a truncated table.
                    loop {
                        tokio::time::sleep(SETTLE).await;
                        let mut more = false;
                        while nrx.try_recv().is_ok() {
                            more = true;
                        }
                        if !more {
                            break;
                        }
                    }
                }
            }
            let seen = Instant::now();
            // A small file: reading it inline is cheaper than a blocking-pool round trip.
            let text = match std::fs::read(&self.path) {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", self.path.display());
                    if warned.as_deref() != Some(msg.as_str()) {
                        tracing::warn!("{msg}; keeping the last good routes");
                        self.metrics.set_source_up(SourceKind::Static, false);
                        warned = Some(msg);
                    }
                    continue;
                }
            };
            if last.as_deref() == Some(text.as_slice()) {
                continue;
            }
            // A change: taken once two reads SETTLE apart agree. The poll may land inside an
            // in-place rewrite (truncate, then write), and a truncated file that parses (an empty
            // one does) would withdraw every node until the next read.
            let text = match settled(text, SETTLE, || std::fs::read(&self.path)).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot read the static routes file; keeping the last good routes");
                    continue;
                }
            };
            if last.as_deref() == Some(text.as_slice()) {
                continue;
            }
            let parsed = std::str::from_utf8(&text).map_err(|e| e.to_string()).and_then(|t| parse(t, &self.defaults));
            last = Some(text);
            match parsed {
                Ok(p) => {
                    warned = None;
                    self.metrics.set_source_up(SourceKind::Static, true);
                    self.metrics.source_event(SourceKind::Static);
                    tracing::info!(file = %self.path.display(), nodes = p.nodes.len(), services = p.services.len(), "static routes loaded");
                    let mut services = Vec::with_capacity(p.services.len());
                    for s in p.services {
                        match s {
                            Ok(s) => services.push(s),
                            Err(r) => {
                                tracing::warn!(service = %r.node, field = %r.field, reason = %r.reason, "service entry rejected");
                                self.metrics.rejected(SourceKind::Static, &r.field);
                            }
                        }
                    }
                    let net = self.tx.send(seen, Update::Network(SourceKind::Static, p.networks)).await;
                    if net.is_err()
                        || self.tx.send(seen, Update::Resync(SourceKind::Static, p.nodes)).await.is_err()
                        || self.tx.send(seen, Update::Services(SourceKind::Static, services)).await.is_err()
                    {
                        return;
                    }
                    for (kind, objs) in [
                        (ObjectKind::Namespace, p.namespaces),
                        (ObjectKind::Pod, p.pods),
                        (ObjectKind::NetworkPolicy, p.policies),
                    ] {
                        if self.tx.send(seen, Update::ObjectResync(SourceKind::Static, kind, objs)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(reason) => {
                    let msg = format!("{}: {reason}", self.path.display());
                    if warned.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(node = "*", field = "file", reason = %msg, "static routes file rejected; keeping the last good routes");
                        self.metrics.rejected(SourceKind::Static, "file");
                        self.metrics.set_source_up(SourceKind::Static, false);
                        warned = Some(msg);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults { own_name: "me".into(), tunnel: TunnelKind::Vxlan, vni: 1, port: None }
    }

    #[test]
    fn parses_nodes_with_defaults_and_names_bad_fields() {
        let text = r#"
            cluster_cidrs = ["10.244.0.0/16"]
            [[node]]
            name = "me"
            pod_cidrs = ["10.244.9.0/24"]
            [[node]]
            name = "a"
            pod_cidrs = ["10.244.1.0/24", "fd00:1::/64"]
            underlay = "192.0.2.1"
            tunnel = "geneve"
            [[node]]
            name = "b"
            pod_cidrs = ["10.244.2.0/24"]
            underlay = "192.0.2.2"
            vtep_mac = "ff:ff:ff:ff:ff:ff"
            [[node]]
            name = "a"
            pod_cidrs = []
        "#;
        let p = parse(text, &defaults()).expect("parses");
        assert_eq!(p.networks, ["10.244.0.0/16".parse::<IpNet>().expect("net")]);
        let me = p.nodes[0].as_ref().expect("me");
        assert!(me.local);
        let a = p.nodes[1].as_ref().expect("a");
        assert_eq!((a.tunnel, a.port, a.pod_cidrs.len()), (TunnelKind::Geneve, 6081, 2));
        assert_eq!(p.nodes[2].as_ref().map_err(|e| e.field.as_str()), Err("vtep_mac"));
        assert_eq!(p.nodes[3].as_ref().map_err(|e| e.field.as_str()), Err("name"));
        // The entry's position ranks overlapping claims.
        assert_eq!((me.seniority.created, a.seniority.created), (0, 1));
    }

    #[test]
    fn a_node_with_an_underlay_address_of_each_family() {
        let text = r#"
            [[node]]
            name = "dual"
            pod_cidrs = ["10.244.1.0/24"]
            underlay = ["192.0.2.1", "2001:db8::1"]
            [[node]]
            name = "six"
            pod_cidrs = ["10.244.2.0/24"]
            underlay = ["2001:db8::2"]
            [[node]]
            name = "two-v4"
            pod_cidrs = ["10.244.3.0/24"]
            underlay = ["192.0.2.3", "192.0.2.4"]
            [[node]]
            name = "three"
            pod_cidrs = ["10.244.4.0/24"]
            underlay = ["192.0.2.5", "2001:db8::5", "2001:db8::6"]
            [[node]]
            name = "junk"
            pod_cidrs = ["10.244.5.0/24"]
            underlay = ["192.0.2.7", "nope"]
        "#;
        let p = parse(text, &defaults()).expect("parses");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let dual = p.nodes[0].as_ref().expect("dual");
        assert_eq!((dual.underlay, dual.other_underlay), (ip("192.0.2.1"), Some(ip("2001:db8::1"))));
        let six = p.nodes[1].as_ref().expect("six");
        assert_eq!((six.underlay, six.other_underlay), (ip("2001:db8::2"), None));
        for (i, why) in [(2, "same family"), (3, "3 addresses"), (4, "not an IP address")] {
            let e = p.nodes[i].as_ref().expect_err("rejected");
            assert!(e.field == "underlay" && e.reason.contains(why), "{e}");
        }
    }

    #[test]
    fn parses_services_from_outside_and_names_bad_fields() {
        let text = r#"
            [[node]]
            name = "me"
            pod_cidrs = ["10.244.9.0/24"]
            [[service]]
            name = "lb"
            vip = "10.96.0.1"
            port = 80
            endpoints = ["10.244.9.2:8080", "10.244.1.2:8080"]
            type = "LoadBalancer"
            node_port = 30080
            external_ips = ["203.0.113.1"]
            load_balancer_ips = ["203.0.113.2", "203.0.113.1"]
            external_traffic_policy = "Local"
            health_check_node_port = 32000
            [[service]]
            name = "bad-policy"
            vip = "10.96.0.2"
            port = 80
            type = "NodePort"
            node_port = 30081
            external_traffic_policy = "Nearby"
            [[service]]
            name = "bad-node-port"
            vip = "10.96.0.3"
            port = 80
            type = "NodePort"
            node_port = 70000
            [[service]]
            name = "node-port-on-cluster-ip"
            vip = "10.96.0.4"
            port = 80
            node_port = 30082
            [[service]]
            name = "bad-external-ip"
            vip = "10.96.0.5"
            port = 80
            external_ips = ["fd00::1"]
            [[service]]
            name = "bad-type"
            vip = "10.96.0.6"
            port = 80
            type = "ExternalName"
            [[service]]
            name = "internal-local"
            vip = "10.96.0.7"
            port = 80
            internal_traffic_policy = "Local"
            [[service]]
            name = "bad-internal-policy"
            vip = "10.96.0.8"
            port = 80
            internal_traffic_policy = "Node"
        "#;
        let p = parse(text, &defaults()).expect("parses");
        let lb = p.services[0].as_ref().expect("lb");
        assert_eq!(lb.external.node_port, Some(30080));
        assert_eq!(lb.external.ips, ["203.0.113.1".parse::<IpAddr>().expect("ip"), "203.0.113.2".parse().expect("ip")]);
        assert!(lb.external.local);
        assert_eq!(lb.external.health_check_node_port, Some(32000));
        // This node's endpoints are the ones inside its own pod CIDR.
        let local: Vec<bool> = lb.endpoints.iter().map(|e| e.local).collect();
        assert_eq!(local, [true, false]);
        let field = |i: usize| p.services[i].as_ref().expect_err("rejected").field.clone();
        assert_eq!(field(1), "external_traffic_policy");
        assert!(!lb.internal_local);
        assert!(p.services[6].as_ref().expect("internal-local").internal_local);
        assert_eq!(field(7), "internal_traffic_policy");
        assert_eq!(field(2), "node_port");
        assert_eq!(field(3), "node_port");
        assert_eq!(field(4), "external_ips");
        assert_eq!(field(5), "type");
    }

    #[test]
    fn parses_services_and_names_bad_fields() {
        let text = r#"
            [[service]]
            name = "default/web"
            vip = "10.244.255.10"
            port = 80
            endpoints = ["10.244.1.2:8080", "10.244.2.2:8080"]
            terminating = ["10.244.1.3:8080"]
            session_affinity_seconds = 60
            [[service]]
            name = "default/dns"
            vip = "10.244.255.53"
            port = 53
            protocol = "UDP"
            [[service]]
            name = "bad/proto"
            vip = "10.244.255.54"
            port = 53
            protocol = "ICMP"
            [[service]]
            name = "bad/endpoint"
            vip = "10.244.255.55"
            port = 80
            endpoints = ["10.244.1.2"]
            [[service]]
            name = "bad/family"
            vip = "10.244.255.56"
            port = 80
            endpoints = ["[fd00::1]:80"]
        "#;
        let p = parse(text, &defaults()).expect("parses");
        let web = p.services[0].as_ref().expect("web");
        assert_eq!((web.protocol, web.port, web.endpoints.len()), (Protocol::Tcp, 80, 3));
        assert!(web.endpoints[2].terminating && !web.endpoints[2].ready);
        assert_eq!(web.affinity, Some(Duration::from_secs(60)));
        let dns = p.services[1].as_ref().expect("dns");
        assert!(dns.endpoints.is_empty() && dns.protocol == Protocol::Udp);
        let field = |i: usize| p.services[i].as_ref().map_err(|e| (e.node.as_str(), e.field.as_str())).err();
        assert_eq!(field(2), Some(("bad/proto", "protocol")));
        assert_eq!(field(3), Some(("bad/endpoint", "endpoints")));
        assert_eq!(field(4), Some(("bad/family", "endpoints")));
    }

    #[test]
    fn parses_policy_objects_and_rejects_bad_entries_alone() {
        let text = r#"
            [[namespace]]
            name = "x"
            labels = { team = "a" }
            [[namespace]]
            name = "y"
            labels = { team = 3 }
            [[pod]]
            namespace = "x"
            name = "a"
            labels = { pod = "a" }
            ips = ["10.244.1.2"]
            node = "n1"
            ports = [{ name = "http", port = 80 }, { name = "dns", port = 53, protocol = "UDP" }]
            [[pod]]
            namespace = "x"
            name = "b"
            ips = ["10.244.1.300"]
            [[network_policy]]
            namespace = "x"
            name = "allow"
            pod_selector = { match_labels = { pod = "a" } }
            [[network_policy.ingress]]
            ports = [{ protocol = "TCP", port = 80, end_port = 81 }, { port = "http" }]
            from = [{ pod_selector = { match_expressions = [{ key = "pod", operator = "In", values = ["b"] }] }, namespace_selector = { match_labels = { team = "a" } } },
                    { ip_block = { cidr = "10.0.0.0/8", except = ["10.1.0.0/16"] } }]
            [[network_policy.egress]]
            to = [{ namespace_selector = {} }]
            [[network_policy]]
            namespace = "x"
            name = "bad-except"
            [[network_policy.ingress]]
            from = [{ ip_block = { cidr = "10.0.0.0/8", except = ["11.0.0.0/16"] } }]
            [[network_policy]]
            namespace = "x"
            name = "typo"
            [[network_policy.ingress]]
            form = []
            [[network_policy]]
            namespace = "x"
            name = "wrong-key"
            [[network_policy.ingress]]
            to = []
            [[network_policy]]
            namespace = "x"
            name = "allow"
        "#;
        let p = parse(text, &defaults()).expect("parses");
        assert!(matches!(&p.namespaces[0], Ok(PolicyObject::Namespace(n)) if n.labels["team"] == "a"));
        let err = |r: &Result<PolicyObject, Rejection>| r.as_ref().err().map(|e| (e.node.clone(), e.field.clone()));
        assert_eq!(err(&p.namespaces[1]), Some(("y".into(), "entry".into())));
        let Ok(PolicyObject::Pod(a)) = &p.pods[0] else { panic!("pod a: {:?}", p.pods[0]) };
        assert_eq!(a.ports[1], NamedPort { name: "dns".into(), protocol: PolicyProtocol::Udp, port: 53 });
        assert_eq!(err(&p.pods[1]), Some(("x/b".into(), "ips".into())));
        let Ok(PolicyObject::NetworkPolicy(allow)) = &p.policies[0] else { panic!("{:?}", p.policies[0]) };
        let checked = Policy::from_spec(allow).expect("valid");
        assert_eq!(checked.ingress.as_ref().map(|r| r[0].peers.len()), Some(2));
        assert_eq!(
            checked.egress.as_ref().map(|r| r[0].peers[0].to_string()).as_deref(),
            Some("pods {} in namespaces {}")
        );
        assert_eq!(
            err(&p.policies[1]),
            Some(("x/bad-except".into(), "spec.ingress[0].from[0].ipBlock.except[0]".into()))
        );
        let typo = p.policies[2].as_ref().expect_err("typo");
        assert!(typo.field == "entry" && typo.reason.contains("form"), "{typo:?}");
        assert_eq!(err(&p.policies[3]), Some(("x/wrong-key".into(), "spec.ingress[0].to".into())));
        assert_eq!(err(&p.policies[4]), Some(("x/allow".into(), "name".into())));
    }

    /// A read caught inside an in-place rewrite (the file truncated, not yet written) is not
    /// taken: the next read, `settle` later, differs, so reading goes on until two agree. A file
    /// that really is empty is taken once it stays so.
    #[tokio::test]
    async fn a_read_is_taken_once_two_reads_agree() {
        let reads = |v: Vec<&'static str>| {
            let mut v = v.into_iter();
            move || Ok(v.next().expect("no more reads than needed").as_bytes().to_vec())
        };
        let tick = Duration::from_millis(1);
        let text = settled(Vec::new(), tick, reads(vec!["[[node]]", "[[node]]"])).await.expect("reads");
        assert_eq!(text, b"[[node]]", "a truncated first read is replaced");
        let text = settled(b"a".to_vec(), tick, reads(vec!["ab", "abc", "abc"])).await.expect("reads");
        assert_eq!(text, b"abc", "a file still being written is read until it stops");
        let text = settled(Vec::new(), tick, reads(vec![""])).await.expect("reads");
        assert!(text.is_empty(), "an empty file that stays so is taken");
        let busy = (0..=SETTLE_READS).map(|i| if i % 2 == 0 { "x" } else { "y" }).collect();
        let text = settled(Vec::new(), tick, reads(busy)).await.expect("reads");
        assert!(!text.is_empty(), "a file that never settles: the last read is taken");
        let failed = settled(Vec::new(), tick, || Err(std::io::Error::other("gone"))).await;
        assert!(failed.is_err(), "a read error is returned");
    }

    #[test]
    fn whole_file_errors_carry_a_position() {
        let e = parse("[[node]]\nname = 3\n", &defaults()).expect_err("type error");
        assert!(e.contains("line 2"), "{e}");
        assert!(parse("nodes = []", &defaults()).is_err(), "unknown keys are refused");
    }
}
