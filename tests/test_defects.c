/* test_defects.c - regressions for the defects an adversarial probe found
   (issue 13): an encoder layer whose self-attention has kdim/vdim != E, size
   products that overflow an int, in-place out == query on the head-by-head
   path, a workspace at an odd byte address, and the documented result of a
   cross-entropy whose targets are all ignored.  Each failing call must leave
   its outputs untouched. */
#include <stdlib.h>
#include <string.h>
#include <limits.h>

/* A low head-by-head threshold, so that the long-sequence path is taken at
   test sizes (B (Lq + 2 Lk') E >= 4096 floats). */
#define MHA__BY_HEAD_FLOATS ((size_t)4096)
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

static const float SENTINEL = 777.0f;

static void fill_const(float *x, size_t n, float v)
{
    size_t i;
    for (i = 0; i < n; ++i) x[i] = v;
}
static int all_equal(const float *x, size_t n, float v)
{
    size_t i;
    for (i = 0; i < n; ++i) if (x[i] != v) return 0;
    return 1;
}
static float *frand(tu_rng *r, size_t n, float amp)
{
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    tu_fill(r, p, n, amp);
    return p;
}

/* ---- defect 1: the encoder passes x [B, L, E] as key and value, so its
   self-attention must have kdim = vdim = E */
static void test_encoder_kdim(void)
{
    enum { E = 8, H = 2, B = 1, L = 4, F = 16 };
    static const int dims[][2] = {{2 * E, 2 * E}, {E / 2, E / 2}, {E, 2 * E}, {2 * E, E}};
    tu_rng r = {11};
    float *wq = frand(&r, E * E, 0.3f), *wk = frand(&r, E * 2 * E, 0.3f), *wv = frand(&r, E * 2 * E, 0.3f);
    float *wo = frand(&r, E * E, 0.3f), *w1 = frand(&r, F * E, 0.3f), *w2 = frand(&r, E * F, 0.3f);
    float *n1 = frand(&r, E, 1.0f), *n2 = frand(&r, E, 1.0f), *x = frand(&r, B * L * E, 1.0f);
    float y[B * L * E], dx[B * L * E], dy[B * L * E];
    size_t c, bytes = 0;
    fill_const(dy, B * L * E, 0.5f);
    for (c = 0; c < sizeof dims / sizeof dims[0]; ++c) {
        mha_encoder_layer ly;
        memset(&ly, 0, sizeof ly);
        ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
        ly.self_attn.q_proj_weight = wq; ly.self_attn.k_proj_weight = wk;
        ly.self_attn.v_proj_weight = wv; ly.self_attn.out_proj_weight = wo;
        ly.self_attn.kdim = dims[c][0]; ly.self_attn.vdim = dims[c][1];
        ly.dim_feedforward = F;
        ly.linear1_weight = w1; ly.linear2_weight = w2;
        ly.norm1_weight = n1; ly.norm2_weight = n2;
        fill_const(y, B * L * E, SENTINEL);
        fill_const(dx, B * L * E, SENTINEL);
        CHECK(mha_encoder_workspace_size(&ly, B, L, NULL, &bytes) == MHA_ERR_INVALID_ARGUMENT,
              "encoder size kdim %d vdim %d", dims[c][0], dims[c][1]);
        CHECK(mha_encoder_forward(&ly, B, L, x, NULL, y, NULL, NULL, 0) == MHA_ERR_INVALID_ARGUMENT,
              "encoder forward kdim %d vdim %d", dims[c][0], dims[c][1]);
        CHECK(mha_encoder_backward(&ly, B, L, x, NULL, dy, dx, NULL, NULL, 0) == MHA_ERR_INVALID_ARGUMENT,
              "encoder backward kdim %d vdim %d", dims[c][0], dims[c][1]);
        CHECK(all_equal(y, B * L * E, SENTINEL) && all_equal(dx, B * L * E, SENTINEL),
              "encoder outputs untouched (kdim %d vdim %d)", dims[c][0], dims[c][1]);
    }
    {   /* kdim = vdim = E given explicitly is the ordinary layer */
        mha_encoder_layer ly;
        memset(&ly, 0, sizeof ly);
        ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
        ly.self_attn.q_proj_weight = wq; ly.self_attn.k_proj_weight = wk;
        ly.self_attn.v_proj_weight = wv; ly.self_attn.out_proj_weight = wo;
        ly.self_attn.kdim = ly.self_attn.vdim = E;
        ly.dim_feedforward = F;
        ly.linear1_weight = w1; ly.linear2_weight = w2;
        ly.norm1_weight = n1; ly.norm2_weight = n2;
        CHECK(mha_encoder_forward(&ly, B, L, x, NULL, y, NULL, NULL, 0) == MHA_OK, "kdim = vdim = E runs");
    }
    free(wq); free(wk); free(wv); free(wo); free(w1); free(w2); free(n1); free(n2); free(x);
}

