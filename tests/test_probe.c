/* The defects an adversarial probe of API 1.0 found, one test each, so none
   comes back.  Each check would fail on the header before its fix (the
   fix's commit message says what 1.0 did):
     1. the recomputing backward took a NaN row for "every key blocked":
        dq of that row 0 and its share of dv gone, while the saved backward
        gave NaN;
     2. top-left queries past Lk sat at position_offset + i > INT_MAX
        (signed overflow, status OK);
     3. a NaN row's entropy and largest weight came out 0 (a wrapped ring:
        all three statistics 0), not NaN;
     4. n_rows > Lq (repeated rows) overran the plan's rows buffer (an
        assertion; without one, the plan's own workspace refused);
     5. an encoder one-shot given run.rows or run.cache named "flags";
     6. a run shorter than its plan, without mask data of its own, read the
        plan's [Lmax, Lmax] mask as [Lq, Lk]: a wrong mask, status OK;
     7. an encoder TRAINING|WEIGHTS plan's forward that saves without
        weights overran an allocated workspace (the fused path's scratch
        was sized for the weights' path only);
     8. an SDPA one-shot over a cache whose Hkv does not divide H named
        opt->num_kv_heads (with opt NULL);
     9. an encoder's saved forward did not record the layer's norm_first,
        activation and eps: a post-norm region fed a pre-norm backward.
   Odd sizes throughout (1, 3, 5, 7, 17).  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>
#include <limits.h>

static float *vec(tu_rng *r, size_t n, float a)
{
    float *x = (float *)malloc((n ? n : 1) * sizeof(float));
    tu_fill(r, x, n, a);
    return x;
}
static float *zeros(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }
static int all_nan(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (x[i] == x[i]) return 0;
    return 1;
}
static int any_nan(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (x[i] != x[i]) return 1;
    return 0;
}
static int field_is(const mha_error *e, const char *f) { return e->field && !strcmp(e->field, f); }

/* 1. SDPA and the module: a NaN in one query row makes that row's dq NaN
   on the recomputing backward, as on the saved one. */
static void nan_backward(void)
{
    const int B = 1, H = 1, L = 5, D = 3;
    size_t n = (size_t)B * H * L * D;
    tu_rng r = { 11 };
    float *q = vec(&r, n, 1), *k = vec(&r, n, 1), *v = vec(&r, n, 1), *dout = vec(&r, n, 1);
    float *dq = zeros(n), *dk = zeros(n), *dv = zeros(n);
    mha_error err;
    q[2 * D + 1] = NAN;   /* row 2 */
    CHECK(mha_sdpa_backward(B, H, L, L, D, D, q, k, v, dout, NULL, dq, dk, dv, NULL, &err) == MHA_OK, "%s",
          err.message);
    CHECK(all_nan(dq + 2 * D, (size_t)D), "SDPA: the NaN row's dq is not NaN (recompute)");
    CHECK(any_nan(dv, n), "SDPA: the NaN row's share of dv vanished (recompute)");
    {   /* the module, cross-attention, one NaN element in one query */
        const int E = 6, Hm = 3, Lq = 3, Lk = 7;
        mha_module m;
        mha_module_grad g;
        float *x = vec(&r, (size_t)Lq * E, 1), *y = vec(&r, (size_t)Lk * E, 1), *dy = vec(&r, (size_t)Lq * E, 1);
        float *w = vec(&r, (size_t)3 * E * E, 0.4f), *wo = vec(&r, (size_t)E * E, 0.4f);
        float *dx = zeros((size_t)Lq * E), *gw = zeros((size_t)3 * E * E);
        memset(&m, 0, sizeof m);
        memset(&g, 0, sizeof g);
        m.embed_dim = E; m.num_heads = Hm; m.in_proj_weight = w; m.out_proj_weight = wo;
        g.in_proj_weight = gw;
        x[1 * E + 4] = NAN;   /* query 1 */
        CHECK(mha_module_backward(&m, 1, Lq, Lk, x, y, y, dy, NULL, dx, NULL, NULL, &g, NULL, &err) == MHA_OK, "%s",
              err.message);
        CHECK(any_nan(dx + (size_t)1 * E, (size_t)E), "module: the NaN query's dquery is not NaN");
        CHECK(any_nan(gw + (size_t)2 * E * E, (size_t)E * E), "module: its share of dWv vanished");
        free(x); free(y); free(dy); free(w); free(wo); free(dx); free(gw);
    }
    free(q); free(k); free(v); free(dout); free(dq); free(dk); free(dv);
}

