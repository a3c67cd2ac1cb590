/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferry's flow offload (`dataplane.offload = "tc"`): TC programs that move the bytes of flows ferry
 * has already decided, so that a TSO super-packet crosses the node whole instead of through
 * ferry's 1.5 KB frames (docs/throughput.md, "Flow offload").
 *
 * ferry's pipeline judges every flow's first packet in userspace, as without offload. For a TCP
 * connection it allows and routes (a service's connection with its translation: the client's
 * packets get the backend's address and port, the backend's the service's back), the worker writes one entry per direction
 * and node into `offload_flows` while the handshake is in flight (the SYN, the SYN-ACK), before any
 * data can follow: a flow never has packets on both paths at once, so nothing overtakes anything.
 * A UDP flow has no handshake: its entry is written after ferry sent the flow's first packet, and
 * takes effect `armed_ns` later (2 ms), once what is already queued for ferry has gone out.
 *
 * - `ferry_offload_pod`, TCX ingress of a pod's host veth (the pod keeps TSO: no XDP program on
 *   it): a packet of an entry whose way in is this veth is encapsulated toward its node
 *   (bpf_skb_adjust_room keeps a super-packet whole as SKB_GSO_UDP_TUNNEL; the kernel's neighbour
 *   table gives the outer MACs), or handed to another local pod. Every other packet goes to the
 *   pod's own tap (`partner`), which ferry reads with virtio-net headers: super-packets and their
 *   GSO metadata reach ferry whole, as on a tap pod. TCP SYNs without ACK always go to ferry, so
 *   that every new connection is judged there, also one that reuses an entry's ports.
 * - `ferry_offload_tap`, TCX ingress of that tap: what ferry writes for the pod goes into the
 *   pod's namespace (bpf_redirect to its veth, as the kernel routes into a pod: a program the pod
 *   runs on its own interface sees it).
 * - `ferry_offload_uplink`, TC ingress of the uplink: a tunnel packet holding one whole inner
 *   packet of an entry from that node is decapsulated and handed to the pod's veth; a packet to a
 *   service's way in from outside (a node port, an external or load-balancer IP: `frontends`) is
 *   handed to ferry's tap for them (`ext_tap`); everything else goes on to the kernel (ferry's
 *   UDP socket, the node's own traffic). `ferry_offload_tap` on that tap sends what ferry writes
 *   there (rejections) out of the uplink.
 *
 * The agent removes entries (the flow then goes back to ferry's own path) when their decision
 * may have changed: a new NetworkPolicy, a route change toward their destination, the end of the
 * connection (idle past the timeout: the programs write `last_ns`). Counters per entry feed
 * `ferry offload`.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "offload.h"
#include "service_key.h"

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

/* The tunnel header ferry's uplink reads (VXLAN or Geneve), and the ways into services from
 * outside: the node's IPv4 address (node ports), and ferry's tap for them (0: none). The agent
 * writes it. */
struct offload_config {
	__be16 tunnel_port;
	__u8 pad[2];
	__u32 ext_tap;
	__be32 addr4;
};

/* Services' ways in from outside the cluster (service_key.h), as the AF_XDP uplink's program keeps
 * them; the agent fills it from the published services. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct service_key);
	__type(value, __u8);
} frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct offload_config);
} offload_config SEC(".maps");

/* A pod's host veth -> its tap, and the tap -> the veth (ifindexes; the agent writes both). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} partner SEC(".maps");

/* What the programs did, per CPU: see `enum offload_stat` in offload.h. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OFFLOAD_STATS);
	__type(key, __u32);
	__type(value, __u64);
} offload_stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&offload_stats, &stat);
	if (n)
		*n += 1;
}

/* Count a packet on its entry; `seen`: its OFFLOAD_SEEN_* bits. The flags byte is written only
 * when a bit is new (a connection's last packets); two CPUs racing there both write bits that
 * close the connection, and the bits ferry wrote never change, so a lost update loses nothing. */
static __always_inline void touch(struct offload_entry *e, __u32 len, __u8 seen)
{
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	e->last_ns = bpf_ktime_get_ns();
	if (seen & ~e->flags)
		e->flags |= seen;
}

/* Whether the entry takes its flow's packets yet (see `armed_ns`). */
static __always_inline int armed(const struct offload_entry *e)
{
	return e->armed_ns == 0 || bpf_ktime_get_ns() >= e->armed_ns;
}

/* The ones'-complement sum of an IPv4 header of 20 bytes, folded. */
static __always_inline __u16 ipv4_checksum(const __u16 *p)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += p[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Decrement the inner IPv4 TTL at `off` with its checksum (RFC 1624); the XDP gate saw TTL > 1. */
static __always_inline int ttl_down(struct __sk_buff *skb, __u32 off, __u8 ttl)
{
	__u8 next = ttl - 1;
	__be16 before = bpf_htons((__u16)ttl << 8), after = bpf_htons((__u16)next << 8);
	if (bpf_l3_csum_replace(skb, off + offsetof(struct iphdr, check), before, after, 2))
		return -1;
	return bpf_skb_store_bytes(skb, off + offsetof(struct iphdr, ttl), &next, 1, 0);
}

/* A service's translation (OFFLOAD_NAT_DST, OFFLOAD_NAT_SRC) of the IPv4 TCP or UDP packet at `l3`
 * (no options: key_of checked), with its checksums: the IPv4 header's, and the L4 one for the
 * address (a pseudo-header field; for a super-packet whose checksum is left partial, only its
 * pseudo-header sum changes, as the kernel's own NAT does) and the port. A UDP checksum of 0
 * (none) stays 0. */
static __always_inline int rewrite(struct __sk_buff *skb, __u32 l3, __u8 proto, const struct offload_entry *e)
{
	int dst = e->flags & OFFLOAD_NAT_DST;
	if (!dst && !(e->flags & OFFLOAD_NAT_SRC))
		return 0;
	__u32 addr_off = l3 + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
	__u32 port_off = l3 + sizeof(struct iphdr) + (dst ? 2 : 0);
	__u32 csum_off = l3 + sizeof(struct iphdr) +
			 (proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
	__u64 udp = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be32 old_addr, new_addr = e->nat_addr;
	__be16 old_port, new_port = e->nat_port;
	if (bpf_skb_load_bytes(skb, addr_off, &old_addr, 4) || bpf_skb_load_bytes(skb, port_off, &old_port, 2))
		return -1;
	if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | udp | 4) ||
	    bpf_l4_csum_replace(skb, csum_off, old_port, new_port, udp | 2) ||
	    bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), old_addr, new_addr, 4))
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) || bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0))
		return -1;
	return 0;
}

