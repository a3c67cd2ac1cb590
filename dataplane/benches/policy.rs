//! NetworkPolicy on the hot path and its compilation (criterion), at 100 namespaces, 10,000 pods
//! (100 of them on this node) and 1,000 policies (10 per namespace, each selecting one app of
//! ten, ingress from another app of the namespaces of one team, or from an `ipBlock`, on a port
//! range; every fifth also an egress policy).
//!
//! - `policy/compile_full`: every object into a fresh compiler, and the build.
//! - `policy/relabel_one_pod`: one pod's label changes, then the build (the incremental path).
//! - `policy/verdict`: the verdict for a new connection's first packet (address -> identity,
//!   the local pod's rules), 64 pod pairs cycling, ingress-isolated destinations.
//! - `policy/tracked`: the policy stage on a packet of a tracked connection: its one
//!   connection-tracking lookup (64 connections cycling, in a 2^18-slot table).
//!
//! Run: `cargo bench -p ferry-dataplane --bench policy`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use ferry_dataplane::conntrack::{Conntrack, Timeouts};
use ferry_dataplane::pipeline::Ctx;
use ferry_encap::flow;
use ferry_tables::policy::{
    IpBlockSpec, LabelSelectorSpec, Labels, NamespaceSpec, NetworkPolicySpec, PeerSpec, PodSpec, Policy,
    PolicyCompiler, PolicyTables, PolicyVerdict, PortSpec, PortValue, RuleSpec,
};

const NAMESPACES: u32 = 100;
const PODS: u32 = 10_000;
const POLICIES_PER_NS: u32 = 10;
const NODE: &str = "n0";

fn labels(kv: &[(&str, String)]) -> Labels {
    kv.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn pod_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0000 + i))
}

fn namespaces() -> Vec<NamespaceSpec> {
    (0..NAMESPACES)
        .map(|n| NamespaceSpec { name: format!("ns{n}"), labels: labels(&[("team", format!("t{}", n % 10))]) })
        .collect()
}

fn pod(i: u32, app: u32) -> PodSpec {
    let per_ns = PODS / NAMESPACES;
    PodSpec {
        namespace: format!("ns{}", i / per_ns),
        name: format!("p{i}"),
        labels: labels(&[("app", format!("a{app}")), ("pod", format!("p{i}"))]),
        ips: vec![pod_ip(i)],
        // One pod in a hundred on this node.
        node: if i.is_multiple_of(100) { NODE.into() } else { format!("n{}", 1 + i % 99) },
        ports: vec![],
    }
}

fn pods() -> Vec<PodSpec> {
    (0..PODS).map(|i| pod(i, i % 10)).collect()
}

fn selector(kv: &[(&str, String)]) -> LabelSelectorSpec {
    LabelSelectorSpec { match_labels: labels(kv), match_expressions: vec![] }
}

fn policies() -> Vec<Policy> {
    let mut out = Vec::new();
    for n in 0..NAMESPACES {
        for k in 0..POLICIES_PER_NS {
            let port = PortSpec { protocol: None, port: Some(PortValue::Number(80)), end_port: Some(90) };
            let peer = if k == 9 {
                PeerSpec {
                    ip_block: Some(IpBlockSpec {
                        cidr: "192.168.0.0/16".into(),
                        except: vec!["192.168.1.0/24".into()],
                    }),
                    ..Default::default()
                }
            } else {
                PeerSpec {
                    pod_selector: Some(selector(&[("app", format!("a{}", (k + 1) % 10))])),
                    namespace_selector: Some(selector(&[("team", format!("t{}", (n + k) % 10))])),
                    ip_block: None,
                }
            };
            let egress = k.is_multiple_of(5).then(|| RuleSpec {
                ports: vec![],
                peers: vec![PeerSpec { namespace_selector: Some(LabelSelectorSpec::default()), ..Default::default() }],
            });
            let spec = NetworkPolicySpec {
                namespace: format!("ns{n}"),
                name: format!("np{k}"),
                pod_selector: selector(&[("app", format!("a{k}"))]),
                policy_types: None,
                ingress: vec![RuleSpec { ports: vec![port], peers: vec![peer] }],
                egress: egress.into_iter().collect(),
            };
            out.push(Policy::from_spec(&spec).expect("valid"));
        }
    }
    out
}

