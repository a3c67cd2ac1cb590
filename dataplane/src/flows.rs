//! Flow records (hot path: recording; setup side: the export handle).
//!
//! Each worker keeps a fixed-size, direct-mapped [`FlowTable`] indexed by the flow hash classify
//! already computed. Recording a packet is a key compare and a few stores into its slot: no
//! allocation, no lock, no log. A slot taken by another flow is handed to the export ring first
//! (if it changed since it was last exported) and reused.
//!
//! Export is off the per-packet path: when the worker publishes its counters (every few
//! milliseconds while busy, whenever it goes idle) it sweeps part of the table (all of it when
//! idle) and copies every record that changed since its last export into a bounded lock-free ring
//! ([`FlowExport`]), which the agent drains. A full ring loses the copy: counted
//! ([`FlowExport::lost`]), never hidden. Records are cumulative while a flow keeps its slot, so a
//! lost copy loses timeliness, not counts; a flow evicted while the ring is full loses what it
//! counted since its last export.
//!
//! Drops also leave a [`DropEvent`] carrying the first [`DROP_SNAP`] bytes of the packet, rate
//! limited per [`DropReason`] and per worker ([`DROP_EVENTS_PER_SEC`]).
//!
//! A record carries the Service VIP and backend the service stage chose ([`Seen::translate`]) and
//! which policies' rules the policy stage looked at ([`Seen::policy`]: a
//! [`ferry_tables::policy::PolicyRef`] and the policy generation it indexes, named off the hot
//! path by whoever exports it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::queue::ArrayQueue;
use ferry_encap::DropReason;
use ferry_encap::flow::FlowInfo;

/// Bytes of a dropped packet kept in its [`DropEvent`].
pub const DROP_SNAP: usize = 128;

/// Drop events per second per reason per worker (and the burst).
pub const DROP_EVENTS_PER_SEC: u32 = 10;

/// Default slots in a worker's flow table.
pub const DEFAULT_SLOTS: usize = 4096;

/// Default capacity of a worker's export ring (records) and drop ring (events).
pub const DEFAULT_RING: usize = 8192;

/// Drop events a worker's ring holds.
pub const DROP_RING: usize = 1024;

/// No port (a dropped packet's egress).
pub const NO_PORT: u16 = u16::MAX;

/// A flow's 5-tuple; IPv4 addresses are stored IPv4-mapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address (IPv4-mapped for IPv4), as a number: two 128-bit compares match a key.
    pub src: u128,
    /// Destination address.
    pub dst: u128,
    /// Source port (0 when the protocol has none).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// IPv6 (else IPv4).
    pub v6: bool,
}

#[inline(always)]
fn octets(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => 0xffff_0000_0000 | u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits(),
    }
}

fn addr(b: u128, v6: bool) -> IpAddr {
    let a = Ipv6Addr::from(b);
    if v6 { IpAddr::V6(a) } else { IpAddr::V4(a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)) }
}

impl FlowKey {
    /// The key of a classified IP packet.
    #[inline]
    pub fn of(info: &FlowInfo) -> Self {
        let (src, dst) = (
            info.src.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            info.dst.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        );
        FlowKey {
            src: octets(src),
            dst: octets(dst),
            sport: info.ports.0,
            dport: info.ports.1,
            proto: info.protocol,
            v6: src.is_ipv6(),
        }
    }

    /// The source address.
    pub fn src_ip(&self) -> IpAddr {
        addr(self.src, self.v6)
    }

    /// The destination address.
    pub fn dst_ip(&self) -> IpAddr {
        addr(self.dst, self.v6)
    }
}

/// What the pipeline saw of the packet it just processed (it fills this; the worker records it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Whether the packet was classified as IP (only then `key`, `hash` and `tcp_flags` mean
    /// anything).
    pub valid: bool,
    /// Its 5-tuple as it arrived (before any service translation).
    pub key: FlowKey,
    /// The flow hash.
    pub hash: u32,
    /// TCP flags of this packet (0 for other protocols).
    pub tcp_flags: u8,
    /// Translated by the service stage to `backend`.
    pub translated: bool,
    /// The backend chosen (address), when translated.
    pub backend: u128,
    /// The backend's port.
    pub backend_port: u16,
    /// The policy rules the policy stage looked at (0: none, or the stage did not run).
    pub policy: u32,
    /// The policy generation `policy` indexes.
    pub policy_generation: u64,
}

