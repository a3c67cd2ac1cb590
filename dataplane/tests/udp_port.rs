//! Privileged test of the UDP uplink port (test side): two `UdpPort`s in two namespaces joined by
//! a veth pair exchange VXLAN packets. The sender's datagrams leave as `UDP_SEGMENT` messages,
//! cross the veth as GSO packets and reach the receiver as `UDP_GRO` buffers; every inner frame
//! comes back through the pipeline's own `decap`, in order, with its TOS, and every frame of both
//! ports' memories is accounted for at the end.
//!
//! Needs root; without it the test fails when `CI` is set and prints SKIP otherwise. The
//! namespaces are deleted even when the test panics; every wait is bounded.

mod xsk_util;

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use etherparse::PacketBuilder;
use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, HeapMem, Pkt};
use ferry_dataplane::port::Port;
use ferry_dataplane::port::udp::{UdpPort, UdpPortConfig, UdpPortError};
use ferry_dataplane::port::xsk::RX_HEADROOM;
use ferry_encap::{DecapConfig, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, decap, encap_with};
use xsk_util::*;

const FRAMES: u32 = 1024;
const FRAME_SIZE: usize = 2048;
const VNI: u32 = 42;

/// An inner ECN-capable TCP/IPv4 frame with `payload` bytes, each byte `seq`'s low byte (to tell them apart).
fn inner(seq: u16, payload: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 9, 1], [2, 0, 0, 0, 9, 2])
        .ipv4([10, 244, 1, 5], [10, 244, 0, 7], 63)
        .tcp(40000, 5201, u32::from(seq), 65535);
    let mut v = Vec::new();
    b.write(&mut v, &vec![seq as u8; payload]).expect("build");
    // ECT(0), so that CE on the outer header may be folded in (RFC 6040).
    v[15] |= 0b10;
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut v[14..]).fill_checksum();
    v
}

fn port(end: &End, local: std::net::Ipv4Addr) -> UdpPort<HeapMem> {
    let _in = InNetns::enter(&end.ns);
    let mut cfg = UdpPortConfig::new(SocketAddr::V4(SocketAddrV4::new(local, 4789)), MacAddr(end.mac));
    cfg.reuse_port = false;
    UdpPort::open(&cfg).expect("open UDP uplink")
}

