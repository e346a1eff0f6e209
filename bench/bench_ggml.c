/* bench_ggml.c - one decoding step of mha.h beside ggml's CPU flash
   attention (ggml_flash_attn_ext), on the same inputs (issue 19, item 3).

   Built and run by `make bench-ggml GGML=<ggml source tree>`, where the tree
   has been built outside this repository with ggml's release settings:

       cmake -S $GGML -B $GGML/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
             -DGGML_LLAMAFILE=ON -DGGML_BLAS=OFF -DBUILD_SHARED_LIBS=OFF \
             -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
       cmake --build $GGML/build -j

   usage: bench_ggml [threads...]          default: 1 2

   Cases: Lq = 1, H = 32, D = 128, Hkv 32 (one query per K/V row: bound by
   the memory) and 8 (a group of 4), Lk 4096 and 16384.  Columns: ggml with
   f32 and f16 K/V, mha.h with f32, f16 and bf16 K/V.  f16 K/V are the same
   bits for both (IEEE half, rounded to nearest even by mha_convert).
   Method: every implementation is called in turn, repetition after
   repetition (7, each at least 0.1 s of calls), and the median is printed;
   the K/V inputs rotate through copies filling at least 256 MiB, so each
   call reads them from memory, as a decoder does.  GB/s = K and V bytes
   per call / time; %read = that against a plain read of a 1 GiB buffer on
   as many threads, measured in the same run.  Each output is checked
   against a float64 reference first.  */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ggml.h"
#include "ggml-cpu.h"

#define MHA_IMPLEMENTATION
#include "mha.h"

enum { NREP = 7, NIMPL = 5, MAXCOPY = 64 };
static const char *const impl_name[NIMPL] = {"ggml f32", "ggml f16", "mha f32", "mha f16", "mha bf16"};
static const mha_dtype impl_dt[NIMPL] = {MHA_F32, MHA_F16, MHA_F32, MHA_F16, MHA_BF16};

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *must(void *p)
{
    if (!p) { fprintf(stderr, "bench_ggml: out of memory\n"); exit(1); }
    return p;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* a plain read of n floats on nt threads, GB/s (the best of 5) */
static double read_bandwidth(int nt)
{
    const size_t n = (size_t)1 << 28;   /* 1 GiB */
    float *x = (float *)must(malloc(n * sizeof(float)));
    double best = 0.0;
    volatile float sink = 0.0f;
    size_t i;
    int r;
    for (i = 0; i < n; ++i) x[i] = (float)(i & 1023);
    for (r = 0; r < 5; ++r) {
        double t0 = wall(), t;
        float total = 0.0f;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(+ : total)
#endif
        {
            float acc[16] = {0};
            size_t lo = 0, hi = n / 16, j;
            int tid = 0, k, w = 1;
#ifdef _OPENMP
            tid = omp_get_thread_num(); w = omp_get_num_threads();
#endif
            lo = hi * (size_t)tid / (size_t)w * 16;
            hi = hi * (size_t)(tid + 1) / (size_t)w * 16;
            for (j = lo; j < hi; j += 16) for (k = 0; k < 16; ++k) acc[k] += x[j + k];
            for (k = 0; k < 16; ++k) total += acc[k];
        }
        t = wall() - t0;
        sink += total;
        if ((double)n * 4 / t > best) best = (double)n * 4 / t;
    }
    (void)sink;
    free(x);
    return best * 1e-9;
}

typedef struct {
    int H, Hkv, Lk, D, nt, ncopy;
    float *q;
    void *k[NIMPL][MAXCOPY], *v[NIMPL][MAXCOPY];   /* per implementation's storage type */
    float *out[NIMPL];
    /* ggml: one graph per copy and type */
    struct ggml_context *ctx[2][MAXCOPY];
    struct ggml_cgraph *graph[2][MAXCOPY];
    struct ggml_cplan plan[2][MAXCOPY];
    struct ggml_tensor *res[2][MAXCOPY];
    struct ggml_threadpool *pool;
    /* mha.h: one plan per type */
    mha_plan *mp[NIMPL];
    mha_run run[NIMPL];
    int turn[NIMPL];
} bench;

static void ggml_setup(bench *b, int which, int c)
{
    struct ggml_init_params ip;
    struct ggml_tensor *tq, *tk, *tv;
    enum ggml_type ty = which ? GGML_TYPE_F16 : GGML_TYPE_F32;
    ip.mem_size = ggml_tensor_overhead() * 8 + ggml_graph_overhead() + 1024;
    ip.mem_buffer = NULL;
    ip.no_alloc = true;
    b->ctx[which][c] = must(ggml_init(ip));
    tq = ggml_new_tensor_4d(b->ctx[which][c], GGML_TYPE_F32, b->D, 1, b->H, 1);
    tk = ggml_new_tensor_4d(b->ctx[which][c], ty, b->D, b->Lk, b->Hkv, 1);
    tv = ggml_new_tensor_4d(b->ctx[which][c], ty, b->D, b->Lk, b->Hkv, 1);
    tq->data = b->q; tk->data = b->k[which][c]; tv->data = b->v[which][c];
    b->res[which][c] = ggml_flash_attn_ext(b->ctx[which][c], tq, tk, tv, NULL, 1.0f / sqrtf((float)b->D), 0.0f, 0.0f);
    ggml_flash_attn_ext_set_prec(b->res[which][c], GGML_PREC_F32);
    b->res[which][c]->data = b->out[which];      /* [Lq = 1][H][D]: the layout of mha.h's [H][1][D] */
    b->graph[which][c] = ggml_new_graph(b->ctx[which][c]);
    ggml_build_forward_expand(b->graph[which][c], b->res[which][c]);
    b->plan[which][c] = ggml_graph_plan(b->graph[which][c], b->nt, b->pool);
    b->plan[which][c].work_data = b->plan[which][c].work_size ? must(malloc(b->plan[which][c].work_size)) : NULL;
}

static void call(bench *b, int i)
{
    int c = b->turn[i];
    b->turn[i] = (c + 1) % b->ncopy;
    if (i < 2) {
        if (ggml_graph_compute(b->graph[i][c], &b->plan[i][c]) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "bench_ggml: ggml_graph_compute failed\n");
            exit(1);
        }
    } else {
        mha_error e;
        if (mha_sdpa_run_forward(b->mp[i], 1, b->Lk, b->q, b->k[i][c], b->v[i][c], b->out[i], &b->run[i], &e) != MHA_OK) {
            fprintf(stderr, "bench_ggml: %s\n", e.message);
            exit(1);
        }
    }
}

