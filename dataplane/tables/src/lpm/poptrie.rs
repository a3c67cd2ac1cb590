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
//! One addition to the paper: path compression. Where every route below a node shares the next
//! bits (IPv6 pod networks: all /64s inside one /48), the node records those bits (up to 30 of
//! them) and the lookup compares them in one step instead of walking a chain of single-child
//! nodes; an address that differs there gets the node's inherited default, stored as the leaf
//! just before the node's own leaves.
//!
//! The structure is immutable once built; a change means building a new one from the
//! [`RouteSet`] (1-10 ms at 100k routes; `cargo bench --bench lpm` prints build times), which
//! is what snapshot publication does anyway.

use std::marker::PhantomData;

use super::{Address, Entry, Lpm, LpmError, NO_ROUTE, RouteSet, decode};

/// Bits consumed per node: 64 slots, one `u64` bitmap.
const K: u32 = 6;

/// Addresses walked together by [`Lpm::lookup_batch`].
const LANES: usize = 32;

/// Node and leaf bytes above which batches are interleaved (about one core's L2 cache).
const INTERLEAVE_ABOVE: usize = 1 << 20;

/// Direct-array entry flag: the low 31 bits are a value, not a node index.
const LEAF: u32 = 1 << 31;

/// Most bits one node skips by path compression (five strides; fits `skip`).
const MAX_SKIP: u32 = 5 * K;

/// One trie node (32 bytes).
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
    /// The `skip_len` address bits every route below this node has before its stride.
    skip: u32,
    /// Bits to compare before the stride (0: none). With a skip, `leaves[base0 - 1]` is the
    /// value of addresses that differ from `skip`.
    skip_len: u32,
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
    /// Walk batches level by level ([`Poptrie::find_batch`]) rather than one address after the
    /// other. Measured (`benches/lpm.rs`): once nodes and leaves outgrow the L2 cache,
    /// overlapping the misses of 32 lookups wins (v4 random 1M: 14 ns against 17 ns per lookup,
    /// v6 random 1M: 79 against 120); below, the simple loop is about 1 ns faster.
    interleave: bool,
    family: PhantomData<fn() -> A>,
}

impl<A, const S: u32> std::fmt::Debug for Poptrie<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poptrie")
            .field("direct_bits", &S)
            .field("nodes", &self.nodes.len())
            .field("leaves", &self.leaves.len())
            .field("popcnt", &self.popcnt)
            .field("interleave", &self.interleave)
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
    /// Address width in bits.
    width: u32,
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
        let mut node = Node::default();
        // Path compression: while every route continues past the next stride and agrees on its
        // bits, those bits decide nothing but "inside or default". The last node must still
        // start inside the address.
        let entries = &self.entries[range.clone()];
        while node.skip_len + K <= MAX_SKIP && depth + node.skip_len + K < self.width {
            let at = depth + node.skip_len;
            let first = entries[0].slot(at, K);
            if !entries.iter().all(|e| u32::from(e.len) > at + K && e.slot(at, K) == first) {
                break;
            }
            // first < 64 and skip holds at most MAX_SKIP = 30 bits.
            node.skip = node.skip << K | first as u32;
            node.skip_len += K;
        }
        if node.skip_len > 0 {
            self.leaves.push(default);
        }
        let depth = depth + node.skip_len;
        let mut slots = [default; 64];
        let mut runs = Vec::new();
        Self::split(entries, range.start, depth, K, &mut slots, &mut runs);
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
        let mut b = Builder { entries: &entries, nodes: Vec::new(), leaves: Vec::new(), width: u32::from(A::BITS) };
        for (slot, run) in runs {
            let at = b.nodes.len();
            b.nodes.push(Node::default());
            b.nodes[at] = b.node(S, run, direct[slot] & !LEAF)?;
            direct[slot] = index(at, "poptrie nodes")?;
        }
        let interleave = size_of_val(&*b.nodes) + size_of_val(&*b.leaves) > INTERLEAVE_ABOVE;
        Ok(Poptrie {
            direct: direct.into_boxed_slice(),
            nodes: b.nodes.into_boxed_slice(),
            leaves: b.leaves.into_boxed_slice(),
            popcnt: has_popcnt(),
            interleave,
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
            if node.skip_len != 0 {
                if addr.bits_at(offset, node.skip_len) as u32 != node.skip {
                    return self.leaves[node.base0 as usize - 1];
                }
                offset += node.skip_len;
            }
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

    /// A batch, walked the way that measured faster for this trie's size.
    #[inline(always)]
    fn batch(&self, addrs: &[A], out: &mut [Option<u32>]) {
        if self.interleave {
            self.find_batch(addrs, out);
        } else {
            for (a, o) in addrs.iter().zip(out.iter_mut()) {
                *o = decode(self.find(*a));
            }
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
            let mut offset = [S; LANES];
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
            while n_live > 0 {
                let mut still = 0;
                for k in 0..n_live {
                    let i = usize::from(live[k]);
                    let n = &self.nodes[node[i] as usize];
                    let mut at = offset[i];
                    if n.skip_len != 0 {
                        if addrs[i].bits_at(at, n.skip_len) as u32 != n.skip {
                            out[i] = decode(self.leaves[n.base0 as usize - 1]);
                            continue;
                        }
                        at += n.skip_len;
                    }
                    let v = addrs[i].bits_at(at, K);
                    if n.vector & (1 << v) == 0 {
                        out[i] = decode(self.leaves[(n.base0 + (n.leafvec & upto(v)).count_ones() - 1) as usize]);
                    } else {
                        let child = n.base1 + (n.vector & upto(v)).count_ones() - 1;
                        prefetch(&self.nodes[child as usize]);
                        node[i] = child;
                        offset[i] = at + K;
                        live[still] = live[k];
                        still += 1;
                    }
                }
                n_live = still;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    fn batch_popcnt(&self, addrs: &[A], out: &mut [Option<u32>]) {
        self.batch(addrs, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    fn lookup_popcnt(&self, addr: A) -> Option<u32> {
        decode(self.find(addr))
    }

    /// Override how [`Lpm::lookup_batch`] walks, chosen by size at build time: `true` level by
    /// level across the batch, `false` one address after the other. For tests and measurements;
    /// the answers are the same either way.
    pub fn with_interleaved_batches(mut self, interleave: bool) -> Self {
        self.interleave = interleave;
        self
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
        self.batch(addrs, out);
    }

    fn heap_bytes(&self) -> usize {
        size_of_val(&*self.direct) + size_of_val(&*self.nodes) + size_of_val(&*self.leaves)
    }
}
