//! A frame inside a buffer that keeps headroom in front of it (hot path).
//!
//! AF_XDP frames and the in-memory ports hand the worker one fixed-size buffer per packet with the
//! packet starting some way in. Encapsulation grows the packet into that headroom
//! ([`FrameBuf::push_front`]); decapsulation shrinks it from the front ([`FrameBuf::pull_front`]).
//! Nothing is copied except the new headers.

/// A packet at `buf[start..end]`, with `buf[..start]` free as headroom.
#[derive(Debug)]
pub struct FrameBuf<'a> {
    buf: &'a mut [u8],
    start: usize,
    end: usize,
}

impl<'a> FrameBuf<'a> {
    /// Wrap `len` bytes at `start` within `buf`.
    ///
    /// Returns `None` when `start + len` is beyond the buffer.
    pub fn new(buf: &'a mut [u8], start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= buf.len()).then_some(FrameBuf { buf, start, end })
    }

    /// Offset of the first packet byte within the buffer.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Bytes free in front of the packet.
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Packet length.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the packet is empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The packet bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The packet bytes, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// Grow the packet by `n` bytes at the front and return the whole (grown) packet.
    ///
    /// Returns `None`, leaving the packet unchanged, when the headroom is smaller than `n`.
    pub fn push_front(&mut self, n: usize) -> Option<&mut [u8]> {
        self.start = self.start.checked_sub(n)?;
        Some(&mut self.buf[self.start..self.end])
    }

    /// Drop `n` bytes from the front of the packet (they become headroom).
    ///
    /// Returns `None`, leaving the packet unchanged, when the packet is shorter than `n`.
    pub fn pull_front(&mut self, n: usize) -> Option<()> {
        if n > self.len() {
            return None;
        }
        self.start += n;
        Some(())
    }

    /// Make sure at least `n` bytes of headroom exist, moving the packet toward the end of the
    /// buffer if it starts too early (ports that deliver packets at offset 0 need this before
    /// encapsulation). Returns `None`, leaving the packet unchanged, when the buffer is too short.
    pub fn make_headroom(&mut self, n: usize) -> Option<()> {
        if self.start >= n {
            return Some(());
        }
        let shift = n - self.start;
        let new_end = self.end.checked_add(shift).filter(|e| *e <= self.buf.len())?;
        self.buf.copy_within(self.start..self.end, n);
        self.start = n;
        self.end = new_end;
        Some(())
    }

    /// Set the packet length to `len`, growing into the buffer's tail if needed (bytes exposed by
    /// growing keep whatever they held). Returns `None`, leaving the packet unchanged, when the
    /// buffer is too short.
    pub fn set_len(&mut self, len: usize) -> Option<()> {
        let end = self.start.checked_add(len).filter(|e| *e <= self.buf.len())?;
        self.end = end;
        Some(())
    }

    /// Shorten the packet to `len` bytes (no-op when it is already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.end = self.end.min(self.start + len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_and_pull_stay_within_the_buffer() {
        let mut raw = [0u8; 32];
        assert!(FrameBuf::new(&mut raw, 30, 3).is_none());
        let mut f = FrameBuf::new(&mut raw, 10, 4).expect("fits");
        f.data_mut().copy_from_slice(b"abcd");
        assert!(f.push_front(11).is_none());
        assert_eq!(f.start(), 10);
        f.push_front(2).expect("room").copy_from_slice(b"XYabcd");
        assert_eq!(f.data(), b"XYabcd");
        assert!(f.pull_front(7).is_none());
        f.pull_front(2).expect("long enough");
        assert_eq!(f.data(), b"abcd");
        f.truncate(2);
        assert_eq!(f.data(), b"ab");
    }

    #[test]
    fn make_headroom_moves_the_packet_back_when_needed() {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(b"abcd");
        let mut f = FrameBuf::new(&mut raw, 0, 4).expect("fits");
        assert!(f.make_headroom(13).is_none(), "13 + 4 > 16");
        f.make_headroom(10).expect("room");
        assert_eq!((f.start(), f.data()), (10, &b"abcd"[..]));
        f.make_headroom(4).expect("already enough");
        assert_eq!(f.start(), 10);
        assert!(f.set_len(7).is_none());
        f.set_len(6).expect("fits");
        assert_eq!(f.len(), 6);
    }
}
