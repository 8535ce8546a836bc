#!/usr/bin/env bash
# The tests whose expectations depend on the CPU class (goldens recorded with
# upstream llama.cpp, exact mode, perplexity, LoRA), run on the AVX2 class on
# any x86-64 machine:
#
#  - ggml built without -march=native (LLAMA_NATIVE=OFF: AVX2, FMA, F16C and
#    no AVX-512), in its own target dir ($CARGO_TARGET_DIR-valgrind, shared
#    with the valgrind build of scripts/c-tests.sh and reused across runs);
#  - mesh-llm's own AVX-512 kernels switched off (MESH_NO_AVX512=1).
#
# On an AVX-512 machine this exercises the class the normal test run does not;
# on an AVX2 machine it repeats it. Extra arguments go to `cargo test`.
# Model: $MESH_MODEL, else the default model (fetched into the cache once).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/portable-build.sh

if [ -z "${MESH_MODEL:-}" ] || [ "$MESH_MODEL" = default ]; then
  MESH_MODEL="$(cargo run --quiet -p mesh-cli -- fetch)"
fi
export MESH_MODEL MESH_NO_AVX512=1
portable_env
echo "cpu-class-tests: ggml without -march=native in $CARGO_TARGET_DIR, MESH_NO_AVX512=1" >&2
# The unit tests (kernel variants), the tests whose expectations name a
# CPU class, and q4_1_gemm (our Q4_1 and single-token Q8_0 kernels against
# this class's ggml, bit for bit). Private mode runs on exact mode, which
# engine_exact and lora prove class-independent; the whole mesh-core suite
# also passes here (MESH_CPU_CLASS_ALL=1 runs it, ~45 min on 2 cores).
tests=(engine_exact engine_golden perplexity lora q4_1_gemm)
args=(--lib)
for t in "${tests[@]}"; do args+=(--test "$t"); done
[ "${MESH_CPU_CLASS_ALL:-0}" = 1 ] && args=()
cargo test -p mesh-core "${args[@]}" "$@"
