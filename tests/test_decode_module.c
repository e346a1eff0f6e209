/* Decoder features in the module (mha_forward / mha_backward): grouped-query
   attention with K and V projections of Hkv*D rows.  A GQA module must equal
   the MHA module whose K/V projection rows are those of each query head's KV
   head (the repeat_interleave grouping), on the fused, unfused and
   head-by-head paths, and its weight gradients must be the MHA gradients
   summed over each group.  The MHA module itself is checked against
   PyTorch in test_golden.c and test_train_golden.c.  */
#define MHA__BY_HEAD_FLOATS 20000   /* small, so the larger cases go head by head */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

static double worst_fwd, worst_grad;
static mha_rope g_rope;        /* RoPE of the cases run while it is set */
static int g_offset;           /* their position_offset */

typedef struct gqa_mod {
    int E, H, Hkv, D, Ekv, packed_in;
    float *wq, *wk, *wv, *bias, *wo, *bo, *bk, *bv;   /* GQA weights */
    float *in_g;                                      /* [E + 2Ekv, E] when packed_in */
    float *wk_full, *wv_full, *bias_full, *bk_full, *bv_full, *in_full;   /* MHA equivalent */
} gqa_mod;

/* MHA rows of head h = GQA rows of KV head h / G */
static void expand_rows(const float *src, float *dst, int H, int G, int D, int cols)
{
    int h;
    for (h = 0; h < H; ++h)
        memcpy(dst + (size_t)h * D * cols, src + (size_t)(h / G) * D * cols, (size_t)D * cols * sizeof(float));
}
/* GQA gradient of KV head g = sum of the MHA gradients of its query heads */
static void fold_rows(const float *src, double *dst, int H, int G, int D, int cols)
{
    int h;
    size_t t, n = (size_t)D * cols;
    memset(dst, 0, (size_t)(H / G) * n * sizeof(double));
    for (h = 0; h < H; ++h)
        for (t = 0; t < n; ++t) dst[(size_t)(h / G) * n + t] += src[(size_t)h * n + t];
}

static void gcmp(const float *a, const float *b, size_t n, const char *what)
{
    double e = tu_rel_err_ff(a, b, n);
    CHECK(e <= 1e-5, "GQA module grad %s: %.3g", what, e);
    if (e > worst_grad) worst_grad = e;
}

static void mod_make(gqa_mod *g, int E, int H, int Hkv, int packed_in, tu_rng *r)
{
    int G = H / Hkv, D = E / H, Ekv = Hkv * D;
    g->E = E; g->H = H; g->Hkv = Hkv; g->D = D; g->Ekv = Ekv; g->packed_in = packed_in;
    g->wq = malloc((size_t)E * E * 4); g->wk = malloc((size_t)Ekv * E * 4); g->wv = malloc((size_t)Ekv * E * 4);
    g->bias = malloc((size_t)(E + 2 * Ekv) * 4); g->wo = malloc((size_t)E * E * 4); g->bo = malloc((size_t)E * 4);
    g->bk = malloc((size_t)Ekv * 4); g->bv = malloc((size_t)Ekv * 4);
    tu_fill(r, g->wq, (size_t)E * E, 0.4f); tu_fill(r, g->wk, (size_t)Ekv * E, 0.4f);
    tu_fill(r, g->wv, (size_t)Ekv * E, 0.4f); tu_fill(r, g->bias, (size_t)E + 2 * Ekv, 0.2f);
    tu_fill(r, g->wo, (size_t)E * E, 0.3f); tu_fill(r, g->bo, (size_t)E, 0.1f);
    tu_fill(r, g->bk, (size_t)Ekv, 0.3f); tu_fill(r, g->bv, (size_t)Ekv, 0.3f);
    g->wk_full = malloc((size_t)E * E * 4); g->wv_full = malloc((size_t)E * E * 4);
    g->bias_full = malloc((size_t)3 * E * 4); g->bk_full = malloc((size_t)E * 4); g->bv_full = malloc((size_t)E * 4);
    expand_rows(g->wk, g->wk_full, H, G, D, E); expand_rows(g->wv, g->wv_full, H, G, D, E);
    memcpy(g->bias_full, g->bias, (size_t)E * 4);
    expand_rows(g->bias + E, g->bias_full + E, H, G, D, 1);
    expand_rows(g->bias + E + Ekv, g->bias_full + 2 * E, H, G, D, 1);
    expand_rows(g->bk, g->bk_full, H, G, D, 1); expand_rows(g->bv, g->bv_full, H, G, D, 1);
    g->in_g = malloc((size_t)(E + 2 * Ekv) * E * 4); g->in_full = malloc((size_t)3 * E * E * 4);
    memcpy(g->in_g, g->wq, (size_t)E * E * 4);
    memcpy(g->in_g + (size_t)E * E, g->wk, (size_t)Ekv * E * 4);
    memcpy(g->in_g + (size_t)(E + Ekv) * E, g->wv, (size_t)Ekv * E * 4);
    memcpy(g->in_full, g->wq, (size_t)E * E * 4);
    memcpy(g->in_full + (size_t)E * E, g->wk_full, (size_t)E * E * 4);
    memcpy(g->in_full + (size_t)2 * E * E, g->wv_full, (size_t)E * E * 4);
}
static void mod_free(gqa_mod *g)
{
    free(g->wq); free(g->wk); free(g->wv); free(g->bias); free(g->wo); free(g->bo); free(g->bk); free(g->bv);
    free(g->wk_full); free(g->wv_full); free(g->bias_full); free(g->bk_full); free(g->bv_full);
    free(g->in_g); free(g->in_full);
}

