/* test_api.c - errors name the field (issue 18, item 4).  For every public
   function of mha.h that can fail, refusals are provoked on purpose and
   checked as tests/errcheck.h says: the status; err.function, the
   function's name; err.field, the argument or struct field as the caller
   wrote it ("m->num_kv_heads", "opt->window_left", "cache->Hkv",
   "run->workspace_bytes", ...); err.message starting "<function>: <field>:"
   and saying more; the same status with err = NULL; and nothing written
   (every output keeps its sentinel, every in-out argument its value).
   At the end the list of functions refused here is compared with the
   MHADEF declarations read from mha.h itself (tests/public_names.h): a
   new public function without a refusal test fails this program.  The
   status-by-status tour is test_errors.c; this one goes function by
   function, nested fields included. */
#include <stdlib.h>
#include <string.h>
#include <limits.h>

/* An allocator that can be told to fail (the one-shot calls' plans and
   workspaces), through the MHA_MALLOC hook. */
static int fail_alloc;
static void *test_malloc(size_t n) { return fail_alloc ? NULL : malloc(n); }
#define MHA_MALLOC(n) test_malloc(n)
#define MHA_FREE(p) free(p)
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "errcheck.h"
#include "public_names.h"

enum { E = 8, H = 2, D = E / H, B = 2, L = 5, CAP = 6, F = 12 };
static float w_in[3 * E * E], b_in[3 * E], w_out[E * E], b_out[E], bk[E], bv[E];
static float w1[F * E], w2[E * F], n1[E], n2[E];
static float x[B * L * E], x2[B * L * E], dout[B * L * E];
static float out[B * L * E], wts[B * H * L * L], lse[B * H * L], dx[B * L * E];
static float kc[B * H * CAP * D], vc[B * H * CAP * D];
static int len[B + 1];   /* one more: a cache that claims B + 1 rows is read that far */

static void fill(void)
{
    tu_rng r = {1818};
    tu_fill(&r, w_in, sizeof w_in / sizeof *w_in, 0.4f);
    tu_fill(&r, b_in, sizeof b_in / sizeof *b_in, 0.1f);
    tu_fill(&r, w_out, sizeof w_out / sizeof *w_out, 0.4f);
    tu_fill(&r, b_out, sizeof b_out / sizeof *b_out, 0.1f);
    tu_fill(&r, bk, E, 0.3f);
    tu_fill(&r, bv, E, 0.3f);
    tu_fill(&r, w1, sizeof w1 / sizeof *w1, 0.3f);
    tu_fill(&r, w2, sizeof w2 / sizeof *w2, 0.3f);
    tu_fill(&r, n1, E, 1.0f);
    tu_fill(&r, n2, E, 1.0f);
    tu_fill(&r, x, sizeof x / sizeof *x, 1.0f);
    tu_fill(&r, x2, sizeof x2 / sizeof *x2, 1.0f);
    tu_fill(&r, dout, sizeof dout / sizeof *dout, 1.0f);
    tu_fill(&r, kc, sizeof kc / sizeof *kc, 1.0f);
    tu_fill(&r, vc, sizeof vc / sizeof *vc, 1.0f);
}

/* The outputs every case watches: poisoned before each call, unchanged after. */
static void watch_outputs(void)
{
    ec_clear();
    ec_watch(out, sizeof out, 1);
    ec_watch(wts, sizeof wts, 1);
    ec_watch(lse, sizeof lse, 1);
    ec_watch(dx, sizeof dx, 1);
}

static mha_module module(void)
{
    mha_module m;
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H;
    m.in_proj_weight = w_in; m.in_proj_bias = b_in;
    m.out_proj_weight = w_out; m.out_proj_bias = b_out;
    return m;
}
static mha_encoder_layer layer(void)
{
    mha_encoder_layer ly = mha_encoder_layer_defaults();
    ly.self_attn = module();
    ly.dim_feedforward = F;
    ly.linear1_weight = w1; ly.linear2_weight = w2;
    ly.norm1_weight = n1; ly.norm2_weight = n2;
    return ly;
}
/* A cache of B rows, Hkv KV heads, head width D, capacity CAP, rows holding n0 and n1 tokens. */
static mha_kv_cache cache(int Hkv, int n0, int n1)
{
    mha_kv_cache c;
    memset(&c, 0, sizeof c);
    c.B = B; c.Hkv = Hkv; c.D = D; c.capacity = CAP; c.k = kc; c.v = vc; c.len = len;
    len[0] = n0; len[1] = n1;
    return c;
}
static mha_run no_run(void)
{
    mha_run r;
    memset(&r, 0, sizeof r);
    return r;
}
/* a module plan for B rows of L queries and L keys (CAP with MHA_PLAN_CACHE: Lk >= the capacity) */
static mha_plan *plan_module(const mha_module *m, const mha_options *o, unsigned flags)
{
    mha_plan *p = NULL;
    mha_error e;
    if (mha_module_plan(m, B, L, (flags & MHA_PLAN_CACHE) ? CAP : L, o, flags, NULL, 0, &p, &e) != MHA_OK)
        CHECK(0, "module plan: %s", e.message);
    return p;
}
static mha_plan *plan_sdpa(int Lk, const mha_options *o, unsigned flags)
{
    mha_plan *p = NULL;
    mha_error e;
    if (mha_sdpa_plan(B, H, L, Lk, D, D, o, flags, NULL, 0, &p, &e) != MHA_OK) CHECK(0, "sdpa plan: %s", e.message);
    return p;
}

/* ------------------------------------------------------------ 1-3 */

static void test_slopes_and_plans(void)
{
    float slopes[H];
    mha_sizes sz = {1, 2, 3};
    mha_module m = module();
    mha_plan *p = plan_module(&m, NULL, 0);
    watch_outputs();
    ec_watch(slopes, sizeof slopes, 1);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_alibi_slopes", "slopes", mha_alibi_slopes(H, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_alibi_slopes", "H", mha_alibi_slopes(0, slopes, ERR));
    ec_watch(&sz, sizeof sz, 0);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_plan_sizes", "sizes", mha_plan_sizes(p, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_plan_sizes", "plan", mha_plan_sizes(NULL, &sz, ERR));
    {   /* memory that is not a plan */
        double junk[64];
        memset(junk, 0, sizeof junk);
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_plan_sizes", "plan", mha_plan_sizes((const mha_plan *)(void *)junk,
                                                                                    &sz, ERR));
    }
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_plan_repack", "plan", mha_plan_repack(NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_plan_repack", "plan", mha_plan_repack(p, ERR));   /* not MHA_PLAN_PACK */
    mha_plan_destroy(p);
    mha_plan_destroy(NULL);   /* cannot fail */
}

/* -------------------------------------------------------------- 4 GEMM */

