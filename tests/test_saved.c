/* The saved forward: a training plan's forward run leaves in the caller's
   workspace what its backward needs (lse and O; the module's Q, K, V and
   context; the encoder's activations), and the backward run on that
   workspace uses it instead of recomputing the forward.
   1. SDPA, odd sizes (1, 3, 7, 17, 130) x every option the fused backward
      takes (masks, fully blocked rows, causal in both alignments, windows,
      softcap, ALiBi, sinks and their gradient, GQA): forward then backward
      equals the one-shot backward (which recomputes) to float32 rounding,
      bit-identical on 1, 2 and 3 threads; the forward's output is the one-
      shot forward's, bit for bit; opt.lse is still written.  Scribbling on
      the saved lse changes the gradients (so the backward reads it).
   2. Stale or mismatched use recomputes, so the gradients equal the one-shot
      backward of the backward's own arguments bit for bit: an input changed
      in place, the same values at another address, a mask byte changed,
      other lengths, another plan's forward, a forward without a workspace,
      changed sinks; a second backward reuses the saved forward.
   3. The module (packed or separate projection weights, kdim/vdim, biases,
      bias_k/bias_v, add_zero_attn, GQA, RoPE, masks, causal, self-attention
      with one x; also after a forward that returns the attention weights,
      the unfused path): as 1; weights changed after the forward (an optimizer
      step) recompute; an input changed recomputes.
   4. The encoder layer (post- and pre-norm, ReLU and GELU, masks): a
      training plan's run keeps the activations; forward then backward
      equals the one-shot backward to float32 rounding, threads 1-3
      bit-identical, y equal to the one-shot (inference) forward's bit for
      bit, also past 256 rows; a changed x or linear1 weight recomputes. */
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
/* does the (aligned) workspace start with a saved forward's header? */
static int has_saved(void *ws)
{
    uint64_t m;
    memcpy(&m, mha__align_ws(ws), 8);
    return m == MHA__SAVED_MAGIC;
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
    float *q, *k, *v, *dout, *kpm, *sinks, *lse;
    unsigned char *mask;
    size_t nq, nk, nv, no;
} sdata;

static void sdata_make(const scase *c, sdata *s)
{
    int i;
    s->nq = (size_t)c->B * c->H * c->Lq * c->D; s->nk = (size_t)c->B * c->Hkv * c->Lk * c->D;
    s->nv = (size_t)c->B * c->Hkv * c->Lk * c->Dv; s->no = (size_t)c->B * c->H * c->Lq * c->Dv;
    s->q = rnd(s->nq, 1.5f); s->k = rnd(s->nk, 1.5f); s->v = rnd(s->nv, 1.0f); s->dout = rnd(s->no, 1.0f);
    s->sinks = rnd((size_t)c->H, 1.5f);
    s->lse = zeros((size_t)c->B * c->H * c->Lq);
    s->kpm = (float *)malloc((size_t)c->B * c->Lk * sizeof(float));
    for (i = 0; i < c->B * c->Lk; ++i) s->kpm[i] = tu_next(&rng) % 5 == 0 ? -INFINITY : 0.5f * tu_uniform(&rng);
    s->mask = (unsigned char *)malloc((size_t)c->Lq * c->Lk);
    for (i = 0; i < c->Lq * c->Lk; ++i) s->mask[i] = tu_next(&rng) % 4 == 0;
    if (c->Lq > 2) memset(s->mask + (size_t)2 * c->Lk, 1, (size_t)c->Lk);   /* row 2: nothing allowed */
}
static void sdata_free(sdata *s)
{
    free(s->q); free(s->k); free(s->v); free(s->dout); free(s->kpm); free(s->sinks); free(s->lse);
    free(s->mask);
}

