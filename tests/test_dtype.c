/* 16-bit storage (issue 19, item 2): mha_convert, keys and values in F16
   and BF16 for SDPA and the KV cache, and the module decoding over a
   16-bit cache.

   Conversions are checked against a definition written here in float64
   (round to nearest even on the 16-bit grid, overflow to inf) over every
   rounding boundary of both types, every 16-bit pattern, random floats and
   NaN payloads, through the vector loops (long arrays, every tier the
   build runs) and the scalar tails (one element at a time), and against
   the bits PyTorch's .half() / .bfloat16() give (tests/golden/dtype.bin).

   Attention with 16-bit K and V must equal, bit for bit, the float32 path
   run on the widened values (the kernels widen and then compute exactly
   as they do for float32), on every path: fused per thread, shared pack,
   narrow decode, split-K, the weights and chosen rows; and agree with a
   float64 reference and with PyTorch to 1e-5.  The rounding of storage
   itself (what F16 and BF16 cost against float32 K and V) is printed as a
   NOTE for docs/performance.md.  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "ref.h"
#include "golden.h"

#include <stdlib.h>
#include <string.h>
#include <math.h>

#define TOL 1e-5

/* ---- the definition, in float64 */

static double ref_f16_value(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, f = h & 1023;
    double v = e == 0 ? ldexp(f, -24) : e == 31 ? (f ? NAN : INFINITY) : ldexp(1024 + f, e - 25);
    return s ? -v : v;
}
static double ref_bf16_value(uint16_t h)
{
    int s = h >> 15, e = (h >> 7) & 255, f = h & 127;
    double v = e == 0 ? ldexp(f, -133) : e == 255 ? (f ? NAN : INFINITY) : ldexp(128 + f, e - 134);
    return s ? -v : v;
}
static double ref_value(uint16_t h, mha_dtype t) { return t == MHA_F16 ? ref_f16_value(h) : ref_bf16_value(h); }

/* x rounded to p significant bits with minimum exponent emin (subnormals
   below), ties to even; a result >= big (the first power of two past the
   largest finite) is inf.  x is a float (exact in double). */
static double ref_round(double x, int p, int emin, double big)
{
    double a = fabs(x), ulp, r;
    int e;
    if (a == 0 || isinf(a)) return x;
    (void)frexp(a, &e);                  /* a = m 2^e, m in [0.5, 1): exponent e - 1 */
    if (e - 1 < emin) e = emin + 1;
    ulp = ldexp(1.0, e - 1 - (p - 1));
    r = a / ulp;                         /* exact: ulp is a power of two */
    r = floor(r) + ((r - floor(r) > 0.5 || (r - floor(r) == 0.5 && fmod(floor(r), 2.0) != 0)) ? 1 : 0);
    r *= ulp;
    if (r >= big) r = INFINITY;
    return copysign(r, x);
}
static double ref_narrow(float x, mha_dtype t)
{
    return t == MHA_F16 ? ref_round(x, 11, -14, 65536.0) : ref_round(x, 8, -126, ldexp(1.0, 128));
}

