/* Fused attention (attn_weights == NULL) against the unfused path (weights
   requested) and against a float64 reference: every mask kind and shape,
   causal in both alignments, bias_kv and add_zero_attn, odd sizes, NaN in
   blocked keys and values, rows with no allowed key. */
#include <stdlib.h>
#include <string.h>
#ifndef TEST_NAME
#define TEST_NAME "fused"
#endif
#define MHA__QCHUNK 1024   /* query chunks of the fused forward: small enough to test */
/* white-box: this test names the kernels of the compile-time tier (the
   kernel tiers, mha.h section 0), so it pins them */
#ifndef MHA_NO_DISPATCH
#define MHA_NO_DISPATCH
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

#define TOL 1e-5

typedef struct cfg {
    int B, H, Lq, Lk, D, Dv;
    mha_mask_kind am_kind; int am_ndim;   /* attn_mask */
    mha_mask_kind kp_kind;                /* key_padding_mask [B, Lk] */
    int causal; mha_causal_align align;
    int poison;                           /* NaN/Inf in K and V rows of padded keys */
} cfg;

/* The masks of a case as PyTorch tensors, plus what they mean per element. */
typedef struct masks {
    unsigned char *am_u, *kp_u;
    float *am_f, *kp_f;
    mha_options opt;
} masks;

static size_t am_index(const cfg *c, int b, int h, int i, int j)
{
    size_t row = c->am_ndim == 2 ? (size_t)i : ((size_t)b * c->H + h) * c->Lq + i;
    return row * c->Lk + j;
}

/* blocked by the masks (not counting causal); *add gets the float mask terms */
static int ref_blocked(const cfg *c, const masks *m, int b, int h, int i, int j, double *add)
{
    int blocked = 0;
    *add = 0;
    if (j >= c->Lk) return 0;             /* appended keys: never masked */
    if (c->am_kind != MHA_MASK_NONE) {
        size_t t = am_index(c, b, h, i, j);
        if (c->am_kind == MHA_MASK_FLOAT) {
            if (m->am_f[t] == -INFINITY) blocked = 1; else *add += m->am_f[t];
        } else if (c->am_kind == MHA_MASK_BOOL) blocked |= m->am_u[t] != 0;
        else blocked |= m->am_u[t] == 0;
    }
    if (c->kp_kind != MHA_MASK_NONE) {
        size_t t = (size_t)b * c->Lk + j;
        if (c->kp_kind == MHA_MASK_FLOAT) {
            if (m->kp_f[t] == -INFINITY) blocked = 1; else *add += m->kp_f[t];
        } else if (c->kp_kind == MHA_MASK_BOOL) blocked |= m->kp_u[t] != 0;
        else blocked |= m->kp_u[t] == 0;
    }
    if (c->causal) {
        long off = c->align == MHA_CAUSAL_BOTTOM_RIGHT ? (long)c->Lk - c->Lq : 0;
        if ((long)j > (long)i + off) blocked = 1;
    }
    return blocked;
}

/* Random masks: about a quarter blocked; query row 0 of the attn_mask is
   blocked entirely so a row without keys is always exercised. */
