//! Longest-prefix match: prefix -> next-hop index, for IPv4 and IPv6.
//!
//! Two sides meet here:
//!
//! - **Control/setup**: a [`RouteSet`] is the editable list of routes (a sorted map). Compiling it
//!   into a lookup structure ([`Poptrie::build`], [`Dir248::build`]) allocates and may take
//!   milliseconds; the result is immutable.
//! - **Hot path**: [`Lpm::lookup`] and [`Lpm::lookup_batch`] on an immutable structure: no
//!   allocation, no locks, no writes.
//!
//! Values are small integers (indices into a next-hop array, at most [`MAX_VALUE`]) so that the
//! structures stay compact and know nothing of what a next hop is.
//!
//! [`Poptrie`] is the structure the forwarding snapshot uses for both families: about 5 ns per
//! IPv4 lookup at 100k prefixes, 5-20 MB at a million, rebuilt in 1-10 ms at 100k
//! (`cargo bench --bench lpm` and `--bench publish` in the workspace root). [`Dir248`] (IPv4
//! only) was faster still but costs 64 MiB and 30 ms or more per rebuild; it and [`NaiveLpm`]
//! are kept as the measured alternative and as the reference the property tests and benchmarks
//! compare against.

mod dir24;
mod naive;
mod poptrie;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};

pub use dir24::Dir248;
pub use naive::NaiveLpm;
pub use poptrie::Poptrie;

/// Largest value a route may carry. The top bit and the all-ones pattern below it are reserved by
/// the structures (node/leaf flag, "no route").
pub const MAX_VALUE: u32 = 0x7fff_fffe;

/// The reserved encoding of "no route" inside the structures (31 bits, all ones).
const NO_ROUTE: u32 = 0x7fff_ffff;

mod private {
    pub trait Sealed {}
    impl Sealed for std::net::Ipv4Addr {}
    impl Sealed for std::net::Ipv6Addr {}
}

/// An address family's address type: [`Ipv4Addr`] or [`Ipv6Addr`].
///
/// The structures are generic over it; the bit extraction is the only per-family code on the hot
/// path.
pub trait Address: Copy + Ord + Hash + fmt::Debug + fmt::Display + Send + Sync + 'static + private::Sealed {
    /// Address width in bits.
    const BITS: u8;

    /// The address left-aligned in a `u128` (its first bit is bit 127); used when building.
    fn to_u128(self) -> u128;

    /// Inverse of [`Address::to_u128`]; bits below the address width are ignored.
    fn from_u128(bits: u128) -> Self;

    /// `n` bits (1..=32) starting `offset` bits from the most significant one, as an index.
    /// Bits past the end of the address read as zero. `offset` must be below [`Address::BITS`].
    fn bits_at(self, offset: u32, n: u32) -> usize;
}

impl Address for Ipv4Addr {
    const BITS: u8 = 32;

    fn to_u128(self) -> u128 {
        u128::from(u32::from(self)) << 96
    }

    fn from_u128(bits: u128) -> Self {
        // Truncation is the point: the address sits in the top 32 bits.
        Ipv4Addr::from((bits >> 96) as u32)
    }

    #[inline(always)]
    fn bits_at(self, offset: u32, n: u32) -> usize {
        ((u32::from(self) << offset) >> (32 - n)) as usize
    }
}

impl Address for Ipv6Addr {
    const BITS: u8 = 128;

    fn to_u128(self) -> u128 {
        u128::from(self)
    }

    fn from_u128(bits: u128) -> Self {
        Ipv6Addr::from(bits)
    }

    #[inline(always)]
    fn bits_at(self, offset: u32, n: u32) -> usize {
        // Shift the u128 once, then work on the top word: cheaper than a full 128-bit shift pair.
        let top = ((u128::from(self) << offset) >> 64) as u64;
        (top >> (64 - n)) as usize
    }
}

/// Mask of the first `len` bits of a left-aligned `u128`.
fn prefix_mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

/// Why a prefix or a route is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LpmError {
    /// A prefix longer than its family's address.
    #[error("prefix length {len} is longer than the {max}-bit address")]
    LengthTooLong {
        /// The length given.
        len: u8,
        /// The address width.
        max: u8,
    },
    /// Bits set after the prefix length: `10.0.0.1/24` instead of `10.0.0.0/24`.
    #[error("{addr}/{len} has bits set after the prefix length; did you mean its network address?")]
    HostBitsSet {
        /// The address given, as text.
        addr: String,
        /// The length given.
        len: u8,
    },
    /// A value the structures cannot encode.
    #[error("route value {value} is larger than the maximum {max}")]
    ValueTooLarge {
        /// The value given.
        value: u32,
        /// [`MAX_VALUE`].
        max: u32,
    },
    /// The compiled structure would need more nodes or groups than its 31-bit indices address.
    #[error("{what}: {needed} entries needed, at most {max} addressable")]
    CapacityExceeded {
        /// Which part overflowed.
        what: &'static str,
        /// How many were needed.
        needed: usize,
        /// The limit.
        max: usize,
    },
}

