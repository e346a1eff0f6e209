/* test_defects.c - regressions for the defects adversarial probes found.
   Issue 13: an encoder layer whose self-attention has kdim/vdim != E, size
   products that overflow an int, in-place out == query on the head-by-head
   path, a workspace at an odd byte address, and the documented result of a
   cross-entropy whose targets are all ignored.  Issue 18, defects 4-7: a
   position past INT_MAX (offset + Lk, offset + len[b] + i) is refused, not
   overflowed; an SDPA run over a cache with more queries than a row holds
   is refused; causal_align outside its enum is refused with causal = 0 too;
   a NaN lse makes a merged row NaN, so a NaN query gives NaN through a
   rolling cache as through a plain one.  Each failing call must leave its
   outputs untouched (tests/errcheck.h). */
#include <stdlib.h>
#include <string.h>
#include <limits.h>

/* A low head-by-head threshold, so that the long-sequence path is taken at
   test sizes (B (Lq + 2 Lk') E >= 4096 floats). */
#define MHA__BY_HEAD_FLOATS ((size_t)4096)
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "errcheck.h"

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
static mha_run ws_run(void *ws, size_t n)
{
    mha_run r;
    memset(&r, 0, sizeof r);
    r.workspace = ws; r.workspace_bytes = n;
    return r;
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
    mha_sizes sz;
    mha_error e;
    size_t c;
    fill_const(dy, B * L * E, 0.5f);
    ec_watch(y, sizeof y, 1);
    ec_watch(dx, sizeof dx, 1);
    for (c = 0; c < sizeof dims / sizeof dims[0]; ++c) {
        mha_encoder_layer ly;
        const char *field = dims[c][0] != E ? "layer->self_attn.kdim" : "layer->self_attn.vdim";
        memset(&ly, 0, sizeof ly);
        ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
        ly.self_attn.q_proj_weight = wq; ly.self_attn.k_proj_weight = wk;
        ly.self_attn.v_proj_weight = wv; ly.self_attn.out_proj_weight = wo;
        ly.self_attn.kdim = dims[c][0]; ly.self_attn.vdim = dims[c][1];
        ly.dim_feedforward = F;
        ly.linear1_weight = w1; ly.linear2_weight = w2;
        ly.norm1_weight = n1; ly.norm2_weight = n2;
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_plan_size", field,
                  mha_encoder_plan_size(&ly, B, L, NULL, MHA_PLAN_TRAINING, &sz, ERR));
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_forward", field,
                  mha_encoder_forward(&ly, B, L, x, NULL, y, NULL, ERR));
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_backward", field,
                  mha_encoder_backward(&ly, B, L, x, dy, NULL, dx, NULL, NULL, ERR));
    }
    ec_clear();
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
        CHECK(mha_encoder_forward(&ly, B, L, x, NULL, y, NULL, &e) == MHA_OK, "kdim = vdim = E runs: %s", e.message);
    }
    free(wq); free(wk); free(wv); free(wo); free(w1); free(w2); free(n1); free(n2); free(x);
}

