/* bench/bench_mha.c - multi-head attention timings for `make bench`.

   Tables (medians of repeated runs, each configuration in its own forked
   process so its peak RSS is its own):
     1. mha_module_forward, E = 512, H = 8, self attention, (B, L) as in
        the speed issue: fused (no weights) and unfused (head-averaged
        weights, run.weights), 1 and 2 threads; ms, GFLOP/s, peak RSS, and
        PyTorch's time for the same call (bench/torch_mha.py) as a ratio
        torch_ms / mha_ms.  Rows "+packed" run a plan made once beforehand
        with MHA_PLAN_PACK (the weights packed into it, not timed) instead
        of the one-shot call.
     2. the attention core alone (mha_sdpa_forward, 8 heads of 64, fused).
     3. long sequences: L = 16384 (E 512, H 8) and L = 65536 (one head of 64):
        peak RSS against the bytes of the inputs and outputs.
     4. decoding (issue 9): one decode step (Lq = 1) of mha_sdpa_forward with H = 32,
        Hkv = 8, D = 128 against a cache of Lk = 4096 and 32768 keys stored
        as f32, f16 and bf16 (opt.kv_dtype): K+V bytes read per second
        against a STREAM-like read of as many bytes measured in the same
        run, and (f32) against a plain per-head C loop of the kind llama2.c
        uses; prefill with GQA (L = 2048, H = 8, Hkv = 2,
        D = 64) against the MHA core at the same shape; a sliding window
        W = 256 at L = 16384 (one head of 64, causal) against full causal
        attention, against the share of keys a window leaves, 2 (W + 1) / (L + 1),
        and issue 19's goal 1.5 W / L.

   Times: 1 thread = CPU time of the process, 2 threads = wall clock (the
   torch script does the same), so a busy machine slows only the 2-thread rows.

     5. training: the module's forward + backward (E 512, H 8; a training
        plan whose forward run fills an explicit saved region, run.saved,
        which the backward run reads) against PyTorch
        autograd, and one encoder-layer step (forward + backward + AdamW,
        B 8, L 128, d 512, F 2048) against nn.TransformerEncoderLayer +
        torch.optim.AdamW; each row with its % of the FMA peak measured by
        a loop of independent FMAs in the same run.

   usage: bench_mha [--quick] [--no-torch] [--decode] [--train]
     --quick     skip table 3
     --no-torch  do not run bench/torch_mha.py
     --decode    only table 4
     --train     only table 5
   FLOPs counted: projections 4 x 2 B L E^2, attention 2 x 2 B H Lq Lk D
   (QK^T and PV); softmax and masking are not counted.  */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>
#define MHA_IMPLEMENTATION
#include "mha.h"

#define E_DIM 512
#define N_HEADS 8

/* Single-thread runs are timed by the process's CPU time, which other
   programs on a shared machine do not inflate; threaded runs by the wall
   clock (their CPU time would hide a slow thread). */
