//! Trace mode (`ferry trace`'s engine) over in-memory nodes with the real tables: the notes each
//! stage leaves, the verdicts, and agreement with the forwarding path on the same frames. Policy
//! allow and deny with the rule named, the service backend chosen (and the worker choosing the
//! same), no route, a failed source check, and the encapsulated frame decapsulated and delivered
//! at the other node, with nothing live changed by a trace. And `ferry trace --inject`'s worker side:
//! a marked packet injected into a worker and watched for at the other node, recorded as the
//! simulation says, really forwarded and counted.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, SlicedPacket};
use ferry_dataplane::pipeline::{Pipeline, PortId, PortRole};
use ferry_dataplane::port::mem::MemPort;
use ferry_dataplane::trace::{self, Note, Pick, Probe, ProbeProto, RouteNote, TraceMark, Traced};
use ferry_dataplane::worker::{MAX_WATCHES, PortCommandError, PortControl, Worker};
use ferry_encap::{DropReason, Verdict};
use ferry_tables::policy::{
    LabelSelectorSpec, Labels, NetworkPolicySpec, PeerSpec, PodSpec, Policy, PolicyCompiler, PolicyVerdict, PortSpec,
    PortValue, RuleSpec,
};
use ferry_tables::{EndpointSpec, Protocol, ServiceSpec, Tables};
use ferry_testsupport::node::{self, TestNode, UPLINK, gateway_mac, pod_ip, pod_mac};

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Pods x/a (node 1 port 1), x/b (node 1 port 2), x/c (node 2 port 1), labelled pod=a|b|c.
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

/// `name` selecting pod `pod` for ingress: from pod `peer` on TCP `port`.
fn ingress_policy(name: &str, pod: &str, peer: &str, port: i64) -> Policy {
    let sel = |p: &str| LabelSelectorSpec { match_labels: labels(&[("pod", p)]), match_expressions: vec![] };
    Policy::from_spec(&NetworkPolicySpec {
        namespace: "x".into(),
        name: name.into(),
        pod_selector: sel(pod),
        policy_types: Some(vec!["Ingress".into()]),
        ingress: vec![RuleSpec {
            ports: vec![PortSpec { protocol: None, port: Some(PortValue::Number(port)), end_port: None }],
            peers: vec![PeerSpec { pod_selector: Some(sel(peer)), ..Default::default() }],
        }],
        egress: vec![],
    })
    .expect("valid policy")
}

struct Node {
    spec: TestNode,
    worker: Worker<MemPort>,
    tables: Tables,
}

impl Node {
    fn new(n: u8, policies: &[Policy], services: &[ServiceSpec]) -> Node {
        let spec = TestNode { pods: 2, ..TestNode::new(n) };
        let (worker, _) = spec.build();
        let mut tables = spec.tables();
        let mut c = PolicyCompiler::new(format!("n{n}"), vec![IpAddr::V4(Ipv4Addr::new(10, 244, n, 0))]);
        for p in pods() {
            c.set_pod(&p.key(), Some(&p));
        }
        for p in policies {
            c.set_policy(&p.key(), Some(p));
        }
        tables.set_policy(c.build(), Instant::now());
        tables.set_services(services, Instant::now()).expect("services");
        Node { spec, worker, tables }
    }

    /// A probe from the pod on `port` of this node.
    fn probe(&self, port: u8, dst: Ipv4Addr, proto: ProbeProto, dport: u16) -> Vec<u8> {
        self.probe_with(port, |p| {
            p.dst = IpAddr::V4(dst);
            p.proto = proto;
            p.dport = dport;
        })
    }

    /// A TCP probe from the pod on `port`, changed by `f`.
    fn probe_with(&self, port: u8, f: impl FnOnce(&mut Probe)) -> Vec<u8> {
        let n = self.spec.n;
        let mut p = Probe {
            src_mac: pod_mac(n, port),
            dst_mac: gateway_mac(n),
            src: IpAddr::V4(pod_ip(n, port)),
            dst: IpAddr::V4(pod_ip(n, port)),
            proto: ProbeProto::Tcp,
            sport: 40000,
            dport: 80,
            nonce: None,
        };
        f(&mut p);
        p.frame().expect("one family")
    }

