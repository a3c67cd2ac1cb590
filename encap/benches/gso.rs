//! Segmentation and coalescing throughput: a 64 KB TCP super-packet (IPv4, timestamps, the
//! largest a tap hands over) cut at MSS 1398 (a 1500-byte underlay less VXLAN's 50 bytes), and the
//! 47 segments coalesced back.
//!
//! Throughput is reported per segment; one iteration handles one whole super-packet. Buffers are
//! reused: segmentation overwrites its output buffers completely, and the coalescer's storage is
//! made once and flushed empty at the end of every iteration.
//!
//! Run: `cargo bench -p ferry-encap --bench gso` (add `-- gro` to filter).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_encap::gro::{self, Coalescer, Output};
use ferry_encap::gso::{Checksum, Segmenter, UDP_GSO_MAX_PAYLOAD};

#[path = "../examples/gso_rounds/fixture.rs"]
mod fixture;
use fixture::{super_packet, template};

fn bench(c: &mut Criterion) {
    let (sp, vnet) = super_packet();
    let seg = Segmenter::new(&sp, &vnet).expect("valid");
    let n = seg.segments();
    assert_eq!(n, 47);
    let mut bufs = vec![[0u8; 2048]; n];
    let tpl = template();

    let mut group = c.benchmark_group("gso/tcp4/64k");
    group.throughput(Throughput::Elements(n as u64));
    for (name, mode) in [("segment_complete", Checksum::Complete), ("segment_partial", Checksum::Partial)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let s = Segmenter::new(black_box(&sp), &vnet).expect("valid");
                for (i, buf) in bufs.iter_mut().enumerate() {
                    black_box(s.write_segment(i, buf, mode)).expect("fits");
                }
            })
        });
    }
    group.bench_function("encapsulated_frames", |b| {
        b.iter(|| {
            let s = Segmenter::new(black_box(&sp), &vnet).expect("valid");
            for (i, buf) in bufs.iter_mut().enumerate() {
                black_box(s.write_encapsulated(i, &tpl, buf)).expect("fits");
            }
        })
    });
    let mut batch = vec![0u8; UDP_GSO_MAX_PAYLOAD];
    group.bench_function("udp_gso_batches", |b| {
        b.iter(|| {
            let s = Segmenter::new(black_box(&sp), &vnet).expect("valid");
            let mut next = 0;
            while next < s.segments() {
                next = black_box(s.write_udp_gso(&tpl, next, &mut batch)).expect("fits").next;
            }
        })
    });
    group.finish();

    // The segments as they arrive from the wire (checksums complete), coalesced back.
    let segments: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut b = vec![0u8; 2048];
            let len = seg.write_segment(i, &mut b, Checksum::Complete).expect("fits");
            b.truncate(len);
            b
        })
        .collect();
    let mut co = Coalescer::new(vec![0u8; gro::storage_len(8)]).expect("storage");
    let mut group = c.benchmark_group("gro/tcp4/64k");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("coalesce", |b| {
        b.iter(|| {
            let mut out = 0usize;
            let mut emit = |o: Output<'_>| out += o.frame.len();
            for s in &segments {
                co.push(black_box(s), &mut emit);
            }
            co.flush(&mut emit);
            assert_eq!(out, sp.len());
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
