//! `mesh_node`: a mesh node on libp2p that serves layer ranges of models to
//! peers and generates locally or across the mesh (pipeline mode).

use std::os::raw::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mesh_core::engine::{Engine, GgmlEngine};
use mesh_core::generate::StopReason;
use mesh_core::network::p2p::P2pConfig;
use mesh_core::network::{Identity, Multiaddr, PeerId};
use mesh_core::node::{GenerateRequest, Mode, Node, NodeOptions, NodeOutput};

use crate::context::{mesh_generate_params, mesh_stop_reason, mesh_token_callback};
use crate::ffi::{self, Castable, OwnershipBox, Params, TextCallback, Versioned};
use crate::model::mesh_model;
use crate::status::{boundary, boundary_value, boundary_void, mesh_status, Failure, FfiResult};

/// A mesh node: a libp2p identity and connections, the layer ranges it
/// serves to peers, and generation (local or across the mesh).
///
/// Ownership: one owner. `mesh_node_open` returns it, `mesh_node_free` shuts
/// it down (withdraws its announcements, closes its connections) and frees
/// it. The node keeps its own references to the models it serves.
///
/// Threads: every function may be called from any thread, and several
/// `mesh_node_generate` calls may run at once (they take turns on the
/// process's compute pool). `mesh_node_free` only once no other call on the
/// node runs or will start.
pub struct mesh_node {
    _private: [u8; 0],
}

impl Castable for mesh_node {
    const NAME: &'static str = "mesh_node";
    type Ownership = OwnershipBox;
    type RustType = NodeHandle;
}

/// Signature of `mesh_node_event_callback`.
type EventCallbackFn = unsafe extern "C" fn(*mut c_void, *const c_char, usize);

/// A C event callback and its userdata (an address: it crosses threads).
#[derive(Clone, Copy)]
struct EventSink {
    cb: EventCallbackFn,
    userdata: usize,
}

/// What a `mesh_node` stands for.
pub struct NodeHandle {
    node: Option<Node>,
    /// Helpers and spares of `MESH_MODE_PRIVATE` generations.
    private: (usize, usize),
    /// Cancel flags of the generations running now.
    running: Mutex<Vec<Arc<AtomicBool>>>,
    sink: Arc<Mutex<Option<EventSink>>>,
    events: Option<std::thread::JoinHandle<()>>,
    /// The ledger this node runs (`mesh_node_ledger_start`), stopped before
    /// the node shuts down.
    pub(crate) ledger: Mutex<Option<mesh_core::ledger::consensus::LedgerHandle>>,
}

/// A node is used from several threads at once.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<NodeHandle>();
};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NodeHandle {
    pub(crate) fn node(&self) -> &Node {
        self.node
            .as_ref()
            .expect("the node lives until the handle is freed")
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        drop(lock(&self.ledger).take());
        if let Some(node) = self.node.take() {
            if let Err(e) = node.shutdown() {
                tracing::warn!("mesh_node_free: shutdown: {e}");
            }
        }
        // The node's event senders are gone: the event thread ends.
        if let Some(t) = self.events.take() {
            let _ = t.join();
        }
    }
}

