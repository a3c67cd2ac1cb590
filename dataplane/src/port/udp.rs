//! The uplink over a kernel UDP socket with `UDP_SEGMENT` and `UDP_GRO` (setup in
//! [`UdpPort::open`]; the [`Port`] methods are the hot path: no allocation, no lock, no log, one
//! `sendmmsg` per flushed batch and at most one `recvmmsg` per receive call).
//!
//! Tunnel packets cross the underlay as the kernel's own UDP traffic, so they move between the
//! node and the underlay device as GSO super-packets of up to 64 datagrams, the way the kernel's
//! VXLAN device moves them, instead of one descriptor per 1.5 KB frame.
//!
//! **Send.** The pipeline hands the uplink complete outer frames (Ethernet, IPv4, UDP, tunnel
//! header, inner frame). [`Port::send`] keeps the tunnel payload (the UDP payload) and copies it
//! into the port's staging buffer, where consecutive datagrams to the same destination with the
//! same TOS and the same size (the last may be shorter) form one message: one `sendmsg` with a
//! `UDP_SEGMENT` control message, the kernel (or the device) cuts it back into datagrams. Each
//! message carries its TOS in an `IP_TOS` control message, so the RFC 6040 ECN field the
//! encapsulation chose survives. [`Port::flush`] sends every staged message with one `sendmmsg`.
//! A frame is free once its payload is copied, and comes back through [`Port::reclaim`]. A full
//! socket buffer (`EAGAIN`, `ENOBUFS`) never blocks: the datagrams are dropped and counted.
//!
//! What is lost: the outer source port the encapsulation chose for flow entropy. All datagrams
//! leave from the socket's own port (the tunnel port), so an underlay that spreads by 5-tuple
//! (ECMP, RSS, `SO_REUSEPORT` at the receiver) sees one flow per pair of nodes.
//!
//! **Receive.** `UDP_GRO` is on: one `recvmmsg` returns up to [`RX_MSGS`] buffers, each of
//! which holds up to 64 datagrams of one size (the `UDP_GRO` control message gives it) from one
//! sender with one TOS (`IP_RECVTOS`). [`Port::recv`] writes each datagram into a frame lent by
//! [`Port::refill`], at [`RX_HEADROOM`], behind a synthesized outer Ethernet/IPv4/UDP header: the
//! sender's address and port as source, this node's as destination, the received TOS, a valid
//! IPv4 header checksum and a zero UDP checksum (the kernel verified the real one). The pipeline's
//! uplink stage (`decap`, known node, VNI, anti-spoofing, RFC 6040) then runs unchanged.
//! Datagrams wait in the port's buffer while no frame is lent, and the socket is read again only
//! once they are all out, so a worker short of frames leaves the backlog in the socket buffer
//! (where the kernel counts what overflows, reported as `rx_dropped`) rather than dropping here.
//!
//! IPv4 underlays only for now: [`UdpPort::open`] refuses an IPv6 address with
//! [`UdpPortError::Ipv6Unsupported`] (the synthesized IPv6 header would need a UDP checksum, which
//! the decapsulation demands over IPv6).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use ferry_encap::MacAddr;
use ferry_encap::gro;
use ferry_encap::gso::{Checksum, Segmenter};
use ferry_encap::wire::ethernet::{self, ethertype};
use ferry_encap::wire::ipv4::{self, Ipv4Repr, protocol};
use ferry_encap::wire::udp::{self, UdpRepr};
use ferry_encap::wire::virtio_net::{Gso, VirtioNetHdr};

use super::xsk::RX_HEADROOM;
use super::{Port, PortStats, SegmentRun};
use crate::frame::{FrameId, FrameMem, FreeFrames, Pkt};

/// `UDP_SEGMENT` and `UDP_GRO` from `<linux/udp.h>` (Linux 4.18 and 5.0).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Datagrams per `UDP_SEGMENT` message. Linux accepts 64 (`UDP_MAX_SEGMENTS`; 128 since 6.9).
pub const MAX_SEGMENTS: usize = 64;
/// Bytes of UDP payload per message: what one IPv4 datagram can carry.
pub const MAX_MESSAGE: usize = 65_507;
/// Messages per `sendmmsg`.
pub const TX_MSGS: usize = 64;
/// Bytes staged for sending: room for a worker's batch of 64 full-sized frames, twice.
const TX_STAGE: usize = 256 * 1024;
/// Buffers per `recvmmsg`; each holds one GRO'd message of up to 64 KB. 16 buffers are up to a
/// thousand datagrams per system call when the socket has a backlog.
pub const RX_MSGS: usize = 16;
/// One receive buffer: the largest UDP payload a GRO'd message can have, with room for a tunnel
/// datagram that carries a whole 64 KB TCP super-packet (its inner IP packet alone may be 65,535
/// bytes, and a shorter buffer truncates it).
const RX_BUF: usize = 68 * 1024;
/// The synthesized outer header in front of each received datagram.
pub const SYNTH_HEADER: usize = ethernet::HEADER_LEN + ipv4::HEADER_LEN + udp::HEADER_LEN;
/// Control message space: `IP_TOS` (an int) and `UDP_SEGMENT` (a u16) on send; `IP_TOS` (a byte),
/// `UDP_GRO` (an int) and `SO_RXQ_OVFL` (a u32) on receive. Each takes at most 16 bytes on 64-bit
/// Linux and 12 on 32-bit; 8 words is room for four.
const CMSG_WORDS: usize = 8;

