/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferry's catch-all XDP program, for test tools (`ferry pktgen --mode rx`): every frame received on
 * a queue that has an AF_XDP socket in `xsks` goes to that socket; frames on other queues pass to
 * the kernel. Never attach it to an interface the node depends on: ARP and the node's own traffic
 * are taken too.
 */
#include "parse.h"

SEC("xdp")
int ferry_sink(struct xdp_md *ctx)
{
	return to_socket(ctx);
}

char _license[] SEC("license") = "Apache-2.0";
