/* The fused attention backward (FlashAttention-2: P recomputed tile by tile
   from the log-sum-exp, no Lq x Lk buffer) against the head-by-head
   backward it replaced (mha__attend_head_backward, kept as the readable
   definition: P and dP of a whole head in memory): odd sizes, several
   query and key tiles, bool and float masks, fully blocked rows, causal in
   both alignments, sliding windows, softcap, ALiBi, sinks (their gradient
   too), GQA/MQA.  Threads 1-3 must give the same bits.  A NaN in the key
   and value rows of a blocked key must not reach any gradient. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5

typedef struct bcase {
    int B, H, Hkv, Lq, Lk, D, Dv;
    int causal, bottom_right, window, left, right;
    float softcap;
    int alibi, sinks, kpm, mask;   /* kpm: float [B, Lk] with -inf; mask: bool [Lq, Lk] */
} bcase;

static double worst;

/* the old backward, head by head, with its Lq x Lk buffers */
static void old_backward(const bcase *c, const mha_options *o, const float *q, const float *k,
                         const float *v, const float *dout, float *dq, float *dk, float *dv)
{
    mha__attn a;
    size_t n = (size_t)c->Lq * c->Lk;
    float *p = malloc(n * 4), *dp = malloc(n * 4), *cap = malloc(n * 4), *ps = malloc((size_t)c->Lq * 4);
    float *g = malloc((mha__head_backward_gws(c->Lq, c->Lk, c->D, c->Dv) + 16) * 4);
    int b, h;
    mha__attn_dense(&a, o, c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, k, v, NULL);
    for (b = 0; b < c->B; ++b)
        for (h = 0; h < c->H; ++h)
            mha__attend_head_backward(&a, b, h, dout, dq, dk, dv, p, dp, cap, ps, mha__align_ws(g));
    free(p); free(dp); free(cap); free(ps); free(g);
}

static void run_case(const bcase *c, unsigned long long seed, int nan_keys)
{
    tu_rng r = { seed };
    size_t nq = (size_t)c->B * c->H * c->Lq * c->D, nk = (size_t)c->B * c->Hkv * c->Lk * c->D;
    size_t nv = (size_t)c->B * c->Hkv * c->Lk * c->Dv, no = (size_t)c->B * c->H * c->Lq * c->Dv;
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nv * 4), *dout = malloc(no * 4);
    float *dq0 = calloc(nq, 4), *dk0 = calloc(nk, 4), *dv0 = calloc(nv, 4);
    float *dq1 = malloc(nq * 4), *dk1 = malloc(nk * 4), *dv1 = malloc(nv * 4);
    float *dqt = malloc(nq * 4), *dkt = malloc(nk * 4), *dvt = malloc(nv * 4);
    float *kpm = malloc((size_t)c->B * c->Lk * 4), *sinks = malloc((size_t)c->H * 4);
    float *sg0 = calloc((size_t)c->H, 4), *sg1 = malloc((size_t)c->H * 4), *sgt = malloc((size_t)c->H * 4);
    unsigned char *mask = malloc((size_t)c->Lq * c->Lk);
    mha_options o;
    char d[160];
    int t, i, j, hh;
    double e;
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
    o.sinks_grad = sg0;
    old_backward(c, &o, q, k, v, dout, dq0, dk0, dv0);
    if (nan_keys) {   /* the old backward ran on finite keys; now poison the blocked ones */
        for (i = 0; i < c->B; ++i)
            for (j = 0; j < c->Lk; ++j)
                if (kpm[(size_t)i * c->Lk + j] == -INFINITY)
                    for (hh = 0; hh < c->Hkv; ++hh) {
                        size_t row = ((size_t)i * c->Hkv + hh) * c->Lk + j;
                        for (t = 0; t < c->D; ++t) k[row * c->D + t] = NAN;
                        for (t = 0; t < c->Dv; ++t) v[row * c->Dv + t] = NAN;
                    }
    }
    for (t = 1; t <= 3; ++t) {
        float *gq = t == 1 ? dq1 : dqt, *gk = t == 1 ? dk1 : dkt, *gv = t == 1 ? dv1 : dvt;
        float *sg = t == 1 ? sg1 : sgt;
        memset(gq, 0, nq * 4); memset(gk, 0, nk * 4); memset(gv, 0, nv * 4); memset(sg, 0, (size_t)c->H * 4);
        o.num_threads = t; o.sinks_grad = sg;
        CHECK(mha_sdpa_backward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, k, v, dout, &o, gq, gk, gv,
                                NULL, 0) == MHA_OK, "%s: status", d);
        if (t == 1) {
            e = tu_rel_err_ff(dq1, dq0, nq); if (e > worst) worst = e;
            CHECK(e <= TOL, "%s: dq vs old %.3g", d, e);
            e = tu_rel_err_ff(dk1, dk0, nk); if (e > worst) worst = e;
            CHECK(e <= TOL, "%s: dk vs old %.3g", d, e);
            e = tu_rel_err_ff(dv1, dv0, nv); if (e > worst) worst = e;
            CHECK(e <= TOL, "%s: dv vs old %.3g", d, e);
            if (c->sinks) {
                e = tu_rel_err_ff(sg1, sg0, (size_t)c->H); if (e > worst) worst = e;
                CHECK(e <= TOL, "%s: sink gradient vs old %.3g", d, e);
            }
        } else {
            CHECK(memcmp(dqt, dq1, nq * 4) == 0 && memcmp(dkt, dk1, nk * 4) == 0 &&
                  memcmp(dvt, dv1, nv * 4) == 0 && memcmp(sgt, sg1, (size_t)c->H * 4) == 0,
                  "%s: %d threads differ from 1", d, t);
        }
    }
    free(q); free(k); free(v); free(dout); free(dq0); free(dk0); free(dv0); free(dq1); free(dk1); free(dv1);
    free(dqt); free(dkt); free(dvt); free(kpm); free(sinks); free(sg0); free(sg1); free(sgt); free(mask);
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
    printf("worst fused vs head-by-head backward rel err %.3g (tolerance %g)\n", worst, TOL);
    return tu_finish("fused_backward");
}
