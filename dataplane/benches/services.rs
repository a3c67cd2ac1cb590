//! Services on the hot path and their compilation (criterion).
//!
//! - `maglev/compile_1000_backends`: compiling one service with 1,000 endpoints (a 65,537-slot
//!   Maglev table), the cost of an endpoint change to a large service.
//! - `maglev/pick`: one Maglev pick.
//! - `service_path/*`: what the service stage does per packet at 10,000 services, 100,000
//!   endpoints and 1,000,000 tracked connections (2,000,000 entries: both directions): the
//!   service match, a Maglev pick and the connection-tracking lookup (with the liveness check of
//!   the backend it names). `hot_64` cycles over 64 connections (one batch's worth, cache- and
//!   TLB-resident: the cost of the work itself); `hot_1k` over 1,024 connections of 1,024
//!   different services; `random_1m` over all of them (every lookup a cache and TLB miss: memory
//!   latency).
//!
//! Run: `cargo bench -p ferry-dataplane --bench services`. The figures are the bench thread's CPU
//! time (`ferry_testsupport::cputime`: this machine is shared); `FERRY_BENCH_WALL=1` measures
//! wall time instead.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::measurement::Measurement;
use criterion::{Criterion, Throughput};
use ferry_dataplane::conntrack::{Conntrack, Nat, Timeouts, Tuple, flags};
use ferry_tables::{Backend, EndpointSpec, Protocol, ServiceSpec, Services};

const SERVICES: u32 = 10_000;
const PER_SERVICE: u32 = 10;
const CONNECTIONS: u32 = 1_000_000;

fn vip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from_bits(0x0a60_0000 + i))
}

fn specs(services: u32, per: u32) -> Vec<ServiceSpec> {
    (0..services)
        .map(|s| ServiceSpec {
            name: format!("ns/svc{s}:http"),
            vip: vip(s),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: (0..per)
                .map(|e| EndpointSpec::ready(IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0000 + s * per + e)), 8080))
                .collect(),
            affinity: None,
            external: Default::default(),
            internal_local: false,
        })
        .collect()
}

/// A cheap deterministic sequence (xorshift) for flows.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
    let mut g = c.benchmark_group("maglev");
    let big = specs(1, 1000);
    g.bench_function("compile_1000_backends", |b| b.iter(|| Services::build(black_box(&big), 1).expect("builds")));
    let one = Services::build(&specs(1, 100), 1).expect("builds");
    let svc = one.iter().next().expect("one service");
    let mut h = 0x1234_5678u32;
    g.throughput(Throughput::Elements(1));
    g.bench_function("pick", |b| {
        b.iter(|| {
            h = h.wrapping_mul(0x9e37_79b9).wrapping_add(1);
            black_box(svc.pick(h))
        })
    });
    g.finish();

    let services = Services::build(&specs(SERVICES, PER_SERVICE), 1).expect("builds");
    let ct = Conntrack::new(4 * CONNECTIONS as usize, Timeouts::default());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut flows = Vec::with_capacity(CONNECTIONS as usize);
    for i in 0..CONNECTIONS {
        let r = xorshift(&mut seed);
        let s = (r % u64::from(SERVICES)) as u32;
        let t = Tuple {
            src: IpAddr::V4(Ipv4Addr::from_bits(0x0af5_0000 + (i >> 8))),
            dst: vip(s),
            sport: 1024 + (i & 0xff) as u16 * 200 + (r >> 32) as u16 % 200,
            dport: 80,
            proto: 6,
        };
        let svc = services.lookup(t.dst, 80, 6).expect("service");
        let b = svc.pick(r as u32).expect("backend");
        ct.insert(
            &Tuple { src: b.addr, dst: t.src, sport: b.port, dport: t.sport, proto: 6 },
            Nat { addr: t.dst, port: 80 },
            flags::REPLY,
            0,
        );
        ct.insert(&t, Nat { addr: b.addr, port: b.port }, flags::SEEN, 0);
        flows.push((t, r as u32));
    }
    eprintln!(
        "service_path: {} services, {} endpoints, {} connections ({} entries, {} evicted), {} bytes per entry",
        services.len(),
        SERVICES * PER_SERVICE,
        CONNECTIONS,
        ct.inserts(),
        ct.evictions(),
        Conntrack::entry_bytes()
    );
    let per_packet = |t: &Tuple, hash: u32| -> Option<Backend> {
        let svc = services.lookup(t.dst, t.dport, t.proto)?;
        let picked = svc.pick(hash);
        let hit = ct.lookup(t)?;
        let b = Backend { addr: hit.nat.addr, port: hit.nat.port };
        (svc.is_alive(b)).then_some(b).or(picked)
    };
    let mut g = c.benchmark_group("service_path");
    g.throughput(Throughput::Elements(1));
    let mut k = 0usize;
    g.bench_function("hot_64", |b| {
        b.iter(|| {
            k = (k + 1) & 63;
            let (t, h) = &flows[k * 15_601];
            black_box(per_packet(t, *h))
        })
    });
    g.bench_function("hot_1k", |b| {
        b.iter(|| {
            k = (k + 1) & 1023;
            let (t, h) = &flows[k * 977];
            black_box(per_packet(t, *h))
        })
    });
    let mut x = 0x2545_f491_4f6c_dd1du64;
    g.bench_function("random_1m", |b| {
        b.iter(|| {
            let i = (xorshift(&mut x) % u64::from(CONNECTIONS)) as usize;
            let (t, h) = &flows[i];
            black_box(per_packet(t, *h))
        })
    });
    g.finish();
}

fn config<M: Measurement>(c: Criterion<M>) -> Criterion<M> {
    c.sample_size(30)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
}

ferry_testsupport::bench_main!(config, bench);