static uint32_t fbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float bitsf(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* Is h the narrowing of x as mha_dtype t defines it?  NaN: quiet, sign kept,
   the top payload bits kept (F16: 9 below the quiet bit; BF16: 6). */
static int narrow_ok(float x, uint16_t h, mha_dtype t)
{
    uint32_t u = fbits(x);
    double want, got;
    if (x != x) {
        if (t == MHA_F16)
            return (h & 0x8000) == ((u >> 16) & 0x8000) && (h & 0x7e00) == 0x7e00 &&
                   (h & 0x1ff) == ((u >> 13) & 0x1ff);
        return h == (uint16_t)((u >> 16) | 0x40);
    }
    want = ref_narrow(x, t);
    got = ref_value(h, t);
    return got == want && !signbit(got) == !signbit(want);
}

/* the values every conversion test runs over */
static size_t conversion_inputs(float **out)
{
    size_t n = 0, cap = 1u << 21;
    float *x = (float *)malloc(cap * sizeof(float));
    uint32_t h, i;
    tu_rng r = {99};
    for (h = 0; h < 0x7c00; ++h) {       /* every F16 midpoint, and a float either side */
        float lo = (float)ref_f16_value((uint16_t)h), hi = (float)ref_f16_value((uint16_t)(h + 1));
        float mid = (float)(((double)lo + hi) / 2);
        x[n++] = lo; x[n++] = mid; x[n++] = nextafterf(mid, -INFINITY); x[n++] = nextafterf(mid, INFINITY);
    }
    for (h = 0; h < 0x7f80; h += 3) {    /* a third of the BF16 midpoints, likewise */
        float lo = (float)ref_bf16_value((uint16_t)h), hi = (float)ref_bf16_value((uint16_t)(h + 1));
        float mid = (float)(((double)lo + hi) / 2);
        x[n++] = mid; x[n++] = nextafterf(mid, -INFINITY); x[n++] = nextafterf(mid, INFINITY);
    }
    for (i = 0; i < 200000; ++i) x[n++] = bitsf(tu_next(&r));   /* any pattern, NaN included */
    {
        static const uint32_t special[] = {0x7f800000u, 0x7f7fffffu, 0x7fc00000u, 0x7f800001u, 0x7fbfffffu,
                                           0x7fffffffu, 0x7fa00000u, 0x7f802000u, 0x00000001u, 0x007fffffu,
                                           0x00800000u, 0x477ff000u, 0x477fefffu, 0x33000000u, 0x33000001u,
                                           0x387fe000u, 0x387ff000u, 0x38800000u, 0x7f7f8000u, 0x7f7f7fffu};
        for (i = 0; i < sizeof special / sizeof special[0]; ++i) x[n++] = bitsf(special[i]);
    }
    for (i = 0, h = (uint32_t)n; i < h; ++i) x[n++] = -x[i];   /* and every one negated */
    MHA_ASSERT(n <= cap);
    *out = x;
    return n;
}

static void test_conversions(void)
{
    static const mha_dtype types[2] = {MHA_F16, MHA_BF16};
    float *x, *back;
    uint16_t *h, one;
    size_t n = conversion_inputs(&x), i, bad_vec, bad_one, bad_back;
    int t;
    h = (uint16_t *)malloc(n * sizeof(uint16_t));
    back = (float *)malloc(n * sizeof(float));
    for (t = 0; t < 2; ++t) {
        mha_dtype ty = types[t];
        const char *nm = ty == MHA_F16 ? "F16" : "BF16";
        bad_vec = bad_one = bad_back = 0;
        CHECK(mha_convert(n, MHA_F32, x, ty, h, NULL) == MHA_OK, "mha_convert F32 -> %s", nm);
        for (i = 0; i < n; ++i) {
            if (!narrow_ok(x[i], h[i], ty) && bad_vec++ < 3)
                printf("  %s: x = %a (0x%08x) gave 0x%04x, want %a\n", nm, (double)x[i], fbits(x[i]), h[i],
                       ref_narrow(x[i], ty));
        }
        CHECK(bad_vec == 0, "F32 -> %s over %lu values, long arrays (vector loops): %lu wrong", nm,
              (unsigned long)n, (unsigned long)bad_vec);
        for (i = 0; i < n; i += 7) {     /* the scalar tail: one element at a time */
            (void)mha_convert(1, MHA_F32, x + i, ty, &one, NULL);
            if (one != h[i]) ++bad_one;
        }
        CHECK(bad_one == 0, "F32 -> %s one element at a time differs from the arrays in %lu cases", nm,
              (unsigned long)bad_one);
        /* widening: exact, NaN stays NaN (F16: quieted, payload kept) */
        CHECK(mha_convert(n, ty, h, MHA_F32, back, NULL) == MHA_OK, "mha_convert %s -> F32", nm);
        for (i = 0; i < n; ++i) {
            double v = ref_value(h[i], ty);
            int ok = v != v ? back[i] != back[i] && (fbits(back[i]) & 0x80000000u) == ((uint32_t)(h[i] & 0x8000) << 16)
                            : (double)back[i] == v && !signbit(back[i]) == !signbit(v);
            if (ok && v != v && ty == MHA_F16)
                ok = (fbits(back[i]) & 0x007fe000u) == (((uint32_t)h[i] & 0x3ffu) << 13 | 0x00400000u);
            if (ok && v != v && ty == MHA_BF16) ok = fbits(back[i]) == (uint32_t)h[i] << 16;
            if (!ok) ++bad_back;
        }
        CHECK(bad_back == 0, "%s -> F32 wrong in %lu of %lu", nm, (unsigned long)bad_back, (unsigned long)n);
        /* round trip: widening then narrowing gives the same bits (NaN: quieted) */
        bad_back = 0;
        (void)mha_convert(n, MHA_F32, back, ty, h + 0, NULL);
        for (i = 0; i < n; ++i)
            if (!narrow_ok(back[i], h[i], ty)) ++bad_back;
        CHECK(bad_back == 0, "%s round trip wrong in %lu", nm, (unsigned long)bad_back);
    }
    /* odd lengths and offsets through both loops, and F16 <-> BF16 (in place too) */
    {
        static const int lens[] = {1, 3, 7, 17, 130, 1031};
        uint16_t a[1100], b2[1100], c[1100];
        float f[1100];
        int li, off;
        size_t k;
        for (li = 0; li < 6; ++li)
            for (off = 0; off < 3; ++off) {
                size_t m = (size_t)lens[li];
                int ok = 1;
                for (k = 0; k < m; ++k) a[off + k] = (uint16_t)(0x3000 + (37 * k + (size_t)off) % 0x4000);
                (void)mha_convert(m, MHA_F16, a + off, MHA_BF16, b2 + off, NULL);
                for (k = 0; k < m; ++k) {
                    ok &= narrow_ok((float)ref_f16_value(a[off + k]), b2[off + k], MHA_BF16);
                    c[off + k] = a[off + k];
                }
                (void)mha_convert(m, MHA_F16, c + off, MHA_BF16, c + off, NULL);   /* in place */
                ok &= memcmp(c + off, b2 + off, m * 2) == 0;
                (void)mha_convert(m, MHA_BF16, b2 + off, MHA_F32, f, NULL);
                for (k = 0; k < m; ++k) ok &= (double)f[k] == ref_bf16_value(b2[off + k]);
                (void)mha_convert(m, MHA_F32, f, MHA_F32, f + 0, NULL);             /* same: nothing */
                CHECK(ok, "F16 -> BF16 -> F32, n %lu at offset %d", (unsigned long)m, off);
            }
    }
    CHECK(mha_dtype_size(MHA_F32) == 4 && mha_dtype_size(MHA_F16) == 2 && mha_dtype_size(MHA_BF16) == 2 &&
          mha_dtype_size((mha_dtype)7) == 0, "mha_dtype_size");
    free(x); free(h); free(back);
}

/* PyTorch's bits (tests/golden/dtype.bin, case "convert") */
static void test_golden_conversions(const gold_case *g)
{
    const gold_array *x = gold_find(g, "x"), *f16 = gold_find(g, "f16"), *bf16 = gold_find(g, "bf16");
    const gold_array *all = gold_find(g, "all"), *af = gold_find(g, "all_f16"), *ab = gold_find(g, "all_bf16");
    uint16_t *h;
    float *w;
    size_t i, bad16 = 0, badb = 0, badw = 0;
    CHECK(x && f16 && bf16 && all && af && ab, "golden conversion arrays missing");
    if (!(x && f16 && bf16 && all && af && ab)) return;
    h = (uint16_t *)malloc(x->count * 2);
    w = (float *)malloc(65536 * sizeof(float));
    (void)mha_convert(x->count, MHA_F32, x->f32, MHA_F16, h, NULL);
    for (i = 0; i < x->count; ++i) bad16 += h[i] != f16->u16[i];
    (void)mha_convert(x->count, MHA_F32, x->f32, MHA_BF16, h, NULL);
    for (i = 0; i < x->count; ++i) badb += h[i] != bf16->u16[i];
    CHECK(bad16 == 0 && badb == 0, "against torch .half() / .bfloat16() over %lu floats: %lu / %lu bits differ",
          (unsigned long)x->count, (unsigned long)bad16, (unsigned long)badb);
    (void)mha_convert(65536, MHA_F16, all->u16, MHA_F32, w, NULL);
    for (i = 0; i < 65536; ++i) badw += af->f32[i] != af->f32[i] ? w[i] == w[i] : fbits(w[i]) != fbits(af->f32[i]);
    (void)mha_convert(65536, MHA_BF16, all->u16, MHA_F32, w, NULL);
    for (i = 0; i < 65536; ++i) badw += ab->f32[i] != ab->f32[i] ? w[i] == w[i] : fbits(w[i]) != fbits(ab->f32[i]);
    CHECK(badw == 0, "widening every 16-bit pattern against torch: %lu differ", (unsigned long)badw);
    free(h); free(w);
}

/* ---- attention with 16-bit keys and values */

typedef struct acase {
    int B, H, Hkv, Lq, Lk, D, Dv, threads;
    int causal, bottom_right, window, softcap, sinks, mask, weights, rows;
} acase;

static float *alloc_f(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }

/* out16 (16-bit K/V) against out32 (float32 K/V holding the widened
   values): identical bits; and against the float64 reference */
static void check_attention(const acase *c, mha_dtype ty, double *worst)
{
    size_t nq = (size_t)c->B * c->H * c->Lq * c->D, nk = (size_t)c->B * c->Hkv * c->Lk * c->D;
    size_t nv = (size_t)c->B * c->Hkv * c->Lk * c->Dv, no = (size_t)c->B * c->H * c->Lq * c->Dv;
    size_t nw = (size_t)c->B * c->H * c->Lq * c->Lk, nl = (size_t)c->B * c->H * c->Lq, i;
    float *q = alloc_f(nq), *k = alloc_f(nk), *v = alloc_f(nv), *kw = alloc_f(nk), *vw = alloc_f(nv);
    float *o16 = alloc_f(no), *o32 = alloc_f(no), *w16 = alloc_f(nw), *w32 = alloc_f(nw);
    float *l16 = alloc_f(nl), *l32 = alloc_f(nl), sinks[16];
    uint16_t *k16 = (uint16_t *)malloc(nk * 2), *v16 = (uint16_t *)malloc(nv * 2);
    unsigned char *mask = (unsigned char *)calloc((size_t)c->Lq * c->Lk, 1);
    double *ref = (double *)malloc(no * sizeof(double)), *rl = (double *)malloc(nl * sizeof(double)), e;
    int rows[3] = {0, c->Lq / 2, c->Lq - 1};
    mha_options o;
    mha_run r16, r32;
    mha_status s1, s2;
    tu_rng rng = {(uint64_t)(c->Lk * 131 + c->D * 7 + ty)};
    tu_fill(&rng, q, nq, 1.5f); tu_fill(&rng, k, nk, 1.5f); tu_fill(&rng, v, nv, 2.0f);
    for (i = 0; i < 16; ++i) sinks[i] = tu_uniform(&rng);
    (void)mha_convert(nk, MHA_F32, k, ty, k16, NULL);
    (void)mha_convert(nv, MHA_F32, v, ty, v16, NULL);
    for (i = 0; i < nk; ++i) kw[i] = (float)ref_value(k16[i], ty);   /* widened by the definition */
    for (i = 0; i < nv; ++i) vw[i] = (float)ref_value(v16[i], ty);
    memset(&o, 0, sizeof o);
    o.num_kv_heads = c->Hkv; o.num_threads = c->threads;
    o.causal = c->causal; o.causal_align = c->bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    if (c->window) { o.window = 1; o.window_left = 5; o.window_right = 2; }
    if (c->softcap) o.softcap = 4.0f;
    if (c->sinks) o.sinks = sinks;
    if (c->mask) {
        for (i = 0; i < (size_t)c->Lq * c->Lk; ++i) mask[i] = (unsigned char)((i * 7) % 5 == 0);
        o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = mask; o.attn_mask.ndim = 2;
        o.attn_mask.shape[0] = c->Lq; o.attn_mask.shape[1] = c->Lk;
    }
    memset(&r16, 0, sizeof r16);
    r16.lse = l16;
    if (c->weights) r16.weights = w16;
    if (c->rows) { r16.weights = w16; r16.rows = rows; r16.n_rows = c->Lq >= 3 ? 3 : 1; }
    r32 = r16; r32.lse = l32; r32.weights = r16.weights ? w32 : NULL;
    o.kv_dtype = ty;
    s1 = mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, k16, v16, &o, o16, &r16, NULL);
    o.kv_dtype = MHA_F32;
    s2 = mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, kw, vw, &o, o32, &r32, NULL);
    CHECK(s1 == MHA_OK && s2 == MHA_OK, "sdpa forward: %s / %s", mha_status_string(s1), mha_status_string(s2));
    CHECK(memcmp(o16, o32, no * 4) == 0 && memcmp(l16, l32, nl * 4) == 0,
          "%s K/V B%d H%d/%d Lq%d Lk%d D%d/%d threads %d: out or lse differ from float32 K/V of the same values",
          ty == MHA_F16 ? "F16" : "BF16", c->B, c->H, c->Hkv, c->Lq, c->Lk, c->D, c->Dv, c->threads);
    if (r16.weights)
        CHECK(memcmp(w16, w32, (c->rows ? (size_t)c->B * c->H * r16.n_rows * c->Lk : nw) * 4) == 0,
              "weights differ from float32 K/V (%s)", c->rows ? "rows" : "all");
    ref_sdpa(&o, c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, kw, vw, NULL, ref, rl, NULL, NULL, NULL, NULL);
    e = tu_rel_err(o16, ref, no);
    if (e > *worst) *worst = e;
    CHECK(e <= TOL, "against float64: %.2e", e);
    free(q); free(k); free(v); free(kw); free(vw); free(o16); free(o32); free(w16); free(w32);
    free(l16); free(l32); free(k16); free(v16); free(mask); free(ref); free(rl);
}

