/* The narrow path: decoding steps (at most 8 query columns per KV head: Lq
   times the heads of a group) against K and V where they lie, for every
   column count 1..8, float32 / F16 / BF16 storage, head sizes with and
   without a ragged vector tail (1, 3, 7, 17, 130) and the sizes whose rows
   take the whole-row value pass (8 vectors: 8, 32, 64 and 128 across the
   tiers), key counts around the 16-key blocks and the 128-key tiles, and
   past the split into key parts (2048); with the options a decoder uses
   (bottom-right causal, windows, soft-capping, sinks, ALiBi, masks, the row
   statistics).  Each case against a float64 reference written in
   tests/ref.h, on the values the storage type holds, to 1e-5 relative;
   and the same bits for 1 and 2 threads.  Blocked keys' values are NaN
   and must not leak; a zero weight (underflow) must not turn an inf value
   into NaN.  */
#define MHA_IMPLEMENTATION
#include "../mha.h"
#include "testutil.h"
#include "ref.h"
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5

typedef struct {
    int H, Hkv, Lq, Lk, D, Dv;
    int opt;          /* 0 plain, 1 causal+window, 2 softcap+sinks, 3 alibi+float mask, 4 kpm, 5 stats */
    mha_dtype dt;
} ncase;

static double worst[3];
static int cases_run;

static void widen(mha_dtype dt, const float *x, void *store, float *held, size_t n)
{
    if (dt == MHA_F32) {
        memcpy(store, x, n * sizeof(float));
        memcpy(held, x, n * sizeof(float));
    } else {
        (void)mha_convert(n, MHA_F32, x, dt, store, NULL);
        (void)mha_convert(n, dt, store, MHA_F32, held, NULL);
    }
}

