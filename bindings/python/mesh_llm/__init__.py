"""mesh_llm: Python bindings (ctypes) for the mesh-llm C API (include/mesh.h).

    import mesh_llm
    with mesh_llm.Model("default") as model:
        ctx = model.context(n_threads=1)
        out = ctx.generate("Hello", chat=True, max_tokens=32,
                           on_piece=lambda p: print(p, end="", flush=True) or True)
        print(out.stats)

The shared library libmesh_ffi.so is looked up, in order, at: $MESH_LIB;
next to this package; $CARGO_TARGET_DIR/{debug,release}; the target dir of
the repository this package sits in (~/.cache/mesh-llm/target or
<repo>/target, {debug,release}). Call load_library(path) to choose one.

Threads: a Model may be used from any thread. A Context runs one generate()
at a time; cancel() may be called from any thread (or from on_piece).
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "ABI_VERSION",
    "Cancelled",
    "Context",
    "Generation",
    "GenerateStats",
    "LogLevel",
    "MeshError",
    "Mode",
    "Model",
    "Node",
    "NodeGenerateStats",
    "Status",
    "StopReason",
    "abi_version",
    "load_library",
    "set_log_callback",
]

__version__ = "0.1.0"

#: The MESH_ABI_VERSION of the include/mesh.h these bindings were written for.
ABI_VERSION = 1


class Status(enum.IntEnum):
    """mesh_status values (include/mesh.h). Unknown values may appear."""

    OK = 0
    NULL_ARG = 1
    MISALIGNED_ARG = 2
    INVALID_UTF8 = 3
    STRUCT_SIZE = 4
    BUFFER_TOO_SMALL = 5
    INVALID_ARG = 6
    BUSY = 7
    IO = 8
    GGUF = 9
    UNSUPPORTED = 10
    TOKENIZER = 11
    TEMPLATE = 12
    CONTEXT_OVERFLOW = 13
    FETCH = 14
    GGML = 15
    CANCELLED = 16
    PANIC = 17
    INTERNAL = 18
    SEAL = 19
    NETWORK = 20
    INVALID_HANDLE = 21


class StopReason(enum.IntEnum):
    """Why a generation ended normally (mesh_stop_reason)."""

    END_OF_GENERATION = 0
    MAX_TOKENS = 1
    CALLBACK = 2


class LogLevel(enum.IntEnum):
    """mesh_log_level values."""

    OFF = 0
    ERROR = 1
    WARN = 2
    INFO = 3
    DEBUG = 4
    TRACE = 5


# --- C structs, field for field as in include/mesh.h -------------------------


class _ModelParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("n_threads", c_size_t), ("exact_accumulation", c_bool)]


class _ChatMessage(Structure):
    _fields_ = [("role", c_char_p), ("content", c_char_p)]


class _ContextParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("n_ctx", c_size_t), ("n_threads", c_size_t)]


class _GenerateParams(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("max_tokens", c_size_t),
        ("temperature", c_float),
        ("top_k", c_size_t),
        ("top_p", c_float),
        ("min_p", c_float),
        ("repeat_penalty", c_float),
        ("repeat_last_n", c_size_t),
        ("seed", c_uint64),
        ("ignore_eos", c_bool),
        ("chat", c_bool),
        ("raw", c_bool),
        ("format", c_char_p),
    ]


class _GenerateStats(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("prompt_tokens", c_size_t),
        ("generated_tokens", c_size_t),
        ("prompt_ms", c_double),
        ("generate_ms", c_double),
        ("stop_reason", c_int32),
    ]


class _NodeParams(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("listen", POINTER(c_char_p)),
        ("n_listen", c_size_t),
        ("bootstrap", POINTER(c_char_p)),
        ("n_bootstrap", c_size_t),
        ("identity_path", c_char_p),
        ("mdns", c_bool),
        ("stage_timeout_ms", c_uint64),
        ("find_timeout_ms", c_uint64),
        ("kv_budget_bytes", c_uint64),
        ("private_helpers", c_uint32),
        ("private_spares", c_uint32),
        ("trusted", POINTER(c_char_p)),
        ("n_trusted", c_size_t),
        ("helper_timeout_ms", c_uint64),
    ]


class _NodeGenerateStats(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("prompt_tokens", c_size_t),
        ("generated_tokens", c_size_t),
        ("prompt_ms", c_double),
        ("generate_ms", c_double),
        ("stop_reason", c_int32),
        ("n_hops", c_size_t),
        ("failovers", c_size_t),
        ("hop_ms", c_double),
        ("bytes_per_token", c_double),
        ("n_helpers", c_size_t),
        ("helpers_dropped", c_size_t),
    ]


class Mode(enum.IntEnum):
    """mesh_mode values: where a generation's layers run."""

    LOCAL = 0
    PIPELINE = 1
    PRIVATE = 2