/* the GQA module (full = 0) or its MHA equivalent (full = 1) */
static mha_module mod_view(const gqa_mod *g, int full, int bias_kv)
{
    mha_module m;
    memset(&m, 0, sizeof m);
    m.embed_dim = g->E; m.num_heads = g->H; m.num_kv_heads = full ? 0 : g->Hkv;
    if (g->packed_in) {
        m.in_proj_weight = full ? g->in_full : g->in_g;
    } else {
        m.q_proj_weight = g->wq;
        m.k_proj_weight = full ? g->wk_full : g->wk;
        m.v_proj_weight = full ? g->wv_full : g->wv;
    }
    m.in_proj_bias = full ? g->bias_full : g->bias;
    m.out_proj_weight = g->wo; m.out_proj_bias = g->bo;
    if (bias_kv) { m.bias_k = full ? g->bk_full : g->bk; m.bias_v = full ? g->bv_full : g->bv; }
    m.rope = g_rope;
    return m;
}

static void one_case(int B, int Lq, int Lk, int E, int H, int Hkv, int packed_in, int bias_kv, int causal,
                     unsigned long long seed)
{
    tu_rng r = { seed };
    gqa_mod g;
    mha_module mg, mf;
    mha_options o;
    mha_module_grad gg, gf;
    size_t nq = (size_t)B * Lq * E, nk = (size_t)B * Lk * E;
    float *xq = malloc(nq * 4), *xk = malloc(nk * 4), *xv = malloc(nk * 4), *dout = malloc(nq * 4);
    float *o1 = malloc(nq * 4), *o2 = malloc(nq * 4), *o3 = malloc(nq * 4);
    int Lke = Lk + (bias_kv ? 1 : 0);
    float *w1 = malloc((size_t)B * H * Lq * Lke * 4), *w2 = malloc((size_t)B * H * Lq * Lke * 4);
    double *ref, e;
    int D, Ekv, G, pass;
    mod_make(&g, E, H, Hkv, packed_in, &r);
    D = g.D; Ekv = g.Ekv; G = H / Hkv;
    tu_fill(&r, xq, nq, 1.0f); tu_fill(&r, xk, nk, 1.0f); tu_fill(&r, xv, nk, 1.0f); tu_fill(&r, dout, nq, 1.0f);
    mg = mod_view(&g, 0, bias_kv); mf = mod_view(&g, 1, bias_kv);
    memset(&o, 0, sizeof o);
    o.causal = causal; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT; o.per_head_weights = 1;
    o.position_offset = g_offset;
    for (pass = 0; pass < 2; ++pass) {   /* weights (unfused), then fused (or head by head) */
        CHECK(mha_forward(&mg, B, Lq, Lk, xq, xk, xv, &o, o1, pass ? NULL : w1, NULL, 0) == MHA_OK, "gqa forward");
        CHECK(mha_forward(&mf, B, Lq, Lk, xq, xk, xv, &o, o3, pass ? NULL : w2, NULL, 0) == MHA_OK, "mha forward");
        e = tu_rel_err_ff(o1, o3, nq);
        CHECK(e <= 1e-6, "GQA module == MHA module on expanded K/V rows: %.3g (B%d Lq%d Lk%d E%d H%d Hkv%d in%d)",
              e, B, Lq, Lk, E, H, Hkv, packed_in);
        if (e > worst_fwd) worst_fwd = e;
        if (!pass) CHECK(tu_rel_err_ff(w1, w2, (size_t)B * H * Lq * Lke) <= 1e-6, "GQA module weights");
        /* the unfused (weights) and the fused / head-by-head outputs agree */
        if (!pass) memcpy(o2, o1, nq * sizeof(float));
        else CHECK(tu_rel_err_ff(o1, o2, nq) <= 1e-5, "fused or by-head == unfused: %.3g", tu_rel_err_ff(o1, o2, nq));
    }
    /* backward: dX equal; dWk, dWv, dbk, dbv of the GQA module = MHA's summed over each group */
    {
        size_t nw_in = packed_in ? (size_t)(E + 2 * Ekv) * E : 0, nf_in = packed_in ? (size_t)3 * E * E : 0;
        float *dxq1 = calloc(nq, 4), *dxk1 = calloc(nk, 4), *dxv1 = calloc(nk, 4);
        float *dxq2 = calloc(nq, 4), *dxk2 = calloc(nk, 4), *dxv2 = calloc(nk, 4);
        float *gin1 = calloc(nw_in + 1, 4), *gin2 = calloc(nf_in + 1, 4);
        float *gq1 = calloc((size_t)E * E, 4), *gk1 = calloc((size_t)Ekv * E, 4), *gv1 = calloc((size_t)Ekv * E, 4);
        float *gq2 = calloc((size_t)E * E, 4), *gk2 = calloc((size_t)E * E, 4), *gv2 = calloc((size_t)E * E, 4);
        float *gb1 = calloc((size_t)E + 2 * Ekv, 4), *gb2 = calloc((size_t)3 * E, 4);
        float *gbk1 = calloc((size_t)E, 4), *gbv1 = calloc((size_t)E, 4), *gbk2 = calloc((size_t)E, 4), *gbv2 = calloc((size_t)E, 4);
        float *gk1f = gk1, *gv1f = gv1, *gk2f = gk2, *gv2f = gv2;
        ref = malloc((size_t)E * E * sizeof(double));
        memset(&gg, 0, sizeof gg); memset(&gf, 0, sizeof gf);
        if (packed_in) { gg.in_proj_weight = gin1; gf.in_proj_weight = gin2;
                         gk1f = gin1 + (size_t)E * E; gv1f = gk1f + (size_t)Ekv * E;
                         gk2f = gin2 + (size_t)E * E; gv2f = gk2f + (size_t)E * E; }
        else { gg.q_proj_weight = gq1; gg.k_proj_weight = gk1; gg.v_proj_weight = gv1;
               gf.q_proj_weight = gq2; gf.k_proj_weight = gk2; gf.v_proj_weight = gv2; }
        gg.in_proj_bias = gb1; gf.in_proj_bias = gb2;
        gg.bias_k = gbk1; gg.bias_v = gbv1; gf.bias_k = gbk2; gf.bias_v = gbv2;
        CHECK(mha_backward(&mg, B, Lq, Lk, xq, xk, xv, dout, &o, dxq1, dxk1, dxv1, &gg, NULL, 0) == MHA_OK, "gqa bwd");
        CHECK(mha_backward(&mf, B, Lq, Lk, xq, xk, xv, dout, &o, dxq2, dxk2, dxv2, &gf, NULL, 0) == MHA_OK, "mha bwd");
        gcmp(dxq1, dxq2, nq, "dquery"); gcmp(dxk1, dxk2, nk, "dkey"); gcmp(dxv1, dxv2, nk, "dvalue");
        fold_rows(gk2f, ref, H, G, D, E);
        e = tu_rel_err(gk1f, ref, (size_t)Ekv * E); CHECK(e <= 1e-5, "dWk %.3g", e); if (e > worst_grad) worst_grad = e;
        fold_rows(gv2f, ref, H, G, D, E);
        e = tu_rel_err(gv1f, ref, (size_t)Ekv * E); CHECK(e <= 1e-5, "dWv %.3g", e); if (e > worst_grad) worst_grad = e;
        /* the key bias shifts a whole row of scores (softmax ignores that), so
           its gradient is rounding noise: measure it against the bias gradient's norm */
        fold_rows(gb2 + E, ref, H, G, D, 1);
        {
            double num = 0, den = 0;
            size_t t;
            for (t = 0; t < (size_t)Ekv; ++t) num += (gb1[E + t] - ref[t]) * (gb1[E + t] - ref[t]);
            for (t = 0; t < (size_t)E + 2 * Ekv; ++t) den += (double)gb1[t] * gb1[t];
            CHECK(sqrt(num / den) <= 1e-5, "dbk %.3g of ||d in_proj_bias||", sqrt(num / den));
        }
        fold_rows(gb2 + 2 * E, ref, H, G, D, 1);
        e = tu_rel_err(gb1 + E + Ekv, ref, (size_t)Ekv); CHECK(e <= 1e-5, "dbv %.3g", e);
        if (bias_kv) {
            fold_rows(gbk2, ref, H, G, D, 1);
            e = tu_rel_err(gbk1, ref, (size_t)Ekv); CHECK(e <= 1e-5, "d bias_k %.3g", e);
        }
        gcmp(gb1, gb2, (size_t)E, "dbq");
        free(ref);
        free(dxq1); free(dxk1); free(dxv1); free(dxq2); free(dxk2); free(dxv2); free(gin1); free(gin2);
        free(gq1); free(gk1); free(gv1); free(gq2); free(gk2); free(gv2); free(gb1); free(gb2);
        free(gbk1); free(gbv1); free(gbk2); free(gbv2);
    }
    free(xq); free(xk); free(xv); free(dout); free(o1); free(o2); free(o3); free(w1); free(w2);
    mod_free(&g);
}

