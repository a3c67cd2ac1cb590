#!/usr/bin/env bash
# Fetches the web view's one front-end library through npm and compares it with the checked-in copy
# (web/vendor/README.md). --update replaces the copy (then update the sha256 in the README).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=htm@3.1.1
FILE=package/preact/standalone.module.js
DEST=web/vendor/htm-preact-standalone.module.js
command -v npm >/dev/null || { echo "vendor-web: npm is not installed (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && timeout 120 npm pack --silent "$PKG" >/dev/null)
tar -xzf "$tmp"/htm-*.tgz -C "$tmp" "$FILE"
if [ "${1:-}" = --update ]; then
    cp "$tmp/$FILE" "$DEST"
    sha256sum "$DEST"
elif cmp -s "$tmp/$FILE" "$DEST"; then
    echo "vendor-web: $DEST is $PKG's $FILE"
else
    echo "vendor-web: $DEST differs from $PKG's $FILE (--update to replace it)" >&2
    exit 1
fi
