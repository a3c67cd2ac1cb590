//! One parse of an inner (pod) frame: where its IP header is, its traffic class, and a flow hash
//! (hot path).
//!
//! The data plane classifies each frame once and hands the result to later stages, encapsulation
//! among them, so nothing is parsed twice. The hash feeds the outer UDP source port (RFC 7348
//! section 5): every packet of a flow hashes alike, so underlay ECMP and RSS keep it in order.

use std::net::IpAddr;

use crate::DropReason;
use crate::wire::ethernet::{EthernetFrame, ethertype};
use crate::wire::ipv4::{Ipv4Packet, protocol};
use crate::wire::ipv6::Ipv6Packet;

/// The network layer of an inner frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    /// IPv4 at `l3_offset`.
    Ipv4,
    /// IPv6 at `l3_offset`.
    Ipv6,
    /// Anything else (ARP, ...), with its EtherType.
    Other(u16),
}

/// What encapsulation and routing need to know about an inner frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowInfo {
    /// Network layer.
    pub l3: L3,
    /// Offset of the IP header (the Ethernet header length, VLAN tag included).
    pub l3_offset: usize,
    /// IPv4 TOS / IPv6 traffic class (DSCP << 2 | ECN); 0 for non-IP.
    pub tos: u8,
    /// Source address, for IP frames.
    pub src: Option<IpAddr>,
    /// Destination address, for IP frames.
    pub dst: Option<IpAddr>,
    /// Upper-layer protocol, for IP frames.
    pub protocol: u8,
    /// Source and destination port for TCP/UDP/SCTP when not fragmented, else zero.
    pub ports: (u16, u16),
    /// Where the upper-layer header and payload are in the frame (`start..end`, to the IP length),
    /// for IP packets that are not fragments; `None` otherwise. Later stages use it instead of
    /// parsing the IP header again.
    pub l4: Option<(usize, usize)>,
    /// Flow hash over the 5-tuple (IP) or MACs and EtherType (non-IP).
    pub hash: u32,
    /// IPv4 TTL or IPv6 hop limit as received; 0 for non-IP.
    pub ttl: u8,
}

/// Parse an Ethernet frame far enough to route and encapsulate it.
///
/// IP headers are validated structurally (version, lengths) but the IPv4 checksum is not verified:
/// that is the job of whoever consumes the header.
///
/// # Errors
/// The [`DropReason`] of the first header at fault.
pub fn classify(frame: &[u8]) -> Result<FlowInfo, DropReason> {
    let eth = EthernetFrame::new_checked(frame)?;
    let l3_offset = eth.header_len();
    let et = eth.ethertype();
    let l3 = &frame[l3_offset..];
    match et {
        ethertype::IPV4 => {
            let ip = Ipv4Packet::new_checked(l3)?;
            let l4 =
                (!ip.is_fragment()).then(|| (l3_offset + ip.header_len(), l3_offset + usize::from(ip.total_len())));
            let ports = if l4.is_some() { ports_of(ip.protocol(), ip.payload()) } else { (0, 0) };
            let (src, dst) = (ip.src(), ip.dst());
            let hash = hash_tuple(u64::from(src.to_bits()), u64::from(dst.to_bits()), ip.protocol(), ports);
            Ok(FlowInfo {
                l3: L3::Ipv4,
                l3_offset,
                tos: ip.tos(),
                src: Some(src.into()),
                dst: Some(dst.into()),
                protocol: ip.protocol(),
                ports,
                l4,
                hash,
                ttl: ip.ttl(),
            })
        }
        ethertype::IPV6 => {
            let ip = Ipv6Packet::new_checked(l3)?;
            let ul = ip.upper_layer()?;
            let end = crate::wire::ipv6::HEADER_LEN + usize::from(ip.payload_len());
            let l4 = (!ul.fragmented).then(|| (l3_offset + ul.offset, l3_offset + end));
            let ports = if l4.is_some() { ports_of(ul.protocol, &l3[ul.offset..end]) } else { (0, 0) };
            let (src, dst) = (ip.src(), ip.dst());
            let (s, d) = (src.to_bits(), dst.to_bits());
            let hash = hash_tuple(fold128(s), fold128(d) ^ u64::from(ip.flow_label()), ul.protocol, ports);
            Ok(FlowInfo {
                l3: L3::Ipv6,
                l3_offset,
                tos: ip.traffic_class(),
                src: Some(src.into()),
                dst: Some(dst.into()),
                protocol: ul.protocol,
                ports,
                l4,
                hash,
                ttl: ip.hop_limit(),
            })
        }
        other => {
            let mut a = [0u8; 8];
            a[..6].copy_from_slice(&eth.src().0);
            let mut b = [0u8; 8];
            b[..6].copy_from_slice(&eth.dst().0);
            let hash = hash_tuple(u64::from_le_bytes(a), u64::from_le_bytes(b), 0, (other, 0));
            Ok(FlowInfo {
                l3: L3::Other(other),
                l3_offset,
                tos: 0,
                src: None,
                dst: None,
                protocol: 0,
                ports: (0, 0),
                l4: None,
                hash,
                ttl: 0,
            })
        }
    }
}

