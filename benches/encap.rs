//! Encapsulation and decapsulation throughput: VXLAN and Geneve, IPv4 and IPv6 underlay, inner
//! frames of 64/128/512/1500 bytes.
//!
//! Each iteration handles a batch of 32 frames in 2 KiB buffers, the way a worker handles a batch of
//! UMEM frames; throughput is reported per frame. `encap` includes classifying the inner frame (the
//! flow hash for the UDP source port); `decap` includes every validation, IPv4 header checksum
//! included. Buffers are reused: encap writes only the headroom, and decap only moves offsets, so
//! nothing needs restoring between iterations.
//!
//! Run: `cargo bench --bench encap` (add `-- vxlan/v4/64` to filter).

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use ferry_encap::{DecapConfig, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, decap, encap};

const BATCH: usize = 32;
const FRAME: usize = 2048;
const HEADROOM: usize = 256;

/// An inner Ethernet/IPv4/UDP frame of exactly `size` bytes (without FCS).
fn inner_frame(size: usize, flow: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    PacketBuilder::ethernet2([0x0a, 0, 0, 0, 0, 1], [0x0a, 0, 0, 0, 0, 2])
        .ipv4([10, 244, 1, 2], [10, 244, 2, 3], 64)
        .udp(10_000 + flow, 5201)
        .write(&mut out, &vec![0x5a; size - 42])
        .expect("build inner frame");
    out
}

fn setup(kind: TunnelKind, v6: bool) -> (TunnelTemplate, DecapConfig) {
    let (src, dst): (IpAddr, IpAddr) = if v6 {
        ("fd00::1".parse().expect("ip"), "fd00::2".parse().expect("ip"))
    } else {
        ("192.0.2.1".parse().expect("ip"), "192.0.2.2".parse().expect("ip"))
    };
    let params = TemplateParams::new(kind, 42, MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), src, dst);
    let tpl = TunnelTemplate::new(&params).expect("template");
    (tpl, DecapConfig::new(kind, 42, dst))
}

fn bench(c: &mut Criterion) {
    for kind in [TunnelKind::Vxlan, TunnelKind::Geneve] {
        for v6 in [false, true] {
            let (tpl, cfg) = setup(kind, v6);
            let family = if v6 { "v6" } else { "v4" };
            let mut group = c.benchmark_group(format!("{}/{family}", kind.name()));
            group.throughput(Throughput::Elements(BATCH as u64));
            for size in [64usize, 128, 512, 1500] {
                // Batch buffers with the inner frames at HEADROOM; 32 different flows.
                let mut bufs: Vec<Vec<u8>> = (0..BATCH)
                    .map(|i| {
                        let mut b = vec![0u8; FRAME];
                        b[HEADROOM..HEADROOM + size].copy_from_slice(&inner_frame(size, i as u16));
                        b
                    })
                    .collect();
                group.bench_function(BenchmarkId::new("encap", size), |b| {
                    b.iter(|| {
                        for buf in bufs.iter_mut() {
                            let mut f = FrameBuf::new(buf, HEADROOM, size).expect("fits");
                            black_box(encap(&tpl, &mut f)).expect("encap");
                        }
                    })
                });
                // Encapsulate once, then decapsulate the same outer frames every iteration.
                let outer_start = HEADROOM - tpl.overhead();
                let outer_len = size + tpl.overhead();
                for buf in bufs.iter_mut() {
                    let mut f = FrameBuf::new(buf, HEADROOM, size).expect("fits");
                    encap(&tpl, &mut f).expect("encap");
                }
                group.bench_function(BenchmarkId::new("decap", size), |b| {
                    b.iter(|| {
                        for buf in bufs.iter_mut() {
                            let mut f = FrameBuf::new(buf, outer_start, outer_len).expect("fits");
                            black_box(decap(&cfg, &mut f)).expect("decap");
                        }
                    })
                });
            }
            group.finish();
        }
    }
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
