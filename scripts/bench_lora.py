#!/usr/bin/env python3
"""Decode and prompt speed with LoRA adapters against the base model.

Alternates `mesh bench --fixed-threads` without an adapter and with each
`--lora FILE` given, `--rounds` times, so that a shared host's slow periods
hit every configuration alike, and prints each round's ratios and their
medians. The adapters of the tests (rank 8 on all 210 projections, F32, and
the same in F16) are written by `cargo test -p mesh-core --test lora` into
`$CARGO_TARGET_DIR/tmp/mesh-test-lora-*.gguf`.

    python3 scripts/bench_lora.py --threads 1 --rounds 5 \\
        --lora target/tmp/mesh-test-lora-<hash>.gguf --lora target/tmp/mesh-test-lora-<hash>-f16.gguf
"""
import argparse, json, statistics, subprocess, sys

from meshbench import mesh_binary


def bench(mesh, model, threads, prompt, gen, lora):
    args = [mesh, "bench", "--model", model, "--threads", str(threads), "--fixed-threads",
            "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--runs", "3",
            "--format", "json"]
    if lora:
        args += ["--lora", lora]
    out = json.loads(subprocess.check_output(args, text=True, stderr=subprocess.DEVNULL))
    return out["pp_tps"], out["tg_tps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", action="append", required=True, help="adapter file (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    a = ap.parse_args()
    mesh = mesh_binary()
    model = subprocess.check_output([mesh, "fetch"], text=True).strip()
    ratios = {lora: ([], []) for lora in a.lora}
    for r in range(a.rounds):
        pp0, tg0 = bench(mesh, model, a.threads, a.prompt_tokens, a.gen_tokens, None)
        line = f"round {r + 1}: base tg {tg0:.1f} pp {pp0:.1f}"
        for lora in a.lora:
            pp, tg = bench(mesh, model, a.threads, a.prompt_tokens, a.gen_tokens, lora)
            ratios[lora][0].append(tg / tg0)
            ratios[lora][1].append(pp / pp0)
            line += f" | {lora.rsplit('/', 1)[-1]} tg {tg:.1f} ({tg / tg0:.3f}x) pp {pp:.1f} ({pp / pp0:.3f}x)"
        print(line, flush=True)
    for lora, (tg, pp) in ratios.items():
        print(f"{lora}: {a.threads} threads, median decode {statistics.median(tg):.3f}x "
              f"(range {min(tg):.3f}-{max(tg):.3f}), median prompt {statistics.median(pp):.3f}x "
              f"(range {min(pp):.3f}-{max(pp):.3f}) of the base model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
