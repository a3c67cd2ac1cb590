//! `ferry pktgen` end to end (privileged; test side): the built binary sends on one end of a veth
//! pair and receives on the other, each end in a namespace of its own, and the test checks the
//! JSON summaries a user would read; a `--encap vxlan` frame captured by tcpdump decodes with
//! etherparse as VXLAN with the asked VNI around the generator's probe.
//!
//! Needs root: without it the test prints SKIP, or fails when `CI` is set. Everything it creates
//! (namespaces, links, processes) is removed by guards, also when an assertion fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const COUNT: u64 = 20_000;

use ferry_testsupport::run;

fn privileged(test: &str) -> bool {
    ferry_testsupport::privileged(test, "namespaces, XDP, AF_XDP", &[])
}

/// Two namespaces joined by a veth pair (`pa` in the first, `pb` in the second); dropping deletes
/// them, and the links with them.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let pid = std::process::id();
        let pair = Pair { a: format!("ferry-pg{pid}{tag}a"), b: format!("ferry-pg{pid}{tag}b") };
        for ns in [&pair.a, &pair.b] {
            run(&["ip", "netns", "add", ns]);
        }
        run(&[
            "ip",
            "-n",
            &pair.a,
            "link",
            "add",
            "pa",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "pb",
            "address",
            "02:00:00:00:00:02",
            "netns",
            &pair.b,
        ]);
        run(&["ip", "-n", &pair.a, "link", "set", "pa", "up"]);
        run(&["ip", "-n", &pair.b, "link", "set", "pb", "up"]);
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stdin(Stdio::null()).output();
        }
    }
}

/// A child process killed when dropped (a failed assertion must not leave it running).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` in namespace `ns` with piped stdout/stderr and wait until a stderr line contains
/// `ready`; returns the process and a receiver of the rest of its stderr.
fn start(ns: &str, cmd: &[&str], ready: &str) -> (Proc, mpsc::Receiver<String>) {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", cmd.join(" ")));
    let mut proc = Proc(child);
    let stderr = proc.0.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(ready) => break,
            Ok(line) => seen.push(line),
            Err(_) => panic!("`{}` never printed `{ready}`; stderr: {seen:?}", cmd.join(" ")),
        }
    }
    (proc, rx)
}

