//! The forwarding pipeline: one frame and the port it came from in, one [`Verdict`] out (hot path).
//!
//! A frame moves through classify -> policy -> service -> route -> encap. Today the policy and
//! service stages are not written (NetworkPolicy and Service VIPs come later); they slot in between
//! [`Pipeline::pod_ingress`]'s anti-spoofing check and its route lookup, where the classified
//! [`FlowInfo`] is at hand, and each will return a verdict the same way.
//!
//! From a pod (or the host port): ARP and IPv6 neighbour solicitations for the gateway are
//! answered; IP packets are checked against the pod's own addresses, their unfinished checksums
//! completed, their TTL decremented (at 1: ICMP time exceeded), and forwarded to a local pod or
//! encapsulated toward a remote node (too big with DF, or IPv6: ICMP "fragmentation needed" /
//! "packet too big"). From the uplink: tunnel packets are validated and decapsulated, their outer
//! source must be a known node, and the inner packet must be for a local pod.
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
}

impl Default for PipelineCounters {
    fn default() -> Self {
        PipelineCounters { drops: [0; DropReason::COUNT], icmp_errors: 0 }
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
        let info = match flow::classify(frame.data()) {
            Ok(i) => i,
            Err(r) => return Verdict::Drop(r),
        };
        let Some(dst) = info.dst else { return Verdict::Drop(DropReason::UnsupportedEtherType) };
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
        if info.l3 == L3::Ipv6 && info.protocol == protocol::ICMPV6 && is_ndisc(frame.data(), &info) {
            return self.answer_nd(frame, &info);
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
        if frame.make_headroom(template.overhead()).is_none() {
            return Verdict::Drop(DropReason::NoHeadroom);
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
