//! The cost of moving a packet to the front of its UMEM frame before transmission (test side).
//!
//! xsk-rs transmits from the start of a frame's data segment, so `XskPort::send` moves a packet
//! that starts later (after decapsulation strips a 50-byte VXLAN/IPv4 outer header, say) to offset
//! 0 with `XskMem::move_to_front`. This test checks that the move keeps every byte, then times it
//! over real UMEM memory for 64- and 1500-byte packets at offsets 50 (VXLAN over IPv4) and 70
//! (over IPv6), cycling through a 64-frame batch the way a worker does, and prints nanoseconds per
//! packet. Timings mean something only in a release build:
//!
//! `cargo test --release -p ferry-dataplane --test xsk_memmove -- --nocapture`
//!
//! Needs root (registering a UMEM needs CAP_NET_RAW); without it the test fails when `CI` is set
//! and prints SKIP otherwise.

mod xsk_util;

use std::hint::black_box;
use std::time::Instant;

use ferry_dataplane::frame::{FrameId, FrameMem, HeapMem, Pkt};
use ferry_dataplane::port::xsk::{XskMem, XskMemConfig};
use xsk_util::privileged;

const BATCH: u32 = 64;
/// Rounds over the batch: enough for stable numbers in a release build, few in a debug build,
/// whose numbers mean nothing.
const ROUNDS: usize = if cfg!(debug_assertions) { 2_000 } else { 200_000 };

#[test]
fn move_to_front_keeps_bytes_and_its_cost_is_reported() {
    if !privileged("move_to_front_keeps_bytes_and_its_cost_is_reported") {
        return;
    }
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let mut heap = HeapMem::new(BATCH, mem.frame_size());
    let mut report = Vec::new();
    for len in [64u16, 1500] {
        for offset in [50u16, 70] {
            // Correctness: the packet's bytes arrive intact at offset 0.
            let id = FrameId(0);
            let pattern: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)).collect();
            let o = usize::from(offset);
            mem.frame_mut(id)[o..o + usize::from(len)].copy_from_slice(&pattern);
            let moved = mem.move_to_front(Pkt { frame: id, offset, len });
            assert_eq!(moved, Pkt { frame: id, offset: 0, len });
            assert_eq!(mem.bytes(moved), &pattern[..], "bytes changed moving {len} bytes from offset {offset}");

            // Cost: one move per packet over a batch of frames, repeated. Moving again from the same
            // offset copies the same amount of memory, so the frames need no restoring.
            let pkts: Vec<Pkt> = (0..BATCH).map(|f| Pkt { frame: FrameId(f), offset, len }).collect();
            for p in &pkts {
                mem.move_to_front(*p);
            }
            let start = Instant::now();
            for _ in 0..ROUNDS {
                for p in &pkts {
                    black_box(mem.move_to_front(black_box(*p)));
                }
            }
            let ns = start.elapsed().as_nanos() as f64 / (ROUNDS as f64 * f64::from(BATCH));

            // Baseline: the same copy in plain heap frames, without the UMEM descriptor lookup.
            let start = Instant::now();
            for _ in 0..ROUNDS {
                for p in &pkts {
                    let p = black_box(*p);
                    heap.frame_mut(p.frame).copy_within(p.range(), 0);
                }
            }
            let base = start.elapsed().as_nanos() as f64 / (ROUNDS as f64 * f64::from(BATCH));
            report.push(format!(
                "move_to_front {len:>4} bytes from offset {offset}: {ns:6.1} ns/packet (plain copy_within on heap \
                 frames: {base:5.1} ns)"
            ));
        }
    }
    let zero = mem.move_to_front(Pkt { frame: FrameId(1), offset: 0, len: 64 });
    assert_eq!(zero.offset, 0, "a packet at offset 0 is left alone");
    let build = if cfg!(debug_assertions) { "debug build: timings are not meaningful" } else { "release build" };
    println!("{build}\n{}", report.join("\n"));
}
