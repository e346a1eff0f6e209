/* GEMM against a float64 reference (ref_gemm, tests/ref.h): every
   transpose, odd and prime sizes, alpha/beta (beta = 0 must not read C),
   leading dimensions above the minimum, the workspace contract, argument
   errors (with the field they name), the plan, and bit-identical results
   for any thread count.  The blocked kernel, the threaded GEMM, the
   prepacked B and the projection helper are tested white box through
   their internals (mha__gemm, mha__gemm_mt_pp, mha__prepack_b,
   mha__linear, ...). */
/* white-box: this test names the kernels of the compile-time tier (the
   kernel tiers, mha.h section 0), so it pins them */
#ifndef MHA_NO_DISPATCH
#define MHA_NO_DISPATCH
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "ref.h"
#include <stdlib.h>
#include <string.h>

static tu_rng rng = {0x9e3779b97f4a7c15ULL};
static double worst = 0.0;

/* One call of the public mha_gemm checked against the reference.  pad: extra
   leading-dimension floats; the padding of C must be left alone. */
static void check(int ta, int tb, int M, int N, int K, float alpha, float beta, int pad)
{
    int lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
    size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
    float *A = (float *)malloc(na * sizeof(float)), *B = (float *)malloc(nb * sizeof(float));
    float *C = (float *)malloc(nc * sizeof(float)), *C0 = (float *)malloc(nc * sizeof(float));
    float *got = (float *)malloc((size_t)M * N * sizeof(float));
    double *R = (double *)malloc((size_t)M * N * sizeof(double));
    size_t i;
    int r, ok_pad = 1, finite = 1;
    double e;
    mha_error err;
    mha_status st;
    tu_fill(&rng, A, na, 1.0f);
    tu_fill(&rng, B, nb, 1.0f);
    tu_fill(&rng, C, nc, 1.0f);
    if (beta == 0.0f) for (i = 0; i < nc; i += 3) C[i] = NAN;   /* must never be read */
    for (r = 0; r < M; ++r) for (i = (size_t)N; i < (size_t)ldc; ++i) C[(size_t)r * ldc + i] = 1234.5f;
    memcpy(C0, C, nc * sizeof(float));
    ref_gemm(ta, tb, M, N, K, alpha, A, (size_t)lda, B, (size_t)ldb, beta, C0, (size_t)ldc, R);
    st = mha_gemm((mha_trans)ta, (mha_trans)tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL, &err);
    CHECK(st == MHA_OK, "mha_gemm: %s", err.message);
    for (r = 0; r < M; ++r) {
        memcpy(got + (size_t)r * N, C + (size_t)r * ldc, (size_t)N * sizeof(float));
        for (i = (size_t)N; i < (size_t)ldc; ++i) ok_pad &= C[(size_t)r * ldc + i] == 1234.5f;
    }
    for (i = 0; i < (size_t)M * N; ++i) finite &= got[i] - got[i] == 0.0f;
    e = tu_rel_err(got, R, (size_t)M * N);
    if (e > worst) worst = e;
    CHECK(e <= 1e-5, "ta=%d tb=%d M=%d N=%d K=%d alpha=%g beta=%g pad=%d: rel err %.3g",
          ta, tb, M, N, K, alpha, beta, pad, e);
    CHECK(finite, "non-finite output (beta=%g read C?) M=%d N=%d K=%d", beta, M, N, K);
    CHECK(ok_pad, "wrote into C's leading-dimension padding, M=%d N=%d K=%d", M, N, K);
    free(A); free(B); free(C); free(C0); free(got); free(R);
}

