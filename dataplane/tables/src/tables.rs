//! The owner of the forwarding tables (control side): compiles a [`DesiredState`] and the
//! neighbour table into [`Snapshot`]s and publishes them to the workers' [`Reader`]s.
//!
//! Two kinds of change, two costs:
//!
//! - **Routes** ([`Tables::set_desired`]): the LPMs, port and node tables are rebuilt from
//!   scratch (milliseconds at 100k prefixes: `cargo bench --bench publish`) and published with fresh next hops.
//!   Building from scratch rather than patching keeps one code path and makes every snapshot
//!   exactly what its desired state says.
//! - **Neighbours** ([`Tables::learn_neighbour`], [`Tables::expire_neighbours`], static entries):
//!   only the next-hop array is rebuilt; the new snapshot shares the LPMs and the port and node
//!   tables with the previous one. A node's template is rebuilt (`with_next_hop_mac`) only when its
//!   next-hop MAC changed, so most next hops keep pointing at the same template.
//!
//! Nothing here runs on a worker. Time is passed in (`now`), never read.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_encap::{MacAddr, TemplateError, TemplateParams, TunnelKind, TunnelTemplate};
use ipnet::IpNet;

use crate::desired::{DesiredState, RemoteNode, Underlay};
use crate::exact::AddrSet;
use crate::lpm::{Address, LpmError, MAX_VALUE, Poptrie, Prefix, RouteSet};
use crate::neigh::Neighbours;
use crate::policy::PolicyTables;
use crate::publish::{Publisher, Reader};
use crate::services::{ServiceError, ServiceSpec, Services};
use crate::snapshot::{PortSources, Snapshot};
use crate::types::{NextHop, PortId};

/// Why a desired state was refused. The tables keep publishing the previous one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A prefix that is not a network address, or too long.
    #[error("{owner}: prefix {prefix}: {source}")]
    BadPrefix {
        /// Who listed it (`node NAME`, `pod on port N`, `blackhole`).
        owner: String,
        /// The prefix as given.
        prefix: IpNet,
        /// What is wrong with it.
        #[source]
        source: LpmError,
    },
    /// Two owners claim exactly the same prefix.
    #[error("{prefix} is claimed by both {first} and {second}; remove one of them")]
    Conflict {
        /// The prefix.
        prefix: IpNet,
        /// The owner seen first.
        first: String,
        /// The owner seen second.
        second: String,
    },
    /// Two pods on one port.
    #[error("{port} is given to two pods (MACs {first} and {second})")]
    DuplicatePort {
        /// The port.
        port: PortId,
        /// The first pod's MAC.
        first: MacAddr,
        /// The second pod's MAC.
        second: MacAddr,
    },
    /// A node reached over a family for which this node has no underlay address.
    #[error(
        "node {node}: its underlay address {underlay} is {family}, but no {family} underlay address is configured for this node"
    )]
    NoSourceAddress {
        /// The node.
        node: String,
        /// Its underlay address.
        underlay: IpAddr,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// The tunnel parameters of a node do not make a valid template.
    #[error("node {node}: {source}")]
    Template {
        /// The node.
        node: String,
        /// What the template builder refused.
        #[source]
        source: TemplateError,
    },
    /// More next hops or trie nodes than the structures can index.
    #[error("compiling the routes: {source}")]
    Capacity {
        /// The structure's refusal.
        #[source]
        source: LpmError,
    },
}

/// What one publication did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    /// The generation now current.
    pub generation: u64,
    /// Retired snapshots freed on the way (no reader held them any more).
    pub freed: usize,
    /// Remote nodes whose underlay MAC is unknown (their routes answer `Unresolved`).
    pub unresolved: usize,
}

/// What a next-hop index stands for; the MAC-dependent part is resolved at publication.
#[derive(Debug, Clone, Copy)]
enum HopPlan {
    Blackhole,
    Pod {
        port: PortId,
        mac: MacAddr,
    },
    /// Index into the desired state's nodes.
    Node(usize),
}

