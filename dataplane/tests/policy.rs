//! The policy stage over in-memory ports: two simulated nodes with the real tables, the real
//! policy compiler and the shared connection tracking. Ingress and egress on same-node delivery
//! and on decapsulated delivery, replies of allowed connections through a deny-all (stateful), a
//! new deny stopping an existing connection at its next packet, evaluation on a service's backend
//! port (after translation), the node and the pod itself always allowed, and the drops counted.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use ferry_dataplane::port::mem::MemPort;
use ferry_dataplane::worker::Worker;
use ferry_encap::DropReason;
use ferry_tables::policy::{
    IpBlockSpec, LabelSelectorSpec, Labels, NetworkPolicySpec, PeerSpec, PodSpec, Policy, PolicyCompiler, PortSpec,
    PortValue, RuleSpec,
};
use ferry_tables::{EndpointSpec, Protocol, ServiceSpec, Snapshot, Tables};
use ferry_testsupport::node::{self, TestNode, UPLINK, gateway_mac, host_mac, pod_ip, pod_mac};

struct Node {
    n: u8,
    worker: Worker<MemPort>,
    tables: Tables,
    compiler: PolicyCompiler,
    fib: Arc<Snapshot>,
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Pods: x/a on node 1 port 1, x/b on node 1 port 2, x/c on node 2 port 1, labelled pod=a|b|c.
fn pods() -> Vec<PodSpec> {
    [("a", 1, 1), ("b", 1, 2), ("c", 2, 1)]
        .iter()
        .map(|&(name, n, port)| PodSpec {
            namespace: "x".into(),
            name: name.into(),
            labels: labels(&[("pod", name)]),
            ips: vec![IpAddr::V4(pod_ip(n, port))],
            node: format!("n{n}"),
            ports: vec![],
        })
        .collect()
}

fn selector(pod: &str) -> LabelSelectorSpec {
    LabelSelectorSpec { match_labels: labels(&[("pod", pod)]), match_expressions: vec![] }
}

/// A policy on `pod` of `types` with `ingress` / `egress` rules.
fn policy(name: &str, pod: &str, types: &[&str], ingress: Vec<RuleSpec>, egress: Vec<RuleSpec>) -> Policy {
    Policy::from_spec(&NetworkPolicySpec {
        namespace: "x".into(),
        name: name.into(),
        pod_selector: selector(pod),
        policy_types: Some(types.iter().map(|t| (*t).to_owned()).collect()),
        ingress,
        egress,
    })
    .expect("valid policy")
}

/// A rule: from/to pod `peer` on TCP `port` (any port: `None`).
fn rule(peer: &str, port: Option<i64>) -> RuleSpec {
    RuleSpec {
        ports: port
            .map(|p| vec![PortSpec { protocol: None, port: Some(PortValue::Number(p)), end_port: None }])
            .unwrap_or_default(),
        peers: vec![PeerSpec { pod_selector: Some(selector(peer)), ..Default::default() }],
    }
}

impl Node {
    fn new(n: u8, policies: &[Policy]) -> Node {
        Node::with(TestNode { pods: 2, ..TestNode::new(n) }, policies)
    }

    fn with(spec: TestNode, policies: &[Policy]) -> Node {
        let n = spec.n;
        let (worker, _) = spec.build();
        let tables = spec.tables();
        let mut compiler = PolicyCompiler::new(format!("n{n}"), vec![IpAddr::V4(Ipv4Addr::new(10, 244, n, 0))]);
        for p in pods() {
            compiler.set_pod(&p.key(), Some(&p));
        }
        let fib = tables.current();
        let mut node = Node { n, worker, tables, compiler, fib };
        node.set_policies(&[], policies);
        node
    }

    fn set_policies(&mut self, removed: &[&str], policies: &[Policy]) {
        for r in removed {
            self.compiler.set_policy(&format!("x/{r}"), None);
        }
        for p in policies {
            self.compiler.set_policy(&p.key(), Some(p));
        }
        self.tables.set_policy(self.compiler.build(), Instant::now());
        self.fib = self.tables.current();
    }

