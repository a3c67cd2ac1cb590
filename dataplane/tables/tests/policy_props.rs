//! The policy compiler against a reference evaluator written straight from the API's semantics
//! (no identities, no tables, no caching: every selector evaluated for every packet), over random
//! small worlds of namespaces, pods and policies; then the same after random changes applied
//! incrementally, against the reference of the changed world.

use std::net::{IpAddr, Ipv4Addr};

use ferry_tables::policy::{
    IpBlockSpec, LabelSelectorSpec, Labels, NAMESPACE_NAME_LABEL, NamedPort, NamespaceSpec, Namespaces,
    NetworkPolicySpec, Peer, PeerSpec, PodSpec, Policy, PolicyCompiler, PolicyProtocol, PolicyVerdict, PortMatch,
    PortSpec, PortValue, RequirementSpec, Rule, RuleSpec,
};
use proptest::prelude::*;

const NODE: &str = "n1";
const EXTERNAL: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(10, 0, 0, 200)];
const PROBES: [(u8, u16); 6] = [(6, 80), (6, 81), (17, 53), (17, 80), (132, 7), (1, 0)];

#[derive(Debug, Clone)]
struct World {
    namespaces: Vec<NamespaceSpec>,
    pods: Vec<PodSpec>,
    policies: Vec<NetworkPolicySpec>,
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn ns_strategy() -> impl Strategy<Value = Vec<NamespaceSpec>> {
    prop::collection::vec(prop::option::of(prop_oneof![Just("a"), Just("b")]), 3).prop_map(|teams| {
        ["x", "y", "z"]
            .iter()
            .zip(teams)
            .map(|(n, t)| NamespaceSpec {
                name: (*n).to_owned(),
                labels: t.map(|t| labels(&[("team", t)])).unwrap_or_default(),
            })
            .collect()
    })
}

fn pod_labels() -> impl Strategy<Value = Labels> {
    (prop_oneof![Just("a"), Just("b"), Just("c")], prop::option::of(prop_oneof![Just("web"), Just("db")])).prop_map(
        |(p, app)| {
            let mut l = labels(&[("pod", p)]);
            if let Some(a) = app {
                l.insert("app".into(), a.into());
            }
            l
        },
    )
}

fn pod_ports() -> impl Strategy<Value = Vec<NamedPort>> {
    let all = vec![
        NamedPort { name: "http".into(), protocol: PolicyProtocol::Tcp, port: 80 },
        NamedPort { name: "http".into(), protocol: PolicyProtocol::Tcp, port: 81 },
        NamedPort { name: "dns".into(), protocol: PolicyProtocol::Udp, port: 53 },
    ];
    prop::sample::subsequence(all, 0..=2)
}

fn pods_strategy() -> impl Strategy<Value = Vec<PodSpec>> {
    prop::collection::vec((0..3usize, pod_labels(), pod_ports(), prop::bool::weighted(0.7)), 2..7).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ns, labels, ports, local))| PodSpec {
                namespace: ["x", "y", "z"][ns].to_owned(),
                name: format!("p{i}"),
                labels,
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1))],
                node: if local { NODE.into() } else { "n2".into() },
                ports,
            })
            .collect()
    })
}

fn selector() -> impl Strategy<Value = LabelSelectorSpec> {
    prop_oneof![
        Just(LabelSelectorSpec::default()),
        prop_oneof![Just("a"), Just("b"), Just("c")]
            .prop_map(|p| LabelSelectorSpec { match_labels: labels(&[("pod", p)]), match_expressions: vec![] }),
        (prop_oneof![Just("In"), Just("NotIn")], prop::sample::subsequence(vec!["a", "b", "c"], 1..=2)).prop_map(
            |(op, vals)| LabelSelectorSpec {
                match_labels: Labels::new(),
                match_expressions: vec![RequirementSpec {
                    key: "pod".into(),
                    operator: op.into(),
                    values: vals.into_iter().map(str::to_owned).collect(),
                }],
            }
        ),
        (prop_oneof![Just("Exists"), Just("DoesNotExist")]).prop_map(|op| LabelSelectorSpec {
            match_labels: Labels::new(),
            match_expressions: vec![RequirementSpec { key: "app".into(), operator: op.into(), values: vec![] }],
        }),
    ]
}

