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
 * Services' frontends (NodePort, externalIPs, LoadBalancer IPs): a TCP or UDP packet (not a later
 * fragment) whose destination address, port and protocol are in `frontends` goes to ferry too. A
 * key's address is the external IP (IPv4 mapped into IPv6), or all zeros for a node port, which
 * matches only this node's own address. The agent fills the map from the published services.
 *
 * Configuration (written by the loader, dataplane/src/xdp): `uplink_config[0]`, `frontends`.
 */
#include "parse.h"
#include "service_key.h"

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

/* A service's way in from outside (service_key.h). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct service_key);
	__type(value, __u8);
} frontends SEC(".maps");

/* Whether the TCP, UDP or SCTP packet at the cursor is for a frontend: `mine` says its destination is
 * this node's address (node ports apply). */
static __always_inline int is_frontend(struct cursor *c, __u8 proto, const __u32 daddr[4], int mine)
{
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return 0;
	__be16 *ports = c->pos;
	if ((void *)(ports + 2) > c->end)
		return 0;
	return is_frontend_key(&frontends, mine, daddr, ports[1], proto);
}

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
		if (!ip)
			return XDP_PASS;
		/* A later fragment has no UDP header: not known to be ours. */
		if (ip->frag_off & bpf_htons(FERRY_IP_OFFSET))
			return XDP_PASS;
		int mine = cfg->has_v4 && ip->daddr == cfg->addr4;
		__u32 mapped[4] = { 0, 0, bpf_htonl(0xffff), ip->daddr };
		if (is_frontend(&c, ip->protocol, mapped, mine))
			return to_socket(ctx);
		if (!mine || ip->protocol != IPPROTO_UDP)
			return XDP_PASS;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = parse_ipv6(&c);
		if (!ip6)
			return XDP_PASS;
		int mine = cfg->has_v6 && addr6_eq(&ip6->daddr, &cfg->addr6);
		if (is_frontend(&c, ip6->nexthdr, ip6->daddr.in6_u.u6_addr32, mine))
			return to_socket(ctx);
		if (!mine)
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
