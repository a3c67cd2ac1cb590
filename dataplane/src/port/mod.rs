//! Batch packet ports (hot path): the boundary between a worker and the outside.
//!
//! A port moves [`Pkt`] descriptors, never bytes, between a worker and something that sends and
//! receives frames: an AF_XDP socket, an in-memory queue for tests and benches ([`mem::MemPort`]),
//! or either of those wrapped in a pcap writer ([`pcap::PcapTap`]). A node's workers hold
//! [`any::NodePort`], whichever of the kinds each interface uses. Frame ownership passes with
//! each call, so that every frame is always in exactly one place:
//!
//! - [`Port::refill`] hands free frames to the port for receiving;
//! - [`Port::recv`] hands received packets (and their frames) to the worker;
//! - [`Port::send`] hands packets to the port for transmission;
//! - [`Port::reclaim`] returns frames whose transmission completed.
//!
//! All ports of one worker share that worker's frame memory (`Self::Mem`), so forwarding from one
//! port to another is descriptor passing.

pub mod any;
pub mod mem;
pub mod pcap;
pub mod tap;
pub mod udp;
pub mod xsk;

use std::io;
use std::os::fd::RawFd;

use ferry_encap::gso::Segmenter;

use crate::frame::{FrameMem, FreeFrames, Pkt};

/// A super-packet whose first segment was the last packet [`Port::recv`] returned, the rest still
/// held by the port (see the worker's super-packet path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperHead {
    /// Bytes of headers every segment repeats (Ethernet, IP, TCP).
    pub header_len: usize,
    /// Length of the first segment (the packet `recv` returned).
    pub first_len: usize,
    /// Segments in all, the first included.
    pub segments: usize,
}

/// The rest of a run of received tunnel datagrams whose first one was the last packet
/// [`Port::recv`] returned (the UDP uplink), held by the port for the worker's super-packet path
/// (receive side): `count` datagrams of `stride` bytes back to back in `buf` (the last may be
/// shorter), each with its inner TCP payload from `payload_at` on. The port has checked that
/// they continue the first one's segment as one super-packet would ([`gro::tunnel_run`]).
///
/// [`gro::tunnel_run`]: ferry_encap::gro::tunnel_run
#[derive(Debug, Clone, Copy)]
pub struct SegmentRun<'a> {
    /// The datagrams.
    pub buf: &'a [u8],
    /// Bytes per datagram.
    pub stride: usize,
    /// Datagrams.
    pub count: usize,
    /// Where each datagram's TCP payload starts.
    pub payload_at: usize,
    /// The first datagram's (the head's) TCP payload length: the run's MSS.
    pub mss: usize,
    /// The last segment carries PSH.
    pub psh: bool,
}

impl SegmentRun<'_> {
    /// Datagram `i`.
    pub fn datagram(&self, i: usize) -> &[u8] {
        let end = ((i + 1) * self.stride).min(self.buf.len());
        self.buf.get(i * self.stride..end).unwrap_or(&[])
    }

    /// Datagram `i`'s TCP payload.
    pub fn payload(&self, i: usize) -> &[u8] {
        self.datagram(i).get(self.payload_at..).unwrap_or(&[])
    }

    /// TCP payload bytes of all `count` datagrams.
    pub fn payload_len(&self) -> usize {
        (0..self.count).map(|i| self.payload(i).len()).sum()
    }
}

/// Counters a port keeps about itself (the worker keeps per-packet counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames the port could not receive for lack of a free frame (fill ring empty).
    pub rx_no_frame: u64,
    /// Frames dropped by the kernel or the device on receive, if it reports them.
    pub rx_dropped: u64,
    /// Frames dropped because the receive ring was full (the worker fell behind).
    pub rx_ring_full: u64,
    /// Descriptors the kernel rejected as invalid.
    pub invalid_descs: u64,
}

/// A batch receive/transmit port over a worker's frame memory.
pub trait Port {
    /// The frame memory this port's packets live in.
    type Mem: FrameMem;

