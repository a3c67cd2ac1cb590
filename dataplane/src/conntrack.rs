//! Connection tracking: one bounded, lock-free table shared by every worker (hot path: lookup,
//! insert, state updates; control side: garbage collection, listing).
//!
//! # Why one shared table
//!
//! The two directions of a connection usually reach different workers: a pod's packets arrive on
//! the queue its own kernel picked, the replies from another node on the uplink queue the peer's
//! outer UDP source port hashed to. Steering both to one worker would need a symmetric hash at
//! both ends, which ferry does not control (the pod's kernel picks the pod queue). So the table
//! is shared, and each direction has its own entry, keyed by the 5-tuple as it appears on the
//! wire in that direction: the worker that sees the first packet of a connection inserts both
//! (the original direction, with the translation to apply, and the reply direction, with the
//! reverse translation), and a worker seeing either direction finds its entry by hashing the
//! packet's own tuple. Nothing waits on anything: no lock on any path.
//!
//! # Memory model
//!
//! A slot is one 64-byte cache line of atomics (so there are no data races in the Rust sense),
//! guarded by a sequence word `seq` (a seqlock, as Linux's `seqcount_t`):
//!
//! - bit 0: a writer holds the slot; bit 1: the slot holds an entry; bits 2..: a version that every
//!   write increments, so a reader can never mistake a rewritten slot for the one it started
//!   reading (no ABA within 2^30 writes of one slot).
//! - A writer claims a slot by CAS of an even `seq` to `seq | 1` (so two writers never write one
//!   slot), stores the fields with `Relaxed`, then publishes with a `Release` store of the next
//!   version (bit 1 set for an entry, clear for a deletion).
//! - A reader loads `seq` (`Acquire`), skips the slot if bit 0 is set or bit 1 clear, reads the key
//!   (`Relaxed`), issues an `Acquire` fence and reloads `seq`: unchanged means the key it read is
//!   the one published at that version. The translation fields are read the same way.
//! - `last_seen` and the state flags are updated in place by whichever worker sees a packet
//!   (`Relaxed` store and `fetch_or`), outside the seqlock: any interleaving of two such updates is
//!   an acceptable state, and an update racing with the slot's reuse can at worst mark the new
//!   entry as seen or closing, which only shortens or lengthens its life.
//!
//! The reply entry is written before the original one is published, and the original packet is
//! sent only after both are: a reply (caused by that packet) therefore finds its entry.
//!
//! # Bounded, with counted eviction
//!
//! An entry lives in one of two buckets of [`WINDOW`] slots (four cache lines each) chosen by its
//! hash ("two choices"). Inserting when both are full takes the slot of an expired entry, else
//! evicts the one seen least recently, and counts it ([`Conntrack::evictions`]). Lookups read the
//! first bucket, then the second (no tombstones needed).
//! Expired entries are removed by [`Conntrack::gc`], which control calls now and then: never on the
//! hot path. Entries hold addresses, never indices into the forwarding tables, so they survive every
//! table publication.
//!
//! Time is milliseconds since the table was made ([`Conntrack::now`]), in 32 bits: ages are
//! compared with wrapping arithmetic, correct for ages under 24 days.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

/// Slots in a bucket (four cache lines); an entry may occupy either of two buckets.
pub const WINDOW: usize = 4;

/// Default table size (slots; two per translated connection).
pub const DEFAULT_SLOTS: usize = 1 << 18;

const WRITING: u32 = 1;
const VALID: u32 = 2;
const VERSION: u32 = 4;

/// State flags (the top byte of the meta word).
pub mod flags {
    /// This entry is a reply direction (its translation rewrites the source).
    pub const REPLY: u8 = 0x01;
    /// A `sessionAffinity: ClientIP` record: client -> backend for a service.
    pub const AFFINITY: u8 = 0x02;
    /// A TCP SYN was seen in this direction.
    pub const SYN: u8 = 0x04;
    /// A packet was seen in this direction after the first.
    pub const SEEN: u8 = 0x08;
    /// A TCP FIN was seen in this direction.
    pub const FIN: u8 = 0x10;
    /// A TCP RST was seen (either direction).
    pub const RST: u8 = 0x20;
    /// The backend of this connection went away: its packets are dropped until it times out.
    pub const DEAD: u8 = 0x40;
    /// A pod reaching itself through its service: the source is translated too.
    pub const HAIRPIN: u8 = 0x80;
}

