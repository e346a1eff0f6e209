/* test_core.c - mha_module_forward and mha_sdpa_forward against a float64
   reference written plainly here, on many random shapes, masks and options,
   with and without the attention weights (run.weights) and with a caller's
   workspace; plus the documented edge behaviour (fully masked rows, NaN in
   masked keys, large logits). */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5

/* ------------------------------------------------------------------ reference */

/* Y[r, o] = sum_i X[r, i] W[o, i] + b[o] */
static void ref_linear(int rows, int in, int out, const double *X, const float *W,
                       const float *b, double *Y)
{
    int r, o, i;
    for (r = 0; r < rows; ++r)
        for (o = 0; o < out; ++o) {
            double acc = b ? b[o] : 0.0;
            for (i = 0; i < in; ++i) acc += X[(size_t)r * in + i] * (double)W[(size_t)o * in + i];
            Y[(size_t)r * out + o] = acc;
        }
}

static double *to_double(const float *x, size_t n)
{
    double *d = (double *)malloc(n * sizeof(double));
    size_t i;
    for (i = 0; i < n; ++i) d[i] = x[i];
    return d;
}

/* Is key j blocked for query i of (b, h), and what is added to its score? */
static int ref_blocked(const mha_options *o, int B, int H, int Lq, int Lk, int b, int h,
                       int i, int j, double *add)
{
    (void)B;
    *add = 0;
    if (j >= Lk) return 0;   /* appended bias/zero keys are never masked */
    if (o->attn_mask.kind != MHA_MASK_NONE) {
        size_t row = o->attn_mask.ndim == 2 ? (size_t)i : ((size_t)b * H + h) * Lq + i;
        size_t at = row * Lk + j;
        if (o->attn_mask.kind == MHA_MASK_FLOAT) {
            float f = ((const float *)o->attn_mask.data)[at];
            if (f == -INFINITY) return 1;
            *add += f;
        } else {
            unsigned char u = ((const unsigned char *)o->attn_mask.data)[at];
            if (o->attn_mask.kind == MHA_MASK_BOOL ? u != 0 : u == 0) return 1;
        }
    }
    if (o->key_padding_mask.kind != MHA_MASK_NONE) {
        size_t at = (size_t)b * Lk + j;
        if (o->key_padding_mask.kind == MHA_MASK_FLOAT) {
            float f = ((const float *)o->key_padding_mask.data)[at];
            if (f == -INFINITY) return 1;
            *add += f;
        } else {
            unsigned char u = ((const unsigned char *)o->key_padding_mask.data)[at];
            if (o->key_padding_mask.kind == MHA_MASK_BOOL ? u != 0 : u == 0) return 1;
        }
    }
    if (o->causal) {
        long off = o->causal_align == MHA_CAUSAL_BOTTOM_RIGHT ? (long)Lk - Lq : 0;
        if ((long)j > (long)i + off) return 1;
    }
    return 0;
}

/* Attention on [B,H,L,D] float64 tensors given by strides (like the library's
   view, written independently).  w: NULL or per-head [B,H,Lq,Lk_eff]. */
typedef struct { const double *p; size_t bs, hs, rs; } ref_view;

static void ref_attention(const mha_options *o, int B, int H, int Lq, int Lk, int Lk_eff,
                          int D, int Dv, ref_view q, ref_view k, ref_view v,
                          double *out, size_t o_bs, size_t o_hs, size_t o_rs, double *w)
{
    double scale = o->scale > 0 ? o->scale : 1.0 / sqrt((double)D);
    double *s = (double *)malloc((size_t)Lk_eff * sizeof(double));
    char *blk = (char *)malloc((size_t)Lk_eff);
    int b, h, i, j, d;
    for (b = 0; b < B; ++b)
        for (h = 0; h < H; ++h)
            for (i = 0; i < Lq; ++i) {
                const double *qi = q.p + b * q.bs + h * q.hs + i * q.rs;
                double m = -INFINITY, sum = 0;
                double *oi = out + b * o_bs + h * o_hs + i * o_rs;
                for (j = 0; j < Lk_eff; ++j) {
                    double add, acc = 0;
                    const double *kj = k.p + b * k.bs + h * k.hs + j * k.rs;
                    blk[j] = (char)ref_blocked(o, B, H, Lq, Lk, b, h, i, j, &add);
                    if (blk[j]) continue;
                    for (d = 0; d < D; ++d) acc += qi[d] * kj[d];
                    s[j] = acc * scale + add;
                    if (s[j] > m) m = s[j];
                }
                for (j = 0; j < Lk_eff; ++j) {
                    s[j] = blk[j] ? 0.0 : exp(s[j] - m);
                    sum += s[j];
                }
                for (d = 0; d < Dv; ++d) oi[d] = 0;
                for (j = 0; j < Lk_eff; ++j) {
                    double p = sum > 0 ? s[j] / sum : 0.0;  /* all blocked: zeros */
                    const double *vj = v.p + b * v.bs + h * v.hs + j * v.rs;
                    if (w) w[(((size_t)b * H + h) * Lq + i) * Lk_eff + j] = p;
                    if (p != 0) for (d = 0; d < Dv; ++d) oi[d] += p * vj[d];
                }
            }
    free(s);
    free(blk);
}

