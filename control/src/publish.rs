//! Publication (control side -> data plane): what the engine hands over after each batch that
//! changed something, and a default publisher that compiles a lock-free lookup snapshot.
//!
//! [`Publish`] is the seam: the control thread calls it with the whole table and the batch's diff.
//! [`SnapshotPublisher`] compiles the table into a [`FibSnapshot`] (one [`Poptrie`] per family over
//! an index of next hops) and swaps it into an [`ArcSwap`]; readers ([`SnapshotReader`]) load it
//! without locks. Compilation happens on the control thread, never on a worker.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ferry_tables::lpm::{Lpm, LpmError, Poptrie, Prefix, RouteSet};
use ipnet::IpNet;

use crate::engine::Diff;
use crate::model::Route;

/// What the engine publishes after a batch that changed the table.
#[derive(Debug, Clone, Copy)]
pub struct RouteTable<'a> {
    /// Increments with every publication.
    pub generation: u64,
    /// Every installed CIDR and its route.
    pub routes: &'a BTreeMap<IpNet, Route>,
    /// What changed since the previous publication.
    pub diff: &'a Diff,
}

/// Receives tables from the control thread. Runs on the control thread: keep it short (compile,
/// swap, return).
pub trait Publish: Send + 'static {
    /// Publishes a new table.
    fn publish(&mut self, table: &RouteTable<'_>);
}

/// An immutable, compiled forwarding snapshot: longest-prefix match from a destination address to
/// its [`Route`].
pub struct FibSnapshot {
    generation: u64,
    /// Sorted by CIDR; the LPM values index it.
    routes: Vec<(IpNet, Route)>,
    v4: Poptrie<Ipv4Addr>,
    v6: Poptrie<Ipv6Addr>,
}

impl fmt::Debug for FibSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FibSnapshot").field("generation", &self.generation).field("routes", &self.routes.len()).finish()
    }
}

impl FibSnapshot {
    /// The empty snapshot (generation 0).
    pub fn empty() -> Self {
        Self::compile(&RouteTable { generation: 0, routes: &BTreeMap::new(), diff: &Diff::default() })
            .unwrap_or_else(|_| unreachable!("an empty route set always compiles"))
    }

    /// Compiles a table.
    ///
    /// # Errors
    /// [`LpmError`] if the LPM builder refuses the set (more routes than its value range).
    pub fn compile(table: &RouteTable<'_>) -> Result<Self, LpmError> {
        let mut v4 = RouteSet::new();
        let mut v6 = RouteSet::new();
        let mut routes = Vec::with_capacity(table.routes.len());
        for (net, route) in table.routes {
            let index = u32::try_from(routes.len())
                .map_err(|_| LpmError::ValueTooLarge { value: u32::MAX, max: ferry_tables::lpm::MAX_VALUE })?;
            match net {
                IpNet::V4(n) => {
                    v4.insert(Prefix::try_from(*n)?, index)?;
                }
                IpNet::V6(n) => {
                    v6.insert(Prefix::try_from(*n)?, index)?;
                }
            }
            routes.push((*net, route.clone()));
        }
        Ok(FibSnapshot { generation: table.generation, routes, v4: Poptrie::build(&v4)?, v6: Poptrie::build(&v6)? })
    }

    /// The generation it was compiled from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The route for a destination (longest prefix match).
    pub fn lookup(&self, dst: IpAddr) -> Option<&Route> {
        let index = match dst {
            IpAddr::V4(a) => self.v4.lookup(a),
            IpAddr::V6(a) => self.v6.lookup(a),
        }?;
        self.routes.get(index as usize).map(|(_, r)| r)
    }

    /// Every CIDR and its route, sorted by CIDR.
    pub fn routes(&self) -> &[(IpNet, Route)] {
        &self.routes
    }

