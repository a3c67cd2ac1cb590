//! VXLAN headers (RFC 7348 section 5; wire format, hot path).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! On receive only the I flag and the VNI are read; reserved bits are ignored. On send every reserved
//! bit is zero.

use bytemuck::{Pod, Zeroable};

use crate::DropReason;

/// Header length.
pub const HEADER_LEN: usize = 8;
/// IANA-assigned VXLAN port.
pub const DEFAULT_PORT: u16 = 4789;
/// The "valid VNI" flag.
pub const FLAG_I: u8 = 0x08;

/// The header as laid out on the wire; every field is a byte array, so it casts from any alignment.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct VxlanHeader {
    /// Flags; only I (0x08) is defined.
    pub flags: u8,
    /// Reserved, zero on send.
    pub reserved0: [u8; 3],
    /// 24-bit VNI, big-endian.
    pub vni: [u8; 3],
    /// Reserved, zero on send.
    pub reserved1: u8,
}

const _: () = assert!(size_of::<VxlanHeader>() == HEADER_LEN);

impl VxlanHeader {
    /// A header for `vni` with only the I flag set. The VNI is masked to 24 bits.
    pub const fn new(vni: u32) -> Self {
        let v = vni.to_be_bytes();
        VxlanHeader { flags: FLAG_I, reserved0: [0; 3], vni: [v[1], v[2], v[3]], reserved1: 0 }
    }
}

/// A view of a VXLAN header and its payload.
#[derive(Debug, Clone)]
pub struct VxlanPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    /// Wrap a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        VxlanPacket { buffer }
    }

    /// Wrap bytes from the wire: the 8-byte header must fit.
    ///
    /// # Errors
    /// [`DropReason::Truncated`].
    pub fn new_checked(buffer: T) -> Result<Self, DropReason> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(DropReason::Truncated);
        }
        Ok(VxlanPacket { buffer })
    }

    fn header(&self) -> &VxlanHeader {
        bytemuck::from_bytes(&self.buffer.as_ref()[..HEADER_LEN])
    }

    /// Flags byte.
    pub fn flags(&self) -> u8 {
        self.header().flags
    }

    /// Whether the I flag is set.
    pub fn has_vni(&self) -> bool {
        self.flags() & FLAG_I != 0
    }

    /// The 24-bit VNI.
    pub fn vni(&self) -> u32 {
        let [a, b, c] = self.header().vni;
        u32::from_be_bytes([0, a, b, c])
    }

    /// The encapsulated frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanPacket<T> {
    /// Set the VNI (masked to 24 bits), leaving the flags alone.
    pub fn set_vni(&mut self, vni: u32) {
        let h: &mut VxlanHeader = bytemuck::from_bytes_mut(&mut self.buffer.as_mut()[..HEADER_LEN]);
        h.vni = VxlanHeader::new(vni).vni;
    }
}

/// A parsed VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanRepr {
    /// The VNI.
    pub vni: u32,
}

impl VxlanRepr {
    /// Read a checked header.
    ///
    /// # Errors
    /// [`DropReason::VxlanNoIFlag`] when the I flag is clear.
    pub fn parse<T: AsRef<[u8]>>(p: &VxlanPacket<T>) -> Result<Self, DropReason> {
        if !p.has_vni() {
            return Err(DropReason::VxlanNoIFlag);
        }
        Ok(VxlanRepr { vni: p.vni() })
    }

    /// Write the header to the front of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    pub fn emit(&self, buf: &mut [u8]) {
        buf[..HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&VxlanHeader::new(self.vni)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // VNI 0x123456 with the I flag: the RFC 7348 layout.
    const FIXTURE: [u8; 8] = [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0];

    #[test]
    fn deconstruct_construct() {
        let p = VxlanPacket::new_checked(&FIXTURE[..]).expect("valid");
        assert!(p.has_vni());
        assert_eq!(p.vni(), 0x12_3456);
        let repr = VxlanRepr::parse(&p).expect("I flag");
        let mut out = [0xffu8; 8];
        repr.emit(&mut out);
        assert_eq!(out, FIXTURE);
    }

    #[test]
    fn reserved_bits_ignored_on_receive() {
        let noisy = [0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x01, 0xff];
        let p = VxlanPacket::new_checked(&noisy[..]).expect("valid");
        assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr { vni: 1 }));
    }

    #[test]
    fn missing_i_flag_and_truncation() {
        let mut b = FIXTURE;
        b[0] = 0;
        assert_eq!(VxlanRepr::parse(&VxlanPacket::new_checked(&b[..]).expect("len ok")), Err(DropReason::VxlanNoIFlag));
        assert_eq!(VxlanPacket::new_checked(&b[..7]).err(), Some(DropReason::Truncated));
    }

    #[test]
    fn set_vni_masks_to_24_bits() {
        let mut b = FIXTURE;
        VxlanPacket::new_unchecked(&mut b[..]).set_vni(0xff00_0001);
        assert_eq!(VxlanPacket::new_unchecked(&b[..]).vni(), 1);
        assert_eq!(b[0], FLAG_I);
    }
}
