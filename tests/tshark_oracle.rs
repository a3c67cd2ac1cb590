//! Golden check of ferry's encapsulation against an independent oracle: tshark (test side; exercises
//! the hot-path `encap` only to produce the frames under test).
//!
//! Each case encapsulates a known inner frame with ferry, all frames go into one pcap, and tshark,
//! with IP/UDP/TCP checksum validation turned on, reports per frame what it decoded. Wireshark's
//! dissectors were written without looking at ferry, so agreement on VNIs, Geneve options, addresses,
//! ports and checksums shows the bytes are right rather than merely consistent with ferry's own
//! parser. Two deliberately corrupted frames at the end prove that the same checks do flag a bad
//! frame, so a silent pass cannot come from a field name tshark does not know.
//!
//! Without tshark the test fails when `CI` is set (CI must run it) and prints a SKIP line otherwise.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etherparse::PacketBuilder;
use ferry_encap::wire::geneve::GeneveOption;
use ferry_encap::{FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, encap};
use pcap_file::pcap::{PcapPacket, PcapWriter};

/// More than the largest outer header (tagged Ethernet, IPv6, UDP, Geneve with 252 option bytes).
const HEADROOM: usize = 512;
const OUTER_SRC_MAC: MacAddr = MacAddr([0x02, 0xfe, 0, 0, 0, 0x01]);
const OUTER_DST_MAC: MacAddr = MacAddr([0x02, 0xfe, 0, 0, 0, 0x02]);
const INNER_SRC_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x02];
const INNER_DST_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x02, 0x03];
/// Inner UDP/TCP destination port: not one Wireshark hands to an application dissector, so the
/// payload stays opaque `data` and cannot itself raise expert warnings.
const INNER_DST_PORT: u16 = 40001;
const PAYLOAD: &[u8] = b"ferry tshark oracle payload";
const FLANNEL_PORT: u16 = 8472;

/// Wireshark's checksum status values (`proto_checksum_enum_e`), as `-T fields` prints them.
const CHECKSUM_BAD: &str = "0";
const CHECKSUM_GOOD: &str = "1";
const CHECKSUM_NOT_PRESENT: &str = "3";
/// `PI_WARN`: expert items at or above this severity mean tshark found something wrong.
const SEVERITY_WARN: u32 = 0x0060_0000;

