/* Decoder features in the module (mha_module_forward / _backward): grouped-
   query attention with K and V projections of Hkv*D rows.  A GQA module must
   equal the MHA module whose K/V projection rows are those of each query
   head's KV head (the repeat_interleave grouping), on the fused, unfused and
   head-by-head paths, and its weight gradients must be the MHA gradients
   summed over each group.  The MHA module itself is checked against
   PyTorch in test_golden.c and test_train_golden.c.
   Decoding with a KV cache (a module run with run.cache): token by token,
   ragged rows, rings with n_keep, GQA, RoPE, window, soft-cap, ALiBi and
   sinks equal one causal forward; the one-shot call and a decoding plan
   (MHA_PLAN_PACK | MHA_PLAN_CACHE, Lk = capacity) give the same bits, and
   the plan computes
   with its packed weights until mha_plan_repack.  The SDPA over a cache
   (mha_sdpa_forward with run.cache) equals the SDPA over the row's keys.  */
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

/* The one-shot module forward: out, and the attention weights when w is
   given. */
static mha_status fwd(const mha_module *m, int B, int Lq, int Lk, const float *q, const float *k, const float *v,
                      const mha_options *o, float *out, float *w, mha_error *err)
{
    mha_run run;
    memset(&run, 0, sizeof run);
    run.weights = w;
    err->message[0] = 0;
    return mha_module_forward(m, B, Lq, Lk, q, k, v, o, out, &run, err);
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
    mha_error err;
    mod_make(&g, E, H, Hkv, packed_in, &r);
    D = g.D; Ekv = g.Ekv; G = H / Hkv;
    tu_fill(&r, xq, nq, 1.0f); tu_fill(&r, xk, nk, 1.0f); tu_fill(&r, xv, nk, 1.0f); tu_fill(&r, dout, nq, 1.0f);
    mg = mod_view(&g, 0, bias_kv); mf = mod_view(&g, 1, bias_kv);
    memset(&o, 0, sizeof o);
    o.causal = causal; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT; o.per_head_weights = 1;
    o.position_offset = g_offset;
    for (pass = 0; pass < 2; ++pass) {   /* weights (unfused), then fused (or head by head) */
        CHECK(fwd(&mg, B, Lq, Lk, xq, xk, xv, &o, o1, pass ? NULL : w1, &err) == MHA_OK, "gqa forward: %s",
              err.message);
        CHECK(fwd(&mf, B, Lq, Lk, xq, xk, xv, &o, o3, pass ? NULL : w2, &err) == MHA_OK, "mha forward: %s",
              err.message);
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
        CHECK(mha_module_backward(&mg, B, Lq, Lk, xq, xk, xv, dout, &o, dxq1, dxk1, dxv1, &gg, NULL, &err) ==
              MHA_OK, "gqa bwd: %s", err.message);
        CHECK(mha_module_backward(&mf, B, Lq, Lk, xq, xk, xv, dout, &o, dxq2, dxk2, dxv2, &gf, NULL, &err) ==
              MHA_OK, "mha bwd: %s", err.message);
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

/* Decoding runs on two tracks that must agree bit for bit: the one-shot
   call (mha_module_forward with run.cache, Lk 0, key and value NULL) on
   one cache, and the run of a plan made for decoding (MHA_PLAN_PACK |
   MHA_PLAN_CACHE, Lk = the cache's capacity: its packed weights) on a second cache with the
   same contents, given key = value = query as the header allows. */
typedef struct track {
    mha_kv_cache c;        /* the one-shot track's cache */
    mha_kv_cache cp;       /* the plan track's */
} track;

static void track_make(track *t, int B, int Hkv, int D, int cap, int ring, int n_keep)
{
    size_t n = (size_t)B * Hkv * cap * D;
    memset(t, 0, sizeof *t);
    t->c.B = B; t->c.Hkv = Hkv; t->c.D = D; t->c.capacity = cap; t->c.ring = ring; t->c.n_keep = n_keep;
    t->cp = t->c;
    /* zeroed, so the slots no token reached compare equal too */
    t->c.k = calloc(n, 4); t->c.v = calloc(n, 4); t->c.len = calloc((size_t)B, sizeof(int));
    t->cp.k = calloc(n, 4); t->cp.v = calloc(n, 4); t->cp.len = calloc((size_t)B, sizeof(int));
}
static void track_free(track *t)
{
    free(t->c.k); free(t->c.v); free(t->c.len); free(t->cp.k); free(t->cp.v); free(t->cp.len);
}
/* The caches of the two tracks hold the same bits (every slot, every len). */
static int track_same(const track *t)
{
    size_t n = (size_t)t->c.B * t->c.Hkv * t->c.capacity * t->c.D;
    return memcmp(t->c.k, t->cp.k, n * 4) == 0 && memcmp(t->c.v, t->cp.v, n * 4) == 0 &&
           memcmp(t->c.len, t->cp.len, (size_t)t->c.B * sizeof(int)) == 0;
}
/* Row b of both caches as B = 1 views (ragged prefill goes row by row). */
static void track_row(const track *t, int b, track *row)
{
    size_t off = (size_t)b * t->c.Hkv * t->c.capacity * t->c.D;
    *row = *t;
    row->c.B = row->cp.B = 1;
    row->c.k = (float *)row->c.k + off; row->c.v = (float *)row->c.v + off; row->c.len += b;
    row->cp.k = (float *)row->cp.k + off; row->cp.v = (float *)row->cp.v + off; row->cp.len += b;
}

/* A decoding plan: PACK, B, the longest chunk Lq, Lk = capacity; its own workspace. */
typedef struct dplan { mha_plan *p; void *ws; size_t wsb; } dplan;
static void dplan_make(dplan *d, const mha_module *m, int B, int Lq, int cap, const mha_options *o)
{
    mha_sizes sz;
    mha_error err;
    memset(d, 0, sizeof *d);
    CHECK(mha_module_plan(m, B, Lq, cap, o, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &d->p, &err) == MHA_OK &&
          mha_plan_sizes(d->p, &sz, &err) == MHA_OK, "decoding plan (B %d, Lq %d, capacity %d): %s", B, Lq, cap,
          err.message);
    if (!d->p) return;
    d->wsb = sz.workspace;
    d->ws = malloc(d->wsb ? d->wsb : 1);
}
static void dplan_free(dplan *d) { mha_plan_destroy(d->p); free(d->ws); }

/* One decoding call of Lq tokens on both tracks: x [t->c.B, Lq, E] ->
   out (one-shot) and out2 (plan). */
static void dec2(const mha_module *m, const dplan *d, track *t, int Lq, const float *x, const mha_options *o,
                 float *out, float *out2, const char *what)
{
    mha_run run;
    mha_error err;
    memset(&run, 0, sizeof run);
    run.cache = &t->c;
    CHECK(mha_module_forward(m, t->c.B, Lq, 0, x, NULL, NULL, o, out, &run, &err) == MHA_OK,
          "%s (one-shot): %s", what, err.message);
    if (!d->p) return;
    run.cache = &t->cp; run.workspace = d->ws; run.workspace_bytes = d->wsb;
    CHECK(mha_module_run_forward(d->p, Lq, 0, x, x, x, out2, &run, &err) == MHA_OK, "%s (plan): %s", what,
          err.message);
}

/* Decoding token by token through the cache equals one causal forward over
   the whole sequence: rows with prompts of plen[b] tokens (ragged: each row
   is prefilled through its own B = 1 view of the cache), then all rows
   decode together, one token per step, until each has L tokens... rows
   that started shorter decode longer.  x [B, L, E].  The plan track's
   outputs and caches equal the one-shot track's bit for bit.  */
static void cache_matches_forward(int B, int L, const int *plen, int E, int H, int Hkv, mha_rope_kind rk,
                                  const mha_options *extra, unsigned long long seed)
{
    tu_rng r = { seed };
    gqa_mod g;
    mha_module m;
    mha_options o;
    track tr, row;
    dplan p1, pB;
    mha_error err;
    int D = E / H, cap = L + 2, b, t, step, minp = L, maxp = 1;
    size_t nx = (size_t)B * L * E;
    float *x = malloc(nx * 4), *full = malloc(nx * 4), *got = malloc(nx * 4), *got2 = malloc(nx * 4);
    float *xs = malloc((size_t)B * E * 4), *os = malloc((size_t)B * E * 4), *os2 = malloc((size_t)B * E * 4);
    int *len;
    double e;
    mod_make(&g, E, H, Hkv, 0, &r);
    tu_fill(&r, x, nx, 1.0f);
    m = mod_view(&g, 0, 0);
    m.rope.kind = rk;
    o = *extra;
    o.causal = 1;
    /* the reference: each row's whole sequence in one causal forward */
    for (b = 0; b < B; ++b)
        CHECK(fwd(&m, 1, L, L, x + (size_t)b * L * E, x + (size_t)b * L * E, x + (size_t)b * L * E, &o,
                  full + (size_t)b * L * E, NULL, &err) == MHA_OK, "full forward: %s", err.message);
    track_make(&tr, B, Hkv, D, cap, 0, 0);
    len = tr.c.len;
    for (b = 0; b < B; ++b) {
        if (plen[b] < minp) minp = plen[b];
        if (plen[b] > maxp) maxp = plen[b];
    }
    dplan_make(&p1, &m, 1, maxp, cap, &o);   /* the rows' prefill and catch-up */
    dplan_make(&pB, &m, B, 1, cap, &o);      /* the steps of all rows */
    /* prefill each row with its prompt: one chunk of plen[b] tokens */
    for (b = 0; b < B; ++b) {
        track_row(&tr, b, &row);
        dec2(&m, &p1, &row, plen[b], x + (size_t)b * L * E, &o, got + (size_t)b * L * E, got2 + (size_t)b * L * E,
             "prefill");
    }
    /* decode: every row takes its next token; rows already at L re-run nothing:
       only steps where all rows have a token left, then the rest row by row */
    for (step = minp; step < L; ++step) {
        int all = 1;
        for (b = 0; b < B; ++b) all &= len[b] < L;
        if (all) {
            int pos[64];
            for (b = 0; b < B; ++b) memcpy(xs + (size_t)b * E, x + ((size_t)b * L + len[b]) * E, (size_t)E * 4);
            for (b = 0; b < B; ++b) pos[b] = len[b];   /* where each row's token goes */
            dec2(&m, &pB, &tr, 1, xs, &o, os, os2, "decode step");
            for (b = 0; b < B; ++b) {
                memcpy(got + ((size_t)b * L + pos[b]) * E, os + (size_t)b * E, (size_t)E * 4);
                memcpy(got2 + ((size_t)b * L + pos[b]) * E, os2 + (size_t)b * E, (size_t)E * 4);
            }
        }
        for (b = 0; b < B; ++b) {   /* rows left behind catch up alone */
            while (!all && len[b] < L && len[b] <= step) {
                int at = len[b];
                track_row(&tr, b, &row);
                dec2(&m, &p1, &row, 1, x + ((size_t)b * L + at) * E, &o, got + ((size_t)b * L + at) * E,
                     got2 + ((size_t)b * L + at) * E, "catch-up");
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
    CHECK(memcmp(got, got2, nx * 4) == 0, "decoding plan (packed weights) != one-shot, bit for bit (L%d E%d H%d "
          "Hkv%d rope%d): rel %.3g", L, E, H, Hkv, (int)rk, tu_rel_err_ff(got2, got, nx));
    CHECK(track_same(&tr), "the plan track's cache != the one-shot track's (L%d E%d H%d Hkv%d)", L, E, H, Hkv);
    dplan_free(&p1); dplan_free(&pB);
    free(x); free(full); free(got); free(got2); free(xs); free(os); free(os2);
    track_free(&tr);
    mod_free(&g);
}

/* A rolling cache of capacity C keeping the first n_keep tokens, decoded
   token by token past C, equals one causal forward in which query i sees
   keys j < n_keep and i - (C - n_keep) < j <= i (a bool attn_mask), i.e. a
   sliding window of C - n_keep with n_keep sink tokens (StreamingLLM).
   Both tracks, bit for bit.  */
static void ring_matches_forward(int B, int L, int C, int n_keep, int P, unsigned long long seed)
{
    tu_rng r = { seed };
    gqa_mod g;
    mha_module m;
    mha_options o;
    track tr;
    dplan pl;
    mha_error err;
    mha_run run;
    int E = 24, H = 6, Hkv = 2, D = E / H, W = C - n_keep, b, i, j, t;
    size_t nx = (size_t)B * L * E;
    float *x = malloc(nx * 4), *full = malloc(nx * 4), *got = malloc(nx * 4), *got2 = malloc(nx * 4);
    float *xs = malloc((size_t)B * E * 4), *os = malloc((size_t)B * E * 4), *os2 = malloc((size_t)B * E * 4);
    unsigned char *mask = malloc((size_t)L * L);
    double e;
    mod_make(&g, E, H, Hkv, 0, &r);
    tu_fill(&r, x, nx, 1.0f);
    m = mod_view(&g, 0, 0);
    m.rope.kind = MHA_ROPE_HALF;
    for (i = 0; i < L; ++i)
        for (j = 0; j < L; ++j) mask[i * L + j] = !(j <= i && (j < n_keep || j > i - W));
    memset(&o, 0, sizeof o);
    o.causal = 1;
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = mask; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    for (b = 0; b < B; ++b)
        CHECK(fwd(&m, 1, L, L, x + (size_t)b * L * E, x + (size_t)b * L * E, x + (size_t)b * L * E, &o,
                  full + (size_t)b * L * E, NULL, &err) == MHA_OK, "ring reference: %s", err.message);
    memset(&o, 0, sizeof o);
    o.causal = 1;
    track_make(&tr, B, Hkv, D, C, 1, n_keep);
    dplan_make(&pl, &m, B, P, C, &o);   /* the prompt's chunk and the steps (Lq 1 <= P) */
    /* a prompt that fits, in one chunk per row (rows as B = 1 views would do too) */
    {
        float *xp = malloc((size_t)B * P * E * 4), *op = malloc((size_t)B * P * E * 4);
        float *op2 = malloc((size_t)B * P * E * 4);
        for (b = 0; b < B; ++b) memcpy(xp + (size_t)b * P * E, x + (size_t)b * L * E, (size_t)P * E * 4);
        dec2(&m, &pl, &tr, P, xp, &o, op, op2, "ring prefill");
        for (b = 0; b < B; ++b) {
            memcpy(got + (size_t)b * L * E, op + (size_t)b * P * E, (size_t)P * E * 4);
            memcpy(got2 + (size_t)b * L * E, op2 + (size_t)b * P * E, (size_t)P * E * 4);
        }
        free(xp); free(op); free(op2);
    }
    for (t = P; t < L; ++t) {
        for (b = 0; b < B; ++b) memcpy(xs + (size_t)b * E, x + ((size_t)b * L + t) * E, (size_t)E * 4);
        dec2(&m, &pl, &tr, 1, xs, &o, os, os2, "ring decode step");
        for (b = 0; b < B; ++b) {
            memcpy(got + ((size_t)b * L + t) * E, os + (size_t)b * E, (size_t)E * 4);
            memcpy(got2 + ((size_t)b * L + t) * E, os2 + (size_t)b * E, (size_t)E * 4);
        }
    }
    CHECK(tr.c.len[0] == L, "ring len counts every token: %d", tr.c.len[0]);
    e = tu_rel_err_ff(got, full, nx);
    CHECK(e <= 1e-6, "ring cache (C %d, keep %d) == causal forward with window + kept tokens: %.3g", C, n_keep, e);
    if (e > worst_cache) worst_cache = e;
    CHECK(memcmp(got, got2, nx * 4) == 0 && track_same(&tr),
          "ring (C %d, keep %d): the decoding plan's outputs or cache != the one-shot's, bit for bit", C, n_keep);
    /* a chunk longer than the rolling part: MHA_ERR_CAPACITY, naming cache->len */
    if (W + 1 <= L) {
        memset(&run, 0, sizeof run);
        run.cache = &tr.c;
        CHECK(mha_module_forward(&m, B, W + 1, 0, x, NULL, NULL, &o, got, &run, &err) == MHA_ERR_CAPACITY &&
              err.field && !strcmp(err.field, "cache->len"), "ring chunk longer than capacity - n_keep: %s",
              err.message);
    }
    dplan_free(&pl);
    free(x); free(full); free(got); free(got2); free(xs); free(os); free(os2); free(mask);
    track_free(&tr);
    mod_free(&g);
}

/* The decoding plan computes with the weights it packed: after the
   module's matrices change, its run still gives the old bits (the one-shot
   call, which reads the weights, gives other bits); mha_plan_repack takes
   the new weights, and then the two agree again.  A plan without
   MHA_PLAN_PACK reads the weights at every run.  */
static void pack_is_used(void)
{
    enum { B = 2, LQ = 3, CAP = 9, E = 24, H = 6, HKV = 2, D = E / H };
    tu_rng r = { 77 };
    gqa_mod g;
    mha_module m;
    mha_options o;
    mha_plan *pp = NULL, *pn = NULL;
    mha_error err;
    mha_run run;
    mha_kv_cache c;
    float x[B * LQ * E], o_old[B * LQ * E], o_pack[B * LQ * E], o_shot[B * LQ * E], o_plain[B * LQ * E];
    float *k = malloc((size_t)B * HKV * CAP * D * 4), *v = malloc((size_t)B * HKV * CAP * D * 4);
    int len[B], i;
    mod_make(&g, E, H, HKV, 0, &r);
    tu_fill(&r, x, (size_t)B * LQ * E, 1.0f);
    m = mod_view(&g, 0, 0);
    m.rope.kind = MHA_ROPE_HALF;
    memset(&o, 0, sizeof o);
    o.causal = 1;
    memset(&c, 0, sizeof c);
    c.B = B; c.Hkv = HKV; c.D = D; c.capacity = CAP; c.k = k; c.v = v; c.len = len;
    CHECK(mha_module_plan(&m, B, LQ, CAP, &o, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &pp, &err) == MHA_OK,
          "pack plan: %s", err.message);
    CHECK(mha_module_plan(&m, B, LQ, CAP, &o, MHA_PLAN_CACHE, NULL, 0, &pn, &err) == MHA_OK, "plain plan: %s",
          err.message);
    if (!pp || !pn) { mha_plan_destroy(pp); mha_plan_destroy(pn); free(k); free(v); mod_free(&g); return; }
    memset(&run, 0, sizeof run);
    run.cache = &c;
    /* each step starts from the same cache: rows holding 1 and 4 (zero) tokens, then LQ more */
#define STEP(call) do { len[0] = 1; len[1] = 4;                                                             \
        memset(k, 0, (size_t)B * HKV * CAP * D * 4); memset(v, 0, (size_t)B * HKV * CAP * D * 4);          \
        CHECK((call) == MHA_OK, "%s: %s", #call, err.message); } while (0)
    STEP(mha_module_run_forward(pp, LQ, 0, x, NULL, NULL, o_old, &run, &err));
    /* an optimizer step on every matrix (the biases are read at each run, packed or not) */
    for (i = 0; i < E * E; ++i) { g.wq[i] *= 1.25f; g.wo[i] -= 0.01f; }
    for (i = 0; i < HKV * D * E; ++i) { g.wk[i] *= 0.75f; g.wv[i] += 0.02f; }
    STEP(mha_module_run_forward(pp, LQ, 0, x, NULL, NULL, o_pack, &run, &err));
    STEP(mha_module_forward(&m, B, LQ, 0, x, NULL, NULL, &o, o_shot, &run, &err));
    STEP(mha_module_run_forward(pn, LQ, 0, x, NULL, NULL, o_plain, &run, &err));
    CHECK(memcmp(o_pack, o_old, sizeof o_old) == 0, "a PACK plan's decode step read the changed weights");
    CHECK(memcmp(o_shot, o_old, sizeof o_old) != 0, "the changed weights did not change the one-shot step");
    CHECK(memcmp(o_plain, o_shot, sizeof o_old) == 0, "a plan without PACK != the one-shot after the change");
    CHECK(mha_plan_repack(pp, &err) == MHA_OK, "repack: %s", err.message);
    STEP(mha_module_run_forward(pp, LQ, 0, x, NULL, NULL, o_pack, &run, &err));
    CHECK(memcmp(o_pack, o_shot, sizeof o_old) == 0, "after mha_plan_repack the PACK plan's step != one-shot");
    CHECK(mha_plan_repack(pn, &err) == MHA_ERR_INVALID_ARGUMENT && err.field && !strcmp(err.field, "plan"),
          "repack of a plan without MHA_PLAN_PACK: %s", err.message);
#undef STEP
    mha_plan_destroy(pp); mha_plan_destroy(pn);
    free(k); free(v);
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
    {   /* decode steps past 2048 keys: split-K through the cache */
        int longp[2] = { 2120, 2101 };
        cache_matches_forward(2, 2130, longp, 16, 4, 1, MHA_ROPE_HALF, &o, 33);
    }
    o.window = 1; o.window_left = 4; o.window_right = 0;
    o.softcap = 2.0f; o.alibi = 1;
    cache_matches_forward(3, 12, ragged, 24, 6, 3, MHA_ROPE_HALF, &o, 4);
    {   /* sinks */
        float sinks[6] = { 0.5f, -1.0f, 2.0f, 0.0f, 1.0f, -3.0f };
        memset(&o, 0, sizeof o); o.sinks = sinks;
        cache_matches_forward(2, 10, same, 24, 6, 2, MHA_ROPE_NONE, &o, 5);
    }
    ring_matches_forward(2, 30, 8, 0, 5, 40);    /* pure sliding window of 8 */
    ring_matches_forward(1, 40, 10, 3, 10, 41);  /* 3 sink tokens + 7 rolling */
    ring_matches_forward(2, 300, 140, 4, 100, 42);
    pack_is_used();
    /* past capacity: MHA_ERR_CAPACITY, nothing written; other refusals name their field */
    {
        tu_rng r = { 9 };
        gqa_mod g;
        mha_module m;
        mha_kv_cache c;
        mha_plan *p = NULL, *small = NULL;
        mha_run run;
        mha_error err;
        mha_options om;
        float k[2 * 2 * 4 * 2], v[2 * 2 * 4 * 2], x[2 * 3 * 8], out[2 * 3 * 8], kn[2 * 2 * 3 * 2];
        int len[2] = { 3, 1 }, i, same_k = 1;
        mod_make(&g, 8, 4, 2, 0, &r);
        m = mod_view(&g, 0, 0);
        memset(&c, 0, sizeof c);
        c.B = 2; c.Hkv = 2; c.D = 2; c.capacity = 4; c.k = k; c.v = v; c.len = len;
        for (i = 0; i < 32; ++i) k[i] = v[i] = 5.0f;
        for (i = 0; i < 48; ++i) out[i] = 7.0f;
        tu_fill(&r, x, 48, 1.0f); tu_fill(&r, kn, 24, 1.0f);
        memset(&run, 0, sizeof run);
        run.cache = &c;
        CHECK(mha_module_forward(&m, 2, 2, 0, x, NULL, NULL, NULL, out, &run, &err) == MHA_ERR_CAPACITY &&
              !strcmp(err.field, "cache->len") && !strcmp(err.function, "mha_module_forward"),
              "capacity (module one-shot): %s", err.message);
        CHECK(mha_module_plan(&m, 2, 3, 4, NULL, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &p, &err) == MHA_OK,
              "plan: %s", err.message);
        CHECK(p && mha_module_run_forward(p, 2, 0, x, NULL, NULL, out, &run, &err) == MHA_ERR_CAPACITY &&
              !strcmp(err.field, "cache->len") && !strcmp(err.function, "mha_module_run_forward"),
              "capacity (plan run): %s", err.message);
        CHECK(mha_kv_cache_append(&c, 2, kn, kn, &err) == MHA_ERR_CAPACITY && !strcmp(err.field, "cache->len"),
              "capacity (append): %s", err.message);
        for (i = 0; i < 32; ++i) same_k &= k[i] == 5.0f && v[i] == 5.0f;
        for (i = 0; i < 48; ++i) same_k &= out[i] == 7.0f;
        CHECK(same_k && len[0] == 3 && len[1] == 1, "nothing written past capacity");
        CHECK(mha_module_forward(&m, 2, 1, 0, x, NULL, NULL, NULL, out, &run, &err) == MHA_OK && len[0] == 4 &&
              len[1] == 2, "one more token fits: %s", err.message);
        len[0] = 5;
        CHECK(mha_kv_cache_append(&c, 1, kn, kn, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "cache->len"), "len > capacity: %s", err.message);
        len[0] = 1; len[1] = 1;
        for (i = 0; i < 48; ++i) out[i] = 7.0f;
        /* the run's other arguments: Lk must be 0, key NULL or query, no saved forward or weights,
           no masks, a plan whose Lk holds the capacity, the module's KV heads */
        CHECK(mha_module_forward(&m, 2, 1, 1, x, NULL, NULL, NULL, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "Lk"), "Lk 1 with a cache: %s", err.message);
        CHECK(p && mha_module_run_forward(p, 1, 0, x, x + 8, NULL, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "key"), "a key that is not query: %s", err.message);
        run.weights = out;
        CHECK(mha_module_forward(&m, 2, 1, 0, x, NULL, NULL, NULL, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "run->weights"), "weights with a cache: %s", err.message);
        run.weights = NULL;
        memset(&om, 0, sizeof om);
        om.key_padding_mask.kind = MHA_MASK_BOOL; om.key_padding_mask.data = kn;
        om.key_padding_mask.ndim = 2; om.key_padding_mask.shape[0] = 2; om.key_padding_mask.shape[1] = 4;
        CHECK(mha_module_forward(&m, 2, 1, 0, x, NULL, NULL, &om, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "opt->key_padding_mask"), "a mask with a cache: %s", err.message);
        CHECK(mha_module_plan(&m, 2, 1, 3, NULL, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &small, &err) == MHA_OK,
              "small plan: %s", err.message);
        CHECK(small && mha_module_run_forward(small, 1, 0, x, NULL, NULL, out, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
              !strcmp(err.field, "cache->capacity"), "a plan with Lk < capacity: %s", err.message);
        mha_plan_destroy(small);
        small = NULL;
        CHECK(mha_module_plan(&m, 2, 1, 4, NULL, MHA_PLAN_PACK, NULL, 0, &small, &err) == MHA_OK,
              "plan without MHA_PLAN_CACHE: %s", err.message);
        CHECK(small && mha_module_run_forward(small, 1, 0, x, NULL, NULL, out, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
              !strcmp(err.field, "run->cache"), "run.cache on a plan without MHA_PLAN_CACHE: %s", err.message);
        c.Hkv = 4;
        CHECK(mha_module_forward(&m, 2, 1, 0, x, NULL, NULL, NULL, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "cache->Hkv"), "cache Hkv != module: %s", err.message);
        c.Hkv = 2; c.B = 1;
        CHECK(p && mha_module_run_forward(p, 1, 0, x, NULL, NULL, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "cache->B"), "cache B != plan's: %s", err.message);
        c.B = 2;
        m.bias_k = g.bk; m.bias_v = g.bv;
        CHECK(mha_module_forward(&m, 2, 1, 0, x, NULL, NULL, NULL, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "run->cache"), "bias_k with a cache: %s", err.message);
        same_k = len[0] == 1 && len[1] == 1;
        for (i = 0; i < 48; ++i) same_k &= out[i] == 7.0f;
        CHECK(same_k, "a refused decoding call wrote its output or the cache's len");
        mha_plan_destroy(p); mha_plan_destroy(small);
        mod_free(&g);
    }
}

/* The SDPA-level cache: append K/V, attend (mha_sdpa_forward with
   run.cache, k = v = NULL, Lk 0); equals mha_sdpa_forward with bottom-right
   causal over the same keys, per row (ragged lengths), bit for bit, lse
   too; an SDPA plan made for the cache (Lk = capacity, num_kv_heads =
   Hkv) gives the one-shot's bits.  */
static void cache_sdpa(void)
{
    tu_rng r = { 11 };
    const int B = 2, H = 4, Hkv = 2, D = 8, cap = 40, Lq = 3;
    int len[2] = { 0, 0 }, pre[2] = { 20, 33 }, b, g, t;
    mha_kv_cache c;
    mha_options o;
    mha_run run;
    mha_error err;
    mha_plan *p = NULL;
    float *k = malloc((size_t)B * Hkv * cap * D * 4), *v = malloc((size_t)B * Hkv * cap * D * 4);
    float *q = malloc((size_t)B * H * Lq * D * 4), *out = malloc((size_t)B * H * Lq * D * 4);
    float *out2 = malloc((size_t)B * H * Lq * D * 4);
    float *ref = malloc((size_t)H * Lq * D * 4), *kk = malloc((size_t)Hkv * cap * D * 4), *vv = malloc((size_t)Hkv * cap * D * 4);
    float lse[2 * 4 * 3], lse2[2 * 4 * 3], lse_ref[4 * 3];
    tu_fill(&r, k, (size_t)B * Hkv * cap * D, 1.0f); tu_fill(&r, v, (size_t)B * Hkv * cap * D, 1.0f);
    tu_fill(&r, q, (size_t)B * H * Lq * D, 1.0f);
    memset(&c, 0, sizeof c);
    c.B = B; c.Hkv = Hkv; c.D = D; c.capacity = cap; c.k = k; c.v = v; c.len = len;
    len[0] = pre[0]; len[1] = pre[1];   /* filled "by another engine": the random k, v */
    memset(&o, 0, sizeof o);
    o.causal = 1; o.softcap = 3.0f;
    memset(&run, 0, sizeof run);
    run.cache = &c; run.lse = lse;
    CHECK(mha_sdpa_forward(B, H, Lq, 0, D, D, q, NULL, NULL, &o, out, &run, &err) == MHA_OK, "cache attend: %s",
          err.message);
    o.num_kv_heads = Hkv;
    CHECK(mha_sdpa_plan(B, H, Lq, cap, D, D, &o, MHA_PLAN_CACHE, NULL, 0, &p, &err) == MHA_OK, "cache plan: %s",
          err.message);
    run.lse = lse2;
    CHECK(p && mha_sdpa_run_forward(p, Lq, 0, q, NULL, NULL, out2, &run, &err) == MHA_OK, "cache plan run: %s",
          err.message);
    CHECK(memcmp(out, out2, (size_t)B * H * Lq * D * 4) == 0 && memcmp(lse, lse2, sizeof lse) == 0,
          "SDPA plan over the cache != the one-shot call, bit for bit");
    for (b = 0; b < B; ++b) {
        int Lk = len[b];
        double e;
        mha_run rr;
        for (g = 0; g < Hkv; ++g)
            for (t = 0; t < Lk; ++t) {
                memcpy(kk + ((size_t)g * Lk + t) * D, k + (((size_t)b * Hkv + g) * cap + t) * D, (size_t)D * 4);
                memcpy(vv + ((size_t)g * Lk + t) * D, v + (((size_t)b * Hkv + g) * cap + t) * D, (size_t)D * 4);
            }
        o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
        memset(&rr, 0, sizeof rr);
        rr.lse = lse_ref;
        CHECK(mha_sdpa_forward(1, H, Lq, Lk, D, D, q + (size_t)b * H * Lq * D, kk, vv, &o, ref, &rr, &err) == MHA_OK,
              "sdpa: %s", err.message);
        e = tu_rel_err_ff(out + (size_t)b * H * Lq * D, ref, (size_t)H * Lq * D);
        CHECK(e == 0.0, "cache attend == sdpa on the row's keys, row %d: %.3g", b, e);
        CHECK(memcmp(lse + (size_t)b * H * Lq, lse_ref, sizeof lse_ref) == 0, "cache lse row %d", b);
        o.causal_align = MHA_CAUSAL_TOP_LEFT;
    }
    /* append then attend: the new keys are the last ones */
    len[0] = 0; len[1] = 5;
    CHECK(mha_kv_cache_append(&c, 3, k, v, &err) == MHA_OK && len[0] == 3 && len[1] == 8, "append: %s", err.message);
    /* the queries are the newest tokens of each row: a row holding fewer is refused */
    len[0] = 2;
    CHECK(mha_sdpa_forward(B, H, Lq, 0, D, D, q, NULL, NULL, &o, out, &run, &err) == MHA_ERR_CAPACITY &&
          !strcmp(err.field, "cache->len"), "a row with fewer tokens than queries: %s", err.message);
    len[0] = 3;
    CHECK(mha_sdpa_forward(B, H, Lq, 0, D, D, q, k, v, &o, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
          !strcmp(err.field, "k"), "k with a cache: %s", err.message);
    o.num_kv_heads = 1;
    CHECK(mha_sdpa_forward(B, H, Lq, 0, D, D, q, NULL, NULL, &o, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
          !strcmp(err.field, "cache->Hkv"), "options' KV heads != the cache's: %s", err.message);
    mha_plan_destroy(p);
    o.num_kv_heads = Hkv;
    p = NULL;
    CHECK(mha_sdpa_plan(B, H, Lq, cap - 1, D, D, &o, MHA_PLAN_CACHE, NULL, 0, &p, &err) == MHA_OK, "short plan: %s",
          err.message);
    CHECK(p && mha_sdpa_run_forward(p, Lq, 0, q, NULL, NULL, out2, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
          !strcmp(err.field, "cache->capacity"), "an SDPA plan with Lk < capacity: %s", err.message);
    mha_plan_destroy(p);
    p = NULL;
    CHECK(mha_sdpa_plan(B, H, Lq, cap, D, D, &o, 0, NULL, 0, &p, &err) == MHA_OK, "plain plan: %s", err.message);
    CHECK(p && mha_sdpa_run_forward(p, Lq, 0, q, NULL, NULL, out2, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
          !strcmp(err.field, "run->cache"), "run.cache on an SDPA plan without MHA_PLAN_CACHE: %s", err.message);
    mha_plan_destroy(p);
    free(k); free(v); free(q); free(out); free(out2); free(ref); free(kk); free(vv);
}

static void errors(void)
{
    tu_rng r = { 3 };
    gqa_mod g;
    mha_module m;
    mha_sizes sz, sz_pack;
    mha_error err;
    float x[2 * 3 * 12], out[2 * 3 * 12];
    size_t i;
    mod_make(&g, 12, 4, 2, 0, &r);
    tu_fill(&r, x, 72, 1.0f);
    m = mod_view(&g, 0, 0);
    m.num_kv_heads = 3;
    for (i = 0; i < 72; ++i) out[i] = 7.0f;
    CHECK(fwd(&m, 2, 3, 3, x, x, x, NULL, out, NULL, &err) == MHA_ERR_HEADS_DIVIDE &&
          !strcmp(err.field, "m->num_kv_heads"), "Hkv 3 of 4: %s", err.message);
    CHECK(mha_module_plan_size(&m, 2, 3, 3, NULL, 0, &sz, &err) == MHA_ERR_HEADS_DIVIDE &&
          !strcmp(err.field, "m->num_kv_heads"), "size Hkv 3 of 4: %s", err.message);
    CHECK(mha_module_plan_size(&m, 2, 3, 3, NULL, MHA_PLAN_TRAINING, &sz, &err) == MHA_ERR_HEADS_DIVIDE,
          "training size Hkv 3 of 4: %s", err.message);
    m.num_kv_heads = -2;
    CHECK(fwd(&m, 2, 3, 3, x, x, x, NULL, out, NULL, &err) == MHA_ERR_INVALID_SIZE &&
          !strcmp(err.field, "m->num_kv_heads"), "Hkv < 0: %s", err.message);
    for (i = 0; i < 72; ++i) if (out[i] != 7.0f) break;
    CHECK(i == 72, "nothing written on error");
    /* a GQA module packs its Ekv-row K and V projections into the plan (1.0:
       MHA_PLAN_PACK; 0.1 refused GQA packing): the plan grows by the panels */
    m.num_kv_heads = 2;
    CHECK(mha_module_plan_size(&m, 2, 3, 3, NULL, 0, &sz, &err) == MHA_OK &&
          mha_module_plan_size(&m, 2, 3, 3, NULL, MHA_PLAN_PACK, &sz_pack, &err) == MHA_OK &&
          sz_pack.plan >= sz.plan + (size_t)(2 * 12 * 12 + 2 * 6 * 12) * sizeof(float),
          "GQA module with MHA_PLAN_PACK: %s (plan %lu vs %lu bytes)", err.message, (unsigned long)sz_pack.plan,
          (unsigned long)sz.plan);
    /* RoPE and positions: bad values get their status, nothing written */
    {
        mha_options o;
        memset(&o, 0, sizeof o);
        m.rope.kind = (mha_rope_kind)5;
        CHECK(fwd(&m, 2, 3, 3, x, x, x, NULL, out, NULL, &err) == MHA_ERR_BAD_ENUM &&
              !strcmp(err.field, "m->rope.kind"), "module rope kind: %s", err.message);
        m.rope.kind = MHA_ROPE_HALF; m.rope.rotary_dim = 3;
        CHECK(fwd(&m, 2, 3, 3, x, x, x, NULL, out, NULL, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "m->rope.rotary_dim"), "odd rotary dim: %s", err.message);
        m.rope.rotary_dim = 4;   /* D = 3 here */
        CHECK(fwd(&m, 2, 3, 3, x, x, x, NULL, out, NULL, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "m->rope.rotary_dim"), "rotary dim > D: %s", err.message);
        m.rope.rotary_dim = 2; m.rope.theta = -1.0f;
        CHECK(mha_module_plan_size(&m, 2, 3, 3, NULL, MHA_PLAN_TRAINING, &sz, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "m->rope.theta"), "negative theta: %s", err.message);
        m.rope.theta = 0.0f;
        o.position_offset = -1;
        CHECK(fwd(&m, 2, 3, 3, x, x, x, &o, out, NULL, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "opt->position_offset"), "negative position: %s", err.message);
        o.position_offset = 0; o.window = 1; o.window_left = -3;
        CHECK(fwd(&m, 2, 3, 3, x, x, x, &o, out, NULL, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "opt->window_left"), "module window: %s", err.message);
        o.window = 0; o.softcap = -2.0f;
        CHECK(fwd(&m, 2, 3, 3, x, x, x, &o, out, NULL, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "opt->softcap"), "module softcap: %s", err.message);
        o.softcap = 0.0f; o.num_kv_heads = 4;
        CHECK(fwd(&m, 2, 3, 3, x, x, x, &o, out, NULL, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "opt->num_kv_heads"), "module with opt.num_kv_heads: %s", err.message);
        for (i = 0; i < 72; ++i) if (out[i] != 7.0f) break;
        CHECK(i == 72, "nothing written on a bad RoPE / decoder option");
        o.num_kv_heads = 0;
        CHECK(fwd(&m, 2, 3, 3, x, x, x, &o, out, NULL, &err) == MHA_OK, "and then valid: %s", err.message);
        m.rope.kind = MHA_ROPE_NONE;
    }
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
