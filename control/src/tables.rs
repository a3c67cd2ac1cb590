//! The seam to the data plane's forwarding tables (control side): [`desired_state`] turns the
//! engine's route table into a [`DesiredState`], and [`TablesPublisher`] publishes it through
//! [`Tables::set_desired`], which compiles and swaps the snapshot the workers read.
//!
//! - Remote nodes become [`RemoteNode`]s (one per node, all its CIDRs); this node's own CIDRs
//!   become blackholes, under which the local pods' host routes (longer, so they win) deliver.
//! - Local pods are not the control plane's business: whatever the tables already hold is kept.
//!   The tables can be shared ([`TablesPublisher::shared`]) with whoever registers pods and
//!   resolves neighbours on the control side; writers take turns on a mutex that the workers
//!   never touch (they read published snapshots).
//! - A node the tables cannot build (an IPv6 underlay on a node with only an IPv4 one, tunnel
//!   parameters the template builder refuses) is left out of the publication with one warning,
//!   rather than letting it block every other node's routes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ferry_encap::MacAddr;
use ferry_tables::policy::{PolicyCompiler, PolicyTables};
use ferry_tables::{BuildError, DesiredState, LocalPod, RemoteNode, Snapshot, Tables, Underlay};
use ipnet::IpNet;

use crate::engine::Diff;
use crate::model::{NextHop, ObjectKind, Route};
use crate::policy::PolicyStore;
use crate::publish::{Publish, RouteTable};

