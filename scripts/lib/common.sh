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
