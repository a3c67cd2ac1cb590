//! The pipeline and worker over in-memory ports: two simulated nodes exchanging encapsulated
//! traffic, ARP and ND for the gateway, ICMP errors, anti-spoofing, and a test per drop reason the
//! pipeline gives. The tables are the real ones (`ferry_tables`), built from a desired state; frames
//! are checked with etherparse, an independent parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use ferry_dataplane::port::mem::{MemPort, wire};
use ferry_dataplane::worker::Worker;
use ferry_encap::{DropReason, MacAddr, TunnelKind};
use ferry_tables::Snapshot;
use ferry_testsupport::node::{self, TestNode, UPLINK, host_mac, pod_mac, underlay_mac};

const HOST: usize = 3;

struct Node {
    worker: Worker<MemPort>,
    fib: Arc<Snapshot>,
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, last])
}

const POD_A1: [u8; 4] = [10, 244, 1, 2];
const POD_A2: [u8; 4] = [10, 244, 1, 3];
const POD_B1: [u8; 4] = [10, 244, 2, 2];
const POD_A1_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2);
const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);
const _: () = assert!(HOST == 3, "the fixture puts the host port after its two pods");

/// Node `n` (1 or 2) as `ferry_testsupport::node` builds it, with two pods (ports 1 and 2), the
/// host port (3) and a blackhole, 10.244.9.0/24.
fn node(n: u8) -> Node {
    node_with(n, true)
}

/// Node `n`, with or without a neighbour entry for the other node's underlay address.
fn node_with(n: u8, neighbour_known: bool) -> Node {
    let spec = TestNode {
        pods: 2,
        host_port: true,
        neighbour_known,
        blackholes: vec!["10.244.9.0/24".parse().expect("cidr")],
        ..TestNode::new(n)
    };
    let (worker, fib) = spec.build();
    Node { worker, fib }
}

impl Node {
    /// Deliver `frame` on `port` and run one worker iteration.
    fn receive(&mut self, port: usize, frame: &[u8]) {
        node::receive(&mut self.worker, &self.fib, port, frame);
    }

    /// Everything sent on `port` since the last call.
    fn sent(&mut self, port: usize) -> Vec<Vec<u8>> {
        node::sent(&mut self.worker, port)
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.worker.counters().drops(r)
    }
}

fn udp4(src_mac: MacAddr, dst_mac: MacAddr, src: [u8; 4], dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ipv4(src, dst, ttl)
        .udp(4000, 5000)
        .write(&mut out, payload)
        .expect("build");
    out
}