/* The whole nn.MultiheadAttention forward in float64.  w_head: [B,H,Lq,Lk'] */
static void ref_mha(const mha_module *m, int B, int Lq, int Lk, const float *query,
                    const float *key, const float *value, const mha_options *o,
                    double *out, double *w_head)
{
    int E = m->embed_dim, H = m->num_heads, D = E / H;
    int kdim = m->kdim ? m->kdim : E, vdim = m->vdim ? m->vdim : E;
    int extra = (m->bias_k != NULL) + m->add_zero_attn, Lk_eff = Lk + extra, b, r, c;
    const float *wq = m->in_proj_weight ? m->in_proj_weight : m->q_proj_weight;
    const float *wk = m->in_proj_weight ? (const float *)m->in_proj_weight + (size_t)E * E
                                        : (const float *)m->k_proj_weight;
    const float *wv = m->in_proj_weight ? (const float *)m->in_proj_weight + (size_t)2 * E * E
                                        : (const float *)m->v_proj_weight;
    const float *bq = m->in_proj_bias, *bk = bq ? bq + E : NULL, *bv = bq ? bq + 2 * E : NULL;
    double *xq = to_double(query, (size_t)B * Lq * E);
    double *xk = to_double(key, (size_t)B * Lk * kdim);
    double *xv = to_double(value, (size_t)B * Lk * vdim);
    double *Q = (double *)calloc((size_t)B * Lq * E, sizeof(double));
    double *K = (double *)calloc((size_t)B * Lk_eff * E, sizeof(double));
    double *V = (double *)calloc((size_t)B * Lk_eff * E, sizeof(double));
    double *ctx = (double *)calloc((size_t)B * Lq * E, sizeof(double));
    ref_view qv, kv, vv;

    ref_linear(B * Lq, E, E, xq, wq, bq, Q);
    for (b = 0; b < B; ++b) {
        double *Kb = K + (size_t)b * Lk_eff * E, *Vb = V + (size_t)b * Lk_eff * E;
        ref_linear(Lk, kdim, E, xk + (size_t)b * Lk * kdim, wk, bk, Kb);
        ref_linear(Lk, vdim, E, xv + (size_t)b * Lk * vdim, wv, bv, Vb);
        r = Lk;
        if (m->bias_k) {
            for (c = 0; c < E; ++c) { Kb[(size_t)r * E + c] = m->bias_k[c]; Vb[(size_t)r * E + c] = m->bias_v[c]; }
            ++r;
        }
        /* add_zero_attn: the calloc'ed row stays zero */
    }
    qv.p = Q; qv.bs = (size_t)Lq * E; qv.hs = D; qv.rs = E;
    kv.p = K; kv.bs = (size_t)Lk_eff * E; kv.hs = D; kv.rs = E;
    vv.p = V; vv.bs = (size_t)Lk_eff * E; vv.hs = D; vv.rs = E;
    ref_attention(o, B, H, Lq, Lk, Lk_eff, D, D, qv, kv, vv, ctx, (size_t)Lq * E, D, E, w_head);
    ref_linear(B * Lq, E, E, ctx, m->out_proj_weight, m->out_proj_bias, out);
    free(xq); free(xk); free(xv); free(Q); free(K); free(V); free(ctx);
}

/* --------------------------------------------------------------- random cases */