/// How to open a node. Fill it with `mesh_node_params_default()`, then change
/// fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct mesh_node_params {
    /// `sizeof(mesh_node_params)`; set by `mesh_node_params_default()`.
    pub struct_size: usize,
    /// Multiaddrs to listen on, e.g. `"/ip4/0.0.0.0/tcp/4001"`; `n_listen`
    /// entries. None (the default): the node listens nowhere, which is enough
    /// to generate through bootstrap peers; a node that serves must listen.
    pub listen: *const *const c_char,
    /// Number of entries in `listen`.
    pub n_listen: usize,
    /// Multiaddrs of peers to bootstrap from (with `/p2p/<peer id>`).
    pub bootstrap: *const *const c_char,
    /// Number of entries in `bootstrap`.
    pub n_bootstrap: usize,
    /// File holding the node's Ed25519 key (created with mode 0600 if
    /// missing); NULL (the default): a new key every time.
    pub identity_path: *const c_char,
    /// Find peers on the LAN with mDNS. Default false.
    pub mdns: bool,
    /// Milliseconds a stage may take to answer before pipeline generation
    /// replaces it; 0 = the default (30 s).
    pub stage_timeout_ms: u64,
    /// Milliseconds to look for providers of every layer; 0 = the default (10 s).
    pub find_timeout_ms: u64,
    /// Bytes of KV cache the stage sessions this node serves may hold
    /// together; 0 = the default (1 GiB).
    pub kv_budget_bytes: u64,
    /// `MESH_MODE_PRIVATE`: helpers holding shares (at least 2); 0 = 2.
    pub private_helpers: u32,
    /// `MESH_MODE_PRIVATE`: helpers in reserve, replacing a helper that lies
    /// or fails. Default 0.
    pub private_spares: u32,
    /// `MESH_MODE_PRIVATE`: peer ids (base58 text) trusted to be independent
    /// parties; `n_trusted` entries. Untrusted helpers are used at most one
    /// per network (IPv4 /24, IPv6 /48). Default none.
    pub trusted: *const *const c_char,
    /// Number of entries in `trusted`.
    pub n_trusted: usize,
    /// Milliseconds a helper may take to answer one request before it is
    /// replaced; 0 = the default (30 s).
    pub helper_timeout_ms: u64,
}

// SAFETY: repr(C), starts with `struct_size: usize`.
unsafe impl Versioned for mesh_node_params {}

// SAFETY: pointers, integers and a bool: every value C can write is valid
// (the pointers are checked when used).
unsafe impl Params for mesh_node_params {
    fn default_value() -> Self {
        mesh_node_params {
            struct_size: std::mem::size_of::<mesh_node_params>(),
            listen: std::ptr::null(),
            n_listen: 0,
            bootstrap: std::ptr::null(),
            n_bootstrap: 0,
            identity_path: std::ptr::null(),
            mdns: false,
            stage_timeout_ms: 0,
            find_timeout_ms: 0,
            kv_budget_bytes: 0,
            private_helpers: 0,
            private_spares: 0,
            trusted: std::ptr::null(),
            n_trusted: 0,
            helper_timeout_ms: 0,
        }
    }
}

/// `n` multiaddrs from a C array of strings.
///
/// # Safety
/// `ptr` points to `n` NUL-terminated strings (or is NULL with `n` 0).
unsafe fn multiaddrs(ptr: *const *const c_char, n: usize, name: &str) -> FfiResult<Vec<Multiaddr>> {
    // SAFETY: caller's contract.
    let items = unsafe { ffi::slice(ptr, n, name) }?;
    items
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let what = format!("{name}[{i}]");
            // SAFETY: caller's contract.
            unsafe { multiaddr(s, &what) }
        })
        .collect()
}

/// A multiaddr from a NUL-terminated string; `name` names it in errors.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn multiaddr(ptr: *const c_char, name: &str) -> FfiResult<Multiaddr> {
    // SAFETY: caller's contract.
    let text = unsafe { ffi::c_str(ptr, name) }?;
    text.parse::<Multiaddr>().map_err(|e| {
        Failure::new(
            mesh_status::InvalidArg,
            format!("`{name}` ({text:?}) is not a multiaddr: {e}"),
        )
    })
}

