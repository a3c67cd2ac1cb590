//! The Flannel-compatible etcd source against Debian's real etcd: leases added, malformed and
//! expiring; this node's own lease allocated, renewed, reused and released; etcd killed and
//! restarted mid-watch. Published through the production publisher into the data plane's tables,
//! read as a worker reads them.

mod common;

use std::time::{Duration, Instant};

use common::{Etcd, has, is_own, underlay, wait_for, wait_until};
use etcd_client::{Client, GetOptions, PutOptions};
use ferry_control::{ControlConfig, ControlPlane, EtcdConfig, SourceKind};
use ferry_encap::TunnelKind;
use ferry_tables::Route;

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

async fn own_lease(c: &mut Client) -> Vec<(String, i64)> {
    let resp = c.get(format!("{PREFIX}/subnets/"), Some(GetOptions::new().with_prefix())).await.expect("get");
    resp.kvs()
        .iter()
        .filter(|kv| String::from_utf8_lossy(kv.value()).contains(MY_IP))
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect()
}

/// An address in the subnet this node's lease holds (`.../subnets/10.7.2.0-24` -> `10.7.2.1`),
/// once it has one.
async fn own_subnet(c: &mut Client) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let [(key, _)] = own_lease(c).await.as_slice() {
            let net = key.rsplit('/').next().and_then(|k| k.split_once('-')).map(|(net, _)| net.to_owned());
            let net: std::net::Ipv4Addr = net.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("lease key {key}"));
            return std::net::Ipv4Addr::from(u32::from(net) + 1).to_string();
        }
        assert!(Instant::now() < deadline, "no lease for this node within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn etcd_leases_allocate_renew_expire_reject_and_release() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary("etcd_leases_allocate_renew_expire_reject_and_release") else { return };
    let etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#).await;
    put(&mut c, "subnets/10.5.1.0-24", &lease_value("192.0.2.1", "02:00:00:00:00:01")).await;
    put(&mut c, "subnets/10.5.3.0-24", &lease_value("192.0.2.3", "02:00:00:00:00:03")).await;

    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(config(&etcd, Duration::from_secs(3)), publisher).expect("starts");

    // Both foreign leases, plus our own: the first free subnet (10.5.2.0/24), delivered locally.
    let s = wait_for(&mut reader, WAIT, "leases and our own subnet", |s| {
        has(s, "10.5.1.9") && has(s, "10.5.3.9") && has(s, "10.5.2.9")
    })
    .await;
    assert_eq!(underlay(&s, "10.5.1.9"), Some("192.0.2.1".parse().expect("ip")));
    assert_eq!(underlay(&s, "10.5.3.9"), Some("192.0.2.3".parse().expect("ip")));
    assert!(is_own(&s, "10.5.2.9"), "own subnet is local delivery");
    let mine = own_lease(&mut c).await;
    assert_eq!(mine.len(), 1);
    assert!(mine[0].0.ends_with("/subnets/10.5.2.0-24") && mine[0].1 != 0, "{mine:?}");
    let route = s.route("10.5.1.9".parse().expect("ip"));
    let Route::Remote { template, vtep_mac } = route else { panic!("10.5.1.9 is not tunnelled: {route:?}") };
    assert_eq!(
        (template.kind(), template.vni(), template.dst_port(), vtep_mac.to_string()),
        (TunnelKind::Vxlan, 1, 8472, "02:00:00:00:00:01".to_owned()),
        "the tunnel Flannel's lease describes"
    );

    // A lease attached to a 2 s etcd lease that nobody renews: added, then expires -> removed.
    let lease = c.lease_grant(2, None).await.expect("grant").id();
    c.put(
        format!("{PREFIX}/subnets/10.5.4.0-24"),
        lease_value("192.0.2.4", "02:00:00:00:00:04"),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put");
    wait_for(&mut reader, WAIT, "the short lease", |s| underlay(s, "10.5.4.1").is_some()).await;
    wait_for(&mut reader, WAIT, "the short lease to expire", |s| !has(s, "10.5.4.1")).await;

    // Our own lease has a 3 s TTL; it is renewed, so it outlives it. Time passing is what this
    // checks: the key must be there throughout 4 s, a second more than the TTL.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(own_lease(&mut c).await.len(), 1, "own lease renewed past its TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(is_own(reader.load(), "10.5.2.9"));

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
    assert_eq!(underlay(reader.load(), "10.5.1.9"), Some("192.0.2.1".parse().expect("ip")), "last good state kept");

    // A good update again is taken, and it is the first publication since the bad leases: the
    // engine applied those (it counted them) before this update was even written.
    put(&mut c, "subnets/10.5.1.0-24", &lease_value("192.0.2.101", "02:00:00:00:00:01")).await;
    let s = wait_for(&mut reader, WAIT, "the good update", |s| {
        underlay(s, "10.5.1.9").is_some_and(|u| u.to_string() == "192.0.2.101")
    })
    .await;
    assert_eq!(s.generation(), generation + 1, "nothing published for bad data");
    // Deleting a lease removes its route.
    c.delete(format!("{PREFIX}/subnets/10.5.3.0-24"), None).await.expect("delete");
    wait_for(&mut reader, WAIT, "the delete", |s| !has(s, "10.5.3.9")).await;

    // Clean shutdown releases our lease.
    cp.shutdown();
    assert!(own_lease(&mut c).await.is_empty(), "own lease released on shutdown");
}

#[tokio::test]
async fn etcd_reuses_this_nodes_existing_lease() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary("etcd_reuses_this_nodes_existing_lease") else { return };
    let etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.6.0.0/16"}"#).await;
    put(&mut c, "subnets/10.6.77.0-24", &lease_value(MY_IP, "02:00:00:00:01:00")).await;
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(config(&etcd, Duration::from_secs(30)), publisher).expect("starts");
    wait_for(&mut reader, WAIT, "our reused subnet", |s| is_own(s, "10.6.77.1")).await;
    let mine = own_lease(&mut c).await;
    assert_eq!(mine.len(), 1, "no second allocation: {mine:?}");
    assert!(mine[0].1 != 0, "the reused key is now attached to our etcd lease");
    drop(cp);
}