/// Settings of one UDP uplink socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPortConfig {
    /// This node's underlay address and the tunnel port: the socket's bound address.
    pub local: SocketAddr,
    /// Destination MAC of the synthesized outer header (the uplink's MAC, which the
    /// decapsulation checks when configured to).
    pub local_mac: MacAddr,
    /// `SO_REUSEPORT`: one socket per worker on the same address, the kernel spreading received
    /// datagrams among them by their 4-tuple.
    pub reuse_port: bool,
    /// Frames kept lent for receiving.
    pub rx_frames: usize,
    /// Frames sent but not yet reclaimed, at most (like a completion ring).
    pub tx_ring: usize,
    /// Socket receive and send buffer sizes in bytes (`SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, falling
    /// back to the unprivileged options, capped by `net.core.rmem_max`/`wmem_max`; the kernel
    /// doubles what it is given, for its own overhead). The receive buffer absorbs the bursts that
    /// arrive while the worker is not running (on a shared core, several milliseconds at a time):
    /// at 4 MB four TCP streams overflowed it in every lab run ([`DEFAULT_SOCKET_BUFFER`]).
    pub socket_buffer: usize,
    /// The largest inner IP packet (the pod MTU: the underlay MTU less the tunnel overhead). A
    /// tunnel datagram that arrives carrying a larger TCP packet is a kernel VXLAN device's
    /// super-packet ([`tunnel_super_packet`]), cut into segments of at most this size.
    pub inner_mtu: u16,
    /// The receive side of the worker's super-packet path: a `UDP_GRO` buffer whose datagrams
    /// carry consecutive segments of one inner TCP flow ([`gro::tunnel_run`]) ends the receive
    /// batch with its first datagram, and the port holds the rest ([`Port::super_run`]) for the
    /// worker to write behind it into the destination pod's tap as one super-packet
    /// ([`Port::send_run`]). When the worker declines (another egress), the rest comes as
    /// ordinary packets, and the next [`SUPER_BACKOFF`] buffers are not looked at.
    pub super_packets: bool,
}

/// The default [`UdpPortConfig::socket_buffer`]: 32 MiB (64 MiB of kernel accounting), about
/// 50 ms of 5 Gbit/s. It is a limit, not an allocation: the kernel charges only what is queued.
/// Chosen by measurement (docs/throughput.md, "The receive socket overflow").
pub const DEFAULT_SOCKET_BUFFER: usize = 32 << 20;

/// `UDP_GRO` buffers delivered the ordinary way after the worker declined a run.
pub const SUPER_BACKOFF: u32 = 16;

impl UdpPortConfig {
    /// Defaults for a socket bound to `local`.
    pub fn new(local: SocketAddr, local_mac: MacAddr) -> Self {
        UdpPortConfig {
            local,
            local_mac,
            reuse_port: true,
            rx_frames: 512,
            tx_ring: 1024,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            inner_mtu: 1450,
            super_packets: false,
        }
    }
}

/// Errors opening a UDP uplink.
#[derive(Debug, thiserror::Error)]
pub enum UdpPortError {
    /// An IPv6 underlay address.
    #[error(
        "the UDP uplink supports IPv4 underlays only, not {addr}; use dataplane.uplink_port = \"afxdp\" on an IPv6 underlay"
    )]
    Ipv6Unsupported {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Creating the socket or setting an option failed.
    #[error("UDP uplink socket for {addr}: {what} failed: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The call or option.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `bind` failed.
    #[error("binding the UDP uplink to {addr}: {source} ({hint})")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What to check.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Counters of a UDP uplink beyond [`PortStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Datagrams sent (counted by the kernel's acceptance of their message).
    pub tx_datagrams: u64,
    /// `sendmmsg` calls.
    pub tx_syscalls: u64,
    /// Messages sent (each one `UDP_SEGMENT` batch, or one plain datagram).
    pub tx_messages: u64,
    /// Datagrams dropped because the socket buffer was full (`EAGAIN`, `ENOBUFS`).
    pub tx_would_block: u64,
    /// Datagrams dropped because the kernel refused their message (any other error).
    pub tx_errors: u64,
    /// Frames handed to `send` that were not an outer IPv4/UDP packet: dropped.
    pub tx_malformed: u64,
    /// Datagrams received.
    pub rx_datagrams: u64,
    /// Buffers received (each one GRO'd message, or one datagram).
    pub rx_messages: u64,
    /// `recvmmsg` calls that returned data.
    pub rx_syscalls: u64,
    /// Datagrams dropped: too long for a frame, truncated, or from an IPv6 sender.
    pub rx_dropped: u64,
    /// Datagrams the kernel dropped at the socket (its receive buffer was full: `SO_RXQ_OVFL`).
    pub rx_socket_drops: u64,
    /// Tunnel datagrams that arrived carrying a whole TCP super-packet, cut into segments here.
    pub rx_super: u64,
    /// Runs of datagrams the worker took whole ([`Port::super_run`]).
    pub rx_runs: u64,
    /// Datagrams in those runs after each one's first (delivered without a frame or a pipeline
    /// pass of their own; counted in `rx_datagrams` too).
    pub rx_run_segments: u64,
}

/// Where an outer frame goes, and what of it is sent: the parse of [`Port::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterDst {
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// The outer TOS (DSCP and ECN).
    pub tos: u8,
    /// Offset of the UDP payload in the frame.
    pub start: usize,
    /// Length of the UDP payload.
    pub len: usize,
}

/// Read an outer Ethernet/IPv4/UDP frame (802.1Q-tagged or not): where it goes and where its UDP
/// payload is. `None` for anything else (another EtherType, a fragment, not UDP, lengths that
/// disagree).
pub fn parse_outer(frame: &[u8]) -> Option<OuterDst> {
    // An underlay with an 802.1Q tag: the template puts it in front of the EtherType.
    let tagged = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) == ethertype::VLAN;
    let l3 = ethernet::HEADER_LEN + if tagged { ethernet::VLAN_TAG_LEN } else { 0 };
    let ip = frame.get(l3..l3 + ipv4::HEADER_LEN)?;
    if u16::from_be_bytes([frame[l3 - 2], frame[l3 - 1]]) != ethertype::IPV4 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if ip[9] != protocol::UDP || ihl < ipv4::HEADER_LEN || frag != 0 || total < ihl + udp::HEADER_LEN {
        return None;
    }
    if frame.len() < l3 + total {
        return None;
    }
    let u = l3 + ihl;
    let udp_len = usize::from(u16::from_be_bytes([frame[u + 4], frame[u + 5]]));
    if udp_len < udp::HEADER_LEN || u + udp_len > l3 + total {
        return None;
    }
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let dst_port = u16::from_be_bytes([frame[u + 2], frame[u + 3]]);
    Some(OuterDst {
        dst: SocketAddrV4::new(dst_ip, dst_port),
        tos: ip[1],
        start: u + udp::HEADER_LEN,
        len: udp_len - udp::HEADER_LEN,
    })
}