    fn trace(&self, port: u16, role: PortRole, frame: &[u8]) -> Traced {
        let mut p = Pipeline::for_trace(self.spec.config());
        p.set_time(1);
        trace::run(&mut p, &*self.tables.current(), PortId(port), role, frame).expect("traced")
    }

    /// The same frame through the worker (the forwarding path): what it sent on each port.
    fn forward(&mut self, port: usize, frame: &[u8]) -> Vec<Vec<Vec<u8>>> {
        let fib = self.tables.current();
        node::receive(&mut self.worker, &fib, port, frame);
        (0..=2).map(|p| node::sent(&mut self.worker, p)).collect()
    }
}

fn policy_note(t: &Traced) -> &ferry_tables::policy::Explanation {
    t.trace
        .notes
        .iter()
        .find_map(|n| match n {
            Note::Policy(e) => Some(e),
            _ => None,
        })
        .expect("a policy note")
}

fn dst_of(frame: &[u8]) -> (IpAddr, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
    let port = match &p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => t.destination_port(),
        Some(etherparse::TransportSlice::Udp(u)) => u.destination_port(),
        _ => 0,
    };
    (ip.header().destination().into(), port)
}

#[test]
fn policy_allow_and_deny_name_the_rule_and_agree_with_forwarding() {
    let mut n1 = Node::new(1, &[ingress_policy("b-in", "b", "a", 80)], &[]);
    let b = pod_ip(1, 2);
    let inserts = n1.worker.conntrack().inserts();

    let allowed = n1.trace(1, PortRole::Pod, &n1.probe(1, b, ProbeProto::Tcp, 80));
    assert_eq!(allowed.verdict, Verdict::Forward(PortId(2)));
    let e = policy_note(&allowed);
    assert_eq!(e.verdict, PolicyVerdict::Allow);
    let side = e.ingress.as_ref().expect("b's ingress judged");
    assert_eq!(side.pod, "x/b");
    assert!(side.allowed);
    assert_eq!(side.rules.len(), 1);
    assert_eq!((side.rules[0].policy.as_str(), side.rules[0].rule), ("x/b-in", Some(0)));
    assert!(e.egress.is_none(), "a is not isolated for egress");
    assert!(allowed.trace.notes.contains(&Note::Deliver { port: PortId(2), mac: pod_mac(1, 2) }));

    let denied = n1.trace(1, PortRole::Pod, &n1.probe(1, b, ProbeProto::Tcp, 81));
    assert_eq!(denied.verdict, Verdict::Drop(DropReason::PolicyDeniedIngress));
    let e = policy_note(&denied);
    assert_eq!(e.verdict, PolicyVerdict::DenyIngress);
    let side = e.ingress.as_ref().expect("b's ingress judged");
    assert!(!side.allowed);
    assert_eq!(side.rules[0].policy, "x/b-in");
    assert!(!denied.trace.notes.iter().any(|n| matches!(n, Note::Route(_))), "nothing after the policy stage");

    // Nothing live moved: no connection entry, no counter.
    assert_eq!(n1.worker.conntrack().inserts(), inserts);
    assert_eq!(n1.worker.counters().total_drops(), 0);

    // The forwarding path agrees on both frames.
    let sent = n1.forward(1, &n1.probe(1, b, ProbeProto::Tcp, 80));
    assert_eq!(sent[2].len(), 1, "a -> b:80 delivered");
    let sent = n1.forward(1, &n1.probe(1, b, ProbeProto::Tcp, 81));
    assert!(sent.iter().all(Vec::is_empty));
    assert_eq!(n1.worker.counters().drops(DropReason::PolicyDeniedIngress), 1);
}

