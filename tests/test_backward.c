/* Gradients of the backward passes against central finite differences.
   The reference forward passes are written here again in double precision,
   straight from the definitions; the loss is  sum(out * G)  for a fixed
   random G, so dLoss/dout = G.  Each input and weight element x is nudged
   both ways:  dLoss/dx ~ (loss(x + h) - loss(x - h)) / 2h,  h = 1e-5,
   accurate to ~1e-10 in double.  The library's float32 gradients must agree
   to a relative error of 1e-4 (measured values are printed as "worst").  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

#define TOL 1e-4
#define FD_H 1e-5

static double worst_sdpa, worst_mha, worst_enc;

static double *dalloc(size_t n) { return (double *)calloc(n ? n : 1, sizeof(double)); }
static float *falloc(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }
static void to_double(const float *f, double *d, size_t n) { size_t i; for (i = 0; i < n; ++i) d[i] = f[i]; }
static double dot(const double *a, const double *b, size_t n) { double s = 0; size_t i; for (i = 0; i < n; ++i) s += a[i] * b[i]; return s; }

typedef double (*loss_fn)(void *ctx);

/* g[i] = d loss / d x[i] by central differences */
static void fd_grad(loss_fn f, void *ctx, double *x, size_t n, double *g)
{
    size_t i;
    for (i = 0; i < n; ++i) {
        double save = x[i], lp, lm;
        x[i] = save + FD_H; lp = f(ctx);
        x[i] = save - FD_H; lm = f(ctx);
        x[i] = save;
        g[i] = (lp - lm) / (2 * FD_H);
    }
}

static double check_grad(const char *what, const float *got, const double *want, size_t n, double *worst)
{
    double e = tu_rel_err(got, want, n);
    CHECK(e <= TOL, "%s: rel err %.3g > %g", what, e, TOL);
    if (e > *worst) *worst = e;
    return e;
}

/* ---------------------------------------------------------------- masks */

/* The masks a case uses: an optional float attn_mask [Lq, Lk] (-inf entries
   block), an optional bool key_padding_mask [B, Lk] (nonzero blocks), causal
   with either alignment.  ref_bias() is the reference's reading of them. */
typedef struct {
    int use_float, use_kpm, causal, bottom_right;
    float fmask[64 * 64];
    unsigned char kpm[8 * 64];
} masks;

static int ref_bias(const masks *m, int B_, int b, int Lq, int Lk, int i, int j, double *add)
{
    (void)B_;
    *add = 0;
    if (m->causal) {
        long off = m->bottom_right ? (long)Lk - Lq : 0;
        if ((long)j > (long)i + off) return 0;
    }
    if (m->use_kpm && m->kpm[b * Lk + j]) return 0;
    if (m->use_float) {
        float f = m->fmask[i * Lk + j];
        if (f == -INFINITY) return 0;
        *add = f;
    }
    return 1;
}

static void set_options(const masks *m, int B, int Lq, int Lk, mha_options *opt)
{
    memset(opt, 0, sizeof *opt);
    if (m->use_float) {
        opt->attn_mask.kind = MHA_MASK_FLOAT; opt->attn_mask.data = m->fmask;
        opt->attn_mask.ndim = 2; opt->attn_mask.shape[0] = Lq; opt->attn_mask.shape[1] = Lk;
    }
    if (m->use_kpm) {
        opt->key_padding_mask.kind = MHA_MASK_BOOL; opt->key_padding_mask.data = m->kpm;
        opt->key_padding_mask.ndim = 2; opt->key_padding_mask.shape[0] = B;
        opt->key_padding_mask.shape[1] = Lk;
    }
    opt->causal = m->causal;
    opt->causal_align = m->bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
}

static void make_masks(tu_rng *r, masks *m, int B, int Lq, int Lk, int use_float, int use_kpm,
                       int causal, int bottom_right)
{
    int i;
    memset(m, 0, sizeof *m);
    m->use_float = use_float; m->use_kpm = use_kpm; m->causal = causal; m->bottom_right = bottom_right;
    for (i = 0; i < Lq * Lk; ++i) {
        m->fmask[i] = 0.5f * tu_uniform(r);
        if (tu_next(r) % 5 == 0) m->fmask[i] = -INFINITY;
    }
    for (i = 0; i < B * Lk; ++i) m->kpm[i] = (unsigned char)(tu_next(r) % 4 == 0);
}

/* One head of attention in double: o[Lq, Dv] from q[Lq, D] k[Lk, D] v[Lk, Dv]
   with row strides; a row with no allowed key gives o = 0. */
static void ref_head(const masks *m, int B, int b, int Lq, int Lk, int Lk_real, int D, int Dv, double scale,
                     const double *q, size_t qrs, const double *k, size_t krs,
                     const double *v, size_t vrs, double *o, size_t ors)
{
    int i, j, d;
    double s[64];
    for (i = 0; i < Lq; ++i) {
        double mx = -INFINITY, sum = 0;
        for (j = 0; j < Lk; ++j) {
            double add;
            if (j < Lk_real && !ref_bias(m, B, b, Lq, Lk_real, i, j, &add)) { s[j] = -INFINITY; continue; }
            if (j >= Lk_real) add = 0;
            s[j] = scale * dot(q + i * qrs, k + j * krs, (size_t)D) + add;
            if (s[j] > mx) mx = s[j];
        }
        for (d = 0; d < Dv; ++d) o[i * ors + d] = 0;
        if (mx == -INFINITY) continue;
        for (j = 0; j < Lk; ++j) { s[j] = s[j] == -INFINITY ? 0 : exp(s[j] - mx); sum += s[j]; }
        for (j = 0; j < Lk; ++j)
            for (d = 0; d < Dv; ++d) o[i * ors + d] += s[j] / sum * v[j * vrs + d];
    }
}

/* ---------------------------------------------------------------- SDPA */

