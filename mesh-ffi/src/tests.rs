//! Unit tests of the plumbing: null handling, struct sizes, UTF-8, buffers,
//! the panic boundary and the last error. None of them needs a model.

use std::ffi::CStr;
use std::mem::size_of;
use std::os::raw::{c_char, c_void};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::ffi::Params;
use crate::status::{boundary, last_error, set_last_error, Failure};

fn c(s: &[u8]) -> *const c_char {
    assert_eq!(s.last(), Some(&0), "test strings are NUL-terminated");
    s.as_ptr().cast()
}

fn last_message() -> String {
    let mut buf = [0 as c_char; 512];
    let mut n = 0usize;
    let status = unsafe { mesh_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) };
    assert_eq!(status, mesh_status::Ok);
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(text.len(), n);
    text
}

/// A pointer that is not NULL but not aligned for anything wider than a byte.
fn misaligned<T>() -> *mut T {
    let words = Box::leak(Box::new([0u64; 8]));
    words.as_mut_ptr().cast::<u8>().wrapping_add(1).cast()
}

#[test]
fn version_constants_match_the_crate() {
    assert_eq!(
        MESH_VERSION_MAJOR.to_string(),
        env!("CARGO_PKG_VERSION_MAJOR")
    );
    assert_eq!(
        MESH_VERSION_MINOR.to_string(),
        env!("CARGO_PKG_VERSION_MINOR")
    );
    assert_eq!(
        MESH_VERSION_PATCH.to_string(),
        env!("CARGO_PKG_VERSION_PATCH")
    );
    assert_eq!(mesh_abi_version(), MESH_ABI_VERSION);
}

#[test]
fn statuses_are_distinct_and_named() {
    let all: Vec<_> = mesh_status::all().collect();
    for (i, s) in all.iter().enumerate() {
        assert_eq!(s.code(), i as i32, "codes are 0..n in order");
        assert_eq!(mesh_status::from_code(s.code()), Some(*s));
        let name = unsafe { CStr::from_ptr(mesh_status_str(s.code())) }
            .to_str()
            .unwrap();
        assert!(name.starts_with("MESH_STATUS_"), "{name}");
    }
    assert_eq!(mesh_status::Ok.code(), 0);
    let name = |code| {
        unsafe { CStr::from_ptr(mesh_status_str(code)) }
            .to_str()
            .unwrap()
    };
    assert_eq!(name(1), "MESH_STATUS_NULL_ARG");
    assert_eq!(name(-1), "MESH_STATUS_UNKNOWN");
    assert_eq!(name(all.len() as i32), "MESH_STATUS_UNKNOWN");
}

#[test]
fn adapter_errors_map_to_the_statuses_mesh_h_documents() {
    use mesh_core::engine::{AdapterError as A, ModelId};
    use mesh_core::Error as E;
    let cases = [
        (A::NotAnAdapter("x".into()), mesh_status::Gguf),
        (A::Empty, mesh_status::Gguf),
        (
            A::Shape {
                name: "t".into(),
                expected: "1".into(),
                found: "2".into(),
            },
            mesh_status::Gguf,
        ),
        (
            A::UnsupportedType {
                name: "t".into(),
                ty: "Q8_0".into(),
            },
            mesh_status::Unsupported,
        ),
        (
            A::BadScale {
                adapter: ModelId([0; 32]),
                scale: f32::NAN,
            },
            mesh_status::InvalidArg,
        ),
    ];
    for (e, status) in cases {
        let f = Failure::from(E::Adapter(e));
        assert_eq!(f.status, status, "{}", f.message);
        assert!(f.message.starts_with("adapter: "), "{}", f.message);
    }
}

