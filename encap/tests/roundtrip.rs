//! Encapsulation and decapsulation against each other and against etherparse as an independent
//! parser: round trips for random inner frames over both tunnels and both underlay families, the
//! outer header fields that RFC 7348/8926/6040 prescribe, and one test per decap drop reason.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use ferry_encap::wire::geneve::GeneveOption;
use ferry_encap::{
    DecapConfig, DropReason, Dscp, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, decap, ecn, encap,
};
use proptest::prelude::*;

const HEADROOM: usize = 400;
const SRC_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
const DST_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);

fn addrs(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        (IpAddr::V6("fd00::1".parse().expect("ip")), IpAddr::V6("fd00::2".parse().expect("ip")))
    } else {
        (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)))
    }
}

fn template(kind: TunnelKind, v6: bool, options: &[GeneveOption<'_>]) -> TunnelTemplate {
    let (src, dst) = addrs(v6);
    let mut p = TemplateParams::new(kind, 7, SRC_MAC, DST_MAC, src, dst);
    p.geneve_options = options;
    TunnelTemplate::new(&p).expect("valid template")
}

fn decap_config(kind: TunnelKind, v6: bool) -> DecapConfig {
    let mut c = DecapConfig::new(kind, 7, addrs(v6).1);
    c.verify_udp_checksum = true;
    c
}

/// Encapsulate `inner` and return the whole buffer and the outer frame's position.
fn encapsulate(tpl: &TunnelTemplate, inner: &[u8]) -> (Vec<u8>, usize, usize) {
    let mut buf = vec![0u8; HEADROOM + inner.len()];
    buf[HEADROOM..].copy_from_slice(inner);
    let mut f = FrameBuf::new(&mut buf, HEADROOM, inner.len()).expect("fits");
    encap(tpl, &mut f).expect("encap");
    let (start, len) = (f.start(), f.len());
    (buf, start, len)
}

fn inner_udp4(tos: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([0x0a, 0, 0, 0, 0, 1], [0x0a, 0, 0, 0, 0, 2])
        .ipv4([10, 244, 1, 2], [10, 244, 2, 3], 63)
        .udp(40000, 53)
        .write(&mut out, payload)
        .expect("build");
    let mut ip = ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut out[14..]);
    ip.set_tos_incremental(tos);
    out
}

/// Random inner frames: IPv4 or IPv6 with TCP, UDP or ICMP, or a non-IP frame.
fn inner_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..7,
        any::<[u8; 4]>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..1400),
    )
        .prop_map(|(shape, a4, a6, port, tos, payload)| {
            let eth = PacketBuilder::ethernet2([0x0a, 0, 0, 0, 0, 1], [0x0a, 0, 0, 0, 0, 2]);
            let mut out = Vec::new();
            let w = match shape {
                0 => eth.ipv4(a4, [10, 0, 0, 1], 64).udp(port, 80).write(&mut out, &payload),
                1 => eth.ipv4(a4, [10, 0, 0, 1], 64).tcp(port, 443, 1, 100).write(&mut out, &payload),
                2 => eth.ipv4(a4, [10, 0, 0, 1], 1).icmpv4_echo_request(port, 1).write(&mut out, &payload),
                3 => eth.ipv6(a6, [0xfd; 16], 64).udp(port, 80).write(&mut out, &payload),
                4 => eth.ipv6(a6, [0xfd; 16], 64).tcp(port, 443, 1, 100).write(&mut out, &payload),
                5 => eth.ipv6(a6, [0xfd; 16], 64).icmpv6_echo_request(port, 1).write(&mut out, &payload),
                _ => {
                    // Non-IP (an ARP-like EtherType) with arbitrary payload.
                    out.extend_from_slice(&[0x0a, 0, 0, 0, 0, 2, 0x0a, 0, 0, 0, 0, 1, 0x08, 0x06]);
                    out.extend_from_slice(&payload);
                    Ok(())
                }
            };
            w.expect("build");
            // Random DSCP/ECN on the inner IP header, keeping its checksum right.
            match shape {
                0..=2 => ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut out[14..]).set_tos_incremental(tos),
                3..=5 => ferry_encap::wire::ipv6::Ipv6Packet::new_unchecked(&mut out[14..]).set_traffic_class(tos),
                _ => {}
            }
            out
        })
}

