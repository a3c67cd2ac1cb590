/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferry's XDP program for a node's uplink (underlay) interface.
 *
 * Only tunnel packets for this node go to ferry's AF_XDP socket on the receive queue: IPv4 or IPv6
 * (one VLAN tag tolerated), UDP, destination port == the configured tunnel port, destination
 * address == this node's underlay address. Everything else passes to the kernel, ARP and the
 * node's own traffic included, so taking over a node's main interface never cuts the node off.
 *
 * Fragments: tunnel packets are sent with DF and never reassembled. The first fragment of a tunnel
 * datagram (offset 0, UDP header present, the tunnel port) goes to ferry, which drops it and counts
 * it as outer_fragment; so does an IPv6 first fragment (a Fragment header directly before UDP).
 * A later fragment carries no port, so it cannot be told from the node's own traffic and passes;
 * without its first fragment the kernel never completes the datagram (nothing reaches the kernel's
 * tunnel port, no ICMP port unreachable goes back) and discards it when reassembly times out.
 * Other IPv6 extension headers before UDP pass (tunnels don't send them).
 *
 * Malformed IPv4 (version not 4, IHL below 5, cut before the UDP header) passes to the kernel,
 * which drops it and counts it in its own IP statistics (`nstat`: IpInHdrErrors, IpInTruncatedPkts):
 * such a header gives no trustworthy protocol or port, so it is not known to be ferry's. A header
 * that parses this far but is wrong elsewhere (total length, checksum) goes to ferry, which drops
 * and counts it under its reason.
 *
 * Configuration (written by the loader, dataplane/src/xdp): `uplink_config[0]`.
 */
#include "parse.h"

struct uplink_config {
	__u8 has_v4;
	__u8 has_v6;
	__be16 port;
	__be32 addr4;
	struct in6_addr addr6;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uplink_config);
} uplink_config SEC(".maps");

SEC("xdp")
int ferry_uplink(struct xdp_md *ctx)
{
	struct cursor c = { (void *)(long)ctx->data, (void *)(long)ctx->data_end };
	__u32 zero = 0;
	struct uplink_config *cfg = bpf_map_lookup_elem(&uplink_config, &zero);
	if (!cfg)
		return XDP_PASS;

	__be16 proto = parse_eth(&c);
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = parse_ipv4(&c);
		if (!ip || !cfg->has_v4 || ip->protocol != IPPROTO_UDP || ip->daddr != cfg->addr4)
			return XDP_PASS;
		/* A later fragment has no UDP header: not known to be ours. */
		if (ip->frag_off & bpf_htons(FERRY_IP_OFFSET))
			return XDP_PASS;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = parse_ipv6(&c);
		if (!ip6 || !cfg->has_v6 || !addr6_eq(&ip6->daddr, &cfg->addr6))
			return XDP_PASS;
		if (ip6->nexthdr == IPPROTO_FRAGMENT) {
			struct ferry_frag_hdr *fh = c.pos;
			if ((void *)(fh + 1) > c.end || fh->nexthdr != IPPROTO_UDP ||
			    (fh->frag_off & bpf_htons(FERRY_IP6_OFFSET)))
				return XDP_PASS;
			c.pos = fh + 1;
		} else if (ip6->nexthdr != IPPROTO_UDP) {
			return XDP_PASS;
		}
	} else {
		return XDP_PASS;
	}

	struct udphdr *udp = c.pos;
	if ((void *)(udp + 1) > c.end || udp->dest != cfg->port)
		return XDP_PASS;
	return to_socket(ctx);
}

char _license[] SEC("license") = "Apache-2.0";
