//! The checks behind ferry-encap's fuzz targets and its property tests (test code, not shipped).
//!
//! Each `check_*` function takes any bytes, feeds them to one wire-facing entry point of
//! ferry-encap, and when the input is accepted calls every accessor and asserts what the type
//! promises: no panic anywhere (the `new_checked` contract), plus the invariants that are cheap to
//! state (emit/parse round trips, a decap that succeeds leaves an Ethernet-sized frame inside the
//! original buffer, a decap that fails modifies nothing, ...).
//!
//! One file serves two drivers: the fuzz targets in `fuzz_targets/` link it as this crate's library,
//! and `encap/tests/never_panic.rs` includes it with `#[path]`, so proptest and libFuzzer hold the
//! code to the same invariants and the workspace's clippy lints it. It therefore depends on nothing
//! but ferry-encap and std.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_encap::checksum;
use ferry_encap::flow::{self, L3};
use ferry_encap::gro::{self, Coalescer};
use ferry_encap::gso::{Checksum, Segmenter};
use ferry_encap::icmp::{self, ErrorSource, IcmpError, Suppressed};
use ferry_encap::offload::{self, ChecksumFix};
use ferry_encap::wire::ethernet::{self, EthernetFrame, EthernetRepr, ethertype};
use ferry_encap::wire::geneve::{self, GeneveOption, GenevePacket, GeneveRepr};
use ferry_encap::wire::ipv4::{self, Ipv4Packet, Ipv4Repr, protocol};
use ferry_encap::wire::ipv6::{self, Ipv6Packet, Ipv6Repr};
use ferry_encap::wire::tcp::{self, TcpPorts};
use ferry_encap::wire::udp::{self, UdpPacket, UdpRepr};
use ferry_encap::wire::virtio_net::{self, Gso, VirtioNetHdr};
use ferry_encap::wire::vxlan::{self, VxlanPacket, VxlanRepr};
use ferry_encap::{DecapConfig, DropReason, FrameBuf, MacAddr, TunnelKind, TunnelTemplate, decap, encap};

/// The VNI the decap configurations accept and generated frames carry.
pub const VNI: u32 = 4242;
/// The local (receiving) node's IPv4 underlay address.
pub const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The remote (sending) node's IPv4 underlay address.
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The local node's IPv6 underlay address.
pub const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The remote node's IPv6 underlay address.
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

/// An Ethernet frame's parser and accessors, and the [`EthernetRepr`] round trip.
pub fn check_ethernet(b: &[u8]) {
    let Ok(f) = EthernetFrame::new_checked(b) else { return };
    let hl = f.header_len();
    assert!(hl == ethernet::HEADER_LEN || hl == ethernet::HEADER_LEN + ethernet::VLAN_TAG_LEN);
    assert_eq!(f.vlan().is_some(), hl != ethernet::HEADER_LEN);
    assert!(f.vlan().is_none_or(|v| v <= 0x0fff));
    assert_eq!(f.payload().len(), b.len() - hl);
    let _ = (f.dst().is_multicast(), f.src().is_unicast(), f.dst().to_string());
    // A checked frame never reports a tag as its payload type: that would be a second tag.
    assert!(!matches!(f.ethertype(), ethertype::VLAN | ethertype::QINQ));

    let repr = EthernetRepr::parse(&f);
    assert_eq!(repr.header_len(), hl);
    let mut out = vec![0u8; hl];
    repr.emit(&mut out);
    let back = EthernetFrame::new_checked(&out[..]).expect("an emitted header parses");
    assert_eq!(EthernetRepr::parse(&back), repr);

    let mut copy = b.to_vec();
    let mut m = EthernetFrame::new_checked(&mut copy[..]).expect("same bytes");
    m.set_dst(repr.src);
    m.set_src(repr.dst);
    assert_eq!(m.payload_mut().len(), b.len() - hl);
    assert_eq!((m.dst(), m.src()), (repr.src, repr.dst));
    let _ = m.into_inner();
}

