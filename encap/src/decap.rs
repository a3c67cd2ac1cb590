//! Decapsulation with full validation (hot path).
//!
//! Checks, in order: the outer destination MAC is this node's (when configured), outer Ethernet and
//! IP headers (IPv4 version, IHL, lengths and checksum, no fragments; IPv6 version and length),
//! destination is this node, UDP with the tunnel port, the UDP checksum (zero over IPv6 only when
//! enabled; a non-zero one verified when enabled, the default), the VXLAN I flag or the Geneve
//! version, protocol and critical options, the VNI, and an inner frame of at least an Ethernet
//! header. Then RFC 6040 folds the outer ECN into the inner header. Whether the outer source is a
//! known node, and what the inner frame may carry, is left to the caller, which has the tables.
//!
//! A sender behind a veth hands its tunnel packets over with the checksum work unfinished, and the
//! kernel's own VXLAN device does two things there: with the inner checksum done it leaves the
//! outer UDP checksum as the folded pseudo-header sum (CHECKSUM_PARTIAL), and with the inner one
//! left partial it computes the outer one as if the inner were final (local checksum offload,
//! LCO). Verification accepts both, as the kernel behind such a veth does: the first carries no
//! checksum to verify (like a zero one), and the second verifies once the inner checksum is
//! completed, which is computed on the side, the frame untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::template::TunnelKind;
use crate::wire::ethernet::{self, EthernetFrame, ethertype};
use crate::wire::geneve::GenevePacket;
use crate::wire::ipv4::{Ipv4Packet, protocol};
use crate::wire::ipv6::Ipv6Packet;
use crate::wire::udp::{self, UdpPacket};
use crate::wire::vxlan::VxlanPacket;
use crate::{DropReason, FrameBuf, MacAddr, checksum, ecn, flow, offload};

/// What a node accepts as tunnel traffic for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecapConfig {
    /// VXLAN or Geneve.
    pub kind: TunnelKind,
    /// The configured VNI.
    pub vni: u32,
    /// The tunnel UDP port.
    pub port: u16,
    /// This node's IPv4 underlay address, if it has one.
    pub local_v4: Option<Ipv4Addr>,
    /// This node's IPv6 underlay address, if it has one.
    pub local_v6: Option<Ipv6Addr>,
    /// Verify non-zero outer UDP checksums (RFC 7348 makes this optional). On by default; turn it
    /// off only where the NIC has verified them already. Checksums a sending veth left unfinished
    /// are recognised (see the module documentation).
    pub verify_udp_checksum: bool,
    /// Accept a zero UDP checksum over an IPv6 underlay (RFC 6935/6936 make this opt-in per port;
    /// the kernel's `udp6zerocsumrx`). Off by default.
    pub accept_ipv6_zero_udp_checksum: bool,
    /// The uplink's MAC: tunnel frames addressed to another MAC are dropped, as the kernel drops
    /// `PACKET_OTHERHOST` frames (an XDP program sees them first). `None` skips the check.
    pub local_mac: Option<MacAddr>,
}

impl DecapConfig {
    /// A configuration with the IANA port for `kind`, non-zero UDP checksums verified, zero ones over
    /// IPv6 refused, and no destination MAC check (set [`DecapConfig::local_mac`]).
    pub fn new(kind: TunnelKind, vni: u32, local: IpAddr) -> Self {
        let (local_v4, local_v6) = match local {
            IpAddr::V4(a) => (Some(a), None),
            IpAddr::V6(a) => (None, Some(a)),
        };
        DecapConfig {
            kind,
            vni,
            port: kind.default_port(),
            local_v4,
            local_v6,
            verify_udp_checksum: true,
            accept_ipv6_zero_udp_checksum: false,
            local_mac: None,
        }
    }
}

/// The result of a successful decapsulation; the frame itself now holds the inner frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decapped {
    /// Outer source address: the sending node, for the caller to check against its tables.
    pub outer_src: IpAddr,
    /// Outer UDP source port (the sender's flow hash).
    pub outer_src_port: u16,
    /// The VNI (equal to the configured one).
    pub vni: u32,
}