fn tunnel() -> impl Strategy<Value = (TunnelKind, bool)> {
    (prop_oneof![Just(TunnelKind::Vxlan), Just(TunnelKind::Geneve)], any::<bool>())
}

proptest! {
    #[test]
    fn decap_of_encap_is_identity(inner in inner_frame(), (kind, v6) in tunnel(), with_options in any::<bool>()) {
        let opts = [GeneveOption { class: 0x0102, kind: 0x05, data: &[1, 2, 3, 4] }];
        let tpl = template(kind, v6, if with_options { &opts } else { &[] });
        let (mut buf, start, len) = encapsulate(&tpl, &inner);
        prop_assert_eq!(len, inner.len() + tpl.overhead());
        let mut f = FrameBuf::new(&mut buf, start, len).expect("fits");
        let d = decap(&decap_config(kind, v6), &mut f).expect("decap");
        prop_assert_eq!(f.data(), &inner[..]);
        prop_assert_eq!(d.outer_src, addrs(v6).0);
        prop_assert_eq!(d.vni, 7);
        prop_assert!(d.outer_src_port >= 49152);
    }

    #[test]
    fn outer_headers_parse_with_etherparse(inner in inner_frame(), (kind, v6) in tunnel()) {
        let tpl = template(kind, v6, &[]);
        let (buf, start, len) = encapsulate(&tpl, &inner);
        let outer = &buf[start..start + len];
        let p = SlicedPacket::from_ethernet(outer).expect("etherparse parses the outer frame");
        let Some(TransportSlice::Udp(udp)) = p.transport else { panic!("outer is UDP") };
        prop_assert_eq!(udp.destination_port(), kind.default_port());
        prop_assert_eq!(usize::from(udp.length()), len - 14 - if v6 { 40 } else { 20 });
        match p.net {
            Some(NetSlice::Ipv4(ip)) => {
                prop_assert!(!v6);
                let h = ip.header().to_header();
                prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
                prop_assert!(h.dont_fragment);
                prop_assert_eq!(h.time_to_live, 64);
                prop_assert_eq!(udp.checksum(), 0, "RFC 7348: zero UDP checksum over IPv4");
            }
            Some(NetSlice::Ipv6(ip)) => {
                prop_assert!(v6);
                let (s, d) = (ip.header().source(), ip.header().destination());
                prop_assert_eq!(udp.to_header().calc_checksum_ipv6_raw(s, d, udp.payload()).ok(), Some(udp.checksum()));
                prop_assert_eq!(ip.header().hop_limit(), 64);
            }
            _ => prop_assert!(false, "outer is IP"),
        }
    }

    #[test]
    fn same_inner_flow_same_source_port(payload_a in prop::collection::vec(any::<u8>(), 0..100), payload_b in prop::collection::vec(any::<u8>(), 0..100)) {
        let tpl = template(TunnelKind::Vxlan, false, &[]);
        let (a, sa, _) = encapsulate(&tpl, &inner_udp4(0, &payload_a));
        let (b, sb, _) = encapsulate(&tpl, &inner_udp4(0, &payload_b));
        prop_assert_eq!(&a[sa + 34..sa + 36], &b[sb + 34..sb + 36]);
    }
}

#[test]
fn vxlan_over_ipv4_fixture() {
    // Inner: 10.244.1.2:40000 -> 10.244.2.3:53 UDP "hi", DSCP 46 (EF), ECN ECT(0).
    let inner = inner_udp4(0xb8 | ecn::ECT0, b"hi");
    let tpl = template(TunnelKind::Vxlan, false, &[]);
    let (buf, start, len) = encapsulate(&tpl, &inner);
    let o = &buf[start..start + len];
    assert_eq!(&o[0..12], &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1], "outer MACs");
    assert_eq!(&o[12..14], &[0x08, 0x00]);
    assert_eq!(o[14], 0x45);
    assert_eq!(o[15], 0xb8 | ecn::ECT0, "DSCP inherited, ECN copied (RFC 6040 normal mode)");
    assert_eq!(u16::from_be_bytes([o[16], o[17]]) as usize, len - 14);
    assert_eq!(&o[20..22], &[0x40, 0x00], "DF set, no fragment offset");
    assert_eq!((o[22], o[23]), (64, 17), "TTL 64, UDP");
    assert_eq!(&o[26..34], &[192, 0, 2, 1, 192, 0, 2, 2]);
    assert_eq!(u16::from_be_bytes([o[36], o[37]]), 4789);
    assert_eq!(u16::from_be_bytes([o[38], o[39]]) as usize, len - 34);
    assert_eq!(&o[40..42], &[0, 0], "UDP checksum zero over IPv4");
    assert_eq!(&o[42..50], &[0x08, 0, 0, 0, 0, 0, 7, 0], "VXLAN: I flag, reserved zero, VNI 7");
    assert_eq!(&o[50..], &inner[..]);
}

