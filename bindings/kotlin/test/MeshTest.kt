// Smoke tests of the Kotlin bindings against a real model; prints
// "N passed, M failed" and exits non-zero on any failure.
// Model: $MESH_MODEL, else "default". One compute thread (ggml's spin barrier
// collapses when oversubscribed).
package meshllm

import kotlin.system.exitProcess

private var passed = 0
private var failed = 0

private fun test(name: String, body: () -> Unit) {
    try {
        body()
        passed++
        println("ok   $name")
    } catch (e: Throwable) {
        failed++
        println("FAIL $name: $e")
    }
}

private fun expect(cond: Boolean, what: () -> String) {
    if (!cond) throw AssertionError(what())
}

/** Writes a GGUF v3 LoRA adapter with F32 tensors (name, ne0, ne1, values). */
private fun writeAdapter(file: java.io.File, tensors: List<Triple<String, Pair<Long, Long>, FloatArray>>, arch: String = "llama") {
    val out = java.io.ByteArrayOutputStream()
    fun le(n: Int, put: (java.nio.ByteBuffer) -> Unit) {
        val b = java.nio.ByteBuffer.allocate(n).order(java.nio.ByteOrder.LITTLE_ENDIAN)
        put(b)
        out.write(b.array())
    }
    fun u32(v: Int) = le(4) { it.putInt(v) }
    fun u64(v: Long) = le(8) { it.putLong(v) }
    fun str(v: String) { val b = v.toByteArray(); u64(b.size.toLong()); out.write(b) }
    fun pad() { while (out.size() % 32 != 0) out.write(0) }
    out.write("GGUF".toByteArray())
    u32(3); u64(tensors.size.toLong()); u64(4)
    str("general.architecture"); u32(8); str(arch)
    str("general.type"); u32(8); str("adapter")
    str("adapter.type"); u32(8); str("lora")
    str("adapter.lora.alpha"); u32(6); le(4) { it.putFloat(0f) }
    var offset = 0L
    for ((name, dims, values) in tensors) {
        str(name); u32(2); u64(dims.first); u64(dims.second)
        u32(0); u64(offset) // F32
        offset += (4L * values.size + 31) / 32 * 32
    }
    pad()
    for ((_, _, values) in tensors) {
        pad()
        le(4 * values.size) { b -> values.forEach { b.putFloat(it) } }
    }
    file.writeBytes(out.toByteArray())
}