/* float64 reference on the values of copy 0 as implementation i stores them */
static double check(bench *b, int i)
{
    int h, j, d, G = b->H / b->Hkv;
    size_t n = (size_t)b->Hkv * b->Lk * b->D;
    float *kw = (float *)must(malloc(n * 4)), *vw = (float *)must(malloc(n * 4));
    double *s = (double *)must(malloc((size_t)b->Lk * sizeof(double))), num = 0.0, den = 0.0;
    (void)mha_convert(n, impl_dt[i], b->k[i][0], MHA_F32, kw, NULL);
    (void)mha_convert(n, impl_dt[i], b->v[i][0], MHA_F32, vw, NULL);
    b->turn[i] = 0;
    call(b, i);
    b->turn[i] = 0;
    for (h = 0; h < b->H; ++h) {
        const float *qh = b->q + (size_t)h * b->D, *kh = kw + (size_t)(h / G) * b->Lk * b->D,
                    *vh = vw + (size_t)(h / G) * b->Lk * b->D;
        double m = -INFINITY, l = 0.0;
        for (j = 0; j < b->Lk; ++j) {
            double acc = 0.0;
            for (d = 0; d < b->D; ++d) acc += (double)qh[d] * kh[(size_t)j * b->D + d];
            s[j] = acc / sqrt((double)b->D);
            if (s[j] > m) m = s[j];
        }
        for (j = 0; j < b->Lk; ++j) { s[j] = exp(s[j] - m); l += s[j]; }
        for (d = 0; d < b->D; ++d) {
            double o = 0.0, diff;
            for (j = 0; j < b->Lk; ++j) o += s[j] * vh[(size_t)j * b->D + d];
            o /= l;
            diff = (double)b->out[i][(size_t)h * b->D + d] - o;
            num += diff * diff;
            den += o * o;
        }
    }
    free(kw); free(vw); free(s);
    return sqrt(num / den);
}

