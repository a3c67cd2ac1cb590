//! Encapsulation in place, into the frame's headroom (hot path).
//!
//! Per packet: copy the template in front of the inner frame, write the outer TOS (DSCP and ECN),
//! the IP and UDP lengths, the IPv4 checksum from the template's precomputed sum, the UDP source
//! port from the flow hash, and over IPv6 the UDP checksum. No allocation, no branching on
//! configuration beyond what the template settled.

use crate::flow;
use crate::template::{Family, TunnelTemplate};
use crate::{DropReason, FrameBuf, checksum, ecn};

/// Encapsulate the inner Ethernet frame in `frame`, classifying it first.
///
/// # Errors
/// As [`encap_with`], plus the [`DropReason`] of a malformed inner frame.
pub fn encap(tpl: &TunnelTemplate, frame: &mut FrameBuf<'_>) -> Result<(), DropReason> {
    let info = flow::classify(frame.data())?;
    encap_with(tpl, frame, info.tos, info.hash)
}

/// Encapsulate the inner frame in `frame` with an already known inner TOS/traffic class and flow
/// hash (from [`flow::classify`], see [`crate::flow::FlowInfo`]).
///
/// On success `frame` holds the outer packet; on error it is unchanged.
///
/// # Errors
/// [`DropReason::NoHeadroom`] when the buffer has less headroom than [`TunnelTemplate::overhead`];
/// [`DropReason::Ipv4BadTotalLength`] / [`DropReason::Ipv6BadPayloadLength`] when the result would
/// not fit the outer length field.
#[inline(always)]
pub fn encap_with(tpl: &TunnelTemplate, frame: &mut FrameBuf<'_>, inner_tos: u8, hash: u32) -> Result<(), DropReason> {
    let inner_len = frame.len();
    let outer_l3_len = tpl.len - tpl.l3_offset + inner_len;
    let udp_len = tpl.len - tpl.l4_offset + inner_len;
    let Ok(udp_len16) = u16::try_from(udp_len) else {
        return Err(if tpl.family == Family::V4 {
            DropReason::Ipv4BadTotalLength
        } else {
            DropReason::Ipv6BadPayloadLength
        });
    };
    if tpl.family == Family::V4 && outer_l3_len > usize::from(u16::MAX) {
        return Err(DropReason::Ipv4BadTotalLength);
    }
    let out = frame.push_front(tpl.len).ok_or(DropReason::NoHeadroom)?;
    out[..tpl.len].copy_from_slice(&tpl.bytes[..tpl.len]);

    let tos = tpl.fixed_tos.unwrap_or(inner_tos & 0xfc) | ecn::encap(tpl.ecn, inner_tos);
    let l3 = tpl.l3_offset;
    match tpl.family {
        Family::V4 => {
            let total = outer_l3_len as u16;
            out[l3 + 1] = tos;
            out[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            let c = checksum::finish_sum(tpl.base_sum + u32::from(tos) + u32::from(total));
            out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        Family::V6 => {
            // Version 6, then the traffic class across the next nibble boundary; flow label zero.
            out[l3] = 0x60 | (tos >> 4);
            out[l3 + 1] = tos << 4;
            out[l3 + 4..l3 + 6].copy_from_slice(&udp_len16.to_be_bytes());
        }
    }
    let l4 = tpl.l4_offset;
    out[l4..l4 + 2].copy_from_slice(&flow::source_port(hash).to_be_bytes());
    out[l4 + 4..l4 + 6].copy_from_slice(&udp_len16.to_be_bytes());
    if tpl.udp_checksum {
        // Pseudo-header (addresses and protocol precomputed, length added here) plus the datagram,
        // whose checksum field is still zero from the template.
        let s = tpl.base_sum + u32::from(udp_len16) + checksum::sum(&out[l4..]);
        let mut c = checksum::finish_sum(s);
        if c == 0 {
            c = 0xffff;
        }
        out[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    }
    Ok(())
}
