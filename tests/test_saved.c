/* The explicit saved forward (issue 18, item 1).  A forward run of a
   MHA_PLAN_TRAINING plan given run.saved writes there what its backward
   needs; a backward given run.saved reads that region as it is; a backward
   given run.saved = NULL computes the forward again.
   (a) SDPA, module and encoder layer, odd sizes (1, 3, 7, 17, 130) and
       round ones, with masks (bool and float, fully blocked rows), causal
       in both alignments, windows, softcap, ALiBi, sinks and their
       gradient, GQA, RoPE, separate q/k/v weights with kdim/vdim, biases,
       bias_k/bias_v, add_zero_attn, packed weights, pre- and post-norm,
       ReLU and GELU: the backward given the saved forward of X equals the
       one-shot backward at X within TOL (relative, each gradient array on
       its own; the worst is printed), bit-identical on 1, 2 and 3 threads
       (the region of the 3-thread run starts at an odd address); the
       forward that saves gives the one-shot forward's output bit for bit;
       the one-shot calls share a region too (mha_*_forward with run.saved,
       then mha_*_backward with the same run.saved).
   (b) The backward with run.saved = NULL gives the one-shot backward's bits.
   (c) The region is read as it is, whatever changed since the forward:
       SDPA: the saved lse raised by 1 scales every probability, so every
       gradient, by exactly e^-1.  Module and encoder: after a bias change
       (in_proj_bias's Q part + 1; the encoder's linear1_bias too) the
       saved backward is the one-shot backward at the OLD weights (no
       backward formula reads a bias, and the activations are the old
       ones); after one element of Wq changes, every weight gradient is
       still the old weights' (dWo = dout^T C reads only the saved C, the
       others the saved Q, K, V) and only dquery = dQ Wq sees the new
       matrix.  Either way the saved backward differs from the one that
       recomputes with the new weights, and run.saved = NULL gives that
       one's bits (the plan with MHA_PLAN_PACK after mha_plan_repack).
   (d) Refusals, nothing written: a region no forward wrote, written by a
       forward of another shape (Lq, Lk, KV heads, the encoder's L) or of
       another kind of plan (SDPA, module, encoder) is MHA_ERR_SAVED naming
       run->saved; one byte less than the run's least saved_bytes (found by
       bisection; the plan's sizes.saved must do) is
       MHA_ERR_WORKSPACE_TOO_SMALL naming run->saved_bytes; run.saved on a
       plan without MHA_PLAN_TRAINING is MHA_ERR_EXCEEDS_PLAN.  A region
       belongs to the shape, not to the plan: another training plan of the
       same shape (other threads) reads it.
   (e) A training plan's forward writes run.lse, entropy, max_weight and
       first_weight whether it saves or not: the inference one-shot
       forward's bits.  A forward that does not save leaves the region as
       it was (a second backward from it gives the first one's bits).  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5

static double worst;
static tu_rng rng = {0x5A17EDF0A11ULL};

static float *rnd(size_t n, float a)
{
    float *x = (float *)malloc((n ? n : 1) * sizeof(float));
    tu_fill(&rng, x, n, a);
    return x;
}
static float *zeros(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }
static int same(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }
static double rel(const float *a, const float *b, size_t n)
{
    double e = tu_rel_err_ff(a, b, n);
    if (e > worst) worst = e;
    return e;
}
static int field_is(const mha_error *e, const char *f) { return e->field && !strcmp(e->field, f); }
static int all_zero(const float *a, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (a[i] != 0.0f) return 0;
    return 1;
}

/* A run with a workspace and a saved region (either may be NULL). */
static mha_run mkrun(void *ws, size_t wsb, void *saved, size_t saved_bytes)
{
    mha_run r;
    memset(&r, 0, sizeof r);
    r.workspace = ws; r.workspace_bytes = wsb;
    r.saved = saved; r.saved_bytes = saved_bytes;
    return r;
}

/* The row statistics of n rows (NaN until written). */
typedef struct stats { float *lse, *ent, *maxw, *first; size_t n; } stats;
static void stats_make(stats *s, size_t n)
{
    size_t i;
    s->n = n;
    s->lse = malloc(n * 4); s->ent = malloc(n * 4); s->maxw = malloc(n * 4); s->first = malloc(n * 4);
    for (i = 0; i < n; ++i) s->lse[i] = s->ent[i] = s->maxw[i] = s->first[i] = NAN;
}
static void stats_free(stats *s) { free(s->lse); free(s->ent); free(s->maxw); free(s->first); }
static void stats_into(mha_run *r, const stats *s)
{
    r->lse = s->lse; r->entropy = s->ent; r->max_weight = s->maxw; r->first_weight = s->first;
}
static int stats_same(const stats *a, const stats *b)
{
    return same(a->lse, b->lse, a->n) && same(a->ent, b->ent, a->n) && same(a->maxw, b->maxw, a->n) &&
           same(a->first, b->first, a->n);
}

/* A caller's saved region of n bytes; odd: it starts at an odd address.
   Filled with a pattern no forward writes (a region never written). */
typedef struct region { unsigned char *buf; void *p; size_t n; } region;
static void region_make(region *r, size_t n, int odd)
{
    r->buf = (unsigned char *)malloc(n + 8);
    memset(r->buf, 0xA5, n + 8);
    r->p = r->buf + (odd ? 3 : 0);
    r->n = n;
}
static void region_free(region *r) { free(r->buf); }

/* A training plan's sizes (workspace and saved bytes). */
static mha_sizes plan_sizes(const mha_plan *p)
{
    mha_sizes sz = { 0, 0, 0 };
    mha_error err;
    memset(&sz, 0, sizeof sz);
    CHECK(p && mha_plan_sizes(p, &sz, &err) == MHA_OK, "mha_plan_sizes: %s", p ? err.message : "no plan");
    return sz;
}

/* a float key padding mask [B, Lk] and a bool attention mask [Lq, Lk], when given */
static void set_masks(mha_options *o, int B, int Lq, int Lk, const float *kpm, const unsigned char *mask)
{
    if (kpm) {
        o->key_padding_mask.kind = MHA_MASK_FLOAT; o->key_padding_mask.data = kpm;
        o->key_padding_mask.ndim = 2; o->key_padding_mask.shape[0] = B; o->key_padding_mask.shape[1] = Lk;
    }
    if (mask) {
        o->attn_mask.kind = MHA_MASK_BOOL; o->attn_mask.data = mask;
        o->attn_mask.ndim = 2; o->attn_mask.shape[0] = Lq; o->attn_mask.shape[1] = Lk;
    }
}

/* ------------------------------------------------------------- SDPA */

typedef struct scase {
    int B, H, Hkv, Lq, Lk, D, Dv;
    int causal, bottom_right, window, left, right;
    float softcap;
    int alibi, sinks, kpm, mask;
} scase;

typedef struct sdata {
    float *q, *k, *v, *dout, *kpm, *sinks;
    unsigned char *mask;
    size_t nq, nk, nv, no, nr;
} sdata;

static void sdata_make(const scase *c, sdata *s)
{
    int i;
    s->nq = (size_t)c->B * c->H * c->Lq * c->D; s->nk = (size_t)c->B * c->Hkv * c->Lk * c->D;
    s->nv = (size_t)c->B * c->Hkv * c->Lk * c->Dv; s->no = (size_t)c->B * c->H * c->Lq * c->Dv;
    s->nr = (size_t)c->B * c->H * c->Lq;
    s->q = rnd(s->nq, 1.5f); s->k = rnd(s->nk, 1.5f); s->v = rnd(s->nv, 1.0f); s->dout = rnd(s->no, 1.0f);
    s->sinks = rnd((size_t)c->H, 1.5f);
    s->kpm = (float *)malloc((size_t)c->B * c->Lk * sizeof(float));
    for (i = 0; i < c->B * c->Lk; ++i) s->kpm[i] = tu_next(&rng) % 5 == 0 ? -INFINITY : 0.5f * tu_uniform(&rng);
    s->mask = (unsigned char *)malloc((size_t)c->Lq * c->Lk);
    for (i = 0; i < c->Lq * c->Lk; ++i) s->mask[i] = tu_next(&rng) % 4 == 0;
    if (c->Lq > 2) memset(s->mask + (size_t)2 * c->Lk, 1, (size_t)c->Lk);   /* row 2: nothing allowed */
}
static void sdata_free(sdata *s)
{
    free(s->q); free(s->k); free(s->v); free(s->dout); free(s->kpm); free(s->sinks); free(s->mask);
}

static mha_options sopts(const scase *c, const sdata *s, int threads)
{
    mha_options o;
    memset(&o, 0, sizeof o);
    o.causal = c->causal;
    o.causal_align = c->bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    o.num_kv_heads = c->Hkv == c->H ? 0 : c->Hkv;
    o.window = c->window; o.window_left = c->left; o.window_right = c->right;
    o.softcap = c->softcap; o.alibi = c->alibi; o.sinks = c->sinks ? s->sinks : NULL;
    o.num_threads = threads;
    set_masks(&o, c->B, c->Lq, c->Lk, c->kpm ? s->kpm : NULL, c->mask ? s->mask : NULL);
    return o;
}

