/* test_bad_input.c - value-level bad input (NaN, Inf, masks that block
   everything) on both attention paths, for the bad-input catalogue in
   docs/api.md; the status-level cases are in test_errors.c, and which
   field each public function names when it refuses in test_api.c.

   The first case is the regression for what fuzz_diff found
   (tests/data/fuzz/diff/bool_blocked_float_kpm_nan): a float
   key_padding_mask value of NaN or +inf on a key that the attention mask
   had already blocked turned the score into -inf + NaN = NaN, so a fully
   masked row came out NaN instead of zero. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <string.h>

enum { B = 2, H = 2, LQ = 5, LK = 7, D = 4 };
static float q[B * H * LQ * D], k[B * H * LK * D], v[B * H * LK * D];

static void fill(void)
{
    tu_rng r = {41};
    tu_fill(&r, q, sizeof q / sizeof q[0], 1.0f);
    tu_fill(&r, k, sizeof k / sizeof k[0], 1.0f);
    tu_fill(&r, v, sizeof v / sizeof v[0], 1.0f);
}

/* out [B,H,LQ,D] of the fused (no weights) or the unfused path (the run
   asks for the weights) */
static mha_status run(const mha_options *o, int fused, float *out)
{
    static float w[B * H * LQ * LK];
    mha_run r;
    memset(&r, 0, sizeof r);
    r.weights = fused ? NULL : w;
    return mha_sdpa_forward(B, H, LQ, LK, D, D, q, k, v, o, out, &r, NULL);
}

static int all_finite(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (!isfinite(x[i])) return 0;
    return 1;
}

/* Blocked by one mask, poisoned in the other: still blocked. */
static void test_blocked_stays_blocked(void)
{
    static const char *const paths[2] = {"unfused", "fused"};
    unsigned char am[LQ * LK];
    float kpm[B * LK], am_f[LQ * LK], ref[B * H * LQ * D], out[B * H * LQ * D];
    mha_options o;
    int fused, j, i;
    fill();
    for (fused = 0; fused < 2; ++fused) {
        /* bool attn_mask blocks keys 2 and 3; float key_padding_mask holds NaN and +inf there */
        memset(&o, 0, sizeof o);
        for (i = 0; i < LQ * LK; ++i) am[i] = (unsigned char)(i % LK == 2 || i % LK == 3);
        for (j = 0; j < B * LK; ++j) kpm[j] = 0.25f * (float)(j % 3);
        o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = am; o.attn_mask.ndim = 2;
        o.attn_mask.shape[0] = LQ; o.attn_mask.shape[1] = LK;
        o.key_padding_mask.kind = MHA_MASK_FLOAT; o.key_padding_mask.data = kpm; o.key_padding_mask.ndim = 2;
        o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = LK;
        CHECK(run(&o, fused, ref) == MHA_OK, "reference run");
        kpm[2] = NAN; kpm[3] = INFINITY; kpm[LK + 2] = -NAN; kpm[LK + 3] = INFINITY;
        CHECK(run(&o, fused, out) == MHA_OK && memcmp(out, ref, sizeof out) == 0 && all_finite(out, B * H * LQ * D),
              "%s: NaN/+inf float key_padding_mask on keys the bool attn_mask blocked changes nothing", paths[fused]);

        /* float attn_mask -inf on key 2, float key_padding_mask +inf on it */
        for (i = 0; i < LQ * LK; ++i) am_f[i] = i % LK == 2 ? -INFINITY : 0.1f * (float)(i % 4);
        for (j = 0; j < B * LK; ++j) kpm[j] = 0.25f * (float)(j % 3);
        o.attn_mask.kind = MHA_MASK_FLOAT; o.attn_mask.data = am_f;
        CHECK(run(&o, fused, ref) == MHA_OK, "reference run");
        kpm[2] = INFINITY; kpm[LK + 2] = NAN;
        CHECK(run(&o, fused, out) == MHA_OK && memcmp(out, ref, sizeof out) == 0,
              "%s: +inf/NaN key_padding_mask on a key the float attn_mask set to -inf changes nothing", paths[fused]);

        /* every key of every query blocked by the bool mask, NaN in the float padding: zero rows */
        for (i = 0; i < LQ * LK; ++i) am[i] = 1;
        o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = am;
        for (j = 0; j < B * LK; ++j) kpm[j] = j % 2 ? NAN : INFINITY;
        for (i = 0; i < B * H * LQ * D; ++i) out[i] = 7.0f;
        CHECK(run(&o, fused, out) == MHA_OK, "fully masked run");
        for (i = 0, j = 0; i < B * H * LQ * D; ++i) j += out[i] != 0.0f;
        CHECK(j == 0, "%s: fully masked rows with a poisoned float padding mask are zero (%d nonzero)", paths[fused], j);
    }
}

/* A NaN the rows really attend to reaches those rows and no others. */
static void test_attended_nan_is_local(void)
{
    float out[B * H * LQ * D];
    mha_options o;
    int fused, i, d, bad;
    fill();
    v[3 * D + 1] = NAN;   /* batch 0, head 0, key 3 */
    for (fused = 0; fused < 2; ++fused) {
        memset(&o, 0, sizeof o);
        o.causal = 1;     /* query i sees keys 0..i: rows 3 and 4 of (0, 0) see key 3 */
        CHECK(run(&o, fused, out) == MHA_OK, "run");
        for (i = 0, bad = 0; i < B * H * LQ; ++i)
            for (d = 0; d < D; ++d) {
                int hit = i >= 3 && i < LQ && d == 1;   /* (b 0, h 0), query >= 3, value column 1 */
                bad += hit ? !isnan(out[i * D + d]) : !isfinite(out[i * D + d]);
            }
        CHECK(bad == 0, "%s: NaN in an attended value reaches exactly the rows and column that use it (%d wrong)",
              fused ? "fused" : "unfused", bad);
    }
}

int main(void)
{
    test_blocked_stays_blocked();
    test_attended_nan_is_local();
    return tu_finish("test_bad_input");
}