/// An IPv4 packet's parser, accessors, incremental checksum updates and the [`Ipv4Repr`] round trip.
pub fn check_ipv4(b: &[u8]) {
    let Ok(p) = Ipv4Packet::new_checked(b) else { return };
    let (hl, total) = (p.header_len(), usize::from(p.total_len()));
    assert_eq!(p.version(), 4);
    assert!(ipv4::HEADER_LEN <= hl && hl <= total && total <= b.len(), "hl {hl} total {total} len {}", b.len());
    assert_eq!(p.payload().len(), total - hl);
    assert!(!p.is_later_fragment() || p.is_fragment());
    let _ = (p.tos(), p.ident(), p.dont_frag(), p.ttl(), p.protocol(), p.checksum(), p.src(), p.dst());
    let _ = p.pseudo_header();
    let valid = p.verify_checksum();

    let repr = Ipv4Repr::parse(&p);
    assert_eq!(usize::from(repr.payload_len), total - hl);
    let mut out = vec![0u8; ipv4::HEADER_LEN + usize::from(repr.payload_len)];
    repr.emit(&mut out);
    let back = Ipv4Packet::new_checked(&out[..]).expect("an emitted header parses");
    assert!(back.verify_checksum());
    assert_eq!(Ipv4Repr::parse(&back), repr);

    let mut copy = b.to_vec();
    let mut m = Ipv4Packet::new_checked(&mut copy[..]).expect("same bytes");
    m.set_tos_incremental(repr.tos ^ 0xff);
    m.decrement_ttl();
    // Incremental updates preserve the ones'-complement total, so validity is unchanged.
    assert_eq!(m.verify_checksum(), valid);
    assert_eq!((m.tos(), m.ttl()), (repr.tos ^ 0xff, repr.ttl.wrapping_sub(1)));
    m.fill_checksum();
    assert!(m.verify_checksum());
    assert_eq!(m.payload_mut().len(), total - hl);
    let _ = m.into_inner();
}

/// An IPv6 packet's parser, accessors, the extension-header walk and the [`Ipv6Repr`] round trip.
pub fn check_ipv6(b: &[u8]) {
    let Ok(p) = Ipv6Packet::new_checked(b) else { return };
    let plen = usize::from(p.payload_len());
    assert_eq!(p.version(), 6);
    assert!(ipv6::HEADER_LEN + plen <= b.len());
    assert_eq!(p.payload().len(), plen);
    assert!(p.flow_label() < 1 << 20);
    let _ = (p.traffic_class(), p.next_header(), p.hop_limit(), p.src(), p.dst());
    let _ = p.pseudo_header(protocol::UDP, plen as u32);
    match p.upper_layer() {
        Ok(ul) => {
            assert!(ipv6::HEADER_LEN <= ul.offset && ul.offset <= ipv6::HEADER_LEN + plen, "{ul:?} plen {plen}");
            if ul.offset == ipv6::HEADER_LEN {
                assert_eq!(ul.protocol, p.next_header());
            }
        }
        Err(e) => assert_eq!(e, DropReason::Ipv6BadExtension),
    }

    let repr = Ipv6Repr::parse(&p);
    let mut out = vec![0u8; ipv6::HEADER_LEN + plen];
    repr.emit(&mut out);
    let back = Ipv6Packet::new_checked(&out[..]).expect("an emitted header parses");
    assert_eq!(Ipv6Repr::parse(&back), repr);

    let mut copy = b.to_vec();
    let mut m = Ipv6Packet::new_checked(&mut copy[..]).expect("same bytes");
    m.set_traffic_class(repr.traffic_class ^ 0xff);
    m.decrement_hop_limit();
    assert_eq!((m.version(), m.flow_label()), (6, repr.flow_label));
    assert_eq!((m.traffic_class(), m.hop_limit()), (repr.traffic_class ^ 0xff, repr.hop_limit.wrapping_sub(1)));
    let _ = m.into_inner();
}

/// A UDP datagram's parser, accessors and the [`UdpRepr`] round trip.
pub fn check_udp(b: &[u8]) {
    let Ok(p) = UdpPacket::new_checked(b) else { return };
    let len = usize::from(p.len());
    assert!(udp::HEADER_LEN <= len && len <= b.len());
    assert_eq!(p.datagram().len(), len);
    assert_eq!(p.payload().len(), len - udp::HEADER_LEN);
    let _ = (p.src_port(), p.dst_port());
    let repr = UdpRepr::parse(&p);
    let mut out = vec![0u8; len];
    repr.emit(&mut out);
    assert_eq!(UdpRepr::parse(&UdpPacket::new_checked(&out[..]).expect("an emitted header parses")), repr);
    let mut copy = b.to_vec();
    let mut m = UdpPacket::new_checked(&mut copy[..]).expect("same bytes");
    m.set_checksum(!repr.checksum);
    assert_eq!(m.checksum(), !repr.checksum);
}

