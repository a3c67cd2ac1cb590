// SPDX-License-Identifier: GPL-2.0
// The TC programs of scripts/probe-tc-offload.sh (a measurement, not part of ferry): VXLAN encapsulation
// of a pod's packets at its host veth's ingress with bpf_skb_adjust_room, which keeps a TSO super-packet
// whole (the kernel segments it, or a veth carries it whole, as SKB_GSO_UDP_TUNNEL), and the decapsulation
// at the far node's uplink. Addresses and interface indexes come from the probe as -D definitions.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

struct vxlanhdr {
    __be32 flags;
    __be32 vni;
};

struct encap_hdr {
    struct ethhdr outer_eth;
    struct iphdr ip;
    struct udphdr udp;
    struct vxlanhdr vx;
    struct ethhdr inner_eth;
} __attribute__((packed));

#define OUTER_LEN (sizeof(struct encap_hdr) - sizeof(struct ethhdr))

static const unsigned char ul_src[ETH_ALEN] = {UL_SRC_MAC};
static const unsigned char ul_dst[ETH_ALEN] = {UL_DST_MAC};
static const unsigned char vtep_src[ETH_ALEN] = {VTEP_SRC_MAC};
static const unsigned char vtep_dst[ETH_ALEN] = {VTEP_DST_MAC};
static const unsigned char pod_mac[ETH_ALEN] = {POD_MAC};
static const unsigned char gw_mac[ETH_ALEN] = {GW_MAC};

static __always_inline __u16 ip_csum(struct iphdr *ip) {
    __u32 sum = 0;
    __u16 *p = (__u16 *)ip;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += p[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

SEC("tc/encap")
int encap(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    if ((ip->daddr & bpf_htonl(0xffffff00)) != bpf_htonl(REMOTE_NET))
        return TC_ACT_OK;
    __u8 tos = ip->tos;
    __u32 hash = bpf_get_hash_recalc(skb);
    // The pod MTU leaves room for the tunnel: the segment size stays.
    if (bpf_skb_adjust_room(skb, OUTER_LEN, BPF_ADJ_ROOM_MAC,
                            BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
                                BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN) | BPF_F_ADJ_ROOM_ENCAP_L2_ETH))
        return TC_ACT_SHOT;
    struct encap_hdr h = {};
    __builtin_memcpy(h.outer_eth.h_dest, ul_dst, ETH_ALEN);
    __builtin_memcpy(h.outer_eth.h_source, ul_src, ETH_ALEN);
    h.outer_eth.h_proto = bpf_htons(ETH_P_IP);
    struct iphdr ip4 = {
        .version = 4,
        .ihl = 5,
        .tos = tos,
        .tot_len = bpf_htons(skb->len - sizeof(struct ethhdr)),
        .ttl = 64,
        .protocol = IPPROTO_UDP,
        .saddr = bpf_htonl(LOCAL_UL),
        .daddr = bpf_htonl(REMOTE_UL),
    };
    ip4.check = ip_csum(&ip4);
    h.ip = ip4;
    h.udp.source = bpf_htons(0xc000 | (hash & 0x3fff));
    h.udp.dest = bpf_htons(4789);
    h.udp.len = bpf_htons(skb->len - sizeof(struct ethhdr) - sizeof(struct iphdr));
    h.vx.flags = bpf_htonl(0x08000000);
    h.vx.vni = bpf_htonl(1 << 8);
    __builtin_memcpy(h.inner_eth.h_dest, vtep_dst, ETH_ALEN);
    __builtin_memcpy(h.inner_eth.h_source, vtep_src, ETH_ALEN);
    h.inner_eth.h_proto = bpf_htons(ETH_P_IP);
    if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0))
        return TC_ACT_SHOT;
    return bpf_redirect(UL_IFINDEX, 0);
}

SEC("tc/decap")
int decap(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct encap_hdr *h = data;
    struct iphdr *inner = (void *)(h + 1);
    if ((void *)(inner + 1) > end || h->outer_eth.h_proto != bpf_htons(ETH_P_IP) || h->ip.ihl != 5 ||
        h->ip.protocol != IPPROTO_UDP || h->udp.dest != bpf_htons(4789))
        return TC_ACT_OK;
    if ((inner->daddr & bpf_htonl(0xffffff00)) != bpf_htonl(LOCAL_NET))
        return TC_ACT_OK;
    if (bpf_skb_adjust_room(skb, -(int)OUTER_LEN, BPF_ADJ_ROOM_MAC,
                            BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4))
        return TC_ACT_SHOT;
    struct ethhdr eth = {.h_proto = bpf_htons(ETH_P_IP)};
    __builtin_memcpy(eth.h_dest, pod_mac, ETH_ALEN);
    __builtin_memcpy(eth.h_source, gw_mac, ETH_ALEN);
    if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
        return TC_ACT_SHOT;
    return bpf_redirect(POD_HOST_IFINDEX, 0);
}

// What an XDP program on the same veth costs the offloaded path: ferry's pod program would look up
// the flow and pass the hits on to TC. A hash lookup on the 5-tuple's addresses, then XDP_PASS.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u64);
    __type(value, __u64);
} seen SEC(".maps");

SEC("xdp")
int pass(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return XDP_PASS;
    __u64 key = ((__u64)ip->saddr << 32) | ip->daddr;
    __u64 *n = bpf_map_lookup_elem(&seen, &key);
    if (n)
        __sync_fetch_and_add(n, 1);
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