static void test_attention(void)
{
    static const acase cases[] = {
        /* B  H Hkv Lq   Lk   D  Dv thr  causal br win cap sink mask w rows */
        {2, 4, 2, 17, 17, 16, 16, 1, 1, 0, 0, 0, 0, 0, 0, 0},    /* fused, per thread */
        {1, 1, 1, 130, 130, 7, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0},    /* shared pack (fewer heads than threads) */
        {2, 8, 2, 1, 300, 64, 64, 2, 1, 1, 0, 0, 1, 0, 0, 0},    /* narrow decode, GQA, sinks */
        {1, 4, 1, 1, 4100, 32, 32, 2, 0, 0, 0, 0, 0, 0, 0, 0},   /* split-K */
        {1, 3, 3, 7, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0},        /* one key, D 1 */
        {1, 2, 1, 33, 200, 17, 17, 2, 1, 1, 1, 1, 1, 0, 0, 0},   /* window, softcap, sinks, bottom-right */
        {2, 2, 2, 9, 40, 8, 8, 1, 0, 0, 0, 0, 0, 1, 1, 0},       /* the weights (unfused path), a mask */
        {1, 4, 2, 12, 70, 16, 16, 2, 1, 0, 0, 0, 0, 0, 0, 1},    /* chosen rows */
    };
    double worst[2] = {0, 0};
    size_t i;
    int t;
    for (t = 0; t < 2; ++t)
        for (i = 0; i < sizeof cases / sizeof cases[0]; ++i)
            check_attention(&cases[i], t ? MHA_BF16 : MHA_F16, &worst[t]);
    printf("NOTE 16-bit K/V attention against float64 on the widened values: F16 %.2e, BF16 %.2e "
           "(bit-identical to float32 K/V holding them)\n", worst[0], worst[1]);
}

/* A NaN value of a blocked key cannot leak; one of an allowed key gives NaN. */
static void test_nan(void)
{
    enum { L = 9, D = 8 };
    float q[L * D], out[L * D];
    uint16_t k[L * D], v[L * D];
    mha_options o;
    int i, t;
    tu_rng r = {5};
    for (t = 0; t < 2; ++t) {
        mha_dtype ty = t ? MHA_BF16 : MHA_F16;
        float tmp[L * D];
        tu_fill(&r, q, L * D, 1.0f);
        tu_fill(&r, tmp, L * D, 1.0f);
        (void)mha_convert(L * D, MHA_F32, tmp, ty, k, NULL);
        (void)mha_convert(L * D, MHA_F32, tmp, ty, v, NULL);
        v[(L - 1) * D + 3] = ty == MHA_F16 ? 0x7e00 : 0x7fc0;     /* NaN in the last key's value */
        memset(&o, 0, sizeof o);
        o.causal = 1; o.kv_dtype = ty;
        CHECK(mha_sdpa_forward(1, 1, L, L, D, D, q, k, v, &o, out, NULL, NULL) == MHA_OK, "forward");
        for (i = 0; i < (L - 1) * D; ++i) if (out[i] != out[i]) break;
        CHECK(i == (L - 1) * D, "a NaN value of a key the causal mask blocks reached row %d", i / D);
        CHECK(out[(L - 1) * D + 3] != out[(L - 1) * D + 3], "the row that sees the NaN value is not NaN there");
    }
}

