//! The policy compiler (control side) and what it publishes (hot path): selectors and policies
//! turned into per-pod rule tables for this node's pods, both directions.
//!
//! # Identities
//!
//! Pods with the same namespace, labels and named ports are indistinguishable to every policy, so
//! they share one *identity* (Cilium's idea). The published [`PolicyTables`] hold:
//!
//! - every pod address in the cluster -> its identity and, for this node's pods that policies
//!   select, the index of their rules (one lookup in a flat table keyed by the address as an
//!   integer: [`super::flat`]);
//! - for each such local pod, its rules per direction: `None` when no policy selects the pod for
//!   that direction (open), else the ports open to every peer, to every pod, per peer identity
//!   (a flat table identity -> one of the pod's few distinct port sets), and the `ipBlock` rules.
//!
//! A verdict is two address lookups (source and destination) and at most one identity lookup
//! per isolated direction; the hot path never evaluates a selector.
//!
//! # Incremental
//!
//! [`PolicyCompiler`] keeps the objects and recomputes only what a change touches:
//!
//! - a pod's labels or ports change: its addresses move to another identity (made if new: its
//!   entries are added to each local pod's tables by checking it against the rules of the policies
//!   selecting that pod; dropped when its last pod goes); if the pod is local, its own tables are
//!   recomputed (the policies selecting it may differ);
//! - a pod's addresses change: the address map only;
//! - a policy changes: the local pods it selected before or selects now are recomputed;
//! - a namespace's labels change: every local pod (namespace selectors are everywhere).
//!
//! Every [`PolicyCompiler::build`] publishes a new generation; the data plane's connection
//! tracking re-evaluates a connection whose verdict was cached under another generation.
//!
//! Named ports resolve against the pod receiving the traffic: for ingress the local pod (at
//! compile time), for egress the destination's identity (also at compile time for pod peers; at
//! lookup for an `ipBlock` rule with a named port, which then matches pod destinations only).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::flat::FlatMap;
use super::spec::{
    Direction, Labels, NAMESPACE_NAME_LABEL, NamedPort, Namespaces, Peer, PodSpec, Policy, PolicyProtocol, PortMatch,
    Rule,
};

/// A multiply-and-fold hasher for the hot path's small keys (addresses, identities): `std`'s
/// SipHash costs more than the rest of a lookup.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// The compiler's maps, keyed by names and labels from the API: foldhash, randomly seeded per
/// process (so crafted names cannot collide on purpose) and several times faster than SipHash on
/// short strings, which the full compile hashes some hundred thousand times.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A peer identity (see the module doc).
pub type Identity = u32;

/// Which ports of which protocols a rule set allows toward one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSet {
    /// Every protocol, every port (a rule without `ports`): ICMP and the rest included.
    pub all: bool,
    /// `(protocol number, first, last)`, sorted.
    pub ranges: Vec<(u8, u16, u16)>,
    /// Named ports left to resolve against the destination's identity (egress `ipBlock` rules).
    pub named: Vec<(u8, Arc<str>)>,
}

impl PortSet {
    /// Whether it allows nothing.
    pub fn is_empty(&self) -> bool {
        !self.all && self.ranges.is_empty() && self.named.is_empty()
    }

    /// Whether it allows `proto`/`port` (numeric part only).
    #[inline]
    pub fn allows(&self, proto: u8, port: u16) -> bool {
        self.all || self.ranges.iter().any(|&(p, a, b)| p == proto && a <= port && port <= b)
    }

    fn add(&mut self, proto: u8, a: u16, b: u16) {
        if !self.ranges.contains(&(proto, a, b)) {
            self.ranges.push((proto, a, b));
            self.ranges.sort_unstable();
        }
    }

    fn union(&mut self, o: &PortSet) {
        self.all |= o.all;
        for &(p, a, b) in &o.ranges {
            self.add(p, a, b);
        }
        for n in &o.named {
            if !self.named.contains(n) {
                self.named.push(n.clone());
            }
        }
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.all {
            return f.write_str("all ports");
        }
        let name = |p: u8| PolicyProtocol::from_number(p).map_or("?", PolicyProtocol::name);
        let mut parts: Vec<String> = self
            .ranges
            .iter()
            .map(|&(p, a, b)| if a == b { format!("{}/{a}", name(p)) } else { format!("{}/{a}-{b}", name(p)) })
            .collect();
        parts.extend(self.named.iter().map(|(p, n)| format!("{}/{n}", name(*p))));
        if parts.is_empty() {
            return f.write_str("no ports");
        }
        f.write_str(&parts.join(","))
    }
}

/// One direction's compiled rules of a local pod that policies select for that direction.
#[derive(Debug, Clone, Default)]
pub struct DirRules {
    /// Ports open to every peer.
    pub any: PortSet,
    /// Ports open to every pod (every address with an identity): a peer `namespaceSelector: {}`
    /// with no or an empty `podSelector`, kept as one entry rather than one per identity.
    pub any_pod: PortSet,
    /// Ports open per peer identity.
    pub by_identity: FastMap<Identity, PortSet>,
    /// `ipBlock` rules: `(cidr, except, ports)`.
    pub blocks: Vec<(IpNet, Vec<IpNet>, PortSet)>,
}

