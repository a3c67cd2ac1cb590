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
use ferry_dataplane::port::udp::{DEFAULT_SOCKET_BUFFER, UdpPort, UdpPortConfig, UdpPortError};
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
    // As root the buffers are what was asked (SO_RCVBUFFORCE, SO_SNDBUFFORCE), past
    // net.core.rmem_max/wmem_max; the kernel reports twice the size set.
    assert_eq!(b.buffer_sizes(), (2 * DEFAULT_SOCKET_BUFFER, 2 * DEFAULT_SOCKET_BUFFER), "socket buffers");
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

/// Issue 13's interop bug: a kernel VXLAN device sends a TCP super-packet as one
/// `SKB_GSO_UDP_TUNNEL` packet, the veth keeps it whole and the UDP socket receives it as one
/// datagram of 20 KB without a `UDP_GRO` message. It used to be counted as `rx_dropped`; the port
/// must cut it into segments that fit the inner MTU, each a tunnel datagram `decap` accepts, with
/// a complete TCP checksum, the payloads together the original's. The super-packet is written,
/// with its virtio-net header, into a tap in A that routes into A's VXLAN device, as a pod's TSO
/// would hand it over.
#[test]
fn a_kernel_vxlan_tcp_super_packet_is_received_as_segments() {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !privileged("a_kernel_vxlan_tcp_super_packet_is_received_as_segments") {
        return;
    }
    let t = pair(1);
    let ns_a = t.a.ns.clone();
    let vx = format!("vx{}", &t.a.name[3..]);
    let a4 = A4.to_string();
    for cmd in [
        vec!["ip", "link", "add", &vx, "type", "vxlan", "id", "42", "dstport", "4789", "local", &a4, "dev", &t.a.name],
        vec!["ip", "link", "set", &vx, "mtu", "1450", "up"],
        vec!["ip", "addr", "add", "10.245.1.0/32", "dev", &vx],
        vec!["ip", "neigh", "add", "10.245.2.0", "lladdr", "02:00:00:00:02:00", "dev", &vx, "nud", "permanent"],
        vec!["bridge", "fdb", "add", "02:00:00:00:02:00", "dev", &vx, "dst", "10.77.0.2"],
        vec!["ip", "route", "add", "10.245.2.0/24", "via", "10.245.2.0", "dev", &vx, "onlink"],
        vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    ] {
        run_in(&ns_a, &cmd);
    }
    let tap_name = format!("tp{}", &t.a.name[3..]);
    let tap = {
        let _in = InNetns::enter(&ns_a);
        // SAFETY: open(2) of a path; the result is checked and owned at once.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(fd >= 0, "open /dev/net/tun: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor just opened and owned by nothing else.
        let tap = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifr = [0u8; 40];
        ifr[..tap_name.len()].copy_from_slice(tap_name.as_bytes());
        // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (the default 10-byte header size).
        ifr[16..18].copy_from_slice(&(0x0002u16 | 0x1000 | 0x4000).to_ne_bytes());
        // SAFETY: TUNSETIFF with a 40-byte ifreq that outlives the call.
        let r = unsafe { libc::ioctl(fd, 0x4004_54ca, ifr.as_mut_ptr()) };
        assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tap
    };
    run_in(&ns_a, &["ip", "link", "set", &tap_name, "up"]);
    run_in(&ns_a, &["ip", "addr", "add", "10.245.1.1/24", "dev", &tap_name]);
    run_in(&ns_a, &["ip", "neigh", "add", "10.245.1.2", "lladdr", "02:00:00:00:01:02", "dev", &tap_name]);
    let tap_mac = run_in(&ns_a, &["cat", &format!("/sys/class/net/{tap_name}/address")]);
    let tap_mac: Vec<u8> = tap_mac.trim().split(':').map(|h| u8::from_str_radix(h, 16).expect("MAC")).collect();

    let mut cfg = UdpPortConfig::new(SocketAddr::V4(SocketAddrV4::new(B4, 4789)), MacAddr(t.b.mac));
    cfg.reuse_port = false;
    cfg.inner_mtu = 1450;
    let mut b = {
        let _in = InNetns::enter(&t.b.ns);
        UdpPort::<HeapMem>::open(&cfg).expect("open UDP uplink")
    };
    let (mut mem, mut free) = (HeapMem::new(FRAMES, FRAME_SIZE), FreeFrames::all(FRAMES));
    b.refill(&mut free);

    // A 20,000-byte TCP super-packet, TSO-style: gso_size 1398 (timestamps, as a pod's TCP
    // would), the pseudo-header sum of the whole length in the checksum field.
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 13 + 5) as u8).collect();
    let (src, dst) = (std::net::Ipv4Addr::new(10, 245, 1, 2), std::net::Ipv4Addr::new(10, 245, 2, 2));
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], tap_mac[..6].try_into().expect("6 bytes"))
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(40000, 5201, 7000, 65535)
        .ack(1)
        .options(&[
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Timestamp(1, 2),
        ])
        .expect("options");
    let mut frame = Vec::new();
    builder.write(&mut frame, &data).expect("build");
    frame[14 + 6] |= 0x40; // DF, as TCP sends
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut frame[14..]).fill_checksum();
    let tcp_len = frame.len() - 34;
    let pseudo = ferry_encap::checksum::pseudo_v4(src, dst, 6, tcp_len as u16);
    frame[34 + 16..34 + 18].copy_from_slice(&(!ferry_encap::checksum::finish_sum(pseudo)).to_be_bytes());
    // virtio_net_hdr: NEEDS_CSUM, TCPV4, hdr_len 66, gso_size 1398, csum_start 34, csum_offset 16.
    let mut vnet = vec![1u8, 1];
    for v in [66u16, 1398, 34, 16] {
        vnet.extend_from_slice(&v.to_le_bytes());
    }
    let iov = [
        libc::iovec { iov_base: vnet.as_mut_ptr().cast(), iov_len: vnet.len() },
        libc::iovec { iov_base: frame.as_mut_ptr().cast(), iov_len: frame.len() },
    ];
    // SAFETY: two iovecs over live buffers the kernel only reads.
    let w = unsafe { libc::writev(std::os::fd::AsRawFd::as_raw_fd(&tap), iov.as_ptr(), 2) };
    assert_eq!(w as usize, vnet.len() + frame.len(), "write to the tap: {}", std::io::Error::last_os_error());

    let mut dcfg = DecapConfig::new(TunnelKind::Vxlan, 42, IpAddr::V4(B4));
    dcfg.local_mac = Some(MacAddr(t.b.mac));
    let mut got = Vec::new();
    let mut segments = 0;
    let mut out = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
    let until = deadline(5);
    while got.len() < data.len() && std::time::Instant::now() < until {
        b.refill(&mut free);
        let k = b.recv(&mut mem, &mut out);
        for p in &out[..k] {
            let buf = mem.frame_mut(p.frame);
            let mut fb = FrameBuf::new(buf, usize::from(p.offset), usize::from(p.len)).expect("frame");
            decap(&dcfg, &mut fb).expect("decap accepts each segment");
            let seg = fb.data().to_vec();
            let sp = etherparse::SlicedPacket::from_ethernet(&seg).expect("parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = &sp.net else { panic!("IPv4") };
            assert!(usize::from(ip.header().total_len()) <= 1450, "segment {segments} fits the inner MTU");
            assert_eq!(ip.header().ttl(), 63, "forwarded once by A's kernel");
            let Some(etherparse::TransportSlice::Tcp(tcp)) = sp.transport else { panic!("TCP") };
            let want = tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination()).expect("sum");
            assert_eq!(tcp.checksum(), want, "segment {segments}'s TCP checksum is complete");
            assert_eq!(tcp.sequence_number(), 7000 + got.len() as u32, "segment {segments} in order");
            got.extend_from_slice(tcp.payload());
            segments += 1;
            free.push(p.frame);
        }
        if k == 0 {
            std::thread::yield_now();
        }
    }
    let s = b.udp_stats();
    assert!(got == data, "the whole payload arrived ({} of {} bytes): {s:?}", got.len(), data.len());
    assert_eq!((s.rx_dropped, s.rx_super), (0, 1), "one super-packet, nothing dropped: {s:?}");
    assert_eq!(segments, data.len().div_ceil(1398), "cut at the MSS that fills the inner MTU");
    b.release(&mut free);
    assert_eq!(free.len(), FRAMES as usize);
}