typedef struct sgrad { float *dq, *dk, *dv, *sg; } sgrad;
static void sgrad_make(const scase *c, const sdata *s, sgrad *g)
{
    g->dq = zeros(s->nq); g->dk = zeros(s->nk); g->dv = zeros(s->nv); g->sg = zeros((size_t)c->H);
}
static void sgrad_free(sgrad *g) { free(g->dq); free(g->dk); free(g->dv); free(g->sg); }
static int sgrad_same(const scase *c, const sdata *s, const sgrad *a, const sgrad *b)
{
    return same(a->dq, b->dq, s->nq) && same(a->dk, b->dk, s->nk) && same(a->dv, b->dv, s->nv) &&
           same(a->sg, b->sg, (size_t)c->H);
}
/* the largest relative error over dq, dk, dv (and the sinks' gradient) */
static double sgrad_err(const scase *c, const sdata *s, const sgrad *a, const sgrad *ref)
{
    double e = rel(a->dq, ref->dq, s->nq), t;
    t = rel(a->dk, ref->dk, s->nk); if (t > e) e = t;
    t = rel(a->dv, ref->dv, s->nv); if (t > e) e = t;
    if (c->sinks) { t = rel(a->sg, ref->sg, (size_t)c->H); if (t > e) e = t; }
    return e;
}

/* An SDPA backward: the one-shot call (p NULL) or a run of plan p; run
   gives the workspace and the saved region (NULL: none). */
static mha_status sdpa_bwd(const mha_plan *p, const scase *c, const sdata *s, const mha_options *o,
                           const mha_run *run, sgrad *g, mha_error *err)
{
    mha_run r;
    if (run) r = *run; else memset(&r, 0, sizeof r);
    r.sinks_grad = c->sinks ? g->sg : NULL;
    if (p) return mha_sdpa_run_backward(p, c->Lq, c->Lk, s->q, s->k, s->v, s->dout, g->dq, g->dk, g->dv, &r, err);
    return mha_sdpa_backward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, s->q, s->k, s->v, s->dout, o, g->dq, g->dk,
                             g->dv, &r, err);
}

static void sdpa_case(const scase *c)
{
    sdata s;
    sgrad ref, g[4], x;
    stats st_ref, st;
    float *out_ref, *out;
    mha_options o1, o;
    mha_plan *p;
    mha_sizes sz = { 0, 0, 0 };
    mha_run run;
    mha_error err;
    region R;
    void *ws;
    int t;
    char d[200];
    snprintf(d, sizeof d, "B%d H%d/%d Lq%d Lk%d D%d/%d causal%d%s win%d(%d,%d) cap%g alibi%d sinks%d kpm%d mask%d",
             c->B, c->H, c->Hkv, c->Lq, c->Lk, c->D, c->Dv, c->causal, c->bottom_right ? "br" : "",
             c->window, c->left, c->right, c->softcap, c->alibi, c->sinks, c->kpm, c->mask);
    sdata_make(c, &s);
    o1 = sopts(c, &s, 1);
    sgrad_make(c, &s, &ref);
    CHECK(sdpa_bwd(NULL, c, &s, &o1, NULL, &ref, &err) == MHA_OK, "%s: one-shot backward: %s", d, err.message);
    out_ref = zeros(s.no); out = zeros(s.no);
    stats_make(&st_ref, s.nr);
    run = mkrun(NULL, 0, NULL, 0);
    stats_into(&run, &st_ref);
    CHECK(mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, s.q, s.k, s.v, &o1, out_ref, &run, &err) == MHA_OK,
          "%s: one-shot forward: %s", d, err.message);

    /* (a), (b), (e) on a training plan of 1, 2, 3 threads */
    for (t = 1; t <= 3; ++t) {
        double e;
        o = sopts(c, &s, t);
        sgrad_make(c, &s, &g[t]);
        p = NULL;
        CHECK(mha_sdpa_plan(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &err) ==
              MHA_OK, "%s: plan: %s", d, err.message);
        if (!p) continue;
        sz = plan_sizes(p);
        ws = malloc(sz.workspace);
        region_make(&R, sz.saved, t == 3);
        stats_make(&st, s.nr);
        run = mkrun(ws, sz.workspace, R.p, R.n);
        stats_into(&run, &st);
        CHECK(mha_sdpa_run_forward(p, c->Lq, c->Lk, s.q, s.k, s.v, out, &run, &err) == MHA_OK &&
              same(out, out_ref, s.no), "%s: the forward that saves != one-shot (threads %d): %s", d, t, err.message);
        CHECK(stats_same(&st, &st_ref), "%s: (e) the statistics of a forward that saves != one-shot's (threads %d)",
              d, t);
        run = mkrun(ws, sz.workspace, R.p, R.n);
        CHECK(sdpa_bwd(p, c, &s, &o, &run, &g[t], &err) == MHA_OK, "%s: saved backward: %s", d, err.message);
        e = sgrad_err(c, &s, &g[t], &ref);
        CHECK(e <= TOL, "%s: (a) saved backward vs one-shot rel err %.3g (threads %d)", d, e, t);
        if (t > 1) CHECK(sgrad_same(c, &s, &g[t], &g[1]), "%s: saved backward, threads %d != 1 thread", d, t);
        /* (b) */
        sgrad_make(c, &s, &x);
        run = mkrun(ws, sz.workspace, NULL, 0);
        CHECK(sdpa_bwd(p, c, &s, &o, &run, &x, &err) == MHA_OK && sgrad_same(c, &s, &x, &ref),
              "%s: (b) backward without the saved forward != one-shot (threads %d): %s", d, t, err.message);
        sgrad_free(&x);
        /* (e) a forward that does not save writes the statistics too, and
           leaves the region alone: a second backward gives the first's bits */
        stats_free(&st);
        stats_make(&st, s.nr);
        run = mkrun(ws, sz.workspace, NULL, 0);
        stats_into(&run, &st);
        memset(out, 0, s.no * sizeof(float));
        CHECK(mha_sdpa_run_forward(p, c->Lq, c->Lk, s.q, s.k, s.v, out, &run, &err) == MHA_OK &&
              same(out, out_ref, s.no) && stats_same(&st, &st_ref),
              "%s: (e) a training plan's forward without saving: output or statistics != one-shot: %s", d,
              err.message);
        sgrad_make(c, &s, &x);
        run = mkrun(ws, sz.workspace, R.p, R.n);
        CHECK(sdpa_bwd(p, c, &s, &o, &run, &x, &err) == MHA_OK && sgrad_same(c, &s, &x, &g[t]),
              "%s: a second backward from the region != the first (threads %d): %s", d, t, err.message);
        sgrad_free(&x);
        stats_free(&st);
        region_free(&R);
        free(ws);
        mha_plan_destroy(p);
    }

    /* (a) the one-shot calls share a region: forward with run.saved, then backward with it */
    CHECK(mha_sdpa_plan_size(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, &o1, MHA_PLAN_TRAINING, &sz, &err) == MHA_OK,
          "%s: plan_size: %s", d, err.message);
    region_make(&R, sz.saved, 1);
    run = mkrun(NULL, 0, R.p, R.n);
    memset(out, 0, s.no * sizeof(float));
    CHECK(mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, s.q, s.k, s.v, &o1, out, &run, &err) == MHA_OK &&
          same(out, out_ref, s.no), "%s: one-shot forward that saves: %s", d, err.message);
    sgrad_make(c, &s, &x);
    CHECK(sdpa_bwd(NULL, c, &s, &o1, &run, &x, &err) == MHA_OK && sgrad_same(c, &s, &x, &g[1]),
          "%s: one-shot backward from the one-shot forward's region != the plan's (rel %.3g): %s", d,
          sgrad_err(c, &s, &x, &ref), err.message);
    sgrad_free(&x);

    /* (c) the region is read as it is: the saved lse + 1 multiplies every
       p_ij = exp(s_ij - lse_i) (and the sink's share) by e^-1, and the
       gradients are linear in them (dV = P^T dO, dS = P o (dP - delta)
       with delta = rowsum(dO o O) from the saved O): all scale by e^-1 */
    {
        size_t at_lse, at_o, total, i;
        float *sv = mha__align_ws(R.p);
        double *scaled[4];
        const float *refs[4];
        size_t n[4];
        const float *got[4];
        double e = 0;
        (void)mha__sdpa_saved_floats(c->B, c->H, c->Lq, c->Dv, &at_lse, &at_o, &total);
        for (i = 0; i < s.nr; ++i) sv[at_lse + i] += 1.0f;
        sgrad_make(c, &s, &x);
        CHECK(sdpa_bwd(NULL, c, &s, &o1, &run, &x, &err) == MHA_OK, "%s: backward from a shifted lse: %s", d,
              err.message);
        refs[0] = ref.dq; refs[1] = ref.dk; refs[2] = ref.dv; refs[3] = ref.sg;
        got[0] = x.dq; got[1] = x.dk; got[2] = x.dv; got[3] = x.sg;
        n[0] = s.nq; n[1] = s.nk; n[2] = s.nv; n[3] = c->sinks ? (size_t)c->H : 0;
        for (t = 0; t < 4; ++t) {
            double et;
            scaled[t] = (double *)malloc((n[t] ? n[t] : 1) * sizeof(double));
            for (i = 0; i < n[t]; ++i) scaled[t][i] = exp(-1.0) * refs[t][i];
            et = tu_rel_err(got[t], scaled[t], n[t]);
            if (et > e) e = et;
            free(scaled[t]);
        }
        if (e > worst) worst = e;
        CHECK(e <= TOL, "%s: (c) the saved lse + 1 should scale every gradient by e^-1: rel err %.3g", d, e);
        sgrad_free(&x);
    }
    region_free(&R);

    for (t = 1; t <= 3; ++t) sgrad_free(&g[t]);
    sgrad_free(&ref);
    stats_free(&st_ref);
    free(out_ref); free(out);
    sdata_free(&s);
}

