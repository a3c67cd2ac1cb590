//! Writes the seed corpus under `encap/fuzz/corpus/<target>/` (test tooling, not shipped).
//!
//! ```sh
//! cargo run --manifest-path encap/fuzz/Cargo.toml --example gen_corpus
//! ```
//!
//! Every seed is built here, deterministically: inner frames with etherparse (TCP, UDP and ICMP over
//! IPv4 and IPv6, IPv6 behind extension headers, IPv4 options, a tagged frame, ARP, frames with a
//! CHECKSUM_PARTIAL checksum) and tunnel frames around them with ferry's own `encap` (VXLAN and
//! Geneve over IPv4 and IPv6, Geneve options, a critical option, an outer VLAN tag, an outer CE
//! mark). Each target gets the slice of those frames its parser starts at, with the selector bytes
//! its input format puts in front (see each file in `fuzz_targets/`). The generator owns the seed
//! directories: it empties each one before writing, so the committed corpus is exactly its output.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use etherparse::PacketBuilder;
use ferry_encap::gso::{Checksum, Segmenter};
use ferry_encap::offload::ChecksumFix;
use ferry_encap::wire::ethernet::EthernetFrame;
use ferry_encap::wire::geneve::GeneveOption;
use ferry_encap::wire::ipv4::{Ipv4Packet, protocol};
use ferry_encap::wire::ipv6::Ipv6Packet;
use ferry_encap::wire::virtio_net::{Gso, VirtioNetHdr};
use ferry_encap::{DropReason, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, checksum, ecn, encap};
use ferry_encap_fuzz::{LOCAL_V4, LOCAL_V6, REMOTE_V4, REMOTE_V6, VNI, decap_configs};

const POD_A: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
const POD_B: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
const IP4_A: [u8; 4] = [10, 244, 1, 2];
const IP4_B: [u8; 4] = [10, 244, 2, 3];
const IP6_A: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2];
const IP6_B: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3];