    fn set_services(&mut self, services: &[ServiceSpec]) {
        self.tables.set_services(services, Instant::now()).expect("services");
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

    /// A TCP segment from the pod on `port` to `dst`:`dport` (a SYN, or an ACK).
    fn tcp(&self, port: u8, dst: Ipv4Addr, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let b = PacketBuilder::ethernet2(pod_mac(self.n, port).0, gateway_mac(self.n).0)
            .ipv4(pod_ip(self.n, port).octets(), dst.octets(), 64)
            .tcp(sport, dport, 1000, 64240);
        let b = if syn { b.syn() } else { b.ack(5000) };
        b.write(&mut out, b"").expect("build");
        out
    }

    fn udp(&self, port: u8, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(pod_mac(self.n, port).0, gateway_mac(self.n).0)
            .ipv4(pod_ip(self.n, port).octets(), dst.octets(), 64)
            .udp(sport, dport)
            .write(&mut out, b"q")
            .expect("build");
        out
    }
}

fn ports_of(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    let (s, d) = (ip.header().source(), ip.header().destination());
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => (s.into(), t.source_port(), d.into(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (s.into(), u.source_port(), d.into(), u.destination_port()),
        other => panic!("not TCP or UDP: {other:?}"),
    }
}

#[test]
fn same_node_ingress_and_egress_with_replies_allowed_by_state() {
    // b takes TCP 80 from a only, and sends nothing of its own (deny-all egress).
    let mut n1 = Node::new(
        1,
        &[
            policy("b-in", "b", &["Ingress"], vec![rule("a", Some(80))], vec![]),
            policy("b-out", "b", &["Egress"], vec![], vec![]),
        ],
    );
    let (a, b) = (pod_ip(1, 1), pod_ip(1, 2));
    n1.receive(1, &n1.tcp(1, b, 40000, 80, true));
    assert_eq!(n1.sent(2).len(), 1, "a -> b:80 allowed");
    // b answers through its deny-all egress: the connection's reply.
    let reply = {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(pod_mac(1, 2).0, gateway_mac(1).0)
            .ipv4(b.octets(), a.octets(), 64)
            .tcp(80, 40000, 7000, 64240)
            .syn()
            .ack(1001)
            .write(&mut out, b"")
            .expect("build");
        out
    };
    n1.receive(2, &reply);
    let back = n1.sent(1);
    assert_eq!(back.len(), 1, "the reply reaches a");
    assert_eq!(ports_of(&back[0]), (IpAddr::V4(b), 80, IpAddr::V4(a), 40000));
    // a -> b:81: not allowed.
    n1.receive(1, &n1.tcp(1, b, 40001, 81, true));
    assert!(n1.sent(2).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 1);
    // b opening a connection of its own: its egress refuses.
    n1.receive(2, &n1.tcp(2, a, 50000, 80, true));
    assert!(n1.sent(1).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedEgress), 1);
    // b may always reach itself and its node.
    n1.receive(2, &n1.udp(2, b, 50001, 53));
    assert_eq!(n1.worker.counters().drops(DropReason::PolicyDeniedEgress), 1, "a pod reaches itself");
    assert_eq!(n1.worker.counters().total_drops(), 2);
}

#[test]
fn cross_node_ingress_at_the_destination_and_the_reply_through_both() {
    // c (node 2) takes TCP 80 from a only; a (node 1) takes nothing (deny-all ingress).
    let policies = [
        policy("c-in", "c", &["Ingress"], vec![rule("a", Some(80))], vec![]),
        policy("a-in", "a", &["Ingress"], vec![], vec![]),
    ];
    let (mut n1, mut n2) = (Node::new(1, &policies), Node::new(2, &policies));
    let (a, b, c) = (pod_ip(1, 1), pod_ip(1, 2), pod_ip(2, 1));
    n1.receive(1, &n1.tcp(1, c, 40000, 80, true));
    let outer = n1.sent(UPLINK);
    assert_eq!(outer.len(), 1, "a has no egress policy: encapsulated");
    n2.receive(UPLINK, &outer[0]);
    assert_eq!(n2.sent(1).len(), 1, "c's ingress allows a on 80");
    // c answers; node 2 sends it (c has no egress policy), node 1 delivers it through a's
    // deny-all ingress: it is the reply of a's connection.
    n2.receive(1, &n2.tcp(1, a, 80, 40000, false));
    let outer = n2.sent(UPLINK);
    assert_eq!(outer.len(), 1);
    n1.receive(UPLINK, &outer[0]);
    assert_eq!(n1.sent(1).len(), 1, "the reply reaches a");
    // b -> c:80: refused at node 2, on decapsulated delivery.
    n1.receive(2, &n1.tcp(2, c, 40000, 80, true));
    let outer = n1.sent(UPLINK);
    assert_eq!(outer.len(), 1);
    n2.receive(UPLINK, &outer[0]);
    assert!(n2.sent(1).is_empty());
    assert_eq!(n2.drops(DropReason::PolicyDeniedIngress), 1);
    // c opening a connection to a: refused at node 1 (a's ingress).
    n2.receive(1, &n2.tcp(1, a, 50000, 22, true));
    n1.receive(UPLINK, &n2.sent(UPLINK)[0]);
    assert!(n1.sent(1).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 1);
    let _ = b;
}

#[test]
fn a_new_deny_stops_an_existing_connection_at_its_next_packet() {
    let allow = policy("b-in", "b", &["Ingress"], vec![rule("a", Some(80))], vec![]);
    let mut n1 = Node::new(1, std::slice::from_ref(&allow));
    let (a, b) = (pod_ip(1, 1), pod_ip(1, 2));
    n1.receive(1, &n1.tcp(1, b, 40000, 80, true));
    assert_eq!(n1.sent(2).len(), 1);
    for _ in 0..3 {
        n1.receive(1, &n1.tcp(1, b, 40000, 80, false));
        assert_eq!(n1.sent(2).len(), 1, "tracked");
    }
    // The rule now names port 81 only: the established connection to 80 stops, both ways.
    n1.set_policies(&[], &[policy("b-in", "b", &["Ingress"], vec![rule("a", Some(81))], vec![])]);
    n1.receive(1, &n1.tcp(1, b, 40000, 80, false));
    assert!(n1.sent(2).is_empty(), "the next packet is refused");
    n1.receive(2, &n1.tcp(2, a, 80, 40000, false));
    assert!(n1.sent(1).is_empty(), "so is the reply direction");
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 2);
    // Allowed again: the connection goes on.
    n1.set_policies(&["b-in"], &[allow]);
    n1.receive(1, &n1.tcp(1, b, 40000, 80, false));
    assert_eq!(n1.sent(2).len(), 1);
    // And no policy at all: everything open.
    n1.set_policies(&["b-in"], &[]);
    n1.receive(1, &n1.tcp(1, b, 40002, 9999, true));
    assert_eq!(n1.sent(2).len(), 1);
}

#[test]
fn a_service_is_judged_on_its_backend_port() {
    let svc = ServiceSpec {
        name: "x/web:http".into(),
        vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
        port: 80,
        protocol: Protocol::Tcp,
        endpoints: vec![EndpointSpec::ready(IpAddr::V4(pod_ip(1, 2)), 8080)],
        affinity: None,
        external: Default::default(),
        internal_local: false,
    };
    // b takes 8080 from a (the backend port), a sends only to b on 8080.
    let mut n1 = Node::new(
        1,
        &[
            policy("b-in", "b", &["Ingress"], vec![rule("a", Some(8080))], vec![]),
            policy("a-out", "a", &["Egress"], vec![], vec![rule("b", Some(8080))]),
        ],
    );
    n1.set_services(std::slice::from_ref(&svc));
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    n1.receive(1, &n1.tcp(1, vip, 40000, 80, true));
    let got = n1.sent(2);
    assert_eq!(got.len(), 1, "a -> VIP:80 -> b:8080 allowed");
    assert_eq!(ports_of(&got[0]).3, 8080);
    // b's reply goes back through the VIP translation after its policy check.
    n1.receive(2, &n1.tcp(2, pod_ip(1, 1), 8080, 40000, false));
    let back = n1.sent(1);
    assert_eq!(back.len(), 1);
    assert_eq!(ports_of(&back[0]), (IpAddr::V4(vip), 80, IpAddr::V4(pod_ip(1, 1)), 40000));
    // A policy naming the service port (80) instead of the backend's does not let it through.
    n1.set_policies(&[], &[policy("b-in", "b", &["Ingress"], vec![rule("a", Some(80))], vec![])]);
    n1.receive(1, &n1.tcp(1, vip, 40001, 80, true));
    assert!(n1.sent(2).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 1);
}

#[test]
fn no_policy_costs_nothing_and_drops_nothing() {
    let mut n1 = Node::new(1, &[]);
    assert!(n1.fib.policy().is_empty());
    n1.receive(1, &n1.tcp(1, pod_ip(1, 2), 40000, 80, true));
    assert_eq!(n1.sent(2).len(), 1);
    n1.receive(2, &n1.tcp(2, pod_ip(1, 1), 80, 40000, false));
    assert_eq!(n1.sent(1).len(), 1);
    assert_eq!(n1.worker.counters().total_drops(), 0);
}

#[test]
fn the_first_policy_judges_a_connection_by_its_opener_when_the_reply_comes_first() {
    // a opens a connection to b:80 while no pod is isolated (no records are kept then).
    let mut n1 = Node::new(1, &[]);
    let (a, b) = (pod_ip(1, 1), pod_ip(1, 2));
    n1.receive(1, &n1.tcp(1, b, 40000, 80, true));
    assert_eq!(n1.sent(2).len(), 1);
    n1.receive(2, &n1.tcp(2, a, 80, 40000, false));
    assert_eq!(n1.sent(1).len(), 1);
    // b now takes nothing in. Its reply comes first: it is refused as a packet of a's connection
    // (b's egress alone would allow it), and so is a's next packet.
    n1.set_policies(&[], &[policy("b-in", "b", &["Ingress"], vec![], vec![])]);
    n1.receive(2, &n1.tcp(2, a, 80, 40000, false));
    assert!(n1.sent(1).is_empty(), "the reply is refused");
    n1.receive(1, &n1.tcp(1, b, 40000, 80, false));
    assert!(n1.sent(2).is_empty(), "so is the opener's next packet");
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 2);
    // A connection b opens itself goes through, its replies too (records made on its SYN).
    n1.receive(2, &n1.tcp(2, a, 40001, 80, true));
    assert_eq!(n1.sent(1).len(), 1);
    n1.receive(1, &n1.tcp(1, b, 80, 40001, false));
    assert_eq!(n1.sent(2).len(), 1, "the reply to b's own connection");
}

