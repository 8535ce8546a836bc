"""Smoke tests of the mesh_llm bindings against a real model.

Model: $MESH_MODEL, else "default" (SmolLM2-135M-Instruct, fetched once).
One compute thread (ggml's spin barrier collapses when oversubscribed).
"""

import os
import threading

import pytest

import mesh_llm

MODEL = os.environ.get("MESH_MODEL", "default")


@pytest.fixture(scope="module")
def model():
    with mesh_llm.Model(MODEL, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def ctx(model):
    with model.context(n_ctx=512, n_threads=1) as c:
        yield c


def test_abi_version():
    assert mesh_llm.abi_version() == mesh_llm.ABI_VERSION


def test_load(model):
    assert model.arch == "llama"
    assert model.n_layers > 0
    assert len(model.id) == 64 and all(c in "0123456789abcdef" for c in model.id)
    assert model.n_vocab > 1000
    assert model.n_embd > 0


def test_tokenize_detokenize_round_trip(model):
    text = "Hello, world! Ünïcödé ✓"
    ids = model.tokenize(text, add_special=False)
    assert ids and all(0 <= i < model.n_vocab for i in ids)
    assert model.detokenize(ids) == text


def test_tokenize_long_text_grows_buffer(model):
    text = " ".join(["tok"] * 500)
    ids = model.tokenize(text, add_special=False)
    assert len(ids) >= 500
    assert model.detokenize(ids) == text


def test_chat_template_contains_user_text(model):
    prompt = model.apply_chat_template([("user", "What is the capital of France?")])
    assert "What is the capital of France?" in prompt
    prompt2 = model.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=False)
    assert "hi there" in prompt2 and len(prompt2) < len(prompt) + 50


def test_generate_streams_pieces(ctx):
    pieces = []

    def on_piece(p):
        pieces.append(p)
        return True

    out = ctx.generate("The capital of France is", max_tokens=8, temperature=0, on_piece=on_piece)
    assert out.text.strip()
    assert "".join(pieces) == out.text
    assert out.stats.generated_tokens <= 8
    assert out.stats.prompt_tokens > 0
    assert out.stats.stop_reason in (mesh_llm.StopReason.MAX_TOKENS, mesh_llm.StopReason.END_OF_GENERATION)
    if out.stats.stop_reason == mesh_llm.StopReason.MAX_TOKENS:
        assert out.stats.generated_tokens == 8
    # Greedy is deterministic.
    again = ctx.generate("The capital of France is", max_tokens=8, temperature=0)
    assert again.text == out.text


def test_generate_chat(ctx):
    out = ctx.generate("Say hello.", chat=True, max_tokens=8, temperature=0)
    assert out.text.strip()


def test_format_json_gives_one_object(ctx):
    import json

    out = ctx.generate("Describe a cat as JSON.", chat=True, max_tokens=200, temperature=0, format="json")
    if out.stats.stop_reason == mesh_llm.StopReason.END_OF_GENERATION:
        assert isinstance(json.loads(out.text), dict), out.text
    else:
        assert out.text.lstrip().startswith("{"), out.text
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "lives": {"type": "integer"}},
              "required": ["name", "lives"]}
    out = ctx.generate("Describe a cat as JSON.", chat=True, max_tokens=200, temperature=0, format=schema)
    cat = json.loads(out.text)
    assert list(cat) == ["name", "lives"] and isinstance(cat["lives"], int), out.text
    for bad in ['{"type": "object", "properties": {"a": {"minLength": 2}}}', "yaml"]:
        with pytest.raises(mesh_llm.MeshError) as e:
            ctx.generate("x", max_tokens=4, format=bad)
        assert e.value.status == mesh_llm.Status.INVALID_ARG


def test_callback_false_stops_early(ctx):
    pieces = []

    def on_piece(p):
        pieces.append(p)
        return False

    out = ctx.generate("Once upon a time", max_tokens=32, temperature=0, on_piece=on_piece)
    assert len(pieces) == 1
    assert out.text == pieces[0]
    assert out.stats.stop_reason == mesh_llm.StopReason.CALLBACK


def test_callback_exception_propagates(ctx):
    def on_piece(p):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        ctx.generate("Once upon a time", max_tokens=8, temperature=0, on_piece=on_piece)
    # The context is still usable.
    assert ctx.generate("Hi", max_tokens=2, temperature=0).stats.generated_tokens <= 2


def test_cancel_from_callback(ctx):
    def on_piece(p):
        ctx.cancel()
        return True

    with pytest.raises(mesh_llm.Cancelled) as info:
        ctx.generate("Once upon a time", max_tokens=32, temperature=0, on_piece=on_piece)
    assert info.value.status == mesh_llm.Status.CANCELLED
    assert info.value.text


def test_cancel_from_another_thread(ctx):
    cancelled = threading.Event()

    def canceller():
        ctx.cancel()
        cancelled.set()

    def on_piece(p):
        if not cancelled.is_set():
            threading.Thread(target=canceller).start()
            assert cancelled.wait(30)  # mesh_generate runs on, blocked in this callback
        return True

    with pytest.raises(mesh_llm.Cancelled) as info:
        ctx.generate("Once upon a time", max_tokens=64, temperature=0, ignore_eos=True, on_piece=on_piece)
    assert info.value.text
    # A later generation is not affected.
    assert ctx.generate("Hi", max_tokens=2, temperature=0).text


