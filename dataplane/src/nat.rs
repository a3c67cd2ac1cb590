//! Address and port translation in place, with incremental checksum updates (hot path), and the
//! TCP reset that answers a connection to a service without endpoints.
//!
//! A rewrite changes an address and a port of an IPv4 or IPv6 packet whose headers a
//! [`Ctx`] located. The IPv4 header checksum and the TCP or UDP checksum (whose pseudo-header
//! covers the addresses) are updated with RFC 1624's `HC' = ~(~HC + ~m + m')` over each changed
//! 16-bit word; nothing is summed again. A UDP-over-IPv4 checksum of zero ("none") stays zero; a
//! UDP checksum that updates to zero is sent as 0xffff (RFC 768).
//!
//! SCTP has no pseudo-header: an address change leaves its CRC32c alone, and a port change
//! updates it from two passes over the packet (the CRC of the packet before and after), so a
//! packet that arrived with a wrong CRC leaves with one wrong by the same error, never repaired.
//!
//! The caller passes frames whose checksums are final (the pipeline completes unfinished ones
//! first), and addresses of the packet's own family.

use std::net::IpAddr;

use ferry_encap::checksum;
use ferry_encap::flow::L3;
use ferry_encap::wire::ipv4::protocol;

use crate::pipeline::Ctx;

/// Which end of the packet to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source address and port.
    Src,
    /// The destination address and port.
    Dst,
}

/// Why a rewrite was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatError {
    /// The new address is of the other family.
    Family,
    /// No TCP or UDP header where the context says (a fragment, or truncated).
    NoPorts,
}

/// The 16-bit words of an address, as they sit in the header.
#[inline]
fn words(a: IpAddr, out: &mut [u16; 8]) -> usize {
    match a {
        IpAddr::V4(a) => {
            let o = a.octets();
            out[0] = u16::from_be_bytes([o[0], o[1]]);
            out[1] = u16::from_be_bytes([o[2], o[3]]);
            2
        }
        IpAddr::V6(a) => {
            *out = a.segments();
            8
        }
    }
}

/// SCTP's IP protocol number.
pub const SCTP: u8 = 132;

/// The CRC32c of an SCTP packet (`sctp`: common header and chunks) with its checksum field taken
/// as zero (RFC 9260 appendix A).
pub fn sctp_crc(sctp: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&sctp[..8]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &sctp[12..])
}