impl Seen {
    /// A packet begins: nothing seen yet.
    #[inline(always)]
    pub fn reset(&mut self) {
        self.valid = false;
        self.translated = false;
    }

    /// Classify found an IP packet.
    #[inline(always)]
    pub fn classified(&mut self, info: &FlowInfo, frame: &[u8]) {
        self.valid = true;
        self.policy = 0;
        self.key = FlowKey::of(info);
        self.hash = info.hash;
        self.tcp_flags = match info.l4 {
            Some((start, _)) if info.protocol == 6 => frame.get(start + 13).copied().unwrap_or(0),
            _ => 0,
        };
    }

    /// The policy stage looked at the rules `by` names, in the tables of `generation`.
    #[inline(always)]
    pub fn policy(&mut self, by: u32, generation: u64) {
        self.policy = by;
        self.policy_generation = generation;
    }

    /// The service stage translated the destination to `backend:port`.
    #[inline(always)]
    pub fn translate(&mut self, backend: IpAddr, port: u16) {
        self.translated = true;
        self.backend = octets(backend);
        self.backend_port = port;
    }
}

/// What happened to a flow's packets.
#[repr(u8)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FlowVerdict {
    /// Sent on (to a pod, the host port, or encapsulated to another node).
    #[default]
    Forwarded,
    /// Answered by ferry itself (ARP, neighbour discovery, an ICMP error, a TCP reset).
    Replied,
    /// Dropped ([`FlowRecord::reason`] says why).
    Dropped,
}

impl FlowVerdict {
    /// `forwarded`, `replied` or `dropped`.
    pub fn name(self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "forwarded",
            FlowVerdict::Replied => "replied",
            FlowVerdict::Dropped => "dropped",
        }
    }
}

/// The pipeline stage that decided a packet's fate.
#[repr(u8)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Tunnel packet validation and decapsulation.
    Decap,
    /// What the sending node may send (known node, inner TTL and source).
    DecapChecks,
    /// The pod's access port (VLAN tag, source MAC).
    AccessPort,
    /// Header parsing.
    Classify,
    /// A pod's IP checks (checksum, gateway MAC, source address).
    IpChecks,
    /// Checksums and TTL before routing.
    Prepare,
    /// Services.
    Service,
    /// NetworkPolicy.
    Policy,
    /// The route lookup.
    Route,
    /// Encapsulation toward another node.
    Encap,
    /// Delivery to a pod or the host port on this node.
    #[default]
    Deliver,
    /// Out of the cluster through the node's kernel.
    HostExit,
    /// Answered by ferry (ARP, ND, ICMP).
    Reply,
}

impl Stage {
    /// Every stage, in discriminant order.
    pub const ALL: &'static [Stage] = &[
        Stage::Decap,
        Stage::DecapChecks,
        Stage::AccessPort,
        Stage::Classify,
        Stage::IpChecks,
        Stage::Prepare,
        Stage::Service,
        Stage::Policy,
        Stage::Route,
        Stage::Encap,
        Stage::Deliver,
        Stage::HostExit,
        Stage::Reply,
    ];

    /// A stable `snake_case` name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Decap => "decap",
            Stage::DecapChecks => "decap_checks",
            Stage::AccessPort => "access_port",
            Stage::Classify => "classify",
            Stage::IpChecks => "ip_checks",
            Stage::Prepare => "prepare",
            Stage::Service => "service",
            Stage::Policy => "policy",
            Stage::Route => "route",
            Stage::Encap => "encap",
            Stage::Deliver => "deliver",
            Stage::HostExit => "host_exit",
            Stage::Reply => "reply",
        }
    }

    /// The stage with this discriminant.
    pub fn from_index(i: u8) -> Option<Stage> {
        Self::ALL.get(usize::from(i)).copied()
    }

    /// The stage that drops for `reason`. `from_uplink`: the packet came in from the underlay (where
    /// header errors are decap's).
    pub fn of_drop(reason: DropReason, from_uplink: bool) -> Stage {
        use DropReason as R;
        match reason {
            R::UnknownSourceNode | R::InnerTtlZero | R::InnerSrcMacMulticast | R::InnerSpoofedSource => {
                Stage::DecapChecks
            }
            R::NotLocalPod => Stage::Route,
            R::PodVlanTagged | R::PodSrcMacMismatch | R::VnetBadHeader | R::VnetBadChecksumOffset => Stage::AccessPort,
            R::PodDstMacNotGateway
            | R::PodIpv4BadChecksum
            | R::SpoofedSource
            | R::ArpNotForGateway
            | R::NdNotForGateway => Stage::IpChecks,
            R::TtlExceeded => Stage::Prepare,
            R::ServiceNoEndpoint | R::ServiceBackendGone => Stage::Service,
            R::PolicyDeniedIngress | R::PolicyDeniedEgress => Stage::Policy,
            R::NoRoute | R::Blackhole | R::NoNeighbour => Stage::Route,
            R::TooBig | R::TooBigNoFragmentation | R::NoHeadroom | R::TxRingFull => Stage::Encap,
            _ if from_uplink => Stage::Decap,
            _ => Stage::Classify,
        }
    }
}