/// Ports of a TCP, UDP or SCTP header at the front of `l4`; zero when absent or truncated.
fn ports_of(proto: u8, l4: &[u8]) -> (u16, u16) {
    const SCTP: u8 = 132;
    match proto {
        protocol::TCP | protocol::UDP | SCTP if l4.len() >= 4 => {
            (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))
        }
        _ => (0, 0),
    }
}

const fn fold128(x: u128) -> u64 {
    (x as u64) ^ ((x >> 64) as u64)
}

/// Mix a flow tuple into 32 bits (the murmur3 64-bit finaliser over a combination of the fields).
#[inline]
fn hash_tuple(src: u64, dst: u64, proto: u8, ports: (u16, u16)) -> u32 {
    let p = (u64::from(ports.0) << 32) | (u64::from(ports.1) << 16) | u64::from(proto);
    let h = fmix64(src.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ dst.rotate_left(29) ^ fmix64(p));
    (h ^ (h >> 32)) as u32
}

#[inline]
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The UDP source port for a flow hash: in 49152-65535 as RFC 7348 section 5 recommends.
#[inline]
pub const fn source_port(hash: u32) -> u16 {
    49152 | ((hash ^ (hash >> 16)) as u16 & 0x3fff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn udp4(sport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 244, 1, 2], [10, 244, 2, 3], 64)
            .udp(sport, 80)
            .write(&mut out, b"hello")
            .expect("build");
        out
    }

    #[test]
    fn classifies_ipv4_udp() {
        let f = classify(&udp4(1234)).expect("valid");
        assert_eq!(f.l3, L3::Ipv4);
        assert_eq!(f.l3_offset, 14);
        assert_eq!(f.ports, (1234, 80));
        assert_eq!(f.protocol, 17);
        assert_eq!(f.dst, Some("10.244.2.3".parse().expect("addr")));
    }

    #[test]
    fn same_flow_same_hash_other_flow_other_port() {
        let a = classify(&udp4(1234)).expect("valid").hash;
        assert_eq!(a, classify(&udp4(1234)).expect("valid").hash);
        let ports: std::collections::HashSet<u16> =
            (1000..1256).map(|p| source_port(classify(&udp4(p)).expect("valid").hash)).collect();
        assert!(ports.len() > 240, "256 flows spread over only {} source ports", ports.len());
        assert!(ports.iter().all(|p| *p >= 49152));
    }

    #[test]
    fn ipv6_and_non_ip() {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(5555, 443, 1, 1000)
            .write(&mut out, b"x")
            .expect("build");
        let f = classify(&out).expect("valid");
        assert_eq!((f.l3, f.protocol, f.ports), (L3::Ipv6, 6, (5555, 443)));
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&ethertype::ARP.to_be_bytes());
        assert_eq!(classify(&arp).expect("valid").l3, L3::Other(ethertype::ARP));
        assert_eq!(classify(&arp[..10]).err(), Some(DropReason::Truncated));
    }
}
