//! Golden check of ferry's segmented tunnel frames against an independent oracle: tshark.
//!
//! Each case is a super-packet as a pod's tap hands it over (virtio-net header, TSO or USO frame,
//! partial checksum). ferry cuts it ([`Segmenter::write_encapsulated`]) into complete VXLAN or
//! Geneve frames; tshark, with IP, UDP and TCP checksum validation on, decodes them all. Every frame
//! must decode without malformed fields or expert warnings, with good inner checksums, and with
//! the sequence numbers, lengths, IPv4 IDs and flags Linux's own segmentation gives. The tunnel
//! datagrams of [`Segmenter::write_udp_gso`] (the form a `UDP_SEGMENT` send takes) must be the
//! UDP payloads of those frames, byte for byte. One deliberately corrupted frame at the end proves
//! the checks flag a bad inner checksum.
//!
//! Without tshark the test fails when `CI` is set and prints a SKIP line otherwise.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_encap::checksum;
use ferry_encap::gso::{Segmenter, UDP_GSO_MAX_PAYLOAD};
use ferry_encap::wire::geneve::GeneveOption;
use ferry_encap::wire::virtio_net::{Gso, VirtioNetHdr};
use ferry_encap::{MacAddr, TemplateParams, TunnelKind, TunnelTemplate};

const OPTIONS: &[GeneveOption<'static>] = &[
    GeneveOption { class: 0x0102, kind: 0x05, data: &[1, 2, 3, 4] },
    GeneveOption { class: 0xffff, kind: 0x7f, data: &[9; 8] },
];

struct Case {
    name: &'static str,
    kind: TunnelKind,
    outer_v6: bool,
    options: &'static [GeneveOption<'static>],
    inner_v6: bool,
    udp: bool,
    /// Payload bytes of the super-packet and its segment size.
    payload: usize,
    mss: usize,
    /// TCP flags of the super-packet (ACK plus these).
    flags: u8,
}

const CASES: &[Case] = &[
    Case {
        name: "vxlan v4, 64 KB TCPv4 with timestamps at MSS 1398",
        kind: TunnelKind::Vxlan,
        outer_v6: false,
        options: &[],
        inner_v6: false,
        udp: false,
        payload: 65_000,
        mss: 1398,
        flags: 0x08, // PSH
    },
    Case {
        name: "geneve v6 with options, TCPv6 with CWR, FIN and PSH",
        kind: TunnelKind::Geneve,
        outer_v6: true,
        options: OPTIONS,
        inner_v6: true,
        udp: false,
        payload: 20_000,
        mss: 1328,
        flags: 0x80 | 0x08 | 0x01,
    },
    Case {
        name: "vxlan v4, USO over IPv4",
        kind: TunnelKind::Vxlan,
        outer_v6: false,
        options: &[],
        inner_v6: false,
        udp: true,
        payload: 9_000,
        mss: 1400,
        flags: 0,
    },
    Case {
        name: "geneve v4, USO over IPv6",
        kind: TunnelKind::Geneve,
        outer_v6: false,
        options: OPTIONS,
        inner_v6: true,
        udp: true,
        payload: 5_000,
        mss: 1200,
        flags: 0,
    },
];

const SEQ: u32 = 0xfffe_0000;
const IP_ID: u16 = 0xfff0;
const FIELDS: &[&str] = &[
    "frame.protocols",
    "_ws.malformed",
    "_ws.expert.severity",
    "_ws.expert.message",
    "ip.checksum.status",
    "ip.id",
    "udp.checksum.status",
    "tcp.checksum.status",
    "tcp.seq_raw",
    "tcp.len",
    "tcp.flags",
    "udp.length",
];
const AGGREGATOR: char = '\u{1f}';
const SEVERITY_WARN: u32 = 0x0060_0000;