    /// The route installed for exactly this CIDR.
    pub fn get(&self, cidr: &IpNet) -> Option<&Route> {
        self.routes.binary_search_by(|(n, _)| n.cmp(cidr)).ok().map(|i| &self.routes[i].1)
    }

    /// Number of CIDRs.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when no CIDR is routed.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Lock-free read side of a [`SnapshotPublisher`]. Cheap to clone; `load` never blocks the
/// publisher.
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    current: Arc<ArcSwap<FibSnapshot>>,
}

impl SnapshotReader {
    /// The latest snapshot.
    pub fn load(&self) -> Arc<FibSnapshot> {
        self.current.load_full()
    }
}

type Hook = Box<dyn FnMut(&FibSnapshot, &Diff) + Send>;

/// Compiles each table into a [`FibSnapshot`] and swaps it in atomically.
pub struct SnapshotPublisher {
    current: Arc<ArcSwap<FibSnapshot>>,
    hook: Option<Hook>,
}

impl fmt::Debug for SnapshotPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotPublisher").field("generation", &self.current.load().generation).finish()
    }
}

impl SnapshotPublisher {
    /// A publisher holding the empty snapshot, and its reader.
    pub fn new() -> (Self, SnapshotReader) {
        let current = Arc::new(ArcSwap::from_pointee(FibSnapshot::empty()));
        (SnapshotPublisher { current: current.clone(), hook: None }, SnapshotReader { current })
    }

    /// Calls `hook` right after each swap (on the control thread): benchmarks and tests use it to
    /// time publications.
    pub fn with_hook(mut self, hook: impl FnMut(&FibSnapshot, &Diff) + Send + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }
}

impl Publish for SnapshotPublisher {
    fn publish(&mut self, table: &RouteTable<'_>) {
        match FibSnapshot::compile(table) {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                self.current.store(snapshot.clone());
                if let Some(hook) = &mut self.hook {
                    hook(&snapshot, table.diff);
                }
            }
            // The engine only installs valid, non-overlapping CIDRs, so this needs more than two
            // billion routes; keep forwarding on the previous snapshot.
            Err(e) => tracing::error!(error = %e, generation = table.generation, "cannot compile the forwarding table"),
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_encap::TunnelKind;

    use super::*;
    use crate::model::{NextHop, SourceKind, TunnelEndpoint};

    #[test]
    fn snapshot_looks_up_longest_prefix_in_both_families() {
        let tunnel = |last: u8| Route {
            source: SourceKind::Static,
            node: Arc::from(format!("n{last}").as_str()),
            next_hop: NextHop::Tunnel(TunnelEndpoint {
                underlay: IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)),
                vtep_mac: None,
                vni: 1,
                kind: TunnelKind::Vxlan,
                port: 4789,
            }),
        };
        let mut routes = BTreeMap::new();
        routes.insert("10.0.1.0/24".parse().expect("net"), tunnel(1));
        routes.insert("10.0.2.0/24".parse().expect("net"), Route { next_hop: NextHop::Local, ..tunnel(2) });
        routes.insert("fd00:3::/64".parse().expect("net"), tunnel(3));
        let (mut p, reader) = SnapshotPublisher::new();
        assert!(reader.load().is_empty());
        p.publish(&RouteTable { generation: 7, routes: &routes, diff: &Diff::default() });
        let s = reader.load();
        assert_eq!(s.generation(), 7);
        assert_eq!(s.lookup("10.0.1.77".parse().expect("ip")).map(|r| &*r.node), Some("n1"));
        assert_eq!(s.lookup("10.0.2.1".parse().expect("ip")).map(|r| r.next_hop), Some(NextHop::Local));
        assert_eq!(s.lookup("fd00:3::9".parse().expect("ip")).map(|r| &*r.node), Some("n3"));
        assert!(s.lookup("10.0.3.1".parse().expect("ip")).is_none());
        assert!(s.get(&"10.0.2.0/24".parse().expect("net")).is_some());
    }
}
