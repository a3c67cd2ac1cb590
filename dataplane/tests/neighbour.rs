//! The neighbour sync against the real kernel (test side): two namespaces joined by a veth, the
//! sync running on A's end as on an uplink, B standing for a remote node.
//!
//! ```text
//!  [ns A] a 10.77.0.1 fd77::1 (the "uplink") ──veth── b 10.77.0.2 fd77::2 [ns B] (the "node")
//! ```
//!
//! What a user would see: ferry's tables hold B's MAC for B's underlay addresses, and the outer
//! header template of the routes to B's pods carries it, without ferry sending any ARP or ND; after
//! B's MAC changes, the tables and templates carry the new one within a bounded time, although
//! nothing else on A uses the neighbour (the kernel alone would keep the old MAC, STALE, and the
//! test checks that it does). Nodes behind a router are reached through the configured gateway and
//! never probed themselves; routing problems are reported.
//!
//! Needs root; without it the tests fail when `CI` is set and print SKIP otherwise. Everything runs
//! in namespaces the tests create, deleted by a guard even when a test panics.

mod xsk_util;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use ferry_dataplane::neighbour::{NeighbourError, NeighbourSync, PathIssue, ProbeMethod, SyncConfig, SyncReport};
use ferry_encap::{MacAddr, TunnelKind};
use ferry_tables::{DesiredState, RemoteNode, Route, Tables, Underlay};
use xsk_util::*;

const NEW_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x99];

fn remote(name: &str, underlay: IpAddr, cidr: &str) -> RemoteNode {
    RemoteNode {
        name: name.to_owned(),
        pod_cidrs: vec![cidr.parse().expect("cidr")],
        underlay,
        other_underlays: Vec::new(),
        vtep_mac: MacAddr([0x02, 0xee, 0, 0, 0, 1]),
        vni: 1,
        tunnel: TunnelKind::Vxlan,
        port: 4789,
    }
}

/// The next-hop MAC in the template of the route to `dst`, as a worker would read it.
fn template_mac(tables: &Tables, dst: &str) -> Option<MacAddr> {
    match tables.current().route(dst.parse().expect("ip")) {
        Route::Remote { template, .. } => Some(template.next_hop_mac()),
        _ => None,
    }
}

/// Shorter kernel neighbour timers on `dev` in `ns`, both families, so that an entry leaves
/// REACHABLE within 4.5 s and a failed re-verification takes under 2 s (defaults: 15-45 s, 5 s
/// and 3 s); the behaviour is the same, only faster. REACHABLE must outlast the delay before the
/// first probe (reachable is 0.5 to 1.5 times the base): shorter, and the kernel re-verifies an
/// unused entry in a loop instead of letting it go STALE.
fn fast_neighbour_timers(ns: &str, dev: &str) {
    for fam in ["ipv4", "ipv6"] {
        for (knob, value) in
            [("base_reachable_time_ms", "3000"), ("delay_first_probe_time", "1"), ("retrans_time_ms", "200")]
        {
            run_in(ns, &["sysctl", "-qw", &format!("net.{fam}.neigh.{dev}.{knob}={value}")]);
        }
    }
}

/// The kernel's entry for `addr` on `end`: its state and MAC as `ip neigh` prints them.
fn kernel_entry(end: &End, addr: IpAddr) -> String {
    run(&["ip", "-n", &end.ns, "neigh", "show", "to", &addr.to_string(), "dev", &end.name]).trim().to_owned()
}

/// Wait until `fd` is readable or `timeout` passed.
fn wait_readable(fd: Option<BorrowedFd<'_>>, timeout: Duration) {
    let Some(fd) = fd else {
        std::thread::sleep(timeout);
        return;
    };
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; the descriptor outlives the call.
    unsafe { libc::poll(&raw mut pfd, 1, timeout.as_millis() as i32) };
}

/// Sync until `done` holds or `limit` passed (bounded in time and in rounds), waiting for
/// notifications between rounds; the reports of every round.
fn sync_until(
    sync: &mut NeighbourSync,
    tables: &mut Tables,
    limit: Duration,
    done: impl Fn(&Tables) -> bool,
) -> (bool, Vec<SyncReport>) {
    let start = Instant::now();
    let mut reports = Vec::new();
    for _ in 0..10_000 {
        let now = Instant::now();
        reports.push(sync.sync(tables, now).expect("sync"));
        if done(tables) {
            return (true, reports);
        }
        if now.duration_since(start) > limit {
            break;
        }
        let wake = sync.next_sync(tables, Instant::now()).saturating_duration_since(Instant::now());
        wait_readable(sync.notification_fd(), wake.clamp(Duration::from_millis(1), Duration::from_millis(100)));
    }
    (false, reports)
}