/// The super-packet of `case` (without its virtio-net header), partial checksum included.
fn super_packet(case: &Case) -> (Vec<u8>, VirtioNetHdr) {
    let data: Vec<u8> = (0..case.payload).map(|i| (i * 31 + 7) as u8).collect();
    let mut f = vec![0x0a, 0x58, 0x0a, 0xf4, 0x02, 0x03, 0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x02];
    let l4_len = if case.udp { 8 } else { 32 } + data.len();
    let (s4, d4) = ([10, 244, 1, 2], [10, 244, 2, 3]);
    let s6: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2];
    let d6: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3];
    let proto = if case.udp { 17 } else { 6 };
    let pseudo = if case.inner_v6 {
        f.extend([0x86, 0xdd, 0x60, 0x00, 0x12, 0x34]);
        f.extend((l4_len as u16).to_be_bytes());
        f.extend([proto, 64]);
        f.extend(s6);
        f.extend(d6);
        checksum::pseudo_v6(s6.into(), d6.into(), proto, l4_len as u32)
    } else {
        f.extend([0x08, 0x00, 0x45, 0x00]);
        f.extend(((20 + l4_len) as u16).to_be_bytes());
        f.extend(IP_ID.to_be_bytes());
        f.extend([0x40, 0, 64, proto, 0, 0]);
        f.extend(s4);
        f.extend(d4);
        let c = checksum::of(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        checksum::pseudo_v4(s4.into(), d4.into(), proto, l4_len as u16)
    };
    let l4 = f.len();
    f.extend(40000u16.to_be_bytes());
    f.extend(40001u16.to_be_bytes()); // no application dissector on this port
    if case.udp {
        f.extend((l4_len as u16).to_be_bytes());
        f.extend([0, 0]);
    } else {
        f.extend(SEQ.to_be_bytes());
        f.extend(1u32.to_be_bytes());
        f.extend([0x80, 0x10 | case.flags, 0x01, 0xf5, 0, 0, 0, 0]);
        f.extend([1, 1, 8, 10, 0, 1, 0, 0, 0, 2, 0, 0]); // NOP NOP timestamps
    }
    f.extend(&data);
    let at = l4 + if case.udp { 6 } else { 16 };
    f[at..at + 2].copy_from_slice(&(!checksum::finish_sum(pseudo)).to_be_bytes());
    let vnet = VirtioNetHdr {
        needs_csum: true,
        gso: match (case.udp, case.inner_v6) {
            (true, _) => Gso::UdpL4,
            (false, false) => Gso::TcpV4,
            (false, true) => Gso::TcpV6,
        },
        ecn: case.flags & 0x80 != 0,
        gso_size: case.mss as u16,
        csum_start: l4 as u16,
        csum_offset: if case.udp { 6 } else { 16 },
        ..VirtioNetHdr::NONE
    };
    (f, vnet)
}

fn template(case: &Case) -> TunnelTemplate {
    let (src, dst): (IpAddr, IpAddr) = if case.outer_v6 {
        ("fd00:0:0:1::1".parse().expect("ip"), "fd00:0:0:2::1".parse().expect("ip"))
    } else {
        ("192.0.2.1".parse().expect("ip"), "192.0.2.2".parse().expect("ip"))
    };
    let mut p = TemplateParams::new(
        case.kind,
        4242,
        MacAddr([0x02, 0xfe, 0, 0, 0, 1]),
        MacAddr([0x02, 0xfe, 0, 0, 0, 2]),
        src,
        dst,
    );
    p.geneve_options = case.options;
    TunnelTemplate::new(&p).expect("valid template")
}