#[test]
fn fixed_dscp_compat_ecn_ttl_and_flannel_port() {
    let (src, dst) = addrs(false);
    let mut p = TemplateParams::new(TunnelKind::Vxlan, 1, SRC_MAC, DST_MAC, src, dst);
    p.dscp = Dscp::Fixed(10);
    p.ecn = ecn::EcnMode::Compatibility;
    p.ttl = 9;
    p.dst_port = 8472;
    let tpl = TunnelTemplate::new(&p).expect("valid");
    let (buf, start, _) = encapsulate(&tpl, &inner_udp4(0xb8 | ecn::CE, b"x"));
    let o = &buf[start..];
    assert_eq!(o[15], 10 << 2, "fixed DSCP, Not-ECT outer in compatibility mode");
    assert_eq!(o[22], 9);
    assert_eq!(u16::from_be_bytes([o[36], o[37]]), 8472);
}

#[test]
fn ipv6_zero_checksum_when_configured() {
    let (src, dst) = addrs(true);
    let mut p = TemplateParams::new(TunnelKind::Geneve, 1, SRC_MAC, DST_MAC, src, dst);
    p.ipv6_zero_udp_checksum = true;
    let tpl = TunnelTemplate::new(&p).expect("valid");
    let (buf, start, _) = encapsulate(&tpl, &inner_udp4(0, b"x"));
    assert_eq!(&buf[start + 14 + 40 + 6..start + 14 + 40 + 8], &[0, 0]);
}

/// Encapsulate a UDP inner frame, let `corrupt` change the outer bytes, then decapsulate.
fn decap_after(
    kind: TunnelKind,
    v6: bool,
    cfg: impl FnOnce(&mut DecapConfig),
    corrupt: impl FnOnce(&mut Vec<u8>, usize),
) -> Result<ferry_encap::Decapped, DropReason> {
    let tpl = template(kind, v6, &[]);
    let (mut buf, start, len) = encapsulate(&tpl, &inner_udp4(0, b"payload"));
    corrupt(&mut buf, start);
    let mut c = decap_config(kind, v6);
    cfg(&mut c);
    let mut f = FrameBuf::new(&mut buf, start, len).expect("fits");
    let r = decap(&c, &mut f);
    if r.is_err() {
        assert_eq!((f.start(), f.len()), (start, len), "a failed decap leaves the frame where it was");
    }
    r
}

fn reason(kind: TunnelKind, v6: bool, corrupt: impl FnOnce(&mut Vec<u8>, usize)) -> Option<DropReason> {
    decap_after(kind, v6, |_| {}, corrupt).err()
}

fn fix_ipv4_checksum(b: &mut [u8], s: usize) {
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut b[s + 14..s + 34]).fill_checksum();
}