_TokenCallback = CFUNCTYPE(c_bool, c_void_p, POINTER(c_char), c_size_t)
_EventCallback = CFUNCTYPE(None, c_void_p, POINTER(c_char), c_size_t)
_LogCallback = CFUNCTYPE(c_bool, c_void_p, c_int32, c_char_p, c_char_p)

_status = c_int32
_model_p = c_void_p
_context_p = c_void_p
_node_p = c_void_p

# name: (restype, argtypes)
_SIGNATURES = {
    "mesh_abi_version": (c_uint32, []),
    "mesh_status_str": (c_char_p, [c_int32]),
    "mesh_last_error_message": (_status, [c_void_p, c_size_t, POINTER(c_size_t)]),
    "mesh_model_params_default": (_ModelParams, []),
    "mesh_model_load": (_status, [c_char_p, POINTER(_ModelParams), POINTER(_model_p)]),
    "mesh_model_retain": (_status, [_model_p]),
    "mesh_model_free": (None, [_model_p]),
    "mesh_model_architecture": (_status, [_model_p, c_void_p, c_size_t, POINTER(c_size_t)]),
    "mesh_model_id": (_status, [_model_p, c_void_p, c_size_t, POINTER(c_size_t)]),
    "mesh_model_n_layers": (_status, [_model_p, POINTER(c_size_t)]),
    "mesh_model_n_ctx_train": (_status, [_model_p, POINTER(c_size_t)]),
    "mesh_model_n_vocab": (_status, [_model_p, POINTER(c_size_t)]),
    "mesh_model_n_embd": (_status, [_model_p, POINTER(c_size_t)]),
    "mesh_tokenize": (
        _status,
        [_model_p, c_char_p, c_bool, c_bool, POINTER(c_uint32), c_size_t, POINTER(c_size_t)],
    ),
    "mesh_detokenize": (
        _status,
        [_model_p, POINTER(c_uint32), c_size_t, c_bool, c_void_p, c_size_t, POINTER(c_size_t)],
    ),
    "mesh_chat_apply_template": (
        _status,
        [_model_p, POINTER(_ChatMessage), c_size_t, c_bool, c_void_p, c_size_t, POINTER(c_size_t)],
    ),
    "mesh_context_params_default": (_ContextParams, []),
    "mesh_generate_params_default": (_GenerateParams, []),
    "mesh_context_new": (_status, [_model_p, POINTER(_ContextParams), POINTER(_context_p)]),
    "mesh_context_free": (None, [_context_p]),
    "mesh_context_n_ctx": (_status, [_context_p, POINTER(c_size_t)]),
    "mesh_generate": (
        _status,
        [
            _context_p,
            c_char_p,
            POINTER(_GenerateParams),
            _TokenCallback,
            c_void_p,
            POINTER(_GenerateStats),
        ],
    ),
    "mesh_context_cancel": (_status, [_context_p]),
    "mesh_context_add_lora": (_status, [_context_p, c_char_p, c_float]),
    "mesh_context_clear_lora": (_status, [_context_p]),
    "mesh_context_eval": (_status, [_context_p, POINTER(c_uint32), c_size_t, c_bool]),
    "mesh_context_logits": (_status, [_context_p, POINTER(c_float), c_size_t, POINTER(c_size_t)]),
    "mesh_context_n_past": (_status, [_context_p, POINTER(c_size_t)]),
    "mesh_context_truncate": (_status, [_context_p, c_size_t]),
    "mesh_log_set": (_status, [_LogCallback, c_void_p, c_int32]),
    "mesh_node_params_default": (_NodeParams, []),
    "mesh_node_open": (_status, [POINTER(_NodeParams), POINTER(_node_p)]),
    "mesh_node_free": (None, [_node_p]),
    "mesh_node_peer_id": (_status, [_node_p, c_void_p, c_size_t, POINTER(c_size_t)]),
    "mesh_node_listen_addrs": (_status, [_node_p, c_void_p, c_size_t, POINTER(c_size_t)]),
    "mesh_node_dial": (_status, [_node_p, c_char_p]),
    "mesh_node_serve": (_status, [_node_p, _model_p, c_uint32, c_uint32]),
    "mesh_node_serve_helper": (_status, [_node_p, _model_p]),
    "mesh_node_generate": (
        _status,
        [
            _node_p,
            _model_p,
            c_char_p,
            POINTER(_GenerateParams),
            c_int32,
            _TokenCallback,
            c_void_p,
            POINTER(_NodeGenerateStats),
        ],
    ),
    "mesh_node_cancel": (_status, [_node_p]),
    "mesh_node_set_event_callback": (_status, [_node_p, _EventCallback, c_void_p]),
    "mesh_node_ledger_start": (_status, [_node_p, c_char_p, c_char_p, c_char_p]),
    "mesh_node_ledger_status": (_status, [_node_p, c_char_p, c_size_t, POINTER(c_size_t)]),
    "mesh_node_ledger_adapter": (
        _status,
        [_node_p, _model_p, c_char_p, c_size_t, POINTER(c_size_t)],
    ),
    "mesh_node_ledger_transfer": (_status, [_node_p, c_char_p, c_uint64]),
}