/// One flow as a worker saw it (cumulative while the flow keeps its slot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowRecord {
    /// The 5-tuple as it arrived.
    pub key: FlowKey,
    /// The port it came in on.
    pub in_port: u16,
    /// The port it went out on ([`NO_PORT`] when dropped).
    pub out_port: u16,
    /// What happened to its last packet.
    pub verdict: FlowVerdict,
    /// Why its last packet was dropped (a [`DropReason`] index; meaningful when dropped).
    pub reason: u8,
    /// The stage that decided its last packet ([`Stage`] index).
    pub stage: u8,
    /// TCP flags seen on any of its packets (OR).
    pub tcp_flags: u8,
    /// Packets.
    pub packets: u64,
    /// Bytes (as received).
    pub bytes: u64,
    /// First seen, nanoseconds on the worker's clock ([`FlowExport::epoch_unix_ns`] + this is Unix time).
    pub first_ns: u64,
    /// Last seen, same clock.
    pub last_ns: u64,
    /// The service stage translated it to a backend (then `key.dst`/`key.dport` is the VIP).
    pub translated: bool,
    /// The backend chosen.
    pub backend: u128,
    /// The backend's port.
    pub backend_port: u16,
    /// The policy rules that allowed or denied its last packet (a
    /// [`ferry_tables::policy::PolicyRef`]; 0: none, or no policy stage).
    pub policy: u32,
    /// The policy generation `policy` indexes.
    pub policy_generation: u64,
    /// The worker that recorded it (filled at export).
    pub worker: u16,
    /// Changed since last exported.
    dirty: bool,
    /// The slot holds a flow.
    used: bool,
}

impl FlowRecord {
    /// The backend, when translated.
    pub fn backend_ip(&self) -> Option<IpAddr> {
        self.translated.then(|| addr(self.backend, self.key.v6))
    }
}

/// A dropped packet's event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropEvent {
    /// Its 5-tuple, when it was classified as IP.
    pub key: Option<FlowKey>,
    /// Why.
    pub reason: DropReason,
    /// The port it came in on.
    pub in_port: u16,
    /// Its length.
    pub len: u32,
    /// When, on the worker's clock.
    pub time_ns: u64,
    /// How many of `bytes` are the packet's.
    pub caplen: u8,
    /// Its first bytes.
    pub bytes: [u8; DROP_SNAP],
}

/// The export side of a worker's flows, shared with the agent: the two bounded rings and the
/// lost-event counts.
#[derive(Debug)]
pub struct FlowExport {
    /// Flow records, as exported.
    pub records: ArrayQueue<FlowRecord>,
    /// Drop events.
    pub drops: ArrayQueue<DropEvent>,
    /// Records lost to a full ring.
    pub lost: AtomicU64,
    /// Drop events lost to a full ring.
    pub drops_lost: AtomicU64,
    /// Drop events not taken because of the per-reason rate limit.
    pub drops_limited: AtomicU64,
    /// Flows evicted from their slot by another flow.
    pub evictions: AtomicU64,
    /// The worker's clock's zero, in Unix nanoseconds.
    pub epoch_unix_ns: u64,
}

