//! Why a packet was dropped (hot path and control alike).
//!
//! [`DropReason`] is a `#[repr(u8)]` enum so that a worker can index a plain counter array with it
//! (`counters[reason as usize] += 1`) and the control side can sum those arrays and name each slot.
//! The list is written once, in [`drop_reasons!`], in the spirit of VPP's `vxlan_error.def`:
//! variant, metric name and a one-line description stay together.

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, $desc:literal; )+) => {
        /// The reason a frame was dropped. Every drop in ferry is counted under exactly one of these.
        ///
        /// The discriminants are dense from zero, so `reason as usize` indexes an array of
        /// [`DropReason::COUNT`] counters.
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason {
            $( $(#[$doc])* $variant, )+
        }

        impl DropReason {
            /// Every reason, in discriminant order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)+];
            /// Number of reasons: the length of a per-reason counter array.
            pub const COUNT: usize = Self::ALL.len();

            /// A stable `snake_case` name, used for metric labels and `ferry stats`.
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)+ }
            }

            /// A one-line human description.
            pub const fn description(self) -> &'static str {
                match self { $(DropReason::$variant => $desc,)+ }
            }

            /// The reason with this discriminant, if any.
            pub fn from_index(index: usize) -> Option<DropReason> {
                Self::ALL.get(index).copied()
            }
        }
    };
}

