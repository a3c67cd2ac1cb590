#!/usr/bin/env bash
# Build a real kube-apiserver from Debian's `kubernetes` source package and cache it outside the checkout.
# Idempotent: when a cached binary exists this prints its path and exits at once.
#
# Usage: sudo scripts/build-kube-apiserver.sh      (prints the binary's path on its last line)
# Env:   FERRY_CACHE_DIR (default /var/cache/ferry), FERRY_KUBE_APISERVER (use this binary, skip everything)
#
# Why from source: no package registry ships a kube-apiserver binary, but Debian's source package carries the
# whole tree with vendored dependencies. One patch is needed: the vendored modern-go/reflect2 v1.0.1 faults under
# Go >= 1.18 in map iteration; Debian's golang-github-modern-go-reflect2-dev (1.0.2) replaces it.
# The deb-src entry is derived from the machine's own apt configuration into a private source list, so neither
# the system's apt config nor this repository names an archive host.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

cache=${FERRY_CACHE_DIR:-/var/cache/ferry}

cached_binary() {
    if [ -n "${FERRY_KUBE_APISERVER:-}" ] && [ -x "$FERRY_KUBE_APISERVER" ]; then
        echo "$FERRY_KUBE_APISERVER"
        return 0
    fi
    local b
    for b in "$cache"/kube-apiserver-*/kube-apiserver; do
        [ -x "$b" ] && { echo "$b"; return 0; }
    done
    return 1
}

if bin=$(cached_binary); then
    echo "kube-apiserver cached: $bin" >&2
    echo "$bin"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "kube-apiserver is not cached under $cache and building it needs root (apt, $cache); run: sudo $0" >&2
    exit 1
fi

started=$(date +%s)
ensure_apt golang-go rsync dpkg-dev make golang-github-modern-go-reflect2-dev

# --- a private deb-src list derived from the machine's Debian archive entries -----------------------------
apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial"
srclist=$apt_dir/sources.list
: >"$srclist"
shopt -s nullglob
for f in /etc/apt/sources.list.d/*.sources; do
    # deb822 stanzas -> one-line deb-src entries, keeping only the Debian archive itself (URI path ends in /debian).
    awk '
        function flush() {
            if (uris != "" && types ~ /(^| )deb( |$)/) {
                n = split(uris, u, " "); m = split(suites, s, " ")
                for (i = 1; i <= n; i++) {
                    if (u[i] !~ /\/debian\/?$/) continue
                    for (j = 1; j <= m; j++) {
                        opt = (key != "") ? "[signed-by=" key "] " : ""
                        print "deb-src " opt u[i] " " s[j] " " comps
                    }
                }
            }
            types = uris = suites = comps = key = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^Types:/      { sub(/^Types:[ \t]*/, "");      types = $0 }
        /^URIs:/       { sub(/^URIs:[ \t]*/, "");       uris = $0 }
        /^Suites:/     { sub(/^Suites:[ \t]*/, "");     suites = $0 }
        /^Components:/ { sub(/^Components:[ \t]*/, ""); comps = $0 }
        /^Signed-By:/  { sub(/^Signed-By:[ \t]*/, "");  key = $0 }
        END { flush() }
    ' "$f" >>"$srclist"
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { $1 = "deb-src"; for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($i ~ /\/debian\/?$/) print; break } }' \
        "$f" >>"$srclist"
done
sort -u -o "$srclist" "$srclist"
if [ ! -s "$srclist" ]; then
    echo "no Debian archive entry found in /etc/apt/sources.list{,.d/*}; configure apt first" >&2
    exit 1
fi
id _apt >/dev/null 2>&1 && chown -R _apt "$apt_dir/lists" || true
apt_opts=(-o "Dir::Etc::sourcelist=$srclist" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$apt_dir/lists")
echo "updating the private deb-src index ($srclist)" >&2
apt-get "${apt_opts[@]}" update -qq

# --- fetch and unpack the source package ---------------------------------------------------------------------
build=$cache/build
mkdir -p "$build"
cd "$build"
rm -rf kubernetes-src
mkdir kubernetes-src
cd kubernetes-src
id _apt >/dev/null 2>&1 && chown _apt . || true
apt-get "${apt_opts[@]}" source --download-only -qq kubernetes
dsc=$(ls ./*.dsc | head -n1)
version=$(sed -n 's/^Version: //p' "$dsc")
echo "unpacking kubernetes $version" >&2
dpkg-source --no-check -x "$dsc" tree >/dev/null
tree=$PWD/tree

# --- the reflect2 patch ----------------------------------------------------------------------------------------
r2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -d "$r2_src" ] || { echo "missing $r2_src (golang-github-modern-go-reflect2-dev)" >&2; exit 1; }
rsync -a --delete --exclude '*_test.go' --exclude 'test*/' "$r2_src/" "$tree/vendor/github.com/modern-go/reflect2/"
sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#g' "$tree/go.mod" "$tree/vendor/modules.txt"
grep -q 'github.com/modern-go/reflect2 v1.0.2' "$tree/vendor/modules.txt" \
    || { echo "reflect2 patch did not apply to vendor/modules.txt" >&2; exit 1; }

# --- build -------------------------------------------------------------------------------------------------------
mkdir -p "$tree/.go/src/k8s.io"
ln -sfn "$tree" "$tree/.go/src/k8s.io/kubernetes"
echo "building cmd/kube-apiserver (several minutes)" >&2
(
    cd "$tree/.go/src/k8s.io/kubernetes"
    export GOPATH=$tree/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor GOCACHE=$build/gocache
    export KUBE_GIT_VERSION="v${version##*really}" KUBE_GIT_TREE_STATE=clean
    KUBE_GIT_VERSION=${KUBE_GIT_VERSION%%-*}
    make WHAT=cmd/kube-apiserver >&2
)
out=$(find "$tree/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
[ -n "$out" ] || { echo "build finished but no kube-apiserver binary under $tree/_output" >&2; exit 1; }
"$out" --version >&2

dest=$cache/kube-apiserver-$version
mkdir -p "$dest"
install -m 0755 "$out" "$dest/kube-apiserver.tmp"
mv "$dest/kube-apiserver.tmp" "$dest/kube-apiserver"
rm -rf "$build/kubernetes-src"
echo "kube-apiserver $version built in $(( $(date +%s) - started )) s, cached at $dest/kube-apiserver" >&2
echo "$dest/kube-apiserver"