#[test]
fn pod_to_remote_pod_and_back() {
    let (mut a, mut b) = (node(1), node(2));
    let frame = udp4(pod_mac(1, 1), mac(0xe1), POD_A1, POD_B1, 64, b"across the overlay");
    a.receive(1, &frame);
    let outer = a.sent(UPLINK);
    assert_eq!(outer.len(), 1, "one tunnel packet on A's uplink");
    let p = SlicedPacket::from_ethernet(&outer[0]).expect("outer parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("outer IPv4") };
    assert_eq!((ip.header().source(), ip.header().destination()), ([192, 0, 2, 1], [192, 0, 2, 2]));
    let Some(TransportSlice::Udp(udp)) = &p.transport else { panic!("outer UDP") };
    assert_eq!(udp.destination_port(), 4789);
    // Inner Ethernet: from A's VTEP to B's VTEP, like Flannel's kernel devices expect.
    assert_eq!(&udp.payload()[8..14], &mac(0xa2).0);
    assert_eq!(&udp.payload()[14..20], &mac(0xa1).0);

    // Across the "underlay" to B, which delivers to pod b1.
    b.receive(UPLINK, &outer[0]);
    let inner = b.sent(1);
    assert_eq!(inner.len(), 1, "delivered to pod b1");
    let p = SlicedPacket::from_ethernet(&inner[0]).expect("inner parses");
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else { panic!("ethernet") };
    assert_eq!((eth.destination(), eth.source()), (pod_mac(2, 1).0, mac(0xe2).0));
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    assert_eq!(ip.header().ttl(), 63, "TTL decremented once, at the sending node");
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(TransportSlice::Udp(udp)) = &p.transport else { panic!("UDP") };
    assert_eq!(udp.payload(), b"across the overlay");
    assert_eq!(
        udp.to_header().calc_checksum_ipv4_raw(ip.header().source(), ip.header().destination(), udp.payload()).ok(),
        Some(udp.checksum())
    );

    // And back: b1 -> a1.
    let back = udp4(pod_mac(2, 1), mac(0xe2), POD_B1, POD_A1, 64, b"reply");
    b.receive(1, &back);
    let outer = b.sent(UPLINK);
    a.receive(UPLINK, &outer[0]);
    assert_eq!(a.sent(1).len(), 1, "reply delivered to a1");
    assert_eq!(a.worker.counters().total_drops() + b.worker.counters().total_drops(), 0);
}

#[test]
fn wire_joins_two_workers() {
    let (mut a, mut b) = (node(1), node(2));
    // Lend both workers' ports receive frames, then carry A's tunnel traffic over a MemPort wire.
    a.worker.poll_once(&*a.fib);
    b.worker.poll_once(&*b.fib);
    for i in 0..10u8 {
        let frame = udp4(pod_mac(1, 1), mac(0xe1), POD_A1, POD_B1, 64, &[i; 40]);
        let (mem, ports) = a.worker.mem_and_ports();
        assert!(ports[1].inject(mem, &frame));
    }
    a.worker.poll_once(&*a.fib);
    let delivered = {
        let (amem, aports) = a.worker.mem_and_ports();
        let (bmem, bports) = b.worker.mem_and_ports();
        wire(&mut aports[UPLINK], amem, &mut bports[UPLINK], bmem, usize::MAX)
    };
    assert_eq!(delivered, 10);
    b.worker.poll_once(&*b.fib);
    assert_eq!(b.sent(1).len(), 10);
}

#[test]
fn local_pod_to_pod_is_switched_on_the_node() {
    let mut a = node(1);
    a.receive(1, &udp4(pod_mac(1, 1), mac(0xe1), POD_A1, POD_A2, 64, b"next door"));
    let out = a.sent(2);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0][0..12], &[pod_mac(1, 2).0, mac(0xe1).0].concat()[..]);
    assert_eq!(out[0][14 + 8], 63, "TTL decremented");
    assert!(a.sent(UPLINK).is_empty());
}

fn arp_request(sender_mac: MacAddr, sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sender_mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac.0);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

#[test]
fn arp_for_the_gateway_is_answered_and_other_arp_dropped() {
    let mut a = node(1);
    a.receive(1, &arp_request(pod_mac(1, 1), POD_A1, [10, 244, 1, 1]));
    let out = a.sent(1);
    assert_eq!(out.len(), 1, "reply on the pod's port");
    let r = &out[0];
    assert_eq!(&r[0..6], &pod_mac(1, 1).0);
    assert_eq!(&r[6..12], &mac(0xe1).0);
    assert_eq!(&r[20..22], &[0, 2], "ARP reply");
    assert_eq!(&r[22..28], &mac(0xe1).0, "gateway MAC");
    assert_eq!(&r[28..32], &[10, 244, 1, 1]);
    assert_eq!(&r[38..42], &POD_A1);
    a.receive(1, &arp_request(pod_mac(1, 1), POD_A1, [10, 244, 1, 77]));
    assert!(a.sent(1).is_empty());
    assert_eq!(a.drops(DropReason::ArpNotForGateway), 1);
}