#[test]
fn every_core_error_has_its_own_status() {
    use mesh_core::Error as E;
    let errors = vec![
        E::Io {
            path: "x.gguf".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        },
        E::Gguf(mesh_core::LayerError::new(
            mesh_core::gguf::GgufErrorKind::Malformed,
            "g",
        )),
        E::Unsupported("u".into()),
        E::Tokenizer(mesh_core::LayerError::new(
            mesh_core::tokenizer::TokenizerErrorKind::Vocabulary,
            "t",
        )),
        E::Template(mesh_core::LayerError::new(
            mesh_core::chat::TemplateErrorKind::Render,
            "t",
        )),
        E::InvalidArgument("a".into()),
        E::ContextOverflow {
            needed: 10,
            capacity: 5,
        },
        E::Fetch(mesh_core::LayerError::new(
            mesh_core::fetch::FetchErrorKind::Download,
            "f",
        )),
        E::Ggml(mesh_core::LayerError::new(
            mesh_core::engine::GgmlErrorKind::Compute,
            "g",
        )),
        E::Cancelled,
    ];
    let mut seen = std::collections::HashSet::new();
    for e in errors {
        let text = e.to_string();
        let f = Failure::from(e);
        assert_ne!(f.status, mesh_status::Ok);
        assert_ne!(f.status, mesh_status::Internal);
        assert_eq!(f.message, text, "the message is mesh-core's");
        assert!(seen.insert(f.status), "{:?} used twice", f.status);
    }
}

#[test]
fn null_handles_and_outputs_are_statuses() {
    let mut n = 0usize;
    let mut buf = [0 as c_char; 16];
    unsafe {
        assert_eq!(
            mesh_model_n_layers(ptr::null(), &mut n),
            mesh_status::NullArg
        );
        assert!(last_message().contains("`model` is NULL"));
        assert_eq!(
            mesh_model_n_vocab(ptr::null(), ptr::null_mut()),
            mesh_status::NullArg
        );
        assert_eq!(mesh_model_retain(ptr::null()), mesh_status::NullArg);
        assert_eq!(
            mesh_model_architecture(ptr::null(), buf.as_mut_ptr(), buf.len(), &mut n),
            mesh_status::NullArg
        );
        assert_eq!(
            mesh_tokenize(
                ptr::null(),
                c(b"hi\0"),
                true,
                false,
                ptr::null_mut(),
                0,
                &mut n
            ),
            mesh_status::NullArg
        );
        assert_eq!(
            mesh_detokenize(
                ptr::null(),
                ptr::null(),
                0,
                false,
                ptr::null_mut(),
                0,
                &mut n
            ),
            mesh_status::NullArg
        );
        assert_eq!(
            mesh_chat_apply_template(
                ptr::null(),
                ptr::null(),
                0,
                true,
                ptr::null_mut(),
                0,
                &mut n
            ),
            mesh_status::NullArg
        );
        let mut ctx = ptr::null_mut();
        assert_eq!(
            mesh_context_new(ptr::null(), ptr::null(), &mut ctx),
            mesh_status::NullArg
        );
        assert!(ctx.is_null(), "out is not written on failure");
        assert_eq!(
            mesh_generate(
                ptr::null_mut(),
                c(b"x\0"),
                ptr::null(),
                None,
                ptr::null_mut(),
                ptr::null_mut()
            ),
            mesh_status::NullArg
        );
        assert_eq!(mesh_context_cancel(ptr::null()), mesh_status::NullArg);
        assert_eq!(
            mesh_context_n_ctx(ptr::null(), &mut n),
            mesh_status::NullArg
        );
        assert_eq!(
            mesh_context_add_lora(ptr::null(), c(b"a.gguf\0"), 1.0),
            mesh_status::NullArg
        );
        assert_eq!(mesh_context_clear_lora(ptr::null()), mesh_status::NullArg);
        let mut model = ptr::null();
        assert_eq!(
            mesh_model_load(ptr::null(), ptr::null(), &mut model),
            mesh_status::NullArg
        );
        assert!(last_message().contains("`path_or_default` is NULL"));
        assert_eq!(
            mesh_model_load(c(b"/nonexistent.gguf\0"), ptr::null(), ptr::null_mut()),
            mesh_status::NullArg,
            "the out pointer is checked before any work"
        );
        assert!(last_message().contains("`out` is NULL"));
        assert!(model.is_null());
    }
}

#[test]
fn free_null_is_a_no_op() {
    unsafe {
        mesh_model_free(ptr::null());
        mesh_context_free(ptr::null_mut());
    }
}

