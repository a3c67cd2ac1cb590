//! The transmit side: prebuilt frames cycled through the port (built on the setup side; a batch's
//! patching and the token bucket are hot path).
//!
//! Every frame of the pool is built once, for one flow and one size, and keeps them: per packet
//! only the sequence number, the time and the UDP checksum are written ([`wire::patch`]). Frames
//! go round in FIFO order (completed frames join the back of the queue), so each frame, and with
//! it each flow and size, is sent equally often; the pool size is a multiple of the flow count and
//! of the size pattern, so the flows and the IMIX proportions come out exact.

use std::collections::VecDeque;

use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use ferry_encap::TunnelTemplate;

use super::wire::{self, BuildError, FlowAddrs, Slot};

/// IMIX: 7 × 64, 4 × 576, 1 × 1500 bytes, interleaved.
pub const IMIX: [usize; 12] = [64, 576, 64, 64, 576, 64, 1500, 64, 576, 64, 576, 64];

/// Pool size: at least `want` frames, a multiple of both `flows` and `pattern` (when that stays
/// within `max`; otherwise the smallest multiple of `pattern` that covers every flow).
pub fn pool_size(flows: u32, pattern: usize, want: u32, max: u32) -> u32 {
    let (f, p) = (u64::from(flows.max(1)), pattern.max(1) as u64);
    let lcm = f / gcd(f, p) * p;
    let n = if lcm <= u64::from(max) { u64::from(want).div_ceil(lcm).max(1) * lcm } else { f.div_ceil(p) * p };
    n.min(u64::from(u32::MAX)) as u32
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The transmit pool: frames `0..slots.len()` of the frame memory.
#[derive(Debug)]
pub struct TxPool {
    slots: Vec<Slot>,
    ready: VecDeque<FrameId>,
    /// Next sequence number per flow.
    seqs: Vec<u64>,
    /// Completions land here first (the port's reclaim interface), then join `ready`.
    done: FreeFrames,
}

impl TxPool {
    /// Build `count` frames in frames `0..count` of `mem`: frame `i` is flow `i % flows` (addresses
    /// from [`FlowAddrs::flow`]) and size `sizes[i % sizes.len()]`.
    ///
    /// # Errors
    /// A size the frames cannot hold or the tunnel does not allow.
    pub fn build(
        mem: &mut impl FrameMem,
        count: u32,
        base: &FlowAddrs,
        flows: u32,
        sizes: &[usize],
        tunnel: Option<&TunnelTemplate>,
        udp_checksum: bool,
    ) -> Result<Self, BuildError> {
        let flows = flows.max(1);
        let mut slots = Vec::with_capacity(count as usize);
        for i in 0..count {
            let flow = i % flows;
            let size = sizes[i as usize % sizes.len()];
            slots.push(wire::build(mem.frame_mut(FrameId(i)), &base.flow(flow), flow, size, tunnel, udp_checksum)?);
        }
        Ok(TxPool {
            slots,
            ready: (0..count).map(FrameId).collect(),
            seqs: vec![0; flows as usize],
            done: FreeFrames::empty(count),
        })
    }

    /// Frames ready to send.
    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Frames in the pool.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Take `n` ready frames (at most [`ready`](Self::ready)) into `out`, each patched with its
    /// flow's next sequence number and time `now_ns`. Returns how many.
    #[inline]
    pub fn take(&mut self, mem: &mut impl FrameMem, out: &mut [Pkt], n: usize, now_ns: u64) -> usize {
        let n = n.min(out.len()).min(self.ready.len());
        for p in &mut out[..n] {
            let Some(id) = self.ready.pop_front() else { break };
            let slot = &self.slots[id.0 as usize];
            let seq = &mut self.seqs[slot.flow as usize];
            wire::patch(mem.frame_mut(id), slot, *seq, now_ns);
            *seq += 1;
            *p = Pkt { frame: id, offset: 0, len: slot.len };
        }
        n
    }

    /// Give back packets the port did not take: the unsent suffix of a [`take`](Self::take), in
    /// the order taken. Their sequence numbers are reused, so no gap appears.
    #[inline]
    pub fn untake(&mut self, pkts: &[Pkt]) {
        for p in pkts.iter().rev() {
            let slot = &self.slots[p.frame.0 as usize];
            self.seqs[slot.flow as usize] -= 1;
            self.ready.push_front(p.frame);
        }
    }

    /// The port's completion target: pass it to `Port::reclaim`, then call
    /// [`completed`](Self::completed).
    pub fn done_mut(&mut self) -> &mut FreeFrames {
        &mut self.done
    }

    /// Move completed frames back to the ready queue; returns their count and bytes.
    #[inline]
    pub fn completed(&mut self) -> (u64, u64) {
        let (mut n, mut bytes) = (0, 0);
        while let Some(id) = self.done.pop() {
            n += 1;
            bytes += u64::from(self.slots[id.0 as usize].len);
            self.ready.push_back(id);
        }
        (n, bytes)
    }
}

/// A token bucket refilled by elapsed time and drained a batch at a time.
///
/// To keep kicks (system calls) per second bounded at low rates, a batch waits until the bucket
/// holds [`min_batch`](Self::min_batch) tokens: enough for 50 µs at the configured rate, at least
/// one, at most a full batch.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_ns: f64,
    tokens: f64,
    burst: f64,
    min_batch: f64,
    last_ns: u64,
}