/// A network prefix: an address with every bit after `len` zero.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix<A> {
    // Field order matters: the derived `Ord` sorts by address, then by length, which puts every
    // covering prefix before the prefixes it covers. The builders rely on that order.
    addr: A,
    len: u8,
}

impl<A: Address> Prefix<A> {
    /// The prefix `addr/len`.
    ///
    /// # Errors
    /// [`LpmError::LengthTooLong`] or [`LpmError::HostBitsSet`].
    pub fn new(addr: A, len: u8) -> Result<Self, LpmError> {
        if len > A::BITS {
            return Err(LpmError::LengthTooLong { len, max: A::BITS });
        }
        if addr.to_u128() & !prefix_mask(len) != 0 {
            return Err(LpmError::HostBitsSet { addr: addr.to_string(), len });
        }
        Ok(Prefix { addr, len })
    }

    /// The prefix of length `len` (clamped to the address width) that contains `addr`.
    pub fn containing(addr: A, len: u8) -> Self {
        let len = len.min(A::BITS);
        Prefix { addr: A::from_u128(addr.to_u128() & prefix_mask(len)), len }
    }

    /// The network address.
    pub fn addr(&self) -> A {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// True for the default route (`/0`), which contains every address.
    pub fn is_default(&self) -> bool {
        self.len == 0
    }

    /// Whether `addr` lies inside this prefix.
    pub fn contains(&self, addr: A) -> bool {
        addr.to_u128() & prefix_mask(self.len) == self.addr.to_u128()
    }
}

impl<A: Address> fmt::Display for Prefix<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<A: Address> fmt::Debug for Prefix<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TryFrom<ipnet::Ipv4Net> for Prefix<Ipv4Addr> {
    type Error = LpmError;

    fn try_from(net: ipnet::Ipv4Net) -> Result<Self, LpmError> {
        Prefix::new(net.addr(), net.prefix_len())
    }
}

impl TryFrom<ipnet::Ipv6Net> for Prefix<Ipv6Addr> {
    type Error = LpmError;

    fn try_from(net: ipnet::Ipv6Net) -> Result<Self, LpmError> {
        Prefix::new(net.addr(), net.prefix_len())
    }
}

/// The editable route list of one family (control side): prefix -> value, at most one value per
/// prefix. Compile it with [`Poptrie::build`] (or another [`Lpm`]) to get something to look up in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSet<A: Address> {
    routes: BTreeMap<Prefix<A>, u32>,
}

impl<A: Address> Default for RouteSet<A> {
    fn default() -> Self {
        RouteSet { routes: BTreeMap::new() }
    }
}

impl<A: Address> RouteSet<A> {
    /// An empty route set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert or replace the route for `prefix`; returns the value it replaced.
    ///
    /// # Errors
    /// [`LpmError::ValueTooLarge`] if `value` exceeds [`MAX_VALUE`]; the set is unchanged.
    pub fn insert(&mut self, prefix: Prefix<A>, value: u32) -> Result<Option<u32>, LpmError> {
        if value > MAX_VALUE {
            return Err(LpmError::ValueTooLarge { value, max: MAX_VALUE });
        }
        Ok(self.routes.insert(prefix, value))
    }

    /// Remove the route for exactly `prefix`; returns its value.
    pub fn remove(&mut self, prefix: &Prefix<A>) -> Option<u32> {
        self.routes.remove(prefix)
    }

    /// The value stored for exactly `prefix` (not a longest-prefix lookup).
    pub fn get(&self, prefix: &Prefix<A>) -> Option<u32> {
        self.routes.get(prefix).copied()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Routes in the builders' order: by address, then by length (covering prefixes first).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (Prefix<A>, u32)> + '_ {
        self.routes.iter().map(|(p, v)| (*p, *v))
    }

    /// The routes as `(left-aligned bits, length, value)` in builder order.
    fn sorted_entries(&self) -> Vec<Entry> {
        self.routes.iter().map(|(p, v)| Entry { bits: p.addr.to_u128(), len: p.len, value: *v }).collect()
    }
}

impl<A: Address> FromIterator<(Prefix<A>, u32)> for RouteSet<A> {
    /// Collects routes, later duplicates replacing earlier ones. Values above [`MAX_VALUE`] are
    /// clamped to it, so that collecting never fails; use [`RouteSet::insert`] to be told instead.
    fn from_iter<I: IntoIterator<Item = (Prefix<A>, u32)>>(iter: I) -> Self {
        RouteSet { routes: iter.into_iter().map(|(p, v)| (p, v.min(MAX_VALUE))).collect() }
    }
}

/// A route flattened for the builders: the prefix bits left-aligned in a `u128`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    bits: u128,
    len: u8,
    value: u32,
}

