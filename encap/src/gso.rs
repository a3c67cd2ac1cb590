//! Segmentation of GSO super-packets into wire-sized packets (hot path, no allocation).
//!
//! A pod's tap opened with `IFF_VNET_HDR` and TSO offloads hands ferry TCP super-packets of up to
//! 64 KB, each behind a [`VirtioNetHdr`] that names the segment size. The tunnel carries only
//! MTU-sized frames (the kernel's VXLAN peers expect them), so ferry cuts the super-packet exactly
//! as Linux's `tcp_gso_segment`/`inet_gso_segment` would:
//!
//! - every segment repeats the Ethernet, IP and TCP headers (IPv4 options and TCP options, the
//!   timestamp included, are copied unchanged);
//! - IPv4 total length and IPv6 payload length are per segment; the IPv4 ID increments by one per
//!   segment from the super-packet's (wrapping), and each IPv4 header checksum is recomputed;
//! - TCP sequence numbers advance by the segment size; FIN and PSH stay only on the last segment,
//!   CWR only on the first; every other flag (ECE, ACK, URG, ...) is copied to all;
//! - the IP TOS / traffic class, ECN bits included, is copied unchanged;
//! - L4 checksums are completed ([`Checksum::Complete`]) or left partial
//!   ([`Checksum::Partial`]: the field holds the pseudo-header sum for the segment's length, and
//!   [`Segmenter::segment_header`] gives the `NEEDS_CSUM` header that says so).
//!
//! UDP super-packets (`GSO_UDP_L4`, USO) become datagrams of `gso_size` payload bytes each, every
//! one with its own UDP length and checksum. A packet whose payload fits one segment, and a packet
//! without GSO, is one "segment": the frame as it is, its checksum completed when `NEEDS_CSUM` asks.
//!
//! Segments go into buffers the caller owns. [`Segmenter::write_udp_gso`] writes tunnel datagrams
//! back to back for one `sendmsg` with `UDP_SEGMENT` (the kernel adds outer IP and UDP);
//! [`Segmenter::write_encapsulated`] writes one complete outer frame (for an AF_XDP uplink).

use crate::flow::{self, L3};
use crate::template::TunnelTemplate;
use crate::wire::ipv4::protocol;
use crate::wire::ipv6;
use crate::wire::tcp::{self, flags};
use crate::wire::udp;
use crate::wire::virtio_net::{Gso, VirtioNetHdr, VnetError};
use crate::{DropReason, FrameBuf, checksum, encap_with};

/// Largest UDP payload one `sendmsg` can carry over IPv4 (65535 - 20 - 8), and so the most bytes
/// [`Segmenter::write_udp_gso`] puts in one batch (IPv6 allows 65527; ferry uses the smaller).
pub const UDP_GSO_MAX_PAYLOAD: usize = 65_507;
/// Most datagrams in one `UDP_SEGMENT` send: the kernel's `UDP_MAX_SEGMENTS`, 64 in older kernels
/// (newer ones allow 128); ferry keeps to the smaller.
pub const UDP_GSO_MAX_SEGMENTS: usize = 64;

/// Whether segments leave with completed L4 checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// Compute every segment's TCP/UDP checksum: for the wire.
    Complete,
    /// Leave the pseudo-header sum in the checksum field (CHECKSUM_PARTIAL), for a receiver told
    /// so by a `NEEDS_CSUM` header ([`Segmenter::segment_header`]).
    Partial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One packet, copied as is; `csum` is `(csum_start, csum_offset)` when `NEEDS_CSUM` is set.
    Single {
        csum: Option<(usize, usize)>,
    },
    Tcp,
    Udp,
}

/// One super-packet, parsed once, and the segments it becomes.
///
/// ```
/// # use ferry_encap::gso::{Checksum, Segmenter};
/// # use ferry_encap::wire::virtio_net::VirtioNetHdr;
/// # fn f(frame: &[u8], vnet: &VirtioNetHdr, bufs: &mut [[u8; 2048]]) -> Result<(), ferry_encap::DropReason> {
/// let seg = Segmenter::new(frame, vnet)?;
/// for i in 0..seg.segments() {
///     let n = seg.write_segment(i, &mut bufs[i], Checksum::Complete)?;
///     // bufs[i][..n] is a wire-ready Ethernet frame
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Segmenter<'a> {
    /// The frame up to the end of its IP packet (GSO), or the whole frame (single).
    frame: &'a [u8],
    kind: Kind,
    l3: usize,
    l4: usize,
    /// End of the L4 header: what every segment repeats.
    hdr_end: usize,
    v4: bool,
    mss: usize,
    payload: usize,
    count: usize,
    ip_id: u16,
    seq: u32,
    /// Pseudo-header sum without the length.
    pseudo: u32,
    csum_offset: usize,
    tos: u8,
    hash: u32,
}

