//! A read-only open-addressing hash table for the policy verdict's fixed-size keys (hot path
//! reads; built on the control side). Built once, never changed: published tables are
//! immutable, so no deletion, no tombstones, no resizing.
//!
//! - Linear probing over one flat array of `(key, value)` slots, at most half full, so a lookup
//!   usually reads one slot (the addresses of a pod network are near-sequential, and the
//!   multiplicative hash spreads them evenly).
//! - The key `K::VACANT` (0: the unspecified address, identity 0, which the compiler never hands
//!   out) marks an empty slot; a real entry with that key is kept beside the array.
//! - The hash is one multiplication (Fibonacci hashing, the top bits): `std`'s SipHash and the
//!   `Hash` trait's byte-by-byte feeding of an `IpAddr` cost more than the rest of the lookup.

/// A key the table can hold: a plain integer.
pub trait FlatKey: Copy + Eq {
    /// The key an empty slot holds.
    const VACANT: Self;
    /// A 64-bit hash whose top bits are well mixed.
    fn hash(self) -> u64;
}

const PHI: u64 = 0x9e37_79b9_7f4a_7c15;

impl FlatKey for u32 {
    const VACANT: Self = 0;
    #[inline]
    fn hash(self) -> u64 {
        u64::from(self).wrapping_mul(PHI)
    }
}

impl FlatKey for u128 {
    const VACANT: Self = 0;
    #[inline]
    fn hash(self) -> u64 {
        let folded = (self as u64) ^ ((self >> 64) as u64).rotate_left(29);
        folded.wrapping_mul(PHI)
    }
}

/// The table. See the module doc.
#[derive(Debug, Clone)]
pub struct FlatMap<K, V> {
    slots: Box<[(K, V)]>,
    /// `64 - log2(slots.len())`: the hash's top bits pick the first slot.
    shift: u32,
    /// The entry whose key is `K::VACANT`, if any.
    vacant_key: Option<V>,
    len: usize,
}

impl<K: FlatKey, V: Copy + Default> Default for FlatMap<K, V> {
    fn default() -> Self {
        Self::from_entries(std::iter::empty())
    }
}

impl<K: FlatKey, V: Copy + Default> FlatMap<K, V> {
    /// A table of these entries; a key given twice keeps its last value.
    pub fn from_entries(entries: impl IntoIterator<Item = (K, V)>) -> Self {
        let entries: Vec<(K, V)> = entries.into_iter().collect();
        // At most half full, at least 2 slots (so one is always empty: lookups end).
        let cap = (entries.len() * 2).next_power_of_two().max(2);
        let mut slots = vec![(K::VACANT, V::default()); cap].into_boxed_slice();
        let shift = 64 - cap.trailing_zeros();
        let mask = cap - 1;
        let (mut len, mut vacant_key) = (0, None);
        for (k, v) in entries {
            if k == K::VACANT {
                len += usize::from(vacant_key.is_none());
                vacant_key = Some(v);
                continue;
            }
            let mut i = (k.hash() >> shift) as usize;
            loop {
                let slot = &mut slots[i];
                if slot.0 == K::VACANT {
                    *slot = (k, v);
                    len += 1;
                    break;
                }
                if slot.0 == k {
                    slot.1 = v;
                    break;
                }
                i = (i + 1) & mask;
            }
        }
        FlatMap { slots, shift, vacant_key, len }
    }

    /// The value of `k`.
    #[inline]
    pub fn get(&self, k: K) -> Option<V> {
        if k == K::VACANT {
            return self.vacant_key;
        }
        let mask = self.slots.len() - 1;
        let mut i = (k.hash() >> self.shift) as usize;
        loop {
            // `i` is masked, so always in bounds; at least one slot is vacant, so the loop ends.
            let (key, v) = self.slots[i & mask];
            if key == k {
                return Some(v);
            }
            if key == K::VACANT {
                return None;
            }
            i += 1;
        }
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (K, V)> + '_ {
        self.vacant_key
            .map(|v| (K::VACANT, v))
            .into_iter()
            .chain(self.slots.iter().copied().filter(|(k, _)| *k != K::VACANT))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn holds_what_it_was_given_and_nothing_else() {
        let mut want = HashMap::new();
        let mut x: u32 = 12345;
        for i in 0..5000u32 {
            // Sequential keys (a pod network) and scattered ones.
            let k = if i % 2 == 0 { 0x0af4_0000 + i } else { x };
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            want.insert(k, i);
        }
        want.insert(0, 7);
        let m = FlatMap::from_entries(want.iter().map(|(k, v)| (*k, *v)));
        assert_eq!(m.len(), want.len());
        for (k, v) in &want {
            assert_eq!(m.get(*k), Some(*v), "{k}");
        }
        for k in [1u32, 0x0af4_0001, u32::MAX] {
            assert_eq!(m.get(k), want.get(&k).copied());
        }
        let mut got: Vec<(u32, u32)> = m.iter().collect();
        got.sort_unstable();
        let mut all: Vec<(u32, u32)> = want.into_iter().collect();
        all.sort_unstable();
        assert_eq!(got, all);
    }

    #[test]
    fn empty_wide_and_duplicate_keys() {
        let m: FlatMap<u128, u32> = FlatMap::default();
        assert!(m.is_empty() && m.get(5).is_none() && m.get(0).is_none());
        let m = FlatMap::from_entries([(1u128 << 100, 1u32), (1, 2), (1, 3), (u128::MAX, 4)]);
        assert_eq!(
            (m.len(), m.get(1), m.get(1 << 100), m.get(u128::MAX), m.get(2)),
            (3, Some(3), Some(1), Some(4), None)
        );
    }
}
