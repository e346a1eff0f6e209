/* The vector layer (white box: the mha__v* functions, mha__dot, mha__axpy,
   mha__softmax_row_lse): exp's error bound, softmax, dot and axpy against
   float64.
   Runs on every configuration (scalar, AVX2, NEON under qemu).
   `test_simd --exhaustive` checks exp on every float of [MHA__EXP_LO, MHA__EXP_HI]
   (about 2.2e9 values; a minute natively, not part of the suite). */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "ref.h"
#include <string.h>

static float f_of_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
static uint32_t bits_of_f(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }

/* exp through the vector layer, one value (the other lanes get copies) */
static float vexp1(float x)
{
    float buf[MHA__VW];
    int i;
    for (i = 0; i < MHA__VW; ++i) buf[i] = x;
    mha__vstore(buf, mha__vexp(mha__vload(buf)));
    return buf[MHA__VW - 1];
}

static double worst_rel = 0.0;
static float worst_x = 0.0f;
static long n_checked = 0;

/* every float with bit pattern u0, u0+step, ... up to u1 (same sign), in vectors */
static void exp_scan(uint32_t u0, uint32_t u1, uint32_t step)
{
    float in[MHA__VW], out[MHA__VW];
    uint64_t u = u0;
    int k;
    while (u <= u1) {
        for (k = 0; k < MHA__VW; ++k) {
            uint64_t v = u + (uint64_t)k * step;
            in[k] = f_of_bits((uint32_t)(v <= u1 ? v : u1));
        }
        mha__vstore(out, mha__vexp(mha__vload(in)));
        for (k = 0; k < MHA__VW; ++k) {
            double ref = exp((double)in[k]);
            double rel = fabs((double)out[k] - ref) / ref;
            if (!(rel <= worst_rel)) { worst_rel = rel; worst_x = in[k]; }
        }
        n_checked += MHA__VW;
        u += (uint64_t)MHA__VW * step;
    }
}

/* the floats within +-w bit patterns of x, clipped to [LO, HI] */
static void exp_window(float x, uint32_t w)
{
    uint32_t lo_neg = bits_of_f(MHA__EXP_LO), hi_pos = bits_of_f(MHA__EXP_HI);
    uint32_t b = bits_of_f(x);
    if (x < 0.0f) {   /* negative floats: larger pattern = more negative */
        uint32_t a = b > 0x80000000u + w ? b - w : 0x80000000u, e = b + w < lo_neg ? b + w : lo_neg;
        exp_scan(a, e, 1);
    } else {
        uint32_t a = b > w ? b - w : 0, e = b + w < hi_pos ? b + w : hi_pos;
        exp_scan(a, e, 1);
    }
}

static void test_exp(int exhaustive)
{
    const float ln2_half = 0.346573590f;
    int k;
    if (exhaustive) {
        exp_scan(0x80000000u, bits_of_f(MHA__EXP_LO), 1);
        exp_scan(0, bits_of_f(MHA__EXP_HI), 1);
    } else {
        /* a dense stride over the whole range (a prime, so every mantissa pattern mixes) */
        exp_scan(0x80000000u, bits_of_f(MHA__EXP_LO), 4099);
        exp_scan(0, bits_of_f(MHA__EXP_HI), 8191);
        /* every float near the places where the reduction changes regime */
        exp_window(MHA__EXP_LO, 3000);
        exp_window(MHA__EXP_HI, 3000);
        exp_window(-1e-30f, 2000);
        exp_window(1e-30f, 2000);
        for (k = -251; k <= 255; k += 2) exp_window((float)k * ln2_half, 300);   /* n switches */
        for (k = -87; k <= 88; ++k) exp_window((float)k, 300);
    }
    printf("NOTE exp (%s): worst relative error %.3g at x = %.9g over %ld values\n",
           MHA__SIMD_NAME, worst_rel, worst_x, n_checked);
    CHECK(worst_rel <= 2e-7, "exp relative error %.3g at x = %.9g exceeds 2e-7", worst_rel, worst_x);

    /* edges: flush to zero, overflow, specials */
    CHECK(vexp1(0.0f) == 1.0f, "exp(0) = %.9g", vexp1(0.0f));
    CHECK(vexp1(-0.0f) == 1.0f, "exp(-0) = %.9g", vexp1(-0.0f));
    CHECK(vexp1(-INFINITY) == 0.0f, "exp(-inf) = %g", vexp1(-INFINITY));
    CHECK(vexp1(nextafterf(MHA__EXP_LO, -INFINITY)) == 0.0f, "below LO not flushed");
    CHECK(vexp1(MHA__EXP_LO) >= 1.17549435e-38f, "exp(LO) = %g is not normal", vexp1(MHA__EXP_LO));
    CHECK(vexp1(-100.0f) == 0.0f && vexp1(-1e30f) == 0.0f && vexp1(-3.4e38f) == 0.0f, "far below");
    CHECK(vexp1(INFINITY) == INFINITY, "exp(inf) = %g", vexp1(INFINITY));
    CHECK(vexp1(nextafterf(MHA__EXP_HI, INFINITY)) == INFINITY, "above HI is not inf");
    CHECK(vexp1(1e30f) == INFINITY, "exp(1e30)");
    CHECK(vexp1(MHA__EXP_HI) < INFINITY, "exp(HI) overflowed");
    CHECK(vexp1(NAN) != vexp1(NAN), "exp(NaN) is not NaN");
    CHECK(exp((double)MHA__EXP_LO) >= 1.1754943508222875e-38 &&
          exp((double)nextafterf(MHA__EXP_LO, -INFINITY)) < 1.1754943508222875e-38, "LO is the threshold");
    {   /* lanes are independent: a mixed vector */
        float in[MHA__VW], out[MHA__VW];
        int i;
        for (i = 0; i < MHA__VW; ++i) in[i] = (i % 4 == 0) ? -INFINITY : (i % 4 == 1) ? NAN : (float)i - 3.5f;
        mha__vstore(out, mha__vexp(mha__vload(in)));
        for (i = 0; i < MHA__VW; ++i) {
            if (i % 4 == 0) CHECK(out[i] == 0.0f, "lane %d", i);
            else if (i % 4 == 1) CHECK(out[i] != out[i], "lane %d", i);
            else CHECK(fabs(out[i] - exp(in[i])) <= 2e-7 * exp(in[i]), "lane %d", i);
        }
    }
}