typedef struct {
    float *w_in, *b_in, *wq, *wk, *wv, *w_out, *b_out, *bias_k, *bias_v;
    float *query, *key, *value;
    void *am, *kpm;   /* mask data: unsigned char[] or float[] by kind */
} case_bufs;

static float *alloc_fill(tu_rng *r, size_t n, float amp)
{
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    tu_fill(r, p, n, amp);
    return p;
}

static void free_bufs(case_bufs *c)
{
    free(c->w_in); free(c->b_in); free(c->wq); free(c->wk); free(c->wv); free(c->w_out);
    free(c->b_out); free(c->bias_k); free(c->bias_v); free(c->query); free(c->key); free(c->value);
    free(c->am); free(c->kpm);
    memset(c, 0, sizeof *c);
}

/* Fill a mask with some blocked entries; 'keep' flips the meaning. */
static void fill_bool_mask(tu_rng *r, unsigned char *m, size_t n, int keep, int density_pct)
{
    size_t i;
    for (i = 0; i < n; ++i) {
        int blocked = (int)(tu_next(r) % 100) < density_pct;
        m[i] = (unsigned char)(keep ? !blocked : blocked);
    }
}
static void fill_float_mask(tu_rng *r, float *m, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) {
        unsigned v = tu_next(r) % 10;
        m[i] = v == 0 ? -INFINITY : tu_uniform(r) * 2.0f;
    }
}

/* n mask entries of the given kind (bool: density_pct % blocked), malloc'ed */
static void *random_mask(tu_rng *r, int kind, size_t n, int density_pct)
{
    if (kind == MHA_MASK_FLOAT) {
        float *f = (float *)malloc(n * sizeof(float));
        fill_float_mask(r, f, n);
        return f;
    } else {
        unsigned char *u = (unsigned char *)malloc(n);
        fill_bool_mask(r, u, n, kind == MHA_MASK_BOOL_KEEP, density_pct);
        return u;
    }
}

static double worst_out, worst_w;

