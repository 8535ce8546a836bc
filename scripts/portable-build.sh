# Sourced by scripts/c-tests.sh and scripts/cpu-class-tests.sh: a second
# build whose ggml is configured with LLAMA_NATIVE=OFF (AVX2/FMA/F16C only, no
# AVX-512), in its own target dir next to the main one, reused across runs.
#
# `portable_env` exports CARGO_TARGET_DIR and CMAKE (cmake-rs runs $CMAKE; the
# wrapper adds -DLLAMA_NATIVE=OFF when configuring). The wrapper lives at a
# fixed path inside that target dir, so cargo sees the same $CMAKE every run
# and does not rebuild ggml.

portable_target_dir() {
  local main="${CARGO_TARGET_DIR:-}"
  if [ -z "$main" ]; then
    main="$(cargo metadata --format-version 1 --no-deps |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
  fi
  echo "${main%/}-valgrind"
}

portable_env() {
  local dir
  dir="$(portable_target_dir)"
  mkdir -p "$dir"
  cat >"$dir/cmake-portable" <<'WRAP'
#!/bin/sh
for a in "$@"; do [ "$a" = "--build" ] && exec cmake "$@"; done
exec cmake -DLLAMA_NATIVE=OFF "$@"
WRAP
  chmod +x "$dir/cmake-portable"
  export CARGO_TARGET_DIR="$dir" CMAKE="$dir/cmake-portable"
}
