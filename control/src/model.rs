//! The control plane's model of the cluster (control side): which node owns which pod CIDRs and how
//! to reach it. Sources translate their objects into [`NodeSpec`]s; the [diff engine](crate::engine)
//! turns them into [`Route`]s.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ferry_encap::{MacAddr, TunnelKind};
use ipnet::IpNet;

/// Largest VNI: VXLAN and Geneve carry 24 bits.
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// Where a node's mapping came from. Each source owns its own node names; a resync from one
/// source never touches another's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    /// Node objects from a Kubernetes API server.
    Kube,
    /// Flannel-style subnet leases in etcd.
    Etcd,
    /// A TOML file.
    Static,
}

impl SourceKind {
    /// Lower-case name, as in logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            SourceKind::Kube => "kube",
            SourceKind::Etcd => "etcd",
            SourceKind::Static => "static",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A node as one source names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeKey {
    /// The source.
    pub source: SourceKind,
    /// The node's name within the source (a Node's name; for etcd, the lease's subnet key).
    pub name: String,
}

impl NodeKey {
    /// A key.
    pub fn new(source: SourceKind, name: impl Into<String>) -> Self {
        NodeKey { source, name: name.into() }
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.source, self.name)
    }
}

/// What one node contributes to the tables, already parsed and checked field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's name within its source.
    pub name: String,
    /// Its pod CIDRs (IPv4 and/or IPv6), without host bits, sorted, no duplicates. Empty while the
    /// node has no CIDR yet (a new Kubernetes node before IPAM).
    pub pod_cidrs: Vec<IpNet>,
    /// The node's underlay address (the first its source names). Meaningless when `pod_cidrs` is
    /// empty.
    pub underlay: IpAddr,
    /// Its underlay address of the other family, when it has both. Which one a tunnel goes to is
    /// this node's choice ([`ferry_tables::Underlay::choose`]); packets from either are accepted.
    pub other_underlay: Option<IpAddr>,
    /// The remote VTEP's MAC, when the node announced one (Flannel's `VtepMAC`).
    pub vtep_mac: Option<MacAddr>,
    /// The VNI to encapsulate with.
    pub vni: u32,
    /// The encapsulation.
    pub tunnel: TunnelKind,
    /// The node's tunnel UDP port.
    pub port: u16,
    /// Whether this is the node the control plane runs on: its CIDRs are delivered locally.
    pub local: bool,
    /// How senior its claim is, for CIDRs two nodes claim (see [`Seniority`]).
    pub seniority: Seniority,
}

/// How senior a node's claim on its CIDRs is; of two nodes whose CIDRs overlap, the more senior
/// keeps them and the other installs nothing. Every field comes from the source's own record of the
/// object, so every agent, whenever it started and in whatever order it heard of the objects, ranks
/// them alike. Ordered: smaller is more senior. The engine ranks this node's own claim above all,
/// then by source, then by this, then by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seniority {
    /// Kubernetes: the Node's `metadata.creationTimestamp` (Unix seconds); etcd: the lease key's
    /// `create_revision`; static file: the entry's position in the file.
    pub created: i64,
    /// Kubernetes: the Node's `metadata.uid` (objects created in the same second); empty elsewhere.
    pub uid: String,
}

impl NodeSpec {
    /// Sorts and deduplicates `pod_cidrs` (the form the engine compares).
    pub fn normalized(mut self) -> Self {
        self.pod_cidrs.sort();
        self.pod_cidrs.dedup();
        self
    }

    /// The next hop for this node's CIDRs.
    pub fn next_hop(&self) -> NextHop {
        if self.local {
            NextHop::Local
        } else {
            NextHop::Tunnel(TunnelEndpoint {
                underlay: self.underlay,
                other_underlay: self.other_underlay,
                vtep_mac: self.vtep_mac,
                vni: self.vni,
                kind: self.tunnel,
                port: self.port,
            })
        }
    }
}

/// How to reach a remote node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelEndpoint {
    /// The node's underlay address.
    pub underlay: IpAddr,
    /// Its underlay address of the other family, when it has both.
    pub other_underlay: Option<IpAddr>,
    /// The node's VTEP MAC (inner destination MAC), when known.
    pub vtep_mac: Option<MacAddr>,
    /// VNI.
    pub vni: u32,
    /// Encapsulation.
    pub kind: TunnelKind,
    /// Outer UDP destination port.
    pub port: u16,
}

/// Where a pod CIDR goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// This node's own pods: deliver locally, never tunnel.
    Local,
    /// Another node: encapsulate toward it.
    Tunnel(TunnelEndpoint),
}

/// One installed mapping: the owning node and its next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The source that named the owning node.
    pub source: SourceKind,
    /// The node that owns the CIDR.
    pub node: Arc<str>,
    /// Where traffic for the CIDR goes.
    pub next_hop: NextHop,
}

