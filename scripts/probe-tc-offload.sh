#!/usr/bin/env bash
# Probe (a measurement for docs/throughput.md, not part of ferry): what pod-to-pod TCP gets when the VXLAN
# encapsulation and decapsulation are done by TC programs in the kernel (bpf_skb_adjust_room, which keeps TSO
# super-packets whole), against the kernel's own VXLAN device set up the Flannel way, on the same topology:
#
#   tco-pa eth0 10.245.1.2 -veth- tco-n1 [vxlan0 | TC] ul0 192.168.201.1 -veth- 192.168.201.2 ul0 tco-n2 -veth- tco-pb
#
# Variants, each iperf3 -P 1 and -P 4 for DURATION s, ROUNDS rounds taking turns:
#   kernel   both nodes route through their vxlan0 (Flannel's vxlan backend)
#   tc-send  n1 encapsulates at the pod's host veth (TC ingress) and redirects to its uplink; n2's vxlan0 decaps
#   tc-both  as tc-send, and n2 decapsulates at its uplink (TC ingress) and redirects to the pod's host veth
#   tc-xdpg  as tc-both, with an XDP program (a hash lookup, then XDP_PASS) on the sending pod's host veth in
#            generic mode: what ferry's pod program in front of the TC program would cost (generic XDP copies
#            a cloned or paged skb into a linear one before it runs)
#   tc-xdpn  the same XDP program in native mode (the pod's veth then loses TSO; veth's GRO after XDP_PASS)
# ACKs (pb -> pa) always take the vxlan0 devices. Namespaces are removed on exit, also on failure.
#
#   sudo [PROBE_VARIANTS="kernel tc-both ..."] scripts/probe-tc-offload.sh [ROUNDS] [DURATION]
set -euo pipefail

ROUNDS=${1:-3}
DURATION=${2:-5}
VARIANTS=${PROBE_VARIANTS:-kernel tc-send tc-both tc-xdpg tc-xdpn}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"
[ "$(id -u)" -eq 0 ] || { echo "probe-tc-offload.sh: needs root (namespaces, TC programs)" >&2; exit 1; }
ensure_apt clang libbpf-dev linux-libc-dev iproute2 iperf3 jq

P=tco
OBJ=$(mktemp -d)
cleanup() {
    for ns in pa pb n1 n2; do ip netns pids "$P-$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
    for ns in pa pb n1 n2; do ip netns del "$P-$ns" 2>/dev/null || true; done
    rm -rf "$OBJ"
}
trap cleanup EXIT
cleanup
OBJ=$(mktemp -d)

for ns in pa pb n1 n2; do ip netns add "$P-$ns"; done
nsx() { local ns=$1; shift; ip netns exec "$P-$ns" "$@"; }
mac() { printf '02:00:00:00:%02x:%02x' "$1" "$2"; }
# node i: uplink 192.168.201.i, MAC 02:..:0a:0i; vxlan0 MAC 02:..:0i:01; pod 10.245.i.2 behind host veth "pod".
ip link add ul0 netns "$P-n1" address "$(mac 10 1)" type veth peer ul0 netns "$P-n2" address "$(mac 10 2)"
for i in 1 2; do
    n=n$i
    pod=$([ "$i" = 1 ] && echo pa || echo pb)
    j=$((3 - i))
    ip link add pod netns "$P-$n" address "$(mac 20 "$i")" type veth peer eth0 netns "$P-$pod" address "$(mac 30 "$i")"
    nsx "$n" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
    nsx "$n" ip link set lo up
    nsx "$n" ip addr add "192.168.201.$i/24" dev ul0
    nsx "$n" ip link set ul0 up
    nsx "$n" ip addr add "10.245.$i.1/24" dev pod
    nsx "$n" ip link set pod up
    nsx "$n" ip link add vxlan0 address "$(mac "$i" 1)" type vxlan id 1 local "192.168.201.$i" dstport 4789 nolearning dev ul0
    nsx "$n" ip link set vxlan0 mtu 1450 up
    nsx "$n" ip addr add "10.245.$i.0/32" dev vxlan0
    nsx "$n" ip route add "10.245.$j.0/24" via "10.245.$j.0" dev vxlan0 onlink
    nsx "$n" ip neigh add "10.245.$j.0" lladdr "$(mac "$j" 1)" dev vxlan0 nud permanent
    nsx "$n" bridge fdb append "$(mac "$j" 1)" dev vxlan0 dst "192.168.201.$j"
    nsx "$pod" ip link set lo up
    nsx "$pod" ip link set eth0 mtu 1450 up
    nsx "$pod" ip addr add "10.245.$i.2/24" dev eth0
    nsx "$pod" ip route add default via "10.245.$i.1"
done