/// How long entries live after their last packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP before the other side answered.
    pub tcp_syn: Duration,
    /// TCP with both sides seen and no FIN or RST.
    pub tcp_established: Duration,
    /// TCP after a FIN from both sides, or a RST.
    pub tcp_closed: Duration,
    /// UDP and anything else.
    pub udp: Duration,
    /// `sessionAffinity` records (a service's own timeout applies on lookup; this bounds their
    /// life in the table).
    pub affinity: Duration,
}

impl Default for Timeouts {
    /// Cilium's defaults: 60 s for SYN, 6 h established, 10 s closing, 60 s UDP; Kubernetes'
    /// default affinity timeout (3 h).
    fn default() -> Self {
        Timeouts {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            affinity: Duration::from_secs(3 * 3600),
        }
    }
}

/// A connection's tuple as seen on the wire in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
}

/// What an entry rewrites: the destination (original direction) or the source (reply direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nat {
    /// The address to write.
    pub addr: IpAddr,
    /// The port to write.
    pub port: u16,
}

/// A found entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The translation.
    pub nat: Nat,
    /// State flags ([`flags`]).
    pub flags: u8,
    /// When it was last seen ([`Conntrack::now`] units).
    pub last_seen: u32,
    /// Its slot (for [`Conntrack::touch`]).
    pub slot: u32,
}

/// One entry as listed by [`Conntrack::entries`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The tuple it matches.
    pub tuple: Tuple,
    /// Its translation.
    pub nat: Nat,
    /// State flags ([`flags`]).
    pub flags: u8,
    /// Milliseconds since its last packet.
    pub idle_ms: u32,
}

impl Entry {
    /// The state, as a word: `SYN_SENT`, `ESTABLISHED`, `CLOSING`, `CLOSED` for TCP; `UDP`;
    /// `AFFINITY`.
    pub fn state(&self) -> &'static str {
        state_name(self.tuple.proto, self.flags)
    }
}

fn state_name(proto: u8, f: u8) -> &'static str {
    if f & flags::AFFINITY != 0 {
        "AFFINITY"
    } else if f & flags::DEAD != 0 {
        "BACKEND_GONE"
    } else if proto != 6 {
        "UDP"
    } else if f & flags::RST != 0 {
        "CLOSED"
    } else if f & flags::FIN != 0 {
        "CLOSING"
    } else if f & (flags::SEEN | flags::REPLY) != 0 {
        "ESTABLISHED"
    } else {
        "SYN_SENT"
    }
}

/// One slot: a cache line of atomics.
#[repr(C, align(64))]
#[derive(Default)]
struct Slot {
    seq: AtomicU32,
    last_seen: AtomicU32,
    /// flags:8 | proto:8 | nat port:16 | sport:16 | dport:16, from the top bit down.
    meta: AtomicU64,
    src: [AtomicU64; 2],
    dst: [AtomicU64; 2],
    nat: [AtomicU64; 2],
}

const _: () = assert!(size_of::<Slot>() == 64);

const KEY_MASK: u64 = 0x00ff_0000_ffff_ffff;

#[inline]
fn addr_words(a: IpAddr) -> [u64; 2] {
    let x = match a {
        IpAddr::V4(a) => u128::from(a.to_bits()) | (0xffff << 32),
        IpAddr::V6(a) => a.to_bits(),
    };
    [(x >> 64) as u64, x as u64]
}

fn words_addr(w: [u64; 2]) -> IpAddr {
    let x = (u128::from(w[0]) << 64) | u128::from(w[1]);
    let v6 = Ipv6Addr::from_bits(x);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The key words of a tuple: (src, dst, meta key bits).
#[inline]
fn key_of(t: &Tuple) -> ([u64; 2], [u64; 2], u64) {
    let meta = (u64::from(t.proto) << 48) | (u64::from(t.sport) << 16) | u64::from(t.dport);
    (addr_words(t.src), addr_words(t.dst), meta)
}

#[inline]
fn hash_key(src: &[u64; 2], dst: &[u64; 2], meta: u64) -> u64 {
    let x = src[0].rotate_left(7) ^ src[1] ^ dst[0].rotate_left(17) ^ dst[1].rotate_left(31);
    let mut k = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ meta.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 29)
}