/// The VTEP MAC assumed for a node that announced none: locally administered, unicast, derived
/// from its underlay address (`02:fe:` + the IPv4 address, or the last four bytes of the IPv6
/// one), so every ferry node derives the same one.
pub fn derived_vtep_mac(underlay: IpAddr) -> MacAddr {
    let tail = match underlay {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    MacAddr([0x02, 0xfe, tail[0], tail[1], tail[2], tail[3]])
}

/// The desired state for a route table: remote nodes with their CIDRs, this node's CIDRs as
/// blackholes, and `local_pods` as given. A remote node with underlay addresses of both families
/// is tunnelled to the one `underlay` chooses ([`Underlay::choose`]: the preferred family when both
/// nodes have it, else the family they share); the other is kept to accept its packets from.
pub fn desired_state(routes: &BTreeMap<IpNet, Route>, local_pods: Vec<LocalPod>, underlay: &Underlay) -> DesiredState {
    // Routes are sorted by CIDR; group them by owner, keeping the nodes in first-CIDR order.
    let mut index: HashMap<(crate::model::SourceKind, &str), usize> = HashMap::new();
    let mut nodes: Vec<RemoteNode> = Vec::new();
    let mut blackholes = Vec::new();
    for (net, route) in routes {
        match route.next_hop {
            NextHop::Local => blackholes.push(*net),
            NextHop::Tunnel(t) => {
                let i = *index.entry((route.source, &*route.node)).or_insert_with(|| {
                    let all: Vec<IpAddr> = std::iter::once(t.underlay).chain(t.other_underlay).collect();
                    let chosen = underlay.choose(&all).unwrap_or(t.underlay);
                    nodes.push(RemoteNode {
                        name: route.node.to_string(),
                        pod_cidrs: Vec::new(),
                        underlay: chosen,
                        other_underlays: all.into_iter().filter(|a| *a != chosen).collect(),
                        // Derived from the first address, whichever is chosen: every node derives
                        // the same MAC for it.
                        vtep_mac: t.vtep_mac.unwrap_or_else(|| derived_vtep_mac(t.underlay)),
                        vni: t.vni,
                        tunnel: t.kind,
                        port: t.port,
                    });
                    nodes.len() - 1
                });
                nodes[i].pod_cidrs.push(*net);
            }
        }
    }
    DesiredState { nodes, local_pods, blackholes }
}

type Hook = Box<dyn FnMut(&Arc<Snapshot>, &Diff) + Send>;
type PolicyHook = Box<dyn FnMut(&Arc<PolicyTables>) + Send>;

/// Every pod the sources describe (`namespace/name` -> its addresses and node): a handle readable
/// from any thread (`ferry trace` resolves pod names with it) while the control thread owns the
/// publisher, which keeps it current.
#[derive(Debug, Clone, Default)]
pub struct PodDirectory(Arc<Mutex<PodMap>>);

/// `namespace/name` -> (addresses, node).
type PodMap = BTreeMap<String, (Vec<IpAddr>, String)>;

impl PodDirectory {
    fn guard(&self) -> MutexGuard<'_, PodMap> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pod `namespace/name`: its addresses and its node.
    pub fn get(&self, key: &str) -> Option<(Vec<IpAddr>, String)> {
        self.guard().get(key).cloned()
    }

    /// The pod with this address: `namespace/name` and its node.
    pub fn by_addr(&self, addr: IpAddr) -> Option<(String, String)> {
        self.guard().iter().find(|(_, (ips, _))| ips.contains(&addr)).map(|(k, (_, n))| (k.clone(), n.clone()))
    }

    /// Every pod named `name` in any namespace (`namespace/name` keys).
    pub fn named(&self, name: &str) -> Vec<String> {
        self.guard().keys().filter(|k| k.split_once('/').is_some_and(|(_, n)| n == name)).cloned().collect()
    }

    fn set(&self, key: &str, pod: Option<&ferry_tables::policy::PodSpec>) {
        let mut g = self.guard();
        match pod {
            Some(p) => g.insert(key.to_owned(), (p.ips.clone(), p.node.clone())),
            None => g.remove(key),
        };
    }
}

/// The nodes the last publication left out of the tables, and why: a handle readable from any
/// thread (the agent's `ferry status`) while the control thread owns the publisher.
#[derive(Debug, Clone, Default)]
pub struct SkippedNodes(Arc<Mutex<BTreeMap<String, String>>>);

impl SkippedNodes {
    /// `(node, reason)`, by node name.
    pub fn list(&self) -> Vec<(String, String)> {
        let g = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        g.iter().map(|(n, r)| (n.clone(), r.clone())).collect()
    }

    fn set(&self, skipped: &HashMap<String, String>) {
        let mut g = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *g = skipped.iter().map(|(n, r)| (n.clone(), r.clone())).collect();
    }
}

/// Publishes into the data plane's [`Tables`]. Owns them on the control thread; workers hold
/// [`Tables::reader`]s taken before handing the tables over.
pub struct TablesPublisher {
    tables: Arc<Mutex<Tables>>,
    /// NetworkPolicy: this node's pods' rule tables, compiled incrementally.
    policy: PolicyCompiler,
    /// Addresses of this node that are not in its pod CIDRs (its underlay address).
    node_extra: Vec<IpAddr>,
    /// Nodes left out of the last publications, and why (warned once per reason).
    skipped: HashMap<String, String>,
    /// The same, for readers on other threads.
    skipped_shared: SkippedNodes,
    /// Every pod the sources describe, for readers on other threads.
    pods: PodDirectory,
    hook: Option<Hook>,
    policy_hook: Option<PolicyHook>,
}

impl fmt::Debug for TablesPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TablesPublisher").field("skipped", &self.skipped).finish_non_exhaustive()
    }
}

/// How many unbuildable nodes one publication may drop before giving up on it.
const MAX_SKIPPED_PER_PUBLICATION: usize = 64;

impl TablesPublisher {
    /// Takes over the tables.
    pub fn new(tables: Tables) -> Self {
        Self::shared(Arc::new(Mutex::new(tables)))
    }

    /// Publishes into tables that other control-side writers (pod registration, neighbour
    /// resolution) share.
    pub fn shared(tables: Arc<Mutex<Tables>>) -> Self {
        TablesPublisher {
            tables,
            policy: PolicyCompiler::new("", Vec::new()),
            node_extra: Vec::new(),
            skipped: HashMap::new(),
            skipped_shared: SkippedNodes::default(),
            pods: PodDirectory::default(),
            hook: None,
            policy_hook: None,
        }
    }

    /// Names this node, whose pods get NetworkPolicy rule tables, and its addresses outside its
    /// pod CIDRs (the underlay address). Traffic between a pod and its node is always allowed: the
    /// node's addresses are these plus, for each of its pod CIDRs, the network address (the host
    /// port's overlay address) and the first host address (the pod gateway, a hairpin's source).
    pub fn for_node(mut self, name: &str, addrs: Vec<IpAddr>) -> Self {
        self.policy = PolicyCompiler::new(name, addrs.clone());
        self.node_extra = addrs;
        self
    }

