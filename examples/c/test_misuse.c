/*
 * test_misuse: C tests of the mesh-llm C API used wrongly (and rightly).
 *
 * NULL arguments, free(NULL), wrong struct_size, invalid UTF-8, buffer-too-small
 * semantics, a callback that stops early, re-entrant calls, cancellation from
 * another thread, freed handles (use after free, double free, wrong type), a panic turned into MESH_STATUS_PANIC, and the last error
 * message. Prints "N passed, M failed" and exits non-zero on failure.
 *
 * Model: $MESH_MODEL, else "default" (fetched into the cache on first use).
 * MESH_TEST_LIGHT=1 skips the long generation (cancellation) and keeps every
 * generation to a few tokens: scripts/c-tests.sh sets it under valgrind.
 *
 * Needs the library built with the `test-hooks` feature and compiled with
 * -DMESH_TEST_HOOKS (for mesh_debug_panic); see scripts/c-tests.sh.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mesh.h"
#include "mesh.h" /* twice: the include guard must hold */

static int passed, failed;

static void check(int ok, const char *what, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL line %d: %s\n", line, what);
    }
}

static const char *last_error(void) {
    static char msg[1024];
    size_t n;
    mesh_last_error_message(msg, sizeof msg, &n);
    return msg;
}

static void check_status(mesh_status got, mesh_status want, const char *what, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL line %d: %s: got %s, want %s (last error: %s)\n", line, what,
                mesh_status_str(got), mesh_status_str(want), last_error());
    }
}

#define CHECK(cond) check((cond) ? 1 : 0, #cond, __LINE__)
#define EXPECT(expr, want) check_status((expr), (want), #expr, __LINE__)
#define CONTAINS(hay, needle) check(strstr((hay), (needle)) != NULL, #hay " contains " #needle, __LINE__)

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---------------------------------------------------------------- no model */

static void test_versions(void) {
    CHECK(mesh_abi_version() == MESH_ABI_VERSION);
    CHECK(MESH_VERSION_MAJOR * 10000 + MESH_VERSION_MINOR * 100 + MESH_VERSION_PATCH > 0);
    CHECK(strcmp(mesh_status_str(MESH_STATUS_OK), "MESH_STATUS_OK") == 0);
    CHECK(strcmp(mesh_status_str(MESH_STATUS_PANIC), "MESH_STATUS_PANIC") == 0);
    CHECK(strcmp(mesh_status_str(-7), "MESH_STATUS_UNKNOWN") == 0);
    CHECK(strcmp(mesh_status_str(100000), "MESH_STATUS_UNKNOWN") == 0);
}

