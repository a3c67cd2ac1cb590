//! Golden check of ferry's decapsulation against an independent oracle: frames built by the Linux
//! kernel's own VXLAN device (test side; exercises the hot-path `decap` only on captured frames).
//!
//! Each test builds two network namespaces joined by a veth pair (the underlay) and configures a
//! kernel `vxlan` device in namespace A the way Flannel's vxlan backend does: `nolearning`, a static
//! neighbour entry for the remote node's gateway address, a static FDB entry pointing the remote
//! VTEP MAC at the remote node, and an `onlink` route for the remote pod CIDR. It then pings and
//! sends a few UDP datagrams from A to a remote pod, captures what reaches namespace B's veth with a
//! bounded `tcpdump`, and runs every captured tunnel frame through [`ferry_encap::decap`] configured
//! for node B. The kernel's encapsulation was written without looking at ferry, so a successful
//! decap with the expected outer source, VNI, inner MACs, addresses and payloads shows ferry reads
//! real VXLAN, not only its own.
//!
//! Needs root (namespaces, links) and `ip`, `bridge`, `tcpdump`, `ping`, `bash`, `timeout`, `kill`
//! and `ethtool`. Without them the tests fail when `CI` is set and print a SKIP line otherwise.
//! Everything lives in namespaces the test creates; a guard deletes them even when a test panics.

use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use etherparse::{Icmpv4Type, Icmpv6Type, LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use ferry_encap::offload::complete_checksum;
use ferry_encap::{DecapConfig, DropReason, FrameBuf, TunnelKind, decap};
use ferry_testsupport::run;
use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;

/// Echo requests sent per test.
const PINGS: usize = 3;
/// `ping -p`: the echo payload is this pattern repeated. With `-s 12`, less than a `struct timeval`,
/// ping puts no timestamp in the payload, so every byte of it is known.
const PING_PATTERN: [u8; 4] = [0xa5, 0x5a, 0x0f, 0xf0];
const PING_SIZE: usize = 12;
/// UDP datagrams sent per test, one per payload.
const UDP_PAYLOADS: [&str; 3] = ["ferry-kernel-oracle-1", "ferry-kernel-oracle-2", "ferry-kernel-oracle-3"];
const UDP_DST_PORT: u16 = 40001;
/// Bounds on everything that waits: tcpdump getting ready, the capture completing, any helper.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(15);
/// `timeout(1)` bound on tcpdump itself, so it cannot outlive a test process that was killed.
const TCPDUMP_LIFETIME_SECS: &str = "30";
const HELPER_LIFETIME_SECS: &str = "10";

/// One two-node topology: A runs the kernel VXLAN device, B is the remote node where we capture.
#[derive(Debug)]
struct Topology {
    /// Distinct per test: tests in this file run in parallel threads of one process.
    tag: &'static str,
    vni: u32,
    port: u16,
    /// Underlay addresses of A and B and their prefix length.
    underlay: (&'static str, &'static str, u8),
    /// The VXLAN device's own MAC (Flannel's VtepMAC of node A) and node B's VTEP MAC.
    vtep_mac: (&'static str, &'static str),
    /// The address on A's VXLAN device (Flannel puts the pod network address there, as a /32 or /128).
    pod_a: &'static str,
    /// B's pod network address: the gateway of B's pod CIDR, resolved statically to B's VTEP MAC.
    pod_gw_b: &'static str,
    pod_cidr_b: &'static str,
    /// A remote pod in B's CIDR that the traffic is sent to.
    target: &'static str,
    /// Turn off tx checksum offload on A's veth (see [`Topology::setup`]).
    tx_checksum_off: bool,
}

impl Topology {
    fn underlay_a(&self) -> IpAddr {
        ip(self.underlay.0)
    }

    fn underlay_b(&self) -> IpAddr {
        ip(self.underlay.1)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("topology addresses are valid literals")
}

fn mac(s: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    assert_eq!(parts.len(), 6, "MAC {s:?} has six octets");
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).expect("MAC octets are hex");
    }
    out
}

/// Names of everything a test creates: unique per process (pid) and per test (tag).
#[derive(Debug)]
struct Names {
    ns_a: String,
    ns_b: String,
    veth_a: String,
    veth_b: String,
    vxlan: String,
}

