#!/usr/bin/env bash
# Soak: traffic at the peak rate through each port kind for a long time, then the accounting.
#
#   sudo scripts/soak.sh [--minutes M] [--kinds "veth/afxdp tap/udp veth/udp/tc ..."] [--no-build]
#
# For each kind (pod port / uplink port, and /tc for flow offload; default: veth/afxdp tap/udp tap/afxdp veth/udp
# veth/udp/tc) a two-node lab with one
# pod per node carries, for M minutes (default 10), four TCP streams n1-p1 -> n2-p1 and a flood of 64-byte UDP
# datagrams n2-p1 -> n1-p1 (iperf3 -b 0), both at whatever rate the lab takes. Every 30 s it samples each agent's
# resident memory. At the end, with the traffic stopped and the ports idle again, it checks on every node:
#   - every frame is accounted for: `ferry stats` frames unaccounted = 0 (free + held by ports = all);
#   - nothing is stuck: the frames held by ports are back to what they held idle before the traffic;
#   - no frame was freed twice (double_frees 0), every drop is one of the counted reasons (printed);
#   - the agent's memory is flat: resident memory at the end within 5% (or 4 MiB) of the sample after the
#     first minute (the first minute is warm-up: flow and conntrack tables, socket buffers).
# Non-zero exit when any check fails. Not part of CI (it takes M minutes per kind). The labs are removed on exit,
# also on failure or Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

MINUTES=10
KINDS="veth/afxdp tap/udp tap/afxdp veth/udp veth/udp/tc"
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES=$2; shift 2 ;;
        --kinds) KINDS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "soak.sh: needs root (namespaces, AF_XDP): sudo scripts/soak.sh" >&2; exit 1; }
case "$MINUTES" in ''|*[!0-9]*) echo "soak.sh: --minutes takes a whole number" >&2; exit 2 ;; esac

ensure_build_packages iperf3 jq iproute2 procps containernetworking-plugins
if [ "$BUILD" = 1 ] && [ -z "${FERRY_BIN_DIR:-}" ]; then
    (cd "$REPO" && cargo build --release --locked --bins)
elif [ ! -x "${FERRY_BIN_DIR:-$REPO/target/release}/ferry" ]; then
    echo "soak.sh: no ferry binary in ${FERRY_BIN_DIR:-$REPO/target/release} (drop --no-build)" >&2
    exit 1
fi

LAB=soak
BIN=${FERRY_BIN_DIR:-$REPO/target/release}
lab() { "$REPO/scripts/lab.sh" "$1" --name "$LAB" "${@:2}"; }
ferry_at() { "$BIN/ferry" "$2" --socket "$1" "${@:3}"; }
cleanup() {
    local pids
    pids=$(jobs -p)
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    lab down >/dev/null 2>&1 || true
}
trap cleanup EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
frames() { ferry_at "$1" stats --json | jq -c '.frames + {double_frees}'; }
# The frame account once it holds still: the same in two samples a second apart (the agent publishes its
# sample once a second; ports added at start fill their rings over the first ones). At most 15 s.
settled_frames() {
    local a b deadline=$(($(date +%s) + 15))
    a=$(frames "$1")
    while sleep 1; do
        b=$(frames "$1")
        if [ "$a" = "$b" ] || [ "$(date +%s)" -ge "$deadline" ]; then break; fi
        a=$b
    done
    echo "$b"
}