_LIB_NAME = "libmesh_ffi.so"
_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()


def _candidates() -> List[Path]:
    out: List[Path] = []
    env = os.environ.get("MESH_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    out.append(here / _LIB_NAME)
    target_dirs: List[Path] = []
    if os.environ.get("CARGO_TARGET_DIR"):
        target_dirs.append(Path(os.environ["CARGO_TARGET_DIR"]))
    target_dirs.append(Path.home() / ".cache" / "mesh-llm" / "target")
    # bindings/python/mesh_llm -> the repository root, when run from a checkout.
    target_dirs.append(here.parents[2] / "target" if len(here.parents) > 2 else here)
    for t in target_dirs:
        for profile in ("debug", "release"):
            out.append(t / profile / _LIB_NAME)
    return out


def load_library(path: Union[str, os.PathLike, None] = None) -> ctypes.CDLL:
    """Load libmesh_ffi (from `path`, else the search order in the module doc)
    and check its ABI version. Called on first use; returns the loaded library."""
    global _lib
    with _lib_lock:
        if _lib is not None and path is None:
            return _lib
        tried = [Path(path)] if path is not None else _candidates()
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise OSError(
                f"{_LIB_NAME} not found (set MESH_LIB, or run `cargo build -p mesh-ffi`); tried: "
                + ", ".join(str(p) for p in tried)
            )
        lib = ctypes.CDLL(str(found))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        got = lib.mesh_abi_version()
        if got != ABI_VERSION:
            raise OSError(
                f"{found}: C ABI version {got}, but mesh_llm {__version__} was written for {ABI_VERSION}"
            )
        # The ctypes structs above must have the library's layout.
        for fn, struct in (
            (lib.mesh_model_params_default, _ModelParams),
            (lib.mesh_context_params_default, _ContextParams),
            (lib.mesh_generate_params_default, _GenerateParams),
        ):
            if fn().struct_size != ctypes.sizeof(struct):
                raise OSError(f"{found}: {fn.__name__}().struct_size is {fn().struct_size}, "
                              f"the bindings' struct has {ctypes.sizeof(struct)} bytes")
        _lib = lib
        return lib


def _L() -> ctypes.CDLL:
    return _lib if _lib is not None else load_library()


def abi_version() -> int:
    """mesh_abi_version() of the loaded library."""
    return int(_L().mesh_abi_version())


# --- errors ------------------------------------------------------------------


class MeshError(Exception):
    """A mesh function failed. `status` is the mesh_status (a Status when
    known, else an int), `status_name` its name, `message` the library's message."""

    def __init__(self, status: int, message: str, what: str = ""):
        self.status = Status(status) if status in Status._value2member_map_ else status
        self.status_name = _L().mesh_status_str(status).decode()
        self.message = message
        self.what = what
        prefix = f"{what}: " if what else ""
        super().__init__(f"{prefix}{self.status_name}: {message}")


class Cancelled(MeshError):
    """Context.cancel() stopped a generation. `text` holds what was generated
    until then."""

    text: str = ""


def _last_error() -> str:
    lib = _L()
    buf = ctypes.create_string_buffer(1024)
    n = c_size_t(0)
    st = lib.mesh_last_error_message(buf, len(buf), byref(n))
    if st == Status.BUFFER_TOO_SMALL:
        buf = ctypes.create_string_buffer(n.value)
        lib.mesh_last_error_message(buf, len(buf), byref(n))
    return buf.value.decode("utf-8", errors="replace")


def _check(status: int, what: str = "") -> None:
    if status != Status.OK:
        # mesh_last_error_message is per thread: read it right away, here.
        msg = _last_error()
        cls = Cancelled if status == Status.CANCELLED else MeshError
        raise cls(status, msg, what)


def _buffer_call(fn, args: tuple, what: str, first_cap: int = 256) -> bytes:
    """Call a buffer function (…, char *buf, size_t cap, size_t *n_out),
    growing the buffer once if needed; returns the bytes without the NUL."""
    cap = first_cap
    for _ in range(3):
        buf = ctypes.create_string_buffer(cap)
        n = c_size_t(0)
        st = fn(*args, buf, cap, byref(n))
        if st == Status.BUFFER_TOO_SMALL and n.value > cap:
            cap = n.value
            continue
        _check(st, what)
        return buf.raw[: n.value]
    raise MeshError(Status.BUFFER_TOO_SMALL, "buffer size kept changing", what)


def _utf8(s: str, what: str) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, not {type(s).__name__}")
    return s.encode("utf-8")


# --- model -------------------------------------------------------------------


class Model:
    """A loaded GGUF model (mesh_model). Use as a context manager or call free().

    `path`: a .gguf file, or "default" (SmolLM2-135M-Instruct, fetched once
    into the user's cache). `n_threads`: default compute threads for contexts
    (0 or None = all cores).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike] = "default",
        n_threads: Optional[int] = None,
        exact: bool = False,
    ):
        lib = _L()
        self._ptr: Optional[int] = None
        params = lib.mesh_model_params_default()
        if n_threads is not None:
            params.n_threads = n_threads
        # Exact accumulation: CPU-independent results, what private mode computes.
        params.exact_accumulation = exact
        out = _model_p()
        path_s = os.fspath(path)
        _check(lib.mesh_model_load(_utf8(path_s, "path"), byref(params), byref(out)),
               f"loading model {path_s!r}")
        self._ptr = out.value
        self.path = path_s

    @classmethod
    def load(cls, path: Union[str, os.PathLike] = "default", n_threads: Optional[int] = None) -> "Model":
        """Same as Model(path, n_threads)."""
        return cls(path, n_threads)

    def _handle(self) -> int:
        if self._ptr is None:
            raise ValueError("model has been freed")
        return self._ptr

    def free(self) -> None:
        """Release this model reference (contexts keep their own). Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None and _lib is not None:
            _lib.mesh_model_free(ptr)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass

    def _size(self, fn_name: str) -> int:
        out = c_size_t(0)
        _check(getattr(_L(), fn_name)(self._handle(), byref(out)), fn_name)
        return out.value

    @property
    def arch(self) -> str:
        """general.architecture, e.g. "llama"."""
        return _buffer_call(_L().mesh_model_architecture, (self._handle(),), "architecture").decode()

    @property
    def id(self) -> str:
        """BLAKE3 hash of the GGUF file, 64 hex digits."""
        return _buffer_call(_L().mesh_model_id, (self._handle(),), "model id", 65).decode()

    @property
    def n_layers(self) -> int:
        return self._size("mesh_model_n_layers")

    @property
    def n_ctx_train(self) -> int:
        return self._size("mesh_model_n_ctx_train")

    @property
    def n_vocab(self) -> int:
        return self._size("mesh_model_n_vocab")

    @property
    def n_embd(self) -> int:
        return self._size("mesh_model_n_embd")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> List[int]:
        """Token ids of `text` (BOS added if the model wants one and add_special)."""
        lib = _L()
        data = _utf8(text, "text")
        cap = len(data) + 8
        for _ in range(3):
            buf = (c_uint32 * cap)()
            n = c_size_t(0)
            st = lib.mesh_tokenize(self._handle(), data, add_special, parse_special, buf, cap, byref(n))
            if st == Status.BUFFER_TOO_SMALL and n.value > cap:
                cap = n.value
                continue
            _check(st, "tokenize")
            return list(buf[: n.value])
        raise MeshError(Status.BUFFER_TOO_SMALL, "buffer size kept changing", "tokenize")

    def detokenize_bytes(self, ids: Sequence[int], special: bool = False) -> bytes:
        """The bytes of `ids` (may end inside a UTF-8 character)."""
        arr = (c_uint32 * len(ids))(*ids)
        return _buffer_call(
            _L().mesh_detokenize, (self._handle(), arr, len(ids), special), "detokenize",
            max(16, 8 * len(ids)),
        )

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """The text of `ids` (invalid UTF-8 replaced by U+FFFD)."""
        return self.detokenize_bytes(ids, special).decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        messages: Iterable[Union[Tuple[str, str], dict]],
        add_generation_prompt: bool = True,
    ) -> str:
        """Render a conversation with the model's chat template. `messages`:
        (role, content) pairs or {"role": ..., "content": ...} dicts."""
        pairs = []
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
            pairs.append((_utf8(role, "role"), _utf8(content, "content")))
        arr = (_ChatMessage * len(pairs))(*[_ChatMessage(r, c) for r, c in pairs])
        size = 256 + sum(len(r) + len(c) for r, c in pairs) * 2
        return _buffer_call(
            _L().mesh_chat_apply_template,
            (self._handle(), arr, len(pairs), add_generation_prompt),
            "chat template",
            size,
        ).decode("utf-8", errors="replace")

    def context(self, n_ctx: Optional[int] = None, n_threads: Optional[int] = None) -> "Context":
        """A new generation Context over this model."""
        return Context(self, n_ctx=n_ctx, n_threads=n_threads)

    def __repr__(self) -> str:
        state = "freed" if self._ptr is None else f"{self.arch}, {self.n_layers} layers"
        return f"<mesh_llm.Model {self.path!r} ({state})>"