fn ns_selector() -> impl Strategy<Value = LabelSelectorSpec> {
    prop_oneof![
        Just(LabelSelectorSpec::default()),
        prop_oneof![Just("a"), Just("b")]
            .prop_map(|t| LabelSelectorSpec { match_labels: labels(&[("team", t)]), match_expressions: vec![] }),
        prop_oneof![Just("x"), Just("y")].prop_map(|n| LabelSelectorSpec {
            match_labels: labels(&[(NAMESPACE_NAME_LABEL, n)]),
            match_expressions: vec![]
        }),
    ]
}

fn peer() -> impl Strategy<Value = PeerSpec> {
    prop_oneof![
        selector().prop_map(|s| PeerSpec { pod_selector: Some(s), ..Default::default() }),
        ns_selector().prop_map(|s| PeerSpec { namespace_selector: Some(s), ..Default::default() }),
        (selector(), ns_selector()).prop_map(|(p, n)| PeerSpec {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ip_block: None
        }),
        prop_oneof![
            Just(("10.0.0.0/29", vec![])),
            Just(("10.0.0.0/24", vec!["10.0.0.4/30".to_owned()])),
            Just(("192.0.2.0/24", vec![])),
        ]
        .prop_map(|(c, e)| PeerSpec {
            ip_block: Some(IpBlockSpec { cidr: c.into(), except: e }),
            ..Default::default()
        }),
    ]
}

fn port() -> impl Strategy<Value = PortSpec> {
    let p = |proto: Option<&str>, port: Option<PortValue>, end: Option<i64>| PortSpec {
        protocol: proto.map(str::to_owned),
        port,
        end_port: end,
    };
    prop_oneof![
        Just(p(None, Some(PortValue::Number(80)), None)),
        Just(p(Some("TCP"), Some(PortValue::Number(80)), Some(81))),
        Just(p(Some("UDP"), Some(PortValue::Number(53)), None)),
        Just(p(Some("UDP"), None, None)),
        Just(p(None, Some(PortValue::Name("http".into())), None)),
        Just(p(Some("UDP"), Some(PortValue::Name("dns".into())), None)),
        Just(p(Some("SCTP"), None, None)),
    ]
}

fn rule() -> impl Strategy<Value = RuleSpec> {
    (prop::collection::vec(port(), 0..3), prop::collection::vec(peer(), 0..3))
        .prop_map(|(ports, peers)| RuleSpec { ports, peers })
}

fn policies_strategy() -> impl Strategy<Value = Vec<NetworkPolicySpec>> {
    let types = prop_oneof![
        Just(None),
        Just(Some(vec!["Ingress".to_owned()])),
        Just(Some(vec!["Egress".to_owned()])),
        Just(Some(vec!["Ingress".to_owned(), "Egress".to_owned()])),
    ];
    prop::collection::vec(
        (0..3usize, selector(), types, prop::collection::vec(rule(), 0..3), prop::collection::vec(rule(), 0..3)),
        0..5,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ns, pod_selector, policy_types, ingress, egress))| NetworkPolicySpec {
                namespace: ["x", "y", "z"][ns].to_owned(),
                name: format!("np{i}"),
                pod_selector,
                policy_types,
                ingress,
                egress,
            })
            .collect()
    })
}

fn world() -> impl Strategy<Value = World> {
    (ns_strategy(), pods_strategy(), policies_strategy()).prop_map(|(namespaces, pods, policies)| World {
        namespaces,
        pods,
        policies,
    })
}

// ---- The reference: the API's words, evaluated directly. ----