/* ---- the KV cache in 16 bits */

static void cache_init(mha_kv_cache *c, int B, int Hkv, int D, int cap, mha_dtype ty, int ring, int keep)
{
    memset(c, 0, sizeof *c);
    c->B = B; c->Hkv = Hkv; c->D = D; c->capacity = cap; c->dtype = ty; c->ring = ring; c->n_keep = keep;
    c->k = calloc((size_t)B * Hkv * cap * D, mha_dtype_size(ty));
    c->v = calloc((size_t)B * Hkv * cap * D, mha_dtype_size(ty));
    c->len = (int *)calloc((size_t)B, sizeof(int));
}
static void cache_free(mha_kv_cache *c) { free(c->k); free(c->v); free(c->len); }

/* Appends convert as mha_convert does; attention over a 16-bit cache equals
   attention over a float32 cache holding the widened values, bit for bit,
   plain and as a ring (StreamingLLM's kept tokens too); SDPA one shot and
   plan both. */
static void test_cache(void)
{
    enum { B = 2, H = 4, HKV = 2, D = 24, CAP = 40, STEPS = 55 };
    int t, ty_i, ring;
    for (ty_i = 0; ty_i < 2; ++ty_i)
        for (ring = 0; ring < 2; ++ring) {
            mha_dtype ty = ty_i ? MHA_BF16 : MHA_F16;
            mha_kv_cache c16, c32;
            float kn[B * HKV * D], vn[B * HKV * D], kw[B * HKV * D], vw[B * HKV * D], q[B * H * D];
            float o16[B * H * D], o32[B * H * D];
            uint16_t tmp[B * HKV * D];
            mha_options o;
            mha_plan *p = NULL;
            int same = 1, stored = 1, steps = ring ? STEPS : CAP;
            tu_rng r = {(uint64_t)(77 + ty_i * 2 + ring)};
            cache_init(&c16, B, HKV, D, CAP, ty, ring, ring ? 3 : 0);
            cache_init(&c32, B, HKV, D, CAP, MHA_F32, ring, ring ? 3 : 0);
            memset(&o, 0, sizeof o);
            o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT; o.num_kv_heads = HKV; o.kv_dtype = ty;
            o.num_threads = 2;
            CHECK(mha_sdpa_plan(B, H, 1, CAP, D, D, &o, MHA_PLAN_CACHE, NULL, 0, &p, NULL) == MHA_OK, "plan");
            for (t = 0; t < steps; ++t) {
                mha_run run;
                size_t i, slot = (size_t)(ring ? (t < 3 ? t : 3 + (t - 3) % (CAP - 3)) : t);
                tu_fill(&r, kn, sizeof kn / 4, 2.0f); tu_fill(&r, vn, sizeof vn / 4, 2.0f);
                tu_fill(&r, q, sizeof q / 4, 1.0f);
                (void)mha_convert(sizeof kn / 4, MHA_F32, kn, ty, tmp, NULL);
                for (i = 0; i < sizeof kn / 4; ++i) kw[i] = (float)ref_value(tmp[i], ty);
                (void)mha_convert(sizeof vn / 4, MHA_F32, vn, ty, tmp, NULL);
                for (i = 0; i < sizeof vn / 4; ++i) vw[i] = (float)ref_value(tmp[i], ty);
                CHECK(mha_kv_cache_append(&c16, 1, kn, vn, NULL) == MHA_OK, "append 16");
                CHECK(mha_kv_cache_append(&c32, 1, kw, vw, NULL) == MHA_OK, "append 32");
                for (i = 0; i < (size_t)B * HKV; ++i) {   /* the stored bits of this token */
                    size_t at = (i * CAP + slot) * D, d;
                    for (d = 0; d < D; ++d)
                        stored &= (float)ref_value(((const uint16_t *)c16.k)[at + d], ty) == kw[i * D + d] &&
                                  (float)ref_value(((const uint16_t *)c16.v)[at + d], ty) == vw[i * D + d];
                }
                memset(&run, 0, sizeof run);
                run.cache = &c16;
                CHECK(mha_sdpa_run_forward(p, 1, 0, q, NULL, NULL, o16, &run, NULL) == MHA_OK, "run over 16");
                run.cache = &c32;
                o.kv_dtype = MHA_F32;
                CHECK(mha_sdpa_forward(B, H, 1, 0, D, D, q, NULL, NULL, &o, o32, &run, NULL) == MHA_OK, "32");
                o.kv_dtype = ty;
                same &= memcmp(o16, o32, sizeof o16) == 0;
            }
            CHECK(stored, "%s cache%s: appended tokens are not the rounded values",
                  ty == MHA_F16 ? "F16" : "BF16", ring ? " (ring)" : "");
            CHECK(same, "%s cache%s: attention differs from a float32 cache of the widened values",
                  ty == MHA_F16 ? "F16" : "BF16", ring ? " (ring)" : "");
            mha_plan_destroy(p);
            cache_free(&c16); cache_free(&c32);
        }
}

/* The module decoding over a 16-bit cache (plan: kv_dtype = the cache's):
   a prefill chunk of 5 tokens (causal: the non-narrow, tiled path), then
   one token a step (the narrow path), against a float64 reference written
   here: q = x Wq^T + bq, the cache's keys and values widened by the
   definition, out = ctx Wo^T + bo.  Also an SDPA chunk over the cache. */
