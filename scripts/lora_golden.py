#!/usr/bin/env python3
"""Produce mesh-core/tests/data/lora_golden.json: upstream llama.cpp (PyPI
llama-cpp-python) running the default model with a LoRA adapter written by the
`gguf` Python package.

    python scripts/lora_golden.py [ADAPTER_OUT.gguf] [MODEL.gguf]

Needs llama-cpp-python (0.3.x), gguf and numpy. Steps:

1. Writes a rank-8 adapter on every projection of every layer (attn_q, attn_k,
   attn_v, attn_output, ffn_gate, ffn_up, ffn_down), F32, alpha 16, with
   deterministic values (splitmix64, see `values`; every value is exact in
   f32, so tests/lora.rs rebuilds bit-identical tensors without Python). The
   SHA-256 of all tensor bytes in file order is recorded to prove it.
2. Loads the model with the adapter (scale 1.0) and records greedy decoding
   (llama.cpp's greedy sampler, 32 tokens) for 10 prompts, the prompt's top-10
   logits, and the perplexity of tests/data/ppl_words.txt with exactly the
   protocol of `mesh perplexity` (scripts/perplexity_upstream.py).
3. Records the same greedy run at scale 0.5 for two prompts (scale handling).
"""

import ctypes
import hashlib
import json
import os
import sys

import numpy as np
import gguf
import llama_cpp as L
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden  # noqa: E402  (tokenize/detokenize/top_logits helpers, prompts, cpu_class)

# Plain CPU kernels: no "extra buffer types" (weight repacking, AMX). Builds of
# 0.3.36 with -march=native on AVX512-VNNI CPUs without AMX crash in the AMX
# matmul, and the goldens describe the plain ggml CPU path anyway.
_default_params = L.llama_model_default_params


def _plain_params():
    p = _default_params()
    p.use_extra_bufts = False
    return p


L.llama_model_default_params = _plain_params
L.llama_cpp.llama_model_default_params = _plain_params  # what Llama() calls

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "mesh-core", "tests", "data", "lora_golden.json")
PPL_TEXT = os.path.join(REPO, "mesh-core", "tests", "data", "ppl_words.txt")

RANK = 8
ALPHA = 16.0
SEED = 0x6D657368  # "mesh"
AMP_A = 2.0 ** -5
AMP_B = 2.0 ** -5
KINDS = [  # (name, cols, rows) for SmolLM2-135M: n_embd 576, kv 192, ffn 1536
    ("attn_q", 576, 576),
    ("attn_k", 576, 192),
    ("attn_v", 576, 192),
    ("attn_output", 576, 576),
    ("ffn_gate", 576, 1536),
    ("ffn_up", 576, 1536),
    ("ffn_down", 1536, 576),
]
N_LAYERS = 30
N_GENERATE = 32
PROMPTS = golden.PROMPTS[:10]
PPL_CTX = 256


def values(index, n, amp):
    """n values of tensor number `index`: splitmix64 of SEED*2^20 + index*2^32 + i
    (wrapping), top 24 bits mapped to [-1, 1) in steps of 2^-23, times amp."""
    with np.errstate(over="ignore"):
        x = np.uint64(SEED) * np.uint64(1 << 20) + np.uint64(index) * np.uint64(1 << 32)
        x = x + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = x
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 23) - 1.0
    return (u * amp).astype(np.float32)


def write_adapter(path):
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", ALPHA)
    w.add_string("general.name", "mesh-llm test LoRA (random, rank 8)")
    digest = hashlib.sha256()
    index = 0
    for layer in range(N_LAYERS):
        for kind, cols, rows in KINDS:
            # numpy shape (outer, inner) = ggml [inner, outer]
            a = values(index, RANK * cols, AMP_A).reshape(RANK, cols)
            b = values(index + 1, rows * RANK, AMP_B).reshape(rows, RANK)
            index += 2
            base = f"blk.{layer}.{kind}.weight"
            w.add_tensor(base + ".lora_a", a)
            w.add_tensor(base + ".lora_b", b)
            digest.update(a.tobytes())
            digest.update(b.tobytes())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return digest.hexdigest()


