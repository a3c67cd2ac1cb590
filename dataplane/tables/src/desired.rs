//! The desired state: what the control plane wants the forwarding tables to say (shared types,
//! control side). `control` fills these in from its sources without linking anything of the data
//! plane's; [`crate::Tables`] compiles them into snapshots.
//!
//! The description is complete each time (not a delta): the remote nodes with their pod CIDRs and
//! tunnel parameters, the pods on this node with their ports and addresses, and the prefixes to
//! drop. This node's own pod CIDRs belong in [`DesiredState::blackholes`]: the pods' host routes
//! are longer and win, so only addresses without a pod are dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_encap::ecn::EcnMode;
use ferry_encap::{Dscp, MacAddr, TunnelKind};
use ipnet::IpNet;

use crate::PortId;

/// Everything the tables should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Other nodes and the pod CIDRs behind them.
    pub nodes: Vec<RemoteNode>,
    /// Pods on this node.
    pub local_pods: Vec<LocalPod>,
    /// Prefixes whose traffic is dropped (this node's pod CIDRs, reserved ranges).
    pub blackholes: Vec<IpNet>,
}

/// A remote node: where its pods are and how to tunnel to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    /// The node's name (for error messages and reports).
    pub name: String,
    /// Its pod CIDRs, IPv4 and/or IPv6, without host bits.
    pub pod_cidrs: Vec<IpNet>,
    /// Its underlay address: the outer destination.
    pub underlay: IpAddr,
    /// Its other underlay addresses (a node with one of each family): tunnel packets from them are
    /// accepted as this node's, but nothing is sent to them.
    pub other_underlays: Vec<IpAddr>,
    /// Its VTEP MAC: the inner destination MAC.
    pub vtep_mac: MacAddr,
    /// The VNI to encapsulate with (24 bits).
    pub vni: u32,
    /// VXLAN or Geneve.
    pub tunnel: TunnelKind,
    /// The outer UDP destination port.
    pub port: u16,
}

/// A pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    /// The port its veth is on.
    pub port: PortId,
    /// Its MAC.
    pub mac: MacAddr,
    /// Its addresses: traffic to them is delivered to `port`, and with
    /// [`LocalPod::source_only`] they are the only sources `port` may send from (anti-spoofing).
    pub addrs: Vec<IpAddr>,
    /// Further sources `port` may send from that are not routed to it. The host port needs this:
    /// the node's kernel answers a pod that talked to the node's underlay address from that address,
    /// but decapsulated traffic must never be delivered to the node's underlay address.
    pub source_only: Vec<IpAddr>,
}

/// This node on the underlay: the fixed half of every outer header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// The uplink's MAC (outer source MAC).
    pub mac: MacAddr,
    /// This node's IPv4 underlay address, for nodes reached over IPv4.
    pub ipv4: Option<Ipv4Addr>,
    /// This node's IPv6 underlay address, for nodes reached over IPv6.
    pub ipv6: Option<Ipv6Addr>,
    /// The IPv4 router, for nodes that are not neighbours themselves: a node whose own address
    /// has no neighbour entry is reached through the gateway's MAC.
    pub gateway_v4: Option<Ipv4Addr>,
    /// The IPv6 router, likewise.
    pub gateway_v6: Option<Ipv6Addr>,
    /// 802.1Q tag on the underlay.
    pub vlan: Option<u16>,
    /// Outer TTL / hop limit.
    pub ttl: u8,
    /// Outer DSCP.
    pub dscp: Dscp,
    /// Outer ECN (RFC 6040).
    pub ecn: EcnMode,
    /// Send a zero UDP checksum over IPv6 (RFC 6935).
    pub ipv6_zero_udp_checksum: bool,
    /// For a remote node with underlay addresses of both families, when this node has both too:
    /// tunnel to its IPv6 one (else its IPv4 one, as Flannel does). See [`Underlay::choose`].
    pub prefer_ipv6: bool,
}

impl Underlay {
    /// An underlay with the usual defaults: no VLAN, TTL 64, DSCP inherited, ECN normal mode,
    /// UDP checksums over IPv6, no gateways.
    pub fn new(mac: MacAddr, ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) -> Self {
        Underlay {
            mac,
            ipv4,
            ipv6,
            gateway_v4: None,
            gateway_v6: None,
            vlan: None,
            ttl: 64,
            dscp: Dscp::Inherit,
            ecn: EcnMode::Normal,
            ipv6_zero_udp_checksum: false,
            prefer_ipv6: false,
        }
    }

    /// Of a remote node's underlay addresses (at most one per family matters), the one to tunnel
    /// to: of the preferred family ([`Underlay::prefer_ipv6`]) when this node has an address of
    /// that family, else of a family this node has. When this node shares no family with the
    /// remote node, the first address (the tables then refuse the node, naming the family).
    /// `None` only for an empty list.
    pub fn choose(&self, addrs: &[IpAddr]) -> Option<IpAddr> {
        let of = |v6: bool| addrs.iter().copied().find(|a| a.is_ipv6() == v6 && self.source_for(*a).is_some());
        of(self.prefer_ipv6).or_else(|| of(!self.prefer_ipv6)).or_else(|| addrs.first().copied())
    }

    /// This node's address in `remote`'s family.
    pub fn source_for(&self, remote: IpAddr) -> Option<IpAddr> {
        match remote {
            IpAddr::V4(_) => self.ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.ipv6.map(IpAddr::V6),
        }
    }

    /// The gateway in `remote`'s family.
    pub fn gateway_for(&self, remote: IpAddr) -> Option<IpAddr> {
        match remote {
            IpAddr::V4(_) => self.gateway_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.gateway_v6.map(IpAddr::V6),
        }
    }
}
