//! Convergence benchmark: time from an API write (client-side timestamp, taken just before the
//! request) to the publication of the data plane's forwarding snapshot reflecting it
//! (`ferry_tables::Tables::set_desired` returned, readers see it), with 1,000 Nodes in a real
//! kube-apiserver (backed by a real etcd), both started here on 127.0.0.1.
//!
//! Phases (each write is sequential: the next starts after the previous one was published, so a
//! latency is one write's end-to-end time, not queueing behind others):
//!   1. create 1,000 Nodes one by one (the cluster grows from 0 to 1,000);
//!   2. with 1,000 Nodes in the cluster, re-address nodes (patch the public-ip annotation) and
//!      delete+recreate nodes with a new CIDR.
//!
//! Run: `scripts/bench-convergence.sh` (or `cargo run --release -p ferry-control --example
//! convergence`). An example rather than a `cargo bench` target: the bench profile's fat LTO over
//! kube, tonic and rustls would add minutes to every `cargo bench --no-run` in CI for a
//! measurement that is dominated by the API server anyway.
//! Env: `FERRY_BENCH_NODES` (default 1000), `FERRY_BENCH_WRITES` (phase 2 writes, default 1000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_control::{ControlConfig, ControlPlane, KubeConfig, NextHop, Publish, RouteTable, TablesPublisher};
use ferry_tables::{Tables, Underlay};
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Publication times by node name, filled by the publisher's hook on the control thread.
#[derive(Default)]
struct Seen {
    at: Mutex<HashMap<(String, String), Instant>>,
    cv: Condvar,
}

impl Seen {
    /// Waits until `node`'s route toward `underlay` was published; returns when.
    fn wait(&self, node: &str, underlay: &str, timeout: Duration) -> Option<Instant> {
        let key = (node.to_owned(), underlay.to_owned());
        let guard = self.at.lock().ok()?;
        let (mut guard, _) = self.cv.wait_timeout_while(guard, timeout, |m| !m.contains_key(&key)).ok()?;
        guard.remove(&key)
    }
}

/// Times each publication (diff -> `Tables::set_desired` -> snapshot swapped): the control plane's
/// own share of the end-to-end latency.
struct Timed<P> {
    inner: P,
    spent: Arc<Mutex<Histogram<u64>>>,
}

impl<P: Publish> Publish for Timed<P> {
    fn publish(&mut self, table: &RouteTable<'_>) {
        let t = Instant::now();
        self.inner.publish(table);
        if let Ok(mut h) = self.spent.lock() {
            let _ = h.record(t.elapsed().as_micros() as u64);
        }
    }
}

fn node(name: &str, cidr: &str, ip: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name },
        "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        "status": { "addresses": [ { "type": "InternalIP", "address": ip } ] }
    }))
    .expect("node")
}

fn cidr(i: usize, round: usize) -> String {
    format!("10.{}.{}.0/24", 64 + round * 8 + i / 256, i % 256)
}