/* ----------------------------------------------------------- module */

typedef struct mcase {
    int E, H, Hkv, B, Lq, Lk;
    int sep, kd, vd, bias, bkv, zero, rope, causal, mask, kpm, self, pack;
} mcase;

typedef struct mdata {
    mha_module m;
    float *w[8], *q, *k, *v, *dout, *kpm;
    unsigned char *mask;
    size_t nq, nk, nv, nwin, nwo, nb;
} mdata;

static void mdata_make(const mcase *c, mdata *s)
{
    int Ekv = c->E / c->H * c->Hkv, i;
    memset(s, 0, sizeof *s);
    s->m.embed_dim = c->E; s->m.num_heads = c->H; s->m.num_kv_heads = c->Hkv == c->H ? 0 : c->Hkv;
    if (c->sep) {
        s->m.kdim = c->kd; s->m.vdim = c->vd;
        s->m.q_proj_weight = s->w[0] = rnd((size_t)c->E * c->E, 0.5f);
        s->m.k_proj_weight = s->w[1] = rnd((size_t)Ekv * c->kd, 0.5f);
        s->m.v_proj_weight = s->w[2] = rnd((size_t)Ekv * c->vd, 0.5f);
        s->nwin = (size_t)c->E * c->E;
    } else {
        s->m.in_proj_weight = s->w[0] = rnd((size_t)(c->E + 2 * Ekv) * c->E, 0.5f);
        s->nwin = (size_t)(c->E + 2 * Ekv) * c->E;
    }
    s->m.out_proj_weight = s->w[3] = rnd((size_t)c->E * c->E, 0.5f);
    s->nwo = (size_t)c->E * c->E;
    s->nb = (size_t)c->E + 2 * Ekv;
    if (c->bias) {
        s->m.in_proj_bias = s->w[4] = rnd(s->nb, 0.2f);
        s->m.out_proj_bias = s->w[5] = rnd((size_t)c->E, 0.2f);
    }
    if (c->bkv) { s->m.bias_k = s->w[6] = rnd((size_t)Ekv, 0.5f); s->m.bias_v = s->w[7] = rnd((size_t)Ekv, 0.5f); }
    s->m.add_zero_attn = c->zero;
    if (c->rope) s->m.rope.kind = MHA_ROPE_HALF;
    s->nq = (size_t)c->B * c->Lq * c->E;
    s->nk = (size_t)c->B * c->Lk * (c->sep ? c->kd : c->E);
    s->nv = (size_t)c->B * c->Lk * (c->sep ? c->vd : c->E);
    s->q = rnd(s->nq, 1.0f);
    s->k = c->self ? s->q : rnd(s->nk, 1.0f);
    s->v = c->self ? s->q : rnd(s->nv, 1.0f);
    s->dout = rnd(s->nq, 1.0f);
    s->kpm = (float *)malloc((size_t)c->B * c->Lk * sizeof(float));
    for (i = 0; i < c->B * c->Lk; ++i) s->kpm[i] = tu_next(&rng) % 5 == 0 ? -INFINITY : 0.3f * tu_uniform(&rng);
    s->mask = (unsigned char *)malloc((size_t)c->Lq * c->Lk);
    for (i = 0; i < c->Lq * c->Lk; ++i) s->mask[i] = tu_next(&rng) % 4 == 0;
}
static void mdata_free(const mcase *c, mdata *s)
{
    int i;
    for (i = 0; i < 8; ++i) free(s->w[i]);
    free(s->q);
    if (!c->self) { free(s->k); free(s->v); }
    free(s->dout); free(s->kpm); free(s->mask);
}
static mha_options mopts(const mcase *c, const mdata *s, int threads)
{
    mha_options o;
    memset(&o, 0, sizeof o);
    o.causal = c->causal;
    o.num_threads = threads;
    set_masks(&o, c->B, c->Lq, c->Lk, c->kpm ? s->kpm : NULL, c->mask ? s->mask : NULL);
    return o;
}

/* Every gradient of a backward in one buffer, as named segments (each is
   compared on its own: a small array off by much cannot hide behind a
   large one). */
#define MAXSEG 16
typedef struct grads {
    float *buf;
    size_t n;
    int nseg;
    size_t off[MAXSEG], len[MAXSEG];
    const char *name[MAXSEG];
} grads;
static float *take(grads *g, size_t cnt, const char *name)
{
    float *p = g->buf + g->n;
    g->off[g->nseg] = g->n; g->len[g->nseg] = cnt; g->name[g->nseg] = name;
    ++g->nseg;
    g->n += cnt;
    return p;
}
/* the largest relative error over the segments; *which: its name */
static double grads_err(const grads *a, const grads *ref, const char **which)
{
    double e = 0;
    int i;
    *which = "";
    for (i = 0; i < a->nseg; ++i) {
        double t = rel(a->buf + a->off[i], ref->buf + ref->off[i], a->len[i]);
        if (t > e || !(t == t)) { e = t; *which = a->name[i]; }
    }
    return e;
}
/* the largest relative difference over the segments (not counted as an error) */
static double grads_diff(const grads *a, const grads *ref)
{
    double e = 0;
    int i;
    for (i = 0; i < a->nseg; ++i) {
        double t = tu_rel_err_ff(a->buf + a->off[i], ref->buf + ref->off[i], a->len[i]);
        if (t > e) e = t;
    }
    return e;
}
static int grads_same(const grads *a, const grads *b) { return a->n == b->n && same(a->buf, b->buf, a->n); }

/* a module backward's gradients: dquery, dkey, dvalue, then its weights' */
typedef struct mgrad { grads g; float *dq, *dk, *dv; mha_module_grad mg; int first_weight_seg; } mgrad;
static void mgrad_make(const mcase *c, const mdata *s, mgrad *g)
{
    int Ekv = c->E / c->H * c->Hkv;
    size_t nkw = (size_t)Ekv * c->kd, nvw = (size_t)Ekv * c->vd;
    size_t total = s->nq + (c->self ? 0 : s->nk + s->nv) + s->nwin + (c->sep ? nkw + nvw : 0) + s->nb + s->nwo +
                   (size_t)c->E + 2 * (size_t)Ekv;
    memset(g, 0, sizeof *g);
    g->g.buf = zeros(total);
    g->dq = take(&g->g, s->nq, c->self ? "dx" : "dquery");
    if (c->self) { g->dk = g->dv = g->dq; }
    else { g->dk = take(&g->g, s->nk, "dkey"); g->dv = take(&g->g, s->nv, "dvalue"); }
    g->first_weight_seg = g->g.nseg;
    if (c->sep) {
        g->mg.q_proj_weight = take(&g->g, s->nwin, "q_proj_weight");
        g->mg.k_proj_weight = take(&g->g, nkw, "k_proj_weight");
        g->mg.v_proj_weight = take(&g->g, nvw, "v_proj_weight");
    } else {
        g->mg.in_proj_weight = take(&g->g, s->nwin, "in_proj_weight");
    }
    if (c->bias) {
        g->mg.in_proj_bias = take(&g->g, s->nb, "in_proj_bias");
        g->mg.out_proj_bias = take(&g->g, (size_t)c->E, "out_proj.bias");
    }
    g->mg.out_proj_weight = take(&g->g, s->nwo, "out_proj.weight");
    if (c->bkv) {
        g->mg.bias_k = take(&g->g, (size_t)Ekv, "bias_k");
        g->mg.bias_v = take(&g->g, (size_t)Ekv, "bias_v");
    }
}
/* the weights' part of the gradients only (segments from first_weight_seg) */
static double mgrad_weights_err(const mgrad *a, const mgrad *ref, const char **which)
{
    grads wa = a->g, wr = ref->g;
    int i, k = a->first_weight_seg;
    for (i = k; i < a->g.nseg; ++i) {
        wa.off[i - k] = a->g.off[i]; wa.len[i - k] = a->g.len[i]; wa.name[i - k] = a->g.name[i];
        wr.off[i - k] = ref->g.off[i]; wr.len[i - k] = ref->g.len[i];
    }
    wa.nseg = wr.nseg = a->g.nseg - k;
    return grads_err(&wa, &wr, which);
}