/* 2. Lq > Lk with top-left alignment: query Lq - 1 sits at offset + Lq - 1. */
static void positions_past_lk(void)
{
    const int E = 4, H = 2, Lq = 5, Lk = 1;
    mha_module m;
    mha_options o;
    mha_error err;
    float w[48], wo[16], x[20], out[20];
    memset(&m, 0, sizeof m);
    memset(&o, 0, sizeof o);
    memset(w, 0, sizeof w); memset(wo, 0, sizeof wo); memset(x, 0, sizeof x);
    m.embed_dim = E; m.num_heads = H; m.in_proj_weight = w; m.out_proj_weight = wo;
    m.rope.kind = MHA_ROPE_HALF;
    o.position_offset = INT_MAX - 3;   /* fits offset + Lk, not offset + Lq */
    CHECK(mha_module_forward(&m, 1, Lq, Lk, x, x, x, &o, out, NULL, &err) == MHA_ERR_OVERFLOW &&
          field_is(&err, "opt->position_offset"), "offset + Lq past INT_MAX: %s", err.message);
    o.position_offset = INT_MAX - Lq;
    CHECK(mha_module_forward(&m, 1, Lq, Lk, x, x, x, &o, out, NULL, &err) == MHA_OK, "offset + Lq = INT_MAX: %s",
          err.message);
}

/* 3. the statistics of a NaN row are NaN on the fused, the weights', and a
   wrapped ring's path (its lse too). */
