//! The virtio-net header a tap opened with `IFF_VNET_HDR` puts in front of every frame (virtio 1.x
//! `struct virtio_net_hdr_v1`, 12 bytes with `num_buffers`, little-endian; wire format, hot path).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+-------------------------------+
//! |     flags     |   gso_type    |        hdr_len (LE)           |
//! +---------------+---------------+-------------------------------+
//! |        gso_size (LE)          |       csum_start (LE)         |
//! +-------------------------------+-------------------------------+
//! |       csum_offset (LE)        |      num_buffers (LE)         |
//! +-------------------------------+-------------------------------+
//! ```
//!
//! A frame read from the tap with `gso_type` other than `NONE` is a super-packet of up to 64 KB that
//! the kernel wants cut into `gso_size`-byte segments (see [`crate::gso`]); `NEEDS_CSUM` says its L4
//! checksum field holds only the pseudo-header sum, to be completed over the bytes from
//! `csum_start`, and stored at `csum_start + csum_offset`. Written to the tap, the same header
//! tells the kernel that ferry coalesced segments into one packet (see [`crate::gro`]).
//!
//! The tap's header size is set with `TUNSETVNETHDRSZ`; ferry uses 12 (this layout). The longer
//! layouts (hash report, UDP tunnel GSO) start with these 12 bytes.
//!
//! Validation follows the kernel's `virtio_net_hdr_to_skb`: unknown GSO types, a GSO packet without
//! a segment size and checksum offsets outside the packet are refused. Each refusal is a
//! [`VnetError`], which maps to the [`DropReason`] the data plane counts.

use crate::DropReason;

/// Header length of the layout ferry uses (`struct virtio_net_hdr_v1`, `num_buffers` included).
pub const HEADER_LEN: usize = 12;

mod field {
    use core::ops::Range;
    pub(super) const FLAGS: usize = 0;
    pub(super) const GSO_TYPE: usize = 1;
    pub(super) const HDR_LEN: Range<usize> = 2..4;
    pub(super) const GSO_SIZE: Range<usize> = 4..6;
    pub(super) const CSUM_START: Range<usize> = 6..8;
    pub(super) const CSUM_OFFSET: Range<usize> = 8..10;
    pub(super) const NUM_BUFFERS: Range<usize> = 10..12;
}

/// `flags` bits (`VIRTIO_NET_HDR_F_*`).
pub mod flags {
    /// The L4 checksum is partial: complete it from `csum_start`, store it at `csum_offset`.
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum has been verified (receive direction: what ferry writes to a tap).
    pub const DATA_VALID: u8 = 2;
    /// The checksum fields carry coalescing information (`RSC_INFO`); ferry never accepts it.
    pub const RSC_INFO: u8 = 4;
}

/// `gso_type` values (`VIRTIO_NET_HDR_GSO_*`).
pub mod gso_type {
    /// Not a GSO packet.
    pub const NONE: u8 = 0;
    /// TCP over IPv4 (TSO).
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload (UFO), which ferry does not take: a tap offers it only on request.
    pub const UDP: u8 = 3;
    /// TCP over IPv6 (TSO).
    pub const TCPV6: u8 = 4;
    /// UDP segmentation offload (USO), IPv4 or IPv6.
    pub const UDP_L4: u8 = 5;
    /// Flag bit: the TCP packet carries CWR (its segmentation keeps CWR on the first segment only).
    pub const ECN: u8 = 0x80;
}

/// The kind of segmentation a packet asks for (the `gso_type` without its ECN bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gso {
    /// A single packet.
    None,
    /// TCP over IPv4, cut into `gso_size`-byte TCP payloads.
    TcpV4,
    /// TCP over IPv6.
    TcpV6,
    /// UDP (IPv4 or IPv6), cut into `gso_size`-byte datagrams.
    UdpL4,
}

impl Gso {
    /// The `gso_type` byte (without the ECN bit).
    pub const fn code(self) -> u8 {
        match self {
            Gso::None => gso_type::NONE,
            Gso::TcpV4 => gso_type::TCPV4,
            Gso::TcpV6 => gso_type::TCPV6,
            Gso::UdpL4 => gso_type::UDP_L4,
        }
    }
}

