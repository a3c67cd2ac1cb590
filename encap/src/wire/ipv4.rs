//! IPv4 headers, options allowed (RFC 791; wire format, hot path).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version|  IHL  |   DSCP    |ECN|          Total Length         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Identification        |Flags|      Fragment Offset    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Time to Live |    Protocol   |         Header Checksum       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       Source Address                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Destination Address                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Options                    |    Padding    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use std::net::Ipv4Addr;

use super::ethernet::be16;
use crate::{DropReason, checksum};

mod field {
    use core::ops::Range;
    pub(super) const VER_IHL: usize = 0;
    pub(super) const TOS: usize = 1;
    pub(super) const LENGTH: Range<usize> = 2..4;
    pub(super) const IDENT: Range<usize> = 4..6;
    pub(super) const FLG_OFF: Range<usize> = 6..8;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: Range<usize> = 10..12;
    pub(super) const SRC: Range<usize> = 12..16;
    pub(super) const DST: Range<usize> = 16..20;
}

/// Header length without options.
pub const HEADER_LEN: usize = 20;

/// Don't-fragment flag in the flags/offset word.
const DF: u16 = 0x4000;
/// More-fragments flag in the flags/offset word.
const MF: u16 = 0x2000;

/// IP protocol numbers ferry cares about.
pub mod protocol {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// A view of an IPv4 packet.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wrap a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Wrap bytes from the wire: checks version, IHL and total length (not the checksum; see
    /// [`verify_checksum`](Self::verify_checksum)). After this succeeds no accessor panics.
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
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(DropReason::Ipv4BadVersion);
        }
        let ihl = self.header_len();
        if ihl < HEADER_LEN || ihl > b.len() {
            return Err(DropReason::Ipv4BadIhl);
        }
        let total = usize::from(self.total_len());
        if total < ihl || total > b.len() {
            return Err(DropReason::Ipv4BadTotalLength);
        }
        Ok(())
    }

    /// Whether the header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::of(&self.buffer.as_ref()[..self.header_len()]) == 0
    }

    /// Version field.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL * 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// The whole traffic-class byte (DSCP << 2 | ECN).
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[field::TOS]
    }

    /// Total length field.
    pub fn total_len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// Identification field.
    pub fn ident(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::IDENT])
    }

    /// Don't-fragment flag.
    pub fn dont_frag(&self) -> bool {
        be16(&self.buffer.as_ref()[field::FLG_OFF]) & DF != 0
    }

    /// Whether this is a fragment (more-fragments set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        be16(&self.buffer.as_ref()[field::FLG_OFF]) & (MF | 0x1fff) != 0
    }

    /// Whether this is a fragment other than the first (it carries no L4 header).
    pub fn is_later_fragment(&self) -> bool {
        be16(&self.buffer.as_ref()[field::FLG_OFF]) & 0x1fff != 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Protocol of the payload.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Header checksum field.
    pub fn checksum(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::CHECKSUM])
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        addr(&self.buffer.as_ref()[field::SRC])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        addr(&self.buffer.as_ref()[field::DST])
    }

    /// The payload, from the end of the header to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }

    /// The folded pseudo-header sum for this packet's L4 payload (see [`checksum::verifies`]).
    pub fn pseudo_header(&self) -> u32 {
        let l4_len = self.total_len().saturating_sub(self.header_len() as u16);
        checksum::pseudo_v4(self.src(), self.dst(), self.protocol(), l4_len)
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Set the traffic-class byte, updating the checksum incrementally.
    pub fn set_tos_incremental(&mut self, tos: u8) {
        let b = self.buffer.as_mut();
        let old = u16::from_be_bytes([b[field::VER_IHL], b[field::TOS]]);
        b[field::TOS] = tos;
        let new = u16::from_be_bytes([b[field::VER_IHL], b[field::TOS]]);
        patch_checksum(b, old, new);
    }

    /// Decrement the TTL by one, updating the checksum incrementally. The caller checks the TTL first.
    pub fn decrement_ttl(&mut self) {
        let b = self.buffer.as_mut();
        let old = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        b[field::TTL] = b[field::TTL].wrapping_sub(1);
        let new = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        patch_checksum(b, old, new);
    }

    /// Recompute the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        let ihl = self.header_len();
        let b = self.buffer.as_mut();
        b[field::CHECKSUM].fill(0);
        let c = checksum::of(&b[..ihl]);
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (h, t) = (self.header_len(), usize::from(self.total_len()));
        &mut self.buffer.as_mut()[h..t]
    }
}

fn patch_checksum(b: &mut [u8], old: u16, new: u16) {
    let c = checksum::update_word(be16(&b[field::CHECKSUM]), old, new);
    b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
}