impl FlowExport {
    /// Records lost so far.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// A worker's flow table and its export handle.
#[derive(Debug)]
pub struct FlowTable {
    slots: Box<[FlowRecord]>,
    mask: usize,
    cursor: usize,
    export: std::sync::Arc<FlowExport>,
    /// Per drop reason: tokens and the time they were last refilled.
    limiter: Box<[(u32, u64)]>,
    worker: u16,
}

impl FlowTable {
    /// A table of `slots` (rounded up to a power of two, at least 64) exporting into rings of
    /// `ring` records; `epoch` is the worker's clock's zero.
    pub fn new(slots: usize, ring: usize, epoch: std::time::Instant, worker: u16) -> Self {
        let n = slots.max(64).next_power_of_two();
        let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let epoch_unix_ns = (now_unix.saturating_sub(epoch.elapsed())).as_nanos() as u64;
        FlowTable {
            slots: vec![FlowRecord::default(); n].into_boxed_slice(),
            mask: n - 1,
            cursor: 0,
            export: std::sync::Arc::new(FlowExport {
                records: ArrayQueue::new(ring.max(1)),
                drops: ArrayQueue::new(DROP_RING),
                lost: AtomicU64::new(0),
                drops_lost: AtomicU64::new(0),
                drops_limited: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
                epoch_unix_ns,
            }),
            limiter: vec![(DROP_EVENTS_PER_SEC, 0); DropReason::COUNT].into_boxed_slice(),
            worker,
        }
    }

