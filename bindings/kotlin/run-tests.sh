#!/usr/bin/env bash
# Tests of the Kotlin/JVM bindings (bindings/kotlin/src/Mesh.kt, JNA over
# libmesh_ffi.so): installs kotlin and JNA from Debian when missing (kotlin
# 1.3.31, the Debian bookworm package; it runs on JDK 17), builds mesh-ffi
# (dev profile), compiles src/ and test/MeshTest.kt and runs the test main,
# which prints "N passed, M failed" and exits non-zero on any failure.
#
# Model: $MESH_MODEL, else "default" (fetched into the cache once).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
say() { echo "kotlin-tests: $*" >&2; }

JNA_JAR=/usr/share/java/jna.jar
KOTLIN_STDLIB=/usr/share/java/kotlin-stdlib.jar
if ! command -v kotlinc >/dev/null 2>&1 || [ ! -f "$JNA_JAR" ] || [ ! -f "$KOTLIN_STDLIB" ]; then
  say "installing kotlin and libjna-java (apt)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kotlin libjna-java >/dev/null
fi
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

cd "$root"
say "building mesh-ffi (dev profile)"
cargo build --quiet -p mesh-ffi
TARGET="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
export MESH_LIB="$TARGET/debug/libmesh_ffi.so"
[ -f "$MESH_LIB" ] || { say "$MESH_LIB was not built"; exit 1; }
export MESH_MODEL="${MESH_MODEL:-default}"

OUT="$TARGET/kotlin-tests"
mkdir -p "$OUT"
say "compiling (kotlinc $(kotlinc -version 2>&1 | grep -o 'kotlinc-jvm [^ ]*' || true))"
# kotlinc passes -Xverify:none to the JVM, which JDK 13+ warns about: drop that line.
kotlinc -jvm-target 1.8 -cp "$JNA_JAR" "$here/src/Mesh.kt" "$here/test/MeshTest.kt" \
  -d "$OUT/mesh-test.jar" 2> >(grep -v -e 'Xverify:none' >&2)

say "running MeshTest (library: $MESH_LIB, model: $MESH_MODEL, $("$JAVA" -version 2>&1 | head -1))"
"$JAVA" -cp "$OUT/mesh-test.jar:$JNA_JAR:$KOTLIN_STDLIB" meshllm.MeshTestKt
say "all Kotlin tests passed"
