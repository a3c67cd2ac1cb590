#!/usr/bin/env bash
# ferry against the kernel's own VXLAN set up the Flannel way: the same traffic, the same topology, the same
# CPUs, one after the other in one run; medians of repeats and ratios ferry/kernel.
#
#   sudo scripts/bench.sh [--quick] [--repeats N] [--duration S] [--json FILE] [--poll busy|adaptive]
#                         [--napi rps|forwarder|sender] [--only single|two|latency] [--uplink-port afxdp|udp]
#                         [--pod-port veth|tap] [--offload off|tc] [--kinds all|KIND,...] [--flows-compare]
#                         [--pktgen-flows N] [--no-build]
#
#   --quick          one short repeat of everything (the CI smoke test; fails on a broken step, never on ratios)
#   --repeats N      repeats of every measurement (default 5); medians are reported
#   --duration S     seconds of traffic per UDP run (default 3; --quick 1) and per iperf3 run (default 5; quick 2)
#   --json FILE      results (default: target/bench/bench-<time>.json)
#   --poll MODE      the ferry worker's poll mode on the single-node runs (default adaptive: the worker shares
#                    CPU 1 with the kernel work that fills its rings, and a busy worker takes CPU time from it;
#                    the 2-node runs always use adaptive: two busy workers cannot share the forwarding CPU)
#   --napi WHERE     where the receive half of ferry's path (its XDP program and the copy into the socket) runs.
#                    rps (default): ferry attaches its programs in generic mode (dataplane.xdp_mode), so they run
#                    after RPS, which steers them to CPU 1 exactly as it steers the kernel's forwarding;
#                    forwarder: native XDP, the veths' threaded NAPI pinned to CPU 1 at real-time priority beside
#                    the worker; sender: native XDP left in the veth's NAPI on the sending CPU (the generator's),
#                    which gives ferry part of CPU 0: a diagnostic, not a comparison
#   --only PART      single (the single-node encap/decap runs), two (the 2-node TCP and latency runs) or
#                    latency (only the 2-node latency runs)
#   --uplink-port K  the ferry nodes' dataplane.uplink_port (default udp, as the agent's auto picks on this veth
#                    underlay; afxdp: an AF_XDP socket behind ferry's XDP program; udp: a kernel UDP socket with
#                    UDP_SEGMENT/UDP_GRO on the uplink, no XDP program there)
#   --flows-compare  the single-node runs again with ferry's flow records off (dataplane.flows = false), in the
#                    same run, reported as side ferry_noflows with the ratio flows on / off (the bench's
#                    ferry nodes otherwise run with flows on; the agent's default is off); on and off take
#                    turns repeat by repeat
#   --pktgen-flows N the single-node runs' generator sends N flows (1 to 65536, default 1; 256 source ports per
#                    source address, so encap, from the pod's one address, takes at most 256, and decap at most
#                    64768, its sources within the sending node's pod network): the flow-record export's load
#                    (more flows than dataplane.flow_slots: a new flow's record at almost every packet). Every
#                    ferry run records the flow records n1's agent took from the export rings and those lost
#   --pod-port K     the ferry nodes' dataplane.pod_port (default veth; tap: each pod's eth0 is a persistent
#                    multi-queue tap with virtio-net headers, so TCP super-packets reach ferry whole)
#   --offload M      the ferry nodes' dataplane.offload (default: tc with veth pods and the UDP uplink, off
#                    otherwise, as the agent's auto picks; tc: TCP and UDP flows moved by ferry's TC programs,
#                    which needs --pod-port veth --uplink-port udp; off: every packet through ferry's worker).
#                    With no port options the bench runs the agent's default mode on this topology.
#   --kinds K        the ferry side once per port kind, POD/UPLINK[/tc] separated by commas (veth/udp/tc,
#                    veth/udp, veth/afxdp, tap/udp, tap/afxdp), or all of them: ferry's runs of the first kind are
#                    the main table's, each other kind's are reported as side ferry:KIND with its own ratios to
#                    the kernel's VXLAN (measured once). Overrides --pod-port, --uplink-port and --offload.
#
# Measures, each direction on one node (n2 is a bare generator/sink):
#   encap: pod1 -> n1 -> VXLAN on the uplink -> sink on n2;  decap: VXLAN from n2 -> n1 -> sink in pod1
#   64-byte UDP: highest forwarded rate and the highest offered rate with < 0.1% loss (searched with --rate);
#   1464-byte inner frames (the pod MTU 1450): pps and Gbit/s (inner frame bits);
# and the 2-node path pod1 -> n1 -> n2 -> pod2: TCP (iperf3, 1 and 4 streams) and one-way latency p50/p99 at a
# fixed moderate rate. CPU: generators and sinks on CPU 0, forwarding on CPU 1 (ferry's worker; the kernel's
# softirq steered there with RPS); per-CPU busy % from /proc/stat deltas is recorded for every run.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

die() { echo "bench.sh: $*" >&2; exit 1; }

