/* Plans (mha_*_plan, runs, one-shot calls as the plan on the stack).
   1. Property test: random shapes x thread counts 1-4 x options x weights on
      and off (x packed weights for the module): make the plan for the
      maxima, allocate exactly mha_sizes.workspace bytes, run at random
      lengths up to the maxima with this run's mask data in mha_run.  Every
      run succeeds and equals the one-shot call of its lengths (on one
      thread) bit for bit: SDPA forward and backward, module forward and
      backward, encoder layer.
   2. One plan run from 4 pthreads at once (each with its own workspace)
      equals a serial run bit for bit, also with packed weights
      (test_concurrency.c runs every per-run output that way).
   3. Every status the plans brought (EXCEEDS_PLAN, MISALIGNED, BAD_ENUM,
      a plan of another kind), reached on purpose, names its field and
      leaves the outputs as they were; a packed plan computes with its copy
      of the weights until mha_plan_repack.
   4. The encoder's inference plan at L = 16384, E = 512: plan plus workspace
      within the size of its input and output (peak <= 2 x inputs and
      outputs), where training keeps [L, F] activations; a run at L = 2048 through a
      counting MHA_MALLOC allocates no more than that.
   5. The chunked feed-forward of the inference encoder equals the layer
      composed from the public pieces, bit for bit, at N > MHA__FF_ROWS. */
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

static size_t live_bytes, peak_bytes;
static void *count_malloc(size_t n)
{
    size_t *p = (size_t *)malloc(n + sizeof(size_t) * 2);
    if (!p) return NULL;
    p[0] = n;
    live_bytes += n;
    if (live_bytes > peak_bytes) peak_bytes = live_bytes;
    return p + 2;
}
static void count_free(void *q)
{
    size_t *p;
    if (!q) return;
    p = (size_t *)q - 2;
    live_bytes -= p[0];
    free(p);
}
#define MHA_MALLOC(n) count_malloc(n)
#define MHA_FREE(p) count_free(p)
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "errcheck.h"

static tu_rng rng = {0x9E3779B97F4A7C15ULL};
static int irand(int lo, int hi) { return lo + (int)(tu_next(&rng) % (unsigned)(hi - lo + 1)); }
static float *rnd(size_t n, float a)
{
    float *x = (float *)malloc((n ? n : 1) * sizeof(float));
    tu_fill(&rng, x, n, a);
    return x;
}
static float *zeros(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }
static int same(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }
/* the workspace bytes of a plan (0 when the call is refused: checked) */
static size_t ws_bytes(const mha_plan *p)
{
    mha_sizes sz = {0, 0, 0};
    mha_error e;
    if (mha_plan_sizes(p, &sz, &e) != MHA_OK) { CHECK(0, "mha_plan_sizes: %s", e.message); return 0; }
    return sz.workspace;
}
/* an mha_run with a workspace of n bytes and this run's masks */
static mha_run run_with(void *ws, size_t n, const void *am, const void *kp)
{
    mha_run r;
    memset(&r, 0, sizeof r);
    r.workspace = ws; r.workspace_bytes = n;
    r.attn_mask = am; r.key_padding_mask = kp;
    return r;
}

/* Masks for one run: attn_mask [Lq, Lk] bool, key_padding_mask [B, Lk] float
   (-inf or a small value), as the kinds say; data packed for these lengths. */
typedef struct masks { unsigned char *am; float *kp; } masks;
static void make_masks(masks *m, int am_on, int kp_on, int B, int Lq, int Lk)
{
    int i;
    m->am = NULL; m->kp = NULL;
    if (am_on) {
        m->am = (unsigned char *)malloc((size_t)Lq * Lk);
        for (i = 0; i < Lq * Lk; ++i) m->am[i] = (tu_next(&rng) % 4) == 0;
    }
    if (kp_on) {
        m->kp = (float *)malloc((size_t)B * Lk * sizeof(float));
        for (i = 0; i < B * Lk; ++i) m->kp[i] = (tu_next(&rng) % 5) == 0 ? -INFINITY : 0.1f * tu_uniform(&rng);
    }
}
static void free_masks(masks *m) { free(m->am); free(m->kp); }
/* Options with the masks' kinds and shapes for lengths (Lq, Lk), data attached. */
static void set_masks(mha_options *o, const masks *m, int B, int Lq, int Lk)
{
    memset(&o->attn_mask, 0, sizeof o->attn_mask);
    memset(&o->key_padding_mask, 0, sizeof o->key_padding_mask);
    if (m->am) {
        o->attn_mask.kind = MHA_MASK_BOOL; o->attn_mask.data = m->am; o->attn_mask.ndim = 2;
        o->attn_mask.shape[0] = Lq; o->attn_mask.shape[1] = Lk;
    }
    if (m->kp) {
        o->key_padding_mask.kind = MHA_MASK_FLOAT; o->key_padding_mask.data = m->kp;
        o->key_padding_mask.ndim = 2; o->key_padding_mask.shape[0] = B; o->key_padding_mask.shape[1] = Lk;
    }
}
static void random_options(mha_options *o, int threads)
{
    memset(o, 0, sizeof *o);
    o->causal = irand(0, 2) == 0;
    o->causal_align = irand(0, 1) ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    o->scale = irand(0, 3) == 0 ? 0.3f : 0.0f;
    o->num_threads = threads;
}