/// The TCP ports view: accepted exactly when the fixed header fits.
pub fn check_tcp(b: &[u8]) {
    match TcpPorts::new_checked(b) {
        Ok(t) => {
            assert!(b.len() >= tcp::HEADER_LEN);
            let _ = (t.src_port(), t.dst_port(), t.checksum());
        }
        Err(e) => assert_eq!((e, b.len() < tcp::HEADER_LEN), (DropReason::Truncated, true)),
    }
}

/// A VXLAN header's parser, accessors, [`VxlanRepr`] round trip and `set_vni` masking.
pub fn check_vxlan(b: &[u8]) {
    let Ok(p) = VxlanPacket::new_checked(b) else {
        assert!(b.len() < vxlan::HEADER_LEN);
        return;
    };
    assert!(p.vni() < 1 << 24);
    assert_eq!(p.payload().len(), b.len() - vxlan::HEADER_LEN);
    match VxlanRepr::parse(&p) {
        Ok(r) => {
            assert!(p.has_vni());
            assert_eq!(r.vni, p.vni());
            let mut out = [0u8; vxlan::HEADER_LEN];
            r.emit(&mut out);
            assert_eq!(VxlanRepr::parse(&VxlanPacket::new_checked(&out[..]).expect("8 bytes")), Ok(r));
        }
        Err(e) => assert_eq!((e, p.has_vni()), (DropReason::VxlanNoIFlag, false)),
    }
    let mut copy = b.to_vec();
    let mut m = VxlanPacket::new_checked(&mut copy[..]).expect("same bytes");
    m.set_vni(p.vni() ^ 0xff00_0001);
    assert_eq!((m.vni(), m.flags()), (p.vni() ^ 1, p.flags()));
}

/// A Geneve header's parser and accessors, the option walk, and the [`GeneveRepr`] round trip.
pub fn check_geneve(b: &[u8]) {
    let Ok(p) = GenevePacket::new_checked(b) else { return };
    let olen = p.options_len();
    assert!(olen % 4 == 0 && olen <= geneve::MAX_OPTIONS_LEN);
    assert_eq!(p.header_len(), geneve::HEADER_LEN + olen);
    assert!(p.header_len() <= b.len());
    assert_eq!(p.options_bytes().len(), olen);
    assert_eq!(p.payload().len(), b.len() - p.header_len());
    assert!(p.version() <= 3 && p.vni() < 1 << 24);
    let _ = (p.oam(), p.critical(), p.protocol());

    let (mut covered, mut seen, mut failed) = (0, 0, false);
    for opt in p.options() {
        assert!(!failed, "the option iterator yields nothing after an error");
        seen += 1;
        assert!(seen <= olen / 4 + 1, "the option iterator must terminate");
        match opt {
            Ok(o) => {
                assert!(o.data.len() % 4 == 0 && o.data.len() <= 124);
                covered += o.wire_len();
                let _ = o.is_critical();
                check_geneve_option_round_trip(&o);
            }
            Err(e) => {
                assert_eq!(e, DropReason::GeneveBadOptions);
                failed = true;
            }
        }
    }
    if failed {
        assert!(covered < olen);
    } else {
        assert_eq!(covered, olen, "well-formed options cover the option area exactly");
    }

    match GeneveRepr::parse(&p) {
        Ok(r) => {
            assert_eq!(p.version(), 0);
            assert_eq!(
                (r.vni, r.protocol, r.options_len, r.oam, r.critical),
                (p.vni(), p.protocol(), olen, p.oam(), p.critical())
            );
            let mut out = vec![0u8; geneve::HEADER_LEN + olen];
            r.emit(&mut out);
            assert_eq!(GeneveRepr::parse(&GenevePacket::new_checked(&out[..]).expect("fits")), Ok(r));
        }
        Err(e) => assert_eq!((e, p.version() != 0), (DropReason::GeneveBadVersion, true)),
    }
}

