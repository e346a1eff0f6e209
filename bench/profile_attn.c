/* bench/profile_attn.c - where the cycles of the fused attention core go
   (issue 12, item 3).  perf is not available on the development machines,
   so this counts them itself: it defines MHA_PROFILE_MARK, which mha.h calls
   as the fused core enters each phase, and adds the time-stamp counter
   ticks since the previous mark to the phase it left.

   Shape: mha_sdpa_forward, B = 1, H = 8, D = 64, one thread, no mask and causal,
   L = 512 and 2048 (the "fused attention core" row).  For each
   phase it prints its share of the core's ticks and, for the two matrix
   products, their FLOP rate as a share of the FMA peak measured in ticks in
   the same run; the softmax row gives ticks per score.

     make profile-attn             (or: cc -O3 -march=native -I. bench/profile_attn.c -lm)

   One thread only: the marks keep a single "current phase".  Medians of 7
   runs per row; the machine may be shared, so read the shares, not ticks.  */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
static unsigned long long ticks(void) { return __rdtsc(); }
#else
static unsigned long long ticks(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}
#endif

#define NPHASE 8
static unsigned long long prof_ticks[NPHASE], prof_last;
static int prof_phase;
static void prof_mark(int phase)
{
    unsigned long long t = ticks();
    prof_ticks[prof_phase] += t - prof_last;
    prof_last = t;
    prof_phase = phase;
}
#define MHA_PROFILE_MARK(phase) prof_mark(phase)
#define MHA_IMPLEMENTATION
#include "mha.h"

static const char *phase_name[NPHASE] = {"other", "Q pack", "V pack", "scores QK^T", "masks",
                                         "softmax", "PV", "out / l"};

/* FMA peak in FLOP per tick: 12 independent chains of vector FMAs */
static double peak_flop_per_tick(void)
{
    const long n = 2000000L;
    double best = 0.0;
    int rep, u;
    for (rep = 0; rep < 5; ++rep) {
        mha__vf c[12];
        const mha__vf m = mha__vset1(0.9999999f), a = mha__vset1(1e-7f);
        unsigned long long t0 = ticks(), t1;
        volatile float keep;
        long i;
        for (u = 0; u < 12; ++u) c[u] = mha__vset1((float)u);
        for (i = 0; i < n; ++i)
            for (u = 0; u < 12; ++u) c[u] = mha__vfma(a, c[u], m);
        for (u = 1; u < 12; ++u) c[0] = mha__vadd(c[0], c[u]);
        keep = mha__vhsum(c[0]);
        (void)keep;
        t1 = ticks();
        if (24.0 * MHA__VW * n / (double)(t1 - t0) > best) best = 24.0 * MHA__VW * n / (double)(t1 - t0);
    }
    return best;
}

static int cmp_ull(const void *a, const void *b)
{
    unsigned long long x = *(const unsigned long long *)a, y = *(const unsigned long long *)b;
    return x < y ? -1 : x > y;
}

int main(void)
{
    static const int ls[] = {512, 2048};
    const int H = 8, D = 64, reps = 7;
    double peak = peak_flop_per_tick();
    int li, causal;
    printf("== fused attention core, phase by phase: mha_sdpa_forward B=1 H=8 D=64, 1 thread, %s\n",
           MHA__VW == 16 ? "AVX-512" : MHA__VW == 8 ? "AVX2" : MHA__VW == 4 ? "NEON" : "scalar");
    printf("   FMA peak %.1f FLOP per tick (time-stamp counter); medians of %d runs\n", peak, reps);
    for (li = 0; li < 2; ++li)
        for (causal = 0; causal <= 1; ++causal) {
            const int L = ls[li];
            size_t n = (size_t)H * L * D, i;
            float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *o = malloc(n * 4);
            unsigned long long per[NPHASE][16], med[NPHASE], total = 0;
            mha_options opt = {0};
            mha_sizes sz;
            mha_run run = {0};       /* the workspace, allocated once */
            unsigned s = 7;
            int r, p;
            /* pairs of live scores: causal does half the products */
            double scores = causal ? (double)H * L * (L + 1) / 2.0 : (double)H * L * L;
            for (i = 0; i < n; ++i) {
                s = s * 1664525u + 1013904223u; q[i] = (float)(s >> 9) / 4194304.0f - 1.0f;
                s = s * 1664525u + 1013904223u; k[i] = (float)(s >> 9) / 4194304.0f - 1.0f;
                s = s * 1664525u + 1013904223u; v[i] = (float)(s >> 9) / 4194304.0f - 1.0f;
            }
            opt.num_threads = 1;
            opt.causal = causal;
            if (mha_sdpa_plan_size(1, H, L, L, D, D, &opt, 0, &sz, NULL) != MHA_OK ||
                !(run.workspace = malloc(sz.workspace)))
                return 1;
            run.workspace_bytes = sz.workspace;
            for (r = -1; r < reps; ++r) {              /* r = -1: warm-up */
                memset(prof_ticks, 0, sizeof prof_ticks);
                prof_phase = MHA_PHASE_OTHER;
                prof_last = ticks();
                if (mha_sdpa_forward(1, H, L, L, D, D, q, k, v, &opt, o, &run, NULL) != MHA_OK) return 1;
                prof_mark(MHA_PHASE_OTHER);
                if (r >= 0)
                    for (p = 0; p < NPHASE; ++p) per[p][r] = prof_ticks[p];
            }
            for (p = 0; p < NPHASE; ++p) {
                qsort(per[p], (size_t)reps, sizeof per[p][0], cmp_ull);
                med[p] = per[p][reps / 2];
                total += med[p];
            }
            printf("\nL=%d %s: %.1f%% of peak over the whole call (4 H L^2 D FLOPs%s)\n", L,
                   causal ? "causal" : "no mask",
                   100.0 * (causal ? 2.0 : 4.0) * H * (double)L * L * D / (double)total / peak,
                   causal ? " / 2" : "");
            printf("   %-12s %7s %12s %s\n", "phase", "share", "ticks/score", "rate");
            for (p = 0; p < NPHASE; ++p) {
                printf("   %-12s %6.1f%% %12.3f", phase_name[p], 100.0 * (double)med[p] / (double)total,
                       (double)med[p] / scores);
                if (p == MHA_PHASE_SCORES || p == MHA_PHASE_PV)
                    printf(" %5.1f%% of peak", 100.0 * 2.0 * D * scores / (double)med[p] / peak);
                printf("\n");
            }
            free(q); free(k); free(v); free(o); free(run.workspace);
        }
    return 0;
}
