//! The forwarding pipeline: one frame and the port it came from in, one [`Verdict`] out (hot path).
//!
//! A frame moves through classify -> policy -> service -> route -> encap. Today the policy and
//! service stages are not written (NetworkPolicy and Service VIPs come later); they slot in between
//! [`Pipeline::pod_ingress`]'s anti-spoofing check and its route lookup, where the classified
//! [`FlowInfo`] is at hand, and each will return a verdict the same way.
//!
//! From a pod (or the host port), an untagged access port: 802.1Q-tagged frames are dropped, and
//! the source MAC must be the pod's. ARP and IPv6 neighbour solicitations for the gateway are
//! answered. IP packets must be addressed to the gateway's MAC, IPv4 headers must verify
//! (RFC 1812), and the source must be one of the pod's own addresses; then their unfinished
//! checksums are completed, their TTL decremented (at 1: ICMP time exceeded), and they are
//! forwarded to a local pod or encapsulated toward a remote node (too big with DF, or IPv6: ICMP
//! "fragmentation needed" / "packet too big").
//!
//! From the uplink: tunnel packets are validated and decapsulated (`decap`: outer MAC, addresses,
//! checksums, tunnel header); the outer source must be a known node; the inner frame's source MAC
//! must be unicast, its TTL or hop limit non-zero, and its source inside the sending node's pod
//! CIDRs or that node's own underlay address (anti-spoofing); and it is delivered only to a local
//! pod or the host port's overlay address, never anywhere else.
//!
//! Every drop is counted here, under its [`DropReason`], in the counter array the caller passes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_encap::flow::{self, FlowInfo, L3};
use ferry_encap::icmp::{self, ErrorSource, IcmpError, RateLimiter};
use ferry_encap::wire::ethernet::{EthernetFrame, ethertype};
use ferry_encap::wire::ipv4::{Ipv4Packet, protocol};
use ferry_encap::wire::ipv6::Ipv6Packet;
use ferry_encap::wire::{ArpOperation, ArpPacket, ArpRepr, Icmpv6Packet, Icmpv6Repr, NdiscRepr};
use ferry_encap::{DecapConfig, DropReason, FrameBuf, MacAddr, TunnelTemplate, Verdict, decap, encap_with, offload};
use ferry_tables::Snapshot;
pub use ferry_tables::{PortId, Route};

/// What the pipeline asks of the forwarding tables. The published [`Snapshot`] implements it (a
/// worker loads one per batch and passes it in); tests and benches may implement it with less.
pub trait Fib {
    /// The route for a destination (longest-prefix match).
    fn route(&self, dst: IpAddr) -> Route<'_>;

    /// Whether a pod (or host) port may send with this source address.
    fn source_allowed(&self, port: PortId, src: IpAddr) -> bool;

    /// Whether an underlay address belongs to a known node.
    fn is_known_node(&self, underlay: IpAddr) -> bool;

    /// The MAC of the pod on a port (the only source MAC it may send with), if a pod is there.
    fn port_mac(&self, port: PortId) -> Option<MacAddr>;
}

impl Fib for Snapshot {
    #[inline]
    fn route(&self, dst: IpAddr) -> Route<'_> {
        Snapshot::route(self, dst)
    }

    #[inline]
    fn source_allowed(&self, port: PortId, src: IpAddr) -> bool {
        Snapshot::source_allowed(self, port, src)
    }

    #[inline]
    fn is_known_node(&self, underlay: IpAddr) -> bool {
        Snapshot::is_known_node(self, underlay)
    }

    #[inline]
    fn port_mac(&self, port: PortId) -> Option<MacAddr> {
        Snapshot::port_mac(self, port)
    }
}

/// What kind of port a frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRole {
    /// The underlay: tunnel packets.
    Uplink,
    /// A pod's veth, or the host's own veth into the overlay.
    Pod,
}