#[test]
fn neighbour_solicitation_for_the_gateway_is_answered() {
    let mut a = node(1);
    // NS from a1 for the gateway, to the solicited-node multicast address, with a source link-layer
    // option; built with smoltcp's own NDISC types.
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv6Packet, Icmpv6Repr, NdiscRepr, RawHardwareAddress};
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: GW_V6,
        lladdr: Some(RawHardwareAddress::from_bytes(&pod_mac(1, 1).0)),
    });
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1);
    let mut icmp = vec![0u8; ns.buffer_len()];
    ns.emit(&POD_A1_V6, &dst, &mut Icmpv6Packet::new_unchecked(&mut icmp[..]), &ChecksumCapabilities::default());
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0x33, 0x33, 0xff, 0, 0, 1]);
    frame.extend_from_slice(&pod_mac(1, 1).0);
    frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&POD_A1_V6.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    a.receive(1, &frame);
    let out = a.sent(1);
    assert_eq!(out.len(), 1, "neighbour advertisement sent back");
    let p = SlicedPacket::from_ethernet(&out[0]).expect("parses");
    let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("IPv6") };
    assert_eq!(ip.header().source(), GW_V6.octets());
    assert_eq!(ip.header().destination(), POD_A1_V6.octets());
    assert_eq!(ip.header().hop_limit(), 255);
    let Some(TransportSlice::Icmpv6(na)) = &p.transport else { panic!("ICMPv6") };
    let etherparse::Icmpv6Type::NeighborAdvertisement(h) = na.icmp_type() else { panic!("{:?}", na.icmp_type()) };
    assert!(h.router && h.solicited && h.r#override, "router, solicited, override: {h:?}");
    assert_eq!(Ok(na.checksum()), na.icmp_type().calc_checksum(GW_V6.octets(), POD_A1_V6.octets(), na.payload()));
    assert_eq!(&na.payload()[16..18], &[2, 1], "target link-layer address option");
    assert_eq!(&na.payload()[18..24], &mac(0xe1).0);
}

#[test]
fn ttl_expiry_sends_time_exceeded() {
    let mut a = node(1);
    a.receive(1, &udp4(pod_mac(1, 1), mac(0xe1), POD_A1, POD_B1, 1, b"dying"));
    let out = a.sent(1);
    assert_eq!(out.len(), 1);
    let p = SlicedPacket::from_ethernet(&out[0]).expect("parses");
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("ICMP") };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit)
    );
    assert_eq!(a.drops(DropReason::TtlExceeded), 1);
    assert!(a.sent(UPLINK).is_empty());
}

#[test]
fn too_big_for_the_tunnel_sends_fragmentation_needed_with_the_mtu() {
    let mut a = node(1);
    // 1450-byte IP packet fits 1500 - 50 (VXLAN over IPv4, inner Ethernet included): sent.
    let fits = udp4(pod_mac(1, 1), mac(0xe1), POD_A1, POD_B1, 64, &vec![0u8; 1450 - 28]);
    a.receive(1, &fits);
    assert_eq!(a.sent(UPLINK).len(), 1);
    assert_eq!(a.sent(UPLINK).len(), 0);
    // One byte more with DF (etherparse sets DF): ICMP fragmentation needed, MTU 1450.
    let big = udp4(pod_mac(1, 1), mac(0xe1), POD_A1, POD_B1, 64, &vec![0u8; 1451 - 28]);
    a.receive(1, &big);
    let out = a.sent(1);
    assert_eq!(out.len(), 1);
    let p = SlicedPacket::from_ethernet(&out[0]).expect("parses");
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("ICMP") };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1450 }
        )
    );
    assert_eq!(a.drops(DropReason::TooBig), 1);
    // Without DF ferry does not fragment: dropped and counted.
    let mut no_df = big.clone();
    no_df[20] = 0;
    let mut ip = ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut no_df[14..]);
    ip.fill_checksum();
    a.receive(1, &no_df);
    assert_eq!(a.drops(DropReason::TooBigNoFragmentation), 1);
}