impl TokenBucket {
    /// A bucket for `pps` packets per second with batches of up to `batch`, starting empty at
    /// `now_ns`.
    pub fn new(pps: u64, batch: usize, now_ns: u64) -> Self {
        let per_ns = pps as f64 / 1e9;
        let min_batch = (per_ns * 50_000.0).clamp(1.0, batch as f64);
        TokenBucket { per_ns, tokens: 0.0, burst: (2 * batch) as f64, min_batch, last_ns: now_ns }
    }

    /// Tokens needed before a batch goes.
    pub fn min_batch(&self) -> usize {
        self.min_batch as usize
    }

    /// Whole tokens available at `now_ns`, or 0 while fewer than a minimal batch.
    #[inline]
    pub fn available(&mut self, now_ns: u64) -> usize {
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = now_ns;
        self.tokens = (self.tokens + dt as f64 * self.per_ns).min(self.burst);
        if self.tokens >= self.min_batch { self.tokens as usize } else { 0 }
    }

    /// Spend `n` tokens.
    #[inline]
    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// Nanoseconds until a minimal batch is available.
    pub fn wait_ns(&self) -> u64 {
        ((self.min_batch - self.tokens).max(0.0) / self.per_ns) as u64
    }
}

#[cfg(test)]
mod tests {
    use ferry_dataplane::frame::HeapMem;

    use super::*;

    #[test]
    fn imix_is_7_4_1() {
        let count = |n| IMIX.iter().filter(|&&s| s == n).count();
        assert_eq!((count(64), count(576), count(1500)), (7, 4, 1));
    }

    #[test]
    fn pool_sizes_are_multiples() {
        assert_eq!(pool_size(1, 1, 4096, 65536), 4096);
        assert_eq!(pool_size(1, 12, 4096, 65536), 4104);
        assert_eq!(pool_size(1000, 1, 4096, 65536), 5000);
        assert_eq!(pool_size(8, 12, 4096, 65536), 4104);
        assert_eq!(pool_size(65536, 12, 4096, 65536), 65544);
        assert_eq!(pool_size(0, 0, 10, 100), 10);
    }

    #[test]
    fn sequences_are_per_flow_and_untake_leaves_no_gap() {
        let mut mem = HeapMem::new(12, 2048);
        let mut pool = TxPool::build(&mut mem, 12, &FlowAddrs::for_tests(), 3, &[60, 100], None, true).expect("pool");
        let mut out = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 8];
        assert_eq!(pool.take(&mut mem, &mut out, 8, 42), 8);
        let probes: Vec<_> =
            out.iter().map(|p| wire::find_probe(mem.bytes(*p)).expect("probe")).map(|p| (p.flow, p.seq)).collect();
        assert_eq!(probes, vec![(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2)]);
        assert_eq!(out[1].len, 100);
        // The port took 5: the last 3 come back and are sent next with the same numbers.
        pool.untake(&out[5..8]);
        assert_eq!(pool.ready(), 4 + 3);
        let mut again = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 3];
        assert_eq!(pool.take(&mut mem, &mut again, 3, 43), 3);
        assert_eq!(again, [out[5], out[6], out[7]]);
        let p = wire::find_probe(mem.bytes(again[0])).expect("probe");
        assert_eq!((p.flow, p.seq, p.time48), (2, 1, 43));
        // Completion puts frames at the back of the queue and counts bytes.
        for p in &out[..3] {
            pool.done_mut().push(p.frame);
        }
        assert_eq!(pool.completed(), (3, 60 + 100 + 60));
        assert_eq!(pool.ready(), 4 + 3);
    }

    #[test]
    fn token_bucket_paces_batches() {
        // 1 Mpps, batches of 64: a minimal batch is 50 tokens (50 µs).
        let mut b = TokenBucket::new(1_000_000, 64, 0);
        assert_eq!(b.min_batch(), 50);
        assert_eq!(b.available(10_000), 0);
        assert_eq!(b.wait_ns(), 40_000);
        assert_eq!(b.available(60_000), 60);
        b.spend(60);
        // A long stall does not build up more than two batches.
        assert_eq!(b.available(10_000_000), 128);
        // Low rates send one packet at a time.
        let mut b = TokenBucket::new(100, 64, 0);
        assert_eq!(b.min_batch(), 1);
        assert_eq!(b.available(10_000_000), 1);
    }
}
