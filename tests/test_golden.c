/* Golden vectors: mha_module_forward and mha_sdpa_forward against PyTorch's float64 results.

   tests/golden/golden.bin holds float32 inputs and weights of
   torch.nn.MultiheadAttention (and of plain scaled dot-product attention) with
   the float64 outputs and attention weights PyTorch computed from the same
   values (tests/gen_golden.py, `make golden`).  This program needs no PyTorch.

   For every case, outputs and weights must agree to ||a - b|| / ||b|| <= 1e-5.
   Each case runs twice: with attention weights and a NULL workspace, and
   without weights in a caller workspace of the size the *_workspace_size call
   reports (an implementation may take a different path when no weights are
   wanted; both must match PyTorch), and cases with a packed in_proj_weight
   run a third time with it passed as q/k/v_proj_weight.  A query whose keys are all masked must
   get exactly zero weights, and if it is blocked in every head, an output row
   equal to out_proj.bias (or 0 without bias).
   GOLD_VERBOSE=1 in the environment prints every case's errors.  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "golden.h"

#include <stdlib.h>
#include <string.h>

#ifndef GOLD_PATH
#define GOLD_PATH "tests/golden/golden.bin"
#endif
#define TOL 1e-5

static double worst_out = 0, worst_w = 0;
static int verbose;               /* GOLD_VERBOSE=1: one line per comparison */
static char worst_out_case[64] = "-", worst_w_case[64] = "-";

static const float *f32_or_null(const gold_case *c, const char *name)
{
    const gold_array *a = gold_find(c, name);
    return a && a->dtype == GOLD_F32 ? a->f32 : NULL;
}

/* opt.attn_mask / key_padding_mask from the case's arrays */
static void fill_mask(const gold_case *c, const char *name, int kind, mha_mask *m)
{
    const gold_array *a = gold_find(c, name);
    int d;
    memset(m, 0, sizeof *m);
    if (!kind) return;
    CHECK(a != NULL, "%s: mask kind %d but no %s array", c->name, kind, name);
    if (!a) return;
    CHECK((kind == MHA_MASK_FLOAT) == (a->dtype == GOLD_F32), "%s: %s dtype", c->name, name);
    m->kind = (mha_mask_kind)kind;
    m->data = a->dtype == GOLD_F32 ? (const void *)a->f32 : (const void *)a->u8;
    m->ndim = a->ndim;
    for (d = 0; d < a->ndim; ++d) m->shape[d] = a->shape[d];
}

static int all_finite(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (!(x[i] - x[i] == 0.0f)) return 0;
    return 1;
}

/* Compare one result; track the worst error over all cases. */
static void compare(const gold_case *c, const char *what, const float *got, const gold_array *want,
                    size_t n, double *worst, char *worst_case)
{
    double e;
    CHECK(want != NULL && want->dtype == GOLD_F64 && want->count == n,
          "%s: expected %s missing or of the wrong size", c->name, what);
    if (!want || want->dtype != GOLD_F64 || want->count != n) return;
    CHECK(all_finite(got, n), "%s: %s has NaN/Inf", c->name, what);
    e = tu_rel_err(got, want->f64, n);
    if (verbose) printf("  %-50s %-17s %.2e\n", c->name, what, e);
    if (!(e <= *worst) || e != e) {
        *worst = e;
        snprintf(worst_case, 64, "%s", c->name);
    }
    CHECK(e <= TOL, "%s: %s rel err %.3g > %g", c->name, what, e, TOL);
}

/* Fully masked queries.  w: [B, G, Lq, Lk'] weights as computed (G = H per
   head, 1 averaged); a golden row of exact zeros must come out exactly zero.
   A query whose row is zero in every head must output bias (or 0) exactly. */
static void check_empty_rows(const gold_case *c, const float *w, const double *gw, int B, int G,
                             int Lq, int Lk, const float *out, const float *bias, int E)
{
    int b, g, i, j;
    for (b = 0; b < B; ++b)
        for (i = 0; i < Lq; ++i) {
            int empty_in_all = 1;
            for (g = 0; g < G; ++g) {
                size_t row = (((size_t)b * G + g) * Lq + i) * Lk;
                int empty = 1, exact = 1;
                for (j = 0; j < Lk; ++j) empty &= gw[row + j] == 0.0;
                if (!empty) { empty_in_all = 0; continue; }
                for (j = 0; j < Lk; ++j) exact &= w[row + j] == 0.0f;
                CHECK(exact, "%s: b=%d head/avg %d query %d: all keys masked, weights not zero",
                      c->name, b, g, i);
            }
            if (empty_in_all && out) {
                int same = 1;
                for (j = 0; j < E; ++j)
                    same &= out[((size_t)b * Lq + i) * E + j] == (bias ? bias[j] : 0.0f);
                CHECK(same, "%s: b=%d query %d: all keys masked, output row is not out_proj.bias",
                      c->name, b, i);
            }
        }
}

