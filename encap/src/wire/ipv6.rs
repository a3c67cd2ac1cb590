//! IPv6 headers and the walk over extension headers to the upper layer (RFC 8200; wire format, hot path).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version| Traffic Class |           Flow Label                  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Payload Length        |  Next Header  |   Hop Limit   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     Source Address (16)                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                  Destination Address (16)                     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Extension headers are walked by etherparse's `Ipv6ExtensionsSlice`; the common case of a packet
//! without them never reaches it.

use std::net::Ipv6Addr;

use etherparse::{IpNumber, Ipv6ExtensionsSlice};

use super::ethernet::be16;
use crate::{DropReason, checksum};

mod field {
    use core::ops::Range;
    pub(super) const VER_TC_FLOW: Range<usize> = 0..4;
    pub(super) const LENGTH: Range<usize> = 4..6;
    pub(super) const NXT_HDR: usize = 6;
    pub(super) const HOP_LIMIT: usize = 7;
    pub(super) const SRC: Range<usize> = 8..24;
    pub(super) const DST: Range<usize> = 24..40;
}

/// Fixed header length.
pub const HEADER_LEN: usize = 40;

/// Where the upper-layer header of an IPv6 packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperLayer {
    /// The upper-layer protocol (the last next-header value).
    pub protocol: u8,
    /// Offset of the upper-layer header from the start of the IPv6 header.
    pub offset: usize,
    /// Whether a fragment header splits the payload; ports are then not reliable.
    pub fragmented: bool,
}

/// A view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wrap a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv6Packet { buffer }
    }

    /// Wrap bytes from the wire: checks version and payload length. After this succeeds no accessor
    /// panics.
    ///
    /// # Errors
    /// The [`DropReason`] naming the first field at fault.
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
        if b[0] >> 4 != 6 {
            return Err(DropReason::Ipv6BadVersion);
        }
        // A zero payload length means a jumbogram (RFC 2675), which ferry does not carry.
        let len = usize::from(self.payload_len());
        if HEADER_LEN + len > b.len() || (len == 0 && self.next_header() == 0) {
            return Err(DropReason::Ipv6BadPayloadLength);
        }
        Ok(())
    }

    /// Version field.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 4
    }

    /// Traffic class (DSCP << 2 | ECN).
    pub fn traffic_class(&self) -> u8 {
        let w = self.word0();
        ((w >> 20) & 0xff) as u8
    }

    /// Flow label.
    pub fn flow_label(&self) -> u32 {
        self.word0() & 0x000f_ffff
    }

    fn word0(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VER_TC_FLOW];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Payload length.
    pub fn payload_len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// First next-header value.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::SRC])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::DST])
    }

    /// The payload after the fixed header (extension headers included), to the payload length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }

    /// Find the upper-layer header, skipping extension headers.
    ///
    /// # Errors
    /// [`DropReason::Ipv6BadExtension`] when the chain runs past the payload or is malformed.
    pub fn upper_layer(&self) -> Result<UpperLayer, DropReason> {
        let nh = self.next_header();
        if !is_extension(nh) {
            return Ok(UpperLayer { protocol: nh, offset: HEADER_LEN, fragmented: false });
        }
        let payload = self.payload();
        let (exts, last, rest) =
            Ipv6ExtensionsSlice::from_slice(IpNumber(nh), payload).map_err(|_| DropReason::Ipv6BadExtension)?;
        Ok(UpperLayer {
            protocol: last.0,
            offset: HEADER_LEN + (payload.len() - rest.len()),
            fragmented: exts.is_fragmenting_payload(),
        })
    }

    /// The folded pseudo-header sum for an upper-layer payload of `l4_len` bytes with protocol
    /// `next_header` (see [`checksum::verifies`]).
    pub fn pseudo_header(&self, next_header: u8, l4_len: u32) -> u32 {
        checksum::pseudo_v6(self.src(), self.dst(), next_header, l4_len)
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Set the traffic class (IPv6 has no header checksum).
    pub fn set_traffic_class(&mut self, tc: u8) {
        let w = (self.word0() & 0xf00f_ffff) | (u32::from(tc) << 20);
        self.buffer.as_mut()[field::VER_TC_FLOW].copy_from_slice(&w.to_be_bytes());
    }

    /// Decrement the hop limit by one. The caller checks it first.
    pub fn decrement_hop_limit(&mut self) {
        let b = self.buffer.as_mut();
        b[field::HOP_LIMIT] = b[field::HOP_LIMIT].wrapping_sub(1);
    }
}