/* One random module case; returns nothing, CHECKs inside. */
static void run_case(tu_rng *r, int B, int Lq, int Lk, int E, int H, int kdim, int vdim,
                     int bias, int bias_kv, int zero_attn, int am_kind, int am_ndim,
                     int kpm_kind, int causal, int align, int per_head, int use_ws, float amp)
{
    case_bufs c;
    mha_module m;
    mha_options o;
    int kd = kdim ? kdim : E, vd = vdim ? vdim : E, Lk_eff = Lk + bias_kv + zero_attn;
    size_t nout = (size_t)B * Lq * E, nw_head = (size_t)B * H * Lq * Lk_eff;
    size_t nw = per_head ? nw_head : (size_t)B * Lq * Lk_eff, i;
    float *out = (float *)malloc(nout * sizeof(float)), *w = (float *)malloc(nw * sizeof(float));
    float *out2 = (float *)malloc(nout * sizeof(float));
    double *rout = (double *)malloc(nout * sizeof(double)), *rw = (double *)malloc(nw_head * sizeof(double));
    double *rw_use = rw;
    mha_run run;
    mha_error err;
    mha_status st;
    double e_out, e_w, e_out2;

    memset(&c, 0, sizeof c);
    memset(&m, 0, sizeof m);
    memset(&o, 0, sizeof o);
    m.embed_dim = E; m.num_heads = H; m.kdim = kdim; m.vdim = vdim; m.add_zero_attn = zero_attn;
    if (kd == E && vd == E && (tu_next(r) & 1)) {
        c.w_in = alloc_fill(r, (size_t)3 * E * E, 0.5f);
        m.in_proj_weight = c.w_in;
    } else {
        c.wq = alloc_fill(r, (size_t)E * E, 0.5f);
        c.wk = alloc_fill(r, (size_t)E * kd, 0.5f);
        c.wv = alloc_fill(r, (size_t)E * vd, 0.5f);
        m.q_proj_weight = c.wq; m.k_proj_weight = c.wk; m.v_proj_weight = c.wv;
    }
    c.w_out = alloc_fill(r, (size_t)E * E, 0.5f);
    m.out_proj_weight = c.w_out;
    if (bias) {
        c.b_in = alloc_fill(r, (size_t)3 * E, 0.3f);
        c.b_out = alloc_fill(r, (size_t)E, 0.3f);
        m.in_proj_bias = c.b_in; m.out_proj_bias = c.b_out;
    }
    if (bias_kv) {
        c.bias_k = alloc_fill(r, (size_t)E, 0.5f);
        c.bias_v = alloc_fill(r, (size_t)E, 0.5f);
        m.bias_k = c.bias_k; m.bias_v = c.bias_v;
    }
    c.query = alloc_fill(r, (size_t)B * Lq * E, amp);
    c.key = alloc_fill(r, (size_t)B * Lk * kd, amp);
    c.value = alloc_fill(r, (size_t)B * Lk * vd, amp);

    if (am_kind != MHA_MASK_NONE) {
        size_t n = (size_t)Lq * Lk * (am_ndim == 2 ? 1 : (size_t)B * H);
        o.attn_mask.kind = (mha_mask_kind)am_kind;
        o.attn_mask.ndim = am_ndim;
        if (am_ndim == 2) { o.attn_mask.shape[0] = Lq; o.attn_mask.shape[1] = Lk; }
        else if (am_ndim == 3) { o.attn_mask.shape[0] = B * H; o.attn_mask.shape[1] = Lq; o.attn_mask.shape[2] = Lk; }
        else { o.attn_mask.shape[0] = B; o.attn_mask.shape[1] = H; o.attn_mask.shape[2] = Lq; o.attn_mask.shape[3] = Lk; }
        o.attn_mask.data = c.am = random_mask(r, am_kind, n, 25);
    }
    if (kpm_kind != MHA_MASK_NONE) {
        size_t n = (size_t)B * Lk;
        o.key_padding_mask.kind = (mha_mask_kind)kpm_kind;
        o.key_padding_mask.ndim = 2;
        o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = Lk;
        o.key_padding_mask.data = c.kpm = random_mask(r, kpm_kind, n, 20);
    }
    o.causal = causal;
    o.causal_align = (mha_causal_align)align;
    o.per_head_weights = per_head;

    memset(&run, 0, sizeof run);
    run.weights = w;
    if (use_ws) {
        mha_sizes sz;
        st = mha_module_plan_size(&m, B, Lq, Lk, &o, MHA_PLAN_WEIGHTS, &sz, &err);
        CHECK(st == MHA_OK, "mha_module_plan_size: %s", err.message);
        run.workspace = malloc(st == MHA_OK ? sz.workspace : 1);
        run.workspace_bytes = st == MHA_OK ? sz.workspace : 0;
    }
    st = mha_module_forward(&m, B, Lq, Lk, c.query, c.key, c.value, &o, out, &run, &err);
    CHECK(st == MHA_OK, "mha_module_forward: %s", err.message);

    ref_mha(&m, B, Lq, Lk, c.query, c.key, c.value, &o, rout, rw);
    if (!per_head) {
        /* the head average, summed in float64 */
        size_t n = (size_t)Lq * Lk_eff;
        int b, h;
        rw_use = (double *)calloc((size_t)B * n, sizeof(double));
        for (b = 0; b < B; ++b)
            for (h = 0; h < H; ++h)
                for (i = 0; i < n; ++i) rw_use[b * n + i] += rw[((size_t)b * H + h) * n + i] / H;
    }
    e_out = tu_rel_err(out, rout, nout);
    e_w = tu_rel_err(w, rw_use, nw);
    if (e_out > worst_out) worst_out = e_out;
    if (e_w > worst_w) worst_w = e_w;
    CHECK(e_out <= TOL && e_w <= TOL,
          "B=%d Lq=%d Lk=%d E=%d H=%d kdim=%d vdim=%d bias=%d bkv=%d zero=%d am=%d/%d kpm=%d causal=%d/%d "
          "per_head=%d: rel err out %.3g weights %.3g", B, Lq, Lk, E, H, kdim, vdim, bias, bias_kv,
          zero_attn, am_kind, am_ndim, kpm_kind, causal, align, per_head, e_out, e_w);

    /* without weights (the fused path) the output is the same */
    st = mha_module_forward(&m, B, Lq, Lk, c.query, c.key, c.value, &o, out2, NULL, &err);
    e_out2 = tu_rel_err(out2, rout, nout);
    if (e_out2 > worst_out) worst_out = e_out2;
    CHECK(st == MHA_OK && e_out2 <= TOL, "no-weights path: %s rel err %.3g", st ? err.message : "ok", e_out2);

    if (rw_use != rw) free(rw_use);
    free(run.workspace); free(out); free(out2); free(w); free(rout); free(rw);
    free_bufs(&c);
}