/// Where a compiled rule came from, for `ferry policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOrigin {
    /// The direction.
    pub direction: Direction,
    /// `namespace/name` of the policy.
    pub policy: String,
    /// The rule's index in the policy's `ingress` or `egress` list; `None` for a policy with no
    /// rules in that direction (it isolates and allows nothing).
    pub rule: Option<usize>,
    /// The peers, as text (`all peers` for a rule without).
    pub peers: String,
    /// The ports, as text.
    pub ports: String,
}

/// A local pod's compiled rules.
#[derive(Debug, Clone)]
pub struct PodRules {
    /// `namespace/name`.
    pub pod: String,
    /// Ingress: `None` when no policy selects the pod for ingress.
    pub ingress: Option<DirRules>,
    /// Egress: likewise.
    pub egress: Option<DirRules>,
    /// Every rule that contributed, in policy order.
    pub origins: Vec<RuleOrigin>,
}

impl PodRules {
    /// One direction's rules.
    pub fn rules(&self, d: Direction) -> Option<&DirRules> {
        match d {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// Which local pods' rules a verdict looked at: the source pod's egress rules in the high 16
/// bits, the destination pod's ingress rules in the low 16, each 1 + the index of that pod's
/// rules in the tables that decided ([`PolicyTables::rules_at`]), 0 when that side's rules were
/// not looked at (not a local pod policies select in that direction, the pod itself, its node).
/// Kept with a connection's policy records, so that its flow records name the policies (a
/// node's pods beyond 65,535 would wrap: a node has at most 65,535 ports).
pub type PolicyRef = u32;

/// What a policy verdict says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// Allowed (or nothing applies).
    Allow,
    /// The source pod's egress rules refuse it.
    DenyEgress,
    /// The destination pod's ingress rules refuse it.
    DenyIngress,
}

/// One address's entry in the published tables.
#[derive(Debug, Clone, Copy, Default)]
struct AddrEntry {
    /// Its pod's identity (0: none; identities start at 1).
    identity: Identity,
    /// 1 + the index of its pod's rules in [`PolicyTables::local`] (0: not a local pod that
    /// policies select).
    local: u32,
}

/// An `ipBlock` rule: `(cidr, except, ports)`.
type IpBlockRule = (IpNet, Vec<IpNet>, PortSet);

/// How many port ranges a [`HotPorts`] keeps in place (a rule rarely lists more).
const INLINE_RANGES: usize = 2;

/// A [`PortSet`]'s numeric part as the hot path reads it: its first ranges in place, so that
/// checking a port costs no pointer to follow.
#[derive(Debug, Clone, Default)]
struct HotPorts {
    all: bool,
    n: u8,
    inline: [(u8, u16, u16); INLINE_RANGES],
    more: Box<[(u8, u16, u16)]>,
}

impl HotPorts {
    fn new(ps: &PortSet) -> Self {
        let mut h = HotPorts { all: ps.all, ..Default::default() };
        let (first, more) = ps.ranges.split_at(ps.ranges.len().min(INLINE_RANGES));
        h.inline[..first.len()].copy_from_slice(first);
        h.n = first.len() as u8;
        h.more = more.into();
        h
    }

    #[inline]
    fn allows(&self, proto: u8, port: u16) -> bool {
        let hit = |&(p, a, b): &(u8, u16, u16)| p == proto && a <= port && port <= b;
        self.all
            || self.inline.iter().take(usize::from(self.n)).any(hit)
            || (!self.more.is_empty() && self.more.iter().any(hit))
    }
}

/// One direction of a local pod's rules, as the hot path reads them (made from [`DirRules`]):
/// what every packet reads first, the rest behind `cold`.
#[derive(Debug, Clone, Default)]
struct HotDir {
    /// Peer identity -> index into `sets`.
    by_identity: FlatMap<u32, u32>,
    /// The distinct port sets of `by_identity` (peers mostly share a handful).
    sets: Box<[HotPorts]>,
    /// Ports open to every peer, and to every pod.
    any: HotPorts,
    any_pod: HotPorts,
    /// The `ipBlock` rules (and any named ports they leave to resolve); `None` without any.
    blocks: Option<Box<[IpBlockRule]>>,
}

impl HotDir {
    fn new(d: &DirRules) -> Self {
        let mut index: HashMap<&PortSet, u32> = HashMap::new();
        let mut sets = Vec::new();
        let by_identity = FlatMap::from_entries(d.by_identity.iter().map(|(id, ps)| {
            let i = *index.entry(ps).or_insert_with(|| {
                sets.push(HotPorts::new(ps));
                (sets.len() - 1) as u32
            });
            (*id, i)
        }));
        HotDir {
            by_identity,
            sets: sets.into(),
            any: HotPorts::new(&d.any),
            any_pod: HotPorts::new(&d.any_pod),
            blocks: (!d.blocks.is_empty()).then(|| d.blocks.clone().into()),
        }
    }
}

/// A local pod's rules as the hot path reads them.
#[derive(Debug, Clone)]
struct HotPod {
    ingress: Option<HotDir>,
    egress: Option<HotDir>,
}

/// A local pod's compiled rules, and the same in the hot path's form.
#[derive(Debug)]
struct CompiledPod {
    rules: Arc<PodRules>,
    hot: HotPod,
}

impl CompiledPod {
    fn new(rules: PodRules) -> Arc<Self> {
        Arc::new(CompiledPod {
            hot: HotPod {
                ingress: rules.ingress.as_ref().map(HotDir::new),
                egress: rules.egress.as_ref().map(HotDir::new),
            },
            rules: Arc::new(rules),
        })
    }
}

/// The published policy part of the snapshot (hot path reads).
#[derive(Debug, Default)]
pub struct PolicyTables {
    generation: u64,
    /// Every pod address -> its identity and local rules, by address family.
    v4: FlatMap<u32, AddrEntry>,
    v6: FlatMap<u128, AddrEntry>,
    /// Each identity's named ports (for egress `ipBlock` rules with a named port).
    identity_ports: FastMap<Identity, Arc<[NamedPort]>>,
    /// This node's pods that some policy selects, in place (no pointer to follow per packet),
    /// and the same as compiled, for [`Self::local`] and [`Self::pods`].
    hot: Vec<HotPod>,
    local: Vec<Arc<PodRules>>,
    /// This node's own addresses: always allowed both ways.
    node_addrs: Vec<IpAddr>,
}

impl PolicyTables {
    /// Which compilation this is (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether no local pod is isolated in any direction: the data plane skips the stage.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    #[inline]
    fn entry(&self, a: IpAddr) -> AddrEntry {
        match a {
            IpAddr::V4(a) => self.v4.get(a.to_bits()),
            IpAddr::V6(a) => self.v6.get(a.to_bits()),
        }
        .unwrap_or_default()
    }

    /// The local pod of an entry, if policies select it (`local` 0 wraps to an index past the end).
    #[inline]
    fn local_of(&self, e: AddrEntry) -> Option<&HotPod> {
        self.hot.get((e.local as usize).wrapping_sub(1))
    }

    /// The rules a [`PolicyRef`] half names (1 + their index; 0 and past the end: none).
    pub fn rules_at(&self, local: u32) -> Option<&PodRules> {
        self.local.get((local as usize).wrapping_sub(1)).map(|r| &**r)
    }

    /// The rules of the local pod with this address, if policies select it.
    pub fn local(&self, addr: IpAddr) -> Option<&PodRules> {
        self.local.get((self.entry(addr).local as usize).wrapping_sub(1)).map(|r| &**r)
    }

    /// Every local pod with rules, once each, by name.
    pub fn pods(&self) -> Vec<Arc<PodRules>> {
        let mut out: Vec<Arc<PodRules>> = self.local.iter().map(Arc::clone).collect();
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }

    /// The identity of a pod address.
    pub fn identity(&self, addr: IpAddr) -> Option<Identity> {
        Some(self.entry(addr).identity).filter(|i| *i != 0)
    }

    /// Whether `rules` let traffic with `peer` (of identity `id`, 0 for none) through on
    /// `proto`/`port` (`port` 0 for protocols without ports).
    #[inline]
    fn allows(&self, rules: &HotDir, peer: IpAddr, id: Identity, proto: u8, port: u16) -> bool {
        if rules.any.allows(proto, port) {
            return true;
        }
        if id != 0 {
            if rules.any_pod.allows(proto, port) {
                return true;
            }
            if let Some(i) = rules.by_identity.get(id)
                && rules.sets.get(i as usize).is_some_and(|ps| ps.allows(proto, port))
            {
                return true;
            }
        }
        rules.blocks.as_ref().is_some_and(|b| self.blocks_allow(b, peer, id, proto, port))
    }

    fn blocks_allow(&self, blocks: &[IpBlockRule], peer: IpAddr, id: Identity, proto: u8, port: u16) -> bool {
        blocks.iter().any(|(cidr, except, ps)| {
            cidr.contains(&peer)
                && !except.iter().any(|e| e.contains(&peer))
                && (ps.allows(proto, port) || (!ps.named.is_empty() && self.named_allows(ps, id, proto, port)))
        })
    }

    #[cold]
    fn named_allows(&self, ps: &PortSet, id: Identity, proto: u8, port: u16) -> bool {
        let Some(ports) = self.identity_ports.get(&id) else { return false };
        ps.named.iter().any(|(p, n)| {
            *p == proto && ports.iter().any(|np| np.protocol.number() == proto && np.port == port && *np.name == **n)
        })
    }

    /// Whether an address is this node's own.
    #[inline]
    fn is_node(&self, a: IpAddr) -> bool {
        self.node_addrs.contains(&a)
    }

    /// The verdict for a packet from `src` to `dst` (real addresses: after a service's
    /// translation): the source's egress rules if it is a local pod, the destination's ingress
    /// rules if it is one. A pod reaching itself, and traffic between a pod and this node, are
    /// always allowed.
    #[inline]
    pub fn verdict(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> PolicyVerdict {
        self.decide(src, dst, proto, port).0
    }

    /// [`PolicyTables::verdict`], and which local pods' rules it looked at (a [`PolicyRef`]).
    #[inline]
    pub fn decide(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> (PolicyVerdict, PolicyRef) {
        if src == dst {
            return (PolicyVerdict::Allow, 0);
        }
        let (s, d) = (self.entry(src), self.entry(dst));
        let mut by = 0;
        if let Some(e) = self.local_of(s).and_then(|c| c.egress.as_ref())
            && !self.is_node(dst)
        {
            by = (s.local & 0xffff) << 16;
            if !self.allows(e, dst, d.identity, proto, port) {
                return (PolicyVerdict::DenyEgress, by);
            }
        }
        if let Some(i) = self.local_of(d).and_then(|c| c.ingress.as_ref())
            && !self.is_node(src)
        {
            by |= d.local & 0xffff;
            if !self.allows(i, src, s.identity, proto, port) {
                return (PolicyVerdict::DenyIngress, by);
            }
        }
        (PolicyVerdict::Allow, by)
    }
}

impl PolicyTables {
    /// [`PolicyTables::verdict`] with its reasons: which pods' rules were looked at, which
    /// policies they come from, and whether each side allowed (off the forwarding path: it
    /// allocates).
    pub fn explain(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Explanation {
        let mut e = Explanation {
            verdict: self.verdict(src, dst, proto, port),
            src,
            dst,
            protocol: proto,
            port,
            exempt: None,
            egress: None,
            ingress: None,
        };
        if src == dst {
            e.exempt = Some("a pod reaching itself is always allowed");
            return e;
        }
        let (s, d) = (self.entry(src), self.entry(dst));
        let rules_of = |e: AddrEntry| self.local.get((e.local as usize).wrapping_sub(1));
        let side = |r: &PodRules, dir: Direction, hot: &HotDir, peer: IpAddr, id: Identity| SideExplanation {
            pod: r.pod.clone(),
            allowed: self.allows(hot, peer, id, proto, port),
            rules: r.origins.iter().filter(|o| o.direction == dir).cloned().collect(),
        };
        if let Some(c) = rules_of(s)
            && let Some(hot) = self.local_of(s).and_then(|h| h.egress.as_ref())
        {
            if self.is_node(dst) {
                e.exempt = Some("traffic between a pod and its own node is always allowed");
            } else {
                e.egress = Some(side(c, Direction::Egress, hot, dst, d.identity));
            }
        }
        if let Some(c) = rules_of(d)
            && let Some(hot) = self.local_of(d).and_then(|h| h.ingress.as_ref())
        {
            if self.is_node(src) {
                e.exempt = Some("traffic between a pod and its own node is always allowed");
            } else {
                e.ingress = Some(side(c, Direction::Ingress, hot, src, s.identity));
            }
        }
        e
    }
}

/// Why a policy verdict is what it is (for `ferry trace`; never on the forwarding path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The verdict ([`PolicyTables::verdict`]'s, computed the same way).
    pub verdict: PolicyVerdict,
    /// The packet's source, destination, protocol and destination port, as judged.
    pub src: IpAddr,
    /// See `src`.
    pub dst: IpAddr,
    /// See `src`.
    pub protocol: u8,
    /// See `src`.
    pub port: u16,
    /// Allowed without looking at any rule, and why (a pod reaching itself, or its own node).
    pub exempt: Option<&'static str>,
    /// The source pod's egress side, when it is a local pod policies select for egress.
    pub egress: Option<SideExplanation>,
    /// The destination pod's ingress side, when it is a local pod policies select for ingress.
    pub ingress: Option<SideExplanation>,
}

/// One direction's part of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideExplanation {
    /// `namespace/name` of the pod whose rules these are.
    pub pod: String,
    /// Whether its rules let the packet through.
    pub allowed: bool,
    /// The rules of this direction (every policy selecting the pod, rule by rule). Rules of one
    /// direction are compiled into one union, so which of several let a packet through is not
    /// kept; with one rule, it is that one.
    pub rules: Vec<RuleOrigin>,
}

impl Explanation {
    /// The policies (`namespace/name`) of a side, once each, in rule order.
    pub fn policies(side: &SideExplanation) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &side.rules {
            if !out.contains(&r.policy) {
                out.push(r.policy.clone());
            }
        }
        out
    }
}

/// An identity: a namespace, labels and named ports (sorted).
#[derive(Debug)]
struct IdentityInfo {
    /// The pod that first had them: its namespace and labels are the identity's (shared, not
    /// copied: the full compile makes thousands of identities).
    pod: Arc<PodSpec>,
    ports: Arc<[NamedPort]>,
    /// Of namespace, labels and ports: the key in [`PolicyCompiler::identity_ids`].
    hash: u64,
    pods: usize,
}

impl IdentityInfo {
    fn is(&self, namespace: &str, labels: &Labels, ports: &[NamedPort]) -> bool {
        self.pod.namespace == namespace && self.pod.labels == *labels && *self.ports == *ports
    }
}

/// The compiler's state: every object, the identities, and the local pods' compiled tables. See
/// the module doc.
#[derive(Debug, Default)]
pub struct PolicyCompiler {
    node: String,
    node_addrs: Vec<IpAddr>,
    namespaces: Map<String, Labels>,
    pods: Map<String, (Arc<PodSpec>, Identity)>,
    /// The keys of this node's pods (a policy change looks at these only).
    local_pods: BTreeSet<String>,
    /// The same, by namespace (a policy selects pods of its own namespace only).
    local_by_ns: Map<String, BTreeSet<String>>,
    policies: Map<String, Arc<Policy>>,
    policies_by_ns: Map<String, BTreeSet<String>>,
    /// Identities by the hash of their namespace, labels and ports (hashed once per pod update,
    /// not again on every growth of the map); `identity_overflow` holds any whose hash another
    /// identity took first.
    identity_ids: FastMap<u64, Identity>,
    identity_overflow: Vec<Identity>,
    id_hasher: foldhash::fast::RandomState,
    no_ports: Arc<[NamedPort]>,
    identities: Map<Identity, IdentityInfo>,
    identities_by_ns: Map<String, BTreeSet<Identity>>,
    next_identity: Identity,
    /// Local pods' compiled rules (only pods some policy selects).
    local: Map<String, Arc<CompiledPod>>,
    /// Local pods to recompute at the next build.
    dirty: BTreeSet<String>,
    /// Every local pod is dirty.
    all_dirty: bool,
    /// Identities made or dropped since the last build.
    new_identities: Vec<Identity>,
    dead_identities: Vec<Identity>,
    generation: u64,
}

/// A namespace's labels as selectors see them: its own plus `kubernetes.io/metadata.name`.
fn namespace_labels(name: &str, labels: &Labels) -> Labels {
    let mut l = labels.clone();
    l.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
    l
}

impl PolicyCompiler {
    /// A compiler for the node `node` (its pods get rule tables), whose own addresses are
    /// `node_addrs` (always allowed).
    pub fn new(node: impl Into<String>, node_addrs: Vec<IpAddr>) -> Self {
        PolicyCompiler { node: node.into(), node_addrs, next_identity: 1, ..Default::default() }
    }

    /// Sets this node's own addresses.
    pub fn set_node_addrs(&mut self, addrs: Vec<IpAddr>) {
        if self.node_addrs != addrs {
            self.node_addrs = addrs;
            // Published with the next build; the tables do not depend on them.
        }
    }

    /// This node's own addresses.
    pub fn node_addrs(&self) -> &[IpAddr] {
        &self.node_addrs
    }

    /// Sets (or, with `None`, removes) a namespace's labels.
    pub fn set_namespace(&mut self, name: &str, labels: Option<&Labels>) {
        let new = labels.map(|l| namespace_labels(name, l));
        let old = self.namespaces.get(name);
        if old == new.as_ref() {
            return;
        }
        match new {
            Some(l) => self.namespaces.insert(name.to_owned(), l),
            None => self.namespaces.remove(name),
        };
        self.all_dirty = true;
    }

    /// Sets (or removes) the pod `key` (`namespace/name`).
    pub fn set_pod(&mut self, key: &str, pod: Option<&PodSpec>) {
        if self.pods.get(key).map(|(p, _)| &**p) == pod {
            return;
        }
        let old = self.pods.remove(key);
        if let Some((old_pod, old_id)) = &old {
            if old_pod.node == self.node {
                self.dirty.insert(key.to_owned());
                self.local_pods.remove(key);
                if let Some(set) = self.local_by_ns.get_mut(&old_pod.namespace) {
                    set.remove(key);
                }
            }
            self.release_identity(*old_id);
        }
        if let Some(p) = pod {
            let mut ports = p.ports.clone();
            ports.sort();
            ports.dedup();
            let p = Arc::new(p.clone());
            let id = self.identity_for(&p, ports);
            if p.node == self.node {
                self.dirty.insert(key.to_owned());
                self.local_pods.insert(key.to_owned());
                self.local_by_ns.entry(p.namespace.clone()).or_default().insert(key.to_owned());
            }
            self.pods.insert(key.to_owned(), (p, id));
        }
    }

    /// Sets (or removes) the policy `key` (`namespace/name`).
    pub fn set_policy(&mut self, key: &str, policy: Option<&Policy>) {
        let old = self.policies.remove(key);
        for p in old.iter().map(|p| &**p).chain(policy) {
            // The local pods it selected before or selects now.
            for k in self.local_by_ns.get(&p.namespace).into_iter().flatten() {
                if let Some((pod, _)) = self.pods.get(k)
                    && pod.namespace == p.namespace
                    && p.pod_selector.matches(&pod.labels)
                {
                    self.dirty.insert(k.clone());
                }
            }
        }
        if let Some(p) = &old
            && let Some(set) = self.policies_by_ns.get_mut(&p.namespace)
        {
            set.remove(key);
        }
        if let Some(p) = policy {
            self.policies_by_ns.entry(p.namespace.clone()).or_default().insert(key.to_owned());
            self.policies.insert(key.to_owned(), Arc::new(p.clone()));
        }
    }

    /// The identity of `pod`'s namespace, labels and (sorted) `ports`, made if new.
    fn identity_for(&mut self, pod: &Arc<PodSpec>, ports: Vec<NamedPort>) -> Identity {
        use std::hash::BuildHasher;
        let hash = self.id_hasher.hash_one((&pod.namespace, &pod.labels, &ports));
        let is = |id: &Identity| self.identities.get(id).is_some_and(|i| i.is(&pod.namespace, &pod.labels, &ports));
        let found = match self.identity_ids.get(&hash) {
            Some(id) if is(id) => Some(*id),
            _ => self.identity_overflow.iter().find(|id| is(id)).copied(),
        };
        if let Some(id) = found {
            if let Some(info) = self.identities.get_mut(&id) {
                info.pods += 1;
            }
            return id;
        }
        let id = self.next_identity;
        self.next_identity += 1;
        match self.identity_ids.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => self.identity_overflow.push(id),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(id);
            }
        }
        match self.identities_by_ns.get_mut(&pod.namespace) {
            Some(ids) => {
                ids.insert(id);
            }
            None => {
                self.identities_by_ns.insert(pod.namespace.clone(), BTreeSet::from([id]));
            }
        }
        let ports: Arc<[NamedPort]> = if ports.is_empty() { Arc::clone(&self.no_ports) } else { ports.into() };
        self.identities.insert(id, IdentityInfo { pod: Arc::clone(pod), ports, hash, pods: 1 });
        self.new_identities.push(id);
        id
    }

