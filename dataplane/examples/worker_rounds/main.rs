//! A fixed number of worker rounds over in-memory ports, for counting instructions with callgrind
//! (stable on a shared machine, where times are not). The fixture is the worker bench's
//! (`benches/worker.rs`): each round injects 64 UDP frames (64 bytes, or the size given; for decap
//! the inner frame's size), runs one worker iteration and takes the transmitted frames out.
//!
//! `scripts/worker-ir.sh` runs it under `valgrind --tool=callgrind` at two round counts and divides
//! the difference by the packets, so set-up and start-up cancel out. By hand:
//!
//! `cargo build --profile bench -p ferry-dataplane --example worker_rounds` then
//! `valgrind --tool=callgrind target/release/examples/worker_rounds encap 1000 [FRAME_BYTES]`
//! (with `WORKER_FLOWS=1` in the environment: flow records on).

mod setup;

use ferry_dataplane::worker::BATCH;

/// The calling thread's CPU time in nanoseconds: unlike wall time, not the time it waited for a
/// core on a loaded machine.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `worker_rounds flows-ab encap|decap ROUNDS`: CPU time per packet with flow records off and on
/// (the thread's, so time spent waiting for a core on a shared machine is not counted), two
/// workers measured alternately in 40 pairs of slices of ROUNDS rounds each (which goes first
/// alternating), so that what other tasks do to the caches hits both alike. Prints the medians of
/// each side and the median and quartiles of the 40 pairs' differences: the recording's cost.
///
/// `flows-ab-churn` is the same with 16,384 flows (four times the table's slots) taken 64 at a
/// time in turn: almost every packet is a new flow in its slot and evicts another, whose record is
/// exported, as under a flood of short flows.
fn flows_ab(dir: &str, rounds: usize, flows: u16) {
    const PAIRS: usize = 40;
    let (frames, inp, outp) = match dir {
        "encap" => (setup::to_remote_flows(64, flows), setup::POD_PORT, setup::UPLINK),
        _ => (setup::from_remote_flows(64, flows), setup::UPLINK, setup::POD_PORT),
    };
    let batches: Vec<&[Vec<u8>]> = frames.chunks(BATCH).collect();
    let (mut off, fib) = setup::setup();
    let (on, _) = setup::setup();
    let mut on = on.with_flows(ferry_dataplane::flows::DEFAULT_SLOTS, 1 << 16, 0);
    let export = on.flow_export();
    let (mut t_off, mut t_on, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..PAIRS {
        let slice = |w: &mut ferry_dataplane::worker::Worker<_>| {
            let start = thread_cpu_ns();
            for r in 0..rounds {
                setup::round(w, &fib, batches[r % batches.len()], inp, outp);
            }
            (thread_cpu_ns() - start) as f64 / (rounds * BATCH) as f64
        };
        let (a, b) = if pair % 2 == 0 {
            let a = slice(&mut off);
            (a, slice(&mut on))
        } else {
            let b = slice(&mut on);
            (slice(&mut off), b)
        };
        t_off.push(a);
        t_on.push(b);
        diff.push(b - a);
        // What the agent would do: take the exported records.
        if let Some(e) = &export {
            while e.records.pop().is_some() {}
        }
    }
    let sorted = |v: &mut Vec<f64>| v.sort_by(f64::total_cmp);
    for v in [&mut t_off, &mut t_on, &mut diff] {
        sorted(v);
    }
    let q = |v: &[f64], k: usize| v[(v.len() - 1) * k / 4];
    println!(
        "{dir} 64 B, {flows} flows: flows off {:.1} ns/packet, on {:.1} ns/packet (CPU time, medians), recording {:.1} ns/packet \
         (median of {PAIRS} pairs; quartiles {:.1} to {:.1})",
        q(&t_off, 2),
        q(&t_on, 2),
        q(&diff, 2),
        q(&diff, 1),
        q(&diff, 3),
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_default();
    if dir == "flows-ab" || dir == "flows-ab-churn" {
        let d = args.next().unwrap_or_default();
        let rounds = args.next().and_then(|r| r.parse().ok()).unwrap_or(2000);
        flows_ab(&d, rounds, if dir == "flows-ab" { BATCH as u16 } else { 16_384 });
        return;
    }
    let rounds: usize = match args.next().map(|r| r.parse()) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("usage: worker_rounds encap|decap ROUNDS [FRAME_BYTES]");
            std::process::exit(2);
        }
    };
    let size = match args.next().map(|s| s.parse::<usize>()) {
        None => 64,
        Some(Ok(n)) if (64..=setup::MAX_FRAME).contains(&n) => n,
        Some(_) => {
            eprintln!("frame size is 64 to {} bytes", setup::MAX_FRAME);
            std::process::exit(2);
        }
    };
    let (frames, inp, outp) = match dir.as_str() {
        "encap" => (setup::to_remote(size), setup::POD_PORT, setup::UPLINK),
        "decap" => (setup::from_remote(size), setup::UPLINK, setup::POD_PORT),
        other => {
            eprintln!("direction is encap or decap, not {other:?}");
            std::process::exit(2);
        }
    };
    let (mut w, fib) = setup::setup();
    // The agent's binary also holds the simulation's copy of the stages (`ferry trace`): a second
    // caller of what the compiler otherwise inlines into the worker loop. This binary holds that
    // copy too (run only with WORKER_TRACE_COPY set), so that it is compiled as the agent's is.
    if std::env::var_os("WORKER_TRACE_COPY").is_some() {
        let mut p = ferry_dataplane::pipeline::Pipeline::for_trace(ferry_testsupport::node::TestNode::new(1).config());
        let role = if inp == setup::UPLINK {
            ferry_dataplane::pipeline::PortRole::Uplink
        } else {
            ferry_dataplane::pipeline::PortRole::Pod
        };
        let port = ferry_dataplane::pipeline::PortId(inp as u16);
        let _ = ferry_dataplane::trace::run(&mut p, &*fib, port, role, &frames[0]);
    }
    // Flow records on (`scripts/worker-ir.sh --flows`).
    let flows = std::env::var_os("WORKER_FLOWS").is_some();
    if flows {
        w = w.with_flows(ferry_dataplane::flows::DEFAULT_SLOTS, 1 << 16, 0);
    }
    w.poll_once(&*fib);
    let mut sent = 0;
    for _ in 0..rounds {
        sent += setup::round(&mut w, &fib, &frames, inp, outp);
    }
    if sent != rounds * BATCH {
        eprintln!("{dir}: {sent} of {} packets forwarded", rounds * BATCH);
        std::process::exit(1);
    }
    println!("{dir}: {rounds} rounds, {sent} packets of {size} bytes{}", if flows { ", flows on" } else { "" });
}
