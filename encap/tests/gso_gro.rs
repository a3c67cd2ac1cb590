//! Property tests for segmentation ([`ferry_encap::gso`]) and coalescing ([`ferry_encap::gro`]).
//!
//! The oracle is a frame builder written here from the rules Linux applies (`tcp_gso_segment`,
//! `inet_gso_segment`), not from ferry's code: a super-packet with its virtio-net header, and the
//! segments Linux would cut it into (IPv4 ID + i, sequence + i * MSS, FIN/PSH only on the last,
//! CWR only on the first, completed checksums). Three properties:
//!
//! 1. `segment` gives exactly the builder's segments, and `coalesce` of those gives back the
//!    super-packet byte for byte and its virtio-net metadata (GSO type, size, ECN, checksum
//!    offsets), across MSS, TCP flags, options, TOS/ECN, VLAN, IPv4 and IPv6;
//! 2. over interleaved flows with breaks (gaps, PSH, pure ACKs, changed fields, non-TCP frames)
//!    and fewer slots than flows, nothing is lost, duplicated or reordered within a flow:
//!    re-segmenting what the coalescer emits reproduces each flow's input segments exactly;
//! 3. each single-field difference Linux refuses to merge is refused, and the ones it accepts
//!    (PSH, FIN, a shorter last segment, a fixed IPv4 ID with DF) are merged.

use std::collections::HashMap;

use ferry_encap::checksum;
use ferry_encap::gro::{self, Coalescer, Output};
use ferry_encap::gso::{Checksum, Segmenter, UDP_GSO_MAX_PAYLOAD};
use ferry_encap::offload::{self, ChecksumFix};
use ferry_encap::wire::geneve::GeneveOption;
use ferry_encap::wire::tcp::flags;
use ferry_encap::wire::virtio_net::{Gso, VirtioNetHdr};
use ferry_encap::{DecapConfig, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, decap_payload};
use proptest::prelude::*;

/// Everything that identifies a flow and stays the same across its segments.
#[derive(Debug, Clone)]
struct Flow {
    v6: bool,
    vlan: Option<u16>,
    tos: u8,
    ttl: u8,
    df: bool,
    flow_label: u32,
    sport: u16,
    dport: u16,
    ack: u32,
    window: u16,
    /// TCP options, a multiple of 4 bytes.
    options: Vec<u8>,
    /// Flags every segment carries (ACK, maybe ECE).
    base_flags: u8,
    src_last: u8,
}