/// Non-critical options of several lengths (0, 4 and 8 data bytes) and critical ones (4 and 12).
const OPTIONS_MIXED: &[GeneveOption<'static>] = &[
    GeneveOption { class: 0x0102, kind: 0x05, data: &[] },
    GeneveOption { class: 0x0103, kind: 0x80 | 0x11, data: &[0xde, 0xad, 0xbe, 0xef] },
    GeneveOption { class: 0xffff, kind: 0x7f, data: &[1, 2, 3, 4, 5, 6, 7, 8] },
];
const OPTIONS_CRITICAL_LONG: &[GeneveOption<'static>] =
    &[GeneveOption { class: 0x0104, kind: 0x80 | 0x01, data: &[0x5a; 12] }];
const OPTIONS_NON_CRITICAL: &[GeneveOption<'static>] = &[GeneveOption { class: 0x0001, kind: 0x02, data: &[7; 4] }];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug)]
struct Case {
    name: &'static str,
    kind: TunnelKind,
    vni: u32,
    /// `None`: the IANA port for `kind`.
    port: Option<u16>,
    vlan: Option<u16>,
    options: &'static [GeneveOption<'static>],
    outer: (&'static str, &'static str),
    inner: (&'static str, &'static str),
    l4: L4,
}

const CASES: &[Case] = &[
    Case {
        name: "vxlan v4 underlay, inner v4 tcp",
        kind: TunnelKind::Vxlan,
        vni: 1,
        port: None,
        vlan: None,
        options: &[],
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Tcp,
    },
    Case {
        name: "vxlan v4 underlay, inner v4 udp",
        kind: TunnelKind::Vxlan,
        vni: 0x00ab_cdef,
        port: None,
        vlan: None,
        options: &[],
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Udp,
    },
    Case {
        name: "vxlan v4 underlay, inner v4 icmp",
        kind: TunnelKind::Vxlan,
        vni: 0x00ff_ffff,
        port: None,
        vlan: None,
        options: &[],
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Icmp,
    },
    Case {
        name: "vxlan v6 underlay, inner v6 tcp",
        kind: TunnelKind::Vxlan,
        vni: 4096,
        port: None,
        vlan: None,
        options: &[],
        outer: ("fd00:0:0:1::1", "fd00:0:0:2::1"),
        inner: ("fd10:244:1::2", "fd10:244:2::3"),
        l4: L4::Tcp,
    },
    Case {
        name: "vxlan v6 underlay, inner v4 udp",
        kind: TunnelKind::Vxlan,
        vni: 7,
        port: None,
        vlan: None,
        options: &[],
        outer: ("fd00:0:0:1::1", "fd00:0:0:2::1"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Udp,
    },
    Case {
        name: "vxlan v4 underlay, inner v6 icmpv6",
        kind: TunnelKind::Vxlan,
        vni: 8,
        port: None,
        vlan: None,
        options: &[],
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("fd10:244:1::2", "fd10:244:2::3"),
        l4: L4::Icmp,
    },
    Case {
        name: "vxlan on flannel's port 8472, inner v4 tcp",
        kind: TunnelKind::Vxlan,
        vni: 1,
        port: Some(FLANNEL_PORT),
        vlan: None,
        options: &[],
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Tcp,
    },
    Case {
        name: "vxlan on 8472 over ipv6, inner v6 udp",
        kind: TunnelKind::Vxlan,
        vni: 1,
        port: Some(FLANNEL_PORT),
        vlan: None,
        options: &[],
        outer: ("fd00:0:0:1::1", "fd00:0:0:2::1"),
        inner: ("fd10:244:1::2", "fd10:244:2::3"),
        l4: L4::Udp,
    },
    Case {
        name: "vxlan on a vlan-tagged v4 underlay, inner v4 udp",
        kind: TunnelKind::Vxlan,
        vni: 100,
        port: None,
        vlan: Some(42),
        options: &[],
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Udp,
    },
    Case {
        name: "geneve v4 underlay, no options, inner v4 tcp",
        kind: TunnelKind::Geneve,
        vni: 5001,
        port: None,
        vlan: None,
        options: &[],
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Tcp,
    },
    Case {
        name: "geneve v4 underlay, mixed options, inner v4 udp",
        kind: TunnelKind::Geneve,
        vni: 5002,
        port: None,
        vlan: None,
        options: OPTIONS_MIXED,
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Udp,
    },
    Case {
        name: "geneve v6 underlay, mixed options, inner v6 tcp",
        kind: TunnelKind::Geneve,
        vni: 5003,
        port: None,
        vlan: None,
        options: OPTIONS_MIXED,
        outer: ("fd00:0:0:1::1", "fd00:0:0:2::1"),
        inner: ("fd10:244:1::2", "fd10:244:2::3"),
        l4: L4::Tcp,
    },
    Case {
        name: "geneve v6 underlay, one critical option, inner v4 icmp",
        kind: TunnelKind::Geneve,
        vni: 5004,
        port: None,
        vlan: None,
        options: OPTIONS_CRITICAL_LONG,
        outer: ("fd00:0:0:1::1", "fd00:0:0:2::1"),
        inner: ("10.244.1.2", "10.244.2.3"),
        l4: L4::Icmp,
    },
    Case {
        name: "geneve v4 underlay, one non-critical option, inner v6 icmpv6",
        kind: TunnelKind::Geneve,
        vni: 5005,
        port: None,
        vlan: None,
        options: OPTIONS_NON_CRITICAL,
        outer: ("192.0.2.1", "192.0.2.2"),
        inner: ("fd10:244:1::2", "fd10:244:2::3"),
        l4: L4::Icmp,
    },
    Case {
        name: "geneve on a vlan-tagged v6 underlay, mixed options, inner v6 udp",
        kind: TunnelKind::Geneve,
        vni: 5006,
        port: None,
        vlan: Some(4094),
        options: OPTIONS_MIXED,
        outer: ("fd00:0:0:1::1", "fd00:0:0:2::1"),
        inner: ("fd10:244:1::2", "fd10:244:2::3"),
        l4: L4::Udp,
    },
];

/// Every field read back from tshark, one column each, all occurrences.
const FIELDS: &[&str] = &[
    "frame.number",
    "frame.protocols",
    "_ws.malformed",
    "_ws.expert.severity",
    "_ws.expert.message",
    "vlan.id",
    "ip.src",
    "ip.dst",
    "ip.checksum.status",
    "ipv6.src",
    "ipv6.dst",
    "udp.srcport",
    "udp.dstport",
    "udp.checksum.status",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.checksum.status",
    "icmp.type",
    "icmp.ident",
    "icmp.seq",
    "icmp.checksum.status",
    "icmp.checksum_bad",
    "icmpv6.type",
    "icmpv6.echo.identifier",
    "icmpv6.echo.sequence_number",
    "icmpv6.checksum.status",
    "icmpv6.checksum_bad.expert",
    "vxlan.flag_i",
    "vxlan.vni",
    "geneve.version",
    "geneve.vni",
    "geneve.proto_type",
    "geneve.flags.critical",
    "geneve.option.class",
    "geneve.option.type",
    "geneve.option.type.critical",
    "geneve.option.length",
    "data.data",
];

/// Separates occurrences of one field. A control character, because expert messages contain commas.
const AGGREGATOR: char = '\u{1f}';

/// One frame as tshark decoded it: field name to its occurrences, outermost first.
#[derive(Debug)]
struct Decoded(HashMap<&'static str, Vec<String>>);

impl Decoded {
    fn all(&self, field: &str) -> &[String] {
        self.0.get(field).map_or(&[], Vec::as_slice)
    }

    fn first(&self, field: &str) -> Option<&str> {
        self.all(field).first().map(String::as_str)
    }

    fn last(&self, field: &str) -> Option<&str> {
        self.all(field).last().map(String::as_str)
    }

    /// What tshark found wrong with this frame: malformed packets, expert items of warning severity or
    /// worse, and bad checksums. Empty for a clean frame.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.all("_ws.malformed").is_empty() {
            out.push(format!("malformed packet: {:?}", self.all("_ws.malformed")));
        }
        for (sev, msg) in self.all("_ws.expert.severity").iter().zip(self.all("_ws.expert.message")) {
            if parse_severity(sev).is_none_or(|s| s >= SEVERITY_WARN) {
                out.push(format!("expert severity {sev}: {msg}"));
            }
        }
        for field in [
            "ip.checksum.status",
            "udp.checksum.status",
            "tcp.checksum.status",
            "icmp.checksum.status",
            "icmpv6.checksum.status",
        ] {
            if self.all(field).iter().any(|s| s == CHECKSUM_BAD) {
                out.push(format!("{field} bad: {:?}", self.all(field)));
            }
        }
        for field in ["icmp.checksum_bad", "icmpv6.checksum_bad.expert"] {
            if !self.all(field).is_empty() {
                out.push(format!("{field} present"));
            }
        }
        out
    }
}

fn parse_severity(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A directory under the system temp dir, removed with everything in it on drop (also on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("ferry-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).expect("create a fresh temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("case addresses are valid literals")
}

fn inner_src_port(index: usize) -> u16 {
    30000 + index as u16
}

fn icmp_ident(index: usize) -> u16 {
    0x4600 + index as u16
}

fn icmp_seq(index: usize) -> u16 {
    index as u16 + 1
}

/// The inner Ethernet frame of case `index`.
fn inner_frame(index: usize, case: &Case) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(INNER_SRC_MAC, INNER_DST_MAC);
    let l3 = match (ip(case.inner.0), ip(case.inner.1)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 63),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 63),
        _ => panic!("case {}: inner addresses of different families", case.name),
    };
    let mut out = Vec::new();
    let written = match (case.l4, ip(case.inner.0).is_ipv4()) {
        (L4::Tcp, _) => l3.tcp(inner_src_port(index), INNER_DST_PORT, 1000, 64240).syn().write(&mut out, &[]),
        (L4::Udp, _) => l3.udp(inner_src_port(index), INNER_DST_PORT).write(&mut out, PAYLOAD),
        (L4::Icmp, true) => l3.icmpv4_echo_request(icmp_ident(index), icmp_seq(index)).write(&mut out, PAYLOAD),
        (L4::Icmp, false) => l3.icmpv6_echo_request(icmp_ident(index), icmp_seq(index)).write(&mut out, PAYLOAD),
    };
    written.expect("etherparse builds the inner frame");
    out
}