/// This node's identity in the overlay, fixed while a worker runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The pod gateway's MAC: the source of every frame ferry sends to a pod.
    pub gateway_mac: MacAddr,
    /// The pod gateway's IPv4 address (answered to ARP; source of ICMP errors).
    pub gateway_v4: Option<Ipv4Addr>,
    /// The pod gateway's IPv6 address (answered to neighbour solicitations; source of ICMPv6).
    pub gateway_v6: Option<Ipv6Addr>,
    /// This node's VTEP MAC: the inner source MAC of encapsulated frames.
    pub vtep_mac: MacAddr,
    /// What this node accepts as tunnel traffic.
    pub decap: DecapConfig,
    /// The uplink's port index.
    pub uplink: PortId,
    /// Underlay MTU (IP packet size the underlay carries).
    pub underlay_mtu: u16,
    /// ICMP errors per second per worker, and burst.
    pub icmp_rate: (u32, u32),
}

/// Per-worker pipeline state.
#[derive(Debug)]
pub struct Pipeline {
    cfg: NodeConfig,
    icmp_source: ErrorSource,
    limiter: RateLimiter,
    scratch: Box<[u8]>,
    now_ns: u64,
}

/// What the pipeline counts: drops by [`DropReason`], and ICMP errors sent. A packet answered with
/// an ICMP error counts under its drop reason (it was not forwarded) and as an ICMP error sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineCounters {
    /// Drops, indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::COUNT],
    /// ICMP and ICMPv6 errors built and sent back.
    pub icmp_errors: u64,
    /// Packets moved within their frame to make room for the outer headers: they arrived with
    /// less headroom than the tunnel needs (AF_XDP delivers with 256 bytes, so this stays 0 there;
    /// a port that delivers at offset 0 pays a copy of the whole packet here).
    pub headroom_moves: u64,
}

impl Default for PipelineCounters {
    fn default() -> Self {
        PipelineCounters { drops: [0; DropReason::COUNT], icmp_errors: 0, headroom_moves: 0 }
    }
}

impl Pipeline {
    /// A pipeline for a node.
    pub fn new(cfg: NodeConfig) -> Self {
        let icmp_source = ErrorSource { mac: cfg.gateway_mac, ipv4: cfg.gateway_v4, ipv6: cfg.gateway_v6 };
        let limiter = RateLimiter::new(cfg.icmp_rate.0, cfg.icmp_rate.1);
        Pipeline {
            cfg,
            icmp_source,
            limiter,
            scratch: vec![0u8; icmp::MAX_ERROR_FRAME_LEN].into_boxed_slice(),
            now_ns: 0,
        }
    }

    /// The node configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Set the time used for rate limiting (call once per batch).
    pub fn set_time(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
    }

    /// Decide a frame's fate, rewriting it in place. `Forward(p)` means transmit on port `p`;
    /// `Reply` means transmit the rewritten frame back out of `in_port`; `Drop` means free it (the
    /// reason is already counted in `counters`).
    pub fn process<F: Fib>(
        &mut self,
        fib: &F,
        in_port: PortId,
        role: PortRole,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
    ) -> Verdict<PortId> {
        let v = match role {
            PortRole::Uplink => self.uplink_ingress(fib, frame),
            PortRole::Pod => self.pod_ingress(fib, in_port, frame, counters),
        };
        if let Verdict::Drop(r) = v {
            counters.drops[r as usize] += 1;
        }
        v
    }

    fn uplink_ingress<F: Fib>(&mut self, fib: &F, frame: &mut FrameBuf<'_>) -> Verdict<PortId> {
        let d = match decap(&self.cfg.decap, frame) {
            Ok(d) => d,
            Err(r) => return Verdict::Drop(r),
        };
        if !fib.is_known_node(d.outer_src) {
            return Verdict::Drop(DropReason::UnknownSourceNode);
        }
        // `decap` leaves at least an Ethernet header.
        if EthernetFrame::new_unchecked(frame.data()).src().is_multicast() {
            return Verdict::Drop(DropReason::InnerSrcMacMulticast);
        }
        let info = match flow::classify(frame.data()) {
            Ok(i) => i,
            Err(r) => return Verdict::Drop(r),
        };
        let (Some(src), Some(dst)) = (info.src, info.dst) else {
            return Verdict::Drop(DropReason::UnsupportedEtherType);
        };
        // The sender decremented the TTL; a packet that arrives with none left has expired.
        if ttl_of(frame.data(), &info) == 0 {
            return Verdict::Drop(DropReason::InnerTtlZero);
        }
        if !sent_by(fib, src, d.outer_src) {
            return Verdict::Drop(DropReason::InnerSpoofedSource);
        }
        match fib.route(dst) {
            Route::Local { port, mac } => {
                // A peer's veth may have left the inner checksum unfinished; the pod would drop it.
                if let Err(r) = offload::complete_checksum_with(frame.data_mut(), &info) {
                    return Verdict::Drop(r);
                }
                self.rewrite_eth(frame, mac);
                Verdict::Forward(port)
            }
            _ => Verdict::Drop(DropReason::NotLocalPod),
        }
    }