/* ------------------------------------------------------------ SDPA */

static void sdpa_case(void)
{
    int B = irand(1, 3), H = irand(1, 4), D = irand(1, 20), Dv = irand(1, 20);
    int Lqm = irand(1, 40), Lkm = irand(1, 70), am_on = irand(0, 1), kp_on = irand(0, 1);
    int weights = irand(0, 1), threads = irand(1, 4), rep;
    unsigned flags = (weights ? MHA_PLAN_WEIGHTS : 0) | MHA_PLAN_TRAINING;
    mha_options o, o1;
    mha_plan *p = NULL;
    masks mk;
    size_t wsb;
    void *ws;
    mha_error e;
    mha_status st;
    random_options(&o, threads);
    make_masks(&mk, am_on, kp_on, B, Lqm, Lkm);
    set_masks(&o, &mk, B, Lqm, Lkm);   /* kinds and shapes for the maxima; data given per run */
    o.attn_mask.data = NULL; o.key_padding_mask.data = NULL;
    free_masks(&mk);
    st = mha_sdpa_plan(B, H, Lqm, Lkm, D, Dv, &o, flags, NULL, 0, &p, &e);
    CHECK(st == MHA_OK, "sdpa plan: %s", e.message);
    if (st != MHA_OK) return;
    wsb = ws_bytes(p);
    ws = malloc(wsb);
    for (rep = 0; rep < 2; ++rep) {
        int Lq = rep ? irand(1, Lqm) : Lqm, Lk = rep ? irand(1, Lkm) : Lkm;
        size_t nq = (size_t)B * H * Lq * D, nk = (size_t)B * H * Lk * D, nv = (size_t)B * H * Lk * Dv;
        size_t no = (size_t)B * H * Lq * Dv, nw = (size_t)B * H * Lq * Lk;
        float *q = rnd(nq, 1), *k = rnd(nk, 1), *v = rnd(nv, 1), *dout = rnd(no, 1);
        float *o_p = zeros(no), *o_1 = zeros(no), *w_p = weights ? zeros(nw) : NULL, *w_1 = weights ? zeros(nw) : NULL;
        float *dq_p = zeros(nq), *dk_p = zeros(nk), *dv_p = zeros(nv);
        float *dq_1 = zeros(nq), *dk_1 = zeros(nk), *dv_1 = zeros(nv);
        mha_run r, r1;
        make_masks(&mk, am_on, kp_on, B, Lq, Lk);
        r = run_with(ws, wsb, mk.am, mk.kp);
        r.weights = w_p;
        st = mha_sdpa_run_forward(p, Lq, Lk, q, k, v, o_p, &r, &e);
        CHECK(st == MHA_OK, "sdpa run Lq %d/%d Lk %d/%d: %s", Lq, Lqm, Lk, Lkm, e.message);
        /* no saved forward: the backward recomputes the forward, as the
           one-shot does (the saved forward: test_saved.c) */
        r.weights = NULL;
        st = mha_sdpa_run_backward(p, Lq, Lk, q, k, v, dout, dq_p, dk_p, dv_p, &r, &e);
        CHECK(st == MHA_OK, "sdpa run backward: %s", e.message);
        o1 = o; o1.num_threads = 1;
        set_masks(&o1, &mk, B, Lq, Lk);
        memset(&r1, 0, sizeof r1);
        r1.weights = w_1;
        CHECK(mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, k, v, &o1, o_1, &r1, &e) == MHA_OK, "sdpa one-shot: %s",
              e.message);
        CHECK(mha_sdpa_backward(B, H, Lq, Lk, D, Dv, q, k, v, dout, &o1, dq_1, dk_1, dv_1, NULL, &e) == MHA_OK,
              "sdpa backward one-shot: %s", e.message);
        CHECK(same(o_p, o_1, no) && (!weights || same(w_p, w_1, nw)),
              "sdpa plan run != one-shot (B%d H%d D%d Dv%d Lq %d/%d Lk %d/%d threads %d weights %d)",
              B, H, D, Dv, Lq, Lqm, Lk, Lkm, threads, weights);
        CHECK(same(dq_p, dq_1, nq) && same(dk_p, dk_1, nk) && same(dv_p, dv_1, nv),
              "sdpa plan backward != one-shot (B%d H%d Lq %d Lk %d threads %d)", B, H, Lq, Lk, threads);
        free_masks(&mk);
        free(q); free(k); free(v); free(dout); free(o_p); free(o_1); free(w_p); free(w_1);
        free(dq_p); free(dk_p); free(dv_p); free(dq_1); free(dk_1); free(dv_1);
    }
    free(ws);
    mha_plan_destroy(p);
}

/* ---------------------------------------------------------- module */