/* The OFFLOAD_SEEN_* bits of the IPv4 packet at `l3` (key_of checked it): a TCP FIN or RST. A TCP
 * header beyond the packet's linear part counts as neither. */
static __always_inline __u8 seen_of(void *l3, void *end, __u8 proto)
{
	__u8 *tcp = l3 + sizeof(struct iphdr);
	if (proto != IPPROTO_TCP || (void *)(tcp + 14) > end)
		return 0;
	return ((tcp[13] & 0x01) ? OFFLOAD_SEEN_FIN : 0) | ((tcp[13] & 0x04) ? OFFLOAD_SEEN_RST : 0);
}

/* The flow key and TTL of the IPv4 TCP/UDP packet at `l3`, or -1. */
static __always_inline int key_of(void *l3, void *end, struct flow4_key *key, __u8 *ttl, __u8 *tos)
{
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl != 5)
		return -1;
	if (ip->frag_off & bpf_htons(0x3fff))
		return -1;
	__be16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > end)
		return -1;
	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->sport = ports[0];
	key->dport = ports[1];
	key->proto = ip->protocol;
	*ttl = ip->ttl;
	*tos = ip->tos;
	return 0;
}

/* The outer headers, as written by the encap path: IPv4, UDP, then the tunnel header and inner Ethernet. */
struct outer4 {
	struct iphdr ip;
	struct udphdr udp;
};

/* The pod's tap, where ferry reads what is not offloaded. */
static __always_inline int to_ferry(struct __sk_buff *skb)
{
	__u32 in = skb->ingress_ifindex;
	__u32 *tap = bpf_map_lookup_elem(&partner, &in);
	if (!tap) {
		count(OFFLOAD_STAT_NO_TAP);
		return TC_ACT_SHOT;
	}
	return bpf_redirect(*tap, 0);
}