/// With a host exit (pods on taps), a pod's packet for outside the cluster goes to the host port,
/// addressed to the kernel end's MAC with its TTL decremented; an unrouted cluster address is
/// still `no_route`, and nothing that came in on the host port goes back out of it.
#[test]
fn host_exit_takes_pod_traffic_for_outside_the_cluster() {
    let (worker, fib) = TestNode { pods: 2, host_port: true, host_exit: true, ..TestNode::new(1) }.build();
    let mut a = Node { worker, fib };
    let gw = mac(0xe1);
    a.receive(1, &udp4(pod_mac(1, 1), gw, POD_A1, [192, 0, 2, 1], 64, b"to the node"));
    let out = a.sent(HOST);
    assert_eq!(out.len(), 1, "to the host port");
    let p = SlicedPacket::from_ethernet(&out[0]).expect("parses");
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else { panic!("ethernet") };
    assert_eq!((eth.destination(), eth.source()), (host_mac(1).0, gw.0));
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    assert_eq!((ip.header().destination(), ip.header().ttl()), ([192, 0, 2, 1], 63));
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    assert_eq!(a.drops(DropReason::NoRoute), 0);

    a.receive(1, &udp4(pod_mac(1, 1), gw, POD_A1, [10, 244, 77, 1], 64, b"x"));
    assert_eq!(a.drops(DropReason::NoRoute), 1, "a cluster address without a route");
    a.receive(HOST, &udp4(host_mac(1), gw, [10, 244, 1, 0], [172, 16, 0, 1], 64, b"x"));
    assert_eq!(a.drops(DropReason::NoRoute), 2, "from the host port: no way back out of it");
    assert!(a.sent(HOST).is_empty());
}

#[test]
fn drops_are_counted_by_reason() {
    let mut a = node(1);
    let gw = mac(0xe1);
    // Spoofed: pod1 sends as pod2.
    a.receive(1, &udp4(pod_mac(1, 1), gw, POD_A2, POD_B1, 64, b"x"));
    assert_eq!(a.drops(DropReason::SpoofedSource), 1);
    // No route and blackhole.
    a.receive(1, &udp4(pod_mac(1, 1), gw, POD_A1, [172, 16, 0, 1], 64, b"x"));
    assert_eq!(a.drops(DropReason::NoRoute), 1);
    a.receive(1, &udp4(pod_mac(1, 1), gw, POD_A1, [10, 244, 9, 9], 64, b"x"));
    assert_eq!(a.drops(DropReason::Blackhole), 1);
    // Truncated frame from a pod.
    a.receive(1, &[0u8; 10]);
    assert_eq!(a.drops(DropReason::Truncated), 1);

    // From the uplink: a tunnel packet from an unknown node, one with the wrong VNI, one whose
    // inner destination is not on this node.
    let mut b = node(2);
    b.receive(1, &udp4(pod_mac(2, 1), mac(0xe2), POD_B1, POD_A1, 64, b"x"));
    let good = b.sent(UPLINK).remove(0);
    let mut unknown = good.clone();
    unknown[26..30].copy_from_slice(&[192, 0, 2, 99]);
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut unknown[14..34]).fill_checksum();
    a.receive(UPLINK, &unknown);
    assert_eq!(a.drops(DropReason::UnknownSourceNode), 1);
    let mut vni = good.clone();
    vni[48] = 9;
    a.receive(UPLINK, &vni);
    assert_eq!(a.drops(DropReason::VniMismatch), 1);
    b.receive(1, &udp4(pod_mac(2, 1), mac(0xe2), POD_B1, POD_B1, 64, b"x"));
    assert!(b.sent(UPLINK).is_empty(), "local destination stays local");
    let mut not_local = good.clone();
    not_local[50 + 14 + 16..50 + 14 + 20].copy_from_slice(&[10, 244, 2, 3]);
    let mut inner = ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut not_local[64..84]);
    inner.fill_checksum();
    a.receive(UPLINK, &not_local);
    assert_eq!(a.drops(DropReason::NotLocalPod), 1);
    // Every one of those was counted exactly once and nothing was sent.
    assert_eq!(a.worker.counters().total_drops(), 7);
    assert!(a.sent(UPLINK).is_empty() && a.sent(1).is_empty() && a.sent(2).is_empty());
}

#[test]
fn unresolved_underlay_neighbour_is_a_counted_drop() {
    let mut a = node_with(1, false);
    a.receive(1, &udp4(pod_mac(1, 1), mac(0xe1), POD_A1, POD_B1, 64, b"x"));
    assert!(a.sent(UPLINK).is_empty());
    assert_eq!(a.drops(DropReason::NoNeighbour), 1);
}

