//! Runs one segmentation or coalescing operation of the `gso` bench a given number of times, for
//! instruction counts under callgrind (stable on a shared machine where times are not). The
//! difference between two round counts, divided by the segments between them, is the cost per
//! segment with start-up cancelled out:
//!
//! ```sh
//! cargo build --profile bench -p ferry-encap --example gso_rounds
//! for r in 20 120; do
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$r target/release/examples/gso_rounds segment $r
//! done
//! ```
//!
//! (Ir at 120 rounds minus Ir at 20, divided by 100 x 47 segments.)
//!
//! Operations: `segment` (complete checksums), `partial`, `encapsulated`, `udp_gso`, `coalesce`.

use std::hint::black_box;

use ferry_encap::gro::{self, Coalescer, Output};
use ferry_encap::gso::{Checksum, Segmenter, UDP_GSO_MAX_PAYLOAD};

mod fixture;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(op), Some(rounds)) = (args.get(1), args.get(2).and_then(|r| r.parse::<usize>().ok())) else {
        eprintln!("usage: gso_rounds segment|partial|encapsulated|udp_gso|coalesce ROUNDS");
        std::process::exit(2);
    };
    let (sp, vnet) = fixture::super_packet();
    let tpl = fixture::template();
    let seg = Segmenter::new(&sp, &vnet).expect("valid");
    let mut bufs = vec![[0u8; 2048]; seg.segments()];
    let mut batch = vec![0u8; UDP_GSO_MAX_PAYLOAD];
    let segments: Vec<Vec<u8>> = (0..seg.segments())
        .map(|i| {
            let mut b = vec![0u8; 2048];
            let n = seg.write_segment(i, &mut b, Checksum::Complete).expect("fits");
            b.truncate(n);
            b
        })
        .collect();
    let mut co = Coalescer::new(vec![0u8; gro::storage_len(8)]).expect("storage");
    for _ in 0..rounds {
        let s = Segmenter::new(black_box(&sp), &vnet).expect("valid");
        match op.as_str() {
            "segment" | "partial" => {
                let mode = if op == "segment" { Checksum::Complete } else { Checksum::Partial };
                for (i, b) in bufs.iter_mut().enumerate() {
                    black_box(s.write_segment(i, b, mode)).expect("fits");
                }
            }
            "encapsulated" => {
                for (i, b) in bufs.iter_mut().enumerate() {
                    black_box(s.write_encapsulated(i, &tpl, b)).expect("fits");
                }
            }
            "udp_gso" => {
                let mut next = 0;
                while next < s.segments() {
                    next = black_box(s.write_udp_gso(&tpl, next, &mut batch)).expect("fits").next;
                }
            }
            "coalesce" => {
                let mut emit = |o: Output<'_>| {
                    black_box(o.frame.len());
                };
                for f in &segments {
                    co.push(black_box(f), &mut emit);
                }
                co.flush(&mut emit);
            }
            other => {
                eprintln!("unknown operation {other}");
                std::process::exit(2);
            }
        }
    }
}
