/* mha.h - multi-head attention in one C header.                     v0.1.0

   Scaled dot-product and multi-head attention with the weight layout and
   mask semantics of PyTorch's torch.nn.MultiheadAttention, a cache-blocked
   matrix multiply, and no dependencies beyond the C standard library.

   BUILD
     In exactly one C or C++ file:
         #define MHA_IMPLEMENTATION
         #include "mha.h"
     Everywhere else include "mha.h" alone.  The header is C99 and C++ clean.

   USAGE (copy the tensors of a PyTorch state_dict in as they are)
       mha_module m = {0};
       m.embed_dim = 512;  m.num_heads = 8;
       m.in_proj_weight  = w_in;    // state_dict["in_proj_weight"]   [3E, E]
       m.in_proj_bias    = b_in;    // state_dict["in_proj_bias"]     [3E]
       m.out_proj_weight = w_out;   // state_dict["out_proj.weight"]  [E, E]
       m.out_proj_bias   = b_out;   // state_dict["out_proj.bias"]    [E]

       mha_options opt = {0};       // zero = defaults: no mask, scale 1/sqrt(E/H)
       opt.causal = 1;              // query i sees keys 0..i
       // x: [B, L, E] batch-first; out: [B, L, E]; weights: [B, L, L] head average
       mha_status s = mha_forward(&m, B, L, L, x, x, x, &opt, out, weights, NULL, 0);
       if (s != MHA_OK) fprintf(stderr, "mha: %s\n", mha_status_string(s));

   THE MATH  (X: [L, E]; W: [E_out, E_in] as PyTorch stores Linear weights)
       Q = X_q Wq^T + bq     K = X_k Wk^T + bk     V = X_v Wv^T + bv
       split E into H heads of D = E/H columns:  Q_h = Q[:, h*D:(h+1)*D]
       A_h = softmax(Q_h K_h^T * scale + mask)     scale = 1/sqrt(D)
       O   = concat_h(A_h V_h) Wo^T + bo

   CONFIGURATION (define before the implementation include)
       MHA_STATIC          make every function static (private to one file)
       MHA_NO_SIMD         use the portable scalar kernels even where AVX2/NEON exist
       MHA_MALLOC(sz) / MHA_FREE(p)   allocator for the convenience paths
                           (define both or neither)
       MHA_ASSERT(x)       internal invariant checks (default: assert.h)
     SIMD is chosen at compile time: AVX2 when __AVX2__ and __FMA__ are defined
     (-mavx2 -mfma or -march=native), NEON when __ARM_NEON is.  There is no
     run-time CPU detection.  Threads come from OpenMP when built with -fopenmp.

   ERRORS
     Every call returns an mha_status; mha_status_string() describes it.
     On any status other than MHA_OK no output has been written.

   MASKS (nn.MultiheadAttention semantics, see docs/api.md for the full table)
     bool masks:  nonzero = this key is NOT allowed    (MHA_MASK_BOOL)
                  nonzero = this key takes part        (MHA_MASK_BOOL_KEEP,
                                                        like F.scaled_dot_product_attention)
     float masks: added to the scores; -inf blocks the key (MHA_MASK_FLOAT)
     A query whose keys are all blocked gets zero weights and a zero context
     vector (PyTorch gives NaN there).  Blocked keys are skipped, never
     multiplied, so a NaN or Inf in a blocked key or value cannot leak.

   VERSION 0.1.0 (MHA_VERSION_MAJOR/MINOR/PATCH)
   LICENSE  at the end of this file (MIT or public domain, your choice)
*/
#ifndef MHA_H
#define MHA_H

#include <stddef.h>

#define MHA_VERSION_MAJOR 0
#define MHA_VERSION_MINOR 1
#define MHA_VERSION_PATCH 0

#ifndef MHADEF
#ifdef MHA_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define MHADEF static __attribute__((unused))
#else
#define MHADEF static
#endif
#else
#define MHADEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- status */

/* One list makes both the enum and the messages, so they cannot drift. */
#define MHA_STATUS_LIST(X)                                                             \
    X(MHA_OK,                      "success")                                          \
    X(MHA_ERR_NULL_POINTER,        "a required pointer argument is NULL")              \
    X(MHA_ERR_INVALID_SIZE,        "a size argument is zero or negative")              \
    X(MHA_ERR_HEADS_DIVIDE,        "embed_dim is not divisible by num_heads")          \
    X(MHA_ERR_OVERFLOW,            "the sizes are too large: a size product overflows")\
    X(MHA_ERR_MASK_SHAPE,          "a mask's shape does not fit the attention shape")  \
    X(MHA_ERR_INVALID_ARGUMENT,    "an argument has an invalid value (enum, flag or weight combination)") \
    X(MHA_ERR_WORKSPACE_TOO_SMALL, "the workspace is smaller than the *_workspace_size call asked for") \
    X(MHA_ERR_OUT_OF_MEMORY,       "MHA_MALLOC returned NULL")

typedef enum mha_status {
#define MHA__ENUM(name, msg) name,
    MHA_STATUS_LIST(MHA__ENUM)
#undef MHA__ENUM
    MHA_STATUS_COUNT
} mha_status;

/* A readable sentence for a status; never NULL, also for unknown values. */
MHADEF const char *mha_status_string(mha_status s);

/* ---------------------------------------------------------------- matmul */

typedef enum mha_trans { MHA_NO_TRANS = 0, MHA_TRANS = 1 } mha_trans;

/* C = alpha * op(A) * op(B) + beta * C, row-major, op(A) is M x K, op(B) is K x N.
   A is stored M x K (lda >= K) when ta == MHA_NO_TRANS, K x M (lda >= M) when MHA_TRANS;
   B likewise K x N (ldb >= N) or N x K (ldb >= K); C is M x N (ldc >= N).
   When beta == 0, C is never read (NaN in C does not propagate).
   workspace: packing buffers of mha_gemm_workspace_size() bytes, or NULL to
   let the call allocate them through MHA_MALLOC.  */
MHADEF size_t mha_gemm_workspace_size(int M, int N, int K);
MHADEF mha_status mha_gemm(mha_trans ta, mha_trans tb, int M, int N, int K, float alpha,
                           const float *A, int lda, const float *B, int ldb, float beta,
                           float *C, int ldc, void *workspace, size_t workspace_bytes);

/* ---------------------------------------------------------------- masks */

typedef enum mha_mask_kind {
    MHA_MASK_NONE = 0,   /* no mask (the zero default) */
    MHA_MASK_BOOL,       /* unsigned char, nonzero = blocked (nn.MultiheadAttention) */
    MHA_MASK_BOOL_KEEP,  /* unsigned char, nonzero = allowed (F.scaled_dot_product_attention) */
    MHA_MASK_FLOAT       /* float, added to the scaled scores; -inf = blocked */
} mha_mask_kind;

/* A mask tensor and its PyTorch shape.  Accepted shapes:
     attn_mask:        [Lq, Lk] (shared by all batches and heads), [B*H, Lq, Lk]
                       (index b*H + h, as nn.MultiheadAttention), or [B, H, Lq, Lk]
     key_padding_mask: [B, Lk]
   Any other shape is MHA_ERR_MASK_SHAPE.  Data is dense and row-major.  */
typedef struct mha_mask {
    mha_mask_kind kind;
    const void   *data;      /* unsigned char[] for the bool kinds, float[] for FLOAT */
    int           ndim;      /* 2, 3 or 4 */
    int           shape[4];
} mha_mask;

typedef enum mha_causal_align {
    MHA_CAUSAL_TOP_LEFT = 0,   /* query i sees keys j <= i            (PyTorch SDPA) */
    MHA_CAUSAL_BOTTOM_RIGHT    /* query i sees keys j <= i + Lk - Lq  (decoding with a cache) */
} mha_causal_align;

/* Options shared by mha_sdpa and mha_forward.  All-zero is the default. */
typedef struct mha_options {
    mha_mask         attn_mask;        /* see mha_mask for shapes */
    mha_mask         key_padding_mask; /* [B, Lk]; BOOL: nonzero = ignore that key */
    int              causal;           /* nonzero: apply a causal mask (combined with the masks) */
    mha_causal_align causal_align;
    float            scale;            /* 0 = 1/sqrt(head_dim) */
    int              per_head_weights; /* attn_weights as [B,H,Lq,Lk] instead of the head
                                          average [B,Lq,Lk] (nn.MHA average_attn_weights=False) */
    int              num_threads;      /* 0 = OpenMP's default; ignored without OpenMP */
} mha_options;

/* ---------------------------------------------------------------- SDPA */

/* Scaled dot-product attention on heads that are already projected:
     q [B,H,Lq,D], k [B,H,Lk,D], v [B,H,Lk,Dv]  ->  out [B,H,Lq,Dv]
     attn_weights: NULL, or [B,H,Lq,Lk] (per_head_weights ignored here).
   opt may be NULL.  workspace: mha_sdpa_workspace_size() bytes or NULL.  */
MHADEF mha_status mha_sdpa_workspace_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                          const mha_options *opt, int need_weights,
                                          size_t *bytes);
MHADEF mha_status mha_sdpa(int B, int H, int Lq, int Lk, int D, int Dv,
                           const float *q, const float *k, const float *v,
                           const mha_options *opt, float *out, float *attn_weights,
                           void *workspace, size_t workspace_bytes);

/* ---------------------------------------------------------------- module */

/* An nn.MultiheadAttention (batch_first=True).  Pointers are borrowed, in the
   state_dict layout, so tensors can be copied in unchanged.  A NULL bias means
   bias=False.  Either in_proj_weight (kdim == vdim == embed_dim) or the three
   q/k/v_proj_weight must be set.  */
typedef struct mha_module {
    int embed_dim;                 /* E */
    int num_heads;                 /* H, E % H == 0, head_dim D = E / H */
    int kdim, vdim;                /* 0 = E */
    int add_zero_attn;             /* append a zero key and value after the head split */
    const float *in_proj_weight;   /* [3E, E]: rows Wq, then Wk, then Wv */
    const float *q_proj_weight;    /* [E, E]    (used when in_proj_weight is NULL) */
    const float *k_proj_weight;    /* [E, kdim] */
    const float *v_proj_weight;    /* [E, vdim] */
    const float *in_proj_bias;     /* [3E] or NULL */
    const float *out_proj_weight;  /* [E, E] */
    const float *out_proj_bias;    /* [E] or NULL */
    const float *bias_k, *bias_v;  /* [E] each (add_bias_kv=True), or both NULL */
} mha_module;

/* query [B,Lq,E], key [B,Lk,kdim], value [B,Lk,vdim]  ->  out [B,Lq,E].
   attn_weights: NULL, or [B,Lq,Lk'] (head average) / [B,H,Lq,Lk'] (per head),
   where Lk' = Lk + (bias_k != NULL) + add_zero_attn, as PyTorch returns them.
   Masks are given for the Lk real keys; the appended keys are never masked
   (PyTorch pads the masks with zeros the same way).  */
MHADEF mha_status mha_forward_workspace_size(const mha_module *m, int B, int Lq, int Lk,
                                             const mha_options *opt, int need_weights,
                                             size_t *bytes);
MHADEF mha_status mha_forward(const mha_module *m, int B, int Lq, int Lk,
                              const float *query, const float *key, const float *value,
                              const mha_options *opt, float *out, float *attn_weights,
                              void *workspace, size_t workspace_bytes);

/* ======================================================================
   TRAINING: backward passes, a Transformer encoder layer, and the small
   pieces a training loop needs (embedding, positional encoding,
   cross-entropy, SGD, AdamW, a seeded RNG).  See docs/theory.md for the
   formulas and docs/training.md for a worked example.

   Every *_backward call ADDS its gradients into the buffers it is given,
   the way PyTorch accumulates .grad: zero them before the first call of a
   step.  A NULL gradient pointer means "not needed" (its work is skipped
   where that is possible).  Backward calls take the same inputs as the
   forward call and recompute what they need, so no activations have to be
   kept between the two; nothing of size L*L is stored beyond one
   (batch, head) at a time.  The backward paths run on one thread.
   Unlike the forward, the backward does not shield the result from a NaN or
   Inf inside a blocked key or value: keep those finite when training.
   ====================================================================== */

/* SDPA backward.  Same shapes as mha_sdpa; dout [B,H,Lq,Dv] is dLoss/dout.
     dq [B,H,Lq,D] += dLoss/dq,  dk [B,H,Lk,D] += ...,  dv [B,H,Lk,Dv] += ...
   Masks and causal as in mha_sdpa (mask values get no gradient).  */
MHADEF mha_status mha_sdpa_backward_workspace_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                                   const mha_options *opt, size_t *bytes);
MHADEF mha_status mha_sdpa_backward(int B, int H, int Lq, int Lk, int D, int Dv,
                                    const float *q, const float *k, const float *v,
                                    const float *dout, const mha_options *opt,
                                    float *dq, float *dk, float *dv,
                                    void *workspace, size_t workspace_bytes);