static void test_gemm(void)
{
    mha_sizes sz;
    mha_plan *p = NULL;
    mha_run r = no_run();
    mha_error e;
    char ws[64];
    watch_outputs();
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm", "A",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1.0f, NULL, 2, x, 2, 0.0f, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm", "B",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1.0f, x, 2, NULL, 2, 0.0f, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm", "N",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, -1, 2, 1.0f, x, 2, x, 2, 0.0f, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm", "lda",   /* A^T is K x M: lda >= M */
              mha_gemm(MHA_TRANS, MHA_NO_TRANS, 3, 2, 2, 1.0f, x, 2, x, 2, 0.0f, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_gemm", "ta",
              mha_gemm((mha_trans)2, MHA_NO_TRANS, 2, 2, 2, 1.0f, x, 2, x, 2, 0.0f, out, 2, NULL, ERR));
    r.lse = lse;   /* a GEMM writes no row statistics */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_gemm", "run->lse",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1.0f, x, 2, x, 2, 0.0f, out, 2, &r, ERR));
    r = no_run();
    r.workspace = ws; r.workspace_bytes = sizeof ws;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_gemm", "run->workspace_bytes",
              mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, 40, 40, 40, 1.0f, x, 40, x, 40, 0.0f, out, 40, &r, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm_plan_size", "sizes",
              mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm_plan_size", "K",
              mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 0, 1, &sz, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_gemm_plan_size", "num_threads",
              mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, -1, &sz, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm_plan", "plan",
              mha_gemm_plan(MHA_NO_TRANS, MHA_NO_TRANS, 2, 2, 2, 1, NULL, 0, NULL, ERR));
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_gemm_plan", "tb",
              mha_gemm_plan(MHA_NO_TRANS, (mha_trans)5, 2, 2, 2, 1, NULL, 0, &p, ERR));
    CHECK(mha_gemm_plan(MHA_NO_TRANS, MHA_NO_TRANS, 2, 3, 4, 1, NULL, 0, &p, &e) == MHA_OK, "gemm plan: %s",
          e.message);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm_run", "plan",
              mha_gemm_run(NULL, 1.0f, x, 4, x, 3, 0.0f, out, 3, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_gemm_run", "C", mha_gemm_run(p, 1.0f, x, 4, x, 3, 0.0f, NULL, 3, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm_run", "ldc", mha_gemm_run(p, 1.0f, x, 4, x, 3, 0.0f, out, 2, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_gemm_run", "ldb", mha_gemm_run(p, 1.0f, x, 4, x, 2, 0.0f, out, 3, NULL, ERR));
    r = no_run();
    r.cache = NULL; r.saved = out; r.saved_bytes = 4;   /* a GEMM has no saved forward */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_gemm_run", "run->saved",
              mha_gemm_run(p, 1.0f, x, 4, x, 3, 0.0f, out, 3, &r, ERR));
    r = no_run();
    r.workspace = ws; r.workspace_bytes = 1;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_gemm_run", "run->workspace_bytes",
              mha_gemm_run(p, 1.0f, x, 4, x, 3, 0.0f, out, 3, &r, ERR));
    mha_plan_destroy(p);
}

/* ------------------------------------------------------------- 5 SDPA */

