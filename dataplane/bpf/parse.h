/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Header parsing shared by ferry's XDP programs (uplink.c, pod.c).
 *
 * Every helper bounds-checks against data_end before reading, so the verifier accepts it, and
 * reports a frame it cannot parse as "not ours": the programs then return XDP_PASS, leaving the
 * frame to the kernel. Nothing here ever drops a frame.
 */
#ifndef FERRY_PARSE_H
#define FERRY_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* The fragment offset of the IPv4 frag_off field, and of the IPv6 Fragment header's (flags below it). */
#define FERRY_IP_OFFSET 0x1fff
#define FERRY_IP6_OFFSET 0xfff8

/* The IPv6 Fragment extension header (RFC 8200 section 4.5). */
struct ferry_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/* The sockets of this interface, indexed by receive queue; the loader sizes it to the queue count. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct vlan_tag {
	__be16 tci;
	__be16 proto;
};

/* A read position in the frame. */
struct cursor {
	void *pos;
	void *end;
};

/*
 * Skip the Ethernet header and at most one VLAN tag (802.1Q or 802.1ad). Returns the EtherType of
 * what follows (network order) with the cursor on it, or 0 when the frame is too short.
 */
static __always_inline __be16 parse_eth(struct cursor *c)
{
	struct ethhdr *eth = c->pos;
	if ((void *)(eth + 1) > c->end)
		return 0;
	__be16 proto = eth->h_proto;
	c->pos = eth + 1;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_tag *tag = c->pos;
		if ((void *)(tag + 1) > c->end)
			return 0;
		proto = tag->proto;
		c->pos = tag + 1;
	}
	return proto;
}

/* The IPv4 header at the cursor if it is a whole, plausible one (version 4, IHL >= 5), else NULL. */
static __always_inline struct iphdr *parse_ipv4(struct cursor *c)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > c->end)
		return NULL;
	if (ip->version != 4 || ip->ihl < 5)
		return NULL;
	c->pos = (void *)ip + ip->ihl * 4;
	return ip;
}

/* The fixed IPv6 header at the cursor if it is whole and of version 6, else NULL. */
static __always_inline struct ipv6hdr *parse_ipv6(struct cursor *c)
{
	struct ipv6hdr *ip6 = c->pos;
	if ((void *)(ip6 + 1) > c->end)
		return NULL;
	if (ip6->version != 6)
		return NULL;
	c->pos = ip6 + 1;
	return ip6;
}

static __always_inline int addr6_eq(const struct in6_addr *a, const struct in6_addr *b)
{
	return a->in6_u.u6_addr32[0] == b->in6_u.u6_addr32[0] &&
	       a->in6_u.u6_addr32[1] == b->in6_u.u6_addr32[1] &&
	       a->in6_u.u6_addr32[2] == b->in6_u.u6_addr32[2] &&
	       a->in6_u.u6_addr32[3] == b->in6_u.u6_addr32[3];
}

/* Hand the frame to the AF_XDP socket of its receive queue, or to the kernel if there is none. */
static __always_inline int to_socket(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

#endif