static mha_options sopts(const scase *c, const sdata *s, int threads, float *sinks_grad)
{
    mha_options o;
    memset(&o, 0, sizeof o);
    o.causal = c->causal;
    o.causal_align = c->bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    o.num_kv_heads = c->Hkv == c->H ? 0 : c->Hkv;
    o.window = c->window; o.window_left = c->left; o.window_right = c->right;
    o.softcap = c->softcap; o.alibi = c->alibi; o.sinks = c->sinks ? s->sinks : NULL;
    o.sinks_grad = c->sinks ? sinks_grad : NULL;
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
static double sgrad_err(const scase *c, const sdata *s, const sgrad *a, const sgrad *ref)
{
    double e = rel(a->dq, ref->dq, s->nq), t;
    t = rel(a->dk, ref->dk, s->nk); if (t > e) e = t;
    t = rel(a->dv, ref->dv, s->nv); if (t > e) e = t;
    if (c->sinks) { t = rel(a->sg, ref->sg, (size_t)c->H); if (t > e) e = t; }
    return e;
}

/* the one-shot backward of these arguments (recomputes; one thread) */
static void sdpa_oneshot(const scase *c, const sdata *s, const float *q, sgrad *g)
{
    mha_options o = sopts(c, s, 1, g->sg);
    mha_status st = mha_sdpa_backward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, s->k, s->v, s->dout, &o,
                                      g->dq, g->dk, g->dv, NULL, 0);
    CHECK(st == MHA_OK, "one-shot sdpa backward: %s", mha_status_string(st));
}

static mha_plan *splan(const scase *c, const sdata *s, int threads, float *sg, int with_lse)
{
    mha_options o = sopts(c, s, threads, sg);
    mha_plan *p = NULL;
    mha_status st;
    if (with_lse) o.lse = s->lse;
    st = mha_sdpa_plan(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, &o, MHA_PLAN_TRAINING, NULL, 0, &p);
    CHECK(st == MHA_OK, "sdpa plan: %s", mha_status_string(st));
    return p;
}