/* A module backward: the one-shot call (p NULL) or a run of plan p. */
static mha_status module_bwd(const mha_plan *p, const mcase *c, const mdata *s, const mha_options *o,
                             const mha_run *run, mgrad *g, mha_error *err)
{
    if (p) return mha_module_run_backward(p, c->Lq, c->Lk, s->q, s->k, s->v, s->dout, g->dq, g->dk, g->dv, &g->mg,
                                          run, err);
    return mha_module_backward(&s->m, c->B, c->Lq, c->Lk, s->q, s->k, s->v, s->dout, o, g->dq, g->dk, g->dv,
                               &g->mg, run, err);
}

static void module_case(const mcase *c)
{
    mdata s;
    mgrad ref, g[5], x;
    stats st_ref, st;
    float *out, *out_ref, *attw;
    mha_options o1, o;
    mha_plan *p;
    mha_sizes sz = { 0, 0, 0 };
    mha_run run;
    mha_error err;
    region R;
    void *ws;
    const char *which;
    unsigned pack = c->pack ? MHA_PLAN_PACK : 0u;
    size_t nr = (size_t)c->B * c->H * c->Lq;
    int t, variant, Lke = c->Lk + c->bkv + c->zero;
    double e;
    char d[200];
    snprintf(d, sizeof d, "module E%d H%d/%d B%d Lq%d Lk%d sep%d(%d,%d) bias%d bkv%d zero%d rope%d causal%d mask%d kpm%d self%d pack%d",
             c->E, c->H, c->Hkv, c->B, c->Lq, c->Lk, c->sep, c->kd, c->vd, c->bias, c->bkv, c->zero, c->rope,
             c->causal, c->mask, c->kpm, c->self, c->pack);
    mdata_make(c, &s);
    o1 = mopts(c, &s, 1);
    mgrad_make(c, &s, &ref);
    CHECK(module_bwd(NULL, c, &s, &o1, NULL, &ref, &err) == MHA_OK, "%s: one-shot backward: %s", d, err.message);
    out = zeros(s.nq); out_ref = zeros(s.nq);
    attw = zeros((size_t)c->B * c->Lq * Lke);
    stats_make(&st_ref, nr);
    run = mkrun(NULL, 0, NULL, 0);
    stats_into(&run, &st_ref);
    CHECK(mha_module_forward(&s.m, c->B, c->Lq, c->Lk, s.q, s.k, s.v, &o1, out_ref, &run, &err) == MHA_OK,
          "%s: one-shot forward: %s", d, err.message);

    /* (a), (b), (e) on 1, 2, 3 threads; 4: on 2 threads, a forward that also
       returns the attention weights (the unfused path, equal to the fused
       one to float32 rounding) saves too */
    for (t = 1; t <= 4; ++t) {
        o = mopts(c, &s, t < 4 ? t : 2);
        mgrad_make(c, &s, &g[t]);
        p = NULL;
        CHECK(mha_module_plan(&s.m, c->B, c->Lq, c->Lk, &o, MHA_PLAN_TRAINING | pack | (t == 4 ? MHA_PLAN_WEIGHTS : 0u),
                              NULL, 0, &p, &err) == MHA_OK, "%s: plan: %s", d, err.message);
        if (!p) continue;
        sz = plan_sizes(p);
        ws = malloc(sz.workspace);
        region_make(&R, sz.saved, t == 3);
        stats_make(&st, nr);
        run = mkrun(ws, sz.workspace, R.p, R.n);
        if (t < 4) stats_into(&run, &st);
        else run.weights = attw;
        CHECK(mha_module_run_forward(p, c->Lq, c->Lk, s.q, s.k, s.v, out, &run, &err) == MHA_OK,
              "%s: the forward that saves (threads %d): %s", d, t, err.message);
        if (t < 4) {
            CHECK(same(out, out_ref, s.nq), "%s: the forward that saves != one-shot (threads %d)", d, t);
            CHECK(stats_same(&st, &st_ref), "%s: (e) statistics of the forward that saves != one-shot's (threads %d)",
                  d, t);
        } else {
            CHECK(tu_rel_err_ff(out, out_ref, s.nq) <= TOL, "%s: the unfused forward that saves vs one-shot: %.3g",
                  d, tu_rel_err_ff(out, out_ref, s.nq));
        }
        run = mkrun(ws, sz.workspace, R.p, R.n);
        CHECK(module_bwd(p, c, &s, &o, &run, &g[t], &err) == MHA_OK, "%s: saved backward: %s", d, err.message);
        e = grads_err(&g[t].g, &ref.g, &which);
        CHECK(e <= TOL, "%s: (a) saved backward vs one-shot: %s rel err %.3g (threads %d)", d, which, e, t);
        if (t == 2 || t == 3) CHECK(grads_same(&g[t].g, &g[1].g), "%s: saved backward, threads %d != 1", d, t);
        /* (b) */
        mgrad_make(c, &s, &x);
        run = mkrun(ws, sz.workspace, NULL, 0);
        CHECK(module_bwd(p, c, &s, &o, &run, &x, &err) == MHA_OK && grads_same(&x.g, &ref.g),
              "%s: (b) backward without the saved forward != one-shot (threads %d, rel %.3g): %s", d, t,
              grads_diff(&x.g, &ref.g), err.message);
        free(x.g.buf);
        /* (e) without saving: the statistics, and the region left alone */
        if (t < 4) {
            stats_free(&st);
            stats_make(&st, nr);
            run = mkrun(ws, sz.workspace, NULL, 0);
            stats_into(&run, &st);
            CHECK(mha_module_run_forward(p, c->Lq, c->Lk, s.q, s.k, s.v, out, &run, &err) == MHA_OK &&
                  same(out, out_ref, s.nq) && stats_same(&st, &st_ref),
                  "%s: (e) a training plan's forward without saving: output or statistics != one-shot: %s", d,
                  err.message);
            mgrad_make(c, &s, &x);
            run = mkrun(ws, sz.workspace, R.p, R.n);
            CHECK(module_bwd(p, c, &s, &o, &run, &x, &err) == MHA_OK && grads_same(&x.g, &g[t].g),
                  "%s: a second backward from the region != the first (threads %d): %s", d, t, err.message);
            free(x.g.buf);
        }
        stats_free(&st);
        region_free(&R);
        free(ws);
        mha_plan_destroy(p);
    }

    /* (a) the one-shot calls share a region */
    CHECK(mha_module_plan_size(&s.m, c->B, c->Lq, c->Lk, &o1, MHA_PLAN_TRAINING, &sz, &err) == MHA_OK,
          "%s: plan_size: %s", d, err.message);
    region_make(&R, sz.saved, 1);
    run = mkrun(NULL, 0, R.p, R.n);
    memset(out, 0, s.nq * sizeof(float));
    CHECK(mha_module_forward(&s.m, c->B, c->Lq, c->Lk, s.q, s.k, s.v, &o1, out, &run, &err) == MHA_OK &&
          same(out, out_ref, s.nq), "%s: one-shot forward that saves: %s", d, err.message);
    mgrad_make(c, &s, &x);
    CHECK(module_bwd(NULL, c, &s, &o1, &run, &x, &err) == MHA_OK && grads_same(&x.g, &g[1].g),
          "%s: one-shot backward from the one-shot forward's region != the plan's (rel %.3g): %s", d,
          grads_diff(&x.g, &g[1].g), err.message);
    free(x.g.buf);
    region_free(&R);

    /* (c) weights changed between the forward and the backward: 0 the Q
       part of in_proj_bias + 1 (with biases), 1 one element of Wq + 0.5 */
    for (variant = 0; variant < 2; ++variant) {
        float *wchg = variant ? s.w[0] + (size_t)(c->E / 2) * c->E + c->E / 3 : s.w[4];
        size_t nchg = variant ? 1 : (size_t)c->E, i;
        float delta = variant ? 0.5f : 1.0f;
        mgrad gs, gn, rn;
        if (variant == 0 && !c->bias) continue;
        o = mopts(c, &s, 2);
        p = NULL;
        CHECK(mha_module_plan(&s.m, c->B, c->Lq, c->Lk, &o, MHA_PLAN_TRAINING | pack, NULL, 0, &p, &err) == MHA_OK,
              "%s: plan: %s", d, err.message);
        if (!p) continue;
        sz = plan_sizes(p);
        region_make(&R, sz.saved, 0);
        run = mkrun(NULL, 0, R.p, R.n);
        CHECK(mha_module_run_forward(p, c->Lq, c->Lk, s.q, s.k, s.v, out, &run, &err) == MHA_OK, "%s: forward: %s",
              d, err.message);
        for (i = 0; i < nchg; ++i) wchg[i] += delta;   /* the caller's choice: a step before the backward */
        if (pack) CHECK(mha_plan_repack(p, &err) == MHA_OK, "%s: repack: %s", d, err.message);
        mgrad_make(c, &s, &gs); mgrad_make(c, &s, &gn); mgrad_make(c, &s, &rn);
        CHECK(module_bwd(p, c, &s, &o, &run, &gs, &err) == MHA_OK, "%s: saved backward: %s", d, err.message);
        run = mkrun(NULL, 0, NULL, 0);
        CHECK(module_bwd(p, c, &s, &o, &run, &gn, &err) == MHA_OK, "%s: recomputing backward: %s", d, err.message);
        CHECK(module_bwd(NULL, c, &s, &o1, NULL, &rn, &err) == MHA_OK, "%s: one-shot backward: %s", d, err.message);
        CHECK(grads_same(&gn.g, &rn.g), "%s: (c%d) run.saved = NULL did not recompute with the new weights (rel %.3g)",
              d, variant, grads_diff(&gn.g, &rn.g));
        /* with one key per row the softmax is 1 whatever Q is: nothing to tell apart */
        if (Lke > 1)
            CHECK(grads_diff(&gs.g, &rn.g) > 1e-3, "%s: (c%d) the saved backward equals the recomputing one (rel %.3g)",
                  d, variant, grads_diff(&gs.g, &rn.g));
        if (variant == 0) {
            e = grads_err(&gs.g, &ref.g, &which);
            CHECK(e <= TOL, "%s: (c0) after a bias change the saved backward != the old weights' one-shot: %s %.3g",
                  d, which, e);
        } else {
            e = mgrad_weights_err(&gs, &ref, &which);
            CHECK(e <= TOL, "%s: (c1) after a Wq change the weight gradients of the saved backward != the old "
                  "weights' (%s %.3g)", d, which, e);
        }
        for (i = 0; i < nchg; ++i) wchg[i] -= delta;
        free(gs.g.buf); free(gn.g.buf); free(rn.g.buf);
        region_free(&R);
        mha_plan_destroy(p);
    }

    for (t = 1; t <= 4; ++t) free(g[t].g.buf);
    free(ref.g.buf); free(out); free(out_ref); free(attw);
    stats_free(&st_ref);
    mdata_free(c, &s);
}