static void run_case(const ncase *c, tu_rng *r)
{
    const int B = 1, H = c->H, Hkv = c->Hkv, Lq = c->Lq, Lk = c->Lk, D = c->D, Dv = c->Dv;
    size_t nq = (size_t)B * H * Lq * D, nk = (size_t)B * Hkv * Lk * D, nv = (size_t)B * Hkv * Lk * Dv;
    size_t no = (size_t)B * H * Lq * Dv, es = c->dt == MHA_F32 ? 4 : 2, i;
    float *q = malloc(nq * 4), *kx = malloc(nk * 4), *vx = malloc(nv * 4), *kh = malloc(nk * 4), *vh = malloc(nv * 4);
    void *ks = malloc(nk * es), *vs = malloc(nv * es);
    float *o1 = malloc(no * 4), *o2 = malloc(no * 4), *lse1 = malloc((size_t)H * Lq * 4), *lse2 = malloc((size_t)H * Lq * 4);
    float *ent = malloc((size_t)H * Lq * 4), *mw = malloc((size_t)H * Lq * 4), *fw = malloc((size_t)H * Lq * 4);
    double *ref = malloc(no * sizeof(double)), *rl = malloc((size_t)H * Lq * sizeof(double));
    float *sinks = malloc((size_t)H * 4), *fmask = malloc((size_t)Lq * Lk * 4);
    unsigned char *kpm = malloc((size_t)Lk);
    mha_options o;
    mha_run run;
    mha_error e;
    mha_status st;
    double err;
    int t, blocked_nan = 0;

    tu_fill(r, q, nq, 1.0f);
    tu_fill(r, kx, nk, 1.0f);
    tu_fill(r, vx, nv, 1.0f);
    memset(&o, 0, sizeof o);
    o.num_kv_heads = Hkv;
    o.kv_dtype = c->dt;
    o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    switch (c->opt) {
    case 1: o.causal = 1; o.window = 1; o.window_left = 37; o.window_right = -1; blocked_nan = 1; break;
    case 2:
        o.softcap = 2.0f; o.causal = 1;
        for (t = 0; t < H; ++t) sinks[t] = 0.5f * (float)(t % 3) - 0.25f;
        o.sinks = sinks;
        for (i = 0; i < nq; ++i) q[i] *= 4.0f;          /* scores past the cap */
        break;
    case 3:
        o.alibi = 1; o.causal = 1;
        for (i = 0; i < (size_t)Lq * Lk; ++i) fmask[i] = (i % 11 == 3) ? -INFINITY : 0.1f * (float)(i % 5);
        o.attn_mask.kind = MHA_MASK_FLOAT; o.attn_mask.data = fmask; o.attn_mask.ndim = 2;
        o.attn_mask.shape[0] = Lq; o.attn_mask.shape[1] = Lk;
        break;
    case 4:
        for (i = 0; i < (size_t)Lk; ++i) kpm[i] = (unsigned char)(i % 7 == 2 && i + 1 < (size_t)Lk);
        o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = kpm; o.key_padding_mask.ndim = 2;
        o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = Lk;
        blocked_nan = 2;
        break;
    case 5: o.causal = 1; break;
    default: break;
    }
    /* the values of keys nobody may see: NaN, which must not reach the output */
    if (blocked_nan == 1 && Lk - Lq - 37 > 0)   /* the window's left edge: keys < Lk - Lq - 37 */
        for (t = 0; t < Hkv; ++t) vx[((size_t)t * Lk + 0) * Dv + (size_t)(Dv - 1)] = NAN;
    if (blocked_nan == 2)
        for (i = 2; i + 1 < (size_t)Lk; i += 7)
            for (t = 0; t < Hkv; ++t) vx[((size_t)t * Lk + i) * Dv] = NAN;
    widen(c->dt, kx, ks, kh, nk);
    widen(c->dt, vx, vs, vh, nv);

    ref_sdpa(&o, B, H, Lq, Lk, D, Dv, q, kh, vh, NULL, ref, rl, NULL, NULL, NULL, NULL);
    memset(&run, 0, sizeof run);
    if (c->opt == 5) { run.lse = lse1; run.entropy = ent; run.max_weight = mw; run.first_weight = fw; }
    else if (c->opt == 2) run.lse = lse1;
    o.num_threads = 1;
    st = mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, ks, vs, &o, o1, &run, &e);
    CHECK(st == MHA_OK, "forward: %s", e.message);
    err = tu_rel_err(o1, ref, no);
    if (err > worst[c->dt]) worst[c->dt] = err;
    CHECK(err <= TOL, "H %d Hkv %d Lq %d Lk %d D %d Dv %d opt %d dtype %d: %.2e against float64",
          H, Hkv, Lq, Lk, D, Dv, c->opt, (int)c->dt, err);
    if (run.lse) {
        double le = 0;
        for (i = 0; i < (size_t)H * Lq; ++i) {
            double d = fabs((double)lse1[i] - rl[i]) / (fabs(rl[i]) > 1 ? fabs(rl[i]) : 1.0);
            if (d > le) le = d;
        }
        CHECK(le <= TOL, "lse: %.2e (opt %d)", le, c->opt);
    }
    if (c->opt == 5) {   /* the statistics as the general tile computes them: sane */
        for (i = 0; i < (size_t)H * Lq; ++i)
            if (!(ent[i] >= -1e-6f && mw[i] > 0 && mw[i] <= 1.0f + 1e-6f && fw[i] >= 0 && fw[i] <= mw[i] + 1e-6f)) break;
        CHECK(i == (size_t)H * Lq, "statistics out of range at row %d", (int)i);
    }
    /* 2 threads (and split-K parts shared out): the same bits */
    o.num_threads = 2;
    if (run.lse) run.lse = lse2;
    st = mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, ks, vs, &o, o2, &run, &e);
    CHECK(st == MHA_OK && memcmp(o1, o2, no * 4) == 0, "2 threads differ from 1 (H %d Lk %d D %d)", H, Lk, D);
    ++cases_run;
    free(q); free(kx); free(vx); free(kh); free(vh); free(ks); free(vs); free(o1); free(o2);
    free(lse1); free(lse2); free(ent); free(mw); free(fw); free(ref); free(rl); free(sinks); free(fmask); free(kpm);
}

/* Every column count and storage type against every head size, key
   count and option set, the options rotating with the case. */
