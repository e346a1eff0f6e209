/* Decoder attention in the SDPA (mha_sdpa_forward / mha_sdpa_backward):
   grouped-query attention, sliding window, soft-capping, sinks, ALiBi, the
   log-sum-exp output (run.lse) and mha_attn_merge, forward (fused and
   unfused paths) and backward (run.sinks_grad), against a float64
   reference written out below, against PyTorch (tests/golden/decode.bin,
   tests/gen_golden_decode.py), and through the properties of issue 9:
   Hkv = H is MHA, GQA equals MHA on repeated K/V, a window >= L is no
   window, merged key ranges equal one pass.  Gradients are checked against
   central differences of the float64 reference.  Refusals name the option
   (err.field).  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "golden.h"

#include <stdlib.h>
#include <string.h>

#define TOL 1e-5
#define TOL_GRAD 1e-4

static double worst_fwd, worst_lse, worst_w, worst_grad, worst_gold, worst_gold_grad;

/* one attention problem: shapes and the decoder options */
typedef struct cfg {
    int B, H, Hkv, Lq, Lk, D, Dv;
    int causal, bottom_right;
    int window, left, right;
    float softcap;
    int alibi, own_slopes;     /* own_slopes: caller slopes instead of the paper's */
    int sinks;
    int kpm;                   /* a float key padding mask with some -inf */
    float scale;
} cfg;

typedef struct prob {
    cfg c;
    float *q, *k, *v, *slopes, *sinks, *kpm;
} prob;

/* One SDPA forward through the one-shot call: out, and the weights and the
   lse when they are given (NULL: not wanted).  The error, when there is
   one, is in *err (its message goes into the failure lines). */
static mha_status sdpa_fwd(int B, int H, int Lq, int Lk, int D, int Dv, const float *q, const float *k,
                           const float *v, const mha_options *o, float *out, float *w, float *lse,
                           mha_error *err)
{
    mha_run run;
    memset(&run, 0, sizeof run);
    run.weights = w;
    run.lse = lse;
    err->message[0] = 0;
    return mha_sdpa_forward(B, H, Lq, Lk, D, Dv, q, k, v, o, out, &run, err);
}
/* One SDPA backward; sinks_grad (may be NULL) gets dLoss/dsinks added. */
static mha_status sdpa_bwd(int B, int H, int Lq, int Lk, int D, int Dv, const float *q, const float *k,
                           const float *v, const float *dout, const mha_options *o, float *dq, float *dk,
                           float *dv, float *sinks_grad, mha_error *err)
{
    mha_run run;
    memset(&run, 0, sizeof run);
    run.sinks_grad = o && o->sinks ? sinks_grad : NULL;   /* asked for only where there are sinks */
    err->message[0] = 0;
    return mha_sdpa_backward(B, H, Lq, Lk, D, Dv, q, k, v, dout, o, dq, dk, dv, &run, err);
}

static void prob_make(prob *p, const cfg *c, unsigned long long seed)
{
    tu_rng r = { seed };
    size_t nq = (size_t)c->B * c->H * c->Lq * c->D, nk = (size_t)c->B * c->Hkv * c->Lk * c->D;
    size_t nv = (size_t)c->B * c->Hkv * c->Lk * c->Dv;
    int h, j;
    p->c = *c;
    p->q = malloc(nq * sizeof(float)); p->k = malloc(nk * sizeof(float)); p->v = malloc(nv * sizeof(float));
    p->slopes = malloc((size_t)c->H * sizeof(float)); p->sinks = malloc((size_t)c->H * sizeof(float));
    p->kpm = malloc((size_t)c->B * c->Lk * sizeof(float));
    tu_fill(&r, p->q, nq, 1.5f); tu_fill(&r, p->k, nk, 1.5f); tu_fill(&r, p->v, nv, 1.0f);
    for (h = 0; h < c->H; ++h) { p->slopes[h] = 0.05f + 0.3f * (tu_uniform(&r) + 1.0f); p->sinks[h] = 1.5f * tu_uniform(&r); }
    for (j = 0; j < c->B * c->Lk; ++j) p->kpm[j] = (tu_next(&r) % 7 == 0) ? -INFINITY : 0.5f * tu_uniform(&r);
    for (j = 0; j < c->B; ++j) p->kpm[(size_t)j * c->Lk] = 0.25f;   /* key 0 always allowed */
}
static void prob_free(prob *p)
{
    free(p->q); free(p->k); free(p->v); free(p->slopes); free(p->sinks); free(p->kpm);
}

static mha_options prob_opt(const prob *p)
{
    mha_options o;
    memset(&o, 0, sizeof o);
    o.causal = p->c.causal;
    o.causal_align = p->c.bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    o.scale = p->c.scale;
    o.num_kv_heads = p->c.Hkv == p->c.H ? 0 : p->c.Hkv;
    o.window = p->c.window; o.window_left = p->c.left; o.window_right = p->c.right;
    o.softcap = p->c.softcap;
    o.alibi = p->c.alibi; o.alibi_slopes = p->c.own_slopes ? p->slopes : NULL;
    o.sinks = p->c.sinks ? p->sinks : NULL;
    if (p->c.kpm) {
        o.key_padding_mask.kind = MHA_MASK_FLOAT; o.key_padding_mask.data = p->kpm;
        o.key_padding_mask.ndim = 2; o.key_padding_mask.shape[0] = p->c.B; o.key_padding_mask.shape[1] = p->c.Lk;
    }
    return o;
}

/* The paper's slopes, as its reference code builds them: for n a power of
   two, start = 2^(-8/n) and slope_h = start^(h+1); otherwise the slopes of
   the largest power of two below n, then every other slope of twice that. */
static void paper_slopes(int n, double *s)
{
    int p2 = 1, h;
    while (p2 * 2 <= n) p2 *= 2;
    for (h = 0; h < p2; ++h) s[h] = pow(pow(2.0, -8.0 / p2), h + 1);
    for (h = p2; h < n; ++h) s[h] = pow(pow(2.0, -8.0 / (2 * p2)), 2 * (h - p2) + 1);
}

/* The float64 reference: every score, plainly.  out [B,H,Lq,Dv], lse
   [B,H,Lq], w [B,H,Lq,Lk] (any may be NULL).  q, k, v may be perturbed
   copies (double) for the finite differences; sink: per-head values. */
