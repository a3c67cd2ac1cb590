//! ICMP and ICMPv6 error messages toward the inner source (hot path, called rarely), and a token
//! bucket to rate limit them.
//!
//! The data plane calls [`build_error`] when a pod's packet cannot be forwarded: too big for the
//! tunnel (IPv4 "fragmentation needed" with the next-hop MTU, RFC 1191; ICMPv6 "packet too big",
//! RFC 8201) or TTL/hop limit exhausted ("time exceeded"). The message goes back out of the port the
//! packet came in on, from the pod gateway. Headers are built with etherparse's types.
//!
//! Rate limiting is the caller's (it owns the clock): [`RateLimiter::allow`] takes the time, so a
//! worker keeps one limiter per port and asks it before building.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::icmpv4::{DestUnreachableHeader, TimeExceededCode};
use etherparse::icmpv6::{DestUnreachableCode as DestUnreachableCode6, TimeExceededCode as TimeExceededCode6};
use etherparse::{Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpNumber, Ipv4Header, Ipv6Header};

use crate::wire::ethernet::{EthernetFrame, EthernetRepr, MacAddr, ethertype};
use crate::wire::ipv4::{Ipv4Packet, protocol};
use crate::wire::ipv6::Ipv6Packet;

/// RFC 1812 section 4.3.2.3: an ICMPv4 error is at most 576 bytes.
pub const ICMPV4_MAX_LEN: usize = 576;
/// RFC 4443 section 2.4(c): an ICMPv6 error does not exceed the minimum IPv6 MTU.
pub const ICMPV6_MAX_LEN: usize = 1280;
/// Bytes an error frame can take, Ethernet header and tag included: size output buffers by this.
pub const MAX_ERROR_FRAME_LEN: usize = 18 + ICMPV6_MAX_LEN;

/// Which error to send; the family follows the offending packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// Packet too big for the path: IPv4 type 3 code 4 with the next-hop MTU, ICMPv6 type 2.
    TooBig {
        /// The MTU the sender should use (of the inner IP packet).
        mtu: u16,
    },
    /// TTL or hop limit reached zero in transit: IPv4 type 11 code 0, ICMPv6 type 3 code 0.
    TimeExceeded,
    /// Nothing listens on the destination port (a service without endpoints): IPv4 type 3 code 3,
    /// ICMPv6 type 1 code 4.
    PortUnreachable,
}

/// The address the error comes from: the pod gateway as the pod sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorSource {
    /// Gateway MAC.
    pub mac: MacAddr,
    /// Gateway IPv4 address, needed for errors about IPv4 packets.
    pub ipv4: Option<Ipv4Addr>,
    /// Gateway IPv6 address, needed for errors about IPv6 packets.
    pub ipv6: Option<Ipv6Addr>,
}

/// Why no error message was built. None of these is a fault: the RFCs forbid an error in these
/// cases, or the caller's buffer or configuration does not allow one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppressed {
    /// The offending frame is not a well-formed IPv4/IPv6 packet.
    Malformed,
    /// It is itself an ICMP error (or an ICMPv4 message whose type cannot be told).
    AboutIcmpError,
    /// A non-initial fragment.
    LaterFragment,
    /// Its source cannot receive an error (unspecified, multicast, broadcast, loopback).
    BadSource,
    /// Its destination is multicast or broadcast (only "packet too big" may answer those, in IPv6).
    MulticastDestination,
    /// The gateway has no address in the packet's family.
    NoSourceAddress,
    /// The output buffer is smaller than the message.
    BufferTooSmall,
}