/// The slot array: zeroed memory (an all-zero slot is an empty one: every field is an atomic
/// integer), aligned to 2 MiB and advised into transparent huge pages. At a million connections the
/// table is hundreds of MiB: with 4 KiB pages nearly every lookup also misses the TLB (and in a
/// virtual machine a TLB miss is a two-level page walk).
struct Slots {
    ptr: std::ptr::NonNull<Slot>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: `Slots` owns its memory like a `Box<[Slot]>`; `Slot` is made of atomics (Send + Sync).
unsafe impl Send for Slots {}
// SAFETY: as above: shared access is only ever through `&[Slot]`, whose fields are atomics.
unsafe impl Sync for Slots {}

const HUGE_PAGE: usize = 2 << 20;

impl Slots {
    fn new(len: usize) -> Slots {
        let size = (len * size_of::<Slot>()).max(size_of::<Slot>());
        let align = if size >= HUGE_PAGE { HUGE_PAGE } else { align_of::<Slot>() };
        let Ok(layout) = std::alloc::Layout::from_size_align(size, align) else {
            // Only a size near usize::MAX fails here: a table that large cannot be allocated anyway.
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<Slot>())
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Slot>();
        let Some(ptr) = std::ptr::NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        if align == HUGE_PAGE {
            // SAFETY: the range is this allocation's own. Advice only: failure changes nothing.
            unsafe { libc::madvise(raw.cast(), size, libc::MADV_HUGEPAGE) };
        }
        Slots { ptr, len, layout }
    }
}

impl std::ops::Deref for Slots {
    type Target = [Slot];

    #[inline]
    fn deref(&self) -> &[Slot] {
        // SAFETY: `ptr` points to `len` zero-initialised slots (a valid `Slot` is any bit pattern of
        // its atomic integers), owned by `self` and freed only in `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; nothing refers to it after `self` goes.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

/// The shared connection-tracking table.
pub struct Conntrack {
    slots: Slots,
    mask: usize,
    epoch: Instant,
    timeouts: Timeouts,
    evictions: AtomicU64,
    inserts: AtomicU64,
}

impl fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conntrack")
            .field("slots", &self.slots.len())
            .field("evictions", &self.evictions())
            .finish_non_exhaustive()
    }
}

/// Why an insert found no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Written into a free or expired slot.
    Inserted,
    /// Written over the least recently seen live entry of its window (counted).
    Evicted,
    /// Every slot of the window was being written by another worker at that instant.
    Busy,
}