#[test]
fn a_connection_seen_in_mid_stream_is_judged_by_its_likely_opener_and_never_more_openly() {
    // b takes TCP 80 from a only; a takes nothing in.
    let policies = [
        policy("b-in", "b", &["Ingress"], vec![rule("a", Some(80))], vec![]),
        policy("a-in", "a", &["Ingress"], vec![], vec![]),
    ];
    let mut n1 = Node::new(1, &policies);
    let (a, b) = (pod_ip(1, 1), pod_ip(1, 2));
    // A connection a opened to b:80 before the agent started (no record). b's reply comes first:
    // its own direction is refused (a takes nothing in), and the guess never lets more through
    // than that. a's next packet is allowed and makes the records; b's replies then pass.
    n1.receive(2, &n1.tcp(2, a, 80, 40000, false));
    assert!(n1.sent(1).is_empty(), "judged in its own direction too");
    n1.receive(1, &n1.tcp(1, b, 40000, 80, false));
    assert_eq!(n1.sent(2).len(), 1, "the opener's next packet");
    n1.receive(2, &n1.tcp(2, a, 80, 40000, false));
    assert_eq!(n1.sent(1).len(), 1, "the reply, once the opener made the records");
    // From a low port to a's high one, b is still refused by a's ingress; a's packet to b:81
    // (b takes 80 only) is refused as well.
    n1.receive(2, &n1.tcp(2, a, 80, 40002, false));
    assert!(n1.sent(1).is_empty(), "a takes nothing in");
    n1.receive(1, &n1.tcp(1, b, 40003, 81, false));
    assert!(n1.sent(2).is_empty(), "b takes 80 only");
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 3);
}

