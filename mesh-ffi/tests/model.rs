//! The C API on a real model, called from Rust as a C host would: loading,
//! tokenizing, templates, streaming generation, stopping, cancelling from
//! another thread, and sharing a model between threads.
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
