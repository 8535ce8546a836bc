//! Fuzz target: a chat template from a model file is untrusted code. Any
//! bytes, compiled and rendered over a short conversation, must give a prompt
//! or a template error: never a panic, an endless loop or unbounded memory
//! (fuzz/run.sh runs every target with `-rss_limit_mb=2048`; the renderer's
//! fuel keeps one render to a few hundred megabytes).
//!
//! The input is `template \0 message content`; seeds include real templates
//! and the growth attacks of `mesh-core/tests/template_memory.rs`.
//!
//! On stable, fuzz/run.sh builds it with coverage; `chat_template CORPUS -runs=0` replays.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::chat::{ChatMessage, ChatTemplate};

fuzz_target!(|data: &[u8]| {
    let (source, content) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"hello"[..]),
    };
    let source = String::from_utf8_lossy(source);
    let content = String::from_utf8_lossy(content);
    let Ok(template) = ChatTemplate::new(&source, "<s>", "</s>") else {
        return;
    };
    let messages = [
        ChatMessage::new("system", "be brief"),
        ChatMessage::new("user", content.as_ref()),
        ChatMessage::new("assistant", "ok"),
    ];
    if let Ok(prompt) = template.render(&messages, true) {
        // The output cap holds whatever the template does.
        assert!(prompt.len() <= 64 << 20, "{} bytes", prompt.len());
    }
});
