/*
 * mesh-chat: a terminal chat over the mesh-llm C API.
 *
 *   mesh-chat MODEL [MAX_TOKENS]
 *
 * MODEL is a .gguf path or "default" (SmolLM2-135M-Instruct, fetched once).
 * Each line read from stdin is a user turn; the answer is streamed to stdout
 * as it is generated, followed by an empty line. The conversation is kept and
 * rendered with the model's chat template each turn; when it no longer fits in
 * the context, it starts over from the current question.
 *
 * Build (see scripts/c-tests.sh):
 *   cargo build -p mesh-ffi
 *   cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude examples/c/mesh-chat.c \
 *      $CARGO_TARGET_DIR/debug/libmesh_ffi.a -lstdc++ -lpthread -ldl -lm -lrt -lutil -lgcc_s \
 *      -o mesh-chat
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mesh.h"

/* A growable byte string. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
} text;

static int text_append(text *t, const char *s, size_t n) {
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 256;
        while (cap < t->len + n + 1) cap *= 2;
        char *data = realloc(t->data, cap);
        if (!data) return 0;
        t->data = data;
        t->cap = cap;
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
    return 1;
}

/* Print why the last mesh call failed and return 1 (an exit code). */
static int fail(const char *what, mesh_status status) {
    char msg[512];
    size_t n;
    mesh_last_error_message(msg, sizeof msg, &n);
    fprintf(stderr, "mesh-chat: %s: %s: %s\n", what, mesh_status_str(status), msg);
    return 1;
}

/* Token callback: print the piece at once and keep it for the history. */
static bool on_piece(void *userdata, const char *piece, size_t len) {
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return text_append((text *)userdata, piece, len) != 0;
}

/* Read one line of any length (without its newline); NULL at end of input. */
static char *read_line(FILE *in) {
    text line = {0};
    char chunk[256];
    while (fgets(chunk, sizeof chunk, in)) {
        size_t n = strlen(chunk);
        int end = n > 0 && chunk[n - 1] == '\n';
        if (!text_append(&line, chunk, n - (size_t)end)) break;
        if (end) return line.data ? line.data : calloc(1, 1);
    }
    if (line.data || !feof(in)) return line.data;
    return NULL;
}

/* A conversation: role/content pairs owned by the program. */
typedef struct {
    mesh_chat_message *msgs;
    size_t n;
} history;

static void history_clear(history *h) {
    for (size_t i = 0; i < h->n; i++) {
        free((char *)h->msgs[i].content);
    }
    free(h->msgs);
    h->msgs = NULL;
    h->n = 0;
}

/* Takes ownership of content. */
static int history_push(history *h, const char *role, char *content) {
    mesh_chat_message *msgs = realloc(h->msgs, (h->n + 1) * sizeof *msgs);
    if (!msgs) return 0;
    h->msgs = msgs;
    h->msgs[h->n].role = role;
    h->msgs[h->n].content = content;
    h->n++;
    return 1;
}

/* Render the history into a prompt (caller frees), or NULL on failure. */
static char *render(const mesh_model *model, const history *h, mesh_status *status) {
    size_t needed = 0;
    *status = mesh_chat_apply_template(model, h->msgs, h->n, true, NULL, 0, &needed);
    if (*status != MESH_STATUS_BUFFER_TOO_SMALL) return NULL;
    char *prompt = malloc(needed);
    if (!prompt) return NULL;
    *status = mesh_chat_apply_template(model, h->msgs, h->n, true, prompt, needed, &needed);
    if (*status != MESH_STATUS_OK) {
        free(prompt);
        return NULL;
    }
    return prompt;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s MODEL [MAX_TOKENS]\n  MODEL: a .gguf file or \"default\"\n", argv[0]);
        return 2;
    }
    if (mesh_abi_version() != MESH_ABI_VERSION) {
        fprintf(stderr, "mesh-chat: built for ABI %d, the library has %u\n", MESH_ABI_VERSION,
                (unsigned)mesh_abi_version());
        return 1;
    }

    const mesh_model *model = NULL;
    mesh_status st = mesh_model_load(argv[1], NULL, &model);
    if (st != MESH_STATUS_OK) return fail("loading the model", st);

    mesh_context *ctx = NULL;
    st = mesh_context_new(model, NULL, &ctx);
    /* The context keeps its own reference: ours can go now or later. */
    if (st != MESH_STATUS_OK) {
        mesh_model_free(model);
        return fail("creating a context", st);
    }

    mesh_generate_params params = mesh_generate_params_default();
    params.raw = true; /* the prompt is the template's output, special tokens included */
    params.max_tokens = argc > 2 ? (size_t)strtoul(argv[2], NULL, 10) : 256;

    history h = {0};
    int code = 0;
    char *line;
    while (code == 0 && (line = read_line(stdin)) != NULL) {
        if (line[0] == '\0') {
            free(line);
            continue;
        }
        if (!history_push(&h, "user", line)) {
            free(line);
            code = 1;
            break;
        }
        for (int attempt = 0; attempt < 2; attempt++) {
            char *prompt = render(model, &h, &st);
            if (!prompt) {
                code = fail("applying the chat template", st);
                break;
            }
            text reply = {0};
            st = mesh_generate(ctx, prompt, &params, on_piece, &reply, NULL);
            free(prompt);
            if (st == MESH_STATUS_CONTEXT_OVERFLOW && attempt == 0 && h.n > 1) {
                /* Start over from the last question alone. */
                char *last = (char *)h.msgs[h.n - 1].content;
                h.msgs[h.n - 1].content = NULL;
                history_clear(&h);
                history_push(&h, "user", last);
                free(reply.data);
                fprintf(stderr, "\n[mesh-chat: context full, forgetting the conversation]\n");
                continue;
            }
            if (st != MESH_STATUS_OK) {
                free(reply.data);
                code = fail("generating", st);
                break;
            }
            printf("\n\n");
            fflush(stdout);
            char *answer = reply.data ? reply.data : calloc(1, 1);
            if (!answer || !history_push(&h, "assistant", answer)) {
                free(answer);
                code = 1;
            }
            break;
        }
    }

    history_clear(&h);
    mesh_context_free(ctx);
    mesh_model_free(model);
    return code;
}
