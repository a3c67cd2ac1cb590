//! A pod port over one queue of a multi-queue tap with virtio-net headers: the pod's TCP stack
//! moves 64 KB super-packets through it (hot path: [`TapPort`]; setup side: [`create_persistent`],
//! [`open_queue`], [`delete`]).
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`, a 12-byte
//! virtio-net header and the offloads `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6` (and `TSO_ECN`), so
//! every `read` returns one frame, a TCP super-packet of up to 64 KB among them, behind a
//! [`VirtioNetHdr`](ferry_encap::wire::virtio_net::VirtioNetHdr) that says how to cut it, and
//! every `write` may hand the kernel one.
//!
//! - **Receive** ([`Port::recv`]): one non-blocking `read` into the port's own 64 KB+ buffer, then
//!   [`Segmenter`] writes the packet, or each MSS-sized segment of a super-packet, into a frame the
//!   worker lent ([`Port::refill`]) at [`TapConfig::rx_offset`] (the AF_XDP headroom, so
//!   encapsulation prepends in place), checksums completed: segments go on the wire. When the
//!   frames or the caller's batch run out in the middle of a super-packet, the rest waits in the
//!   buffer for the next call: nothing is dropped for want of a frame, and nothing more is read
//!   until it is delivered (the kernel holds further frames in the tap's queue). A super-packet
//!   that does not fit whole in what is left of a batch waits for the next one (unless the batch
//!   is still empty), so a batch carries whole super-packets and the far side coalesces whole runs
//!   (64 KB writes rather than two halves). A tap needs no frame until ferry reads, so an idle port
//!   keeps only [`TapConfig::idle_frames`] lent and gives the rest back: many pods on one worker
//!   do not hoard its frames.
//! - **Transmit** ([`Port::send`]): each packet goes through a [`Coalescer`] (Linux's GRO rules);
//!   what leaves it (a super-packet, a segment that could not merge, a non-TCP frame) is written at
//!   once with `writev(virtio-net header, frame)`. The packet's bytes are copied (into the
//!   coalescer, or into the kernel), so its frame is free when `send` returns and comes back with
//!   the next [`Port::reclaim`]. [`Port::flush`] writes the runs still held. A tap never blocks
//!   the worker: a write the kernel refuses (`EAGAIN`, `ENOBUFS`, an error) is counted and the
//!   packet dropped.
//!
//! Drops the port makes itself are counted in [`TapStats`] by reason, and summed in
//! [`PortStats::rx_dropped`] (receive side). Transmit drops are in [`TapStats::tx_dropped`] and
//! [`TapStats::tx_errors`] only: [`PortStats`] has no transmit field yet.
//!
//! With several queues (one per worker), the kernel picks the queue each frame the pod sends is
//! read from (`tun_automq_select_queue`): by the flow's hash, or, once ferry has written packets of
//! the flow's other direction, the queue that wrote them. So a flow stays on one worker as long as
//! its replies are always written by the same worker; a flow whose replies change worker moves
//! with them (which can reorder the few packets in flight at that moment).
//!
//! A tap outlives the agent ([`create_persistent`]: `TUNSETPERSIST`), so a restarted agent attaches
//! its queues again with [`open_queue`]. `TUNSETIFF` looks the name up in the calling thread's
//! network namespace and silently creates a new tap when there is none, so both functions enter
//! the pod's namespace on a short-lived helper thread and `open_queue` refuses a name that does not
//! exist there.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use ferry_encap::gro::{self, Coalescer, GroStats, Output};
use ferry_encap::gso::{Checksum, Segmenter};
use ferry_encap::wire::virtio_net;
use ferry_encap::{DropReason, MacAddr};
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use super::{Port, PortStats, SegmentRun, SuperHead};
use crate::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use crate::kernel;

/// Kernel constants from `<linux/if_tun.h>` (stable UAPI). Debian 12's headers (6.1) and the
/// `libc` crate stop short of the newer offload bits, so ferry spells out every value it uses.
pub mod sys {
    /// `_IOW('T', 202, int)`: attach this descriptor to a tap (creating it if there is none).
    pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    /// `_IOW('T', 203, int)`: keep the device when its last descriptor closes.
    pub const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    /// `_IOW('T', 208, unsigned int)`: the offloads the reader accepts (`TUN_F_*`).
    pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
    /// `_IOW('T', 216, int)`: the virtio-net header length.
    pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

    /// A tap (Ethernet frames), not a tun.
    pub const IFF_TAP: libc::c_short = 0x0002;
    /// No packet information prefix.
    pub const IFF_NO_PI: libc::c_short = 0x1000;
    /// One descriptor per queue.
    pub const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
    /// A virtio-net header in front of every frame.
    pub const IFF_VNET_HDR: libc::c_short = 0x4000;
    /// The flags ferry's taps are created and attached with.
    pub const TAP_FLAGS: libc::c_short = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;

    /// The reader completes checksums (`NEEDS_CSUM` frames may come).
    pub const TUN_F_CSUM: libc::c_uint = 0x01;
    /// TCP over IPv4 super-packets may come.
    pub const TUN_F_TSO4: libc::c_uint = 0x02;
    /// TCP over IPv6 super-packets may come.
    pub const TUN_F_TSO6: libc::c_uint = 0x04;
    /// TCP super-packets with CWR may come (the ECN bit of `gso_type`).
    pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;
    /// UDP segmentation offload, IPv4 (accepted only together with [`TUN_F_USO6`]).
    pub const TUN_F_USO4: libc::c_uint = 0x20;
    /// UDP segmentation offload, IPv6.
    pub const TUN_F_USO6: libc::c_uint = 0x40;
}

/// The offload sets tried in turn on each queue, best first; the first the kernel accepts stays.
pub const OFFLOAD_PROBE: [libc::c_uint; 4] = [
    sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6 | sys::TUN_F_TSO_ECN,
    sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6,
    sys::TUN_F_CSUM,
    0,
];

/// Most queues a tap has (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_QUEUES: u32 = 256;

/// Most iovecs of one [`Port::send_run`] write: the header, the head, 64 more segments.
const SEND_RUN_IOVS: usize = 2 + 64;

/// The device every tap is opened through.
const TUN_DEV: &str = "/dev/net/tun";

/// The read buffer: a header, a VLAN-tagged Ethernet header and the largest IP packet a tap hands
/// over (`GSO_LEGACY_MAX_SIZE`, 65,536), rounded up. A read that fills it was cut short.
const READ_BUF: usize = 72 * 1024;

/// How the port uses frames and memory.
#[derive(Debug, Clone, Copy)]
pub struct TapConfig {
    /// Frames kept lent for receiving while traffic flows (a 64 KB super-packet is 47 segments
    /// at MSS 1398).
    pub rx_frames: usize,
    /// Frames kept lent while the port is idle (no packet received since the last refill). A tap,
    /// unlike an AF_XDP socket, needs no frame until ferry reads, so an idle pod's port gives the
    /// rest back to the worker, and many pods on one worker do not hoard its frames.
    pub idle_frames: usize,
    /// Offset in a frame at which received packets are written: the AF_XDP headroom, so the
    /// pipeline encapsulates in place.
    pub rx_offset: u16,
    /// TCP flows the coalescer holds runs for at once (each takes [`gro::SLOT_LEN`] bytes, about
    /// 64 KB); clamped to 1..=[`gro::MAX_FLOWS`]. The storage is allocated zeroed, so the kernel
    /// commits a slot's pages only once a flow uses it: a pod with one bulk flow costs one slot.
    pub gro_flows: usize,
    /// Deliver a TCP super-packet's first segment alone, at the end of a batch, and keep the rest
    /// for the worker's super-packet path ([`Port::super_head`]): routed once, its other segments
    /// written straight into the egress port (the UDP uplink). When the worker declines (another
    /// egress), the rest comes as ordinary packets, and the next [`SUPER_BACKOFF`] super-packets
    /// are delivered whole without asking.
    pub super_packets: bool,
}

/// Super-packets delivered the ordinary way after the worker declined one.
pub const SUPER_BACKOFF: u32 = 16;

impl Default for TapConfig {
    fn default() -> Self {
        TapConfig {
            rx_frames: 128,
            idle_frames: 16,
            rx_offset: super::xsk::RX_HEADROOM,
            gro_flows: 8,
            super_packets: false,
        }
    }
}

/// What a tap port did (exact, kept on the worker's thread).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TapStats {
    /// Frames read from the tap.
    pub reads: u64,
    /// Of those, super-packets that were cut into more than one segment.
    pub gso_reads: u64,
    /// Bytes read (frames, without the virtio-net header).
    pub read_bytes: u64,
    /// Packets handed to the worker (segments included).
    pub rx_packets: u64,
    /// Of those, segments the worker sent by the super-packet path (after the first segment of
    /// each super-packet, without a pipeline pass of their own).
    pub super_segments: u64,
    /// Frames read and dropped, by reason (malformed headers, GSO packets ferry cannot cut,
    /// segments that do not fit a frame).
    pub rx_drops: [u64; DropReason::COUNT],
    /// `read` failures other than "nothing to read".
    pub read_errors: u64,
    /// Frames written to the tap.
    pub writes: u64,
    /// Of those, coalesced super-packets.
    pub gso_writes: u64,
    /// Bytes written (frames, without the virtio-net header).
    pub write_bytes: u64,
    /// Of the writes, super-packets written straight from a run of the UDP uplink's received
    /// datagrams ([`Port::send_run`]: the worker's super-packet path, receive side).
    pub run_writes: u64,
    /// Segments those carried (each run's head included).
    pub run_segments: u64,
    /// Packets (segments) dropped because the tap's queue was full (`EAGAIN`, `ENOBUFS`).
    pub tx_dropped: u64,
    /// Packets (segments) dropped because the kernel refused the write otherwise (the device is
    /// down: `EIO`; a malformed packet: `EINVAL`), or the descriptor was not in its frame.
    pub tx_errors: u64,
    /// The coalescer's counts.
    pub gro: GroStats,
}

impl Default for TapStats {
    fn default() -> Self {
        TapStats {
            reads: 0,
            gso_reads: 0,
            read_bytes: 0,
            rx_packets: 0,
            super_segments: 0,
            rx_drops: [0; DropReason::COUNT],
            read_errors: 0,
            writes: 0,
            gso_writes: 0,
            write_bytes: 0,
            run_writes: 0,
            run_segments: 0,
            tx_dropped: 0,
            tx_errors: 0,
            gro: GroStats::default(),
        }
    }
}

impl std::fmt::Debug for TapStats {
    /// Drop reasons by name, the ones counted only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let drops: Vec<_> = DropReason::ALL
            .iter()
            .filter(|r| self.rx_drops[**r as usize] > 0)
            .map(|r| (r.name(), self.rx_drops[*r as usize]))
            .collect();
        f.debug_struct("TapStats")
            .field("reads", &self.reads)
            .field("gso_reads", &self.gso_reads)
            .field("read_bytes", &self.read_bytes)
            .field("rx_packets", &self.rx_packets)
            .field("super_segments", &self.super_segments)
            .field("rx_drops", &drops)
            .field("read_errors", &self.read_errors)
            .field("writes", &self.writes)
            .field("gso_writes", &self.gso_writes)
            .field("write_bytes", &self.write_bytes)
            .field("run_writes", &self.run_writes)
            .field("run_segments", &self.run_segments)
            .field("tx_dropped", &self.tx_dropped)
            .field("tx_errors", &self.tx_errors)
            .field("gro", &self.gro)
            .finish()
    }
}

impl TapStats {
    /// Frames read and dropped, all reasons, plus failed reads.
    pub fn rx_dropped(&self) -> u64 {
        self.rx_drops.iter().sum::<u64>() + self.read_errors
    }

    /// Drops under one reason.
    pub fn rx_drops(&self, reason: DropReason) -> u64 {
        self.rx_drops[reason as usize]
    }
}

/// A super-packet partly delivered: `len` bytes in the read buffer, segments from `next` on still
/// to go.
#[derive(Debug, Clone, Copy)]
struct Pending {
    len: usize,
    next: usize,
}

/// A port over one queue of a tap (see the module docs), on frame memory `M`.
pub struct TapPort<M> {
    fd: OwnedFd,
    name: String,
    cfg: TapConfig,
    /// Frames lent for receiving.
    lent: Vec<FrameId>,
    /// Frames of sent packets, free, until the next reclaim.
    done: Vec<FrameId>,
    buf: Box<[u8]>,
    pending: Option<Pending>,
    /// The last `recv` ended with a super-packet's first segment; `pending` holds the rest.
    super_head: Option<SuperHead>,
    /// Super-packets still to deliver the ordinary way after the worker declined one.
    super_off: u32,
    /// A packet was received since the last refill.
    busy: bool,
    gro: Coalescer<Box<[u8]>>,
    stats: TapStats,
    _mem: PhantomData<fn() -> M>,
}

impl<M> std::fmt::Debug for TapPort<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapPort")
            .field("fd", &self.fd)
            .field("name", &self.name)
            .field("cfg", &self.cfg)
            .field("lent", &self.lent.len())
            .field("done", &self.done.len())
            .field("pending", &self.pending)
            .field("gro_held", &self.gro.held())
            .finish_non_exhaustive()
    }
}

impl<M: FrameMem> TapPort<M> {
    /// A port over `fd`, one queue of a tap opened with [`open_queue`] (or any descriptor that
    /// reads and writes one virtio-net header and frame per call). The descriptor is made
    /// non-blocking.
    pub fn new(fd: OwnedFd, name: &str, cfg: TapConfig) -> Self {
        set_nonblocking(fd.as_raw_fd());
        let flows = cfg.gro_flows.clamp(1, gro::MAX_FLOWS);
        let storage = vec![0u8; gro::storage_len(flows)].into_boxed_slice();
        // One flow's storage always fits: `flows` is at least 1.
        let gro = Coalescer::new(storage).expect("storage for at least one flow");
        TapPort {
            fd,
            name: name.to_owned(),
            cfg,
            lent: Vec::with_capacity(cfg.rx_frames),
            done: Vec::with_capacity(4 * crate::worker::BATCH),
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            pending: None,
            super_head: None,
            super_off: 0,
            busy: false,
            gro,
            stats: TapStats::default(),
            _mem: PhantomData,
        }
    }

    /// What the port did so far.
    pub fn tap_stats(&self) -> TapStats {
        TapStats { gro: self.gro.stats(), ..self.stats }
    }

    /// Whether part of a super-packet waits for frames.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The tap descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// One frame from the tap into the read buffer: its length with the header, or `None` when
    /// there is nothing to read (or the read failed, counted).
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            // SAFETY: reads at most `buf.len()` bytes into the port's own buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n > 0 {
                return Some(n as usize);
            }
            if n == 0 {
                return None;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => return None,
                _ => {
                    // The device is gone or down (EBADFD, EIO): counted; the worker keeps polling.
                    self.stats.read_errors += 1;
                    return None;
                }
            }
        }
    }
}

impl<M: FrameMem> Port for TapPort<M> {
    type Mem = M;

    fn name(&self) -> &str {
        &self.name
    }

    fn recv(&mut self, mem: &mut M, out: &mut [Pkt]) -> usize {
        let mut n = 0;
        self.super_head = None;
        // Each read yields at least one packet or a counted drop: bounded by the batch.
        let mut reads = 0;
        while n < out.len() && !self.lent.is_empty() {
            let (len, next, fresh) = match self.pending.take() {
                Some(p) => (p.len, p.next, false),
                None => {
                    if reads == out.len() {
                        break;
                    }
                    reads += 1;
                    let Some(len) = self.read_frame() else { break };
                    self.stats.reads += 1;
                    self.stats.read_bytes += (len.saturating_sub(virtio_net::HEADER_LEN)) as u64;
                    if len == self.buf.len() {
                        self.stats.rx_drops[DropReason::Truncated as usize] += 1;
                        continue;
                    }
                    (len, 0, true)
                }
            };
            let TapPort { buf, lent, stats, pending, cfg, super_head, super_off, .. } = self;
            let seg = match Segmenter::from_tap(&buf[..len]) {
                Ok((_, s)) => s,
                Err(reason) => {
                    stats.rx_drops[reason as usize] += 1;
                    continue;
                }
            };
            let off = usize::from(cfg.rx_offset);
            if off + seg.max_segment_len() > mem.frame_size() {
                stats.rx_drops[DropReason::GsoNoRoom as usize] += 1;
                continue;
            }
            if fresh && seg.is_gso() {
                stats.gso_reads += 1;
            }
            let left = seg.segments() - next;
            if cfg.super_packets && next == 0 && left > 1 && super_eligible(&seg) {
                if *super_off > 0 {
                    *super_off -= 1;
                } else {
                    // The first segment ends the batch; the worker takes the rest (or declines).
                    if n > 0 {
                        *pending = Some(Pending { len, next });
                        break;
                    }
                    let Some(frame) = lent.pop() else {
                        *pending = Some(Pending { len, next });
                        break;
                    };
                    match seg.write_segment(0, &mut mem.frame_mut(frame)[off..], Checksum::Complete) {
                        Ok(l) => {
                            out[0] = Pkt { frame, offset: cfg.rx_offset, len: l as u16 };
                            n = 1;
                            *pending = Some(Pending { len, next: 1 });
                            *super_head = Some(SuperHead {
                                header_len: seg.header_len(),
                                first_len: l,
                                segments: seg.segments(),
                            });
                        }
                        Err(reason) => {
                            stats.rx_drops[reason as usize] += 1;
                            lent.push(frame);
                        }
                    }
                    break;
                }
            }
            if n > 0 && next == 0 && (left > out.len() - n || left > lent.len()) {
                // A super-packet that does not fit whole waits for the next batch, so a batch
                // holds whole super-packets and the other side coalesces whole runs again.
                *pending = Some(Pending { len, next });
                break;
            }
            let mut i = next;
            while i < seg.segments() && n < out.len() {
                let Some(frame) = lent.pop() else { break };
                match seg.write_segment(i, &mut mem.frame_mut(frame)[off..], Checksum::Complete) {
                    Ok(l) => {
                        // A segment fits a frame (checked above), and frames are at most 64 KB.
                        out[n] = Pkt { frame, offset: cfg.rx_offset, len: l as u16 };
                        n += 1;
                    }
                    Err(reason) => {
                        stats.rx_drops[reason as usize] += 1;
                        lent.push(frame);
                    }
                }
                i += 1;
            }
            if i < seg.segments() {
                *pending = Some(Pending { len, next: i });
            }
        }
        self.stats.rx_packets += n as u64;
        self.busy |= n > 0;
        n
    }

    fn send(&mut self, mem: &mut M, pkts: &[Pkt]) -> usize {
        let TapPort { fd, gro, stats, done, .. } = self;
        let fd = fd.as_raw_fd();
        for p in pkts {
            let bytes = (p.frame.0 < mem.frame_count()).then(|| mem.frame(p.frame)).and_then(|f| f.get(p.range()));
            match bytes {
                Some(bytes) => gro.push(bytes, &mut |o: Output<'_>| write_frame(fd, &o, stats)),
                // A descriptor outside its frame: a worker bug, counted, never a panic.
                None => stats.tx_errors += 1,
            }
            done.push(p.frame);
        }
        pkts.len()
    }

    fn flush(&mut self) -> io::Result<()> {
        let TapPort { fd, gro, stats, .. } = self;
        let fd = fd.as_raw_fd();
        gro.flush(&mut |o: Output<'_>| write_frame(fd, &o, stats));
        Ok(())
    }

    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        let n = self.done.len();
        for f in self.done.drain(..) {
            free.push(f);
        }
        n
    }

    /// Top the lent frames up to [`TapConfig::rx_frames`] while traffic flows; when the port is
    /// idle, hand frames beyond [`TapConfig::idle_frames`] back to `free` first. Returns how many
    /// were taken.
    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        let busy = std::mem::take(&mut self.busy) || self.pending.is_some();
        let target = if busy { self.cfg.rx_frames } else { self.cfg.idle_frames.min(self.cfg.rx_frames) };
        while self.lent.len() > target
            && let Some(f) = self.lent.pop()
        {
            free.push(f);
        }
        let mut n = 0;
        while self.lent.len() < target
            && let Some(f) = free.pop()
        {
            self.lent.push(f);
            n += 1;
        }
        n
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn frames_held(&self) -> usize {
        self.lent.len() + self.done.len()
    }

    fn release(mut self, free: &mut FreeFrames) {
        // Runs still held are written out: their frames are already free, their bytes are not
        // lost with the port.
        let _ = self.flush();
        for f in self.lent.drain(..).chain(self.done.drain(..)) {
            free.push(f);
        }
        tracing::debug!(port = %self.name, stats = ?self.tap_stats(), "closed tap queue, frames returned");
    }

    fn stats(&self) -> PortStats {
        PortStats { rx_dropped: self.stats.rx_dropped(), ..PortStats::default() }
    }

    fn super_head(&self) -> Option<SuperHead> {
        self.super_head
    }

    fn super_rest(&mut self, headers: &[u8]) -> Option<Segmenter<'_>> {
        let head = self.super_head?;
        let p = self.pending?;
        let hl = head.header_len;
        let (l3, l4) = {
            let (_, seg) = Segmenter::from_tap(&self.buf[..p.len]).ok()?;
            (seg.l3_offset(), seg.l4_offset())
        };
        if headers.len() != hl || l4 + ferry_encap::wire::tcp::HEADER_LEN > hl {
            return None;
        }
        let frame = &mut self.buf[virtio_net::HEADER_LEN..p.len];
        // The super-packet's own length and flags stay: the segmenter cuts them per segment.
        let v4 = frame[l3] >> 4 == 4;
        let len_at = if v4 { l3 + 2 } else { l3 + 4 };
        let (ip_len, flags) = ([frame[len_at], frame[len_at + 1]], frame[l4 + ferry_encap::wire::tcp::FLAGS_OFFSET]);
        frame[..hl].copy_from_slice(headers);
        frame[len_at..len_at + 2].copy_from_slice(&ip_len);
        frame[l4 + ferry_encap::wire::tcp::FLAGS_OFFSET] = flags;
        if v4 {
            ferry_encap::wire::ipv4::Ipv4Packet::new_unchecked(&mut frame[l3..l4]).fill_checksum();
        }
        Segmenter::from_tap(&self.buf[..p.len]).ok().map(|(_, s)| s)
    }

    /// Write `head` and `run`'s payloads behind it as one super-packet: one `writev` of the
    /// virtio-net header, the head's frame (its headers made the super-packet's) and each
    /// segment's payload where it lies in the uplink's buffer. The runs the coalescer holds are
    /// written first, so a flow is never reordered.
    fn send_run(&mut self, mem: &mut M, head: Pkt, run: &SegmentRun<'_>) -> bool {
        if run.count == 0 || run.count + 2 > SEND_RUN_IOVS {
            return false;
        }
        let extra = run.payload_len();
        let TapPort { fd, gro, stats, done, .. } = self;
        let fd = fd.as_raw_fd();
        if head.frame.0 >= mem.frame_count() {
            return false;
        }
        let Some(frame) = mem.frame_mut(head.frame).get_mut(head.range()) else { return false };
        // Checked before anything is written: `None` leaves the head as it was.
        let Some(vnet) = gro::super_packet_head(frame, run.mss, extra, run.psh) else { return false };
        gro.flush(&mut |o: Output<'_>| write_frame(fd, &o, stats));
        let hdr = vnet.to_bytes();
        let frame = mem.frame(head.frame).get(head.range()).unwrap_or(&[]);
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; SEND_RUN_IOVS];
        iov[0] = libc::iovec { iov_base: hdr.as_ptr() as *mut libc::c_void, iov_len: hdr.len() };
        iov[1] = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
        for i in 0..run.count {
            let p = run.payload(i);
            iov[2 + i] = libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() };
        }
        let segs = 1 + run.count as u64;
        let n = run.count + 2;
        loop {
            // SAFETY: `n` iovecs over live buffers (the header, the head's frame, the uplink's
            // received datagrams) that the kernel only reads.
            let w = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
            if w >= 0 {
                stats.writes += 1;
                stats.gso_writes += 1;
                stats.run_writes += 1;
                stats.run_segments += segs;
                stats.write_bytes += (frame.len() + extra) as u64;
                break;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN | libc::ENOBUFS) => {
                    stats.tx_dropped += segs;
                    break;
                }
                _ => {
                    stats.tx_errors += segs;
                    break;
                }
            }
        }
        done.push(head.frame);
        true
    }

    fn super_done(&mut self, sent: usize) {
        let Some(head) = self.super_head.take() else { return };
        if sent == 0 {
            self.super_off = SUPER_BACKOFF;
            return;
        }
        self.stats.rx_packets += sent as u64;
        self.stats.super_segments += sent as u64;
        if let Some(p) = &mut self.pending {
            p.next = (p.next + sent).min(head.segments);
            if p.next >= head.segments {
                self.pending = None;
            }
        }
    }
}

/// Whether every segment of `seg` meets the same fate as its first, so that the pipeline may run
/// once for all of them: a TCP super-packet whose flags are ACK, PSH, CWR and ECE only (no stage
/// reads PSH or CWR; a FIN, which connection tracking reads and which goes to the last segment,
/// sends the super-packet the ordinary way).
fn super_eligible(seg: &Segmenter<'_>) -> bool {
    use ferry_encap::wire::tcp::flags;
    seg.tcp_flags().is_some_and(|f| f & !(flags::ACK | flags::PSH | flags::CWR | flags::ECE) == 0)
}

/// Write one frame with its virtio-net header: one `writev`, never blocking; a refusal is counted.
fn write_frame(fd: RawFd, o: &Output<'_>, stats: &mut TapStats) {
    let segs = u64::from(o.segments);
    let hdr = o.vnet.to_bytes();
    let iov = [
        libc::iovec { iov_base: hdr.as_ptr() as *mut libc::c_void, iov_len: hdr.len() },
        libc::iovec { iov_base: o.frame.as_ptr() as *mut libc::c_void, iov_len: o.frame.len() },
    ];
    loop {
        // SAFETY: two iovecs over live buffers the kernel only reads.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        if n >= 0 {
            stats.writes += 1;
            stats.gso_writes += u64::from(o.segments > 1);
            stats.write_bytes += o.frame.len() as u64;
            return;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN | libc::ENOBUFS) => {
                stats.tx_dropped += segs;
                return;
            }
            _ => {
                stats.tx_errors += segs;
                return;
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: F_GETFL / F_SETFL on a descriptor the caller owns; failures leave it as it was.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 && fl & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

// ---- Setup side ----

/// Run `f` in the network namespace at `netns` (a bind-mounted namespace file such as
/// `/var/run/netns/NAME`, or `/proc/PID/ns/net`) on a short-lived helper thread, so the calling
/// thread never changes namespace; `None` runs it here.
fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let Some(path) = netns else { return f() };
    let ns = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open network namespace {}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace descriptor; it changes only this helper thread,
            // which ends when the closure returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot enter network namespace {} (needs CAP_SYS_ADMIN): {e}", path.display()),
                ));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace helper thread panicked")))
    })
}

fn check_name(ifname: &str) -> io::Result<()> {
    let b = ifname.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) || b.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ifname:?} is not an interface name (1 to 15 bytes, no '/' or NUL)"),
        ));
    }
    Ok(())
}

fn ifreq(ifname: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value (and terminates the name).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    ifr
}

/// Open `/dev/net/tun`, saying what to do when it is missing or not allowed.
fn open_tun_dev() -> io::Result<OwnedFd> {
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(TUN_DEV).map_err(|e| {
        let fix = match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
                "load the tun module (`modprobe tun`) or create the device (`mknod /dev/net/tun c 10 200`)"
            }
            Some(libc::EPERM | libc::EACCES) => "run as root (it needs CAP_NET_ADMIN)",
            _ => "check that the kernel has TUN/TAP support",
        };
        io::Error::new(e.kind(), format!("cannot open {TUN_DEV}: {e}; {fix}"))
    })?;
    Ok(OwnedFd::from(f))
}

/// `TUNSETIFF` with ferry's flags: attach `fd` to tap `ifname`, creating it if absent.
fn attach(fd: &OwnedFd, ifname: &str) -> io::Result<()> {
    let mut ifr = ifreq(ifname);
    ifr.ifr_ifru.ifru_flags = sys::TAP_FLAGS;
    // SAFETY: TUNSETIFF reads and writes the `ifreq` it is given, which lives through the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), sys::TUNSETIFF, &raw mut ifr) } != 0 {
        let e = io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::EINVAL) => {
                format!("{ifname} exists but is not a multi-queue tap (delete it, or pick another name): {e}")
            }
            Some(libc::EPERM | libc::EACCES) => {
                format!("attaching tap {ifname} needs CAP_NET_ADMIN (run as root): {e}")
            }
            Some(libc::EBUSY) => format!("tap {ifname} has no free queue (at most {MAX_QUEUES}): {e}"),
            _ => format!("TUNSETIFF {ifname}: {e}"),
        };
        return Err(io::Error::new(e.kind(), why));
    }
    Ok(())
}

fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong, what: &str, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the tun ioctls used here take a plain integer argument (or a pointer to one, for
    // TUNSETVNETHDRSZ, which is given below).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, value as libc::c_ulong) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn exists(ifname: &str) -> io::Result<bool> {
    let c = CString::new(ifname).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: a valid C string; the call only reads it.
    Ok(unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
}

/// Inside the network namespace at `netns` (the caller's own with `None`), create tap `ifname` as a
/// persistent multi-queue tap with virtio-net headers (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR |
/// IFF_MULTI_QUEUE`, `TUNSETPERSIST`), with MAC `mac` when given. It stays down and without
/// queues until [`open_queue`] attaches them; it outlives every descriptor until [`delete`].
/// Creating a tap that exists already (with these flags) succeeds and sets the MAC again.
///
/// `queues` is how many queues the caller will attach (1 to [`MAX_QUEUES`]): a tap has as many
/// queues as attached descriptors, so it is checked here and not stored in the device.
///
/// # Errors
/// A bad name or queue count (`InvalidInput`); the namespace cannot be entered; `/dev/net/tun` is
/// missing or not allowed (the message says what to do); a device of that name that is not a
/// multi-queue tap; the kernel's refusal of the MAC.
pub fn create_persistent(netns: Option<&Path>, ifname: &str, mac: Option<MacAddr>, queues: u32) -> io::Result<()> {
    check_name(ifname)?;
    if !(1..=MAX_QUEUES).contains(&queues) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap {ifname}: {queues} queues asked; a tap has 1 to {MAX_QUEUES}"),
        ));
    }
    in_netns(netns, || {
        let fd = open_tun_dev()?;
        attach(&fd, ifname)?;
        if let Some(mac) = mac {
            let mut ifr = ifreq(ifname);
            // SAFETY: writing the `sockaddr` member of a zeroed `ifreq` we own.
            unsafe {
                ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
                for (d, s) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac.0) {
                    *d = s as libc::c_char;
                }
            }
            // SAFETY: the tun device's SIOCSIFHWADDR reads the `ifreq`, which lives through the call.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFHWADDR, &raw mut ifr) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("set MAC {mac:?} of tap {ifname}: {e}")));
            }
        }
        ioctl_int(&fd, sys::TUNSETPERSIST, &format!("TUNSETPERSIST on tap {ifname}"), 1)?;
        tracing::debug!(ifname, queues, "persistent tap ready");
        Ok(())
    })
}