/// Why a virtio-net header was refused. Each maps to a [`DropReason`] with `From`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("virtio-net header truncated")]
    Truncated,
    /// Flag bits other than `NEEDS_CSUM` and `DATA_VALID`.
    #[error("virtio-net flags {flags:#04x} include unknown bits")]
    UnknownFlags {
        /// The flags byte.
        flags: u8,
    },
    /// A GSO type ferry does not segment (UFO, unknown values, or `NONE` with the ECN bit).
    #[error("virtio-net gso_type {gso_type:#04x} is not one ferry segments")]
    UnknownGsoType {
        /// The `gso_type` byte.
        gso_type: u8,
    },
    /// A GSO packet with `gso_size` zero.
    #[error("virtio-net GSO packet with gso_size 0")]
    ZeroGsoSize,
    /// A GSO packet without `NEEDS_CSUM`: its checksum cannot be recomputed per segment.
    #[error("virtio-net GSO packet without NEEDS_CSUM")]
    GsoWithoutChecksum,
    /// `csum_start + csum_offset + 2` beyond the frame, or (GSO) not the L4 header's checksum field.
    #[error("virtio-net csum_start {start} / csum_offset {offset} do not point at the L4 checksum")]
    BadChecksumOffsets {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
    },
}

impl From<VnetError> for DropReason {
    fn from(e: VnetError) -> Self {
        match e {
            VnetError::Truncated => DropReason::Truncated,
            VnetError::UnknownFlags { .. }
            | VnetError::UnknownGsoType { .. }
            | VnetError::ZeroGsoSize
            | VnetError::GsoWithoutChecksum => DropReason::VnetBadHeader,
            VnetError::BadChecksumOffsets { .. } => DropReason::VnetBadChecksumOffset,
        }
    }
}