impl Flow {
    fn l3(&self) -> usize {
        if self.vlan.is_some() { 18 } else { 14 }
    }
    fn l4(&self) -> usize {
        self.l3() + if self.v6 { 40 } else { 20 }
    }
    fn hdr_len(&self) -> usize {
        self.l4() + 20 + self.options.len()
    }
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One TCP frame of `flow`. `partial`: the checksum field holds the pseudo-header sum, as a tap
/// hands over a TSO packet; otherwise the checksum is complete.
fn build(flow: &Flow, id: u16, seq: u32, tcp_flags: u8, data: &[u8], partial: bool) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa];
    if let Some(v) = flow.vlan {
        f.extend([0x81, 0x00]);
        f.extend(v.to_be_bytes());
    }
    let l4_len = 20 + flow.options.len() + data.len();
    let src4 = [10, 244, 1, flow.src_last];
    let dst4 = [10, 244, 2, 3];
    let mut src6 = [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    src6[15] = flow.src_last;
    let dst6 = [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3];
    let pseudo = if flow.v6 {
        f.extend([0x86, 0xdd]);
        let word = (6u32 << 28) | (u32::from(flow.tos) << 20) | flow.flow_label;
        f.extend(word.to_be_bytes());
        f.extend((l4_len as u16).to_be_bytes());
        f.extend([6, flow.ttl]);
        f.extend(src6);
        f.extend(dst6);
        checksum::pseudo_v6(src6.into(), dst6.into(), 6, l4_len as u32)
    } else {
        f.extend([0x08, 0x00]);
        let at = f.len();
        f.extend([0x45, flow.tos]);
        f.extend(((20 + l4_len) as u16).to_be_bytes());
        f.extend(id.to_be_bytes());
        f.extend(if flow.df { [0x40, 0] } else { [0, 0] });
        f.extend([flow.ttl, 6, 0, 0]);
        f.extend(src4);
        f.extend(dst4);
        let c = checksum::of(&f[at..at + 20]);
        f[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
        checksum::pseudo_v4(src4.into(), dst4.into(), 6, l4_len as u16)
    };
    let l4 = f.len();
    f.extend(flow.sport.to_be_bytes());
    f.extend(flow.dport.to_be_bytes());
    f.extend(seq.to_be_bytes());
    f.extend(flow.ack.to_be_bytes());
    f.push(((20 + flow.options.len()) as u8 / 4) << 4);
    f.push(tcp_flags);
    f.extend(flow.window.to_be_bytes());
    f.extend([0, 0, 0, 0]);
    f.extend(&flow.options);
    f.extend(data);
    let c =
        if partial { !checksum::finish_sum(pseudo) } else { checksum::finish_sum(pseudo + checksum::sum(&f[l4..])) };
    f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// A super-packet of `flow` and its virtio-net header.
fn super_packet(flow: &Flow, id: u16, seq: u32, tcp_flags: u8, data: &[u8], mss: usize) -> (Vec<u8>, VirtioNetHdr) {
    let vnet = VirtioNetHdr {
        needs_csum: true,
        data_valid: false,
        gso: if flow.v6 { Gso::TcpV6 } else { Gso::TcpV4 },
        ecn: tcp_flags & flags::CWR != 0,
        hdr_len: flow.hdr_len() as u16,
        gso_size: mss as u16,
        csum_start: flow.l4() as u16,
        csum_offset: 16,
        num_buffers: 0,
    };
    (build(flow, id, seq, tcp_flags, data, true), vnet)
}

/// The segments Linux cuts that super-packet into.
fn linux_segments(flow: &Flow, id: u16, seq: u32, tcp_flags: u8, data: &[u8], mss: usize) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = data.chunks(mss).collect();
    let n = chunks.len();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut f = tcp_flags;
            if i + 1 < n {
                f &= !(flags::FIN | flags::PSH);
            }
            if i > 0 {
                f &= !flags::CWR;
            }
            build(flow, id.wrapping_add(i as u16), seq.wrapping_add((i * mss) as u32), f, c, false)
        })
        .collect()
}

fn options() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![]),
        // NOP NOP timestamps, as Linux sends on every data segment.
        any::<(u32, u32)>().prop_map(|(a, b)| {
            let mut o = vec![1, 1, 8, 10];
            o.extend(a.to_be_bytes());
            o.extend(b.to_be_bytes());
            o
        }),
        (1usize..=10).prop_flat_map(|w| proptest::collection::vec(any::<u8>(), w * 4)),
    ]
}

fn flow() -> impl Strategy<Value = Flow> {
    (
        (any::<bool>(), proptest::option::of(1u16..4095), any::<u8>(), 1u8..=255, any::<bool>(), 0u32..(1 << 20)),
        (any::<u16>(), any::<u16>(), any::<u32>(), any::<u16>(), options(), any::<bool>(), any::<u8>()),
    )
        .prop_map(|((v6, vlan, tos, ttl, df, flow_label), (sport, dport, ack, window, options, ece, src_last))| {
            Flow {
                v6,
                vlan,
                tos,
                ttl,
                df,
                flow_label,
                sport,
                dport,
                ack,
                window,
                options,
                base_flags: flags::ACK | if ece { flags::ECE } else { 0 },
                src_last,
            }
        })
}

/// Coalesce `frames` with a coalescer of `slots` flows; returns what it emitted.
fn coalesce(frames: &[Vec<u8>], slots: usize) -> Vec<(VirtioNetHdr, Vec<u8>, u16)> {
    let mut c = Coalescer::new(vec![0u8; gro::storage_len(slots)]).expect("storage for the flows");
    let mut out = Vec::new();
    let mut emit = |o: Output<'_>| out.push((o.vnet, o.frame.to_vec(), o.segments));
    for f in frames {
        c.push(f, &mut emit);
    }
    c.flush(&mut emit);
    assert_eq!(c.held(), 0);
    out
}