impl<'a> Segmenter<'a> {
    /// Parse `frame` (an Ethernet frame, the virtio-net header already removed) as described by
    /// `vnet`.
    ///
    /// # Errors
    /// A malformed frame's [`DropReason`]; [`DropReason::VnetBadChecksumOffset`] when the checksum
    /// offsets are outside the frame or, for a GSO packet, not at its L4 checksum field;
    /// [`DropReason::GsoUnsupported`] when the GSO type does not match the headers or the packet
    /// is not TCP/UDP directly over IPv4/IPv6 (IPv6 extension headers, IPv4 fragments).
    pub fn new(frame: &'a [u8], vnet: &VirtioNetHdr) -> Result<Self, DropReason> {
        vnet.check_frame(frame.len())?;
        let info = flow::classify(frame)?;
        let single = |csum| Segmenter {
            frame,
            kind: Kind::Single { csum },
            l3: info.l3_offset,
            l4: 0,
            hdr_end: 0,
            v4: info.l3 == L3::Ipv4,
            mss: 0,
            payload: 0,
            count: 1,
            ip_id: 0,
            seq: 0,
            pseudo: 0,
            csum_offset: 0,
            tos: info.tos,
            hash: info.hash,
        };
        let csum = vnet.needs_csum.then_some((usize::from(vnet.csum_start), usize::from(vnet.csum_offset)));
        let (kind, proto) = match vnet.gso {
            Gso::None => return Ok(single(csum)),
            Gso::TcpV4 => (Kind::Tcp, protocol::TCP),
            Gso::TcpV6 => (Kind::Tcp, protocol::TCP),
            Gso::UdpL4 => (Kind::Udp, protocol::UDP),
        };
        let family_ok = match vnet.gso {
            Gso::TcpV4 => info.l3 == L3::Ipv4,
            Gso::TcpV6 => info.l3 == L3::Ipv6,
            _ => matches!(info.l3, L3::Ipv4 | L3::Ipv6),
        };
        let Some((l4, end)) = info.l4 else { return Err(DropReason::GsoUnsupported) };
        let direct_v6 = info.l3 != L3::Ipv6 || l4 == info.l3_offset + ipv6::HEADER_LEN;
        if !family_ok || info.protocol != proto || !direct_v6 {
            return Err(DropReason::GsoUnsupported);
        }
        let csum_offset = if kind == Kind::Tcp { tcp::CHECKSUM_OFFSET } else { 6 };
        if usize::from(vnet.csum_start) != l4 || usize::from(vnet.csum_offset) != csum_offset {
            return Err(VnetError::BadChecksumOffsets { start: vnet.csum_start, offset: vnet.csum_offset }.into());
        }
        let l4_hdr = match kind {
            Kind::Tcp => {
                let Some(&doff) = frame.get(l4 + tcp::DATA_OFFSET_OFFSET) else { return Err(DropReason::Truncated) };
                usize::from(doff >> 4) * 4
            }
            _ => udp::HEADER_LEN,
        };
        let hdr_end = l4 + l4_hdr;
        if (kind == Kind::Tcp && l4_hdr < tcp::HEADER_LEN) || hdr_end > end {
            return Err(DropReason::Truncated);
        }
        let payload = end - hdr_end;
        let mss = usize::from(vnet.gso_size);
        if payload <= mss {
            // "Too small packets are not really GSO ones" (virtio_net_hdr_to_skb): one packet,
            // whose checksum still needs completing.
            let mut s = single(csum);
            s.frame = &frame[..end];
            return Ok(s);
        }
        let f = &frame[..end];
        let be16 = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
        let pseudo = match (info.src, info.dst) {
            (Some(std::net::IpAddr::V4(s)), Some(std::net::IpAddr::V4(d))) => checksum::pseudo_v4(s, d, proto, 0),
            (Some(std::net::IpAddr::V6(s)), Some(std::net::IpAddr::V6(d))) => checksum::pseudo_v6(s, d, proto, 0),
            _ => return Err(DropReason::GsoUnsupported),
        };
        let seq_at = l4 + tcp::SEQ_OFFSET;
        Ok(Segmenter {
            frame: f,
            kind,
            l3: info.l3_offset,
            l4,
            hdr_end,
            v4: info.l3 == L3::Ipv4,
            mss,
            payload,
            count: payload.div_ceil(mss),
            ip_id: if info.l3 == L3::Ipv4 { be16(info.l3_offset + 4) } else { 0 },
            seq: if kind == Kind::Tcp {
                u32::from_be_bytes([f[seq_at], f[seq_at + 1], f[seq_at + 2], f[seq_at + 3]])
            } else {
                0
            },
            pseudo,
            csum_offset,
            tos: info.tos,
            hash: info.hash,
        })
    }

