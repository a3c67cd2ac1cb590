//! Geneve headers and option TLVs (RFC 8926 section 3; wire format, hot path).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Ver|  Opt Len  |O|C|    Rsvd.  |          Protocol Type        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |        Virtual Network Identifier (VNI)       |    Reserved   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! ~                    Variable-Length Options                    ~
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//!
//! Option TLV:
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Option Class         |      Type     |R|R|R| Length  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ~                  Variable-Length Option Data                  ~
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Opt Len and each option's Length count 4-byte words. The high bit of an option's Type is the
//! critical bit: a receiver that does not understand a critical option must drop the packet.

use bytemuck::{Pod, Zeroable};

use super::ethernet::{be16, ethertype};
use crate::DropReason;

/// Fixed header length.
pub const HEADER_LEN: usize = 8;
/// IANA-assigned Geneve port.
pub const DEFAULT_PORT: u16 = 6081;
/// Largest total option length (Opt Len is 6 bits of 4-byte words).
pub const MAX_OPTIONS_LEN: usize = 63 * 4;
/// Critical bit in an option's type.
pub const OPTION_CRITICAL: u8 = 0x80;

const FLAG_O: u8 = 0x80;
const FLAG_C: u8 = 0x40;

/// The fixed header as laid out on the wire.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct GeneveHeader {
    /// Version (2 bits) and option length in words (6 bits).
    pub ver_optlen: u8,
    /// O, C and reserved bits.
    pub flags: u8,
    /// Protocol type of the payload, big-endian.
    pub protocol: [u8; 2],
    /// 24-bit VNI, big-endian.
    pub vni: [u8; 3],
    /// Reserved, zero on send.
    pub reserved: u8,
}

const _: () = assert!(size_of::<GeneveHeader>() == HEADER_LEN);

impl GeneveHeader {
    /// A version-0 header carrying Ethernet, with `options_len` bytes of options (a multiple of 4,
    /// at most [`MAX_OPTIONS_LEN`]) and the C bit when any of them is critical.
    pub const fn new(vni: u32, options_len: usize, critical: bool) -> Self {
        let v = vni.to_be_bytes();
        let p = ethertype::TEB.to_be_bytes();
        GeneveHeader {
            ver_optlen: ((options_len / 4) as u8) & 0x3f,
            flags: if critical { FLAG_C } else { 0 },
            protocol: p,
            vni: [v[1], v[2], v[3]],
            reserved: 0,
        }
    }
}

/// A view of a Geneve header, its options and payload.
#[derive(Debug, Clone)]
pub struct GenevePacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> GenevePacket<T> {
    /// Wrap a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        GenevePacket { buffer }
    }

    /// Wrap bytes from the wire: the fixed header and the announced options must fit. After this
    /// succeeds no accessor panics.
    ///
    /// # Errors
    /// [`DropReason::Truncated`] or [`DropReason::GeneveBadOptions`].
    pub fn new_checked(buffer: T) -> Result<Self, DropReason> {
        let p = Self::new_unchecked(buffer);
        let len = p.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(DropReason::Truncated);
        }
        if HEADER_LEN + p.options_len() > len {
            return Err(DropReason::GeneveBadOptions);
        }
        Ok(p)
    }

    fn header(&self) -> &GeneveHeader {
        bytemuck::from_bytes(&self.buffer.as_ref()[..HEADER_LEN])
    }

    /// Version (must be 0).
    pub fn version(&self) -> u8 {
        self.header().ver_optlen >> 6
    }

    /// Total option length in bytes.
    pub fn options_len(&self) -> usize {
        usize::from(self.header().ver_optlen & 0x3f) * 4
    }

    /// O bit: a control message whose payload must not be forwarded.
    pub fn oam(&self) -> bool {
        self.header().flags & FLAG_O != 0
    }

    /// C bit: at least one option is critical.
    pub fn critical(&self) -> bool {
        self.header().flags & FLAG_C != 0
    }

    /// Payload protocol type.
    pub fn protocol(&self) -> u16 {
        be16(&self.header().protocol)
    }

    /// The 24-bit VNI.
    pub fn vni(&self) -> u32 {
        let [a, b, c] = self.header().vni;
        u32::from_be_bytes([0, a, b, c])
    }

    /// The option bytes.
    pub fn options_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + self.options_len()]
    }

    /// An iterator over the option TLVs. It yields `Err` once, and then stops, at a TLV that runs past
    /// the option area.
    pub fn options(&self) -> GeneveOptions<'_> {
        GeneveOptions { rest: self.options_bytes() }
    }

    /// Header plus options length: the offset of the payload.
    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.options_len()
    }

    /// The encapsulated frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

/// One option TLV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneveOption<'a> {
    /// Option class.
    pub class: u16,
    /// Option type, critical bit included.
    pub kind: u8,
    /// Option data (a multiple of 4 bytes).
    pub data: &'a [u8],
}

