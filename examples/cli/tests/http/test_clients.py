"""`mesh serve` driven by the official clients (`openai`, `ollama` from PyPI).

Run by scripts/http-tests.sh, which builds `mesh`, installs the clients and
pytest into a venv, and sets MESH_BIN (the `mesh` binary) and MESH_MODEL.
Greedy answers must equal `mesh generate` for the same prompt and settings.
"""
import json
import os
import subprocess
import threading

import pytest

MESH = os.environ.get("MESH_BIN", "mesh")
MODEL = os.environ.get("MESH_MODEL", "default")
PROMPT = "What is the capital of France? Answer in one sentence."
MAX = 24


def mesh_generate(*extra, max_tokens=MAX, prompt=PROMPT):
    out = subprocess.run(
        [MESH, "generate", "--model", MODEL, "--chat", "--prompt", prompt,
         "--max-tokens", str(max_tokens), "--temperature", "0", "--threads", "1",
         "--format", "json", *extra],
        check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen(
        [MESH, "serve", "--model", MODEL, "--listen", "127.0.0.1:0",
         "--threads", "1", "--name", "smollm2"],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, "mesh serve printed nothing"
    url = json.loads(line)["listening"]
    # Keep draining stdout so the server never blocks on a full pipe.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    yield url
    proc.terminate()
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def reference():
    return mesh_generate()


@pytest.fixture(scope="module")
def reference_ollama():
    # Ollama's default repetition penalty is 1.1 (window 64, as mesh's).
    return mesh_generate("--repeat-penalty", "1.1")


@pytest.fixture()
def oai(server):
    import openai
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def oll(server):
    import ollama
    return ollama.Client(host=server)


def test_openai_chat_equals_mesh_generate(oai, reference):
    r = oai.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPT}],
        temperature=0, max_tokens=MAX)
    assert r.choices[0].message.content == reference["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(reference["token_ids"])
    assert r.usage.prompt_tokens == len(reference["prompt_ids"])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.model_extra["mesh"]["mode"] == "local"


def test_openai_streaming_chat_equals_mesh_generate(oai, reference):
    stream = oai.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPT}],
        temperature=0, max_tokens=MAX, stream=True,
        stream_options={"include_usage": True})
    text, usage, finish, chunks = "", None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == reference["text"]
    assert chunks > 3, "the answer arrived in one piece, not streamed"
    assert usage.completion_tokens == len(reference["token_ids"])
    assert finish in ("stop", "length")


def test_openai_completions_and_stop(oai):
    r = oai.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12,
                               temperature=0)
    assert r.choices[0].text
    first = r.choices[0].text.strip().split(",")[0].strip()
    r2 = oai.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12,
                                temperature=0, stop=[","])
    assert r2.choices[0].text.strip() == first
    assert r2.choices[0].finish_reason == "stop"


def test_openai_models_and_unknown_model(oai):
    ids = [m.id for m in oai.models.list().data]
    assert "smollm2" in ids and "smollm2:private" in ids
    import openai
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model",
                                    messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert "no-such-model" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="smollm2", messages=[], max_tokens=4)


def test_ollama_chat_generate_and_streaming(oll, reference_ollama):
    want = reference_ollama["text"]
    opts = {"temperature": 0, "num_predict": MAX}
    r = oll.chat(model="smollm2", messages=[{"role": "user", "content": PROMPT}], options=opts)
    assert r.message.content == want
    assert r.done and r.eval_count == len(reference_ollama["token_ids"])
    assert r.prompt_eval_count == len(reference_ollama["prompt_ids"])
    assert r.total_duration > 0 and r.eval_duration > 0
    g = oll.generate(model="smollm2", prompt=PROMPT, options=opts)
    assert g.response == want
    parts = list(oll.chat(model="smollm2", messages=[{"role": "user", "content": PROMPT}],
                          options=opts, stream=True))
    assert len(parts) > 3 and parts[-1].done
    assert "".join(p.message.content for p in parts) == want
    parts = list(oll.generate(model="smollm2", prompt=PROMPT, options=opts, stream=True))
    assert "".join(p.response for p in parts) == want


def test_ollama_list_show_and_errors(oll):
    models = oll.list().models
    assert [m.model for m in models] == ["smollm2"]
    assert models[0].details.format == "gguf" and models[0].size > 50_000_000
    s = oll.show("smollm2")
    assert "im_start" in s.template
    assert s.modelinfo["llama.block_count"] == 30
    import ollama
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404


JSON_PROMPT = "Describe a cat as JSON with the keys name and age."


CAT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "colors": {"type": "array", "items": {"enum": ["black", "white", "orange", "grey"]},
                   "maxItems": 3},
        "indoor": {"type": "boolean"},
    },
    "required": ["name", "age", "colors", "indoor"],
}


def check_cat(text):
    cat = json.loads(text)
    assert list(cat) == ["name", "age", "colors", "indoor"], text
    assert isinstance(cat["name"], str) and isinstance(cat["age"], int), text
    assert len(cat["colors"]) <= 3 and set(cat["colors"]) <= {"black", "white", "orange", "grey"}
    assert isinstance(cat["indoor"], bool), text


def test_structured_output_with_both_clients(oai, oll, tmp_path):
    # OpenAI's response_format json_schema and Ollama's format with a schema
    # both give `mesh generate --json-schema`'s object.
    schema_file = tmp_path / "cat.json"
    schema_file.write_text(json.dumps(CAT_SCHEMA))
    ref = mesh_generate("--json-schema", str(schema_file), max_tokens=256, prompt=JSON_PROMPT)
    check_cat(ref["text"])
    msgs = [{"role": "user", "content": JSON_PROMPT}]
    r = oai.chat.completions.create(
        model="smollm2", messages=msgs, temperature=0, max_tokens=256,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "cat", "schema": CAT_SCHEMA, "strict": True}})
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == "stop"
    o = oll.chat(model="smollm2", messages=msgs, format=CAT_SCHEMA,
                 options={"temperature": 0, "num_predict": 256, "repeat_penalty": 1.0})
    assert o.message.content == ref["text"]
    assert o.done_reason == "stop"
    # A schema using a keyword mesh-llm does not enforce is refused by name.
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model="smollm2", messages=msgs, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$"}}}}})
    assert "pattern" in str(e.value)


def test_json_mode_with_both_clients(oai, oll):
    # OpenAI's response_format json_object and Ollama's format "json" both
    # give `mesh generate --json-mode`'s object, ended when it closes.
    ref = mesh_generate("--json-mode", max_tokens=256, prompt=JSON_PROMPT)
    assert isinstance(json.loads(ref["text"]), dict), ref["text"]
    msgs = [{"role": "user", "content": JSON_PROMPT}]
    r = oai.chat.completions.create(model="smollm2", messages=msgs, temperature=0,
                                    max_tokens=256, response_format={"type": "json_object"})
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == "stop"
    o = oll.chat(model="smollm2", messages=msgs, format="json",
                 options={"temperature": 0, "num_predict": 256, "repeat_penalty": 1.0})
    assert o.message.content == ref["text"]
    assert o.done_reason == "stop"
