/* bench/callgrind_backward.c - one backward on one thread, for instruction
   counts that a loaded machine does not change:
     gcc -std=c99 -O2 -mavx2 -mfma -fopenmp -I. bench/callgrind_backward.c -o build/cg -lm
     OMP_NUM_THREADS=1 valgrind --tool=callgrind --toggle-collect=mha_sdpa_run_backward ./build/cg sdpa
   what:  sdpa     SDPA, B 1, H 8, L 256, D 64           (collect mha_sdpa_run_backward)
          module   mha_module, E 512, H 8, B 1, L 128    (collect mha_module_run_backward)
          encoder  encoder layer, E 512, H 8, F 2048, B 1, L 128  (collect mha_encoder_run_backward)
   Each is a MHA_PLAN_TRAINING plan on one thread and one backward run of it.
   CAUSAL=1: causal.  SAVED=1: the plan's forward runs first with an explicit
   saved region (mha_run.saved, sizes.saved bytes) and the backward reads it;
   else the backward is given run.saved = NULL and computes the forward again
   (what the one-shot mha_<obj>_backward does).  Only the backward is counted
   (--toggle-collect), not the forward before it.  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned seed = 1;
static float *fill(size_t n, float a)
{
    float *x = (float *)malloc(n * sizeof(float));
    size_t i;
    for (i = 0; i < n; ++i) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = a * ((float)(seed >> 9) / 8388608.0f - 1.0f);
    }
    return x;
}
static double sum(const float *x, size_t n)
{
    double s = 0;
    size_t i;
    for (i = 0; i < n; ++i) s += x[i];
    return s;
}

/* Stop with the refusal's message (which call, which argument, why). */
static int fail(const mha_error *e)
{
    fprintf(stderr, "%s\n", e->message);
    return 1;
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "sdpa";
    int saved = getenv("SAVED") != NULL;
    mha_options o = {0};
    mha_plan *p = NULL;
    mha_sizes sz;
    mha_run r = {0};           /* the workspace, and with SAVED the saved region */
    mha_error e;
    double check = 0;
    o.num_threads = 1;
    o.causal = getenv("CAUSAL") != NULL;
    if (!strcmp(what, "sdpa")) {
        const int B = 1, H = 8, L = 256, D = 64;
        size_t n = (size_t)B * H * L * D;
        float *q = fill(n, 1), *k = fill(n, 1), *v = fill(n, 1), *dout = fill(n, 1), *out = fill(n, 1);
        float *dq = calloc(n, 4), *dk = calloc(n, 4), *dv = calloc(n, 4);
        if (mha_sdpa_plan(B, H, L, L, D, D, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &e) != MHA_OK ||
            mha_plan_sizes(p, &sz, &e) != MHA_OK)
            return fail(&e);
        r.workspace = malloc(sz.workspace);
        r.workspace_bytes = sz.workspace;
        if (saved) {
            r.saved = malloc(sz.saved);
            r.saved_bytes = sz.saved;
            if (mha_sdpa_run_forward(p, L, L, q, k, v, out, &r, &e) != MHA_OK) return fail(&e);
        }
        if (mha_sdpa_run_backward(p, L, L, q, k, v, dout, dq, dk, dv, &r, &e) != MHA_OK) return fail(&e);
        check = sum(dq, n) + sum(dk, n) + sum(dv, n);
    } else if (!strcmp(what, "module") || !strcmp(what, "encoder")) {
        const int E = 512, H = 8, F = 2048, B = 1, L = 128, enc = !strcmp(what, "encoder");
        size_t n = (size_t)B * L * E;
        float *win = fill((size_t)3 * E * E, 0.05f), *bin = fill((size_t)3 * E, 0.1f);
        float *wo = fill((size_t)E * E, 0.05f), *bo = fill((size_t)E, 0.1f);
        float *w1 = fill((size_t)F * E, 0.05f), *b1 = fill((size_t)F, 0.1f);
        float *w2 = fill((size_t)E * F, 0.05f), *b2 = fill((size_t)E, 0.1f);
        float *x = fill(n, 1), *dy = fill(n, 1), *y = fill(n, 1), *dx = calloc(n, 4);
        float *gin = calloc((size_t)3 * E * E, 4), *gw1 = calloc((size_t)F * E, 4);
        mha_module m;
        mha_encoder_layer ly = mha_encoder_layer_defaults();
        mha_module_grad g;
        mha_encoder_layer_grad ge;
        mha_status st;
        memset(&m, 0, sizeof m);
        memset(&g, 0, sizeof g);
        memset(&ge, 0, sizeof ge);
        m.embed_dim = E; m.num_heads = H;
        m.in_proj_weight = win; m.in_proj_bias = bin; m.out_proj_weight = wo; m.out_proj_bias = bo;
        g.in_proj_weight = gin;
        ly.self_attn = m; ly.dim_feedforward = F;
        ly.linear1_weight = w1; ly.linear1_bias = b1; ly.linear2_weight = w2; ly.linear2_bias = b2;
        ge.self_attn.in_proj_weight = gin; ge.linear1_weight = gw1;
        st = enc ? mha_encoder_plan(&ly, B, L, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &e)
                 : mha_module_plan(&m, B, L, L, &o, MHA_PLAN_TRAINING, NULL, 0, &p, &e);
        if (st != MHA_OK || mha_plan_sizes(p, &sz, &e) != MHA_OK) return fail(&e);
        r.workspace = malloc(sz.workspace);
        r.workspace_bytes = sz.workspace;
        if (saved) {
            r.saved = malloc(sz.saved);
            r.saved_bytes = sz.saved;
            st = enc ? mha_encoder_run_forward(p, L, x, y, &r, &e)
                     : mha_module_run_forward(p, L, L, x, x, x, y, &r, &e);
            if (st != MHA_OK) return fail(&e);
        }
        st = enc ? mha_encoder_run_backward(p, L, x, dy, dx, &ge, &r, &e)
                 : mha_module_run_backward(p, L, L, x, x, x, dy, dx, dx, dx, &g, &r, &e);
        if (st != MHA_OK) return fail(&e);
        check = sum(dx, n) + sum(gin, (size_t)3 * E * E) + (enc ? sum(gw1, (size_t)F * E) : 0.0);
    } else {
        fprintf(stderr, "usage: %s sdpa|module|encoder   (env SAVED=1, CAUSAL=1)\n", argv[0]);
        return 2;
    }
    printf("%s%s%s checksum %.6f\n", what, saved ? " saved" : " recomputed", o.causal ? " causal" : "", check);
    mha_plan_destroy(p);
    free(r.workspace);
    free(r.saved);
    return 0;
}