typedef struct {
    int B, H, Lq, Lk, D, Dv;
    const masks *m;
    double *q, *k, *v, *g, *o;
} sdpa_case;

static double sdpa_loss(void *vctx)
{
    sdpa_case *c = (sdpa_case *)vctx;
    int b, h;
    double scale = 1.0 / sqrt((double)c->D);
    for (b = 0; b < c->B; ++b)
        for (h = 0; h < c->H; ++h) {
            size_t bh = (size_t)b * c->H + h;
            ref_head(c->m, c->B, b, c->Lq, c->Lk, c->Lk, c->D, c->Dv, scale,
                     c->q + bh * c->Lq * c->D, (size_t)c->D, c->k + bh * c->Lk * c->D, (size_t)c->D,
                     c->v + bh * c->Lk * c->Dv, (size_t)c->Dv, c->o + bh * c->Lq * c->Dv, (size_t)c->Dv);
        }
    return dot(c->o, c->g, (size_t)c->B * c->H * c->Lq * c->Dv);
}

static void test_sdpa(int B, int H, int Lq, int Lk, int D, int Dv, int use_float, int use_kpm,
                      int causal, int bottom_right, unsigned seed)
{
    tu_rng r; masks m; mha_options opt; sdpa_case c;
    size_t nq = (size_t)B * H * Lq * D, nk = (size_t)B * H * Lk * D, nv = (size_t)B * H * Lk * Dv;
    size_t no = (size_t)B * H * Lq * Dv;
    float *q = falloc(nq), *k = falloc(nk), *v = falloc(nv), *g = falloc(no);
    float *dq = falloc(nq), *dk = falloc(nk), *dv = falloc(nv);
    double *rq = dalloc(nq), *rk = dalloc(nk), *rv = dalloc(nv);
    mha_sizes sz;
    mha_run run;
    mha_error err;
    char what[128];
    mha_status st;

    r.s = 0x9E3779B97F4A7C15ULL ^ seed;
    tu_fill(&r, q, nq, 1.0f); tu_fill(&r, k, nk, 1.0f); tu_fill(&r, v, nv, 1.0f); tu_fill(&r, g, no, 1.0f);
    make_masks(&r, &m, B, Lq, Lk, use_float, use_kpm, causal, bottom_right);
    set_options(&m, B, Lq, Lk, &opt);

    st = mha_sdpa_plan_size(B, H, Lq, Lk, D, Dv, &opt, MHA_PLAN_TRAINING, &sz, &err);
    CHECK(st == MHA_OK, "mha_sdpa_plan_size: %s", err.message);
    memset(&run, 0, sizeof run);
    run.workspace = malloc(st == MHA_OK ? sz.workspace : 1);
    run.workspace_bytes = st == MHA_OK ? sz.workspace : 0;
    /* start from a nonzero gradient: the call must add to it */
    tu_fill(&r, dq, nq, 1.0f);
    {
        float *dq0 = falloc(nq);
        memcpy(dq0, dq, nq * sizeof(float));
        st = mha_sdpa_backward(B, H, Lq, Lk, D, Dv, q, k, v, g, &opt, dq, dk, dv, &run, &err);
        CHECK(st == MHA_OK, "mha_sdpa_backward: %s", err.message);
        { size_t i; for (i = 0; i < nq; ++i) dq[i] -= dq0[i]; }
        free(dq0);
    }

    c.B = B; c.H = H; c.Lq = Lq; c.Lk = Lk; c.D = D; c.Dv = Dv; c.m = &m;
    c.q = dalloc(nq); c.k = dalloc(nk); c.v = dalloc(nv); c.g = dalloc(no); c.o = dalloc(no);
    to_double(q, c.q, nq); to_double(k, c.k, nk); to_double(v, c.v, nv); to_double(g, c.g, no);
    fd_grad(sdpa_loss, &c, c.q, nq, rq);
    fd_grad(sdpa_loss, &c, c.k, nk, rk);
    fd_grad(sdpa_loss, &c, c.v, nv, rv);
    snprintf(what, sizeof what, "sdpa B%d H%d Lq%d Lk%d D%d Dv%d f%d k%d c%d%s", B, H, Lq, Lk, D, Dv,
             use_float, use_kpm, causal, bottom_right ? "br" : "");
    {
        char w2[160];
        snprintf(w2, sizeof w2, "%s dq", what); check_grad(w2, dq, rq, nq, &worst_sdpa);
        snprintf(w2, sizeof w2, "%s dk", what); check_grad(w2, dk, rk, nk, &worst_sdpa);
        snprintf(w2, sizeof w2, "%s dv", what); check_grad(w2, dv, rv, nv, &worst_sdpa);
    }
    free(q); free(k); free(v); free(g); free(dq); free(dk); free(dv); free(rq); free(rk); free(rv);
    free(c.q); free(c.k); free(c.v); free(c.g); free(c.o); free(run.workspace);
}

/* ---------------------------------------------------------------- module */

/* y[rows, out] = x W^T + b in double */
static void ref_linear(int rows, int in, int out, const double *x, const double *W, const double *b, double *y)
{
    int r, o;
    for (r = 0; r < rows; ++r)
        for (o = 0; o < out; ++o)
            y[(size_t)r * out + o] = (b ? b[o] : 0) + dot(x + (size_t)r * in, W + (size_t)o * in, (size_t)in);
}

typedef struct {
    int B, Lq, Lk, E, H, has_bias;
    const masks *m;
    double *xq, *xk, *xv;          /* inputs; for self-attention all three alias one array */
    double *w_in, *b_in, *w_out, *b_out, *g;
    double *Q, *K, *V, *C, *Y;     /* scratch */
} mha_case;