#[test]
fn service_backend_chosen_is_the_one_the_worker_chooses() {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let backends: Vec<EndpointSpec> =
        [pod_ip(1, 2), pod_ip(2, 1), pod_ip(2, 2)].iter().map(|a| EndpointSpec::ready(IpAddr::V4(*a), 8080)).collect();
    let svc = ServiceSpec {
        name: "x/web:80".into(),
        vip: IpAddr::V4(vip),
        port: 80,
        protocol: Protocol::Tcp,
        endpoints: backends,
        affinity: None,
        external: Default::default(),
        internal_local: false,
    };
    let mut n1 = Node::new(1, &[], &[svc]);
    let mut chosen = std::collections::BTreeSet::new();
    for sport_base in [0u16, 1, 2, 3, 4, 5, 6, 7] {
        // Different source ports: different flow hashes, so more than one backend gets picked.
        let frame = n1.probe_with(1, |p| {
            p.dst = IpAddr::V4(vip);
            p.sport = 40000 + sport_base * 7919 % 20000;
        });
        let t = n1.trace(1, PortRole::Pod, &frame);
        let s = t
            .trace
            .notes
            .iter()
            .find_map(|n| match n {
                Note::Service(s) => Some(s.clone()),
                _ => None,
            })
            .expect("a service note");
        assert_eq!((s.service.as_str(), s.vip, s.port, s.backends), ("x/web:80", IpAddr::V4(vip), 80, 3));
        assert!(matches!(s.pick, Pick::Maglev { slots: 16_381, .. }), "{:?}", s.pick);
        let (backend, bport) = s.backend.expect("a backend");
        assert_eq!(bport, 8080);
        chosen.insert(backend);
        let sent = n1.forward(1, &frame);
        let out = if backend == IpAddr::V4(pod_ip(1, 2)) {
            assert_eq!(t.verdict, Verdict::Forward(PortId(2)));
            &sent[2]
        } else {
            assert_eq!(t.verdict, Verdict::Forward(PortId(UPLINK as u16)));
            assert!(t.trace.notes.iter().any(|n| matches!(n, Note::Encap { .. })));
            &sent[UPLINK]
        };
        assert_eq!(out.len(), 1, "the worker sent it where the trace said ({backend})");
        if backend == IpAddr::V4(pod_ip(1, 2)) {
            assert_eq!(dst_of(&out[0]), (backend, 8080), "the worker chose the traced backend");
        } else {
            // Encapsulated: the inner frame starts after outer Ethernet, IPv4, UDP and VXLAN.
            assert_eq!(dst_of(&out[0][50..]), (backend, 8080), "the worker chose the traced backend");
        }
    }
    assert!(chosen.len() >= 2, "the flows went to more than one backend: {chosen:?}");
}

#[test]
fn no_route_and_a_failed_source_check() {
    let n1 = Node::new(1, &[], &[]);
    let t = n1.trace(1, PortRole::Pod, &n1.probe(1, Ipv4Addr::new(10, 244, 99, 1), ProbeProto::Udp, 53));
    assert_eq!(t.verdict, Verdict::Drop(DropReason::NoRoute));
    assert!(t.trace.notes.contains(&Note::Route(RouteNote::NoRoute)), "{:?}", t.trace.notes);

    // Pod 1 sending with pod 2's address: the source check refuses it after classify.
    let f = n1.probe_with(1, |p| {
        p.dst = IpAddr::V4(pod_ip(2, 1));
        p.proto = ProbeProto::Icmp;
        p.src = IpAddr::V4(pod_ip(1, 2));
    });
    let t = n1.trace(1, PortRole::Pod, &f);
    assert_eq!(t.verdict, Verdict::Drop(DropReason::SpoofedSource));
    assert!(t.trace.notes.iter().any(|n| matches!(n, Note::Classified { .. })));
    assert!(!t.trace.notes.iter().any(|n| matches!(n, Note::SourceAllowed { .. })));
}