fn addr(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// A parsed IPv4 header without options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Payload protocol.
    pub protocol: u8,
    /// DSCP << 2 | ECN.
    pub tos: u8,
    /// Time to live.
    pub ttl: u8,
    /// Don't-fragment flag.
    pub dont_frag: bool,
    /// Payload length (total length minus the header).
    pub payload_len: u16,
}

impl Ipv4Repr {
    /// Read a checked packet's header (options are skipped, not kept).
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv4Packet<T>) -> Self {
        Ipv4Repr {
            src: p.src(),
            dst: p.dst(),
            protocol: p.protocol(),
            tos: p.tos(),
            ttl: p.ttl(),
            dont_frag: p.dont_frag(),
            payload_len: p.total_len() - p.header_len() as u16,
        }
    }

    /// Write a 20-byte header with identification 0 and a valid checksum to the front of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`] or the total length overflows 16 bits.
    pub fn emit(&self, buf: &mut [u8]) {
        let total = u16::try_from(HEADER_LEN + usize::from(self.payload_len)).expect("IPv4 total length fits u16");
        let b = &mut buf[..HEADER_LEN];
        b[field::VER_IHL] = 0x45;
        b[field::TOS] = self.tos;
        b[field::LENGTH].copy_from_slice(&total.to_be_bytes());
        b[field::IDENT].fill(0);
        b[field::FLG_OFF].copy_from_slice(&(if self.dont_frag { DF } else { 0 }).to_be_bytes());
        b[field::TTL] = self.ttl;
        b[field::PROTOCOL] = self.protocol;
        b[field::SRC].copy_from_slice(&self.src.octets());
        b[field::DST].copy_from_slice(&self.dst.octets());
        Ipv4Packet::new_unchecked(b).fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 10.0.0.1 -> 10.0.1.2, UDP, TTL 64, DF, total 28, checksum computed by hand (and by tshark).
    const FIXTURE: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x25, 0xcf, 10, 0, 0, 1, 10, 0, 1, 2, //
        0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00,
    ];

    #[test]
    fn deconstruct() {
        let p = Ipv4Packet::new_checked(&FIXTURE[..]).expect("valid");
        assert!(p.verify_checksum());
        assert_eq!((p.version(), p.header_len(), p.total_len()), (4, 20, 28));
        assert_eq!((p.ttl(), p.protocol(), p.dont_frag(), p.is_fragment()), (64, 17, true, false));
        assert_eq!(p.src(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(p.dst(), Ipv4Addr::new(10, 0, 1, 2));
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn construct_matches_fixture() {
        let repr = Ipv4Repr::parse(&Ipv4Packet::new_checked(&FIXTURE[..]).expect("valid"));
        let mut out = [0u8; 20];
        repr.emit(&mut out);
        assert_eq!(out, FIXTURE[..20]);
    }

    #[test]
    fn validation_names_the_field() {
        let mut b = FIXTURE;
        b[0] = 0x65;
        assert_eq!(Ipv4Packet::new_checked(&b[..]).err(), Some(DropReason::Ipv4BadVersion));
        b[0] = 0x44;
        assert_eq!(Ipv4Packet::new_checked(&b[..]).err(), Some(DropReason::Ipv4BadIhl));
        b[0] = 0x48; // 32-byte header, 28-byte packet
        assert_eq!(Ipv4Packet::new_checked(&b[..]).err(), Some(DropReason::Ipv4BadIhl));
        b[0] = 0x45;
        b[3] = 29;
        assert_eq!(Ipv4Packet::new_checked(&b[..]).err(), Some(DropReason::Ipv4BadTotalLength));
        b[3] = 19;
        assert_eq!(Ipv4Packet::new_checked(&b[..]).err(), Some(DropReason::Ipv4BadTotalLength));
        assert_eq!(Ipv4Packet::new_checked(&b[..19]).err(), Some(DropReason::Truncated));
        let mut c = FIXTURE;
        c[11] ^= 1;
        assert!(!Ipv4Packet::new_checked(&c[..]).expect("structure ok").verify_checksum());
    }

    #[test]
    fn incremental_updates_keep_the_checksum_valid() {
        let mut b = FIXTURE;
        let mut p = Ipv4Packet::new_checked(&mut b[..]).expect("valid");
        p.set_tos_incremental(0xb9);
        p.decrement_ttl();
        assert!(p.verify_checksum());
        assert_eq!((p.tos(), p.ttl()), (0xb9, 63));
    }

    #[test]
    fn options_are_allowed() {
        let mut b = [0u8; 32];
        b[..20].copy_from_slice(&FIXTURE[..20]);
        b[0] = 0x46; // one option word
        b[2..4].copy_from_slice(&32u16.to_be_bytes());
        b[20..24].copy_from_slice(&[0x01, 0x01, 0x01, 0x00]); // NOP NOP NOP EOL
        let mut p = Ipv4Packet::new_checked(&mut b[..]).expect("valid");
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 8);
    }
}