def _prepare_generate(
    prompt: str, on_piece, *, chat: bool, raw: bool, ignore_eos: bool, format: Union[None, str, dict], **sampler
):
    """The pieces every generate call needs: params (None = library default),
    the prompt bytes, the list pieces are collected into, the list an
    exception raised by on_piece lands in, and the C callback."""
    lib = _L()
    params = lib.mesh_generate_params_default()
    params.chat = chat
    params.raw = raw
    params.ignore_eos = ignore_eos
    if isinstance(format, dict):
        format = json.dumps(format)  # a JSON schema
    if format is not None:
        params.format = _utf8(format, "format")  # the struct keeps the bytes alive
    for name, value in sampler.items():
        if value is not None:
            setattr(params, name, value)
    data = _utf8(prompt, "prompt")
    pieces: List[str] = []
    error: List[BaseException] = []

    def trampoline(_userdata, piece, length):
        try:
            text = ctypes.string_at(piece, length).decode("utf-8", errors="replace")
            pieces.append(text)
            if on_piece is None:
                return True
            return on_piece(text) is not False
        except BaseException as e:  # never unwind into the library
            error.append(e)
            return False

    return params, data, pieces, error, _TokenCallback(trampoline)


def _run_generate(owner, call) -> int:
    """Run call(handle) while `owner` (a Context or Node) counts it as active,
    so free() refuses to run under it."""
    with owner._lock:
        handle = owner._handle()
        owner._active += 1
    try:
        return call(handle)
    finally:
        with owner._lock:
            owner._active -= 1


