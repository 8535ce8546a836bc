#!/usr/bin/env bash
# Tests of the Python bindings (bindings/python/mesh_llm over libmesh_ffi.so):
# builds mesh-ffi (dev profile), makes sure pytest is there (a venv under
# ~/.cache/mesh-llm/pyenv when the system python has none), runs the tests.
#
# Model: $MESH_MODEL, else "default" (fetched into the cache once).
# Extra arguments go to pytest (e.g. -k generate). Exits non-zero on any
# failure, and when pytest collected no tests (its exit status 5).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
say() { echo "python-tests: $*" >&2; }

cd "$root"
say "building mesh-ffi (dev profile)"
cargo build --quiet -p mesh-ffi
TARGET="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
export MESH_LIB="$TARGET/debug/libmesh_ffi.so"
[ -f "$MESH_LIB" ] || { say "$MESH_LIB was not built"; exit 1; }
export MESH_MODEL="${MESH_MODEL:-default}"

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  VENV="$HOME/.cache/mesh-llm/pyenv"
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pytest' 2>/dev/null; then
    say "installing pytest into $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check pytest
  fi
  PY="$VENV/bin/python"
fi

say "pytest (library: $MESH_LIB, model: $MESH_MODEL)"
cd "$here"
# `python -m pytest` from here puts the in-tree mesh_llm package first on sys.path.
status=0
"$PY" -m pytest -q -p no:cacheprovider "$@" tests || status=$?
if [ "$status" -eq 5 ]; then
  say "pytest collected no tests"
  exit 1
fi
if [ "$status" -ne 0 ]; then
  say "failed (pytest exit status $status)"
  exit "$status"
fi
say "all Python tests passed"