QUICK=0
REPEATS=5
DURATION=
TCP_T=
JSON_OUT=
POLL=adaptive
NAPI=rps
ONLY=
UPLINK_PORT=udp
POD_PORT=veth
OFFLOAD=
KINDS=
BUILD=1
FLOWS_COMPARE=0
FLOWS=true
PKTGEN_FLOWS=1
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1 ;;
        --repeats) REPEATS=${2:?}; shift ;;
        --duration) DURATION=${2:?}; shift ;;
        --json) JSON_OUT=${2:?}; shift ;;
        --poll) POLL=${2:?}; shift ;;
        --napi) NAPI=${2:?}; shift ;;
        --only) ONLY=${2:?}; shift ;;
        --uplink-port) UPLINK_PORT=${2:?}; shift ;;
        --pod-port) POD_PORT=${2:?}; shift ;;
        --offload) OFFLOAD=${2:?}; shift ;;
        --kinds) KINDS=${2:?}; shift ;;
        --no-build) BUILD=0 ;;
        --flows-compare) FLOWS_COMPARE=1 ;;
        --pktgen-flows) PKTGEN_FLOWS=${2:?}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
case $POLL in busy | adaptive) ;; *) die "--poll busy|adaptive" ;; esac
STEER_NAPI=0
XDP_MODE=native
case $NAPI in
    rps) XDP_MODE=generic ;;
    forwarder) STEER_NAPI=1 ;;
    sender) ;;
    *) die "--napi rps|forwarder|sender" ;;
esac
case $ONLY in '' | single | two | latency) ;; *) die "--only single|two|latency" ;; esac
case $UPLINK_PORT in afxdp | udp) ;; *) die "--uplink-port afxdp|udp" ;; esac
case $POD_PORT in veth | tap) ;; *) die "--pod-port veth|tap" ;; esac
case $OFFLOAD in off | tc) ;; '') OFFLOAD=off; [ "$POD_PORT/$UPLINK_PORT" = veth/udp ] && OFFLOAD=tc ;;
    *) die "--offload off|tc" ;; esac
# One kind: POD/UPLINK, with /tc when flows are offloaded.
kind_of() { echo "$POD_PORT/$UPLINK_PORT$([ "$OFFLOAD" = tc ] && echo /tc)"; }
# set_kind KIND: POD_PORT, UPLINK_PORT and OFFLOAD from a kind, or die naming it.
set_kind() {
    case $1 in
        veth/udp/tc) POD_PORT=veth UPLINK_PORT=udp OFFLOAD=tc ;;
        veth/udp | veth/afxdp | tap/udp | tap/afxdp) POD_PORT=${1%/*} UPLINK_PORT=${1#*/} OFFLOAD=off ;;
        */tc) die "--offload tc (kind $1) needs veth pods and the udp uplink: veth/udp/tc" ;;
        *) die "--kinds: unknown kind '$1' (veth/udp/tc, veth/udp, veth/afxdp, tap/udp, tap/afxdp, or all)" ;;
    esac
}
case $KINDS in
    '') KINDS=$(kind_of) ;;
    all) KINDS=veth/udp/tc,veth/udp,veth/afxdp,tap/udp,tap/afxdp ;;
esac
IFS=, read -r -a KIND_LIST <<<"$KINDS"
for k in "${KIND_LIST[@]}"; do set_kind "$k"; done
[ "$FLOWS_COMPARE" = 0 ] || [ "${#KIND_LIST[@]}" = 1 ] || die "--flows-compare takes one kind"
set_kind "${KIND_LIST[0]}"
MAIN_KIND=${KIND_LIST[0]}
export OFFLOAD
[[ $REPEATS =~ ^[1-9][0-9]?$ ]] || die "--repeats: 1 to 99"
[[ $PKTGEN_FLOWS =~ ^[1-9][0-9]{0,4}$ ]] && ((PKTGEN_FLOWS <= 65536)) || die "--pktgen-flows: 1 to 65536"
if [ "$QUICK" = 1 ]; then
    REPEATS=1
    DURATION=${DURATION:-1}
    TCP_T=2
