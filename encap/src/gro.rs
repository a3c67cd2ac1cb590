//! Coalescing of received TCP segments into super-packets, as Linux's GRO would (hot path, no
//! allocation: storage is the caller's).
//!
//! Decapsulated inner frames go in one at a time ([`Coalescer::push`]); super-packets and frames
//! that were not merged come out through a callback as an [`Output`]: a [`VirtioNetHdr`] and the
//! frame, ready for one `writev` to a pod's tap. A merged packet leaves with `NEEDS_CSUM`
//! (`csum_start` at the TCP header, `csum_offset` 16, the pseudo-header sum in the checksum field),
//! its GSO type, `gso_size` set to the run's MSS and the ECN bit when the run began with CWR: what
//! `tcp4_gro_complete`/`tcp6_gro_complete` and `virtio_net_hdr_from_skb` make of it.
//!
//! # What merges (Linux `inet_gro_receive`, `ipv6_gro_receive`, `tcp_gro_receive`)
//! A segment is a candidate when it is TCP directly over IPv4 without options (IHL 5) or IPv6
//! without extension headers, not a fragment, its IP length matching the frame (no padding), and
//! its IPv4 header and TCP checksums verify. It joins the run held for its flow when all of these
//! hold, and otherwise the held run is flushed first:
//! - the same flow: identical Ethernet header, addresses, ports, IPv6 flow label;
//! - the same TTL / hop limit, TOS / traffic class (DSCP and ECN: a CE mark never merges with a
//!   packet without one), and DF bit;
//! - IPv4 IDs incrementing by one per segment, or (DF set) all equal, decided on the second segment;
//! - the same TCP header length, flags except CWR/FIN/PSH (ECE included), window, acknowledgment
//!   number and options (timestamps included), byte for byte;
//! - no CWR on the new segment (a CWR segment starts a run of its own);
//! - a sequence number that continues the run exactly;
//! - a payload no longer than the run's first (its MSS) and not empty;
//! - at most 65535 bytes of IP packet after merging.
//!
//! # When a run is flushed
//! - a segment of the same flow cannot join (above), or is not a candidate at all: the run goes
//!   first, so one flow is never reordered;
//! - the segment just merged carries PSH, FIN, URG, RST or SYN, or is shorter than the MSS;
//! - a new flow needs a slot and all are held: the oldest run goes;
//! - [`Coalescer::flush`]: the caller calls it at the end of every receive batch (Linux flushes at
//!   the end of each NAPI poll), so nothing waits for more traffic.
//!
//! A run of one segment leaves unchanged, with `DATA_VALID` (its checksum was verified). Segments
//! that are not candidates leave unchanged with no flags: the receiver checks them itself.
//! Everything that is not TCP passes straight through.

use crate::checksum;
use crate::wire::ethernet::{self, EthernetFrame, ethertype};
use crate::wire::ipv4::{self, Ipv4Packet, protocol};
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::tcp::{self, flags};
use crate::wire::virtio_net::{self, Gso, VirtioNetHdr};

/// Most flows a coalescer holds runs for (Linux: 8 buckets of 8).
pub const MAX_FLOWS: usize = 64;
/// Largest IP packet a run grows to (Linux's default `gro_max_size`, less one).
pub const MAX_IP_LEN: usize = 65_535;
/// Bytes of storage per flow: a virtio-net header, a tagged Ethernet header and a full IP packet.
pub const SLOT_LEN: usize = virtio_net::HEADER_LEN + ethernet::HEADER_LEN + ethernet::VLAN_TAG_LEN + MAX_IP_LEN;

/// Storage needed for `flows` flows.
pub const fn storage_len(flows: usize) -> usize {
    flows * SLOT_LEN
}

/// What a coalescer hands back: a frame and the virtio-net header to write in front of it.
#[derive(Debug, Clone, Copy)]
pub struct Output<'a> {
    /// Header for the tap (`NONE` for frames passed through, `DATA_VALID` for a verified single
    /// segment, `NEEDS_CSUM` and GSO fields for a super-packet).
    pub vnet: VirtioNetHdr,
    /// The Ethernet frame.
    pub frame: &'a [u8],
    /// Segments merged into it (1 for anything not merged).
    pub segments: u16,
}