/// An option the iterator produced emits and parses back to itself.
fn check_geneve_option_round_trip(o: &GeneveOption<'_>) {
    let mut out = vec![0u8; geneve::HEADER_LEN + o.wire_len()];
    let header =
        GeneveRepr { vni: VNI, protocol: ethertype::TEB, options_len: o.wire_len(), oam: false, critical: false };
    header.emit(&mut out);
    o.emit(&mut out[geneve::HEADER_LEN..]);
    let p = GenevePacket::new_checked(&out[..]).expect("one option fits");
    let mut it = p.options();
    assert_eq!(it.next(), Some(Ok(*o)));
    assert_eq!(it.next(), None);
}

/// [`flow::classify`]: deterministic, and its result consistent with itself.
pub fn check_classify(b: &[u8]) {
    let r = flow::classify(b);
    assert_eq!(r, flow::classify(b), "classification is deterministic");
    let Ok(info) = r else { return };
    assert!(info.l3_offset == 14 || info.l3_offset == 18);
    assert!(info.l3_offset <= b.len());
    assert!(flow::source_port(info.hash) >= 49152);
    match info.l3 {
        L3::Ipv4 => assert!(matches!((info.src, info.dst), (Some(IpAddr::V4(_)), Some(IpAddr::V4(_))))),
        L3::Ipv6 => assert!(matches!((info.src, info.dst), (Some(IpAddr::V6(_)), Some(IpAddr::V6(_))))),
        L3::Other(et) => {
            assert!(et != ethertype::IPV4 && et != ethertype::IPV6);
            assert_eq!((info.src, info.dst, info.tos, info.ports), (None, None, 0, (0, 0)));
        }
    }
}

/// [`offload::complete_checksum`]: changes at most the checksum field, only when it says so, and
/// is idempotent.
pub fn check_complete_checksum(b: &[u8]) {
    let mut copy = b.to_vec();
    match offload::complete_checksum(&mut copy) {
        Ok(ChecksumFix::Completed) => {
            let changed: Vec<usize> = (0..b.len()).filter(|&i| copy[i] != b[i]).collect();
            assert!(changed.len() <= 2 && changed.windows(2).all(|w| w[1] == w[0] + 1), "changed {changed:?}");
            // Completing a completed checksum recomputes the same value (or leaves it alone).
            let done = copy.clone();
            let again = offload::complete_checksum(&mut copy);
            assert!(matches!(again, Ok(ChecksumFix::Completed | ChecksumFix::AlreadyFinal)), "{again:?}");
            assert_eq!(copy, done, "completion is idempotent");
        }
        Ok(ChecksumFix::AlreadyFinal | ChecksumFix::NotApplicable) | Err(_) => {
            assert_eq!(copy, b, "a frame that is not completed is not modified");
        }
    }
}

/// [`icmp::build_error`] into an `out_len`-byte buffer: the result fits it, depends on its size only
/// through [`Suppressed::BufferTooSmall`], and is an error frame addressed back to the offender.
pub fn check_build_error(b: &[u8], error: IcmpError, from: &ErrorSource, out_len: usize) {
    // With a buffer of the documented maximum the outcome never depends on buffer size.
    let mut big = vec![0xa5u8; icmp::MAX_ERROR_FRAME_LEN];
    let r_big = icmp::build_error(error, b, from, &mut big);
    assert_ne!(r_big, Err(Suppressed::BufferTooSmall), "MAX_ERROR_FRAME_LEN is enough");

    let mut out = vec![0xa5u8; out_len];
    let r = icmp::build_error(error, b, from, &mut out);
    match (r_big, r) {
        (Ok(m), Ok(n)) => {
            assert!(n <= out_len && n == m);
            assert_eq!(out[..n], big[..n]);
        }
        (Ok(m), Err(e)) => assert!(e == Suppressed::BufferTooSmall && m > out_len, "{e:?} m {m} out {out_len}"),
        (Err(e_big), r) => assert_eq!(r, Err(e_big)),
    }
    match r {
        Ok(n) => check_error_frame(b, &out[..n], from),
        Err(_) => assert!(out.iter().all(|&x| x == 0xa5), "a suppressed error writes nothing"),
    }
    assert!(out[r.unwrap_or(0)..].iter().all(|&x| x == 0xa5), "nothing written past the returned length");
}

