#!/usr/bin/env python3
"""Generation next to busy processes: the thread policy's load test.

    python3 scripts/bench_busy.py [--threads 2] [--tg 128] [--runs 3] [--timeout 120]

Builds the release `mesh`, then runs `mesh generate` (greedy, --ignore-eos, TG
tokens, --threads T) on an idle machine, next to one process spinning on a core,
and next to one spinning process per core; each with the adaptive thread policy
(the default), with `--fixed-threads` (always T threads, as the pinned ggml
would) and with one thread. Reports decode tokens/s (best of RUNS; a run that
does not finish within TIMEOUT seconds counts as 0) and checks every finished
run made the same tokens (the thread count never changes a result).
"""
import argparse, json, multiprocessing, os, subprocess

from meshbench import mesh_binary, prompt_files


def spin():
    while True:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    mesh = mesh_binary()
    model = subprocess.check_output([mesh, "fetch"], text=True).strip()
    short, _ = prompt_files("busy", 16)
    cores = os.cpu_count() or 1
    policies = [("adaptive", args.threads, []), ("fixed", args.threads, ["--fixed-threads"]),
                ("1 thread", 1, [])]
    tokens = None
    print(f"| busy processes | " + " | ".join(f"{n} ({t}), tokens/s" for n, t, _ in policies)
          + " | adaptive: graphs with fewer threads |")
    print("|---" * (len(policies) + 2) + "|")
    for busy in sorted({0, 1, cores}):
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for s in spinners:
            s.start()
        try:
            row, reduced = [], ""
            for name, threads, extra in policies:
                best = 0.0
                for _ in range(args.runs):
                    try:
                        out = subprocess.run(
                            [mesh, "generate", "--model", model, "--prompt-file", short,
                             "--temperature", "0", "--ignore-eos", "--max-tokens", str(args.tg),
                             "--threads", str(threads), "--format", "json", *extra],
                            capture_output=True, text=True, timeout=args.timeout, check=True)
                    except subprocess.TimeoutExpired:
                        continue
                    g = json.loads(out.stdout)
                    if tokens is None:
                        tokens = g["token_ids"]
                    assert g["token_ids"] == tokens, (name, busy)
                    best = max(best, (len(g["token_ids"]) - 1) / g["generate_ms"] * 1e3)
                    if name == "adaptive":
                        t = g["thread_policy"]
                        reduced = f"{t['graphs_with_fewer_threads']} of {t['graphs']}"
                row.append(f"{best:.1f}" if best else f"none in {args.timeout:.0f} s")
            print(f"| {busy} of {cores} cores | " + " | ".join(row) + f" | {reduced} |", flush=True)
        finally:
            for s in spinners:
                s.terminate()


if __name__ == "__main__":
    main()
