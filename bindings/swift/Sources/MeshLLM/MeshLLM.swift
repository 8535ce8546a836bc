// MeshLLM: a thin Swift wrapper over the mesh-llm C API (module CMesh,
// include/mesh.h).
//
//     let model = try Model(path: "default", threads: 1)
//     let ctx = try Context(model: model, threads: 1)
//     let out = try ctx.generate("Hello", options: GenerateOptions(chat: true, maxTokens: 32)) { piece in
//         print(piece, terminator: "")
//         return true // false stops generation
//     }
//     print("\n\(out.generatedTokens) tokens, \(out.stopReason)")
//
// Threads: a Model may be used from any thread. A Context runs one generate
// at a time; cancel() may be called from any thread, or from the callback.
import CMesh

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The MESH_ABI_VERSION of the include/mesh.h this wrapper was written for.
public let meshABIVersion: UInt32 = 1

/// mesh_status values used here (the C constants are an enum whose imported
/// type depends on the C standard; statuses are plain Int32 in the API).
public enum MeshStatus {
    public static let ok: Int32 = 0
    public static let bufferTooSmall: Int32 = 5
    public static let invalidArg: Int32 = 6
    public static let busy: Int32 = 7
    public static let io: Int32 = 8
    public static let gguf: Int32 = 9
    public static let contextOverflow: Int32 = 13
    public static let cancelled: Int32 = 16
    public static let invalidHandle: Int32 = 21
}

/// A mesh function failed.
public struct MeshError: Error, CustomStringConvertible {
    /// The mesh_status.
    public let status: Int32
    /// Its name, e.g. "MESH_STATUS_IO".
    public let statusName: String
    /// mesh_last_error_message() of the failing call.
    public let message: String
    /// What was being done.
    public let operation: String
    /// For a cancelled generation: the text generated until then.
    public let partialText: String

    public var description: String {
        (operation.isEmpty ? "" : operation + ": ") + statusName + ": " + message
    }
}

/// The ABI version of the loaded library.
public func abiVersion() -> UInt32 { mesh_abi_version() }

func lastErrorMessage() -> String {
    let cap = 1024
    var buf = [CChar](repeating: 0, count: cap)
    var n = 0
    _ = mesh_last_error_message(&buf, cap, &n)
    return String(cString: buf)
}

/// Throws unless `status` is OK; reads the message on this (the failing) thread.
func check(_ status: Int32, _ operation: String, partialText: String = "") throws {
    if status == MeshStatus.ok { return }
    let message = lastErrorMessage()
    let name = String(cString: mesh_status_str(status))
    throw MeshError(status: status, statusName: name, message: message, operation: operation,
                    partialText: partialText)
}

func checkABI() throws {
    let got = mesh_abi_version()
    if got != meshABIVersion {
        throw MeshError(status: -1, statusName: "ABI_MISMATCH",
                        message: "the library has C ABI \(got), MeshLLM was written for \(meshABIVersion)",
                        operation: "loading libmesh_ffi", partialText: "")
    }
}

/// Calls a `(…, char *buf, size_t cap, size_t *n_out)` function, growing the
/// buffer when told to; returns the bytes without the NUL.
func bufferCall(_ operation: String, _ firstCap: Int,
                _ call: (UnsafeMutablePointer<CChar>?, Int, UnsafeMutablePointer<Int>) -> Int32) throws -> [UInt8] {
    var cap = max(firstCap, 16)
    for _ in 0..<3 {
        var buf = [CChar](repeating: 0, count: cap)
        var n = 0
        let st = buf.withUnsafeMutableBufferPointer { call($0.baseAddress, cap, &n) }
        if st == MeshStatus.bufferTooSmall && n > cap {
            cap = n
            continue
        }
        try check(st, operation)
        return buf[0..<n].map { UInt8(bitPattern: $0) }
    }
    throw MeshError(status: MeshStatus.bufferTooSmall, statusName: "MESH_STATUS_BUFFER_TOO_SMALL",
                    message: "buffer size kept changing", operation: operation, partialText: "")
}