#[test]
fn the_encapsulated_frame_is_decapsulated_judged_and_delivered_at_the_other_node() {
    let c = pod_ip(2, 1);
    let n1 = Node::new(1, &[], &[]);
    let n2 = Node::new(2, &[ingress_policy("c-in", "c", "a", 80)], &[]);
    let out = n1.trace(1, PortRole::Pod, &n1.probe(1, c, ProbeProto::Tcp, 80));
    assert_eq!(out.verdict, Verdict::Forward(PortId(UPLINK as u16)));
    assert!(out.trace.notes.iter().any(|n| matches!(n, Note::Route(RouteNote::Remote { .. }))));
    let at2 = n2.trace(UPLINK as u16, PortRole::Uplink, &out.frame);
    assert_eq!(at2.verdict, Verdict::Forward(PortId(1)), "{:?}", at2.trace.notes);
    assert!(matches!(at2.trace.notes[0], Note::Decapsulated { vni: 1, .. }));
    assert!(at2.trace.notes.iter().any(|n| matches!(n, Note::SenderChecked { .. })));
    let e = policy_note(&at2);
    assert!(e.ingress.as_ref().is_some_and(|s| s.allowed && s.pod == "x/c"));

    let out = n1.trace(1, PortRole::Pod, &n1.probe(1, c, ProbeProto::Udp, 80));
    let at2 = n2.trace(UPLINK as u16, PortRole::Uplink, &out.frame);
    assert_eq!(at2.verdict, Verdict::Drop(DropReason::PolicyDeniedIngress));
    assert!(policy_note(&at2).ingress.as_ref().is_some_and(|s| !s.allowed));
}

/// Runs `node`'s worker until `f`, on another thread with the worker's command channel, returns
/// (as the agent's threads talk to a running worker).
fn with_worker<T: Send>(node: &mut Node, f: impl FnOnce(PortControl<MemPort>) -> T + Send) -> T {
    let ctl = node.worker.control();
    let fib = node.tables.current();
    std::thread::scope(|sc| {
        let h = sc.spawn(move || f(ctl));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "the worker answered its command");
            node.worker.apply_commands();
            node.worker.poll_once(&*fib);
        }
        h.join().expect("the command's thread")
    })
}

/// Arms `node`'s worker to watch for `nonce` until `until`; the record comes on the receiver.
fn watch(node: &mut Node, nonce: u32, until: Instant) -> crossbeam::channel::Receiver<Traced> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    with_worker(node, |c| c.watch(TraceMark::new(nonce), until, tx, Duration::from_secs(5))).expect("armed");
    rx
}

