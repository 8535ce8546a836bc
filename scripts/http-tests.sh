#!/usr/bin/env bash
# `mesh serve` against the official OpenAI and Ollama Python clients, and the
# chat page in headless Chromium: builds `mesh` (dev profile), installs the
# clients, selenium and pytest from PyPI into a venv under
# ~/.cache/mesh-llm/http-venv, runs examples/cli/tests/http/.
#
# The page test runs when Chromium is installed; with --browser (or
# MESH_BROWSER=1, as CI sets) Debian's chromium and chromium-driver are
# installed first and the page test must run.
#
# Model: $MESH_MODEL, else "default" (fetched into the cache once).
# Extra arguments go to pytest. Exits non-zero on any failure, and when
# pytest collected no tests.
set -euo pipefail
browser="${MESH_BROWSER:-0}"
if [ "${1:-}" = "--browser" ]; then browser=1; shift; fi
root="$(cd "$(dirname "$0")/.." && pwd)"
say() { echo "http-tests: $*" >&2; }
cd "$root"
say "building mesh (dev profile, with the test build's features)"
# `cargo build -p mesh-cli` would resolve other features for shared
# dependencies than the workspace's test build (scripts/test.sh) and compile
# them again; this builds (or finds) the same `mesh` the CLI tests use.
cargo test --quiet --workspace --no-run
TARGET="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
export MESH_BIN="$TARGET/debug/mesh"
export MESH_MODEL="${MESH_MODEL:-$("$MESH_BIN" fetch)}"

VENV="$HOME/.cache/mesh-llm/http-venv"
# The current clients (what users install); a cached venv is reused.
PKGS=(pytest "openai>=1.0" "ollama>=0.4" selenium)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pytest, openai, ollama, selenium' 2>/dev/null; then
  say "installing ${PKGS[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PKGS[@]}"
fi
"$VENV/bin/python" -c 'from importlib.metadata import version as v; print("http-tests: clients: openai", v("openai"), "/ ollama", v("ollama"), "/ selenium", v("selenium"))' >&2

if [ "$browser" = 1 ]; then
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    say "installing chromium and chromium-driver (Debian)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
  export MESH_REQUIRE_BROWSER=1
fi

status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" examples/cli/tests/http || status=$?
if [ "$status" -eq 5 ]; then
  say "pytest collected no tests"
fi
exit "$status"