static void test_module_decode(void)
{
    enum { E = 32, H = 4, HKV = 2, D = E / H, EKV = HKV * D, CAP = 20, B = 1, CH = 5 };
    float win[(E + 2 * EKV) * E], bin[E + 2 * EKV], wo[E * E], bo[E], x[CH * E], out[CH * E];
    mha_module m;
    mha_options o;
    mha_plan *p = NULL;
    mha_kv_cache c;
    int t, ty_i;
    tu_rng r = {31};
    tu_fill(&r, win, sizeof win / 4, 0.3f); tu_fill(&r, bin, sizeof bin / 4, 0.1f);
    tu_fill(&r, wo, sizeof wo / 4, 0.3f); tu_fill(&r, bo, sizeof bo / 4, 0.1f);
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H; m.num_kv_heads = HKV;
    m.in_proj_weight = win; m.in_proj_bias = bin; m.out_proj_weight = wo; m.out_proj_bias = bo;
    for (ty_i = 0; ty_i < 2; ++ty_i) {
        mha_dtype ty = ty_i ? MHA_BF16 : MHA_F16;
        double worst = 0;
        mha_run run;
        int n;
        memset(&o, 0, sizeof o);
        o.kv_dtype = ty; o.causal = 1; o.num_threads = 2;
        CHECK(mha_module_plan(&m, B, CH, CAP, &o, MHA_PLAN_CACHE | MHA_PLAN_PACK, NULL, 0, &p, NULL) == MHA_OK,
              "module plan with a 16-bit cache");
        cache_init(&c, B, HKV, D, CAP, ty, 0, 0);
        memset(&run, 0, sizeof run);
        run.cache = &c;
        for (t = 0; t < CAP; t += n) {
            int i0;
            n = t == 0 ? CH : 1;
            tu_fill(&r, x, (size_t)n * E, 1.0f);
            CHECK(mha_module_run_forward(p, n, 0, x, NULL, NULL, out, &run, NULL) == MHA_OK, "step at %d", t);
            for (i0 = 0; i0 < n; ++i0) {   /* token t + i0 sees keys 0..t + i0 */
                double qd[E], ctx[E], ref[E], s[CAP], mx, sum, e;
                int h, j, d, i, last = t + i0;
                for (i = 0; i < E; ++i) {
                    qd[i] = bin[i];
                    for (d = 0; d < E; ++d) qd[i] += (double)win[i * E + d] * x[i0 * E + d];
                }
                for (h = 0; h < H; ++h) {
                    int g = h / (H / HKV);
                    const uint16_t *kc = (const uint16_t *)c.k + (size_t)g * CAP * D;
                    const uint16_t *vc = (const uint16_t *)c.v + (size_t)g * CAP * D;
                    mx = -INFINITY;
                    for (j = 0; j <= last; ++j) {
                        s[j] = 0;
                        for (d = 0; d < D; ++d) s[j] += qd[h * D + d] * ref_value(kc[j * D + d], ty);
                        s[j] /= sqrt((double)D);
                        if (s[j] > mx) mx = s[j];
                    }
                    for (sum = 0, j = 0; j <= last; ++j) sum += (s[j] = exp(s[j] - mx));
                    for (d = 0; d < D; ++d) {
                        ctx[h * D + d] = 0;
                        for (j = 0; j <= last; ++j) ctx[h * D + d] += s[j] / sum * ref_value(vc[j * D + d], ty);
                    }
                }
                for (i = 0; i < E; ++i) {
                    ref[i] = bo[i];
                    for (d = 0; d < E; ++d) ref[i] += (double)wo[i * E + d] * ctx[d];
                }
                e = tu_rel_err(out + i0 * E, ref, E);
                if (e > worst) worst = e;
            }
        }
        CHECK(worst <= TOL, "%s module prefill and decoding against float64: %.2e", ty == MHA_F16 ? "F16" : "BF16",
              worst);
        mha_plan_destroy(p);
        /* an SDPA chunk of 7 queries over the full cache (the tiled path), against float32 K/V of the same values */
        {
            enum { LQ = 7 };
            float q[H * LQ * D], o16[H * LQ * D], o32[H * LQ * D];
            float *kw = alloc_f((size_t)HKV * CAP * D), *vw = alloc_f((size_t)HKV * CAP * D);
            size_t i;
            mha_options so;
            mha_run sr;
            tu_fill(&r, q, sizeof q / 4, 1.0f);
            for (i = 0; i < (size_t)HKV * CAP * D; ++i) {
                kw[i] = (float)ref_value(((const uint16_t *)c.k)[i], ty);
                vw[i] = (float)ref_value(((const uint16_t *)c.v)[i], ty);
            }
            memset(&so, 0, sizeof so);
            so.causal = 1; so.num_threads = 2;   /* one shot: the cache's type */
            memset(&sr, 0, sizeof sr);
            sr.cache = &c;
            CHECK(mha_sdpa_forward(B, H, LQ, 0, D, D, q, NULL, NULL, &so, o16, &sr, NULL) == MHA_OK, "sdpa chunk");
            so.num_kv_heads = HKV; so.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
            CHECK(mha_sdpa_forward(B, H, LQ, CAP, D, D, q, kw, vw, &so, o32, NULL, NULL) == MHA_OK, "sdpa dense");
            CHECK(tu_rel_err_ff(o16, o32, sizeof o16 / 4) <= 1e-6, "%s: an SDPA chunk over the cache against dense "
                  "float32 K/V of the same values: %.2e", ty == MHA_F16 ? "F16" : "BF16",
                  tu_rel_err_ff(o16, o32, sizeof o16 / 4));
            free(kw); free(vw);
        }
        cache_free(&c);
    }
}

/* PyTorch's attention over 16-bit keys and values, and what the rounding
   of storage costs against float32 K and V (printed for the docs). */
static void test_golden_attention(const gold_file *g)
{
    int i, n = 0;
    double worst = 0, cost[3] = {0, 0, 0};
    for (i = 0; i < g->ncases; ++i) {
        const gold_case *c = &g->cases[i];
        const int *p = c->p;
        const gold_array *q, *k16, *v16, *out, *o32;
        float *o;
        mha_options opt;
        double e;
        size_t no;
        if (p[0] != 1) continue;
        q = gold_find(c, "q"); k16 = gold_find(c, "k16"); v16 = gold_find(c, "v16");
        out = gold_find(c, "out"); o32 = gold_find(c, "out_f32");
        CHECK(q && k16 && v16 && out && o32, "%s: arrays missing", c->name);
        if (!(q && k16 && v16 && out && o32)) continue;
        no = out->count;
        o = alloc_f(no);
        memset(&opt, 0, sizeof opt);
        opt.kv_dtype = (mha_dtype)p[1]; opt.num_kv_heads = p[4];
        opt.causal = p[9] != 0; opt.causal_align = p[9] == 2 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
        CHECK(mha_sdpa_forward(p[2], p[3], p[5], p[6], p[7], p[8], q->f32, k16->u16, v16->u16, &opt, o, NULL,
                               NULL) == MHA_OK, "%s: forward", c->name);
        e = tu_rel_err(o, out->f64, no);
        if (e > worst) worst = e;
        CHECK(e <= TOL, "%s: against PyTorch %.2e", c->name, e);
        e = tu_rel_err(o, o32->f64, no);
        if (e > cost[p[1]]) cost[p[1]] = e;
        free(o);
        ++n;
    }
    CHECK(n == 10, "%d golden attention cases", n);
    printf("NOTE against PyTorch (16-bit K/V, float64 math): %.2e over %d cases\n", worst, n);
    printf("NOTE storage rounding, against float32 K/V in float64: F16 %.2e, BF16 %.2e (relative, ||.||2)\n",
           cost[1], cost[2]);
}