/// Bad data from a source: names the node and the field. The engine keeps the node's last good
/// state, logs one warning and counts it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node}: field {field}: {reason}")]
pub struct Rejection {
    /// The node's name within its source.
    pub node: String,
    /// The offending field, as the source spells it (`spec.podCIDRs`, `BackendData.VtepMAC`, ...).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Rejection {
    /// A rejection.
    pub fn new(node: impl Into<String>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection { node: node.into(), field: field.into(), reason: reason.into() }
    }
}

/// A node's underlay addresses as its source lists them, as [`NodeSpec::underlay`] and
/// [`NodeSpec::other_underlay`]: one address, or one of each family, the IPv4 one first whatever
/// the order given (a VTEP MAC is derived from the first, and every node must derive the same).
///
/// # Errors
/// A reason when the list is empty, longer than two, or names a family twice.
pub fn underlay_pair(addrs: &[IpAddr]) -> Result<(IpAddr, Option<IpAddr>), String> {
    match addrs {
        [one] => Ok((*one, None)),
        [a, b] if a.is_ipv4() && b.is_ipv6() => Ok((*a, Some(*b))),
        [a, b] if a.is_ipv6() && b.is_ipv4() => Ok((*b, Some(*a))),
        [a, b] => Err(format!("{a} and {b} are of the same family: give at most one IPv4 and one IPv6 address")),
        [] => Err("no address".into()),
        more => Err(format!("{} addresses: give at most one IPv4 and one IPv6 address", more.len())),
    }
}

/// Parses a pod CIDR strictly: no host bits (a CIDR like `10.0.1.5/24` is a typo, not a network).
///
/// # Errors
/// A human-readable reason.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.trim().parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
    if net.trunc() != net {
        return Err(format!("{s:?} has host bits set (network is {})", net.trunc()));
    }
    Ok(net)
}

/// Parses a tunnel type name: `vxlan` or `geneve`.
///
/// # Errors
/// A reason naming the unsupported type.
pub fn parse_tunnel(s: &str) -> Result<TunnelKind, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "vxlan" => Ok(TunnelKind::Vxlan),
        "geneve" => Ok(TunnelKind::Geneve),
        other => Err(format!("backend type {other:?} is not supported (ferry tunnels with vxlan or geneve)")),
    }
}

/// Checks a VNI fits 24 bits.
///
/// # Errors
/// A reason when it does not.
pub fn check_vni(vni: u64) -> Result<u32, String> {
    u32::try_from(vni).ok().filter(|v| *v <= MAX_VNI).ok_or_else(|| format!("VNI {vni} does not fit 24 bits"))
}

/// Parses a VTEP MAC, which must be unicast.
///
/// # Errors
/// A reason when it is malformed or multicast.
pub fn parse_vtep_mac(s: &str) -> Result<MacAddr, String> {
    let mac: MacAddr = s.trim().parse().map_err(|e: ferry_encap::wire::ethernet::ParseMacError| e.to_string())?;
    if !mac.is_unicast() {
        return Err(format!("{mac} is not a unicast MAC"));
    }
    Ok(mac)
}

/// One thing a source learned.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A node was added or changed (or its new data was rejected while parsing).
    Upsert(SourceKind, Result<NodeSpec, Rejection>),
    /// A node is gone.
    Delete(SourceKind, String),
    /// The complete set of a source's nodes, after a (re)connect: nodes not listed are removed.
    Resync(SourceKind, Vec<Result<NodeSpec, Rejection>>),
    /// The cluster network(s) a source's CIDRs must lie in (Flannel's `Network`); empty: no check
    /// beyond the configured cluster CIDRs.
    Network(SourceKind, Vec<IpNet>),
    /// The complete set of a source's services (each load of the static file). They bypass the
    /// route engine: the publisher compiles them into their own part of the snapshot.
    Services(SourceKind, Vec<ferry_tables::ServiceSpec>),
    /// A namespace, pod or NetworkPolicy was added or changed (or its new data was rejected: the
    /// rejection's `node` is then the object's [key](PolicyObject::key), and the object keeps its
    /// last good state). They bypass the route engine: the policy store keeps them and the
    /// policy compiler turns them into their own part of the snapshot.
    ObjectUpsert(SourceKind, ObjectKind, Result<PolicyObject, Rejection>),
    /// A namespace, pod or NetworkPolicy is gone (by its [key](PolicyObject::key)).
    ObjectDelete(SourceKind, ObjectKind, String),
    /// The complete set of a source's objects of one kind (after a list, or each load of the
    /// static file): objects of that kind and source not listed are removed; a listed rejection
    /// keeps its object's last good state.
    ObjectResync(SourceKind, ObjectKind, Vec<Result<PolicyObject, Rejection>>),
    /// Some services changed (the Kubernetes source, per Service or EndpointSlice event): only
    /// these are recompiled.
    ServicesChanged(SourceKind, ServiceDelta),
}