static void test_layer(void)
{
    float a[MHA__VW], b[MHA__VW], c[MHA__VW];
    float want_sum = 0.0f, want_max = -INFINITY;
    int i;
    for (i = 0; i < MHA__VW; ++i) {
        a[i] = (float)(i * 3 % 7) - 2.0f;
        b[i] = 0.5f * (float)i + 1.0f;
        want_sum += a[i];
        if (a[i] > want_max) want_max = a[i];
    }
    CHECK(mha__vhsum(mha__vload(a)) == want_sum, "hsum");
    CHECK(mha__vhmax(mha__vload(a)) == want_max, "hmax");
    mha__vstore(c, mha__vfma(mha__vset1(10.0f), mha__vload(a), mha__vload(b)));
    for (i = 0; i < MHA__VW; ++i) CHECK(c[i] == 10.0f + a[i] * b[i], "fma lane %d", i);
    mha__vstore(c, mha__vsub(mha__vmax(mha__vload(a), mha__vzero()), mha__vload(b)));
    for (i = 0; i < MHA__VW; ++i) CHECK(c[i] == (a[i] > 0 ? a[i] : 0.0f) - b[i], "max/sub lane %d", i);
    {   /* transpose of a VW x VW block: element (r, l) moves to (l, r) */
        float m[MHA__VW * MHA__VW], t[MHA__VW * MHA__VW];
        mha__vf r[MHA__VW];
        int k, bad = 0;
        for (k = 0; k < MHA__VW * MHA__VW; ++k) m[k] = (float)k;
        for (k = 0; k < MHA__VW; ++k) r[k] = mha__vload(m + k * MHA__VW);
        mha__vtranspose(r);
        for (k = 0; k < MHA__VW; ++k) mha__vstore(t + k * MHA__VW, r[k]);
        for (k = 0; k < MHA__VW * MHA__VW; ++k) bad += t[k] != m[(k % MHA__VW) * MHA__VW + k / MHA__VW];
        CHECK(bad == 0, "vtranspose: %d elements misplaced", bad);
    }
}

static void test_dot_axpy(void)
{
    tu_rng rng = {0x5eed1234u};
    float x[130] = {0}, y[130] = {0}, y0[130];
    double want[130];
    int n, i;
    for (n = 0; n <= 130; n += (n < 40 ? 1 : 45)) {
        double d = 0.0, num, den;
        float got;
        tu_fill(&rng, x, (size_t)n, 1.0f);
        tu_fill(&rng, y, (size_t)n, 1.0f);
        for (i = 0; i < n; ++i) d += (double)x[i] * y[i];
        got = mha__dot(x, y, n);
        num = fabs(got - d);
        den = 0.0;
        for (i = 0; i < n; ++i) den += fabs((double)x[i] * y[i]);
        CHECK(num <= 1e-6 * (den + 1e-30) || (n == 0 && got == 0.0f), "dot n=%d: %g vs %g", n, got, d);

        memcpy(y0, y, sizeof y);
        for (i = 0; i < n; ++i) want[i] = (double)y0[i] + (double)-0.75f * x[i];
        mha__axpy(y, -0.75f, x, n);
        CHECK(tu_rel_err(y, want, (size_t)n) <= 1e-6, "axpy n=%d", n);
        if (n < 130) CHECK(y[n] == y0[n], "axpy wrote past n=%d", n);
    }
}