type Frame = (&'static str, Vec<u8>);

fn main() -> std::io::Result<()> {
    let inner = inner_frames();
    let tunnels = tunnel_frames(&inner);
    check_seeds(&inner, &tunnels);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut targets: Vec<(&str, Vec<Frame>)> = Vec::new();

    let pick = |names: &[&str]| -> Vec<Frame> { inner.iter().filter(|(n, _)| names.contains(n)).cloned().collect() };
    let inner_l3 = |names: &[&str]| -> Vec<Frame> {
        pick(names)
            .into_iter()
            .map(|(n, f)| (n, f[EthernetFrame::new_checked(&f[..]).map_or(0, |e| e.header_len())..].to_vec()))
            .collect()
    };
    let inner_l4 = |names: &[&str]| -> Vec<Frame> {
        pick(names).into_iter().map(|(n, f)| (n, f[l4_offset(&f)..].to_vec())).collect()
    };
    let tunnel_at = |kind: Option<TunnelKind>, layer: usize| -> Vec<Frame> {
        tunnels
            .iter()
            .filter(|t| kind.is_none_or(|k| k == t.kind))
            .map(|t| (t.name, t.bytes[t.offsets[layer]..].to_vec()))
            .collect()
    };

    targets.push((
        "decap",
        tunnels
            .iter()
            .map(|t| {
                let mut input = vec![decap_selector(t.kind, t.v6, t.verify)];
                input.extend_from_slice(&t.bytes);
                (t.name, input)
            })
            .collect(),
    ));
    targets.push(("encap", encap_seeds(&inner)));
    let mut eth = tunnel_at(None, 0);
    eth.extend(pick(&["tcp4-tagged", "arp", "udp6-hop-by-hop"]));
    targets.push(("ethernet", eth));
    let mut v4 =
        tunnel_at(None, 1).into_iter().filter(|(_, b)| b.first().is_some_and(|v| v >> 4 == 4)).collect::<Vec<_>>();
    v4.extend(inner_l3(&["tcp4", "udp4-ip-options", "udp4-first-fragment", "icmp4"]));
    targets.push(("ipv4", v4));
    let mut v6 =
        tunnel_at(None, 1).into_iter().filter(|(_, b)| b.first().is_some_and(|v| v >> 4 == 6)).collect::<Vec<_>>();
    v6.extend(inner_l3(&["tcp6", "udp6-hop-by-hop", "udp6-dest-opts-routing", "udp6-fragment", "icmp6"]));
    targets.push(("ipv6", v6));
    let mut udp = tunnel_at(None, 2);
    udp.truncate(3);
    udp.extend(inner_l4(&["udp4", "udp6-hop-by-hop"]));
    targets.push(("udp", udp));
    targets.push(("tcp", inner_l4(&["tcp4", "tcp6", "tcp4-partial"])));
    targets.push(("vxlan", tunnel_at(Some(TunnelKind::Vxlan), 3)));
    targets.push(("geneve", tunnel_at(Some(TunnelKind::Geneve), 3)));
    targets.push(("classify", inner.clone()));
    targets.push(("complete_checksum", inner.clone()));
    targets.push(("build_error", build_error_seeds(&inner)));
    let (segment, coalesce) = gso_seeds();
    targets.push(("segment", segment));
    targets.push(("coalesce", coalesce));

    for (target, seeds) in &targets {
        let dir = root.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}

/// The inner frames a pod sends, by name.
fn inner_frames() -> Vec<Frame> {
    let eth = || PacketBuilder::ethernet2(POD_A, POD_B);
    let build = |b: Result<(), etherparse::err::packet::BuildWriteError>, out: Vec<u8>| {
        b.expect("etherparse builds the seed");
        out
    };
    let mut f = Vec::new();
    let mut out = Vec::new();
    f.push(("udp4", build(eth().ipv4(IP4_A, IP4_B, 64).udp(40000, 53).write(&mut out, b"seed udp4"), out)));
    let mut out = Vec::new();
    let tcp4 = build(eth().ipv4(IP4_A, IP4_B, 64).tcp(40001, 80, 7, 64000).write(&mut out, b"GET / HTTP/1.1\r\n"), out);
    f.push(("tcp4", tcp4.clone()));
    let mut out = Vec::new();
    f.push(("icmp4", build(eth().ipv4(IP4_A, IP4_B, 64).icmpv4_echo_request(1, 2).write(&mut out, b"ping"), out)));
    let mut out = Vec::new();
    let udp6 = build(eth().ipv6(IP6_A, IP6_B, 64).udp(40002, 53).write(&mut out, b"seed udp6"), out);
    f.push(("udp6", udp6.clone()));
    let mut out = Vec::new();
    f.push((
        "tcp6",
        build(eth().ipv6(IP6_A, IP6_B, 64).tcp(40003, 443, 9, 64000).write(&mut out, b"\x16\x03\x01"), out),
    ));
    let mut out = Vec::new();
    f.push(("icmp6", build(eth().ipv6(IP6_A, IP6_B, 64).icmpv6_echo_request(3, 4).write(&mut out, b"ping6"), out)));

    // IPv6 behind extension headers. The UDP checksum covers none of them, so it stays valid.
    let hop_by_hop = (0, [0, 0, 1, 4, 0, 0, 0, 0]); // PadN of 4 bytes
    let dest_opts = (60, [0, 0, 1, 4, 0, 0, 0, 0]);
    let routing = (43, [0, 0, 4, 0, 0, 0, 0, 0]); // segment routing type, nothing left
    let first_fragment = (44, [0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]); // offset 0, more fragments
    f.push(("udp6-hop-by-hop", with_ipv6_exts(&udp6, &[hop_by_hop])));
    f.push(("udp6-dest-opts-routing", with_ipv6_exts(&udp6, &[hop_by_hop, dest_opts, routing])));
    f.push(("udp6-fragment", with_ipv6_exts(&udp6, &[first_fragment])));

    let mut tagged = tcp4.clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 100]);
    f.push(("tcp4-tagged", tagged));
    f.push(("udp4-ip-options", with_ipv4_options(&f[0].1)));
    let mut frag = f[0].1.clone();
    frag[14 + 6] = 0x20; // more fragments, offset 0
    Ipv4Packet::new_unchecked(&mut frag[14..]).fill_checksum();
    f.push(("udp4-first-fragment", frag));

    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&POD_A);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    arp.extend_from_slice(&POD_A);
    arp.extend_from_slice(&IP4_A);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&IP4_B);
    f.push(("arp", arp));

    // What a pod's veth with tx checksum offload hands over (see offload.rs).
    f.push(("tcp4-partial", partial(&tcp4)));
    f.push(("udp6-partial", partial(&udp6)));
    let mut icmp = f[2].1.clone();
    icmp[14 + 20 + 2..14 + 20 + 4].fill(0);
    f.push(("icmp4-partial", icmp));
    f
}