impl Conntrack {
    /// A table of `slots` slots (rounded up to a power of two, at least two buckets); 64 bytes each.
    pub fn new(slots: usize, timeouts: Timeouts) -> Conntrack {
        let n = slots.max(2 * WINDOW).next_power_of_two();
        let slots = Slots::new(n);
        Conntrack {
            slots,
            mask: n - 1,
            epoch: Instant::now(),
            timeouts,
            evictions: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
        }
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes per slot (one entry).
    pub const fn entry_bytes() -> usize {
        size_of::<Slot>()
    }

    /// The timeouts.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Live entries evicted to make room, since the table was made.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Entries inserted since the table was made.
    pub fn inserts(&self) -> u64 {
        self.inserts.load(Ordering::Relaxed)
    }

    /// The table's clock: milliseconds since it was made (wrapping at 2^32).
    pub fn now(&self) -> u32 {
        self.at(Instant::now())
    }

    /// [`Conntrack::now`] for a given instant.
    pub fn at(&self, t: Instant) -> u32 {
        t.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// The entry's two candidate buckets ("two choices": an entry lives in either, so a bucket
    /// overflows only when both are full; one bucket alone overflowed for 3% of the entries at
    /// half load).
    #[inline]
    fn buckets(&self, h: u64) -> [usize; 2] {
        let a = (h as usize) & self.mask & !(WINDOW - 1);
        let mut b = (h.rotate_left(32) as usize) & self.mask & !(WINDOW - 1);
        if b == a {
            b = (a + WINDOW) & self.mask;
        }
        [a, b]
    }

    /// The slots an entry may occupy: its two buckets.
    #[inline]
    fn candidates(&self, h: u64) -> impl Iterator<Item = usize> {
        self.buckets(h).into_iter().flat_map(|b| b..b + WINDOW)
    }

    /// The entry for `t`, if any.
    // Always inlined: returned through memory, the hit's fields were read back with loads that
    // straddled the callee's narrower stores (a store-forwarding stall; `service_path/hot_64`).
    #[inline(always)]
    pub fn lookup(&self, t: &Tuple) -> Option<Hit> {
        self.locate(t).map(|(hit, _)| hit)
    }

    /// The entry for `t` and the slot's version word when it was read (for a removal that must
    /// not take a newer entry written into the slot since).
    #[inline(always)]
    fn locate(&self, t: &Tuple) -> Option<(Hit, u32)> {
        let (src, dst, meta) = key_of(t);
        let [a, b] = self.buckets(hash_key(&src, &dst, meta));
        self.probe(a, &src, &dst, meta).or_else(|| self.probe(b, &src, &dst, meta))
    }

    /// Look for a key in the bucket at `base`.
    #[inline]
    fn probe(&self, base: usize, src: &[u64; 2], dst: &[u64; 2], meta: u64) -> Option<(Hit, u32)> {
        let bucket = self.slots.get(base..base + WINDOW)?;
        for (k, s) in bucket.iter().enumerate() {
            let seq = s.seq.load(Ordering::Acquire);
            if seq & (WRITING | VALID) != VALID {
                continue;
            }
            let m = s.meta.load(Ordering::Relaxed);
            if m & KEY_MASK != meta
                || s.src[0].load(Ordering::Relaxed) != src[0]
                || s.src[1].load(Ordering::Relaxed) != src[1]
                || s.dst[0].load(Ordering::Relaxed) != dst[0]
                || s.dst[1].load(Ordering::Relaxed) != dst[1]
            {
                continue;
            }
            let nat = [s.nat[0].load(Ordering::Relaxed), s.nat[1].load(Ordering::Relaxed)];
            let last_seen = s.last_seen.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) != seq {
                // Rewritten while we read: the entry we matched is gone.
                continue;
            }
            let hit = Hit {
                nat: Nat { addr: words_addr(nat), port: (m >> 32) as u16 },
                flags: (m >> 56) as u8,
                last_seen,
                slot: (base + k) as u32,
            };
            return Some((hit, seq));
        }
        None
    }

    /// Record a packet on a found entry: its time, and `set` flags (TCP FIN, RST, ...).
    #[inline]
    pub fn touch(&self, hit: &Hit, now: u32, set: u8) {
        let Some(s) = self.slots.get(hit.slot as usize) else { return };
        if hit.last_seen != now {
            s.last_seen.store(now, Ordering::Relaxed);
        }
        if hit.flags & set != set {
            s.meta.fetch_or(u64::from(set) << 56, Ordering::Relaxed);
        }
    }

    /// Insert (or overwrite) the entry for `t`.
    pub fn insert(&self, t: &Tuple, nat: Nat, entry_flags: u8, now: u32) -> InsertOutcome {
        let (src, dst, meta) = key_of(t);
        let h = hash_key(&src, &dst, meta);
        // An entry for the same tuple is rewritten in place (a new connection reusing the tuple).
        let same = self.candidates(h).find(|&i| {
            let s = &self.slots[i];
            s.seq.load(Ordering::Acquire) & VALID != 0
                && s.meta.load(Ordering::Relaxed) & KEY_MASK == meta
                && s.src[0].load(Ordering::Relaxed) == src[0]
                && s.src[1].load(Ordering::Relaxed) == src[1]
                && s.dst[0].load(Ordering::Relaxed) == dst[0]
                && s.dst[1].load(Ordering::Relaxed) == dst[1]
        });
        // Candidates, best first: the same tuple's slot; else the free slots; else (a full window)
        // expired entries, then the least recently seen.
        let mut order = [0usize; 2 * WINDOW];
        let mut count = 0;
        let mut evicting = false;
        if let Some(i) = same {
            order[0] = i;
            count = 1;
        } else {
            for i in self.candidates(h) {
                if self.slots[i].seq.load(Ordering::Relaxed) & VALID == 0 {
                    order[count] = i;
                    count += 1;
                }
            }
            if count == 0 {
                let age = |i: usize| {
                    let s = &self.slots[i];
                    let m = s.meta.load(Ordering::Relaxed);
                    let idle = idle_ms(now, s.last_seen.load(Ordering::Relaxed));
                    let expired = u64::from(idle) >= self.timeout_ms((m >> 48) as u8, (m >> 56) as u8);
                    (expired, idle)
                };
                for (o, i) in order.iter_mut().zip(self.candidates(h)) {
                    *o = i;
                }
                order.sort_by_key(|&i| std::cmp::Reverse(age(i)));
                count = 2 * WINDOW;
                evicting = !age(order[0]).0;
            }
        }
        for &i in &order[..count] {
            let s = &self.slots[i];
            let seq = s.seq.load(Ordering::Relaxed);
            if seq & WRITING != 0 {
                continue;
            }
            if s.seq.compare_exchange(seq, seq | WRITING, Ordering::Acquire, Ordering::Relaxed).is_err() {
                continue;
            }
            let n = addr_words(nat.addr);
            s.src[0].store(src[0], Ordering::Relaxed);
            s.src[1].store(src[1], Ordering::Relaxed);
            s.dst[0].store(dst[0], Ordering::Relaxed);
            s.dst[1].store(dst[1], Ordering::Relaxed);
            s.nat[0].store(n[0], Ordering::Relaxed);
            s.nat[1].store(n[1], Ordering::Relaxed);
            s.meta.store(meta | (u64::from(nat.port) << 32) | (u64::from(entry_flags) << 56), Ordering::Relaxed);
            s.last_seen.store(now, Ordering::Relaxed);
            s.seq.store((seq & !(WRITING | VALID)).wrapping_add(VERSION) | VALID, Ordering::Release);
            self.inserts.fetch_add(1, Ordering::Relaxed);
            let evicted = evicting && seq & VALID != 0;
            if evicted {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                return InsertOutcome::Evicted;
            }
            return InsertOutcome::Inserted;
        }
        InsertOutcome::Busy
    }

    /// Remove the entry for `t`, if there is one. Returns whether one was removed.
    pub fn remove(&self, t: &Tuple) -> bool {
        let Some((hit, seq)) = self.locate(t) else { return false };
        self.remove_slot(hit.slot as usize, seq)
    }

    /// Remove the entry in slot `i` if the slot still holds the version `seq` that was read (an
    /// entry written into it since, by a worker, stays).
    fn remove_slot(&self, i: usize, seq: u32) -> bool {
        let s = &self.slots[i];
        if seq & (WRITING | VALID) != VALID {
            return false;
        }
        if s.seq.compare_exchange(seq, seq | WRITING, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return false;
        }
        s.seq.store((seq & !(WRITING | VALID)).wrapping_add(VERSION), Ordering::Release);
        true
    }

    /// How long an entry of this protocol and these flags lives after its last packet, in ms.
    fn timeout_ms(&self, proto: u8, f: u8) -> u64 {
        let t = &self.timeouts;
        // A policy record, or a source-translation record, lives as long as its connection would.
        let proto = crate::policy::record_real_proto(proto)
            .or_else(|| crate::service::snat_record_real_proto(proto))
            .unwrap_or(proto);
        let d = if f & flags::AFFINITY != 0 {
            t.affinity
        } else if proto != 6 {
            t.udp
        } else if f & (flags::RST | flags::DEAD) != 0 {
            t.tcp_closed
        } else if f & flags::FIN != 0 {
            // One side closed: the other may still send; both closed ends it sooner (see gc).
            t.tcp_syn
        } else if f & (flags::SEEN | flags::REPLY) != 0 {
            t.tcp_established
        } else {
            t.tcp_syn
        };
        d.as_millis() as u64
    }

    /// One consistent read of slot `i`, if it holds an entry.
    fn read(&self, i: usize, now: u32) -> Option<Entry> {
        self.read_versioned(i, now).map(|(e, _)| e)
    }

    /// [`Conntrack::read`], with the slot's version word at the read.
    fn read_versioned(&self, i: usize, now: u32) -> Option<(Entry, u32)> {
        let s = &self.slots[i];
        let seq = s.seq.load(Ordering::Acquire);
        if seq & (WRITING | VALID) != VALID {
            return None;
        }
        let m = s.meta.load(Ordering::Relaxed);
        let src = [s.src[0].load(Ordering::Relaxed), s.src[1].load(Ordering::Relaxed)];
        let dst = [s.dst[0].load(Ordering::Relaxed), s.dst[1].load(Ordering::Relaxed)];
        let nat = [s.nat[0].load(Ordering::Relaxed), s.nat[1].load(Ordering::Relaxed)];
        let last = s.last_seen.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) != seq {
            return None;
        }
        let e = Entry {
            tuple: Tuple {
                src: words_addr(src),
                dst: words_addr(dst),
                sport: (m >> 16) as u16,
                dport: m as u16,
                proto: (m >> 48) as u8,
            },
            nat: Nat { addr: words_addr(nat), port: (m >> 32) as u16 },
            flags: (m >> 56) as u8,
            idle_ms: idle_ms(now, last),
        };
        Some((e, seq))
    }

