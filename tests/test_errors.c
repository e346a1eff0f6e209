/* test_errors.c - every status code of mha.h, reached on purpose.  Each
   refusal is checked the way tests/errcheck.h says: the status, the
   function and the field the mha_error names, a message that starts with
   them, the same status with err = NULL, and outputs that hold exactly
   what they held before.  (MHA_ERR_IO, FORMAT, NOT_FOUND and SHAPE belong
   to the companion headers' loaders and are reached in their tests.) */
#include <stdlib.h>
#include <string.h>

/* An allocator that can be told to fail, through the MHA_MALLOC hook. */
static int fail_alloc;
static size_t live_allocs;
static void *test_malloc(size_t n)
{
    void *p;
    if (fail_alloc) return NULL;
    p = malloc(n);
    if (p) ++live_allocs;
    return p;
}
static void test_free(void *p)
{
    if (p) --live_allocs;
    free(p);
}
#define MHA_MALLOC(n) test_malloc(n)
#define MHA_FREE(p) test_free(p)
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "errcheck.h"
#include <limits.h>

enum { E = 6, H = 2, L = 4, B = 2 };
static float w_in[3 * E * E], w_out[E * E], b_in[3 * E], b_out[E], bias_k[E];
static float x[B * L * E], out[B * L * E], w[B * H * L * L];
static mha_run wrun;   /* the module's one-shot forward below asks for the weights too */

static void setup(mha_module *m, mha_options *o)
{
    tu_rng r = {3};
    memset(m, 0, sizeof *m);
    memset(o, 0, sizeof *o);
    tu_fill(&r, w_in, sizeof w_in / sizeof w_in[0], 0.5f);
    tu_fill(&r, w_out, sizeof w_out / sizeof w_out[0], 0.5f);
    tu_fill(&r, x, sizeof x / sizeof x[0], 1.0f);
    m->embed_dim = E; m->num_heads = H;
    m->in_proj_weight = w_in; m->in_proj_bias = b_in;
    m->out_proj_weight = w_out; m->out_proj_bias = b_out;
    memset(&wrun, 0, sizeof wrun);
    wrun.weights = w;
}

/* A one-shot module forward (out and the weights w) refused with want, naming field. */
#define EXPECT_FWD(want, field, m, b, lq, lk, q, k, v, o, outp)                                  \
    EC_REFUSE(want, "mha_module_forward", field, mha_module_forward(m, b, lq, lk, q, k, v, o, outp, &wrun, ERR))

static void test_strings(void)
{
    int s, distinct = 1;
    for (s = 0; s < MHA_STATUS_COUNT; ++s) {
        const char *msg = mha_status_string((mha_status)s);
        int t;
        CHECK(msg && strlen(msg) > 5, "status %d has a message", s);
        for (t = 0; t < s; ++t) if (strcmp(msg, mha_status_string((mha_status)t)) == 0) distinct = 0;
    }
    CHECK(distinct, "every status has its own message");
    CHECK(strcmp(mha_status_string((mha_status)999), "unknown mha_status value") == 0, "unknown value");
    CHECK(strcmp(mha_status_string((mha_status)-1), "unknown mha_status value") == 0, "negative value");
    CHECK(strcmp(mha_status_string(MHA_OK), "success") == 0, "MHA_OK message");
    /* the companion headers' statuses are part of the one list */
    CHECK(MHA_ERR_IO < MHA_STATUS_COUNT && MHA_ERR_FORMAT < MHA_STATUS_COUNT && MHA_ERR_NOT_FOUND < MHA_STATUS_COUNT &&
          MHA_ERR_SHAPE < MHA_STATUS_COUNT && MHA_ERR_SAVED < MHA_STATUS_COUNT, "file and saved statuses listed");
}

/* A call that succeeds leaves the caller's mha_error as it was. */
static void test_ok_leaves_error(void)
{
    mha_module m;
    mha_options o;
    mha_error e;
    setup(&m, &o);
    ec_junk(&e);
    e.status = MHA_OK;
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, &o, out, &wrun, &e) == MHA_OK, "forward: %s", e.message);
    CHECK(e.status == MHA_OK, "a successful call reports MHA_OK in err.status");
}

