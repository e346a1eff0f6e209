/* memcheck_fwd_bwd.c - a forward + backward program for valgrind's memcheck
   (tests/run_all.sh, config valgrind): every allocating path of mha.h once,
   small, with the outputs read back so that an uninitialised value reaching
   a result is reported.  mha_module_forward and mha_module_backward (fused
   and unfused, masks, bias_kv, zero_attn), a packed training plan (its
   saved forward, the backward from it, mha_plan_repack), a decoding step
   over a KV cache, mha_sdpa_forward + backward, the encoder layer forward
   and backward with and without a caller workspace, the training pieces,
   and the two file readers (npy.h, safetensors.h). */
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

static void module_pass(tu_rng *rg)
{
    float *w_in = rnd(rg, 3 * E * E), *b_in = rnd(rg, 3 * E), *w_out = rnd(rg, E * E), *b_out = rnd(rg, E);
    float *bk = rnd(rg, E), *bv = rnd(rg, E), *x = rnd(rg, B * L * E), *dout = rnd(rg, B * L * E);
    float *out = zeros(B * L * E), *w = zeros(B * H * L * (L + 2)), *dx = zeros(B * L * E);
    float *g_in = zeros(3 * E * E), *g_out = zeros(E * E), *g_bin = zeros(3 * E), *g_bout = zeros(E);
    unsigned char kpm[B * L] = {0, 0, 1, 0, 0, 1, 1, 1, 1, 1};   /* batch 1: all keys but one padded */
    mha_module m;
    mha_module_grad g;
    mha_options o;
    mha_run r;
    mha_error e;
    int weights;
    memset(&m, 0, sizeof m);
    memset(&g, 0, sizeof g);
    memset(&o, 0, sizeof o);
    m.embed_dim = E; m.num_heads = H;
    m.in_proj_weight = w_in; m.in_proj_bias = b_in; m.out_proj_weight = w_out; m.out_proj_bias = b_out;
    o.causal = 1;
    o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = kpm;
    o.key_padding_mask.ndim = 2; o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = L;
    memset(&r, 0, sizeof r);
    for (weights = 0; weights < 2; ++weights) {
        r.weights = weights ? w : NULL;
        CHECK(mha_module_forward(&m, B, L, L, x, x, x, &o, out, &r, &e) == MHA_OK, "forward: %s", e.message);
        CHECK(touch(out, B * L * E) > 0, "forward output read");
    }
    g.in_proj_weight = g_in; g.in_proj_bias = g_bin; g.out_proj_weight = g_out; g.out_proj_bias = g_bout;
    CHECK(mha_module_backward(&m, B, L, L, x, x, x, dout, &o, dx, dx, dx, &g, NULL, &e) == MHA_OK, "backward: %s",
          e.message);
    CHECK(touch(dx, B * L * E) + touch(g_in, 3 * E * E) + touch(g_out, E * E) > 0, "gradients read");
    /* a packed training plan: the forward saves, the backward reads it; repack */
    {
        mha_plan *p = NULL;
        mha_sizes sz;
        float lse[B * H * L];
        void *sv;
        CHECK(mha_module_plan(&m, B, L, L, &o, MHA_PLAN_PACK | MHA_PLAN_TRAINING, NULL, 0, &p, &e) == MHA_OK &&
              mha_plan_sizes(p, &sz, &e) == MHA_OK, "packed training plan: %s", e.message);
        sv = malloc(sz.saved);
        memset(&r, 0, sizeof r);
        r.saved = sv; r.saved_bytes = sz.saved; r.lse = lse;
        CHECK(mha_module_run_forward(p, L, L, x, x, x, out, &r, &e) == MHA_OK && touch(out, B * L * E) > 0 &&
              touch(lse, B * H * L) > 0, "packed forward that saves: %s", e.message);
        r.lse = NULL;
        CHECK(mha_module_run_backward(p, L, L, x, x, x, dout, dx, dx, dx, &g, &r, &e) == MHA_OK &&
              touch(dx, B * L * E) > 0, "backward from the saved forward: %s", e.message);
        CHECK(mha_plan_repack(p, &e) == MHA_OK, "repack: %s", e.message);
        mha_plan_destroy(p);
        free(sv);
    }
    /* a decoding step over a KV cache (module plan with MHA_PLAN_CACHE) */
    {
        enum { CAP = 8 };
        float kc[B * H * CAP * (E / H)], vc[B * H * CAP * (E / H)];
        int len[B] = {0, 0}, step;
        mha_kv_cache c;
        memset(&c, 0, sizeof c);
        c.B = B; c.Hkv = H; c.D = E / H; c.capacity = CAP; c.k = kc; c.v = vc; c.len = len;
        memset(&r, 0, sizeof r);
        r.cache = &c;
        double filled = 0;
        int bh;
        for (step = 0; step < 2; ++step)
            CHECK(mha_module_forward(&m, B, 1, 0, x + step * B * E, NULL, NULL, NULL, out, &r, &e) == MHA_OK &&
                  touch(out, B * E) > 0, "decoding step %d: %s", step, e.message);
        /* the two appended tokens of every (row, KV head): written, so defined */
        for (bh = 0; bh < B * H; ++bh)
            filled += touch(kc + (size_t)bh * CAP * (E / H), 2 * (E / H)) + touch(vc + (size_t)bh * CAP * (E / H), 2 * (E / H));
        CHECK(len[0] == 2 && len[1] == 2 && filled > 0, "the cache holds the two tokens");
    }
    /* add_bias_kv + add_zero_attn: two appended keys */
    m.bias_k = bk; m.bias_v = bv; m.add_zero_attn = 1;
    memset(&r, 0, sizeof r);
    r.weights = w;
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, &o, out, &r, &e) == MHA_OK &&
          touch(w, B * L * (L + 2)) > 0, "bias_kv + zero_attn forward: %s", e.message);
    CHECK(mha_module_backward(&m, B, L, L, x, x, x, dout, &o, dx, dx, dx, &g, NULL, &e) == MHA_OK,
          "bias_kv backward: %s", e.message);
    free(w_in); free(b_in); free(w_out); free(b_out); free(bk); free(bv); free(x); free(dout);
    free(out); free(w); free(dx); free(g_in); free(g_out); free(g_bin); free(g_bout);
}

