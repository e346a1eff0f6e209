/* The fused attention backward (FlashAttention-2: P recomputed tile by tile
   from the log-sum-exp, no Lq x Lk buffer), through the public calls,
   against the float64 SDPA backward of tests/ref.h (P and dP of a whole
   head from the definition): odd sizes, several query and key tiles, bool
   and float masks, fully blocked rows, causal in both alignments, sliding
   windows, softcap, ALiBi, sinks (their gradient too), GQA/MQA.
     - the one-shot mha_sdpa_backward on 1, 2 and 3 threads: the same bits;
     - a MHA_PLAN_TRAINING plan: its forward (with run.lse and run.saved)
       against the reference's output and lse, its backward from that saved
       forward against the reference, and its backward without one
       (recomputing) equal to the one-shot call bit for bit.
   A NaN in the key and value rows of a blocked key must not reach any
   gradient. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "ref.h"
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5

typedef struct bcase {
    int B, H, Hkv, Lq, Lk, D, Dv;
    int causal, bottom_right, window, left, right;
    float softcap;
    int alibi, sinks, kpm, mask;   /* kpm: float [B, Lk] with -inf; mask: bool [Lq, Lk] */
} bcase;

static double worst, worst_fwd;

static double *dmalloc(size_t n) { return (double *)malloc((n ? n : 1) * sizeof(double)); }

/* ||got - ref|| / ||ref|| into *worst, checked against TOL */
static void cmp(const char *d, const char *what, const float *got, const double *ref, size_t n, double *w)
{
    double e = tu_rel_err(got, ref, n);
    if (e > *w) *w = e;
    CHECK(e <= TOL, "%s: %s vs float64 reference %.3g", d, what, e);
}

/* lse: -inf exactly where the reference has it, else within TOL of it (relative to max(1, |lse|)) */
static void cmp_lse(const char *d, const float *got, const double *ref, size_t n)
{
    size_t i, bad = 0;
    for (i = 0; i < n; ++i) {
        if (ref[i] == -INFINITY) bad += got[i] != -INFINITY;
        else bad += !(fabs(got[i] - ref[i]) <= TOL * (fabs(ref[i]) > 1 ? fabs(ref[i]) : 1));
    }
    CHECK(bad == 0, "%s: %zu of %zu lse values differ from the reference", d, bad, n);
}

