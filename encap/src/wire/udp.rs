//! UDP headers (RFC 768; wire format, hot path).
//!
//! ```text
//!  0      7 8     15 16    23 24    31
//! +--------+--------+--------+--------+
//! |   Source Port   | Destination Port|
//! +--------+--------+--------+--------+
//! |     Length      |    Checksum     |
//! +--------+--------+--------+--------+
//! ```

use super::ethernet::be16;
use crate::DropReason;

mod field {
    use core::ops::Range;
    pub(super) const SRC_PORT: Range<usize> = 0..2;
    pub(super) const DST_PORT: Range<usize> = 2..4;
    pub(super) const LENGTH: Range<usize> = 4..6;
    pub(super) const CHECKSUM: Range<usize> = 6..8;
}

/// Header length.
pub const HEADER_LEN: usize = 8;

/// A view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wrap a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }

    /// Wrap bytes from the wire (the IP payload): the length field must be at least 8 and at most the
    /// buffer. After this succeeds no accessor panics.
    ///
    /// # Errors
    /// [`DropReason::Truncated`] or [`DropReason::UdpBadLength`].
    pub fn new_checked(buffer: T) -> Result<Self, DropReason> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// See [`new_checked`](Self::new_checked).
    ///
    /// # Errors
    /// As [`new_checked`](Self::new_checked).
    pub fn check_len(&self) -> Result<(), DropReason> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(DropReason::Truncated);
        }
        let len = usize::from(self.len());
        if len < HEADER_LEN || len > b.len() {
            return Err(DropReason::UdpBadLength);
        }
        Ok(())
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::SRC_PORT])
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::DST_PORT])
    }

    /// Length field (header included).
    #[expect(clippy::len_without_is_empty, reason = "a UDP length field, not a collection")]
    pub fn len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::CHECKSUM])
    }

    /// The datagram, header included, to the length field.
    pub fn datagram(&self) -> &[u8] {
        &self.buffer.as_ref()[..usize::from(self.len())]
    }

    /// The payload after the header, to the length field.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Set the checksum field.
    pub fn set_checksum(&mut self, c: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
}

/// A parsed UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Length, header included.
    pub len: u16,
    /// Checksum field as found or to be written.
    pub checksum: u16,
}

impl UdpRepr {
    /// Read a checked datagram's header.
    pub fn parse<T: AsRef<[u8]>>(p: &UdpPacket<T>) -> Self {
        UdpRepr { src_port: p.src_port(), dst_port: p.dst_port(), len: p.len(), checksum: p.checksum() }
    }

    /// Write the header to the front of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    pub fn emit(&self, buf: &mut [u8]) {
        buf[field::SRC_PORT].copy_from_slice(&self.src_port.to_be_bytes());
        buf[field::DST_PORT].copy_from_slice(&self.dst_port.to_be_bytes());
        buf[field::LENGTH].copy_from_slice(&self.len.to_be_bytes());
        buf[field::CHECKSUM].copy_from_slice(&self.checksum.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: [u8; 12] = [0x30, 0x39, 0x12, 0xb5, 0x00, 0x0c, 0xab, 0xcd, 1, 2, 3, 4];

    #[test]
    fn deconstruct_construct() {
        let p = UdpPacket::new_checked(&FIXTURE[..]).expect("valid");
        assert_eq!((p.src_port(), p.dst_port(), p.len(), p.checksum()), (12345, 4789, 12, 0xabcd));
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        let mut out = [0u8; 8];
        UdpRepr::parse(&p).emit(&mut out);
        assert_eq!(out, FIXTURE[..8]);
    }

    #[test]
    fn bad_lengths() {
        assert_eq!(UdpPacket::new_checked(&FIXTURE[..7]).err(), Some(DropReason::Truncated));
        let mut b = FIXTURE;
        b[5] = 7;
        assert_eq!(UdpPacket::new_checked(&b[..]).err(), Some(DropReason::UdpBadLength));
        b[5] = 13;
        assert_eq!(UdpPacket::new_checked(&b[..]).err(), Some(DropReason::UdpBadLength));
    }
}