/// Inside the network namespace at `netns` (the caller's own with `None`), attach one queue to the
/// existing tap `ifname`: `TUNSETIFF` with ferry's flags, a 12-byte virtio-net header
/// (`TUNSETVNETHDRSZ`), the best offloads the kernel accepts of [`OFFLOAD_PROBE`] (logged when
/// they are not the first), non-blocking. The queue lives as long as the descriptor.
///
/// # Errors
/// `NotFound` when there is no `ifname` in that namespace (it is never created here: a tap made by
/// mistake would carry no traffic); the rest as [`create_persistent`], and the kernel's refusal of
/// the header size.
pub fn open_queue(netns: Option<&Path>, ifname: &str) -> io::Result<OwnedFd> {
    check_name(ifname)?;
    in_netns(netns, || {
        if !exists(ifname)? {
            let at = netns.map_or_else(|| "this namespace".to_owned(), |p| p.display().to_string());
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no tap {ifname} in {at}: create it first (create_persistent)"),
            ));
        }
        let fd = open_tun_dev()?;
        attach(&fd, ifname)?;
        let hdr_len = virtio_net::HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives through the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), sys::TUNSETVNETHDRSZ, &raw const hdr_len) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ {hdr_len} on tap {ifname}: {e}")));
        }
        let mut accepted = None;
        let mut last_err = None;
        for flags in OFFLOAD_PROBE {
            match ioctl_int(&fd, sys::TUNSETOFFLOAD, "TUNSETOFFLOAD", flags as libc::c_int) {
                Ok(()) => {
                    accepted = Some(flags);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        match accepted {
            Some(f) if f == OFFLOAD_PROBE[0] => tracing::debug!(ifname, offloads = f, "tap queue attached"),
            Some(f) => tracing::warn!(
                ifname,
                offloads = format_args!("{f:#x}"),
                wanted = format_args!("{:#x}", OFFLOAD_PROBE[0]),
                refused = ?last_err,
                "the kernel refused the full tap offloads; fell back (fewer or no super-packets)"
            ),
            None => {
                let e = last_err.unwrap_or_else(|| io::Error::other("no offload set tried"));
                return Err(io::Error::new(e.kind(), format!("tap {ifname}: {e}")));
            }
        }
        set_nonblocking(fd.as_raw_fd());
        Ok(fd)
    })
}