#[test]
fn every_decap_check_has_its_reason() {
    use TunnelKind::{Geneve, Vxlan};
    assert_eq!(reason(Vxlan, false, |b, s| b[s + 12] = 0x99), Some(DropReason::UnsupportedEtherType));
    assert_eq!(reason(Vxlan, false, |b, s| b[s + 24] ^= 1), Some(DropReason::Ipv4BadChecksum));
    assert_eq!(
        reason(Vxlan, false, |b, s| {
            b[s + 20] = 0x20; // MF
            fix_ipv4_checksum(b, s);
        }),
        Some(DropReason::OuterFragment)
    );
    assert_eq!(
        reason(Vxlan, false, |b, s| {
            b[s + 23] = 6;
            fix_ipv4_checksum(b, s);
        }),
        Some(DropReason::NotUdp)
    );
    assert_eq!(
        reason(Vxlan, false, |b, s| {
            b[s + 33] = 99;
            fix_ipv4_checksum(b, s);
        }),
        Some(DropReason::NotForThisNode)
    );
    assert_eq!(reason(Vxlan, false, |b, s| b[s + 37] ^= 1), Some(DropReason::UdpPortMismatch));
    assert_eq!(reason(Vxlan, false, |b, s| b[s + 39] = 7), Some(DropReason::UdpBadLength));
    assert_eq!(reason(Vxlan, false, |b, s| b[s + 42] = 0), Some(DropReason::VxlanNoIFlag));
    assert_eq!(reason(Vxlan, false, |b, s| b[s + 48] = 8), Some(DropReason::VniMismatch));
    assert_eq!(reason(Vxlan, true, |b, s| b[s + 14] = 0x50), Some(DropReason::Ipv6BadVersion));
    assert_eq!(reason(Vxlan, true, |b, s| b[s + 14 + 39] = 9), Some(DropReason::NotForThisNode));
    // Over IPv6 the UDP checksum is set, so corrupting the payload is caught when verification is on.
    assert_eq!(reason(Vxlan, true, |b, s| b[s + 100] ^= 0xff), Some(DropReason::UdpBadChecksum));
    let ok = decap_after(Vxlan, true, |c| c.verify_udp_checksum = false, |b, s| b[s + 100] ^= 0xff);
    assert!(ok.is_ok(), "without verification the payload is not checked");
    // Geneve: version, OAM, protocol, options. The UDP checksum is zero over IPv4, so edits are seen.
    let g = 14 + 20 + 8;
    assert_eq!(reason(Geneve, false, |b, s| b[s + g] = 0x40), Some(DropReason::GeneveBadVersion));
    assert_eq!(reason(Geneve, false, |b, s| b[s + g + 1] = 0x80), Some(DropReason::GeneveOam));
    assert_eq!(reason(Geneve, false, |b, s| b[s + g + 2] = 0x08), Some(DropReason::GeneveBadProtocol));
    assert_eq!(reason(Geneve, false, |b, s| b[s + g] = 0x3f), Some(DropReason::GeneveBadOptions));
    assert_eq!(reason(Geneve, false, |b, s| b[s + g + 6] = 9), Some(DropReason::VniMismatch));
}

#[test]
fn critical_options_drop_and_non_critical_pass() {
    let mut cfg = decap_config(TunnelKind::Geneve, true);
    for (kind, expect) in [(0x05u8, None), (0x85, Some(DropReason::GeneveUnknownCritical))] {
        let opts = [GeneveOption { class: 0x0102, kind, data: &[0; 8] }];
        let tpl = template(TunnelKind::Geneve, true, &opts);
        let (mut buf, start, len) = encapsulate(&tpl, &inner_udp4(0, b"x"));
        let mut f = FrameBuf::new(&mut buf, start, len).expect("fits");
        assert_eq!(decap(&cfg, &mut f).err(), expect, "option type {kind:#x}");
    }
    cfg.vni = 8;
    let tpl = template(TunnelKind::Geneve, true, &[]);
    let (mut buf, start, len) = encapsulate(&tpl, &inner_udp4(0, b"x"));
    assert_eq!(
        decap(&cfg, &mut FrameBuf::new(&mut buf, start, len).expect("fits")).err(),
        Some(DropReason::VniMismatch)
    );
}

#[test]
fn inner_too_short_and_ethernet_padding() {
    // A 10-byte "inner frame" is shorter than an Ethernet header. `encap` would refuse to
    // classify it, so build the tunnel packet with `encap_with`, as a broken peer might.
    let tpl = template(TunnelKind::Vxlan, false, &[]);
    let mut buf = vec![0u8; HEADROOM + 10];
    let mut f = FrameBuf::new(&mut buf, HEADROOM, 10).expect("fits");
    ferry_encap::encap_with(&tpl, &mut f, 0, 0).expect("encap");
    let (start, len) = (f.start(), f.len());
    let r = decap(&decap_config(TunnelKind::Vxlan, false), &mut FrameBuf::new(&mut buf, start, len).expect("fits"));
    assert_eq!(r.err(), Some(DropReason::InnerTooShort));
    // Ethernet padding after the outer IP packet is not part of the inner frame.
    let inner = inner_udp4(0, b"x");
    let (mut buf, start, len) = encapsulate(&tpl, &inner);
    buf.extend_from_slice(&[0xee; 6]);
    let mut f = FrameBuf::new(&mut buf, start, len + 6).expect("fits");
    decap(&decap_config(TunnelKind::Vxlan, false), &mut f).expect("decap");
    assert_eq!(f.data(), &inner[..]);
}

