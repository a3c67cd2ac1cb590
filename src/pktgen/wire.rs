//! The generator's frames: how they are built (setup side), patched per packet and recognised by
//! the receiver (hot path).
//!
//! Every frame is Ethernet / IPv4 / UDP, optionally wrapped in a VXLAN or Geneve tunnel by
//! [`ferry_encap::encap`]. The UDP payload of the innermost datagram starts with an 18-byte
//! probe, so that even a 60-byte frame carries one:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     magic "FYpg" (0x46597067)                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                  sequence number (u64, per flow)              |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      transmit time, CLOCK_MONOTONIC ns, low 48 bits           |
//! +                               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                               |  zero padding to the frame size
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! All fields are big-endian. The flow index (which sequence the number belongs to) is the inner
//! IPv4 identification field: the datagrams are sent with DF set, so RFC 6864 leaves the field
//! free. 48 bits of nanoseconds wrap every 78 hours; the receiver restores the high bits from its
//! own clock (CLOCK_MONOTONIC is shared by all processes of one machine, so one-way latency
//! between a generator and a receiver on the same machine is exact).
//!
//! The UDP checksum is either zero or correct: the frame keeps the folded sum of everything but the
//! 14 patched bytes, and [`patch`] adds the sum of those bytes back.

use std::net::Ipv4Addr;

use ferry_encap::wire::vxlan;
use ferry_encap::{FrameBuf, MacAddr, TunnelTemplate, checksum};

/// The probe's first four bytes.
pub const MAGIC: [u8; 4] = *b"FYpg";
/// Bytes of probe at the start of the innermost UDP payload.
pub const PROBE_LEN: usize = 18;
/// Ethernet + IPv4 + UDP headers of a generated (inner) frame.
pub const HEADERS_LEN: usize = 14 + 20 + 8;
/// The smallest generated frame: headers and a probe (also the Ethernet minimum without FCS).
pub const MIN_FRAME: usize = HEADERS_LEN + PROBE_LEN;

/// Offsets inside the probe.
mod field {
    use std::ops::Range;
    pub(super) const MAGIC: Range<usize> = 0..4;
    pub(super) const SEQ: Range<usize> = 4..12;
    pub(super) const TIME: Range<usize> = 12..18;
    /// The bytes patched per packet (sequence number and time).
    pub(super) const PATCHED: Range<usize> = 4..18;
}

/// UDP ports that carry VXLAN (IANA, and Linux's/Flannel's historical default).
const VXLAN_PORTS: [u16; 2] = [vxlan::DEFAULT_PORT, 8472];
/// Geneve's IANA port.
const GENEVE_PORT: u16 = 6081;
/// Geneve's protocol type for an Ethernet payload (Transparent Ethernet Bridging).
const ETH_BRIDGING: u16 = 0x6558;

/// The addresses of one generated flow (the inner frame when tunnelled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowAddrs {
    /// Ethernet source.
    pub src_mac: MacAddr,
    /// Ethernet destination.
    pub dst_mac: MacAddr,
    /// IPv4 source.
    pub src_ip: Ipv4Addr,
    /// IPv4 destination.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
}

/// Source ports a flow set walks through before it moves on to the next source address.
pub const PORTS_PER_ADDRESS: u32 = 256;

impl FlowAddrs {
    /// Flow `index` of a set based on `self`: the source port advances by `index` modulo
    /// [`PORTS_PER_ADDRESS`] and the source address by the quotient, so both the 5-tuple hash and
    /// RSS see `flows` distinct flows.
    pub fn flow(&self, index: u32) -> FlowAddrs {
        let port = self.src_port.wrapping_add((index % PORTS_PER_ADDRESS) as u16);
        let ip = Ipv4Addr::from_bits(self.src_ip.to_bits().wrapping_add(index / PORTS_PER_ADDRESS));
        FlowAddrs { src_ip: ip, src_port: port, ..*self }
    }

    /// The addresses the unit tests build frames with.
    #[cfg(test)]
    pub(crate) fn for_tests() -> FlowAddrs {
        FlowAddrs {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: Ipv4Addr::new(10, 0, 0, 2),
            src_port: 1024,
            dst_port: 9,
        }
    }
}

/// How a prebuilt frame is patched per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    /// Frame length.
    pub len: u16,
    /// Offset of the probe in the frame.
    pub probe: u16,
    /// Offset of the inner UDP checksum, when it is computed (`None`: sent as zero).
    pub csum: Option<u16>,
    /// The folded UDP checksum sum (pseudo-header included) with the patched bytes zero.
    pub base_sum: u32,
    /// Flow index.
    pub flow: u32,
}

