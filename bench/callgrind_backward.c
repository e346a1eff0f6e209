/* bench/callgrind_backward.c - one backward on one thread, for instruction
   counts that a loaded machine does not change:
     gcc -std=c99 -O2 -mavx2 -mfma -fopenmp -I. bench/callgrind_backward.c -o build/cg -lm
     OMP_NUM_THREADS=1 valgrind --tool=callgrind --toggle-collect=mha_sdpa_run_backward ./build/cg sdpa
   what:  sdpa     SDPA, B 1, H 8, L 256, D 64           (collect mha_sdpa_run_backward)
          module   mha_module, E 512, H 8, B 1, L 128    (collect mha_module_backward)
          encoder  encoder layer, E 512, H 8, F 2048, B 1, L 128  (collect mha_encoder_run_backward)
   CAUSAL=1: causal.  SAVED=1: a training plan's forward runs first in the
   same workspace, so the backward uses the saved forward; else the one-shot
   backward (which recomputes the forward).  Only the backward is counted
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

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "sdpa";
    int saved = getenv("SAVED") != NULL;
    mha_options o = mha_options_defaults();
    mha_plan *p = NULL;
    void *ws = NULL;
    size_t wsb = 0;
    double check = 0;
    o.num_threads = 1;
    o.causal = getenv("CAUSAL") != NULL;
    if (!strcmp(what, "sdpa")) {
        const int B = 1, H = 8, L = 256, D = 64;
        size_t n = (size_t)B * H * L * D;
        float *q = fill(n, 1), *k = fill(n, 1), *v = fill(n, 1), *dout = fill(n, 1), *out = fill(n, 1);
        float *dq = calloc(n, 4), *dk = calloc(n, 4), *dv = calloc(n, 4);
        if (saved) {
            if (mha_sdpa_plan(B, H, L, L, D, D, &o, MHA_PLAN_TRAINING, NULL, 0, &p) != MHA_OK) return 1;
            wsb = mha_plan_workspace_size(p);
            ws = malloc(wsb);
            if (mha_sdpa_run(p, L, L, q, k, v, NULL, NULL, out, NULL, ws, wsb) != MHA_OK ||
                mha_sdpa_run_backward(p, L, L, q, k, v, dout, NULL, NULL, dq, dk, dv, ws, wsb) != MHA_OK)
                return 1;
        } else if (mha_sdpa_backward(B, H, L, L, D, D, q, k, v, dout, &o, dq, dk, dv, NULL, 0) != MHA_OK) {
            return 1;
        }
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
        memset(&m, 0, sizeof m);
        memset(&g, 0, sizeof g);
        memset(&ge, 0, sizeof ge);
        m.embed_dim = E; m.num_heads = H;
        m.in_proj_weight = win; m.in_proj_bias = bin; m.out_proj_weight = wo; m.out_proj_bias = bo;
        g.in_proj_weight = gin;
        ly.self_attn = m; ly.dim_feedforward = F;
        ly.linear1_weight = w1; ly.linear1_bias = b1; ly.linear2_weight = w2; ly.linear2_bias = b2;
        ge.self_attn.in_proj_weight = gin; ge.linear1_weight = gw1;
        if (enc) {
            if (saved) {
                if (mha_encoder_plan(&ly, B, L, &o, MHA_PLAN_TRAINING, NULL, 0, &p) != MHA_OK) return 1;
                wsb = mha_plan_workspace_size(p);
                ws = malloc(wsb);
                if (mha_encoder_run(p, L, x, NULL, NULL, y, NULL, ws, wsb) != MHA_OK ||
                    mha_encoder_run_backward(p, L, x, dy, NULL, NULL, dx, &ge, ws, wsb) != MHA_OK)
                    return 1;
            } else if (mha_encoder_backward(&ly, B, L, x, &o, dy, dx, &ge, NULL, 0) != MHA_OK) {
                return 1;
            }
            check = sum(dx, n) + sum(gin, (size_t)3 * E * E) + sum(gw1, (size_t)F * E);
        } else {
            if (saved) {
                if (mha_module_plan(&m, B, L, L, &o, MHA_PLAN_TRAINING, NULL, 0, &p) != MHA_OK) return 1;
                wsb = mha_plan_workspace_size(p);
                ws = malloc(wsb);
                if (mha_module_forward(p, L, L, x, x, x, NULL, NULL, y, NULL, ws, wsb) != MHA_OK ||
                    mha_module_backward(p, L, L, x, x, x, dy, NULL, NULL, dx, dx, dx, &g, ws, wsb) != MHA_OK)
                    return 1;
            } else if (mha_backward(&m, B, L, L, x, x, x, dy, &o, dx, dx, dx, &g, NULL, 0) != MHA_OK) {
                return 1;
            }
            check = sum(dx, n) + sum(gin, (size_t)3 * E * E);
        }
    } else {
        fprintf(stderr, "usage: %s sdpa|module|encoder   (env SAVED=1, CAUSAL=1)\n", argv[0]);
        return 2;
    }
    printf("%s%s%s checksum %.6f\n", what, saved ? " saved" : " recomputed", o.causal ? " causal" : "", check);
    mha_plan_destroy(p);
    free(ws);
    return 0;
}