static void make_masks(const cfg *c, masks *m, tu_rng *r)
{
    size_t n_am = (size_t)(c->am_ndim == 2 ? 1 : c->B * c->H) * c->Lq * c->Lk, t;
    size_t n_kp = (size_t)c->B * c->Lk;
    memset(m, 0, sizeof *m);
    if (c->am_kind != MHA_MASK_NONE) {
        mha_mask *am = &m->opt.attn_mask;
        am->kind = c->am_kind; am->ndim = c->am_ndim;
        if (c->am_ndim == 2) { am->shape[0] = c->Lq; am->shape[1] = c->Lk; }
        else if (c->am_ndim == 3) { am->shape[0] = c->B * c->H; am->shape[1] = c->Lq; am->shape[2] = c->Lk; }
        else { am->shape[0] = c->B; am->shape[1] = c->H; am->shape[2] = c->Lq; am->shape[3] = c->Lk; }
        if (c->am_kind == MHA_MASK_FLOAT) {
            m->am_f = (float *)malloc(n_am * sizeof(float));
            for (t = 0; t < n_am; ++t) {
                int blk = (tu_next(r) & 3) == 0 || (t / c->Lk) % c->Lq == 0;
                m->am_f[t] = blk ? -INFINITY : tu_uniform(r);
            }
            am->data = m->am_f;
        } else {
            unsigned char blk_val = c->am_kind == MHA_MASK_BOOL ? 1 : 0;
            m->am_u = (unsigned char *)malloc(n_am);
            for (t = 0; t < n_am; ++t) {
                int blk = (tu_next(r) & 3) == 0 || (t / c->Lk) % c->Lq == 0;
                m->am_u[t] = blk ? blk_val : (unsigned char)(1 - blk_val) * (unsigned char)(1 + (tu_next(r) & 1));
            }
            am->data = m->am_u;
        }
    }
    if (c->kp_kind != MHA_MASK_NONE) {
        mha_mask *kp = &m->opt.key_padding_mask;
        kp->kind = c->kp_kind; kp->ndim = 2; kp->shape[0] = c->B; kp->shape[1] = c->Lk;
        /* pad the last third of the keys of batch 1 and a few random ones */
        if (c->kp_kind == MHA_MASK_FLOAT) {
            m->kp_f = (float *)malloc(n_kp * sizeof(float));
            for (t = 0; t < n_kp; ++t) {
                int j = (int)(t % c->Lk), b = (int)(t / c->Lk);
                int blk = (b == 1 && 3 * j >= 2 * c->Lk) || (tu_next(r) % 7) == 0;
                m->kp_f[t] = blk ? -INFINITY : 0.5f * tu_uniform(r);
            }
            kp->data = m->kp_f;
        } else {
            unsigned char blk_val = c->kp_kind == MHA_MASK_BOOL ? 1 : 0;
            m->kp_u = (unsigned char *)malloc(n_kp);
            for (t = 0; t < n_kp; ++t) {
                int j = (int)(t % c->Lk), b = (int)(t / c->Lk);
                int blk = (b == 1 && 3 * j >= 2 * c->Lk) || (tu_next(r) % 7) == 0;
                m->kp_u[t] = blk ? blk_val : (unsigned char)(1 - blk_val);
            }
            kp->data = m->kp_u;
        }
    }
    m->opt.causal = c->causal;
    m->opt.causal_align = c->align;
}

static void free_masks(masks *m)
{
    free(m->am_u); free(m->kp_u); free(m->am_f); free(m->kp_f);
}

/* A key blocked for every query of batch b and head h (so poison may go there). */
static int blocked_for_all(const cfg *c, const masks *m, int b, int h, int j)
{
    int i;
    double add;
    for (i = 0; i < c->Lq; ++i) if (!ref_blocked(c, m, b, h, i, j, &add)) return 0;
    return 1;
}

/* float64 SDPA on dense [B,H,L,D]; skips blocked keys entirely */
static void ref_sdpa(const cfg *c, const masks *m, const float *q, const float *k, const float *v,
                     double *out, double *w)
{
    int b, h, i, j, d;
    double scale = 1.0 / sqrt((double)c->D);
    double *s = (double *)malloc((size_t)c->Lk * sizeof(double));
    for (b = 0; b < c->B; ++b)
    for (h = 0; h < c->H; ++h) {
        size_t bh = (size_t)b * c->H + h;
        const float *qb = q + bh * c->Lq * c->D, *kb = k + bh * c->Lk * c->D, *vb = v + bh * c->Lk * c->Dv;
        for (i = 0; i < c->Lq; ++i) {
            double mx = -INFINITY, sum = 0, add;
            double *o = out + (bh * c->Lq + i) * c->Dv;
            double *wr = w + (bh * c->Lq + i) * c->Lk;
            for (j = 0; j < c->Lk; ++j) {
                if (ref_blocked(c, m, b, h, i, j, &add)) { s[j] = -INFINITY; continue; }
                s[j] = add;
                for (d = 0; d < c->D; ++d) s[j] += scale * (double)qb[(size_t)i * c->D + d] * kb[(size_t)j * c->D + d] - (d == 0 ? 0 : 0);
                if (s[j] > mx) mx = s[j];
            }
            for (d = 0; d < c->Dv; ++d) o[d] = 0;
            for (j = 0; j < c->Lk; ++j) { wr[j] = s[j] == -INFINITY ? 0 : exp(s[j] - mx); sum += wr[j]; }
            for (j = 0; j < c->Lk; ++j) {
                wr[j] = sum > 0 ? wr[j] / sum : 0;
                if (wr[j] != 0) for (d = 0; d < c->Dv; ++d) o[d] += wr[j] * vb[(size_t)j * c->Dv + d];
            }
        }
    }
    free(s);
}