#[test]
fn misaligned_pointers_are_statuses() {
    let mut n = 0usize;
    unsafe {
        assert_eq!(
            mesh_model_n_layers(misaligned::<mesh_model>().cast_const(), &mut n),
            mesh_status::MisalignedArg
        );
        assert!(last_message().contains("not aligned"), "{}", last_message());
        assert_eq!(
            mesh_context_cancel(misaligned::<mesh_context>().cast_const()),
            mesh_status::MisalignedArg
        );
        // A misaligned pointer given to _free is reported and left alone.
        set_last_error(String::new());
        mesh_context_free(misaligned::<mesh_context>());
        assert!(last_message().contains("not aligned"));
        let bad_out: *mut usize = misaligned();
        assert_eq!(
            mesh_last_error_message(ptr::null_mut(), 0, bad_out),
            mesh_status::MisalignedArg
        );
    }
}

/// Handle types for the registry tests: no model or network needed.
struct test_shared {
    _private: [u8; 0],
}
impl ffi::Castable for test_shared {
    const NAME: &'static str = "test_shared";
    type Ownership = ffi::OwnershipArc;
    type RustType = String;
}
struct test_owned {
    _private: [u8; 0],
}
impl ffi::Castable for test_owned {
    const NAME: &'static str = "test_owned";
    type Ownership = ffi::OwnershipBox;
    type RustType = String;
}

fn invalid_handle<T: std::fmt::Debug>(r: crate::status::FfiResult<T>) -> String {
    let failure = r.expect_err("not a live handle");
    assert_eq!(failure.status, mesh_status::InvalidHandle, "{failure}");
    failure.message
}

#[test]
fn a_freed_box_handle_is_a_status_and_a_double_free_frees_nothing() {
    let h: *mut test_owned = ffi::box_handle("owned".to_owned());
    unsafe {
        assert_eq!(ffi::handle(h.cast_const(), "h").unwrap(), "owned");
        ffi::box_free(h, "h").unwrap();
        let m = invalid_handle(ffi::handle(h.cast_const(), "h"));
        assert!(m.contains("not a live test_owned"), "{m}");
        let m = invalid_handle(ffi::box_free(h, "h"));
        assert!(m.contains("freed already"), "{m}");
    }
}

#[test]
fn an_arc_handle_lives_until_c_frees_its_last_reference() {
    let h: *const test_shared = ffi::arc_handle(Arc::new("shared".to_owned()));
    unsafe {
        ffi::arc_retain(h, "h").unwrap();
        // A Rust-side owner (e.g. a context holding its model) is not a C reference.
        let rust_owner = ffi::arc_clone(h, "h").unwrap();
        ffi::arc_free(h, "h").unwrap();
        assert_eq!(
            ffi::handle(h, "h").unwrap(),
            "shared",
            "one C reference left"
        );
        ffi::arc_free(h, "h").unwrap();
        // C gave up every reference: the handle is dead to C although the
        // value lives on in its Rust owner.
        invalid_handle(ffi::handle(h, "h"));
        invalid_handle(ffi::arc_retain(h, "h"));
        invalid_handle(ffi::arc_clone(h, "h"));
        invalid_handle(ffi::arc_free(h, "h"));
        assert_eq!(*rust_owner, "shared");
        assert_eq!(Arc::strong_count(&rust_owner), 1, "no count leaked or lost");
    }
}

#[test]
fn a_handle_of_another_type_is_a_status() {
    let owned: *mut test_owned = ffi::box_handle("owned".to_owned());
    let shared: *const test_shared = ffi::arc_handle(Arc::new("shared".to_owned()));
    unsafe {
        let m = invalid_handle(ffi::handle(owned.cast_const().cast::<test_shared>(), "h"));
        assert!(m.contains("is a test_owned, not a test_shared"), "{m}");
        invalid_handle(ffi::box_free(shared.cast_mut().cast::<test_owned>(), "h"));
        invalid_handle(ffi::arc_free(owned.cast_const().cast::<test_shared>(), "h"));
        // Both are intact after the failed frees.
        assert_eq!(ffi::handle(owned.cast_const(), "h").unwrap(), "owned");
        assert_eq!(ffi::handle(shared, "h").unwrap(), "shared");
        ffi::box_free(owned, "h").unwrap();
        ffi::arc_free(shared, "h").unwrap();
    }
}

