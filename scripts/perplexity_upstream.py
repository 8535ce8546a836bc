#!/usr/bin/env python3
"""Upstream llama.cpp perplexity (through llama-cpp-python) with exactly the protocol of
`mesh perplexity`: tokens without BOS, consecutive non-overlapping windows of CTX tokens
(shorter tail dropped), each window from an empty cache, every token but the first scored.

    ~/.cache/mesh-llm/venv/bin/python scripts/perplexity_upstream.py MODEL FILE CTX

Prints one JSON object: {"ppl", "tokens", "ctx", "llama_cpp_python_version", "cpu_class"}
(the SIMD class of upstream's kernels: its logits' last bits depend on it).
Used to produce mesh-core/tests/data/perplexity.json.
"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

model, path, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=2, verbose=False, logits_all=True)
toks = llm.tokenize(open(path, "rb").read(), add_bos=False, special=False)
nll, n = 0.0, 0
for w in range(len(toks) // ctx):
    win = toks[w * ctx:(w + 1) * ctx]
    llm.reset()
    llm.eval(win)
    logits = np.array(llm.scores[:ctx], dtype=np.float64)
    for i in range(ctx - 1):
        row = logits[i]
        m = row.max()
        nll += m + np.log(np.exp(row - m).sum()) - row[win[i + 1]]
        n += 1
info = llama_cpp.llama_print_system_info().decode()
cpu_class = "avx512" if "AVX512 = 1" in info else "avx2" if "AVX2 = 1" in info else "other"
print(json.dumps({"ppl": float(np.exp(nll / n)), "tokens": n, "ctx": ctx,
                  "llama_cpp_python_version": llama_cpp.__version__, "cpu_class": cpu_class}))