    /// Parse what one `read` from a tap opened with `IFF_VNET_HDR` (header size 12) returned: the
    /// virtio-net header, then the frame.
    ///
    /// # Errors
    /// The header's [`VnetError`] as a [`DropReason`], then as [`new`](Self::new).
    pub fn from_tap(read: &'a [u8]) -> Result<(VirtioNetHdr, Self), DropReason> {
        let vnet = VirtioNetHdr::parse(read)?;
        let seg = Segmenter::new(&read[crate::wire::virtio_net::HEADER_LEN..], &vnet)?;
        Ok((vnet, seg))
    }

    /// How many segments the packet becomes (1 for a packet that needs no segmentation).
    pub fn segments(&self) -> usize {
        self.count
    }

    /// Whether the packet is cut at all (more than one segment).
    pub fn is_gso(&self) -> bool {
        !matches!(self.kind, Kind::Single { .. })
    }

    /// Payload bytes per segment (the last may carry fewer); 0 for a single packet.
    pub fn mss(&self) -> usize {
        self.mss
    }

    /// Headers every segment repeats (Ethernet, IP, TCP or UDP); 0 for a single packet.
    pub fn header_len(&self) -> usize {
        self.hdr_end
    }

    /// Offset of the IP header (in the frame and in every segment).
    pub fn l3_offset(&self) -> usize {
        self.l3
    }

    /// Offset of the L4 header; 0 for a single packet.
    pub fn l4_offset(&self) -> usize {
        self.l4
    }

    /// The TCP flags of a TCP super-packet (before they are split between the segments: FIN and PSH
    /// go to the last, CWR to the first); `None` for anything else.
    pub fn tcp_flags(&self) -> Option<u8> {
        (self.kind == Kind::Tcp).then(|| self.frame[self.l4 + tcp::FLAGS_OFFSET])
    }

    /// Inner TOS / traffic class (for the outer header, RFC 6040).
    pub fn tos(&self) -> u8 {
        self.tos
    }

    /// The flow hash of [`flow::classify`] (for the outer UDP source port).
    pub fn hash(&self) -> u32 {
        self.hash
    }

    /// Length of segment `i` (Ethernet frame bytes); 0 when `i` is out of range.
    pub fn segment_len(&self, i: usize) -> usize {
        match self.kind {
            _ if i >= self.count => 0,
            Kind::Single { .. } => self.frame.len(),
            _ => self.hdr_end + self.mss.min(self.payload - i * self.mss),
        }
    }

    /// The longest segment (the first).
    pub fn max_segment_len(&self) -> usize {
        self.segment_len(0)
    }

    /// The virtio-net header to hand over with each segment written with `mode` (to a tap, or to
    /// anything that reads CHECKSUM_PARTIAL the virtio way): `NEEDS_CSUM` at the L4 checksum for
    /// [`Checksum::Partial`], nothing for completed checksums.
    pub fn segment_header(&self, mode: Checksum) -> VirtioNetHdr {
        let csum = match (self.kind, mode) {
            (_, Checksum::Complete) | (Kind::Single { csum: None }, _) => None,
            (Kind::Single { csum: Some((s, o)) }, Checksum::Partial) => Some((s, o)),
            (_, Checksum::Partial) => Some((self.l4, self.csum_offset)),
        };
        match csum {
            // Offsets were checked against a frame of at most 64 KB, so they fit in 16 bits.
            Some((s, o)) => VirtioNetHdr {
                needs_csum: true,
                csum_start: s as u16,
                csum_offset: o as u16,
                hdr_len: self.hdr_end as u16,
                ..VirtioNetHdr::NONE
            },
            None => VirtioNetHdr::NONE,
        }
    }