static void sdpa_pass(tu_rng *rg)
{
    const int D = E / H;
    float *q = rnd(rg, B * H * L * D), *k = rnd(rg, B * H * L * D), *v = rnd(rg, B * H * L * D);
    float *dout = rnd(rg, B * H * L * D), *out = zeros(B * H * L * D), *w = zeros(B * H * L * L);
    float *dq = zeros(B * H * L * D), *dk = zeros(B * H * L * D), *dv = zeros(B * H * L * D);
    float am[L * L];
    mha_options o;
    int i;
    memset(&o, 0, sizeof o);
    for (i = 0; i < L * L; ++i) am[i] = i % 4 == 1 ? -INFINITY : 0.1f * (float)(i % 3);
    o.attn_mask.kind = MHA_MASK_FLOAT; o.attn_mask.data = am; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    mha_run r;
    memset(&r, 0, sizeof r);
    CHECK(mha_sdpa_forward(B, H, L, L, D, D, q, k, v, &o, out, NULL, NULL) == MHA_OK &&
          touch(out, B * H * L * D) > 0, "sdpa fused");
    r.weights = w;
    CHECK(mha_sdpa_forward(B, H, L, L, D, D, q, k, v, &o, out, &r, NULL) == MHA_OK && touch(w, B * H * L * L) > 0,
          "sdpa weights");
    CHECK(mha_sdpa_backward(B, H, L, L, D, D, q, k, v, dout, &o, dq, dk, dv, NULL, NULL) == MHA_OK &&
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
    const float *x = NULL;
    float y[2 * 5 * 16], dy[2 * 5 * 16], dx[2 * 5 * 16], *gw, logits[2 * 5 * V], dlog[2 * 5 * V];
    float table[V * 16], emb[4 * 16], pe[5 * 16], mom[V * 16], var[V * 16];
    int tok[4] = {0, 3, 5, 1}, tgt[10] = {1, 2, 3, 4, 5, 0, 1, -1, 2, 3}, correct, layer_ok;
    void *ws;
    float loss;
    mha_adamw adam;
    mha_sizes sz;
    mha_run run;
    mha_error e;
    memset(&ly, 0, sizeof ly);
    memset(&g, 0, sizeof g);
    adam = mha_adamw_defaults();
    layer_ok = mha_st_open(path, &f, &e) == MHA_OK;
    if (layer_ok && mha_st_encoder_layer(&f, "layers.0.", 4, &ly, &e) != MHA_OK) {
        layer_ok = 0;
        mha_st_close(&f);
    }
    CHECK(layer_ok, "encoder layer from %s: %s", path, layer_ok ? "" : e.message);
    if (!layer_ok) return;
    CHECK(mha_st_floats(&f, "test.x", -1, NULL, &x, &e) == MHA_OK, "test.x: %s", e.message);
    if (!x) { mha_st_close(&f); return; }
    tu_fill(r, dy, 160, 1.0f);
    gw = zeros(24 * 16);
    g.linear1_weight = gw;
    CHECK(mha_encoder_forward(&ly, 2, 5, x, NULL, y, NULL, &e) == MHA_OK && touch(y, 160) > 0, "encoder forward: %s",
          e.message);
    CHECK(mha_encoder_plan_size(&ly, 2, 5, NULL, MHA_PLAN_TRAINING, &sz, &e) == MHA_OK, "encoder workspace size");
    ws = malloc(sz.workspace);
    memset(&run, 0, sizeof run);
    run.workspace = ws; run.workspace_bytes = sz.workspace;
    memset(dx, 0, sizeof dx);
    CHECK(mha_encoder_backward(&ly, 2, 5, x, dy, NULL, dx, &g, &run, &e) == MHA_OK &&
          touch(dx, 160) + touch(gw, 24 * 16) > 0, "encoder backward (caller workspace): %s", e.message);
    free(ws);
    ly.norm_first = 1; ly.activation = MHA_ACT_GELU;
    memset(dx, 0, sizeof dx);
    CHECK(mha_encoder_backward(&ly, 2, 5, x, dy, NULL, dx, &g, NULL, &e) == MHA_OK && touch(dx, 160) > 0,
          "pre-norm GELU backward (allocating): %s", e.message);
    /* the training pieces */
    tu_fill(r, table, V * 16, 1.0f);
    memset(mom, 0, sizeof mom);
    memset(var, 0, sizeof var);
    CHECK(mha_embedding_forward(4, V, 16, tok, table, emb, NULL) == MHA_OK && touch(emb, 64) > 0, "embedding");
    CHECK(mha_positional_encoding(5, 16, pe, NULL) == MHA_OK && touch(pe, 80) > 0, "positional encoding");
    CHECK(mha_linear_forward(10, 16, V, y, table, NULL, logits, NULL, NULL) == MHA_OK, "linear");
    CHECK(mha_cross_entropy(10, V, logits, tgt, &loss, dlog, &correct, NULL) == MHA_OK && loss > 0 &&
          touch(dlog, 60) > 0, "cross-entropy");
    CHECK(mha_adamw_step(&adam, 1, V * 16, table, table, mom, var, NULL) == MHA_OK && touch(table, V * 16) > 0,
          "AdamW");
    free(gw);
    mha_st_close(&f);
}

static void npy_pass(void)
{
    mha_npy a;
    mha_error e;
    CHECK(mha_npy_load("tests/data/npy/torch_causal_f8.npy", &a, &e) == MHA_OK && touch(a.data, a.count) > 0,
          "npy load");
    mha_npy_free(&a);
    CHECK(mha_npy_load("tests/data/npy/bad_fortran.npy", &a, &e) != MHA_OK && e.message[0] != '\0',
          "bad npy refused with a message");
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