static void test_null_args_without_model(void) {
    const mesh_model *model = (const mesh_model *)0x1; /* must stay untouched */
    mesh_context *ctx = (mesh_context *)0x1;
    size_t n = 0;
    char buf[16];
    uint32_t ids[4];
    mesh_chat_message msg = {"user", "hi"};

    EXPECT(mesh_model_load(NULL, NULL, &model), MESH_STATUS_NULL_ARG);
    CHECK(model == (const mesh_model *)0x1);
    CONTAINS(last_error(), "`path_or_default` is NULL");
    EXPECT(mesh_model_load("default", NULL, NULL), MESH_STATUS_NULL_ARG);
    CONTAINS(last_error(), "`out` is NULL");
    EXPECT(mesh_model_retain(NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_architecture(NULL, buf, sizeof buf, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_id(NULL, buf, sizeof buf, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_n_layers(NULL, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_n_ctx_train(NULL, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_n_vocab(NULL, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_n_embd(NULL, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_tokenize(NULL, "hi", true, false, ids, 4, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_detokenize(NULL, ids, 0, false, buf, sizeof buf, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_chat_apply_template(NULL, &msg, 1, true, buf, sizeof buf, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_new(NULL, NULL, &ctx), MESH_STATUS_NULL_ARG);
    CHECK(ctx == (mesh_context *)0x1);
    EXPECT(mesh_context_n_ctx(NULL, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_generate(NULL, "hi", NULL, NULL, NULL, NULL), MESH_STATUS_NULL_ARG);
    CONTAINS(last_error(), "`ctx` is NULL");
    EXPECT(mesh_context_cancel(NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_eval(NULL, ids, 1, false), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_logits(NULL, NULL, 0, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_n_past(NULL, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_truncate(NULL, 0), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_last_error_message(buf, sizeof buf, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_last_error_message(NULL, 5, &n), MESH_STATUS_NULL_ARG);
}

static void test_free_null(void) {
    mesh_model_free(NULL);
    mesh_context_free(NULL);
    CHECK(1); /* reaching here is the test */
}

static void test_struct_size_and_utf8_without_model(void) {
    const mesh_model *model = NULL;
    mesh_model_params p = mesh_model_params_default();
    CHECK(p.struct_size == sizeof(mesh_model_params));
    p.struct_size = sizeof(mesh_model_params) + 8; /* a "newer" caller */
    EXPECT(mesh_model_load("/nonexistent.gguf", &p, &model), MESH_STATUS_STRUCT_SIZE);
    CONTAINS(last_error(), "struct_size");
    p.struct_size = 0;
    EXPECT(mesh_model_load("/nonexistent.gguf", &p, &model), MESH_STATUS_STRUCT_SIZE);
    CHECK(model == NULL);

    EXPECT(mesh_model_load("/tmp/\xff\xfe.gguf", NULL, &model), MESH_STATUS_INVALID_UTF8);
    CONTAINS(last_error(), "not valid UTF-8");
    EXPECT(mesh_model_load("/nonexistent/model.gguf", NULL, &model), MESH_STATUS_IO);
    CONTAINS(last_error(), "/nonexistent/model.gguf");

    char path[] = "/tmp/mesh-misuse-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd >= 0) {
        const char junk[] = "GGUF\x03\x00\x00\x00 this is not a model";
        CHECK(write(fd, junk, sizeof junk) == (ssize_t)sizeof junk);
        close(fd);
        EXPECT(mesh_model_load(path, NULL, &model), MESH_STATUS_GGUF);
        unlink(path);
    }
    CHECK(model == NULL);
}

static void test_last_error_message(void) {
    size_t n = 0;
    EXPECT(mesh_model_n_layers(NULL, &n), MESH_STATUS_NULL_ARG);
    char full[256];
    EXPECT(mesh_last_error_message(full, sizeof full, &n), MESH_STATUS_OK);
    CHECK(n == strlen(full));
    CHECK(strcmp(full, "`model` is NULL") == 0);

    /* Size query: the size needed, NUL included. */
    size_t needed = 0;
    EXPECT(mesh_last_error_message(NULL, 0, &needed), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(needed == strlen(full) + 1);
    /* Too small: cut, still NUL-terminated, status says so. */
    char small[6];
    memset(small, 'x', sizeof small);
    EXPECT(mesh_last_error_message(small, sizeof small, &n), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(n == needed);
    CHECK(memcmp(small, "`mode", 5) == 0 && small[5] == '\0');
    /* None of that changed the message. */
    EXPECT(mesh_last_error_message(full, sizeof full, &n), MESH_STATUS_OK);
    CHECK(strcmp(full, "`model` is NULL") == 0);
    /* Successful calls do not clear it. */
    (void)mesh_abi_version();
    mesh_model_params p = mesh_model_params_default();
    (void)p;
    CHECK(strcmp(last_error(), "`model` is NULL") == 0);
}

static void *other_thread_error(void *arg) {
    char *out = arg;
    size_t n;
    mesh_last_error_message(out, 64, &n);
    return NULL;
}

static void test_last_error_is_per_thread(void) {
    size_t n;
    EXPECT(mesh_context_n_ctx(NULL, &n), MESH_STATUS_NULL_ARG);
    char theirs[64] = "unset";
    pthread_t t;
    CHECK(pthread_create(&t, NULL, other_thread_error, theirs) == 0);
    pthread_join(t, NULL);
    CHECK(theirs[0] == '\0'); /* a new thread has no error yet */
    CONTAINS(last_error(), "`ctx` is NULL");
}

static void test_panic(void) {
    EXPECT(mesh_debug_panic(), MESH_STATUS_PANIC);
    CONTAINS(last_error(), "mesh_debug_panic was called");
    /* The library keeps working after a caught panic. */
    size_t n;
    EXPECT(mesh_model_n_layers(NULL, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_debug_panic(), MESH_STATUS_PANIC);
}

static atomic_int log_calls;

static bool on_log(void *userdata, mesh_log_level level, const char *target, const char *message) {
    (void)userdata;
    (void)level;
    (void)target;
    (void)message;
    atomic_fetch_add(&log_calls, 1);
    return true;
}

static void test_log(void) {
    EXPECT(mesh_log_set(on_log, NULL, 42), MESH_STATUS_INVALID_ARG);
    EXPECT(mesh_log_set(on_log, NULL, -1), MESH_STATUS_INVALID_ARG);
    EXPECT(mesh_log_set(on_log, NULL, MESH_LOG_WARN), MESH_STATUS_OK);
    EXPECT(mesh_log_set(NULL, NULL, MESH_LOG_OFF), MESH_STATUS_OK);
}

/* ------------------------------------------------------------- with model */

static int light; /* MESH_TEST_LIGHT: few tokens, no long generation */

static void test_model_getters(const mesh_model *model) {
    size_t n = 0, layers = 0, vocab = 0, ctx_train = 0, embd = 0;
    EXPECT(mesh_model_n_layers(model, &layers), MESH_STATUS_OK);
    EXPECT(mesh_model_n_vocab(model, &vocab), MESH_STATUS_OK);
    EXPECT(mesh_model_n_ctx_train(model, &ctx_train), MESH_STATUS_OK);
    EXPECT(mesh_model_n_embd(model, &embd), MESH_STATUS_OK);
    CHECK(layers > 0 && vocab > 0 && ctx_train > 0 && embd > 0);

    /* NULL out-parameters with a valid model. */
    EXPECT(mesh_model_n_layers(model, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_n_vocab(model, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_n_ctx_train(model, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_n_embd(model, NULL), MESH_STATUS_NULL_ARG);
    char arch[32];
    EXPECT(mesh_model_architecture(model, arch, sizeof arch, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_model_architecture(model, NULL, sizeof arch, &n), MESH_STATUS_NULL_ARG);

    EXPECT(mesh_model_architecture(model, arch, sizeof arch, &n), MESH_STATUS_OK);
    CHECK(n == strlen(arch) && n > 0);
    /* Buffer too small: nothing written, *n_out = size needed with the NUL. */
    char tiny[2] = {'x', 'x'};
    size_t needed = 0;
    EXPECT(mesh_model_architecture(model, tiny, sizeof tiny, &needed), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(needed == strlen(arch) + 1);
    CHECK(tiny[0] == 'x' && tiny[1] == 'x');
    EXPECT(mesh_model_architecture(model, NULL, 0, &needed), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(needed == strlen(arch) + 1);
    /* Exactly enough. */
    char exact[32];
    EXPECT(mesh_model_architecture(model, exact, needed, &n), MESH_STATUS_OK);
    CHECK(strcmp(exact, arch) == 0);

    char id[65];
    EXPECT(mesh_model_id(model, id, sizeof id, &n), MESH_STATUS_OK);
    CHECK(n == 64 && strlen(id) == 64 && strspn(id, "0123456789abcdef") == 64);
    EXPECT(mesh_model_id(model, id, 64, &n), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(n == 65);
}

static void test_refcount(const mesh_model *model) {
    EXPECT(mesh_model_retain(model), MESH_STATUS_OK);
    mesh_model_free(model); /* drops the extra reference only */
    size_t n = 0;
    EXPECT(mesh_model_n_layers(model, &n), MESH_STATUS_OK);
    CHECK(n > 0);
}

static void test_tokenize(const mesh_model *model) {
    const char *text = "Hello world, this is mesh.";
    size_t needed = 0, n = 0;
    EXPECT(mesh_tokenize(model, text, false, false, NULL, 0, &needed), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(needed > 2);
    uint32_t *ids = malloc((needed + 1) * sizeof *ids);
    for (size_t i = 0; i <= needed; i++) ids[i] = 0xdeadbeef;
    EXPECT(mesh_tokenize(model, text, false, false, ids, needed - 1, &n), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(n == needed);
    CHECK(ids[0] == 0xdeadbeef); /* untouched */
    EXPECT(mesh_tokenize(model, text, false, false, ids, needed + 1, &n), MESH_STATUS_OK);
    CHECK(n == needed);
    CHECK(ids[needed] == 0xdeadbeef); /* nothing past the count */

    /* Round trip. */
    char buf[128];
    size_t len = 0;
    EXPECT(mesh_detokenize(model, ids, n, false, buf, sizeof buf, &len), MESH_STATUS_OK);
    CHECK(len == strlen(text) && strcmp(buf, text) == 0);
    size_t need_text = 0;
    EXPECT(mesh_detokenize(model, ids, n, false, NULL, 0, &need_text), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(need_text == strlen(text) + 1);
    EXPECT(mesh_detokenize(model, ids, n, false, buf, strlen(text), &len), MESH_STATUS_BUFFER_TOO_SMALL);
    EXPECT(mesh_detokenize(model, NULL, 0, false, buf, sizeof buf, &len), MESH_STATUS_OK);
    CHECK(len == 0 && buf[0] == '\0');
    EXPECT(mesh_detokenize(model, NULL, 3, false, buf, sizeof buf, &len), MESH_STATUS_NULL_ARG);

    /* Ids outside the vocabulary are an error, not a crash. */
    size_t vocab = 0;
    mesh_model_n_vocab(model, &vocab);
    uint32_t bad[2] = {ids[0], (uint32_t)vocab + 7};
    mesh_status st = mesh_detokenize(model, bad, 2, false, buf, sizeof buf, &len);
    CHECK(st == MESH_STATUS_TOKENIZER || st == MESH_STATUS_INVALID_ARG);
    free(ids);

    /* Misuse. */
    EXPECT(mesh_tokenize(model, NULL, true, false, NULL, 0, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_tokenize(model, "abc", true, false, NULL, 4, &n), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_tokenize(model, "abc", true, false, NULL, 0, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_tokenize(model, "ab\xc3\x28", true, false, NULL, 0, &n), MESH_STATUS_INVALID_UTF8);
    CONTAINS(last_error(), "`text` is not valid UTF-8");
    /* An empty text is zero tokens (or just BOS), not an error. */
    st = mesh_tokenize(model, "", false, false, NULL, 0, &n);
    CHECK(st == MESH_STATUS_OK || st == MESH_STATUS_BUFFER_TOO_SMALL);
}

static void test_chat_template(const mesh_model *model) {
    mesh_chat_message msgs[2] = {{"system", "Be brief."}, {"user", "What is 2+2?"}};
    size_t needed = 0, n = 0;
    EXPECT(mesh_chat_apply_template(model, msgs, 2, true, NULL, 0, &needed), MESH_STATUS_BUFFER_TOO_SMALL);
    char *text = malloc(needed);
    EXPECT(mesh_chat_apply_template(model, msgs, 2, true, text, needed, &n), MESH_STATUS_OK);
    CHECK(n + 1 == needed && strlen(text) == n);
    CONTAINS(text, "What is 2+2?");
    CONTAINS(text, "Be brief.");
    free(text);

    char buf[64];
    mesh_chat_message bad_null[1] = {{"user", NULL}};
    EXPECT(mesh_chat_apply_template(model, bad_null, 1, true, buf, sizeof buf, &n), MESH_STATUS_NULL_ARG);
    CONTAINS(last_error(), "messages[0].content");
    mesh_chat_message bad_role[2] = {{"user", "ok"}, {NULL, "x"}};
    EXPECT(mesh_chat_apply_template(model, bad_role, 2, true, buf, sizeof buf, &n), MESH_STATUS_NULL_ARG);
    CONTAINS(last_error(), "messages[1].role");
    mesh_chat_message bad_utf8[1] = {{"user", "caf\xe9"}};
    EXPECT(mesh_chat_apply_template(model, bad_utf8, 1, true, buf, sizeof buf, &n), MESH_STATUS_INVALID_UTF8);
    EXPECT(mesh_chat_apply_template(model, NULL, 2, true, buf, sizeof buf, &n), MESH_STATUS_NULL_ARG);
    mesh_status st = mesh_chat_apply_template(model, NULL, 0, false, buf, sizeof buf, &n);
    CHECK(st == MESH_STATUS_OK || st == MESH_STATUS_BUFFER_TOO_SMALL || st == MESH_STATUS_TEMPLATE);
}

/* Collects streamed pieces; can stop after a number of them. */
typedef struct {
    char text[8192];
    size_t len;
    atomic_int pieces;
    int stop_after;               /* 0 = never */
    mesh_context *ctx;            /* for re-entrant calls */
    mesh_status reentrant_status; /* mesh_generate from inside the callback */
    int cancel_inside;
} sink;

static bool on_piece(void *userdata, const char *piece, size_t len) {
    sink *s = userdata;
    if (piece[len] != '\0') return false; /* NUL-terminated by contract */
    if (s->len + len < sizeof s->text) {
        memcpy(s->text + s->len, piece, len);
        s->len += len;
        s->text[s->len] = '\0';
    }
    int n = atomic_fetch_add(&s->pieces, 1) + 1;
    if (s->ctx && n == 1) {
        s->reentrant_status = mesh_generate(s->ctx, "again", NULL, NULL, NULL, NULL);
    }
    if (s->cancel_inside && n == 2) {
        mesh_context_cancel(s->ctx);
    }
    return s->stop_after == 0 || n < s->stop_after;
}

static sink *new_sink(void) {
    return calloc(1, sizeof(sink));
}

static mesh_generate_stats new_stats(void) {
    mesh_generate_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    return st;
}

static void test_context_misuse(const mesh_model *model) {
    mesh_context *ctx = NULL;
    mesh_context_params cp = mesh_context_params_default();
    CHECK(cp.struct_size == sizeof cp && cp.n_ctx > 0);
    cp.struct_size = 4;
    EXPECT(mesh_context_new(model, &cp, &ctx), MESH_STATUS_STRUCT_SIZE);
    CHECK(ctx == NULL);
    cp = mesh_context_params_default();
    EXPECT(mesh_context_new(model, &cp, NULL), MESH_STATUS_NULL_ARG);
    cp.n_ctx = 128;
    EXPECT(mesh_context_new(model, &cp, &ctx), MESH_STATUS_OK);
    size_t n = 0;
    EXPECT(mesh_context_n_ctx(ctx, &n), MESH_STATUS_OK);
    CHECK(n == 128);
    EXPECT(mesh_context_n_ctx(ctx, NULL), MESH_STATUS_NULL_ARG);

    mesh_generate_params gp = mesh_generate_params_default();
    CHECK(gp.struct_size == sizeof gp);
    gp.max_tokens = 1;
    EXPECT(mesh_generate(ctx, NULL, &gp, NULL, NULL, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_generate(ctx, "caf\xc3", &gp, NULL, NULL, NULL), MESH_STATUS_INVALID_UTF8);
    CONTAINS(last_error(), "`prompt` is not valid UTF-8");
    gp.struct_size = sizeof gp - 1;
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, NULL), MESH_STATUS_STRUCT_SIZE);
    gp.struct_size = sizeof gp + 64;
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, NULL), MESH_STATUS_STRUCT_SIZE);
    gp = mesh_generate_params_default();
    gp.max_tokens = 1;
    mesh_generate_stats stats = new_stats();
    stats.struct_size = 8;
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, &stats), MESH_STATUS_STRUCT_SIZE);
    gp.temperature = NAN;
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, NULL), MESH_STATUS_INVALID_ARG);
    CONTAINS(last_error(), "temperature");
    gp = mesh_generate_params_default();
    gp.top_p = 2.0f;
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, NULL), MESH_STATUS_INVALID_ARG);
    /* A prompt longer than the context. */
    gp = mesh_generate_params_default();
    gp.max_tokens = 1;
    char long_prompt[4096];
    for (size_t i = 0; i < sizeof long_prompt; i++) long_prompt[i] = "hello "[i % 6];
    long_prompt[sizeof long_prompt - 1] = '\0';
    EXPECT(mesh_generate(ctx, long_prompt, &gp, NULL, NULL, NULL), MESH_STATUS_CONTEXT_OVERFLOW);

    /* A host's own loop: eval, logits, n_past, truncate; misuse changes nothing. */
    uint32_t toks[4] = {1, 2, 3, 4};
    size_t vocab = 0, got = 0, past = 99;
    EXPECT(mesh_model_n_vocab(model, &vocab), MESH_STATUS_OK);
    EXPECT(mesh_context_truncate(ctx, 0), MESH_STATUS_OK); /* generate left positions */
    EXPECT(mesh_context_eval(ctx, toks, 4, false), MESH_STATUS_OK);
    EXPECT(mesh_context_n_past(ctx, &past), MESH_STATUS_OK);
    CHECK(past == 4);
    EXPECT(mesh_context_logits(ctx, NULL, 0, &got), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(got == vocab);
    float *logits = malloc(vocab * sizeof *logits);
    CHECK(logits != NULL);
    EXPECT(mesh_context_logits(ctx, logits, vocab, &got), MESH_STATUS_OK);
    EXPECT(mesh_context_logits(ctx, logits, vocab, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_logits(ctx, NULL, vocab, &got), MESH_STATUS_NULL_ARG);
    free(logits);
    EXPECT(mesh_context_eval(ctx, NULL, 2, false), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_eval(ctx, toks, 0, false), MESH_STATUS_INVALID_ARG);
    toks[1] = (uint32_t)vocab;
    EXPECT(mesh_context_eval(ctx, toks, 4, true), MESH_STATUS_INVALID_ARG);
    CONTAINS(last_error(), "vocabulary");
    EXPECT(mesh_context_n_past(ctx, &past), MESH_STATUS_OK);
    CHECK(past == 4);
    EXPECT(mesh_context_n_past(ctx, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_context_truncate(ctx, 0), MESH_STATUS_OK);
    EXPECT(mesh_context_n_past(ctx, &past), MESH_STATUS_OK);
    CHECK(past == 0);
    EXPECT(mesh_context_logits(ctx, NULL, 0, &got), MESH_STATUS_OK);
    CHECK(got == 0);

    /* Cancel with nothing running: no effect on the next generation. */
    EXPECT(mesh_context_cancel(ctx), MESH_STATUS_OK);
    stats = new_stats();
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, &stats), MESH_STATUS_OK);
    CHECK(stats.generated_tokens <= 1 && stats.prompt_tokens > 0);

    mesh_context_free(ctx);
}

/* Handles are tagged: a freed handle, a double free and a handle of another
   type are MESH_STATUS_INVALID_HANDLE (or, for _free, a recorded message),
   never a read of freed memory (ASan and valgrind run this too). */
static void test_freed_handles(const mesh_model *model) {
    mesh_context *ctx = NULL;
    mesh_context_params cp = mesh_context_params_default();
    cp.n_ctx = 32;
    EXPECT(mesh_context_new(model, &cp, &ctx), MESH_STATUS_OK);
    if (!ctx) return;
    size_t n = 0;
    EXPECT(mesh_model_n_layers((const mesh_model *)(const void *)ctx, &n),
           MESH_STATUS_INVALID_HANDLE);
    CONTAINS(last_error(), "is a mesh_context, not a mesh_model");
    mesh_context_free(ctx);
    EXPECT(mesh_context_n_past(ctx, &n), MESH_STATUS_INVALID_HANDLE);
    CONTAINS(last_error(), "not a live mesh_context");
    EXPECT(mesh_context_cancel(ctx), MESH_STATUS_INVALID_HANDLE);
    mesh_context_free(ctx); /* a double free: reported, nothing freed */
    CONTAINS(last_error(), "freed already");
    EXPECT(mesh_model_n_layers(model, &n), MESH_STATUS_OK); /* the model is untouched */
}

/* Consumes the caller's reference: the context keeps the model alive. */
static void test_context_outlives_model(const mesh_model *model) {
    mesh_context *ctx = NULL;
    mesh_context_params cp = mesh_context_params_default();
    cp.n_ctx = 64;
    EXPECT(mesh_context_new(model, &cp, &ctx), MESH_STATUS_OK);
    mesh_model_free(model); /* the last reference outside the context */
    if (!ctx) return;
    size_t n_layers = 0;
    /* C owns no reference any more: the handle is dead to C, the context lives on. */
    EXPECT(mesh_model_n_layers(model, &n_layers), MESH_STATUS_INVALID_HANDLE);
    mesh_generate_params gp = mesh_generate_params_default();
    gp.max_tokens = 1;
    mesh_generate_stats stats = new_stats();
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, &stats), MESH_STATUS_OK);
    CHECK(stats.prompt_tokens > 0);
    mesh_context_free(ctx); /* unloads the model */
}

static void test_generate(const mesh_model *model) {
    mesh_context *ctx = NULL;
    mesh_context_params cp = mesh_context_params_default();
    cp.n_ctx = 256;
    EXPECT(mesh_context_new(model, &cp, &ctx), MESH_STATUS_OK);
    if (!ctx) return;

    mesh_generate_params gp = mesh_generate_params_default();
    /* Light mode: a plain prompt of a few tokens (the chat template adds a
       system prompt of ~30 tokens, which costs a minute under valgrind). */
    gp.chat = !light;
    gp.temperature = 0.0f;
    gp.max_tokens = light ? 3 : 12;
    gp.ignore_eos = true;
    sink *s = new_sink();
    mesh_generate_stats stats = new_stats();
    EXPECT(mesh_generate(ctx, "Name a colour.", &gp, on_piece, s, &stats), MESH_STATUS_OK);
    CHECK(stats.struct_size == sizeof stats);
    CHECK(stats.generated_tokens == gp.max_tokens);
    CHECK(stats.stop_reason == MESH_STOP_REASON_MAX_TOKENS);
    CHECK(stats.prompt_tokens >= 3 && stats.prompt_ms >= 0 && stats.generate_ms >= 0);
    CHECK(s->len > 0 && atomic_load(&s->pieces) > 0);

    /* Same settings, same text: every call starts from an empty cache. */
    sink *again = new_sink();
    EXPECT(mesh_generate(ctx, "Name a colour.", &gp, on_piece, again, NULL), MESH_STATUS_OK);
    CHECK(strcmp(s->text, again->text) == 0);
    free(again);
    free(s);

    /* A callback that stops after 3 pieces. */
    s = new_sink();
    s->stop_after = 3;
    gp.max_tokens = light ? 5 : 40;
    stats = new_stats();
    EXPECT(mesh_generate(ctx, "Count from one to twenty.", &gp, on_piece, s, &stats), MESH_STATUS_OK);
    CHECK(atomic_load(&s->pieces) == 3);
    CHECK(stats.stop_reason == MESH_STOP_REASON_CALLBACK);
    CHECK(stats.generated_tokens >= 3 && stats.generated_tokens < gp.max_tokens);
    free(s);

    /* Re-entrancy: mesh_generate on the same context from its own callback is
       BUSY; mesh_context_cancel from the callback stops the generation. */
    s = new_sink();
    s->ctx = ctx;
    s->cancel_inside = 1;
    gp.max_tokens = light ? 4 : 20;
    stats = new_stats();
    stats.prompt_tokens = 12345;
    EXPECT(mesh_generate(ctx, "Say something.", &gp, on_piece, s, &stats), MESH_STATUS_CANCELLED);
    EXPECT(s->reentrant_status, MESH_STATUS_BUSY);
    CHECK(atomic_load(&s->pieces) >= 2 && (size_t)atomic_load(&s->pieces) < gp.max_tokens);
    CHECK(stats.prompt_tokens == 12345); /* not written on failure */
    free(s);

    /* NULL callback: generation still runs. */
    gp.max_tokens = 2;
    stats = new_stats();
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, &stats), MESH_STATUS_OK);
    CHECK(stats.generated_tokens == 2);

    mesh_context_free(ctx);
}

typedef struct {
    mesh_context *ctx;
    sink *s;
    int waited_ms;
    mesh_status cancel_status;
} canceller;

static void *cancel_when_streaming(void *arg) {
    canceller *c = arg;
    while (atomic_load(&c->s->pieces) < 2 && c->waited_ms < 120000) {
        sleep_ms(5);
        c->waited_ms += 5;
    }
    c->cancel_status = mesh_context_cancel(c->ctx);
    return NULL;
}

static void test_cancel_from_another_thread(const mesh_model *model) {
    mesh_context *ctx = NULL;
    mesh_context_params cp = mesh_context_params_default();
    cp.n_ctx = 1024;
    EXPECT(mesh_context_new(model, &cp, &ctx), MESH_STATUS_OK);
    if (!ctx) return;
    mesh_generate_params gp = mesh_generate_params_default();
    gp.chat = true;
    gp.ignore_eos = true;
    gp.max_tokens = 900; /* far more than the canceller lets it produce */
    sink *s = new_sink();
    canceller c = {ctx, s, 0, MESH_STATUS_INTERNAL};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, cancel_when_streaming, &c) == 0);
    mesh_generate_stats stats = new_stats();
    mesh_status st = mesh_generate(ctx, "Tell me a very long story.", &gp, on_piece, s, &stats);
    pthread_join(t, NULL);
    EXPECT(st, MESH_STATUS_CANCELLED);
    EXPECT(c.cancel_status, MESH_STATUS_OK);
    CHECK(atomic_load(&s->pieces) >= 2 && atomic_load(&s->pieces) < 900);
    CONTAINS(last_error(), "cancelled");

    /* The context is usable again, and the cancel does not linger. */
    gp.max_tokens = 2;
    EXPECT(mesh_generate(ctx, "Hi", &gp, NULL, NULL, NULL), MESH_STATUS_OK);
    free(s);
    mesh_context_free(ctx);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Run one test call, printing it and its time to stderr. */
#define RUN(call)                                                                \
    do {                                                                         \
        double t0_ = now_ms();                                                   \
        int failed0_ = failed;                                                   \
        call;                                                                    \
        fprintf(stderr, "%-40s %8.0f ms%s\n", #call, now_ms() - t0_,            \
                failed == failed0_ ? "" : "  FAILED");                           \
    } while (0)


/* ----------------------------------------------------------------- nodes */

static void test_node_misuse_without_model(void) {
    mesh_node *node = (mesh_node *)0x1;
    EXPECT(mesh_node_open(NULL, NULL), MESH_STATUS_NULL_ARG);
    mesh_node_params np = mesh_node_params_default();
    CHECK(np.struct_size == sizeof(mesh_node_params));
    CHECK(np.n_listen == 0 && np.listen == NULL && np.identity_path == NULL);
    np.struct_size = 3;
    EXPECT(mesh_node_open(&np, &node), MESH_STATUS_STRUCT_SIZE);
    CHECK(node == (mesh_node *)0x1);
    np = mesh_node_params_default();
    const char *bad[] = {"not a multiaddr"};
    np.listen = bad;
    np.n_listen = 1;
    EXPECT(mesh_node_open(&np, &node), MESH_STATUS_INVALID_ARG);
    CONTAINS(last_error(), "params->listen[0]");
    CHECK(node == (mesh_node *)0x1);
    np.listen = NULL; /* n_listen 1 with a NULL array */
    EXPECT(mesh_node_open(&np, &node), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_dial(NULL, "/ip4/127.0.0.1/tcp/1"), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_cancel(NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_serve(NULL, NULL, 0, 0), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_generate(NULL, NULL, "x", NULL, MESH_MODE_LOCAL, NULL, NULL, NULL),
           MESH_STATUS_NULL_ARG);
    char lbuf[64];
    size_t ln = 0;
    EXPECT(mesh_node_ledger_start(NULL, "g.json", NULL, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_ledger_status(NULL, lbuf, sizeof lbuf, &ln), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_ledger_adapter(NULL, NULL, lbuf, sizeof lbuf, &ln), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_ledger_transfer(NULL, "x", 1), MESH_STATUS_NULL_ARG);
    mesh_node_free(NULL);
}

static void test_node_misuse(const mesh_model *model) {
    mesh_node_params np = mesh_node_params_default();
    const char *listen[] = {"/ip4/127.0.0.1/tcp/0"};
    np.listen = listen;
    np.n_listen = 1;
    np.find_timeout_ms = 300;
    mesh_node *node = NULL;
    /* Private mode: one helper is not enough; a trusted id that is not one. */
    np.private_helpers = 1;
    EXPECT(mesh_node_open(&np, &node), MESH_STATUS_OK);
    if (node) {
        mesh_generate_params gp1 = mesh_generate_params_default();
        gp1.max_tokens = 2;
        EXPECT(mesh_node_generate(node, model, "Hi", &gp1, MESH_MODE_PRIVATE, NULL, NULL, NULL),
               MESH_STATUS_INVALID_ARG);
        mesh_node_free(node);
        node = NULL;
    }
    np.private_helpers = 0;
    const char *bad_trust[] = {"not a peer id"};
    np.trusted = bad_trust;
    np.n_trusted = 1;
    EXPECT(mesh_node_open(&np, &node), MESH_STATUS_INVALID_ARG);
    np.n_trusted = 0;
    np.trusted = NULL;
    EXPECT(mesh_node_open(&np, &node), MESH_STATUS_OK);
    if (!node) return;
    char buf[512];
    size_t n = 0;
    EXPECT(mesh_node_peer_id(node, buf, 4, &n), MESH_STATUS_BUFFER_TOO_SMALL);
    CHECK(n > 4);
    EXPECT(mesh_node_peer_id(node, buf, sizeof buf, &n), MESH_STATUS_OK);
    CHECK(strncmp(buf, "12D3KooW", 8) == 0 && n == strlen(buf));
    EXPECT(mesh_node_listen_addrs(node, buf, sizeof buf, &n), MESH_STATUS_OK);
    CONTAINS(buf, "/ip4/127.0.0.1/tcp/");
    CONTAINS(buf, "/p2p/12D3KooW");
    EXPECT(mesh_node_dial(node, "nonsense"), MESH_STATUS_INVALID_ARG);
    /* The ledger: none runs yet; a genesis that is missing, or not one. */
    EXPECT(mesh_node_ledger_status(node, buf, sizeof buf, &n), MESH_STATUS_INVALID_ARG);
    CONTAINS(last_error(), "no ledger");
    EXPECT(mesh_node_ledger_adapter(node, model, buf, sizeof buf, &n), MESH_STATUS_INVALID_ARG);
    EXPECT(mesh_node_ledger_transfer(node, NULL, 1), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_ledger_transfer(node, "not a peer id", 1), MESH_STATUS_INVALID_ARG);
    EXPECT(mesh_node_ledger_start(node, NULL, NULL, NULL), MESH_STATUS_NULL_ARG);
    EXPECT(mesh_node_ledger_start(node, "/nonexistent/genesis.json", NULL, NULL), MESH_STATUS_IO);
    EXPECT(mesh_node_ledger_start(node, "/dev/null", NULL, NULL), MESH_STATUS_INVALID_ARG);
    /* Layer ranges: empty, past the model. */
    EXPECT(mesh_node_serve(node, model, 5, 5), MESH_STATUS_INVALID_ARG);
    EXPECT(mesh_node_serve(node, model, 0, 10000), MESH_STATUS_INVALID_ARG);
    /* Modes: unknown; private without any helper on the mesh. */
    mesh_generate_params gp = mesh_generate_params_default();
    gp.max_tokens = 2;
    EXPECT(mesh_node_generate(node, model, "Hi", &gp, 7, NULL, NULL, NULL), MESH_STATUS_INVALID_ARG);
    EXPECT(mesh_node_generate(node, model, "Hi", &gp, MESH_MODE_PRIVATE, NULL, NULL, NULL),
           MESH_STATUS_NETWORK);
    CONTAINS(last_error(), "needs 2 helpers");
    EXPECT(mesh_node_serve_helper(NULL, model), MESH_STATUS_NULL_ARG);
    mesh_node_generate_stats stats;
    stats.struct_size = 1;
    EXPECT(mesh_node_generate(node, model, "Hi", &gp, MESH_MODE_LOCAL, NULL, NULL, &stats),
           MESH_STATUS_STRUCT_SIZE);
    stats.struct_size = sizeof stats;
    EXPECT(mesh_node_generate(node, model, "Hi", &gp, MESH_MODE_LOCAL, NULL, NULL, &stats),
           MESH_STATUS_OK);
    CHECK(stats.generated_tokens <= 2 && stats.n_hops == 0);
    mesh_node_free(node);
}

int main(void) {
    const char *light_env = getenv("MESH_TEST_LIGHT");
    light = light_env && light_env[0] && strcmp(light_env, "0") != 0;

    RUN(test_versions());
    RUN(test_null_args_without_model());
    RUN(test_free_null());
    RUN(test_struct_size_and_utf8_without_model());
    RUN(test_last_error_message());
    RUN(test_last_error_is_per_thread());
    RUN(test_panic());
    RUN(test_log());
    RUN(test_node_misuse_without_model());

    const char *spec = getenv("MESH_MODEL");
    if (!spec || !spec[0]) spec = "default";
    const mesh_model *model = NULL;
    mesh_model_params mp = mesh_model_params_default();
    /* One compute thread: ggml's workers spin while they wait for each other,
       which on a busy machine (or under valgrind) costs more than it gains. */
    mp.n_threads = 1;
    mesh_status st = mesh_model_load(spec, &mp, &model);
    EXPECT(st, MESH_STATUS_OK);
    if (st == MESH_STATUS_OK) {
        RUN(test_model_getters(model));
        RUN(test_refcount(model));
        RUN(test_tokenize(model));
        RUN(test_chat_template(model));
        RUN(test_context_misuse(model));
        RUN(test_freed_handles(model));
        RUN(test_generate(model));
        if (!light) {
            RUN(test_cancel_from_another_thread(model));
        }
        if (!light) {
            RUN(test_node_misuse(model));
        }
        /* Last: it gives up this function's reference to the model. */
        RUN(test_context_outlives_model(model));
    }

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