static int pick(tu_rng *r, const int *v, int n) { return v[tu_next(r) % (unsigned)n]; }

static void test_random_modules(void)
{
    static const int Ls[] = {1, 3, 7, 17, 130, 5, 64};
    static const int EH[][2] = {{4, 1}, {6, 3}, {12, 12}, {24, 12}, {20, 4}, {36, 12}, {30, 5}, {16, 2}, {64, 8}};
    static const int kinds[] = {MHA_MASK_NONE, MHA_MASK_BOOL, MHA_MASK_BOOL_KEEP, MHA_MASK_FLOAT};
    tu_rng r = {0x9E3779B97F4A7C15ULL};
    int t;
    for (t = 0; t < 160; ++t) {
        int eh = (int)(tu_next(&r) % (sizeof EH / sizeof EH[0]));
        int E = EH[eh][0], H = EH[eh][1];
        int B = 1 + (int)(tu_next(&r) % 3);
        int Lq = pick(&r, Ls, 7);
        int Lk = (tu_next(&r) & 1) ? Lq : pick(&r, Ls, 7);   /* self- or cross-attention */
        int kdim = 0, vdim = 0, am_kind = pick(&r, kinds, 4), am_ndim = 2 + (int)(tu_next(&r) % 3);
        int kpm_kind = pick(&r, kinds, 4);
        int causal = (tu_next(&r) % 3) == 0, align = (int)(tu_next(&r) & 1);
        int bias, bias_kv, zero_attn, per_head, use_ws;
        if (Lq == 130 && Lk == 130) B = 1;   /* keep the run short under qemu/ASan */
        if (tu_next(&r) % 4 == 0) { kdim = E + 3; vdim = E + 5 + (int)(tu_next(&r) % 7); }
        /* one draw per statement: argument evaluation order is unspecified in C */
        bias = tu_next(&r) % 4 != 0;
        bias_kv = tu_next(&r) % 4 == 0;
        zero_attn = tu_next(&r) % 4 == 0;
        per_head = (int)(tu_next(&r) & 1);
        use_ws = (int)(tu_next(&r) & 1);
        run_case(&r, B, Lq, Lk, E, H, kdim, vdim, bias, bias_kv, zero_attn, am_kind, am_ndim,
                 kpm_kind, causal, align, per_head, use_ws, 1.0f);
    }
    /* large logits: inputs x30 keep everything finite (softmax subtracts the max) */
    run_case(&r, 2, 17, 17, 24, 3, 0, 0, 1, 0, 0, 0, 2, 0, 1, 0, 1, 0, 30.0f);
    run_case(&r, 1, 7, 130, 12, 12, 0, 0, 1, 1, 1, MHA_MASK_FLOAT, 3, MHA_MASK_BOOL, 1, 1, 0, 1, 30.0f);
}