static void ref_mha(mha_case *c)
{
    int E = c->E, H = c->H, D = E / H, b, h;
    size_t EE = (size_t)E * E;
    ref_linear(c->B * c->Lq, E, E, c->xq, c->w_in, c->has_bias ? c->b_in : NULL, c->Q);
    ref_linear(c->B * c->Lk, E, E, c->xk, c->w_in + EE, c->has_bias ? c->b_in + E : NULL, c->K);
    ref_linear(c->B * c->Lk, E, E, c->xv, c->w_in + 2 * EE, c->has_bias ? c->b_in + 2 * E : NULL, c->V);
    for (b = 0; b < c->B; ++b)
        for (h = 0; h < H; ++h)
            ref_head(c->m, c->B, b, c->Lq, c->Lk, c->Lk, D, D, 1.0 / sqrt((double)D),
                     c->Q + (size_t)b * c->Lq * E + h * D, (size_t)E,
                     c->K + (size_t)b * c->Lk * E + h * D, (size_t)E,
                     c->V + (size_t)b * c->Lk * E + h * D, (size_t)E,
                     c->C + (size_t)b * c->Lq * E + h * D, (size_t)E);
    ref_linear(c->B * c->Lq, E, E, c->C, c->w_out, c->has_bias ? c->b_out : NULL, c->Y);
}

static double mha_loss(void *vctx)
{
    mha_case *c = (mha_case *)vctx;
    ref_mha(c);
    return dot(c->Y, c->g, (size_t)c->B * c->Lq * c->E);
}

static void test_mha(int B, int Lq, int Lk, int E, int H, int self, int has_bias,
                     int use_float, int use_kpm, int causal, unsigned seed)
{
    tu_rng r; masks m; mha_options opt; mha_case c; mha_module mod; mha_module_grad gr;
    size_t nq = (size_t)B * Lq * E, nk = (size_t)B * Lk * E, EE = (size_t)E * E;
    float *xq = falloc(nq), *xk = falloc(nk), *xv = falloc(nk), *g = falloc(nq);
    float *w_in = falloc(3 * EE), *b_in = falloc(3 * (size_t)E), *w_out = falloc(EE), *b_out = falloc((size_t)E);
    float *dxq = falloc(nq), *dxk = falloc(nk), *dxv = falloc(nk);
    float *dw_in = falloc(3 * EE), *db_in = falloc(3 * (size_t)E), *dw_out = falloc(EE), *db_out = falloc((size_t)E);
    double *ref = dalloc(3 * EE + nq + 2 * nk);
    mha_sizes sz;
    mha_run run;
    mha_error err;
    char what[160];
    mha_status st;

    if (self) Lk = Lq;
    r.s = 0xD1B54A32D192ED03ULL ^ seed;
    tu_fill(&r, xq, nq, 1.0f); tu_fill(&r, xk, nk, 1.0f); tu_fill(&r, xv, nk, 1.0f); tu_fill(&r, g, nq, 1.0f);
    tu_fill(&r, w_in, 3 * EE, 0.6f); tu_fill(&r, b_in, 3 * (size_t)E, 0.3f);
    tu_fill(&r, w_out, EE, 0.6f); tu_fill(&r, b_out, (size_t)E, 0.3f);
    make_masks(&r, &m, B, Lq, Lk, use_float, use_kpm, causal, 0);
    set_options(&m, B, Lq, Lk, &opt);

    memset(&mod, 0, sizeof mod);
    mod.embed_dim = E; mod.num_heads = H; mod.in_proj_weight = w_in; mod.out_proj_weight = w_out;
    if (has_bias) { mod.in_proj_bias = b_in; mod.out_proj_bias = b_out; }
    gr.in_proj_weight = dw_in; gr.in_proj_bias = db_in; gr.out_proj_weight = dw_out; gr.out_proj_bias = db_out;

    st = mha_module_plan_size(&mod, B, Lq, Lk, &opt, MHA_PLAN_TRAINING, &sz, &err);
    CHECK(st == MHA_OK, "mha_module_plan_size: %s", err.message);
    memset(&run, 0, sizeof run);
    run.workspace = malloc(st == MHA_OK ? sz.workspace : 1);
    run.workspace_bytes = st == MHA_OK ? sz.workspace : 0;
    if (self)
        st = mha_module_backward(&mod, B, Lq, Lq, xq, xq, xq, g, &opt, dxq, dxq, dxq, &gr, &run, &err);
    else
        st = mha_module_backward(&mod, B, Lq, Lk, xq, xk, xv, g, &opt, dxq, dxk, dxv, &gr, &run, &err);
    CHECK(st == MHA_OK, "mha_module_backward: %s", err.message);
    /* too small a workspace is refused before anything is written (on one
       thread, explicitly: with num_threads 0 a one-shot call would run on
       fewer threads when the workspace holds fewer): a caller's workspace
       holds the plan's bytes, one byte less is refused */
    {
        mha_options one = opt;
        mha_sizes s1;
        float *dq_before = falloc(nq);
        memcpy(dq_before, dxq, nq * sizeof(float));
        one.num_threads = 1;
        st = mha_module_plan_size(&mod, B, Lq, Lk, &one, MHA_PLAN_TRAINING, &s1, &err);
        CHECK(st == MHA_OK && s1.workspace <= sz.workspace, "1-thread size: %s", err.message);
        run.workspace_bytes = st == MHA_OK ? s1.workspace - 1 : 0;
        st = mha_module_backward(&mod, B, Lq, Lk, xq, xk, xv, g, &one, dxq, dxk, dxv, &gr, &run, &err);
        CHECK(st == MHA_ERR_WORKSPACE_TOO_SMALL && err.field && strcmp(err.field, "run->workspace_bytes") == 0,
              "small workspace: status %d, %s", (int)st, err.message);
        CHECK(memcmp(dq_before, dxq, nq * sizeof(float)) == 0, "small workspace: dquery written");
        free(dq_before);
    }

    memset(&c, 0, sizeof c);
    c.B = B; c.Lq = Lq; c.Lk = Lk; c.E = E; c.H = H; c.has_bias = has_bias; c.m = &m;
    c.xq = dalloc(nq); c.xk = self ? c.xq : dalloc(nk); c.xv = self ? c.xq : dalloc(nk);
    c.w_in = dalloc(3 * EE); c.b_in = dalloc(3 * (size_t)E); c.w_out = dalloc(EE); c.b_out = dalloc((size_t)E);
    c.g = dalloc(nq); c.Q = dalloc(nq); c.K = dalloc(nk); c.V = dalloc(nk); c.C = dalloc(nq); c.Y = dalloc(nq);
    to_double(xq, c.xq, nq);
    if (!self) { to_double(xk, c.xk, nk); to_double(xv, c.xv, nk); }
    to_double(w_in, c.w_in, 3 * EE); to_double(b_in, c.b_in, 3 * (size_t)E);
    to_double(w_out, c.w_out, EE); to_double(b_out, c.b_out, (size_t)E); to_double(g, c.g, nq);

    snprintf(what, sizeof what, "mha B%d Lq%d Lk%d E%d H%d self%d bias%d f%d k%d c%d",
             B, Lq, Lk, E, H, self, has_bias, use_float, use_kpm, causal);
#define GRAD(name, arr, n, got)                                        \
    do { char w2[200]; fd_grad(mha_loss, &c, arr, n, ref);             \
         snprintf(w2, sizeof w2, "%s %s", what, name);                 \
         check_grad(w2, got, ref, n, &worst_mha); } while (0)
    GRAD("dquery", c.xq, nq, dxq);
    if (!self) { GRAD("dkey", c.xk, nk, dxk); GRAD("dvalue", c.xv, nk, dxv); }
    GRAD("d in_proj_weight", c.w_in, 3 * EE, dw_in);
    GRAD("d out_proj_weight", c.w_out, EE, dw_out);
    if (has_bias) {
        GRAD("d in_proj_bias", c.b_in, 3 * (size_t)E, db_in);
        GRAD("d out_proj_bias", c.b_out, (size_t)E, db_out);
    } else {
        size_t i; int untouched = 1;
        for (i = 0; i < 3 * (size_t)E; ++i) untouched &= db_in[i] == 0.0f;
        CHECK(untouched, "bias=False: bias gradient left alone");
    }
#undef GRAD
    free(xq); free(xk); free(xv); free(g); free(w_in); free(b_in); free(w_out); free(b_out);
    free(dxq); free(dxk); free(dxv); free(dw_in); free(db_in); free(dw_out); free(db_out); free(ref);
    free(c.xq); if (!self) { free(c.xk); free(c.xv); }
    free(c.w_in); free(c.b_in); free(c.w_out); free(c.b_out); free(c.g);
    free(c.Q); free(c.K); free(c.V); free(c.C); free(c.Y); free(run.workspace);
}

