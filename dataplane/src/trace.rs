//! Tracing one packet through the pipeline: what each stage decided and why.
//!
//! The pipeline's stages are generic over a [`Recorder`]. The forwarding path runs them with
//! [`NoTrace`], whose `ON` is `false`: every `if R::ON { .. }` block in a stage is removed at
//! compile time, so a traced build of the stages costs the forwarding path nothing (measured with
//! the worker benchmark: see the README, "Trace"). [`crate::pipeline::Pipeline::trace`] runs the same
//! stages with a [`Trace`], which keeps one [`Note`] per stage decision (setup side: it allocates).
//!
//! A trace must change nothing live. The recorder only writes notes; the side effects a stage has
//! (connection-tracking entries, rate-limiter tokens, counters, flow records) belong to the
//! pipeline, the counters and the worker the caller passes, so a trace runs on a pipeline of its
//! own ([`crate::pipeline::Pipeline::for_trace`]: a private connection table, so the packet is
//! judged as a new connection) and on scratch counters; only the published snapshot is shared.
//!
//! `ferry trace --inject` traces a real packet instead: a [`Probe`] with a nonce carries a
//! [`TraceMark`] at the end of its payload, a worker forwards it for real with a [`Marked`]
//! recorder (injected as if a port had received it, or found by a watch on the uplink: see
//! [`crate::worker::PortCommand`]), and every other packet keeps [`NoTrace`].

use std::net::IpAddr;

use ferry_encap::{DropReason, MacAddr, TunnelKind};
use ferry_tables::PortId;
use ferry_tables::policy::Explanation;

/// Receives the stages' decisions. See the module doc.
pub trait Recorder {
    /// Whether notes are taken at all: `false` compiles every recording site away.
    const ON: bool;

    /// One stage decision.
    fn note(&mut self, note: Note);

    /// The packet's fate, and its frame as the pipeline left it (the worker tells a marked
    /// packet's recorder; see [`Marked`]).
    #[inline(always)]
    fn outcome(&mut self, _verdict: ferry_encap::Verdict<PortId>, _frame: &[u8]) {}
}

/// The forwarding path's recorder: records nothing, costs nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTrace;

impl Recorder for NoTrace {
    const ON: bool = false;

    #[inline(always)]
    fn note(&mut self, _note: Note) {}
}

/// A traced packet's notes, in the order the stages ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// One per decision.
    pub notes: Vec<Note>,
}

impl Recorder for Trace {
    const ON: bool = true;

    fn note(&mut self, note: Note) {
        self.notes.push(note);
    }
}

/// A marked packet's record in a worker (`ferry trace --inject`): the stages' notes as the real
/// forwarding path took them, and the fate the worker acted on (setup side: it allocates, for the
/// one packet it is used for).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Marked {
    /// The stages' decisions.
    pub trace: Trace,
    /// The verdict and the frame after the pipeline, once it has run.
    pub outcome: Option<(ferry_encap::Verdict<PortId>, Vec<u8>)>,
}

impl Recorder for Marked {
    const ON: bool = true;

    fn note(&mut self, note: Note) {
        self.trace.notes.push(note);
    }

    fn outcome(&mut self, verdict: ferry_encap::Verdict<PortId>, frame: &[u8]) {
        self.outcome = Some((verdict, frame.to_vec()));
    }
}

impl Marked {
    /// The record as a [`Traced`], once the pipeline has run.
    pub fn into_traced(self) -> Option<Traced> {
        let (verdict, frame) = self.outcome?;
        Some(Traced { verdict, trace: self.trace, frame })
    }
}

/// Why the service stage chose the backend it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Maglev: the flow hash's slot in the service's table.
    Maglev {
        /// The slot.
        slot: usize,
        /// The table's size.
        slots: usize,
    },
    /// `sessionAffinity: ClientIP`: Maglev over the client's address alone (a new client), or the
    /// backend the client had within the timeout.
    Affinity {
        /// The affinity timeout, seconds.
        timeout_s: u64,
    },
    /// An existing connection keeps its backend.
    Tracked,
}

/// What the service stage did with a packet to a service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNote {
    /// `namespace/name:port`.
    pub service: String,
    /// The VIP and port the packet was sent to.
    pub vip: IpAddr,
    /// The service port.
    pub port: u16,
    /// The backend chosen, if any.
    pub backend: Option<(IpAddr, u16)>,
    /// How it was chosen.
    pub pick: Pick,
    /// Backends new connections may go to.
    pub backends: usize,
    /// Those backends are serving-and-terminating endpoints (no ready one is left).
    pub terminating_fallback: bool,
    /// The drop reason when there was no backend (none usable, or the connection's is gone).
    pub refused: Option<DropReason>,
}