static void sdpa_case(const scase *c)
{
    sdata s;
    sgrad ref, g[4], x;
    float *out_ref, *out, *lse_ref;
    mha_options o1;
    mha_plan *p, *p2;
    size_t wsb;
    void *ws;
    int t;
    char d[200];
    snprintf(d, sizeof d, "B%d H%d/%d Lq%d Lk%d D%d/%d causal%d%s win%d(%d,%d) cap%g alibi%d sinks%d kpm%d mask%d",
             c->B, c->H, c->Hkv, c->Lq, c->Lk, c->D, c->Dv, c->causal, c->bottom_right ? "br" : "",
             c->window, c->left, c->right, c->softcap, c->alibi, c->sinks, c->kpm, c->mask);
    sdata_make(c, &s);
    sgrad_make(c, &s, &ref);
    sdpa_oneshot(c, &s, s.q, &ref);
    out_ref = zeros(s.no); out = zeros(s.no); lse_ref = zeros((size_t)c->B * c->H * c->Lq);
    o1 = sopts(c, &s, 1, NULL);
    o1.lse = lse_ref;
    CHECK(mha_sdpa(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, s.q, s.k, s.v, &o1, out_ref, NULL, NULL, 0) == MHA_OK,
          "one-shot sdpa");

    /* 1. forward then backward on 1, 2, 3 threads */
    for (t = 1; t <= 3; ++t) {
        mha_status st;
        double e;
        sgrad_make(c, &s, &g[t]);
        p = splan(c, &s, t, g[t].sg, t == 2);
        if (!p) continue;
        wsb = mha_plan_workspace_size(p);
        ws = malloc(wsb);
        st = mha_sdpa_run(p, c->Lq, c->Lk, s.q, s.k, s.v, NULL, NULL, out, NULL, ws, wsb);
        CHECK(st == MHA_OK && same(out, out_ref, s.no), "%s: training forward != one-shot (threads %d)", d, t);
        CHECK(has_saved(ws), "%s: the forward left no saved forward", d);
        if (t == 2) CHECK(same(s.lse, lse_ref, (size_t)c->B * c->H * c->Lq), "%s: opt.lse not written", d);
        st = mha_sdpa_run_backward(p, c->Lq, c->Lk, s.q, s.k, s.v, s.dout, NULL, NULL, g[t].dq, g[t].dk,
                                   g[t].dv, ws, wsb);
        e = sgrad_err(c, &s, &g[t], &ref);
        CHECK(st == MHA_OK && e <= TOL, "%s: saved backward vs one-shot rel err %.3g (threads %d)", d, e, t);
        if (t > 1) CHECK(sgrad_same(c, &s, &g[t], &g[1]), "%s: threads %d != 1 thread", d, t);
        if (t == 1) {   /* a second backward reuses the same saved forward: the same bits */
            float sg1[8];
            int h;
            memcpy(sg1, g[1].sg, (size_t)c->H * sizeof(float));
            memset(g[1].sg, 0, (size_t)c->H * sizeof(float));   /* (the plan's sinks_grad) */
            sgrad_make(c, &s, &x);
            (void)mha_sdpa_run_backward(p, c->Lq, c->Lk, s.q, s.k, s.v, s.dout, NULL, NULL, x.dq, x.dk,
                                        x.dv, ws, wsb);
            CHECK(same(x.dq, g[1].dq, s.nq) && same(x.dk, g[1].dk, s.nk) && same(x.dv, g[1].dv, s.nv),
                  "%s: a second backward != the first", d);
            for (h = 0; h < c->H; ++h) CHECK(g[1].sg[h] == sg1[h], "%s: second sink gradient", d);
            sgrad_free(&x);
        }
        mha_plan_destroy(p);
        free(ws);
    }

    /* 1b. the saved lse shifted by one: the check sum sees it and the
       backward recomputes (= one-shot); stamped again as if the forward had
       made it, the backward reads it and the gradients move */
    if (c->Lk > 1) {
        float *w;
        size_t i, rows = (size_t)c->B * c->H * c->Lq;
        double e;
        int again;
        mha_options ob;
        for (again = 0; again < 2; ++again) {
            sgrad_make(c, &s, &x);
            p = splan(c, &s, 1, x.sg, 0);
            wsb = mha_plan_workspace_size(p);
            ws = malloc(wsb);
            (void)mha_sdpa_run(p, c->Lq, c->Lk, s.q, s.k, s.v, NULL, NULL, out, NULL, ws, wsb);
            w = mha__align_ws(ws);
            for (i = 0; i < rows; ++i) w[MHA__SAVED_HDR + i] += 1.0f;
            if (again) {
                CHECK(mha__run_begin(p, MHA__PLAN_SDPA, c->Lq, c->Lk, NULL, NULL, &ob) == MHA_OK, "run begin");
                mha__saved_stamp(w, mha__sdpa_key(p, &ob, c->Lq, c->Lk, s.q, s.k, s.v) ^
                                    mha__sdpa_saved_sum(p, c->Lq, w));
            }
            (void)mha_sdpa_run_backward(p, c->Lq, c->Lk, s.q, s.k, s.v, s.dout, NULL, NULL, x.dq, x.dk,
                                        x.dv, ws, wsb);
            e = tu_rel_err_ff(x.dv, ref.dv, s.nv);
            if (again) CHECK(e > 1e-2, "%s: a shifted saved lse left dv unchanged (rel %.3g)", d, e);
            else CHECK(sgrad_same(c, &s, &x, &ref), "%s: a scribbled saved forward was used", d);
            sgrad_free(&x);
            mha_plan_destroy(p);
            free(ws);
        }
    }

    /* 2. stale or mismatched: the backward recomputes, = one-shot bit for bit */
    {
        float *q2 = (float *)malloc(s.nq * sizeof(float)), keep;
        sgrad r2;
        int kind;
        for (kind = 0; kind < 6; ++kind) {
            const float *qb = s.q;
            void *fws;
            if (kind == 3 && !c->mask) continue;
            if (kind == 4 && !c->sinks) continue;
            sgrad_make(c, &s, &x);
            p = splan(c, &s, 2, x.sg, 0);
            p2 = splan(c, &s, 2, x.sg, 0);   /* 0: the forward was this other plan's */
            wsb = mha_plan_workspace_size(p);
            ws = calloc(wsb, 1);   /* (a new block may hold an old header: 5 wants none) */
            fws = kind == 5 ? NULL : ws;   /* 5: the forward got no workspace */
            (void)mha_sdpa_run(kind == 0 ? p2 : p, c->Lq, c->Lk, s.q, s.k, s.v, NULL, NULL, out, NULL, fws, wsb);
            CHECK(has_saved(ws) == (kind != 5), "%s: saved header after the forward (case %d)", d, kind);
            if (kind == 1) { memcpy(q2, s.q, s.nq * sizeof(float)); qb = q2; }    /* same values elsewhere */
            keep = s.q[s.nq / 2];
            if (kind == 2) s.q[s.nq / 2] += 0.25f;                                /* an input changed */
            if (kind == 3) s.mask[(size_t)c->Lq * c->Lk / 2] ^= 1;                /* a mask byte changed */
            if (kind == 4) s.sinks[0] += 0.5f;                                    /* a sink changed */
            (void)mha_sdpa_run_backward(p, c->Lq, c->Lk, qb, s.k, s.v, s.dout, NULL, NULL, x.dq, x.dk, x.dv,
                                        ws, wsb);
            sgrad_make(c, &s, &r2);
            sdpa_oneshot(c, &s, qb, &r2);
            CHECK(sgrad_same(c, &s, &x, &r2), "%s: stale use %d did not recompute", d, kind);
            s.q[s.nq / 2] = keep;
            if (kind == 3) s.mask[(size_t)c->Lq * c->Lk / 2] ^= 1;
            if (kind == 4) s.sinks[0] -= 0.5f;
            sgrad_free(&x); sgrad_free(&r2);
            mha_plan_destroy(p);
            mha_plan_destroy(p2);
            free(ws);
        }
        free(q2);
    }
    /* 2b. shorter lengths than the forward's: recompute */
    if (c->Lq > 1) {
        scase c2 = *c;
        sgrad r2;
        sgrad_make(c, &s, &x);
        p = splan(c, &s, 2, x.sg, 0);
        wsb = mha_plan_workspace_size(p);
        ws = malloc(wsb);
        (void)mha_sdpa_run(p, c->Lq, c->Lk, s.q, s.k, s.v, NULL, NULL, out, NULL, ws, wsb);
        c2.Lq = c->Lq - 1;
        c2.mask = 0;   /* (the mask's data is laid out for Lq) */
        if (!c->mask) {
            sdata s2 = s;
            s2.nq = (size_t)c->B * c->H * c2.Lq * c->D; s2.no = (size_t)c->B * c->H * c2.Lq * c->Dv;
            /* the first rows of each head: q and dout as [B, H, Lq-1, D] views of new buffers */
            s2.q = rnd(s2.nq, 1.0f); s2.dout = rnd(s2.no, 1.0f);
            (void)mha_sdpa_run_backward(p, c2.Lq, c->Lk, s2.q, s.k, s.v, s2.dout, NULL, NULL, x.dq, x.dk,
                                        x.dv, ws, wsb);
            sgrad_make(&c2, &s2, &r2);
            sdpa_oneshot(&c2, &s2, s2.q, &r2);
            CHECK(same(x.dq, r2.dq, s2.nq) && same(x.dk, r2.dk, s.nk) && same(x.dv, r2.dv, s.nv),
                  "%s: a backward at Lq-1 != one-shot", d);
            sgrad_free(&r2);
            free(s2.q); free(s2.dout);
        }
        sgrad_free(&x);
        mha_plan_destroy(p);
        free(ws);
    }
    for (t = 1; t <= 3; ++t) sgrad_free(&g[t]);
    sgrad_free(&ref);
    free(out_ref); free(out); free(lse_ref);
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
    size_t nq, nk, nv, nwin, nwo, nb, nw[4];   /* nw: floats of w[0..3] */
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
        s->nw[1] = (size_t)Ekv * c->kd; s->nw[2] = (size_t)Ekv * c->vd;
    } else {
        s->m.in_proj_weight = s->w[0] = rnd((size_t)(c->E + 2 * Ekv) * c->E, 0.5f);
        s->nwin = (size_t)(c->E + 2 * Ekv) * c->E;
    }
    s->m.out_proj_weight = s->w[3] = rnd((size_t)c->E * c->E, 0.5f);
    s->nwo = (size_t)c->E * c->E;
    s->nw[0] = s->nwin; s->nw[3] = s->nwo;
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

