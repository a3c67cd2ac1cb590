//! Property tests for the wire-facing contract of ferry-encap: bytes from the wire never make a
//! parser, an accessor or a hot-path function panic, and the invariants that are cheap to state
//! hold on every input.
//!
//! Two kinds of input drive every entry point. Arbitrary byte vectors mostly stop at the first
//! length check, so the second kind starts from a valid VXLAN or Geneve frame, built by ferry's own
//! `encap` around a realistic inner frame, and then overwrites or truncates a few bytes: those reach
//! the deep paths (option walks, extension-header walks, inner ECN, checksum verification). The
//! parsers are also run at each header's offset inside such frames, so that each one sees a
//! nearly valid header of its own kind. The unmutated frames double as a round trip:
//! `decap(encap(inner)) == inner`, which also proves the generator really produces frames that get
//! past every check.
//!
//! The default proptest case count keeps this file well under a second in a debug build; set
//! `PROPTEST_CASES` for a longer run. Coverage-guided fuzzing of the same entry points lives in
//! `encap/fuzz`.

// The checks themselves are shared with the fuzz targets: one file, two drivers. `pub` because the
// file's items are the fuzz crate's public API; a private module would make each of them an
// `unreachable_pub` warning here.
#[path = "../fuzz/src/lib.rs"]
pub mod checks;

use std::net::IpAddr;

use checks::{LOCAL_V4, LOCAL_V6, REMOTE_V4, REMOTE_V6, VNI};
use etherparse::PacketBuilder;
use ferry_encap::checksum;
use ferry_encap::ecn::EcnMode;
use ferry_encap::flow::{self, L3};
use ferry_encap::icmp::{ErrorSource, IcmpError};
use ferry_encap::offload::{self, ChecksumFix};
use ferry_encap::wire::ethernet::ethertype;
use ferry_encap::wire::geneve::{self, GeneveOption};
use ferry_encap::wire::ipv4::{self, Ipv4Packet, protocol};
use ferry_encap::wire::ipv6::{self, Ipv6Packet};
use ferry_encap::wire::tcp;
use ferry_encap::wire::udp;
use ferry_encap::{
    DecapConfig, DropReason, Dscp, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, encap,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

const POD_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
const POD_MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];

// ---------------------------------------------------------------------------------------------
// Generators.
// ---------------------------------------------------------------------------------------------

/// The inner frames ferry carries: TCP, UDP and ICMP over IPv4 and IPv6, IPv6 behind extension
/// headers (one a fragment header), ARP, and any of them with an 802.1Q tag. Payloads are random or
/// one byte repeated: long runs of 0xff are what drives a checksum accumulator to its extremes.
fn inner_frame() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![vec(any::<u8>(), 0..300), (any::<u8>(), 0usize..300).prop_map(|(b, n)| vec![b; n])];
    (0u8..9, payload, any::<u8>(), any::<(u16, u16)>(), proptest::option::of(1u16..4095))
        .prop_map(|(kind, payload, tos, ports, vlan)| build_inner(kind, &payload, tos, ports, vlan))
}