static void test_null_pointers(void)
{
    mha_module m;
    mha_options o;
    unsigned char am[L * L] = {0};
    mha_sizes sz;
    setup(&m, &o);
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "m", NULL, B, L, L, x, x, x, &o, out);
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "query", &m, B, L, L, NULL, x, x, &o, out);
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "key", &m, B, L, L, x, NULL, x, &o, out);
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "value", &m, B, L, L, x, x, NULL, &o, out);
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "out", &m, B, L, L, x, x, x, &o, NULL);
    m.out_proj_weight = NULL;
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "m->out_proj_weight", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    m.in_proj_weight = NULL;   /* and no q/k/v_proj_weight either */
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "m->q_proj_weight", &m, B, L, L, x, x, x, &o, out);
    m.q_proj_weight = w_in; m.k_proj_weight = w_in;
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "m->v_proj_weight", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.ndim = 2; o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    /* a one-shot call has no plan and maybe no run: the data the caller
       forgot is the options' */
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "opt->attn_mask.data", &m, B, L, L, x, x, x, &o, out);
    o.attn_mask.data = am;
    o.key_padding_mask.kind = MHA_MASK_FLOAT; o.key_padding_mask.ndim = 2;
    o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = L;
    EXPECT_FWD(MHA_ERR_NULL_POINTER, "opt->key_padding_mask.data", &m, B, L, L, x, x, x, &o, out);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_plan_size", "sizes",
              mha_module_plan_size(&m, B, L, L, NULL, 0, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_plan_size", "m",
              mha_module_plan_size(NULL, B, L, L, NULL, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_forward", "k",
              mha_sdpa_forward(1, 1, L, L, E, E, x, NULL, x, NULL, out, &wrun, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_plan_size", "sizes",
              mha_sdpa_plan_size(1, 1, L, L, E, E, NULL, 0, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm", "A",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1, NULL, 2, x, 2, 0, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm", "C",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1, x, 2, x, 2, 0, NULL, 2, NULL, ERR));
}

static void test_invalid_sizes(void)
{
    mha_module m;
    mha_options o;
    mha_sizes sz = {7, 7, 7};
    setup(&m, &o);
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, "B", &m, 0, L, L, x, x, x, &o, out);
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, "Lq", &m, B, -1, L, x, x, x, &o, out);
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, "Lk", &m, B, L, 0, x, x, x, &o, out);
    m.embed_dim = 0;
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, "m->embed_dim", &m, B, L, L, x, x, x, &o, out);
    m.embed_dim = E; m.num_heads = -2;
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, "m->num_heads", &m, B, L, L, x, x, x, &o, out);
    m.num_heads = H; m.kdim = -1;
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, "m->kdim", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    ec_watch(&sz, sizeof sz, 0);
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_module_plan_size", "Lq", mha_module_plan_size(&m, B, 0, L, &o, 0, &sz, ERR));
    CHECK(sz.plan == 7 && sz.workspace == 7 && sz.saved == 7, "a refused size query leaves *sizes alone");
    ec_clear();
    ec_watch(out, sizeof out, 1); ec_watch(w, sizeof w, 1);
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_forward", "D",
              mha_sdpa_forward(1, 1, L, L, 0, E, x, x, x, NULL, out, &wrun, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_forward", "H",
              mha_sdpa_forward(1, 0, L, L, E, E, x, x, x, NULL, out, &wrun, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm", "M",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 0, 2, 2, 1, x, 2, x, 2, 0, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm", "lda",   /* lda < K */
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 3, 1, x, 2, x, 2, 0, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm", "ldb",   /* ldb < K for B^T */
              mha_gemm(MHA_NO_TRANS, MHA_TRANS, 2, 3, 2, 1, x, 2, x, 1, 0, out, 3, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm", "ldc",   /* ldc < N */
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 3, 2, 1, x, 2, x, 3, 0, out, 2, NULL, ERR));
}

