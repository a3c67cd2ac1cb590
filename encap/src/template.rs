//! Outer-header templates, built once per remote node by the control side (setup, not hot path).
//!
//! A template holds the exact outer bytes — Ethernet (optionally tagged), IPv4 or IPv6, UDP, and
//! the VXLAN or Geneve header with its options — plus the precomputed sums that let the worker
//! finish each copy with a few additions (VPP's `vxlan_rewrite`). See [`crate::encap`] for the
//! per-packet half.

use std::net::IpAddr;

use crate::checksum;
use crate::ecn::EcnMode;
use crate::wire::ethernet::{self, EthernetRepr, MacAddr, ethertype};
use crate::wire::geneve::{self, GeneveHeader, GeneveOption};
use crate::wire::ipv4::{self, Ipv4Repr, protocol};
use crate::wire::ipv6::{self, Ipv6Repr};
use crate::wire::{udp, vxlan};

/// Largest outer header: tagged Ethernet, IPv6, UDP, Geneve with the most options.
pub const MAX_OUTER_LEN: usize = ethernet::HEADER_LEN
    + ethernet::VLAN_TAG_LEN
    + ipv6::HEADER_LEN
    + udp::HEADER_LEN
    + geneve::HEADER_LEN
    + geneve::MAX_OPTIONS_LEN;

/// Tunnel encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelKind {
    /// VXLAN, RFC 7348.
    Vxlan,
    /// Geneve, RFC 8926.
    Geneve,
}

impl TunnelKind {
    /// The IANA port: 4789 for VXLAN, 6081 for Geneve. (Flannel uses 8472 for VXLAN.)
    pub const fn default_port(self) -> u16 {
        match self {
            TunnelKind::Vxlan => vxlan::DEFAULT_PORT,
            TunnelKind::Geneve => geneve::DEFAULT_PORT,
        }
    }

    /// Lower-case name, as in configuration.
    pub const fn name(self) -> &'static str {
        match self {
            TunnelKind::Vxlan => "vxlan",
            TunnelKind::Geneve => "geneve",
        }
    }
}

/// How the outer DSCP is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dscp {
    /// Copy the inner packet's DSCP (non-IP inner frames get 0).
    #[default]
    Inherit,
    /// Always this 6-bit value.
    Fixed(u8),
}

/// Everything that defines the outer headers toward one remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateParams<'a> {
    /// VXLAN or Geneve.
    pub kind: TunnelKind,
    /// 24-bit virtual network identifier.
    pub vni: u32,
    /// This node's underlay MAC.
    pub src_mac: MacAddr,
    /// The next hop's MAC on the underlay.
    pub dst_mac: MacAddr,
    /// An 802.1Q tag on the underlay, if any.
    pub vlan: Option<u16>,
    /// This node's underlay address.
    pub src_ip: IpAddr,
    /// The remote node's underlay address (same family as `src_ip`).
    pub dst_ip: IpAddr,
    /// UDP destination port.
    pub dst_port: u16,
    /// Outer TTL / hop limit.
    pub ttl: u8,
    /// Outer DSCP policy.
    pub dscp: Dscp,
    /// Outer ECN policy (RFC 6040).
    pub ecn: EcnMode,
    /// Send a zero UDP checksum over an IPv6 underlay (RFC 6935/6936). Over IPv4 it is always zero.
    pub ipv6_zero_udp_checksum: bool,
    /// Geneve options carried on every packet (ignored for VXLAN).
    pub geneve_options: &'a [GeneveOption<'a>],
}

impl<'a> TemplateParams<'a> {
    /// Parameters with the defaults: the IANA port for `kind`, TTL 64, DSCP inherited, ECN normal
    /// mode, computed UDP checksum over IPv6, no VLAN, no Geneve options.
    pub fn new(kind: TunnelKind, vni: u32, src_mac: MacAddr, dst_mac: MacAddr, src_ip: IpAddr, dst_ip: IpAddr) -> Self {
        TemplateParams {
            kind,
            vni,
            src_mac,
            dst_mac,
            vlan: None,
            src_ip,
            dst_ip,
            dst_port: kind.default_port(),
            ttl: 64,
            dscp: Dscp::Inherit,
            ecn: EcnMode::Normal,
            ipv6_zero_udp_checksum: false,
            geneve_options: &[],
        }
    }
}