/// Build an Ethernet frame carrying `error` about `offending` (an Ethernet frame from a pod) into
/// `out`, and return its length.
///
/// The frame goes to the offending frame's source MAC, from `from`; it quotes as much of the
/// offending IP packet as the RFC size limits allow.
///
/// # Errors
/// [`Suppressed`] when no error may or can be sent.
pub fn build_error(
    error: IcmpError,
    offending: &[u8],
    from: &ErrorSource,
    out: &mut [u8],
) -> Result<usize, Suppressed> {
    let eth = EthernetFrame::new_checked(offending).map_err(|_| Suppressed::Malformed)?;
    let off = eth.header_len();
    let reply_eth = |et| EthernetRepr { dst: eth.src(), src: from.mac, vlan: eth.vlan(), ethertype: et };
    match eth.ethertype() {
        ethertype::IPV4 => {
            let ip = Ipv4Packet::new_checked(&offending[off..]).map_err(|_| Suppressed::Malformed)?;
            let src = from.ipv4.ok_or(Suppressed::NoSourceAddress)?;
            check_v4(&ip)?;
            let icmp_type = match error {
                IcmpError::TooBig { mtu } => {
                    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu })
                }
                IcmpError::TimeExceeded => Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
                IcmpError::PortUnreachable => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
            };
            let quoted = &offending[off..off + usize::from(ip.total_len())];
            let quoted = &quoted[..quoted.len().min(ICMPV4_MAX_LEN - 20 - 8)];
            let icmp = Icmpv4Header::with_checksum(icmp_type, quoted);
            let icmp_len = icmp.header_len() + quoted.len();
            let mut ip4 = Ipv4Header::new(icmp_len as u16, 64, IpNumber::ICMP, src.octets(), ip.src().octets())
                .map_err(|_| Suppressed::BufferTooSmall)?;
            // Internetwork control, as Linux marks its ICMP errors.
            ip4.dscp = etherparse::IpDscp::try_new(0x30).map_err(|_| Suppressed::Malformed)?;
            ip4.header_checksum = ip4.calc_header_checksum();
            let e = reply_eth(ethertype::IPV4);
            let total = e.header_len() + ip4.header_len() + icmp_len;
            let buf = out.get_mut(..total).ok_or(Suppressed::BufferTooSmall)?;
            e.emit(buf);
            let mut at = e.header_len();
            for part in [&ip4.to_bytes()[..], &icmp.to_bytes()[..], quoted] {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            Ok(total)
        }
        ethertype::IPV6 => {
            let ip = Ipv6Packet::new_checked(&offending[off..]).map_err(|_| Suppressed::Malformed)?;
            let src = from.ipv6.ok_or(Suppressed::NoSourceAddress)?;
            check_v6(&ip, matches!(error, IcmpError::TooBig { .. }))?;
            let icmp_type = match error {
                IcmpError::TooBig { mtu } => Icmpv6Type::PacketTooBig { mtu: u32::from(mtu) },
                IcmpError::TimeExceeded => Icmpv6Type::TimeExceeded(TimeExceededCode6::HopLimitExceeded),
                IcmpError::PortUnreachable => Icmpv6Type::DestinationUnreachable(DestUnreachableCode6::Port),
            };
            let quoted = &offending[off..off + crate::wire::ipv6::HEADER_LEN + usize::from(ip.payload_len())];
            let quoted = &quoted[..quoted.len().min(ICMPV6_MAX_LEN - 40 - 8)];
            let dst = ip.src();
            let icmp = Icmpv6Header::with_checksum(icmp_type, src.octets(), dst.octets(), quoted)
                .map_err(|_| Suppressed::BufferTooSmall)?;
            let icmp_len = icmp.header_len() + quoted.len();
            let ip6 = Ipv6Header {
                traffic_class: 0xc0,
                flow_label: Default::default(),
                payload_length: icmp_len as u16,
                next_header: IpNumber::IPV6_ICMP,
                hop_limit: 255,
                source: src.octets(),
                destination: dst.octets(),
            };
            let e = reply_eth(ethertype::IPV6);
            let total = e.header_len() + Ipv6Header::LEN + icmp_len;
            let buf = out.get_mut(..total).ok_or(Suppressed::BufferTooSmall)?;
            e.emit(buf);
            let mut at = e.header_len();
            for part in [&ip6.to_bytes()[..], &icmp.to_bytes()[..], quoted] {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            Ok(total)
        }
        _ => Err(Suppressed::Malformed),
    }
}

/// RFC 1122 section 3.2.2 and RFC 1812 section 4.3.2.7: when an ICMPv4 error must not be sent.
fn check_v4<T: AsRef<[u8]>>(ip: &Ipv4Packet<T>) -> Result<(), Suppressed> {
    if ip.is_later_fragment() {
        return Err(Suppressed::LaterFragment);
    }
    let (s, d) = (ip.src(), ip.dst());
    if s.is_unspecified() || s.is_multicast() || s.is_broadcast() || s.is_loopback() {
        return Err(Suppressed::BadSource);
    }
    if d.is_multicast() || d.is_broadcast() {
        return Err(Suppressed::MulticastDestination);
    }
    if ip.protocol() == protocol::ICMP {
        // Only query messages (echo, timestamp, ...) may draw an error; their types are known.
        let t = ip.payload().first().copied().ok_or(Suppressed::AboutIcmpError)?;
        if !matches!(t, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) {
            return Err(Suppressed::AboutIcmpError);
        }
    }
    Ok(())
}