static void ref_sdpa(const cfg *c, const double *q, const double *k, const double *v,
                     const double *sinks, const float *slopes_in, const float *kpm,
                     double *out, double *lse, double *w)
{
    int b, h, i, j, d, G = c->H / c->Hkv;
    long off = c->bottom_right ? (long)c->Lk - c->Lq : 0;
    double scale = c->scale > 0 ? c->scale : 1.0 / sqrt((double)c->D);
    double *s = malloc((size_t)c->Lk * sizeof(double)), *slopes = malloc((size_t)c->H * sizeof(double));
    if (c->own_slopes) for (h = 0; h < c->H; ++h) slopes[h] = slopes_in[h];
    else paper_slopes(c->H, slopes);
    for (b = 0; b < c->B; ++b)
        for (h = 0; h < c->H; ++h) {
            int kh = h / G;   /* repeat_interleave: query head h reads KV head h / G */
            const double *kb = k + ((size_t)b * c->Hkv + kh) * c->Lk * c->D;
            const double *vb = v + ((size_t)b * c->Hkv + kh) * c->Lk * c->Dv;
            for (i = 0; i < c->Lq; ++i) {
                const double *qi = q + (((size_t)b * c->H + h) * c->Lq + i) * c->D;
                size_t row = ((size_t)b * c->H + h) * c->Lq + i;
                long ip = i + off;
                double m = c->sinks ? sinks[h] : -INFINITY, sum = 0;
                for (j = 0; j < c->Lk; ++j) {
                    double x = 0;
                    int ok = 1;
                    for (d = 0; d < c->D; ++d) x += qi[d] * kb[(size_t)j * c->D + d];
                    x *= scale;
                    if (c->softcap > 0) x = c->softcap * tanh(x / c->softcap);
                    if (c->alibi) x += slopes[h] * (double)(j - ip);
                    if (c->kpm) x = kpm[(size_t)b * c->Lk + j] == -INFINITY ? -INFINITY : x + kpm[(size_t)b * c->Lk + j];
                    if (c->causal && j > ip) ok = 0;
                    if (c->window && c->left >= 0 && j < ip - c->left) ok = 0;
                    if (c->window && c->right >= 0 && j > ip + c->right) ok = 0;
                    s[j] = ok ? x : -INFINITY;
                    if (s[j] > m) m = s[j];
                }
                if (m == -INFINITY) {   /* nothing allowed, no sink: zeros */
                    if (out) for (d = 0; d < c->Dv; ++d) out[row * c->Dv + d] = 0;
                    if (lse) lse[row] = -INFINITY;
                    if (w) for (j = 0; j < c->Lk; ++j) w[row * c->Lk + j] = 0;
                    continue;
                }
                for (j = 0; j < c->Lk; ++j) sum += exp(s[j] - m);
                if (c->sinks) sum += exp(sinks[h] - m);
                if (lse) lse[row] = m + log(sum);
                if (out) for (d = 0; d < c->Dv; ++d) out[row * c->Dv + d] = 0;
                for (j = 0; j < c->Lk; ++j) {
                    double pj = exp(s[j] - m) / sum;
                    if (w) w[row * c->Lk + j] = pj;
                    if (out) for (d = 0; d < c->Dv; ++d) out[row * c->Dv + d] += pj * vb[(size_t)j * c->Dv + d];
                }
            }
        }
    free(s); free(slopes);
}

static double *to_d(const float *x, size_t n)
{
    double *y = malloc((n ? n : 1) * sizeof(double));
    size_t i;
    for (i = 0; i < n; ++i) y[i] = x[i];
    return y;
}

static size_t n_q(const cfg *c) { return (size_t)c->B * c->H * c->Lq * c->D; }
static size_t n_k(const cfg *c) { return (size_t)c->B * c->Hkv * c->Lk * c->D; }
static size_t n_v(const cfg *c) { return (size_t)c->B * c->Hkv * c->Lk * c->Dv; }
static size_t n_o(const cfg *c) { return (size_t)c->B * c->H * c->Lq * c->Dv; }
static size_t n_r(const cfg *c) { return (size_t)c->B * c->H * c->Lq; }