SEC("tcx/ingress")
int ferry_offload_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return to_ferry(skb);
	struct flow4_key key = {};
	__u8 ttl, tos;
	if (key_of(eth + 1, end, &key, &ttl, &tos))
		return to_ferry(skb);
	if (key.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(eth + 1) + sizeof(struct iphdr);
		if ((void *)(tcp + 1) > end || (tcp->syn && !tcp->ack))
			return to_ferry(skb);
	} else if (key.proto != IPPROTO_UDP) {
		return to_ferry(skb);
	}
	struct offload_entry *e = bpf_map_lookup_elem(&offload_flows, &key);
	if (!e || e->in_ifindex != skb->ingress_ifindex || !armed(e))
		return to_ferry(skb);
	/* A packet whose TTL runs out here, and one beyond the pod's MTU that is not a GSO
	 * super-packet: ferry answers them with their ICMP errors. */
	if (ttl <= 1 || (skb->gso_segs <= 1 && skb->len > e->max_len))
		return to_ferry(skb);
	__u32 len = skb->len;
	__u8 seen = seen_of(eth + 1, end, key.proto);
	if (ttl_down(skb, ETH_HLEN, ttl) || rewrite(skb, ETH_HLEN, key.proto, e)) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	if (e->action == OFFLOAD_LOCAL) {
		/* Another pod of this node: its MAC, the gateway's as the source. */
		if (bpf_skb_store_bytes(skb, 0, e->hdr, 2 * ETH_ALEN, 0)) {
			count(OFFLOAD_STAT_ERROR);
			return TC_ACT_SHOT;
		}
		touch(e, len, seen);
		count(OFFLOAD_STAT_LOCAL);
		return bpf_redirect(e->out_ifindex, 0);
	}
	if (e->action != OFFLOAD_ENCAP4)
		return TC_ACT_SHOT;
	__u32 grow = e->hdr_len;
	if (grow < sizeof(struct outer4) + 8 + ETH_HLEN || grow > OFFLOAD_HDR_MAX) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	/* Room after the Ethernet header for the outer IPv4, UDP and tunnel headers and the inner
	 * Ethernet header, which moves the original IP packet up; the segment size stays (FIXED_GSO:
	 * the pod's MTU already leaves room for the tunnel). */
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN) | BPF_F_ADJ_ROOM_ENCAP_L2_ETH;
	if (bpf_skb_adjust_room(skb, grow, BPF_ADJ_ROOM_MAC, flags)) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	/* The template: the outer IPv4, UDP and tunnel base header (36 bytes), a Geneve header's
	 * options four bytes at a time, the inner Ethernet header. (Constant sizes: the verifier
	 * wants a store's length known to be non-zero.) */
	__u32 opt = (grow - (sizeof(struct outer4) + 8 + ETH_HLEN)) & 0x3c;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, e->hdr, sizeof(struct outer4) + 8, 0)) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	for (__u32 i = 0; i < 15; i++) {
		if (i * 4 >= opt)
			break;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 36 + i * 4, &e->hdr[36 + i * 4], 4, 0)) {
			count(OFFLOAD_STAT_ERROR);
			return TC_ACT_SHOT;
		}
	}
	if (bpf_skb_store_bytes(skb, ETH_HLEN + 36 + opt, &e->hdr[36 + opt], ETH_HLEN, 0)) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	struct outer4 o;
	__builtin_memcpy(&o, e->hdr, sizeof(o));
	__u16 ip_len = skb->len - ETH_HLEN;
	o.ip.tot_len = bpf_htons(ip_len);
	/* RFC 6040 and the template's DSCP rule, as TunnelTemplate::outer_tos. */
	__u8 dscp = (e->flags & OFFLOAD_FIXED_TOS) ? e->tos : (tos & 0xfc);
	o.ip.tos = dscp | ((e->flags & OFFLOAD_ECN_COPY) ? (tos & 0x03) : 0);
	o.ip.check = 0;
	o.ip.check = ipv4_checksum((const __u16 *)&o.ip);
	o.udp.len = bpf_htons(ip_len - sizeof(struct iphdr));
	o.udp.check = 0;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &o, sizeof(o), 0)) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	__be16 proto = bpf_htons(ETH_P_IP);
	bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto), 0);
	touch(e, len, seen);
	count(OFFLOAD_STAT_ENCAP);
	/* The outer destination's neighbour (the next hop on the underlay) gives the MACs. */
	return bpf_redirect_neigh(e->out_ifindex, NULL, 0, 0);
}

/* An IPv4 packet from outside the cluster to a service's way in (`frontends`): to ferry's tap,
 * as the AF_XDP uplink's program hands it to ferry. Everything else stays with the kernel. */
static __always_inline int to_frontend(struct __sk_buff *skb, const struct offload_config *cfg, struct iphdr *ip,
				       void *end)
{
	if (!cfg->ext_tap || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x1fff)))
		return TC_ACT_OK;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_SCTP)
		return TC_ACT_OK;
	__be16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > end)
		return TC_ACT_OK;
	const __u32 mapped[4] = { 0, 0, bpf_htonl(0xffff), ip->daddr };
	if (is_frontend_key(&frontends, ip->daddr == cfg->addr4, mapped, ports[1], ip->protocol))
		return bpf_redirect(cfg->ext_tap, 0);
	return TC_ACT_OK;
}