def test_bad_path_raises_naming_path():
    path = "/nonexistent/dir/no-such-model.gguf"
    with pytest.raises(mesh_llm.MeshError) as info:
        mesh_llm.Model(path)
    assert path in str(info.value)
    assert info.value.status == mesh_llm.Status.IO


def test_invalid_argument_raises(ctx):
    with pytest.raises(mesh_llm.MeshError) as info:
        ctx.generate("", max_tokens=4)
    assert info.value.status == mesh_llm.Status.INVALID_ARG


def test_freed_handles(model):
    c = model.context(n_ctx=64, n_threads=1)
    c.free()
    c.free()  # idempotent
    with pytest.raises(ValueError):
        c.generate("x")


def test_log_callback(model):
    seen = []
    lock = threading.Lock()

    def on_log(level, target, message):
        with lock:
            seen.append((level, target, message))

    mesh_llm.set_log_callback(on_log, mesh_llm.LogLevel.TRACE)
    try:
        with model.context(n_ctx=64, n_threads=1) as c:
            c.generate("Hi", max_tokens=1, temperature=0)
    finally:
        mesh_llm.set_log_callback(None)
    assert all(isinstance(t, str) and isinstance(m, str) for _, t, m in seen)


def _write_adapter(path, tensors, alpha=0.0, arch=b"llama"):
    """A GGUF v3 LoRA adapter with F32 tensors [(name, (ne0, ne1), values)]."""
    import struct

    def s(b):
        return struct.pack("<Q", len(b)) + b

    kv = [
        (b"general.architecture", 8, s(arch)),
        (b"general.type", 8, s(b"adapter")),
        (b"adapter.type", 8, s(b"lora")),
        (b"adapter.lora.alpha", 6, struct.pack("<f", alpha)),
    ]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        out += s(k) + struct.pack("<I", t) + v
    offset = 0
    for name, dims, values in tensors:
        out += s(name.encode()) + struct.pack("<I", 2) + struct.pack("<QQ", *dims)
        out += struct.pack("<IQ", 0, offset)  # F32
        offset += (4 * len(values) + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for _, _, values in tensors:
        out += b"\0" * (-len(out) % 32)
        out += struct.pack(f"<{len(values)}f", *values)
    with open(path, "wb") as f:
        f.write(out)


def test_lora_changes_and_clears(model, tmp_path):
    rank, d, ff = 2, model.n_embd, 1536
    tensors = []
    for layer in range(model.n_layers):
        base = f"blk.{layer}.ffn_down.weight"
        a = [((i * 7919) % 13 - 6) / 64.0 for i in range(ff * rank)]
        b = [((i * 104729) % 11 - 5) / 64.0 for i in range(rank * d)]
        tensors.append((base + ".lora_a", (ff, rank), a))
        tensors.append((base + ".lora_b", (rank, d), b))
    path = tmp_path / "adapter.gguf"
    _write_adapter(path, tensors)
    with model.context(n_ctx=128, n_threads=1) as c:
        prompt = "The capital of France is"
        base = c.generate(prompt, max_tokens=8, temperature=0).text
        c.add_lora(str(path), 1.0)
        adapted = c.generate(prompt, max_tokens=8, temperature=0).text
        assert adapted != base
        c.clear_lora()
        assert c.generate(prompt, max_tokens=8, temperature=0).text == base
        # An adapter of another architecture, a missing file; nothing changes.
        other = tmp_path / "qwen2.gguf"
        _write_adapter(other, tensors, arch=b"qwen2")
        with pytest.raises(mesh_llm.MeshError) as info:
            c.add_lora(str(other), 1.0)
        assert info.value.status == mesh_llm.Status.GGUF
        assert "architecture" in str(info.value)
        with pytest.raises(mesh_llm.MeshError) as info:
            c.add_lora(str(tmp_path / "missing.gguf"))
        assert info.value.status == mesh_llm.Status.IO
        assert c.generate(prompt, max_tokens=8, temperature=0).text == base



def test_own_sampling_loop_matches_generate(model):
    with model.context(n_ctx=128, n_threads=1) as c:
        prompt = model.tokenize("The capital of France is")
        assert c.logits() == []
        c.eval(prompt)
        assert c.n_past == len(prompt)
        ids = []
        for _ in range(8):
            logits = c.logits()
            assert len(logits) == model.n_vocab
            t = max(range(len(logits)), key=logits.__getitem__)
            ids.append(t)
            c.eval([t])
        text = c.generate("The capital of France is", max_tokens=8, temperature=0, ignore_eos=True)
        assert str(text) == model.detokenize(ids)
        # Truncate and evaluate again: the same logits; bad ids change nothing.
        c.truncate(0)  # generate() left its prompt and reply in the cache
        c.eval(prompt)
        first = c.logits()
        c.eval([ids[0]])
        c.truncate(len(prompt))
        assert c.logits() == []
        c.eval([ids[0]])
        c.truncate(len(prompt))
        with pytest.raises(mesh_llm.MeshError) as info:
            c.eval([1, model.n_vocab])
        assert info.value.status == mesh_llm.Status.INVALID_ARG
        assert c.n_past == len(prompt)
        c.truncate(0)
        c.eval(prompt, all_logits=True)
        every = c.logits()
        assert len(every) == len(prompt) * model.n_vocab
        assert every[-model.n_vocab:] == first