/// Flannel's dual-stack layout (`EnableIPv6`, `IPv6Network`, keys `10.5.1.0-24&fd00:5:0:1::-64`):
/// a foreign dual-stack lease gives both its pod CIDRs, tunnelled to its PublicIP, and this node
/// takes a lease with both subnets (the IPv6 one paired index for index with the IPv4 one).
#[tokio::test]
async fn etcd_dual_stack_leases() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary("etcd_dual_stack_leases") else { return };
    let etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48"}"#).await;
    put(&mut c, "subnets/10.5.1.0-24&fd00:5:0:1::-64", &lease_value("192.0.2.1", "02:00:00:00:00:01")).await;
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(config(&etcd, Duration::from_secs(30)), publisher).expect("starts");
    let s = wait_for(&mut reader, WAIT, "both families of the foreign lease and our own", |s| {
        has(s, "10.5.1.9") && has(s, "fd00:5:0:1::9") && is_own(s, "10.5.2.9") && is_own(s, "fd00:5:0:2::9")
    })
    .await;
    let peer = Some("192.0.2.1".parse().expect("ip"));
    assert_eq!((underlay(&s, "10.5.1.9"), underlay(&s, "fd00:5:0:1::9")), (peer, peer), "both over PublicIP");
    let mine = own_lease(&mut c).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert!(mine[0].0.ends_with("/subnets/10.5.2.0-24&fd00:5:0:2::-64"), "Flannel's dual-stack key: {mine:?}");
    drop(cp);
}