/// Case `index` encapsulated by ferry: the full outer frame.
fn encapsulated(index: usize, case: &Case) -> Vec<u8> {
    let mut params =
        TemplateParams::new(case.kind, case.vni, OUTER_SRC_MAC, OUTER_DST_MAC, ip(case.outer.0), ip(case.outer.1));
    params.vlan = case.vlan;
    params.geneve_options = case.options;
    if let Some(port) = case.port {
        params.dst_port = port;
    }
    let tpl = TunnelTemplate::new(&params).expect("case parameters are valid");
    let inner = inner_frame(index, case);
    let mut buf = vec![0u8; HEADROOM + inner.len()];
    buf[HEADROOM..].copy_from_slice(&inner);
    let mut frame = FrameBuf::new(&mut buf, HEADROOM, inner.len()).expect("inner frame fits the buffer");
    encap(&tpl, &mut frame).expect("ferry encapsulates a well-formed inner frame");
    assert_eq!(frame.len(), inner.len() + tpl.overhead(), "case {}", case.name);
    frame.data().to_vec()
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let file = std::fs::File::create(path).expect("create the pcap in the temp dir");
    let mut writer = PcapWriter::new(file).expect("write the pcap header");
    for (i, f) in frames.iter().enumerate() {
        let len = u32::try_from(f.len()).expect("frames are small");
        writer.write_packet(&PcapPacket::new(Duration::from_millis(i as u64), len, f)).expect("write a pcap record");
    }
}

