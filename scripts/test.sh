#!/usr/bin/env bash
# ferry's whole test suite: installs what it needs, then runs lints, unit/property/integration tests,
# the oracle tests (tshark, kernel VXLAN; root) and a bounded fuzz smoke run.
# Usage: sudo scripts/test.sh        (CI=1 makes a missing privilege or tool a failure)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh
start=$(date +%s)

step "system packages"
ensure_build_packages tshark iproute2 iputils-ping tcpdump netsniff-ng ethtool \
    etcd-server openssl containernetworking-plugins python3

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

step "benchmarks compile"
cargo bench --workspace --locked --no-run >/dev/null

step "end-to-end bench smoke (scripts/bench.sh --quick: every step must work; ratios are not judged here)"
cargo build --release --locked -p ferry
timeout 240 bash scripts/bench.sh --quick --no-build

echo
echo "all tests passed in $(( $(date +%s) - start )) s"
