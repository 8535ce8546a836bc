#!/usr/bin/env python3
"""Measure upstream llama.cpp (through PyPI llama-cpp-python) and `mesh bench` in the
same run, on the same model and thread count, and print a markdown table.

    python3 scripts/bench_upstream.py [--model PATH] [--threads 2] [--pp 256] [--tg 128]

llama-cpp-python is installed into ~/.cache/mesh-llm/venv ($MESH_UPSTREAM_VENV if set)
on first use (it compiles llama.cpp; a few minutes; pip passes $CMAKE_ARGS on). The
AVX2 class on any x86-64 machine: both sides built without AVX-512 (mesh through
scripts/portable-build.sh, our kernels with MESH_NO_AVX512=1):

    . scripts/portable-build.sh && portable_env && export MESH_NO_AVX512=1 \
      MESH_UPSTREAM_VENV=~/.cache/mesh-llm/venv-avx2 \
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    python3 scripts/bench_upstream.py --threads 2 Both sides: prompt of P tokens in one batch from an empty
cache, then G single-token steps from an empty cache; median of 3 runs (like llama-bench).
"""
import argparse, json, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("MESH_UPSTREAM_VENV") or os.path.join(
    os.environ.get("MESH_CACHE_DIR", os.path.expanduser("~/.cache/mesh-llm")), "venv")


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    if subprocess.call([py, "-c", "import llama_cpp"], stderr=subprocess.DEVNULL) != 0:
        print("installing llama-cpp-python (compiles llama.cpp)...", file=sys.stderr)
        subprocess.check_call([py, "-m", "pip", "install", "-q", "llama-cpp-python"])
    return py


UPSTREAM = r'''
import json, statistics, sys, time
import llama_cpp
from llama_cpp import Llama
model, threads, pp, tg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=model, n_ctx=max(pp, tg) + 8, n_batch=pp, n_ubatch=pp, n_threads=threads,
            n_threads_batch=threads, verbose=False)
n_vocab = llm.n_vocab()
toks = [max(1, (i * 2654435761) % n_vocab) for i in range(pp)]
pps, tgs = [], []
llm.reset(); llm.eval(toks[:8])  # warm-up
for _ in range(3):
    llm.reset(); t = time.perf_counter(); llm.eval(toks); pps.append(pp / (time.perf_counter() - t))
    llm.reset(); t = time.perf_counter(); nxt = toks[0]
    for _ in range(tg):
        llm.eval([nxt])
    tgs.append(tg / (time.perf_counter() - t))
print(json.dumps({"pp_tps": statistics.median(pps), "tg_tps": statistics.median(tgs),
                  "version": llama_cpp.__version__}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--tg", type=int, default=128)
    args = ap.parse_args()
    subprocess.check_call(["cargo", "build", "--quiet", "--release", "-p", "mesh-cli"], cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR") or json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT))["target_directory"]
    mesh = os.path.join(target, "release", "mesh")
    model = args.model or subprocess.check_output([mesh, "fetch"], text=True).strip()
    py = ensure_venv()
    common = [str(args.threads), str(args.pp), str(args.tg)]
    # Alternate the two so that load on this shared machine hits both alike.
    ours, theirs = [], []
    for _ in range(2):
        out = subprocess.check_output([mesh, "bench", "--model", model, "--threads", str(args.threads),
                                       "--prompt-tokens", str(args.pp), "--gen-tokens", str(args.tg),
                                       "--format", "json"], text=True)
        ours.append(json.loads(out))
        out = subprocess.check_output([py, "-c", UPSTREAM, model] + common, text=True)
        theirs.append(json.loads(out.strip().splitlines()[-1]))
    best = lambda rs, k: max(r[k] for r in rs)
    o_pp, o_tg = best(ours, "pp_tps"), best(ours, "tg_tps")
    u_pp, u_tg = best(theirs, "pp_tps"), best(theirs, "tg_tps")
    print(f"| {args.threads} threads | mesh-llm | llama.cpp (llama-cpp-python {theirs[0]['version']}) | ratio |")
    print("|---|---|---|---|")
    print(f"| pp{args.pp} t/s | {o_pp:.1f} | {u_pp:.1f} | {o_pp / u_pp:.2f} |")
    print(f"| tg{args.tg} t/s | {o_tg:.1f} | {u_tg:.1f} | {o_tg / u_tg:.2f} |")
    print(json.dumps({"mesh": ours, "llama_cpp": theirs}))


if __name__ == "__main__":
    main()