typedef struct modw {
    mha_module m;
    float *w[10];
    int E, kdim, vdim;
} modw;
static void make_module(modw *w, int E, int H, int sep, int bias, int bkv, int zero)
{
    int kd = sep ? irand(1, 2 * E) : E, vd = sep ? irand(1, 2 * E) : E, i;
    memset(w, 0, sizeof *w);
    w->E = E; w->kdim = kd; w->vdim = vd;
    w->m.embed_dim = E; w->m.num_heads = H;
    if (sep) {
        w->m.kdim = kd; w->m.vdim = vd;
        w->m.q_proj_weight = w->w[0] = rnd((size_t)E * E, 0.5f);
        w->m.k_proj_weight = w->w[1] = rnd((size_t)E * kd, 0.5f);
        w->m.v_proj_weight = w->w[2] = rnd((size_t)E * vd, 0.5f);
    } else {
        w->m.in_proj_weight = w->w[0] = rnd((size_t)3 * E * E, 0.5f);
    }
    w->m.out_proj_weight = w->w[3] = rnd((size_t)E * E, 0.5f);
    if (bias) {
        w->m.in_proj_bias = w->w[4] = rnd((size_t)3 * E, 0.2f);
        w->m.out_proj_bias = w->w[5] = rnd((size_t)E, 0.2f);
    }
    if (bkv) { w->m.bias_k = w->w[6] = rnd((size_t)E, 0.5f); w->m.bias_v = w->w[7] = rnd((size_t)E, 0.5f); }
    w->m.add_zero_attn = zero;
    (void)i;
}
static void free_module(modw *w) { int i; for (i = 0; i < 10; ++i) free(w->w[i]); }

static void module_case(void)
{
    static const int Es[] = {4, 6, 8, 12, 16, 24, 36};
    int E = Es[irand(0, 6)], H, B = irand(1, 3), Lqm = irand(1, 30), Lkm = irand(1, 45), rep;
    int am_on = irand(0, 1), kp_on = irand(0, 1), weights = irand(0, 1), threads = irand(1, 4);
    int pack = irand(0, 1), sep = irand(0, 1), bkv = irand(0, 3) == 0, zero = irand(0, 3) == 0;
    unsigned flags;
    modw w;
    mha_options o, o1;
    mha_plan *p = NULL;
    masks mk;
    size_t wsb, pb = 0;
    void *ws, *mem;
    mha_sizes sz;
    mha_error e;
    mha_status st;
    do H = irand(1, E); while (E % H);
    make_module(&w, E, H, sep, irand(0, 1), bkv, zero);
    random_options(&o, threads);
    o.per_head_weights = irand(0, 1);
    make_masks(&mk, am_on, kp_on, B, Lqm, Lkm);
    set_masks(&o, &mk, B, Lqm, Lkm);
    o.attn_mask.data = NULL; o.key_padding_mask.data = NULL;
    free_masks(&mk);
    flags = (weights ? MHA_PLAN_WEIGHTS : 0) | (pack ? MHA_PLAN_PACK : 0) | MHA_PLAN_TRAINING;
    /* the preallocated form: the plan in caller memory of exactly its size */
    st = mha_module_plan_size(&w.m, B, Lqm, Lkm, &o, flags, &sz, &e);
    pb = sz.plan;
    CHECK(st == MHA_OK && pb >= sizeof(void *), "module plan size: %s", e.message);
    mem = malloc(pb);
    st = mha_module_plan(&w.m, B, Lqm, Lkm, &o, flags, mem, pb, &p, &e);
    CHECK(st == MHA_OK && (void *)p == mem, "module plan: %s", e.message);
    if (st != MHA_OK) { free(mem); free_module(&w); return; }
    wsb = ws_bytes(p);
    CHECK(wsb == sz.workspace, "mha_plan_sizes says %zu workspace bytes, the size query %zu", wsb, sz.workspace);
    ws = malloc(wsb);
    for (rep = 0; rep < 2; ++rep) {
        int Lq = rep ? irand(1, Lqm) : Lqm, Lk = rep ? irand(1, Lkm) : Lkm;
        int Lke = Lk + bkv + zero, nh = o.per_head_weights ? H : 1;
        size_t nq = (size_t)B * Lq * E, nk = (size_t)B * Lk * w.kdim, nv = (size_t)B * Lk * w.vdim;
        size_t nw = (size_t)B * nh * Lq * Lke;
        float *q = rnd(nq, 1), *k = rnd(nk, 1), *v = rnd(nv, 1), *dout = rnd(nq, 1);
        float *o_p = zeros(nq), *o_1 = zeros(nq), *w_p = weights ? zeros(nw) : NULL, *w_1 = weights ? zeros(nw) : NULL;
        float *dq_p = zeros(nq), *dk_p = zeros(nk), *dv_p = zeros(nv), *dq_1 = zeros(nq), *dk_1 = zeros(nk), *dv_1 = zeros(nv);
        float *gw_p = zeros((size_t)3 * E * E), *gw_1 = zeros((size_t)3 * E * E);
        float *go_p = zeros((size_t)E * E), *go_1 = zeros((size_t)E * E);
        mha_module_grad g_p, g_1;
        memset(&g_p, 0, sizeof g_p); memset(&g_1, 0, sizeof g_1);
        if (sep) { g_p.q_proj_weight = gw_p; g_1.q_proj_weight = gw_1; }
        else { g_p.in_proj_weight = gw_p; g_1.in_proj_weight = gw_1; }
        g_p.out_proj_weight = go_p; g_1.out_proj_weight = go_1;
        mha_run r, r1;
        make_masks(&mk, am_on, kp_on, B, Lq, Lk);
        r = run_with(ws, wsb, mk.am, mk.kp);
        r.weights = w_p;
        st = mha_module_run_forward(p, Lq, Lk, q, k, v, o_p, &r, &e);
        CHECK(st == MHA_OK, "module run Lq %d/%d Lk %d/%d: %s", Lq, Lqm, Lk, Lkm, e.message);
        /* no saved forward: recompute, as the one-shot (the saved forward: test_saved.c) */
        r.weights = NULL;
        st = mha_module_run_backward(p, Lq, Lk, q, k, v, dout, dq_p, dk_p, dv_p, &g_p, &r, &e);
        CHECK(st == MHA_OK, "module run backward: %s", e.message);
        o1 = o; o1.num_threads = 1;
        set_masks(&o1, &mk, B, Lq, Lk);
        memset(&r1, 0, sizeof r1);
        r1.weights = w_1;
        CHECK(mha_module_forward(&w.m, B, Lq, Lk, q, k, v, &o1, o_1, &r1, &e) == MHA_OK, "module one-shot: %s",
              e.message);
        CHECK(mha_module_backward(&w.m, B, Lq, Lk, q, k, v, dout, &o1, dq_1, dk_1, dv_1, &g_1, NULL, &e) == MHA_OK,
              "module backward one-shot: %s", e.message);
        CHECK(same(o_p, o_1, nq) && (!weights || same(w_p, w_1, nw)),
              "module plan run != one-shot (E%d H%d B%d Lq %d/%d Lk %d/%d sep%d bkv%d zero%d threads %d "
              "weights %d pack %d)", E, H, B, Lq, Lqm, Lk, Lkm, sep, bkv, zero, threads, weights, pack);
        CHECK(same(dq_p, dq_1, nq) && same(dk_p, dk_1, nk) && same(dv_p, dv_1, nv) &&
              same(gw_p, gw_1, sep ? (size_t)E * E : (size_t)3 * E * E) && same(go_p, go_1, (size_t)E * E),
              "module plan backward != one-shot (E%d H%d B%d Lq %d Lk %d threads %d pack %d)",
              E, H, B, Lq, Lk, threads, pack);
        free_masks(&mk);
        free(q); free(k); free(v); free(dout); free(o_p); free(o_1); free(w_p); free(w_1);
        free(dq_p); free(dk_p); free(dv_p); free(dq_1); free(dk_1); free(dv_1);
        free(gw_p); free(gw_1); free(go_p); free(go_1);
    }
    mha_plan_destroy(p);   /* caller memory: nothing to free here */
    free(mem); free(ws);
    free_module(&w);
}