impl NodeHandle {
    /// # Safety
    /// The pointers in `params` follow `mesh_node_params`' documentation.
    unsafe fn open(params: &mesh_node_params) -> FfiResult<NodeHandle> {
        // SAFETY: caller's contract.
        let listen = unsafe { multiaddrs(params.listen, params.n_listen, "params->listen") }?;
        // SAFETY: caller's contract.
        let bootstrap =
            unsafe { multiaddrs(params.bootstrap, params.n_bootstrap, "params->bootstrap") }?;
        let identity = if params.identity_path.is_null() {
            Identity::ephemeral()
        } else {
            // SAFETY: caller's contract.
            let path = unsafe { ffi::c_str(params.identity_path, "params->identity_path") }?;
            Identity::load_or_create(path.as_ref())?
        };
        let mut config = P2pConfig::new(identity);
        config.listen = listen;
        config.bootstrap = bootstrap;
        config.mdns = params.mdns;
        let mut options = NodeOptions::default();
        if params.stage_timeout_ms > 0 {
            options.pipeline.stage_timeout = Duration::from_millis(params.stage_timeout_ms);
        }
        if params.find_timeout_ms > 0 {
            options.pipeline.find_timeout = Duration::from_millis(params.find_timeout_ms);
        }
        if params.kv_budget_bytes > 0 {
            options.stage.kv_budget_bytes = params.kv_budget_bytes;
        }
        if params.find_timeout_ms > 0 {
            options.private.find_timeout = Duration::from_millis(params.find_timeout_ms);
        }
        if params.helper_timeout_ms > 0 {
            options.private.helper_timeout = Duration::from_millis(params.helper_timeout_ms);
        }
        // SAFETY: caller's contract.
        let trusted = unsafe { ffi::slice(params.trusted, params.n_trusted, "params->trusted") }?;
        for (i, &t) in trusted.iter().enumerate() {
            let what = format!("params->trusted[{i}]");
            // SAFETY: caller's contract.
            let text = unsafe { ffi::c_str(t, &what) }?;
            options
                .private
                .selection
                .trusted
                .push(parse_peer_id(text, &what)?);
        }
        let private = (
            match params.private_helpers {
                0 => 2,
                n => n as usize,
            },
            params.private_spares as usize,
        );
        let node = Node::open(config, options)?;
        let sink: Arc<Mutex<Option<EventSink>>> = Arc::new(Mutex::new(None));
        let mut rx = node.events();
        let thread_sink = sink.clone();
        let events = std::thread::Builder::new()
            .name("mesh-node-events".into())
            .spawn(move || loop {
                match rx.blocking_recv() {
                    Ok(event) => {
                        let Some(s) = *lock(&thread_sink) else {
                            continue;
                        };
                        let mut line = event.to_json().to_string().into_bytes();
                        let len = line.len();
                        line.push(0);
                        // SAFETY: the callback's contract (mesh_node_set_event_callback);
                        // the line lives for the call.
                        unsafe { (s.cb)(s.userdata as *mut c_void, line.as_ptr().cast(), len) };
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            })
            .map_err(|e| Failure::new(mesh_status::Internal, format!("event thread: {e}")))?;
        Ok(NodeHandle {
            node: Some(node),
            private,
            running: Mutex::new(Vec::new()),
            sink,
            events: Some(events),
            ledger: Mutex::new(None),
        })
    }

    fn generate(
        &self,
        engine: &Arc<GgmlEngine>,
        request: &GenerateRequest,
        mode: Mode,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> FfiResult<NodeOutput> {
        let flag = Arc::new(AtomicBool::new(false));
        lock(&self.running).push(flag.clone());
        let out = self
            .node()
            .generate(engine, request, mode, Some(&flag), on_text);
        lock(&self.running).retain(|f| !Arc::ptr_eq(f, &flag));
        let out = out?;
        if out.output.stop == StopReason::Cancelled {
            return Err(Failure::new(
                mesh_status::Cancelled,
                format!(
                    "generation cancelled by mesh_node_cancel after {} tokens",
                    out.output.token_ids.len()
                ),
            ));
        }
        Ok(out)
    }
}

/// Where a generation's layers run.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum mesh_mode {
    /// Every layer on this node.
    Local = 0,
    /// The layers on the peers that serve them (and this node's own served
    /// layers), planned for the least time per token, with failover.
    Pipeline = 1,
    /// The linear layers on secret shares held by helper peers
    /// (`mesh_node_params.private_helpers` and `private_spares`); this node
    /// keeps everything else. Tokens equal local generation with exact
    /// accumulation.
    Private = 2,
}

/// Numbers about one `mesh_node_generate` call. The caller sets
/// `struct_size` to `sizeof(mesh_node_generate_stats)`; the rest is written
/// on success.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct mesh_node_generate_stats {
    /// `sizeof(mesh_node_generate_stats)`, set by the caller.
    pub struct_size: usize,
    /// Tokens in the prompt (after the chat template, BOS included).
    pub prompt_tokens: usize,
    /// Tokens generated (the end-of-generation token not counted).
    pub generated_tokens: usize,
    /// Milliseconds spent evaluating the prompt.
    pub prompt_ms: f64,
    /// Milliseconds spent generating.
    pub generate_ms: f64,
    /// Why generation ended.
    pub stop_reason: mesh_stop_reason,
    /// Hops of the pipeline at the end (0 in local mode).
    pub n_hops: usize,
    /// Stages replaced during the generation.
    pub failovers: usize,
    /// Mean round trip of a forward request to one hop, milliseconds.
    pub hop_ms: f64,
    /// Hidden-state bytes (pipeline) or envelope bytes (private) sent and
    /// received per generated token.
    pub bytes_per_token: f64,
    /// Private mode: helpers holding shares (0 in other modes).
    pub n_helpers: usize,
    /// Private mode: helpers dropped (and replaced by spares) for lying,
    /// failing or stalling.
    pub helpers_dropped: usize,
}

// SAFETY: repr(C), starts with `struct_size: usize`; never read whole.
unsafe impl Versioned for mesh_node_generate_stats {}

/// Receives the node's events as JSON objects, one per call: `json` points to
/// `len` bytes of UTF-8 followed by a NUL, valid only during the call. Each
/// has an `"event"` field: `peer_connected`, `peer_disconnected`,
/// `providers_changed`, `rtt`, `listening`, `session_opened`,
/// `session_closed`, `plan`, `failover`.
///
/// It runs on a thread of the node, one event at a time. It must return
/// quickly, must not call `mesh_node_free` and must not unwind.
pub type mesh_node_event_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, json: *const c_char, len: usize)>;

