//! Frames and packets in a worker's frame memory (hot path types, setup-time allocation).
//!
//! A worker owns one block of equal-sized frames: a UMEM for AF_XDP, or heap memory for the
//! in-memory port. A [`Pkt`] names a packet by frame, offset and length; it is `Copy` and eight
//! bytes, so batches move as small arrays of descriptors while the bytes stay put. Every frame is
//! in exactly one place at any time: the worker's [`FreeFrames`], a port's receive or transmit
//! path, or a batch being processed; [`FreeFrames`] counts what it holds so tests can prove that
//! nothing leaks.

use std::ops::Range;

/// Index of a frame in a worker's frame memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameId(pub u32);

/// A packet: `len` bytes at `offset` in frame `frame`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pkt {
    /// The frame holding the packet.
    pub frame: FrameId,
    /// Offset of the first packet byte within the frame.
    pub offset: u16,
    /// Packet length.
    pub len: u16,
}

const _: () = assert!(size_of::<Pkt>() == 8);

impl Pkt {
    /// The packet's byte range within its frame.
    pub fn range(&self) -> Range<usize> {
        usize::from(self.offset)..usize::from(self.offset) + usize::from(self.len)
    }
}

/// The memory behind a worker's frames.
pub trait FrameMem {
    /// Bytes per frame available to packets.
    fn frame_size(&self) -> usize;

    /// Number of frames.
    fn frame_count(&self) -> u32;

    /// A whole frame.
    ///
    /// # Panics
    /// If `id` is not below [`frame_count`](Self::frame_count).
    fn frame(&self, id: FrameId) -> &[u8];

    /// A whole frame, writable.
    ///
    /// # Panics
    /// If `id` is not below [`frame_count`](Self::frame_count).
    fn frame_mut(&mut self, id: FrameId) -> &mut [u8];

    /// A packet's bytes.
    fn bytes(&self, pkt: Pkt) -> &[u8] {
        &self.frame(pkt.frame)[pkt.range()]
    }
}

/// Frames in plain heap memory: the in-memory port's, and the benches'.
#[derive(Debug)]
pub struct HeapMem {
    bytes: Box<[u8]>,
    frame_size: usize,
}

impl HeapMem {
    /// `count` frames of `frame_size` bytes, zeroed.
    ///
    /// # Panics
    /// If `frame_size` exceeds 65535 (offsets and lengths are 16-bit) or the total overflows.
    pub fn new(count: u32, frame_size: usize) -> Self {
        assert!(frame_size <= usize::from(u16::MAX), "frame size {frame_size} exceeds 65535");
        let total = (count as usize).checked_mul(frame_size).expect("frame memory size overflows");
        HeapMem { bytes: vec![0u8; total].into_boxed_slice(), frame_size }
    }
}

impl FrameMem for HeapMem {
    fn frame_size(&self) -> usize {
        self.frame_size
    }

    fn frame_count(&self) -> u32 {
        (self.bytes.len() / self.frame_size) as u32
    }

    fn frame(&self, id: FrameId) -> &[u8] {
        let start = id.0 as usize * self.frame_size;
        &self.bytes[start..start + self.frame_size]
    }

    fn frame_mut(&mut self, id: FrameId) -> &mut [u8] {
        let start = id.0 as usize * self.frame_size;
        &mut self.bytes[start..start + self.frame_size]
    }
}

/// The worker's free frames: a stack sized once for every frame, so pushing never allocates, and
/// one bit per frame saying whether it is on the stack. A frame returned while already free (a
/// double free: two owners would share it) or outside the memory is refused and counted, in every
/// build, so that it can never be handed out twice.
#[derive(Debug)]
pub struct FreeFrames {
    stack: Vec<FrameId>,
    /// Bit `i % 64` of word `i / 64` is set while frame `i` is on `stack`.
    free: Box<[u64]>,
    /// Frames the memory has: valid ids are below it.
    count: u32,
    refused: u64,
}

impl FreeFrames {
    /// All `count` frames free.
    pub fn all(count: u32) -> Self {
        let mut f = FreeFrames::empty(count);
        for id in (0..count).rev() {
            f.push(FrameId(id));
        }
        f
    }

    /// No frame free yet, for a memory of `count` frames (frames are handed in later).
    pub fn empty(count: u32) -> Self {
        FreeFrames {
            stack: Vec::with_capacity(count as usize),
            free: vec![0; (count as usize).div_ceil(64)].into_boxed_slice(),
            count,
            refused: 0,
        }
    }

    /// Take a free frame.
    #[inline]
    pub fn pop(&mut self) -> Option<FrameId> {
        let id = self.stack.pop()?;
        self.free[id.0 as usize / 64] &= !(1 << (id.0 % 64));
        Some(id)
    }

    /// Return a frame. A frame that is free already, or not of this memory, is refused and counted
    /// under [`refused`](Self::refused): taking it would let two owners share one frame.
    #[inline]
    pub fn push(&mut self, id: FrameId) {
        let (word, bit) = (id.0 as usize / 64, 1u64 << (id.0 % 64));
        if id.0 >= self.count || self.free[word] & bit != 0 {
            self.refused += 1;
            return;
        }
        self.free[word] |= bit;
        self.stack.push(id);
    }

    /// Number of free frames.
    pub fn len(&self) -> usize {
        self.stack.len()
    }

    /// Whether none is free.
    pub fn is_empty(&self) -> bool {
        self.stack.is_empty()
    }

    /// Frames returned while already free or outside the memory, and refused: each one is a bug
    /// in whatever returned it (a port, the worker), caught before it could corrupt a packet.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_frames_are_disjoint() {
        let mut m = HeapMem::new(4, 2048);
        m.frame_mut(FrameId(1))[0] = 7;
        m.frame_mut(FrameId(2))[2047] = 9;
        assert_eq!(m.frame(FrameId(1))[0], 7);
        assert_eq!(m.frame(FrameId(0))[2047], 0);
        assert_eq!(m.frame(FrameId(2))[2047], 9);
        let p = Pkt { frame: FrameId(2), offset: 2040, len: 8 };
        assert_eq!(m.bytes(p)[7], 9);
    }

    #[test]
    fn free_list_pops_every_frame_once() {
        let mut f = FreeFrames::all(3);
        let mut got: Vec<_> = std::iter::from_fn(|| f.pop()).collect();
        got.sort();
        assert_eq!(got, vec![FrameId(0), FrameId(1), FrameId(2)]);
        assert!(f.is_empty());
    }

    /// Not a `debug_assert`: the check holds in release builds too (`cargo test --release`).
    #[test]
    fn a_double_free_is_refused_and_counted() {
        let mut f = FreeFrames::all(70);
        let a = f.pop().expect("frame");
        let b = f.pop().expect("frame");
        f.push(a);
        f.push(a);
        f.push(FrameId(69));
        f.push(FrameId(70));
        assert_eq!((f.len(), f.refused()), (69, 3), "two frees of free frames and one of a frame not in memory");
        let mut got: Vec<_> = std::iter::from_fn(|| f.pop()).collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 69, "every free frame comes out once");
        assert!(!got.contains(&b), "the frame still taken is not free");
        f.push(b);
        assert_eq!((f.pop(), f.refused()), (Some(b), 3), "a frame given back once is taken again");
    }
}