/// Rewrite one end of a TCP, UDP or SCTP packet to `addr`:`port`, updating its checksums, and
/// the context to match.
///
/// # Errors
/// [`NatError`]; the frame is unchanged then.
#[inline]
pub fn rewrite(frame: &mut [u8], ctx: &mut Ctx, end: End, addr: IpAddr, port: u16) -> Result<(), NatError> {
    let info = &ctx.flow;
    let Some((l4, l4_end)) = info.l4 else { return Err(NatError::NoPorts) };
    let old_addr = match end {
        End::Src => ctx.src(),
        End::Dst => ctx.dst(),
    };
    if old_addr.is_ipv4() != addr.is_ipv4() {
        return Err(NatError::Family);
    }
    let csum_at = match info.protocol {
        protocol::TCP => 16,
        protocol::UDP => 6,
        SCTP => return rewrite_sctp(frame, ctx, end, addr, port),
        _ => return Err(NatError::NoPorts),
    };
    if l4 + csum_at + 2 > l4_end || l4_end > frame.len() {
        return Err(NatError::NoPorts);
    }
    let (addr_at, port_at) = match (info.l3, end) {
        (L3::Ipv4, End::Src) => (info.l3_offset + 12, l4),
        (L3::Ipv4, End::Dst) => (info.l3_offset + 16, l4 + 2),
        (_, End::Src) => (info.l3_offset + 8, l4),
        (_, End::Dst) => (info.l3_offset + 24, l4 + 2),
    };
    let (mut old_w, mut new_w) = ([0u16; 8], [0u16; 8]);
    let n = words(old_addr, &mut old_w);
    words(addr, &mut new_w);
    let old_port = u16::from_be_bytes([frame[port_at], frame[port_at + 1]]);

    let l4_csum = u16::from_be_bytes([frame[l4 + csum_at], frame[l4 + csum_at + 1]]);
    let udp_none = info.protocol == protocol::UDP && info.l3 == L3::Ipv4 && l4_csum == 0;
    let mut c = l4_csum;
    let mut ip_c = if info.l3 == L3::Ipv4 {
        u16::from_be_bytes([frame[info.l3_offset + 10], frame[info.l3_offset + 11]])
    } else {
        0
    };
    for k in 0..n {
        c = checksum::update_word(c, old_w[k], new_w[k]);
        if info.l3 == L3::Ipv4 {
            ip_c = checksum::update_word(ip_c, old_w[k], new_w[k]);
        }
        frame[addr_at + 2 * k..addr_at + 2 * k + 2].copy_from_slice(&new_w[k].to_be_bytes());
    }
    c = checksum::update_word(c, old_port, port);
    frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    if info.l3 == L3::Ipv4 {
        frame[info.l3_offset + 10..info.l3_offset + 12].copy_from_slice(&ip_c.to_be_bytes());
    }
    if !udp_none {
        if c == 0 && info.protocol == protocol::UDP {
            c = 0xffff;
        }
        frame[l4 + csum_at..l4 + csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    match end {
        End::Src => {
            ctx.flow.src = Some(addr);
            ctx.flow.ports.0 = port;
        }
        End::Dst => {
            ctx.flow.dst = Some(addr);
            ctx.flow.ports.1 = port;
        }
    }
    Ok(())
}

/// [`rewrite`] for SCTP: the address (and the IPv4 header checksum), the port, and the CRC32c
/// updated for the port (RFC 9260's checksum covers no address).
#[cold]
fn rewrite_sctp(frame: &mut [u8], ctx: &mut Ctx, end: End, addr: IpAddr, port: u16) -> Result<(), NatError> {
    let info = &ctx.flow;
    let Some((l4, l4_end)) = info.l4 else { return Err(NatError::NoPorts) };
    // The common header (ports, verification tag, checksum) and the whole packet in the frame.
    if l4 + 12 > l4_end || l4_end > frame.len() {
        return Err(NatError::NoPorts);
    }
    let (addr_at, port_at) = match (info.l3, end) {
        (L3::Ipv4, End::Src) => (info.l3_offset + 12, l4),
        (L3::Ipv4, End::Dst) => (info.l3_offset + 16, l4 + 2),
        (_, End::Src) => (info.l3_offset + 8, l4),
        (_, End::Dst) => (info.l3_offset + 24, l4 + 2),
    };
    let old_addr = match end {
        End::Src => ctx.src(),
        End::Dst => ctx.dst(),
    };
    let (mut old_w, mut new_w) = ([0u16; 8], [0u16; 8]);
    let n = words(old_addr, &mut old_w);
    words(addr, &mut new_w);
    let mut ip_c = if info.l3 == L3::Ipv4 {
        u16::from_be_bytes([frame[info.l3_offset + 10], frame[info.l3_offset + 11]])
    } else {
        0
    };
    for k in 0..n {
        if info.l3 == L3::Ipv4 {
            ip_c = checksum::update_word(ip_c, old_w[k], new_w[k]);
        }
        frame[addr_at + 2 * k..addr_at + 2 * k + 2].copy_from_slice(&new_w[k].to_be_bytes());
    }
    if info.l3 == L3::Ipv4 {
        frame[info.l3_offset + 10..info.l3_offset + 12].copy_from_slice(&ip_c.to_be_bytes());
    }
    let stored = u32::from_le_bytes([frame[l4 + 8], frame[l4 + 9], frame[l4 + 10], frame[l4 + 11]]);
    let before = sctp_crc(&frame[l4..l4_end]);
    frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    let after = sctp_crc(&frame[l4..l4_end]);
    // The CRC is carried least significant byte first (as Linux's `sctp_compute_cksum`).
    frame[l4 + 8..l4 + 12].copy_from_slice(&(stored ^ before ^ after).to_le_bytes());
    match end {
        End::Src => {
            ctx.flow.src = Some(addr);
            ctx.flow.ports.0 = port;
        }
        End::Dst => {
            ctx.flow.dst = Some(addr);
            ctx.flow.ports.1 = port;
        }
    }
    Ok(())
}

/// TCP flags of a classified TCP packet (0 when it has no complete TCP header).
#[inline]
pub fn tcp_flags(frame: &[u8], ctx: &Ctx) -> u8 {
    match ctx.flow.l4 {
        Some((l4, end)) if ctx.flow.protocol == protocol::TCP && l4 + 20 <= end => {
            frame.get(l4 + 13).copied().unwrap_or(0)
        }
        _ => 0,
    }
}

/// TCP flag bits.
pub mod tcp {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;

    /// Whether a packet of protocol `proto` with TCP flags `flags` opens a connection: a TCP SYN
    /// without ACK.
    #[inline]
    pub const fn syn_only(proto: u8, flags: u8) -> bool {
        proto == 6 && flags & (SYN | ACK) == SYN
    }
}

/// Turn a TCP segment into the RST that refuses it (RFC 9293 section 3.10.7.1), sent back from
/// the address and port it was sent to, with `gateway_mac` as the source MAC. Returns the new
/// frame length, or `None` when the segment must not be answered (it is a RST itself, or has no
/// complete TCP header).
pub fn tcp_reset(frame: &mut [u8], ctx: &Ctx, gateway_mac: [u8; 6]) -> Option<usize> {
    let info = &ctx.flow;
    let (l4, end) = info.l4?;
    if info.protocol != protocol::TCP || l4 + 20 > end || end > frame.len() {
        return None;
    }
    let flags = frame[l4 + 13];
    if flags & tcp::RST != 0 {
        return None;
    }
    let data_off = usize::from(frame[l4 + 12] >> 4) * 4;
    let seg_len =
        end.saturating_sub(l4 + data_off) + usize::from(flags & tcp::SYN != 0) + usize::from(flags & tcp::FIN != 0);
    let seq = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    let ack = u32::from_be_bytes([frame[l4 + 8], frame[l4 + 9], frame[l4 + 10], frame[l4 + 11]]);
    // <SEQ=SEG.ACK><CTL=RST> if the segment had ACK, else <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
    let (new_seq, new_ack, new_flags) = if flags & tcp::ACK != 0 {
        (ack, 0, tcp::RST)
    } else {
        (0, seq.wrapping_add(seg_len as u32), tcp::RST | tcp::ACK)
    };
    // Ethernet: back to the sender.
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    frame[0..6].copy_from_slice(&src_mac);
    frame[6..12].copy_from_slice(&gateway_mac);
    let (sport, dport) = info.ports;
    let l3 = info.l3_offset;
    // IP: swap the addresses, fresh TTL, length of a bare TCP header.
    let (src, dst) = (ctx.src(), ctx.dst());
    let total = l4 + 20;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ihl = l4 - l3;
            frame[l3 + 2..l3 + 4].copy_from_slice(&((ihl + 20) as u16).to_be_bytes());
            frame[l3 + 6..l3 + 8].fill(0);
            frame[l3 + 8] = 64;
            frame[l3 + 12..l3 + 16].copy_from_slice(&d.octets());
            frame[l3 + 16..l3 + 20].copy_from_slice(&s.octets());
            frame[l3 + 10..l3 + 12].fill(0);
            let c = checksum::of(&frame[l3..l4]);
            frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            // Extension headers, if any, stay; the payload length covers them and the TCP header.
            frame[l3 + 4..l3 + 6].copy_from_slice(&((l4 - l3 - 40 + 20) as u16).to_be_bytes());
            frame[l3 + 7] = 64;
            frame[l3 + 8..l3 + 24].copy_from_slice(&d.octets());
            frame[l3 + 24..l3 + 40].copy_from_slice(&s.octets());
        }
        _ => return None,
    }
    let t = &mut frame[l4..l4 + 20];
    t[0..2].copy_from_slice(&dport.to_be_bytes());
    t[2..4].copy_from_slice(&sport.to_be_bytes());
    t[4..8].copy_from_slice(&new_seq.to_be_bytes());
    t[8..12].copy_from_slice(&new_ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = new_flags;
    t[14..20].fill(0);
    let pseudo = match (dst, src) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_v4(s, d, protocol::TCP, 20),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_v6(s, d, protocol::TCP, 20),
        _ => return None,
    };
    let c = checksum::finish_sum(pseudo + checksum::sum(&frame[l4..l4 + 20]));
    frame[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    Some(total)
}