/// Seeds that do not reach the paths they are named after are no use: check the main ones.
fn check_seeds(inner: &[Frame], tunnels: &[Tunnel]) {
    for (name, f) in inner {
        let fix = ferry_encap::offload::complete_checksum(&mut f.clone());
        let want = if name.ends_with("-partial") {
            Ok(ChecksumFix::Completed)
        } else if *name == "arp" || name.ends_with("fragment") {
            Ok(ChecksumFix::NotApplicable)
        } else {
            Ok(ChecksumFix::AlreadyFinal)
        };
        assert_eq!(fix, want, "{name}");
    }
    for t in tunnels {
        let configs = decap_configs();
        let sel = usize::from(decap_selector(t.kind, t.v6, t.verify));
        let (cfg, headroom) = (&configs[sel % configs.len()], sel / configs.len() % 8);
        let r = ferry_encap_fuzz::check_decap(cfg, &t.bytes, headroom, 0);
        if t.name.contains("critical") {
            assert_eq!(r.err(), Some(DropReason::GeneveUnknownCritical), "{}", t.name);
        } else {
            let inner = r.unwrap_or_else(|e| panic!("{}: {e:?}", t.name));
            if t.name.contains("outer-ce") {
                assert_eq!(inner[15] & 0b11, ecn::CE, "outer CE reaches the inner header");
            }
        }
    }
}

/// Offset of the L4 header of a generated inner frame.
fn l4_offset(frame: &[u8]) -> usize {
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return 0 };
    let l3 = eth.header_len();
    if let Ok(ip) = Ipv4Packet::new_checked(&frame[l3..]) {
        return l3 + ip.header_len();
    }
    Ipv6Packet::new_checked(&frame[l3..]).ok().and_then(|ip| ip.upper_layer().ok()).map_or(l3, |ul| l3 + ul.offset)
}

/// Insert IPv6 extension headers `(protocol number, 8 bytes)` in order after the fixed header.
fn with_ipv6_exts(frame: &[u8], exts: &[(u8, [u8; 8])]) -> Vec<u8> {
    let mut out = frame[..54].to_vec();
    let upper = out[20];
    out[20] = exts[0].0;
    for (i, (_, ext)) in exts.iter().enumerate() {
        let mut ext = *ext;
        ext[0] = exts.get(i + 1).map_or(upper, |e| e.0);
        out.extend_from_slice(&ext);
    }
    out.extend_from_slice(&frame[54..]);
    let plen = u16::from_be_bytes([out[18], out[19]]) + 8 * exts.len() as u16;
    out[18..20].copy_from_slice(&plen.to_be_bytes());
    out
}

/// An IPv4 frame with one word of options (NOP NOP NOP EOL) added to its header.
fn with_ipv4_options(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..34].to_vec();
    out.extend_from_slice(&[1, 1, 1, 0]);
    out.extend_from_slice(&frame[34..]);
    out[14] = 0x46;
    let total = u16::from_be_bytes([out[16], out[17]]) + 4;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    Ipv4Packet::new_unchecked(&mut out[14..]).fill_checksum();
    out
}

/// The frame with its TCP/UDP checksum replaced by the folded pseudo-header sum, as Linux leaves it
/// under CHECKSUM_PARTIAL.
fn partial(frame: &[u8]) -> Vec<u8> {
    let info = ferry_encap::flow::classify(frame).expect("seed classifies");
    let l4 = l4_offset(frame);
    let addrs = match (info.src, info.dst) {
        (Some(IpAddr::V4(s)), Some(IpAddr::V4(d))) => checksum::sum(&s.octets()) + checksum::sum(&d.octets()),
        (Some(IpAddr::V6(s)), Some(IpAddr::V6(d))) => checksum::sum(&s.octets()) + checksum::sum(&d.octets()),
        _ => panic!("partial checksums are for IP frames"),
    };
    let at = l4 + if info.protocol == protocol::TCP { 16 } else { 6 };
    let folded = !checksum::finish_sum(addrs + u32::from(info.protocol) + (frame.len() - l4) as u32);
    let mut out = frame.to_vec();
    out[at..at + 2].copy_from_slice(&folded.to_be_bytes());
    out
}

/// A tunnel frame and the offsets of its outer Ethernet, IP, UDP and tunnel headers.
struct Tunnel {
    name: &'static str,
    kind: TunnelKind,
    v6: bool,
    verify: bool,
    bytes: Vec<u8>,
    offsets: [usize; 4],
}

