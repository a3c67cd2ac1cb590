//! In-memory tests of the UDP uplink's batching, receive split and synthesized header (no socket).

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use etherparse::PacketBuilder;
use ferry_encap::wire::ipv4::Ipv4Packet;
use ferry_encap::{DecapConfig, DropReason, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate};

use super::*;

const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const LOCAL_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const PEER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

fn dst(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, last), 4789)
}

/// `(count, seg, len)` of each staged message.
fn shape(s: &TxStage) -> Vec<(usize, usize, usize)> {
    s.messages().iter().map(|m| (m.count, m.seg, m.len)).collect()
}

fn stage_all(s: &mut TxStage, items: &[(SocketAddrV4, u8, usize)]) {
    for (i, &(d, tos, n)) in items.iter().enumerate() {
        assert!(s.push(d, tos, &vec![i as u8; n]), "item {i} staged");
    }
}

#[test]
fn equal_datagrams_to_one_destination_make_one_message() {
    let mut s = TxStage::default();
    stage_all(&mut s, &[(dst(2), 0, 1400); 10]);
    assert_eq!(shape(&s), vec![(10, 1400, 14_000)]);
    // The bytes are the payloads back to back, in order.
    let m = s.messages()[0];
    let b = s.bytes(&m);
    assert!((0..10).all(|i| b[i * 1400..(i + 1) * 1400].iter().all(|&x| x == i as u8)));
}

#[test]
fn a_shorter_datagram_ends_its_message_and_a_longer_one_starts_another() {
    let mut s = TxStage::default();
    let d = dst(2);
    stage_all(&mut s, &[(d, 0, 100), (d, 0, 100), (d, 0, 60), (d, 0, 100), (d, 0, 100), (d, 0, 200)]);
    assert_eq!(shape(&s), vec![(3, 100, 260), (2, 100, 200), (1, 200, 200)]);
}

#[test]
fn destination_and_tos_each_split_messages() {
    let mut s = TxStage::default();
    // ECN differs (CE vs ECT(0)): RFC 6040 needs each datagram's own TOS, so they cannot share.
    let items =
        [(dst(2), 0x02, 500), (dst(2), 0x02, 500), (dst(2), 0x03, 500), (dst(3), 0x03, 500), (dst(3), 0x03, 500)];
    stage_all(&mut s, &items);
    assert_eq!(shape(&s), vec![(2, 500, 1000), (1, 500, 500), (2, 500, 1000)]);
    let tos: Vec<_> = s.messages().iter().map(|m| (m.dst, m.tos)).collect();
    assert_eq!(tos, vec![(dst(2), 0x02), (dst(2), 0x03), (dst(3), 0x03)]);
}

#[test]
fn messages_stop_at_64_segments_and_at_65507_bytes() {
    let mut s = TxStage::default();
    stage_all(&mut s, &[(dst(2), 0, 100); 130]);
    assert_eq!(shape(&s), vec![(64, 100, 6400), (64, 100, 6400), (2, 100, 200)]);

    let mut s = TxStage::default();
    stage_all(&mut s, &[(dst(2), 0, 1472); 100]);
    // 44 * 1472 = 64,768 fits; 45 would be 66,240.
    assert_eq!(shape(&s), vec![(44, 1472, 64_768), (44, 1472, 64_768), (12, 1472, 17_664)]);
    assert!(s.messages().iter().all(|m| m.len <= MAX_MESSAGE));
}

#[test]
fn a_full_stage_refuses_until_cleared() {
    let mut s = TxStage::with_capacity(3000);
    assert!(s.push(dst(2), 0, &[1; 1400]));
    assert!(s.push(dst(2), 0, &[2; 1400]));
    assert!(!s.push(dst(2), 0, &[3; 1400]), "no room for the bytes");
    s.clear();
    assert!(s.is_empty());
    assert!(s.push(dst(2), 0, &[3; 1400]));

    let mut s = TxStage::default();
    for i in 0..TX_MSGS {
        assert!(s.push(dst(2), i as u8, &[0; 10]));
    }
    assert!(!s.push(dst(2), 0xff, &[0; 10]), "no room for another message");
    assert!(s.push(dst(2), (TX_MSGS - 1) as u8, &[0; 10]), "but joining the last one still works");
    assert!(!s.push(dst(2), 0, &vec![0; MAX_MESSAGE + 1]), "longer than one IPv4 datagram");
}