    /// Every entry (a consistent read of each; entries written meanwhile may be missed).
    pub fn entries(&self) -> Vec<Entry> {
        let now = self.now();
        (0..self.slots.len()).filter_map(|i| self.read(i, now)).collect()
    }

    /// Remove expired entries (control side). A TCP entry's state is the union of both
    /// directions' flags: it is closed once both sent a FIN, or either a RST. Returns how many were
    /// removed.
    pub fn gc(&self, now: u32) -> usize {
        let mut removed = 0;
        for i in 0..self.slots.len() {
            let Some((e, seq)) = self.read_versioned(i, now) else { continue };
            let mut f = e.flags;
            let mut idle = e.idle_ms;
            let mut pair = None;
            if e.tuple.proto == 6 && f & flags::AFFINITY == 0 {
                // The other direction's entry: its flags and its last packet count too.
                let other = Tuple {
                    src: e.nat.addr,
                    dst: e.tuple.src,
                    sport: e.nat.port,
                    dport: e.tuple.sport,
                    proto: e.tuple.proto,
                };
                if let Some((o, oseq)) = self.locate(&other) {
                    let both_fin = f & flags::FIN != 0 && o.flags & flags::FIN != 0;
                    f |= o.flags & (flags::RST | flags::SEEN | flags::REPLY | flags::DEAD);
                    if both_fin {
                        f |= flags::RST;
                    }
                    idle = idle.min(idle_ms(now, o.last_seen));
                    pair = Some((o.slot as usize, oseq));
                }
            }
            // Only the versions read are removed: a slot a worker rewrote meanwhile (a new
            // connection on the same tuple) keeps its new entry.
            if u64::from(idle) >= self.timeout_ms(e.tuple.proto, f) && self.remove_slot(i, seq) {
                removed += 1;
                // The pair expires together (else the survivor, alone, would look half open).
                if pair.is_some_and(|(p, pseq)| self.remove_slot(p, pseq)) {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// How long before `now` an entry was last seen, in ms. A time after `now` counts as just seen:
/// a worker touches entries with its own clock while [`Conntrack::gc`] scans with the time it
/// started at, and a wrapped difference there (about 4.3 billion ms) made a live connection's
/// entry look long expired: the scan removed it, and its next packets went untranslated.
#[inline]
pub fn idle_ms(now: u32, last_seen: u32) -> u32 {
    let d = now.wrapping_sub(last_seen);
    // Ages are under 2^31 ms (24 days, see the module doc); a larger difference is a negative one.
    if d > i32::MAX as u32 { 0 } else { d }
}

/// Address of the unspecified IPv4 host, for tests and defaults.
pub const UNSPECIFIED: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;

    fn t(i: u32) -> Tuple {
        Tuple {
            src: IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0100 + i)),
            dst: "10.96.0.10".parse().expect("ip"),
            sport: 40000 + (i % 20000) as u16,
            dport: 80,
            proto: 6,
        }
    }

    fn nat(i: u32) -> Nat {
        Nat { addr: IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0200 + i)), port: 8080 }
    }

