//! `mesh_log_set`: mesh-core's `tracing` events, forwarded to a C callback.
//!
//! The first `mesh_log_set` with a callback installs a small process-wide
//! `tracing` subscriber (mesh-core itself has no global state; the C library,
//! standing for the process, may). Events are formatted as
//! `message key=value ...` and handed over with their level and target.

use std::cell::Cell;
use std::ffi::CString;
use std::fmt::{self, Write as _};
use std::os::raw::{c_char, c_void};
use std::sync::{OnceLock, RwLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};

use crate::status::{boundary, mesh_status, Failure, FfiResult};

/// Severity of a log message; also the most verbose level `mesh_log_set`
/// delivers. An `int32_t` holding one of the `MESH_LOG_*` constants.
pub type mesh_log_level = i32;
/// No messages (as a `mesh_log_set` level).
pub const MESH_LOG_OFF: mesh_log_level = 0;
/// Errors.
pub const MESH_LOG_ERROR: mesh_log_level = 1;
/// Warnings and above.
pub const MESH_LOG_WARN: mesh_log_level = 2;
/// Progress information and above (e.g. "fetched the default model").
pub const MESH_LOG_INFO: mesh_log_level = 3;
/// Debugging detail and above.
pub const MESH_LOG_DEBUG: mesh_log_level = 4;
/// Everything.
pub const MESH_LOG_TRACE: mesh_log_level = 5;

/// Receives one log message. `target` is the Rust module that logged it (e.g.
/// `"mesh_core::fetch"`), `message` the text; both NUL-terminated UTF-8, valid
/// only during the call. Return true to keep receiving messages, false to turn
/// logging off (as `mesh_log_set(NULL, NULL, MESH_LOG_OFF)` would).
///
/// It runs on whichever thread logged (any thread that calls into mesh), so it
/// and `userdata` must be thread-safe. It must not call `mesh_log_set` (that
/// would deadlock); messages logged by mesh calls made from inside it are dropped.
pub type mesh_log_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        level: mesh_log_level,
        target: *const c_char,
        message: *const c_char,
    ) -> bool,
>;

type LogFn =
    unsafe extern "C" fn(*mut c_void, mesh_log_level, *const c_char, *const c_char) -> bool;

struct Sink {
    cb: LogFn,
    userdata: *mut c_void,
    level: mesh_log_level,
}

// SAFETY: the caller of mesh_log_set promises the callback and userdata may be
// used from any thread.
unsafe impl Send for Sink {}
unsafe impl Sync for Sink {}

/// The callback messages go to; the read lock is held while it runs, so once
/// `mesh_log_set` returns the previous callback is neither running nor called again.
static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Outcome of installing the subscriber (once per process).
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

thread_local! {
    /// True while this thread runs the log callback (its own logging is dropped).
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

fn level_number(level: &Level) -> mesh_log_level {
    match *level {
        Level::ERROR => MESH_LOG_ERROR,
        Level::WARN => MESH_LOG_WARN,
        Level::INFO => MESH_LOG_INFO,
        Level::DEBUG => MESH_LOG_DEBUG,
        Level::TRACE => MESH_LOG_TRACE,
    }
}

fn wanted(meta: &Metadata<'_>) -> bool {
    let level = level_number(meta.level());
    // Inside the callback, this thread holds the read lock: do not take it again.
    meta.is_event()
        && !IN_CALLBACK.with(Cell::get)
        && SINK
            .read()
            .map(|sink| sink.as_ref().is_some_and(|s| level <= s.level))
            .unwrap_or(false)
}

/// Collects an event's fields as `message key=value ...`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

fn c_string(s: String) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let mut bytes = e.into_vec();
        bytes.retain(|&b| b != 0);
        CString::new(bytes).unwrap_or_default()
    })
}

/// Forwards enabled events to the C callback; keeps no spans.
struct CSubscriber;

impl tracing::Subscriber for CSubscriber {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // The level can change at any time: ask `enabled` every time.
        Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        wanted(meta)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        if IN_CALLBACK.with(Cell::get) {
            return;
        }
        let meta = event.metadata();
        let mut text = Text::default();
        event.record(&mut text);
        let message = c_string(text.message + &text.fields);
        let target = c_string(meta.target().to_owned());
        let level = level_number(meta.level());
        let (go_on, who) = {
            let Ok(sink) = SINK.read() else { return };
            let Some(sink) = sink.as_ref().filter(|s| level <= s.level) else {
                return;
            };
            IN_CALLBACK.with(|c| c.set(true));
            // SAFETY: the callback and userdata as registered; strings alive for the call.
            let go_on =
                unsafe { (sink.cb)(sink.userdata, level, target.as_ptr(), message.as_ptr()) };
            IN_CALLBACK.with(|c| c.set(false));
            (go_on, sink.userdata)
        };
        if !go_on {
            let mut sink = SINK.write().unwrap_or_else(|p| p.into_inner());
            // Unless another thread set a new callback meanwhile.
            if sink.as_ref().is_some_and(|s| s.userdata == who) {
                *sink = None;
            }
        }
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

fn install() -> FfiResult {
    INSTALLED
        .get_or_init(|| {
            tracing::subscriber::set_global_default(CSubscriber).map_err(|e| {
                format!("cannot forward logs: this process already has a global tracing subscriber ({e})")
            })
        })
        .clone()
        .map_err(|msg| Failure::new(mesh_status::Unsupported, msg))
}

/// Send mesh's log messages of `level` and more severe to `cb` (with
/// `userdata`), replacing any previous callback. `cb` NULL or `level`
/// `MESH_LOG_OFF` turns logging off. Nothing is logged before the first call.
///
/// Returns `MESH_STATUS_INVALID_ARG` for a level outside
/// `MESH_LOG_OFF..MESH_LOG_TRACE`, `MESH_STATUS_UNSUPPORTED` if the process
/// already has a global Rust `tracing` subscriber (e.g. the library is linked
/// into a Rust program that installed its own).
///
/// Lifetimes: `userdata` must stay valid until logging is turned off or
/// another callback is set; once this function returns, the previous callback
/// is not running and will not be called again.
/// Threads: process-wide setting; any thread (see `mesh_log_callback`).
#[no_mangle]
pub extern "C" fn mesh_log_set(
    cb: mesh_log_callback,
    userdata: *mut c_void,
    level: mesh_log_level,
) -> mesh_status {
    boundary(|| {
        if !(MESH_LOG_OFF..=MESH_LOG_TRACE).contains(&level) {
            return Err(Failure::new(
                mesh_status::InvalidArg,
                format!("log level {level}: expected MESH_LOG_OFF (0) to MESH_LOG_TRACE (5)"),
            ));
        }
        let sink = match cb {
            Some(cb) if level > MESH_LOG_OFF => {
                install()?;
                Some(Sink {
                    cb,
                    userdata,
                    level,
                })
            }
            _ => None,
        };
        *SINK.write().unwrap_or_else(|p| p.into_inner()) = sink;
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    })
}