    /// Write segment `i` (an Ethernet frame) to the front of `out`; returns its length.
    ///
    /// # Errors
    /// [`DropReason::GsoNoRoom`] when `out` is shorter than [`segment_len`](Self::segment_len) or
    /// `i` is not below [`segments`](Self::segments).
    pub fn write_segment(&self, i: usize, out: &mut [u8], mode: Checksum) -> Result<usize, DropReason> {
        let len = self.segment_len(i);
        let Some(out) = out.get_mut(..len).filter(|_| len > 0) else { return Err(DropReason::GsoNoRoom) };
        match self.kind {
            Kind::Single { csum } => {
                out.copy_from_slice(self.frame);
                if let (Some((start, off)), Checksum::Complete) = (csum, mode) {
                    // skb_checksum_help: the field holds the pseudo-header sum; sum over it.
                    let c = checksum::finish_sum(checksum::sum(&out[start..]));
                    let c = if c == 0 { 0xffff } else { c };
                    out[start + off..start + off + 2].copy_from_slice(&c.to_be_bytes());
                }
            }
            Kind::Tcp | Kind::Udp => {
                let n = len - self.hdr_end;
                let from = self.hdr_end + i * self.mss;
                out[..self.hdr_end].copy_from_slice(&self.frame[..self.hdr_end]);
                out[self.hdr_end..].copy_from_slice(&self.frame[from..from + n]);
                self.patch(i, out, mode);
            }
        }
        Ok(len)
    }