failed=0
summary=()
for kind in $KINDS; do
    IFS=/ read -r pod uplink offload <<<"$kind"
    echo "==> $kind: $MINUTES minute(s)"
    lab up --no-build --nodes 2 --pods-per-node 1 --pod-port "$pod" --uplink-port "$uplink" \
        --offload "${offload:-off}" >/dev/null
    list=$(lab list --json)
    dst=$(jq -r '.pods[] | select(.name == "n2-p1") | .ip' <<<"$list")
    src=$(jq -r '.pods[] | select(.name == "n1-p1") | .ip' <<<"$list")
    declare -A pid sock before
    for n in n1 n2; do
        pid[$n]=$(jq -r --arg n "$n" '.nodes[] | select(.name == $n) | .agent_pid' <<<"$list")
        sock[$n]=$(jq -r --arg n "$n" '.nodes[] | select(.name == $n) | .admin_socket' <<<"$list")
        lab reach n1-p1 n2-p1 --wait 5 >/dev/null
        before[$n]=$(settled_frames "${sock[$n]}")
    done
    secs=$((MINUTES * 60))
    lab exec n2-p1 iperf3 -s -p 5201 -D >/dev/null
    lab exec n1-p1 iperf3 -s -p 5202 -D >/dev/null
    timeout $((secs + 30)) "$REPO/scripts/lab.sh" exec --name "$LAB" n1-p1 \
        iperf3 -c "$dst" -p 5201 -P 4 -t "$secs" -J >"/tmp/soak-$pod-$uplink-tcp.json" &
    tcp=$!
    timeout $((secs + 30)) "$REPO/scripts/lab.sh" exec --name "$LAB" n2-p1 \
        iperf3 -c "$src" -p 5202 -u -b 0 -l 64 -t "$secs" -J >"/tmp/soak-$pod-$uplink-udp.json" &
    udp=$!
    declare -A rss_warm rss_end
    start=$(date +%s)
    # Paced sampling of memory while the traffic runs (the traffic's own end is what is waited for).
    while kill -0 "$tcp" 2>/dev/null || kill -0 "$udp" 2>/dev/null; do
        now=$(($(date +%s) - start))
        line="  t=${now}s rss:"
        for n in n1 n2; do
            r=$(rss_kib "${pid[$n]}")
            line+=" $n ${r} KiB"
            [ "$now" -ge 60 ] && [ -z "${rss_warm[$n]:-}" ] && rss_warm[$n]=$r
            rss_end[$n]=$r
        done
        echo "$line"
        sleep 30 & wait $! || true
    done
    wait "$tcp" || { echo "  the TCP iperf3 failed"; failed=1; }
    wait "$udp" || { echo "  the UDP iperf3 failed"; failed=1; }
    tcp_gbps=$(jq -r '(.end.sum_received.bits_per_second // 0) / 1e9 | . * 100 | round / 100' "/tmp/soak-$pod-$uplink-tcp.json")
    tcp_retr=$(jq -r '.end.sum_sent.retransmits // "?"' "/tmp/soak-$pod-$uplink-tcp.json")
    udp_kpps=$(jq -r '(.end.sum.packets // 0) / (.end.sum.seconds // 1) / 1e3 | round' "/tmp/soak-$pod-$uplink-udp.json")
    udp_loss=$(jq -r '(.end.sum.lost_percent // 0) * 10 | round / 10' "/tmp/soak-$pod-$uplink-udp.json")
    # Idle again: the ports received nothing over a whole sampling interval of the agent (bounded).
    for n in n1 n2; do
        deadline=$(($(date +%s) + 20))
        until [ "$(ferry_at "${sock[$n]}" stats --json | jq '[.ports[].rx_pps] | add')" = 0 ]; do
            [ "$(date +%s)" -lt "$deadline" ] || { echo "  $n: ports still busy after 20 s"; failed=1; break; }
            sleep 0.5
        done
    done
    for n in n1 n2; do
        after=$(settled_frames "${sock[$n]}")
        rss_end[$n]=$(rss_kib "${pid[$n]}")
        warm=${rss_warm[$n]:-${rss_end[$n]}}
        growth=$((rss_end[$n] - warm))
        verdict=ok
        jq -e '.unaccounted == 0' <<<"$after" >/dev/null || verdict="frames unaccounted"
        [ "$(jq .held <<<"$after")" = "$(jq .held <<<"${before[$n]}")" ] || verdict="frames stuck in ports"
        jq -e '.double_frees == 0' <<<"$after" >/dev/null || verdict="double frees"
        if [ "$growth" -gt 4096 ] && [ $((growth * 20)) -gt "$warm" ]; then verdict="memory grew ${growth} KiB"; fi
        [ "$verdict" = ok ] || failed=1
        row="$kind $n: TCP ${tcp_gbps} Gbit/s (${tcp_retr} retransmits), UDP 64 B ${udp_kpps} kpps (${udp_loss}% lost);"
        row+=" frames before $(jq -c 'del(.double_frees)' <<<"${before[$n]}") after $(jq -c 'del(.double_frees)' <<<"$after");"
        row+=" rss after 1 min ${warm} KiB, at the end ${rss_end[$n]} KiB: $verdict"
        echo "  $row"
        summary+=("$row")
        ferry_at "${sock[$n]}" stats | sed -n '/^drops in ferry/,$p' | sed 's/^/    /'
    done
    unset pid sock before rss_warm rss_end
    lab down >/dev/null
done
echo "==> soak, $MINUTES minute(s) per kind"
printf '%s\n' "${summary[@]}"
exit "$failed"