#[test]
fn received_buffers_split_at_the_gro_segment_size() {
    let m = |seg, len| RxMsg { src: dst(2), tos: 0, seg, len, inner: 0 };
    let split = |r: RxMsg| r.datagrams().collect::<Vec<_>>();
    assert_eq!(split(m(300, 1000)), vec![0..300, 300..600, 600..900, 900..1000]);
    assert_eq!(split(m(300, 900)), vec![0..300, 300..600, 600..900]);
    assert_eq!(split(m(1000, 1000)), vec![0..1000]);
    assert_eq!(split(m(0, 10)), (0..10).map(|i| i..i + 1).collect::<Vec<_>>(), "a zero size never loops");
    assert!(split(m(300, 0)).is_empty());
}

fn template(tos_inherit: bool) -> TunnelTemplate {
    let mut p = TemplateParams::new(TunnelKind::Vxlan, 42, PEER_MAC, LOCAL_MAC, IpAddr::V4(PEER), IpAddr::V4(LOCAL));
    if !tos_inherit {
        p.dscp = ferry_encap::Dscp::Fixed(0);
    }
    TunnelTemplate::new(&p).expect("template")
}

/// An inner TCP/IPv4 frame of `payload` bytes with ECN `ecn` (IPv4 checksum valid).
fn inner(payload: usize, ecn: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 9, 1], [2, 0, 0, 0, 9, 2])
        .ipv4([10, 244, 1, 5], [10, 244, 0, 7], 63)
        .tcp(40000, 5201, 1, 65535);
    let mut v = Vec::new();
    b.write(&mut v, &vec![0xab; payload]).expect("build");
    v[15] = (v[15] & 0xfc) | ecn;
    Ipv4Packet::new_unchecked(&mut v[14..]).fill_checksum();
    v
}

/// The whole path in memory: frames the pipeline would hand the uplink (encapsulated by the
/// peer's template), staged as `UDP_SEGMENT` messages, split again as `UDP_GRO` would return them,
/// written behind the synthesized header, and decapsulated by the pipeline's own `decap`: the
/// inner frames come back unchanged, from the right node, and CE on the outer header reaches the
/// inner one.
#[test]
fn staged_messages_split_and_decapsulate_back_to_the_inner_frames() {
    let tpl = template(true);
    let inners: Vec<Vec<u8>> = (0..5).map(|i| inner(if i == 4 { 300 } else { 1000 }, 0b10)).collect();
    let mut stage = TxStage::default();
    for (i, f) in inners.iter().enumerate() {
        let mut buf = vec![0u8; 2048];
        buf[256..256 + f.len()].copy_from_slice(f);
        let mut fb = FrameBuf::new(&mut buf, 256, f.len()).expect("frame");
        // The outer ECN of the last two: CE (a congested underlay would set it in transit).
        ferry_encap::encap_with(&tpl, &mut fb, 0b10, 7).expect("encap");
        let (start, len) = (fb.start(), fb.len());
        if i >= 3 {
            buf[start + 15] |= 0b11;
            Ipv4Packet::new_unchecked(&mut buf[start + 14..]).fill_checksum();
        }
        let o = parse_outer(&buf[start..start + len]).expect("outer IPv4/UDP");
        assert_eq!((o.dst, o.len), (SocketAddrV4::new(LOCAL, 4789), 8 + f.len()), "VXLAN header + inner frame");
        assert!(stage.push(o.dst, o.tos, &buf[start + o.start..start + o.start + o.len]));
    }
    // Three ECT(0) datagrams of 1,062 bytes, then CE: a 1,062 and the short 362.
    assert_eq!(shape(&stage), vec![(3, 1062, 3186), (2, 1062, 1424)]);

    let mut cfg = DecapConfig::new(TunnelKind::Vxlan, 42, IpAddr::V4(LOCAL));
    cfg.local_mac = Some(LOCAL_MAC);
    let local = SocketAddrV4::new(LOCAL, 4789);
    let mut got = Vec::new();
    for m in stage.messages() {
        let bytes = stage.bytes(m);
        let rx = RxMsg { src: SocketAddrV4::new(PEER, 4789), tos: m.tos, seg: m.seg, len: m.len, inner: 0 };
        for r in rx.datagrams() {
            let mut frame = vec![0u8; 2048];
            let n = write_received(&mut frame, 256, local, LOCAL_MAC, rx.src, rx.tos, &bytes[r]).expect("fits");
            let mut fb = FrameBuf::new(&mut frame, 256, n).expect("frame");
            let d = ferry_encap::decap(&cfg, &mut fb).expect("decap accepts the synthesized header");
            assert_eq!((d.outer_src, d.outer_src_port), (IpAddr::V4(PEER), 4789));
            got.push(fb.data().to_vec());
        }
    }
    assert_eq!(got.len(), 5);
    for (i, (g, want)) in got.iter().zip(&inners).enumerate() {
        let mut want = want.clone();
        if i >= 3 {
            // RFC 6040: outer CE over inner ECT(0) sets CE inside.
            want[15] |= 0b11;
            Ipv4Packet::new_unchecked(&mut want[14..]).fill_checksum();
        }
        assert_eq!(g, &want, "inner frame {i}");
    }
}

