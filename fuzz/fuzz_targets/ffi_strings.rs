//! Fuzz target: the C entry points that take strings and arrays, called with
//! arbitrary bytes, must return a status (never crash, never write past a
//! buffer), and what they write must be consistent with what they return.
//!
//! Always fuzzed: the pointer plumbing that needs no model (UTF-8 checks of C
//! strings, NULL handling, the last-error buffer). With `MESH_MODEL` set to a
//! GGUF file, also `mesh_tokenize`, `mesh_detokenize` and
//! `mesh_chat_apply_template` on that model.
//!
//! With cargo-fuzz (nightly): `MESH_MODEL=path.gguf cargo fuzz run ffi_strings`.
//! On stable, the built binary replays a corpus: `ffi_strings corpus/ffi_strings -runs=0`.
#![no_main]

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_ffi::*;

/// Canary byte written around output buffers to catch overruns.
const CANARY: u8 = 0xA5;

/// The model named by `MESH_MODEL`, loaded once (the raw handle as an address).
fn model() -> Option<*const mesh_model> {
    static MODEL: OnceLock<Option<usize>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = std::env::var("MESH_MODEL").ok()?;
            let path = CString::new(path).ok()?;
            let mut model = ptr::null();
            let status = unsafe { mesh_model_load(path.as_ptr(), ptr::null(), &mut model) };
            assert_eq!(status, mesh_status::Ok, "MESH_MODEL could not be loaded");
            Some(model as usize)
        })
        .map(|addr| addr as *const mesh_model)
}

/// `data` up to its first NUL, as a C string.
fn c_string(data: &[u8]) -> CString {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    CString::new(&data[..end]).expect("no interior NUL")
}

/// A text buffer of `cap` bytes with canaries on both sides.
struct Buf {
    bytes: Vec<u8>,
    cap: usize,
}

impl Buf {
    fn new(cap: usize) -> Buf {
        Buf {
            bytes: vec![CANARY; cap + 2],
            cap,
        }
    }

    fn ptr(&mut self) -> *mut c_char {
        self.bytes[1..].as_mut_ptr().cast()
    }

    /// Check the status/length contract of a text-returning call.
    fn check_text(&self, status: mesh_status, n: usize) {
        assert_eq!(self.bytes[0], CANARY, "write before the buffer");
        assert_eq!(self.bytes[self.cap + 1], CANARY, "write past the buffer");
        match status {
            mesh_status::Ok => {
                assert!(n < self.cap, "written {n} + NUL into {}", self.cap);
                assert_eq!(self.bytes[1 + n], 0, "NUL-terminated");
            }
            mesh_status::BufferTooSmall => assert!(n > self.cap, "needed {n}, had {}", self.cap),
            _ => {}
        }
    }
}

fn plumbing(data: &[u8]) {
    let text = c_string(data);
    let utf8 = text.to_str().is_ok();

    // A string that is not UTF-8 is rejected before anything else happens
    // (so no file is opened); a UTF-8 one with a NULL out pointer is
    // rejected before the path is looked at.
    if !utf8 {
        let mut out = ptr::null();
        let s = unsafe { mesh_model_load(text.as_ptr(), ptr::null(), &mut out) };
        assert_eq!(s, mesh_status::InvalidUtf8);
        assert!(out.is_null(), "out written on failure");
    } else {
        let s = unsafe { mesh_model_load(text.as_ptr(), ptr::null(), ptr::null_mut()) };
        assert_eq!(s, mesh_status::NullArg);
    }

    // NULL handles with arbitrary strings and buffers.
    let mut n = usize::MAX;
    let s = unsafe {
        mesh_tokenize(
            ptr::null(),
            text.as_ptr(),
            true,
            true,
            ptr::null_mut(),
            0,
            &mut n,
        )
    };
    assert_eq!(s, mesh_status::NullArg);
    assert_eq!(n, usize::MAX, "n_out written on failure");

    // The last error message into a buffer of arbitrary size.
    let cap = usize::from(data.first().copied().unwrap_or(0) % 64);
    let mut buf = Buf::new(cap);
    let mut n = 0usize;
    let buf_ptr = if cap == 0 && data.len() % 2 == 0 {
        ptr::null_mut()
    } else {
        buf.ptr()
    };
    let s = unsafe { mesh_last_error_message(buf_ptr, cap, &mut n) };
    assert!(
        matches!(s, mesh_status::Ok | mesh_status::BufferTooSmall),
        "{s:?}"
    );
    buf.check_text(s, n);
    if cap > 0 {
        // Even when cut, the message is NUL-terminated valid UTF-8.
        let cut = unsafe { CStr::from_ptr(buf.ptr()) };
        assert!(cut.to_str().is_ok());
    }

    // Status names for arbitrary codes.
    if data.len() >= 4 {
        let code = i32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let name = unsafe { CStr::from_ptr(mesh_status_str(code)) };
        assert!(name.to_str().unwrap().starts_with("MESH_STATUS_"));
    }
}