/// Where the route stage sent a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteNote {
    /// A pod (or the host port) on this node.
    Local {
        /// Its port.
        port: PortId,
        /// Its MAC.
        mac: MacAddr,
    },
    /// Another node, through the tunnel.
    Remote {
        /// The node's underlay address.
        underlay: IpAddr,
        /// The underlay next hop's MAC.
        next_hop_mac: MacAddr,
        /// The node's VTEP MAC (the inner destination MAC).
        vtep_mac: MacAddr,
    },
    /// The node's underlay next hop is not resolved.
    Unresolved {
        /// The node's underlay address.
        underlay: IpAddr,
    },
    /// This node's own pod CIDR where no pod is, or a configured blackhole.
    Blackhole,
    /// No route.
    NoRoute,
}

/// One stage's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// The tunnel packet was valid and decapsulated.
    Decapsulated {
        /// The sending node's underlay address.
        outer_src: IpAddr,
        /// The VNI.
        vni: u32,
    },
    /// The outer source is a known node (or, `false`, is not).
    KnownNode {
        /// The sending node's underlay address.
        outer_src: IpAddr,
        /// Whether it is one.
        known: bool,
    },
    /// The access port accepted the frame from a pod: untagged, the pod's own source MAC.
    AccessPort {
        /// The port.
        port: PortId,
        /// The frame's source MAC.
        src_mac: MacAddr,
    },
    /// Classify found an IP packet.
    Classified {
        /// Source address.
        src: IpAddr,
        /// Destination address.
        dst: IpAddr,
        /// IP protocol.
        protocol: u8,
        /// Ports (0 without).
        ports: (u16, u16),
        /// TTL or hop limit.
        ttl: u8,
        /// The flow hash.
        hash: u32,
    },
    /// A pod's packet passed its IP checks: the header checksum, the gateway as destination MAC,
    /// its own source address (anti-spoofing).
    SourceAllowed {
        /// The port it came in on.
        port: PortId,
        /// Its source address.
        src: IpAddr,
    },
    /// A decapsulated packet passed the checks on what its sender may send (TTL, source inside
    /// the sender's pod CIDRs).
    SenderChecked {
        /// The sending node.
        outer_src: IpAddr,
    },
    /// The service stage translated (or refused) a packet to a service.
    Service(ServiceNote),
    /// NetworkPolicy's verdict on the pods' real addresses, with the rules that decided.
    Policy(Explanation),
    /// A backend's reply got its service's VIP back as source.
    ServiceReply {
        /// The VIP.
        vip: IpAddr,
        /// The service port.
        port: u16,
    },
    /// The route lookup.
    Route(RouteNote),
    /// Encapsulated toward another node.
    Encap {
        /// VXLAN or Geneve.
        kind: TunnelKind,
        /// The VNI.
        vni: u32,
        /// The outer UDP destination port.
        udp_port: u16,
        /// The remote node's underlay address.
        remote: IpAddr,
        /// The whole frame's length once encapsulated.
        outer_len: usize,
    },
    /// Delivered to a local pod or the host port.
    Deliver {
        /// The port.
        port: PortId,
        /// The destination MAC written.
        mac: MacAddr,
    },
    /// Out of the cluster through the node's kernel (the host port).
    HostExit {
        /// The host port.
        port: PortId,
    },
}

/// The transport of a synthetic packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeProto {
    /// A TCP SYN.
    Tcp,
    /// A UDP datagram of four bytes.
    Udp,
    /// An ICMP (ICMPv6) echo request.
    Icmp,
}

/// A synthetic packet as a pod (or the host port) would send it to its gateway: the first packet
/// of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The sender's MAC.
    pub src_mac: MacAddr,
    /// The gateway's MAC.
    pub dst_mac: MacAddr,
    /// Source address.
    pub src: IpAddr,
    /// Destination address (same family as `src`).
    pub dst: IpAddr,
    /// Transport.
    pub proto: ProbeProto,
    /// Source port (TCP, UDP), or the echo identifier.
    pub sport: u16,
    /// Destination port (TCP, UDP).
    pub dport: u16,
    /// A trace mark: with one, the packet carries [`MARK_LEN`] bytes of payload, [`MARK_MAGIC`] and
    /// the nonce, which identify it at the destination's worker ([`TraceMark`]); a TCP SYN then
    /// carries them as data. `None`: no payload beyond the UDP and ICMP probes' four bytes.
    pub nonce: Option<u32>,
}

/// The first half of a trace mark's payload.
pub const MARK_MAGIC: [u8; 4] = *b"fery";

/// The length of a trace mark: [`MARK_MAGIC`] and a 32-bit nonce, at the very end of the packet.
pub const MARK_LEN: usize = 8;

/// A marked packet's identity, as a destination worker watches for it: the last [`MARK_LEN`]
/// bytes of the frame (the inner packet's payload ends a tunnel frame, and no stage rewrites
/// payload, so they arrive as sent over VXLAN or Geneve, either underlay family, whatever the
/// service stage did to the addresses and ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceMark {
    tail: [u8; MARK_LEN],
}

impl TraceMark {
    /// The mark for `nonce`.
    pub fn new(nonce: u32) -> Self {
        let mut tail = [0u8; MARK_LEN];
        tail[..4].copy_from_slice(&MARK_MAGIC);
        tail[4..].copy_from_slice(&nonce.to_be_bytes());
        TraceMark { tail }
    }