#[test]
fn ecn_rfc6040_on_decap() {
    let tpl = template(TunnelKind::Vxlan, false, &[]);
    let cfg = decap_config(TunnelKind::Vxlan, false);
    let run = |inner_ecn: u8, outer_ecn: u8| {
        let (mut buf, start, len) = encapsulate(&tpl, &inner_udp4(0xb8 | inner_ecn, b"x"));
        // Mark the outer header as a congested router would, fixing its checksum.
        buf[start + 15] = (buf[start + 15] & 0xfc) | outer_ecn;
        fix_ipv4_checksum(&mut buf, start);
        let mut f = FrameBuf::new(&mut buf, start, len).expect("fits");
        decap(&cfg, &mut f).map(|_| {
            let ip = ferry_encap::wire::ipv4::Ipv4Packet::new_checked(&f.data()[14..]).expect("inner ip");
            assert!(ip.verify_checksum(), "inner IPv4 checksum updated with the ECN field");
            ip.tos()
        })
    };
    assert_eq!(run(ecn::ECT0, ecn::CE), Ok(0xb8 | ecn::CE));
    assert_eq!(run(ecn::ECT0, ecn::ECT1), Ok(0xb8 | ecn::ECT1));
    assert_eq!(run(ecn::ECT1, ecn::ECT0), Ok(0xb8 | ecn::ECT1));
    assert_eq!(run(ecn::NOT_ECT, ecn::CE), Err(DropReason::EcnCeOnNotEct));
    assert_eq!(run(ecn::NOT_ECT, ecn::NOT_ECT), Ok(0xb8));
}

#[test]
fn no_headroom_leaves_frame_alone() {
    let tpl = template(TunnelKind::Vxlan, false, &[]);
    let inner = inner_udp4(0, b"x");
    let mut buf = vec![0u8; 49 + inner.len()];
    buf[49..].copy_from_slice(&inner);
    let mut f = FrameBuf::new(&mut buf, 49, inner.len()).expect("fits");
    assert_eq!(encap(&tpl, &mut f), Err(DropReason::NoHeadroom));
    assert_eq!((f.start(), f.data()), (49, &inner[..]));
}

#[test]
fn underlay_families_must_match_config() {
    // An IPv6 tunnel packet arriving at a node configured with only an IPv4 underlay address.
    let tpl = template(TunnelKind::Vxlan, true, &[]);
    let (mut buf, start, len) = encapsulate(&tpl, &inner_udp4(0, b"x"));
    let cfg = DecapConfig::new(TunnelKind::Vxlan, 7, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)));
    let r = decap(&cfg, &mut FrameBuf::new(&mut buf, start, len).expect("fits"));
    assert_eq!(r.err(), Some(DropReason::NotForThisNode));
}