/* ---------------------------------------------------------- encoder */

typedef struct encw { mha_encoder_layer ly; modw a; float *w[8]; } encw;
static void make_encoder(encw *e, int E, int H, int F)
{
    int i;
    memset(e, 0, sizeof *e);
    make_module(&e->a, E, H, 0, 1, 0, 0);
    e->ly.self_attn = e->a.m;
    e->ly.dim_feedforward = F;
    e->ly.activation = irand(0, 1) ? MHA_ACT_GELU : MHA_ACT_RELU;
    e->ly.norm_first = irand(0, 1);
    e->ly.linear1_weight = e->w[0] = rnd((size_t)F * E, 0.3f);
    e->ly.linear1_bias = e->w[1] = rnd((size_t)F, 0.1f);
    e->ly.linear2_weight = e->w[2] = rnd((size_t)E * F, 0.3f);
    e->ly.linear2_bias = e->w[3] = rnd((size_t)E, 0.1f);
    e->ly.norm1_weight = e->w[4] = rnd((size_t)E, 1.0f);
    e->ly.norm1_bias = e->w[5] = rnd((size_t)E, 0.1f);
    e->ly.norm2_weight = e->w[6] = rnd((size_t)E, 1.0f);
    e->ly.norm2_bias = e->w[7] = rnd((size_t)E, 0.1f);
    for (i = 0; i < 8; ++i) if (!e->w[i]) return;
}
static void free_encoder(encw *e) { int i; for (i = 0; i < 8; ++i) free(e->w[i]); free_module(&e->a); }