fn with_model(model: *const mesh_model, data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = c_string(rest);
    let utf8 = text.to_str().is_ok();

    // Tokenize into a buffer of arbitrary capacity.
    let cap = usize::from(flags >> 2);
    let mut ids = vec![u32::MAX; cap + 1];
    let mut n = 0usize;
    let s = unsafe {
        mesh_tokenize(
            model,
            text.as_ptr(),
            flags & 1 != 0,
            flags & 2 != 0,
            ids.as_mut_ptr(),
            cap,
            &mut n,
        )
    };
    match s {
        mesh_status::InvalidUtf8 => assert!(!utf8),
        mesh_status::Ok => {
            assert!(utf8 && n <= cap);
            assert_eq!(ids[cap], u32::MAX, "write past the buffer");
            // Back to text, into a buffer just large enough or too small by one.
            let mut need = 0usize;
            let s = unsafe {
                mesh_detokenize(model, ids.as_ptr(), n, false, ptr::null_mut(), 0, &mut need)
            };
            assert_eq!(s, mesh_status::BufferTooSmall);
            let cap = if flags & 0x80 != 0 { need - 1 } else { need };
            let mut out = Buf::new(cap);
            let mut len = 0usize;
            let s =
                unsafe { mesh_detokenize(model, ids.as_ptr(), n, false, out.ptr(), cap, &mut len) };
            out.check_text(s, len);
        }
        mesh_status::BufferTooSmall => assert!(utf8 && n > cap),
        other => assert!(
            matches!(other, mesh_status::Tokenizer | mesh_status::InvalidArg),
            "{other:?}"
        ),
    }

    // Arbitrary ids (most out of the vocabulary).
    let raw: Vec<u32> = rest
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 70_000)
        .collect();
    let mut out = Buf::new(usize::from(flags));
    let mut len = 0usize;
    let s = unsafe {
        mesh_detokenize(
            model,
            raw.as_ptr(),
            raw.len(),
            flags & 4 != 0,
            out.ptr(),
            out.cap,
            &mut len,
        )
    };
    out.check_text(s, len);

    // A conversation: NUL-separated role/content pairs.
    let parts: Vec<CString> = rest
        .split(|&b| b == 0)
        .take(16)
        .map(|p| CString::new(p).expect("split on NUL"))
        .collect();
    let messages: Vec<mesh_chat_message> = parts
        .chunks_exact(2)
        .map(|pair| mesh_chat_message {
            role: pair[0].as_ptr(),
            content: pair[1].as_ptr(),
        })
        .collect();
    let all_utf8 = parts
        .iter()
        .take(messages.len() * 2)
        .all(|p| p.to_str().is_ok());
    let mut out = Buf::new(usize::from(flags) * 8);
    let mut len = 0usize;
    let s = unsafe {
        mesh_chat_apply_template(
            model,
            messages.as_ptr(),
            messages.len(),
            flags & 8 != 0,
            out.ptr(),
            out.cap,
            &mut len,
        )
    };
    out.check_text(s, len);
    match s {
        mesh_status::InvalidUtf8 => assert!(!all_utf8),
        mesh_status::Ok | mesh_status::BufferTooSmall | mesh_status::Template => assert!(all_utf8),
        other => panic!("unexpected {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    plumbing(data);
    if let Some(model) = model() {
        with_model(model, data);
    }
});