fn ns_labels(w: &World, ns: &str) -> Labels {
    let mut l = w.namespaces.iter().find(|n| n.name == ns).map(|n| n.labels.clone()).unwrap_or_default();
    l.insert(NAMESPACE_NAME_LABEL.into(), ns.into());
    l
}

fn pod_at(w: &World, a: IpAddr) -> Option<&PodSpec> {
    w.pods.iter().find(|p| p.ips.contains(&a))
}

/// Whether `rule` of a policy in `policy_ns` matches traffic with `peer`, to a destination whose
/// named ports are those of `dst`.
fn rule_matches(
    w: &World,
    policy_ns: &str,
    rule: &Rule,
    peer: IpAddr,
    dst: Option<&PodSpec>,
    proto: u8,
    port: u16,
) -> bool {
    let peer_ok = rule.peers.is_empty()
        || rule.peers.iter().any(|p| match p {
            Peer::IpBlock { .. } => p.block_contains(peer),
            Peer::Pods { namespaces, pods } => pod_at(w, peer).is_some_and(|pp| {
                let ns_ok = match namespaces {
                    Namespaces::Own => pp.namespace == policy_ns,
                    Namespaces::Matching(s) => s.matches(&ns_labels(w, &pp.namespace)),
                };
                ns_ok && pods.matches(&pp.labels)
            }),
        });
    let port_ok = rule.ports.is_empty()
        || rule.ports.iter().any(|p| {
            p.protocol.number() == proto
                && match &p.port {
                    PortMatch::Any => true,
                    PortMatch::Range(a, b) => *a <= port && port <= *b,
                    PortMatch::Named(n) => dst.is_some_and(|d| {
                        d.ports.iter().any(|np| np.name == *n && np.protocol == p.protocol && np.port == port)
                    }),
                }
        });
    peer_ok && port_ok
}

/// Whether `pod`'s policies for a direction allow traffic with `peer` (None: not isolated).
fn isolated_allows(
    w: &World,
    pod: &PodSpec,
    egress: bool,
    peer: IpAddr,
    dst: Option<&PodSpec>,
    proto: u8,
    port: u16,
) -> Option<bool> {
    let policies: Vec<Policy> = w
        .policies
        .iter()
        .filter_map(|s| Policy::from_spec(s).ok())
        .filter(|p| p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels))
        .collect();
    let rules: Vec<(&str, &Vec<Rule>)> = policies
        .iter()
        .filter_map(|p| if egress { p.egress.as_ref() } else { p.ingress.as_ref() }.map(|r| (p.namespace.as_str(), r)))
        .collect();
    if rules.is_empty() {
        return None;
    }
    Some(rules.iter().any(|(ns, rs)| rs.iter().any(|r| rule_matches(w, ns, r, peer, dst, proto, port))))
}

