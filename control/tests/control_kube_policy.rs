//! The Kubernetes source's NetworkPolicy objects against a real kube-apiserver (Debian's 1.20):
//! Namespaces, Pods (labels, node, named ports, status.podIPs patched as kubelet does) and
//! NetworkPolicies are listed, then watched through changes and deletions, and reach the
//! control plane's policy store as the API has them. Then the time from a NetworkPolicy or a Pod
//! label write to the data plane's published policy tables, with many pods and policies loaded
//! (`FERRY_KUBE_POLICY_PODS`, default 300, 100 per namespace and 10 policies per namespace; the
//! issue's figure is at 10,000 pods and 1,000 policies).

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Etcd, KubeApiserver};
use ferry_control::model::ObjectKind;
use ferry_control::policy::PolicyStore;
use ferry_control::{ControlConfig, ControlPlane, KubeConfig, Publish, RouteTable};
use ferry_tables::policy::{PodSpec, PolicyVerdict};
use ferry_tables::{Reader, Snapshot};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// What the store holds, per kind and key, as last handed to the publisher.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Namespace(BTreeMap<String, String>),
    Pod(PodSpec),
    Policy(String),
}

type Record = Arc<Mutex<BTreeMap<(ObjectKind, String), Seen>>>;

struct Recorder(Record);

impl Publish for Recorder {
    fn publish(&mut self, _table: &RouteTable<'_>) {}

    fn objects(&mut self, store: &PolicyStore, changed: &[(ObjectKind, String)]) {
        let mut r = self.0.lock().expect("record");
        for (kind, key) in changed {
            let seen = match kind {
                ObjectKind::Namespace => store.namespace(key).map(|n| Seen::Namespace(n.labels.clone())),
                ObjectKind::Pod => store.pod(key).cloned().map(Seen::Pod),
                ObjectKind::NetworkPolicy => store.policy(key).map(|p| Seen::Policy(format!("{p:?}"))),
            };
            match seen {
                Some(s) => r.insert((*kind, key.clone()), s),
                None => r.remove(&(*kind, key.clone())),
            };
        }
    }
}

async fn wait_seen(record: &Record, what: &str, pred: impl Fn(&BTreeMap<(ObjectKind, String), Seen>) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if pred(&record.lock().expect("record")) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {:#?}", record.lock().expect("record"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pod_of<'a>(m: &'a BTreeMap<(ObjectKind, String), Seen>, key: &str) -> Option<&'a PodSpec> {
    match m.get(&(ObjectKind::Pod, key.to_owned())) {
        Some(Seen::Pod(p)) => Some(p),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_namespaces_pods_and_network_policies() {
    common::init_tracing();
    let test = "kube_namespaces_pods_and_network_policies";
    let Some(etcd_bin) = common::etcd_binary(test) else { return };
    let Some(kube_bin) = common::kube_apiserver_binary(test) else { return };
    let etcd = Etcd::start(&etcd_bin);
    let k = KubeApiserver::start(&kube_bin, &etcd).await;
    let client = k.client().await;
    let pp = PostParams::default();

    // A namespace as a 1.21+ server labels it (1.20 does not add kubernetes.io/metadata.name), and
    // its default service account (a 1.20 server refuses pods without it; the controller manager
    // that would create it does not run here).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = |name: &str, team: &str| -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {"kubernetes.io/metadata.name": name, "team": team}}}))
        .expect("namespace")
    };
    namespaces.create(&pp, &ns("x", "a")).await.expect("namespace x");
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), "x");
    sa.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa")).await.expect("sa");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "x");
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"pod": name}},
            "spec": {"nodeName": "n1", "automountServiceAccountToken": false, "containers": [{
                "name": "c", "image": "none",
                "ports": [{"name": "serve-80-tcp", "containerPort": 80}, {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]
            }]}
        }))
        .expect("pod")
    };
    pods.create(&pp, &pod("a")).await.expect("pod a");
    // kubelet's part: the pod's addresses in its status.
    let status = |ip: &str| Patch::Merge(json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}));
    pods.patch_status("a", &PatchParams::default(), &status("10.244.1.5")).await.expect("status");
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), "x");
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "allow-a"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                              "ports": [{"port": "serve-80-tcp"}, {"protocol": "TCP", "port": 8000, "endPort": 8010}]}]}
    }))
    .expect("policy");
    let created = policies.create(&pp, &policy).await.expect("policy");
    // The 1.20 server drops endPort silently (the note; the fixture tests endPort).
    let kept = created.spec.and_then(|s| s.ingress).and_then(|i| i[0].ports.clone()).expect("ports");
    assert_eq!(kept[1].end_port, None, "a 1.20 server drops endPort");

    let record: Record = Arc::default();
    let mut cfg = ControlConfig::new("n1");
    cfg.kube = Some(KubeConfig { auth: k.auth(), announce: false });
    let cp = ControlPlane::spawn(cfg, Recorder(Arc::clone(&record))).expect("starts");

    // The lists.
    wait_seen(&record, "the listed objects", |m| {
        m.contains_key(&(ObjectKind::Namespace, "x".into()))
            && pod_of(m, "x/a").is_some_and(|p| !p.ips.is_empty())
            && m.contains_key(&(ObjectKind::NetworkPolicy, "x/allow-a".into()))
    })
    .await;
    {
        let m = record.lock().expect("record");
        let Some(Seen::Namespace(labels)) = m.get(&(ObjectKind::Namespace, "x".into())) else { panic!("x") };
        assert_eq!(labels.get("team").map(String::as_str), Some("a"));
        let a = pod_of(&m, "x/a").expect("a");
        assert_eq!(
            (a.node.as_str(), a.ips[0].to_string().as_str(), a.labels["pod"].as_str()),
            ("n1", "10.244.1.5", "a")
        );
        let ports: Vec<_> = a.ports.iter().map(|p| (p.name.as_str(), p.port, p.protocol.name())).collect();
        assert_eq!(ports, [("serve-80-tcp", 80, "TCP"), ("serve-81-udp", 81, "UDP")]);
    }

    // Watched: a label change, an address change, a new pod, a namespace relabelled.
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"pod": "a", "tier": "db"}}})),
    )
    .await
    .expect("label");
    wait_seen(&record, "a's new label", |m| pod_of(m, "x/a").is_some_and(|p| p.labels.contains_key("tier"))).await;
    pods.patch_status("a", &PatchParams::default(), &status("10.244.1.6")).await.expect("status");
    wait_seen(&record, "a's new address", |m| {
        pod_of(m, "x/a").is_some_and(|p| p.ips.iter().map(ToString::to_string).eq(["10.244.1.6".to_owned()]))
    })
    .await;
    pods.create(&pp, &pod("b")).await.expect("pod b");
    wait_seen(&record, "pod b, without an address yet", |m| pod_of(m, "x/b").is_some_and(|p| p.ips.is_empty())).await;
    namespaces
        .patch("x", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "b"}}})))
        .await
        .expect("ns");
    wait_seen(&record, "x relabelled", |m| {
        matches!(m.get(&(ObjectKind::Namespace, "x".into())), Some(Seen::Namespace(l)) if l.get("team").map(String::as_str) == Some("b"))
    })
    .await;

    // Deleted.
    let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    pods.delete("a", &now).await.expect("delete a");
    policies.delete("allow-a", &DeleteParams::default()).await.expect("delete policy");
    wait_seen(&record, "a and the policy gone", |m| {
        pod_of(m, "x/a").is_none()
            && !m.contains_key(&(ObjectKind::NetworkPolicy, "x/allow-a".into()))
            && pod_of(m, "x/b").is_some()
    })
    .await;
    drop(cp);

    change_latency(&k).await;
}