/// Whether `nh` is an extension header that etherparse's walker understands and skips.
const fn is_extension(nh: u8) -> bool {
    // Hop-by-hop, routing, fragment, ESP is not skippable, AH, destination options, mobility, HIP, shim6.
    matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ipv6Addr::from(a)
}

/// A parsed fixed IPv6 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Repr {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// First next header.
    pub next_header: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
    /// Hop limit.
    pub hop_limit: u8,
    /// Payload length.
    pub payload_len: u16,
}

impl Ipv6Repr {
    /// Read a checked packet's fixed header.
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv6Packet<T>) -> Self {
        Ipv6Repr {
            src: p.src(),
            dst: p.dst(),
            next_header: p.next_header(),
            traffic_class: p.traffic_class(),
            flow_label: p.flow_label(),
            hop_limit: p.hop_limit(),
            payload_len: p.payload_len(),
        }
    }

    /// Write the 40-byte header to the front of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    pub fn emit(&self, buf: &mut [u8]) {
        let w = (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0x000f_ffff);
        buf[field::VER_TC_FLOW].copy_from_slice(&w.to_be_bytes());
        buf[field::LENGTH].copy_from_slice(&self.payload_len.to_be_bytes());
        buf[field::NXT_HDR] = self.next_header;
        buf[field::HOP_LIMIT] = self.hop_limit;
        buf[field::SRC].copy_from_slice(&self.src.octets());
        buf[field::DST].copy_from_slice(&self.dst.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Vec<u8> {
        let mut b = vec![
            0x6b, 0x81, 0x23, 0x45, // v6, TC 0xb8, flow 0x12345
            0x00, 0x10, 0x00, 0x40, // payload 16, hop-by-hop, hop limit 64
        ];
        b.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("addr").octets());
        b.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().expect("addr").octets());
        // Hop-by-hop: next UDP, length 0 (8 bytes), PadN of 4 after a Pad1... simply PadN(4).
        b.extend_from_slice(&[17, 0, 0x01, 0x04, 0, 0, 0, 0]);
        // UDP header.
        b.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00]);
        b
    }

    #[test]
    fn deconstruct_with_extension_header() {
        let b = fixture();
        let p = Ipv6Packet::new_checked(&b[..]).expect("valid");
        assert_eq!((p.version(), p.traffic_class(), p.flow_label()), (6, 0xb8, 0x12345));
        assert_eq!((p.payload_len(), p.next_header(), p.hop_limit()), (16, 0, 64));
        assert_eq!(p.dst(), "fd00::2".parse::<Ipv6Addr>().expect("addr"));
        let ul = p.upper_layer().expect("walkable");
        assert_eq!(ul, UpperLayer { protocol: 17, offset: 48, fragmented: false });
    }

    #[test]
    fn construct_matches_fixture() {
        let b = fixture();
        let repr = Ipv6Repr::parse(&Ipv6Packet::new_checked(&b[..]).expect("valid"));
        let mut out = [0u8; 40];
        repr.emit(&mut out);
        assert_eq!(out[..], b[..40]);
    }

    #[test]
    fn validation_names_the_field() {
        let mut b = fixture();
        assert_eq!(Ipv6Packet::new_checked(&b[..39]).err(), Some(DropReason::Truncated));
        b[0] = 0x4b;
        assert_eq!(Ipv6Packet::new_checked(&b[..]).err(), Some(DropReason::Ipv6BadVersion));
        b[0] = 0x6b;
        b[5] = 17;
        assert_eq!(Ipv6Packet::new_checked(&b[..]).err(), Some(DropReason::Ipv6BadPayloadLength));
        b[5] = 16;
        b[41] = 9; // hop-by-hop claims 80 bytes
        let p = Ipv6Packet::new_checked(&b[..]).expect("fixed header ok");
        assert_eq!(p.upper_layer().err(), Some(DropReason::Ipv6BadExtension));
    }

    #[test]
    fn traffic_class_and_hop_limit_setters() {
        let mut b = fixture();
        let mut p = Ipv6Packet::new_checked(&mut b[..]).expect("valid");
        p.set_traffic_class(0x03);
        p.decrement_hop_limit();
        assert_eq!((p.traffic_class(), p.flow_label(), p.hop_limit()), (0x03, 0x12345, 63));
    }
}
