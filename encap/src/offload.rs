//! Software completion of L4 checksums that a veth left unfinished (hot path).
//!
//! A pod's veth with tx checksum offload hands frames over with CHECKSUM_PARTIAL: the TCP/UDP
//! checksum field holds only the folded pseudo-header sum, and nothing in the frame says so (see
//! `shared/notes/afxdp-on-veth.md`). Forwarded as is, the far end drops them. [`complete_checksum`]
//! recognises that signature and computes the real checksum; a frame whose checksum is already
//! final is left alone, and recomputing a final checksum would give the same value, so a false
//! positive (1 in 65536) costs only time.

use std::net::IpAddr;

use crate::flow::{self, FlowInfo, L3};
use crate::wire::ipv4::protocol;
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
    let info = flow::classify(frame)?;
    complete_checksum_with(frame, &info)
}

/// [`complete_checksum`] for a frame already classified (`info` from [`flow::classify`] on this
/// frame), without parsing its headers again: the data plane classifies every frame once.
///
/// # Errors
/// [`DropReason::Truncated`] when the L4 header is too short to hold its checksum.
pub fn complete_checksum_with(frame: &mut [u8], info: &FlowInfo) -> Result<ChecksumFix, DropReason> {
    let Some(plan) = plan(info) else { return Ok(ChecksumFix::NotApplicable) };
    let Some(l4) = frame.get_mut(plan.l4.0..plan.l4.1) else { return Err(DropReason::Truncated) };
    if l4.len() < plan.at + 2 {
        return Err(DropReason::Truncated);
    }
    let stored = u16::from_be_bytes([l4[plan.at], l4[plan.at + 1]]);
    if !plan.is_partial(stored) {
        return Ok(ChecksumFix::AlreadyFinal);
    }
    l4[plan.at..plan.at + 2].fill(0);
    let c = plan.completed(checksum::sum(l4));
    l4[plan.at..plan.at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(ChecksumFix::Completed)
}

/// An L4 checksum that a veth left unfinished, as [`complete_checksum_with`] would complete it,
/// computed without changing the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfinished {
    /// Offset of the checksum field in the frame.
    pub at: usize,
    /// The value stored there now.
    pub stored: u16,
    /// The completed value.
    pub completed: u16,
}

/// The checksum [`complete_checksum_with`] would complete in `frame`, if any (`None` when it
/// looks final, is absent, or the frame has no L4 checksum ferry completes).
pub fn unfinished_checksum(frame: &[u8], info: &FlowInfo) -> Option<Unfinished> {
    let plan = plan(info)?;
    let l4 = frame.get(plan.l4.0..plan.l4.1)?;
    let stored = u16::from_be_bytes([*l4.get(plan.at)?, *l4.get(plan.at + 1)?]);
    if !plan.is_partial(stored) {
        return None;
    }
    // The sum with the field zeroed: subtracting `stored` is adding its complement.
    let sum = checksum::sum(l4) + u32::from(!stored);
    Some(Unfinished { at: plan.l4.0 + plan.at, stored, completed: plan.completed(sum) })
}

/// Where the L4 checksum of a classified frame is and how it is computed.
struct Plan {
    /// The L4 header and payload in the frame (`start..end`).
    l4: (usize, usize),
    /// Offset of the field in the L4 header.
    at: usize,
    /// The pseudo-header sum, length included (None for ICMPv4, which has none).
    pseudo: Option<u32>,
    /// A zero UDP-over-IPv4 checksum means "no checksum" and stays zero.
    zero_means_none: bool,
    /// UDP sends a computed zero as 0xffff (RFC 768; over IPv6 a zero is discarded, RFC 8200
    /// section 8.1).
    zero_as_ones: bool,
}

// Inlined into both callers: out of line it cost ~32 instructions per forwarded packet
// (callgrind, scripts/worker-ir.sh), the hot path completing every packet's checksum.
#[inline(always)]
fn plan(info: &FlowInfo) -> Option<Plan> {
    let (Some(l4), Some(src), Some(dst)) = (info.l4, info.src, info.dst) else { return None };
    let len = l4.1.checked_sub(l4.0)?;
    // L4 lengths are bounded by the 16-bit IP length fields, so the casts cannot truncate.
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_v4(s, d, info.protocol, len as u16),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_v6(s, d, info.protocol, len as u32),
        _ => return None,
    };
    let (at, pseudo, zero_means_none, zero_as_ones) = match (info.l3, info.protocol) {
        (L3::Ipv4, protocol::ICMP) => (2, None, false, false),
        (L3::Ipv4, protocol::UDP) => (6, Some(pseudo), true, true),
        (L3::Ipv6, protocol::UDP) => (6, Some(pseudo), false, true),
        (L3::Ipv6, protocol::ICMPV6) => (2, Some(pseudo), false, false),
        (_, protocol::TCP) => (tcp::CHECKSUM_OFFSET, Some(pseudo), false, false),
        _ => return None,
    };
    Some(Plan { l4, at, pseudo, zero_means_none, zero_as_ones })
}

impl Plan {
    /// The CHECKSUM_PARTIAL signature: the field holds the folded pseudo-header sum itself
    /// (Linux writes ~csum_tcpudp_magic(..)), or zero for ICMP, which has no pseudo-header.
    fn is_partial(&self, stored: u16) -> bool {
        if self.zero_means_none && stored == 0 {
            return false;
        }
        match self.pseudo {
            Some(s) => stored == !checksum::finish_sum(s),
            None => stored == 0,
        }
    }

    /// The checksum over `sum` (the L4 bytes with the field zeroed) and the pseudo-header.
    fn completed(&self, sum: u32) -> u16 {
        let c = checksum::finish_sum(self.pseudo.unwrap_or(0) + sum);
        if self.zero_as_ones && c == 0 { 0xffff } else { c }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet::ethertype;
    use crate::wire::ipv4::Ipv4Packet;
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
    fn a_udp6_checksum_that_computes_to_zero_is_sent_as_all_ones() {
        let build = |word: u16| {
            let mut f = Vec::new();
            PacketBuilder::ethernet2([2; 6], [4; 6])
                .ipv6([0xfd; 16], [0xfe; 16], 64)
                .udp(1, 2)
                .write(&mut f, &word.to_be_bytes())
                .expect("build");
            f
        };
        // With the payload word equal to the checksum of a zero word, the sum is all ones.
        let c = u16::from_be_bytes(build(0)[60..62].try_into().expect("2 bytes"));
        let good = build(c);
        let pseudo = checksum::pseudo_v6([0xfd; 16].into(), [0xfe; 16].into(), 17, 10);
        let mut bad = partial(good.clone(), 54, 6, pseudo);
        assert_eq!(complete_checksum(&mut bad), Ok(ChecksumFix::Completed));
        assert_eq!(bad[60..62], [0xff, 0xff], "RFC 8200: a zero UDP checksum over IPv6 is discarded");
        assert!(checksum::verifies(pseudo, &bad[54..]));
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
