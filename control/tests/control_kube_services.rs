//! The Kubernetes source's Services against a real kube-apiserver (Debian's 1.20, which serves
//! EndpointSlices only as `discovery.k8s.io/v1beta1`; v1 is tested from a fixture in the unit
//! tests): Services and slices created, an endpoint changed, a malformed slice, a headless
//! Service, deletions; then the time from an EndpointSlice write to the data plane's tables, with
//! many Services loaded (`FERRY_KUBE_SERVICES`, default 300; the figure is at 10,000).

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Etcd, KubeApiserver, wait_for, wait_until};
use ferry_control::source::kube_services::{SERVICE_NAME_LABEL, SliceVersion, slice_version};
use ferry_control::{ControlConfig, ControlPlane, KubeConfig, SourceKind};
use ferry_tables::{Backend, Snapshot};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const NS: &str = "default";
const BAD_ADDRESS: &str = "endpoints[].addresses";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn service(name: &str, extra: serde_json::Value) -> Service {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}
        ]}
    });
    for (k, val) in extra.as_object().expect("object") {
        v["spec"][k] = val.clone();
    }
    serde_json::from_value(v).expect("service")
}

/// A v1beta1 slice of `service` with ready endpoints `addrs` (http on 8080, dns on 5353).
fn slice(name: &str, service: &str, addrs: &[&str]) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
    }))
    .expect("slice")
}

fn endpoints_patch(addrs: &[&str]) -> serde_json::Value {
    json!({"endpoints": addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>()})
}

/// The backends of `vip:port/proto` in the snapshot, sorted; `None` without that service.
fn backends(s: &Snapshot, vip: IpAddr, port: u16, proto: u8) -> Option<Vec<String>> {
    let svc = s.services().lookup(vip, port, proto)?;
    let mut v: Vec<String> = svc.backends().iter().map(|b: &Backend| format!("{}:{}", b.addr, b.port)).collect();
    v.sort();
    Some(v)
}

fn cluster_ip(s: &Service) -> IpAddr {
    ip(s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()).expect("a cluster IP"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_services_and_endpoint_slices() {
    common::init_tracing();
    let test = "kube_services_and_endpoint_slices";
    let Some(etcd_bin) = common::etcd_binary(test) else { return };
    let Some(kube_bin) = common::kube_apiserver_binary(test) else { return };
    let etcd = Etcd::start(&etcd_bin);
    let k = KubeApiserver::start(&kube_bin, &etcd).await;
    let client = k.client().await;
    let version = slice_version(&client).await.expect("discovery");
    assert_eq!(version, SliceVersion::V1beta1, "the 1.20 test server serves v1beta1 only");
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"));
    let slices: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
    let pp = PostParams::default();

    // Before the control plane starts: a Service with affinity and its slice.
    let web = services
        .create(
            &pp,
            &service(
                "web",
                json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 90}}}),
            ),
        )
        .await
        .expect("create web");
    let vip = cluster_ip(&web);
    slices.create(&pp, &slice("web-1", "web", &["10.244.1.2", "10.244.2.2"])).await.expect("create slice");

    let mut cfg = ControlConfig::new("self-node");
    cfg.kube = Some(KubeConfig { auth: k.auth(), announce: false });
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher).expect("starts");
    let m = cp.metrics().clone();

    let s = wait_for(&mut reader, WAIT, "web from the initial lists", |s| {
        backends(s, vip, 80, 6).is_some_and(|b| b.len() == 2)
    })
    .await;
    assert_eq!(backends(&s, vip, 80, 6).expect("http"), ["10.244.1.2:8080", "10.244.2.2:8080"]);
    assert_eq!(backends(&s, vip, 53, 17).expect("dns"), ["10.244.1.2:5353", "10.244.2.2:5353"]);
    let http = s.services().lookup(vip, 80, 6).expect("http");
    assert_eq!((http.name(), http.affinity()), ("default/web:http", Some(Duration::from_secs(90))));
    // The server's own `default/kubernetes` Service points at its advertise address, 127.0.0.1 in
    // this harness, which cannot be a pod's: whether it was rejected depends on whether the server
    // wrote its slice (1.20 does); count from here.
    let bad_before = m.rejected_total(SourceKind::Kube, BAD_ADDRESS);

    // An endpoint replaced: the change reaches the tables, and only web's part is rebuilt.
    slices
        .patch("web-1", &PatchParams::default(), &Patch::Merge(endpoints_patch(&["10.244.1.2", "10.244.2.3"])))
        .await
        .expect("patch");
    wait_for(&mut reader, WAIT, "the changed endpoint", |s| {
        backends(s, vip, 80, 6).is_some_and(|b| b == ["10.244.1.2:8080", "10.244.2.3:8080"])
    })
    .await;

    // A second slice adds endpoints; a headless Service with a slice is left alone.
    slices.create(&pp, &slice("web-2", "web", &["10.244.3.2"])).await.expect("create");
    wait_for(&mut reader, WAIT, "the second slice", |s| backends(s, vip, 80, 6).is_some_and(|b| b.len() == 3)).await;
    services.create(&pp, &service("headless", json!({"clusterIP": "None"}))).await.expect("headless");
    slices.create(&pp, &slice("headless-1", "headless", &["10.244.1.9"])).await.expect("create");

    // A malformed slice (an endpoint the server accepts, but no pod can have): web keeps its last
    // good state, one warning is counted however often the slice changes afterwards.
    let generation = reader.load().services().generation();
    slices
        .patch("web-2", &PatchParams::default(), &Patch::Merge(endpoints_patch(&["0.0.0.0"])))
        .await
        .expect("the server accepts 0.0.0.0 in a v1beta1 slice");
    wait_until(WAIT, "the rejection", || m.rejected_total(SourceKind::Kube, BAD_ADDRESS) == bad_before + 1).await;
    for i in 0..2 {
        let patch = json!({"metadata": {"labels": {"unrelated": i.to_string()}}});
        slices.patch("web-2", &PatchParams::default(), &Patch::Merge(patch)).await.expect("label");
    }
    // A marker Service created after those updates: the watch delivers events in order, so once
    // it is published the source has seen them; nothing else was published meanwhile.
    let marker = services.create(&pp, &service("marker", json!({}))).await.expect("marker");
    let mvip = cluster_ip(&marker);
    let s = wait_for(&mut reader, WAIT, "the marker", |s| backends(s, mvip, 80, 6).is_some()).await;
    assert_eq!(s.services().generation(), generation + 1, "nothing published for the bad slice");
    assert_eq!(m.rejected_total(SourceKind::Kube, BAD_ADDRESS), bad_before + 1, "one warning per bad state");
    assert_eq!(backends(&s, vip, 80, 6).expect("web").len(), 3, "web keeps its last good state");
    assert_eq!(backends(&s, mvip, 80, 6).expect("marker"), Vec::<String>::new(), "no slice: no backend (rejects)");
    let headless: Vec<_> = s.services().iter().filter(|x| x.name().starts_with("default/headless")).collect();
    assert!(headless.is_empty(), "headless Services are not translated");

    // Fixed again, then deleted: the slice's endpoints go; the Service goes.
    slices
        .patch("web-2", &PatchParams::default(), &Patch::Merge(endpoints_patch(&["10.244.3.3"])))
        .await
        .expect("patch");
    wait_for(&mut reader, WAIT, "the fixed slice", |s| {
        backends(s, vip, 80, 6).is_some_and(|b| b.contains(&"10.244.3.3:8080".to_owned()))
    })
    .await;
    slices.delete("web-2", &DeleteParams::default()).await.expect("delete");
    wait_for(&mut reader, WAIT, "web-2 deleted", |s| backends(s, vip, 80, 6).is_some_and(|b| b.len() == 2)).await;
    services.delete("web", &DeleteParams::default()).await.expect("delete");
    let s = wait_for(&mut reader, WAIT, "web deleted", |s| backends(s, vip, 80, 6).is_none()).await;
    assert!(s.services().lookup(vip, 53, 17).is_none());

    endpoint_change_latency(&services, &slices, &mut reader).await;
    drop(cp);
}

