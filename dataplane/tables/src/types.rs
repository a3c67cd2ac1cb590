//! Values shared by both sides: what a route resolves to ([`NextHop`], read on the hot path as a
//! [`Route`]) and the port identity ([`PortId`]). Plain data; nothing here allocates per packet.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ferry_encap::{MacAddr, TunnelTemplate};

/// A data-plane port (a pod's veth, the host's veth, the uplink) as workers number them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId(pub u16);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port {}", self.0)
    }
}

/// Where a route sends traffic, as stored in a snapshot's next-hop array (the LPM values index
/// it). Control side builds these; the hot path reads them through [`Route`].
#[derive(Debug, Clone)]
pub enum NextHop {
    /// A pod on this node.
    Local {
        /// Its port.
        port: PortId,
        /// Its MAC (the destination MAC of frames delivered to it).
        mac: MacAddr,
    },
    /// A pod behind another node.
    Remote {
        /// The outer headers toward that node, with the underlay next hop's MAC filled in. Shared
        /// (`Arc`) so that snapshots that did not change this node reuse it without copying its
        /// few hundred bytes.
        template: Arc<TunnelTemplate>,
        /// The remote VTEP's MAC: the inner destination MAC.
        vtep_mac: MacAddr,
    },
    /// A remote node whose underlay next hop has no MAC yet (no neighbour entry for it or for the
    /// gateway). Traffic cannot be sent until the neighbour is learned.
    Unresolved {
        /// The node's underlay address (what needs resolving).
        underlay: IpAddr,
    },
    /// Drop on purpose (this node's own pod CIDR where no pod exists, or a configured blackhole).
    Blackhole,
}

impl NextHop {
    /// The hot-path view.
    #[inline]
    pub fn as_route(&self) -> Route<'_> {
        match self {
            NextHop::Local { port, mac } => Route::Local { port: *port, mac: *mac },
            NextHop::Remote { template, vtep_mac } => Route::Remote { template, vtep_mac: *vtep_mac },
            NextHop::Unresolved { underlay } => Route::Unresolved { underlay: *underlay },
            NextHop::Blackhole => Route::Blackhole,
        }
    }
}

/// The answer to "where does this destination go", borrowed from a snapshot (hot path). `Copy`
/// and two words plus a tag, so a batch of them lives on the stack.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// Deliver to a local pod.
    Local {
        /// The pod's port.
        port: PortId,
        /// The pod's MAC.
        mac: MacAddr,
    },
    /// Encapsulate toward a remote node.
    Remote {
        /// Outer headers toward the node.
        template: &'a TunnelTemplate,
        /// Inner destination MAC.
        vtep_mac: MacAddr,
    },
    /// The remote node's underlay MAC is not known yet.
    Unresolved {
        /// The node's underlay address.
        underlay: IpAddr,
    },
    /// Drop on purpose.
    Blackhole,
    /// No route covers the destination.
    NoRoute,
}