/* ||a - b|| / ||b|| over the finite entries; an entry that is -inf in b must be -inf in a */
static double lse_err(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    size_t i;
    for (i = 0; i < n; ++i) {
        if (b[i] == -INFINITY) { if (a[i] != -INFINITY) return 1e30; continue; }
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void describe(const cfg *c, char *buf, size_t n)
{
    snprintf(buf, n, "B%d H%d Hkv%d Lq%d Lk%d D%d Dv%d causal%d br%d win%d(%d,%d) cap%g alibi%d/%d sinks%d kpm%d",
             c->B, c->H, c->Hkv, c->Lq, c->Lk, c->D, c->Dv, c->causal, c->bottom_right, c->window,
             c->left, c->right, c->softcap, c->alibi, c->own_slopes, c->sinks, c->kpm);
}

/* forward: fused (no weights) and unfused (weights) against the reference;
   out, lse and weights */
static void check_forward(const cfg *c, unsigned long long seed, int threads)
{
    prob p;
    mha_options o;
    double *qd, *kd, *vd, *sd, *ro, *rl, *rw;
    float *out, *out2, *lse, *lse2, *w;
    char name[256];
    double e;
    int pass;
    mha_status st;
    prob_make(&p, c, seed);
    describe(c, name, sizeof name);
    qd = to_d(p.q, n_q(c)); kd = to_d(p.k, n_k(c)); vd = to_d(p.v, n_v(c)); sd = to_d(p.sinks, (size_t)c->H);
    ro = malloc(n_o(c) * sizeof(double)); rl = malloc(n_r(c) * sizeof(double));
    rw = malloc(n_r(c) * c->Lk * sizeof(double));
    out = malloc(n_o(c) * sizeof(float)); out2 = malloc(n_o(c) * sizeof(float));
    lse = malloc(n_r(c) * sizeof(float)); lse2 = malloc(n_r(c) * sizeof(float));
    w = malloc(n_r(c) * c->Lk * sizeof(float));
    ref_sdpa(c, qd, kd, vd, sd, p.slopes, p.kpm, ro, rl, rw);

    o = prob_opt(&p);
    o.num_threads = threads;
    for (pass = 0; pass < 2; ++pass) {   /* fused (no weights), then unfused */
        const char *path = pass ? "unfused" : "fused";
        float *po = pass ? out2 : out, *pl = pass ? lse2 : lse;
        mha_error err;
        st = sdpa_fwd(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, p.q, p.k, p.v, &o, po, pass ? w : NULL, pl, &err);
        CHECK(st == MHA_OK, "%s: status %d (%s): %s", path, (int)st, name, err.message);
        e = tu_rel_err(po, ro, n_o(c));
        CHECK(e <= TOL, "%s out err %.3g (%s)", path, e, name);
        if (e > worst_fwd) worst_fwd = e;
        e = lse_err(pl, rl, n_r(c));
        CHECK(e <= TOL, "%s lse err %.3g (%s)", path, e, name);
        if (e > worst_lse) worst_lse = e;
    }
    e = tu_rel_err(w, rw, n_r(c) * c->Lk);
    CHECK(e <= TOL, "weights err %.3g (%s)", e, name);
    if (e > worst_w) worst_w = e;

    free(qd); free(kd); free(vd); free(sd); free(ro); free(rl); free(rw);
    free(out); free(out2); free(lse); free(lse2); free(w);
    prob_free(&p);
}

/* backward against central differences of the float64 reference of
   L = sum(dout * out): dq, dk, dv and the sinks' gradient */
static void check_backward(const cfg *c, unsigned long long seed)
{
    prob p;
    mha_options o;
    tu_rng r = { seed ^ 0x5eedULL };
    size_t nq = n_q(c), nk = n_k(c), nv = n_v(c), no = n_o(c), t;
    double *qd, *kd, *vd, *sd, *ro, *fd, *arrays[4];
    float *dout, *dq, *dk, *dv, *dsink, *got[4];
    size_t sizes[4];
    const char *names[4] = { "dq", "dk", "dv", "dsinks" };
    char name[256];
    int a;
    mha_status st;
    mha_error err;
    prob_make(&p, c, seed);
    describe(c, name, sizeof name);
    qd = to_d(p.q, nq); kd = to_d(p.k, nk); vd = to_d(p.v, nv); sd = to_d(p.sinks, (size_t)c->H);
    ro = malloc(no * sizeof(double));
    dout = malloc(no * sizeof(float)); tu_fill(&r, dout, no, 1.0f);
    dq = calloc(nq, sizeof(float)); dk = calloc(nk, sizeof(float)); dv = calloc(nv, sizeof(float));
    dsink = calloc((size_t)c->H, sizeof(float));
    o = prob_opt(&p);
    st = sdpa_bwd(c->B, c->H, c->Lq, c->Lk, c->D, c->Dv, p.q, p.k, p.v, dout, &o, dq, dk, dv,
                  c->sinks ? dsink : NULL, &err);
    CHECK(st == MHA_OK, "backward status %d (%s): %s", (int)st, name, err.message);
    arrays[0] = qd; arrays[1] = kd; arrays[2] = vd; arrays[3] = sd;
    got[0] = dq; got[1] = dk; got[2] = dv; got[3] = dsink;
    sizes[0] = nq; sizes[1] = nk; sizes[2] = nv; sizes[3] = c->sinks ? (size_t)c->H : 0;
    for (a = 0; a < 4; ++a) {
        double e;
        if (!sizes[a]) continue;
        fd = malloc(sizes[a] * sizeof(double));
        for (t = 0; t < sizes[a]; ++t) {
            double keep = arrays[a][t], h = 1e-6, lp = 0, lm = 0;
            size_t u;
            arrays[a][t] = keep + h;
            ref_sdpa(c, qd, kd, vd, sd, p.slopes, p.kpm, ro, NULL, NULL);
            for (u = 0; u < no; ++u) lp += dout[u] * ro[u];
            arrays[a][t] = keep - h;
            ref_sdpa(c, qd, kd, vd, sd, p.slopes, p.kpm, ro, NULL, NULL);
            for (u = 0; u < no; ++u) lm += dout[u] * ro[u];
            arrays[a][t] = keep;
            fd[t] = (lp - lm) / (2 * h);
        }
        e = tu_rel_err(got[a], fd, sizes[a]);
        CHECK(e <= TOL_GRAD, "%s err %.3g vs finite differences (%s)", names[a], e, name);
        if (e > worst_grad) worst_grad = e;
        free(fd);
    }
    free(qd); free(kd); free(vd); free(sd); free(ro); free(dout); free(dq); free(dk); free(dv); free(dsink);
    prob_free(&p);
}

static cfg base(int B, int H, int Hkv, int Lq, int Lk, int D, int Dv)
{
    cfg c;
    memset(&c, 0, sizeof c);
    c.B = B; c.H = H; c.Hkv = Hkv; c.Lq = Lq; c.Lk = Lk; c.D = D; c.Dv = Dv;
    c.left = -1; c.right = -1;
    return c;
}

/* the features one at a time and together, over shapes that cross the
   fused path's tile edges (128 keys, 64 query columns) */
static void forward_cases(void)
{
    static const int shapes[][7] = {
        /* B  H Hkv Lq   Lk   D  Dv */
        { 1, 1, 1,  1,    1,  1,  1 },
        { 2, 4, 2,  7,   17,  8,  5 },
        { 1, 6, 2, 17,  130,  9, 16 },
        { 2, 8, 1,  3,  300, 16, 16 },   /* MQA, decode-like */
        { 1, 3, 3, 70,  200, 12,  7 },
        { 1, 4, 4,  1,  257, 32, 32 },
        { 1, 12, 4, 33,  45,  4,  4 },
        { 1, 66, 1,  2,   20,  4,  4 },  /* a group wider than a fused tile */
        /* decode steps: the narrow path, split into key parts past 2048 keys */
        { 1, 8, 2,  1, 5000, 16, 16 },
        { 2, 4, 1,  2, 2100,  8,  8 },
        { 1, 2, 2,  1, 4097,  4,  4 },
    };
    int s, f, th;
    unsigned long long seed = 1;
    for (s = 0; s < (int)(sizeof shapes / sizeof shapes[0]); ++s)
        for (f = 0; f < 12; ++f) {
            const int *z = shapes[s];
            cfg c = base(z[0], z[1], z[2], z[3], z[4], z[5], z[6]);
            switch (f) {
            case 0: break;
            case 1: c.causal = 1; c.bottom_right = 1; break;
            case 2: c.window = 1; c.left = 5; c.right = 2; break;
            case 3: c.window = 1; c.left = 40; c.right = -1; c.causal = 1; c.bottom_right = 1; break;
            case 4: c.softcap = 0.7f; c.scale = 1.0f; break;
            case 5: c.alibi = 1; c.causal = 1; c.bottom_right = 1; break;
            case 6: c.alibi = 1; c.own_slopes = 1; break;
            case 7: c.sinks = 1; break;
            case 8: c.sinks = 1; c.causal = 1; c.window = 1; c.left = 3; c.right = 0; break;
            case 9: c.softcap = 5.0f; c.alibi = 1; c.sinks = 1; c.causal = 1; c.bottom_right = 1;
                    c.window = 1; c.left = 64; c.right = 0; c.kpm = 1; break;
            case 10: c.window = 1; c.left = -1; c.right = 3; c.kpm = 1; c.alibi = 1; break;
            case 11: c.window = 1; c.left = 0; c.right = 0; c.bottom_right = 1; c.sinks = 1; break;
            }
            /* non-causal ALiBi over thousands of keys puts logits near slope * Lk
               (3000 here), where a float's spacing (2.4e-4) alone exceeds the
               tolerance: an input float32 cannot hold, not a path to test */
            if (!(f == 6 && c.Lk > 1000))
                for (th = 1; th <= 2; ++th) check_forward(&c, seed, th);
            ++seed;
        }
}

/* split-K decoding gives the same bits for any thread count */
static void split_threads(void)
{
    cfg c = base(2, 8, 2, 1, 6000, 32, 32);
    prob p;
    mha_options o;
    float *o1 = malloc(n_o(&c) * sizeof(float)), *o2 = malloc(n_o(&c) * sizeof(float));
    float l1[16], l2[16];
    float sinks[8] = { 1, 2, 3, -1, 0, 0.5f, -2, 4 };
    int th;
    mha_error err;
    prob_make(&p, &c, 31);
    o = prob_opt(&p);
    o.sinks = sinks; o.softcap = 10.0f; o.alibi = 1; o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    o.num_threads = 1;
    CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, p.k, p.v, &o, o1, NULL, l1, &err) == MHA_OK,
          "split 1t: %s", err.message);
    for (th = 2; th <= 3; ++th) {
        o.num_threads = th;
        CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, p.k, p.v, &o, o2, NULL, l2, &err) == MHA_OK,
              "split: %s", err.message);
        CHECK(memcmp(o1, o2, n_o(&c) * sizeof(float)) == 0 && memcmp(l1, l2, sizeof l1) == 0,
              "split-K decode: %d threads give the bits of 1", th);
    }
    free(o1); free(o2);
    prob_free(&p);
}

