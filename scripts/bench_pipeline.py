#!/usr/bin/env python3
"""Pipeline across 3 loopback processes against local generation, same run.

    python3 scripts/bench_pipeline.py [--threads 2] [--tg 128] [--pp 256] [--runs 3]

Starts three `mesh node` processes on 127.0.0.1 serving layers 0-10, 10-20 and
20-30 of the default model (each with --threads T; one generation computes on
one stage at a time), then alternates `mesh generate` (local, --threads T) and
`mesh generate --mesh` on the same greedy prompt. Checks both give the same
tokens, and prints a markdown table: decode and prompt-processing tokens/s
(best of the runs), their ratio, the mean round trip of a forward to one hop,
and the per-hop overhead (round trip minus the stage's own compute).
"""
import argparse, os, subprocess, sys, time

from meshbench import generate, mesh_binary, prompt_files, start_node


def start_stage(mesh, model, layers, threads, bootstrap):
    p, addr, _ = start_node(mesh, f"{model}:{layers}", ["--threads", str(threads)], bootstrap,
                            "serving")
    return p, addr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    mesh = mesh_binary()
    model = subprocess.check_output([mesh, "fetch"], text=True).strip()
    short, long_ = prompt_files("pipeline", args.pp)

    stages = []
    try:
        p, a = start_stage(mesh, model, "0-10", args.threads, None)
        stages.append(p)
        for layers in ("10-20", "20-30"):
            stages.append(start_stage(mesh, model, layers, args.threads, a)[0])
        time.sleep(1)
        tg = {"local": [], "mesh": []}
        pp = {"local": [], "mesh": []}
        hop_ms, overhead = [], []
        for _ in range(args.runs):
            for kind, boot in (("local", None), ("mesh", a)):
                extra = ["--mesh", "--bootstrap", boot] if boot else []
                d = generate(mesh, model, short, args.tg, args.threads, extra)
                steps = len(d["token_ids"]) - 1
                tg[kind].append(steps / (d["generate_ms"] / 1e3))
                if kind == "mesh":
                    hop_ms.append(d["hop_ms"])
                    overhead.append(d["hop_overhead_us"])
                    tokens_mesh = d["token_ids"]
                else:
                    tokens_local = d["token_ids"]
                d = generate(mesh, model, long_, 1, args.threads, extra)
                pp[kind].append(len(d["prompt_ids"]) / (d["prompt_ms"] / 1e3))
                n_prompt = len(d["prompt_ids"])
            if tokens_mesh != tokens_local:
                sys.exit("bench_pipeline: the pipeline's tokens differ from local generation")
    finally:
        for p in stages:
            p.terminate()
        for p in stages:
            p.wait()
    best = lambda v: max(v)
    print(f"| {args.threads} threads, 3 stages on loopback | local | pipeline | ratio |")
    print("|---|---|---|---|")
    print(f"| decode (tg{args.tg}), tokens/s | {best(tg['local']):.1f} | {best(tg['mesh']):.1f} | "
          f"{best(tg['mesh']) / best(tg['local']):.2f} |")
    print(f"| prompt processing (pp{n_prompt}), tokens/s | {best(pp['local']):.1f} | "
          f"{best(pp['mesh']):.1f} | {best(pp['mesh']) / best(pp['local']):.2f} |")
    print(f"\nround trip of a forward to one hop: {min(hop_ms):.2f} ms (best run); "
          f"per-hop overhead outside the stage's compute: {min(overhead):.0f} us; "
          f"tokens identical to local: yes")


if __name__ == "__main__":
    main()
