//! What `ferry pktgen` tells its user (off the hot path): a live line on stderr every second and
//! the JSON summary on stdout at the end.

use serde::Serialize;

use super::track::SinkStats;

/// The end-of-run summary (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `tx`, `rx` or `txrx`.
    pub mode: &'static str,
    /// Interface.
    pub iface: String,
    /// Queue.
    pub queue: u32,
    /// How the socket was bound: `copy` or `zerocopy`.
    pub xsk_mode: &'static str,
    /// How the receive program was attached (`native`, `generic`), when receiving.
    pub xdp_mode: Option<&'static str>,
    /// Seconds from ready to the end of the run.
    pub elapsed_s: f64,
    /// Transmit side, when transmitting.
    pub tx: Option<TxSummary>,
    /// Receive side, when receiving.
    pub rx: Option<RxSummary>,
}

/// Transmit figures.
#[derive(Debug, Clone, Serialize)]
pub struct TxSummary {
    /// Packets the kernel completed (sent).
    pub packets: u64,
    /// Their bytes (Ethernet frames without FCS).
    pub bytes: u64,
    /// Packets per second over the sending time.
    pub pps: f64,
    /// Frame bits per second (no FCS, preamble or gap).
    pub bps: f64,
    /// Seconds from the first packet to the last completion.
    pub seconds: f64,
    /// Packets queued but not completed when the run ended.
    pub unfinished: u64,
    /// Kicks the kernel answered with "busy, try again".
    pub busy_kicks: u64,
    /// Flows.
    pub flows: u32,
    /// Prebuilt frames cycled through.
    pub frames: u32,
    /// Tunnel (`vxlan`, `geneve`), if any.
    pub encap: Option<&'static str>,
}

/// Receive figures.
#[derive(Debug, Clone, Serialize)]
pub struct RxSummary {
    /// Frames carrying the generator's probe (duplicates included).
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Probe packets per second, first to last received.
    pub pps: f64,
    /// Probe frame bits per second, first to last received.
    pub bps: f64,
    /// Seconds from the first probe to the last.
    pub seconds: f64,
    /// Frames without a probe.
    pub foreign: u64,
    /// Probes found inside a tunnel.
    pub tunnelled: u64,
    /// Missing sequence numbers (see the receiver's docs).
    pub lost: u64,
    /// Probes that arrived after a higher number of their flow.
    pub reordered: u64,
    /// Repeated probes.
    pub duplicates: u64,
    /// Flows seen.
    pub flows: usize,
    /// Port counters: frames dropped for lack of a fill-ring frame, by the kernel, ring full.
    pub dropped_no_frame: u64,
    /// Frames the kernel dropped on receive.
    pub dropped_kernel: u64,
    /// Frames dropped because the receive ring was full.
    pub dropped_ring_full: u64,
    /// One-way latency.
    pub latency_ns: Latency,
}

/// A latency histogram's summary, in nanoseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub samples: u64,
    /// Probes with a transmit time after the receive time (clocks of different machines).
    pub invalid: u64,
    /// Smallest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// The sequence number (within its flow) of the probe with the largest latency: with one
    /// flow at a set rate, `max_seq / rate` is when in the run the worst wait fell.
    pub max_seq: u64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// From the receiver's histogram.
    pub fn of(s: &SinkStats) -> Self {
        let h = &s.latency;
        let empty = h.is_empty();
        let q = |q: f64| if empty { 0 } else { h.value_at_quantile(q) };
        Latency {
            samples: h.len(),
            invalid: s.bad_time,
            min: if empty { 0 } else { h.min() },
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
            max: if empty { 0 } else { h.max() },
            max_seq: s.worst.1,
            mean: if empty { 0.0 } else { h.mean() },
        }
    }
}

/// `1.23 Mpps`-style rate.
pub fn rate(v: f64, unit: &str) -> String {
    if v >= 1e9 {
        format!("{:.2} G{unit}", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M{unit}", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k{unit}", v / 1e3)
    } else {
        format!("{v:.0} {unit}")
    }
}

/// `12.3us`-style duration from nanoseconds.
pub fn ns(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2}ms", v as f64 / 1e6)
    } else if v >= 1_000 {
        format!("{:.1}us", v as f64 / 1e3)
    } else {
        format!("{v}ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rate(1_234_567.0, "pps"), "1.23 Mpps");
        assert_eq!(rate(660_000.0, "pps"), "660.0 kpps");
        assert_eq!(rate(12.0, "bit/s"), "12 bit/s");
        assert_eq!(ns(12_345), "12.3us");
        assert_eq!(ns(999), "999ns");
        assert_eq!(ns(2_500_000), "2.50ms");
    }

    #[test]
    fn empty_latency_is_zero() {
        let l = Latency::of(&SinkStats::new());
        assert_eq!((l.samples, l.p50, l.max), (0, 0, 0));
    }
}