static void test_sdpa(void)
{
    mha_options o;
    mha_sizes sz;
    mha_run r;
    mha_kv_cache c;
    mha_plan *p, *pw, *pt, *pc;
    float slopes[H] = {0.5f, INFINITY}, sinks[H] = {0.0f, NAN};
    int rows[2] = {1, 7};
    unsigned char kpm[B * L] = {0};
    watch_outputs();
    memset(&o, 0, sizeof o);
    /* one shot */
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_forward", "q", mha_sdpa_forward(B, H, L, L, D, D, NULL, x, x, &o, out,
                                                                              NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_forward", "out", mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, NULL,
                                                                                NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_forward", "Lq", mha_sdpa_forward(B, H, 0, L, D, D, x, x, x, &o, out,
                                                                               NULL, ERR));
    o.window = 1; o.window_left = -2;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "opt->window_left",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    o.window_left = 1; o.window_right = -7;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "opt->window_right",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    o.softcap = -1.0f;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "opt->softcap",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    o.alibi = 1; o.alibi_slopes = slopes;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "opt->alibi_slopes",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    o.sinks = sinks;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "opt->sinks",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    o.num_kv_heads = -1;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_forward", "opt->num_kv_heads",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    o.num_kv_heads = 4;   /* more KV heads than query heads */
    EC_REFUSE(MHA_ERR_HEADS_DIVIDE, "mha_sdpa_forward", "opt->num_kv_heads",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    o.key_padding_mask.kind = MHA_MASK_BOOL; o.key_padding_mask.data = kpm; o.key_padding_mask.ndim = 2;
    o.key_padding_mask.shape[0] = B; o.key_padding_mask.shape[1] = L + 1;
    EC_REFUSE(MHA_ERR_MASK_SHAPE, "mha_sdpa_forward", "opt->key_padding_mask.shape",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    r = no_run();
    r.sinks_grad = lse;   /* a forward writes no gradient */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "run->sinks_grad",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, &r, ERR));
    r = no_run();
    r.weights = wts; r.n_rows = -1;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_forward", "run->n_rows",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, &r, ERR));
    r.n_rows = 2;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_forward", "run->rows",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, &r, ERR));
    r.rows = rows;   /* row 7 of 5 */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "run->rows",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, &r, ERR));
    r.weights = NULL; rows[1] = 2;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_forward", "run->weights",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, &r, ERR));
    r = no_run();
    r.saved = out; r.saved_bytes = 8;   /* too small for this shape's saved forward */
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_sdpa_forward", "run->saved_bytes",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, &r, ERR));
    r = no_run();
    r.saved_bytes = 64;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_forward", "run->saved",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, &r, ERR));
    fail_alloc = 1;
    EC_REFUSE(MHA_ERR_OUT_OF_MEMORY, "mha_sdpa_forward", "run->workspace",
              mha_sdpa_forward(B, H, L, L, D, D, x, x, x, &o, out, NULL, ERR));
    fail_alloc = 0;
    /* over a cache (one shot) */
    c = cache(1, 3, 3);
    ec_watch(len, sizeof len, 0);
    ec_watch(kc, sizeof kc, 0);
    r = no_run();
    r.cache = &c;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "k",   /* the keys are the cache's */
              mha_sdpa_forward(B, H, 1, 0, D, D, x, x, NULL, &o, out, &r, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "Lk",
              mha_sdpa_forward(B, H, 1, L, D, D, x, NULL, NULL, &o, out, &r, ERR));
    o.num_kv_heads = 2;   /* the cache holds 1 */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "cache->Hkv",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    memset(&o, 0, sizeof o);
    c.D = D + 1;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "cache->D",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    c.D = D; c.B = B + 1;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "cache->B",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    c.B = B; c.ring = 1; c.n_keep = CAP;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "cache->n_keep",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    c.ring = 0; c.n_keep = 0; len[1] = CAP + 1;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "cache->len",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    len[1] = 3; c.v = NULL;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_forward", "cache->v",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    c.v = vc; c.capacity = 0;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_forward", "cache->capacity",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    c.capacity = CAP;
    r.weights = wts;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "run->weights",
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    r.weights = NULL;
    o.causal = 1;
    o.attn_mask.kind = MHA_MASK_BOOL; o.attn_mask.data = kpm; o.attn_mask.ndim = 2;
    o.attn_mask.shape[0] = 1; o.attn_mask.shape[1] = CAP;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_forward", "opt->attn_mask",   /* a cache takes no masks */
              mha_sdpa_forward(B, H, 1, 0, D, D, x, NULL, NULL, &o, out, &r, ERR));
    memset(&o, 0, sizeof o);
    watch_outputs();

    /* backward (one shot) */
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_backward", "dout",
              mha_sdpa_backward(B, H, L, L, D, D, x, x, x, NULL, &o, dx, NULL, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_backward", "v",
              mha_sdpa_backward(B, H, L, L, D, D, x, x, NULL, dout, &o, dx, NULL, NULL, NULL, ERR));
    r = no_run();
    r.weights = wts;   /* a backward returns no weights */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_backward", "run->weights",
              mha_sdpa_backward(B, H, L, L, D, D, x, x, x, dout, &o, dx, NULL, NULL, &r, ERR));
    r = no_run();
    r.lse = lse;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_backward", "run->lse",
              mha_sdpa_backward(B, H, L, L, D, D, x, x, x, dout, &o, dx, NULL, NULL, &r, ERR));
    r = no_run();
    r.sinks_grad = lse;   /* no opt->sinks: no gradient to add */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_backward", "run->sinks_grad",
              mha_sdpa_backward(B, H, L, L, D, D, x, x, x, dout, &o, dx, NULL, NULL, &r, ERR));
    o.scale = -0.5f;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_backward", "opt->scale",
              mha_sdpa_backward(B, H, L, L, D, D, x, x, x, dout, &o, dx, NULL, NULL, NULL, ERR));
    memset(&o, 0, sizeof o);

    /* plans */
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_plan_size", "sizes",
              mha_sdpa_plan_size(B, H, L, L, D, D, &o, 0, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_plan_size", "Dv", mha_sdpa_plan_size(B, H, L, L, D, 0, &o, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_plan_size", "flags",   /* SDPA has no weights to pack */
              mha_sdpa_plan_size(B, H, L, L, D, D, &o, MHA_PLAN_PACK, &sz, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_plan_size", "flags",   /* a cache holds D-wide values */
              mha_sdpa_plan_size(B, H, L, L, D, D + 1, &o, MHA_PLAN_CACHE, &sz, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_plan", "plan", mha_sdpa_plan(B, H, L, L, D, D, &o, 0, NULL, 0, NULL, ERR));
    o.kv_dtype = (mha_dtype)3;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_sdpa_plan_size", "opt->kv_dtype",
              mha_sdpa_plan_size(B, H, L, L, D, D, &o, 0, &sz, ERR));
    o.kv_dtype = MHA_BF16;   /* 16-bit K/V are forward only */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_plan_size", "opt->kv_dtype",
              mha_sdpa_plan_size(B, H, L, L, D, D, &o, MHA_PLAN_TRAINING, &sz, ERR));
    o.kv_dtype = MHA_F32;
    o.window = 1; o.window_left = 0; o.window_right = -5;
    {
        mha_plan *q = NULL;
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_plan", "opt->window_right",
                  mha_sdpa_plan(B, H, L, L, D, D, &o, 0, NULL, 0, &q, ERR));
        CHECK(q == NULL, "a refused plan leaves *plan alone");
    }
    memset(&o, 0, sizeof o);

    /* runs */
    p = plan_sdpa(L, &o, 0);
    pw = plan_sdpa(L, &o, MHA_PLAN_WEIGHTS);
    pt = plan_sdpa(L, &o, MHA_PLAN_TRAINING);
    o.num_kv_heads = 1;
    pc = plan_sdpa(CAP, &o, MHA_PLAN_CACHE);
    memset(&o, 0, sizeof o);
    r = no_run();
    r.weights = wts;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "run->weights",   /* without MHA_PLAN_WEIGHTS */
              mha_sdpa_run_forward(p, L, L, x, x, x, out, &r, ERR));
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "Lk", mha_sdpa_run_forward(pw, L, L + 1, x, x, x, out, &r,
                                                                                       ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_sdpa_run_forward", "Lq", mha_sdpa_run_forward(pw, -3, L, x, x, x, out, &r,
                                                                                        ERR));
    r.rows = rows; r.n_rows = 1;   /* chosen rows need MHA_PLAN_ROWS (or MHA_PLAN_WEIGHTS) */
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "run->rows",
              mha_sdpa_run_forward(p, L, L, x, x, x, out, &r, ERR));
    {
        mha_plan *pr = plan_sdpa(L, &o, MHA_PLAN_ROWS);
        r.rows = NULL; r.n_rows = 0;   /* whole matrices need MHA_PLAN_WEIGHTS */
        EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "run->weights",
                  mha_sdpa_run_forward(pr, L, L, x, x, x, out, &r, ERR));
        mha_plan_destroy(pr);
    }
    r = no_run();
    r.saved = out; r.saved_bytes = sizeof out;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "run->saved",   /* without MHA_PLAN_TRAINING */
              mha_sdpa_run_forward(p, L, L, x, x, x, out, &r, ERR));
    CHECK(mha_plan_sizes(pt, &sz, NULL) == MHA_OK && sz.saved > 8, "training plan's saved bytes");
    r.saved_bytes = sz.saved - 1;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_sdpa_run_forward", "run->saved_bytes",
              mha_sdpa_run_forward(pt, L, L, x, x, x, out, &r, ERR));
    r = no_run();
    r.key_padding_mask = kpm;   /* the plan has no key_padding_mask */
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "run->key_padding_mask",
              mha_sdpa_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r = no_run();
    CHECK(mha_plan_sizes(p, &sz, NULL) == MHA_OK, "sizes");
    r.workspace = dx; r.workspace_bytes = 16;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_sdpa_run_forward", "run->workspace_bytes",
              mha_sdpa_run_forward(p, L, L, x, x, x, out, &r, ERR));
    c = cache(1, 3, 3);
    ec_watch(len, sizeof len, 0);
    r = no_run();
    r.cache = &c;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "run->cache",   /* without MHA_PLAN_CACHE */
              mha_sdpa_run_forward(p, 1, 0, x, NULL, NULL, out, &r, ERR));
    c.capacity = CAP + 1;   /* more than the plan's Lk (the cache's memory is larger than it says: not read) */
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_forward", "cache->capacity",
              mha_sdpa_run_forward(pc, 1, 0, x, NULL, NULL, out, &r, ERR));
    c.capacity = CAP; c.Hkv = 2;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_run_forward", "cache->Hkv",
              mha_sdpa_run_forward(pc, 1, 0, x, NULL, NULL, out, &r, ERR));
    c.Hkv = 1; c.dtype = MHA_BF16;   /* a BF16 cache for a plan of float32 keys and values */
    EC_REFUSE(MHA_ERR_DTYPE, "mha_sdpa_run_forward", "cache->dtype",
              mha_sdpa_run_forward(pc, 1, 0, x, NULL, NULL, out, &r, ERR));
    c.dtype = MHA_F32;
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_sdpa_run_forward", "cache->len",   /* 4 queries, 3 tokens */
              mha_sdpa_run_forward(pc, 4, 0, x, NULL, NULL, out, &r, ERR));
    r.saved = out; r.saved_bytes = sizeof out;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_run_forward", "run->saved",
              mha_sdpa_run_forward(pc, 1, 0, x, NULL, NULL, out, &r, ERR));
    watch_outputs();
    r = no_run();
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_sdpa_run_backward", "plan",   /* without MHA_PLAN_TRAINING */
              mha_sdpa_run_backward(p, L, L, x, x, x, dout, dx, NULL, NULL, &r, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sdpa_run_backward", "k",
              mha_sdpa_run_backward(pt, L, L, x, NULL, x, dout, dx, NULL, NULL, &r, ERR));
    r.cache = &c;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sdpa_run_backward", "run->cache",
              mha_sdpa_run_backward(pt, L, L, x, x, x, dout, dx, NULL, NULL, &r, ERR));
    {   /* a saved region no forward wrote, and one written at other lengths */
        void *sv;
        CHECK(mha_plan_sizes(pt, &sz, NULL) == MHA_OK, "sizes");
        sv = calloc(1, sz.saved);
        r = no_run();
        r.saved = sv; r.saved_bytes = sz.saved;
        EC_REFUSE(MHA_ERR_SAVED, "mha_sdpa_run_backward", "run->saved",
                  mha_sdpa_run_backward(pt, L, L, x, x, x, dout, dx, NULL, NULL, &r, ERR));
        CHECK(mha_sdpa_run_forward(pt, L - 1, L, x, x, x, x2, &r, NULL) == MHA_OK, "forward that saves (Lq %d)", L - 1);
        EC_REFUSE(MHA_ERR_SAVED, "mha_sdpa_run_backward", "run->saved",
                  mha_sdpa_run_backward(pt, L, L, x, x, x, dout, dx, NULL, NULL, &r, ERR));
        free(sv);
    }
    mha_plan_destroy(p); mha_plan_destroy(pw); mha_plan_destroy(pt); mha_plan_destroy(pc);
}