/// Pod `i`'s address: 10.244.0.0 + i.
fn load_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0000 + i as u32))
}

/// Namespace `n` of the loaded world: `ln<n>`, labelled `team=t<n % 10>`.
fn load_ns(n: usize) -> String {
    format!("ln{n}")
}

/// Policy `np<k>` of namespace `n` (as in `dataplane/benches/policy.rs`): selects `app=a<k>`,
/// ingress from `app=a<k+1>` of the namespaces of team `t<(n + k) % 10>` on `ports`.
fn load_policy(n: usize, k: usize, ports: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": format!("np{k}")},
        "spec": {"podSelector": {"matchLabels": {"app": format!("a{k}")}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (k + 1) % 10)}},
                                        "namespaceSelector": {"matchLabels": {"team": format!("t{}", (n + k) % 10)}}}],
                              "ports": ports}]}
    }))
    .expect("policy")
}

/// Loads N pods (100 per namespace, `app=a<i % 10>`, `pod=p<i>`, one in a hundred on this node
/// `n1`) and 10 policies per namespace; then times 100 policy changes and 100 pod label changes,
/// one after another, each from before the API call until a worker's reader of the data plane's
/// tables gives the verdict the change makes.
async fn change_latency(k: &KubeApiserver) {
    const PER_NS: usize = 100;
    const LOCAL: &str = "n1";
    let n: usize = std::env::var("FERRY_KUBE_POLICY_PODS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let nns = n.div_ceil(PER_NS);
    let client = k.client().await;
    let pp = PostParams::default();
    let t = Instant::now();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for j in 0..nns {
        let name = load_ns(j);
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {"kubernetes.io/metadata.name": name, "team": format!("t{}", j % 10)}}}))
        .expect("namespace");
        namespaces.create(&pp, &ns).await.expect("namespace");
        let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        sa.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa"))
            .await
            .expect("sa");
    }
    futures_util::stream::iter(0..n)
        .map(|i| {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &load_ns(i / PER_NS));
            async move {
                let node = if i % 100 == 0 { LOCAL.to_owned() } else { format!("n{}", 2 + i % 99) };
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("p{i}"), "labels": {"app": format!("a{}", i % 10), "pod": format!("p{i}")}},
                    "spec": {"nodeName": node, "automountServiceAccountToken": false,
                             "containers": [{"name": "c", "image": "none"}]}
                }))
                .expect("pod");
                pods.create(&PostParams::default(), &pod).await?;
                let ip = load_ip(i).to_string();
                let status = Patch::Merge(json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}));
                pods.patch_status(&format!("p{i}"), &PatchParams::default(), &status).await?;
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("create the pods");
    futures_util::stream::iter((0..nns).flat_map(|j| (0..10).map(move |q| (j, q))))
        .map(|(j, q)| {
            let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &load_ns(j));
            async move {
                policies
                    .create(&PostParams::default(), &load_policy(j, q, json!([{"port": 80, "protocol": "TCP"}])))
                    .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("create the policies");
    eprintln!("{n} pods in {nns} namespaces and {} policies created in {:?}", nns * 10, t.elapsed());

    let mut cfg = ControlConfig::new(LOCAL);
    cfg.kube = Some(KubeConfig { auth: k.auth(), announce: false });
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher.for_node(LOCAL, vec![])).expect("starts");
    let started = Instant::now();
    // Loaded: every pod has its identity, each namespace's local pod its rules.
    common::wait_for(&mut reader, Duration::from_secs(600), "every pod and policy", |s| {
        let p = s.policy();
        p.pods().iter().filter(|r| r.pod.starts_with("ln")).count() == nns
            && (0..n).all(|i| p.identity(load_ip(i)).is_some())
    })
    .await;
    eprintln!("listed and compiled {:?} after the control plane started", started.elapsed());

    // Each namespace's local pod p<100 j> (app a0) admits app a1 of its own namespace (same team)
    // on np0's port: 80 at first, then each policy change's.
    let mut port_of: Vec<u16> = vec![80; nns];
    let mut relabelled: BTreeMap<usize, bool> = BTreeMap::new();
    let (mut policy_lat, mut label_lat) = (Vec::new(), Vec::new());
    for c in 0..200usize {
        let j = (c / 2) % nns;
        let dst = load_ip(PER_NS * j);
        let (src, proto_port, want, started) = if c % 2 == 0 {
            // np0 of ln<j> moves to a new port: its local pod now admits a1 there.
            let port = 2000 + c as u16;
            let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &load_ns(j));
            let body =
                serde_json::to_value(load_policy(j, 0, json!([{"port": port, "protocol": "TCP"}])).spec).expect("spec");
            let started = Instant::now();
            // A merge patch replaces the ingress list whole.
            policies.patch("np0", &PatchParams::default(), &Patch::Merge(json!({"spec": body}))).await.expect("np0");
            port_of[j] = port;
            (load_ip(PER_NS * j + 1), port, PolicyVerdict::Allow, started)
        } else {
            // A pod of app a5 turns a1 (now admitted), or back (refused).
            let q = PER_NS * j + 10 * (1 + (c / 2 / nns) % 9) + 5;
            let now_a1 = !relabelled.get(&q).copied().unwrap_or(false);
            relabelled.insert(q, now_a1);
            let pods: Api<Pod> = Api::namespaced(client.clone(), &load_ns(j));
            let app = if now_a1 { "a1" } else { "a5" };
            let started = Instant::now();
            pods.patch(
                &format!("p{q}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"app": app}}})),
            )
            .await
            .expect("relabel");
            let want = if now_a1 { PolicyVerdict::Allow } else { PolicyVerdict::DenyIngress };
            (load_ip(q), port_of[j], want, started)
        };
        wait_verdict(&mut reader, src, dst, proto_port, want, c).await;
        let lat = started.elapsed();
        if c % 2 == 0 { policy_lat.push(lat) } else { label_lat.push(lat) }
    }
    let mut all: Vec<Duration> = policy_lat.iter().chain(&label_lat).copied().collect();
    for (what, lat) in [("NetworkPolicy", &mut policy_lat), ("Pod label", &mut label_lat), ("both", &mut all)] {
        lat.sort();
        eprintln!(
            "{what} write -> policy tables, {n} pods and {} policies loaded, {} changes: p50 {:?}, p99 {:?}, max {:?}",
            nns * 10,
            lat.len(),
            quantile(lat, 0.5),
            quantile(lat, 0.99),
            lat[lat.len() - 1]
        );
    }
    // The target (at 10,000 pods and 1,000 policies): p99 < 100 ms.
    assert!(quantile(&all, 0.99) < Duration::from_millis(100), "p99 {:?} >= 100 ms", quantile(&all, 0.99));
    drop(cp);
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Polls the reader (every millisecond, bounded) until the published verdict for `src` -> `dst`
/// on TCP `port` is `want`.
async fn wait_verdict(
    reader: &mut Reader<Snapshot>,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    want: PolicyVerdict,
    c: usize,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = reader.load().policy().verdict(src, dst, 6, port);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "change {c}: {src} -> {dst} TCP {port} still {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