static void run_case(int H, int Hkv, int Lk, int nt, double read_gbs)
{
    const int D = 128;
    bench b;
    size_t nkv = (size_t)Hkv * Lk * D, bytes32 = 2 * nkv * 4, c;
    double t[NIMPL][NREP], med[NIMPL], gbs;
    int i, r;
    memset(&b, 0, sizeof b);
    b.H = H; b.Hkv = Hkv; b.Lk = Lk; b.D = D; b.nt = nt;
    b.ncopy = (int)(((size_t)256 << 20) / bytes32) + 1;
    if (b.ncopy > MAXCOPY) b.ncopy = MAXCOPY;
    b.q = (float *)must(malloc((size_t)H * D * 4));
    for (i = 0; i < H * D; ++i) b.q[i] = (float)((i * 37) % 101) / 50.0f - 1.0f;
    for (c = 0; c < (size_t)b.ncopy; ++c) {
        float *kf = (float *)must(malloc(nkv * 4)), *vf = (float *)must(malloc(nkv * 4));
        size_t x;
        unsigned s = 12345u + (unsigned)c * 7919u;
        for (x = 0; x < nkv; ++x) {
            s = s * 1664525u + 1013904223u; kf[x] = (float)(s >> 8) / 8388608.0f - 1.0f;
            s = s * 1664525u + 1013904223u; vf[x] = (float)(s >> 8) / 8388608.0f - 1.0f;
        }
        b.k[0][c] = b.k[2][c] = kf;
        b.v[0][c] = b.v[2][c] = vf;
        for (i = 3; i < NIMPL; ++i) {
            b.k[i][c] = must(malloc(nkv * 2)); b.v[i][c] = must(malloc(nkv * 2));
            (void)mha_convert(nkv, MHA_F32, kf, impl_dt[i], b.k[i][c], NULL);
            (void)mha_convert(nkv, MHA_F32, vf, impl_dt[i], b.v[i][c], NULL);
        }
        b.k[1][c] = b.k[3][c];   /* ggml's f16 reads the same half bits */
        b.v[1][c] = b.v[3][c];
    }
    for (i = 0; i < NIMPL; ++i) b.out[i] = (float *)must(malloc((size_t)H * D * 4));
    {
        struct ggml_threadpool_params tp = ggml_threadpool_params_default(nt);
        b.pool = must(ggml_threadpool_new(&tp));
    }
    for (c = 0; c < (size_t)b.ncopy; ++c) { ggml_setup(&b, 0, (int)c); ggml_setup(&b, 1, (int)c); }
    for (i = 2; i < NIMPL; ++i) {
        mha_options o;
        mha_sizes sz;
        mha_error e;
        memset(&o, 0, sizeof o);
        o.num_kv_heads = Hkv; o.num_threads = nt; o.kv_dtype = impl_dt[i];
        if (mha_sdpa_plan_size(1, H, 1, Lk, D, D, &o, 0, &sz, &e) != MHA_OK ||
            mha_sdpa_plan(1, H, 1, Lk, D, D, &o, 0, NULL, 0, &b.mp[i], &e) != MHA_OK) {
            fprintf(stderr, "bench_ggml: %s\n", e.message);
            exit(1);
        }
        b.run[i].workspace = must(malloc(sz.workspace));
        b.run[i].workspace_bytes = sz.workspace;
    }
    printf("\nH %d, Hkv %d, D %d, Lq 1, Lk %d, %d thread%s (%d K/V copies); error against float64:", H, Hkv, D, Lk,
           nt, nt > 1 ? "s" : "", b.ncopy);
    for (i = 0; i < NIMPL; ++i) printf(" %s %.1e%s", impl_name[i], check(&b, i), i + 1 < NIMPL ? "," : "\n");
    for (i = 0; i < NIMPL; ++i) call(&b, i);   /* warm-up */
    for (r = 0; r < NREP; ++r)
        for (i = 0; i < NIMPL; ++i) {
            int n = 0;
            double t0 = wall(), el;
            do { call(&b, i); ++n; el = wall() - t0; } while (el < 0.1);
            t[i][r] = el / n;
        }
    printf("  %-9s %9s %8s %6s\n", "", "ms", "GB/s", "%read");
    for (i = 0; i < NIMPL; ++i) {
        qsort(t[i], NREP, sizeof(double), cmp_double);
        med[i] = t[i][NREP / 2];
        gbs = (double)(2 * nkv * mha_dtype_size(impl_dt[i])) / med[i] * 1e-9;
        printf("  %-9s %9.3f %8.2f %5.0f%%\n", impl_name[i], med[i] * 1e3, gbs, 100.0 * gbs / read_gbs);
    }
    printf("  mha f16 against ggml f16: %.2fx faster; mha f32 against ggml f32: %.2fx\n", med[1] / med[3], med[0] / med[2]);
    fflush(stdout);
    for (c = 0; c < (size_t)b.ncopy; ++c) {
        free(b.k[0][c]); free(b.v[0][c]);
        for (i = 3; i < NIMPL; ++i) { free(b.k[i][c]); free(b.v[i][c]); }
        for (i = 0; i < 2; ++i) { free(b.plan[i][c].work_data); ggml_free(b.ctx[i][c]); }
    }
    for (i = 0; i < NIMPL; ++i) free(b.out[i]);
    for (i = 2; i < NIMPL; ++i) { mha_plan_destroy(b.mp[i]); free(b.run[i].workspace); }
    ggml_threadpool_free(b.pool);
    free(b.q);
}

int main(int argc, char **argv)
{
    int threads[8] = {1, 2}, nthreads = 2, a, t;
    if (argc > 1) {
        nthreads = 0;
        for (a = 1; a < argc && nthreads < 8; ++a) threads[nthreads++] = atoi(argv[a]) > 0 ? atoi(argv[a]) : 1;
    }
    printf("== one decoding step: mha.h beside ggml's CPU flash attention (ggml_flash_attn_ext)\n");
    printf("   medians of %d interleaved repetitions; %%read = GB/s against a plain read measured now\n", NREP);
    for (t = 0; t < nthreads; ++t) {
        double rb = read_bandwidth(threads[t]);
        printf("\nplain read of 1 GiB, %d thread%s: %.1f GB/s\n", threads[t], threads[t] > 1 ? "s" : "", rb);
        run_case(32, 32, 4096, threads[t], rb);
        run_case(32, 8, 4096, threads[t], rb);
        run_case(32, 32, 16384, threads[t], rb);
        run_case(32, 8, 16384, threads[t], rb);
    }
    return 0;
}