    fn pod_ingress<F: Fib>(
        &mut self,
        fib: &F,
        in_port: PortId,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
    ) -> Verdict<PortId> {
        // Stage: the access port. A pod's port is untagged, and a pod sends with its own MAC (a
        // port without a pod forwards nothing anyway: no source address is allowed on it).
        // (The outer TPID is read before parsing: a double-tagged frame is a tagged frame too.)
        if let Some(&[a, b]) = frame.data().get(12..14)
            && matches!(u16::from_be_bytes([a, b]), ethertype::VLAN | ethertype::QINQ)
        {
            return Verdict::Drop(DropReason::PodVlanTagged);
        }
        let eth = match EthernetFrame::new_checked(frame.data()) {
            Ok(e) => e,
            Err(r) => return Verdict::Drop(r),
        };
        if fib.port_mac(in_port).is_some_and(|m| m != eth.src()) {
            return Verdict::Drop(DropReason::PodSrcMacMismatch);
        }
        let to_gateway = eth.dst() == self.cfg.gateway_mac;
        // Stage: classify.
        let info = match flow::classify(frame.data()) {
            Ok(i) => i,
            Err(r) => return Verdict::Drop(r),
        };
        let (Some(src), Some(dst)) = (info.src, info.dst) else {
            return match info.l3 {
                L3::Other(ethertype::ARP) => self.answer_arp(frame),
                _ => Verdict::Drop(DropReason::UnsupportedEtherType),
            };
        };
        if info.l3 == L3::Ipv4 && !Ipv4Packet::new_unchecked(&frame.data()[info.l3_offset..]).verify_checksum() {
            return Verdict::Drop(DropReason::PodIpv4BadChecksum);
        }
        // Neighbour solicitations go to a multicast MAC; everything routed goes to the gateway.
        if info.l3 == L3::Ipv6 && info.protocol == protocol::ICMPV6 && is_ndisc(frame.data(), &info) {
            return self.answer_nd(frame, &info);
        }
        if !to_gateway {
            return Verdict::Drop(DropReason::PodDstMacNotGateway);
        }
        if !fib.source_allowed(in_port, src) {
            return Verdict::Drop(DropReason::SpoofedSource);
        }
        // (Stages policy and service go here, on `info`.)
        if let Err(r) = offload::complete_checksum_with(frame.data_mut(), &info) {
            return Verdict::Drop(r);
        }
        let ttl = ttl_of(frame.data(), &info);
        if ttl <= 1 {
            return self.icmp_error(frame, IcmpError::TimeExceeded, DropReason::TtlExceeded, counters);
        }
        // Stage: route.
        match fib.route(dst) {
            Route::Local { port, mac } => {
                decrement_ttl(frame, &info);
                self.rewrite_eth(frame, mac);
                Verdict::Forward(port)
            }
            Route::Remote { template, vtep_mac } => self.encap_stage(frame, &info, template, vtep_mac, counters),
            Route::Unresolved { .. } => Verdict::Drop(DropReason::NoNeighbour),
            Route::Blackhole => Verdict::Drop(DropReason::Blackhole),
            Route::NoRoute => Verdict::Drop(DropReason::NoRoute),
        }
    }