static void test_heads_divide(void)
{
    mha_module m;
    mha_options o;
    setup(&m, &o);
    m.num_heads = 4;   /* 6 % 4 != 0 */
    EXPECT_FWD(MHA_ERR_HEADS_DIVIDE, "m->num_heads", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    m.num_kv_heads = 3;   /* 2 query heads: 3 KV heads cannot divide them */
    EXPECT_FWD(MHA_ERR_HEADS_DIVIDE, "m->num_kv_heads", &m, B, L, L, x, x, x, &o, out);
    o.num_kv_heads = 3;
    EC_REFUSE(MHA_ERR_HEADS_DIVIDE, "mha_sdpa_forward", "opt->num_kv_heads",
              mha_sdpa_forward(1, 4, L, L, 2, 2, x, x, x, &o, out, NULL, ERR));
}

static void test_overflow(void)
{
    mha_module m;
    mha_options o;
    mha_sizes sz = {7, 7, 7};
    setup(&m, &o);
    /* B*Lq does not fit the int row count of a GEMM */
    EXPECT_FWD(MHA_ERR_OVERFLOW, NULL, &m, INT_MAX / 2, 4, 4, x, x, x, &o, out);
    /* Lk + appended keys overflows int */
    m.bias_k = m.bias_v = bias_k; m.add_zero_attn = 1;
    EXPECT_FWD(MHA_ERR_OVERFLOW, NULL, &m, 1, 1, INT_MAX, x, x, x, &o, out);
    setup(&m, &o);
    /* embed_dim^2 * B * L products that overflow size_t */
    m.embed_dim = INT_MAX - 1; m.num_heads = 1;
    EXPECT_FWD(MHA_ERR_OVERFLOW, "m->embed_dim", &m, 1 << 20, 1 << 10, 1 << 10, x, x, x, &o, out);
    ec_watch(&sz, sizeof sz, 0);
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_module_plan_size", "m->embed_dim",
              mha_module_plan_size(&m, 1 << 20, 1 << 10, 1 << 10, &o, MHA_PLAN_WEIGHTS, &sz, ERR));
    CHECK(sz.plan == 7, "the refused size query reports the overflow and leaves *sizes alone");
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_forward", NULL,
              mha_sdpa_forward(INT_MAX, INT_MAX, INT_MAX, INT_MAX, INT_MAX, INT_MAX, x, x, x, NULL, out, &wrun, ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_sdpa_plan_size", NULL,
              mha_sdpa_plan_size(INT_MAX, INT_MAX, INT_MAX, INT_MAX, 1, 1, NULL, MHA_PLAN_WEIGHTS, &sz, ERR));
    ec_clear();
    ec_watch(out, sizeof out, 1); ec_watch(w, sizeof w, 1);
}

static void test_mask_shapes(void)
{
    mha_module m;
    mha_options o;
    mha_error e;
    unsigned char am[B * H * L * L] = {0};
    setup(&m, &o);
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = am; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = L + 1; o.attn_mask.shape[1] = L;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, "opt->attn_mask.shape", &m, B, L, L, x, x, x, &o, out);   /* [Lq+1, Lk] */
    o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L - 1;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, "opt->attn_mask.shape", &m, B, L, L, x, x, x, &o, out);   /* [Lq, Lk-1] */
    o.attn_mask.ndim = 3; o.attn_mask.shape[0] = B; o.attn_mask.shape[1] = L; o.attn_mask.shape[2] = L;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, "opt->attn_mask.shape", &m, B, L, L, x, x, x, &o, out);   /* B, not B*H */
    o.attn_mask.ndim = 5;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, "opt->attn_mask.ndim", &m, B, L, L, x, x, x, &o, out);
    o.attn_mask.ndim = 0;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, "opt->attn_mask.ndim", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = am; o.key_padding_mask.ndim = 2;
    o.key_padding_mask.shape[0] = L; o.key_padding_mask.shape[1] = B;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, "opt->key_padding_mask.shape", &m, B, L, L, x, x, x, &o, out);   /* [Lk, B] */
    o.key_padding_mask.ndim = 3; o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = 1;
    o.key_padding_mask.shape[2] = L;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, "opt->key_padding_mask.shape", &m, B, L, L, x, x, x, &o, out);   /* 3-D */
    /* a correct mask right after is accepted */
    o.key_padding_mask.ndim = 2; o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = L;
    CHECK(mha_module_forward(&m, B, L, L, x, x, x, &o, out, &wrun, &e) == MHA_OK, "good key_padding_mask: %s",
          e.message);
}