/* ---- defect 2: size products that fit size_t but not int */
static void test_int_overflow(void)
{
    static float q[4], k[4], v[4], out[4], A[4], Bm[4], C[4], wts[4];
    size_t bytes = 1;
    fill_const(out, 4, 7.0f);
    fill_const(wts, 4, 7.0f);
    /* B * H = 2^31: every tensor fits in size_t, the (b, h) count does not fit an int */
    CHECK(mha_sdpa(65536, 32768, 1, 1, 1, 1, q, k, v, NULL, out, NULL, NULL, 0) == MHA_ERR_OVERFLOW,
          "sdpa B*H = 2^31");
    CHECK(mha_sdpa(65536, 32768, 1, 1, 1, 1, q, k, v, NULL, out, wts, NULL, 0) == MHA_ERR_OVERFLOW,
          "sdpa B*H = 2^31 with weights");
    CHECK(mha_sdpa_workspace_size(65536, 32768, 1, 1, 1, 1, NULL, 0, &bytes) == MHA_ERR_OVERFLOW,
          "sdpa size B*H = 2^31");
    CHECK(mha_sdpa(1, 1, INT_MAX, 1, 1, 1, q, k, v, NULL, out, NULL, NULL, 0) == MHA_ERR_OVERFLOW,
          "sdpa Lq = INT_MAX (query tiles are counted past it)");
    CHECK(all_equal(out, 4, 7.0f) && all_equal(wts, 4, 7.0f), "sdpa outputs untouched");
    /* a GEMM dimension next to INT_MAX: its block loops would step past it */
    fill_const(C, 4, 7.0f);
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, INT_MAX, 1, 1, 1.0f, A, 1, Bm, 1, 0.0f, C, 1, NULL, 0) ==
          MHA_ERR_OVERFLOW, "gemm M = INT_MAX");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 1, 1, INT_MAX, 1.0f, A, INT_MAX, Bm, 1, 0.0f, C, 1, NULL, 0) ==
          MHA_ERR_OVERFLOW, "gemm K = INT_MAX");
    CHECK(mha_linear_forward(INT_MAX, 1, 1, A, Bm, NULL, C, NULL, 0) == MHA_ERR_OVERFLOW,
          "linear rows = INT_MAX");
    CHECK(all_equal(C, 4, 7.0f), "gemm/linear output untouched");
    {   /* a module whose B * Lq rows reach INT_MAX: the projection GEMM's M */
        mha_module m;
        memset(&m, 0, sizeof m);
        m.embed_dim = 1; m.num_heads = 1;
        m.in_proj_weight = A; m.out_proj_weight = Bm;
        CHECK(mha_forward(&m, INT_MAX, 1, 1, q, k, v, NULL, out, NULL, NULL, 0) == MHA_ERR_OVERFLOW,
              "forward B * Lq = INT_MAX");
        CHECK(mha_forward_workspace_size(&m, 1, INT_MAX, 1, NULL, 0, &bytes) == MHA_ERR_OVERFLOW,
              "forward size Lq = INT_MAX");
        CHECK(all_equal(out, 4, 7.0f), "forward output untouched");
    }
}

/* The KV cache entries (mha_kv_cache_attend, mha_forward_cached) under the
   same int audit: a capacity or query count next to INT_MAX, B*Lq rows past
   INT_MAX/2.  Only sizes are asked or refused: no tensor is that large. */