static void backward_cases(void)
{
    cfg c;
    int f;
    for (f = 0; f < 7; ++f) {
        c = base(2, 4, 2, 5, 7, 3, 4);
        switch (f) {
        case 0: break;
        case 1: c.Hkv = 1; c.causal = 1; c.bottom_right = 1; break;
        case 2: c.softcap = 0.8f; c.scale = 1.0f; break;
        case 3: c.alibi = 1; c.causal = 1; break;
        case 4: c.alibi = 1; c.own_slopes = 1; c.window = 1; c.left = 2; c.right = 1; break;
        case 5: c.sinks = 1; c.Hkv = 4; break;
        case 6: c.sinks = 1; c.softcap = 2.0f; c.alibi = 1; c.window = 1; c.left = 3; c.right = 0;
                c.causal = 1; c.bottom_right = 1; c.kpm = 1; break;
        }
        check_backward(&c, 100 + f);
    }
}

/* Hkv = H is MHA; GQA equals MHA on K/V repeated per query head; a window
   >= L is no window: each bit-identical on both paths */
static void properties(void)
{
    cfg c = base(2, 6, 2, 19, 150, 8, 8);
    prob p;
    mha_options o;
    size_t no = n_o(&c), nk = n_k(&c), i;
    float *a1 = malloc(no * sizeof(float)), *a2 = malloc(no * sizeof(float));
    float *w1 = malloc(n_r(&c) * c.Lk * sizeof(float)), *w2 = malloc(n_r(&c) * c.Lk * sizeof(float));
    float *kr = malloc(nk * 3 * sizeof(float)), *vr = malloc(nk * 3 * sizeof(float));
    int b, h, pass;
    mha_error err;
    prob_make(&p, &c, 77);
    for (pass = 0; pass < 2; ++pass) {
        float *w_a = pass ? w1 : NULL, *w_b = pass ? w2 : NULL;
        /* GQA (Hkv = 2) against MHA on K, V repeated: head h gets KV head h / 3 */
        for (b = 0; b < c.B; ++b)
            for (h = 0; h < c.H; ++h) {
                memcpy(kr + ((size_t)b * c.H + h) * c.Lk * c.D, p.k + ((size_t)b * c.Hkv + h / 3) * c.Lk * c.D,
                       (size_t)c.Lk * c.D * sizeof(float));
                memcpy(vr + ((size_t)b * c.H + h) * c.Lk * c.Dv, p.v + ((size_t)b * c.Hkv + h / 3) * c.Lk * c.Dv,
                       (size_t)c.Lk * c.Dv * sizeof(float));
            }
        o = prob_opt(&p); o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
        CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, p.k, p.v, &o, a1, w_a, NULL, &err) == MHA_OK, "gqa" ": %s", err.message);
        o.num_kv_heads = 0;
        CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, kr, vr, &o, a2, w_b, NULL, &err) == MHA_OK, "mha" ": %s", err.message);
        CHECK(memcmp(a1, a2, no * sizeof(float)) == 0, "GQA == MHA on repeated K/V (pass %d)", pass);
        if (pass) CHECK(memcmp(w1, w2, n_r(&c) * c.Lk * sizeof(float)) == 0, "GQA weights == MHA weights");
        /* Hkv = H given explicitly is MHA */
        o.num_kv_heads = c.H;
        CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, kr, vr, &o, a1, w_a, NULL, &err) == MHA_OK, "hkv=h" ": %s", err.message);
        CHECK(memcmp(a1, a2, no * sizeof(float)) == 0, "num_kv_heads = H is MHA (pass %d)", pass);
        /* a window wider than the keys is no window */
        o.window = 1; o.window_left = c.Lk; o.window_right = c.Lk + 5;
        CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, kr, vr, &o, a1, w_a, NULL, &err) == MHA_OK, "window" ": %s", err.message);
        CHECK(memcmp(a1, a2, no * sizeof(float)) == 0, "window >= L is no window (pass %d)", pass);
        o.window_left = -1; o.window_right = -1;
        CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, kr, vr, &o, a1, w_a, NULL, &err) == MHA_OK, "window" ": %s", err.message);
        CHECK(memcmp(a1, a2, no * sizeof(float)) == 0, "window (-1, -1) is no window (pass %d)", pass);
    }
    /* the paper's slopes, also for head counts that are not powers of two */
    {
        float s[12];
        double r[12];
        int n;
        for (n = 1; n <= 12; ++n) {
            CHECK(mha_alibi_slopes(n, s, &err) == MHA_OK, "slopes: %s", err.message);
            paper_slopes(n, r);
            for (i = 0; i < (size_t)n; ++i)
                CHECK(fabs(s[i] - r[i]) <= 1e-7 * r[i], "alibi slope n=%d h=%d: %g vs %g", n, (int)i, s[i], r[i]);
        }
        CHECK(fabs(s[8] - pow(2.0, -0.5)) < 1e-7, "H=12: head 8 gets 2^-0.5");
    }
    free(a1); free(a2); free(w1); free(w2); free(kr); free(vr);
    prob_free(&p);
}

