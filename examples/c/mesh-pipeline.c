/*
 * mesh-pipeline: a two-node mesh on loopback through the mesh-llm C API.
 *
 *   mesh-pipeline MODEL [PROMPT]
 *
 * Node A listens on 127.0.0.1 and serves layers 0..15 of MODEL; node B
 * bootstraps from A and serves the rest itself. B then generates greedily in
 * pipeline mode (layers 0..15 on A, the rest locally) and in local mode, and
 * checks the two texts are identical. Then A and B also serve as private-mode
 * helpers, and a third node C (with the model loaded in exact-accumulation
 * mode) generates in private mode, its linear layers on secret shares held by
 * A and B, and checks the text equals its own local exact generation. Node
 * events (peers, sessions, the plan) are printed to stderr as JSON lines. Exit
 * status 0 on success.
 *
 * Build (see scripts/c-tests.sh):
 *   cargo build -p mesh-ffi
 *   cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude examples/c/mesh-pipeline.c \
 *      $CARGO_TARGET_DIR/debug/libmesh_ffi.a -lstdc++ -lpthread -ldl -lm -lrt -lutil -lgcc_s \
 *      -o mesh-pipeline
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mesh.h"

static int fail(const char *what, mesh_status status) {
    char msg[512];
    size_t n;
    mesh_last_error_message(msg, sizeof msg, &n);
    fprintf(stderr, "mesh-pipeline: %s: %s: %s\n", what, mesh_status_str(status), msg);
    return 1;
}

typedef struct {
    char text[4096];
    size_t len;
} buffer;

static bool collect(void *userdata, const char *piece, size_t len) {
    buffer *b = userdata;
    if (b->len + len + 1 > sizeof b->text) return false;
    memcpy(b->text + b->len, piece, len);
    b->len += len;
    b->text[b->len] = '\0';
    return true;
}

static void on_event(void *userdata, const char *json, size_t len) {
    fprintf(stderr, "%s: %.*s\n", (const char *)userdata, (int)len, json);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: mesh-pipeline MODEL [PROMPT]\n");
        return 2;
    }
    const char *prompt = argc > 2 ? argv[2] : "The capital of France is";
    int rc = 1;
    const mesh_model *model = NULL, *exact = NULL;
    mesh_node *a = NULL, *b = NULL, *c = NULL;
    mesh_model_params mp = mesh_model_params_default();
    mp.n_threads = 1;
    mesh_status st = mesh_model_load(argv[1], &mp, &model);
    if (st != MESH_STATUS_OK) return fail("load", st);
    size_t n_layers = 0;
    mesh_model_n_layers(model, &n_layers);
    uint32_t split = (uint32_t)(n_layers / 2);

    /* Node A: listens on loopback, serves the first half. */
    const char *listen[] = {"/ip4/127.0.0.1/tcp/0"};
    mesh_node_params pa = mesh_node_params_default();
    pa.listen = listen;
    pa.n_listen = 1;
    if ((st = mesh_node_open(&pa, &a)) != MESH_STATUS_OK) { fail("open A", st); goto done; }
    mesh_node_set_event_callback(a, on_event, "A");
    if ((st = mesh_node_serve(a, model, 0, split)) != MESH_STATUS_OK) { fail("serve A", st); goto done; }
    char addrs[1024];
    size_t n = 0;
    if ((st = mesh_node_listen_addrs(a, addrs, sizeof addrs, &n)) != MESH_STATUS_OK) {
        fail("listen addrs", st);
        goto done;
    }
    char *nl = strchr(addrs, '\n');
    if (nl) *nl = '\0'; /* the first address */
    printf("node A at %s serves layers 0..%u\n", addrs, split);

    /* Node B: bootstraps from A, serves the second half itself (and listens,
     * so that C can reach it as a helper later). */
    const char *bootstrap[] = {addrs};
    mesh_node_params pb = mesh_node_params_default();
    pb.listen = listen;
    pb.n_listen = 1;
    pb.bootstrap = bootstrap;
    pb.n_bootstrap = 1;
    if ((st = mesh_node_open(&pb, &b)) != MESH_STATUS_OK) { fail("open B", st); goto done; }
    mesh_node_set_event_callback(b, on_event, "B");
    if ((st = mesh_node_serve(b, model, split, 0)) != MESH_STATUS_OK) { fail("serve B", st); goto done; }

    mesh_generate_params gp = mesh_generate_params_default();
    gp.temperature = 0;
    gp.max_tokens = 24;
    gp.ignore_eos = true;
    buffer piped = {{0}, 0}, local = {{0}, 0};
    mesh_node_generate_stats ps, ls;
    ps.struct_size = sizeof ps;
    ls.struct_size = sizeof ls;
    st = mesh_node_generate(b, model, prompt, &gp, MESH_MODE_PIPELINE, collect, &piped, &ps);
    if (st != MESH_STATUS_OK) { fail("pipeline generate", st); goto done; }
    st = mesh_node_generate(b, model, prompt, &gp, MESH_MODE_LOCAL, collect, &local, &ls);
    if (st != MESH_STATUS_OK) { fail("local generate", st); goto done; }
    printf("pipeline (%zu hops, %.2f ms per hop, %.0f bytes/token, %zu failovers): %s\n",
           ps.n_hops, ps.hop_ms, ps.bytes_per_token, ps.failovers, piped.text);
    printf("local: %s\n", local.text);
    if (ps.n_hops != 2 || strcmp(piped.text, local.text) != 0 || piped.len == 0) {
        fprintf(stderr, "mesh-pipeline: expected 2 hops and identical texts\n");
        goto done;
    }
    printf("identical\n");

    /* Private mode: A and B hold the shares; C owns the prompt. Both helpers
     * are on 127.0.0.1, so C trusts them by peer id (untrusted helpers are
     * taken at most one per network). */
    if ((st = mesh_node_serve_helper(a, model)) != MESH_STATUS_OK) { fail("helper A", st); goto done; }
    if ((st = mesh_node_serve_helper(b, model)) != MESH_STATUS_OK) { fail("helper B", st); goto done; }
    char id_a[128], id_b[128];
    if ((st = mesh_node_peer_id(a, id_a, sizeof id_a, &n)) != MESH_STATUS_OK ||
        (st = mesh_node_peer_id(b, id_b, sizeof id_b, &n)) != MESH_STATUS_OK) {
        fail("peer id", st);
        goto done;
    }
    mesh_model_params xp = mesh_model_params_default();
    xp.n_threads = 1;
    xp.exact_accumulation = true;
    if ((st = mesh_model_load(argv[1], &xp, &exact)) != MESH_STATUS_OK) { fail("load exact", st); goto done; }
    const char *trusted[] = {id_a, id_b};
    mesh_node_params pc = mesh_node_params_default();
    pc.bootstrap = bootstrap;
    pc.n_bootstrap = 1;
    pc.private_helpers = 2;
    pc.trusted = trusted;
    pc.n_trusted = 2;
    if ((st = mesh_node_open(&pc, &c)) != MESH_STATUS_OK) { fail("open C", st); goto done; }
    buffer priv = {{0}, 0}, exact_local = {{0}, 0};
    mesh_node_generate_stats xs, es;
    xs.struct_size = sizeof xs;
    es.struct_size = sizeof es;
    st = mesh_node_generate(c, exact, prompt, &gp, MESH_MODE_PRIVATE, collect, &priv, &xs);
    if (st != MESH_STATUS_OK) { fail("private generate", st); goto done; }
    st = mesh_node_generate(c, exact, prompt, &gp, MESH_MODE_LOCAL, collect, &exact_local, &es);
    if (st != MESH_STATUS_OK) { fail("local exact generate", st); goto done; }
    printf("private (%zu helpers, %zu dropped, %.0f bytes/token, %.1f ms): %s\n", xs.n_helpers,
           xs.helpers_dropped, xs.bytes_per_token, xs.generate_ms, priv.text);
    printf("local exact (%.1f ms): %s\n", es.generate_ms, exact_local.text);
    if (xs.n_helpers != 2 || strcmp(priv.text, exact_local.text) != 0 || priv.len == 0) {
        fprintf(stderr, "mesh-pipeline: expected 2 helpers and identical texts\n");
        goto done;
    }
    printf("identical\n");
    rc = 0;
done:
    mesh_node_free(c);
    mesh_node_free(b);
    mesh_node_free(a);
    mesh_model_free(exact);
    mesh_model_free(model);
    return rc;
}
