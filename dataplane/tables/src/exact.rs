//! Exact-match address set (built on the control side, queried on the hot path): "is this outer
//! source a known node?" for every decapsulated packet.
//!
//! Open addressing with linear probing in a power-of-two array at most half full, hashed by one
//! multiplication: a hit or a miss costs one or two cache lines, where `std`'s SipHash `HashSet`
//! spends longer hashing a 16-byte address than this spends altogether.

use std::net::IpAddr;

/// An immutable set of addresses.
#[derive(Debug, Clone)]
pub(crate) struct AddrSet {
    slots: Box<[Option<IpAddr>]>,
    /// log2 of the slot count.
    bits: u32,
    len: usize,
}

#[inline]
fn hash(addr: IpAddr) -> u64 {
    let folded = match addr {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let b = u128::from(a);
            // Fold both halves; the low half alone is the interface identifier, often sequential.
            (b as u64) ^ ((b >> 64) as u64).rotate_left(29) ^ 0x9e6c_63d0_676a_9a99
        }
    };
    // Fibonacci hashing: the top bits of the product are well mixed.
    folded.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl AddrSet {
    /// The set of `addrs` (duplicates allowed).
    pub(crate) fn new(addrs: impl ExactSizeIterator<Item = IpAddr>) -> Self {
        let capacity = (addrs.len() * 2).next_power_of_two().max(2);
        let bits = capacity.trailing_zeros();
        let mut set = AddrSet { slots: vec![None; capacity].into_boxed_slice(), bits, len: 0 };
        for a in addrs {
            let mut i = set.home(a);
            loop {
                match set.slots[i] {
                    Some(existing) if existing == a => break,
                    Some(_) => i = (i + 1) & (capacity - 1),
                    None => {
                        set.slots[i] = Some(a);
                        set.len += 1;
                        break;
                    }
                }
            }
        }
        set
    }

    #[inline]
    fn home(&self, addr: IpAddr) -> usize {
        // bits >= 1, so the shift is below 64.
        (hash(addr) >> (64 - self.bits)) as usize
    }

    /// Whether `addr` is in the set. Terminates: the array is never more than half full.
    #[inline]
    pub(crate) fn contains(&self, addr: IpAddr) -> bool {
        let mask = self.slots.len() - 1;
        let mut i = self.home(addr);
        loop {
            match self.slots[i] {
                Some(a) if a == addr => return true,
                Some(_) => i = (i + 1) & mask,
                None => return false,
            }
        }
    }

    /// Number of distinct addresses.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        size_of_val(&*self.slots)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn matches_a_hash_set(
            members in prop::collection::vec(any::<IpAddr>(), 0..200),
            probes in prop::collection::vec(any::<IpAddr>(), 0..50),
        ) {
            let set = AddrSet::new(members.iter().copied());
            let reference: HashSet<IpAddr> = members.iter().copied().collect();
            prop_assert_eq!(set.len(), reference.len());
            for a in members.iter().chain(&probes) {
                prop_assert_eq!(set.contains(*a), reference.contains(a), "{}", a);
            }
        }
    }

    #[test]
    fn sequential_addresses_and_the_empty_set() {
        let set = AddrSet::new((0..5000u32).map(|i| IpAddr::from([192, 168, (i >> 8) as u8, i as u8])));
        assert_eq!(set.len(), 5000);
        assert!(set.contains("192.168.19.135".parse().expect("ip")));
        assert!(!set.contains("192.168.19.136".parse().expect("ip")));
        assert!(!set.contains("::".parse().expect("ip")));
        let empty = AddrSet::new(std::iter::empty());
        assert!(!empty.contains("192.168.0.0".parse().expect("ip")));
    }
}
