//! Per-worker counters: plain integers on the hot path, published to atomics off it.
//!
//! A worker counts into [`Counters`] (no atomics, no sharing) and copies them into its
//! [`SharedCounters`] with relaxed stores on a timer (every few milliseconds while busy), before it
//! sleeps, when a port is added or removed, and when it stops: one writer per cell, so readers (the
//! admin socket, metrics) see each counter monotonic and at most a publish interval old, and exact
//! once the worker is idle or stopped. A publish writes only the ports the worker serves (a worker
//! is sized for 256 ports and usually serves a handful; a removed port's cells keep their last,
//! exact, values). Readers sum the shared counters of all workers into a [`CounterSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

use ferry_encap::DropReason;

use crate::pipeline::{PipelineCounters, PortId};
use crate::port::PortStats;

/// Packet and byte counts for one port and direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// A worker's own counters.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Received, per port.
    pub rx: Vec<Flow>,
    /// Transmitted, per port.
    pub tx: Vec<Flow>,
    /// The ports' own counters (AF_XDP socket statistics: frames the kernel dropped before the
    /// worker saw them), refreshed about once a second.
    pub port: Vec<PortStats>,
    /// Drops by reason, and ICMP errors sent.
    pub pipeline: PipelineCounters,
    /// Frames given back to the free list while already free, or not of the worker's memory, and
    /// refused there ([`FreeFrames::refused`](crate::frame::FreeFrames::refused)). Not 0 means a
    /// bug; without the refusal two packets would have shared a frame.
    pub double_frees: u64,
    /// Where the worker's frames are, as of its last publication (between iterations).
    pub frames: FrameAccount,
}

/// A worker's frames (summed over workers): every frame is free or held by a port (lent to the
/// kernel's rings, queued for sending, a tap's or socket's buffers), so `total - free - held` is
/// 0 unless frames leaked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameAccount {
    /// The frames of the worker's memory.
    pub total: u64,
    /// On the free list.
    pub free: u64,
    /// Held by ports.
    pub held: u64,
}

impl FrameAccount {
    /// Frames neither free nor held: leaked (0 between iterations, in a correct worker).
    pub fn unaccounted(&self) -> u64 {
        self.total.saturating_sub(self.free + self.held)
    }
}

impl Counters {
    /// Zeroed counters for `ports` ports.
    pub fn new(ports: usize) -> Self {
        Counters {
            rx: vec![Flow::default(); ports],
            tx: vec![Flow::default(); ports],
            port: vec![PortStats::default(); ports],
            pipeline: PipelineCounters::default(),
            double_frees: 0,
            frames: FrameAccount::default(),
        }
    }

    /// Drops under one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.pipeline.drops[reason as usize]
    }

    /// Total drops.
    pub fn total_drops(&self) -> u64 {
        self.pipeline.drops.iter().sum()
    }
}

/// Cells per port in [`SharedCounters`].
const PER_PORT: usize = 8;

/// The published copy of one worker's counters.
#[derive(Debug)]
pub struct SharedCounters {
    ports: usize,
    /// rx packets, rx bytes, tx packets, tx bytes and the four port statistics per port, then
    /// drops, then ICMP errors, then double frees, then headroom moves, then the frame account.
    cells: Box<[AtomicU64]>,
}

impl SharedCounters {
    /// Zeroed cells for `ports` ports.
    pub fn new(ports: usize) -> Self {
        let cells = (0..ports * PER_PORT + DropReason::COUNT + 6).map(|_| AtomicU64::new(0)).collect();
        SharedCounters { ports, cells }
    }

    /// Copy a worker's counters in for the ports in `live` (the ones it serves) and the pipeline's
    /// (the worker is the only writer). Ids beyond the cells are skipped.
    pub fn publish(&self, c: &Counters, live: &[PortId]) {
        for id in live {
            self.publish_port(c, *id);
        }
        self.publish_pipeline(c);
    }

    /// Copy one port's counters in (a port being removed publishes its last values here).
    pub fn publish_port(&self, c: &Counters, id: PortId) {
        let p = usize::from(id.0);
        if p >= self.ports {
            return;
        }
        let (Some(rx), Some(tx), Some(s)) = (c.rx.get(p), c.tx.get(p), c.port.get(p)) else { return };
        let cells = &self.cells[p * PER_PORT..(p + 1) * PER_PORT];
        let values =
            [rx.packets, rx.bytes, tx.packets, tx.bytes, s.rx_no_frame, s.rx_dropped, s.rx_ring_full, s.invalid_descs];
        for (cell, v) in cells.iter().zip(values) {
            cell.store(v, Ordering::Relaxed);
        }
    }

    fn publish_pipeline(&self, c: &Counters) {
        let d = self.ports * PER_PORT;
        for (i, v) in c.pipeline.drops.iter().enumerate() {
            self.cells[d + i].store(*v, Ordering::Relaxed);
        }
        self.cells[d + DropReason::COUNT].store(c.pipeline.icmp_errors, Ordering::Relaxed);
        self.cells[d + DropReason::COUNT + 1].store(c.double_frees, Ordering::Relaxed);
        self.cells[d + DropReason::COUNT + 2].store(c.pipeline.headroom_moves, Ordering::Relaxed);
        let f = c.frames;
        for (i, v) in [f.total, f.free, f.held].into_iter().enumerate() {
            self.cells[d + DropReason::COUNT + 3 + i].store(v, Ordering::Relaxed);
        }
    }

