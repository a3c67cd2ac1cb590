#!/usr/bin/env bash
# ferry's whole test suite: installs what it needs, then runs lints, unit/property/integration tests,
# the oracle tests (tshark, kernel VXLAN; root) and a bounded fuzz smoke run.
# Usage: sudo scripts/test.sh        (CI=1 makes a missing privilege or tool a failure)
# A test that cannot run here (no root, a tool missing) is skipped, and its name recorded in
# $FERRY_SKIP_LOG (ferry_testsupport::skip); the run ends by naming them, and fails under CI if any.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh
start=$(date +%s)
FERRY_SKIP_LOG=$(mktemp)
export FERRY_SKIP_LOG
trap 'rm -f "$FERRY_SKIP_LOG"' EXIT

step "system packages"
ensure_build_packages tshark iproute2 iputils-ping tcpdump netsniff-ng ethtool procps \
    etcd-server openssl containernetworking-plugins python3 chromium curl

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "kube-apiserver for the control plane's tests (built once from Debian's kubernetes source, then cached)"
if FERRY_KUBE_APISERVER=$(bash scripts/build-kube-apiserver.sh | tail -n1); then
    export FERRY_KUBE_APISERVER
elif [ -n "${CI:-}" ]; then
    echo "FAIL: no kube-apiserver and CI is set; run: sudo scripts/build-kube-apiserver.sh" >&2
    exit 1
else
    echo "SKIP: no kube-apiserver; the control plane's Kubernetes tests will skip" >&2
fi

step "tests (unit, property, integration, end-to-end labs in tests/e2e.rs; privileged ones need root)"
cargo test --workspace --locked

step "fuzz smoke (every encap/fuzz target, bounded in runs and time)"
bash scripts/fuzz-smoke.sh

step "benchmarks build (unoptimised, on the tests' build: this checks they build and link; cargo bench optimises)"
cargo build --workspace --benches --locked

step "end-to-end bench smoke (scripts/bench.sh --quick: every step must work; ratios are not judged here)"
cargo build --release --locked -p ferry
timeout 240 bash scripts/bench.sh --quick --no-build

echo
skipped=$(sort -u "$FERRY_SKIP_LOG" | paste -sd ' ' -)
count=$(sort -u "$FERRY_SKIP_LOG" | grep -c . || true)
echo "$count skipped${skipped:+: $skipped}"
if [ -n "${CI:-}" ] && [ "$count" -gt 0 ]; then
    echo "FAIL: CI is set, so every test must run" >&2
    exit 1
fi
echo "all tests passed in $(( $(date +%s) - start )) s"