static void test_shapes(void)
{
    static const int small[] = {1, 2, 3, 5, 7, 13, 17, 31};
    static const int big[][3] = {
        {64, 64, 64}, {127, 130, 257}, {257, 127, 130}, {130, 257, 31}, {31, 130, 257},
        {64, 130, 64}, {130, 64, 130}, {300, 20, 600},   /* M > MC, K split in two */
        {3, 4200, 7},                                     /* N > NC */
    };
    const int ns = (int)(sizeof small / sizeof small[0]);
    int ta, tb, x, y, z, t;
    for (ta = 0; ta < 2; ++ta)
        for (tb = 0; tb < 2; ++tb) {
            for (x = 0; x < ns; ++x)
                for (y = 0; y < ns; ++y)
                    for (z = 0; z < ns; z += 2)
                        check(ta, tb, small[x], small[y], small[(z + x) % ns], 1.0f, 0.0f, (x + y) % 3);
            for (t = 0; t < (int)(sizeof big / sizeof big[0]); ++t)
                check(ta, tb, big[t][0], big[t][1], big[t][2], 1.0f, 0.0f, t % 2);
            /* alpha and beta: once on tiles, once across a full register tile and an edge */
            check(ta, tb, 7, 5, 3, -1.5f, 0.25f, 1);
            check(ta, tb, 31, 37, 29, 0.5f, 0.0f, 2);
            check(ta, tb, 31, 37, 29, 1.0f, 1.0f, 0);
            check(ta, tb, 31, 37, 29, 2.0f, -1.0f, 3);
            check(ta, tb, 19, 40, 300, 0.75f, 0.5f, 1);   /* beta once though K has two blocks */
        }
    printf("NOTE gemm (%s, MR=%d NR=%d): worst relative error %.3g\n", MHA__SIMD_NAME, MHA__MR, MHA__NR, worst);
}

/* A refused call: its status, and the field its error names (mha_gemm's
   unless what starts with "size": mha_gemm_plan_size's). */
static void refused(mha_status got, mha_status want, const mha_error *err, const char *field, const char *what)
{
    const char *fn = strncmp(what, "size", 4) == 0 ? "mha_gemm_plan_size" : "mha_gemm";
    CHECK(got == want && err->status == want && err->field && strcmp(err->field, field) == 0 &&
          err->function && strcmp(err->function, fn) == 0,
          "%s: status %d (want %d), field %s (want %s): %s", what, (int)got, (int)want,
          err->field ? err->field : "(null)", field, err->message);
}

