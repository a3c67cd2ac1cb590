//! The whole worker loop over in-memory ports: pod -> remote node (classify, anti-spoofing, TTL,
//! route, encap) and remote node -> pod (decap, known-node check, route, checksum completion),
//! 64-byte and 1464-byte frames (the pod MTU's largest), 64 per iteration.
//!
//! Each iteration copies 64 frames into the receive ring (as the kernel does in copy mode), runs one
//! worker iteration, and takes the transmitted frames out; the copies are part of the figure.
//!
//! Each case runs twice: flows off (`..._B`) and with the worker's flow records on
//! (`..._B_flows`: a 4096-slot table, `dataplane.flow_slots`' default); the difference per packet is what
//! recording costs. The 64 frames of a batch are 64 flows.
//!
//! Run: `cargo bench --bench worker`. The fixture is shared with the `worker_rounds` example, which
//! counts the same loop's instructions per packet (`scripts/worker-ir.sh`).

#[path = "../dataplane/examples/worker_rounds/setup.rs"]
mod setup;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_dataplane::worker::BATCH;
use setup::{MAX_FRAME, POD_PORT, UPLINK, from_remote, round, setup, to_remote};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker");
    g.throughput(Throughput::Elements(BATCH as u64));

    // 64-byte frames, and the largest the pod MTU allows (where moving a packet costs most).
    for (size, flows) in [(64, false), (64, true), (MAX_FRAME, false), (MAX_FRAME, true)] {
        let suffix = if flows { "_flows" } else { "" };
        let with_flows = |(w, fib): (ferry_dataplane::worker::Worker<_>, _)| {
            (if flows { w.with_flows(ferry_dataplane::flows::DEFAULT_SLOTS, 1 << 16, 0) } else { w }, fib)
        };
        let (mut w, fib) = with_flows(setup());
        let frames = to_remote(size);
        w.poll_once(&*fib);
        assert_eq!(round(&mut w, &fib, &frames, POD_PORT, UPLINK), BATCH, "every frame encapsulated");
        if flows {
            w.publish();
            assert_eq!(w.flow_export().expect("flows on").records.len(), BATCH, "one record per flow");
        }
        g.bench_function(format!("pod_to_remote_encap_{size}B{suffix}"), |b| {
            b.iter(|| round(&mut w, &fib, &frames, POD_PORT, UPLINK))
        });

        let (mut w, fib) = with_flows(setup());
        let frames = from_remote(size);
        w.poll_once(&*fib);
        assert_eq!(round(&mut w, &fib, &frames, UPLINK, POD_PORT), BATCH, "every frame delivered");
        g.bench_function(format!("remote_to_pod_decap_{size}B{suffix}"), |b| {
            b.iter(|| round(&mut w, &fib, &frames, UPLINK, POD_PORT))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
