// Kotlin/JVM bindings for the mesh-llm C API (include/mesh.h), over JNA.
//
//     Model.load("default", nThreads = 1).use { model ->
//         model.newContext(nThreads = 1).use { ctx ->
//             val out = ctx.generate("Hello", chat = true, maxTokens = 32) { piece ->
//                 print(piece); true
//             }
//             println("\n${out.generatedTokens} tokens, ${out.stopReason}")
//         }
//     }
//
// A node on the mesh (pipeline and private generation across peers, the ledger):
//
//     Node(listen = listOf("/ip4/0.0.0.0/tcp/4001")).use { node ->
//         node.serve(model)                       // announce and answer stage requests
//         val out = node.generate(model, "Hello", Mode.PIPELINE, maxTokens = 32)
//     }
//
// The library libmesh_ffi.so is taken from $MESH_LIB (a file path), else from
// $CARGO_TARGET_DIR/debug or ~/.cache/mesh-llm/target/debug, else looked up by
// JNA as "mesh_ffi" (jna.library.path, LD_LIBRARY_PATH).
//
// Threads: a Model may be used from any thread. A Context runs one generate
// at a time; cancel() may be called from any thread, or from the callback.
// A Node runs any number of generates at once, from any threads.
package meshllm

import com.sun.jna.Callback
import com.sun.jna.IntegerType
import com.sun.jna.Library
import com.sun.jna.Memory
import com.sun.jna.Native
import com.sun.jna.Pointer
import com.sun.jna.Structure
import com.sun.jna.ptr.ByReference
import com.sun.jna.ptr.PointerByReference
import java.io.Closeable
import java.io.File

/** The MESH_ABI_VERSION of the include/mesh.h these bindings were written for. */
const val MESH_ABI_VERSION = 1

/** C `size_t`. */
class SizeT(value: Long = 0) : IntegerType(Native.SIZE_T_SIZE, value, true) {
    override fun toByte(): Byte = toLong().toByte()
    override fun toChar(): Char = toLong().toChar()
    override fun toShort(): Short = toLong().toShort()
}

/** C `size_t *` out-parameter. */
class SizeTByReference : ByReference(Native.SIZE_T_SIZE) {
    val value: Long
        get() = if (Native.SIZE_T_SIZE == 8) pointer.getLong(0) else pointer.getInt(0).toLong() and 0xffffffffL
}

// --- C structs, field for field as in include/mesh.h (C bool = Byte) ---------

@Structure.FieldOrder("struct_size", "n_threads", "exact_accumulation")
open class MeshModelParams : Structure() {
    @JvmField var struct_size = SizeT()
    @JvmField var n_threads = SizeT()
    @JvmField var exact_accumulation: Byte = 0
    class ByValue : MeshModelParams(), Structure.ByValue
}

@Structure.FieldOrder("role", "content")
open class MeshChatMessage : Structure() {
    @JvmField var role: Pointer? = null
    @JvmField var content: Pointer? = null
}

@Structure.FieldOrder("struct_size", "n_ctx", "n_threads")
open class MeshContextParams : Structure() {
    @JvmField var struct_size = SizeT()
    @JvmField var n_ctx = SizeT()
    @JvmField var n_threads = SizeT()
    class ByValue : MeshContextParams(), Structure.ByValue
}

@Structure.FieldOrder(
    "struct_size", "max_tokens", "temperature", "top_k", "top_p", "min_p",
    "repeat_penalty", "repeat_last_n", "seed", "ignore_eos", "chat", "raw", "format"
)
open class MeshGenerateParams : Structure() {
    @JvmField var struct_size = SizeT()
    @JvmField var max_tokens = SizeT()
    @JvmField var temperature: Float = 0f
    @JvmField var top_k = SizeT()
    @JvmField var top_p: Float = 0f
    @JvmField var min_p: Float = 0f
    @JvmField var repeat_penalty: Float = 0f
    @JvmField var repeat_last_n = SizeT()
    @JvmField var seed: Long = 0
    @JvmField var ignore_eos: Byte = 0
    @JvmField var chat: Byte = 0
    @JvmField var raw: Byte = 0
    @JvmField var format: Pointer? = null
    class ByValue : MeshGenerateParams(), Structure.ByValue
}

@Structure.FieldOrder("struct_size", "prompt_tokens", "generated_tokens", "prompt_ms", "generate_ms", "stop_reason")
open class MeshGenerateStats : Structure() {
    @JvmField var struct_size = SizeT()
    @JvmField var prompt_tokens = SizeT()
    @JvmField var generated_tokens = SizeT()
    @JvmField var prompt_ms: Double = 0.0
    @JvmField var generate_ms: Double = 0.0
    @JvmField var stop_reason: Int = 0
}

@Structure.FieldOrder(
    "struct_size", "listen", "n_listen", "bootstrap", "n_bootstrap", "identity_path", "mdns",
    "stage_timeout_ms", "find_timeout_ms", "kv_budget_bytes", "private_helpers", "private_spares",
    "trusted", "n_trusted", "helper_timeout_ms"
)
open class MeshNodeParams : Structure() {
    @JvmField var struct_size = SizeT()
    @JvmField var listen: Pointer? = null
    @JvmField var n_listen = SizeT()
    @JvmField var bootstrap: Pointer? = null
    @JvmField var n_bootstrap = SizeT()
    @JvmField var identity_path: Pointer? = null
    @JvmField var mdns: Byte = 0
    @JvmField var stage_timeout_ms: Long = 0
    @JvmField var find_timeout_ms: Long = 0
    @JvmField var kv_budget_bytes: Long = 0
    @JvmField var private_helpers: Int = 0
    @JvmField var private_spares: Int = 0
    @JvmField var trusted: Pointer? = null
    @JvmField var n_trusted = SizeT()
    @JvmField var helper_timeout_ms: Long = 0
    class ByValue : MeshNodeParams(), Structure.ByValue
}