/* The module in its other configurations: separate q/k/v weights with kdim and
   vdim, bias_k/bias_v, add_zero_attn.  Reference in double, as above. */
typedef struct {
    int B, Lq, Lk, E, H, kdim, vdim, bias_kv, zero_attn;
    const masks *m;
    double *xq, *xk, *xv, *wq, *wk, *wv, *b_in, *bias_k, *bias_v, *w_out, *b_out, *g;
    double *Q, *K, *V, *C, *Y;
} mha2_case;

static double mha2_loss(void *vctx)
{
    mha2_case *c = (mha2_case *)vctx;
    int E = c->E, H = c->H, D = E / H, Lke = c->Lk + c->bias_kv + c->zero_attn, b, h, r, e;
    ref_linear(c->B * c->Lq, E, E, c->xq, c->wq, c->b_in, c->Q);
    for (b = 0; b < c->B; ++b) {
        double *Kb = c->K + (size_t)b * Lke * E, *Vb = c->V + (size_t)b * Lke * E;
        ref_linear(c->Lk, c->kdim, E, c->xk + (size_t)b * c->Lk * c->kdim, c->wk, c->b_in + E, Kb);
        ref_linear(c->Lk, c->vdim, E, c->xv + (size_t)b * c->Lk * c->vdim, c->wv, c->b_in + 2 * E, Vb);
        r = c->Lk;
        if (c->bias_kv) {
            for (e = 0; e < E; ++e) { Kb[r * E + e] = c->bias_k[e]; Vb[r * E + e] = c->bias_v[e]; }
            ++r;
        }
        if (c->zero_attn) for (e = 0; e < E; ++e) Kb[r * E + e] = Vb[r * E + e] = 0;
    }
    for (b = 0; b < c->B; ++b)
        for (h = 0; h < H; ++h)
            ref_head(c->m, c->B, b, c->Lq, Lke, c->Lk, D, D, 1.0 / sqrt((double)D),
                     c->Q + (size_t)b * c->Lq * E + h * D, (size_t)E,
                     c->K + (size_t)b * Lke * E + h * D, (size_t)E,
                     c->V + (size_t)b * Lke * E + h * D, (size_t)E,
                     c->C + (size_t)b * c->Lq * E + h * D, (size_t)E);
    ref_linear(c->B * c->Lq, E, E, c->C, c->w_out, c->b_out, c->Y);
    return dot(c->Y, c->g, (size_t)c->B * c->Lq * E);
}