fn ip(i: usize, round: usize) -> String {
    format!("198.18.{}.{}", round * 8 + i / 256, i % 256)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn report(name: &str, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name:<44} n={:<5} p50={:>7.2} ms  p90={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        h.len(),
        us(0.5),
        us(0.9),
        us(0.99),
        h.max() as f64 / 1000.0
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let Some(etcd_bin) = common::etcd_binary("the convergence benchmark") else { return };
    let Some(kube_bin) = common::kube_apiserver_binary("the convergence benchmark") else { return };
    let nodes = env("FERRY_BENCH_NODES", 1000);
    let writes = env("FERRY_BENCH_WRITES", 1000);
    let etcd = common::Etcd::start(&etcd_bin);
    let k = common::KubeApiserver::start(&kube_bin, &etcd).await;
    let api: Api<Node> = Api::all(k.client().await);

    let seen = Arc::new(Seen::default());
    let hook_seen = seen.clone();
    let underlay =
        Underlay::new("02:00:00:00:00:01".parse().expect("mac"), Some("198.19.0.1".parse().expect("ip")), None);
    let tables = Tables::new(underlay, Duration::from_secs(30));
    let mut reader = tables.reader();
    let publisher = TablesPublisher::new(tables).with_hook(move |_snap, diff| {
        let now = Instant::now();
        let Ok(mut m) = hook_seen.at.lock() else { return };
        for route in diff.added.iter().map(|(_, r)| r).chain(diff.changed.iter().map(|(_, _, r)| r)) {
            if let NextHop::Tunnel(t) = route.next_hop {
                m.insert((route.node.to_string(), t.underlay.to_string()), now);
            }
        }
        drop(m);
        hook_seen.cv.notify_all();
    });
    let mut cfg = ControlConfig::new("bench-self");
    cfg.kube = Some(KubeConfig { auth: k.auth(), announce: false });
    let spent = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("histogram")));
    let publisher = Timed { inner: publisher, spent: spent.clone() };
    let cp = ControlPlane::spawn(cfg, publisher).expect("control plane");
    let timeout = Duration::from_secs(30);

    // Phase 1: the cluster grows to `nodes`.
    let pp = PostParams::default();
    let mut grow = Histogram::<u64>::new(3).expect("histogram");
    let t = Instant::now();
    for i in 0..nodes {
        let (name, ip0) = (format!("n-{i}"), ip(i, 0));
        let t0 = Instant::now();
        api.create(&pp, &node(&name, &cidr(i, 0), &ip0)).await.expect("create");
        let s = &seen;
        let published = tokio::task::block_in_place(|| s.wait(&name, &ip0, timeout)).expect("published");
        grow.record(published.saturating_duration_since(t0).as_micros() as u64).expect("record");
    }
    let grow_time = t.elapsed();
    let last = ip(nodes - 1, 0).parse().expect("ip");
    assert!(reader.load().is_known_node(last), "the workers' snapshot holds the last node");

    // Phase 2: writes with `nodes` in the cluster.
    let mut patch_h = Histogram::<u64>::new(3).expect("histogram");
    let mut recreate_h = Histogram::<u64>::new(3).expect("histogram");
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for w in 0..writes {
        let i = (w * 7919) % nodes;
        let name = format!("n-{i}");
        if w % 2 == 0 {
            let new_ip = ip(i, 2 + 2 * (w / nodes));
            let patch = json!({ "metadata": { "annotations": { "flannel.alpha.coreos.com/public-ip": new_ip } } });
            let t0 = Instant::now();
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("patch");
            let s = &seen;
            let published = tokio::task::block_in_place(|| s.wait(&name, &new_ip, timeout)).expect("published");
            let d = published.saturating_duration_since(t0).as_micros() as u64;
            patch_h.record(d).expect("record");
            all.record(d).expect("record");
        } else {
            // Delete then recreate with a new CIDR; the measured write is the create.
            api.delete(&name, &DeleteParams::default()).await.expect("delete");
            let new_ip = ip(i, 3 + 2 * (w / nodes));
            let fresh = node(&name, &cidr(i, 1 + (w / nodes) % 2), &new_ip);
            let t0 = loop {
                let t0 = Instant::now();
                match api.create(&pp, &fresh).await {
                    Ok(_) => break t0,
                    Err(kube::Error::Api(e)) if e.code == 409 => tokio::time::sleep(Duration::from_millis(5)).await,
                    Err(e) => panic!("recreate: {e}"),
                }
            };
            let s = &seen;
            let published = tokio::task::block_in_place(|| s.wait(&name, &new_ip, timeout)).expect("published");
            let d = published.saturating_duration_since(t0).as_micros() as u64;
            recreate_h.record(d).expect("record");
            all.record(d).expect("record");
        }
    }

    println!();
    println!(
        "convergence: API write (client timestamp) -> table published, real kube-apiserver 1.20 + etcd on 127.0.0.1"
    );
    println!("phase 1 took {grow_time:?} for {nodes} sequential creates");
    report(&format!("create, cluster growing 0 -> {nodes}"), &grow);
    report(&format!("annotate (re-address), {nodes} nodes"), &patch_h);
    report(&format!("recreate with new CIDR, {nodes} nodes"), &recreate_h);
    report(&format!("all writes with {nodes} nodes in the cluster"), &all);
    if let Ok(h) = spent.lock() {
        report("publish step alone (diff -> Tables snapshot)", &h);
    }
    let text = cp.metrics().encode();
    for l in text.lines().filter(|l| {
        l.starts_with("ferry_control_convergence_seconds_count") || l.starts_with("ferry_control_publications_total")
    }) {
        println!("{l}");
    }
    drop(cp);
}
