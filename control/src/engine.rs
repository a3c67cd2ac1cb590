//! The diff engine (control side): turns source updates into added/removed/changed routes.
//!
//! Contract:
//!
//! - **Idempotent.** Applying an update that changes nothing yields an empty [`Diff`] and no
//!   publication; a full resync with unchanged data is free.
//! - **Deterministic.** What is installed is a function of the nodes' current specs alone, not of
//!   the order they arrived in: every agent, and an agent before and after a restart, installs the
//!   same routes from the same objects.
//! - **The senior claim keeps.** Of nodes whose CIDRs overlap, the highest-ranked keeps them and
//!   the others install nothing at all (not even their CIDRs that overlap nobody): this node's own
//!   spec first (never displaced), then by source, then by [`Seniority`](crate::model::Seniority)
//!   (Kubernetes: oldest `creationTimestamp`, then UID; etcd: lowest `create_revision`; static
//!   file: earliest entry), then by name. A senior claim arriving later displaces a junior one
//!   already installed. A node that lost is retried whenever a route is freed, so deleting the
//!   winner hands the CIDR over without waiting for the loser's next update. A spec that fails a
//!   check of its own (a CIDR outside the cluster network, its own CIDRs overlapping) installs
//!   nothing either.
//! - **Last good state** covers malformed data only: an update that does not parse (a bad field,
//!   reported by the source as a [`Rejection`]) leaves the node's last spec that parsed, as this
//!   process last saw it, in place. An agent that starts while an object is malformed has no last
//!   good spec for it, so that node has no routes there until the object is fixed; agents that ran
//!   through the bad write keep the old routes until then. Every rejection logs one warning naming
//!   the node and the field (not one per resync) and counts in `rejected_objects_total`.
//! - **Local delivery.** A spec marked `local` (the node the control plane runs on) maps its CIDRs
//!   to [`NextHop::Local`], never to a tunnel.
//! - **Resync** replaces everything one source said: nodes it no longer lists are removed; other
//!   sources' nodes are untouched.
//!
//! Updates are applied in batches: [`Engine::apply`] for each update, then [`Engine::finish`],
//! which retries blocked nodes and returns the net [`Diff`] of the batch.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use ipnet::IpNet;

use crate::metrics::Metrics;
use crate::model::{NextHop, NodeKey, NodeSpec, Rejection, Route, Seniority, SourceKind, Update};

/// A claim's rank: smaller is stronger (this node's own first, then source, seniority, name).
type Rank<'a> = (bool, SourceKind, &'a Seniority, &'a str);

fn rank<'a>(key: &'a NodeKey, spec: &'a NodeSpec) -> Rank<'a> {
    (!spec.local, key.source, &spec.seniority, key.name.as_str())
}

/// The net effect of a batch on the route table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    /// CIDRs that were not routed before.
    pub added: Vec<(IpNet, Route)>,
    /// CIDRs no longer routed (with what they had).
    pub removed: Vec<(IpNet, Route)>,
    /// CIDRs whose route changed: (cidr, old, new).
    pub changed: Vec<(IpNet, Route, Route)>,
}

impl Diff {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The diff engine's state. See the module documentation for its contract.
#[derive(Debug)]
pub struct Engine {
    /// Configured cluster networks, used for sources that did not announce their own.
    cluster: Vec<IpNet>,
    /// Networks announced by sources (Flannel's config in etcd, the static file).
    networks: BTreeMap<SourceKind, Vec<IpNet>>,
    /// The latest good spec of every node a source told us about.
    desired: BTreeMap<NodeKey, NodeSpec>,
    /// The spec whose routes are installed (differs from `desired` while blocked).
    accepted: BTreeMap<NodeKey, NodeSpec>,
    /// The table: CIDR -> route.
    routes: BTreeMap<IpNet, Route>,
    /// Nodes whose desired spec could not be installed (overlap, outside the network).
    blocked: BTreeSet<NodeKey>,
    /// The last warning logged per node, so that a rejection is logged and counted once.
    warned: HashMap<NodeKey, (String, String)>,
    generation: u64,
    /// Route values at the start of the batch, for every CIDR the batch touched.
    before: BTreeMap<IpNet, Option<Route>>,
    /// A route was removed during the batch: blocked nodes may fit now.
    freed: bool,
    /// Route writes so far (inserts, replacements, removals), to tell which updates touched the
    /// table.
    writes: u64,
    metrics: Metrics,
}

impl Engine {
    /// An empty engine. `cluster` lists the networks pod CIDRs must lie in (empty: any).
    pub fn new(cluster: Vec<IpNet>, metrics: Metrics) -> Self {
        Engine {
            cluster,
            networks: BTreeMap::new(),
            desired: BTreeMap::new(),
            accepted: BTreeMap::new(),
            routes: BTreeMap::new(),
            blocked: BTreeSet::new(),
            warned: HashMap::new(),
            generation: 0,
            before: BTreeMap::new(),
            freed: false,
            writes: 0,
            metrics,
        }
    }