static void test_invalid_arguments(void)
{
    mha_module m;
    mha_options o;
    unsigned char am[L * L] = {0};
    setup(&m, &o);
    o.attn_mask.kind = (mha_mask_kind)9; o.attn_mask.data = am; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    EXPECT_FWD(MHA_ERR_BAD_ENUM, "opt->attn_mask.kind", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    o.key_padding_mask.kind = (mha_mask_kind)-1;
    EXPECT_FWD(MHA_ERR_BAD_ENUM, "opt->key_padding_mask.kind", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    o.causal = 1; o.causal_align = (mha_causal_align)7;
    EXPECT_FWD(MHA_ERR_BAD_ENUM, "opt->causal_align", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    o.scale = -1.0f;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "opt->scale", &m, B, L, L, x, x, x, &o, out);
    o.scale = NAN;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "opt->scale", &m, B, L, L, x, x, x, &o, out);
    o.scale = INFINITY;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "opt->scale", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    o.num_threads = -3;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "opt->num_threads", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    m.bias_k = bias_k;   /* bias_v missing */
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "m->bias_v", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    m.kdim = E + 1;      /* packed in_proj_weight needs kdim == E */
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "m->kdim", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    m.add_zero_attn = 2;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "m->add_zero_attn", &m, B, L, L, x, x, x, &o, out);
    setup(&m, &o);
    o.num_kv_heads = 1;  /* a module takes its KV heads from m->num_kv_heads */
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, "opt->num_kv_heads", &m, B, L, L, x, x, x, &o, out);
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_gemm", "ta",
              mha_gemm((mha_trans)3, MHA_NO_TRANS, 2, 2, 2, 1, x, 2, x, 2, 0, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_gemm", "tb",
              mha_gemm(MHA_NO_TRANS, (mha_trans)-1, 2, 2, 2, 1, x, 2, x, 2, 0, out, 2, NULL, ERR));
    /* a run field the call cannot honour is refused by name, never ignored */
    setup(&m, &o);
    {
        float lse[B * H * L];
        mha_run r;
        memset(&r, 0, sizeof r);
        r.lse = lse;
        ec_watch(lse, sizeof lse, 1);
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_backward", "run->lse",
                  mha_module_backward(&m, B, L, L, x, x, x, x, &o, out, NULL, NULL, NULL, &r, ERR));
        ec_clear();
        ec_watch(out, sizeof out, 1); ec_watch(w, sizeof w, 1);
    }
}

static void test_workspace_and_memory(void)
{
    mha_module m;
    mha_options o;
    mha_sizes sz;
    mha_run r;
    void *buf;
    mha_status st;
    mha_error e;
    setup(&m, &o);
    o.num_threads = 1;   /* explicit: with 0 a one-shot call may run on fewer threads to fit */
    CHECK(mha_module_plan_size(&m, B, L, L, &o, MHA_PLAN_WEIGHTS, &sz, &e) == MHA_OK && sz.workspace > 0,
          "workspace size");
    buf = malloc(sz.workspace);
    memset(&r, 0, sizeof r);
    r.weights = w; r.workspace = buf; r.workspace_bytes = 64;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_forward", "run->workspace_bytes",
              mha_module_forward(&m, B, L, L, x, x, x, &o, out, &r, ERR));
    /* one byte short of what the size query said: refused whatever this
       run's lengths happen to need, so a short buffer fails at once and
       not at the first long run */
    r.workspace_bytes = sz.workspace - 1;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_forward", "run->workspace_bytes",
              mha_module_forward(&m, B, L, L, x, x, x, &o, out, &r, ERR));
    r.workspace_bytes = sz.workspace;
    st = mha_module_forward(&m, B, L, L, x, x, x, &o, out, &r, &e);
    CHECK(st == MHA_OK, "exact size works: %s", e.message);
    /* with a workspace the call allocates nothing, even when malloc fails */
    fail_alloc = 1;
    st = mha_module_forward(&m, B, L, L, x, x, x, &o, out, &r, &e);
    CHECK(st == MHA_OK, "caller workspace: no allocation (%s)", e.message);
    EXPECT_FWD(MHA_ERR_OUT_OF_MEMORY, "run->workspace", &m, B, L, L, x, x, x, &o, out);
    EC_REFUSE(MHA_ERR_OUT_OF_MEMORY, "mha_sdpa_forward", "run->workspace",
              mha_sdpa_forward(1, 2, L, L, 3, 3, x, x, x, NULL, out, &wrun, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_plan", "plan", mha_module_plan(&m, B, L, L, &o, 0, NULL, 0, NULL, ERR));
    {
        mha_plan *p = NULL;
        EC_REFUSE(MHA_ERR_OUT_OF_MEMORY, "mha_module_plan", "mem", mha_module_plan(&m, B, L, L, &o, 0, NULL, 0, &p, ERR));
        CHECK(p == NULL, "a refused plan leaves *plan alone");
    }
    fail_alloc = 0;
    memset(&o, 0, sizeof o);
    o.num_threads = 1;
    CHECK(mha_sdpa_plan_size(1, 2, L, L, 3, 3, &o, MHA_PLAN_WEIGHTS, &sz, &e) == MHA_OK, "sdpa size");
    r.workspace_bytes = sz.workspace - 1;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_sdpa_forward", "run->workspace_bytes",
              mha_sdpa_forward(1, 2, L, L, 3, 3, x, x, x, &o, out, &r, ERR));
    free(buf);
    CHECK(live_allocs == 0, "every MHA_MALLOC was matched by MHA_FREE (%zu live)", live_allocs);
}