/// The pieces that only change with the desired state.
#[derive(Debug)]
struct Compiled {
    /// The route sets the LPMs were built from, kept to tell whether a new state changed them.
    routes4: RouteSet<Ipv4Addr>,
    routes6: RouteSet<Ipv6Addr>,
    v4: Arc<Poptrie<Ipv4Addr>>,
    v6: Arc<Poptrie<Ipv6Addr>>,
    ports: Arc<PortSources>,
    nodes: Arc<AddrSet>,
    /// A remote node's other underlay address -> the address it is tunnelled to.
    aliases: Arc<HashMap<IpAddr, IpAddr>>,
    plan: Vec<HopPlan>,
}

/// The parameters that determine a node's template apart from the next-hop MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TemplateKey {
    underlay: IpAddr,
    vni: u32,
    kind: TunnelKind,
    port: u16,
}

impl TemplateKey {
    fn of(node: &RemoteNode) -> Self {
        TemplateKey { underlay: node.underlay, vni: node.vni, kind: node.tunnel, port: node.port }
    }
}

/// The forwarding tables' owner. One per data plane; lives on the control thread.
#[derive(Debug)]
pub struct Tables {
    underlay: Underlay,
    neighbours: Neighbours,
    desired: DesiredState,
    compiled: Compiled,
    /// `templates[i]` is the template toward `desired.nodes[i]`, carrying the next-hop MAC it was
    /// last built with. Indexed, not hashed: at 100k nodes, hashing every node's key on each
    /// publication cost more than building the LPM.
    templates: Vec<Arc<TunnelTemplate>>,
    publisher: Publisher<Snapshot>,
    generation: u64,
    /// The compiled services, published with every snapshot.
    services: Arc<Services>,
    /// How many service sets were compiled (each gets the next number).
    services_built: u64,
    /// The compiled NetworkPolicy tables, published with every snapshot.
    policy: Arc<PolicyTables>,
}

fn owner_name(plan: &[HopPlan], nodes: &[RemoteNode], hop: u32) -> String {
    match plan.get(hop as usize) {
        Some(HopPlan::Blackhole) | None => "blackhole".to_owned(),
        Some(HopPlan::Pod { port, .. }) => format!("pod on {port}"),
        Some(HopPlan::Node(i)) => format!("node {}", nodes.get(*i).map_or("?", |n| n.name.as_str())),
    }
}

/// Sort one family's routes, refuse a prefix claimed by two owners, and make the set. Sorting a
/// vector and bulk-building is several times faster than inserting into the map one by one.
fn route_set<A: Address>(
    mut routes: Vec<(Prefix<A>, u32)>,
    plan: &[HopPlan],
    nodes: &[RemoteNode],
) -> Result<RouteSet<A>, BuildError> {
    // Stable: among equal prefixes the input order stays, so "first" below is the first listed.
    routes.sort_by_key(|(p, _)| *p);
    for pair in routes.windows(2) {
        let ((p, first), (q, second)) = (pair[0], pair[1]);
        if p == q && first != second {
            return Err(BuildError::Conflict {
                prefix: to_net(p),
                first: owner_name(plan, nodes, first),
                second: owner_name(plan, nodes, second),
            });
        }
    }
    routes.dedup_by_key(|(p, _)| *p);
    // Every hop number is at most MAX_VALUE (checked by `compile`), so nothing is clamped.
    Ok(routes.into_iter().collect())
}

fn to_net<A: Address>(p: Prefix<A>) -> IpNet {
    let addr = if A::BITS == 32 {
        IpAddr::V4(Ipv4Addr::from_u128(p.addr().to_u128()))
    } else {
        IpAddr::V6(Ipv6Addr::from_u128(p.addr().to_u128()))
    };
    // The prefix length is valid for its family by construction.
    IpNet::new(addr, p.prefix_len()).unwrap_or_else(|_| IpNet::from(addr))
}

