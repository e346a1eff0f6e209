/* memcheck_fwd_bwd.c - a forward + backward program for valgrind's memcheck
   (tests/run_all.sh, config valgrind): every allocating path of mha.h once,
   small, with the outputs read back so that an uninitialised value reaching
   a result is reported.  mha_forward and mha_backward (fused and unfused,
   masks, bias_kv, zero_attn), mha_sdpa + backward, the encoder layer forward
   and backward with and without a caller workspace, packed weights, the
   training pieces, and the two file readers (npy.h, safetensors.h). */
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_ST_IMPLEMENTATION
#include "../examples/safetensors.h"
#define MHA_NPY_IMPLEMENTATION
#include "../examples/npy.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

enum { B = 2, L = 5, E = 8, H = 2, F = 12, V = 6 };

static float *rnd(tu_rng *r, size_t n)
{
    float *p = (float *)malloc(n * sizeof *p);
    tu_fill(r, p, n, 0.5f);
    return p;
}
static float *zeros(size_t n) { return (float *)calloc(n, sizeof(float)); }

/* sum of |x|: reads every value, so memcheck sees any undefined one */
static double touch(const float *x, size_t n)
{
    double s = 0;
    size_t i;
    for (i = 0; i < n; ++i) s += fabs((double)x[i]);
    return s;
}

static void module_pass(tu_rng *r)
{
    float *w_in = rnd(r, 3 * E * E), *b_in = rnd(r, 3 * E), *w_out = rnd(r, E * E), *b_out = rnd(r, E);
    float *bk = rnd(r, E), *bv = rnd(r, E), *x = rnd(r, B * L * E), *dout = rnd(r, B * L * E);
    float *out = zeros(B * L * E), *w = zeros(B * H * L * (L + 2)), *dx = zeros(B * L * E);
    float *g_in = zeros(3 * E * E), *g_out = zeros(E * E), *g_bin = zeros(3 * E), *g_bout = zeros(E);
    unsigned char kpm[B * L] = {0, 0, 1, 0, 0, 1, 1, 1, 1, 1};   /* batch 1: all keys but one padded */
    mha_module m;
    mha_module_grad g;
    mha_options o;
    size_t pack_bytes = 0;
    void *pack;
    int weights;
    memset(&m, 0, sizeof m);
    memset(&g, 0, sizeof g);
    memset(&o, 0, sizeof o);
    m.embed_dim = E; m.num_heads = H;
    m.in_proj_weight = w_in; m.in_proj_bias = b_in; m.out_proj_weight = w_out; m.out_proj_bias = b_out;
    o.causal = 1;
    o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = kpm;
    o.key_padding_mask.ndim = 2; o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = L;
    for (weights = 0; weights < 2; ++weights) {
        CHECK(mha_forward(&m, B, L, L, x, x, x, &o, out, weights ? w : NULL, NULL, 0) == MHA_OK, "forward");
        CHECK(touch(out, B * L * E) > 0, "forward output read");
    }
    g.in_proj_weight = g_in; g.in_proj_bias = g_bin; g.out_proj_weight = g_out; g.out_proj_bias = g_bout;
    CHECK(mha_backward(&m, B, L, L, x, x, x, dout, &o, dx, dx, dx, &g, NULL, 0) == MHA_OK, "backward");
    CHECK(touch(dx, B * L * E) + touch(g_in, 3 * E * E) + touch(g_out, E * E) > 0, "gradients read");
    /* packed weights */
    CHECK(mha_module_pack_size(&m, &pack_bytes) == MHA_OK, "pack size");
    pack = malloc(pack_bytes);
    CHECK(mha_module_pack(&m, pack, pack_bytes) == MHA_OK, "pack");
    m.packed = pack;
    CHECK(mha_forward(&m, B, L, L, x, x, x, &o, out, NULL, NULL, 0) == MHA_OK && touch(out, B * L * E) > 0,
          "packed forward");
    m.packed = NULL;
    /* add_bias_kv + add_zero_attn: two appended keys */
    m.bias_k = bk; m.bias_v = bv; m.add_zero_attn = 1;
    CHECK(mha_forward(&m, B, L, L, x, x, x, &o, out, w, NULL, 0) == MHA_OK &&
          touch(w, B * L * (L + 2)) > 0, "bias_kv + zero_attn forward");
    CHECK(mha_backward(&m, B, L, L, x, x, x, dout, &o, dx, dx, dx, &g, NULL, 0) == MHA_OK, "bias_kv backward");
    free(pack);
    free(w_in); free(b_in); free(w_out); free(b_out); free(bk); free(bv); free(x); free(dout);
    free(out); free(w); free(dx); free(g_in); free(g_out); free(g_bin); free(g_bout);
}

