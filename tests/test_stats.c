/* Row statistics (run.lse, run.entropy, run.max_weight, run.first_weight)
   and the recomputed weight rows (a forward with run.weights, run.rows,
   run.n_rows), checked against a float64 reference written out below and
   against the full weights that mha_sdpa_forward / mha_module_forward
   return in run.weights: every mask kind, causal (both alignments),
   window, soft-cap, ALiBi, sinks, GQA, fully blocked rows, split-K
   decoding, the KV cache (rolling, n_keep; SDPA and a module's decoding
   plan), plans, threads, odd and round sizes, the module's rows per head
   and head-averaged, bad row lists, and one long row set (L = 16384; 2048
   where the build is slow: NEON under qemu, sanitizers, or STATS_QUICK=1
   in the environment).  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

#if defined(__aarch64__) || defined(__SANITIZE_ADDRESS__)
#define STATS_SLOW 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define STATS_SLOW 1
#endif
#endif
#ifndef STATS_SLOW
#define STATS_SLOW 0
#endif

/* A float32 score s carries an absolute error of about 6e-8 |s|, and a
   weight exp(s - lse) the same relative error: the absolute tolerances on
   weights and entropy are scaled by max(1, |lse|) (ALiBi with future keys
   reaches scores near 40 here), except in the long case, where they are
   1e-6 as they stand.  */
#define TOL_W   1e-6   /* absolute, on every weight, max weight and first weight */
#define TOL_H   1e-5   /* absolute, on the entropy (nats); 1e-6 in the long case */
#define TOL_LSE 1e-5   /* relative (to max(1, |lse|)) */
/* Long case against float64: the scores of the planted sink key reach ~16,
   whose float32 rounding (~1e-6) moves H by ~2e-6 (and float32 H near 9
   nats has an ulp of 1e-6), so 1e-6 holds for the weights only.  Against
   the float32 rows the library recomputes, H summed over 16k float weights
   and the sink's share 1 - sum w agrees to TOL_H.  */
#define TOL_H_LONG64 4e-6
static double tol_scale(double lse) { return fabs(lse) > 1 && lse != -INFINITY ? fabs(lse) : 1; }

static double worst_w, worst_h, worst_lse, worst_full;

/* ------------------------------------------------------------ problem */

typedef struct cfg {
    int B, H, Hkv, Lq, Lk, D;
    int causal, bottom_right, window, left, right;
    float softcap;
    int alibi, sinks;
    int mask;        /* 0 none, 1 bool [Lq,Lk], 2 bool-keep [B*H,Lq,Lk], 3 float [B,H,Lq,Lk] */
    int kpm;         /* 0 none, 1 bool, 2 float */
    int block_key0;  /* the masks block key 0 of every row */
    int block_row;   /* the attention mask blocks every key of query row 1 */
    int threads;
} cfg;

typedef struct prob {
    cfg c;
    float *q, *k, *sinks, *slopes, *fmask, *fkpm;
    unsigned char *bmask, *bkpm;
    mha_options o;
} prob;

static size_t mask_rows(const cfg *c) { return c->mask == 1 ? (size_t)c->Lq : (size_t)c->B * c->H * c->Lq; }

static void prob_make(prob *p, const cfg *c, unsigned long long seed)
{
    tu_rng r = { seed };
    size_t nq = (size_t)c->B * c->H * c->Lq * c->D, nk = (size_t)c->B * c->Hkv * c->Lk * c->D;
    size_t nm = mask_rows(c) * c->Lk, t;
    int h, keep = c->mask == 2;
    memset(p, 0, sizeof *p);
    p->c = *c;
    p->q = malloc(nq * sizeof(float)); p->k = malloc(nk * sizeof(float));
    p->sinks = malloc((size_t)c->H * sizeof(float)); p->slopes = malloc((size_t)c->H * sizeof(float));
    p->fmask = malloc(nm * sizeof(float)); p->bmask = malloc(nm);
    p->fkpm = malloc((size_t)c->B * c->Lk * sizeof(float)); p->bkpm = malloc((size_t)c->B * c->Lk);
    tu_fill(&r, p->q, nq, 1.5f); tu_fill(&r, p->k, nk, 1.5f);
    for (h = 0; h < c->H; ++h) {
        p->sinks[h] = h == 1 ? -INFINITY : 2.0f * tu_uniform(&r);   /* head 1: no sink */
        p->slopes[h] = 0.02f + 0.2f * (tu_uniform(&r) + 1.0f);
    }
    for (t = 0; t < nm; ++t) {
        int blocked = tu_next(&r) % 5 == 0 || (c->block_key0 && t % c->Lk == 0) ||
                      (c->block_row && (t / c->Lk) % c->Lq == 1 % c->Lq);
        p->fmask[t] = blocked ? -INFINITY : 0.7f * tu_uniform(&r);
        p->bmask[t] = (unsigned char)(keep ? !blocked : blocked);
    }
    for (t = 0; t < (size_t)c->B * c->Lk; ++t) {
        int blocked = tu_next(&r) % 6 == 0 || (c->block_key0 && t % c->Lk == 0);
        p->fkpm[t] = blocked ? -INFINITY : 0.4f * tu_uniform(&r);
        p->bkpm[t] = (unsigned char)blocked;
    }
    p->o.causal = c->causal;
    p->o.causal_align = c->bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    p->o.window = c->window; p->o.window_left = c->left; p->o.window_right = c->right;
    p->o.softcap = c->softcap;
    p->o.alibi = c->alibi; p->o.alibi_slopes = c->alibi == 2 ? p->slopes : NULL;
    p->o.sinks = c->sinks ? p->sinks : NULL;
    p->o.num_kv_heads = c->Hkv;
    p->o.num_threads = c->threads;
    if (c->mask) {
        mha_mask *m = &p->o.attn_mask;
        m->kind = c->mask == 1 ? MHA_MASK_BOOL : c->mask == 2 ? MHA_MASK_BOOL_KEEP : MHA_MASK_FLOAT;
        m->data = c->mask == 3 ? (const void *)p->fmask : (const void *)p->bmask;
        if (c->mask == 1) { m->ndim = 2; m->shape[0] = c->Lq; m->shape[1] = c->Lk; }
        if (c->mask == 2) { m->ndim = 3; m->shape[0] = c->B * c->H; m->shape[1] = c->Lq; m->shape[2] = c->Lk; }
        if (c->mask == 3) { m->ndim = 4; m->shape[0] = c->B; m->shape[1] = c->H; m->shape[2] = c->Lq; m->shape[3] = c->Lk; }
    }
    if (c->kpm) {
        mha_mask *m = &p->o.key_padding_mask;
        m->kind = c->kpm == 1 ? MHA_MASK_BOOL : MHA_MASK_FLOAT;
        m->data = c->kpm == 1 ? (const void *)p->bkpm : (const void *)p->fkpm;
        m->ndim = 2; m->shape[0] = c->B; m->shape[1] = c->Lk;
    }
}

static void prob_free(prob *p)
{
    free(p->q); free(p->k); free(p->sinks); free(p->slopes); free(p->fmask); free(p->bmask);
    free(p->fkpm); free(p->bkpm);
}

/* ------------------------------------------------------------ float64 reference */

