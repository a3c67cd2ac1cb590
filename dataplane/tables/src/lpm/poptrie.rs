//! Poptrie (Asai and Ohara, SIGCOMM 2015): a multibit trie with population-count indexing.
//! Built on the control side, looked up on the hot path.
//!
//! The first `S` bits of an address index a flat "direct pointing" array. Below it, each node
//! consumes 6 bits: a 64-bit `vector` says which of its 64 slots lead to a child node, a 64-bit
//! `leafvec` marks where the run of equal leaf values changes, and a population count of either
//! bitmap, masked at the slot, gives the offset from the node's `base1` (children, stored
//! contiguously) or `base0` (leaves, stored contiguously and run-length compressed). A lookup is
//! one load in the direct array plus one node per further 6 bits of the longest matching prefix,
//! with no pointers: three `Vec`s and 32-bit indices.
//!
//! The structure is immutable once built; a change means building a new one from the
//! [`RouteSet`] (milliseconds at 100k routes, see the README), which is what snapshot publication
//! does anyway.

use std::marker::PhantomData;

use super::{Address, Entry, Lpm, LpmError, NO_ROUTE, RouteSet, decode};

/// Bits consumed per node: 64 slots, one `u64` bitmap.
const K: u32 = 6;

/// Addresses walked together by [`Lpm::lookup_batch`].
const LANES: usize = 32;

/// Direct-array entry flag: the low 31 bits are a value, not a node index.
const LEAF: u32 = 1 << 31;

/// One trie node (24 bytes).
#[derive(Debug, Clone, Copy, Default)]
struct Node {
    /// Bit `v` set: slot `v` continues in a child node.
    vector: u64,
    /// Bit `v` set: slot `v` is a leaf whose value differs from the previous leaf slot's.
    leafvec: u64,
    /// Index of this node's first leaf in `leaves`.
    base0: u32,
    /// Index of this node's first child in `nodes`.
    base1: u32,
}

/// A compiled poptrie over addresses `A`, with `S` bits of direct pointing (the default, 18,
/// is the paper's; 2^18 entries are 1 MiB).
#[derive(Clone)]
pub struct Poptrie<A, const S: u32 = 18> {
    direct: Box<[u32]>,
    nodes: Box<[Node]>,
    leaves: Box<[u32]>,
    /// The CPU has a population-count instruction (checked once when built); without it
    /// `count_ones` is a dozen shifts and adds.
    popcnt: bool,
    family: PhantomData<fn() -> A>,
}

impl<A, const S: u32> std::fmt::Debug for Poptrie<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poptrie")
            .field("direct_bits", &S)
            .field("nodes", &self.nodes.len())
            .field("leaves", &self.leaves.len())
            .field("popcnt", &self.popcnt)
            .finish()
    }
}

/// Mask of slots `0..=v`.
#[inline(always)]
fn upto(v: usize) -> u64 {
    u64::MAX >> (63 - v)
}

struct Builder<'a> {
    entries: &'a [Entry],
    nodes: Vec<Node>,
    leaves: Vec<u32>,
}

impl Builder<'_> {
    /// Split the routes of one block (all longer than `depth`, sorted by address then length)
    /// into `slots` values painted by the routes that end within the next `bits` bits, and runs
    /// of longer routes per slot (which become child nodes).
    ///
    /// Sorting puts a covering route before anything it covers, so painting in order leaves each
    /// slot with its longest match, and the longer routes of one slot are contiguous: a route that
    /// ends within the block and starts in a slot starts at that slot's first address, so it sorts
    /// before every longer route of that slot.
    fn split(
        entries: &[Entry],
        base: usize,
        depth: u32,
        bits: u32,
        slots: &mut [u32],
        runs: &mut Vec<(usize, std::ops::Range<usize>)>,
    ) {
        let end = depth + bits;
        let mut i = 0;
        while i < entries.len() {
            let e = entries[i];
            let slot = e.slot(depth, bits);
            if u32::from(e.len) <= end {
                let count = 1usize << (end - u32::from(e.len));
                slots[slot..slot + count].fill(e.value);
                i += 1;
            } else {
                let start = i;
                while i < entries.len() && entries[i].slot(depth, bits) == slot {
                    i += 1;
                }
                runs.push((slot, base + start..base + i));
            }
        }
    }

    /// Build the node for a block at `depth` whose routes are `self.entries[range]` and whose
    /// addresses default to `default` (the longest match above it).
    fn node(&mut self, depth: u32, range: std::ops::Range<usize>, default: u32) -> Result<Node, LpmError> {
        let mut slots = [default; 64];
        let mut runs = Vec::new();
        Self::split(&self.entries[range.clone()], range.start, depth, K, &mut slots, &mut runs);
        let mut node = Node::default();
        for (slot, _) in &runs {
            node.vector |= 1 << slot;
        }
        node.base0 = index(self.leaves.len(), "poptrie leaves")?;
        let mut previous = None;
        for (v, value) in slots.iter().enumerate() {
            if node.vector & (1 << v) == 0 && previous != Some(*value) {
                node.leafvec |= 1 << v;
                self.leaves.push(*value);
                previous = Some(*value);
            }
        }
        // Children are reserved before any grandchild is built so that they are contiguous.
        let base1 = self.nodes.len();
        node.base1 = index(base1, "poptrie nodes")?;
        self.nodes.resize(base1 + runs.len(), Node::default());
        for (k, (slot, run)) in runs.into_iter().enumerate() {
            self.nodes[base1 + k] = self.node(depth + K, run, slots[slot])?;
        }
        Ok(node)
    }
}