/* split the keys in ranges, attend each with its lse, merge: one pass */
static void merge_property(void)
{
    cfg c = base(1, 4, 2, 3, 301, 16, 12);
    prob p;
    mha_options o;
    static const int cuts[] = { 0, 1, 128, 129, 200, 301 };
    const int np = 5;
    float *parts[5], *lses[5], *one = malloc(n_o(&c) * sizeof(float)), *one_lse = malloc(n_r(&c) * sizeof(float));
    float *kk = malloc(n_k(&c) * sizeof(float)), *vv = malloc(n_v(&c) * sizeof(float));
    float *mo = malloc(n_o(&c) * sizeof(float)), *ml = malloc(n_r(&c) * sizeof(float));
    double *od, *ld;
    int i, h;
    mha_error err;
    c.softcap = 3.0f; c.sinks = 1;
    prob_make(&p, &c, 5);
    o = prob_opt(&p);
    CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, p.k, p.v, &o, one, NULL, one_lse, &err) == MHA_OK,
          "one pass: %s", err.message);
    for (i = 0; i < np; ++i) {
        int j0 = cuts[i], n = cuts[i + 1] - cuts[i];
        parts[i] = malloc(n_o(&c) * sizeof(float)); lses[i] = malloc(n_r(&c) * sizeof(float));
        for (h = 0; h < c.Hkv; ++h) {
            memcpy(kk + (size_t)h * n * c.D, p.k + ((size_t)h * c.Lk + j0) * c.D, (size_t)n * c.D * sizeof(float));
            memcpy(vv + (size_t)h * n * c.Dv, p.v + ((size_t)h * c.Lk + j0) * c.Dv, (size_t)n * c.Dv * sizeof(float));
        }
        o = prob_opt(&p);
        o.sinks = i == 2 ? p.sinks : NULL;      /* the sink in one part only */
        CHECK(sdpa_fwd(c.B, c.H, c.Lq, n, c.D, c.Dv, p.q, kk, vv, &o, parts[i], NULL, lses[i], &err) == MHA_OK,
              "part: %s", err.message);
    }
    CHECK(mha_attn_merge(np, n_r(&c), c.Dv, (const float *const *)parts, (const float *const *)lses, mo, ml, &err) == MHA_OK, "merge: %s", err.message);
    od = to_d(one, n_o(&c)); ld = to_d(one_lse, n_r(&c));
    CHECK(tu_rel_err(mo, od, n_o(&c)) <= 1e-6, "merged split == one pass: %.3g", tu_rel_err(mo, od, n_o(&c)));
    CHECK(tu_rel_err(ml, ld, n_r(&c)) <= 1e-6, "merged lse == one pass: %.3g", tu_rel_err(ml, ld, n_r(&c)));
    /* in place into part 0 */
    CHECK(mha_attn_merge(np, n_r(&c), c.Dv, (const float *const *)parts, (const float *const *)lses, parts[0], lses[0], NULL) == MHA_OK, "merge");
    CHECK(memcmp(parts[0], mo, n_o(&c) * sizeof(float)) == 0, "merge in place");
    CHECK(mha_attn_merge(0, 1, 1, (const float *const *)parts, (const float *const *)lses, mo, ml, &err) ==
          MHA_ERR_INVALID_SIZE && err.status == MHA_ERR_INVALID_SIZE && !strcmp(err.field, "nparts"),
          "merge n=0: %s", err.message);
    CHECK(mha_attn_merge(1, 1, 1, NULL, (const float *const *)lses, mo, ml, &err) == MHA_ERR_NULL_POINTER &&
          !strcmp(err.field, "outs"), "merge NULL: %s", err.message);
    /* a row with no key anywhere */
    {
        float o0[2] = { 5, 5 }, l0 = -INFINITY, l1 = -INFINITY, o1[2] = { 7, 7 }, r[2], rl;
        const float *os[2], *ls[2];
        os[0] = o0; os[1] = o1; ls[0] = &l0; ls[1] = &l1;
        CHECK(mha_attn_merge(2, 1, 2, os, ls, r, &rl, NULL) == MHA_OK && r[0] == 0 && r[1] == 0 && rl == -INFINITY,
              "empty row merges to zeros, -inf");
    }
    for (i = 0; i < np; ++i) { free(parts[i]); free(lses[i]); }
    free(one); free(one_lse); free(kk); free(vv); free(mo); free(ml); free(od); free(ld);
    prob_free(&p);
}

/* bad values: a status, and nothing written */
static void errors(void)
{
    cfg c = base(1, 4, 2, 3, 5, 4, 4);
    prob p;
    mha_options o;
    float out[48], lse[12], dq[48], dk[40], dv[40], dout[48];
    float nan_sinks[4] = { 0, NAN, 0, 0 }, inf_slopes[4] = { 1, 1, INFINITY, 1 };
    size_t i;
    int bad;
    mha_sizes sizes;
    mha_error err, err_ws, err_bwd;
    prob_make(&p, &c, 9);
    for (i = 0; i < 48; ++i) dout[i] = 1.0f;
    for (bad = 0; bad < 9; ++bad) {
        mha_status want = MHA_ERR_INVALID_ARGUMENT, got, got_bwd, got_ws;
        const char *field = "";
        o = prob_opt(&p);
        switch (bad) {
        case 0: o.num_kv_heads = 3; want = MHA_ERR_HEADS_DIVIDE; field = "opt->num_kv_heads"; break;
        case 1: o.num_kv_heads = 8; want = MHA_ERR_HEADS_DIVIDE; field = "opt->num_kv_heads"; break;
        case 2: o.num_kv_heads = -1; want = MHA_ERR_INVALID_SIZE; field = "opt->num_kv_heads"; break;
        case 3: o.window = 1; o.window_left = -2; field = "opt->window_left"; break;
        case 4: o.window = 1; o.window_right = -5; field = "opt->window_right"; break;
        case 5: o.softcap = -1.0f; field = "opt->softcap"; break;
        case 6: o.softcap = NAN; field = "opt->softcap"; break;
        case 7: o.sinks = nan_sinks; field = "opt->sinks"; break;
        case 8: o.alibi = 1; o.alibi_slopes = inf_slopes; field = "opt->alibi_slopes"; break;
        }
        for (i = 0; i < 48; ++i) { out[i] = 12345.0f; dq[i] = 0.0f; }
        for (i = 0; i < 40; ++i) dk[i] = dv[i] = 0.0f;
        for (i = 0; i < 12; ++i) lse[i] = 12345.0f;
        got = sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, p.k, p.v, &o, out, NULL, lse, &err);
        got_ws = mha_sdpa_plan_size(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, &o, 0, &sizes, &err_ws);
        got_bwd = sdpa_bwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, p.k, p.v, dout, &o, dq, dk, dv, NULL, &err_bwd);
        CHECK(got == want && got_ws == want && got_bwd == want, "bad case %d: %d %d %d, want %d",
              bad, (int)got, (int)got_ws, (int)got_bwd, (int)want);
        /* each refusal names the option: "mha_sdpa_forward: opt->softcap: ..." */
        CHECK(got == want && err.status == want && err.field && !strcmp(err.field, field) &&
              err.function && !strcmp(err.function, "mha_sdpa_forward") && strstr(err.message, field) &&
              got_ws == want && err_ws.field && !strcmp(err_ws.field, field) &&
              got_bwd == want && err_bwd.field && !strcmp(err_bwd.field, field) &&
              err_bwd.function && !strcmp(err_bwd.function, "mha_sdpa_backward"),
              "bad case %d: want field %s; got \"%s\" / \"%s\" / \"%s\"", bad, field, err.message,
              err_ws.message, err_bwd.message);
        for (i = 0; i < 48; ++i) if (out[i] != 12345.0f || dq[i] != 0.0f) break;
        CHECK(i == 48, "bad case %d wrote its output", bad);
        for (i = 0; i < 12; ++i) if (lse[i] != 12345.0f) break;
        CHECK(i == 12, "bad case %d wrote lse", bad);
    }
    /* a window with -1 on both sides and softcap 0 are valid (off) */
    o = prob_opt(&p); o.window = 1; o.window_left = -1; o.window_right = -1; o.softcap = 0.0f;
    CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, p.q, p.k, p.v, &o, out, NULL, NULL, &err) == MHA_OK,
          "-1/-1 ok: %s", err.message);
    CHECK(mha_alibi_slopes(0, out, &err) == MHA_ERR_INVALID_SIZE && !strcmp(err.field, "H") &&
          mha_alibi_slopes(3, NULL, &err_ws) == MHA_ERR_NULL_POINTER && !strcmp(err_ws.field, "slopes"),
          "alibi_slopes arguments: %s / %s", err.message, err_ws.message);
    prob_free(&p);
}