#[test]
fn two_udp_ports_exchange_vxlan_as_gso_and_gro_batches() {
    if !privileged("two_udp_ports_exchange_vxlan_as_gso_and_gro_batches") {
        return;
    }
    let t = pair(1);
    let mut a = port(&t.a, A4);
    let mut b = port(&t.b, B4);
    let (mut mem_a, mut free_a) = (HeapMem::new(FRAMES, FRAME_SIZE), FreeFrames::all(FRAMES));
    let (mut mem_b, mut free_b) = (HeapMem::new(FRAMES, FRAME_SIZE), FreeFrames::all(FRAMES));

    // 150 frames from A to B as the pipeline would hand them to the uplink: 1,400-byte inner
    // payloads, every 50th one short (it ends its batch), the last 30 with ECN CE outside.
    let tpl = TunnelTemplate::new(&TemplateParams::new(
        TunnelKind::Vxlan,
        VNI,
        MacAddr(t.a.mac),
        MacAddr(t.b.mac),
        IpAddr::V4(A4),
        IpAddr::V4(B4),
    ))
    .expect("template");
    let n = 150u16;
    let sizes: Vec<usize> = (0..n).map(|i| if i % 50 == 49 { 200 } else { 1400 }).collect();
    let mut pkts = Vec::new();
    for i in 0..n {
        let f = inner(i, sizes[usize::from(i)]);
        let id = free_a.pop().expect("frame");
        let buf = mem_a.frame_mut(id);
        let off = usize::from(RX_HEADROOM);
        buf[off..off + f.len()].copy_from_slice(&f);
        let mut fb = FrameBuf::new(buf, off, f.len()).expect("frame");
        encap_with(&tpl, &mut fb, 0b10, u32::from(i)).expect("encap");
        let (start, len) = (fb.start(), fb.len());
        if i >= n - 30 {
            buf[start + 15] |= 0b11;
            ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut buf[start + 14..]).fill_checksum();
        }
        pkts.push(Pkt { frame: id, offset: start as u16, len: len as u16 });
    }
    b.refill(&mut free_b);
    // The worker's way: batches of 64, each followed by a flush.
    for chunk in pkts.chunks(64) {
        assert_eq!(a.send(&mut mem_a, chunk), chunk.len());
        a.flush().expect("flush");
    }
    assert_eq!(a.reclaim(&mut free_a), usize::from(n), "frames are free once copied");
    let sa = a.udp_stats();
    assert_eq!((sa.tx_datagrams, sa.tx_would_block, sa.tx_errors, sa.tx_malformed), (u64::from(n), 0, 0, 0));
    assert!(sa.tx_messages <= 10, "datagrams went out as UDP_SEGMENT batches: {sa:?}");

    let mut cfg = DecapConfig::new(TunnelKind::Vxlan, VNI, IpAddr::V4(B4));
    cfg.local_mac = Some(MacAddr(t.b.mac));
    let mut got: Vec<(Vec<u8>, u8)> = Vec::new();
    let mut out = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
    let until = deadline(5);
    while got.len() < usize::from(n) && std::time::Instant::now() < until {
        b.refill(&mut free_b);
        let k = b.recv(&mut mem_b, &mut out);
        for p in &out[..k] {
            assert_eq!(p.offset, RX_HEADROOM);
            let buf = mem_b.frame_mut(p.frame);
            let outer_tos = buf[usize::from(p.offset) + 15];
            let mut fb = FrameBuf::new(buf, usize::from(p.offset), usize::from(p.len)).expect("frame");
            let d = decap(&cfg, &mut fb).expect("decap");
            assert_eq!(d.outer_src, IpAddr::V4(A4));
            got.push((fb.data().to_vec(), outer_tos));
            free_b.push(p.frame);
        }
        if k == 0 {
            std::thread::yield_now();
        }
    }
    assert_eq!(got.len(), usize::from(n), "every datagram arrived: {:?}", b.udp_stats());
    for (i, (frame, tos)) in got.iter().enumerate() {
        let ce = i >= usize::from(n) - 30;
        let mut want = inner(i as u16, sizes[i]);
        if ce {
            want[15] |= 0b11;
            ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut want[14..]).fill_checksum();
        }
        assert_eq!(frame, &want, "inner frame {i} in order and intact");
        assert_eq!(*tos & 0b11, if ce { 0b11 } else { 0b10 }, "outer ECN of datagram {i}");
    }
    let sb = b.udp_stats();
    assert_eq!((sb.rx_datagrams, sb.rx_dropped, sb.rx_socket_drops), (u64::from(n), 0, 0));
    assert!(sb.rx_messages <= 10, "datagrams arrived as UDP_GRO buffers: {sb:?}");

    // Conservation: every frame is free or held by its port, and closing the ports returns the rest.
    assert_eq!(free_a.len() + a.frames_held(), FRAMES as usize);
    assert_eq!(free_b.len() + b.frames_held(), FRAMES as usize);
    a.release(&mut free_a);
    b.release(&mut free_b);
    assert_eq!((free_a.len(), free_b.len()), (FRAMES as usize, FRAMES as usize));
    assert_eq!((free_a.refused(), free_b.refused()), (0, 0));
}

#[test]
fn an_ipv6_or_foreign_address_is_refused_with_a_reason() {
    if !privileged("an_ipv6_or_foreign_address_is_refused_with_a_reason") {
        return;
    }
    let t = pair(1);
    let _in = InNetns::enter(&t.a.ns);
    let v6 = UdpPortConfig::new(SocketAddr::new(IpAddr::V6(A6), 4789), MacAddr(t.a.mac));
    assert!(matches!(UdpPort::<HeapMem>::open(&v6), Err(UdpPortError::Ipv6Unsupported { .. })));
    let other = UdpPortConfig::new(SocketAddr::new(IpAddr::V4(B4), 4789), MacAddr(t.a.mac));
    let e = UdpPort::<HeapMem>::open(&other).expect_err("B's address is not in A's namespace");
    assert!(e.to_string().contains("not one of this node's"), "{e}");
}