/* ------------------------------------------------ KV cache */

static double worst_cache;

/* Decoding token by token through the cache equals one causal forward over
   the whole sequence: rows with prompts of plen[b] tokens (ragged: each row
   is prefilled through its own B = 1 view of the cache), then all rows
   decode together, one token per step, until each has L tokens... rows
   that started shorter decode longer.  x [B, L, E].  */
static void cache_matches_forward(int B, int L, const int *plen, int E, int H, int Hkv, mha_rope_kind rk,
                                  const mha_options *extra, unsigned long long seed)
{
    tu_rng r = { seed };
    gqa_mod g;
    mha_module m;
    mha_options o;
    mha_kv_cache c, row;
    int D = E / H, cap = L + 2, b, t, step, minp = L;
    size_t nx = (size_t)B * L * E, kvn = (size_t)B * Hkv * cap * D;
    float *x = malloc(nx * 4), *full = malloc(nx * 4), *got = malloc(nx * 4), *xs = malloc((size_t)B * E * 4);
    float *os = malloc((size_t)B * E * 4);
    int *len = calloc((size_t)B, sizeof(int));
    double e;
    mod_make(&g, E, H, Hkv, 0, &r);
    tu_fill(&r, x, nx, 1.0f);
    m = mod_view(&g, 0, 0);
    m.rope.kind = rk;
    o = *extra;
    o.causal = 1;
    /* the reference: each row's whole sequence in one causal forward */
    for (b = 0; b < B; ++b)
        CHECK(mha_forward(&m, 1, L, L, x + (size_t)b * L * E, x + (size_t)b * L * E, x + (size_t)b * L * E, &o,
                          full + (size_t)b * L * E, NULL, NULL, 0) == MHA_OK, "full forward");
    c.B = B; c.Hkv = Hkv; c.D = D; c.capacity = cap;
    c.k = malloc(kvn * 4); c.v = malloc(kvn * 4); c.len = len;
    /* prefill each row with its prompt: one chunk of plen[b] tokens */
    for (b = 0; b < B; ++b) {
        row = c; row.B = 1;
        row.k = c.k + (size_t)b * Hkv * cap * D; row.v = c.v + (size_t)b * Hkv * cap * D; row.len = len + b;
        CHECK(mha_forward_cached(&m, &row, plen[b], x + (size_t)b * L * E, &o, got + (size_t)b * L * E, NULL, 0)
              == MHA_OK, "prefill row %d", b);
        if (plen[b] < minp) minp = plen[b];
    }
    /* decode: every row takes its next token; rows already at L re-run nothing:
       only steps where all rows have a token left, then the rest row by row */
    for (step = minp; step < L; ++step) {
        int all = 1;
        for (b = 0; b < B; ++b) all &= len[b] < L;
        if (all) {
            for (b = 0; b < B; ++b) memcpy(xs + (size_t)b * E, x + ((size_t)b * L + len[b]) * E, (size_t)E * 4);
            for (b = 0; b < B; ++b) os[b] = (float)len[b];   /* remember where each row's token goes */
            {
                int pos[64];
                for (b = 0; b < B; ++b) pos[b] = len[b];
                CHECK(mha_forward_cached(&m, &c, 1, xs, &o, os, NULL, 0) == MHA_OK, "decode step");
                for (b = 0; b < B; ++b) memcpy(got + ((size_t)b * L + pos[b]) * E, os + (size_t)b * E, (size_t)E * 4);
            }
        }
        for (b = 0; b < B; ++b) {   /* rows left behind catch up alone */
            while (!all && len[b] < L && len[b] <= step) {
                int at = len[b];
                row = c; row.B = 1;
                row.k = c.k + (size_t)b * Hkv * cap * D; row.v = c.v + (size_t)b * Hkv * cap * D; row.len = len + b;
                CHECK(mha_forward_cached(&m, &row, 1, x + ((size_t)b * L + at) * E, &o,
                                         got + ((size_t)b * L + at) * E, NULL, 0) == MHA_OK, "catch-up");
            }
        }
    }
    for (b = 0; b < B; ++b) CHECK(len[b] == L, "row %d holds %d tokens", b, len[b]);
    for (t = 0; t < B; ++t) {
        e = tu_rel_err_ff(got + (size_t)t * L * E, full + (size_t)t * L * E, (size_t)L * E);
        CHECK(e <= 1e-6, "cache decode == one causal forward, row %d: %.3g (L%d E%d H%d Hkv%d rope%d)",
              t, e, L, E, H, Hkv, (int)rk);
        if (e > worst_cache) worst_cache = e;
    }
    free(x); free(full); free(got); free(xs); free(os); free(len); free(c.k); free(c.v);
    mod_free(&g);
}

