/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferry's XDP program for a node's uplink (underlay) interface.
 *
 * Only tunnel packets for this node go to ferry's AF_XDP socket on the receive queue: IPv4 or IPv6
 * (one VLAN tag tolerated), UDP, destination port == the configured tunnel port, destination
 * address == this node's underlay address. Everything else passes to the kernel, ARP and the
 * node's own traffic included, so taking over a node's main interface never cuts the node off.
 * IPv4 fragments pass (the kernel reassembles them), and so does IPv6 with extension headers
 * before UDP (tunnels don't send them).
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
		if (ip->frag_off & bpf_htons(FERRY_IP_MF_OFFSET))
			return XDP_PASS;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = parse_ipv6(&c);
		if (!ip6 || !cfg->has_v6 || ip6->nexthdr != IPPROTO_UDP || !addr6_eq(&ip6->daddr, &cfg->addr6))
			return XDP_PASS;
	} else {
		return XDP_PASS;
	}

	struct udphdr *udp = c.pos;
	if ((void *)(udp + 1) > c.end || udp->dest != cfg->port)
		return XDP_PASS;
	return to_socket(ctx);
}

char _license[] SEC("license") = "Apache-2.0";
