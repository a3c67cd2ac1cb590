//! The receiver's accounting (hot path): sequence tracking per flow for loss, reordering and
//! duplicates, and the one-way latency histogram.
//!
//! Each flow (the probe's flow index) carries its own sequence, starting at 0 when the generator
//! starts. For each flow the receiver keeps the lowest and highest number seen, the count of
//! distinct numbers, and a bitmap of the last [`WINDOW`] numbers below the highest:
//!
//! - a number above the highest moves the window up (the numbers skipped are missing for now);
//! - a number inside the window is a duplicate if its bit is set, otherwise a late (reordered)
//!   arrival, which fills its gap;
//! - a number below the window is counted as reordered and distinct: after [`WINDOW`] newer
//!   packets of its flow, a duplicate can no longer be told from a very late packet.
//!
//! Loss is what is still missing at the end: `highest - lowest + 1 - distinct` per flow. Packets
//! lost after a flow's last received one cannot be seen by sequence numbers; compare the
//! generator's sent count for those. Reordered counts packets that arrived after a higher number of
//! their flow (RFC 4737's "reordered packet"). One generator per receiver run: a restarted
//! generator starts its sequences again and shows up as reordering.
//!
//! Trackers live in one vector indexed by flow, reserved for every possible flow index up front,
//! so a new flow never reallocates (it pushes into reserved memory).

use hdrhistogram::Histogram;

use super::wire::{self, Probe};

/// Sequence numbers remembered below a flow's highest (duplicate detection window).
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;
/// Flow indexes are 16-bit (the IPv4 identification).
const MAX_FLOWS: usize = 1 << 16;
/// Latency range recorded: 1 ns to 60 s, 3 significant digits.
const LATENCY_MAX_NS: u64 = 60_000_000_000;

/// One flow's sequence state.
#[derive(Debug, Clone, Default)]
struct FlowTrack {
    seen: bool,
    lowest: u64,
    highest: u64,
    distinct: u64,
    /// Bit `s % WINDOW` is set when `s` in `(highest - WINDOW, highest]` arrived.
    window: [u64; WORDS],
}

impl FlowTrack {
    #[inline]
    fn bit(s: u64) -> (usize, u64) {
        let i = s % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Account sequence number `s`; returns what it was.
    #[inline]
    fn observe(&mut self, s: u64) -> Arrival {
        if !self.seen {
            *self = FlowTrack { seen: true, lowest: s, highest: s, distinct: 1, window: [0; WORDS] };
            let (w, b) = Self::bit(s);
            self.window[w] |= b;
            return Arrival::InOrder;
        }
        if s > self.highest {
            let gap = s - self.highest;
            if gap >= WINDOW {
                self.window = [0; WORDS];
            } else {
                for n in self.highest + 1..s {
                    let (w, b) = Self::bit(n);
                    self.window[w] &= !b;
                }
            }
            let (w, b) = Self::bit(s);
            self.window[w] |= b;
            self.highest = s;
            self.distinct += 1;
            return Arrival::InOrder;
        }
        if self.highest - s < WINDOW {
            let (w, b) = Self::bit(s);
            if self.window[w] & b != 0 {
                return Arrival::Duplicate;
            }
            self.window[w] |= b;
        }
        self.lowest = self.lowest.min(s);
        self.distinct += 1;
        Arrival::Late
    }

    fn missing(&self) -> u64 {
        if self.seen { (self.highest - self.lowest + 1).saturating_sub(self.distinct) } else { 0 }
    }
}

/// What one received packet was, relative to its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The highest number of its flow so far.
    InOrder,
    /// Below the highest of its flow, not seen before (fills a gap).
    Late,
    /// Seen before.
    Duplicate,
}

/// Everything the receiver counts.
#[derive(Debug)]
pub struct SinkStats {
    flows: Vec<FlowTrack>,
    /// Frames received (probes or not).
    pub frames: u64,
    /// Bytes of all frames received.
    pub bytes: u64,
    /// Frames carrying the generator's probe.
    pub probes: u64,
    /// Bytes of those frames.
    pub probe_bytes: u64,
    /// Probes found inside a tunnel.
    pub tunnelled: u64,
    /// Probes that arrived after a higher number of their flow.
    pub reordered: u64,
    /// Probes seen twice or more (the repeats).
    pub duplicates: u64,
    /// Probes whose transmit time lies after their receive time (different clocks).
    pub bad_time: u64,
    /// One-way latency in nanoseconds.
    pub latency: Histogram<u64>,
    /// The largest latency, and the sequence number (within its flow) of the probe that had it:
    /// where in the run the worst wait fell (at a known rate, when).
    pub worst: (u64, u64),
}

impl Default for SinkStats {
    fn default() -> Self {
        SinkStats::new()
    }
}

impl SinkStats {
    /// Empty counters; reserves memory for every flow index once.
    ///
    /// # Panics
    /// Never: the histogram bounds are constants that hdrhistogram accepts.
    pub fn new() -> Self {
        #[expect(clippy::expect_used, reason = "constant bounds, checked by the unit tests")]
        let latency = Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid histogram bounds");
        SinkStats {
            flows: Vec::with_capacity(MAX_FLOWS),
            frames: 0,
            bytes: 0,
            probes: 0,
            probe_bytes: 0,
            tunnelled: 0,
            reordered: 0,
            duplicates: 0,
            bad_time: 0,
            latency,
            worst: (0, 0),
        }
    }