#[test]
fn pointers_this_library_never_made_are_statuses_not_reads() {
    // Aligned, non-NULL, and not a handle: the exports answer without reading it.
    let fake = Box::leak(Box::new([0u64; 64])).as_mut_ptr();
    let mut n = 0usize;
    unsafe {
        assert_eq!(
            mesh_model_n_layers(fake.cast::<mesh_model>().cast_const(), &mut n),
            mesh_status::InvalidHandle
        );
        assert!(
            last_message().contains("not a live mesh_model"),
            "{}",
            last_message()
        );
        assert_eq!(
            mesh_model_retain(fake.cast::<mesh_model>().cast_const()),
            mesh_status::InvalidHandle
        );
        assert_eq!(
            mesh_context_cancel(fake.cast::<mesh_context>().cast_const()),
            mesh_status::InvalidHandle
        );
        set_last_error(String::new());
        mesh_context_free(fake.cast::<mesh_context>());
        assert!(
            last_message().contains("not a live mesh_context"),
            "{}",
            last_message()
        );
        set_last_error(String::new());
        mesh_node_free(fake.cast::<mesh_node>());
        assert!(
            last_message().contains("not a live mesh_node"),
            "{}",
            last_message()
        );
        set_last_error(String::new());
        mesh_model_free(fake.cast::<mesh_model>().cast_const());
        assert!(
            last_message().contains("not a live mesh_model"),
            "{}",
            last_message()
        );
    }
}

#[test]
fn invalid_utf8_is_a_status() {
    let mut model = ptr::null();
    unsafe {
        assert_eq!(
            mesh_model_load(c(b"ab\xffcd\0"), ptr::null(), &mut model),
            mesh_status::InvalidUtf8
        );
    }
    let msg = last_message();
    assert!(
        msg.contains("`path_or_default` is not valid UTF-8"),
        "{msg}"
    );
    assert!(msg.contains("offset 2"), "{msg}");
    assert!(model.is_null());
    let text = unsafe { ffi::c_str(c(b"\xe2\x82\0"), "text") };
    assert_eq!(text.unwrap_err().status, mesh_status::InvalidUtf8);
    let text = unsafe { ffi::c_str(c("héllo\0".as_bytes()), "text") };
    assert_eq!(text.unwrap(), "héllo");
}

#[test]
fn struct_size_is_checked() {
    let good = mesh_context_params_default();
    assert_eq!(good.struct_size, size_of::<mesh_context_params>());
    let read = unsafe { ffi::params(&good, "params") }.unwrap();
    assert_eq!(read, good);
    let defaults = unsafe { ffi::params::<mesh_context_params>(ptr::null(), "params") }.unwrap();
    assert_eq!(defaults, mesh_context_params::default_value());

    for size in [0, 8, size_of::<mesh_context_params>() + 8, usize::MAX] {
        let mut p = good;
        p.struct_size = size;
        let err = unsafe { ffi::params(&p, "params") }.unwrap_err();
        assert_eq!(err.status, mesh_status::StructSize, "size {size}");
        assert!(
            err.message.contains(&format!("is {size}")),
            "{}",
            err.message
        );
    }

    // Through an export: the params are rejected before the model is loaded.
    let mut mp = mesh_model_params_default();
    mp.struct_size += 1;
    let mut model = ptr::null();
    let status = unsafe { mesh_model_load(c(b"/nonexistent.gguf\0"), &mp, &mut model) };
    assert_eq!(status, mesh_status::StructSize);
    assert!(last_message().contains("`params->struct_size`"));

    // Output structs too.
    let mut stats = mesh_generate_stats {
        struct_size: 3,
        prompt_tokens: 0,
        generated_tokens: 0,
        prompt_ms: 0.0,
        generate_ms: 0.0,
        stop_reason: mesh_stop_reason::MaxTokens,
    };
    let err = unsafe { ffi::versioned_out(&mut stats, "out_stats") }
        .err()
        .unwrap();
    assert_eq!(err.status, mesh_status::StructSize);
    stats.struct_size = size_of::<mesh_generate_stats>();
    assert!(unsafe { ffi::versioned_out(&mut stats, "out_stats") }
        .unwrap()
        .is_some());
    assert!(
        unsafe { ffi::versioned_out::<mesh_generate_stats>(ptr::null_mut(), "s") }
            .unwrap()
            .is_none()
    );
}