@Structure.FieldOrder(
    "struct_size", "prompt_tokens", "generated_tokens", "prompt_ms", "generate_ms", "stop_reason",
    "n_hops", "failovers", "hop_ms", "bytes_per_token", "n_helpers", "helpers_dropped"
)
open class MeshNodeGenerateStats : Structure() {
    @JvmField var struct_size = SizeT()
    @JvmField var prompt_tokens = SizeT()
    @JvmField var generated_tokens = SizeT()
    @JvmField var prompt_ms: Double = 0.0
    @JvmField var generate_ms: Double = 0.0
    @JvmField var stop_reason: Int = 0
    @JvmField var n_hops = SizeT()
    @JvmField var failovers = SizeT()
    @JvmField var hop_ms: Double = 0.0
    @JvmField var bytes_per_token: Double = 0.0
    @JvmField var n_helpers = SizeT()
    @JvmField var helpers_dropped = SizeT()
}

/** `mesh_node_event_callback`. */
interface MeshNodeEventCallback : Callback {
    fun invoke(userdata: Pointer?, json: Pointer?, len: SizeT)
}

/** `mesh_token_callback`. */
interface MeshTokenCallback : Callback {
    fun invoke(userdata: Pointer?, piece: Pointer?, len: SizeT): Byte
}

