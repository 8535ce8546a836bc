//! `mesh serve`'s request parsers (OpenAI chat and completions, Ollama chat,
//! generate and show) on arbitrary bodies, and the structured-output automaton
//! of a JSON schema found in a body (`format`, `response_format`) reading the
//! body's bytes: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_serve::parse_requests(data);
});
