//! Pointer plumbing: the only place that turns C pointers into Rust references.
//!
//! Each opaque C type implements [`Castable`], naming the Rust type it stands
//! for and how it is owned ([`OwnershipArc`]: shared and refcounted;
//! [`OwnershipBox`]: one owner). The helpers below turn a pointer into a
//! reference, a string, a slice, a params struct or an output slot, or into a
//! [`Failure`]: NULL is `MESH_STATUS_NULL_ARG`, misalignment
//! `MESH_STATUS_MISALIGNED_ARG`, bad UTF-8 `MESH_STATUS_INVALID_UTF8`, a wrong
//! `struct_size` `MESH_STATUS_STRUCT_SIZE`.
//!
//! Handles are tagged: every handle this library gives C is recorded in a
//! registry (address, type, and for refcounted handles the references C owns)
//! until C frees it, and a handle is looked up there before it is dereferenced.
//! A freed handle, a double free, a handle of another type or a pointer this
//! library never made is `MESH_STATUS_INVALID_HANDLE` (a `_free` of one frees
//! nothing and records the message), never a read of freed memory. What cannot
//! be checked (a handle freed while another call uses it, an address reused by
//! a new handle of the same type, a buffer shorter than its stated length) is
//! the caller's contract, spelled out in each function's documentation in
//! `mesh.h`.
#![deny(unsafe_op_in_unsafe_fn)]

use std::collections::HashMap;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::mem;
use std::os::raw::{c_char, c_void};
use std::ptr::{self, NonNull};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use crate::status::{mesh_status, Failure, FfiResult};

/// A C handle type: which Rust value a pointer to it really points at, and who owns it.
pub(crate) trait Castable {
    /// The C type's name, for messages (`"mesh_model"`); also the handle's tag
    /// in the registry, so it is unique per handle type.
    const NAME: &'static str;
    /// [`OwnershipArc`] or [`OwnershipBox`].
    type Ownership;
    /// The Rust value behind the handle.
    type RustType;
}

/// The handle is an `Arc<RustType>` turned into a pointer: refcounted, shared
/// between threads, never mutated (`_retain` / `_free` move the count).
pub(crate) enum OwnershipArc {}

/// The handle is a `Box<RustType>` turned into a pointer: one owner, freed once.
/// Exports only ever take shared references to it (interior mutability handles
/// the rest), so a call from another thread never aliases a `&mut`.
pub(crate) enum OwnershipBox {}

fn null(name: &str) -> Failure {
    Failure::new(mesh_status::NullArg, format!("`{name}` is NULL"))
}

/// Non-NULL and aligned for `T`, or the status saying which.
fn check<T>(ptr: *const T, name: &str) -> FfiResult<NonNull<T>> {
    let Some(nn) = NonNull::new(ptr.cast_mut()) else {
        return Err(null(name));
    };
    if !ptr.is_aligned() {
        return Err(Failure::new(
            mesh_status::MisalignedArg,
            format!(
                "`{name}` ({ptr:p}) is not aligned to {} bytes",
                mem::align_of::<T>()
            ),
        ));
    }
    Ok(nn)
}

/// Reject a non-NULL pointer that is misaligned; NULL is fine.
fn check_nullable<T>(ptr: *const T, name: &str) -> FfiResult<Option<NonNull<T>>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        check(ptr, name).map(Some)
    }
}

/// A handle C holds: its type's tag and how many references C owns (always 1
/// for a Box handle; `_retain` adds to it for an Arc handle).
struct Live {
    kind: &'static str,
    refs: usize,
}

/// Every handle given to C and not yet freed, by address.
static LIVE: LazyLock<Mutex<HashMap<usize, Live>>> = LazyLock::new(Mutex::default);