/* SDPA on dense [B,H,L,D] tensors, including Dv != D and a custom scale */
static void test_random_sdpa(void)
{
    static const int Ls[] = {1, 3, 7, 17, 130, 33};
    static const int kinds[] = {MHA_MASK_NONE, MHA_MASK_BOOL, MHA_MASK_BOOL_KEEP, MHA_MASK_FLOAT};
    tu_rng r = {12345};
    int t;
    for (t = 0; t < 60; ++t) {
        int B = 1 + (int)(tu_next(&r) % 2), H = 1 + (int)(tu_next(&r) % 4);
        int Lq = pick(&r, Ls, 6), Lk = pick(&r, Ls, 6);
        int D = 1 + (int)(tu_next(&r) % 40), Dv = (tu_next(&r) & 1) ? D : 1 + (int)(tu_next(&r) % 40);
        size_t nq = (size_t)B * H * Lq * D, nk = (size_t)B * H * Lk * D, nv = (size_t)B * H * Lk * Dv;
        size_t no = (size_t)B * H * Lq * Dv, nw = (size_t)B * H * Lq * Lk, nm = 0;
        float *q = alloc_fill(&r, nq, 1), *k = alloc_fill(&r, nk, 1), *v = alloc_fill(&r, nv, 1);
        float *o = (float *)malloc(no * sizeof(float)), *w = (float *)malloc(nw * sizeof(float));
        double *dq = to_double(q, nq), *dk = to_double(k, nk), *dv = to_double(v, nv);
        double *ro = (double *)malloc(no * sizeof(double)), *rw = (double *)malloc(nw * sizeof(double));
        void *mask = NULL;
        mha_options opt;
        ref_view qv, kv, vv;
        mha_run run;
        mha_error err;
        mha_status st;
        double eo, ew;
        memset(&opt, 0, sizeof opt);
        opt.attn_mask.kind = (mha_mask_kind)pick(&r, kinds, 4);
        if (opt.attn_mask.kind != MHA_MASK_NONE) {
            int four = (int)(tu_next(&r) & 1);
            nm = four ? nw : (size_t)Lq * Lk;
            opt.attn_mask.ndim = four ? 4 : 2;
            if (four) { opt.attn_mask.shape[0] = B; opt.attn_mask.shape[1] = H; opt.attn_mask.shape[2] = Lq; opt.attn_mask.shape[3] = Lk; }
            else { opt.attn_mask.shape[0] = Lq; opt.attn_mask.shape[1] = Lk; }
            opt.attn_mask.data = mask = random_mask(&r, opt.attn_mask.kind, nm, 30);
        }
        opt.causal = (tu_next(&r) % 3) == 0;
        opt.causal_align = (mha_causal_align)(tu_next(&r) & 1);
        if (tu_next(&r) & 1) opt.scale = 0.05f + 0.3f * (tu_uniform(&r) + 1.0f);
        memset(&run, 0, sizeof run);
        run.weights = w;
        st = mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, k, v, &opt, o, &run, &err);
        CHECK(st == MHA_OK, "mha_sdpa_forward: %s", err.message);
        qv.p = dq; qv.rs = D; qv.hs = (size_t)Lq * D; qv.bs = (size_t)H * Lq * D;
        kv.p = dk; kv.rs = D; kv.hs = (size_t)Lk * D; kv.bs = (size_t)H * Lk * D;
        vv.p = dv; vv.rs = Dv; vv.hs = (size_t)Lk * Dv; vv.bs = (size_t)H * Lk * Dv;
        ref_attention(&opt, B, H, Lq, Lk, Lk, D, Dv, qv, kv, vv, ro, (size_t)H * Lq * Dv,
                      (size_t)Lq * Dv, Dv, rw);
        eo = tu_rel_err(o, ro, no);
        ew = tu_rel_err(w, rw, nw);
        if (eo > worst_out) worst_out = eo;
        if (ew > worst_w) worst_w = ew;
        CHECK(eo <= TOL && ew <= TOL, "sdpa B=%d H=%d Lq=%d Lk=%d D=%d Dv=%d mask=%d causal=%d: %.3g %.3g",
              B, H, Lq, Lk, D, Dv, (int)opt.attn_mask.kind, opt.causal, eo, ew);
        /* and without weights */
        st = mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, k, v, &opt, o, NULL, &err);
        eo = tu_rel_err(o, ro, no);
        CHECK(st == MHA_OK && eo <= TOL, "sdpa without weights: %s %.3g", st ? err.message : "ok", eo);
        free(q); free(k); free(v); free(o); free(w); free(dq); free(dk); free(dv);
        free(ro); free(rw); free(mask);
    }
}

/* ------------------------------------------------------- documented edge cases */

/* A single-head module with identity projections, so the edge cases can be
   stated directly on Q = K = V = x. */
typedef struct { float w_in[3 * 4 * 4], w_out[16], b_in[12], b_out[4]; mha_module m; } ident4;
static void ident4_init(ident4 *t)
{
    int i;
    memset(t, 0, sizeof *t);
    for (i = 0; i < 4; ++i) {
        t->w_in[i * 4 + i] = t->w_in[16 + i * 4 + i] = t->w_in[32 + i * 4 + i] = 1.0f;
        t->w_out[i * 4 + i] = 1.0f;
        t->b_out[i] = 0.5f + (float)i;
    }
    t->m.embed_dim = 4; t->m.num_heads = 1;
    t->m.in_proj_weight = t->w_in; t->m.in_proj_bias = t->b_in;
    t->m.out_proj_weight = t->w_out; t->m.out_proj_bias = t->b_out;
}