static void test_mha_general(int B, int Lq, int Lk, int E, int H, int kdim, int vdim, int bias_kv,
                             int zero_attn, int use_kpm, int causal, unsigned seed)
{
    enum { XQ, XK, XV, WQ, WK, WV, BIN, BK, BV, WOUT, BOUT, NP };
    static const char *names[NP] = {"dquery", "dkey", "dvalue", "d q_proj_weight", "d k_proj_weight",
        "d v_proj_weight", "d in_proj_bias", "d bias_k", "d bias_v", "d out_proj.weight", "d out_proj.bias"};
    size_t sz[NP];
    float *f[NP], *gr[NP], *g;
    double *d[NP], *ref;
    tu_rng r; masks m; mha_options opt; mha_module mod; mha_module_grad mg; mha2_case c;
    int Lke = Lk + bias_kv + zero_attn, i;
    size_t nq = (size_t)B * Lq * E, maxn = 0;
    mha_error err;
    mha_status st;

    sz[XQ] = nq; sz[XK] = (size_t)B * Lk * kdim; sz[XV] = (size_t)B * Lk * vdim;
    sz[WQ] = (size_t)E * E; sz[WK] = (size_t)E * kdim; sz[WV] = (size_t)E * vdim;
    sz[BIN] = 3 * (size_t)E; sz[BK] = sz[BV] = (size_t)E; sz[WOUT] = (size_t)E * E; sz[BOUT] = (size_t)E;
    r.s = 0x5851F42D4C957F2DULL ^ seed;
    for (i = 0; i < NP; ++i) {
        f[i] = falloc(sz[i]); gr[i] = falloc(sz[i]); d[i] = dalloc(sz[i]);
        tu_fill(&r, f[i], sz[i], i < WQ ? 1.0f : 0.6f);
        to_double(f[i], d[i], sz[i]);
        if (sz[i] > maxn) maxn = sz[i];
    }
    g = falloc(nq);
    tu_fill(&r, g, nq, 1.0f);
    make_masks(&r, &m, B, Lq, Lk, 0, use_kpm, causal, 0);
    set_options(&m, B, Lq, Lk, &opt);

    memset(&mod, 0, sizeof mod);
    mod.embed_dim = E; mod.num_heads = H; mod.kdim = kdim; mod.vdim = vdim;
    mod.q_proj_weight = f[WQ]; mod.k_proj_weight = f[WK]; mod.v_proj_weight = f[WV];
    mod.in_proj_bias = f[BIN]; mod.out_proj_weight = f[WOUT]; mod.out_proj_bias = f[BOUT];
    if (bias_kv) { mod.bias_k = f[BK]; mod.bias_v = f[BV]; }
    mod.add_zero_attn = zero_attn;
    memset(&mg, 0, sizeof mg);
    mg.q_proj_weight = gr[WQ]; mg.k_proj_weight = gr[WK]; mg.v_proj_weight = gr[WV];
    mg.in_proj_bias = gr[BIN]; mg.out_proj_weight = gr[WOUT]; mg.out_proj_bias = gr[BOUT];
    mg.bias_k = gr[BK]; mg.bias_v = gr[BV];
    mg.in_proj_weight = gr[WQ];   /* ignored: this module has separate weights */

    st = mha_module_backward(&mod, B, Lq, Lk, f[XQ], f[XK], f[XV], g, &opt, gr[XQ], gr[XK], gr[XV], &mg, NULL, &err);
    CHECK(st == MHA_OK, "mha_module_backward (general): %s", err.message);
    {
        /* the forward of the library agrees with the reference */
        float *out = falloc(nq);
        double *yd;
        memset(&c, 0, sizeof c);
        c.B = B; c.Lq = Lq; c.Lk = Lk; c.E = E; c.H = H; c.kdim = kdim; c.vdim = vdim;
        c.bias_kv = bias_kv; c.zero_attn = zero_attn; c.m = &m;
        c.xq = d[XQ]; c.xk = d[XK]; c.xv = d[XV]; c.wq = d[WQ]; c.wk = d[WK]; c.wv = d[WV];
        c.b_in = d[BIN]; c.bias_k = d[BK]; c.bias_v = d[BV]; c.w_out = d[WOUT]; c.b_out = d[BOUT];
        c.g = dalloc(nq); to_double(g, c.g, nq);
        c.Q = dalloc(nq); c.K = dalloc((size_t)B * Lke * E); c.V = dalloc((size_t)B * Lke * E);
        c.C = dalloc(nq); c.Y = dalloc(nq);
        st = mha_module_forward(&mod, B, Lq, Lk, f[XQ], f[XK], f[XV], &opt, out, NULL, &err);
        CHECK(st == MHA_OK, "mha_module_forward: %s", err.message);
        mha2_loss(&c);
        yd = c.Y;
        CHECK(tu_rel_err(out, yd, nq) <= 1e-5, "general forward rel err %.3g", tu_rel_err(out, yd, nq));
        free(out);
    }
    ref = dalloc(maxn);
    for (i = 0; i < NP; ++i) {
        char what[200];
        if (!bias_kv && (i == BK || i == BV)) {
            size_t k; int untouched = 1;
            for (k = 0; k < sz[i]; ++k) untouched &= gr[i][k] == 0.0f;
            CHECK(untouched, "no bias_k: its gradient is left alone");
            continue;
        }
        fd_grad(mha2_loss, &c, d[i], sz[i], ref);
        snprintf(what, sizeof what, "mha B%d Lq%d Lk%d E%d H%d kdim%d vdim%d bias_kv%d zero%d k%d c%d %s",
                 B, Lq, Lk, E, H, kdim, vdim, bias_kv, zero_attn, use_kpm, causal, names[i]);
        check_grad(what, gr[i], ref, sz[i], &worst_mha);
    }
    for (i = 0; i < NP; ++i) { free(f[i]); free(gr[i]); free(d[i]); }
    free(g); free(ref); free(c.g); free(c.Q); free(c.K); free(c.V); free(c.C); free(c.Y);
}

/* A refusal: the status and the field mha_error names. */
static void refused(mha_status st, mha_status want, const mha_error *err, const char *field, const char *what)
{
    CHECK(st == want && err->field && strcmp(err->field, field) == 0,
          "%s: status %d (want %d), field %s (want %s): %s", what, (int)st, (int)want,
          err->field ? err->field : "(null)", field, err->message);
}