/* ---- defect 2: size products that fit size_t but not int */
static void test_int_overflow(void)
{
    static float q[4], k[4], v[4], out[4], A[4], Bm[4], C[4], wts[4];
    mha_sizes sz;
    mha_run wr;
    memset(&wr, 0, sizeof wr);
    wr.weights = wts;
    ec_watch(out, sizeof out, 1);
    ec_watch(wts, sizeof wts, 1);
    ec_watch(C, sizeof C, 1);
    /* B * H = 2^31: every tensor fits in size_t, the (b, h) count does not fit an int */
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_forward", NULL,
              mha_sdpa_forward(65536, 32768, 1, 1, 1, 1, q, k, v, NULL, out, NULL, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_forward", NULL,   /* with weights */
              mha_sdpa_forward(65536, 32768, 1, 1, 1, 1, q, k, v, NULL, out, &wr, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_plan_size", NULL,
              mha_sdpa_plan_size(65536, 32768, 1, 1, 1, 1, NULL, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_forward", NULL,   /* query tiles are counted past Lq */
              mha_sdpa_forward(1, 1, INT_MAX, 1, 1, 1, q, k, v, NULL, out, NULL, ERR));
    /* a GEMM dimension next to INT_MAX: its block loops would step past it */
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_gemm", "M",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, INT_MAX, 1, 1, 1.0f, A, 1, Bm, 1, 0.0f, C, 1, NULL, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_gemm", NULL,
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 1, 1, INT_MAX, 1.0f, A, INT_MAX, Bm, 1, 0.0f, C, 1, NULL, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_linear_forward", "rows",
              mha_linear_forward(INT_MAX, 1, 1, A, Bm, NULL, C, NULL, ERR));
    {   /* a module whose B * Lq rows reach INT_MAX: the projection GEMM's M */
        mha_module m;
        memset(&m, 0, sizeof m);
        m.embed_dim = 1; m.num_heads = 1;
        m.in_proj_weight = A; m.out_proj_weight = Bm;
        EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_forward", NULL,
                  mha_module_forward(&m, INT_MAX, 1, 1, q, k, v, NULL, out, NULL, ERR));
        EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_plan_size", NULL,
                  mha_module_plan_size(&m, 1, INT_MAX, 1, NULL, 0, &sz, ERR));
    }
    ec_clear();
}

/* The KV cache under the same int audit: a capacity or query count next
   to INT_MAX, B*Lq rows past INT_MAX/2.  Only sizes are asked or refused:
   no tensor is that large. */