static int has_nonfinite(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (!(x[i] - x[i] == 0.0f)) return 1;
    return 0;
}

static double worst_fused = 0, worst_unfused = 0, worst_pair = 0;

/* the workspace bytes of an SDPA plan of case c at lengths Lq, Lk (flags 0: fused) */
static mha_status sdpa_ws(const cfg *c, int Lq, int Lk, const mha_options *o, unsigned flags, size_t *bytes)
{
    mha_sizes sz = {0, 0, 0};
    mha_error err;
    mha_status st = mha_sdpa_plan_size(c->B, c->H, Lq, Lk, c->D, c->Dv, o, flags, &sz, &err);
    CHECK(st == MHA_OK, "mha_sdpa_plan_size: %s", err.message);
    *bytes = st == MHA_OK ? sz.workspace : 0;
    return st;
}

static void run_sdpa_case(const cfg *c, unsigned seed)
{
    tu_rng r;
    masks m;
    size_t nq = (size_t)c->B * c->H * c->Lq * c->D, nk = (size_t)c->B * c->H * c->Lk * c->D;
    size_t nv = (size_t)c->B * c->H * c->Lk * c->Dv, no = (size_t)c->B * c->H * c->Lq * c->Dv;
    size_t nw = (size_t)c->B * c->H * c->Lq * c->Lk;
    float *q = (float *)malloc(nq * sizeof(float)), *k = (float *)malloc(nk * sizeof(float));
    float *v = (float *)malloc(nv * sizeof(float));
    float *of = (float *)malloc(no * sizeof(float)), *ou = (float *)malloc(no * sizeof(float));
    float *w = (float *)malloc(nw * sizeof(float));
    double *ro = (double *)malloc(no * sizeof(double)), *rw = (double *)malloc(nw * sizeof(double));
    double e1, e2, e3, e4;
    size_t ws_fused = 0, ws_unfused = 0;
    mha_status s1, s2;
    mha_run run;
    mha_error err;
    int b, h, j, d;
    r.s = 0x9e3779b97f4a7c15ULL ^ (seed * 7919u + 1);
    tu_fill(&r, q, nq, 2.0f); tu_fill(&r, k, nk, 2.0f); tu_fill(&r, v, nv, 1.0f);
    make_masks(c, &m, &r);
    if (c->poison) {
        int nan_rows = 0;
        for (b = 0; b < c->B; ++b) for (h = 0; h < c->H; ++h) for (j = 0; j < c->Lk; ++j)
            if (blocked_for_all(c, &m, b, h, j)) {
                size_t bh = (size_t)b * c->H + h;
                for (d = 0; d < c->D; ++d) k[(bh * c->Lk + j) * c->D + d] = (j & 1) ? NAN : INFINITY;
                for (d = 0; d < c->Dv; ++d) v[(bh * c->Lk + j) * c->Dv + d] = (j & 1) ? -INFINITY : NAN;
                ++nan_rows;
            }
        CHECK(nan_rows > 0, "poison case without a fully blocked key (Lq %d Lk %d)", c->Lq, c->Lk);
    }
    ref_sdpa(c, &m, q, k, v, ro, rw);
    memset(of, 0xff, no * sizeof(float));   /* NaN: every element must be written */
    memset(ou, 0xff, no * sizeof(float));
    s1 = mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, k, v, &m.opt, of, NULL, &err);
    CHECK(s1 == MHA_OK, "fused mha_sdpa_forward: %s", err.message);
    memset(&run, 0, sizeof run);
    run.weights = w;
    s2 = mha_sdpa_forward(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, q, k, v, &m.opt, ou, &run, &err);
    CHECK(s2 == MHA_OK, "unfused mha_sdpa_forward: %s", err.message);
    e1 = tu_rel_err(of, ro, no);
    e2 = tu_rel_err(ou, ro, no);
    e3 = tu_rel_err_ff(of, ou, no);
    e4 = tu_rel_err(w, rw, nw);
    if (e1 > worst_fused) worst_fused = e1;
    if (e2 > worst_unfused) worst_unfused = e2;
    if (e3 > worst_pair) worst_pair = e3;
    CHECK(e1 <= TOL && e2 <= TOL && e3 <= TOL && e4 <= TOL,
          "sdpa B%d H%d Lq%d Lk%d D%d Dv%d am%d/%d kp%d causal%d/%d poison%d: "
          "fused %.3g unfused %.3g pair %.3g weights %.3g",
          c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, c->am_kind, c->am_ndim, c->kp_kind,
          c->causal, c->align, c->poison, e1, e2, e3, e4);
    CHECK(!has_nonfinite(of, no) && !has_nonfinite(ou, no), "non-finite output (poison %d)", c->poison);
    /* the fused workspace is per-thread tiles plus the packed keys and
       values of one (b, h): independent of Lq, linear in Lk.  A plan with
       MHA_PLAN_WEIGHTS holds the fused path too (runs may skip the
       weights, or ask for rows) and the unfused score rows, which grow with
       Lk, at most linearly: there is no Lq x Lk block in either.  (Where the
       unfused rows outgrow the fused tiles, test_memory.c checks they grow.) */
    {
        mha_options o = m.opt;
        size_t big_q = 0, big_k = 0, big_unfused = 0;
        mha_status st;
        memset(&o.attn_mask, 0, sizeof o.attn_mask); memset(&o.key_padding_mask, 0, sizeof o.key_padding_mask);
        st = sdpa_ws(c, c->Lq, c->Lk, &o, 0, &ws_fused);
        st |= sdpa_ws(c, c->Lq, c->Lk, &o, MHA_PLAN_WEIGHTS, &ws_unfused);
        st |= sdpa_ws(c, 16 * c->Lq, c->Lk, &o, 0, &big_q);
        st |= sdpa_ws(c, c->Lq, 16 * c->Lk, &o, 0, &big_k);
        st |= sdpa_ws(c, c->Lq, 16 * c->Lk, &o, MHA_PLAN_WEIGHTS, &big_unfused);
        CHECK(st == MHA_OK && ws_fused > 0 && big_q == ws_fused && big_k <= 16 * ws_fused &&
              ws_unfused >= ws_fused && big_unfused >= big_k && big_unfused >= ws_unfused &&
              big_unfused <= 16 * ws_unfused,
              "workspace fused %zu (16 Lq: %zu, 16 Lk: %zu), unfused %zu -> %zu",
              ws_fused, big_q, big_k, ws_unfused, big_unfused);
    }
    free_masks(&m);
    free(q); free(k); free(v); free(of); free(ou); free(w); free(ro); free(rw);
}