/// Why a template cannot be built. Each variant names the parameter at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// VNI wider than 24 bits.
    #[error("vni {vni} does not fit in 24 bits (max 16777215)")]
    VniTooLarge {
        /// The VNI given.
        vni: u32,
    },
    /// Source and destination of different families.
    #[error("src_ip {src} and dst_ip {dst} are not of the same address family")]
    FamilyMismatch {
        /// Source address.
        src: IpAddr,
        /// Destination address.
        dst: IpAddr,
    },
    /// DSCP wider than 6 bits.
    #[error("dscp {dscp} does not fit in 6 bits (max 63)")]
    DscpTooLarge {
        /// The DSCP given.
        dscp: u8,
    },
    /// TTL zero would be dropped by the first router.
    #[error("ttl must be at least 1")]
    ZeroTtl,
    /// VLAN ID outside 1-4094.
    #[error("vlan {vlan} is outside 1-4094")]
    BadVlan {
        /// The VLAN given.
        vlan: u16,
    },
    /// Geneve option with data not a multiple of 4 bytes or longer than 124 bytes.
    #[error("geneve option class {class:#06x} type {kind:#04x}: data length {len} is not a multiple of 4 up to 124")]
    BadGeneveOption {
        /// Option class.
        class: u16,
        /// Option type.
        kind: u8,
        /// Data length given.
        len: usize,
    },
    /// Options longer than Geneve's 252 bytes.
    #[error("geneve options total {len} bytes, more than the 252 the header can announce")]
    GeneveOptionsTooLong {
        /// Total length.
        len: usize,
    },
    /// Port zero.
    #[error("dst_port must not be 0")]
    ZeroPort,
}

/// Underlay address family of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 underlay.
    V4,
    /// IPv6 underlay.
    V6,
}

/// Precomputed outer headers toward one remote node.
#[derive(Clone)]
pub struct TunnelTemplate {
    pub(crate) bytes: [u8; MAX_OUTER_LEN],
    pub(crate) len: usize,
    pub(crate) l3_offset: usize,
    pub(crate) l4_offset: usize,
    pub(crate) family: Family,
    /// IPv4: the header's ones'-complement sum with TOS, total length and checksum zeroed.
    /// IPv6: the pseudo-header sum without the length.
    pub(crate) base_sum: u32,
    pub(crate) fixed_tos: Option<u8>,
    pub(crate) ecn: EcnMode,
    pub(crate) udp_checksum: bool,
    kind: TunnelKind,
    vni: u32,
    dst_ip: IpAddr,
    dst_mac: MacAddr,
}

