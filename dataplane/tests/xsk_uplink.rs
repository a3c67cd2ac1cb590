//! Privileged tests of ferry's uplink XDP program (test side): on a veth in a private namespace,
//! with an AF_XDP socket bound, only UDP to the tunnel port and the node's own address reaches the
//! socket, while other UDP reaches the kernel's sockets and ping (ARP, ICMP, IPv6 neighbour
//! discovery) is answered by the kernel through the interface ferry holds. A table of crafted
//! frames (VLAN tags, fragments, IP options, extension headers, truncation) is run through the
//! loaded program with `BPF_PROG_TEST_RUN`.
//!
//! Needs root; without it the tests fail when `CI` is set and print SKIP otherwise. Everything
//! runs in namespaces the tests create; a guard deletes them even when a test panics. Every wait
//! is bounded.

mod xsk_util;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use ferry_dataplane::port::Port;
use ferry_dataplane::port::xsk::{XskMem, XskMemConfig, XskPort, XskPortConfig};
use ferry_dataplane::xdp::{UplinkConfig, XdpAction, XdpMode, XdpProgram};
use xsk_util::*;

const TUNNEL_PORT: u16 = 4789;
const OTHER_PORT: u16 = 5555;
/// A second address of node A: tunnel traffic to it is not for ferry.
const A4_OTHER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);

fn kernel_socket(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    s
}

/// Payloads queued on `sock` (reads until a read times out).
fn kernel_payloads(sock: &UdpSocket) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        out.insert(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[test]
fn only_tunnel_traffic_for_this_node_reaches_ferry() {
    if !privileged("only_tunnel_traffic_for_this_node_reaches_ferry") {
        return;
    }
    let t = pair(1);
    addr(&t.a, &format!("{A4_OTHER}/32"));
    let _in_a = InNetns::enter(&t.a.ns);
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let mut free = FreeFrames::all(mem.frame_count());
    let mut port = XskPort::open(&mem, &t.a.name, 0, &XskPortConfig::default()).expect("bind");
    let prog =
        XdpProgram::uplink(&UplinkConfig { tunnel_port: TUNNEL_PORT, local_v4: Some(A4), local_v6: Some(A6) }, 1)
            .expect("load");
    prog.add_port(&port).expect("socket map");
    let att = prog.attach(&t.a.name, XdpMode::Auto).expect("attach");
    assert!(has_xdp(&t.a));
    port.refill(&mut free);

    // The kernel's own sockets on node A, on the tunnel port and another port.
    let k_tunnel4 = kernel_socket(&format!("0.0.0.0:{TUNNEL_PORT}"));
    let k_tunnel6 = kernel_socket(&format!("[{A6}]:{TUNNEL_PORT}"));
    let k_other4 = kernel_socket(&format!("0.0.0.0:{OTHER_PORT}"));
    let k_other6 = kernel_socket(&format!("[{A6}]:{OTHER_PORT}"));

    // Node B's kernel sends (it resolves A's address with ARP / neighbour discovery first, which
    // must reach A's kernel through the program).
    {
        let _in_b = InNetns::enter(&t.b.ns);
        let s4 = UdpSocket::bind("0.0.0.0:0").expect("bind v4 sender");
        let s6 = UdpSocket::bind("[::]:0").expect("bind v6 sender");
        for (sock, payload, to) in [
            (&s4, "xsk-v4", format!("{A4}:{TUNNEL_PORT}")),
            (&s4, "kernel-v4-port", format!("{A4}:{OTHER_PORT}")),
            (&s4, "kernel-v4-addr", format!("{A4_OTHER}:{TUNNEL_PORT}")),
            (&s6, "xsk-v6", format!("[{A6}]:{TUNNEL_PORT}")),
            (&s6, "kernel-v6-port", format!("[{A6}]:{OTHER_PORT}")),
        ] {
            sock.send_to(payload.as_bytes(), &to).unwrap_or_else(|e| panic!("send to {to}: {e}"));
        }
    }

    // What ferry's socket got: exactly the two tunnel datagrams for this node.
    let mut xsk = BTreeSet::new();
    let mut batch = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
    let end = deadline(5);
    let mut settle: Option<Instant> = None;
    while Instant::now() < end && settle.is_none_or(|s| Instant::now() < s) {
        let n = port.recv(&mut mem, &mut batch);
        for p in &batch[..n] {
            let (dport, payload) = udp_of(mem.bytes(*p)).expect("only UDP reaches ferry");
            assert_eq!(dport, TUNNEL_PORT);
            xsk.insert(String::from_utf8_lossy(&payload).into_owned());
            free.push(p.frame);
        }
        port.refill(&mut free);
        if xsk.len() >= 2 && settle.is_none() {
            settle = Some(Instant::now() + Duration::from_millis(300));
        }
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(xsk, BTreeSet::from(["xsk-v4".to_owned(), "xsk-v6".to_owned()]), "what reached ferry's socket");

    // What the kernel got: everything else, and nothing of ferry's.
    // By now (after ferry's socket settled) the kernel has had what it gets.
    let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(kernel_payloads(&k_tunnel4), set(&["kernel-v4-addr"]), "kernel, tunnel port, IPv4");
    assert_eq!(kernel_payloads(&k_tunnel6), set(&[]), "kernel, tunnel port, IPv6");
    assert_eq!(kernel_payloads(&k_other4), set(&["kernel-v4-port"]), "kernel, other port, IPv4");
    assert_eq!(kernel_payloads(&k_other6), set(&["kernel-v6-port"]), "kernel, other port, IPv6");

    // Ping through the interface ferry holds: ARP/ND and ICMP are answered by A's kernel.
    run_in(&t.b.ns, &["ping", "-c", "2", "-i", "0.2", "-W", "2", &A4.to_string()]);
    run_in(&t.b.ns, &["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", &A6.to_string()]);

    att.detach().expect("detach");
    assert!(!has_xdp(&t.a), "detach leaves no XDP program");
}

/// Insert a VLAN tag after the MAC addresses.
fn tagged(frame: &[u8], tpid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&[0x00, 0x64]);
    f.extend_from_slice(&frame[12..]);
    f
}

/// Set the IPv4 flags/fragment offset field of an untagged frame.
fn frag(frame: &[u8], frag_off: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[20..22].copy_from_slice(&frag_off.to_be_bytes());
    f
}

/// Add 4 bytes of IPv4 options (NOPs) to an untagged frame.
fn with_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f[14] = 0x46;
    let total = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[1, 1, 1, 1]);
    f.extend_from_slice(&frame[34..]);
    f
}