typedef struct refrow { double lse, ent, maxw, first; } refrow;

/* Row (b, h, i): the weights p[0..Lk) and the statistics, in double, from
   the definitions: s = scale q.k, soft-cap, + ALiBi, masks, causal/window
   at i' = i (+ Lk - Lq bottom-right); softmax with the sink in the sum.  */
static refrow ref_row(const cfg *c, const mha_options *o, const float *q, const float *k,
                      int b, int h, int i, double *p)
{
    refrow R = { -INFINITY, 0, 0, 0 };
    double scale = o->scale > 0 ? o->scale : 1.0 / sqrt((double)c->D), m = -INFINITY, sum = 0, ps = 0;
    double sink = o->sinks ? o->sinks[h] : -INFINITY;
    int Hkv = o->num_kv_heads ? o->num_kv_heads : c->H, g = c->H / Hkv, j, d;
    long ip = i + (o->causal_align == MHA_CAUSAL_BOTTOM_RIGHT ? (long)c->Lk - c->Lq : 0);
    const float *qi = q + (((size_t)b * c->H + h) * c->Lq + i) * c->D;
    const float *kb = k + ((size_t)b * Hkv + h / g) * c->Lk * c->D;
    float slopes[64];
    if (o->alibi && !o->alibi_slopes) mha_alibi_slopes(c->H, slopes, NULL);
    for (j = 0; j < c->Lk; ++j) {
        double s = 0;
        int blocked = 0;
        for (d = 0; d < c->D; ++d) s += (double)qi[d] * kb[(size_t)j * c->D + d];
        s *= scale;
        if (o->softcap > 0) s = o->softcap * tanh(s / o->softcap);
        if (o->alibi) s += (o->alibi_slopes ? o->alibi_slopes[h] : slopes[h]) * (double)(j - ip);
        if (o->attn_mask.kind != MHA_MASK_NONE) {
            const mha_mask *mk = &o->attn_mask;
            size_t row = mk->ndim == 2 ? (size_t)i : ((size_t)b * c->H + h) * c->Lq + i;
            if (mk->kind == MHA_MASK_FLOAT) {
                float f = ((const float *)mk->data)[row * c->Lk + j];
                if (f == -INFINITY) blocked = 1; else s += f;
            } else {
                unsigned char u = ((const unsigned char *)mk->data)[row * c->Lk + j];
                blocked |= mk->kind == MHA_MASK_BOOL ? u != 0 : u == 0;
            }
        }
        if (o->key_padding_mask.kind != MHA_MASK_NONE) {
            const mha_mask *mk = &o->key_padding_mask;
            if (mk->kind == MHA_MASK_FLOAT) {
                float f = ((const float *)mk->data)[(size_t)b * c->Lk + j];
                if (f == -INFINITY) blocked = 1; else s += f;
            } else blocked |= ((const unsigned char *)mk->data)[(size_t)b * c->Lk + j] != 0;
        }
        if (o->causal && j > ip) blocked = 1;
        if (o->window && o->window_left >= 0 && j < ip - o->window_left) blocked = 1;
        if (o->window && o->window_right >= 0 && j > ip + o->window_right) blocked = 1;
        p[j] = blocked ? -INFINITY : s;
        if (p[j] > m) m = p[j];
    }
    if (sink > m) m = sink;
    if (m == -INFINITY) { for (j = 0; j < c->Lk; ++j) p[j] = 0; return R; }
    for (j = 0; j < c->Lk; ++j) sum += exp(p[j] - m);
    sum += exp(sink - m);
    R.lse = m + log(sum);
    for (j = 0; j < c->Lk; ++j) {
        p[j] = exp(p[j] - R.lse);
        if (p[j] > 0) R.ent -= p[j] * log(p[j]);
        if (p[j] > R.maxw) R.maxw = p[j];
    }
    ps = exp(sink - R.lse);
    if (ps > 0) R.ent -= ps * log(ps);
    R.first = p[0];
    return R;
}

/* The statistics of one row of float weights w (the unfused output), in
   double; the sink's share is 1 - sum w.  */
static refrow stats_of_weights(const float *w, int n, float lse)
{
    refrow R = { lse, 0, 0, 0 };
    double sum = 0, ps;
    int j;
    for (j = 0; j < n; ++j) {
        sum += w[j];
        if (w[j] > 0) R.ent -= w[j] * log((double)w[j]);
        if (w[j] > R.maxw) R.maxw = w[j];
    }
    ps = 1 - sum;
    if (ps > 1e-7) R.ent -= ps * log(ps);
    R.first = n > 0 ? w[0] : 0;
    return R;
}

/* ------------------------------------------------------------ checks */

typedef struct statbuf { float *lse, *ent, *maxw, *first; } statbuf;

static void sb_make(statbuf *s, size_t n)
{
    size_t t;
    s->lse = malloc(n * sizeof(float)); s->ent = malloc(n * sizeof(float));
    s->maxw = malloc(n * sizeof(float)); s->first = malloc(n * sizeof(float));
    for (t = 0; t < n; ++t) s->lse[t] = s->ent[t] = s->maxw[t] = s->first[t] = NAN;   /* unwritten: NaN */
}
/* A run that writes the four statistics into s (workspace: the run's own). */
static mha_run sb_run(const statbuf *s)
{
    mha_run r;
    memset(&r, 0, sizeof r);
    r.lse = s->lse; r.entropy = s->ent; r.max_weight = s->maxw; r.first_weight = s->first;
    return r;
}
static mha_run no_run(void)
{
    mha_run r;
    memset(&r, 0, sizeof r);
    return r;
}
/* The four statistics of n rows are the same bits in a and b. */
static int sb_same(const statbuf *a, const statbuf *b, size_t n)
{
    return memcmp(a->lse, b->lse, n * 4) == 0 && memcmp(a->ent, b->ent, n * 4) == 0 &&
           memcmp(a->maxw, b->maxw, n * 4) == 0 && memcmp(a->first, b->first, n * 4) == 0;
}
static void sb_free(statbuf *s) { free(s->lse); free(s->ent); free(s->maxw); free(s->first); }

static double lse_err(double got, double want)
{
    if (want == -INFINITY) return got == -INFINITY ? 0 : INFINITY;
    if (!(got == got)) return INFINITY;
    return fabs(got - want) / (fabs(want) > 1 ? fabs(want) : 1);
}

/* One row's statistics against a reference; returns 1 when within tolerance. */
static int row_tol(const char *what, float lse, float ent, float maxw, float first, refrow R, double *worst_out,
                   double tw, double th)
{
    double el = lse_err(lse, R.lse), eh = fabs(ent - R.ent), em = fabs(maxw - R.maxw), ef = fabs(first - R.first);
    double ew = em > ef ? em : ef;
    if (!(eh == eh)) eh = INFINITY;
    if (!(ew == ew)) ew = INFINITY;
    if (worst_out) {
        if (el > worst_out[0]) worst_out[0] = el;
        if (eh > worst_out[1]) worst_out[1] = eh;
        if (ew > worst_out[2]) worst_out[2] = ew;
    }
    if (el <= TOL_LSE && eh <= th && ew <= tw) return 1;
    printf("  %s: lse %.9g vs %.9g, entropy %.9g vs %.9g, max %.9g vs %.9g, first %.9g vs %.9g\n", what,
           lse, R.lse, ent, R.ent, maxw, R.maxw, first, R.first);
    return 0;
}