fn reference(w: &World, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> PolicyVerdict {
    if src == dst {
        return PolicyVerdict::Allow;
    }
    let (sp, dp) = (pod_at(w, src), pod_at(w, dst));
    if let Some(s) = sp.filter(|p| p.node == NODE)
        && isolated_allows(w, s, true, dst, dp, proto, port) == Some(false)
    {
        return PolicyVerdict::DenyEgress;
    }
    if let Some(d) = dp.filter(|p| p.node == NODE)
        && isolated_allows(w, d, false, src, dp, proto, port) == Some(false)
    {
        return PolicyVerdict::DenyIngress;
    }
    PolicyVerdict::Allow
}

fn compile(w: &World) -> PolicyCompiler {
    let mut c = PolicyCompiler::new(NODE, vec![]);
    for n in &w.namespaces {
        c.set_namespace(&n.name, Some(&n.labels));
    }
    for p in &w.pods {
        c.set_pod(&p.key(), Some(p));
    }
    for s in &w.policies {
        if let Ok(p) = Policy::from_spec(s) {
            c.set_policy(&p.key(), Some(&p));
        }
    }
    c
}

fn addresses(w: &World) -> Vec<IpAddr> {
    w.pods.iter().flat_map(|p| p.ips.iter().copied()).chain(EXTERNAL.iter().map(|a| IpAddr::V4(*a))).collect()
}

fn check(w: &World, c: &mut PolicyCompiler) -> Result<(), TestCaseError> {
    let t = c.build();
    let addrs = addresses(w);
    for &s in &addrs {
        for &d in &addrs {
            for &(proto, port) in &PROBES {
                let want = reference(w, s, d, proto, port);
                let got = t.verdict(s, d, proto, port);
                prop_assert_eq!(got, want, "{} -> {} proto {} port {}", s, d, proto, port);
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Change {
    Relabel(usize, Labels),
    Ports(usize, Vec<NamedPort>),
    Readdress(usize, u8),
    DeletePod(usize),
    DeletePolicy(usize),
    NamespaceTeam(usize, Option<&'static str>),
    Move(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0..8usize, pod_labels()).prop_map(|(i, l)| Change::Relabel(i, l)),
        (0..8usize, pod_ports()).prop_map(|(i, p)| Change::Ports(i, p)),
        (0..8usize, 20..30u8).prop_map(|(i, a)| Change::Readdress(i, a)),
        (0..8usize).prop_map(Change::DeletePod),
        (0..6usize).prop_map(Change::DeletePolicy),
        (0..3usize, prop::option::of(prop_oneof![Just("a"), Just("b")])).prop_map(|(i, t)| Change::NamespaceTeam(i, t)),
        (0..8usize).prop_map(Change::Move),
    ]
}

fn apply(w: &mut World, c: &mut PolicyCompiler, ch: &Change) {
    let pod = |w: &World, i: usize| (!w.pods.is_empty()).then(|| i % w.pods.len());
    match ch {
        Change::Relabel(i, l) => {
            if let Some(i) = pod(w, *i) {
                w.pods[i].labels = l.clone();
                c.set_pod(&w.pods[i].key(), Some(&w.pods[i]));
            }
        }
        Change::Ports(i, p) => {
            if let Some(i) = pod(w, *i) {
                w.pods[i].ports = p.clone();
                c.set_pod(&w.pods[i].key(), Some(&w.pods[i]));
            }
        }
        Change::Readdress(i, a) => {
            if let Some(i) = pod(w, *i) {
                let taken = w.pods.iter().any(|p| p.ips.contains(&IpAddr::V4(Ipv4Addr::new(10, 0, 0, *a))));
                if !taken {
                    w.pods[i].ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, *a))];
                    c.set_pod(&w.pods[i].key(), Some(&w.pods[i]));
                }
            }
        }
        Change::DeletePod(i) => {
            if let Some(i) = pod(w, *i) {
                let p = w.pods.remove(i);
                c.set_pod(&p.key(), None);
            }
        }
        Change::DeletePolicy(i) => {
            if !w.policies.is_empty() {
                let p = w.policies.remove(i % w.policies.len());
                c.set_policy(&p.key(), None);
            }
        }
        Change::NamespaceTeam(i, t) => {
            let n = &mut w.namespaces[*i];
            n.labels = t.map(|t| labels(&[("team", t)])).unwrap_or_default();
            c.set_namespace(&n.name.clone(), Some(&n.labels.clone()));
        }
        Change::Move(i) => {
            if let Some(i) = pod(w, *i) {
                w.pods[i].node = if w.pods[i].node == NODE { "n2".into() } else { NODE.into() };
                c.set_pod(&w.pods[i].key(), Some(&w.pods[i]));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn compiled_verdicts_match_the_reference(w in world()) {
        let mut c = compile(&w);
        check(&w, &mut c)?;
    }

    #[test]
    fn incremental_changes_match_the_reference(w in world(), changes in prop::collection::vec(change(), 1..6)) {
        let mut w = w;
        let mut c = compile(&w);
        c.build();
        for ch in &changes {
            apply(&mut w, &mut c, ch);
            check(&w, &mut c)?;
        }
    }
}

#[test]
fn the_api_examples() {
    // Default deny ingress in x; allow pod=b of any namespace labelled team=a on TCP 80.
    let ns = |n: &str, t: &str| NamespaceSpec { name: n.into(), labels: labels(&[("team", t)]) };
    let pod = |ns: &str, name: &str, i: u8| PodSpec {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("pod", name)]),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))],
        node: NODE.into(),
        ports: vec![NamedPort { name: "serve-80".into(), protocol: PolicyProtocol::Tcp, port: 80 }],
    };
    let mut c = PolicyCompiler::new(NODE, vec!["10.0.0.254".parse().expect("ip")]);
    c.set_namespace("x", Some(&ns("x", "a").labels));
    c.set_namespace("y", Some(&ns("y", "b").labels));
    for (n, name, i) in [("x", "a", 1), ("x", "b", 2), ("y", "b", 3)] {
        c.set_pod(&format!("{n}/{name}"), Some(&pod(n, name, i)));
    }
    let spec = NetworkPolicySpec {
        namespace: "x".into(),
        name: "allow-b".into(),
        pod_selector: LabelSelectorSpec { match_labels: labels(&[("pod", "a")]), match_expressions: vec![] },
        policy_types: None,
        ingress: vec![RuleSpec {
            ports: vec![PortSpec { protocol: None, port: Some(PortValue::Name("serve-80".into())), end_port: None }],
            peers: vec![PeerSpec {
                pod_selector: Some(LabelSelectorSpec {
                    match_labels: labels(&[("pod", "b")]),
                    match_expressions: vec![],
                }),
                namespace_selector: Some(LabelSelectorSpec {
                    match_labels: labels(&[("team", "a")]),
                    match_expressions: vec![],
                }),
                ip_block: None,
            }],
        }],
        egress: vec![],
    };
    let p = Policy::from_spec(&spec).expect("valid");
    c.set_policy(&p.key(), Some(&p));
    let t = c.build();
    let ip = |i: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i));
    assert_eq!(t.verdict(ip(2), ip(1), 6, 80), PolicyVerdict::Allow, "x/b is pod=b in a team=a namespace");
    assert_eq!(t.verdict(ip(2), ip(1), 6, 81), PolicyVerdict::DenyIngress, "only the named port");
    assert_eq!(t.verdict(ip(3), ip(1), 6, 80), PolicyVerdict::DenyIngress, "y is team=b");
    assert_eq!(t.verdict(ip(1), ip(1), 6, 81), PolicyVerdict::Allow, "a pod reaches itself");
    assert_eq!(t.verdict("10.0.0.254".parse().expect("ip"), ip(1), 6, 81), PolicyVerdict::Allow, "its node");
    assert_eq!(t.verdict(ip(1), ip(3), 6, 81), PolicyVerdict::Allow, "no egress policy");
    let rules = t.local(ip(1)).expect("x/a has rules");
    assert_eq!(rules.origins.len(), 1);
    assert_eq!(rules.origins[0].policy, "x/allow-b");
    assert_eq!(rules.origins[0].ports, "TCP/serve-80");
    // y relabelled team=a: x... y/b now allowed, without recompiling x/a from scratch.
    c.set_namespace("y", Some(&labels(&[("team", "a")])));
    let t = c.build();
    assert_eq!(t.verdict(ip(3), ip(1), 6, 80), PolicyVerdict::Allow);
    // A new pod y/c: a new identity, patched in.
    let mut yc = pod("y", "c", 4);
    c.set_pod("y/c", Some(&yc));
    assert_eq!(c.build().verdict(ip(4), ip(1), 6, 80), PolicyVerdict::DenyIngress);
    yc.labels = labels(&[("pod", "b")]);
    c.set_pod("y/c", Some(&yc));
    assert_eq!(c.build().verdict(ip(4), ip(1), 6, 80), PolicyVerdict::Allow, "relabelled pod=b");
}