/// Write an outer UDP checksum over IPv4 into the tunnel frame at `s`: the real one over the
/// datagram as it is, or (`partial`) what a CHECKSUM_PARTIAL veth leaves there.
fn set_outer_udp_checksum_v4(b: &mut [u8], s: usize, partial: bool) {
    use ferry_encap::checksum;
    let (ip, udp) = (s + 14, s + 34);
    let len = u16::from_be_bytes([b[udp + 4], b[udp + 5]]);
    let src = Ipv4Addr::new(b[ip + 12], b[ip + 13], b[ip + 14], b[ip + 15]);
    let dst = Ipv4Addr::new(b[ip + 16], b[ip + 17], b[ip + 18], b[ip + 19]);
    let pseudo = checksum::pseudo_v4(src, dst, 17, len);
    b[udp + 6..udp + 8].fill(0);
    let c = if partial {
        !checksum::finish_sum(pseudo)
    } else {
        checksum::finish_sum(pseudo + checksum::sum(&b[udp..udp + usize::from(len)]))
    };
    b[udp + 6..udp + 8].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn hardened_defaults_mac_checksums_and_zero_ipv6_checksum() {
    use TunnelKind::Vxlan;
    let defaults = DecapConfig::new(Vxlan, 7, addrs(false).1);
    assert!(defaults.verify_udp_checksum, "non-zero outer UDP checksums are verified by default");
    assert!(!defaults.accept_ipv6_zero_udp_checksum, "a zero one over IPv6 is refused by default");
    let run = |cfg: &DecapConfig, v6: bool, inner: &[u8], edit: &dyn Fn(&mut Vec<u8>, usize)| {
        let (mut buf, start, len) = encapsulate(&template(Vxlan, v6, &[]), inner);
        edit(&mut buf, start);
        decap(cfg, &mut FrameBuf::new(&mut buf, start, len).expect("fits")).err()
    };
    let inner = inner_udp4(0, b"hardening");
    let none = |_: &mut Vec<u8>, _: usize| {};

    // The outer destination MAC: this node's passes, another's is dropped.
    let mut mac = defaults;
    mac.local_mac = Some(DST_MAC);
    assert_eq!(run(&mac, false, &inner, &none), None);
    mac.local_mac = Some(MacAddr([0x02, 0, 0, 0, 0, 0x99]));
    assert_eq!(run(&mac, false, &inner, &none), Some(DropReason::OuterDstMacNotOurs));

    // IPv4: zero (no checksum), a right one and an unfinished one pass; a wrong one is dropped.
    assert_eq!(run(&defaults, false, &inner, &none), None);
    assert_eq!(run(&defaults, false, &inner, &|b, s| set_outer_udp_checksum_v4(b, s, false)), None);
    assert_eq!(run(&defaults, false, &inner, &|b, s| set_outer_udp_checksum_v4(b, s, true)), None);
    let wrong = |b: &mut Vec<u8>, s: usize| {
        set_outer_udp_checksum_v4(b, s, false);
        b[s + 40] ^= 0x55;
    };
    assert_eq!(run(&defaults, false, &inner, &wrong), Some(DropReason::UdpBadChecksum));
    let mut off = defaults;
    off.verify_udp_checksum = false;
    assert_eq!(run(&off, false, &inner, &wrong), None, "verification off: not checked");

    // Local checksum offload, as the kernel's VXLAN sends: the inner UDP checksum left partial, the
    // outer one computed as if it were final. It passes; a change to the inner headers does not.
    let mut partial_inner = inner.clone();
    let pseudo = ferry_encap::checksum::pseudo_v4(
        Ipv4Addr::new(10, 244, 1, 2),
        Ipv4Addr::new(10, 244, 2, 3),
        17,
        (inner.len() - 34) as u16,
    );
    partial_inner[40..42].copy_from_slice(&(!ferry_encap::checksum::finish_sum(pseudo)).to_be_bytes());
    let lco = |b: &mut Vec<u8>, s: usize| {
        // The outer checksum over the final inner frame, then the inner checksum made partial.
        let at = s + 50 + 40;
        let partial = [b[at], b[at + 1]];
        b[at..at + 2].copy_from_slice(&inner[40..42]);
        set_outer_udp_checksum_v4(b, s, false);
        b[at..at + 2].copy_from_slice(&partial);
    };
    assert_eq!(run(&defaults, false, &partial_inner, &lco), None, "LCO frames pass");
    // (The inner payload is covered by the inner checksum alone there: LCO makes the outer one
    // independent of it. A change to the headers before it is caught.)
    let lco_corrupt = |b: &mut Vec<u8>, s: usize| {
        lco(b, s);
        b[s + 50 + 14 + 8] ^= 1; // the inner TTL
    };
    assert_eq!(run(&defaults, false, &partial_inner, &lco_corrupt), Some(DropReason::UdpBadChecksum));
    let mut f = partial_inner.clone();
    assert_eq!(ferry_encap::offload::complete_checksum(&mut f), Ok(ferry_encap::offload::ChecksumFix::Completed));
    assert_eq!(f, inner, "the LCO fixture's inner checksum is the partial form of the real one");

    // IPv6: a zero checksum is refused unless enabled.
    let zero6 = |b: &mut Vec<u8>, s: usize| b[s + 14 + 40 + 6..s + 14 + 40 + 8].fill(0);
    let v6 = DecapConfig::new(Vxlan, 7, addrs(true).1);
    assert_eq!(run(&v6, true, &inner, &none), None);
    assert_eq!(run(&v6, true, &inner, &zero6), Some(DropReason::Udp6ZeroChecksum));
    let mut zero_ok = v6;
    zero_ok.accept_ipv6_zero_udp_checksum = true;
    assert_eq!(run(&zero_ok, true, &inner, &zero6), None);
}