static void test_validation(void)
{
    float x[12] = {0}, w[48] = {0};
    mha_module mod;
    mha_sizes sz;
    mha_error err;
    memset(&mod, 0, sizeof mod);
    mod.embed_dim = 2; mod.num_heads = 1; mod.in_proj_weight = w; mod.out_proj_weight = w;
    refused(mha_module_backward(&mod, 1, 1, 1, x, x, x, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &err),
            MHA_ERR_NULL_POINTER, &err, "dout", "NULL dout");
    mod.add_zero_attn = 2;
    refused(mha_module_plan_size(&mod, 1, 1, 1, NULL, MHA_PLAN_TRAINING, &sz, &err), MHA_ERR_INVALID_ARGUMENT,
            &err, "m->add_zero_attn", "add_zero_attn is 0 or 1");
    mod.add_zero_attn = 0; mod.bias_k = w;
    refused(mha_module_plan_size(&mod, 1, 1, 1, NULL, MHA_PLAN_TRAINING, &sz, &err), MHA_ERR_INVALID_ARGUMENT,
            &err, "m->bias_v", "bias_k without bias_v");
    mod.bias_k = NULL; mod.kdim = 3;
    refused(mha_module_plan_size(&mod, 1, 1, 1, NULL, MHA_PLAN_TRAINING, &sz, &err), MHA_ERR_INVALID_ARGUMENT,
            &err, "m->kdim", "kdim != E with in_proj_weight");
    mod.kdim = 0; mod.num_heads = 3;
    refused(mha_module_plan_size(&mod, 1, 1, 1, NULL, MHA_PLAN_TRAINING, &sz, &err), MHA_ERR_HEADS_DIVIDE,
            &err, "m->num_heads", "E %% H");
    refused(mha_sdpa_backward(1, 1, 0, 1, 1, 1, x, x, x, x, NULL, x, x, x, NULL, &err), MHA_ERR_INVALID_SIZE,
            &err, "Lq", "Lq = 0");
}

/* ---------------------------------------------------------------- encoder */

static void ref_layernorm(int rows, int E, const double *x, const double *w, const double *b, double *y)
{
    int r, j;
    for (r = 0; r < rows; ++r) {
        const double *xr = x + (size_t)r * E;
        double m = 0, v = 0;
        for (j = 0; j < E; ++j) m += xr[j];
        m /= E;
        for (j = 0; j < E; ++j) v += (xr[j] - m) * (xr[j] - m);
        v /= E;
        for (j = 0; j < E; ++j) y[(size_t)r * E + j] = (xr[j] - m) / sqrt(v + 1e-5) * w[j] + b[j];
    }
}

static double ref_act(int gelu, double z) { return gelu ? 0.5 * z * (1 + erf(z / sqrt(2.0))) : (z > 0 ? z : 0); }

typedef struct {
    mha_case sa;                    /* self-attention; its xq is set per call */
    int F, gelu, norm_first;
    double *x, *w1, *b1, *w2, *b2, *n1w, *n1b, *n2w, *n2b, *g;
    double *t1, *h, *z, *t2, *y;    /* scratch */
} enc_case;

static void ref_encoder(enc_case *c)
{
    int N = c->sa.B * c->sa.Lq, E = c->sa.E, F = c->F;
    size_t ne = (size_t)N * E, i;
    if (!c->norm_first) {
        c->sa.xq = c->sa.xk = c->sa.xv = c->x;
        ref_mha(&c->sa);
        for (i = 0; i < ne; ++i) c->t1[i] = c->x[i] + c->sa.Y[i];
        ref_layernorm(N, E, c->t1, c->n1w, c->n1b, c->h);
        ref_linear(N, E, F, c->h, c->w1, c->b1, c->z);
        for (i = 0; i < (size_t)N * F; ++i) c->z[i] = ref_act(c->gelu, c->z[i]);
        ref_linear(N, F, E, c->z, c->w2, c->b2, c->t2);
        for (i = 0; i < ne; ++i) c->t2[i] += c->h[i];
        ref_layernorm(N, E, c->t2, c->n2w, c->n2b, c->y);
    } else {
        ref_layernorm(N, E, c->x, c->n1w, c->n1b, c->t1);
        c->sa.xq = c->sa.xk = c->sa.xv = c->t1;
        ref_mha(&c->sa);
        for (i = 0; i < ne; ++i) c->h[i] = c->x[i] + c->sa.Y[i];
        ref_layernorm(N, E, c->h, c->n2w, c->n2b, c->t2);
        ref_linear(N, E, F, c->t2, c->w1, c->b1, c->z);
        for (i = 0; i < (size_t)N * F; ++i) c->z[i] = ref_act(c->gelu, c->z[i]);
        ref_linear(N, F, E, c->z, c->w2, c->b2, c->y);
        for (i = 0; i < ne; ++i) c->y[i] += c->h[i];
    }
}

static double enc_loss(void *vctx)
{
    enc_case *c = (enc_case *)vctx;
    ref_encoder(c);
    return dot(c->y, c->g, (size_t)c->sa.B * c->sa.Lq * c->sa.E);
}

/* a float tensor of n values and its double copy */
typedef struct { float *f; double *d; float *grad; size_t n; } param;
static void param_make(param *p, tu_rng *r, size_t n, float amp, float offset)
{
    size_t i;
    p->n = n; p->f = falloc(n); p->d = dalloc(n); p->grad = falloc(n);
    tu_fill(r, p->f, n, amp);
    for (i = 0; i < n; ++i) { p->f[i] += offset; p->d[i] = p->f[i]; }
}
static void param_free(param *p) { free(p->f); free(p->d); free(p->grad); }

/* affine = 0: the layer norms have no weight or bias (elementwise_affine=False,
   NULL pointers) and the linear layers no bias; the reference uses w = 1, b = 0. */