static void run_case(const bcase *c, unsigned long long seed, int nan_keys)
{
    tu_rng r = { seed };
    size_t nq = (size_t)c->B * c->H * c->Lq * c->D, nk = (size_t)c->B * c->Hkv * c->Lk * c->D;
    size_t nv = (size_t)c->B * c->Hkv * c->Lk * c->Dv, no = (size_t)c->B * c->H * c->Lq * c->Dv;
    size_t nl = (size_t)c->B * c->H * c->Lq;
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nv * 4), *dout = malloc(no * 4);
    double *rq = dmalloc(nq), *rk = dmalloc(nk), *rv = dmalloc(nv), *ro = dmalloc(no), *rl = dmalloc(nl);
    double *rs = dmalloc((size_t)c->H);
    float *dq1 = malloc(nq * 4), *dk1 = malloc(nk * 4), *dv1 = malloc(nv * 4);
    float *dqt = malloc(nq * 4), *dkt = malloc(nk * 4), *dvt = malloc(nv * 4);
    float *out = malloc(no * 4), *lse = malloc(nl * 4);
    float *kpm = malloc((size_t)c->B * c->Lk * 4), *sinks = malloc((size_t)c->H * 4);
    float *sg1 = malloc((size_t)c->H * 4), *sgt = malloc((size_t)c->H * 4);
    unsigned char *mask = malloc((size_t)c->Lq * c->Lk);
    mha_options o;
    mha_run run;
    mha_error err;
    mha_status st;
    char d[160];
    int t, i, j, hh;
    tu_fill(&r, q, nq, 1.5f); tu_fill(&r, k, nk, 1.5f); tu_fill(&r, v, nv, 1.0f); tu_fill(&r, dout, no, 1.0f);
    for (i = 0; i < c->H; ++i) sinks[i] = 1.5f * tu_uniform(&r);
    for (j = 0; j < c->B * c->Lk; ++j) kpm[j] = (tu_next(&r) % 5 == 0) ? -INFINITY : 0.5f * tu_uniform(&r);
    for (i = 0; i < c->Lq * c->Lk; ++i) mask[i] = tu_next(&r) % 4 == 0;   /* 1 = blocked (BOOL) */
    for (j = 0; j < c->Lk && c->Lq > 2; ++j) mask[(size_t)2 * c->Lk + j] = 1;   /* row 2: nothing allowed */
    memset(&o, 0, sizeof o);
    o.causal = c->causal;
    o.causal_align = c->bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    o.num_kv_heads = c->Hkv == c->H ? 0 : c->Hkv;
    o.window = c->window; o.window_left = c->left; o.window_right = c->right;
    o.softcap = c->softcap; o.alibi = c->alibi; o.sinks = c->sinks ? sinks : NULL;
    if (c->kpm) {
        o.key_padding_mask.kind = MHA_MASK_FLOAT; o.key_padding_mask.data = kpm;
        o.key_padding_mask.ndim = 2; o.key_padding_mask.shape[0] = c->B; o.key_padding_mask.shape[1] = c->Lk;
    }
    if (c->mask) {
        o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = mask;
        o.attn_mask.ndim = 2; o.attn_mask.shape[0] = c->Lq; o.attn_mask.shape[1] = c->Lk;
    }
    snprintf(d, sizeof d, "B%d H%d/%d Lq%d Lk%d D%d/%d causal%d%s win%d(%d,%d) cap%g alibi%d sinks%d kpm%d mask%d%s",
             c->B, c->H, c->Hkv, c->Lq, c->Lk, c->D, c->Dv, c->causal, c->bottom_right ? "br" : "",
             c->window, c->left, c->right, c->softcap, c->alibi, c->sinks, c->kpm, c->mask,
             nan_keys ? " NaN in blocked keys" : "");
    /* the reference reads no blocked key, so it is the same before and after the poison */
    ref_sdpa(&o, c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, k, v, dout, ro, rl, rq, rk, rv,
             c->sinks ? rs : NULL);
    if (nan_keys) {   /* poison every key and value row the key padding mask blocks */
        for (i = 0; i < c->B; ++i)
            for (j = 0; j < c->Lk; ++j)
                if (kpm[(size_t)i * c->Lk + j] == -INFINITY)
                    for (hh = 0; hh < c->Hkv; ++hh) {
                        size_t row = ((size_t)i * c->Hkv + hh) * c->Lk + j;
                        for (t = 0; t < c->D; ++t) k[row * c->D + t] = NAN;
                        for (t = 0; t < c->Dv; ++t) v[row * c->Dv + t] = NAN;
                    }
    }

    /* the one-shot backward on 1, 2, 3 threads */
    for (t = 1; t <= 3; ++t) {
        float *gq = t == 1 ? dq1 : dqt, *gk = t == 1 ? dk1 : dkt, *gv = t == 1 ? dv1 : dvt;
        float *sg = t == 1 ? sg1 : sgt;
        memset(gq, 0, nq * 4); memset(gk, 0, nk * 4); memset(gv, 0, nv * 4); memset(sg, 0, (size_t)c->H * 4);
        memset(&run, 0, sizeof run);
        run.sinks_grad = c->sinks ? sg : NULL;
        o.num_threads = t;
        st = mha_sdpa_backward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, k, v, dout, &o, gq, gk, gv, &run, &err);
        CHECK(st == MHA_OK, "%s: mha_sdpa_backward: %s", d, err.message);
        if (t == 1) {
            cmp(d, "dq", dq1, rq, nq, &worst);
            cmp(d, "dk", dk1, rk, nk, &worst);
            cmp(d, "dv", dv1, rv, nv, &worst);
            if (c->sinks) cmp(d, "sink gradient", sg1, rs, (size_t)c->H, &worst);
        } else {
            CHECK(memcmp(dqt, dq1, nq * 4) == 0 && memcmp(dkt, dk1, nk * 4) == 0 &&
                  memcmp(dvt, dv1, nv * 4) == 0 && memcmp(sgt, sg1, (size_t)c->H * 4) == 0,
                  "%s: %d threads differ from 1", d, t);
        }
    }

    /* a training plan (2 threads): forward with its lse and saved forward,
       the backward from the saved forward, and the backward recomputing */
    {
        mha_plan *p = NULL;
        mha_sizes sz = {0, 0, 0};
        void *ws = NULL, *saved = NULL;
        o.num_threads = 2;
        st = mha_sdpa_plan_size(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, &o, MHA_PLAN_TRAINING, &sz, &err);
        CHECK(st == MHA_OK && sz.saved > 0, "%s: mha_sdpa_plan_size: %s", d, st ? err.message : "no saved bytes");
        if (st == MHA_OK)
            st = mha_sdpa_plan(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &err);
        CHECK(st == MHA_OK, "%s: mha_sdpa_plan: %s", d, err.message);
        if (st == MHA_OK) {
            ws = malloc(sz.workspace);
            saved = malloc(sz.saved);
            memset(&run, 0, sizeof run);
            run.workspace = ws; run.workspace_bytes = sz.workspace;
            run.saved = saved; run.saved_bytes = sz.saved;
            run.lse = lse;
            memset(out, 0xff, no * 4);   /* NaN: every element must be written */
            st = mha_sdpa_run_forward(p, c->Lq, c->Lk, q, k, v, out, &run, &err);
            CHECK(st == MHA_OK, "%s: mha_sdpa_run_forward: %s", d, err.message);
            cmp(d, "plan forward out", out, ro, no, &worst_fwd);
            cmp_lse(d, lse, rl, nl);

            /* backward from the saved forward */
            run.lse = NULL;
            run.sinks_grad = c->sinks ? sgt : NULL;
            memset(dqt, 0, nq * 4); memset(dkt, 0, nk * 4); memset(dvt, 0, nv * 4); memset(sgt, 0, (size_t)c->H * 4);
            st = mha_sdpa_run_backward(p, c->Lq, c->Lk, q, k, v, dout, dqt, dkt, dvt, &run, &err);
            CHECK(st == MHA_OK, "%s: mha_sdpa_run_backward (saved): %s", d, err.message);
            cmp(d, "dq (saved forward)", dqt, rq, nq, &worst);
            cmp(d, "dk (saved forward)", dkt, rk, nk, &worst);
            cmp(d, "dv (saved forward)", dvt, rv, nv, &worst);
            if (c->sinks) cmp(d, "sink gradient (saved forward)", sgt, rs, (size_t)c->H, &worst);

            /* recomputing: the one-shot call is this plan, so the same bits */
            run.saved = NULL; run.saved_bytes = 0;
            memset(dqt, 0, nq * 4); memset(dkt, 0, nk * 4); memset(dvt, 0, nv * 4); memset(sgt, 0, (size_t)c->H * 4);
            st = mha_sdpa_run_backward(p, c->Lq, c->Lk, q, k, v, dout, dqt, dkt, dvt, &run, &err);
            CHECK(st == MHA_OK, "%s: mha_sdpa_run_backward (recompute): %s", d, err.message);
            CHECK(memcmp(dqt, dq1, nq * 4) == 0 && memcmp(dkt, dk1, nk * 4) == 0 &&
                  memcmp(dvt, dv1, nv * 4) == 0 && memcmp(sgt, sg1, (size_t)c->H * 4) == 0,
                  "%s: plan backward (recompute) differs from the one-shot call", d);
        }
        mha_plan_destroy(p);
        free(ws); free(saved);
    }
    free(q); free(k); free(v); free(dout); free(rq); free(rk); free(rv); free(ro); free(rl); free(rs);
    free(dq1); free(dk1); free(dv1); free(dqt); free(dkt); free(dvt); free(out); free(lse);
    free(kpm); free(sinks); free(sg1); free(sgt); free(mask);
}