/* every gradient of a module backward, flat: dquery, dkey, dvalue, the
   input projection weights (in_proj or q/k/v), in_proj_bias, out_proj
   weight and bias, bias_k, bias_v */
typedef struct mgrad { float *buf; size_t n; float *dq, *dk, *dv; mha_module_grad g; } mgrad;
static void mgrad_make(const mcase *c, const mdata *s, mgrad *g)
{
    int Ekv = c->E / c->H * c->Hkv;
    size_t nkw = (size_t)Ekv * c->kd, nvw = (size_t)Ekv * c->vd, at = 0;
    memset(g, 0, sizeof *g);
    g->n = s->nq + (c->self ? 0 : s->nk + s->nv) + s->nwin + (c->sep ? nkw + nvw : 0) + s->nb + s->nwo +
           (size_t)c->E + 2 * (size_t)Ekv;
    g->buf = zeros(g->n);
#define TAKE(ptr, cnt) do { ptr = g->buf + at; at += (cnt); } while (0)
    TAKE(g->dq, s->nq);
    if (c->self) { g->dk = g->dv = g->dq; } else { TAKE(g->dk, s->nk); TAKE(g->dv, s->nv); }
    if (c->sep) {
        TAKE(g->g.q_proj_weight, s->nwin); TAKE(g->g.k_proj_weight, nkw); TAKE(g->g.v_proj_weight, nvw);
    } else {
        TAKE(g->g.in_proj_weight, s->nwin);
    }
    TAKE(g->g.in_proj_bias, s->nb); TAKE(g->g.out_proj_weight, s->nwo); TAKE(g->g.out_proj_bias, (size_t)c->E);
    TAKE(g->g.bias_k, (size_t)Ekv); TAKE(g->g.bias_v, (size_t)Ekv);
#undef TAKE
}
static void module_oneshot(const mcase *c, const mdata *s, mgrad *g)
{
    mha_options o = mopts(c, s, 1);
    mha_status st = mha_backward(&s->m, c->B, c->Lq, c->Lk, s->q, s->k, s->v, s->dout, &o, g->dq, g->dk,
                                 g->dv, &g->g, NULL, 0);
    CHECK(st == MHA_OK, "one-shot module backward: %s", mha_status_string(st));
}