static int row_ok(const char *what, float lse, float ent, float maxw, float first, refrow R, double *worst_out)
{
    double sc = tol_scale(R.lse);
    return row_tol(what, lse, ent, maxw, first, R, worst_out, TOL_W * sc, TOL_H * sc);
}

static void note_worst(const double *w)
{
    if (w[0] > worst_lse) worst_lse = w[0];
    if (w[1] > worst_h) worst_h = w[1];
    if (w[2] > worst_w) worst_w = w[2];
}

/* Fused stats, unfused stats and full weights, recomputed rows: all against
   the float64 reference and the fused ones against the full weights.  */
static void check_case(const char *name, const cfg *c, unsigned long long seed)
{
    prob P;
    statbuf fu, un, ro;
    size_t rows = (size_t)c->B * c->H * c->Lq, nw = rows * c->Lk, no = rows * c->D, t;
    float *out, *out_f, *w, *wr, *wr2;
    double *p, wf[3] = { 0, 0, 0 }, wu[3] = { 0, 0, 0 }, wfull[3] = { 0, 0, 0 }, wrow = 0, wrow_full = 0;
    int *idx, b, h, i, j, bad = 0, badu = 0, badfull = 0, badrows = 0, nan = 0;
    mha_run run;
    mha_error err;
    prob_make(&P, c, seed);
    sb_make(&fu, rows); sb_make(&un, rows); sb_make(&ro, rows);
    out = malloc(no * sizeof(float)); out_f = malloc(no * sizeof(float)); w = malloc(nw * sizeof(float));
    wr = malloc(nw * sizeof(float)); wr2 = malloc(nw * sizeof(float)); p = malloc((size_t)c->Lk * sizeof(double));
    idx = malloc((size_t)c->Lq * sizeof(int));
    for (i = 0; i < c->Lq; ++i) idx[i] = c->Lq - 1 - i;   /* every row, backwards */
    {
        float *v = malloc((size_t)c->B * c->Hkv * c->Lk * c->D * sizeof(float));
        tu_rng r = { seed ^ 77 };
        tu_fill(&r, v, (size_t)c->B * c->Hkv * c->Lk * c->D, 1.0f);
        run = sb_run(&fu);
        CHECK(mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->D, P.q, P.k, v, &P.o, out_f, &run, &err) ==
              MHA_OK, "%s: fused sdpa: %s", name, err.message);
        run = sb_run(&un);
        run.weights = w;
        CHECK(mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->D, P.q, P.k, v, &P.o, out, &run, &err) ==
              MHA_OK, "%s: sdpa with weights: %s", name, err.message);
        /* the rows: recomputed from the lse of a fused forward kept in the
           workspace, and (wr2) from the run's own lse with the statistics */
        run = no_run();
        run.weights = wr; run.rows = idx; run.n_rows = c->Lq;
        CHECK(mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->D, P.q, P.k, v, &P.o, out, &run, &err) ==
              MHA_OK, "%s: rows: %s", name, err.message);
        CHECK(memcmp(out, out_f, no * sizeof(float)) == 0, "%s: a forward with rows != the fused forward", name);
        run = sb_run(&ro);
        run.weights = wr2; run.rows = idx; run.n_rows = c->Lq;
        CHECK(mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->D, P.q, P.k, v, &P.o, out, &run, &err) ==
              MHA_OK, "%s: rows with statistics: %s", name, err.message);
        CHECK(memcmp(wr, wr2, nw * sizeof(float)) == 0 && sb_same(&ro, &fu, rows),
              "%s: rows (or statistics) with run.lse != without", name);
        free(v);
    }
    for (b = 0; b < c->B; ++b)
        for (h = 0; h < c->H; ++h)
            for (i = 0; i < c->Lq; ++i) {
                size_t r = ((size_t)b * c->H + h) * c->Lq + i;
                const float *wrow_i = wr + (((size_t)b * c->H + h) * c->Lq + (c->Lq - 1 - i)) * c->Lk;
                refrow R = ref_row(c, &P.o, P.q, P.k, b, h, i, p), F;
                nan |= fu.ent[r] != fu.ent[r] || fu.maxw[r] != fu.maxw[r] || fu.first[r] != fu.first[r] ||
                       fu.lse[r] != fu.lse[r];
                bad += !row_ok(name, fu.lse[r], fu.ent[r], fu.maxw[r], fu.first[r], R, wf);
                badu += !row_ok(name, un.lse[r], un.ent[r], un.maxw[r], un.first[r], R, wu);
                F = stats_of_weights(w + r * c->Lk, c->Lk, un.lse[r]);   /* (b) the full weights */
                badfull += !row_ok(name, fu.lse[r], fu.ent[r], fu.maxw[r], fu.first[r], F, wfull);
                for (j = 0; j < c->Lk; ++j) {
                    double sc = tol_scale(R.lse);
                    double e = fabs(wrow_i[j] - p[j]) / sc, e2 = fabs(wrow_i[j] - w[r * c->Lk + j]) / sc;
                    if (!(e == e)) e = INFINITY;
                    if (!(e2 == e2)) e2 = INFINITY;
                    if (e > wrow) wrow = e;
                    if (e2 > wrow_full) wrow_full = e2;
                }
            }
    badrows = !(wrow <= TOL_W && wrow_full <= TOL_W);
    CHECK(!nan, "%s: a fused statistic is NaN", name);
    CHECK(bad == 0, "%s: %d fused rows off the float64 reference", name, bad);
    CHECK(badu == 0, "%s: %d unfused rows off the float64 reference", name, badu);
    CHECK(badfull == 0, "%s: %d fused rows off the full weights' statistics", name, badfull);
    CHECK(!badrows, "%s: recomputed rows off by %.3g (reference) / %.3g (full weights), over max(1, |lse|)",
          name, wrow, wrow_full);
    note_worst(wf); note_worst(wu); note_worst(wfull);
    if (wrow > worst_w) worst_w = wrow;
    if (wfull[2] > worst_full) worst_full = wfull[2];
    if (wrow_full > worst_full) worst_full = wrow_full;
    (void)t;
    sb_free(&fu); sb_free(&un); sb_free(&ro);
    free(out); free(out_f); free(w); free(wr); free(wr2); free(p); free(idx); prob_free(&P);
}

static cfg base(int B, int H, int Hkv, int Lq, int Lk, int D)
{
    cfg c;
    memset(&c, 0, sizeof c);
    c.B = B; c.H = H; c.Hkv = Hkv; c.Lq = Lq; c.Lk = Lk; c.D = D; c.left = c.right = -1;
    return c;
}