/// Whether tshark can be run. Without it: fail under CI, skip otherwise.
/// tshark installed: true. Otherwise fail when `CI` is set (CI must run this oracle), or skip.
fn tshark_available(test: &str) -> bool {
    let ok = ferry_testsupport::have_tool("tshark");
    if !ok {
        ferry_testsupport::skip(test, "needs tshark (apt-get install tshark) for the tshark oracle");
    }
    ok
}

/// Decode `pcap` with tshark, checksum validation on, and return one [`Decoded`] per frame.
fn tshark_decode(pcap: &Path) -> Vec<Decoded> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-n")
        .arg("-r")
        .arg(pcap)
        // Flannel's VXLAN port is not registered with Wireshark.
        .args(["-d", &format!("udp.port=={FLANNEL_PORT},vxlan")])
        // Checksum validation is off by default: without these every status reads "unverified".
        .args(["-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE"])
        .args(["-T", "fields", "-E", "header=n", "-E", "separator=/t", "-E", "occurrence=a"])
        .args(["-E", &format!("aggregator={AGGREGATOR}")]);
    for f in FIELDS {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("run tshark");
    assert!(out.status.success(), "tshark failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    let stdout = String::from_utf8(out.stdout).expect("tshark prints UTF-8");
    stdout
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), FIELDS.len(), "tshark line has one column per field: {line:?}");
            Decoded(
                FIELDS
                    .iter()
                    .zip(cols)
                    .map(|(f, c)| {
                        let values =
                            if c.is_empty() { Vec::new() } else { c.split(AGGREGATOR).map(String::from).collect() };
                        (*f, values)
                    })
                    .collect(),
            )
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn expect(out: &mut Vec<String>, what: &str, got: Option<&str>, want: &str) {
    if got != Some(want) {
        out.push(format!("{what}: tshark says {got:?}, sent {want:?}"));
    }
}