/* Gradients of an mha_module's weights, in the same (state_dict) layout.
   Any field may be NULL when that gradient is not wanted; fields whose
   weight the module does not have are ignored.  */
typedef struct mha_module_grad {
    float *in_proj_weight;   /* [3E, E]   (module with in_proj_weight) */
    float *in_proj_bias;     /* [3E]      */
    float *out_proj_weight;  /* [E, E]    */
    float *out_proj_bias;    /* [E]       */
    float *q_proj_weight;    /* [E, E]    (module with separate q/k/v weights) */
    float *k_proj_weight;    /* [E, kdim] */
    float *v_proj_weight;    /* [E, vdim] */
    float *bias_k, *bias_v;  /* [E] each  (add_bias_kv) */
} mha_module_grad;

/* Backward of mha_forward, for every module mha_forward accepts (packed or
   separate projection weights, kdim/vdim, bias_k/bias_v, add_zero_attn).
   dout [B,Lq,E];  dquery [B,Lq,E], dkey [B,Lk,kdim], dvalue [B,Lk,vdim] (each
   may be NULL) and grad (may be NULL) are added to.  For self-attention pass
   the same x three times and the same dx three times: the three
   contributions add up in dx, as they should.  */
MHADEF mha_status mha_backward_workspace_size(const mha_module *m, int B, int Lq, int Lk,
                                              const mha_options *opt, size_t *bytes);
MHADEF mha_status mha_backward(const mha_module *m, int B, int Lq, int Lk,
                               const float *query, const float *key, const float *value,
                               const float *dout, const mha_options *opt,
                               float *dquery, float *dkey, float *dvalue, mha_module_grad *grad,
                               void *workspace, size_t workspace_bytes);

/* y[rows, out] = x[rows, in] W^T + b   (nn.Linear; W [out, in], b [out] or NULL).
   Backward: dx += dy W,  dW += dy^T x,  db += sum over rows of dy.  */
MHADEF size_t mha_linear_workspace_size(int rows, int in, int out);
MHADEF mha_status mha_linear_forward(int rows, int in, int out, const float *x, const float *W,
                                     const float *b, float *y, void *workspace, size_t workspace_bytes);
MHADEF mha_status mha_linear_backward(int rows, int in, int out, const float *x, const float *W,
                                      const float *dy, float *dx, float *dW, float *db,
                                      void *workspace, size_t workspace_bytes);

/* y[rows, E] = (x - mean) / sqrt(var + eps) * w + b per row (nn.LayerNorm, biased var).
   eps 0 = 1e-5.  Backward adds into dx, dw, db (each may be NULL).  */
MHADEF mha_status mha_layernorm_forward(int rows, int E, const float *x, const float *w,
                                        const float *b, float eps, float *y);
MHADEF mha_status mha_layernorm_backward(int rows, int E, const float *x, const float *w,
                                         float eps, const float *dy, float *dx, float *dw, float *db);

typedef enum mha_activation {
    MHA_ACT_RELU = 0,   /* max(0, x) (the zero default, as in PyTorch) */
    MHA_ACT_GELU        /* exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) */
} mha_activation;

/* An nn.TransformerEncoderLayer(batch_first=True) in eval mode (no dropout).
   Pointer fields follow its state_dict names: self_attn.* go into self_attn,
   linear1.weight -> linear1_weight, and so on.
     post-norm (norm_first = 0):  h = LN1(x + SA(x));   y = LN2(h + FF(h))
     pre-norm  (norm_first = 1):  h = x + SA(LN1(x));   y = h + FF(LN2(h))
     FF(z) = linear2(act(linear1(z)))                                       */
typedef struct mha_encoder_layer {
    mha_module     self_attn;        /* embed_dim = d_model, num_heads = nhead */
    int            dim_feedforward;  /* F */
    mha_activation activation;
    int            norm_first;
    float          layer_norm_eps;   /* 0 = 1e-5 */
    const float *linear1_weight, *linear1_bias;   /* [F, E], [F] (bias may be NULL) */
    const float *linear2_weight, *linear2_bias;   /* [E, F], [E] */
    const float *norm1_weight, *norm1_bias;       /* [E], [E] */
    const float *norm2_weight, *norm2_bias;       /* [E], [E] */
} mha_encoder_layer;

typedef struct mha_encoder_layer_grad {
    mha_module_grad self_attn;
    float *linear1_weight, *linear1_bias, *linear2_weight, *linear2_bias;
    float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias;
} mha_encoder_layer_grad;

/* x, y, dy, dx: [B, L, E].  opt carries src_mask (attn_mask), src_key_padding_mask
   and is_causal (causal).  attn_weights: NULL or as in mha_forward.
   One workspace size serves both calls.  */
MHADEF mha_status mha_encoder_workspace_size(const mha_encoder_layer *layer, int B, int L,
                                             const mha_options *opt, size_t *bytes);
MHADEF mha_status mha_encoder_forward(const mha_encoder_layer *layer, int B, int L,
                                      const float *x, const mha_options *opt, float *y,
                                      float *attn_weights, void *workspace, size_t workspace_bytes);
MHADEF mha_status mha_encoder_backward(const mha_encoder_layer *layer, int B, int L,
                                       const float *x, const mha_options *opt, const float *dy,
                                       float *dx, mha_encoder_layer_grad *grad,
                                       void *workspace, size_t workspace_bytes);

/* Sinusoidal positional encoding, pe [L, d]:
     PE[pos, 2i] = sin(pos / 10000^(2i/d)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d))  */
MHADEF mha_status mha_positional_encoding(int L, int d, float *pe);

/* Embedding lookup (nn.Embedding): out[n, d] = table[tokens[n], :], table [vocab, d].
   Backward: dtable[tokens[n], :] += dout[n, :].  A token outside [0, vocab) is
   MHA_ERR_INVALID_ARGUMENT.  */
MHADEF mha_status mha_embedding_forward(int n, int vocab, int d, const int *tokens,
                                        const float *table, float *out);
MHADEF mha_status mha_embedding_backward(int n, int vocab, int d, const int *tokens,
                                         const float *dout, float *dtable);

/* Mean cross-entropy of logits [n, V] against targets [n] (nn.CrossEntropyLoss):
     loss = -(1/N) sum_r log softmax(logits_r)[target_r],  N = rows with target >= 0
   Rows with a negative target are ignored (ignore_index).  dlogits (may be NULL)
   is written, not added: dlogits_r = (softmax(logits_r) - onehot(target_r)) / N.
   correct (may be NULL) receives how many counted rows have argmax == target.  */
MHADEF mha_status mha_cross_entropy(int n, int V, const float *logits, const int *targets,
                                    float *loss, float *dlogits, int *correct);

/* Plain SGD: p -= lr * (g + weight_decay * p).  */
MHADEF mha_status mha_sgd_step(size_t n, float *p, const float *g, float lr, float weight_decay);

/* AdamW (torch.optim.AdamW).  Zero fields take PyTorch's defaults:
   lr 1e-3, beta1 0.9, beta2 0.999, eps 1e-8, weight_decay 0.01.
   step is the 1-based step count (for bias correction); m and v are the
   caller's moment buffers of n floats, zero before the first step.  */
typedef struct mha_adamw {
    float lr, beta1, beta2, eps, weight_decay;
} mha_adamw;
MHADEF mha_status mha_adamw_step(const mha_adamw *opt, long step, size_t n, float *p,
                                 const float *g, float *m, float *v);

/* A small seeded generator (xorshift64*): same stream on every platform. */
typedef struct mha_rng { unsigned long long state; } mha_rng;
MHADEF void     mha_rng_seed(mha_rng *r, unsigned long long seed);
MHADEF unsigned mha_rng_u32(mha_rng *r);
MHADEF float    mha_rng_uniform(mha_rng *r);                  /* [0, 1) */
MHADEF void     mha_rng_fill(mha_rng *r, float *x, size_t n, float a);  /* U(-a, a) */

#ifdef __cplusplus
}
#endif
#endif /* MHA_H */

/* ======================================================================== */
/*                              IMPLEMENTATION                              */
/* ======================================================================== */
#ifdef MHA_IMPLEMENTATION
#ifndef MHA_IMPLEMENTATION_DONE
#define MHA_IMPLEMENTATION_DONE

#include <math.h>
#include <string.h>
#include <stdint.h>
#include <limits.h>

#if defined(MHA_MALLOC) != defined(MHA_FREE)
#error "mha.h: define both MHA_MALLOC and MHA_FREE, or neither"
#endif
#ifndef MHA_MALLOC
#include <stdlib.h>
#define MHA_MALLOC(sz) malloc(sz)
#define MHA_FREE(p) free(p)
#endif
#ifndef MHA_ASSERT
#include <assert.h>
#define MHA_ASSERT(x) assert(x)
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __cplusplus
#define MHA__CAST(T, x) static_cast<T>(x)
#else
#define MHA__CAST(T, x) ((T)(x))
#endif

MHADEF const char *mha_status_string(mha_status s)
{
    switch (s) {
#define MHA__MSG(name, msg) case name: return msg;
        MHA_STATUS_LIST(MHA__MSG)
#undef MHA__MSG
    default: return "unknown mha_status value";
    }
}

/* -------------------------------------------------- size arithmetic */

/* a*b into *r; returns 0 when the product does not fit in size_t. */
static int mha__mul(size_t a, size_t b, size_t *r)
{
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *r = a * b;
    return 1;
}
static int mha__mul3(size_t a, size_t b, size_t c, size_t *r)
{
    size_t t;
    return mha__mul(a, b, &t) && mha__mul(t, c, r);
}
static int mha__add(size_t a, size_t b, size_t *r)
{
    if (b > SIZE_MAX - a) return 0;
    *r = a + b;
    return 1;
}

static int mha__max_threads(const mha_options *opt)
{
#ifdef _OPENMP
    if (opt && opt->num_threads > 0) return opt->num_threads;
    return omp_get_max_threads();
#else
    (void)opt;
    return 1;
#endif
}

/* Float offsets inside a workspace; every region starts on a 64-byte line. */
#define MHA__ALIGN_FLOATS 16
static int mha__region(size_t *cursor, size_t nfloats, size_t *offset)
{
    size_t padded;
    if (!mha__add(nfloats, MHA__ALIGN_FLOATS - 1, &padded)) return 0;
    padded -= padded % MHA__ALIGN_FLOATS;
    *offset = *cursor;
    return mha__add(*cursor, padded, cursor);
}

/* =====================================================================
   SCALAR REFERENCE
   The readable definition of each operation.  The SIMD layer below
   computes the same thing faster; tests compare the two.
   ===================================================================== */

/* y += alpha * x over n floats */
static void mha__axpy_ref(float *y, float alpha, const float *x, int n)
{
    int i;
    for (i = 0; i < n; ++i) y[i] += alpha * x[i];
}

/* C = alpha op(A) op(B) + beta C, straight from the definition. */
static void mha__gemm_ref(int ta, int tb, int M, int N, int K, float alpha,
                          const float *A, size_t lda, const float *B, size_t ldb,
                          float beta, float *C, size_t ldc)
{
    int i, j, p;
    for (i = 0; i < M; ++i) {
        for (j = 0; j < N; ++j) {
            float acc = 0.0f;
            for (p = 0; p < K; ++p) {
                float a = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                float b = tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                acc += a * b;
            }
            C[(size_t)i * ldc + j] = alpha * acc + (beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j]);
        }
    }
}

/* Softmax over one row of scores, in place, skipping blocked keys.
   A blocked key has score -inf (the masking step writes it; it never adds it).
       m = max_j s_j over allowed j;   p_j = exp(s_j - m) / sum_k exp(s_k - m)
   Subtracting m keeps exp() in range for any finite logits.  A row with no
   allowed key becomes all zeros.  Returns 1 if some key was allowed.  */
static int mha__softmax_row_ref(float *s, int n)
{
    float m = -INFINITY, sum = 0.0f, inv;
    int j, any = 0;
    for (j = 0; j < n; ++j)
        if (s[j] != -INFINITY) { any = 1; if (!(s[j] <= m)) m = s[j]; }
    if (!any) {
        for (j = 0; j < n; ++j) s[j] = 0.0f;
        return 0;
    }
    for (j = 0; j < n; ++j) {
        float e = (s[j] == -INFINITY) ? 0.0f : expf(s[j] - m);
        s[j] = e;
        sum += e;
    }
    inv = 1.0f / sum;
    for (j = 0; j < n; ++j) s[j] *= inv;
    return 1;
}

/* =====================================================================
   SIMD LAYER
   (the scalar reference is used until the vector kernels land)
   ===================================================================== */

#define mha__axpy mha__axpy_ref
#define mha__softmax_row mha__softmax_row_ref

/* =====================================================================
   GEMM
   ===================================================================== */

/* Packing-buffer floats one single-threaded GEMM call of this shape needs. */
static size_t mha__gemm_ws_floats(int M, int N, int K)
{
    (void)M; (void)N; (void)K;
    return 0;
}