static void test_int_overflow_cache(void)
{
    static float k[4], v[4], q[4], out[4], w[8];
    int len[2] = {1, 1};
    mha_sizes sz = {7, 7, 7};
    mha_kv_cache c;
    mha_module m;
    mha_run r;
    memset(&c, 0, sizeof c);
    memset(&r, 0, sizeof r);
    c.B = 1; c.Hkv = 1; c.D = 1; c.capacity = INT_MAX; c.k = k; c.v = v; c.len = len;
    r.cache = &c;
    ec_watch(out, sizeof out, 1);
    ec_watch(&sz, sizeof sz, 0);
    ec_watch(len, sizeof len, 0);
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_plan_size", NULL,   /* a plan for a cache of capacity INT_MAX */
              mha_sdpa_plan_size(1, 1, 1, INT_MAX, 1, 1, NULL, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_forward", "cache->capacity",
              mha_sdpa_forward(1, 1, 1, 0, 1, 1, q, NULL, NULL, NULL, out, &r, ERR));
    c.capacity = 4;
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_plan_size", NULL,   /* Lq INT_MAX over a cache */
              mha_sdpa_plan_size(1, 1, INT_MAX, c.capacity, 1, 1, NULL, 0, &sz, ERR));
    /* a module's decoding plan: B * Lq = 2^31 - 2 rows fit an int but not the GEMM's loops */
    memset(&m, 0, sizeof m);
    m.embed_dim = 1; m.num_heads = 1; m.in_proj_weight = w; m.out_proj_weight = w;
    c.B = 2; c.capacity = (1 << 30) - 1; len[0] = len[1] = 0;
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_plan_size", NULL,
              mha_module_plan_size(&m, c.B, (1 << 30) - 1, c.capacity, NULL, 0, &sz, ERR));
    ec_clear();
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
            CHECK(mha_module_forward(&m, B, Lq, Lq, xq, xq, xq, NULL, ref, NULL, NULL) == MHA_OK, "ref");
            memcpy(buf, xq, nq * sizeof(float));
            CHECK(mha_module_forward(&m, B, Lq, Lq, buf, buf, buf, NULL, buf, NULL, NULL) == MHA_OK, "in place");
            CHECK(memcmp(buf, ref, nq * sizeof(float)) == 0,
                  "case %d: self-attention in place differs by rel %.3g", (int)c, tu_rel_err_ff(buf, ref, nq));
        } else {
            CHECK(mha_module_forward(&m, B, Lq, Lk, xq, xk, xv, NULL, ref, NULL, NULL) == MHA_OK, "ref");
            memcpy(buf, xq, nq * sizeof(float));
            CHECK(mha_module_forward(&m, B, Lq, Lk, buf, xk, xv, NULL, buf, NULL, NULL) == MHA_OK, "in place");
            CHECK(memcmp(buf, ref, nq * sizeof(float)) == 0,
                  "case %d: out == query differs by rel %.3g", (int)c, tu_rel_err_ff(buf, ref, nq));
            if (nk >= nq) {   /* out == key: out covers the first nq floats of the key buffer */
                memcpy(kbuf, xk, nk * sizeof(float));
                CHECK(mha_module_forward(&m, B, Lq, Lk, xq, kbuf, xv, NULL, kbuf, NULL, NULL) == MHA_OK, "out=key");
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
    mha_run run;
    int weights;
    memset(&o, 0, sizeof o);
    memset(&run, 0, sizeof run);
    o.causal = 1;
    for (weights = 0; weights < 2; ++weights) {
        run.weights = weights ? w : NULL;
        CHECK(mha_sdpa_forward(B, H, Lq, Lk, D, D, q, k, v, &o, ref, &run, NULL) == MHA_OK, "ref");
        memcpy(buf, q, nq * sizeof(float));
        CHECK(mha_sdpa_forward(B, H, Lq, Lk, D, D, buf, k, v, &o, buf, &run, NULL) == MHA_OK, "in place");
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
    mha_sizes sz;
    mha_run run, wrun;
    mha_error e;
    memset(&m, 0, sizeof m);
    memset(&wrun, 0, sizeof wrun);
    m.embed_dim = E; m.num_heads = H; m.in_proj_weight = w_in; m.out_proj_weight = w_out;

    /* GEMM: C [B*L, E] = X W^T */
    CHECK(mha_gemm_plan_size(MHA_NO_TRANS, MHA_TRANS, B * L, E, E, 0, &sz, &e) == MHA_OK, "gemm size: %s", e.message);
    ws = odd_ws(sz.workspace, &base);
    run = ws_run(ws, sz.workspace);
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_TRANS, B * L, E, E, 1.0f, x, E, w_in, E, 0.0f, ref, E, NULL, NULL) == MHA_OK, "gemm");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_TRANS, B * L, E, E, 1.0f, x, E, w_in, E, 0.0f, got, E, &run, &e) == MHA_OK,
          "gemm, workspace at an odd address: %s", e.message);
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "gemm result");
    free(base);

    /* SDPA with weights ([B, H, L, D] with D = E / H) */
    CHECK(mha_sdpa_plan_size(B, H, L, L, E / H, E / H, NULL, MHA_PLAN_WEIGHTS, &sz, &e) == MHA_OK, "sdpa size");
    ws = odd_ws(sz.workspace, &base);
    run = ws_run(ws, sz.workspace);
    wrun.weights = wref;
    run.weights = wgot;
    CHECK(mha_sdpa_forward(B, H, L, L, E / H, E / H, x, x, x, NULL, ref, &wrun, NULL) == MHA_OK, "sdpa");
    CHECK(mha_sdpa_forward(B, H, L, L, E / H, E / H, x, x, x, NULL, got, &run, &e) == MHA_OK, "sdpa odd ws: %s",
          e.message);
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0 && memcmp(wref, wgot, nw * sizeof(float)) == 0,
          "sdpa result");
    free(base);
    CHECK(mha_sdpa_plan_size(B, H, L, L, E / H, E / H, NULL, MHA_PLAN_TRAINING, &sz, &e) == MHA_OK, "sdpa bwd size");
    ws = odd_ws(sz.workspace, &base);
    run = ws_run(ws, sz.workspace);
    CHECK(mha_sdpa_backward(B, H, L, L, E / H, E / H, x, x, x, dy, NULL, gref, NULL, NULL, NULL, NULL) == MHA_OK,
          "sdpa bwd");
    CHECK(mha_sdpa_backward(B, H, L, L, E / H, E / H, x, x, x, dy, NULL, ggot, NULL, NULL, &run, &e) == MHA_OK,
          "sdpa bwd odd ws: %s", e.message);
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "sdpa backward result");
    free(base);

    /* module forward (with weights, and fused) and backward */
    CHECK(mha_module_plan_size(&m, B, L, L, NULL, MHA_PLAN_WEIGHTS, &sz, &e) == MHA_OK, "forward size");
    ws = odd_ws(sz.workspace, &base);
    run = ws_run(ws, sz.workspace);
    wrun.weights = wref;
    run.weights = wgot;
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, NULL, ref, &wrun, NULL) == MHA_OK, "forward");
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, NULL, got, &run, &e) == MHA_OK, "forward odd ws: %s", e.message);
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "forward result (weights)");
    free(base);
    CHECK(mha_module_plan_size(&m, B, L, L, NULL, 0, &sz, &e) == MHA_OK, "forward size");
    ws = odd_ws(sz.workspace, &base);
    run = ws_run(ws, sz.workspace);
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, NULL, got, &run, &e) == MHA_OK, "fused forward odd ws: %s",
          e.message);
    CHECK(tu_rel_err_ff(got, ref, n) < 1e-5, "fused forward result");
    free(base);
    CHECK(mha_module_plan_size(&m, B, L, L, NULL, MHA_PLAN_TRAINING, &sz, &e) == MHA_OK, "backward size");
    ws = odd_ws(sz.workspace, &base);
    run = ws_run(ws, sz.workspace);
    memset(gref, 0, n * sizeof(float)); memset(ggot, 0, n * sizeof(float));
    CHECK(mha_module_backward(&m, B, L, L, x, x, x, dy, NULL, gref, NULL, NULL, NULL, NULL, NULL) == MHA_OK,
          "backward");
    CHECK(mha_module_backward(&m, B, L, L, x, x, x, dy, NULL, ggot, NULL, NULL, NULL, &run, &e) == MHA_OK,
          "backward odd ws: %s", e.message);
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "backward result");
    free(base);

    /* Linear forward and backward */
    CHECK(mha_linear_workspace_size(B * L, E, E, &bytes, &e) == MHA_OK, "linear size: %s", e.message);
    ws = odd_ws(bytes, &base);
    run = ws_run(ws, bytes);
    CHECK(mha_linear_forward(B * L, E, E, x, w_out, NULL, ref, NULL, NULL) == MHA_OK, "linear");
    CHECK(mha_linear_forward(B * L, E, E, x, w_out, NULL, got, &run, &e) == MHA_OK, "linear odd ws: %s", e.message);
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "linear result");
    memset(gref, 0, n * sizeof(float)); memset(ggot, 0, n * sizeof(float));
    CHECK(mha_linear_backward(B * L, E, E, x, w_out, dy, gref, NULL, NULL, NULL, NULL) == MHA_OK, "linear bwd");
    CHECK(mha_linear_backward(B * L, E, E, x, w_out, dy, ggot, NULL, NULL, &run, &e) == MHA_OK,
          "linear bwd odd ws: %s", e.message);
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "linear backward result");
    free(base);

    /* encoder layer forward and backward */
    memset(&ly, 0, sizeof ly);
    ly.self_attn = m;
    ly.dim_feedforward = F; ly.linear1_weight = w1; ly.linear2_weight = w2;
    CHECK(mha_encoder_plan_size(&ly, B, L, NULL, MHA_PLAN_TRAINING, &sz, &e) == MHA_OK, "encoder size: %s", e.message);
    ws = odd_ws(sz.workspace, &base);
    run = ws_run(ws, sz.workspace);
    CHECK(mha_encoder_forward(&ly, B, L, x, NULL, ref, NULL, NULL) == MHA_OK, "encoder");
    CHECK(mha_encoder_forward(&ly, B, L, x, NULL, got, &run, &e) == MHA_OK, "encoder odd ws: %s", e.message);
    CHECK(memcmp(ref, got, n * sizeof(float)) == 0, "encoder result");
    memset(gref, 0, n * sizeof(float)); memset(ggot, 0, n * sizeof(float));
    CHECK(mha_encoder_backward(&ly, B, L, x, dy, NULL, gref, NULL, NULL, NULL) == MHA_OK, "encoder bwd");
    CHECK(mha_encoder_backward(&ly, B, L, x, dy, NULL, ggot, NULL, &run, &e) == MHA_OK, "encoder bwd odd ws: %s",
          e.message);
    CHECK(memcmp(gref, ggot, n * sizeof(float)) == 0, "encoder backward result");
    free(base);
    /* a saved forward at an odd address too */
    {
        void *sv;
        mha_plan *p = NULL;
        CHECK(mha_module_plan(&m, B, L, L, NULL, MHA_PLAN_TRAINING, NULL, 0, &p, &e) == MHA_OK &&
              mha_plan_sizes(p, &sz, &e) == MHA_OK, "training plan: %s", e.message);
        sv = odd_ws(sz.saved, &base);
        run = ws_run(NULL, 0);
        run.saved = sv; run.saved_bytes = sz.saved;
        memset(gref, 0, n * sizeof(float)); memset(ggot, 0, n * sizeof(float));
        CHECK(mha_module_backward(&m, B, L, L, x, x, x, dy, NULL, gref, NULL, NULL, NULL, NULL, NULL) == MHA_OK,
              "backward");
        CHECK(mha_module_run_forward(p, L, L, x, x, x, got, &run, &e) == MHA_OK &&
              mha_module_run_backward(p, L, L, x, x, x, dy, ggot, NULL, NULL, NULL, &run, &e) == MHA_OK,
              "saved forward at an odd address: %s", e.message);
        CHECK(tu_rel_err_ff(ggot, gref, n) < 1e-5, "backward from a saved forward at an odd address: rel %.3g",
              tu_rel_err_ff(ggot, gref, n));
        free(base);
        mha_plan_destroy(p);
    }

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
    CHECK(mha_cross_entropy(2, 3, z, t, &loss, dz, &correct, NULL) == MHA_OK, "all ignored: call");
    CHECK(loss == 0.0f && all_equal(dz, 6, 0.0f) && correct == 0, "all ignored: loss %g, correct %d", loss, correct);
}

