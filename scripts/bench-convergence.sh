#!/usr/bin/env bash
# Convergence benchmark: API write -> forwarding table published, with 1,000 Nodes in a real
# kube-apiserver (built once by scripts/build-kube-apiserver.sh, cached outside the checkout) backed by
# Debian's etcd, both started on 127.0.0.1 by the benchmark itself. Prints p50/p90/p99/max per phase.
# Usage: sudo scripts/bench-convergence.sh     (FERRY_BENCH_NODES / FERRY_BENCH_WRITES to resize)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_build_packages etcd-server openssl
FERRY_KUBE_APISERVER=$(bash scripts/build-kube-apiserver.sh | tail -n1)
export FERRY_KUBE_APISERVER
# The release profile aborts on panic; unwind here so that a failed run still drops (kills) the servers.
CARGO_PROFILE_RELEASE_PANIC=unwind cargo run --release --locked -p ferry-control --example convergence
