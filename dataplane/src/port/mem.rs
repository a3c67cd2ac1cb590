//! An in-memory port for tests and benches (hot path shaped, no I/O).
//!
//! It behaves like an AF_XDP socket in copy mode: a fill queue of frames lent for receiving, a
//! receive queue, a transmit queue and a completion queue, each bounded like a ring. Packets arrive
//! by [`MemPort::inject`] (bytes copied into a lent frame, as the kernel does) and leave by
//! [`MemPort::take_sent`] (bytes handed to a closure, frame moved to the completion queue).
//! [`wire`] joins two ports of two workers the way a veth pair would.

use std::collections::VecDeque;
use std::io;

use super::{Port, PortStats};
use crate::frame::{FrameId, FrameMem, FreeFrames, HeapMem, Pkt};

/// Ring sizes and where received packets start in their frame.
#[derive(Debug, Clone, Copy)]
pub struct MemPortConfig {
    /// Fill and receive ring size.
    pub rx_ring: usize,
    /// Transmit and completion ring size.
    pub tx_ring: usize,
    /// Offset at which received packets are written (AF_XDP delivers at
    /// [`RX_HEADROOM`](super::xsk::RX_HEADROOM), the default; 0 leaves no room to encapsulate in
    /// place, which the pipeline survives by moving the packet, and counts).
    pub rx_offset: u16,
}

impl Default for MemPortConfig {
    fn default() -> Self {
        MemPortConfig { rx_ring: 512, tx_ring: 512, rx_offset: super::xsk::RX_HEADROOM }
    }
}

/// An in-memory port.
#[derive(Debug)]
pub struct MemPort {
    name: String,
    cfg: MemPortConfig,
    fill: VecDeque<FrameId>,
    rx: VecDeque<Pkt>,
    tx: VecDeque<Pkt>,
    comp: VecDeque<FrameId>,
    stats: PortStats,
}

impl MemPort {
    /// A port named `name`.
    pub fn new(name: &str, cfg: MemPortConfig) -> Self {
        MemPort {
            name: name.to_owned(),
            cfg,
            fill: VecDeque::with_capacity(cfg.rx_ring),
            rx: VecDeque::with_capacity(cfg.rx_ring),
            tx: VecDeque::with_capacity(cfg.tx_ring),
            comp: VecDeque::with_capacity(cfg.tx_ring),
            stats: PortStats::default(),
        }
    }

    /// Deliver `bytes` as a received frame, as the kernel would: into a lent frame at the receive
    /// offset. Returns `false`, counting `rx_no_frame`, when no frame is lent or the receive ring is
    /// full; frames too long for a frame are truncated, as a device truncates to its MTU.
    pub fn inject(&mut self, mem: &mut HeapMem, bytes: &[u8]) -> bool {
        if self.rx.len() >= self.cfg.rx_ring {
            self.stats.rx_dropped += 1;
            return false;
        }
        let Some(frame) = self.fill.pop_front() else {
            self.stats.rx_no_frame += 1;
            return false;
        };
        let off = usize::from(self.cfg.rx_offset);
        let buf = mem.frame_mut(frame);
        let len = bytes.len().min(buf.len() - off);
        buf[off..off + len].copy_from_slice(&bytes[..len]);
        self.rx.push_back(Pkt { frame, offset: self.cfg.rx_offset, len: len as u16 });
        true
    }

    /// Hand up to `max` transmitted packets to `f`, oldest first, then move their frames to the
    /// completion queue. Returns how many.
    pub fn take_sent(&mut self, mem: &HeapMem, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < max
            && let Some(p) = self.tx.pop_front()
        {
            f(mem.bytes(p));
            self.comp.push_back(p.frame);
            n += 1;
        }
        n
    }

    /// Packets waiting in the transmit queue.
    pub fn tx_pending(&self) -> usize {
        self.tx.len()
    }

    /// Packets waiting in the receive queue.
    pub fn rx_pending(&self) -> usize {
        self.rx.len()
    }
}

impl Port for MemPort {
    type Mem = HeapMem;

    fn name(&self) -> &str {
        &self.name
    }

    fn recv(&mut self, _mem: &mut HeapMem, out: &mut [Pkt]) -> usize {
        let n = out.len().min(self.rx.len());
        for (slot, p) in out.iter_mut().zip(self.rx.drain(..n)) {
            *slot = p;
        }
        n
    }

    fn send(&mut self, _mem: &mut HeapMem, pkts: &[Pkt]) -> usize {
        // Completed frames not yet reclaimed occupy the completion ring, as with AF_XDP.
        let room = self.cfg.tx_ring.saturating_sub(self.tx.len() + self.comp.len());
        let n = room.min(pkts.len());
        self.tx.extend(&pkts[..n]);
        n
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        let n = self.comp.len();
        for f in self.comp.drain(..) {
            free.push(f);
        }
        n
    }

    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        let mut n = 0;
        while self.fill.len() + self.rx.len() < self.cfg.rx_ring
            && let Some(f) = free.pop()
        {
            self.fill.push_back(f);
            n += 1;
        }
        n
    }

    fn frames_held(&self) -> usize {
        self.fill.len() + self.rx.len() + self.tx.len() + self.comp.len()
    }

    fn release(self, free: &mut FreeFrames) {
        let frames = self.fill.into_iter().chain(self.comp);
        for f in frames.chain(self.rx.into_iter().chain(self.tx).map(|p| p.frame)) {
            free.push(f);
        }
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

/// Move up to `max` packets sent on `from` (in `from_mem`) to the receive side of `to` (in
/// `to_mem`), as a veth pair between two nodes would. Returns how many were delivered; the others
/// were dropped at `to` (no frame lent), and every sent frame is completed at `from` either way.
pub fn wire(from: &mut MemPort, from_mem: &HeapMem, to: &mut MemPort, to_mem: &mut HeapMem, max: usize) -> usize {
    let mut delivered = 0;
    from.take_sent(from_mem, max, |bytes| {
        if to.inject(to_mem, bytes) {
            delivered += 1;
        }
    });
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_flow_fill_rx_tx_completion() {
        let mut mem = HeapMem::new(8, 2048);
        let mut free = FreeFrames::all(8);
        let mut port = MemPort::new("p0", MemPortConfig { rx_ring: 4, tx_ring: 4, rx_offset: 64 });
        assert_eq!(port.refill(&mut free), 4);
        assert!(port.inject(&mut mem, b"hello"));
        let mut batch = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 8];
        assert_eq!(port.recv(&mut mem, &mut batch), 1);
        assert_eq!((batch[0].offset, mem.bytes(batch[0])), (64, &b"hello"[..]));
        assert_eq!(port.send(&mut mem, &batch[..1]), 1);
        let mut seen = Vec::new();
        assert_eq!(port.take_sent(&mem, 10, |b| seen.push(b.to_vec())), 1);
        assert_eq!(seen, vec![b"hello".to_vec()]);
        assert_eq!(port.reclaim(&mut free), 1);
        assert_eq!(free.len() + port.frames_held(), 8);
    }

    #[test]
    fn no_frame_lent_means_counted_drop() {
        let mut mem = HeapMem::new(1, 2048);
        let mut port = MemPort::new("p0", MemPortConfig::default());
        assert!(!port.inject(&mut mem, b"x"));
        assert_eq!(port.stats().rx_no_frame, 1);
    }
}