static void encoder_case(void)
{
    int E = 4 * irand(1, 4), H = irand(0, 1) ? 2 : 1, F = irand(1, 40), B = irand(1, 2), Lm = irand(1, 24);
    int threads = irand(1, 4), L = irand(1, Lm), kp_on = irand(0, 1);
    size_t n = (size_t)B * L * E;
    encw e;
    mha_options o, o1;
    mha_plan *p = NULL;
    masks mk;
    float *x, *y_p, *y_1, *dy, *dx_p, *dx_1;
    void *ws;
    size_t wsb;
    mha_encoder_layer_grad g_p, g_1;
    mha_run r;
    mha_error er;
    mha_status st;
    make_encoder(&e, E, H, F);
    random_options(&o, threads);
    o.causal_align = MHA_CAUSAL_TOP_LEFT;
    make_masks(&mk, 0, kp_on, B, Lm, Lm);
    set_masks(&o, &mk, B, Lm, Lm);
    o.key_padding_mask.data = NULL;
    free_masks(&mk);
    st = mha_encoder_plan(&e.ly, B, Lm, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &er);
    CHECK(st == MHA_OK, "encoder plan: %s", er.message);
    if (st != MHA_OK) { free_encoder(&e); return; }
    wsb = ws_bytes(p);
    ws = malloc(wsb);
    x = rnd(n, 1); dy = rnd(n, 1);
    y_p = zeros(n); y_1 = zeros(n); dx_p = zeros(n); dx_1 = zeros(n);
    memset(&g_p, 0, sizeof g_p); memset(&g_1, 0, sizeof g_1);
    g_p.linear1_weight = zeros((size_t)F * E); g_1.linear1_weight = zeros((size_t)F * E);
    make_masks(&mk, 0, kp_on, B, L, L);
    r = run_with(ws, wsb, NULL, mk.kp);
    st = mha_encoder_run_forward(p, L, x, y_p, &r, &er);
    CHECK(st == MHA_OK, "encoder run: %s", er.message);
    /* no saved forward: recompute, as the one-shot (the saved forward: test_saved.c) */
    st = mha_encoder_run_backward(p, L, x, dy, dx_p, &g_p, &r, &er);
    CHECK(st == MHA_OK, "encoder run backward: %s", er.message);
    o1 = o; o1.num_threads = 1;
    set_masks(&o1, &mk, B, L, L);
    CHECK(mha_encoder_forward(&e.ly, B, L, x, &o1, y_1, NULL, &er) == MHA_OK, "encoder one-shot: %s", er.message);
    CHECK(mha_encoder_backward(&e.ly, B, L, x, dy, &o1, dx_1, &g_1, NULL, &er) == MHA_OK,
          "encoder backward one-shot: %s", er.message);
    CHECK(same(y_p, y_1, n) && same(dx_p, dx_1, n) && same(g_p.linear1_weight, g_1.linear1_weight, (size_t)F * E),
          "encoder plan != one-shot (E%d H%d F%d B%d L %d/%d threads %d pre%d)", E, H, F, B, L, Lm, threads,
          e.ly.norm_first);
    free_masks(&mk);
    free(x); free(dy); free(y_p); free(y_1); free(dx_p); free(dx_1);
    free(g_p.linear1_weight); free(g_1.linear1_weight); free(ws);
    mha_plan_destroy(p);
    free_encoder(&e);
}

/* 5. The inference encoder runs the feed-forward block MHA__FF_ROWS rows at a
   time; composed from the public calls on all rows at once it is the same. */
static void encoder_chunks(void)
{
    int E = 8, H = 2, F = 24, B = 2, L = 3 * MHA__FF_ROWS / 4 + 5, pre;   /* N > 256 rows */
    size_t n = (size_t)B * L * E, nf = (size_t)B * L * F, i;
    for (pre = 0; pre < 2; ++pre) {
        encw e;
        float *x = rnd(n, 1), *y = zeros(n), *a = zeros(n), *h = zeros(n), *t = zeros(n), *z = zeros(nf), *ref = zeros(n);
        int N = B * L;
        make_encoder(&e, E, H, F);
        e.ly.norm_first = pre;
        e.ly.activation = MHA_ACT_GELU;
        int ok = 1;
        CHECK(mha_encoder_forward(&e.ly, B, L, x, NULL, y, NULL, NULL) == MHA_OK, "encoder forward");
        /* post: h = LN1(x + SA(x)); y = LN2(h + FF(h))   pre: h = x + SA(LN1 x); y = h + FF(LN2 h) */
        if (!pre) {
            ok &= mha_module_forward(&e.ly.self_attn, B, L, L, x, x, x, NULL, a, NULL, NULL) == MHA_OK;
            for (i = 0; i < n; ++i) t[i] = x[i] + a[i];
            ok &= mha_layernorm_forward(N, E, t, e.ly.norm1_weight, e.ly.norm1_bias, 0, h, NULL) == MHA_OK;
            memcpy(t, h, n * sizeof(float));
        } else {
            ok &= mha_layernorm_forward(N, E, x, e.ly.norm1_weight, e.ly.norm1_bias, 0, t, NULL) == MHA_OK;
            ok &= mha_module_forward(&e.ly.self_attn, B, L, L, t, t, t, NULL, a, NULL, NULL) == MHA_OK;
            for (i = 0; i < n; ++i) h[i] = x[i] + a[i];
            ok &= mha_layernorm_forward(N, E, h, e.ly.norm2_weight, e.ly.norm2_bias, 0, t, NULL) == MHA_OK;
        }
        ok &= mha_linear_forward(N, E, F, t, e.ly.linear1_weight, e.ly.linear1_bias, z, NULL, NULL) == MHA_OK;
        for (i = 0; i < nf; ++i) z[i] = 0.5f * z[i] * (1.0f + erff(z[i] * 0.70710678118654752f));
        ok &= mha_linear_forward(N, F, E, z, e.ly.linear2_weight, e.ly.linear2_bias, a, NULL, NULL) == MHA_OK;
        if (!pre) {
            for (i = 0; i < n; ++i) t[i] = h[i] + a[i];
            ok &= mha_layernorm_forward(N, E, t, e.ly.norm2_weight, e.ly.norm2_bias, 0, ref, NULL) == MHA_OK;
        } else {
            for (i = 0; i < n; ++i) ref[i] = h[i] + a[i];
        }
        CHECK(ok, "the composed layer's calls succeed");
        CHECK(same(y, ref, n), "chunked inference encoder != composed layer (pre-norm %d, N %d)", pre, N);
        free(x); free(y); free(a); free(h); free(t); free(z); free(ref);
        free_encoder(&e);
    }
}

/* ------------------------------------------------------ concurrency */