static void option_cases(void)
{
    static const int sizes[][2] = { { 1, 1 }, { 3, 7 }, { 7, 3 }, { 17, 17 }, { 130, 130 }, { 64, 128 }, { 1, 130 } };
    char name[128];
    int s, v;
    for (s = 0; s < (int)(sizeof sizes / sizeof sizes[0]); ++s) {
        int Lq = sizes[s][0], Lk = sizes[s][1];
        for (v = 0; v < 14; ++v) {
            /* two batches where that is cheap (qemu runs this too) */
            cfg c = base(Lq * Lk > 4000 ? 1 : 2, 4, v % 3 == 2 ? 2 : 4, Lq, Lk, v % 2 ? 16 : 7);
            const char *what = "";
            switch (v) {
            case 0: what = "plain"; break;
            case 1: what = "causal"; c.causal = 1; break;
            case 2: what = "causal bottom-right, GQA"; c.causal = 1; c.bottom_right = 1; break;
            case 3: what = "window 5 left, causal"; c.causal = 1; c.window = 1; c.left = 5; break;
            case 4: what = "window 2/3"; c.window = 1; c.left = 2; c.right = 3; c.bottom_right = 1; break;
            case 5: what = "softcap"; c.softcap = 1.5f; break;
            case 6: what = "ALiBi"; c.alibi = 1; c.causal = 1; break;
            case 7: what = "ALiBi own slopes, sinks"; c.alibi = 2; c.sinks = 1; break;
            case 8: what = "sinks, causal"; c.sinks = 1; c.causal = 1; break;
            case 9: what = "bool mask, bool kpm"; c.mask = 1; c.kpm = 1; break;
            case 10: what = "keep mask 3-d, blocked row"; c.mask = 2; c.block_row = 1; break;
            case 11: what = "float mask 4-d, float kpm, sinks"; c.mask = 3; c.kpm = 2; c.sinks = 1; break;
            case 12: what = "key 0 blocked, blocked row, sinks"; c.mask = 3; c.block_key0 = 1; c.block_row = 1; c.sinks = 1; break;
            case 13: what = "everything, 2 threads"; c.mask = 3; c.kpm = 2; c.causal = 1; c.bottom_right = 1;
                     c.window = 1; c.left = 9; c.softcap = 3.0f; c.alibi = 1; c.sinks = 1; c.threads = 2; break;
            }
            snprintf(name, sizeof name, "%s Lq %d Lk %d", what, Lq, Lk);
            check_case(name, &c, 1000u + 31u * (unsigned)s + (unsigned)v);
        }
    }
}

/* Fully blocked rows: lse -inf, entropy and weights 0, no NaN, on both
   paths; with a sink the row is all sink: entropy 0, lse = sink.  */
static void blocked_rows(void)
{
    cfg c = base(1, 2, 2, 3, 5, 4);
    prob P;
    statbuf s;
    float out[2 * 3 * 4], w[2 * 3 * 5], v[2 * 5 * 4] = { 0 };
    int pass, r;
    c.kpm = 1;
    prob_make(&P, &c, 5);
    memset(P.bkpm, 1, 5);                    /* every key padded */
    for (pass = 0; pass < 4; ++pass) {
        mha_options o = P.o;
        mha_run run;
        mha_error err;
        sb_make(&s, 6);
        run = sb_run(&s);
        run.weights = pass % 2 ? w : NULL;
        if (pass >= 2) o.sinks = P.sinks;     /* head 0 has a sink, head 1 none */
        CHECK(mha_sdpa_forward(1, 2, 3, 5, 4, 4, P.q, P.k, v, &o, out, &run, &err) == MHA_OK,
              "blocked rows: call %d: %s", pass, err.message);
        for (r = 0; r < 6; ++r) {
            int sunk = pass >= 2 && r < 3;
            CHECK(s.ent[r] == 0.0f && s.maxw[r] == 0.0f && s.first[r] == 0.0f,
                  "blocked rows pass %d row %d: entropy %g max %g first %g", pass, r, s.ent[r], s.maxw[r], s.first[r]);
            CHECK(sunk ? fabsf(s.lse[r] - P.sinks[0]) < 1e-6f : s.lse[r] == -INFINITY,
                  "blocked rows pass %d row %d: lse %g", pass, r, s.lse[r]);
        }
        sb_free(&s);
    }
    prob_free(&P);
}

/* Split-K decoding (Lq = 1, Lk past 2048 keys: the parts are merged) and
   GQA decode with the group as columns.  */
static void split_k(void)
{
    cfg c = base(1, 4, 1, 1, 4500, 16);
    check_case("split-K decode, MQA", &c, 42);
    c.sinks = 1; c.alibi = 1; c.causal = 1; c.bottom_right = 1;
    check_case("split-K decode, sinks, ALiBi", &c, 43);
    c = base(2, 2, 2, 1, 2049 + 128 * 16, 8);
    c.window = 1; c.left = 3000; c.bottom_right = 1; c.kpm = 2; c.block_key0 = 1; c.threads = 2;
    check_case("split-K decode, window, kpm, key 0 blocked", &c, 44);
}

/* Plans: a run given the statistics' buffers writes them, on a plan made
   for longer lengths and on a training plan (with and without a saved
   forward), and they equal the one-shot call's bit for bit; a run of the
   same plan without them is not changed by them (the output's bits). */
static void plans(void)
{
    cfg c = base(2, 3, 3, 33, 70, 8);
    prob P;
    statbuf a, s;
    mha_plan *pl = NULL;
    mha_run run;
    mha_error err;
    mha_sizes sz = { 0, 0, 0 };
    size_t n = 2 * 3 * 33;
    float *v = calloc((size_t)2 * 3 * 70 * 8, sizeof(float)), *out = malloc(n * 8 * sizeof(float));
    float *out2 = malloc(n * 8 * sizeof(float));
    unsigned flags;
    c.causal = 1; c.sinks = 1;
    prob_make(&P, &c, 9);
    { tu_rng r = { 99 }; tu_fill(&r, v, (size_t)2 * 3 * 70 * 8, 1.0f); }
    sb_make(&a, n);
    run = sb_run(&a);
    CHECK(mha_sdpa_forward(2, 3, 33, 70, 8, 8, P.q, P.k, v, &P.o, out, &run, &err) == MHA_OK, "plans: one-shot: %s",
          err.message);
    for (flags = 0; flags < 4; ++flags) {   /* 0, WEIGHTS, ROWS, TRAINING (saving) */
        unsigned f = flags == 0 ? 0u : flags == 1 ? MHA_PLAN_WEIGHTS : flags == 2 ? MHA_PLAN_ROWS : MHA_PLAN_TRAINING;
        void *saved = NULL;
        sb_make(&s, n);
        CHECK(mha_sdpa_plan(2, 3, 40, 80, 8, 8, &P.o, f, NULL, 0, &pl, &err) == MHA_OK &&
              mha_plan_sizes(pl, &sz, &err) == MHA_OK, "plans: plan: %s", err.message);
        if (!pl) { sb_free(&s); continue; }
        run = sb_run(&s);
        if (f == MHA_PLAN_TRAINING) { saved = malloc(sz.saved); run.saved = saved; run.saved_bytes = sz.saved; }
        CHECK(mha_sdpa_run_forward(pl, 33, 70, P.q, P.k, v, out2, &run, &err) == MHA_OK, "plans: run: %s",
              err.message);
        CHECK(sb_same(&a, &s, n), "plans: the run's statistics differ from the one-shot call's (flags %u)", f);
        CHECK(memcmp(out, out2, n * 8 * sizeof(float)) == 0, "plans: the run's output != the one-shot's (flags %u)", f);
        run = no_run();
        CHECK(mha_sdpa_run_forward(pl, 33, 70, P.q, P.k, v, out2, &run, &err) == MHA_OK &&
              memcmp(out, out2, n * 8 * sizeof(float)) == 0, "plans: without statistics, other bits (flags %u)", f);
        mha_plan_destroy(pl);
        pl = NULL;
        free(saved);
        sb_free(&s);
    }
    sb_free(&a); free(v); free(out); free(out2); prob_free(&P);
}