/// Default node parameters: listens nowhere, no bootstrap peers, a new
/// identity, no mDNS, default timeouts and KV budget.
///
/// Threads: any thread. Never fails.
#[no_mangle]
pub extern "C" fn mesh_node_params_default() -> mesh_node_params {
    boundary_value(
        mesh_node_params::default_value(),
        mesh_node_params::default_value,
    )
}

/// Start a node: listen, dial the bootstrap peers. `params` may be NULL for
/// the defaults.
///
/// On success `*out` receives a node the caller owns and must free with
/// `mesh_node_free`. On failure `*out` is not written: `MESH_STATUS_INVALID_ARG`
/// for an address that is not a multiaddr, `MESH_STATUS_IO` for an identity
/// file that cannot be read or created, `MESH_STATUS_NETWORK` when listening
/// fails.
///
/// Lifetimes: the strings of `params` are used only during the call.
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_open(
    params: *const mesh_node_params,
    out: *mut *mut mesh_node,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let params = unsafe { ffi::params(params, "params") }?;
        // SAFETY: caller's contract.
        let out = unsafe { ffi::out(out, "out") }?;
        // SAFETY: caller's contract on the strings in `params`.
        let node = unsafe { NodeHandle::open(&params) }?;
        out.write(ffi::box_handle(node));
        Ok(())
    })
}

/// Shut a node down (withdraw its announcements, close its connections,
/// stop serving) and free it. NULL is a no-op.
///
/// Lifetimes: no other call on `node` may be running or start afterwards;
/// never call it from a callback of this node.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_free(node: *mut mesh_node) {
    boundary_void(|| unsafe { ffi::box_free(node, "node") })
}

