//! What readers see while the control thread publishes: the latency of every batch (load the
//! snapshot, look up 32 IPv4 destinations) on a reader pinned to one core, while the other core
//!
//! 1. is left alone (no writer),
//! 2. builds the same snapshots back to back into a second, unread `Tables` (the same CPU, cache
//!    and allocator load as publishing, but nothing reaches the reader), and
//! 3. publishes one-route changes back to back to the reader.
//!
//! The difference between 2 and 3 is what publication itself costs a reader; the difference
//! between 1 and 2 is sharing the machine with a busy control thread. Prints percentiles and the
//! maximum from an HDR histogram, plus the writer's publish times.
//!
//! `cargo bench --bench reader_latency` (FERRY_LATENCY_SECS sets each phase's length, default 5).
//! Each batch is timed with two `Instant::now()` calls (about 20-40 ns of the figure on this kind
//! of machine); the maximum includes whatever the OS does to the reader thread (preemption by
//! other processes on a shared machine, interrupts), which no table structure can remove.

mod common;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferry_encap::MacAddr;
use ferry_tables::{Route, Tables};
use hdrhistogram::Histogram;

const BATCH: usize = 32;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Pin the calling thread to `cores[i]` (wrapping), when the machine's cores are known.
/// `cores` must be listed before anything is pinned: a thread inherits its parent's affinity, and
/// the list only shows the cores the caller may run on.
fn pin(cores: &[core_affinity::CoreId], i: usize) {
    if let Some(id) = cores.get(i % cores.len().max(1)) {
        core_affinity::set_for_current(*id);
    }
}

fn line(h: &Histogram<u64>) -> String {
    format!(
        "p50 {} ns, p99 {} ns, p99.9 {} ns, p99.99 {} ns, max {} ns",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.value_at_quantile(0.9999),
        h.max()
    )
}

/// What the other core does while the reader runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Idle,
    BuildUnread,
    Publish,
}

impl Writer {
    fn describe(self) -> &'static str {
        match self {
            Writer::Idle => "no writer",
            Writer::BuildUnread => "writer building the same snapshots, unpublished",
            Writer::Publish => "writer publishing back to back",
        }
    }
}

fn run(nodes: usize, writer: Writer, length: Duration, cores: &[core_affinity::CoreId]) {
    let now = Instant::now();
    let (underlay, desired) = common::cluster(nodes, 110);
    let mut tables = Tables::new(underlay, Duration::from_secs(3600));
    tables.learn_neighbour(IpAddr::V4(common::GATEWAY), MacAddr([2, 0, 0, 0, 0, 0xfe]), now);
    tables.set_desired(desired.clone(), now).expect("valid");

    let routes: ferry_tables::lpm::RouteSet<Ipv4Addr> = desired
        .nodes
        .iter()
        .flat_map(|n| &n.pod_cidrs)
        .filter_map(|c| match c {
            ipnet::IpNet::V4(n) => ferry_tables::lpm::Prefix::try_from(*n).ok().map(|p| (p, 0)),
            ipnet::IpNet::V6(_) => None,
        })
        .collect();
    let addrs = Arc::new(common::addresses(&routes, 1 << 16, 7));
    let stop = Arc::new(AtomicBool::new(false));

    let mut reader = tables.reader();
    let reader_thread = {
        let (addrs, stop, cores) = (Arc::clone(&addrs), Arc::clone(&stop), cores.to_vec());
        thread::spawn(move || {
            pin(&cores, 1);
            let mut h = histogram();
            let (mut at, mut generations, mut last, mut remote) = (0, 0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let snapshot = reader.load();
                let mut out = [Route::NoRoute; BATCH];
                snapshot.routes_v4(&addrs[at..at + BATCH], &mut out);
                let elapsed = start.elapsed();
                remote += out.iter().filter(|r| matches!(r, Route::Remote { .. })).count() as u64;
                let g = snapshot.generation();
                generations += u64::from(g != last);
                last = g;
                black_box(&out);
                h.saturating_record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
                at = (at + BATCH) % addrs.len();
            }
            (h, generations, remote)
        })
    };

    pin(cores, 0);
    let mut publishes = histogram();
    // The same work as `tables` gets, for the build-only phase; no reader ever loads from it.
    let mut unread = Tables::new(common::cluster(0, 0).0, Duration::from_secs(3600));
    unread.learn_neighbour(IpAddr::V4(common::GATEWAY), MacAddr([2, 0, 0, 0, 0, 0xfe]), now);
    if writer == Writer::BuildUnread {
        // Warm its template cache, as `tables` is warm.
        unread.set_desired(desired.clone(), now).expect("valid");
    }
    let deadline = Instant::now() + length;
    let mut flip = false;
    while Instant::now() < deadline {
        if writer == Writer::Idle {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        flip = !flip;
        let d = common::with_change(&desired, flip);
        let start = Instant::now();
        let target = if writer == Writer::Publish { &mut tables } else { &mut unread };
        target.set_desired(d, now).expect("valid");
        publishes.saturating_record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    stop.store(true, Ordering::Relaxed);
    let (h, generations, remote) = reader_thread.join().expect("reader panicked");
    let batches = h.len();
    println!(
        "reader_latency {nodes} nodes, {}: {batches} batches of {BATCH} ({:.1}% remote), {generations} generations seen",
        writer.describe(),
        100.0 * remote as f64 / (batches as f64 * BATCH as f64),
    );
    println!("  per batch: {}", line(&h));
    if writer != Writer::Idle {
        println!(
            "  writer:    {} set_desired calls, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            publishes.len(),
            publishes.value_at_quantile(0.5) as f64 / 1e6,
            publishes.value_at_quantile(0.99) as f64 / 1e6,
            publishes.max() as f64 / 1e6
        );
    }
    tables.reclaim();
    println!("  retired snapshots left after the reader stopped: {}", tables.retired());
}

fn main() {
    let secs = std::env::var("FERRY_LATENCY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let length = Duration::from_secs(secs);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    println!("reader on core {:?}, writer on core {:?}", cores.get(1 % cores.len().max(1)), cores.first());
    for nodes in [5_000, 100_000] {
        for writer in [Writer::Idle, Writer::BuildUnread, Writer::Publish] {
            run(nodes, writer, length, &cores);
        }
    }
}
