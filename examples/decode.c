/* decode.c - prefill a prompt, then generate tokens one at a time through a
   KV cache, printing the time per step (docs/decoding.md).
     cc -std=c99 -O2 -march=native -I. examples/decode.c -o decode -lm
     ./decode [prompt_len] [steps] [f32|f16|bf16]

   The model is one attention layer in the shape of a small llama block:
   E = 512, H = 8 query heads, Hkv = 2 KV heads (GQA), D = 64, RoPE
   (rotate_half, theta 10000), random weights.  "Generating" feeds each
   step's output, scaled to unit RMS, back in as the next token's input, so
   every step depends on the one before, as in a real decoder.  The cache is
   plain caller memory: k, v [B, Hkv, capacity, D] and len[B].

   The layer is planned once (mha_module_plan with MHA_PLAN_CACHE |
   MHA_PLAN_PACK: shapes checked, weights packed for the kernels) for up to P
   new tokens against a cache of `capacity`; every step is then a run of that plan with
   mha_run.cache set: project the new tokens, turn them by RoPE, append
   their K and V to the cache and attend to all of it.  The third argument
   stores the weights and the cache in 16 bits, as a checkpoint and a
   decoder runtime keep them: the weights given as F16 or BF16
   (m.weight_dtype; the plan widens them as it packs them), the cache at
   half the memory (cache.dtype and the plan's opt.kv_dtype; keys and
   values rounded to nearest even as they are appended).  The outputs then
   differ from float32's by about the type's rounding (out[0] is printed
   to compare).  */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "examples/tiny_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv)
{
    const int E = 512, H = 8, Hkv = 2, D = E / H, Ekv = Hkv * D;
    int P = argc > 1 ? atoi(argv[1]) : 100, N = argc > 2 ? atoi(argv[2]) : 20;
    const char *type = argc > 3 ? argv[3] : "f32";
    mha_dtype dt = !strcmp(type, "f16") ? MHA_F16 : !strcmp(type, "bf16") ? MHA_BF16 : MHA_F32;
    int cap, step, i, len = 0;
    float *wq, *wk, *wv, *wo, *x, *y;
    void *ck, *cv, *w16 = NULL;
    mha_module m = {0};
    mha_kv_cache cache = {0};
    mha_options opt = {0};
    mha_sizes sizes;
    mha_plan *plan;
    mha_run run = {0};
    mha_error err;
    tiny_rng rng;
    mha_status s;
    double t0, t1, total = 0;

    if (P < 1 || N < 1 || (dt == MHA_F32 && strcmp(type, "f32"))) {
        fprintf(stderr, "usage: %s [prompt_len >= 1] [steps >= 1] [f32|f16|bf16]\n", argv[0]);
        return 1;
    }
    cap = P + N;
    wq = malloc((size_t)E * E * sizeof(float)); wk = malloc((size_t)Ekv * E * sizeof(float));
    wv = malloc((size_t)Ekv * E * sizeof(float)); wo = malloc((size_t)E * E * sizeof(float));
    x = malloc((size_t)P * E * sizeof(float)); y = malloc((size_t)P * E * sizeof(float));
    ck = malloc((size_t)Hkv * cap * D * mha_dtype_size(dt)); cv = malloc((size_t)Hkv * cap * D * mha_dtype_size(dt));
    if (!wq || !wk || !wv || !wo || !x || !y || !ck || !cv) { fprintf(stderr, "out of memory\n"); return 1; }
    tiny_rng_seed(&rng, 1);
    tiny_rng_fill(&rng, wq, (size_t)E * E, 0.05f); tiny_rng_fill(&rng, wk, (size_t)Ekv * E, 0.05f);
    tiny_rng_fill(&rng, wv, (size_t)Ekv * E, 0.05f); tiny_rng_fill(&rng, wo, (size_t)E * E, 0.05f);
    tiny_rng_fill(&rng, x, (size_t)P * E, 1.0f);

    m.embed_dim = E; m.num_heads = H; m.num_kv_heads = Hkv;
    m.q_proj_weight = wq; m.k_proj_weight = wk; m.v_proj_weight = wv; m.out_proj_weight = wo;
    if (dt != MHA_F32) {   /* the weights as a 16-bit checkpoint holds them: Wq, Wk, Wv, Wo in one buffer */
        size_t nq = (size_t)E * E, nk = (size_t)Ekv * E;
        unsigned short *h = malloc((2 * nq + 2 * nk) * sizeof(unsigned short));
        if (!h || mha_convert(nq, MHA_F32, wq, dt, h, &err) || mha_convert(nk, MHA_F32, wk, dt, h + nq, &err) ||
            mha_convert(nk, MHA_F32, wv, dt, h + nq + nk, &err) ||
            mha_convert(nq, MHA_F32, wo, dt, h + nq + 2 * nk, &err)) {
            fprintf(stderr, "weights: out of memory or %s\n", err.message);
            return 1;
        }
        m.q_proj_weight = h; m.k_proj_weight = h + nq; m.v_proj_weight = h + nq + nk; m.out_proj_weight = h + nq + 2 * nk;
        m.weight_dtype = dt;
        w16 = h;
    }
    m.rope.kind = MHA_ROPE_HALF;                      /* theta 0 = 10000, rotary_dim 0 = D */
    cache.B = 1; cache.Hkv = Hkv; cache.D = D; cache.capacity = cap;
    cache.k = ck; cache.v = cv; cache.len = &len;
    cache.dtype = dt; opt.kv_dtype = dt;   /* the cache's storage, and the plan's: the same */
    opt.causal = 1;              /* the prompt attends causally; one new token sees the whole cache */

    /* plan once: up to P new tokens (the prompt) against `cap` cached ones,
       the weights packed into the plan; one workspace serves every step */
    if (mha_module_plan_size(&m, 1, P, cap, &opt, MHA_PLAN_CACHE | MHA_PLAN_PACK, &sizes, &err) != MHA_OK ||
        mha_module_plan(&m, 1, P, cap, &opt, MHA_PLAN_CACHE | MHA_PLAN_PACK, NULL, 0, &plan, &err) != MHA_OK) {
        fprintf(stderr, "plan: %s\n", err.message);
        return 1;
    }
    run.cache = &cache;
    run.workspace = malloc(sizes.workspace);
    run.workspace_bytes = sizes.workspace;
    if (!run.workspace) { fprintf(stderr, "out of memory\n"); return 1; }
    printf("plan: %.1f KiB (packed weights), workspace %.1f KiB, %s cache %.1f KiB\n", sizes.plan / 1024.0,
           sizes.workspace / 1024.0, type, 2.0 * Hkv * cap * D * (double)mha_dtype_size(dt) / 1024.0);

    /* prefill: the whole prompt in one run (Lk = 0: the keys are the cache's) */
    t0 = now();
    s = mha_module_run_forward(plan, P, 0, x, NULL, NULL, y, &run, &err);
    t1 = now();
    if (s != MHA_OK) { fprintf(stderr, "prefill: %s\n", err.message); return 1; }
    printf("prefill %d tokens: %.3f ms (%.1f us per token)\n", P, 1e3 * (t1 - t0), 1e6 * (t1 - t0) / P);

    /* decode: one token per step, the last output fed back in */
    for (step = 0; step < N; ++step) {
        const float *last = y + (size_t)(step == 0 ? P - 1 : 0) * E;
        double rms = 0;
        for (i = 0; i < E; ++i) rms += (double)last[i] * last[i];
        rms = sqrt(rms / E) + 1e-6;
        for (i = 0; i < E; ++i) x[i] = (float)(last[i] / rms);
        t0 = now();
        s = mha_module_run_forward(plan, 1, 0, x, NULL, NULL, y, &run, &err);
        t1 = now();
        if (s != MHA_OK) { fprintf(stderr, "step %d: %s\n", step, err.message); return 1; }
        total += t1 - t0;
        printf("step %3d: cache %5d tokens, %.3f ms, out[0] = %+.5f\n", step, len, 1e3 * (t1 - t0), y[0]);
    }
    printf("%d steps: %.3f ms per step on average\n", N, 1e3 * total / N);
    /* one more token than the cache holds: a status and why, nothing written */
    s = mha_module_run_forward(plan, 1, 0, x, NULL, NULL, y, &run, &err);
    printf("token %d of a %d-token cache: %s\n", len + 1, cap, s == MHA_OK ? "accepted?!" : err.message);
    free(wq); free(wk); free(wv); free(wo); free(x); free(y); free(ck); free(cv); free(run.workspace); free(w16);
    mha_plan_destroy(plan);
    return 0;
}