/// A loaded GGUF model (`mesh_model`), released when the object goes.
/// Contexts hold their own reference.
public final class Model {
    let handle: OpaquePointer
    public let path: String

    /// Loads `path`: a .gguf file, or "default" (SmolLM2-135M-Instruct,
    /// fetched once). `threads`: default compute threads for contexts (nil or 0 = all cores).
    public init(path: String = "default", threads: Int? = nil) throws {
        try checkABI()
        var params = mesh_model_params_default()
        if let threads = threads { params.n_threads = threads }
        var out: OpaquePointer? = nil
        try check(mesh_model_load(path, &params, &out), "loading model '\(path)'")
        handle = out!
        self.path = path
    }

    deinit { mesh_model_free(handle) }

    private func size(_ f: (OpaquePointer?, UnsafeMutablePointer<Int>?) -> Int32, _ what: String) throws -> Int {
        var out = 0
        try check(f(handle, &out), what)
        return out
    }

    /// general.architecture, e.g. "llama".
    public func architecture() throws -> String {
        String(decoding: try bufferCall("architecture", 64) { mesh_model_architecture(handle, $0, $1, $2) }, as: UTF8.self)
    }

    /// BLAKE3 hash of the GGUF file, 64 hex digits.
    public func id() throws -> String {
        String(decoding: try bufferCall("model id", 65) { mesh_model_id(handle, $0, $1, $2) }, as: UTF8.self)
    }

    public func nLayers() throws -> Int { try size(mesh_model_n_layers, "n_layers") }
    public func nCtxTrain() throws -> Int { try size(mesh_model_n_ctx_train, "n_ctx_train") }
    public func nVocab() throws -> Int { try size(mesh_model_n_vocab, "n_vocab") }
    public func nEmbd() throws -> Int { try size(mesh_model_n_embd, "n_embd") }

    /// Token ids of `text`.
    public func tokenize(_ text: String, addSpecial: Bool = true, parseSpecial: Bool = false) throws -> [UInt32] {
        var cap = text.utf8.count + 8
        for _ in 0..<3 {
            var ids = [UInt32](repeating: 0, count: cap)
            var n = 0
            let st = ids.withUnsafeMutableBufferPointer {
                mesh_tokenize(handle, text, addSpecial, parseSpecial, $0.baseAddress, cap, &n)
            }
            if st == MeshStatus.bufferTooSmall && n > cap {
                cap = n
                continue
            }
            try check(st, "tokenize")
            return Array(ids[0..<n])
        }
        throw MeshError(status: MeshStatus.bufferTooSmall, statusName: "MESH_STATUS_BUFFER_TOO_SMALL",
                        message: "buffer size kept changing", operation: "tokenize", partialText: "")
    }

    /// The bytes of `ids` (may end inside a UTF-8 character).
    public func detokenizeBytes(_ ids: [UInt32], special: Bool = false) throws -> [UInt8] {
        try ids.withUnsafeBufferPointer { idp in
            try bufferCall("detokenize", ids.count * 8) {
                mesh_detokenize(handle, idp.baseAddress, ids.count, special, $0, $1, $2)
            }
        }
    }

    /// The text of `ids` (invalid UTF-8 replaced).
    public func detokenize(_ ids: [UInt32], special: Bool = false) throws -> String {
        String(decoding: try detokenizeBytes(ids, special: special), as: UTF8.self)
    }