typedef struct job {
    const mha_plan *p;
    int Lq, Lk;
    const float *x;
    float *out;
    mha_status st;
} job;
static void *run_job(void *arg)
{
    job *j = (job *)arg;
    size_t wsb = ws_bytes(j->p);
    void *ws = malloc(wsb);   /* each thread its own workspace (plain malloc: not counted) */
    mha_run r = run_with(ws, wsb, NULL, NULL);
    int k;
    for (k = 0; k < 3 && (j->st = mha_module_run_forward(j->p, j->Lq, j->Lk, j->x, j->x, j->x, j->out, &r,
                                                          NULL)) == MHA_OK; ++k) {}
    free(ws);
    return NULL;
}
static void concurrent(void)
{
    int E = 32, H = 4, B = 2, L = 150, pk, t;
    size_t n = (size_t)B * L * E;
    for (pk = 0; pk < 2; ++pk) {
        modw w;
        mha_options o;
        mha_plan *p = NULL;
        float *x = rnd(n, 1), *serial = zeros(n);
        pthread_t th[4];
        job jobs[4];
        mha_error e;
        make_module(&w, E, H, 0, 1, 0, 0);
        memset(&o, 0, sizeof o);
        o.causal = 1;
        o.num_threads = 2;   /* each run is itself an OpenMP team of 2 where built with OpenMP */
        CHECK(mha_module_plan(&w.m, B, L, L, &o, pk ? MHA_PLAN_PACK : 0, NULL, 0, &p, &e) == MHA_OK, "plan: %s",
              e.message);
        CHECK(mha_module_run_forward(p, L, L, x, x, x, serial, NULL, &e) == MHA_OK, "serial run: %s", e.message);
        for (t = 0; t < 4; ++t) {
            jobs[t].p = p; jobs[t].Lq = L; jobs[t].Lk = L; jobs[t].x = x;
            jobs[t].out = zeros(n); jobs[t].st = MHA_ERR_INVALID_ARGUMENT;
            CHECK(pthread_create(&th[t], NULL, run_job, &jobs[t]) == 0, "pthread_create");
        }
        for (t = 0; t < 4; ++t) {
            pthread_join(th[t], NULL);
            CHECK(jobs[t].st == MHA_OK && same(jobs[t].out, serial, n),
                  "concurrent run %d differs from the serial run (packed %d): %s", t, pk,
                  mha_status_string(jobs[t].st));
            free(jobs[t].out);
        }
        mha_plan_destroy(p);
        free(x); free(serial);
        free_module(&w);
    }
}

/* --------------------------------------------------------- statuses */

