//! The service stage over in-memory ports: two simulated nodes with the real tables and connection
//! tracking. ClusterIP translation to local and remote backends and back, the reject cases (ICMP
//! port unreachable, TCP RST), a removed backend's connections dropped while others go on, hairpin,
//! session affinity, the terminating fallback, and tracked connections surviving many table
//! publications. Every rewritten frame is checked with etherparse, an independent parser, checksums
//! included.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use ferry_dataplane::port::mem::MemPort;
use ferry_dataplane::worker::Worker;
use ferry_encap::DropReason;
use ferry_tables::{EndpointSpec, Protocol, ServiceSpec, Snapshot, Tables};
use ferry_testsupport::node::{self, TestNode, UPLINK, gateway_ip, gateway_mac, pod_ip, pod_mac};

const VIP: [u8; 4] = [10, 96, 0, 10];
const VPORT: u16 = 80;
const BPORT: u16 = 8080;

struct Node {
    n: u8,
    worker: Worker<MemPort>,
    tables: Tables,
    fib: Arc<Snapshot>,
}

impl Node {
    fn new(n: u8, services: &[ServiceSpec]) -> Node {
        let spec = TestNode { pods: 2, ..TestNode::new(n) };
        let (worker, _) = spec.build();
        let mut tables = spec.tables();
        tables.set_services(services, Instant::now()).expect("services build");
        let fib = tables.current();
        Node { n, worker, tables, fib }
    }

    fn set_services(&mut self, services: &[ServiceSpec]) {
        self.tables.set_services(services, Instant::now()).expect("services build");
        self.fib = self.tables.current();
    }

    fn receive(&mut self, port: usize, frame: &[u8]) {
        node::receive(&mut self.worker, &self.fib, port, frame);
    }

    fn sent(&mut self, port: usize) -> Vec<Vec<u8>> {
        node::sent(&mut self.worker, port)
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.worker.counters().drops(r)
    }

    /// A TCP segment from the pod on `port` (source port `sport`) to `dst`:`dport`.
    fn tcp(&self, port: u8, dst: [u8; 4], sport: u16, dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
        let src = pod_ip(self.n, port).octets();
        tcp_frame(pod_mac(self.n, port).0, gateway_mac(self.n).0, src, dst, sport, dport, syn, payload)
    }

    fn udp(&self, port: u8, dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(pod_mac(self.n, port).0, gateway_mac(self.n).0)
            .ipv4(pod_ip(self.n, port).octets(), dst, 64)
            .udp(sport, dport)
            .write(&mut out, payload)
            .expect("build");
        out
    }
}

#[expect(clippy::too_many_arguments, reason = "a test frame builder")]
fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(5000) };
    b.write(&mut out, payload).expect("build");
    out
}

/// What etherparse reads in a frame: addresses, ports, TCP flags (SYN, ACK, RST), and whether every
/// checksum verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: (bool, bool, bool),
    payload: Vec<u8>,
}

fn parse(frame: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(frame).expect("frame parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
    let (s, d) = (ip.header().source(), ip.header().destination());
    let (sport, dport, flags, payload) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t.to_header().calc_checksum_ipv4_raw(s, d, t.payload()).expect("size");
            assert_eq!(t.checksum(), want, "TCP checksum");
            (t.source_port(), t.destination_port(), (t.syn(), t.ack(), t.rst()), t.payload().to_vec())
        }
        Some(TransportSlice::Udp(u)) => {
            let want = u.to_header().calc_checksum_ipv4_raw(s, d, u.payload()).expect("size");
            assert_eq!(u.checksum(), want, "UDP checksum");
            (u.source_port(), u.destination_port(), (false, false, false), u.payload().to_vec())
        }
        other => panic!("not TCP or UDP: {other:?}"),
    };
    Seen { src: s.into(), dst: d.into(), sport, dport, flags, payload }
}