#[test]
fn the_synthesized_header_is_what_decap_checks() {
    let local = SocketAddrV4::new(LOCAL, 4789);
    let peer = SocketAddrV4::new(PEER, 51000);
    let mut frame = vec![0u8; 2048];
    let n = write_received(&mut frame, 256, local, LOCAL_MAC, peer, 0x2e, &[0x08, 0, 0, 0, 0, 0, 42, 0]).expect("fits");
    assert_eq!(n, SYNTH_HEADER + 8);
    let f = frame[256..256 + n].to_vec();
    let f = &f[..];
    let p = etherparse::SlicedPacket::from_ethernet(f).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!("IPv4") };
    let h = ip.header();
    assert_eq!((h.source_addr(), h.destination_addr(), f[15]), (PEER, LOCAL, 0x2e));
    assert!(Ipv4Packet::new_unchecked(&f[14..]).verify_checksum());
    let Some(etherparse::TransportSlice::Udp(u)) = p.transport else { panic!("UDP") };
    assert_eq!((u.source_port(), u.destination_port(), u.length(), u.checksum()), (51000, 4789, 16, 0));
    assert_eq!(&f[..6], &LOCAL_MAC.0);

    // A VXLAN header alone: decap gets as far as the inner frame and finds none.
    let mut cfg = DecapConfig::new(TunnelKind::Vxlan, 42, IpAddr::V4(LOCAL));
    cfg.local_mac = Some(LOCAL_MAC);
    let mut fb = FrameBuf::new(&mut frame, 256, n).expect("frame");
    assert_eq!(ferry_encap::decap(&cfg, &mut fb), Err(DropReason::InnerTooShort));

    // Too long for what is left of the frame after the headroom.
    let mut small = vec![0u8; 2048];
    assert_eq!(write_received(&mut small, 256, local, LOCAL_MAC, peer, 0, &[0; 1751]), None);
    assert!(write_received(&mut small, 256, local, LOCAL_MAC, peer, 0, &[0; 1750]).is_some());
}