    #[test]
    fn insert_lookup_remove() {
        let ct = Conntrack::new(1024, Timeouts::default());
        assert_eq!(Conntrack::entry_bytes(), 64);
        for i in 0..200 {
            assert_eq!(ct.insert(&t(i), nat(i), 0, 5), InsertOutcome::Inserted);
        }
        for i in 0..200 {
            let h = ct.lookup(&t(i)).expect("present");
            assert_eq!(h.nat, nat(i));
            assert_eq!(h.last_seen, 5);
        }
        assert!(ct.lookup(&t(500)).is_none());
        assert!(ct.remove(&t(7)));
        assert!(ct.lookup(&t(7)).is_none());
        assert_eq!(ct.entries().len(), 199);
        let v6 = Tuple { src: "fd00::1".parse().expect("ip"), dst: "fd00::2".parse().expect("ip"), ..t(1) };
        ct.insert(&v6, Nat { addr: "fd00::3".parse().expect("ip"), port: 1 }, flags::REPLY, 5);
        let h = ct.lookup(&v6).expect("v6");
        assert_eq!(h.nat.addr, "fd00::3".parse::<IpAddr>().expect("ip"));
        assert_eq!(h.flags, flags::REPLY);
    }

    #[test]
    fn a_full_table_evicts_the_least_recent_and_counts_it() {
        let ct = Conntrack::new(64, Timeouts::default());
        for i in 0..1000 {
            ct.insert(&t(i), nat(i), 0, i);
        }
        assert_eq!(ct.inserts(), 1000);
        assert!(ct.evictions() >= 1000 - 64, "{} evictions", ct.evictions());
        assert!(ct.entries().len() <= 64);
        // The newest are there.
        assert!(ct.lookup(&t(999)).is_some());
    }