/// Counts of what a coalescer did, for the data plane's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroStats {
    /// Frames pushed.
    pub frames_in: u64,
    /// Segments merged into a held run (not counting each run's first).
    pub merged: u64,
    /// Runs flushed with more than one segment (super-packets out).
    pub super_packets: u64,
    /// Frames that left as they came: not TCP, not candidates, or runs of one.
    pub single: u64,
    /// TCP segments whose IPv4 header or TCP checksum did not verify (passed through unmerged).
    pub bad_checksum: u64,
    /// Runs flushed early because every slot was taken.
    pub evicted: u64,
}

/// A held run, the bytes of which live in its slot.
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    live: bool,
    age: u64,
    /// A cheap flow key to skip mismatches (ports and the low address bytes).
    key: u64,
    v4: bool,
    /// Offsets within the frame.
    l3: usize,
    l4: usize,
    hdr_end: usize,
    /// Frame bytes held.
    len: usize,
    count: u16,
    mss: usize,
    next_seq: u32,
    first_id: u16,
    fixed_id: bool,
}

/// One parsed TCP frame.
#[derive(Debug, Clone, Copy)]
struct Seg {
    v4: bool,
    l3: usize,
    l4: usize,
    hdr_end: usize,
    key: u64,
    /// A GRO candidate (see the module docs).
    candidate: bool,
    bad_checksum: bool,
}

/// Coalesces TCP segments per flow into caller-provided storage `S` ([`storage_len`] bytes for
/// the flows wanted; a `Vec<u8>` made once at setup, or a slice).
#[derive(Debug)]
pub struct Coalescer<S> {
    storage: S,
    held: [Held; MAX_FLOWS],
    flows: usize,
    clock: u64,
    stats: GroStats,
}

impl<S: AsRef<[u8]> + AsMut<[u8]>> Coalescer<S> {
    /// A coalescer over `storage`, holding as many flows as fit it (at most [`MAX_FLOWS`]).
    /// Returns `None` when not even one flow fits ([`SLOT_LEN`] bytes).
    pub fn new(storage: S) -> Option<Self> {
        let flows = (storage.as_ref().len() / SLOT_LEN).min(MAX_FLOWS);
        (flows > 0).then(|| Coalescer {
            storage,
            held: [Held::default(); MAX_FLOWS],
            flows,
            clock: 0,
            stats: GroStats::default(),
        })
    }

    /// Flows held at most.
    pub fn flows(&self) -> usize {
        self.flows
    }

    /// Runs held now.
    pub fn held(&self) -> usize {
        self.held[..self.flows].iter().filter(|h| h.live).count()
    }

    /// What the coalescer did so far.
    pub fn stats(&self) -> GroStats {
        self.stats
    }

    /// Take one received frame. Whatever leaves because of it (a flushed run, the frame itself)
    /// goes to `emit`, in order.
    pub fn push<F: FnMut(Output<'_>)>(&mut self, frame: &[u8], emit: &mut F) {
        self.stats.frames_in += 1;
        let Some(seg) = parse(frame) else {
            self.stats.single += 1;
            emit(Output { vnet: VirtioNetHdr::NONE, frame, segments: 1 });
            return;
        };
        let held = self.find(frame, &seg);
        if !seg.candidate {
            if let Some(h) = held {
                self.flush_slot(h, emit);
            }
            self.stats.bad_checksum += u64::from(seg.bad_checksum);
            self.stats.single += 1;
            emit(Output { vnet: VirtioNetHdr::NONE, frame, segments: 1 });
            return;
        }
        let t = &frame[seg.l4..];
        let tflags = t[tcp::FLAGS_OFFSET];
        let len = frame.len() - seg.hdr_end;
        let ends_run = tflags & (flags::URG | flags::PSH | flags::RST | flags::SYN | flags::FIN) != 0;
        if let Some(h) = held {
            if self.can_merge(h, frame, &seg) {
                self.merge(h, frame, &seg);
                if ends_run || len < self.held[h].mss {
                    self.flush_slot(h, emit);
                }
                return;
            }
            self.flush_slot(h, emit);
        }
        if len == 0 || ends_run {
            self.stats.single += 1;
            emit(Output { vnet: VirtioNetHdr { data_valid: true, ..VirtioNetHdr::NONE }, frame, segments: 1 });
            return;
        }
        let slot = self.free_slot(emit);
        self.hold(slot, frame, &seg);
    }

    /// Flush every held run (end of a receive batch).
    pub fn flush<F: FnMut(Output<'_>)>(&mut self, emit: &mut F) {
        for h in 0..self.flows {
            if self.held[h].live {
                self.flush_slot(h, emit);
            }
        }
    }