/* The held-out checks of issue 9 (tests/golden/decode.bin: PyTorch's
   float64 attention with GQA, windows, soft-capping, ALiBi, sinks) run
   with K and V stored in each 16-bit type, against the float32 reference
   at the type's tolerance: 4 u, u the unit roundoff of the type (F16
   2^-11, BF16 2^-8).  Rounding each K and V element by at most u moves
   each score and each value by at most u relatively, so the output moves
   by a small multiple of u; 4 u leaves room for the sums of the cases
   (measured: printed as a NOTE).  Fused and unfused paths both. */
static void test_heldout_decode(const gold_file *gf)
{
    static const double tol[3] = {0.0, 4.0 / 2048.0, 4.0 / 256.0};
    double worst[3] = {0, 0, 0};
    int ci, ty, n = 0;
    for (ci = 0; ci < gf->ncases; ++ci) {
        const gold_case *g = &gf->cases[ci];
        const int *p = g->p;   /* B H Hkv Lq Lk D Dv causal window left right alibi sinks grad kind */
        const gold_array *q = gold_find(g, "q"), *k = gold_find(g, "k"), *v = gold_find(g, "v");
        const gold_array *out = gold_find(g, "out"), *cap = gold_find(g, "softcap");
        const gold_array *sl = gold_find(g, "slopes"), *sk = gold_find(g, "sinks");
        if (p[14] != 0) continue;   /* attention cases only */
        if (!q || !k || !v || !out) { CHECK(0, "%s: arrays missing", g->name); continue; }
        for (ty = 1; ty <= 2; ++ty) {
            uint16_t *k16 = (uint16_t *)malloc(k->count * 2), *v16 = (uint16_t *)malloc(v->count * 2);
            float *o = alloc_f(out->count), *w = alloc_f((size_t)p[0] * p[1] * p[3] * p[4]);
            mha_options opt;
            mha_run run;
            int pass;
            memset(&opt, 0, sizeof opt);
            opt.kv_dtype = (mha_dtype)ty; opt.num_kv_heads = p[2];
            opt.causal = p[7] == 1 || p[7] == 2;
            opt.causal_align = p[7] >= 2 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
            opt.window = p[8]; opt.window_left = p[9]; opt.window_right = p[10];
            opt.softcap = cap ? cap->f32[0] : 0.0f;
            opt.alibi = p[11] != 0; opt.alibi_slopes = p[11] == 2 && sl ? sl->f32 : NULL;
            opt.sinks = p[12] && sk ? sk->f32 : NULL;
            opt.scale = g->scale;
            (void)mha_convert(k->count, MHA_F32, k->f32, (mha_dtype)ty, k16, NULL);
            (void)mha_convert(v->count, MHA_F32, v->f32, (mha_dtype)ty, v16, NULL);
            for (pass = 0; pass < 2; ++pass) {   /* fused, then with the weights (unfused) */
                double e;
                memset(&run, 0, sizeof run);
                run.weights = pass ? w : NULL;
                CHECK(mha_sdpa_forward(p[0], p[1], p[3], p[4], p[5], p[6], q->f32, k16, v16, &opt, o, &run,
                                       NULL) == MHA_OK, "%s: forward", g->name);
                e = tu_rel_err(o, out->f64, out->count);
                if (e > worst[ty]) worst[ty] = e;
                CHECK(e <= tol[ty], "%s with %s K/V (%s): %.2e > %.2e", g->name, ty == 1 ? "F16" : "BF16",
                      pass ? "unfused" : "fused", e, tol[ty]);
            }
            free(k16); free(v16); free(o); free(w);
        }
        ++n;
    }
    CHECK(n >= 10, "%d held-out attention cases", n);
    printf("NOTE held-out decoder cases (%d, PyTorch float64 on float32 K/V) with 16-bit K/V: F16 %.2e "
           "(tolerance %.1e), BF16 %.2e (tolerance %.1e)\n", n, worst[1], tol[1], worst[2], tol[2]);
}

/* 16-bit weights: each weight rounded by at most u moves each projected
   value by at most u times sum |w x| / |sum w x|, a few u for these
   random inputs; the held-out modules run at 4u, as the K/V cases (F16
   2.0e-3, BF16 1.6e-2), and measure under 1u (printed as a NOTE). */
#define W16_TOL(ty) ((ty) == 1 ? 4.0 / 2048.0 : 4.0 / 256.0)
/* ---- 16-bit projection weights (mha_module.weight_dtype) */

/* A module plan of 16-bit weights (MHA_PLAN_PACK: widened as packed) runs
   bit for bit as a plan of the float32 weights holding the widened values:
   the fused forward, the weights (unfused), chosen rows, decoding over a
   cache, and after mha_plan_repack. */