/// The node's peer id (e.g. `"12D3KooW..."`), NUL-terminated in `buf` of
/// `cap` bytes; `*n_out` = its length. If `cap` is too small:
/// `MESH_STATUS_BUFFER_TOO_SMALL` and `*n_out` = the size needed including the NUL.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_peer_id(
    node: *const mesh_node,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let buf = unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?;
        buf.write_text(node.node().peer_id().to_string().as_bytes())
    })
}

/// The addresses the node listens on, each ending in `/p2p/<peer id>` (ready
/// to pass as another node's bootstrap), separated by `'\n'`, NUL-terminated
/// in `buf` of `cap` bytes; buffer rules as `mesh_node_peer_id`.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_listen_addrs(
    node: *const mesh_node,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let buf = unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?;
        let id = node.node().peer_id().to_string();
        let text = node
            .node()
            .listen_addrs()?
            .iter()
            .map(|a| {
                let a = a.to_string();
                if a.contains("/p2p/") {
                    a
                } else {
                    format!("{a}/p2p/{id}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        buf.write_text(text.as_bytes())
    })
}

/// Connect to a peer at `addr` (a NUL-terminated multiaddr, with or without
/// `/p2p/<peer id>`).
///
/// Threads: any thread; blocks until connected or failed.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_dial(
    node: *const mesh_node,
    addr: *const c_char,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let addr = unsafe { multiaddr(addr, "addr") }?;
        node.node().dial(addr)?;
        Ok(())
    })
}

/// Serve layers `layer_start..layer_end` (end exclusive; `layer_end` 0 = to
/// the last layer) of `model` to peers: the node measures its speed over
/// them, answers stage requests and announces the range. Serving the same
/// model again replaces its range.
///
/// `MESH_STATUS_INVALID_ARG` for an empty range or one past the model's layers.
///
/// Threads: any thread; blocks for the speed measurement (well under a second
/// for small models).
#[no_mangle]
pub unsafe extern "C" fn mesh_node_serve(
    node: *const mesh_node,
    model: *const mesh_model,
    layer_start: u32,
    layer_end: u32,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let engine = unsafe { ffi::arc_clone(model, "model") }?;
        let end = match layer_end {
            0 => engine.info().n_layers as u32,
            n => n,
        };
        node.node().serve(engine, layer_start..end)?;
        Ok(())
    })
}

/// Also answer private-mode requests for `model`: owners on other nodes send
/// sealed shares of their activations and get sealed partial products back;
/// this node never sees anything but random shares. Serves the whole model
/// as a stage too if it is not served yet (owners find helpers among the
/// model's providers). The node must listen.
///
/// Threads: any thread; blocks for the speed measurement.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_serve_helper(
    node: *const mesh_node,
    model: *const mesh_model,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let engine = unsafe { ffi::arc_clone(model, "model") }?;
        node.node().serve_helper(engine)?;
        Ok(())
    })
}

