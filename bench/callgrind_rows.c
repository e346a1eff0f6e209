/* bench/callgrind_rows.c - the forward and decoding rows of docs/performance.md's
   "API 1.0: the same work, counted before and after": one call per run, for
   instruction counts that a loaded machine does not change.

     gcc -std=c99 -O2 -mavx2 -mfma -fopenmp -I. bench/callgrind_rows.c -o build/cg_rows -lm
     OMP_NUM_THREADS=1 valgrind --tool=callgrind --toggle-collect=<function> ./build/cg_rows <row>

   rows (the counted function in brackets):
     fwd_l128, fwd_l128_causal, fwd_l1024_causal   module one-shot, E 512, H 8, B 1  [mha_module_forward]
     plan_fwd_l128, plan_fwd_l128_causal           a MHA_PLAN_PACK plan's run        [mha_module_run_forward]
     sdpa_l256, sdpa_l256_causal                   SDPA, B 1, H 8, L 256, D 64       [mha_sdpa_forward]
     decode_<len>          one token through a module plan made once (MHA_PLAN_PACK |
                           MHA_PLAN_CACHE), E 2048, H 16, Hkv 4, RoPE, <len> tokens cached,
                           capacity 4096                                             [mha_module_run_forward]
     decode_<len>_oneshot  the same token through the one-shot call                  [mha_module_forward]
     kv_attend_4096[_oneshot]  SDPA over a cache: H 32, D 128, 4096 keys, one query  [mha_sdpa_run_forward /
                                                                                      mha_sdpa_forward]
     encoder_l128          encoder layer one-shot, E 512, H 8, F 2048, L 128         [mha_encoder_forward]
   Each run prints "<row> checksum <sum> abs <sum of |y|> fnv <FNV-1a 64 of the
   output's bytes>": equal fnv means bit-identical output.  The backward rows
   are bench/callgrind_backward.c's.  */
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
    if (!x) { fprintf(stderr, "out of memory\n"); exit(1); }
    for (i = 0; i < n; ++i) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = a * ((float)(seed >> 8) / 8388608.0f - 1.0f);   /* a * U[-1, 1) */
    }
    return x;
}
static float *fill_around(size_t n, float c, float a)   /* c + a * U(-1,1) */
{
    float *x = fill(n, a);
    size_t i;
    for (i = 0; i < n; ++i) x[i] += c;
    return x;
}
static void report(const char *row, const float *y, size_t n)
{
    double s = 0, sa = 0;
    unsigned long long h = 1469598103934665603ull;
    const unsigned char *b = (const unsigned char *)y;
    size_t i;
    for (i = 0; i < n; ++i) { s += y[i]; sa += y[i] < 0 ? -(double)y[i] : (double)y[i]; }
    for (i = 0; i < n * sizeof(float); ++i) { h ^= b[i]; h *= 1099511628211ull; }
    printf("%s checksum %.6f abs %.6f fnv %016llx\n", row, s, sa, h);
}
static mha_error err;
static void check(mha_status s, const char *what)
{
    if (s != MHA_OK) { fprintf(stderr, "%s: %s (%s)\n", what, mha_status_string(s), err.message); exit(1); }
}

