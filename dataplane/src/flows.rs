//! Flow records (hot path: recording; setup side: the export handle).
//!
//! Each worker keeps a fixed-size, two-way [`FlowTable`] indexed by the flow hash classify already
//! computed: a flow lives in its hash's slot or that slot's partner. Recording a packet is a key
//! compare and a few stores into its slot: no allocation, no lock, no log. A new flow whose two
//! slots are taken takes the one seen least recently, whose flow goes to the export ring first (if
//! it changed since it was last exported).
//!
//! What a packet costs is kept small by doing it where the packet's headers are at hand: classify
//! finds the flow's slot ([`FlowTable::hit`]: the key compared as five words read from the header,
//! the counters bumped in the key's cache line), the policy and service stages note into that slot
//! ([`FlowTable::policy`], [`FlowTable::translated`]), and the packet's fate is one word stored at
//! the end ([`FlowTable::outcome`]). Everything a person reads (addresses, names of verdicts and
//! stages) is decoded at export, into a [`FlowRecord`].
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
//! A record carries the Service VIP and backend the service stage chose ([`FlowTable::translated`])
//! and which policies' rules the policy stage looked at ([`FlowTable::policy`]: a
//! [`ferry_tables::policy::PolicyRef`] and the policy generation it indexes, named off the hot
//! path by whoever exports it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::queue::ArrayQueue;
use ferry_encap::DropReason;
use ferry_encap::flow::{FlowInfo, L3};

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
    /// The key a slot holds (see [`Slot::key`]).
    fn from_words(w: &[u64; 5]) -> Self {
        let v6 = w[0] & KEY_V6 != 0;
        let (src, dst) = if v6 {
            let addr = |a: u64, b: u64| {
                let mut o = [0u8; 16];
                o[..8].copy_from_slice(&a.to_ne_bytes());
                o[8..].copy_from_slice(&b.to_ne_bytes());
                u128::from_be_bytes(o)
            };
            (addr(w[1], w[2]), addr(w[3], w[4]))
        } else {
            let b = w[1].to_ne_bytes();
            let v4 = |a: [u8; 4]| octets(IpAddr::from(a));
            (v4([b[0], b[1], b[2], b[3]]), v4([b[4], b[5], b[6], b[7]]))
        };
        FlowKey { src, dst, sport: w[0] as u16, dport: (w[0] >> 16) as u16, proto: (w[0] >> 32) as u8, v6 }
    }

    /// The words a slot compares (see [`Slot::key`]; the ingress port not yet in the first).
    fn words(&self) -> [u64; 5] {
        let head = u64::from(self.sport) | u64::from(self.dport) << 16 | u64::from(self.proto) << 32 | KEY_USED;
        if self.v6 {
            let (s, d) = (self.src.to_be_bytes(), self.dst.to_be_bytes());
            let w = |b: &[u8]| u64::from_ne_bytes(<[u8; 8]>::try_from(b).unwrap_or_default());
            [head | KEY_V6, w(&s[..8]), w(&s[8..]), w(&d[..8]), w(&d[8..])]
        } else {
            let (s, d) = (self.src.to_be_bytes(), self.dst.to_be_bytes());
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&s[12..]);
            b[4..].copy_from_slice(&d[12..]);
            [head, u64::from_ne_bytes(b), 0, 0, 0]
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

/// `Slot::svc`: the service stage translated the packet.
const SVC_TRANSLATED: u64 = 1 << 48;
/// A key's first word: the slot holds a flow (so an empty slot's zero key matches nothing).
const KEY_USED: u64 = 1 << 47;
/// A key's first word: IPv6.
const KEY_V6: u64 = 1 << 40;
/// `Slot::flags`: changed since last exported (the low byte is the TCP flags seen).
const SLOT_DIRTY: u16 = 1 << 8;

/// No slot: the packet was not classified as IP (or flows are off).
pub const NO_SLOT: usize = usize::MAX;

/// Eight bytes of `frame` at `at` as they lie in memory (0 past its end).
#[inline(always)]
fn word(frame: &[u8], at: usize) -> u64 {
    frame.get(at..).and_then(<[u8]>::first_chunk::<8>).map_or(0, |b| u64::from_ne_bytes(*b))
}

/// One packet's fate as a flow slot keeps it: egress port, verdict, drop reason and stage in one
/// word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowOutcome(u64);

impl FlowOutcome {
    /// Out on `out_port` ([`NO_PORT`] when dropped), with `verdict`; `reason` (a [`DropReason`]
    /// index) when dropped; decided by `stage`.
    #[inline(always)]
    pub const fn new(out_port: u16, verdict: FlowVerdict, reason: u8, stage: Stage) -> Self {
        FlowOutcome(out_port as u64 | (verdict as u64) << 16 | (reason as u64) << 24 | (stage as u64) << 32)
    }

    fn out_port(self) -> u16 {
        self.0 as u16
    }

    fn verdict(self) -> FlowVerdict {
        match (self.0 >> 16) as u8 {
            1 => FlowVerdict::Replied,
            2 => FlowVerdict::Dropped,
            _ => FlowVerdict::Forwarded,
        }
    }

    fn reason(self) -> u8 {
        (self.0 >> 24) as u8
    }

    fn stage(self) -> u8 {
        (self.0 >> 32) as u8
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
    /// Bytes as the pods see them (for a packet from the uplink, its inner frame).
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

/// One flow as the worker keeps it: the per-packet fields first, in one cache line with the key.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The 5-tuple as it arrived (before any service translation), as the slot compares it: ports,
    /// protocol, family and ingress port in the first word (all zero: empty), then the source and
    /// destination addresses as they lie in the header (one word for IPv4, four for IPv6).
    key: [u64; 5],
    packets: u64,
    bytes: u64,
    last_ns: u64,
    /// The last packet's [`FlowOutcome`].
    outcome: u64,
    /// The last packet's notes from the policy and service stages: the policy rules looked at
    /// (low 32 bits; 0: none, or no policy stage), the backend's port (bits 32-47) and
    /// [`SVC_TRANSLATED`].
    svc: u64,
    /// TCP flags seen (OR) and [`SLOT_DIRTY`].
    flags: u16,
    first_ns: u64,
    policy_generation: u64,
    backend: u128,
}

impl Slot {
    /// The record a person reads, as `worker` exports it.
    fn record(&self, worker: u16) -> FlowRecord {
        let outcome = FlowOutcome(self.outcome);
        FlowRecord {
            key: FlowKey::from_words(&self.key),
            in_port: (self.key[0] >> 48) as u16,
            out_port: outcome.out_port(),
            verdict: outcome.verdict(),
            reason: outcome.reason(),
            stage: outcome.stage(),
            tcp_flags: self.flags as u8,
            packets: self.packets,
            bytes: self.bytes,
            first_ns: self.first_ns,
            last_ns: self.last_ns,
            translated: self.svc & SVC_TRANSLATED != 0,
            backend: if self.svc & SVC_TRANSLATED != 0 { self.backend } else { 0 },
            backend_port: (self.svc >> 32) as u16,
            policy: self.svc as u32,
            policy_generation: if self.svc as u32 != 0 { self.policy_generation } else { 0 },
            worker,
        }
    }
}

/// A worker's flow table and its export handle.
#[derive(Debug)]
pub struct FlowTable {
    slots: Box<[Slot]>,
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
            slots: vec![Slot::default(); n].into_boxed_slice(),
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

    /// A classified IP packet (`info`, of `frame` as classified) in on `in_port` (hot path): its
    /// flow's slot, found or claimed, counts it. Returns the slot, for the notes and the outcome
    /// that follow.
    ///
    /// Bytes are counted as the pods see them: for a packet from the uplink, the inner frame.
    #[inline(always)]
    pub fn hit(&mut self, info: &FlowInfo, frame: &[u8], in_port: u16, now_ns: u64) -> usize {
        let o = info.l3_offset;
        let head = u64::from(info.ports.0)
            | u64::from(info.ports.1) << 16
            | u64::from(info.protocol) << 32
            | KEY_USED
            | u64::from(in_port) << 48;
        let key = match info.l3 {
            L3::Ipv4 => [head, word(frame, o + 12), 0, 0, 0],
            L3::Ipv6 => {
                [head | KEY_V6, word(frame, o + 8), word(frame, o + 16), word(frame, o + 24), word(frame, o + 32)]
            }
            L3::Other(_) => return NO_SLOT,
        };
        let tcp_flags = match info.l4 {
            Some((start, _)) if info.protocol == 6 => frame.get(start + 13).copied().unwrap_or(0),
            _ => 0,
        };
        self.touch(&key, info.hash, frame.len(), tcp_flags, now_ns)
    }

    /// One packet of the flow `key` (with the ingress port in its first word): find its slot (the
    /// hash's, or that one's partner) or claim one, and count the packet.
    ///
    /// A flow lives in one of two neighbouring slots, so two busy flows whose hashes meet share the
    /// pair instead of taking a slot from each other at every packet.
    #[inline(always)]
    fn touch(&mut self, key: &[u64; 5], hash: u32, len: usize, tcp_flags: u8, now_ns: u64) -> usize {
        let home = hash as usize & self.mask;
        let mut i = home;
        if !self.holds(i, key) {
            i ^= 1;
            if !self.holds(i, key) {
                i = self.claim(home, key, now_ns);
            }
        }
        if let Some(slot) = self.slots.get_mut(i) {
            slot.packets += 1;
            slot.bytes += len as u64;
            slot.last_ns = now_ns;
            slot.flags |= u16::from(tcp_flags) | SLOT_DIRTY;
            slot.svc = 0;
        }
        i
    }

    /// Whether slot `i` holds the flow `key` (one branch, not one per word nor a call to `memcmp`).
    #[inline(always)]
    fn holds(&self, i: usize, key: &[u64; 5]) -> bool {
        self.slots.get(i).is_some_and(|slot| {
            let k = &slot.key;
            (k[0] ^ key[0]) | (k[1] ^ key[1]) | (k[2] ^ key[2]) | (k[3] ^ key[3]) | (k[4] ^ key[4]) == 0
        })
    }

    /// A slot for a new flow whose hash gives slot `home`: that one if empty, else its partner if
    /// empty, else the one of the two seen least recently, whose flow (if changed since exported)
    /// goes to the ring first. Returns the slot.
    #[cold]
    #[inline(never)]
    fn claim(&mut self, home: usize, key: &[u64; 5], now_ns: u64) -> usize {
        let (a, b) = (home, home ^ 1);
        let (Some(sa), Some(sb)) = (self.slots.get(a), self.slots.get(b)) else { return home };
        let i = match (sa.key[0] == 0, sb.key[0] == 0) {
            (true, _) => a,
            (false, true) => b,
            _ if sa.last_ns <= sb.last_ns => a,
            _ => b,
        };
        let Some(slot) = self.slots.get_mut(i) else { return i };
        if slot.key[0] != 0 && slot.flags & SLOT_DIRTY != 0 {
            self.export.evictions.fetch_add(1, Ordering::Relaxed);
            if self.export.records.push(slot.record(self.worker)).is_err() {
                self.export.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        *slot = Slot { key: *key, first_ns: now_ns, ..Slot::default() };
        i
    }

    /// The policy stage looked at the rules `by` names (a [`ferry_tables::policy::PolicyRef`]), in
    /// the tables of `generation`, for the packet in `slot`.
    #[inline(always)]
    pub fn policy(&mut self, slot: usize, by: u32, generation: u64) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.svc = (s.svc & !u64::from(u32::MAX)) | u64::from(by);
            s.policy_generation = generation;
        }
    }

    /// The service stage translated the packet in `slot` to `backend:port`.
    #[inline(always)]
    pub fn translated(&mut self, slot: usize, backend: IpAddr, port: u16) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.svc = (s.svc & u64::from(u32::MAX)) | SVC_TRANSLATED | u64::from(port) << 32;
            s.backend = octets(backend);
        }
    }

    /// What became of the packet in `slot`.
    #[inline(always)]
    pub fn outcome(&mut self, slot: usize, outcome: FlowOutcome) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.outcome = outcome.0;
        }
    }

    /// One packet of flow `key` with hash `hash`, in on `in_port` with `len` bytes, and what became
    /// of it (for tools and tests: the pipeline uses [`FlowTable::hit`] and
    /// [`FlowTable::outcome`]). Returns its slot.
    pub fn record(
        &mut self,
        key: &FlowKey,
        hash: u32,
        in_port: u16,
        outcome: FlowOutcome,
        len: u32,
        now_ns: u64,
    ) -> usize {
        let mut words = key.words();
        words[0] |= u64::from(in_port) << 48;
        let slot = self.touch(&words, hash, len as usize, 0, now_ns);
        self.outcome(slot, outcome);
        slot
    }

    /// The flow in `slot` ([`NO_SLOT`]: none).
    pub fn key(&self, slot: usize) -> Option<FlowKey> {
        self.slots.get(slot).filter(|s| s.key[0] != 0).map(|s| FlowKey::from_words(&s.key))
    }

    /// A dropped packet: an event with its first bytes, if the reason's rate allows (off the
    /// forwarding path: only dropped packets come here).
    /// `slot`: the packet's flow ([`NO_SLOT`] when it was not classified as IP).
    #[cold]
    #[inline(never)]
    pub fn drop_event(&mut self, slot: usize, reason: DropReason, in_port: u16, frame: &[u8], now_ns: u64) {
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
            key: self.key(slot),
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
            if slot.flags & SLOT_DIRTY != 0 {
                slot.flags &= !SLOT_DIRTY;
                if self.export.records.push(slot.record(self.worker)).is_err() {
                    self.export.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: [u8; 4], sport: u16) -> FlowKey {
        FlowKey {
            src: octets(IpAddr::from(src)),
            dst: octets(IpAddr::from([10, 0, 0, 9])),
            sport,
            dport: 80,
            proto: 6,
            v6: false,
        }
    }

    /// An Ethernet frame carrying TCP from `src`:`sport` to `dst`:80 with `flags`.
    fn tcp_frame(src: IpAddr, dst: IpAddr, sport: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        let tcp = |f: &mut Vec<u8>| {
            f.extend_from_slice(&sport.to_be_bytes());
            f.extend_from_slice(&80u16.to_be_bytes());
            f.extend_from_slice(&[0; 8]);
            f.push(5 << 4);
            f.push(flags);
            f.extend_from_slice(&[0; 6]);
        };
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 20, 6, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => unreachable!("one family"),
        }
        tcp(&mut f);
        f
    }

    fn forwarded() -> FlowOutcome {
        FlowOutcome::new(0, FlowVerdict::Forwarded, 0, Stage::Encap)
    }

    #[test]
    fn records_accumulate_and_export_once_per_change() {
        let mut t = FlowTable::new(64, 16, std::time::Instant::now(), 3);
        let (src, dst) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 9]));
        for (flags, now) in [(0x02, 5), (0x10, 9)] {
            let f = tcp_frame(src, dst, 1000, flags);
            let info = ferry_encap::flow::classify(&f).expect("TCP");
            let slot = t.hit(&info, &f, 2, now);
            t.outcome(slot, forwarded());
        }
        t.sweep(64);
        t.sweep(64);
        let e = t.export();
        let r = e.records.pop().expect("one record");
        assert!(e.records.pop().is_none(), "exported once: not changed since");
        assert_eq!((r.packets, r.bytes, r.first_ns, r.last_ns, r.tcp_flags), (2, 108, 5, 9, 0x12));
        assert_eq!((r.key.src_ip(), r.key.dst_ip(), r.key.sport, r.key.dport, r.key.proto), (src, dst, 1000, 80, 6));
        assert_eq!(
            (r.worker, r.in_port, r.out_port, r.verdict, r.stage),
            (3, 2, 0, FlowVerdict::Forwarded, Stage::Encap as u8)
        );
    }

    #[test]
    fn ipv6_keys_and_notes_come_back_as_recorded() {
        let mut t = FlowTable::new(64, 16, std::time::Instant::now(), 0);
        let v6 = |a: &str| a.parse::<IpAddr>().expect("an IPv6 address");
        let (src, dst) = (v6("fd00:10:244:1::5"), v6("fd00:10:96::a"));
        let f = tcp_frame(src, dst, 4321, 0x02);
        let info = ferry_encap::flow::classify(&f).expect("TCP");
        let slot = t.hit(&info, &f, 7, 1);
        t.policy(slot, 0x0102_0304, 9);
        t.translated(slot, v6("fd00:10:244:2::8"), 8080);
        t.outcome(slot, FlowOutcome::new(NO_PORT, FlowVerdict::Dropped, DropReason::NoRoute as u8, Stage::Route));
        // The same flow on another port is another record.
        let other = t.hit(&info, &f, 8, 2);
        assert_ne!(slot, other);
        assert_eq!(t.key(slot).map(|k| (k.src_ip(), k.dst_ip(), k.v6)), Some((src, dst, true)));
        t.sweep(64);
        let e = t.export();
        let mut r = e.records.pop().expect("a record");
        if r.in_port != 7 {
            r = e.records.pop().expect("the other record");
        }
        assert_eq!((r.key.src_ip(), r.key.dst_ip(), r.key.sport, r.in_port), (src, dst, 4321, 7));
        assert_eq!(
            (r.verdict, r.reason, r.stage, r.out_port),
            (FlowVerdict::Dropped, DropReason::NoRoute as u8, Stage::Route as u8, NO_PORT)
        );
        assert_eq!((r.policy, r.policy_generation, r.backend_port), (0x0102_0304, 9, 8080));
        assert_eq!(r.backend_ip(), Some(v6("fd00:10:244:2::8")));
        // A later packet of the flow without notes clears them.
        let slot = t.hit(&info, &f, 7, 3);
        t.outcome(slot, forwarded());
        t.sweep(64);
        let r = std::iter::from_fn(|| e.records.pop()).find(|r| r.in_port == 7).expect("exported again");
        assert_eq!((r.policy, r.translated, r.backend_ip(), r.packets), (0, false, None, 2));
    }

    #[test]
    fn colliding_flows_share_a_pair_and_a_third_evicts_the_least_recent() {
        let mut t = FlowTable::new(64, 1, std::time::Instant::now(), 0);
        // Hashes 6, 70 and 134 all map to slot 6 in 64 slots: the pair 6/7.
        t.record(&key([10, 0, 0, 1], 1), 6, 2, forwarded(), 10, 1);
        t.record(&key([10, 0, 0, 2], 2), 70, 2, forwarded(), 10, 2);
        t.record(&key([10, 0, 0, 1], 1), 6, 2, forwarded(), 10, 3);
        let e = t.export();
        assert_eq!(e.evictions.load(Ordering::Relaxed), 0, "both fit");
        // A third flow takes the slot seen least recently (10.0.0.2's): exported into the ring.
        t.record(&key([10, 0, 0, 3], 3), 134, 2, forwarded(), 10, 4);
        assert_eq!(e.evictions.load(Ordering::Relaxed), 1);
        // The ring (one record) is full: the next eviction is lost, and counted.
        t.record(&key([10, 0, 0, 4], 4), 6, 2, forwarded(), 10, 5);
        assert_eq!(e.lost(), 1);
        let r = e.records.pop().expect("the evicted one");
        assert_eq!((r.key.src_ip(), r.packets), (IpAddr::from([10, 0, 0, 2]), 1));
    }

    #[test]
    fn drop_events_are_rate_limited_per_reason() {
        let mut t = FlowTable::new(64, 16, std::time::Instant::now(), 0);
        let frame = [0xabu8; 300];
        for i in 0..25u64 {
            t.drop_event(NO_SLOT, DropReason::NoRoute, 1, &frame, 1_000 + i);
        }
        t.drop_event(NO_SLOT, DropReason::Blackhole, 1, &frame[..40], 2_000);
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
        t.drop_event(NO_SLOT, DropReason::NoRoute, 1, &frame, 1_000_001_000);
        assert!(e.drops.pop().is_some());
    }
}
