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
use ferry_tables::{EndpointSpec, ExternalSpec, Protocol, ServiceSpec, Snapshot, Tables};
use ferry_testsupport::node::{
    self, TestNode, UPLINK, gateway_ip, gateway_mac, pod_ip, pod_mac, underlay_ip, underlay_mac,
};

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
        external: Default::default(),
        internal_local: false,
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
    let term = EndpointSpec {
        addr: local_backend(),
        port: BPORT,
        ready: false,
        serving: true,
        terminating: true,
        local: false,
    };
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

// Services from outside the cluster (NodePort, external IPs): plain frames on the uplink.

const NODE_PORT: u16 = 30080;
/// A client outside the cluster, on the underlay, and its MAC.
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const CLIENT_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 7];
const EXTERNAL_IP: [u8; 4] = [203, 0, 113, 10];

/// A node with two pods and the host port (the way back out for replies to outside clients).
fn external_node(n: u8, services: &[ServiceSpec]) -> Node {
    let spec = TestNode { pods: 2, host_port: true, host_exit: true, ..TestNode::new(n) };
    let (worker, _) = spec.build();
    let mut tables = spec.tables();
    tables.set_services(services, Instant::now()).expect("services build");
    let fib = tables.current();
    Node { n, worker, tables, fib }
}

const HOST: usize = 3;

fn external_service(protocol: Protocol, endpoints: Vec<EndpointSpec>, local: bool) -> ServiceSpec {
    ServiceSpec {
        name: "default/web:http".into(),
        vip: ip(VIP),
        port: VPORT,
        protocol,
        endpoints,
        affinity: None,
        external: ExternalSpec {
            node_port: Some(NODE_PORT),
            ips: vec![ip(EXTERNAL_IP)],
            local,
            health_check_node_port: None,
        },
        internal_local: false,
    }
}

/// A frame from the client to node `n`'s uplink.
fn from_client(n: u8, dst: [u8; 4], proto: Protocol, sport: u16, dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    match proto {
        Protocol::Tcp => tcp_frame(CLIENT_MAC, underlay_mac(n).0, CLIENT, dst, sport, dport, syn, payload),
        Protocol::Udp => {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, underlay_mac(n).0)
                .ipv4(CLIENT, dst, 64)
                .udp(sport, dport)
                .write(&mut out, payload)
                .expect("build");
            out
        }
        Protocol::Sctp => sctp_frame(CLIENT_MAC, underlay_mac(n).0, CLIENT, dst, sport, dport),
    }
}

#[test]
fn node_port_cluster_policy_translates_both_ends_to_a_remote_backend_and_back() {
    let svc = [external_service(Protocol::Tcp, vec![EndpointSpec::ready(remote_backend(), BPORT)], false)];
    let (mut a, mut b) = (external_node(1, &svc), external_node(2, &svc));
    let node = underlay_ip(1).octets();
    a.receive(UPLINK, &from_client(1, node, Protocol::Tcp, 41000, NODE_PORT, true, b""));
    let outer = a.sent(UPLINK);
    assert_eq!(outer.len(), 1, "encapsulated toward the backend's node");
    b.receive(UPLINK, &outer[0]);
    let delivered = b.sent(1);
    assert_eq!(delivered.len(), 1);
    let s = parse(&delivered[0]);
    // The backend sees node 1's own address in the pod network as the source (Cluster policy).
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip([10, 244, 1, 0]), 41000, remote_backend(), BPORT));
    assert!(s.flags.0, "the SYN");
    // Its reply goes to node 1 (that address is in node 1's pod CIDR), which restores both ends
    // and hands it to its kernel through the host port.
    let reply = tcp_frame(
        pod_mac(2, 1).0,
        gateway_mac(2).0,
        pod_ip(2, 1).octets(),
        [10, 244, 1, 0],
        BPORT,
        41000,
        false,
        b"hi",
    );
    b.receive(1, &reply);
    let outer = b.sent(UPLINK);
    assert_eq!(outer.len(), 1);
    a.receive(UPLINK, &outer[0]);
    let back = a.sent(HOST);
    assert_eq!(back.len(), 1, "the reply leaves through the node's kernel");
    let s = parse(&back[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(node), NODE_PORT, ip(CLIENT), 41000));
    assert_eq!(s.payload, b"hi");
    // The next segment of the connection keeps its translation.
    a.receive(UPLINK, &from_client(1, node, Protocol::Tcp, 41000, NODE_PORT, false, b"more"));
    b.receive(UPLINK, &a.sent(UPLINK)[0]);
    let s = parse(&b.sent(1)[0]);
    assert_eq!(
        (s.src, s.sport, s.dst, s.dport, s.payload.as_slice()),
        (ip([10, 244, 1, 0]), 41000, remote_backend(), BPORT, &b"more"[..])
    );
    assert_eq!(a.worker.counters().total_drops() + b.worker.counters().total_drops(), 0);
}