/* ----------------------------------------------------------- 6 module */

static void test_module(void)
{
    mha_module m = module(), m2;
    mha_options o;
    mha_sizes sz;
    mha_run r;
    mha_kv_cache c;
    mha_module_grad g;
    mha_plan *p, *pt, *pc, *psep;
    unsigned char am[L * L] = {0};
    float sinks[H] = {0.1f, -0.2f}, sg[H];
    mha_error e;
    watch_outputs();
    memset(&o, 0, sizeof o);
    memset(&g, 0, sizeof g);
    /* the module's own fields, nested */
    m2 = m; m2.num_kv_heads = -1;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_module_forward", "m->num_kv_heads",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2.num_kv_heads = 3;
    EC_REFUSE(MHA_ERR_HEADS_DIVIDE, "mha_module_forward", "m->num_kv_heads",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2 = m; m2.rope.kind = (mha_rope_kind)3;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_module_forward", "m->rope.kind",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2.rope.kind = MHA_ROPE_HALF; m2.rope.rotary_dim = 3;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_forward", "m->rope.rotary_dim",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2.rope.rotary_dim = 0; m2.rope.theta = -1.0f;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_forward", "m->rope.theta",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2 = m; m2.in_proj_weight = NULL; m2.q_proj_weight = w_in; m2.v_proj_weight = w_in;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_forward", "m->k_proj_weight",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2 = m; m2.bias_v = bv;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_forward", "m->bias_k",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2 = m; m2.vdim = -4;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_module_forward", "m->vdim",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    m2 = m; m2.vdim = E + 2;   /* in_proj_weight needs vdim = E */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_forward", "m->vdim",
              mha_module_forward(&m2, B, L, L, x, x, x, &o, out, NULL, ERR));
    o.position_offset = -1;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_forward", "opt->position_offset",
              mha_module_forward(&m, B, L, L, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    o.attn_mask.kind = MHA_MASK_FLOAT; o.attn_mask.data = am; o.attn_mask.ndim = 3;
    o.attn_mask.shape[0] = B; o.attn_mask.shape[1] = L; o.attn_mask.shape[2] = L;   /* B, not B*H */
    EC_REFUSE(MHA_ERR_MASK_SHAPE, "mha_module_forward", "opt->attn_mask.shape",
              mha_module_forward(&m, B, L, L, x, x, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);
    r = no_run();
    r.weights = wts; r.n_rows = 1; r.rows = &r.n_rows;   /* row 1 */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_forward", "run->rows",   /* out overlaps query */
              mha_module_forward(&m, B, L, L, out, x, x, &o, out, &r, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_forward", "value",
              mha_module_forward(&m, B, L, L, x, x, NULL, &o, out, NULL, ERR));

    /* backward (one shot) */
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_backward", "m",
              mha_module_backward(NULL, B, L, L, x, x, x, dout, &o, dx, NULL, NULL, &g, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_backward", "dout",
              mha_module_backward(&m, B, L, L, x, x, x, NULL, &o, dx, NULL, NULL, &g, NULL, ERR));
    r = no_run();
    r.weights = wts;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_backward", "run->weights",
              mha_module_backward(&m, B, L, L, x, x, x, dout, &o, dx, NULL, NULL, &g, &r, ERR));
    r = no_run();
    r.sinks_grad = sg;   /* no opt->sinks: nothing to take a gradient of */
    ec_watch(sg, sizeof sg, 1);
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_backward", "run->sinks_grad",
              mha_module_backward(&m, B, L, L, x, x, x, dout, &o, dx, NULL, NULL, &g, &r, ERR));
    watch_outputs();

    /* plans */
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_plan_size", "sizes",
              mha_module_plan_size(&m, B, L, L, &o, 0, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_module_plan_size", "B", mha_module_plan_size(&m, 0, L, L, &o, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_plan_size", "flags",
              mha_module_plan_size(&m, B, L, L, &o, 0x100u, &sz, ERR));
    m2 = m; m2.bias_k = bk; m2.bias_v = bv;   /* a cache serves plain self-attention */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_plan_size", "flags",
              mha_module_plan_size(&m2, B, L, L, &o, MHA_PLAN_CACHE, &sz, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_plan", "plan", mha_module_plan(&m, B, L, L, &o, 0, NULL, 0, NULL, ERR));
    {   /* 16-bit weights: a value outside the enum, and a plan that does not pack them */
        mha_module w = m;
        w.weight_dtype = (mha_dtype)9;
        EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_module_plan_size", "m->weight_dtype",
                  mha_module_plan_size(&w, B, L, L, &o, MHA_PLAN_PACK, &sz, ERR));
        w.weight_dtype = MHA_BF16;
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_plan_size", "m->weight_dtype",
                  mha_module_plan_size(&w, B, L, L, &o, 0, &sz, ERR));
    }
    o.kv_dtype = MHA_F16;   /* a module's K/V are its own float32 projections, but for a cache */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_plan_size", "opt->kv_dtype",
              mha_module_plan_size(&m, B, L, L, &o, 0, &sz, ERR));
    o.kv_dtype = MHA_F32;
    o.softcap = NAN;
    {
        mha_plan *q = NULL;
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_plan", "opt->softcap",
                  mha_module_plan(&m, B, L, L, &o, 0, NULL, 0, &q, ERR));
        memset(&o, 0, sizeof o);
        CHECK(mha_module_plan_size(&m, B, L, L, &o, MHA_PLAN_PACK, &sz, &e) == MHA_OK, "size: %s", e.message);
        EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_plan", "mem_bytes",
                  mha_module_plan(&m, B, L, L, &o, MHA_PLAN_PACK, dx, sz.plan - 1, &q, ERR));
        CHECK(q == NULL, "a refused plan leaves *plan alone");
    }

    /* runs */
    p = plan_module(&m, &o, 0);
    pt = plan_module(&m, &o, MHA_PLAN_TRAINING);
    pc = plan_module(&m, &o, MHA_PLAN_CACHE | MHA_PLAN_PACK);
    m2 = m; m2.in_proj_weight = NULL; m2.q_proj_weight = w_in; m2.k_proj_weight = w_in; m2.v_proj_weight = w_in;
    m2.kdim = E / 2;
    psep = plan_module(&m2, &o, 0);
    r = no_run();
    r.weights = wts;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->weights",   /* without MHA_PLAN_WEIGHTS */
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r.n_rows = 1; r.rows = &r.n_rows;   /* row 1 */
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->rows",   /* without MHA_PLAN_ROWS */
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r = no_run();
    r.lse = lse;   /* allowed: the forward writes the row statistics; but not past the plan */
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "Lq",
              mha_module_run_forward(p, L + 1, L, x, x, x, out, &r, ERR));
    r = no_run();
    r.sinks_grad = sg;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_run_forward", "run->sinks_grad",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r = no_run();
    r.saved = x2; r.saved_bytes = sizeof x2;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->saved",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r = no_run();
    r.workspace = x2; r.workspace_bytes = 8;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_run_forward", "run->workspace_bytes",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    r = no_run();
    r.attn_mask = am;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->attn_mask",
              mha_module_run_forward(p, L, L, x, x, x, out, &r, ERR));
    /* decoding over a cache */
    c = cache(H, 2, 3);
    ec_watch(len, sizeof len, 0);
    ec_watch(kc, sizeof kc, 0);
    ec_watch(vc, sizeof vc, 0);
    r = no_run();
    r.cache = &c;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_forward", "run->cache",   /* without MHA_PLAN_CACHE */
              mha_module_run_forward(p, 1, 0, x, NULL, NULL, out, &r, ERR));
    c.Hkv = 1;   /* the module has 2 KV heads */
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_run_forward", "cache->Hkv",
              mha_module_run_forward(pc, 1, 0, x, NULL, NULL, out, &r, ERR));
    c.Hkv = H;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_run_forward", "key",   /* keys come from query */
              mha_module_run_forward(pc, 1, 0, x, x2, NULL, out, &r, ERR));
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_module_run_forward", "cache->len",   /* row 1: 3 + 4 > 6 */
              mha_module_run_forward(pc, 4, 0, x, NULL, NULL, out, &r, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_run_forward", "Lk",
              mha_module_run_forward(pc, 1, 1, x, NULL, NULL, out, &r, ERR));
    c.k = NULL;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_run_forward", "cache->k",
              mha_module_run_forward(pc, 1, 0, x, NULL, NULL, out, &r, ERR));
    c.k = kc; len[0] = -1;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_run_forward", "cache->len",
              mha_module_run_forward(pc, 1, 0, x, NULL, NULL, out, &r, ERR));
    len[0] = 2;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_run_forward", "out",
              mha_module_run_forward(pc, 1, 0, x, NULL, NULL, NULL, &r, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_module_run_forward", "query",
              mha_module_run_forward(pc, 1, 0, NULL, NULL, NULL, out, &r, ERR));
    watch_outputs();
    /* backward runs */
    r = no_run();
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_module_run_backward", "plan",
              mha_module_run_backward(p, L, L, x, x, x, dout, dx, NULL, NULL, &g, &r, ERR));
    {
        mha_plan *ps = plan_sdpa(L, &o, MHA_PLAN_TRAINING);
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_run_backward", "plan",   /* an SDPA plan */
                  mha_module_run_backward(ps, L, L, x, x, x, dout, dx, NULL, NULL, &g, &r, ERR));
        mha_plan_destroy(ps);
    }
    r.cache = &c;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_module_run_backward", "run->cache",
              mha_module_run_backward(pt, L, L, x, x, x, dout, dx, NULL, NULL, &g, &r, ERR));
    {
        void *sv;
        CHECK(mha_plan_sizes(pt, &sz, NULL) == MHA_OK, "sizes");
        sv = calloc(1, sz.saved);
        r = no_run();
        r.saved = sv; r.saved_bytes = sz.saved - 1;
        EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_module_run_backward", "run->saved_bytes",
                  mha_module_run_backward(pt, L, L, x, x, x, dout, dx, NULL, NULL, &g, &r, ERR));
        r.saved_bytes = sz.saved;
        EC_REFUSE(MHA_ERR_SAVED, "mha_module_run_backward", "run->saved",
                  mha_module_run_backward(pt, L, L, x, x, x, dout, dx, NULL, NULL, &g, &r, ERR));
        CHECK(mha_module_run_forward(pt, L, L - 2, x, x, x, x2, &r, NULL) == MHA_OK, "forward that saves");
        EC_REFUSE(MHA_ERR_SAVED, "mha_module_run_backward", "run->saved",   /* written at Lk - 2 */
                  mha_module_run_backward(pt, L, L, x, x, x, dout, dx, NULL, NULL, &g, &r, ERR));
        free(sv);
    }
    {   /* run->sinks_grad with opt->sinks is accepted; a NaN sink logit is not */
        mha_plan *ps;
        o.sinks = sinks;
        ps = plan_module(&m, &o, MHA_PLAN_TRAINING);
        r = no_run();
        r.sinks_grad = sg;
        memset(sg, 0, sizeof sg);
        CHECK(mha_module_run_backward(ps, L, L, x, x, x, dout, x2, NULL, NULL, &g, &r, &e) == MHA_OK,
              "sinks_grad with sinks: %s", e.message);
        mha_plan_destroy(ps);
        memset(&o, 0, sizeof o);
    }
    mha_plan_destroy(p); mha_plan_destroy(pt); mha_plan_destroy(pc); mha_plan_destroy(psep);
}

