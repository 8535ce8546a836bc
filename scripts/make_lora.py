#!/usr/bin/env python3
"""Write a random LoRA adapter for a GGUF model, in llama.cpp's adapter format.

For benchmarks and experiments: the factors are random (A ~ N(0, 0.02),
B ~ N(0, 0.002)), so the adapter changes the model's output without meaning
anything. The shapes, names and metadata are those `convert_lora_to_gguf.py`
writes (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
`<weight>.lora_a` `[cols, rank]` and `<weight>.lora_b` `[rank, rows]`).

    python3 scripts/make_lora.py MODEL.gguf OUT.gguf --rank 16 --targets q,v --type f16

Targets: q, k, v, o (attention), gate, up, down (feed-forward), or `all`.
Needs the `gguf` and `numpy` packages (`pip install gguf numpy`).
"""
import argparse
import sys

import numpy as np
import gguf

TARGETS = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the base model (GGUF)")
    ap.add_argument("out", help="the adapter to write")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="default: twice the rank")
    ap.add_argument("--targets", default="q,v", help="comma-separated, or `all` (default q,v)")
    ap.add_argument("--type", choices=["f16", "f32"], default="f16")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.rank < 1:
        ap.error("--rank must be at least 1")
    names = list(TARGETS) if a.targets == "all" else a.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)} or all")
    suffixes = {"." + TARGETS[n] + ".weight" for n in names}

    reader = gguf.GGUFReader(a.model)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    rng = np.random.default_rng(a.seed)
    dtype = np.float16 if a.type == "f16" else np.float32
    w = gguf.GGUFWriter(a.out, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(a.alpha if a.alpha is not None else 2 * a.rank))
    count, values = 0, 0
    for t in reader.tensors:
        if not t.name.startswith("blk.") or not any(t.name.endswith(s) for s in suffixes):
            continue
        cols, rows = int(t.shape[0]), int(t.shape[1])
        base = t.name[: -len(".weight")]
        # numpy shapes are GGUF's reversed: lora_a is [cols, rank] in GGUF.
        lora_a = (rng.standard_normal((a.rank, cols)) * 0.02).astype(dtype)
        lora_b = (rng.standard_normal((rows, a.rank)) * 0.002).astype(dtype)
        w.add_tensor(base + ".weight.lora_a", lora_a)
        w.add_tensor(base + ".weight.lora_b", lora_b)
        count += 1
        values += lora_a.size + lora_b.size
    if count == 0:
        sys.exit(f"no tensor of {a.model} matches targets {names}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = values * np.dtype(dtype).itemsize
    print(f"{a.out}: rank {a.rank}, {count} matrices ({','.join(names)}), {a.type}, "
          f"{size / 1e6:.1f} MB of factors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
