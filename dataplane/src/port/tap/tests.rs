//! The tap port over a `SOCK_SEQPACKET` socket pair standing in for the tap: like a tap queue, each
//! `read` returns one record (virtio-net header and frame), writes never merge, and a full peer
//! makes writes fail with `EAGAIN`. No privileges needed.

use std::os::fd::FromRawFd;

use ferry_encap::checksum;
use ferry_encap::wire::virtio_net::{Gso, flags as vflags};

use super::*;
use crate::frame::HeapMem;
use ferry_encap::wire::virtio_net::VirtioNetHdr;

const MSS: usize = 1400;
const FRAME: usize = 2048;

fn pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: fresh descriptors owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn put(fd: &OwnedFd, vnet: &VirtioNetHdr, frame: &[u8]) {
    let mut rec = vnet.to_bytes().to_vec();
    rec.extend_from_slice(frame);
    // SAFETY: writes from a live buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), rec.as_ptr().cast(), rec.len()) };
    assert_eq!(n, rec.len() as isize, "write: {}", io::Error::last_os_error());
}

/// Every record waiting on `fd` (non-blocking), parsed.
fn take_all(fd: &OwnedFd) -> Vec<(VirtioNetHdr, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        // SAFETY: reads into a live buffer of that length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            return out;
        }
        let rec = &buf[..n as usize];
        out.push((VirtioNetHdr::parse(rec).expect("header"), rec[virtio_net::HEADER_LEN..].to_vec()));
    }
}

fn payload(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

const SRC: [u8; 4] = [10, 244, 1, 5];
const DST: [u8; 4] = [10, 244, 2, 9];
/// TCP options: NOP, NOP, timestamps.
const OPTS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
const L4: usize = 34;
const HDR: usize = L4 + 20 + OPTS.len();

/// An IPv4 TCP frame; `partial`: the checksum field holds the pseudo-header sum (as a tap hands over).
fn tcp(id: u16, seq: u32, tcp_flags: u8, data: &[u8], partial: bool) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa, 0x08, 0x00];
    let l4_len = 20 + OPTS.len() + data.len();
    f.extend([0x45, 0]);
    f.extend(((20 + l4_len) as u16).to_be_bytes());
    f.extend(id.to_be_bytes());
    f.extend([0x40, 0, 64, 6, 0, 0]);
    f.extend(SRC);
    f.extend(DST);
    let c = checksum::of(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend(40_000u16.to_be_bytes());
    f.extend(5201u16.to_be_bytes());
    f.extend(seq.to_be_bytes());
    f.extend(77u32.to_be_bytes());
    f.push(((20 + OPTS.len()) as u8 / 4) << 4);
    f.push(tcp_flags);
    f.extend(502u16.to_be_bytes());
    f.extend([0, 0, 0, 0]);
    f.extend(OPTS);
    f.extend(data);
    let pseudo = checksum::pseudo_v4(SRC.into(), DST.into(), 6, l4_len as u16);
    let c =
        if partial { !checksum::finish_sum(pseudo) } else { checksum::finish_sum(pseudo + checksum::sum(&f[L4..])) };
    f[L4 + 16..L4 + 18].copy_from_slice(&c.to_be_bytes());
    f
}

fn tso() -> VirtioNetHdr {
    VirtioNetHdr {
        needs_csum: true,
        gso: Gso::TcpV4,
        hdr_len: HDR as u16,
        gso_size: MSS as u16,
        csum_start: L4 as u16,
        csum_offset: 16,
        ..VirtioNetHdr::NONE
    }
}

fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let l4_len = frame.len() - L4;
    let pseudo = checksum::pseudo_v4(SRC.into(), DST.into(), 6, l4_len as u16);
    checksum::verifies(pseudo, &frame[L4..])
}

fn udp_frame() -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa, 0x08, 0x00];
    f.extend([0x45, 0, 0, 32, 0, 1, 0x40, 0, 64, 17, 0, 0]);
    f.extend(SRC);
    f.extend(DST);
    let c = checksum::of(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend([0x30, 0x39, 0x30, 0x39, 0, 12, 0, 0, 1, 2, 3, 4]);
    f
}

struct Rig {
    port: TapPort<HeapMem>,
    peer: OwnedFd,
    mem: HeapMem,
    free: FreeFrames,
    count: usize,
}