impl GeneveOption<'_> {
    /// Whether the critical bit is set.
    pub const fn is_critical(&self) -> bool {
        self.kind & OPTION_CRITICAL != 0
    }

    /// Encoded length: 4-byte TLV header plus data.
    pub const fn wire_len(&self) -> usize {
        4 + self.data.len()
    }

    /// Write the TLV to the front of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`wire_len`](Self::wire_len), or the data is not a multiple of 4
    /// bytes or longer than 124 bytes.
    pub fn emit(&self, buf: &mut [u8]) {
        assert!(self.data.len().is_multiple_of(4) && self.data.len() <= 31 * 4, "Geneve option data length");
        buf[0..2].copy_from_slice(&self.class.to_be_bytes());
        buf[2] = self.kind;
        buf[3] = (self.data.len() / 4) as u8;
        buf[4..self.wire_len()].copy_from_slice(self.data);
    }
}

/// Iterator over Geneve option TLVs.
#[derive(Debug, Clone)]
pub struct GeneveOptions<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for GeneveOptions<'a> {
    type Item = Result<GeneveOption<'a>, DropReason>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < 4 {
            self.rest = &[];
            return Some(Err(DropReason::GeneveBadOptions));
        }
        let data_len = usize::from(self.rest[3] & 0x1f) * 4;
        if 4 + data_len > self.rest.len() {
            self.rest = &[];
            return Some(Err(DropReason::GeneveBadOptions));
        }
        let opt = GeneveOption { class: be16(&self.rest[0..2]), kind: self.rest[2], data: &self.rest[4..4 + data_len] };
        self.rest = &self.rest[4 + data_len..];
        Some(Ok(opt))
    }
}

/// A parsed Geneve header (options are read through [`GenevePacket::options`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneveRepr {
    /// The VNI.
    pub vni: u32,
    /// Payload protocol type.
    pub protocol: u16,
    /// Option length in bytes.
    pub options_len: usize,
    /// O bit.
    pub oam: bool,
    /// C bit.
    pub critical: bool,
}

impl GeneveRepr {
    /// Read a checked header.
    ///
    /// # Errors
    /// [`DropReason::GeneveBadVersion`] for a version other than 0.
    pub fn parse<T: AsRef<[u8]>>(p: &GenevePacket<T>) -> Result<Self, DropReason> {
        if p.version() != 0 {
            return Err(DropReason::GeneveBadVersion);
        }
        Ok(GeneveRepr {
            vni: p.vni(),
            protocol: p.protocol(),
            options_len: p.options_len(),
            oam: p.oam(),
            critical: p.critical(),
        })
    }

    /// Write the fixed header (not the options) to the front of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    pub fn emit(&self, buf: &mut [u8]) {
        let mut h = GeneveHeader::new(self.vni, self.options_len, self.critical);
        h.protocol = self.protocol.to_be_bytes();
        if self.oam {
            h.flags |= FLAG_O;
        }
        buf[..HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&h));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Version 0, 3 words of options, C set, protocol 0x6558, VNI 0x00abcd, then one critical option of
    // class 0x0102 type 0x80|0x05 with 8 bytes of data.
    const FIXTURE: [u8; 20] = [
        0x03, 0x40, 0x65, 0x58, 0x00, 0xab, 0xcd, 0x00, //
        0x01, 0x02, 0x85, 0x02, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    #[test]
    fn deconstruct() {
        let p = GenevePacket::new_checked(&FIXTURE[..]).expect("valid");
        let r = GeneveRepr::parse(&p).expect("version 0");
        assert_eq!(r, GeneveRepr { vni: 0xabcd, protocol: 0x6558, options_len: 12, oam: false, critical: true });
        let opts: Vec<_> = p.options().collect();
        assert_eq!(opts, vec![Ok(GeneveOption { class: 0x0102, kind: 0x85, data: &[1, 2, 3, 4, 5, 6, 7, 8] })]);
        assert!(opts[0].as_ref().is_ok_and(|o| o.is_critical()));
        assert!(p.payload().is_empty());
    }

    #[test]
    fn construct_matches_fixture() {
        let p = GenevePacket::new_checked(&FIXTURE[..]).expect("valid");
        let mut out = [0u8; 20];
        GeneveRepr::parse(&p).expect("version 0").emit(&mut out);
        GeneveOption { class: 0x0102, kind: 0x85, data: &[1, 2, 3, 4, 5, 6, 7, 8] }.emit(&mut out[8..]);
        assert_eq!(out, FIXTURE);
    }

    #[test]
    fn malformed_options() {
        assert_eq!(GenevePacket::new_checked(&FIXTURE[..19]).err(), Some(DropReason::GeneveBadOptions));
        let mut b = FIXTURE;
        b[11] = 3; // option claims 12 data bytes, only 8 remain
        let p = GenevePacket::new_checked(&b[..]).expect("header fits");
        assert_eq!(p.options().collect::<Vec<_>>(), vec![Err(DropReason::GeneveBadOptions)]);
        let mut v = FIXTURE;
        v[0] |= 0x40;
        assert_eq!(
            GeneveRepr::parse(&GenevePacket::new_checked(&v[..]).expect("fits")),
            Err(DropReason::GeneveBadVersion)
        );
    }
}
