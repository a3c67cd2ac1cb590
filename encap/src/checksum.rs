//! Internet checksum helpers over the `internet-checksum` crate (hot path).
//!
//! The crate does the summing (RFC 1071, with a wide accumulator); this module adds the pseudo-header
//! sums that UDP/TCP/ICMPv6 need and RFC 1624 incremental updates of single 16-bit words.

use std::net::{Ipv4Addr, Ipv6Addr};

pub use internet_checksum::Checksum;

/// The checksum of `bytes` as a big-endian `u16` (already complemented).
pub fn of(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(internet_checksum::checksum(bytes))
}

/// The folded ones'-complement sum of `bytes` (not complemented), for combining with other sums.
#[inline]
pub fn sum(bytes: &[u8]) -> u32 {
    u32::from(!u16::from_be_bytes(internet_checksum::checksum(bytes)))
}

/// Fold a sum of 16-bit words (and other folded sums) to 16 bits and complement it: the value to
/// store in a checksum field.
#[inline]
pub const fn finish_sum(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Update a stored checksum after one 16-bit word changed from `old` to `new` (RFC 1624, eqn. 3).
#[inline]
pub fn update_word(checksum: u16, old: u16, new: u16) -> u16 {
    // HC' = ~(~HC + ~m + m')
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A checksum accumulator seeded with the IPv4 pseudo-header (RFC 768 / RFC 793).
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u16) -> Checksum {
    let mut c = Checksum::new();
    c.add_bytes(&src.octets());
    c.add_bytes(&dst.octets());
    c.add_bytes(&[0, protocol]);
    c.add_bytes(&l4_len.to_be_bytes());
    c
}

/// A checksum accumulator seeded with the IPv6 pseudo-header (RFC 8200 section 8.1).
pub fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4_len: u32) -> Checksum {
    let mut c = Checksum::new();
    c.add_bytes(&src.octets());
    c.add_bytes(&dst.octets());
    c.add_bytes(&l4_len.to_be_bytes());
    c.add_bytes(&[0, 0, 0, next_header]);
    c
}

/// Finish `acc` over `l4` (whose checksum field must be zero) and return the checksum to store.
///
/// UDP transmits a computed zero as `0xffff` (RFC 768); pass `udp = true` for that.
pub fn finish(mut acc: Checksum, l4: &[u8], udp: bool) -> u16 {
    acc.add_bytes(l4);
    let c = u16::from_be_bytes(acc.checksum());
    if udp && c == 0 { 0xffff } else { c }
}

/// Whether `acc` plus `l4` (checksum field included) sums to a valid checksum.
pub fn verifies(mut acc: Checksum, l4: &[u8]) -> bool {
    acc.add_bytes(l4);
    acc.checksum() == [0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 section 3 example bytes.
    const RFC1071: [u8; 8] = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];

    #[test]
    fn rfc1071_example() {
        // Big-endian words: 0x0001 + 0xf203 + 0xf4f5 + 0xf6f7 = 0x2_ddf0, folded 0xddf2. (RFC 1071
        // shows the same sum byte-swapped, 0xf2dd, as computed on a little-endian machine.)
        assert_eq!(of(&RFC1071), !0xddf2);
    }

    #[test]
    fn sums_combine() {
        let whole = of(&RFC1071);
        assert_eq!(finish_sum(sum(&RFC1071[..4]) + sum(&RFC1071[4..])), whole);
        assert_eq!(finish_sum(sum(&RFC1071) + sum(&[0, 0])), whole);
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut bytes = RFC1071;
        let before = of(&bytes);
        bytes[2..4].copy_from_slice(&0x1234u16.to_be_bytes());
        assert_eq!(update_word(before, 0xf203, 0x1234), of(&bytes));
    }
}