/// One staged message: `count` datagrams of `seg` bytes (the last may be shorter) at
/// `start..start + len` of the staging buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxMsg {
    /// Destination.
    pub dst: SocketAddrV4,
    /// TOS for every datagram of the message.
    pub tos: u8,
    /// Segment size: the first datagram's length.
    pub seg: usize,
    /// Datagrams.
    pub count: usize,
    /// Where the message starts in the staging buffer.
    pub start: usize,
    /// Bytes.
    pub len: usize,
    /// A shorter datagram ended the message: nothing more joins it.
    closed: bool,
}

/// The send side's staging area (no I/O): datagrams copied in, grouped into `UDP_SEGMENT` messages.
#[derive(Debug)]
pub struct TxStage {
    buf: Box<[u8]>,
    used: usize,
    msgs: Vec<TxMsg>,
    /// The last datagram pushed: where it starts and its length (the stage is far below 4 GB).
    last: Option<(u32, u32)>,
}

impl Default for TxStage {
    fn default() -> Self {
        TxStage::with_capacity(TX_STAGE)
    }
}

impl TxStage {
    /// A staging area of `bytes` bytes and [`TX_MSGS`] messages.
    pub fn with_capacity(bytes: usize) -> Self {
        TxStage { buf: vec![0; bytes].into_boxed_slice(), used: 0, msgs: Vec::with_capacity(TX_MSGS), last: None }
    }

    /// Copy one datagram's payload in, joining the last message when it has the same destination
    /// and TOS, this datagram is no longer than its segment size, no shorter one ended it, and the
    /// segment and byte limits allow. Returns `false` when the stage is full (send it, then push
    /// again); a payload longer than [`MAX_MESSAGE`] is never taken (the caller drops it).
    pub fn push(&mut self, dst: SocketAddrV4, tos: u8, payload: &[u8]) -> bool {
        match self.reserve(dst, tos, payload.len()) {
            Some(out) => {
                out.copy_from_slice(payload);
                true
            }
            None => false,
        }
    }

    /// Make room for one datagram of `n` bytes as [`push`](Self::push) does, and return it for the
    /// caller to write (all of it); `None` when the stage is full.
    pub fn reserve(&mut self, dst: SocketAddrV4, tos: u8, n: usize) -> Option<&mut [u8]> {
        if n > MAX_MESSAGE || self.used + n > self.buf.len() {
            return None;
        }
        let joins = self.msgs.last().is_some_and(|m| {
            m.dst == dst
                && m.tos == tos
                && !m.closed
                && n <= m.seg
                && n > 0
                && m.count < MAX_SEGMENTS
                && m.len + n <= MAX_MESSAGE
        });
        if joins {
            let m = self.msgs.last_mut().expect("checked above");
            m.count += 1;
            m.len += n;
            m.closed = n < m.seg;
        } else {
            if self.msgs.len() == TX_MSGS {
                return None;
            }
            self.msgs.push(TxMsg { dst, tos, seg: n, count: 1, start: self.used, len: n, closed: n == 0 });
        }
        let at = self.used;
        self.used += n;
        self.last = Some((at as u32, n as u32));
        Some(&mut self.buf[at..at + n])
    }

    /// Whether a datagram of `n` bytes fits without a send first.
    pub fn has_room(&self, n: usize) -> bool {
        self.used + n <= self.buf.len() && self.msgs.len() < TX_MSGS
    }

    /// The last datagram pushed, with its message's destination and TOS, while it is staged.
    pub fn last(&self) -> Option<(SocketAddrV4, u8, &[u8])> {
        let (at, n) = self.last?;
        let (at, n) = (at as usize, n as usize);
        let m = self.msgs.last()?;
        Some((m.dst, m.tos, &self.buf[at..at + n]))
    }

    /// The staged messages, in order.
    pub fn messages(&self) -> &[TxMsg] {
        &self.msgs
    }

    /// A staged message's bytes.
    pub fn bytes(&self, m: &TxMsg) -> &[u8] {
        &self.buf[m.start..m.start + m.len]
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Forget everything staged.
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.used = 0;
        self.last = None;
    }
}

/// A received buffer: `len` bytes from `src` with TOS `tos`, cut into datagrams of `seg` bytes (the
/// last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxMsg {
    /// The sender.
    pub src: SocketAddrV4,
    /// The outer TOS it arrived with.
    pub tos: u8,
    /// The `UDP_GRO` segment size, or the whole length for a plain datagram.
    pub seg: usize,
    /// Bytes in the buffer.
    pub len: usize,
    /// Not 0: the buffer is one tunnel datagram carrying a TCP super-packet (see
    /// [`super_datagram`]) whose inner frame starts here, cut into `seg`-byte TCP segments.
    pub inner: usize,
}

impl RxMsg {
    /// The datagrams' ranges within the buffer.
    pub fn datagrams(&self) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        let (seg, len) = (self.seg.max(1), self.len);
        (0..len.div_ceil(seg)).map(move |i| i * seg..((i + 1) * seg).min(len))
    }
}

