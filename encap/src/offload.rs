//! Software completion of L4 checksums that a veth left unfinished (hot path).
//!
//! A pod's veth with tx checksum offload hands frames over with CHECKSUM_PARTIAL: the TCP/UDP
//! checksum field holds only the folded pseudo-header sum, and nothing in the frame says so (see
//! `shared/notes/afxdp-on-veth.md`). Forwarded as is, the far end drops them. [`complete_checksum`]
//! recognises that signature and computes the real checksum; a frame whose checksum is already
//! final is left alone, and recomputing a final checksum would give the same value, so a false
//! positive (1 in 65536) costs only time.

use crate::wire::ethernet::{EthernetFrame, ethertype};
use crate::wire::ipv4::{Ipv4Packet, protocol};
use crate::wire::ipv6::Ipv6Packet;
use crate::wire::tcp;
use crate::{DropReason, checksum};

/// What [`complete_checksum`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumFix {
    /// The checksum was unfinished and has been computed.
    Completed,
    /// The checksum looked final (or absent, as a zero UDP checksum over IPv4); nothing changed.
    AlreadyFinal,
    /// Not a frame with an L4 checksum ferry completes: non-IP, a fragment, another protocol.
    NotApplicable,
}

/// Complete an unfinished TCP, UDP, ICMP or ICMPv6 checksum in an Ethernet frame.
///
/// # Errors
/// The [`DropReason`] of a malformed IP or L4 header.
pub fn complete_checksum(frame: &mut [u8]) -> Result<ChecksumFix, DropReason> {
    let eth = EthernetFrame::new_checked(&*frame)?;
    let off = eth.header_len();
    match eth.ethertype() {
        ethertype::IPV4 => {
            let ip = Ipv4Packet::new_checked(&frame[off..])?;
            if ip.is_fragment() {
                return Ok(ChecksumFix::NotApplicable);
            }
            let (proto, hl, total) = (ip.protocol(), ip.header_len(), usize::from(ip.total_len()));
            let pseudo = ip.pseudo_header();
            let l4 = &mut frame[off + hl..off + total];
            match proto {
                protocol::ICMP => fix(l4, 2, None, false),
                protocol::TCP | protocol::UDP => fix(l4, csum_offset(proto), Some(pseudo), proto == protocol::UDP),
                _ => Ok(ChecksumFix::NotApplicable),
            }
        }
        ethertype::IPV6 => {
            let ip = Ipv6Packet::new_checked(&frame[off..])?;
            let ul = ip.upper_layer()?;
            if ul.fragmented {
                return Ok(ChecksumFix::NotApplicable);
            }
            let end = off + crate::wire::ipv6::HEADER_LEN + usize::from(ip.payload_len());
            // IPv6 payloads are bounded by the 16-bit payload length, so the L4 length fits u32.
            let pseudo = ip.pseudo_header(ul.protocol, (end - off - ul.offset) as u32);
            let l4 = &mut frame[off + ul.offset..end];
            match ul.protocol {
                protocol::ICMPV6 => fix(l4, 2, Some(pseudo), false),
                protocol::TCP | protocol::UDP => fix(l4, csum_offset(ul.protocol), Some(pseudo), false),
                _ => Ok(ChecksumFix::NotApplicable),
            }
        }
        _ => Ok(ChecksumFix::NotApplicable),
    }
}

fn csum_offset(proto: u8) -> usize {
    if proto == protocol::TCP { tcp::CHECKSUM_OFFSET } else { 6 }
}