impl core::fmt::Debug for TunnelTemplate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TunnelTemplate")
            .field("kind", &self.kind)
            .field("vni", &self.vni)
            .field("dst_ip", &self.dst_ip)
            .field("dst_mac", &self.dst_mac)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl TunnelTemplate {
    /// Build the outer headers for `p`.
    ///
    /// # Errors
    /// A [`TemplateError`] naming the parameter at fault.
    pub fn new(p: &TemplateParams<'_>) -> Result<Self, TemplateError> {
        if p.vni > 0x00ff_ffff {
            return Err(TemplateError::VniTooLarge { vni: p.vni });
        }
        if p.ttl == 0 {
            return Err(TemplateError::ZeroTtl);
        }
        if p.dst_port == 0 {
            return Err(TemplateError::ZeroPort);
        }
        if let Some(vlan) = p.vlan
            && !(1..=4094).contains(&vlan)
        {
            return Err(TemplateError::BadVlan { vlan });
        }
        let fixed_tos = match p.dscp {
            Dscp::Inherit => None,
            Dscp::Fixed(d) if d > 63 => return Err(TemplateError::DscpTooLarge { dscp: d }),
            Dscp::Fixed(d) => Some(d << 2),
        };
        let family = match (p.src_ip, p.dst_ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) => Family::V4,
            (IpAddr::V6(_), IpAddr::V6(_)) => Family::V6,
            (src, dst) => return Err(TemplateError::FamilyMismatch { src, dst }),
        };
        let options = match p.kind {
            TunnelKind::Vxlan => &[][..],
            TunnelKind::Geneve => p.geneve_options,
        };
        let mut options_len = 0;
        for o in options {
            if !o.data.len().is_multiple_of(4) || o.data.len() > 124 {
                return Err(TemplateError::BadGeneveOption { class: o.class, kind: o.kind, len: o.data.len() });
            }
            options_len += o.wire_len();
        }
        if options_len > geneve::MAX_OPTIONS_LEN {
            return Err(TemplateError::GeneveOptionsTooLong { len: options_len });
        }

        let mut bytes = [0u8; MAX_OUTER_LEN];
        let eth = EthernetRepr {
            dst: p.dst_mac,
            src: p.src_mac,
            vlan: p.vlan,
            ethertype: if family == Family::V4 { ethertype::IPV4 } else { ethertype::IPV6 },
        };
        eth.emit(&mut bytes);
        let l3_offset = eth.header_len();
        let ip_len = if family == Family::V4 { ipv4::HEADER_LEN } else { ipv6::HEADER_LEN };
        let l4_offset = l3_offset + ip_len;
        let tunnel_len = match p.kind {
            TunnelKind::Vxlan => vxlan::HEADER_LEN,
            TunnelKind::Geneve => geneve::HEADER_LEN + options_len,
        };
        let len = l4_offset + udp::HEADER_LEN + tunnel_len;

        // IP header with TOS and length zero: the worker adds those per packet.
        let base_sum = match (p.src_ip, p.dst_ip) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let repr =
                    Ipv4Repr { src, dst, protocol: protocol::UDP, tos: 0, ttl: p.ttl, dont_frag: true, payload_len: 0 };
                let hdr = &mut bytes[l3_offset..l4_offset];
                repr.emit(hdr);
                hdr[2..4].fill(0);
                hdr[10..12].fill(0);
                checksum::sum(hdr)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let repr = Ipv6Repr {
                    src,
                    dst,
                    next_header: protocol::UDP,
                    traffic_class: 0,
                    flow_label: 0,
                    hop_limit: p.ttl,
                    payload_len: 0,
                };
                repr.emit(&mut bytes[l3_offset..l4_offset]);
                checksum::sum(&src.octets()) + checksum::sum(&dst.octets()) + u32::from(protocol::UDP)
            }
            _ => unreachable!("family checked above"),
        };

        udp::UdpRepr { src_port: 0, dst_port: p.dst_port, len: 0, checksum: 0 }.emit(&mut bytes[l4_offset..]);
        let t = l4_offset + udp::HEADER_LEN;
        match p.kind {
            TunnelKind::Vxlan => vxlan::VxlanRepr { vni: p.vni }.emit(&mut bytes[t..]),
            TunnelKind::Geneve => {
                let critical = options.iter().any(GeneveOption::is_critical);
                bytes[t..t + geneve::HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&GeneveHeader::new(
                    p.vni,
                    options_len,
                    critical,
                )));
                let mut at = t + geneve::HEADER_LEN;
                for o in options {
                    o.emit(&mut bytes[at..]);
                    at += o.wire_len();
                }
            }
        }

        Ok(TunnelTemplate {
            bytes,
            len,
            l3_offset,
            l4_offset,
            family,
            base_sum,
            fixed_tos,
            ecn: p.ecn,
            udp_checksum: family == Family::V6 && !p.ipv6_zero_udp_checksum,
            kind: p.kind,
            vni: p.vni,
            dst_ip: p.dst_ip,
            dst_mac: p.dst_mac,
        })
    }

    /// Bytes prepended to each inner frame: the whole outer header.
    pub fn overhead(&self) -> usize {
        self.len
    }

    /// Bytes the outer headers add to the inner frame as the underlay MTU counts them: everything
    /// but the outer Ethernet header. An inner IP packet of `mtu - ip_overhead() - 14` bytes fits
    /// an underlay MTU of `mtu`.
    pub fn ip_overhead(&self) -> usize {
        self.len - self.l3_offset
    }

    /// The template bytes (lengths, TOS, checksums and source port still zero).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Tunnel kind.
    pub fn kind(&self) -> TunnelKind {
        self.kind
    }

    /// VNI.
    pub fn vni(&self) -> u32 {
        self.vni
    }

    /// UDP destination port (the remote node's tunnel port).
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.bytes[self.l4_offset + 2], self.bytes[self.l4_offset + 3]])
    }

    /// Underlay family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Remote node's underlay address.
    pub fn remote(&self) -> IpAddr {
        self.dst_ip
    }

    /// Next hop MAC.
    pub fn next_hop_mac(&self) -> MacAddr {
        self.dst_mac
    }

    /// The tunnel header alone (VXLAN, or Geneve with its options): what follows the outer UDP
    /// header. A UDP socket sending tunnel datagrams (the kernel adds IP and UDP) starts each
    /// datagram with these bytes.
    pub fn tunnel_header(&self) -> &[u8] {
        &self.bytes[self.l4_offset + udp::HEADER_LEN..self.len]
    }

    /// The outer TOS / traffic class for an inner packet's `inner_tos`: the fixed or inherited
    /// DSCP and the ECN bits RFC 6040 gives the outer header.
    pub fn outer_tos(&self, inner_tos: u8) -> u8 {
        self.fixed_tos.unwrap_or(inner_tos & 0xfc) | crate::ecn::encap(self.ecn, inner_tos)
    }

    /// A copy with a new next-hop MAC (the neighbour changed); everything else, the sums included,
    /// stays valid because MACs are outside the IP header.
    pub fn with_next_hop_mac(&self, mac: MacAddr) -> Self {
        let mut t = self.clone();
        t.bytes[0..6].copy_from_slice(&mac.0);
        t.dst_mac = mac;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kind: TunnelKind, src: &str, dst: &str) -> TemplateParams<'static> {
        TemplateParams::new(
            kind,
            42,
            MacAddr([2, 0, 0, 0, 0, 1]),
            MacAddr([2, 0, 0, 0, 0, 2]),
            src.parse().expect("ip"),
            dst.parse().expect("ip"),
        )
    }

    #[test]
    fn sizes_by_kind_and_family() {
        let v4 = TunnelTemplate::new(&params(TunnelKind::Vxlan, "192.0.2.1", "192.0.2.2")).expect("ok");
        assert_eq!((v4.overhead(), v4.ip_overhead()), (50, 36));
        let v6 = TunnelTemplate::new(&params(TunnelKind::Geneve, "fd00::1", "fd00::2")).expect("ok");
        assert_eq!((v6.overhead(), v6.ip_overhead()), (70, 56));
        assert_eq!(v6.bytes()[l4_dst_port(&v6)], [0x17, 0xc1]);
        assert_eq!(v6.dst_port(), 6081);
    }

    fn l4_dst_port(t: &TunnelTemplate) -> core::ops::Range<usize> {
        t.l4_offset + 2..t.l4_offset + 4
    }

    #[test]
    fn errors_name_the_parameter() {
        let mut p = params(TunnelKind::Vxlan, "192.0.2.1", "fd00::2");
        assert!(matches!(TunnelTemplate::new(&p), Err(TemplateError::FamilyMismatch { .. })));
        p.dst_ip = "192.0.2.2".parse().expect("ip");
        p.vni = 1 << 24;
        assert_eq!(TunnelTemplate::new(&p).err(), Some(TemplateError::VniTooLarge { vni: 1 << 24 }));
        p.vni = 1;
        p.dscp = Dscp::Fixed(64);
        assert_eq!(TunnelTemplate::new(&p).err(), Some(TemplateError::DscpTooLarge { dscp: 64 }));
        p.dscp = Dscp::Inherit;
        p.ttl = 0;
        assert_eq!(TunnelTemplate::new(&p).err(), Some(TemplateError::ZeroTtl));
        p.ttl = 1;
        p.vlan = Some(4095);
        assert_eq!(TunnelTemplate::new(&p).err(), Some(TemplateError::BadVlan { vlan: 4095 }));
        p.vlan = None;
        p.kind = TunnelKind::Geneve;
        let bad = [GeneveOption { class: 1, kind: 2, data: &[1, 2, 3] }];
        p.geneve_options = &bad;
        assert!(matches!(TunnelTemplate::new(&p), Err(TemplateError::BadGeneveOption { len: 3, .. })));
        let msg = TunnelTemplate::new(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("geneve option class 0x0001"), "{msg}");
    }

    #[test]
    fn next_hop_change_only_touches_the_mac() {
        let t = TunnelTemplate::new(&params(TunnelKind::Vxlan, "192.0.2.1", "192.0.2.2")).expect("ok");
        let u = t.with_next_hop_mac(MacAddr([2, 0, 0, 0, 0, 9]));
        assert_eq!(u.bytes()[..6], [2, 0, 0, 0, 0, 9]);
        assert_eq!(u.bytes()[6..], t.bytes()[6..]);
    }
}