def _finish_generate(status: int, pieces: List[str], error: List[BaseException]) -> str:
    """The generated text, or the exception on_piece raised, or the status as
    an exception (Cancelled carries the partial text)."""
    if error:
        raise error[0]
    text = "".join(pieces)
    try:
        _check(status, "generate")
    except Cancelled as e:
        e.text = text
        raise
    return text


def _base_stats(stats) -> dict:
    reason = stats.stop_reason
    return dict(
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=stats.generated_tokens,
        prompt_ms=stats.prompt_ms,
        generate_ms=stats.generate_ms,
        stop_reason=StopReason(reason) if reason in StopReason._value2member_map_ else reason,
    )


# --- context -----------------------------------------------------------------


@dataclass
class GenerateStats:
    prompt_tokens: int
    generated_tokens: int
    prompt_ms: float
    generate_ms: float
    stop_reason: Union[StopReason, int]


@dataclass
class Generation:
    """What Context.generate returns."""

    text: str
    stats: GenerateStats

    def __str__(self) -> str:
        return self.text


class Context:
    """A KV cache over a model (mesh_context). Each generate() starts from an
    empty cache. Use as a context manager or call free()."""

    def __init__(self, model: Model, n_ctx: Optional[int] = None, n_threads: Optional[int] = None):
        lib = _L()
        self._ptr: Optional[int] = None
        self._lock = threading.Lock()
        self._active = 0
        params = lib.mesh_context_params_default()
        if n_ctx is not None:
            params.n_ctx = n_ctx
        if n_threads is not None:
            params.n_threads = n_threads
        out = _context_p()
        _check(lib.mesh_context_new(model._handle(), byref(params), byref(out)), "creating context")
        self._ptr = out.value
        self.model = model

    @property
    def n_ctx(self) -> int:
        out = c_size_t(0)
        _check(_L().mesh_context_n_ctx(self._handle(), byref(out)), "n_ctx")
        return out.value

    def _handle(self) -> int:
        if self._ptr is None:
            raise ValueError("context has been freed")
        return self._ptr

    def free(self) -> None:
        """Free the context. Idempotent; raises RuntimeError while generating."""
        with self._lock:
            if self._active:
                raise RuntimeError("cannot free a context while it is generating")
            ptr, self._ptr = self._ptr, None
        if ptr is not None and _lib is not None:
            _lib.mesh_context_free(ptr)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass

    def add_lora(self, path: str, scale: float = 1.0) -> None:
        """Apply a LoRA adapter (llama.cpp GGUF format) at `scale` in every later
        generate(), after those added before. A file that is not an adapter of
        this model raises MeshError (Status.GGUF; Status.IO if missing)."""
        _check(_L().mesh_context_add_lora(self._handle(), path.encode(), scale), "add_lora")

    def clear_lora(self) -> None:
        """Stop applying LoRA adapters (the base model again)."""
        _check(_L().mesh_context_clear_lora(self._handle()), "clear_lora")

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        """Evaluate token ids at the end of the KV cache (positions n_past..),
        for a sampling loop of your own: read logits(), pick a token, eval([t]).
        Keeps the last token's logits, or every token's with all_logits. All or
        nothing: on error (MeshError: Status.INVALID_ARG for an id outside the
        vocabulary, Status.CONTEXT_OVERFLOW past n_ctx; Cancelled) the cache
        is unchanged. generate() starts over from an empty cache."""
        ids = (c_uint32 * len(tokens))(*tokens)
        status = _run_generate(
            self, lambda h: _L().mesh_context_eval(h, ids, len(tokens), all_logits)
        )
        _check(status, "eval")

    def logits(self) -> List[float]:
        """The logits kept by the last eval(): n_vocab floats, or
        n_tokens * n_vocab (row by row) after eval(..., all_logits=True);
        empty before any eval, after generate() or a truncate() that forgot
        positions."""
        lib, h = _L(), self._handle()
        need = c_size_t(0)
        status = lib.mesh_context_logits(h, None, 0, byref(need))
        if status == Status.OK:
            return []
        if status != Status.BUFFER_TOO_SMALL:
            _check(status, "logits")
        buf = (c_float * need.value)()
        _check(lib.mesh_context_logits(h, buf, need.value, byref(need)), "logits")
        return list(buf[: need.value])

    @property
    def n_past(self) -> int:
        """Positions the KV cache holds (tokens evaluated, not truncated)."""
        out = c_size_t(0)
        _check(_L().mesh_context_n_past(self._handle(), byref(out)), "n_past")
        return out.value

    def truncate(self, n_past: int) -> None:
        """Forget every position from n_past on (n_past >= the current
        length changes nothing)."""
        _check(_L().mesh_context_truncate(self._handle(), n_past), "truncate")

    def cancel(self) -> None:
        """Stop the running generate() (it raises Cancelled). Any thread, also
        from on_piece; does nothing when no generation runs."""
        ptr = self._ptr
        if ptr is not None:
            _check(_L().mesh_context_cancel(ptr), "cancel")

    def generate(
        self,
        prompt: str,
        chat: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        seed: Optional[int] = None,
        on_piece: Optional[Callable[[str], Optional[bool]]] = None,
        *,
        raw: bool = False,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        repeat_last_n: Optional[int] = None,
        ignore_eos: bool = False,
        format: Union[None, str, dict] = None,
    ) -> Generation:
        """Generate text after `prompt`; None = the library's default.

        chat: render the prompt as one user message with the chat template.
        raw: (chat False) parse special-token text in the prompt.
        format: None or "text" (anything), "json": one JSON object (ends
        when it closes; max_tokens may cut it short), or a JSON schema (a
        dict, or its JSON text): one object the schema accepts (structured
        output; a keyword the library does not enforce raises INVALID_ARG).
        temperature <= 0: greedy. on_piece(piece) is called with each piece
        of text as it is produced; returning False stops generation
        (stop_reason CALLBACK); returning None or True goes on. An exception
        raised in on_piece stops generation and is re-raised here.
        Raises Cancelled (with .text) when cancel() stopped it.
        """
        params, data, pieces, error, cb = _prepare_generate(
            prompt,
            on_piece,
            chat=chat,
            raw=raw,
            ignore_eos=ignore_eos,
            format=format,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
        )
        stats = _GenerateStats()
        stats.struct_size = ctypes.sizeof(_GenerateStats)
        st = _run_generate(
            self, lambda h: _L().mesh_generate(h, data, byref(params), cb, None, byref(stats))
        )
        text = _finish_generate(st, pieces, error)
        return Generation(text=text, stats=GenerateStats(**_base_stats(stats)))


