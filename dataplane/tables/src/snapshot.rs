//! The forwarding snapshot: an immutable set of tables that workers read (hot path). Built by
//! [`crate::Tables`] on the control side and published whole.
//!
//! A destination is looked up in the family's [`Poptrie`], whose value indexes the next-hop
//! array; a local pod is a host route (/32, /128) to a [`NextHop::Local`], so one lookup answers
//! both "which pod" and "which node". Anti-spoofing is a per-port list of allowed sources; known
//! nodes (allowed outer sources of tunnel packets) are an exact-match set.
//!
//! The LPMs and the port and node tables are behind `Arc`s so that a snapshot that changes only
//! next hops (a neighbour's MAC) shares them with its predecessor instead of rebuilding them.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ferry_encap::MacAddr;

use crate::exact::AddrSet;
use crate::lpm::{Lpm, Poptrie, RouteSet};
use crate::policy::PolicyTables;
use crate::services::Services;
use crate::types::{NextHop, PortId, Route};

/// Lookups done together by the batch methods (stack arrays of this size).
const BATCH: usize = 32;

/// Per-port allowed source addresses, flattened: `ranges[port]` indexes `addrs`; and each port's
/// pod MAC.
#[derive(Debug, Clone, Default)]
pub(crate) struct PortSources {
    ranges: Box<[(u32, u32)]>,
    addrs: Box<[IpAddr]>,
    macs: Box<[Option<MacAddr>]>,
}

impl PortSources {
    /// `ports` as (port, its MAC, its addresses, its source-only addresses); a port listed twice
    /// keeps both lists and the last MAC.
    pub(crate) fn new<'a>(ports: impl Iterator<Item = (PortId, MacAddr, &'a [IpAddr], &'a [IpAddr])> + Clone) -> Self {
        let size = ports.clone().map(|(p, ..)| usize::from(p.0) + 1).max().unwrap_or(0);
        let mut per_port: Vec<Vec<IpAddr>> = vec![Vec::new(); size];
        let mut macs = vec![None; size];
        for (p, mac, addrs, source_only) in ports {
            per_port[usize::from(p.0)].extend_from_slice(addrs);
            per_port[usize::from(p.0)].extend_from_slice(source_only);
            macs[usize::from(p.0)] = Some(mac);
        }
        let mut ranges = Vec::with_capacity(size);
        let mut flat = Vec::new();
        for addrs in per_port {
            // At most 65,536 ports with a handful of addresses each: far below u32::MAX.
            ranges.push((flat.len() as u32, addrs.len() as u32));
            flat.extend(addrs);
        }
        PortSources { ranges: ranges.into_boxed_slice(), addrs: flat.into_boxed_slice(), macs: macs.into_boxed_slice() }
    }

    #[inline]
    fn mac(&self, port: PortId) -> Option<MacAddr> {
        self.macs.get(usize::from(port.0)).copied().flatten()
    }

    #[inline]
    fn allowed(&self, port: PortId, src: IpAddr) -> bool {
        let Some(&(start, len)) = self.ranges.get(usize::from(port.0)) else { return false };
        let (start, len) = (start as usize, len as usize);
        self.addrs.get(start..start + len).is_some_and(|a| a.contains(&src))
    }

    fn heap_bytes(&self) -> usize {
        size_of_val(&*self.ranges) + size_of_val(&*self.addrs) + size_of_val(&*self.macs)
    }
}

