//! The Kubernetes source against a real kube-apiserver (built from Debian's `kubernetes` source
//! package by scripts/build-kube-apiserver.sh) and a real etcd: nodes created, annotated,
//! malformed, overlapping, deleted and recreated; this node announced; 1,000 nodes churned; the
//! API server killed and restarted mid-watch. Published through the production publisher into the
//! data plane's tables, read as a worker reads them.

mod common;

use std::time::{Duration, Instant};

use common::{Etcd, KubeApiserver, has, is_own, underlay, wait_for, wait_until};
use ferry_control::{ControlConfig, ControlPlane, KubeConfig, SourceKind};
use ferry_tables::{Reader, Route, Snapshot};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";

fn node(name: &str, cidrs: &[&str], internal_ip: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
        "spec": { "podCIDR": cidrs.first(), "podCIDRs": cidrs },
        "status": { "addresses": [ { "type": "InternalIP", "address": internal_ip } ] }
    }))
    .expect("node")
}

async fn annotate(api: &Api<Node>, name: &str, annotations: serde_json::Value) {
    api.patch(name, &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "annotations": annotations } })))
        .await
        .expect("annotate");
}

async fn delete(api: &Api<Node>, name: &str) {
    api.delete(name, &DeleteParams::default()).await.expect("delete");
}

fn config(k: &KubeApiserver) -> ControlConfig {
    let mut cfg = ControlConfig::new("self-node");
    cfg.public_ip = Some("192.0.2.250".parse().expect("ip"));
    cfg.vtep_mac = Some("02:00:00:00:02:50".parse().expect("mac"));
    cfg.cluster_cidrs = vec!["10.0.0.0/8".parse().expect("net"), "fd00::/8".parse().expect("net")];
    cfg.kube = Some(KubeConfig { auth: k.auth(), announce: true });
    cfg
}