fn tcp4(dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(B4.octets(), dst.octets(), 64).tcp(1000, dport, 1, 1000);
    let mut v = Vec::new();
    b.write(&mut v, b"x").expect("frame");
    v
}

/// An IPv6 frame whose UDP follows a hop-by-hop options header.
fn udp6_hop_by_hop(dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let plain = udp6([2; 6], [4; 6], B6, dst, 1000, dport, b"x");
    let mut f = plain[..54].to_vec();
    f[20] = 0; // next header: hop-by-hop
    let len = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]); // next: UDP, PadN
    f.extend_from_slice(&plain[54..]);
    f
}

/// An IPv6 frame whose UDP follows a Fragment header with `frag_off` (offset << 3 | M).
fn udp6_fragment(dst: Ipv6Addr, dport: u16, frag_off: u16) -> Vec<u8> {
    let plain = udp6([2; 6], [4; 6], B6, dst, 1000, dport, b"x");
    let mut f = plain[..54].to_vec();
    f[20] = 44; // next header: Fragment
    let len = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[17, 0]); // next: UDP
    f.extend_from_slice(&frag_off.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x12, 0x34]);
    f.extend_from_slice(&plain[54..]);
    f
}

#[test]
fn uplink_verdicts_on_crafted_frames() {
    if !privileged("uplink_verdicts_on_crafted_frames") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let port = XskPort::open(&mem, &t.a.name, 0, &XskPortConfig::default()).expect("bind");
    let prog =
        XdpProgram::uplink(&UplinkConfig { tunnel_port: TUNNEL_PORT, local_v4: Some(A4), local_v6: Some(A6) }, 1)
            .expect("load");
    // Before a socket is set, even tunnel traffic passes: the node is never cut off.
    let tunnel4 = udp4([2; 6], [4; 6], B4, A4, 1000, TUNNEL_PORT, b"vxlan");
    assert_eq!(prog.test_run(&tunnel4).expect("run"), XdpAction::Pass, "no socket yet");
    prog.add_port(&port).expect("socket map");

    use XdpAction::{Pass, Redirect};
    let tunnel6 = udp6([2; 6], [4; 6], B6, A6, 1000, TUNNEL_PORT, b"vxlan");
    let cases: Vec<(&str, Vec<u8>, XdpAction)> = vec![
        ("IPv4 tunnel", tunnel4.clone(), Redirect),
        ("IPv6 tunnel", tunnel6.clone(), Redirect),
        ("802.1Q-tagged IPv4 tunnel", tagged(&tunnel4, 0x8100), Redirect),
        ("802.1ad-tagged IPv6 tunnel", tagged(&tunnel6, 0x88a8), Redirect),
        ("IPv4 with options", with_options(&tunnel4), Redirect),
        ("two VLAN tags", tagged(&tagged(&tunnel4, 0x8100), 0x8100), Pass),
        // A tunnel datagram's first fragment goes to ferry, which counts it (outer_fragment);
        // a later one carries no port and passes (the kernel never completes the datagram).
        ("IPv4 first fragment (MF)", frag(&tunnel4, 0x2000), Redirect),
        ("IPv4 first fragment, other port", frag(&udp4([2; 6], [4; 6], B4, A4, 1000, OTHER_PORT, b"x"), 0x2000), Pass),
        ("IPv4 later fragment", frag(&tunnel4, 0x0010), Pass),
        ("IPv4 last fragment", frag(&tunnel4, 0x0020), Pass),
        ("IPv6 first fragment", udp6_fragment(A6, TUNNEL_PORT, 0x0001), Redirect),
        ("IPv6 first fragment, other port", udp6_fragment(A6, OTHER_PORT, 0x0001), Pass),
        ("IPv6 later fragment", udp6_fragment(A6, TUNNEL_PORT, 0x0009), Pass),
        ("IPv6 first fragment, other address", udp6_fragment(B6, TUNNEL_PORT, 0x0001), Pass),
        // Malformed IPv4 is left to the kernel (its own statistics count it).
        (
            "IPv4 IHL 4",
            {
                let mut f = tunnel4.clone();
                f[14] = 0x44;
                f
            },
            Pass,
        ),
        (
            "IPv4 version 5",
            {
                let mut f = tunnel4.clone();
                f[14] = 0x55;
                f
            },
            Pass,
        ),
        ("IPv4 DF set", frag(&tunnel4, 0x4000), Redirect),
        ("IPv4 other port", udp4([2; 6], [4; 6], B4, A4, 1000, OTHER_PORT, b"x"), Pass),
        ("IPv4 other address", udp4([2; 6], [4; 6], B4, A4_OTHER, 1000, TUNNEL_PORT, b"x"), Pass),
        ("IPv4 TCP to the tunnel port", tcp4(A4, TUNNEL_PORT), Pass),
        ("IPv6 other address", udp6([2; 6], [4; 6], B6, B6, 1000, TUNNEL_PORT, b"x"), Pass),
        ("IPv6 other port", udp6([2; 6], [4; 6], B6, A6, 1000, 53, b"x"), Pass),
        ("IPv6 extension header", udp6_hop_by_hop(A6, TUNNEL_PORT), Pass),
        ("ARP for the node", arp_request([2; 6], B4, A4), Pass),
        ("Ethernet header only", tunnel4[..14].to_vec(), Pass),
        ("IPv4 cut before UDP", tunnel4[..36].to_vec(), Pass),
        ("IPv4 cut inside UDP", tunnel4[..40].to_vec(), Pass),
    ];
    let mut wrong: Vec<String> = Vec::new();
    for (name, frame, want) in &cases {
        let got = prog.test_run(frame).expect("test run");
        if got != *want {
            wrong.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));

    // Services' frontends: a node port on this node's address, an external IP's port.
    let ext = Ipv4Addr::new(203, 0, 113, 10);
    prog.set_frontend(None, 30080, 6, true).expect("node port");
    prog.set_frontend(Some(ext.into()), 80, 17, true).expect("external IP");
    let frontends: Vec<(&str, Vec<u8>, XdpAction)> = vec![
        ("TCP to the node port", tcp4(A4, 30080), Redirect),
        ("TCP to another port (ssh)", tcp4(A4, 22), Pass),
        ("TCP to the node port, another address", tcp4(A4_OTHER, 30080), Pass),
        ("UDP to the node port (TCP only)", udp4([2; 6], [4; 6], B4, A4, 1000, 30080, b"x"), Pass),
        ("UDP to the external IP's port", udp4([2; 6], [4; 6], B4, ext, 1000, 80, b"x"), Redirect),
        ("TCP to the external IP's port", tcp4(ext, 80), Pass),
        ("a later fragment to the node port", frag(&tcp4(A4, 30080), 0x0010), Pass),
        ("the tunnel still", tunnel4.clone(), Redirect),
    ];
    for (name, frame, want) in &frontends {
        let got = prog.test_run(frame).expect("test run");
        if got != *want {
            wrong.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    prog.set_frontend(None, 30080, 6, false).expect("removed");
    prog.set_frontend(None, 30080, 6, false).expect("removing twice is no error");
    if prog.test_run(&tcp4(A4, 30080)).expect("test run") != Pass {
        wrong.push("the node port, removed: not passed".into());
    }
    assert!(wrong.is_empty(), "wrong frontend verdicts:\n{}", wrong.join("\n"));

    // An uplink without IPv6 lets all IPv6 pass.
    let v4_only = XdpProgram::uplink(&UplinkConfig { tunnel_port: TUNNEL_PORT, local_v4: Some(A4), local_v6: None }, 1)
        .expect("load");
    v4_only.add_port(&port).expect("socket map");
    assert_eq!(v4_only.test_run(&tunnel6).expect("run"), Pass);
    assert_eq!(v4_only.test_run(&tunnel4).expect("run"), Redirect);
    // Geneve's port is a different program configuration, not a different program.
    let geneve =
        XdpProgram::uplink(&UplinkConfig { tunnel_port: 6081, local_v4: Some(A4), local_v6: None }, 1).expect("load");
    geneve.add_port(&port).expect("socket map");
    assert_eq!(geneve.test_run(&tunnel4).expect("run"), Pass);
    let g = udp4([2; 6], [4; 6], B4, A4, 1000, 6081, b"geneve");
    assert_eq!(geneve.test_run(&g).expect("run"), Redirect);
}