fn learns_and_follows_a_mac_change(method: ProbeMethod) {
    let p = pair(1);
    fast_neighbour_timers(&p.a.ns, &p.a.name);
    let (b4, b6) = (IpAddr::V4(B4), IpAddr::V6(B6));
    let (old, new) = (MacAddr(p.b.mac), MacAddr(NEW_MAC));

    let underlay = Underlay::new(MacAddr(p.a.mac), Some(A4), Some(A6));
    let mut tables = Tables::new(underlay.clone(), Duration::from_secs(30));
    let desired = DesiredState {
        nodes: vec![remote("b4", b4, "10.244.2.0/24"), remote("b6", b6, "fd00:244:2::/64")],
        ..DesiredState::default()
    };
    let t0 = Instant::now();
    assert_eq!(tables.set_desired(desired, t0).expect("valid state").unresolved, 2);
    assert_eq!(template_mac(&tables, "10.244.2.5"), None, "unresolved before the sync");

    let config = SyncConfig { probe: method, ..SyncConfig::default() };
    let mut sync = {
        let _in_a = InNetns::enter(&p.a.ns);
        NeighbourSync::with_config(&p.a.name, &underlay, config).expect("sync on the uplink")
    };

    // B is resolved by A's kernel because the sync asked it to, and learned.
    let start = Instant::now();
    let resolved = |t: &Tables| {
        let now = Instant::now();
        t.neighbours().mac(b4, now).is_some() && t.neighbours().mac(b6, now).is_some()
    };
    let (ok, reports) = sync_until(&mut sync, &mut tables, Duration::from_secs(10), resolved);
    assert!(ok, "B not learned within 10 s: {reports:#?}");
    let took = start.elapsed();
    let probed: Vec<IpAddr> = reports.iter().flat_map(|r| r.probed.iter().copied()).collect();
    assert!(probed.contains(&b4) && probed.contains(&b6), "neither had an entry, both were probed: {probed:?}");
    assert!(reports.iter().all(|r| r.probe_failures.is_empty() && r.issues.is_empty()), "{reports:#?}");
    let now = Instant::now();
    assert_eq!(tables.neighbours().mac(b4, now), Some(old));
    assert_eq!(tables.neighbours().mac(b6, now), Some(old));
    assert_eq!(template_mac(&tables, "10.244.2.5"), Some(old), "IPv4 node's template");
    assert_eq!(template_mac(&tables, "fd00:244:2::5"), Some(old), "IPv6 node's template");
    assert!(kernel_entry(&p.a, b4).contains(&mac_str(p.b.mac)), "A's kernel: {}", kernel_entry(&p.a, b4));
    eprintln!("{method:?}: B learned {} us after the first sync", took.as_micros());

    // Left alone (nothing on A sends to B), A's kernel lets its entries go STALE...
    let stale = |what: &str| {
        let all_stale = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            [b4, b6].iter().all(|a| kernel_entry(&p.a, *a).contains("STALE"))
        });
        for addr in [b4, b6] {
            let e = kernel_entry(&p.a, addr);
            assert!(
                all_stale && e.contains(&mac_str(p.b.mac)),
                "{what}: A's kernel should hold the old MAC, STALE: {e}"
            );
        }
    };
    stale("before the change");
    // ...and when B's NIC is "replaced", it does not find out by itself: a STALE entry is only
    // re-verified when used, and ferry's traffic does not pass through A's kernel. (Two seconds
    // are longer than every shortened timer.)
    run(&["ip", "-n", &p.b.ns, "link", "set", "dev", &p.b.name, "address", &mac_str(NEW_MAC)]);
    let changed_at = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    stale("2 s after the change, without the sync");

    // With the sync running, the kernel re-verifies, finds the new MAC, and ferry's tables and
    // templates follow.
    let moved = |t: &Tables| {
        let now = Instant::now();
        t.neighbours().mac(b4, now) == Some(new) && t.neighbours().mac(b6, now) == Some(new)
    };
    let (ok, reports) = sync_until(&mut sync, &mut tables, Duration::from_secs(20), moved);
    assert!(
        ok,
        "new MAC not learned within 20 s: A's kernel: {} / {}; {reports:#?}",
        kernel_entry(&p.a, b4),
        kernel_entry(&p.a, b6)
    );
    let changes: Vec<_> = reports.iter().flat_map(|r| r.changed.iter().copied()).collect();
    for addr in [b4, b6] {
        assert!(
            changes.iter().any(|c| c.addr == addr && c.old == old && c.new == new),
            "{addr}: change reported: {changes:?}"
        );
    }
    assert!(reports.iter().any(|r| !r.publications.is_empty()), "the tables published the change");
    assert_eq!(template_mac(&tables, "10.244.2.5"), Some(new), "IPv4 node's template after the change");
    assert_eq!(template_mac(&tables, "fd00:244:2::5"), Some(new), "IPv6 node's template after the change");
    eprintln!("{method:?}: new MAC in ferry's templates {} ms after B's change", changed_at.elapsed().as_millis());
}