/* ------------------------------------------------ RoPE */

/* float64 RoPE of one D-vector at position pos (the definition, plainly) */
static void ref_rope(const mha_rope *r, int D, double pos, const float *x, double *y)
{
    int R = r->rotary_dim ? r->rotary_dim : D, m, d;
    double theta = r->theta > 0 ? r->theta : 10000.0;
    for (d = 0; d < D; ++d) y[d] = x[d];
    for (m = 0; r->kind != MHA_ROPE_NONE && m < R / 2; ++m) {
        double ang = pos * pow(theta, -2.0 * m / R), c = cos(ang), sn = sin(ang);
        int ia = r->kind == MHA_ROPE_HALF ? m : 2 * m, ib = r->kind == MHA_ROPE_HALF ? m + R / 2 : 2 * m + 1;
        y[ia] = x[ia] * c - x[ib] * sn;
        y[ib] = x[ib] * c + x[ia] * sn;
    }
}

static void rope_tests(void)
{
    static const int conf[][4] = {   /* kind, R, D, pos0 */
        { MHA_ROPE_HALF, 0, 8, 0 }, { MHA_ROPE_HALF, 4, 10, 5 }, { MHA_ROPE_INTERLEAVED, 0, 6, 0 },
        { MHA_ROPE_INTERLEAVED, 2, 3, 100 }, { MHA_ROPE_HALF, 128, 128, 32000 }, { MHA_ROPE_NONE, 0, 5, 3 },
    };
    int ci;
    tu_rng rg = { 42 };
    for (ci = 0; ci < (int)(sizeof conf / sizeof conf[0]); ++ci) {
        mha_rope r;
        int B = 2, H = 3, L = 9, D = conf[ci][2], pos0 = conf[ci][3], b, h, l, big = 40;
        size_t n = (size_t)B * H * L * D, t;
        float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float)), *z = malloc(n * sizeof(float));
        float *xl = malloc((size_t)B * H * big * D * sizeof(float));
        double *ref = malloc(n * sizeof(double)), e, dot1 = 0, dot2 = 0;
        int *pos = malloc((size_t)B * L * sizeof(int));
        r.kind = (mha_rope_kind)conf[ci][0]; r.rotary_dim = conf[ci][1]; r.theta = ci == 1 ? 500.0f : 0.0f;
        tu_fill(&rg, x, n, 1.0f);
        for (b = 0; b < B; ++b) for (h = 0; h < H; ++h) for (l = 0; l < L; ++l) {
            size_t o = (((size_t)b * H + h) * L + l) * D;
            ref_rope(&r, D, (double)pos0 + l, x + o, ref + o);
        }
        memcpy(y, x, n * sizeof(float));
        CHECK(mha_rope_forward(&r, B, H, L, D, pos0, NULL, y, NULL) == MHA_OK, "rope status");
        e = tu_rel_err(y, ref, n);
        CHECK(e <= 1e-6, "rope %d vs float64 reference: %.3g", ci, e);
        if (e > worst_fwd) worst_fwd = e;
        /* backward is the transpose: <R x, z> = <x, R^T z> */
        tu_fill(&rg, z, n, 1.0f);
        for (t = 0; t < n; ++t) dot1 += (double)y[t] * z[t];
        CHECK(mha_rope_backward(&r, B, H, L, D, pos0, NULL, z, NULL) == MHA_OK, "rope bwd status");
        for (t = 0; t < n; ++t) dot2 += (double)x[t] * z[t];
        CHECK(fabs(dot1 - dot2) <= 1e-5 * (fabs(dot1) + 1), "rope backward is the transpose: %g vs %g", dot1, dot2);
        /* and undoes the forward */
        memcpy(z, y, n * sizeof(float));
        mha_rope_backward(&r, B, H, L, D, pos0, NULL, z, NULL);
        CHECK(tu_rel_err_ff(z, x, n) <= 1e-6, "rope backward(forward(x)) == x: %.3g", tu_rel_err_ff(z, x, n));
        /* offset p == a sequence that starts p tokens in (rows pos0.. of a longer one
           rotated from position 0), when pos0 fits */
        if (pos0 + L <= big) {
            for (b = 0; b < B; ++b) for (h = 0; h < H; ++h) for (l = 0; l < big; ++l) {
                float *dst = xl + (((size_t)b * H + h) * big + l) * D;
                if (l >= pos0 && l < pos0 + L) memcpy(dst, x + (((size_t)b * H + h) * L + l - pos0) * D, (size_t)D * sizeof(float));
                else memset(dst, 0, (size_t)D * sizeof(float));
            }
            mha_rope_forward(&r, B, H, big, D, 0, NULL, xl, NULL);
            for (b = 0, t = 0; b < B; ++b) for (h = 0; h < H; ++h) for (l = 0; l < L; ++l)
                t += memcmp(xl + (((size_t)b * H + h) * big + pos0 + l) * D, y + (((size_t)b * H + h) * L + l) * D,
                            (size_t)D * sizeof(float)) != 0;
            CHECK(t == 0, "rope at offset %d == rope of a sequence starting %d in (%d rows differ)", pos0, pos0, (int)t);
        }
        /* per-token positions (ragged batches): positions[b*L + l] */
        for (b = 0; b < B; ++b) for (l = 0; l < L; ++l) pos[b * L + l] = pos0 + l + 3 * b;
        memcpy(z, x, n * sizeof(float));
        mha_rope_forward(&r, B, H, L, D, 0, pos, z, NULL);
        for (b = 0; b < B; ++b) for (h = 0; h < H; ++h) for (l = 0; l < L; ++l) {
            size_t o = (((size_t)b * H + h) * L + l) * D;
            ref_rope(&r, D, (double)pos0 + l + 3 * b, x + o, ref + o);
        }
        CHECK(tu_rel_err(z, ref, n) <= 1e-6, "rope with positions[]: %.3g", tu_rel_err(z, ref, n));
        free(x); free(y); free(z); free(xl); free(ref); free(pos);
    }
    /* bad values: a status, nothing written */
    {
        mha_rope r;
        float x[24];
        int pos[2] = { 0, -1 }, i, ok = 1;
        for (i = 0; i < 24; ++i) x[i] = 1.0f;
        mha_error e;
        r.kind = MHA_ROPE_HALF; r.rotary_dim = 3; r.theta = 0;
        CHECK(mha_rope_forward(&r, 1, 2, 2, 6, 0, NULL, x, &e) == MHA_ERR_INVALID_ARGUMENT, "odd rotary dim");
        CHECK(e.status == MHA_ERR_INVALID_ARGUMENT && e.field && strstr(e.field, "rotary_dim") &&
              !strcmp(e.function, "mha_rope_forward"), "odd rotary dim names rope->rotary_dim: %s", e.message);
        r.rotary_dim = 8;
        CHECK(mha_rope_forward(&r, 1, 2, 2, 6, 0, NULL, x, &e) == MHA_ERR_INVALID_ARGUMENT, "rotary dim > D");
        r.rotary_dim = 0;
        CHECK(mha_rope_forward(&r, 1, 2, 2, 5, 0, NULL, x, &e) == MHA_ERR_INVALID_ARGUMENT, "odd D, full rotary");
        CHECK(mha_rope_forward(&r, 1, 2, 2, 6, -1, NULL, x, &e) == MHA_ERR_INVALID_ARGUMENT &&
              e.field && !strcmp(e.field, "pos0"), "negative pos0: %s", e.message);
        CHECK(mha_rope_forward(&r, 1, 2, 2, 6, 0, pos, x, &e) == MHA_ERR_INVALID_ARGUMENT &&
              e.field && strstr(e.field, "positions"), "negative position: %s", e.message);
        r.theta = -2.0f;
        CHECK(mha_rope_backward(&r, 1, 2, 2, 6, 0, NULL, x, &e) == MHA_ERR_INVALID_ARGUMENT &&
              e.field && strstr(e.field, "theta"), "negative theta: %s", e.message);
        r.theta = 0.0f; r.kind = (mha_rope_kind)9;
        CHECK(mha_rope_forward(&r, 1, 2, 2, 6, 0, NULL, x, &e) == MHA_ERR_BAD_ENUM &&
              e.field && strstr(e.field, "kind"), "bad rope kind: %s", e.message);
        CHECK(mha_rope_forward(NULL, 1, 2, 2, 6, 0, NULL, x, &e) == MHA_ERR_NULL_POINTER &&
              e.field && !strcmp(e.field, "rope"), "NULL rope: %s", e.message);
        for (i = 0; i < 24; ++i) ok &= x[i] == 1.0f;
        CHECK(ok, "rope errors wrote nothing");
    }
}

