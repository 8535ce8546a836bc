#!/usr/bin/env bash
# C tests of the C API (include/mesh.h over mesh-ffi's static library):
#
#  1. the header compiles as C11 (-Wall -Wextra -Werror -pedantic, included
#     twice) and as C++17;
#  2. examples/c/test_misuse.c runs plain, then under AddressSanitizer;
#  3. test_misuse runs under valgrind (memcheck: no errors, no definite leaks)
#     in light mode (MESH_TEST_LIGHT=1: generations of a few tokens, no long
#     cancellation run), because memcheck runs the model ~50x slower;
#  4. examples/c/mesh-chat answers one line of stdin;
#  5. examples/c/mesh-pipeline runs a two-node mesh on loopback (pipeline
#     generation identical to local).
#
# Model: $MESH_MODEL, else "default" (fetched into the cache once).
#
# valgrind cannot execute AVX-512, which ggml uses when built with
# -march=native (its default). Step 3 therefore links against a second build of
# mesh-ffi in its own target dir ($CARGO_TARGET_DIR-valgrind, reused across runs)
# whose ggml is configured with LLAMA_NATIVE=OFF (AVX2/FMA/F16C only). Set
# MESH_SKIP_VALGRIND=1 to skip step 3.
#
# Prints "N passed, M failed" per test program; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

say() { echo "c-tests: $*" >&2; }

target_dir() {
  cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}
TARGET="${CARGO_TARGET_DIR:-$(target_dir)}"
OUT="$TARGET/c-tests"
mkdir -p "$OUT"

# Native libraries the static library needs (from `cargo rustc -p mesh-ffi
# --crate-type staticlib -- --print native-static-libs`; ggml has C++ parts).
LIBS=(-lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl)
CFLAGS=(-std=c11 -Wall -Wextra -Werror -pedantic -g -I"$root/include")
export MESH_MODEL="${MESH_MODEL:-default}"
export RUST_BACKTRACE=0 # the panic test prints the (expected) panic message

say "building mesh-ffi (dev profile, feature test-hooks)"
cargo build --quiet -p mesh-ffi --features test-hooks
LIB="$TARGET/debug/libmesh_ffi.a"

say "header: C11 twice, C++17"
printf '#include "mesh.h"\n#include "mesh.h"\nint main(void) { return mesh_abi_version() == MESH_ABI_VERSION ? 0 : 1; }\n' |
  cc "${CFLAGS[@]}" -DMESH_TEST_HOOKS -fsyntax-only -x c -
printf '#include "mesh.h"\n#include "mesh.h"\nint main() { return mesh_model_n_layers(nullptr, nullptr) == MESH_STATUS_NULL_ARG ? 0 : 1; }\n' |
  c++ -std=c++17 -Wall -Wextra -Werror -pedantic -I"$root/include" -DMESH_TEST_HOOKS -fsyntax-only -x c++ -
c++ -std=c++17 -Wall -Wextra -Werror -pedantic -DMESH_TEST_HOOKS -fsyntax-only -x c++ include/mesh.h

say "compiling the C programs"
cc "${CFLAGS[@]}" -DMESH_TEST_HOOKS examples/c/test_misuse.c "$LIB" "${LIBS[@]}" -o "$OUT/test_misuse"
cc "${CFLAGS[@]}" examples/c/mesh-chat.c "$LIB" "${LIBS[@]}" -o "$OUT/mesh-chat"
cc "${CFLAGS[@]}" examples/c/mesh-pipeline.c "$LIB" "${LIBS[@]}" -o "$OUT/mesh-pipeline"
cc "${CFLAGS[@]}" -DMESH_TEST_HOOKS -fsanitize=address -fno-omit-frame-pointer \
  examples/c/test_misuse.c "$LIB" "${LIBS[@]}" -o "$OUT/test_misuse_asan"
if ! nm "$OUT/test_misuse_asan" | grep '__asan_init' >/dev/null; then
  say "test_misuse_asan is not linked with AddressSanitizer"
  exit 1
fi

say "test_misuse (model: $MESH_MODEL)"
"$OUT/test_misuse"

say "test_misuse under AddressSanitizer"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1" \
  "$OUT/test_misuse_asan"

say "mesh-chat, one line of stdin"
reply="$(echo "What is the capital of France?" | "$OUT/mesh-chat" "$MESH_MODEL" 24)"
if [ -z "${reply//[[:space:]]/}" ]; then
  say "mesh-chat printed nothing"
  exit 1
fi
say "mesh-chat answered: $(echo "$reply" | head -c 200 | tr '\n' ' ')"

say "mesh-pipeline: two nodes on loopback"
"$OUT/mesh-pipeline" "$MESH_MODEL" 2>"$OUT/mesh-pipeline.events"
say "mesh-pipeline: $(grep -c '"event"' "$OUT/mesh-pipeline.events") node events"

if [ "${MESH_SKIP_VALGRIND:-0}" = 1 ]; then
  say "valgrind skipped (MESH_SKIP_VALGRIND=1)"
  say "all C tests passed"
  exit 0
fi

if ! command -v valgrind >/dev/null 2>&1; then
  say "installing valgrind"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind >/dev/null
fi

# ggml without -march=native (scripts/portable-build.sh), in its own target dir.
. scripts/portable-build.sh
VG_TARGET="$(CARGO_TARGET_DIR="$TARGET" portable_target_dir)"
say "building mesh-ffi for valgrind (ggml without -march=native) in $VG_TARGET"
(CARGO_TARGET_DIR="$TARGET" portable_env && cargo build --quiet -p mesh-ffi --features test-hooks)
cc "${CFLAGS[@]}" -DMESH_TEST_HOOKS examples/c/test_misuse.c "$VG_TARGET/debug/libmesh_ffi.a" "${LIBS[@]}" \
  -o "$OUT/test_misuse_vg"

say "test_misuse under valgrind (light mode)"
vg_log="$OUT/valgrind.log"
if ! MESH_TEST_LIGHT=1 valgrind --leak-check=full --errors-for-leak-kinds=definite \
  --error-exitcode=1 --log-file="$vg_log" "$OUT/test_misuse_vg"; then
  cat "$vg_log" >&2
  say "valgrind reported errors or definite leaks (log above)"
  exit 1
fi
grep -E "ERROR SUMMARY|definitely lost|indirectly lost" "$vg_log" | sed 's/^==[0-9]*== */valgrind: /' >&2
say "all C tests passed"
