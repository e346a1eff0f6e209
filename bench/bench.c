/* make bench: how fast mha.h runs on this machine, against a measured ceiling.

   Tables (every figure is the median of several timed samples):
     1. fp32 peak: a loop of independent fused multiply-adds in the vector
        width this build uses, on 1 thread and on 2 threads.
     2. GEMM GFLOP/s, % of peak, and the ratio to OpenBLAS cblas_sgemm timed
        side by side (when the build found OpenBLAS: -DMHA_BENCH_OPENBLAS).
        The samples of mha.h, OpenBLAS and a short peak loop alternate, so
        on a shared machine all three see the same load; % of peak is the
        ratio of the GEMM median to the peak median of that row.
     3. MHA forward (filled in by the fused-attention work; see mha_forward_rows).

   Single-thread rows are timed with the thread's CPU time, threaded rows
   with wall time (see now()).
   Build: see the Makefile's bench target (-O3 -march=native -fopenmp).
   Usage: bench [gemm|peak|forward]... (default: all tables)
   The machine may be shared: compare ratios measured in the same run. */
#define _POSIX_C_SOURCE 199309L
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef MHA_BENCH_OPENBLAS
#include <cblas.h>
#endif

#define SAMPLES 7          /* timed samples per figure; the median is reported */
#define SAMPLE_SECONDS 0.04 /* each sample repeats the call for about this long */

/* Timing clock.  Single-thread figures use the CPU time of the calling
   thread: on a machine shared with other jobs it leaves out the time the OS
   gave to someone else (OpenBLAS with 1 thread also runs in the calling
   thread, so both sides are measured alike).  Threaded figures use wall
   time, the only clock that shows a speed-up.  */
static int cpu_clock;
static double now(void)
{
    struct timespec t;
    clock_gettime(cpu_clock ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static const char *clock_name(void) { return cpu_clock ? "cpu" : "wall"; }
static double wall_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
/* A sample ends early when it runs far over its budget (threads that the
   OS keeps waiting on a busy machine would otherwise stretch it to minutes). */
static int over_budget(double wall0) { return wall_now() - wall0 > 4.0 * SAMPLE_SECONDS; }
#ifdef MHA_BENCH_OPENBLAS
static void pause_ms(int ms)   /* lets the other library's idle threads go to sleep */
{
    struct timespec t;
    t.tv_sec = 0;
    t.tv_nsec = (long)ms * 1000000L;
    nanosleep(&t, NULL);
}
#endif
static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
static void set_threads(int t)
{
    cpu_clock = t == 1;
#ifdef _OPENMP
    omp_set_num_threads(t);
#endif
#ifdef MHA_BENCH_OPENBLAS
    openblas_set_num_threads(t);
#endif
    (void)t;
}
static int max_threads(void)
{
#ifdef _OPENMP
    return omp_get_num_procs() < 2 ? omp_get_num_procs() : 2;
#else
    return 1;
#endif
}

/* --------------------------------------------------------------- peak */

/* 12 independent accumulator chains per thread: more than FMA latency x
   pipes (4 x 2 on current x86 cores), so the loop runs at issue rate. */
#define PEAK_ITERS 20000000L
static float peak_loop(long iters, float seed)
{
    mha__vf a0 = mha__vset1(seed), a1 = mha__vset1(seed + 1), a2 = mha__vset1(seed + 2),
            a3 = mha__vset1(seed + 3), a4 = mha__vset1(seed + 4), a5 = mha__vset1(seed + 5),
            a6 = mha__vset1(seed + 6), a7 = mha__vset1(seed + 7), a8 = mha__vset1(seed + 8),
            a9 = mha__vset1(seed + 9), a10 = mha__vset1(seed + 10), a11 = mha__vset1(seed + 11);
    const mha__vf x = mha__vset1(0.999999f), y = mha__vset1(1e-7f);
    long i;
    for (i = 0; i < iters; ++i) {
        a0 = mha__vfma(y, a0, x); a1 = mha__vfma(y, a1, x); a2 = mha__vfma(y, a2, x);
        a3 = mha__vfma(y, a3, x); a4 = mha__vfma(y, a4, x); a5 = mha__vfma(y, a5, x);
        a6 = mha__vfma(y, a6, x); a7 = mha__vfma(y, a7, x); a8 = mha__vfma(y, a8, x);
        a9 = mha__vfma(y, a9, x); a10 = mha__vfma(y, a10, x); a11 = mha__vfma(y, a11, x);
    }
    a0 = mha__vadd(mha__vadd(mha__vadd(a0, a1), mha__vadd(a2, a3)), mha__vadd(mha__vadd(a4, a5), mha__vadd(a6, a7)));
    a0 = mha__vadd(a0, mha__vadd(mha__vadd(a8, a9), mha__vadd(a10, a11)));
    return mha__vhsum(a0);
}

/* GFLOP/s of one run of peak_loop on t threads */
static volatile float peak_sink;
static double peak_sample(int t, long iters)
{
    double t0 = now(), sec;
    float r = 0.0f;
#ifdef _OPENMP
#pragma omp parallel num_threads(t) reduction(+ : r)
    r += peak_loop(iters, (float)omp_get_thread_num());
#else
    r = peak_loop(iters, 0.0f);
#endif
    sec = now() - t0;
    peak_sink += r;
    return 12.0 * 2.0 * MHA__VW * (double)iters * t / sec * 1e-9;
}
/* median of SAMPLES */
static double measure_peak(int t)
{
    double g[SAMPLES];
    int s;
    for (s = 0; s < SAMPLES; ++s) g[s] = peak_sample(t, PEAK_ITERS);
    return median(g, SAMPLES);
}

static double peak_gflops[3];   /* [threads], measured first */

static void peak_table(void)
{
    int t;
    printf("\n## fp32 peak (%s, %d lanes: FMA throughput loop, 12 chains)\n\n", MHA__SIMD_NAME, MHA__VW);
    printf("| threads | clock | GFLOP/s |\n|---:|---|---:|\n");
    for (t = 1; t <= max_threads(); ++t) {
        set_threads(t);
        peak_gflops[t] = measure_peak(t);
        printf("| %d | %s | %.1f |\n", t, clock_name(), peak_gflops[t]);
        fflush(stdout);
    }
}

/* --------------------------------------------------------------- GEMM */

typedef struct shape { const char *name; int ta, tb, M, N, K; } shape;

static void fill(float *x, size_t n, unsigned seed)
{
    size_t i;
    for (i = 0; i < n; ++i) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) * (1.0f / 16777216.0f) - 0.5f;
    }
}

