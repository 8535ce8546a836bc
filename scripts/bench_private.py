#!/usr/bin/env python3
"""Private mode across 2 loopback helper processes against local exact generation, same run.

    python3 scripts/bench_private.py [--tg 32] [--pp 128] [--runs 3]

Starts two `mesh node --helper` processes on 127.0.0.1 serving the default
model, then alternates `mesh generate --exact` (local) and `mesh generate
--exact --private 2 --bootstrap ... --trust A --trust B` on the same greedy
prompt, one compute thread each. Checks both give the same tokens and prints a
markdown table: time per decode token and prompt-processing tokens/s (best of
the runs) with their ratio, and the private decode token's breakdown (owner,
network wait, helper compute), round trips and bytes.
"""
import argparse, subprocess, sys, time

from meshbench import generate, mesh_binary, prompt_files, start_node


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    mesh = mesh_binary()
    model = subprocess.check_output([mesh, "fetch"], text=True).strip()
    short, long_ = prompt_files("private", args.pp)
    helpers = []
    try:
        p, a, id_a = start_node(mesh, model, ["--helper"], None, "helping")
        helpers.append(p)
        p, _, id_b = start_node(mesh, model, ["--helper"], a, "helping")
        helpers.append(p)
        time.sleep(1)
        private = ["--exact", "--private", "2", "--bootstrap", a, "--trust", id_a, "--trust", id_b]
        ms = {"local": [], "private": []}
        pp = {"local": [], "private": []}
        best_private = None
        for _ in range(args.runs):
            tokens = {}
            for kind, extra in (("local", ["--exact"]), ("private", private)):
                d = generate(mesh, model, short, args.tg, 1, extra)
                steps = len(d["token_ids"]) - 1
                ms[kind].append(d["generate_ms"] / steps)
                tokens[kind] = d["token_ids"]
                if kind == "private" and (best_private is None or ms[kind][-1] <= min(ms[kind])):
                    best_private = d
                d = generate(mesh, model, long_, 1, 1, extra)
                pp[kind].append(len(d["prompt_ids"]) / (d["prompt_ms"] / 1e3))
                n_prompt = len(d["prompt_ids"])
            if tokens["private"] != tokens["local"]:
                sys.exit("bench_private: private tokens differ from local exact generation")
    finally:
        for p in helpers:
            p.terminate()
        for p in helpers:
            p.wait()
    lo, pr = min(ms["local"]), min(ms["private"])
    print("| 1 thread, 2 helper processes on loopback | local --exact | private | ratio |")
    print("|---|---|---|---|")
    print(f"| decode (tg{args.tg}), ms per token | {lo:.1f} | {pr:.1f} | {pr / lo:.2f}x |")
    print(f"| prompt processing (pp{n_prompt}), tokens/s | {max(pp['local']):.1f} | "
          f"{max(pp['private']):.1f} | {max(pp['private']) / max(pp['local']):.2f} |")
    b = best_private["ms_per_token"]
    print(f"\nprivate decode token (best run): owner {b['owner']:.1f} ms, network wait "
          f"{b['network_wait']:.1f} ms, helper compute {b['helper_compute']:.1f} ms (slowest "
          f"helper per round trip); {best_private['round_trips_per_token']:.0f} round trips, "
          f"{best_private['bytes_per_token'] / 1e6:.2f} MB per token; tokens identical to local "
          f"--exact: yes")


if __name__ == "__main__":
    main()