/* ================================================== issue 18, defects 4-7 */

/* A module for decoding: self-attention with RoPE (positions matter), E 8, 2 heads. */
typedef struct { mha_module m; float w_in[3 * 8 * 8], w_out[8 * 8]; } dec_module;
static void make_dec(dec_module *d)
{
    tu_rng r = {77};
    memset(&d->m, 0, sizeof d->m);
    tu_fill(&r, d->w_in, sizeof d->w_in / sizeof d->w_in[0], 0.4f);
    tu_fill(&r, d->w_out, sizeof d->w_out / sizeof d->w_out[0], 0.4f);
    d->m.embed_dim = 8; d->m.num_heads = 2;
    d->m.in_proj_weight = d->w_in; d->m.out_proj_weight = d->w_out;
    d->m.rope.kind = MHA_ROPE_HALF;
}

static int all_finite(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) if (!isfinite(x[i])) return 0;
    return 1;
}

/* Defect 4: position_offset + len[b] + i and position_offset + (Lk - Lq)
   were int sums with only offset >= 0 checked (UBSan: 2147483645 + 3).  A
   position past INT_MAX is MHA_ERR_OVERFLOW naming the field that pushed
   it there; every position up to INT_MAX still runs (the sanitize
   configuration runs this file under UBSan). */