/// A pod's tap port or the UDP uplink, on one memory: what a worker of this test holds.
#[derive(Debug)]
enum TestPort {
    Tap(Box<ferry_dataplane::port::tap::TapPort<HeapMem>>),
    Udp(Box<UdpPort<HeapMem>>),
}

macro_rules! each {
    ($self:expr, $p:ident => $call:expr) => {
        match $self {
            TestPort::Tap($p) => $call,
            TestPort::Udp($p) => $call,
        }
    };
}

impl Port for TestPort {
    type Mem = HeapMem;
    fn name(&self) -> &str {
        each!(self, p => p.name())
    }
    fn recv(&mut self, mem: &mut HeapMem, out: &mut [Pkt]) -> usize {
        each!(self, p => p.recv(mem, out))
    }
    fn send(&mut self, mem: &mut HeapMem, pkts: &[Pkt]) -> usize {
        each!(self, p => p.send(mem, pkts))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        each!(self, p => p.flush())
    }
    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        each!(self, p => p.reclaim(free))
    }
    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        each!(self, p => p.refill(free))
    }
    fn frames_held(&self) -> usize {
        each!(self, p => p.frames_held())
    }
    fn release(self, free: &mut FreeFrames) {
        match self {
            TestPort::Tap(p) => p.release(free),
            TestPort::Udp(p) => p.release(free),
        }
    }
    fn super_head(&self) -> Option<ferry_dataplane::port::SuperHead> {
        each!(self, p => p.super_head())
    }
    fn super_rest(&mut self, headers: &[u8]) -> Option<ferry_encap::gso::Segmenter<'_>> {
        each!(self, p => p.super_rest(headers))
    }
    fn super_done(&mut self, sent: usize) {
        each!(self, p => p.super_done(sent))
    }
    fn last_sent_payload(&self) -> Option<&[u8]> {
        each!(self, p => p.last_sent_payload())
    }
    fn send_segments(&mut self, seg: &ferry_encap::gso::Segmenter<'_>, tunnel_header: usize, first: usize) -> usize {
        each!(self, p => p.send_segments(seg, tunnel_header, first))
    }
    fn super_run(&self) -> Option<ferry_dataplane::port::SegmentRun<'_>> {
        each!(self, p => p.super_run())
    }
    fn send_run(&mut self, mem: &mut HeapMem, head: Pkt, run: &ferry_dataplane::port::SegmentRun<'_>) -> bool {
        each!(self, p => p.send_run(mem, head, run))
    }
}