    /// The installed routes.
    pub fn routes(&self) -> &BTreeMap<IpNet, Route> {
        &self.routes
    }

    /// Incremented by every [`Engine::finish`] that returned a non-empty diff.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Nodes currently waiting on a conflict or a network check.
    pub fn blocked(&self) -> impl Iterator<Item = &NodeKey> {
        self.blocked.iter()
    }

    /// Applies one update to the batch in progress. Returns whether it wrote to the table (the
    /// caller uses it to attribute convergence latency to the events that mattered; a write that
    /// a later update in the same batch undoes still counts).
    pub fn apply(&mut self, update: Update) -> bool {
        let writes = self.writes;
        match update {
            Update::Upsert(source, spec) => self.upsert(source, spec),
            Update::Delete(source, name) => self.delete(&NodeKey::new(source, name)),
            Update::Resync(source, specs) => self.resync(source, specs),
            Update::Network(source, nets) => self.set_network(source, nets),
            // Not routes: the engine loop hands services to the publisher directly.
            Update::Services(..) | Update::ServicesChanged(..) => {}
            // Not routes either: the policy store keeps them.
            Update::ObjectUpsert(..) | Update::ObjectDelete(..) | Update::ObjectResync(..) => {}
        }
        self.writes != writes
    }

    /// Ends the batch: retries blocked nodes if anything was freed and returns the net diff. Bumps
    /// the generation when the diff is not empty.
    pub fn finish(&mut self) -> Diff {
        // Retrying can free routes again (a senior claim displacing a junior one).
        while std::mem::take(&mut self.freed) {
            self.retry_blocked();
        }
        let mut diff = Diff::default();
        for (net, old) in std::mem::take(&mut self.before) {
            match (old, self.routes.get(&net)) {
                (None, Some(new)) => diff.added.push((net, new.clone())),
                (Some(old), None) => diff.removed.push((net, old)),
                (Some(old), Some(new)) if old != *new => diff.changed.push((net, old, new.clone())),
                _ => {}
            }
        }
        if !diff.is_empty() {
            self.generation += 1;
            let local = self.routes.values().filter(|r| r.next_hop == NextHop::Local).count();
            let nodes = self.accepted.values().filter(|s| !s.pod_cidrs.is_empty()).count();
            self.metrics.set_routes(local, self.routes.len() - local, nodes);
        }
        diff
    }

    fn upsert(&mut self, source: SourceKind, spec: Result<NodeSpec, Rejection>) {
        match spec {
            Ok(spec) => {
                let key = NodeKey::new(source, spec.name.clone());
                self.desired.insert(key.clone(), spec.normalized());
                self.try_install(&key);
            }
            Err(rejection) => {
                // Keep the last good spec (desired and accepted stay as they were).
                let key = NodeKey::new(source, rejection.node.clone());
                self.warn_once(&key, rejection.field, rejection.reason);
            }
        }
    }

    fn delete(&mut self, key: &NodeKey) {
        self.desired.remove(key);
        self.blocked.remove(key);
        self.warned.remove(key);
        if let Some(old) = self.accepted.remove(key) {
            for net in &old.pod_cidrs {
                self.remove_route(*net, key);
            }
            if !old.pod_cidrs.is_empty() {
                tracing::info!(source = %key.source, node = %key.name, cidrs = ?old.pod_cidrs, "node removed");
            }
        }
    }