/// Validate `desired` and build everything that does not depend on neighbours, reusing from
/// `prev` (built from `prev_desired`) whatever did not change.
fn compile(
    underlay: &Underlay,
    desired: &DesiredState,
    prev: &Compiled,
    prev_desired: &DesiredState,
) -> Result<Compiled, BuildError> {
    let mut plan = Vec::with_capacity(1 + desired.nodes.len() + desired.local_pods.len());
    plan.push(HopPlan::Blackhole);
    plan.extend((0..desired.nodes.len()).map(HopPlan::Node));
    for pod in &desired.local_pods {
        plan.push(HopPlan::Pod { port: pod.port, mac: pod.mac });
    }
    if plan.len() - 1 > MAX_VALUE as usize {
        let source = LpmError::ValueTooLarge { value: u32::try_from(plan.len()).unwrap_or(u32::MAX), max: MAX_VALUE };
        return Err(BuildError::Capacity { source });
    }

    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut add = |net: IpNet, hop: u32| -> Result<(), BuildError> {
        let bad = |source| BuildError::BadPrefix { owner: owner_name(&plan, &desired.nodes, hop), prefix: net, source };
        match net {
            IpNet::V4(n) => v4.push((Prefix::try_from(n).map_err(bad)?, hop)),
            IpNet::V6(n) => v6.push((Prefix::try_from(n).map_err(bad)?, hop)),
        }
        Ok(())
    };
    for net in &desired.blackholes {
        add(*net, 0)?;
    }
    // Hop numbers: 0 blackhole, then nodes, then pods (the order `plan` was filled in); all fit
    // in u32 (checked above).
    for (i, node) in desired.nodes.iter().enumerate() {
        for net in &node.pod_cidrs {
            add(*net, 1 + i as u32)?;
        }
    }
    let first_pod = 1 + desired.nodes.len();
    for (j, pod) in desired.local_pods.iter().enumerate() {
        for addr in &pod.addrs {
            add(IpNet::from(*addr), (first_pod + j) as u32)?;
        }
    }
    let routes4 = route_set(v4, &plan, &desired.nodes)?;
    let routes6 = route_set(v6, &plan, &desired.nodes)?;

    let mut seen: HashMap<PortId, MacAddr> = HashMap::with_capacity(desired.local_pods.len());
    for pod in &desired.local_pods {
        if let Some(first) = seen.insert(pod.port, pod.mac) {
            return Err(BuildError::DuplicatePort { port: pod.port, first, second: pod.mac });
        }
    }
    for node in &desired.nodes {
        if underlay.source_for(node.underlay).is_none() {
            let family = if node.underlay.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(BuildError::NoSourceAddress { node: node.name.clone(), underlay: node.underlay, family });
        }
    }

    // Whatever is equal to the previous build is shared, not rebuilt: comparing is linear and
    // much cheaper than building (and keeps the unchanged family's trie hot in the caches).
    let capacity = |source| BuildError::Capacity { source };
    let v4 = if routes4 == prev.routes4 {
        Arc::clone(&prev.v4)
    } else {
        Arc::new(Poptrie::build(&routes4).map_err(capacity)?)
    };
    let v6 = if routes6 == prev.routes6 {
        Arc::clone(&prev.v6)
    } else {
        Arc::new(Poptrie::build(&routes6).map_err(capacity)?)
    };
    let ports = if desired
        .local_pods
        .iter()
        .map(|p| (p.port, p.mac, &p.addrs, &p.source_only))
        .eq(prev_desired.local_pods.iter().map(|p| (p.port, p.mac, &p.addrs, &p.source_only)))
    {
        Arc::clone(&prev.ports)
    } else {
        Arc::new(PortSources::new(
            desired.local_pods.iter().map(|p| (p.port, p.mac, p.addrs.as_slice(), p.source_only.as_slice())),
        ))
    };
    let addrs = |d: &DesiredState| -> Vec<IpAddr> {
        d.nodes.iter().flat_map(|n| std::iter::once(n.underlay).chain(n.other_underlays.iter().copied())).collect()
    };
    let (nodes, aliases) = if addrs(desired) == addrs(prev_desired) {
        (Arc::clone(&prev.nodes), Arc::clone(&prev.aliases))
    } else {
        let aliases = desired
            .nodes
            .iter()
            .flat_map(|n| n.other_underlays.iter().filter(move |a| **a != n.underlay).map(move |a| (*a, n.underlay)))
            .collect();
        (Arc::new(AddrSet::new(addrs(desired).into_iter())), Arc::new(aliases))
    };
    Ok(Compiled { routes4, routes6, v4, v6, ports, nodes, aliases, plan })
}