#[test]
fn a_second_client_with_the_same_source_port_gets_another_translated_port() {
    let svc = [external_service(Protocol::Udp, vec![EndpointSpec::ready(local_backend(), BPORT)], false)];
    let mut a = external_node(1, &svc);
    let node = underlay_ip(1).octets();
    a.receive(UPLINK, &from_client(1, node, Protocol::Udp, 5000, NODE_PORT, false, b"one"));
    let first = parse(&a.sent(2)[0]);
    assert_eq!((first.src, first.sport, first.dst), (ip([10, 244, 1, 0]), 5000, local_backend()));
    // Another client, same source port: the backend must not see one tuple for both.
    let mut other = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, underlay_mac(1).0)
        .ipv4([198, 51, 100, 8], node, 64)
        .udp(5000, NODE_PORT)
        .write(&mut other, b"two")
        .expect("build");
    a.receive(UPLINK, &other);
    let second = parse(&a.sent(2)[0]);
    assert_eq!(second.src, ip([10, 244, 1, 0]));
    assert_ne!(second.sport, 5000, "a port of its own");
    // Each reply reaches its own client.
    for (s, client) in [(&first, CLIENT), (&second, [198, 51, 100, 8])] {
        let mut reply = Vec::new();
        PacketBuilder::ethernet2(pod_mac(1, 2).0, gateway_mac(1).0)
            .ipv4(pod_ip(1, 2).octets(), [10, 244, 1, 0], 64)
            .udp(BPORT, s.sport)
            .write(&mut reply, b"r")
            .expect("build");
        a.receive(2, &reply);
        let back = parse(&a.sent(HOST)[0]);
        assert_eq!((back.src, back.sport, back.dst, back.dport), (ip(node), NODE_PORT, ip(client), 5000));
    }
    assert_eq!(a.worker.counters().total_drops(), 0);
}

#[test]
fn local_policy_keeps_the_client_address_and_uses_local_endpoints_only() {
    let local = EndpointSpec { local: true, ..EndpointSpec::ready(local_backend(), BPORT) };
    let svc = [external_service(Protocol::Tcp, vec![local, EndpointSpec::ready(remote_backend(), BPORT)], true)];
    let mut a = external_node(1, &svc);
    for i in 0..20u16 {
        a.receive(UPLINK, &from_client(1, EXTERNAL_IP, Protocol::Tcp, 42000 + i, VPORT, true, b""));
        let out = a.sent(2);
        assert_eq!(out.len(), 1, "always the local endpoint");
        let s = parse(&out[0]);
        assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(CLIENT), 42000 + i, local_backend(), BPORT));
    }
    assert!(a.sent(UPLINK).is_empty(), "never the remote one");
    // The reply, from the pod straight to the client, gets the external IP back and leaves
    // through the node's kernel.
    let reply = tcp_frame(pod_mac(1, 2).0, gateway_mac(1).0, pod_ip(1, 2).octets(), CLIENT, BPORT, 42000, false, b"ok");
    a.receive(2, &reply);
    let s = parse(&a.sent(HOST)[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(EXTERNAL_IP), VPORT, ip(CLIENT), 42000));
    // Node 2 has no local endpoint of it: dropped and counted.
    let remote_local = EndpointSpec { local: true, ..EndpointSpec::ready(remote_backend(), BPORT) };
    let svc2 = [external_service(Protocol::Tcp, vec![EndpointSpec::ready(local_backend(), BPORT), remote_local], true)];
    let mut b = external_node(2, &svc2);
    let mut svc_none = svc2.clone();
    svc_none[0].endpoints = vec![EndpointSpec::ready(pod_ip(1, 2).into(), BPORT)];
    b.set_services(&svc_none);
    b.receive(UPLINK, &from_client(2, underlay_ip(2).octets(), Protocol::Tcp, 42100, NODE_PORT, true, b""));
    assert!(b.sent(UPLINK).is_empty() && b.sent(1).is_empty() && b.sent(2).is_empty());
    assert_eq!(b.drops(DropReason::ExternalNoLocalEndpoint), 1);
}

