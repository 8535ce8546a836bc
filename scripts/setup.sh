#!/usr/bin/env bash
# Install what a fresh Debian machine lacks to build mesh-llm: cmake (ggml's build)
# and libclang (bindgen); iproute2 for the network-namespace test. Safe to run repeatedly; needs root (or sudo) only when
# something is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
# bindgen needs libclang itself (libclang.so / libclang-NN.so), not libclang-cpp,
# which some images ship alone.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 \
  && ! ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so'; then
  need+=(libclang-dev)
fi
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
# `ip` and `tc` for the network-namespace test (it skips, saying why, without them).
command -v ip >/dev/null 2>&1 || need+=(iproute2)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