static void cache_tests(void)
{
    mha_options o;
    int same[2] = { 4, 4 }, ragged[3] = { 1, 6, 3 }, one[1] = { 9 };
    memset(&o, 0, sizeof o);
    cache_matches_forward(2, 11, same, 24, 6, 2, MHA_ROPE_HALF, &o, 1);
    cache_matches_forward(3, 12, ragged, 32, 8, 2, MHA_ROPE_INTERLEAVED, &o, 2);
    cache_matches_forward(1, 140, one, 16, 4, 1, MHA_ROPE_HALF, &o, 3);   /* crosses a key tile */
    o.window = 1; o.window_left = 4; o.window_right = 0;
    o.softcap = 2.0f; o.alibi = 1;
    cache_matches_forward(3, 12, ragged, 24, 6, 3, MHA_ROPE_HALF, &o, 4);
    {   /* sinks */
        float sinks[6] = { 0.5f, -1.0f, 2.0f, 0.0f, 1.0f, -3.0f };
        memset(&o, 0, sizeof o); o.sinks = sinks;
        cache_matches_forward(2, 10, same, 24, 6, 2, MHA_ROPE_NONE, &o, 5);
    }
    /* past capacity: MHA_ERR_CAPACITY, nothing written */
    {
        tu_rng r = { 9 };
        gqa_mod g;
        mha_module m;
        mha_kv_cache c;
        float k[2 * 2 * 4 * 2], v[2 * 2 * 4 * 2], x[2 * 3 * 8], out[2 * 3 * 8], kn[2 * 2 * 3 * 2];
        int len[2] = { 3, 1 }, i, same_k = 1;
        size_t bytes;
        mod_make(&g, 8, 4, 2, 0, &r);
        m = mod_view(&g, 0, 0);
        c.B = 2; c.Hkv = 2; c.D = 2; c.capacity = 4; c.k = k; c.v = v; c.len = len;
        for (i = 0; i < 32; ++i) k[i] = v[i] = 5.0f;
        for (i = 0; i < 48; ++i) out[i] = 7.0f;
        tu_fill(&r, x, 48, 1.0f); tu_fill(&r, kn, 24, 1.0f);
        CHECK(mha_forward_cached(&m, &c, 2, x, NULL, out, NULL, 0) == MHA_ERR_CAPACITY, "capacity (module)");
        CHECK(mha_forward_cached_workspace_size(&m, &c, 2, NULL, &bytes) == MHA_ERR_CAPACITY, "capacity (ws)");
        CHECK(mha_kv_cache_append(&c, 2, kn, kn) == MHA_ERR_CAPACITY, "capacity (append)");
        for (i = 0; i < 32; ++i) same_k &= k[i] == 5.0f && v[i] == 5.0f;
        for (i = 0; i < 48; ++i) same_k &= out[i] == 7.0f;
        CHECK(same_k && len[0] == 3 && len[1] == 1, "nothing written past capacity");
        CHECK(mha_forward_cached(&m, &c, 1, x, NULL, out, NULL, 0) == MHA_OK && len[0] == 4 && len[1] == 2,
              "one more token fits");
        len[0] = 5;
        CHECK(mha_kv_cache_append(&c, 1, kn, kn) == MHA_ERR_INVALID_ARGUMENT, "len > capacity");
        len[0] = 1; c.Hkv = 4;
        CHECK(mha_forward_cached(&m, &c, 1, x, NULL, out, NULL, 0) == MHA_ERR_INVALID_ARGUMENT, "cache Hkv != module");
        mod_free(&g);
    }
}