/// Generate text after `prompt` (NUL-terminated UTF-8) with `model`, in
/// `mode`, streaming it to `cb` (as `mesh_generate`, whose `params`,
/// `cb`, `userdata` and return statuses this shares). In
/// `MESH_MODE_PIPELINE` this node keeps the tokenizer, embeddings, head and
/// sampler and runs the layers on the peers that serve them (and its own
/// served layers); the model must be the same file the peers serve.
///
/// Also: `MESH_STATUS_NETWORK` when no chain of peers covers the model's
/// layers (the message names the missing layers) or when stages fail and no
/// other peer can take their layers, or when too few helpers answer (private
/// mode) or helpers fail with no spare left; `MESH_STATUS_CANCELLED` after
/// `mesh_node_cancel`. In `MESH_MODE_PRIVATE` the linear layers run on
/// secret shares held by helper peers (`mesh_node_serve_helper`).
/// `out_stats` may be NULL, else its `struct_size` must be set.
///
/// Lifetimes: as `mesh_generate`.
/// Threads: blocks the calling thread until done; any number at once.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_generate(
    node: *const mesh_node,
    model: *const mesh_model,
    prompt: *const c_char,
    params: *const mesh_generate_params,
    mode: i32,
    cb: mesh_token_callback,
    userdata: *mut c_void,
    out_stats: *mut mesh_node_generate_stats,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let engine = unsafe { ffi::arc_clone(model, "model") }?;
        // SAFETY: caller's contract.
        let text = unsafe { ffi::c_str(prompt, "prompt") }?;
        // SAFETY: caller's contract.
        let params = unsafe { ffi::params(params, "params") }?;
        // SAFETY: caller's contract.
        let stats = unsafe { ffi::versioned_out(out_stats, "out_stats") }?;
        let mode = match mode {
            0 => Mode::Local,
            1 => Mode::Pipeline,
            2 => Mode::Private {
                helpers: node.private.0,
                spares: node.private.1,
            },
            other => {
                return Err(Failure::new(
                    mesh_status::InvalidArg,
                    format!("`mode` {other}: expected MESH_MODE_LOCAL, _PIPELINE or _PRIVATE"),
                ))
            }
        };
        // SAFETY: `params` is the caller's, `format` valid during the call.
        let request = GenerateRequest::new(params.prompt(text), unsafe { params.to_core() }?);
        let mut cb = TextCallback::new(cb, userdata);
        // SAFETY: the callback's contract (mesh_token_callback).
        let out = node.generate(&engine, &request, mode, &mut |piece| unsafe {
            cb.send(piece)
        })?;
        if let Some(stats) = stats {
            let base = crate::context::mesh_generate_stats::from_output(&out.output)?;
            let (n_hops, failovers, hop_ms, mut bytes_per_token) = match &out.pipeline {
                Some(p) => (
                    p.plan.len(),
                    p.stats.failovers,
                    p.stats.hop_ms(),
                    p.stats.bytes_per_token(),
                ),
                None => (0, 0, 0.0, 0.0),
            };
            let (n_helpers, helpers_dropped) = match &out.private {
                Some(p) => {
                    let d = &p.decode;
                    bytes_per_token =
                        (d.bytes_sent + d.bytes_received) as f64 / p.decode_steps.max(1) as f64;
                    (p.active.len(), p.dropped.len())
                }
                None => (0, 0),
            };
            stats.write(mesh_node_generate_stats {
                struct_size: std::mem::size_of::<mesh_node_generate_stats>(),
                prompt_tokens: base.prompt_tokens,
                generated_tokens: base.generated_tokens,
                prompt_ms: base.prompt_ms,
                generate_ms: base.generate_ms,
                stop_reason: base.stop_reason,
                n_hops,
                failovers,
                hop_ms,
                bytes_per_token,
                n_helpers,
                helpers_dropped,
            });
        }
        Ok(())
    })
}

/// Ask every generation running on `node` to stop; each `mesh_node_generate`
/// then returns `MESH_STATUS_CANCELLED` after at most one more token (or
/// prompt piece of 64 tokens). Does nothing if none runs.
///
/// Threads: any thread, including from a token callback. Returns at once.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_cancel(node: *const mesh_node) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        for f in lock(&node.running).iter() {
            f.store(true, Ordering::SeqCst);
        }
        Ok(())
    })
}

/// Receive the node's events (see `mesh_node_event_callback`); `cb` NULL
/// stops them. Replaces an earlier callback; events before the call are not
/// replayed.
///
/// Lifetimes: `userdata` must stay valid until the callback is replaced or
/// the node freed.
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_set_event_callback(
    node: *const mesh_node,
    cb: mesh_node_event_callback,
    userdata: *mut c_void,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        *lock(&node.sink) = cb.map(|cb| EventSink {
            cb,
            userdata: userdata as usize,
        });
        Ok(())
    })
}

/// A peer id given as text by a C caller (`what` names the argument in the
/// error).
pub(crate) fn parse_peer_id(text: &str, what: &str) -> Result<PeerId, Failure> {
    text.parse::<PeerId>().map_err(|e| {
        Failure::new(
            mesh_status::InvalidArg,
            format!("`{what}` ({text:?}) is not a peer id: {e}"),
        )
    })
}
