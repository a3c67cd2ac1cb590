//! The Kubernetes source's NetworkPolicy objects against a real kube-apiserver (Debian's 1.20):
//! Namespaces, Pods (labels, node, named ports, status.podIPs patched as kubelet does) and
//! NetworkPolicies are listed, then watched through changes and deletions, and reach the
//! control plane's policy store as the API has them.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Etcd, KubeApiserver};
use ferry_control::model::ObjectKind;
use ferry_control::policy::PolicyStore;
use ferry_control::{ControlConfig, ControlPlane, KubeConfig, Publish, RouteTable};
use ferry_tables::policy::PodSpec;
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
}