/// Compare one case's decoded frame with what was sent; returns every mismatch.
fn mismatches(index: usize, case: &Case, d: &Decoded) -> Vec<String> {
    let mut out = Vec::new();
    let (outer_v4, inner_v4) = (ip(case.outer.0).is_ipv4(), ip(case.inner.0).is_ipv4());
    let fam = |v4: bool| if v4 { "ip" } else { "ipv6" };

    // Layering: exactly the headers sent, in order.
    let inner_l4 = match (case.l4, inner_v4) {
        (L4::Tcp, _) => "tcp",
        (L4::Udp, _) => "udp:data",
        (L4::Icmp, true) => "icmp:data",
        (L4::Icmp, false) => "icmpv6:data",
    };
    let vlan = if case.vlan.is_some() { "vlan:ethertype:" } else { "" };
    let tunnel = if case.kind == TunnelKind::Vxlan { "vxlan" } else { "geneve" };
    let protocols =
        format!("eth:ethertype:{vlan}{}:udp:{tunnel}:eth:ethertype:{}:{inner_l4}", fam(outer_v4), fam(inner_v4));
    expect(&mut out, "frame.protocols", d.first("frame.protocols"), &protocols);
    if let Some(v) = case.vlan {
        expect(&mut out, "vlan.id", d.first("vlan.id"), &v.to_string());
    }

    // Outer addresses are the first occurrence of their family, inner ones the last.
    let (o, i) = (fam(outer_v4), fam(inner_v4));
    expect(&mut out, "outer src", d.first(&format!("{o}.src")), &ip(case.outer.0).to_string());
    expect(&mut out, "outer dst", d.first(&format!("{o}.dst")), &ip(case.outer.1).to_string());
    expect(&mut out, "inner src", d.last(&format!("{i}.src")), &ip(case.inner.0).to_string());
    expect(&mut out, "inner dst", d.last(&format!("{i}.dst")), &ip(case.inner.1).to_string());

    let port = case.port.unwrap_or(case.kind.default_port());
    expect(&mut out, "outer udp dst port", d.first("udp.dstport"), &port.to_string());
    match d.first("udp.srcport").map(str::parse::<u16>) {
        Some(Ok(p)) if (49152..=65535).contains(&p) => {}
        other => out.push(format!("outer udp src port {other:?} is not in 49152-65535")),
    }
    // Over IPv4 ferry sends a zero UDP checksum (RFC 7348); over IPv6 a computed one.
    let outer_udp_sum = if outer_v4 { CHECKSUM_NOT_PRESENT } else { CHECKSUM_GOOD };
    expect(&mut out, "outer udp checksum status", d.first("udp.checksum.status"), outer_udp_sum);

    // Every IPv4 header checksum, outer and inner, is checked and good.
    let want_ip_sums = usize::from(outer_v4) + usize::from(inner_v4);
    let ip_sums = d.all("ip.checksum.status");
    if ip_sums.len() != want_ip_sums || ip_sums.iter().any(|s| s != CHECKSUM_GOOD) {
        out.push(format!("ip.checksum.status {ip_sums:?}, want {want_ip_sums} x good"));
    }

    match case.kind {
        TunnelKind::Vxlan => {
            expect(&mut out, "vxlan I flag", d.first("vxlan.flag_i"), "1");
            expect(&mut out, "vxlan.vni", d.first("vxlan.vni"), &case.vni.to_string());
        }
        TunnelKind::Geneve => {
            expect(&mut out, "geneve.version", d.first("geneve.version"), "0");
            // Wireshark shows the Geneve VNI in hex, the VXLAN one in decimal.
            expect(&mut out, "geneve.vni", d.first("geneve.vni"), &format!("0x{:06x}", case.vni));
            expect(&mut out, "geneve.proto_type", d.first("geneve.proto_type"), "0x6558");
            let critical = case.options.iter().any(|o| o.kind & 0x80 != 0);
            expect(&mut out, "geneve C flag", d.first("geneve.flags.critical"), if critical { "1" } else { "0" });
            let classes: Vec<String> = case.options.iter().map(|o| format!("0x{:04x}", o.class)).collect();
            let kinds: Vec<String> = case.options.iter().map(|o| format!("0x{:02x}", o.kind)).collect();
            let crits: Vec<String> = case.options.iter().map(|o| u8::from(o.kind & 0x80 != 0).to_string()).collect();
            // `geneve.option.length` is both the header's Opt Len (first, in bytes) and each option's
            // length (in bytes, TLV header included).
            let total: usize = case.options.iter().map(|o| 4 + o.data.len()).sum();
            let lens: Vec<String> = std::iter::once(total)
                .chain(case.options.iter().map(|o| 4 + o.data.len()))
                .map(|l| l.to_string())
                .collect();
            for (field, want) in [
                ("geneve.option.class", classes),
                ("geneve.option.type", kinds),
                ("geneve.option.type.critical", crits),
                ("geneve.option.length", lens),
            ] {
                if d.all(field) != want.as_slice() {
                    out.push(format!("{field}: tshark says {:?}, sent {want:?}", d.all(field)));
                }
            }
        }
    }

    match (case.l4, inner_v4) {
        (L4::Tcp, _) => {
            expect(&mut out, "inner tcp src port", d.first("tcp.srcport"), &inner_src_port(index).to_string());
            expect(&mut out, "inner tcp dst port", d.first("tcp.dstport"), &INNER_DST_PORT.to_string());
            expect(&mut out, "inner tcp checksum status", d.first("tcp.checksum.status"), CHECKSUM_GOOD);
        }
        (L4::Udp, _) => {
            expect(&mut out, "inner udp src port", d.last("udp.srcport"), &inner_src_port(index).to_string());
            expect(&mut out, "inner udp dst port", d.last("udp.dstport"), &INNER_DST_PORT.to_string());
            expect(&mut out, "inner udp checksum status", d.last("udp.checksum.status"), CHECKSUM_GOOD);
            expect(&mut out, "inner udp payload", d.first("data.data"), &hex(PAYLOAD));
        }
        (L4::Icmp, true) => {
            expect(&mut out, "icmp type", d.first("icmp.type"), "8");
            expect(&mut out, "icmp ident", d.first("icmp.ident"), &icmp_ident(index).to_string());
            expect(&mut out, "icmp seq", d.first("icmp.seq"), &icmp_seq(index).to_string());
            expect(&mut out, "icmp checksum status", d.first("icmp.checksum.status"), CHECKSUM_GOOD);
            expect(&mut out, "icmp payload", d.first("data.data"), &hex(PAYLOAD));
        }
        (L4::Icmp, false) => {
            expect(&mut out, "icmpv6 type", d.first("icmpv6.type"), "128");
            expect(
                &mut out,
                "icmpv6 ident",
                d.first("icmpv6.echo.identifier"),
                &format!("0x{:04x}", icmp_ident(index)),
            );
            expect(&mut out, "icmpv6 seq", d.first("icmpv6.echo.sequence_number"), &icmp_seq(index).to_string());
            expect(&mut out, "icmpv6 checksum status", d.first("icmpv6.checksum.status"), CHECKSUM_GOOD);
            expect(&mut out, "icmpv6 payload", d.first("data.data"), &hex(PAYLOAD));
        }
    }
    out.extend(d.problems());
    out
}