static void test_sweep(void)
{
    static const int dims[][2] = { {1, 1}, {3, 5}, {7, 7}, {17, 17}, {130, 130}, {64, 8}, {16, 32}, {128, 64}, {128, 128} };
    static const int lks[] = { 1, 15, 16, 33, 130, 300 };
    tu_rng r = {2024};
    int dt, g, di, li, n = 0;
    for (dt = 0; dt < 3; ++dt)
        for (g = 1; g <= 8; ++g)
            for (di = 0; di < (int)(sizeof dims / sizeof dims[0]); ++di)
                for (li = 0; li < (int)(sizeof lks / sizeof lks[0]); ++li) {
                    ncase c;
                    c.Hkv = 1 + (n % 2); c.H = g * c.Hkv; c.Lq = 1;
                    c.Lk = lks[li]; c.D = dims[di][0]; c.Dv = dims[di][1];
                    c.opt = n % 6; c.dt = (mha_dtype)dt;
                    if (c.D >= 128 && c.Lk > 130 && g > 2) { ++n; continue; }   /* keep the run short */
                    run_case(&c, &r);
                    ++n;
                }
}

/* Two and three query rows a step (a prefill chunk of a decoder), each
   with a group small enough to stay narrow; and split-K (past 2048 keys). */
static void test_chunks_and_parts(void)
{
    static const ncase cs[] = {
        {4, 2, 2, 50, 64, 64, 1, MHA_F32}, {3, 3, 2, 50, 17, 17, 0, MHA_F16}, {8, 4, 3, 70, 32, 32, 5, MHA_BF16},
        {2, 1, 4, 90, 128, 128, 2, MHA_F32}, {8, 8, 1, 2100, 64, 64, 0, MHA_F32}, {16, 2, 1, 2100, 128, 128, 1, MHA_F16},
        {8, 1, 1, 4200, 7, 130, 5, MHA_BF16}, {6, 1, 1, 2049, 16, 16, 4, MHA_F32}, {5, 1, 1, 2100, 3, 3, 3, MHA_F16},
    };
    tu_rng r = {77};
    size_t i;
    for (i = 0; i < sizeof cs / sizeof cs[0]; ++i) run_case(&cs[i], &r);
}

/* A weight that underflows to 0 times an inf value must add nothing (as
   the general tile's finite-V check does); a NaN query gives NaN out. */
static void test_zero_weight_and_nan(void)
{
    enum { H = 4, Lk = 40, D = 16 };
    float q[H * D], k[Lk * D], v[Lk * D], out[H * D];
    mha_options o;
    int i, d;
    tu_rng r = {9};
    tu_fill(&r, q, H * D, 1.0f);
    tu_fill(&r, v, Lk * D, 1.0f);
    for (i = 0; i < Lk; ++i)
        for (d = 0; d < D; ++d) k[i * D + d] = (i == 5) ? -50.0f * (q[d] > 0 ? 1.0f : -1.0f) : 0.01f * (float)(i % 3);
    /* key 5's score is about -50 |q|_1 / 4 for every head: exp underflows to 0 */
    for (d = 0; d < D; ++d) q[d] = q[D + d] = q[2 * D + d] = q[3 * D + d] = 4.0f * (q[d] > 0 ? 1.0f : -1.0f);
    for (d = 0; d < D; ++d) v[5 * D + d] = INFINITY;
    memset(&o, 0, sizeof o);
    o.num_kv_heads = 1;
    CHECK(mha_sdpa_forward(1, H, 1, Lk, D, D, q, k, v, &o, out, NULL, NULL) == MHA_OK, "forward");
    for (i = 0; i < H * D; ++i) if (!isfinite(out[i])) break;
    CHECK(i == H * D, "an underflowed weight times inf reached the output (element %d: %g)", i, (double)out[i]);
    q[2 * D + 3] = NAN;
    CHECK(mha_sdpa_forward(1, H, 1, Lk, D, D, q, k, v, &o, out, NULL, NULL) == MHA_OK, "forward");
    CHECK(out[2 * D] != out[2 * D] && out[D] == out[D], "NaN in head 2's query: NaN there only");
}

int main(void)
{
    test_sweep();
    test_chunks_and_parts();
    test_zero_weight_and_nan();
    printf("NOTE narrow path, %d cases against float64: worst F32 %.2e, F16 %.2e, BF16 %.2e\n",
           cases_run, worst[0], worst[1], worst[2]);
    return tu_finish("narrow");
}