    /// A short name for logs and statistics (the interface name, say).
    fn name(&self) -> &str;

    /// Receive up to `out.len()` packets into `out`, returning how many. The packets' frames now
    /// belong to the caller.
    fn recv(&mut self, mem: &mut Self::Mem, out: &mut [Pkt]) -> usize;

    /// Queue `pkts` for transmission, returning how many the port took (a prefix of `pkts`). Frames
    /// of taken packets belong to the port until [`reclaim`](Self::reclaim) returns them; the rest
    /// stay with the caller.
    fn send(&mut self, mem: &mut Self::Mem, pkts: &[Pkt]) -> usize;

    /// Push queued transmissions out (a wakeup/kick where the port needs one).
    ///
    /// # Errors
    /// An I/O error from the kick; the packets stay queued.
    fn flush(&mut self) -> io::Result<()>;

    /// Move frames whose transmission completed to `free`, returning how many.
    fn reclaim(&mut self, free: &mut FreeFrames) -> usize;

    /// Take frames from `free` for receiving, as many as the port has room for, returning how many.
    fn refill(&mut self, free: &mut FreeFrames) -> usize;

    /// A file descriptor to wait on for received packets when idle, if the port has one.
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }

    /// Frames currently held by the port (receive side and transmit side), for conservation checks.
    fn frames_held(&self) -> usize;

    /// Close the port and hand every frame it still holds (lent for receiving, queued or in flight
    /// for transmission) back to `free`: a port removed from a running worker loses no frame.
    fn release(self, free: &mut FreeFrames)
    where
        Self: Sized;

    /// The port's own counters.
    fn stats(&self) -> PortStats {
        PortStats::default()
    }

    /// Super-packets, ingress: the super-packet whose first segment was the last packet the latest
    /// [`recv`](Self::recv) returned, when the port holds the rest of it (a tap port).
    fn super_head(&self) -> Option<SuperHead> {
        None
    }

    /// Super-packets, ingress: the rest of the [`super_head`](Self::super_head) packet, its
    /// repeated headers first replaced by `headers` (the first segment's, as the pipeline left
    /// them; IP length and TCP flags stay the super-packet's).
    fn super_rest(&mut self, _headers: &[u8]) -> Option<Segmenter<'_>> {
        None
    }

    /// Super-packets, ingress: segments `1..=sent` went out through another port; 0 means the
    /// worker declined, and the port delivers the rest as ordinary packets.
    fn super_done(&mut self, _sent: usize) {}

    /// Super-packets, ingress (receive side): the rest of a run of tunnel datagrams whose first
    /// one was the last packet the latest [`recv`](Self::recv) returned (the UDP uplink). The
    /// worker answers with [`super_done`](Self::super_done): how many went out with
    /// [`send_run`](Self::send_run), or 0 and the port delivers them as ordinary packets.
    fn super_run(&self) -> Option<SegmentRun<'_>> {
        None
    }

    /// Super-packets, egress (receive side): write `head` (the first segment of `run`, decapsulated
    /// and as the pipeline left it, its frame the port's from now on) and every segment of `run`
    /// behind it as one super-packet (a pod's tap). `false`: not taken, `head` untouched and
    /// still the caller's.
    fn send_run(&mut self, _mem: &mut Self::Mem, _head: Pkt, _run: &SegmentRun<'_>) -> bool {
        false
    }

    /// Super-packets, egress: the tunnel payload (tunnel header, inner frame) of the packet the last
    /// [`send`](Self::send) took, when this port can send a super-packet's other segments behind
    /// it with [`send_segments`](Self::send_segments) (the UDP uplink).
    fn last_sent_payload(&self) -> Option<&[u8]> {
        None
    }

    /// Super-packets, egress: send segments `first..` of `seg` behind the tunnel header (the first
    /// `tunnel_header` bytes) of the last packet sent, to the same destination; returns how many
    /// went (the others are dropped, counted by the port).
    fn send_segments(&mut self, _seg: &Segmenter<'_>, _tunnel_header: usize, _first: usize) -> usize {
        0
    }
}