SEC("tcx/ingress")
int ferry_offload_uplink(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	struct offload_config *cfg = bpf_map_lookup_elem(&offload_config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	struct ethhdr *eth = data;
	struct outer4 *o = (void *)(eth + 1);
	if ((void *)(&o->ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || o->ip.version != 4)
		return TC_ACT_OK;
	if (o->ip.ihl != 5 || o->ip.protocol != IPPROTO_UDP || (void *)(o + 1) > end || o->udp.dest != cfg->tunnel_port)
		return to_frontend(skb, cfg, &o->ip, end);
	if (o->ip.frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK;
	/* Only tunnel packets whose UDP source port is in RFC 7348's range, the flow's own port:
	 * an offloading ferry node sends from the entry's, a kernel VXLAN node from its flow hash's,
	 * both the same for every packet of a flow, so a flow comes in here whole or not at all.
	 * ferry's UDP socket path sends every flow from the tunnel port, and stays ferry's. */
	if (bpf_ntohs(o->udp.source) < 49152)
		return TC_ACT_OK;
	/* The tunnel header: VXLAN's 8 bytes, or Geneve's 8 plus its options (length in 4-byte words). */
	__u8 *tun = (void *)(o + 1);
	if ((void *)(tun + 8) > end)
		return TC_ACT_OK;
	__u32 tun_len = 8;
	if (cfg->tunnel_port != bpf_htons(4789))
		tun_len += (tun[0] & 0x3f) * 4;
	if (tun_len > 8 + 64)
		return TC_ACT_OK;
	__u32 outer_len = sizeof(struct outer4) + tun_len; /* what goes, after the outer Ethernet header */
	struct ethhdr *inner_eth = (void *)o + outer_len;
	if ((void *)(inner_eth + 1) > end || inner_eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *inner = (void *)(inner_eth + 1);
	struct flow4_key key = {};
	__u8 ttl, tos;
	if (key_of(inner, end, &key, &ttl, &tos))
		return TC_ACT_OK;
	struct offload_entry *e = bpf_map_lookup_elem(&offload_flows, &key);
	if (!e || e->action != OFFLOAD_DECAP || e->in_ifindex != skb->ingress_ifindex || e->remote != o->ip.saddr ||
	    !armed(e))
		return TC_ACT_OK;
	/* One whole inner packet per outer datagram: a train of datagrams (a UDP GSO send) holds
	 * several, which only ferry's socket path takes apart. */
	if (bpf_ntohs(o->ip.tot_len) != skb->len - ETH_HLEN ||
	    bpf_ntohs(inner->tot_len) + ETH_HLEN + outer_len != bpf_ntohs(o->ip.tot_len)) {
		count(OFFLOAD_STAT_TRAIN);
		return TC_ACT_OK;
	}
	if (ttl <= 1)
		return TC_ACT_OK;
	/* RFC 6040 decapsulation: congestion marked outside is marked inside; a mark on a packet
	 * that cannot carry one is ferry's to drop and count. */
	__u8 outer_ce = (o->ip.tos & 0x03) == 0x03;
	if (outer_ce && (tos & 0x03) == 0)
		return TC_ACT_OK;
	__u32 len = skb->len;
	__u8 seen = seen_of(inner, end, key.proto);
	/* Remove the outer IPv4, UDP and tunnel headers and the inner Ethernet header; the outer
	 * Ethernet header stays and takes the pod's MACs. */
	if (bpf_skb_adjust_room(skb, -(__s32)(outer_len + ETH_HLEN), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4)) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, 0, e->hdr, 2 * ETH_ALEN, 0) || ttl_down(skb, ETH_HLEN, ttl) ||
	    rewrite(skb, ETH_HLEN, key.proto, e)) {
		count(OFFLOAD_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	if (outer_ce && (tos & 0x03) != 0x03) {
		__u8 ce = tos | 0x03;
		__be16 before = bpf_htons(((__u16)4 << 12) | (5 << 8) | tos);
		__be16 after = bpf_htons(((__u16)4 << 12) | (5 << 8) | ce);
		if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), before, after, 2) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, tos), &ce, 1, 0)) {
			count(OFFLOAD_STAT_ERROR);
			return TC_ACT_SHOT;
		}
	}
	touch(e, len, seen);
	count(OFFLOAD_STAT_DECAP);
	return bpf_redirect(e->out_ifindex, 0);
}

SEC("tcx/ingress")
int ferry_offload_tap(struct __sk_buff *skb)
{
	__u32 in = skb->ingress_ifindex;
	__u32 *veth = bpf_map_lookup_elem(&partner, &in);
	if (!veth) {
		count(OFFLOAD_STAT_NO_TAP);
		return TC_ACT_SHOT;
	}
	count(OFFLOAD_STAT_TO_POD);
	return bpf_redirect(*veth, 0);
}

char _license[] SEC("license") = "Apache-2.0";
