#!/usr/bin/env bash
# Checks of the Swift package that need no Swift toolchain (there is none on
# this machine, so MeshLLM.swift itself is NOT compiled here):
#
#  1. Sources/CMesh/module.modulemap is a valid Clang module over the
#     repository's include/mesh.h: check/probe.m does `@import CMesh;` and
#     uses every C declaration MeshLLM.swift uses, with the types it assumes
#     (clang -fmodules -fsyntax-only -Wall -Wextra -Werror);
#  2. the same module is imported from C (#pragma clang module import);
#  3. every mesh_* identifier MeshLLM.swift names exists in include/mesh.h.
#
# Exits non-zero on any failure. Needs clang (installed from apt if missing).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
say() { echo "swift-check: $*" >&2; }

CLANG="${CLANG:-$(command -v clang || command -v clang-14 || true)}"
if [ -z "$CLANG" ]; then
  say "installing clang (apt)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang >/dev/null
  CLANG="$(command -v clang)"
fi

cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
MODFLAGS=(-fmodules -fmodules-cache-path="$cache" -fmodule-map-file="$here/Sources/CMesh/module.modulemap"
  -Wall -Wextra -Werror -fsyntax-only)

say "module CMesh from Objective-C (@import CMesh) with $("$CLANG" --version | head -1)"
"$CLANG" "${MODFLAGS[@]}" -x objective-c "$here/check/probe.m"

say "module CMesh from C11 (#pragma clang module import)"
{ echo '#pragma clang module import CMesh'; sed '/^@import CMesh;$/d' "$here/check/probe.m"; } |
  "$CLANG" "${MODFLAGS[@]}" -std=c11 -pedantic -x c -

say "mesh_* names used by MeshLLM.swift exist in include/mesh.h"
missing=0
for name in $(grep -o '\bmesh_[a-z_]*' "$here/Sources/MeshLLM/MeshLLM.swift" | sort -u); do
  if ! grep -q "\b$name\b" "$root/include/mesh.h"; then
    say "  $name is not in include/mesh.h"
    missing=1
  fi
done
[ "$missing" -eq 0 ] || exit 1
say "ok (the Swift sources themselves were not compiled: no Swift toolchain here)"