static void test_position_overflow(void)
{
    enum { E = 8, CAP = 8 };
    dec_module d;
    mha_options o;
    mha_sizes sz;
    mha_kv_cache c;
    mha_run r;
    mha_error e;
    mha_plan *p = NULL;
    tu_rng rng = {19};
    float x[2 * 5 * E], out[2 * 5 * E], kc[CAP * E], vc[CAP * E], q[2 * 2 * 4];
    int len[1];
    make_dec(&d);
    tu_fill(&rng, x, sizeof x / sizeof x[0], 1.0f);
    tu_fill(&rng, kc, sizeof kc / sizeof kc[0], 1.0f);
    tu_fill(&rng, vc, sizeof vc / sizeof vc[0], 1.0f);
    tu_fill(&rng, q, sizeof q / sizeof q[0], 1.0f);
    memset(&o, 0, sizeof o);
    ec_watch(out, sizeof out, 1);

    /* the plan: key j sits at offset + j, so offset + Lk must fit an int
       (0.1 computed offset + (Lk - Lq) = 2147483645 + 3 here: UBSan) */
    o.position_offset = INT_MAX - 2;
    o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_forward", "opt->position_offset",
              mha_module_forward(&d.m, 2, 2, 5, x, x, x, &o, out, NULL, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_plan_size", "opt->position_offset",
              mha_module_plan_size(&d.m, 1, 1, CAP, &o, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_forward", "opt->position_offset",
              mha_sdpa_forward(1, 2, 2, 5, 4, 4, q, x, x, &o, out, NULL, ERR));
    o.position_offset = INT_MAX;
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_forward", "opt->position_offset",
              mha_module_forward(&d.m, 1, 1, 1, x, x, x, &o, out, NULL, ERR));
    /* the last position exactly INT_MAX - 1 (offset + Lk = INT_MAX) runs */
    o.position_offset = INT_MAX - 5;
    CHECK(mha_module_forward(&d.m, 2, 5, 5, x, x, x, &o, out, NULL, &e) == MHA_OK && all_finite(out, 2 * 5 * E),
          "offset + Lk = INT_MAX runs: %s", e.message);

    /* over a cache: the plan asks offset + capacity to fit; a rolling
       cache's len counts every token appended, so len can carry the
       position past INT_MAX on its own */
    memset(&c, 0, sizeof c);
    c.B = 1; c.Hkv = 2; c.D = 4; c.capacity = CAP / 2; c.k = kc; c.v = vc; c.len = len;
    c.ring = 1;
    o.position_offset = 1000;
    CHECK(mha_module_plan(&d.m, 1, 2, c.capacity, &o, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &p, &e) == MHA_OK,
          "plan: %s", e.message);
    memset(&r, 0, sizeof r);
    r.cache = &c;
    len[0] = INT_MAX - 1000 - 1;   /* the next two tokens would sit at INT_MAX - 1 and INT_MAX */
    ec_watch(len, sizeof len, 0);
    ec_watch(kc, sizeof kc, 0);
    ec_watch(vc, sizeof vc, 0);
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_run_forward", "cache->len",
              mha_module_run_forward(p, 2, 0, x, NULL, NULL, out, &r, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_forward", "cache->len",
              mha_module_forward(&d.m, 1, 2, 0, x, NULL, NULL, &o, out, &r, ERR));
    ec_clear();
    /* one token: its position offset + len = INT_MAX - 1 fits, and runs */
    CHECK(mha_module_run_forward(p, 1, 0, x, NULL, NULL, out, &r, &e) == MHA_OK && all_finite(out, E) &&
          len[0] == INT_MAX - 1000, "a token at position INT_MAX - 1 runs: %s", e.message);
    /* then the row is at its last position: one more token is refused */
    ec_watch(out, sizeof out, 1);
    ec_watch(len, sizeof len, 0);
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_run_forward", "cache->len",
              mha_module_run_forward(p, 1, 0, x, NULL, NULL, out, &r, ERR));
    /* appending past INT_MAX tokens: the count itself */
    len[0] = INT_MAX - 1;
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_kv_cache_append", "cache->len", mha_kv_cache_append(&c, 2, kc, vc, ERR));
    mha_plan_destroy(p);
    ec_clear();
}