/* ---------------------------------------------------------- encoder */

typedef struct ecase { int E, H, F, B, L, pre, gelu, causal, kpm; } ecase;

typedef struct edata {
    mcase mc;
    mdata s;
    mha_encoder_layer ly;
    float *w[8], *x, *dy, *kpm;
    size_t n, nf;
} edata;

static void edata_make(const ecase *c, edata *e)
{
    size_t wn[8], i;
    memset(e, 0, sizeof *e);
    e->mc.E = c->E; e->mc.H = e->mc.Hkv = c->H; e->mc.B = c->B; e->mc.Lq = e->mc.Lk = c->L;
    e->mc.kd = e->mc.vd = c->E; e->mc.bias = 1;
    mdata_make(&e->mc, &e->s);
    e->ly = mha_encoder_layer_defaults();
    e->ly.self_attn = e->s.m;
    e->ly.dim_feedforward = c->F;
    e->ly.activation = c->gelu ? MHA_ACT_GELU : MHA_ACT_RELU;
    e->ly.norm_first = c->pre;
    e->n = (size_t)c->B * c->L * c->E; e->nf = (size_t)c->F * c->E;
    wn[0] = wn[2] = e->nf; wn[1] = (size_t)c->F; wn[3] = wn[4] = wn[5] = wn[6] = wn[7] = (size_t)c->E;
    for (i = 0; i < 8; ++i) e->w[i] = rnd(wn[i], i < 4 ? 0.3f : 0.5f);
    for (i = 4; i < 8; i += 2) { size_t j; for (j = 0; j < (size_t)c->E; ++j) e->w[i][j] += 1.0f; }
    e->ly.linear1_weight = e->w[0]; e->ly.linear1_bias = e->w[1];
    e->ly.linear2_weight = e->w[2]; e->ly.linear2_bias = e->w[3];
    e->ly.norm1_weight = e->w[4]; e->ly.norm1_bias = e->w[5]; e->ly.norm2_weight = e->w[6]; e->ly.norm2_bias = e->w[7];
    e->x = rnd(e->n, 1.0f); e->dy = rnd(e->n, 1.0f);
    e->kpm = (float *)malloc((size_t)c->B * c->L * sizeof(float));
    for (i = 0; i < (size_t)c->B * c->L; ++i) e->kpm[i] = i % 5 == 3 ? -INFINITY : 0.0f;
}
static void edata_free(edata *e)
{
    int i;
    for (i = 0; i < 8; ++i) free(e->w[i]);
    free(e->x); free(e->dy); free(e->kpm);
    mdata_free(&e->mc, &e->s);
}

typedef struct egrad { grads g; float *dx; mha_encoder_layer_grad lg; } egrad;
static void egrad_make(const ecase *c, const edata *e, egrad *g)
{
    size_t total = e->n + 2 * e->nf + (size_t)c->F + 5 * (size_t)c->E + e->s.nwin + e->s.nb + e->s.nwo + (size_t)c->E;
    memset(g, 0, sizeof *g);
    g->g.buf = zeros(total);
    g->dx = take(&g->g, e->n, "dx");
    g->lg.linear1_weight = take(&g->g, e->nf, "linear1.weight");
    g->lg.linear2_weight = take(&g->g, e->nf, "linear2.weight");
    g->lg.linear1_bias = take(&g->g, (size_t)c->F, "linear1.bias");
    g->lg.linear2_bias = take(&g->g, (size_t)c->E, "linear2.bias");
    g->lg.norm1_weight = take(&g->g, (size_t)c->E, "norm1.weight");
    g->lg.norm1_bias = take(&g->g, (size_t)c->E, "norm1.bias");
    g->lg.norm2_weight = take(&g->g, (size_t)c->E, "norm2.weight");
    g->lg.norm2_bias = take(&g->g, (size_t)c->E, "norm2.bias");
    g->lg.self_attn.in_proj_weight = take(&g->g, e->s.nwin, "self_attn.in_proj_weight");
    g->lg.self_attn.in_proj_bias = take(&g->g, e->s.nb, "self_attn.in_proj_bias");
    g->lg.self_attn.out_proj_weight = take(&g->g, e->s.nwo, "self_attn.out_proj.weight");
    g->lg.self_attn.out_proj_bias = take(&g->g, (size_t)c->E, "self_attn.out_proj.bias");
}

static mha_status enc_bwd(const mha_plan *p, const ecase *c, const edata *e, const mha_options *o,
                          const mha_run *run, egrad *g, mha_error *err)
{
    if (p) return mha_encoder_run_backward(p, c->L, e->x, e->dy, g->dx, &g->lg, run, err);
    return mha_encoder_backward(&e->ly, c->B, c->L, e->x, e->dy, o, g->dx, &g->lg, run, err);
}