    fn slot_frame(&self, h: usize) -> &[u8] {
        let at = h * SLOT_LEN + virtio_net::HEADER_LEN;
        &self.storage.as_ref()[at..at + self.held[h].len]
    }

    /// The held run of `seg`'s flow: same Ethernet header, addresses, ports, IPv6 flow label.
    fn find(&self, frame: &[u8], seg: &Seg) -> Option<usize> {
        (0..self.flows).find(|&h| {
            let p = &self.held[h];
            if !p.live || p.key != seg.key || p.v4 != seg.v4 || p.l3 != seg.l3 {
                return false;
            }
            let q = self.slot_frame(h);
            let (l3, a, b) = (seg.l3, &frame[seg.l3..], &q[p.l3..]);
            let same_ip = if seg.v4 {
                a[12..20] == b[12..20]
            } else {
                // Version and flow label (not the traffic class), then both addresses.
                be32(a) & 0xf00f_ffff == be32(b) & 0xf00f_ffff && a[8..40] == b[8..40]
            };
            frame[..l3] == q[..l3] && same_ip && frame[seg.l4..seg.l4 + 4] == q[p.l4..p.l4 + 4]
        })
    }

    fn can_merge(&self, h: usize, frame: &[u8], seg: &Seg) -> bool {
        let p = self.held[h];
        let q = self.slot_frame(h);
        let (a, b) = (&frame[seg.l3..], &q[p.l3..]);
        let network_ok = if seg.v4 {
            let (id, id2) = (u16::from_be_bytes([a[4], a[5]]), p.first_id);
            let df = a[6] & 0x40 != 0;
            let fixed = p.fixed_id || (p.count == 1 && df && id == id2);
            // TTL, TOS (ECN included) and DF equal; IDs incrementing, or fixed when DF.
            a[8] == b[8]
                && a[1] == b[1]
                && (a[6] ^ b[6]) & 0x40 == 0
                && id == id2.wrapping_add(if fixed { 0 } else { p.count })
        } else {
            (be32(a) ^ be32(b)) & 0x0ff0_0000 == 0 && a[7] == b[7]
        };
        let (t, u) = (&frame[seg.l4..seg.hdr_end], &q[p.l4..p.hdr_end]);
        let len = frame.len() - seg.hdr_end;
        let word_mask = !(u32::from(flags::CWR | flags::FIN | flags::PSH) << 16);
        network_ok
            && t[tcp::FLAGS_OFFSET] & flags::CWR == 0
            && (be32(&t[12..]) ^ be32(&u[12..])) & word_mask == 0
            && t[tcp::ACK_OFFSET..tcp::ACK_OFFSET + 4] == u[tcp::ACK_OFFSET..tcp::ACK_OFFSET + 4]
            && t.len() == u.len()
            && t[tcp::HEADER_LEN..] == u[tcp::HEADER_LEN..]
            && len.wrapping_sub(1) < p.mss
            && be32(&t[tcp::SEQ_OFFSET..]) == p.next_seq
            && p.len - p.l3 + len <= MAX_IP_LEN
    }

    fn merge(&mut self, h: usize, frame: &[u8], seg: &Seg) {
        let p = &mut self.held[h];
        let payload = &frame[seg.hdr_end..];
        let base = h * SLOT_LEN + virtio_net::HEADER_LEN;
        let (at, l4) = (base + p.len, base + p.l4);
        if p.count == 1 && p.v4 {
            let id = u16::from_be_bytes([frame[seg.l3 + 4], frame[seg.l3 + 5]]);
            p.fixed_id = id == p.first_id;
        }
        p.len += payload.len();
        p.count += 1;
        p.next_seq = p.next_seq.wrapping_add(payload.len() as u32);
        let s = self.storage.as_mut();
        s[at..at + payload.len()].copy_from_slice(payload);
        s[l4 + tcp::FLAGS_OFFSET] |= frame[seg.l4 + tcp::FLAGS_OFFSET] & (flags::FIN | flags::PSH);
        self.stats.merged += 1;
    }

    /// A free slot, flushing the oldest run when all are taken.
    fn free_slot<F: FnMut(Output<'_>)>(&mut self, emit: &mut F) -> usize {
        if let Some(h) = (0..self.flows).find(|&h| !self.held[h].live) {
            return h;
        }
        let oldest = (0..self.flows).min_by_key(|&h| self.held[h].age).unwrap_or(0);
        self.stats.evicted += 1;
        self.flush_slot(oldest, emit);
        oldest
    }

