//! The C API on a real model, called from Rust as a C host would: loading,
//! tokenizing, templates, streaming generation, stopping, cancelling from
//! another thread, sharing a model between threads, and a host's own
//! sampling loop over `mesh_context_eval` / `mesh_context_logits`.
//!
//! Model: `$MESH_MODEL`, else "default" (fetched into the cache once).

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_void};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use mesh_ffi::*;

/// A model handle shared by the tests (the address; the handle is thread-safe).
fn model() -> *const mesh_model {
    static MODEL: OnceLock<usize> = OnceLock::new();
    let addr = *MODEL.get_or_init(|| {
        let spec = std::env::var("MESH_MODEL").unwrap_or_else(|_| "default".into());
        let spec = CString::new(spec).unwrap();
        let mut params = mesh_model_params_default();
        params.n_threads = 1;
        let mut model = ptr::null();
        let status = unsafe { mesh_model_load(spec.as_ptr(), &params, &mut model) };
        assert_eq!(status, mesh_status::Ok, "{}", last_error());
        model as usize
    });
    addr as *const mesh_model
}

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 1024];
    let mut n = 0;
    unsafe { mesh_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) };
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn context(n_ctx: usize) -> *mut mesh_context {
    let mut params = mesh_context_params_default();
    params.n_ctx = n_ctx;
    let mut ctx = ptr::null_mut();
    let status = unsafe { mesh_context_new(model(), &params, &mut ctx) };
    assert_eq!(status, mesh_status::Ok, "{}", last_error());
    ctx
}

fn tokenize(text: &str) -> Vec<u32> {
    let text = CString::new(text).unwrap();
    let mut n = 0;
    let s = unsafe {
        mesh_tokenize(
            model(),
            text.as_ptr(),
            false,
            false,
            ptr::null_mut(),
            0,
            &mut n,
        )
    };
    assert!(matches!(s, mesh_status::BufferTooSmall | mesh_status::Ok));
    let mut ids = vec![0u32; n];
    let s = unsafe {
        mesh_tokenize(
            model(),
            text.as_ptr(),
            false,
            false,
            ids.as_mut_ptr(),
            n,
            &mut n,
        )
    };
    assert_eq!(s, mesh_status::Ok);
    ids
}

fn detokenize(ids: &[u32]) -> String {
    let mut need = 0;
    let s = unsafe {
        mesh_detokenize(
            model(),
            ids.as_ptr(),
            ids.len(),
            false,
            ptr::null_mut(),
            0,
            &mut need,
        )
    };
    assert_eq!(s, mesh_status::BufferTooSmall);
    let mut buf = vec![0 as c_char; need];
    let mut n = 0;
    let s = unsafe {
        mesh_detokenize(
            model(),
            ids.as_ptr(),
            ids.len(),
            false,
            buf.as_mut_ptr(),
            need,
            &mut n,
        )
    };
    assert_eq!(s, mesh_status::Ok);
    assert_eq!(n + 1, need);
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned()
}

/// What a generation streamed.
#[derive(Default)]
struct Collected {
    text: Mutex<String>,
    pieces: AtomicUsize,
    stop_after: usize,
}

unsafe extern "C" fn collect(userdata: *mut c_void, piece: *const c_char, len: usize) -> bool {
    let c = unsafe { &*userdata.cast::<Collected>() };
    let bytes = unsafe { std::slice::from_raw_parts(piece.cast::<u8>(), len + 1) };
    assert_eq!(bytes[len], 0, "NUL-terminated");
    let piece = std::str::from_utf8(&bytes[..len]).expect("pieces are UTF-8");
    c.text.lock().unwrap().push_str(piece);
    let n = c.pieces.fetch_add(1, Ordering::SeqCst) + 1;
    c.stop_after == 0 || n < c.stop_after
}

fn stats() -> mesh_generate_stats {
    mesh_generate_stats {
        struct_size: std::mem::size_of::<mesh_generate_stats>(),
        prompt_tokens: 0,
        generated_tokens: 0,
        prompt_ms: 0.0,
        generate_ms: 0.0,
        stop_reason: mesh_stop_reason::EndOfGeneration,
    }
}