/// `pseudo` is the pseudo-header sum, length included (None for ICMPv4, which has none).
/// `zero_means_none`: a zero UDP-over-IPv4 checksum means "no checksum" and stays zero.
fn fix(l4: &mut [u8], at: usize, pseudo: Option<u32>, zero_means_none: bool) -> Result<ChecksumFix, DropReason> {
    if l4.len() < at + 2 {
        return Err(DropReason::Truncated);
    }
    let stored = u16::from_be_bytes([l4[at], l4[at + 1]]);
    if zero_means_none && stored == 0 {
        return Ok(ChecksumFix::AlreadyFinal);
    }
    // The CHECKSUM_PARTIAL signature: the field holds the folded pseudo-header sum itself
    // (Linux writes ~csum_tcpudp_magic(..)), or zero for ICMP, which has no pseudo-header.
    let partial = match pseudo {
        Some(s) => stored == !checksum::finish_sum(s),
        None => stored == 0,
    };
    if !partial {
        return Ok(ChecksumFix::AlreadyFinal);
    }
    l4[at..at + 2].fill(0);
    let mut c = checksum::finish_sum(pseudo.unwrap_or(0) + checksum::sum(l4));
    if zero_means_none && c == 0 {
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(ChecksumFix::Completed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    /// A frame whose L4 checksum field is replaced by what a CHECKSUM_PARTIAL veth leaves there.
    fn partial(mut frame: Vec<u8>, l4_at: usize, csum_at: usize, pseudo: u32) -> Vec<u8> {
        let folded = !checksum::finish_sum(pseudo);
        frame[l4_at + csum_at..l4_at + csum_at + 2].copy_from_slice(&folded.to_be_bytes());
        frame
    }

    fn tcp4() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 244, 1, 2], [10, 244, 2, 3], 64)
            .tcp(40000, 80, 7, 64000)
            .write(&mut out, b"GET / HTTP/1.1\r\n")
            .expect("build");
        out
    }

    fn tcp_checksum_ok(frame: &[u8]) -> bool {
        let p = SlicedPacket::from_ethernet(frame).expect("parse");
        let Some(TransportSlice::Tcp(t)) = p.transport else { return false };
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { return false };
        t.calc_checksum_ipv4(ip.header().source(), ip.header().destination()).ok() == Some(t.checksum())
    }

    #[test]
    fn completes_a_partial_tcp_checksum() {
        let good = tcp4();
        assert!(tcp_checksum_ok(&good));
        let l4_len = (good.len() - 34) as u16;
        let pseudo = checksum::pseudo_v4([10, 244, 1, 2].into(), [10, 244, 2, 3].into(), 6, l4_len);
        let mut bad = partial(good.clone(), 34, 16, pseudo);
        assert!(!tcp_checksum_ok(&bad));
        assert_eq!(complete_checksum(&mut bad), Ok(ChecksumFix::Completed));
        assert_eq!(bad, good);
    }

    #[test]
    fn leaves_final_checksums_alone() {
        let mut good = tcp4();
        let copy = good.clone();
        assert_eq!(complete_checksum(&mut good), Ok(ChecksumFix::AlreadyFinal));
        assert_eq!(good, copy);
    }

    #[test]
    fn udp_over_ipv6_and_zero_udp_over_ipv4() {
        let mut good = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(1, 2)
            .write(&mut good, b"abc")
            .expect("build");
        let pseudo = checksum::pseudo_v6([0xfd; 16].into(), [0xfe; 16].into(), 17, (good.len() - 54) as u32);
        let mut bad = partial(good.clone(), 54, 6, pseudo);
        assert_eq!(complete_checksum(&mut bad), Ok(ChecksumFix::Completed));
        assert_eq!(bad, good);

        let mut none = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
            .udp(1, 2)
            .write(&mut none, b"abc")
            .expect("build");
        none[40..42].fill(0);
        assert_eq!(complete_checksum(&mut none), Ok(ChecksumFix::AlreadyFinal));
    }

    #[test]
    fn icmp_and_not_applicable() {
        let mut ping = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
            .icmpv4_echo_request(1, 2)
            .write(&mut ping, b"ping")
            .expect("build");
        let good = ping.clone();
        ping[36..38].fill(0);
        assert_eq!(complete_checksum(&mut ping), Ok(ChecksumFix::Completed));
        assert_eq!(ping, good);
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&ethertype::ARP.to_be_bytes());
        assert_eq!(complete_checksum(&mut arp), Ok(ChecksumFix::NotApplicable));
        let mut short = tcp4();
        short.truncate(14 + 20 + 10);
        short[16..18].copy_from_slice(&30u16.to_be_bytes());
        let ip = Ipv4Packet::new_unchecked(&mut short[14..]);
        let mut ip = ip;
        ip.fill_checksum();
        assert_eq!(complete_checksum(&mut short), Err(DropReason::Truncated));
    }
}