/// The error frame is addressed back to the offender and fits the RFC size limits.
fn check_error_frame(offending: &[u8], frame: &[u8], from: &ErrorSource) {
    let orig = EthernetFrame::new_checked(offending).expect("an error implies a parsable offender");
    let f = EthernetFrame::new_checked(frame).expect("error frame parses");
    assert_eq!((f.dst(), f.src(), f.vlan()), (orig.src(), from.mac, orig.vlan()));
    let ip = f.payload();
    match f.ethertype() {
        ethertype::IPV4 => {
            let p = Ipv4Packet::new_checked(ip).expect("error IPv4 header parses");
            assert!(p.verify_checksum());
            assert_eq!((usize::from(p.total_len()), p.protocol()), (ip.len(), protocol::ICMP));
            assert!(ip.len() <= icmp::ICMPV4_MAX_LEN);
            assert_eq!(Some(p.src()), from.ipv4);
        }
        ethertype::IPV6 => {
            let p = Ipv6Packet::new_checked(ip).expect("error IPv6 header parses");
            let len = ipv6::HEADER_LEN + usize::from(p.payload_len());
            assert_eq!((len, p.next_header()), (ip.len(), protocol::ICMPV6));
            assert!(ip.len() <= icmp::ICMPV6_MAX_LEN);
            assert_eq!(Some(p.src()), from.ipv6);
        }
        other => panic!("error frame with EtherType {other:#06x}"),
    }
}

/// The gateway an error comes from; `v4`/`v6` say whether it has an address in that family.
pub fn error_source(v4: bool, v6: bool) -> ErrorSource {
    ErrorSource {
        mac: MacAddr([2, 0, 0, 0, 0, 0xfe]),
        ipv4: v4.then_some(Ipv4Addr::new(10, 244, 1, 1)),
        ipv6: v6.then_some(Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 1)),
    }
}

/// Every decap configuration the checks use: both kinds, each family's local address and both,
/// with and without UDP checksum verification. Twelve in all.
pub fn decap_configs() -> Vec<DecapConfig> {
    let mut out = Vec::new();
    for kind in [TunnelKind::Vxlan, TunnelKind::Geneve] {
        for (v4, v6) in [(true, false), (false, true), (true, true)] {
            for verify in [false, true] {
                let mut cfg = DecapConfig::new(kind, VNI, IpAddr::V4(LOCAL_V4));
                cfg.local_v4 = v4.then_some(LOCAL_V4);
                cfg.local_v6 = v6.then_some(LOCAL_V6);
                cfg.verify_udp_checksum = verify;
                out.push(cfg);
            }
        }
    }
    out
}

/// Decapsulate `frame` placed in a buffer with junk head- and tailroom, and check that success
/// leaves an Ethernet-sized inner frame inside the original one, touching nothing but the inner
/// IP header's ECN field (and IPv4 checksum), and that failure touches nothing at all. Returns the
/// inner frame.
///
/// # Errors
/// The [`DropReason`] decap returned.
pub fn check_decap(cfg: &DecapConfig, frame: &[u8], headroom: usize, tailroom: usize) -> Result<Vec<u8>, DropReason> {
    let mut buf: Vec<u8> = (0..headroom).map(|i| i as u8).collect();
    buf.extend_from_slice(frame);
    buf.extend((0..tailroom).map(|i| !(i as u8)));
    let before = buf.clone();
    let mut fb = FrameBuf::new(&mut buf, headroom, frame.len()).expect("sized to fit");
    let r = decap(cfg, &mut fb);
    let (start, len) = (fb.start(), fb.len());
    match r {
        Ok(d) => {
            assert!(len >= ethernet::HEADER_LEN, "inner frame of {len} bytes");
            assert!(start >= headroom && start + len <= headroom + frame.len(), "inner frame outside the outer one");
            assert_eq!(d.vni, cfg.vni);
            match d.outer_src {
                IpAddr::V4(_) => assert!(cfg.local_v4.is_some()),
                IpAddr::V6(_) => assert!(cfg.local_v6.is_some()),
            }
            let changed: Vec<usize> = (0..buf.len()).filter(|&i| buf[i] != before[i]).collect();
            // Inner ECN lives in the first two bytes of the IP header and the IPv4 checksum at
            // 10..12: at most 3 bytes, all within a tagged Ethernet header plus 12.
            assert!(changed.len() <= 3, "decap changed {changed:?}");
            assert!(changed.iter().all(|&i| i >= start && i < start + (18 + 12).min(len)), "decap changed {changed:?}");
            Ok(buf[start..start + len].to_vec())
        }
        Err(e) => {
            assert_eq!((start, len), (headroom, frame.len()), "a failed decap leaves the frame where it was");
            assert!(buf == before, "a failed decap ({e:?}) modifies nothing");
            Err(e)
        }
    }
}