/* --------------------------------------------------- 7 cache, RoPE, merge */

static void test_decoding_pieces(void)
{
    mha_kv_cache c = cache(1, 2, 5);
    mha_rope rope;
    float kn[B * 1 * 2 * D] = {0}, xr[B * H * L * D], o0[2 * D], l0[2];
    const float *outs[2], *lses[2];
    int pos[B * L];
    memset(&rope, 0, sizeof rope);
    rope.kind = MHA_ROPE_INTERLEAVED;
    ec_clear();
    ec_watch(kc, sizeof kc, 0);
    ec_watch(vc, sizeof vc, 0);
    ec_watch(len, sizeof len, 0);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_kv_cache_append", "cache", mha_kv_cache_append(NULL, 1, kn, kn, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_kv_cache_append", "k_new", mha_kv_cache_append(&c, 1, NULL, kn, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_kv_cache_append", "n", mha_kv_cache_append(&c, 0, kn, kn, ERR));
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_kv_cache_append", "cache->len",   /* row 1: 5 + 2 > 6 */
              mha_kv_cache_append(&c, 2, kn, kn, ERR));
    c.Hkv = 0;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_kv_cache_append", "cache->Hkv", mha_kv_cache_append(&c, 1, kn, kn, ERR));
    c.Hkv = 1; c.len = NULL;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_kv_cache_append", "cache->len", mha_kv_cache_append(&c, 1, kn, kn, ERR));
    c.len = len; c.ring = 1; c.n_keep = -1;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_kv_cache_append", "cache->n_keep", mha_kv_cache_append(&c, 1, kn, kn, ERR));
    c.n_keep = 2;   /* a wrapping chunk longer than the rolling part (6 - 2) */
    EC_REFUSE(MHA_ERR_CAPACITY, "mha_kv_cache_append", "cache->len", mha_kv_cache_append(&c, 5, kn, kn, ERR));
    c.ring = 0; c.n_keep = 0; c.dtype = (mha_dtype)-1;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_kv_cache_append", "cache->dtype", mha_kv_cache_append(&c, 1, kn, kn, ERR));
    c.dtype = MHA_F32;

    {   /* 16-bit storage conversions */
        unsigned short h[8];
        float f[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        ec_clear();
        ec_watch(h, sizeof h, 1);
        ec_watch(f, sizeof f, 0);
        EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_convert", "to", mha_convert(8, MHA_F32, f, (mha_dtype)3, h, ERR));
        EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_convert", "from", mha_convert(8, (mha_dtype)-2, f, MHA_F16, h, ERR));
        EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_convert", "dst", mha_convert(8, MHA_F32, f, MHA_F16, NULL, ERR));
        EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_convert", "src", mha_convert(8, MHA_F32, NULL, MHA_BF16, h, ERR));
        EC_REFUSE(MHA_ERR_OVERFLOW, "mha_convert", "n", mha_convert((size_t)-1 / 2, MHA_F32, f, MHA_BF16, h, ERR));
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_convert", "dst",   /* float32 to 16 bits over itself */
                  mha_convert(8, MHA_F32, f, MHA_F16, (void *)(f + 1), ERR));
        ec_clear();
    }

    ec_clear();
    tu_fill(&(tu_rng){5}, xr, sizeof xr / sizeof *xr, 1.0f);
    ec_watch(xr, sizeof xr, 0);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_rope_forward", "rope", mha_rope_forward(NULL, B, H, L, D, 0, NULL, xr, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_rope_forward", "x", mha_rope_forward(&rope, B, H, L, D, 0, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_rope_forward", "H", mha_rope_forward(&rope, B, 0, L, D, 0, NULL, xr, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_rope_forward", "pos0", mha_rope_forward(&rope, B, H, L, D, -1, NULL, xr,
                                                                                     ERR));
    EC_REFUSE(MHA_ERR_OVERFLOW, "mha_rope_forward", "pos0", mha_rope_forward(&rope, B, H, L, D, INT_MAX - 2, NULL, xr,
                                                                             ERR));
    memset(pos, 0, sizeof pos);
    pos[B * L - 1] = -3;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_rope_forward", "positions",
              mha_rope_forward(&rope, B, H, L, D, 0, pos, xr, ERR));
    rope.kind = (mha_rope_kind)-2;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_rope_forward", "rope->kind", mha_rope_forward(&rope, B, H, L, D, 0, NULL, xr, ERR));
    rope.kind = MHA_ROPE_HALF; rope.rotary_dim = D + 2;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_rope_backward", "rope->rotary_dim",
              mha_rope_backward(&rope, B, H, L, D, 0, NULL, xr, ERR));
    rope.rotary_dim = 0; rope.theta = INFINITY;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_rope_backward", "rope->theta",
              mha_rope_backward(&rope, B, H, L, D, 0, NULL, xr, ERR));
    rope.theta = 0.0f;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_rope_backward", "dx", mha_rope_backward(&rope, B, H, L, D, 0, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_rope_backward", "L", mha_rope_backward(&rope, B, H, 0, D, 0, NULL, xr, ERR));

    ec_clear();
    ec_watch(o0, sizeof o0, 1);
    ec_watch(l0, sizeof l0, 1);
    outs[0] = x; outs[1] = NULL; lses[0] = x2; lses[1] = x2;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_attn_merge", "outs", mha_attn_merge(2, 2, D, NULL, lses, o0, l0, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_attn_merge", "lses", mha_attn_merge(2, 2, D, outs, NULL, o0, l0, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_attn_merge", "out", mha_attn_merge(2, 2, D, outs, lses, NULL, l0, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_attn_merge", "outs[p]", mha_attn_merge(2, 2, D, outs, lses, o0, l0, ERR));
    outs[1] = x;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_attn_merge", "nparts", mha_attn_merge(0, 2, D, outs, lses, o0, l0, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_attn_merge", "Dv", mha_attn_merge(2, 2, 0, outs, lses, o0, l0, ERR));
    ec_clear();
}