/// RFC 4443 section 2.4(e): when an ICMPv6 error must not be sent.
fn check_v6<T: AsRef<[u8]>>(ip: &Ipv6Packet<T>, too_big: bool) -> Result<(), Suppressed> {
    let (s, d) = (ip.src(), ip.dst());
    if s.is_unspecified() || s.is_multicast() || s.is_loopback() {
        return Err(Suppressed::BadSource);
    }
    // "Packet too big" is the one error that may answer a multicast destination (2.4(e.3)).
    if d.is_multicast() && !too_big {
        return Err(Suppressed::MulticastDestination);
    }
    let ul = ip.upper_layer().map_err(|_| Suppressed::Malformed)?;
    if ul.protocol == protocol::ICMPV6 {
        let t = ip.payload().get(ul.offset - crate::wire::ipv6::HEADER_LEN).copied();
        // Types below 128 are errors (RFC 4443 section 2.1).
        if t.is_none_or(|t| t < 128) {
            return Err(Suppressed::AboutIcmpError);
        }
    }
    Ok(())
}

/// A token bucket: `rate` messages per second on average, bursts of up to `burst`.
///
/// Time comes from the caller in nanoseconds from any fixed origin, so the bucket does no I/O and
/// tests can drive it.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate_per_sec: u64,
    burst: u64,
    /// Tokens scaled by 1e9, so that refill needs no division per call.
    tokens_ns: u64,
    last_ns: u64,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled at `rate_per_sec`.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let burst = u64::from(burst.max(1));
        RateLimiter { rate_per_sec: u64::from(rate_per_sec), burst, tokens_ns: burst * 1_000_000_000, last_ns: 0 }
    }

    /// Take one token if there is one at time `now_ns`.
    pub fn allow(&mut self, now_ns: u64) -> bool {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let cap = self.burst * 1_000_000_000;
        self.tokens_ns = self.tokens_ns.saturating_add(elapsed.saturating_mul(self.rate_per_sec)).min(cap);
        if self.tokens_ns >= 1_000_000_000 {
            self.tokens_ns -= 1_000_000_000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    const GW: ErrorSource = ErrorSource {
        mac: MacAddr([0x02, 0xfe, 0, 0, 0, 1]),
        ipv4: Some(Ipv4Addr::new(10, 244, 1, 1)),
        ipv6: Some(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1)),
    };
    const POD_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 5];

    fn udp4(dst: [u8; 4], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, GW.mac.0)
            .ipv4([10, 244, 1, 5], dst, 64)
            .udp(1000, 2000)
            .write(&mut out, &vec![0xab; len])
            .expect("build");
        out
    }

    fn udp6(dst: [u8; 16], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let src = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 5).octets();
        PacketBuilder::ethernet2(POD_MAC, GW.mac.0)
            .ipv6(src, dst, 64)
            .udp(1000, 2000)
            .write(&mut out, &vec![0xab; len])
            .expect("build");
        out
    }

    #[test]
    fn fragmentation_needed_quotes_within_576_bytes() {
        let offending = udp4([10, 244, 2, 9], 1400);
        let mut out = [0u8; MAX_ERROR_FRAME_LEN];
        let n = build_error(IcmpError::TooBig { mtu: 1450 }, &offending, &GW, &mut out).expect("built");
        assert_eq!(n, 14 + ICMPV4_MAX_LEN);
        let p = SlicedPacket::from_ethernet(&out[..n]).expect("parses");
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link else { panic!("ethernet") };
        assert_eq!((eth.destination(), eth.source()), (POD_MAC, GW.mac.0));
        let Some(NetSlice::Ipv4(ip)) = p.net else { panic!("ipv4") };
        assert_eq!(ip.header().source(), [10, 244, 1, 1]);
        assert_eq!(ip.header().destination(), [10, 244, 1, 5]);
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let Some(TransportSlice::Icmpv4(icmp)) = p.transport else { panic!("icmp") };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1450 })
        );
        assert_eq!(icmp.checksum(), icmp.header().icmp_type.calc_checksum(icmp.payload()));
        assert_eq!(icmp.payload(), &offending[14..14 + 548], "quotes the offending IP packet");
    }

    #[test]
    fn packet_too_big_and_time_exceeded_v6() {
        let offending = udp6([0xfd; 16], 1500);
        let mut out = [0u8; MAX_ERROR_FRAME_LEN];
        let n = build_error(IcmpError::TooBig { mtu: 1430 }, &offending, &GW, &mut out).expect("built");
        assert_eq!(n, 14 + ICMPV6_MAX_LEN);
        let p = SlicedPacket::from_ethernet(&out[..n]).expect("parses");
        let Some(NetSlice::Ipv6(ip)) = p.net else { panic!("ipv6") };
        let (s, d) = (ip.header().source(), ip.header().destination());
        assert_eq!(d, Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 5).octets());
        let Some(TransportSlice::Icmpv6(icmp)) = p.transport else { panic!("icmpv6") };
        assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1430 });
        assert_eq!(Ok(icmp.checksum()), icmp.icmp_type().calc_checksum(s, d, icmp.payload()));
        let mut out = [0u8; MAX_ERROR_FRAME_LEN];
        // Multicast destinations may get "packet too big" but not "time exceeded".
        let mcast = udp6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets(), 10);
        assert!(build_error(IcmpError::TooBig { mtu: 1280 }, &mcast, &GW, &mut out).is_ok());
        assert_eq!(build_error(IcmpError::TimeExceeded, &mcast, &GW, &mut out), Err(Suppressed::MulticastDestination));
        let n = build_error(IcmpError::TimeExceeded, &udp6([0xfd; 16], 10), &GW, &mut out).expect("built");
        let p = SlicedPacket::from_ethernet(&out[..n]).expect("parses");
        let Some(TransportSlice::Icmpv6(icmp)) = p.transport else { panic!("icmpv6") };
        assert_eq!(icmp.icmp_type(), Icmpv6Type::TimeExceeded(TimeExceededCode6::HopLimitExceeded));
    }

    #[test]
    fn time_exceeded_v4() {
        let mut out = [0u8; 200];
        let offending = udp4([10, 244, 2, 9], 20);
        let n = build_error(IcmpError::TimeExceeded, &offending, &GW, &mut out).expect("built");
        assert_eq!(n, 14 + 20 + 8 + offending.len() - 14);
        let p = SlicedPacket::from_ethernet(&out[..n]).expect("parses");
        let Some(TransportSlice::Icmpv4(icmp)) = p.transport else { panic!("icmp") };
        assert_eq!(icmp.icmp_type(), Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit));
    }

    #[test]
    fn suppressed_where_the_rfcs_forbid() {
        let mut out = [0u8; MAX_ERROR_FRAME_LEN];
        let e = IcmpError::TooBig { mtu: 1400 };
        assert_eq!(build_error(e, &udp4([224, 0, 0, 1], 10), &GW, &mut out), Err(Suppressed::MulticastDestination));
        assert_eq!(
            build_error(e, &udp4([255, 255, 255, 255], 10), &GW, &mut out),
            Err(Suppressed::MulticastDestination)
        );
        let mut bad_src = udp4([10, 0, 0, 1], 10);
        bad_src[26..30].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(build_error(e, &bad_src, &GW, &mut out), Err(Suppressed::BadSource));
        let mut frag = udp4([10, 0, 0, 1], 10);
        frag[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
        assert_eq!(build_error(e, &frag, &GW, &mut out), Err(Suppressed::LaterFragment));
        // An ICMP error about an ICMP error: never.
        let mut about_error = [0u8; 200];
        let n = build_error(IcmpError::TimeExceeded, &udp4([10, 0, 0, 1], 10), &GW, &mut about_error).expect("built");
        let mut turned = about_error[..n].to_vec();
        turned[6..12].copy_from_slice(&POD_MAC); // as if it came from a pod
        assert_eq!(build_error(e, &turned, &GW, &mut out), Err(Suppressed::AboutIcmpError));
        let no_v4 = ErrorSource { ipv4: None, ..GW };
        assert_eq!(build_error(e, &udp4([10, 0, 0, 1], 10), &no_v4, &mut out), Err(Suppressed::NoSourceAddress));
        assert_eq!(build_error(e, &udp4([10, 0, 0, 1], 10), &GW, &mut out[..40]), Err(Suppressed::BufferTooSmall));
        assert_eq!(build_error(e, &[0u8; 10], &GW, &mut out), Err(Suppressed::Malformed));
    }

    #[test]
    fn rate_limiter_bursts_then_refills() {
        let mut r = RateLimiter::new(10, 3);
        let t0 = 5_000_000_000;
        assert!((0..3).all(|_| r.allow(t0)));
        assert!(!r.allow(t0));
        assert!(!r.allow(t0 + 50_000_000), "half a token after 50 ms at 10/s");
        assert!(r.allow(t0 + 100_000_000));
        assert!(!r.allow(t0 + 100_000_000));
        // A long pause refills only up to the burst.
        let later = t0 + 60_000_000_000;
        assert_eq!((0..10).filter(|_| r.allow(later)).count(), 3);
    }
}