/// A deliberately broken copy of a good frame and the problem tshark must report for it.
struct Corrupted {
    what: &'static str,
    frame: Vec<u8>,
    /// Prefixes of [`Decoded::problems`] entries, each of which must be present.
    flags: &'static [&'static str],
}

/// The good frame of the case named `name`, checking the layout the byte offsets below assume.
fn frame_of<'f>(frames: &'f [Vec<u8>], name: &str, outer_v4: bool, kind: TunnelKind) -> &'f [u8] {
    let i = CASES.iter().position(|c| c.name == name).expect("case exists");
    let c = &CASES[i];
    assert!(c.vlan.is_none() && ip(c.outer.0).is_ipv4() == outer_v4 && c.kind == kind, "layout of {name}");
    &frames[i]
}

fn corrupted(frames: &[Vec<u8>]) -> Vec<Corrupted> {
    // Outer IPv4 header checksum (bytes 24-25 behind an untagged Ethernet header) off by one.
    let mut bad_ip = frame_of(frames, "vxlan v4 underlay, inner v4 tcp", true, TunnelKind::Vxlan).to_vec();
    bad_ip[25] ^= 0x01;
    // Outer UDP checksum over IPv6 (bytes 60-61: 14 Ethernet + 40 IPv6 + 6) off by one.
    let mut bad_udp = frame_of(frames, "vxlan v6 underlay, inner v6 tcp", false, TunnelKind::Vxlan).to_vec();
    bad_udp[61] ^= 0x01;
    // Cut inside the Geneve options (14 Ethernet + 20 IPv4 + 8 UDP + 8 Geneve + 6).
    let mut cut =
        frame_of(frames, "geneve v4 underlay, mixed options, inner v4 udp", true, TunnelKind::Geneve).to_vec();
    cut.truncate(14 + 20 + 8 + 8 + 6);
    vec![
        Corrupted { what: "wrong outer IPv4 checksum", frame: bad_ip, flags: &["ip.checksum.status bad", "expert"] },
        Corrupted { what: "wrong outer UDP checksum over IPv6", frame: bad_udp, flags: &["udp.checksum.status bad"] },
        Corrupted { what: "frame cut inside the Geneve options", frame: cut, flags: &["malformed packet"] },
    ]
}