/// The template toward `node` with next-hop MAC `mac`.
fn template(underlay: &Underlay, node: &RemoteNode, mac: MacAddr) -> Result<TunnelTemplate, BuildError> {
    let family = if node.underlay.is_ipv4() { "IPv4" } else { "IPv6" };
    let src = underlay.source_for(node.underlay).ok_or_else(|| BuildError::NoSourceAddress {
        node: node.name.clone(),
        underlay: node.underlay,
        family,
    })?;
    let mut p = TemplateParams::new(node.tunnel, node.vni, underlay.mac, mac, src, node.underlay);
    p.vlan = underlay.vlan;
    p.dst_port = node.port;
    p.ttl = underlay.ttl;
    p.dscp = underlay.dscp;
    p.ecn = underlay.ecn;
    p.ipv6_zero_udp_checksum = underlay.ipv6_zero_udp_checksum;
    TunnelTemplate::new(&p).map_err(|source| BuildError::Template { node: node.name.clone(), source })
}

impl Tables {
    /// Empty tables for a node with this underlay; learned neighbours stay valid for
    /// `neighbour_reachable` after each confirmation. Readers see [`Snapshot::empty`] until the
    /// first publication.
    pub fn new(underlay: Underlay, neighbour_reachable: Duration) -> Self {
        let empty = Snapshot::empty();
        let compiled = Compiled {
            routes4: RouteSet::new(),
            routes6: RouteSet::new(),
            v4: Arc::clone(&empty.v4),
            v6: Arc::clone(&empty.v6),
            ports: Arc::clone(&empty.ports),
            nodes: Arc::clone(&empty.nodes),
            aliases: Arc::clone(&empty.aliases),
            plan: Vec::new(),
        };
        Tables {
            underlay,
            neighbours: Neighbours::new(neighbour_reachable),
            desired: DesiredState::default(),
            compiled,
            templates: Vec::new(),
            services: Arc::clone(&empty.services),
            policy: Arc::clone(&empty.policy),
            publisher: Publisher::new(Arc::new(empty)),
            generation: 0,
            services_built: 0,
        }
    }

    /// A reader for one worker.
    pub fn reader(&self) -> Reader<Snapshot> {
        self.publisher.reader()
    }

    /// Replace the desired state and publish it.
    ///
    /// # Errors
    /// A [`BuildError`] naming the node, pod or prefix at fault; nothing is published and the
    /// previous state stays current.
    pub fn set_desired(&mut self, desired: DesiredState, now: Instant) -> Result<Publication, BuildError> {
        let compiled = compile(&self.underlay, &desired, &self.compiled, &self.desired)?;
        // Templates are reused by position when the node's tunnel did not change (the usual
        // case: control sends the same nodes in the same order), else found by key among the
        // previous ones (built only on the first miss), else built.
        let mut by_key: Option<HashMap<TemplateKey, usize>> = None;
        let mut templates = Vec::with_capacity(desired.nodes.len());
        for (i, node) in desired.nodes.iter().enumerate() {
            let key = TemplateKey::of(node);
            let same_place = self.desired.nodes.get(i).filter(|old| TemplateKey::of(old) == key).map(|_| i);
            let previous = same_place.or_else(|| {
                by_key
                    .get_or_insert_with(|| {
                        self.desired.nodes.iter().enumerate().map(|(j, n)| (TemplateKey::of(n), j)).collect()
                    })
                    .get(&key)
                    .copied()
            });
            templates.push(match previous.and_then(|j| self.templates.get(j)) {
                Some(t) => Arc::clone(t),
                // Built with a placeholder MAC so that bad parameters are reported now; the
                // real next-hop MAC is patched in at publication.
                None => Arc::new(template(&self.underlay, node, MacAddr::default())?),
            });
        }
        self.templates = templates;
        let previous = std::mem::replace(&mut self.desired, desired);
        self.compiled = compiled;
        let publication = self.publish(now);
        // The old description (a string and a vector per node) is freed after the new snapshot is
        // out, not before.
        drop(previous);
        Ok(publication)
    }