/// The encapsulated segments of `case`, checked against the UDP_SEGMENT batches.
fn segmented(case: &Case) -> Vec<Vec<u8>> {
    let (sp, vnet) = super_packet(case);
    let tpl = template(case);
    let s = Segmenter::new(&sp, &vnet).expect("valid super-packet");
    assert_eq!(s.segments(), case.payload.div_ceil(case.mss), "{}", case.name);
    let mut buf = vec![0u8; 4096];
    let frames: Vec<Vec<u8>> = (0..s.segments())
        .map(|i| {
            let n = s.write_encapsulated(i, &tpl, &mut buf).expect("fits");
            buf[..n].to_vec()
        })
        .collect();
    // The UDP_SEGMENT form: the same datagrams, back to back, in batches that fit one send.
    let udp_payload_at = tpl.overhead() - tpl.tunnel_header().len();
    let mut batch = vec![0u8; UDP_GSO_MAX_PAYLOAD];
    let mut next = 0;
    while next < s.segments() {
        let b = s.write_udp_gso(&tpl, next, &mut batch).expect("one datagram fits");
        assert!(b.len <= UDP_GSO_MAX_PAYLOAD && b.segments >= 1);
        let chunks: Vec<&[u8]> = batch[..b.len].chunks(usize::from(b.gso_size)).collect();
        assert_eq!(chunks.len(), b.segments, "{}: equal-size datagrams, the last no longer", case.name);
        for (k, c) in chunks.iter().enumerate() {
            assert_eq!(*c, &frames[next + k][udp_payload_at..], "{}: datagram {}", case.name, next + k);
            let sport =
                u16::from_be_bytes([frames[next + k][udp_payload_at - 8], frames[next + k][udp_payload_at - 7]]);
            assert_eq!(sport, b.src_port);
        }
        next = b.next;
    }
    frames
}

fn write_pcap(path: &PathBuf, frames: &[Vec<u8>]) {
    let mut f = std::fs::File::create(path).expect("create pcap");
    let mut out = Vec::new();
    out.extend(0xa1b2_c3d4u32.to_le_bytes());
    out.extend(2u16.to_le_bytes());
    out.extend(4u16.to_le_bytes());
    out.extend([0u8; 8]);
    out.extend(65_535u32.to_le_bytes());
    out.extend(1u32.to_le_bytes()); // Ethernet
    for (i, fr) in frames.iter().enumerate() {
        out.extend((i as u32).to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((fr.len() as u32).to_le_bytes());
        out.extend((fr.len() as u32).to_le_bytes());
        out.extend(fr);
    }
    f.write_all(&out).expect("write pcap");
}

/// tshark installed: true. Otherwise fail when `CI` is set (CI must run this oracle), or skip.
fn tshark_available(test: &str) -> bool {
    let ok = ferry_testsupport::have_tool("tshark");
    if !ok {
        ferry_testsupport::skip(test, "needs tshark (apt-get install tshark) for the tshark oracle");
    }
    ok
}

type Decoded = HashMap<&'static str, Vec<String>>;

fn decode(path: &PathBuf) -> Vec<Decoded> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-n")
        .arg("-r")
        .arg(path)
        .args(["-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE"])
        // The inner payload is opaque data; heuristic dissectors (RTCP, ...) must not guess at it.
        .args(["-d", "udp.port==40001,data", "--disable-heuristic", "rtcp_udp"])
        // Sequence analysis would warn about the segments of a connection it never saw open.
        .args(["-o", "tcp.analyze_sequence_numbers:FALSE", "-o", "tcp.relative_sequence_numbers:FALSE"])
        .args(["-T", "fields", "-E", "header=n", "-E", "separator=/t", "-E", "occurrence=a"])
        .args(["-E", &format!("aggregator={AGGREGATOR}")]);
    for f in FIELDS {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("run tshark");
    assert!(out.status.success(), "tshark failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| {
            FIELDS
                .iter()
                .zip(line.split('\t'))
                .map(|(f, c)| (*f, if c.is_empty() { vec![] } else { c.split(AGGREGATOR).map(String::from).collect() }))
                .collect()
        })
        .collect()
}

fn get<'a>(d: &'a Decoded, f: &str) -> &'a [String] {
    d.get(f).map_or(&[], Vec::as_slice)
}