static void run_module(const gold_case *c)
{
    const int B = c->p[GOLD_B], H = c->p[GOLD_H], Lq = c->p[GOLD_LQ], Lk = c->p[GOLD_LK];
    const int E = c->p[GOLD_E], per_head = c->p[GOLD_PER_HEAD];
    const gold_array *gout = gold_find(c, "out"), *gw = gold_find(c, "weights");
    const float *query = f32_or_null(c, "query"), *key, *value;
    mha_module m;
    mha_options opt;
    size_t n_out = (size_t)B * Lq * E, n_w, ws_bytes = 0;
    int Lk_eff, G = per_head ? H : 1;
    float *out, *w, *out2;
    void *ws;
    mha_status st;
    mha_run run;
    mha_sizes sizes = {0, 0, 0};
    mha_error err;

    memset(&m, 0, sizeof m);
    m.embed_dim = E;
    m.num_heads = H;
    m.kdim = c->p[GOLD_KDIM];
    m.vdim = c->p[GOLD_VDIM];
    m.add_zero_attn = c->p[GOLD_ADD_ZERO_ATTN];
    m.in_proj_weight = f32_or_null(c, "in_proj_weight");
    m.q_proj_weight = f32_or_null(c, "q_proj_weight");
    m.k_proj_weight = f32_or_null(c, "k_proj_weight");
    m.v_proj_weight = f32_or_null(c, "v_proj_weight");
    m.in_proj_bias = f32_or_null(c, "in_proj_bias");
    m.out_proj_weight = f32_or_null(c, "out_proj.weight");
    m.out_proj_bias = f32_or_null(c, "out_proj.bias");
    m.bias_k = f32_or_null(c, "bias_k");
    m.bias_v = f32_or_null(c, "bias_v");
    key = f32_or_null(c, "key");
    value = f32_or_null(c, "value");
    if (!key) key = query;        /* self-attention cases store the input once */
    if (!value) value = query;

    memset(&opt, 0, sizeof opt);
    fill_mask(c, "attn_mask", c->p[GOLD_ATTN_KIND], &opt.attn_mask);
    fill_mask(c, "key_padding_mask", c->p[GOLD_KPM_KIND], &opt.key_padding_mask);
    opt.causal = c->p[GOLD_CAUSAL] != 0;
    opt.causal_align = c->p[GOLD_CAUSAL] == 2 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    opt.per_head_weights = per_head;
    opt.scale = c->scale;

    Lk_eff = Lk + (m.bias_k != NULL) + m.add_zero_attn;
    n_w = (size_t)B * G * Lq * Lk_eff;
    out = (float *)malloc(n_out * sizeof(float));
    out2 = (float *)malloc(n_out * sizeof(float));
    w = (float *)malloc(n_w * sizeof(float));
    if (!out || !out2 || !w || !query || !gout || !gw) {
        CHECK(0, "%s: incomplete case or out of memory", c->name);
        free(out); free(out2); free(w);
        return;
    }

    /* 1. with attention weights, library-allocated workspace */
    memset(&run, 0, sizeof run);
    run.weights = w;
    st = mha_module_forward(&m, B, Lq, Lk, query, key, value, &opt, out, &run, &err);
    CHECK(st == MHA_OK, "%s: mha_module_forward: %s", c->name, err.message);
    if (st == MHA_OK) {
        compare(c, "out", out, gout, n_out, &worst_out, worst_out_case);
        compare(c, "weights", w, gw, n_w, &worst_w, worst_w_case);
        if (gw->count == n_w)
            check_empty_rows(c, w, gw->f64, B, G, Lq, Lk_eff, out, m.out_proj_bias, E);
    }

    /* 2. no weights, caller workspace of the reported size */
    st = mha_module_plan_size(&m, B, Lq, Lk, &opt, 0, &sizes, &err);
    CHECK(st == MHA_OK, "%s: mha_module_plan_size: %s", c->name, err.message);
    ws_bytes = sizes.workspace;
    ws = malloc(ws_bytes ? ws_bytes : 1);
    if (st == MHA_OK && ws) {
        memset(&run, 0, sizeof run);
        run.workspace = ws; run.workspace_bytes = ws_bytes;
        st = mha_module_forward(&m, B, Lq, Lk, query, key, value, &opt, out2, &run, &err);
        CHECK(st == MHA_OK, "%s: mha_module_forward (no weights): %s", c->name, err.message);
        if (st == MHA_OK) {
            compare(c, "out (no weights)", out2, gout, n_out, &worst_out, worst_out_case);
            if (gw->count == n_w)
                check_empty_rows(c, w, gw->f64, B, G, Lq, Lk_eff, out2, m.out_proj_bias, E);
        }
    }

    /* 3. the packed in_proj_weight given as three separate [E,E] weights
       (mha_module allows either form when kdim == vdim == E) */
    if (m.in_proj_weight) {
        mha_module s = m;
        s.q_proj_weight = m.in_proj_weight;
        s.k_proj_weight = (const float *)m.in_proj_weight + (size_t)E * E;
        s.v_proj_weight = (const float *)m.in_proj_weight + (size_t)2 * E * E;
        s.in_proj_weight = NULL;
        memset(&run, 0, sizeof run);
        run.weights = w;
        st = mha_module_forward(&s, B, Lq, Lk, query, key, value, &opt, out2, &run, &err);
        CHECK(st == MHA_OK, "%s: mha_module_forward (split weights): %s", c->name, err.message);
        if (st == MHA_OK) {
            compare(c, "out (split q/k/v)", out2, gout, n_out, &worst_out, worst_out_case);
            compare(c, "weights (split)", w, gw, n_w, &worst_w, worst_w_case);
        }
    }
    free(ws); free(out); free(out2); free(w);
}