/* ---- the module: bias_kv, add_zero_attn, key padding, causal */

/* float64 nn.MultiheadAttention forward, batch first */
static void ref_module(const mha_module *mod, const cfg *c, const masks *m, const float *x,
                       const float *kv, double *out)
{
    int E = mod->embed_dim, H = mod->num_heads, D = E / H, B = c->B, Lq = c->Lq, Lk = c->Lk;
    int Lke = Lk + (mod->bias_k != NULL) + mod->add_zero_attn, b, i, j, e, h, f;
    double *Q = (double *)calloc((size_t)Lq * E, sizeof(double));
    double *K = (double *)calloc((size_t)Lke * E, sizeof(double));
    double *V = (double *)calloc((size_t)Lke * E, sizeof(double));
    double *C = (double *)calloc((size_t)Lq * E, sizeof(double));
    double *s = (double *)malloc((size_t)Lke * sizeof(double));
    const float *W = mod->in_proj_weight, *bi = mod->in_proj_bias;
    cfg ch = *c;
    for (b = 0; b < B; ++b) {
        const float *xb = x + (size_t)b * Lq * E, *kb = kv + (size_t)b * Lk * E;
        for (i = 0; i < Lq; ++i) for (e = 0; e < E; ++e) {
            double a = bi ? bi[e] : 0;
            for (f = 0; f < E; ++f) a += (double)xb[(size_t)i * E + f] * W[(size_t)e * E + f];
            Q[(size_t)i * E + e] = a;
        }
        for (j = 0; j < Lke; ++j) for (e = 0; e < E; ++e) {
            double ak = 0, av = 0;
            if (j < Lk) {
                ak = bi ? bi[E + e] : 0; av = bi ? bi[2 * E + e] : 0;
                for (f = 0; f < E; ++f) {
                    ak += (double)kb[(size_t)j * E + f] * W[(size_t)(E + e) * E + f];
                    av += (double)kb[(size_t)j * E + f] * W[(size_t)(2 * E + e) * E + f];
                }
            } else if (j == Lk && mod->bias_k) { ak = mod->bias_k[e]; av = mod->bias_v[e]; }
            K[(size_t)j * E + e] = ak; V[(size_t)j * E + e] = av;
        }
        for (h = 0; h < H; ++h) for (i = 0; i < Lq; ++i) {
            double mx = -INFINITY, sum = 0, add;
            for (j = 0; j < Lke; ++j) {
                int d;
                if (ref_blocked(&ch, m, b, h, i, j, &add) && j < Lk) { s[j] = -INFINITY; continue; }
                s[j] = add;
                for (d = 0; d < D; ++d) s[j] += Q[(size_t)i * E + h * D + d] * K[(size_t)j * E + h * D + d] / sqrt((double)D);
                if (s[j] > mx) mx = s[j];
            }
            for (j = 0; j < Lke; ++j) { s[j] = s[j] == -INFINITY ? 0 : exp(s[j] - mx); sum += s[j]; }
            for (e = 0; e < D; ++e) {
                double a = 0;
                for (j = 0; j < Lke; ++j) if (s[j] != 0) a += s[j] / sum * V[(size_t)j * E + h * D + e];
                C[(size_t)i * E + h * D + e] = sum > 0 ? a : 0;
            }
        }
        for (i = 0; i < Lq; ++i) for (e = 0; e < E; ++e) {
            double a = mod->out_proj_bias ? mod->out_proj_bias[e] : 0;
            for (f = 0; f < E; ++f) a += C[(size_t)i * E + f] * ((const float *)mod->out_proj_weight)[(size_t)e * E + f];
            out[((size_t)b * Lq + i) * E + e] = a;
        }
    }
    free(Q); free(K); free(V); free(C); free(s);
}