/// Whether `buf`, received with `UDP_GRO` segment size `seg` (0: none), is not a run of
/// `seg`-byte datagrams but one tunnel datagram carrying a TCP super-packet. Returns the inner
/// frame's offset (the tunnel header's length). Recognised by the inner IP packet's own length,
/// which covers the whole buffer (a run of datagrams' first one ends at `seg`). See
/// [`tunnel_super_packet`] for how such a datagram arrives.
pub fn super_datagram(buf: &[u8], seg: usize) -> Option<usize> {
    if buf.len() <= seg {
        return None;
    }
    let be16 = |at: usize| buf.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let h = tunnel_header_len(buf)?;
    let l3 = h + ethernet::HEADER_LEN;
    let (ip_len, proto) = match be16(h + 12)? {
        ethertype::IPV4 => (usize::from(be16(l3 + 2)?), *buf.get(l3 + 9)?),
        ethertype::IPV6 => (40 + usize::from(be16(l3 + 4)?), *buf.get(l3 + 6)?),
        _ => return None,
    };
    (l3 + ip_len == buf.len() && proto == protocol::TCP).then_some(h)
}

/// The tunnel header's length at the start of a tunnel datagram: 8 for VXLAN, 8 and the options
/// for Geneve (told apart by the protocol field: Geneve carries TEB there, VXLAN zeros).
pub fn tunnel_header_len(buf: &[u8]) -> Option<usize> {
    let b = buf.get(..4)?;
    Some(if u16::from_be_bytes([b[2], b[3]]) == ethertype::TEB { 8 + usize::from(b[0] & 0x3f) * 4 } else { 8 })
}

/// A tunnel datagrams' run held for the worker: where in the receive buffers it starts, its
/// datagram size and what [`gro::tunnel_run`] found (its `count` includes the head).
#[derive(Debug, Clone, Copy)]
struct HeldRun {
    start: usize,
    end: usize,
    stride: usize,
    run: gro::TunnelRun,
}

/// A tunnel datagram carrying a whole TCP super-packet, as the kernel delivers one: where its inner
/// frame starts and the MSS to cut it at, or `None` for anything else.
///
/// A kernel VXLAN (or Geneve) device sends a TCP super-packet as one `SKB_GSO_UDP_TUNNEL` packet;
/// veths and bridges keep it whole, and the kernel hands it to a plain UDP socket unsegmented, as
/// one datagram of up to 64 KB. It attaches no `UDP_GRO` control message (the kernel gives one only
/// for `SKB_GSO_UDP_L4` packets), so the sender's MSS is not known: the datagram is recognised by
/// its inner IP packet, TCP and longer than `inner_mtu`, whose length covers the whole buffer, and
/// cut at the MSS that fills `inner_mtu` (IP and TCP headers, options included, plus the MSS), the
/// segments the sender's TCP would have made for that path MTU.
pub fn tunnel_super_packet(buf: &[u8], inner_mtu: usize) -> Option<(usize, usize)> {
    let h = super_datagram(buf, 0)?;
    let l3 = h + ethernet::HEADER_LEN;
    if buf.len() - l3 <= inner_mtu {
        return None;
    }
    let l4 = l3 + if buf[l3] >> 4 == 4 { usize::from(buf[l3] & 0x0f) * 4 } else { 40 };
    let tcp_hdr = usize::from(*buf.get(l4 + 12)? >> 4) * 4;
    let mss = inner_mtu.checked_sub(l4 + tcp_hdr - l3).filter(|&m| m > 0)?;
    Some((h, mss))
}

/// Write TCP segment `i` of the super-packet in `payload` (a tunnel header of `inner` bytes, then
/// an inner TCP frame whose checksum the sender left partial) into `frame` at `offset`, as one
/// tunnel datagram behind a synthesized outer header (see [`write_received`]). Returns the packet
/// length, or `None` when the super-packet cannot be cut or the segment does not fit.
#[allow(clippy::too_many_arguments, reason = "the receive context, spelled out")]
pub fn write_super_segment(
    frame: &mut [u8],
    offset: usize,
    local: SocketAddrV4,
    local_mac: MacAddr,
    src: SocketAddrV4,
    tos: u8,
    payload: &[u8],
    inner: usize,
    mss: usize,
    i: usize,
) -> Option<usize> {
    let seg = super_segmenter(&payload[inner..], mss)?;
    let body = frame.get_mut(offset + SYNTH_HEADER..)?;
    body.get_mut(..inner)?.copy_from_slice(&payload[..inner]);
    let n = seg.write_segment(i, &mut body[inner..], Checksum::Complete).ok()?;
    // Same header as for a plain datagram; `write_received` would copy the bytes over themselves.
    let total = SYNTH_HEADER + inner + n;
    let mut hdr = [0u8; SYNTH_HEADER];
    write_received(&mut hdr, 0, local, local_mac, src, tos, &[])?;
    let udp_len = u16::try_from(udp::HEADER_LEN + inner + n).ok()?;
    let ip_len = udp_len.checked_add(ipv4::HEADER_LEN as u16)?;
    hdr[16..18].copy_from_slice(&ip_len.to_be_bytes());
    hdr[24..26].fill(0);
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut hdr[14..34]).fill_checksum();
    hdr[38..40].copy_from_slice(&udp_len.to_be_bytes());
    frame[offset..offset + SYNTH_HEADER].copy_from_slice(&hdr);
    Some(total)
}

/// The segmenter of an inner TCP super-packet with its checksum left partial, and its segments.
fn super_segmenter(inner: &[u8], mss: usize) -> Option<Segmenter<'_>> {
    let info = ferry_encap::flow::classify(inner).ok()?;
    let (l4, _) = info.l4?;
    let gso = match info.l3 {
        ferry_encap::flow::L3::Ipv4 => Gso::TcpV4,
        ferry_encap::flow::L3::Ipv6 => Gso::TcpV6,
        _ => return None,
    };
    let hdr = VirtioNetHdr {
        needs_csum: true,
        gso,
        gso_size: u16::try_from(mss).ok()?,
        csum_start: u16::try_from(l4).ok()?,
        csum_offset: 16,
        ..VirtioNetHdr::NONE
    };
    Segmenter::new(inner, &hdr).ok()
}

/// Segments of the TCP super-packet in `payload` after a tunnel header of `inner` bytes.
pub fn super_segments(payload: &[u8], inner: usize, mss: usize) -> Option<usize> {
    super_segmenter(payload.get(inner..)?, mss).map(|s| s.segments())
}