static void nan_statistics(void)
{
    const int B = 1, H = 2, L = 7, D = 5;
    size_t n = (size_t)B * H * L * D, rows = (size_t)B * H * L;
    tu_rng r = { 12 };
    float *q = vec(&r, n, 1), *k = vec(&r, n, 1), *v = vec(&r, n, 1), *out = zeros(n);
    float *w = zeros(rows * L), *lse = zeros(rows), *ent = zeros(rows), *mx = zeros(rows), *fw = zeros(rows);
    mha_run run;
    mha_error err;
    int pass;
    q[3 * D] = NAN;   /* head 0, row 3 */
    for (pass = 0; pass < 2; ++pass) {
        memset(&run, 0, sizeof run);
        run.lse = lse; run.entropy = ent; run.max_weight = mx; run.first_weight = fw;
        if (pass) run.weights = w;
        CHECK(mha_sdpa_forward(B, H, L, L, D, D, q, k, v, NULL, out, &run, &err) == MHA_OK, "%s", err.message);
        CHECK(lse[3] != lse[3] && ent[3] != ent[3] && mx[3] != mx[3] && fw[3] != fw[3],
              "%s path: NaN row statistics lse %g entropy %g max %g first %g", pass ? "weights" : "fused",
              (double)lse[3], (double)ent[3], (double)mx[3], (double)fw[3]);
        CHECK(ent[4] == ent[4] && ent[4] > 0.0f, "%s path: a clean row's entropy %g", pass ? "weights" : "fused",
              (double)ent[4]);
    }
    {   /* a ring of 4 slots holding 7 tokens (wrapped), the newest query NaN */
        const int Hkv = 1, cap = 4, Dc = 3;
        int len = 0, t;
        mha_kv_cache c;
        float *kc = zeros((size_t)Hkv * cap * Dc), *vc = zeros((size_t)Hkv * cap * Dc);
        float kn[3], vn[3], qn[6], on[6], l1[2], e1[2], m1[2], f1[2];
        memset(&c, 0, sizeof c);
        c.B = 1; c.Hkv = Hkv; c.D = Dc; c.capacity = cap; c.k = kc; c.v = vc; c.len = &len; c.ring = 1; c.n_keep = 1;
        for (t = 0; t < 7; ++t) {
            tu_fill(&r, kn, 3, 1); tu_fill(&r, vn, 3, 1);
            CHECK(mha_kv_cache_append(&c, 1, kn, vn, &err) == MHA_OK, "%s", err.message);
        }
        tu_fill(&r, qn, 6, 1);
        qn[4] = NAN;   /* head 1 */
        memset(&run, 0, sizeof run);
        run.cache = &c; run.lse = l1; run.entropy = e1; run.max_weight = m1; run.first_weight = f1;
        CHECK(mha_sdpa_forward(1, 2, 1, 0, Dc, Dc, qn, NULL, NULL, NULL, on, &run, &err) == MHA_OK, "%s",
              err.message);
        CHECK(any_nan(on + 3, 3) && l1[1] != l1[1] && e1[1] != e1[1] && m1[1] != m1[1] && f1[1] != f1[1],
              "wrapped ring: NaN row out %g lse %g entropy %g max %g first %g", (double)on[3], (double)l1[1],
              (double)e1[1], (double)m1[1], (double)f1[1]);
        CHECK(l1[0] == l1[0] && e1[0] == e1[0] && e1[0] >= 0.0f, "wrapped ring: the clean head's statistics");
        free(kc); free(vc);
    }
    free(q); free(k); free(v); free(out); free(w); free(lse); free(ent); free(mx); free(fw);
}