/// A tunnel packet from node 2 to node 1 carrying `inner` as is (no check of B's pipeline on the
/// way), built with ferry's own template; `edit` then changes the outer frame.
fn tunnel_from_b(inner: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    use ferry_encap::{FrameBuf, TemplateParams, TunnelTemplate, encap_with};
    let p = TemplateParams::new(
        TunnelKind::Vxlan,
        1,
        underlay_mac(2),
        underlay_mac(1),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    );
    let tpl = TunnelTemplate::new(&p).expect("template");
    let head = tpl.overhead();
    let mut buf = vec![0u8; head + inner.len()];
    buf[head..].copy_from_slice(inner);
    let mut f = FrameBuf::new(&mut buf, head, inner.len()).expect("fits");
    encap_with(&tpl, &mut f, 0, 7).expect("encap");
    assert_eq!(f.start(), 0);
    edit(&mut buf);
    buf
}

/// An inner frame from B's VTEP to A's.
fn inner_from_b(src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
    udp4(mac(0xa2), mac(0xa1), src, dst, ttl, b"inner")
}

/// Every frame class a router must refuse (issue 18) is dropped and counted under its own reason,
/// and nothing is sent anywhere; the near misses next to each are delivered.
#[test]
fn frames_a_router_must_refuse_are_counted_each_under_its_reason() {
    let mut a = node(1);
    let gw = mac(0xe1);
    let mut expect = std::collections::BTreeMap::new();
    let mut check = |a: &mut Node, port: usize, frame: &[u8], reason: DropReason| {
        a.receive(port, frame);
        *expect.entry(reason).or_insert(0u64) += 1;
        for (r, n) in &expect {
            assert_eq!(a.drops(*r), *n, "{} after a frame for {}", r.name(), reason.name());
        }
        assert_eq!(a.worker.counters().total_drops(), expect.values().sum::<u64>(), "after {}", reason.name());
        for p in [UPLINK, 1, 2, HOST] {
            assert!(a.sent(p).is_empty(), "{}: nothing sent on port {p}", reason.name());
        }
    };
    let delivered = |a: &mut Node, frame: &[u8], port: usize, what: &str| {
        a.receive(UPLINK, frame);
        assert_eq!(a.sent(port).len(), 1, "{what}: delivered on port {port}");
    };

    // From the underlay. The control case first: a clean packet from B to pod a1.
    let clean = inner_from_b(POD_B1, POD_A1, 63);
    delivered(&mut a, &tunnel_from_b(&clean, |_| {}), 1, "clean");
    // Outer destination MAC of another host (the kernel's OTHERHOST).
    check(
        &mut a,
        UPLINK,
        &tunnel_from_b(&clean, |b| b[0..6].copy_from_slice(&mac(0x77).0)),
        DropReason::OuterDstMacNotOurs,
    );
    // A non-zero, wrong outer UDP checksum (ferry sends zero over IPv4; 0x1234 does not verify).
    check(
        &mut a,
        UPLINK,
        &tunnel_from_b(&clean, |b| b[40..42].copy_from_slice(&[0x12, 0x34])),
        DropReason::UdpBadChecksum,
    );
    // Inner TTL 0.
    check(&mut a, UPLINK, &tunnel_from_b(&inner_from_b(POD_B1, POD_A1, 0), |_| {}), DropReason::InnerTtlZero);
    // Inner IPv6 hop limit 0 (to a1's IPv6 address).
    let mut hop0 = Vec::new();
    PacketBuilder::ethernet2(mac(0xa2).0, mac(0xa1).0)
        .ipv6(Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 2).octets(), POD_A1_V6.octets(), 0)
        .udp(4000, 5000)
        .write(&mut hop0, b"x")
        .expect("build");
    check(&mut a, UPLINK, &tunnel_from_b(&hop0, |_| {}), DropReason::InnerTtlZero);
    // Inner source MAC multicast, and broadcast.
    let mut mcast = clean.clone();
    mcast[6..12].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    check(&mut a, UPLINK, &tunnel_from_b(&mcast, |_| {}), DropReason::InnerSrcMacMulticast);
    mcast[6..12].copy_from_slice(&MacAddr::BROADCAST.0);
    check(&mut a, UPLINK, &tunnel_from_b(&mcast, |_| {}), DropReason::InnerSrcMacMulticast);
    // Nested tunnel: aimed at A's underlay address (the kernel's own tunnel port) it reaches
    // nothing; at A's overlay address it reaches the host port.
    check(&mut a, UPLINK, &tunnel_from_b(&inner_from_b(POD_B1, [192, 0, 2, 1], 63), |_| {}), DropReason::NotLocalPod);
    delivered(&mut a, &tunnel_from_b(&inner_from_b(POD_B1, [10, 244, 1, 0], 63), |_| {}), HOST, "overlay address");
    // Inner sources B does not own: A's own pod CIDR, another network, another node's address.
    for src in [[10, 244, 1, 99], [172, 16, 0, 1], [192, 0, 2, 1]] {
        check(&mut a, UPLINK, &tunnel_from_b(&inner_from_b(src, POD_A1, 63), |_| {}), DropReason::InnerSpoofedSource);
    }
    // B's overlay address and B's underlay address (its kernel answering a pod) are B's.
    delivered(&mut a, &tunnel_from_b(&inner_from_b([10, 244, 2, 0], POD_A1, 63), |_| {}), 1, "B's overlay");
    delivered(&mut a, &tunnel_from_b(&inner_from_b([192, 0, 2, 2], POD_A1, 63), |_| {}), 1, "B's underlay");

    // From a pod. The control case: a1 to a2, delivered.
    a.receive(1, &udp4(pod_mac(1, 1), gw, POD_A1, POD_A2, 64, b"ok"));
    assert_eq!(a.sent(2).len(), 1, "clean pod frame delivered");
    // Another pod's MAC as the source.
    check(&mut a, 1, &udp4(pod_mac(1, 2), gw, POD_A1, POD_A2, 64, b"x"), DropReason::PodSrcMacMismatch);
    // Addressed to a MAC that is not the gateway's (a2's, directly), and to broadcast.
    check(&mut a, 1, &udp4(pod_mac(1, 1), pod_mac(1, 2), POD_A1, POD_A2, 64, b"x"), DropReason::PodDstMacNotGateway);
    check(
        &mut a,
        1,
        &udp4(pod_mac(1, 1), MacAddr::BROADCAST, POD_A1, POD_A2, 64, b"x"),
        DropReason::PodDstMacNotGateway,
    );
    // A wrong IPv4 header checksum (it would reach the far pod: TTL updates are incremental).
    let mut bad = udp4(pod_mac(1, 1), gw, POD_A1, POD_B1, 64, b"x");
    bad[24] ^= 0x01;
    check(&mut a, 1, &bad, DropReason::PodIpv4BadChecksum);
    // 802.1Q-tagged, once and twice.
    let plain = udp4(pod_mac(1, 1), gw, POD_A1, POD_B1, 64, b"x");
    let tag = |f: &[u8], tpid: [u8; 2]| [&f[..12], &tpid, &[0x00, 0x05], &f[12..]].concat();
    check(&mut a, 1, &tag(&plain, [0x81, 0x00]), DropReason::PodVlanTagged);
    check(&mut a, 1, &tag(&tag(&plain, [0x81, 0x00]), [0x88, 0xa8]), DropReason::PodVlanTagged);
    // ARP for the gateway from a pod's own MAC is still answered.
    a.receive(1, &arp_request(pod_mac(1, 1), POD_A1, [10, 244, 1, 1]));
    assert_eq!(a.sent(1).len(), 1, "ARP answered");
    // The host port may send from the node's underlay address (its kernel answering a pod), but the
    // underlay address is not routed to it.
    a.receive(HOST, &udp4(host_mac(1), gw, [192, 0, 2, 1], POD_B1, 64, b"reply from the node"));
    assert_eq!(a.sent(UPLINK).len(), 1, "host port's underlay-sourced reply encapsulated");
    assert_eq!(a.worker.counters().total_drops(), expect.values().sum::<u64>());
}