/// Write `datagram` (a tunnel packet's UDP payload) into `frame` at `offset` behind a synthesized
/// outer header from `src` to `local`, with TOS `tos` and Ethernet destination `local_mac`.
/// Returns the frame's packet length, or `None` when it does not fit.
pub fn write_received(
    frame: &mut [u8],
    offset: usize,
    local: SocketAddrV4,
    local_mac: MacAddr,
    src: SocketAddrV4,
    tos: u8,
    datagram: &[u8],
) -> Option<usize> {
    let total = SYNTH_HEADER + datagram.len();
    let udp_len = u16::try_from(udp::HEADER_LEN + datagram.len()).ok()?;
    let out = frame.get_mut(offset..offset + total)?;
    out[0..6].copy_from_slice(&local_mac.0);
    out[6..12].fill(0);
    out[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
    let l3 = ethernet::HEADER_LEN;
    Ipv4Repr {
        src: *src.ip(),
        dst: *local.ip(),
        protocol: protocol::UDP,
        tos,
        ttl: 64,
        dont_frag: true,
        payload_len: udp_len,
    }
    .emit(&mut out[l3..]);
    let u = l3 + ipv4::HEADER_LEN;
    UdpRepr { src_port: src.port(), dst_port: local.port(), len: udp_len, checksum: 0 }.emit(&mut out[u..]);
    out[SYNTH_HEADER..].copy_from_slice(datagram);
    Some(total)
}

/// The uplink over a UDP socket, on a worker's frame memory `M`.
#[derive(Debug)]
pub struct UdpPort<M: FrameMem> {
    name: String,
    fd: OwnedFd,
    local: SocketAddrV4,
    local_mac: MacAddr,
    inner_mtu: usize,
    /// Frames lent for receiving.
    fill: VecDeque<FrameId>,
    rx_frames: usize,
    /// Received buffers, [`RX_MSGS`] of [`RX_BUF`] bytes.
    rx_buf: Box<[u8]>,
    /// What the last `recvmmsg` returned, and how far [`Port::recv`] has got through it: buffer
    /// `rx_next.0`, byte `rx_next.1`.
    rx_msgs: Box<[RxMsg; RX_MSGS]>,
    rx_count: usize,
    rx_next: (usize, usize),
    stage: TxStage,
    /// [`UdpPortConfig::super_packets`].
    super_packets: bool,
    /// The run held for the worker, after the head the last `recv` returned.
    held: Option<HeldRun>,
    /// Where a run may start besides a buffer's first datagram: right after the last run taken.
    run_at: (usize, usize),
    /// Buffers still to deliver the ordinary way after a declined run.
    super_off: u32,
    /// Frames whose payload was copied out, waiting for [`Port::reclaim`].
    done: VecDeque<FrameId>,
    tx_ring: usize,
    stats: UdpStats,
    _mem: std::marker::PhantomData<fn(&mut M)>,
}

impl<M: FrameMem> UdpPort<M> {
    /// Open the socket: bound to `cfg.local` (with `SO_REUSEPORT` when asked), non-blocking,
    /// `UDP_GRO`, `IP_RECVTOS` and `SO_RXQ_OVFL` on, buffers sized.
    ///
    /// # Errors
    /// [`UdpPortError::Ipv6Unsupported`] for an IPv6 address; [`UdpPortError::Bind`] when the
    /// address is not the node's or the port is taken; [`UdpPortError::Socket`] when the kernel
    /// refuses the socket or `UDP_GRO` (Linux before 5.0).
    pub fn open(cfg: &UdpPortConfig) -> Result<Self, UdpPortError> {
        let SocketAddr::V4(local) = cfg.local else {
            return Err(UdpPortError::Ipv6Unsupported { addr: cfg.local });
        };
        let addr = cfg.local;
        let err = |what: &'static str| move |source: io::Error| UdpPortError::Socket { addr, what, source };
        // SAFETY: a plain socket(2) call; the result is checked and owned at once.
        let raw =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err("socket")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor just created and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = fd.as_raw_fd();
        if cfg.reuse_port {
            setsockopt(s, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).map_err(err("SO_REUSEPORT"))?;
        }
        setsockopt(s, libc::SOL_UDP, UDP_GRO, 1).map_err(err("UDP_GRO (needs Linux 5.0 or later)"))?;
        setsockopt(s, libc::IPPROTO_IP, libc::IP_RECVTOS, 1).map_err(err("IP_RECVTOS"))?;
        setsockopt(s, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1).map_err(err("SO_RXQ_OVFL"))?;
        let size = libc::c_int::try_from(cfg.socket_buffer).unwrap_or(libc::c_int::MAX);
        for (force, plain, option, limit) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "SO_RCVBUFFORCE", "net.core.rmem_max"),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "SO_SNDBUFFORCE", "net.core.wmem_max"),
        ] {
            if setsockopt(s, libc::SOL_SOCKET, force, size).is_ok() {
                continue;
            }
            // Without CAP_NET_ADMIN: as much as net.core.[rw]mem_max allows.
            let _ = setsockopt(s, libc::SOL_SOCKET, plain, size);
            // The kernel reports twice what it was given (its own overhead included).
            let got = getsockopt(s, libc::SOL_SOCKET, plain).map_or(0, |v| usize::try_from(v / 2).unwrap_or(0));
            if got < cfg.socket_buffer {
                tracing::warn!(
                    wanted = cfg.socket_buffer,
                    got,
                    "a UDP uplink socket buffer is smaller than asked ({option} needs CAP_NET_ADMIN; \
                     without it {limit} caps it): raise {limit} to at least {} or expect socket drops \
                     (UdpRcvbufErrors) under load",
                    cfg.socket_buffer,
                );
            }
        }
        let sa = sockaddr_v4(local);
        // SAFETY: `sa` is a valid sockaddr_in and its size is passed with it.
        let r =
            unsafe { libc::bind(s, (&raw const sa).cast(), mem::size_of::<libc::sockaddr_in>() as libc::socklen_t) };
        if r < 0 {
            let source = io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => "the address is not one of this node's (in this network namespace)",
                Some(libc::EADDRINUSE) => "another socket holds the tunnel port (a kernel VXLAN device, another agent)",
                _ => "check the underlay address and tunnel port",
            };
            return Err(UdpPortError::Bind { addr, hint, source });
        }
        let (rcvbuf, sndbuf) = buffer_sizes(s);
        tracing::info!(
            %local,
            reuse_port = cfg.reuse_port,
            rcvbuf,
            sndbuf,
            "bound UDP uplink socket (UDP_SEGMENT, UDP_GRO)"
        );
        Ok(UdpPort {
            name: format!("udp:{local}"),
            fd,
            local,
            local_mac: cfg.local_mac,
            inner_mtu: usize::from(cfg.inner_mtu),
            fill: VecDeque::with_capacity(cfg.rx_frames),
            rx_frames: cfg.rx_frames,
            rx_buf: vec![0; RX_MSGS * RX_BUF].into_boxed_slice(),
            // Boxed: the port sits in `NodePort` beside the (smaller) AF_XDP port.
            rx_msgs: Box::new([RxMsg { src: local, tos: 0, seg: 0, len: 0, inner: 0 }; RX_MSGS]),
            rx_count: 0,
            rx_next: (0, 0),
            stage: TxStage::default(),
            super_packets: cfg.super_packets,
            held: None,
            run_at: (usize::MAX, 0),
            super_off: 0,
            done: VecDeque::with_capacity(cfg.tx_ring),
            tx_ring: cfg.tx_ring,
            stats: UdpStats::default(),
            _mem: std::marker::PhantomData,
        })
    }

    /// The socket's bound address.
    pub fn local(&self) -> SocketAddrV4 {
        self.local
    }

    /// The socket's receive and send buffer sizes as the kernel reports them (`SO_RCVBUF`,
    /// `SO_SNDBUF`: twice what was set, the kernel's overhead included).
    pub fn buffer_sizes(&self) -> (usize, usize) {
        buffer_sizes(self.fd.as_raw_fd())
    }

    /// The port's own counters.
    pub fn udp_stats(&self) -> UdpStats {
        self.stats
    }

    /// A run of datagrams of `stride` bytes from `rx_buf[start..end]` for the super-packet path,
    /// unless the worker declined one in the last [`SUPER_BACKOFF`] buffers.
    fn find_run(&mut self, start: usize, end: usize, stride: usize) -> Option<HeldRun> {
        if self.super_off > 0 {
            self.super_off -= 1;
            return None;
        }
        let buf = &self.rx_buf[start..end];
        let run = gro::tunnel_run(buf, stride, tunnel_header_len(buf)?)?;
        // The rest: from the second datagram to the run's last byte.
        let run_end = (start + run.count * stride).min(end);
        Some(HeldRun { start: start + stride, end: run_end, stride, run })
    }

    /// Send every staged message: one `sendmmsg`, repeated past a message the kernel refused.
    fn transmit(&mut self) {
        let msgs = self.stage.messages();
        let mut i = 0;
        let mut interrupted = 0;
        while i < msgs.len() {
            let n = (msgs.len() - i).min(TX_MSGS);
            // Every field used is set below.
            let (mut hdrs, mut iovs, mut names): ([libc::mmsghdr; TX_MSGS], [libc::iovec; TX_MSGS], [libc::sockaddr_in; TX_MSGS]) =
                // SAFETY: all-zero is a valid value of these plain C structs (null pointers, zero lengths).
                unsafe { (mem::zeroed(), mem::zeroed(), mem::zeroed()) };
            let mut cmsgs = [[0u64; CMSG_WORDS]; TX_MSGS];
            for k in 0..n {
                let m = &msgs[i + k];
                names[k] = sockaddr_v4(m.dst);
                let bytes = self.stage.bytes(m);
                iovs[k] = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
                let h = &mut hdrs[k].msg_hdr;
                h.msg_name = (&raw mut names[k]).cast();
                h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_iov = &raw mut iovs[k];
                h.msg_iovlen = 1;
                h.msg_control = cmsgs[k].as_mut_ptr().cast();
                h.msg_controllen = mem::size_of_val(&cmsgs[k]) as _;
                let segment = (m.count > 1).then_some(m.seg as u16);
                // SAFETY: the header points at this message's own control buffer of
                // `msg_controllen` bytes, large enough for both messages (CMSG_WORDS).
                unsafe { write_tx_cmsgs(h, m.tos, segment) };
            }
            // SAFETY: `hdrs[..n]` are valid headers whose pointers (names, iovecs, control
            // buffers, staged bytes) outlive the call; MSG_DONTWAIT never blocks.
            let r = unsafe {
                libc::sendmmsg(self.fd.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT)
            };
            self.stats.tx_syscalls += 1;
            if r > 0 {
                let r = r as usize;
                self.stats.tx_messages += r as u64;
                self.stats.tx_datagrams += msgs[i..i + r].iter().map(|m| m.count as u64).sum::<u64>();
                i += r;
                continue;
            }
            let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if e == libc::EINTR && interrupted < 4 {
                interrupted += 1;
                continue;
            }
            if e == libc::EAGAIN || e == libc::EWOULDBLOCK || e == libc::ENOBUFS {
                // The socket buffer is full: drop the rest, never block.
                self.stats.tx_would_block += msgs[i..].iter().map(|m| m.count as u64).sum::<u64>();
                break;
            }
            // This message was refused (a destination the kernel cannot route, a size it will
            // not segment): drop it alone and go on with the rest.
            self.stats.tx_errors += msgs[i].count as u64;
            i += 1;
        }
        self.stage.clear();
    }

    /// Read the socket once into the receive buffers; returns whether anything came.
    fn read_socket(&mut self) -> bool {
        let (mut hdrs, mut iovs, mut names): ([libc::mmsghdr; RX_MSGS], [libc::iovec; RX_MSGS], [libc::sockaddr_in; RX_MSGS]) =
            // SAFETY: all-zero is a valid value of these plain C structs (null pointers, zero lengths).
            unsafe { (mem::zeroed(), mem::zeroed(), mem::zeroed()) };
        let mut cmsgs = [[0u64; CMSG_WORDS]; RX_MSGS];
        let base = self.rx_buf.as_mut_ptr();
        for k in 0..RX_MSGS {
            // SAFETY: buffer `k` lies within `rx_buf` (RX_MSGS * RX_BUF bytes).
            iovs[k] = libc::iovec { iov_base: unsafe { base.add(k * RX_BUF) }.cast(), iov_len: RX_BUF };
            let h = &mut hdrs[k].msg_hdr;
            h.msg_name = (&raw mut names[k]).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &raw mut iovs[k];
            h.msg_iovlen = 1;
            h.msg_control = cmsgs[k].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of_val(&cmsgs[k]) as _;
        }
        // SAFETY: the headers point at buffers owned by this frame and `rx_buf`, all alive for
        // the call; MSG_DONTWAIT never blocks.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                RX_MSGS as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return false;
        }
        self.stats.rx_syscalls += 1;
        let mut count = 0;
        for (idx, h) in hdrs[..r as usize].iter().enumerate() {
            let len = h.msg_len as usize;
            // SAFETY: the kernel filled the control buffer up to the returned msg_controllen.
            let (tos, seg, ovfl) = unsafe { read_rx_cmsgs(&h.msg_hdr) };
            if let Some(d) = ovfl {
                self.stats.rx_socket_drops = u64::from(d);
            }
            let name = &names[idx];
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            if truncated || i32::from(name.sin_family) != libc::AF_INET {
                self.stats.rx_dropped += 1;
                continue;
            }
            let src =
                SocketAddrV4::new(Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)), u16::from_be(name.sin_port));
            let gro = seg.filter(|&s| s > 0);
            // After a dropped buffer, later ones move down so that buffer `k` holds message `k`
            // (rare: only a truncated or foreign message is dropped).
            if idx != count {
                self.rx_buf.copy_within(idx * RX_BUF..idx * RX_BUF + len, count * RX_BUF);
            }
            let buf = &self.rx_buf[count * RX_BUF..count * RX_BUF + len];
            let (seg, inner) = match gro {
                // A run of datagrams (`SKB_GSO_UDP_L4`, what ferry's `UDP_SEGMENT` sends make).
                Some(s) => {
                    let s = s.min(len.max(1));
                    (s, super_datagram(buf, s).unwrap_or(0))
                }
                // One datagram, or a kernel tunnel device's super-packet.
                None => match tunnel_super_packet(buf, self.inner_mtu) {
                    Some((inner, mss)) => (mss, inner),
                    None => (len.max(1), 0),
                },
            };
            if inner > 0 {
                self.stats.rx_super += 1;
            }
            self.rx_msgs[count] = RxMsg { src, tos, seg, len, inner };
            self.stats.rx_messages += 1;
            count += 1;
        }
        self.rx_count = count;
        self.rx_next = (0, 0);
        count > 0
    }
}

