#!/usr/bin/env bash
# The demo: a 3-node mesh on this machine (loopback), the same question answered
# locally, through the pipeline and in private mode, with the figures side by
# side (`mesh demo`). Fetches the default model on first use.
# Usage: scripts/demo.sh [--serve] [--prompt "your question"]
#   --serve  then keep the mesh up behind `mesh serve`: chat page at
#            http://127.0.0.1:11435/, OpenAI API at /v1, Ollama API at /api.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "demo: building mesh (release; the first build takes a few minutes)" >&2
cargo build --quiet --release -p mesh-cli
TARGET="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
exec "$TARGET/release/mesh" demo "$@"