static void test_int_overflow_cache(void)
{
    static float k[4], v[4], q[4], out[4], w[8];
    int len[2] = {1, 1};
    size_t bytes = 7;
    mha_kv_cache c;
    mha_module m;
    fill_const(out, 4, 7.0f);
    memset(&c, 0, sizeof c);
    c.B = 1; c.Hkv = 1; c.D = 1; c.capacity = INT_MAX; c.k = k; c.v = v; c.len = len;
    CHECK(mha_kv_cache_attend_workspace_size(&c, 1, 1, NULL, &bytes) == MHA_ERR_OVERFLOW && bytes == 7,
          "cache capacity INT_MAX");
    CHECK(mha_kv_cache_attend(&c, 1, 1, q, NULL, out, NULL, 0) == MHA_ERR_OVERFLOW, "cache attend capacity INT_MAX");
    c.capacity = 4;
    CHECK(mha_kv_cache_attend_workspace_size(&c, 1, INT_MAX, NULL, &bytes) == MHA_ERR_OVERFLOW && bytes == 7,
          "cache attend Lq INT_MAX");
    CHECK(all_equal(out, 4, 7.0f), "cache attend output untouched");
    /* mha_forward_cached: B * Lq = 2^31 - 2 rows fits an int but not the GEMM's loops */
    memset(&m, 0, sizeof m);
    m.embed_dim = 1; m.num_heads = 1; m.in_proj_weight = w; m.out_proj_weight = w;
    c.B = 2; c.capacity = (1 << 30) - 1; len[0] = len[1] = 0;
    CHECK(mha_forward_cached_workspace_size(&m, &c, (1 << 30) - 1, NULL, &bytes) == MHA_ERR_OVERFLOW &&
          bytes == 7, "forward_cached B*Lq = 2^31 - 2");
}

/* ---- defect 3: out == query gives the out-of-place result on every path */
typedef struct { int B, Lq, Lk, E, H, bias_kv, zero_attn, self; } alias_case;