/// Node lifecycle, annotations, bad data and this node's announcement, then the 1,000-node churn,
/// against one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_nodes_lifecycle_bad_data_announce_and_churn() {
    common::init_tracing();
    let Some(etcd_bin) = common::etcd_binary("kube_nodes_lifecycle_bad_data_announce_and_churn") else { return };
    let Some(kube_bin) = common::kube_apiserver_binary("kube_nodes_lifecycle_bad_data_announce_and_churn") else {
        return;
    };
    let t = Instant::now();
    let etcd = Etcd::start(&etcd_bin);
    let k = KubeApiserver::start(&kube_bin, &etcd).await;
    eprintln!("servers ready in {:?}", t.elapsed());
    let api: Api<Node> = Api::all(k.client().await);
    let pp = PostParams::default();

    // This node and a node that already exist before the control plane starts.
    api.create(&pp, &node("self-node", &["10.200.0.0/24"], "192.0.2.250")).await.expect("create");
    api.create(&pp, &node("a", &["10.1.0.0/24", "fd00:1::/64"], "192.0.2.1")).await.expect("create");
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(config(&k), publisher).expect("starts");
    let m = cp.metrics().clone();

    let s = wait_for(&mut reader, WAIT, "initial list", |s| is_own(s, "10.200.0.5")).await;
    assert_eq!(underlay(&s, "10.1.0.5"), Some("192.0.2.1".parse().expect("ip")));
    assert_eq!(underlay(&s, "fd00:1::5"), Some("192.0.2.1".parse().expect("ip")), "dual-stack CIDRs");

    // This node announced itself with Flannel's annotations.
    let mut announced = None;
    let deadline = Instant::now() + WAIT;
    while announced.is_none() && Instant::now() < deadline {
        let n = api.get("self-node").await.expect("get");
        announced = n.metadata.annotations.filter(|a| a.contains_key(BACKEND_DATA));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = announced.expect("self-node annotated");
    assert_eq!(a.get("flannel.alpha.coreos.com/public-ip").map(String::as_str), Some("192.0.2.250"));
    assert_eq!(a.get("flannel.alpha.coreos.com/backend-type").map(String::as_str), Some("vxlan"));
    let data: serde_json::Value = serde_json::from_str(&a[BACKEND_DATA]).expect("json");
    assert_eq!(data, json!({"VNI": 1, "VtepMAC": "02:00:00:00:02:50"}));
    // Someone overwrites them: announced again.
    annotate(&api, "self-node", json!({ "flannel.alpha.coreos.com/public-ip": "203.0.113.1" })).await;
    wait_until_async(WAIT, "re-announcement", || async {
        api.get("self-node")
            .await
            .ok()
            .and_then(|n| n.metadata.annotations)
            .and_then(|a| a.get("flannel.alpha.coreos.com/public-ip").cloned())
            == Some("192.0.2.250".into())
    })
    .await;

    // Created while watching.
    api.create(&pp, &node("b", &["10.2.0.0/24"], "192.0.2.2")).await.expect("create");
    wait_for(&mut reader, WAIT, "b created", |s| has(s, "10.2.0.1")).await;

    // Annotated like a Flannel node: public-ip overrides the InternalIP, backend data is taken.
    annotate(
        &api,
        "b",
        json!({
            "flannel.alpha.coreos.com/public-ip": "198.51.100.2",
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            BACKEND_DATA: "{\"VNI\":7,\"VtepMAC\":\"02:00:00:00:00:02\"}",
        }),
    )
    .await;
    let s = wait_for(&mut reader, WAIT, "b annotated", |s| {
        underlay(s, "10.2.0.1").is_some_and(|u| u.to_string() == "198.51.100.2")
    })
    .await;
    let route = s.route("10.2.0.1".parse().expect("ip"));
    let Route::Remote { template, vtep_mac } = route else { panic!("10.2.0.1 is not tunnelled: {route:?}") };
    assert_eq!((template.vni(), vtep_mac.to_string()), (7, "02:00:00:00:00:02".to_owned()));

    // A malformed annotation: last good state kept, one warning counted, however often the node
    // is updated afterwards.
    let generation = reader.load().generation();
    let field = format!("metadata.annotations[{BACKEND_DATA}]");
    annotate(&api, "b", json!({ BACKEND_DATA: "{\"VtepMAC\":" })).await;
    wait_until(WAIT, "the rejection", || m.rejected_total(SourceKind::Kube, &field) == 1).await;
    annotate(&api, "b", json!({ "unrelated": "1" })).await;
    annotate(&api, "b", json!({ "unrelated": "2" })).await;
    // A node created after those updates: the watch delivers events in order, so once it is
    // published the engine has applied both updates of b, and it is the only publication since.
    api.create(&pp, &node("marker", &["10.3.0.0/24"], "192.0.2.5")).await.expect("create");
    let s = wait_for(&mut reader, WAIT, "the marker node", |s| has(s, "10.3.0.1")).await;
    assert_eq!(s.generation(), generation + 1, "nothing published for b's bad data");
    assert_eq!(m.rejected_total(SourceKind::Kube, &field), 1, "one warning per bad state");
    assert_eq!(underlay(&s, "10.2.0.1").map(|u| u.to_string()).as_deref(), Some("198.51.100.2"));

    // Overlap: c claims a subnet of a's CIDR -> refused (a's claim is senior: created earlier);
    // when a goes, c gets it. Seniority is by creationTimestamp, whole seconds, then UID: c is
    // created once the clock is past a's second, so that it is younger, not a UID coin toss.
    let a_created =
        api.get("a").await.expect("get a").metadata.creation_timestamp.expect("a's timestamp").0.as_second();
    let unix_now =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    wait_until(WAIT, "the clock past a's creation second", || unix_now() > a_created).await;
    api.create(&pp, &node("c", &["10.1.0.128/25"], "192.0.2.3")).await.expect("create");
    wait_until(WAIT, "the overlap rejection", || m.rejected_total(SourceKind::Kube, "spec.podCIDRs") == 1).await;
    assert_eq!(underlay(reader.load(), "10.1.0.200"), Some("192.0.2.1".parse().expect("ip")));
    // Outside the cluster network -> refused.
    api.create(&pp, &node("d", &["172.16.0.0/24"], "192.0.2.4")).await.expect("create");
    wait_until(WAIT, "the out-of-network rejection", || m.rejected_total(SourceKind::Kube, "spec.podCIDRs") == 2).await;
    assert!(!has(reader.load(), "172.16.0.1"));

    // Deleted: routes gone, and the blocked overlap is handed over in the same publication.
    delete(&api, "a").await;
    let s = wait_for(&mut reader, WAIT, "a deleted", |s| !has(s, "10.1.0.5") && has(s, "10.1.0.200")).await;
    assert_eq!(underlay(&s, "10.1.0.200"), Some("192.0.2.3".parse().expect("ip")));
    assert!(!has(&s, "fd00:1::5"));

    // Recreated with another CIDR (a Node's podCIDR cannot change in place on a real server).
    delete(&api, "b").await;
    wait_for(&mut reader, WAIT, "b deleted", |s| !has(s, "10.2.0.1")).await;
    api.create(&pp, &node("b", &["10.2.1.0/24"], "192.0.2.22")).await.expect("recreate");
    let s = wait_for(&mut reader, WAIT, "b recreated", |s| has(s, "10.2.1.1")).await;
    assert_eq!(underlay(&s, "10.2.1.1"), Some("192.0.2.22".parse().expect("ip")));

    let h = histogram_count(&m);
    assert!(h > 0, "convergence histogram has observations");
    eprintln!("lifecycle scenario done at {:?}", t.elapsed());

    churn_1000(&api, &mut reader).await;
    eprintln!("whole test {:?}", t.elapsed());
    drop(cp);
}