    fn hold(&mut self, h: usize, frame: &[u8], seg: &Seg) {
        let base = h * SLOT_LEN + virtio_net::HEADER_LEN;
        self.storage.as_mut()[base..base + frame.len()].copy_from_slice(frame);
        self.clock += 1;
        self.held[h] = Held {
            live: true,
            age: self.clock,
            key: seg.key,
            v4: seg.v4,
            l3: seg.l3,
            l4: seg.l4,
            hdr_end: seg.hdr_end,
            len: frame.len(),
            count: 1,
            mss: frame.len() - seg.hdr_end,
            next_seq: be32(&frame[seg.l4 + tcp::SEQ_OFFSET..]).wrapping_add((frame.len() - seg.hdr_end) as u32),
            first_id: if seg.v4 { u16::from_be_bytes([frame[seg.l3 + 4], frame[seg.l3 + 5]]) } else { 0 },
            fixed_id: false,
        };
    }

    fn flush_slot<F: FnMut(Output<'_>)>(&mut self, h: usize, emit: &mut F) {
        let p = self.held[h];
        self.held[h].live = false;
        let base = h * SLOT_LEN + virtio_net::HEADER_LEN;
        let s = &mut self.storage.as_mut()[base..base + p.len];
        if p.count == 1 {
            self.stats.single += 1;
            emit(Output { vnet: VirtioNetHdr { data_valid: true, ..VirtioNetHdr::NONE }, frame: s, segments: 1 });
            return;
        }
        self.stats.super_packets += 1;
        let vnet = super_fields(s, p.v4, p.l3, p.l4, p.hdr_end, p.mss);
        emit(Output { vnet, frame: s, segments: p.count });
    }
}

