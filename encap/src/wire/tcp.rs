//! The part of a TCP header the data plane reads: ports and the checksum (RFC 9293; wire format,
//! hot path).
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Source Port          |       Destination Port        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                        Sequence Number                        |
//! |                    Acknowledgment Number                      |
//! |  Data |       |C|E|U|A|P|R|S|F|                               |
//! | Offset| Rsrvd |W|C|R|C|S|S|Y|I|            Window             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           Checksum            |         Urgent Pointer        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::ethernet::be16;
use crate::DropReason;

/// Minimum header length.
pub const HEADER_LEN: usize = 20;
/// Offset of the checksum field.
pub const CHECKSUM_OFFSET: usize = 16;

/// A view of the fixed part of a TCP header.
#[derive(Debug, Clone)]
pub struct TcpPorts<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPorts<T> {
    /// Wrap a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        TcpPorts { buffer }
    }

    /// Wrap bytes from the wire: at least the fixed 20-byte header.
    ///
    /// # Errors
    /// [`DropReason::Truncated`].
    pub fn new_checked(buffer: T) -> Result<Self, DropReason> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(DropReason::Truncated);
        }
        Ok(TcpPorts { buffer })
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(&self.buffer.as_ref()[0..2])
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(&self.buffer.as_ref()[2..4])
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(&self.buffer.as_ref()[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_checksum() {
        let mut b = [0u8; 20];
        b[..4].copy_from_slice(&[0x1f, 0x90, 0x00, 0x50]);
        b[16..18].copy_from_slice(&[0xbe, 0xef]);
        let t = TcpPorts::new_checked(&b[..]).expect("valid");
        assert_eq!((t.src_port(), t.dst_port(), t.checksum()), (8080, 80, 0xbeef));
        assert_eq!(TcpPorts::new_checked(&b[..19]).err(), Some(DropReason::Truncated));
    }
}