/* Single-threaded GEMM into caller memory; never allocates. */
static void mha__gemm(int ta, int tb, int M, int N, int K, float alpha,
                      const float *A, size_t lda, const float *B, size_t ldb,
                      float beta, float *C, size_t ldc, float *ws)
{
    (void)ws;
    mha__gemm_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

MHADEF size_t mha_gemm_workspace_size(int M, int N, int K)
{
    size_t f;
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    f = mha__gemm_ws_floats(M, N, K);
    return f ? (f + MHA__ALIGN_FLOATS) * sizeof(float) : 0;
}

MHADEF mha_status mha_gemm(mha_trans ta, mha_trans tb, int M, int N, int K, float alpha,
                           const float *A, int lda, const float *B, int ldb, float beta,
                           float *C, int ldc, void *workspace, size_t workspace_bytes)
{
    size_t need, tmp;
    void *owned = NULL;
    float *ws;
    if (!A || !B || !C) return MHA_ERR_NULL_POINTER;
    if (M <= 0 || N <= 0 || K <= 0) return MHA_ERR_INVALID_SIZE;
    if ((ta != MHA_NO_TRANS && ta != MHA_TRANS) || (tb != MHA_NO_TRANS && tb != MHA_TRANS))
        return MHA_ERR_INVALID_ARGUMENT;
    if (lda < (ta ? M : K) || ldb < (tb ? K : N) || ldc < N) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul((size_t)(ta ? K : M), (size_t)lda, &tmp) || !mha__mul(tmp, sizeof(float), &tmp) ||
        !mha__mul((size_t)(tb ? N : K), (size_t)ldb, &tmp) || !mha__mul(tmp, sizeof(float), &tmp) ||
        !mha__mul((size_t)M, (size_t)ldc, &tmp) || !mha__mul(tmp, sizeof(float), &tmp))
        return MHA_ERR_OVERFLOW;
    need = mha_gemm_workspace_size(M, N, K);
    if (need && workspace && workspace_bytes < need) return MHA_ERR_WORKSPACE_TOO_SMALL;
    if (need && !workspace) {
        owned = MHA_MALLOC(need);
        if (!owned) return MHA_ERR_OUT_OF_MEMORY;
        workspace = owned;
    }
    /* align the packing buffers to a cache line */
    ws = MHA__CAST(float *, workspace);
    if (ws) ws += (MHA__ALIGN_FLOATS - ((uintptr_t)ws / sizeof(float)) % MHA__ALIGN_FLOATS) % MHA__ALIGN_FLOATS;
    mha__gemm(ta, tb, M, N, K, alpha, A, (size_t)lda, B, (size_t)ldb, beta, C, (size_t)ldc, ws);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* =====================================================================
   ATTENTION
   ===================================================================== */

/* A strided view of [B, H, L, D] activations: element (b,h,i,d) lives at
   p[b*bs + h*hs + i*rs + d].  SDPA inputs are dense [B,H,L,D]; the module's
   projected activations are [B, L, H*D] with heads side by side.  */
typedef struct mha__view {
    const float *p;
    size_t bs, hs, rs;
} mha__view;

/* Everything one attention call needs, after validation. */
typedef struct mha__attn {
    int B, H, Lq, Lk, Lk_eff, D, Dv;   /* Lk_eff: Lk plus appended keys (bias_k, zero) */
    mha__view q, k, v;
    float *o; size_t o_bs, o_hs, o_rs;
    float scale;
    const mha_mask *attn_mask, *kpm;   /* NULL when kind is NONE */
    int causal; ptrdiff_t causal_off;  /* key j allowed iff j <= i + causal_off */
    float *weights; int per_head;      /* weights output or NULL */
    int nthreads;
} mha__attn;

static int mha__mask_bool_blocks(mha_mask_kind kind, unsigned char v)
{
    return kind == MHA_MASK_BOOL ? v != 0 : v == 0;
}

/* Mask one row of scaled scores s[0..Lk_eff) of query i in (b, h):
   blocked keys get -inf written over whatever the score was (so NaN from a
   blocked key is discarded); float masks are added.  Keys j >= Lk are the
   appended bias/zero keys and are never masked.  */
static void mha__mask_row(const mha__attn *a, int b, int h, int i, float *s)
{
    int j, Lk = a->Lk;
    if (a->attn_mask) {
        const mha_mask *m = a->attn_mask;
        size_t row = (m->ndim == 2) ? (size_t)i
                                    : ((size_t)b * a->H + h) * a->Lq + i;
        if (m->kind == MHA_MASK_FLOAT) {
            const float *f = MHA__CAST(const float *, m->data) + row * Lk;
            for (j = 0; j < Lk; ++j) s[j] = (f[j] == -INFINITY) ? -INFINITY : s[j] + f[j];
        } else {
            const unsigned char *u = MHA__CAST(const unsigned char *, m->data) + row * Lk;
            for (j = 0; j < Lk; ++j) if (mha__mask_bool_blocks(m->kind, u[j])) s[j] = -INFINITY;
        }
    }
    if (a->kpm) {
        const mha_mask *m = a->kpm;
        if (m->kind == MHA_MASK_FLOAT) {
            const float *f = MHA__CAST(const float *, m->data) + (size_t)b * Lk;
            for (j = 0; j < Lk; ++j) s[j] = (f[j] == -INFINITY) ? -INFINITY : s[j] + f[j];
        } else {
            const unsigned char *u = MHA__CAST(const unsigned char *, m->data) + (size_t)b * Lk;
            for (j = 0; j < Lk; ++j) if (mha__mask_bool_blocks(m->kind, u[j])) s[j] = -INFINITY;
        }
    }
    if (a->causal) {
        ptrdiff_t first = (ptrdiff_t)i + a->causal_off + 1;   /* first blocked key */
        if (first < 0) first = 0;
        for (j = (int)(first < Lk ? first : Lk); j < Lk; ++j) s[j] = -INFINITY;
    }
}

static int mha__all_finite(const float *x, int n)
{
    int i;
    for (i = 0; i < n; ++i) if (!(x[i] - x[i] == 0.0f)) return 0;
    return 1;
}

/* One (batch, head): the unfused path.  S = scale Q K^T; mask; softmax; O = P V.
   s: Lq*Lk_eff floats of scratch.  */
static void mha__attend_head(const mha__attn *a, int b, int h, float *s, float *gws)
{
    const float *q = a->q.p + (size_t)b * a->q.bs + (size_t)h * a->q.hs;
    const float *k = a->k.p + (size_t)b * a->k.bs + (size_t)h * a->k.hs;
    const float *v = a->v.p + (size_t)b * a->v.bs + (size_t)h * a->v.hs;
    float *o = a->o + (size_t)b * a->o_bs + (size_t)h * a->o_hs;
    int Lq = a->Lq, Lk = a->Lk_eff, Dv = a->Dv, i, j, v_finite = 1;

    /* 1. scores S[i,j] = scale * q_i . k_j */
    mha__gemm(0, 1, Lq, Lk, a->D, a->scale, q, a->q.rs, k, a->k.rs, 0.0f, s, (size_t)Lk, gws);

    /* 2. mask and softmax, row by row */
    for (i = 0; i < Lq; ++i) {
        float *row = s + (size_t)i * Lk;
        mha__mask_row(a, b, h, i, row);
        mha__softmax_row(row, Lk);
    }

    /* 3. O = P V.  A zero weight times a NaN/Inf value would be NaN, so when
       some value row is not finite, sum over the keys with nonzero weight only. */
    for (j = 0; j < Lk && v_finite; ++j) v_finite = mha__all_finite(v + (size_t)j * a->v.rs, Dv);
    if (v_finite) {
        mha__gemm(0, 0, Lq, Dv, Lk, 1.0f, s, (size_t)Lk, v, a->v.rs, 0.0f, o, a->o_rs, gws);
    } else {
        for (i = 0; i < Lq; ++i) {
            float *oi = o + (size_t)i * a->o_rs;
            const float *pi = s + (size_t)i * Lk;
            for (j = 0; j < Dv; ++j) oi[j] = 0.0f;
            for (j = 0; j < Lk; ++j)
                if (pi[j] != 0.0f) mha__axpy(oi, pi[j], v + (size_t)j * a->v.rs, Dv);
        }
    }

    /* 4. hand the weights out: per head, or summed here and averaged later */
    if (a->weights) {
        size_t n = (size_t)Lq * Lk;
        if (a->per_head) {
            memcpy(a->weights + ((size_t)b * a->H + h) * n, s, n * sizeof(float));
        } else {
            float *w = a->weights + (size_t)b * n;
            float inv_h = 1.0f / (float)a->H;
            size_t t;
            if (h == 0) for (t = 0; t < n; ++t) w[t] = s[t] * inv_h;
            else        for (t = 0; t < n; ++t) w[t] += s[t] * inv_h;
        }
    }
}

/* Scratch floats of one attention call: per thread, a score block and GEMM packing. */
static int mha__attn_scratch_floats(int Lq, int Lk_eff, int D, int Dv, int nthreads,
                                    size_t *per_thread, size_t *total)
{
    size_t s, g1, g2, g;
    if (!mha__mul((size_t)Lq, (size_t)Lk_eff, &s)) return 0;
    g1 = mha__gemm_ws_floats(Lq, Lk_eff, D);
    g2 = mha__gemm_ws_floats(Lq, Dv, Lk_eff);
    g = g1 > g2 ? g1 : g2;
    if (!mha__add(s, g, per_thread) || !mha__add(*per_thread, 2 * MHA__ALIGN_FLOATS, per_thread))
        return 0;
    return mha__mul(*per_thread, (size_t)nthreads, total);
}

/* Run every (b, h) of a validated call.  ws holds the per-thread scratch.
   Heads of one batch run in order, so the head average is summed in a fixed
   order and the result does not depend on the thread count.  */
static void mha__attend_all(const mha__attn *a, float *ws, size_t per_thread)
{
    int b;
    for (b = 0; b < a->B; ++b) {
        int h;
        for (h = 0; h < a->H; ++h) {
            float *s = ws;
            float *gws = s + (((size_t)a->Lq * a->Lk_eff + MHA__ALIGN_FLOATS - 1) / MHA__ALIGN_FLOATS) * MHA__ALIGN_FLOATS;
            (void)per_thread;
            mha__attend_head(a, b, h, s, gws);
        }
    }
}

/* ------------------------------------------------- validation helpers */

static mha_status mha__check_mask_kind(const mha_mask *m)
{
    if (m->kind == MHA_MASK_NONE) return MHA_OK;
    if (m->kind != MHA_MASK_BOOL && m->kind != MHA_MASK_BOOL_KEEP && m->kind != MHA_MASK_FLOAT)
        return MHA_ERR_INVALID_ARGUMENT;
    if (!m->data) return MHA_ERR_NULL_POINTER;
    return MHA_OK;
}

static mha_status mha__check_masks(const mha_options *opt, int B, int H, int Lq, int Lk)
{
    mha_status st;
    const mha_mask *am = &opt->attn_mask, *kp = &opt->key_padding_mask;
    if ((st = mha__check_mask_kind(am)) != MHA_OK) return st;
    if ((st = mha__check_mask_kind(kp)) != MHA_OK) return st;
    if (am->kind != MHA_MASK_NONE) {
        int ok = 0;
        if (am->ndim == 2)
            ok = am->shape[0] == Lq && am->shape[1] == Lk;
        else if (am->ndim == 3)
            ok = (size_t)am->shape[0] == (size_t)B * (size_t)H && am->shape[1] == Lq && am->shape[2] == Lk;
        else if (am->ndim == 4)
            ok = am->shape[0] == B && am->shape[1] == H && am->shape[2] == Lq && am->shape[3] == Lk;
        if (!ok) return MHA_ERR_MASK_SHAPE;
    }
    if (kp->kind != MHA_MASK_NONE) {
        if (!(kp->ndim == 2 && kp->shape[0] == B && kp->shape[1] == Lk)) return MHA_ERR_MASK_SHAPE;
    }
    if (opt->causal && opt->causal_align != MHA_CAUSAL_TOP_LEFT &&
        opt->causal_align != MHA_CAUSAL_BOTTOM_RIGHT)
        return MHA_ERR_INVALID_ARGUMENT;
    if (!(opt->scale >= 0.0f) || opt->scale == INFINITY || opt->num_threads < 0)
        return MHA_ERR_INVALID_ARGUMENT;
    return MHA_OK;
}

/* Fill the validated pieces shared by SDPA and the module. */
static void mha__attn_common(mha__attn *a, const mha_options *opt, int B, int H, int Lq, int Lk,
                             int Lk_eff, int D, int Dv)
{
    a->B = B; a->H = H; a->Lq = Lq; a->Lk = Lk; a->Lk_eff = Lk_eff; a->D = D; a->Dv = Dv;
    a->scale = opt->scale > 0.0f ? opt->scale : 1.0f / sqrtf((float)D);
    a->attn_mask = opt->attn_mask.kind != MHA_MASK_NONE ? &opt->attn_mask : NULL;
    a->kpm = opt->key_padding_mask.kind != MHA_MASK_NONE ? &opt->key_padding_mask : NULL;
    a->causal = opt->causal != 0;
    a->causal_off = opt->causal_align == MHA_CAUSAL_BOTTOM_RIGHT ? (ptrdiff_t)Lk - Lq : 0;
    a->nthreads = mha__max_threads(opt);
}

static float *mha__align_ws(void *ws)
{
    float *f = MHA__CAST(float *, ws);
    return f + (MHA__ALIGN_FLOATS - ((uintptr_t)f / sizeof(float)) % MHA__ALIGN_FLOATS) % MHA__ALIGN_FLOATS;
}

/* Take the caller's workspace, or allocate one: 0 on failure. */
static mha_status mha__get_ws(void *workspace, size_t have, size_t need, void **owned, float **ws)
{
    *owned = NULL;
    if (workspace) {
        if (have < need) return MHA_ERR_WORKSPACE_TOO_SMALL;
    } else {
        workspace = *owned = MHA_MALLOC(need);
        if (!workspace) return MHA_ERR_OUT_OF_MEMORY;
    }
    *ws = mha__align_ws(workspace);
    return MHA_OK;
}

/* ------------------------------------------------------------- SDPA */

static mha_status mha__sdpa_plan(int B, int H, int Lq, int Lk, int D, int Dv,
                                 const mha_options *opt, int need_weights,
                                 size_t *per_thread, size_t *bytes)
{
    size_t total, n;
    mha_status st;
    (void)need_weights;
    if (B <= 0 || H <= 0 || Lq <= 0 || Lk <= 0 || D <= 0 || Dv <= 0) return MHA_ERR_INVALID_SIZE;
    /* every tensor's byte count must fit */
    if (!mha__mul3((size_t)B * (size_t)H, (size_t)Lq, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul3((size_t)B * (size_t)H, (size_t)Lk, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul3((size_t)B * (size_t)H, (size_t)Lq, (size_t)Lk, &n) ||
        !mha__mul(n, sizeof(float), &n))
        return MHA_ERR_OVERFLOW;
    if ((st = mha__check_masks(opt, B, H, Lq, Lk)) != MHA_OK) return st;
    if (!mha__attn_scratch_floats(Lq, Lk, D, Dv, mha__max_threads(opt), per_thread, &total) ||
        !mha__add(total, MHA__ALIGN_FLOATS, &total) || !mha__mul(total, sizeof(float), bytes))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

MHADEF mha_status mha_sdpa_workspace_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                          const mha_options *opt, int need_weights,
                                          size_t *bytes)
{
    mha_options zero;
    size_t per_thread;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    return mha__sdpa_plan(B, H, Lq, Lk, D, Dv, opt, need_weights, &per_thread, bytes);
}

MHADEF mha_status mha_sdpa(int B, int H, int Lq, int Lk, int D, int Dv,
                           const float *q, const float *k, const float *v,
                           const mha_options *opt, float *out, float *attn_weights,
                           void *workspace, size_t workspace_bytes)
{
    mha_options zero;
    mha__attn a;
    size_t per_thread, need;
    void *owned;
    float *ws;
    mha_status st;
    if (!q || !k || !v || !out) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    st = mha__sdpa_plan(B, H, Lq, Lk, D, Dv, opt, attn_weights != NULL, &per_thread, &need);
    if (st != MHA_OK) return st;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;

    mha__attn_common(&a, opt, B, H, Lq, Lk, Lk, D, Dv);
    a.q.p = q; a.q.rs = (size_t)D;  a.q.hs = (size_t)Lq * D;  a.q.bs = (size_t)H * Lq * D;
    a.k.p = k; a.k.rs = (size_t)D;  a.k.hs = (size_t)Lk * D;  a.k.bs = (size_t)H * Lk * D;
    a.v.p = v; a.v.rs = (size_t)Dv; a.v.hs = (size_t)Lk * Dv; a.v.bs = (size_t)H * Lk * Dv;
    a.o = out; a.o_rs = (size_t)Dv; a.o_hs = (size_t)Lq * Dv; a.o_bs = (size_t)H * Lq * Dv;
    a.weights = attn_weights; a.per_head = 1;
    mha__attend_all(&a, ws, per_thread);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* ----------------------------------------------------------- module */

/* Workspace layout of one mha_forward call (shared by the size query and the
   call, so the two cannot disagree).  Offsets are in floats.  */
typedef struct mha__fwd_layout {
    int E, H, D, kdim, vdim, Lk_eff;
    size_t qp, kp, vp, ctx, scratch, per_thread, total_floats;
} mha__fwd_layout;

static mha_status mha__fwd_plan(const mha_module *m, int B, int Lq, int Lk,
                                const mha_options *opt, int need_weights, mha__fwd_layout *L)
{
    size_t n, cur = 0, scratch;
    mha_status st;
    (void)need_weights;
    if (!m) return MHA_ERR_NULL_POINTER;
    if (m->embed_dim <= 0 || m->num_heads <= 0 || m->kdim < 0 || m->vdim < 0 ||
        B <= 0 || Lq <= 0 || Lk <= 0)
        return MHA_ERR_INVALID_SIZE;
    if (m->embed_dim % m->num_heads != 0) return MHA_ERR_HEADS_DIVIDE;
    L->E = m->embed_dim; L->H = m->num_heads; L->D = L->E / L->H;
    L->kdim = m->kdim ? m->kdim : L->E;
    L->vdim = m->vdim ? m->vdim : L->E;
    if (!m->out_proj_weight) return MHA_ERR_NULL_POINTER;
    if (m->in_proj_weight) {
        if (L->kdim != L->E || L->vdim != L->E) return MHA_ERR_INVALID_ARGUMENT;
    } else if (!m->q_proj_weight || !m->k_proj_weight || !m->v_proj_weight) {
        return MHA_ERR_NULL_POINTER;
    }
    if ((m->bias_k == NULL) != (m->bias_v == NULL)) return MHA_ERR_INVALID_ARGUMENT;
    if (m->add_zero_attn != 0 && m->add_zero_attn != 1) return MHA_ERR_INVALID_ARGUMENT;
    if (Lk > INT_MAX - 2) return MHA_ERR_OVERFLOW;
    L->Lk_eff = Lk + (m->bias_k != NULL) + m->add_zero_attn;

    /* GEMM row counts (B*L) are ints; tensor byte counts must fit size_t */
    if ((size_t)B * (size_t)Lq > INT_MAX || (size_t)B * (size_t)L->Lk_eff > INT_MAX)
        return MHA_ERR_OVERFLOW;
    {
        int widest = L->E;
        if (L->kdim > widest) widest = L->kdim;
        if (L->vdim > widest) widest = L->vdim;
        if (!mha__mul3((size_t)B, (size_t)L->Lk_eff + Lq, (size_t)widest, &n) ||
            !mha__mul(n, 4 * sizeof(float), &n) ||
            !mha__mul3((size_t)B * (size_t)L->H, (size_t)Lq, (size_t)L->Lk_eff, &n) ||
            !mha__mul(n, sizeof(float), &n) ||
            !mha__mul3((size_t)3 * L->E, (size_t)widest, sizeof(float), &n))
            return MHA_ERR_OVERFLOW;
    }
    if ((st = mha__check_masks(opt, B, L->H, Lq, Lk)) != MHA_OK) return st;

    if (!mha__region(&cur, (size_t)B * Lq * L->E, &L->qp) ||
        !mha__region(&cur, (size_t)B * L->Lk_eff * L->E, &L->kp) ||
        !mha__region(&cur, (size_t)B * L->Lk_eff * L->E, &L->vp) ||
        !mha__region(&cur, (size_t)B * Lq * L->E, &L->ctx) ||
        !mha__attn_scratch_floats(Lq, L->Lk_eff, L->D, L->D, mha__max_threads(opt),
                                  &L->per_thread, &scratch) ||
        !mha__region(&cur, scratch, &L->scratch))
        return MHA_ERR_OVERFLOW;
    /* projection GEMMs run on the scratch area too */
    {
        size_t g = mha__gemm_ws_floats(B * Lq, L->E, L->E);
        size_t g2 = mha__gemm_ws_floats(B * L->Lk_eff, L->E, L->kdim > L->vdim ? L->kdim : L->vdim);
        if (g2 > g) g = g2;
        if (g > scratch && !mha__add(cur, g - scratch, &cur)) return MHA_ERR_OVERFLOW;
    }
    if (!mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats)) return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

MHADEF mha_status mha_forward_workspace_size(const mha_module *m, int B, int Lq, int Lk,
                                             const mha_options *opt, int need_weights,
                                             size_t *bytes)
{
    mha_options zero;
    mha__fwd_layout L;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__fwd_plan(m, B, Lq, Lk, opt, need_weights, &L)) != MHA_OK) return st;
    if (!mha__mul(L.total_floats, sizeof(float), bytes)) return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

/* Y[rows, E] = X[rows, in] W^T + bias, W is [E, in] as PyTorch stores it. */
static void mha__linear(int rows, int in, int E, const float *X, const float *W,
                        const float *bias, float *Y, float *gws)
{
    if (bias) {
        int r;
        for (r = 0; r < rows; ++r) memcpy(Y + (size_t)r * E, bias, (size_t)E * sizeof(float));
    }
    mha__gemm(0, 1, rows, E, in, 1.0f, X, (size_t)in, W, (size_t)in, bias ? 1.0f : 0.0f,
              Y, (size_t)E, gws);
}

MHADEF mha_status mha_forward(const mha_module *m, int B, int Lq, int Lk,
                              const float *query, const float *key, const float *value,
                              const mha_options *opt, float *out, float *attn_weights,
                              void *workspace, size_t workspace_bytes)
{
    mha_options zero;
    mha__fwd_layout L;
    mha__attn a;
    void *owned;
    float *ws, *qp, *kp, *vp, *ctx, *scratch;
    const float *wq, *wk, *wv, *bq, *bk, *bv;
    size_t need;
    int E, b, extra;
    mha_status st;

    if (!query || !key || !value || !out) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__fwd_plan(m, B, Lq, Lk, opt, attn_weights != NULL, &L)) != MHA_OK) return st;
    if (!mha__mul(L.total_floats, sizeof(float), &need)) return MHA_ERR_OVERFLOW;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;

    E = L.E;
    qp = ws + L.qp; kp = ws + L.kp; vp = ws + L.vp; ctx = ws + L.ctx; scratch = ws + L.scratch;
    if (m->in_proj_weight) {
        wq = m->in_proj_weight;
        wk = wq + (size_t)E * E;
        wv = wk + (size_t)E * E;
    } else {
        wq = m->q_proj_weight; wk = m->k_proj_weight; wv = m->v_proj_weight;
    }
    bq = m->in_proj_bias;
    bk = bq ? bq + E : NULL;
    bv = bq ? bq + 2 * E : NULL;

    /* 1. projections: Q = Xq Wq^T + bq (all batches at once, [B*Lq, E]).
       K and V hold Lk_eff rows per batch: the Lk projected keys, then bias_k,
       then a zero row (add_zero_attn: zeros after the head split are zero
       columns in every head, i.e. one zero row before the split). */
    mha__linear(B * Lq, E, E, query, wq, bq, qp, scratch);
    extra = L.Lk_eff - Lk;
    if (extra == 0) {
        mha__linear(B * Lk, L.kdim, E, key, wk, bk, kp, scratch);
        mha__linear(B * Lk, L.vdim, E, value, wv, bv, vp, scratch);
    } else {
        for (b = 0; b < B; ++b) {
            float *kb = kp + (size_t)b * L.Lk_eff * E, *vb = vp + (size_t)b * L.Lk_eff * E;
            int r = Lk;
            mha__linear(Lk, L.kdim, E, key + (size_t)b * Lk * L.kdim, wk, bk, kb, scratch);
            mha__linear(Lk, L.vdim, E, value + (size_t)b * Lk * L.vdim, wv, bv, vb, scratch);
            if (m->bias_k) {
                memcpy(kb + (size_t)r * E, m->bias_k, (size_t)E * sizeof(float));
                memcpy(vb + (size_t)r * E, m->bias_v, (size_t)E * sizeof(float));
                ++r;
            }
            if (m->add_zero_attn) {
                memset(kb + (size_t)r * E, 0, (size_t)E * sizeof(float));
                memset(vb + (size_t)r * E, 0, (size_t)E * sizeof(float));
            }
        }
    }

    /* 2. attention per (batch, head) on the head-interleaved [B, L, E] layout */
    mha__attn_common(&a, opt, B, L.H, Lq, Lk, L.Lk_eff, L.D, L.D);
    a.q.p = qp; a.q.rs = (size_t)E; a.q.hs = (size_t)L.D; a.q.bs = (size_t)Lq * E;
    a.k.p = kp; a.k.rs = (size_t)E; a.k.hs = (size_t)L.D; a.k.bs = (size_t)L.Lk_eff * E;
    a.v.p = vp; a.v.rs = (size_t)E; a.v.hs = (size_t)L.D; a.v.bs = (size_t)L.Lk_eff * E;
    a.o = ctx;  a.o_rs = (size_t)E; a.o_hs = (size_t)L.D; a.o_bs = (size_t)Lq * E;
    a.weights = attn_weights; a.per_head = opt->per_head_weights != 0;
    mha__attend_all(&a, scratch, L.per_thread);

    /* 3. output projection: out = concat_h(O_h) Wo^T + bo */
    mha__linear(B * Lq, E, E, ctx, m->out_proj_weight, m->out_proj_bias, out, scratch);

    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* =====================================================================
   TRAINING
   Backward passes, the encoder layer and the training pieces.  Each stage
   has a forward and a backward function; the math sits above its loop.
   Shapes: B batch, H heads, L / Lq / Lk sequence lengths, E model width,
   D = E / H head width, F feed-forward width, N = B * L rows.
   ===================================================================== */

/* ------------------------------------------------ attention backward */

/* Backward of one (batch, head), recomputing the probabilities so that only
   one Lq x Lk block is ever stored.
   Forward:   S = scale Q K^T (+ mask);   P = softmax_row(S);   O = P V
   Backward, given dO:
     dV    = P^T dO                                   [Lk, Dv]
     dP    = dO V^T                                   [Lq, Lk]
     dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)          softmax Jacobian, per row
     dQ    = scale dS K                               [Lq, D]
     dK    = scale dS^T Q                             [Lk, D]
   dout is strided like the output (a->o_*), dq/dk/dv like q/k/v; the three
   gradients are added to.  When a->o is set, O is written there (the module
   needs it for the output projection's weight gradient).
   p, dp: Lq * Lk_eff floats each;  gws: GEMM workspace.  */
static void mha__attend_head_backward(const mha__attn *a, int b, int h, const float *dout,
                                      float *dq, float *dk, float *dv,
                                      float *p, float *dp, float *gws)
{
    size_t qo = (size_t)b * a->q.bs + (size_t)h * a->q.hs;
    size_t ko = (size_t)b * a->k.bs + (size_t)h * a->k.hs;
    size_t vo = (size_t)b * a->v.bs + (size_t)h * a->v.hs;
    size_t oo = (size_t)b * a->o_bs + (size_t)h * a->o_hs;
    const float *qh = a->q.p + qo, *kh = a->k.p + ko, *vh = a->v.p + vo, *doh = dout + oo;
    int Lq = a->Lq, Lk = a->Lk_eff, D = a->D, Dv = a->Dv, i, j;

    /* 1. recompute P: S = scale Q K^T, mask, softmax row by row */
    mha__gemm(0, 1, Lq, Lk, D, a->scale, qh, a->q.rs, kh, a->k.rs, 0.0f, p, (size_t)Lk, gws);
    for (i = 0; i < Lq; ++i) {
        float *row = p + (size_t)i * Lk;
        mha__mask_row(a, b, h, i, row);
        mha__softmax_row(row, Lk);
    }

    /* 2. O = P V, when the caller wants it */
    if (a->o)
        mha__gemm(0, 0, Lq, Dv, Lk, 1.0f, p, (size_t)Lk, vh, a->v.rs, 0.0f,
                  a->o + oo, a->o_rs, gws);

    /* 3. dV += P^T dO */
    if (dv)
        mha__gemm(1, 0, Lk, Dv, Lq, 1.0f, p, (size_t)Lk, doh, a->o_rs, 1.0f,
                  dv + vo, a->v.rs, gws);
    if (!dq && !dk) return;

    /* 4. dP = dO V^T, then through the softmax: dS = P * (dP - rowsum(P * dP)).
       A blocked key has P = 0, so it gets dS = 0 and passes no gradient on. */
    mha__gemm(0, 1, Lq, Lk, Dv, 1.0f, doh, a->o_rs, vh, a->v.rs, 0.0f, dp, (size_t)Lk, gws);
    for (i = 0; i < Lq; ++i) {
        const float *pi = p + (size_t)i * Lk;
        float *di = dp + (size_t)i * Lk;
        double c = 0.0;
        for (j = 0; j < Lk; ++j) if (pi[j] != 0.0f) c += (double)pi[j] * di[j];
        for (j = 0; j < Lk; ++j) di[j] = pi[j] == 0.0f ? 0.0f : pi[j] * (di[j] - (float)c);
    }

    /* 5. dQ += scale dS K,   dK += scale dS^T Q */
    if (dq)
        mha__gemm(0, 0, Lq, D, Lk, a->scale, dp, (size_t)Lk, kh, a->k.rs, 1.0f,
                  dq + qo, a->q.rs, gws);
    if (dk)
        mha__gemm(1, 0, Lk, D, Lq, a->scale, dp, (size_t)Lk, qh, a->q.rs, 1.0f,
                  dk + ko, a->k.rs, gws);
}

/* GEMM workspace floats the head backward needs (the largest of its five products). */
static size_t mha__head_backward_gws(int Lq, int Lk, int D, int Dv)
{
    size_t g = mha__gemm_ws_floats(Lq, Lk, D), t;
    t = mha__gemm_ws_floats(Lq, Dv, Lk); if (t > g) g = t;
    t = mha__gemm_ws_floats(Lk, Dv, Lq); if (t > g) g = t;
    t = mha__gemm_ws_floats(Lq, Lk, Dv); if (t > g) g = t;
    t = mha__gemm_ws_floats(Lq, D, Lk);  if (t > g) g = t;
    t = mha__gemm_ws_floats(Lk, D, Lq);  if (t > g) g = t;
    return g;
}

/* Workspace of one SDPA backward: P and dP of one head, and GEMM packing. */
typedef struct mha__sdpa_bwd_layout { size_t p, dp, gws, total_floats; } mha__sdpa_bwd_layout;

static mha_status mha__sdpa_bwd_plan(int B, int H, int Lq, int Lk, int D, int Dv,
                                     const mha_options *opt, mha__sdpa_bwd_layout *L)
{
    size_t n, cur = 0;
    mha_status st;
    if (B <= 0 || H <= 0 || Lq <= 0 || Lk <= 0 || D <= 0 || Dv <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul3((size_t)B * (size_t)H, (size_t)Lq, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul(n, sizeof(float), &n) ||
        !mha__mul3((size_t)B * (size_t)H, (size_t)Lk, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul(n, sizeof(float), &n) ||
        !mha__mul3((size_t)Lq, (size_t)Lk, 2 * sizeof(float), &n))
        return MHA_ERR_OVERFLOW;
    if ((st = mha__check_masks(opt, B, H, Lq, Lk)) != MHA_OK) return st;
    if (!mha__region(&cur, (size_t)Lq * Lk, &L->p) ||
        !mha__region(&cur, (size_t)Lq * Lk, &L->dp) ||
        !mha__region(&cur, mha__head_backward_gws(Lq, Lk, D, Dv), &L->gws) ||
        !mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

MHADEF mha_status mha_sdpa_backward_workspace_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                                   const mha_options *opt, size_t *bytes)
{
    mha_options zero;
    mha__sdpa_bwd_layout L;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__sdpa_bwd_plan(B, H, Lq, Lk, D, Dv, opt, &L)) != MHA_OK) return st;
    return mha__mul(L.total_floats, sizeof(float), bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
}

MHADEF mha_status mha_sdpa_backward(int B, int H, int Lq, int Lk, int D, int Dv,
                                    const float *q, const float *k, const float *v,
                                    const float *dout, const mha_options *opt,
                                    float *dq, float *dk, float *dv,
                                    void *workspace, size_t workspace_bytes)
{
    mha_options zero;
    mha__sdpa_bwd_layout L;
    mha__attn a;
    void *owned;
    float *ws;
    size_t need;
    int b, h;
    mha_status st;
    if (!q || !k || !v || !dout) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__sdpa_bwd_plan(B, H, Lq, Lk, D, Dv, opt, &L)) != MHA_OK) return st;
    if (!mha__mul(L.total_floats, sizeof(float), &need)) return MHA_ERR_OVERFLOW;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;

    mha__attn_common(&a, opt, B, H, Lq, Lk, Lk, D, Dv);
    a.q.p = q; a.q.rs = (size_t)D;  a.q.hs = (size_t)Lq * D;  a.q.bs = (size_t)H * Lq * D;
    a.k.p = k; a.k.rs = (size_t)D;  a.k.hs = (size_t)Lk * D;  a.k.bs = (size_t)H * Lk * D;
    a.v.p = v; a.v.rs = (size_t)Dv; a.v.hs = (size_t)Lk * Dv; a.v.bs = (size_t)H * Lk * Dv;
    a.o = NULL; a.o_rs = (size_t)Dv; a.o_hs = (size_t)Lq * Dv; a.o_bs = (size_t)H * Lq * Dv;
    a.weights = NULL; a.per_head = 1;
    for (b = 0; b < B; ++b)
        for (h = 0; h < H; ++h)
            mha__attend_head_backward(&a, b, h, dout, dq, dk, dv, ws + L.p, ws + L.dp, ws + L.gws);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* ------------------------------------------------------ linear */

/* Y[rows, out] = X[rows, in] W^T + b   (W [out, in], b [out] or NULL) */
static void mha__linear_forward(int rows, int in, int out, const float *X, const float *W,
                                const float *b, float *Y, float *gws)
{
    if (b) {
        int r;
        for (r = 0; r < rows; ++r) memcpy(Y + (size_t)r * out, b, (size_t)out * sizeof(float));
    }
    mha__gemm(0, 1, rows, out, in, 1.0f, X, (size_t)in, W, (size_t)in, b ? 1.0f : 0.0f,
              Y, (size_t)out, gws);
}

/* GEMM workspace floats of a Linear's forward and backward products. */
static size_t mha__linear_gws(int rows, int in, int out)
{
    size_t g = mha__gemm_ws_floats(rows, out, in), t;
    t = mha__gemm_ws_floats(rows, in, out); if (t > g) g = t;
    t = mha__gemm_ws_floats(out, in, rows); if (t > g) g = t;
    return g;
}

/* Backward of Y[rows, out] = X[rows, in] W^T + b   (W [out, in]):
     dX += dY W          [rows, in]
     dW += dY^T X        [out, in]
     db += sum_r dY[r]   [out]
   Any of dX, dW, db may be NULL.  */
static void mha__linear_backward(int rows, int in, int out, const float *X, const float *W,
                                 const float *dY, float *dX, float *dW, float *db, float *gws)
{
    if (dX)
        mha__gemm(0, 0, rows, in, out, 1.0f, dY, (size_t)out, W, (size_t)in, 1.0f,
                  dX, (size_t)in, gws);
    if (dW)
        mha__gemm(1, 0, out, in, rows, 1.0f, dY, (size_t)out, X, (size_t)in, 1.0f,
                  dW, (size_t)in, gws);
    if (db) {
        int r, j;
        for (r = 0; r < rows; ++r)
            for (j = 0; j < out; ++j) db[j] += dY[(size_t)r * out + j];
    }
}

static int mha__linear_sizes_ok(int rows, int in, int out)
{
    size_t n;
    return mha__mul3((size_t)rows, (size_t)(in > out ? in : out), sizeof(float), &n) &&
           mha__mul3((size_t)in, (size_t)out, sizeof(float), &n);
}

MHADEF size_t mha_linear_workspace_size(int rows, int in, int out)
{
    size_t f;
    if (rows <= 0 || in <= 0 || out <= 0 || !mha__linear_sizes_ok(rows, in, out)) return 0;
    f = mha__linear_gws(rows, in, out);
    return f ? (f + MHA__ALIGN_FLOATS) * sizeof(float) : 0;
}

MHADEF mha_status mha_linear_forward(int rows, int in, int out, const float *x, const float *W,
                                     const float *b, float *y, void *workspace, size_t workspace_bytes)
{
    void *owned = NULL;
    float *ws = NULL;
    size_t need;
    mha_status st;
    if (!x || !W || !y) return MHA_ERR_NULL_POINTER;
    if (rows <= 0 || in <= 0 || out <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__linear_sizes_ok(rows, in, out)) return MHA_ERR_OVERFLOW;
    need = mha_linear_workspace_size(rows, in, out);
    if (need && (st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;
    mha__linear_forward(rows, in, out, x, W, b, y, ws);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

MHADEF mha_status mha_linear_backward(int rows, int in, int out, const float *x, const float *W,
                                      const float *dy, float *dx, float *dW, float *db,
                                      void *workspace, size_t workspace_bytes)
{
    void *owned = NULL;
    float *ws = NULL;
    size_t need;
    mha_status st;
    if (!x || !W || !dy) return MHA_ERR_NULL_POINTER;
    if (rows <= 0 || in <= 0 || out <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__linear_sizes_ok(rows, in, out)) return MHA_ERR_OVERFLOW;
    need = mha_linear_workspace_size(rows, in, out);
    if (need && (st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;
    mha__linear_backward(rows, in, out, x, W, dy, dx, dW, db, ws);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* --------------------------------------------------- module backward */

/* Workspace of one mha_backward call (offsets in floats).  K and V hold
   Lk_eff = Lk (+1 with bias_k) (+1 with add_zero_attn) rows per batch. */
typedef struct mha__bwd_layout {
    int E, H, D, kdim, vdim, Lk_eff;
    size_t qp, kp, vp, ctx, dctx, dqp, dkp, dvp, p, dp, gws, total_floats;
} mha__bwd_layout;

static mha_status mha__bwd_plan(const mha_module *m, int B, int Lq, int Lk,
                                const mha_options *opt, mha__bwd_layout *L)
{
    size_t n, cur = 0, g, t, nk;
    int widest;
    mha_status st;
    if (!m) return MHA_ERR_NULL_POINTER;
    if (m->embed_dim <= 0 || m->num_heads <= 0 || m->kdim < 0 || m->vdim < 0 ||
        B <= 0 || Lq <= 0 || Lk <= 0)
        return MHA_ERR_INVALID_SIZE;
    if (m->embed_dim % m->num_heads != 0) return MHA_ERR_HEADS_DIVIDE;
    L->E = m->embed_dim; L->H = m->num_heads; L->D = L->E / L->H;
    L->kdim = m->kdim ? m->kdim : L->E;
    L->vdim = m->vdim ? m->vdim : L->E;
    if (!m->out_proj_weight) return MHA_ERR_NULL_POINTER;
    if (m->in_proj_weight) {
        if (L->kdim != L->E || L->vdim != L->E) return MHA_ERR_INVALID_ARGUMENT;
    } else if (!m->q_proj_weight || !m->k_proj_weight || !m->v_proj_weight) {
        return MHA_ERR_NULL_POINTER;
    }
    if ((m->bias_k == NULL) != (m->bias_v == NULL)) return MHA_ERR_INVALID_ARGUMENT;
    if (m->add_zero_attn != 0 && m->add_zero_attn != 1) return MHA_ERR_INVALID_ARGUMENT;
    if (Lk > INT_MAX - 2) return MHA_ERR_OVERFLOW;
    L->Lk_eff = Lk + (m->bias_k != NULL) + m->add_zero_attn;
    widest = L->E;
    if (L->kdim > widest) widest = L->kdim;
    if (L->vdim > widest) widest = L->vdim;
    if ((size_t)B * (size_t)Lq > INT_MAX || (size_t)B * (size_t)L->Lk_eff > INT_MAX ||
        !mha__mul3((size_t)B * (size_t)(Lq > L->Lk_eff ? Lq : L->Lk_eff), (size_t)widest,
                   8 * sizeof(float), &n) ||
        !mha__mul3((size_t)Lq, (size_t)L->Lk_eff, 2 * sizeof(float), &n) ||
        !mha__mul3((size_t)3 * L->E, (size_t)widest, sizeof(float), &n))
        return MHA_ERR_OVERFLOW;
    if ((st = mha__check_masks(opt, B, L->H, Lq, Lk)) != MHA_OK) return st;
    g = mha__linear_gws(B * Lq, L->E, L->E);
    t = mha__linear_gws(B * Lk, L->kdim, L->E);                  if (t > g) g = t;
    t = mha__linear_gws(B * Lk, L->vdim, L->E);                  if (t > g) g = t;
    t = mha__head_backward_gws(Lq, L->Lk_eff, L->D, L->D);       if (t > g) g = t;
    nk = (size_t)B * L->Lk_eff * L->E;
    if (!mha__region(&cur, (size_t)B * Lq * L->E, &L->qp) ||
        !mha__region(&cur, nk, &L->kp) ||
        !mha__region(&cur, nk, &L->vp) ||
        !mha__region(&cur, (size_t)B * Lq * L->E, &L->ctx) ||
        !mha__region(&cur, (size_t)B * Lq * L->E, &L->dctx) ||
        !mha__region(&cur, (size_t)B * Lq * L->E, &L->dqp) ||
        !mha__region(&cur, nk, &L->dkp) ||
        !mha__region(&cur, nk, &L->dvp) ||
        !mha__region(&cur, (size_t)Lq * L->Lk_eff, &L->p) ||
        !mha__region(&cur, (size_t)Lq * L->Lk_eff, &L->dp) ||
        !mha__region(&cur, g, &L->gws) ||
        !mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

MHADEF mha_status mha_backward_workspace_size(const mha_module *m, int B, int Lq, int Lk,
                                              const mha_options *opt, size_t *bytes)
{
    mha_options zero;
    mha__bwd_layout L;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__bwd_plan(m, B, Lq, Lk, opt, &L)) != MHA_OK) return st;
    return mha__mul(L.total_floats, sizeof(float), bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
}

/* K or V of every batch, Lk_eff rows each: X W^T + b for the Lk real keys, then
   the bias_k/bias_v row, then a zero row (add_zero_attn), as the forward builds them. */
static void mha__kv_project(int B, int Lk, int Lk_eff, int in, int E, const float *X,
                            const float *W, const float *b, const float *extra, int zero_row,
                            float *Y, float *gws)
{
    int bb;
    if (Lk_eff == Lk) { mha__linear_forward(B * Lk, in, E, X, W, b, Y, gws); return; }
    for (bb = 0; bb < B; ++bb) {
        float *Yb = Y + (size_t)bb * Lk_eff * E;
        int r = Lk;
        mha__linear_forward(Lk, in, E, X + (size_t)bb * Lk * in, W, b, Yb, gws);
        if (extra) memcpy(Yb + (size_t)r++ * E, extra, (size_t)E * sizeof(float));
        if (zero_row) memset(Yb + (size_t)r * E, 0, (size_t)E * sizeof(float));
    }
}

/* ... and its backward: the real rows go through the Linear, the bias_k/bias_v
   row's gradient is summed over the batches into dextra, the zero row has none. */
static void mha__kv_project_backward(int B, int Lk, int Lk_eff, int in, int E, const float *X,
                                     const float *W, const float *dY, float *dX, float *dW,
                                     float *db, int has_extra, float *dextra, float *gws)
{
    int bb;
    if (Lk_eff == Lk) { mha__linear_backward(B * Lk, in, E, X, W, dY, dX, dW, db, gws); return; }
    for (bb = 0; bb < B; ++bb) {
        const float *dYb = dY + (size_t)bb * Lk_eff * E;
        mha__linear_backward(Lk, in, E, X + (size_t)bb * Lk * in, W, dYb,
                             dX ? dX + (size_t)bb * Lk * in : NULL, dW, db, gws);
        if (has_extra && dextra) mha__axpy(dextra, 1.0f, dYb + (size_t)Lk * E, E);
    }
}

/* Backward of the module, in the reverse order of the forward:
     forward:  Q = Xq Wq^T + bq,  K = ..,  V = ..           [B*L, E]
               C_h = softmax(scale Q_h K_h^T + mask) V_h     per head
               Y = C Wo^T + bo
     backward: dC = dY Wo;   dWo += dY^T C;   dbo += colsum dY
               dQ_h, dK_h, dV_h from the head backward
               dXq += dQ Wq;  dWq += dQ^T Xq;  dbq += colsum dQ   (and K, V)  */
MHADEF mha_status mha_backward(const mha_module *m, int B, int Lq, int Lk,
                               const float *query, const float *key, const float *value,
                               const float *dout, const mha_options *opt,
                               float *dquery, float *dkey, float *dvalue, mha_module_grad *grad,
                               void *workspace, size_t workspace_bytes)
{
    mha_options zero;
    mha_module_grad nog;
    mha__bwd_layout L;
    mha__attn a;
    void *owned;
    float *ws, *qp, *kp, *vp, *ctx, *dctx, *dqp, *dkp, *dvp, *gws;
    const float *wq, *wk, *wv, *bq, *bk, *bv;
    float *gwq, *gwk, *gwv, *gbq, *gbk, *gbv;
    size_t need, nq, nk;
    int E, b, h;
    mha_status st;

    if (!query || !key || !value || !dout) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if (!grad) { memset(&nog, 0, sizeof nog); grad = &nog; }
    if ((st = mha__bwd_plan(m, B, Lq, Lk, opt, &L)) != MHA_OK) return st;
    if (!mha__mul(L.total_floats, sizeof(float), &need)) return MHA_ERR_OVERFLOW;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;

    E = L.E;
    nq = (size_t)B * Lq * E; nk = (size_t)B * L.Lk_eff * E;
    qp = ws + L.qp; kp = ws + L.kp; vp = ws + L.vp; ctx = ws + L.ctx; dctx = ws + L.dctx;
    dqp = ws + L.dqp; dkp = ws + L.dkp; dvp = ws + L.dvp; gws = ws + L.gws;
    if (m->in_proj_weight) {
        wq = m->in_proj_weight; wk = wq + (size_t)E * E; wv = wk + (size_t)E * E;
        gwq = grad->in_proj_weight;
        gwk = gwq ? gwq + (size_t)E * E : NULL;
        gwv = gwq ? gwq + (size_t)2 * E * E : NULL;
    } else {
        wq = m->q_proj_weight; wk = m->k_proj_weight; wv = m->v_proj_weight;
        gwq = grad->q_proj_weight; gwk = grad->k_proj_weight; gwv = grad->v_proj_weight;
    }
    bq = m->in_proj_bias; bk = bq ? bq + E : NULL; bv = bq ? bq + 2 * E : NULL;
    gbq = bq ? grad->in_proj_bias : NULL;
    gbk = gbq ? gbq + E : NULL;
    gbv = gbq ? gbq + 2 * E : NULL;

    /* 1. recompute the projections Q, K, V (K and V with their appended rows) */
    mha__linear_forward(B * Lq, E, E, query, wq, bq, qp, gws);
    mha__kv_project(B, Lk, L.Lk_eff, L.kdim, E, key, wk, bk, m->bias_k, m->add_zero_attn, kp, gws);
    mha__kv_project(B, Lk, L.Lk_eff, L.vdim, E, value, wv, bv, m->bias_v, m->add_zero_attn, vp, gws);

    /* 2. through the output projection: dC = dY Wo   [B*Lq, E] */
    mha__gemm(0, 0, B * Lq, E, E, 1.0f, dout, (size_t)E, m->out_proj_weight, (size_t)E, 0.0f,
              dctx, (size_t)E, gws);

    /* 3. attention, head by head: C (for step 4) and dQ, dK, dV */
    memset(dqp, 0, nq * sizeof(float));
    memset(dkp, 0, nk * sizeof(float));
    memset(dvp, 0, nk * sizeof(float));
    mha__attn_common(&a, opt, B, L.H, Lq, Lk, L.Lk_eff, L.D, L.D);
    a.q.p = qp; a.q.rs = (size_t)E; a.q.hs = (size_t)L.D; a.q.bs = (size_t)Lq * E;
    a.k.p = kp; a.k.rs = (size_t)E; a.k.hs = (size_t)L.D; a.k.bs = (size_t)L.Lk_eff * E;
    a.v.p = vp; a.v.rs = (size_t)E; a.v.hs = (size_t)L.D; a.v.bs = (size_t)L.Lk_eff * E;
    a.o = ctx;  a.o_rs = (size_t)E; a.o_hs = (size_t)L.D; a.o_bs = (size_t)Lq * E;
    a.weights = NULL; a.per_head = 0;
    for (b = 0; b < B; ++b)
        for (h = 0; h < L.H; ++h)
            mha__attend_head_backward(&a, b, h, dctx, dqp, dkp, dvp, ws + L.p, ws + L.dp, gws);

    /* 4. output projection weights: dWo += dY^T C,  dbo += colsum dY */
    mha__linear_backward(B * Lq, E, E, ctx, m->out_proj_weight, dout, NULL,
                         grad->out_proj_weight, m->out_proj_bias ? grad->out_proj_bias : NULL, gws);

    /* 5. input projections: dX += dQ Wq,  dWq += dQ^T X,  dbq += colsum dQ (K, V alike;
          the bias_k / bias_v rows collect their own gradient) */
    mha__linear_backward(B * Lq, E, E, query, wq, dqp, dquery, gwq, gbq, gws);
    mha__kv_project_backward(B, Lk, L.Lk_eff, L.kdim, E, key, wk, dkp, dkey, gwk, gbk,
                             m->bias_k != NULL, grad->bias_k, gws);
    mha__kv_project_backward(B, Lk, L.Lk_eff, L.vdim, E, value, wv, dvp, dvalue, gwv, gbv,
                             m->bias_v != NULL, grad->bias_v, gws);

    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* -------------------------------------------------------- layer norm */

/* Mean and 1/sqrt(var + eps) of one row (biased variance, as nn.LayerNorm),
   summed in double so long rows keep their precision. */
static void mha__row_stats(const float *x, int E, float eps, float *mean, float *rstd)
{
    double s = 0, ss = 0, m;
    int j;
    for (j = 0; j < E; ++j) s += x[j];
    m = s / E;
    for (j = 0; j < E; ++j) ss += ((double)x[j] - m) * ((double)x[j] - m);
    *mean = (float)m;
    *rstd = (float)(1.0 / sqrt(ss / E + (double)eps));
}

/* y = xhat * w + b,   xhat = (x - mean) * rstd      (w, b NULL = 1, 0) */
static void mha__layernorm_forward(int rows, int E, const float *x, const float *w,
                                   const float *b, float eps, float *y)
{
    int r, j;
    for (r = 0; r < rows; ++r) {
        const float *xr = x + (size_t)r * E;
        float *yr = y + (size_t)r * E, mean, rstd;
        mha__row_stats(xr, E, eps, &mean, &rstd);
        for (j = 0; j < E; ++j) {
            float xhat = (xr[j] - mean) * rstd;
            yr[j] = xhat * (w ? w[j] : 1.0f) + (b ? b[j] : 0.0f);
        }
    }
}

/* Backward, recomputing mean and rstd from x.  With g = dy * w:
     dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
     dw += dy * xhat,   db += dy                     (all added to)  */
static void mha__layernorm_backward(int rows, int E, const float *x, const float *w, float eps,
                                    const float *dy, float *dx, float *dw, float *db)
{
    int r, j;
    for (r = 0; r < rows; ++r) {
        const float *xr = x + (size_t)r * E, *dyr = dy + (size_t)r * E;
        float mean, rstd;
        double mg = 0, mgx = 0;
        mha__row_stats(xr, E, eps, &mean, &rstd);
        for (j = 0; j < E; ++j) {
            float xhat = (xr[j] - mean) * rstd, g = dyr[j] * (w ? w[j] : 1.0f);
            mg += g;
            mgx += (double)g * xhat;
            if (dw) dw[j] += dyr[j] * xhat;
            if (db) db[j] += dyr[j];
        }
        mg /= E; mgx /= E;
        if (dx) {
            float *dxr = dx + (size_t)r * E;
            for (j = 0; j < E; ++j) {
                float xhat = (xr[j] - mean) * rstd, g = dyr[j] * (w ? w[j] : 1.0f);
                dxr[j] += rstd * (g - (float)mg - xhat * (float)mgx);
            }
        }
    }
}

static mha_status mha__layernorm_check(int rows, int E, float eps)
{
    size_t n;
    if (rows <= 0 || E <= 0) return MHA_ERR_INVALID_SIZE;
    if (!(eps >= 0.0f) || eps == INFINITY) return MHA_ERR_INVALID_ARGUMENT;
    return mha__mul3((size_t)rows, (size_t)E, sizeof(float), &n) ? MHA_OK : MHA_ERR_OVERFLOW;
}

MHADEF mha_status mha_layernorm_forward(int rows, int E, const float *x, const float *w,
                                        const float *b, float eps, float *y)
{
    mha_status st;
    if (!x || !y) return MHA_ERR_NULL_POINTER;
    if ((st = mha__layernorm_check(rows, E, eps)) != MHA_OK) return st;
    mha__layernorm_forward(rows, E, x, w, b, eps > 0.0f ? eps : 1e-5f, y);
    return MHA_OK;
}

MHADEF mha_status mha_layernorm_backward(int rows, int E, const float *x, const float *w,
                                         float eps, const float *dy, float *dx, float *dw, float *db)
{
    mha_status st;
    if (!x || !dy) return MHA_ERR_NULL_POINTER;
    if ((st = mha__layernorm_check(rows, E, eps)) != MHA_OK) return st;
    mha__layernorm_backward(rows, E, x, w, eps > 0.0f ? eps : 1e-5f, dy, dx, dw, db);
    return MHA_OK;
}

/* -------------------------------------------------------- activations */

/* g = act(z):  ReLU max(0, z);   GELU z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2)) */
static void mha__activation_forward(mha_activation act, size_t n, const float *z, float *g)
{
    size_t i;
    if (act == MHA_ACT_RELU)
        for (i = 0; i < n; ++i) g[i] = z[i] > 0.0f ? z[i] : 0.0f;
    else
        for (i = 0; i < n; ++i) g[i] = 0.5f * z[i] * (1.0f + erff(z[i] * 0.70710678118654752f));
}

/* dz = dg * act'(z), in place over dg:
     ReLU' = [z > 0];   GELU' = Phi(z) + z phi(z),  phi(z) = exp(-z^2/2) / sqrt(2 pi) */
static void mha__activation_backward(mha_activation act, size_t n, const float *z, float *dg)
{
    size_t i;
    if (act == MHA_ACT_RELU) {
        for (i = 0; i < n; ++i) if (!(z[i] > 0.0f)) dg[i] = 0.0f;
    } else {
        for (i = 0; i < n; ++i) {
            float cdf = 0.5f * (1.0f + erff(z[i] * 0.70710678118654752f));
            float pdf = 0.39894228040143268f * expf(-0.5f * z[i] * z[i]);
            dg[i] *= cdf + z[i] * pdf;
        }
    }
}

/* ------------------------------------------------------ encoder layer */

/* Workspace of the encoder layer (offsets in floats), shared by forward and
   backward.  N = B*L rows.
     a   [N,E] attention output          t1  [N,E] x + a (post) / LN1(x) (pre)
     h   [N,E] after the first residual  z   [N,F] linear1 output
     g   [N,F] act(z)                    t2  [N,E] h + f (post) / LN2(h) (pre)
     d1, d2 [N,E], dg [N,F]: backward only
     sub: the self-attention's own workspace (forward or backward, whichever is larger) */
typedef struct mha__enc_layout {
    int E, F, N;
    size_t a, t1, h, z, g, t2, d1, d2, dg, gws, sub, sub_bytes, total_floats;
} mha__enc_layout;

static mha_status mha__enc_plan(const mha_encoder_layer *ly, int B, int L,
                                const mha_options *opt, mha__enc_layout *P)
{
    size_t cur = 0, n, fb = 0, fw = 0, bb = 0, g, t;
    mha_status st;
    if (!ly) return MHA_ERR_NULL_POINTER;
    if (!ly->linear1_weight || !ly->linear2_weight) return MHA_ERR_NULL_POINTER;
    if (ly->dim_feedforward <= 0 || B <= 0 || L <= 0) return MHA_ERR_INVALID_SIZE;
    if ((ly->activation != MHA_ACT_RELU && ly->activation != MHA_ACT_GELU) ||
        (ly->norm_first != 0 && ly->norm_first != 1) ||
        !(ly->layer_norm_eps >= 0.0f) || ly->layer_norm_eps == INFINITY)
        return MHA_ERR_INVALID_ARGUMENT;
    /* the backward's limits (in_proj_weight, no bias_k / zero attn) apply to both calls */
    if ((st = mha_backward_workspace_size(&ly->self_attn, B, L, L, opt, &bb)) != MHA_OK) return st;
    /* the forward's need can differ with and without weights: take the larger */
    if ((st = mha_forward_workspace_size(&ly->self_attn, B, L, L, opt, 0, &fb)) != MHA_OK) return st;
    if ((st = mha_forward_workspace_size(&ly->self_attn, B, L, L, opt, 1, &fw)) != MHA_OK) return st;
    if (fw > fb) fb = fw;
    P->E = ly->self_attn.embed_dim; P->F = ly->dim_feedforward; P->N = B * L;
    if (!mha__mul3((size_t)P->N, (size_t)P->F, sizeof(float), &n) ||
        !mha__mul3((size_t)P->F, (size_t)P->E, sizeof(float), &n) || P->F > INT_MAX / 2)
        return MHA_ERR_OVERFLOW;
    P->sub_bytes = fb > bb ? fb : bb;
    g = mha__linear_gws(P->N, P->E, P->F);
    t = mha__linear_gws(P->N, P->F, P->E); if (t > g) g = t;
    if (!mha__region(&cur, (size_t)P->N * P->E, &P->a) ||
        !mha__region(&cur, (size_t)P->N * P->E, &P->t1) ||
        !mha__region(&cur, (size_t)P->N * P->E, &P->h) ||
        !mha__region(&cur, (size_t)P->N * P->F, &P->z) ||
        !mha__region(&cur, (size_t)P->N * P->F, &P->g) ||
        !mha__region(&cur, (size_t)P->N * P->E, &P->t2) ||
        !mha__region(&cur, (size_t)P->N * P->E, &P->d1) ||
        !mha__region(&cur, (size_t)P->N * P->E, &P->d2) ||
        !mha__region(&cur, (size_t)P->N * P->F, &P->dg) ||
        !mha__region(&cur, g, &P->gws) ||
        !mha__region(&cur, P->sub_bytes / sizeof(float) + 1, &P->sub) ||
        !mha__add(cur, MHA__ALIGN_FLOATS, &P->total_floats))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

MHADEF mha_status mha_encoder_workspace_size(const mha_encoder_layer *layer, int B, int L,
                                             const mha_options *opt, size_t *bytes)
{
    mha_options zero;
    mha__enc_layout P;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__enc_plan(layer, B, L, opt, &P)) != MHA_OK) return st;
    return mha__mul(P.total_floats, sizeof(float), bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
}

/* The forward pass, leaving every intermediate in the workspace for the backward.
     post-norm:  a = SA(x);  t1 = x + a;  h = LN1(t1);  z = h W1^T + b1;  g = act(z);
                 f = g W2^T + b2;  t2 = h + f;  y = LN2(t2)
     pre-norm:   t1 = LN1(x);  a = SA(t1);  h = x + a;  t2 = LN2(h);  z = t2 W1^T + b1;
                 g = act(z);  f = g W2^T + b2;  y = h + f                          */
static mha_status mha__enc_forward(const mha_encoder_layer *ly, int B, int L, const float *x,
                                   const mha_options *opt, float *y, float *attn_weights,
                                   const mha__enc_layout *P, float *ws)
{
    int E = P->E, F = P->F, N = P->N;
    size_t ne = (size_t)N * E, i;
    float eps = ly->layer_norm_eps > 0.0f ? ly->layer_norm_eps : 1e-5f;
    float *a = ws + P->a, *t1 = ws + P->t1, *h = ws + P->h, *z = ws + P->z, *g = ws + P->g;
    float *t2 = ws + P->t2, *gws = ws + P->gws;
    const float *ffin;
    mha_status st;

    /* 1. self-attention block */
    if (!ly->norm_first) {
        st = mha_forward(&ly->self_attn, B, L, L, x, x, x, opt, a, attn_weights,
                         ws + P->sub, P->sub_bytes);
        if (st != MHA_OK) return st;
        for (i = 0; i < ne; ++i) t1[i] = x[i] + a[i];
        mha__layernorm_forward(N, E, t1, ly->norm1_weight, ly->norm1_bias, eps, h);
        ffin = h;
    } else {
        mha__layernorm_forward(N, E, x, ly->norm1_weight, ly->norm1_bias, eps, t1);
        st = mha_forward(&ly->self_attn, B, L, L, t1, t1, t1, opt, a, attn_weights,
                         ws + P->sub, P->sub_bytes);
        if (st != MHA_OK) return st;
        for (i = 0; i < ne; ++i) h[i] = x[i] + a[i];
        mha__layernorm_forward(N, E, h, ly->norm2_weight, ly->norm2_bias, eps, t2);
        ffin = t2;
    }

    /* 2. feed-forward block: f = act(in W1^T + b1) W2^T + b2, f goes into y */
    mha__linear_forward(N, E, F, ffin, ly->linear1_weight, ly->linear1_bias, z, gws);
    mha__activation_forward(ly->activation, (size_t)N * F, z, g);
    mha__linear_forward(N, F, E, g, ly->linear2_weight, ly->linear2_bias, y, gws);

    /* 3. second residual (and norm) */
    if (!ly->norm_first) {
        for (i = 0; i < ne; ++i) t2[i] = h[i] + y[i];
        mha__layernorm_forward(N, E, t2, ly->norm2_weight, ly->norm2_bias, eps, y);
    } else {
        for (i = 0; i < ne; ++i) y[i] += h[i];
    }
    return MHA_OK;
}

MHADEF mha_status mha_encoder_forward(const mha_encoder_layer *layer, int B, int L,
                                      const float *x, const mha_options *opt, float *y,
                                      float *attn_weights, void *workspace, size_t workspace_bytes)
{
    mha_options zero;
    mha__enc_layout P;
    void *owned;
    float *ws;
    size_t need;
    mha_status st;
    if (!x || !y) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__enc_plan(layer, B, L, opt, &P)) != MHA_OK) return st;
    if (!mha__mul(P.total_floats, sizeof(float), &need)) return MHA_ERR_OVERFLOW;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;
    st = mha__enc_forward(layer, B, L, x, opt, y, attn_weights, &P, ws);
    if (owned) MHA_FREE(owned);
    return st;
}

/* Backward: recompute the forward (into the workspace), then walk it in reverse.
     post-norm:  dt2 = LN2'(dy);  dh = dt2;  df = dt2;  dg = df W2;  dz = dg act'(z);
                 dh += dz W1;  dt1 = LN1'(dh);  dx += dt1;  dx += SA'(dt1)
     pre-norm:   dh = dy;  df = dy;  dg = df W2;  dz = dg act'(z);  dt2 = dz W1;
                 dh += LN2'(dt2);  dx += dh;  dt1 = SA'(dh);  dx += LN1'(dt1)
   (LN' and SA' are the layer norm's and the self-attention's backward; the
   weight gradients are added on the way.)  */
MHADEF mha_status mha_encoder_backward(const mha_encoder_layer *layer, int B, int L,
                                       const float *x, const mha_options *opt, const float *dy,
                                       float *dx, mha_encoder_layer_grad *grad,
                                       void *workspace, size_t workspace_bytes)
{
    const mha_encoder_layer *ly = layer;
    mha_options zero;
    mha_encoder_layer_grad nog;
    mha__enc_layout P;
    void *owned;
    float *ws, *t1, *h, *z, *g, *t2, *d1, *d2, *dg, *gws, *y, eps;
    size_t need, ne, nf, i;
    int E, F, N;
    mha_status st;

    if (!x || !dy) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if (!grad) { memset(&nog, 0, sizeof nog); grad = &nog; }
    if ((st = mha__enc_plan(layer, B, L, opt, &P)) != MHA_OK) return st;
    if (!mha__mul(P.total_floats, sizeof(float), &need)) return MHA_ERR_OVERFLOW;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;
    E = P.E; F = P.F; N = P.N; ne = (size_t)N * E; nf = (size_t)N * F;
    eps = ly->layer_norm_eps > 0.0f ? ly->layer_norm_eps : 1e-5f;
    t1 = ws + P.t1; h = ws + P.h; z = ws + P.z; g = ws + P.g; t2 = ws + P.t2;
    d1 = ws + P.d1; d2 = ws + P.d2; dg = ws + P.dg; gws = ws + P.gws;

    /* 1. recompute; y itself is not needed, d1 holds it for now */
    y = d1;
    if ((st = mha__enc_forward(ly, B, L, x, opt, y, NULL, &P, ws)) != MHA_OK) goto done;
    memset(d2, 0, ne * sizeof(float));
    memset(dg, 0, nf * sizeof(float));

    if (!ly->norm_first) {
        /* 2. dt2 = LN2'(dy) -> d1; it flows into both h and f */
        memset(d1, 0, ne * sizeof(float));
        mha__layernorm_backward(N, E, t2, ly->norm2_weight, eps, dy, d1,
                                ly->norm2_weight ? grad->norm2_weight : NULL,
                                ly->norm2_bias ? grad->norm2_bias : NULL);
        /* 3. feed-forward: dg = df W2, dz = dg act'(z), dh += dz W1 (d1 is dh now) */
        mha__linear_backward(N, F, E, g, ly->linear2_weight, d1, dg, grad->linear2_weight,
                             ly->linear2_bias ? grad->linear2_bias : NULL, gws);
        mha__activation_backward(ly->activation, nf, z, dg);
        mha__linear_backward(N, E, F, h, ly->linear1_weight, dg, d1, grad->linear1_weight,
                             ly->linear1_bias ? grad->linear1_bias : NULL, gws);
        /* 4. dt1 = LN1'(dh) -> d2; the residual passes it to x, the attention too */
        mha__layernorm_backward(N, E, t1, ly->norm1_weight, eps, d1, d2,
                                ly->norm1_weight ? grad->norm1_weight : NULL,
                                ly->norm1_bias ? grad->norm1_bias : NULL);
        if (dx) for (i = 0; i < ne; ++i) dx[i] += d2[i];
        st = mha_backward(&ly->self_attn, B, L, L, x, x, x, d2, opt, dx, dx, dx,
                          &grad->self_attn, ws + P.sub, P.sub_bytes);
    } else {
        /* 2. feed-forward on t2 = LN2(h): dg = dy W2, dz, dt2 = dz W1 -> d2 */
        mha__linear_backward(N, F, E, g, ly->linear2_weight, dy, dg, grad->linear2_weight,
                             ly->linear2_bias ? grad->linear2_bias : NULL, gws);
        mha__activation_backward(ly->activation, nf, z, dg);
        mha__linear_backward(N, E, F, t2, ly->linear1_weight, dg, d2, grad->linear1_weight,
                             ly->linear1_bias ? grad->linear1_bias : NULL, gws);
        /* 3. dh = dy + LN2'(dt2) -> d1 */
        memcpy(d1, dy, ne * sizeof(float));
        mha__layernorm_backward(N, E, h, ly->norm2_weight, eps, d2, d1,
                                ly->norm2_weight ? grad->norm2_weight : NULL,
                                ly->norm2_bias ? grad->norm2_bias : NULL);
        /* 4. the residual passes dh to x; the attention's input t1 = LN1(x) gets dt1 -> d2 */
        if (dx) for (i = 0; i < ne; ++i) dx[i] += d1[i];
        memset(d2, 0, ne * sizeof(float));
        st = mha_backward(&ly->self_attn, B, L, L, t1, t1, t1, d1, opt, d2, d2, d2,
                          &grad->self_attn, ws + P.sub, P.sub_bytes);
        if (st == MHA_OK)
            mha__layernorm_backward(N, E, x, ly->norm1_weight, eps, d2, dx,
                                    ly->norm1_weight ? grad->norm1_weight : NULL,
                                    ly->norm1_bias ? grad->norm1_bias : NULL);
    }
done:
    if (owned) MHA_FREE(owned);
    return st;
}

/* ------------------------------------------------ training pieces */

/* PE[pos, 2i] = sin(pos * w_i),  PE[pos, 2i+1] = cos(pos * w_i),  w_i = 10000^(-2i/d).
   Even and odd columns share the frequency of their pair; computed in double. */
MHADEF mha_status mha_positional_encoding(int L, int d, float *pe)
{
    int pos, c;
    size_t n;
    if (!pe) return MHA_ERR_NULL_POINTER;
    if (L <= 0 || d <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul3((size_t)L, (size_t)d, sizeof(float), &n)) return MHA_ERR_OVERFLOW;
    for (pos = 0; pos < L; ++pos)
        for (c = 0; c < d; ++c) {
            double w = pow(10000.0, -(double)(c - c % 2) / d);
            pe[(size_t)pos * d + c] = (float)(c % 2 == 0 ? sin(pos * w) : cos(pos * w));
        }
    return MHA_OK;
}

static mha_status mha__embedding_check(int n, int vocab, int d, const int *tokens)
{
    size_t t;
    int i;
    if (n <= 0 || vocab <= 0 || d <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul3((size_t)n, (size_t)d, sizeof(float), &t) ||
        !mha__mul3((size_t)vocab, (size_t)d, sizeof(float), &t))
        return MHA_ERR_OVERFLOW;
    for (i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= vocab) return MHA_ERR_INVALID_ARGUMENT;
    return MHA_OK;
}

/* out[i, :] = table[tokens[i], :] */
MHADEF mha_status mha_embedding_forward(int n, int vocab, int d, const int *tokens,
                                        const float *table, float *out)
{
    mha_status st;
    int i;
    if (!tokens || !table || !out) return MHA_ERR_NULL_POINTER;
    if ((st = mha__embedding_check(n, vocab, d, tokens)) != MHA_OK) return st;
    for (i = 0; i < n; ++i)
        memcpy(out + (size_t)i * d, table + (size_t)tokens[i] * d, (size_t)d * sizeof(float));
    return MHA_OK;
}

/* dtable[tokens[i], :] += dout[i, :]  (a token seen twice collects both) */
MHADEF mha_status mha_embedding_backward(int n, int vocab, int d, const int *tokens,
                                         const float *dout, float *dtable)
{
    mha_status st;
    int i;
    if (!tokens || !dout || !dtable) return MHA_ERR_NULL_POINTER;
    if ((st = mha__embedding_check(n, vocab, d, tokens)) != MHA_OK) return st;
    for (i = 0; i < n; ++i) mha__axpy(dtable + (size_t)tokens[i] * d, 1.0f, dout + (size_t)i * d, d);
    return MHA_OK;
}

/* Per row r with target t:  loss_r = logsumexp(z_r) - z_r[t],
   d loss_r / d z_r = softmax(z_r) - onehot(t);  the mean divides both by N. */
MHADEF mha_status mha_cross_entropy(int n, int V, const float *logits, const int *targets,
                                    float *loss, float *dlogits, int *correct)
{
    double total = 0;
    size_t t;
    int r, j, counted = 0, right = 0;
    if (!logits || !targets || !loss) return MHA_ERR_NULL_POINTER;
    if (n <= 0 || V <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul3((size_t)n, (size_t)V, sizeof(float), &t)) return MHA_ERR_OVERFLOW;
    for (r = 0; r < n; ++r) {
        if (targets[r] >= V) return MHA_ERR_INVALID_ARGUMENT;
        if (targets[r] >= 0) ++counted;
    }
    for (r = 0; r < n; ++r) {
        const float *z = logits + (size_t)r * V;
        float *dz = dlogits ? dlogits + (size_t)r * V : NULL;
        double sum = 0, lse;
        float mx = z[0];
        int arg = 0;
        if (targets[r] < 0) {                       /* ignored row: no loss, no gradient */
            if (dz) for (j = 0; j < V; ++j) dz[j] = 0.0f;
            continue;
        }
        for (j = 1; j < V; ++j) if (z[j] > mx) { mx = z[j]; arg = j; }
        for (j = 0; j < V; ++j) sum += exp((double)z[j] - mx);
        lse = mx + log(sum);
        total += lse - z[targets[r]];
        right += arg == targets[r];
        if (dz) {
            for (j = 0; j < V; ++j) dz[j] = (float)(exp((double)z[j] - lse) / counted);
            dz[targets[r]] -= 1.0f / (float)counted;
        }
    }
    *loss = counted ? (float)(total / counted) : 0.0f;
    if (correct) *correct = right;
    return MHA_OK;
}

/* p -= lr * (g + weight_decay * p) */
MHADEF mha_status mha_sgd_step(size_t n, float *p, const float *g, float lr, float weight_decay)
{
    size_t i;
    if (!p || !g) return MHA_ERR_NULL_POINTER;
    for (i = 0; i < n; ++i) p[i] -= lr * (g[i] + weight_decay * p[i]);
    return MHA_OK;
}

/* torch.optim.AdamW, step t = 1, 2, ...:
     p  *= 1 - lr * wd                       (decoupled weight decay)
     m   = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
     p  -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)          */
MHADEF mha_status mha_adamw_step(const mha_adamw *opt, long step, size_t n, float *p,
                                 const float *g, float *m, float *v)
{
    float lr, b1, b2, eps, wd, c1, c2;
    size_t i;
    if (!opt || !p || !g || !m || !v) return MHA_ERR_NULL_POINTER;
    lr = opt->lr > 0.0f ? opt->lr : 1e-3f;
    b1 = opt->beta1 > 0.0f ? opt->beta1 : 0.9f;
    b2 = opt->beta2 > 0.0f ? opt->beta2 : 0.999f;
    eps = opt->eps > 0.0f ? opt->eps : 1e-8f;
    wd = opt->weight_decay;
    if (step < 1 || !(b1 < 1.0f) || !(b2 < 1.0f) || !(wd >= 0.0f) || !(opt->lr >= 0.0f))
        return MHA_ERR_INVALID_ARGUMENT;
    c1 = (float)(1.0 - pow((double)b1, (double)step));
    c2 = (float)(1.0 - pow((double)b2, (double)step));
    for (i = 0; i < n; ++i) {
        p[i] *= 1.0f - lr * wd;
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        p[i] -= lr * (m[i] / c1) / (sqrtf(v[i] / c2) + eps);
    }
    return MHA_OK;
}

/* xorshift64*, seeded through splitmix64 so that nearby seeds give unrelated streams */
MHADEF void mha_rng_seed(mha_rng *r, unsigned long long seed)
{
    unsigned long long z = seed + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    r->state = z ? z : 1;   /* xorshift must not start at 0 */
}

MHADEF unsigned mha_rng_u32(mha_rng *r)
{
    unsigned long long s = r->state;
    s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
    r->state = s;
    return (unsigned)(((s * 2685821657736338717ULL) >> 32) & 0xFFFFFFFFu);
}

MHADEF float mha_rng_uniform(mha_rng *r)
{
    return (float)(mha_rng_u32(r) >> 8) * (1.0f / 16777216.0f);
}

MHADEF void mha_rng_fill(mha_rng *r, float *x, size_t n, float a)
{
    size_t i;
    for (i = 0; i < n; ++i) x[i] = a * (2.0f * mha_rng_uniform(r) - 1.0f);
}

#endif /* MHA_IMPLEMENTATION_DONE */
#endif /* MHA_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licenses -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT License
Copyright (c) 2026 the mha.h authors
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
In jurisdictions that recognize copyright laws, the author or authors of this
software dedicate any and all copyright interest in the software to the public
domain. We make this dedication in favor of the public domain and the benefit of
our heirs. The software is distributed in the hope that it will be useful, but
WITHOUT ANY WARRANTY; for the purpose of the interpretation of the law, this
license applies to all software and its derivatives.
------------------------------------------------------------------------------
*/