/* The SDPA-level cache: append K/V, attend; equals mha_sdpa with bottom-right
   causal over the same keys, per row (ragged lengths) */
static void cache_sdpa(void)
{
    tu_rng r = { 11 };
    const int B = 2, H = 4, Hkv = 2, D = 8, cap = 40, Lq = 3;
    int len[2] = { 0, 0 }, pre[2] = { 20, 33 }, b, g, t;
    mha_kv_cache c;
    mha_options o;
    float *k = malloc((size_t)B * Hkv * cap * D * 4), *v = malloc((size_t)B * Hkv * cap * D * 4);
    float *q = malloc((size_t)B * H * Lq * D * 4), *out = malloc((size_t)B * H * Lq * D * 4);
    float *ref = malloc((size_t)H * Lq * D * 4), *kk = malloc((size_t)Hkv * cap * D * 4), *vv = malloc((size_t)Hkv * cap * D * 4);
    float lse[2 * 4 * 3], lse_ref[4 * 3];
    tu_fill(&r, k, (size_t)B * Hkv * cap * D, 1.0f); tu_fill(&r, v, (size_t)B * Hkv * cap * D, 1.0f);
    tu_fill(&r, q, (size_t)B * H * Lq * D, 1.0f);
    c.B = B; c.Hkv = Hkv; c.D = D; c.capacity = cap; c.k = k; c.v = v; c.len = len;
    len[0] = pre[0]; len[1] = pre[1];   /* filled "by another engine": the random k, v */
    memset(&o, 0, sizeof o);
    o.causal = 1; o.lse = lse; o.softcap = 3.0f;
    CHECK(mha_kv_cache_attend(&c, H, Lq, q, &o, out, NULL, 0) == MHA_OK, "cache attend");
    for (b = 0; b < B; ++b) {
        int Lk = len[b];
        double e;
        for (g = 0; g < Hkv; ++g)
            for (t = 0; t < Lk; ++t) {
                memcpy(kk + ((size_t)g * Lk + t) * D, k + (((size_t)b * Hkv + g) * cap + t) * D, (size_t)D * 4);
                memcpy(vv + ((size_t)g * Lk + t) * D, v + (((size_t)b * Hkv + g) * cap + t) * D, (size_t)D * 4);
            }
        o.num_kv_heads = Hkv; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT; o.lse = lse_ref;
        CHECK(mha_sdpa(1, H, Lq, Lk, D, D, q + (size_t)b * H * Lq * D, kk, vv, &o, ref, NULL, NULL, 0) == MHA_OK, "sdpa");
        e = tu_rel_err_ff(out + (size_t)b * H * Lq * D, ref, (size_t)H * Lq * D);
        CHECK(e == 0.0, "cache attend == sdpa on the row's keys, row %d: %.3g", b, e);
        CHECK(memcmp(lse + (size_t)b * H * Lq, lse_ref, sizeof lse_ref) == 0, "cache lse row %d", b);
        o.num_kv_heads = 0; o.causal_align = MHA_CAUSAL_TOP_LEFT; o.lse = lse;
    }
    /* append then attend: the new keys are the last ones */
    len[0] = 0; len[1] = 5;
    CHECK(mha_kv_cache_append(&c, 3, k, v) == MHA_OK && len[0] == 3 && len[1] == 8, "append");
    len[0] = 0;
    CHECK(mha_kv_cache_attend(&c, H, Lq, q, &o, out, NULL, 0) == MHA_ERR_INVALID_ARGUMENT, "a row with no key");
    free(k); free(v); free(q); free(out); free(ref); free(kk); free(vv);
}