    /// The NetworkPolicy compiler (for `ferry policy`'s explanations).
    pub fn policy(&self) -> &PolicyCompiler {
        &self.policy
    }

    /// The tables (locked; a writer that panicked left them consistent, so poisoning is ignored).
    pub fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Calls `hook` after each successful publication (on the control thread), with the snapshot
    /// the workers now load.
    pub fn with_hook(mut self, hook: impl FnMut(&Arc<Snapshot>, &Diff) + Send + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// Calls `hook` right after each publication of NetworkPolicy tables (on the control thread,
    /// with the tables unlocked), with the tables the workers now load: what must follow the
    /// policy outside the snapshot (the pod programs' `isolated` flags) follows it at once.
    pub fn with_policy_hook(mut self, hook: impl FnMut(&Arc<PolicyTables>) + Send + 'static) -> Self {
        self.policy_hook = Some(Box::new(hook));
        self
    }

    /// Run the policy hook on the tables last published.
    fn policy_published(&mut self) {
        if self.policy_hook.is_some() {
            let policy = Arc::clone(self.tables().policy());
            if let Some(hook) = &mut self.policy_hook {
                hook(&policy);
            }
        }
    }

    /// Nodes currently left out, with the reason.
    pub fn skipped(&self) -> &HashMap<String, String> {
        &self.skipped
    }

    /// A handle on the nodes left out, kept current by every publication (take it before handing
    /// the publisher to the control plane).
    pub fn skipped_nodes(&self) -> SkippedNodes {
        self.skipped_shared.clone()
    }

    /// A handle on every pod the sources describe, kept current by the publisher (take it before
    /// handing the publisher to the control plane).
    pub fn pod_directory(&self) -> PodDirectory {
        self.pods.clone()
    }
}

impl Publish for TablesPublisher {
    fn publish(&mut self, table: &RouteTable<'_>) {
        let tables = Arc::clone(&self.tables);
        let mut tables = tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let local_pods = tables.desired().local_pods.clone();
        let mut desired = desired_state(table.routes, local_pods, tables.underlay());
        let mut skipped = HashMap::new();
        loop {
            match tables.set_desired(desired.clone(), Instant::now()) {
                Ok(_) => break,
                Err(e) => {
                    let node = match &e {
                        BuildError::NoSourceAddress { node, .. } | BuildError::Template { node, .. } => node.clone(),
                        // The engine never hands over overlapping or malformed prefixes, so these
                        // mean a bug; keep forwarding on the previous tables.
                        other => {
                            tracing::error!(error = %other, generation = table.generation, "the data plane's tables refused the routes");
                            return;
                        }
                    };
                    if skipped.len() >= MAX_SKIPPED_PER_PUBLICATION {
                        tracing::error!(error = %e, "too many nodes the tables cannot build; keeping the previous tables");
                        return;
                    }
                    desired.nodes.retain(|n| n.name != node);
                    skipped.insert(node, e.to_string());
                }
            }
        }
        for (node, reason) in &skipped {
            if self.skipped.get(node) != Some(reason) {
                tracing::warn!(node = %node, reason = %reason, "node left out of the forwarding tables");
            }
        }
        self.skipped_shared.set(&skipped);
        self.skipped = skipped;
        // This node's addresses follow its pod CIDRs.
        let mut addrs = self.node_extra.clone();
        for net in table.routes.iter().filter(|(_, r)| r.next_hop == NextHop::Local).map(|(n, _)| n) {
            addrs.push(net.network());
            if let Some(gw) = first_host(net) {
                addrs.push(gw);
            }
        }
        let mut policy_published = false;
        if addrs != self.policy.node_addrs() {
            self.policy.set_node_addrs(addrs);
            if !tables.policy().is_empty() {
                tables.set_policy(self.policy.build(), Instant::now());
                policy_published = true;
            }
        }
        if let Some(hook) = &mut self.hook {
            hook(&tables.current(), table.diff);
        }
        drop(tables);
        if policy_published {
            self.policy_published();
        }
    }

