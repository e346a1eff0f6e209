/* The kernels a build with no SIMD flags runs, against a -march=native build
   of the same program (make bench-tiers builds both and runs them in turn,
   A B B A, so drift on a shared machine falls on both).  Each case prints
   one line, "case NAME MEDIAN_MS", plus the kernels that ran; the Makefile's
   summary divides the two builds' medians.  Cases: the GEMM, module
   forward and decode rows of make bench, one thread.
       ./bench_tiers [--reps N]  */
#define _POSIX_C_SOURCE 199309L
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void fill(float *x, size_t n, unsigned seed)
{
    size_t i;
    unsigned s = seed * 2654435761u + 1u;
    for (i = 0; i < n; ++i) { s = s * 1664525u + 1013904223u; x[i] = (float)(s >> 8) / 8388608.0f - 1.0f; }
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *name, double *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp);
    printf("case %-28s %10.4f\n", name, 1e3 * t[n / 2]);
}

static void die(const char *what, const mha_error *e)
{
    fprintf(stderr, "bench_tiers: %s: %s\n", what, e->message);
    exit(1);
}

/* C [n, n] = A B^T, one thread */
static void gemm_case(int n, int reps)
{
    float *A = (float *)malloc(sizeof(float) * (size_t)n * n), *B = (float *)malloc(sizeof(float) * (size_t)n * n),
          *C = (float *)malloc(sizeof(float) * (size_t)n * n);
    double t[64];
    char name[64];
    mha_plan *p;
    mha_run run = {0};
    mha_sizes sz;
    mha_error e;
    int r;
    fill(A, (size_t)n * n, 1); fill(B, (size_t)n * n, 2);
    if (mha_gemm_plan(MHA_NO_TRANS, MHA_TRANS, n, n, n, 1, NULL, 0, &p, &e) != MHA_OK) die("gemm plan", &e);
    (void)mha_plan_sizes(p, &sz, NULL);
    run.workspace = malloc(sz.workspace); run.workspace_bytes = sz.workspace;
    for (r = -1; r < reps; ++r) {
        double t0 = now_s();
        if (mha_gemm_run(p, 1.0f, A, n, B, n, 0.0f, C, n, &run, &e) != MHA_OK) die("gemm", &e);
        if (r >= 0) t[r] = now_s() - t0;
    }
    snprintf(name, sizeof name, "gemm_%d", n);
    report(name, t, reps);
    mha_plan_destroy(p); free(run.workspace); free(A); free(B); free(C);
}

/* self-attention module forward, [B, L, E], H heads, packed plan, one thread */
static void forward_case(int B, int L, int E, int H, int reps)
{
    size_t n = (size_t)B * L * E;
    float *x = (float *)malloc(sizeof(float) * n), *y = (float *)malloc(sizeof(float) * n);
    float *w = (float *)malloc(sizeof(float) * (size_t)4 * E * E), *b = (float *)calloc((size_t)4 * E, sizeof(float));
    double t[64];
    char name[64];
    mha_module m;
    mha_options opt;
    mha_plan *p;
    mha_run run = {0};
    mha_sizes sz;
    mha_error e;
    int r;
    fill(x, n, 3); fill(w, (size_t)4 * E * E, 4);
    memset(&m, 0, sizeof m); memset(&opt, 0, sizeof opt);
    m.embed_dim = E; m.num_heads = H;
    m.in_proj_weight = w; m.in_proj_bias = b; m.out_proj_weight = w + (size_t)3 * E * E; m.out_proj_bias = b + 3 * E;
    opt.num_threads = 1;
    if (mha_module_plan(&m, B, L, L, &opt, MHA_PLAN_WEIGHTS | MHA_PLAN_PACK, NULL, 0, &p, &e) != MHA_OK)
        die("module plan", &e);
    (void)mha_plan_sizes(p, &sz, NULL);
    run.workspace = malloc(sz.workspace); run.workspace_bytes = sz.workspace;
    for (r = -1; r < reps; ++r) {
        double t0 = now_s();
        if (mha_module_run_forward(p, L, L, x, x, x, y, &run, &e) != MHA_OK) die("module forward", &e);
        if (r >= 0) t[r] = now_s() - t0;
    }
    snprintf(name, sizeof name, "forward_B%d_L%d_E%d", B, L, E);
    report(name, t, reps);
    mha_plan_destroy(p); free(run.workspace); free(x); free(y); free(w); free(b);
}

/* one decoding step: Lq = 1 against Lk cached keys, H heads of D, Hkv KV heads */
static void decode_case(int H, int Hkv, int D, int Lk, int reps)
{
    size_t nkv = (size_t)Hkv * Lk * D;
    float *q = (float *)malloc(sizeof(float) * (size_t)H * D), *o = (float *)malloc(sizeof(float) * (size_t)H * D);
    float *k = (float *)malloc(sizeof(float) * nkv), *v = (float *)malloc(sizeof(float) * nkv);
    double t[64];
    char name[64];
    mha_options opt;
    mha_sizes sz;
    mha_run run = {0};
    mha_error e;
    int r;
    fill(q, (size_t)H * D, 5); fill(k, nkv, 6); fill(v, nkv, 7);
    memset(&opt, 0, sizeof opt);
    opt.num_threads = 1; opt.num_kv_heads = Hkv; opt.causal = 1; opt.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    if (mha_sdpa_plan_size(1, H, 1, Lk, D, D, &opt, 0, &sz, &e) != MHA_OK) die("sdpa size", &e);
    run.workspace = malloc(sz.workspace); run.workspace_bytes = sz.workspace;
    for (r = -1; r < reps; ++r) {
        double t0 = now_s();
        if (mha_sdpa_forward(1, H, 1, Lk, D, D, q, k, v, &opt, o, &run, &e) != MHA_OK) die("decode", &e);
        if (r >= 0) t[r] = now_s() - t0;
    }
    snprintf(name, sizeof name, "decode_H%d_Hkv%d_Lk%d", H, Hkv, Lk);
    report(name, t, reps);
    free(run.workspace); free(q); free(o); free(k); free(v);
}

int main(int argc, char **argv)
{
    int reps = 15;
    if (argc == 3 && !strcmp(argv[1], "--reps")) reps = atoi(argv[2]);
    if (reps < 1 || reps > 64) { fprintf(stderr, "usage: %s [--reps 1..64]\n", argv[0]); return 2; }
    printf("kernels %s\n", mha_kernels());
    gemm_case(512, reps);
    gemm_case(1024, reps);
    forward_case(2, 50, 256, 4, reps);
    forward_case(1, 512, 512, 8, reps);
    decode_case(32, 32, 128, 4096, reps);
    decode_case(32, 8, 128, 16384, reps);
    return 0;
}
