/* The kernel tiers (mha.h, "the kernel tiers"): mha_kernels() names the
   tier the documented rules pick for this build and CPU (and the cap of
   tests/tier_env.h in the dispatch configuration), and the GEMM of that
   tier, through the public call, matches a float64 product at odd and round
   sizes, every transpose, beta 0 and 1, one and two threads.  The dispatch
   configuration runs this once per tier the CPU has. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

static TU_UNUSED const char *tier_name(int t) { return t == 2 ? "avx512" : t == 1 ? "avx2" : "scalar"; }

/* The tier the rules in mha.h's CONFIGURATION pick. */
static const char *expected_kernels(void)
{
#if defined(MHA_NO_SIMD)
    return "scalar";
#elif defined(__aarch64__) && defined(__ARM_NEON)
    return "neon";
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    int ct = 0, best, cap = 2;
#if defined(__AVX512F__) && !defined(MHA_NO_AVX512)
    ct = 2;
#elif defined(__AVX2__) && defined(__FMA__)
    ct = 1;
#endif
    best = ct;
#if !defined(MHA_NO_DISPATCH) && defined(__FILE_NAME__)
    __builtin_cpu_init();
#if !defined(MHA_NO_AVX512)
    if (__builtin_cpu_supports("avx512f")) best = 2;
#endif
    if (best < 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
#endif
#if defined(MHA__FORCE_TIER)
    cap = MHA__FORCE_TIER;
#endif
    if (best > cap) best = cap;
    return tier_name(best < ct ? ct : best);
#else
    return "scalar";
#endif
}

/* C = alpha op(A) op(B) + beta C in float64 */
static void ref_gemm(int ta, int tb, int M, int N, int K, double alpha, const float *A, int lda,
                     const float *B, int ldb, double beta, const float *C0, int ldc, double *C)
{
    int i, j, p;
    for (i = 0; i < M; ++i)
        for (j = 0; j < N; ++j) {
            double s = 0;
            for (p = 0; p < K; ++p)
                s += (double)(ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p]) *
                     (double)(tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j]);
            C[(size_t)i * N + j] = alpha * s + beta * (double)C0[(size_t)i * ldc + j];
        }
}

int main(void)
{
    static const int sizes[] = {1, 3, 7, 17, 64, 130};
    const int ns = (int)(sizeof sizes / sizeof sizes[0]);
    const char *want = expected_kernels();
    tu_rng rng = {0x7133ULL};
    double worst = 0;
    int a, b, c, t, th;
    printf("NOTE kernels: %s\n", mha_kernels());
    CHECK(strcmp(mha_kernels(), want) == 0, "mha_kernels() is %s; the rules give %s", mha_kernels(), want);
    for (a = 0; a < ns; ++a)
        for (b = 0; b < ns; ++b)
            for (c = 0; c < ns; ++c)
                for (t = 0; t < 4; ++t) {
                    int M = sizes[a], N = sizes[b], K = sizes[c], ta = t & 1, tb = t >> 1;
                    int lda = ta ? M : K, ldb = tb ? K : N, ldc = N + 1;
                    float *A = (float *)malloc(sizeof(float) * (size_t)M * K);
                    float *B = (float *)malloc(sizeof(float) * (size_t)K * N);
                    float *C = (float *)malloc(sizeof(float) * (size_t)M * ldc);
                    float *C0 = (float *)malloc(sizeof(float) * (size_t)M * ldc);
                    double *R = (double *)malloc(sizeof(double) * (size_t)M * N);
                    double beta = (a + b + c + t) % 2 ? 1.0 : 0.0;
                    tu_fill(&rng, A, (size_t)M * K, 1.0f);
                    tu_fill(&rng, B, (size_t)K * N, 1.0f);
                    tu_fill(&rng, C0, (size_t)M * ldc, 1.0f);
                    ref_gemm(ta, tb, M, N, K, 0.75, A, lda, B, ldb, beta, C0, ldc, R);
                    for (th = 1; th <= 2; ++th) {
                        mha_plan *p = NULL;
                        mha_error err;
                        mha_status st;
                        double e = 0, den = 0;
                        int i, j, pad_ok = 1;
                        memcpy(C, C0, sizeof(float) * (size_t)M * ldc);
                        st = mha_gemm_plan(ta ? MHA_TRANS : MHA_NO_TRANS, tb ? MHA_TRANS : MHA_NO_TRANS, M, N, K,
                                           th, NULL, 0, &p, &err);
                        if (st == MHA_OK)
                            st = mha_gemm_run(p, 0.75f, A, lda, B, ldb, (float)beta, C, ldc, NULL, &err);
                        CHECK(st == MHA_OK, "gemm %dx%dx%d: %s", M, N, K, err.message);
                        for (i = 0; i < M; ++i)
                            for (j = 0; j < N; ++j) {
                                double d = C[(size_t)i * ldc + j] - R[(size_t)i * N + j];
                                e += d * d; den += R[(size_t)i * N + j] * R[(size_t)i * N + j];
                            }
                        e = den > 0 ? sqrt(e / den) : sqrt(e);
                        if (e > worst) worst = e;
                        CHECK(e <= 1e-5, "%s gemm ta %d tb %d M %d N %d K %d beta %g threads %d: rel err %.3g",
                              mha_kernels(), ta, tb, M, N, K, beta, th, e);
                        for (i = 0; i < M; ++i)   /* the padding column is never written */
                            pad_ok &= C[(size_t)i * ldc + N] == C0[(size_t)i * ldc + N];
                        CHECK(pad_ok, "%s gemm M %d N %d K %d threads %d: the ldc padding was written",
                              mha_kernels(), M, N, K, th);
                        mha_plan_destroy(p);
                    }
                    free(A); free(B); free(C); free(C0); free(R);
                }
    printf("NOTE worst rel err %.3g (%s kernels)\n", worst, mha_kernels());
    return tu_finish("tiers");
}