/* One timed sample: repeat the call `reps` times, return seconds per call. */
static double time_mha(const shape *s, const float *A, const float *B, float *C, const mha_run *run,
                       int reps)
{
    double t0 = now(), w0 = wall_now();
    int r = 0;
    while (r < reps) {
        mha_gemm((mha_trans)s->ta, (mha_trans)s->tb, s->M, s->N, s->K, 1.0f, A, s->ta ? s->M : s->K,
                 B, s->tb ? s->K : s->N, 0.0f, C, s->N, run, NULL);
        ++r;
        if (over_budget(w0)) break;
    }
    return (now() - t0) / r;
}
#ifdef MHA_BENCH_OPENBLAS
static double time_blas(const shape *s, const float *A, const float *B, float *C, int reps)
{
    double t0 = now(), w0 = wall_now();
    int r = 0;
    while (r < reps) {
        cblas_sgemm(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans, s->tb ? CblasTrans : CblasNoTrans,
                    s->M, s->N, s->K, 1.0f, A, s->ta ? s->M : s->K, B, s->tb ? s->K : s->N, 0.0f, C, s->N);
        ++r;
        if (over_budget(w0)) break;
    }
    return (now() - t0) / r;
}
#endif

static void gemm_table(void)
{
    static const shape shapes[] = {
        {"square 64", 0, 0, 64, 64, 64},       {"square 128", 0, 0, 128, 128, 128},
        {"square 256", 0, 0, 256, 256, 256},   {"square 512", 0, 0, 512, 512, 512},
        {"square 1024", 0, 0, 1024, 1024, 1024}, {"square 2048", 0, 0, 2048, 2048, 2048},
        {"QK^T L=128 [Lx64][64xL] N/T", 0, 1, 128, 128, 64},
        {"QK^T L=512", 0, 1, 512, 512, 64},
        {"QK^T L=2048", 0, 1, 2048, 2048, 64},
        {"PV L=128 [LxL][Lx64] N/N", 0, 0, 128, 64, 128},
        {"PV L=512", 0, 0, 512, 64, 512},
        {"PV L=2048", 0, 0, 2048, 64, 2048},
        {"proj L=128 [Lx512][512x512]^T", 0, 1, 128, 512, 512},
        {"proj L=512", 0, 1, 512, 512, 512},
        {"proj L=2048", 0, 1, 2048, 512, 512},
    };
    int i, t;
    printf("\n## GEMM, C = A B (row-major, beta = 0), GFLOP/s (median of %d)\n\n", SAMPLES);
#ifdef MHA_BENCH_OPENBLAS
    printf("| shape | M | N | K | threads | clock | mha.h GFLOP/s | %% of peak | OpenBLAS GFLOP/s | mha.h / OpenBLAS |\n");
    printf("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|\n");
#else
    printf("(built without OpenBLAS: no comparison column)\n\n");
    printf("| shape | M | N | K | threads | clock | mha.h GFLOP/s | %% of peak |\n|---|---:|---:|---:|---:|---|---:|---:|\n");
#endif
    for (i = 0; i < (int)(sizeof shapes / sizeof shapes[0]); ++i) {
        const shape *s = &shapes[i];
        size_t na = (size_t)s->M * s->K, nb = (size_t)s->K * s->N, nc = (size_t)s->M * s->N;
        float *A = (float *)malloc(na * sizeof(float)), *B = (float *)malloc(nb * sizeof(float));
        float *C = (float *)malloc(nc * sizeof(float));
        double flops = 2.0 * s->M * s->N * s->K;
        fill(A, na, 1u + (unsigned)i);
        fill(B, nb, 7u + (unsigned)i);
        for (t = 1; t <= max_threads(); ++t) {
            double tm[SAMPLES], tb[SAMPLES], tp[SAMPLES], per;
            mha_sizes sz;
            mha_run run = {0};                               /* the workspace, allocated once */
            int reps, k;
            set_threads(t);
            if (mha_gemm_plan_size((mha_trans)s->ta, (mha_trans)s->tb, s->M, s->N, s->K, 0, &sz, NULL) != MHA_OK)
                continue;
            run.workspace = malloc(sz.workspace);
            run.workspace_bytes = sz.workspace;
            per = time_mha(s, A, B, C, &run, 1);             /* warm up, and size the samples */
            reps = (int)(SAMPLE_SECONDS / per) + 1;
#ifdef MHA_BENCH_OPENBLAS
            time_blas(s, A, B, C, 1);
#endif
            for (k = 0; k < SAMPLES; ++k) {                  /* interleaved: same conditions */
                tp[k] = peak_sample(t, PEAK_ITERS / 8);     /* the ceiling, right now */
                tm[k] = time_mha(s, A, B, C, &run, reps);
#ifdef MHA_BENCH_OPENBLAS
                pause_ms(5);
                tb[k] = time_blas(s, A, B, C, reps);
                pause_ms(5);
#else
                tb[k] = 0.0;
                (void)tb;
#endif
            }
            {
                double gm = flops / median(tm, SAMPLES) * 1e-9;
                printf("| %s | %d | %d | %d | %d | %s | %.1f | %.0f%% |", s->name, s->M, s->N, s->K, t,
                       clock_name(), gm, 100.0 * gm / median(tp, SAMPLES));
#ifdef MHA_BENCH_OPENBLAS
                {
                    double gb = flops / median(tb, SAMPLES) * 1e-9;
                    printf(" %.1f | %.2f |", gb, gm / gb);
                }
#endif
                printf("\n");
                fflush(stdout);
            }
            free(run.workspace);
        }
        free(A); free(B); free(C);
    }
}