#[test]
fn netlink_probes_learn_b_and_follow_its_mac_change() {
    if !privileged("netlink_probes_learn_b_and_follow_its_mac_change") {
        return;
    }
    learns_and_follows_a_mac_change(ProbeMethod::Netlink);
}

#[test]
fn datagram_probes_learn_b_and_follow_its_mac_change() {
    if !privileged("datagram_probes_learn_b_and_follow_its_mac_change") {
        return;
    }
    learns_and_follows_a_mac_change(ProbeMethod::Datagram);
}

#[test]
fn nodes_behind_a_router_use_the_gateway_and_routing_problems_are_reported() {
    if !privileged("nodes_behind_a_router_use_the_gateway_and_routing_problems_are_reported") {
        return;
    }
    let p = pair(1);
    // C is behind B (the configured gateway); D behind 10.77.0.3, which is not the configured
    // gateway; E has no route at all.
    let (c, d, e) = (
        IpAddr::V4(Ipv4Addr::new(10, 99, 0, 5)),
        IpAddr::V4(Ipv4Addr::new(10, 98, 0, 7)),
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
    );
    let router2 = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 3));
    run(&["ip", "-n", &p.a.ns, "route", "add", "10.99.0.0/24", "via", &B4.to_string()]);
    run(&["ip", "-n", &p.a.ns, "route", "add", "10.98.0.0/24", "via", &router2.to_string()]);

    let mut underlay = Underlay::new(MacAddr(p.a.mac), Some(A4), Some(A6));
    underlay.gateway_v4 = Some(B4);
    let mut tables = Tables::new(underlay.clone(), Duration::from_secs(30));
    let desired = DesiredState {
        nodes: vec![
            remote("c", c, "10.244.3.0/24"),
            remote("d", d, "10.244.4.0/24"),
            remote("e", e, "10.244.5.0/24"),
            // An IPv6 node with no IPv6 gateway configured and no route: reported, never probed.
            remote("f", IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 6)), "fd00:244:6::/64"),
        ],
        ..DesiredState::default()
    };
    tables.set_desired(desired, Instant::now()).expect("valid state");
    let mut sync = {
        let _in_a = InNetns::enter(&p.a.ns);
        // B's interface is not in A's namespace: the error says so and what to do.
        let e = NeighbourSync::new(&p.b.name, &underlay).expect_err("not in this namespace");
        assert!(matches!(e, NeighbourError::NoInterface { .. }) && e.to_string().contains("no such interface"), "{e}");
        NeighbourSync::new(&p.a.name, &underlay).expect("sync on the uplink")
    };

    let (ok, reports) = sync_until(&mut sync, &mut tables, Duration::from_secs(10), |t| {
        t.neighbours().mac(IpAddr::V4(B4), Instant::now()).is_some()
    });
    assert!(ok, "gateway not learned within 10 s: {reports:#?}");
    assert_eq!(template_mac(&tables, "10.244.3.1"), Some(MacAddr(p.b.mac)), "C is reached through the gateway's MAC");

    // Another round of dumps: the nodes themselves are never probed, and no entry exists for them.
    let (_, more) = sync_until(&mut sync, &mut tables, Duration::from_millis(1500), |_| false);
    let all: Vec<&SyncReport> = reports.iter().chain(more.iter()).collect();
    let probed: Vec<IpAddr> = all.iter().flat_map(|r| r.probed.iter().copied()).collect();
    assert_eq!(probed, vec![IpAddr::V4(B4)], "only the gateway is probed, once");
    for node in [c, d, e] {
        assert_eq!(kernel_entry(&p.a, node), "", "A's kernel has no entry for node {node}");
    }
    let issues: Vec<&PathIssue> = all.iter().flat_map(|r| r.issues.iter()).collect();
    assert!(
        issues.contains(&&PathIssue::OtherGateway { node: d, via: router2, configured: IpAddr::V4(B4) }),
        "{issues:#?}"
    );
    assert!(issues.iter().any(|i| matches!(i, PathIssue::NoRoute { node, .. } if *node == e)), "{issues:#?}");
    assert_eq!(issues.len(), 3, "C is fine; D, E and F are reported once each (route cached): {issues:#?}");
    for i in &issues {
        eprintln!("reported: {i}");
    }
}