#[test]
fn tshark_decodes_ferry_frames_with_valid_checksums() {
    if !tshark_available("tshark_decodes_ferry_frames_with_valid_checksums") {
        return;
    }
    let mut frames: Vec<Vec<u8>> = CASES.iter().enumerate().map(|(i, c)| encapsulated(i, c)).collect();
    // Appended after the good frames, they prove each kind of check can fail.
    let bad = corrupted(&frames);
    frames.extend(bad.iter().map(|b| b.frame.clone()));

    let dir = TempDir::new("tshark-oracle");
    let pcap = dir.0.join("ferry.pcap");
    write_pcap(&pcap, &frames);
    let decoded = tshark_decode(&pcap);
    assert_eq!(decoded.len(), frames.len(), "tshark reports one line per frame");

    let mut failures = Vec::new();
    for (i, (case, d)) in CASES.iter().zip(&decoded).enumerate() {
        let m = mismatches(i, case, d);
        if !m.is_empty() {
            failures.push(format!("frame {} ({}):\n    {}", i + 1, case.name, m.join("\n    ")));
        }
    }
    for (b, d) in bad.iter().zip(&decoded[CASES.len()..]) {
        let problems = d.problems();
        for flag in b.flags {
            if !problems.iter().any(|p| p.starts_with(flag)) {
                failures.push(format!("{}: tshark must report \"{flag}...\", reported {problems:?}", b.what));
            }
        }
    }
    assert!(failures.is_empty(), "tshark disagrees with ferry:\n{}", failures.join("\n"));
}