/// N Services with a slice each (one endpoint per node of a 10-node cluster, spread), loaded;
/// then 100 slice changes one after another, each timed from the API write to the tables.
async fn endpoint_change_latency(
    services: &Api<Service>,
    slices: &Api<DynamicObject>,
    reader: &mut ferry_tables::Reader<Snapshot>,
) {
    let n: usize = std::env::var("FERRY_KUBE_SERVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let addr = |i: usize, j: usize| format!("10.244.{}.{}", j, 2 + i % 250);
    let t = Instant::now();
    let mut created: Vec<(usize, Service)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let name = format!("load-{i}");
                let svc = services.create(&PostParams::default(), &service(&name, json!({}))).await?;
                let addrs: Vec<String> = (0..3).map(|j| addr(i, (i + j) % 10)).collect();
                let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
                slices.create(&PostParams::default(), &slice(&format!("{name}-1"), &name, &addrs)).await?;
                Ok::<_, kube::Error>((i, svc))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await
        .expect("create the services");
    // In creation order, not completion order.
    created.sort_by_key(|(i, _)| *i);
    let vips: Vec<IpAddr> = created.iter().map(|(_, s)| cluster_ip(s)).collect();
    eprintln!("{n} services and slices created in {:?}", t.elapsed());
    wait_for(reader, Duration::from_secs(600), "every service with its endpoints", |s| {
        vips.iter().all(|v| s.services().lookup(*v, 80, 6).is_some_and(|x| x.backends().len() == 3))
    })
    .await;
    eprintln!("{n} services published {:?} after the first write", t.elapsed());

    let mut lat = Vec::with_capacity(100);
    for k in 0..100 {
        let i = (k * 7919) % n;
        let name = format!("load-{i}-1");
        let new = format!("10.244.{}.{}", 10 + k % 100, 2 + k / 100);
        let started = Instant::now();
        slices.patch(&name, &PatchParams::default(), &Patch::Merge(endpoints_patch(&[&new]))).await.expect("patch");
        let want = format!("{new}:8080");
        let deadline = started + WAIT;
        loop {
            let s = reader.load();
            if s.services()
                .lookup(vips[i], 80, 6)
                .is_some_and(|x| x.backends().len() == 1 && x.backends()[0].addr.to_string() + ":8080" == want)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "change {k} of {name} not published within {WAIT:?}: {:?}",
                backends(s, vips[i], 80, 6)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(started.elapsed());
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    eprintln!(
        "EndpointSlice write -> tables, {n} services loaded, 100 changes: p50 {:?}, p99 {:?}, max {:?}",
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
    // The target, at 10,000 Services: p99 < 50 ms. Checked here too (at any N): a
    // regression to rebuilding every service on each change shows at a few hundred already.
    assert!(p(0.99) < Duration::from_millis(50), "p99 {:?} >= 50 ms", p(0.99));
}
