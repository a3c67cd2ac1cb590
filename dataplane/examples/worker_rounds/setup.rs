//! One node's worker over in-memory ports, with real tables (`ferry_testsupport::node`), and its
//! traffic: shared by the worker bench (`benches/worker.rs`, which includes this file) and the
//! `worker_rounds` example.
//!
//! The node has one pod on port 1 and one remote node (VXLAN, VNI 1) behind the uplink on port 0.
//! Frames are UDP, 64 different flows; the benches use 64-byte frames.

use std::hint::black_box;
use std::sync::Arc;

use etherparse::PacketBuilder;
use ferry_dataplane::port::mem::{MemPort, MemPortConfig};
use ferry_dataplane::port::xsk::RX_HEADROOM;
use ferry_dataplane::worker::{BATCH, Worker};
use ferry_encap::{FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, encap};
use ferry_tables::Snapshot;
use ferry_testsupport::node::{TestNode, gateway_mac, pod_mac, underlay_ip, underlay_mac, vtep_mac};

const POD: [u8; 4] = [10, 244, 1, 2];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 2];

/// The uplink's port index.
pub(crate) const UPLINK: usize = 0;
/// The pod's port index.
pub(crate) const POD_PORT: usize = 1;

/// Port capacity, as the agent sizes its workers (`dataplane.max_ports`' default): the published
/// counters have this many slots.
pub(crate) const MAX_PORTS: usize = 256;

/// Node 1 of `ferry_testsupport::node` with one pod on port 1 and node 2 behind the uplink;
/// packets arrive where AF_XDP puts them, with the XDP headroom in front.
pub(crate) fn setup() -> (Worker<MemPort>, Arc<Snapshot>) {
    let (worker, fib) = TestNode {
        frames: 2048,
        ring: MemPortConfig { rx_ring: 256, tx_ring: 256, rx_offset: RX_HEADROOM },
        icmp_rate: (100, 10),
        ..TestNode::new(1)
    }
    .build();
    (worker.with_capacity(MAX_PORTS), fib)
}

/// Ethernet, IPv4 and UDP headers.
const HEADERS: usize = 14 + 20 + 8;

/// The largest inner frame the node encapsulates: a 1450-byte IP packet (the pod MTU, underlay MTU
/// 1500 minus VXLAN's 50 bytes) and its Ethernet header.
pub(crate) const MAX_FRAME: usize = 1464;

/// A UDP frame of `size` bytes (at least the headers).
fn udp(macs: (MacAddr, MacAddr), src: [u8; 4], dst: [u8; 4], flow: u16, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0.0, macs.1.0)
        .ipv4(src, dst, 64)
        .udp(10_000 + flow, 5201)
        .write(&mut out, &vec![0x5a; size.saturating_sub(HEADERS)])
        .expect("build");
    out
}

/// A batch of `size`-byte frames from the pod to the remote pod (to encapsulate).
pub(crate) fn to_remote(size: usize) -> Vec<Vec<u8>> {
    to_remote_flows(size, BATCH as u16)
}

/// `flows` frames, one per flow, as [`to_remote`].
pub(crate) fn to_remote_flows(size: usize, flows: u16) -> Vec<Vec<u8>> {
    (0..flows).map(|i| udp((pod_mac(1, 1), gateway_mac(1)), POD, REMOTE_POD, i, size)).collect()
}

/// A batch of tunnel frames as the remote node would send them, `size`-byte inner frames (to
/// decapsulate).
pub(crate) fn from_remote(size: usize) -> Vec<Vec<u8>> {
    from_remote_flows(size, BATCH as u16)
}

/// `flows` frames, one per flow, as [`from_remote`].
pub(crate) fn from_remote_flows(size: usize, flows: u16) -> Vec<Vec<u8>> {
    let peer_tpl = TunnelTemplate::new(&TemplateParams::new(
        TunnelKind::Vxlan,
        1,
        underlay_mac(2),
        underlay_mac(1),
        underlay_ip(2).into(),
        underlay_ip(1).into(),
    ))
    .expect("tpl");
    (0..flows)
        .map(|i| {
            let inner = udp((pod_mac(2, 1), vtep_mac(1)), REMOTE_POD, POD, i, size);
            let mut buf = vec![0u8; 128 + inner.len()];
            buf[128..].copy_from_slice(&inner);
            let mut f = FrameBuf::new(&mut buf, 128, inner.len()).expect("fits");
            encap(&peer_tpl, &mut f).expect("encap");
            f.data().to_vec()
        })
        .collect()
}

/// Inject `frames` on `inp`, run one iteration, drain `outp`; returns packets transmitted.
pub(crate) fn round(w: &mut Worker<MemPort>, fib: &Snapshot, frames: &[Vec<u8>], inp: usize, outp: usize) -> usize {
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
