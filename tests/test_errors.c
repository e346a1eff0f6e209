/* test_errors.c - every status code, reached on purpose.  After a failing call
   the outputs must hold exactly what they held before. */
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
#include <limits.h>

enum { E = 6, H = 2, L = 4, B = 2 };
static float w_in[3 * E * E], w_out[E * E], b_in[3 * E], b_out[E], bias_k[E];
static float x[B * L * E], out[B * L * E], w[B * H * L * L];
static const float SENTINEL = 12345.0f;

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
}

static void poison(void)
{
    size_t i;
    for (i = 0; i < sizeof out / sizeof out[0]; ++i) out[i] = SENTINEL;
    for (i = 0; i < sizeof w / sizeof w[0]; ++i) w[i] = SENTINEL;
}
static int untouched(void)
{
    size_t i;
    for (i = 0; i < sizeof out / sizeof out[0]; ++i) if (out[i] != SENTINEL) return 0;
    for (i = 0; i < sizeof w / sizeof w[0]; ++i) if (w[i] != SENTINEL) return 0;
    return 1;
}

/* Run forward with the given module/options and expect status 'want'. */
#define EXPECT_FWD(want, m, b, lq, lk, q, k, v, o, outp, wp, what)                           \
    do {                                                                                     \
        mha_status st_;                                                                      \
        poison();                                                                            \
        st_ = mha_forward(m, b, lq, lk, q, k, v, o, outp, wp, NULL, 0);                      \
        CHECK(st_ == (want) && untouched(), "%s: got '%s', want '%s'%s", what,               \
              mha_status_string(st_), mha_status_string(want), untouched() ? "" : " (output written)"); \
    } while (0)

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
    CHECK(strcmp(mha_status_string(MHA_OK), "success") == 0, "MHA_OK message");
}

static void test_null_pointers(void)
{
    mha_module m;
    mha_options o;
    size_t bytes;
    unsigned char am[L * L] = {0};
    setup(&m, &o);
    EXPECT_FWD(MHA_ERR_NULL_POINTER, NULL, B, L, L, x, x, x, &o, out, w, "module NULL");
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, NULL, x, x, &o, out, w, "query NULL");
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, NULL, x, &o, out, w, "key NULL");
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, x, NULL, &o, out, w, "value NULL");
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, x, x, &o, NULL, w, "out NULL");
    m.out_proj_weight = NULL;
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, x, x, &o, out, w, "out_proj_weight NULL");
    setup(&m, &o);
    m.in_proj_weight = NULL;   /* and no q/k/v_proj_weight either */
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, x, x, &o, out, w, "no projection weights");
    m.q_proj_weight = w_in; m.k_proj_weight = w_in;
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, x, x, &o, out, w, "v_proj_weight NULL");
    setup(&m, &o);
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.ndim = 2; o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, x, x, &o, out, w, "attn_mask data NULL");
    o.attn_mask.data = am;
    o.key_padding_mask.kind = MHA_MASK_FLOAT; o.key_padding_mask.ndim = 2;
    o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = L;
    EXPECT_FWD(MHA_ERR_NULL_POINTER, &m, B, L, L, x, x, x, &o, out, w, "key_padding_mask data NULL");
    CHECK(mha_forward_workspace_size(&m, B, L, L, NULL, 0, NULL) == MHA_ERR_NULL_POINTER, "bytes NULL");
    CHECK(mha_forward_workspace_size(NULL, B, L, L, NULL, 0, &bytes) == MHA_ERR_NULL_POINTER, "module NULL (size)");
    poison();
    CHECK(mha_sdpa(1, 1, L, L, E, E, x, NULL, x, NULL, out, w, NULL, 0) == MHA_ERR_NULL_POINTER && untouched(), "sdpa k NULL");
    CHECK(mha_sdpa_workspace_size(1, 1, L, L, E, E, NULL, 0, NULL) == MHA_ERR_NULL_POINTER, "sdpa bytes NULL");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1, NULL, 2, x, 2, 0, out, 2, NULL, 0) == MHA_ERR_NULL_POINTER &&
          untouched(), "gemm A NULL");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1, x, 2, x, 2, 0, NULL, 2, NULL, 0) == MHA_ERR_NULL_POINTER, "gemm C NULL");
}