/* ------------------------------------------------ PyTorch goldens */

enum { DG_B = 0, DG_H, DG_HKV, DG_LQ, DG_LK, DG_D, DG_DV, DG_CAUSAL, DG_WINDOW, DG_LEFT, DG_RIGHT,
       DG_ALIBI, DG_SINKS, DG_GRAD, DG_KIND, DG_ROPE };
enum { DG_KIND_ATTN = 0, DG_KIND_ROPE = 1, DG_KIND_MODULE = 2 };

static const float *gf(const gold_case *g, const char *name)
{
    const gold_array *a = gold_find(g, name);
    return a && a->dtype == GOLD_F32 ? a->f32 : NULL;
}
static const double *gd(const gold_case *g, const char *name)
{
    const gold_array *a = gold_find(g, name);
    return a && a->dtype == GOLD_F64 ? a->f64 : NULL;
}

/* RoPE alone: forward and backward against rotate_half / GPT-J pairs in float64 torch */
static void golden_rope(const gold_case *g)
{
    int B = g->p[0], H = g->p[1], L = g->p[2], D = g->p[3];
    size_t n = (size_t)B * H * L * D;
    const float *x = gf(g, "x"), *dout = gf(g, "dout"), *th = gf(g, "theta");
    const double *rout = gd(g, "out"), *rdx = gd(g, "dx");
    float *y = malloc(n * sizeof(float)), *dx = malloc(n * sizeof(float));
    mha_rope r;
    double e1, e2;
    if (!x || !dout || !th || !rout || !rdx) { CHECK(0, "%s: arrays missing", g->name); free(y); free(dx); return; }
    r.kind = (mha_rope_kind)g->p[DG_ROPE]; r.rotary_dim = g->p[4]; r.theta = th[0];
    memcpy(y, x, n * sizeof(float)); memcpy(dx, dout, n * sizeof(float));
    CHECK(mha_rope_forward(&r, B, H, L, D, g->p[5], NULL, y, NULL) == MHA_OK, "%s: rope status", g->name);
    CHECK(mha_rope_backward(&r, B, H, L, D, g->p[5], NULL, dx, NULL) == MHA_OK, "%s: rope bwd status", g->name);
    e1 = tu_rel_err(y, rout, n); e2 = tu_rel_err(dx, rdx, n);
    CHECK(e1 <= TOL && e2 <= TOL_GRAD, "%s: rope out %.3g dx %.3g", g->name, e1, e2);
    if (e1 > worst_gold) worst_gold = e1;
    if (e2 > worst_gold_grad) worst_gold_grad = e2;
    free(y); free(dx);
}

/* A decoder module (GQA projections, RoPE on Q and K, causal):
   mha_module_forward and mha_module_backward against float64 torch ops
   with autograd */