fn sockaddr_v4(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn buffer_sizes(fd: RawFd) -> (usize, usize) {
    let get = |name| getsockopt(fd, libc::SOL_SOCKET, name).map_or(0, |v| usize::try_from(v).unwrap_or(0));
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

fn getsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option value and its size, both writable.
    let r = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: an int option value and its size.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&raw const value).cast(), mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Write `IP_TOS` and, for a batch, `UDP_SEGMENT` into `h`'s control buffer and set its length.
///
/// # Safety
/// `h.msg_control` points at `h.msg_controllen` writable, aligned bytes, room for both messages.
unsafe fn write_tx_cmsgs(h: &mut libc::msghdr, tos: u8, segment: Option<u16>) {
    // SAFETY: the caller's contract; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen.
    unsafe {
        let mut used = 0;
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_TOS;
        (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), libc::c_int::from(tos));
        used += libc::CMSG_SPACE(mem::size_of::<libc::c_int>() as u32) as usize;
        if let Some(seg) = segment {
            let c = libc::CMSG_NXTHDR(h, c);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            used += libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as usize;
        }
        h.msg_controllen = used as _;
    }
}

/// Read `IP_TOS`, `UDP_GRO` and `SO_RXQ_OVFL` from a received header's control messages.
///
/// # Safety
/// `h`'s control buffer holds what the kernel wrote, `msg_controllen` bytes of it.
unsafe fn read_rx_cmsgs(h: &libc::msghdr) -> (u8, Option<usize>, Option<u32>) {
    let (mut tos, mut seg, mut ovfl) = (0, None, None);
    // SAFETY: the caller's contract; the CMSG macros walk only within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_TOS) => tos = *data,
                (libc::SOL_UDP, UDP_GRO) => {
                    seg = usize::try_from(std::ptr::read_unaligned(data.cast::<libc::c_int>())).ok();
                }
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => ovfl = Some(std::ptr::read_unaligned(data.cast::<u32>())),
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    (tos, seg, ovfl)
}