static void test_encoder(int B, int L, int E, int H, int F, int gelu, int norm_first,
                         int causal, int use_kpm, int affine, unsigned seed)
{
    enum { X, WIN, BIN, WOUT, BOUT, W1, B1, W2, B2, N1W, N1B, N2W, N2B, NP };
    static const char *names[NP] = {"dx", "d self_attn.in_proj_weight", "d self_attn.in_proj_bias",
        "d self_attn.out_proj.weight", "d self_attn.out_proj.bias", "d linear1.weight",
        "d linear1.bias", "d linear2.weight", "d linear2.bias", "d norm1.weight", "d norm1.bias",
        "d norm2.weight", "d norm2.bias"};
    tu_rng r; masks m; mha_options opt; enc_case c; param p[NP];
    mha_encoder_layer ly; mha_encoder_layer_grad gr;
    size_t N = (size_t)B * L, ne = N * E, k;
    float *g = falloc(ne), *y = falloc(ne), *dx2 = falloc(ne);
    double *ref;
    mha_sizes sz;
    mha_run run;
    mha_error err;
    mha_status st;
    int i;

    r.s = 0xA0761D6478BD642FULL ^ seed;
    param_make(&p[X], &r, ne, 1.0f, 0.0f);
    param_make(&p[WIN], &r, 3 * (size_t)E * E, 0.6f, 0.0f);
    param_make(&p[BIN], &r, 3 * (size_t)E, 0.3f, 0.0f);
    param_make(&p[WOUT], &r, (size_t)E * E, 0.6f, 0.0f);
    param_make(&p[BOUT], &r, (size_t)E, 0.3f, 0.0f);
    param_make(&p[W1], &r, (size_t)F * E, 0.6f, 0.0f);
    param_make(&p[B1], &r, (size_t)F, 0.3f, 0.0f);
    param_make(&p[W2], &r, (size_t)E * F, 0.6f, 0.0f);
    param_make(&p[B2], &r, (size_t)E, 0.3f, 0.0f);
    param_make(&p[N1W], &r, (size_t)E, 0.3f, 1.0f);
    param_make(&p[N1B], &r, (size_t)E, 0.3f, 0.0f);
    param_make(&p[N2W], &r, (size_t)E, 0.3f, 1.0f);
    param_make(&p[N2B], &r, (size_t)E, 0.3f, 0.0f);
    tu_fill(&r, g, ne, 1.0f);
    if (!affine) {
        static const int off[6] = {B1, B2, N1B, N2B, N1W, N2W};
        for (i = 0; i < 6; ++i)
            for (k = 0; k < p[off[i]].n; ++k) p[off[i]].d[k] = p[off[i]].f[k] = i < 4 ? 0.0f : 1.0f;
    }
    make_masks(&r, &m, B, L, L, 0, use_kpm, causal, 0);
    set_options(&m, B, L, L, &opt);

    memset(&ly, 0, sizeof ly);
    ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
    ly.self_attn.in_proj_weight = p[WIN].f; ly.self_attn.in_proj_bias = p[BIN].f;
    ly.self_attn.out_proj_weight = p[WOUT].f; ly.self_attn.out_proj_bias = p[BOUT].f;
    ly.dim_feedforward = F; ly.activation = gelu ? MHA_ACT_GELU : MHA_ACT_RELU; ly.norm_first = norm_first;
    ly.linear1_weight = p[W1].f; ly.linear1_bias = p[B1].f; ly.linear2_weight = p[W2].f; ly.linear2_bias = p[B2].f;
    ly.norm1_weight = p[N1W].f; ly.norm1_bias = p[N1B].f; ly.norm2_weight = p[N2W].f; ly.norm2_bias = p[N2B].f;
    if (!affine) {
        ly.linear1_bias = ly.linear2_bias = NULL;
        ly.norm1_weight = ly.norm1_bias = ly.norm2_weight = ly.norm2_bias = NULL;
    }
    memset(&gr, 0, sizeof gr);
    gr.self_attn.in_proj_weight = p[WIN].grad; gr.self_attn.in_proj_bias = p[BIN].grad;
    gr.self_attn.out_proj_weight = p[WOUT].grad; gr.self_attn.out_proj_bias = p[BOUT].grad;
    gr.linear1_weight = p[W1].grad; gr.linear1_bias = p[B1].grad;
    gr.linear2_weight = p[W2].grad; gr.linear2_bias = p[B2].grad;
    gr.norm1_weight = p[N1W].grad; gr.norm1_bias = p[N1B].grad;
    gr.norm2_weight = p[N2W].grad; gr.norm2_bias = p[N2B].grad;

    /* the forward saves what the backward needs (run.saved); the backward reads it */
    st = mha_encoder_plan_size(&ly, B, L, &opt, MHA_PLAN_TRAINING, &sz, &err);
    CHECK(st == MHA_OK && sz.saved > 0, "mha_encoder_plan_size: %s", err.message);
    memset(&run, 0, sizeof run);
    run.workspace = malloc(st == MHA_OK ? sz.workspace : 1);
    run.workspace_bytes = st == MHA_OK ? sz.workspace : 0;
    run.saved = malloc(st == MHA_OK ? sz.saved : 1);
    run.saved_bytes = st == MHA_OK ? sz.saved : 0;
    st = mha_encoder_forward(&ly, B, L, p[X].f, &opt, y, &run, &err);
    CHECK(st == MHA_OK, "mha_encoder_forward (saving): %s", err.message);
    st = mha_encoder_backward(&ly, B, L, p[X].f, g, &opt, p[X].grad, &gr, &run, &err);
    CHECK(st == MHA_OK, "mha_encoder_backward (saved forward): %s", err.message);
    /* without the saved forward the backward computes it again: the same dx */
    {
        mha_run again = run;
        again.saved = NULL; again.saved_bytes = 0;
        st = mha_encoder_backward(&ly, B, L, p[X].f, g, &opt, dx2, NULL, &again, &err);
        CHECK(st == MHA_OK, "mha_encoder_backward (recompute): %s", err.message);
        CHECK(tu_rel_err_ff(dx2, p[X].grad, ne) <= 1e-6, "encoder dx: recomputed forward vs saved %.3g",
              tu_rel_err_ff(dx2, p[X].grad, ne));
    }

    memset(&c, 0, sizeof c);
    c.sa.B = B; c.sa.Lq = c.sa.Lk = L; c.sa.E = E; c.sa.H = H; c.sa.has_bias = 1; c.sa.m = &m;
    c.sa.w_in = p[WIN].d; c.sa.b_in = p[BIN].d; c.sa.w_out = p[WOUT].d; c.sa.b_out = p[BOUT].d;
    c.sa.Q = dalloc(ne); c.sa.K = dalloc(ne); c.sa.V = dalloc(ne); c.sa.C = dalloc(ne); c.sa.Y = dalloc(ne);
    c.F = F; c.gelu = gelu; c.norm_first = norm_first;
    c.x = p[X].d; c.w1 = p[W1].d; c.b1 = p[B1].d; c.w2 = p[W2].d; c.b2 = p[B2].d;
    c.n1w = p[N1W].d; c.n1b = p[N1B].d; c.n2w = p[N2W].d; c.n2b = p[N2B].d;
    c.g = dalloc(ne); to_double(g, c.g, ne);
    c.t1 = dalloc(ne); c.h = dalloc(ne); c.z = dalloc(N * F); c.t2 = dalloc(ne); c.y = dalloc(ne);

    ref_encoder(&c);
    CHECK(tu_rel_err(y, c.y, ne) <= 1e-5, "encoder forward rel err %.3g", tu_rel_err(y, c.y, ne));

    ref = dalloc(3 * (size_t)E * E + ne + (size_t)F * E);
    for (i = 0; i < NP; ++i) {
        char what[200];
        if (!affine && (i == B1 || i == B2 || i >= N1W)) {
            int untouched = 1;
            for (k = 0; k < p[i].n; ++k) untouched &= p[i].grad[k] == 0.0f;
            CHECK(untouched, "absent weight %s: gradient left alone", names[i]);
            continue;
        }
        fd_grad(enc_loss, &c, p[i].d, p[i].n, ref);
        snprintf(what, sizeof what, "encoder B%d L%d E%d H%d F%d %s %s c%d k%d affine%d: %s", B, L, E, H,
                 F, gelu ? "gelu" : "relu", norm_first ? "pre" : "post", causal, use_kpm, affine, names[i]);
        check_grad(what, p[i].grad, ref, p[i].n, &worst_enc);
    }
    free(ref);
    for (k = 0; k < NP; ++k) param_free(&p[k]);
    free(g); free(y); free(dx2); free(run.workspace); free(run.saved);
    free(c.sa.Q); free(c.sa.K); free(c.sa.V); free(c.sa.C); free(c.sa.Y); free(c.g);
    free(c.t1); free(c.h); free(c.z); free(c.t2); free(c.y);
}

