#!/usr/bin/env bash
# Regenerate include/mesh.h with the pinned cbindgen and fail if the checked-in
# header differs (the C API changed without its header).
#
#   scripts/check-header.sh          check (exit 1 on drift)
#   scripts/check-header.sh --write  regenerate include/mesh.h in place
#
# Installs the pinned cbindgen with `cargo install --locked` when it is missing
# or another version.
set -euo pipefail
cd "$(dirname "$0")/.."

CBINDGEN_VERSION=0.29.4
HEADER=include/mesh.h

have="$(cbindgen --version 2>/dev/null || true)"
if [ "$have" != "cbindgen $CBINDGEN_VERSION" ]; then
  echo "check-header: installing cbindgen $CBINDGEN_VERSION (found: ${have:-none})" >&2
  cargo install cbindgen --version "$CBINDGEN_VERSION" --locked --quiet
fi

generate() {
  cbindgen --quiet --config mesh-ffi/cbindgen.toml --crate mesh-ffi --output "$1" mesh-ffi
}

if [ "${1:-}" = "--write" ]; then
  generate "$HEADER"
  echo "check-header: wrote $HEADER"
  exit 0
fi

tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
generate "$tmp"
if ! diff -u "$HEADER" "$tmp"; then
  echo "check-header: $HEADER is out of date with mesh-ffi/src (diff above: - checked in, + generated)." >&2
  echo "check-header: run scripts/check-header.sh --write and commit the header." >&2
  exit 1
fi
echo "check-header: $HEADER is up to date (cbindgen $CBINDGEN_VERSION)"