fn tunnel_frames(inner: &[Frame]) -> Vec<Tunnel> {
    let get = |name: &str| inner.iter().find(|(n, _)| *n == name).map(|(_, f)| f.clone()).expect("named seed");
    let plain = [
        GeneveOption { class: 0x0102, kind: 0x05, data: &[1, 2, 3, 4] },
        GeneveOption { class: 0xffff, kind: 1, data: &[] },
    ];
    let critical = [GeneveOption { class: 0x0102, kind: 0x85, data: &[1, 2, 3, 4] }];
    let mut out = vec![
        tunnel("vxlan-v4-udp4", TunnelKind::Vxlan, false, None, &[], &get("udp4")),
        tunnel("vxlan-v6-tcp6", TunnelKind::Vxlan, true, None, &[], &get("tcp6")),
        tunnel("vxlan-v4-vlan-tcp4-tagged", TunnelKind::Vxlan, false, Some(100), &[], &get("tcp4-tagged")),
        tunnel("geneve-v4-options-icmp4", TunnelKind::Geneve, false, None, &plain, &get("icmp4")),
        tunnel("geneve-v6-udp6-hop-by-hop", TunnelKind::Geneve, true, None, &[], &get("udp6-hop-by-hop")),
        tunnel("geneve-v6-critical-option", TunnelKind::Geneve, true, None, &critical, &get("udp6")),
    ];
    // An underlay that marked congestion: outer CE over an ECT(0) inner packet, which decap must
    // carry into the inner header.
    let mut ect0 = get("tcp4");
    ect0[15] = ecn::ECT0;
    Ipv4Packet::new_unchecked(&mut ect0[14..]).fill_checksum();
    let mut ce = tunnel("vxlan-v4-outer-ce-inner-ect0", TunnelKind::Vxlan, false, None, &[], &ect0);
    let l3 = ce.offsets[1];
    let mut ip = Ipv4Packet::new_unchecked(&mut ce.bytes[l3..]);
    let tos = ip.tos();
    ip.set_tos_incremental(tos | ecn::CE);
    out.push(ce);
    out[0].verify = false;
    out
}

fn tunnel(
    name: &'static str,
    kind: TunnelKind,
    v6: bool,
    vlan: Option<u16>,
    options: &[GeneveOption<'_>],
    inner: &[u8],
) -> Tunnel {
    let (src, dst) =
        if v6 { (IpAddr::V6(REMOTE_V6), IpAddr::V6(LOCAL_V6)) } else { (IpAddr::V4(REMOTE_V4), IpAddr::V4(LOCAL_V4)) };
    let mut p = TemplateParams::new(kind, VNI, MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), src, dst);
    p.vlan = vlan;
    p.geneve_options = options;
    let tpl = TunnelTemplate::new(&p).expect("valid template");
    let oh = tpl.overhead();
    let mut bytes = vec![0u8; oh + inner.len()];
    bytes[oh..].copy_from_slice(inner);
    let mut fb = FrameBuf::new(&mut bytes, oh, inner.len()).expect("sized to fit");
    encap(&tpl, &mut fb).expect("seed encapsulates");
    let l3 = oh - tpl.ip_overhead();
    let l4 = l3 + if v6 { 40 } else { 20 };
    Tunnel { name, kind, v6, verify: true, bytes, offsets: [0, l3, l4, l4 + 8] }
}

/// The decap target's selector byte for the configuration that accepts this frame.
fn decap_selector(kind: TunnelKind, v6: bool, verify: bool) -> u8 {
    let configs = decap_configs();
    let i = configs
        .iter()
        .position(|c| {
            c.kind == kind
                && c.verify_udp_checksum == verify
                && c.local_v4.is_some() != v6
                && c.local_v6.is_some() == v6
        })
        .expect("a matching configuration");
    // Put the frame 5 bytes into its buffer (selector / 12 % 8 is the headroom).
    (i + 5 * configs.len()) as u8
}