static void test_invalid_sizes(void)
{
    mha_module m;
    mha_options o;
    size_t bytes = 7;
    setup(&m, &o);
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, &m, 0, L, L, x, x, x, &o, out, w, "batch 0");
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, &m, B, -1, L, x, x, x, &o, out, w, "Lq -1");
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, &m, B, L, 0, x, x, x, &o, out, w, "Lk 0");
    m.embed_dim = 0;
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, &m, B, L, L, x, x, x, &o, out, w, "embed_dim 0");
    m.embed_dim = E; m.num_heads = -2;
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, &m, B, L, L, x, x, x, &o, out, w, "num_heads -2");
    m.num_heads = H; m.kdim = -1;
    EXPECT_FWD(MHA_ERR_INVALID_SIZE, &m, B, L, L, x, x, x, &o, out, w, "kdim -1");
    setup(&m, &o);
    CHECK(mha_forward_workspace_size(&m, B, 0, L, &o, 0, &bytes) == MHA_ERR_INVALID_SIZE && bytes == 7,
          "workspace size of Lq 0 fails and leaves *bytes alone");
    poison();
    CHECK(mha_sdpa(1, 1, L, L, 0, E, x, x, x, NULL, out, w, NULL, 0) == MHA_ERR_INVALID_SIZE && untouched(), "sdpa D 0");
    CHECK(mha_sdpa(1, 0, L, L, E, E, x, x, x, NULL, out, w, NULL, 0) == MHA_ERR_INVALID_SIZE && untouched(), "sdpa H 0");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 0, 2, 2, 1, x, 2, x, 2, 0, out, 2, NULL, 0) == MHA_ERR_INVALID_SIZE &&
          untouched(), "gemm M 0");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 3, 1, x, 2, x, 2, 0, out, 2, NULL, 0) == MHA_ERR_INVALID_SIZE &&
          untouched(), "gemm lda < K");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_TRANS, 2, 3, 2, 1, x, 2, x, 1, 0, out, 3, NULL, 0) == MHA_ERR_INVALID_SIZE &&
          untouched(), "gemm ldb < K for B^T");
    CHECK(mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 3, 2, 1, x, 2, x, 3, 0, out, 2, NULL, 0) == MHA_ERR_INVALID_SIZE &&
          untouched(), "gemm ldc < N");
}

static void test_heads_divide(void)
{
    mha_module m;
    mha_options o;
    setup(&m, &o);
    m.num_heads = 4;   /* 6 % 4 != 0 */
    EXPECT_FWD(MHA_ERR_HEADS_DIVIDE, &m, B, L, L, x, x, x, &o, out, w, "embed_dim % num_heads");
}

static void test_overflow(void)
{
    mha_module m;
    mha_options o;
    size_t bytes = 7;
    setup(&m, &o);
    /* B*Lq does not fit the int row count of a GEMM */
    EXPECT_FWD(MHA_ERR_OVERFLOW, &m, INT_MAX / 2, 4, 4, x, x, x, &o, out, w, "B*Lq > INT_MAX");
    /* Lk + appended keys overflows int */
    m.bias_k = m.bias_v = bias_k; m.add_zero_attn = 1;
    EXPECT_FWD(MHA_ERR_OVERFLOW, &m, 1, 1, INT_MAX, x, x, x, &o, out, w, "Lk + 2 > INT_MAX");
    setup(&m, &o);
    /* embed_dim^2 * B * L products that overflow size_t */
    m.embed_dim = INT_MAX - 1; m.num_heads = 1;
    EXPECT_FWD(MHA_ERR_OVERFLOW, &m, 1 << 20, 1 << 10, 1 << 10, x, x, x, &o, out, w, "huge embed_dim");
    CHECK(mha_forward_workspace_size(&m, 1 << 20, 1 << 10, 1 << 10, &o, 1, &bytes) == MHA_ERR_OVERFLOW && bytes == 7,
          "workspace size reports the overflow");
    poison();
    CHECK(mha_sdpa(INT_MAX, INT_MAX, INT_MAX, INT_MAX, INT_MAX, INT_MAX, x, x, x, NULL, out, w, NULL, 0) ==
          MHA_ERR_OVERFLOW && untouched(), "sdpa sizes overflow");
    CHECK(mha_sdpa_workspace_size(INT_MAX, INT_MAX, INT_MAX, INT_MAX, 1, 1, NULL, 1, &bytes) == MHA_ERR_OVERFLOW,
          "sdpa workspace size overflow");
}

static void test_mask_shapes(void)
{
    mha_module m;
    mha_options o;
    unsigned char am[B * H * L * L] = {0};
    setup(&m, &o);
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = am; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = L + 1; o.attn_mask.shape[1] = L;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, &m, B, L, L, x, x, x, &o, out, w, "attn_mask [Lq+1, Lk]");
    o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L - 1;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, &m, B, L, L, x, x, x, &o, out, w, "attn_mask [Lq, Lk-1]");
    o.attn_mask.ndim = 3; o.attn_mask.shape[0] = B; o.attn_mask.shape[1] = L; o.attn_mask.shape[2] = L;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, &m, B, L, L, x, x, x, &o, out, w, "3-D attn_mask with B instead of B*H");
    o.attn_mask.ndim = 5;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, &m, B, L, L, x, x, x, &o, out, w, "attn_mask ndim 5");
    o.attn_mask.ndim = 0;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, &m, B, L, L, x, x, x, &o, out, w, "attn_mask ndim unset");
    setup(&m, &o);
    o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = am; o.key_padding_mask.ndim = 2;
    o.key_padding_mask.shape[0] = L; o.key_padding_mask.shape[1] = B;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, &m, B, L, L, x, x, x, &o, out, w, "key_padding_mask [Lk, B]");
    o.key_padding_mask.ndim = 3; o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = 1;
    o.key_padding_mask.shape[2] = L;
    EXPECT_FWD(MHA_ERR_MASK_SHAPE, &m, B, L, L, x, x, x, &o, out, w, "key_padding_mask 3-D");
    /* a correct mask right after is accepted */
    o.key_padding_mask.ndim = 2; o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = L;
    CHECK(mha_forward(&m, B, L, L, x, x, x, &o, out, w, NULL, 0) == MHA_OK, "good key_padding_mask accepted");
}