/* ---------------------------------------------------------- 8 encoder */

static void test_encoder(void)
{
    mha_encoder_layer ly = layer(), l2;
    mha_options o;
    mha_sizes sz;
    mha_run r;
    mha_kv_cache c;
    mha_plan *p = NULL, *pt = NULL;
    mha_encoder_layer_grad g;
    memset(&o, 0, sizeof o);
    memset(&g, 0, sizeof g);
    watch_outputs();
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_forward", "layer",
              mha_encoder_forward(NULL, B, L, x, &o, out, NULL, ERR));
    l2 = ly; l2.linear2_weight = NULL;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_forward", "layer->linear2_weight",
              mha_encoder_forward(&l2, B, L, x, &o, out, NULL, ERR));
    l2 = ly; l2.norm_first = 2;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_forward", "layer->norm_first",
              mha_encoder_forward(&l2, B, L, x, &o, out, NULL, ERR));
    l2 = ly; l2.layer_norm_eps = -1e-5f;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_forward", "layer->layer_norm_eps",
              mha_encoder_forward(&l2, B, L, x, &o, out, NULL, ERR));
    l2 = ly; l2.dim_feedforward = 0;
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_encoder_forward", "layer->dim_feedforward",
              mha_encoder_forward(&l2, B, L, x, &o, out, NULL, ERR));
    /* the layer's module, named as the caller reaches it: layer->self_attn.* */
    l2 = ly; l2.self_attn.num_heads = 3;
    EC_REFUSE(MHA_ERR_HEADS_DIVIDE, "mha_encoder_forward", "layer->self_attn.num_heads",
              mha_encoder_forward(&l2, B, L, x, &o, out, NULL, ERR));
    l2 = ly; l2.self_attn.out_proj_weight = NULL;
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_forward", "layer->self_attn.out_proj_weight",
              mha_encoder_forward(&l2, B, L, x, &o, out, NULL, ERR));
    l2 = ly; l2.self_attn.num_kv_heads = 3;
    EC_REFUSE(MHA_ERR_HEADS_DIVIDE, "mha_encoder_forward", "layer->self_attn.num_kv_heads",
              mha_encoder_forward(&l2, B, L, x, &o, out, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_forward", "x", mha_encoder_forward(&ly, B, L, NULL, &o, out, NULL,
                                                                                    ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_forward", "y", mha_encoder_forward(&ly, B, L, x, &o, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_forward", "y",   /* y must not overlap x */
              mha_encoder_forward(&ly, B, L, out, &o, out, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_encoder_forward", "L", mha_encoder_forward(&ly, B, 0, x, &o, out, NULL, ERR));
    o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT + 1;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_encoder_forward", "opt->causal_align",
              mha_encoder_forward(&ly, B, L, x, &o, out, NULL, ERR));
    memset(&o, 0, sizeof o);

    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_backward", "dy",
              mha_encoder_backward(&ly, B, L, x, NULL, &o, dx, &g, NULL, ERR));
    l2 = ly; l2.activation = (mha_activation)2;
    EC_REFUSE(MHA_ERR_BAD_ENUM, "mha_encoder_backward", "layer->activation",
              mha_encoder_backward(&l2, B, L, x, dout, &o, dx, &g, NULL, ERR));
    r = no_run();
    r.weights = wts;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_backward", "run->weights",
              mha_encoder_backward(&ly, B, L, x, dout, &o, dx, &g, &r, ERR));

    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_plan_size", "sizes",
              mha_encoder_plan_size(&ly, B, L, &o, 0, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_encoder_plan_size", "B", mha_encoder_plan_size(&ly, -1, L, &o, 0, &sz, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_plan_size", "flags",   /* an encoder runs over no cache */
              mha_encoder_plan_size(&ly, B, L, &o, MHA_PLAN_CACHE, &sz, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_plan", "plan", mha_encoder_plan(&ly, B, L, &o, 0, NULL, 0, NULL, ERR));
    {
        mha_plan *q = NULL;
        l2 = ly; l2.self_attn.kdim = E + 1;
        EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_plan", "layer->self_attn.kdim",
                  mha_encoder_plan(&l2, B, L, &o, 0, NULL, 0, &q, ERR));
        CHECK(q == NULL, "a refused plan leaves *plan alone");
    }

    CHECK(mha_encoder_plan(&ly, B, L, &o, 0, NULL, 0, &p, NULL) == MHA_OK &&
          mha_encoder_plan(&ly, B, L, &o, MHA_PLAN_TRAINING | MHA_PLAN_WEIGHTS, NULL, 0, &pt, NULL) == MHA_OK,
          "encoder plans");
    r = no_run();
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_encoder_run_forward", "L", mha_encoder_run_forward(p, L + 1, x, out, &r, ERR));
    r.weights = wts;
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_encoder_run_forward", "run->weights",
              mha_encoder_run_forward(p, L, x, out, &r, ERR));
    r = no_run();
    c = cache(H, 0, 0);
    r.cache = &c;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_encoder_run_forward", "run->cache",
              mha_encoder_run_forward(pt, L, x, out, &r, ERR));
    r = no_run();
    r.workspace = x2; r.workspace_bytes = 32;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_encoder_run_forward", "run->workspace_bytes",
              mha_encoder_run_forward(p, L, x, out, &r, ERR));
    r = no_run();
    EC_REFUSE(MHA_ERR_EXCEEDS_PLAN, "mha_encoder_run_backward", "plan",
              mha_encoder_run_backward(p, L, x, dout, dx, &g, &r, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_encoder_run_backward", "dy",
              mha_encoder_run_backward(pt, L, x, NULL, dx, &g, &r, ERR));
    {
        void *sv;
        CHECK(mha_plan_sizes(pt, &sz, NULL) == MHA_OK, "sizes");
        sv = calloc(1, sz.saved);
        r.saved = sv; r.saved_bytes = sz.saved;
        EC_REFUSE(MHA_ERR_SAVED, "mha_encoder_run_backward", "run->saved",
                  mha_encoder_run_backward(pt, L, x, dout, dx, &g, &r, ERR));
        free(sv);
    }
    mha_plan_destroy(p); mha_plan_destroy(pt);
}