static void run_module_case(int B, int Lq, int Lk, int E, int H, int bias_kv, int zero_attn,
                            int causal, mha_causal_align align, mha_mask_kind kp, unsigned seed)
{
    tu_rng r;
    cfg c;
    masks m;
    mha_module mod;
    size_t nx = (size_t)B * Lq * E, nkv = (size_t)B * Lk * E, nw;
    int Lke = Lk + bias_kv + zero_attn;
    float *w_in = (float *)malloc((size_t)3 * E * E * sizeof(float)), *b_in = (float *)malloc(3 * E * sizeof(float));
    float *w_out = (float *)malloc((size_t)E * E * sizeof(float)), *b_out = (float *)malloc(E * sizeof(float));
    float *bk = (float *)malloc(E * sizeof(float)), *bv = (float *)malloc(E * sizeof(float));
    float *x = (float *)malloc(nx * sizeof(float)), *kv = (float *)malloc(nkv * sizeof(float));
    float *of = (float *)malloc(nx * sizeof(float)), *ou = (float *)malloc(nx * sizeof(float)), *w;
    double *ro = (double *)malloc(nx * sizeof(double));
    double e1, e2, e3;
    mha_run run;
    mha_error err;
    mha_status st;
    r.s = 0x243f6a8885a308d3ULL ^ (seed * 104729u + 3);
    tu_fill(&r, w_in, (size_t)3 * E * E, 0.4f); tu_fill(&r, b_in, 3 * E, 0.1f);
    tu_fill(&r, w_out, (size_t)E * E, 0.3f); tu_fill(&r, b_out, E, 0.1f);
    tu_fill(&r, bk, E, 1.0f); tu_fill(&r, bv, E, 1.0f);
    tu_fill(&r, x, nx, 1.0f); tu_fill(&r, kv, nkv, 1.0f);
    memset(&mod, 0, sizeof mod);
    mod.embed_dim = E; mod.num_heads = H; mod.in_proj_weight = w_in; mod.in_proj_bias = b_in;
    mod.out_proj_weight = w_out; mod.out_proj_bias = b_out;
    if (bias_kv) { mod.bias_k = bk; mod.bias_v = bv; }
    mod.add_zero_attn = zero_attn;
    memset(&c, 0, sizeof c);
    c.B = B; c.H = H; c.Lq = Lq; c.Lk = Lk; c.D = c.Dv = E / H;
    c.kp_kind = kp; c.causal = causal; c.align = align;
    make_masks(&c, &m, &r);
    nw = (size_t)B * Lq * Lke;
    w = (float *)malloc(nw * sizeof(float));
    ref_module(&mod, &c, &m, x, kv, ro);
    st = mha_module_forward(&mod, B, Lq, Lk, x, kv, kv, &m.opt, of, NULL, &err);
    CHECK(st == MHA_OK, "fused mha_module_forward: %s", err.message);
    memset(&run, 0, sizeof run);
    run.weights = w;
    st = mha_module_forward(&mod, B, Lq, Lk, x, kv, kv, &m.opt, ou, &run, &err);
    CHECK(st == MHA_OK, "unfused mha_module_forward: %s", err.message);
    e1 = tu_rel_err(of, ro, nx); e2 = tu_rel_err(ou, ro, nx); e3 = tu_rel_err_ff(of, ou, nx);
    if (e1 > worst_fused) worst_fused = e1;
    if (e3 > worst_pair) worst_pair = e3;
    CHECK(e1 <= TOL && e2 <= TOL && e3 <= TOL,
          "module B%d Lq%d Lk%d E%d H%d bias_kv%d zero%d causal%d/%d kp%d: fused %.3g unfused %.3g pair %.3g",
          B, Lq, Lk, E, H, bias_kv, zero_attn, causal, align, kp, e1, e2, e3);
    free_masks(&m);
    free(w_in); free(b_in); free(w_out); free(b_out); free(bk); free(bv);
    free(x); free(kv); free(of); free(ou); free(w); free(ro);
}

