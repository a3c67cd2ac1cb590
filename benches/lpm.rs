//! LPM candidates against `ip_network_table` (treebitmap) and a linear scan, in one run.
//!
//! Every table size, shape and family builds each candidate once (outside the timing), checks
//! that they all agree with `ip_network_table` on a sample, prints the heap bytes per prefix each
//! one holds (counted by this binary's allocator), then times batches of 32 lookups over 64Ki
//! precomputed addresses. Figures are per batch; criterion's throughput line gives lookups/s.
//!
//! `cargo bench --bench lpm` (all of it, a few minutes), or filter: `cargo bench --bench lpm -- v4/random`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{SIZES, Shape};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use ferry_tables::lpm::{Address, Dir248, Lpm, NaiveLpm, Poptrie, RouteSet};
use ip_network::{IpNetwork, Ipv4Network, Ipv6Network};
use ip_network_table::IpNetworkTable;

/// Counts live heap bytes so that each structure's size can be reported the same way, including
/// the crate's, whose internals we cannot ask.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BATCH: usize = 32;
const ADDRESSES: usize = 1 << 16;

/// `ip_network_table` behind the same trait as the candidates.
struct Treebitmap(IpNetworkTable<u32>);

impl<A: Address + Into<IpAddr>> Lpm<A> for Treebitmap {
    fn lookup(&self, addr: A) -> Option<u32> {
        // The family-specific calls skip the crate's IpAddr match; use them as a user would.
        match addr.into() {
            IpAddr::V4(a) => self.0.longest_match_ipv4(a).map(|(_, v)| *v),
            IpAddr::V6(a) => self.0.longest_match_ipv6(a).map(|(_, v)| *v),
        }
    }
    fn heap_bytes(&self) -> usize {
        0
    }
}

fn treebitmap<A: Address + Into<IpAddr>>(set: &RouteSet<A>) -> Treebitmap {
    let mut t = IpNetworkTable::new();
    for (p, v) in set.iter() {
        let net = match p.addr().into() {
            IpAddr::V4(a) => IpNetwork::V4(Ipv4Network::new(a, p.prefix_len()).expect("canonical")),
            IpAddr::V6(a) => IpNetwork::V6(Ipv6Network::new(a, p.prefix_len()).expect("canonical")),
        };
        t.insert(net, v);
    }
    Treebitmap(t)
}

/// One built candidate: name, structure, heap bytes, build time.
struct Candidate<A> {
    name: &'static str,
    lpm: Box<dyn Lpm<A>>,
    bytes: usize,
    build: Duration,
}

fn measure<A: Address, L: Lpm<A> + 'static>(name: &'static str, build: impl FnOnce() -> L) -> Candidate<A> {
    let before = LIVE.load(Ordering::Relaxed);
    let start = Instant::now();
    let lpm = build();
    let build = start.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    Candidate { name, lpm: Box::new(lpm), bytes, build }
}

fn run<A: Address + Into<IpAddr>>(
    c: &mut Criterion,
    family: &str,
    shape: Shape,
    set_for: impl Fn(usize) -> RouteSet<A>,
    candidates: impl Fn(&RouteSet<A>) -> Vec<Candidate<A>>,
) {
    let mut group = c.benchmark_group(format!("lpm/{family}/{}", shape.name()));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_millis(1000));
    for size in SIZES {
        let set = set_for(size);
        let addrs = common::addresses(&set, ADDRESSES, size as u64);
        let mut all = candidates(&set);
        all.push(measure("ip_network_table", || treebitmap(&set)));
        all.push(measure("naive", || NaiveLpm::build(&set)));
        // A benchmark of a wrong answer is worthless: every candidate must agree with the crate.
        let reference = all.iter().find(|c| c.name == "ip_network_table").map(|c| &c.lpm).expect("present");
        for a in addrs.iter().take(256) {
            let want = reference.lookup(*a);
            for cand in &all {
                assert_eq!(
                    cand.lpm.lookup(*a),
                    want,
                    "{} disagrees on {a} ({family} {} {size})",
                    cand.name,
                    shape.name()
                );
            }
        }
        for cand in &all {
            println!(
                "memory lpm/{family}/{}/{}/{size}: {} bytes, {:.1} bytes/prefix, built in {:.1} ms",
                shape.name(),
                cand.name,
                cand.bytes,
                cand.bytes as f64 / size as f64,
                cand.build.as_secs_f64() * 1e3,
            );
        }
        for cand in &all {
            // The linear scan takes milliseconds per batch at 100k and more: a few flat samples
            // say all there is to say about it, and keep the run to minutes.
            if cand.name == "naive" {
                group.sampling_mode(SamplingMode::Flat).sample_size(10);
            } else {
                group.sampling_mode(SamplingMode::Auto).sample_size(20);
            }
            let mut out = [None; BATCH];
            let mut at = 0;
            group.bench_with_input(BenchmarkId::new(cand.name, size), &addrs, |b, addrs| {
                b.iter(|| {
                    cand.lpm.lookup_batch(black_box(&addrs[at..at + BATCH]), &mut out);
                    at = (at + BATCH) % ADDRESSES;
                    black_box(&out);
                });
            });
        }
    }
    group.finish();
}

fn v4_candidates(set: &RouteSet<Ipv4Addr>) -> Vec<Candidate<Ipv4Addr>> {
    vec![
        measure("poptrie18", || Poptrie::<Ipv4Addr, 18>::build(set).expect("build")),
        // The walk `poptrie18` picks by size, forced each way, to show the choice in the same run.
        measure("poptrie18-serial", || {
            Poptrie::<Ipv4Addr, 18>::build(set).expect("build").with_interleaved_batches(false)
        }),
        measure("poptrie18-interleaved", || {
            Poptrie::<Ipv4Addr, 18>::build(set).expect("build").with_interleaved_batches(true)
        }),
        measure("poptrie16", || Poptrie::<Ipv4Addr, 16>::build(set).expect("build")),
        measure("dir-24-8", || Dir248::build(set).expect("build")),
    ]
}

fn v6_candidates(set: &RouteSet<Ipv6Addr>) -> Vec<Candidate<Ipv6Addr>> {
    vec![
        measure("poptrie18", || Poptrie::<Ipv6Addr, 18>::build(set).expect("build")),
        // The walk `poptrie18` picks by size, forced each way, to show the choice in the same run.
        measure("poptrie18-serial", || {
            Poptrie::<Ipv6Addr, 18>::build(set).expect("build").with_interleaved_batches(false)
        }),
        measure("poptrie18-interleaved", || {
            Poptrie::<Ipv6Addr, 18>::build(set).expect("build").with_interleaved_batches(true)
        }),
        measure("poptrie16", || Poptrie::<Ipv6Addr, 16>::build(set).expect("build")),
    ]
}

fn main() {
    // Plots take longer than the measurements; the figures are in the terminal and in
    // target/criterion/*/new/estimates.json.
    let mut c = Criterion::default().without_plots().configure_from_args();
    for shape in [Shape::Realistic, Shape::Random] {
        run(&mut c, "v4", shape, |n| common::v4_set(shape, n, 4), v4_candidates);
        run(&mut c, "v6", shape, |n| common::v6_set(shape, n, 6), v6_candidates);
    }
    c.final_summary();
}