/* mha_module_forward with the weights (w, may be NULL) in a run; a refusal is printed */
static mha_status fwd(const mha_module *m, int B, int Lq, int Lk, const float *q, const float *k,
                      const float *v, const mha_options *o, float *out, float *w)
{
    mha_run run;
    mha_error err;
    mha_status st;
    memset(&run, 0, sizeof run);
    run.weights = w;
    st = mha_module_forward(m, B, Lq, Lk, q, k, v, o, out, &run, &err);
    if (st != MHA_OK) printf("mha_module_forward: %s\n", err.message);
    return st;
}

static int all_finite(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (!isfinite(x[i])) return 0;
    return 1;
}

static void test_fully_masked_rows(void)
{
    /* query 1 has every key blocked by attn_mask; batch 1 is fully padded */
    ident4 t;
    float x[2 * 3 * 4], out[2 * 3 * 4], w[2 * 3 * 3];
    unsigned char am[3 * 3] = {0, 0, 0, 1, 1, 1, 0, 1, 0};
    unsigned char kpm[2 * 3] = {0, 0, 0, 1, 1, 1};
    mha_options o;
    tu_rng r = {77};
    int i, ok_row = 1, ok_pad = 1;
    ident4_init(&t);
    tu_fill(&r, x, 24, 1.0f);
    memset(&o, 0, sizeof o);
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = am; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = 3; o.attn_mask.shape[1] = 3;
    o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = kpm; o.key_padding_mask.ndim = 2;
    o.key_padding_mask.shape[0] = 2; o.key_padding_mask.shape[1] = 3;
    CHECK(fwd(&t.m, 2, 3, 3, x, x, x, &o, out, w) == MHA_OK, "forward");
    CHECK(all_finite(out, 24) && all_finite(w, 18), "no NaN from fully masked rows");
    for (i = 0; i < 4; ++i) ok_row &= out[1 * 4 + i] == t.b_out[i];
    for (i = 0; i < 3; ++i) ok_row &= w[3 + i] == 0.0f;
    CHECK(ok_row, "a fully masked query row gives zero weights and out = out_proj.bias");
    for (i = 0; i < 12; ++i) ok_pad &= out[12 + i] == t.b_out[i % 4];
    for (i = 0; i < 9; ++i) ok_pad &= w[9 + i] == 0.0f;
    CHECK(ok_pad, "a fully padded batch element gives out = out_proj.bias everywhere");
    /* the same through the path without weights */
    memset(out, 0, sizeof out);
    CHECK(fwd(&t.m, 2, 3, 3, x, x, x, &o, out, NULL) == MHA_OK && out[4] == t.b_out[0] &&
          out[12] == t.b_out[0], "fully masked rows without weights");
    /* float mask of all -inf rows */
    {
        float fm[9];
        for (i = 0; i < 9; ++i) fm[i] = (i / 3 == 2) ? -INFINITY : 0.0f;
        memset(&o, 0, sizeof o);
        o.attn_mask.kind = MHA_MASK_FLOAT; o.attn_mask.data = fm; o.attn_mask.ndim = 2;
        o.attn_mask.shape[0] = 3; o.attn_mask.shape[1] = 3;
        CHECK(fwd(&t.m, 1, 3, 3, x, x, x, &o, out, w) == MHA_OK &&
              w[6] == 0 && w[7] == 0 && w[8] == 0 && out[8] == t.b_out[0] && all_finite(out, 12),
              "float mask row of -inf gives zero weights");
    }
}

