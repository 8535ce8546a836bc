#!/usr/bin/env python3
"""Pipeline across 3 loopback processes against local generation, same run.

    python3 scripts/bench_pipeline.py [--threads 2] [--tg 128] [--pp 256] [--runs 3]

Starts three `mesh node` processes on 127.0.0.1 serving layers 0-10, 10-20 and
20-30 of the default model (each with --threads T; one generation computes on
one stage at a time), then alternates `mesh generate` (local, --threads T),
`mesh generate --mesh` (decode steps pushed from stage to stage) and
`mesh generate --mesh --hop-by-hop` on the same greedy prompt. Checks all give
the same tokens, and prints a markdown table: decode and prompt-processing
tokens/s (best of the runs), the ratios to local, the mean round trip of a
forward to one hop, and the per-hop overhead (round trip minus the stage's
own compute; pushed, a step's time over its hops).
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
        kinds = {"local": [], "pushed": ["--mesh", "--bootstrap", a],
                 "hop by hop": ["--mesh", "--hop-by-hop", "--bootstrap", a]}
        tg = {k: [] for k in kinds}
        pp = {k: [] for k in kinds}
        overhead = {k: [] for k in kinds}
        hop_ms = []
        for _ in range(args.runs):
            tokens = {}
            for kind, extra in kinds.items():
                d = generate(mesh, model, short, args.tg, args.threads, extra)
                steps = len(d["token_ids"]) - 1
                tg[kind].append(steps / (d["generate_ms"] / 1e3))
                tokens[kind] = d["token_ids"]
                if kind != "local":
                    overhead[kind].append(d["hop_overhead_us"])
                    if kind == "pushed" and d["pushed_steps"] != steps:
                        sys.exit(f"bench_pipeline: {d['pushed_steps']} of {steps} steps pushed")
                    if kind == "hop by hop":
                        hop_ms.append(d["hop_ms"])
                d = generate(mesh, model, long_, 1, args.threads, extra)
                pp[kind].append(len(d["prompt_ids"]) / (d["prompt_ms"] / 1e3))
                n_prompt = len(d["prompt_ids"])
            if any(t != tokens["local"] for t in tokens.values()):
                sys.exit("bench_pipeline: the pipeline's tokens differ from local generation")
    finally:
        for p in stages:
            p.terminate()
        for p in stages:
            p.wait()
    best = lambda v: max(v)
    local = best(tg["local"])
    print(f"| {args.threads} threads, 3 stages on loopback | local | pipeline, pushed | ratio | "
          f"pipeline, hop by hop | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| decode (tg{args.tg}), tokens/s | {local:.1f} | {best(tg['pushed']):.1f} | "
          f"{best(tg['pushed']) / local:.2f} | {best(tg['hop by hop']):.1f} | "
          f"{best(tg['hop by hop']) / local:.2f} |")
    lpp = best(pp["local"])
    print(f"| prompt processing (pp{n_prompt}), tokens/s | {lpp:.1f} | {best(pp['pushed']):.1f} | "
          f"{best(pp['pushed']) / lpp:.2f} | {best(pp['hop by hop']):.1f} | "
          f"{best(pp['hop by hop']) / lpp:.2f} |")
    print(f"\nround trip of a forward to one hop (hop by hop): {min(hop_ms):.2f} ms (best run); "
          f"per-hop overhead outside the stages' compute: pushed {min(overhead['pushed']):.0f} us, "
          f"hop by hop {min(overhead['hop by hop']):.0f} us; tokens identical to local: yes")


if __name__ == "__main__":
    main()