    /// Build the next hops for the current compiled state and publish a snapshot.
    fn publish(&mut self, now: Instant) -> Publication {
        // A node's next-hop MAC is its own neighbour entry, else its family's gateway's. The
        // gateways are looked up once here, not once per node.
        let gateway = |gw: Option<IpAddr>| gw.and_then(|g| self.neighbours.mac(g, now));
        let (gw4, gw6) =
            (gateway(self.underlay.gateway_v4.map(IpAddr::V4)), gateway(self.underlay.gateway_v6.map(IpAddr::V6)));
        let mut unresolved = 0;
        let mut hops = Vec::with_capacity(self.compiled.plan.len());
        for plan in &self.compiled.plan {
            hops.push(match *plan {
                HopPlan::Blackhole => NextHop::Blackhole,
                HopPlan::Pod { port, mac } => NextHop::Local { port, mac },
                HopPlan::Node(i) => {
                    let node = &self.desired.nodes[i];
                    let fallback = if node.underlay.is_ipv4() { gw4 } else { gw6 };
                    let mac = self.neighbours.mac(node.underlay, now).or(fallback);
                    // `templates` parallels `desired.nodes` (set together in `set_desired`); a
                    // missing one would be a bug and degrades to Unresolved instead of panicking.
                    match (mac, self.templates.get_mut(i)) {
                        (Some(mac), Some(t)) => {
                            if t.next_hop_mac() != mac {
                                *t = Arc::new(t.with_next_hop_mac(mac));
                            }
                            NextHop::Remote { template: Arc::clone(t), vtep_mac: node.vtep_mac }
                        }
                        _ => {
                            unresolved += 1;
                            NextHop::Unresolved { underlay: node.underlay }
                        }
                    }
                }
            });
        }
        self.generation += 1;
        let snapshot = Snapshot {
            generation: self.generation,
            v4: Arc::clone(&self.compiled.v4),
            v6: Arc::clone(&self.compiled.v6),
            hops: hops.into_boxed_slice(),
            ports: Arc::clone(&self.compiled.ports),
            nodes: Arc::clone(&self.compiled.nodes),
            aliases: Arc::clone(&self.compiled.aliases),
            services: Arc::clone(&self.services),
            policy: Arc::clone(&self.policy),
        };
        let freed = self.publisher.publish(Arc::new(snapshot));
        Publication { generation: self.generation, freed, unresolved }
    }

    /// Replace the services and publish them. Only the service part is compiled (Maglev tables
    /// included); the new snapshot shares the routes, ports and nodes with the previous one, and
    /// its next hops are rebuilt from the current neighbours as on any publication.
    ///
    /// # Errors
    /// A [`ServiceError`] naming the services at fault; nothing is published.
    pub fn set_services(&mut self, specs: &[ServiceSpec], now: Instant) -> Result<Publication, ServiceError> {
        let services = Services::build(specs, self.services_built + 1)?;
        self.services_built += 1;
        self.services = Arc::new(services);
        Ok(self.publish(now))
    }

    /// Change some services and publish: those named in `removed` or `upserted` go, `upserted`
    /// come in. Only the upserted services' Maglev tables are built ([`Services::updated`]), so an
    /// endpoint change costs the same at 10 services as at 10,000.
    ///
    /// # Errors
    /// A [`ServiceError`] naming the services at fault; nothing is published.
    pub fn update_services(
        &mut self,
        removed: &[String],
        upserted: &[ServiceSpec],
        now: Instant,
    ) -> Result<Publication, ServiceError> {
        let services = self.services.updated(removed, upserted, self.services_built + 1)?;
        self.services_built += 1;
        self.services = Arc::new(services);
        Ok(self.publish(now))
    }