/// The registry, locked. Nothing panics while holding it, but a poisoned lock
/// is still a consistent map (every update is a single insert or remove).
fn live_handles() -> MutexGuard<'static, HashMap<usize, Live>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The registry entry of a live handle of type `C` at `addr`, or the
/// `MESH_STATUS_INVALID_HANDLE` failure saying what it is instead.
fn live_entry<'m, C: Castable>(
    map: &'m mut HashMap<usize, Live>,
    addr: usize,
    name: &str,
) -> FfiResult<&'m mut Live> {
    match map.get_mut(&addr) {
        Some(live) if live.kind == C::NAME => Ok(live),
        Some(live) => Err(Failure::new(
            mesh_status::InvalidHandle,
            format!(
                "`{name}` ({addr:#x}) is a {}, not a {}",
                live.kind,
                C::NAME
            ),
        )),
        None => Err(Failure::new(
            mesh_status::InvalidHandle,
            format!(
                "`{name}` ({addr:#x}) is not a live {}: it was freed already, or it was not made by this library",
                C::NAME
            ),
        )),
    }
}

/// Record a new handle of type `C` that C owns once.
fn register<C: Castable>(addr: usize) {
    let previous = live_handles().insert(
        addr,
        Live {
            kind: C::NAME,
            refs: 1,
        },
    );
    // Two live allocations never share an address.
    debug_assert!(
        previous.is_none(),
        "{} at {addr:#x} registered twice",
        C::NAME
    );
}

/// Non-NULL, aligned and a live handle of type `C`.
fn check_handle<C: Castable>(ptr: *const C, name: &str) -> FfiResult<NonNull<C::RustType>> {
    let p = check(ptr.cast::<C::RustType>(), name)?;
    live_entry::<C>(&mut live_handles(), p.as_ptr() as usize, name)?;
    Ok(p)
}

/// The value behind a handle.
///
/// # Safety
/// `ptr` is NULL or any pointer; if it is a live handle of type `C` (checked),
/// nothing frees it for `'a`.
pub(crate) unsafe fn handle<'a, C: Castable>(
    ptr: *const C,
    name: &str,
) -> FfiResult<&'a C::RustType> {
    let p = check_handle(ptr, name)?;
    // SAFETY: a live handle of type `C` points at its `RustType`; that it stays
    // alive for `'a` is the caller's contract.
    Ok(unsafe { p.as_ref() })
}

/// A new refcounted handle owning `value` (count 1).
pub(crate) fn arc_handle<C: Castable<Ownership = OwnershipArc>>(
    value: Arc<C::RustType>,
) -> *const C {
    let ptr = Arc::into_raw(value);
    register::<C>(ptr as usize);
    ptr.cast()
}

/// A Rust-side owner of the value behind `ptr` (the Arc count goes up by one;
/// the references C owns do not change).
///
/// # Safety
/// As [`handle`].
pub(crate) unsafe fn arc_clone<C: Castable<Ownership = OwnershipArc>>(
    ptr: *const C,
    name: &str,
) -> FfiResult<Arc<C::RustType>> {
    let p = check_handle(ptr, name)?;
    // SAFETY: a live Arc handle came from `Arc::into_raw` and C still owns a
    // count of it, so the count is at least one; the new count is owned by the
    // returned Arc.
    unsafe {
        Arc::increment_strong_count(p.as_ptr().cast_const());
        Ok(Arc::from_raw(p.as_ptr().cast_const()))
    }
}

/// One more reference owned by C (`_retain`), released by another `_free`.
///
/// # Safety
/// As [`handle`].
pub(crate) unsafe fn arc_retain<C: Castable<Ownership = OwnershipArc>>(
    ptr: *const C,
    name: &str,
) -> FfiResult {
    let p = check(ptr.cast::<C::RustType>(), name)?;
    let mut map = live_handles();
    let live = live_entry::<C>(&mut map, p.as_ptr() as usize, name)?;
    live.refs = live.refs.checked_add(1).ok_or_else(|| {
        Failure::new(
            mesh_status::InvalidArg,
            format!("`{name}`: too many references"),
        )
    })?;
    // SAFETY: live (checked under the lock that `_free` takes too), so the
    // count is at least one; the new count belongs to the C reference.
    unsafe { Arc::increment_strong_count(p.as_ptr().cast_const()) };
    Ok(())
}