fn generate(
    ctx: *mut mesh_context,
    prompt: &str,
    params: &mesh_generate_params,
    c: &Collected,
) -> (mesh_status, mesh_generate_stats) {
    let prompt = CString::new(prompt).unwrap();
    let mut st = stats();
    let ud = (c as *const Collected).cast_mut().cast();
    let s = unsafe { mesh_generate(ctx, prompt.as_ptr(), params, Some(collect), ud, &mut st) };
    (s, st)
}

#[test]
fn model_facts_are_readable() {
    let mut n = 0;
    unsafe {
        assert_eq!(mesh_model_n_layers(model(), &mut n), mesh_status::Ok);
        assert!(n > 0);
        let mut buf = [0 as c_char; 65];
        assert_eq!(
            mesh_model_id(model(), buf.as_mut_ptr(), buf.len(), &mut n),
            mesh_status::Ok
        );
        let id = CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
        assert_eq!((id.len(), n), (64, 64));
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            mesh_model_architecture(model(), buf.as_mut_ptr(), buf.len(), &mut n),
            mesh_status::Ok
        );
        assert!(!CStr::from_ptr(buf.as_ptr()).to_bytes().is_empty());
    }
}

#[test]
fn tokens_round_trip_to_the_same_text() {
    let text = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓";
    let ids = tokenize(text);
    assert!(ids.len() > 5);
    assert_eq!(detokenize(&ids), text);
}

#[test]
fn chat_template_renders_the_conversation() {
    let (role, content) = (
        CString::new("user").unwrap(),
        CString::new("What is 2+2?").unwrap(),
    );
    let msgs = [mesh_chat_message {
        role: role.as_ptr(),
        content: content.as_ptr(),
    }];
    let mut buf = vec![0 as c_char; 4096];
    let mut n = 0;
    let s = unsafe {
        mesh_chat_apply_template(
            model(),
            msgs.as_ptr(),
            1,
            true,
            buf.as_mut_ptr(),
            buf.len(),
            &mut n,
        )
    };
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
    assert!(text.contains("What is 2+2?"), "{text}");
    assert_eq!(text.len(), n);
}

#[test]
fn greedy_generation_is_repeatable_and_counted() {
    let ctx = context(256);
    let mut p = mesh_generate_params_default();
    p.chat = true;
    p.temperature = 0.0;
    p.max_tokens = 8;
    p.ignore_eos = true;
    let a = Collected::default();
    let (s, st) = generate(ctx, "Name three colours.", &p, &a);
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    assert_eq!(st.generated_tokens, 8);
    assert_eq!(st.stop_reason, mesh_stop_reason::MaxTokens);
    assert!(st.prompt_tokens > 5);
    assert!(!a.text.lock().unwrap().is_empty());
    let b = Collected::default();
    let (s, _) = generate(ctx, "Name three colours.", &p, &b);
    assert_eq!(s, mesh_status::Ok);
    assert_eq!(
        *a.text.lock().unwrap(),
        *b.text.lock().unwrap(),
        "each call starts from an empty cache"
    );
    unsafe { mesh_context_free(ctx) };
}

