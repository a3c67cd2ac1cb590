//! The forwarding pipeline: one frame and the port it came from in, one [`Verdict`] out (hot path).
//!
//! A frame is classified once into a [`Ctx`] (header offsets, addresses, the flow key and hash,
//! the TTL) that every later stage reads; no stage parses the headers again. A stage is a method
//! returning a [`Step`]: `Continue`, or `Done` with the packet's verdict. The two entry points
//! list their stages top to bottom:
//!
//! - from a pod: access port -> classify -> IP checks -> prepare (checksums, TTL) -> service
//!   (forward) -> policy -> service (reply) -> route -> encap, or delivery;
//! - from the uplink: decap -> classify -> the sender's checks -> delivery (policy, service
//!   reply).
//!
//! Delivery to a local pod ([`Pipeline`]'s `deliver`) is one function for both ways in (same node
//! and decapsulated), so the destination's stages (policy ingress, the reverse translation of a
//! service reply) run once whichever way a packet came.
//!
//! From a pod (or the host port), an untagged access port: 802.1Q-tagged frames are dropped, and
//! the source MAC must be the pod's. ARP and IPv6 neighbour solicitations for the gateway are
//! answered. IP packets must be addressed to the gateway's MAC, IPv4 headers must verify
//! (RFC 1812), and the source must be one of the pod's own addresses; then their unfinished
//! checksums are completed, their TTL decremented (at 1: ICMP time exceeded), and they are
//! forwarded to a local pod or encapsulated toward a remote node (too big with DF, or IPv6: ICMP
//! "fragmentation needed" / "packet too big"). A pod's packet for outside the cluster goes to the
//! node's kernel through the host port when the node has a [`HostExit`] (pods on taps, and veth
//! pods that NetworkPolicy selects).
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
use ferry_tables::policy::PolicyTables;
pub use ferry_tables::{PortId, Route};
use ferry_tables::{Services, Snapshot};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::conntrack::{Conntrack, Timeouts};
use crate::flows::{FlowTable, NO_SLOT};
use crate::service::{self, ExternalOutcome, Outcome, ReplyOutcome};
use crate::trace::{self as tr, NoTrace, Note, Recorder, RouteNote, ServiceNote, Trace};
use crate::xdp::offload::{FlowKey4, Offer, Offload, Prepared, Rewrite};

/// What the pipeline asks of the forwarding tables. The published [`Snapshot`] implements it (a
/// worker loads one per batch and passes it in); tests and benches may implement it with less.
pub trait Fib {
    /// The route for a destination (longest-prefix match).
    fn route(&self, dst: IpAddr) -> Route<'_>;

    /// Whether a pod (or host) port may send with this source address.
    fn source_allowed(&self, port: PortId, src: IpAddr) -> bool;

    /// Whether an underlay address belongs to a known node.
    fn is_known_node(&self, underlay: IpAddr) -> bool;

    /// For a known node's other underlay address (a node with both families, which sent from the
    /// one this node does not tunnel to), the address this node tunnels to it.
    fn node_alias(&self, _underlay: IpAddr) -> Option<IpAddr> {
        None
    }

    /// The MAC of the pod on a port (the only source MAC it may send with), if a pod is there.
    fn port_mac(&self, port: PortId) -> Option<MacAddr>;

    /// The services (VIPs and their backends).
    fn services(&self) -> &Services;

    /// The NetworkPolicy tables.
    fn policy(&self) -> &PolicyTables;
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
    fn node_alias(&self, underlay: IpAddr) -> Option<IpAddr> {
        Snapshot::node_alias(self, underlay)
    }

    #[inline]
    fn port_mac(&self, port: PortId) -> Option<MacAddr> {
        Snapshot::port_mac(self, port)
    }

    #[inline]
    fn services(&self) -> &Services {
        Snapshot::services(self)
    }

    #[inline]
    fn policy(&self) -> &PolicyTables {
        Snapshot::policy(self)
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
    /// Where a pod's packets for outside the cluster go, if anywhere (see [`HostExit`]); also
    /// the way out for replies to clients outside the cluster, and the way in to the node's kernel
    /// for what the uplink program handed over that no service takes.
    pub host_exit: Option<HostExit>,
    /// The node's IPv4 address in the pod network (its host port's overlay address): the source
    /// that connections from outside to a service with `externalTrafficPolicy: Cluster` are
    /// translated to, so that their replies come back through this node.
    pub snat_v4: Option<Ipv4Addr>,
    /// Likewise in IPv6.
    pub snat_v6: Option<Ipv6Addr>,
}

/// The node's kernel as a pod's way out of the cluster: a packet from a pod port to an address
/// outside the cluster's pod networks (the node's own underlay address, another host, the
/// internet) is routed to the host port, addressed to the kernel end's MAC, and the node's kernel
/// takes it from there as it would from a veth pod. A pod on a tap needs it, and a veth pod that
/// NetworkPolicy selects (its XDP program then hands ferry everything, to be judged); any other
/// veth pod's program hands such packets to the node's kernel before ferry sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostExit {
    /// The host port (never an exit for packets that came in on it: no loop).
    pub port: PortId,
    /// The MAC of the host port's kernel end.
    pub mac: MacAddr,
    /// The cluster's IPv4 pod networks: a destination inside them without a route is dropped
    /// (`no_route`), as before.
    pub cluster_v4: Vec<Ipv4Net>,
    /// The cluster's IPv6 pod networks.
    pub cluster_v6: Vec<Ipv6Net>,
}

impl HostExit {
    fn takes(&self, in_port: PortId, dst: IpAddr) -> bool {
        in_port != self.port && self.is_outside(dst)
    }

    /// Whether an address is outside the cluster's pod networks.
    fn is_outside(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => !self.cluster_v4.iter().any(|n| n.contains(&a)),
            IpAddr::V6(a) => !self.cluster_v6.iter().any(|n| n.contains(&a)),
        }
    }
}

/// What a stage decided: go on to the next stage, or this is the packet's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Step {
    /// The next stage decides.
    Continue,
    /// Final: no later stage runs.
    Done(Verdict<PortId>),
}

/// Run a stage; return its verdict from the calling function if it gave one.
macro_rules! step {
    ($stage:expr) => {
        if let Step::Done(v) = $stage {
            return v;
        }
    };
}

/// How a packet reached its delivery to a local pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// From a pod or the host port on this node (its checksums already completed).
    SameNode,
    /// Decapsulated from another node.
    Decapsulated,
}