    /// Replace the NetworkPolicy tables (compiled by a [`crate::policy::PolicyCompiler`]) and
    /// publish them; the routes, ports, nodes and services are shared with the previous snapshot.
    pub fn set_policy(&mut self, policy: PolicyTables, now: Instant) -> Publication {
        self.policy = Arc::new(policy);
        self.publish(now)
    }

    /// The NetworkPolicy tables last published.
    pub fn policy(&self) -> &Arc<PolicyTables> {
        &self.policy
    }

    /// The services last published.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Whether the next hops depend on the neighbour entry for `addr`.
    fn uses_neighbour(&self, addr: IpAddr) -> bool {
        self.compiled.nodes.contains(addr) || self.underlay.gateway_for(addr) == Some(addr)
    }

    /// Record a neighbour's answer; republishes if that changed the MAC toward some node.
    pub fn learn_neighbour(&mut self, addr: IpAddr, mac: MacAddr, now: Instant) -> Option<Publication> {
        self.learn_neighbours([(addr, mac)], now)
    }

    /// [`Tables::learn_neighbour`] for many entries at once (a neighbour dump): every entry is
    /// learned, and the tables publish at most once, when any address a template uses changed MAC.
    /// At start-up with 5,000 nodes this is one rebuild instead of 5,000.
    pub fn learn_neighbours(
        &mut self,
        entries: impl IntoIterator<Item = (IpAddr, MacAddr)>,
        now: Instant,
    ) -> Option<Publication> {
        let mut republish = false;
        for (addr, mac) in entries {
            let change = self.neighbours.learn(addr, mac, now);
            republish |= change.mac_changed() && self.uses_neighbour(addr);
        }
        republish.then(|| self.publish(now))
    }

    /// Configure a static neighbour; republishes if that changed the MAC toward some node.
    pub fn set_static_neighbour(&mut self, addr: IpAddr, mac: MacAddr, now: Instant) -> Option<Publication> {
        let before = self.neighbours.mac(addr, now);
        self.neighbours.set_static(addr, mac);
        (before != Some(mac) && self.uses_neighbour(addr)).then(|| self.publish(now))
    }

    /// Remove a static neighbour; republishes if some node used it.
    pub fn remove_static_neighbour(&mut self, addr: IpAddr, now: Instant) -> Option<Publication> {
        let removed = self.neighbours.remove_static(addr).is_some();
        (removed && self.uses_neighbour(addr)).then(|| self.publish(now))
    }

    /// Drop the learned neighbours that aged out by `now`; republishes if some node used one.
    /// Call it at [`Tables::next_neighbour_expiry`].
    pub fn expire_neighbours(&mut self, now: Instant) -> Option<Publication> {
        let gone = self.neighbours.expire(now);
        gone.iter().any(|(addr, _)| self.uses_neighbour(*addr)).then(|| self.publish(now))
    }

    /// When a learned neighbour next ages out.
    pub fn next_neighbour_expiry(&self) -> Option<Instant> {
        self.neighbours.next_expiry()
    }

    /// This node's underlay (its addresses choose which of a remote node's addresses to tunnel to).
    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    /// The neighbour table.
    pub fn neighbours(&self) -> &Neighbours {
        &self.neighbours
    }

    /// The desired state last applied.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The snapshot readers currently load.
    pub fn current(&self) -> Arc<Snapshot> {
        self.publisher.current()
    }

    /// Free retired snapshots no reader holds (publication does this too); returns how many.
    pub fn reclaim(&mut self) -> usize {
        self.publisher.reclaim()
    }

    /// Retired snapshots some reader still holds.
    pub fn retired(&self) -> usize {
        self.publisher.retired()
    }
}