impl Entry {
    /// `n` bits of the prefix starting at `offset` (past the address they read as zero).
    fn slot(&self, offset: u32, n: u32) -> usize {
        // offset + n <= 128 + 24 is possible at the last level of IPv6; pad with zeros by shifting
        // the out-of-range part away first.
        let shifted = if offset >= 128 { 0 } else { self.bits << offset };
        (shifted >> (128 - n)) as usize
    }
}

/// A compiled longest-prefix-match structure (hot path: lookups only).
pub trait Lpm<A: Address> {
    /// The value of the longest prefix containing `addr`, or `None` when no route matches.
    fn lookup(&self, addr: A) -> Option<u32>;

    /// Look up a batch: `out[i] = lookup(addrs[i])` for every `i` in both slices. Structures
    /// override it where independent lookups can overlap their memory accesses.
    fn lookup_batch(&self, addrs: &[A], out: &mut [Option<u32>]) {
        for (a, o) in addrs.iter().zip(out.iter_mut()) {
            *o = self.lookup(*a);
        }
    }

    /// Heap bytes the structure holds (its own allocations, not the route set it came from).
    fn heap_bytes(&self) -> usize;
}

/// Decode the 31-bit value encoding shared by the structures.
#[inline(always)]
fn decode(v: u32) -> Option<u32> {
    if v == NO_ROUTE { None } else { Some(v) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_checks_length_and_host_bits() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(Prefix::new(a, 33), Err(LpmError::LengthTooLong { len: 33, max: 32 }));
        let err = Prefix::new(a, 24).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("10.0.0.1/24 has bits set"), "{err}");
        let p = Prefix::containing(a, 24);
        assert_eq!(p.to_string(), "10.0.0.0/24");
        assert!(p.contains(Ipv4Addr::new(10, 0, 0, 255)) && !p.contains(Ipv4Addr::new(10, 0, 1, 0)));
        assert!(Prefix::containing(a, 0).contains(Ipv4Addr::new(255, 1, 2, 3)));
        let v6: Prefix<Ipv6Addr> = Prefix::containing("fd00::1".parse().expect("v6"), 200);
        assert_eq!(v6.prefix_len(), 128);
    }

    #[test]
    fn ipnet_conversion_refuses_host_bits() {
        let net: ipnet::Ipv4Net = "10.244.1.0/24".parse().expect("net");
        assert_eq!(Prefix::try_from(net).map(|p| p.to_string()), Ok("10.244.1.0/24".to_owned()));
        let bad: ipnet::Ipv6Net = "fd00::1/64".parse().expect("net");
        assert!(matches!(Prefix::try_from(bad), Err(LpmError::HostBitsSet { len: 64, .. })));
    }

    #[test]
    fn bits_at_reads_msb_first_and_pads() {
        let a = Ipv4Addr::new(0xab, 0xcd, 0xef, 0x12);
        assert_eq!(a.bits_at(0, 8), 0xab);
        assert_eq!(a.bits_at(4, 8), 0xbc);
        assert_eq!(a.bits_at(28, 6), 0x2 << 2);
        let b: Ipv6Addr = "8000::ff".parse().expect("v6");
        assert_eq!(b.bits_at(0, 1), 1);
        assert_eq!(b.bits_at(120, 6), 0x3f);
        assert_eq!(b.bits_at(126, 6), 0x30);
        let e = Entry { bits: b.to_u128(), len: 128, value: 0 };
        assert_eq!(e.slot(126, 6), 0x30);
        assert_eq!(e.slot(128, 6), 0);
    }

    #[test]
    fn route_set_refuses_reserved_values_and_sorts_covering_first() {
        let mut set = RouteSet::new();
        let p = Prefix::containing(Ipv4Addr::new(10, 0, 0, 0), 8);
        assert_eq!(set.insert(p, MAX_VALUE + 1), Err(LpmError::ValueTooLarge { value: MAX_VALUE + 1, max: MAX_VALUE }));
        assert!(set.is_empty());
        assert_eq!(set.insert(Prefix::containing(Ipv4Addr::new(10, 0, 0, 0), 24), 2), Ok(None));
        assert_eq!(set.insert(p, 1), Ok(None));
        assert_eq!(set.insert(p, 3), Ok(Some(1)));
        let order: Vec<_> = set.iter().map(|(p, v)| (p.to_string(), v)).collect();
        assert_eq!(order, [("10.0.0.0/8".to_owned(), 3), ("10.0.0.0/24".to_owned(), 2)]);
        assert_eq!(set.remove(&p), Some(3));
        assert_eq!(set.len(), 1);
    }
}