static void test_weights16(void)
{
    enum { E = 48, H = 6, HKV = 2, D = E / H, EKV = HKV * D, B = 2, L = 13, NW = (E + 2 * EKV) * E + E * E };
    float w32[NW], b_in[E + 2 * EKV], bo[E], x[B * L * E], o16[B * L * E], o32[B * L * E];
    float wt16[B * L * L], wt32[B * L * L];
    uint16_t w16[NW];
    int ty_i, layout;
    tu_rng r = {404};
    tu_fill(&r, b_in, sizeof b_in / 4, 0.1f); tu_fill(&r, bo, sizeof bo / 4, 0.1f);
    tu_fill(&r, x, sizeof x / 4, 1.0f);
    for (ty_i = 0; ty_i < 2; ++ty_i)
        for (layout = 0; layout < 2; ++layout) {
            mha_dtype ty = ty_i ? MHA_BF16 : MHA_F16;
            mha_module m16, m32;
            mha_options o;
            mha_plan *p16 = NULL, *p32 = NULL;
            mha_run run;
            int rows[2] = {0, L - 1}, same = 1;
            size_t i, wo_at = (size_t)(E + 2 * EKV) * E;
            unsigned flags = MHA_PLAN_PACK | MHA_PLAN_WEIGHTS | MHA_PLAN_ROWS;
            tu_fill(&r, w32, NW, 0.3f);
            (void)mha_convert(NW, MHA_F32, w32, ty, w16, NULL);
            for (i = 0; i < NW; ++i) w32[i] = (float)ref_value(w16[i], ty);   /* the widened values */
            memset(&m16, 0, sizeof m16);
            m16.embed_dim = E; m16.num_heads = H; m16.num_kv_heads = HKV;
            m16.in_proj_bias = b_in; m16.out_proj_bias = bo;
            m32 = m16;
            if (layout == 0) {
                m16.in_proj_weight = w16; m32.in_proj_weight = w32;
            } else {   /* separate q, k, v weights */
                m16.q_proj_weight = w16; m16.k_proj_weight = w16 + (size_t)E * E;
                m16.v_proj_weight = w16 + (size_t)(E + EKV) * E;
                m32.q_proj_weight = w32; m32.k_proj_weight = w32 + (size_t)E * E;
                m32.v_proj_weight = w32 + (size_t)(E + EKV) * E;
            }
            m16.out_proj_weight = w16 + wo_at; m32.out_proj_weight = w32 + wo_at;
            m16.weight_dtype = ty;
            memset(&o, 0, sizeof o);
            o.causal = 1; o.num_threads = 2;
            CHECK(mha_module_plan(&m16, B, L, L, &o, flags, NULL, 0, &p16, NULL) == MHA_OK &&
                  mha_module_plan(&m32, B, L, L, &o, flags, NULL, 0, &p32, NULL) == MHA_OK, "plans");
            if (!p16 || !p32) continue;
            memset(&run, 0, sizeof run);
            (void)mha_module_run_forward(p16, L, L, x, x, x, o16, &run, NULL);
            (void)mha_module_run_forward(p32, L, L, x, x, x, o32, &run, NULL);
            same &= memcmp(o16, o32, sizeof o16) == 0;
            run.weights = wt16;
            (void)mha_module_run_forward(p16, L, L, x, x, x, o16, &run, NULL);
            run.weights = wt32;
            (void)mha_module_run_forward(p32, L, L, x, x, x, o32, &run, NULL);
            same &= memcmp(o16, o32, sizeof o16) == 0 && memcmp(wt16, wt32, sizeof wt16) == 0;
            run.rows = rows; run.n_rows = 2; run.weights = wt16;
            (void)mha_module_run_forward(p16, L, L, x, x, x, o16, &run, NULL);
            run.weights = wt32;
            (void)mha_module_run_forward(p32, L, L, x, x, x, o32, &run, NULL);
            same &= memcmp(o16, o32, sizeof o16) == 0 && memcmp(wt16, wt32, (size_t)B * 2 * L * 4) == 0;
            CHECK(same, "%s weights (%s): forward, weights and rows differ from float32 weights of the same values",
                  ty == MHA_F16 ? "F16" : "BF16", layout ? "q/k/v_proj_weight" : "in_proj_weight");
            /* the weights change: repack reads them again */
            for (i = 0; i < NW; ++i) { w16[i] ^= 0x8000; w32[i] = -w32[i]; }
            CHECK(mha_plan_repack(p16, NULL) == MHA_OK && mha_plan_repack(p32, NULL) == MHA_OK, "repack");
            memset(&run, 0, sizeof run);
            (void)mha_module_run_forward(p16, L, L, x, x, x, o16, &run, NULL);
            (void)mha_module_run_forward(p32, L, L, x, x, x, o32, &run, NULL);
            CHECK(memcmp(o16, o32, sizeof o16) == 0, "after mha_plan_repack");
            mha_plan_destroy(p16); mha_plan_destroy(p32);
            /* decoding: a 16-bit cache and 16-bit weights */
            if (layout == 0) {
                mha_kv_cache c16, c32;
                int t;
                o.kv_dtype = ty;
                CHECK(mha_module_plan(&m16, 1, 1, 8, &o, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &p16, NULL) == MHA_OK &&
                      mha_module_plan(&m32, 1, 1, 8, &o, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &p32, NULL) == MHA_OK,
                      "decoding plans");
                cache_init(&c16, 1, HKV, D, 8, ty, 0, 0);
                cache_init(&c32, 1, HKV, D, 8, ty, 0, 0);
                for (t = 0, same = 1; t < 8; ++t) {
                    run.cache = &c16;
                    (void)mha_module_run_forward(p16, 1, 0, x + t * E, NULL, NULL, o16, &run, NULL);
                    run.cache = &c32;
                    (void)mha_module_run_forward(p32, 1, 0, x + t * E, NULL, NULL, o32, &run, NULL);
                    same &= memcmp(o16, o32, E * 4) == 0;
                }
                CHECK(same && c16.len[0] == 8, "%s weights: decoding differs from float32 weights of the same values",
                      ty == MHA_F16 ? "F16" : "BF16");
                cache_free(&c16); cache_free(&c32);
                mha_plan_destroy(p16); mha_plan_destroy(p32);
                o.kv_dtype = MHA_F32;
            }
            if (layout == 0 && ty_i == 0) {   /* refusals: the field is named, nothing is written */
                mha_error e;
                mha_encoder_layer ly = mha_encoder_layer_defaults();
                mha_status s;
                memcpy(o32, o16, sizeof o16);
                s = mha_module_forward(&m16, B, L, L, x, x, x, &o, o16, NULL, &e);
                CHECK(s == MHA_ERR_INVALID_ARGUMENT && e.field && !strcmp(e.field, "m->weight_dtype") &&
                      memcmp(o16, o32, sizeof o16) == 0, "one shot with 16-bit weights: %s", e.message);
                s = mha_module_plan(&m16, B, L, L, &o, MHA_PLAN_PACK | MHA_PLAN_TRAINING, NULL, 0, &p16, &e);
                CHECK(s == MHA_ERR_INVALID_ARGUMENT && e.field && !strcmp(e.field, "m->weight_dtype"),
                      "16-bit weights for training: %s", e.message);
                m16.weight_dtype = (mha_dtype)5;
                s = mha_module_plan(&m16, B, L, L, &o, MHA_PLAN_PACK, NULL, 0, &p16, &e);
                CHECK(s == MHA_ERR_BAD_ENUM && e.field && !strcmp(e.field, "m->weight_dtype"), "weight_dtype 5: %s",
                      e.message);
                ly.self_attn = m16;
                ly.self_attn.weight_dtype = MHA_F16;
                ly.dim_feedforward = 4;   /* the rest is valid: the refusal is about the weights' type */
                ly.linear1_weight = w32; ly.linear1_bias = w32; ly.linear2_weight = w32; ly.linear2_bias = w32;
                ly.norm1_weight = w32; ly.norm1_bias = w32; ly.norm2_weight = w32; ly.norm2_bias = w32;
                s = mha_encoder_forward(&ly, B, L, x, &o, o16, NULL, &e);
                CHECK(s == MHA_ERR_INVALID_ARGUMENT && e.field && !strcmp(e.field, "layer->self_attn.weight_dtype"),
                      "an encoder with 16-bit weights: %s", e.message);
            }
        }
}

/* Issue 9's decoder modules (decode.bin: GQA projections, RoPE, causal)
   with their weights stored in 16 bits, against PyTorch's float64 on the
   float32 weights: what storing weights in 16 bits costs. */