#[test]
fn parse_outer_refuses_what_is_not_ipv4_udp() {
    let tpl = template(false);
    let f = inner(100, 0);
    let mut buf = vec![0u8; 2048];
    buf[256..256 + f.len()].copy_from_slice(&f);
    let mut fb = FrameBuf::new(&mut buf, 256, f.len()).expect("frame");
    ferry_encap::encap_with(&tpl, &mut fb, 0, 7).expect("encap");
    let good = fb.data().to_vec();
    assert!(parse_outer(&good).is_some());
    // The inner frame is TCP, not UDP.
    assert_eq!(parse_outer(&f), None);
    let mut v = good.clone();
    v[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_eq!(parse_outer(&v), None, "IPv6");
    let mut v = good.clone();
    v[14 + 6] |= 0x20;
    assert_eq!(parse_outer(&v), None, "a fragment");
    assert_eq!(parse_outer(&good[..good.len() - 1]), None, "shorter than its IPv4 total length");
    assert_eq!(parse_outer(&good[..20]), None, "truncated header");
    let mut v = good.clone();
    v[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4000u16.to_be_bytes());
    assert_eq!(parse_outer(&v), None, "UDP length past the IP packet");
    // With an 802.1Q tag in front of the EtherType.
    let mut tagged = good[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    tagged.extend_from_slice(&good[12..]);
    let (a, b) = (parse_outer(&good).expect("untagged"), parse_outer(&tagged).expect("tagged"));
    assert_eq!((b.dst, b.tos, b.start, b.len), (a.dst, a.tos, a.start + 4, a.len));
}

/// A kernel VXLAN device's TCP super-packet, delivered whole (one datagram with no `UDP_GRO`
/// message, so the MSS comes from the inner MTU): recognised, cut into MSS-sized segments with completed checksums, each one
/// accepted by `decap`, their payloads together the original's; a run of plain datagrams is not
/// mistaken for one.
#[test]
fn a_tunnel_super_datagram_is_cut_into_tcp_segments() {
    let mss = 1000;
    let data: Vec<u8> = (0..4500u32).map(|i| (i * 7) as u8).collect();
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 9, 1], [2, 0, 0, 0, 9, 2])
        .ipv4([10, 244, 3, 5], [10, 244, 0, 7], 63)
        .tcp(40000, 5201, 1000, 65535)
        .ack(1);
    let mut inner = Vec::new();
    b.write(&mut inner, &data).expect("build");
    // The sender's TSO leaves the pseudo-header sum (of the whole length) in the checksum field.
    let tcp_len = inner.len() - 34;
    let pseudo =
        ferry_encap::checksum::pseudo_v4(Ipv4Addr::new(10, 244, 3, 5), Ipv4Addr::new(10, 244, 0, 7), 6, tcp_len as u16);
    let folded = !ferry_encap::checksum::finish_sum(pseudo);
    inner[34 + 16..34 + 18].copy_from_slice(&folded.to_be_bytes());
    let mut payload = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
    payload.extend_from_slice(&inner);

    assert_eq!(super_datagram(&payload, mss), Some(8));
    assert_eq!(super_datagram(&payload, payload.len()), None, "one plain datagram");
    let mut run = payload[..1062].to_vec();
    run.extend_from_slice(&payload[..1062]);
    assert_eq!(super_datagram(&run, 1062), None, "a run of datagrams: the first ends at the segment size");
    assert_eq!(super_segments(&payload, 8, mss), Some(5));
    // Without a segment size: the MSS that fills the inner MTU (20 bytes of IPv4, 20 of TCP).
    assert_eq!(tunnel_super_packet(&payload, 1040), Some((8, mss)));
    assert_eq!(tunnel_super_packet(&payload, inner.len() - 14), None, "fits the inner MTU: one packet");
    assert_eq!(tunnel_super_packet(&run, 1040), None, "not one tunnel packet");

    let mut cfg = DecapConfig::new(TunnelKind::Vxlan, 42, IpAddr::V4(LOCAL));
    cfg.local_mac = Some(LOCAL_MAC);
    let local = SocketAddrV4::new(LOCAL, 4789);
    let src = SocketAddrV4::new(PEER, 40000);
    let mut got = Vec::new();
    for i in 0..5 {
        let mut frame = vec![0u8; 2048];
        let n = write_super_segment(&mut frame, 256, local, LOCAL_MAC, src, 0, &payload, 8, mss, i).expect("segment");
        let mut fb = FrameBuf::new(&mut frame, 256, n).expect("frame");
        ferry_encap::decap(&cfg, &mut fb).expect("decap accepts each segment");
        let seg = fb.data().to_vec();
        let p = etherparse::SlicedPacket::from_ethernet(&seg).expect("parses");
        let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else { panic!("TCP") };
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
        let want = t.calc_checksum_ipv4(ip.header().source(), ip.header().destination()).expect("checksum");
        assert_eq!(t.checksum(), want, "segment {i}'s TCP checksum is complete");
        assert_eq!(t.sequence_number(), 1000 + (i * mss) as u32);
        got.extend_from_slice(t.payload());
    }
    assert_eq!(got, data);
    assert_eq!(write_super_segment(&mut [0u8; 2048], 256, local, LOCAL_MAC, src, 0, &payload, 8, mss, 5), None);
}