    /// Renders (role, content) turns with the model's chat template.
    public func applyChatTemplate(_ messages: [(role: String, content: String)],
                                  addGenerationPrompt: Bool = true) throws -> String {
        var owned: [UnsafeMutablePointer<CChar>] = []
        defer { owned.forEach { free($0) } }
        var cMessages: [mesh_chat_message] = []
        for m in messages {
            guard let role = strdup(m.role), let content = strdup(m.content) else {
                throw MeshError(status: -1, statusName: "OUT_OF_MEMORY", message: "strdup failed",
                                operation: "chat template", partialText: "")
            }
            owned.append(role)
            owned.append(content)
            cMessages.append(mesh_chat_message(role: UnsafePointer(role), content: UnsafePointer(content)))
        }
        let guess = 256 + messages.reduce(0) { $0 + $1.role.utf8.count + $1.content.utf8.count } * 2
        let bytes = try cMessages.withUnsafeBufferPointer { msgs in
            try bufferCall("chat template", guess) {
                mesh_chat_apply_template(handle, msgs.baseAddress, msgs.count, addGenerationPrompt, $0, $1, $2)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Why a generation ended normally.
public enum StopReason: Equatable {
    case endOfGeneration, maxTokens, callback
    case unknown(Int32)

    init(_ raw: Int32) {
        switch raw {
        case 0: self = .endOfGeneration
        case 1: self = .maxTokens
        case 2: self = .callback
        default: self = .unknown(raw)
        }
    }
}

/// How to generate; nil means the library's default (mesh_generate_params_default).
public struct GenerateOptions {
    /// Render the prompt as one user message with the chat template.
    public var chat = false
    /// (chat false) Parse special-token text in the prompt.
    public var raw = false
    public var maxTokens: Int? = nil
    /// <= 0: greedy.
    public var temperature: Float? = nil
    public var seed: UInt64? = nil
    public var topK: Int? = nil
    public var topP: Float? = nil
    public var minP: Float? = nil
    public var repeatPenalty: Float? = nil
    public var repeatLastN: Int? = nil
    public var ignoreEos = false
    /// nil or "text" (anything), "json": one JSON object (ends when it closes),
    /// or a JSON schema as JSON text: one object the schema accepts.
    public var format: String? = nil

    public init(chat: Bool = false, raw: Bool = false, maxTokens: Int? = nil, temperature: Float? = nil,
                seed: UInt64? = nil) {
        self.chat = chat
        self.raw = raw
        self.maxTokens = maxTokens
        self.temperature = temperature
        self.seed = seed
    }
}

/// What `Context.generate` returns.
public struct Generation {
    public let text: String
    public let promptTokens: Int
    public let generatedTokens: Int
    public let promptMs: Double
    public let generateMs: Double
    public let stopReason: StopReason
}

/// Receives the pieces of one generation (passed to C as unretained userdata;
/// `generate` keeps it alive for the call).
private final class PieceSink {
    var text = ""
    let onPiece: ((String) -> Bool)?
    init(_ onPiece: ((String) -> Bool)?) { self.onPiece = onPiece }
}

/// A KV cache over a model (`mesh_context`); every generate starts from an
/// empty cache. Freed when the object goes.
public final class Context {
    let handle: OpaquePointer

    /// `nCtx`: positions (nil = 2048, 0 = the model's training context);
    /// `threads`: compute threads (nil = the model's setting).
    public init(model: Model, nCtx: Int? = nil, threads: Int? = nil) throws {
        var params = mesh_context_params_default()
        if let nCtx = nCtx { params.n_ctx = nCtx }
        if let threads = threads { params.n_threads = threads }
        var out: OpaquePointer? = nil
        try check(mesh_context_new(model.handle, &params, &out), "creating context")
        handle = out!
    }

    deinit { mesh_context_free(handle) }

    /// Positions the KV cache holds.
    public func nCtx() throws -> Int {
        var out = 0
        try check(mesh_context_n_ctx(handle, &out), "n_ctx")
        return out
    }

    /// Applies a LoRA adapter (llama.cpp's GGUF adapter format) at `scale`
    /// (1 = as trained) in every later generate and eval, after the adapters
    /// added before; on an error the context's adapters are unchanged.
    public func addLora(path: String, scale: Float = 1) throws {
        try check(mesh_context_add_lora(handle, path, scale), "adding adapter \(path)")
    }

    /// Stops applying LoRA adapters (the base model again).
    public func clearLora() throws {
        try check(mesh_context_clear_lora(handle), "clearing adapters")
    }

    /// Positions the KV cache holds now (tokens evaluated and not truncated).
    public func nPast() throws -> Int {
        var out = 0
        try check(mesh_context_n_past(handle, &out), "n_past")
        return out
    }

    /// Evaluates `tokens` at the end of the KV cache (positions nPast()..),
    /// for a sampling loop of your own: read logits(), pick a token, eval it,
    /// and so on. Keeps the last token's logits, or every token's with
    /// `allLogits`. All or nothing: on an error (`invalidArg` for an id
    /// outside the vocabulary or no tokens, context overflow past nCtx(),
    /// `cancelled` after cancel()) the cache is as before. generate() starts
    /// over from an empty cache.
    public func eval(_ tokens: [UInt32], allLogits: Bool = false) throws {
        try tokens.withUnsafeBufferPointer { p in
            try check(mesh_context_eval(handle, p.baseAddress, p.count, allLogits), "eval")
        }
    }

    /// The logits kept by the last eval(): nVocab floats, or tokens * nVocab
    /// (row by row) after an eval with `allLogits`; empty before any eval,
    /// after generate() or a truncate() that forgot positions.
    public func logits() throws -> [Float] {
        var need = 0
        let st = mesh_context_logits(handle, nil, 0, &need)
        if st == MeshStatus.ok { return [] }
        if st != MeshStatus.bufferTooSmall { try check(st, "logits") }
        var buf = [Float](repeating: 0, count: need)
        var got = 0
        try buf.withUnsafeMutableBufferPointer { p in
            try check(mesh_context_logits(handle, p.baseAddress, p.count, &got), "logits")
        }
        return Array(buf.prefix(got))
    }

    /// Forgets every position from `nPast` on (at or past the current
    /// length changes nothing).
    public func truncate(_ nPast: Int) throws {
        try check(mesh_context_truncate(handle, nPast), "truncate")
    }

    /// Stops the running generate (it throws a MeshError with status
    /// `MeshStatus.cancelled` and the text so far in `partialText`). Any
    /// thread, also from the callback; does nothing when none runs.
    public func cancel() {
        _ = mesh_context_cancel(handle)
    }

    /// Generates text after `prompt`, calling `onPiece` with each piece as it
    /// is produced; returning false from it stops (stopReason .callback).
    public func generate(_ prompt: String, options: GenerateOptions = GenerateOptions(),
                         onPiece: ((String) -> Bool)? = nil) throws -> Generation {
        var params = mesh_generate_params_default()
        params.chat = options.chat
        params.raw = options.raw
        params.ignore_eos = options.ignoreEos
        if let v = options.maxTokens { params.max_tokens = v }
        if let v = options.temperature { params.temperature = v }
        if let v = options.seed { params.seed = v }
        if let v = options.topK { params.top_k = v }
        if let v = options.topP { params.top_p = v }
        if let v = options.minP { params.min_p = v }
        if let v = options.repeatPenalty { params.repeat_penalty = v }
        if let v = options.repeatLastN { params.repeat_last_n = v }
        // A C copy of the format, alive for the call.
        let format = options.format.map { strdup($0) } ?? nil
        defer { free(format) }
        params.format = UnsafePointer(format)

        var stats = mesh_generate_stats()
        // sizeof in C includes trailing padding: that is Swift's stride, not size.
        stats.struct_size = MemoryLayout<mesh_generate_stats>.stride

        let sink = PieceSink(onPiece)
        let status: Int32 = withExtendedLifetime(sink) {
            let userdata = Unmanaged.passUnretained(sink).toOpaque()
            return mesh_generate(handle, prompt, &params, { userdata, piece, len in
                guard let userdata = userdata else { return false }
                let sink = Unmanaged<PieceSink>.fromOpaque(userdata).takeUnretainedValue()
                let bytes = UnsafeRawBufferPointer(start: piece, count: len)
                let text = String(decoding: bytes, as: UTF8.self)
                sink.text += text
                return sink.onPiece?(text) ?? true
            }, userdata, &stats)
        }
        try check(status, "generate", partialText: sink.text)
        return Generation(text: sink.text, promptTokens: stats.prompt_tokens,
                          generatedTokens: stats.generated_tokens, promptMs: stats.prompt_ms,
                          generateMs: stats.generate_ms, stopReason: StopReason(stats.stop_reason))
    }
}