static void encoder_case(const ecase *c)
{
    edata E;
    egrad ref, g[4], x, gs, gn, rn;
    stats st_ref, st;
    float *y, *y_ref;
    mha_options o;
    mha_plan *p;
    mha_sizes sz = { 0, 0, 0 };
    mha_run run;
    mha_error err;
    region R;
    void *ws;
    const char *which;
    size_t nr = (size_t)c->B * c->H * c->L, i;
    int t;
    double e;
    char d[160];
    snprintf(d, sizeof d, "encoder E%d H%d F%d B%d L%d pre%d gelu%d causal%d kpm%d", c->E, c->H, c->F, c->B,
             c->L, c->pre, c->gelu, c->causal, c->kpm);
    edata_make(c, &E);
    y = zeros(E.n); y_ref = zeros(E.n);
    memset(&o, 0, sizeof o);
    o.causal = c->causal;
    o.num_threads = 1;
    set_masks(&o, c->B, c->L, c->L, c->kpm ? E.kpm : NULL, NULL);
    egrad_make(c, &E, &ref);
    CHECK(enc_bwd(NULL, c, &E, &o, NULL, &ref, &err) == MHA_OK, "%s: one-shot backward: %s", d, err.message);
    stats_make(&st_ref, nr);
    run = mkrun(NULL, 0, NULL, 0);
    stats_into(&run, &st_ref);
    CHECK(mha_encoder_forward(&E.ly, c->B, c->L, E.x, &o, y_ref, &run, &err) == MHA_OK, "%s: one-shot forward: %s",
          d, err.message);

    for (t = 1; t <= 3; ++t) {
        o.num_threads = t;
        egrad_make(c, &E, &g[t]);
        p = NULL;
        CHECK(mha_encoder_plan(&E.ly, c->B, c->L, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &err) == MHA_OK,
              "%s: plan: %s", d, err.message);
        if (!p) continue;
        sz = plan_sizes(p);
        ws = malloc(sz.workspace);
        region_make(&R, sz.saved, t == 3);
        stats_make(&st, nr);
        run = mkrun(ws, sz.workspace, R.p, R.n);
        stats_into(&run, &st);
        CHECK(mha_encoder_run_forward(p, c->L, E.x, y, &run, &err) == MHA_OK && same(y, y_ref, E.n),
              "%s: the forward that saves != the one-shot (inference) forward (threads %d): %s", d, t, err.message);
        CHECK(stats_same(&st, &st_ref), "%s: (e) statistics of the forward that saves != one-shot's (threads %d)",
              d, t);
        run = mkrun(ws, sz.workspace, R.p, R.n);
        CHECK(enc_bwd(p, c, &E, &o, &run, &g[t], &err) == MHA_OK, "%s: saved backward: %s", d, err.message);
        e = grads_err(&g[t].g, &ref.g, &which);
        CHECK(e <= TOL, "%s: (a) saved backward vs one-shot: %s rel err %.3g (threads %d)", d, which, e, t);
        if (t > 1) CHECK(grads_same(&g[t].g, &g[1].g), "%s: saved backward, threads %d != 1", d, t);
        /* (b) */
        egrad_make(c, &E, &x);
        run = mkrun(ws, sz.workspace, NULL, 0);
        CHECK(enc_bwd(p, c, &E, &o, &run, &x, &err) == MHA_OK && grads_same(&x.g, &ref.g),
              "%s: (b) backward without the saved forward != one-shot (threads %d, rel %.3g): %s", d, t,
              grads_diff(&x.g, &ref.g), err.message);
        free(x.g.buf);
        /* (e) without saving */
        stats_free(&st);
        stats_make(&st, nr);
        run = mkrun(ws, sz.workspace, NULL, 0);
        stats_into(&run, &st);
        CHECK(mha_encoder_run_forward(p, c->L, E.x, y, &run, &err) == MHA_OK && same(y, y_ref, E.n) &&
              stats_same(&st, &st_ref), "%s: (e) a training plan's forward without saving: output or statistics "
              "!= one-shot: %s", d, err.message);
        egrad_make(c, &E, &x);
        run = mkrun(ws, sz.workspace, R.p, R.n);
        CHECK(enc_bwd(p, c, &E, &o, &run, &x, &err) == MHA_OK && grads_same(&x.g, &g[t].g),
              "%s: a second backward from the region != the first (threads %d): %s", d, t, err.message);
        free(x.g.buf);
        stats_free(&st);
        region_free(&R);
        free(ws);
        mha_plan_destroy(p);
    }
    o.num_threads = 1;

    /* (a) the one-shot calls share a region */
    CHECK(mha_encoder_plan_size(&E.ly, c->B, c->L, &o, MHA_PLAN_TRAINING, &sz, &err) == MHA_OK, "%s: plan_size: %s",
          d, err.message);
    region_make(&R, sz.saved, 1);
    run = mkrun(NULL, 0, R.p, R.n);
    CHECK(mha_encoder_forward(&E.ly, c->B, c->L, E.x, &o, y, &run, &err) == MHA_OK && same(y, y_ref, E.n),
          "%s: one-shot forward that saves: %s", d, err.message);
    egrad_make(c, &E, &x);
    CHECK(enc_bwd(NULL, c, &E, &o, &run, &x, &err) == MHA_OK && grads_same(&x.g, &g[1].g),
          "%s: one-shot backward from the one-shot forward's region != the plan's (rel %.3g): %s", d,
          grads_diff(&x.g, &g[1].g), err.message);
    free(x.g.buf);

    /* (c) linear1's bias + 0.5 and the attention's Q bias + 1 after the
       forward: the backward from the region is the old weights' (no
       backward formula reads a bias); NULL recomputes with the new ones */
    for (i = 0; i < (size_t)c->F; ++i) E.w[1][i] += 0.5f;
    for (i = 0; i < (size_t)c->E; ++i) E.s.w[4][i] += 1.0f;
    egrad_make(c, &E, &gs); egrad_make(c, &E, &gn); egrad_make(c, &E, &rn);
    CHECK(enc_bwd(NULL, c, &E, &o, &run, &gs, &err) == MHA_OK, "%s: saved backward: %s", d, err.message);
    run = mkrun(NULL, 0, NULL, 0);
    CHECK(enc_bwd(NULL, c, &E, &o, &run, &gn, &err) == MHA_OK, "%s: recomputing backward: %s", d, err.message);
    p = NULL;
    CHECK(mha_encoder_plan(&E.ly, c->B, c->L, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &err) == MHA_OK, "%s: plan: %s",
          d, err.message);
    CHECK(p && enc_bwd(p, c, &E, &o, NULL, &rn, &err) == MHA_OK, "%s: plan backward: %s", d, err.message);
    mha_plan_destroy(p);
    e = grads_err(&gs.g, &ref.g, &which);
    CHECK(e <= TOL, "%s: (c) after the bias changes the saved backward != the old weights' one-shot: %s %.3g", d,
          which, e);
    CHECK(grads_same(&gn.g, &rn.g), "%s: (c) run.saved = NULL != a plan's backward at the new weights", d);
    CHECK(grads_diff(&gs.g, &gn.g) > 1e-3, "%s: (c) the saved backward equals the recomputing one (rel %.3g)", d,
          grads_diff(&gs.g, &gn.g));
    for (i = 0; i < (size_t)c->F; ++i) E.w[1][i] -= 0.5f;
    for (i = 0; i < (size_t)c->E; ++i) E.s.w[4][i] -= 1.0f;
    free(gs.g.buf); free(gn.g.buf); free(rn.g.buf);
    region_free(&R);

    for (t = 1; t <= 3; ++t) free(g[t].g.buf);
    free(ref.g.buf); free(y); free(y_ref);
    stats_free(&st_ref);
    edata_free(&E);
}

/* ---------------------------------------------------------- refusals */

/* (d) A refused backward names run->saved (or run->saved_bytes) and writes
   no gradient; a refused forward writes no output and no region. */