    fn resync(&mut self, source: SourceKind, specs: Vec<Result<NodeSpec, Rejection>>) {
        let listed: BTreeSet<&str> = specs
            .iter()
            .map(|s| match s {
                Ok(spec) => spec.name.as_str(),
                Err(r) => r.node.as_str(),
            })
            .collect();
        let stale: Vec<NodeKey> = self
            .desired
            .keys()
            .chain(self.accepted.keys())
            .chain(self.warned.keys())
            .filter(|k| k.source == source && !listed.contains(k.name.as_str()))
            .cloned()
            .collect();
        for key in stale {
            self.delete(&key);
        }
        for spec in specs {
            self.upsert(source, spec);
        }
    }

    fn set_network(&mut self, source: SourceKind, nets: Vec<IpNet>) {
        if self.networks.get(&source) == Some(&nets) {
            return;
        }
        self.networks.insert(source, nets);
        // Re-check every node of the source against the new network.
        let keys: Vec<NodeKey> = self.desired.keys().filter(|k| k.source == source).cloned().collect();
        for key in keys {
            self.accepted
                .remove(&key)
                .into_iter()
                .flat_map(|s| s.pod_cidrs)
                .for_each(|net| self.remove_route(net, &key));
            self.try_install(&key);
        }
    }

    /// Installs `desired[key]` if it is valid and no senior claim overlaps it, displacing the
    /// junior claims it overlaps; otherwise uninstalls the node (a loser installs nothing), blocks
    /// it and warns (once).
    fn try_install(&mut self, key: &NodeKey) -> bool {
        let Some(spec) = self.desired.get(key) else { return false };
        if self.accepted.get(key) == Some(spec) {
            self.blocked.remove(key);
            self.warned.remove(key);
            return true;
        }
        let juniors = match self.check(key, spec) {
            Ok(juniors) => juniors,
            Err(reason) => {
                self.uninstall(key);
                self.blocked.insert(key.clone());
                self.warn_once(key, cidr_field(key.source).to_owned(), reason);
                return false;
            }
        };
        let spec = spec.clone();
        for junior in juniors {
            let reason = format!("its CIDRs overlap those of node {key}, whose claim is senior");
            self.uninstall(&junior);
            self.blocked.insert(junior.clone());
            self.warn_once(&junior, cidr_field(junior.source).to_owned(), reason);
        }
        let route = Route { source: key.source, node: Arc::from(key.name.as_str()), next_hop: spec.next_hop() };
        if let Some(old) = self.accepted.remove(key) {
            for net in old.pod_cidrs.iter().filter(|n| !spec.pod_cidrs.contains(n)) {
                self.remove_route(*net, key);
            }
        }
        for net in &spec.pod_cidrs {
            self.set_route(*net, route.clone());
        }
        if !spec.pod_cidrs.is_empty() {
            tracing::info!(
                source = %key.source, node = %key.name, cidrs = ?spec.pod_cidrs, next_hop = ?route.next_hop,
                "node installed"
            );
        }
        self.accepted.insert(key.clone(), spec);
        self.blocked.remove(key);
        self.warned.remove(key);
        true
    }

    /// Removes every route `key` has installed.
    fn uninstall(&mut self, key: &NodeKey) {
        if let Some(old) = self.accepted.remove(key) {
            for net in &old.pod_cidrs {
                self.remove_route(*net, key);
            }
        }
    }

    /// Why `spec` cannot be installed for `key`, if it cannot; else the installed junior claims it
    /// overlaps (to displace).
    fn check(&self, key: &NodeKey, spec: &NodeSpec) -> Result<Vec<NodeKey>, String> {
        let nets = self.networks.get(&key.source).filter(|n| !n.is_empty()).unwrap_or(&self.cluster);
        for cidr in &spec.pod_cidrs {
            let same_family: Vec<&IpNet> = nets.iter().filter(|n| is_same_family(n, cidr)).collect();
            if !same_family.is_empty() && !same_family.iter().any(|n| n.contains(cidr)) {
                return Err(format!("{cidr} is outside the cluster network ({})", join(&same_family)));
            }
        }
        for (i, a) in spec.pod_cidrs.iter().enumerate() {
            if let Some(b) = spec.pod_cidrs[i + 1..].iter().find(|b| overlaps(a, b)) {
                return Err(format!("its own CIDRs {a} and {b} overlap"));
            }
        }
        let mine = rank(key, spec);
        let mut juniors = Vec::new();
        for cidr in &spec.pod_cidrs {
            for (other, route) in
                self.overlapping(*cidr).filter(|(_, r)| r.source != key.source || *r.node != *key.name)
            {
                let owner = NodeKey::new(route.source, &*route.node);
                // An installed route always has its owner's accepted spec; without one it is treated
                // as senior (never displaced by guesswork).
                let senior = self.accepted.get(&owner).is_none_or(|s| rank(&owner, s) < mine);
                if senior {
                    return Err(format!(
                        "{cidr} overlaps {other} of node {}/{}, whose claim is senior",
                        route.source, route.node
                    ));
                }
                if !juniors.contains(&owner) {
                    juniors.push(owner);
                }
            }
        }
        Ok(juniors)
    }