fn rig(frames: u32, cfg: TapConfig) -> Rig {
    let (a, b) = pair();
    Rig {
        port: TapPort::new(a, "tap0", cfg),
        peer: b,
        mem: HeapMem::new(frames, FRAME),
        free: FreeFrames::all(frames),
        count: frames as usize,
    }
}

impl Rig {
    /// Frames the rig's test holds (received, not given back) must make up the difference.
    fn conserved(&self, held_by_test: usize) {
        assert_eq!(self.free.len() + self.port.frames_held() + held_by_test, self.count, "every frame in one place");
    }
}

fn blank() -> Pkt {
    Pkt { frame: FrameId(0), offset: 0, len: 0 }
}

#[test]
fn a_super_packet_is_cut_into_frames_at_the_headroom_and_waits_for_frames_when_they_run_out() {
    let mut r = rig(64, TapConfig { rx_frames: 10, ..TapConfig::default() });
    let data = payload(7, 20_000);
    put(&r.peer, &tso(), &tcp(100, 5000, 0x18, &data, true));
    assert_eq!(r.port.refill(&mut r.free), 10);
    let mut out = [blank(); 64];
    let mut got = Vec::new();
    let n = r.port.recv(&mut r.mem, &mut out);
    assert_eq!(n, 10, "as many segments as frames lent");
    assert!(r.port.has_pending());
    got.extend_from_slice(&out[..n]);
    r.conserved(got.len());
    // No frame lent: nothing more, and nothing lost.
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 0);
    assert_eq!(r.port.refill(&mut r.free), 10);
    // A batch of 3: the caller's room bounds it too.
    let n = r.port.recv(&mut r.mem, &mut out[..3]);
    got.extend_from_slice(&out[..n]);
    assert_eq!(n, 3);
    let n = r.port.recv(&mut r.mem, &mut out);
    got.extend_from_slice(&out[..n]);
    assert!(!r.port.has_pending());
    let segs = data.len().div_ceil(MSS);
    assert_eq!(got.len(), segs, "15 segments of 1400 bytes at most");
    r.conserved(got.len());
    let mut joined = Vec::new();
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.offset, super::super::xsk::RX_HEADROOM, "at the AF_XDP headroom");
        let f = r.mem.bytes(*p);
        assert!(tcp_checksum_ok(f), "segment {i}: checksum completed for the wire");
        assert_eq!(checksum::of(&f[14..34]), 0, "segment {i}: IPv4 header checksum");
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 100 + i as u16, "IPv4 ID per segment");
        let seq = u32::from_be_bytes([f[L4 + 4], f[L4 + 5], f[L4 + 6], f[L4 + 7]]);
        assert_eq!(seq as usize, 5000 + i * MSS);
        assert_eq!(f[L4 + 13] & 0x08 != 0, i + 1 == segs, "PSH on the last segment only");
        joined.extend_from_slice(&f[HDR..]);
    }
    assert_eq!(joined, data);
    let s = r.port.tap_stats();
    assert_eq!((s.reads, s.gso_reads, s.rx_packets, s.rx_dropped()), (1, 1, segs as u64, 0));
    for p in got {
        r.free.push(p.frame);
    }
    r.conserved(0);
    let Rig { port, mut free, count, .. } = r;
    port.release(&mut free);
    assert_eq!((free.len(), free.refused()), (count, 0));
}

