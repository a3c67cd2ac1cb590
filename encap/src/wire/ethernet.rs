//! Ethernet II frames, tolerating one 802.1Q tag (wire format, hot path).
//!
//! ```text
//!  0                   1                   2                   3
//! +-----------------------------------------------+
//! |            destination MAC (6)                |
//! +-----------------------------------------------+
//! |              source MAC (6)                   |
//! +-----------------------+-----------------------+
//! | TPID 0x8100 (2)       | TCI (2)               |   optional 802.1Q tag
//! +-----------------------+-----------------------+
//! | EtherType (2)         | payload ...
//! +-----------------------+
//! ```

use core::fmt;
use core::str::FromStr;

use crate::DropReason;

/// EtherType values ferry cares about.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// IEEE 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// IEEE 802.1ad service tag (QinQ outer tag).
    pub const QINQ: u16 = 0x88a8;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// Transparent Ethernet bridging: the Geneve protocol type for an Ethernet payload.
    pub const TEB: u16 = 0x6558;
}

mod field {
    use core::ops::Range;
    pub(super) const DST: Range<usize> = 0..6;
    pub(super) const SRC: Range<usize> = 6..12;
    pub(super) const TYPE: Range<usize> = 12..14;
    pub(super) const TAG_TCI: Range<usize> = 14..16;
    pub(super) const TAGGED_TYPE: Range<usize> = 16..18;
}

/// Untagged header length.
pub const HEADER_LEN: usize = 14;
/// Length of one 802.1Q tag.
pub const VLAN_TAG_LEN: usize = 4;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether the group bit is set (multicast or broadcast).
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Whether this is a usable unicast source address (not multicast, not all zero).
    pub fn is_unicast(self) -> bool {
        !self.is_multicast() && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error from parsing a MAC address string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets like 02:00:00:00:00:01")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// A view of an Ethernet frame.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wrap a buffer without checking it. Accessors may panic on a short buffer until
    /// [`check_len`](Self::check_len) has succeeded.
    pub const fn new_unchecked(buffer: T) -> Self {
        EthernetFrame { buffer }
    }

    /// Wrap bytes from the wire: after this succeeds no accessor panics.
    ///
    /// # Errors
    /// [`DropReason::Truncated`] for a short frame, [`DropReason::VlanStacked`] for a second tag.
    pub fn new_checked(buffer: T) -> Result<Self, DropReason> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    /// Check that the header, with its tag if any, fits and that there is at most one tag.
    ///
    /// # Errors
    /// As [`new_checked`](Self::new_checked).
    pub fn check_len(&self) -> Result<(), DropReason> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(DropReason::Truncated);
        }
        if is_tag(be16(&b[field::TYPE])) {
            if b.len() < HEADER_LEN + VLAN_TAG_LEN {
                return Err(DropReason::Truncated);
            }
            if is_tag(be16(&b[field::TAGGED_TYPE])) {
                return Err(DropReason::VlanStacked);
            }
        }
        Ok(())
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        MacAddr(arr6(&self.buffer.as_ref()[field::DST]))
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        MacAddr(arr6(&self.buffer.as_ref()[field::SRC]))
    }

    /// The VLAN ID when the frame carries an 802.1Q tag.
    pub fn vlan(&self) -> Option<u16> {
        let b = self.buffer.as_ref();
        is_tag(be16(&b[field::TYPE])).then(|| be16(&b[field::TAG_TCI]) & 0x0fff)
    }

    /// The EtherType of the payload (after the tag, if any).
    pub fn ethertype(&self) -> u16 {
        let b = self.buffer.as_ref();
        let t = be16(&b[field::TYPE]);
        if is_tag(t) { be16(&b[field::TAGGED_TYPE]) } else { t }
    }

    /// Length of the header, tag included.
    pub fn header_len(&self) -> usize {
        if self.vlan().is_some() { HEADER_LEN + VLAN_TAG_LEN } else { HEADER_LEN }
    }

    /// The payload after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Set the destination MAC.
    pub fn set_dst(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&mac.0);
    }

    /// Set the source MAC.
    pub fn set_src(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&mac.0);
    }

    /// Set the outermost EtherType field (the tag's TPID on a tagged frame).
    pub fn set_ethertype(&mut self, ethertype: u16) {
        self.buffer.as_mut()[field::TYPE].copy_from_slice(&ethertype.to_be_bytes());
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        &mut self.buffer.as_mut()[h..]
    }
}