#[test]
fn json_format_and_schemas_constrain_the_output_and_other_formats_are_refused() {
    let ctx = context(512);
    let json = CString::new("json").unwrap();
    let mut p = mesh_generate_params_default();
    p.chat = true;
    p.temperature = 0.0;
    p.max_tokens = 200;
    p.format = json.as_ptr();
    let c = Collected::default();
    let prompt = "Give me a JSON object with the name and age of a fictional person.";
    let (s, st) = generate(ctx, prompt, &p, &c);
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    let text = c.text.lock().unwrap().clone();
    // One JSON object, ended when it closed; or, cut at max_tokens, the
    // unfinished beginning of one.
    match serde_json::from_str::<serde_json::Value>(text.trim_start()) {
        Ok(v) => {
            assert!(v.is_object(), "{text}");
            assert_eq!(st.stop_reason, mesh_stop_reason::EndOfGeneration, "{text}");
        }
        Err(e) => {
            assert!(
                e.is_eof() && text.trim_start().starts_with('{'),
                "{e}: {text}"
            );
            assert_eq!(st.stop_reason, mesh_stop_reason::MaxTokens, "{text}");
        }
    }
    // The same request as text is not constrained (and differs).
    let text_fmt = CString::new("text").unwrap();
    p.format = text_fmt.as_ptr();
    let plain = Collected::default();
    let (s, _) = generate(ctx, prompt, &p, &plain);
    assert_eq!(s, mesh_status::Ok);
    assert_ne!(*plain.text.lock().unwrap(), text);
    // A JSON schema: the object it asks for.
    let schema = CString::new(
        r#"{"type": "object", "properties": {"name": {"type": "string"},
            "age": {"type": "integer"}}, "required": ["name", "age"]}"#,
    )
    .unwrap();
    p.format = schema.as_ptr();
    let structured = Collected::default();
    let (s, st) = generate(ctx, prompt, &p, &structured);
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    let text = structured.text.lock().unwrap().clone();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v["name"].is_string() && v["age"].is_i64(), "{text}");
    assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
    assert_eq!(st.stop_reason, mesh_stop_reason::EndOfGeneration, "{text}");
    // A schema with a keyword that is not enforced, a broken one, or
    // anything else, is refused before anything is generated.
    for bad in [
        "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\", \"pattern\": \"x\"}}}",
        "{\"type\": ",
        "JSON",
        "yaml",
    ] {
        let bad = CString::new(bad).unwrap();
        p.format = bad.as_ptr();
        let none = Collected::default();
        let (s, _) = generate(ctx, prompt, &p, &none);
        assert_eq!(s, mesh_status::InvalidArg);
        assert!(last_error().contains("format"), "{}", last_error());
        assert_eq!(none.pieces.load(Ordering::SeqCst), 0);
    }
    unsafe { mesh_context_free(ctx) };
}

#[test]
fn callback_can_stop_generation() {
    let ctx = context(256);
    let mut p = mesh_generate_params_default();
    p.max_tokens = 50;
    p.ignore_eos = true;
    let c = Collected {
        stop_after: 3,
        ..Default::default()
    };
    let (s, st) = generate(ctx, "Once upon a time", &p, &c);
    assert_eq!(s, mesh_status::Ok);
    assert_eq!(st.stop_reason, mesh_stop_reason::Callback);
    assert_eq!(c.pieces.load(Ordering::SeqCst), 3);
    unsafe { mesh_context_free(ctx) };
}

#[test]
fn cancel_from_another_thread_stops_a_long_generation() {
    let ctx = context(1024);
    let mut p = mesh_generate_params_default();
    p.max_tokens = 1000;
    p.ignore_eos = true;
    let c = Collected::default();
    let pieces = &c.pieces as *const AtomicUsize as usize;
    let ctx_addr = ctx as usize;
    let canceller = std::thread::spawn(move || {
        // SAFETY: `c` outlives the join below.
        let pieces = unsafe { &*(pieces as *const AtomicUsize) };
        let start = Instant::now();
        while pieces.load(Ordering::SeqCst) < 2 && start.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(2));
        }
        unsafe { mesh_context_cancel(ctx_addr as *const mesh_context) }
    });
    let (s, _) = generate(ctx, "Tell me a long story.", &p, &c);
    assert_eq!(canceller.join().unwrap(), mesh_status::Ok);
    assert_eq!(s, mesh_status::Cancelled, "{}", last_error());
    let n = c.pieces.load(Ordering::SeqCst);
    assert!((2..1000).contains(&n), "{n} pieces");
    // The cancel does not leak into the next generation.
    p.max_tokens = 2;
    let (s, st) = generate(ctx, "Hi", &p, &Collected::default());
    assert_eq!(s, mesh_status::Ok);
    assert_eq!(st.generated_tokens, 2);
    unsafe { mesh_context_free(ctx) };
}