#[test]
fn plain_frames_get_their_checksum_completed_and_bad_headers_are_counted_drops() {
    let mut r = rig(16, TapConfig::default());
    let data = payload(3, 300);
    let partial = tcp(1, 1, 0x18, &data, true);
    assert!(!tcp_checksum_ok(&partial));
    let plain = VirtioNetHdr { gso: Gso::None, ..tso() };
    // A GSO header without NEEDS_CSUM, a GSO type that does not match the packet, then a good one.
    put(&r.peer, &VirtioNetHdr { needs_csum: false, ..tso() }, &partial);
    put(&r.peer, &VirtioNetHdr { gso: Gso::TcpV6, ..tso() }, &partial);
    put(&r.peer, &plain, &partial);
    put(&r.peer, &VirtioNetHdr::NONE, &udp_frame());
    r.port.refill(&mut r.free);
    let mut out = [blank(); 8];
    let n = r.port.recv(&mut r.mem, &mut out);
    assert_eq!(n, 2);
    let f = r.mem.bytes(out[0]);
    assert!(tcp_checksum_ok(f), "NEEDS_CSUM completed");
    assert_eq!(&f[HDR..], &data[..]);
    assert_eq!(r.mem.bytes(out[1]), &udp_frame()[..]);
    let s = r.port.tap_stats();
    assert_eq!(s.rx_drops(DropReason::VnetBadHeader), 1);
    assert_eq!(s.rx_drops(DropReason::GsoUnsupported), 1);
    assert_eq!((s.reads, s.gso_reads, s.rx_dropped()), (4, 0, 2));
    assert_eq!(r.port.stats().rx_dropped, 2, "the port's drops reach PortStats");
    r.conserved(2);
}

#[test]
fn a_segment_longer_than_a_frame_is_a_counted_drop() {
    let mut r = rig(8, TapConfig::default());
    let data = payload(5, 4000);
    // MSS 3000: each segment is longer than a 2048-byte frame less the headroom.
    put(&r.peer, &VirtioNetHdr { gso_size: 3000, ..tso() }, &tcp(1, 1, 0x10, &data, true));
    r.port.refill(&mut r.free);
    let mut out = [blank(); 8];
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 0);
    assert_eq!(r.port.tap_stats().rx_drops(DropReason::GsoNoRoom), 1);
    r.conserved(0);
}

#[test]
fn sent_segments_leave_coalesced_and_their_frames_are_free_at_once() {
    let mut r = rig(64, TapConfig::default());
    let data = payload(9, 10 * MSS);
    let mut pkts = Vec::new();
    let load = |r: &mut Rig, bytes: &[u8]| {
        let f = r.free.pop().expect("frame");
        r.mem.frame_mut(f)[256..256 + bytes.len()].copy_from_slice(bytes);
        Pkt { frame: f, offset: 256, len: bytes.len() as u16 }
    };
    for (i, c) in data.chunks(MSS).enumerate() {
        let flags = if i == 9 { 0x18 } else { 0x10 };
        let seg = tcp(10 + i as u16, 1000 + (i * MSS) as u32, flags, c, false);
        pkts.push(load(&mut r, &seg));
    }
    let udp = udp_frame();
    pkts.insert(3, load(&mut r, &udp));
    assert_eq!(r.port.send(&mut r.mem, &pkts), pkts.len());
    assert_eq!(r.port.frames_held(), pkts.len(), "sent frames wait for reclaim");
    r.conserved(0);
    r.port.flush().expect("flush");
    assert_eq!(r.port.reclaim(&mut r.free), pkts.len());
    r.conserved(0);
    let recs = take_all(&r.peer);
    assert_eq!(recs.len(), 2, "the UDP frame, then one super-packet (PSH ends the run)");
    assert_eq!(recs[0].0, VirtioNetHdr::NONE);
    assert_eq!(recs[0].1, udp);
    let (h, f) = &recs[1];
    assert_eq!(
        (h.gso, h.gso_size, h.needs_csum, h.csum_start, h.csum_offset),
        (Gso::TcpV4, MSS as u16, true, L4 as u16, 16)
    );
    assert_eq!(h.flags() & vflags::DATA_VALID, 0);
    assert_eq!(&f[HDR..], &data[..]);
    let s = r.port.tap_stats();
    assert_eq!((s.writes, s.gso_writes, s.tx_dropped, s.tx_errors), (2, 1, 0, 0));
    assert_eq!(s.gro.super_packets, 1);
}

#[test]
fn a_full_tap_queue_is_a_counted_transmit_drop_never_a_block() {
    let mut r = rig(32, TapConfig::default());
    let size: libc::c_int = 4096;
    // SAFETY: sets an int socket option from a live int.
    unsafe {
        libc::setsockopt(r.port.fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, (&raw const size).cast(), 4);
    }
    let udp = udp_frame();
    let mut sent = 0u64;
    for _ in 0..200 {
        let f = r.free.pop().expect("frame");
        r.mem.frame_mut(f)[..udp.len()].copy_from_slice(&udp);
        let p = Pkt { frame: f, offset: 0, len: udp.len() as u16 };
        assert_eq!(r.port.send(&mut r.mem, &[p]), 1);
        sent += 1;
        r.port.reclaim(&mut r.free);
    }
    let s = r.port.tap_stats();
    assert!(s.tx_dropped > 0, "the peer never reads: {s:?}");
    assert_eq!(s.writes + s.tx_dropped, sent, "every packet written or counted");
    assert_eq!(take_all(&r.peer).len() as u64, s.writes);
    r.conserved(0);
}