static void refusals(void)
{
    /* SDPA: B 2, H 4 (KV 2), Lq 5, Lk 7, D 3, Dv 4, causal, sinks */
    static const scase sc = { 2, 4, 2, 5, 7, 3, 4, 1, 0, 0, 0, 0, 0.0f, 0, 1, 0, 0 };
    static const mcase mc = { 12, 3, 3, 2, 5, 7, 0, 12, 12, 1, 1, 0, 1, 1, 0, 0, 0, 0 };
    static const ecase ec = { 8, 2, 12, 2, 6, 0, 1, 1, 0 };
    sdata s;
    mdata m;
    edata en;
    sgrad sg, zero_s;
    mgrad mg, zero_m;
    egrad eg, zero_e;
    mha_options so, mo, eo, o;
    mha_plan *sp = NULL, *sp4 = NULL, *sp3 = NULL, *spb = NULL, *sph = NULL, *sinf = NULL, *mp = NULL, *mp4 = NULL;
    mha_plan *ep = NULL, *ep5 = NULL;
    mha_sizes ssz, msz, esz, isz;
    mha_run run;
    mha_error err;
    region big, R;
    size_t nbig, lo, hi;
    float *out, *y, *k4, *v4;
    unsigned char *snap;
    int clean;

    sdata_make(&sc, &s);
    mdata_make(&mc, &m);
    edata_make(&ec, &en);
    so = sopts(&sc, &s, 0); mo = mopts(&mc, &m, 0);
    memset(&eo, 0, sizeof eo);
    eo.causal = 1;
    CHECK(mha_sdpa_plan(2, 4, 5, 7, 3, 4, &so, MHA_PLAN_TRAINING, NULL, 0, &sp, &err) == MHA_OK, "sdpa plan: %s",
          err.message);
    o = so; o.num_threads = 3;
    CHECK(mha_sdpa_plan(2, 4, 5, 7, 3, 4, &o, MHA_PLAN_TRAINING, NULL, 0, &sp3, &err) == MHA_OK, "sdpa plan 3t: %s",
          err.message);
    o = so; o.num_kv_heads = 4;
    CHECK(mha_sdpa_plan(2, 4, 5, 7, 3, 4, &o, MHA_PLAN_TRAINING, NULL, 0, &sp4, &err) == MHA_OK, "sdpa plan H4: %s",
          err.message);
    CHECK(mha_sdpa_plan(2, 4, 5, 7, 3, 4, &so, 0, NULL, 0, &sinf, &err) == MHA_OK, "sdpa inference plan: %s",
          err.message);
    CHECK(mha_sdpa_plan(1, 4, 5, 7, 3, 4, &so, MHA_PLAN_TRAINING, NULL, 0, &spb, &err) == MHA_OK, "sdpa plan B1: %s",
          err.message);
    o = so; o.num_kv_heads = 0;   /* 2 heads, 2 KV heads: q, k, v are prefixes of the 4-head ones */
    CHECK(mha_sdpa_plan(2, 2, 5, 7, 3, 4, &o, MHA_PLAN_TRAINING, NULL, 0, &sph, &err) == MHA_OK, "sdpa plan H2: %s",
          err.message);
    CHECK(mha_module_plan(&m.m, 2, 5, 7, &mo, MHA_PLAN_TRAINING, NULL, 0, &mp, &err) == MHA_OK, "module plan: %s",
          err.message);
    CHECK(mha_module_plan(&m.m, 2, 4, 7, &mo, 0, NULL, 0, &mp4, &err) == MHA_OK, "module inference plan: %s",
          err.message);
    CHECK(mha_encoder_plan(&en.ly, 2, 6, &eo, MHA_PLAN_TRAINING, NULL, 0, &ep, &err) == MHA_OK, "encoder plan: %s",
          err.message);
    CHECK(mha_encoder_plan(&en.ly, 2, 5, &eo, MHA_PLAN_TRAINING, NULL, 0, &ep5, &err) == MHA_OK,
          "encoder plan L5: %s", err.message);
    if (!sp || !sp3 || !sp4 || !spb || !sph || !sinf || !mp || !mp4 || !ep || !ep5) goto done;
    ssz = plan_sizes(sp); msz = plan_sizes(mp); esz = plan_sizes(ep);
    isz = plan_sizes(sinf);
    CHECK(isz.saved == 0 && ssz.saved > 0 && msz.saved > 0 && esz.saved > 0,
          "sizes.saved: %lu without MHA_PLAN_TRAINING, %lu / %lu / %lu with", (unsigned long)isz.saved,
          (unsigned long)ssz.saved, (unsigned long)msz.saved, (unsigned long)esz.saved);
    /* one region large enough for any of the three, so only the header can refuse */
    nbig = ssz.saved > msz.saved ? ssz.saved : msz.saved;
    if (esz.saved > nbig) nbig = esz.saved;
    region_make(&big, nbig, 1);
    out = zeros(s.no > m.nq ? s.no : m.nq);
    y = zeros(en.n);
    k4 = rnd((size_t)2 * 4 * 7 * 3, 1.0f); v4 = rnd((size_t)2 * 4 * 7 * 4, 1.0f);   /* K, V of 4 heads */
    snap = (unsigned char *)malloc(nbig);
    sgrad_make(&sc, &s, &sg); sgrad_make(&sc, &s, &zero_s);
    mgrad_make(&mc, &m, &mg); mgrad_make(&mc, &m, &zero_m);
    egrad_make(&ec, &en, &eg); egrad_make(&ec, &en, &zero_e);

#define SDPA_REFUSED(what) do {                                                                     \
        run = mkrun(NULL, 0, big.p, big.n);                                                         \
        CHECK(sdpa_bwd(sp, &sc, &s, &so, &run, &sg, &err) == MHA_ERR_SAVED && field_is(&err, "run->saved") && \
              !strcmp(err.function, "mha_sdpa_run_backward") && sgrad_same(&sc, &s, &sg, &zero_s),  \
              "SDPA backward from %s: want MHA_ERR_SAVED naming run->saved: %s", what, err.message); \
    } while (0)
#define MODULE_REFUSED(what) do {                                                                   \
        run = mkrun(NULL, 0, big.p, big.n);                                                         \
        CHECK(module_bwd(mp, &mc, &m, &mo, &run, &mg, &err) == MHA_ERR_SAVED && field_is(&err, "run->saved") && \
              grads_same(&mg.g, &zero_m.g), "module backward from %s: want MHA_ERR_SAVED: %s", what, err.message); \
    } while (0)