static void errors(void)
{
    tu_rng r = { 3 };
    gqa_mod g;
    mha_module m;
    float x[2 * 3 * 12], out[2 * 3 * 12];
    size_t i, bytes;
    mod_make(&g, 12, 4, 2, 0, &r);
    tu_fill(&r, x, 72, 1.0f);
    m = mod_view(&g, 0, 0);
    m.num_kv_heads = 3;
    for (i = 0; i < 72; ++i) out[i] = 7.0f;
    CHECK(mha_forward(&m, 2, 3, 3, x, x, x, NULL, out, NULL, NULL, 0) == MHA_ERR_HEADS_DIVIDE, "Hkv 3 of 4");
    CHECK(mha_forward_workspace_size(&m, 2, 3, 3, NULL, 0, &bytes) == MHA_ERR_HEADS_DIVIDE, "ws Hkv 3 of 4");
    CHECK(mha_backward_workspace_size(&m, 2, 3, 3, NULL, &bytes) == MHA_ERR_HEADS_DIVIDE, "bwd Hkv 3 of 4");
    m.num_kv_heads = -2;
    CHECK(mha_forward(&m, 2, 3, 3, x, x, x, NULL, out, NULL, NULL, 0) == MHA_ERR_INVALID_SIZE, "Hkv < 0");
    for (i = 0; i < 72; ++i) if (out[i] != 7.0f) break;
    CHECK(i == 72, "nothing written on error");
    m.num_kv_heads = 2;
    CHECK(mha_module_pack_size(&m, &bytes) == MHA_ERR_INVALID_ARGUMENT, "no packing with GQA (yet)");
    mod_free(&g);
}