    fn services(&mut self, services: &[ferry_tables::ServiceSpec]) {
        let tables = Arc::clone(&self.tables);
        let mut tables = tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match tables.set_services(services, Instant::now()) {
            Ok(p) => tracing::info!(services = services.len(), generation = p.generation, "services published"),
            Err(e) => tracing::warn!(error = %e, "services refused; keeping the previous ones"),
        }
    }

    fn services_changed(&mut self, delta: &crate::model::ServiceDelta) {
        let tables = Arc::clone(&self.tables);
        let mut tables = tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match tables.update_services(&delta.removed, &delta.upserted, Instant::now()) {
            Ok(p) => tracing::debug!(
                removed = delta.removed.len(),
                upserted = delta.upserted.len(),
                generation = p.generation,
                "services changed"
            ),
            Err(e) => tracing::warn!(error = %e, "service change refused; keeping the previous services"),
        }
    }

    fn objects(&mut self, store: &PolicyStore, changed: &[(ObjectKind, String)]) {
        for (kind, key) in changed {
            match kind {
                ObjectKind::Namespace => self.policy.set_namespace(key, store.namespace(key).map(|n| &n.labels)),
                ObjectKind::Pod => {
                    self.pods.set(key, store.pod(key));
                    self.policy.set_pod(key, store.pod(key));
                }
                ObjectKind::NetworkPolicy => self.policy.set_policy(key, store.policy(key)),
            }
        }
        let started = Instant::now();
        let compiled = self.policy.build();
        let compile_us = started.elapsed().as_micros() as u64;
        let (generation, pods) = (compiled.generation(), compiled.pods().len());
        let tables = Arc::clone(&self.tables);
        let mut tables = tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = tables.set_policy(compiled, Instant::now());
        drop(tables);
        self.policy_published();
        tracing::info!(
            changed = changed.len(),
            policy_generation = generation,
            isolated_pods = pods,
            compile_us,
            generation = p.generation,
            "network policy published"
        );
    }
}

/// The first host address of a network (its network address + 1), if it has one.
fn first_host(net: &IpNet) -> Option<IpAddr> {
    match net {
        IpNet::V4(n) if n.prefix_len() < 32 => Some(IpAddr::V4(std::net::Ipv4Addr::from(u32::from(n.network()) + 1))),
        IpNet::V6(n) if n.prefix_len() < 128 => Some(IpAddr::V6(std::net::Ipv6Addr::from(u128::from(n.network()) + 1))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_encap::TunnelKind;
    use ferry_tables::{PortId, Underlay};

    use super::*;
    use crate::model::{SourceKind, TunnelEndpoint};

    fn tunnel(node: &str, underlay: &str, mac: Option<&str>) -> Route {
        Route {
            source: SourceKind::Kube,
            node: Arc::from(node),
            next_hop: NextHop::Tunnel(TunnelEndpoint {
                underlay: underlay.parse().expect("ip"),
                other_underlay: None,
                vtep_mac: mac.map(|m| m.parse().expect("mac")),
                vni: 1,
                kind: TunnelKind::Vxlan,
                port: 4789,
            }),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn routes() -> BTreeMap<IpNet, Route> {
        let mut r = BTreeMap::new();
        r.insert(net("10.0.1.0/24"), tunnel("a", "192.0.2.1", Some("02:00:00:00:00:01")));
        r.insert(net("fd00:1::/64"), tunnel("a", "192.0.2.1", Some("02:00:00:00:00:01")));
        r.insert(net("10.0.2.0/24"), tunnel("b", "192.0.2.2", None));
        r.insert(
            net("10.0.9.0/24"),
            Route { source: SourceKind::Kube, node: Arc::from("me"), next_hop: NextHop::Local },
        );
        r
    }

    fn v4_only() -> Underlay {
        Underlay::new(MacAddr([2, 0, 0, 0, 0, 0xaa]), Some("192.0.2.100".parse().expect("ip")), None)
    }

    #[test]
    fn routes_become_nodes_and_blackholes() {
        let d = desired_state(&routes(), Vec::new(), &v4_only());
        assert_eq!(d.blackholes, [net("10.0.9.0/24")]);
        assert_eq!(d.nodes.len(), 2);
        let a = d.nodes.iter().find(|n| n.name == "a").expect("a");
        assert_eq!(a.pod_cidrs, [net("10.0.1.0/24"), net("fd00:1::/64")]);
        let b = d.nodes.iter().find(|n| n.name == "b").expect("b");
        assert_eq!(b.vtep_mac.to_string(), "02:fe:c0:00:02:02", "derived from the underlay address");
    }

    #[test]
    fn a_node_with_both_families_is_tunnelled_to_the_chosen_one() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let dual_route = |node: &str, v4: &str, v6: &str| {
            let mut r = tunnel(node, v4, None);
            if let NextHop::Tunnel(t) = &mut r.next_hop {
                t.other_underlay = Some(ip(v6));
            }
            r
        };
        let mut r = BTreeMap::new();
        r.insert(net("10.0.1.0/24"), dual_route("dual", "192.0.2.1", "2001:db8::1"));
        r.insert(net("10.0.2.0/24"), tunnel("six", "2001:db8::2", None));
        let mac = MacAddr([2, 0, 0, 0, 0, 0xaa]);
        let both =
            Underlay::new(mac, Some("192.0.2.100".parse().expect("ip")), Some("2001:db8::100".parse().expect("ip")));
        let chosen = |u: &Underlay| {
            desired_state(&r, Vec::new(), u)
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.underlay, n.other_underlays.clone()))
                .collect::<Vec<_>>()
        };
        // IPv4 first, as Flannel; the IPv6-only node over IPv6; the MAC derived from the first
        // address whichever is chosen.
        assert_eq!(
            chosen(&both),
            [("dual".into(), ip("192.0.2.1"), vec![ip("2001:db8::1")]), ("six".into(), ip("2001:db8::2"), vec![])]
        );
        let d = desired_state(&r, Vec::new(), &Underlay { prefer_ipv6: true, ..both.clone() });
        assert_eq!(
            (d.nodes[0].underlay, d.nodes[0].vtep_mac.to_string()),
            (ip("2001:db8::1"), "02:fe:c0:00:02:01".into())
        );
        // A node with only IPv6 reaches the dual node over IPv6 whatever it prefers.
        let six_only = Underlay::new(mac, None, Some("2001:db8::100".parse().expect("ip")));
        assert_eq!(chosen(&six_only)[0].1, ip("2001:db8::1"));

        // Published: both addresses are known nodes, and the other one maps to the chosen one.
        let mut p = TablesPublisher::new(Tables::new(both, Duration::from_secs(30)));
        p.publish(&RouteTable { generation: 1, routes: &r, diff: &Diff::default() });
        assert!(p.skipped().is_empty(), "{:?}", p.skipped());
        let snap = p.tables().current();
        assert!(snap.is_known_node(ip("192.0.2.1")) && snap.is_known_node(ip("2001:db8::1")));
        assert_eq!(snap.node_alias(ip("2001:db8::1")), Some(ip("192.0.2.1")));
        assert_eq!(snap.node_alias(ip("192.0.2.1")), None);
        assert_eq!(snap.node_alias(ip("2001:db8::2")), None);
    }

    #[test]
    fn publishes_into_the_data_plane_tables_and_skips_unbuildable_nodes() {
        let underlay =
            Underlay::new("02:00:00:00:00:aa".parse().expect("mac"), Some("192.0.2.100".parse().expect("ip")), None);
        let tables = Tables::new(underlay, Duration::from_secs(30));
        let reader_snapshot = tables.current();
        assert_eq!(reader_snapshot.generation(), 0);
        let seen = Arc::new(std::sync::Mutex::new(0u64));
        let s2 = seen.clone();
        let mut p = TablesPublisher::new(tables).with_hook(move |snap, _| {
            if let Ok(mut g) = s2.lock() {
                *g = snap.generation();
            }
        });
        let handle = p.skipped_nodes();
        let mut r = routes();
        // An IPv6 underlay: this node has no IPv6 underlay address, so the tables cannot reach it.
        r.insert(net("10.0.3.0/24"), tunnel("v6", "2001:db8::3", None));
        p.publish(&RouteTable { generation: 1, routes: &r, diff: &Diff::default() });
        assert!(p.skipped().contains_key("v6"), "{:?}", p.skipped());
        // What `ferry status` reads, from another thread.
        let listed = std::thread::spawn(move || handle.list()).join().expect("reader");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].0, "v6");
        assert!(!listed[0].1.is_empty(), "a reason: {listed:?}");
        let generation = *seen.lock().expect("lock");
        assert!(generation > 0, "published");
        let snap = p.tables().current();
        assert!(matches!(snap.route("10.0.1.5".parse().expect("ip")), ferry_tables::Route::Unresolved { .. }));
        assert!(matches!(snap.route("10.0.9.5".parse().expect("ip")), ferry_tables::Route::Blackhole));
        assert!(matches!(snap.route("10.0.3.5".parse().expect("ip")), ferry_tables::Route::NoRoute));
        assert!(snap.is_known_node("192.0.2.2".parse().expect("ip")));
        // Local pods set by someone else survive a route publication.
        let pod = LocalPod {
            port: PortId(3),
            mac: "02:00:00:00:00:33".parse().expect("mac"),
            addrs: vec!["10.0.9.3".parse().expect("ip")],
            source_only: vec![],
        };
        let mut d = p.tables().desired().clone();
        d.local_pods.push(pod);
        p.tables().set_desired(d, Instant::now()).expect("pods");
        r.remove(&net("10.0.2.0/24"));
        p.publish(&RouteTable { generation: 2, routes: &r, diff: &Diff::default() });
        let snap = p.tables().current();
        assert!(matches!(
            snap.route("10.0.9.3".parse().expect("ip")),
            ferry_tables::Route::Local { port: PortId(3), .. }
        ));
        assert!(matches!(snap.route("10.0.2.5".parse().expect("ip")), ferry_tables::Route::NoRoute));
    }

