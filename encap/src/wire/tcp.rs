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
/// Offset of the sequence number.
pub const SEQ_OFFSET: usize = 4;
/// Offset of the acknowledgment number.
pub const ACK_OFFSET: usize = 8;
/// Offset of the byte holding the data offset (high nibble).
pub const DATA_OFFSET_OFFSET: usize = 12;
/// Offset of the flags byte (CWR ... FIN).
pub const FLAGS_OFFSET: usize = 13;
/// Longest header (data offset 15).
pub const MAX_HEADER_LEN: usize = 60;

/// Bits of the flags byte at [`FLAGS_OFFSET`].
pub mod flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
    /// The urgent pointer is significant.
    pub const URG: u8 = 0x20;
    /// ECN-Echo (RFC 3168).
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced (RFC 3168).
    pub const CWR: u8 = 0x80;
}

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