/* -------------------------------------------------- 9 training pieces */

static void test_training_pieces(void)
{
    size_t bytes = 99;
    mha_run r;
    mha_adamw a = mha_adamw_defaults();
    int tok[3] = {0, 2, 1}, tgt[3] = {0, 1, 3};
    float p[4] = {1, 2, 3, 4}, g4[4] = {0.1f, 0.2f, 0.3f, 0.4f}, m4[4] = {0}, v4[4] = {0}, loss = 5.0f, pe[L * 4];
    int correct = -1;
    watch_outputs();
    ec_watch(&bytes, sizeof bytes, 0);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_linear_workspace_size", "bytes",
              mha_linear_workspace_size(4, 4, 4, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_linear_workspace_size", "in",
              mha_linear_workspace_size(4, 0, 4, &bytes, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_linear_forward", "W", mha_linear_forward(4, E, E, x, NULL, NULL, out, NULL,
                                                                                  ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_linear_forward", "out", mha_linear_forward(4, E, -2, x, w_out, NULL, out, NULL,
                                                                                    ERR));
    r = no_run();
    r.lse = lse;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_linear_forward", "run->lse",
              mha_linear_forward(4, E, E, x, w_out, NULL, out, &r, ERR));
    r = no_run();
    r.workspace = x2; r.workspace_bytes = 4;
    EC_REFUSE(MHA_ERR_WORKSPACE_TOO_SMALL, "mha_linear_forward", "run->workspace_bytes",
              mha_linear_forward(B * L, E, E, x, w_out, NULL, out, &r, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_linear_backward", "dy",
              mha_linear_backward(4, E, E, x, w_out, NULL, dx, NULL, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_linear_backward", "rows",
              mha_linear_backward(-1, E, E, x, w_out, dout, dx, NULL, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_layernorm_forward", "y",
              mha_layernorm_forward(B * L, E, x, n1, NULL, 0.0f, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_layernorm_forward", "eps",
              mha_layernorm_forward(B * L, E, x, n1, NULL, NAN, out, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_layernorm_forward", "E", mha_layernorm_forward(B * L, 0, x, n1, NULL, 0.0f,
                                                                                        out, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_layernorm_backward", "x",
              mha_layernorm_backward(B * L, E, NULL, n1, 0.0f, dout, dx, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_layernorm_backward", "rows",
              mha_layernorm_backward(0, E, x, n1, 0.0f, dout, dx, NULL, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_layernorm_backward", "eps",
              mha_layernorm_backward(B * L, E, x, n1, -INFINITY, dout, dx, NULL, NULL, ERR));
    ec_watch(pe, sizeof pe, 1);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_positional_encoding", "pe", mha_positional_encoding(L, 4, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_positional_encoding", "d", mha_positional_encoding(L, 0, pe, ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_positional_encoding", "L", mha_positional_encoding(-L, 4, pe, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_embedding_forward", "tokens",   /* token 2 of a vocabulary of 2 */
              mha_embedding_forward(3, 2, 4, tok, x, out, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_embedding_forward", "table", mha_embedding_forward(3, 4, 4, tok, NULL, out,
                                                                                            ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_embedding_forward", "vocab", mha_embedding_forward(3, 0, 4, tok, x, out, ERR));
    ec_watch(x2, sizeof x2, 0);   /* dtable is added to */
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_embedding_backward", "dtable",
              mha_embedding_backward(3, 4, 4, tok, dout, NULL, ERR));
    tok[0] = -1;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_embedding_backward", "tokens",
              mha_embedding_backward(3, 4, 4, tok, dout, x2, ERR));
    ec_watch(&loss, sizeof loss, 0);
    ec_watch(&correct, sizeof correct, 0);
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_cross_entropy", "targets",   /* target 3 of V 3 */
              mha_cross_entropy(3, 3, x, tgt, &loss, dx, &correct, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_cross_entropy", "loss", mha_cross_entropy(3, 4, x, tgt, NULL, dx, &correct,
                                                                                   ERR));
    EC_REFUSE(MHA_ERR_INVALID_SIZE, "mha_cross_entropy", "V", mha_cross_entropy(3, 0, x, tgt, &loss, dx, &correct,
                                                                                ERR));
    ec_watch(p, sizeof p, 0);
    ec_watch(m4, sizeof m4, 0);
    ec_watch(v4, sizeof v4, 0);
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_sgd_step", "g", mha_sgd_step(4, p, NULL, 0.1f, 0.0f, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sgd_step", "lr", mha_sgd_step(4, p, g4, -0.1f, 0.0f, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_sgd_step", "weight_decay", mha_sgd_step(4, p, g4, 0.1f, NAN, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_adamw_step", "opt", mha_adamw_step(NULL, 1, 4, p, g4, m4, v4, ERR));
    EC_REFUSE(MHA_ERR_NULL_POINTER, "mha_adamw_step", "v", mha_adamw_step(&a, 1, 4, p, g4, m4, NULL, ERR));
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_adamw_step", "step", mha_adamw_step(&a, 0, 4, p, g4, m4, v4, ERR));
    a.beta1 = 1.0f;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_adamw_step", "opt->beta1", mha_adamw_step(&a, 1, 4, p, g4, m4, v4, ERR));
    a = mha_adamw_defaults();
    a.beta2 = -0.5f;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_adamw_step", "opt->beta2", mha_adamw_step(&a, 1, 4, p, g4, m4, v4, ERR));
    a = mha_adamw_defaults();
    a.eps = -1.0f;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_adamw_step", "opt->eps", mha_adamw_step(&a, 1, 4, p, g4, m4, v4, ERR));
    a = mha_adamw_defaults();
    a.lr = INFINITY;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_adamw_step", "opt->lr", mha_adamw_step(&a, 1, 4, p, g4, m4, v4, ERR));
    a = mha_adamw_defaults();
    a.weight_decay = NAN;
    EC_REFUSE(MHA_ERR_INVALID_ARGUMENT, "mha_adamw_step", "opt->weight_decay",
              mha_adamw_step(&a, 1, 4, p, g4, m4, v4, ERR));
    ec_clear();
}

/* Every public function that returns an mha_status was refused above. */
static void test_coverage(void)
{
    char path[600];
    char *h = pn_read_src("mha.h", path, sizeof path);
    pn_list l;
    int i, n = 0;
    CHECK(h != NULL, "mha.h not found (run from the repository's root)");
    if (!h) return;
    CHECK(pn_scan(h, &l), "mha.h: the end of the declarations not found");
    for (i = 0; i < l.n; ++i) {
        if (l.v[i].kind != PN_FUNCTION || !l.v[i].can_fail) continue;
        ++n;
        CHECK(ec_seen_fn(l.v[i].name), "%s (declared in %s) is never refused by test_api.c", l.v[i].name, path);
    }
    CHECK(n >= 40, "only %d functions that can fail found in %s", n, path);
    printf("NOTE %d public functions that can fail, each refused with its fields checked\n", n);
    free(l.v);
    free(h);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    fill();
    test_slopes_and_plans();
    test_gemm();
    test_sdpa();
    test_module();
    test_decoding_pieces();
    test_encoder();
    test_training_pieces();
    test_coverage();
    ec_clear();
    return tu_finish("api");
}