# --- node --------------------------------------------------------------------


@dataclass
class NodeGenerateStats(GenerateStats):
    n_hops: int
    failovers: int
    hop_ms: float
    bytes_per_token: float
    n_helpers: int
    helpers_dropped: int


class Node:
    """A mesh node (mesh_node): joins the mesh over libp2p, serves layer
    ranges of models to peers, and generates locally or across the mesh.
    Use as a context manager or call free() (which shuts it down).

    listen / bootstrap: multiaddrs ("/ip4/127.0.0.1/tcp/0";
    "/ip4/.../tcp/4001/p2p/12D3KooW..."). identity_path: a key file kept
    across runs (None: a new identity). Timeouts in seconds (None: library
    defaults, 30 s per stage request and 10 s to find providers).
    on_event(dict) receives the node's events (peers, sessions, plans,
    failovers) on a node thread; keep it quick. Private mode
    (Mode.PRIVATE): private_helpers peers hold shares (default 2),
    private_spares more in reserve; trusted peer ids are exempt from the
    one-helper-per-network rule; helper_timeout in seconds.
    """

    def __init__(
        self,
        listen: Sequence[str] = (),
        bootstrap: Sequence[str] = (),
        identity_path: Optional[str] = None,
        mdns: bool = False,
        stage_timeout: Optional[float] = None,
        find_timeout: Optional[float] = None,
        kv_budget_bytes: Optional[int] = None,
        on_event: Optional[Callable[[dict], None]] = None,
        private_helpers: int = 2,
        private_spares: int = 0,
        trusted: Sequence[str] = (),
        helper_timeout: Optional[float] = None,
    ):
        lib = _L()
        self._ptr: Optional[int] = None
        self._lock = threading.Lock()
        self._active = 0
        params = lib.mesh_node_params_default()
        listen_b = [_utf8(a, "listen") for a in listen]
        boot_b = [_utf8(a, "bootstrap") for a in bootstrap]
        listen_arr = (c_char_p * max(1, len(listen_b)))(*listen_b)
        boot_arr = (c_char_p * max(1, len(boot_b)))(*boot_b)
        params.listen = ctypes.cast(listen_arr, POINTER(c_char_p))
        params.n_listen = len(listen_b)
        params.bootstrap = ctypes.cast(boot_arr, POINTER(c_char_p))
        params.n_bootstrap = len(boot_b)
        if identity_path is not None:
            params.identity_path = _utf8(os.fspath(identity_path), "identity_path")
        params.mdns = mdns
        if stage_timeout is not None:
            params.stage_timeout_ms = max(1, int(stage_timeout * 1000))
        if find_timeout is not None:
            params.find_timeout_ms = max(1, int(find_timeout * 1000))
        if kv_budget_bytes is not None:
            params.kv_budget_bytes = kv_budget_bytes
        params.private_helpers = private_helpers
        params.private_spares = private_spares
        trusted_b = [_utf8(t, "trusted") for t in trusted]
        trusted_arr = (c_char_p * max(1, len(trusted_b)))(*trusted_b)
        params.trusted = ctypes.cast(trusted_arr, POINTER(c_char_p))
        params.n_trusted = len(trusted_b)
        if helper_timeout is not None:
            params.helper_timeout_ms = max(1, int(helper_timeout * 1000))
        out = _node_p()
        _check(lib.mesh_node_open(byref(params), byref(out)), "opening node")
        self._ptr = out.value
        self._event_cb = None
        if on_event is not None:

            def deliver(_userdata, data, length):
                try:
                    on_event(json.loads(ctypes.string_at(data, length).decode("utf-8")))
                except BaseException:  # never unwind into the library
                    pass

            self._event_cb = _EventCallback(deliver)
            _check(lib.mesh_node_set_event_callback(self._ptr, self._event_cb, None), "events")

    def _handle(self) -> int:
        if self._ptr is None:
            raise ValueError("node has been freed")
        return self._ptr

    @property
    def peer_id(self) -> str:
        return _buffer_call(_L().mesh_node_peer_id, (self._handle(),), "peer_id", 64).decode()

    @property
    def listen_addrs(self) -> List[str]:
        """Listen addresses with /p2p/<peer id>, ready to bootstrap from."""
        raw = _buffer_call(_L().mesh_node_listen_addrs, (self._handle(),), "listen_addrs", 512)
        return [a for a in raw.decode().split("\n") if a]

    def dial(self, addr: str) -> None:
        _check(_L().mesh_node_dial(self._handle(), _utf8(addr, "addr")), "dial")

    def ledger_start(
        self, genesis: str, store: Optional[str] = None, updates: Optional[str] = None
    ) -> None:
        """Run the ledger of the genesis file on this node (a validator if the
        node's identity has stake in it); blocks in store (None: the cache),
        adapters in updates (None: the cache)."""
        _check(
            _L().mesh_node_ledger_start(
                self._handle(),
                _utf8(genesis, "genesis"),
                None if store is None else _utf8(store, "store"),
                None if updates is None else _utf8(updates, "updates"),
            ),
            "ledger_start",
        )

    def ledger_status(self) -> dict:
        """height, tip, round, validator, peers_height, synced, active
        (model id -> adapter id), stakes (peer id -> stake of the next height)."""
        raw = _buffer_call(_L().mesh_node_ledger_status, (self._handle(),), "ledger_status", 512)
        return json.loads(raw.decode())

    def ledger_transfer(self, to: str, amount: int) -> None:
        """Give amount of this node's stake to the peer id to (signed with the
        node's identity; effective the height after a block carries it)."""
        if not 0 < amount < 2**64:
            raise ValueError("amount must be a positive 64-bit integer")
        _check(
            _L().mesh_node_ledger_transfer(self._handle(), _utf8(to, "to"), amount),
            "ledger_transfer",
        )

    def ledger_adapter(self, model: "Model") -> Optional[str]:
        """Path of the adapter the ledger makes active for model (fetched and
        checked), for Context.add_lora; None if it names none."""
        raw = _buffer_call(
            _L().mesh_node_ledger_adapter,
            (self._handle(), model._handle()),
            "ledger_adapter",
            512,
        )
        return raw.decode() or None

    def serve(self, model: "Model", layers: Optional[tuple] = None) -> None:
        """Serve layers (start, end) of model (end exclusive; None: all) to peers."""
        start, end = layers if layers is not None else (0, 0)
        _check(_L().mesh_node_serve(self._handle(), model._handle(), start, end), "serve")

    def serve_helper(self, model: "Model") -> None:
        """Also answer private-mode requests for model (serving it whole if it
        is not served yet): owners send sealed secret shares, get products."""
        _check(_L().mesh_node_serve_helper(self._handle(), model._handle()), "serve_helper")

    def cancel(self) -> None:
        """Stop every generate() running on this node (each raises Cancelled)."""
        ptr = self._ptr
        if ptr is not None:
            _check(_L().mesh_node_cancel(ptr), "cancel")

    def generate(
        self,
        model: "Model",
        prompt: str,
        mode: Mode = Mode.LOCAL,
        chat: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        seed: Optional[int] = None,
        on_piece: Optional[Callable[[str], Optional[bool]]] = None,
        *,
        raw: bool = False,
        ignore_eos: bool = False,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        repeat_last_n: Optional[int] = None,
        format: Union[None, str, dict] = None,
    ) -> Generation:
        """As Context.generate, in `mode` (Mode.PIPELINE: across the mesh).
        stats also has n_hops, failovers, hop_ms, bytes_per_token, n_helpers
        and helpers_dropped."""
        params, data, pieces, error, cb = _prepare_generate(
            prompt,
            on_piece,
            chat=chat,
            raw=raw,
            ignore_eos=ignore_eos,
            format=format,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
        )
        stats = _NodeGenerateStats()
        stats.struct_size = ctypes.sizeof(_NodeGenerateStats)
        st = _run_generate(
            self,
            lambda h: _L().mesh_node_generate(
                h, model._handle(), data, byref(params), int(mode), cb, None, byref(stats)
            ),
        )
        text = _finish_generate(st, pieces, error)
        return Generation(
            text=text,
            stats=NodeGenerateStats(
                **_base_stats(stats),
                n_hops=stats.n_hops,
                failovers=stats.failovers,
                hop_ms=stats.hop_ms,
                bytes_per_token=stats.bytes_per_token,
                n_helpers=stats.n_helpers,
                helpers_dropped=stats.helpers_dropped,
            ),
        )

    def free(self) -> None:
        """Shut the node down and free it. Idempotent; raises RuntimeError
        while a generate() runs."""
        with self._lock:
            if self._active:
                raise RuntimeError("cannot free a node while it is generating")
            ptr, self._ptr = self._ptr, None
        if ptr is not None and _lib is not None:
            _lib.mesh_node_free(ptr)

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


# --- logging -----------------------------------------------------------------

_log_cb_ref = None


def set_log_callback(
    callback: Optional[Callable[[LogLevel, str, str], Optional[bool]]],
    level: int = LogLevel.INFO,
) -> None:
    """Send mesh's log messages of `level` and more severe to
    callback(level, target, message); None turns logging off. The callback
    may run on any thread and must not call set_log_callback; returning False
    turns logging off."""
    global _log_cb_ref
    lib = _L()
    if callback is None or level == LogLevel.OFF:
        _check(lib.mesh_log_set(_LogCallback(), None, LogLevel.OFF), "mesh_log_set")
        _log_cb_ref = None
        return

    def trampoline(_userdata, lvl, target, message):
        try:
            lv = LogLevel(lvl) if lvl in LogLevel._value2member_map_ else lvl
            return callback(lv, target.decode("utf-8", "replace"), message.decode("utf-8", "replace")) is not False
        except BaseException:
            return True

    new_ref = _LogCallback(trampoline)
    _check(lib.mesh_log_set(new_ref, None, int(level)), "mesh_log_set")
    # The previous callback is no longer called once mesh_log_set returned.
    _log_cb_ref = new_ref