/* Defect 5: an SDPA run over a plain cache with more queries than a row
   holds gave the extra queries zero output.  The queries are the newest
   Lq tokens of each row, so Lq > len[b] is MHA_ERR_CAPACITY. */
static void test_cache_too_few_tokens(void)
{
    enum { H = 2, D = 4, CAP = 6 };
    float kc[2 * CAP * D], vc[2 * CAP * D], q[2 * H * 3 * D], out[2 * H * 3 * D];
    int len[2] = {3, 1};
    mha_kv_cache c;
    mha_run r;
    mha_options o;
    mha_plan *p = NULL;
    mha_error e;
    tu_rng rng = {23};
    tu_fill(&rng, kc, sizeof kc / sizeof kc[0], 1.0f);
    tu_fill(&rng, vc, sizeof vc / sizeof vc[0], 1.0f);
    tu_fill(&rng, q, sizeof q / sizeof q[0], 1.0f);
    memset(&c, 0, sizeof c);
    c.B = 2; c.Hkv = 1; c.D = D; c.capacity = CAP; c.k = kc; c.v = vc; c.len = len;
    memset(&r, 0, sizeof r);
    r.cache = &c;
    memset(&o, 0, sizeof o);
    o.num_kv_heads = 1;
    ec_watch(out, sizeof out, 1);
    ec_watch(len, sizeof len, 0);
    /* row 1 holds one token, two queries asked */
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_sdpa_forward", "cache->len",
              mha_sdpa_forward(2, H, 2, 0, D, D, q, NULL, NULL, &o, out, &r, ERR));
    CHECK(mha_sdpa_plan(2, H, 3, CAP, D, D, &o, MHA_PLAN_CACHE, NULL, 0, &p, &e) == MHA_OK, "plan: %s", e.message);
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_sdpa_run_forward", "cache->len",
              mha_sdpa_run_forward(p, 2, 0, q, NULL, NULL, out, &r, ERR));
    len[0] = 0; len[1] = 0;   /* an empty cache holds no query at all */
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_sdpa_run_forward", "cache->len",
              mha_sdpa_run_forward(p, 1, 0, q, NULL, NULL, out, &r, ERR));
    ec_clear();
    len[0] = 3; len[1] = 1;
    CHECK(mha_sdpa_run_forward(p, 1, 0, q, NULL, NULL, out, &r, &e) == MHA_OK && all_finite(out, 2 * H * D),
          "one query per row runs: %s", e.message);
    /* a ring that wrapped holds only capacity - n_keep of the newest tokens */
    c.ring = 1; c.n_keep = 4; len[0] = len[1] = 10;
    ec_watch(out, sizeof out, 1);
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_sdpa_run_forward", "cache->capacity",
              mha_sdpa_run_forward(p, 3, 0, q, NULL, NULL, out, &r, ERR));
    ec_clear();
    mha_plan_destroy(p);
}

