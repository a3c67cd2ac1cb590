#!/usr/bin/env bash
# Instructions per packet of the worker loop (the worker bench's fixture: in-memory ports, 64-byte
# UDP, 64 packets a round), counted by callgrind: stable on a shared, noisy machine where times are
# not. Each direction runs at two round counts; the difference in instructions divided by the
# difference in packets is the per-packet figure (set-up and start-up cancel out). Needs valgrind.
#
# Usage: scripts/worker-ir.sh [--size BYTES] [--rounds-low N] [--rounds-high N] [--bin PATH] [--flows]
#   --size: frame size (the inner frame for decap), 64 (default) to 1464.
#   --flows: with the worker's flow records on (dataplane.flows = true).
#   --bin: an already built `worker_rounds` example (default: build it in the bench profile).
set -euo pipefail

LOW=200
HIGH=1200
BIN=""
SIZE=64
while [[ $# -gt 0 ]]; do
    case "$1" in
    --rounds-low) LOW="$2"; shift 2 ;;
    --rounds-high) HIGH="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --flows) export WORKER_FLOWS=1; shift ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
(( HIGH > LOW )) || { echo "--rounds-high must exceed --rounds-low" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "$BIN" ]]; then
    (cd "$root" && cargo build --profile bench -p ferry-dataplane --example worker_rounds)
    BIN="$root/target/release/examples/worker_rounds"
fi
[[ -x "$BIN" ]] || { echo "no worker_rounds binary at '$BIN'" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Total instructions of one run of direction $1 with $2 rounds.
count() {
    local out="$tmp/cg.$1.$2"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" "$1" "$2" "$SIZE" >/dev/null 2>"$tmp/log" ||
        { cat "$tmp/log" >&2; exit 1; }
    awk '/^summary:/ { print $2 }' "$out"
}

for dir in encap decap; do
    lo="$(count "$dir" "$LOW")"
    hi="$(count "$dir" "$HIGH")"
    awk -v d="$dir" -v s="$SIZE" -v lo="$lo" -v hi="$hi" -v n=$(( (HIGH - LOW) * 64 )) -v lr="$LOW" -v hr="$HIGH" \
        -v f="${WORKER_FLOWS:+ (flows on)}" 'BEGIN { printf "%s %s B%s: %.1f instructions/packet (%.0f and %.0f instructions at %s and %s rounds)\n", d, s, f, (hi - lo) / n, lo, hi, lr, hr }'
done