/// A TCP segment from outside the cluster through the host port (the node's kernel routing it).
fn from_outside(n: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(host_mac(n).0, gateway_mac(n).0)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 7000, 64240);
    let b = match flags {
        "syn" => b.syn(),
        "synack" => b.syn().ack(1001),
        _ => b.ack(1001),
    };
    b.write(&mut out, b"").expect("build");
    out
}

#[test]
fn egress_to_outside_the_cluster_through_the_host_exit() {
    // a may reach 192.0.2.0/24 except 192.0.2.128/25 on TCP 80 only, and takes nothing in; b
    // no policy selects. The host port (port 3) is the way to and from the node's kernel.
    let to_block = RuleSpec {
        ports: vec![PortSpec { protocol: None, port: Some(PortValue::Number(80)), end_port: None }],
        peers: vec![PeerSpec {
            ip_block: Some(IpBlockSpec { cidr: "192.0.2.0/24".into(), except: vec!["192.0.2.128/25".into()] }),
            ..Default::default()
        }],
    };
    let spec = TestNode { pods: 2, host_port: true, host_exit: true, ..TestNode::new(1) };
    let host = 3;
    let mut n1 = Node::with(
        spec,
        &[policy("a-out", "a", &["Egress"], vec![], vec![to_block]), policy("a-in", "a", &["Ingress"], vec![], vec![])],
    );
    let a = pod_ip(1, 1);
    let (allowed, excepted) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 200));
    n1.receive(1, &n1.tcp(1, allowed, 40000, 80, true));
    let out = n1.sent(host);
    assert_eq!(out.len(), 1, "a -> 192.0.2.1:80 allowed, to the node's kernel");
    assert_eq!(ports_of(&out[0]), (IpAddr::V4(a), 40000, IpAddr::V4(allowed), 80));
    // The reply, routed back by the node's kernel through the host port: the connection's, so
    // a's deny-all ingress lets it in.
    n1.receive(host, &from_outside(1, allowed, a, 80, 40000, "synack"));
    let back = n1.sent(1);
    assert_eq!(back.len(), 1, "the reply reaches a");
    assert_eq!(ports_of(&back[0]), (IpAddr::V4(allowed), 80, IpAddr::V4(a), 40000));
    // Another port, and an excepted address: refused by a's egress rules.
    n1.receive(1, &n1.tcp(1, allowed, 40001, 81, true));
    n1.receive(1, &n1.tcp(1, excepted, 40002, 80, true));
    assert!(n1.sent(host).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedEgress), 2);
    // A connection from outside to a (the kernel routing it to the pod): a's ingress refuses.
    n1.receive(host, &from_outside(1, allowed, a, 5555, 80, "syn"));
    assert!(n1.sent(1).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 1);
    // b, which no policy selects, reaches anything outside; and from outside it is reachable.
    n1.receive(2, &n1.tcp(2, allowed, 40003, 81, true));
    assert_eq!(n1.sent(host).len(), 1, "b is not isolated");
    n1.receive(host, &from_outside(1, excepted, pod_ip(1, 2), 5556, 22, "syn"));
    assert_eq!(n1.sent(2).len(), 1, "to b from outside");
    // From the host port, a pod network source that is not the node's own is still a spoof.
    n1.receive(host, &from_outside(1, pod_ip(1, 2), a, 5557, 80, "syn"));
    assert_eq!(n1.drops(DropReason::SpoofedSource), 1);
    assert_eq!(n1.worker.counters().total_drops(), 4);
}