static double now_s(int threads)
{
    struct timespec t;
    clock_gettime(threads == 1 ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double peak_rss_mib(void)
{
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_maxrss / 1024.0;   /* ru_maxrss is KiB on Linux */
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void fill(float *x, size_t n, unsigned seed, float amp)
{
    size_t i;
    unsigned s = seed * 2654435761u + 12345u;
    for (i = 0; i < n; ++i) {
        s = s * 1664525u + 1013904223u;
        x[i] = amp * ((float)(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}

typedef struct result {
    double ms;        /* median of the timed runs */
    double rss_mib;   /* peak RSS of the process that ran them */
    double base_mib;  /* RSS before any tensor was allocated */
    double io_mib;    /* inputs (x, weights) + outputs (out, weights if any) */
    int reps, ok;
} result;

enum { JOB_MHA = 0, JOB_DECODE, JOB_STREAM, JOB_NAIVE_DECODE, JOB_GQA_PREFILL, JOB_WINDOW,
       JOB_PEAK, JOB_FWDBWD, JOB_ENCSTEP };

typedef struct job {
    int kind;               /* JOB_MHA: tables 1-3; the others: table 4 (run_decode_job) */
    int Lk, Hkv, D, window; /* table 4 shapes; window: left size (0 = full causal) */
    mha_dtype kv_dtype;     /* table 4 decode: K/V storage (stream: reads as many bytes) */
    int sdpa;               /* 1: mha_sdpa_forward on [B,H,L,D]; 0: mha_module_forward */
    int B, L, E, H, threads, fused;
    int packed;             /* runs of a module plan made with MHA_PLAN_PACK */
    double min_time;        /* seconds of timed runs to aim for */
    int max_reps;
} job;

/* r->reps timed runs in times: their median, the peak RSS so far */
static void median_result(result *r, double *times)
{
    qsort(times, (size_t)r->reps, sizeof(double), cmp_double);
    r->ms = 1e3 * times[r->reps / 2];
    r->rss_mib = peak_rss_mib();
    r->ok = r->reps > 0;
}

/* A plain decode step, one head at a time, as llama2.c writes it:
   scores, softmax, weighted sum of values; query head h reads KV head h / G. */
static void naive_decode(int H, int Hkv, int Lk, int D, const float *q, const float *k, const float *v,
                         float *att, float *out, int threads)
{
    int h, G = H / Hkv;
    float scale = 1.0f / sqrtf((float)D);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads)
#endif
    for (h = 0; h < H; ++h) {
        const float *qh = q + (size_t)h * D, *kh = k + (size_t)(h / G) * Lk * D, *vh = v + (size_t)(h / G) * Lk * D;
        float *a = att + (size_t)h * Lk, *o = out + (size_t)h * D, mx = -INFINITY, sum = 0.0f;
        int t, d;
        for (t = 0; t < Lk; ++t) {
            float s = 0.0f;
            for (d = 0; d < D; ++d) s += qh[d] * kh[(size_t)t * D + d];
            a[t] = s * scale;
            if (a[t] > mx) mx = a[t];
        }
        for (t = 0; t < Lk; ++t) { a[t] = expf(a[t] - mx); sum += a[t]; }
        for (d = 0; d < D; ++d) o[d] = 0.0f;
        for (t = 0; t < Lk; ++t) {
            float w = a[t] / sum;
            for (d = 0; d < D; ++d) o[d] += w * vh[(size_t)t * D + d];
        }
    }
    (void)threads;
}

/* Table 4's jobs: median ms of repeated runs in this process. */
static result run_decode_job(const job *jb)
{
    result r;
    double times[64], t_start;
    int i, H = jb->H, Hkv = jb->Hkv, D = jb->D, Lk = jb->Lk, Lq = jb->kind == JOB_DECODE ||
                                                                  jb->kind == JOB_NAIVE_DECODE ? 1 : Lk;
    size_t nkv = (size_t)Hkv * Lk * D, nq = (size_t)H * Lq * D;
    size_t nread = nkv * mha_dtype_size(jb->kv_dtype) / sizeof(float);   /* stream: floats of K, of V */
    float *q, *k, *v, *out, *att = NULL;
    const void *kx, *vx;
    void *kh = NULL, *vh = NULL;
    volatile float sink = 0.0f;
    mha_options opt;
    mha_sizes sz;
    mha_run run = {0};
    memset(&r, 0, sizeof r);
    memset(&opt, 0, sizeof opt);
    opt.num_threads = jb->threads;
    opt.num_kv_heads = Hkv;
    opt.causal = jb->kind == JOB_WINDOW || jb->kind == JOB_DECODE;
    opt.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    if (jb->kind == JOB_WINDOW && jb->window > 0) { opt.window = 1; opt.window_left = jb->window; opt.window_right = 0; }
    q = (float *)malloc(nq * sizeof(float)); out = (float *)malloc(nq * sizeof(float));
    k = (float *)malloc(nkv * sizeof(float)); v = (float *)malloc(nkv * sizeof(float));
    if (!q || !out || !k || !v) return r;
    fill(q, nq, 1, 1.0f); fill(k, nkv, 2, 1.0f); fill(v, nkv, 3, 1.0f);
    kx = k; vx = v;
    opt.kv_dtype = jb->kind == JOB_DECODE ? jb->kv_dtype : MHA_F32;
    if (opt.kv_dtype != MHA_F32) {   /* the cache in 16 bits */
        if (!(kh = malloc(nkv * 2)) || !(vh = malloc(nkv * 2)) ||
            mha_convert(nkv, MHA_F32, k, opt.kv_dtype, kh, NULL) != MHA_OK ||
            mha_convert(nkv, MHA_F32, v, opt.kv_dtype, vh, NULL) != MHA_OK)
            return r;
        kx = kh; vx = vh;
    }
    if (jb->kind == JOB_NAIVE_DECODE && !(att = (float *)malloc((size_t)H * Lk * sizeof(float)))) return r;
    if (jb->kind != JOB_STREAM && jb->kind != JOB_NAIVE_DECODE) {
        if (mha_sdpa_plan_size(1, H, Lq, Lk, D, D, &opt, 0, &sz, NULL) != MHA_OK ||
            !(run.workspace = malloc(sz.workspace)))
            return r;
        run.workspace_bytes = sz.workspace;
    }
    t_start = now_s(jb->threads);
    for (i = -1; i < jb->max_reps && i < 64; ++i) {
        double t0 = now_s(jb->threads), t1;
        if (jb->kind == JOB_STREAM) {            /* read K and V once: the bandwidth bound */
            float part[64] = {0};                /* one sum per thread, each over its share */
            int u;
#if defined(_OPENMP)
#pragma omp parallel num_threads(jb->threads)
#endif
            {
                float acc[16] = {0};
                size_t j, lo = 0, hi = nread / 16;
                int tid = 0, nt = 1, w;
#if defined(_OPENMP)
                tid = omp_get_thread_num(); nt = omp_get_num_threads();
#endif
                lo = hi * (size_t)tid / (size_t)nt * 16;
                hi = hi * (size_t)(tid + 1) / (size_t)nt * 16;
                for (j = lo; j < hi; j += 16) for (w = 0; w < 16; ++w) acc[w] += k[j + w] + v[j + w];
                for (w = 0; w < 16; ++w) part[tid & 63] += acc[w];
            }
            for (u = 0; u < 64; ++u) sink += part[u];
        } else if (jb->kind == JOB_NAIVE_DECODE) {
            naive_decode(H, Hkv, Lk, D, q, k, v, att, out, jb->threads);
        } else if (mha_sdpa_forward(1, H, Lq, Lk, D, D, q, kx, vx, &opt, out, &run, NULL) != MHA_OK) {
            return r;
        }
        t1 = now_s(jb->threads);
        if (i >= 0) times[r.reps++] = t1 - t0;
        else t_start = t1;
        if (r.reps >= 3 && t1 - t_start >= jb->min_time) break;
    }
    median_result(&r, times);
    (void)sink;   /* written only so that the reads above cannot be dropped */
    free(q); free(out); free(k); free(v); free(att); free(run.workspace); free(kh); free(vh);
    return r;
}

/* ---- table 5: training (forward + backward), against the FMA peak of this run */

/* The FMA peak: 12 independent chains of vector fused multiply-adds per
   thread (more than latency x pipes on current cores), GFLOP/s. */
static float fma_chains(long n, float s)
{
    mha__vf c[12];
    const mha__vf m = mha__vset1(0.9999999f), a = mha__vset1(1e-7f);
    long i;
    int u;
    for (u = 0; u < 12; ++u) c[u] = mha__vset1(s + (float)u);
    for (i = 0; i < n; ++i)
        for (u = 0; u < 12; ++u) c[u] = mha__vfma(a, c[u], m);
    for (u = 1; u < 12; ++u) c[0] = mha__vadd(c[0], c[u]);
    return mha__vhsum(c[0]);
}
static result run_peak_job(const job *jb)
{
    result r;
    double times[16];
    const long n = 4000000L;
    volatile float keep = 0.0f;
    memset(&r, 0, sizeof r);
    for (r.reps = 0; r.reps < 7; ++r.reps) {
        double t0 = now_s(jb->threads);
        float acc = 0.0f;
#ifdef _OPENMP
#pragma omp parallel num_threads(jb->threads) reduction(+ : acc)
        acc += fma_chains(n, (float)omp_get_thread_num());
#else
        acc = fma_chains(n, 0.0f);
#endif
        keep += acc;
        times[r.reps] = now_s(jb->threads) - t0;
    }
    (void)keep;   /* written only so that the FMA chains cannot be dropped */
    qsort(times, (size_t)r.reps, sizeof(double), cmp_double);
    /* reported as the ms of a nominal 1 GFLOP, so GFLOP/s = 1e3 / ms */
    r.ms = 1e3 * times[r.reps / 2] / (24.0 * MHA__VW * (double)n * jb->threads * 1e-9);
    r.ok = 1;
    return r;
}

/* One training step's compute, in this process: the module's forward +
   backward (all weight gradients and dx), or the encoder layer's forward +
   backward + AdamW on all its parameters.  Through a training plan made
   once (as PyTorch's modules are): its forward run writes the saved forward
   into run.saved (sizes.saved bytes, allocated once) and the backward run
   reads it from there (docs/api.md). */
static result run_train_job(const job *jb)
{
    result r;
    double times[64], t_start;
    const int B = jb->B, L = jb->L, E = jb->E, H = jb->H, F = 4 * jb->E;
    const size_t nx = (size_t)B * L * E;
    /* parameters, one buffer: in_proj [3E,E]+[3E], out [E,E]+[E], then (encoder)
       linear1 [F,E]+[F], linear2 [E,F]+[E], norm1, norm2 [E]+[E] each */
    const size_t n_attn = 4 * (size_t)E * E + 4 * (size_t)E;
    const size_t n_par = n_attn + (jb->kind == JOB_ENCSTEP ? 2 * (size_t)F * E + F + 5 * (size_t)E : 0);
    float *x = malloc(nx * 4), *y = malloc(nx * 4), *dy = malloc(nx * 4), *dx = malloc(nx * 4);
    float *par = malloc(n_par * 4), *g = malloc(n_par * 4), *am = calloc(n_par, 4), *av = calloc(n_par, 4);
    mha_encoder_layer enc = mha_encoder_layer_defaults();
    mha_encoder_layer_grad eg;
    mha_module *m = &enc.self_attn;
    mha_module_grad *mg = &eg.self_attn;
    mha_adamw aw = mha_adamw_defaults();
    mha_options opt = {0};
    mha_sizes sz;
    mha_run run = {0};
    mha_error err;
    mha_plan *plan = NULL;
    float *q;
    int i;
    memset(&r, 0, sizeof r);
    memset(&eg, 0, sizeof eg);
    if (!x || !y || !dy || !dx || !par || !g || !am || !av) return r;
    fill(x, nx, 1, 1.0f); fill(dy, nx, 2, 1.0f); fill(par, n_par, 3, 0.05f);
    opt.num_threads = jb->threads;
    q = par;   g[0] = 0.0f;
    m->embed_dim = E; m->num_heads = H;
    m->in_proj_weight = q; mg->in_proj_weight = g + (q - par); q += 3 * (size_t)E * E;
    m->in_proj_bias = q;   mg->in_proj_bias = g + (q - par);   q += 3 * (size_t)E;
    m->out_proj_weight = q; mg->out_proj_weight = g + (q - par); q += (size_t)E * E;
    m->out_proj_bias = q;   mg->out_proj_bias = g + (q - par);   q += E;
    if (jb->kind == JOB_ENCSTEP) {
        enc.dim_feedforward = F;
        enc.linear1_weight = q; eg.linear1_weight = g + (q - par); q += (size_t)F * E;
        enc.linear1_bias = q;   eg.linear1_bias = g + (q - par);   q += F;
        enc.linear2_weight = q; eg.linear2_weight = g + (q - par); q += (size_t)E * F;
        enc.linear2_bias = q;   eg.linear2_bias = g + (q - par);   q += E;
        for (i = 0; i < E; ++i) q[i] = 1.0f;   /* LayerNorm weights 1, biases as filled */
        enc.norm1_weight = q; eg.norm1_weight = g + (q - par); q += E;
        enc.norm1_bias = q;   eg.norm1_bias = g + (q - par);   q += E;
        for (i = 0; i < E; ++i) q[i] = 1.0f;
        enc.norm2_weight = q; eg.norm2_weight = g + (q - par); q += E;
        enc.norm2_bias = q;   eg.norm2_bias = g + (q - par);
        if (mha_encoder_plan(&enc, B, L, &opt, MHA_PLAN_TRAINING, NULL, 0, &plan, &err) != MHA_OK) goto fail;
    } else {
        if (mha_module_plan(m, B, L, L, &opt, MHA_PLAN_TRAINING, NULL, 0, &plan, &err) != MHA_OK) goto fail;
    }
    if (mha_plan_sizes(plan, &sz, &err) != MHA_OK) goto fail;
    run.workspace = malloc(sz.workspace);
    run.workspace_bytes = sz.workspace;
    run.saved = malloc(sz.saved);   /* the forward writes it, the backward reads it */
    run.saved_bytes = sz.saved;
    if (!run.workspace || !run.saved) return r;
    t_start = now_s(jb->threads);
    for (i = -1; i < jb->max_reps && i < 64; ++i) {   /* i = -1: warm-up */
        double t0 = now_s(jb->threads), t1;
        mha_status st;
        memset(g, 0, n_par * 4);
        memset(dx, 0, nx * 4);
        if (jb->kind == JOB_ENCSTEP) {
            st = mha_encoder_run_forward(plan, L, x, y, &run, &err);
            if (st == MHA_OK) st = mha_encoder_run_backward(plan, L, x, dy, dx, &eg, &run, &err);
            if (st == MHA_OK) st = mha_adamw_step(&aw, i + 2, n_par, par, g, am, av, &err);
        } else {
            st = mha_module_run_forward(plan, L, L, x, x, x, y, &run, &err);
            if (st == MHA_OK) st = mha_module_run_backward(plan, L, L, x, x, x, dy, dx, dx, dx, mg, &run, &err);
        }
        t1 = now_s(jb->threads);
        if (st != MHA_OK) goto fail;
        if (i >= 0) times[r.reps++] = t1 - t0;
        else t_start = t1;
        if (r.reps >= 3 && t1 - t_start >= jb->min_time) break;
    }
    median_result(&r, times);
    free(x); free(y); free(dy); free(dx); free(par); free(g); free(am); free(av);
    free(run.workspace); free(run.saved);
    mha_plan_destroy(plan);
    return r;
fail:
    fprintf(stderr, "bench: %s\n", err.message);
    return r;
}

/* Time fn-style work in this process; called in the child. */
static result run_job(const job *jb)
{
    result r;
    double times[64];
    int E = jb->E, B = jb->B, L = jb->L, H = jb->H, D = E / H, i;
    size_t nx = (size_t)B * L * E, nw = jb->fused ? 0 : (size_t)B * (jb->sdpa ? H : 1) * L * L;
    float *x, *k = NULL, *v = NULL, *out, *w = NULL, *w_in = NULL, *b_in = NULL, *w_out = NULL, *b_out = NULL;
    const unsigned flags = jb->fused ? 0u : MHA_PLAN_WEIGHTS;
    mha_module m;
    mha_options opt;
    mha_sizes sz;
    mha_plan *plan = NULL;
    mha_run run = {0};
    mha_error err;
    double t_start;
    if (jb->kind == JOB_PEAK) return run_peak_job(jb);
    if (jb->kind == JOB_FWDBWD || jb->kind == JOB_ENCSTEP) return run_train_job(jb);
    if (jb->kind != JOB_MHA) return run_decode_job(jb);
    memset(&r, 0, sizeof r);
    r.base_mib = peak_rss_mib();
    memset(&opt, 0, sizeof opt);
    opt.num_threads = jb->threads;
    memset(&m, 0, sizeof m);
    x = (float *)malloc(nx * sizeof(float));
    out = (float *)malloc(nx * sizeof(float));
    if (nw) w = (float *)malloc(nw * sizeof(float));
    fill(x, nx, 1, 1.0f);
    if (jb->sdpa) {
        k = (float *)malloc(nx * sizeof(float));
        v = (float *)malloc(nx * sizeof(float));
        fill(k, nx, 2, 1.0f); fill(v, nx, 3, 1.0f);
        if (mha_sdpa_plan_size(B, H, L, L, D, D, &opt, flags, &sz, &err) != MHA_OK) goto fail;
        r.io_mib = (3.0 * nx + nx + nw) * sizeof(float) / 1048576.0;
    } else {
        w_in = (float *)malloc((size_t)3 * E * E * sizeof(float));
        b_in = (float *)malloc((size_t)3 * E * sizeof(float));
        w_out = (float *)malloc((size_t)E * E * sizeof(float));
        b_out = (float *)malloc((size_t)E * sizeof(float));
        fill(w_in, (size_t)3 * E * E, 4, 0.05f); fill(b_in, (size_t)3 * E, 5, 0.1f);
        fill(w_out, (size_t)E * E, 6, 0.05f); fill(b_out, (size_t)E, 7, 0.1f);
        m.embed_dim = E; m.num_heads = H;
        m.in_proj_weight = w_in; m.in_proj_bias = b_in; m.out_proj_weight = w_out; m.out_proj_bias = b_out;
        if (jb->packed) {   /* once, like a model that is loaded once and run many times */
            if (mha_module_plan(&m, B, L, L, &opt, flags | MHA_PLAN_PACK, NULL, 0, &plan, &err) != MHA_OK ||
                mha_plan_sizes(plan, &sz, &err) != MHA_OK)
                goto fail;
        } else if (mha_module_plan_size(&m, B, L, L, &opt, flags, &sz, &err) != MHA_OK) {
            goto fail;
        }
        r.io_mib = ((double)nx + nx + nw + 4.0 * E * E + 4.0 * E) * sizeof(float) / 1048576.0;
    }
    run.workspace = malloc(sz.workspace);
    run.workspace_bytes = sz.workspace;
    run.weights = w;   /* NULL on the fused rows */
    if (!x || !out || (nw && !w) || !run.workspace || (jb->sdpa && (!k || !v))) return r;
    t_start = now_s(jb->threads);
    for (i = -1; i < jb->max_reps && i < 64; ++i) {   /* i = -1: warm-up, not timed */
        double t0 = now_s(jb->threads);
        mha_status s = jb->sdpa ? mha_sdpa_forward(B, H, L, L, D, D, x, k, v, &opt, out, &run, &err)
                       : plan   ? mha_module_run_forward(plan, L, L, x, x, x, out, &run, &err)
                                : mha_module_forward(&m, B, L, L, x, x, x, &opt, out, &run, &err);
        double t1 = now_s(jb->threads);
        if (s != MHA_OK) goto fail;
        if (i >= 0) times[r.reps++] = t1 - t0;
        if (i < 0) t_start = t1;
        if (r.reps >= 3 && t1 - t_start >= jb->min_time) break;
        /* max_reps 0: one run, the warm-up is the measurement */
        if (i < 0 && jb->max_reps == 0) { times[r.reps++] = t1 - t0; break; }
    }
    qsort(times, (size_t)r.reps, sizeof(double), cmp_double);
    r.ms = r.reps ? 1e3 * (r.reps % 2 ? times[r.reps / 2] : 0.5 * (times[r.reps / 2 - 1] + times[r.reps / 2])) : 0;
    r.rss_mib = peak_rss_mib();
    r.ok = r.reps > 0;
    return r;   /* the child exits: its buffers and plan go with it */
fail:
    fprintf(stderr, "bench: %s\n", err.message);
    return r;
}

/* Run a job in a child process and collect its result through a pipe. */
static result run_forked(const job *jb)
{
    result r;
    int fd[2], status;
    pid_t pid;
    memset(&r, 0, sizeof r);
    fflush(stdout);
    if (pipe(fd) != 0) return r;
    pid = fork();
    if (pid == 0) {
        result c = run_job(jb);
        ssize_t n;
        close(fd[0]);
        n = write(fd[1], &c, sizeof c);
        _exit(n == (ssize_t)sizeof c ? 0 : 1);
    }
    close(fd[1]);
    if (pid < 0 || read(fd[0], &r, sizeof r) != (ssize_t)sizeof r) memset(&r, 0, sizeof r);
    close(fd[0]);
    waitpid(pid, &status, 0);
    return r;
}

static double mha_flops(int B, int L, int E)
{
    return 8.0 * B * L * (double)E * E + 4.0 * B * (double)L * L * E;
}

/* PyTorch's medians, read from bench/torch_mha.py: [shape][threads-1][need_weights] */
static const int shapes[][2] = {{1, 128}, {8, 128}, {1, 512}, {1, 2048}, {4, 1024}};
#define NSHAPES (int)(sizeof shapes / sizeof shapes[0])
static double torch_ms[NSHAPES][2][2];

static void run_torch(void)
{
    int t;
    for (t = 1; t <= 2; ++t) {
        char cmd[256], line[256];
        FILE *p;
        snprintf(cmd, sizeof cmd,
                 "OPENBLAS_NUM_THREADS=%d OMP_NUM_THREADS=%d MKL_NUM_THREADS=%d "
                 "/usr/bin/python3 bench/torch_mha.py --threads %d 2>/dev/null", t, t, t, t);
        p = popen(cmd, "r");
        if (!p) return;
        while (fgets(line, sizeof line, p)) {
            int B, L, th, need, s;
            double ms;
            if (sscanf(line, "torch %d %d %d %d %lf", &B, &L, &th, &need, &ms) != 5) continue;
            for (s = 0; s < NSHAPES; ++s)
                if (shapes[s][0] == B && shapes[s][1] == L && th >= 1 && th <= 2 && (need == 0 || need == 1))
                    torch_ms[s][th - 1][need] = ms;
        }
        pclose(p);
    }
}

/* Table 5: PyTorch's training medians (bench/torch_mha.py --train):
   [shape][threads-1]; shape NTRAIN is the encoder step. */
static const int train_shapes[][2] = {{1, 128}, {8, 128}, {1, 512}, {1, 2048}};
#define NTRAIN (int)(sizeof train_shapes / sizeof train_shapes[0])
static double torch_train_ms[NTRAIN + 1][2];

static void run_torch_train(void)
{
    int t;
    for (t = 1; t <= 2; ++t) {
        char cmd[256], line[256], what[16];
        FILE *p;
        snprintf(cmd, sizeof cmd,
                 "OPENBLAS_NUM_THREADS=%d OMP_NUM_THREADS=%d MKL_NUM_THREADS=%d "
                 "/usr/bin/python3 bench/torch_mha.py --threads %d --train 2>/dev/null", t, t, t, t);
        if (!(p = popen(cmd, "r"))) return;
        while (fgets(line, sizeof line, p)) {
            int B, L, th, s;
            double ms;
            if (sscanf(line, "torchtrain %15s %d %d %d %lf", what, &B, &L, &th, &ms) != 5 || th < 1 || th > 2)
                continue;
            if (!strcmp(what, "encstep")) torch_train_ms[NTRAIN][th - 1] = ms;
            else
                for (s = 0; s < NTRAIN; ++s)
                    if (train_shapes[s][0] == B && train_shapes[s][1] == L) torch_train_ms[s][th - 1] = ms;
        }
        pclose(p);
    }
}

/* One row of table 5: mha.h's median, GFLOP/s, % of the peak of this run,
   PyTorch's median and the ratio. */
static void train_row(const char *name, int kind, int B, int L, int t, double flops,
                      const double *peak, double torch_ms_t)
{
    job jb;
    result r;
    char shape[32];
    memset(&jb, 0, sizeof jb);
    jb.kind = kind; jb.B = B; jb.L = L; jb.E = E_DIM; jb.H = N_HEADS;
    jb.threads = t; jb.min_time = 0.5; jb.max_reps = 20;
    r = run_forked(&jb);
    snprintf(shape, sizeof shape, "%d,%d", B, L);
    if (!r.ok) { printf("%-9s %-16s %3d  failed\n", shape, name, t); return; }
    printf("%-9s %-16s %3d %9.3f %8.1f %6.0f%%", shape, name, t, r.ms, flops / (r.ms * 1e6),
           100.0 * flops / (r.ms * 1e6) / peak[t - 1]);
    if (torch_ms_t > 0) printf(" %9.3f %6.2fx\n", torch_ms_t, torch_ms_t / r.ms);
    else printf(" %9s %7s\n", "-", "-");
}

/* The FMA peak of this run, GFLOP/s on 1 and 2 threads (0 if it failed). */
static void measure_peak(double peak[2])
{
    int t;
    for (t = 1; t <= 2; ++t) {
        job jb;
        result r;
        memset(&jb, 0, sizeof jb);
        jb.kind = JOB_PEAK; jb.threads = t;
        r = run_forked(&jb);
        peak[t - 1] = r.ok ? 1e3 / r.ms : 0.0;
    }
}

static void train_table(int torch)
{
    double peak[2];
    int s, t;
    if (torch) {
        printf("running bench/torch_mha.py --train (autograd, 1 and 2 threads)...\n");
        run_torch_train();
    }
    measure_peak(peak);
    printf("\n== training, E=%d, H=%d (%s build): FMA peak of this run %.1f GFLOP/s (1 thread), %.1f (2)\n",
           E_DIM, N_HEADS, MHA__SIMD_NAME, peak[0], peak[1]);
    printf("   fwd+bwd = training plan: mha_module_run_forward + mha_module_run_backward (dx, all weight\n"
           "             gradients, the saved forward in run.saved) vs torch autograd;\n");
    printf("   enc step = encoder layer F=%d forward + backward + AdamW vs nn.TransformerEncoderLayer\n", 4 * E_DIM);
    printf("   + torch.optim.AdamW.  FLOPs = 3 x the forward's (AdamW not counted); ratio = torch / mha.h\n");
    printf("%-9s %-16s %3s %9s %8s %7s %9s %7s\n", "B,L", "what", "thr", "ms", "GFLOP/s", "%peak",
           "torch ms", "ratio");
    for (s = 0; s < NTRAIN; ++s)
        for (t = 1; t <= 2; ++t)
            train_row("fwd+bwd", JOB_FWDBWD, train_shapes[s][0], train_shapes[s][1], t,
                      3.0 * mha_flops(train_shapes[s][0], train_shapes[s][1], E_DIM), peak,
                      torch_train_ms[s][t - 1]);
    for (t = 1; t <= 2; ++t)
        train_row("enc step", JOB_ENCSTEP, 8, 128, t,
                  3.0 * (mha_flops(8, 128, E_DIM) + 4.0 * 8 * 128 * (double)E_DIM * 4 * E_DIM), peak,
                  torch_train_ms[NTRAIN][t - 1]);
}

/* Table 4: decoding, prefill with GQA, sliding window. */
static result decode_row_t(int kind, mha_dtype t, int H, int Hkv, int Lk, int D, int window, int threads,
                           double min_time)
{
    job jb;
    memset(&jb, 0, sizeof jb);
    jb.kind = kind; jb.kv_dtype = t; jb.H = H; jb.Hkv = Hkv; jb.Lk = Lk; jb.D = D; jb.window = window;
    jb.threads = threads; jb.min_time = min_time; jb.max_reps = 30;
    return run_forked(&jb);
}
static result decode_row(int kind, int H, int Hkv, int Lk, int D, int window, int threads, double min_time)
{
    return decode_row_t(kind, MHA_F32, H, Hkv, Lk, D, window, threads, min_time);
}

static void decode_table(void)
{
    /* Hkv 32: one query per KV head, the shape ggml's side-by-side bench
       times (docs/performance.md), bound by the memory; Hkv 8: a group of
       4 queries per K/V row, bound by the FMAs on a core that reads fast */
    static const int hkvs[] = {32, 8}, lks[2][2] = {{4096, 16384}, {4096, 32768}};
    static const mha_dtype types[] = {MHA_F32, MHA_F16, MHA_BF16};
    static const char *const tnames[] = {"f32", "f16", "bf16"};
    int i, t, y, h;
    printf("\n== decoding: one step, Lq = 1, H = 32, Hkv = 32 and 8, D = 128, K/V cache of f32, f16, bf16\n");
    printf("   (mha_sdpa_forward, opt.kv_dtype); GB/s = K+V bytes / time; stream = a plain read\n");
    printf("   of as many bytes, this run; llama2.c = a plain per-head C loop over f32 (scores,\n");
    printf("   softmax, weighted sum)\n");
    printf("%-5s %-4s %-6s %3s %9s %8s %9s %7s %12s %8s\n", "K/V", "Hkv", "Lk", "thr", "ms", "GB/s", "stream", "%bw",
           "llama2.c ms", "speed-up");
    for (h = 0; h < 2; ++h)
        for (y = 0; y < 3; ++y)
            for (i = 0; i < 2; ++i)
                for (t = 1; t <= 2; ++t) {
                    int hkv = hkvs[h], lk = lks[h][i];
                    double bytes = 2.0 * hkv * lk * 128 * (double)mha_dtype_size(types[y]);
                    result m = decode_row_t(JOB_DECODE, types[y], 32, hkv, lk, 128, 0, t, 0.5);
                    result st = decode_row_t(JOB_STREAM, types[y], 32, hkv, lk, 128, 0, t, 0.3);
                    result nv = y ? m : decode_row(JOB_NAIVE_DECODE, 32, hkv, lk, 128, 0, t, 0.5);
                    if (!m.ok || !st.ok || !nv.ok) {
                        printf("%-5s %-4d %-6d %3d  failed\n", tnames[y], hkv, lk, t);
                        continue;
                    }
                    printf("%-5s %-4d %-6d %3d %9.3f %8.2f %9.2f %6.0f%%", tnames[y], hkv, lk, t, m.ms,
                           bytes / (m.ms * 1e6), bytes / (st.ms * 1e6), 100.0 * st.ms / m.ms);
                    if (y) printf("\n");
                    else printf(" %12.3f %7.2fx\n", nv.ms, nv.ms / m.ms);
                }
    printf("\n== prefill with GQA: mha_sdpa_forward L = 2048, H = 8, D = 64, no mask; GFLOP/s = 4 H L^2 D / time\n");
    printf("%-10s %3s %9s %8s\n", "Hkv", "thr", "ms", "GFLOP/s");
    for (i = 0; i < 2; ++i)
        for (t = 1; t <= 2; ++t) {
            int hkv = i == 0 ? 8 : 2;
            result m = decode_row(JOB_GQA_PREFILL, 8, hkv, 2048, 64, 0, t, 0.5);
            if (!m.ok) { printf("%-10d %3d  failed\n", hkv, t); continue; }
            printf("%-10s %3d %9.3f %8.1f\n", i == 0 ? "8 (MHA)" : "2 (GQA)", t, m.ms,
                   4.0 * 8 * 2048.0 * 2048 * 64 / (m.ms * 1e6));
        }
    printf("\n== sliding window: mha_sdpa_forward causal, L = 16384, one head of 64, 1 thread\n");
    {
        result full = decode_row(JOB_WINDOW, 1, 1, 16384, 64, 0, 1, 0.0);
        result win = decode_row(JOB_WINDOW, 1, 1, 16384, 64, 256, 1, 0.3);
        if (full.ok && win.ok)
            /* the keys a row sees: W + 1 in the window, (L + 1) / 2 on average under causal */
            printf("full causal %.1f ms, window W = 256 %.2f ms: %.4f of full; the keys' share "
                   "2 (W + 1) / (L + 1) = %.4f (issue 19's goal <= 1.5 W / L = %.4f)\n",
                   full.ms, win.ms, win.ms / full.ms, 2.0 * 257 / 16385, 1.5 * 256 / 16384);
        else printf("failed\n");
    }
}

int main(int argc, char **argv)
{
    int quick = 0, torch = 1, train_only = 0, a, s, t, f;
    double peak[2];
    for (a = 1; a < argc; ++a) {
        if (!strcmp(argv[a], "--quick")) quick = 1;
        else if (!strcmp(argv[a], "--no-torch")) torch = 0;
        else if (!strcmp(argv[a], "--decode")) { decode_table(); return 0; }
        else if (!strcmp(argv[a], "--train")) train_only = 1;
        else { fprintf(stderr, "usage: %s [--quick] [--no-torch] [--decode] [--train]\n", argv[0]); return 2; }
    }
    printf("mha.h %d.%d.%d, SIMD: %s, OpenMP: %s, OMP_WAIT_POLICY=%s\n", MHA_VERSION_MAJOR,
           MHA_VERSION_MINOR, MHA_VERSION_PATCH, MHA__SIMD_NAME,
#ifdef _OPENMP
           "yes",
#else
           "no (thread counts are ignored)",
#endif
           getenv("OMP_WAIT_POLICY") ? getenv("OMP_WAIT_POLICY") : "(unset)");
    if (train_only) { train_table(torch); return 0; }
    if (torch) {
        printf("running bench/torch_mha.py (PyTorch nn.MultiheadAttention, 1 and 2 threads)...\n");
        run_torch();
    }

    measure_peak(peak);
    printf("\n== MHA forward, E=%d, H=%d, self attention; median ms; ratio = torch ms / mha.h ms\n",
           E_DIM, N_HEADS);
    printf("   %%peak = GFLOP/s / the FMA peak of this run: %.1f GFLOP/s (1 thread), %.1f (2)\n",
           peak[0], peak[1]);
    printf("   fused = no weights (torch need_weights=False), unfused = averaged weights (need_weights=True)\n");
    printf("   plain rows: the one-shot mha_module_forward; +packed: runs of a plan made with MHA_PLAN_PACK\n");
    printf("   1 thread: CPU time, 2 threads: wall clock; 2t/1t = speed-up of the 2-thread row\n");
    printf("%-9s %-14s %3s %9s %8s %6s %6s %9s %9s %7s\n", "B,L", "path", "thr", "ms", "GFLOP/s", "%peak",
           "2t/1t", "peak MiB", "torch ms", "ratio");
    for (s = 0; s < NSHAPES; ++s)
        for (f = 3; f >= 0; --f) {   /* fused+packed, fused, unfused+packed, unfused */
            double ms1 = 0;
            const char *path = f == 3 ? "fused+packed" : f == 2 ? "fused" : f == 1 ? "unfused+packed" : "unfused";
            for (t = 1; t <= 2; ++t) {
                job jb;
                result r;
                char shape[32], speedup[16];
                double tm = torch_ms[s][t - 1][f < 2];
                memset(&jb, 0, sizeof jb);
                jb.B = shapes[s][0]; jb.L = shapes[s][1]; jb.E = E_DIM; jb.H = N_HEADS;
                jb.threads = t; jb.fused = f >= 2; jb.packed = f % 2; jb.min_time = 0.5; jb.max_reps = 30;
                r = run_forked(&jb);
                snprintf(shape, sizeof shape, "%d,%d", jb.B, jb.L);
                if (!r.ok) { printf("%-9s %-14s %3d  failed\n", shape, path, t); continue; }
                if (t == 1) { ms1 = r.ms; snprintf(speedup, sizeof speedup, "-"); }
                else snprintf(speedup, sizeof speedup, "%.2fx", ms1 / r.ms);
                printf("%-9s %-14s %3d %9.3f %8.1f %5.1f%% %6s %9.1f", shape, path, t, r.ms,
                       mha_flops(jb.B, jb.L, jb.E) / (r.ms * 1e6),
                       100.0 * mha_flops(jb.B, jb.L, jb.E) / (r.ms * 1e6) / peak[t - 1], speedup, r.rss_mib);
                if (tm > 0) printf(" %9.3f %6.2fx\n", tm, tm / r.ms);
                else printf(" %9s %7s\n", "-", "-");
            }
        }

    printf("\n== attention core alone: mha_sdpa_forward, B=1, H=8, D=64, no mask, fused\n");
    printf("   FLOPs 4 H L^2 D (QK^T and PV)\n");
    printf("%-6s %3s %9s %8s %6s %6s\n", "L", "thr", "ms", "GFLOP/s", "%peak", "2t/1t");
    {
        static const int ls[] = {512, 1024, 2048, 4096};
        int i;
        for (i = 0; i < 4; ++i) {
            double ms1 = 0;
            for (t = 1; t <= 2; ++t) {
                job jb;
                result r;
                memset(&jb, 0, sizeof jb);
                jb.sdpa = 1; jb.B = 1; jb.L = ls[i]; jb.E = 512; jb.H = 8;
                jb.threads = t; jb.fused = 1; jb.min_time = 0.5; jb.max_reps = 30;
                r = run_forked(&jb);
                if (!r.ok) { printf("%-6d %3d  failed\n", ls[i], t); continue; }
                printf("%-6d %3d %9.3f %8.1f %5.1f%%", ls[i], t, r.ms, 4.0 * 8 * (double)ls[i] * ls[i] * 64 / (r.ms * 1e6),
                       100.0 * 4.0 * 8 * (double)ls[i] * ls[i] * 64 / (r.ms * 1e6) / peak[t - 1]);
                if (t == 1) { ms1 = r.ms; printf(" %6s\n", "-"); }
                else printf(" %5.2fx\n", ms1 / r.ms);
            }
        }
    }

    if (!quick) {
        static const int cfg[2][3] = {{16384, 512, 8}, {65536, 64, 1}};
        int i;
        printf("\n== long sequences, fused, B=1, 2 threads, one timed run each\n");
        printf("   in+out = x, weights and out; ratio = peak RSS / in+out (target <= 2)\n");
        printf("%-6s %4s %2s %10s %9s %9s %9s %6s\n", "L", "E", "H", "ms", "GFLOP/s", "peak MiB",
               "in+out", "ratio");
        for (i = 0; i < 2; ++i) {
            job jb;
            result r;
            memset(&jb, 0, sizeof jb);
            jb.B = 1; jb.L = cfg[i][0]; jb.E = cfg[i][1]; jb.H = cfg[i][2];
            jb.threads = 2; jb.fused = 1; jb.min_time = 0; jb.max_reps = 0;
            r = run_forked(&jb);
            if (!r.ok) { printf("%-6d %4d %2d  failed\n", jb.L, jb.E, jb.H); continue; }
            printf("%-6d %4d %2d %10.1f %9.1f %9.1f %9.1f %6.2f   (process RSS before tensors %.1f MiB)\n",
                   jb.L, jb.E, jb.H, r.ms, mha_flops(1, jb.L, jb.E) / (r.ms * 1e6), r.rss_mib,
                   r.io_mib, r.rss_mib / r.io_mib, r.base_mib);
        }
    }
    train_table(torch);
    decode_table();
    return 0;
}