    /// Whether `frame` ends with this mark.
    #[inline]
    pub fn matches(&self, frame: &[u8]) -> bool {
        frame.ends_with(&self.tail)
    }

    /// The payload a marked probe carries.
    pub fn payload(&self) -> [u8; MARK_LEN] {
        self.tail
    }
}

impl Probe {
    /// The UDP or ICMP payload: the mark, or `fery` without one.
    fn payload(&self) -> Vec<u8> {
        match self.nonce {
            Some(n) => TraceMark::new(n).payload().to_vec(),
            None => MARK_MAGIC.to_vec(),
        }
    }

    /// The frame, checksums complete; `None` when the addresses' families differ.
    pub fn frame(&self) -> Option<Vec<u8>> {
        use ferry_encap::checksum;
        let (proto_num, l4): (u8, Vec<u8>) = match self.proto {
            ProbeProto::Tcp => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&self.sport.to_be_bytes());
                t[2..4].copy_from_slice(&self.dport.to_be_bytes());
                t[4..8].copy_from_slice(&1u32.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = 0x02; // SYN
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                if let Some(n) = self.nonce {
                    t.extend_from_slice(&TraceMark::new(n).payload());
                }
                (6, t)
            }
            ProbeProto::Udp => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&self.sport.to_be_bytes());
                u[2..4].copy_from_slice(&self.dport.to_be_bytes());
                u.extend_from_slice(&self.payload());
                let len = u.len() as u16;
                u[4..6].copy_from_slice(&len.to_be_bytes());
                (17, u)
            }
            ProbeProto::Icmp => {
                let mut i = vec![0u8; 8];
                i[0] = if self.src.is_ipv4() { 8 } else { 128 };
                i[4..6].copy_from_slice(&self.sport.to_be_bytes());
                i[6..8].copy_from_slice(&1u16.to_be_bytes());
                i.extend_from_slice(&self.payload());
                (if self.src.is_ipv4() { 1 } else { 58 }, i)
            }
        };
        let mut l4 = l4;
        let l4_len = l4.len();
        let mut out = Vec::with_capacity(14 + 40 + l4_len);
        out.extend_from_slice(&self.dst_mac.0);
        out.extend_from_slice(&self.src_mac.0);
        let csum_at = match self.proto {
            ProbeProto::Tcp => 16,
            ProbeProto::Udp => 6,
            ProbeProto::Icmp => 2,
        };
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let pseudo = if proto_num == 1 { 0 } else { checksum::pseudo_v4(s, d, proto_num, l4_len as u16) };
                let c = checksum::finish_sum(pseudo + checksum::sum(&l4));
                l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
                out.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = 64;
                ip[9] = proto_num;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                let c = checksum::of(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                out.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let pseudo = checksum::pseudo_v6(s, d, proto_num, l4_len as u32);
                let c = checksum::finish_sum(pseudo + checksum::sum(&l4));
                l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
                out.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut ip = [0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                ip[6] = proto_num;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                out.extend_from_slice(&ip);
            }
            _ => return None,
        }
        out.extend_from_slice(&l4);
        Some(out)
    }
}

/// Headroom a traced frame gets (what AF_XDP gives): encapsulation prepends there.
const TRACE_HEADROOM: usize = 256;

/// What [`run`] found: the verdict, the notes, and the frame as the pipeline left it (the
/// encapsulated packet, for the destination node's half).
#[derive(Debug, Clone, PartialEq)]
pub struct Traced {
    /// The packet's fate.
    pub verdict: ferry_encap::Verdict<PortId>,
    /// The stages' decisions.
    pub trace: Trace,
    /// The frame after the pipeline (rewritten, encapsulated, or an ICMP error or reset in reply).
    pub frame: Vec<u8>,
}

/// Runs `frame` through `pipeline` in trace mode, as if it came in on `in_port` of `role` (setup
/// side: allocates). Use a [`crate::pipeline::Pipeline::for_trace`] so that nothing live changes.
///
/// # Errors
/// A frame too long for a 2 KiB buffer.
pub fn run<F: crate::pipeline::Fib>(
    pipeline: &mut crate::pipeline::Pipeline,
    fib: &F,
    in_port: PortId,
    role: crate::pipeline::PortRole,
    frame: &[u8],
) -> Result<Traced, String> {
    let mut buf = vec![0u8; TRACE_HEADROOM + 2048];
    let end = TRACE_HEADROOM + frame.len();
    let Some(dst) = buf.get_mut(TRACE_HEADROOM..end) else {
        return Err(format!("a frame of {} bytes is too long to trace", frame.len()));
    };
    dst.copy_from_slice(frame);
    let mut fb = ferry_encap::FrameBuf::new(&mut buf, TRACE_HEADROOM, frame.len())
        .ok_or_else(|| "the trace buffer is too small".to_owned())?;
    let (verdict, trace) = pipeline.trace(fib, in_port, role, &mut fb);
    let frame = fb.data().to_vec();
    Ok(Traced { verdict, trace, frame })
}