#[test]
fn one_model_serves_several_threads() {
    let m = model() as usize;
    unsafe { assert_eq!(mesh_model_retain(m as *const mesh_model), mesh_status::Ok) };
    let threads: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                let text = format!("thread {i} says hello");
                assert_eq!(detokenize(&tokenize(&text)), text);
                let ctx = context(64);
                let mut p = mesh_generate_params_default();
                p.max_tokens = 2;
                let (s, _) = generate(ctx, &text, &p, &Collected::default());
                assert_eq!(s, mesh_status::Ok);
                unsafe { mesh_context_free(ctx) };
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    unsafe { mesh_model_free(m as *const mesh_model) };
}

fn eval(ctx: *mut mesh_context, tokens: &[u32], all: bool) -> mesh_status {
    unsafe { mesh_context_eval(ctx, tokens.as_ptr(), tokens.len(), all) }
}

fn logits(ctx: *const mesh_context) -> Vec<f32> {
    let mut need = 0;
    let s = unsafe { mesh_context_logits(ctx, ptr::null_mut(), 0, &mut need) };
    assert!(
        matches!(s, mesh_status::BufferTooSmall | mesh_status::Ok),
        "{s:?}"
    );
    let mut out = vec![0f32; need];
    let mut n = 0;
    let s = unsafe { mesh_context_logits(ctx, out.as_mut_ptr(), out.len(), &mut n) };
    assert_eq!(s, mesh_status::Ok);
    assert_eq!(n, need);
    out
}

