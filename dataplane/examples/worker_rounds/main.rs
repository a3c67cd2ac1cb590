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

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_default();
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
    // Flow records on, as the agent's default (`scripts/worker-ir.sh --flows`).
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