fn ip(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn service(protocol: Protocol, backends: &[IpAddr]) -> ServiceSpec {
    ServiceSpec {
        name: "default/web:http".into(),
        vip: ip(VIP),
        port: VPORT,
        protocol,
        endpoints: backends.iter().map(|&a| EndpointSpec::ready(a, BPORT)).collect(),
        affinity: None,
    }
}

fn local_backend() -> IpAddr {
    IpAddr::V4(pod_ip(1, 2))
}

fn remote_backend() -> IpAddr {
    IpAddr::V4(pod_ip(2, 1))
}

#[test]
fn cluster_ip_to_a_local_backend_and_the_reply_back_to_the_vip() {
    let mut a = Node::new(1, &[service(Protocol::Tcp, &[local_backend()])]);
    a.receive(1, &a.tcp(1, VIP, 40000, VPORT, true, b""));
    let out = a.sent(2);
    assert_eq!(out.len(), 1, "the SYN reaches the backend pod on port 2");
    let s = parse(&out[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (IpAddr::V4(pod_ip(1, 1)), 40000, local_backend(), BPORT));
    // The backend answers its client; the client sees the VIP.
    let reply = tcp_frame(
        pod_mac(1, 2).0,
        gateway_mac(1).0,
        pod_ip(1, 2).octets(),
        pod_ip(1, 1).octets(),
        BPORT,
        40000,
        false,
        b"hello",
    );
    a.receive(2, &reply);
    let back = a.sent(1);
    assert_eq!(back.len(), 1);
    let s = parse(&back[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(VIP), VPORT, IpAddr::V4(pod_ip(1, 1)), 40000));
    assert_eq!(s.payload, b"hello");
    // The same pod talking to the backend directly (not through the service) is left alone.
    a.receive(1, &a.tcp(1, pod_ip(1, 2).octets(), 40001, BPORT, true, b""));
    let s = parse(&a.sent(2)[0]);
    assert_eq!((s.dst, s.dport), (local_backend(), BPORT));
    let direct_reply = tcp_frame(
        pod_mac(1, 2).0,
        gateway_mac(1).0,
        pod_ip(1, 2).octets(),
        pod_ip(1, 1).octets(),
        BPORT,
        40001,
        false,
        b"",
    );
    a.receive(2, &direct_reply);
    let s = parse(&a.sent(1)[0]);
    assert_eq!((s.src, s.sport), (local_backend(), BPORT), "no translation without a tracked service connection");
    assert_eq!(a.worker.counters().total_drops(), 0);
}

#[test]
fn cluster_ip_to_a_remote_backend_reply_translated_at_the_client_node() {
    let svc = [service(Protocol::Udp, &[remote_backend()])];
    let (mut a, mut b) = (Node::new(1, &svc), Node::new(2, &svc));
    a.receive(1, &a.udp(1, VIP, 5353, VPORT, b"query"));
    let outer = a.sent(UPLINK);
    assert_eq!(outer.len(), 1, "encapsulated toward node 2");
    b.receive(UPLINK, &outer[0]);
    let delivered = b.sent(1);
    assert_eq!(delivered.len(), 1);
    let s = parse(&delivered[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (IpAddr::V4(pod_ip(1, 1)), 5353, remote_backend(), BPORT));
    // The backend answers; node 2 sends it as is, node 1 translates it on delivery.
    let reply = b.udp(1, pod_ip(1, 1).octets(), BPORT, 5353, b"answer");
    b.receive(1, &reply);
    let outer = b.sent(UPLINK);
    assert_eq!(outer.len(), 1);
    a.receive(UPLINK, &outer[0]);
    let back = a.sent(1);
    assert_eq!(back.len(), 1);
    let s = parse(&back[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(VIP), VPORT, IpAddr::V4(pod_ip(1, 1)), 5353));
    assert_eq!(s.payload, b"answer");
    assert_eq!(a.worker.counters().total_drops() + b.worker.counters().total_drops(), 0);
}

#[test]
fn no_endpoint_is_rejected_with_port_unreachable_or_a_reset_and_counted() {
    let svcs = [service(Protocol::Udp, &[]), service(Protocol::Tcp, &[])];
    let mut a = Node::new(1, &svcs);
    a.receive(1, &a.udp(1, VIP, 5353, VPORT, b"anyone?"));
    let icmp = a.sent(1);
    assert_eq!(icmp.len(), 1, "an ICMP error back to the pod");
    let p = SlicedPacket::from_ethernet(&icmp[0]).expect("parses");
    let Some(NetSlice::Ipv4(ip4)) = &p.net else { panic!("IPv4") };
    assert_eq!((ip4.header().source(), ip4.header().destination()), (gateway_ip(1).octets(), pod_ip(1, 1).octets()));
    let Some(TransportSlice::Icmpv4(i)) = &p.transport else { panic!("ICMP") };
    assert_eq!(
        i.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
    );
    assert_eq!(a.drops(DropReason::ServiceNoEndpoint), 1);

    a.receive(1, &a.tcp(1, VIP, 40000, VPORT, true, b""));
    let rst = a.sent(1);
    assert_eq!(rst.len(), 1, "a RST back to the pod");
    let s = parse(&rst[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(VIP), VPORT, IpAddr::V4(pod_ip(1, 1)), 40000));
    assert_eq!(s.flags, (false, true, true), "RST+ACK answering a SYN");
    let p = SlicedPacket::from_ethernet(&rst[0]).expect("parses");
    let Some(TransportSlice::Tcp(t)) = &p.transport else { panic!("TCP") };
    assert_eq!(t.acknowledgment_number(), 1001, "acknowledges the SYN (seq 1000 + 1)");
    assert_eq!(a.drops(DropReason::ServiceNoEndpoint), 2);
    assert_eq!(a.worker.counters().total_drops(), 2);
}

#[test]
fn a_removed_backend_drops_its_connections_and_keeps_the_others() {
    let both = [IpAddr::V4(pod_ip(1, 2)), remote_backend()];
    let mut a = Node::new(1, &[service(Protocol::Tcp, &both)]);
    // Enough connections that both backends have some.
    let mut backend_of = HashMap::new();
    for sport in 30000..30064u16 {
        a.receive(1, &a.tcp(1, VIP, sport, VPORT, true, b""));
        let local = a.sent(2);
        let remote = a.sent(UPLINK);
        assert_eq!(local.len() + remote.len(), 1);
        backend_of.insert(sport, if local.is_empty() { remote_backend() } else { local_backend() });
    }
    let to_local = backend_of.values().filter(|b| **b == local_backend()).count();
    assert!((16..=48).contains(&to_local), "{to_local} of 64 connections to the local backend");

    // The remote backend goes away.
    a.set_services(&[service(Protocol::Tcp, &[local_backend()])]);
    let gone_before = a.drops(DropReason::ServiceBackendGone);
    for (&sport, &backend) in &backend_of {
        a.receive(1, &a.tcp(1, VIP, sport, VPORT, false, b"more"));
        let local = a.sent(2);
        assert!(a.sent(UPLINK).is_empty(), "nothing moves to another backend");
        if backend == local_backend() {
            assert_eq!(local.len(), 1, "connection on the surviving backend goes on");
        } else {
            assert!(local.is_empty(), "connection of the removed backend is not moved to the other one");
        }
    }
    let removed = backend_of.values().filter(|b| **b == remote_backend()).count() as u64;
    assert_eq!(a.drops(DropReason::ServiceBackendGone) - gone_before, removed);
    // A new connection goes to the survivor.
    a.receive(1, &a.tcp(1, VIP, 50000, VPORT, true, b""));
    assert_eq!(a.sent(2).len(), 1);
}

#[test]
fn hairpin_a_pod_reaches_itself_through_its_service() {
    let mut a = Node::new(1, &[service(Protocol::Tcp, &[local_backend()])]);
    // The backend pod itself (port 2) connects to the VIP.
    a.receive(2, &a.tcp(2, VIP, 41000, VPORT, true, b""));
    let out = a.sent(2);
    assert_eq!(out.len(), 1, "back to the same pod");
    let s = parse(&out[0]);
    assert_eq!((s.src, s.dst, s.dport), (IpAddr::V4(gateway_ip(1)), local_backend(), BPORT));
    assert_eq!(s.sport, 41000);
    // It answers the gateway address; it receives the answer from the VIP.
    let reply = tcp_frame(
        pod_mac(1, 2).0,
        gateway_mac(1).0,
        pod_ip(1, 2).octets(),
        gateway_ip(1).octets(),
        BPORT,
        41000,
        false,
        b"self",
    );
    a.receive(2, &reply);
    let back = a.sent(2);
    assert_eq!(back.len(), 1);
    let s = parse(&back[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(VIP), VPORT, local_backend(), 41000));
    assert_eq!(a.worker.counters().total_drops(), 0);
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let backends: Vec<IpAddr> = (0..8).map(|i| IpAddr::V4(Ipv4Addr::new(10, 244, 2, 10 + i))).collect();
    let mut spec = service(Protocol::Tcp, &backends);
    spec.affinity = Some(Duration::from_secs(10800));
    let mut a = Node::new(1, &[spec.clone()]);
    let mut seen = std::collections::HashSet::new();
    for sport in 30000..30032u16 {
        a.receive(1, &a.tcp(1, VIP, sport, VPORT, true, b""));
        let outer = a.sent(UPLINK);
        assert_eq!(outer.len(), 1);
        // The inner destination of the VXLAN packet: after outer Ethernet (14), IPv4 (20), UDP (8),
        // VXLAN (8) and inner Ethernet (14), at IPv4 offset 16.
        seen.insert(outer[0][64 + 16..64 + 20].to_vec());
    }
    assert_eq!(seen.len(), 1, "all 32 connections of one client on one backend");
    // Without affinity the same 32 connections spread.
    spec.affinity = None;
    let mut b = Node::new(1, &[spec]);
    let mut spread = std::collections::HashSet::new();
    for sport in 30000..30032u16 {
        b.receive(1, &b.tcp(1, VIP, sport, VPORT, true, b""));
        spread.insert(b.sent(UPLINK)[0][64 + 16..64 + 20].to_vec());
    }
    assert!(spread.len() >= 4, "{} backends", spread.len());
}

#[test]
fn terminating_endpoints_serve_only_when_no_ready_one_is_left() {
    let term = EndpointSpec { addr: local_backend(), port: BPORT, ready: false, serving: true, terminating: true };
    let mut spec = service(Protocol::Tcp, &[remote_backend()]);
    spec.endpoints.push(term);
    let mut a = Node::new(1, &[spec.clone()]);
    for sport in 30000..30016u16 {
        a.receive(1, &a.tcp(1, VIP, sport, VPORT, true, b""));
        assert_eq!(a.sent(UPLINK).len(), 1, "the ready remote endpoint takes every new connection");
    }
    spec.endpoints.remove(0);
    a.set_services(&[spec]);
    a.receive(1, &a.tcp(1, VIP, 31000, VPORT, true, b""));
    assert_eq!(a.sent(2).len(), 1, "only the terminating one is left: it serves");
}

#[test]
fn tracked_connections_survive_100_publications() {
    let backends: Vec<IpAddr> = (0..4).map(|i| IpAddr::V4(Ipv4Addr::new(10, 244, 2, 10 + i))).collect();
    let mut a = Node::new(1, &[service(Protocol::Tcp, &backends)]);
    let mut first = HashMap::new();
    for sport in 30000..30016u16 {
        a.receive(1, &a.tcp(1, VIP, sport, VPORT, true, b""));
        first.insert(sport, a.sent(UPLINK)[0][64 + 16..64 + 20].to_vec());
    }
    for round in 0..100u16 {
        // Republish: the same routes, and a service set that grows by one backend each time (so
        // new connections would be spread differently), plus the routes themselves.
        let mut more = backends.clone();
        more.extend((0..round % 8).map(|i| IpAddr::V4(Ipv4Addr::new(10, 244, 2, 100 + i as u8))));
        a.set_services(&[service(Protocol::Tcp, &more)]);
        let desired = a.tables.desired().clone();
        a.tables.set_desired(desired, Instant::now()).expect("same routes");
        a.fib = a.tables.current();
        let sport = 30000 + round % 16;
        a.receive(1, &a.tcp(1, VIP, sport, VPORT, false, b"data"));
        let out = a.sent(UPLINK);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0][64 + 16..64 + 20], first[&sport][..], "round {round}: same backend");
    }
    assert_eq!(a.worker.counters().total_drops(), 0);
}

/// With flow records on, a connection to a Service's VIP is recorded under the 5-tuple it was sent
/// with (the VIP), with the backend the service stage chose, the SYN among its TCP flags, and the
/// stage and ports that delivered it.
#[test]
fn flow_records_carry_the_vip_and_the_backend_chosen() {
    let a = Node::new(1, &[service(Protocol::Tcp, &[local_backend()])]);
    let mut a = Node { worker: a.worker.with_flows(64, 64, 0), ..a };
    a.receive(1, &a.tcp(1, VIP, 40000, VPORT, true, b""));
    assert_eq!(a.sent(2).len(), 1, "delivered to the backend");
    a.worker.publish();
    let export = a.worker.flow_export().expect("flows on");
    let r = export.records.pop().expect("a record");
    assert!(export.records.pop().is_none(), "one flow");
    assert_eq!((r.key.src_ip(), r.key.sport), (IpAddr::V4(pod_ip(1, 1)), 40000));
    assert_eq!((r.key.dst_ip(), r.key.dport, r.key.proto), (ip(VIP), VPORT, 6));
    assert_eq!((r.backend_ip(), r.backend_port), (Some(local_backend()), BPORT));
    assert_eq!(r.tcp_flags & 0x02, 0x02, "SYN seen");
    assert_eq!((r.in_port, r.out_port, r.packets), (1, 2, 1));
    assert_eq!(r.verdict, ferry_dataplane::flows::FlowVerdict::Forwarded);
    assert_eq!(r.stage, ferry_dataplane::flows::Stage::Deliver as u8);
}