static void test_workspace_and_errors(void)
{
    float A[6 * 5], B[5 * 4], C[6 * 4], C2[6 * 4], C3[6 * 4];
    size_t need, one = (mha__gemm_ws_floats(6, 4, 5) + MHA__ALIGN_FLOATS) * sizeof(float);
    mha_sizes sz;
    mha_run run;
    mha_error err;
    mha_status st;
    mha_plan *p = NULL;
    void *ws, *mem;
    int i;
#define GEMM(a_, lda_, c_, ldc_, run_) \
    mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 6, 4, 5, 1, a_, lda_, B, 4, 0, c_, ldc_, run_, &err)
    tu_fill(&rng, A, 30, 1.0f);
    tu_fill(&rng, B, 20, 1.0f);
    for (i = 0; i < 24; ++i) C[i] = C2[i] = C3[i] = (float)i;
    st = mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 6, 4, 5, 0, &sz, &err);
    CHECK(st == MHA_OK, "mha_gemm_plan_size: %s", err.message);
    need = sz.workspace;
    CHECK(need >= one && one > 0 && sz.saved == 0 && sz.plan > 0,
          "workspace size %zu (one thread %zu), saved %zu, plan %zu", need, one, sz.saved, sz.plan);
    ws = malloc(need);
    memset(&run, 0, sizeof run);
    run.workspace = ws;
    st = mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 0, 4, 5, 0, &sz, &err);
    refused(st, MHA_ERR_INVALID_SIZE, &err, "M", "size of M = 0");
    st = mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 6, 4, -1, 0, &sz, &err);
    refused(st, MHA_ERR_INVALID_SIZE, &err, "K", "size of K = -1");
    run.workspace_bytes = one - 1;
    refused(GEMM(A, 5, C, 4, &run), MHA_ERR_WORKSPACE_TOO_SMALL, &err, "run->workspace_bytes", "short workspace");
    run.workspace_bytes = 1;
    refused(GEMM(A, 5, C, 4, &run), MHA_ERR_WORKSPACE_TOO_SMALL, &err, "run->workspace_bytes", "1-byte workspace");
    CHECK(memcmp(C, C2, sizeof C) == 0, "C written on error");
    run.workspace_bytes = need;
    st = GEMM(A, 5, C, 4, &run);
    CHECK(st == MHA_OK, "exact workspace: %s", err.message);
    run.workspace_bytes = one;
    st = GEMM(A, 5, C2, 4, &run);
    CHECK(st == MHA_OK, "one-thread workspace: %s", err.message);
    CHECK(memcmp(C, C2, sizeof C) == 0, "result depends on the workspace size");
    /* the plan in the caller's memory, run with the workspace: the one shot's bits */
    st = mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 6, 4, 5, 1, &sz, &err);
    CHECK(st == MHA_OK, "mha_gemm_plan_size (1 thread): %s", err.message);
    mem = malloc(sz.plan);
    st = mha_gemm_plan(MHA_NO_TRANS, MHA_NO_TRANS, 6, 4, 5, 1, mem, sz.plan, &p, &err);
    CHECK(st == MHA_OK, "mha_gemm_plan: %s", err.message);
    run.workspace_bytes = sz.workspace;
    if (st == MHA_OK) {
        st = mha_gemm_run(p, 1, A, 5, B, 4, 0, C3, 4, &run, &err);
        CHECK(st == MHA_OK && memcmp(C, C3, sizeof C) == 0, "plan run differs from the one shot (%s)", err.message);
        st = mha_gemm_run(p, 1, A, 4, B, 4, 0, C3, 4, &run, &err);
        CHECK(st == MHA_ERR_INVALID_SIZE && err.field && strcmp(err.field, "lda") == 0 &&
              strcmp(err.function, "mha_gemm_run") == 0, "plan run with lda < K: %s", err.message);
    }
    free(mem);
    refused(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 0, 4, 5, 1, A, 5, B, 4, 0, C, 4, NULL, &err), MHA_ERR_INVALID_SIZE,
            &err, "M", "M = 0");
    refused(GEMM(A, 4, C, 4, NULL), MHA_ERR_INVALID_SIZE, &err, "lda", "lda < K");
    refused(mha_gemm(MHA_TRANS, MHA_NO_TRANS, 6, 4, 5, 1, A, 5, B, 4, 0, C, 4, NULL, &err), MHA_ERR_INVALID_SIZE,
            &err, "lda", "lda < M");
    refused(mha_gemm(MHA_NO_TRANS, MHA_TRANS, 6, 4, 5, 1, A, 5, B, 4, 0, C, 4, NULL, &err), MHA_ERR_INVALID_SIZE,
            &err, "ldb", "ldb < K");
    refused(GEMM(A, 5, C, 3, NULL), MHA_ERR_INVALID_SIZE, &err, "ldc", "ldc < N");
    refused(mha_gemm((mha_trans)2, MHA_NO_TRANS, 6, 4, 5, 1, A, 5, B, 4, 0, C, 4, NULL, &err), MHA_ERR_BAD_ENUM,
            &err, "ta", "ta = 2");
    refused(GEMM(NULL, 5, C, 4, NULL), MHA_ERR_NULL_POINTER, &err, "A", "A NULL");
    refused(GEMM(A, 5, NULL, 4, NULL), MHA_ERR_NULL_POINTER, &err, "C", "C NULL");
    run.workspace_bytes = need;
    run.lse = C3;   /* a field a GEMM cannot honour */
    refused(GEMM(A, 5, C, 4, &run), MHA_ERR_INVALID_ARGUMENT, &err, "run->lse", "run->lse on a GEMM");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 0, 4, 5, 1, A, 5, B, 4, 0, C, 4, NULL, NULL) == MHA_ERR_INVALID_SIZE,
          "refused without an error struct");
#undef GEMM
    free(ws);
}