/* The module: mha_module_forward's statistics against its per-head weights. */
static void module(void)
{
    enum { B = 2, L = 19, E = 24, H = 3 };
    float *x = malloc(B * L * E * sizeof(float)), *win = malloc(3 * E * E * sizeof(float));
    float *wout = malloc(E * E * sizeof(float)), *out = malloc(B * L * E * sizeof(float));
    float *w = malloc(B * H * L * L * sizeof(float));
    tu_rng r = { 3 };
    mha_module m;
    mha_options o;
    statbuf s;
    mha_run run;
    mha_error err;
    int t, bad = 0;
    double worst[3] = { 0, 0, 0 };
    tu_fill(&r, x, B * L * E, 1.0f); tu_fill(&r, win, 3 * E * E, 0.4f); tu_fill(&r, wout, E * E, 0.3f);
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H; m.in_proj_weight = win; m.out_proj_weight = wout;
    memset(&o, 0, sizeof o);
    o.causal = 1; o.per_head_weights = 1;
    sb_make(&s, B * H * L);
    run = sb_run(&s);
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, &o, out, &run, &err) == MHA_OK, "module: fused forward: %s",
          err.message);
    run = no_run();
    run.weights = w;
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, &o, out, &run, &err) == MHA_OK,
          "module: forward with weights: %s", err.message);
    for (t = 0; t < B * H * L; ++t)
        bad += !row_ok("module", s.lse[t], s.ent[t], s.maxw[t], s.first[t],
                       stats_of_weights(w + (size_t)t * L, L, s.lse[t]), worst);
    CHECK(bad == 0, "module: %d rows off the full weights' statistics", bad);
    if (worst[2] > worst_full) worst_full = worst[2];
    sb_free(&s); free(x); free(win); free(wout); free(out); free(w);
}

/* The module's rows (a forward with run.weights, run.rows, run.n_rows):
   GQA, bias_k, add_zero_attn, RoPE, bottom-right causal, a position
   offset; per head and head-averaged, on a MHA_PLAN_ROWS plan and on a
   MHA_PLAN_WEIGHTS plan, against the full weights of a forward; the rows
   leave the fused output's bits alone; a plan's run and the one-shot call
   give the same rows; a bad row and a workspace one byte
   short of the plan's sizes.workspace (the least a run takes, found by
   bisection: a caller's workspace holds the plan's bytes, whatever the
   run) are refused by name and write nothing.  */