#[test]
fn generate_params_defaults_come_from_mesh_core() {
    let p = mesh_generate_params_default();
    let core = mesh_core::generate::GenerateParams::default();
    assert_eq!(p.struct_size, size_of::<mesh_generate_params>());
    assert_eq!(p.max_tokens, core.max_tokens);
    assert_eq!(p.temperature, core.sampler.temperature);
    assert_eq!(p.top_k, core.sampler.top_k);
    assert!(!p.chat && !p.raw && !p.ignore_eos);
    assert_eq!(
        mesh_model_params_default().struct_size,
        size_of::<mesh_model_params>()
    );
}

#[test]
fn text_buffers_report_the_size_needed() {
    let write = |cap: usize, buf: *mut c_char| {
        let mut n = usize::MAX;
        let r =
            unsafe { ffi::buf_out(buf, cap, &mut n, "buf") }.and_then(|o| o.write_text(b"hello"));
        (r.map_err(|f| f.status), n)
    };
    // Size query.
    assert_eq!(
        write(0, ptr::null_mut()),
        (Err(mesh_status::BufferTooSmall), 6)
    );
    // One byte short (no room for the NUL): nothing written.
    let mut buf = [b'x' as c_char; 8];
    assert_eq!(
        write(5, buf.as_mut_ptr()),
        (Err(mesh_status::BufferTooSmall), 6)
    );
    assert!(buf.iter().all(|&b| b == b'x' as c_char), "buffer untouched");
    // Exact fit.
    assert_eq!(write(6, buf.as_mut_ptr()), (Ok(()), 5));
    assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_bytes(), b"hello");
    // NULL buffer with a capacity.
    assert_eq!(
        write(4, ptr::null_mut()),
        (Err(mesh_status::NullArg), usize::MAX)
    );
}

#[test]
fn item_buffers_report_the_count_needed() {
    let ids = [1u32, 2, 3];
    let mut buf = [0u32; 3];
    let mut n = 0usize;
    let r = unsafe { ffi::buf_out(buf.as_mut_ptr(), 2, &mut n, "buf") }
        .and_then(|o| o.write_items(&ids));
    assert_eq!(r.unwrap_err().status, mesh_status::BufferTooSmall);
    assert_eq!((n, buf), (3, [0, 0, 0]));
    let r = unsafe { ffi::buf_out(buf.as_mut_ptr(), 3, &mut n, "buf") }
        .and_then(|o| o.write_items(&ids));
    assert!(r.is_ok());
    assert_eq!((n, buf), (3, ids));
    let r = unsafe { ffi::buf_out::<u32>(misaligned(), 3, &mut n, "buf") };
    assert_eq!(r.err().unwrap().status, mesh_status::MisalignedArg);
}

#[test]
fn slices_allow_null_only_when_empty() {
    assert!(unsafe { ffi::slice::<u32>(ptr::null(), 0, "ids") }
        .unwrap()
        .is_empty());
    let err = unsafe { ffi::slice::<u32>(ptr::null(), 1, "ids") }.unwrap_err();
    assert_eq!(err.status, mesh_status::NullArg);
    let one = 7u32;
    let err = unsafe { ffi::slice::<u32>(&one, usize::MAX / 2, "ids") }.unwrap_err();
    assert_eq!(err.status, mesh_status::InvalidArg);
}

#[test]
fn chat_messages_are_checked_one_by_one() {
    let msgs = [
        mesh_chat_message {
            role: c(b"user\0"),
            content: c(b"hi\0"),
        },
        mesh_chat_message {
            role: c(b"assistant\0"),
            content: ptr::null(),
        },
    ];
    let mut n = 0;
    // The model is checked first...
    let s = unsafe {
        mesh_chat_apply_template(
            ptr::null(),
            msgs.as_ptr(),
            2,
            true,
            ptr::null_mut(),
            0,
            &mut n,
        )
    };
    assert_eq!(s, mesh_status::NullArg);
    // ...then each message, by index.
    let err = unsafe { text::chat_messages(&msgs) }.unwrap_err();
    assert_eq!(err.status, mesh_status::NullArg);
    assert!(
        err.message.contains("messages[1].content"),
        "{}",
        err.message
    );
    let bad = [mesh_chat_message {
        role: c(b"\xc3\0"),
        content: c(b"x\0"),
    }];
    let err = unsafe { text::chat_messages(&bad) }.unwrap_err();
    assert_eq!(err.status, mesh_status::InvalidUtf8);
    assert!(err.message.contains("messages[0].role"));
}