fn histogram_count(m: &ferry_control::Metrics) -> u64 {
    m.encode()
        .lines()
        .find(|l| l.starts_with("ferry_control_convergence_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

async fn wait_until_async<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn churn_cidr(i: usize, round: usize) -> String {
    format!("10.{}.{}.0/24", 100 + round * 8 + i / 256, i % 256)
}

fn churn_ip(i: usize, round: usize) -> String {
    format!("198.18.{}.{}", round * 8 + i / 256, i % 256)
}

/// An address in `churn_cidr(i, round)`.
fn churn_dst(i: usize, round: usize) -> String {
    format!("10.{}.{}.1", 100 + round * 8 + i / 256, i % 256)
}

/// Whether every destination is tunnelled to the given underlay address, or (`None`) unrouted.
fn all_as_expected(s: &Snapshot, expected: &[(String, Option<String>)]) -> bool {
    expected.iter().all(|(dst, want)| match want {
        Some(ip) => underlay(s, dst).is_some_and(|u| u.to_string() == *ip),
        None => !has(s, dst),
    })
}

/// 1,000 nodes created, half deleted, a quarter recreated with new CIDRs, a quarter re-addressed,
/// then all deleted; after each step every churned node's CIDRs (old and new) must route as the API
/// says.
async fn churn_1000(api: &Api<Node>, reader: &mut Reader<Snapshot>) {
    const N: usize = 1000;
    let pp = PostParams::default();
    let t = Instant::now();
    futures_util::stream::iter(0..N)
        .map(|i| {
            let api = api.clone();
            let pp = pp.clone();
            async move { api.create(&pp, &node(&format!("churn-{i}"), &[&churn_cidr(i, 0)], &churn_ip(i, 0))).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("create 1000 nodes");
    eprintln!("1,000 nodes created in {:?}", t.elapsed());
    let created: Vec<_> = (0..N).map(|i| (churn_dst(i, 0), Some(churn_ip(i, 0)))).collect();
    wait_for(reader, Duration::from_secs(60), "1,000 nodes", |s| all_as_expected(s, &created)).await;
    eprintln!("1,000 nodes published {:?} after the first write", t.elapsed());

    // Expected state after churn: even i deleted; i % 4 == 0 recreated with generation-1 CIDRs;
    // odd i with i % 4 == 1 re-addressed through the public-ip annotation.
    let t2 = Instant::now();
    futures_util::stream::iter(0..N)
        .map(|i| {
            let api = api.clone();
            let pp = pp.clone();
            async move {
                let name = format!("churn-{i}");
                if i % 2 == 0 {
                    api.delete(&name, &DeleteParams::default()).await?;
                    if i % 4 == 0 {
                        // The old object may linger briefly; retry until the name is free.
                        let fresh = node(&name, &[&churn_cidr(i, 1)], &churn_ip(i, 1));
                        loop {
                            match api.create(&pp, &fresh).await {
                                Err(kube::Error::Api(e)) if e.code == 409 => tokio::time::sleep(Duration::from_millis(20)).await,
                                other => break other.map(|_| ()),
                            }
                        }?;
                    }
                } else if i % 4 == 1 {
                    let patch = json!({ "metadata": { "annotations": { "flannel.alpha.coreos.com/public-ip": churn_ip(i, 2) } } });
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await?;
                }
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("churn");
    let mut expected = Vec::new();
    for i in 0..N {
        let old = match (i % 2, i % 4) {
            (0, _) => None,
            (_, 1) => Some(churn_ip(i, 2)),
            _ => Some(churn_ip(i, 0)),
        };
        expected.push((churn_dst(i, 0), old));
        if i % 4 == 0 {
            expected.push((churn_dst(i, 1), Some(churn_ip(i, 1))));
        }
    }
    wait_for(reader, Duration::from_secs(60), "the churned table", |s| all_as_expected(s, &expected)).await;
    eprintln!("churn of 1,000 writes converged {:?} after the first write", t2.elapsed());

    let list = api.list(&Default::default()).await.expect("list");
    let names: Vec<String> =
        list.items.iter().filter_map(|n| n.metadata.name.clone()).filter(|n| n.starts_with("churn-")).collect();
    futures_util::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            async move { api.delete(&name, &DeleteParams::default()).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("delete all");
    let gone: Vec<_> = expected.into_iter().map(|(dst, _)| (dst, None)).collect();
    wait_for(reader, Duration::from_secs(60), "all churn nodes gone", |s| all_as_expected(s, &gone)).await;
}

/// The API server is SIGKILLed mid-watch: forwarding continues on the last tables, the source
/// reports itself down, reconnects with backoff once the server is back, and the full resync
/// removes a node deleted behind its back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_killed_and_restarted_mid_watch() {
    common::init_tracing();
    let Some(etcd_bin) = common::etcd_binary("kube_apiserver_killed_and_restarted_mid_watch") else { return };
    let Some(kube_bin) = common::kube_apiserver_binary("kube_apiserver_killed_and_restarted_mid_watch") else { return };
    let etcd = Etcd::start(&etcd_bin);
    let mut k = KubeApiserver::start(&kube_bin, &etcd).await;
    let api: Api<Node> = Api::all(k.client().await);
    let pp = PostParams::default();
    for (name, cidr, ip) in [("x1", "10.31.0.0/24", "192.0.2.31"), ("x2", "10.32.0.0/24", "192.0.2.32")] {
        api.create(&pp, &node(name, &[cidr], ip)).await.expect("create");
    }
    let mut cfg = config(&k);
    cfg.kube = Some(KubeConfig { auth: k.auth(), announce: false });
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher).expect("starts");
    let m = cp.metrics().clone();
    wait_for(&mut reader, WAIT, "initial list", |s| has(s, "10.31.0.1") && has(s, "10.32.0.1")).await;
    wait_until(WAIT, "source up", || m.source_up(SourceKind::Kube) == Some(true)).await;

    k.kill();
    let (published, failed) = (m.publications(), m.reconnects(SourceKind::Kube));
    wait_until(WAIT, "source down", || m.source_up(SourceKind::Kube) == Some(false)).await;
    // While the API server is down, x1 disappears from etcd behind the watcher's back.
    let mut e = etcd_client::Client::connect([etcd.endpoint()], None).await.expect("etcd");
    let deleted = e.delete("/registry/minions/x1", None).await.expect("delete x1 in etcd").deleted();
    assert_eq!(deleted, 1, "x1 stored where a 1.20 server keeps Nodes");
    // Forwarding continues on the last tables, however often reconnecting fails. The lost session
    // and two failed reconnects are three sessions ended; an update sent in any but the last would
    // have waited at least one backoff delay (150 ms or more) before the last ended, while the
    // engine publishes within milliseconds of an update: nothing published means nothing sent.
    wait_until(WAIT, "two failed reconnects", || m.reconnects(SourceKind::Kube) >= failed + 3).await;
    assert_eq!(m.publications(), published, "nothing published while the API server is down");
    let s = reader.load();
    assert!(has(s, "10.31.0.1") && has(s, "10.32.0.1"), "forwarding continues on the last tables");

    k.restart().await;
    let api: Api<Node> = Api::all(k.client().await);
    wait_until(Duration::from_secs(60), "source up again", || m.source_up(SourceKind::Kube) == Some(true)).await;
    assert!(m.reconnects(SourceKind::Kube) >= 1);
    wait_for(&mut reader, WAIT, "x1 removed by the resync", |s| !has(s, "10.31.0.1") && has(s, "10.32.0.1")).await;
    api.create(&pp, &node("x3", &["10.33.0.0/24"], "192.0.2.33")).await.expect("create");
    wait_for(&mut reader, WAIT, "x3 after the restart", |s| has(s, "10.33.0.1")).await;
    drop(cp);
}