static void run_sdpa(const gold_case *c)
{
    const int B = c->p[GOLD_B], H = c->p[GOLD_H], Lq = c->p[GOLD_LQ], Lk = c->p[GOLD_LK];
    const int D = c->p[GOLD_D], Dv = c->p[GOLD_DV];
    const gold_array *gout = gold_find(c, "out"), *gw = gold_find(c, "weights");
    const float *q = f32_or_null(c, "q"), *k = f32_or_null(c, "k"), *v = f32_or_null(c, "v");
    mha_options opt;
    size_t n_out = (size_t)B * H * Lq * Dv, n_w = (size_t)B * H * Lq * Lk, ws_bytes = 0;
    float *out, *out2, *w;
    void *ws;
    mha_status st;
    mha_run run;
    mha_sizes sizes = {0, 0, 0};
    mha_error err;

    memset(&opt, 0, sizeof opt);
    fill_mask(c, "attn_mask", c->p[GOLD_ATTN_KIND], &opt.attn_mask);
    fill_mask(c, "key_padding_mask", c->p[GOLD_KPM_KIND], &opt.key_padding_mask);
    opt.causal = c->p[GOLD_CAUSAL] != 0;
    opt.causal_align = c->p[GOLD_CAUSAL] == 2 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    opt.scale = c->scale;

    out = (float *)malloc(n_out * sizeof(float));
    out2 = (float *)malloc(n_out * sizeof(float));
    w = (float *)malloc(n_w * sizeof(float));
    if (!out || !out2 || !w || !q || !k || !v || !gout || !gw) {
        CHECK(0, "%s: incomplete case or out of memory", c->name);
        free(out); free(out2); free(w);
        return;
    }
    memset(&run, 0, sizeof run);
    run.weights = w;
    st = mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, k, v, &opt, out, &run, &err);
    CHECK(st == MHA_OK, "%s: mha_sdpa_forward: %s", c->name, err.message);
    if (st == MHA_OK) {
        compare(c, "out", out, gout, n_out, &worst_out, worst_out_case);
        compare(c, "weights", w, gw, n_w, &worst_w, worst_w_case);
        /* SDPA has no output projection: an empty row's output is exactly 0 */
        if (gw->count == n_w)
            check_empty_rows(c, w, gw->f64, B * H, 1, Lq, Lk, NULL, NULL, 0);
    }
    st = mha_sdpa_plan_size(B, H, Lq, Lk, D, Dv, &opt, 0, &sizes, &err);
    CHECK(st == MHA_OK, "%s: mha_sdpa_plan_size: %s", c->name, err.message);
    ws_bytes = sizes.workspace;
    ws = malloc(ws_bytes ? ws_bytes : 1);
    if (st == MHA_OK && ws) {
        memset(&run, 0, sizeof run);
        run.workspace = ws; run.workspace_bytes = ws_bytes;
        st = mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, k, v, &opt, out2, &run, &err);
        CHECK(st == MHA_OK, "%s: mha_sdpa_forward (no weights): %s", c->name, err.message);
        if (st == MHA_OK) compare(c, "out (no weights)", out2, gout, n_out, &worst_out, worst_out_case);
    }
    free(ws); free(out); free(out2); free(w);
}

int main(void)
{
    gold_file g;
    char err[256];
    int i, nmod = 0, nsdpa = 0, nfixed = 0;
    verbose = getenv("GOLD_VERBOSE") != NULL;
    if (!gold_load(GOLD_PATH, &g, err, sizeof err)) {
        CHECK(0, "golden vectors: %s", err);
        return tu_finish("golden");
    }
    for (i = 0; i < g.ncases; ++i) {
        const gold_case *c = &g.cases[i];
        nfixed += c->p[GOLD_NAN_FIXED] != 0;
        if (c->p[GOLD_KIND] == GOLD_KIND_MODULE) { run_module(c); ++nmod; }
        else if (c->p[GOLD_KIND] == GOLD_KIND_SDPA) { run_sdpa(c); ++nsdpa; }
        else CHECK(0, "%s: unknown case kind %d", c->name, c->p[GOLD_KIND]);
    }
    /* a golden file that lost its cases would otherwise pass silently */
    CHECK(nmod >= 40 && nsdpa >= 10 && nfixed >= 5, "only %d module, %d sdpa, %d fully-masked cases",
          nmod, nsdpa, nfixed);
    printf("worst rel err out %.2e (%s), weights %.2e (%s); %d module + %d sdpa cases, tol %g\n",
           worst_out, worst_out_case, worst_w, worst_w_case, nmod, nsdpa, TOL);
    gold_free(&g);
    return tu_finish("golden");
}