    /// Account one received frame at receive time `now_ns` (CLOCK_MONOTONIC).
    #[inline]
    pub fn frame(&mut self, frame: &[u8], now_ns: u64) -> Option<Arrival> {
        self.frames += 1;
        self.bytes += frame.len() as u64;
        let probe = wire::find_probe(frame)?;
        self.probe_bytes += frame.len() as u64;
        Some(self.probe(&probe, now_ns))
    }

    /// Account one probe received at `now_ns`.
    #[inline]
    pub fn probe(&mut self, p: &Probe, now_ns: u64) -> Arrival {
        self.probes += 1;
        if p.depth > 0 {
            self.tunnelled += 1;
        }
        let f = usize::from(p.flow);
        if f >= self.flows.len() {
            // Within the reserved capacity: no reallocation.
            self.flows.resize(f + 1, FlowTrack::default());
        }
        let a = self.flows[f].observe(p.seq);
        match a {
            Arrival::InOrder => {}
            Arrival::Late => self.reordered += 1,
            Arrival::Duplicate => self.duplicates += 1,
        }
        let sent = wire::widen_time(p.time48, now_ns);
        if sent <= now_ns {
            // Saturates at the top of the range instead of failing.
            let l = (now_ns - sent).max(1);
            self.latency.saturating_record(l);
            if l > self.worst.0 {
                self.worst = (l, p.seq);
            }
        } else {
            self.bad_time += 1;
        }
        a
    }

    /// Probes missing from the received sequences (see the module docs for what this cannot see).
    pub fn lost(&self) -> u64 {
        self.flows.iter().map(FlowTrack::missing).sum()
    }

    /// Flows seen.
    pub fn flows_seen(&self) -> usize {
        self.flows.iter().filter(|f| f.seen).count()
    }

    /// Probes that were new (not duplicates).
    pub fn distinct(&self) -> u64 {
        self.flows.iter().map(|f| f.distinct).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64]) -> FlowTrack {
        let mut t = FlowTrack::default();
        for &s in seqs {
            t.observe(s);
        }
        t
    }

    fn stats(seqs: &[(u16, u64)]) -> SinkStats {
        let mut s = SinkStats::new();
        for &(flow, seq) in seqs {
            s.probe(&Probe { flow, seq, time48: 100, depth: 0 }, 1100);
        }
        s
    }

    #[test]
    fn in_order_has_no_loss() {
        let s = stats(&(0..5000).map(|i| ((i % 7) as u16, i / 7)).collect::<Vec<_>>());
        assert_eq!((s.lost(), s.reordered, s.duplicates, s.flows_seen()), (0, 0, 0, 7));
        assert_eq!(s.distinct(), 5000);
    }

    #[test]
    fn gaps_are_loss() {
        let t = run(&[0, 1, 2, 5, 6, 10]);
        assert_eq!(t.missing(), 5);
        // A gap wider than the window.
        let t = run(&[0, 1, 5000, 5001]);
        assert_eq!(t.missing(), 4998);
    }

    #[test]
    fn late_arrivals_fill_gaps_and_count_as_reordered() {
        let s = stats(&[(0, 0), (0, 2), (0, 1), (0, 3), (1, 1), (1, 0)]);
        assert_eq!((s.lost(), s.reordered, s.duplicates), (0, 2, 0));
        // Loss and reordering together: 4 never comes.
        let s = stats(&[(0, 0), (0, 3), (0, 1), (0, 5), (0, 2)]);
        assert_eq!((s.lost(), s.reordered, s.duplicates), (1, 2, 0));
    }

    #[test]
    fn duplicates_are_counted_once_each_and_not_as_received() {
        let s = stats(&[(0, 0), (0, 1), (0, 1), (0, 0), (0, 2), (0, 1)]);
        assert_eq!((s.lost(), s.reordered, s.duplicates, s.distinct()), (0, 0, 3, 3));
        assert_eq!(s.probes, 6);
    }

    #[test]
    fn a_late_packet_before_the_first_lowers_the_start() {
        let s = stats(&[(0, 5), (0, 6), (0, 4)]);
        assert_eq!((s.lost(), s.reordered), (0, 1));
    }

    #[test]
    fn window_edges() {
        // Just inside the window: a duplicate is caught.
        let mut t = run(&[0]);
        for s in 1..WINDOW {
            t.observe(s);
        }
        assert_eq!(t.observe(0), Arrival::Duplicate);
        // One more and 0 left the window: it counts as late (cannot be told apart).
        t.observe(WINDOW);
        assert_eq!(t.observe(0), Arrival::Late);
        // Bits of skipped numbers are cleared when the window moves over them.
        let mut t = run(&[0, 1, 2]);
        t.observe(WINDOW + 1);
        assert_eq!(t.observe(WINDOW), Arrival::Late, "WINDOW shares 0's bit but was never seen");
        assert_eq!(t.observe(WINDOW), Arrival::Duplicate);
    }

    #[test]
    fn latency_is_recorded_from_the_probe_time() {
        let mut s = SinkStats::new();
        s.probe(&Probe { flow: 0, seq: 0, time48: 1_000, depth: 1 }, 51_000);
        s.probe(&Probe { flow: 0, seq: 1, time48: 2_000_000, depth: 1 }, 1_000);
        assert_eq!(s.latency.len(), 1);
        assert_eq!(s.worst.0, 50_000, "the worst latency, and its probe");
        assert!(s.latency.equivalent(s.latency.max(), 50_000));
        assert_eq!((s.bad_time, s.tunnelled), (1, 2));
    }

    #[test]
    fn frames_without_probe_are_counted_but_not_tracked() {
        let mut s = SinkStats::new();
        assert_eq!(s.frame(&[0u8; 60], 5), None);
        assert_eq!((s.frames, s.bytes, s.probes), (1, 60, 0));
    }
}