static void sdpa_pass(tu_rng *r)
{
    const int D = E / H;
    float *q = rnd(r, B * H * L * D), *k = rnd(r, B * H * L * D), *v = rnd(r, B * H * L * D);
    float *dout = rnd(r, B * H * L * D), *out = zeros(B * H * L * D), *w = zeros(B * H * L * L);
    float *dq = zeros(B * H * L * D), *dk = zeros(B * H * L * D), *dv = zeros(B * H * L * D);
    float am[L * L];
    mha_options o;
    int i;
    memset(&o, 0, sizeof o);
    for (i = 0; i < L * L; ++i) am[i] = i % 4 == 1 ? -INFINITY : 0.1f * (float)(i % 3);
    o.attn_mask.kind = MHA_MASK_FLOAT; o.attn_mask.data = am; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    CHECK(mha_sdpa(B, H, L, L, D, D, q, k, v, &o, out, NULL, NULL, 0) == MHA_OK && touch(out, B * H * L * D) > 0,
          "sdpa fused");
    CHECK(mha_sdpa(B, H, L, L, D, D, q, k, v, &o, out, w, NULL, 0) == MHA_OK && touch(w, B * H * L * L) > 0,
          "sdpa weights");
    CHECK(mha_sdpa_backward(B, H, L, L, D, D, q, k, v, dout, &o, dq, dk, dv, NULL, 0) == MHA_OK &&
          touch(dq, B * H * L * D) + touch(dk, B * H * L * D) + touch(dv, B * H * L * D) > 0, "sdpa backward");
    free(q); free(k); free(v); free(dout); free(out); free(w); free(dq); free(dk); free(dv);
}

/* The encoder layer from the PyTorch safetensors file, forward + backward,
   then the training pieces on its output. */
static void encoder_pass(tu_rng *r, const char *path)
{
    mha_st_file f;
    mha_encoder_layer ly;
    mha_encoder_layer_grad g;
    char err[256];
    const float *x;
    float y[2 * 5 * 16], dy[2 * 5 * 16], dx[2 * 5 * 16], *gw, logits[2 * 5 * V], dlog[2 * 5 * V];
    float table[V * 16], emb[4 * 16], pe[5 * 16], mom[V * 16], var[V * 16];
    int tok[4] = {0, 3, 5, 1}, tgt[10] = {1, 2, 3, 4, 5, 0, 1, -1, 2, 3}, correct, layer_ok;
    size_t ws_bytes = 0;
    void *ws;
    float loss;
    mha_adamw adam;
    memset(&ly, 0, sizeof ly);
    memset(&g, 0, sizeof g);
    adam = mha_adamw_defaults();
    layer_ok = mha_st_open(path, &f, err, sizeof err) == 0 && mha_st_encoder_layer(&f, "layers.0.", 4, &ly, err, sizeof err) == 0;
    CHECK(layer_ok, "encoder layer from %s: %s", path, layer_ok ? "" : err);
    if (!layer_ok) return;
    x = mha_st_floats(&f, "test.x", -1, NULL, err, sizeof err);
    tu_fill(r, dy, 160, 1.0f);
    gw = zeros(24 * 16);
    g.linear1_weight = gw;
    CHECK(mha_encoder_forward(&ly, 2, 5, x, NULL, y, NULL, NULL, 0) == MHA_OK && touch(y, 160) > 0, "encoder forward");
    CHECK(mha_encoder_workspace_size(&ly, 2, 5, NULL, &ws_bytes) == MHA_OK, "encoder workspace size");
    ws = malloc(ws_bytes);
    memset(dx, 0, sizeof dx);
    CHECK(mha_encoder_backward(&ly, 2, 5, x, NULL, dy, dx, &g, ws, ws_bytes) == MHA_OK &&
          touch(dx, 160) + touch(gw, 24 * 16) > 0, "encoder backward (caller workspace)");
    free(ws);
    ly.norm_first = 1; ly.activation = MHA_ACT_GELU;
    memset(dx, 0, sizeof dx);
    CHECK(mha_encoder_backward(&ly, 2, 5, x, NULL, dy, dx, &g, NULL, 0) == MHA_OK && touch(dx, 160) > 0,
          "pre-norm GELU backward (allocating)");
    /* the training pieces */
    tu_fill(r, table, V * 16, 1.0f);
    memset(mom, 0, sizeof mom);
    memset(var, 0, sizeof var);
    CHECK(mha_embedding_forward(4, V, 16, tok, table, emb) == MHA_OK && touch(emb, 64) > 0, "embedding");
    CHECK(mha_positional_encoding(5, 16, pe) == MHA_OK && touch(pe, 80) > 0, "positional encoding");
    CHECK(mha_linear_forward(10, 16, V, y, table, NULL, logits, NULL, 0) == MHA_OK, "linear");
    CHECK(mha_cross_entropy(10, V, logits, tgt, &loss, dlog, &correct) == MHA_OK && loss > 0 && touch(dlog, 60) > 0,
          "cross-entropy");
    CHECK(mha_adamw_step(&adam, 1, V * 16, table, table, mom, var) == MHA_OK && touch(table, V * 16) > 0, "AdamW");
    free(gw);
    mha_st_close(&f);
}

static void npy_pass(void)
{
    mha_npy a;
    char err[256];
    CHECK(mha_npy_load("tests/data/npy/torch_causal_f8.npy", &a, err, sizeof err) == 0 && touch(a.data, a.count) > 0,
          "npy load");
    mha_npy_free(&a);
    CHECK(mha_npy_load("tests/data/npy/bad_fortran.npy", &a, err, sizeof err) == -1, "bad npy refused");
}

int main(int argc, char **argv)
{
    tu_rng r = {2024};
    module_pass(&r);
    sdpa_pass(&r);
    encoder_pass(&r, argc > 1 ? argv[1] : "tests/data/safetensors/encoder.safetensors");
    npy_pass();
    return tu_finish("memcheck_fwd_bwd");
}
