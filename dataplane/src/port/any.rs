//! One port type for a node's workers (hot path): [`NodePort`] is whichever kind of port an
//! interface got, behind the one [`Port`] type a [`crate::worker::Worker`] is generic over. Every
//! kind shares the worker's frame memory ([`XskMem`], the AF_XDP UMEM), so forwarding between
//! kinds stays descriptor passing.
//!
//! Each method is a `match` that delegates to the variant, marked `#[inline]` so that the worker's
//! loop compiles to a branch on the kind and a direct call: no virtual call, no allocation. A new
//! kind is a new variant and one arm per method.

use std::io;
use std::os::fd::RawFd;

use super::tap::TapPort;
use super::udp::UdpPort;
use super::xsk::{XskMem, XskPort};
use super::{Port, PortStats, SegmentRun, SuperHead};
use crate::frame::{FreeFrames, Pkt};
use ferry_encap::gso::Segmenter;

/// A port of a node's worker, of whichever kind its interface uses.
#[derive(Debug)]
pub enum NodePort {
    /// An AF_XDP socket on one queue of an interface (the uplink, the host port, veth pods).
    Xsk(XskPort),
    /// One queue of a pod's tap, with virtio-net headers (super-packets segmented on receive,
    /// coalesced on send). Boxed: it carries about 5 KB of counters and state inline, and a
    /// worker's ports sit side by side in one vector that its loop walks.
    Tap(Box<TapPort<XskMem>>),
    /// The uplink as a kernel UDP socket with `UDP_SEGMENT` and `UDP_GRO`.
    Udp(UdpPort<XskMem>),
}

impl From<UdpPort<XskMem>> for NodePort {
    fn from(p: UdpPort<XskMem>) -> Self {
        NodePort::Udp(p)
    }
}

impl From<XskPort> for NodePort {
    fn from(p: XskPort) -> Self {
        NodePort::Xsk(p)
    }
}

impl From<TapPort<XskMem>> for NodePort {
    fn from(p: TapPort<XskMem>) -> Self {
        NodePort::Tap(Box::new(p))
    }
}

/// Evaluates `$call` with `$p` bound to whichever port `$self` holds.
macro_rules! each {
    ($self:expr, $p:ident => $call:expr) => {
        match $self {
            NodePort::Xsk($p) => $call,
            NodePort::Udp($p) => $call,
            NodePort::Tap($p) => $call,
        }
    };
}

impl Port for NodePort {
    type Mem = XskMem;

    #[inline]
    fn name(&self) -> &str {
        each!(self, p => p.name())
    }

    #[inline]
    fn recv(&mut self, mem: &mut XskMem, out: &mut [Pkt]) -> usize {
        each!(self, p => p.recv(mem, out))
    }

    #[inline]
    fn send(&mut self, mem: &mut XskMem, pkts: &[Pkt]) -> usize {
        each!(self, p => p.send(mem, pkts))
    }

    #[inline]
    fn flush(&mut self) -> io::Result<()> {
        each!(self, p => p.flush())
    }

    #[inline]
    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        each!(self, p => p.reclaim(free))
    }

    #[inline]
    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        each!(self, p => p.refill(free))
    }

    #[inline]
    fn poll_fd(&self) -> Option<RawFd> {
        each!(self, p => p.poll_fd())
    }

    #[inline]
    fn frames_held(&self) -> usize {
        each!(self, p => p.frames_held())
    }

    fn release(self, free: &mut FreeFrames) {
        match self {
            NodePort::Xsk(p) => p.release(free),
            NodePort::Udp(p) => p.release(free),
            NodePort::Tap(p) => p.release(free),
        }
    }

    #[inline]
    fn stats(&self) -> PortStats {
        each!(self, p => p.stats())
    }

    #[inline]
    fn super_head(&self) -> Option<SuperHead> {
        each!(self, p => p.super_head())
    }

    #[inline]
    fn super_rest(&mut self, headers: &[u8]) -> Option<Segmenter<'_>> {
        each!(self, p => p.super_rest(headers))
    }

    #[inline]
    fn super_done(&mut self, sent: usize) {
        each!(self, p => p.super_done(sent))
    }

    #[inline]
    fn super_run(&self) -> Option<SegmentRun<'_>> {
        each!(self, p => p.super_run())
    }

    #[inline]
    fn send_run(&mut self, mem: &mut XskMem, head: Pkt, run: &SegmentRun<'_>) -> bool {
        each!(self, p => p.send_run(mem, head, run))
    }

    #[inline]
    fn last_sent_payload(&self) -> Option<&[u8]> {
        each!(self, p => p.last_sent_payload())
    }

    #[inline]
    fn send_segments(&mut self, seg: &Segmenter<'_>, tunnel_header: usize, first: usize) -> usize {
        each!(self, p => p.send_segments(seg, tunnel_header, first))
    }
}