/// Inside the network namespace at `netns`, delete tap `ifname` (`RTM_DELLINK`), whether or not
/// queues are still attached (their descriptors then fail). A tap that does not exist is not an
/// error: deleting twice is idempotent.
///
/// # Errors
/// A bad name; the namespace cannot be entered; the kernel refuses (`EPERM` without
/// `CAP_NET_ADMIN`).
pub fn delete(netns: Option<&Path>, ifname: &str) -> io::Result<()> {
    check_name(ifname)?;
    in_netns(netns, || {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        kernel::set_recv_timeout(socket.as_fd(), Duration::from_secs(1))?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(ifname.to_owned()));
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = 1;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(msg)));
        nl.finalize();
        let mut bytes = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut bytes);
        let replies = kernel::netlink_request(&socket, &bytes, 1, Duration::from_secs(2), &mut Vec::new())?;
        let invalid = |e: netlink_packet_core::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
        for (_, m) in kernel::netlink_messages(&replies).map_err(invalid)? {
            if let NetlinkPayload::Error(err) =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(m).map_err(invalid)?.payload
                && err.code.is_some()
            {
                let e = err.to_io();
                if e.raw_os_error() == Some(libc::ENODEV) {
                    return Ok(());
                }
                return Err(io::Error::new(e.kind(), format!("delete tap {ifname}: {e}")));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests;