int main(int argc, char **argv)
{
    const char *row = argc > 1 ? argv[1] : "";
    mha_options o;
    memset(&o, 0, sizeof o);
    o.num_threads = 1;

    if (!strncmp(row, "fwd_", 4) || !strncmp(row, "plan_fwd_", 9)) {
        const int E = 512, H = 8, B = 1, L = strstr(row, "l1024") ? 1024 : 128;
        const int plan = !strncmp(row, "plan_", 5);
        size_t n = (size_t)B * L * E;
        float *win = fill((size_t)3 * E * E, 0.05f), *bin = fill((size_t)3 * E, 0.1f);
        float *wo = fill((size_t)E * E, 0.05f), *bo = fill((size_t)E, 0.1f);
        float *x = fill(n, 1), *y = (float *)calloc(n, sizeof(float));
        mha_module m;
        memset(&m, 0, sizeof m);
        m.embed_dim = E; m.num_heads = H;
        m.in_proj_weight = win; m.in_proj_bias = bin; m.out_proj_weight = wo; m.out_proj_bias = bo;
        o.causal = strstr(row, "causal") != NULL;
        if (plan) {
            mha_plan *p = NULL;
            mha_sizes sz;
            mha_run r;
            memset(&r, 0, sizeof r);
            check(mha_module_plan(&m, B, L, L, &o, MHA_PLAN_PACK, NULL, 0, &p, &err), "mha_module_plan");
            check(mha_plan_sizes(p, &sz, &err), "mha_plan_sizes");
            r.workspace = malloc(sz.workspace); r.workspace_bytes = sz.workspace;
            check(mha_module_run_forward(p, L, L, x, x, x, y, &r, &err), "mha_module_run_forward");
            mha_plan_destroy(p);
            free(r.workspace);
        } else {
            check(mha_module_forward(&m, B, L, L, x, x, x, &o, y, NULL, &err), "mha_module_forward");
        }
        report(row, y, n);
    } else if (!strncmp(row, "sdpa_", 5)) {
        const int B = 1, H = 8, L = 256, D = 64;
        size_t n = (size_t)B * H * L * D;
        float *q = fill(n, 1), *k = fill(n, 1), *v = fill(n, 1), *out = (float *)calloc(n, sizeof(float));
        o.causal = strstr(row, "causal") != NULL;
        check(mha_sdpa_forward(B, H, L, L, D, D, q, k, v, &o, out, NULL, &err), "mha_sdpa_forward");
        report(row, out, n);
    } else if (!strncmp(row, "decode_", 7)) {
        const int E = 2048, H = 16, Hkv = 4, D = E / H, Ekv = Hkv * D, cap = 4096;
        const int oneshot = strstr(row, "_oneshot") != NULL;
        int len = atoi(row + 7);
        float *wq = fill((size_t)E * E, 0.05f), *wk = fill((size_t)Ekv * E, 0.05f);
        float *wv = fill((size_t)Ekv * E, 0.05f), *wo = fill((size_t)E * E, 0.05f);
        float *ck = fill((size_t)Hkv * cap * D, 1), *cv = fill((size_t)Hkv * cap * D, 1);
        float *x = fill((size_t)E, 1), *y = (float *)calloc((size_t)E, sizeof(float));
        mha_module m;
        mha_kv_cache c;
        mha_sizes sz;
        mha_run r;
        if (len < 1 || len >= cap) { fprintf(stderr, "decode_<len>: 1 <= len < %d\n", cap); return 2; }
        memset(&m, 0, sizeof m);
        memset(&c, 0, sizeof c);
        memset(&r, 0, sizeof r);
        m.embed_dim = E; m.num_heads = H; m.num_kv_heads = Hkv;
        m.q_proj_weight = wq; m.k_proj_weight = wk; m.v_proj_weight = wv; m.out_proj_weight = wo;
        m.rope.kind = MHA_ROPE_HALF;
        c.B = 1; c.Hkv = Hkv; c.D = D; c.capacity = cap; c.k = ck; c.v = cv; c.len = &len;
        o.causal = 1;
        r.cache = &c;
        if (oneshot) {
            check(mha_module_plan_size(&m, 1, 1, cap, &o, MHA_PLAN_CACHE, &sz, &err), "mha_module_plan_size");
            r.workspace = malloc(sz.workspace); r.workspace_bytes = sz.workspace;
            check(mha_module_forward(&m, 1, 1, 0, x, NULL, NULL, &o, y, &r, &err), "mha_module_forward");
        } else {
            mha_plan *p = NULL;
            check(mha_module_plan(&m, 1, 1, cap, &o, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &p, &err), "mha_module_plan");
            check(mha_plan_sizes(p, &sz, &err), "mha_plan_sizes");
            r.workspace = malloc(sz.workspace); r.workspace_bytes = sz.workspace;
            check(mha_module_run_forward(p, 1, 0, x, NULL, NULL, y, &r, &err), "mha_module_run_forward");
            mha_plan_destroy(p);
        }
        if (len != atoi(row + 7) + 1) { fprintf(stderr, "cache len %d\n", len); return 1; }
        report(row, y, (size_t)E);
        free(r.workspace);
    } else if (!strcmp(row, "kv_attend_4096") || !strcmp(row, "kv_attend_4096_oneshot")) {
        const int H = 32, Hkv = 32, D = 128, cap = 4096;
        const int oneshot = strstr(row, "_oneshot") != NULL;
        int len = 4096;
        float *ck = fill((size_t)Hkv * cap * D, 1), *cv = fill((size_t)Hkv * cap * D, 1);
        float *q = fill((size_t)H * D, 1), *out = (float *)calloc((size_t)H * D, sizeof(float));
        mha_kv_cache c;
        mha_sizes sz;
        mha_run r;
        memset(&c, 0, sizeof c);
        memset(&r, 0, sizeof r);
        c.B = 1; c.Hkv = Hkv; c.D = D; c.capacity = cap; c.k = ck; c.v = cv; c.len = &len;
        r.cache = &c;
        if (oneshot) {
            check(mha_sdpa_plan_size(1, H, 1, cap, D, D, &o, MHA_PLAN_CACHE, &sz, &err), "mha_sdpa_plan_size");
            r.workspace = malloc(sz.workspace); r.workspace_bytes = sz.workspace;
            check(mha_sdpa_forward(1, H, 1, 0, D, D, q, NULL, NULL, &o, out, &r, &err), "mha_sdpa_forward");
        } else {
            mha_plan *p = NULL;
            o.num_kv_heads = Hkv;
            check(mha_sdpa_plan(1, H, 1, cap, D, D, &o, MHA_PLAN_CACHE, NULL, 0, &p, &err), "mha_sdpa_plan");
            check(mha_plan_sizes(p, &sz, &err), "mha_plan_sizes");
            r.workspace = malloc(sz.workspace); r.workspace_bytes = sz.workspace;
            check(mha_sdpa_run_forward(p, 1, 0, q, NULL, NULL, out, &r, &err), "mha_sdpa_run_forward");
            mha_plan_destroy(p);
        }
        report(row, out, (size_t)H * D);
        free(r.workspace);
    } else if (!strcmp(row, "encoder_l128")) {
        const int E = 512, H = 8, F = 2048, B = 1, L = 128;
        size_t n = (size_t)B * L * E;
        float *win = fill((size_t)3 * E * E, 0.05f), *bin = fill((size_t)3 * E, 0.1f);
        float *wo = fill((size_t)E * E, 0.05f), *bo = fill((size_t)E, 0.1f);
        float *w1 = fill((size_t)F * E, 0.05f), *b1 = fill((size_t)F, 0.1f);
        float *w2 = fill((size_t)E * F, 0.05f), *b2 = fill((size_t)E, 0.1f);
        float *n1w = fill_around((size_t)E, 1.0f, 0.1f), *n1b = fill((size_t)E, 0.1f);
        float *n2w = fill_around((size_t)E, 1.0f, 0.1f), *n2b = fill((size_t)E, 0.1f);
        float *x = fill(n, 1), *y = (float *)calloc(n, sizeof(float));
        mha_encoder_layer ly = mha_encoder_layer_defaults();
        ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
        ly.self_attn.in_proj_weight = win; ly.self_attn.in_proj_bias = bin;
        ly.self_attn.out_proj_weight = wo; ly.self_attn.out_proj_bias = bo;
        ly.dim_feedforward = F;
        ly.linear1_weight = w1; ly.linear1_bias = b1; ly.linear2_weight = w2; ly.linear2_bias = b2;
        ly.norm1_weight = n1w; ly.norm1_bias = n1b; ly.norm2_weight = n2w; ly.norm2_bias = n2b;
        check(mha_encoder_forward(&ly, B, L, x, &o, y, NULL, &err), "mha_encoder_forward");
        report(row, y, n);
    } else {
        fprintf(stderr, "usage: %s fwd_l128|fwd_l128_causal|fwd_l1024_causal|plan_fwd_l128|"
                        "plan_fwd_l128_causal|sdpa_l256|sdpa_l256_causal|decode_512[_oneshot]|"
                        "decode_4095[_oneshot]|kv_attend_4096[_oneshot]|encoder_l128\n", argv[0]);
        return 2;
    }
    return 0;
}