/* The statuses that plans, runs, the saved forward and the cache brought. */
static void test_plan_statuses(void)
{
    mha_module m;
    mha_options o;
    mha_sizes sz;
    mha_plan *p = NULL, *pt = NULL;
    mha_run r;
    mha_error e;
    double mem[512];
    void *saved;
    setup(&m, &o);
    CHECK(mha_module_plan(&m, B, L, L, &o, 0, NULL, 0, &p, &e) == MHA_OK, "plan: %s", e.message);
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "Lq",
              mha_module_run_forward(p, L + 1, L, x, x, x, out, NULL, ERR));
    memset(&r, 0, sizeof r);
    r.weights = w;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->weights",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    /* MISALIGNED: a plan's caller memory at an odd address */
    CHECK(mha_module_plan_size(&m, B, L, L, &o, 0, &sz, &e) == MHA_OK && sz.plan < sizeof mem - 8, "plan size");
    {
        mha_plan *q = NULL;
        EC_REFUSE(MHA_ERR_MISALIGNED, "mha_module_plan", "mem",
                  mha_module_plan(&m, B, L, L, &o, 0, (char *)mem + 4, sz.plan, &q, ERR));
        EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_plan", "mem_bytes",
                  mha_module_plan(&m, B, L, L, &o, 0, mem, sz.plan - 1, &q, ERR));
        CHECK(q == NULL, "refused plans leave *plan alone");
    }
    /* SAVED: a region no forward of this plan wrote */
    CHECK(mha_module_plan(&m, B, L, L, &o, MHA_PLAN_TRAINING, NULL, 0, &pt, &e) == MHA_OK &&
          mha_plan_sizes(pt, &sz, &e) == MHA_OK && sz.saved > 0, "training plan: %s", e.message);
    saved = calloc(1, sz.saved);
    memset(&r, 0, sizeof r);
    r.saved = saved; r.saved_bytes = sz.saved;
    EC_REFUSE(MHA_ERR_SAVED, "mha_module_run_backward", "run->saved",
              mha_module_run_backward(pt, L, L, x, x, x, x, out, NULL, NULL, NULL, &r, ERR));
    /* CAPACITY: an append past a cache's capacity */
    {
        float kc[2 * 1 * 3 * 2], vc[2 * 1 * 3 * 2], kn[2 * 1 * 2 * 2] = {0};
        int len[2] = {2, 1};
        mha_kv_cache c;
        memset(&c, 0, sizeof c);
        c.B = 2; c.Hkv = 1; c.D = 2; c.capacity = 3; c.k = kc; c.v = vc; c.len = len;
        ec_watch(kc, sizeof kc, 1); ec_watch(vc, sizeof vc, 1); ec_watch(len, sizeof len, 0);
        EC_REFUSE(MHA_ERR_CAPACITY, "mha_kv_cache_append", "cache->len", mha_kv_cache_append(&c, 2, kn, kn, ERR));
        ec_clear();
        ec_watch(out, sizeof out, 1); ec_watch(w, sizeof w, 1);
    }
    free(saved);
    mha_plan_destroy(p);
    mha_plan_destroy(pt);
}

int main(void)
{
    ec_watch(out, sizeof out, 1);
    ec_watch(w, sizeof w, 1);
    test_strings();
    test_ok_leaves_error();
    test_null_pointers();
    test_invalid_sizes();
    test_heads_divide();
    test_overflow();
    test_mask_shapes();
    test_invalid_arguments();
    test_workspace_and_memory();
    test_plan_statuses();
    ec_clear();
    return tu_finish("errors");
}