/// [`check_decap`] under every configuration of [`decap_configs`].
pub fn check_all_decaps(b: &[u8], headroom: usize, tailroom: usize) {
    for cfg in decap_configs() {
        let _ = check_decap(&cfg, b, headroom, tailroom);
    }
}

/// Encapsulate `inner` with `headroom` bytes in front, check the result, and decapsulate it again
/// (`critical`: the template carries a critical Geneve option, which ferry's own decap refuses).
pub fn check_encap(tpl: &TunnelTemplate, critical: bool, inner: &[u8], headroom: usize) {
    let tail = 7;
    let mut buf = vec![0x5au8; headroom + inner.len() + tail];
    buf[headroom..headroom + inner.len()].copy_from_slice(inner);
    let before = buf.clone();
    let mut fb = FrameBuf::new(&mut buf, headroom, inner.len()).expect("sized to fit");
    let r = encap(tpl, &mut fb);
    let (start, len) = (fb.start(), fb.len());
    let oh = tpl.overhead();
    match r {
        Ok(()) => {
            assert!(flow::classify(inner).is_ok());
            assert_eq!((start, len), (headroom - oh, inner.len() + oh));
            assert_eq!(&buf[start + oh..start + len], inner, "encap leaves the inner frame alone");
            assert_eq!(buf[start + len..], before[start + len..]);
            let outer = buf[start..start + len].to_vec();
            // What ferry sends, ferry accepts: with checksum verification, from any headroom.
            let mut cfg = DecapConfig::new(tpl.kind(), tpl.vni(), tpl.remote());
            cfg.verify_udp_checksum = true;
            // Templates may send zero checksums over IPv6; a receiver of those enables them.
            cfg.accept_ipv6_zero_udp_checksum = true;
            match check_decap(&cfg, &outer, 3, 5) {
                Ok(back) => {
                    assert!(!critical);
                    assert_eq!(back, inner, "decap(encap(inner)) == inner");
                }
                Err(e) => assert!(critical && e == DropReason::GeneveUnknownCritical, "own frame dropped: {e:?}"),
            }
        }
        Err(e) => {
            assert_eq!((start, len), (headroom, inner.len()));
            assert!(buf == before, "a failed encap ({e:?}) modifies nothing");
            match flow::classify(inner) {
                Err(c) => assert_eq!(e, c),
                Ok(_) => assert!(e == DropReason::NoHeadroom && headroom < oh, "{e:?} with headroom {headroom}"),
            }
        }
    }
}

/// Every byte parser and in-place rewriter (not decap, which needs a configuration), on `b`.
pub fn check_parsers(b: &[u8]) {
    check_ethernet(b);
    check_ipv4(b);
    check_ipv6(b);
    check_udp(b);
    check_tcp(b);
    check_vxlan(b);
    check_geneve(b);
    check_classify(b);
    check_complete_checksum(b);
}