def greedy(model_path, adapter_path, scale, prompts):
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(model_path.encode(), mparams)
    assert model
    adapter = L.llama_adapter_lora_init(model, adapter_path.encode())
    assert adapter, "llama.cpp refused the adapter"
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = golden.N_CTX
    cparams.n_batch = golden.N_BATCH
    cparams.n_ubatch = golden.N_BATCH
    cparams.n_threads = golden.N_THREADS
    cparams.n_threads_batch = golden.N_THREADS
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cparams)
    assert ctx
    adapters = (L.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(scale)
    assert L.llama_set_adapters_lora(ctx, adapters, 1, scales) == 0
    sampler = L.llama_sampler_init_greedy()
    out = []
    for name, text in prompts:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        ids = golden.tokenize(vocab, text, True, True)
        arr = (L.llama_token * len(ids))(*ids)
        assert L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) == 0
        last = golden.top_logits(L.llama_get_logits_ith(ctx, -1), n_vocab, golden.TOP_K)
        generated = []
        for _ in range(N_GENERATE):
            tok = L.llama_sampler_sample(sampler, ctx, -1)
            generated.append(tok)
            one = (L.llama_token * 1)(tok)
            assert L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) == 0
        out.append({
            "name": name,
            "text": text,
            "prompt_ids": ids,
            "greedy_ids": generated,
            "greedy_text": golden.detokenize(vocab, generated, False).decode("utf-8", "replace"),
            "top_logits_last_prompt": last,
        })
    L.llama_sampler_free(sampler)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def perplexity(model_path, adapter_path):
    llm = Llama(model_path=model_path, lora_path=adapter_path, n_ctx=PPL_CTX, n_batch=PPL_CTX,
                n_ubatch=PPL_CTX, n_threads=2, verbose=False, logits_all=True)
    toks = llm.tokenize(open(PPL_TEXT, "rb").read(), add_bos=False, special=False)
    nll, n = 0.0, 0
    for win_i in range(len(toks) // PPL_CTX):
        win = toks[win_i * PPL_CTX:(win_i + 1) * PPL_CTX]
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[:PPL_CTX], dtype=np.float64)
        for i in range(PPL_CTX - 1):
            row = logits[i]
            m = row.max()
            nll += m + np.log(np.exp(row - m).sum()) - row[win[i + 1]]
            n += 1
    return {"ppl": float(np.exp(nll / n)), "tokens": n, "ctx": PPL_CTX}


def main():
    adapter = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
        "~/.cache/mesh-llm/lora/test-lora-r8.gguf")
    model = sys.argv[2] if len(sys.argv) > 2 else golden.DEFAULT_MODEL
    os.makedirs(os.path.dirname(adapter), exist_ok=True)
    digest = write_adapter(adapter)
    result = {
        "generated_by": "scripts/lora_golden.py",
        "llama_cpp_python_version": L.__version__,
        "gguf_python_version": getattr(gguf, "__version__", "unknown"),
        "model_sha256": hashlib.sha256(open(model, "rb").read()).hexdigest(),
        "adapter": {
            "rank": RANK, "alpha": ALPHA, "seed": SEED, "amp_a": AMP_A, "amp_b": AMP_B,
            "type": "F32", "layers": N_LAYERS, "kinds": [k for k, _, _ in KINDS],
            "tensor_data_sha256": digest,
            "file_sha256": hashlib.sha256(open(adapter, "rb").read()).hexdigest(),
        },
        "settings": {
            "n_ctx": golden.N_CTX, "n_batch": golden.N_BATCH, "n_threads": golden.N_THREADS,
            "flash_attn": False, "sampler": "llama_sampler_init_greedy",
            "n_generate": N_GENERATE, "tokenize": "add_special=true, parse_special=true",
            "cpu_class": golden.cpu_class(),
        },
        "scale_1": greedy(model, adapter, 1.0, PROMPTS),
        "scale_0_5": greedy(model, adapter, 0.5, PROMPTS[:2]),
        "perplexity": perplexity(model, adapter),
    }
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}; adapter at {adapter} (tensor data sha256 {digest})")


if __name__ == "__main__":
    main()