    /// Read the published values.
    pub fn read(&self) -> Counters {
        let mut c = Counters::new(self.ports);
        for p in 0..self.ports {
            let base = p * PER_PORT;
            let v = |i: usize| self.cells[base + i].load(Ordering::Relaxed);
            c.rx[p] = Flow { packets: v(0), bytes: v(1) };
            c.tx[p] = Flow { packets: v(2), bytes: v(3) };
            c.port[p] = PortStats { rx_no_frame: v(4), rx_dropped: v(5), rx_ring_full: v(6), invalid_descs: v(7) };
        }
        let d = self.ports * PER_PORT;
        for (i, v) in c.pipeline.drops.iter_mut().enumerate() {
            *v = self.cells[d + i].load(Ordering::Relaxed);
        }
        c.pipeline.icmp_errors = self.cells[d + DropReason::COUNT].load(Ordering::Relaxed);
        c.double_frees = self.cells[d + DropReason::COUNT + 1].load(Ordering::Relaxed);
        c.pipeline.headroom_moves = self.cells[d + DropReason::COUNT + 2].load(Ordering::Relaxed);
        let f = |i: usize| self.cells[d + DropReason::COUNT + 3 + i].load(Ordering::Relaxed);
        c.frames = FrameAccount { total: f(0), free: f(1), held: f(2) };
        c
    }
}

/// Counters summed over workers.
pub type CounterSnapshot = Counters;

/// Sum the published counters of several workers (all with the same ports).
pub fn sum<'a>(workers: impl IntoIterator<Item = &'a SharedCounters>) -> Option<CounterSnapshot> {
    let mut total: Option<Counters> = None;
    for w in workers {
        let c = w.read();
        match &mut total {
            None => total = Some(c),
            Some(t) => {
                for (a, b) in t.rx.iter_mut().zip(&c.rx) {
                    a.packets += b.packets;
                    a.bytes += b.bytes;
                }
                for (a, b) in t.tx.iter_mut().zip(&c.tx) {
                    a.packets += b.packets;
                    a.bytes += b.bytes;
                }
                for (a, b) in t.port.iter_mut().zip(&c.port) {
                    a.rx_no_frame += b.rx_no_frame;
                    a.rx_dropped += b.rx_dropped;
                    a.rx_ring_full += b.rx_ring_full;
                    a.invalid_descs += b.invalid_descs;
                }
                for (a, b) in t.pipeline.drops.iter_mut().zip(&c.pipeline.drops) {
                    *a += b;
                }
                t.pipeline.icmp_errors += c.pipeline.icmp_errors;
                t.double_frees += c.double_frees;
                t.pipeline.headroom_moves += c.pipeline.headroom_moves;
                t.frames.total += c.frames.total;
                t.frames.free += c.frames.free;
                t.frames.held += c.frames.held;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_read_and_sum() {
        let mut c = Counters::new(2);
        c.rx[1] = Flow { packets: 3, bytes: 300 };
        c.tx[0] = Flow { packets: 2, bytes: 128 };
        c.pipeline.drops[DropReason::NoRoute as usize] = 5;
        c.pipeline.icmp_errors = 2;
        c.double_frees = 1;
        c.pipeline.headroom_moves = 3;
        c.frames = FrameAccount { total: 64, free: 40, held: 23 };
        c.port[1] = PortStats { rx_no_frame: 1, rx_dropped: 2, rx_ring_full: 3, invalid_descs: 4 };
        let (a, b) = (SharedCounters::new(2), SharedCounters::new(2));
        let live = [PortId(0), PortId(1)];
        a.publish(&c, &live);
        b.publish(&c, &live);
        let s = sum([&a, &b]).expect("two workers");
        assert_eq!(s.rx[1], Flow { packets: 6, bytes: 600 });
        assert_eq!(s.tx[0].packets, 4);
        assert_eq!(s.drops(DropReason::NoRoute), 10);
        assert_eq!(s.pipeline.icmp_errors, 4);
        assert_eq!(s.double_frees, 2);
        assert_eq!(s.pipeline.headroom_moves, 6);
        assert_eq!(s.frames, FrameAccount { total: 128, free: 80, held: 46 });
        assert_eq!(s.frames.unaccounted(), 2);
        assert_eq!(s.port[1], PortStats { rx_no_frame: 2, rx_dropped: 4, rx_ring_full: 6, invalid_descs: 8 });
        assert_eq!(s.port[0], PortStats::default());
        assert_eq!(s.total_drops(), 10);
    }

    #[test]
    fn publish_writes_only_live_ports() {
        let mut c = Counters::new(3);
        c.rx[0] = Flow { packets: 1, bytes: 60 };
        c.rx[2] = Flow { packets: 7, bytes: 700 };
        let shared = SharedCounters::new(3);
        shared.publish(&c, &[PortId(2), PortId(9)]);
        let r = shared.read();
        assert_eq!(r.rx[2], Flow { packets: 7, bytes: 700 });
        assert_eq!(r.rx[0], Flow::default(), "port 0 is not live: not published");
        // A removed port's last values are published once and then left alone.
        shared.publish_port(&c, PortId(0));
        c.rx[0].packets = 99;
        shared.publish(&c, &[PortId(2)]);
        assert_eq!(shared.read().rx[0], Flow { packets: 1, bytes: 60 });
    }
}
