# shellcheck shell=bash
# Shared helpers for ferry's scripts. Source it; it defines functions only.

# Install Debian packages that are missing (needs root; apt's sources come from the machine).
ensure_apt() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]}; run as root (sudo) so they can be installed" >&2
        return 1
    fi
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # tshark asks whether non-root users may capture; answer for it.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The Debian packages needed to build ferry (cargo build of the whole workspace), in one place for every script
# that builds: libbpf-sys/libxdp-sys compile libbpf and ferry's XDP programs (clang, libelf, zlib, m4,
# pkg-config, kernel headers), etcd-client's build runs protoc.
FERRY_BUILD_PACKAGES=(gcc clang pkg-config libelf-dev zlib1g-dev m4 libbpf-dev linux-libc-dev
    protobuf-compiler libprotobuf-dev)

# Install what building ferry needs (see FERRY_BUILD_PACKAGES), plus any extra packages named.
ensure_build_packages() {
    ensure_apt "${FERRY_BUILD_PACKAGES[@]}" "$@"
}

# Fail (CI) or warn (elsewhere) when not root: privileged tests are never skipped in CI.
require_root_or_skip() {
    if [ "$(id -u)" -eq 0 ]; then return 0; fi
    if [ -n "${CI:-}" ]; then
        echo "FAIL: $1 needs root and CI is set; run as root" >&2
        exit 1
    fi
    echo "SKIP: $1 needs root (run: sudo scripts/test.sh)" >&2
    return 1
}

step() { printf '\n==> %s\n' "$*"; }

# alive PID: true while the process runs (a zombie or a vanished process is dead: this machine's
# PID 1 does not reap orphans).
alive() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# start_ferry_agent FERRY NETNS DIR WHO: runs `FERRY run --config DIR/config.toml` in NETNS, outliving
# the caller (setsid; `ip netns exec` execs the agent, so $! is its pid, written to DIR/agent.pid),
# logging to DIR/agent.log, and waits up to 15 s until its admin socket DIR/ferry.sock answers.
# WHO names the agent in the messages.
start_ferry_agent() {
    local ferry=$1 ns=$2 dir=$3 who=$4 i
    # A base.toml beside the node's config is layered under it (the lab's copy of deploy/ferry.toml).
    local configs=(--config "$dir/config.toml")
    [ -f "$dir/base.toml" ] && configs=(--config "$dir/base.toml" "${configs[@]}")
    # Descriptors 3-9 closed: a daemon must not keep a caller's lock (`flock FILE lab.sh up`) held.
    setsid ip netns exec "$ns" "$ferry" run "${configs[@]}" >>"$dir/agent.log" 2>&1 </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
    echo $! >"$dir/agent.pid"
    for ((i = 0; i < 150; i++)); do
        if ! alive "$(cat "$dir/agent.pid")"; then
            echo "$who exited at start; last lines of $dir/agent.log:" >&2
            tail -n 20 "$dir/agent.log" >&2
            return 1
        fi
        if [ -S "$dir/ferry.sock" ] && ip netns exec "$ns" "$ferry" status --socket "$dir/ferry.sock" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "$who did not answer on $dir/ferry.sock within 15 s; last lines of $dir/agent.log:" >&2
    tail -n 20 "$dir/agent.log" >&2
    return 1
}