/// The per-packet context: what classify found, parsed once, read by every later stage (none of
/// them parses the headers again): header offsets, addresses, protocol, ports, the flow hash and
/// the TTL. Only IP packets get one; ARP and other EtherTypes are answered or dropped before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    /// What [`flow::classify`] found (`src` and `dst` are always `Some`: read them with
    /// [`Ctx::src`] and [`Ctx::dst`]).
    pub flow: FlowInfo,
}

/// Classify an IP frame into a [`Ctx`] in place; `$not_ip` is the verdict for a frame that is not
/// IP. (A macro rather than a function returning `Result<Ctx, _>`: that result, re-wrapped, cost
/// 23 instructions per packet in copies.)
macro_rules! classify {
    ($frame:expr, $not_ip:expr) => {
        match flow::classify($frame) {
            Ok(flow) if flow.src.is_some() && flow.dst.is_some() => Ctx { flow },
            Ok(_) => return $not_ip,
            Err(r) => return Verdict::Drop(r),
        }
    };
}

impl Ctx {
    /// The source address.
    #[inline(always)]
    pub fn src(&self) -> IpAddr {
        // Classify made sure it is there.
        self.flow.src.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// The destination address.
    #[inline(always)]
    pub fn dst(&self) -> IpAddr {
        self.flow.dst.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// The TTL or hop limit as received.
    #[inline(always)]
    pub fn ttl(&self) -> u8 {
        self.flow.ttl
    }
}

/// Per-worker pipeline state.
#[derive(Debug)]
pub struct Pipeline {
    cfg: NodeConfig,
    icmp_source: ErrorSource,
    limiter: RateLimiter,
    scratch: Box<[u8]>,
    now_ns: u64,
    /// Connection tracking, shared with the other workers.
    conntrack: Arc<Conntrack>,
    /// Its clock, read at most once per batch, and only by a batch that has services to look up
    /// (`None` until then): a node without services never reads it.
    ct_now: Option<u32>,
    /// Flow records, when on ([`Pipeline::set_flows`]): classify finds the packet's slot, the
    /// stages note into it, the verdict ends it.
    flows: Option<FlowTable>,
    /// This packet's flow slot ([`NO_SLOT`]: none yet).
    flow_slot: usize,
    /// This packet's ingress port.
    flow_in: PortId,
    /// Flow offload, when on ([`Pipeline::set_offload`]): flows this pipeline allows and routes
    /// without translation are offered to it (TCP on its handshake, UDP on any packet).
    offload: Option<Arc<Offload>>,
    /// Offers made and not written yet, with when each was made ([`Pipeline::commit_offers`]).
    offers: Vec<(Prepared, u64)>,
}

/// How long a UDP flow's offer may wait for ferry's ports to be drained before it is written
/// anyway (a port that never drains is saturated: the flow is better off in the kernel).
const UDP_OFFER_WAIT_NS: u64 = 20_000_000;

/// Offers kept for [`Pipeline::commit_offers`]; beyond, a flow simply stays on ferry's path until
/// its next packet.
const MAX_PENDING_OFFERS: usize = 64;

/// Connection-tracking slots of a pipeline made with [`Pipeline::for_trace`] (64 KiB).
pub const TRACE_CONNTRACK_SLOTS: usize = 1 << 10;

/// Connection-tracking slots of a pipeline made with [`Pipeline::new`] (its own table; the agent
/// shares one among its workers with [`Pipeline::with_conntrack`]).
pub const OWN_CONNTRACK_SLOTS: usize = 1 << 14;

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
    /// A pipeline for a node, with a connection-tracking table of its own
    /// ([`OWN_CONNTRACK_SLOTS`]).
    pub fn new(cfg: NodeConfig) -> Self {
        Self::with_conntrack(cfg, Arc::new(Conntrack::new(OWN_CONNTRACK_SLOTS, Timeouts::default())))
    }

    /// A pipeline for a node that tracks connections in `conntrack` (shared by every worker).
    pub fn with_conntrack(cfg: NodeConfig, conntrack: Arc<Conntrack>) -> Self {
        let icmp_source = ErrorSource { mac: cfg.gateway_mac, ipv4: cfg.gateway_v4, ipv6: cfg.gateway_v6 };
        let limiter = RateLimiter::new(cfg.icmp_rate.0, cfg.icmp_rate.1);
        Pipeline {
            cfg,
            icmp_source,
            limiter,
            scratch: vec![0u8; icmp::MAX_ERROR_FRAME_LEN].into_boxed_slice(),
            now_ns: 0,
            ct_now: None,
            conntrack,
            flows: None,
            flow_slot: NO_SLOT,
            flow_in: PortId(0),
            offload: None,
            offers: Vec::new(),
        }
    }

    /// Offer connections to `offload` (off by default; see [`crate::xdp::offload`]).
    pub fn set_offload(&mut self, offload: Option<Arc<Offload>>) {
        self.offers = Vec::with_capacity(if offload.is_some() { MAX_PENDING_OFFERS } else { 0 });
        self.offload = offload;
    }

    /// The flow of a packet that may be offered, while offload is on: an IPv4 TCP packet that
    /// opens a connection (a SYN, with or without ACK), or an IPv4 UDP datagram.
    #[inline(always)]
    fn offer_key(&self, frame: &[u8], info: &FlowInfo) -> Option<FlowKey4> {
        self.offload.as_ref()?;
        offer_key(frame, info)
    }

    #[cold]
    fn offer(&mut self, (key, rewrite): (FlowKey4, Option<Rewrite>), offer: &Offer<'_>) {
        if let Some(o) = &self.offload
            && self.offers.len() < MAX_PENDING_OFFERS
            && let Some(p) = o.prepare(key, offer, rewrite)
        {
            self.offers.push((p, self.now_ns));
        }
    }

    /// Write the entries offered so far (the worker calls this after sending its iteration's
    /// packets: an entry never takes effect before the packet that made it left). A TCP flow's
    /// entry is written at once: its handshake is in flight, nothing of it is queued. A UDP flow
    /// streams on meanwhile, so its entry waits until ferry's ports were `drained` in this
    /// iteration (nothing of the flow is queued for ferry but what arrives in the next
    /// microseconds, which its [`crate::xdp::offload::UDP_ARM_DELAY`] covers), or
    /// [`UDP_OFFER_WAIT_NS`] at most.
    #[inline]
    pub fn commit_offers(&mut self, drained: bool) {
        if self.offers.is_empty() {
            return;
        }
        let Some(o) = &self.offload else { return };
        let now = self.now_ns;
        self.offers.retain(|(p, at)| {
            let due = !p.is_udp() || drained || now.saturating_sub(*at) >= UDP_OFFER_WAIT_NS;
            if due {
                o.commit(p);
            }
            !due
        });
    }

    /// Keep flow records in `flows` (off by default).
    pub fn set_flows(&mut self, flows: Option<FlowTable>) {
        self.flows = flows;
    }

    /// The flow records, when on.
    pub fn flows(&self) -> Option<&FlowTable> {
        self.flows.as_ref()
    }

    /// The flow records, when on.
    pub fn flows_mut(&mut self) -> Option<&mut FlowTable> {
        self.flows.as_mut()
    }

    /// The flow records, when on, the last packet's slot in them ([`NO_SLOT`]: not classified as
    /// IP) and the uplink's port; the caller records what became of the packet
    /// ([`FlowTable::outcome`]).
    #[inline(always)]
    pub fn flow_slot(&mut self) -> Option<(&mut FlowTable, usize, PortId)> {
        let (slot, uplink) = (self.flow_slot, self.cfg.uplink);
        self.flows.as_mut().map(|f| (f, slot, uplink))
    }

    /// The node configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Set the time used for rate limiting (call once per batch); connection tracking's clock is
    /// read again when the batch first needs it.
    pub fn set_time(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        self.ct_now = None;
    }

    /// Connection tracking's clock for this batch.
    #[inline]
    fn ct_now(&mut self) -> u32 {
        *self.ct_now.get_or_insert_with(|| self.conntrack.now())
    }

    /// The connection-tracking table.
    pub fn conntrack(&self) -> &Arc<Conntrack> {
        &self.conntrack
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
        self.process_with(fib, in_port, role, frame, counters, &mut NoTrace)
    }

    /// A pipeline for tracing ([`Pipeline::trace`]): a connection table of its own, so that a
    /// traced packet is judged as a new connection and leaves no entry in the live one.
    pub fn for_trace(cfg: NodeConfig) -> Self {
        Self::with_conntrack(cfg, Arc::new(Conntrack::new(TRACE_CONNTRACK_SLOTS, Timeouts::default())))
    }

    /// Run `frame` through the same stages as [`Pipeline::process`], noting each stage's decision
    /// (see [`crate::trace`]). Counters go to a scratch set; run it on a [`Pipeline::for_trace`]
    /// so that no live state changes.
    pub fn trace<F: Fib>(
        &mut self,
        fib: &F,
        in_port: PortId,
        role: PortRole,
        frame: &mut FrameBuf<'_>,
    ) -> (Verdict<PortId>, Trace) {
        let mut counters = PipelineCounters::default();
        let mut t = Trace::default();
        let v = self.process_with(fib, in_port, role, frame, &mut counters, &mut t);
        (v, t)
    }

    /// [`Pipeline::process`] with a [`Recorder`]: with [`NoTrace`] this is `process` itself (every
    /// recording site compiles away).
    #[inline(always)]
    pub fn process_with<F: Fib, R: Recorder>(
        &mut self,
        fib: &F,
        in_port: PortId,
        role: PortRole,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
        rec: &mut R,
    ) -> Verdict<PortId> {
        self.flow_slot = NO_SLOT;
        self.flow_in = in_port;
        let v = match role {
            PortRole::Uplink => self.uplink_ingress(fib, frame, counters, rec),
            PortRole::Pod => self.pod_ingress(fib, in_port, frame, counters, rec),
        };
        if let Verdict::Drop(r) = v {
            counters.drops[r as usize] += 1;
        }
        v
    }

    /// The stages of a tunnel packet: decap, classify, the checks on what the sender may send,
    /// then delivery to a local destination.
    fn uplink_ingress<F: Fib, R: Recorder>(
        &mut self,
        fib: &F,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
        rec: &mut R,
    ) -> Verdict<PortId> {
        // The uplink program hands over services' frontends too (node ports, external IPs).
        if fib.services().has_external() && !is_tunnel(frame.data(), self.cfg.decap.port) {
            return self.external_ingress(fib, frame, counters, rec);
        }
        // The sender's outer UDP source port, for flow offload (read before decap removes it).
        let outer_sport = if self.offload.is_some() { outer_source_port(frame.data()) } else { None };
        let outer_src = match decap(&self.cfg.decap, frame) {
            Ok(d) => {
                if R::ON {
                    rec.note(Note::Decapsulated { outer_src: d.outer_src, vni: d.vni });
                }
                d.outer_src
            }
            Err(r) => return Verdict::Drop(r),
        };
        let known = fib.is_known_node(outer_src);
        if R::ON {
            rec.note(Note::KnownNode { outer_src, known });
        }
        if !known {
            return Verdict::Drop(DropReason::UnknownSourceNode);
        }
        // `decap` leaves at least an Ethernet header.
        if EthernetFrame::new_unchecked(frame.data()).src().is_multicast() {
            return Verdict::Drop(DropReason::InnerSrcMacMulticast);
        }
        let mut ctx = classify!(frame.data(), Verdict::Drop(DropReason::UnsupportedEtherType));
        self.observe(&ctx, frame);
        note_classified(rec, &ctx);
        step!(self.decapsulated_checks(fib, &ctx, outer_src));
        if R::ON {
            rec.note(Note::SenderChecked { outer_src });
        }
        let opening = self.offer_key(frame.data(), &ctx.flow);
        let route = fib.route(ctx.dst());
        note_route(rec, &route);
        match route {
            Route::Local { port, mac } => {
                let v = self.deliver(fib, &mut ctx, frame, port, mac, Arrival::Decapsulated, rec);
                // A UDP flow only once its sender moves it in the kernel (its outer source port is
                // then the flow's, 49152 and up; ferry's socket path sends from the tunnel port):
                // what the sender's ferry sent before is then behind us in our queue, not
                // overtaken by what our program would decapsulate.
                // A service's reply gets its source translated on delivery; the program repeats it.
                let offered = opening
                    .filter(|k| k.proto != protocol::UDP || outer_sport.is_some_and(|p| p >= 49152))
                    .and_then(|k| translation(k, frame.data(), &ctx.flow));
                if let (Some(key), Verdict::Forward(to), IpAddr::V4(remote)) = (offered, v, outer_src) {
                    let src_mac = self.cfg.gateway_mac;
                    self.offer(key, &Offer::Decap { remote, to, dst_mac: mac, src_mac });
                }
                v
            }
            _ => Verdict::Drop(DropReason::NotLocalPod),
        }
    }

    /// The stages of a plain packet from outside the cluster on the uplink (to a node port, an
    /// external IP or a load-balancer IP): the destination MAC, classify, the IPv4 header and TTL,
    /// checksum completion, the service's external translation, then delivery to a local backend
    /// (with its ingress policy) or encap toward the backend's node. What no service takes goes to
    /// the node's kernel through the host port, as if the uplink program had passed it.
    fn external_ingress<F: Fib, R: Recorder>(
        &mut self,
        fib: &F,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
        rec: &mut R,
    ) -> Verdict<PortId> {
        if let Some(m) = self.cfg.decap.local_mac
            && frame.data().get(0..6).is_some_and(|d| d != m.0)
        {
            return Verdict::Drop(DropReason::OuterDstMacNotOurs);
        }
        let mut ctx = classify!(frame.data(), Verdict::Drop(DropReason::UnsupportedEtherType));
        self.observe(&ctx, frame);
        let info = &ctx.flow;
        if info.l3 == L3::Ipv4 && !Ipv4Packet::new_unchecked(&frame.data()[info.l3_offset..]).verify_checksum() {
            return Verdict::Drop(DropReason::ExternalBadHeader);
        }
        if ctx.ttl() <= 1 {
            return Verdict::Drop(DropReason::ExternalBadHeader);
        }
        if let Err(r) = offload::complete_checksum_with(frame.data_mut(), &ctx.flow) {
            return Verdict::Drop(r);
        }
        let node_addr = match ctx.dst() {
            IpAddr::V4(a) => self.cfg.decap.local_v4 == Some(a),
            IpAddr::V6(a) => self.cfg.decap.local_v6 == Some(a),
        };
        let snat = self.snat_for(ctx.src());
        let now = self.ct_now();
        match service::external(&self.conntrack, now, fib.services(), &mut ctx, frame.data_mut(), node_addr, snat) {
            ExternalOutcome::Translated => {
                if let Some(flows) = self.flows.as_mut() {
                    flows.translated(self.flow_slot, ctx.dst(), ctx.flow.ports.1);
                }
            }
            ExternalOutcome::NotService => return self.to_kernel(frame),
            ExternalOutcome::NoEndpoint => return self.reject_external(&ctx, frame, counters),
            ExternalOutcome::NoLocalEndpoint => return Verdict::Drop(DropReason::ExternalNoLocalEndpoint),
            ExternalOutcome::BackendGone => return Verdict::Drop(DropReason::ServiceBackendGone),
            ExternalOutcome::NoSnat => return Verdict::Drop(DropReason::ExternalSnatExhausted),
        }
        match fib.route(ctx.dst()) {
            Route::Local { port, mac } => {
                decrement_ttl(frame, &ctx.flow);
                // The backend's ingress rules, on its real address (and the client's, or under
                // `Cluster` the node's, as the source).
                step!(self.policy_stage(fib, &ctx, frame, rec));
                self.rewrite_eth(frame, mac);
                Verdict::Forward(port)
            }
            Route::Remote { template, vtep_mac } => {
                self.encap_stage(frame, &ctx.flow, template, vtep_mac, counters, rec)
            }
            Route::Unresolved { .. } => Verdict::Drop(DropReason::NoNeighbour),
            Route::Blackhole => Verdict::Drop(DropReason::Blackhole),
            Route::NoRoute => Verdict::Drop(DropReason::NoRoute),
        }
    }

    /// The node's address in the pod network in `a`'s family (see [`NodeConfig::snat_v4`]).
    #[inline]
    fn snat_for(&self, a: IpAddr) -> Option<IpAddr> {
        match a {
            IpAddr::V4(_) => self.cfg.snat_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.cfg.snat_v6.map(IpAddr::V6),
        }
    }

    /// A frame from the uplink that the uplink program handed over but no service takes (the
    /// services changed since the program's map was written): to the node's kernel through the
    /// host port, unchanged but for its Ethernet header, as if the program had passed it.
    fn to_kernel(&self, frame: &mut FrameBuf<'_>) -> Verdict<PortId> {
        match &self.cfg.host_exit {
            Some(h) => {
                self.rewrite_eth(frame, h.mac);
                Verdict::Forward(h.port)
            }
            None => Verdict::Drop(DropReason::NoRoute),
        }
    }

    /// Refuse a connection from outside to a service without endpoints, as [`Pipeline::reject`]
    /// does, but from the node's uplink: its MAC, and (ICMP) its address.
    fn reject_external(
        &mut self,
        ctx: &Ctx,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
    ) -> Verdict<PortId> {
        let reason = DropReason::ServiceNoEndpoint;
        let mac = self.cfg.decap.local_mac.unwrap_or(self.cfg.gateway_mac);
        if !self.limiter.allow(self.now_ns) {
            return Verdict::Drop(reason);
        }
        if ctx.flow.protocol != protocol::TCP {
            let source = ErrorSource { mac, ipv4: self.cfg.decap.local_v4, ipv6: self.cfg.decap.local_v6 };
            let Ok(n) = icmp::build_error(IcmpError::PortUnreachable, frame.data(), &source, &mut self.scratch) else {
                return Verdict::Drop(reason);
            };
            if frame.set_len(n).is_none() {
                return Verdict::Drop(reason);
            }
            frame.data_mut().copy_from_slice(&self.scratch[..n]);
            counters.drops[reason as usize] += 1;
            counters.icmp_errors += 1;
            return Verdict::Reply;
        }
        let Some(n) = crate::nat::tcp_reset(frame.data_mut(), ctx, mac.0) else {
            return Verdict::Drop(reason);
        };
        if frame.set_len(n).is_none() {
            return Verdict::Drop(reason);
        }
        counters.drops[reason as usize] += 1;
        Verdict::Reply
    }

    /// The stages of a frame from a pod (or the host port): the access port, classify, the IP
    /// checks and anti-spoofing, [policy, service], checksum completion and TTL, then route:
    /// delivery to a local pod or encap toward its node.
    fn pod_ingress<F: Fib, R: Recorder>(
        &mut self,
        fib: &F,
        in_port: PortId,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
        rec: &mut R,
    ) -> Verdict<PortId> {
        step!(self.access_port(fib, in_port, frame));
        if R::ON {
            rec.note(Note::AccessPort { port: in_port, src_mac: EthernetFrame::new_unchecked(frame.data()).src() });
        }
        let mut ctx = classify!(
            frame.data(),
            if is_arp(frame.data()) { self.answer_arp(frame) } else { Verdict::Drop(DropReason::UnsupportedEtherType) }
        );
        self.observe(&ctx, frame);
        note_classified(rec, &ctx);
        step!(self.pod_ip_checks(fib, in_port, &ctx, frame));
        if R::ON {
            rec.note(Note::SourceAllowed { port: in_port, src: ctx.src() });
        }
        step!(self.prepare_forward(&ctx, frame, counters));
        let opening = self.offer_key(frame.data(), &ctx.flow);
        // Policy between the service's two halves: on the pods' real addresses (see `policy`).
        let translated = match self.service_stage(fib, &mut ctx, frame, counters, rec) {
            Ok(t) => t,
            Err(v) => return v,
        };
        step!(self.policy_stage(fib, &ctx, frame, rec));
        if !translated {
            self.service_reply_stage(fib, &mut ctx, frame, rec);
        }
        // Offered with the service translation of one end, which the program repeats (a pod
        // reaching itself through its service has both translated: it stays ferry's).
        let opening = opening.and_then(|k| translation(k, frame.data(), &ctx.flow));
        let route = fib.route(ctx.dst());
        note_route(rec, &route);
        match route {
            Route::Local { port, mac } => {
                decrement_ttl(frame, &ctx.flow);
                let v = self.deliver(fib, &mut ctx, frame, port, mac, Arrival::SameNode, rec);
                if let (Some(key), Verdict::Forward(to)) = (opening, v) {
                    let src_mac = self.cfg.gateway_mac;
                    self.offer(key, &Offer::Local { from: in_port, to, dst_mac: mac, src_mac });
                }
                v
            }
            Route::Remote { template, vtep_mac } => {
                if let Some(key) = opening {
                    let max_len = usize::from(self.cfg.underlay_mtu).saturating_sub(template.ip_overhead());
                    let offer = Offer::Encap {
                        from: in_port,
                        template,
                        inner_dst: vtep_mac,
                        inner_src: self.cfg.vtep_mac,
                        src_port: flow::source_port(ctx.flow.hash),
                        max_len: u16::try_from(max_len).unwrap_or(u16::MAX),
                    };
                    // Written once the packet left (the end of the worker's iteration): for TCP
                    // before the answer to its SYN can come, for UDP armed a little later.
                    self.offer(key, &offer);
                }
                let v = self.encap_stage(frame, &ctx.flow, template, vtep_mac, counters, rec);
                if translated && v == Verdict::Reply {
                    self.untranslate_own_error(fib, frame);
                }
                v
            }
            Route::Unresolved { .. } => Verdict::Drop(DropReason::NoNeighbour),
            Route::Blackhole => Verdict::Drop(DropReason::Blackhole),
            Route::NoRoute => self.host_exit_stage(in_port, &ctx, frame, rec),
        }
    }

    /// Count the classified packet in its flow's record (a test of an `Option` when flows are
    /// off).
    #[inline(always)]
    fn observe(&mut self, ctx: &Ctx, frame: &FrameBuf<'_>) {
        if let Some(flows) = self.flows.as_mut() {
            self.flow_slot = flows.hit(&ctx.flow, frame.data(), self.flow_in.0, self.now_ns);
        }
    }

    /// Stage (from a pod, no route): out of the cluster through the node's kernel, where the node
    /// has a [`HostExit`] and the destination is outside the cluster's pod networks.
    #[inline]
    fn host_exit_stage<R: Recorder>(
        &self,
        in_port: PortId,
        ctx: &Ctx,
        frame: &mut FrameBuf<'_>,
        rec: &mut R,
    ) -> Verdict<PortId> {
        match &self.cfg.host_exit {
            Some(h) if h.takes(in_port, ctx.dst()) => {
                if R::ON {
                    rec.note(Note::HostExit { port: h.port });
                }
                decrement_ttl(frame, &ctx.flow);
                self.rewrite_eth(frame, h.mac);
                Verdict::Forward(h.port)
            }
            _ => Verdict::Drop(DropReason::NoRoute),
        }
    }

    /// Stage (from a pod): the access port. A pod's port is untagged, and a pod sends with its own
    /// MAC (a port without a pod forwards nothing anyway: no source address is allowed on it). The
    /// outer TPID is read before parsing: a double-tagged frame is a tagged frame too.
    #[inline]
    fn access_port<F: Fib>(&self, fib: &F, in_port: PortId, frame: &FrameBuf<'_>) -> Step {
        if let Some(&[a, b]) = frame.data().get(12..14)
            && matches!(u16::from_be_bytes([a, b]), ethertype::VLAN | ethertype::QINQ)
        {
            return Step::Done(Verdict::Drop(DropReason::PodVlanTagged));
        }
        let eth = match EthernetFrame::new_checked(frame.data()) {
            Ok(e) => e,
            Err(r) => return Step::Done(Verdict::Drop(r)),
        };
        if fib.port_mac(in_port).is_some_and(|m| m != eth.src()) {
            return Step::Done(Verdict::Drop(DropReason::PodSrcMacMismatch));
        }
        Step::Continue
    }

    /// Stage (from a pod): the IPv4 header checksum (RFC 1812), neighbour solicitations (answered),
    /// the gateway as destination MAC, and the pod's own source address (anti-spoofing).
    #[inline(always)]
    fn pod_ip_checks<F: Fib>(&self, fib: &F, in_port: PortId, ctx: &Ctx, frame: &mut FrameBuf<'_>) -> Step {
        let info = &ctx.flow;
        if info.l3 == L3::Ipv4 && !Ipv4Packet::new_unchecked(&frame.data()[info.l3_offset..]).verify_checksum() {
            return Step::Done(Verdict::Drop(DropReason::PodIpv4BadChecksum));
        }
        // Neighbour solicitations go to a multicast MAC; everything routed goes to the gateway.
        if info.l3 == L3::Ipv6 && info.protocol == protocol::ICMPV6 && is_ndisc(frame.data(), info) {
            return Step::Done(self.answer_nd(frame, info));
        }
        if EthernetFrame::new_unchecked(frame.data()).dst() != self.cfg.gateway_mac {
            return Step::Done(Verdict::Drop(DropReason::PodDstMacNotGateway));
        }
        if !fib.source_allowed(in_port, ctx.src()) && !self.routed_from_outside(in_port, ctx.src()) {
            return Step::Done(Verdict::Drop(DropReason::SpoofedSource));
        }
        Step::Continue
    }

    /// Whether the node's kernel sends, through the host port, a packet from outside the cluster's
    /// pod networks: a reply to a pod's connection to the outside (which left through the host
    /// exit or the pod's veth), or traffic the kernel routes to a pod. Not a spoof: the kernel is
    /// the way in from outside; the destination's ingress rules judge it. (A cluster source from
    /// the host port other than the node's own addresses still is one.)
    #[cold]
    fn routed_from_outside(&self, in_port: PortId, src: IpAddr) -> bool {
        self.cfg.host_exit.as_ref().is_some_and(|h| h.port == in_port && h.is_outside(src))
    }

    /// Stage (from a pod, before routing): complete the checksums a veth left unfinished, and
    /// answer a packet whose TTL runs out here with ICMP time exceeded.
    #[inline]
    fn prepare_forward(&mut self, ctx: &Ctx, frame: &mut FrameBuf<'_>, counters: &mut PipelineCounters) -> Step {
        if let Err(r) = offload::complete_checksum_with(frame.data_mut(), &ctx.flow) {
            return Step::Done(Verdict::Drop(r));
        }
        if ctx.ttl() <= 1 {
            return Step::Done(self.icmp_error(frame, IcmpError::TimeExceeded, DropReason::TtlExceeded, counters));
        }
        Step::Continue
    }

    /// Stage (from a pod, checksums final): services, the forward half. A packet to a service VIP
    /// is translated to its backend (`Ok(true)`), or refused (no endpoint, or its backend gone).
    #[inline]
    fn service_stage<F: Fib, R: Recorder>(
        &mut self,
        fib: &F,
        ctx: &mut Ctx,
        frame: &mut FrameBuf<'_>,
        counters: &mut PipelineCounters,
        rec: &mut R,
    ) -> Result<bool, Verdict<PortId>> {
        let services = fib.services();
        if services.is_empty() {
            return Ok(false);
        }
        let hairpin_src = match ctx.src() {
            IpAddr::V4(_) => self.cfg.gateway_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.cfg.gateway_v6.map(IpAddr::V6),
        };
        let now = self.ct_now();
        let before = if R::ON { Some((*ctx, self.tracked(ctx))) } else { None };
        let outcome = service::forward(&self.conntrack, now, services, ctx, frame.data_mut(), hairpin_src);
        if R::ON
            && let Some((orig, tracked)) = before
        {
            note_service(rec, services, &orig, ctx, outcome, tracked);
        }
        match outcome {
            Outcome::Translated => {
                if let Some(flows) = self.flows.as_mut() {
                    flows.translated(self.flow_slot, ctx.dst(), ctx.flow.ports.1);
                }
                Ok(true)
            }
            Outcome::NotService => Ok(false),
            Outcome::BackendGone => Err(Verdict::Drop(DropReason::ServiceBackendGone)),
            Outcome::NoEndpoint => Err(self.reject(ctx, frame, counters)),
        }
    }

    /// Stage (from a pod, after policy): services, the reverse half. A reply from a backend on this
    /// node to a client on this node (or to itself, hairpin) gets the VIP back.
    #[inline]
    fn service_reply_stage<F: Fib, R: Recorder>(
        &mut self,
        fib: &F,
        ctx: &mut Ctx,
        frame: &mut FrameBuf<'_>,
        rec: &mut R,
    ) {
        let services = fib.services();
        if !services.is_empty() {
            let now = self.ct_now();
            let snat = self.snat_for(ctx.dst());
            let out = service::reply(&self.conntrack, now, services, ctx, frame.data_mut(), snat);
            if R::ON && out != ReplyOutcome::NotReply {
                rec.note(Note::ServiceReply { vip: ctx.src(), port: ctx.flow.ports.0 });
            }
        }
    }

    /// An ICMP error ferry made (too big for the tunnel) from a packet the service stage had
    /// translated: it quotes the backend; the client must see the service's address and port.
    #[cold]
    fn untranslate_own_error<F: Fib>(&mut self, fib: &F, frame: &mut FrameBuf<'_>) {
        if let Ok(flow) = flow::classify(frame.data())
            && flow.src.is_some()
            && flow.dst.is_some()
        {
            let mut ctx = Ctx { flow };
            let now = self.ct_now();
            let _ = service::reply(&self.conntrack, now, fib.services(), &mut ctx, frame.data_mut(), None);
        }
    }

    /// Whether connection tracking holds the packet's tuple (a trace's service note).
    fn tracked(&self, ctx: &Ctx) -> bool {
        let (sport, dport) = ctx.flow.ports;
        let t = crate::conntrack::Tuple { src: ctx.src(), dst: ctx.dst(), sport, dport, proto: ctx.flow.protocol };
        self.conntrack.lookup(&t).is_some()
    }

    /// Stage: NetworkPolicy (see [`crate::policy`]), on the pods' real addresses. From a pod: its
    /// egress rules, and a local destination's ingress rules; on decapsulated delivery: the
    /// destination's ingress rules. A node where no pod is isolated pays one check.
    #[inline]
    fn policy_stage<F: Fib, R: Recorder>(&mut self, fib: &F, ctx: &Ctx, frame: &FrameBuf<'_>, rec: &mut R) -> Step {
        let tables = fib.policy();
        if R::ON {
            // The port the stage judges: the destination port where it has one it tracks.
            let proto = ctx.flow.protocol;
            let port = match (crate::policy::record_proto(proto), ctx.flow.l4) {
                (Some(_), Some(_)) => ctx.flow.ports.1,
                _ => 0,
            };
            rec.note(Note::Policy(tables.explain(ctx.src(), ctx.dst(), proto, port)));
        }
        if tables.is_empty() {
            return Step::Continue;
        }
        let now = self.ct_now();
        match crate::policy::check(&self.conntrack, now, tables, ctx, frame.data()) {
            Ok(by) => {
                if let Some(flows) = self.flows.as_mut() {
                    flows.policy(self.flow_slot, by, tables.generation());
                }
                Step::Continue
            }
            Err(d) => {
                if let Some(flows) = self.flows.as_mut() {
                    flows.policy(self.flow_slot, d.by, tables.generation());
                }
                Step::Done(Verdict::Drop(d.reason))
            }
        }
    }

    /// Refuse a connection to a service without endpoints as kube-proxy does: TCP with a RST, the
    /// rest with ICMP port unreachable (both rate limited like every ICMP error ferry sends).
    fn reject(&mut self, ctx: &Ctx, frame: &mut FrameBuf<'_>, counters: &mut PipelineCounters) -> Verdict<PortId> {
        let reason = DropReason::ServiceNoEndpoint;
        if ctx.flow.protocol != protocol::TCP {
            return self.icmp_error(frame, IcmpError::PortUnreachable, reason, counters);
        }
        if !self.limiter.allow(self.now_ns) {
            return Verdict::Drop(reason);
        }
        let Some(n) = crate::nat::tcp_reset(frame.data_mut(), ctx, self.cfg.gateway_mac.0) else {
            return Verdict::Drop(reason);
        };
        if frame.set_len(n).is_none() {
            return Verdict::Drop(reason);
        }
        counters.drops[reason as usize] += 1;
        Verdict::Reply
    }

    /// Stage (decapsulated): what the sending node may send. The TTL is not spent (the sender
    /// decremented it), and the source is one of the sender's.
    #[inline(always)]
    fn decapsulated_checks<F: Fib>(&self, fib: &F, ctx: &Ctx, outer_src: IpAddr) -> Step {
        if ctx.ttl() == 0 {
            return Step::Done(Verdict::Drop(DropReason::InnerTtlZero));
        }
        if !sent_by(fib, ctx.src(), outer_src) {
            return Step::Done(Verdict::Drop(DropReason::InnerSpoofedSource));
        }
        Step::Continue
    }

    /// Delivery to a pod (or the host port) on this node: the destination's stages, then the
    /// Ethernet rewrite. Both ways in end here, so a stage that belongs to the receiving pod
    /// (policy ingress, the reverse translation of a service reply) runs once whichever way the
    /// packet came.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn deliver<F: Fib, R: Recorder>(
        &mut self,
        fib: &F,
        ctx: &mut Ctx,
        frame: &mut FrameBuf<'_>,
        port: PortId,
        mac: MacAddr,
        arrival: Arrival,
        rec: &mut R,
    ) -> Verdict<PortId> {
        if arrival == Arrival::Decapsulated {
            // A peer's veth may have left the inner checksum unfinished; the pod would drop it.
            // (From a pod on this node it was completed before routing.)
            if let Err(r) = offload::complete_checksum_with(frame.data_mut(), &ctx.flow) {
                return Verdict::Drop(r);
            }
            // The destination's ingress rules. (From a pod on this node the policy stage has
            // judged both ends already.)
            step!(self.policy_stage(fib, ctx, frame, rec));
            // A service reply to a client on this node. (From a pod on this node the service
            // stage has looked already.)
            let services = fib.services();
            if !services.is_empty() {
                let now = self.ct_now();
                let snat = self.snat_for(ctx.dst());
                // A reply to a client outside the cluster (a `Cluster` connection from outside, to
                // this node's address) leaves through the node's kernel.
                let out = service::reply(&self.conntrack, now, services, ctx, frame.data_mut(), snat);
                if R::ON && out != ReplyOutcome::NotReply {
                    rec.note(Note::ServiceReply { vip: ctx.src(), port: ctx.flow.ports.0 });
                }
                if out == ReplyOutcome::External {
                    return self.host_exit_stage(self.cfg.uplink, ctx, frame, rec);
                }
            }
        }
        if R::ON {
            rec.note(Note::Deliver { port, mac });
        }
        self.rewrite_eth(frame, mac);
        Verdict::Forward(port)
    }