static void golden_module(const gold_case *g)
{
    int B = g->p[0], H = g->p[1], Hkv = g->p[2], L = g->p[3], E = g->p[4], pass;
    size_t n = (size_t)B * L * E;
    static const char *wn[] = { "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                "out_proj.weight", "out_proj.bias" };
    const float *x = gf(g, "x"), *dout = gf(g, "dout"), *th = gf(g, "theta"), *w[6];
    const double *rout = gd(g, "out"), *rdx = gd(g, "dx");
    float *out = malloc(n * sizeof(float)), *dx = calloc(n, sizeof(float)), *gw[6];
    mha_module m;
    mha_module_grad mg;
    mha_options o;
    int i;
    for (i = 0; i < 6; ++i) {
        const gold_array *a = gold_find(g, wn[i]);
        w[i] = gf(g, wn[i]);
        gw[i] = calloc(a ? a->count : 1, sizeof(float));
    }
    memset(&m, 0, sizeof m); memset(&mg, 0, sizeof mg); memset(&o, 0, sizeof o);
    m.embed_dim = E; m.num_heads = H; m.num_kv_heads = Hkv;
    m.q_proj_weight = w[0]; m.k_proj_weight = w[1]; m.v_proj_weight = w[2]; m.in_proj_bias = w[3];
    m.out_proj_weight = w[4]; m.out_proj_bias = w[5];
    m.rope.kind = (mha_rope_kind)g->p[DG_ROPE]; m.rope.rotary_dim = g->p[5]; m.rope.theta = th ? th[0] : 0.0f;
    o.position_offset = g->p[6];
    o.causal = 1; o.causal_align = g->p[7] == 2 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
    if (!x || !dout || !rout || !rdx) { CHECK(0, "%s: arrays missing", g->name); return; }
    for (pass = 0; pass < 2; ++pass) {
        float *wts = pass ? malloc((size_t)B * L * L * sizeof(float)) : NULL;
        double e;
        mha_run run;
        mha_error err;
        memset(&run, 0, sizeof run);
        run.weights = wts;
        CHECK(mha_module_forward(&m, B, L, L, x, x, x, &o, out, &run, &err) == MHA_OK, "%s: status: %s", g->name,
              err.message);
        e = tu_rel_err(out, rout, n);
        CHECK(e <= TOL, "%s (%s): out %.3g", g->name, pass ? "unfused" : "fused", e);
        if (e > worst_gold) worst_gold = e;
        free(wts);
    }
    mg.q_proj_weight = gw[0]; mg.k_proj_weight = gw[1]; mg.v_proj_weight = gw[2]; mg.in_proj_bias = gw[3];
    mg.out_proj_weight = gw[4]; mg.out_proj_bias = gw[5];
    {
        mha_error err;
        CHECK(mha_module_backward(&m, B, L, L, x, x, x, dout, &o, dx, dx, dx, &mg, NULL, &err) == MHA_OK,
              "%s: bwd: %s", g->name, err.message);
    }
    {
        double e = tu_rel_err(dx, rdx, n);
        CHECK(e <= TOL_GRAD, "%s: dx %.3g", g->name, e);
        if (e > worst_gold_grad) worst_gold_grad = e;
    }
    for (i = 0; i < 6; ++i) {
        char nm[40];
        const gold_array *a;
        double e;
        snprintf(nm, sizeof nm, "d%s", wn[i]);
        a = gold_find(g, nm);
        if (!a || a->dtype != GOLD_F64) { CHECK(0, "%s: %s missing", g->name, nm); continue; }
        e = tu_rel_err(gw[i], a->f64, a->count);
        CHECK(e <= TOL_GRAD, "%s: %s %.3g", g->name, nm, e);
        if (e > worst_gold_grad) worst_gold_grad = e;
    }
    for (i = 0; i < 6; ++i) free(gw[i]);
    free(out); free(dx);
}

static void golden(void)
{
    gold_file gfile;
    char err[256];
    int ci;
    if (!gold_load("tests/golden/decode.bin", &gfile, err, sizeof err)) {
        CHECK(0, "tests/golden/decode.bin: %s (make golden writes it)", err);
        return;
    }
    CHECK(gfile.ncases >= 10, "decode goldens: %d cases", gfile.ncases);
    for (ci = 0; ci < gfile.ncases; ++ci) {
        const gold_case *g = &gfile.cases[ci];
        if (g->p[DG_KIND] == DG_KIND_ROPE) { golden_rope(g); continue; }
        if (g->p[DG_KIND] == DG_KIND_MODULE) { golden_module(g); continue; }
        {
        cfg c = base(g->p[DG_B], g->p[DG_H], g->p[DG_HKV], g->p[DG_LQ], g->p[DG_LK], g->p[DG_D], g->p[DG_DV]);
        const float *q = gf(g, "q"), *k = gf(g, "k"), *v = gf(g, "v"), *cap = gf(g, "softcap");
        const float *slopes = gf(g, "slopes"), *sinks = gf(g, "sinks"), *dout = gf(g, "dout");
        const double *rout = gd(g, "out"), *rlse = gd(g, "lse"), *rw = gd(g, "weights");
        mha_options o;
        float *out, *lse, *w;
        int pass;
        if (!q || !k || !v || !rout || !rlse || !rw) { CHECK(0, "%s: arrays missing", g->name); continue; }
        memset(&o, 0, sizeof o);
        o.num_kv_heads = c.Hkv;
        o.causal = g->p[DG_CAUSAL] == 1 || g->p[DG_CAUSAL] == 2;   /* 3: the alignment only */
        o.causal_align = g->p[DG_CAUSAL] >= 2 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_TOP_LEFT;
        o.window = g->p[DG_WINDOW]; o.window_left = g->p[DG_LEFT]; o.window_right = g->p[DG_RIGHT];
        o.softcap = cap ? cap[0] : 0.0f;
        o.alibi = g->p[DG_ALIBI] != 0; o.alibi_slopes = g->p[DG_ALIBI] == 2 ? slopes : NULL;
        o.sinks = g->p[DG_SINKS] ? sinks : NULL;
        o.scale = g->scale;
        out = malloc(n_o(&c) * sizeof(float)); lse = malloc(n_r(&c) * sizeof(float));
        w = malloc(n_r(&c) * c.Lk * sizeof(float));
        for (pass = 0; pass < 2; ++pass) {
            double e1, e2;
            mha_error err;
            CHECK(sdpa_fwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, q, k, v, &o, out, pass ? w : NULL, lse, &err) == MHA_OK,
                  "%s: status: %s", g->name, err.message);
            e1 = tu_rel_err(out, rout, n_o(&c));
            e2 = lse_err(lse, rlse, n_r(&c));
            CHECK(e1 <= TOL && e2 <= TOL, "%s (%s): out %.3g lse %.3g", g->name, pass ? "unfused" : "fused", e1, e2);
            if (e1 > worst_gold) worst_gold = e1;
            if (e2 > worst_gold) worst_gold = e2;
            if (pass) {
                e1 = tu_rel_err(w, rw, n_r(&c) * c.Lk);
                CHECK(e1 <= TOL, "%s: weights %.3g", g->name, e1);
                if (e1 > worst_gold) worst_gold = e1;
            }
        }
        if (g->p[DG_GRAD] && dout) {
            float *dq = calloc(n_q(&c), sizeof(float)), *dk = calloc(n_k(&c), sizeof(float));
            float *dv = calloc(n_v(&c), sizeof(float)), *ds = calloc((size_t)c.H, sizeof(float));
            const double *r[4];
            const float *got[4];
            size_t n[4];
            const char *nm[4] = { "dq", "dk", "dv", "dsinks" };
            int a;
            mha_error err;
            CHECK(sdpa_bwd(c.B, c.H, c.Lq, c.Lk, c.D, c.Dv, q, k, v, dout, &o, dq, dk, dv, ds, &err) == MHA_OK,
                  "%s: backward status: %s", g->name, err.message);
            r[0] = gd(g, "dq"); r[1] = gd(g, "dk"); r[2] = gd(g, "dv"); r[3] = gd(g, "dsinks");
            got[0] = dq; got[1] = dk; got[2] = dv; got[3] = ds;
            n[0] = n_q(&c); n[1] = n_k(&c); n[2] = n_v(&c); n[3] = (size_t)c.H;
            for (a = 0; a < 4; ++a) {
                double e;
                if (!r[a]) { CHECK(a == 3 && !g->p[DG_SINKS], "%s: %s missing", g->name, nm[a]); continue; }
                e = tu_rel_err(got[a], r[a], n[a]);
                CHECK(e <= TOL_GRAD, "%s: %s err %.3g vs autograd", g->name, nm[a], e);
                if (e > worst_gold_grad) worst_gold_grad = e;
            }
            free(dq); free(dk); free(dv); free(ds);
        }
        free(out); free(lse); free(w);
        }
    }
    gold_free(&gfile);
}

int main(void)
{
    forward_cases();
    split_threads();
    backward_cases();
    properties();
    merge_property();
    errors();
    rope_tests();
    golden();
    printf("worst rel err vs float64 reference: out %.3g, lse %.3g, weights %.3g, grads (finite diff) %.3g\n",
           worst_fwd, worst_lse, worst_w, worst_grad);
    printf("worst rel err vs PyTorch goldens: forward %.3g, grads %.3g\n", worst_gold, worst_gold_grad);
    return tu_finish("decode");
}