    /// Lengths, IDs, sequence number, flags and checksums of segment `i`, already copied to `out`
    /// (exactly `segment_len(i)` bytes).
    fn patch(&self, i: usize, out: &mut [u8], mode: Checksum) {
        let (l3, l4) = (self.l3, self.l4);
        let ip_len = out.len() - l3;
        // A segment is never longer than the super-packet, whose lengths fit 16 bits.
        if self.v4 {
            out[l3 + 2..l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            out[l3 + 4..l3 + 6].copy_from_slice(&self.ip_id.wrapping_add(i as u16).to_be_bytes());
            out[l3 + 10..l3 + 12].fill(0);
            let c = checksum::of(&out[l3..l4]);
            out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            out[l3 + 4..l3 + 6].copy_from_slice(&((ip_len - ipv6::HEADER_LEN) as u16).to_be_bytes());
        }
        let l4_len = out.len() - l4;
        match self.kind {
            Kind::Tcp => {
                let seq = self.seq.wrapping_add((i * self.mss) as u32);
                out[l4 + tcp::SEQ_OFFSET..l4 + tcp::SEQ_OFFSET + 4].copy_from_slice(&seq.to_be_bytes());
                let mut f = out[l4 + tcp::FLAGS_OFFSET];
                if i + 1 < self.count {
                    f &= !(flags::FIN | flags::PSH);
                }
                if i > 0 {
                    f &= !flags::CWR;
                }
                out[l4 + tcp::FLAGS_OFFSET] = f;
            }
            _ => out[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes()),
        }
        let at = l4 + self.csum_offset;
        let pseudo = self.pseudo + l4_len as u32;
        let c = match mode {
            Checksum::Partial => !checksum::finish_sum(pseudo),
            Checksum::Complete => {
                out[at..at + 2].fill(0);
                let c = checksum::finish_sum(pseudo + checksum::sum(&out[l4..]));
                // A computed UDP checksum of zero is sent as all ones (RFC 768).
                if c == 0 && self.kind == Kind::Udp { 0xffff } else { c }
            }
        };
        out[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// Write segment `i` encapsulated with `tpl` as a complete outer frame (outer Ethernet, IP,
    /// UDP, tunnel header, inner segment with completed checksums) at the front of `out`; returns
    /// its length.
    ///
    /// # Errors
    /// [`DropReason::GsoNoRoom`] when `out` cannot hold it; what [`encap_with`] returns.
    pub fn write_encapsulated(&self, i: usize, tpl: &TunnelTemplate, out: &mut [u8]) -> Result<usize, DropReason> {
        let oh = tpl.overhead();
        let n = self.write_segment(i, out.get_mut(oh..).ok_or(DropReason::GsoNoRoom)?, Checksum::Complete)?;
        let mut f = FrameBuf::new(out, oh, n).ok_or(DropReason::GsoNoRoom)?;
        encap_with(tpl, &mut f, self.tos, self.hash)?;
        Ok(f.len())
    }

    /// Write tunnel datagrams for segments `first..` back to back into `out`, each the template's
    /// tunnel header ([`TunnelTemplate::tunnel_header`]) followed by one inner segment with
    /// completed checksums, for a single `sendmsg` with `UDP_SEGMENT` set to the returned
    /// [`UdpGsoBatch::gso_size`]: every datagram but the last is exactly that long, the last no
    /// longer. As many segments go in as fit `out`, [`UDP_GSO_MAX_PAYLOAD`] and
    /// [`UDP_GSO_MAX_SEGMENTS`]; call again from [`UdpGsoBatch::next`] until it equals
    /// [`segments`](Self::segments). A 64 KB super-packet at MSS 1398 takes two sends.
    ///
    /// # Errors
    /// [`DropReason::GsoNoRoom`] when not even one datagram fits, or `first` is out of range.
    pub fn write_udp_gso(&self, tpl: &TunnelTemplate, first: usize, out: &mut [u8]) -> Result<UdpGsoBatch, DropReason> {
        let th = tpl.tunnel_header();
        let stride = th.len() + self.max_segment_len();
        let room = out.len().min(UDP_GSO_MAX_PAYLOAD);
        let (mut at, mut i) = (0, first);
        while i < self.count && i - first < UDP_GSO_MAX_SEGMENTS {
            let dlen = th.len() + self.segment_len(i);
            if at + dlen > room {
                break;
            }
            out[at..at + th.len()].copy_from_slice(th);
            self.write_segment(i, &mut out[at + th.len()..at + dlen], Checksum::Complete)?;
            at += dlen;
            i += 1;
        }
        if i == first {
            return Err(DropReason::GsoNoRoom);
        }
        Ok(UdpGsoBatch {
            len: at,
            // One datagram is at most UDP_GSO_MAX_PAYLOAD bytes.
            gso_size: stride as u16,
            segments: i - first,
            next: i,
            src_port: flow::source_port(self.hash),
            tos: tpl.outer_tos(self.tos),
        })
    }
}

/// One `sendmsg` worth of tunnel datagrams, from [`Segmenter::write_udp_gso`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpGsoBatch {
    /// Bytes written to the front of the buffer.
    pub len: usize,
    /// The `UDP_SEGMENT` value: every datagram but the last is this long.
    pub gso_size: u16,
    /// Datagrams written.
    pub segments: usize,
    /// The first segment not yet written.
    pub next: usize,
    /// The outer UDP source port ferry's own encapsulation would use (flow hash, RFC 7348).
    pub src_port: u16,
    /// The outer TOS / traffic class (DSCP policy and RFC 6040 ECN) for `IP_TOS` / `IPV6_TCLASS`.
    pub tos: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::virtio_net::VirtioNetHdr;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn tso4(payload: usize, fin_psh_cwr: bool) -> (Vec<u8>, VirtioNetHdr) {
        let data: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
        let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 244, 1, 2], [10, 244, 2, 3], 64)
            .tcp(40000, 5201, 0xffff_f000, 64000)
            .ack(77);
        if fin_psh_cwr {
            b = b.fin().psh().cwr();
        }
        let mut out = Vec::new();
        b.write(&mut out, &data).expect("build");
        out[18..20].copy_from_slice(&0xfffeu16.to_be_bytes()); // IP ID near the wrap
        let mut ip = crate::wire::ipv4::Ipv4Packet::new_unchecked(&mut out[14..]);
        ip.fill_checksum();
        // What a tap hands over: the checksum field holds the pseudo-header sum.
        let pseudo = checksum::pseudo_v4([10, 244, 1, 2].into(), [10, 244, 2, 3].into(), 6, (out.len() - 34) as u16);
        out[50..52].copy_from_slice(&(!checksum::finish_sum(pseudo)).to_be_bytes());
        let vnet = VirtioNetHdr {
            needs_csum: true,
            gso: Gso::TcpV4,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
            hdr_len: 54,
            ..VirtioNetHdr::NONE
        };
        (out, vnet)
    }