static void test_encoder_all(void)
{
    test_encoder(1, 1, 3, 1, 3, 0, 0, 0, 0, 1, 21);  /* E = 2 is degenerate: LN of two values is +-1 */
    test_encoder(2, 5, 6, 3, 7, 0, 0, 0, 0, 1, 22);
    test_encoder(2, 5, 6, 2, 7, 1, 0, 1, 1, 1, 23);
    test_encoder(1, 7, 9, 3, 5, 0, 1, 1, 0, 1, 24);
    test_encoder(2, 3, 4, 4, 11, 1, 1, 0, 1, 1, 25);
    test_encoder(2, 4, 5, 1, 6, 0, 0, 0, 0, 0, 26);
    test_encoder(1, 5, 6, 2, 9, 1, 1, 1, 0, 0, 27);
}

int main(void)
{
    /* SDPA: odd shapes, each mask kind, causal both ways (Lq > Lk bottom-right
       leaves rows with no key at all: their gradient must be zero) */
    test_sdpa(1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1);
    test_sdpa(2, 3, 5, 7, 3, 5, 0, 0, 0, 0, 2);
    test_sdpa(1, 2, 7, 7, 4, 3, 0, 0, 1, 0, 3);
    test_sdpa(2, 1, 7, 5, 3, 2, 0, 0, 1, 1, 4);
    test_sdpa(2, 2, 5, 9, 3, 3, 1, 1, 0, 0, 5);
    test_sdpa(1, 3, 3, 17, 2, 1, 1, 0, 1, 1, 6);

    /* module: cross- and self-attention, with and without bias and masks */
    test_mha(1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 11);
    test_mha(2, 5, 7, 6, 3, 0, 1, 0, 0, 0, 12);
    test_mha(2, 5, 5, 9, 3, 1, 1, 0, 0, 1, 13);
    test_mha(1, 3, 7, 4, 2, 0, 0, 1, 1, 0, 14);
    test_mha(2, 7, 7, 5, 1, 1, 1, 1, 1, 1, 15);

    test_mha_general(2, 3, 5, 6, 2, 4, 7, 0, 0, 0, 0, 16);
    test_mha_general(2, 4, 5, 6, 3, 6, 6, 1, 0, 1, 0, 17);
    test_mha_general(1, 5, 5, 4, 2, 3, 5, 1, 1, 0, 1, 18);
    test_mha_general(3, 2, 3, 3, 1, 5, 2, 0, 1, 1, 0, 19);

    test_validation();
    test_encoder_all();

    printf("worst sdpa gradient rel err %.3g, mha %.3g, encoder %.3g (tolerance %g)\n",
           worst_sdpa, worst_mha, worst_enc, TOL);
    return tu_finish("backward");
}