#[test]
fn external_without_endpoints_is_rejected_from_the_node_and_other_traffic_goes_to_the_kernel() {
    let svc = [external_service(Protocol::Tcp, vec![], false), external_service(Protocol::Udp, vec![], false)];
    let mut a = external_node(1, &svc);
    let node = underlay_ip(1).octets();
    a.receive(UPLINK, &from_client(1, node, Protocol::Tcp, 43000, NODE_PORT, true, b""));
    let rst = a.sent(UPLINK);
    assert_eq!(rst.len(), 1, "a RST back to the client");
    let s = parse(&rst[0]);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (ip(node), NODE_PORT, ip(CLIENT), 43000));
    assert!(s.flags.2, "RST");
    assert_eq!(&rst[0][6..12], &underlay_mac(1).0, "from the uplink's MAC");
    a.receive(UPLINK, &from_client(1, node, Protocol::Udp, 43001, NODE_PORT, false, b"q"));
    let icmp = a.sent(UPLINK);
    assert_eq!(icmp.len(), 1, "ICMP port unreachable");
    let p = SlicedPacket::from_ethernet(&icmp[0]).expect("parses");
    let Some(NetSlice::Ipv4(h)) = &p.net else { panic!("IPv4") };
    assert_eq!((h.header().source(), h.header().destination()), (underlay_ip(1).octets(), CLIENT));
    assert_eq!(a.drops(DropReason::ServiceNoEndpoint), 2);
    // A port no service has (the uplink program would not hand it over; a stale map might):
    // to the node's kernel, unchanged.
    let ssh = from_client(1, node, Protocol::Tcp, 43002, 22, true, b"");
    a.receive(UPLINK, &ssh);
    let k = a.sent(HOST);
    assert_eq!(k.len(), 1);
    let s = parse(&k[0]);
    assert_eq!((s.src, s.dst, s.dport), (ip(CLIENT), ip(node), 22));
    // Tunnel traffic is still decapsulated as before (a ClusterIP round trip works).
    assert_eq!(a.drops(DropReason::NoRoute), 0);
}

/// CRC32c, bit by bit (RFC 9260 appendix A's polynomial, reflected: 0x82F63B78): independent of
/// the `crc32c` crate the data plane uses.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An SCTP packet (common header and one INIT-like chunk) from `src`:`sport` to `dst`:`dport`,
/// in an Ethernet frame, its CRC32c computed (stored least significant byte first).
fn sctp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&sport.to_be_bytes());
    sctp.extend_from_slice(&dport.to_be_bytes());
    sctp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
    sctp.extend_from_slice(&[0; 4]);
    // INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, initial TSN.
    sctp.extend_from_slice(&[1, 0, 0, 20, 0xca, 0xfe, 0xba, 0xbe, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    let crc = crc32c_bitwise(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .write(&mut out, etherparse::IpNumber(132), &sctp)
        .expect("build");
    out
}

/// Addresses and ports of an SCTP frame, with its IPv4 header checksum and CRC32c verified.
fn parse_sctp(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("frame parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
    assert_eq!(h.protocol.0, 132, "SCTP");
    let mut sctp = ip.payload().payload.to_vec();
    let stored = u32::from_le_bytes([sctp[8], sctp[9], sctp[10], sctp[11]]);
    sctp[8..12].fill(0);
    assert_eq!(stored, crc32c_bitwise(&sctp), "SCTP CRC32c");
    let port = |i: usize| u16::from_be_bytes([sctp[i], sctp[i + 1]]);
    (h.source.into(), port(0), h.destination.into(), port(2))
}

#[test]
fn sctp_cluster_ip_translated_both_ways_with_its_crc32c() {
    let mut a = Node::new(1, &[service(Protocol::Sctp, &[local_backend()])]);
    let init = sctp_frame(pod_mac(1, 1).0, gateway_mac(1).0, pod_ip(1, 1).octets(), VIP, 40000, VPORT);
    a.receive(1, &init);
    let out = a.sent(2);
    assert_eq!(out.len(), 1, "the INIT reaches the backend pod on port 2");
    assert_eq!(parse_sctp(&out[0]), (IpAddr::V4(pod_ip(1, 1)), 40000, local_backend(), BPORT));
    // The backend's answer goes back from the VIP and the service port.
    let ack = sctp_frame(pod_mac(1, 2).0, gateway_mac(1).0, pod_ip(1, 2).octets(), pod_ip(1, 1).octets(), BPORT, 40000);
    a.receive(2, &ack);
    let back = a.sent(1);
    assert_eq!(back.len(), 1);
    assert_eq!(parse_sctp(&back[0]), (ip(VIP), VPORT, IpAddr::V4(pod_ip(1, 1)), 40000));
    assert_eq!(a.worker.counters().total_drops(), 0);
    // A packet with a wrong CRC is translated but not repaired: it stays wrong.
    let mut bad = sctp_frame(pod_mac(1, 1).0, gateway_mac(1).0, pod_ip(1, 1).octets(), VIP, 40000, VPORT);
    let at = bad.len() - 20 - 4;
    bad[at] ^= 0x5a;
    a.receive(1, &bad);
    let out = a.sent(2);
    assert_eq!(out.len(), 1);
    let r = std::panic::catch_unwind(|| parse_sctp(&out[0]));
    assert!(r.is_err(), "a corrupted SCTP packet must not leave with a valid CRC");
    // No endpoint: refused with ICMP port unreachable, as for UDP.
    a.set_services(&[service(Protocol::Sctp, &[])]);
    a.receive(1, &sctp_frame(pod_mac(1, 1).0, gateway_mac(1).0, pod_ip(1, 1).octets(), VIP, 40001, VPORT));
    let refused = a.sent(1);
    assert_eq!(refused.len(), 1, "an ICMP error back to the client");
    let p = SlicedPacket::from_ethernet(&refused[0]).expect("parses");
    assert!(matches!(p.transport, Some(TransportSlice::Icmpv4(_))), "{:?}", p.transport);
}