/// Drop one C-owned reference of an Arc handle; NULL is a no-op. A pointer
/// that is not a live handle of type `C` is a failure and nothing is dropped.
///
/// # Safety
/// `ptr` is NULL or any pointer; if it is a live handle, the caller gives up
/// one of its references and does not use it again.
pub(crate) unsafe fn arc_free<C: Castable<Ownership = OwnershipArc>>(
    ptr: *const C,
    name: &str,
) -> FfiResult {
    let Some(p) = check_nullable(ptr.cast::<C::RustType>(), name)? else {
        return Ok(());
    };
    let addr = p.as_ptr() as usize;
    {
        let mut map = live_handles();
        let live = live_entry::<C>(&mut map, addr, name)?;
        live.refs -= 1;
        if live.refs == 0 {
            map.remove(&addr);
        }
    }
    // SAFETY: the caller gives up the count it owned (checked live above); the
    // value is dropped outside the lock if this was the last count.
    drop(unsafe { Arc::from_raw(p.as_ptr().cast_const()) });
    Ok(())
}

/// A new single-owner handle owning `value`.
pub(crate) fn box_handle<C: Castable<Ownership = OwnershipBox>>(value: C::RustType) -> *mut C {
    let ptr = Box::into_raw(Box::new(value));
    register::<C>(ptr as usize);
    ptr.cast()
}

/// Drop a Box handle; NULL is a no-op. A pointer that is not a live handle of
/// type `C` (freed already, another type) is a failure and nothing is freed.
///
/// # Safety
/// `ptr` is NULL or any pointer; if it is a live handle, no other call is
/// using it and nothing uses it afterwards.
pub(crate) unsafe fn box_free<C: Castable<Ownership = OwnershipBox>>(
    ptr: *mut C,
    name: &str,
) -> FfiResult {
    let Some(p) = check_nullable(ptr.cast::<C::RustType>(), name)? else {
        return Ok(());
    };
    let addr = p.as_ptr() as usize;
    {
        let mut map = live_handles();
        live_entry::<C>(&mut map, addr, name)?;
        map.remove(&addr);
    }
    // SAFETY: came from `Box::into_raw` (it was live) and is now unregistered,
    // so no later call reaches it: freed exactly once.
    drop(unsafe { Box::from_raw(p.as_ptr()) });
    Ok(())
}