static void statuses(void)
{
    int E = 8, H = 2, B = 2, L = 6;
    size_t n = (size_t)B * L * E, nw = (size_t)B * L * L, wsb;
    modw w;
    mha_options o;
    mha_plan *p = NULL, *pt = NULL, *pp = NULL;
    float *x = rnd(n, 1), *out = zeros(n), *wts = zeros(nw), *dx = zeros(n);
    float *ref = zeros(n), *got = zeros(n);
    unsigned char am[6 * 6] = {0};
    void *ws, *mem, *saved;
    mha_sizes sz;
    mha_run r;
    mha_error e;
    make_module(&w, E, H, 0, 1, 0, 0);
    memset(&o, 0, sizeof o);
    CHECK(mha_module_plan(&w.m, B, L, L, &o, 0, NULL, 0, &p, &e) == MHA_OK, "plan: %s", e.message);
    CHECK(mha_module_plan(&w.m, B, L, L, &o, MHA_PLAN_TRAINING, NULL, 0, &pt, &e) == MHA_OK, "training plan: %s",
          e.message);
    CHECK(mha_plan_sizes(pt, &sz, &e) == MHA_OK, "sizes: %s", e.message);
    wsb = sz.workspace;
    ws = malloc(wsb);
    saved = malloc(sz.saved);
    ec_watch(out, n * sizeof(float), 1);
    ec_watch(wts, nw * sizeof(float), 1);
    ec_watch(dx, n * sizeof(float), 1);

    /* EXCEEDS_PLAN: longer than planned, weights, a saved forward, a
       backward or a mask the plan did not allow */
    r = run_with(ws, wsb, NULL, NULL);
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "Lq",
              mha_module_run_forward(p, L + 1, L, x, x, x, out, &r, ERR));
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "Lk",
              mha_module_run_forward(p, L, L + 1, x, x, x, out, &r, ERR));
    r.weights = wts;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->weights",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r.weights = NULL; r.saved = saved; r.saved_bytes = sz.saved;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->saved",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r.saved = NULL; r.saved_bytes = 0;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_backward", "plan",
              mha_module_run_backward(p, L, L, x, x, x, x, dx, NULL, NULL, NULL, &r, ERR));
    r.attn_mask = am;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->attn_mask",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r.attn_mask = NULL;
    CHECK(mha_plan_sizes(p, &sz, &e) == MHA_OK, "sizes: %s", e.message);
    r.workspace_bytes = sz.workspace - 1;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_run_forward", "run->workspace_bytes",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r.workspace_bytes = wsb;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_run_forward", "plan",   /* a plan of another kind */
              mha_encoder_run_forward(p, L, x, out, &r, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_run_forward", "plan",
              mha_sdpa_run_forward(p, L, L, x, x, x, out, &r, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_gemm_run", "plan",
              mha_gemm_run(p, 1.0f, x, E, x, E, 0.0f, out, E, &r, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_plan", "flags",   /* an unknown flag */
              mha_module_plan(&w.m, B, L, L, &o, 64u, NULL, 0, &pp, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_plan", "flags",     /* SDPA has no weights to pack */
              mha_sdpa_plan(B, H, L, L, 4, 4, &o, MHA_PLAN_PACK, NULL, 0, &pp, ERR));

    /* a packed plan computes with its copy of the weights: a change of the
       weights shows in a plan without MHA_PLAN_PACK at once, in the packed
       plan only after mha_plan_repack (and then bit for bit the same) */
    CHECK(mha_module_plan(&w.m, B, L, L, &o, MHA_PLAN_PACK, NULL, 0, &pp, &e) == MHA_OK, "packed plan: %s", e.message);
    CHECK(mha_module_run_forward(pp, L, L, x, x, x, ref, &r, &e) == MHA_OK, "packed run: %s", e.message);
    CHECK(mha_module_run_forward(p, L, L, x, x, x, got, &r, &e) == MHA_OK && same(ref, got, n),
          "packed and unpacked plans agree bit for bit");
    {
        float keep = w.w[0][0];
        w.w[0][0] += 1.0f;   /* Wq[0][0] */
        CHECK(mha_module_run_forward(pp, L, L, x, x, x, got, &r, &e) == MHA_OK && same(ref, got, n),
              "packed plan, weights changed, no repack: the packed copy is used (%s)", e.message);
        CHECK(mha_module_run_forward(p, L, L, x, x, x, ref, &r, &e) == MHA_OK && !same(ref, got, n),
              "unpacked plan reads the changed weights");
        CHECK(mha_plan_repack(pp, &e) == MHA_OK, "repack: %s", e.message);
        CHECK(mha_module_run_forward(pp, L, L, x, x, x, got, &r, &e) == MHA_OK && same(ref, got, n),
              "after mha_plan_repack the packed plan equals the unpacked one bit for bit");
        w.w[0][0] = keep;
        CHECK(mha_plan_repack(pp, &e) == MHA_OK, "repack: %s", e.message);
    }
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_plan_repack", "plan", mha_plan_repack(p, ERR));   /* not packed */
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_plan_repack", "plan", mha_plan_repack(NULL, ERR));
    mha_plan_destroy(pp);
    pp = NULL;

    /* MISALIGNED and short: a plan's caller memory */
    CHECK(mha_module_plan_size(&w.m, B, L, L, &o, 0, &sz, &e) == MHA_OK, "plan size: %s", e.message);
    mem = malloc(sz.plan + 16);
    EC_REFUSE(MHA_ERR_MISALIGNED, "mha_module_plan", "mem",
              mha_module_plan(&w.m, B, L, L, &o, 0, (char *)mem + 4, sz.plan, &pp, ERR));
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_plan", "mem_bytes",
              mha_module_plan(&w.m, B, L, L, &o, 0, mem, sz.plan - 1, &pp, ERR));
    CHECK(pp == NULL, "a refused plan leaves *plan alone");
    free(mem);
    /* BAD_ENUM: mask kind, causal alignment, transpose flag, activation */
    o.attn_mask.kind = (mha_mask_kind)9; o.attn_mask.ndim = 2; o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_module_plan", "opt->attn_mask.kind",
              mha_module_plan(&w.m, B, L, L, &o, 0, NULL, 0, &pp, ERR));
    memset(&o, 0, sizeof o);
    o.causal = 1; o.causal_align = (mha_causal_align)5;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_sdpa_plan", "opt->causal_align",
              mha_sdpa_plan(B, H, L, L, 4, 4, &o, 0, NULL, 0, &pp, ERR));
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_gemm_plan", "ta",
              mha_gemm_plan((mha_trans)2, MHA_NO_TRANS, 4, 4, 4, 1, NULL, 0, &pp, ERR));
    {
        encw en;
        make_encoder(&en, E, H, 8);
        en.ly.activation = (mha_activation)7;
        EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_encoder_forward", "layer->activation",
                  mha_encoder_forward(&en.ly, B, L, x, NULL, out, NULL, ERR));
        free_encoder(&en);
    }
    CHECK(pp == NULL, "refused plans leave *plan alone");
    ec_clear();
    free(ws); free(saved);
    mha_plan_destroy(p); mha_plan_destroy(pt);
    free(x); free(out); free(wts); free(dx); free(ref); free(got);
    free_module(&w);
}

/* ------------------------------------------------- GEMM: no shrinking */

static void gemm_plan(void)
{
    int M = 70, N = 90, K = 300, t;
    float *A = rnd((size_t)M * K, 1), *Bm = rnd((size_t)K * N, 1), *C1 = zeros((size_t)M * N), *Ct = zeros((size_t)M * N);
    mha_plan *p;
    size_t wsb;
    void *ws;
    mha_run r;
    mha_error e;
    CHECK(mha_gemm_plan(MHA_NO_TRANS, MHA_NO_TRANS, M, N, K, 1, NULL, 0, &p, &e) == MHA_OK, "gemm plan: %s", e.message);
    CHECK(mha_gemm_run(p, 1.0f, A, K, Bm, N, 0.0f, C1, N, NULL, &e) == MHA_OK, "gemm run: %s", e.message);
    mha_plan_destroy(p);
    for (t = 2; t <= 4; ++t) {
        CHECK(mha_gemm_plan(MHA_NO_TRANS, MHA_NO_TRANS, M, N, K, t, NULL, 0, &p, &e) == MHA_OK, "gemm plan: %s",
              e.message);
        wsb = ws_bytes(p);
        ws = malloc(wsb);
        r = run_with(ws, wsb - 1, NULL, NULL);
        ec_watch(Ct, (size_t)M * N * sizeof(float), 1);
        EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_gemm_run", "run->workspace_bytes",   /* refused, not shrunk */
                  mha_gemm_run(p, 1.0f, A, K, Bm, N, 0.0f, Ct, N, &r, ERR));
        ec_clear();
        r.workspace_bytes = wsb;
        CHECK(mha_gemm_run(p, 1.0f, A, K, Bm, N, 0.0f, Ct, N, &r, &e) == MHA_OK && same(C1, Ct, (size_t)M * N),
              "gemm on %d threads differs from 1", t);
        free(ws);
        mha_plan_destroy(p);
    }
    free(A); free(Bm); free(C1); free(Ct);
}