/* The threaded GEMM (one shared packed B panel, row chunks handed out per
   panel) must give the same bits as the single-threaded one for 1-4 threads:
   odd shapes, every transpose, more than one K block and more than one NC
   column block (two B buffers), a few rows and many columns (the panel's
   columns are cut too), and prepacked B.  Each run gets exactly the planned
   workspace, with a guard band behind it that must stay untouched, and the
   shared layout is never larger than one private workspace per thread. */
static void test_threads(void)
{
    static const int shapes[][5] = {
        {200, 150, 100, 0, 1}, {77, 131, 260, 1, 0}, {40, 600, 90, 0, 0}, {600, 40, 90, 1, 1},
        {3, 700, 1100, 0, 1}, {1030, 37, 520, 1, 0}, {17, MHA__NC + 104, 40, 0, 0},
        {131, 97, 2 * MHA__KC + 7, 0, 1}, {9, 3000, 130, 1, 1}};
    const int ns = (int)(sizeof shapes / sizeof shapes[0]);
    int s, t, pre;
    for (s = 0; s < ns; ++s) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2], ta = shapes[s][3], tb = shapes[s][4];
        size_t nA = (size_t)M * K, nB = (size_t)K * N, nC = (size_t)M * N;
        float *A = (float *)malloc(nA * 4), *B = (float *)malloc(nB * 4);
        float *C1 = (float *)malloc(nC * 4), *Ct = (float *)malloc(nC * 4), *Cn = (float *)malloc(nC * 4);
        float *pw = (float *)malloc(mha__prepacked_floats(N, K) * 4);
        size_t wmax = mha__gemm_ws_floats_mt(M, N, K, 4);
        float *ws = (float *)malloc((wmax + 16 + 64) * 4);
        float *w = ws + (16 - ((uintptr_t)ws / 4) % 16) % 16;
        int i;
        tu_fill(&rng, A, nA, 1.0f);
        tu_fill(&rng, B, nB, 1.0f);
        tu_fill(&rng, C1, nC, 1.0f);
        memcpy(Ct, C1, nC * 4);
        mha__gemm(ta, tb, M, N, K, 0.5f, A, ta ? M : K, B, tb ? K : N, 0.25f, C1, N, w);
        if (tb) mha__prepack_b(B, N, K, pw);
        for (pre = 0; pre <= tb; ++pre)
            for (t = 1; t <= 4; ++t) {
                size_t need = mha__gemm_ws_floats_mt(M, N, K, t);
                int guard_ok = 1;
                CHECK(need <= (size_t)t * mha__gemm_ws_floats(M, N, K),
                      "%d threads: workspace %zu above %d private ones (M=%d N=%d K=%d)", t, need, t, M, N, K);
                for (i = 0; i < 64; ++i) w[need + (size_t)i] = -7.0f;
                memcpy(Cn, Ct, nC * 4);
                mha__gemm_mt_pp(ta, tb, M, N, K, 0.5f, A, ta ? M : K, B, tb ? K : N, 0.25f, Cn, N, w, t,
                                pre ? pw : NULL, 0);
                CHECK(memcmp(Cn, C1, nC * 4) == 0, "%d threads%s differ from 1 (M=%d N=%d K=%d)", t,
                      pre ? " (prepacked B)" : "", M, N, K);
                for (i = 0; i < 64; ++i) guard_ok &= w[need + (size_t)i] == -7.0f;
                CHECK(guard_ok, "%d threads wrote past the workspace (M=%d N=%d K=%d)", t, M, N, K);
            }
        free(A); free(B); free(C1); free(Ct); free(Cn); free(pw); free(ws);
    }
}

/* The blocked single-threaded kernel itself (mha__gemm, white box: the
   public call may thread it) against the float64 reference, with alpha and
   a nonzero beta. */