impl<M: FrameMem> Port for UdpPort<M> {
    type Mem = M;

    fn name(&self) -> &str {
        &self.name
    }

    fn recv(&mut self, mem: &mut M, out: &mut [Pkt]) -> usize {
        // A run the worker never answered for is delivered the ordinary way (`rx_next` is
        // already at its start).
        self.held = None;
        let mut n = 0;
        let mut read = false;
        let off = usize::from(RX_HEADROOM);
        while n < out.len() && !self.fill.is_empty() {
            let (mi, at) = self.rx_next;
            if mi >= self.rx_count {
                // One read per call: a socket that keeps delivering must not starve the other ports.
                if read || !self.read_socket() {
                    break;
                }
                read = true;
                continue;
            }
            let m = self.rx_msgs[mi];
            let Some(frame) = self.fill.pop_front() else { break };
            let mut hold = None;
            let written = if m.inner > 0 {
                // A super-packet: `at` counts its TCP segments.
                let payload = &self.rx_buf[mi * RX_BUF..mi * RX_BUF + m.len];
                let count = super_segments(payload, m.inner, m.seg).unwrap_or(0);
                self.rx_next = if at + 1 >= count { (mi + 1, 0) } else { (mi, at + 1) };
                let buf = mem.frame_mut(frame);
                write_super_segment(buf, off, self.local, self.local_mac, m.src, m.tos, payload, m.inner, m.seg, at)
            } else {
                let end = (at + m.seg.max(1)).min(m.len);
                self.rx_next = if end >= m.len { (mi + 1, 0) } else { (mi, end) };
                let base = mi * RX_BUF;
                if self.super_packets && end < m.len && (at == 0 || self.run_at == (mi, at)) {
                    hold = self.find_run(base + at, base + m.len, m.seg);
                }
                let datagram = &self.rx_buf[base + at..base + end];
                write_received(mem.frame_mut(frame), off, self.local, self.local_mac, m.src, m.tos, datagram)
            };
            match written {
                Some(len) => {
                    // Frame sizes are at most 65535 (checked when the memory was made).
                    out[n] = Pkt { frame, offset: RX_HEADROOM, len: len as u16 };
                    n += 1;
                    self.stats.rx_datagrams += 1;
                    if hold.is_some() {
                        // The head ends the batch: the worker routes it, then takes the rest.
                        self.held = hold;
                        break;
                    }
                }
                None => {
                    self.stats.rx_dropped += 1;
                    self.fill.push_front(frame);
                }
            }
        }
        n
    }