/// A NUL-terminated C string as UTF-8 text.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string alive for `'a`.
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char, name: &str) -> FfiResult<&'a str> {
    let p = check(ptr, name)?;
    // SAFETY: non-NULL, NUL-terminated (caller's contract).
    let bytes = unsafe { CStr::from_ptr(p.as_ptr()) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|e| {
        Failure::new(
            mesh_status::InvalidUtf8,
            format!(
                "`{name}` is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// `len` values starting at `ptr`; `ptr` may be NULL only when `len` is 0.
///
/// # Safety
/// `ptr` points to `len` initialized values alive for `'a`.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, name: &str) -> FfiResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    let p = check(ptr, name)?;
    let bytes = len.checked_mul(mem::size_of::<T>());
    if !matches!(bytes, Some(b) if b <= isize::MAX.unsigned_abs()) {
        return Err(Failure::new(
            mesh_status::InvalidArg,
            format!("`{name}`: {len} elements do not fit in memory"),
        ));
    }
    // SAFETY: non-NULL, aligned, size checked; contents are the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p.as_ptr(), len) })
}

/// Where an export writes one result. Nothing is written until [`Out::write`],
/// which exports call only once everything else has succeeded.
pub(crate) struct Out<'a, T> {
    ptr: NonNull<T>,
    _slot: PhantomData<&'a mut T>,
}

impl<T> Out<'_, T> {
    /// Store `value` (the old contents, possibly uninitialized, are not read or dropped).
    pub(crate) fn write(self, value: T) {
        // SAFETY: checked non-NULL and aligned; writable for `T` by contract.
        unsafe { self.ptr.as_ptr().write(value) }
    }
}

/// A required output slot.
///
/// # Safety
/// `ptr` is NULL or points to memory writable as a `T` for `'a`.
pub(crate) unsafe fn out<'a, T>(ptr: *mut T, name: &str) -> FfiResult<Out<'a, T>> {
    Ok(Out {
        ptr: check(ptr.cast_const(), name)?,
        _slot: PhantomData,
    })
}

/// A params or stats struct whose first field is `size_t struct_size`.
///
/// # Safety
/// Implementors are `#[repr(C)]` and start with a `usize` field.
pub(crate) unsafe trait Versioned {}

/// A params struct C fills in and Rust reads whole.
///
/// # Safety
/// As [`Versioned`], and every value a C caller can legitimately write (bools
/// 0 or 1, any integer or float) is a valid Rust value of the type.
pub(crate) unsafe trait Params: Versioned + Copy {
    /// The value `mesh_*_params_default()` returns.
    fn default_value() -> Self;
}

fn struct_size_failure<T>(name: &str, found: usize) -> Failure {
    Failure::new(
        mesh_status::StructSize,
        format!(
            "`{name}->struct_size` is {found}, expected {} (sizeof the struct this library was built with); \
             fill it with the matching *_default() function",
            mem::size_of::<T>()
        ),
    )
}

/// # Safety
/// `p` points to at least a `usize` (the caller's struct).
unsafe fn read_struct_size<T>(p: NonNull<T>) -> usize {
    // SAFETY: aligned for T, whose first field is a usize (Versioned's contract).
    unsafe { p.cast::<usize>().as_ptr().read() }
}

/// Read a params struct; NULL means the defaults.
///
/// # Safety
/// `ptr` is NULL or points to a `struct_size`-prefixed struct of at least the
/// size it states.
pub(crate) unsafe fn params<P: Params>(ptr: *const P, name: &str) -> FfiResult<P> {
    let Some(p) = check_nullable(ptr, name)? else {
        return Ok(P::default_value());
    };
    // SAFETY: caller's contract; the size is checked before the whole struct is read.
    let size = unsafe { read_struct_size(p) };
    if size != mem::size_of::<P>() {
        return Err(struct_size_failure::<P>(name, size));
    }
    // SAFETY: the caller's struct is exactly a P.
    Ok(unsafe { p.as_ptr().read() })
}

/// An optional output struct with a `struct_size` the caller filled in; NULL
/// means the caller does not want it.
///
/// # Safety
/// `ptr` is NULL or points to writable memory of `struct_size` bytes, with
/// `struct_size` set.
pub(crate) unsafe fn versioned_out<'a, T: Versioned>(
    ptr: *mut T,
    name: &str,
) -> FfiResult<Option<Out<'a, T>>> {
    let Some(p) = check_nullable(ptr.cast_const(), name)? else {
        return Ok(None);
    };
    // SAFETY: caller's contract.
    let size = unsafe { read_struct_size(p) };
    if size != mem::size_of::<T>() {
        return Err(struct_size_failure::<T>(name, size));
    }
    Ok(Some(Out {
        ptr: p,
        _slot: PhantomData,
    }))
}

/// A caller buffer of `cap` values plus a slot for the length, filled with
/// "needed" semantics: if the result does not fit, only the length slot is
/// written (the size needed) and the status is `MESH_STATUS_BUFFER_TOO_SMALL`.
pub(crate) struct BufOut<'a, T> {
    buf: *mut T,
    cap: usize,
    len: Out<'a, usize>,
    name: &'a str,
}

/// A caller buffer; `buf` may be NULL only when `cap` is 0 (a size query).
///
/// # Safety
/// `buf` is writable for `cap` values and `len` for a `size_t`, both for `'a`.
pub(crate) unsafe fn buf_out<'a, T>(
    buf: *mut T,
    cap: usize,
    len: *mut usize,
    name: &'a str,
) -> FfiResult<BufOut<'a, T>> {
    // SAFETY: caller's contract.
    let len = unsafe { out(len, "n_out") }?;
    if cap > 0 {
        check(buf.cast_const(), name)?;
    } else {
        check_nullable(buf.cast_const(), name)?;
    }
    Ok(BufOut {
        buf,
        cap,
        len,
        name,
    })
}

