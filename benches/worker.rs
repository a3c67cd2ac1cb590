//! The whole worker loop over in-memory ports: pod -> remote node (classify, anti-spoofing, TTL,
//! route, encap) and remote node -> pod (decap, known-node check, route, checksum completion),
//! 64-byte frames, 64 per iteration.
//!
//! Each iteration copies 64 frames into the receive ring (as the kernel does in copy mode), runs one
//! worker iteration, and takes the transmitted frames out; the copies are part of the figure.
//!
//! Run: `cargo bench --bench worker`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use ferry_dataplane::frame::{FreeFrames, HeapMem};
use ferry_dataplane::pipeline::{NodeConfig, Pipeline, PortId, PortRole};
use ferry_dataplane::port::mem::{MemPort, MemPortConfig};
use ferry_dataplane::worker::{BATCH, Worker};
use ferry_encap::{DecapConfig, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, encap};
use ferry_tables::{DesiredState, LocalPod, RemoteNode, Snapshot, Tables, Underlay};

const POD: [u8; 4] = [10, 244, 1, 2];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 2];

/// A node with one pod on port 1 and one remote node, in real tables.
fn setup() -> (Worker<MemPort>, Arc<Snapshot>) {
    let me = Ipv4Addr::new(192, 0, 2, 1);
    let peer = Ipv4Addr::new(192, 0, 2, 2);
    let mac = MacAddr([2, 0, 0, 0, 0, 1]);
    let cfg = NodeConfig {
        gateway_mac: mac,
        gateway_v4: Some(Ipv4Addr::new(10, 244, 1, 1)),
        gateway_v6: None,
        vtep_mac: mac,
        decap: DecapConfig::new(TunnelKind::Vxlan, 1, me.into()),
        uplink: PortId(0),
        underlay_mtu: 1500,
        icmp_rate: (100, 10),
    };
    let ring = MemPortConfig { rx_ring: 256, tx_ring: 256, rx_offset: 0 };
    let ports = vec![MemPort::new("uplink", ring), MemPort::new("pod", ring)];
    let worker = Worker::new(
        ports,
        vec![PortRole::Uplink, PortRole::Pod],
        HeapMem::new(2048, 2048),
        FreeFrames::all(2048),
        Pipeline::new(cfg),
    );
    let now = Instant::now();
    let mut tables = Tables::new(Underlay::new(mac, Some(me), None), Duration::from_secs(60));
    let _ = tables.set_static_neighbour(peer.into(), MacAddr([2, 0, 0, 0, 0, 9]), now);
    let desired = DesiredState {
        nodes: vec![RemoteNode {
            name: "peer".into(),
            pod_cidrs: vec!["10.244.2.0/24".parse().expect("cidr")],
            underlay: peer.into(),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 0xb]),
            vni: 1,
            tunnel: TunnelKind::Vxlan,
            port: 4789,
        }],
        local_pods: vec![LocalPod {
            port: PortId(1),
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
            addrs: vec![IpAddr::V4(POD.into())],
        }],
        blackholes: vec![],
    };
    tables.set_desired(desired, now).expect("valid desired state");
    (worker, tables.current())
}

fn udp(src: [u8; 4], dst: [u8; 4], flow: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(src, dst, 64)
        .udp(10_000 + flow, 5201)
        .write(&mut out, &[0x5a; 22])
        .expect("build");
    out
}

/// Inject `frames` on `inp`, run one iteration, drain `outp`; returns packets transmitted.
fn round(w: &mut Worker<MemPort>, fib: &Snapshot, frames: &[Vec<u8>], inp: usize, outp: usize) -> usize {
    let (mem, ports) = w.mem_and_ports();
    for f in frames {
        ports[inp].inject(mem, f);
    }
    w.poll_once(fib);
    let (mem, ports) = w.mem_and_ports();
    ports[outp].take_sent(mem, usize::MAX, |b| {
        black_box(b);
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker");
    g.throughput(Throughput::Elements(BATCH as u64));

    let (mut w, fib) = setup();
    let to_remote: Vec<Vec<u8>> = (0..BATCH as u16).map(|i| udp(POD, REMOTE_POD, i)).collect();
    w.poll_once(&*fib);
    assert_eq!(round(&mut w, &fib, &to_remote, 1, 0), BATCH, "every frame encapsulated");
    g.bench_function("pod_to_remote_encap_64B", |b| b.iter(|| round(&mut w, &fib, &to_remote, 1, 0)));

    // Tunnel frames as the remote node would send them.
    let peer_mac = MacAddr([2, 0, 0, 0, 0, 9]);
    let peer_tpl = TunnelTemplate::new(&TemplateParams::new(
        TunnelKind::Vxlan,
        1,
        peer_mac,
        peer_mac,
        Ipv4Addr::new(192, 0, 2, 2).into(),
        Ipv4Addr::new(192, 0, 2, 1).into(),
    ))
    .expect("tpl");
    let from_remote: Vec<Vec<u8>> = (0..BATCH as u16)
        .map(|i| {
            let inner = udp(REMOTE_POD, POD, i);
            let mut buf = vec![0u8; 128 + inner.len()];
            buf[128..].copy_from_slice(&inner);
            let mut f = FrameBuf::new(&mut buf, 128, inner.len()).expect("fits");
            encap(&peer_tpl, &mut f).expect("encap");
            f.data().to_vec()
        })
        .collect();
    let (mut w, fib) = setup();
    w.poll_once(&*fib);
    assert_eq!(round(&mut w, &fib, &from_remote, 0, 1), BATCH, "every frame delivered");
    g.bench_function("remote_to_pod_decap_64B", |b| b.iter(|| round(&mut w, &fib, &from_remote, 0, 1)));
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