static void module_rows(void)
{
    enum { B = 2, LQ = 9, LK = 13, E = 24, H = 4, HKV = 2, D = E / H, EKV = HKV * D, LKE = LK + 2, NR = 3 };
    float *x = malloc(B * LK * E * sizeof(float)), *win = malloc((E + 2 * EKV) * E * sizeof(float));
    float *bin = malloc((E + 2 * EKV) * sizeof(float)), *bk = malloc(EKV * sizeof(float));
    float *bv = malloc(EKV * sizeof(float)), *wout = malloc(E * E * sizeof(float));
    float *out = malloc(B * LQ * E * sizeof(float)), *out_f = malloc(B * LQ * E * sizeof(float));
    float *w = malloc(B * H * LQ * LKE * sizeof(float));
    float *wr = malloc(B * H * NR * LKE * sizeof(float)), *wr1 = malloc(B * H * NR * LKE * sizeof(float));
    int rows[NR] = { LQ - 1, 0, 4 }, bad_rows[2] = { 1, LQ }, b, h, i, j, per_head;
    tu_rng r = { 21 };
    mha_module m;
    mha_options o;
    mha_run run;
    mha_error err;
    const float *q = x + (LK - LQ) * E;   /* the queries are the last LQ rows of x, bottom-right aligned */
    tu_fill(&r, x, B * LK * E, 1.0f); tu_fill(&r, win, (E + 2 * EKV) * E, 0.5f);
    tu_fill(&r, bin, E + 2 * EKV, 0.2f); tu_fill(&r, bk, EKV, 0.5f); tu_fill(&r, bv, EKV, 0.5f);
    tu_fill(&r, wout, E * E, 0.3f);
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H; m.num_kv_heads = HKV; m.in_proj_weight = win; m.in_proj_bias = bin;
    m.out_proj_weight = wout; m.bias_k = bk; m.bias_v = bv; m.add_zero_attn = 1;
    m.rope.kind = MHA_ROPE_HALF;
    memset(&o, 0, sizeof o);
    o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT; o.position_offset = 3;
    for (per_head = 3; per_head >= 0; --per_head) {   /* 3, 2: per head; 1, 0: head average */
        unsigned pf = per_head % 2 ? MHA_PLAN_ROWS : MHA_PLAN_WEIGHTS;   /* the plan's flag for rows */
        int nh = per_head >= 2 ? H : 1;   /* weights [B, nh, rows, LKE] */
        size_t nwr = (size_t)B * nh * NR * LKE, t, lo, hi;
        double worst = 0;
        int clean = 1;
        mha_plan *p = NULL;
        mha_sizes sz;
        void *ws;
        const char *how = per_head == 3 ? "per head, ROWS plan" : per_head == 2 ? "per head, WEIGHTS plan" :
                          per_head == 1 ? "head average, ROWS plan" : "head average, WEIGHTS plan";
        o.per_head_weights = per_head >= 2;
        run = no_run();
        CHECK(mha_module_forward(&m, B, LQ, LK, q, x, x, &o, out_f, &run, &err) == MHA_OK,
              "module rows (%s): fused forward: %s", how, err.message);
        run.weights = w;
        CHECK(mha_module_forward(&m, B, LQ, LK, q, x, x, &o, out, &run, &err) == MHA_OK,
              "module rows (%s): forward with weights: %s", how, err.message);
        CHECK(mha_module_plan(&m, B, LQ, LK, &o, pf, NULL, 0, &p, &err) == MHA_OK &&
              mha_plan_sizes(p, &sz, &err) == MHA_OK, "module rows: plan: %s", err.message);
        if (!p) continue;
        ws = malloc(sz.workspace);
        run = no_run();
        run.weights = wr; run.rows = bad_rows; run.n_rows = 2; run.workspace = ws; run.workspace_bytes = sz.workspace;
        for (t = 0; t < nwr; ++t) wr[t] = 7.0f;
        for (t = 0; t < (size_t)B * LQ * E; ++t) out[t] = 7.0f;
        CHECK(mha_module_run_forward(p, LQ, LK, q, x, x, out, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
              !strcmp(err.field, "run->rows"), "module rows: row Lq: %s", err.message);
        /* the least workspace this run takes (bisection): the plan's size */
        run.rows = rows; run.n_rows = NR;
        lo = 0; hi = sz.workspace;
        CHECK(mha_module_run_forward(p, LQ, LK, q, x, x, out, &run, &err) == MHA_OK,
              "module rows: the plan's workspace size does not do: %s", err.message);
        while (hi - lo > 1) {
            size_t mid = lo + (hi - lo) / 2;
            run.workspace_bytes = mid;
            if (mha_module_run_forward(p, LQ, LK, q, x, x, out, &run, &err) == MHA_OK) hi = mid; else lo = mid;
        }
        CHECK(hi == sz.workspace, "module rows: a workspace of %lu bytes was taken; the plan's is %lu",
              (unsigned long)hi, (unsigned long)sz.workspace);
        for (t = 0; t < nwr; ++t) wr[t] = 7.0f;
        for (t = 0; t < (size_t)B * LQ * E; ++t) out[t] = 7.0f;
        run.workspace_bytes = hi - 1;
        CHECK(mha_module_run_forward(p, LQ, LK, q, x, x, out, &run, &err) == MHA_ERR_WORKSPACE_TOO_SMALL &&
              !strcmp(err.field, "run->workspace_bytes"), "module rows: workspace one byte short: %s", err.message);
        for (t = 0; t < nwr; ++t) clean &= wr[t] == 7.0f;
        for (t = 0; t < (size_t)B * LQ * E; ++t) clean &= out[t] == 7.0f;
        CHECK(clean, "module rows wrote on error");
        run.workspace_bytes = hi;
        CHECK(mha_module_run_forward(p, LQ, LK, q, x, x, out, &run, &err) == MHA_OK, "module rows: run: %s",
              err.message);
        CHECK(memcmp(out, out_f, (size_t)B * LQ * E * sizeof(float)) == 0,
              "module rows (%s): the output of a forward with rows != the fused forward's", how);
        for (b = 0; b < B; ++b)
            for (h = 0; h < nh; ++h)
                for (i = 0; i < NR; ++i)
                    for (j = 0; j < LKE; ++j) {
                        double e = fabs(wr[(((size_t)b * nh + h) * NR + i) * LKE + j] -
                                        w[(((size_t)b * nh + h) * LQ + rows[i]) * LKE + j]);
                        if (!(e <= worst)) worst = e;
                    }
        CHECK(worst <= TOL_W, "module rows (%s): off the forward's weights by %.3g", how, worst);
        if (worst > worst_full) worst_full = worst;
        /* the one-shot call with the same rows: the plan's bits */
        run = no_run();
        run.weights = wr1; run.rows = rows; run.n_rows = NR;
        CHECK(mha_module_forward(&m, B, LQ, LK, q, x, x, &o, out, &run, &err) == MHA_OK &&
              memcmp(wr1, wr, nwr * sizeof(float)) == 0, "module rows (%s): one-shot != plan run: %s", how,
              err.message);
        mha_plan_destroy(p);
        free(ws);
    }
    free(x); free(win); free(bin); free(bk); free(bv); free(wout); free(out); free(out_f); free(w);
    free(wr); free(wr1);
}

/* The module with its KV cache: a prefill of L - 1 tokens, then one decode
   step that writes the statistics, by the one-shot call and by a decoding
   plan (MHA_PLAN_PACK | MHA_PLAN_CACHE, Lk = capacity) on a copy of the
   cache: the same bits, and each head's statistics against the last row of
   the full causal forward's per-head weights.  */
static void module_cached(void)
{
    enum { L = 23, E = 24, H = 4, HKV = 2, D = E / H, EKV = HKV * D };
    float *x = malloc(L * E * sizeof(float)), *win = malloc((E + 2 * EKV) * E * sizeof(float));
    float *wout = malloc(E * E * sizeof(float)), *out = malloc(L * E * sizeof(float));
    float *out2 = malloc(E * sizeof(float));
    float *w = malloc(H * L * L * sizeof(float)), *kc = calloc(HKV * L * D, sizeof(float));
    float *vc = calloc(HKV * L * D, sizeof(float)), *kc2 = malloc(HKV * L * D * sizeof(float));
    float *vc2 = malloc(HKV * L * D * sizeof(float));
    tu_rng r = { 5 };
    mha_module m;
    mha_kv_cache c, c2;
    mha_options o;
    mha_run run;
    mha_error err;
    mha_plan *p = NULL;
    statbuf s, s2;
    int len = 0, len2, h, bad = 0;
    tu_fill(&r, x, L * E, 1.0f); tu_fill(&r, win, (E + 2 * EKV) * E, 0.5f); tu_fill(&r, wout, E * E, 0.3f);
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H; m.num_kv_heads = HKV; m.in_proj_weight = win; m.out_proj_weight = wout;
    memset(&c, 0, sizeof c);
    c.B = 1; c.Hkv = HKV; c.D = D; c.capacity = L; c.k = kc; c.v = vc; c.len = &len;
    memset(&o, 0, sizeof o);
    o.causal = 1; o.per_head_weights = 1;
    run = no_run();
    run.weights = w;
    CHECK(mha_module_forward(&m, 1, L, L, x, x, x, &o, out, &run, &err) == MHA_OK, "module cached: full forward: %s",
          err.message);
    run = no_run();
    run.cache = &c;
    CHECK(mha_module_forward(&m, 1, L - 1, 0, x, NULL, NULL, &o, out, &run, &err) == MHA_OK,
          "module cached: prefill: %s", err.message);
    c2 = c; c2.k = kc2; c2.v = vc2; c2.len = &len2;
    memcpy(kc2, kc, HKV * L * D * sizeof(float)); memcpy(vc2, vc, HKV * L * D * sizeof(float)); len2 = len;
    sb_make(&s, H); sb_make(&s2, H);
    run = sb_run(&s);
    run.cache = &c;
    CHECK(mha_module_forward(&m, 1, 1, 0, x + (size_t)(L - 1) * E, NULL, NULL, &o, out, &run, &err) == MHA_OK,
          "module cached: decode step: %s", err.message);
    CHECK(mha_module_plan(&m, 1, 1, L, &o, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &p, &err) == MHA_OK,
          "module cached: plan: %s", err.message);
    run = sb_run(&s2);
    run.cache = &c2;
    CHECK(p && mha_module_run_forward(p, 1, 0, x + (size_t)(L - 1) * E, NULL, NULL, out2, &run, &err) == MHA_OK,
          "module cached: the plan's decode step: %s", err.message);
    CHECK(sb_same(&s, &s2, H) && memcmp(out, out2, E * sizeof(float)) == 0,
          "module cached: the decoding plan's statistics or output != the one-shot's");
    for (h = 0; h < H; ++h)
        bad += !row_ok("module cached", s.lse[h], s.ent[h], s.maxw[h], s.first[h],
                       stats_of_weights(w + ((size_t)h * L + L - 1) * L, L, s.lse[h]), NULL);
    CHECK(bad == 0, "module cached: %d heads' decode statistics off the full forward's weights", bad);
    mha_plan_destroy(p);
    sb_free(&s); sb_free(&s2);
    free(x); free(win); free(wout); free(out); free(out2); free(w); free(kc); free(vc); free(kc2); free(vc2);
}

/* The KV cache: statistics of a rolling cache that has wrapped (n_keep 0
   and 3, sinks) against the float64 reference over the tokens it holds;
   key 0 is position 0, so a cache that overwrote it has first weight 0.
   (mha_sdpa_forward with run.cache: k = v = NULL, Lk 0.)  */
static void kv_cache(void)
{
    enum { H = 4, Hkv = 2, D = 8, CAP = 24, T = 61, LQ = 3 };
    int keep, step, i, h, j;
    for (keep = 0; keep <= 3; keep += 3) {
        for (step = 0; step < 2; ++step) {
            float *kc = calloc((size_t)Hkv * CAP * D, sizeof(float)), *vc = calloc((size_t)Hkv * CAP * D, sizeof(float));
            float *kall = malloc((size_t)Hkv * T * D * sizeof(float)), *q = malloc((size_t)H * LQ * D * sizeof(float));
            float *out = malloc((size_t)H * LQ * D * sizeof(float)), sinks[H] = { 0.5f, -INFINITY, -1.0f, 2.0f };
            int len = 0, held[CAP], nh = 0, bad = 0;
            mha_kv_cache c;
            mha_options o;
            mha_run run;
            mha_error err;
            statbuf s;
            tu_rng r = { 11u + (unsigned)keep };
            double worst[3] = { 0, 0, 0 };
            tu_fill(&r, kall, (size_t)Hkv * T * D, 1.5f); tu_fill(&r, q, (size_t)H * LQ * D, 1.5f);
            memset(&c, 0, sizeof c);
            c.B = 1; c.Hkv = Hkv; c.D = D; c.capacity = CAP; c.k = kc; c.v = vc; c.len = &len;
            c.ring = 1; c.n_keep = keep;
            for (i = 0; i < T; ++i) {   /* one token at a time */
                float kn[Hkv * D];
                for (h = 0; h < Hkv; ++h) memcpy(kn + h * D, kall + ((size_t)h * T + i) * D, D * sizeof(float));
                CHECK(mha_kv_cache_append(&c, 1, kn, kn, &err) == MHA_OK, "kv cache: append: %s", err.message);
            }
            memset(&o, 0, sizeof o);
            o.causal = 1; o.sinks = step ? sinks : NULL;
            sb_make(&s, H * LQ);
            run = sb_run(&s);
            run.cache = &c;
            CHECK(mha_sdpa_forward(1, H, LQ, 0, D, D, q, NULL, NULL, &o, out, &run, &err) == MHA_OK,
                  "kv cache: attend: %s", err.message);
            /* held positions, in order: 0..keep-1 and T-(CAP-keep)..T-1 */
            for (i = 0; i < keep; ++i) held[nh++] = i;
            for (i = T - (CAP - keep); i < T; ++i) held[nh++] = i;
            {
                cfg cc = base(1, H, Hkv, LQ, nh, D);
                float *kd = malloc((size_t)Hkv * nh * D * sizeof(float));
                double p[CAP];
                mha_options od = o;
                od.num_kv_heads = Hkv; od.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
                for (h = 0; h < Hkv; ++h)
                    for (j = 0; j < nh; ++j)
                        memcpy(kd + ((size_t)h * nh + j) * D, kall + ((size_t)h * T + held[j]) * D, D * sizeof(float));
                for (h = 0; h < H; ++h)
                    for (i = 0; i < LQ; ++i) {
                        refrow R = ref_row(&cc, &od, q, kd, 0, h, i, p);
                        if (keep == 0) R.first = 0;   /* position 0 was overwritten */
                        bad += !row_ok("kv cache", s.lse[h * LQ + i], s.ent[h * LQ + i], s.maxw[h * LQ + i],
                                       s.first[h * LQ + i], R, worst);
                    }
                free(kd);
            }
            CHECK(bad == 0, "kv cache n_keep %d sinks %d: %d rows off the reference", keep, step, bad);
            note_worst(worst);
            sb_free(&s); free(kc); free(vc); free(kall); free(q); free(out);
        }
    }
}

/* Bad row lists: a documented status naming the field, and nothing written. */
static void bad_rows(void)
{
    float q[2 * 3 * 4] = { 0 }, k[2 * 5 * 4] = { 0 }, v[2 * 5 * 4] = { 0 }, w[2 * 2 * 5], out[2 * 3 * 4];
    float dq[2 * 3 * 4] = { 0 };
    int rows_bad[2] = { 0, 3 }, rows_neg[1] = { -1 }, rows_ok[2] = { 2, 0 }, t, clean = 1;
    mha_run run;
    mha_error err;
    mha_plan *p = NULL;
    const struct { int Lq, n; const int *rows; int weights; mha_status want; const char *field, *what; } cases[] = {
        { 3, 2, rows_bad, 1, MHA_ERR_INVALID_ARGUMENT, "run->rows", "row Lq" },
        { 3, 1, rows_neg, 1, MHA_ERR_INVALID_ARGUMENT, "run->rows", "row -1" },
        { 3, 0, rows_ok, 1, MHA_ERR_INVALID_SIZE, "run->n_rows", "no rows" },
        { 3, -1, NULL, 1, MHA_ERR_INVALID_SIZE, "run->n_rows", "n_rows -1" },
        { 3, 2, NULL, 1, MHA_ERR_NULL_POINTER, "run->rows", "rows NULL" },
        { 3, 2, rows_ok, 0, MHA_ERR_NULL_POINTER, "run->weights", "weights NULL" },
        { 0, 2, rows_ok, 1, MHA_ERR_INVALID_SIZE, "Lq", "Lq 0" },
    };
    for (t = 0; t < 20; ++t) w[t] = 7.0f;
    for (t = 0; t < 24; ++t) out[t] = 7.0f;
    for (t = 0; t < (int)(sizeof cases / sizeof cases[0]); ++t) {
        run = no_run();
        run.rows = cases[t].rows; run.n_rows = cases[t].n; run.weights = cases[t].weights ? w : NULL;
        CHECK(mha_sdpa_forward(1, 2, cases[t].Lq, 5, 4, 4, q, k, v, NULL, out, &run, &err) == cases[t].want &&
              err.status == cases[t].want && err.field && !strcmp(err.field, cases[t].field),
              "rows: %s: want field %s: %s", cases[t].what, cases[t].field, err.message);
    }
    run = no_run();
    run.rows = rows_ok; run.n_rows = 2; run.weights = w;
    {
        mha_options o;
        memset(&o, 0, sizeof o);
        o.num_kv_heads = 3;
        CHECK(mha_sdpa_forward(1, 2, 3, 5, 4, 4, q, k, v, &o, out, &run, &err) == MHA_ERR_HEADS_DIVIDE &&
              !strcmp(err.field, "opt->num_kv_heads"), "rows: Hkv does not divide H: %s", err.message);
    }
    CHECK(mha_sdpa_plan(1, 2, 3, 5, 4, 4, NULL, 0, NULL, 0, &p, &err) == MHA_OK, "plan: %s", err.message);
    CHECK(p && mha_sdpa_run_forward(p, 3, 5, q, k, v, out, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
          !strcmp(err.field, "run->rows"), "rows on a plan without MHA_PLAN_ROWS or _WEIGHTS: %s", err.message);
    mha_plan_destroy(p);
    p = NULL;
    CHECK(mha_sdpa_plan(1, 2, 3, 5, 4, 4, NULL, MHA_PLAN_ROWS, NULL, 0, &p, &err) == MHA_OK, "rows plan: %s",
          err.message);
    run.rows = NULL; run.n_rows = 0;   /* whole weights */
    CHECK(p && mha_sdpa_run_forward(p, 3, 5, q, k, v, out, &run, &err) == MHA_ERR_EXCEEDS_PLAN &&
          !strcmp(err.field, "run->weights"), "whole weights on a MHA_PLAN_ROWS plan: %s", err.message);
    mha_plan_destroy(p);
    run.rows = rows_ok; run.n_rows = 2;
    /* the rows are recomputed from q and k after the forward: out must not be q */
    CHECK(mha_sdpa_forward(1, 2, 3, 5, 4, 4, q, k, v, NULL, q, &run, &err) == MHA_ERR_INVALID_ARGUMENT &&
          !strcmp(err.field, "run->rows"), "rows with out == q: %s", err.message);
    CHECK(mha_sdpa_backward(1, 2, 3, 5, 4, 4, q, k, v, q, NULL, dq, NULL, NULL, &run, &err) ==
          MHA_ERR_INVALID_ARGUMENT && !strcmp(err.field, "run->weights"), "rows in a backward: %s", err.message);
    for (t = 0; t < 20; ++t) clean &= w[t] == 7.0f;
    for (t = 0; t < 24; ++t) clean &= out[t] == 7.0f && dq[t] == 0.0f && q[t] == 0.0f;
    CHECK(clean, "a refused rows call wrote its output");
    CHECK(mha_sdpa_forward(1, 2, 3, 5, 4, 4, q, k, v, NULL, out, &run, &err) == MHA_OK, "rows: ok: %s", err.message);
    for (t = 0; t < 20; ++t) clean &= fabsf(w[t] - 0.2f) < 1e-7f;
    CHECK(clean, "rows: zero scores over 5 keys give weights 1/5, got %g", w[0]);
}

/* The long case: L keys, every query row's statistics of one head (and a
   GQA pair) from the fused path, the last 64 rows recomputed in the same
   forward (run.rows); a float64 reference for 96 rows (the last 64 and 32
   spread over the rest).  */
static void long_rows(int L)
{
    enum { H = 2, D = 16, NR = 64 };
    float *q = malloc((size_t)H * L * D * sizeof(float)), *k = malloc((size_t)L * D * sizeof(float));
    float *v = malloc((size_t)L * D * sizeof(float)), *out = malloc((size_t)H * L * D * sizeof(float));
    float *wr = malloc((size_t)H * NR * L * sizeof(float));
    double *p = malloc((size_t)L * sizeof(double)), worst[3] = { 0, 0, 0 }, wworst[3] = { 0, 0, 0 }, ew = 0;
    int rows[NR], h, i, j, bad = 0, badw = 0;
    statbuf s;
    mha_options o;
    mha_run run;
    mha_error err;
    tu_rng r = { 16384 };
    cfg c = base(1, H, 1, L, L, D);
    c.causal = 1; c.sinks = 1;
    tu_fill(&r, q, (size_t)H * L * D, 2.0f); tu_fill(&r, k, (size_t)L * D, 2.0f); tu_fill(&r, v, (size_t)L * D, 1.0f);
    for (j = 0; j < D; ++j) k[j] = 3.0f * q[j];         /* key 0 a strong sink for some rows */
    memset(&o, 0, sizeof o);
    o.causal = 1; o.num_kv_heads = 1;
    {
        float sk[H] = { 1.0f, -INFINITY };
        o.sinks = sk;
        sb_make(&s, (size_t)H * L);
        for (i = 0; i < NR; ++i) rows[i] = L - NR + i;
        {   /* a plan for chosen rows sizes the fused path, the lse and a row, not whole matrices */
            mha_sizes zr, zw;
            CHECK(mha_sdpa_plan_size(1, H, L, L, D, D, &o, MHA_PLAN_ROWS, &zr, &err) == MHA_OK &&
                  mha_sdpa_plan_size(1, H, L, L, D, D, &o, MHA_PLAN_WEIGHTS, &zw, &err) == MHA_OK &&
                  zr.workspace * 4 <= zw.workspace, "long: a MHA_PLAN_ROWS workspace of %lu bytes, "
                  "MHA_PLAN_WEIGHTS %lu: %s", (unsigned long)zr.workspace, (unsigned long)zw.workspace, err.message);
            printf("L = %d: workspace of a plan for rows %.1f MiB, for whole weights %.1f MiB\n", L,
                   zr.workspace / 1048576.0, zw.workspace / 1048576.0);
        }
        run = sb_run(&s);
        run.weights = wr; run.rows = rows; run.n_rows = NR;
        CHECK(mha_sdpa_forward(1, H, L, L, D, D, q, k, v, &o, out, &run, &err) == MHA_OK,
              "long: fused sdpa L %d with rows: %s", L, err.message);
        for (h = 0; h < H; ++h)
            for (i = 0; i < NR + 32; ++i) {
                int row = i < NR ? rows[i] : (int)((long)(i - NR) * (L - NR) / 32);
                refrow R = ref_row(&c, &o, q, k, 0, h, row, p);
                size_t t = (size_t)h * L + row;
                bad += !row_tol("long", s.lse[t], s.ent[t], s.maxw[t], s.first[t], R, worst, TOL_W, TOL_H_LONG64);
                for (j = 0; i < NR && j < L; ++j) {
                    double e = fabs(wr[((size_t)h * NR + i) * L + j] - p[j]);
                    if (!(e <= ew)) ew = e;
                }
                if (i < NR)   /* the statistics of the recomputed float32 rows */
                    badw += !row_tol("long vs rows", s.lse[t], s.ent[t], s.maxw[t], s.first[t],
                                     stats_of_weights(wr + ((size_t)h * NR + i) * L, L, s.lse[t]), wworst,
                                     TOL_W * tol_scale(s.lse[t]), TOL_H * tol_scale(s.lse[t]));
            }
        o.sinks = NULL;
    }
    CHECK(bad == 0, "long L %d: %d rows off the float64 reference", L, bad);
    CHECK(badw == 0, "long L %d: %d rows' statistics off those of the recomputed rows", L, badw);
    CHECK(ew <= TOL_W, "long L %d: recomputed rows off by %.3g", L, ew);
    printf("worst at L = %d vs float64: lse %.3g (rel), entropy %.3g, weights %.3g (abs); "
           "vs the recomputed rows: entropy %.3g, weights %.3g\n", L, worst[0], worst[1],
           worst[2] > ew ? worst[2] : ew, wworst[1], wworst[2]);
    note_worst(worst);
    if (ew > worst_w) worst_w = ew;
    sb_free(&s); free(q); free(k); free(v); free(out); free(wr); free(p);
}

int main(void)
{
    const char *quick = getenv("STATS_QUICK");
    int L = STATS_SLOW || (quick && *quick && *quick != '0') ? 2048 : 16384;
    option_cases();
    blocked_rows();
    split_k();
    plans();
    module();
    kv_cache();
    module_cached();
    module_rows();
    bad_rows();
    long_rows(L);
    printf("worst vs float64: lse %.3g (rel), entropy %.3g, weights %.3g (abs); fused vs full weights %.3g\n",
           worst_lse, worst_h, worst_w, worst_full);
    return tu_finish("stats");
}
