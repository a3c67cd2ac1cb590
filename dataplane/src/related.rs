//! ICMP errors related to a tracked connection (hot path, but only for ICMP error packets).
//!
//! An ICMP error (IPv4 destination unreachable, time exceeded, parameter problem; ICMPv6
//! destination unreachable, packet too big, time exceeded, parameter problem) quotes the start of
//! the packet that caused it: its IP header and at least the first 8 bytes after it (RFC 792,
//! RFC 4443), so its addresses, protocol and ports. [`quoted`] finds them. The policy stage allows
//! an error whose quoted packet belongs to a connection it allowed (Linux conntrack's `RELATED`,
//! as Cilium and Calico do), and the service stage's reverse translation applies to the quoted
//! packet ([`rewrite_quoted_dst`]): a client sees an error about the service address it used,
//! not about the backend it never knew of.
//!
//! The quoted packet travelled the other way: its source is the error's destination (the host that
//! sent it), its destination the far end.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_encap::checksum;
use ferry_encap::flow::L3;
use ferry_encap::wire::ipv4::protocol;

use crate::pipeline::Ctx;

/// SCTP's protocol number (ports in the same place as TCP's and UDP's).
const SCTP: u8 = 132;

/// The ICMP header before the quoted packet: type, code, checksum, 4 bytes (unused, MTU, pointer).
const ICMP_HEADER: usize = 8;

/// The packet an ICMP error quotes: its tuple and where its headers sit in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// The quoted packet's source (the host the error goes to).
    pub src: IpAddr,
    /// Its destination.
    pub dst: IpAddr,
    /// Its source port.
    pub sport: u16,
    /// Its destination port.
    pub dport: u16,
    /// Its protocol: TCP, UDP or SCTP.
    pub proto: u8,
    /// The quoted IP header's offset in the frame.
    ip_at: usize,
    /// The quoted transport header's offset in the frame.
    l4_at: usize,
    /// The end of the ICMP message in the frame.
    end: usize,
}