    /// The export handle (for the agent).
    pub fn export(&self) -> std::sync::Arc<FlowExport> {
        std::sync::Arc::clone(&self.export)
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Record one packet of a classified flow (hot path).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn record(
        &mut self,
        seen: &Seen,
        in_port: u16,
        out_port: u16,
        verdict: FlowVerdict,
        reason: u8,
        stage: Stage,
        len: u32,
        now_ns: u64,
    ) {
        let i = seen.hash as usize & self.mask;
        let slot = &mut self.slots[i];
        if !slot.used || slot.key != seen.key || slot.in_port != in_port {
            if slot.used && slot.dirty {
                let mut old = *slot;
                old.worker = self.worker;
                self.export.evictions.fetch_add(1, Ordering::Relaxed);
                if self.export.records.push(old).is_err() {
                    self.export.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
            *slot = FlowRecord { key: seen.key, in_port, first_ns: now_ns, used: true, ..FlowRecord::default() };
        }
        slot.out_port = out_port;
        slot.verdict = verdict;
        slot.reason = reason;
        slot.stage = stage as u8;
        slot.tcp_flags |= seen.tcp_flags;
        slot.packets += 1;
        slot.bytes += u64::from(len);
        slot.last_ns = now_ns;
        slot.translated = seen.translated;
        slot.backend = seen.backend;
        slot.backend_port = seen.backend_port;
        slot.policy = seen.policy;
        slot.policy_generation = seen.policy_generation;
        slot.dirty = true;
    }

    /// A dropped packet: an event with its first bytes, if the reason's rate allows (off the
    /// forwarding path: only dropped packets come here).
    pub fn drop_event(&mut self, seen: &Seen, reason: DropReason, in_port: u16, frame: &[u8], now_ns: u64) {
        let (tokens, at) = &mut self.limiter[reason as usize];
        if now_ns.saturating_sub(*at) >= 1_000_000_000 {
            *tokens = DROP_EVENTS_PER_SEC;
            *at = now_ns;
        }
        if *tokens == 0 {
            self.export.drops_limited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *tokens -= 1;
        let caplen = frame.len().min(DROP_SNAP);
        let mut bytes = [0u8; DROP_SNAP];
        bytes[..caplen].copy_from_slice(&frame[..caplen]);
        let ev = DropEvent {
            key: seen.valid.then_some(seen.key),
            reason,
            in_port,
            len: frame.len() as u32,
            time_ns: now_ns,
            caplen: caplen as u8,
            bytes,
        };
        if self.export.drops.push(ev).is_err() {
            self.export.drops_lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Export up to `max` slots' changes into the ring (off the per-packet path: the worker calls
    /// it when it publishes its counters).
    pub fn sweep(&mut self, max: usize) {
        let n = max.min(self.slots.len());
        for _ in 0..n {
            let slot = &mut self.slots[self.cursor];
            self.cursor = (self.cursor + 1) & self.mask;
            if slot.dirty {
                slot.dirty = false;
                let mut r = *slot;
                r.worker = self.worker;
                if self.export.records.push(r).is_err() {
                    self.export.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(src: [u8; 4], sport: u16, hash: u32) -> Seen {
        let mut s = Seen { valid: true, hash, ..Seen::default() };
        s.key = FlowKey {
            src: octets(IpAddr::from(src)),
            dst: octets(IpAddr::from([10, 0, 0, 9])),
            sport,
            dport: 80,
            proto: 6,
            v6: false,
        };
        s
    }

    #[test]
    fn records_accumulate_and_export_once_per_change() {
        let mut t = FlowTable::new(64, 16, std::time::Instant::now(), 3);
        let mut s = seen([10, 0, 0, 1], 1000, 7);
        s.tcp_flags = 0x02;
        t.record(&s, 2, 0, FlowVerdict::Forwarded, 0, Stage::Encap, 100, 5);
        s.tcp_flags = 0x10;
        t.record(&s, 2, 0, FlowVerdict::Forwarded, 0, Stage::Encap, 60, 9);
        t.sweep(64);
        t.sweep(64);
        let e = t.export();
        let r = e.records.pop().expect("one record");
        assert!(e.records.pop().is_none(), "exported once: not changed since");
        assert_eq!((r.packets, r.bytes, r.first_ns, r.last_ns, r.tcp_flags), (2, 160, 5, 9, 0x12));
        assert_eq!(r.key.src_ip(), IpAddr::from([10, 0, 0, 1]));
        assert_eq!((r.worker, r.in_port, r.out_port, r.stage), (3, 2, 0, Stage::Encap as u8));
    }

    #[test]
    fn a_colliding_flow_exports_the_old_one_and_a_full_ring_counts_losses() {
        let mut t = FlowTable::new(64, 1, std::time::Instant::now(), 0);
        // Same slot (hash 7 and 71 both map to 7 in 64 slots).
        t.record(&seen([10, 0, 0, 1], 1, 7), 2, 0, FlowVerdict::Forwarded, 0, Stage::Deliver, 10, 1);
        t.record(&seen([10, 0, 0, 2], 2, 71), 2, 0, FlowVerdict::Forwarded, 0, Stage::Deliver, 10, 2);
        let e = t.export();
        assert_eq!(e.evictions.load(Ordering::Relaxed), 1);
        // The ring (one record) holds the evicted flow; the next eviction is lost and counted.
        t.record(&seen([10, 0, 0, 3], 3, 135), 2, 0, FlowVerdict::Forwarded, 0, Stage::Deliver, 10, 3);
        assert_eq!(e.lost(), 1);
        assert_eq!(e.records.pop().expect("the first").key.src_ip(), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn drop_events_are_rate_limited_per_reason() {
        let mut t = FlowTable::new(64, 16, std::time::Instant::now(), 0);
        let frame = [0xabu8; 300];
        for i in 0..25u64 {
            t.drop_event(&Seen::default(), DropReason::NoRoute, 1, &frame, 1_000 + i);
        }
        t.drop_event(&Seen::default(), DropReason::Blackhole, 1, &frame[..40], 2_000);
        let e = t.export();
        let mut n = 0;
        while let Some(d) = e.drops.pop() {
            if d.reason == DropReason::NoRoute {
                n += 1;
                assert_eq!((d.caplen as usize, d.len), (DROP_SNAP, 300));
            } else {
                assert_eq!((d.caplen, d.len, d.key), (40, 40, None));
            }
        }
        assert_eq!(n, DROP_EVENTS_PER_SEC);
        assert_eq!(e.drops_limited.load(Ordering::Relaxed), 15);
        // A second later the reason has its tokens back.
        t.drop_event(&Seen::default(), DropReason::NoRoute, 1, &frame, 1_000_001_000);
        assert!(e.drops.pop().is_some());
    }
}
