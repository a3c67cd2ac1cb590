//! Readers look up continuously while a writer publishes 1,000 snapshots: every answer must be the
//! one the snapshot the reader loaded gives, generations only move forward, nothing crashes, and
//! once the readers stop every snapshot but the current one is freed. Every 100 publications the
//! writer waits until each reader has seen the latest, so every reader sees at least ten
//! generations however the threads are scheduled.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferry_encap::{MacAddr, TunnelKind};
use ferry_tables::{DesiredState, LocalPod, PortId, RemoteNode, Route, Tables, Underlay};

const SNAPSHOTS: u64 = 1_000;
const READERS: usize = 2;
/// The writer waits for the readers every this many publications.
const CHECKPOINT: u64 = 100;

fn node(underlay: [u8; 4], cidr: String, vni: u32) -> RemoteNode {
    RemoteNode {
        name: format!("{underlay:?}"),
        pod_cidrs: vec![cidr.parse().expect("cidr")],
        underlay: IpAddr::from(underlay),
        other_underlays: Vec::new(),
        vtep_mac: MacAddr([2, 0, 0, 0, 0, 0xee]),
        vni,
        tunnel: TunnelKind::Vxlan,
        port: 4789,
    }
}

/// Snapshot `i`: node A owns 10/8 with VNI `i`; node B owns the moving /16 `10.(i % 250)/16`
/// with VNI 100000 + `i`; inside it, `10.(i % 250).1/24` is a blackhole; the pod at 10.200.0.1 and
/// fd00::1 sits on port `i % 50`.
fn state(i: u64) -> DesiredState {
    let x = i % 250;
    DesiredState {
        nodes: vec![
            node([192, 0, 2, 2], "10.0.0.0/8".to_owned(), i as u32),
            node([192, 0, 2, 3], format!("10.{x}.0.0/16"), 100_000 + i as u32),
        ],
        local_pods: vec![LocalPod {
            port: PortId((i % 50) as u16),
            mac: MacAddr([2, 0, 0, 0, 0, 0x33]),
            addrs: vec!["10.200.0.1".parse().expect("ip"), "fd00::1".parse().expect("ip")],
            source_only: vec![],
        }],
        blackholes: vec![format!("10.{x}.1.0/24").parse().expect("cidr")],
    }
}

/// What snapshot `i` must answer for `dst`, computed by hand from [`state`].
fn expected(i: u64, dst: IpAddr) -> (char, u64) {
    let x = (i % 250) as u8;
    match dst {
        IpAddr::V6(_) => ('L', i % 50),
        IpAddr::V4(a) => match a.octets() {
            [10, 200, 0, 1] => ('L', i % 50),
            [10, b, 1, _] if b == x => ('X', 0),
            [10, b, _, _] if b == x => ('R', 100_000 + i),
            [10, ..] => ('R', i),
            _ => ('N', 0),
        },
    }
}

fn answer(r: Route<'_>) -> (char, u64) {
    match r {
        Route::Local { port, .. } => ('L', u64::from(port.0)),
        Route::Remote { template, .. } => ('R', u64::from(template.vni())),
        Route::Blackhole => ('X', 0),
        Route::NoRoute => ('N', 0),
        Route::Unresolved { .. } => ('U', 0),
    }
}

#[test]
fn readers_only_ever_see_published_answers_and_old_snapshots_are_freed() {
    let t0 = Instant::now();
    let mut tables = Tables::new(
        Underlay::new(MacAddr([2, 0, 0, 0, 0, 1]), Some(Ipv4Addr::new(192, 0, 2, 1)), None),
        Duration::from_secs(3600),
    );
    // Static, so that every remote answer is a template (no Unresolved) in every snapshot.
    tables.set_static_neighbour("192.0.2.2".parse().expect("ip"), MacAddr([2, 0, 0, 0, 0, 2]), t0);
    tables.set_static_neighbour("192.0.2.3".parse().expect("ip"), MacAddr([2, 0, 0, 0, 0, 3]), t0);
    let first = Arc::downgrade(&tables.current());

    // Probes: a blackhole-or-B and a B-or-A address in every 8th /16, the pod, a miss.
    let mut v4: Vec<Ipv4Addr> =
        (0..250u8).step_by(8).flat_map(|b| [[10, b, 1, 5], [10, b, 2, 5]]).map(Ipv4Addr::from).collect();
    v4.extend([Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(10, 200, 1, 1), Ipv4Addr::new(11, 0, 0, 1)]);
    let v4 = Arc::new(v4);
    let stop = Arc::new(AtomicBool::new(false));
    // The last generation each reader checked.
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..READERS).map(|_| AtomicU64::new(0)).collect());

    let readers: Vec<_> = (0..READERS)
        .map(|n| {
            let mut reader = tables.reader();
            let (v4, stop, seen) = (Arc::clone(&v4), Arc::clone(&stop), Arc::clone(&seen));
            thread::spawn(move || {
                let (mut last, mut batches, mut generations) = (0, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let snapshot = reader.load();
                    let g = snapshot.generation();
                    assert!(g >= last, "reader {n}: generation went back from {last} to {g}");
                    generations += u64::from(g != last);
                    last = g;
                    if g == 0 {
                        assert_eq!(answer(snapshot.route_v4(v4[0])), ('N', 0), "the empty snapshot routes nothing");
                        continue;
                    }
                    // Routes borrow the snapshot, so the output lives no longer than this batch.
                    let mut out = [Route::NoRoute; 80];
                    snapshot.routes_v4(&v4, &mut out[..v4.len()]);
                    for (dst, r) in v4.iter().zip(&out) {
                        assert_eq!(answer(*r), expected(g, IpAddr::V4(*dst)), "reader {n}, generation {g}, {dst}");
                    }
                    let pod6: IpAddr = "fd00::1".parse().expect("ip");
                    assert_eq!(answer(snapshot.route(pod6)), expected(g, pod6), "reader {n}, generation {g}");
                    assert!(snapshot.source_allowed(PortId((g % 50) as u16), pod6));
                    batches += 1;
                    seen[n].store(g, Ordering::Release);
                }
                (batches, generations)
            })
        })
        .collect();

    let mut published = Vec::new();
    for i in 1..=SNAPSHOTS {
        let p = tables.set_desired(state(i), t0).expect("valid state");
        assert_eq!(p.generation, i);
        assert_eq!(p.unresolved, 0);
        published.push(Arc::downgrade(&tables.current()));
        // Each reader holds at most the one snapshot it loaded last: nothing piles up.
        assert!(tables.retired() <= READERS, "{} retired snapshots with {READERS} readers", tables.retired());
        if i % CHECKPOINT == 0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            // A reader that stopped early panicked: joining it below reports why.
            while seen.iter().any(|s| s.load(Ordering::Acquire) < i) && !readers.iter().any(|r| r.is_finished()) {
                assert!(Instant::now() < deadline, "a reader did not check generation {i} within 30 s");
                thread::yield_now();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (batches, generations) = r.join().expect("reader panicked");
        // Each checkpoint's generation, at least.
        assert!(generations >= SNAPSHOTS / CHECKPOINT, "reader saw {generations} generations in {batches} batches");
    }

    // Readers are gone (their Reader dropped with the thread): everything retired can go.
    tables.reclaim();
    assert_eq!(tables.retired(), 0);
    assert!(first.upgrade().is_none(), "the empty snapshot was freed");
    let alive: Vec<usize> =
        published.iter().enumerate().filter(|(_, w)| w.upgrade().is_some()).map(|(i, _)| i + 1).collect();
    assert_eq!(alive, vec![SNAPSHOTS as usize], "only the current snapshot is alive");
}