static void test_invalid_arguments(void)
{
    mha_module m;
    mha_options o;
    unsigned char am[L * L] = {0};
    setup(&m, &o);
    o.attn_mask.kind = (mha_mask_kind)9; o.attn_mask.data = am; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = L; o.attn_mask.shape[1] = L;
    EXPECT_FWD(MHA_ERR_BAD_ENUM, &m, B, L, L, x, x, x, &o, out, w, "mask kind 9");
    setup(&m, &o);
    o.causal = 1; o.causal_align = (mha_causal_align)7;
    EXPECT_FWD(MHA_ERR_BAD_ENUM, &m, B, L, L, x, x, x, &o, out, w, "causal_align 7");
    setup(&m, &o);
    o.scale = -1.0f;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, &m, B, L, L, x, x, x, &o, out, w, "negative scale");
    o.scale = NAN;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, &m, B, L, L, x, x, x, &o, out, w, "NaN scale");
    o.scale = INFINITY;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, &m, B, L, L, x, x, x, &o, out, w, "Inf scale");
    setup(&m, &o);
    o.num_threads = -3;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, &m, B, L, L, x, x, x, &o, out, w, "num_threads -3");
    setup(&m, &o);
    m.bias_k = bias_k;   /* bias_v missing */
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, &m, B, L, L, x, x, x, &o, out, w, "bias_k without bias_v");
    setup(&m, &o);
    m.kdim = E + 1;      /* packed in_proj_weight needs kdim == E */
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, &m, B, L, L, x, x, x, &o, out, w, "in_proj_weight with kdim != E");
    setup(&m, &o);
    m.add_zero_attn = 2;
    EXPECT_FWD(MHA_ERR_INVALID_ARGUMENT, &m, B, L, L, x, x, x, &o, out, w, "add_zero_attn 2");
    poison();
    CHECK(mha_gemm((mha_trans)3, MHA_NO_TRANS, 2, 2, 2, 1, x, 2, x, 2, 0, out, 2, NULL, 0) == MHA_ERR_BAD_ENUM &&
          untouched(), "gemm transpose flag 3");
}

static void test_workspace_and_memory(void)
{
    mha_module m;
    mha_options o;
    size_t need = 0;
    void *buf;
    mha_status st;
    setup(&m, &o);
    o.num_threads = 1;   /* explicit: with 0 a one-shot call may run on fewer threads to fit */
    CHECK(mha_forward_workspace_size(&m, B, L, L, &o, 1, &need) == MHA_OK && need > 0, "workspace size");
    buf = malloc(need);
    poison();
    st = mha_forward(&m, B, L, L, x, x, x, &o, out, w, buf, need - 1);
    CHECK(st == MHA_ERR_WORKSPACE_TOO_SMALL && untouched(), "one byte short: %s", mha_status_string(st));
    st = mha_forward(&m, B, L, L, x, x, x, &o, out, w, buf, need);
    CHECK(st == MHA_OK && !untouched(), "exact size works");
    /* with a workspace the call allocates nothing, even when malloc fails */
    fail_alloc = 1;
    st = mha_forward(&m, B, L, L, x, x, x, &o, out, w, buf, need);
    CHECK(st == MHA_OK, "caller workspace: no allocation (%s)", mha_status_string(st));
    EXPECT_FWD(MHA_ERR_OUT_OF_MEMORY, &m, B, L, L, x, x, x, &o, out, w, "MHA_MALLOC fails");
    poison();
    st = mha_sdpa(1, 2, L, L, 3, 3, x, x, x, NULL, out, w, NULL, 0);
    CHECK(st == MHA_ERR_OUT_OF_MEMORY && untouched(), "sdpa: MHA_MALLOC fails (%s)", mha_status_string(st));
    fail_alloc = 0;
    memset(&o, 0, sizeof o);
    o.num_threads = 1;
    CHECK(mha_sdpa_workspace_size(1, 2, L, L, 3, 3, &o, 1, &need) == MHA_OK, "sdpa size");
    poison();
    CHECK(mha_sdpa(1, 2, L, L, 3, 3, x, x, x, &o, out, w, buf, need - 1) == MHA_ERR_WORKSPACE_TOO_SMALL && untouched(),
          "sdpa: workspace too small");
    free(buf);
    CHECK(live_allocs == 0, "every MHA_MALLOC was matched by MHA_FREE (%zu live)", live_allocs);
}

int main(void)
{
    test_strings();
    test_null_pointers();
    test_invalid_sizes();
    test_heads_divide();
    test_overflow();
    test_mask_shapes();
    test_invalid_arguments();
    test_workspace_and_memory();
    return tu_finish("errors");
}