/* The online softmax's exp: 2e-7 relative where exp(x) is normal, exactly
   0 for blocked keys (-inf) and far below, NaN kept. */
static float exp_nonpos(float x)
{
    float o[MHA__VW];
    mha__vstore(o, mha__vexp_nonpos(mha__vset1(x)));
    return o[0];
}

static void check_exp_nonpos(void)
{
    double worst = 0;
    float x, o;
    int bad_zero = 0;
    for (x = MHA__EXP_LO; x <= 0.0f; x += 0.000377f) {
        double e = exp((double)x), r;
        o = exp_nonpos(x);
        r = fabs((double)o - e) / e;
        if (r > worst) worst = r;
    }
    o = exp_nonpos(0.0f);
    CHECK(o == 1.0f, "exp(0) = %.9g", o);
    o = exp_nonpos(-INFINITY); bad_zero |= o != 0.0f;
    o = exp_nonpos(-88.0f);    bad_zero |= o != 0.0f;
    o = exp_nonpos(-1e30f);    bad_zero |= o != 0.0f;
    CHECK(!bad_zero, "exp of -inf / far-negative is not exactly 0");
    o = exp_nonpos(NAN);
    CHECK(o != o, "exp(NaN) = %g", o);
    CHECK(worst <= 2e-7, "mha__vexp_nonpos relative error %.3g > 2e-7", worst);
}