/// An ICMP port unreachable from the pod on node 1's `port` to `to`, quoting the UDP packet
/// `to`:`sport` -> `quoted_dst`:`dport` it answers.
fn port_unreachable(port: u8, to: Ipv4Addr, quoted_dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut quoted = Vec::new();
    PacketBuilder::ipv4(to.octets(), quoted_dst.octets(), 63)
        .udp(sport, dport)
        .write(&mut quoted, b"q")
        .expect("quoted");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(pod_mac(1, port).0, gateway_mac(1).0)
        .ipv4(pod_ip(1, port).octets(), to.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut out, &quoted)
        .expect("error");
    out
}

/// The outer source and the quoted packet's destination and port of an ICMPv4 error, and whether
/// its checksums verify.
fn error_of(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, bool) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("ICMP") };
    let q = icmp.payload();
    let inner = etherparse::Ipv4HeaderSlice::from_slice(q).expect("quoted header");
    let dport = u16::from_be_bytes([q[22], q[23]]);
    let h = ip.header().to_header();
    let ok = h.header_checksum == h.calc_header_checksum()
        && etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), q).checksum == icmp.checksum()
        && inner.to_header().header_checksum == inner.to_header().calc_header_checksum();
    (ip.header().source_addr(), inner.destination_addr(), dport, ok)
}