    /// Stage: encap.
    fn encap_stage<R: Recorder>(
        &mut self,
        frame: &mut FrameBuf<'_>,
        info: &FlowInfo,
        template: &TunnelTemplate,
        vtep_mac: MacAddr,
        counters: &mut PipelineCounters,
        rec: &mut R,
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
            Ok(()) => {
                if R::ON {
                    rec.note(Note::Encap {
                        kind: template.kind(),
                        vni: template.vni(),
                        udp_port: template.dst_port(),
                        remote: template.remote(),
                        outer_len: frame.len(),
                    });
                }
                Verdict::Forward(self.cfg.uplink)
            }
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

/// Note what classify found (tracing only).
#[inline(always)]
fn note_classified<R: Recorder>(rec: &mut R, ctx: &Ctx) {
    if R::ON {
        rec.note(Note::Classified {
            src: ctx.src(),
            dst: ctx.dst(),
            protocol: ctx.flow.protocol,
            ports: ctx.flow.ports,
            ttl: ctx.ttl(),
            hash: ctx.flow.hash,
        });
    }
}

/// Note a route lookup's answer (tracing only).
#[inline(always)]
fn note_route<R: Recorder>(rec: &mut R, route: &Route<'_>) {
    if R::ON {
        rec.note(Note::Route(match *route {
            Route::Local { port, mac } => RouteNote::Local { port, mac },
            Route::Remote { template, vtep_mac } => {
                RouteNote::Remote { underlay: template.remote(), next_hop_mac: template.next_hop_mac(), vtep_mac }
            }
            Route::Unresolved { underlay } => RouteNote::Unresolved { underlay },
            Route::Blackhole => RouteNote::Blackhole,
            Route::NoRoute => RouteNote::NoRoute,
        }));
    }
}

/// Note what the service stage did with a packet to a service (tracing only): `orig` is the
/// packet's context before the stage, `ctx` after it.
#[cold]
fn note_service<R: Recorder>(rec: &mut R, services: &Services, orig: &Ctx, ctx: &Ctx, outcome: Outcome, tracked: bool) {
    let (vip, port) = (orig.dst(), orig.flow.ports.1);
    let Some(svc) = services.lookup(vip, port, orig.flow.protocol) else { return };
    let pick = if tracked {
        tr::Pick::Tracked
    } else if let Some(t) = svc.affinity() {
        tr::Pick::Affinity { timeout_s: t.as_secs() }
    } else {
        tr::Pick::Maglev { slot: svc.slot(orig.flow.hash), slots: svc.table().len() }
    };
    rec.note(Note::Service(ServiceNote {
        service: svc.name().to_owned(),
        vip,
        port,
        backend: (outcome == Outcome::Translated).then(|| (ctx.dst(), ctx.flow.ports.1)),
        pick,
        backends: svc.backends().len(),
        terminating_fallback: svc.terminating_fallback(),
        refused: match outcome {
            Outcome::NoEndpoint => Some(DropReason::ServiceNoEndpoint),
            Outcome::BackendGone => Some(DropReason::ServiceBackendGone),
            Outcome::Translated | Outcome::NotService => None,
        },
    }));
}

/// Whether a decapsulated packet's source belongs to the node that sent it (`outer_src`): inside
/// that node's pod CIDRs (its overlay address among them), or one of the node's own underlay
/// addresses (its kernel answering a pod that talked to that address).
#[inline(always)]
fn sent_by<F: Fib>(fib: &F, src: IpAddr, outer_src: IpAddr) -> bool {
    if src == outer_src {
        return true;
    }
    // A node with both families may send from the one this node does not tunnel to (its own
    // preference, or the only family it shares with a third node it also talks to), and its
    // kernel may answer from either of its addresses.
    let node_of = |a: IpAddr| fib.node_alias(a).unwrap_or(a);
    let node = match fib.route(src) {
        Route::Remote { template, .. } => template.remote(),
        Route::Unresolved { underlay } => underlay,
        Route::Local { .. } | Route::Blackhole | Route::NoRoute => {
            return fib.is_known_node(src) && node_of(src) == node_of(outer_src);
        }
    };
    node == outer_src || node_of(outer_src) == node
}

fn smoltcp_checksums() -> smoltcp::phy::ChecksumCapabilities {
    smoltcp::phy::ChecksumCapabilities::default()
}

/// Whether an ICMPv6 packet is neighbour discovery (types 133-137), which ferry answers or drops
/// rather than forwards.
fn is_ndisc(frame: &[u8], info: &FlowInfo) -> bool {
    info.l4.and_then(|(start, _)| frame.get(start)).is_some_and(|t| (133..=137).contains(t))
}

/// Whether a frame from the uplink is UDP to the tunnel port (else it is for a service's frontend:
/// the uplink program hands over nothing else). Reads a few bytes; a frame too short or too odd
/// to tell counts as a tunnel packet, which decap then judges (and counts) as before.
#[inline]
fn is_tunnel(frame: &[u8], port: u16) -> bool {
    let be16 = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let mut l3 = 14;
    let mut ethertype = be16(12);
    if matches!(ethertype, Some(ethertype::VLAN | ethertype::QINQ)) {
        ethertype = be16(16);
        l3 = 18;
    }
    let udp = match ethertype {
        Some(ethertype::IPV4) => match (frame.get(l3), frame.get(l3 + 9)) {
            (Some(&vihl), Some(&proto)) => {
                if proto != protocol::UDP {
                    return false;
                }
                l3 + usize::from(vihl & 0x0f) * 4
            }
            _ => return true,
        },
        Some(ethertype::IPV6) => match frame.get(l3 + 6) {
            Some(&protocol::UDP) => l3 + 40,
            // A first fragment: decap refuses it (`outer_fragment`) as before.
            Some(44) => return true,
            Some(_) => return false,
            None => return true,
        },
        _ => return true,
    };
    be16(udp + 2).is_none_or(|p| p == port)
}

/// Whether an Ethernet frame (untagged: a pod's frames are) carries ARP.
fn is_arp(frame: &[u8]) -> bool {
    frame.get(12..14).is_some_and(|t| t == ethertype::ARP.to_be_bytes())
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

/// The outer UDP source port of a tunnel frame (Ethernet, IPv4 or IPv6 without extension headers,
/// UDP).
fn outer_source_port(frame: &[u8]) -> Option<u16> {
    let l4 = match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        ethertype::IPV4 => 14 + usize::from(frame.get(14)? & 0x0f) * 4,
        ethertype::IPV6 => 14 + 40,
        _ => return None,
    };
    Some(u16::from_be_bytes([*frame.get(l4)?, *frame.get(l4 + 1)?]))
}

/// Flow `before` (the packet as it came in) with what the stages did to it since (the packet now
/// in `frame`), if the offload's programs can repeat that: nothing, or one end translated.
fn translation(before: FlowKey4, frame: &[u8], info: &FlowInfo) -> Option<(FlowKey4, Option<Rewrite>)> {
    let after = offer_key(frame, info)?;
    Some((before, Rewrite::between(&before, &after)?))
}

/// The flow of a packet that may be offloaded: IPv4 without options, not a fragment, and either
/// TCP opening a connection (SYN set, with or without ACK; RST and FIN clear) or UDP.
fn offer_key(frame: &[u8], info: &FlowInfo) -> Option<FlowKey4> {
    if info.l3 != L3::Ipv4 || !matches!(info.protocol, protocol::TCP | protocol::UDP) {
        return None;
    }
    let (start, _) = info.l4?;
    let ip = frame.get(info.l3_offset..info.l3_offset + 20)?;
    if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    if info.protocol == protocol::TCP && *frame.get(start + 13)? & 0x07 != 0x02 {
        return None;
    }
    let l4 = frame.get(start..start + 4)?;
    Some(FlowKey4 {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto: info.protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet, IPv4 (`ihl` words), TCP with `flags`.
    fn tcp_frame(flags: u8, ihl: u8) -> Vec<u8> {
        let opts = usize::from(ihl - 5) * 4;
        let mut f = vec![0u8; 14 + 20 + opts + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..];
        ip[0] = 0x40 | ihl;
        ip[2..4].copy_from_slice(&((20 + opts + 20) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = protocol::TCP;
        ip[12..16].copy_from_slice(&[10, 244, 1, 2]);
        ip[16..20].copy_from_slice(&[10, 244, 2, 2]);
        let tcp = &mut f[14 + 20 + opts..];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f
    }

    #[test]
    fn offer_key_is_a_syn_or_syn_ack_of_plain_ipv4_tcp_or_any_udp() {
        let key = |f: &[u8]| offer_key(f, &flow::classify(f).expect("classified"));
        let tcp = |flags: u8, ihl: u8| key(&tcp_frame(flags, ihl));
        let want = FlowKey4 {
            src: Ipv4Addr::new(10, 244, 1, 2),
            dst: Ipv4Addr::new(10, 244, 2, 2),
            sport: 40000,
            dport: 5201,
            proto: protocol::TCP,
        };
        assert_eq!(tcp(0x02, 5), Some(want), "SYN");
        assert_eq!(tcp(0x12, 5), Some(want), "SYN-ACK");
        for (flags, what) in [(0x10, "ACK"), (0x18, "PSH-ACK"), (0x03, "SYN-FIN"), (0x06, "SYN-RST"), (0x11, "FIN")] {
            assert_eq!(tcp(flags, 5), None, "{what}");
        }
        assert_eq!(tcp(0x02, 6), None, "IPv4 options: the TC program parses a 20-byte header only");
        // UDP: any datagram (the same bytes as a TCP header's ports), but not a fragment.
        let mut udp = tcp_frame(0x10, 5);
        udp[14 + 9] = protocol::UDP;
        udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&28u16.to_be_bytes());
        assert_eq!(key(&udp), Some(FlowKey4 { proto: protocol::UDP, ..want }), "UDP");
        udp[14 + 6] = 0x20;
        assert_eq!(key(&udp), None, "the first fragment of a UDP datagram (more fragments)");
        let mut icmp = tcp_frame(0x02, 5);
        icmp[14 + 9] = protocol::ICMP;
        assert_eq!(key(&icmp), None, "ICMP");
    }
}