/* The vector softmax of one row, mha__softmax_row_lse (white box: the SIMD
   layer), against the float64 ref_softmax_row (tests/ref.h): the weights,
   the log-sum-exp it returns, and with a sink logit in the denominator. */
static void test_softmax(void)
{
    tu_rng rng = {0xabcdefu};
    float s[200], r[200];
    double want[200];
    int n, i, pat, with_sink;
    for (with_sink = 0; with_sink < 2; ++with_sink)
        for (pat = 0; pat < 4; ++pat) {
            for (n = 1; n <= 200; n += (n < 34 ? 1 : 83)) {
                double tot = 0.0, wlse, sum_want = 0.0;
                float lse, sink = with_sink ? 3.0f * tu_uniform(&rng) : -INFINITY;
                tu_fill(&rng, s, (size_t)n, pat == 3 ? 40.0f : 4.0f);
                for (i = 0; i < n; ++i) {
                    if (pat == 1 && i % 3 == 1) s[i] = -INFINITY;          /* some blocked */
                    if (pat == 2 && i != n / 2) s[i] = -INFINITY;          /* one allowed */
                }
                memcpy(r, s, sizeof(float) * (size_t)n);
                wlse = ref_softmax_row(s, n, sink, want);
                lse = mha__softmax_row_lse(s, n, sink);
                CHECK(fabs(lse - wlse) <= 1e-6 * (fabs(wlse) > 1 ? fabs(wlse) : 1),
                      "softmax n=%d pattern %d sink %d: lse %.9g, float64 %.9g", n, pat, with_sink, lse, wlse);
                CHECK(tu_rel_err(s, want, (size_t)n) <= 1e-6, "softmax n=%d pattern %d sink %d: err %g", n, pat,
                      with_sink, tu_rel_err(s, want, (size_t)n));
                for (i = 0; i < n; ++i) {
                    tot += s[i];
                    sum_want += want[i];
                    if (r[i] == -INFINITY) CHECK(s[i] == 0.0f, "blocked key %d of %d got %g", i, n, s[i]);
                }
                /* the weights sum to 1, or to 1 - exp(sink - lse) with a sink */
                CHECK(fabs(tot - sum_want) <= 1e-5 && (with_sink || fabs(tot - 1.0) <= 1e-5),
                      "softmax n=%d sink %d sums to %.9g, float64 %.9g", n, with_sink, tot, sum_want);
                if (!with_sink) {   /* the scalar definition the library keeps */
                    mha__softmax_row_ref(r, n);
                    CHECK(tu_rel_err_ff(s, r, (size_t)n) <= 1e-6, "softmax vs mha__softmax_row_ref n=%d", n);
                }
            }
        }
    /* all blocked: zeros, and -inf returned; with a sink the lse is the sink */
    for (n = 1; n <= 19; n += 6) {
        float lse;
        for (i = 0; i < n; ++i) s[i] = -INFINITY;
        lse = mha__softmax_row_lse(s, n, -INFINITY);
        CHECK(lse == -INFINITY, "all-blocked row returns %g, not -inf", lse);
        for (i = 0; i < n; ++i) CHECK(s[i] == 0.0f, "all-blocked row n=%d not zero at %d", n, i);
        for (i = 0; i < n; ++i) s[i] = -INFINITY;
        lse = mha__softmax_row_lse(s, n, 1.25f);
        CHECK(lse == 1.25f, "all-blocked row with sink 1.25 returns %g", lse);
        for (i = 0; i < n; ++i) CHECK(s[i] == 0.0f, "all-blocked row with a sink n=%d not zero at %d", n, i);
    }
    /* a NaN score poisons its row, as in the reference */
    for (i = 0; i < 11; ++i) s[i] = (float)i;
    s[5] = NAN;
    mha__softmax_row_lse(s, 11, -INFINITY);
    CHECK(s[0] != s[0] && s[10] != s[10], "NaN score did not propagate");
}

int main(int argc, char **argv)
{
    test_layer();
    test_exp(argc > 1 && strcmp(argv[1], "--exhaustive") == 0);
    test_dot_axpy();
    test_softmax();
    return tu_finish("simd");
}