    #[test]
    fn policy_objects_compile_into_their_own_part_of_the_snapshot() {
        use ferry_tables::policy::{LabelSelectorSpec, NetworkPolicySpec, PodSpec, PolicyVerdict};

        use crate::model::{PolicyObject, Update};
        use crate::policy::PolicyStore;

        let underlay = Underlay::new("02:00:00:00:00:aa".parse().expect("mac"), None, None);
        let mut p = TablesPublisher::new(Tables::new(underlay, Duration::from_secs(30)))
            .for_node("me", vec!["192.0.2.100".parse().expect("ip")]);
        let pod = |name: &str, ip: &str| {
            Ok(PolicyObject::Pod(PodSpec {
                namespace: "x".into(),
                name: name.into(),
                labels: [("pod".to_owned(), name.to_owned())].into(),
                ips: vec![ip.parse().expect("ip")],
                node: "me".into(),
                ports: vec![],
            }))
        };
        let deny = Ok(PolicyObject::NetworkPolicy(NetworkPolicySpec {
            namespace: "x".into(),
            name: "deny-a".into(),
            pod_selector: LabelSelectorSpec {
                match_labels: [("pod".to_owned(), "a".to_owned())].into(),
                ..Default::default()
            },
            ..Default::default()
        }));
        let mut store = PolicyStore::new(crate::Metrics::new());
        store.apply(&Update::ObjectResync(
            SourceKind::Static,
            ObjectKind::Pod,
            vec![pod("a", "10.0.9.2"), pod("b", "10.0.9.3")],
        ));
        store.apply(&Update::ObjectResync(SourceKind::Static, ObjectKind::NetworkPolicy, vec![deny]));
        let routes = routes();
        p.publish(&RouteTable { generation: 1, routes: &routes, diff: &Diff::default() });
        let before = p.tables().current().generation();
        let changed = store.take_changes();
        p.objects(&store, &changed);
        let snap = p.tables().current();
        assert!(snap.generation() > before);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(snap.policy().verdict(ip("10.0.9.3"), ip("10.0.9.2"), 6, 80), PolicyVerdict::DenyIngress);
        assert_eq!(snap.policy().verdict(ip("10.0.9.2"), ip("10.0.9.3"), 6, 80), PolicyVerdict::Allow);
        // The node: its underlay address, its CIDR's network address and gateway.
        for node in ["192.0.2.100", "10.0.9.0", "10.0.9.1"] {
            assert_eq!(snap.policy().verdict(ip(node), ip("10.0.9.2"), 6, 80), PolicyVerdict::Allow, "{node}");
        }
        // A route publication keeps the policy part.
        p.publish(&RouteTable { generation: 2, routes: &routes, diff: &Diff::default() });
        assert!(!p.tables().current().policy().is_empty());
    }
}