/// Wait (bounded) for `p` to exit successfully and return its stdout as JSON.
fn finish(mut p: Proc, stderr: &mpsc::Receiver<String>, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = p.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "{what} did not finish in time");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut p.0.stdout.take().expect("piped stdout"), &mut out).expect("stdout");
    let err: Vec<String> = stderr.try_iter().collect();
    assert!(status.success(), "{what} failed ({status}); stderr: {err:?}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {out}"))
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for k in path {
        x = &x[k];
    }
    x.as_u64().unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn tx_to_rx_over_veth_counts_every_packet_once() {
    if !privileged("tx_to_rx_over_veth_counts_every_packet_once") {
        return;
    }
    let pair = Pair::new("c");
    let count = COUNT.to_string();
    let (rx, rx_err) = start(
        &pair.b,
        &[BIN, "pktgen", "--iface", "pb", "--mode", "rx", "--count", &count, "--duration", "10", "--json"],
        "pktgen: ready",
    );
    let tx = Command::new("ip")
        .args(["netns", "exec", &pair.a, BIN, "pktgen", "--iface", "pa", "--count", &count, "--rate", "200k"])
        .args(["--flows", "8", "--size", "128", "--duration", "10", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run the generator");
    assert!(tx.status.success(), "tx failed: {}", String::from_utf8_lossy(&tx.stderr));
    let txj: Value = serde_json::from_slice(&tx.stdout).expect("tx JSON");
    let rxj = finish(rx, &rx_err, "rx");

    assert_eq!(txj["mode"], "tx");
    assert_eq!(u(&txj, &["tx", "packets"]), COUNT, "{txj}");
    assert_eq!(u(&txj, &["tx", "bytes"]), COUNT * 128, "{txj}");
    assert_eq!(u(&txj, &["tx", "unfinished"]), 0, "{txj}");

    assert_eq!(rxj["mode"], "rx");
    assert_eq!(u(&rxj, &["rx", "packets"]), u(&txj, &["tx", "packets"]), "received == sent: {rxj}");
    assert_eq!(u(&rxj, &["rx", "lost"]), 0, "{rxj}");
    assert_eq!(u(&rxj, &["rx", "duplicates"]), 0, "{rxj}");
    assert_eq!(u(&rxj, &["rx", "flows"]), 8, "{rxj}");
    assert_eq!(u(&rxj, &["rx", "tunnelled"]), 0, "{rxj}");
    let lat = &rxj["rx"]["latency_ns"];
    assert_eq!(u(lat, &["samples"]), COUNT, "{rxj}");
    assert_eq!(u(lat, &["invalid"]), 0, "{rxj}");
    let (min, p50, p99, p999, max) =
        (u(lat, &["min"]), u(lat, &["p50"]), u(lat, &["p99"]), u(lat, &["p999"]), u(lat, &["max"]));
    assert!(0 < min && min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max, "{lat}");
    assert!(max < 10_000_000_000, "one-way latency on one machine is far below the run time: {lat}");
    assert!(rxj["rx"]["pps"].as_f64().is_some_and(|p| p > 0.0), "{rxj}");
}

#[test]
fn encapsulated_frames_decode_as_vxlan_and_the_sink_sees_through_them() {
    if !privileged("encapsulated_frames_decode_as_vxlan_and_the_sink_sees_through_them") {
        return;
    }
    let pair = Pair::new("v");
    let encap = [
        "--encap",
        "vxlan",
        "--vni",
        "4242",
        "--outer-src",
        "192.168.77.1",
        "--outer-dst",
        "192.168.77.2",
        "--outer-dst-mac",
        "02:00:00:00:00:02",
        "--src-ip",
        "10.9.0.1",
        "--dst-ip",
        "10.9.0.2",
        "--dst-port",
        "5000",
    ];

    // 1. A captured frame decodes (etherparse is the oracle, not pktgen's own parser).
    let pcap = std::env::temp_dir().join(format!("ferry-pktgen-{}.pcap", std::process::id()));
    let pcap_s = pcap.to_string_lossy().into_owned();
    let (dump, dump_err) =
        start(&pair.b, &["tcpdump", "-n", "-U", "-c", "3", "-i", "pb", "-w", &pcap_s, "udp"], "listening on");
    let mut cmd = vec![BIN, "pktgen", "--iface", "pa", "--count", "3", "--rate", "1000", "--size", "200"];
    cmd.extend_from_slice(&encap);
    run(&["ip", "netns", "exec", &pair.a].into_iter().chain(cmd).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dump = dump;
    while dump.0.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "tcpdump saw fewer than 3 frames: {:?}",
            dump_err.try_iter().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = std::fs::File::open(&pcap).expect("capture file");
    let mut reader = pcap_file::pcap::PcapReader::new(file).expect("pcap");
    let packet = reader.next_packet().expect("a frame").expect("readable");
    let frame = packet.data.into_owned();
    let _ = std::fs::remove_file(&pcap);
    assert_eq!(frame.len(), 200);
    let outer = SlicedPacket::from_ethernet(&frame).expect("outer parses");
    let Some(NetSlice::Ipv4(ip)) = &outer.net else { panic!("outer IPv4") };
    assert_eq!(ip.header().destination(), [192, 168, 77, 2]);
    let Some(TransportSlice::Udp(udp)) = &outer.transport else { panic!("outer UDP") };
    assert_eq!(udp.destination_port(), 4789);
    let vx = udp.payload();
    assert_eq!(vx[0], 0x08, "VXLAN flags: the I bit");
    assert_eq!(u32::from_be_bytes([0, vx[4], vx[5], vx[6]]), 4242, "VNI");
    let inner = SlicedPacket::from_ethernet(&vx[8..]).expect("inner parses");
    let Some(NetSlice::Ipv4(iip)) = &inner.net else { panic!("inner IPv4") };
    assert_eq!((iip.header().source(), iip.header().destination()), ([10, 9, 0, 1], [10, 9, 0, 2]));
    let Some(TransportSlice::Udp(iudp)) = &inner.transport else { panic!("inner UDP") };
    assert_eq!(iudp.destination_port(), 5000);
    assert_eq!(&iudp.payload()[..4], b"FYpg", "the probe's magic");

    // 2. The sink finds the probes inside the tunnel.
    let (rx, rx_err) = start(
        &pair.b,
        &[BIN, "pktgen", "--iface", "pb", "--mode", "rx", "--count", "2000", "--duration", "10", "--json"],
        "pktgen: ready",
    );
    let mut cmd = vec![BIN, "pktgen", "--iface", "pa", "--count", "2000", "--rate", "100k", "--imix", "--flows", "3"];
    cmd.extend_from_slice(&encap);
    run(&["ip", "netns", "exec", &pair.a].into_iter().chain(cmd).collect::<Vec<_>>());
    let rxj = finish(rx, &rx_err, "rx");
    assert_eq!(u(&rxj, &["rx", "packets"]), 2000, "{rxj}");
    assert_eq!(u(&rxj, &["rx", "tunnelled"]), 2000, "{rxj}");
    assert_eq!((u(&rxj, &["rx", "lost"]), u(&rxj, &["rx", "duplicates"])), (0, 0), "{rxj}");
    assert_eq!(u(&rxj, &["rx", "flows"]), 3, "{rxj}");
}

#[test]
fn a_missing_interface_is_a_clear_error() {
    // Checked before anything privileged, so this runs everywhere.
    let out = Command::new(BIN).args(["pktgen", "--iface", "ferry-nope0"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interface `ferry-nope0` does not exist"), "{err}");
}