static void test_in_place_module(void)
{
    /* threshold 4096 floats: B (Lq + 2 Lk') E below it is the normal path, above it by head */
    static const alias_case cases[] = {
        {2, 3, 3, 16, 2, 0, 0, 1},     /* normal path, self-attention */
        {1, 5, 7, 8, 2, 1, 1, 0},      /* normal path, cross, appended keys */
        {2, 50, 50, 16, 2, 0, 0, 1},   /* by head, self-attention */
        {1, 8, 300, 12, 3, 0, 0, 0},   /* by head, short queries, long keys (the report's shape) */
        {3, 17, 33, 16, 4, 1, 1, 0},   /* by head, cross, bias_k and a zero key */
        {2, 33, 33, 24, 3, 1, 0, 1},   /* by head, self, bias_k */
    };
    size_t c;
    for (c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        const alias_case *t = &cases[c];
        int B = t->B, Lq = t->Lq, Lk = t->self ? t->Lq : t->Lk, E = t->E;
        size_t nq = (size_t)B * Lq * E, nk = (size_t)B * Lk * E;
        tu_rng r = {100 + c};
        mha_module m;
        float *w_in = frand(&r, 3 * (size_t)E * E, 0.4f), *b_in = frand(&r, 3 * (size_t)E, 0.2f);
        float *w_out = frand(&r, (size_t)E * E, 0.4f), *b_out = frand(&r, (size_t)E, 0.2f);
        float *bk = frand(&r, (size_t)E, 0.5f), *bv = frand(&r, (size_t)E, 0.5f);
        float *xq = frand(&r, nq, 1.0f), *xk = frand(&r, nk, 1.0f), *xv = frand(&r, nk, 1.0f);
        float *ref = (float *)malloc(nq * sizeof(float)), *buf = (float *)malloc(nq * sizeof(float));
        float *kbuf = (float *)malloc(nk * sizeof(float));
        double big = (double)B * (Lq + 2.0 * (Lk + t->bias_kv + t->zero_attn)) * E;
        memset(&m, 0, sizeof m);
        m.embed_dim = E; m.num_heads = t->H;
        m.in_proj_weight = w_in; m.in_proj_bias = b_in;
        m.out_proj_weight = w_out; m.out_proj_bias = b_out;
        if (t->bias_kv) { m.bias_k = bk; m.bias_v = bv; }
        m.add_zero_attn = t->zero_attn;
        printf("NOTE in-place case %d: %s path\n", (int)c, big >= 4096 ? "by-head" : "normal");
        if (t->self) {
            /* out = x = query = key = value */
            CHECK(mha_forward(&m, B, Lq, Lq, xq, xq, xq, NULL, ref, NULL, NULL, 0) == MHA_OK, "ref");
            memcpy(buf, xq, nq * sizeof(float));
            CHECK(mha_forward(&m, B, Lq, Lq, buf, buf, buf, NULL, buf, NULL, NULL, 0) == MHA_OK, "in place");
            CHECK(memcmp(buf, ref, nq * sizeof(float)) == 0,
                  "case %d: self-attention in place differs by rel %.3g", (int)c, tu_rel_err_ff(buf, ref, nq));
        } else {
            CHECK(mha_forward(&m, B, Lq, Lk, xq, xk, xv, NULL, ref, NULL, NULL, 0) == MHA_OK, "ref");
            memcpy(buf, xq, nq * sizeof(float));
            CHECK(mha_forward(&m, B, Lq, Lk, buf, xk, xv, NULL, buf, NULL, NULL, 0) == MHA_OK, "in place");
            CHECK(memcmp(buf, ref, nq * sizeof(float)) == 0,
                  "case %d: out == query differs by rel %.3g", (int)c, tu_rel_err_ff(buf, ref, nq));
            if (nk >= nq) {   /* out == key: out covers the first nq floats of the key buffer */
                memcpy(kbuf, xk, nk * sizeof(float));
                CHECK(mha_forward(&m, B, Lq, Lk, xq, kbuf, xv, NULL, kbuf, NULL, NULL, 0) == MHA_OK, "out=key");
                CHECK(memcmp(kbuf, ref, nq * sizeof(float)) == 0,
                      "case %d: out == key differs by rel %.3g", (int)c, tu_rel_err_ff(kbuf, ref, nq));
            }
        }
        free(w_in); free(b_in); free(w_out); free(b_out); free(bk); free(bv);
        free(xq); free(xk); free(xv); free(ref); free(buf); free(kbuf);
    }
}

/* SDPA: out may be q (D == Dv), fused and with weights */
static void test_in_place_sdpa(void)
{
    enum { B = 2, H = 3, Lq = 70, Lk = 45, D = 8 };
    size_t nq = (size_t)B * H * Lq * D, nk = (size_t)B * H * Lk * D;
    tu_rng r = {7};
    float *q = frand(&r, nq, 1.0f), *k = frand(&r, nk, 1.0f), *v = frand(&r, nk, 1.0f);
    float *ref = (float *)malloc(nq * sizeof(float)), *buf = (float *)malloc(nq * sizeof(float));
    float *w = (float *)malloc((size_t)B * H * Lq * Lk * sizeof(float));
    mha_options o;
    int weights;
    memset(&o, 0, sizeof o);
    o.causal = 1;
    for (weights = 0; weights < 2; ++weights) {
        CHECK(mha_sdpa(B, H, Lq, Lk, D, D, q, k, v, &o, ref, weights ? w : NULL, NULL, 0) == MHA_OK, "ref");
        memcpy(buf, q, nq * sizeof(float));
        CHECK(mha_sdpa(B, H, Lq, Lk, D, D, buf, k, v, &o, buf, weights ? w : NULL, NULL, 0) == MHA_OK, "in place");
        CHECK(memcmp(buf, ref, nq * sizeof(float)) == 0, "sdpa out == q (weights %d) rel %.3g", weights,
              tu_rel_err_ff(buf, ref, nq));
    }
    free(q); free(k); free(v); free(ref); free(buf); free(w);
}