/// The packet an ICMP error in `frame` quotes, if `ctx` is an ICMP error quoting a whole first
/// fragment of a TCP, UDP or SCTP packet of the same family.
#[inline]
pub fn quoted(frame: &[u8], ctx: &Ctx) -> Option<Quoted> {
    let (l4, end) = ctx.flow.l4?;
    let end = end.min(frame.len());
    let ty = *frame.get(l4)?;
    let v4 = match (ctx.flow.l3, ctx.flow.protocol) {
        (L3::Ipv4, protocol::ICMP) if matches!(ty, 3 | 11 | 12) => true,
        (L3::Ipv6, protocol::ICMPV6) if matches!(ty, 1..=4) => false,
        _ => return None,
    };
    let ip_at = l4 + ICMP_HEADER;
    let q = frame.get(ip_at..end)?;
    let (src, dst, proto, hlen) = if v4 {
        if q.len() < 20 || q[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(q[0] & 0x0f) * 4;
        // A later fragment carries no ports.
        if ihl < 20 || u16::from_be_bytes([q[6], q[7]]) & 0x1fff != 0 {
            return None;
        }
        let a = |at: usize| IpAddr::V4(Ipv4Addr::new(q[at], q[at + 1], q[at + 2], q[at + 3]));
        (a(12), a(16), q[9], ihl)
    } else {
        if q.len() < 40 || q[0] >> 4 != 6 {
            return None;
        }
        let a = |at: usize| {
            let mut o = [0u8; 16];
            o.copy_from_slice(&q[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        // Only a transport header right after the fixed header (extension headers: judged as
        // packets of their own).
        (a(8), a(24), q[6], 40)
    };
    if !matches!(proto, protocol::TCP | protocol::UDP | SCTP) {
        return None;
    }
    let p = q.get(hlen..hlen + 4)?;
    Some(Quoted {
        src,
        dst,
        sport: u16::from_be_bytes([p[0], p[1]]),
        dport: u16::from_be_bytes([p[2], p[3]]),
        proto,
        ip_at,
        l4_at: ip_at + hlen,
        end,
    })
}

/// Replace 16-bit words at `at` with `new`, returning the words replaced.
fn put_words(frame: &mut [u8], at: usize, new: &[u16]) -> [u16; 8] {
    let mut old = [0u16; 8];
    for (k, w) in new.iter().enumerate() {
        let i = at + 2 * k;
        old[k] = u16::from_be_bytes([frame[i], frame[i + 1]]);
        frame[i..i + 2].copy_from_slice(&w.to_be_bytes());
    }
    old
}

fn addr_words(a: IpAddr) -> ([u16; 8], usize) {
    match a {
        IpAddr::V4(a) => {
            let o = a.octets();
            ([u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]), 0, 0, 0, 0, 0, 0], 2)
        }
        IpAddr::V6(a) => (a.segments(), 8),
    }
}

/// Reverse-translate an ICMP error about a translated connection: the quoted packet's destination
/// becomes `addr`:`port` (the service's address and port the client used), and, when `outer_src`
/// is given, the error's own source too (the backend sent it itself: it comes from the service
/// address, as Linux conntrack's NAT does). The quoted IPv4 header's checksum and the quoted
/// TCP/UDP checksum (when quoted) are updated incrementally, then the ICMP checksum is computed
/// again over the message (it covers the quoted bytes), and the outer IPv4 header's checksum is
/// updated. `addr` and `outer_src` must be of the error's family (else nothing changes: `false`).
pub fn rewrite_quoted_dst(
    frame: &mut [u8],
    ctx: &mut Ctx,
    q: &Quoted,
    addr: IpAddr,
    port: u16,
    outer_src: Option<IpAddr>,
) -> bool {
    let v4 = ctx.flow.l3 == L3::Ipv4;
    if addr.is_ipv4() != v4 || outer_src.is_some_and(|a| a.is_ipv4() != v4) || q.end > frame.len() {
        return false;
    }
    let Some((l4, _)) = ctx.flow.l4 else { return false };
    let l3 = ctx.flow.l3_offset;
    // The quoted packet: its destination address and port.
    let (new_w, n) = addr_words(addr);
    let dst_at = q.ip_at + if v4 { 16 } else { 24 };
    let old_w = put_words(frame, dst_at, &new_w[..n]);
    let old_port = u16::from_be_bytes([frame[q.l4_at + 2], frame[q.l4_at + 3]]);
    frame[q.l4_at + 2..q.l4_at + 4].copy_from_slice(&port.to_be_bytes());
    if v4 {
        let mut c = u16::from_be_bytes([frame[q.ip_at + 10], frame[q.ip_at + 11]]);
        for k in 0..n {
            c = checksum::update_word(c, old_w[k], new_w[k]);
        }
        frame[q.ip_at + 10..q.ip_at + 12].copy_from_slice(&c.to_be_bytes());
    }
    let csum_at = match q.proto {
        protocol::TCP => Some(16),
        protocol::UDP => Some(6),
        _ => None,
    };
    if let Some(at) = csum_at.map(|at| q.l4_at + at)
        && at + 2 <= q.end
    {
        let mut c = u16::from_be_bytes([frame[at], frame[at + 1]]);
        // A UDP-over-IPv4 checksum of zero means none.
        if !(q.proto == protocol::UDP && v4 && c == 0) {
            for k in 0..n {
                c = checksum::update_word(c, old_w[k], new_w[k]);
            }
            c = checksum::update_word(c, old_port, port);
            frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    // The error's own source.
    if let Some(src) = outer_src {
        let (w, n) = addr_words(src);
        let old = put_words(frame, l3 + if v4 { 12 } else { 8 }, &w[..n]);
        if v4 {
            let mut c = u16::from_be_bytes([frame[l3 + 10], frame[l3 + 11]]);
            for k in 0..n {
                c = checksum::update_word(c, old[k], w[k]);
            }
            frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        ctx.flow.src = Some(src);
    }
    // The ICMP checksum, over the whole message (and for ICMPv6 its pseudo-header).
    frame[l4 + 2..l4 + 4].fill(0);
    let body = checksum::sum(&frame[l4..q.end]);
    let pseudo = match (ctx.src(), ctx.dst()) {
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_v6(s, d, protocol::ICMPV6, (q.end - l4) as u32),
        _ => 0,
    };
    let c = checksum::finish_sum(body + pseudo);
    frame[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, SlicedPacket, TransportSlice};
    use ferry_encap::flow;

    /// An error from `from` to `to` quoting a UDP packet `to`:1000 -> `far`:8080 (with its payload).
    fn error4(from: [u8; 4], to: [u8; 4], far: [u8; 4]) -> Vec<u8> {
        let mut quoted = Vec::new();
        PacketBuilder::ipv4(to, far, 63).udp(1000, 8080).write(&mut quoted, b"hello").expect("quoted");
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(from, to, 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
            .write(&mut out, &quoted)
            .expect("error");
        out
    }

    fn ctx(frame: &[u8]) -> Ctx {
        Ctx { flow: flow::classify(frame).expect("classifies") }
    }

    #[test]
    fn finds_the_quoted_packet_and_translates_it_back() {
        let (backend, client, vip) = ([10, 244, 2, 5], [10, 244, 1, 3], [10, 96, 0, 10]);
        let mut f = error4(backend, client, backend);
        let mut c = ctx(&f);
        let q = quoted(&f, &c).expect("an error quoting UDP");
        let ip = |a: [u8; 4]| IpAddr::V4(Ipv4Addr::from(a));
        assert_eq!((q.src, q.dst, q.sport, q.dport, q.proto), (ip(client), ip(backend), 1000, 8080, 17));
        assert!(rewrite_quoted_dst(&mut f, &mut c, &q, ip(vip), 80, Some(ip(vip))));
        // Every checksum verifies, as etherparse reads them; the quoted packet names the service.
        let p = SlicedPacket::from_ethernet(&f).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(outer)) = &p.net else { panic!("IPv4") };
        let h = outer.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(h.source, vip);
        let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("ICMP") };
        let payload = icmp.payload();
        assert_eq!(etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), payload).checksum, icmp.checksum());
        let inner = etherparse::Ipv4HeaderSlice::from_slice(payload).expect("quoted header");
        assert_eq!(inner.destination(), vip);
        assert_eq!(inner.to_header().header_checksum, inner.to_header().calc_header_checksum());
        let udp = etherparse::UdpHeaderSlice::from_slice(&payload[20..]).expect("quoted UDP");
        assert_eq!(udp.destination_port(), 80);
        let sum = udp.to_header().calc_checksum_ipv4_raw(client, vip, &payload[28..]).expect("sum");
        assert_eq!(udp.checksum(), sum, "the quoted UDP checksum follows the translation");
        assert_eq!(quoted(&f, &ctx(&f)).map(|q| (q.dst, q.dport)), Some((ip(vip), 80)));
    }

    #[test]
    fn only_errors_quoting_ports() {
        // An echo request is no error.
        let mut echo = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, &[0; 40])
            .expect("echo");
        assert!(quoted(&echo, &ctx(&echo)).is_none());
        // Truncated before the ports.
        let f = error4([10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]);
        let cut = &f[..14 + 20 + 8 + 20 + 2];
        let mut short = cut.to_vec();
        short[14 + 2..14 + 4].copy_from_slice(&((cut.len() - 14) as u16).to_be_bytes());
        ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut short[14..34]).fill_checksum();
        assert!(quoted(&short, &ctx(&short)).is_none());
        // ICMPv6 packet too big quoting UDP.
        let (a, b): ([u8; 16], [u8; 16]) = ([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0xfd; 16]);
        let mut inner = Vec::new();
        PacketBuilder::ipv6(a, b, 63).udp(5, 6).write(&mut inner, b"x").expect("quoted");
        let mut f6 = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6(b, a, 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut f6, &inner)
            .expect("error");
        let q = quoted(&f6, &ctx(&f6)).expect("quotes UDP");
        assert_eq!((q.sport, q.dport, q.proto), (5, 6, 17));
    }
}