static void test_heldout_weights16(const gold_file *gf)
{
    double worst[3] = {0, 0, 0};
    int ci, ty, n = 0;
    for (ci = 0; ci < gf->ncases; ++ci) {
        const gold_case *g = &gf->cases[ci];
        const int *p = g->p;   /* module cases: B H Hkv L E rotary_dim position_offset causal ... kind 2 */
        static const char *wn[4] = {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"};
        const gold_array *x = gold_find(g, "x"), *out = gold_find(g, "out"), *th = gold_find(g, "theta");
        const gold_array *bi = gold_find(g, "in_proj_bias"), *bo = gold_find(g, "out_proj.bias"), *w[4];
        int k, B, L, E;
        if (p[14] != 2) continue;
        for (k = 0; k < 4; ++k) w[k] = gold_find(g, wn[k]);
        if (!x || !out || !bi || !bo || !w[0] || !w[1] || !w[2] || !w[3]) { CHECK(0, "%s: arrays", g->name); continue; }
        B = p[0]; L = p[3]; E = p[4];
        for (ty = 1; ty <= 2; ++ty) {
            uint16_t *h[4];
            float *o = alloc_f((size_t)B * L * E);
            mha_module m;
            mha_options opt;
            mha_plan *pl = NULL;
            double e;
            for (k = 0; k < 4; ++k) {
                h[k] = (uint16_t *)malloc(w[k]->count * 2);
                (void)mha_convert(w[k]->count, MHA_F32, w[k]->f32, (mha_dtype)ty, h[k], NULL);
            }
            memset(&m, 0, sizeof m); memset(&opt, 0, sizeof opt);
            m.embed_dim = E; m.num_heads = p[1]; m.num_kv_heads = p[2]; m.weight_dtype = (mha_dtype)ty;
            m.q_proj_weight = h[0]; m.k_proj_weight = h[1]; m.v_proj_weight = h[2]; m.out_proj_weight = h[3];
            m.in_proj_bias = bi->f32; m.out_proj_bias = bo->f32;
            m.rope.kind = (mha_rope_kind)p[15]; m.rope.rotary_dim = p[5]; m.rope.theta = th ? th->f32[0] : 0.0f;
            opt.position_offset = p[6];
            opt.causal = 1; opt.causal_align = p[7] == 2 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
            CHECK(mha_module_plan(&m, B, L, L, &opt, MHA_PLAN_PACK, NULL, 0, &pl, NULL) == MHA_OK &&
                  mha_module_run_forward(pl, L, L, x->f32, x->f32, x->f32, o, NULL, NULL) == MHA_OK,
                  "%s: 16-bit weights forward", g->name);
            e = tu_rel_err(o, out->f64, out->count);
            if (e > worst[ty]) worst[ty] = e;
            CHECK(e <= W16_TOL(ty), "%s with %s weights: %.2e > %.2e", g->name, ty == 1 ? "F16" : "BF16", e,
                  W16_TOL(ty));
            mha_plan_destroy(pl);
            for (k = 0; k < 4; ++k) free(h[k]);
            free(o);
        }
        ++n;
    }
    CHECK(n >= 3, "%d held-out module cases", n);
    printf("NOTE held-out decoder modules (%d) with 16-bit weights, against PyTorch float64 on float32 weights: "
           "F16 %.2e (tolerance %.1e), BF16 %.2e (tolerance %.1e)\n", n, worst[1], W16_TOL(1), worst[2], W16_TOL(2));
}

/* Refusals name the field; nothing is written. */
static void test_refusals(void)
{
    float q[8] = {0}, out[8], k[8] = {0}, v[8] = {0}, sent[8];
    mha_options o;
    mha_error e;
    mha_kv_cache c;
    mha_run run;
    mha_plan *p = NULL;
    mha_status s;
    memset(&o, 0, sizeof o);
    memset(out, 0x5a, sizeof out); memcpy(sent, out, sizeof out);
    o.kv_dtype = (mha_dtype)3;
    s = mha_sdpa_forward(1, 1, 2, 2, 2, 2, q, k, v, &o, out, NULL, &e);
    CHECK(s == MHA_ERR_BAD_ENUM && e.field && strcmp(e.field, "opt->kv_dtype") == 0, "kv_dtype 3: %s", e.message);
    o.kv_dtype = MHA_F16;
    s = mha_sdpa_backward(1, 1, 2, 2, 2, 2, q, k, v, q, &o, out, NULL, NULL, NULL, &e);
    CHECK(s == MHA_ERR_INVALID_ARGUMENT && e.field && strcmp(e.field, "opt->kv_dtype") == 0,
          "a 16-bit backward: %s", e.message);
    CHECK(memcmp(out, sent, sizeof out) == 0, "a refusal wrote out");
    /* a cache of another type than the plan's */
    cache_init(&c, 1, 1, 2, 4, MHA_BF16, 0, 0);
    c.len[0] = 1;
    o.kv_dtype = MHA_F16;
    CHECK(mha_sdpa_plan(1, 1, 1, 4, 2, 2, &o, MHA_PLAN_CACHE, NULL, 0, &p, NULL) == MHA_OK, "plan");
    memset(&run, 0, sizeof run);
    run.cache = &c;
    s = mha_sdpa_run_forward(p, 1, 0, q, NULL, NULL, out, &run, &e);
    CHECK(s == MHA_ERR_DTYPE && e.field && strcmp(e.field, "cache->dtype") == 0, "cache type: %s", e.message);
    CHECK(memcmp(out, sent, sizeof out) == 0, "a refusal wrote out");
    /* the one shot takes the cache's type, unless the options name another */
    o.kv_dtype = MHA_F16;
    s = mha_sdpa_forward(1, 1, 1, 0, 2, 2, q, NULL, NULL, &o, out, &run, &e);
    CHECK(s == MHA_ERR_DTYPE, "one shot, options F16 over a BF16 cache: %s", e.message);
    o.kv_dtype = MHA_F32;
    s = mha_sdpa_forward(1, 1, 1, 0, 2, 2, q, NULL, NULL, &o, out, &run, &e);
    CHECK(s == MHA_OK, "one shot over a BF16 cache, options F32 (the default): %s", e.message);
    c.dtype = (mha_dtype)9;
    s = mha_kv_cache_append(&c, 1, k, v, &e);
    CHECK(s == MHA_ERR_BAD_ENUM && e.field && strcmp(e.field, "cache->dtype") == 0, "cache dtype 9: %s", e.message);
    CHECK(c.len[0] == 1, "a refused append moved len");
    mha_plan_destroy(p);
    cache_free(&c);
}

int main(void)
{
    gold_file g;
    char err[256];
    printf("kernels: %s\n", mha_kernels());
    test_conversions();
    test_attention();
    test_nan();
    test_cache();
    test_module_decode();
    test_refusals();
    test_weights16();
    if (gold_load("tests/golden/decode.bin", &g, err, sizeof err)) {   /* issue 9's held-out cases */
        test_heldout_decode(&g);
        test_heldout_weights16(&g);
        gold_free(&g);
    } else {
        CHECK(0, "%s", err);
    }
    if (gold_load("tests/golden/dtype.bin", &g, err, sizeof err)) {
        CHECK(g.ncases == 11 && g.cases[0].p[0] == 0, "dtype.bin: %d cases", g.ncases);
        test_golden_conversions(&g.cases[0]);
        test_golden_attention(&g);
        gold_free(&g);
    } else {
        CHECK(0, "%s", err);
    }
    return tu_finish("test_dtype");
}
