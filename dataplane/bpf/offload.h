/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The offloaded flows of offload.c. The layouts are mirrored in dataplane/src/xdp/offload.rs, which
 * checks the sizes against the compiled object.
 */
#ifndef FERRY_OFFLOAD_H
#define FERRY_OFFLOAD_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* An IPv4 flow, as its packets carry it (network order). */
struct flow4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

enum offload_action {
	OFFLOAD_ENCAP4 = 1, /* from a pod: into the tunnel to another node (IPv4 underlay) */
	OFFLOAD_LOCAL = 2,  /* from a pod: to another pod of this node */
	OFFLOAD_DECAP = 3,  /* from the uplink: out of the tunnel to a pod of this node */
};

#define OFFLOAD_FIXED_TOS 1 /* the outer DSCP is the template's, not the inner packet's */
#define OFFLOAD_ECN_COPY 2  /* RFC 6040 normal mode: the inner ECN field is copied out */
#define OFFLOAD_NAT_DST 4   /* a service's connection: the destination becomes nat_addr:nat_port (its backend) */
#define OFFLOAD_NAT_SRC 8   /* a service's reply: the source becomes nat_addr:nat_port (the service's address) */
/* Written by the programs: a TCP FIN, or RST, went through this entry (ferry's sweep gives a
 * closed connection's entries back soon instead of after the idle timeout). */
#define OFFLOAD_SEEN_FIN 16
#define OFFLOAD_SEEN_RST 32

/* Outer IPv4, UDP, the tunnel header with its options, the inner Ethernet header. */
#define OFFLOAD_HDR_MAX 112

struct offload_entry {
	__u32 in_ifindex;  /* the packets come in here: the pod's host veth, or the uplink */
	__u32 out_ifindex; /* and leave here */
	__be32 remote;     /* decap: the sending node's underlay address */
	__u16 max_len;     /* a non-GSO packet longer than this (Ethernet included) is ferry's (MTU) */
	__u8 action;       /* enum offload_action */
	__u8 hdr_len;      /* encap: bytes of hdr to insert after the Ethernet header */
	__u8 flags;        /* OFFLOAD_FIXED_TOS, OFFLOAD_ECN_COPY, OFFLOAD_NAT_*; OFFLOAD_SEEN_* */
	__u8 tos;          /* with OFFLOAD_FIXED_TOS: the outer DSCP */
	__be16 nat_port;   /* with OFFLOAD_NAT_*: the new port and address of that end */
	__be32 nat_addr;
	/* encap: the outer headers (lengths and checksum filled per packet); local and decap: the
	 * destination and source MACs of the delivered frame. */
	__u8 hdr[OFFLOAD_HDR_MAX];
	/* bpf_ktime_get_ns() before which the entry's packets still go to ferry (0: at once). A UDP
	 * flow is offloaded mid-stream: its packets already queued for ferry go out first. */
	__u64 armed_ns;
	__u64 packets;
	__u64 bytes;
	__u64 last_ns; /* bpf_ktime_get_ns() of the last packet */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow4_key);
	__type(value, struct offload_entry);
} offload_flows SEC(".maps");

enum offload_stat {
	OFFLOAD_STAT_ENCAP,  /* packets (super-packets) encapsulated */
	OFFLOAD_STAT_LOCAL,  /* handed to a pod of this node */
	OFFLOAD_STAT_DECAP,  /* decapsulated */
	OFFLOAD_STAT_TRAIN,  /* several datagrams in one (UDP GSO): left to ferry's socket */
	OFFLOAD_STAT_ERROR,  /* a helper failed: dropped */
	OFFLOAD_STAT_NO_TAP, /* a veth or tap without its partner (being set up or removed): dropped */
	OFFLOAD_STAT_TO_POD, /* written by ferry to a pod's tap, handed to the pod */
	OFFLOAD_STATS,
};

#endif