/// [`gso::Segmenter`] on a frame described by a virtio-net header, both from a tap: the first
/// [`virtio_net::HEADER_LEN`] bytes are the header, the rest the frame. Segments fit the lengths
/// the segmenter announces, carry valid IP lengths and (completed) valid L4 checksums, partial ones
/// complete to the same bytes, and coalescing them loses nothing.
pub fn check_segment(b: &[u8]) {
    let Ok(vnet) = VirtioNetHdr::parse(b) else { return };
    let frame = &b[virtio_net::HEADER_LEN..];
    let Ok(s) = Segmenter::new(frame, &vnet) else { return };
    let n = s.segments();
    assert!(n >= 1 && s.segment_len(n) == 0);
    assert_eq!(s.is_gso(), n > 1);
    let mut out = vec![0u8; s.max_segment_len()];
    let mut partial = vec![0u8; s.max_segment_len()];
    let mut segments = Vec::with_capacity(n.min(64));
    // Inputs are small; a 1-byte MSS can still make thousands of segments, so check the first 64.
    for i in 0..n.min(64) {
        let len = s.write_segment(i, &mut out, Checksum::Complete).expect("max_segment_len is enough");
        assert_eq!(len, s.segment_len(i));
        assert!(len <= s.max_segment_len());
        if s.is_gso() {
            assert!(len > s.header_len() && len - s.header_len() <= s.mss());
            let info = flow::classify(&out[..len]).expect("a segment classifies");
            let (start, end) = info.l4.expect("a segment is not a fragment");
            assert_eq!(end, len, "IP length covers the segment exactly");
            assert_eq!(start, usize::from(vnet.csum_start));
            let seg = &out[start..end];
            let pseudo = match (info.src, info.dst) {
                (Some(IpAddr::V4(a)), Some(IpAddr::V4(d))) => {
                    checksum::pseudo_v4(a, d, info.protocol, seg.len() as u16)
                }
                (Some(IpAddr::V6(a)), Some(IpAddr::V6(d))) => {
                    checksum::pseudo_v6(a, d, info.protocol, seg.len() as u32)
                }
                other => panic!("segment addresses {other:?}"),
            };
            assert!(checksum::verifies(pseudo, seg), "segment {i} L4 checksum");
            if info.l3 == L3::Ipv4 {
                let ip = Ipv4Packet::new_checked(&out[info.l3_offset..len]).expect("parses");
                assert!(ip.verify_checksum());
            }
            let plen = s.write_segment(i, &mut partial, Checksum::Partial).expect("same length");
            assert_eq!(plen, len);
            let _ = offload::complete_checksum(&mut partial[..plen]);
            assert_eq!(partial[..plen], out[..len], "partial segment {i} completes to the complete one");
        }
        segments.push(out[..len].to_vec());
    }
    check_coalesce_frames(&segments);
}

/// [`gro::Coalescer`] on frames packed as `[len_hi, len_lo, bytes...]*`.
pub fn check_coalesce(b: &[u8]) {
    let mut frames = Vec::new();
    let mut rest = b;
    while let [hi, lo, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        frames.push(tail[..n].to_vec());
        rest = &tail[n..];
    }
    check_coalesce_frames(&frames);
}

/// Coalesce `frames` with two flow slots: every frame comes out exactly once (counted in
/// [`gro::Output::segments`]), a super-packet segments back into that many segments whose L4
/// payloads concatenate to its own, and nothing stays held after a flush.
pub fn check_coalesce_frames(frames: &[Vec<u8>]) {
    let mut c = Coalescer::new(vec![0u8; gro::storage_len(2)]).expect("room for two flows");
    let mut total = 0usize;
    let mut emit = |o: gro::Output<'_>| {
        total += usize::from(o.segments);
        if o.vnet.gso == Gso::None {
            assert_eq!(o.segments, 1);
            assert!(!o.vnet.needs_csum);
            return;
        }
        assert!(o.segments >= 2 && o.vnet.needs_csum);
        assert!(o.frame.len() <= gro::SLOT_LEN);
        let s = Segmenter::new(o.frame, &o.vnet).expect("a coalesced packet segments");
        assert_eq!(s.segments(), usize::from(o.segments));
        assert_eq!(s.mss(), usize::from(o.vnet.gso_size));
    };
    for f in frames {
        c.push(f, &mut emit);
    }
    c.flush(&mut emit);
    assert_eq!(total, frames.len(), "every frame leaves exactly once");
    assert_eq!(c.held(), 0);
    let st = c.stats();
    assert_eq!(st.frames_in, frames.len() as u64);
    assert_eq!(st.single + st.merged + st.super_packets, frames.len() as u64);
}