    #[test]
    fn tcp4_segments_like_linux() {
        let (frame, vnet) = tso4(2500, true);
        let s = Segmenter::new(&frame, &vnet).expect("valid");
        assert_eq!((s.segments(), s.max_segment_len(), s.segment_len(2), s.segment_len(3)), (3, 1054, 554, 0));
        let mut buf = [0u8; 1100];
        for i in 0..3 {
            let n = s.write_segment(i, &mut buf, Checksum::Complete).expect("fits");
            let p = SlicedPacket::from_ethernet(&buf[..n]).expect("parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!("ipv4") };
            let h = ip.header();
            assert_eq!(h.identification(), 0xfffeu16.wrapping_add(i as u16));
            assert_eq!(usize::from(h.total_len()), n - 14);
            assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
            let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("tcp") };
            assert_eq!(t.sequence_number(), 0xffff_f000u32.wrapping_add(1000 * i as u32));
            assert_eq!((t.fin(), t.psh(), t.cwr(), t.ack()), (i == 2, i == 2, i == 0, true));
            assert_eq!(t.calc_checksum_ipv4(h.source(), h.destination()).ok(), Some(t.checksum()));
            assert_eq!(t.payload(), &frame[54 + 1000 * i..(54 + 1000 * (i + 1)).min(frame.len())]);
        }
        assert_eq!(s.write_segment(3, &mut buf, Checksum::Complete), Err(DropReason::GsoNoRoom));
        assert_eq!(s.write_segment(0, &mut buf[..1053], Checksum::Complete), Err(DropReason::GsoNoRoom));

        // Partial: the field holds the segment's pseudo-header sum, which completes to the same.
        let n = s.write_segment(1, &mut buf, Checksum::Partial).expect("fits");
        let h = s.segment_header(Checksum::Partial);
        assert_eq!((h.needs_csum, h.csum_start, h.csum_offset, h.gso), (true, 34, 16, Gso::None));
        let mut done = [0u8; 1100];
        s.write_segment(1, &mut done, Checksum::Complete).expect("fits");
        assert_eq!(crate::offload::complete_checksum(&mut buf[..n]), Ok(crate::offload::ChecksumFix::Completed));
        assert_eq!(buf[..n], done[..n]);
    }

    #[test]
    fn small_and_plain_packets_are_one_segment_with_the_checksum_completed() {
        let (frame, mut vnet) = tso4(900, false);
        let s = Segmenter::new(&frame, &vnet).expect("valid");
        assert_eq!((s.segments(), s.is_gso()), (1, false));
        let mut buf = vec![0u8; 1000];
        let n = s.write_segment(0, &mut buf, Checksum::Complete).expect("fits");
        let mut want = frame.clone();
        assert_eq!(crate::offload::complete_checksum(&mut want), Ok(crate::offload::ChecksumFix::Completed));
        assert_eq!(buf[..n], want[..]);
        vnet.gso = Gso::None;
        assert_eq!(Segmenter::new(&frame, &vnet).expect("valid").write_segment(0, &mut buf, Checksum::Complete), Ok(n));
        assert_eq!(buf[..n], want[..]);
    }

    #[test]
    fn a_tap_read_is_header_then_frame() {
        let (frame, vnet) = tso4(2500, false);
        let mut read = vnet.to_bytes().to_vec();
        read.extend_from_slice(&frame);
        let (h, s) = Segmenter::from_tap(&read).expect("valid");
        assert_eq!((h, s.segments()), (vnet, 3));
        read[0] = 0x10;
        assert_eq!(Segmenter::from_tap(&read).err(), Some(DropReason::VnetBadHeader));
        assert_eq!(Segmenter::from_tap(&read[..11]).err(), Some(DropReason::Truncated));
    }

    #[test]
    fn mismatches_are_refused() {
        let (frame, vnet) = tso4(3000, false);
        let wrong_family = VirtioNetHdr { gso: Gso::TcpV6, ..vnet };
        assert_eq!(Segmenter::new(&frame, &wrong_family).err(), Some(DropReason::GsoUnsupported));
        let udp = VirtioNetHdr { gso: Gso::UdpL4, csum_offset: 6, ..vnet };
        assert_eq!(Segmenter::new(&frame, &udp).err(), Some(DropReason::GsoUnsupported));
        let off = VirtioNetHdr { csum_start: 14, ..vnet };
        assert_eq!(Segmenter::new(&frame, &off).err(), Some(DropReason::VnetBadChecksumOffset));
        let outside = VirtioNetHdr { gso: Gso::None, csum_start: 60000, ..vnet };
        assert_eq!(Segmenter::new(&frame, &outside).err(), Some(DropReason::VnetBadChecksumOffset));
    }
}