impl<'a, T: Copy> BufOut<'a, T> {
    fn fits(self, needed: usize, what: &str) -> FfiResult<(*mut T, Out<'a, usize>)> {
        if needed > self.cap {
            self.len.write(needed);
            return Err(Failure::new(
                mesh_status::BufferTooSmall,
                format!(
                    "`{}` holds {} {what}, the result needs {needed}",
                    self.name, self.cap
                ),
            ));
        }
        Ok((self.buf, self.len))
    }

    /// Copy `items`; `*n_out` = number of items (or the number needed).
    pub(crate) fn write_items(self, items: &[T]) -> FfiResult {
        let (buf, len) = self.fits(items.len(), "elements")?;
        if !items.is_empty() {
            // SAFETY: `buf` is non-NULL (cap >= len > 0), aligned and holds `cap`
            // values; `items` is Rust memory, so they do not overlap.
            unsafe { ptr::copy_nonoverlapping(items.as_ptr(), buf, items.len()) };
        }
        len.write(items.len());
        Ok(())
    }
}

impl BufOut<'_, c_char> {
    /// Copy `bytes` and a terminating NUL. On success `*n_out` = bytes written
    /// without the NUL; if the buffer is too small, `*n_out` = bytes needed
    /// including the NUL.
    pub(crate) fn write_text(self, bytes: &[u8]) -> FfiResult {
        let needed = bytes.len() + 1;
        let (buf, len) = self.fits(needed, "bytes")?;
        // SAFETY: `buf` is non-NULL and holds at least `needed` bytes.
        unsafe {
            ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
            buf.add(bytes.len()).write(0);
        }
        len.write(bytes.len());
        Ok(())
    }

    /// Copy as much of `text` as fits (cut at a character boundary) with a NUL,
    /// even when it does not all fit: for error messages, which callers print
    /// from fixed-size buffers. `*n_out` is as for [`BufOut::write_text`].
    pub(crate) fn write_text_truncated(self, text: &str) -> FfiResult {
        if self.cap > 0 && text.len() >= self.cap {
            let mut end = self.cap - 1;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            // SAFETY: `buf` is non-NULL and holds `cap` > `end` bytes.
            unsafe {
                ptr::copy_nonoverlapping(text.as_ptr(), self.buf.cast::<u8>(), end);
                self.buf.add(end).write(0);
            }
        }
        self.write_text(text.as_bytes())
    }
}

/// Signature of `mesh_token_callback`.
pub(crate) type TextCallbackFn = unsafe extern "C" fn(*mut c_void, *const c_char, usize) -> bool;

/// A C callback that receives text pieces: `bool cb(void *userdata, const char
/// *piece, size_t len)`, `piece` NUL-terminated and valid only during the call.
/// Once it returns false it is not called again.
pub(crate) struct TextCallback {
    cb: Option<TextCallbackFn>,
    userdata: *mut c_void,
    stopped: bool,
    piece: Vec<u8>,
}

impl TextCallback {
    /// `cb` may be None: pieces are then dropped and generation goes on.
    pub(crate) fn new(cb: Option<TextCallbackFn>, userdata: *mut c_void) -> TextCallback {
        TextCallback {
            cb,
            userdata,
            stopped: false,
            piece: Vec::new(),
        }
    }

    /// Hand `text` to the callback; false once it asked to stop.
    ///
    /// # Safety
    /// The callback is safe to call with `userdata` (the caller's contract) and does not unwind.
    pub(crate) unsafe fn send(&mut self, text: &str) -> bool {
        let Some(cb) = self.cb else {
            return true;
        };
        if self.stopped {
            return false;
        }
        self.piece.clear();
        self.piece.extend_from_slice(text.as_bytes());
        self.piece.push(0);
        // SAFETY: the pointer and length describe `piece`, alive for the call.
        let go_on = unsafe { cb(self.userdata, self.piece.as_ptr().cast(), text.len()) };
        self.stopped = !go_on;
        go_on
    }
}