#[tokio::test]
async fn etcd_killed_and_restarted_mid_watch() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary("etcd_killed_and_restarted_mid_watch") else { return };
    let mut etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.7.0.0/16"}"#).await;
    put(&mut c, "subnets/10.7.1.0-24", &lease_value("192.0.2.1", "02:00:00:00:00:01")).await;
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(config(&etcd, Duration::from_secs(30)), publisher).expect("starts");
    wait_for(&mut reader, WAIT, "initial sync", |s| has(s, "10.7.1.1")).await;
    let own = own_subnet(&mut c).await;
    wait_for(&mut reader, WAIT, "our own subnet", |s| is_own(s, &own)).await;
    let m = cp.metrics().clone();
    wait_until(WAIT, "source up", || m.source_up(SourceKind::Etcd) == Some(true)).await;

    etcd.kill();
    let (published, failed) = (m.publications(), m.reconnects(SourceKind::Etcd));
    wait_until(WAIT, "source down", || m.source_up(SourceKind::Etcd) == Some(false)).await;
    // Forwarding continues on the last tables, however often reconnecting fails. The lost session
    // and two failed reconnects are three sessions ended; an update sent in any but the last would
    // have waited at least one backoff delay (150 ms or more) before the last ended, while the
    // engine publishes within milliseconds of an update: nothing published means nothing sent.
    wait_until(WAIT, "two failed reconnects", || m.reconnects(SourceKind::Etcd) >= failed + 3).await;
    assert_eq!(m.publications(), published, "nothing published while etcd is down");
    let s = reader.load();
    assert!(underlay(s, "10.7.1.1").is_some() && is_own(s, &own), "the last tables stay");

    etcd.restart();
    let mut c = client(&etcd).await;
    wait_until(Duration::from_secs(30), "source up again", || m.source_up(SourceKind::Etcd) == Some(true)).await;
    put(&mut c, "subnets/10.7.9.0-24", &lease_value("192.0.2.9", "02:00:00:00:00:09")).await;
    c.delete(format!("{PREFIX}/subnets/10.7.1.0-24"), None).await.expect("delete");
    let s = wait_for(&mut reader, WAIT, "changes after the restart", |s| {
        underlay(s, "10.7.9.1").is_some() && !has(s, "10.7.1.1")
    })
    .await;
    assert!(is_own(&s, &own), "own lease kept");
    assert_eq!(own_lease(&mut c).await.len(), 1);
    drop(cp);
}

/// Issue 18: overlapping leases resolve by age (the key's create_revision), not by the order a
/// fresh list returns them in (sorted by key). The older lease, 10.8.1.128/25, sorts after the
/// younger 10.8.1.0/24, so a control plane that starts now hears of the younger first: it must
/// still give the older one its subnet, and the younger nothing, as an agent that watched both
/// being written does.
#[tokio::test]
async fn etcd_overlapping_leases_resolve_by_age_not_key_order() {
    common::init_tracing();
    let Some(bin) = common::etcd_binary("etcd_overlapping_leases_resolve_by_age_not_key_order") else { return };
    let etcd = Etcd::start(&bin);
    let mut c = client(&etcd).await;
    put(&mut c, "config", r#"{"Network":"10.8.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#).await;
    put(&mut c, "subnets/10.8.1.128-25", &lease_value("192.0.2.11", "02:00:00:00:00:11")).await;
    put(&mut c, "subnets/10.8.1.0-24", &lease_value("192.0.2.12", "02:00:00:00:00:12")).await;
    put(&mut c, "subnets/10.8.9.0-24", &lease_value("192.0.2.19", "02:00:00:00:00:19")).await;
    let mut cfg = config(&etcd, Duration::from_secs(30));
    if let Some(e) = cfg.etcd.as_mut() {
        e.take_lease = false;
    }
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher).expect("starts");
    // 10.8.9.0/24 overlaps nobody: once it is there, the whole list has been applied.
    let s = wait_for(&mut reader, WAIT, "the list applied", |s| has(s, "10.8.9.1")).await;
    assert_eq!(underlay(&s, "10.8.1.200"), Some("192.0.2.11".parse().expect("ip")), "the older lease keeps its /25");
    assert!(!has(&s, "10.8.1.5"), "the younger, overlapping lease installs nothing");
    assert_eq!(cp.metrics().rejected_total(SourceKind::Etcd, "key"), 1, "one warning for the loser");
    drop(cp);
}