/// A parsed untagged Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetRepr {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// VLAN ID, if tagged.
    pub vlan: Option<u16>,
    /// Payload EtherType.
    pub ethertype: u16,
}

impl EthernetRepr {
    /// Read the header of a checked frame.
    pub fn parse<T: AsRef<[u8]>>(frame: &EthernetFrame<T>) -> Self {
        EthernetRepr { dst: frame.dst(), src: frame.src(), vlan: frame.vlan(), ethertype: frame.ethertype() }
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub const fn header_len(&self) -> usize {
        if self.vlan.is_some() { HEADER_LEN + VLAN_TAG_LEN } else { HEADER_LEN }
    }

    /// Write the header to the front of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`header_len`](Self::header_len).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[field::DST].copy_from_slice(&self.dst.0);
        buf[field::SRC].copy_from_slice(&self.src.0);
        match self.vlan {
            Some(id) => {
                buf[field::TYPE].copy_from_slice(&ethertype::VLAN.to_be_bytes());
                buf[field::TAG_TCI].copy_from_slice(&(id & 0x0fff).to_be_bytes());
                buf[field::TAGGED_TYPE].copy_from_slice(&self.ethertype.to_be_bytes());
            }
            None => buf[field::TYPE].copy_from_slice(&self.ethertype.to_be_bytes()),
        }
    }
}

const fn is_tag(t: u16) -> bool {
    t == ethertype::VLAN || t == ethertype::QINQ
}

#[inline]
pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

#[inline]
fn arr6(b: &[u8]) -> [u8; 6] {
    let mut a = [0; 6];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNTAGGED: [u8; 16] = [
        0x02, 0, 0, 0, 0, 0x02, // dst
        0x02, 0, 0, 0, 0, 0x01, // src
        0x08, 0x00, // IPv4
        0x45, 0x00,
    ];
    const TAGGED: [u8; 20] = [
        0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x81, 0x00, 0x20, 0x64, // VLAN 100, PCP 1
        0x86, 0xdd, 0x60, 0x00,
    ];

    #[test]
    fn deconstruct_untagged() {
        let f = EthernetFrame::new_checked(&UNTAGGED[..]).expect("valid");
        assert_eq!(f.dst().to_string(), "02:00:00:00:00:02");
        assert_eq!(f.src(), "02:00:00:00:00:01".parse().expect("mac"));
        assert_eq!(f.ethertype(), ethertype::IPV4);
        assert_eq!(f.vlan(), None);
        assert_eq!(f.payload(), &[0x45, 0x00]);
    }

    #[test]
    fn deconstruct_tagged() {
        let f = EthernetFrame::new_checked(&TAGGED[..]).expect("valid");
        assert_eq!(f.vlan(), Some(100));
        assert_eq!(f.ethertype(), ethertype::IPV6);
        assert_eq!(f.header_len(), 18);
    }

    #[test]
    fn rejects_short_and_double_tagged() {
        assert_eq!(EthernetFrame::new_checked(&UNTAGGED[..13]).err(), Some(DropReason::Truncated));
        assert_eq!(EthernetFrame::new_checked(&TAGGED[..17]).err(), Some(DropReason::Truncated));
        let mut qinq = TAGGED;
        qinq[16..18].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(EthernetFrame::new_checked(&qinq[..]).err(), Some(DropReason::VlanStacked));
    }

    #[test]
    fn construct_and_emit_round_trip() {
        let repr = EthernetRepr::parse(&EthernetFrame::new_checked(&UNTAGGED[..]).expect("valid"));
        let mut out = [0u8; 14];
        repr.emit(&mut out);
        assert_eq!(out, UNTAGGED[..14]);
        let mut tagged = [0u8; 18];
        let repr = EthernetRepr { vlan: Some(100), ethertype: ethertype::IPV6, ..repr };
        repr.emit(&mut tagged);
        assert_eq!(&tagged[..14], &TAGGED[..14]);
        assert_eq!(be16(&tagged[14..16]) & 0x0fff, 100);
    }

    #[test]
    fn mac_parse_errors() {
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:01:02".parse::<MacAddr>().is_err());
        assert!("zz:00:00:00:00:01".parse::<MacAddr>().is_err());
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(!MacAddr([0; 6]).is_unicast());
    }
}