    fn send(&mut self, mem: &mut M, pkts: &[Pkt]) -> usize {
        let n = pkts.len().min(self.tx_ring.saturating_sub(self.done.len()));
        for p in &pkts[..n] {
            let bytes = mem.bytes(*p);
            match parse_outer(bytes) {
                Some(o) => {
                    let payload = &bytes[o.start..o.start + o.len];
                    if !self.stage.push(o.dst, o.tos, payload) {
                        self.transmit();
                        if !self.stage.push(o.dst, o.tos, payload) {
                            self.stats.tx_malformed += 1;
                        }
                    }
                }
                None => self.stats.tx_malformed += 1,
            }
            self.done.push_back(p.frame);
        }
        n
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.stage.is_empty() {
            self.transmit();
        }
        Ok(())
    }

    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        let n = self.done.len();
        for f in self.done.drain(..) {
            free.push(f);
        }
        n
    }

    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        let mut n = 0;
        while self.fill.len() < self.rx_frames
            && let Some(f) = free.pop()
        {
            self.fill.push_back(f);
            n += 1;
        }
        n
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn frames_held(&self) -> usize {
        self.fill.len() + self.done.len()
    }

    fn release(mut self, free: &mut FreeFrames) {
        // What is staged was copied already: send it, then every frame is the worker's again.
        let _ = self.flush();
        for f in self.fill.drain(..).chain(self.done.drain(..)) {
            free.push(f);
        }
    }

    fn stats(&self) -> PortStats {
        PortStats { rx_dropped: self.stats.rx_socket_drops + self.stats.rx_dropped, ..PortStats::default() }
    }

    fn super_run(&self) -> Option<SegmentRun<'_>> {
        let h = self.held?;
        Some(SegmentRun {
            buf: &self.rx_buf[h.start..h.end],
            stride: h.stride,
            count: h.run.count - 1,
            payload_at: h.run.payload_at,
            mss: h.run.mss,
            psh: h.run.psh,
        })
    }

    fn super_done(&mut self, sent: usize) {
        let Some(h) = self.held.take() else { return };
        if sent == 0 {
            self.super_off = SUPER_BACKOFF;
            return;
        }
        // The run's datagrams are delivered: go on after them (`rx_next` is at the run's start).
        let sent = sent.min(h.run.count - 1);
        let (mi, at) = self.rx_next;
        let len = self.rx_msgs.get(mi).map_or(0, |m| m.len);
        let next = at + sent * h.stride;
        self.rx_next = if next >= len { (mi + 1, 0) } else { (mi, next) };
        self.run_at = self.rx_next;
        self.stats.rx_datagrams += sent as u64;
        self.stats.rx_runs += 1;
        self.stats.rx_run_segments += sent as u64;
    }

    fn last_sent_payload(&self) -> Option<&[u8]> {
        self.stage.last().map(|(_, _, p)| p)
    }

    fn send_segments(&mut self, seg: &Segmenter<'_>, tunnel_header: usize, first: usize) -> usize {
        let Some((dst, tos, last)) = self.stage.last() else { return 0 };
        let mut th = [0u8; MAX_TUNNEL_HEADER];
        let Some(th) = th.get_mut(..tunnel_header).filter(|_| last.len() >= tunnel_header) else { return 0 };
        th.copy_from_slice(&last[..tunnel_header]);
        let mut sent = 0;
        for i in first..seg.segments() {
            let n = tunnel_header + seg.segment_len(i);
            if !self.stage.has_room(n) {
                self.transmit();
            }
            // The stage was just emptied if it was full: one datagram always fits.
            let Some(out) = self.stage.reserve(dst, tos, n) else {
                self.stats.tx_malformed += 1;
                continue;
            };
            out[..tunnel_header].copy_from_slice(th);
            match seg.write_segment(i, &mut out[tunnel_header..], Checksum::Complete) {
                Ok(_) => sent += 1,
                // Not reachable: the room is the segment's own length. Counted, never a panic.
                Err(_) => self.stats.tx_malformed += 1,
            }
        }
        sent
    }
}

/// The longest tunnel header [`Port::send_segments`] repeats (Geneve: 8 bytes and up to 252 of
/// options).
const MAX_TUNNEL_HEADER: usize = 260;

#[cfg(test)]
mod tests;