int main(void)
{
    static const int sizes[] = {1, 3, 7, 17, 130, 300};
    static const mha_mask_kind kinds[] = {MHA_MASK_NONE, MHA_MASK_BOOL, MHA_MASK_BOOL_KEEP, MHA_MASK_FLOAT};
    int a, b, n = 0;
    cfg c;

    /* unused with MODULE_ONLY */
    (void)sizes; (void)kinds; (void)a; (void)b; (void)n; (void)c; (void)check_exp_nonpos; (void)run_sdpa_case;
#ifndef MODULE_ONLY
    check_exp_nonpos();

    /* every (Lq, Lk) pair; the mask setup rotates so each kind meets odd sizes */
    for (a = 0; a < 6; ++a)
        for (b = 0; b < 6; ++b) {
            memset(&c, 0, sizeof c);
            c.B = 2; c.H = 2; c.Lq = sizes[a]; c.Lk = sizes[b];
            c.D = (n % 3 == 0) ? 8 : (n % 3 == 1 ? 5 : 16); c.Dv = (n % 2) ? c.D : 7;
            c.am_kind = kinds[n % 4]; c.am_ndim = 2 + (n / 4) % 3;
            c.kp_kind = kinds[(n / 2) % 4];
            c.causal = (n % 5) < 3; c.align = (n % 5) == 1 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
            run_sdpa_case(&c, (unsigned)n++);
        }
    /* each mask kind and shape alone, causal alone in both alignments, at a
       size that spans several query and key tiles */
    for (a = 0; a < 4; ++a)
        for (b = 2; b <= 4; ++b) {
            memset(&c, 0, sizeof c);
            c.B = 2; c.H = 3; c.Lq = 130; c.Lk = 300; c.D = 16; c.Dv = 16;
            c.am_kind = kinds[a]; c.am_ndim = b;
            run_sdpa_case(&c, (unsigned)n++);
            if (a == 0) break;
        }
    for (a = 0; a < 4; ++a) {
        memset(&c, 0, sizeof c);
        c.B = 2; c.H = 2; c.Lq = 300; c.Lk = 130; c.D = 8; c.Dv = 8; c.kp_kind = kinds[a];
        run_sdpa_case(&c, (unsigned)n++);
    }
    for (a = 0; a < 2; ++a)
        for (b = 0; b < 3; ++b) {
            static const int lq[3] = {300, 130, 257}, lk[3] = {130, 300, 257};
            memset(&c, 0, sizeof c);
            c.B = 1; c.H = 2; c.Lq = lq[b]; c.Lk = lk[b]; c.D = 8; c.Dv = 8;
            c.causal = 1; c.align = a ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
            run_sdpa_case(&c, (unsigned)n++);
        }
    /* wide heads: D and Dv longer than a vector block and not multiples of
       any tile size, D != Dv */
    memset(&c, 0, sizeof c);
    c.B = 1; c.H = 2; c.Lq = 70; c.Lk = 150; c.D = 200; c.Dv = 131;
    c.kp_kind = MHA_MASK_BOOL; c.causal = 1; c.align = MHA_CAUSAL_BOTTOM_RIGHT;
    run_sdpa_case(&c, (unsigned)n++);
    /* NaN / Inf in every key and value row that no query may see */
    for (a = 0; a < 3; ++a) {
        memset(&c, 0, sizeof c);
        c.B = 2; c.H = 2; c.Lq = a == 0 ? 7 : 130; c.Lk = a == 2 ? 17 : 300; c.D = 8; c.Dv = 8;
        c.kp_kind = MHA_MASK_BOOL; c.am_kind = a == 1 ? MHA_MASK_FLOAT : MHA_MASK_NONE; c.am_ndim = 2;
        c.causal = a == 2; c.poison = 1;
        run_sdpa_case(&c, (unsigned)n++);
    }

#endif
    /* the module: appended keys are never masked and may follow a causal cut */
    run_module_case(2, 17, 130, 16, 4, 1, 0, 0, MHA_CAUSAL_TOP_LEFT, MHA_MASK_BOOL, 1);
    run_module_case(2, 130, 17, 16, 4, 0, 1, 1, MHA_CAUSAL_TOP_LEFT, MHA_MASK_NONE, 2);
    run_module_case(2, 130, 300, 24, 3, 1, 1, 1, MHA_CAUSAL_BOTTOM_RIGHT, MHA_MASK_FLOAT, 3);
    run_module_case(1, 300, 7, 8, 2, 1, 1, 1, MHA_CAUSAL_TOP_LEFT, MHA_MASK_BOOL_KEEP, 4);
    run_module_case(2, 1, 3, 8, 1, 0, 0, 0, MHA_CAUSAL_TOP_LEFT, MHA_MASK_NONE, 5);
    /* the fused forward takes the queries in chunks: several batches per
       chunk, and several chunks per batch */
    run_module_case(9, 130, 40, 8, 2, 0, 0, 1, MHA_CAUSAL_TOP_LEFT, MHA_MASK_BOOL, 6);
    run_module_case(2, 1100, 300, 8, 2, 1, 0, 1, MHA_CAUSAL_BOTTOM_RIGHT, MHA_MASK_BOOL, 7);

    printf("worst relative error: fused %.3g, unfused %.3g, fused vs unfused %.3g\n",
           worst_fused, worst_unfused, worst_pair);
    return tu_finish(TEST_NAME);
}