fun main() {
    val modelPath = System.getenv("MESH_MODEL") ?: "default"

    test("abi version") { expect(Mesh.abiVersion() == MESH_ABI_VERSION) { "abi ${Mesh.abiVersion()}" } }

    test("bad path throws, naming the path") {
        val bad = "/nonexistent/dir/no-such-model.gguf"
        try {
            Model.load(bad).close()
            throw AssertionError("no exception")
        } catch (e: MeshException) {
            expect(bad in (e.message ?: "")) { "message: ${e.message}" }
            expect(e.status == MeshStatus.IO) { "status ${e.statusName}" }
        }
    }

    val model = try {
        Model.load(modelPath, nThreads = 1)
    } catch (e: Throwable) {
        failed++
        println("FAIL load $modelPath: $e")
        println("$passed passed, $failed failed")
        exitProcess(1)
    }
    model.use {
        test("load") {
            expect(model.arch == "llama") { "arch ${model.arch}" }
            expect(model.nLayers > 0) { "n_layers ${model.nLayers}" }
            expect(model.id.length == 64) { "id ${model.id}" }
            expect(model.nVocab > 1000) { "n_vocab ${model.nVocab}" }
        }

        test("tokenize/detokenize round trip") {
            val text = "Hello, world! Ünïcödé ✓"
            val ids = model.tokenize(text, addSpecial = false)
            expect(ids.isNotEmpty()) { "no ids" }
            expect(model.detokenize(ids) == text) { "got '${model.detokenize(ids)}'" }
            val long = List(500) { "tok" }.joinToString(" ")
            expect(model.detokenize(model.tokenize(long, addSpecial = false)) == long) { "long text" }
        }

        test("chat template contains the user text") {
            val prompt = model.applyChatTemplate(listOf("user" to "What is the capital of France?"))
            expect("What is the capital of France?" in prompt) { prompt }
        }

        model.newContext(nCtx = 512, nThreads = 1).use { ctx ->
            test("generate 8 greedy tokens, streaming") {
                val pieces = ArrayList<String>()
                val out = ctx.generate("The capital of France is", maxTokens = 8, temperature = 0f) {
                    pieces.add(it)
                    true
                }
                expect(out.text.isNotBlank()) { "empty text" }
                expect(pieces.joinToString("") == out.text) { "pieces ${pieces} vs '${out.text}'" }
                expect(out.generatedTokens in 1..8) { "generated ${out.generatedTokens}" }
                expect(out.stopReason == StopReason.MAX_TOKENS || out.stopReason == StopReason.END_OF_GENERATION) { "${out.stopReason}" }
                val again = ctx.generate("The capital of France is", maxTokens = 8, temperature = 0f)
                expect(again.text == out.text) { "greedy not deterministic: '${again.text}'" }
                println("     generated: ${out.text.trim()}")
            }

            test("chat generate") {
                val out = ctx.generate("Say hello.", chat = true, maxTokens = 8, temperature = 0f)
                expect(out.text.isNotBlank()) { "empty text" }
            }

            test("format json gives a JSON object, a schema its object; an unenforceable schema is INVALID_ARG") {
                val out = ctx.generate("Describe a cat as JSON.", chat = true, maxTokens = 200, temperature = 0f, format = "json")
                val t = out.text.trim()
                expect(t.startsWith("{")) { "not an object: $t" }
                if (out.stopReason == StopReason.END_OF_GENERATION) expect(t.endsWith("}")) { "unclosed: $t" }
                val schema = "{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\"}, " +
                    "\"lives\": {\"type\": \"integer\"}}, \"required\": [\"name\", \"lives\"]}"
                val cat = ctx.generate("Describe a cat as JSON.", chat = true, maxTokens = 200, temperature = 0f, format = schema)
                expect(cat.stopReason == StopReason.END_OF_GENERATION) { "not closed: ${cat.text}" }
                expect(Regex("""^\{\s*"name"\s*:\s*".*"\s*,\s*"lives"\s*:\s*-?\d+\s*}$""", RegexOption.DOT_MATCHES_ALL)
                    .matches(cat.text.trim())) { "not the schema's object: ${cat.text}" }
                try {
                    ctx.generate("x", maxTokens = 4, format = "{\"type\": \"object\", \"properties\": {\"a\": {\"pattern\": \"x\"}}}")
                    throw AssertionError("no exception")
                } catch (e: MeshException) {
                    expect(e.status == MeshStatus.INVALID_ARG) { e.statusName }
                }
            }

            test("callback returning false stops early") {
                var calls = 0
                val out = ctx.generate("Once upon a time", maxTokens = 32, temperature = 0f) { calls++; false }
                expect(calls == 1) { "calls $calls" }
                expect(out.stopReason == StopReason.CALLBACK) { "${out.stopReason}" }
            }

            test("exception in callback is rethrown") {
                try {
                    ctx.generate("Once upon a time", maxTokens = 8, temperature = 0f) { throw IllegalStateException("boom") }
                    throw AssertionError("no exception")
                } catch (e: IllegalStateException) {
                    expect(e.message == "boom") { "${e.message}" }
                }
            }

            test("cancel from the callback") {
                try {
                    ctx.generate("Once upon a time", maxTokens = 32, temperature = 0f) { ctx.cancel(); true }
                    throw AssertionError("no exception")
                } catch (e: CancelledException) {
                    expect(e.text.isNotEmpty()) { "no partial text" }
                }
            }

            test("own sampling loop with eval/logits matches greedy generate") {
                ctx.truncate(0)
                val prompt = model.tokenize("The capital of France is")
                expect(ctx.logits().isEmpty()) { "logits before any eval" }
                ctx.eval(prompt)
                expect(ctx.nPast == prompt.size.toLong()) { "nPast ${ctx.nPast}" }
                val ids = IntArray(8)
                var first = FloatArray(0)
                for (i in ids.indices) {
                    val logits = ctx.logits()
                    expect(logits.size.toLong() == model.nVocab) { "logits size ${logits.size}" }
                    if (i == 0) first = logits
                    ids[i] = logits.indices.maxBy { logits[it] }!!
                    ctx.eval(intArrayOf(ids[i]))
                }
                val g = ctx.generate("The capital of France is", maxTokens = 8, temperature = 0f, ignoreEos = true)
                expect(g.text == model.detokenize(ids)) { "'${g.text}' vs '${model.detokenize(ids)}'" }

                ctx.truncate(0)
                ctx.eval(prompt)
                try {
                    ctx.eval(intArrayOf(1, model.nVocab.toInt()))
                    throw AssertionError("no exception")
                } catch (e: MeshException) {
                    expect(e.status == MeshStatus.INVALID_ARG) { e.statusName }
                }
                expect(ctx.nPast == prompt.size.toLong()) { "a refused eval changed nPast: ${ctx.nPast}" }
                ctx.eval(intArrayOf(ids[0]))
                ctx.truncate(prompt.size.toLong())
                expect(ctx.logits().isEmpty()) { "truncate kept the logits" }
                ctx.truncate(0)
                ctx.eval(prompt, allLogits = true)
                val every = ctx.logits()
                expect(every.size.toLong() == prompt.size * model.nVocab) { "all logits ${every.size}" }
                val last = every.copyOfRange(every.size - model.nVocab.toInt(), every.size)
                expect(last.contentEquals(first)) { "last row differs from the single-token logits" }
            }

            test("eval past nCtx is CONTEXT_OVERFLOW") {
                ctx.truncate(0)
                try {
                    ctx.eval(IntArray(ctx.nCtx.toInt() + 1) { 1 })
                    throw AssertionError("no exception")
                } catch (e: MeshException) {
                    expect(e.status == MeshStatus.CONTEXT_OVERFLOW) { e.statusName }
                }
                expect(ctx.nPast == 0L) { "nPast ${ctx.nPast}" }
            }

            test("LoRA adapter changes the output, clearLora restores it, bad adapters change nothing") {
                val rank = 2L
                val d = model.nEmbd
                val ff = 1536L
                val tensors = (0 until model.nLayers.toInt()).flatMap { layer ->
                    val base = "blk.$layer.ffn_down.weight"
                    val a = FloatArray((ff * rank).toInt()) { i -> ((i.toLong() * 7919) % 13 - 6) / 64f }
                    val b = FloatArray((rank * d).toInt()) { i -> ((i.toLong() * 104729) % 11 - 5) / 64f }
                    listOf(Triple("$base.lora_a", Pair(ff, rank), a), Triple("$base.lora_b", Pair(rank, d), b))
                }
                val dir = java.nio.file.Files.createTempDirectory("mesh-kotlin-lora").toFile()
                try {
                    val adapter = java.io.File(dir, "adapter.gguf")
                    writeAdapter(adapter, tensors)
                    val prompt = "The capital of France is"
                    val base = ctx.generate(prompt, maxTokens = 8, temperature = 0f).text
                    ctx.addLora(adapter.path, 1f)
                    val adapted = ctx.generate(prompt, maxTokens = 8, temperature = 0f).text
                    expect(adapted != base) { "the adapter changed nothing: '$adapted'" }
                    ctx.clearLora()
                    expect(ctx.generate(prompt, maxTokens = 8, temperature = 0f).text == base) { "clearLora" }
                    val other = java.io.File(dir, "qwen2.gguf")
                    writeAdapter(other, tensors, arch = "qwen2")
                    try {
                        ctx.addLora(other.path)
                        throw AssertionError("no exception")
                    } catch (e: MeshException) {
                        expect(e.status == MeshStatus.GGUF) { e.statusName }
                        expect("architecture" in (e.message ?: "")) { "message: ${e.message}" }
                    }
                    try {
                        ctx.addLora(java.io.File(dir, "missing.gguf").path)
                        throw AssertionError("no exception")
                    } catch (e: MeshException) {
                        expect(e.status == MeshStatus.IO) { e.statusName }
                    }
                    expect(ctx.generate(prompt, maxTokens = 8, temperature = 0f).text == base) { "a refused adapter changed the output" }
                } finally {
                    dir.deleteRecursively()
                }
            }

            test("empty prompt is INVALID_ARG") {
                try {
                    ctx.generate("", maxTokens = 4)
                    throw AssertionError("no exception")
                } catch (e: MeshException) {
                    expect(e.status == MeshStatus.INVALID_ARG) { e.statusName }
                }
            }
        }

        nodeTests(model, modelPath)
    }

    println("$passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}

private fun expectStatus(status: Int, body: () -> Unit) {
    try {
        body()
        throw AssertionError("no exception")
    } catch (e: MeshException) {
        expect(e.status == status) { "expected status $status, got ${e.statusName}: ${e.message}" }
    }
}

/** Nodes on loopback: the mesh through the bindings, as the Python node tests. */
private fun nodeTests(model: Model, modelPath: String) {
    val prompt = "The capital of France is"

    test("two nodes: pipeline generation equals local, the plan arrives as an event") {
        val events = java.util.Collections.synchronizedList(ArrayList<String>())
        val split = (model.nLayers / 2).toInt()
        Node(listen = listOf("/ip4/127.0.0.1/tcp/0")).use { a ->
            val aId = a.peerId
            expect(aId.startsWith("12D3KooW")) { aId }
            val addrs = a.listenAddrs
            expect(addrs.isNotEmpty() && addrs.all { it.endsWith("/p2p/$aId") }) { "$addrs" }
            a.serve(model, 0, split)
            Node(bootstrap = listOf(addrs[0]), onEvent = { events.add(it) }).use { b ->
                b.serve(model, split, model.nLayers.toInt())
                val piped = b.generate(model, prompt, Mode.PIPELINE, maxTokens = 16, temperature = 0f, ignoreEos = true)
                val local = b.generate(model, prompt, Mode.LOCAL, maxTokens = 16, temperature = 0f, ignoreEos = true)
                expect(piped.text == local.text && piped.text.isNotEmpty()) { "pipeline '${piped.text}' vs local '${local.text}'" }
                expect(piped.nHops == 2L && piped.failovers == 0L && piped.hopMs > 0) { "$piped" }
                expect(piped.bytesPerToken > 0 && local.nHops == 0L) { "$piped / $local" }
            }
        }
        val plan = synchronized(events) { events.lastOrNull { "\"plan\"" in it } }
        expect(plan != null && "\"layers\":[0,$split]" in plan.replace(" ", "")) { "events: $events" }
    }

    test("private mode across three nodes equals local exact generation") {
        val exact = try {
            Model.load(modelPath, nThreads = 1, exact = true)
        } catch (e: MeshException) {
            expect(e.status == MeshStatus.UNSUPPORTED) { "${e.message}" }
            println("skip private mode: ${e.message}")
            return@test
        }
        exact.use {
            Node(listen = listOf("/ip4/127.0.0.1/tcp/0")).use { a ->
                a.serveHelper(model)
                val boot = a.listenAddrs[0]
                Node(listen = listOf("/ip4/127.0.0.1/tcp/0"), bootstrap = listOf(boot)).use { b ->
                    b.serveHelper(model)
                    Node(bootstrap = listOf(boot), trusted = listOf(a.peerId, b.peerId), privateHelpers = 2).use { c ->
                        val priv = c.generate(exact, prompt, Mode.PRIVATE, maxTokens = 12, temperature = 0f, ignoreEos = true)
                        val local = c.generate(exact, prompt, Mode.LOCAL, maxTokens = 12, temperature = 0f, ignoreEos = true)
                        expect(priv.text == local.text && priv.text.isNotEmpty()) { "private '${priv.text}' vs local '${local.text}'" }
                        expect(priv.nHelpers == 2L && priv.helpersDropped == 0L && priv.bytesPerToken > 1e6) { "$priv" }
                    }
                }
            }
        }
    }

    test("bad addresses, peer ids and a mesh without helpers are typed errors") {
        expectStatus(MeshStatus.INVALID_ARG) { Node(listen = listOf("not a multiaddr")).close() }
        expectStatus(MeshStatus.INVALID_ARG) { Node(trusted = listOf("not a peer id")).close() }
        Node(findTimeoutMs = 300).use { n ->
            expectStatus(MeshStatus.INVALID_ARG) { n.dial("nonsense") }
            expectStatus(MeshStatus.NETWORK) { n.generate(model, "Hi", Mode.PRIVATE, maxTokens = 2) }
            expectStatus(MeshStatus.INVALID_ARG) { n.ledgerStatus() }
        }
        val closed = Node()
        closed.close()
        closed.close()
        try {
            closed.peerId
            throw AssertionError("no exception")
        } catch (e: IllegalStateException) {
        }
    }

    test("a lone validator runs the ledger; bad stake transfers are refused") {
        val dir = createTempDir("mesh-kotlin-ledger")
        try {
            Node(listen = listOf("/ip4/127.0.0.1/tcp/0"), identityPath = java.io.File(dir, "id.key").path).use { n ->
                val genesis = java.io.File(dir, "genesis.json")
                genesis.writeText("{\"chain_id\": \"kt\", \"validators\": [{\"peer_id\": \"${n.peerId}\", \"power\": 2}]}")
                n.ledgerStart(genesis.path, java.io.File(dir, "l.redb").path, java.io.File(dir, "u").path)
                val height = Regex("\"height\":\\s*(\\d+)")
                val deadline = System.currentTimeMillis() + 60_000
                while ((height.find(n.ledgerStatus())?.groupValues?.get(1)?.toLong() ?: 0L) < 2) {
                    expect(System.currentTimeMillis() < deadline) { n.ledgerStatus() }
                    Thread.sleep(100)
                }
                val status = n.ledgerStatus().replace(" ", "")
                expect("\"validator\":true" in status && "\"${n.peerId}\":2" in status) { status }
                expect(n.ledgerAdapter(model) == null) { "an adapter without any update" }
                expectStatus(MeshStatus.INVALID_ARG) { n.ledgerTransfer("not-a-peer", 1) }
                expectStatus(MeshStatus.INVALID_ARG) { n.ledgerTransfer(n.peerId, 1) }
                expectStatus(MeshStatus.INVALID_ARG) { n.ledgerTransfer("12D3KooWHQybjJddHJE61nFuqKGVPSasS2zDmrBAUiCwpXkYFE4m", 3) }
            }
        } finally {
            dir.deleteRecursively()
        }
    }
}
