//! Privileged tests of ferry's pod XDP program (test side): a "pod" namespace joined by a veth to
//! a "host" namespace whose end carries the program and an AF_XDP socket. The test plays ferry:
//! it answers the pod's ARP for the gateway from the socket. Traffic from the pod to the pod
//! network and ARP / neighbour solicitations for the gateway reach the socket; the pod's ping to
//! the node's own address reaches the host kernel and is answered. A table of crafted frames is run
//! through the loaded program with `BPF_PROG_TEST_RUN`.
//!
//! Needs root; without it the tests fail when `CI` is set and print SKIP otherwise. Everything
//! runs in namespaces the tests create; a guard deletes them even when a test panics. Every wait
//! is bounded.

mod xsk_util;

use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use etherparse::{Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};
use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use ferry_dataplane::port::Port;
use ferry_dataplane::port::xsk::{XskMem, XskMemConfig, XskPort, XskPortConfig};
use ferry_dataplane::xdp::{PodConfig, XdpAction, XdpMode, XdpProgram};
use xsk_util::*;

const POD4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const GW4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// Another pod, elsewhere in the cluster.
const REMOTE_POD4: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 9);
/// The node's own address.
const NODE4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd44, 1, 0, 0, 0, 0, 0, 5);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd44, 1, 0, 0, 0, 0, 0, 1);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd44, 2, 0, 0, 0, 0, 0, 9);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);

fn pod_config() -> PodConfig {
    PodConfig {
        nets_v4: vec!["10.244.0.0/16".parse().expect("net"), "10.96.0.0/12".parse().expect("net")],
        nets_v6: vec!["fd44::/16".parse().expect("net")],
        gateway_v4: Some(GW4),
        gateway_v6: Some(GW6),
    }
}

/// What reached ferry's socket, classified.
#[derive(Debug, Default)]
struct Seen {
    arp_for_gw: usize,
    udp_to_remote_pod: Vec<Vec<u8>>,
    ns_for_gw: usize,
    other: Vec<String>,
}

/// Classify one frame from the socket; answer ARP for the gateway with `gw_mac` through `port`.
fn handle(frame: &[u8], seen: &mut Seen, reply: &mut Vec<Vec<u8>>, gw_mac: [u8; 6]) {
    if is_arp_for(frame, GW4) {
        seen.arp_for_gw += 1;
        if frame[21] == 1 {
            reply.push(arp_reply(frame, gw_mac));
        }
        return;
    }
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        seen.other.push(format!("unparsable {frame:02x?}"));
        return;
    };
    match (&p.net, &p.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) if ip.header().destination_addr() == REMOTE_POD4 => {
            seen.udp_to_remote_pod.push(u.payload().to_vec());
        }
        (Some(NetSlice::Ipv6(_)), Some(TransportSlice::Icmpv6(icmp))) => match icmp.icmp_type() {
            Icmpv6Type::NeighborSolicitation if icmp.payload().get(..16) == Some(&GW6.octets()[..]) => {
                seen.ns_for_gw += 1;
            }
            // Router solicitations and MLD reports from the pod are not for ferry.
            t => seen.other.push(format!("ICMPv6 {t:?}")),
        },
        _ => seen.other.push(format!("{:?}", p.net.map(|n| format!("{n:?}")))),
    }
}