static void module_case(const mcase *c)
{
    mdata s;
    mgrad ref, g[5], x;
    float *out, *out_ref, *attw;
    mha_options o;
    mha_plan *p;
    size_t wsb;
    void *ws;
    int t, kind;
    char d[200];
    snprintf(d, sizeof d, "module E%d H%d/%d B%d Lq%d Lk%d sep%d(%d,%d) bias%d bkv%d zero%d rope%d causal%d mask%d kpm%d self%d pack%d",
             c->E, c->H, c->Hkv, c->B, c->Lq, c->Lk, c->sep, c->kd, c->vd, c->bias, c->bkv, c->zero, c->rope,
             c->causal, c->mask, c->kpm, c->self, c->pack);
    mdata_make(c, &s);
    mgrad_make(c, &s, &ref);
    module_oneshot(c, &s, &ref);
    out = zeros(s.nq); out_ref = zeros(s.nq);
    attw = zeros((size_t)c->B * c->Lq * (c->Lk + c->bkv + c->zero));
    o = mopts(c, &s, 1);
    CHECK(mha_forward(&s.m, c->B, c->Lq, c->Lk, s.q, s.k, s.v, &o, out_ref, NULL, NULL, 0) == MHA_OK,
          "one-shot forward");

    /* 1. forward then backward on 1, 2, 3 threads; 4: on 2 threads, a
          forward that also returns the attention weights (the unfused path,
          equal to the fused one to float32 rounding, saves too) */
    for (t = 1; t <= 4; ++t) {
        mha_status st;
        double e;
        o = mopts(c, &s, t < 4 ? t : 2);
        mgrad_make(c, &s, &g[t]);
        st = mha_module_plan(&s.m, c->B, c->Lq, c->Lk, &o, MHA_PLAN_TRAINING | (c->pack ? MHA_PLAN_PACK : 0) |
                             (t == 4 ? MHA_PLAN_WEIGHTS : 0), NULL, 0, &p);
        CHECK(st == MHA_OK, "%s: plan: %s", d, mha_status_string(st));
        if (st != MHA_OK) continue;
        wsb = mha_plan_workspace_size(p);
        ws = malloc(wsb);
        st = mha_module_forward(p, c->Lq, c->Lk, s.q, s.k, s.v, NULL, NULL, out, t == 4 ? attw : NULL, ws, wsb);
        if (t < 4) CHECK(st == MHA_OK && same(out, out_ref, s.nq), "%s: training forward != one-shot (threads %d)", d, t);
        else CHECK(st == MHA_OK && rel(out, out_ref, s.nq) <= TOL, "%s: forward with weights vs one-shot", d);
        CHECK(has_saved(ws), "%s: no saved forward", d);
        st = mha_module_backward(p, c->Lq, c->Lk, s.q, s.k, s.v, s.dout, NULL, NULL, g[t].dq, g[t].dk,
                                 g[t].dv, &g[t].g, ws, wsb);
        e = rel(g[t].buf, ref.buf, ref.n);
        CHECK(st == MHA_OK && e <= TOL, "%s: saved backward vs one-shot rel err %.3g (threads %d)", d, e, t);
        if (t > 1 && t < 4) CHECK(same(g[t].buf, g[1].buf, ref.n), "%s: threads %d != 1 thread", d, t);
        mha_plan_destroy(p);
        free(ws);
    }

    /* 2. stale: 0 an input changed in place, 1 the weights changed (an
       optimizer step; a packed plan says STALE), 2 the backward at other
       lengths: the backward recomputes, = one-shot bit for bit */
    for (kind = 0; kind < 3; ++kind) {
        mha_status st;
        mcase c2 = *c;
        int i;
        if (kind == 2 && (c->Lq < 2 || c->mask)) continue;
        o = mopts(c, &s, 2);
        st = mha_module_plan(&s.m, c->B, c->Lq, c->Lk, &o, MHA_PLAN_TRAINING | (c->pack ? MHA_PLAN_PACK : 0),
                             NULL, 0, &p);
        if (st != MHA_OK) continue;
        wsb = mha_plan_workspace_size(p);
        ws = malloc(wsb);
        (void)mha_module_forward(p, c->Lq, c->Lk, s.q, s.k, s.v, NULL, NULL, out, NULL, ws, wsb);
        if (kind == 0) s.q[s.nq / 3] += 0.5f;
        if (kind == 1)
            for (i = 0; i < 4; ++i) {
                size_t j;
                if (s.w[i]) for (j = 0; j < s.nw[i]; ++j) s.w[i][j] *= 0.99f;
            }
        if (kind == 2) c2.Lq = c->Lq - 1;
        mgrad_make(&c2, &s, &x);
        st = mha_module_backward(p, c2.Lq, c->Lk, s.q, s.k, s.v, s.dout, NULL, NULL, x.dq, x.dk, x.dv, &x.g,
                                 ws, wsb);
        if (kind == 1 && c->pack) {
            CHECK(st == MHA_ERR_STALE, "%s: packed plan after a weight update: %s", d, mha_status_string(st));
        } else {
            mgrad r2;
            mgrad_make(&c2, &s, &r2);
            module_oneshot(&c2, &s, &r2);
            CHECK(st == MHA_OK && same(x.buf, r2.buf, r2.n), "%s: stale use %d did not recompute", d, kind);
            free(r2.buf);
        }
        free(x.buf);
        if (kind == 0) s.q[s.nq / 3] -= 0.5f;
        mha_plan_destroy(p);
        free(ws);
    }
    for (t = 1; t <= 4; ++t) free(g[t].buf);
    free(ref.buf); free(out); free(out_ref); free(attw);
    mdata_free(c, &s);
}