hexmac() { sed 's/^/0x/; s/:/,0x/g' <<<"$1"; }
ifindex() { nsx "$1" cat "/sys/class/net/$2/ifindex"; }
# One object per node (its own constants).
build() {
    local i=$1 j=$((3 - $1))
    clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c "$REPO/scripts/lib/tc-offload-probe.bpf.c" \
        -o "$OBJ/n$i.o" \
        -DUL_SRC_MAC="$(hexmac "$(mac 10 "$i")")" -DUL_DST_MAC="$(hexmac "$(mac 10 "$j")")" \
        -DVTEP_SRC_MAC="$(hexmac "$(mac "$i" 1)")" -DVTEP_DST_MAC="$(hexmac "$(mac "$j" 1)")" \
        -DPOD_MAC="$(hexmac "$(mac 30 "$i")")" -DGW_MAC="$(hexmac "$(mac 20 "$i")")" \
        -DLOCAL_UL="0xc0a8c90$i" -DREMOTE_UL="0xc0a8c90$j" -DLOCAL_NET="$(printf 0x0af5%02x00 "$i")" -DREMOTE_NET="$(printf 0x0af5%02x00 "$j")" \
        -DUL_IFINDEX="$(ifindex "n$i" ul0)" -DPOD_HOST_IFINDEX="$(ifindex "n$i" pod)"
}
build 1
build 2
for n in n1 n2; do
    nsx "$n" tc qdisc add dev pod clsact
    nsx "$n" tc qdisc add dev ul0 clsact
done

variant() {
    nsx n1 tc filter del dev pod ingress 2>/dev/null || true
    nsx n2 tc filter del dev ul0 ingress 2>/dev/null || true
    nsx n1 ip link set dev pod xdpgeneric off 2>/dev/null || true
    nsx n1 ip link set dev pod xdpdrv off 2>/dev/null || true
    case "$1" in
        tc-send) nsx n1 tc filter add dev pod ingress bpf direct-action obj "$OBJ/n1.o" sec tc/encap ;;
        tc-both) variant tc-send
                 nsx n2 tc filter add dev ul0 ingress bpf direct-action obj "$OBJ/n2.o" sec tc/decap ;;
        tc-xdpg) variant tc-both
                 nsx n1 ip link set dev pod xdpgeneric obj "$OBJ/n1.o" sec xdp ;;
        tc-xdpn) variant tc-both
                 nsx n1 ip link set dev pod xdpdrv obj "$OBJ/n1.o" sec xdp ;;
    esac
}

nsx pa ping -c 1 -W 2 10.245.2.2 >/dev/null || { echo "probe: no kernel-VXLAN connectivity" >&2; exit 1; }
nsx pb iperf3 -s -D >/dev/null
echo "kernel $(uname -r), ${ROUNDS} rounds of ${DURATION} s, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-8s %-3s %s\n' variant P "Gbit/s (retransmits), round by round"
declare -A res vxd
vx() { nsx "$1" ip -s -j link show vxlan0 | jq ".[0].stats64.$2.packets"; }
for r in $(seq 1 "$ROUNDS"); do
    for v in $VARIANTS; do
        variant "$v"
        nsx pa ping -c 1 -W 2 10.245.2.2 >/dev/null || { echo "probe: $v: no connectivity" >&2; exit 1; }
        for p in 1 4; do
            tx0=$(vx n1 tx)
            rx0=$(vx n2 rx)
            out=$(nsx pa timeout $((DURATION + 20)) iperf3 -c 10.245.2.2 -t "$DURATION" -P "$p" -J)
            g=$(jq -r '.end.sum_received.bits_per_second / 1e9 * 100 | round / 100' <<<"$out")
            rt=$(jq -r '.end.sum_sent.retransmits' <<<"$out")
            res[$v-$p]+="$g ($rt) "
            # Which path the data took: n1's vxlan0 sends it (kernel) or not (tc-*), n2's receives it or not.
            vxd[$v-$p]+="$(($(vx n1 tx) - tx0))/$(($(vx n2 rx) - rx0)) "
        done
    done
done
for v in $VARIANTS; do
    for p in 1 4; do printf '%-8s %-3s %s\n' "$v" "$p" "${res[$v-$p]}"; done
done
echo "packets through n1's vxlan0 (tx) / n2's vxlan0 (rx) during each run (the data and the ACKs' way back not counted):"
for v in $VARIANTS; do
    for p in 1 4; do printf '%-8s %-3s %s\n' "$v" "$p" "${vxd[$v-$p]}"; done
done
# What the programs saw: their packets through n1's uplink as super-packets (GSO kept) or segments.
echo "n1 ul0 tx: $(nsx n1 ip -s -j link show ul0 | jq -c '.[0].stats64.tx | {packets, bytes}')"