#[test]
fn pod_traffic_reaches_ferry_and_node_traffic_the_kernel() {
    if !privileged("pod_traffic_reaches_ferry_and_node_traffic_the_kernel") {
        return;
    }
    let tg = tag();
    let mut ns = Netns::default();
    let (host, pod) = (ns.add(&format!("{tg}-host")), ns.add(&format!("{tg}-pod")));
    let (h, p) = veth(&host, &format!("fxh{tg}"), 1, &pod, &format!("fxp{tg}"), 2, 1);
    addr(&p, "10.244.1.5/24");
    addr(&p, "fd44:1::5/64");
    run(&["ip", "-n", &pod, "route", "add", "default", "via", &GW4.to_string()]);
    run(&["ip", "-n", &pod, "-6", "route", "add", "default", "via", &GW6.to_string()]);
    // The node: its own address, a route back to the pod, and (to catch leaks) the remote pod's
    // address, which the node's kernel would accept if the program passed pod traffic to it.
    run(&["ip", "-n", &host, "addr", "add", &format!("{NODE4}/32"), "dev", "lo"]);
    run(&["ip", "-n", &host, "addr", "add", &format!("{REMOTE_POD4}/32"), "dev", "lo"]);
    run(&["ip", "-n", &host, "route", "add", &format!("{POD4}/32"), "dev", &h.name]);

    let _in_host = InNetns::enter(&host);
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let mut free = FreeFrames::all(mem.frame_count());
    let mut port = XskPort::open(&mem, &h.name, 0, &XskPortConfig::default()).expect("bind");
    let prog = XdpProgram::pod(&pod_config(), 1).expect("load");
    prog.add_port(&port).expect("socket map");
    let att = prog.attach(&h.name, XdpMode::Auto).expect("attach");
    port.refill(&mut free);
    let leak = UdpSocket::bind(format!("{REMOTE_POD4}:7777")).expect("bind leak detector");
    leak.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");

    // The pod pings the node; ARP for the gateway comes to us and we answer it, the echo requests
    // to the node's address go to the node's kernel, which answers.
    let mut ping = Command::new("ip")
        .args(["netns", "exec", &pod, "ping", "-c", "3", "-i", "0.2", "-W", "3", &NODE4.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ping");
    let mut seen = Seen::default();
    let mut batch = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
    let mut serve = |port: &mut XskPort, mem: &mut XskMem, free: &mut FreeFrames, seen: &mut Seen| {
        let mut replies = Vec::new();
        let n = port.recv(mem, &mut batch);
        for pkt in &batch[..n] {
            handle(mem.bytes(*pkt), seen, &mut replies, h.mac);
            free.push(pkt.frame);
        }
        let mut out = Vec::new();
        for r in replies {
            let id = free.pop().expect("free frame");
            mem.frame_mut(id)[..r.len()].copy_from_slice(&r);
            out.push(Pkt { frame: id, offset: 0, len: r.len() as u16 });
        }
        assert_eq!(port.send(mem, &out), out.len());
        port.flush().expect("kick");
        port.reclaim(free);
        port.refill(free);
        if n == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    };
    let end = deadline(10);
    let status = loop {
        serve(&mut port, &mut mem, &mut free, &mut seen);
        if let Some(s) = ping.try_wait().expect("ping status") {
            break s;
        }
        if Instant::now() > end {
            let _ = ping.kill();
            panic!("ping did not finish in time");
        }
    };
    let stderr = ping.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    assert!(status.success(), "the pod's ping to the node failed ({status}): {stderr}");
    assert!(seen.arp_for_gw >= 1, "the pod's ARP for the gateway did not reach ferry: {seen:?}");

    // Pod to pod network: to ferry, not to the node's kernel (which owns that address here).
    // Pod to an IPv6 pod address: first a neighbour solicitation for the gateway, to ferry.
    {
        let _in_pod = InNetns::enter(&pod);
        let s4 = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let s6 = UdpSocket::bind("[::]:0").expect("bind");
        for i in 0..3 {
            s4.send_to(format!("to-remote-pod-{i}").as_bytes(), (REMOTE_POD4, 7777)).expect("send");
        }
        s6.send_to(b"to-remote-pod-v6", (REMOTE_POD6, 7777)).expect("send v6");
    }
    let end = deadline(5);
    while (seen.udp_to_remote_pod.len() < 3 || seen.ns_for_gw == 0) && Instant::now() < end {
        serve(&mut port, &mut mem, &mut free, &mut seen);
    }
    let want: Vec<Vec<u8>> = (0..3).map(|i| format!("to-remote-pod-{i}").into_bytes()).collect();
    assert_eq!(seen.udp_to_remote_pod, want, "pod-network traffic did not reach ferry: {seen:?}");
    assert!(seen.ns_for_gw >= 1, "the neighbour solicitation for the IPv6 gateway did not reach ferry: {seen:?}");
    let mut buf = [0u8; 64];
    assert!(leak.recv_from(&mut buf).is_err(), "pod-network traffic leaked to the node's kernel");
    let unexpected: Vec<&String> = seen.other.iter().filter(|o| !o.starts_with("ICMPv6")).collect();
    assert!(unexpected.is_empty(), "unexpected frames reached ferry: {unexpected:?}");

    att.detach().expect("detach");
    assert!(!has_xdp(&h));
}

/// A neighbour solicitation (type 135) or advertisement (136) from the pod about `target`.
fn nd(icmp_type: u8, target: Ipv6Addr) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2; 6], [0x33, 0x33, 0xff, 0, 0, 1])
        .ipv6(POD6.octets(), "ff02::1:ff00:1".parse::<Ipv6Addr>().expect("addr").octets(), 255)
        .icmpv6_raw(icmp_type, 0, [0; 4]);
    let mut v = Vec::new();
    b.write(&mut v, &target.octets()).expect("frame");
    v
}