/* 4. at most Lq chosen rows; repeats within that are fine. */
static void rows_bound(void)
{
    const int E = 6, H = 3, L = 3;
    mha_module m;
    mha_plan *p = NULL;
    mha_sizes sz;
    mha_run run;
    mha_error err;
    tu_rng r = { 13 };
    float *w = vec(&r, (size_t)3 * E * E, 0.4f), *wo = vec(&r, (size_t)E * E, 0.4f), *x = vec(&r, (size_t)L * E, 1);
    float *out = zeros((size_t)L * E), *wt = zeros((size_t)4 * L), sentinel = 7.0f;
    int rows[4] = { 1, 1, 2, 0 };
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H; m.in_proj_weight = w; m.out_proj_weight = wo;
    CHECK(mha_module_plan_size(&m, 1, L, L, NULL, MHA_PLAN_ROWS, &sz, &err) == MHA_OK &&
          mha_module_plan(&m, 1, L, L, NULL, MHA_PLAN_ROWS, NULL, 0, &p, &err) == MHA_OK, "%s", err.message);
    memset(&run, 0, sizeof run);
    run.workspace = malloc(sz.workspace); run.workspace_bytes = sz.workspace;
    run.weights = wt; run.rows = rows; run.n_rows = 4;
    wt[0] = sentinel;
    CHECK(mha_module_run_forward(p, L, L, x, x, x, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
          field_is(&err, "run->n_rows") && wt[0] == sentinel, "4 rows of Lq 3: %s", err.message);
    run.n_rows = 3;   /* repeated row 1, within Lq */
    CHECK(mha_module_run_forward(p, L, L, x, x, x, out, &run, &err) == MHA_OK, "3 rows with a repeat: %s",
          err.message);
    CHECK(!memcmp(wt, wt + L, (size_t)L * sizeof(float)), "a repeated row gives the same weights");
    mha_plan_destroy(p);
    free(run.workspace); free(w); free(wo); free(x); free(out); free(wt);
}

/* A small encoder layer over vectors of its own. */
typedef struct enc { mha_encoder_layer ly; float *buf; } enc;
static void enc_make(enc *e, tu_rng *r, int E, int H, int F, int norm_first)
{
    size_t n = (size_t)4 * E * E + (size_t)2 * F * E + F + 8 * (size_t)E, at = 0;
    e->buf = vec(r, n, 0.3f);
    e->ly = mha_encoder_layer_defaults();
    e->ly.self_attn.embed_dim = E; e->ly.self_attn.num_heads = H;
    e->ly.self_attn.in_proj_weight = e->buf + at; at += (size_t)3 * E * E;
    e->ly.self_attn.out_proj_weight = e->buf + at; at += (size_t)E * E;
    e->ly.dim_feedforward = F; e->ly.norm_first = norm_first;
    e->ly.linear1_weight = e->buf + at; at += (size_t)F * E;
    e->ly.linear1_bias = e->buf + at; at += (size_t)F;
    e->ly.linear2_weight = e->buf + at; at += (size_t)F * E;
    e->ly.linear2_bias = e->buf + at; at += (size_t)E;
    e->ly.norm1_weight = e->buf + at; at += (size_t)E;
    e->ly.norm1_bias = e->buf + at; at += (size_t)E;
    e->ly.norm2_weight = e->buf + at; at += (size_t)E;
    e->ly.norm2_bias = e->buf + at;
}

/* 5, 7, 9: the encoder. */
static void encoder(void)
{
    const int E = 6, H = 3, F = 7, L = 5;
    size_t n = (size_t)L * E;
    tu_rng r = { 14 };
    enc post, pre;
    float *x = vec(&r, n, 1), *y = zeros(n), *y1 = zeros(n), *dy = vec(&r, n, 1), *dx = zeros(n);
    float *wt = zeros((size_t)L * L);
    int rows[1] = { 0 };
    mha_kv_cache c;
    mha_run run;
    mha_sizes sz;
    mha_plan *p = NULL, *p2 = NULL;
    mha_error err;
    enc_make(&post, &r, E, H, F, 0);
    enc_make(&pre, &r, E, H, F, 1);
    /* 5. the one-shot names the run's field */
    memset(&run, 0, sizeof run);
    run.weights = wt; run.rows = rows; run.n_rows = 1;
    CHECK(mha_encoder_forward(&post.ly, 1, L, x, NULL, y, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
          field_is(&err, "run->rows"), "encoder one-shot with rows: %s", err.message);
    memset(&run, 0, sizeof run);
    memset(&c, 0, sizeof c);
    run.cache = &c;
    CHECK(mha_encoder_forward(&post.ly, 1, L, x, NULL, y, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
          field_is(&err, "run->cache"), "encoder one-shot with a cache: %s", err.message);
    /* 7. a TRAINING|WEIGHTS plan, a forward that saves without weights, the
          workspace allocated by the run (ASan watches its bounds) */
    CHECK(mha_encoder_plan_size(&post.ly, 1, L, NULL, MHA_PLAN_TRAINING | MHA_PLAN_WEIGHTS, &sz, &err) == MHA_OK &&
          mha_encoder_plan(&post.ly, 1, L, NULL, MHA_PLAN_TRAINING | MHA_PLAN_WEIGHTS, NULL, 0, &p, &err) == MHA_OK,
          "%s", err.message);
    memset(&run, 0, sizeof run);
    run.saved = malloc(sz.saved); run.saved_bytes = sz.saved;
    CHECK(mha_encoder_run_forward(p, L, x, y, &run, &err) == MHA_OK, "saving forward: %s", err.message);
    CHECK(mha_encoder_forward(&post.ly, 1, L, x, NULL, y1, NULL, &err) == MHA_OK &&
          !memcmp(y, y1, n * sizeof(float)), "saving forward != the one-shot forward");
    /* 9. the post-norm region is refused by a pre-norm plan's backward */
    CHECK(mha_encoder_plan(&pre.ly, 1, L, NULL, MHA_PLAN_TRAINING, NULL, 0, &p2, &err) == MHA_OK, "%s", err.message);
    CHECK(mha_encoder_run_backward(p2, L, x, dy, dx, NULL, &run, &err) == MHA_ERR_SAVED &&
          field_is(&err, "run->saved"), "a post-norm saved forward in a pre-norm backward: %s", err.message);
    CHECK(mha_encoder_run_backward(p, L, x, dy, dx, NULL, &run, &err) == MHA_OK, "its own backward: %s",
          err.message);
    mha_plan_destroy(p); mha_plan_destroy(p2);
    free(run.saved); free(x); free(y); free(y1); free(dy); free(dx); free(wt); free(post.buf); free(pre.buf);
}

/* 6. a shorter run brings its own mask data; at the plan's lengths the
   plan's data serves. */
static void plan_mask_lengths(void)
{
    const int B = 1, H = 1, Lmax = 7, L = 3, D = 3;
    unsigned char mask[49];
    size_t n = (size_t)B * H * Lmax * D;
    tu_rng r = { 15 };
    float *q = vec(&r, n, 1), *k = vec(&r, n, 1), *v = vec(&r, n, 1), *out = zeros(n), sentinel = 5.0f;
    mha_options o;
    mha_plan *p = NULL;
    mha_run run;
    mha_error err;
    int i, j;
    for (i = 0; i < Lmax; ++i) for (j = 0; j < Lmax; ++j) mask[i * Lmax + j] = j > i;
    memset(&o, 0, sizeof o);
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = mask; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = o.attn_mask.shape[1] = Lmax;
    CHECK(mha_sdpa_plan(B, H, Lmax, Lmax, D, D, &o, 0, NULL, 0, &p, &err) == MHA_OK, "%s", err.message);
    out[0] = sentinel;
    CHECK(mha_sdpa_run_forward(p, L, L, q, k, v, out, NULL, &err) == MHA_ERR_MASK_SHAPE &&
          field_is(&err, "run->attn_mask") && out[0] == sentinel, "a shorter run on the plan's mask: %s",
          err.message);
    memset(&run, 0, sizeof run);
    run.attn_mask = mask;   /* [7, 7] read as [3, 3]: the first 9 bytes, whatever they mean */
    CHECK(mha_sdpa_run_forward(p, L, L, q, k, v, out, &run, &err) == MHA_OK, "its own mask data: %s",
          err.message);
    CHECK(mha_sdpa_run_forward(p, Lmax, Lmax, q, k, v, out, NULL, &err) == MHA_OK, "at the plan's lengths: %s",
          err.message);
    mha_plan_destroy(p);
    free(q); free(k); free(v); free(out);
}

/* 8. the cache's heads are the cache's fault. */
static void cache_heads(void)
{
    int len = 2;
    float kc[24], vc[24], q[16], out[16];
    mha_kv_cache c;
    mha_run run;
    mha_error err;
    memset(kc, 0, sizeof kc); memset(vc, 0, sizeof vc); memset(q, 0, sizeof q);
    memset(&c, 0, sizeof c);
    c.B = 1; c.Hkv = 3; c.D = 4; c.capacity = 2; c.k = kc; c.v = vc; c.len = &len;
    memset(&run, 0, sizeof run);
    run.cache = &c;
    CHECK(mha_sdpa_forward(1, 4, 1, 0, 4, 4, q, NULL, NULL, NULL, out, &run, &err) == MHA_ERR_HEADS_DIVIDE &&
          field_is(&err, "cache->Hkv"), "Hkv 3 of H 4, opt NULL: %s", err.message);
}

int main(void)
{
    nan_backward();
    positions_past_lk();
    nan_statistics();
    rows_bound();
    encoder();
    plan_mask_lengths();
    cache_heads();
    return tu_finish("probe");
}
