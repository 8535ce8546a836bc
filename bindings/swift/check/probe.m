/* check.sh: imports CMesh as a Clang module (as Swift's `import CMesh` does)
 * and uses, in C, every declaration Sources/MeshLLM/MeshLLM.swift uses, with
 * the types the Swift code assumes. Syntax-checked only. */
@import CMesh;

static bool on_piece(void *userdata, const char *piece, size_t len) {
    (void)userdata; (void)piece; (void)len;
    return true;
}

int probe(void);
int probe(void) {
    char buf[64];
    size_t n = 0;
    int32_t st = mesh_last_error_message(buf, sizeof buf, &n);
    const char *name = mesh_status_str(st);
    uint32_t abi = mesh_abi_version();

    struct mesh_model_params mp = mesh_model_params_default();
    mp.n_threads = (size_t)1;
    const struct mesh_model *model = NULL;
    st = mesh_model_load("default", &mp, &model);
    st = mesh_model_architecture(model, buf, sizeof buf, &n);
    st = mesh_model_id(model, buf, sizeof buf, &n);
    size_t v = 0;
    st = mesh_model_n_layers(model, &v);
    st = mesh_model_n_ctx_train(model, &v);
    st = mesh_model_n_vocab(model, &v);
    st = mesh_model_n_embd(model, &v);
    uint32_t ids[8];
    st = mesh_tokenize(model, "hi", true, false, ids, 8, &n);
    st = mesh_detokenize(model, ids, n, false, buf, sizeof buf, &n);
    struct mesh_chat_message msg = {.role = "user", .content = "hi"};
    st = mesh_chat_apply_template(model, &msg, 1, true, buf, sizeof buf, &n);

    struct mesh_context_params cp = mesh_context_params_default();
    cp.n_ctx = (size_t)512;
    cp.n_threads = (size_t)1;
    struct mesh_context *ctx = NULL;
    st = mesh_context_new(model, &cp, &ctx);
    st = mesh_context_n_ctx(ctx, &v);

    struct mesh_generate_params gp = mesh_generate_params_default();
    gp.chat = true;
    gp.raw = false;
    gp.format = "json";
    gp.ignore_eos = false;
    gp.max_tokens = (size_t)8;
    gp.temperature = 0.0f;
    gp.seed = (uint64_t)0;
    gp.top_k = (size_t)40;
    gp.top_p = 0.95f;
    gp.min_p = 0.05f;
    gp.repeat_penalty = 1.0f;
    gp.repeat_last_n = (size_t)64;
    struct mesh_generate_stats stats = {0};
    stats.struct_size = sizeof stats;
    mesh_token_callback cb = on_piece;
    st = mesh_generate(ctx, "hi", &gp, cb, NULL, &stats);
    size_t counts = stats.prompt_tokens + stats.generated_tokens;
    double ms = stats.prompt_ms + stats.generate_ms;
    int32_t reason = stats.stop_reason;
    st = mesh_context_add_lora(ctx, "adapter.gguf", 1.0f);
    st = mesh_context_clear_lora(ctx);
    float logits[4];
    st = mesh_context_eval(ctx, ids, n, false);
    st = mesh_context_logits(ctx, logits, 4, &n);
    st = mesh_context_n_past(ctx, &v);
    st = mesh_context_truncate(ctx, v);
    st = mesh_context_cancel(ctx);
    mesh_context_free(ctx);
    mesh_model_free(model);
    return (int)st + (int)abi + (int)counts + (int)ms + reason + (name != NULL);
}
