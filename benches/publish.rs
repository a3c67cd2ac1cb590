//! Publication cost on the control thread: one changed route at 5,000 nodes (one /24 each) and at
//! 100,000 prefixes, a neighbour MAC change under every node, and the LPM builds the choice of
//! structure rests on. No readers run here; `benches/reader_latency.rs` measures what readers see
//! while this happens continuously.
//!
//! `cargo bench --bench publish`

mod common;

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion};
use ferry_encap::MacAddr;
use ferry_tables::lpm::{Dir248, Lpm, Poptrie};
use ferry_tables::{Route, Tables};

fn publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    let now = Instant::now();
    for nodes in [5_000, 100_000] {
        let (underlay, desired) = common::cluster(nodes, 110);
        let mut tables = Tables::new(underlay, Duration::from_secs(3600));
        tables.learn_neighbour(IpAddr::V4(common::GATEWAY), MacAddr([2, 0, 0, 0, 0, 0xfe]), now);
        tables.set_desired(desired.clone(), now).expect("valid");
        assert!(matches!(tables.current().route("10.0.0.1".parse().expect("ip")), Route::Remote { .. }));

        // A whole publication after one route changed: validate, rebuild both LPMs, port and node
        // tables, next hops (templates reused), swap, and free the previous snapshot.
        let mut flip = false;
        group.bench_function(BenchmarkId::new("one_route_changed", format!("{nodes}_nodes")), |b| {
            b.iter_batched(
                || {
                    flip = !flip;
                    common::with_change(&desired, flip)
                },
                |d| black_box(tables.set_desired(d, now).expect("valid")),
                BatchSize::LargeInput,
            );
        });

        // The gateway's MAC changes: every node's template is rebuilt, the LPMs are shared.
        let mut last = 0u8;
        group.bench_function(BenchmarkId::new("gateway_mac_changed", format!("{nodes}_nodes")), |b| {
            b.iter(|| {
                last = last.wrapping_add(1);
                let p = tables.learn_neighbour(IpAddr::V4(common::GATEWAY), MacAddr([2, 0, 0, 0, 1, last]), now);
                black_box(p.expect("every node uses the gateway"))
            });
        });
    }
    group.finish();

    // What a worker pays per batch through the snapshot (LPM, then next hop), next to the bare LPM
    // on the same addresses: the difference is the next-hop step.
    let mut group = c.benchmark_group("route");
    group.throughput(criterion::Throughput::Elements(32));
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    for nodes in [5_000, 100_000] {
        let (underlay, desired) = common::cluster(nodes, 110);
        let mut tables = Tables::new(underlay, Duration::from_secs(3600));
        tables.learn_neighbour(IpAddr::V4(common::GATEWAY), MacAddr([2, 0, 0, 0, 0, 0xfe]), now);
        tables.set_desired(desired, now).expect("valid");
        let set = common::v4_set(common::Shape::Realistic, nodes, 4);
        let addrs = common::addresses(&set, 1 << 16, 7);
        let lpm = Poptrie::<std::net::Ipv4Addr>::build(&set).expect("build");
        let snapshot = tables.current();
        let mut at = 0;
        group.bench_function(BenchmarkId::new("snapshot_routes_v4", format!("{nodes}_nodes")), |b| {
            b.iter(|| {
                let mut out = [Route::NoRoute; 32];
                snapshot.routes_v4(black_box(&addrs[at..at + 32]), &mut out);
                at = (at + 32) % addrs.len();
                black_box(out);
            });
        });
        let mut reader = tables.reader();
        group.bench_function(BenchmarkId::new("reader_load_and_routes_v4", format!("{nodes}_nodes")), |b| {
            b.iter(|| {
                let snapshot = reader.load();
                let mut out = [Route::NoRoute; 32];
                snapshot.routes_v4(black_box(&addrs[at..at + 32]), &mut out);
                at = (at + 32) % addrs.len();
                black_box(out);
            });
        });
        group.bench_function(BenchmarkId::new("lpm_only", format!("{nodes}_nodes")), |b| {
            b.iter(|| {
                let mut out = [None; 32];
                lpm.lookup_batch(black_box(&addrs[at..at + 32]), &mut out);
                at = (at + 32) % addrs.len();
                black_box(out);
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("lpm_build");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
    for size in [5_000, 100_000] {
        let set = common::v4_set(common::Shape::Realistic, size, 4);
        group.bench_function(BenchmarkId::new("poptrie18", size), |b| {
            b.iter(|| black_box(Poptrie::<std::net::Ipv4Addr, 18>::build(&set).expect("build")));
        });
        group.bench_function(BenchmarkId::new("dir-24-8", size), |b| {
            b.iter(|| black_box(Dir248::build(&set).expect("build")));
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().without_plots().configure_from_args();
    publish(&mut c);
    c.final_summary();
}