    /// Installed routes overlapping `net` (containing it, equal, or inside it).
    fn overlapping(&self, net: IpNet) -> impl Iterator<Item = (IpNet, &Route)> + '_ {
        let supernets = (0..=net.prefix_len())
            .filter_map(move |len| IpNet::new(net.addr(), len).ok().map(|n| n.trunc()))
            .filter_map(move |n| self.routes.get(&n).map(|r| (n, r)));
        let last = IpNet::new(net.broadcast(), net.max_prefix_len()).unwrap_or(net);
        let subnets = self
            .routes
            .range((Bound::Excluded(net), Bound::Included(last)))
            .filter(move |(n, _)| net.contains(*n))
            .map(|(n, r)| (*n, r));
        supernets.chain(subnets)
    }

    fn retry_blocked(&mut self) {
        loop {
            let mut progress = false;
            // Senior claims first: fewer installs that a senior one then displaces.
            let mut blocked: Vec<NodeKey> = self.blocked.iter().cloned().collect();
            blocked.sort_by(|a, b| match (self.desired.get(a), self.desired.get(b)) {
                (Some(sa), Some(sb)) => rank(a, sa).cmp(&rank(b, sb)),
                _ => a.cmp(b),
            });
            for key in blocked {
                let can = self.desired.get(&key).is_some_and(|spec| self.check(&key, spec).is_ok());
                if can && self.try_install(&key) {
                    progress = true;
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn set_route(&mut self, net: IpNet, route: Route) {
        match self.routes.entry(net) {
            Entry::Occupied(mut e) => {
                if *e.get() != route {
                    self.before.entry(net).or_insert_with(|| Some(e.get().clone()));
                    e.insert(route);
                    self.writes += 1;
                }
            }
            Entry::Vacant(e) => {
                self.before.entry(net).or_insert(None);
                e.insert(route);
                self.writes += 1;
            }
        }
    }

    fn remove_route(&mut self, net: IpNet, owner: &NodeKey) {
        let Entry::Occupied(e) = self.routes.entry(net) else { return };
        if e.get().source != owner.source || *e.get().node != *owner.name {
            return;
        }
        let old = e.remove();
        self.before.entry(net).or_insert(Some(old));
        self.freed = true;
        self.writes += 1;
    }

    fn warn_once(&mut self, key: &NodeKey, field: String, reason: String) {
        let entry = (field, reason);
        if self.warned.get(key) == Some(&entry) {
            return;
        }
        let (field, reason) = &entry;
        let kept = if self.accepted.contains_key(key) { "keeping its last good state" } else { "node not installed" };
        tracing::warn!(source = %key.source, node = %key.name, field = %field, reason = %reason, "rejected node data; {kept}");
        self.metrics.rejected(key.source, field);
        self.warned.insert(key.clone(), entry);
    }
}

/// The name of the pod-CIDR field in each source's objects, for warnings about CIDR conflicts.
fn cidr_field(source: SourceKind) -> &'static str {
    match source {
        SourceKind::Kube => "spec.podCIDRs",
        SourceKind::Etcd => "key",
        SourceKind::Static => "pod_cidrs",
    }
}

fn is_same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!((a, b), (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_)))
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

fn join(nets: &[&IpNet]) -> String {
    nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use ferry_encap::TunnelKind;
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    fn spec(name: &str, cidrs: &[&str], underlay: &str) -> NodeSpec {
        NodeSpec {
            name: name.to_owned(),
            pod_cidrs: cidrs.iter().map(|c| net(c)).collect(),
            underlay: underlay.parse().expect("ip"),
            other_underlay: None,
            vtep_mac: None,
            vni: 1,
            tunnel: TunnelKind::Vxlan,
            port: 4789,
            local: false,
            seniority: Seniority::default(),
        }
    }

    /// A spec whose Kubernetes object was created at `created` with `uid`.
    fn aged(name: &str, cidrs: &[&str], underlay: &str, created: i64, uid: &str) -> NodeSpec {
        NodeSpec { seniority: Seniority { created, uid: uid.to_owned() }, ..spec(name, cidrs, underlay) }
    }

    fn batch(e: &mut Engine, updates: Vec<Update>) -> Diff {
        for u in updates {
            e.apply(u);
        }
        e.finish()
    }

    fn up(s: NodeSpec) -> Update {
        Update::Upsert(SourceKind::Kube, Ok(s))
    }

    fn underlay_of(e: &Engine, cidr: &str) -> Option<IpAddr> {
        match e.routes().get(&net(cidr))?.next_hop {
            NextHop::Tunnel(t) => Some(t.underlay),
            NextHop::Local => None,
        }
    }

    #[test]
    fn add_change_remove_and_idempotence() {
        let mut e = Engine::new(vec![], Metrics::new());
        let d = batch(&mut e, vec![up(spec("a", &["10.0.1.0/24", "fd00:1::/64"], "192.0.2.1"))]);
        assert_eq!((d.added.len(), d.removed.len(), d.changed.len()), (2, 0, 0));
        assert_eq!(e.generation(), 1);
        // Same again: nothing, and the update is not counted as one that mattered.
        assert!(!e.apply(up(spec("a", &["fd00:1::/64", "10.0.1.0/24"], "192.0.2.1"))));
        assert!(e.finish().is_empty());
        assert_eq!(e.generation(), 1);
        // Underlay moves: two changes.
        let d = batch(&mut e, vec![up(spec("a", &["10.0.1.0/24", "fd00:1::/64"], "192.0.2.9"))]);
        assert_eq!((d.added.len(), d.removed.len(), d.changed.len()), (0, 0, 2));
        assert_eq!(underlay_of(&e, "10.0.1.0/24"), Some("192.0.2.9".parse().expect("ip")));
        // One CIDR dropped.
        let d = batch(&mut e, vec![up(spec("a", &["10.0.1.0/24"], "192.0.2.9"))]);
        assert_eq!(d.removed.len(), 1);
        let d = batch(&mut e, vec![Update::Delete(SourceKind::Kube, "a".into())]);
        assert_eq!(d.removed.len(), 1);
        assert!(e.routes().is_empty());
        // Add then delete within one batch: no net change, no publication.
        let d = batch(
            &mut e,
            vec![up(spec("b", &["10.0.2.0/24"], "192.0.2.2")), Update::Delete(SourceKind::Kube, "b".into())],
        );
        assert!(d.is_empty());
    }

    #[test]
    fn own_node_is_local_delivery() {
        let mut e = Engine::new(vec![], Metrics::new());
        let mut me = spec("me", &["10.0.9.0/24"], "192.0.2.9");
        me.local = true;
        batch(&mut e, vec![up(me)]);
        assert_eq!(e.routes()[&net("10.0.9.0/24")].next_hop, NextHop::Local);
    }

    #[test]
    fn overlap_keeps_senior_warns_once_and_hands_over_on_delete() {
        let m = Metrics::new();
        let mut e = Engine::new(vec![], m.clone());
        batch(&mut e, vec![up(spec("a", &["10.0.0.0/23"], "192.0.2.1"))]);
        // b claims a subnet of a's: refused, a keeps it (same age: the name ranks).
        let d = batch(&mut e, vec![up(spec("b", &["10.0.1.0/24"], "192.0.2.2"))]);
        assert!(d.is_empty());
        assert_eq!(m.rejected_total(SourceKind::Kube, "spec.podCIDRs"), 1);
        // The same data again (a resync, an unrelated Node update): no second warning.
        batch(&mut e, vec![up(spec("b", &["10.0.1.0/24"], "192.0.2.2"))]);
        assert_eq!(m.rejected_total(SourceKind::Kube, "spec.podCIDRs"), 1);
        assert_eq!(e.blocked().count(), 1);
        // a goes away: b gets its CIDR in the same batch.
        let d = batch(&mut e, vec![Update::Delete(SourceKind::Kube, "a".into())]);
        assert_eq!((d.added.len(), d.removed.len()), (1, 1));
        assert_eq!(underlay_of(&e, "10.0.1.0/24"), Some("192.0.2.2".parse().expect("ip")));
        assert_eq!(e.blocked().count(), 0);
    }

    #[test]
    fn bad_update_keeps_last_good_state() {
        let m = Metrics::new();
        let mut e = Engine::new(vec![net("10.0.0.0/16")], m.clone());
        batch(&mut e, vec![up(spec("a", &["10.0.1.0/24"], "192.0.2.1"))]);
        // Moving outside the cluster network parses, but fails a check: the node installs nothing
        // (as an agent started now would), and one warning is counted.
        let d = batch(&mut e, vec![up(spec("a", &["10.9.1.0/24"], "192.0.2.1"))]);
        assert_eq!((d.added.len(), d.removed.len()), (0, 1));
        assert!(e.routes().is_empty());
        assert_eq!(m.rejected_total(SourceKind::Kube, "spec.podCIDRs"), 1);
        batch(&mut e, vec![up(spec("a", &["10.0.1.0/24"], "192.0.2.1"))]);
        assert!(e.routes().contains_key(&net("10.0.1.0/24")));
        // A malformed annotation: refused by the parser, old route stays.
        let rej = Rejection::new("a", "metadata.annotations[flannel.alpha.coreos.com/backend-data]", "not JSON");
        let d = batch(&mut e, vec![Update::Upsert(SourceKind::Kube, Err(rej.clone()))]);
        assert!(d.is_empty());
        batch(&mut e, vec![Update::Upsert(SourceKind::Kube, Err(rej))]);
        assert_eq!(
            m.rejected_total(SourceKind::Kube, "metadata.annotations[flannel.alpha.coreos.com/backend-data]"),
            1
        );
        assert!(e.routes().contains_key(&net("10.0.1.0/24")));
        // A resync that lists the node only as rejected keeps it too.
        let d = batch(
            &mut e,
            vec![Update::Resync(SourceKind::Kube, vec![Err(Rejection::new("a", "spec.podCIDRs", "garbage"))])],
        );
        assert!(d.is_empty());
        // Good data again: accepted.
        let d = batch(&mut e, vec![up(spec("a", &["10.0.2.0/24"], "192.0.2.1"))]);
        assert_eq!((d.added.len(), d.removed.len()), (1, 1));
    }

    #[test]
    fn resync_removes_stale_nodes_of_that_source_only() {
        let mut e = Engine::new(vec![], Metrics::new());
        batch(
            &mut e,
            vec![
                up(spec("a", &["10.0.1.0/24"], "192.0.2.1")),
                up(spec("b", &["10.0.2.0/24"], "192.0.2.2")),
                Update::Upsert(SourceKind::Static, Ok(spec("s", &["10.0.3.0/24"], "192.0.2.3"))),
            ],
        );
        let d =
            batch(&mut e, vec![Update::Resync(SourceKind::Kube, vec![Ok(spec("b", &["10.0.2.0/24"], "192.0.2.2"))])]);
        assert_eq!(d.removed.len(), 1);
        assert_eq!(d.removed[0].0, net("10.0.1.0/24"));
        assert_eq!(e.routes().len(), 2);
    }

    #[test]
    fn network_announcement_rechecks_nodes() {
        let m = Metrics::new();
        let mut e = Engine::new(vec![], m.clone());
        batch(&mut e, vec![Update::Upsert(SourceKind::Etcd, Ok(spec("10.5.1.0-24", &["10.5.1.0/24"], "192.0.2.1")))]);
        let d = batch(&mut e, vec![Update::Network(SourceKind::Etcd, vec![net("10.6.0.0/16")])]);
        assert_eq!(d.removed.len(), 1);
        assert_eq!(m.rejected_total(SourceKind::Etcd, "key"), 1);
        let d = batch(&mut e, vec![Update::Network(SourceKind::Etcd, vec![net("10.5.0.0/16")])]);
        assert_eq!(d.added.len(), 1);
    }

    // Property: whatever the updates, the table never holds overlapping CIDRs, every route belongs
    // to an accepted node with that CIDR, the diff turns the old table into the new one, and an
    // update applied again right after itself changes nothing.
    fn arb_update() -> impl Strategy<Value = Update> {
        let cidrs = prop::sample::subsequence(
            vec!["10.0.0.0/16", "10.0.0.0/23", "10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24", "10.1.0.0/24", "fd00::/64"],
            0..3,
        );
        let name = prop::sample::select(vec!["a", "b", "c", "d"]);
        let source = prop::sample::select(vec![SourceKind::Kube, SourceKind::Static]);
        let under = prop::sample::select(vec!["192.0.2.1", "192.0.2.2"]);
        prop_oneof![
            4 => (source.clone(), name.clone(), cidrs.clone(), under, any::<bool>())
                .prop_map(|(src, n, c, u, local)| { let mut s = spec(n, &c, u); s.local = local && n == "a"; Update::Upsert(src, Ok(s)) }),
            1 => (source.clone(), name.clone()).prop_map(|(src, n)| Update::Upsert(src, Err(Rejection::new(n, "f", "bad")))),
            2 => (source.clone(), name.clone()).prop_map(|(src, n)| Update::Delete(src, n.to_owned())),
            1 => (source.clone(), prop::collection::vec((name, cidrs), 0..4)).prop_map(|(src, v)| Update::Resync(
                src,
                v.into_iter().map(|(n, c)| Ok(spec(n, &c, "192.0.2.1"))).collect(),
            )),
            1 => (source, prop::sample::select(vec!["", "10.0.0.0/16", "10.0.0.0/8"])).prop_map(|(src, n)| {
                Update::Network(src, if n.is_empty() { vec![] } else { vec![net(n)] })
            }),
        ]
    }

    proptest! {
        #[test]
        fn engine_invariants(batches in prop::collection::vec(prop::collection::vec(arb_update(), 1..5), 1..12)) {
            let mut e = Engine::new(vec![], Metrics::new());
            for b in batches {
                let old = e.routes().clone();
                let d = batch(&mut e, b.clone());
                let mut rebuilt = old;
                for (n, _) in &d.removed { rebuilt.remove(n); }
                for (n, r) in &d.added { prop_assert!(rebuilt.insert(*n, r.clone()).is_none()); }
                for (n, o, r) in &d.changed { prop_assert_eq!(rebuilt.insert(*n, r.clone()), Some(o.clone())); }
                prop_assert_eq!(&rebuilt, e.routes());
                let nets: Vec<&IpNet> = e.routes().keys().collect();
                for (i, a) in nets.iter().enumerate() {
                    for b in &nets[i + 1..] {
                        prop_assert!(!overlaps(a, b), "{} and {} both installed", a, b);
                    }
                }
                for (n, r) in e.routes() {
                    let key = NodeKey::new(r.source, r.node.to_string());
                    let acc = e.accepted.get(&key);
                    prop_assert!(acc.is_some_and(|s| s.pod_cidrs.contains(n) && s.next_hop() == r.next_hop));
                }
                for (k, s) in &e.accepted {
                    for n in &s.pod_cidrs {
                        prop_assert!(e.routes().get(n).is_some_and(|r| r.source == k.source && *r.node == *k.name));
                    }
                }
                // Idempotence: any update, applied again right after itself, changes nothing.
                for u in b {
                    batch(&mut e, vec![u.clone()]);
                    let again = batch(&mut e, vec![u.clone()]);
                    prop_assert!(again.is_empty(), "{:?} applied twice changed {:?}", u, again);
                }
            }
        }
    }

    /// The route table as comparable values.
    fn table(e: &Engine) -> Vec<(IpNet, String, Option<IpAddr>)> {
        e.routes()
            .iter()
            .map(|(n, r)| {
                let u = match r.next_hop {
                    NextHop::Tunnel(t) => Some(t.underlay),
                    NextHop::Local => None,
                };
                (*n, format!("{}/{}", r.source, r.node), u)
            })
            .collect()
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for i in 0..=p.len() {
                let mut q = p.clone();
                q.insert(i, n - 1);
                out.push(q);
            }
        }
        out
    }

    /// Issue 18: the same conflicting objects, applied in every order, one by one or as one list
    /// after a restart, give identical tables: the senior claim keeps, a loser installs nothing, this
    /// node's own CIDR is never displaced. Deleting the winner hands over the same way everywhere.
    #[test]
    fn overlap_resolution_is_the_same_in_every_order_and_after_a_restart() {
        let mut me = aged("me", &["10.0.9.0/24"], "192.0.2.9", 300, "u-me");
        me.local = true;
        let specs = [
            // A real node, and an older-named but younger object claiming part of it (the issue's
            // `aa-...` node, which won on a restarted agent only because a fresh list is sorted).
            aged("real", &["10.0.1.0/24"], "192.0.2.1", 100, "u-real"),
            aged("aa-squatter", &["10.0.1.128/25", "10.0.5.0/24"], "192.0.2.66", 200, "u-sq"),
            // Same second as `real`: the UID decides (u-older < u-real).
            aged("zz-same-second", &["10.0.0.0/16"], "192.0.2.77", 100, "u-older"),
            // Older than me, claiming my CIDR: never displaces this node's own.
            aged("ancient", &["10.0.9.0/25"], "192.0.2.88", 1, "u-anc"),
            me,
        ];
        // Ranked: me (this node), ancient (created 1), zz-same-second (100, u-older), real (100,
        // u-real), aa-squatter (200). me installs; ancient and zz-same-second overlap me and lose;
        // real installs; aa-squatter overlaps real and loses, so even its free 10.0.5.0/24 is not
        // installed.
        let want = vec![
            (net("10.0.1.0/24"), "kube/real".to_owned(), Some("192.0.2.1".parse().expect("ip"))),
            (net("10.0.9.0/24"), "kube/me".to_owned(), None),
        ];
        let mut want_after_delete = None;
        for order in permutations(specs.len()) {
            // One update per batch, in this order.
            let mut e = Engine::new(vec![], Metrics::new());
            for &i in &order {
                batch(&mut e, vec![up(specs[i].clone())]);
            }
            assert_eq!(table(&e), want, "one by one in order {order:?}");
            // A restart: a fresh engine gets the whole list at once, in this order.
            let mut fresh = Engine::new(vec![], Metrics::new());
            let list = order.iter().map(|&i| Ok(specs[i].clone())).collect();
            batch(&mut fresh, vec![Update::Resync(SourceKind::Kube, list)]);
            assert_eq!(table(&fresh), want, "after a restart, listed in order {order:?}");
            // Deleting `real` hands 10.0.1.0/24 over identically on both.
            for engine in [&mut e, &mut fresh] {
                batch(engine, vec![Update::Delete(SourceKind::Kube, "real".into())]);
                let t = table(engine);
                match &want_after_delete {
                    None => want_after_delete = Some(t),
                    Some(w) => assert_eq!(&t, w, "after deleting the winner, order {order:?}"),
                }
            }
        }
        // Without `real`, the squatter is the senior claim left on 10.0.1.128/25 and installs both
        // its CIDRs.
        let after = want_after_delete.expect("ran");
        assert!(after.iter().any(|(n, o, _)| *n == net("10.0.5.0/24") && o == "kube/aa-squatter"), "{after:?}");
        assert!(after.iter().any(|(n, o, _)| *n == net("10.0.1.128/25") && o == "kube/aa-squatter"), "{after:?}");
    }

    #[test]
    fn a_senior_claim_arriving_later_displaces_the_junior_one() {
        let m = Metrics::new();
        let mut e = Engine::new(vec![], m.clone());
        batch(&mut e, vec![up(aged("young", &["10.0.1.0/24", "10.0.2.0/24"], "192.0.2.2", 50, "u2"))]);
        assert_eq!(e.routes().len(), 2);
        let d = batch(&mut e, vec![up(aged("old", &["10.0.1.0/25"], "192.0.2.1", 10, "u1"))]);
        assert_eq!((d.added.len(), d.removed.len()), (1, 2), "the junior claim installs nothing: {d:?}");
        assert_eq!(underlay_of(&e, "10.0.1.0/25"), Some("192.0.2.1".parse().expect("ip")));
        assert_eq!(e.blocked().collect::<Vec<_>>(), [&NodeKey::new(SourceKind::Kube, "young")]);
        assert_eq!(m.rejected_total(SourceKind::Kube, "spec.podCIDRs"), 1);
    }
}