/// What tshark found wrong with one frame.
fn problems(d: &Decoded) -> Vec<String> {
    let mut out = Vec::new();
    if !get(d, "_ws.malformed").is_empty() {
        out.push("malformed".to_string());
    }
    for (sev, msg) in get(d, "_ws.expert.severity").iter().zip(get(d, "_ws.expert.message")) {
        let s = sev.strip_prefix("0x").and_then(|h| u32::from_str_radix(h, 16).ok()).or_else(|| sev.parse().ok());
        if s.is_none_or(|s| s >= SEVERITY_WARN) {
            out.push(format!("expert {sev}: {msg}"));
        }
    }
    for f in ["ip.checksum.status", "udp.checksum.status", "tcp.checksum.status"] {
        if get(d, f).iter().any(|s| s == "0") {
            out.push(format!("{f} bad: {:?}", get(d, f)));
        }
    }
    out
}

#[test]
fn tshark_decodes_segmented_tunnel_frames() {
    let mut frames = Vec::new();
    let mut spans = Vec::new();
    for case in CASES {
        let f = segmented(case);
        spans.push((frames.len(), f.len()));
        frames.extend(f);
    }
    if !tshark_available("tshark_decodes_segmented_tunnel_frames") {
        return;
    }
    // A corrupted copy of the first segment: one inner payload byte flipped.
    let mut bad = frames[0].clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    frames.push(bad);

    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = std::env::temp_dir().join(format!("ferry-gso-{}-{nanos}.pcap", std::process::id()));
    write_pcap(&path, &frames);
    let decoded = decode(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(decoded.len(), frames.len(), "one line per frame");

    let mut failures = Vec::new();
    for (case, (start, n)) in CASES.iter().zip(&spans) {
        for i in 0..*n {
            let d = &decoded[start + i];
            let mut p = problems(d);
            let last = i + 1 == *n;
            let len = if last { case.payload - case.mss * (n - 1) } else { case.mss };
            let l4 = if case.udp { "udp:data" } else { "tcp:data" };
            let protos = get(d, "frame.protocols").join("");
            if !protos.ends_with(&format!(":eth:ethertype:{}:{l4}", if case.inner_v6 { "ipv6" } else { "ip" })) {
                p.push(format!("protocols {protos}"));
            }
            // The inner L4 checksum was validated and good (the last status is the inner one).
            let sums = get(d, if case.udp { "udp.checksum.status" } else { "tcp.checksum.status" });
            if sums.last().map(String::as_str) != Some("1") {
                p.push(format!("inner checksum status {sums:?}"));
            }
            if !case.inner_v6 {
                let want = format!("0x{:04x}", IP_ID.wrapping_add(i as u16));
                if get(d, "ip.id").last() != Some(&want) {
                    p.push(format!("inner ip.id {:?}, want {want}", get(d, "ip.id")));
                }
            }
            if case.udp {
                let want = (8 + len).to_string();
                if get(d, "udp.length").last() != Some(&want) {
                    p.push(format!("inner udp.length {:?}, want {want}", get(d, "udp.length")));
                }
            } else {
                let seq = SEQ.wrapping_add((i * case.mss) as u32).to_string();
                if get(d, "tcp.seq_raw").first() != Some(&seq) {
                    p.push(format!("tcp.seq_raw {:?}, want {seq}", get(d, "tcp.seq_raw")));
                }
                if get(d, "tcp.len").first() != Some(&len.to_string()) {
                    p.push(format!("tcp.len {:?}, want {len}", get(d, "tcp.len")));
                }
                let mut fl = 0x10 | case.flags;
                if !last {
                    fl &= !0x09;
                }
                if i > 0 {
                    fl &= !0x80;
                }
                let want = format!("0x{fl:04x}");
                if get(d, "tcp.flags").first() != Some(&want) {
                    p.push(format!("tcp.flags {:?}, want {want}", get(d, "tcp.flags")));
                }
            }
            if !p.is_empty() {
                failures.push(format!("{} segment {i}: {}", case.name, p.join("; ")));
            }
        }
    }
    let control = decoded.last().expect("the corrupted frame");
    assert!(
        get(control, "tcp.checksum.status").last().map(String::as_str) == Some("0"),
        "tshark did not flag the corrupted control frame: {control:?}"
    );
    assert!(failures.is_empty(), "tshark disagrees with ferry's segments:\n{}", failures.join("\n"));
}