/** The raw C functions. Strings are passed as NUL-terminated UTF-8 [Memory]. */
@Suppress("FunctionName")
interface MeshLib : Library {
    fun mesh_abi_version(): Int
    fun mesh_status_str(status: Int): String
    fun mesh_last_error_message(buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_model_params_default(): MeshModelParams.ByValue
    fun mesh_model_load(path: Pointer, params: MeshModelParams?, out: PointerByReference): Int
    fun mesh_model_retain(model: Pointer): Int
    fun mesh_model_free(model: Pointer?)
    fun mesh_model_architecture(model: Pointer, buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_model_id(model: Pointer, buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_model_n_layers(model: Pointer, out: SizeTByReference): Int
    fun mesh_model_n_ctx_train(model: Pointer, out: SizeTByReference): Int
    fun mesh_model_n_vocab(model: Pointer, out: SizeTByReference): Int
    fun mesh_model_n_embd(model: Pointer, out: SizeTByReference): Int
    fun mesh_tokenize(
        model: Pointer, text: Pointer, addSpecial: Byte, parseSpecial: Byte,
        buf: Pointer?, cap: SizeT, nOut: SizeTByReference
    ): Int
    fun mesh_detokenize(
        model: Pointer, ids: Pointer?, nIds: SizeT, special: Byte,
        buf: Pointer?, cap: SizeT, nOut: SizeTByReference
    ): Int
    fun mesh_chat_apply_template(
        model: Pointer, messages: Pointer?, nMessages: SizeT, addGenerationPrompt: Byte,
        buf: Pointer?, cap: SizeT, nOut: SizeTByReference
    ): Int
    fun mesh_context_params_default(): MeshContextParams.ByValue
    fun mesh_generate_params_default(): MeshGenerateParams.ByValue
    fun mesh_context_new(model: Pointer, params: Pointer?, out: PointerByReference): Int
    fun mesh_context_free(ctx: Pointer?)
    fun mesh_context_n_ctx(ctx: Pointer, out: SizeTByReference): Int
    fun mesh_generate(
        ctx: Pointer, prompt: Pointer, params: Pointer?, cb: MeshTokenCallback?,
        userdata: Pointer?, stats: Pointer?
    ): Int
    fun mesh_context_cancel(ctx: Pointer): Int
    fun mesh_context_add_lora(ctx: Pointer, path: Pointer, scale: Float): Int
    fun mesh_context_clear_lora(ctx: Pointer): Int
    fun mesh_context_eval(ctx: Pointer, tokens: Pointer?, nTokens: SizeT, allLogits: Byte): Int
    fun mesh_context_logits(ctx: Pointer, buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_context_n_past(ctx: Pointer, out: SizeTByReference): Int
    fun mesh_context_truncate(ctx: Pointer, nPast: SizeT): Int
    fun mesh_node_params_default(): MeshNodeParams.ByValue
    fun mesh_node_open(params: Pointer?, out: PointerByReference): Int
    fun mesh_node_free(node: Pointer?)
    fun mesh_node_peer_id(node: Pointer, buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_node_listen_addrs(node: Pointer, buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_node_dial(node: Pointer, addr: Pointer): Int
    fun mesh_node_serve(node: Pointer, model: Pointer, layerStart: Int, layerEnd: Int): Int
    fun mesh_node_serve_helper(node: Pointer, model: Pointer): Int
    fun mesh_node_generate(
        node: Pointer, model: Pointer, prompt: Pointer, params: Pointer?, mode: Int,
        cb: MeshTokenCallback?, userdata: Pointer?, stats: Pointer?
    ): Int
    fun mesh_node_cancel(node: Pointer): Int
    fun mesh_node_set_event_callback(node: Pointer, cb: MeshNodeEventCallback?, userdata: Pointer?): Int
    fun mesh_node_ledger_start(node: Pointer, genesisPath: Pointer, storePath: Pointer?, updatesDir: Pointer?): Int
    fun mesh_node_ledger_status(node: Pointer, buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_node_ledger_adapter(node: Pointer, model: Pointer, buf: Pointer?, cap: SizeT, nOut: SizeTByReference): Int
    fun mesh_node_ledger_transfer(node: Pointer, to: Pointer, amount: Long): Int
}

/** Status codes (mesh_status); unknown values may appear. */
object MeshStatus {
    const val OK = 0
    const val BUFFER_TOO_SMALL = 5
    const val INVALID_ARG = 6
    const val BUSY = 7
    const val IO = 8
    const val GGUF = 9
    const val CONTEXT_OVERFLOW = 13
    const val UNSUPPORTED = 10
    const val CANCELLED = 16
    const val NETWORK = 20
    const val INVALID_HANDLE = 21
}

enum class StopReason { END_OF_GENERATION, MAX_TOKENS, CALLBACK, UNKNOWN }

/** Where a [Node.generate] runs its layers (mesh_mode). */
enum class Mode(val code: Int) {
    /** All on this node. */
    LOCAL(0),
    /** The layers on the peers that serve them (and this node's own served layers). */
    PIPELINE(1),
    /** The linear layers on secret shares held by helper peers; the rest here. */
    PRIVATE(2)
}

/** A mesh function failed: [status] is the mesh_status, [statusName] its name. */
open class MeshException(val status: Int, val statusName: String, val detail: String, what: String) :
    RuntimeException((if (what == "") "" else "$what: ") + "$statusName: $detail")

/** [Context.cancel] stopped a generation; [text] is what was generated until then. */
class CancelledException(status: Int, statusName: String, detail: String, what: String, val text: String) :
    MeshException(status, statusName, detail, what)

/** Loads libmesh_ffi once and checks its ABI version. */
object Mesh {
    val lib: MeshLib by lazy { load() }

    private fun load(): MeshLib {
        val env = System.getenv("MESH_LIB")
        val candidates = mutableListOf<File>()
        if (!env.isNullOrEmpty()) candidates.add(File(env))
        System.getenv("CARGO_TARGET_DIR")?.let { candidates.add(File(it, "debug/libmesh_ffi.so")) }
        candidates.add(File(System.getProperty("user.home"), ".cache/mesh-llm/target/debug/libmesh_ffi.so"))
        val found = candidates.firstOrNull { it.isFile }
        if (!env.isNullOrEmpty() && found?.path != env) throw UnsatisfiedLinkError("MESH_LIB=$env: no such file")
        val lib = Native.load(found?.absolutePath ?: "mesh_ffi", MeshLib::class.java)
        val abi = lib.mesh_abi_version()
        if (abi != MESH_ABI_VERSION) {
            throw UnsatisfiedLinkError("libmesh_ffi has C ABI version $abi, these bindings were written for $MESH_ABI_VERSION")
        }
        // The structs above must have the library's layout.
        check(lib.mesh_model_params_default().struct_size.toLong() == MeshModelParams().size().toLong()) { "mesh_model_params layout" }
        check(lib.mesh_context_params_default().struct_size.toLong() == MeshContextParams().size().toLong()) { "mesh_context_params layout" }
        check(lib.mesh_generate_params_default().struct_size.toLong() == MeshGenerateParams().size().toLong()) { "mesh_generate_params layout" }
        check(lib.mesh_node_params_default().struct_size.toLong() == MeshNodeParams().size().toLong()) { "mesh_node_params layout" }
        return lib
    }

    /** mesh_abi_version() of the loaded library. */
    fun abiVersion(): Int = lib.mesh_abi_version()

    internal fun lastError(): String {
        val buf = Memory(1024)
        val n = SizeTByReference()
        lib.mesh_last_error_message(buf, SizeT(buf.size()), n)
        return buf.getString(0, "UTF-8")
    }

    /** Throws unless [status] is OK; reads the message on this (the failing) thread. */
    internal fun check(status: Int, what: String, partial: String = "") {
        if (status == MeshStatus.OK) return
        val msg = lastError()
        val name = lib.mesh_status_str(status)
        if (status == MeshStatus.CANCELLED) throw CancelledException(status, name, msg, what, partial)
        throw MeshException(status, name, msg, what)
    }

    /** A C array of NUL-terminated strings (null when empty); [keep] holds the memory alive. */
    internal fun cstrArray(items: List<String>, keep: MutableList<Memory>): Pointer? {
        if (items.isEmpty()) return null
        val arr = Memory(Native.POINTER_SIZE.toLong() * items.size)
        items.forEachIndexed { i, item ->
            val m = cstr(item).also { keep.add(it) }
            arr.setPointer(Native.POINTER_SIZE.toLong() * i, m)
        }
        keep.add(arr)
        return arr
    }

    internal fun cstr(s: String): Memory {
        val bytes = s.toByteArray(Charsets.UTF_8)
        val m = Memory(bytes.size + 1L)
        m.write(0, bytes, 0, bytes.size)
        m.setByte(bytes.size.toLong(), 0)
        return m
    }

    /** Calls a (…, buf, cap, n_out) function, growing the buffer when told; bytes without the NUL. */
    internal fun bufferCall(what: String, firstCap: Long, call: (Pointer, SizeT, SizeTByReference) -> Int): ByteArray {
        var cap = maxOf(firstCap, 16L)
        repeat(3) {
            val buf = Memory(cap)
            val n = SizeTByReference()
            val st = call(buf, SizeT(cap), n)
            if (st == MeshStatus.BUFFER_TOO_SMALL && n.value > cap) {
                cap = n.value
                return@repeat
            }
            check(st, what)
            return buf.getByteArray(0, n.value.toInt())
        }
        throw MeshException(MeshStatus.BUFFER_TOO_SMALL, "MESH_STATUS_BUFFER_TOO_SMALL", "buffer size kept changing", what)
    }
}

private fun Boolean.toByte(): Byte = if (this) 1 else 0

/** A loaded GGUF model (mesh_model). Close it when done; contexts keep their own reference. */
class Model private constructor(private var handle: Pointer?, val path: String) : Closeable {
    companion object {
        /**
         * Loads [path] (a .gguf file, or "default": SmolLM2-135M-Instruct, fetched once).
         * [exact]: exact accumulation (every Q4_1 product exact, as private mode
         * computes it; UNSUPPORTED on a CPU without AVX2/FMA/F16C).
         */
        fun load(path: String = "default", nThreads: Long? = null, exact: Boolean = false): Model {
            val lib = Mesh.lib
            val params = MeshModelParams()
            val defaults = lib.mesh_model_params_default()
            params.struct_size = defaults.struct_size
            params.n_threads = if (nThreads != null) SizeT(nThreads) else defaults.n_threads
            params.exact_accumulation = exact.toByte()
            val out = PointerByReference()
            Mesh.check(lib.mesh_model_load(Mesh.cstr(path), params, out), "loading model '$path'")
            return Model(out.value, path)
        }
    }

    internal fun ptr(): Pointer = handle ?: throw IllegalStateException("model has been closed")

    /** Releases this reference. Idempotent. */
    @Synchronized
    override fun close() {
        val h = handle ?: return
        handle = null
        Mesh.lib.mesh_model_free(h)
    }

    private fun size(f: (Pointer, SizeTByReference) -> Int, what: String): Long {
        val out = SizeTByReference()
        Mesh.check(f(ptr(), out), what)
        return out.value
    }

    /** general.architecture, e.g. "llama". */
    val arch: String
        get() = String(Mesh.bufferCall("architecture", 64) { b, c, n -> Mesh.lib.mesh_model_architecture(ptr(), b, c, n) }, Charsets.UTF_8)

    /** BLAKE3 hash of the GGUF file, 64 hex digits. */
    val id: String
        get() = String(Mesh.bufferCall("model id", 65) { b, c, n -> Mesh.lib.mesh_model_id(ptr(), b, c, n) }, Charsets.UTF_8)

    val nLayers: Long get() = size(Mesh.lib::mesh_model_n_layers, "n_layers")
    val nCtxTrain: Long get() = size(Mesh.lib::mesh_model_n_ctx_train, "n_ctx_train")
    val nVocab: Long get() = size(Mesh.lib::mesh_model_n_vocab, "n_vocab")
    val nEmbd: Long get() = size(Mesh.lib::mesh_model_n_embd, "n_embd")

    /** Token ids of [text]. */
    fun tokenize(text: String, addSpecial: Boolean = true, parseSpecial: Boolean = false): IntArray {
        val t = Mesh.cstr(text)
        var cap = t.size() + 8
        repeat(3) {
            val buf = Memory(cap * 4)
            val n = SizeTByReference()
            val st = Mesh.lib.mesh_tokenize(ptr(), t, addSpecial.toByte(), parseSpecial.toByte(), buf, SizeT(cap), n)
            if (st == MeshStatus.BUFFER_TOO_SMALL && n.value > cap) {
                cap = n.value
                return@repeat
            }
            Mesh.check(st, "tokenize")
            return buf.getIntArray(0, n.value.toInt())
        }
        throw MeshException(MeshStatus.BUFFER_TOO_SMALL, "MESH_STATUS_BUFFER_TOO_SMALL", "buffer size kept changing", "tokenize")
    }

    /** The bytes of [ids] (may end inside a UTF-8 character). */
    fun detokenizeBytes(ids: IntArray, special: Boolean = false): ByteArray {
        val arr = if (ids.isEmpty()) null else Memory(ids.size * 4L).also { it.write(0, ids, 0, ids.size) }
        return Mesh.bufferCall("detokenize", ids.size * 8L) { b, c, n ->
            Mesh.lib.mesh_detokenize(ptr(), arr, SizeT(ids.size.toLong()), special.toByte(), b, c, n)
        }
    }

    /** The text of [ids] (invalid UTF-8 replaced). */
    fun detokenize(ids: IntArray, special: Boolean = false): String = String(detokenizeBytes(ids, special), Charsets.UTF_8)

    /** Renders (role, content) turns with the model's chat template. */
    fun applyChatTemplate(messages: List<Pair<String, String>>, addGenerationPrompt: Boolean = true): String {
        val keep = ArrayList<Memory>()
        var arr: Pointer? = null
        if (messages.isNotEmpty()) {
            @Suppress("UNCHECKED_CAST")
            val structs = MeshChatMessage().toArray(messages.size) as Array<MeshChatMessage>
            messages.forEachIndexed { i, (role, content) ->
                structs[i].role = Mesh.cstr(role).also { keep.add(it) }
                structs[i].content = Mesh.cstr(content).also { keep.add(it) }
                structs[i].write()
            }
            arr = structs[0].pointer
        }
        val guess = 256L + messages.sumBy { it.first.length + it.second.length } * 4L
        val bytes = Mesh.bufferCall("chat template", guess) { b, c, n ->
            Mesh.lib.mesh_chat_apply_template(ptr(), arr, SizeT(messages.size.toLong()), addGenerationPrompt.toByte(), b, c, n)
        }
        keep.clear()
        return String(bytes, Charsets.UTF_8)
    }

    /** A new generation context over this model. */
    fun newContext(nCtx: Long? = null, nThreads: Long? = null): Context = Context(this, nCtx, nThreads)

    override fun toString(): String = if (handle == null) "Model($path, closed)" else "Model($path, $arch, $nLayers layers)"
}

/** What [Context.generate] returns. */
data class Generation(
    val text: String,
    val promptTokens: Long,
    val generatedTokens: Long,
    val promptMs: Double,
    val generateMs: Double,
    val stopReason: StopReason
)

/** A KV cache over a model (mesh_context); every generate starts from an empty cache. */
class Context internal constructor(model: Model, nCtx: Long?, nThreads: Long?) : Closeable {
    private var handle: Pointer?
    private var active = 0
    private val lock = Object()

    init {
        val lib = Mesh.lib
        val d = lib.mesh_context_params_default()
        val params = MeshContextParams()
        params.struct_size = d.struct_size
        params.n_ctx = if (nCtx != null) SizeT(nCtx) else d.n_ctx
        params.n_threads = if (nThreads != null) SizeT(nThreads) else d.n_threads
        params.write()
        val out = PointerByReference()
        Mesh.check(lib.mesh_context_new(model.ptr(), params.pointer, out), "creating context")
        handle = out.value
    }

    val nCtx: Long
        get() {
            val out = SizeTByReference()
            Mesh.check(Mesh.lib.mesh_context_n_ctx(live(), out), "n_ctx")
            return out.value
        }

    /** Frees the context. Idempotent; throws while a generate runs. */
    override fun close() {
        val h = synchronized(lock) {
            check(active == 0) { "cannot close a context while it is generating" }
            val h = handle
            handle = null
            h
        } ?: return
        Mesh.lib.mesh_context_free(h)
    }

    /**
     * Applies a LoRA adapter (llama.cpp's GGUF adapter format) at [scale] (1 = as
     * trained) in every later generate and eval, after the adapters added before.
     * Another architecture, shapes that do not fit or not an adapter: GGUF;
     * quantized halves: UNSUPPORTED; a missing file: IO. On an error the
     * context's adapters are unchanged.
     */
    fun addLora(path: String, scale: Float = 1f) {
        Mesh.check(Mesh.lib.mesh_context_add_lora(live(), Mesh.cstr(path), scale), "adding adapter $path")
    }

    /** Stops applying LoRA adapters (the base model again). */
    fun clearLora() {
        Mesh.check(Mesh.lib.mesh_context_clear_lora(live()), "clearing adapters")
    }

    /** Positions the KV cache holds (tokens evaluated and not truncated). */
    val nPast: Long
        get() {
            val out = SizeTByReference()
            Mesh.check(Mesh.lib.mesh_context_n_past(live(), out), "n_past")
            return out.value
        }

    private fun live(): Pointer = synchronized(lock) { handle } ?: throw IllegalStateException("context has been closed")

    /** Runs [call] on the live handle, counted as active so [close] refuses meanwhile. */
    private inline fun <T> running(call: (Pointer) -> T): T {
        val h = synchronized(lock) {
            val h = handle ?: throw IllegalStateException("context has been closed")
            active++
            h
        }
        try {
            return call(h)
        } finally {
            synchronized(lock) { active-- }
        }
    }

    /**
     * Evaluates [tokens] at the end of the KV cache (positions [nPast]..), for a
     * sampling loop of your own: read [logits], pick a token, eval it, and so on.
     * Keeps the last token's logits, or every token's with [allLogits]. All or
     * nothing: on an error (INVALID_ARG for an id outside the vocabulary or no
     * tokens, CONTEXT_OVERFLOW past nCtx, [CancelledException] after [cancel])
     * the cache is as before. [generate] starts over from an empty cache.
     */
    fun eval(tokens: IntArray, allLogits: Boolean = false) {
        val mem = if (tokens.isEmpty()) null else Memory(tokens.size * 4L).also { it.write(0, tokens, 0, tokens.size) }
        val st = running { h -> Mesh.lib.mesh_context_eval(h, mem, SizeT(tokens.size.toLong()), allLogits.toByte()) }
        Mesh.check(st, "eval")
    }

    /**
     * The logits kept by the last [eval]: nVocab floats, or tokens * nVocab (row
     * by row) after an eval with allLogits; empty before any eval, after
     * [generate] or a [truncate] that forgot positions.
     */
    fun logits(): FloatArray {
        val h = live()
        val need = SizeTByReference()
        val st = Mesh.lib.mesh_context_logits(h, null, SizeT(0), need)
        if (st == MeshStatus.OK) return FloatArray(0)
        if (st != MeshStatus.BUFFER_TOO_SMALL) Mesh.check(st, "logits")
        val buf = Memory(need.value * 4)
        Mesh.check(Mesh.lib.mesh_context_logits(h, buf, SizeT(need.value), need), "logits")
        return buf.getFloatArray(0, need.value.toInt())
    }

    /** Forgets every position from [nPast] on (at or past the current length changes nothing). */
    fun truncate(nPast: Long) {
        require(nPast >= 0) { "nPast must not be negative" }
        Mesh.check(Mesh.lib.mesh_context_truncate(live(), SizeT(nPast)), "truncate")
    }

    /** Stops the running generate (it throws [CancelledException]); any thread, also from the callback. */
    fun cancel() {
        val h = synchronized(lock) { handle } ?: return
        Mesh.check(Mesh.lib.mesh_context_cancel(h), "cancel")
    }

    /**
     * Generates text after [prompt]; null means the library's default.
     * [chat]: render the prompt as one user message with the chat template.
     * [raw]: (chat false) parse special-token text in the prompt.
     * [format]: null or "text" (anything), "json" (one JSON object; ends when it closes), or a JSON schema as JSON text (one object the schema accepts).
     * [temperature] <= 0 is greedy. [onPiece] gets each piece of text as it is
     * produced; returning false stops (stopReason CALLBACK). An exception
     * thrown by it stops generation and is rethrown here.
     */
    fun generate(
        prompt: String,
        chat: Boolean = false,
        maxTokens: Long? = null,
        temperature: Float? = null,
        seed: Long? = null,
        raw: Boolean = false,
        topK: Long? = null,
        topP: Float? = null,
        minP: Float? = null,
        repeatPenalty: Float? = null,
        repeatLastN: Long? = null,
        ignoreEos: Boolean = false,
        format: String? = null,
        onPiece: ((String) -> Boolean)? = null
    ): Generation {
        val call = GenerateCall(
            GenerateOptions(chat, maxTokens, temperature, seed, raw, topK, topP, minP, repeatPenalty, repeatLastN, ignoreEos, format),
            onPiece
        )
        val stats = MeshGenerateStats()
        stats.struct_size = SizeT(stats.size().toLong())
        stats.write()
        val promptMem = Mesh.cstr(prompt)
        val st = call.execute { cb, params -> running { h -> Mesh.lib.mesh_generate(h, promptMem, params, cb, null, stats.pointer) } }
        Mesh.check(st, "generate", call.text.toString())
        stats.read()
        return Generation(
            call.text.toString(), stats.prompt_tokens.toLong(), stats.generated_tokens.toLong(),
            stats.prompt_ms, stats.generate_ms, stopReason(stats.stop_reason)
        )
    }
}

private fun stopReason(code: Int): StopReason = StopReason.values().getOrElse(code) { StopReason.UNKNOWN }

/** The sampling and format options of a generate call (null: the library's default). */
internal data class GenerateOptions(
    val chat: Boolean, val maxTokens: Long?, val temperature: Float?, val seed: Long?, val raw: Boolean,
    val topK: Long?, val topP: Float?, val minP: Float?, val repeatPenalty: Float?, val repeatLastN: Long?,
    val ignoreEos: Boolean, val format: String?
)

/** One generate call's C side: the params struct, the streaming callback and the text so far. */
internal class GenerateCall(o: GenerateOptions, private val onPiece: ((String) -> Boolean)?) {
    val text = StringBuilder()
    private var error: Throwable? = null
    private val formatMem: Memory? = o.format?.let { Mesh.cstr(it) }
    private val params = MeshGenerateParams()
    private val callback = object : MeshTokenCallback {
        override fun invoke(userdata: Pointer?, piece: Pointer?, len: SizeT): Byte {
            return try {
                val s = if (piece == null) "" else String(piece.getByteArray(0, len.toInt()), Charsets.UTF_8)
                text.append(s)
                if (onPiece == null || onPiece.invoke(s)) 1 else 0
            } catch (e: Throwable) { // never unwind into the library
                error = e
                0
            }
        }
    }

    init {
        val d = Mesh.lib.mesh_generate_params_default()
        val p = params
        p.struct_size = d.struct_size
        p.max_tokens = if (o.maxTokens != null) SizeT(o.maxTokens) else d.max_tokens
        p.temperature = o.temperature ?: d.temperature
        p.top_k = if (o.topK != null) SizeT(o.topK) else d.top_k
        p.top_p = o.topP ?: d.top_p
        p.min_p = o.minP ?: d.min_p
        p.repeat_penalty = o.repeatPenalty ?: d.repeat_penalty
        p.repeat_last_n = if (o.repeatLastN != null) SizeT(o.repeatLastN) else d.repeat_last_n
        p.seed = o.seed ?: d.seed
        p.ignore_eos = o.ignoreEos.toByte()
        p.chat = o.chat.toByte()
        p.raw = o.raw.toByte()
        p.format = formatMem
        p.write()
    }

    /** Calls [c] with the callback and params; rethrows what the callback threw. */
    fun execute(c: (MeshTokenCallback, Pointer) -> Int): Int {
        val st = try {
            c(callback, params.pointer)
        } finally {
            java.lang.ref.Reference.reachabilityFence(callback)
            java.lang.ref.Reference.reachabilityFence(formatMem)
        }
        error?.let { throw it }
        return st
    }
}

/** What [Node.generate] returns: the generation and how the mesh computed it. */
data class NodeGeneration(
    val text: String,
    val promptTokens: Long,
    val generatedTokens: Long,
    val promptMs: Double,
    val generateMs: Double,
    val stopReason: StopReason,
    /** Pipeline hops at the end (0 in local mode). */
    val nHops: Long,
    /** Stages replaced during the generation. */
    val failovers: Long,
    /** Mean round trip of a forward request to one hop, ms. */
    val hopMs: Double,
    /** Hidden-state (pipeline) or envelope (private) bytes per generated token. */
    val bytesPerToken: Double,
    /** Private mode: helpers holding shares. */
    val nHelpers: Long,
    /** Private mode: helpers dropped (and replaced by spares). */
    val helpersDropped: Long
)

/**
 * A mesh node (mesh_node): joins the mesh over libp2p, serves layer ranges of
 * models to peers, generates locally, through a pipeline of peers or in
 * private mode, and runs the ledger. Close it to leave the mesh.
 *
 * [listen]: multiaddrs to listen on (none: generate through [bootstrap] peers
 * only; a node that serves must listen). [bootstrap]: peers to dial, with
 * `/p2p/<peer id>`. [identityPath]: a file holding the node's key (created if
 * missing; null: a new identity). Timeouts in ms, null for the defaults.
 * [privateHelpers], [privateSpares], [trusted]: private mode's helpers, spares
 * and the peer ids trusted to be independent. [onEvent] gets the node's events
 * as JSON objects (`{"event": "plan", ...}`) on a thread of the node; it must
 * return quickly.
 */
class Node(
    listen: List<String> = emptyList(),
    bootstrap: List<String> = emptyList(),
    identityPath: String? = null,
    mdns: Boolean = false,
    stageTimeoutMs: Long? = null,
    findTimeoutMs: Long? = null,
    kvBudgetBytes: Long? = null,
    privateHelpers: Int? = null,
    privateSpares: Int? = null,
    trusted: List<String> = emptyList(),
    helperTimeoutMs: Long? = null,
    onEvent: ((String) -> Unit)? = null
) : Closeable {
    private var handle: Pointer?
    private var active = 0
    private val lock = Object()
    // Held so the JVM keeps it while the library may call it.
    private val events: MeshNodeEventCallback?

    init {
        val lib = Mesh.lib
        val d = lib.mesh_node_params_default()
        val p = MeshNodeParams()
        val keep = ArrayList<Memory>()
        p.struct_size = d.struct_size
        p.listen = Mesh.cstrArray(listen, keep)
        p.n_listen = SizeT(listen.size.toLong())
        p.bootstrap = Mesh.cstrArray(bootstrap, keep)
        p.n_bootstrap = SizeT(bootstrap.size.toLong())
        p.identity_path = identityPath?.let { Mesh.cstr(it).also { m -> keep.add(m) } }
        p.mdns = mdns.toByte()
        p.stage_timeout_ms = stageTimeoutMs ?: d.stage_timeout_ms
        p.find_timeout_ms = findTimeoutMs ?: d.find_timeout_ms
        p.kv_budget_bytes = kvBudgetBytes ?: d.kv_budget_bytes
        p.private_helpers = privateHelpers ?: d.private_helpers
        p.private_spares = privateSpares ?: d.private_spares
        p.trusted = Mesh.cstrArray(trusted, keep)
        p.n_trusted = SizeT(trusted.size.toLong())
        p.helper_timeout_ms = helperTimeoutMs ?: d.helper_timeout_ms
        p.write()
        val out = PointerByReference()
        Mesh.check(lib.mesh_node_open(p.pointer, out), "opening node")
        keep.clear()
        handle = out.value
        events = onEvent?.let { f ->
            object : MeshNodeEventCallback {
                override fun invoke(userdata: Pointer?, json: Pointer?, len: SizeT) {
                    try {
                        if (json != null) f(String(json.getByteArray(0, len.toInt()), Charsets.UTF_8))
                    } catch (e: Throwable) {
                        // never unwind into the library; an event handler's failure drops that event
                    }
                }
            }
        }
        if (events != null) {
            val st = lib.mesh_node_set_event_callback(out.value, events, null)
            if (st != MeshStatus.OK) {
                close()
                Mesh.check(st, "event callback")
            }
        }
    }

    /** Runs [call] on the live handle, counted as active so [close] refuses meanwhile. */
    private inline fun <T> running(call: (Pointer) -> T): T {
        val h = synchronized(lock) {
            val h = handle ?: throw IllegalStateException("node has been closed")
            active++
            h
        }
        try {
            return call(h)
        } finally {
            synchronized(lock) { active-- }
        }
    }

    private fun text(what: String, call: (Pointer, Pointer, SizeT, SizeTByReference) -> Int): String =
        running { h -> String(Mesh.bufferCall(what, 256) { b, c, n -> call(h, b, c, n) }, Charsets.UTF_8) }

    /** Leaves the mesh (withdraws announcements, closes connections) and frees the node. Idempotent; throws while a call runs. */
    override fun close() {
        val h = synchronized(lock) {
            check(active == 0) { "cannot close a node while a call on it runs" }
            val h = handle
            handle = null
            h
        } ?: return
        Mesh.lib.mesh_node_free(h)
        java.lang.ref.Reference.reachabilityFence(events)
    }

    /** The node's peer id ("12D3KooW..."). */
    val peerId: String
        get() = text("peer id") { h, b, c, n -> Mesh.lib.mesh_node_peer_id(h, b, c, n) }

    /** The addresses the node listens on, each ending in /p2p/<peer id> (ready to bootstrap from). */
    val listenAddrs: List<String>
        get() = text("listen addrs") { h, b, c, n -> Mesh.lib.mesh_node_listen_addrs(h, b, c, n) }
            .split("\n").filter { it.isNotEmpty() }

    /** Connects to a peer at [addr] (a multiaddr; INVALID_ARG if it is not one). */
    fun dial(addr: String) {
        val a = Mesh.cstr(addr)
        Mesh.check(running { h -> Mesh.lib.mesh_node_dial(h, a) }, "dialing $addr")
    }

    /** Serves layers [layerStart] until [layerEnd] (exclusive; 0 = to the last) of [model] to peers. */
    fun serve(model: Model, layerStart: Int = 0, layerEnd: Int = 0) {
        Mesh.check(running { h -> Mesh.lib.mesh_node_serve(h, model.ptr(), layerStart, layerEnd) }, "serving")
    }

    /** Also answers private-mode requests for [model] (holds secret shares; never sees activations). */
    fun serveHelper(model: Model) {
        Mesh.check(running { h -> Mesh.lib.mesh_node_serve_helper(h, model.ptr()) }, "serving as a helper")
    }

    /** Stops every running generate of this node (each throws [CancelledException]). */
    fun cancel() {
        val h = synchronized(lock) { handle } ?: return
        Mesh.check(Mesh.lib.mesh_node_cancel(h), "cancel")
    }

    /**
     * Generates text after [prompt] with [model] in [mode]: options as
     * [Context.generate]. In PIPELINE mode [model] must be the file the peers
     * serve; NETWORK when no chain of peers covers its layers, or (PRIVATE)
     * too few helpers answer.
     */
    fun generate(
        model: Model,
        prompt: String,
        mode: Mode = Mode.LOCAL,
        chat: Boolean = false,
        maxTokens: Long? = null,
        temperature: Float? = null,
        seed: Long? = null,
        raw: Boolean = false,
        topK: Long? = null,
        topP: Float? = null,
        minP: Float? = null,
        repeatPenalty: Float? = null,
        repeatLastN: Long? = null,
        ignoreEos: Boolean = false,
        format: String? = null,
        onPiece: ((String) -> Boolean)? = null
    ): NodeGeneration {
        val call = GenerateCall(
            GenerateOptions(chat, maxTokens, temperature, seed, raw, topK, topP, minP, repeatPenalty, repeatLastN, ignoreEos, format),
            onPiece
        )
        val stats = MeshNodeGenerateStats()
        stats.struct_size = SizeT(stats.size().toLong())
        stats.write()
        val promptMem = Mesh.cstr(prompt)
        val st = call.execute { cb, params ->
            running { h -> Mesh.lib.mesh_node_generate(h, model.ptr(), promptMem, params, mode.code, cb, null, stats.pointer) }
        }
        Mesh.check(st, "generate (${mode.name.toLowerCase()})", call.text.toString())
        stats.read()
        return NodeGeneration(
            call.text.toString(), stats.prompt_tokens.toLong(), stats.generated_tokens.toLong(),
            stats.prompt_ms, stats.generate_ms, stopReason(stats.stop_reason),
            stats.n_hops.toLong(), stats.failovers.toLong(), stats.hop_ms, stats.bytes_per_token,
            stats.n_helpers.toLong(), stats.helpers_dropped.toLong()
        )
    }

    /**
     * Runs the ledger of the genesis file [genesisPath] on this node (votes if
     * its identity has stake, follows otherwise), keeping blocks in
     * [storePath] and adapters in [updatesDir] (null: in the cache).
     */
    fun ledgerStart(genesisPath: String, storePath: String? = null, updatesDir: String? = null) {
        val g = Mesh.cstr(genesisPath)
        val s = storePath?.let { Mesh.cstr(it) }
        val u = updatesDir?.let { Mesh.cstr(it) }
        Mesh.check(running { h -> Mesh.lib.mesh_node_ledger_start(h, g, s, u) }, "starting the ledger")
    }

    /**
     * The ledger's status as a JSON object: height, tip, round, validator,
     * peers_height, synced, active (model id -> adapter id), stakes (peer id
     * -> stake). INVALID_ARG if no ledger runs.
     */
    fun ledgerStatus(): String = text("ledger status") { h, b, c, n -> Mesh.lib.mesh_node_ledger_status(h, b, c, n) }

    /** The path of the adapter the ledger makes active for [model] (fetched if needed), or null if none. */
    fun ledgerAdapter(model: Model): String? =
        text("ledger adapter") { h, b, c, n -> Mesh.lib.mesh_node_ledger_adapter(h, model.ptr(), b, c, n) }
            .let { if (it.length == 0) null else it }

    /** Gives [amount] of this node's stake to the peer [to]; it takes effect at the height after the block carrying it. */
    fun ledgerTransfer(to: String, amount: Long) {
        val t = Mesh.cstr(to)
        Mesh.check(running { h -> Mesh.lib.mesh_node_ledger_transfer(h, t, amount) }, "stake transfer")
    }

    override fun toString(): String = if (handle == null) "Node(closed)" else "Node($peerId)"
}