    /// Stage: encap.
    fn encap_stage(
        &mut self,
        frame: &mut FrameBuf<'_>,
        info: &FlowInfo,
        template: &TunnelTemplate,
        vtep_mac: MacAddr,
        counters: &mut PipelineCounters,
    ) -> Verdict<PortId> {
        // The whole inner frame, Ethernet header included, travels inside the outer IP packet.
        let budget = usize::from(self.cfg.underlay_mtu).saturating_sub(template.ip_overhead());
        if frame.len() > budget {
            let df = info.l3 == L3::Ipv6 || dont_fragment(frame.data(), info);
            if !df {
                return Verdict::Drop(DropReason::TooBigNoFragmentation);
            }
            // The MTU the pod should use: what is left for its IP packet.
            let mtu = u16::try_from(budget.saturating_sub(info.l3_offset)).unwrap_or(u16::MAX);
            return self.icmp_error(frame, IcmpError::TooBig { mtu }, DropReason::TooBig, counters);
        }
        decrement_ttl(frame, info);
        let mut eth = EthernetFrame::new_unchecked(frame.data_mut());
        eth.set_dst(vtep_mac);
        eth.set_src(self.cfg.vtep_mac);
        if frame.headroom() < template.overhead() {
            // The fallback: move the packet back to make room (a copy of all of it).
            if frame.make_headroom(template.overhead()).is_none() {
                return Verdict::Drop(DropReason::NoHeadroom);
            }
            counters.headroom_moves += 1;
        }
        match encap_with(template, frame, info.tos, info.hash) {
            Ok(()) => Verdict::Forward(self.cfg.uplink),
            Err(r) => Verdict::Drop(r),
        }
    }

    fn rewrite_eth(&self, frame: &mut FrameBuf<'_>, dst: MacAddr) {
        let mut eth = EthernetFrame::new_unchecked(frame.data_mut());
        eth.set_dst(dst);
        eth.set_src(self.cfg.gateway_mac);
    }

    /// Turn `frame` into an ICMP error back to its sender, if the rate limit and the RFCs allow.
    /// The original packet counts as dropped under `reason` either way.
    fn icmp_error(
        &mut self,
        frame: &mut FrameBuf<'_>,
        error: IcmpError,
        reason: DropReason,
        counters: &mut PipelineCounters,
    ) -> Verdict<PortId> {
        if !self.limiter.allow(self.now_ns) {
            return Verdict::Drop(reason);
        }
        let Ok(n) = icmp::build_error(error, frame.data(), &self.icmp_source, &mut self.scratch) else {
            return Verdict::Drop(reason);
        };
        if frame.set_len(n).is_none() {
            return Verdict::Drop(reason);
        }
        frame.data_mut().copy_from_slice(&self.scratch[..n]);
        counters.drops[reason as usize] += 1;
        counters.icmp_errors += 1;
        Verdict::Reply
    }

    /// Answer an ARP request for the gateway's IPv4 address in place.
    fn answer_arp(&self, frame: &mut FrameBuf<'_>) -> Verdict<PortId> {
        let Some(gw) = self.cfg.gateway_v4 else { return Verdict::Drop(DropReason::ArpNotForGateway) };
        let Ok(eth) = EthernetFrame::new_checked(frame.data()) else { return Verdict::Drop(DropReason::Truncated) };
        let off = eth.header_len();
        let Ok(arp) = ArpPacket::new_checked(&frame.data()[off..]) else { return Verdict::Drop(DropReason::Truncated) };
        let Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&arp)
        else {
            return Verdict::Drop(DropReason::ArpNotForGateway);
        };
        if target_protocol_addr != gw {
            return Verdict::Drop(DropReason::ArpNotForGateway);
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: smoltcp::wire::EthernetAddress(self.cfg.gateway_mac.0),
            source_protocol_addr: gw,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let requester = MacAddr(source_hardware_addr.0);
        if frame.set_len(off + reply.buffer_len()).is_none() {
            return Verdict::Drop(DropReason::Truncated);
        }
        reply.emit(&mut ArpPacket::new_unchecked(&mut frame.data_mut()[off..]));
        self.rewrite_eth(frame, requester);
        Verdict::Reply
    }