#[test]
fn icmp_errors_of_an_allowed_connection_are_related() {
    // a takes nothing in; b takes anything from a.
    let mut n1 = Node::new(
        1,
        &[
            policy("a-in", "a", &["Ingress"], vec![], vec![]),
            policy("b-in", "b", &["Ingress"], vec![rule("a", None)], vec![]),
        ],
    );
    let (a, b) = (pod_ip(1, 1), pod_ip(1, 2));
    n1.receive(1, &n1.udp(1, b, 5000, 53));
    assert_eq!(n1.sent(2).len(), 1, "a -> b:53 allowed");
    // b's port unreachable about it passes a's deny-all: related to the connection.
    n1.receive(2, &port_unreachable(2, a, b, 5000, 53));
    assert_eq!(n1.sent(1).len(), 1, "the related error reaches a");
    // One quoting a packet of no connection is judged as before: refused.
    n1.receive(2, &port_unreachable(2, a, b, 5001, 54));
    assert!(n1.sent(1).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 1);
    // After a policy change the connection is judged again: b no longer takes a, so its
    // error is no longer related to an allowed connection.
    n1.set_policies(&[], &[policy("b-in", "b", &["Ingress"], vec![], vec![])]);
    n1.receive(2, &port_unreachable(2, a, b, 5000, 53));
    assert!(n1.sent(1).is_empty());
    assert_eq!(n1.drops(DropReason::PolicyDeniedIngress), 2);
}