#[test]
fn panics_become_a_status_with_the_message() {
    let status = boundary(|| panic!("boom {}", 42));
    assert_eq!(status, mesh_status::Panic);
    assert!(last_message().contains("boom 42"), "{}", last_message());
    let status = boundary(|| std::panic::panic_any(17u8));
    assert_eq!(status, mesh_status::Panic);
    assert!(last_message().contains("no message"));
}

#[cfg(feature = "test-hooks")]
#[test]
fn debug_panic_hook_panics_inside_the_boundary() {
    assert_eq!(mesh_debug_panic(), mesh_status::Panic);
    assert!(last_message().contains("mesh_debug_panic"));
}

#[test]
fn last_error_is_per_thread_and_survives_success() {
    set_last_error("first failure".into());
    assert_eq!(mesh_abi_version(), MESH_ABI_VERSION);
    let mut n = 0;
    assert_eq!(
        unsafe { mesh_context_n_ctx(ptr::null(), &mut n) },
        mesh_status::NullArg
    );
    let mine = last_message();
    assert!(mine.contains("`ctx` is NULL"));
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    assert_eq!(last_message(), mine, "reading it does not change it");
}

#[test]
fn last_error_message_truncates_into_small_buffers() {
    set_last_error("é".repeat(10)); // 20 bytes
    let mut n = 0;
    let mut buf = [b'x' as c_char; 8];
    let s = unsafe { mesh_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) };
    assert_eq!(s, mesh_status::BufferTooSmall);
    assert_eq!(n, 21, "size needed with the NUL");
    // 7 bytes of room: three whole characters, never half of one.
    assert_eq!(
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(),
        "ééé"
    );
    let s = unsafe { mesh_last_error_message(ptr::null_mut(), 0, &mut n) };
    assert_eq!((s, n), (mesh_status::BufferTooSmall, 21));
    assert_eq!(
        last_error(),
        "é".repeat(10),
        "a failed read keeps the message"
    );
    assert_eq!(
        unsafe { mesh_last_error_message(ptr::null_mut(), 0, ptr::null_mut()) },
        mesh_status::NullArg
    );
    assert_eq!(last_error(), "é".repeat(10));
}

/// Serializes the tests that touch the process-wide log callback.
static LOG_LOCK: Mutex<()> = Mutex::new(());

static LOGGED: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn count_logs(
    userdata: *mut c_void,
    level: mesh_log_level,
    target: *const c_char,
    message: *const c_char,
) -> bool {
    let target = unsafe { CStr::from_ptr(target) }.to_str().unwrap();
    let message = unsafe { CStr::from_ptr(message) }.to_str().unwrap();
    assert_eq!(userdata as usize, 0x1234);
    assert!(target.contains("tests"), "{target}");
    assert!(level <= MESH_LOG_INFO);
    assert!(message.starts_with("hello from "), "{message}");
    assert!(message.ends_with(" answer=42"), "{message}");
    LOGGED.fetch_add(1, Ordering::SeqCst);
    true
}

#[test]
fn log_messages_reach_the_callback_at_or_above_the_level() {
    let _guard = LOG_LOCK.lock().unwrap();
    let ud = 0x1234 as *mut c_void;
    assert_eq!(
        mesh_log_set(Some(count_logs), ud, 9),
        mesh_status::InvalidArg
    );
    assert_eq!(
        mesh_log_set(Some(count_logs), ud, MESH_LOG_INFO),
        mesh_status::Ok
    );
    LOGGED.store(0, Ordering::SeqCst);
    tracing::info!(answer = 42, "hello from {}", "info");
    tracing::debug!(answer = 42, "hello from debug");
    tracing::warn!(answer = 42, "hello from warn");
    assert_eq!(LOGGED.load(Ordering::SeqCst), 2, "info and warn, not debug");
    assert_eq!(
        mesh_log_set(None, ptr::null_mut(), MESH_LOG_TRACE),
        mesh_status::Ok
    );
    tracing::error!(answer = 42, "hello from error");
    assert_eq!(LOGGED.load(Ordering::SeqCst), 2, "off");
}
