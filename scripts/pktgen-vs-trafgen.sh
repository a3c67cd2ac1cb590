#!/usr/bin/env bash
# Compare `ferry pktgen` with trafgen (netsniff-ng) as 60-byte UDP generators into the same veth, in
# the same run: one namespace with a veth pair, an XDP_DROP program on the peer, each generator
# pinned with taskset to the same CPU, runs alternated, rates counted at the peer (XDP drop counter
# from `ethtool -S`) over a window that skips start-up. Prints each run, the medians, the ratio and
# the load average. Needs root, trafgen, clang, ethtool, taskset; everything it creates is removed
# on exit.
#
# Usage: scripts/pktgen-vs-trafgen.sh [--runs N] [--seconds S] [--cpu C] [--ferry PATH]
set -euo pipefail

RUNS=5
SECONDS_PER_RUN=4
CPU=0
FERRY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
    --cpu) CPU="$2"; shift 2 ;;
    --ferry) FERRY="$2"; shift 2 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
[[ $EUID -eq 0 ]] || { echo "needs root (network namespaces, XDP, AF_XDP)" >&2; exit 1; }
# shellcheck source=scripts/lib/common.sh
. "$root/scripts/lib/common.sh"
ensure_build_packages netsniff-ng ethtool util-linux
if [[ -z "$FERRY" ]]; then
    (cd "$root" && cargo build --release --locked -q -p ferry --bin ferry)
    FERRY="$root/target/release/ferry"
fi

ns="pgvt-$$"
tmp="$(mktemp -d)"
cleanup() {
    # measure() runs in a subshell: the generator's process group is in a file.
    [[ -s "$tmp/gen.pid" ]] && kill -KILL -- -"$(cat "$tmp/gen.pid")" 2>/dev/null
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

cat >"$tmp/drop.c" <<'EOF'
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int pgvt_drop(struct xdp_md *ctx) { return XDP_DROP; }
char _license[] SEC("license") = "GPL";
EOF
clang -O2 -target bpf -I"/usr/include/$(uname -m)-linux-gnu" -c "$tmp/drop.c" -o "$tmp/drop.o"

ip netns add "$ns"
ip -n "$ns" link add pgvt0 address 02:00:00:00:00:01 type veth peer name pgvt1 address 02:00:00:00:00:02
ip -n "$ns" link set pgvt0 up
ip -n "$ns" link set pgvt1 up
ip -n "$ns" link set dev pgvt1 xdpdrv obj "$tmp/drop.o" sec xdp

# The same 60-byte frame for both: Ethernet, IPv4 (DF), UDP 1024 -> 9, 18 bytes of payload.
cat >"$tmp/trafgen.cfg" <<'EOF'
{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), ipv4(saddr=10.0.0.1, daddr=10.0.0.2, df), udp(sp=1024, dp=9), fill(0x00, 18) }
EOF

drops() {
    ip netns exec "$ns" ethtool -S pgvt1 | awk '/rx_queue_0_xdp_drops:/ { print $2 }'
}

# Run a generator (the arguments) in the background and print the peer's drop rate (pps) over
# seconds 1..S of it, leaving out start-up and shutdown.
# Each generator runs in its own process group (setsid), so that stopping it reaches trafgen's
# worker processes too; background jobs of a script ignore SIGINT, hence SIGTERM, then SIGKILL.
measure() {
    setsid ip netns exec "$ns" taskset -c "$CPU" "$@" >/dev/null 2>&1 &
    local pid=$!
    echo "$pid" >"$tmp/gen.pid"
    sleep 1
    local c1 t1 c2 t2
    c1=$(drops); t1=$(date +%s.%N)
    sleep $((SECONDS_PER_RUN - 1))
    c2=$(drops); t2=$(date +%s.%N)
    kill -TERM -- -"$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 -- -"$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL -- -"$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    : >"$tmp/gen.pid"
    awk -v a="$c1" -v b="$c2" -v s="$t1" -v e="$t2" 'BEGIN { printf "%.0f\n", (b - a) / (e - s) }'
}

median() {
    sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$tmp/trafgen"
: >"$tmp/pktgen"
for i in $(seq 1 "$RUNS"); do
    t=$(measure trafgen --dev pgvt0 --conf "$tmp/trafgen.cfg" --cpus 1 -q)
    p=$(measure "$FERRY" pktgen --iface pgvt0 --size 60 --duration $((SECONDS_PER_RUN + 5)) \
        --src-mac 02:00:00:00:00:01 --dst-mac 02:00:00:00:00:02)
    echo "$t" >>"$tmp/trafgen"
    echo "$p" >>"$tmp/pktgen"
    printf 'run %d: trafgen %8d pps   ferry pktgen %8d pps\n' "$i" "$t" "$p"
done
tm=$(median <"$tmp/trafgen")
pm=$(median <"$tmp/pktgen")
echo "load average after:  $(cut -d' ' -f1-3 /proc/loadavg)"
printf 'median of %d runs (CPU %d, 60-byte frames, XDP_DROP peer): trafgen %d pps, ferry pktgen %d pps, ratio %s\n' \
    "$RUNS" "$CPU" "$tm" "$pm" "$(awk -v p="$pm" -v t="$tm" 'BEGIN { printf "%.2f", (t > 0 ? p / t : 0) }')"