    /// A TCP connection `i`: its original tuple, its translation and its reply tuple.
    fn connection(i: u32) -> (Tuple, Nat, Tuple) {
        let (fwd, n) = (t(i), nat(i));
        (fwd, n, Tuple { src: n.addr, dst: fwd.src, sport: n.port, dport: fwd.sport, proto: 6 })
    }

    #[test]
    fn gc_follows_the_state_of_both_directions() {
        let ct = Conntrack::new(1024, Timeouts::default());
        let (fwd, n, rev) = connection(1);
        ct.insert(&fwd, n, flags::SYN, 0);
        ct.insert(&rev, Nat { addr: fwd.dst, port: fwd.dport }, flags::REPLY, 0);
        // Established (the reply entry exists): alive after a minute and more.
        assert_eq!(ct.gc(120_000), 0);
        let h = ct.lookup(&fwd).expect("fwd");
        ct.touch(&h, 120_000, flags::FIN);
        assert_eq!(ct.gc(125_000), 0, "half closed");
        let h = ct.lookup(&rev).expect("rev");
        ct.touch(&h, 125_000, flags::FIN);
        // Both closed: 10 s later both go.
        assert_eq!(ct.gc(134_000), 0);
        assert_eq!(ct.gc(136_000), 2);
        // UDP: 60 s.
        let u = Tuple { proto: 17, ..t(2) };
        ct.insert(&u, nat(2), 0, 0);
        assert_eq!(ct.gc(59_000), 0);
        assert_eq!(ct.gc(61_000), 1);
    }

    /// A worker's clock runs ahead of a scan that started earlier: entries inserted or touched
    /// after the scan's `now` are just seen, not 4.3 billion ms idle (the scan removed them, and
    /// a live connection lost its translation: 1 in 300 connections in the services e2e test).
    #[test]
    fn gc_keeps_entries_seen_after_its_own_now() {
        let ct = Conntrack::new(1024, Timeouts::default());
        let (fwd, n, rev) = connection(1);
        ct.insert(&rev, Nat { addr: fwd.dst, port: fwd.dport }, flags::REPLY, 5_000);
        ct.insert(&fwd, n, flags::SYN, 5_000);
        assert_eq!(ct.gc(4_990), 0, "a scan that began 10 ms before the insert");
        assert!(ct.lookup(&fwd).is_some() && ct.lookup(&rev).is_some());
        assert_eq!(ct.entries().len(), 2);
        assert!(ct.entries().iter().all(|e| e.idle_ms == 0), "listed as just seen");
        assert_eq!(idle_ms(10, 4), 6);
        assert_eq!(idle_ms(4, 10), 0);
        assert_eq!(idle_ms(5, u32::MAX - 4), 10, "across the clock's wrap");
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_a_torn_entry() {
        // Writers rewrite the same window's slots with entries whose translation is derived from
        // the key; a reader that ever sees a key with another key's translation has read a torn
        // entry.
        let ct = std::sync::Arc::new(Conntrack::new(16, Timeouts::default()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let ct = std::sync::Arc::clone(&ct);
                std::thread::spawn(move || {
                    for k in 0..200_000u32 {
                        let i = (k * 2 + w) % 64;
                        ct.insert(&t(i), nat(i), 0, k);
                    }
                })
            })
            .collect();
        let reader = {
            let ct = std::sync::Arc::clone(&ct);
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut hits = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..64 {
                        if let Some(h) = ct.lookup(&t(i)) {
                            assert_eq!(h.nat, nat(i), "torn entry for key {i}");
                            hits += 1;
                        }
                    }
                }
                hits
            })
        };
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::Relaxed);
        let hits = reader.join().expect("reader");
        assert!(hits > 0);
        for e in ct.entries() {
            let i = (u32::from(e.tuple.sport) - 40000) % 20000;
            assert_eq!(e.nat, nat(i));
        }
    }
}