fi
DURATION=${DURATION:-3}
TCP_T=${TCP_T:-5}
[[ $DURATION =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--duration: seconds"

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, AF_XDP): sudo $0"
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs (generator on CPU 0, forwarding on CPU 1)"
GEN_CPU=0
FWD_CPU=1
BN=${FERRY_BENCH_NAME:-fbench}
[[ $BN =~ ^[a-z][a-z0-9]{0,9}$ ]] || die "FERRY_BENCH_NAME: lowercase letters and digits, at most 10"
BSTATE=/run/ferry-bench/$BN
CNI_DIR=/usr/lib/cni
RESULTS=$REPO/target/bench
stamp=$(date +%Y%m%d-%H%M%S)
JSON_OUT=${JSON_OUT:-$RESULTS/bench-$stamp.json}
mkdir -p "$RESULTS" "$(dirname "$JSON_OUT")"
RUNLOG=$RESULTS/bench-$stamp.runs.jsonl   # one JSON line per measurement
: >"$RUNLOG"
WORK=$(mktemp -d /tmp/ferry-bench.XXXXXX)

# shellcheck source=scripts/lib/bench-net.sh
. "$REPO/scripts/lib/bench-net.sh"
# shellcheck source=scripts/lib/bench-run.sh
. "$REPO/scripts/lib/bench-run.sh"
# shellcheck source=scripts/lib/bench-report.sh
. "$REPO/scripts/lib/bench-report.sh"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    net_down 2>/dev/null || true
    rm -rf "$WORK" "$BSTATE"
    [ $rc -eq 0 ] || echo "bench.sh: FAILED (exit $rc); partial runs in $RUNLOG" >&2
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "packages"
ensure_build_packages iperf3 ethtool iproute2 procps containernetworking-plugins jq

if [ "$BUILD" = 1 ]; then
    step "build (cargo build --release --locked -p ferry)"
    (cd "$REPO" && cargo build --release --locked -p ferry)
fi
# Private copies: a rebuild by someone else during the run must not swap the binary under the bench.
cp "$REPO/target/release/ferry" "$WORK/ferry"
cp "$REPO/target/release/ferry-cni" "$WORK/ferry-cni"
FERRY=$WORK/ferry
FERRY_CNI=$WORK/ferry-cni
"$FERRY" pktgen --help >/dev/null 2>&1 || die "this ferry has no pktgen subcommand (src/pktgen)"
{ [ -x "$CNI_DIR/bridge" ] && [ -x "$CNI_DIR/host-local" ]; } || die "no CNI bridge/host-local plugins in $CNI_DIR"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
step "machine: $(nproc) CPUs, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $LOAD_START"
if awk '{exit !($1 > 1.5)}' /proc/loadavg; then
    echo "warning: load average $LOAD_START is above 1.5: other work shares these CPUs; figures will be noisy" >&2
fi
echo "repeats $REPEATS, UDP runs ${DURATION}s, iperf3 ${TCP_T}s, ferry poll $POLL (single node) / adaptive (2 nodes)," \
    "ferry's veth NAPI: $NAPI, port kinds (pod/uplink[/offload]) $KINDS; generators/sinks CPU $GEN_CPU, forwarding CPU $FWD_CPU"
[ "$NAPI" = sender ] && echo "note: --napi sender gives ferry part of CPU $GEN_CPU: not an equal-budget comparison" >&2

# single_part SIDE: the single-node runs (encap and decap, n2 a bare generator/sink) of one side.
single_part() {
    local side=$1 rep order before
    [ "$ONLY" = two ] || [ "$ONLY" = latency ] && return 0
    if [ "$side" = ferry ] && [ "$FLOWS_COMPARE" = 1 ]; then
        # Flows on and off take turns, repeat by repeat, the first of each pair alternating: the two
        # sides of the ratio share the same minutes of a shared machine, not two separate stretches.
        for ((rep = 1; rep <= REPEATS; rep++)); do
            order="true false"
            ((rep % 2)) || order="false true"
            for FLOWS in $order; do
                step "ferry, repeat $rep, flow records $([ "$FLOWS" = true ] && echo on || echo "off (reported as ferry_noflows)")"
                before=$(wc -l <"$RUNLOG")
                net_up ferry sink
                run_single_node ferry "$rep"
                net_down
                [ "$FLOWS" = true ] || relabel_runs "$RUNLOG" "$before" ferry ferry_noflows
            done
        done
        FLOWS=true
        return 0
    fi
    step "$side$([ "$side" = ferry ] && echo " ($(kind_of))"): single node (encap and decap), n2 is a bare generator/sink"
    net_up "$side" sink
    run_single_node "$side"
    net_down
}

# two_part SIDE: the 2-node runs (TCP and latency) of one side; ferry's worker adaptive there (two busy workers
# cannot share the forwarding CPU).
two_part() {
    local side=$1 poll_saved=$POLL
    [ "$ONLY" = single ] && return 0
    step "$side$([ "$side" = ferry ] && echo " ($(kind_of))"): 2-node path pod1 -> n1 -> n2 -> pod2 (TCP, latency)"
    POLL=adaptive
    net_up "$side" node
    run_two_node "$side"
    net_down
    POLL=$poll_saved
}

# ferry once per port kind (the first kind's runs are side ferry, the others' ferry:KIND), then the kernel.
for k in "${KIND_LIST[@]}"; do
    set_kind "$k"
    export OFFLOAD
    before=$(wc -l <"$RUNLOG")
    single_part ferry
    two_part ferry
    [ "$k" = "$MAIN_KIND" ] || relabel_runs "$RUNLOG" "$before" ferry "ferry:$k"
done
set_kind "$MAIN_KIND"
single_part kernel
two_part kernel

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
step "results (medians of $REPEATS; load at start $LOAD_START, at end $LOAD_END)"
export PKTGEN_FLOWS FLOWS_COMPARE REPEATS DURATION TCP_T POLL NAPI QUICK LAT_RATE GEN_CPU FWD_CPU LOAD_START LOAD_END MTU_FRAME \
    MAIN_KIND KINDS
bench_report "$RUNLOG" "$JSON_OUT"
echo "runs: $RUNLOG"
echo "json: $JSON_OUT"