    /// Answer a neighbour solicitation for the gateway's IPv6 address in place.
    fn answer_nd(&self, frame: &mut FrameBuf<'_>, info: &FlowInfo) -> Verdict<PortId> {
        let Some(gw) = self.cfg.gateway_v6 else { return Verdict::Drop(DropReason::NdNotForGateway) };
        let off = info.l3_offset;
        let Ok(ip) = Ipv6Packet::new_checked(&frame.data()[off..]) else { return Verdict::Drop(DropReason::Truncated) };
        let Ok(ul) = ip.upper_layer() else { return Verdict::Drop(DropReason::Ipv6BadExtension) };
        let (src, dst) = (ip.src(), ip.dst());
        let end = off + ferry_encap::wire::ipv6::HEADER_LEN + usize::from(ip.payload_len());
        let icmp_bytes = &frame.data()[off + ul.offset..end];
        let caps = smoltcp_checksums();
        let Ok(icmp) = Icmpv6Packet::new_checked(icmp_bytes) else { return Verdict::Drop(DropReason::Truncated) };
        let Ok(Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, lladdr })) =
            Icmpv6Repr::parse(&src, &dst, &icmp, &caps)
        else {
            return Verdict::Drop(DropReason::NdNotForGateway);
        };
        if target_addr != gw {
            return Verdict::Drop(DropReason::NdNotForGateway);
        }
        // RFC 4861 7.2.4: answer the solicitation's source, or all nodes for DAD (unspecified source).
        let (reply_dst, solicited) =
            if src.is_unspecified() { (Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), false) } else { (src, true) };
        let requester = match lladdr {
            Some(ll) if ll.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(ll.as_bytes());
                MacAddr(m)
            }
            _ => EthernetFrame::new_unchecked(frame.data()).src(),
        };
        let mut flags = smoltcp::wire::NdiscNeighborFlags::ROUTER | smoltcp::wire::NdiscNeighborFlags::OVERRIDE;
        if solicited {
            flags |= smoltcp::wire::NdiscNeighborFlags::SOLICITED;
        }
        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr: gw,
            lladdr: Some(smoltcp::wire::RawHardwareAddress::from_bytes(&self.cfg.gateway_mac.0)),
        });
        let icmp_len = na.buffer_len();
        let ip6 = ferry_encap::wire::ipv6::Ipv6Repr {
            src: gw,
            dst: reply_dst,
            next_header: protocol::ICMPV6,
            traffic_class: 0,
            flow_label: 0,
            hop_limit: 255,
            payload_len: icmp_len as u16,
        };
        let l4 = off + ferry_encap::wire::ipv6::HEADER_LEN;
        if frame.set_len(l4 + icmp_len).is_none() {
            return Verdict::Drop(DropReason::Truncated);
        }
        ip6.emit(&mut frame.data_mut()[off..]);
        na.emit(&gw, &reply_dst, &mut Icmpv6Packet::new_unchecked(&mut frame.data_mut()[l4..]), &caps);
        self.rewrite_eth(frame, requester);
        Verdict::Reply
    }
}

/// Whether a decapsulated packet's source belongs to the node that sent it (`outer_src`): inside
/// that node's pod CIDRs (its overlay address among them), or the node's own underlay address (its
/// kernel answering a pod that talked to that address).
fn sent_by<F: Fib>(fib: &F, src: IpAddr, outer_src: IpAddr) -> bool {
    src == outer_src
        || match fib.route(src) {
            Route::Remote { template, .. } => template.remote() == outer_src,
            Route::Unresolved { underlay } => underlay == outer_src,
            Route::Local { .. } | Route::Blackhole | Route::NoRoute => false,
        }
}

fn smoltcp_checksums() -> smoltcp::phy::ChecksumCapabilities {
    smoltcp::phy::ChecksumCapabilities::default()
}

/// Whether an ICMPv6 packet is neighbour discovery (types 133-137), which ferry answers or drops
/// rather than forwards.
fn is_ndisc(frame: &[u8], info: &FlowInfo) -> bool {
    info.l4.and_then(|(start, _)| frame.get(start)).is_some_and(|t| (133..=137).contains(t))
}

fn ttl_of(frame: &[u8], info: &FlowInfo) -> u8 {
    // Classified IPv4 headers are at least 20 bytes and IPv6 headers 40, so both offsets exist.
    match info.l3 {
        L3::Ipv4 => frame[info.l3_offset + 8],
        _ => frame[info.l3_offset + 7],
    }
}

fn dont_fragment(frame: &[u8], info: &FlowInfo) -> bool {
    Ipv4Packet::new_unchecked(&frame[info.l3_offset..]).dont_frag()
}

fn decrement_ttl(frame: &mut FrameBuf<'_>, info: &FlowInfo) {
    let l3 = &mut frame.data_mut()[info.l3_offset..];
    match info.l3 {
        L3::Ipv4 => Ipv4Packet::new_unchecked(l3).decrement_ttl(),
        _ => Ipv6Packet::new_unchecked(l3).decrement_hop_limit(),
    }
}