/// The worker's super-packet path: a pod on a tap (super-packets on) sends one 20,000-byte TCP
/// super-packet (through an `AF_PACKET` socket with `PACKET_VNET_HDR`, as its TSO would) to a pod
/// on node 2; a real worker with node 1's pipeline and tables routes its first segment, and the
/// other 14 follow it into the UDP uplink without a pipeline pass each. Node 2's end (a UDP port on
/// 192.0.2.2) must get 15 tunnel datagrams, each decapsulated by `decap`, with the pipeline's
/// rewrite (VTEP MACs, TTL 63) in every segment, complete checksums, consecutive IPv4 IDs and
/// sequence numbers and the payload intact; the worker counts 15 packets in and 15 out.
#[test]
fn a_tap_super_packet_is_routed_once_and_sent_as_one_udp_segment_batch() {
    use ferry_dataplane::port::tap::{self, TapConfig, TapPort};
    use ferry_dataplane::worker::Worker;
    use ferry_testsupport::node;
    if !privileged("a_tap_super_packet_is_routed_once_and_sent_as_one_udp_segment_batch") {
        return;
    }
    let mut t = pair(1);
    addr(&t.a, "192.0.2.1/24");
    addr(&t.b, "192.0.2.2/24");
    let pod_ns = t.ns.add(&format!("{}-p", tag()));
    let path = std::path::PathBuf::from(format!("/run/netns/{pod_ns}"));
    let tap_name = "fsp0";
    tap::create_persistent(Some(&path), tap_name, Some(node::pod_mac(1, 1)), 1).expect("create tap");
    run(&["ip", "-n", &pod_ns, "link", "set", tap_name, "mtu", "1450", "up"]);
    let tap = TapPort::new(
        tap::open_queue(Some(&path), tap_name).expect("queue"),
        tap_name,
        TapConfig { super_packets: true, ..TapConfig::default() },
    );
    let uplink = {
        let _in = InNetns::enter(&t.a.ns);
        let mut cfg =
            UdpPortConfig::new(SocketAddr::V4(SocketAddrV4::new(node::underlay_ip(1), 4789)), node::underlay_mac(1));
        cfg.reuse_port = false;
        UdpPort::<HeapMem>::open(&cfg).expect("uplink")
    };
    let mut far = {
        let _in = InNetns::enter(&t.b.ns);
        let mut cfg =
            UdpPortConfig::new(SocketAddr::V4(SocketAddrV4::new(node::underlay_ip(2), 4789)), node::underlay_mac(2));
        cfg.reuse_port = false;
        UdpPort::<HeapMem>::open(&cfg).expect("node 2's end")
    };
    let fixture = node::TestNode { pods: 1, frames: 1024, ..node::TestNode::new(1) };
    let mut worker = Worker::new(
        vec![TestPort::Udp(Box::new(uplink)), TestPort::Tap(Box::new(tap))],
        fixture.roles(),
        HeapMem::new(fixture.frames, FRAME_SIZE),
        FreeFrames::all(fixture.frames),
        ferry_dataplane::pipeline::Pipeline::new(fixture.config()),
    );
    let fib = fixture.tables().current();

    // The super-packet, as the pod's TSO hands it to its tap.
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 31 + 7) as u8).collect();
    let (src, dst) = (node::pod_ip(1, 1), node::pod_ip(2, 1));
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(node::pod_mac(1, 1).0, node::gateway_mac(1).0)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(40000, 5201, 9000, 65535)
        .ack(1)
        .psh()
        .options(&[
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Timestamp(1, 2),
        ])
        .expect("options")
        .write(&mut frame, &data)
        .expect("build");
    frame[14 + 4..14 + 6].copy_from_slice(&100u16.to_be_bytes());
    frame[14 + 6] |= 0x40;
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut frame[14..]).fill_checksum();
    let pseudo = ferry_encap::checksum::pseudo_v4(src, dst, 6, (frame.len() - 34) as u16);
    frame[34 + 16..34 + 18].copy_from_slice(&(!ferry_encap::checksum::finish_sum(pseudo)).to_be_bytes());
    let mut msg = vec![1u8, 1];
    for v in [66u16, 1398, 34, 16] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg.extend_from_slice(&frame);
    {
        let _in = InNetns::enter(&pod_ns);
        // SAFETY: socket(2); the result is checked and owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor just created and owned by nothing else.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: PACKET_VNET_HDR (15) takes an int.
        let r = unsafe { libc::setsockopt(fd, libc::SOL_PACKET, 15, (&raw const one).cast(), 4) };
        assert_eq!(r, 0, "PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
        let name = std::ffi::CString::new(tap_name).expect("name");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: a live buffer and a sockaddr_ll of the size passed.
        let w = unsafe {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(w as usize, msg.len(), "send into the tap: {}", std::io::Error::last_os_error());
        drop(sock);
    }

    let mut dcfg = DecapConfig::new(TunnelKind::Vxlan, 1, IpAddr::V4(node::underlay_ip(2)));
    dcfg.local_mac = Some(node::underlay_mac(2));
    let (mut mem, mut free) = (HeapMem::new(FRAMES, FRAME_SIZE), FreeFrames::all(FRAMES));
    let mut out = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
    let (mut got, mut segments) = (Vec::new(), 0usize);
    let until = deadline(5);
    while got.len() < data.len() && std::time::Instant::now() < until {
        worker.poll_once(&*fib);
        far.refill(&mut free);
        let k = far.recv(&mut mem, &mut out);
        for p in &out[..k] {
            let buf = mem.frame_mut(p.frame);
            let mut fb = FrameBuf::new(buf, usize::from(p.offset), usize::from(p.len)).expect("frame");
            let raw = fb.data().to_vec();
            if let Err(e) = decap(&dcfg, &mut fb) {
                panic!("segment {segments}: decap: {e:?}: {:02x?}", &raw[..raw.len().min(120)]);
            }
            let seg = fb.data().to_vec();
            assert_eq!(&seg[..6], &node::vtep_mac(2).0, "segment {segments}: the pipeline's rewrite");
            let sp = etherparse::SlicedPacket::from_ethernet(&seg).expect("parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = &sp.net else { panic!("IPv4") };
            let h = ip.header();
            assert_eq!((h.ttl(), h.identification()), (63, 100 + segments as u16), "segment {segments}");
            assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum(), "segment {segments}");
            let Some(etherparse::TransportSlice::Tcp(tcp)) = sp.transport else { panic!("TCP") };
            let want = tcp.calc_checksum_ipv4(h.source(), h.destination()).expect("sum");
            assert_eq!(tcp.checksum(), want, "segment {segments}'s TCP checksum");
            assert_eq!(tcp.sequence_number(), 9000 + got.len() as u32, "segment {segments} in order");
            got.extend_from_slice(tcp.payload());
            segments += 1;
            free.push(p.frame);
        }
    }
    let TestPort::Tap(tap) = &worker.ports()[1] else { panic!("port 1 is the pod") };
    let ts = tap.tap_stats();
    let TestPort::Udp(up) = &worker.ports()[0] else { panic!("port 0 is the uplink") };
    let us = up.udp_stats();
    assert!(got == data, "the whole payload arrived ({} of {} bytes): {ts:?} {us:?}", got.len(), data.len());
    assert_eq!(segments, 15);
    assert_eq!(ts.super_segments, 14, "all but the first segment took the super-packet path: {ts:?}");
    assert_eq!((us.tx_datagrams, us.tx_messages), (15, 1), "one UDP_SEGMENT send: {us:?}");
    let c = worker.counters();
    // The pod's own start-up frames (IPv6 router solicitations and the like) are counted in too.
    assert_eq!((c.rx[1].packets, c.tx[0].packets), (15 + ts.reads - 1, 15), "counted per segment");
    assert_eq!(worker.frames_accounted(), fixture.frames as usize);
    let _ = tap::delete(Some(&path), tap_name);
}

/// One inner TCP segment from node 1's pod to node 2's, as node 1's pipeline hands it to the
/// tunnel: source port `sport`, sequence number `seq`, `len` payload bytes (each byte a function
/// of its sequence number), IPv4 ID `id` with DF, timestamps, flags set by `f`.
fn pod_segment(
    sport: u16,
    seq: u32,
    len: usize,
    id: u16,
    f: impl Fn(etherparse::PacketBuilderStep<etherparse::TcpHeader>) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
) -> Vec<u8> {
    use ferry_testsupport::node;
    let data: Vec<u8> = (0..len as u32).map(|i| payload_byte(seq + i)).collect();
    let (src, dst) = (node::pod_ip(1, 1), node::pod_ip(2, 1));
    let b = PacketBuilder::ethernet2(node::vtep_mac(1).0, node::vtep_mac(2).0)
        .ipv4(src.octets(), dst.octets(), 63)
        .tcp(sport, 5201, seq, 60000)
        .ack(7)
        .options(&[
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Timestamp(11, 22),
        ])
        .expect("options");
    let mut v = Vec::new();
    f(b).write(&mut v, &data).expect("build");
    v[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
    v[14 + 6] |= 0x40;
    ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut v[14..]).fill_checksum();
    v
}

fn payload_byte(seq: u32) -> u8 {
    (seq.wrapping_mul(7) >> 3) as u8 ^ seq as u8
}

/// The super-packet path's receive side through a real worker: node 1 (a UDP port standing in for
/// its uplink) sends two `UDP_SEGMENT` messages of VXLAN datagrams to node 2, whose worker has a
/// UDP uplink (super-packets on) and a pod on a tap. The first message is 20 segments of one TCP
/// flow, the last with PSH: one `UDP_GRO` buffer, routed once, written to the tap as one
/// super-packet. The second mixes what must not be one: two more segments of the flow (a run of
/// two), a segment of another flow, then the flow again, a hole, and a FIN: those take the ordinary
/// path (a frame and a pipeline pass each, the tap's coalescer). A packet socket in the pod's
/// namespace (`PACKET_VNET_HDR`) sees what the tap delivered: each packet's virtio-net header,
/// headers and payload, checksums completed as the kernel would and checked by etherparse.
#[test]
fn a_udp_gro_run_is_routed_once_and_written_to_the_tap_as_one_super_packet() {
    use ferry_dataplane::port::tap::{self, TapConfig, TapPort};
    use ferry_dataplane::worker::Worker;
    use ferry_testsupport::node;
    if !privileged("a_udp_gro_run_is_routed_once_and_written_to_the_tap_as_one_super_packet") {
        return;
    }
    let mut t = pair(1);
    addr(&t.a, "192.0.2.1/24");
    addr(&t.b, "192.0.2.2/24");
    let pod_ns = t.ns.add(&format!("{}-q", tag()));
    let path = std::path::PathBuf::from(format!("/run/netns/{pod_ns}"));
    let tap_name = "fsr0";
    tap::create_persistent(Some(&path), tap_name, Some(node::pod_mac(2, 1)), 1).expect("create tap");
    run(&["ip", "-n", &pod_ns, "link", "set", tap_name, "mtu", "1450", "up"]);
    // Let the pod's stack take anything (it answers with resets, which go nowhere).
    let tap = TapPort::new(tap::open_queue(Some(&path), tap_name).expect("queue"), tap_name, TapConfig::default());
    let uplink = {
        let _in = InNetns::enter(&t.b.ns);
        let mut cfg =
            UdpPortConfig::new(SocketAddr::V4(SocketAddrV4::new(node::underlay_ip(2), 4789)), node::underlay_mac(2));
        cfg.reuse_port = false;
        cfg.super_packets = true;
        UdpPort::<HeapMem>::open(&cfg).expect("uplink")
    };
    let mut far = {
        let _in = InNetns::enter(&t.a.ns);
        let mut cfg =
            UdpPortConfig::new(SocketAddr::V4(SocketAddrV4::new(node::underlay_ip(1), 4789)), node::underlay_mac(1));
        cfg.reuse_port = false;
        UdpPort::<HeapMem>::open(&cfg).expect("node 1's end")
    };
    // The pod's view: every frame the tap hands its stack, with its virtio-net header.
    let sniffer = {
        let _in = InNetns::enter(&pod_ns);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2); the result is checked and owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor just created and owned by nothing else.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: PACKET_VNET_HDR (15) takes an int.
        let r = unsafe { libc::setsockopt(fd, libc::SOL_PACKET, 15, (&raw const one).cast(), 4) };
        assert_eq!(r, 0, "PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
        let name = std::ffi::CString::new(tap_name).expect("name");
        // SAFETY: all-zero is a valid sockaddr_ll; a NUL-terminated name.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        // SAFETY: a NUL-terminated name.
        sll.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        // SAFETY: a sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(fd, (&raw const sll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t)
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        sock
    };
    let fixture = node::TestNode { pods: 1, frames: 1024, ..node::TestNode::new(2) };
    let mut worker = Worker::new(
        vec![TestPort::Udp(Box::new(uplink)), TestPort::Tap(Box::new(tap))],
        fixture.roles(),
        HeapMem::new(fixture.frames, FRAME_SIZE),
        FreeFrames::all(fixture.frames),
        ferry_dataplane::pipeline::Pipeline::new(fixture.config()),
    );
    let fib = fixture.tables().current();

    const MSS: usize = 1380;
    let a = |i: u32, f: &dyn Fn(Step) -> Step| pod_segment(40000, 1000 + i * MSS as u32, MSS, 100 + i as u16, f);
    type Step = etherparse::PacketBuilderStep<etherparse::TcpHeader>;
    let plain = |b: Step| b;
    let first: Vec<Vec<u8>> = (0..20).map(|i| if i == 19 { a(i, &|b: Step| b.psh()) } else { a(i, &plain) }).collect();
    let mixed: Vec<Vec<u8>> = vec![
        a(20, &plain),
        a(21, &plain),
        pod_segment(40001, 5000, MSS, 900, plain),
        a(22, &plain),
        a(24, &plain),
        a(25, &|b: Step| b.fin()),
    ];
    let tpl = TunnelTemplate::new(&TemplateParams::new(
        TunnelKind::Vxlan,
        1,
        node::underlay_mac(1),
        node::underlay_mac(2),
        IpAddr::V4(node::underlay_ip(1)),
        IpAddr::V4(node::underlay_ip(2)),
    ))
    .expect("template");
    let (mut mem, mut free) = (HeapMem::new(FRAMES, FRAME_SIZE), FreeFrames::all(FRAMES));
    for batch in [&first, &mixed] {
        let mut pkts = Vec::new();
        for f in batch.iter() {
            let id = free.pop().expect("frame");
            let buf = mem.frame_mut(id);
            let off = usize::from(RX_HEADROOM);
            buf[off..off + f.len()].copy_from_slice(f);
            let mut fb = FrameBuf::new(buf, off, f.len()).expect("frame");
            encap_with(&tpl, &mut fb, 0, 7).expect("encap");
            pkts.push(Pkt { frame: id, offset: fb.start() as u16, len: fb.len() as u16 });
        }
        assert_eq!(far.send(&mut mem, &pkts), pkts.len());
        far.flush().expect("flush");
        far.reclaim(&mut free);
    }
    assert_eq!(far.udp_stats().tx_messages, 2, "two UDP_SEGMENT messages: {:?}", far.udp_stats());

    // (source port, first sequence number, payload bytes, segments per its virtio-net header).
    let want = [
        (40000u16, 1000u32, 20 * MSS, 20u16),
        (40000, 1000 + 20 * MSS as u32, 2 * MSS, 2),
        (40001, 5000, MSS, 1),
        (40000, 1000 + 22 * MSS as u32, MSS, 1),
        (40000, 1000 + 24 * MSS as u32, 2 * MSS, 2),
    ];
    let mut got = Vec::new();
    let mut buf = vec![0u8; 80 * 1024];
    let until = deadline(5);
    while got.len() < want.len() && std::time::Instant::now() < until {
        worker.poll_once(&*fib);
        loop {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut fl = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: a live buffer of the length passed, and a sockaddr_ll with its size.
            let n = unsafe {
                libc::recvfrom(
                    std::os::fd::AsRawFd::as_raw_fd(&sniffer),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &raw mut fl,
                )
            };
            if n <= 0 {
                break;
            }
            // Only what the tap delivered: not the pod's own resets and solicitations.
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let (hdr, frame) = buf[..n as usize].split_at(10);
            if u16::from_be_bytes([frame[12], frame[13]]) != 0x0800 {
                continue;
            }
            let mut frame = frame.to_vec();
            let (flags, gso_type) = (hdr[0], hdr[1]);
            let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
            if flags & 1 != 0 {
                // NEEDS_CSUM: complete it the way the kernel's checksum help does.
                let (start, at) =
                    (usize::from(u16::from_le_bytes([hdr[6], hdr[7]])), u16::from_le_bytes([hdr[8], hdr[9]]));
                let at = start + usize::from(at);
                let c = ferry_encap::checksum::finish_sum(ferry_encap::checksum::sum(&frame[start..]));
                frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
            let sp = etherparse::SlicedPacket::from_ethernet(&frame).expect("parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = &sp.net else { panic!("IPv4") };
            let h = ip.header();
            assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum(), "IPv4 checksum");
            assert_eq!(usize::from(h.total_len()), frame.len() - 14, "IP length covers the frame");
            let Some(etherparse::TransportSlice::Tcp(tcp)) = &sp.transport else { panic!("TCP") };
            assert_eq!(
                tcp.checksum(),
                tcp.calc_checksum_ipv4(h.source(), h.destination()).expect("sum"),
                "TCP checksum"
            );
            assert_eq!(&frame[..6], &node::pod_mac(2, 1).0, "delivered to the pod's MAC");
            let seq = tcp.sequence_number();
            for (k, b) in tcp.payload().iter().enumerate() {
                assert_eq!(*b, payload_byte(seq + k as u32), "payload byte {k} of the packet at {seq}");
            }
            let segments = if gso_type == 0 {
                1
            } else {
                assert_eq!((gso_type & 0x7f, usize::from(gso_size)), (1, MSS), "TCPv4 GSO at the MSS");
                tcp.payload().len().div_ceil(MSS) as u16
            };
            if seq == 1000 {
                assert!(tcp.psh(), "the first run's last segment had PSH");
            }
            if seq == 1000 + 24 * MSS as u32 {
                assert!(tcp.fin(), "the FIN arrived");
            }
            got.push((tcp.source_port(), seq, tcp.payload().len(), segments));
        }
    }
    let TestPort::Tap(tap) = &worker.ports()[1] else { panic!("port 1 is the pod") };
    let ts = tap.tap_stats();
    let TestPort::Udp(up) = &worker.ports()[0] else { panic!("port 0 is the uplink") };
    let us = up.udp_stats();
    // Flows may interleave differently (the coalescer writes what it holds at the end of a batch).
    let mut sorted = got.clone();
    sorted.sort_unstable();
    let mut want = want.to_vec();
    want.sort_unstable();
    assert_eq!(sorted, want, "what the pod received: {got:?} {ts:?} {us:?}");
    assert_eq!((us.rx_messages, us.rx_datagrams), (2, 26), "two UDP_GRO buffers: {us:?}");
    assert_eq!((us.rx_runs, us.rx_run_segments), (2, 20), "two runs took the path, 19 + 1 after their heads: {us:?}");
    assert_eq!((ts.run_writes, ts.run_segments), (2, 22), "each run one write: {ts:?}");
    let c = worker.counters();
    assert_eq!((c.rx[0].packets, c.tx[1].packets), (26, 26), "counted per segment");
    assert_eq!(worker.frames_accounted(), fixture.frames as usize);
    let _ = tap::delete(Some(&path), tap_name);
}