/// A vector position as a 31-bit index.
fn index(n: usize, what: &'static str) -> Result<u32, LpmError> {
    u32::try_from(n).ok().filter(|i| i & LEAF == 0).ok_or(LpmError::CapacityExceeded {
        what,
        needed: n,
        max: LEAF as usize,
    })
}

impl<A: Address, const S: u32> Poptrie<A, S> {
    /// Compile `set`.
    ///
    /// # Errors
    /// [`LpmError::CapacityExceeded`] if the trie would need more than 2^31 nodes or leaves.
    pub fn build(set: &RouteSet<A>) -> Result<Self, LpmError> {
        const { assert!(S >= 1 && S <= 24, "direct pointing takes 1 to 24 bits") };
        let entries = set.sorted_entries();
        let mut direct = vec![NO_ROUTE; 1 << S];
        let mut runs = Vec::new();
        Builder::split(&entries, 0, 0, S, &mut direct, &mut runs);
        // Everything `split` painted is a leaf; the slots with longer routes become nodes below.
        for d in &mut direct {
            *d |= LEAF;
        }
        let mut b = Builder { entries: &entries, nodes: Vec::new(), leaves: Vec::new() };
        for (slot, run) in runs {
            let at = b.nodes.len();
            b.nodes.push(Node::default());
            b.nodes[at] = b.node(S, run, direct[slot] & !LEAF)?;
            direct[slot] = index(at, "poptrie nodes")?;
        }
        Ok(Poptrie {
            direct: direct.into_boxed_slice(),
            nodes: b.nodes.into_boxed_slice(),
            leaves: b.leaves.into_boxed_slice(),
            popcnt: has_popcnt(),
            family: PhantomData,
        })
    }

    /// The raw (31-bit encoded) value for `addr`.
    #[inline(always)]
    fn find(&self, addr: A) -> u32 {
        let d = self.direct[addr.bits_at(0, S)];
        if d & LEAF != 0 {
            return d & !LEAF;
        }
        let mut node = &self.nodes[d as usize];
        let mut offset = S;
        loop {
            let v = addr.bits_at(offset, K);
            if node.vector & (1 << v) == 0 {
                let i = node.base0 + (node.leafvec & upto(v)).count_ones() - 1;
                return self.leaves[i as usize];
            }
            let i = node.base1 + (node.vector & upto(v)).count_ones() - 1;
            node = &self.nodes[i as usize];
            offset += K;
        }
    }

    /// Look up to [`LANES`] addresses at a time, one trie level at a time across the batch.
    ///
    /// A single lookup is a chain of dependent loads; past the caches each level waits for
    /// memory. Walking the batch level by level makes the loads of different addresses
    /// independent so that they overlap, and each lane prefetches its next node a whole pass
    /// before it reads it.
    #[inline(always)]
    fn find_batch(&self, addrs: &[A], out: &mut [Option<u32>]) {
        for (addrs, out) in addrs.chunks(LANES).zip(out.chunks_mut(LANES)) {
            let mut node = [0u32; LANES];
            // Lanes still descending, compacted after each pass.
            let mut live = [0u8; LANES];
            let mut n_live = 0;
            for (i, (a, o)) in addrs.iter().zip(out.iter_mut()).enumerate() {
                let d = self.direct[a.bits_at(0, S)];
                if d & LEAF != 0 {
                    *o = decode(d & !LEAF);
                } else {
                    node[i] = d;
                    prefetch(&self.nodes[d as usize]);
                    // i < LANES = 32.
                    live[n_live] = i as u8;
                    n_live += 1;
                }
            }
            let mut offset = S;
            while n_live > 0 {
                let mut still = 0;
                for k in 0..n_live {
                    let i = usize::from(live[k]);
                    let n = &self.nodes[node[i] as usize];
                    let v = addrs[i].bits_at(offset, K);
                    if n.vector & (1 << v) == 0 {
                        out[i] = decode(self.leaves[(n.base0 + (n.leafvec & upto(v)).count_ones() - 1) as usize]);
                    } else {
                        let child = n.base1 + (n.vector & upto(v)).count_ones() - 1;
                        prefetch(&self.nodes[child as usize]);
                        node[i] = child;
                        live[still] = live[k];
                        still += 1;
                    }
                }
                n_live = still;
                offset += K;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    fn batch_popcnt(&self, addrs: &[A], out: &mut [Option<u32>]) {
        self.find_batch(addrs, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    fn lookup_popcnt(&self, addr: A) -> Option<u32> {
        decode(self.find(addr))
    }

    /// Nodes in the trie (for memory reports).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// Ask the CPU to start loading `node`'s cache line; a hint, it never faults or changes anything.
#[inline(always)]
fn prefetch(node: &Node) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: prefetch is a hint that never faults, and the pointer comes from a reference.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(node).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = node;
}

fn has_popcnt() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("popcnt")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl<A: Address, const S: u32> Lpm<A> for Poptrie<A, S> {
    #[inline]
    fn lookup(&self, addr: A) -> Option<u32> {
        #[cfg(target_arch = "x86_64")]
        if self.popcnt {
            // SAFETY: `popcnt` is only true when the running CPU reported the feature.
            return unsafe { self.lookup_popcnt(addr) };
        }
        decode(self.find(addr))
    }

    fn lookup_batch(&self, addrs: &[A], out: &mut [Option<u32>]) {
        #[cfg(target_arch = "x86_64")]
        if self.popcnt {
            // SAFETY: `popcnt` is only true when the running CPU reported the feature.
            return unsafe { self.batch_popcnt(addrs, out) };
        }
        self.find_batch(addrs, out);
    }

    fn heap_bytes(&self) -> usize {
        size_of_val(&*self.direct) + size_of_val(&*self.nodes) + size_of_val(&*self.leaves)
    }
}
