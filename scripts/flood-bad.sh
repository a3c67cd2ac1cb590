#!/usr/bin/env bash
# A mixed flood of malformed and refused frames at one lab node, then an account of every frame.
# Not part of CI (it runs for a minute and loads the machine); run it by hand after changing the
# pipeline or the XDP programs.
#
#   sudo scripts/flood-bad.sh [--seconds S] [--rate PPS] [--name LAB] [--no-build]
#
# Builds a 2-node lab (1 pod each, LAB default "floodlab"), then for S seconds (default 60) sends
# every class of frame a router must refuse, round robin, from the underlay toward n1's uplink and
# from n1-p1 toward its gateway, each at about PPS frames per second (default 20000; one Python
# sender per side). Afterwards every frame sent must be accounted for on n1: counted under its drop
# reason, or dropped before ferry saw it (the AF_XDP sockets' drops in `ferry stats`, the
# receiving interfaces' rx_dropped). Then the lab's connectivity check must pass: the agent is still
# forwarding. Exit 0 only if both hold. The lab is removed at the end, also on failure.
# Binaries: $FERRY_BIN_DIR with --no-build (e.g. target/debug), else a release build, as lab.sh.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
LAB_SH="$REPO/scripts/lab.sh"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || echo python3)
BAD="$REPO/tests/e2e/badframes.py"

die() { echo "flood-bad.sh: $*" >&2; exit 1; }

SECONDS_=60
RATE=20000
NAME=floodlab
BUILD=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --no-build) BUILD=(--no-build); shift ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, AF_XDP)"
case "$SECONDS_$RATE" in *[!0-9]*) die "--seconds and --rate take whole numbers" ;; esac

lab() { timeout -k 5 300 "$LAB_SH" --name "$NAME" "$@"; }
cleanup() { lab down >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
# The AF_XDP uplink (every frame from the underlay reaches ferry's pipeline; the default lab's UDP uplink
# hands only well-formed tunnel datagrams on) and tap pods.
lab up --nodes 2 --pods-per-node 1 --uplink-port afxdp --offload off "${BUILD[@]}" >/dev/null

json() { lab exec n1 "${FERRY_BIN_DIR:-$REPO/target/release}/ferry" "$1" --json \
    --socket "/run/ferry-lab/$NAME/nodes/n1/ferry.sock"; }
field() { "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {"d": d}))' "$1"; }

status=$(json status)
mac=$(field 'd["node"]["underlay_mac"]' <<<"$status")
ul_ip=$(field 'd["node"]["underlay_addr"]' <<<"$status")
gw_mac=$(field 'd["node"]["gateway_mac"]' <<<"$status")
port=$(field 'd["node"]["tunnel_port"]' <<<"$status")
vni=$(field 'd["node"]["vni"]' <<<"$status")
list=$(lab list --json)
n2_ul=$(field '[n["underlay_ip"] for n in d["nodes"] if n["name"] == "n2"][0]' <<<"$list")
p1=$(field '[p["ip"] for p in d["pods"] if p["name"] == "n1-p1"][0]' <<<"$list")
p2=$(field '[p["ip"] for p in d["pods"] if p["name"] == "n2-p1"][0]' <<<"$list")
pod_if=$(field '[p["ifname"] for p in d["pods"]][0]' <<<"$status")

# What n1 has counted so far: ferry's drops by reason plus every drop before ferry (socket drops,
# interface rx_dropped of the uplink and of the pod's host-side veth).
account() {
    local stats
    stats=$(json stats)
    local ul_drop pod_drop
    ul_drop=$(lab exec n1 cat /sys/class/net/ul0/statistics/rx_dropped)
    pod_drop=$(lab exec n1 cat "/sys/class/net/$pod_if/statistics/rx_dropped")
    "$PY" -c '
import json, sys
d = json.load(sys.stdin)
out = dict(d["drops"])
out["(socket drops)"] = sum(p["socket_drops_total"] for p in d["ports"])
out["(interface rx_dropped)"] = int(sys.argv[1]) + int(sys.argv[2])
print(json.dumps(out))' "$ul_drop" "$pod_drop" <<<"$stats"
}

before=$(account)
echo "flooding n1 for ${SECONDS_}s at ~${RATE} frames/s from the underlay and from n1-p1 ..."
sent_ul=$(mktemp) sent_pod=$(mktemp)
sender() { timeout -k 5 $((SECONDS_ + 120)) "$LAB_SH" --name "$NAME" exec "$@"; }
sender ul "$PY" "$BAD" flood-uplink n1 "$mac" "$ul_ip" "$n2_ul" "$port" "$vni" "$p2" "$p1" "$ul_ip" \
    "$SECONDS_" "$RATE" >"$sent_ul" &
ul_pid=$!
sender n1-p1 "$PY" "$BAD" flood-pod eth0 "$gw_mac" "$p1" "$p2" "$SECONDS_" "$RATE" >"$sent_pod" &
pod_pid=$!
wait "$ul_pid" || die "the underlay sender failed"
wait "$pod_pid" || die "the pod sender failed"

# Counters are published every few milliseconds and sampled by the agent once a second: wait until
# two samples a second apart agree (bounded).
prev=""
for _ in $(seq 1 20); do
    after=$(account)
    [ "$after" = "$prev" ] && break
    prev=$after
    sleep 1
done

result=0
"$PY" - "$before" "$after" "$sent_ul" "$sent_pod" <<'EOF' || result=1
import json, sys
before, after = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sent = {}
for path in sys.argv[3:5]:
    for line in open(path):
        name, n = line.split()
        sent[name] = sent.get(name, 0) + int(n)
delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
total_sent = sum(sent.values())
print("%-26s %10s %10s" % ("class / reason", "sent", "counted"))
ok = True
for name in sorted(sent):
    print("%-26s %10d %10d" % (name, sent[name], delta.get(name, 0)))
    if delta.get(name, 0) > sent[name]:
        ok = False
for k in ("(socket drops)", "(interface rx_dropped)"):
    print("%-26s %10s %10d" % (k, "", delta[k]))
others = {k: v for k, v in delta.items() if k not in sent and not k.startswith("(") and v}
for k, v in sorted(others.items()):
    print("%-26s %10s %10d   (not sent by the flood)" % (k, "", v))
accounted = sum(delta.get(n, 0) for n in sent) + delta["(socket drops)"] + delta["(interface rx_dropped)"]
print("sent %d, accounted for %d, unaccounted %d" % (total_sent, accounted, total_sent - accounted))
if accounted != total_sent or not ok:
    print("FAIL: not every frame is accounted for")
    sys.exit(1)
EOF

echo "connectivity after the flood:"
lab check || { echo "FAIL: the lab check failed after the flood"; result=1; }
rm -f "$sent_ul" "$sent_pod"
exit "$result"