int main(void)
{
    one_case(2, 5, 7, 24, 6, 2, 0, 0, 1, 1);
    one_case(1, 9, 9, 24, 6, 1, 1, 0, 1, 2);    /* MQA, in_proj_weight [E + 2Ekv, E] */
    one_case(2, 3, 11, 16, 4, 2, 1, 1, 0, 3);   /* bias_k / bias_v of Ekv */
    one_case(1, 70, 130, 32, 8, 4, 0, 0, 1, 4); /* crosses the fused tiles */
    one_case(2, 300, 300, 16, 4, 2, 0, 0, 1, 5);/* B (Lq + 2 Lk) E >= MHA__BY_HEAD_FLOATS: head by head */
    one_case(1, 300, 300, 24, 6, 3, 1, 1, 1, 6);/* head by head with appended rows */
    /* the same with RoPE on Q and K (bias_k rows are not rotated) */
    g_rope.kind = MHA_ROPE_HALF; g_offset = 3;
    one_case(2, 5, 7, 24, 6, 2, 0, 1, 1, 7);
    one_case(2, 300, 300, 16, 4, 2, 0, 0, 1, 8);
    g_rope.kind = MHA_ROPE_INTERLEAVED; g_rope.rotary_dim = 2; g_rope.theta = 500.0f; g_offset = 0;
    one_case(1, 70, 130, 32, 8, 4, 1, 0, 1, 9);
    one_case(1, 300, 300, 24, 6, 3, 1, 1, 1, 10);
    memset(&g_rope, 0, sizeof g_rope);
    errors();
    cache_tests();
    cache_sdpa();
    printf("worst GQA module vs MHA-equivalent rel err: forward %.3g, grads %.3g\n", worst_fwd, worst_grad);
    printf("worst cache decode vs one causal forward rel err: %.3g\n", worst_cache);
    return tu_finish("decode_module");
}