/// Re-segment one coalescer output with ferry's segmenter.
fn resegment(vnet: &VirtioNetHdr, frame: &[u8]) -> Vec<Vec<u8>> {
    let s = Segmenter::new(frame, vnet).expect("the coalescer's output segments");
    let mut buf = vec![0u8; 70_000];
    (0..s.segments())
        .map(|i| {
            let n = s.write_segment(i, &mut buf, Checksum::Complete).expect("fits");
            buf[..n].to_vec()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Property 1: segment, then coalesce, gives back the super-packet and its metadata.
    #[test]
    fn segment_then_coalesce_round_trips(
        flow in flow(),
        mss in prop_oneof![1usize..64, 64usize..=1460],
        segs in 2usize..=48,
        last_short in any::<prop::sample::Index>(),
        extra in prop::sample::select(vec![0u8, flags::PSH, flags::FIN, flags::PSH | flags::FIN, flags::CWR, flags::CWR | flags::PSH]),
        id in any::<u16>(),
        seq in any::<u32>(),
        seed in any::<u64>(),
    ) {
        let segs = segs.min((65_535 - (flow.hdr_len() - flow.l3())) / mss);
        prop_assume!(segs >= 2);
        let len = (segs - 1) * mss + 1 + last_short.index(mss);
        let data = payload(seed, len);
        let tcp_flags = flow.base_flags | extra;
        let (sp, vnet) = super_packet(&flow, id, seq, tcp_flags, &data, mss);
        let want = linux_segments(&flow, id, seq, tcp_flags, &data, mss);

        let s = Segmenter::new(&sp, &vnet).expect("a valid super-packet");
        prop_assert_eq!(s.segments(), want.len());
        let mut buf = vec![0u8; 2000];
        let mut got = Vec::new();
        for (i, w) in want.iter().enumerate() {
            let n = s.write_segment(i, &mut buf, Checksum::Complete).expect("fits");
            prop_assert_eq!(&buf[..n], &w[..], "segment {}", i);
            got.push(buf[..n].to_vec());
            // Partial: the pseudo-header sum, which completes to the same segment.
            let n = s.write_segment(i, &mut buf, Checksum::Partial).expect("fits");
            let fix = offload::complete_checksum(&mut buf[..n]);
            prop_assert!(matches!(fix, Ok(ChecksumFix::Completed | ChecksumFix::AlreadyFinal)), "{:?}", fix);
            prop_assert_eq!(&buf[..n], &w[..], "partial segment {}", i);
        }
        let h = s.segment_header(Checksum::Partial);
        prop_assert_eq!((h.needs_csum, h.csum_start, h.csum_offset), (true, vnet.csum_start, 16));

        let out = coalesce(&got, 4);
        prop_assert_eq!(out.len(), 1, "one run: {:?}", out.iter().map(|o| o.2).collect::<Vec<_>>());
        let (v, f, n) = &out[0];
        prop_assert_eq!(usize::from(*n), want.len());
        prop_assert_eq!(v, &vnet);
        prop_assert!(f == &sp, "coalesced bytes differ from the super-packet");
    }

    /// Property 2: interleaved flows with breaks, fewer slots than flows; re-segmenting the output
    /// reproduces every flow's segments in order.
    #[test]
    fn coalescing_loses_and_reorders_nothing(
        flows in proptest::collection::vec(flow(), 1..=4),
        bursts in proptest::collection::vec((0usize..4, 1usize..=6, 200usize..=1460, 0u8..8, 0u16..3, any::<u64>()), 1..=12),
        order in proptest::collection::vec(0usize..4, 0..200),
        slots in 1usize..=3,
    ) {
        // Flows differ at least in their source port.
        let flows: Vec<Flow> = flows.into_iter().enumerate().map(|(i, mut f)| { f.sport = i as u16; f }).collect();
        let mut state: Vec<(u16, u32)> = flows.iter().map(|f| (f.ttl.into(), f.ack)).collect();
        let mut per_flow: Vec<Vec<Vec<u8>>> = vec![Vec::new(); flows.len()];
        for (fi, segs, mss, event, id_gap, seed) in bursts {
            let fi = fi % flows.len();
            let mut flow = flows[fi].clone();
            let (id, seq) = state[fi];
            let data = payload(seed, segs * mss - (seed as usize % mss));
            let extra = match event {
                1 => flags::PSH,
                2 => flags::CWR,
                3 => { flow.window ^= 1; 0 }
                4 => { flow.tos ^= 3; 0 }
                5 => { flow.ttl = flow.ttl.wrapping_sub(1).max(1); 0 }
                _ => 0,
            };
            let mut segs_out = linux_segments(&flow, id, seq, flow.base_flags | extra, &data, mss);
            if event == 6 {
                // A pure ACK in the middle.
                segs_out.push(build(&flow, id.wrapping_add(segs as u16), seq.wrapping_add(data.len() as u32), flow.base_flags, &[], false));
            }
            let gap = if event == 7 { 1 } else { 0 };
            state[fi] = (id.wrapping_add(segs_out.len() as u16).wrapping_add(id_gap), seq.wrapping_add(data.len() as u32 + gap));
            per_flow[fi].extend(segs_out);
        }
        // Interleave the flows as `order` says, keeping each flow's order; a UDP frame now and then.
        let udp = {
            let mut f = build(&flows[0], 1, 1, 0, b"udp", false);
            let l3 = flows[0].l3();
            if flows[0].v6 { f[l3 + 6] = 17 } else { f[l3 + 9] = 17 }
            f
        };
        let mut next = vec![0usize; flows.len()];
        let mut input = Vec::new();
        let mut pick = order.into_iter();
        while next.iter().zip(&per_flow).any(|(n, p)| *n < p.len()) {
            let mut fi = pick.next().unwrap_or(0) % flows.len();
            while next[fi] >= per_flow[fi].len() {
                fi = (fi + 1) % flows.len();
            }
            input.push(per_flow[fi][next[fi]].clone());
            next[fi] += 1;
            if input.len() % 17 == 0 {
                input.push(udp.clone());
            }
        }
        let out = coalesce(&input, slots);
        let mut got: HashMap<u16, Vec<Vec<u8>>> = HashMap::new();
        let mut udp_seen = 0;
        for (vnet, frame, n) in &out {
            if frame == &udp {
                udp_seen += 1;
                continue;
            }
            let l4 = if frame[12] == 0x81 { 18 } else { 14 } + if frame[if frame[12] == 0x81 { 16 } else { 12 }] == 0x86 { 40 } else { 20 };
            let sport = u16::from_be_bytes([frame[l4], frame[l4 + 1]]);
            let segs = if vnet.gso == Gso::None { vec![frame.clone()] } else { resegment(vnet, frame) };
            prop_assert_eq!(segs.len(), usize::from(*n));
            got.entry(sport).or_default().extend(segs);
        }
        prop_assert_eq!(udp_seen, input.iter().filter(|f| **f == udp).count());
        for (i, want) in per_flow.iter().enumerate() {
            let have = got.remove(&(i as u16)).unwrap_or_default();
            prop_assert_eq!(have.len(), want.len(), "flow {}", i);
            for (k, (h, w)) in have.iter().zip(want).enumerate() {
                prop_assert!(h == w, "flow {} segment {} differs", i, k);
            }
        }
    }

    /// Property 3: a second segment that differs from the first in one field merges exactly when
    /// Linux's GRO would merge it.
    #[test]
    fn coalescing_merges_only_what_linux_merges(
        flow in flow(),
        mss in 64usize..=1460,
        id in any::<u16>(),
        seq in any::<u32>(),
        seed in any::<u64>(),
        mutation in 0usize..MUTATIONS,
    ) {
        let a = build(&flow, id, seq, flow.base_flags, &payload(seed, mss), false);
        let mut g = flow.clone();
        let (mut id2, mut seq2, mut f2, mut len2) = (id.wrapping_add(1), seq.wrapping_add(mss as u32), flow.base_flags, mss);
        let expect = match mutation {
            0 => true,
            1 => { f2 |= flags::PSH; true }
            2 => { f2 |= flags::FIN; true }
            3 => { len2 = mss - 1; true }
            4 => { id2 = id; flow.v6 || flow.df } // a fixed ID merges only with DF (IPv6: no ID)
            5 => { f2 |= flags::CWR; false }
            6 => { f2 |= flags::SYN; false }
            7 => { f2 |= flags::RST; false }
            8 => { f2 |= flags::URG; false }
            9 => { f2 ^= flags::ECE; false }
            10 => { seq2 = seq2.wrapping_add(1); false }
            11 => { g.ack ^= 1; false }
            12 => { g.window ^= 0x100; false }
            13 => { g.tos ^= 0x03; false } // ECN differs: CE against ECT, or ECT(0) against ECT(1)
            14 => { g.tos ^= 0x04; false }
            15 => { g.ttl = if flow.ttl == 255 { 254 } else { flow.ttl + 1 }; false }
            16 => { len2 = mss + 1; false }
            17 => { len2 = 0; false }
            18 => { g.options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; g.options == flow.options }
            19 => { id2 = id.wrapping_add(2); flow.v6 }
            20 => { g.df = !g.df; flow.v6 }
            21 => { g.flow_label ^= 1; !flow.v6 }
            22 => { g.dport ^= 1; false }
            23 => { g.src_last ^= 1; false }
            _ => { g.vlan = if flow.vlan.is_some() { None } else { Some(7) }; false }
        };
        let mut b = build(&g, id2, seq2, f2, &payload(seed ^ 1, len2), false);
        if mutation == 25 {
            let l = b.len();
            b[l - 1] ^= 0xff; // a bad TCP checksum
        }
        let expect = expect && mutation != 25;
        let out = coalesce(&[a, b], 4);
        let merged = out.iter().any(|o| o.2 == 2);
        prop_assert_eq!(merged, expect, "mutation {} gave {:?}", mutation, out.iter().map(|o| o.2).collect::<Vec<_>>());
        prop_assert_eq!(out.iter().map(|o| usize::from(o.2)).sum::<usize>(), 2);
    }
}

const MUTATIONS: usize = 26;

/// A UDP frame of `flow`'s addresses and ports (`flow.options` unused); `partial` as in [`build`].
fn build_udp(flow: &Flow, id: u16, data: &[u8], partial: bool) -> Vec<u8> {
    let mut f = build(&Flow { options: vec![], ..flow.clone() }, id, 0, 0, &[], false);
    let l4 = flow.l4();
    f.truncate(l4);
    let l4_len = 8 + data.len();
    let l3 = flow.l3();
    if flow.v6 {
        f[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        f[l3 + 6] = 17;
    } else {
        f[l3 + 2..l3 + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        f[l3 + 9] = 17;
        f[l3 + 10..l3 + 12].fill(0);
        let c = checksum::of(&f[l3..l3 + 20]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    f.extend(flow.sport.to_be_bytes());
    f.extend(flow.dport.to_be_bytes());
    f.extend((l4_len as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(data);
    let pseudo = if flow.v6 {
        checksum::sum(&f[l3 + 8..l3 + 40]) + 17 + l4_len as u32
    } else {
        checksum::sum(&f[l3 + 12..l3 + 20]) + 17 + l4_len as u32
    };
    let c = if partial {
        !checksum::finish_sum(pseudo)
    } else {
        match checksum::finish_sum(pseudo + checksum::sum(&f[l4..])) {
            0 => 0xffff,
            c => c,
        }
    };
    f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// USO: every datagram is the builder's (its own UDP length and checksum, IPv4 ID + i), and the
    /// coalescer, which merges only TCP, passes each one through unchanged.
    #[test]
    fn udp_segmentation_matches_linux(
        flow in flow(),
        size in 1usize..=1472,
        len in 2usize..=20_000,
        id in any::<u16>(),
        seed in any::<u64>(),
    ) {
        let data = payload(seed, len.min(65_000 - flow.hdr_len()));
        prop_assume!(data.len() > size);
        let sp = build_udp(&flow, id, &data, true);
        let vnet = VirtioNetHdr {
            needs_csum: true,
            gso: Gso::UdpL4,
            gso_size: size as u16,
            csum_start: flow.l4() as u16,
            csum_offset: 6,
            ..VirtioNetHdr::NONE
        };
        let s = Segmenter::new(&sp, &vnet).expect("valid USO packet");
        prop_assert_eq!(s.segments(), data.len().div_ceil(size));
        let mut buf = vec![0u8; 2000];
        let mut got = Vec::new();
        for (i, chunk) in data.chunks(size).enumerate() {
            let n = s.write_segment(i, &mut buf, Checksum::Complete).expect("fits");
            let want = build_udp(&flow, id.wrapping_add(i as u16), chunk, false);
            prop_assert!(buf[..n] == want[..], "datagram {}", i);
            got.push(want);
        }
        let out = coalesce(&got, 2);
        prop_assert_eq!(out.len(), got.len());
        for ((v, f, n), g) in out.iter().zip(&got) {
            prop_assert!(*n == 1 && v.gso == Gso::None && !v.needs_csum && f == g);
        }
    }
}

#[test]
fn ipv4_options_are_copied_to_every_segment_and_never_coalesced() {
    let flow = Flow {
        v6: false,
        vlan: None,
        tos: 0,
        ttl: 64,
        df: true,
        flow_label: 0,
        sport: 1,
        dport: 2,
        ack: 3,
        window: 4,
        options: vec![],
        base_flags: flags::ACK,
        src_last: 9,
    };
    // The super-packet with a 4-byte IPv4 option (NOP NOP NOP EOL): IHL 6.
    let (mut sp, mut vnet) = super_packet(&flow, 100, 1000, flags::ACK, &payload(5, 3000), 1000);
    sp.splice(34..34, [1, 1, 1, 0]);
    sp[14] = 0x46;
    let total = u16::from_be_bytes([sp[16], sp[17]]) + 4;
    sp[16..18].copy_from_slice(&total.to_be_bytes());
    sp[24..26].fill(0);
    let c = checksum::of(&sp[14..38]);
    sp[24..26].copy_from_slice(&c.to_be_bytes());
    vnet.csum_start += 4;
    let s = Segmenter::new(&sp, &vnet).expect("options are fine to segment");
    assert_eq!(s.segments(), 3);
    let mut segs = Vec::new();
    let mut buf = [0u8; 1200];
    for i in 0..3 {
        let n = s.write_segment(i, &mut buf, Checksum::Complete).expect("fits");
        assert_eq!(buf[14..15], [0x46]);
        assert_eq!(buf[34..38], [1, 1, 1, 0]);
        assert_eq!(checksum::of(&buf[14..38]), 0, "segment {i} IPv4 header checksum");
        let mut check = buf[..n].to_vec();
        assert_eq!(offload::complete_checksum(&mut check), Ok(ChecksumFix::AlreadyFinal), "segment {i} TCP checksum");
        segs.push(buf[..n].to_vec());
    }
    // Linux's inet_gro_receive takes only IHL 5: these leave one by one, unchanged.
    let out = coalesce(&segs, 2);
    assert_eq!(out.iter().map(|o| o.2).collect::<Vec<_>>(), [1, 1, 1]);
    assert!(out.iter().zip(&segs).all(|(o, s)| &o.1 == s && o.0 == VirtioNetHdr::NONE));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The tunnel path over UDP sockets, end to end in memory: a tap's super-packet becomes
    /// `UDP_SEGMENT` batches; the receiver's `UDP_GRO` buffers (the same datagrams, back to back)
    /// are decapsulated datagram by datagram with the outer TOS the sender set, coalesced, and
    /// flushed once: what comes out is the super-packet, bytes and virtio-net header.
    #[test]
    fn udp_socket_path_round_trips(
        flow in flow(),
        mss in 400usize..=1400,
        segs in 2usize..=60,
        geneve in any::<bool>(),
        outer_v6 in any::<bool>(),
        id in any::<u16>(),
        seq in any::<u32>(),
        seed in any::<u64>(),
    ) {
        let segs = segs.min((65_535 - (flow.hdr_len() - flow.l3())) / mss);
        prop_assume!(segs >= 2);
        let data = payload(seed, segs * mss - (seed as usize % mss));
        let (sp, vnet) = super_packet(&flow, id, seq, flow.base_flags | flags::PSH, &data, mss);
        let (kind, local, remote): (_, std::net::IpAddr, std::net::IpAddr) = match outer_v6 {
            false => (if geneve { TunnelKind::Geneve } else { TunnelKind::Vxlan }, "192.0.2.2".parse().expect("ip"), "192.0.2.1".parse().expect("ip")),
            true => (if geneve { TunnelKind::Geneve } else { TunnelKind::Vxlan }, "fd00::2".parse().expect("ip"), "fd00::1".parse().expect("ip")),
        };
        let options = [GeneveOption { class: 0x0102, kind: 0x03, data: &[7; 8] }];
        let mut p = TemplateParams::new(kind, 77, MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), remote, local);
        p.geneve_options = &options;
        let tpl = TunnelTemplate::new(&p).expect("template");
        let cfg = DecapConfig::new(kind, 77, local);

        let s = Segmenter::new(&sp, &vnet).expect("valid");
        let mut batch = vec![0u8; UDP_GSO_MAX_PAYLOAD];
        let mut c = Coalescer::new(vec![0u8; gro::storage_len(2)]).expect("storage");
        let mut out = Vec::new();
        let mut emit = |o: Output<'_>| out.push((o.vnet, o.frame.to_vec()));
        let mut next = 0;
        while next < s.segments() {
            let b = s.write_udp_gso(&tpl, next, &mut batch).expect("fits");
            prop_assert_eq!(b.tos, tpl.outer_tos(flow.tos));
            for d in batch[..b.len].chunks_mut(usize::from(b.gso_size)) {
                let r = decap_payload(&cfg, b.tos, d).expect("own datagram decapsulates");
                c.push(&d[r], &mut emit);
            }
            next = b.next;
        }
        c.flush(&mut emit);
        prop_assert_eq!(out.len(), 1);
        prop_assert_eq!(&out[0].0, &vnet);
        prop_assert!(out[0].1 == sp, "coalesced bytes differ from the super-packet");
    }
}

#[test]
fn decap_payload_checks_the_tunnel_header_and_applies_rfc_6040() {
    let tpl = TunnelTemplate::new(&TemplateParams::new(
        TunnelKind::Vxlan,
        77,
        MacAddr([2, 0, 0, 0, 0, 1]),
        MacAddr([2, 0, 0, 0, 0, 2]),
        "192.0.2.1".parse().expect("ip"),
        "192.0.2.2".parse().expect("ip"),
    ))
    .expect("template");
    let mut flow = Flow {
        v6: false,
        vlan: None,
        tos: 0b10, // ECT(0)
        ttl: 64,
        df: true,
        flow_label: 0,
        sport: 1,
        dport: 2,
        ack: 3,
        window: 4,
        options: vec![],
        base_flags: flags::ACK,
        src_last: 9,
    };
    let datagram = |flow: &Flow| {
        let mut d = tpl.tunnel_header().to_vec();
        d.extend(build(flow, 1, 2, flags::ACK, b"payload", false));
        d
    };
    let cfg = DecapConfig::new(TunnelKind::Vxlan, 77, "192.0.2.2".parse().expect("ip"));

    let mut d = datagram(&flow);
    let r = decap_payload(&cfg, 0b11, &mut d).expect("valid");
    assert_eq!(r, 8..d.len());
    assert_eq!(d[8 + 15] & 0b11, 0b11, "outer CE marks an ECT inner packet CE");
    assert_eq!(checksum::of(&d[8 + 14..8 + 34]), 0, "the inner IPv4 checksum follows");

    let other = DecapConfig::new(TunnelKind::Vxlan, 78, "192.0.2.2".parse().expect("ip"));
    let mut d = datagram(&flow);
    let before = d.clone();
    assert_eq!(decap_payload(&other, 0, &mut d), Err(ferry_encap::DropReason::VniMismatch));
    flow.tos = 0;
    let mut d = datagram(&flow);
    let before_ce = d.clone();
    assert_eq!(decap_payload(&cfg, 0b11, &mut d), Err(ferry_encap::DropReason::EcnCeOnNotEct));
    assert_eq!((d == before_ce, before.len()), (true, d.len()), "a refused datagram is not modified");
    assert_eq!(decap_payload(&cfg, 0, &mut d[..8 + 13]), Err(ferry_encap::DropReason::InnerTooShort));
    assert_eq!(decap_payload(&cfg, 0, &mut d[..7]), Err(ferry_encap::DropReason::Truncated));
}