/* ---- defect 4: a workspace at any byte address works (the sizes include the slack) */
static unsigned char *odd_ws(size_t bytes, unsigned char **base)
{
    *base = (unsigned char *)malloc(bytes + 1);
    return *base + 1;
}

static void test_misaligned_workspace(void)
{
    enum { B = 2, H = 2, L = 9, E = 8, F = 12 };
    tu_rng r = {5};
    size_t n = (size_t)B * L * E, bytes;
    float *x = frand(&r, n, 1.0f), *w_in = frand(&r, 3 * E * E, 0.4f), *w_out = frand(&r, E * E, 0.4f);
    float *w1 = frand(&r, F * E, 0.4f), *w2 = frand(&r, E * F, 0.4f), *dy = frand(&r, n, 1.0f);
    float *ref = (float *)malloc(n * sizeof(float)), *got = (float *)malloc(n * sizeof(float));
    size_t nw = (size_t)B * H * L * L;   /* SDPA weights are per head */
    float *wref = (float *)malloc(nw * sizeof(float)), *wgot = (float *)malloc(nw * sizeof(float));
    float *gref = (float *)calloc(n, sizeof(float)), *ggot = (float *)calloc(n, sizeof(float));
    unsigned char *base, *ws;
    mha_module m;
    mha_encoder_layer ly;
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H; m.in_proj_weight = w_in; m.out_proj_weight = w_out;

    /* GEMM: C [B*L, E] = X W^T */
    bytes = mha_gemm_workspace_size(B * L, E, E);
    ws = odd_ws(bytes, &base);
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_TRANS, B * L, E, E, 1.0f, x, E, w_in, E, 0.0f, ref, E, NULL, 0) == MHA_OK, "gemm");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_TRANS, B * L, E, E, 1.0f, x, E, w_in, E, 0.0f, got, E, ws, bytes) == MHA_OK,
          "gemm, workspace at an odd address");
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "gemm result");
    free(base);

    /* SDPA with and without weights ([B, H, L, D] with D = E / H) */
    CHECK(mha_sdpa_workspace_size(B, H, L, L, E / H, E / H, NULL, 1, &bytes) == MHA_OK, "sdpa size");
    ws = odd_ws(bytes, &base);
    CHECK(mha_sdpa(B, H, L, L, E / H, E / H, x, x, x, NULL, ref, wref, NULL, 0) == MHA_OK, "sdpa");
    CHECK(mha_sdpa(B, H, L, L, E / H, E / H, x, x, x, NULL, got, wgot, ws, bytes) == MHA_OK, "sdpa odd ws");
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0 && memcmp(wref, wgot, nw * sizeof(float)) == 0,
          "sdpa result");
    free(base);
    CHECK(mha_sdpa_backward_workspace_size(B, H, L, L, E / H, E / H, NULL, &bytes) == MHA_OK, "sdpa bwd size");
    ws = odd_ws(bytes, &base);
    CHECK(mha_sdpa_backward(B, H, L, L, E / H, E / H, x, x, x, dy, NULL, gref, NULL, NULL, NULL, 0) == MHA_OK, "sdpa bwd");
    CHECK(mha_sdpa_backward(B, H, L, L, E / H, E / H, x, x, x, dy, NULL, ggot, NULL, NULL, ws, bytes) == MHA_OK,
          "sdpa bwd odd ws");
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "sdpa backward result");
    free(base);

    /* module forward (fused, and with weights) and backward */
    CHECK(mha_forward_workspace_size(&m, B, L, L, NULL, 1, &bytes) == MHA_OK, "forward size");
    ws = odd_ws(bytes, &base);
    CHECK(mha_forward(&m, B, L, L, x, x, x, NULL, ref, wref, NULL, 0) == MHA_OK, "forward");
    CHECK(mha_forward(&m, B, L, L, x, x, x, NULL, got, wgot, ws, bytes) == MHA_OK, "forward odd ws");
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "forward result (weights)");
    free(base);
    CHECK(mha_forward_workspace_size(&m, B, L, L, NULL, 0, &bytes) == MHA_OK, "forward size");
    ws = odd_ws(bytes, &base);
    CHECK(mha_forward(&m, B, L, L, x, x, x, NULL, got, NULL, ws, bytes) == MHA_OK, "fused forward odd ws");
    CHECK(tu_rel_err_ff(got, ref, n) < 1e-5, "fused forward result");
    free(base);
    CHECK(mha_backward_workspace_size(&m, B, L, L, NULL, &bytes) == MHA_OK, "backward size");
    ws = odd_ws(bytes, &base);
    memset(gref, 0, n * sizeof(float)); memset(ggot, 0, n * sizeof(float));
    CHECK(mha_backward(&m, B, L, L, x, x, x, dy, NULL, gref, NULL, NULL, NULL, NULL, 0) == MHA_OK, "backward");
    CHECK(mha_backward(&m, B, L, L, x, x, x, dy, NULL, ggot, NULL, NULL, NULL, ws, bytes) == MHA_OK, "backward odd ws");
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "backward result");
    free(base);

    /* Linear forward and backward */
    bytes = mha_linear_workspace_size(B * L, E, E);
    ws = odd_ws(bytes, &base);
    CHECK(mha_linear_forward(B * L, E, E, x, w_out, NULL, ref, NULL, 0) == MHA_OK, "linear");
    CHECK(mha_linear_forward(B * L, E, E, x, w_out, NULL, got, ws, bytes) == MHA_OK, "linear odd ws");
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "linear result");
    memset(gref, 0, n * sizeof(float)); memset(ggot, 0, n * sizeof(float));
    CHECK(mha_linear_backward(B * L, E, E, x, w_out, dy, gref, NULL, NULL, NULL, 0) == MHA_OK, "linear bwd");
    CHECK(mha_linear_backward(B * L, E, E, x, w_out, dy, ggot, NULL, NULL, ws, bytes) == MHA_OK, "linear bwd odd ws");
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "linear backward result");
    free(base);

    /* encoder layer forward and backward */
    memset(&ly, 0, sizeof ly);
    ly.self_attn = m;
    ly.dim_feedforward = F; ly.linear1_weight = w1; ly.linear2_weight = w2;
    CHECK(mha_encoder_workspace_size(&ly, B, L, NULL, &bytes) == MHA_OK, "encoder size");
    ws = odd_ws(bytes, &base);
    CHECK(mha_encoder_forward(&ly, B, L, x, NULL, ref, NULL, NULL, 0) == MHA_OK, "encoder");
    CHECK(mha_encoder_forward(&ly, B, L, x, NULL, got, NULL, ws, bytes) == MHA_OK, "encoder odd ws");
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "encoder result");
    memset(gref, 0, n * sizeof(float)); memset(ggot, 0, n * sizeof(float));
    CHECK(mha_encoder_backward(&ly, B, L, x, NULL, dy, gref, NULL, NULL, 0) == MHA_OK, "encoder bwd");
    CHECK(mha_encoder_backward(&ly, B, L, x, NULL, dy, ggot, NULL, ws, bytes) == MHA_OK, "encoder bwd odd ws");
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "encoder backward result");
    free(base);

    free(x); free(w_in); free(w_out); free(w1); free(w2); free(dy);
    free(ref); free(got); free(wref); free(wgot); free(gref); free(ggot);
}

/* ---- cross-entropy with every target ignored: documented as loss 0 and a
   zero gradient (PyTorch's mean over no rows is NaN) */
static void test_xent_all_ignored(void)
{
    float z[6] = {1, 2, 3, -1, 0, 1}, dz[6], loss = SENTINEL;
    int t[2] = {-100, -1}, correct = -5;
    fill_const(dz, 6, SENTINEL);
    CHECK(mha_cross_entropy(2, 3, z, t, &loss, dz, &correct) == MHA_OK, "all ignored: call");
    CHECK(loss == 0.0f && all_equal(dz, 6, 0.0f) && correct == 0, "all ignored: loss %g, correct %d", loss, correct);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);   /* every line out before a crash */
    test_encoder_kdim();
    test_int_overflow();
    test_int_overflow_cache();
    test_in_place_module();
    test_in_place_sdpa();
    test_misaligned_workspace();
    test_xent_all_ignored();
    return tu_finish("defects");
}