/* ------------------------------------------------------- MHA forward
   MHA FORWARD ROWS: the table of issue 3 (E = 512, H = 8, (B, L) =
   (1,128), (8,128), (1,512), (1,2048), (4,1024); ms, GFLOP/s, peak memory;
   fused vs unfused; 1 and 2 threads) belongs to the fused-attention work and
   is added here.  Helpers above: now(), median(), set_threads(),
   peak_gflops[t], peak_sample(), SAMPLES.  */
static void mha_forward_rows(void)
{
    printf("\n## MHA forward\n\n(measured by build/bench_mha, bench/bench_mha.c: each configuration in its own\n"
           "process for its peak RSS, PyTorch side by side; `make bench` runs it too)\n");
}

int main(int argc, char **argv)
{
    int i, want_peak = argc < 2, want_gemm = argc < 2, want_fwd = argc < 2;
    for (i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "peak")) want_peak = 1;
        else if (!strcmp(argv[i], "gemm")) want_gemm = 1;
        else if (!strcmp(argv[i], "forward")) want_fwd = 1;
        else { fprintf(stderr, "usage: %s [peak|gemm|forward]...\n", argv[0]); return 2; }
    }
    printf("# mha.h benchmark: %s kernels (MR=%d, NR=%d, KC=%d, MC=%d, NC=%d), up to %d threads%s\n",
           MHA__SIMD_NAME, MHA__MR, MHA__NR, MHA__KC, MHA__MC, MHA__NC, max_threads(),
#ifdef MHA_BENCH_OPENBLAS
           ", OpenBLAS side by side"
#else
           ""
#endif
    );
#ifdef MHA_BENCH_OPENBLAS
    /* OpenBLAS picks its kernels from the CPU model; a model it does not know
       gets its generic SSE3 ("Prescott") kernels, several times slower.  The
       Makefile then sets OPENBLAS_CORETYPE from the CPU's flags. */
    printf("# OpenBLAS kernels: %s (OPENBLAS_CORETYPE=%s)\n", openblas_get_corename(),
           getenv("OPENBLAS_CORETYPE") ? getenv("OPENBLAS_CORETYPE") : "unset");
#endif
    peak_table();   /* always: every other figure is a fraction of it */
    (void)want_peak;
    if (want_gemm) gemm_table();
    if (want_fwd) mha_forward_rows();
    return 0;
}