    fn release_identity(&mut self, id: Identity) {
        let Some(info) = self.identities.get_mut(&id) else { return };
        info.pods -= 1;
        if info.pods > 0 {
            return;
        }
        if let Some(info) = self.identities.remove(&id) {
            if self.identity_ids.get(&info.hash) == Some(&id) {
                self.identity_ids.remove(&info.hash);
            } else {
                self.identity_overflow.retain(|o| *o != id);
            }
            if let Some(s) = self.identities_by_ns.get_mut(&info.pod.namespace) {
                s.remove(&id);
            }
        }
        self.dead_identities.push(id);
    }

    /// A namespace's labels; one the sources did not report has only its name label (every pod's
    /// namespace exists in Kubernetes; a static file may leave it out).
    fn ns_labels(&self, ns: &str) -> std::borrow::Cow<'_, Labels> {
        match self.namespaces.get(ns) {
            Some(l) => std::borrow::Cow::Borrowed(l),
            None => std::borrow::Cow::Owned(namespace_labels(ns, &Labels::new())),
        }
    }

    /// Whether a pod peer covers an identity.
    fn peer_matches(
        &self,
        policy_ns: &str,
        namespaces: &Namespaces,
        pods: &super::spec::Selector,
        id: &IdentityInfo,
    ) -> bool {
        let ns_ok = match namespaces {
            Namespaces::Own => id.pod.namespace == policy_ns,
            Namespaces::Matching(sel) => sel.matches(&self.ns_labels(&id.pod.namespace)),
        };
        ns_ok && pods.matches(&id.pod.labels)
    }

    /// The ports of `rule` toward a destination whose named ports are `dst_ports` (`None`: not a
    /// pod, or not known yet: named ports stay unresolved).
    fn rule_ports(rule: &Rule, dst_ports: Option<&[NamedPort]>) -> PortSet {
        let mut ps = PortSet::default();
        if rule.ports.is_empty() {
            ps.all = true;
            return ps;
        }
        for p in &rule.ports {
            let proto = p.protocol.number();
            match &p.port {
                PortMatch::Any => ps.add(proto, 0, u16::MAX),
                PortMatch::Range(a, b) => ps.add(proto, *a, *b),
                PortMatch::Named(n) => match dst_ports {
                    Some(ports) => {
                        for np in ports.iter().filter(|np| np.name == *n && np.protocol == p.protocol) {
                            ps.add(proto, np.port, np.port);
                        }
                    }
                    None => {
                        let n: Arc<str> = Arc::from(n.as_str());
                        if !ps.named.contains(&(proto, n.clone())) {
                            ps.named.push((proto, n));
                        }
                    }
                },
            }
        }
        ps
    }

    /// The policies of `namespace` whose selector takes `labels`, sorted by key.
    fn selecting(&self, namespace: &str, labels: &Labels) -> Vec<Arc<Policy>> {
        self.policies_by_ns
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|k| self.policies.get(k))
            .filter(|p| p.pod_selector.matches(labels))
            .cloned()
            .collect()
    }

    /// A local pod's tables from scratch.
    fn compile_pod(&self, key: &str, pod: &PodSpec, peers: &mut PeerCache) -> Option<PodRules> {
        let policies = self.selecting(&pod.namespace, &pod.labels);
        if policies.is_empty() {
            return None;
        }
        let mut own_ports = pod.ports.clone();
        own_ports.sort();
        let mut rules = PodRules { pod: key.to_owned(), ingress: None, egress: None, origins: Vec::new() };
        for p in &policies {
            for d in [Direction::Ingress, Direction::Egress] {
                let Some(list) = p.rules(d) else { continue };
                let dir = match d {
                    Direction::Ingress => rules.ingress.get_or_insert_with(DirRules::default),
                    Direction::Egress => rules.egress.get_or_insert_with(DirRules::default),
                };
                if list.is_empty() {
                    rules.origins.push(RuleOrigin {
                        direction: d,
                        policy: p.key(),
                        rule: None,
                        peers: "no peers".into(),
                        ports: "no ports".into(),
                    });
                }
                for (i, rule) in list.iter().enumerate() {
                    self.add_rule(dir, d, &p.namespace, rule, &own_ports, peers);
                    let peers_text = if rule.peers.is_empty() {
                        "all peers".to_owned()
                    } else {
                        rule.peers.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
                    };
                    let ports_text = if rule.ports.is_empty() {
                        "all ports".to_owned()
                    } else {
                        rule.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                    };
                    rules.origins.push(RuleOrigin {
                        direction: d,
                        policy: p.key(),
                        rule: Some(i),
                        peers: peers_text,
                        ports: ports_text,
                    });
                }
            }
        }
        Some(rules)
    }

    /// Adds one rule's contribution to a direction's tables.
    fn add_rule(
        &self,
        dir: &mut DirRules,
        d: Direction,
        policy_ns: &str,
        rule: &Rule,
        own_ports: &[NamedPort],
        peers: &mut PeerCache,
    ) {
        let ingress = d == Direction::Ingress;
        if rule.peers.is_empty() {
            if ingress || !rule.ports.iter().any(|p| matches!(p.port, PortMatch::Named(_))) {
                dir.any.union(&Self::rule_ports(rule, Some(own_ports)));
            } else {
                // Egress to every peer on a named port: resolved per destination identity; the
                // numeric ports go to every peer.
                let numeric = Rule {
                    peers: vec![],
                    ports: rule.ports.iter().filter(|p| !matches!(p.port, PortMatch::Named(_))).cloned().collect(),
                };
                if !numeric.ports.is_empty() {
                    dir.any.union(&Self::rule_ports(&numeric, None));
                }
                for (id, info) in &self.identities {
                    let ps = Self::rule_ports(rule, Some(&info.ports));
                    if !ps.is_empty() {
                        dir.by_identity.entry(*id).or_default().union(&ps);
                    }
                }
            }
            return;
        }
        for peer in &rule.peers {
            match peer {
                Peer::IpBlock { cidr, except } => {
                    let ps = Self::rule_ports(rule, if ingress { Some(own_ports) } else { None });
                    dir.blocks.push((*cidr, except.clone(), ps));
                }
                Peer::Pods { .. } if every_pod(peer, rule, ingress) => {
                    dir.any_pod.union(&Self::rule_ports(rule, Some(own_ports)));
                }
                Peer::Pods { namespaces, pods } => {
                    for &id in peers.resolve(self, policy_ns, namespaces, pods).iter() {
                        let dst_ports =
                            if ingress { Some(own_ports) } else { self.identities.get(&id).map(|i| &*i.ports) };
                        let ps = Self::rule_ports(rule, Some(dst_ports.unwrap_or(&[])));
                        if !ps.is_empty() {
                            dir.by_identity.entry(id).or_default().union(&ps);
                        }
                    }
                }
            }
        }
    }

    /// Adds a new identity's entries to a local pod's tables (the pod itself unchanged).
    /// `rules` is `None` until something changes: then a copy of `base` with the change (most
    /// new identities concern few local pods, and copying every pod's tables for each made a
    /// label change cost O(local pods x peers)).
    fn patch_identity(&self, rules: &mut Option<PodRules>, base: &PodRules, pod: &PodSpec, id: Identity) {
        let Some(info) = self.identities.get(&id) else { return };
        let mut own_ports = pod.ports.clone();
        own_ports.sort();
        for p in self.selecting(&pod.namespace, &pod.labels) {
            for d in [Direction::Ingress, Direction::Egress] {
                let Some(list) = p.rules(d) else { continue };
                if base.rules(d).is_none() {
                    continue;
                }
                for rule in list {
                    let named = rule.ports.iter().any(|p| matches!(p.port, PortMatch::Named(_)));
                    let covers = if rule.peers.is_empty() {
                        d == Direction::Egress && named
                    } else {
                        rule.peers.iter().any(|peer| match peer {
                            // Covered by `any_pod` already.
                            Peer::Pods { .. } if every_pod(peer, rule, d == Direction::Ingress) => false,
                            Peer::Pods { namespaces, pods } => self.peer_matches(&p.namespace, namespaces, pods, info),
                            Peer::IpBlock { .. } => false,
                        })
                    };
                    if !covers {
                        continue;
                    }
                    let ps = if d == Direction::Ingress {
                        Self::rule_ports(rule, Some(&own_ports))
                    } else if rule.peers.is_empty() {
                        // Only the named part: the numeric ports are in `any` already.
                        let only_named = Rule {
                            peers: vec![],
                            ports: rule
                                .ports
                                .iter()
                                .filter(|p| matches!(p.port, PortMatch::Named(_)))
                                .cloned()
                                .collect(),
                        };
                        Self::rule_ports(&only_named, Some(&info.ports))
                    } else {
                        Self::rule_ports(rule, Some(&info.ports))
                    };
                    if !ps.is_empty()
                        && let Some(dir) = dir_mut(rules.get_or_insert_with(|| base.clone()), d)
                    {
                        dir.by_identity.entry(id).or_default().union(&ps);
                    }
                }
            }
        }
    }

    /// Recomputes what changed and publishes a new generation of the tables.
    pub fn build(&mut self) -> PolicyTables {
        let mut peers = PeerCache::default();
        let local_keys: Vec<String> = if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            self.local.clear();
            self.local_pods.iter().cloned().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        let recomputed: HashSet<&String> = local_keys.iter().collect();
        let new_ids = std::mem::take(&mut self.new_identities);
        let dead_ids = std::mem::take(&mut self.dead_identities);
        // Identities made or dropped: patch the local pods not recomputed anyway.
        if !new_ids.is_empty() || !dead_ids.is_empty() {
            let keys: Vec<String> = self.local.keys().filter(|k| !recomputed.contains(k)).cloned().collect();
            for k in keys {
                let Some((pod, _)) = self.pods.get(&k) else { continue };
                let Some(base) = self.local.get(&k).map(|c| Arc::clone(&c.rules)) else { continue };
                let mut rules: Option<PodRules> = None;
                for d in [Direction::Ingress, Direction::Egress] {
                    for id in &dead_ids {
                        if base.rules(d).is_some_and(|r| r.by_identity.contains_key(id))
                            && let Some(dir) = dir_mut(rules.get_or_insert_with(|| (*base).clone()), d)
                        {
                            dir.by_identity.remove(id);
                        }
                    }
                }
                for id in new_ids.iter().filter(|id| self.identities.contains_key(id)) {
                    self.patch_identity(&mut rules, &base, pod, *id);
                }
                if let Some(rules) = rules {
                    self.local.insert(k, CompiledPod::new(rules));
                }
            }
        }
        for k in &local_keys {
            let compiled = match self.pods.get(k) {
                Some((pod, _)) if pod.node == self.node => self.compile_pod(k, pod, &mut peers),
                _ => None,
            };
            match compiled {
                Some(r) => self.local.insert(k.clone(), CompiledPod::new(r)),
                None => self.local.remove(k),
            };
        }
        self.generation += 1;
        let (mut hot, mut local) = (Vec::with_capacity(self.local.len()), Vec::with_capacity(self.local.len()));
        let (mut v4, mut v6) = (Vec::with_capacity(self.pods.len()), Vec::new());
        for (k, (pod, id)) in &self.pods {
            let at = match self.local.get(k) {
                Some(r) => {
                    hot.push(r.hot.clone());
                    local.push(Arc::clone(&r.rules));
                    local.len() as u32
                }
                None => 0,
            };
            let e = AddrEntry { identity: *id, local: at };
            for a in &pod.ips {
                match a {
                    IpAddr::V4(a) => v4.push((a.to_bits(), e)),
                    IpAddr::V6(a) => v6.push((a.to_bits(), e)),
                }
            }
        }
        let identity_ports = self
            .identities
            .iter()
            .filter(|(_, i)| !i.ports.is_empty())
            .map(|(id, i)| (*id, Arc::clone(&i.ports)))
            .collect();
        PolicyTables {
            generation: self.generation,
            v4: FlatMap::from_entries(v4),
            v6: FlatMap::from_entries(v6),
            identity_ports,
            hot,
            local,
            node_addrs: self.node_addrs.clone(),
        }
    }

    /// How many identities there are.
    pub fn identities(&self) -> usize {
        self.identities.len()
    }
}

