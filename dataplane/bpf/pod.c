/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferry's XDP program for a pod's interface (the host end of the pod's veth pair).
 *
 * Goes to ferry's AF_XDP socket on the receive queue: IPv4/IPv6 packets whose destination is in
 * the cluster's pod networks, ARP whose target is the pod gateway's IPv4 address, and IPv6
 * neighbour solicitations whose target is the gateway's IPv6 address, and TCP/UDP from a source
 * address and port in `backends` (this pod as the endpoint of an `externalTrafficPolicy: Local`
 * service: its replies to clients outside the cluster need ferry's reverse translation).
 * When `isolated[0]` is set (NetworkPolicy selects this pod: the agent writes it with each policy
 * publication), every unicast IPv4/IPv6 packet goes to ferry too, so that its egress rules judge
 * what the pod sends outside the pod networks and its connections are tracked for their replies;
 * ferry hands what it allows to the node's kernel through the host port.
 * Everything else (a pod talking to its node's own addresses, say) passes to the kernel.
 *
 * Configuration (written by the loader, dataplane/src/xdp): `pod_config[0]` for the gateway
 * addresses, and the LPM tries `pod_nets4` / `pod_nets6` for the pod networks.
 */
#include <linux/icmpv6.h>
#include "parse.h"
#include "service_key.h"

/*
 * The ARP fixed header (RFC 826), defined here rather than taken from <linux/if_arp.h>: that header
 * pulls in glibc's <sys/socket.h>, which under `-target bpf` asks for <gnu/stubs-32.h>, a file only
 * the i386 multilib package ships. A bare machine has no such package, and the build failed there.
 */
struct ferry_arphdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
};

/* Neighbour solicitation (RFC 4861 section 4.3), without options. */
#define FERRY_ND_NEIGHBOR_SOLICIT 135
struct nd_solicit {
	__u8 type;
	__u8 code;
	__be16 checksum;
	__be32 reserved;
	struct in6_addr target;
};

/* ARP for IPv4 over Ethernet (RFC 826), after the fixed header. */
struct arp_eth_ipv4 {
	struct ferry_arphdr hdr;
	__u8 sha[ETH_ALEN];
	__be32 spa;
	__u8 tha[ETH_ALEN];
	__be32 tpa;
} __attribute__((packed));

struct pod_config {
	__u8 has_gw4;
	__u8 has_gw6;
	__u8 pad[2];
	__be32 gw4;
	struct in6_addr gw6;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pod_config);
} pod_config SEC(".maps");

struct lpm4_key {
	__u32 prefixlen;
	__be32 addr;
};

struct lpm6_key {
	__u32 prefixlen;
	struct in6_addr addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm4_key);
	__type(value, __u8);
} pod_nets4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm6_key);
	__type(value, __u8);
} pod_nets6 SEC(".maps");

/* The pod's own endpoints of Local services (service_key.h). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct service_key);
	__type(value, __u8);
} backends SEC(".maps");

/* 1 while NetworkPolicy selects the pod (see the top). An array: the program's one flag. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8);
} isolated SEC(".maps");

static __always_inline int is_isolated(void)
{
	__u32 zero = 0;
	__u8 *on = bpf_map_lookup_elem(&isolated, &zero);
	return on && *on;
}

static __always_inline int is_backend(struct cursor *c, __u8 proto, const __u32 saddr[4])
{
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return 0;
	__be16 *ports = c->pos;
	if ((void *)(ports + 2) > c->end)
		return 0;
	return service_key_in(&backends, saddr, ports[0], proto);
}

SEC("xdp")
int ferry_pod(struct xdp_md *ctx)
{
	struct cursor c = { (void *)(long)ctx->data, (void *)(long)ctx->data_end };
	__u32 zero = 0;
	struct pod_config *cfg = bpf_map_lookup_elem(&pod_config, &zero);
	if (!cfg)
		return XDP_PASS;

	__be16 proto = parse_eth(&c);
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = parse_ipv4(&c);
		if (!ip)
			return XDP_PASS;
		struct lpm4_key key = { .prefixlen = 32, .addr = ip->daddr };
		if (bpf_map_lookup_elem(&pod_nets4, &key))
			return to_socket(ctx);
		__u32 mapped[4] = { 0, 0, bpf_htonl(0xffff), ip->saddr };
		if (!(ip->frag_off & bpf_htons(FERRY_IP_OFFSET)) && is_backend(&c, ip->protocol, mapped))
			return to_socket(ctx);
		/* Multicast and broadcast stay with the kernel (no policy names them). */
		if (is_isolated() && (bpf_ntohl(ip->daddr) >> 28) != 0xe && ip->daddr != 0xffffffff)
			return to_socket(ctx);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = parse_ipv6(&c);
		if (!ip6)
			return XDP_PASS;
		struct lpm6_key key = { .prefixlen = 128 };
		__builtin_memcpy(&key.addr, &ip6->daddr, sizeof(key.addr));
		if (bpf_map_lookup_elem(&pod_nets6, &key))
			return to_socket(ctx);
		if (is_backend(&c, ip6->nexthdr, ip6->saddr.in6_u.u6_addr32))
			return to_socket(ctx);
		/* Multicast and link-local (neighbour discovery, router solicitations) stay with the kernel. */
		__u8 first = ip6->daddr.in6_u.u6_addr8[0], second = ip6->daddr.in6_u.u6_addr8[1];
		if (is_isolated() && first != 0xff && !(first == 0xfe && (second & 0xc0) == 0x80))
			return to_socket(ctx);
		if (cfg->has_gw6 && ip6->nexthdr == IPPROTO_ICMPV6) {
			struct nd_solicit *ns = c.pos;
			if ((void *)(ns + 1) <= c.end && ns->type == FERRY_ND_NEIGHBOR_SOLICIT &&
			    addr6_eq(&ns->target, &cfg->gw6))
				return to_socket(ctx);
		}
	} else if (proto == bpf_htons(ETH_P_ARP)) {
		struct arp_eth_ipv4 *arp = c.pos;
		if ((void *)(arp + 1) > c.end || !cfg->has_gw4)
			return XDP_PASS;
		if (arp->hdr.ar_pro == bpf_htons(ETH_P_IP) && arp->hdr.ar_hln == ETH_ALEN && arp->hdr.ar_pln == 4 &&
		    arp->tpa == cfg->gw4)
			return to_socket(ctx);
	}
	return XDP_PASS;
}

char _license[] SEC("license") = "Apache-2.0";