/* Defect 6: causal_align also places windows and ALiBi, so a value
   outside the enum is refused with causal = 0 too. */
static void test_causal_align_without_causal(void)
{
    enum { E = 8 };
    dec_module d;
    mha_options o;
    mha_sizes sz;
    mha_plan *p = NULL;
    float x[2 * 3 * E], out[2 * 3 * E];
    tu_rng rng = {29};
    make_dec(&d);
    d.m.rope.kind = MHA_ROPE_NONE;
    tu_fill(&rng, x, sizeof x / sizeof x[0], 1.0f);
    memset(&o, 0, sizeof o);
    o.causal = 0;
    o.causal_align = (mha_causal_align)7;
    ec_watch(out, sizeof out, 1);
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_sdpa_forward", "opt->causal_align",
              mha_sdpa_forward(1, 2, 3, 3, 4, 4, x, x, x, &o, out, NULL, ERR));
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_module_forward", "opt->causal_align",
              mha_module_forward(&d.m, 2, 3, 3, x, x, x, &o, out, NULL, ERR));
    o.causal_align = (mha_causal_align)-1;
    o.window = 1; o.window_left = 1; o.window_right = 0;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_module_plan_size", "opt->causal_align",
              mha_module_plan_size(&d.m, 2, 3, 3, &o, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_sdpa_plan", "opt->causal_align",
              mha_sdpa_plan(1, 2, 3, 3, 4, 4, &o, 0, NULL, 0, &p, ERR));
    CHECK(p == NULL, "no plan made");
    ec_clear();
}

/* Defect 7: mha_attn_merge took a part whose lse is NaN for "no key" (out
   0, lse -inf), so a NaN query vanished in a rolling cache (merged from
   parts) while a plain cache returned NaN.  NaN in is NaN out. */