/// One immutable generation of the forwarding tables.
pub struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) v4: Arc<Poptrie<Ipv4Addr>>,
    pub(crate) v6: Arc<Poptrie<Ipv6Addr>>,
    pub(crate) hops: Box<[NextHop]>,
    pub(crate) ports: Arc<PortSources>,
    pub(crate) nodes: Arc<AddrSet>,
    /// A remote node's other underlay address -> the address it is tunnelled to.
    pub(crate) aliases: Arc<HashMap<IpAddr, IpAddr>>,
    /// Services: their own part, replaced without touching the routes.
    pub(crate) services: Arc<Services>,
    /// NetworkPolicy: its own part, replaced without touching the rest.
    pub(crate) policy: Arc<PolicyTables>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("next_hops", &self.hops.len())
            .field("known_nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Generation 0: no routes, no ports, no nodes. What readers see before the first publication.
    pub fn empty() -> Self {
        // Empty sets always compile: nothing can exceed a capacity.
        let v4 = Poptrie::build(&RouteSet::new()).unwrap_or_else(|_| unreachable!("empty set"));
        let v6 = Poptrie::build(&RouteSet::new()).unwrap_or_else(|_| unreachable!("empty set"));
        Snapshot {
            generation: 0,
            v4: Arc::new(v4),
            v6: Arc::new(v6),
            hops: Box::new([]),
            ports: Arc::default(),
            nodes: Arc::new(AddrSet::new(std::iter::empty())),
            aliases: Arc::default(),
            services: Arc::default(),
            policy: Arc::default(),
        }
    }

    /// Which publication this is (0 for [`Snapshot::empty`], then 1, 2, ...).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    #[inline]
    fn hop(&self, index: Option<u32>) -> Route<'_> {
        // Indices come from the same build as `hops`, so `get` never misses; a miss would be a
        // bug, and it answers NoRoute rather than panicking in a worker.
        index.and_then(|i| self.hops.get(i as usize)).map_or(Route::NoRoute, NextHop::as_route)
    }

    /// Where `dst` goes (longest-prefix match).
    #[inline]
    pub fn route(&self, dst: IpAddr) -> Route<'_> {
        match dst {
            IpAddr::V4(a) => self.route_v4(a),
            IpAddr::V6(a) => self.route_v6(a),
        }
    }

    /// Where an IPv4 destination goes.
    #[inline]
    pub fn route_v4(&self, dst: Ipv4Addr) -> Route<'_> {
        self.hop(self.v4.lookup(dst))
    }

    /// Where an IPv6 destination goes.
    #[inline]
    pub fn route_v6(&self, dst: Ipv6Addr) -> Route<'_> {
        self.hop(self.v6.lookup(dst))
    }

    /// `out[i] = route_v4(dsts[i])` for every `i` in both slices; faster than one at a time
    /// because the lookups' memory accesses overlap.
    pub fn routes_v4<'a>(&'a self, dsts: &[Ipv4Addr], out: &mut [Route<'a>]) {
        self.batch(&*self.v4, dsts, out);
    }

    /// `out[i] = route_v6(dsts[i])` for every `i` in both slices.
    pub fn routes_v6<'a>(&'a self, dsts: &[Ipv6Addr], out: &mut [Route<'a>]) {
        self.batch(&*self.v6, dsts, out);
    }

    #[inline]
    fn batch<'a, A: crate::lpm::Address>(&'a self, lpm: &impl Lpm<A>, dsts: &[A], out: &mut [Route<'a>]) {
        let mut index = [None; BATCH];
        for (dsts, out) in dsts.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
            lpm.lookup_batch(dsts, &mut index);
            for (o, i) in out.iter_mut().zip(&index) {
                *o = self.hop(*i);
            }
        }
    }

    /// The pod on this node that owns `addr`, if any.
    #[inline]
    pub fn local_pod(&self, addr: IpAddr) -> Option<(PortId, MacAddr)> {
        match self.route(addr) {
            Route::Local { port, mac } => Some((port, mac)),
            _ => None,
        }
    }

    /// Whether `port` may send with source `src` (anti-spoofing): only its pod's own addresses.
    #[inline]
    pub fn source_allowed(&self, port: PortId, src: IpAddr) -> bool {
        self.ports.allowed(port, src)
    }

    /// For a remote node's other underlay address (a node with both families, reached at the
    /// other one), the address this node tunnels to it; `None` for anything else.
    #[inline]
    pub fn node_alias(&self, underlay: IpAddr) -> Option<IpAddr> {
        if self.aliases.is_empty() { None } else { self.aliases.get(&underlay).copied() }
    }

    /// The MAC of the pod on `port` (its frames' only allowed source MAC), if a pod is there.
    #[inline]
    pub fn port_mac(&self, port: PortId) -> Option<MacAddr> {
        self.ports.mac(port)
    }

    /// Whether `underlay` is a remote node's address (tunnel packets from anything else are
    /// dropped).
    #[inline]
    pub fn is_known_node(&self, underlay: IpAddr) -> bool {
        self.nodes.contains(underlay)
    }

    /// The NetworkPolicy tables (this node's pods' compiled rules).
    #[inline]
    pub fn policy(&self) -> &PolicyTables {
        &self.policy
    }

    /// The services (VIPs and their backends).
    #[inline]
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Number of next hops.
    pub fn next_hops(&self) -> usize {
        self.hops.len()
    }

    /// Heap bytes held by this snapshot, counting shared parts in full (not the templates,
    /// which are shared per node).
    pub fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes()
            + self.v6.heap_bytes()
            + size_of_val(&*self.hops)
            + self.ports.heap_bytes()
            + self.nodes.heap_bytes()
    }
}