#define ENCODER_REFUSED(what) do {                                                                  \
        run = mkrun(NULL, 0, big.p, big.n);                                                         \
        CHECK(enc_bwd(ep, &ec, &en, &eo, &run, &eg, &err) == MHA_ERR_SAVED && field_is(&err, "run->saved") && \
              grads_same(&eg.g, &zero_e.g), "encoder backward from %s: want MHA_ERR_SAVED: %s", what, err.message); \
    } while (0)

    /* a region no forward wrote (a pattern, then zeros) */
    SDPA_REFUSED("a region never written");
    MODULE_REFUSED("a region never written");
    ENCODER_REFUSED("a region never written");
    memset(big.buf, 0, nbig + 8);
    SDPA_REFUSED("a zeroed region");

    /* SDPA: another shape (Lq 4, Lk 6, other KV heads), another kind */
    run = mkrun(NULL, 0, big.p, big.n);
    CHECK(mha_sdpa_run_forward(sp, 4, 7, s.q, s.k, s.v, out, &run, &err) == MHA_OK, "sdpa forward Lq 4: %s",
          err.message);
    SDPA_REFUSED("a forward at Lq 4");
    CHECK(mha_sdpa_run_forward(sp, 5, 6, s.q, s.k, s.v, out, &run, &err) == MHA_OK, "sdpa forward Lk 6: %s",
          err.message);
    SDPA_REFUSED("a forward at Lk 6");
    CHECK(mha_sdpa_run_forward(sp4, 5, 7, s.q, k4, v4, out, &run, &err) == MHA_OK, "sdpa forward H4: %s",
          err.message);
    SDPA_REFUSED("a forward with 4 KV heads (this plan: 2)");
    CHECK(mha_sdpa_run_forward(spb, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_OK, "sdpa forward B 1: %s",
          err.message);
    SDPA_REFUSED("a forward with B 1 (this plan: 2)");
    CHECK(mha_sdpa_run_forward(sph, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_OK, "sdpa forward H 2: %s",
          err.message);
    SDPA_REFUSED("a forward with 2 heads (this plan: 4)");
    CHECK(module_bwd(mp, &mc, &m, &mo, &run, &mg, &err) == MHA_ERR_SAVED && field_is(&err, "run->saved") &&
          grads_same(&mg.g, &zero_m.g), "module backward from an SDPA forward: %s", err.message);
    CHECK(enc_bwd(ep, &ec, &en, &eo, &run, &eg, &err) == MHA_ERR_SAVED && field_is(&err, "run->saved") &&
          grads_same(&eg.g, &zero_e.g), "encoder backward from an SDPA forward: %s", err.message);
    /* the region belongs to the shape: another training plan of it (3 threads) reads it */
    CHECK(mha_sdpa_run_forward(sp, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_OK, "sdpa forward: %s", err.message);
    {
        sgrad a, b;
        sgrad_make(&sc, &s, &a); sgrad_make(&sc, &s, &b);
        CHECK(sdpa_bwd(sp3, &sc, &s, &so, &run, &a, &err) == MHA_OK, "another plan of the shape reads the region: %s",
              err.message);
        CHECK(sdpa_bwd(sp, &sc, &s, &so, &run, &b, &err) == MHA_OK && sgrad_same(&sc, &s, &a, &b),
              "the 3-thread plan's backward from the region != the writer plan's");
        sgrad_free(&a); sgrad_free(&b);
    }

    /* module: another shape, another kind */
    CHECK(mha_module_run_forward(mp, 4, 7, m.q, m.k, m.v, out, &run, &err) == MHA_OK, "module forward Lq 4: %s",
          err.message);
    MODULE_REFUSED("a forward at Lq 4");
    SDPA_REFUSED("a module forward");
    ENCODER_REFUSED("a module forward");
    /* encoder: another L, and its region to a module backward */
    CHECK(mha_encoder_run_forward(ep5, 5, en.x, y, &run, &err) == MHA_OK, "encoder forward L 5: %s", err.message);
    ENCODER_REFUSED("a forward at L 5");
    CHECK(mha_encoder_run_forward(ep, 6, en.x, y, &run, &err) == MHA_OK, "encoder forward: %s", err.message);
    MODULE_REFUSED("an encoder forward");
    SDPA_REFUSED("an encoder forward");

    /* too small: the least saved_bytes a forward takes (bisection; the plan's
       size must do), then one byte less for the forward and the backward */
    region_make(&R, ssz.saved, 0);
    run = mkrun(NULL, 0, R.p, R.n);
    CHECK(mha_sdpa_run_forward(sp, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_OK,
          "sizes.saved does not hold the forward: %s", err.message);
    lo = 0; hi = ssz.saved;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        run.saved_bytes = mid;
        if (mha_sdpa_run_forward(sp, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_OK) hi = mid; else lo = mid;
    }
    memcpy(snap, R.p, ssz.saved);
    memset(out, 0, s.no * sizeof(float));
    run.saved_bytes = hi - 1;
    clean = mha_sdpa_run_forward(sp, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_ERR_WORKSPACE_TOO_SMALL &&
            field_is(&err, "run->saved_bytes");
    CHECK(clean, "SDPA forward, saved_bytes one short of %lu: %s", (unsigned long)hi, err.message);
    CHECK(memcmp(snap, R.p, ssz.saved) == 0 && all_zero(out, s.no), "a refused forward wrote its output or the region");
    CHECK(sdpa_bwd(sp, &sc, &s, &so, &run, &sg, &err) == MHA_ERR_WORKSPACE_TOO_SMALL &&
          field_is(&err, "run->saved_bytes") && sgrad_same(&sc, &s, &sg, &zero_s),
          "SDPA backward, saved_bytes one short: %s", err.message);
    run.saved_bytes = hi;
    CHECK(sdpa_bwd(sp, &sc, &s, &so, &run, &sg, &err) == MHA_OK, "SDPA backward at the least saved_bytes: %s",
          err.message);
    memset(sg.dq, 0, s.nq * 4); memset(sg.dk, 0, s.nk * 4); memset(sg.dv, 0, s.nv * 4); memset(sg.sg, 0, 4 * 4);
    region_free(&R);
    /* the module's and the encoder's too (one byte less than the plan's size
       at the plan's lengths; the run's least is what its backward reads) */
    region_make(&R, msz.saved, 0);
    run = mkrun(NULL, 0, R.p, R.n);
    lo = 0; hi = msz.saved;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        run.saved_bytes = mid;
        if (mha_module_run_forward(mp, 5, 7, m.q, m.k, m.v, out, &run, &err) == MHA_OK) hi = mid; else lo = mid;
    }
    run.saved_bytes = hi - 1;
    CHECK(mha_module_run_forward(mp, 5, 7, m.q, m.k, m.v, out, &run, &err) == MHA_ERR_WORKSPACE_TOO_SMALL &&
          field_is(&err, "run->saved_bytes"), "module forward, saved_bytes one short: %s", err.message);
    CHECK(module_bwd(mp, &mc, &m, &mo, &run, &mg, &err) == MHA_ERR_WORKSPACE_TOO_SMALL &&
          field_is(&err, "run->saved_bytes") && grads_same(&mg.g, &zero_m.g),
          "module backward, saved_bytes one short: %s", err.message);
    region_free(&R);
    region_make(&R, esz.saved, 0);
    run = mkrun(NULL, 0, R.p, R.n);
    lo = 0; hi = esz.saved;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        run.saved_bytes = mid;
        if (mha_encoder_run_forward(ep, 6, en.x, y, &run, &err) == MHA_OK) hi = mid; else lo = mid;
    }
    run.saved_bytes = hi - 1;
    CHECK(mha_encoder_run_forward(ep, 6, en.x, y, &run, &err) == MHA_ERR_WORKSPACE_TOO_SMALL &&
          field_is(&err, "run->saved_bytes"), "encoder forward, saved_bytes one short: %s", err.message);
    CHECK(enc_bwd(ep, &ec, &en, &eo, &run, &eg, &err) == MHA_ERR_WORKSPACE_TOO_SMALL &&
          field_is(&err, "run->saved_bytes") && grads_same(&eg.g, &zero_e.g),
          "encoder backward, saved_bytes one short: %s", err.message);
    region_free(&R);

    /* a plan without MHA_PLAN_TRAINING: run.saved exceeds it (and it has no backward) */
    run = mkrun(NULL, 0, big.p, big.n);
    memcpy(snap, big.p, nbig);
    CHECK(mha_sdpa_run_forward(sinf, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
          field_is(&err, "run->saved") && memcmp(snap, big.p, nbig) == 0,
          "run.saved on an SDPA plan without MHA_PLAN_TRAINING: %s", err.message);
    CHECK(mha_module_run_forward(mp4, 4, 7, m.q, m.k, m.v, out, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
          field_is(&err, "run->saved") && memcmp(snap, big.p, nbig) == 0,
          "run.saved on a module plan without MHA_PLAN_TRAINING: %s", err.message);
    run = mkrun(NULL, 0, NULL, 0);
    CHECK(sdpa_bwd(sinf, &sc, &s, &so, &run, &sg, &err) == MHA_ERR_EXCEEDS_PLAN && field_is(&err, "plan"),
          "a backward of a plan without MHA_PLAN_TRAINING: %s", err.message);
    /* saved_bytes without a region */
    run = mkrun(NULL, 0, NULL, 64);
    CHECK(mha_sdpa_run_forward(sp, 5, 7, s.q, s.k, s.v, out, &run, &err) == MHA_ERR_NULL_POINTER &&
          field_is(&err, "run->saved"), "saved_bytes with saved NULL: %s", err.message);

    free(out); free(y); free(k4); free(v4); free(snap);
    region_free(&big);
    sgrad_free(&sg); sgrad_free(&zero_s);
    free(mg.g.buf); free(zero_m.g.buf); free(eg.g.buf); free(zero_e.g.buf);
#undef SDPA_REFUSED
#undef MODULE_REFUSED
#undef ENCODER_REFUSED
done:
    mha_plan_destroy(sp); mha_plan_destroy(sp3); mha_plan_destroy(sp4); mha_plan_destroy(spb);
    mha_plan_destroy(sph); mha_plan_destroy(sinf);
    mha_plan_destroy(mp); mha_plan_destroy(mp4); mha_plan_destroy(ep); mha_plan_destroy(ep5);
    sdata_free(&s);
    mdata_free(&mc, &m);
    edata_free(&en);
}

int main(void)
{
    static const scase cases[] = {
        /* B  H Hkv Lq  Lk   D Dv  causal br win l r  cap alibi sinks kpm mask */
        {1, 1, 1, 1, 1, 1, 1,      0, 0, 0, 0, 0, 0.0f, 0, 0, 0, 0},
        {1, 1, 1, 1, 7, 3, 3,      0, 0, 0, 0, 0, 0.0f, 0, 1, 0, 0},
        {3, 2, 2, 7, 17, 17, 3,    0, 0, 0, 0, 0, 0.0f, 0, 0, 1, 1},
        {2, 4, 2, 17, 17, 7, 7,    1, 0, 0, 0, 0, 0.0f, 0, 0, 0, 0},
        {1, 3, 1, 17, 130, 7, 7,   1, 1, 0, 0, 0, 0.0f, 1, 0, 0, 0},
        {1, 2, 2, 130, 130, 17, 17, 1, 0, 1, 33, 0, 0.0f, 0, 1, 1, 0},
        {2, 2, 1, 130, 7, 3, 17,   0, 0, 1, 2, 3, 5.0f, 1, 1, 1, 1},
        {1, 4, 4, 130, 130, 16, 16, 0, 0, 0, 0, 0, 0.0f, 0, 0, 0, 0},
        {3, 1, 1, 3, 130, 7, 1,    1, 1, 1, -1, 5, 2.0f, 0, 1, 0, 1},
    };
    static const mcase mcases[] = {
        /* E  H Hkv B Lq Lk  sep kd vd bias bkv zero rope causal mask kpm self pack */
        {8, 2, 2, 1, 1, 1,    0, 8, 8, 1, 0, 0, 0, 0, 0, 0, 1, 0},
        {12, 3, 3, 3, 7, 17,  1, 5, 9, 1, 1, 1, 0, 0, 1, 1, 0, 0},
        {16, 4, 2, 2, 17, 17, 0, 16, 16, 1, 0, 0, 1, 1, 0, 0, 1, 0},
        {24, 4, 4, 1, 130, 130, 0, 24, 24, 1, 0, 0, 0, 1, 0, 1, 1, 1},
        {16, 4, 1, 3, 17, 130, 1, 7, 3, 0, 0, 1, 1, 0, 0, 1, 0, 0},
        {16, 2, 2, 2, 130, 7, 0, 16, 16, 1, 1, 0, 0, 0, 1, 0, 0, 1},
        {16, 4, 2, 2, 7, 3, 0, 16, 16, 1, 1, 1, 1, 1, 0, 1, 0, 1},
        {64, 8, 8, 2, 130, 130, 0, 64, 64, 1, 0, 0, 0, 0, 0, 0, 1, 0},
    };
    static const ecase ecases[] = {
        /* E  H  F  B  L   pre gelu causal kpm */
        {8, 2, 24, 1, 1,   0, 0, 0, 0},
        {16, 4, 37, 3, 7,  1, 1, 0, 1},
        {16, 2, 24, 2, 17, 0, 1, 1, 0},
        {12, 3, 17, 1, 130, 1, 0, 1, 1},
        {64, 8, 256, 2, 130, 0, 0, 0, 0},
    };
    size_t i;
    for (i = 0; i < sizeof ecases / sizeof ecases[0]; ++i) encoder_case(&ecases[i]);
    for (i = 0; i < sizeof cases / sizeof cases[0]; ++i) sdpa_case(&cases[i]);
    for (i = 0; i < sizeof mcases / sizeof mcases[0]; ++i) module_case(&mcases[i]);
    refusals();
    printf("worst saved vs recomputed backward rel err %.3g (tolerance %g, each gradient array on its own)\n",
           worst, TOL);
    return tu_finish("saved");
}