fn build_inner(kind: u8, payload: &[u8], tos: u8, (sport, dport): (u16, u16), vlan: Option<u16>) -> Vec<u8> {
    let eth = || PacketBuilder::ethernet2(POD_MAC_A, POD_MAC_B);
    let (a4, b4) = ([10, 244, 1, 2], [10, 244, 2, 3]);
    let (a6, b6) = (
        [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2],
        [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3],
    );
    let mut out = Vec::new();
    let built = match kind {
        0 => eth().ipv4(a4, b4, 64).udp(sport, dport).write(&mut out, payload),
        1 => eth().ipv4(a4, b4, 64).tcp(sport, dport, 1, 4096).write(&mut out, payload),
        2 => eth().ipv4(a4, b4, 64).icmpv4_echo_request(sport, dport).write(&mut out, payload),
        3 | 6 | 7 => eth().ipv6(a6, b6, 64).udp(sport, dport).write(&mut out, payload),
        4 => eth().ipv6(a6, b6, 64).tcp(sport, dport, 1, 4096).write(&mut out, payload),
        5 => eth().ipv6(a6, b6, 64).icmpv6_echo_request(sport, dport).write(&mut out, payload),
        _ => {
            out.extend_from_slice(&[0xff; 6]);
            out.extend_from_slice(&POD_MAC_A);
            out.extend_from_slice(&ethertype::ARP.to_be_bytes());
            out.extend_from_slice(&payload[..payload.len().min(28)]);
            out.resize(out.len().max(42), 0);
            Ok(())
        }
    };
    built.expect("etherparse builds the inner frame");
    match kind {
        0..=2 => {
            out[15] = tos;
            Ipv4Packet::new_unchecked(&mut out[14..]).fill_checksum();
        }
        3..=7 => {
            Ipv6Packet::new_unchecked(&mut out[14..]).set_traffic_class(tos);
            // 6: hop-by-hop options (PadN), 7: a first fragment. The UDP checksum covers neither.
            let ext: Option<[u8; 8]> = match kind {
                6 => Some([protocol::UDP, 0, 1, 4, 0, 0, 0, 0]),
                7 => Some([protocol::UDP, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]),
                _ => None,
            };
            if let Some(ext) = ext {
                let first = if kind == 6 { 0 } else { 44 };
                out[14 + 6] = first;
                let plen = u16::from_be_bytes([out[18], out[19]]) + 8;
                out[18..20].copy_from_slice(&plen.to_be_bytes());
                out.splice(54..54, ext);
            }
        }
        _ => {}
    }
    if let Some(id) = vlan {
        out.splice(12..12, [0x81, 0x00, (id >> 8) as u8, id as u8]);
    }
    out
}

/// `frame` as a pod's veth with checksum offload hands it over (CHECKSUM_PARTIAL): the L4 checksum
/// field holds the folded pseudo-header sum, or zero for ICMPv4. `None` for frames without an L4
/// checksum that ferry completes (non-IP, fragments).
fn make_partial(frame: &[u8]) -> Option<Vec<u8>> {
    let info = flow::classify(frame).ok()?;
    let l3 = info.l3_offset;
    let (l4, end, addrs) = match info.l3 {
        L3::Ipv4 => {
            let ip = Ipv4Packet::new_checked(&frame[l3..]).ok()?;
            let addrs = checksum::sum(&ip.src().octets()) + checksum::sum(&ip.dst().octets());
            (!ip.is_fragment()).then_some((l3 + ip.header_len(), l3 + usize::from(ip.total_len()), addrs))?
        }
        L3::Ipv6 => {
            let ip = Ipv6Packet::new_checked(&frame[l3..]).ok()?;
            let ul = ip.upper_layer().ok()?;
            let addrs = checksum::sum(&ip.src().octets()) + checksum::sum(&ip.dst().octets());
            let end = l3 + ipv6::HEADER_LEN + usize::from(ip.payload_len());
            (!ul.fragmented).then_some((l3 + ul.offset, end, addrs))?
        }
        L3::Other(_) => return None,
    };
    let folded = !checksum::finish_sum(addrs + u32::from(info.protocol) + (end - l4) as u32);
    let (at, value) = match (info.l3, info.protocol) {
        (L3::Ipv4, protocol::ICMP) => (2, 0),
        (L3::Ipv6, protocol::ICMPV6) => (2, folded),
        (_, protocol::TCP) => (tcp::CHECKSUM_OFFSET, folded),
        (_, protocol::UDP) => (6, folded),
        _ => return None,
    };
    let mut out = frame.to_vec();
    out.get_mut(l4 + at..(l4 + at + 2).min(end))?.copy_from_slice(&value.to_be_bytes());
    Some(out)
}

