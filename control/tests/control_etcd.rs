//! The Flannel-compatible etcd source against Debian's real etcd: leases added, malformed and
//! expiring; this node's own lease allocated, renewed, reused and released; etcd killed and
//! restarted mid-watch.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{Etcd, wait_for, wait_until};
use etcd_client::{Client, GetOptions, PutOptions};
use ferry_control::{ControlConfig, ControlPlane, EtcdConfig, FibSnapshot, NextHop, SnapshotPublisher, SourceKind};

const WAIT: Duration = Duration::from_secs(15);
const PREFIX: &str = "/coreos.com/network";
const MY_IP: &str = "192.0.2.100";

fn lease_value(ip: &str, mac: &str) -> String {
    format!(r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#)
}

async fn client(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint()], None).await.expect("etcd client")
}

async fn put(c: &mut Client, key: &str, value: &str) {
    c.put(format!("{PREFIX}/{key}"), value, None).await.expect("put");
}

fn config(etcd: &Etcd, ttl: Duration) -> ControlConfig {
    let mut cfg = ControlConfig::new("this-node");
    cfg.public_ip = Some(MY_IP.parse().expect("ip"));
    cfg.vtep_mac = Some("02:00:00:00:01:00".parse().expect("mac"));
    cfg.etcd =
        Some(EtcdConfig { endpoints: vec![etcd.endpoint()], prefix: PREFIX.into(), take_lease: true, lease_ttl: ttl });
    cfg
}

fn underlay(s: &FibSnapshot, ip: &str) -> Option<IpAddr> {
    match s.lookup(ip.parse().expect("ip"))?.next_hop {
        NextHop::Tunnel(t) => Some(t.underlay),
        NextHop::Local => None,
    }
}

fn is_local(s: &FibSnapshot, ip: &str) -> bool {
    s.lookup(ip.parse().expect("ip")).is_some_and(|r| r.next_hop == NextHop::Local)
}

async fn own_lease(c: &mut Client) -> Vec<(String, i64)> {
    let resp = c.get(format!("{PREFIX}/subnets/"), Some(GetOptions::new().with_prefix())).await.expect("get");
    resp.kvs()
        .iter()
        .filter(|kv| String::from_utf8_lossy(kv.value()).contains(MY_IP))
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect()
}

