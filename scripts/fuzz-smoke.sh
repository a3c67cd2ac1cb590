#!/usr/bin/env bash
# Bounded fuzz smoke run: every ferry-encap fuzz target (encap/fuzz) from its seed corpus, each for at
# most FUZZ_RUNS inputs and FUZZ_SECONDS seconds. Installs cargo-fuzz if it is missing. Exits non-zero
# when any target crashes, times out or fails to build; crash inputs land in encap/fuzz/artifacts/.
# Usage: scripts/fuzz-smoke.sh [target...]      (default: all targets; longer runs: encap/fuzz/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

seconds=${FUZZ_SECONDS:-4}
runs=${FUZZ_RUNS:-1000000}

cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
# libfuzzer-sys compiles libFuzzer's C++ sources.
command -v c++ >/dev/null || ensure_apt g++

# cargo-fuzz has no --locked; check the fuzz crate's own lockfile first so a stale one fails here
# (update it with `cargo fetch --manifest-path encap/fuzz/Cargo.toml` and commit it).
cargo fetch --locked --manifest-path encap/fuzz/Cargo.toml

# The fuzz crate is outside the root workspace, so the workspace's fmt and clippy do not see it.
cargo fmt --manifest-path encap/fuzz/Cargo.toml --check
cargo clippy --manifest-path encap/fuzz/Cargo.toml --all-targets --locked -- -D warnings

cd encap
# No sanitizer: the default, AddressSanitizer, needs -Zsanitizer and so a nightly toolchain, and
# ferry-encap has no unsafe code for it to watch. Coverage guidance and panics work on stable.
cargo fuzz build -s none

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)

# New inputs go to a scratch directory (the first one given), so the committed seeds stay as generated.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    # Without backtraces the panic message and cargo-fuzz's reproduce hints fit a short excerpt.
    if RUST_BACKTRACE=0 cargo fuzz run -s none "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -runs="$runs" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 >"$work/$t.log" 2>&1; then
        printf '%-18s %s\n' "$t" "$(grep -E '^#[0-9]+' "$work/$t.log" | tail -n1)"
    else
        echo "FAIL: fuzz target $t" >&2
        grep -h -A1 'panicked at' "$work/$t.log" >&2 || true
        tail -n 25 "$work/$t.log" >&2
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets failed: ${failed[*]} (reproduce: cd encap && cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>)" >&2
    exit 1
fi