impl Names {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        // Link names are limited to 15 bytes: 5 + a pid of at most 7 digits (pid_max 4194304) fits.
        Names {
            ns_a: format!("ferry-kvx-{pid}-{tag}-a"),
            ns_b: format!("ferry-kvx-{pid}-{tag}-b"),
            veth_a: format!("fka{tag}{pid}"),
            veth_b: format!("fkb{tag}{pid}"),
            vxlan: format!("fkx{tag}{pid}"),
        }
    }
}

/// Owns what a test created: deletes its namespaces (and with them every link in them) and stops
/// the capture on drop, which also runs when the test panics.
#[derive(Debug, Default)]
struct NetnsGuard {
    namespaces: Vec<String>,
    capture: Option<Child>,
}

impl NetnsGuard {
    fn add_netns(&mut self, name: &str) {
        run(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_string());
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // First the capture: a live tcpdump keeps namespace B alive after `ip netns del`.
        if let Some(child) = self.capture.take() {
            stop(child);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Stop `timeout tcpdump ...`: SIGTERM to `timeout`, which forwards it to tcpdump (a SIGKILL would
/// orphan tcpdump), then SIGKILL if it has not exited within two seconds.
fn stop(mut child: Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).output();
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn in_ns<'a>(ns: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(cmd);
    v
}

const TOOLS: &[&str] = &["ip", "bridge", "tcpdump", "ping", "bash", "timeout", "kill", "ethtool"];

/// Root and the tools present: true. Otherwise fail under CI, where these tests must run, or
/// SKIP and return false.
fn prerequisites(test: &str) -> bool {
    ferry_testsupport::privileged(test, "the test creates network namespaces and links", TOOLS)
}

impl Topology {
    /// Build the two namespaces, the underlay veth pair and A's Flannel-style VXLAN device.
    fn setup(&self, names: &Names, guard: &mut NetnsGuard) {
        let (a, b) = (names.ns_a.as_str(), names.ns_b.as_str());
        guard.add_netns(a);
        guard.add_netns(b);
        // Both ends are created directly inside their namespaces: nothing appears in the host's.
        run(&[
            "ip",
            "link",
            "add",
            &names.veth_a,
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            &names.veth_b,
            "netns",
            b,
        ]);
        let plen = self.underlay.2.to_string();
        // `nodad`: an IPv6 address is usable at once instead of after duplicate address detection.
        let nodad: &[&str] = if ip(self.underlay.0).is_ipv6() { &["nodad"] } else { &[] };
        for (ns, dev, addr) in [(a, &names.veth_a, self.underlay.0), (b, &names.veth_b, self.underlay.1)] {
            let cidr = format!("{addr}/{plen}");
            let mut cmd = vec!["ip", "-n", ns, "addr", "add", &cidr, "dev", dev];
            cmd.extend_from_slice(nodad);
            run(&cmd);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        if self.tx_checksum_off {
            // With tx checksum offload on (the veth default) the kernel leaves the outer UDP checksum
            // CHECKSUM_PARTIAL: the frame crosses the veth holding only the pseudo-header sum, to be
            // finished by a NIC that a veth does not have, and tcpdump captures it unfinished. A real
            // NIC would put the finished checksum on the wire; turning offload off makes the kernel
            // compute it in software, so the capture holds what the wire would.
            run(&in_ns(a, &["ethtool", "-K", &names.veth_a, "tx", "off"]));
        }

        let vni = self.vni.to_string();
        let port = self.port.to_string();
        run(&[
            "ip",
            "-n",
            a,
            "link",
            "add",
            &names.vxlan,
            "address",
            self.vtep_mac.0,
            "type",
            "vxlan",
            "id",
            &vni,
            "local",
            self.underlay.0,
            "dstport",
            &port,
            "nolearning",
            "dev",
            &names.veth_a,
        ]);
        // No IPv6 link-local address on the VXLAN device, so the kernel sends nothing of its own
        // (router solicitations, MLD) through it: the capture holds exactly the test's traffic.
        run(&["ip", "-n", a, "link", "set", &names.vxlan, "addrgenmode", "none"]);
        let pod_v6 = ip(self.pod_a).is_ipv6();
        let pod_addr = format!("{}/{}", self.pod_a, if pod_v6 { 128 } else { 32 });
        let mut cmd = vec!["ip", "-n", a, "addr", "add", &pod_addr, "dev", &names.vxlan];
        if pod_v6 {
            cmd.push("nodad");
        }
        run(&cmd);
        run(&["ip", "-n", a, "link", "set", &names.vxlan, "up"]);
        // Flannel's three entries per remote node: neighbour, FDB, route.
        let (gw, remote_mac) = (self.pod_gw_b, self.vtep_mac.1);
        run(&["ip", "-n", a, "neigh", "replace", gw, "lladdr", remote_mac, "dev", &names.vxlan, "nud", "permanent"]);
        run(&in_ns(a, &["bridge", "fdb", "append", remote_mac, "dev", &names.vxlan, "dst", self.underlay.1]));
        run(&["ip", "-n", a, "route", "add", self.pod_cidr_b, "via", gw, "dev", &names.vxlan, "onlink"]);
    }

    /// The VXLAN device's MAC as the kernel reports it (`ip -br link`: name, state, MAC, flags).
    fn vtep_mac_a(&self, names: &Names) -> [u8; 6] {
        let out = run(&["ip", "-n", &names.ns_a, "-br", "link", "show", "dev", &names.vxlan]);
        let field = out.split_whitespace().nth(2).unwrap_or_else(|| panic!("no MAC in `ip -br link`: {out:?}"));
        mac(field)
    }
}

/// A running `tcpdump -w -` in namespace B and the thread collecting its pcap output.
struct Capture {
    stdout: JoinHandle<Vec<u8>>,
    stderr: mpsc::Receiver<String>,
}

/// Start a capture of at most `count` tunnel frames to B and wait until tcpdump is listening.
fn start_capture(topo: &Topology, names: &Names, guard: &mut NetnsGuard, count: usize) -> Capture {
    let filter = format!("udp and dst port {} and dst host {}", topo.port, topo.underlay.1);
    let count = count.to_string();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &names.ns_b, "timeout", TCPDUMP_LIFETIME_SECS, "tcpdump", "-n", "-U"])
        .args(["-i", &names.veth_b, "-c", &count, "-w", "-", &filter])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpdump in namespace B");
    let mut out = child.stdout.take().expect("stdout is piped");
    let err = child.stderr.take().expect("stderr is piped");
    guard.capture = Some(child);
    let stdout = thread::spawn(move || {
        let mut pcap = Vec::new();
        let _ = out.read_to_end(&mut pcap);
        pcap
    });
    let (tx, stderr) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // tcpdump says "listening on ..." once the socket and filter are in place: from then on nothing
    // sent is missed.
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stderr.recv_timeout(left) {
            Ok(line) if line.contains("listening on") => break,
            Ok(line) => said.push(line),
            Err(e) => panic!("tcpdump did not start listening ({e}); it said: {said:?}"),
        }
    }
    Capture { stdout, stderr }
}

/// Wait (bounded) for tcpdump to have captured its count, stop it if it has not, and return the frames.
fn finish_capture(capture: Capture, guard: &mut NetnsGuard) -> Vec<Vec<u8>> {
    let mut child = guard.capture.take().expect("a capture is running");
    let deadline = Instant::now() + CAPTURE_TIMEOUT;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    // Stops it if the deadline passed; frames captured so far are still written (-U).
    stop(child);
    let pcap = capture.stdout.join().expect("the pcap reader thread does not panic");
    let said: Vec<String> = capture.stderr.try_iter().collect();
    let mut reader =
        PcapReader::new(pcap.as_slice()).unwrap_or_else(|e| panic!("tcpdump wrote no pcap ({e}); it said: {said:?}"));
    assert_eq!(reader.header().datalink, DataLink::ETHERNET, "veth captures are Ethernet");
    let mut frames = Vec::new();
    // Bounded by the pcap's length, which tcpdump's -c bounds.
    while let Some(packet) = reader.next_packet() {
        let packet = packet.expect("tcpdump's pcap records are well-formed");
        assert_eq!(packet.orig_len as usize, packet.data.len(), "tcpdump captured whole frames");
        frames.push(packet.data.into_owned());
    }
    frames
}

/// Send the test traffic from namespace A: echo requests and UDP datagrams to the remote pod.
fn send_traffic(topo: &Topology, names: &Names) {
    let pattern: String = PING_PATTERN.iter().map(|b| format!("{b:02x}")).collect();
    let (count, size) = (PINGS.to_string(), PING_SIZE.to_string());
    let ping = Command::new("ip")
        .args(["netns", "exec", &names.ns_a, "timeout", HELPER_LIFETIME_SECS, "ping", "-n", "-c", &count])
        .args(["-i", "0.2", "-W", "1", "-s", &size, "-p", &pattern, topo.target])
        .stdin(Stdio::null())
        .output()
        .expect("run ping in namespace A");
    // Nobody answers behind B, so "no reply" (1) is the expected outcome; 2 means ping could not send.
    assert!(
        matches!(ping.status.code(), Some(0 | 1)),
        "ping failed ({}): {}",
        ping.status,
        String::from_utf8_lossy(&ping.stderr).trim()
    );
    // bash's /dev/udp: each redirection opens a fresh UDP socket and each printf is one datagram.
    let dest = format!("/dev/udp/{}/{UDP_DST_PORT}", topo.target);
    let script = r#"dest=$1; shift; for p in "$@"; do printf %s "$p" >"$dest" || exit 1; done"#;
    let mut cmd = vec!["netns", "exec", &names.ns_a, "timeout", HELPER_LIFETIME_SECS, "bash", "-c", script, "bash"];
    cmd.push(&dest);
    cmd.extend(UDP_PAYLOADS);
    let out = Command::new("ip").args(&cmd).stdin(Stdio::null()).output().expect("run bash in namespace A");
    assert!(
        out.status.success(),
        "sending UDP failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// What one decapsulated inner frame carried.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Echo { id: u16, seq: u16, payload: Vec<u8> },
    Udp { dst_port: u16, payload: Vec<u8> },
}

fn decap_frame(cfg: &DecapConfig, frame: &[u8]) -> Result<(ferry_encap::Decapped, Vec<u8>), DropReason> {
    let mut buf = frame.to_vec();
    let len = buf.len();
    let mut fb = FrameBuf::new(&mut buf, 0, len).expect("the frame fits its own buffer");
    let d = decap(cfg, &mut fb)?;
    Ok((d, fb.data().to_vec()))
}

/// Check the inner frame of captured frame `i` and return what it carried.
fn inspect_inner(i: usize, topo: &Topology, vtep_mac_a: [u8; 6], inner: &[u8]) -> Sent {
    let p = SlicedPacket::from_ethernet(inner).unwrap_or_else(|e| panic!("frame {i}: inner frame does not parse: {e}"));
    match p.link {
        Some(LinkSlice::Ethernet2(eth)) => {
            assert_eq!(eth.source(), vtep_mac_a, "frame {i}: inner source MAC is the VXLAN device's");
            assert_eq!(eth.destination(), mac(topo.vtep_mac.1), "frame {i}: inner destination is B's VTEP MAC");
        }
        other => panic!("frame {i}: inner link layer is not Ethernet II: {other:?}"),
    }
    let (src, dst) = match &p.net {
        Some(NetSlice::Ipv4(v4)) => (IpAddr::V4(v4.header().source_addr()), IpAddr::V4(v4.header().destination_addr())),
        Some(NetSlice::Ipv6(v6)) => (IpAddr::V6(v6.header().source_addr()), IpAddr::V6(v6.header().destination_addr())),
        other => panic!("frame {i}: inner frame is not IP: {other:?}"),
    };
    assert_eq!(src, ip(topo.pod_a), "frame {i}: inner source is A's VXLAN device address");
    assert_eq!(dst, ip(topo.target), "frame {i}: inner destination is the remote pod");
    match p.transport {
        Some(TransportSlice::Icmpv4(icmp)) => match icmp.icmp_type() {
            Icmpv4Type::EchoRequest(h) => Sent::Echo { id: h.id, seq: h.seq, payload: icmp.payload().to_vec() },
            other => panic!("frame {i}: unexpected ICMP {other:?}"),
        },
        Some(TransportSlice::Icmpv6(icmp)) => match icmp.icmp_type() {
            Icmpv6Type::EchoRequest(h) => Sent::Echo { id: h.id, seq: h.seq, payload: icmp.payload().to_vec() },
            other => panic!("frame {i}: unexpected ICMPv6 {other:?}"),
        },
        Some(TransportSlice::Udp(udp)) => {
            Sent::Udp { dst_port: udp.destination_port(), payload: udp.payload().to_vec() }
        }
        other => panic!("frame {i}: unexpected inner transport {other:?}"),
    }
}

/// Where the outer UDP header starts: the kernel sends untagged frames without IP options or
/// extension headers.
fn outer_udp_at(v6: bool) -> usize {
    14 + if v6 { 40 } else { 20 }
}

/// The outer UDP checksum field.
fn outer_udp_checksum(frame: &[u8], v6: bool) -> u16 {
    let at = outer_udp_at(v6) + 6;
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// The whole scenario for one topology.
fn kernel_frames_decapsulate(test: &str, topo: &Topology) {
    if !prerequisites(test) {
        return;
    }
    let names = Names::new(topo.tag);
    let mut guard = NetnsGuard::default();
    topo.setup(&names, &mut guard);
    let vtep_mac_a = topo.vtep_mac_a(&names);
    assert_eq!(vtep_mac_a, mac(topo.vtep_mac.0), "the kernel kept the VXLAN device's configured MAC");

    let expected = PINGS + UDP_PAYLOADS.len();
    let capture = start_capture(topo, &names, &mut guard, expected);
    send_traffic(topo, &names);
    let frames = finish_capture(capture, &mut guard);
    assert_eq!(
        frames.len(),
        expected,
        "captured every tunnel frame sent ({PINGS} echo requests, {} UDP)",
        UDP_PAYLOADS.len()
    );

    let mut cfg = DecapConfig::new(TunnelKind::Vxlan, topo.vni, topo.underlay_b());
    cfg.port = topo.port;
    // ferry's defaults: outer UDP checksums verified, zero ones over IPv6 refused. Every frame of
    // the kernel's VXLAN device must pass with them.
    assert!(cfg.verify_udp_checksum && !cfg.accept_ipv6_zero_udp_checksum);
    let outer_v6 = topo.underlay_a().is_ipv6();
    let mut seen = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let (d, inner) = decap_frame(&cfg, frame)
            .unwrap_or_else(|r| panic!("frame {i}: ferry drops a kernel VXLAN frame: {r:?} ({})", r.description()));
        assert_eq!(d.outer_src, topo.underlay_a(), "frame {i}: outer source is node A");
        assert_eq!(d.vni, topo.vni, "frame {i}: VNI");
        seen.push(inspect_inner(i, topo, vtep_mac_a, &inner));

        if !topo.tx_checksum_off {
            // Offload on: an echo request arrives with the outer UDP checksum unfinished; a UDP
            // datagram arrives with its inner UDP checksum unfinished and an outer one the kernel
            // computed as if the inner were final (local checksum offload). A receiver behind a veth
            // finishes both with `complete_checksum`, inner first because the outer covers it; the
            // kernel's own outer checksum then verifies only if ferry finished the inner one exactly
            // as the kernel would have.
            let mut fixed = frame.clone();
            let inner_at = outer_udp_at(outer_v6) + 8 + 8;
            assert_eq!(&frame[inner_at..inner_at + inner.len()], inner, "frame {i}: inner frame position");
            complete_checksum(&mut fixed[inner_at..]).unwrap_or_else(|r| panic!("frame {i}: inner checksum: {r:?}"));
            complete_checksum(&mut fixed).unwrap_or_else(|r| panic!("frame {i}: outer checksum: {r:?}"));
            let verifying = DecapConfig { verify_udp_checksum: true, ..cfg };
            let (dv, _) = decap_frame(&verifying, &fixed)
                .unwrap_or_else(|r| panic!("frame {i}: checksums still wrong after completion: {r:?}"));
            assert_eq!(dv, d, "frame {i}: completion changes nothing decap reports");
        } else {
            // The kernel computed a real checksum, so verification has something to verify.
            assert_ne!(outer_udp_checksum(frame, outer_v6), 0, "frame {i}: the kernel sent a UDP checksum");
            let verifying = DecapConfig { verify_udp_checksum: true, ..cfg };
            let (dv, inner_v) = decap_frame(&verifying, frame)
                .unwrap_or_else(|r| panic!("frame {i}: the kernel's UDP checksum does not verify: {r:?}"));
            assert_eq!((dv, inner_v), (d, inner), "frame {i}: verification changes nothing else");
        }

        let wrong_vni = DecapConfig { vni: (topo.vni + 1) & 0x00ff_ffff, ..cfg };
        assert_eq!(decap_frame(&wrong_vni, frame).err(), Some(DropReason::VniMismatch), "frame {i}: wrong VNI");
    }

    // Exactly what was sent, in order: echo requests 1..=PINGS of one ping process, then the datagrams.
    let ping_payload: Vec<u8> = PING_PATTERN.iter().copied().cycle().take(PING_SIZE).collect();
    let id = match seen.first() {
        Some(Sent::Echo { id, .. }) => *id,
        other => panic!("the first frame is the first echo request, got {other:?}"),
    };
    let mut want: Vec<Sent> =
        (1..=PINGS as u16).map(|seq| Sent::Echo { id, seq, payload: ping_payload.clone() }).collect();
    want.extend(UDP_PAYLOADS.iter().map(|p| Sent::Udp { dst_port: UDP_DST_PORT, payload: p.as_bytes().to_vec() }));
    assert_eq!(seen, want, "inner traffic is what A sent");
}

#[test]
fn kernel_vxlan_ipv4_iana_port() {
    kernel_frames_decapsulate(
        "kernel_vxlan_ipv4_iana_port",
        &Topology {
            tag: "v4",
            vni: 42,
            port: 4789,
            underlay: ("172.31.4.1", "172.31.4.2", 24),
            vtep_mac: ("02:f4:00:00:00:0a", "02:f4:00:00:00:0b"),
            pod_a: "10.244.1.0",
            pod_gw_b: "10.244.2.0",
            pod_cidr_b: "10.244.2.0/24",
            target: "10.244.2.5",
            // Left on: the veth hands over the kernel's outer UDP checksums unfinished (see
            // `setup`), and ferry's default decap, which verifies them, must accept them (the
            // partial and local-checksum-offload forms); the test then also finishes them with
            // `offload::complete_checksum` and verifies.
            tx_checksum_off: false,
        },
    );
}

#[test]
fn kernel_vxlan_ipv4_flannel_port() {
    kernel_frames_decapsulate(
        "kernel_vxlan_ipv4_flannel_port",
        &Topology {
            tag: "fl",
            vni: 1,
            port: 8472,
            underlay: ("172.31.84.1", "172.31.84.2", 24),
            vtep_mac: ("02:f8:00:00:00:0a", "02:f8:00:00:00:0b"),
            pod_a: "10.244.1.0",
            pod_gw_b: "10.244.2.0",
            pod_cidr_b: "10.244.2.0/24",
            target: "10.244.2.7",
            tx_checksum_off: false,
        },
    );
}

#[test]
fn kernel_vxlan_ipv6_underlay() {
    kernel_frames_decapsulate(
        "kernel_vxlan_ipv6_underlay",
        &Topology {
            tag: "v6",
            vni: 0x00ab_cdef,
            port: 4789,
            underlay: ("fd00:31:6::1", "fd00:31:6::2", 64),
            vtep_mac: ("02:f6:00:00:00:0a", "02:f6:00:00:00:0b"),
            // Flannel's IPv6 backend: IPv6 pods over an IPv6 underlay.
            pod_a: "fd10:244:1::",
            pod_gw_b: "fd10:244:2::",
            pod_cidr_b: "fd10:244:2::/64",
            target: "fd10:244:2::5",
            // Over IPv6 the kernel always sends a UDP checksum; with offload off it is finished in
            // software, and decap verifies it.
            tx_checksum_off: true,
        },
    );
}