static void test_vs_reference(void)
{
    static const int shapes[][3] = {{1, 1, 1}, {13, 37, 29}, {70, 33, 130}};
    int s, ta, tb;
    for (s = 0; s < 3; ++s)
        for (ta = 0; ta < 2; ++ta)
            for (tb = 0; tb < 2; ++tb) {
                int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                size_t nA = (size_t)M * K, nB = (size_t)K * N, nC = (size_t)M * N;
                float *A = (float *)malloc(nA * 4), *B = (float *)malloc(nB * 4);
                float *C = (float *)malloc(nC * 4), *C0 = (float *)malloc(nC * 4);
                double *R = (double *)malloc(nC * sizeof(double));
                float *ws = (float *)malloc(mha__gemm_ws_floats(M, N, K) * 4 + 64);
                float *w = ws + (16 - ((uintptr_t)ws / 4) % 16) % 16;
                tu_fill(&rng, A, nA, 1.0f);
                tu_fill(&rng, B, nB, 1.0f);
                tu_fill(&rng, C, nC, 1.0f);
                memcpy(C0, C, nC * 4);
                mha__gemm(ta, tb, M, N, K, 1.5f, A, ta ? M : K, B, tb ? K : N, -0.5f, C, N, w);
                ref_gemm(ta, tb, M, N, K, 1.5, A, (size_t)(ta ? M : K), B, (size_t)(tb ? K : N), -0.5, C0,
                         (size_t)N, R);
                CHECK(tu_rel_err(C, R, nC) <= 1e-5, "mha__gemm vs float64: M=%d N=%d K=%d ta=%d tb=%d: %.3g",
                      M, N, K, ta, tb, tu_rel_err(C, R, nC));
                free(A); free(B); free(C); free(C0); free(R); free(ws);
            }
}

/* The projection helper: Y = X W^T + bias through the threaded GEMM, against
   float64, and the same bits for 1-4 threads. */
static void test_linear(void)
{
    const int rows = 300, in = 100, E = 96;   /* 2.9M multiply-adds: above the threading threshold */
    float *X = (float *)malloc((size_t)rows * in * 4), *W = (float *)malloc((size_t)E * in * 4);
    float *bias = (float *)malloc((size_t)E * 4), *Y1 = (float *)malloc((size_t)rows * E * 4);
    float *Yt = (float *)malloc((size_t)rows * E * 4);
    double *R = (double *)malloc((size_t)rows * E * sizeof(double));
    float *ws = (float *)malloc(mha__gemm_ws_floats_mt(rows, E, in, 4) * 4 + 64);
    float *w = ws + (16 - ((uintptr_t)ws / 4) % 16) % 16;
    int i, j, p, t;
    tu_fill(&rng, X, (size_t)rows * in, 1.0f);
    tu_fill(&rng, W, (size_t)E * in, 0.3f);
    tu_fill(&rng, bias, (size_t)E, 1.0f);
    for (i = 0; i < rows; ++i)
        for (j = 0; j < E; ++j) {
            double acc = bias[j];
            for (p = 0; p < in; ++p) acc += (double)X[(size_t)i * in + p] * W[(size_t)j * in + p];
            R[(size_t)i * E + j] = acc;
        }
    mha__linear(rows, in, E, X, W, bias, Y1, w, 1);
    CHECK(tu_rel_err(Y1, R, (size_t)rows * E) <= 1e-5, "linear: rel err %.3g", tu_rel_err(Y1, R, (size_t)rows * E));
    for (t = 2; t <= 4; ++t) {
        mha__linear(rows, in, E, X, W, bias, Yt, w, t);
        CHECK(memcmp(Yt, Y1, (size_t)rows * E * 4) == 0, "linear: %d threads differ from 1", t);
    }
    mha__linear(rows, in, E, X, W, NULL, Yt, w, 2);   /* no bias: beta = 0, Y never read */
    for (i = 0; i < rows; ++i)
        for (j = 0; j < E; ++j) R[(size_t)i * E + j] -= bias[j];
    CHECK(tu_rel_err(Yt, R, (size_t)rows * E) <= 1e-5, "linear without bias");
    free(X); free(W); free(bias); free(Y1); free(Yt); free(R); free(ws);
}

int main(void)
{
    test_shapes();
    test_vs_reference();
    test_workspace_and_errors();
    test_threads();
    test_linear();
    return tu_finish("gemm");
}