/// Decapsulate the tunnel packet in `frame`, leaving the inner frame in it.
///
/// On error `frame` is unchanged, except that an inner header is never modified unless decapsulation
/// succeeds.
///
/// # Errors
/// The [`DropReason`] of the first check that fails.
pub fn decap(cfg: &DecapConfig, frame: &mut FrameBuf<'_>) -> Result<Decapped, DropReason> {
    let data = frame.data();
    let eth = EthernetFrame::new_checked(data)?;
    if cfg.local_mac.is_some_and(|m| m != eth.dst()) {
        return Err(DropReason::OuterDstMacNotOurs);
    }
    let l3 = eth.header_len();
    let (outer_src, udp_start, udp_avail, outer_tos, pseudo) = match eth.ethertype() {
        ethertype::IPV4 => {
            let ip = Ipv4Packet::new_checked(&data[l3..])?;
            if !ip.verify_checksum() {
                return Err(DropReason::Ipv4BadChecksum);
            }
            if ip.is_fragment() {
                return Err(DropReason::OuterFragment);
            }
            if ip.protocol() != protocol::UDP {
                return Err(DropReason::NotUdp);
            }
            if cfg.local_v4 != Some(ip.dst()) {
                return Err(DropReason::NotForThisNode);
            }
            let avail = usize::from(ip.total_len()) - ip.header_len();
            (IpAddr::V4(ip.src()), l3 + ip.header_len(), avail, ip.tos(), PseudoHeader::V4(ip.src(), ip.dst()))
        }
        ethertype::IPV6 => {
            let ip = Ipv6Packet::new_checked(&data[l3..])?;
            let ul = ip.upper_layer()?;
            if ul.fragmented {
                return Err(DropReason::OuterFragment);
            }
            if ul.protocol != protocol::UDP {
                return Err(DropReason::NotUdp);
            }
            if cfg.local_v6 != Some(ip.dst()) {
                return Err(DropReason::NotForThisNode);
            }
            let avail = crate::wire::ipv6::HEADER_LEN + usize::from(ip.payload_len()) - ul.offset;
            (IpAddr::V6(ip.src()), l3 + ul.offset, avail, ip.traffic_class(), PseudoHeader::V6(ip.src(), ip.dst()))
        }
        _ => return Err(DropReason::UnsupportedEtherType),
    };
    let udp = UdpPacket::new_checked(&data[udp_start..udp_start + udp_avail])?;
    if udp.dst_port() != cfg.port {
        return Err(DropReason::UdpPortMismatch);
    }
    // A zero checksum means none: always acceptable over IPv4, over IPv6 only when enabled.
    if udp.checksum() == 0 {
        if matches!(pseudo, PseudoHeader::V6(..)) && !cfg.accept_ipv6_zero_udp_checksum {
            return Err(DropReason::Udp6ZeroChecksum);
        }
    } else if cfg.verify_udp_checksum && !pseudo.verifies_or_unfinished(udp.datagram(), cfg.kind) {
        return Err(DropReason::UdpBadChecksum);
    }
    let header_len = tunnel_header(cfg, udp.payload())?;
    let inner_start = udp_start + udp::HEADER_LEN + header_len;
    let inner_end = udp_start + usize::from(udp.len());
    if inner_end < inner_start + ethernet::HEADER_LEN {
        return Err(DropReason::InnerTooShort);
    }
    let outer_src_port = udp.src_port();

    // RFC 6040 decapsulation: only outer ECT(1) and CE can change the inner field.
    let outer_ecn = outer_tos & 0b11;
    if outer_ecn == ecn::ECT1 || outer_ecn == ecn::CE {
        apply_ecn(&mut frame.data_mut()[inner_start..inner_end], outer_ecn)?;
    }
    frame.truncate(inner_end);
    frame.pull_front(inner_start).ok_or(DropReason::Truncated)?;
    Ok(Decapped { outer_src, outer_src_port, vni: cfg.vni })
}

/// Validate the VXLAN or Geneve header at the front of `tunnel` (the UDP payload) against `cfg`;
/// returns its length.
fn tunnel_header(cfg: &DecapConfig, tunnel: &[u8]) -> Result<usize, DropReason> {
    let (vni, header_len) = match cfg.kind {
        TunnelKind::Vxlan => {
            let v = VxlanPacket::new_checked(tunnel)?;
            if !v.has_vni() {
                return Err(DropReason::VxlanNoIFlag);
            }
            (v.vni(), crate::wire::vxlan::HEADER_LEN)
        }
        TunnelKind::Geneve => {
            let g = GenevePacket::new_checked(tunnel)?;
            if g.version() != 0 {
                return Err(DropReason::GeneveBadVersion);
            }
            if g.oam() {
                return Err(DropReason::GeneveOam);
            }
            if g.protocol() != ethertype::TEB {
                return Err(DropReason::GeneveBadProtocol);
            }
            // Without the C bit no option is critical (RFC 8926 section 3.4), so the walk, which
            // also validates the TLV lengths, is only needed when options are present.
            for opt in g.options() {
                // ferry understands no Geneve option yet: every critical one means drop.
                if opt?.is_critical() {
                    return Err(DropReason::GeneveUnknownCritical);
                }
            }
            (g.vni(), g.header_len())
        }
    };
    if vni != cfg.vni {
        return Err(DropReason::VniMismatch);
    }
    Ok(header_len)
}