/// One direction's rules, to change.
fn dir_mut(rules: &mut PodRules, d: Direction) -> Option<&mut DirRules> {
    match d {
        Direction::Ingress => rules.ingress.as_mut(),
        Direction::Egress => rules.egress.as_mut(),
    }
}

/// Whether a pod peer covers every pod and its rule's ports need no resolving per destination
/// (ingress ports resolve against the local pod; egress ones only when named): its ports then go to
/// [`DirRules::any_pod`].
fn every_pod(peer: &Peer, rule: &Rule, ingress: bool) -> bool {
    matches!(peer, Peer::Pods { namespaces: Namespaces::Matching(ns), pods } if ns.is_empty() && pods.is_empty())
        && (ingress || !rule.ports.iter().any(|p| matches!(p.port, PortMatch::Named(_))))
}

/// Each pod peer's identities, resolved once per build (peers repeat across policies and pods).
#[derive(Debug, Default)]
struct PeerCache {
    resolved: Map<(String, Namespaces, super::spec::Selector), Arc<[Identity]>>,
}

impl PeerCache {
    fn resolve(
        &mut self,
        c: &PolicyCompiler,
        policy_ns: &str,
        namespaces: &Namespaces,
        pods: &super::spec::Selector,
    ) -> Arc<[Identity]> {
        let own = match namespaces {
            Namespaces::Own => policy_ns.to_owned(),
            Namespaces::Matching(_) => String::new(),
        };
        let key = (own, namespaces.clone(), pods.clone());
        if let Some(r) = self.resolved.get(&key) {
            return Arc::clone(r);
        }
        let ids: Vec<Identity> = match namespaces {
            Namespaces::Own => c.identities_by_ns.get(policy_ns).into_iter().flatten().copied().collect(),
            Namespaces::Matching(sel) => c
                .identities_by_ns
                .iter()
                .filter(|(n, _)| sel.matches(&c.ns_labels(n)))
                .flat_map(|(_, ids)| ids.iter().copied())
                .collect(),
        };
        let ids: Arc<[Identity]> = ids
            .into_iter()
            .filter(|id| c.identities.get(id).is_some_and(|i| pods.matches(&i.pod.labels)))
            .collect::<Vec<_>>()
            .into();
        self.resolved.insert(key, Arc::clone(&ids));
        ids
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;
    use std::net::Ipv4Addr;

    use super::*;

    fn pod(name: &str, app: &str, i: u8) -> PodSpec {
        PodSpec {
            namespace: "x".into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))],
            node: "n2".into(),
            ports: vec![],
        }
    }

    /// Two identities whose hashes collide (forced: a 64-bit hash makes it rare, not impossible)
    /// stay apart, are found again, and go when their last pod goes.
    #[test]
    fn identities_with_colliding_hashes() {
        let mut c = PolicyCompiler::new("n1", vec![]);
        let a = pod("a", "web", 1);
        c.set_pod(&a.key(), Some(&a));
        let id_a = c.pods["x/a"].1;
        // b's hash taken by a's identity.
        let b = pod("b", "db", 2);
        let hash_b = c.id_hasher.hash_one((&b.namespace, &b.labels, &Vec::<NamedPort>::new()));
        c.identity_ids.insert(hash_b, id_a);
        c.set_pod(&b.key(), Some(&b));
        let id_b = c.pods["x/b"].1;
        assert_ne!(id_a, id_b);
        assert_eq!(c.identity_overflow, [id_b]);
        // Found again, through the overflow: a second pod with b's labels shares its identity.
        let b2 = pod("b2", "db", 3);
        c.set_pod(&b2.key(), Some(&b2));
        assert_eq!(c.pods["x/b2"].1, id_b);
        let a2 = pod("a2", "web", 4);
        c.set_pod(&a2.key(), Some(&a2));
        assert_eq!(c.pods["x/a2"].1, id_a);
        let t = c.build();
        assert_eq!(t.identity(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3))), Some(id_b));
        // Gone with its last pod.
        c.set_pod("x/b", None);
        c.set_pod("x/b2", None);
        assert!(c.identity_overflow.is_empty());
        assert_eq!(c.identities(), 1);
    }
}