/// The kinds of object NetworkPolicy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Pod.
    Pod,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
}

impl ObjectKind {
    /// As Kubernetes names the kind.
    pub const fn name(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Pod => "Pod",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One namespace, pod or NetworkPolicy, as a source read it (a policy is checked by the store with
/// [`ferry_tables::policy::Policy::from_spec`]; a source may check it first to name the field in
/// its own logs).
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyObject {
    /// A namespace.
    Namespace(ferry_tables::policy::NamespaceSpec),
    /// A pod.
    Pod(ferry_tables::policy::PodSpec),
    /// A NetworkPolicy.
    NetworkPolicy(ferry_tables::policy::NetworkPolicySpec),
}

impl PolicyObject {
    /// Its kind.
    pub fn kind(&self) -> ObjectKind {
        match self {
            PolicyObject::Namespace(_) => ObjectKind::Namespace,
            PolicyObject::Pod(_) => ObjectKind::Pod,
            PolicyObject::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
        }
    }

    /// Its key within its kind: the namespace's name; `namespace/name` for pods and policies.
    pub fn key(&self) -> String {
        match self {
            PolicyObject::Namespace(n) => n.name.clone(),
            PolicyObject::Pod(p) => p.key(),
            PolicyObject::NetworkPolicy(p) => p.key(),
        }
    }
}

/// An incremental change to the published services.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceDelta {
    /// Services (by [`ServiceSpec::name`](ferry_tables::ServiceSpec)) that are gone.
    pub removed: Vec<String>,
    /// Services added or changed (each replaces the one of the same name).
    pub upserted: Vec<ferry_tables::ServiceSpec>,
}

impl ServiceDelta {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.upserted.is_empty()
    }

    /// `self` then `later`, as one delta.
    pub fn merge(&mut self, later: ServiceDelta) {
        if self.is_empty() {
            *self = later;
            return;
        }
        let names: std::collections::HashSet<&str> =
            later.removed.iter().map(String::as_str).chain(later.upserted.iter().map(|s| s.name.as_str())).collect();
        self.upserted.retain(|s| !names.contains(s.name.as_str()));
        self.removed.extend(later.removed);
        self.upserted.extend(later.upserted);
    }
}

impl Update {
    /// The source that sent it.
    pub fn source(&self) -> SourceKind {
        match self {
            Update::Upsert(s, _)
            | Update::Delete(s, _)
            | Update::Resync(s, _)
            | Update::Network(s, _)
            | Update::Services(s, _)
            | Update::ServicesChanged(s, _)
            | Update::ObjectUpsert(s, ..)
            | Update::ObjectDelete(s, ..)
            | Update::ObjectResync(s, ..) => *s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_is_strict() {
        assert_eq!(parse_cidr("10.1.2.0/24"), Ok("10.1.2.0/24".parse().expect("cidr")));
        assert!(parse_cidr("10.1.2.5/24").expect_err("host bits").contains("host bits"));
        assert!(parse_cidr("10.1.2.0").is_err());
        assert!(parse_cidr("fd00::/64").is_ok());
    }

    #[test]
    fn service_deltas_merge_in_order() {
        let spec = |name: &str, port| ferry_tables::ServiceSpec {
            name: name.into(),
            vip: "10.96.0.1".parse().expect("ip"),
            port,
            protocol: ferry_tables::Protocol::Tcp,
            endpoints: Vec::new(),
            affinity: None,
            external: Default::default(),
            internal_local: false,
        };
        let mut d = ServiceDelta { removed: vec!["x".into()], upserted: vec![spec("a", 1), spec("b", 2)] };
        d.merge(ServiceDelta { removed: vec!["a".into()], upserted: vec![spec("b", 3), spec("x", 4)] });
        assert_eq!(d.removed, ["x", "a"]);
        let up: Vec<_> = d.upserted.iter().map(|s| (s.name.as_str(), s.port)).collect();
        // a's upsert is undone by its removal, b's replaced by the later one, x comes back.
        assert_eq!(up, [("b", 3), ("x", 4)]);
    }

    #[test]
    fn tunnel_vni_and_mac() {
        assert_eq!(parse_tunnel("VXLAN"), Ok(TunnelKind::Vxlan));
        assert!(parse_tunnel("host-gw").expect_err("unsupported").contains("host-gw"));
        assert_eq!(check_vni(1), Ok(1));
        assert!(check_vni(1 << 24).is_err());
        assert!(parse_vtep_mac("02:00:00:00:00:01").is_ok());
        assert!(parse_vtep_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_vtep_mac("zz").is_err());
    }
}