static void test_nan_in_masked_key(void)
{
    /* key 2 holds NaN (and Inf) in batch 0 and is padded out: it must not leak */
    ident4 t;
    float x[3 * 4], kv[3 * 4], out[3 * 4], out_ref[3 * 4], out_ref_w[3 * 4], w[9];
    unsigned char kpm[3] = {0, 0, 1};
    mha_options o;
    tu_rng r = {99};
    ident4_init(&t);
    tu_fill(&r, x, 12, 1.0f);
    memcpy(kv, x, sizeof kv);
    memset(&o, 0, sizeof o);
    o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = kpm; o.key_padding_mask.ndim = 2;
    o.key_padding_mask.shape[0] = 1; o.key_padding_mask.shape[1] = 3;
    /* clean runs of both paths (with and without weights).  With a non-finite
       value row a path may switch to summing only nonzero weights, which rounds
       differently from the GEMM, so "no leak" means finite and within 1e-6. */
    CHECK(fwd(&t.m, 1, 3, 3, x, kv, kv, &o, out_ref, NULL) == MHA_OK, "clean");
    CHECK(fwd(&t.m, 1, 3, 3, x, kv, kv, &o, out_ref_w, w) == MHA_OK, "clean, weights");
    kv[8] = NAN; kv[9] = INFINITY; kv[11] = -INFINITY;
    CHECK(fwd(&t.m, 1, 3, 3, x, kv, kv, &o, out, w) == MHA_OK, "nan key");
    CHECK(all_finite(out, 12) && tu_rel_err_ff(out, out_ref_w, 12) <= 1e-6,
          "NaN/Inf in a masked key and value do not leak (weights path)");
    CHECK(w[2] == 0 && w[5] == 0 && w[8] == 0, "masked key has weight 0");
    CHECK(fwd(&t.m, 1, 3, 3, x, kv, kv, &o, out, NULL) == MHA_OK &&
          all_finite(out, 12) && tu_rel_err_ff(out, out_ref, 12) <= 1e-6,
          "NaN/Inf in a masked key and value do not leak (no-weights path)");
    /* the documented other half: NaN in an unmasked key reaches the rows that see it */
    kpm[2] = 0;
    CHECK(fwd(&t.m, 1, 3, 3, x, kv, kv, &o, out, NULL) == MHA_OK && isnan(out[0]),
          "NaN in an unmasked key propagates to the output (documented)");
    /* causal: query 0 never sees key 2 even when key 2 is NaN */
    memset(&o, 0, sizeof o);
    o.causal = 1;
    CHECK(fwd(&t.m, 1, 3, 3, x, kv, kv, &o, out, w) == MHA_OK &&
          all_finite(out, 8) && isnan(out[8]), "causal: rows 0,1 finite, row 2 sees the NaN");
}

static void test_causal_alignment(void)
{
    /* Lq = 2, Lk = 4: top-left lets query 0 see key 0; bottom-right keys 0..2 */
    ident4 t;
    float q[2 * 4], kv[4 * 4], out[2 * 4], w[2 * 4];
    mha_options o;
    tu_rng r = {5};
    ident4_init(&t);
    tu_fill(&r, q, 8, 1.0f);
    tu_fill(&r, kv, 16, 1.0f);
    memset(&o, 0, sizeof o);
    o.causal = 1;
    CHECK(fwd(&t.m, 1, 2, 4, q, kv, kv, &o, out, w) == MHA_OK &&
          w[0] == 1.0f && w[1] == 0 && w[2] == 0 && w[3] == 0 && w[4] > 0 && w[5] > 0 && w[6] == 0 && w[7] == 0,
          "top-left causal alignment");
    o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    CHECK(fwd(&t.m, 1, 2, 4, q, kv, kv, &o, out, w) == MHA_OK &&
          w[0] > 0 && w[2] > 0 && w[3] == 0 && w[7] > 0,
          "bottom-right causal alignment");
    /* Lq > Lk, bottom-right: the first query rows see no key at all -> zero rows */
    o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    {
        float q4[4 * 4], w2[4 * 2], o4[4 * 4];
        tu_fill(&r, q4, 16, 1.0f);
        CHECK(fwd(&t.m, 1, 4, 2, q4, kv, kv, &o, o4, w2) == MHA_OK &&
              w2[0] == 0 && w2[1] == 0 && w2[2] == 0 && w2[3] == 0 && w2[4] == 1.0f && o4[0] == t.b_out[0],
              "bottom-right with Lq > Lk: leading queries are fully masked");
    }
}

int main(void)
{
    test_random_modules();
    test_random_sdpa();
    test_fully_masked_rows();
    test_nan_in_masked_key();
    test_causal_alignment();
    printf("worst rel err vs float64 reference: out %.3g, weights %.3g\n", worst_out, worst_w);
    return tu_finish("core");
}
