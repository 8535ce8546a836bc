#!/usr/bin/env bash
# Keeps cargo target directories that CI reuses across runs from filling the
# disk: every run builds new test binaries (~0.3 GB each) next to the old ones,
# and incremental caches are never reused from a fresh clone. Removes the
# `incremental` directories and, in every `deps` directory, each executable
# that a newer build of the same name has replaced. Safe to run any time: at
# worst cargo rebuilds what it needs.
#
#     scripts/prune-target.sh DIR [DIR...]
set -euo pipefail
for dir in "$@"; do
  [ -d "$dir" ] || continue
  find "$dir" -maxdepth 4 -type d -name incremental -prune -exec rm -rf {} +
  python3 - "$dir" <<'PY'
import collections, os, sys
root = sys.argv[1]
freed = 0
for base, dirs, files in os.walk(root):
    if os.path.basename(base) != "deps":
        continue
    dirs[:] = []
    newest = collections.defaultdict(list)
    for f in files:
        path = os.path.join(base, f)
        # Executables are named `<name>-<16 hex>` without an extension.
        name, _, tag = f.rpartition("-")
        if "." in f or not name or len(tag) != 16 or not os.access(path, os.X_OK):
            continue
        newest[name].append((os.path.getmtime(path), path))
    for versions in newest.values():
        versions.sort()
        for _, path in versions[:-1]:
            freed += os.path.getsize(path)
            os.remove(path)
print(f"prune-target: {root}: removed {freed / 1e9:.1f} GB of replaced executables", file=sys.stderr)
PY
done