/// Inner frames behind the encap target's template and headroom bytes.
fn encap_seeds(inner: &[Frame]) -> Vec<Frame> {
    // VXLAN/IPv4; Geneve/IPv6; Geneve/IPv4 tagged with options; Geneve/IPv6 with a critical option;
    // VXLAN/IPv6, ECN compatibility, zero UDP checksum, fixed DSCP.
    let selectors = [0x00, 0x03, 0x0d, 0x1b, 0xe2];
    inner
        .iter()
        .enumerate()
        .map(|(i, (name, f))| {
            // One frame without enough headroom, for the NoHeadroom path.
            let headroom = if *name == "arp" { 10 } else { 200 };
            let mut input = vec![selectors[i % selectors.len()], headroom];
            input.extend_from_slice(f);
            (*name, input)
        })
        .collect()
}

/// Offending frames behind the build_error target's five header bytes.
fn build_error_seeds(inner: &[Frame]) -> Vec<Frame> {
    let too_big_1400 = [0b110, 0x05, 0x12, 0x05, 0x78]; // both sources, 1298-byte buffer, MTU 1400
    let time_exceeded = [0b111, 0x05, 0x12, 0, 0];
    let small_buffer = [0b110, 0, 60, 0x05, 0x78];
    let no_v6_source = [0b011, 0x05, 0x12, 0, 0];
    let picks: [(&str, [u8; 5]); 8] = [
        ("tcp4", too_big_1400),
        ("udp6", too_big_1400),
        ("icmp4", time_exceeded),
        ("icmp6", time_exceeded),
        ("tcp4-tagged", small_buffer),
        ("udp6-hop-by-hop", no_v6_source),
        ("udp4-first-fragment", time_exceeded),
        ("udp4-ip-options", too_big_1400),
    ];
    picks
        .iter()
        .map(|(name, header)| {
            let frame = &inner.iter().find(|(n, _)| n == name).expect("named seed").1;
            let mut input = header.to_vec();
            input.extend_from_slice(frame);
            (*name, input)
        })
        .collect()
}

/// Super-packets as a tap hands them over (virtio-net header, then a TSO/USO frame with a partial
/// checksum) for `segment`, and their segments, packed as `coalesce` reads them.
fn gso_seeds() -> (Vec<Frame>, Vec<Frame>) {
    let eth = || PacketBuilder::ethernet2(POD_A, POD_B);
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 13 + 5) as u8).collect();
    let mut frames: Vec<(&'static str, Vec<u8>, Gso, u16)> = Vec::new();
    let mut out = Vec::new();
    eth().ipv4(IP4_A, IP4_B, 64).tcp(40010, 5201, 1, 64000).ack(1).psh().write(&mut out, &data).expect("seed");
    frames.push(("tso4", out, Gso::TcpV4, 1000));
    let mut out = Vec::new();
    eth()
        .ipv6(IP6_A, IP6_B, 64)
        .tcp(40011, 5201, 0xffff_ff00, 64000)
        .ack(1)
        .cwr()
        .write(&mut out, &data)
        .expect("seed");
    frames.push(("tso6-cwr", out, Gso::TcpV6, 1428));
    let mut out = Vec::new();
    eth().ipv4(IP4_A, IP4_B, 64).udp(40012, 4433).write(&mut out, &data).expect("seed");
    frames.push(("uso4", out, Gso::UdpL4, 1200));
    let mut out = Vec::new();
    eth().ipv6(IP6_A, IP6_B, 64).udp(40013, 4433).write(&mut out, &data[..700]).expect("seed");
    frames.push(("uso6-small", out, Gso::UdpL4, 1200));
    let (mut segment, mut coalesce) = (Vec::new(), Vec::new());
    for (name, frame, gso, size) in frames {
        let frame = partial(&frame);
        let l4 = l4_offset(&frame);
        let vnet = VirtioNetHdr {
            needs_csum: true,
            gso,
            ecn: name.contains("cwr"),
            gso_size: size,
            csum_start: l4 as u16,
            csum_offset: if gso == Gso::UdpL4 { 6 } else { 16 },
            ..VirtioNetHdr::NONE
        };
        let mut input = vnet.to_bytes().to_vec();
        input.extend_from_slice(&frame);
        segment.push((name, input));
        let s = Segmenter::new(&frame, &vnet).expect("seed segments");
        let mut packed = Vec::new();
        let mut buf = vec![0u8; s.max_segment_len()];
        for i in 0..s.segments() {
            let n = s.write_segment(i, &mut buf, Checksum::Complete).expect("fits");
            packed.extend_from_slice(&(n as u16).to_be_bytes());
            packed.extend_from_slice(&buf[..n]);
        }
        coalesce.push((name, packed));
    }
    (segment, coalesce)
}
