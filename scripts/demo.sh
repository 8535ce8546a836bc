#!/usr/bin/env bash
# The demo: chat with the default model (SmolLM2-135M-Instruct, fetched on first use).
# Usage: scripts/demo.sh ["your question"]
# Greedy decoding: a 135M model answers best at temperature 0 (0.7 wanders off).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
prompt="${1:-What is the capital of France? Answer in one sentence.}"
cargo run --quiet --release -p mesh-cli -- generate --model default --chat \
  --prompt "$prompt" --max-tokens 128 --temperature 0
