/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The key of the services' BPF maps, shared by the programs that keep one (each program keeps its
 * own map; the agent writes them with one layout, `service_key` in dataplane/src/xdp/maps.rs):
 * - the uplinks' `frontends` (uplink.c, offload.c): a service's ways in from outside the cluster,
 *   an external or load-balancer IP, or all zeros for a node port on this node's address;
 * - a veth pod's `backends` (pod.c): the pod's own endpoints of `externalTrafficPolicy: Local`
 *   services.
 * Addresses are 16 bytes, IPv4 mapped into IPv6 (::ffff:a.b.c.d).
 */
#ifndef FERRY_SERVICE_KEY_H
#define FERRY_SERVICE_KEY_H

#include <linux/bpf.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>

struct service_key {
	struct in6_addr addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* Whether `map` holds `addr`:`port` over `proto`. */
static __always_inline int service_key_in(void *map, const __u32 addr[4], __be16 port, __u8 proto)
{
	struct service_key key = { .port = port, .proto = proto };
	key.addr.in6_u.u6_addr32[0] = addr[0];
	key.addr.in6_u.u6_addr32[1] = addr[1];
	key.addr.in6_u.u6_addr32[2] = addr[2];
	key.addr.in6_u.u6_addr32[3] = addr[3];
	return bpf_map_lookup_elem(map, &key) != NULL;
}

/* Whether a packet to `daddr`:`port` over `proto` is for one of a service's ways in (`frontends`):
 * a node port when `mine` says `daddr` is this node's address, else an external or load-balancer
 * IP. */
static __always_inline int is_frontend_key(void *frontends, int mine, const __u32 daddr[4], __be16 port, __u8 proto)
{
	const __u32 any[4] = { 0, 0, 0, 0 };
	if (mine && service_key_in(frontends, any, port, proto))
		return 1;
	return service_key_in(frontends, daddr, port, proto);
}

#endif
