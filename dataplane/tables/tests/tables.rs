//! The tables as control and a worker use them: desired state in, snapshot answers out, neighbours
//! resolving, changing and aging.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferry_encap::{MacAddr, TunnelKind};
use ferry_tables::{BuildError, DesiredState, LocalPod, PortId, RemoteNode, Route, Snapshot, Tables, Underlay};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn mac(last: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, last])
}

fn node(name: &str, underlay: &str, cidrs: &[&str], vni: u32) -> RemoteNode {
    RemoteNode {
        name: name.to_owned(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
        underlay: ip(underlay),
        other_underlays: Vec::new(),
        vtep_mac: mac(0xee),
        vni,
        tunnel: TunnelKind::Vxlan,
        port: 4789,
    }
}

fn underlay() -> Underlay {
    let mut u = Underlay::new(mac(1), Some("192.0.2.1".parse().expect("v4")), Some("2001:db8::1".parse().expect("v6")));
    u.gateway_v4 = Some("192.0.2.254".parse().expect("v4"));
    u
}

fn desired() -> DesiredState {
    DesiredState {
        nodes: vec![
            node("b", "192.0.2.2", &["10.244.1.0/24", "fd00:10:0:1::/64"], 1),
            node("c", "198.51.100.3", &["10.244.2.0/24"], 1),
            node("d", "2001:db8::4", &["fd00:10:0:4::/64"], 7),
        ],
        local_pods: vec![
            LocalPod {
                port: PortId(3),
                mac: mac(0x33),
                addrs: vec![ip("10.244.0.5"), ip("fd00:10::5")],
                source_only: vec![],
            },
            LocalPod { port: PortId(4), mac: mac(0x44), addrs: vec![ip("10.244.0.6")], source_only: vec![] },
        ],
        blackholes: vec!["10.244.0.0/24".parse().expect("cidr"), "fd00:10::/64".parse().expect("cidr")],
    }
}

/// The remote route's VNI, template next-hop MAC and inner destination MAC, or a label.
fn describe(r: Route<'_>) -> String {
    match r {
        Route::Local { port, mac } => format!("local {} {mac}", port.0),
        Route::Remote { template, vtep_mac } => {
            format!(
                "remote {} vni {} via {} inner {vtep_mac}",
                template.remote(),
                template.vni(),
                template.next_hop_mac()
            )
        }
        Route::Unresolved { underlay } => format!("unresolved {underlay}"),
        Route::Blackhole => "blackhole".to_owned(),
        Route::NoRoute => "no route".to_owned(),
    }
}

fn at(s: &Snapshot, dst: &str) -> String {
    describe(s.route(ip(dst)))
}

#[test]
fn a_worker_sees_what_control_described() {
    let t0 = Instant::now();
    let mut tables = Tables::new(underlay(), Duration::from_secs(60));
    let mut reader = tables.reader();
    assert_eq!(reader.load().generation(), 0);
    assert_eq!(at(reader.load(), "10.244.1.9"), "no route");

    tables.set_static_neighbour(ip("192.0.2.2"), mac(0xb0), t0);
    let p = tables.set_desired(desired(), t0).expect("valid");
    // c is off-link and the gateway is unknown; d's underlay is IPv6 with no neighbour either.
    assert_eq!((p.generation, p.unresolved), (1, 2));

    let s = reader.load();
    assert_eq!(s.generation(), 1);
    assert_eq!(at(s, "10.244.1.9"), "remote 192.0.2.2 vni 1 via 02:00:00:00:00:b0 inner 02:00:00:00:00:ee");
    assert_eq!(at(s, "fd00:10:0:1::9"), "remote 192.0.2.2 vni 1 via 02:00:00:00:00:b0 inner 02:00:00:00:00:ee");
    assert_eq!(at(s, "10.244.2.1"), "unresolved 198.51.100.3");
    assert_eq!(at(s, "fd00:10:0:4::1"), "unresolved 2001:db8::4");
    assert_eq!(at(s, "10.244.0.5"), "local 3 02:00:00:00:00:33");
    assert_eq!(at(s, "fd00:10::5"), "local 3 02:00:00:00:00:33");
    assert_eq!(at(s, "10.244.0.7"), "blackhole", "own CIDR without a pod");
    assert_eq!(at(s, "10.245.0.1"), "no route");
    assert_eq!(s.local_pod(ip("10.244.0.6")), Some((PortId(4), mac(0x44))));
    assert_eq!(s.local_pod(ip("10.244.1.6")), None);

    // Anti-spoofing: each port only its own pod's addresses.
    assert!(s.source_allowed(PortId(3), ip("fd00:10::5")));
    assert!(!s.source_allowed(PortId(3), ip("10.244.0.6")));
    assert!(s.source_allowed(PortId(4), ip("10.244.0.6")));
    assert!(!s.source_allowed(PortId(5), ip("10.244.0.6")), "unknown port");
    assert!(s.is_known_node(ip("198.51.100.3")) && s.is_known_node(ip("2001:db8::4")));
    assert!(!s.is_known_node(ip("192.0.2.1")), "this node is not a remote node");

    // The batched lookups give the same answers as single ones.
    let dsts: Vec<_> = ["10.244.1.9", "10.244.0.5", "10.244.0.7", "1.1.1.1", "10.244.2.200"]
        .iter()
        .map(|s| s.parse().expect("v4"))
        .collect();
    let mut out = [Route::NoRoute; 5];
    s.routes_v4(&dsts, &mut out);
    for (d, r) in dsts.iter().zip(out) {
        assert_eq!(describe(r), describe(s.route_v4(*d)), "{d}");
    }
    let dsts6 = ["fd00:10::5".parse().expect("v6"), "fd00:10:0:1::1".parse().expect("v6")];
    let mut out6 = [Route::NoRoute; 2];
    s.routes_v6(&dsts6, &mut out6);
    assert_eq!(describe(out6[0]), "local 3 02:00:00:00:00:33");
    assert_eq!(describe(out6[1]), describe(s.route_v6(dsts6[1])));
}

#[test]
fn neighbours_resolve_change_and_age() {
    let t0 = Instant::now();
    let secs = |s| t0 + Duration::from_secs(s);
    let mut tables = Tables::new(underlay(), Duration::from_secs(60));
    let mut reader = tables.reader();
    tables.set_desired(desired(), t0).expect("valid");
    assert_eq!(at(reader.load(), "10.244.1.1"), "unresolved 192.0.2.2");

    // Learning an address no node uses publishes nothing.
    assert_eq!(tables.learn_neighbour(ip("192.0.2.77"), mac(0x77), t0), None);

    // The gateway resolves the off-link node c; b is learned directly.
    let p = tables.learn_neighbour(ip("192.0.2.254"), mac(0xfe), t0).expect("gateway is used");
    assert_eq!(p.unresolved, 1, "only d, reached over IPv6, which has no gateway");
    assert_eq!(
        at(reader.load(), "10.244.2.1"),
        "remote 198.51.100.3 vni 1 via 02:00:00:00:00:fe inner 02:00:00:00:00:ee"
    );
    // b has no entry of its own: it goes through the gateway too until it answers itself.
    assert_eq!(at(reader.load(), "10.244.1.1"), "remote 192.0.2.2 vni 1 via 02:00:00:00:00:fe inner 02:00:00:00:00:ee");
    tables.learn_neighbour(ip("192.0.2.2"), mac(0xb1), secs(10)).expect("published");
    assert_eq!(at(reader.load(), "10.244.1.1"), "remote 192.0.2.2 vni 1 via 02:00:00:00:00:b1 inner 02:00:00:00:00:ee");

    // Confirming the same MAC publishes nothing; a new MAC is visible at once.
    assert_eq!(tables.learn_neighbour(ip("192.0.2.2"), mac(0xb1), secs(20)), None);
    tables.learn_neighbour(ip("192.0.2.2"), mac(0xb2), secs(30)).expect("published");
    assert_eq!(at(reader.load(), "10.244.1.1"), "remote 192.0.2.2 vni 1 via 02:00:00:00:00:b2 inner 02:00:00:00:00:ee");

    // A static IPv6 neighbour for d; it never ages.
    tables.set_static_neighbour(ip("2001:db8::4"), mac(0xd4), secs(30)).expect("published");
    assert_eq!(tables.next_neighbour_expiry(), Some(secs(60)), "the gateway, learned at 0 s");

    // At 60 s the gateway ages out (b, confirmed at 30 s, stays until 90 s).
    let p = tables.expire_neighbours(secs(60)).expect("the gateway was in use");
    assert_eq!(p.unresolved, 1);
    let s = reader.load();
    assert_eq!(at(s, "10.244.2.1"), "unresolved 198.51.100.3");
    assert_eq!(at(s, "10.244.1.1"), "remote 192.0.2.2 vni 1 via 02:00:00:00:00:b2 inner 02:00:00:00:00:ee");
    let p = tables.expire_neighbours(secs(90)).expect("b aged out");
    assert_eq!(p.unresolved, 2);
    // Gateway and b gone, the static entry for d stays, a year on.
    assert_eq!(tables.expire_neighbours(secs(365 * 86_400)), None);
    assert_eq!(
        at(reader.load(), "fd00:10:0:4::1"),
        "remote 2001:db8::4 vni 7 via 02:00:00:00:00:d4 inner 02:00:00:00:00:ee"
    );
    tables.remove_static_neighbour(ip("2001:db8::4"), secs(365 * 86_400)).expect("d used it");
    assert_eq!(at(reader.load(), "fd00:10:0:4::1"), "unresolved 2001:db8::4");
}

#[test]
fn bad_desired_states_are_refused_and_the_old_one_stays() {
    let t0 = Instant::now();
    let mut tables = Tables::new(underlay(), Duration::from_secs(60));
    tables.set_desired(desired(), t0).expect("valid");
    let message = |d: DesiredState, tables: &mut Tables| tables.set_desired(d, t0).err().map(|e| e.to_string());

    let mut d = desired();
    d.nodes[1].pod_cidrs.push("10.244.1.0/24".parse().expect("cidr"));
    assert_eq!(
        message(d, &mut tables).as_deref(),
        Some("10.244.1.0/24 is claimed by both node b and node c; remove one of them")
    );

    let mut d = desired();
    d.local_pods[1].addrs.push(ip("10.244.0.5"));
    assert_eq!(
        message(d, &mut tables).as_deref(),
        Some("10.244.0.5/32 is claimed by both pod on port 3 and pod on port 4; remove one of them")
    );

    let mut d = desired();
    d.local_pods[1].port = PortId(3);
    assert!(matches!(tables.set_desired(d, t0), Err(BuildError::DuplicatePort { port: PortId(3), .. })));

    let mut d = desired();
    d.nodes[0].pod_cidrs = vec!["10.244.1.1/24".parse().expect("cidr")];
    let m = message(d, &mut tables).unwrap_or_default();
    assert!(m.starts_with("node b: prefix 10.244.1.1/24: 10.244.1.1/24 has bits set after the prefix length"), "{m}");

    let mut d = desired();
    d.nodes[0].vni = 1 << 24;
    assert_eq!(message(d, &mut tables).as_deref(), Some("node b: vni 16777216 does not fit in 24 bits (max 16777215)"));

    let mut v4_only =
        Tables::new(Underlay::new(mac(1), Some("192.0.2.1".parse().expect("v4")), None), Duration::from_secs(1));
    let m = message(desired(), &mut v4_only).unwrap_or_default();
    assert_eq!(
        m,
        "node d: its underlay address 2001:db8::4 is IPv6, but no IPv6 underlay address is configured for this node"
    );

    // None of those were published.
    assert_eq!(tables.current().generation(), 1);
    assert_eq!(tables.desired(), &desired());
    assert_eq!(at(&tables.current(), "10.244.1.1"), "unresolved 192.0.2.2");
}