static void test_merge_nan(void)
{
    enum { ROWS = 3, DV = 4, H = 2, D = 4 };
    float o0[ROWS * DV], o1[ROWS * DV], l0[ROWS], l1[ROWS], out[ROWS * DV], lse[ROWS];
    const float *outs[2], *lses[2];
    mha_error e;
    int i, ring;
    tu_rng rng = {31};
    tu_fill(&rng, o0, ROWS * DV, 1.0f);
    tu_fill(&rng, o1, ROWS * DV, 1.0f);
    l0[0] = 0.5f; l0[1] = NAN;       l0[2] = -INFINITY;
    l1[0] = NAN;  l1[1] = -INFINITY; l1[2] = -INFINITY;
    outs[0] = o0; outs[1] = o1; lses[0] = l0; lses[1] = l1;
    CHECK(mha_attn_merge(2, ROWS, DV, outs, lses, out, lse, &e) == MHA_OK, "merge: %s", e.message);
    for (i = 0; i < DV; ++i) {
        CHECK(isnan(out[i]) && isnan(out[DV + i]), "a NaN lse in part 1 or part 0 gives NaN out (d %d: %g, %g)", i,
              out[i], out[DV + i]);
        CHECK(out[2 * DV + i] == 0.0f, "a row with no key in any part gives 0 (d %d: %g)", i, out[2 * DV + i]);
    }
    CHECK(isnan(lse[0]) && isnan(lse[1]) && lse[2] == -INFINITY, "merged lse: %g %g %g", lse[0], lse[1], lse[2]);
    /* in place: out = outs[0], lse = lses[0] */
    CHECK(mha_attn_merge(2, ROWS, DV, outs, lses, o0, l0, &e) == MHA_OK && isnan(o0[0]) && isnan(l0[0]) &&
          isnan(o0[DV]) && isnan(l0[1]), "in place: NaN stays NaN");

    /* through a cache: a NaN in head 0's query of row 0 gives NaN in exactly
       that (row, head)'s output, plain cache and rolling cache alike (the
       rolling cache, wrapped with n_keep > 0, merges three parts) */
    for (ring = 0; ring < 2; ++ring) {
        enum { CAP = 12, T = 10 };
        float kc[CAP * D], vc[CAP * D], kn[T * D], vn[T * D], q[H * 2 * D], o[H * 2 * D], l[H * 2];
        int len[1] = {0}, bad = 0, d, h, qi;
        mha_kv_cache c;
        mha_run r;
        mha_options opt;
        memset(&c, 0, sizeof c);
        c.B = 1; c.Hkv = 1; c.D = D; c.k = kc; c.v = vc; c.len = len;
        c.capacity = ring ? 6 : CAP; c.ring = ring; c.n_keep = ring ? 2 : 0;
        tu_fill(&rng, kn, T * D, 1.0f);
        tu_fill(&rng, vn, T * D, 1.0f);
        tu_fill(&rng, q, H * 2 * D, 1.0f);
        CHECK(mha_kv_cache_append(&c, ring ? 4 : T, kn, vn, &e) == MHA_OK, "append: %s", e.message);
        if (ring) CHECK(mha_kv_cache_append(&c, 4, kn + 4 * D, vn + 4 * D, &e) == MHA_OK &&
                        mha_kv_cache_append(&c, 2, kn + 8 * D, vn + 8 * D, &e) == MHA_OK && len[0] == T,
                        "ring append: %s", e.message);
        q[1] = NAN;   /* head 0, query 0 */
        memset(&r, 0, sizeof r);
        r.cache = &c; r.lse = l;
        memset(&opt, 0, sizeof opt);
        opt.causal = 1;
        CHECK(mha_sdpa_forward(1, H, 2, 0, D, D, q, NULL, NULL, &opt, o, &r, &e) == MHA_OK, "attend: %s", e.message);
        for (h = 0; h < H; ++h)
            for (qi = 0; qi < 2; ++qi)
                for (d = 0; d < D; ++d) {
                    float v = o[((size_t)h * 2 + qi) * D + d];
                    bad += (h == 0 && qi == 0) ? !isnan(v) : !isfinite(v);
                }
        CHECK(bad == 0 && isnan(l[0]) && isfinite(l[1]) && isfinite(l[2]) && isfinite(l[3]),
              "%s cache: a NaN query gives NaN in its own row and nowhere else (%d wrong, lse %g %g)",
              ring ? "rolling" : "plain", bad, l[0], l[1]);
    }
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
    test_position_overflow();
    test_cache_too_few_tokens();
    test_causal_align_without_causal();
    test_merge_nan();
    ec_clear();
    return tu_finish("defects");
}