#[tokio::test]
async fn etcd_leases_allocate_renew_expire_reject_and_release() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary() else { return };
    let etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#).await;
    put(&mut c, "subnets/10.5.1.0-24", &lease_value("192.0.2.1", "02:00:00:00:00:01")).await;
    put(&mut c, "subnets/10.5.3.0-24", &lease_value("192.0.2.3", "02:00:00:00:00:03")).await;

    let (publisher, reader) = SnapshotPublisher::new();
    let cp = ControlPlane::spawn(config(&etcd, Duration::from_secs(3)), publisher).expect("starts");

    // Both foreign leases, plus our own: the first free subnet (10.5.2.0/24), delivered locally.
    let s = wait_for(&reader, WAIT, "leases and our own subnet", |s| s.len() == 3).await;
    assert_eq!(underlay(&s, "10.5.1.9"), Some("192.0.2.1".parse().expect("ip")));
    assert_eq!(underlay(&s, "10.5.3.9"), Some("192.0.2.3".parse().expect("ip")));
    assert!(is_local(&s, "10.5.2.9"), "own subnet is local delivery");
    let mine = own_lease(&mut c).await;
    assert_eq!(mine.len(), 1);
    assert!(mine[0].0.ends_with("/subnets/10.5.2.0-24") && mine[0].1 != 0, "{mine:?}");
    if let NextHop::Tunnel(t) = s.lookup("10.5.1.9".parse().expect("ip")).expect("route").next_hop {
        assert_eq!((t.vni, t.port, t.vtep_mac.map(|m| m.to_string())), (1, 8472, Some("02:00:00:00:00:01".into())));
    }

    // A lease attached to a 2 s etcd lease that nobody renews: added, then expires -> removed.
    let lease = c.lease_grant(2, None).await.expect("grant").id();
    c.put(
        format!("{PREFIX}/subnets/10.5.4.0-24"),
        lease_value("192.0.2.4", "02:00:00:00:00:04"),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put");
    wait_for(&reader, WAIT, "the short lease", |s| underlay(s, "10.5.4.1").is_some()).await;
    wait_for(&reader, WAIT, "the short lease to expire", |s| s.lookup("10.5.4.1".parse().expect("ip")).is_none()).await;

    // Our own lease has a 3 s TTL; it is renewed, so it outlives it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(own_lease(&mut c).await.len(), 1, "own lease renewed past its TTL");
    assert!(is_local(&reader.load(), "10.5.2.9"));

    // Malformed leases: counted once each, named by field; the good table stays.
    let generation = reader.load().generation();
    put(&mut c, "subnets/10.5.5.0-24", r#"{"PublicIP":"not-an-ip"}"#).await;
    put(&mut c, "subnets/10.5.6.7-24", &lease_value("192.0.2.6", "02:00:00:00:00:06")).await;
    put(&mut c, "subnets/10.5.1.0-24", r#"{"PublicIP":"192.0.2.1","BackendData":{"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#)
        .await;
    put(&mut c, "subnets/10.9.0.0-24", &lease_value("192.0.2.9", "02:00:00:00:00:09")).await;
    let m = cp.metrics().clone();
    wait_until(WAIT, "four rejections", || m.rejected_all(SourceKind::Etcd) == 4).await;
    assert_eq!(m.rejected_total(SourceKind::Etcd, "PublicIP"), 1);
    assert_eq!(m.rejected_total(SourceKind::Etcd, "key"), 2, "host bits, and outside the network");
    assert_eq!(m.rejected_total(SourceKind::Etcd, "BackendData"), 1);
    let s = reader.load();
    assert_eq!(s.generation(), generation, "nothing published for bad data");
    assert_eq!(underlay(&s, "10.5.1.9"), Some("192.0.2.1".parse().expect("ip")), "last good state kept");

    // A good update again is taken; deleting a lease removes its route.
    put(&mut c, "subnets/10.5.1.0-24", &lease_value("192.0.2.101", "02:00:00:00:00:01")).await;
    c.delete(format!("{PREFIX}/subnets/10.5.3.0-24"), None).await.expect("delete");
    wait_for(&reader, WAIT, "update and delete", |s| {
        underlay(s, "10.5.1.9").is_some_and(|u| u.to_string() == "192.0.2.101")
            && s.lookup("10.5.3.9".parse().expect("ip")).is_none()
    })
    .await;

    // Clean shutdown releases our lease.
    cp.shutdown();
    assert!(own_lease(&mut c).await.is_empty(), "own lease released on shutdown");
}

#[tokio::test]
async fn etcd_reuses_this_nodes_existing_lease() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary() else { return };
    let etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.6.0.0/16"}"#).await;
    put(&mut c, "subnets/10.6.77.0-24", &lease_value(MY_IP, "02:00:00:00:01:00")).await;
    let (publisher, reader) = SnapshotPublisher::new();
    let cp = ControlPlane::spawn(config(&etcd, Duration::from_secs(30)), publisher).expect("starts");
    wait_for(&reader, WAIT, "our reused subnet", |s| is_local(s, "10.6.77.1")).await;
    let mine = own_lease(&mut c).await;
    assert_eq!(mine.len(), 1, "no second allocation: {mine:?}");
    assert!(mine[0].1 != 0, "the reused key is now attached to our etcd lease");
    drop(cp);
}

#[tokio::test]
async fn etcd_killed_and_restarted_mid_watch() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary() else { return };
    let mut etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.7.0.0/16"}"#).await;
    put(&mut c, "subnets/10.7.1.0-24", &lease_value("192.0.2.1", "02:00:00:00:00:01")).await;
    let (publisher, reader) = SnapshotPublisher::new();
    let cp = ControlPlane::spawn(config(&etcd, Duration::from_secs(30)), publisher).expect("starts");
    wait_for(&reader, WAIT, "initial sync", |s| s.len() == 2).await;
    let m = cp.metrics().clone();
    wait_until(WAIT, "source up", || m.source_up(SourceKind::Etcd) == Some(true)).await;

    etcd.kill();
    wait_until(WAIT, "source down", || m.source_up(SourceKind::Etcd) == Some(false)).await;
    // Forwarding continues on the last tables.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reader.load().len(), 2);

    etcd.restart();
    let mut c = client(&etcd).await;
    wait_until(Duration::from_secs(30), "source up again", || m.source_up(SourceKind::Etcd) == Some(true)).await;
    assert!(m.reconnects(SourceKind::Etcd) >= 1);
    put(&mut c, "subnets/10.7.9.0-24", &lease_value("192.0.2.9", "02:00:00:00:00:09")).await;
    c.delete(format!("{PREFIX}/subnets/10.7.1.0-24"), None).await.expect("delete");
    let s = wait_for(&reader, WAIT, "changes after the restart", |s| {
        underlay(s, "10.7.9.1").is_some() && s.lookup("10.7.1.1".parse().expect("ip")).is_none()
    })
    .await;
    assert_eq!(s.routes().iter().filter(|(_, r)| r.next_hop == NextHop::Local).count(), 1, "own lease kept");
    assert_eq!(own_lease(&mut c).await.len(), 1);
    drop(cp);
}