/* ------------------------------------------------- encoder memory */

static void encoder_memory(void)
{
    encw e;
    mha_options o;
    mha_sizes inf, train;
    size_t io;
    int L = 16384, E = 512;
    mha_plan *p = NULL;
    mha_error er;
    make_encoder(&e, 8, 2, 8);   /* weights of a small layer; the shapes below are declared */
    e.ly.self_attn.embed_dim = E; e.ly.self_attn.num_heads = 8; e.ly.dim_feedforward = 2048;
    memset(&o, 0, sizeof o);
    o.num_threads = 2;
    CHECK(mha_encoder_plan_size(&e.ly, 1, L, &o, 0, &inf, &er) == MHA_OK, "encoder plan size: %s", er.message);
    CHECK(inf.saved == 0, "an inference plan has no saved forward (%zu B)", inf.saved);
    CHECK(mha_encoder_plan_size(&e.ly, 1, L, &o, MHA_PLAN_TRAINING, &train, &er) == MHA_OK, "training size: %s",
          er.message);
    io = (size_t)2 * L * E * sizeof(float);   /* x and y */
    printf("NOTE encoder L=%d E=%d F=2048 H=8: inference plan %zu B + workspace %.1f MiB, x + y %.1f MiB; "
           "training workspace %.1f MiB + saved forward %.1f MiB\n", L, E, inf.plan, inf.workspace / 1048576.0,
           io / 1048576.0, train.workspace / 1048576.0, train.saved / 1048576.0);
    CHECK(inf.plan + inf.workspace <= io, "encoder inference memory %zu > x + y %zu (peak above 2x inputs and outputs)",
          inf.plan + inf.workspace, io);
    /* training keeps the [L, F] activations for the backward */
    CHECK(train.saved > (size_t)L * 2048 * sizeof(float) && train.workspace + train.saved > 8 * inf.workspace,
          "training sizes for the backward: %zu + %zu vs %zu", train.workspace, train.saved, inf.workspace);
    free_encoder(&e);
    /* a real run at L = 2048 (E = 32): all the one-shot call allocates is
       its plan's workspace (at this small E the per-thread tiles, not L E,
       dominate it) */
    {
        int Lr = 2048, Er = 32;
        size_t n = (size_t)Lr * Er, base, wsb;
        float *x, *y;
        make_encoder(&e, Er, 4, 64);
        x = rnd(n, 1); y = zeros(n);
        CHECK(mha_encoder_plan(&e.ly, 1, Lr, &o, 0, NULL, 0, &p, &er) == MHA_OK, "plan: %s", er.message);
        wsb = ws_bytes(p);
        base = peak_bytes = live_bytes;
        CHECK(mha_encoder_forward(&e.ly, 1, Lr, x, &o, y, NULL, &er) == MHA_OK, "encoder forward L=2048: %s",
              er.message);
        printf("NOTE encoder L=%d E=%d: peak MHA_MALLOC %zu B, plan workspace %zu B\n", Lr, Er,
               peak_bytes - base, wsb);
        CHECK(peak_bytes - base <= wsb, "encoder forward allocated %zu B (plan %zu)", peak_bytes - base, wsb);
        mha_plan_destroy(p);
        free(x); free(y);
        free_encoder(&e);
    }
}

/* The defaults functions spell out what zero does not. */
static void defaults(void)
{
    mha_encoder_layer ly = mha_encoder_layer_defaults();
    mha_adamw a = mha_adamw_defaults();
    CHECK(ly.dim_feedforward == 2048 && ly.activation == MHA_ACT_RELU && ly.norm_first == 0 &&
          ly.layer_norm_eps == 1e-5f && !ly.linear1_weight && !ly.self_attn.in_proj_weight, "mha_encoder_layer_defaults");
    CHECK(a.lr == 1e-3f && a.beta1 == 0.9f && a.beta2 == 0.999f && a.eps == 1e-8f && a.weight_decay == 0.01f,
          "mha_adamw_defaults: PyTorch's");
}

int main(void)
{
    int i;
    defaults();
    for (i = 0; i < 60; ++i) sdpa_case();
    for (i = 0; i < 80; ++i) module_case();
    for (i = 0; i < 25; ++i) encoder_case();
    encoder_chunks();
    concurrent();
    statuses();
    gemm_plan();
    encoder_memory();
    CHECK(live_bytes == 0, "every MHA_MALLOC was freed (%zu B live)", live_bytes);
    return tu_finish("plans");
}