drop_reasons! {
    /// The frame ends before a header that its earlier headers announce.
    Truncated => "truncated", "frame shorter than its headers";
    /// More than one 802.1Q tag; ferry tolerates exactly one.
    VlanStacked => "vlan_stacked", "more than one VLAN tag";
    /// Neither IPv4 nor IPv6 where an IP packet is required.
    UnsupportedEtherType => "unsupported_ethertype", "not IPv4 or IPv6";
    /// IPv4 version field is not 4.
    Ipv4BadVersion => "ipv4_bad_version", "IPv4 version field is not 4";
    /// IPv4 IHL below 5 or beyond the buffer.
    Ipv4BadIhl => "ipv4_bad_ihl", "IPv4 header length out of range";
    /// IPv4 total length shorter than the header or longer than the frame.
    Ipv4BadTotalLength => "ipv4_bad_total_length", "IPv4 total length inconsistent with frame";
    /// IPv4 header checksum does not verify.
    Ipv4BadChecksum => "ipv4_bad_checksum", "IPv4 header checksum wrong";
    /// IPv6 version field is not 6.
    Ipv6BadVersion => "ipv6_bad_version", "IPv6 version field is not 6";
    /// IPv6 payload length longer than the frame (or a jumbogram).
    Ipv6BadPayloadLength => "ipv6_bad_payload_length", "IPv6 payload length inconsistent with frame";
    /// An IPv6 extension header chain that cannot be walked.
    Ipv6BadExtension => "ipv6_bad_extension", "malformed IPv6 extension header chain";
    /// An outer (underlay) IP fragment: tunnel packets are sent with DF and never reassembled.
    OuterFragment => "outer_fragment", "fragmented tunnel packet";
    /// The outer packet is not UDP.
    NotUdp => "not_udp", "outer packet is not UDP";
    /// UDP length field shorter than 8 or longer than the IP payload.
    UdpBadLength => "udp_bad_length", "UDP length inconsistent with packet";
    /// Non-zero outer UDP checksum that does not verify (only when verification is on).
    UdpBadChecksum => "udp_bad_checksum", "outer UDP checksum wrong";
    /// Outer destination address is not this node.
    NotForThisNode => "not_for_this_node", "outer destination is not this node";
    /// Outer UDP destination port is not the configured tunnel port.
    UdpPortMismatch => "udp_port_mismatch", "UDP port is not the tunnel port";
    /// VXLAN header without the I (valid VNI) flag.
    VxlanNoIFlag => "vxlan_no_i_flag", "VXLAN I flag clear";
    /// VNI is not the configured one.
    VniMismatch => "vni_mismatch", "VNI is not the configured one";
    /// Geneve version is not 0.
    GeneveBadVersion => "geneve_bad_version", "Geneve version is not 0";
    /// Geneve option length or an option TLV runs past the header.
    GeneveBadOptions => "geneve_bad_options", "malformed Geneve options";
    /// A Geneve option with the critical bit that ferry does not understand (RFC 8926 section 3.5).
    GeneveUnknownCritical => "geneve_unknown_critical", "unknown critical Geneve option";
    /// A Geneve control (O bit) packet: its payload must not be forwarded.
    GeneveOam => "geneve_oam", "Geneve control packet";
    /// Geneve protocol type other than Ethernet (0x6558).
    GeneveBadProtocol => "geneve_bad_protocol", "Geneve payload is not Ethernet";
    /// The decapsulated frame is shorter than an Ethernet header.
    InnerTooShort => "inner_too_short", "inner frame too short";
    /// RFC 6040: outer CE over an inner Not-ECT packet must be dropped.
    EcnCeOnNotEct => "ecn_ce_on_not_ect", "outer CE mark on a not-ECT inner packet";
    /// Not enough headroom in the buffer to prepend the outer headers.
    NoHeadroom => "no_headroom", "no headroom for outer headers";

    // Reasons the data plane's forwarding stages give (they need its tables to decide).

    /// A tunnel packet whose outer source is not a known node.
    UnknownSourceNode => "unknown_source_node", "tunnel packet from an unknown node";
    /// A decapsulated packet whose destination is not a pod on this node.
    NotLocalPod => "not_local_pod", "decapsulated packet not for a local pod";
    /// A pod sent with a source address it does not own (anti-spoofing).
    SpoofedSource => "spoofed_source", "pod used a source address it does not own";
    /// No route covers the destination.
    NoRoute => "no_route", "no route to destination";
    /// The route is a blackhole.
    Blackhole => "blackhole", "route is a blackhole";
    /// TTL or hop limit would reach zero (an ICMP time-exceeded is sent, rate limited).
    TtlExceeded => "ttl_exceeded", "TTL or hop limit exhausted";
    /// Too big for the tunnel with DF set, or IPv6 (an ICMP error with the MTU is sent, rate limited).
    TooBig => "too_big", "too big for the tunnel MTU";
    /// Too big for the tunnel, IPv4 without DF: ferry does not fragment.
    TooBigNoFragmentation => "too_big_no_fragmentation", "too big for the tunnel, DF clear; not fragmented";
    /// ARP that is not a request for the pod gateway's address.
    ArpNotForGateway => "arp_not_for_gateway", "ARP not asking for the gateway";
    /// IPv6 neighbour discovery or other ICMPv6 for the gateway that ferry does not answer.
    NdNotForGateway => "nd_not_for_gateway", "neighbour discovery not for the gateway";
    /// The remote node's underlay next hop has no MAC yet (its neighbour entry is being resolved).
    NoNeighbour => "no_neighbour", "underlay next hop not resolved yet";
    /// The egress port's transmit ring was full.
    TxRingFull => "tx_ring_full", "transmit ring full";
    /// A virtio-net header (tap with IFF_VNET_HDR) with unknown flags or GSO type, or a GSO packet
    /// without a segment size or without NEEDS_CSUM.
    VnetBadHeader => "vnet_bad_header", "malformed virtio-net header";
    /// virtio-net csum_start/csum_offset outside the frame, or not at the L4 checksum of a GSO packet.
    VnetBadChecksumOffset => "vnet_bad_checksum_offset", "virtio-net checksum offsets do not fit the packet";
    /// A GSO super-packet ferry cannot segment: its GSO type does not match its headers, or it is not
    /// TCP/UDP directly over IPv4/IPv6 (IPv6 extension headers, IPv4 fragments).
    GsoUnsupported => "gso_unsupported", "GSO packet ferry cannot segment";
    /// The buffer given for segments or super-packets is too small (a caller sizing error).
    GsoNoRoom => "gso_no_room", "no room for the segmented or coalesced packet";

    // Hardening (issue 18): frames a router must refuse.

    /// A tunnel packet whose outer destination MAC is not the uplink's: on another host's behalf
    /// (the kernel's `PACKET_OTHERHOST`, which XDP sees before the kernel drops it).
    OuterDstMacNotOurs => "outer_dst_mac_not_ours", "outer destination MAC is not this node's";
    /// A zero outer UDP checksum over IPv6, not enabled (RFC 6935/6936; the kernel's `udp6zerocsumrx`).
    Udp6ZeroChecksum => "udp6_zero_checksum", "zero outer UDP checksum over IPv6 (not enabled)";
    /// A decapsulated IPv4 packet with TTL 0 or IPv6 packet with hop limit 0.
    InnerTtlZero => "inner_ttl_zero", "decapsulated packet with TTL or hop limit 0";
    /// A decapsulated frame whose source MAC is multicast or broadcast.
    InnerSrcMacMulticast => "inner_src_mac_multicast", "inner source MAC is multicast or broadcast";
    /// A decapsulated packet whose source is neither in the sending node's pod CIDRs nor that
    /// node's own address (anti-spoofing on decapsulation).
    InnerSpoofedSource => "inner_spoofed_source", "inner source not the sending node's";
    /// A pod sent a frame whose source MAC is not its own.
    PodSrcMacMismatch => "pod_src_mac_mismatch", "pod used a source MAC that is not its own";
    /// A pod sent an IP packet to a MAC other than the gateway's.
    PodDstMacNotGateway => "pod_dst_mac_not_gateway", "pod frame not addressed to the gateway MAC";
    /// A pod sent an IPv4 packet whose header checksum does not verify (RFC 1812 5.2.2).
    PodIpv4BadChecksum => "pod_ipv4_bad_checksum", "IPv4 header checksum wrong in a pod's packet";
    /// A pod sent an 802.1Q-tagged frame: a pod port is an untagged access port.
    PodVlanTagged => "pod_vlan_tagged", "VLAN-tagged frame from a pod";

    // Services (issue 14).

    /// A connection to a service VIP and port with no usable endpoint: refused with ICMP port
    /// unreachable (UDP) or a TCP RST, rate limited, as kube-proxy rejects it.
    ServiceNoEndpoint => "service_no_endpoint", "service has no usable endpoint (rejected)";
    /// A packet of a tracked service connection whose backend endpoint is gone: dropped, never sent
    /// to another backend mid-connection.
    ServiceBackendGone => "service_backend_gone", "service connection's backend is gone";

    // NetworkPolicy (issue 15).

    /// The destination pod's NetworkPolicy ingress rules do not allow the packet (checked at the
    /// destination pod's node).
    PolicyDeniedIngress => "policy_denied_ingress", "NetworkPolicy: the destination pod's ingress rules refuse it";
    /// The source pod's NetworkPolicy egress rules do not allow the packet (checked at the source
    /// pod's node).
    PolicyDeniedEgress => "policy_denied_egress", "NetworkPolicy: the source pod's egress rules refuse it";

    // Services from outside the cluster: NodePort, external and load-balancer IPs (issue 14).

    /// A connection from outside to a service with `externalTrafficPolicy: Local` that has no
    /// endpoint on this node: dropped, as kube-proxy drops it (a load balancer's health check
    /// steers clients away from such nodes).
    ExternalNoLocalEndpoint => "external_no_local_endpoint", "service from outside, policy Local: no endpoint on this node";
    /// A new connection from outside under `externalTrafficPolicy: Cluster` found no free source
    /// port on the node's address for its backend (or the node has no address of its family).
    ExternalSnatExhausted => "external_snat_exhausted", "service from outside, policy Cluster: no source port to translate to";
    /// A packet from outside for a service: its IPv4 header checksum is wrong, or its TTL ran out.
    ExternalBadHeader => "external_bad_header", "service from outside: IPv4 header checksum wrong or TTL exhausted";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_are_dense_and_names_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(DropReason::from_index(i), Some(*r));
        }
        assert_eq!(DropReason::from_index(DropReason::COUNT), None);
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())));
    }
}