/// A parsed virtio-net header (`Repr` in smoltcp's sense: parse from bytes, emit to bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VirtioNetHdr {
    /// `NEEDS_CSUM`: the L4 checksum is partial.
    pub needs_csum: bool,
    /// `DATA_VALID`: the checksum is known good.
    pub data_valid: bool,
    /// Segmentation requested.
    pub gso: Gso,
    /// The ECN bit of `gso_type` (TCP with CWR).
    pub ecn: bool,
    /// Length of the headers (Ethernet + IP + L4), a hint.
    pub hdr_len: u16,
    /// Payload bytes per segment (TCP MSS or UDP datagram payload).
    pub gso_size: u16,
    /// Where checksumming starts, from the start of the frame.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
    /// `num_buffers` (mergeable receive buffers; 0 or 1 on a tap).
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// A header for a plain packet: no flags, no GSO.
    pub const NONE: VirtioNetHdr = VirtioNetHdr {
        needs_csum: false,
        data_valid: false,
        gso: Gso::None,
        ecn: false,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
        num_buffers: 0,
    };

    /// Parse the first [`HEADER_LEN`] bytes of `b`, checking what can be checked without the
    /// frame: flags, GSO type, a non-zero `gso_size`, `NEEDS_CSUM` on GSO packets. See
    /// [`check_frame`](Self::check_frame) for the checks against the frame.
    ///
    /// # Errors
    /// The [`VnetError`] of the first field at fault.
    pub fn parse(b: &[u8]) -> Result<Self, VnetError> {
        let Some(b) = b.get(..HEADER_LEN) else { return Err(VnetError::Truncated) };
        let le = |r: core::ops::Range<usize>| u16::from_le_bytes([b[r.start], b[r.start + 1]]);
        let fl = b[field::FLAGS];
        if fl & !(flags::NEEDS_CSUM | flags::DATA_VALID) != 0 {
            return Err(VnetError::UnknownFlags { flags: fl });
        }
        let raw = b[field::GSO_TYPE];
        let gso = match raw & !gso_type::ECN {
            gso_type::NONE if raw == gso_type::NONE => Gso::None,
            gso_type::TCPV4 => Gso::TcpV4,
            gso_type::TCPV6 => Gso::TcpV6,
            gso_type::UDP_L4 => Gso::UdpL4,
            _ => return Err(VnetError::UnknownGsoType { gso_type: raw }),
        };
        let h = VirtioNetHdr {
            needs_csum: fl & flags::NEEDS_CSUM != 0,
            data_valid: fl & flags::DATA_VALID != 0,
            gso,
            ecn: raw & gso_type::ECN != 0,
            hdr_len: le(field::HDR_LEN),
            gso_size: le(field::GSO_SIZE),
            csum_start: le(field::CSUM_START),
            csum_offset: le(field::CSUM_OFFSET),
            num_buffers: le(field::NUM_BUFFERS),
        };
        if gso != Gso::None {
            if h.gso_size == 0 {
                return Err(VnetError::ZeroGsoSize);
            }
            if !h.needs_csum {
                return Err(VnetError::GsoWithoutChecksum);
            }
        }
        Ok(h)
    }

    /// Check the checksum offsets against the frame that follows the header: with `NEEDS_CSUM`,
    /// the two checksum bytes at `csum_start + csum_offset` lie within `frame_len`.
    ///
    /// # Errors
    /// [`VnetError::BadChecksumOffsets`].
    pub fn check_frame(&self, frame_len: usize) -> Result<(), VnetError> {
        if self.needs_csum {
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(VnetError::BadChecksumOffsets { start: self.csum_start, offset: self.csum_offset });
            }
        }
        Ok(())
    }

    /// The `flags` byte.
    pub const fn flags(&self) -> u8 {
        (if self.needs_csum { flags::NEEDS_CSUM } else { 0 }) | (if self.data_valid { flags::DATA_VALID } else { 0 })
    }

    /// The `gso_type` byte, ECN bit included.
    pub const fn gso_type(&self) -> u8 {
        self.gso.code() | if self.ecn { gso_type::ECN } else { 0 }
    }

    /// Write the header into the first [`HEADER_LEN`] bytes of `buf`.
    ///
    /// # Panics
    /// When `buf` is shorter than [`HEADER_LEN`] (a buffer the caller sized).
    pub fn emit(&self, buf: &mut [u8]) {
        let b = &mut buf[..HEADER_LEN];
        b[field::FLAGS] = self.flags();
        b[field::GSO_TYPE] = self.gso_type();
        b[field::HDR_LEN].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[field::GSO_SIZE].copy_from_slice(&self.gso_size.to_le_bytes());
        b[field::CSUM_START].copy_from_slice(&self.csum_start.to_le_bytes());
        b[field::CSUM_OFFSET].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[field::NUM_BUFFERS].copy_from_slice(&self.num_buffers.to_le_bytes());
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.emit(&mut b);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a Linux 6.x tap hands over for a 64 KB IPv4 TSO packet (headers 14 + 20 + 32).
    const TSO4: [u8; 12] = [0x01, 0x01, 66, 0, 0x76, 0x05, 34, 0, 16, 0, 0, 0];

    #[test]
    fn parses_a_tso_header_and_emits_it_back() {
        let h = VirtioNetHdr::parse(&TSO4).expect("valid");
        assert_eq!(
            h,
            VirtioNetHdr {
                needs_csum: true,
                data_valid: false,
                gso: Gso::TcpV4,
                ecn: false,
                hdr_len: 66,
                gso_size: 1398,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            }
        );
        assert_eq!(h.to_bytes(), TSO4);
        assert_eq!(h.check_frame(52), Ok(()));
        assert_eq!(h.check_frame(51), Err(VnetError::BadChecksumOffsets { start: 34, offset: 16 }));
        let mut ecn = TSO4;
        ecn[1] = gso_type::TCPV6 | gso_type::ECN;
        let h = VirtioNetHdr::parse(&ecn).expect("valid");
        assert_eq!((h.gso, h.ecn, h.gso_type()), (Gso::TcpV6, true, 0x84));
    }

    #[test]
    fn refusals_are_typed_and_counted() {
        let cases: [(usize, u8, VnetError, DropReason); 5] = [
            (0, 0x04, VnetError::UnknownFlags { flags: 0x05 }, DropReason::VnetBadHeader),
            (1, gso_type::UDP, VnetError::UnknownGsoType { gso_type: 3 }, DropReason::VnetBadHeader),
            (1, gso_type::ECN, VnetError::UnknownGsoType { gso_type: 0x80 }, DropReason::VnetBadHeader),
            (4, 0, VnetError::ZeroGsoSize, DropReason::VnetBadHeader),
            (0, 0, VnetError::GsoWithoutChecksum, DropReason::VnetBadHeader),
        ];
        for (at, value, err, reason) in cases {
            let mut b = TSO4;
            if at == 4 {
                b[4..6].fill(0);
            } else if at == 0 {
                b[0] |= value;
                b[0] &= if value == 0 { 0 } else { 0xff };
            } else {
                b[at] = value;
            }
            assert_eq!(VirtioNetHdr::parse(&b), Err(err), "byte {at} = {value:#x}");
            assert_eq!(DropReason::from(err), reason);
        }
        assert_eq!(VirtioNetHdr::parse(&TSO4[..11]), Err(VnetError::Truncated));
        assert_eq!(DropReason::from(VnetError::Truncated), DropReason::Truncated);
        // A plain packet needs none of the GSO fields.
        let plain = VirtioNetHdr::parse(&[0; 12]).expect("valid");
        assert_eq!(plain, VirtioNetHdr::NONE);
        assert_eq!(plain.check_frame(0), Ok(()));
    }
}