/// How to build the outer headers of a generated tunnel frame.
#[derive(Debug, Clone)]
struct Outer {
    kind: TunnelKind,
    v6: bool,
    vlan: Option<u16>,
    options: Vec<(u16, u8, Vec<u8>)>,
    dscp: Option<u8>,
    compat_ecn: bool,
    zero_udp_checksum: bool,
}

impl Outer {
    fn has_critical_option(&self) -> bool {
        self.kind == TunnelKind::Geneve && self.options.iter().any(|o| o.1 & geneve::OPTION_CRITICAL != 0)
    }
}

fn outer() -> impl Strategy<Value = Outer> {
    let option = (any::<u16>(), any::<u8>(), 0usize..5)
        .prop_flat_map(|(c, k, words)| vec(any::<u8>(), words * 4).prop_map(move |data| (c, k, data)));
    (
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(1u16..4095),
        vec(option, 0..4),
        proptest::option::of(0u8..64),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(geneve, v6, vlan, options, dscp, compat_ecn, zero_udp_checksum)| Outer {
            kind: if geneve { TunnelKind::Geneve } else { TunnelKind::Vxlan },
            v6,
            vlan,
            options,
            dscp,
            compat_ecn,
            zero_udp_checksum,
        })
}

fn template(o: &Outer) -> TunnelTemplate {
    let opts: Vec<GeneveOption<'_>> =
        o.options.iter().map(|(class, kind, data)| GeneveOption { class: *class, kind: *kind, data }).collect();
    let (src, dst) = if o.v6 {
        (IpAddr::V6(REMOTE_V6), IpAddr::V6(LOCAL_V6))
    } else {
        (IpAddr::V4(REMOTE_V4), IpAddr::V4(LOCAL_V4))
    };
    let mut p = TemplateParams::new(o.kind, VNI, MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), src, dst);
    p.vlan = o.vlan;
    p.dscp = o.dscp.map_or(Dscp::Inherit, Dscp::Fixed);
    p.ecn = if o.compat_ecn { EcnMode::Compatibility } else { EcnMode::Normal };
    p.ipv6_zero_udp_checksum = o.zero_udp_checksum;
    p.geneve_options = &opts;
    TunnelTemplate::new(&p).expect("generated parameters are valid")
}

/// A tunnel frame as ferry sends it, with the inner frame it carries and the offsets of each of
/// its headers (outer L3, UDP, tunnel header, inner frame).
#[derive(Debug, Clone)]
struct TunnelFrame {
    outer: Outer,
    inner: Vec<u8>,
    bytes: Vec<u8>,
    offsets: [usize; 4],
}

fn tunnel_frame() -> impl Strategy<Value = TunnelFrame> {
    (outer(), inner_frame()).prop_map(|(outer, inner)| {
        let tpl = template(&outer);
        let oh = tpl.overhead();
        let mut buf = vec![0u8; oh + inner.len()];
        buf[oh..].copy_from_slice(&inner);
        let mut fb = FrameBuf::new(&mut buf, oh, inner.len()).expect("sized to fit");
        encap(&tpl, &mut fb).expect("generated inner frames encapsulate");
        let l3 = oh - tpl.ip_overhead();
        let l4 = l3 + if outer.v6 { ipv6::HEADER_LEN } else { ipv4::HEADER_LEN };
        TunnelFrame { outer, inner, bytes: buf, offsets: [l3, l4, l4 + udp::HEADER_LEN, oh] }
    })
}

/// A few byte overwrites, half of them aimed at the headers, and an optional truncation.
#[derive(Debug, Clone)]
struct Mutation {
    writes: Vec<(bool, Index, u8)>,
    truncate: Option<Index>,
    /// Recompute the outer IPv4 header checksum afterwards, so that the mutated frame gets past
    /// that check and on to the UDP and tunnel headers.
    fix_ipv4_checksum: bool,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        vec((any::<bool>(), any::<Index>(), any::<u8>()), 0..6),
        proptest::option::weighted(0.3, any::<Index>()),
        any::<bool>(),
    )
        .prop_map(|(writes, truncate, fix_ipv4_checksum)| Mutation { writes, truncate, fix_ipv4_checksum })
}