/// Make `s` (a whole super-packet, or at least its headers: `s[..hdr_end]`, with the frame
/// `frame_len` bytes long) a `NEEDS_CSUM` GSO packet: IP length, IPv4 header checksum, the
/// pseudo-header sum in the TCP checksum field; returns its virtio-net header.
fn super_fields_len(
    s: &mut [u8],
    frame_len: usize,
    v4: bool,
    l3: usize,
    l4: usize,
    hdr_end: usize,
    mss: usize,
) -> VirtioNetHdr {
    let ip_len = frame_len - l3;
    let l4_len = frame_len - l4;
    // Runs stop at MAX_IP_LEN, so the lengths fit 16 bits.
    let pseudo = if v4 {
        s[l3 + 2..l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        s[l3 + 10..l3 + 12].fill(0);
        let c = checksum::of(&s[l3..l4]);
        s[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        checksum::sum(&s[l3 + 12..l3 + 20]) + u32::from(protocol::TCP) + l4_len as u32
    } else {
        s[l3 + 4..l3 + 6].copy_from_slice(&((ip_len - ipv6::HEADER_LEN) as u16).to_be_bytes());
        checksum::sum(&s[l3 + 8..l3 + 40]) + u32::from(protocol::TCP) + l4_len as u32
    };
    let at = l4 + tcp::CHECKSUM_OFFSET;
    s[at..at + 2].copy_from_slice(&(!checksum::finish_sum(pseudo)).to_be_bytes());
    VirtioNetHdr {
        needs_csum: true,
        data_valid: false,
        gso: if v4 { Gso::TcpV4 } else { Gso::TcpV6 },
        ecn: s[l4 + tcp::FLAGS_OFFSET] & flags::CWR != 0,
        hdr_len: hdr_end as u16,
        gso_size: mss as u16,
        csum_start: l4 as u16,
        csum_offset: tcp::CHECKSUM_OFFSET as u16,
        num_buffers: 0,
    }
}

fn super_fields(s: &mut [u8], v4: bool, l3: usize, l4: usize, hdr_end: usize, mss: usize) -> VirtioNetHdr {
    let len = s.len();
    super_fields_len(s, len, v4, l3, l4, hdr_end, mss)
}

/// A run of back-to-back tunnel datagrams (a `UDP_GRO` buffer, or the rest of one) that one
/// super-packet can stand for: found by [`tunnel_run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelRun {
    /// Datagrams in the run, the first included (at least 2).
    pub count: usize,
    /// Where the inner TCP payload starts in each datagram (tunnel header and inner headers).
    pub payload_at: usize,
    /// The first datagram's TCP payload: the run's MSS.
    pub mss: usize,
    /// TCP payload bytes of the whole run.
    pub payload_len: usize,
    /// The run's last segment carries PSH.
    pub psh: bool,
}

/// The longest prefix of `buf`, datagrams of `stride` bytes back to back (the last may be shorter),
/// each a `tunnel_header`-byte tunnel header and an inner frame, whose inner TCP segments Linux's
/// GRO would merge into one super-packet, and which the data plane may route once for all: `None`
/// when that prefix is shorter than two datagrams.
///
/// Every datagram has the first one's tunnel header byte for byte; every inner frame is a
/// [`Coalescer`] candidate (checksums verified) of the first one's flow with the rules of the
/// module's documentation (same Ethernet header, addresses, ports, TTL, TOS, DF, IPv4 IDs
/// incrementing or fixed with DF, TCP header length, window, ACK number and options, contiguous
/// sequence numbers, no payload longer than the first, at most [`MAX_IP_LEN`] bytes of IP packet).
/// Stricter than the coalescer on flags, because one pipeline pass on the first segment stands
/// for the run: the first has ACK, and ECE or CWR at most; the others the same flags without CWR,
/// and PSH on the last one only. A FIN, RST, SYN or URG segment is never part of a run (connection
/// tracking reads them); a PSH or short segment ends it.
pub fn tunnel_run(buf: &[u8], stride: usize, tunnel_header: usize) -> Option<TunnelRun> {
    if stride <= tunnel_header || buf.len() <= stride {
        return None;
    }
    let d0 = &buf[..stride];
    let f0 = &d0[tunnel_header..];
    let s0 = parse(f0).filter(|s| s.candidate)?;
    let flags0 = f0[s0.l4 + tcp::FLAGS_OFFSET];
    if flags0 & flags::ACK == 0 || flags0 & !(flags::ACK | flags::ECE | flags::CWR) != 0 {
        return None;
    }
    let mss = f0.len() - s0.hdr_end;
    if mss == 0 {
        return None;
    }
    let (l3, l4, hdr_end) = (s0.l3, s0.l4, s0.hdr_end);
    let (a0, t0) = (&f0[l3..], &f0[l4..hdr_end]);
    let id0 = if s0.v4 { u16::from_be_bytes([a0[4], a0[5]]) } else { 0 };
    let mut fixed_id = None;
    let mut next_seq = be32(&t0[tcp::SEQ_OFFSET..]).wrapping_add(mss as u32);
    let mut ip_len = f0.len() - l3;
    let (mut count, mut payload_len, mut psh) = (1, mss, false);
    let want_flags = flags0 & !flags::CWR;
    while count * stride < buf.len() {
        let d = &buf[count * stride..((count + 1) * stride).min(buf.len())];
        if d.len() <= tunnel_header || d[..tunnel_header] != d0[..tunnel_header] {
            break;
        }
        let f = &d[tunnel_header..];
        let Some(s) = parse(f).filter(|s| s.candidate) else { break };
        if s.v4 != s0.v4 || s.l3 != l3 || s.l4 != l4 || s.hdr_end != hdr_end || f[..l3] != f0[..l3] {
            break;
        }
        let (a, t) = (&f[l3..], &f[l4..hdr_end]);
        let network_ok = if s0.v4 {
            let id = u16::from_be_bytes([a[4], a[5]]);
            let fixed = *fixed_id.get_or_insert(a[6] & 0x40 != 0 && id == id0);
            // Addresses, TTL, TOS (ECN included), DF; IDs incrementing, or fixed when DF.
            a[12..20] == a0[12..20]
                && a[8] == a0[8]
                && a[1] == a0[1]
                && (a[6] ^ a0[6]) & 0x40 == 0
                && id == id0.wrapping_add(if fixed { 0 } else { count as u16 })
        } else {
            // Version, traffic class and flow label; hop limit; addresses.
            a[..4] == a0[..4] && a[7] == a0[7] && a[8..40] == a0[8..40]
        };
        let fl = t[tcp::FLAGS_OFFSET];
        let len = f.len() - hdr_end;
        let tcp_ok = t[..4] == t0[..4]
            && fl & !flags::PSH == want_flags
            && t[tcp::ACK_OFFSET..tcp::FLAGS_OFFSET] == t0[tcp::ACK_OFFSET..tcp::FLAGS_OFFSET]
            && t[tcp::FLAGS_OFFSET + 1..tcp::CHECKSUM_OFFSET] == t0[tcp::FLAGS_OFFSET + 1..tcp::CHECKSUM_OFFSET]
            && t[tcp::HEADER_LEN..] == t0[tcp::HEADER_LEN..]
            && be32(&t[tcp::SEQ_OFFSET..]) == next_seq
            && len.wrapping_sub(1) < mss
            && ip_len + len <= MAX_IP_LEN;
        if !network_ok || !tcp_ok {
            break;
        }
        count += 1;
        payload_len += len;
        ip_len += len;
        next_seq = next_seq.wrapping_add(len as u32);
        if fl & flags::PSH != 0 || len < mss {
            psh = fl & flags::PSH != 0;
            break;
        }
    }
    (count > 1).then_some(TunnelRun { count, payload_at: tunnel_header + hdr_end, mss, payload_len, psh })
}

/// Turn `head`, the first segment of a [`tunnel_run`] as the pipeline left it (an inner Ethernet
/// frame, decapsulated, MSS `mss` bytes of TCP payload), into the headers of the run's
/// super-packet: `extra` more payload bytes follow it (the other segments' payloads, written
/// behind it), PSH set when `psh`. Returns the virtio-net header to write in front (`NEEDS_CSUM`,
/// the GSO type, `gso_size` = `mss`, the ECN bit when the head has CWR). `None`, `head` untouched,
/// when the head is not TCP over IPv4 (no options) or IPv6 (no extension headers) with exactly
/// `mss` payload bytes, or the super-packet would exceed [`MAX_IP_LEN`].
pub fn super_packet_head(head: &mut [u8], mss: usize, extra: usize, psh: bool) -> Option<VirtioNetHdr> {
    let eth = EthernetFrame::new_checked(&*head).ok()?;
    let l3 = eth.header_len();
    let (v4, l4) = match eth.ethertype() {
        ethertype::IPV4 => {
            let p = Ipv4Packet::new_checked(&head[l3..]).ok()?;
            let ok = p.protocol() == protocol::TCP && !p.is_fragment() && p.header_len() == ipv4::HEADER_LEN;
            (ok && usize::from(p.total_len()) == head.len() - l3).then_some((true, l3 + ipv4::HEADER_LEN))?
        }
        ethertype::IPV6 => {
            let p = Ipv6Packet::new_checked(&head[l3..]).ok()?;
            let ok = p.next_header() == protocol::TCP;
            (ok && ipv6::HEADER_LEN + usize::from(p.payload_len()) == head.len() - l3)
                .then_some((false, l3 + ipv6::HEADER_LEN))?
        }
        _ => return None,
    };
    let thlen = usize::from(*head.get(l4 + tcp::DATA_OFFSET_OFFSET)? >> 4) * 4;
    let hdr_end = l4 + thlen;
    if thlen < tcp::HEADER_LEN || hdr_end + mss != head.len() || mss == 0 || head.len() - l3 + extra > MAX_IP_LEN {
        return None;
    }
    if psh {
        head[l4 + tcp::FLAGS_OFFSET] |= flags::PSH;
    }
    let len = head.len() + extra;
    Some(super_fields_len(head, len, v4, l3, l4, hdr_end, mss))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Parse a frame as TCP over IPv4/IPv6; `None` for anything else (and for TCP whose ports cannot
/// be read: it cannot belong to a held flow either).
fn parse(frame: &[u8]) -> Option<Seg> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let l3 = eth.header_len();
    let ip = &frame[l3..];
    let (v4, l4, ip_end, header_ok) = match eth.ethertype() {
        ethertype::IPV4 => {
            let p = Ipv4Packet::new_checked(ip).ok()?;
            if p.protocol() != protocol::TCP || p.is_fragment() {
                return None;
            }
            let ok = p.header_len() == ipv4::HEADER_LEN;
            (
                true,
                l3 + p.header_len(),
                l3 + usize::from(p.total_len()),
                if ok { Some(p.verify_checksum()) } else { None },
            )
        }
        ethertype::IPV6 => {
            let p = Ipv6Packet::new_checked(ip).ok()?;
            if p.next_header() != protocol::TCP {
                return None;
            }
            (false, l3 + ipv6::HEADER_LEN, l3 + ipv6::HEADER_LEN + usize::from(p.payload_len()), Some(true))
        }
        _ => return None,
    };
    let t = frame.get(l4..ip_end)?;
    if t.len() < 4 {
        return None;
    }
    let lo = if v4 { be32(&ip[16..20]) } else { be32(&ip[36..40]) };
    let key = (u64::from(be32(t)) << 32) | u64::from(lo);
    let thlen = t.get(tcp::DATA_OFFSET_OFFSET).map_or(0, |d| usize::from(d >> 4) * 4);
    let shape_ok = header_ok.is_some() && ip_end == frame.len() && thlen >= tcp::HEADER_LEN && thlen <= t.len();
    let mut bad_checksum = header_ok == Some(false);
    if shape_ok && !bad_checksum {
        let pseudo = if v4 {
            checksum::sum(&ip[12..20]) + u32::from(protocol::TCP) + t.len() as u32
        } else {
            checksum::sum(&ip[8..40]) + u32::from(protocol::TCP) + t.len() as u32
        };
        bad_checksum = !checksum::verifies(pseudo, t);
    }
    Some(Seg { v4, l3, l4, hdr_end: l4 + thlen, key, candidate: shape_ok && !bad_checksum, bad_checksum })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn seg(
        seq: u32,
        payload: usize,
        id: u16,
        f: impl Fn(
            etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ip(etherparse::IpHeaders::Ipv4(
                {
                    let mut h =
                        etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, [10, 0, 0, 1], [10, 0, 0, 2])
                            .expect("hdr");
                    h.identification = id;
                    h.dont_fragment = true;
                    h
                },
                Default::default(),
            ))
            .tcp(1000, 2000, seq, 500)
            .ack(9);
        let mut out = Vec::new();
        f(b).write(&mut out, &vec![0x42; payload]).expect("build");
        out
    }

    fn run_frames(frames: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>, u16)> {
        run(frames)
    }

    fn run(frames: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>, u16)> {
        let mut c = Coalescer::new(vec![0u8; storage_len(2)]).expect("room");
        let mut out = Vec::new();
        let mut emit = |o: Output<'_>| out.push((o.vnet, o.frame.to_vec(), o.segments));
        for f in frames {
            c.push(f, &mut emit);
        }
        c.flush(&mut emit);
        out
    }

    #[test]
    fn contiguous_segments_merge_and_psh_ends_the_run() {
        let a = seg(100, 1000, 7, |b| b);
        let b = seg(1100, 1000, 8, |b| b);
        let c = seg(2100, 500, 9, |b| b.psh());
        let d = seg(2600, 1000, 10, |b| b);
        let out = run(&[a, b, c, d.clone()]);
        assert_eq!(out.len(), 2);
        let (v, f, n) = &out[0];
        assert_eq!(
            (n, v.gso, v.gso_size, v.needs_csum, v.csum_start, v.csum_offset),
            (&3, Gso::TcpV4, 1000, true, 34, 16)
        );
        assert_eq!(f.len(), 54 + 2500);
        assert_eq!(f[47] & flags::PSH, flags::PSH);
        // The checksum field holds the pseudo-header sum: completing it gives a valid packet.
        let mut done = f.clone();
        assert_eq!(crate::offload::complete_checksum(&mut done), Ok(crate::offload::ChecksumFix::Completed));
        assert!(Ipv4Packet::new_checked(&done[14..]).expect("ip").verify_checksum());
        assert_eq!((out[1].0.data_valid, &out[1].1, out[1].2), (true, &d, 1));
    }

    #[test]
    fn gaps_and_ip_id_jumps_and_cwr_do_not_merge() {
        let a = seg(100, 1000, 7, |b| b);
        let gap = seg(1200, 1000, 8, |b| b);
        assert_eq!(run(&[a.clone(), gap]).len(), 2);
        let jump = seg(1100, 1000, 9, |b| b);
        assert_eq!(run(&[a.clone(), jump]).len(), 2);
        let fixed = seg(1100, 1000, 7, |b| b);
        assert_eq!(run(&[a.clone(), fixed]).len(), 1, "DF with a fixed ID merges");
        let cwr = seg(1100, 1000, 8, |b| b.cwr());
        let after = seg(2100, 1000, 9, |b| b);
        let out = run(&[a.clone(), cwr, after]);
        assert_eq!(out.iter().map(|o| o.2).collect::<Vec<_>>(), [1, 2]);
        assert!(out[1].0.ecn, "a run that starts with CWR is flagged ECN");
        let longer = seg(1100, 1001, 8, |b| b);
        assert_eq!(run(&[a.clone(), longer]).len(), 2);
        let mut bad = seg(1100, 1000, 8, |b| b);
        bad[60] ^= 1;
        let out = run(&[a, bad]);
        assert_eq!(out.len(), 2);
        assert!(!out[1].0.data_valid);
    }

    /// VXLAN datagrams back to back: an 8-byte tunnel header in front of each frame.
    fn datagrams(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 42, 0]);
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn a_run_of_tunnel_datagrams_gives_the_coalescers_super_packet() {
        let frames = [
            seg(100, 1000, 7, |b| b),
            seg(1100, 1000, 8, |b| b),
            seg(2100, 1000, 9, |b| b),
            seg(3100, 400, 10, |b| b.psh()),
        ];
        let buf = datagrams(&frames);
        let run = tunnel_run(&buf, 8 + frames[0].len(), 8).expect("a run");
        assert_eq!(run, TunnelRun { count: 4, payload_at: 8 + 54, mss: 1000, payload_len: 3400, psh: true });
        // The head's headers made the super-packet's, the other payloads behind: byte for byte
        // what the coalescer makes of the same segments, with the same virtio-net header.
        let mut head = frames[0].clone();
        let vnet = super_packet_head(&mut head, run.mss, run.payload_len - run.mss, run.psh).expect("head");
        for f in &frames[1..] {
            head.extend_from_slice(&f[54..]);
        }
        let want = run_frames(&frames);
        assert_eq!(want.len(), 1);
        assert_eq!((vnet, &head), (want[0].0, &want[0].1));
        let mut done = head.clone();
        assert_eq!(crate::offload::complete_checksum(&mut done), Ok(crate::offload::ChecksumFix::Completed));
        let sliced = etherparse::SlicedPacket::from_ethernet(&done).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else { panic!("IPv4") };
        let Some(etherparse::TransportSlice::Tcp(t)) = &sliced.transport else { panic!("TCP") };
        let (src, dst) = (ip.header().source(), ip.header().destination());
        assert_eq!(t.checksum(), t.calc_checksum_ipv4(src, dst).expect("sum"), "etherparse agrees");
        assert_eq!(ip.header().header_checksum(), ip.header().to_header().calc_header_checksum());
    }

    #[test]
    fn a_run_stops_at_another_flow_a_fin_a_hole_a_bad_checksum_or_cwr() {
        let a = seg(100, 1000, 7, |b| b);
        let b = seg(1100, 1000, 8, |b| b);
        let stride = 8 + a.len();
        let count = |frames: &[Vec<u8>]| tunnel_run(&datagrams(frames), stride, 8).map(|r| r.count);
        let mut other = seg(2100, 1000, 9, |b| b);
        other[34..36].copy_from_slice(&1001u16.to_be_bytes());
        let fix = |mut f: Vec<u8>| {
            f[50..52].fill(0);
            let pseudo = checksum::sum(&f[26..34]) + u32::from(protocol::TCP) + (f.len() - 34) as u32;
            let c = !checksum::finish_sum(pseudo + checksum::sum(&f[34..]));
            f[50..52].copy_from_slice(&c.to_be_bytes());
            f
        };
        let other = fix(other);
        assert_eq!(count(&[a.clone(), b.clone(), other]), Some(2), "another flow (port) ends it");
        assert_eq!(count(&[a.clone(), b.clone(), seg(2100, 1000, 9, |b| b.fin())]), Some(2), "a FIN is not in it");
        assert_eq!(count(&[a.clone(), b.clone(), seg(3100, 1000, 9, |b| b)]), Some(2), "a hole ends it");
        assert_eq!(count(&[a.clone(), seg(2100, 1000, 8, |b| b)]), None, "a hole after the first");
        assert_eq!(count(&[a.clone(), seg(1100, 1000, 8, |b| b.cwr())]), None, "CWR only on the first");
        assert_eq!(count(&[seg(100, 1000, 7, |b| b.cwr()), b.clone()]), Some(2), "CWR on the first");
        assert_eq!(count(&[seg(100, 1000, 7, |b| b.psh()), b.clone()]), None, "PSH on the first");
        assert_eq!(count(&[seg(100, 1000, 7, |b| b.fin()), b.clone()]), None, "FIN on the first");
        assert_eq!(count(&[a.clone(), seg(1100, 1000, 9, |b| b)]), None, "an IPv4 ID jump");
        let mut bad = b.clone();
        bad[60] ^= 1;
        assert_eq!(count(&[a.clone(), bad]), None, "a bad checksum");
        let mut tunnel = datagrams(&[a.clone(), b.clone()]);
        tunnel[stride + 6] = 43;
        assert_eq!(tunnel_run(&tunnel, stride, 8), None, "another VNI");
        assert_eq!(count(&[a.clone(), b.clone(), seg(2100, 1000, 9, |b| b)]), Some(3));
        assert_eq!(count(std::slice::from_ref(&a)), None, "one datagram");
    }
}
