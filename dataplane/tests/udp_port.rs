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
    assert_eq!(got, data, "the whole payload arrived: {s:?}");
    assert_eq!((s.rx_dropped, s.rx_super), (0, 1), "one super-packet, nothing dropped: {s:?}");
    assert_eq!(segments, data.len().div_ceil(1398), "cut at the MSS that fills the inner MTU");
    b.release(&mut free);
    assert_eq!(free.len(), FRAMES as usize);
}