static bcase base(int B, int H, int Hkv, int Lq, int Lk, int D, int Dv)
{
    bcase c;
    memset(&c, 0, sizeof c);
    c.B = B; c.H = H; c.Hkv = Hkv; c.Lq = Lq; c.Lk = Lk; c.D = D; c.Dv = Dv;
    c.left = c.right = -1;
    return c;
}

int main(void)
{
    bcase c;
    int i;
    static const int sz[][7] = {{1, 1, 1, 1, 1, 1, 1}, {2, 3, 3, 7, 17, 5, 9}, {1, 2, 2, 130, 67, 16, 8},
                                {2, 4, 2, 65, 129, 32, 32}, {1, 3, 1, 200, 131, 7, 13}};
    for (i = 0; i < 5; ++i) {
        const int *s = sz[i];
        c = base(s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
        run_case(&c, 11u + i, 0);
        c.causal = 1; run_case(&c, 21u + i, 0);
        c.bottom_right = 1; run_case(&c, 31u + i, 0);
        c.causal = 0; c.kpm = 1; c.mask = 1; run_case(&c, 41u + i, 0);
        run_case(&c, 51u + i, 1);
        c = base(s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
        c.window = 1; c.left = 9; c.right = 3; c.alibi = 1; run_case(&c, 61u + i, 0);
        c.causal = 1; c.bottom_right = i & 1; c.right = -1; c.softcap = 2.5f; c.sinks = 1; run_case(&c, 71u + i, 0);
        c.kpm = 1; run_case(&c, 81u + i, 1);
        c = base(s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
        c.softcap = 1.5f; c.sinks = 1; c.mask = 1; run_case(&c, 91u + i, 0);
    }
    printf("worst fused backward vs float64 reference rel err %.3g, plan forward %.3g (tolerance %g)\n",
           worst, worst_fwd, TOL);
    return tu_finish("fused_backward");
}