/// Decapsulate one tunnel datagram as a UDP socket bound to the tunnel port delivers it: the kernel
/// has checked the outer IP and UDP headers, the port and the UDP checksum, and `payload` starts at
/// the VXLAN or Geneve header. Validates that header and the VNI as [`decap`] does, folds the outer
/// ECN (`outer_tos`, from `IP_RECVTOS` / `IPV6_RECVTCLASS`) into the inner header (RFC 6040), and
/// returns where the inner frame is in `payload`. With `UDP_GRO` the socket returns several
/// datagrams of `gso_size` bytes back to back (the last may be shorter), all with the same TOS: call
/// this on each `chunks_mut(gso_size)`.
///
/// # Errors
/// The [`DropReason`] of the first check that fails; `payload` is then unchanged.
pub fn decap_payload(
    cfg: &DecapConfig,
    outer_tos: u8,
    payload: &mut [u8],
) -> Result<core::ops::Range<usize>, DropReason> {
    let inner_start = tunnel_header(cfg, payload)?;
    if payload.len() < inner_start + ethernet::HEADER_LEN {
        return Err(DropReason::InnerTooShort);
    }
    let outer_ecn = outer_tos & 0b11;
    if outer_ecn == ecn::ECT1 || outer_ecn == ecn::CE {
        apply_ecn(&mut payload[inner_start..], outer_ecn)?;
    }
    Ok(inner_start..payload.len())
}

/// Fold an outer ECN codepoint into the inner frame's IP header. Non-IP inner frames have no ECN
/// field, and a malformed inner IP header is left for the forwarding stage to judge: both pass
/// unchanged.
fn apply_ecn(inner: &mut [u8], outer_ecn: u8) -> Result<(), DropReason> {
    let Ok(eth) = EthernetFrame::new_checked(&*inner) else { return Ok(()) };
    let (et, off) = (eth.ethertype(), eth.header_len());
    match et {
        ethertype::IPV4 => {
            let Ok(mut ip) = Ipv4Packet::new_checked(&mut inner[off..]) else { return Ok(()) };
            let tos = ip.tos();
            let e = ecn::decap(tos, outer_ecn)?;
            if e != tos & 0b11 {
                ip.set_tos_incremental((tos & 0xfc) | e);
            }
        }
        ethertype::IPV6 => {
            let Ok(mut ip) = Ipv6Packet::new_checked(&mut inner[off..]) else { return Ok(()) };
            let tc = ip.traffic_class();
            let e = ecn::decap(tc, outer_ecn)?;
            if e != tc & 0b11 {
                ip.set_traffic_class((tc & 0xfc) | e);
            }
        }
        _ => {}
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum PseudoHeader {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl PseudoHeader {
    fn sum(self, len: usize) -> u32 {
        match self {
            // UDP lengths fit 16 bits: `UdpPacket` bounds them by its u16 length field.
            PseudoHeader::V4(s, d) => checksum::pseudo_v4(s, d, protocol::UDP, len as u16),
            PseudoHeader::V6(s, d) => checksum::pseudo_v6(s, d, protocol::UDP, len as u32),
        }
    }

    /// Whether the non-zero checksum of `datagram` (a whole UDP datagram) verifies, or is one that
    /// a sending veth left unfinished (see the module documentation).
    fn verifies_or_unfinished(self, datagram: &[u8], kind: TunnelKind) -> bool {
        let pseudo = self.sum(datagram.len());
        let total = pseudo + checksum::sum(datagram);
        if checksum::finish_sum(total) == 0 {
            return true;
        }
        // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum (Linux writes
        // ~csum_tcpudp_magic(..)).
        let stored = u16::from_be_bytes([datagram[6], datagram[7]]);
        if stored == !checksum::finish_sum(pseudo) {
            return true;
        }
        // Local checksum offload: the outer checksum covers the inner one as it will be once
        // completed. Replace the inner checksum word in the sum with its completed value. The
        // datagram was parsed by `UdpPacket`, so it holds at least the 8-byte UDP header.
        let tunnel = &datagram[udp::HEADER_LEN..];
        let header_len = match kind {
            TunnelKind::Vxlan => crate::wire::vxlan::HEADER_LEN,
            TunnelKind::Geneve => match GenevePacket::new_checked(tunnel) {
                Ok(g) => g.header_len(),
                Err(_) => return false,
            },
        };
        let inner_at = udp::HEADER_LEN + header_len;
        let Some(inner) = datagram.get(inner_at..) else { return false };
        let Ok(info) = flow::classify(inner) else { return false };
        let Some(fix) = offload::unfinished_checksum(inner, &info) else { return false };
        // The word must sit at an even offset of the datagram to be one word of its sum (tunnel
        // and IP headers are multiples of 4 bytes, so it always does for well-formed frames).
        if !(inner_at + fix.at).is_multiple_of(2) {
            return false;
        }
        checksum::finish_sum(total + u32::from(!fix.stored) + u32::from(fix.completed)) == 0
    }
}