fn compile(ns: &[NamespaceSpec], pods: &[PodSpec], policies: &[Policy]) -> (PolicyCompiler, PolicyTables) {
    let mut c = PolicyCompiler::new(NODE, vec![]);
    for n in ns {
        c.set_namespace(&n.name, Some(&n.labels));
    }
    for p in pods {
        c.set_pod(&p.key(), Some(p));
    }
    for p in policies {
        c.set_policy(&p.key(), Some(p));
    }
    let t = c.build();
    (c, t)
}

fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else { unreachable!("IPv4 fixture") };
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(s.octets(), d.octets(), 64)
        .tcp(sport, dport, 1, 64240)
        .ack(1)
        .write(&mut out, b"")
        .expect("build");
    out
}

fn bench(c: &mut Criterion) {
    let (ns, pods, policies) = (namespaces(), pods(), policies());
    let mut g = c.benchmark_group("policy");
    g.sample_size(20);
    g.bench_function("compile_full", |b| b.iter(|| compile(black_box(&ns), black_box(&pods), black_box(&policies))));
    let (mut compiler, tables) = compile(&ns, &pods, &policies);
    println!(
        "{} identities, {} local pods with rules, policy generation {}",
        compiler.identities(),
        tables.pods().len(),
        tables.generation()
    );
    // Relabel a remote pod between two apps (a new identity each time it is unique by `pod`).
    let mut flip = 0u32;
    g.bench_function("relabel_one_pod", |b| {
        b.iter(|| {
            flip ^= 1;
            let p = pod(4242, 3 + flip);
            compiler.set_pod(&p.key(), Some(&p));
            black_box(compiler.build());
        })
    });
    g.sample_size(100);

    // Pairs: local pods (100 j: app a0 of ns j, which np0 opens to app a1 of the namespaces of
    // ns j's team) as destinations; sources of app a1 in ns k, of the same team for even k (allowed)
    // or not for odd k (denied).
    let pairs: Vec<(IpAddr, IpAddr)> =
        (0..64u32).map(|k| (pod_ip(100 * k + 1 + 10 * (k % 9)), pod_ip(100 * ((k + k % 2) % 100)))).collect();
    let allowed = pairs.iter().filter(|(s, d)| tables.verdict(*s, *d, 6, 80) == PolicyVerdict::Allow).count();
    println!("verdict pairs: {allowed} of {} allowed", pairs.len());
    assert!(allowed > 0 && allowed < pairs.len(), "a mix of allowed and denied");
    g.throughput(Throughput::Elements(pairs.len() as u64));
    g.bench_function("verdict", |b| {
        b.iter(|| {
            for (s, d) in &pairs {
                black_box(tables.verdict(black_box(*s), black_box(*d), 6, 80));
            }
        })
    });

    let ct = Conntrack::new(1 << 18, Timeouts::default());
    let now = ct.now();
    let ctxs: Vec<(Ctx, Vec<u8>)> = pairs
        .iter()
        .enumerate()
        .filter(|(_, (s, d))| tables.verdict(*s, *d, 6, 80) == PolicyVerdict::Allow)
        .map(|(i, (s, d))| {
            let f = frame(*s, *d, 40000 + i as u16, 80);
            let ctx = Ctx { flow: flow::classify(&f).expect("classifies") };
            (ctx, f)
        })
        .collect();
    for (ctx, f) in &ctxs {
        ferry_dataplane::policy::check(&ct, now, &tables, ctx, f).expect("allowed");
    }
    g.throughput(Throughput::Elements(ctxs.len() as u64));
    g.bench_function("tracked", |b| {
        b.iter(|| {
            for (ctx, f) in &ctxs {
                black_box(ferry_dataplane::policy::check(&ct, now, &tables, black_box(ctx), f).is_ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