#[test]
fn an_icmp_error_about_a_service_connection_names_the_service() {
    let svc = ServiceSpec {
        name: "x/dns:dns".into(),
        vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
        port: 53,
        protocol: Protocol::Udp,
        endpoints: vec![EndpointSpec::ready(IpAddr::V4(pod_ip(1, 2)), 5353)],
        affinity: None,
        external: Default::default(),
        internal_local: false,
    };
    // a takes nothing in: the error passes as related, judged on the backend's real address.
    let mut n1 = Node::new(1, &[policy("a-in", "a", &["Ingress"], vec![], vec![])]);
    n1.set_services(std::slice::from_ref(&svc));
    let (a, b, vip) = (pod_ip(1, 1), pod_ip(1, 2), Ipv4Addr::new(10, 96, 0, 10));
    n1.receive(1, &n1.udp(1, vip, 5000, 53));
    let got = n1.sent(2);
    assert_eq!(got.len(), 1);
    assert_eq!(ports_of(&got[0]).3, 5353, "a -> VIP:53 -> b:5353");
    // b's kernel answers with port unreachable quoting a -> b:5353: a gets it about VIP:53, from
    // the VIP, every checksum right.
    n1.receive(2, &port_unreachable(2, a, b, 5000, 5353));
    let back = n1.sent(1);
    assert_eq!(back.len(), 1, "the related error reaches a");
    assert_eq!(error_of(&back[0]), (vip, vip, 53, true));
    assert_eq!(n1.worker.counters().total_drops(), 0);
}

#[test]
fn ferrys_own_too_big_about_a_service_connection_names_the_service() {
    // The backend is on node 2: a's packet, translated, is too big for the tunnel with DF set.
    let svc = ServiceSpec {
        name: "x/big:big".into(),
        vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11)),
        port: 53,
        protocol: Protocol::Udp,
        endpoints: vec![EndpointSpec::ready(IpAddr::V4(pod_ip(2, 1)), 5353)],
        affinity: None,
        external: Default::default(),
        internal_local: false,
    };
    let mut n1 = Node::new(1, &[]);
    n1.set_services(std::slice::from_ref(&svc));
    let vip = Ipv4Addr::new(10, 96, 0, 11);
    let mut big = Vec::new();
    PacketBuilder::ethernet2(pod_mac(1, 1).0, gateway_mac(1).0)
        .ipv4(pod_ip(1, 1).octets(), vip.octets(), 64)
        .udp(5000, 53)
        .write(&mut big, &[7u8; 1460])
        .expect("build");
    big[14 + 6] |= 0x40; // DF
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut big[14..34]).fill_checksum();
    n1.receive(1, &big);
    let back = n1.sent(1);
    assert_eq!(back.len(), 1, "fragmentation needed, back to a");
    let (src, quoted_dst, quoted_port, ok) = error_of(&back[0]);
    assert_eq!((quoted_dst, quoted_port, ok), (vip, 53, true), "about the service, not its backend");
    assert_eq!(src, Ipv4Addr::new(10, 244, 1, 1), "from the gateway");
}

#[test]
fn a_verdict_names_the_rules_it_looked_at() {
    let n1 = Node::new(
        1,
        &[
            policy("b-in", "b", &["Ingress"], vec![rule("a", Some(80))], vec![]),
            policy("a-out", "a", &["Egress"], vec![], vec![rule("b", None)]),
        ],
    );
    let t = n1.fib.policy();
    let (a, b) = (IpAddr::V4(pod_ip(1, 1)), IpAddr::V4(pod_ip(1, 2)));
    let pods = |by: u32| (t.rules_at(by >> 16).map(|r| r.pod.clone()), t.rules_at(by & 0xffff).map(|r| r.pod.clone()));
    let (v, by) = t.decide(a, b, 6, 80);
    assert_eq!(v, ferry_tables::policy::PolicyVerdict::Allow);
    assert_eq!(pods(by), (Some("x/a".to_owned()), Some("x/b".to_owned())), "a's egress and b's ingress");
    let (v, by) = t.decide(a, b, 6, 81);
    assert_eq!(v, ferry_tables::policy::PolicyVerdict::DenyIngress);
    assert_eq!(pods(by), (Some("x/a".to_owned()), Some("x/b".to_owned())));
    // b -> a: no egress rules for b, no ingress rules for a: nothing looked at.
    assert_eq!(t.decide(b, a, 6, 80), (ferry_tables::policy::PolicyVerdict::Allow, 0));
}