fn mutate(frame: &TunnelFrame, m: &Mutation) -> Vec<u8> {
    let mut b = frame.bytes.clone();
    for (head, at, value) in &m.writes {
        let span = if *head { b.len().min(frame.offsets[3] + 60) } else { b.len() };
        if span > 0 {
            b[at.index(span)] = *value;
        }
    }
    if let Some(at) = &m.truncate {
        b.truncate(at.index(b.len() + 1));
    }
    let l3 = frame.offsets[0].min(b.len());
    if m.fix_ipv4_checksum
        && !frame.outer.v6
        && let Ok(mut ip) = Ipv4Packet::new_checked(&mut b[l3..])
    {
        ip.fill_checksum();
    }
    b
}

fn error_source() -> impl Strategy<Value = ErrorSource> {
    (any::<bool>(), any::<bool>()).prop_map(|(v4, v6)| checks::error_source(v4, v6))
}

fn icmp_error() -> impl Strategy<Value = IcmpError> {
    prop_oneof![any::<u16>().prop_map(|mtu| IcmpError::TooBig { mtu }), Just(IcmpError::TimeExceeded)]
}

// ---------------------------------------------------------------------------------------------
// The properties.
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..2000),
        headroom in 0usize..64,
        tailroom in 0usize..64,
    ) {
        checks::check_parsers(&bytes);
        checks::check_all_decaps(&bytes, headroom, tailroom);
    }

    #[test]
    fn segmentation_and_coalescing_never_panic(
        inner in inner_frame(),
        gso in prop_oneof![Just(0u8), Just(1), Just(4), Just(5), Just(0x81), any::<u8>()],
        flags in prop_oneof![Just(1u8), any::<u8>()],
        gso_size in prop_oneof![1u16..100, any::<u16>()],
        csum_start in any::<Option<u16>>(),
        writes in vec((any::<Index>(), any::<u8>()), 0..3),
        stream in vec(inner_frame(), 0..8),
    ) {
        // A header that mostly points at the frame's own L4 checksum, so segmentation gets going.
        let info = flow::classify(&inner).ok();
        let l4 = info.and_then(|i| i.l4).map_or(34, |(s, _)| s) as u16;
        let off: u16 = if info.is_some_and(|i| i.protocol == protocol::UDP) { 6 } else { 16 };
        let mut b = vec![flags, gso];
        b.extend(0u16.to_le_bytes());
        b.extend(gso_size.to_le_bytes());
        b.extend(csum_start.unwrap_or(l4).to_le_bytes());
        b.extend(off.to_le_bytes());
        b.extend(0u16.to_le_bytes());
        b.extend(&inner);
        for (at, v) in &writes {
            let i = at.index(b.len());
            b[i] = *v;
        }
        checks::check_segment(&b);
        let mut packed = Vec::new();
        for f in stream.iter().chain([&inner]) {
            packed.extend((f.len() as u16).to_be_bytes());
            packed.extend(f);
        }
        checks::check_coalesce(&packed);
        checks::check_coalesce(&b);
    }

    #[test]
    fn unmutated_tunnel_frames_decap_to_their_inner_frame(f in tunnel_frame(), verify in any::<bool>()) {
        let local = if f.outer.v6 { IpAddr::V6(LOCAL_V6) } else { IpAddr::V4(LOCAL_V4) };
        let mut cfg = DecapConfig::new(f.outer.kind, VNI, local);
        cfg.verify_udp_checksum = verify;
        // Some generated frames carry a zero checksum over IPv6; their receiver enables those.
        cfg.accept_ipv6_zero_udp_checksum = true;
        let critical = f.outer.has_critical_option();
        match checks::check_decap(&cfg, &f.bytes, 11, 13) {
            Ok(inner) => {
                prop_assert!(!critical);
                prop_assert_eq!(&inner, &f.inner);
            }
            Err(e) => prop_assert!(critical && e == DropReason::GeneveUnknownCritical, "{:?}", e),
        }
        checks::check_parsers(&f.bytes);
        checks::check_parsers(&f.inner);
    }

    #[test]
    fn mutated_tunnel_frames_never_panic(
        f in tunnel_frame(),
        m in mutation(),
        headroom in 0usize..64,
        tailroom in 0usize..64,
    ) {
        let b = mutate(&f, &m);
        checks::check_parsers(&b);
        // Each parser also sees the bytes where its own kind of header was.
        for off in f.offsets {
            checks::check_parsers(&b[off.min(b.len())..]);
        }
        checks::check_all_decaps(&b, headroom, tailroom);
    }

    #[test]
    fn encap_of_arbitrary_inner_frames(
        inner in prop_oneof![vec(any::<u8>(), 0..2000), inner_frame()],
        writes in vec((any::<Index>(), any::<u8>()), 0..4),
        o in outer(),
        headroom in 0usize..200,
    ) {
        let mut inner = inner;
        for (at, v) in writes {
            if !inner.is_empty() {
                let i = at.index(inner.len().min(80));
                inner[i] = v;
            }
        }
        checks::check_encap(&template(&o), o.has_critical_option(), &inner, headroom);
    }

    #[test]
    fn build_error_never_panics(
        offending in prop_oneof![
            vec(any::<u8>(), 0..2000),
            inner_frame(),
            (inner_frame(), vec((any::<Index>(), any::<u8>()), 1..4)).prop_map(|(mut f, writes)| {
                for (at, v) in writes {
                    let i = at.index(f.len().min(80));
                    f[i] = v;
                }
                f
            }),
        ],
        error in icmp_error(),
        from in error_source(),
        out_len in 0usize..1400,
    ) {
        checks::check_build_error(&offending, error, &from, out_len);
    }

    #[test]
    fn partial_checksums_are_completed(inner in inner_frame(), writes in vec((any::<Index>(), any::<u8>()), 1..4)) {
        let Some(partial) = make_partial(&inner) else { return Ok(()) };
        let mut done = partial.clone();
        prop_assert_eq!(offload::complete_checksum(&mut done), Ok(ChecksumFix::Completed));
        prop_assert_eq!(&done, &inner, "completion restores the checksum etherparse computed");
        checks::check_parsers(&partial);
        // A partial frame with a damaged header or payload still must not panic anything.
        let mut damaged = partial;
        for (at, v) in writes {
            let i = at.index(damaged.len());
            damaged[i] = v;
        }
        checks::check_parsers(&damaged);
    }
}

#[test]
fn generated_inner_frames_are_classified_as_built() {
    // The generator is only useful if its frames are what it claims; spot-check each kind.
    for kind in 0..9 {
        for vlan in [None, Some(100)] {
            let f = build_inner(kind, b"payload!", 0x02, (1234, 80), vlan);
            let info = flow::classify(&f).expect("generated frames classify");
            let want = match kind {
                0..=2 => L3::Ipv4,
                3..=7 => L3::Ipv6,
                _ => L3::Other(ethertype::ARP),
            };
            assert_eq!(info.l3, want, "kind {kind}");
            assert_eq!(info.l3_offset, if vlan.is_some() { 18 } else { 14 });
            if matches!(kind, 0 | 1 | 3 | 4 | 6) {
                assert_eq!(info.ports, (1234, 80), "kind {kind}");
            }
            if kind == 7 {
                assert_eq!(info.ports, (0, 0), "a fragment's ports are not read");
            }
        }
    }
}