/* ---------------------------------------------------------- encoder */

typedef struct ecase { int E, H, F, B, L, pre, gelu, causal, kpm; } ecase;

static void encoder_case(const ecase *c)
{
    mcase mc;
    mdata s;
    mha_encoder_layer ly = mha_encoder_layer_defaults();
    float *w[8], *x, *dy, *y, *y_ref, *kpm;
    size_t n = (size_t)c->B * c->L * c->E, nf = (size_t)c->F * c->E, ng, i;
    size_t wn[8];
    float *ref, *g[4];
    mha_options o;
    mha_plan *p;
    void *ws;
    size_t wsb;
    int t, kind;
    char d[160];
    snprintf(d, sizeof d, "encoder E%d H%d F%d B%d L%d pre%d gelu%d causal%d kpm%d", c->E, c->H, c->F, c->B,
             c->L, c->pre, c->gelu, c->causal, c->kpm);
    memset(&mc, 0, sizeof mc);
    mc.E = c->E; mc.H = mc.Hkv = c->H; mc.B = c->B; mc.Lq = mc.Lk = c->L; mc.kd = mc.vd = c->E; mc.bias = 1;
    mdata_make(&mc, &s);
    ly.self_attn = s.m;
    ly.dim_feedforward = c->F;
    ly.activation = c->gelu ? MHA_ACT_GELU : MHA_ACT_RELU;
    ly.norm_first = c->pre;
    wn[0] = wn[2] = nf; wn[1] = (size_t)c->F; wn[3] = wn[4] = wn[5] = wn[6] = wn[7] = (size_t)c->E;
    for (i = 0; i < 8; ++i) w[i] = rnd(wn[i], i < 4 ? 0.3f : 0.5f);
    for (i = 4; i < 8; i += 2) { size_t j; for (j = 0; j < (size_t)c->E; ++j) w[i][j] += 1.0f; }
    ly.linear1_weight = w[0]; ly.linear1_bias = w[1]; ly.linear2_weight = w[2]; ly.linear2_bias = w[3];
    ly.norm1_weight = w[4]; ly.norm1_bias = w[5]; ly.norm2_weight = w[6]; ly.norm2_bias = w[7];
    x = rnd(n, 1.0f); dy = rnd(n, 1.0f); y = zeros(n); y_ref = zeros(n);
    kpm = (float *)malloc((size_t)c->B * c->L * sizeof(float));
    for (i = 0; i < (size_t)c->B * c->L; ++i) kpm[i] = i % 5 == 3 ? -INFINITY : 0.0f;
    /* every gradient in one buffer: dx, then the layer's weights in their order */
    ng = n + 2 * nf + (size_t)c->F + 5 * (size_t)c->E + s.nwin + s.nb + s.nwo + (size_t)c->E;
    ref = zeros(ng);
#define GRADS(buf, gr) do { float *at_ = (buf) + n; memset(&(gr), 0, sizeof(gr)); \
        (gr).linear1_weight = at_; at_ += nf; (gr).linear2_weight = at_; at_ += nf;          \
        (gr).linear1_bias = at_; at_ += c->F; (gr).linear2_bias = at_; at_ += c->E;            \
        (gr).norm1_weight = at_; at_ += c->E; (gr).norm1_bias = at_; at_ += c->E;              \
        (gr).norm2_weight = at_; at_ += c->E; (gr).norm2_bias = at_; at_ += c->E;              \
        (gr).self_attn.in_proj_weight = at_; at_ += s.nwin; (gr).self_attn.in_proj_bias = at_; \
        at_ += s.nb; (gr).self_attn.out_proj_weight = at_; at_ += s.nwo;                       \
        (gr).self_attn.out_proj_bias = at_; } while (0)
    memset(&o, 0, sizeof o);
    o.causal = c->causal;
    set_masks(&o, c->B, c->L, c->L, c->kpm ? kpm : NULL, NULL);
    {
        mha_encoder_layer_grad gr;
        o.num_threads = 1;
        GRADS(ref, gr);
        CHECK(mha_encoder_backward(&ly, c->B, c->L, x, &o, dy, ref, &gr, NULL, 0) == MHA_OK, "%s: one-shot", d);
        CHECK(mha_encoder_forward(&ly, c->B, c->L, x, &o, y_ref, NULL, NULL, 0) == MHA_OK, "%s: one-shot fwd", d);
    }
    for (t = 1; t <= 3; ++t) {
        mha_encoder_layer_grad gr;
        mha_status st;
        double e;
        o.num_threads = t;
        g[t] = zeros(ng);
        GRADS(g[t], gr);
        st = mha_encoder_plan(&ly, c->B, c->L, &o, MHA_PLAN_TRAINING, NULL, 0, &p);
        CHECK(st == MHA_OK, "%s: plan: %s", d, mha_status_string(st));
        if (st != MHA_OK) continue;
        wsb = mha_plan_workspace_size(p);
        ws = malloc(wsb);
        st = mha_encoder_run(p, c->L, x, NULL, NULL, y, NULL, ws, wsb);
        CHECK(st == MHA_OK && same(y, y_ref, n), "%s: training forward != one-shot (inference) forward", d);
        CHECK(has_saved(ws), "%s: no saved forward", d);
        st = mha_encoder_run_backward(p, c->L, x, dy, NULL, NULL, g[t], &gr, ws, wsb);
        e = rel(g[t], ref, ng);
        CHECK(st == MHA_OK && e <= TOL, "%s: saved backward vs one-shot rel err %.3g (threads %d)", d, e, t);
        if (t > 1) CHECK(same(g[t], g[1], ng), "%s: threads %d != 1 thread", d, t);
        mha_plan_destroy(p);
        free(ws);
    }
    /* stale: 0 x changed in place, 1 linear1's weights changed: recompute */
    for (kind = 0; kind < 2; ++kind) {
        mha_encoder_layer_grad gr;
        float *gs = zeros(ng), *r2 = zeros(ng);
        o.num_threads = 2;
        if (mha_encoder_plan(&ly, c->B, c->L, &o, MHA_PLAN_TRAINING, NULL, 0, &p) != MHA_OK) continue;
        wsb = mha_plan_workspace_size(p);
        ws = malloc(wsb);
        (void)mha_encoder_run(p, c->L, x, NULL, NULL, y, NULL, ws, wsb);
        if (kind == 0) x[n / 2] += 0.5f;
        else for (i = 0; i < nf; ++i) w[0][i] *= 0.99f;
        GRADS(gs, gr);
        (void)mha_encoder_run_backward(p, c->L, x, dy, NULL, NULL, gs, &gr, ws, wsb);
        GRADS(r2, gr);
        o.num_threads = 1;
        (void)mha_encoder_backward(&ly, c->B, c->L, x, &o, dy, r2, &gr, NULL, 0);
        CHECK(same(gs, r2, ng), "%s: stale use %d did not recompute", d, kind);
        if (kind == 0) x[n / 2] -= 0.5f;
        free(gs); free(r2);
        mha_plan_destroy(p);
        free(ws);
    }
#undef GRADS
    for (t = 1; t <= 3; ++t) free(g[t]);
    for (i = 0; i < 8; ++i) free(w[i]);
    free(ref); free(x); free(dy); free(y); free(y_ref); free(kpm);
    mdata_free(&mc, &s);
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
    printf("worst saved vs recomputed backward rel err %.3g (tolerance %g)\n", worst, TOL);
    return tu_finish("saved");
}