fn n_past(ctx: *const mesh_context) -> usize {
    let mut n = usize::MAX;
    assert_eq!(unsafe { mesh_context_n_past(ctx, &mut n) }, mesh_status::Ok);
    n
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A host's own sampling loop over `mesh_context_eval` / `mesh_context_logits`
/// (greedy here) produces what `mesh_generate` does with the same settings.
#[test]
fn a_hosts_own_sampling_loop_over_eval_matches_mesh_generate() {
    let ctx = context(128);
    let mut n_vocab = 0;
    assert_eq!(
        unsafe { mesh_model_n_vocab(model(), &mut n_vocab) },
        mesh_status::Ok
    );
    let text = CString::new("The capital of France is").unwrap();
    let mut prompt = vec![0u32; 64];
    let mut n = 0;
    let s = unsafe {
        mesh_tokenize(
            model(),
            text.as_ptr(),
            true,
            false,
            prompt.as_mut_ptr(),
            64,
            &mut n,
        )
    };
    assert_eq!(s, mesh_status::Ok);
    prompt.truncate(n);

    assert!(logits(ctx).is_empty(), "no logits before any evaluation");
    assert_eq!(
        eval(ctx, &prompt, false),
        mesh_status::Ok,
        "{}",
        last_error()
    );
    assert_eq!(n_past(ctx), prompt.len());
    let mut ids = Vec::new();
    for _ in 0..16 {
        let l = logits(ctx);
        assert_eq!(l.len(), n_vocab);
        let t = argmax(&l);
        ids.push(t);
        assert_eq!(eval(ctx, &[t], false), mesh_status::Ok);
    }
    assert_eq!(n_past(ctx), prompt.len() + 16);

    let mut p = mesh_generate_params_default();
    p.temperature = 0.0;
    p.max_tokens = 16;
    p.ignore_eos = true;
    let streamed = Collected::default();
    let (s, st) = generate(ctx, "The capital of France is", &p, &streamed);
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    assert_eq!(st.prompt_tokens, prompt.len());
    assert_eq!(*streamed.text.lock().unwrap(), detokenize(&ids));
    assert!(
        logits(ctx).is_empty(),
        "mesh_generate clears the kept logits"
    );
    unsafe { mesh_context_free(ctx) };
}

/// Truncating and evaluating again gives the same logits bit for bit; all
/// logits of a batch end with the last token's; bad calls change nothing.
#[test]
fn eval_truncate_and_errors_leave_the_context_consistent() {
    let ctx = context(32);
    let prompt = tokenize("Once upon a time");
    assert_eq!(
        eval(ctx, &prompt, false),
        mesh_status::Ok,
        "{}",
        last_error()
    );
    let last = logits(ctx);
    let n_vocab = last.len();
    assert_eq!(eval(ctx, &[42], false), mesh_status::Ok);
    let next = logits(ctx);
    assert_eq!(
        unsafe { mesh_context_truncate(ctx, prompt.len()) },
        mesh_status::Ok
    );
    assert_eq!(n_past(ctx), prompt.len());
    assert!(
        logits(ctx).is_empty(),
        "forgotten positions take their logits"
    );
    assert_eq!(eval(ctx, &[42], false), mesh_status::Ok);
    assert_eq!(logits(ctx), next, "the same position again, bit for bit");
    // Past the end: no-op.
    assert_eq!(unsafe { mesh_context_truncate(ctx, 1000) }, mesh_status::Ok);
    assert_eq!(n_past(ctx), prompt.len() + 1);

    // Every token's logits: n rows, the last equal to the last token's.
    assert_eq!(unsafe { mesh_context_truncate(ctx, 0) }, mesh_status::Ok);
    assert_eq!(eval(ctx, &prompt, true), mesh_status::Ok);
    let all = logits(ctx);
    assert_eq!(all.len(), prompt.len() * n_vocab);
    assert_eq!(&all[all.len() - n_vocab..], &last[..]);

    // Bad calls: typed statuses, cache and logits unchanged.
    let before = n_past(ctx);
    let bad_id = n_vocab as u32;
    assert_eq!(eval(ctx, &[1, bad_id], false), mesh_status::InvalidArg);
    assert!(last_error().contains("vocabulary"), "{}", last_error());
    assert_eq!(eval(ctx, &[], false), mesh_status::InvalidArg);
    assert_eq!(eval(ctx, &[1u32; 40], false), mesh_status::ContextOverflow);
    assert_eq!(
        unsafe { mesh_context_eval(ctx, ptr::null(), 3, false) },
        mesh_status::NullArg
    );
    assert_eq!(
        unsafe { mesh_context_eval(ptr::null_mut(), prompt.as_ptr(), 1, false) },
        mesh_status::NullArg
    );
    assert_eq!(n_past(ctx), before);
    assert_eq!(logits(ctx), all);
    let mut small = vec![0f32; 3];
    let mut need = 0;
    let s = unsafe { mesh_context_logits(ctx, small.as_mut_ptr(), 3, &mut need) };
    assert_eq!((s, need), (mesh_status::BufferTooSmall, all.len()));
    assert_eq!(small, vec![0.0; 3], "untouched");
    unsafe { mesh_context_free(ctx) };
}

/// A cancel from another thread stops a long evaluation (between its
/// 64-token batches) and leaves the cache as before the call.
#[test]
fn cancel_stops_a_long_eval_and_keeps_the_cache() {
    let ctx = context(4096);
    let prompt = tokenize("Once upon a time");
    assert_eq!(eval(ctx, &prompt, false), mesh_status::Ok);
    let long: Vec<u32> = (0..4000u32).map(|i| 100 + i % 1000).collect();
    let ctx_addr = ctx as usize;
    let canceller = std::thread::spawn(move || {
        let ctx = ctx_addr as *const mesh_context;
        let start = Instant::now();
        // n_past is refused (BUSY) while the evaluation runs.
        let mut n = 0;
        while unsafe { mesh_context_n_past(ctx, &mut n) } != mesh_status::Busy
            && start.elapsed() < Duration::from_secs(120)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        unsafe { mesh_context_cancel(ctx) }
    });
    let s = eval(ctx, &long, false);
    assert_eq!(canceller.join().unwrap(), mesh_status::Ok);
    assert_eq!(s, mesh_status::Cancelled, "{}", last_error());
    assert_eq!(n_past(ctx), prompt.len(), "all or nothing");
    assert_eq!(logits(ctx).len(), {
        let mut v = 0;
        unsafe { mesh_model_n_vocab(model(), &mut v) };
        v
    });
    // The cancel does not leak into the next call.
    assert_eq!(eval(ctx, &long[..10], false), mesh_status::Ok);
    assert_eq!(n_past(ctx), prompt.len() + 10);
    unsafe { mesh_context_free(ctx) };
}