#[test]
fn release_writes_held_runs_and_returns_every_frame() {
    let mut r = rig(64, TapConfig { rx_frames: 20, idle_frames: 20, ..TapConfig::default() });
    let data = payload(1, 3 * MSS);
    let mut pkts = Vec::new();
    for (i, c) in data.chunks(MSS).enumerate() {
        let seg = tcp(i as u16, (i * MSS) as u32, 0x10, c, false);
        let f = r.free.pop().expect("frame");
        r.mem.frame_mut(f)[..seg.len()].copy_from_slice(&seg);
        pkts.push(Pkt { frame: f, offset: 0, len: seg.len() as u16 });
    }
    r.port.refill(&mut r.free);
    r.port.send(&mut r.mem, &pkts);
    assert_eq!(r.port.frames_held(), 20 + 3);
    r.conserved(0);
    let Rig { port, mut free, count, peer, .. } = r;
    port.release(&mut free);
    assert_eq!((free.len(), free.refused()), (count, 0));
    let recs = take_all(&peer);
    assert_eq!(recs.len(), 1, "the held run was written on release");
    assert_eq!(&recs[0].1[HDR..], &data[..]);
}

#[test]
fn a_batch_carries_whole_super_packets_when_it_can() {
    let mut r = rig(128, TapConfig::default());
    let data = payload(11, 15 * MSS);
    put(&r.peer, &tso(), &tcp(1, 0, 0x10, &data, true));
    put(&r.peer, &tso(), &tcp(16, (15 * MSS) as u32, 0x18, &data, true));
    r.port.refill(&mut r.free);
    let mut out = [blank(); 20];
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 15, "the second super-packet does not fit the 5 left: it waits");
    assert!(r.port.has_pending());
    r.port.refill(&mut r.free);
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 15);
    assert!(!r.port.has_pending());
    let s = r.port.tap_stats();
    assert_eq!((s.reads, s.gso_reads, s.rx_packets), (2, 2, 30), "a deferred super-packet is counted once");
    // Larger than a whole batch: cut across batches rather than never delivered.
    let big = payload(12, 30 * MSS);
    put(&r.peer, &tso(), &tcp(40, 0, 0x10, &big, true));
    r.port.refill(&mut r.free);
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 20);
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 10);
    r.conserved(60);
}

#[test]
fn a_tap_port_on_the_agents_memory_can_move_to_a_worker_thread() {
    fn send<T: Send>() {}
    send::<TapPort<crate::port::xsk::XskMem>>();
    send::<TapPort<HeapMem>>();
}

#[test]
fn an_idle_port_keeps_few_frames_and_a_busy_one_many() {
    let mut r = rig(256, TapConfig { rx_frames: 100, idle_frames: 8, ..TapConfig::default() });
    assert_eq!(r.port.refill(&mut r.free), 8, "idle from the start");
    let data = payload(4, 20 * MSS);
    put(&r.peer, &tso(), &tcp(1, 0, 0x10, &data, true));
    let mut out = [blank(); 64];
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 8, "a burst meets the idle reserve");
    assert!(r.port.has_pending());
    assert_eq!(r.port.refill(&mut r.free), 100, "busy: topped up to rx_frames");
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 12, "the rest of the super-packet");
    r.conserved(20);
    assert_eq!(r.port.refill(&mut r.free), 12, "still busy after receiving");
    assert_eq!(r.port.frames_held(), 100);
    assert_eq!(r.port.recv(&mut r.mem, &mut out), 0);
    assert_eq!(r.port.refill(&mut r.free), 0, "idle again: nothing taken");
    assert_eq!(r.port.frames_held(), 8, "and the surplus given back");
    r.conserved(20);
    assert_eq!(r.free.refused(), 0);
}