/// Why a frame cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The frame is shorter than headers, tunnel and probe.
    #[error("a {size}-byte frame is too short: the smallest is {min} bytes{tunnel}")]
    TooShort {
        /// Asked size.
        size: usize,
        /// Smallest possible.
        min: usize,
        /// Explains the tunnel part, if any.
        tunnel: &'static str,
    },
    /// The frame does not fit the buffer.
    #[error("a {size}-byte frame does not fit a {room}-byte buffer")]
    TooLong {
        /// Asked size.
        size: usize,
        /// Room in the buffer.
        room: usize,
    },
}

/// The smallest frame the generator can send with `tunnel` overhead.
pub fn min_frame(tunnel: Option<&TunnelTemplate>) -> usize {
    MIN_FRAME + tunnel.map_or(0, TunnelTemplate::overhead)
}

/// Build a `size`-byte frame of flow `flow` (addresses `addrs`) at the start of `buf`, tunnelled
/// through `tunnel` if given, with sequence number and time zero.
///
/// # Errors
/// The size is below [`min_frame`] or above `buf.len()`.
pub fn build(
    buf: &mut [u8],
    addrs: &FlowAddrs,
    flow: u32,
    size: usize,
    tunnel: Option<&TunnelTemplate>,
    udp_checksum: bool,
) -> Result<Slot, BuildError> {
    let over = tunnel.map_or(0, TunnelTemplate::overhead);
    if size < min_frame(tunnel) {
        let t = if tunnel.is_some() { " with the tunnel headers" } else { "" };
        return Err(BuildError::TooShort { size, min: min_frame(tunnel), tunnel: t });
    }
    if size > buf.len() || size > usize::from(u16::MAX) {
        return Err(BuildError::TooLong { size, room: buf.len() });
    }
    let inner_len = size - over;
    let f = &mut buf[over..size];
    f.fill(0);
    // Ethernet.
    f[0..6].copy_from_slice(&addrs.dst_mac.0);
    f[6..12].copy_from_slice(&addrs.src_mac.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: no options, DF, TTL 64, UDP; the identification is the flow index.
    let ip_len = (inner_len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&(flow as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&addrs.src_ip.octets());
    ip[16..20].copy_from_slice(&addrs.dst_ip.octets());
    let c = checksum::of(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    // UDP.
    let udp_len = ip_len - 20;
    let udp = &mut f[34..];
    udp[0..2].copy_from_slice(&addrs.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&addrs.dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[8 + field::MAGIC.start..8 + field::MAGIC.end].copy_from_slice(&MAGIC);
    let base_sum = checksum::pseudo_v4(addrs.src_ip, addrs.dst_ip, 17, udp_len) + checksum::sum(udp);
    let probe = over + HEADERS_LEN;
    let csum = udp_checksum.then_some((over + 34 + 6) as u16);
    let slot = Slot { len: size as u16, probe: probe as u16, csum, base_sum, flow };

    if let Some(tpl) = tunnel {
        let mut fb = FrameBuf::new(&mut buf[..size], over, inner_len).ok_or(BuildError::TooLong { size, room: 0 })?;
        // Headroom and lengths were checked above, so only an impossible frame could fail here.
        ferry_encap::encap(tpl, &mut fb).map_err(|_| BuildError::TooShort { size, min: 0, tunnel: "" })?;
    }
    patch(buf, &slot, 0, 0);
    Ok(slot)
}

/// Write sequence number `seq` and time `time_ns` into the frame `slot` describes, and its UDP
/// checksum if it carries one. A few stores and a 14-byte sum: no parsing.
///
/// # Panics
/// If `frame` is shorter than `slot.len` (the slot was built for another frame).
#[inline]
pub fn patch(frame: &mut [u8], slot: &Slot, seq: u64, time_ns: u64) {
    let p = usize::from(slot.probe);
    let probe = &mut frame[p..p + PROBE_LEN];
    probe[field::SEQ].copy_from_slice(&seq.to_be_bytes());
    probe[field::TIME].copy_from_slice(&time_ns.to_be_bytes()[2..]);
    if let Some(c) = slot.csum {
        let mut sum = checksum::finish_sum(slot.base_sum + checksum::sum(&probe[field::PATCHED]));
        if sum == 0 {
            sum = 0xffff;
        }
        let c = usize::from(c);
        frame[c..c + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

/// A probe found in a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Flow index (the innermost IPv4 identification).
    pub flow: u16,
    /// Sequence number within the flow.
    pub seq: u64,
    /// Transmit time: CLOCK_MONOTONIC nanoseconds, low 48 bits.
    pub time48: u64,
    /// Tunnel headers crossed to reach it.
    pub depth: u8,
}

/// How deep [`find_probe`] looks into tunnels (VXLAN in VXLAN is as deep as anyone goes).
const MAX_DEPTH: u8 = 2;

/// Find the generator's probe in `frame`: in the innermost UDP payload, looking through VXLAN
/// (ports 4789 and 8472) and Geneve (6081) tunnels, one VLAN tag tolerated at each level. Returns
/// `None` for anything else; never panics, whatever the bytes.
pub fn find_probe(frame: &[u8]) -> Option<Probe> {
    find_at(frame, 0)
}

fn find_at(frame: &[u8], depth: u8) -> Option<Probe> {
    let mut et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let mut l3 = 14;
    if et == 0x8100 || et == 0x88a8 {
        et = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        l3 = 18;
    }
    let ip = frame.get(l3..)?;
    let (flow, udp) = match et {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
            if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 17 || frag != 0 || total < ihl {
                return None;
            }
            let id = u16::from_be_bytes([ip[4], ip[5]]);
            (id, ip.get(ihl..total.min(ip.len()))?)
        }
        0x86dd => {
            // Only as an outer header (no extension headers before UDP); the generator's own
            // datagrams are IPv4, so a probe here has no flow index.
            if ip.first()? >> 4 != 6 || *ip.get(6)? != 17 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            (0, ip.get(40..(40 + payload).min(ip.len()))?)
        }
        _ => return None,
    };
    let dport = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let ulen = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    let payload = udp.get(8..ulen.min(udp.len()).max(8))?;
    if payload.len() >= PROBE_LEN && payload[field::MAGIC] == MAGIC {
        let seq = u64::from_be_bytes(payload[field::SEQ].try_into().ok()?);
        let mut t = [0u8; 8];
        t[2..].copy_from_slice(&payload[field::TIME]);
        return Some(Probe { flow, seq, time48: u64::from_be_bytes(t), depth });
    }
    if depth >= MAX_DEPTH {
        return None;
    }
    let inner = if VXLAN_PORTS.contains(&dport) {
        // Flags with the I bit, then the VNI; the inner Ethernet frame follows 8 bytes in.
        if payload.first()? & 0x08 == 0 {
            return None;
        }
        payload.get(8..)?
    } else if dport == GENEVE_PORT {
        let opts = usize::from(payload.first()? & 0x3f) * 4;
        if u16::from_be_bytes([*payload.get(2)?, *payload.get(3)?]) != ETH_BRIDGING {
            return None;
        }
        payload.get(8 + opts..)?
    } else {
        return None;
    };
    find_at(inner, depth + 1)
}

/// The full CLOCK_MONOTONIC time of a 48-bit stamp taken before `now_ns` (within 78 hours).
#[inline]
pub fn widen_time(time48: u64, now_ns: u64) -> u64 {
    const MASK: u64 = (1 << 48) - 1;
    let t = (now_ns & !MASK) | (time48 & MASK);
    if t > now_ns && t >= 1 << 48 { t - (1 << 48) } else { t }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock every process on the machine shares (a vDSO call, not
/// a system call).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    use ferry_encap::{TemplateParams, TunnelKind};

    use super::*;

    fn tunnel(kind: TunnelKind, vni: u32) -> TunnelTemplate {
        let p = TemplateParams::new(
            kind,
            vni,
            MacAddr([2, 0, 0, 0, 1, 1]),
            MacAddr([2, 0, 0, 0, 1, 2]),
            IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2)),
        );
        TunnelTemplate::new(&p).expect("template")
    }

    /// The UDP checksum of the innermost datagram verifies (etherparse as the oracle).
    fn udp_checksum_ok(frame: &[u8]) -> bool {
        let p = SlicedPacket::from_ethernet(frame).expect("parses");
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (p.net, p.transport) else {
            panic!("not IPv4/UDP")
        };
        let h = udp.to_header();
        h.calc_checksum_ipv4(&ip.header().to_header(), udp.payload()).expect("checksum") == h.checksum
    }

    #[test]
    fn builds_a_minimal_frame_etherparse_decodes() {
        let mut buf = [0xaau8; 2048];
        let slot = build(&mut buf, &FlowAddrs::for_tests().flow(3), 3, 60, None, true).expect("builds");
        assert_eq!((slot.len, slot.probe, slot.csum), (60, 42, Some(40)));
        let f = &buf[..60];
        let p = SlicedPacket::from_ethernet(f).expect("parses");
        let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
        let h = ip.header().to_header();
        assert_eq!(h.identification, 3);
        assert!(h.dont_fragment);
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(h.source, [10, 0, 0, 1]);
        let Some(TransportSlice::Udp(udp)) = &p.transport else { panic!("UDP") };
        assert_eq!((udp.source_port(), udp.destination_port()), (1027, 9));
        assert_eq!(&udp.payload()[..4], b"FYpg");
        assert!(udp_checksum_ok(f));
        let probe = find_probe(f).expect("probe");
        assert_eq!(probe, Probe { flow: 3, seq: 0, time48: 0, depth: 0 });
    }

    #[test]
    fn patch_keeps_the_checksum_correct() {
        let mut buf = [0u8; 2048];
        let slot = build(&mut buf, &FlowAddrs::for_tests(), 0, 200, None, true).expect("builds");
        for (seq, t) in [(1, 5), (u64::MAX, (1 << 48) - 1), (0x1234_5678_9abc, 0xdead_beef_cafe), (7, 0)] {
            patch(&mut buf, &slot, seq, t);
            assert!(udp_checksum_ok(&buf[..200]), "seq {seq} time {t}");
            let p = find_probe(&buf[..200]).expect("probe");
            assert_eq!((p.seq, p.time48), (seq, t & ((1 << 48) - 1)));
        }
        // Checksum off: the field stays zero.
        let slot = build(&mut buf, &FlowAddrs::for_tests(), 0, 200, None, false).expect("builds");
        patch(&mut buf, &slot, 99, 99);
        assert_eq!(&buf[40..42], &[0, 0]);
        assert_eq!(find_probe(&buf[..200]).expect("probe").seq, 99);
    }

    #[test]
    fn flows_vary_port_then_address() {
        let a = FlowAddrs::for_tests();
        assert_eq!((a.flow(0).src_port, a.flow(0).src_ip), (1024, Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!((a.flow(255).src_port, a.flow(255).src_ip), (1279, Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!((a.flow(256).src_port, a.flow(256).src_ip), (1024, Ipv4Addr::new(10, 0, 0, 2)));
    }

    #[test]
    fn size_limits() {
        let mut buf = [0u8; 128];
        assert!(matches!(
            build(&mut buf, &FlowAddrs::for_tests(), 0, 59, None, true),
            Err(BuildError::TooShort { min: 60, .. })
        ));
        assert!(matches!(
            build(&mut buf, &FlowAddrs::for_tests(), 0, 129, None, true),
            Err(BuildError::TooLong { .. })
        ));
        let t = tunnel(TunnelKind::Vxlan, 1);
        assert_eq!(min_frame(Some(&t)), 110);
        let e = build(&mut buf, &FlowAddrs::for_tests(), 0, 100, Some(&t), true).expect_err("too short");
        assert!(e.to_string().contains("smallest is 110 bytes with the tunnel"), "{e}");
    }

    #[test]
    fn vxlan_frame_decodes_and_the_probe_is_found_inside() {
        let mut buf = [0u8; 2048];
        let t = tunnel(TunnelKind::Vxlan, 4242);
        let slot = build(&mut buf, &FlowAddrs::for_tests().flow(9), 9, 300, Some(&t), true).expect("builds");
        patch(&mut buf, &slot, 77, 1234);
        let f = &buf[..300];
        let p = SlicedPacket::from_ethernet(f).expect("outer parses");
        let Some(TransportSlice::Udp(udp)) = &p.transport else { panic!("outer UDP") };
        assert_eq!(udp.destination_port(), 4789);
        let vx = udp.payload();
        assert_eq!(vx[0], 0x08);
        assert_eq!(u32::from_be_bytes([0, vx[4], vx[5], vx[6]]), 4242);
        assert!(udp_checksum_ok(&vx[8..]), "inner checksum");
        let probe = find_probe(f).expect("probe");
        assert_eq!(probe, Probe { flow: 9, seq: 77, time48: 1234, depth: 1 });
    }

    #[test]
    fn geneve_frame_probe_is_found() {
        let mut buf = [0u8; 2048];
        let t = tunnel(TunnelKind::Geneve, 7);
        let slot = build(&mut buf, &FlowAddrs::for_tests(), 1, 150, Some(&t), false).expect("builds");
        patch(&mut buf, &slot, 5, 6);
        let probe = find_probe(&buf[..150]).expect("probe");
        assert_eq!((probe.flow, probe.seq, probe.time48, probe.depth), (1, 5, 6, 1));
    }

    #[test]
    fn foreign_and_truncated_frames_are_not_probes() {
        let mut buf = [0u8; 2048];
        build(&mut buf, &FlowAddrs::for_tests(), 0, 60, None, true).expect("builds");
        for len in 0..60 {
            assert_eq!(find_probe(&buf[..len]), None, "truncated to {len}");
        }
        let mut other = buf;
        other[42] = b'X';
        assert_eq!(find_probe(&other[..60]), None);
        let mut tcp = buf;
        tcp[23] = 6;
        assert_eq!(find_probe(&tcp[..60]), None);
    }

    #[test]
    fn time_widening() {
        let now = (5 << 48) + 1000;
        assert_eq!(widen_time(900, now), (5 << 48) + 900);
        // Stamped just before the low bits wrapped.
        assert_eq!(widen_time((1 << 48) - 10, now), (5 << 48) - 10);
        assert_eq!(widen_time(10, 20), 10);
    }
}