#[test]
fn pod_verdicts_on_crafted_frames() {
    if !privileged("pod_verdicts_on_crafted_frames") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let port = XskPort::open(&mem, &t.a.name, 0, &XskPortConfig::default()).expect("bind");
    let prog = XdpProgram::pod(&pod_config(), 1).expect("load");
    prog.add_port(&port).expect("socket map");

    use XdpAction::{Pass, Redirect};
    let (m1, m2) = ([2; 6], [4; 6]);
    let mut arp_bad_len = arp_request(m1, POD4, GW4);
    arp_bad_len[18] = 8;
    let mut arp_reply_to_gw = arp_request(m1, POD4, GW4);
    arp_reply_to_gw[21] = 2;
    let cases: Vec<(&str, Vec<u8>, XdpAction)> = vec![
        ("ARP request for the gateway", arp_request(m1, POD4, GW4), Redirect),
        ("ARP reply to the gateway", arp_reply_to_gw, Redirect),
        ("ARP for a neighbour pod", arp_request(m1, POD4, Ipv4Addr::new(10, 244, 1, 7)), Pass),
        ("ARP for the node", arp_request(m1, POD4, NODE4), Pass),
        ("ARP with a bad hardware length", arp_bad_len, Pass),
        ("truncated ARP", arp_request(m1, POD4, GW4)[..30].to_vec(), Pass),
        ("IPv4 to a remote pod", udp4(m1, m2, POD4, REMOTE_POD4, 1, 2, b"x"), Redirect),
        ("IPv4 to the second pod network", udp4(m1, m2, POD4, Ipv4Addr::new(10, 100, 0, 1), 1, 2, b"x"), Redirect),
        ("IPv4 to the gateway", udp4(m1, m2, POD4, GW4, 1, 2, b"x"), Redirect),
        ("IPv4 to the node", udp4(m1, m2, POD4, NODE4, 1, 2, b"x"), Pass),
        ("IPv4 just outside the pod network", udp4(m1, m2, POD4, Ipv4Addr::new(10, 245, 0, 1), 1, 2, b"x"), Pass),
        ("IPv6 to a remote pod", udp6(m1, m2, POD6, REMOTE_POD6, 1, 2, b"x"), Redirect),
        ("IPv6 to the node", udp6(m1, m2, POD6, NODE6, 1, 2, b"x"), Pass),
        ("NS for the gateway", nd(135, GW6), Redirect),
        ("NS for another address", nd(135, NODE6), Pass),
        ("NA about the gateway", nd(136, GW6), Pass),
        ("Ethernet header only", arp_request(m1, POD4, GW4)[..14].to_vec(), Pass),
    ];
    let mut wrong = Vec::new();
    for (name, frame, want) in &cases {
        let got = prog.test_run(frame).expect("test run");
        if got != *want {
            wrong.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));

    // NetworkPolicy selects the pod: every unicast IP packet goes to ferry (its egress rules judge
    // traffic to outside the pod networks); multicast, broadcast, link-local and ARP do not.
    prog.set_isolated(true).expect("flag on");
    let isolated: Vec<(&str, Vec<u8>, XdpAction)> = vec![
        ("IPv4 to the node", udp4(m1, m2, POD4, NODE4, 1, 2, b"x"), Redirect),
        ("IPv4 outside", udp4(m1, m2, POD4, Ipv4Addr::new(10, 245, 0, 1), 1, 2, b"x"), Redirect),
        ("IPv4 to a remote pod", udp4(m1, m2, POD4, REMOTE_POD4, 1, 2, b"x"), Redirect),
        ("IPv6 to the node", udp6(m1, m2, POD6, NODE6, 1, 2, b"x"), Redirect),
        ("IPv4 multicast", udp4(m1, m2, POD4, Ipv4Addr::new(224, 0, 0, 251), 1, 2, b"x"), Pass),
        ("IPv4 broadcast", udp4(m1, m2, POD4, Ipv4Addr::BROADCAST, 1, 2, b"x"), Pass),
        ("IPv6 multicast", udp6(m1, m2, POD6, "ff02::fb".parse().expect("addr"), 1, 2, b"x"), Pass),
        ("IPv6 link-local", udp6(m1, m2, POD6, "fe80::1".parse().expect("addr"), 1, 2, b"x"), Pass),
        ("NS for the gateway", nd(135, GW6), Redirect),
        ("ARP for the node", arp_request(m1, POD4, NODE4), Pass),
    ];
    for (name, frame, want) in &isolated {
        let got = prog.test_run(frame).expect("test run");
        if got != *want {
            wrong.push(format!("isolated, {name}: got {got:?}, want {want:?}"));
        }
    }
    prog.set_isolated(false).expect("flag off");
    let got = prog.test_run(&udp4(m1, m2, POD4, NODE4, 1, 2, b"x")).expect("test run");
    if got != Pass {
        wrong.push(format!("no longer isolated, IPv4 to the node: got {got:?}, want Pass"));
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));

    // Without a gateway, ARP and NS pass; pod-network traffic still goes to ferry.
    let cfg = PodConfig { gateway_v4: None, gateway_v6: None, ..pod_config() };
    let no_gw = XdpProgram::pod(&cfg, 1).expect("load");
    no_gw.add_port(&port).expect("socket map");
    assert_eq!(no_gw.test_run(&arp_request(m1, POD4, GW4)).expect("run"), Pass);
    assert_eq!(no_gw.test_run(&nd(135, GW6)).expect("run"), Pass);
    assert_eq!(no_gw.test_run(&udp4(m1, m2, POD4, REMOTE_POD4, 1, 2, b"x")).expect("run"), Redirect);
}