#[test]
fn an_injected_packet_is_forwarded_for_real_and_recorded_as_simulated_at_both_nodes() {
    let c = pod_ip(2, 1);
    let mut n1 = Node::new(1, &[], &[]);
    let mut n2 = Node::new(2, &[ingress_policy("c-in", "c", "a", 80)], &[]);
    let marked = |n1: &Node, nonce: u32, proto: ProbeProto| {
        n1.probe_with(1, |p| {
            p.dst = IpAddr::V4(c);
            p.proto = proto;
            p.sport = 41000;
            p.nonce = Some(nonce);
        })
    };

    // The source: the worker forwards the injected frame as if pod a had sent it, and records the
    // stages the simulation of the same frame shows.
    let frame = marked(&n1, 0xfeed_beef, ProbeProto::Tcp);
    let sim1 = n1.trace(1, PortRole::Pod, &frame);
    let real1 = with_worker(&mut n1, |c| c.inject(PortId(1), frame.clone(), Duration::from_secs(5))).expect("injected");
    assert_eq!(real1.verdict, Verdict::Forward(PortId(UPLINK as u16)));
    assert_eq!((real1.verdict, &real1.trace.notes), (sim1.verdict, &sim1.trace.notes));
    let sent = node::sent(&mut n1.worker, UPLINK);
    assert_eq!(sent, vec![real1.frame.clone()], "sent on the uplink as recorded");
    assert_eq!(n1.worker.counters().rx[1].packets, 1, "counted as received from pod a's port");
    assert!(TraceMark::new(0xfeed_beef).matches(&sent[0]), "the mark ends the tunnel frame");

    // The destination: a watching worker records the marked packet only, as the simulation of its
    // half does, and delivers both.
    let rx = watch(&mut n2, 0xfeed_beef, Instant::now() + Duration::from_secs(30));
    let fib2 = n2.tables.current();
    let unmarked = n1.trace(1, PortRole::Pod, &n1.probe(1, c, ProbeProto::Tcp, 80)).frame;
    node::receive(&mut n2.worker, &fib2, UPLINK, &unmarked);
    assert!(rx.try_recv().is_err(), "no record of an unmarked packet");
    node::receive(&mut n2.worker, &fib2, UPLINK, &sent[0]);
    let real2 = rx.try_recv().expect("the marked packet's record");
    let sim2 = n2.trace(UPLINK as u16, PortRole::Uplink, &sim1.frame);
    assert_eq!(real2.verdict, Verdict::Forward(PortId(1)));
    assert_eq!((real2.verdict, &real2.trace.notes), (sim2.verdict, &sim2.trace.notes));
    assert_eq!(node::sent(&mut n2.worker, 1).len(), 2, "both delivered to pod c");

    // Denied at the destination's ingress (UDP): recorded as the simulation says, and counted.
    let frame = marked(&n1, 7, ProbeProto::Udp);
    let sim1 = n1.trace(1, PortRole::Pod, &frame);
    let rx = watch(&mut n2, 7, Instant::now() + Duration::from_secs(30));
    let real1 = with_worker(&mut n1, |c| c.inject(PortId(1), frame.clone(), Duration::from_secs(5))).expect("injected");
    assert_eq!((real1.verdict, &real1.trace.notes), (sim1.verdict, &sim1.trace.notes));
    let sent = node::sent(&mut n1.worker, UPLINK);
    assert_eq!(sent.len(), 1);
    node::receive(&mut n2.worker, &fib2, UPLINK, &sent[0]);
    let real2 = rx.try_recv().expect("the marked packet's record");
    let sim2 = n2.trace(UPLINK as u16, PortRole::Uplink, &sim1.frame);
    assert_eq!(real2.verdict, Verdict::Drop(DropReason::PolicyDeniedIngress));
    assert_eq!(&real2.trace.notes, &sim2.trace.notes);
    assert_eq!(n2.worker.counters().drops(DropReason::PolicyDeniedIngress), 1);
    assert!(node::sent(&mut n2.worker, 1).is_empty());

    // A watch past its deadline records nothing.
    let frame = marked(&n1, 8, ProbeProto::Tcp);
    let rx = watch(&mut n2, 8, Instant::now());
    with_worker(&mut n1, |c| c.inject(PortId(1), frame, Duration::from_secs(5))).expect("injected");
    let sent = node::sent(&mut n1.worker, UPLINK);
    node::receive(&mut n2.worker, &fib2, UPLINK, &sent[0]);
    assert!(rx.try_recv().is_err(), "an expired watch records nothing");
    assert_eq!(node::sent(&mut n2.worker, 1).len(), 1, "delivered all the same");
}

#[test]
fn an_injection_or_a_watch_the_worker_cannot_take_is_refused() {
    let mut n1 = Node::new(1, &[], &[]);
    let frame = n1.probe(1, pod_ip(1, 2), ProbeProto::Tcp, 80);
    let r = with_worker(&mut n1, |c| c.inject(PortId(9), frame, Duration::from_secs(5)));
    assert_eq!(r, Err(PortCommandError::NoSuchPort { id: 9 }));
    let r = with_worker(&mut n1, |c| c.inject(PortId(1), vec![0u8; 4000], Duration::from_secs(5)));
    assert_eq!(r, Err(PortCommandError::FrameTooLong { len: 4000, size: 2048 }));
    // Nothing moved.
    assert_eq!(n1.worker.counters().rx[1].packets, 0);
    let until = Instant::now() + Duration::from_secs(60);
    for nonce in 0..MAX_WATCHES as u32 {
        drop(watch(&mut n1, nonce, until));
    }
    let (tx, _rx) = crossbeam::channel::bounded(1);
    let r = with_worker(&mut n1, |c| c.watch(TraceMark::new(99), until, tx, Duration::from_secs(5)));
    assert_eq!(r, Err(PortCommandError::TooManyWatches { max: MAX_WATCHES }));
}
