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

   PLANS (the same, made once and run many times; docs/api.md)
       mha_plan *p;                 // B, the longest Lq and Lk, options, threads, flags
       s = mha_module_plan(&m, B, Lmax, Lmax, &opt, MHA_PLAN_PACK, NULL, 0, &p);
       size_t n = mha_plan_workspace_size(p);   // every run fits in n bytes
       void *ws = malloc(n);        // one per thread: a plan runs from many at once
       s = mha_module_forward(p, L, L, x, x, x, NULL, NULL, out, NULL, ws, n);  // L <= Lmax
       mha_plan_destroy(p);
     Plans exist for mha_gemm, mha_sdpa (forward, backward), the module
     (forward, backward) and the encoder layer; every one-shot call above is
     a plan made for that call and run once.

   THE MATH  (X: [L, E]; W: [E_out, E_in] as PyTorch stores Linear weights)
       Q = X_q Wq^T + bq     K = X_k Wk^T + bk     V = X_v Wv^T + bv
       split E into H heads of D = E/H columns:  Q_h = Q[:, h*D:(h+1)*D]
       A_h = softmax(Q_h K_h^T * scale + mask)     scale = 1/sqrt(D)
       O   = concat_h(A_h V_h) Wo^T + bo

   CONFIGURATION (define before the implementation include)
       MHA_STATIC          make every function static (private to one file)
       MHA_NO_SIMD         use the portable scalar kernels even where AVX2/NEON exist
       MHA_NO_AVX512       use the AVX2 kernels even where AVX-512F is enabled
       MHA_MALLOC(sz) / MHA_FREE(p)   allocator for the convenience paths
                           (define both or neither)
       MHA_ASSERT(x)       internal invariant checks (default: assert.h)
       MHA_PROFILE_MARK(phase)  called as the fused attention core enters each
                           phase (MHA_PHASE_* below; default: nothing);
                           bench/profile_attn.c times the phases with it
     SIMD is chosen at compile time: AVX-512 when __AVX512F__ is defined,
     else AVX2 when __AVX2__ and __FMA__ are defined
     (-mavx2 -mfma or -march=native), NEON when __ARM_NEON is.  There is no
     run-time CPU detection.  Threads come from OpenMP when built with -fopenmp;
     on a machine shared with other jobs run with OMP_WAIT_POLICY=passive
     (a waiting thread that spins on the core of a working one stalls it).

   MEMORY
     Called without attn_weights (NULL), attention is fused: an online
     softmax over tiles of keys, so the workspace grows with L*E, never with
     L^2 (mha_forward at L = 16384, E = 512, H = 8: about 16 MiB).  Asking
     for the weights costs their [B, Lq, Lk] output and rows of scores per
     thread.  Both paths agree to float32 rounding, and no result depends on
     the thread count.  A module run many times can have its projection
     weights packed once (MHA_PLAN_PACK, or the older mha_module_pack and
     m.packed): same results, and the short sequences skip the per-call copy
     of Wq, Wk, Wv and Wo.  An encoder plan without MHA_PLAN_TRAINING sizes
     for inference only: L*E, as the attention (training keeps [L, F]; the
     attention's backward is fused too and needs tiles only, never L^2).
     To look at a long sequence's attention without the L^2 weights, point
     opt.row_stats at an mha_row_stats: every row's lse, entropy, largest
     weight and weight on key 0 come out of the fused path, and
     mha_sdpa_weights_rows (mha_weights_rows for a module) recomputes the
     exact weights of chosen rows from the lse (docs/visualisation.md,
     examples/long_attention.c).

   DECODING (docs/decoding.md)
     Options for decoder models, all off when zero: grouped-query attention
     (num_kv_heads; query head h reads KV head h / (H / Hkv)), sliding
     window, soft-capping, ALiBi, sink logits, the log-sum-exp of every row
     and mha_attn_merge for attention split over key ranges.  mha_rope_*
     (half-split or interleaved RoPE) and mha_module.rope; a caller-owned
     KV cache (mha_kv_cache, [B, Hkv, capacity, D]) with mha_forward_cached
     for prefill and one-token decode steps (examples/decode.c).

   TRAINING (backward passes, docs/theory.md and docs/training.md)
     mha_sdpa_backward / mha_backward give the gradients of the inputs and of
     every weight in state_dict layout (mha_module_grad), recomputing the
     attention probabilities instead of storing them.  A training plan's
     forward run keeps what its backward needs in the workspace (the saved
     forward: lse, O, the projections, the encoder's activations), so the
     backward run on that workspace does not run the forward again.
     mha_encoder_forward / _backward implement nn.TransformerEncoderLayer
     (post- or pre-norm, ReLU or GELU); plus layer norm, linear, embedding, positional encoding, cross-
     entropy, SGD and AdamW steps, and a seeded RNG.  Backward calls ADD into
     their gradient buffers, so zero them before a step.

   ERRORS
     Every call returns an mha_status; mha_status_string() describes it.
     On any status other than MHA_OK no output has been written.

   WORKSPACES
     A workspace may start at any byte address: each *_workspace_size
     includes 64 bytes of slack, and the call aligns inside it.

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
    X(MHA_ERR_HEADS_DIVIDE,        "embed_dim is not divisible by num_heads, or num_heads by num_kv_heads") \
    X(MHA_ERR_OVERFLOW,            "the sizes are too large: a size product overflows")\
    X(MHA_ERR_MASK_SHAPE,          "a mask's shape does not fit the attention shape")  \
    X(MHA_ERR_INVALID_ARGUMENT,    "an argument has an invalid value (flag, number or weight combination)") \
    X(MHA_ERR_WORKSPACE_TOO_SMALL, "a workspace or buffer is smaller than its size query asked for") \
    X(MHA_ERR_OUT_OF_MEMORY,       "MHA_MALLOC returned NULL")                         \
    X(MHA_ERR_PACK_MISMATCH,       "the packed buffer was made for another module shape, layout or build") \
    X(MHA_ERR_STALE,               "the weights changed after the plan or pack was made: make it again") \
    X(MHA_ERR_BAD_ENUM,            "an enum argument holds a value outside its range") \
    X(MHA_ERR_MISALIGNED,          "a buffer is not aligned as the call requires")    \
    X(MHA_ERR_EXCEEDS_PLAN,        "the run asks for more than its plan was made for (lengths, weights, masks or a backward)") \
    X(MHA_ERR_CAPACITY,            "the KV cache has no room for the tokens being appended")

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
   let the call allocate them through MHA_MALLOC.  The size is for
   omp_get_max_threads() threads at the time of the query; the call runs on
   OpenMP's count at its own time, or on fewer when the workspace holds
   fewer (OpenMP's count may have grown in between), and a workspace too
   small for one thread is MHA_ERR_WORKSPACE_TOO_SMALL.  mha_gemm_plan fixes
   the thread count instead.  The result is bit-identical for any number of
   threads.  The other one-shot calls (mha_sdpa, mha_forward, ...) follow the
   same rule when their options' num_threads is 0.  */
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

/* Statistics of each attention row, for looking at long sequences without
   an [Lq, Lk] matrix (docs/visualisation.md).  Each pointer NULL (not
   wanted) or [B, H, Lq]; they are written by every fused or unfused
   attention call whose options point here.  With p_j the weights of row
   (b, h, i) and p_s = exp(sink_h - lse) the sink's share (0 without sinks):
     lse          log(sum_j exp(s_ij) + exp(sink_h)), as mha_options.lse
     entropy      -sum_j p_j log p_j - p_s log p_s, in nats: the entropy of
                  the row's whole softmax, sink included (0 <= H <= log(keys + 1))
     max_weight   max_j p_j over the keys (the sink is not a key, but its
                  logit is in the denominator)
     first_weight p_0, the weight on key 0 (the first token: "attention sink"
                  mass); 0 when a mask, the window or causality blocks it.
                  KV cache: key 0 is the token at position 0, so a rolling
                  cache with n_keep = 0 that has overwritten it gives 0.
   A row whose keys are all blocked (and has no sink) gets lse = -inf and
   entropy, max_weight and first_weight 0; no NaN.  Computing them costs
   the fused path a second pass over each score tile; asking for none
   costs nothing.  */
typedef struct mha_row_stats {
    float *lse, *entropy, *max_weight, *first_weight;
} mha_row_stats;

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

    /* Decoder attention (docs/decoding.md).  Zero = off; i' below is the
       query's position on the key axis: i' = i (TOP_LEFT) or i + Lk - Lq
       (BOTTOM_RIGHT), the alignment causal_align picks (also without causal).
       The module's appended keys (bias_k, add_zero_attn) get no window,
       ALiBi or mask.  */
    int          num_kv_heads;   /* mha_sdpa: k, v are [B, Hkv, Lk, D]; 0 = H; H % Hkv == 0
                                    (else MHA_ERR_HEADS_DIVIDE).  Query head h reads KV head
                                    h / (H / Hkv): PyTorch's repeat_interleave grouping.  The
                                    module takes mha_module.num_kv_heads instead. */
    int          window;         /* nonzero: sliding window, query i sees key j only when
                                    i' - window_left <= j <= i' + window_right */
    int          window_left;    /* -1 = unbounded (other negatives: MHA_ERR_INVALID_ARGUMENT) */
    int          window_right;   /* -1 = unbounded; with causal the causal limit also holds */
    float        softcap;        /* > 0: s -> softcap * tanh(s / softcap) on the scaled scores,
                                    before masks and ALiBi (Gemma-2); negative: invalid */
    int          alibi;          /* nonzero: add slope_h * (j - i') to the scores */
    const float *alibi_slopes;   /* [H] per-head slopes, or NULL: the paper's recipe
                                    (mha_alibi_slopes), also for H not a power of two */
    const float *sinks;          /* [H] sink logit per head, or NULL: joins each row's softmax
                                    denominator with no value (gpt-oss); the weights of a row
                                    then sum to 1 - exp(sink_h - lse) */
    float       *lse;            /* output, NULL or [B, H, Lq]: log sum_j exp(s_ij) of each row
                                    over its allowed keys and the sink (-inf: none) */
    float       *sinks_grad;     /* backward calls: NULL or [H], += dLoss/dsinks */
    int          position_offset;/* the module's RoPE: key j is at position offset + j, query i
                                    at offset + i' (>= 0; negative: MHA_ERR_INVALID_ARGUMENT) */
    const mha_row_stats *row_stats; /* output, NULL or the per-row statistics to write (its
                                    arrays are read at each call; like lse, a plan made with
                                    it writes every run's statistics to the same arrays) */
} mha_options;

/* The ALiBi slopes of the paper (Press et al.) for H heads, into slopes[H]:
   with n = the largest power of two <= H, head h < n gets 2^(-8 (h+1) / n) and
   head n + m gets 2^(-4 (2m+1) / n) (every other slope of the 2n recipe).  */
MHADEF mha_status mha_alibi_slopes(int H, float *slopes);

/* The defaults, written out: PyTorch's (no mask, scale 1/sqrt(D), head-
   averaged weights, OpenMP's threads).  All-zero means the same; start
   from this when you prefer every value spelled out. */
MHADEF mha_options mha_options_defaults(void);

/* ---------------------------------------------------------------- SDPA */

/* Scaled dot-product attention on heads that are already projected:
     q [B,H,Lq,D], k [B,H,Lk,D], v [B,H,Lk,Dv]  ->  out [B,H,Lq,Dv]
     attn_weights: NULL, or [B,H,Lq,Lk] (per_head_weights ignored here).
   opt may be NULL.  workspace: mha_sdpa_workspace_size() bytes or NULL.
   out may be q when D == Dv (in place); it must not overlap k or v.  */
MHADEF mha_status mha_sdpa_workspace_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                          const mha_options *opt, int need_weights,
                                          size_t *bytes);
MHADEF mha_status mha_sdpa(int B, int H, int Lq, int Lk, int D, int Dv,
                           const float *q, const float *k, const float *v,
                           const mha_options *opt, float *out, float *attn_weights,
                           void *workspace, size_t workspace_bytes);

/* The exact weights of chosen query rows, recomputed from the lse a fused
   call saved (opt.lse or row_stats.lse of the same q, k and options):
       weights[b, h, r, j] = exp(s_ij - lse[b, h, i]),   i = rows[r]
   with s_ij the forward's scores (scale, softcap, ALiBi, masks, window and
   causal alignment as in opt; k is [B, Hkv, Lk, D] with num_kv_heads).
   weights [B, H, n_rows, Lk]; no [Lq, Lk] matrix and no workspace.  A row
   index outside 0..Lq-1 is MHA_ERR_INVALID_ARGUMENT, n_rows <= 0
   MHA_ERR_INVALID_SIZE; nothing is written then.  A row with lse = -inf
   (every key blocked) gets zeros.  */
MHADEF mha_status mha_sdpa_weights_rows(int B, int H, int Lq, int Lk, int D,
                                        const float *q, const float *k, const float *lse,
                                        int n_rows, const int *rows, const mha_options *opt,
                                        float *weights);

/* Merge attention results computed over disjoint sets of keys (flash-
   decoding's split-K, xformers' merge_attentions).  Part p gives out_p
   [rows, Dv] and lse_p [rows] (opt.lse of its call); the result over the
   union of the keys is
       lse = log sum_p exp(lse_p),     out = sum_p exp(lse_p - lse) out_p
   For mha_sdpa outputs rows = B*H*Lq.  A row whose parts all have lse = -inf
   (no key anywhere) gets zeros and -inf.  Sinks belong to one part only.
   out may be outs[0] and lse any of lses[] (in place).  The parts are summed in order
   p = 0, 1, ..., so a fixed split gives a fixed result.  */
MHADEF mha_status mha_attn_merge(int nparts, size_t rows, int Dv, const float *const *outs,
                                 const float *const *lses, float *out, float *lse);

/* ---------------------------------------------------------------- RoPE */

/* Rotary position embedding (Su et al.).  The first R = rotary_dim features
   of each head form R/2 pairs (a_m, b_m); pair m of a token at position p
   turns by the angle p * theta^(-2m/R):
       a' = a cos - b sin,    b' = b cos + a sin
   The pairs are (x[m], x[m + R/2]) for MHA_ROPE_HALF (rotate_half: GPT-NeoX,
   llama) and (x[2m], x[2m+1]) for MHA_ROPE_INTERLEAVED (GPT-J, RoFormer).
   Features past R pass unchanged.  Angles are computed in double.  */
typedef enum mha_rope_kind {
    MHA_ROPE_NONE = 0,       /* no rotation (the zero default) */
    MHA_ROPE_HALF,
    MHA_ROPE_INTERLEAVED
} mha_rope_kind;

typedef struct mha_rope {
    mha_rope_kind kind;      /* outside the enum: MHA_ERR_BAD_ENUM */
    int   rotary_dim;        /* R: 0 = D; must be even and <= D (else MHA_ERR_INVALID_ARGUMENT) */
    float theta;             /* base: 0 = 10000; negative or not finite: invalid */
} mha_rope;

/* x [B, H, L, D] (the mha_sdpa layout) rotated in place: token l of batch b
   sits at position pos0 + l, or positions[b*L + l] when positions is not
   NULL (ragged batches); positions must be >= 0.  The backward turns dx
   by the opposite angles (the rotation's transpose), in place.  */
MHADEF mha_status mha_rope_forward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                   const int *positions, float *x);
MHADEF mha_status mha_rope_backward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                    const int *positions, float *dx);

/* ---------------------------------------------------------------- KV cache */

/* A caller-owned cache of projected keys and values (after RoPE), for
   decoding.  Layout, plain memory that another engine can fill:
       k, v   [B, Hkv, capacity, D]:  token t of batch row b, KV head g at
              k[((b * Hkv + g) * capacity + t) * D]
       len    [B]: the tokens row b holds, 0..capacity (rows may differ: ragged)
   One batch row is itself a cache of B = 1 at k + b*Hkv*capacity*D, len + b.
   Appending past capacity returns MHA_ERR_CAPACITY and writes nothing.
   Rolling buffer (ring = 1, for sliding-window models; StreamingLLM with
   n_keep > 0): len[b] counts every token appended (the next position), and
   token t lives in slot t for t < n_keep, else in slot
   n_keep + (t - n_keep) % (capacity - n_keep); a full row overwrites its
   oldest tokens after the first n_keep.  Attention sees the tokens held
   (the first n_keep and the last capacity - n_keep), masked by their true
   positions.  A chunk that wraps and is longer than capacity - n_keep is
   MHA_ERR_CAPACITY.  Prefill chunks that wrap hide from their first queries
   the tokens the chunk overwrote: size the ring as window + chunk.
   Zero the struct before filling it (ring and n_keep: 0 = off).  */
typedef struct mha_kv_cache {
    int B, Hkv, D, capacity;
    float *k, *v;
    int *len;
    int ring;          /* nonzero: rolling buffer */
    int n_keep;        /* ring: tokens 0..n_keep-1 are never overwritten; 0 <= n_keep < capacity */
} mha_kv_cache;

/* Append n tokens to every row: k_new, v_new [B, Hkv, n, D] (mha_sdpa layout,
   RoPE already applied), written at slots len[b]..len[b]+n-1; len += n.  */
MHADEF mha_status mha_kv_cache_append(mha_kv_cache *c, int n, const float *k_new, const float *v_new);

/* Attention of q [B, H, Lq, D], the newest Lq tokens of each row (appended
   already), against the cache: row b sees its len[b] keys with bottom-right
   alignment, query i at position len[b] - Lq + i, whatever opt->causal_align
   says.  opt as for mha_sdpa (causal, window, softcap, ALiBi, sinks, lse,
   scale, threads); H % Hkv == 0 (opt->num_kv_heads is ignored: the cache's
   Hkv counts); masks are not accepted here (MHA_ERR_INVALID_ARGUMENT).
   out [B, H, Lq, D].  workspace: the size query's bytes, or NULL.  */
MHADEF mha_status mha_kv_cache_attend_workspace_size(const mha_kv_cache *c, int H, int Lq,
                                                     const mha_options *opt, size_t *bytes);
MHADEF mha_status mha_kv_cache_attend(const mha_kv_cache *c, int H, int Lq, const float *q,
                                      const mha_options *opt, float *out,
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
    const void  *packed;           /* NULL, or a buffer filled by mha_module_pack */
    int num_kv_heads;              /* GQA/MQA: Hkv, 0 = H; H % Hkv == 0.  The K and V projections
                                      then have Ekv = Hkv*D rows: k_proj_weight [Ekv, kdim],
                                      v_proj_weight [Ekv, vdim], or in_proj_weight [E + 2Ekv, E]
                                      (rows Wq, Wk, Wv) with in_proj_bias [E + 2Ekv], and
                                      bias_k, bias_v [Ekv].  Query head h reads KV head
                                      h / (H / Hkv).  Not with m.packed. */
    mha_rope rope;                 /* RoPE on Q and K after their projections (kind 0 = none);
                                      positions from mha_options.position_offset */
} mha_module;

/* query [B,Lq,E], key [B,Lk,kdim], value [B,Lk,vdim]  ->  out [B,Lq,E].
   attn_weights: NULL, or [B,Lq,Lk'] (head average) / [B,H,Lq,Lk'] (per head),
   where Lk' = Lk + (bias_k != NULL) + add_zero_attn, as PyTorch returns them.
   Masks are given for the Lk real keys; the appended keys are never masked
   (PyTorch pads the masks with zeros the same way).
   out may be the same buffer as query, key and/or value (in place), with the
   same result; on the long-sequence path (head by head) an input that
   overlaps out is then copied through MHA_MALLOC (docs/api.md, Aliasing).  */
MHADEF mha_status mha_forward_workspace_size(const mha_module *m, int B, int Lq, int Lk,
                                             const mha_options *opt, int need_weights,
                                             size_t *bytes);
MHADEF mha_status mha_forward(const mha_module *m, int B, int Lq, int Lk,
                              const float *query, const float *key, const float *value,
                              const mha_options *opt, float *out, float *attn_weights,
                              void *workspace, size_t workspace_bytes);

/* One decoding step of a self-attention module with its KV cache (B = c->B
   rows): x [B, Lq, E] holds the next Lq tokens of every row.  Their keys and
   values are projected (Hkv heads), turned by m->rope at positions
   opt->position_offset + len[b] + i, appended to the cache, and the queries
   (same positions) attend to the whole cache through mha_kv_cache_attend
   (bottom-right alignment; set opt->causal for a prefill chunk, Lq > 1).
   out [B, Lq, E].  Decode is Lq = 1.  The cache needs Hkv = the module's KV
   heads and D = E / H; kdim = vdim = E; no bias_k / add_zero_attn; m->packed
   is not read.  A row without room for Lq more tokens: MHA_ERR_CAPACITY,
   and nothing is written, neither cache nor out.  */
MHADEF mha_status mha_forward_cached_workspace_size(const mha_module *m, const mha_kv_cache *c, int Lq,
                                                    const mha_options *opt, size_t *bytes);
MHADEF mha_status mha_forward_cached(const mha_module *m, mha_kv_cache *c, int Lq, const float *x,
                                     const mha_options *opt, float *out,
                                     void *workspace, size_t workspace_bytes);

/* mha_sdpa_weights_rows for the module: the exact per-head weights of the
   chosen query rows, [B, H, n_rows, Lk'] (Lk' with the appended keys), from
   the lse [B, H, Lq] of an mha_forward with the same inputs and options
   (opt.lse or row_stats.lse).  K is projected for every key, Q for the
   chosen rows only (RoPE at their positions): the workspace,
   mha_weights_rows_workspace_size() bytes or NULL, grows with Lk*E, never
   with Lq*Lk.  Statuses as mha_sdpa_weights_rows, nothing written on error. */
MHADEF mha_status mha_weights_rows_workspace_size(const mha_module *m, int B, int Lq, int Lk, int n_rows,
                                                  const mha_options *opt, size_t *bytes);
MHADEF mha_status mha_weights_rows(const mha_module *m, int B, int Lq, int Lk,
                                   const float *query, const float *key, const float *lse,
                                   int n_rows, const int *rows, const mha_options *opt,
                                   float *weights, void *workspace, size_t workspace_bytes);

/* Prepacked weights (optional).  mha_forward multiplies by Wq, Wk, Wv and Wo
   through the GEMM's packed panels; normally it packs them on every call
   (at E = 512 about 9% of a forward at L = 128, 1-2% at 1024 query rows and
   more; see docs/performance.md).  mha_module_pack stores them once, in
   the panel order of this build's micro-kernel, into the caller's buffer of
   mha_module_pack_size bytes (any address aligned for float; malloc is fine).
   Set m->packed = buf, and mha_forward reads the panels instead of packing:
   the results are bit-identical to the unpacked call.
   The buffer starts with a header (format version, E, H, kdim, vdim, weight
   layout, and the kernel's NR, KC and NC), checked by every mha_forward:
   a buffer packed for another module shape, layout, or by a build with other
   kernels, or for the weights of another module, is MHA_ERR_PACK_MISMATCH;
   a buffer whose weights changed since (a sample of their values is kept)
   is MHA_ERR_STALE: pack again.  The weight pointers stay required: the
   backward's weight products and the long-sequence (head by head) forward
   read them.  Superseded by plans: mha_module_plan with MHA_PLAN_PACK owns
   its pack, checked once when made.  */
MHADEF mha_status mha_module_pack_size(const mha_module *m, size_t *bytes);
MHADEF mha_status mha_module_pack(const mha_module *m, void *buf, size_t bytes);

/* ======================================================================
   TRAINING: backward passes, a Transformer encoder layer, and the small
   pieces a training loop needs (embedding, positional encoding,
   cross-entropy, SGD, AdamW, a seeded RNG).  See docs/theory.md for the
   formulas and docs/training.md for a worked example.

   Every *_backward call ADDS its gradients into the buffers it is given,
   the way PyTorch accumulates .grad: zero them before the first call of a
   step.  A NULL gradient pointer means "not needed" (its work is skipped
   where that is possible).  Backward calls take the same inputs as the
   forward call.  The one-shot backward calls recompute the forward, so no
   activations have to be kept between the two; the runs of a training plan
   use the saved forward that the plan's forward run left in the same
   workspace (see PLANS).  The attention's backward is fused
   (FlashAttention-2: P recomputed tile by tile from each row's
   log-sum-exp), so nothing of size L*L is stored.  The backward runs on
   the plan's (or OpenMP's) threads: the projections through the threaded
   GEMM, the attention over (batch, KV head) pairs; the gradients do not
   depend on the thread count.
   As in the forward, a NaN or Inf inside a blocked key or value does not
   reach any gradient.
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
    mha_module     self_attn;        /* embed_dim = d_model, num_heads = nhead; kdim and vdim
                                        0 or d_model (x is the key and value: anything else
                                        is MHA_ERR_INVALID_ARGUMENT) */
    int            dim_feedforward;  /* F */
    mha_activation activation;
    int            norm_first;
    float          layer_norm_eps;   /* 0 = 1e-5 */
    const float *linear1_weight, *linear1_bias;   /* [F, E], [F] (bias may be NULL) */
    const float *linear2_weight, *linear2_bias;   /* [E, F], [E] */
    const float *norm1_weight, *norm1_bias;       /* [E], [E] */
    const float *norm2_weight, *norm2_bias;       /* [E], [E] */
} mha_encoder_layer;

/* nn.TransformerEncoderLayer's defaults for what is not a weight:
   dim_feedforward 2048, ReLU, post-norm, layer_norm_eps 1e-5.  (A zero
   layer_norm_eps also means 1e-5: an eps of 0 divides a constant row by 0.) */
MHADEF mha_encoder_layer mha_encoder_layer_defaults(void);

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
   correct (may be NULL) receives how many counted rows have argmax == target.
   With every target ignored (N = 0) the loss is 0 and dlogits all zero, so
   such a batch changes nothing; PyTorch's mean returns NaN there.  */
MHADEF mha_status mha_cross_entropy(int n, int V, const float *logits, const int *targets,
                                    float *loss, float *dlogits, int *correct);

/* Plain SGD (torch.optim.SGD without momentum): p -= lr * (g + weight_decay * p).
   lr and weight_decay must be finite and >= 0: else MHA_ERR_INVALID_ARGUMENT,
   p untouched.  */
MHADEF mha_status mha_sgd_step(size_t n, float *p, const float *g, float lr, float weight_decay);

/* AdamW (torch.optim.AdamW).  Every field means exactly its value, zero
   included (beta1 = 0 or weight_decay = 0 is what it says): start from
   mha_adamw_defaults(), PyTorch's lr 1e-3, betas (0.9, 0.999), eps 1e-8,
   weight_decay 0.01, and change what differs:
       mha_adamw opt = mha_adamw_defaults();  opt.lr = 3e-3f;
   Every field must be finite, with lr, eps, weight_decay >= 0 and beta1,
   beta2 in [0, 1): else MHA_ERR_INVALID_ARGUMENT and nothing is written.
   step is the 1-based step count (for bias correction); m and v are the
   caller's moment buffers of n floats, zero before the first step.  */
typedef struct mha_adamw {
    float lr, beta1, beta2, eps, weight_decay;
} mha_adamw;
MHADEF mha_adamw  mha_adamw_defaults(void);
MHADEF mha_status mha_adamw_step(const mha_adamw *opt, long step, size_t n, float *p,
                                 const float *g, float *m, float *v);

/* A small seeded generator (xorshift64*): same stream on every platform. */
typedef struct mha_rng { unsigned long long state; } mha_rng;
MHADEF void     mha_rng_seed(mha_rng *r, unsigned long long seed);
MHADEF unsigned mha_rng_u32(mha_rng *r);
MHADEF float    mha_rng_uniform(mha_rng *r);                  /* [0, 1) */
MHADEF void     mha_rng_fill(mha_rng *r, float *x, size_t n, float a);  /* U(-a, a) */


/* ======================================================================
   PLANS: state fixed once, then run (FFTW, cuDNN and miniaudio style).
   A plan is made once from the shapes (B and the largest Lq, Lk), the
   options (mask kinds and shapes, causal, scale), the thread count
   (opt->num_threads; 0 = OpenMP's default, read now and fixed) and flags;
   making it validates everything, resolves (and with MHA_PLAN_PACK packs)
   the weights and computes the exact workspace.  A run takes tensors and a
   workspace of mha_plan_workspace_size() bytes and nothing else:
     - any Lq <= planned Lq and Lk <= planned Lk (more: MHA_ERR_EXCEEDS_PLAN),
       with the masks' data for those lengths ([Lq, Lk] / [B, Lk] dense);
       a NULL mask pointer means the one in the options the plan was made with;
     - exactly the plan's threads; results are bit-identical for any count,
       and equal, bit for bit, to the one-shot call of the same lengths
       (a module plan whose maxima chose the head-by-head path keeps it for
       shorter runs: see docs/api.md);
     - a run never writes the plan: one plan may run from many threads at
       once, each with its own workspace.
   Saved forward (MHA_PLAN_TRAINING): a forward run given a workspace leaves
   there what the backward needs (SDPA: each row's log-sum-exp and O;
   module: Q, K, V after RoPE, the context, the lse; encoder: those and the
   layer's activations), stamped with a key of the plan, the lengths, the
   input and mask pointers and contents, sinks, ALiBi slopes, a sample of
   the weights, and a check sum of the saved data.  A backward run of the
   same plan on the same workspace uses it when the key of its own
   arguments matches, so it skips the forward's recomputation (its results
   then agree with the one-shot backward to float32 rounding, not to the
   bit); otherwise it recomputes the forward and equals the one-shot
   backward bit for bit.  Either way the status is MHA_OK.  Change no input
   or weight between the two (an optimizer step goes after the backward),
   and run nothing else in the workspace in between.  The module's
   head-by-head path (very long sequences) saves nothing.
   Memory: *_plan_size gives the bytes; pass mem (8-byte aligned, that many
   bytes) to build the plan there, or mem = NULL to have it allocated with
   MHA_MALLOC.  mha_plan_destroy frees an allocated plan (and does nothing to
   one in caller memory).  A plan borrows the weight and mask pointers it was
   made with: keep them alive while it is used.  The workspace of a run may
   be NULL: it is then allocated and freed by the run.
   The one-shot calls above (mha_gemm, mha_sdpa, mha_forward, ...) are thin
   wrappers: a plan on the stack, one run.
   ====================================================================== */
typedef struct mha_plan mha_plan;

#define MHA_PLAN_WEIGHTS  1u  /* runs may ask for the attention weights */
#define MHA_PLAN_TRAINING 2u  /* the backward runs too (the workspace covers both); the forward
                                 run saves what the backward needs in the workspace */
#define MHA_PLAN_PACK     4u  /* module/encoder: pack Wq, Wk, Wv, Wo into the plan's memory;
                                 a run whose weights changed since is MHA_ERR_STALE */

MHADEF mha_status mha_gemm_plan_size(mha_trans ta, mha_trans tb, int M, int N, int K,
                                     int num_threads, size_t *plan_bytes);
MHADEF mha_status mha_gemm_plan(mha_trans ta, mha_trans tb, int M, int N, int K, int num_threads,
                                void *mem, size_t mem_bytes, mha_plan **plan);
MHADEF mha_status mha_gemm_run(const mha_plan *plan, float alpha, const float *A, int lda,
                               const float *B, int ldb, float beta, float *C, int ldc,
                               void *workspace, size_t workspace_bytes);

MHADEF mha_status mha_sdpa_plan_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                     const mha_options *opt, unsigned flags, size_t *plan_bytes);
MHADEF mha_status mha_sdpa_plan(int B, int H, int Lq, int Lk, int D, int Dv,
                                const mha_options *opt, unsigned flags,
                                void *mem, size_t mem_bytes, mha_plan **plan);
MHADEF mha_status mha_sdpa_run(const mha_plan *plan, int Lq, int Lk,
                               const float *q, const float *k, const float *v,
                               const void *attn_mask, const void *key_padding_mask,
                               float *out, float *attn_weights, void *workspace, size_t workspace_bytes);
MHADEF mha_status mha_sdpa_run_backward(const mha_plan *plan, int Lq, int Lk,
                                        const float *q, const float *k, const float *v,
                                        const float *dout, const void *attn_mask,
                                        const void *key_padding_mask, float *dq, float *dk, float *dv,
                                        void *workspace, size_t workspace_bytes);

MHADEF mha_status mha_module_plan_size(const mha_module *m, int B, int Lq, int Lk,
                                       const mha_options *opt, unsigned flags, size_t *plan_bytes);
MHADEF mha_status mha_module_plan(const mha_module *m, int B, int Lq, int Lk,
                                  const mha_options *opt, unsigned flags,
                                  void *mem, size_t mem_bytes, mha_plan **plan);
MHADEF mha_status mha_module_forward(const mha_plan *plan, int Lq, int Lk,
                                     const float *query, const float *key, const float *value,
                                     const void *attn_mask, const void *key_padding_mask,
                                     float *out, float *attn_weights,
                                     void *workspace, size_t workspace_bytes);
MHADEF mha_status mha_module_backward(const mha_plan *plan, int Lq, int Lk,
                                      const float *query, const float *key, const float *value,
                                      const float *dout, const void *attn_mask,
                                      const void *key_padding_mask, float *dquery, float *dkey,
                                      float *dvalue, mha_module_grad *grad,
                                      void *workspace, size_t workspace_bytes);

/* Without MHA_PLAN_TRAINING an encoder plan sizes for inference only: the
   feed-forward block runs a few rows at a time, so its workspace grows with
   L*E (never L*F or L^2).  x and y must not overlap. */
MHADEF mha_status mha_encoder_plan_size(const mha_encoder_layer *layer, int B, int L,
                                        const mha_options *opt, unsigned flags, size_t *plan_bytes);
MHADEF mha_status mha_encoder_plan(const mha_encoder_layer *layer, int B, int L,
                                   const mha_options *opt, unsigned flags,
                                   void *mem, size_t mem_bytes, mha_plan **plan);
MHADEF mha_status mha_encoder_run(const mha_plan *plan, int L, const float *x,
                                  const void *attn_mask, const void *key_padding_mask,
                                  float *y, float *attn_weights, void *workspace, size_t workspace_bytes);
MHADEF mha_status mha_encoder_run_backward(const mha_plan *plan, int L, const float *x, const float *dy,
                                           const void *attn_mask, const void *key_padding_mask,
                                           float *dx, mha_encoder_layer_grad *grad,
                                           void *workspace, size_t workspace_bytes);

/* Bytes of workspace every run of the plan needs (0 for a NULL plan). */
MHADEF size_t mha_plan_workspace_size(const mha_plan *plan);
MHADEF void   mha_plan_destroy(mha_plan *plan);

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
/* The phases of the fused attention core that MHA_PROFILE_MARK names: a
   profiler adds the time since the last mark to the phase it left. */
#define MHA_PHASE_OTHER   0   /* outside the core: projections, threads, ... */
#define MHA_PHASE_QPACK   1   /* Q^T slivers of a query tile, O^T = 0 */
#define MHA_PHASE_VPACK   2   /* V tiles packed once per (b, KV head) */
#define MHA_PHASE_SCORES  3   /* S^T = scale K Q^T (micro-kernel), soft-cap */
#define MHA_PHASE_MASK    4   /* masks, ALiBi, causal/window edges */
#define MHA_PHASE_SOFTMAX 5   /* online softmax: max, exp, sum, rescale O^T */
#define MHA_PHASE_PV      6   /* O^T += V^T P^T (micro-kernel) */
#define MHA_PHASE_OUT     7   /* o = O / l, lse */
#ifndef MHA_PROFILE_MARK
#define MHA_PROFILE_MARK(phase) ((void)0)
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

/* the scalar references stay compiled even where a faster version is used;
   MHA__NOINLINE keeps a rarely taken branch's body out of a hot function */
#if defined(__GNUC__) || defined(__clang__)
#define MHA__UNUSED __attribute__((unused))
#define MHA__NOINLINE __attribute__((noinline))
#else
#define MHA__UNUSED
#define MHA__NOINLINE
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

/* Int audit.  Sizes arrive as int; every tensor and workspace size is
   computed in size_t above (MHA_ERR_OVERFLOW when it does not fit).  The
   int values the code forms from them, and why each fits:
   - every dimension (B, H, L*, E, kdim, vdim, D, Dv, F, GEMM M/N/K, Linear
     rows/in/out) is at most MHA__INT_LIMIT, checked by each entry, so a
     dimension plus a block size (MC, NC, KC, query chunks: all < 2^16) or
     plus another dimension cannot overflow in the blocked loops;
   - B*H, the (batch, head) count of SDPA's work items: checked against
     MHA__INT_LIMIT (it overflowed at B = 65536, H = 32768 and the call
     returned OK having done nothing);
   - B*Lq and B*Lk' (B*L in the encoder), the rows of the module's
     projection GEMMs: checked against MHA__INT_LIMIT by the module's plans
     (mha_forward_cached's too), which the encoder runs before it forms
     N = B*L;
   - the KV cache: capacity and D are dimensions (checked with the cache),
     an attention over it runs one batch row at a time (H heads, nb = 1);
   - the module's fused (batch, head) count nb*H: the fused module path
     runs only below MHA__BY_HEAD_FLOATS = B (Lq + 2 Lk') E, so it is under
     2^23; the by-head path has one head at a time;
   - work-item counts B*ceil(Lq/rows) and B*H*ceil(Lq/tile) are long:
     both are at most B*H*Lq, checked against LONG_MAX (32-bit long);
   - everything else that is multiplied (offsets, strides, mask rows, the
     GEMM's split and the by-head threshold) is size_t, ptrdiff_t or double. */
#define MHA__INT_LIMIT (INT_MAX / 2)
static int mha__dim_ok(int n) { return n <= MHA__INT_LIMIT; }

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

/* The first 64-byte boundary at or after ws.  A caller's workspace may start
   at any byte address: every size adds MHA__ALIGN_FLOATS floats (64 bytes)
   of slack, and the step is counted in bytes, so at most 63 are skipped. */
static float *mha__align_ws(void *ws)
{
    const size_t line = MHA__ALIGN_FLOATS * sizeof(float);
    size_t skip = (line - (size_t)((uintptr_t)ws % line)) % line;
    return MHA__CAST(float *, (void *)(MHA__CAST(unsigned char *, ws) + skip));
}
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
static MHA__UNUSED void mha__axpy_ref(float *y, float alpha, const float *x, int n)
{
    int i;
    for (i = 0; i < n; ++i) y[i] += alpha * x[i];
}

/* C = alpha op(A) op(B) + beta C, straight from the definition. */
static MHA__UNUSED void mha__gemm_ref(int ta, int tb, int M, int N, int K, float alpha,
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
static MHA__UNUSED int mha__softmax_row_ref(float *s, int n)
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
   One thin vector type so each kernel is written once (the ggml idea).
   mha__vf holds MHA__VW floats:  AVX-512 16 lanes, AVX2+FMA 8 lanes,
   NEON 4 lanes, scalar 1.
   Loads and stores are unaligned.  mha__vfma(acc, a, b) = acc + a*b.
   mha__vm is a lane mask from a comparison, used only by mha__vsel.
   mha__vtranspose(r) transposes the MHA__VW x MHA__VW block held in r[].
   The choice is made once, here, at compile time; MHA_NO_SIMD wins.
   ===================================================================== */

#if !defined(MHA_NO_SIMD) && !defined(MHA_NO_AVX512) && defined(__AVX512F__)
#define MHA__SIMD_AVX512 1
#elif !defined(MHA_NO_SIMD) && defined(__AVX2__) && defined(__FMA__)
#define MHA__SIMD_AVX2 1
#elif !defined(MHA_NO_SIMD) && defined(__ARM_NEON) && defined(__aarch64__)
#define MHA__SIMD_NEON 1
#else
#define MHA__SIMD_SCALAR 1
#endif

#if defined(MHA__SIMD_AVX512)
/* 16 lanes; chosen over AVX2 where the compiler enables AVX-512F
   (-march=native on a core with it), since cores with two 512-bit FMA
   pipes do twice the work per instruction.  MHA_NO_AVX512 opts out.  */
#include <immintrin.h>
#define MHA__SIMD_NAME "avx512"
#define MHA__VW 16
typedef __m512 mha__vf;
typedef __mmask16 mha__vm;
static inline mha__vf mha__vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void mha__vstore(float *p, mha__vf v) { _mm512_storeu_ps(p, v); }
static inline mha__vf mha__vset1(float x) { return _mm512_set1_ps(x); }
static inline mha__vf mha__vzero(void) { return _mm512_setzero_ps(); }
static inline mha__vf mha__vadd(mha__vf a, mha__vf b) { return _mm512_add_ps(a, b); }
static inline mha__vf mha__vsub(mha__vf a, mha__vf b) { return _mm512_sub_ps(a, b); }
static inline mha__vf mha__vmul(mha__vf a, mha__vf b) { return _mm512_mul_ps(a, b); }
/* GCC 12's unmasked forms of several intrinsics below pass an undefined
   vector (`__m512 __Y = __Y`) as the merge source, which -Wmaybe-uninitialized
   reports once inlined into C++ -O2 code; the zero-masking forms with every
   lane selected are the same instruction with a defined source. */
#define MHA__ALL16 ((__mmask16)0xFFFF)
static inline mha__vf mha__vdiv(mha__vf a, mha__vf b) { return _mm512_div_ps(a, b); }
static inline mha__vf mha__vmax(mha__vf a, mha__vf b) { return _mm512_maskz_max_ps(MHA__ALL16, a, b); }
static inline mha__vf mha__vmin(mha__vf a, mha__vf b) { return _mm512_maskz_min_ps(MHA__ALL16, a, b); }
static inline mha__vf mha__vfma(mha__vf acc, mha__vf a, mha__vf b) { return _mm512_fmadd_ps(a, b, acc); }
/* the halves 256, 128, 64, 32 bits wide added in turn (_mm512_reduce_add_ps's order) */
static inline __m128 mha__vhalves(mha__vf v, int is_max)
{
    __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd((__mmask8)0xFF, _mm512_castps_pd(v), 1));
    __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd((__mmask8)0xFF, _mm512_castps_pd(v), 0));
    __m256 s8 = is_max ? _mm256_max_ps(hi, lo) : _mm256_add_ps(hi, lo);
    __m128 h4 = _mm256_extractf128_ps(s8, 1), l4 = _mm256_castps256_ps128(s8);
    __m128 s4 = is_max ? _mm_max_ps(h4, l4) : _mm_add_ps(h4, l4);
    __m128 sw = _mm_shuffle_ps(s4, s4, 0x4E);   /* lanes 2, 3, 0, 1 */
    return is_max ? _mm_max_ps(s4, sw) : _mm_add_ps(s4, sw);
}
static inline float mha__vhsum(mha__vf v)
{
    __m128 s = mha__vhalves(v, 0);
    return _mm_cvtss_f32(s) + _mm_cvtss_f32(_mm_shuffle_ps(s, s, 0x55));
}
static inline float mha__vhmax(mha__vf v)
{
    __m128 s = mha__vhalves(v, 1);
    float a = _mm_cvtss_f32(s), b = _mm_cvtss_f32(_mm_shuffle_ps(s, s, 0x55));
    return a > b ? a : b;
}
static inline mha__vf mha__vround(mha__vf v)
{
    return _mm512_maskz_roundscale_ps(MHA__ALL16, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline mha__vf mha__vpow2i(mha__vf n)
{
    __m512i e = _mm512_add_epi32(_mm512_maskz_cvtps_epi32(MHA__ALL16, n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(MHA__ALL16, e, 23));
}
static inline mha__vm mha__vlt(mha__vf a, mha__vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline mha__vm mha__vgt(mha__vf a, mha__vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline mha__vm mha__visnan(mha__vf a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
static inline mha__vf mha__vsel(mha__vm m, mha__vf a, mha__vf b) { return _mm512_mask_blend_ps(m, b, a); }
/* r[0..15] := its transpose (r[i] lane j becomes r[j] lane i): 4x4
   transposes inside each 128-bit lane, then a 4x4 transpose of the lanes */
static inline void mha__vtranspose(mha__vf *r)
{
    __m512 t[16], u[16];
    int g, c;
    for (g = 0; g < 4; ++g) {
        __m512 a0 = _mm512_maskz_unpacklo_ps(MHA__ALL16, r[4 * g], r[4 * g + 1]);
        __m512 a1 = _mm512_maskz_unpackhi_ps(MHA__ALL16, r[4 * g], r[4 * g + 1]);
        __m512 a2 = _mm512_maskz_unpacklo_ps(MHA__ALL16, r[4 * g + 2], r[4 * g + 3]);
        __m512 a3 = _mm512_maskz_unpackhi_ps(MHA__ALL16, r[4 * g + 2], r[4 * g + 3]);
        t[4 * g + 0] = _mm512_shuffle_ps(a0, a2, 0x44);   /* column 4L+0 of rows 4g.. */
        t[4 * g + 1] = _mm512_shuffle_ps(a0, a2, 0xEE);
        t[4 * g + 2] = _mm512_shuffle_ps(a1, a3, 0x44);
        t[4 * g + 3] = _mm512_shuffle_ps(a1, a3, 0xEE);
    }
    for (c = 0; c < 4; ++c) {   /* output rows 4L+c gather lane L of t[4g+c], g = 0..3 */
        u[0] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, t[c], t[4 + c], 0x44);
        u[1] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, t[c], t[4 + c], 0xEE);
        u[2] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, t[8 + c], t[12 + c], 0x44);
        u[3] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, t[8 + c], t[12 + c], 0xEE);
        r[0 + c] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, u[0], u[2], 0x88);
        r[4 + c] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, u[0], u[2], 0xDD);
        r[8 + c] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, u[1], u[3], 0x88);
        r[12 + c] = _mm512_maskz_shuffle_f32x4(MHA__ALL16, u[1], u[3], 0xDD);
    }
}

#elif defined(MHA__SIMD_AVX2)
#include <immintrin.h>
#define MHA__SIMD_NAME "avx2"
#define MHA__VW 8
typedef __m256 mha__vf;
typedef __m256 mha__vm;
static inline mha__vf mha__vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void mha__vstore(float *p, mha__vf v) { _mm256_storeu_ps(p, v); }
static inline mha__vf mha__vset1(float x) { return _mm256_set1_ps(x); }
static inline mha__vf mha__vzero(void) { return _mm256_setzero_ps(); }
static inline mha__vf mha__vadd(mha__vf a, mha__vf b) { return _mm256_add_ps(a, b); }
static inline mha__vf mha__vsub(mha__vf a, mha__vf b) { return _mm256_sub_ps(a, b); }
static inline mha__vf mha__vmul(mha__vf a, mha__vf b) { return _mm256_mul_ps(a, b); }
static inline mha__vf mha__vdiv(mha__vf a, mha__vf b) { return _mm256_div_ps(a, b); }
static inline mha__vf mha__vmax(mha__vf a, mha__vf b) { return _mm256_max_ps(a, b); }
static inline mha__vf mha__vmin(mha__vf a, mha__vf b) { return _mm256_min_ps(a, b); }
static inline mha__vf mha__vfma(mha__vf acc, mha__vf a, mha__vf b) { return _mm256_fmadd_ps(a, b, acc); }
static inline float mha__vhsum(mha__vf v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float mha__vhmax(mha__vf v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* round to nearest integer (ties to even) */
static inline mha__vf mha__vround(mha__vf v)
{
    return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* 2^n for integer-valued n in [-126, 127]: n + 127 is the biased exponent */
static inline mha__vf mha__vpow2i(mha__vf n)
{
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline mha__vm mha__vlt(mha__vf a, mha__vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline mha__vm mha__vgt(mha__vf a, mha__vf b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
static inline mha__vm mha__visnan(mha__vf a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
/* m ? a : b, lane by lane */
static inline mha__vf mha__vsel(mha__vm m, mha__vf a, mha__vf b) { return _mm256_blendv_ps(b, a, m); }
/* r[0..7] := its transpose: 4x4 transposes in each 128-bit half, then swap halves */
static inline void mha__vtranspose(mha__vf *r)
{
    __m256 t[8];
    int g;
    for (g = 0; g < 2; ++g) {
        __m256 a0 = _mm256_unpacklo_ps(r[4 * g], r[4 * g + 1]), a1 = _mm256_unpackhi_ps(r[4 * g], r[4 * g + 1]);
        __m256 a2 = _mm256_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]), a3 = _mm256_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
        t[4 * g + 0] = _mm256_shuffle_ps(a0, a2, 0x44);
        t[4 * g + 1] = _mm256_shuffle_ps(a0, a2, 0xEE);
        t[4 * g + 2] = _mm256_shuffle_ps(a1, a3, 0x44);
        t[4 * g + 3] = _mm256_shuffle_ps(a1, a3, 0xEE);
    }
    for (g = 0; g < 4; ++g) {
        r[g] = _mm256_permute2f128_ps(t[g], t[4 + g], 0x20);
        r[4 + g] = _mm256_permute2f128_ps(t[g], t[4 + g], 0x31);
    }
}

#elif defined(MHA__SIMD_NEON)
#include <arm_neon.h>
#define MHA__SIMD_NAME "neon"
#define MHA__VW 4
typedef float32x4_t mha__vf;
typedef uint32x4_t mha__vm;
static inline mha__vf mha__vload(const float *p) { return vld1q_f32(p); }
static inline void mha__vstore(float *p, mha__vf v) { vst1q_f32(p, v); }
static inline mha__vf mha__vset1(float x) { return vdupq_n_f32(x); }
static inline mha__vf mha__vzero(void) { return vdupq_n_f32(0.0f); }
static inline mha__vf mha__vadd(mha__vf a, mha__vf b) { return vaddq_f32(a, b); }
static inline mha__vf mha__vsub(mha__vf a, mha__vf b) { return vsubq_f32(a, b); }
static inline mha__vf mha__vmul(mha__vf a, mha__vf b) { return vmulq_f32(a, b); }
static inline mha__vf mha__vdiv(mha__vf a, mha__vf b) { return vdivq_f32(a, b); }
static inline mha__vf mha__vmax(mha__vf a, mha__vf b) { return vmaxq_f32(a, b); }
static inline mha__vf mha__vmin(mha__vf a, mha__vf b) { return vminq_f32(a, b); }
static inline mha__vf mha__vfma(mha__vf acc, mha__vf a, mha__vf b) { return vfmaq_f32(acc, a, b); }
static inline float mha__vhsum(mha__vf v) { return vaddvq_f32(v); }
static inline float mha__vhmax(mha__vf v) { return vmaxvq_f32(v); }
static inline mha__vf mha__vround(mha__vf v) { return vrndnq_f32(v); }
static inline mha__vf mha__vpow2i(mha__vf n)
{
    int32x4_t e = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
}
static inline mha__vm mha__vlt(mha__vf a, mha__vf b) { return vcltq_f32(a, b); }
static inline mha__vm mha__vgt(mha__vf a, mha__vf b) { return vcgtq_f32(a, b); }
static inline mha__vm mha__visnan(mha__vf a) { return vmvnq_u32(vceqq_f32(a, a)); }
static inline mha__vf mha__vsel(mha__vm m, mha__vf a, mha__vf b) { return vbslq_f32(m, a, b); }
static inline void mha__vtranspose(mha__vf *r)
{
    float32x4x2_t p01 = vtrnq_f32(r[0], r[1]), p23 = vtrnq_f32(r[2], r[3]);
    r[0] = vcombine_f32(vget_low_f32(p01.val[0]), vget_low_f32(p23.val[0]));
    r[1] = vcombine_f32(vget_low_f32(p01.val[1]), vget_low_f32(p23.val[1]));
    r[2] = vcombine_f32(vget_high_f32(p01.val[0]), vget_high_f32(p23.val[0]));
    r[3] = vcombine_f32(vget_high_f32(p01.val[1]), vget_high_f32(p23.val[1]));
}

#else /* scalar: one lane, plain C */
#define MHA__SIMD_NAME "scalar"
#define MHA__VW 1
typedef float mha__vf;
typedef int mha__vm;
static inline mha__vf mha__vload(const float *p) { return *p; }
static inline void mha__vstore(float *p, mha__vf v) { *p = v; }
static inline mha__vf mha__vset1(float x) { return x; }
static inline mha__vf mha__vzero(void) { return 0.0f; }
static inline mha__vf mha__vadd(mha__vf a, mha__vf b) { return a + b; }
static inline mha__vf mha__vsub(mha__vf a, mha__vf b) { return a - b; }
static inline mha__vf mha__vmul(mha__vf a, mha__vf b) { return a * b; }
static inline mha__vf mha__vdiv(mha__vf a, mha__vf b) { return a / b; }
static inline mha__vf mha__vmax(mha__vf a, mha__vf b) { return a > b ? a : b; }
static inline mha__vf mha__vmin(mha__vf a, mha__vf b) { return a < b ? a : b; }
static inline mha__vf mha__vfma(mha__vf acc, mha__vf a, mha__vf b) { return acc + a * b; }
static inline float mha__vhsum(mha__vf v) { return v; }
static inline float mha__vhmax(mha__vf v) { return v; }
/* |v| < 2^22 here: adding 1.5*2^23 pushes the fraction bits out, rounding to nearest */
static inline mha__vf mha__vround(mha__vf v)
{
    volatile float big = 12582912.0f;   /* volatile: keep the add and subtract */
    return (v + big) - big;
}
static inline mha__vf mha__vpow2i(mha__vf n)
{
    uint32_t bits;
    /* a float-to-int cast of a value outside int (or of NaN) is undefined in C;
       2^-127 encodes as 0 and 2^128 as +inf, so clamping keeps every result */
    if (!(n >= -127.0f)) n = -127.0f;
    if (n > 128.0f) n = 128.0f;
    bits = (uint32_t)((int32_t)n + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline mha__vm mha__vlt(mha__vf a, mha__vf b) { return a < b; }
static inline mha__vm mha__vgt(mha__vf a, mha__vf b) { return a > b; }
static inline mha__vm mha__visnan(mha__vf a) { return a != a; }
static inline mha__vf mha__vsel(mha__vm m, mha__vf a, mha__vf b) { return m ? a : b; }
static inline void mha__vtranspose(mha__vf *r) { (void)r; }   /* 1 x 1 */
#endif

/* exp(x), lane by lane.
       n = round(x / ln 2),  r = x - n ln 2  (|r| <= ln2/2),  exp(x) = 2^n exp(r)
   ln 2 is split in two (C1 has 9 significant bits, so n*C1 is exact and
   x - n*C1 loses nothing); exp(r) is its Taylor series to r^7, whose
   truncation error is below 0.347^8/8! < 6e-9.  2^n is applied as
   2^floor(n/2) * 2^(n - floor(n/2)) so that n = -126 and n = 128 both work.
   ERROR BOUND (tests/test_simd.c checks it on every configuration):
       |vexp(x) - exp(x)| <= 2e-7 * exp(x)  for  MHA__EXP_LO <= x <= MHA__EXP_HI,
   the range where exp(x) is a normal float.  Measured over every float of
   that range (test_simd --exhaustive): 7.9e-8 with FMA (AVX-512, AVX2; NEON
   matches on the sampled test), 1.03e-7 with the separate multiply and add
   of the scalar build; under one ulp either way.
   Below MHA__EXP_LO (the result would be subnormal) the result is exactly 0,
   so exp(-inf) = 0; above MHA__EXP_HI it is +inf; NaN gives NaN.  */
#define MHA__EXP_LO (-87.3365402f)   /* smallest float with exp(x) >= FLT_MIN */
#define MHA__EXP_HI 88.7228317f      /* largest float with exp(x) <= FLT_MAX  */
/* The shared core: for a finite xc, returns exp(r) and sets *n, where
   xc = n ln2 + r.  Both exp variants below are this plus their own 2^n. */
static inline mha__vf mha__vexp_core(mha__vf xc, mha__vf *n_out)
{
    mha__vf n, r, p;
    n = mha__vround(mha__vmul(xc, mha__vset1(1.44269502f)));   /* x * log2(e) */
    r = mha__vfma(xc, n, mha__vset1(-0.693359375f));          /* x - n*C1, exact */
    r = mha__vfma(r, n, mha__vset1(2.12194442e-4f));          /* - n*C2, C1 + C2 = ln 2 */
    p = mha__vset1(1.98412701e-4f);                            /* 1/7! */
    p = mha__vfma(mha__vset1(1.38888892e-3f), p, r);           /* 1/6! */
    p = mha__vfma(mha__vset1(8.33333377e-3f), p, r);           /* 1/5! */
    p = mha__vfma(mha__vset1(4.16666679e-2f), p, r);           /* 1/4! */
    p = mha__vfma(mha__vset1(1.66666672e-1f), p, r);           /* 1/3! */
    p = mha__vfma(mha__vset1(0.5f), p, r);                     /* 1/2! */
    p = mha__vfma(mha__vset1(1.0f), p, r);
    p = mha__vfma(mha__vset1(1.0f), p, r);                     /* 1 + r + r^2/2 + ... */
    *n_out = n;
    return p;
}
static inline mha__vf mha__vexp(mha__vf x)
{
    const mha__vf lo = mha__vset1(MHA__EXP_LO), hi = mha__vset1(MHA__EXP_HI);
    mha__vf n, p, half;
    p = mha__vexp_core(mha__vmax(mha__vmin(x, hi), lo), &n);   /* clamped: arithmetic stays finite */
    half = mha__vround(mha__vmul(n, mha__vset1(0.5f)));
    half = mha__vsel(mha__vgt(half, mha__vmul(n, mha__vset1(0.5f))),
                     mha__vsub(half, mha__vset1(1.0f)), half);  /* floor(n/2) */
    p = mha__vmul(mha__vmul(p, mha__vpow2i(half)), mha__vpow2i(mha__vsub(n, half)));
    p = mha__vsel(mha__vlt(x, lo), mha__vzero(), p);
    p = mha__vsel(mha__vgt(x, hi), mha__vset1(INFINITY), p);
    return mha__vsel(mha__visnan(x), x, p);
}

/* tanh(x), lane by lane, for soft-capping.
       |x| < 0.3:  x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 (next term < 2e-8 relative)
       else:       sign(x) (1 - 2 / (exp(2|x|) + 1))   (|2x| clamped to 40: tanh = 1 there)
   The series avoids the cancellation of 1 - 2/(e+1) near 0; above 0.3 that
   form is within 5e-7 relative of tanh.  NaN gives NaN.  */
static inline mha__vf mha__vtanh(mha__vf x)
{
    mha__vf ax = mha__vmax(x, mha__vsub(mha__vzero(), x)), x2 = mha__vmul(x, x), p, e, t;
    p = mha__vset1(62.0f / 2835.0f);
    p = mha__vfma(mha__vset1(-17.0f / 315.0f), p, x2);
    p = mha__vfma(mha__vset1(2.0f / 15.0f), p, x2);
    p = mha__vfma(mha__vset1(-1.0f / 3.0f), p, x2);
    p = mha__vfma(x, mha__vmul(p, x2), x);                          /* x + x^3 (...) */
    e = mha__vexp(mha__vmin(mha__vadd(ax, ax), mha__vset1(40.0f)));
    t = mha__vsub(mha__vset1(1.0f), mha__vdiv(mha__vset1(2.0f), mha__vadd(e, mha__vset1(1.0f))));
    t = mha__vsel(mha__vlt(x, mha__vzero()), mha__vsub(mha__vzero(), t), t);
    t = mha__vsel(mha__vlt(ax, mha__vset1(0.3f)), p, t);
    return mha__vsel(mha__visnan(x), x, t);
}

/* sum_i a[i] b[i] */
static inline float mha__dot(const float *a, const float *b, int n)
{
    mha__vf acc0 = mha__vzero(), acc1 = mha__vzero();
    float s;
    int i = 0;
    for (; i + 2 * MHA__VW <= n; i += 2 * MHA__VW) {
        acc0 = mha__vfma(acc0, mha__vload(a + i), mha__vload(b + i));
        acc1 = mha__vfma(acc1, mha__vload(a + i + MHA__VW), mha__vload(b + i + MHA__VW));
    }
    for (; i + MHA__VW <= n; i += MHA__VW)
        acc0 = mha__vfma(acc0, mha__vload(a + i), mha__vload(b + i));
    s = mha__vhsum(mha__vadd(acc0, acc1));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* y += alpha * x over n floats (mha__axpy_ref) */
static inline void mha__axpy(float *y, float alpha, const float *x, int n)
{
    const mha__vf va = mha__vset1(alpha);
    int i = 0;
    for (; i + MHA__VW <= n; i += MHA__VW)
        mha__vstore(y + i, mha__vfma(mha__vload(y + i), va, mha__vload(x + i)));
    for (; i < n; ++i) y[i] += alpha * x[i];
}

/* Softmax of one row in place (mha__softmax_row_ref is the definition),
   with a sink logit (-inf: none) that joins the
   denominator and gets no column:
       m = max(max_j s_j, sink),  p_j = exp(s_j - m) / (sum_k exp(s_k - m) + exp(sink - m))
   Returns the log-sum-exp m + log(sum): -inf for a row with no allowed key
   and no sink, which becomes all zeros.  A blocked key is -inf, so
   exp(-inf - m) = 0 gives it weight 0 with no branch.  The last partial
   vector is done in a small buffer padded with -inf, so every element goes
   through the same vexp.  */
static float mha__softmax_row_lse(float *s, int n, float sink)
{
    float tail[MHA__VW], m, inv, sum;
    mha__vf vm = mha__vset1(-INFINITY), vsum = mha__vzero(), vinv;
    int i = 0, t, nt = n % MHA__VW, nv = n - nt;

    /* 1. m = max(max_j s_j, sink)  (-inf: nothing allowed; NaN about: the reference) */
    for (i = 0; i < nv; i += MHA__VW) vm = mha__vmax(vm, mha__vload(s + i));
    m = mha__vhmax(vm);
    for (t = 0; t < nt; ++t) if (s[nv + t] > m) m = s[nv + t];
    if (m == -INFINITY && sink == -INFINITY) return mha__softmax_row_ref(s, n) ? NAN : -INFINITY;
    if (sink > m) m = sink;
    vm = mha__vset1(m);

    /* 2. p_j = exp(s_j - m), sum them */
    for (i = 0; i < nv; i += MHA__VW) {
        mha__vf e = mha__vexp(mha__vsub(mha__vload(s + i), vm));
        mha__vstore(s + i, e);
        vsum = mha__vadd(vsum, e);
    }
    if (nt) {
        mha__vf e;
        for (t = 0; t < MHA__VW; ++t) tail[t] = t < nt ? s[nv + t] : -INFINITY;
        e = mha__vexp(mha__vsub(mha__vload(tail), vm));
        mha__vstore(tail, e);
        vsum = mha__vadd(vsum, e);
    }

    /* 3. p_j /= sum */
    sum = mha__vhsum(vsum) + (sink == -INFINITY ? 0.0f : expf(sink - m));
    inv = 1.0f / sum;
    vinv = mha__vset1(inv);
    for (i = 0; i < nv; i += MHA__VW) mha__vstore(s + i, mha__vmul(mha__vload(s + i), vinv));
    for (t = 0; t < nt; ++t) s[nv + t] = tail[t] * inv;
    return m + logf(sum);
}

/* Softmax of one row in place (mha__softmax_row_ref is the definition), no
   sink.  Returns 1 if some key was allowed.  */
static MHA__UNUSED int mha__softmax_row(float *s, int n)
{
    return mha__softmax_row_lse(s, n, -INFINITY) != -INFINITY;
}

/* =====================================================================
   GEMM
   C = alpha op(A) op(B) + beta C, in the BLIS structure: five loops around
   an MR x NR register micro-kernel (the B panel's columns are walked once
   more in L2-sized chunks, jj, inside the fifth).

     for jc in steps of NC          columns of C and B      (B panel -> L3)
       for pc in steps of KC        the shared dimension    (pack B: KC x NC)
         for ic in steps of MC      rows of C and A         (pack A: MC x KC -> L2)
           for jj in steps of NC2   a chunk of the B panel  (-> L2)
             for ir in steps of MR  one MR-tall sliver of packed A  (-> L1)
               for jr in steps of NR  one NR-wide sliver of the chunk
                 C[ir:+MR, jr:+NR] (=|+=) alpha * sum_p A~[:, p] B~[p, :]

   Packing copies op(A) and op(B) into slivers laid out in the order the
   micro-kernel reads them (A~: MR floats per k, B~: NR floats per k), so
   every transpose costs only a different copy loop and the kernel is one.
   Slivers at the matrix edge are zero-padded; their tile is computed into
   a local MR x NR block and only the valid part is copied out.  A row-major
   A that meets only a few B slivers (P V, 64 columns) is read in place.
   beta is applied with the first KC block (pc = 0) and then 1 is used, so
   it is applied exactly once; beta == 0 writes C without reading it.
   Every C element is summed over k in the same order whatever the thread
   count, so the threaded GEMM gives bit-identical results.
   ===================================================================== */

/* Register tile MR x NR (NR = NRV vectors) and cache blocking per ISA.
   MHA__FOR_I / MHA__FOR_J list the rows and vector columns of the tile so
   the micro-kernel below is spelled out in full, with its accumulators in
   named registers, at any optimisation level. */
#if defined(MHA__SIMD_AVX512)
/* 8 x 32: 16 zmm accumulators (twice the 4-cycle x 2-pipe FMA latency) + 2
   for B.  As fast as 12 x 32 on large products and without the partial row
   tile that 12 leaves on the 32- and 64-row blocks of attention (measured
   1.1-1.4x faster there). */
#define MHA__MR 8
#define MHA__NRV 2
#define MHA__FOR_I(X, Y) X(Y,0) X(Y,1) X(Y,2) X(Y,3) X(Y,4) X(Y,5) X(Y,6) X(Y,7)
#define MHA__FOR_J(X, i) X(i,0) X(i,1)
/* Measured on a 48 KiB L1 / 2 MiB L2 core (see docs/performance.md): a
   deep K block (fewer passes over C); the A block and one NC2 chunk of the
   B panel share L2, an A sliver (16 KiB) stays in L1 while it meets the
   chunk's B slivers. */
#define MHA__KC 512    /* KC x NR sliver of B: 64 KiB */
#define MHA__MC 256    /* MC x KC block of A: 512 KiB, stays in L2 */
#define MHA__NC 4096   /* KC x NC panel of B: 8 MiB, lives in L3 */
#ifndef MHA__NC2
#define MHA__NC2 256   /* KC x NC2 chunk of the panel: 512 KiB, stays in L2 */
#endif
#elif defined(MHA__SIMD_AVX2)
/* 6 x 16: 12 ymm accumulators + 2 for B + 1 broadcast of A = 15 of 16 */
#define MHA__MR 6
#define MHA__NRV 2
#define MHA__FOR_I(X, Y) X(Y,0) X(Y,1) X(Y,2) X(Y,3) X(Y,4) X(Y,5)
#define MHA__FOR_J(X, i) X(i,0) X(i,1)
#define MHA__KC 256    /* KC x NR sliver of B: 16 KiB, stays in L1 */
#define MHA__MC 144    /* MC x KC block of A: 144 KiB, stays in L2 */
#define MHA__NC 4080   /* KC x NC panel of B: 4 MiB, lives in L3 */
#define MHA__NC2 1024  /* KC x NC2 chunk of the panel: 1 MiB, stays in L2 */
#elif defined(MHA__SIMD_NEON)
/* 8 x 12: 24 of the 32 q registers accumulate, 3 hold B */
#define MHA__MR 8
#define MHA__NRV 3
#define MHA__FOR_I(X, Y) X(Y,0) X(Y,1) X(Y,2) X(Y,3) X(Y,4) X(Y,5) X(Y,6) X(Y,7)
#define MHA__FOR_J(X, i) X(i,0) X(i,1) X(i,2)
/* For a Cortex-A76 / Neoverse N1 (64 KiB L1D, 512 KiB-1 MiB L2; the
   reasoning is in docs/performance.md), not measured on one: */
#define MHA__KC 256    /* A + B slivers: 20 KiB, a third of L1D */
#define MHA__MC 256    /* MC x KC block of A: 256 KiB, half of a 512 KiB L2 */
#define MHA__NC 4080   /* KC x NC panel of B: 4 MiB, L3 */
#define MHA__NC2 252   /* KC x NC2 chunk of the panel: 252 KiB, the other half */
#else
/* 4 x 4 scalars: 16 accumulators */
#define MHA__MR 4
#define MHA__NRV 4
#define MHA__FOR_I(X, Y) X(Y,0) X(Y,1) X(Y,2) X(Y,3)
#define MHA__FOR_J(X, i) X(i,0) X(i,1) X(i,2) X(i,3)
#define MHA__KC 256
#define MHA__MC 128
#define MHA__NC 2048
#define MHA__NC2 512
#endif
#define MHA__NR (MHA__NRV * MHA__VW)
/* k steps per loop trip.  With 16 registers (AVX2) a second copy of the
   step makes GCC spill accumulators, so only the 32-register ISAs unroll. */
#if defined(MHA__SIMD_AVX512)
#define MHA__KU 4
#define MHA__K_UNROLL(S) S(0) S(1) S(2) S(3)
#elif defined(MHA__SIMD_NEON)
#define MHA__KU 2   /* 4 made GCC 12 spill accumulators; 2 does not */
#define MHA__K_UNROLL(S) S(0) S(1)
#else
#define MHA__KU 1
#define MHA__K_UNROLL(S) S(0)
#endif
#ifndef MHA__KPF
#define MHA__KPF 16   /* prefetch packed A this many k steps ahead */
#endif
/* X(i, j) for every accumulator of the tile */
#define MHA__ROW_J(X, i) MHA__FOR_J(X, i)
#define MHA__FOR_IJ(X) MHA__FOR_I(MHA__ROW_J, X)

static size_t mha__round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }
static int mha__imin(int a, int b) { return a < b ? a : b; }

/* K is cut into equal blocks of at most KC (300 -> 150 + 150, not 256 + 44). */
static int mha__gemm_kc(int K)
{
    int nblk = (K + MHA__KC - 1) / MHA__KC;
    return nblk ? (K + nblk - 1) / nblk : 1;
}

/* Workspace floats: one packed B panel, then nthreads packed A blocks. */
static size_t mha__gemm_b_floats(int N, int K)
{
    size_t nc = mha__round_up((size_t)mha__imin(N, MHA__NC), MHA__NR);
    return mha__round_up(nc * (size_t)mha__gemm_kc(K), MHA__ALIGN_FLOATS);
}
static size_t mha__gemm_a_floats(int M, int K)
{
    size_t mc = mha__round_up((size_t)mha__imin(M, MHA__MC), MHA__MR);
    return mha__round_up(mc * (size_t)mha__gemm_kc(K), MHA__ALIGN_FLOATS);
}
/* Packing-buffer floats one single-threaded GEMM call of this shape needs. */
static size_t mha__gemm_ws_floats(int M, int N, int K)
{
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    return mha__gemm_b_floats(N, K) + mha__gemm_a_floats(M, K);
}
/* Pack rows i0..i0+mr of op(A), columns p0..p0+kc, as one sliver:
   dst[p*MR + i] = op(A)[i0+i, p0+p], zero for i >= mr.  */
static void mha__pack_a(int ta, const float *A, size_t lda, int i0, int mr, int p0, int kc,
                        float *dst)
{
    int i, p;
    if (ta) {   /* A stored K x M: the MR values of one k are adjacent */
        for (p = 0; p < kc; ++p) {
            const float *src = A + (size_t)(p0 + p) * lda + i0;
            float *d = dst + (size_t)p * MHA__MR;
            for (i = 0; i < mr; ++i) d[i] = src[i];
            for (; i < MHA__MR; ++i) d[i] = 0.0f;
        }
    } else {    /* A stored M x K: read mr rows side by side, write each k's MR at once */
        const float *src = A + (size_t)i0 * lda + p0;
        for (p = 0; p < kc; ++p) {
            float *d = dst + (size_t)p * MHA__MR;
            for (i = 0; i < mr; ++i) d[i] = src[(size_t)i * lda + p];
            for (; i < MHA__MR; ++i) d[i] = 0.0f;
        }
    }
}

/* Pack rows p0..p0+kc of op(B), columns j0..j0+nr, as one sliver:
   dst[p*NR + j] = op(B)[p0+p, j0+j], zero for j >= nr.  */
static void mha__pack_b(int tb, const float *B, size_t ldb, int p0, int kc, int j0, int nr,
                        float *dst)
{
    int j, p;
    if (!tb) {  /* B stored K x N: the NR values of one k are adjacent */
        for (p = 0; p < kc; ++p) {
            const float *src = B + (size_t)(p0 + p) * ldb + j0;
            float *d = dst + (size_t)p * MHA__NR;
            if (nr == MHA__NR) {
                for (j = 0; j < MHA__NR; j += MHA__VW) mha__vstore(d + j, mha__vload(src + j));
            } else {
                for (j = 0; j < nr; ++j) d[j] = src[j];
                for (; j < MHA__NR; ++j) d[j] = 0.0f;
            }
        }
    } else {    /* B stored N x K (X W^T, Q K^T): read nr rows side by side */
        const float *src = B + (size_t)j0 * ldb + p0;
        p = 0;
        if (nr == MHA__NR) {   /* VW x VW blocks through registers, transposed */
            mha__vf r[MHA__VW];
            int t, jv;
            for (; p + MHA__VW <= kc; p += MHA__VW)
                for (jv = 0; jv < MHA__NR; jv += MHA__VW) {
                    for (t = 0; t < MHA__VW; ++t) r[t] = mha__vload(src + (size_t)(jv + t) * ldb + p);
                    mha__vtranspose(r);
                    for (t = 0; t < MHA__VW; ++t) mha__vstore(dst + (size_t)(p + t) * MHA__NR + jv, r[t]);
                }
        }
        for (; p < kc; ++p) {
            float *d = dst + (size_t)p * MHA__NR;
            for (j = 0; j < nr; ++j) d[j] = src[(size_t)j * ldb + p];
            for (; j < MHA__NR; ++j) d[j] = 0.0f;
        }
    }
}

/* The micro-kernel: one MR x NR tile of C from a packed A sliver a and a
   packed B sliver b, both kc long.
       acc[i][j] = sum_p a[p*MR + i] * b[p*NR + j]          (p in order)
       C[i][j]   = alpha acc[i][j] + beta C[i][j]            (beta == 0: no read)
   acc_i_j is vector column j of row i.  Each k step loads the NRV vectors of
   B once, broadcasts the MR values of A and issues MR*NRV independent fused
   multiply-adds: enough to keep both FMA pipes busy through their latency. */
#define MHA__K_ZERO(i, j) mha__vf acc##i##_##j = mha__vzero();
#define MHA__K_LOADB(u, j) const mha__vf b##j = mha__vload(b + (u) * MHA__NR + (j) * MHA__VW);
#define MHA__K_FMA(i, j) acc##i##_##j = mha__vfma(acc##i##_##j, a##i, b##j);
#define MHA__K_ROW(u, i) { const mha__vf a##i = mha__vset1(MHA__K_A(u, i)); MHA__FOR_J(MHA__K_FMA, i) }
#define MHA__K_STEP(u) { MHA__FOR_J(MHA__K_LOADB, u) MHA__FOR_I(MHA__K_ROW, u) }
#if defined(MHA__SIMD_NEON)
/* NEON with a packed A: the MR = 8 values of a k step are two q registers
   and each FMA takes its A value by lane (fmla v.4s, v.4s, v.s[l]), so no
   register holds a broadcast: 24 accumulators + 3 B + 2 A = 29 of 32.
   (Broadcasting each value, GCC 12 spilled accumulators in the loop.) */
#define MHA__K_FMAL(i, j) acc##i##_##j = vfmaq_laneq_f32(acc##i##_##j, b##j, (i) < 4 ? alo : ahi, (i) & 3);
#define MHA__K_ROWL(u, i) MHA__FOR_J(MHA__K_FMAL, i)
#define MHA__K_STEP_P(u) { MHA__FOR_J(MHA__K_LOADB, u) {                           \
        const float32x4_t alo = vld1q_f32(a + (u) * MHA__MR), ahi = vld1q_f32(a + (u) * MHA__MR + 4); \
        MHA__FOR_I(MHA__K_ROWL, u) } }
#else
#define MHA__K_STEP_P(u) MHA__K_STEP(u)   /* packed A: the same step */
#endif
#define MHA__K_STORE0(i, j) \
    mha__vstore(c + (i) * ldc + (j) * MHA__VW, mha__vmul(va, acc##i##_##j));
#define MHA__K_STORE1(i, j) \
    mha__vstore(c + (i) * ldc + (j) * MHA__VW, \
                mha__vfma(mha__vmul(va, acc##i##_##j), vb, mha__vload(c + (i) * ldc + (j) * MHA__VW)));
#if defined(__GNUC__) || defined(__clang__)
#define MHA__PREFETCH(p) __builtin_prefetch(p)
#else
#define MHA__PREFETCH(p) ((void)0)
#endif
#define MHA__K_PREFETCH_C(u, i) MHA__PREFETCH(c + (i) * ldc); MHA__PREFETCH(c + (i) * ldc + MHA__NR - 1);
#define MHA__K_A(u, i) a[(u) * MHA__MR + (i)]     /* packed: MR values per k */
static void mha__kernel(int kc, const float *a, const float *b, float *c, size_t ldc,
                        float alpha, float beta)
{
    int p = 0;
    MHA__FOR_I(MHA__K_PREFETCH_C, 0)    /* the C tile arrives while the sums run */
    MHA__FOR_IJ(MHA__K_ZERO)
    for (; p + MHA__KU <= kc; p += MHA__KU) {    /* unrolled: less loop overhead per FMA */
        MHA__PREFETCH(a + MHA__KPF * MHA__MR);
        MHA__K_UNROLL(MHA__K_STEP_P)
        a += MHA__KU * MHA__MR;
        b += MHA__KU * MHA__NR;
    }
    for (; p < kc; ++p) {
        MHA__K_STEP_P(0)
        a += MHA__MR;
        b += MHA__NR;
    }
    {   /* alpha and beta enter only now: no register is held for them in the loop */
        const mha__vf va = mha__vset1(alpha), vb = mha__vset1(beta);
        if (beta == 0.0f) { MHA__FOR_IJ(MHA__K_STORE0) }
        else              { MHA__FOR_IJ(MHA__K_STORE1) }
    }
}
#undef MHA__K_A

/* The same micro-kernel reading A unpacked: MR rows of a row-major A, lda
   apart (no copy when each A value meets only a few B slivers, as in
   P V with its 64 columns).  Same sums in the same order as mha__kernel. */
#define MHA__K_A(u, i) ar##i[p + (u)]
#define MHA__K_AROW(u, i) const float *ar##i = a + (size_t)(i) * lda;
static void mha__kernel_rows(int kc, const float *a, size_t lda, const float *b, float *c,
                             size_t ldc, float alpha, float beta)
{
    int p = 0;
    MHA__FOR_I(MHA__K_AROW, 0)
    MHA__FOR_I(MHA__K_PREFETCH_C, 0)
    MHA__FOR_IJ(MHA__K_ZERO)
    for (; p + MHA__KU <= kc; p += MHA__KU) {
        MHA__K_UNROLL(MHA__K_STEP)
        b += MHA__KU * MHA__NR;
    }
    for (; p < kc; ++p) {
        MHA__K_STEP(0)
        b += MHA__NR;
    }
    {   /* alpha and beta enter only now: no register is held for them in the loop */
        const mha__vf va = mha__vset1(alpha), vb = mha__vset1(beta);
        if (beta == 0.0f) { MHA__FOR_IJ(MHA__K_STORE0) }
        else              { MHA__FOR_IJ(MHA__K_STORE1) }
    }
}
#undef MHA__K_A

/* The inner loops over one A block (mc x kc) and packed B panel (kc x nc).
   A is packed (lda_rows == 0), or the rows of a row-major A themselves,
   lda_rows apart; then a partial sliver at the bottom edge is packed into
   edge (MR x kc floats) so no row past the end is read.  */
static void mha__macro_kernel(int mc, int nc, int kc, float alpha, float beta,
                              const float *pa, size_t lda_rows, float *edge,
                              const float *pb, float *C, size_t ldc)
{
    int ir, jr, jj;
    for (jj = 0; jj < nc; jj += MHA__NC2) {            /* a chunk of B that stays in L2 */
        int jend = mha__imin(nc, jj + MHA__NC2);
        for (ir = 0; ir < mc; ir += MHA__MR) {         /* one A sliver, kept in L1 */
            int mr = mha__imin(MHA__MR, mc - ir);
            const float *a = lda_rows ? pa + (size_t)ir * lda_rows : pa + (size_t)ir * kc;
            size_t rows = lda_rows;
            if (lda_rows && mr < MHA__MR) {             /* partial in-place sliver: pack it */
                mha__pack_a(0, a, lda_rows, 0, mr, 0, kc, edge);
                a = edge;
                rows = 0;
            }
            for (jr = jj; jr < jend; jr += MHA__NR) {
                int nr = mha__imin(MHA__NR, nc - jr);
                const float *b = pb + (size_t)jr * kc;
                float *c = C + (size_t)ir * ldc + jr;
                if (mr == MHA__MR && nr == MHA__NR) {
                    if (rows) mha__kernel_rows(kc, a, rows, b, c, ldc, alpha, beta);
                    else      mha__kernel(kc, a, b, c, ldc, alpha, beta);
                } else {    /* edge: full tile into t, copy out the valid mr x nr part */
                    float t[MHA__MR * MHA__NR];
                    int i, j;
                    if (rows) mha__kernel_rows(kc, a, rows, b, t, MHA__NR, alpha, 0.0f);
                    else      mha__kernel(kc, a, b, t, MHA__NR, alpha, 0.0f);
                    for (i = 0; i < mr; ++i) {
                        float *ci = c + (size_t)i * ldc;
                        const float *ti = t + i * MHA__NR;
                        if (beta == 0.0f) for (j = 0; j < nr; ++j) ci[j] = ti[j];
                        else              for (j = 0; j < nr; ++j) ci[j] = ti[j] + beta * ci[j];
                    }
                }
            }
        }
    }
}

/* Pack an mc x kc block of op(A) (rows ic.., columns pc..) as MR slivers. */
static void mha__pack_a_block(int ta, const float *A, size_t lda, int ic, int mc, int pc, int kc,
                              float *pa)
{
    int ir;
    for (ir = 0; ir < mc; ir += MHA__MR)
        mha__pack_a(ta, A, lda, ic + ir, mha__imin(MHA__MR, mc - ir), pc, kc, pa + (size_t)ir * kc);
}

/* A prepacked B (mha_module_pack): op(B) = W^T for a row-major W [Ntot, K],
   packed once in exactly the order mha__gemm would pack it per call, so the
   GEMM reads it instead of packing and sums the same products in the same
   order (bit-identical results).  For each column block jc (NC columns,
   starting at multiples of NC) and each K block pc (mha__gemm_kc(K) rows):
   the panel of round_up(nc, NR) x kc floats, slivers of NR columns, lies at
       jc * K + round_up(nc, NR) * pc   (the blocks before it: K floats per column).  */
static size_t mha__prepacked_floats(int Ntot, int K)
{
    int jc;
    size_t n = 0;
    for (jc = 0; jc < Ntot; jc += MHA__NC)
        n += mha__round_up((size_t)mha__imin(MHA__NC, Ntot - jc), MHA__NR) * (size_t)K;
    return n;
}
static void mha__prepack_b(const float *W, int Ntot, int K, float *dst)
{
    int kcb = mha__gemm_kc(K), jc, pc, jr;
    for (jc = 0; jc < Ntot; jc += MHA__NC) {
        int nc = mha__imin(MHA__NC, Ntot - jc);
        size_t ncr = mha__round_up((size_t)nc, MHA__NR);
        for (pc = 0; pc < K; pc += kcb) {
            int kc = mha__imin(kcb, K - pc);
            for (jr = 0; jr < nc; jr += MHA__NR)
                mha__pack_b(1, W, (size_t)K, pc, kc, jc + jr, mha__imin(MHA__NR, nc - jr),
                            dst + (size_t)jc * K + ncr * pc + (size_t)jr * kc);
        }
    }
}
/* Where the panel of columns col.. (a multiple of NR), K block pc (kc rows
   long: its slivers are NR x kc), starts. */
static const float *mha__prepacked_at(const float *pp, int Ntot, int K, int col, int pc, int kc)
{
    int jcg = col - col % MHA__NC;
    size_t ncr = mha__round_up((size_t)mha__imin(MHA__NC, Ntot - jcg), MHA__NR);
    return pp + (size_t)jcg * K + ncr * pc + (size_t)(col - jcg) * kc;
}

/* One ic block of a packed panel: C[ic:+mc, j0:+nc] (=|+=) op(A)[ic:+mc, pc:+kc] B~,
   with A packed into pa first unless it is read in place (direct_a). */
static void mha__gemm_block(int ta, const float *A, size_t lda, int direct_a, int ic, int mc,
                            int pc, int kc, int nc, float alpha, float beta, const float *b,
                            float *c, size_t ldc, float *pa)
{
    if (direct_a) {
        mha__macro_kernel(mc, nc, kc, alpha, beta, A + (size_t)ic * lda + pc, lda, pa, b, c, ldc);
    } else {
        mha__pack_a_block(ta, A, lda, ic, mc, pc, kc, pa);
        mha__macro_kernel(mc, nc, kc, alpha, beta, pa, 0, pa, b, c, ldc);
    }
}

/* Single-threaded GEMM into caller memory; never allocates.
   ws: mha__gemm_ws_floats(M, N, K) floats, 64-byte aligned.
   pp: NULL, or B prepacked (mha__prepack_b of a W [Ntot, K], tb == 1); this
   call then multiplies by its columns col0..col0+N (col0 a multiple of NR)
   and packs no B.  Column blocks end where the prepacked ones do (multiples
   of NC from column 0 of W), so each block is one contiguous panel.
   rows_a: read a row-major A in place whatever N (see mha__linear).  */
static void mha__gemm_pp(int ta, int tb, int M, int N, int K, float alpha,
                         const float *A, size_t lda, const float *B, size_t ldb,
                         float beta, float *C, size_t ldc, float *ws,
                         const float *pp, int col0, int Ntot, int rows_a)
{
    float *pb = ws, *pa = ws + mha__gemm_b_floats(N, K);
    int kcb = mha__gemm_kc(K), jc, pc, ic, jr, nc;
    /* a row-major A that meets at most 4 B slivers is read in place: packing
       it would cost about as much as the multiply-adds it feeds */
    int direct_a = !ta && (N <= 4 * MHA__NR || rows_a);
    if (M <= 0 || N <= 0 || K <= 0) return;
    for (jc = 0; jc < N; jc += nc) {
        nc = mha__imin(MHA__NC - (col0 + jc) % MHA__NC, N - jc);
        for (pc = 0; pc < K; pc += kcb) {
            int kc = mha__imin(kcb, K - pc);
            const float *b = pb;
            if (pp) {
                b = mha__prepacked_at(pp, Ntot, K, col0 + jc, pc, kc);
            } else {
                for (jr = 0; jr < nc; jr += MHA__NR)
                    mha__pack_b(tb, B, ldb, pc, kc, jc + jr, mha__imin(MHA__NR, nc - jr),
                                pb + (size_t)jr * kc);
            }
            for (ic = 0; ic < M; ic += MHA__MC)
                mha__gemm_block(ta, A, lda, direct_a, ic, mha__imin(MHA__MC, M - ic), pc, kc, nc,
                                alpha, pc == 0 ? beta : 1.0f, b, C + (size_t)ic * ldc + jc, ldc, pa);
        }
    }
}
static void mha__gemm(int ta, int tb, int M, int N, int K, float alpha,
                      const float *A, size_t lda, const float *B, size_t ldb,
                      float beta, float *C, size_t ldc, float *ws)
{
    mha__gemm_pp(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ws, NULL, 0, N, 0);
}

/* Below this many multiply-adds a GEMM runs on the calling thread alone:
   starting a team costs more than it saves. */
#define MHA__GEMM_MT_MIN_FMAS (1 << 21)

/* The threads a GEMM of this shape runs on: at most one per MR x NR tile of C. */
static int mha__gemm_threads(int M, int N, int K, int nthreads)
{
    double tiles;
    if (nthreads <= 1 || (double)M * N * K < (double)MHA__GEMM_MT_MIN_FMAS) return 1;
    tiles = (double)((M + MHA__MR - 1) / MHA__MR) * (double)((N + MHA__NR - 1) / MHA__NR);
    return tiles < nthreads ? (int)tiles : nthreads;
}

/* Workspace floats of mha__gemm_mt with nthreads threads, the BLIS layout:
   the packed B panel is shared (two of them when there is more than one
   panel, so the next one is packed while a slow thread still reads the
   last: one barrier per panel), then one packed A block per thread. */
static size_t mha__gemm_ws_floats_mt(int M, int N, int K, int nthreads)
{
    int nt = mha__gemm_threads(M, N, K, nthreads);
    size_t panels;
    if (nt <= 1) return mha__gemm_ws_floats(M, N, K);
    panels = (size_t)((N + MHA__NC - 1) / MHA__NC) * (size_t)((K + mha__gemm_kc(K) - 1) / mha__gemm_kc(K));
    return (panels > 1 ? 2 : 1) * mha__gemm_b_floats(N, K) + (size_t)nt * mha__gemm_a_floats(M, K);
}

/* mha__gemm(_pp) on nthreads OpenMP threads (one thread without -fopenmp),
   BLIS-style.  ws: mha__gemm_ws_floats_mt(M, N, K, nthreads) floats.
   For each panel (jc, pc) of op(B):
     1. the threads pack its NR slivers together, each a static share,
        into the shared buffer pb[panel % 2]; one barrier;
     2. the ic loop is cut into row chunks of whole MR tiles (and, when there
        are fewer than two chunks per thread, the panel's columns into whole
        NR slivers too), handed out dynamically: a thread packs the A block of
        its chunk into its own buffer and runs the macro-kernel.
   No barrier after step 2: the next panel is packed into the other buffer,
   and no thread can pass the next barrier (and so touch the C rows this
   panel updates) before every thread has finished this panel.  Each C
   element is summed over the same K blocks in the same order by the same
   micro-kernel whatever thread computes it: bit-identical for any count. */
static void mha__gemm_mt_pp(int ta, int tb, int M, int N, int K, float alpha,
                            const float *A, size_t lda, const float *B, size_t ldb,
                            float beta, float *C, size_t ldc, float *ws, int nthreads,
                            const float *pp, int rows_a)
{
#ifdef _OPENMP
    int nt = mha__gemm_threads(M, N, K, nthreads);
    if (nt > 1) {
        const int kcb = mha__gemm_kc(K), direct_a = !ta && (N <= 4 * MHA__NR || rows_a);
        const size_t bfl = mha__gemm_b_floats(N, K);
        const size_t panels = (size_t)((N + MHA__NC - 1) / MHA__NC) * (size_t)((K + kcb - 1) / kcb);
        float *pa0 = ws + (panels > 1 ? 2 : 1) * bfl;
        /* row chunks: about two per thread, whole MR tiles, at most MC rows */
        int mcs = (int)mha__round_up((size_t)((M + 2 * nt - 1) / (2 * nt)), MHA__MR);
        int nrc;
        if (mcs > MHA__MC) mcs = MHA__MC;
        nrc = (M + mcs - 1) / mcs;
#pragma omp parallel num_threads(nt)
        {
            float *pa = pa0 + (size_t)omp_get_thread_num() * mha__gemm_a_floats(M, K);
            int jc, pc, nc, s, it, npanel = 0;
            for (jc = 0; jc < N; jc += nc) {
                nc = mha__imin(MHA__NC, N - jc);
                for (pc = 0; pc < K; pc += kcb, ++npanel) {
                    const int kc = mha__imin(kcb, K - pc), nsl = (nc + MHA__NR - 1) / MHA__NR;
                    const float beta_pc = pc == 0 ? beta : 1.0f;
                    float *pb = ws + (size_t)(npanel & 1) * bfl;
                    const float *b = pb;
                    /* column chunks (whole slivers) when the rows alone give too few items */
                    int ncc = nrc >= 2 * nt ? 1 : mha__imin((2 * nt + nrc - 1) / nrc, nsl);
                    int ncs = (nsl + ncc - 1) / ncc * MHA__NR;
                    ncc = (nc + ncs - 1) / ncs;
                    if (pp) {
                        b = mha__prepacked_at(pp, N, K, jc, pc, kc);
                    } else {
#pragma omp for schedule(static) nowait
                        for (s = 0; s < nsl; ++s)
                            mha__pack_b(tb, B, ldb, pc, kc, jc + s * MHA__NR,
                                        mha__imin(MHA__NR, nc - s * MHA__NR), pb + (size_t)s * MHA__NR * kc);
                    }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1) nowait
                    for (it = 0; it < nrc * ncc; ++it) {
                        const int ic = (it / ncc) * mcs, j0 = (it % ncc) * ncs;
                        mha__gemm_block(ta, A, lda, direct_a, ic, mha__imin(mcs, M - ic), pc, kc,
                                        mha__imin(ncs, nc - j0), alpha, beta_pc, b + (size_t)j0 * kc,
                                        C + (size_t)ic * ldc + jc + j0, ldc, pa);
                    }
                }
            }
        }
        return;
    }
#endif
    (void)nthreads;
    mha__gemm_pp(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ws, pp, 0, N, rows_a);
}
static void mha__gemm_mt(int ta, int tb, int M, int N, int K, float alpha,
                         const float *A, size_t lda, const float *B, size_t ldb,
                         float beta, float *C, size_t ldc, float *ws, int nthreads)
{
    mha__gemm_mt_pp(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ws, nthreads, NULL, 0);
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

/* Everything one attention call needs, after validation.  A call may cover
   a slice of the queries: batches b0..b0+nb and rows q0..q0+nq of each; the
   views q, k, v, o then start at (b0, q0) and (b0, key 0), while masks,
   causal and weights use the global indices b0 + b and q0 + i.  The fused
   path may also take heads h0..h0+nh only; masks then see head h0 + h.  */
typedef struct mha__attn {
    int B, H, Lq, Lk, Lk_eff, D, Dv;   /* Lk_eff: Lk plus appended keys (bias_k, zero) */
    int b0, nb, q0, nq;                /* the slice this call computes */
    int h0, nh;                        /* fused path: heads h0..h0+nh (views start at h0) */
    int shared_pack;                   /* fused path: one packed K/V for all threads */
    mha__view q, k, v;
    float *o; size_t o_bs, o_hs, o_rs; /* may alias q: each tile reads its rows first */
    float scale;
    const mha_mask *attn_mask, *kpm;   /* NULL when kind is NONE */
    int causal; ptrdiff_t causal_off;  /* key j allowed iff j <= i + causal_off */
    float *weights; int per_head;      /* weights output or NULL */
    int nthreads;
    int Hkv, group;                    /* KV heads; global query head h reads KV head h / group */
    int window, win_left, win_right;   /* key j allowed iff i + causal_off - left <= j <=
                                          i + causal_off + right (-1 = unbounded) */
    float softcap;                     /* 0 = off */
    int alibi; const float *slopes;    /* slopes NULL: the paper's */
    const float *sinks;                /* [H] or NULL */
    float *lse, *lse2;                 /* [B, H, Lq] outputs or NULL (opt.lse, row_stats->lse) */
    float *ent, *maxw, *first;         /* the other row statistics, [B, H, Lq] or NULL */
    int stats;                         /* some of ent, maxw, first is wanted */
    float *sinks_grad;                 /* backward: [H] or NULL */
} mha__attn;

/* KV head (local to the views) of local query head h */
static int mha__kvh(const mha__attn *a, int h)
{
    return (a->h0 + h) / a->group - a->h0 / a->group;
}

/* ALiBi slope of global query head h (mha_alibi_slopes is the definition) */
static float mha__alibi_slope(int H, int h)
{
    int n = 1;
    while (n * 2 <= H) n *= 2;
    return h < n ? (float)pow(2.0, -8.0 * (h + 1) / n) : (float)pow(2.0, -4.0 * (2 * (h - n) + 1) / n);
}

/* Keys row i (global) may see by causal and window: [*lo, *hi], clipped to
   the real keys 0..Lk-1 (empty when *hi < *lo). */
static void mha__key_range(const mha__attn *a, ptrdiff_t i, ptrdiff_t *lo, ptrdiff_t *hi)
{
    ptrdiff_t l = 0, h = a->Lk - 1, c = i + a->causal_off;
    if (a->causal && c < h) h = c;
    if (a->window && a->win_right >= 0 && c + a->win_right < h) h = c + a->win_right;
    if (a->window && a->win_left >= 0 && c - a->win_left > l) l = c - a->win_left;
    *lo = l; *hi = h;
}

/* Does anything but the GEMM touch the scores?  (causal, window, ALiBi, masks) */
static int mha__limits(const mha__attn *a)
{
    return a->causal || a->window;
}

/* Unfused path (weights requested): blocks of query rows against all Lk_eff
   keys, i.e. a [rows, Lk_eff] score block per thread.  Long blocks keep the
   GEMM from repacking K and V for every few rows (32-row blocks ran at half
   the speed at L = 2048); a quarter of Lq keeps 4 blocks per batch for the
   threads.  The size depends on Lq only, never on the thread count.  */
static int mha__unfused_rows(int Lq)
{
    int r = Lq / 4 / 32 * 32;
    return r < 32 ? (Lq < 32 ? Lq : 32) : (r > 256 ? 256 : r);
}

/* n floats rounded up to whole 64-byte lines */
static size_t mha__round_floats(size_t n)
{
    return (n + MHA__ALIGN_FLOATS - 1) / MHA__ALIGN_FLOATS * MHA__ALIGN_FLOATS;
}

static int mha__mask_bool_blocks(mha_mask_kind kind, unsigned char v)
{
    return kind == MHA_MASK_BOOL ? v != 0 : v == 0;
}

/* Soft-capping of n scores: s = cap tanh(s / cap), before any mask (Gemma-2). */
static void mha__softcap(float cap, float *s, size_t n)
{
    const mha__vf vc = mha__vset1(cap), vi = mha__vset1(1.0f / cap);
    size_t j = 0;
    for (; j + MHA__VW <= n; j += MHA__VW)
        mha__vstore(s + j, mha__vmul(vc, mha__vtanh(mha__vmul(mha__vload(s + j), vi))));
    for (; j < n; ++j) s[j] = cap * tanhf(s[j] / cap);
}

/* Mask the scaled (and capped) scores s[0..n) of query i in (b, h) against
   keys j0..j0+n: blocked keys get -inf written over whatever the score was
   (so NaN from a blocked key is discarded); float masks and the ALiBi bias
   slope_h (j - i') are added; keys outside the causal / window range are
   blocked.  Keys j >= Lk are the appended bias/zero keys and are never
   masked.  */
static void mha__mask_cols(const mha__attn *a, int b, int h, int i, int j0, int n, float *s)
{
    int j, Lk = a->Lk, jend = j0 + n < Lk ? j0 + n : Lk;
    s -= j0;                            /* s[j] is key j from here on */
    if (j0 >= Lk) return;
    if (a->alibi) {
        float slope = a->slopes ? a->slopes[h] : mha__alibi_slope(a->H, h);
        ptrdiff_t ip = (ptrdiff_t)i + a->causal_off;
        for (j = j0; j < jend; ++j) s[j] += slope * (float)((ptrdiff_t)j - ip);
    }
    if (a->attn_mask) {
        const mha_mask *m = a->attn_mask;
        size_t row = (m->ndim == 2) ? (size_t)i
                                    : ((size_t)b * a->H + h) * a->Lq + i;
        if (m->kind == MHA_MASK_FLOAT) {
            const float *f = MHA__CAST(const float *, m->data) + row * Lk;
            for (j = j0; j < jend; ++j) s[j] = (f[j] == -INFINITY) ? -INFINITY : s[j] + f[j];
        } else {
            const unsigned char *u = MHA__CAST(const unsigned char *, m->data) + row * Lk;
            for (j = j0; j < jend; ++j) if (mha__mask_bool_blocks(m->kind, u[j])) s[j] = -INFINITY;
        }
    }
    if (a->kpm) {
        const mha_mask *m = a->kpm;
        if (m->kind == MHA_MASK_FLOAT) {
            const float *f = MHA__CAST(const float *, m->data) + (size_t)b * Lk;
            /* a key the attention mask blocked stays blocked: -inf + NaN/+inf would be NaN */
            for (j = j0; j < jend; ++j) s[j] = (f[j] == -INFINITY || s[j] == -INFINITY) ? -INFINITY : s[j] + f[j];
        } else {
            const unsigned char *u = MHA__CAST(const unsigned char *, m->data) + (size_t)b * Lk;
            for (j = j0; j < jend; ++j) if (mha__mask_bool_blocks(m->kind, u[j])) s[j] = -INFINITY;
        }
    }
    if (mha__limits(a)) {               /* keys outside [lo, hi] are blocked: two runs */
        ptrdiff_t lo, hi;
        mha__key_range(a, i, &lo, &hi);
        for (j = j0; j < jend && (ptrdiff_t)j < lo; ++j) s[j] = -INFINITY;
        for (j = hi + 1 > (ptrdiff_t)j0 ? (int)(hi + 1) : j0; j < jend; ++j) s[j] = -INFINITY;
    }
}

static int mha__all_finite(const float *x, int n)
{
    int i;
    for (i = 0; i < n; ++i) if (!(x[i] - x[i] == 0.0f)) return 0;
    return 1;
}

/* O[r, :] (+)= sum_j P[r, j] V[j, :] over nc keys.  A zero weight times a
   NaN/Inf value would be NaN, so when some value row is not finite, sum over
   the keys with nonzero weight only.  beta is 0 (overwrite) or 1 (accumulate).  */
static void mha__pv(int nr, int nc, int Dv, const float *p, size_t ldp, const float *v,
                    size_t ldv, float beta, float *o, size_t ldo, float *gws)
{
    int i, j, v_finite = 1;
    for (j = 0; j < nc && v_finite; ++j) v_finite = mha__all_finite(v + (size_t)j * ldv, Dv);
    if (v_finite) {
        mha__gemm(0, 0, nr, Dv, nc, 1.0f, p, ldp, v, ldv, beta, o, ldo, gws);
        return;
    }
    for (i = 0; i < nr; ++i) {
        float *oi = o + (size_t)i * ldo;
        const float *pi = p + (size_t)i * ldp;
        if (beta == 0.0f) for (j = 0; j < Dv; ++j) oi[j] = 0.0f;
        for (j = 0; j < nc; ++j)
            if (pi[j] != 0.0f) mha__axpy(oi, pi[j], v + (size_t)j * ldv, Dv);
    }
}

/* ---- row statistics (mha_row_stats) */

/* The fused path's accumulators of one row, besides its m and l (below). */
typedef struct mha__racc {
    double t, ld;      /* sum exp(s - m)(s - m) and sum exp(s - m), in double */
    float km, s0;      /* the largest key score, key 0's score */
} mha__racc;

/* Row idx of [B, H, Lq] from the online softmax's state: m the running max
   (of the keys and the sink), l = sum exp(s - m) and t = sum exp(s - m)(s - m)
   over the keys and the sink, km the largest key score, s0 key 0's score
   (-inf: blocked or not seen).  With lse = m + log l and p = exp(s - lse):
       H = -sum p log p = sum p (lse - s) = log l - t / l
       max weight = exp(km - lse),      first weight = exp(s0 - lse)
   The statistics take ld, the same l summed in double alongside t (the
   float l of the kernel, summed over 16k keys, cost H about 1e-6 there).
   l = 0 (nothing allowed, no sink): lse = -inf and zeros.  Rounding can
   leave H a hair below 0 for a one-hot row: clamped.  */
static void mha__put_row(const mha__attn *a, size_t idx, float m, float l, const mha__racc *r)
{
    double t = r->t, ld = r->ld;
    float km = r->km, s0 = r->s0;
    double lse_d, H;
    if (a->lse || a->lse2) {
        float lse = l != 0.0f ? m + logf(l) : -INFINITY;
        if (a->lse) a->lse[idx] = lse;
        if (a->lse2) a->lse2[idx] = lse;
    }
    if (!a->stats) return;
    lse_d = (double)m + log(ld);
    H = l != 0.0f ? log(ld) - t / ld : 0.0;
    if (a->ent) a->ent[idx] = H > 0.0 ? (float)H : 0.0f;
    if (a->maxw) a->maxw[idx] = l != 0.0f && km != -INFINITY ? (float)exp(km - lse_d) : 0.0f;
    if (a->first) a->first[idx] = l != 0.0f && s0 != -INFINITY ? (float)exp(s0 - lse_d) : 0.0f;
}

/* The same from a row of weights p[0..n) and its lse (the unfused path):
   the sink's share is p_s = exp(sink - lse), H = -sum p log p - p_s log p_s. */
static void mha__put_row_p(const mha__attn *a, size_t idx, const float *p, int n, float sink, float lse)
{
    double H = 0.0, ps = sink != -INFINITY && lse != -INFINITY ? exp((double)sink - lse) : 0.0;
    float mx = 0.0f;
    int j;
    if (!a->stats) return;
    for (j = 0; j < n; ++j) {
        if (p[j] > 0.0f) H -= (double)p[j] * log((double)p[j]);
        if (p[j] > mx) mx = p[j];
    }
    if (ps > 0.0) H -= ps * log(ps);
    if (a->ent) a->ent[idx] = H > 0.0 ? (float)H : 0.0f;
    if (a->maxw) a->maxw[idx] = mx;
    if (a->first) a->first[idx] = lse != -INFINITY ? p[0] : 0.0f;
}

/* ---- unfused path: the weights are wanted, so every score is kept */

/* Rows i0..i0+nr of batch b, every head in order h = 0..H-1:
   S = scale Q K^T; mask; softmax; O = P V; hand out the weights.
   s: nr*Lk_eff floats of scratch.  Summing the head average in this item,
   head by head, fixes its order whatever the thread count.  */
static void mha__attend_rows(const mha__attn *a, int b, int i0, int nr, float *s, float *gws)
{
    int Lk = a->Lk_eff, h, r, gb = a->b0 + b, gi = a->q0 + i0;   /* global batch, row */
    size_t n = (size_t)nr * Lk, t;
    for (h = 0; h < a->H; ++h) {
        const float *q = a->q.p + (size_t)b * a->q.bs + (size_t)h * a->q.hs + (size_t)i0 * a->q.rs;
        const float *k = a->k.p + (size_t)b * a->k.bs + (size_t)mha__kvh(a, h) * a->k.hs;
        const float *v = a->v.p + (size_t)b * a->v.bs + (size_t)mha__kvh(a, h) * a->v.hs;
        float *o = a->o + (size_t)b * a->o_bs + (size_t)h * a->o_hs + (size_t)i0 * a->o_rs;
        float sink = a->sinks ? a->sinks[h] : -INFINITY;

        /* 1. scores S[i,j] = scale * q_i . k_j, soft-capped */
        mha__gemm(0, 1, nr, Lk, a->D, a->scale, q, a->q.rs, k, a->k.rs, 0.0f, s, (size_t)Lk, gws);
        if (a->softcap > 0.0f) mha__softcap(a->softcap, s, n);

        /* 2. mask and softmax (with the sink), row by row */
        for (r = 0; r < nr; ++r) {
            float *row = s + (size_t)r * Lk, lse;
            mha__mask_cols(a, gb, h, gi + r, 0, Lk, row);
            lse = mha__softmax_row_lse(row, Lk, sink);
            if (a->lse) a->lse[((size_t)gb * a->H + h) * a->Lq + gi + r] = lse;
            if (a->lse2) a->lse2[((size_t)gb * a->H + h) * a->Lq + gi + r] = lse;
            mha__put_row_p(a, ((size_t)gb * a->H + h) * a->Lq + gi + r, row, Lk, sink, lse);
        }

        /* 3. O = P V (q is fully read above, so o may alias it) */
        mha__pv(nr, Lk, a->Dv, s, (size_t)Lk, v, a->v.rs, 0.0f, o, a->o_rs, gws);

        /* 4. the weights: per head, or the head average w = sum_h P_h / H */
        if (a->per_head) {
            float *w = a->weights + (((size_t)gb * a->H + h) * a->Lq + gi) * Lk;
            memcpy(w, s, n * sizeof(float));
        } else {
            float *w = a->weights + ((size_t)gb * a->Lq + gi) * Lk;
            float inv_h = 1.0f / (float)a->H;
            if (h == 0) for (t = 0; t < n; ++t) w[t] = s[t] * inv_h;
            else        for (t = 0; t < n; ++t) w[t] += s[t] * inv_h;
        }
    }
}

/* ---- fused path: online softmax over key tiles (FlashAttention)

   For one query row with running max m, running sum l and context o, a new
   tile of scores s_j does
       m' = max(m, max_j s_j)          c = exp(m - m')
       p_j = exp(s_j - m')             l' = c l + sum_j p_j
       o'  = c o + sum_j p_j v_j
   and at the end o / l is softmax(s) V over all keys seen.  Blocked keys
   (s_j = -inf) get p_j = 0 exactly and are skipped in o when V is not finite.

   Layout.  The tile is computed transposed, keys down and queries across:
       S^T = K_t Q_t^T   [nc keys, nr queries]      O^T += V_t^T P^T   [Dv, nr]
   so the softmax runs down the columns with one query per vector lane (no
   horizontal reductions), and S^T, stored as NR-wide column slivers, is
   already the packed B operand of the GEMM micro-kernel for O^T: nothing is
   packed per tile.  K_t is the A of S^T as it stands (the macro-kernel reads
   the rows of a row-major A in place), V_t^T (the A of O^T) is packed once
   per (b, h) by each thread that works on it, Q_t^T once per query tile.
   These are the GEMM section's panel formats and its macro-kernel, called
   directly.  */

/* exp(x) for the arguments the online softmax makes: x = s - m <= 0, -inf
   (a blocked key) or NaN; cheaper than mha__vexp because nothing can
   overflow.  Same reduction and polynomial as mha__vexp, so its error bound
   (2e-7 relative) holds wherever exp(x) is a normal float.  The clamp at
   MHA__EXP_ZERO makes n = -127, whose 2^n has exponent field 0, i.e. the
   result is exactly 0 there: -inf (a blocked key) and everything below
   -88 give p = 0 with no compare and select, and exp(x) < 2^-126 for
   x < -87.34 is lost only as an absolute error below 1.2e-38.  NaN passes
   max() as the second operand and stays NaN.  */
#define MHA__EXP_ZERO (-88.0f)
static inline mha__vf mha__vexp_nonpos(mha__vf x)
{
    mha__vf n, p = mha__vexp_core(mha__vmax(mha__vset1(MHA__EXP_ZERO), x), &n);
    return mha__vmul(p, mha__vpow2i(n));   /* (the scalar vpow2i clamps NaN/inf n) */
}

/* Sizes of the fused path's buffers, in floats.  Key tiles hold MHA__FBC
   keys (a multiple of MR: only the last tile has a ragged sliver), query
   tiles MHA__FBR queries (a multiple of NR, whole slivers).  */
#define MHA__FBC ((128 + MHA__MR - 1) / MHA__MR * MHA__MR)
#define MHA__FBR ((64 + MHA__NR - 1) / MHA__NR * MHA__NR)

typedef struct mha__fused_dims {
    int ntiles;        /* key tiles: ceil(Lk / FBC) real ones, + 1 for appended keys */
    size_t dvp;        /* Dv rounded up to MR: rows of packed V^T */
    size_t v_tile;     /* floats of one packed V^T tile */
    size_t packed;     /* packed V^T of one (b, h), plus a finite flag per tile */
    size_t tiles;      /* Q^T slivers, S^T, O^T, m, l, the ragged K sliver, t, ld, km, s0 */
} mha__fused_dims;

static int mha__fused_sizes(int Lk, int Lk_eff, int D, int Dv, mha__fused_dims *f)
{
    size_t t, s;
    f->ntiles = (Lk + MHA__FBC - 1) / MHA__FBC + (Lk_eff > Lk);
    f->dvp = ((size_t)Dv + MHA__MR - 1) / MHA__MR * MHA__MR;
    if (!mha__mul((size_t)MHA__FBC, f->dvp, &f->v_tile) ||
        !mha__mul(f->v_tile, (size_t)f->ntiles, &s) || !mha__add(s, (size_t)f->ntiles, &s) ||
        !mha__mul((size_t)MHA__MR, (size_t)D, &t))
        return 0;
    f->packed = mha__round_floats(s);
    f->tiles = mha__round_floats((size_t)MHA__FBR * D) +            /* Q^T slivers */
               mha__round_floats((size_t)MHA__FBC * MHA__FBR) +     /* S^T */
               mha__round_floats(f->dvp * MHA__FBR) +               /* O^T */
               2 * mha__round_floats(MHA__FBR) +                    /* m, l */
               mha__round_floats(t) +                               /* K edge sliver */
               6 * mha__round_floats(MHA__FBR);                     /* row statistics */
    return 1;
}

/* Pack key tile t of (b, KV head kvh): V rows j0..j0+nc transposed as MR
   slivers of Dv (A of O^T), and whether every V value of the tile is
   finite.  Tile ntiles-1 holds the appended keys when there are any.  */
static void mha__fused_pack(const mha__attn *a, const mha__fused_dims *f, int b, int kvh, int t,
                            float *shared)
{
    const float *v = a->v.p + (size_t)b * a->v.bs + (size_t)kvh * a->v.hs;
    float *pv = shared + (size_t)t * f->v_tile, *flag = shared + (size_t)f->ntiles * f->v_tile + t;
    int appended = a->Lk_eff > a->Lk && t == f->ntiles - 1;
    int j0 = appended ? a->Lk : t * MHA__FBC;
    int nc = appended ? a->Lk_eff - a->Lk : (a->Lk - j0 < MHA__FBC ? a->Lk - j0 : MHA__FBC), j;
    mha__vf acc = mha__vzero();
    MHA_PROFILE_MARK(MHA_PHASE_VPACK);
    mha__pack_a_block(1, v + (size_t)j0 * a->v.rs, a->v.rs, 0, a->Dv, 0, nc, pv);
    /* x - x is 0 for finite x and NaN otherwise; one NaN makes the sum NaN */
    for (j = 0; j < nc; ++j) {
        const float *vr = v + (size_t)(j0 + j) * a->v.rs;
        int d = 0;
        float s = 0.0f;
        for (; d + MHA__VW <= a->Dv; d += MHA__VW) {
            mha__vf x = mha__vload(vr + d);
            acc = mha__vadd(acc, mha__vsub(x, x));
        }
        for (; d < a->Dv; ++d) s += vr[d] - vr[d];
        acc = mha__vadd(acc, mha__vset1(s));
    }
    *flag = mha__vhsum(acc) == 0.0f ? 1.0f : 0.0f;
    MHA_PROFILE_MARK(MHA_PHASE_OTHER);
}

/* The queries of one fused tile: ng heads gh0.. (global, one KV group) times
   nr rows gi.. (global) each; tile column c is head gh0 + c / nr, row
   gi + c % nr.  Grouped heads share every K tile and packed V tile.  */
typedef struct mha__tileq {
    int gb, gh0, ng, gi, nr;
    int narrow;        /* at most MHA__NARROW columns: vector products, no packing (decoding) */
    int t_lo, t_hi;    /* the real key tiles of this item (split-K), t_hi = -1: all */
    float *partial;    /* split-K: NULL, or [ncol][MHA__PART_W(Dv)]: unnormalised O, m, l,
                          and the row statistics' mha__racc (6 floats' bytes) */
} mha__tileq;
#define MHA__PART_W(Dv) ((Dv) + 2 + sizeof(mha__racc) / sizeof(float))

/* Tiles with at most this many query columns (a decode step: Lq = 1 times
   the heads of a group) take the narrow path: S = K q and O += p V as dot
   products and axpys on K and V where they lie, so each key and value row
   is read once for all the group's heads and V is never packed; the GEMM
   micro-kernel would compute NR columns (16-48) for these few.  */
#define MHA__NARROW 8

/* Masks on a transposed score tile: st holds key p, column c of the tile at
   st[(c / NR) * NR * nc + p * NR + c % NR].  Same rules as mha__mask_cols. */
#define MHA__ST(st, nc, p, i) ((st)[(size_t)((i) / MHA__NR) * MHA__NR * (nc) + (size_t)(p) * MHA__NR + (i) % MHA__NR])
static void mha__mask_tile_t(const mha__attn *a, const mha__tileq *tq, int j0, int nc, float *st)
{
    int Lk = a->Lk, jend = j0 + nc < Lk ? j0 + nc : Lk, nr = tq->nr, g, i, j;
    if (j0 >= Lk) return;               /* appended keys are never masked */
    for (g = 0; g < tq->ng; ++g) {
        int h = tq->gh0 + g, c0 = g * nr;
        if (a->alibi) {                 /* + slope_h (j - i') */
            float slope = a->slopes ? a->slopes[h] : mha__alibi_slope(a->H, h);
            for (j = j0; j < jend; ++j)
                for (i = 0; i < nr; ++i)
                    MHA__ST(st, nc, j - j0, c0 + i) +=
                        slope * (float)((ptrdiff_t)j - (ptrdiff_t)(tq->gi + i) - a->causal_off);
        }
        if (a->attn_mask) {
            const mha_mask *m = a->attn_mask;
            for (i = 0; i < nr; ++i) {
                size_t row = (m->ndim == 2) ? (size_t)(tq->gi + i)
                                            : ((size_t)tq->gb * a->H + h) * a->Lq + tq->gi + i;
                if (m->kind == MHA_MASK_FLOAT) {
                    const float *fm = MHA__CAST(const float *, m->data) + row * Lk;
                    for (j = j0; j < jend; ++j) {
                        float *s = &MHA__ST(st, nc, j - j0, c0 + i);
                        *s = (fm[j] == -INFINITY) ? -INFINITY : *s + fm[j];
                    }
                } else {
                    const unsigned char *u = MHA__CAST(const unsigned char *, m->data) + row * Lk;
                    for (j = j0; j < jend; ++j)
                        if (mha__mask_bool_blocks(m->kind, u[j])) MHA__ST(st, nc, j - j0, c0 + i) = -INFINITY;
                }
            }
        }
    }
    if (a->kpm) {                       /* one decision per key: a whole row of st */
        const mha_mask *m = a->kpm;
        int ncol = tq->ng * nr;
        for (j = j0; j < jend; ++j) {
            float add = 0.0f;
            int blocked;
            if (m->kind == MHA_MASK_FLOAT) {
                add = MHA__CAST(const float *, m->data)[(size_t)tq->gb * Lk + j];
                blocked = add == -INFINITY;
            } else {
                blocked = mha__mask_bool_blocks(m->kind, MHA__CAST(const unsigned char *, m->data)[(size_t)tq->gb * Lk + j]);
            }
            if (blocked) for (i = 0; i < ncol; ++i) MHA__ST(st, nc, j - j0, i) = -INFINITY;
            else if (add != 0.0f)       /* keys the attention mask blocked stay -inf */
                for (i = 0; i < ncol; ++i)
                    if (MHA__ST(st, nc, j - j0, i) != -INFINITY) MHA__ST(st, nc, j - j0, i) += add;
        }
    }
    if (mha__limits(a) && Lk < (1 << 24)) {
        /* causal and window, a vector of columns at a time: column c keeps
           key j iff lo_c <= j <= hi_c (floats: exact below 2^24 keys).  The
           lanes past the tile's columns keep every key (their scores stay 0). */
        float lo[MHA__FBR], hi[MHA__FBR];
        int ncol = tq->ng * nr, nrp = (ncol + MHA__NR - 1) / MHA__NR * MHA__NR;
        for (i = 0; i < nrp; ++i) {
            ptrdiff_t l = 0, h = Lk;
            if (i < ncol) mha__key_range(a, tq->gi + i % nr, &l, &h);
            lo[i] = l > Lk ? (float)Lk : (float)l;      /* l >= 0 */
            hi[i] = h < -1 ? -1.0f : (float)h;          /* h <= Lk - 1 */
        }
        for (j = j0; j < jend; ++j) {
            const mha__vf vj = mha__vset1((float)j), ninf = mha__vset1(-INFINITY);
            for (i = 0; i < nrp; i += MHA__VW) {
                float *s = &MHA__ST(st, nc, j - j0, i);
                mha__vf x = mha__vload(s);
                x = mha__vsel(mha__vlt(vj, mha__vload(lo + i)), ninf, x);
                mha__vstore(s, mha__vsel(mha__vgt(vj, mha__vload(hi + i)), ninf, x));
            }
        }
    } else if (mha__limits(a)) {        /* causal and window: keys outside [lo, hi] of row i */
        for (i = 0; i < nr; ++i) {
            ptrdiff_t lo, hi;
            mha__key_range(a, tq->gi + i, &lo, &hi);
            for (j = j0; j < jend; ++j)
                if ((ptrdiff_t)j < lo || (ptrdiff_t)j > hi)
                    for (g = 0; g < tq->ng; ++g) MHA__ST(st, nc, j - j0, g * nr + i) = -INFINITY;
        }
    }
}

/* Row statistics over one masked score tile (nc keys, nvp columns of st),
   before step 3 of mha__attend_fused moves m.  Per column, with
   m' = max(m, max_j s_j) as step 3 computes it:
       t' = exp(m - m') (t + ld (m - m')) + sum_j exp(s_j - m') (s_j - m')
       ld' = exp(m - m') ld + sum_j exp(s_j - m')        (step 3's l, in double)
       km' = max(km, max_j s_j);   s0 = s of key 0 when the tile starts at it
   (mha__put_row turns them into the statistics).  s_j - m' is clamped at
   MHA__EXP_ZERO, where exp is exactly 0, so a blocked key adds 0, not NaN.
   Not called when no statistics are wanted: the tile loop pays one test.  */
static MHA__NOINLINE void mha__fused_stats_tile(int nc, int nvp, int key0, const float *st,
                                                const float *m, mha__racc *ra)
{
    int i, p, u;
    const mha__vf floor_ = mha__vset1(MHA__EXP_ZERO);
    for (i = 0; i < nvp; i += MHA__VW) {
        const float *col = st + (size_t)(i / MHA__NR) * MHA__NR * nc + i % MHA__NR;
        mha__vf vmax = mha__vset1(-INFINITY), mref, acc = mha__vzero(), el = mha__vzero();
        float mx[MHA__VW], mr[MHA__VW], sum[MHA__VW], esum[MHA__VW];
        for (p = 0; p < nc; ++p) vmax = mha__vmax(vmax, mha__vload(col + (size_t)p * MHA__NR));
        mref = mha__vmax(mha__vload(m + i), vmax);
        mref = mha__vsel(mha__vgt(mref, mha__vset1(-INFINITY)), mref, mha__vzero());
        for (p = 0; p < nc; ++p) {
            mha__vf x = mha__vmax(floor_, mha__vsub(mha__vload(col + (size_t)p * MHA__NR), mref));
            mha__vf e = mha__vexp_nonpos(x);
            acc = mha__vfma(acc, e, x);
            el = mha__vadd(el, e);
        }
        mha__vstore(mx, vmax); mha__vstore(mr, mref); mha__vstore(sum, acc); mha__vstore(esum, el);
        for (u = 0; u < MHA__VW; ++u) {
            mha__racc *r = ra + i + u;
            double dm = (double)m[i + u] - mr[u], c;    /* ld = t = 0 while m = -inf */
            c = r->ld != 0.0 ? exp(dm) : 0.0;
            r->t = (c != 0.0 ? c * (r->t + r->ld * dm) : 0.0) + sum[u];
            r->ld = c * r->ld + esum[u];
            if (mx[u] > r->km) r->km = mx[u];
            if (key0) r->s0 = col[u];
        }
    }
}

/* The columns of query tile tq of (b, local KV head kvh) against its packed
   keys, shared (not read on the narrow path); sc: the tile buffers.  With
   tq->partial the item covers key tiles t_lo..t_hi-1 only and leaves its
   unnormalised O, m and l there for mha__merge_partials.  */
static void mha__attend_fused(const mha__attn *a, const mha__fused_dims *f, int b, int kvh,
                              const mha__tileq *tq, const float *shared, float *sc)
{
    const float *k = a->k.p + (size_t)b * a->k.bs + (size_t)kvh * a->k.hs;
    const float *v = a->v.p + (size_t)b * a->v.bs + (size_t)kvh * a->v.hs;
    const float *pv = shared, *flags = pv ? pv + (size_t)f->ntiles * f->v_tile : NULL;
    int Dv = a->Dv, D = a->D, Lk = a->Lk, nr = tq->nr, gi = tq->gi, narrow = tq->narrow;
    int ncol = tq->ng * nr;                                 /* tile columns */
    int nrp = (ncol + MHA__NR - 1) / MHA__NR * MHA__NR;     /* whole slivers */
    int nvp = (ncol + MHA__VW - 1) / MHA__VW * MHA__VW;     /* whole vectors */
    int masked = a->attn_mask || a->kpm || a->alibi, t, t_begin, t_end, c, i, j, p, d;
    ptrdiff_t lo_first, hi_first, lo_last, hi_last;
    float *qt = sc;
    float *st = qt + mha__round_floats((size_t)MHA__FBR * D);
    float *ot = st + mha__round_floats((size_t)MHA__FBC * MHA__FBR);
    float *m = ot + mha__round_floats(f->dvp * MHA__FBR);
    float *l = m + mha__round_floats(MHA__FBR);
    float *kedge = l + mha__round_floats(MHA__FBR);
    mha__racc *ra = (mha__racc *)(void *)(kedge + mha__round_floats((size_t)MHA__MR * D));
    const float *qrow[MHA__NARROW];
    const size_t ldo = MHA__FBR;
    /* O^T column c, feature d: ot[d * ldo + c]; narrow: row c, ot[c * Dv + d] */
#define MHA__OT(c, d) (narrow ? ot + (size_t)(c) * Dv + (d) : ot + (size_t)(d) * ldo + (c))
#define MHA__QROW(c) (a->q.p + (size_t)b * a->q.bs + (size_t)(tq->gh0 + (c) / nr - a->h0) * a->q.hs + \
                      (size_t)(gi + (c) % nr - a->q0) * a->q.rs)
#define MHA__OROW(c) (a->o + (size_t)b * a->o_bs + (size_t)(tq->gh0 + (c) / nr - a->h0) * a->o_hs + \
                      (size_t)(gi + (c) % nr - a->q0) * a->o_rs)

    /* Q^T as NR slivers (zero-padded past ncol), or the rows in place when
       narrow; O^T = 0; m = sink, l = 1 (the sink is a first key with score
       sink_h and a zero value), else m = -inf, l = 0 */
    MHA_PROFILE_MARK(MHA_PHASE_QPACK);
    if (narrow) {
        for (c = 0; c < ncol; ++c) qrow[c] = MHA__QROW(c);
    } else if (tq->ng == 1) {
        for (j = 0; j < nr; j += MHA__NR)
            mha__pack_b(1, MHA__QROW(0), a->q.rs, 0, D, j, nr - j < MHA__NR ? nr - j : MHA__NR,
                        qt + (size_t)j * D);
    } else {
        for (c = 0; c < nrp; ++c) {
            float *dst = qt + (size_t)(c / MHA__NR) * MHA__NR * D + c % MHA__NR;
            const float *qr = c < ncol ? MHA__QROW(c) : NULL;
            for (d = 0; d < D; ++d) dst[(size_t)d * MHA__NR] = qr ? qr[d] : 0.0f;
        }
    }
    for (c = 0; c < nrp; ++c) {
        int has_sink = a->sinks && c < ncol && a->sinks[tq->gh0 + c / nr] != -INFINITY &&
                       (!tq->partial || tq->t_lo == 0);     /* split-K: the first part has it */
        m[c] = has_sink ? a->sinks[tq->gh0 + c / nr] : -INFINITY;
        l[c] = has_sink ? 1.0f : 0.0f;
        ra[c].t = 0.0; ra[c].ld = l[c];          /* the sink adds exp(0) * 0 to t */
        ra[c].km = ra[c].s0 = -INFINITY;
    }
    memset(ot, 0, f->dvp * ldo * sizeof(float));
    memset(st, 0, (size_t)MHA__FBC * nrp * sizeof(float));   /* lanes past ncol stay finite */

    /* the real key tiles that some row may see (causal, window: the first
       row has the lowest limits, the last the highest), then the appended-keys tile */
    mha__key_range(a, gi, &lo_first, &hi_first);
    mha__key_range(a, gi + nr - 1, &lo_last, &hi_last);
    t_begin = (int)(lo_first / MHA__FBC);
    t_end = hi_last < lo_first ? 0 : (int)((hi_last + MHA__FBC) / MHA__FBC);
    if (tq->t_hi >= 0) {
        if (t_begin < tq->t_lo) t_begin = tq->t_lo;
        if (t_end > tq->t_hi) t_end = tq->t_hi;
    }
    for (t = 0; t < f->ntiles; ++t) {
        int appended = a->Lk_eff > Lk && t == f->ntiles - 1;
        int j0 = appended ? Lk : t * MHA__FBC;
        int nc = appended ? a->Lk_eff - Lk : (Lk - j0 < MHA__FBC ? Lk - j0 : MHA__FBC);
        if (appended ? tq->t_hi >= 0 && tq->t_hi < f->ntiles - (a->Lk_eff > Lk) : (t < t_begin || t >= t_end))
            continue;   /* (split-K: the appended keys belong to the last part) */

        /* 1. S^T = scale K_t Q^T, one NR-wide sliver of queries at a time;
              K's rows are read where they are (narrow: one dot product per
              key and column); soft-capped */
        MHA_PROFILE_MARK(MHA_PHASE_SCORES);
        if (narrow) {
            for (p = 0; p < nc; ++p) {
                const float *kr = k + (size_t)(j0 + p) * a->k.rs;
                for (c = 0; c < ncol; ++c) MHA__ST(st, nc, p, c) = a->scale * mha__dot(kr, qrow[c], D);
            }
        } else {
            for (j = 0; j < ncol; j += MHA__NR)
                mha__macro_kernel(nc, ncol - j < MHA__NR ? ncol - j : MHA__NR, D, a->scale, 0.0f,
                                  k + (size_t)j0 * a->k.rs, a->k.rs, kedge, qt + (size_t)j * D,
                                  st + (size_t)j * nc, MHA__NR);
        }
        if (a->softcap > 0.0f) mha__softcap(a->softcap, st, (size_t)nrp * nc);

        /* 2. masks and ALiBi; causal and window only where the tile is not
              wholly inside every row's key range */
        MHA_PROFILE_MARK(MHA_PHASE_MASK);
        if (!appended && (masked || (mha__limits(a) && (j0 < lo_last || j0 + nc - 1 > hi_first))))
            mha__mask_tile_t(a, tq, j0, nc, st);

        /* 3. online softmax, one vector of queries at a time, down the keys
              (lanes past the last whole vector of columns keep zero scores);
              the row statistics' pass first, while m is still the old max */
        MHA_PROFILE_MARK(MHA_PHASE_SOFTMAX);
        if (a->stats) mha__fused_stats_tile(nc, nvp, j0 == 0 && !appended, st, m, ra);
        for (i = 0; i < nvp; i += MHA__VW) {
            float *col = st + (size_t)(i / MHA__NR) * MHA__NR * nc + i % MHA__NR;
            mha__vf vmax = mha__vset1(-INFINITY), mold = mha__vload(m + i), mnew, mref, cc, sum = mha__vzero();
            for (p = 0; p < nc; ++p) vmax = mha__vmax(vmax, mha__vload(col + (size_t)p * MHA__NR));
            mnew = mha__vmax(mold, vmax);
            /* a query with no allowed key yet keeps m = -inf; exp against 0 then */
            mref = mha__vsel(mha__vgt(mnew, mha__vset1(-INFINITY)), mnew, mha__vzero());
            cc = mha__vexp_nonpos(mha__vsub(mold, mref));          /* exp(m - m'), 0 if m = -inf */
            for (p = 0; p < nc; ++p) {
                float *s = col + (size_t)p * MHA__NR;
                mha__vf e = mha__vexp_nonpos(mha__vsub(mha__vload(s), mref));
                mha__vstore(s, e);
                sum = mha__vadd(sum, e);
            }
            mha__vstore(l + i, mha__vfma(sum, mha__vload(l + i), cc));
            /* O^T *= c, unless c = 1 in every lane (no max moved); 1 - c is
               in [0, 1] and exact near 1, so its maximum is 0 just then */
            if (mha__vhmax(mha__vsub(mha__vset1(1.0f), cc)) != 0.0f) {
                if (narrow) {
                    float cl[MHA__VW];
                    int u;
                    mha__vstore(cl, cc);
                    for (u = 0; u < MHA__VW && i + u < ncol; ++u)
                        for (d = 0; d < Dv; ++d) *MHA__OT(i + u, d) *= cl[u];
                } else {
                    for (d = 0; d < Dv; ++d) {
                        float *o = ot + (size_t)d * ldo + i;
                        mha__vstore(o, mha__vmul(mha__vload(o), cc));
                    }
                }
            }
            mha__vstore(m + i, mnew);
        }

        /* 4. O^T += V_t^T P^T; a zero weight times a NaN/Inf value would be
           NaN, so the narrow path and a tile whose V is not finite sum
           nonzero weights only */
        MHA_PROFILE_MARK(MHA_PHASE_PV);
        if (narrow) {
            for (p = 0; p < nc; ++p) {
                const float *vr = v + (size_t)(j0 + p) * a->v.rs;
                for (c = 0; c < ncol; ++c) {
                    float w = MHA__ST(st, nc, p, c);
                    if (w != 0.0f) mha__axpy(MHA__OT(c, 0), w, vr, Dv);
                }
            }
        } else if (flags[t] != 0.0f) {
            mha__macro_kernel(Dv, ncol, nc, 1.0f, 1.0f, pv + (size_t)t * f->v_tile, 0, NULL, st, ot, ldo);
        } else {
            for (p = 0; p < nc; ++p) {
                const float *vr = v + (size_t)(j0 + p) * a->v.rs;
                for (c = 0; c < ncol; ++c) {
                    float w = MHA__ST(st, nc, p, c);
                    if (w != 0.0f) for (d = 0; d < Dv; ++d) ot[(size_t)d * ldo + c] += w * vr[d];
                }
            }
        }
    }

    /* 5. o = O / l; a row that met no allowed key (and no sink) has l = 0 and
          gets zeros; its log-sum-exp is m + log l (-inf then).  Split-K:
          O, m and l as they are, for the merge */
    MHA_PROFILE_MARK(MHA_PHASE_OUT);
    for (c = 0; c < ncol; ++c) {
        if (tq->partial) {
            float *pr = tq->partial + (size_t)c * MHA__PART_W(Dv);
            for (d = 0; d < Dv; ++d) pr[d] = *MHA__OT(c, d);
            pr[Dv] = m[c]; pr[Dv + 1] = l[c];
            memcpy(pr + Dv + 2, &ra[c], sizeof(mha__racc));
        } else {
            float *orow = MHA__OROW(c);
            float inv = l[c] != 0.0f ? 1.0f / l[c] : 0.0f;
            for (d = 0; d < Dv; ++d) orow[d] = *MHA__OT(c, d) * inv;
            if (a->lse || a->lse2 || a->stats)
                mha__put_row(a, ((size_t)tq->gb * a->H + tq->gh0 + c / nr) * a->Lq + gi + c % nr,
                             m[c], l[c], &ra[c]);
        }
    }
    MHA_PROFILE_MARK(MHA_PHASE_OTHER);
#undef MHA__OT
#undef MHA__QROW
#undef MHA__OROW
}

/* Split-K: the nparts partial results of tile tq (each [ncol][PART_W]: O,
   m, l, km, s0, t, ld) merged in part order into its output rows and lse:
       M = max_p m_p,  L = sum_p exp(m_p - M) l_p,  o = sum_p exp(m_p - M) O_p / L
       T = sum_p exp(m_p - M) (t_p + ld_p (m_p - M)),  LD like L,  km, s0: the largest  */
static void mha__merge_partials(const mha__attn *a, int b, const mha__tileq *tq, int nparts,
                                const float *parts, size_t part_floats)
{
    int nr = tq->nr, ncol = tq->ng * nr, c, p, d, Dv = a->Dv;
    size_t w = MHA__PART_W((size_t)Dv);
    for (c = 0; c < ncol; ++c) {
        float *orow = a->o + (size_t)b * a->o_bs + (size_t)(tq->gh0 + c / nr - a->h0) * a->o_hs +
                      (size_t)(tq->gi + c % nr - a->q0) * a->o_rs;
        float M = -INFINITY, L = 0.0f, inv;
        mha__racc R = { 0.0, 0.0, -INFINITY, -INFINITY }, rp;
        for (p = 0; p < nparts; ++p) {
            float mp = parts[(size_t)p * part_floats + (size_t)c * w + Dv];
            if (mp > M) M = mp;
        }
        for (d = 0; d < Dv; ++d) orow[d] = 0.0f;
        for (p = 0; p < nparts; ++p) {
            const float *pr = parts + (size_t)p * part_floats + (size_t)c * w;
            float e;
            if (pr[Dv + 1] == 0.0f) continue;            /* the part saw no allowed key */
            e = expf(pr[Dv] - M);
            L += e * pr[Dv + 1];
            mha__axpy(orow, e, pr, Dv);
            if (a->stats) {
                memcpy(&rp, pr + Dv + 2, sizeof rp);
                R.t += exp((double)pr[Dv] - M) * (rp.t + rp.ld * ((double)pr[Dv] - M));
                R.ld += exp((double)pr[Dv] - M) * rp.ld;
                if (rp.km > R.km) R.km = rp.km;
                if (rp.s0 > R.s0) R.s0 = rp.s0;
            }
        }
        inv = L != 0.0f ? 1.0f / L : 0.0f;
        for (d = 0; d < Dv; ++d) orow[d] *= inv;
        mha__put_row(a, ((size_t)tq->gb * a->H + tq->gh0 + c / nr) * a->Lq + tq->gi + c % nr,
                     M, L, &R);
    }
}

/* Split-K decoding.  A narrow item (a decode step: few query columns) whose
   tile is the only query tile of its head block has its keys split into
   parts of MHA__SPLIT_TILES key tiles (about 2048 keys), which the threads
   share out; the parts' partial results are then merged in part order
   (mha__merge_partials).  The split depends on Lk alone, never on the
   thread count, so neither does the result.  Returns the number of parts
   (1: no split).  */
#define MHA__SPLIT_TILES 16
static int mha__split_parts(int Lk, int narrow, int nqt)
{
    int real = (Lk + MHA__FBC - 1) / MHA__FBC;
    if (!narrow || nqt != 1) return 1;
    return (real + MHA__SPLIT_TILES - 1) / MHA__SPLIT_TILES;
}
/* floats of one part's partial result: FBR columns of MHA__PART_W(Dv) */
static size_t mha__part_floats(int Dv)
{
    return mha__round_floats((size_t)MHA__FBR * MHA__PART_W((size_t)Dv));
}

/* Scratch floats of one attention call.  Fused: per thread the tile
   buffers and, unless shared_pack, one (b, h)'s packed K and V; with
   shared_pack one packed K and V after the threads' parts.  Unfused: per
   thread a [mha__unfused_rows(Lq), Lk_eff] score block and GEMM packing.  */
static int mha__attn_scratch_floats(int Lq, int Lk, int Lk_eff, int D, int Dv, int nthreads,
                                    int need_weights, int shared_pack, size_t *per_thread,
                                    size_t *total)
{
    size_t s, g1, g2, g;
    if (need_weights) {
        int br = mha__unfused_rows(Lq);
        if (!mha__mul((size_t)br, (size_t)Lk_eff, &s)) return 0;
        s = mha__round_floats(s);
        g1 = mha__gemm_ws_floats(br, Lk_eff, D);
        g2 = mha__gemm_ws_floats(br, Dv, Lk_eff);
        g = g1 > g2 ? g1 : g2;
        if (!mha__add(s, g, per_thread) || !mha__add(*per_thread, 2 * MHA__ALIGN_FLOATS, per_thread))
            return 0;
        *per_thread = mha__round_floats(*per_thread);
        return mha__mul(*per_thread, (size_t)nthreads, total);
    } else {
        mha__fused_dims f;
        size_t parts;
        if (!mha__fused_sizes(Lk, Lk_eff, D, Dv, &f)) return 0;
        *per_thread = shared_pack ? f.tiles : f.tiles + f.packed;
        /* split-K partial results after the shared pack (mha__split_parts) */
        if (!mha__mul((size_t)mha__split_parts(Lk, 1, 1), mha__part_floats(Dv), &parts)) return 0;
        return mha__mul(*per_thread, (size_t)nthreads, total) &&
               mha__add(*total, shared_pack ? f.packed : 0, total) && mha__add(*total, parts, total);
    }
}

/* Fused work items take the query heads in blocks: up to gmax = min(G, FBR)
   heads of one KV group (G = H / Hkv), so one K tile and one packed V tile
   serve them all; a tile then holds FBR / gmax query rows of each.  The
   head-by-head forward (nh = 1) has blocks of one head.  Returns the number
   of blocks; block k is heads *gh0.. (global), *ng of them.  */
static int mha__head_blocks(const mha__attn *a, int *per_group, int *gmax)
{
    int G = a->nh == 1 ? 1 : a->group;
    *gmax = G < MHA__FBR ? G : MHA__FBR;
    *per_group = (G + *gmax - 1) / *gmax;
    return a->nh / G * *per_group;
}
static void mha__head_block(const mha__attn *a, int k, int per_group, int gmax, int *gh0, int *ng)
{
    int G = a->nh == 1 ? 1 : a->group, in = (k % per_group) * gmax;
    *gh0 = a->h0 + (k / per_group) * G + in;
    *ng = G - in < gmax ? G - in : gmax;
}

/* Run a validated call; ws holds the scratch of mha__attn_scratch_floats.
   Work items are independent, handed out dynamically, with no barrier but
   the final join (a barrier per head costs dearly when the cores are
   shared).  Unfused: (b, query tile), all heads inside, so the head average
   is summed head by head in a fixed order.  Fused: (b, h, query tile); a
   thread packs the keys and values of (b, h) into its own scratch when its
   previous item was another head (with dynamic scheduling that is about
   once per head and thread).  Fused with shared_pack (fewer heads than
   threads, where per-thread copies would cost memory and heads are few):
   per (b, h) the threads pack its key tiles into one buffer, then share out
   its query tiles.  Each thread takes its scratch by
   omp_get_thread_num().  What an item computes depends only on the item,
   never on which or how many threads run, so results are bit-identical
   for any thread count.  */
static void mha__attend_all(const mha__attn *a, float *ws, size_t per_thread)
{
    if (a->weights) {
        int br = mha__unfused_rows(a->Lq), nqt = (a->nq + br - 1) / br;
        long items = (long)a->nb * nqt, t;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(a->nthreads)
#endif
        for (t = 0; t < items; ++t) {
            int tid = 0, i0 = (int)(t % nqt) * br;
            int nr = a->nq - i0 < br ? a->nq - i0 : br;
            float *sc;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            sc = ws + (size_t)tid * per_thread;
            mha__attend_rows(a, (int)(t / nqt), i0, nr, sc, sc + mha__round_floats((size_t)nr * a->Lk_eff));
        }
    } else {
        mha__fused_dims f;
        int per_group, gmax, nblk = mha__head_blocks(a, &per_group, &gmax);
        int rows = MHA__FBR / gmax;                            /* query rows per tile */
        int nqt = (a->nq + rows - 1) / rows;
        int narrow = (a->nq < rows ? a->nq : rows) * gmax <= MHA__NARROW;
        int nparts = mha__split_parts(a->Lk, narrow, nqt);
        (void)mha__fused_sizes(a->Lk, a->Lk_eff, a->D, a->Dv, &f);   /* checked by the plan */
        if (nparts > 1) {
            /* per (b, head block): the threads share out the key parts, then one merges */
            size_t pf = mha__part_floats(a->Dv);
            float *parts = ws + (size_t)a->nthreads * per_thread + (a->shared_pack ? f.packed : 0);
            int nreal = (a->Lk + MHA__FBC - 1) / MHA__FBC;
#ifdef _OPENMP
#pragma omp parallel num_threads(a->nthreads)
#endif
            {
                int bk, pt, tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                for (bk = 0; bk < a->nb * nblk; ++bk) {
                    int b = bk / nblk;
                    mha__tileq tq;
                    mha__head_block(a, bk % nblk, per_group, gmax, &tq.gh0, &tq.ng);
                    tq.gb = a->b0 + b; tq.gi = a->q0; tq.nr = a->nq; tq.narrow = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                    for (pt = 0; pt < nparts; ++pt) {
                        mha__tileq q = tq;
                        q.t_lo = pt * MHA__SPLIT_TILES;
                        q.t_hi = q.t_lo + MHA__SPLIT_TILES < nreal ? q.t_lo + MHA__SPLIT_TILES : nreal;
                        q.partial = parts + (size_t)pt * pf;
                        mha__attend_fused(a, &f, b, mha__kvh(a, tq.gh0 - a->h0), &q, NULL,
                                          ws + (size_t)tid * per_thread);
                    }
#ifdef _OPENMP
#pragma omp single
#endif
                    mha__merge_partials(a, b, &tq, nparts, parts, pf);
                }
            }
        } else if (a->shared_pack) {
            float *shared = ws + (size_t)a->nthreads * per_thread;
#ifdef _OPENMP
#pragma omp parallel num_threads(a->nthreads)
#endif
            {
                int bk, t, tid = 0, kv_prev = -1;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                for (bk = 0; bk < a->nb * nblk; ++bk) {
                    int b = bk / nblk, kvh, kv_key;
                    mha__tileq tq;
                    mha__head_block(a, bk % nblk, per_group, gmax, &tq.gh0, &tq.ng);
                    kvh = mha__kvh(a, tq.gh0 - a->h0);
                    kv_key = b * a->Hkv + kvh;
                    tq.gb = a->b0 + b; tq.narrow = narrow; tq.t_lo = 0; tq.t_hi = -1; tq.partial = NULL;
                    if (kv_key != kv_prev && !narrow) {   /* the heads of a group share the packed V */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
                        for (t = 0; t < f.ntiles; ++t) mha__fused_pack(a, &f, b, kvh, t, shared);
                        kv_prev = kv_key;
                    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                    for (t = 0; t < nqt; ++t) {
                        mha__tileq q = tq;
                        q.gi = a->q0 + t * rows;
                        q.nr = a->nq - t * rows < rows ? a->nq - t * rows : rows;
                        mha__attend_fused(a, &f, b, kvh, &q, shared, ws + (size_t)tid * per_thread);
                    }
                }
            }
        } else {
            long t;
#ifdef _OPENMP
#pragma omp parallel num_threads(a->nthreads)
#endif
            {
                long packed = -1;
                int tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
#endif
                for (t = 0; t < (long)a->nb * nblk * nqt; ++t) {
                    long bk = t / nqt;
                    int b = (int)(bk / nblk), kvh, kt, i0 = (int)(t % nqt) * rows;
                    float *sc = ws + (size_t)tid * per_thread;
                    mha__tileq q;
                    mha__head_block(a, (int)(bk % nblk), per_group, gmax, &q.gh0, &q.ng);
                    kvh = mha__kvh(a, q.gh0 - a->h0);
                    q.gb = a->b0 + b; q.gi = a->q0 + i0;
                    q.nr = a->nq - i0 < rows ? a->nq - i0 : rows;
                    q.narrow = narrow; q.t_lo = 0; q.t_hi = -1; q.partial = NULL;
                    if ((long)b * a->Hkv + kvh != packed && !narrow) {
                        for (kt = 0; kt < f.ntiles; ++kt) mha__fused_pack(a, &f, b, kvh, kt, sc);
                        packed = (long)b * a->Hkv + kvh;
                    }
                    mha__attend_fused(a, &f, b, kvh, &q, sc, sc + f.packed);
                }
            }
        }
    }
}

/* ------------------------------------------------- validation helpers */

/* Mask data pointers are checked by each run (a plan may be made before the
   masks exist); kinds, shapes and the other options here, once per plan. */
static mha_status mha__check_mask_kind(const mha_mask *m)
{
    if (m->kind == MHA_MASK_NONE) return MHA_OK;
    if (m->kind != MHA_MASK_BOOL && m->kind != MHA_MASK_BOOL_KEEP && m->kind != MHA_MASK_FLOAT)
        return MHA_ERR_BAD_ENUM;
    return MHA_OK;
}

/* Every planner validates its options here, against the planned maxima. */
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
        return MHA_ERR_BAD_ENUM;
    if (!(opt->scale >= 0.0f) || opt->scale == INFINITY || opt->num_threads < 0)
        return MHA_ERR_INVALID_ARGUMENT;
    return MHA_OK;
}

/* The row outputs of a call: lse, and the statistics rs points to (NULL:
   none); rs->lse is written besides lse when they differ.  */
static void mha__attn_stats(mha__attn *a, float *lse, const mha_row_stats *rs)
{
    a->lse = lse ? lse : rs ? rs->lse : NULL;
    a->lse2 = lse && rs && rs->lse != lse ? rs->lse : NULL;
    a->ent = rs ? rs->entropy : NULL;
    a->maxw = rs ? rs->max_weight : NULL;
    a->first = rs ? rs->first_weight : NULL;
    a->stats = a->ent || a->maxw || a->first;
}

/* Fill the validated pieces shared by SDPA and the module. */
static void mha__attn_common(mha__attn *a, const mha_options *opt, int B, int H, int Lq, int Lk,
                             int Lk_eff, int D, int Dv)
{
    a->B = B; a->H = H; a->Lq = Lq; a->Lk = Lk; a->Lk_eff = Lk_eff; a->D = D; a->Dv = Dv;
    a->b0 = 0; a->nb = B; a->q0 = 0; a->nq = Lq; a->h0 = 0; a->nh = H; a->shared_pack = 0;
    a->scale = opt->scale > 0.0f ? opt->scale : 1.0f / sqrtf((float)D);
    a->attn_mask = opt->attn_mask.kind != MHA_MASK_NONE ? &opt->attn_mask : NULL;
    a->kpm = opt->key_padding_mask.kind != MHA_MASK_NONE ? &opt->key_padding_mask : NULL;
    a->causal = opt->causal != 0;
    a->causal_off = opt->causal_align == MHA_CAUSAL_BOTTOM_RIGHT ? (ptrdiff_t)Lk - Lq : 0;
    a->nthreads = mha__max_threads(opt);
    a->Hkv = opt->num_kv_heads > 0 ? opt->num_kv_heads : H;   /* the module sets its own */
    a->group = H / a->Hkv;
    a->window = opt->window != 0;
    a->win_left = opt->window_left; a->win_right = opt->window_right;
    a->softcap = opt->softcap;
    a->alibi = opt->alibi != 0; a->slopes = opt->alibi_slopes;
    a->sinks = opt->sinks;
    mha__attn_stats(a, opt->lse, opt->row_stats);
    a->sinks_grad = opt->sinks_grad;
}

/* RoPE settings: kind in the enum, rotary_dim even and <= D, theta >= 0 finite. */
static mha_status mha__check_rope(const mha_rope *r, int D)
{
    if (r->kind != MHA_ROPE_NONE && r->kind != MHA_ROPE_HALF && r->kind != MHA_ROPE_INTERLEAVED)
        return MHA_ERR_BAD_ENUM;
    if (r->rotary_dim < 0 || r->rotary_dim % 2 != 0 || r->rotary_dim > D) return MHA_ERR_INVALID_ARGUMENT;
    if (r->kind != MHA_ROPE_NONE && r->rotary_dim == 0 && D % 2 != 0) return MHA_ERR_INVALID_ARGUMENT;
    if (!(r->theta >= 0.0f) || r->theta == INFINITY) return MHA_ERR_INVALID_ARGUMENT;
    return MHA_OK;
}

/* The decoder options (checked where the masks are): the module's RoPE
   (rope NULL for SDPA); position_offset >= 0; Hkv divides H; window sides
   >= -1; softcap >= 0 and finite; caller slopes finite; sink logits finite
   or -inf.  Hkv: the KV heads in use (the module's, or opt's). */
static mha_status mha__check_decode(const mha_options *opt, int H, int Hkv, const mha_rope *rope, int D)
{
    int h;
    mha_status st;
    if (rope && (st = mha__check_rope(rope, D)) != MHA_OK) return st;
    if (opt->position_offset < 0) return MHA_ERR_INVALID_ARGUMENT;
    if (Hkv < 0) return MHA_ERR_INVALID_SIZE;
    if (Hkv == 0) Hkv = H;
    if (Hkv > H || H % Hkv != 0) return MHA_ERR_HEADS_DIVIDE;
    if (opt->window && (opt->window_left < -1 || opt->window_right < -1)) return MHA_ERR_INVALID_ARGUMENT;
    if (!(opt->softcap >= 0.0f) || opt->softcap == INFINITY) return MHA_ERR_INVALID_ARGUMENT;
    for (h = 0; opt->alibi && opt->alibi_slopes && h < H; ++h)
        if (!(opt->alibi_slopes[h] - opt->alibi_slopes[h] == 0.0f)) return MHA_ERR_INVALID_ARGUMENT;
    for (h = 0; opt->sinks && h < H; ++h)
        if (!(opt->sinks[h] < INFINITY)) return MHA_ERR_INVALID_ARGUMENT;   /* NaN, +inf */
    return MHA_OK;
}



MHADEF mha_status mha_alibi_slopes(int H, float *slopes)
{
    int h;
    if (!slopes) return MHA_ERR_NULL_POINTER;
    if (H <= 0) return MHA_ERR_INVALID_SIZE;
    for (h = 0; h < H; ++h) slopes[h] = mha__alibi_slope(H, h);
    return MHA_OK;
}


MHADEF mha_status mha_attn_merge(int nparts, size_t rows, int Dv, const float *const *outs,
                                 const float *const *lses, float *out, float *lse)
{
    size_t r;
    int p, d;
    if (!outs || !lses || !out) return MHA_ERR_NULL_POINTER;
    if (nparts <= 0 || Dv <= 0) return MHA_ERR_INVALID_SIZE;
    for (p = 0; p < nparts; ++p) if (!outs[p] || !lses[p]) return MHA_ERR_NULL_POINTER;
    for (r = 0; r < rows; ++r) {
        /* m = max_p lse_p;  lse = m + log sum_p exp(lse_p - m);  w_p = exp(lse_p - lse) */
        double m = -INFINITY, sum = 0.0, total;
        float *o = out + r * Dv;
        for (p = 0; p < nparts; ++p) if (lses[p][r] > m) m = lses[p][r];
        if (m == -INFINITY) {
            for (d = 0; d < Dv; ++d) o[d] = 0.0f;
            if (lse) lse[r] = -INFINITY;
            continue;
        }
        for (p = 0; p < nparts; ++p) sum += exp((double)lses[p][r] - m);
        total = m + log(sum);
        /* part 0 first, so out may be outs[0]; a part with weight 0 is skipped
           (its out is zeros or, with no key at all, never read) */
        for (p = 0; p < nparts; ++p) {
            const float *op = outs[p] + r * Dv;
            float w = (float)exp((double)lses[p][r] - total);
            if (p == 0) for (d = 0; d < Dv; ++d) o[d] = w != 0.0f ? w * op[d] : 0.0f;
            else if (w != 0.0f) for (d = 0; d < Dv; ++d) o[d] += w * op[d];
        }
        if (lse) lse[r] = (float)total;
    }
    return MHA_OK;
}

/* ------------------------------------------------------------- RoPE */

/* Rotate tokens in place: token t of batch b, head h at
   x + b*bs + t*ts + h*hs (D features), position positions[b*L + t] or
   pos0 + t; sign -1 turns backwards (the backward pass).  The angles of a
   token are made once, 64 pairs at a time, for all its heads.  */
static void mha__rope_apply(const mha_rope *r, int D, int B, int L, int nh, size_t bs, size_t ts,
                            size_t hs, int pos0, const int *positions, float sign, float *x)
{
    int R = r->rotary_dim ? r->rotary_dim : D, half = R / 2, b, t, h, m0, m;
    double lnb = log(r->theta > 0.0f ? (double)r->theta : 10000.0);
    float cs[64], sn[64];
    if (r->kind == MHA_ROPE_NONE) return;
    for (b = 0; b < B; ++b)
        for (t = 0; t < L; ++t) {
            double pos = positions ? positions[(size_t)b * L + t] : (double)pos0 + t;
            for (m0 = 0; m0 < half; m0 += 64) {
                int nm = half - m0 < 64 ? half - m0 : 64;
                for (m = 0; m < nm; ++m) {   /* angle = pos * theta^(-2m/R) */
                    double ang = pos * exp(-2.0 * (m0 + m) / R * lnb);
                    cs[m] = (float)cos(ang);
                    sn[m] = sign * (float)sin(ang);
                }
                for (h = 0; h < nh; ++h) {
                    float *xh = x + (size_t)b * bs + (size_t)t * ts + (size_t)h * hs;
                    /* pair m: (x[m], x[m + R/2]) half-split, (x[2m], x[2m+1]) interleaved */
                    float *pa = r->kind == MHA_ROPE_HALF ? xh + m0 : xh + 2 * m0;
                    float *pb = r->kind == MHA_ROPE_HALF ? xh + m0 + half : xh + 2 * m0 + 1;
                    int step = r->kind == MHA_ROPE_HALF ? 1 : 2;
                    for (m = 0; m < nm; ++m) {
                        float a = pa[m * step], bb = pb[m * step];
                        pa[m * step] = a * cs[m] - bb * sn[m];
                        pb[m * step] = bb * cs[m] + a * sn[m];
                    }
                }
            }
        }
}

/* The module's RoPE position of query 0: offset + i' at i = 0 (the alignment). */
static int mha__query_pos0(const mha_options *opt, int Lq, int Lk)
{
    int off = opt->causal_align == MHA_CAUSAL_BOTTOM_RIGHT ? Lk - Lq : 0;
    return opt->position_offset + (off > 0 ? off : 0);
}

static mha_status mha__rope_public(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                   const int *positions, float *x, float sign)
{
    mha_status st;
    size_t n, i;
    if (!rope || !x) return MHA_ERR_NULL_POINTER;
    if (B <= 0 || H <= 0 || L <= 0 || D <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul3((size_t)B * (size_t)H, (size_t)L, (size_t)D, &n) || !mha__mul(n, sizeof(float), &n))
        return MHA_ERR_OVERFLOW;
    if ((st = mha__check_rope(rope, D)) != MHA_OK) return st;
    if (pos0 < 0 || (!positions && pos0 > INT_MAX - L)) return MHA_ERR_INVALID_ARGUMENT;
    for (i = 0; positions && i < (size_t)B * L; ++i) if (positions[i] < 0) return MHA_ERR_INVALID_ARGUMENT;
    mha__rope_apply(rope, D, B, L, H, (size_t)H * L * D, (size_t)D, (size_t)L * D, pos0, positions, sign, x);
    return MHA_OK;
}

MHADEF mha_status mha_rope_forward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                   const int *positions, float *x)
{
    return mha__rope_public(rope, B, H, L, D, pos0, positions, x, 1.0f);
}

MHADEF mha_status mha_rope_backward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                    const int *positions, float *dx)
{
    return mha__rope_public(rope, B, H, L, D, pos0, positions, dx, -1.0f);
}


/* Whether n1 floats at a and n2 floats at b share memory. */
static int mha__overlap(const float *a, size_t n1, const float *b, size_t n2)
{
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    return pa < pb + n2 * sizeof(float) && pb < pa + n1 * sizeof(float);
}

/* The by-head path writes out from its first head on, and every head reads
   query, key and value again: each of the inputs x[0..2] (n[i] floats) that
   overlaps out (nout floats) is copied, and x[i] pointed at the copy.  An
   input given twice (self-attention) is copied once.  *copy: the one
   allocation, for the caller to free (NULL when nothing overlaps).  */
static mha_status mha__copy_aliased(const float *out, size_t nout, const float **x, const size_t *n,
                                    void **copy)
{
    size_t off[3], total = 0;
    int i, j, src[3];
    float *c;
    *copy = NULL;
    for (i = 0; i < 3; ++i) {
        src[i] = -1;   /* -1: read in place; i: copy it; j < i: share x[j]'s copy */
        if (!mha__overlap(out, nout, x[i], n[i])) continue;
        src[i] = i;
        for (j = 0; j < i; ++j) if (src[j] == j && x[j] == x[i] && n[j] == n[i]) src[i] = j;
        if (src[i] == i) { off[i] = total; total += n[i]; }
    }
    if (total == 0) return MHA_OK;
    *copy = MHA_MALLOC(total * sizeof(float));
    if (!*copy) return MHA_ERR_OUT_OF_MEMORY;
    c = MHA__CAST(float *, *copy);
    for (i = 0; i < 3; ++i)
        if (src[i] == i) memcpy(c + off[i], x[i], n[i] * sizeof(float));
    for (i = 0; i < 3; ++i)
        if (src[i] >= 0) x[i] = c + off[src[i]];
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

/* Backward of one (batch, head) with its whole Lq x Lk P and dP in memory:
   the readable definition, which the fused backward below (the one the
   calls use) is tested against (tests/test_fused_backward.c).
   Forward:   R = scale Q K^T;  S = cap tanh(R / cap) (softcap) + bias + mask;
              P = softmax_row(S, sink);   O = P V
   Backward, given dO:
     dV    = P^T dO                                   [Lk, Dv]
     dP    = dO V^T                                   [Lq, Lk]
     c_i   = sum_k P_ik dP_ik;   dS_ij = P_ij (dP_ij - c_i)   softmax Jacobian
     dR    = dS (1 - (S_cap / cap)^2)                 softcap (dR = dS without)
     dQ    = scale dR K                               [Lq, D]
     dK    = scale dR^T Q                             [Lk, D]
     dsink = -sum_i P_sink,i c_i,  P_sink,i = exp(sink - lse_i)  (no value: dP = 0)
   With GQA, K, V, dK and dV are those of head h's KV head.  dout is strided
   like the output (a->o_*), dq/dk/dv like q/k/v; the gradients are added to.
   When a->o is set, O is written there (the module needs it for the output
   projection's weight gradient).
   p, dp: Lq * Lk_eff floats each; capped: Lq * Lk_eff floats (softcap only);
   psink: Lq floats; gws: GEMM workspace.  */
static MHA__UNUSED void mha__attend_head_backward(const mha__attn *a, int b, int h, const float *dout,
                                      float *dq, float *dk, float *dv,
                                      float *p, float *dp, float *capped, float *psink, float *gws)
{
    size_t qo = (size_t)b * a->q.bs + (size_t)h * a->q.hs;
    size_t ko = (size_t)b * a->k.bs + (size_t)mha__kvh(a, h) * a->k.hs;
    size_t vo = (size_t)b * a->v.bs + (size_t)mha__kvh(a, h) * a->v.hs;
    size_t oo = (size_t)b * a->o_bs + (size_t)h * a->o_hs;
    const float *qh = a->q.p + qo, *kh = a->k.p + ko, *vh = a->v.p + vo, *doh = dout + oo;
    int Lq = a->Lq, Lk = a->Lk_eff, D = a->D, Dv = a->Dv, i, j;
    float sink = a->sinks ? a->sinks[h] : -INFINITY;
    size_t n = (size_t)Lq * Lk, t;

    /* 1. recompute P: S = scale Q K^T, soft-cap (kept), mask, softmax row by row */
    mha__gemm(0, 1, Lq, Lk, D, a->scale, qh, a->q.rs, kh, a->k.rs, 0.0f, p, (size_t)Lk, gws);
    if (a->softcap > 0.0f) {
        mha__softcap(a->softcap, p, n);
        memcpy(capped, p, n * sizeof(float));
    }
    for (i = 0; i < Lq; ++i) {
        float *row = p + (size_t)i * Lk, lse;
        mha__mask_cols(a, b, h, i, 0, Lk, row);
        lse = mha__softmax_row_lse(row, Lk, sink);
        psink[i] = sink == -INFINITY ? 0.0f : expf(sink - lse);
    }

    /* 2. O = P V, when the caller wants it */
    if (a->o)
        mha__gemm(0, 0, Lq, Dv, Lk, 1.0f, p, (size_t)Lk, vh, a->v.rs, 0.0f,
                  a->o + oo, a->o_rs, gws);

    /* 3. dV += P^T dO */
    if (dv)
        mha__gemm(1, 0, Lk, Dv, Lq, 1.0f, p, (size_t)Lk, doh, a->o_rs, 1.0f,
                  dv + vo, a->v.rs, gws);
    if (!dq && !dk && !a->sinks_grad) return;

    /* 4. dP = dO V^T, then through the softmax: dS = P * (dP - rowsum(P * dP)).
       A blocked key has P = 0, so it gets dS = 0 and passes no gradient on. */
    mha__gemm(0, 1, Lq, Lk, Dv, 1.0f, doh, a->o_rs, vh, a->v.rs, 0.0f, dp, (size_t)Lk, gws);
    for (i = 0; i < Lq; ++i) {
        const float *pi = p + (size_t)i * Lk;
        float *di = dp + (size_t)i * Lk;
        double c = 0.0;
        for (j = 0; j < Lk; ++j) if (pi[j] != 0.0f) c += (double)pi[j] * di[j];
        for (j = 0; j < Lk; ++j) di[j] = pi[j] == 0.0f ? 0.0f : pi[j] * (di[j] - (float)c);
        if (a->sinks_grad) a->sinks_grad[h] -= psink[i] * (float)c;
    }
    if (a->softcap > 0.0f) {            /* d cap tanh(r / cap) / dr = 1 - tanh^2 */
        float inv = 1.0f / a->softcap;
        for (t = 0; t < n; ++t) dp[t] *= 1.0f - (capped[t] * inv) * (capped[t] * inv);
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

/* ---- fused backward (FlashAttention-2): no Lq x Lk buffer

   Per (b, h) and query tile Q_t of FBWR rows, against key tiles K_j, V_j of
   FBWC keys (tiles outside every row's causal / window range are skipped):
     pass 1 (the forward, online softmax, as in the fused forward):
         m, l, O over the key tiles; then with the sink
         lse_i = log(sum_j exp(s_ij) + exp(sink)),  O_i = sum_j P_ij V_j
         delta_i = dO_i . O_i  ( = sum_j P_ij dP_ij, the softmax's row term)
         dsink  -= exp(sink - lse_i) delta_i
     pass 2, per key tile, P recomputed exactly from the log-sum-exp:
         P   = exp(S - lse)                  (a blocked key: S = -inf, P = 0)
         dV_j += P^T dO_t
         dP  = dO_t V_j^T
         dS  = P (dP - delta)   (0 where P = 0, so a blocked key's NaN in V
               never passes)    then x (1 - (S_cap / cap)^2) with softcap
         dQ_t += scale dS K_j   (a NaN K row of a blocked key is skipped)
         dK_j += scale dS^T Q_t
   Work items are (b, KV head): the item runs the heads of its group in
   order, so dK and dV of a KV head are summed over its query heads and
   tiles in one fixed order, and dQ of each head is written by one item
   only.  The sink gradient is summed per (b, h) into sinkp and then over b
   in order.  No atomics, nothing depends on the thread: results are
   bit-identical for any thread count.  */
#ifndef MHA__FBWR
#define MHA__FBWR 64    /* 128: 5% fewer instructions without a mask, 12% more causal
                                 (callgrind, docs/performance.md) */
#endif
#ifndef MHA__FBWC
#define MHA__FBWC 64
#endif

/* p_j = exp(s_j - m) for n scores in place; returns their sum. */
static float mha__exp_shift(float *s, int n, float m)
{
    const mha__vf vm = mha__vset1(m);
    mha__vf vsum = mha__vzero();
    float tail[MHA__VW];
    int i = 0, t, nt = n % MHA__VW;
    for (; i + MHA__VW <= n; i += MHA__VW) {
        mha__vf e = mha__vexp_nonpos(mha__vsub(mha__vload(s + i), vm));
        mha__vstore(s + i, e);
        vsum = mha__vadd(vsum, e);
    }
    if (nt) {
        for (t = 0; t < MHA__VW; ++t) tail[t] = t < nt ? s[i + t] : -INFINITY;
        mha__vstore(tail, mha__vexp_nonpos(mha__vsub(mha__vload(tail), vm)));
        for (t = 0; t < nt; ++t) s[i + t] = tail[t];
        vsum = mha__vadd(vsum, mha__vload(tail));
    }
    return mha__vhsum(vsum);
}

/* Scratch floats of one thread of the fused backward: the tiles, then the
   finite flags of the item's key tiles (K and V), then GEMM packing. */
static size_t mha__fbwd_thread_floats(int Lq, int Lk, int D, int Dv)
{
    int br = mha__imin(MHA__FBWR, Lq), bc = mha__imin(MHA__FBWC, Lk);
    size_t tile = mha__round_floats((size_t)br * bc);
    return 3 * tile + mha__round_floats((size_t)br * Dv) + 4 * mha__round_floats((size_t)br) +
           mha__round_floats(2 * (size_t)((Lk + bc - 1) / bc)) +
           mha__round_floats(mha__head_backward_gws(br, bc, D, Dv));
}
static size_t mha__fbwd_flags_at(int Lq, int Lk, int Dv)
{
    int br = mha__imin(MHA__FBWR, Lq), bc = mha__imin(MHA__FBWC, Lk);
    return 3 * mha__round_floats((size_t)br * bc) + mha__round_floats((size_t)br * Dv) +
           4 * mha__round_floats((size_t)br);
}
/* ... and of a call on nthreads threads: one scratch per thread that can
   get an item, then the sink partial sums [B, H]. */
static size_t mha__fbwd_floats(int B, int H, int Hkv, int Lq, int Lk, int D, int Dv, int nthreads)
{
    size_t items = (size_t)B * Hkv, nt = nthreads < 1 ? 1 : (size_t)nthreads;
    if (Lq <= 0 || Lk <= 0) return mha__round_floats((size_t)B * H);
    return (items < nt ? items : nt) * mha__fbwd_thread_floats(Lq, Lk, D, Dv) +
           mha__round_floats((size_t)B * H);
}

/* S = scale Q_t K_j^T [br, bc], capped (kept in cap), masked */
static void mha__fbwd_scores(const mha__attn *a, int b, int h, int i0, int br, int j0, int bc,
                             const float *qt, const float *kj, float *s, float *cap, float *gws)
{
    int r;
    mha__gemm(0, 1, br, bc, a->D, a->scale, qt, a->q.rs, kj, a->k.rs, 0.0f, s, (size_t)bc, gws);
    if (a->softcap > 0.0f) {
        mha__softcap(a->softcap, s, (size_t)br * bc);
        if (cap) memcpy(cap, s, (size_t)br * bc * sizeof(float));
    }
    for (r = 0; r < br; ++r) mha__mask_cols(a, b, h, i0 + r, j0, bc, s + (size_t)r * bc);
}

/* Is key tile [j0, j0+bc) outside the causal / window range of rows i0..i1? */
static int mha__fbwd_skip(const mha__attn *a, int i0, int i1, int j0, int bc)
{
    ptrdiff_t lo, hi, l2, h2;
    if (!mha__limits(a) || j0 + bc > a->Lk) return 0;   /* appended keys are never blocked */
    mha__key_range(a, i0, &lo, &h2);                    /* lo and hi grow with the row */
    mha__key_range(a, i1, &l2, &hi);
    return j0 + bc - 1 < lo || j0 > hi;
}

/* Query tile rows i0..i0+br of head h in batch b (see above).  lse_in:
   NULL, or the forward's log-sum-exp of these rows, with their O in a->o:
   pass 1 then only forms delta from them (a saved forward). */
static void mha__fbwd_tile(const mha__attn *a, int b, int h, int i0, int br, const float *dout,
                           const float *lse_in, float *dq, float *dk, float *dv, float *sinkp,
                           float *ws)
{
    const int Lk = a->Lk_eff, D = a->D, Dv = a->Dv, bcm = mha__imin(MHA__FBWC, Lk);
    const int brm = mha__imin(MHA__FBWR, a->Lq);
    const size_t tile = mha__round_floats((size_t)brm * bcm);
    size_t qo = (size_t)b * a->q.bs + (size_t)h * a->q.hs + (size_t)i0 * a->q.rs;
    size_t ko = (size_t)b * a->k.bs + (size_t)mha__kvh(a, h) * a->k.hs;
    size_t vo = (size_t)b * a->v.bs + (size_t)mha__kvh(a, h) * a->v.hs;
    size_t oo = (size_t)b * a->o_bs + (size_t)h * a->o_hs + (size_t)i0 * a->o_rs;
    const float *qt = a->q.p + qo, *kh = a->k.p + ko, *vh = a->v.p + vo, *dot = dout + oo;
    float *s = ws, *dp = s + tile, *cap = dp + tile, *o = cap + tile;
    float *m = o + mha__round_floats((size_t)brm * Dv), *l = m + mha__round_floats((size_t)brm);
    float *lse = l + mha__round_floats((size_t)brm), *delta = lse + mha__round_floats((size_t)brm);
    const int ntk = (Lk + bcm - 1) / bcm;
    const float *kfin = delta + mha__round_floats((size_t)brm), *vfin = kfin + ntk;   /* per key tile */
    float *gws = delta + mha__round_floats((size_t)brm) + mha__round_floats(2 * (size_t)ntk);
    float sink = a->sinks ? a->sinks[h] : -INFINITY;
    int r, j0, bc, c;

    if (lse_in) {  /* pass 1 from the saved forward: delta_i = dO_i . O_i, the sink's share */
        for (r = 0; r < br; ++r) {
            const float *orow = a->o + oo + (size_t)r * a->o_rs, *dor = dot + (size_t)r * a->o_rs;
            double d = 0.0;
            for (c = 0; c < Dv; ++c) d += (double)dor[c] * orow[c];
            lse[r] = lse_in[r];
            delta[r] = (float)d;
            if (sink != -INFINITY && lse[r] != -INFINITY) *sinkp -= expf(sink - lse[r]) * delta[r];
        }
    } else {       /* pass 1: m, l and O with the online softmax */
        for (r = 0; r < br; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
        memset(o, 0, (size_t)br * Dv * sizeof(float));
        for (j0 = 0; j0 < Lk; j0 += bc) {
            bc = mha__imin(bcm, Lk - j0);
            if (mha__fbwd_skip(a, i0, i0 + br - 1, j0, bc)) continue;
            mha__fbwd_scores(a, b, h, i0, br, j0, bc, qt, kh + (size_t)j0 * a->k.rs, s, NULL, gws);
            for (r = 0; r < br; ++r) {
                float *sr = s + (size_t)r * bc, mt = m[r], corr;
                for (c = 0; c < bc; ++c) if (sr[c] > mt) mt = sr[c];
                if (mt == -INFINITY) { memset(sr, 0, (size_t)bc * sizeof(float)); continue; }
                corr = m[r] == -INFINITY ? 0.0f : expf(m[r] - mt);
                l[r] = l[r] * corr + mha__exp_shift(sr, bc, mt);
                if (corr != 1.0f) for (c = 0; c < Dv; ++c) o[(size_t)r * Dv + c] *= corr;
                m[r] = mt;
            }
            if (vfin[j0 / bcm] != 0.0f)
                mha__gemm(0, 0, br, Dv, bc, 1.0f, s, (size_t)bc, vh + (size_t)j0 * a->v.rs, a->v.rs, 1.0f,
                          o, (size_t)Dv, gws);
            else
                mha__pv(br, bc, Dv, s, (size_t)bc, vh + (size_t)j0 * a->v.rs, a->v.rs, 1.0f, o,
                        (size_t)Dv, gws);
        }
        for (r = 0; r < br; ++r) {     /* the sink joins the sum; normalise; delta */
            float mm = m[r] > sink ? m[r] : sink, f, sum;
            float *orow = o + (size_t)r * Dv;
            const float *dor = dot + (size_t)r * a->o_rs;
            double d = 0.0;
            if (mm == -INFINITY) {     /* nothing allowed: P = 0, O = 0 */
                lse[r] = -INFINITY;
                f = 0.0f;
            } else {
                f = m[r] == -INFINITY ? 0.0f : expf(m[r] - mm);
                sum = l[r] * f + (sink == -INFINITY ? 0.0f : expf(sink - mm));
                lse[r] = mm + logf(sum);
                f /= sum;
            }
            for (c = 0; c < Dv; ++c) { orow[c] *= f; d += (double)dor[c] * orow[c]; }
            delta[r] = (float)d;
            if (a->o) memcpy(a->o + oo + (size_t)r * a->o_rs, orow, (size_t)Dv * sizeof(float));
            if (sink != -INFINITY && lse[r] != -INFINITY) *sinkp -= expf(sink - lse[r]) * delta[r];
        }
    }
    if (!dv && !dq && !dk) return;

    /* pass 2: P from the log-sum-exp, then the gradients tile by tile */
    for (j0 = 0; j0 < Lk; j0 += bc) {
        const float *kj = kh + (size_t)j0 * a->k.rs, *vj = vh + (size_t)j0 * a->v.rs;
        bc = mha__imin(bcm, Lk - j0);
        if (mha__fbwd_skip(a, i0, i0 + br - 1, j0, bc)) continue;
        mha__fbwd_scores(a, b, h, i0, br, j0, bc, qt, kj, s, cap, gws);
        for (r = 0; r < br; ++r) {
            float *sr = s + (size_t)r * bc;
            if (lse[r] == -INFINITY) memset(sr, 0, (size_t)bc * sizeof(float));
            else (void)mha__exp_shift(sr, bc, lse[r]);
        }
        if (dv)     /* dV_j += P^T dO_t */
            mha__gemm(1, 0, bc, Dv, br, 1.0f, s, (size_t)bc, dot, a->o_rs, 1.0f,
                      dv + vo + (size_t)j0 * a->v.rs, a->v.rs, gws);
        if (!dq && !dk) continue;
        /* dP = dO_t V_j^T;  dS = scale P (dP - delta) (x the softcap's derivative) */
        mha__gemm(0, 1, br, bc, Dv, 1.0f, dot, a->o_rs, vj, a->v.rs, 0.0f, dp, (size_t)bc, gws);
        for (r = 0; r < br; ++r) {
            const float *pr = s + (size_t)r * bc;
            float *dr = dp + (size_t)r * bc;
            for (c = 0; c < bc; ++c) dr[c] = pr[c] == 0.0f ? 0.0f : a->scale * pr[c] * (dr[c] - delta[r]);
            if (a->softcap > 0.0f) {   /* d cap tanh(x / cap) / dx = 1 - tanh^2 (P = 0: a NaN cap stays out) */
                const float inv = 1.0f / a->softcap, *cr = cap + (size_t)r * bc;
                for (c = 0; c < bc; ++c) if (pr[c] != 0.0f) dr[c] *= 1.0f - (cr[c] * inv) * (cr[c] * inv);
            }
        }
        if (dq && kfin[j0 / bcm] != 0.0f)   /* (a NaN K row of a blocked key: mha__pv skips it) */
            mha__gemm(0, 0, br, D, bc, 1.0f, dp, (size_t)bc, kj, a->k.rs, 1.0f, dq + qo, a->q.rs, gws);
        else if (dq)
            mha__pv(br, bc, D, dp, (size_t)bc, kj, a->k.rs, 1.0f, dq + qo, a->q.rs, gws);
        if (dk)
            mha__gemm(1, 0, bc, D, br, 1.0f, dp, (size_t)bc, qt, a->q.rs, 1.0f,
                      dk + ko + (size_t)j0 * a->k.rs, a->k.rs, gws);
    }
}

/* The fused backward of a dense (unsliced) call on a->nthreads threads:
   dq, dk, dv are added to (each may be NULL); a->sinks_grad[h] -= its sum.
   lse_saved NULL: the forward is recomputed and O written to a->o when set;
   else lse_saved [B, H, Lq] and O in a->o are the forward's (read only).
   ws: mha__fbwd_floats(...) floats. */
static void mha__attend_backward_fused(const mha__attn *a, const float *dout, const float *lse_saved,
                                       float *dq, float *dk, float *dv, float *ws)
{
    const int items = a->B * a->Hkv, nt = mha__imin(items, a->nthreads < 1 ? 1 : a->nthreads);
    const size_t per = mha__fbwd_thread_floats(a->Lq, a->Lk_eff, a->D, a->Dv);
    float *sinkp = ws + (size_t)nt * per;   /* thread t's scratch: ws + t per, t < nt */
    int it, b, h;
    if (a->Lq <= 0 || a->Lk_eff <= 0) return;
    for (it = 0; it < a->B * a->H; ++it) sinkp[it] = 0.0f;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
    for (it = 0; it < items; ++it) {
        int tid = 0, hh, i0, kvh = it % a->Hkv, bb = it / a->Hkv;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        {   /* which key tiles of this KV head have only finite K (V) rows, once per item */
            const int bcm = mha__imin(MHA__FBWC, a->Lk_eff), ntk = (a->Lk_eff + bcm - 1) / bcm;
            float *fin = ws + (size_t)tid * per + mha__fbwd_flags_at(a->Lq, a->Lk_eff, a->Dv);
            const float *kh = a->k.p + (size_t)bb * a->k.bs + (size_t)kvh * a->k.hs;
            const float *vh = a->v.p + (size_t)bb * a->v.bs + (size_t)kvh * a->v.hs;
            int t, j;
            for (t = 0; t < ntk; ++t) {
                int kf = 1, vf = 1;
                for (j = t * bcm; j < mha__imin((t + 1) * bcm, a->Lk_eff); ++j) {
                    kf = kf && mha__all_finite(kh + (size_t)j * a->k.rs, a->D);
                    vf = vf && mha__all_finite(vh + (size_t)j * a->v.rs, a->Dv);
                }
                fin[t] = (float)kf; fin[ntk + t] = (float)vf;
            }
        }
        for (hh = kvh * a->group; hh < (kvh + 1) * a->group; ++hh)
            for (i0 = 0; i0 < a->Lq; i0 += MHA__FBWR)
                mha__fbwd_tile(a, bb, hh, i0, mha__imin(MHA__FBWR, a->Lq - i0), dout,
                               lse_saved ? lse_saved + ((size_t)bb * a->H + hh) * a->Lq + i0 : NULL,
                               dq, dk, dv, sinkp + (size_t)bb * a->H + hh, ws + (size_t)tid * per);
    }
    if (a->sinks_grad)
        for (h = 0; h < a->H; ++h)
            for (b = 0; b < a->B; ++b) a->sinks_grad[h] += sinkp[(size_t)b * a->H + h];
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

/* =====================================================================
   PLANS
   A plan fixes once what every run of it shares: the shapes (B and the
   largest Lq, Lk), the options, the thread count, what the runs may ask for
   (weights, a backward) and, for a module, its weights resolved and maybe
   packed.  Making it validates everything and computes the exact
   workspace; a run then only checks its lengths against the plan and reads
   it, so one plan may run from many threads at once, each with its own
   workspace.  The one-shot calls (mha_sdpa, mha_forward, ...) make a plan
   on the stack and run it once.
   ===================================================================== */

/* ------------------------------------------------------ linear */

/* Y[rows, out] = X[rows, in] W^T + b  (nn.Linear; W [out, in] as PyTorch
   stores it, b [out] or NULL) on nthreads threads: the one Linear of the
   forward and backward passes.
   gws: mha__linear_gws(rows, in, out, nthreads) floats.
   pw: NULL, or W prepacked (mha__prepack_b of this whole W).
   X is read in place, not packed: an MR-row sliver of it (MR x KC floats)
   stays in L1 while it meets all out/NR slivers of W, and skipping its copy
   made the forward at L = 128..512, E = 512 2-5% faster (AVX-512, one
   thread, CPU time, alternating runs); the sums are those of a packed X.  */
static void mha__linear_pp(int rows, int in, int out, const float *X, const float *W,
                           const float *b, float *Y, float *gws, int nthreads, const float *pw)
{
    if (b) {
        int r;
        for (r = 0; r < rows; ++r) memcpy(Y + (size_t)r * out, b, (size_t)out * sizeof(float));
    }
    mha__gemm_mt_pp(0, 1, rows, out, in, 1.0f, X, (size_t)in, W, (size_t)in, b ? 1.0f : 0.0f,
                    Y, (size_t)out, gws, nthreads, pw, 1);
}
static void mha__linear(int rows, int in, int out, const float *X, const float *W,
                        const float *b, float *Y, float *gws, int nthreads)
{
    mha__linear_pp(rows, in, out, X, W, b, Y, gws, nthreads, NULL);
}

/* Backward of Y[rows, out] = X[rows, in] W^T + b   (W [out, in]):
     dX += dY W          [rows, in]
     dW += dY^T X        [out, in]
     db += sum_r dY[r]   [out]
   Any of dX, dW, db may be NULL.  */
static void mha__linear_backward(int rows, int in, int out, const float *X, const float *W,
                                 const float *dY, float *dX, float *dW, float *db, float *gws,
                                 int nthreads)
{
    if (dX)
        mha__gemm_mt(0, 0, rows, in, out, 1.0f, dY, (size_t)out, W, (size_t)in, 1.0f,
                     dX, (size_t)in, gws, nthreads);
    if (dW)
        mha__gemm_mt(1, 0, out, in, rows, 1.0f, dY, (size_t)out, X, (size_t)in, 1.0f,
                     dW, (size_t)in, gws, nthreads);
    if (db) {
        int r, j;
        for (r = 0; r < rows; ++r)
            for (j = 0; j < out; ++j) db[j] += dY[(size_t)r * out + j];
    }
}

/* GEMM workspace floats of a Linear's forward and backward products. */
static size_t mha__linear_gws(int rows, int in, int out, int nthreads)
{
    size_t g = mha__gemm_ws_floats_mt(rows, out, in, nthreads), t;
    t = mha__gemm_ws_floats_mt(rows, in, out, nthreads); if (t > g) g = t;
    t = mha__gemm_ws_floats_mt(out, in, rows, nthreads); if (t > g) g = t;
    return g;
}

/* K or V of every batch, Lk + extra rows each: X W^T + b for the Lk real
   keys, then the appended row app (bias_k or bias_v), then a zero row
   (add_zero_attn; zeros after the head split are one zero row before it),
   as nn.MultiheadAttention builds them.  width is E, or D for one head's
   columns (W, b and app then start at that head).  */
static void mha__kv_project(int B, int Lk, int in, int width, const float *X, const float *W,
                            const float *b, const float *app, int zero_row, float *Y, float *gws,
                            int nthreads, const float *pw)
{
    int extra = (app != NULL) + zero_row, bb;
    if (!extra) { mha__linear_pp(B * Lk, in, width, X, W, b, Y, gws, nthreads, pw); return; }
    for (bb = 0; bb < B; ++bb) {
        float *Yb = Y + (size_t)bb * (Lk + extra) * width;
        int r = Lk;
        mha__linear_pp(Lk, in, width, X + (size_t)bb * Lk * in, W, b, Yb, gws, nthreads, pw);
        if (app) memcpy(Yb + (size_t)r++ * width, app, (size_t)width * sizeof(float));
        if (zero_row) memset(Yb + (size_t)r * width, 0, (size_t)width * sizeof(float));
    }
}

/* ... and its backward: the real rows go through the Linear, the appended
   row's gradient is summed over the batches into dapp, the zero row has none. */
static void mha__kv_project_backward(int B, int Lk, int extra, int in, int E, const float *X,
                                     const float *W, const float *dY, float *dX, float *dW,
                                     float *db, float *dapp, float *gws, int nthreads)
{
    int bb;
    if (!extra) { mha__linear_backward(B * Lk, in, E, X, W, dY, dX, dW, db, gws, nthreads); return; }
    for (bb = 0; bb < B; ++bb) {
        const float *dYb = dY + (size_t)bb * (Lk + extra) * E;
        mha__linear_backward(Lk, in, E, X + (size_t)bb * Lk * in, W, dYb,
                             dX ? dX + (size_t)bb * Lk * in : NULL, dW, db, gws, nthreads);
        if (dapp) mha__axpy(dapp, 1.0f, dYb + (size_t)Lk * E, E);
    }
}

/* ------------------------------------------------------ the module */

/* A module after its checks, every weight resolved once: the projections
   whether they came from in_proj_* or q/k/v_proj_*, the appended keys, and
   the prepacked panels when there are some.  */
typedef struct mha__mod {
    int E, H, D, kdim, vdim;
    int Hkv, Ekv;                       /* KV heads (GQA) and their width Hkv * D */
    mha_rope rope;                      /* on Q and K after their projections */
    int extra;                          /* appended keys: (bias_k) + (add_zero_attn) */
    int in_proj;                        /* Wq, Wk, Wv are rows of in_proj_weight */
    const float *wq, *wk, *wv, *wo;     /* [E,E], [Ekv,kdim], [Ekv,vdim], [E,E] */
    const float *bq, *bk, *bv, *bo;     /* [E], [Ekv], [Ekv], [E], or NULL */
    const float *bias_k, *bias_v;       /* the appended key and value row, or NULL */
    int zero_attn;                      /* then a zero key and value */
    const float *pq, *pk, *pv, *po;     /* W^T panels (mha__prepack_b), or NULL: pack per GEMM */
    uint32_t values;                    /* mha__weights_sample when the panels were made */
} mha__mod;

static mha_status mha__check_module(const mha_module *m, mha__mod *r)
{
    size_t n;
    int E, widest;
    if (!m) return MHA_ERR_NULL_POINTER;
    if (m->embed_dim <= 0 || m->num_heads <= 0 || m->kdim < 0 || m->vdim < 0)
        return MHA_ERR_INVALID_SIZE;
    if (m->embed_dim % m->num_heads != 0) return MHA_ERR_HEADS_DIVIDE;
    memset(r, 0, sizeof *r);
    E = r->E = m->embed_dim; r->H = m->num_heads; r->D = E / r->H;
    r->kdim = m->kdim ? m->kdim : E;
    r->vdim = m->vdim ? m->vdim : E;
    if (!m->out_proj_weight) return MHA_ERR_NULL_POINTER;
    if (m->in_proj_weight) {
        if (r->kdim != E || r->vdim != E) return MHA_ERR_INVALID_ARGUMENT;
    } else if (!m->q_proj_weight || !m->k_proj_weight || !m->v_proj_weight) {
        return MHA_ERR_NULL_POINTER;
    }
    if ((m->bias_k == NULL) != (m->bias_v == NULL)) return MHA_ERR_INVALID_ARGUMENT;
    if (m->add_zero_attn != 0 && m->add_zero_attn != 1) return MHA_ERR_INVALID_ARGUMENT;
    if (!mha__dim_ok(E) || !mha__dim_ok(r->kdim) || !mha__dim_ok(r->vdim)) return MHA_ERR_OVERFLOW;
    /* the KV heads are checked with the options (mha__check_decode); here only
       what the weight offsets need */
    if (m->num_kv_heads < 0) return MHA_ERR_INVALID_SIZE;
    r->Hkv = m->num_kv_heads ? m->num_kv_heads : r->H;
    if (r->Hkv > r->H || r->H % r->Hkv != 0) return MHA_ERR_HEADS_DIVIDE;
    r->Ekv = r->Hkv * r->D;
    r->rope = m->rope;
    widest = r->kdim > r->vdim ? r->kdim : r->vdim;
    if (E > widest) widest = E;
    /* every weight's bytes, and a packed matrix's (at most (E + NR) x widest) */
    if (!mha__mul3((size_t)E + MHA__NR, (size_t)widest, 4 * sizeof(float), &n))
        return MHA_ERR_OVERFLOW;
    r->in_proj = m->in_proj_weight != NULL;
    if (r->in_proj) {
        r->wq = m->in_proj_weight;
        r->wk = r->wq + (size_t)E * E;
        r->wv = r->wk + (size_t)r->Ekv * E;
    } else {
        r->wq = m->q_proj_weight; r->wk = m->k_proj_weight; r->wv = m->v_proj_weight;
    }
    r->wo = m->out_proj_weight;
    r->bq = m->in_proj_bias;
    r->bk = r->bq ? r->bq + E : NULL;
    r->bv = r->bq ? r->bq + E + r->Ekv : NULL;
    r->bo = m->out_proj_bias;
    r->bias_k = m->bias_k; r->bias_v = m->bias_v;
    r->zero_attn = m->add_zero_attn;
    r->extra = (m->bias_k != NULL) + m->add_zero_attn;
    return MHA_OK;
}

/* ------------------------------------------------ prepacked weights */

/* The buffer of mha_module_pack: a header of MHA__PK_WORDS 32-bit words
   (64 bytes), then, from the first 64-byte boundary after it (the offset is
   stored, so a copy of the buffer at another address still works, only its
   loads may straddle cache lines), the four matrices prepacked as op(B) = W^T
   (mha__prepack_b): Wq [E, E], Wk [E, kdim], Wv [E, vdim], Wo [E, E], each
   starting on a 64-byte line relative to the data start.  The header names
   the module (shape, layout, where its weights live), the build (the
   kernel's NR, KC, NC) and holds a sample of the weight values.  */
#define MHA__PK_MAGIC   0x5041484du   /* "MHAP" in a little-endian dump */
#define MHA__PK_VERSION 2u
#define MHA__PK_WORDS   16
#define MHA__PK_BYTES   (MHA__PK_WORDS * 4)
enum { MHA__PK_W_MAGIC, MHA__PK_W_VERSION, MHA__PK_W_E, MHA__PK_W_H, MHA__PK_W_KDIM,
       MHA__PK_W_VDIM, MHA__PK_W_LAYOUT, MHA__PK_W_NR, MHA__PK_W_KC, MHA__PK_W_NC,
       MHA__PK_W_DATA, MHA__PK_W_WHERE, MHA__PK_W_VALUES, MHA__PK_W_CHECK };
#define MHA__PK_IN_PROJ  1u   /* Wq, Wk, Wv came from in_proj_weight */
#define MHA__PK_SEPARATE 2u   /* ... from q/k/v_proj_weight */

typedef struct mha__pack_layout {
    uint32_t hdr[MHA__PK_WORDS];     /* the header this module gets (DATA, VALUES left 0) */
    size_t wq, wk, wv, wo, floats;   /* float offsets from the data start, total floats */
} mha__pack_layout;

static uint32_t mha__fnv(uint32_t h, uint32_t w) { return (h ^ w) * 16777619u; }

/* FNV-1a over the words before CHECK: a torn or overwritten header fails. */
static uint32_t mha__pk_check(const uint32_t *w)
{
    uint32_t h = 2166136261u;
    int i;
    for (i = 0; i < MHA__PK_W_CHECK; ++i) h = mha__fnv(h, w[i]);
    return h;
}

/* Where the four weight matrices live: a pack made for another module's
   weights (or before they moved) is told apart from this module's. */
static uint32_t mha__weights_where(const mha__mod *r)
{
    const float *w[4];
    uint32_t h = 2166136261u;
    int i;
    w[0] = r->wq; w[1] = r->wk; w[2] = r->wv; w[3] = r->wo;
    for (i = 0; i < 4; ++i) {
        unsigned long long a = (unsigned long long)(uintptr_t)w[i];
        h = mha__fnv(mha__fnv(h, (uint32_t)a), (uint32_t)(a >> 16 >> 16));
    }
    return h;
}

/* A sample of the weight values: MHA__SAMPLES of each matrix, evenly spread
   (first and last included), their bits hashed.  Packed panels are a copy,
   so a weight update after packing (a training step changes every value)
   makes them stale; a sample catches that for a few cache lines per run.
   A change to a few values can go unseen: after editing weights by hand,
   pack or plan again.  */
#define MHA__SAMPLES 16
static uint32_t mha__weights_sample(const mha__mod *r)
{
    const float *w[4];
    size_t n[4];
    uint32_t h = 2166136261u, bits;
    int i, s;
    w[0] = r->wq; w[1] = r->wk; w[2] = r->wv; w[3] = r->wo;
    n[0] = n[3] = (size_t)r->E * r->E; n[1] = (size_t)r->Ekv * r->kdim; n[2] = (size_t)r->Ekv * r->vdim;
    for (i = 0; i < 4; ++i)
        for (s = 0; s < MHA__SAMPLES; ++s) {
            size_t at = (size_t)((unsigned long long)s * (n[i] - 1) / (MHA__SAMPLES - 1));
            memcpy(&bits, w[i] + at, sizeof bits);
            h = mha__fnv(h, bits);
        }
    return h;
}

static mha_status mha__pack_lay(const mha__mod *r, mha__pack_layout *P)
{
    size_t cur = 0;
    if (r->Hkv != r->H) return MHA_ERR_INVALID_ARGUMENT;   /* packs hold [E, .] projections */
    if (!mha__region(&cur, mha__prepacked_floats(r->E, r->E), &P->wq) ||
        !mha__region(&cur, mha__prepacked_floats(r->E, r->kdim), &P->wk) ||
        !mha__region(&cur, mha__prepacked_floats(r->E, r->vdim), &P->wv) ||
        !mha__region(&cur, mha__prepacked_floats(r->E, r->E), &P->wo))
        return MHA_ERR_OVERFLOW;
    P->floats = cur;
    memset(P->hdr, 0, sizeof P->hdr);
    P->hdr[MHA__PK_W_MAGIC] = MHA__PK_MAGIC;
    P->hdr[MHA__PK_W_VERSION] = MHA__PK_VERSION;
    P->hdr[MHA__PK_W_E] = (uint32_t)r->E;
    P->hdr[MHA__PK_W_H] = (uint32_t)r->H;
    P->hdr[MHA__PK_W_KDIM] = (uint32_t)r->kdim;
    P->hdr[MHA__PK_W_VDIM] = (uint32_t)r->vdim;
    P->hdr[MHA__PK_W_LAYOUT] = r->in_proj ? MHA__PK_IN_PROJ : MHA__PK_SEPARATE;
    P->hdr[MHA__PK_W_NR] = MHA__NR;
    P->hdr[MHA__PK_W_KC] = MHA__KC;
    P->hdr[MHA__PK_W_NC] = MHA__NC;
    P->hdr[MHA__PK_W_WHERE] = mha__weights_where(r);
    return MHA_OK;
}

/* Bytes of a pack: the header, up to 64 bytes to reach a line, the panels. */
static mha_status mha__pack_bytes(const mha__mod *r, mha__pack_layout *P, size_t *bytes)
{
    mha_status st;
    if ((st = mha__pack_lay(r, P)) != MHA_OK) return st;
    if (!mha__mul(P->floats, sizeof(float), bytes) || !mha__add(*bytes, 2 * MHA__PK_BYTES, bytes))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

/* Point r's panels into buf, a pack of P's layout. */
static void mha__pack_point(mha__mod *r, const mha__pack_layout *P, const void *buf, uint32_t data)
{
    const float *d = MHA__CAST(const float *, (const void *)(MHA__CAST(const char *, buf) + data));
    r->pq = d + P->wq; r->pk = d + P->wk; r->pv = d + P->wv; r->po = d + P->wo;
}

/* Write the pack of r into buf (aligned for float, mha__pack_bytes long) and
   point r's panels at it. */
static void mha__pack_write(mha__mod *r, mha__pack_layout *P, void *buf)
{
    uintptr_t data = (uintptr_t)buf + MHA__PK_BYTES;
    float *d;
    data += (64 - data % 64) % 64;
    d = MHA__CAST(float *, (void *)data);
    mha__prepack_b(r->wq, r->E, r->E, d + P->wq);
    mha__prepack_b(r->wk, r->E, r->kdim, d + P->wk);
    mha__prepack_b(r->wv, r->E, r->vdim, d + P->wv);
    mha__prepack_b(r->wo, r->E, r->E, d + P->wo);
    P->hdr[MHA__PK_W_DATA] = (uint32_t)(data - (uintptr_t)buf);
    P->hdr[MHA__PK_W_VALUES] = r->values = mha__weights_sample(r);
    P->hdr[MHA__PK_W_CHECK] = mha__pk_check(P->hdr);
    memcpy(buf, P->hdr, sizeof P->hdr);   /* memcpy: buf need not be aligned for uint32_t words */
    mha__pack_point(r, P, buf, P->hdr[MHA__PK_W_DATA]);
}

/* Use m->packed after checking that its header is the one this module and
   this build would write (else MHA_ERR_PACK_MISMATCH) and that the weights
   still match its sample (else MHA_ERR_STALE).  */
static mha_status mha__packed_use(mha__mod *r, const void *packed)
{
    mha__pack_layout P;
    uint32_t hdr[MHA__PK_WORDS];
    mha_status st;
    if (!packed) return MHA_OK;
    if ((uintptr_t)packed % sizeof(float) != 0) return MHA_ERR_MISALIGNED;
    if ((st = mha__pack_lay(r, &P)) != MHA_OK) return st;
    memcpy(hdr, packed, sizeof hdr);
    P.hdr[MHA__PK_W_DATA] = hdr[MHA__PK_W_DATA];
    P.hdr[MHA__PK_W_VALUES] = hdr[MHA__PK_W_VALUES];
    P.hdr[MHA__PK_W_CHECK] = mha__pk_check(P.hdr);
    if (memcmp(hdr, P.hdr, sizeof hdr) != 0 ||
        hdr[MHA__PK_W_DATA] < MHA__PK_BYTES || hdr[MHA__PK_W_DATA] >= 2 * MHA__PK_BYTES ||
        hdr[MHA__PK_W_DATA] % sizeof(float) != 0)
        return MHA_ERR_PACK_MISMATCH;
    r->values = hdr[MHA__PK_W_VALUES];
    if (mha__weights_sample(r) != r->values) return MHA_ERR_STALE;
    mha__pack_point(r, &P, packed, hdr[MHA__PK_W_DATA]);
    return MHA_OK;
}

MHADEF mha_status mha_module_pack_size(const mha_module *m, size_t *bytes)
{
    mha__mod r;
    mha__pack_layout P;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if ((st = mha__check_module(m, &r)) != MHA_OK) return st;
    return mha__pack_bytes(&r, &P, bytes);
}

MHADEF mha_status mha_module_pack(const mha_module *m, void *buf, size_t bytes)
{
    mha__mod r;
    mha__pack_layout P;
    mha_status st;
    size_t need;
    if (!buf) return MHA_ERR_NULL_POINTER;
    if ((st = mha__check_module(m, &r)) != MHA_OK) return st;
    if ((st = mha__pack_bytes(&r, &P, &need)) != MHA_OK) return st;
    if (bytes < need) return MHA_ERR_WORKSPACE_TOO_SMALL;
    if ((uintptr_t)buf % sizeof(float) != 0) return MHA_ERR_MISALIGNED;
    mha__pack_write(&r, &P, buf);
    return MHA_OK;
}

/* ------------------------------------------------ workspace layouts */

/* Each run lays its workspace out for its own lengths with the layout
   functions below, and its plan took the same functions at the planned
   maxima: every region grows with Lq and Lk, so a run never needs more than
   its plan said.  Offsets are in floats from the aligned start. */

/* The saved forward's header (magic, key): floats at the workspace's start
   (see "saved forward" below). */
#define MHA__SAVED_MAGIC 0x53415645444d4841ull   /* "AHMDEVAS" */
#define MHA__SAVED_HDR 16

/* The module forward.  Queries go through chunk_b batches x chunk_q rows
   at a time (mha__fwd_chunks); qp, kp, vp hold the projections, scratch the
   attention's per-thread buffers and the projection GEMMs' packing. */
typedef struct mha__fwd_layout {
    int chunk_b, chunk_q;
    size_t qp, kp, vp, scratch, per_thread, total_floats;
    size_t ctx, lse;            /* saves: the context and the lse (Q is then [B*Lq, E]) */
} mha__fwd_layout;

/* A training module plan's saved forward (p->saves), at the start of its
   workspace for the forward and the backward alike: the header, Q
   [B*Lq, E], K and V [B*Lke, Ekv] (after RoPE, appended rows included),
   the context C [B*Lq, E] and the lse [B, H, Lq].  */
static int mha__mod_saved_at(const mha__mod *r, int B, int Lq, int Lk, size_t *cur, size_t *qp,
                             size_t *kp, size_t *vp, size_t *ctx, size_t *lse)
{
    size_t hdr, nq = (size_t)B * Lq * r->E, nk = (size_t)B * (Lk + r->extra) * r->Ekv;
    return mha__region(cur, MHA__SAVED_HDR, &hdr) && mha__region(cur, nq, qp) &&
           mha__region(cur, nk, kp) && mha__region(cur, nk, vp) && mha__region(cur, nq, ctx) &&
           mha__region(cur, (size_t)B * r->H * Lq, lse);
}

/* Without weights, a forward whose Q, K and V would take at least this many
   floats (32 MiB) goes one head at a time: Q, K, V of one head, [B, L, D],
   and the output projection summed head by head,
       out = bo + sum_h O_h Wo[:, hD:(h+1)D]^T,
   so the workspace is about 3 B L D floats instead of 2 B L E.  The price is
   H narrower projection GEMMs (N = D), which long sequences do not notice:
   their time is in the attention, O(L^2).  A plan decides this once, from
   its maxima, so its shorter runs keep the path (and its rounding).  */
#ifndef MHA__BY_HEAD_FLOATS
#define MHA__BY_HEAD_FLOATS ((size_t)1 << 23)
#endif

/* Query rows per chunk of the fused forward: every key and value is needed by
   every query, but a query row is needed only while its chunk is projected,
   attended and projected out, so Q takes a chunk of rows, not [B, Lq, E].
   Each chunk packs the keys and values again, so chunks are long.  Chunks
   start at a multiple of the query tile, so they change no result.  */
#ifndef MHA__QCHUNK
#define MHA__QCHUNK 4096
#endif
static void mha__fwd_chunks(int B, int Lq, int need_weights, int *chunk_b, int *chunk_q)
{
    int rows = MHA__QCHUNK / MHA__FBR * MHA__FBR;
    if (rows < MHA__FBR) rows = MHA__FBR;
    if (need_weights) { *chunk_b = B; *chunk_q = Lq; return; }   /* weights are O(L^2) anyway */
    if (Lq >= rows) { *chunk_b = 1; *chunk_q = rows; return; }
    *chunk_q = Lq;
    *chunk_b = rows / Lq < B ? rows / Lq : B;
}

static int mha__fwd_layout_at(const mha__mod *r, int B, int Lq, int Lk, int weights, int by_head,
                              int nt, int saves, mha__fwd_layout *L)
{
    size_t cur = 0, scratch, g, g2;
    int Lke = Lk + r->extra, E = r->E, D = r->D, widest = r->kdim > r->vdim ? r->kdim : r->vdim;
    mha__fwd_chunks(B, Lq, weights, &L->chunk_b, &L->chunk_q);
    if (by_head && !weights) {
        g = mha__gemm_ws_floats_mt(B * Lq, D, E, nt);
        g2 = mha__gemm_ws_floats_mt(B * Lke, D, widest, nt); if (g2 > g) g = g2;
        g2 = mha__gemm_ws_floats_mt(B * Lq, E, D, nt);       if (g2 > g) g = g2;
        return mha__region(&cur, (size_t)B * Lq * D, &L->qp) &&
               mha__region(&cur, (size_t)B * Lke * D, &L->kp) &&
               mha__region(&cur, (size_t)B * Lke * D, &L->vp) &&
               mha__attn_scratch_floats(Lq, Lk, Lke, D, D, nt, 0, B < nt, &L->per_thread, &scratch) &&
               mha__region(&cur, scratch > g ? scratch : g, &L->scratch) &&
               mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
    }
    /* the projection GEMMs run on the scratch area too */
    g = mha__gemm_ws_floats_mt(B * Lq, E, E, nt);
    g2 = mha__gemm_ws_floats_mt(B * Lke, E, widest, nt); if (g2 > g) g = g2;
    L->ctx = L->lse = 0;
    if (saves)
        return mha__mod_saved_at(r, B, Lq, Lk, &cur, &L->qp, &L->kp, &L->vp, &L->ctx, &L->lse) &&
               mha__attn_scratch_floats(Lq, Lk, Lke, D, D, nt, weights, r->H < nt, &L->per_thread,
                                        &scratch) &&
               mha__region(&cur, scratch > g ? scratch : g, &L->scratch) &&
               mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
    return mha__region(&cur, (size_t)L->chunk_b * L->chunk_q * E, &L->qp) &&
           mha__region(&cur, (size_t)B * Lke * r->Ekv, &L->kp) &&
           mha__region(&cur, (size_t)B * Lke * r->Ekv, &L->vp) &&
           mha__attn_scratch_floats(Lq, Lk, Lke, D, D, nt, weights, r->H < nt, &L->per_thread,
                                    &scratch) &&
           mha__region(&cur, scratch > g ? scratch : g, &L->scratch) &&
           mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
}

/* The module backward.  K and V hold Lk + extra rows per batch. */
typedef struct mha__bwd_layout {
    size_t qp, kp, vp, ctx, lse, dctx, dqp, dkp, dvp, gws, total_floats;
} mha__bwd_layout;

/* gws: the projections' GEMM workspace, and the fused attention backward's
   scratch (the two are never in use at once). */
static int mha__bwd_layout_at(const mha__mod *r, int B, int Lq, int Lk, int nt, int saves,
                              mha__bwd_layout *L)
{
    size_t cur = 0, g, t, nq = (size_t)B * Lq * r->E, nk;
    int Lke = Lk + r->extra;
    nk = (size_t)B * Lke * r->Ekv;
    g = mha__linear_gws(B * Lq, r->E, r->E, nt);
    t = mha__linear_gws(B * Lk, r->kdim, r->E, nt);       if (t > g) g = t;
    t = mha__linear_gws(B * Lk, r->vdim, r->E, nt);       if (t > g) g = t;
    t = mha__fbwd_floats(B, r->H, r->Hkv, Lq, Lke, r->D, r->D, nt); if (t > g) g = t;
    L->lse = 0;
    return (saves ? mha__mod_saved_at(r, B, Lq, Lk, &cur, &L->qp, &L->kp, &L->vp, &L->ctx, &L->lse)
                  : mha__region(&cur, nq, &L->qp) && mha__region(&cur, nk, &L->kp) &&
                    mha__region(&cur, nk, &L->vp) && mha__region(&cur, nq, &L->ctx)) &&
           mha__region(&cur, nq, &L->dctx) && mha__region(&cur, nq, &L->dqp) &&
           mha__region(&cur, nk, &L->dkp) && mha__region(&cur, nk, &L->dvp) &&
           mha__region(&cur, g, &L->gws) && mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
}

/* SDPA forward (per-thread scratch) and backward (P and dP of one head). */
static int mha__sdpa_fwd_floats(int B, int H, int Lq, int Lk, int D, int Dv, int weights, int nt,
                                size_t *per_thread, size_t *total)
{
    return mha__attn_scratch_floats(Lq, Lk, Lk, D, Dv, nt, weights, (size_t)B * H < (size_t)nt,
                                    per_thread, total) &&
           mha__add(*total, MHA__ALIGN_FLOATS, total);
}
static int mha__sdpa_bwd_floats(int B, int H, int Hkv, int Lq, int Lk, int D, int Dv, int nt,
                                size_t *total)
{
    return mha__add(mha__fbwd_floats(B, H, Hkv, Lq, Lk, D, Dv, nt), MHA__ALIGN_FLOATS, total);
}
/* A training SDPA plan's saved forward, at the start of the workspace:
   header, lse [B, H, Lq], O [B, H, Lq, Dv]; the scratch follows. */
static int mha__sdpa_saved_floats(int B, int H, int Lq, int Dv, size_t *lse, size_t *o, size_t *total)
{
    size_t rows = (size_t)B * H * Lq, no;
    if (!mha__mul(rows, (size_t)Dv, &no)) return 0;
    *lse = MHA__SAVED_HDR;
    *o = *lse + mha__round_floats(rows);
    return mha__add(*o, mha__round_floats(no), total);
}

/* The encoder layer, N = B*L rows.  Training keeps every intermediate for
   the backward:
     a   [N,E] attention output          t1  [N,E] x + a (post) / LN1(x) (pre)
     h   [N,E] after the first residual  z   [N,F] linear1 output
     g   [N,F] act(z)                    t2  [N,E] h + f (post) / LN2(h) (pre)
     d1, d2 [N,E], dg [N,F]: backward only
   Inference keeps only a (then h in place) and runs the feed-forward block
   on MHA__FF_ROWS rows at a time: zc [rows,F], tc and fc [rows,E].
   sub: the self-attention's workspace (what its plan allows). */
#ifndef MHA__FF_ROWS
#define MHA__FF_ROWS 256
#endif
typedef struct mha__enc_layout {
    size_t hdr, a, t1, h, z, g, t2, d1, d2, dg, gws, sub, total_floats;   /* hdr: saved forward */
    size_t zc, tc, fc, rows;                /* inference */
} mha__enc_layout;

/* ------------------------------------------------------------ plans */

#define MHA__PLAN_MAGIC 0x4e4c504du   /* "MPLN" */
enum { MHA__PLAN_GEMM = 1, MHA__PLAN_SDPA, MHA__PLAN_MODULE, MHA__PLAN_ENCODER };

struct mha_plan {
    uint32_t magic;
    int kind;
    unsigned flags;             /* MHA_PLAN_* */
    int nthreads;               /* every run uses exactly this many */
    int owned;                  /* made by MHA_MALLOC: mha_plan_destroy frees it */
    size_t ws_bytes;            /* the workspace every run needs */
    int B, H, Lq, Lk, D, Dv;    /* the planned maxima; module: H, D of the module */
    int by_head;                /* module: long sequences go one head at a time */
    mha_trans ta, tb;           /* GEMM: op(A) M x K, op(B) K x N */
    int M, N, K;
    mha_options opt;            /* the caller's, num_threads resolved */
    mha__mod mod;               /* module and encoder */
    mha_encoder_layer enc;      /* encoder (pointers borrowed) */
    size_t mod_floats;          /* encoder: the self-attention's part of the workspace */
    int saves;                  /* training: the forward run leaves the saved forward in the
                                   workspace for the backward (mha__saved_key) */
};

static size_t mha__plan_struct_bytes(void)
{
    return (sizeof(struct mha_plan) + 63) / 64 * 64;
}

/* Copy and check the options; resolve the thread count. */
static mha_status mha__plan_begin(mha_plan *p, int kind, const mha_options *opt, unsigned flags,
                                  unsigned allowed, int B, int H, int Lq, int Lk)
{
    mha_status st;
    memset(p, 0, sizeof *p);
    p->magic = MHA__PLAN_MAGIC;
    p->kind = kind;
    p->flags = flags;
    if (opt) p->opt = *opt;
    if (flags & ~allowed) return MHA_ERR_INVALID_ARGUMENT;
    if ((st = mha__check_masks(&p->opt, B, H, Lq, Lk)) != MHA_OK) return st;
    p->nthreads = mha__max_threads(&p->opt);
    p->opt.num_threads = p->nthreads;
    p->B = B; p->H = H; p->Lq = Lq; p->Lk = Lk;
    return MHA_OK;
}

/* The plan's workspace in bytes: floats plus room to align the start. */
static mha_status mha__plan_ws(mha_plan *p, size_t floats)
{
    return mha__mul(floats, sizeof(float), &p->ws_bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
}

static mha_status mha__gemm_plan_make(mha_trans ta, mha_trans tb, int M, int N, int K,
                                      int num_threads, mha_plan *p)
{
    mha_options o;
    size_t t;
    memset(&o, 0, sizeof o);
    o.num_threads = num_threads;
    memset(p, 0, sizeof *p);
    if (M <= 0 || N <= 0 || K <= 0) return MHA_ERR_INVALID_SIZE;
    if (num_threads < 0) return MHA_ERR_INVALID_ARGUMENT;
    if ((ta != MHA_NO_TRANS && ta != MHA_TRANS) || (tb != MHA_NO_TRANS && tb != MHA_TRANS))
        return MHA_ERR_BAD_ENUM;
    if (!mha__dim_ok(M) || !mha__dim_ok(N) || !mha__dim_ok(K) ||
        !mha__mul3((size_t)M, (size_t)K, sizeof(float), &t) ||
        !mha__mul3((size_t)K, (size_t)N, sizeof(float), &t) ||
        !mha__mul3((size_t)M, (size_t)N, sizeof(float), &t))
        return MHA_ERR_OVERFLOW;
    (void)mha__plan_begin(p, MHA__PLAN_GEMM, &o, 0, 0, 1, 1, 1, 1);   /* zero options: cannot fail */
    p->ta = ta; p->tb = tb; p->M = M; p->N = N; p->K = K;
    return mha__plan_ws(p, mha__gemm_ws_floats_mt(M, N, K, p->nthreads) + MHA__ALIGN_FLOATS);
}

static mha_status mha__sdpa_plan_make(int B, int H, int Lq, int Lk, int D, int Dv,
                                      const mha_options *opt, unsigned flags, mha_plan *p)
{
    size_t n, per_thread, f, f1;
    mha_status st;
    memset(p, 0, sizeof *p);
    if (B <= 0 || H <= 0 || Lq <= 0 || Lk <= 0 || D <= 0 || Dv <= 0) return MHA_ERR_INVALID_SIZE;
    /* every tensor's byte count must fit */
    if (!mha__mul3((size_t)B * (size_t)H, (size_t)Lq, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul3((size_t)B * (size_t)H, (size_t)Lk, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul3((size_t)B * (size_t)H, (size_t)Lq, (size_t)Lk, &n) ||
        !mha__mul(n, sizeof(float), &n) || !mha__mul3((size_t)Lq, (size_t)Lk, 2 * sizeof(float), &n))
        return MHA_ERR_OVERFLOW;
    /* the int and long counts of the int audit (size arithmetic, above) */
    if ((size_t)B * (size_t)H > MHA__INT_LIMIT || (size_t)B * (size_t)H * (size_t)Lq > LONG_MAX ||
        !mha__dim_ok(Lq) || !mha__dim_ok(Lk) || !mha__dim_ok(D) || !mha__dim_ok(Dv))
        return MHA_ERR_OVERFLOW;
    st = mha__plan_begin(p, MHA__PLAN_SDPA, opt, flags, MHA_PLAN_WEIGHTS | MHA_PLAN_TRAINING,
                         B, H, Lq, Lk);
    if (st != MHA_OK) return st;
    if ((st = mha__check_decode(&p->opt, H, p->opt.num_kv_heads, NULL, D)) != MHA_OK) return st;
    p->D = D; p->Dv = Dv;
    if (!mha__sdpa_fwd_floats(B, H, Lq, Lk, D, Dv, 0, p->nthreads, &per_thread, &f))
        return MHA_ERR_OVERFLOW;
    if (flags & MHA_PLAN_WEIGHTS) {
        if (!mha__sdpa_fwd_floats(B, H, Lq, Lk, D, Dv, 1, p->nthreads, &per_thread, &f1))
            return MHA_ERR_OVERFLOW;
        if (f1 > f) f = f1;
    }
    if (flags & MHA_PLAN_TRAINING) {
        size_t at_lse, at_o, saved;
        if (!mha__sdpa_bwd_floats(B, H, p->opt.num_kv_heads ? p->opt.num_kv_heads : H, Lq, Lk, D, Dv,
                                  p->nthreads, &f1)) return MHA_ERR_OVERFLOW;
        if (f1 > f) f = f1;
        if (!mha__sdpa_saved_floats(B, H, Lq, Dv, &at_lse, &at_o, &saved) || !mha__add(f, saved, &f))
            return MHA_ERR_OVERFLOW;
        p->saves = 1;
    }
    return mha__plan_ws(p, f);
}

/* Floats of the module's workspace at these lengths, for what plan p allows. */
static int mha__module_floats(const mha_plan *p, int Lq, int Lk, size_t *floats)
{
    mha__fwd_layout F;
    mha__bwd_layout W;
    if (!mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, 0, p->by_head, p->nthreads, p->saves, &F)) return 0;
    *floats = F.total_floats;
    if (p->flags & MHA_PLAN_WEIGHTS) {
        if (!mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, 1, 0, p->nthreads, p->saves, &F)) return 0;
        if (F.total_floats > *floats) *floats = F.total_floats;
    }
    if (p->flags & MHA_PLAN_TRAINING) {
        if (!mha__bwd_layout_at(&p->mod, p->B, Lq, Lk, p->nthreads, p->saves, &W)) return 0;
        if (W.total_floats > *floats) *floats = W.total_floats;
    }
    return 1;
}

/* Everything of a module plan but its memory: checks, weights, layout.
   *extra_bytes: what the plan needs after its struct (the packed panels). */
static mha_status mha__module_plan_make(const mha_module *m, int B, int Lq, int Lk,
                                        const mha_options *opt, unsigned flags, int kind,
                                        mha_plan *p, size_t *extra_bytes)
{
    mha__mod r;
    mha__pack_layout P;
    size_t n, f;
    int widest, Lke;
    mha_status st;
    *extra_bytes = 0;
    memset(p, 0, sizeof *p);
    if ((st = mha__check_module(m, &r)) != MHA_OK) return st;
    if (B <= 0 || Lq <= 0 || Lk <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__dim_ok(Lk)) return MHA_ERR_OVERFLOW;
    Lke = Lk + r.extra;
    /* GEMM row counts (B*L) are ints; tensor byte counts must fit size_t */
    widest = r.kdim > r.vdim ? r.kdim : r.vdim;
    if (r.E > widest) widest = r.E;
    if ((size_t)B * (size_t)Lq > MHA__INT_LIMIT || (size_t)B * (size_t)Lke > MHA__INT_LIMIT ||
        (size_t)B * (size_t)r.H * (size_t)Lq > LONG_MAX || !mha__dim_ok(Lq) || !mha__dim_ok(Lk) ||
        !mha__mul3((size_t)B, (size_t)Lke + Lq, (size_t)widest, &n) ||
        !mha__mul(n, 8 * sizeof(float), &n) ||
        !mha__mul3((size_t)B * (size_t)r.H, (size_t)Lq, (size_t)Lke, &n) ||
        !mha__mul(n, sizeof(float), &n) ||
        !mha__mul3((size_t)Lq, (size_t)Lke, 2 * sizeof(float), &n))
        return MHA_ERR_OVERFLOW;
    st = mha__plan_begin(p, kind, opt, flags, MHA_PLAN_WEIGHTS | MHA_PLAN_TRAINING | MHA_PLAN_PACK,
                         B, r.H, Lq, Lk);
    if (st != MHA_OK) return st;
    if ((st = mha__check_decode(&p->opt, r.H, m->num_kv_heads, &m->rope, r.D)) != MHA_OK) return st;
    p->D = p->Dv = r.D;
    if (flags & MHA_PLAN_PACK) {
        if ((st = mha__pack_bytes(&r, &P, extra_bytes)) != MHA_OK) return st;
    } else if ((st = mha__packed_use(&r, m->packed)) != MHA_OK) {
        return st;
    }
    p->mod = r;
    p->by_head = (double)B * ((double)Lq + 2.0 * Lke) * r.E >= (double)MHA__BY_HEAD_FLOATS;
    p->saves = (flags & MHA_PLAN_TRAINING) && !p->by_head;   /* head by head: Q, K, V do not fit */
    if (!mha__module_floats(p, Lq, Lk, &f)) return MHA_ERR_OVERFLOW;
    p->mod_floats = f;
    return mha__plan_ws(p, f);
}

static int mha__enc_layout_at(const mha_plan *p, int L, int train, mha__enc_layout *P)
{
    size_t cur = 0, ne, nf, g, t, sub;
    int E = p->mod.E, F = p->enc.dim_feedforward, N = p->B * L;
    ne = (size_t)N * E; nf = (size_t)N * F;
    if (!mha__module_floats(p, L, L, &sub)) return 0;
    if (!train) {
        int rows = N < MHA__FF_ROWS ? N : MHA__FF_ROWS;
        P->rows = (size_t)rows;
        g = mha__linear_gws(rows, E, F, p->nthreads);
        t = mha__linear_gws(rows, F, E, p->nthreads); if (t > g) g = t;
        return mha__region(&cur, ne, &P->a) && mha__region(&cur, sub, &P->sub) &&
               mha__region(&cur, (size_t)rows * F, &P->zc) && mha__region(&cur, (size_t)rows * E, &P->tc) &&
               mha__region(&cur, (size_t)rows * E, &P->fc) && mha__region(&cur, g, &P->gws) &&
               mha__add(cur, MHA__ALIGN_FLOATS, &P->total_floats);
    }
    g = mha__linear_gws(N, E, F, p->nthreads);
    t = mha__linear_gws(N, F, E, p->nthreads); if (t > g) g = t;
    return mha__region(&cur, MHA__SAVED_HDR, &P->hdr) &&
           mha__region(&cur, ne, &P->a) && mha__region(&cur, ne, &P->t1) &&
           mha__region(&cur, ne, &P->h) && mha__region(&cur, nf, &P->z) &&
           mha__region(&cur, nf, &P->g) && mha__region(&cur, ne, &P->t2) &&
           mha__region(&cur, ne, &P->d1) && mha__region(&cur, ne, &P->d2) &&
           mha__region(&cur, nf, &P->dg) && mha__region(&cur, g, &P->gws) &&
           mha__region(&cur, sub, &P->sub) && mha__add(cur, MHA__ALIGN_FLOATS, &P->total_floats);
}

static mha_status mha__encoder_plan_make(const mha_encoder_layer *ly, int B, int L,
                                         const mha_options *opt, unsigned flags, mha_plan *p,
                                         size_t *extra_bytes)
{
    mha__enc_layout P;
    size_t n, f;
    mha_status st;
    *extra_bytes = 0;
    memset(p, 0, sizeof *p);
    if (!ly) return MHA_ERR_NULL_POINTER;
    if (!ly->linear1_weight || !ly->linear2_weight) return MHA_ERR_NULL_POINTER;
    if (ly->dim_feedforward <= 0 || B <= 0 || L <= 0) return MHA_ERR_INVALID_SIZE;
    if (ly->activation != MHA_ACT_RELU && ly->activation != MHA_ACT_GELU) return MHA_ERR_BAD_ENUM;
    if ((ly->norm_first != 0 && ly->norm_first != 1) ||
        !(ly->layer_norm_eps >= 0.0f) || ly->layer_norm_eps == INFINITY)
        return MHA_ERR_INVALID_ARGUMENT;
    /* x [B, L, E] is the key and the value too: kdim and vdim must be E */
    if ((ly->self_attn.kdim != 0 && ly->self_attn.kdim != ly->self_attn.embed_dim) ||
        (ly->self_attn.vdim != 0 && ly->self_attn.vdim != ly->self_attn.embed_dim))
        return MHA_ERR_INVALID_ARGUMENT;
    st = mha__module_plan_make(&ly->self_attn, B, L, L, opt, flags, MHA__PLAN_ENCODER, p, extra_bytes);
    if (st != MHA_OK) return st;
    if (!mha__mul3((size_t)p->B * L, (size_t)ly->dim_feedforward, sizeof(float), &n) ||
        !mha__mul3((size_t)ly->dim_feedforward, (size_t)p->mod.E, sizeof(float), &n) ||
        ly->dim_feedforward > INT_MAX / 2)
        return MHA_ERR_OVERFLOW;
    p->enc = *ly;
    if (!mha__enc_layout_at(p, L, 0, &P)) return MHA_ERR_OVERFLOW;
    f = P.total_floats;
    if (flags & MHA_PLAN_TRAINING) {
        if (!mha__enc_layout_at(p, L, 1, &P)) return MHA_ERR_OVERFLOW;
        if (P.total_floats > f) f = P.total_floats;
    }
    return mha__plan_ws(p, f);
}

/* Plan memory: the caller's mem (aligned for the struct, at least need bytes),
   or MHA_MALLOC's.  The plan made on the stack is copied in; with PACK the
   panels are written after it.  */
#define MHA__PLAN_ALIGN 8
static mha_status mha__plan_place(mha_plan *tmp, size_t extra, void *mem, size_t mem_bytes,
                                   mha_plan **plan)
{
    size_t need;
    mha_plan *p;
    if (!plan) return MHA_ERR_NULL_POINTER;
    if (!mha__add(mha__plan_struct_bytes(), extra, &need)) return MHA_ERR_OVERFLOW;
    if (mem) {
        if (mem_bytes < need) return MHA_ERR_WORKSPACE_TOO_SMALL;
        if ((uintptr_t)mem % MHA__PLAN_ALIGN != 0) return MHA_ERR_MISALIGNED;
        tmp->owned = 0;
    } else {
        mem = MHA_MALLOC(need);
        if (!mem) return MHA_ERR_OUT_OF_MEMORY;
        tmp->owned = 1;
    }
    p = MHA__CAST(mha_plan *, mem);
    *p = *tmp;
    if (extra) {
        mha__pack_layout P;
        (void)mha__pack_lay(&p->mod, &P);   /* checked by the plan */
        mha__pack_write(&p->mod, &P, MHA__CAST(char *, mem) + mha__plan_struct_bytes());
    }
    *plan = p;
    return MHA_OK;
}

/* The end of every planner: the status of its make, then the bytes of the
   plan (plan_bytes, the *_plan_size calls) or the plan placed in memory. */
static mha_status mha__plan_out(mha_status st, mha_plan *tmp, const size_t *extra, void *mem,
                                size_t mem_bytes, mha_plan **plan, size_t *plan_bytes)
{
    size_t x = extra ? *extra : 0;   /* read after the make (st) has set it */
    if (st != MHA_OK) return st;
    if (plan_bytes)
        return mha__add(mha__plan_struct_bytes(), x, plan_bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
    return mha__plan_place(tmp, x, mem, mem_bytes, plan);
}

MHADEF mha_status mha_gemm_plan_size(mha_trans ta, mha_trans tb, int M, int N, int K,
                                     int num_threads, size_t *plan_bytes)
{
    mha_plan p;
    if (!plan_bytes) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__gemm_plan_make(ta, tb, M, N, K, num_threads, &p), &p, NULL, NULL, 0,
                         NULL, plan_bytes);
}
MHADEF mha_status mha_gemm_plan(mha_trans ta, mha_trans tb, int M, int N, int K, int num_threads,
                                void *mem, size_t mem_bytes, mha_plan **plan)
{
    mha_plan p;
    if (!plan) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__gemm_plan_make(ta, tb, M, N, K, num_threads, &p), &p, NULL, mem,
                         mem_bytes, plan, NULL);
}

MHADEF mha_status mha_sdpa_plan_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                     const mha_options *opt, unsigned flags, size_t *plan_bytes)
{
    mha_plan p;
    if (!plan_bytes) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__sdpa_plan_make(B, H, Lq, Lk, D, Dv, opt, flags, &p), &p, NULL, NULL, 0,
                         NULL, plan_bytes);
}
MHADEF mha_status mha_sdpa_plan(int B, int H, int Lq, int Lk, int D, int Dv,
                                const mha_options *opt, unsigned flags,
                                void *mem, size_t mem_bytes, mha_plan **plan)
{
    mha_plan p;
    if (!plan) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__sdpa_plan_make(B, H, Lq, Lk, D, Dv, opt, flags, &p), &p, NULL, mem,
                         mem_bytes, plan, NULL);
}

MHADEF mha_status mha_module_plan_size(const mha_module *m, int B, int Lq, int Lk,
                                       const mha_options *opt, unsigned flags, size_t *plan_bytes)
{
    mha_plan p;
    size_t extra;
    if (!plan_bytes) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__module_plan_make(m, B, Lq, Lk, opt, flags, MHA__PLAN_MODULE, &p, &extra),
                         &p, &extra, NULL, 0, NULL, plan_bytes);
}
MHADEF mha_status mha_module_plan(const mha_module *m, int B, int Lq, int Lk,
                                  const mha_options *opt, unsigned flags,
                                  void *mem, size_t mem_bytes, mha_plan **plan)
{
    mha_plan p;
    size_t extra;
    if (!plan) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__module_plan_make(m, B, Lq, Lk, opt, flags, MHA__PLAN_MODULE, &p, &extra),
                         &p, &extra, mem, mem_bytes, plan, NULL);
}

MHADEF mha_status mha_encoder_plan_size(const mha_encoder_layer *layer, int B, int L,
                                        const mha_options *opt, unsigned flags, size_t *plan_bytes)
{
    mha_plan p;
    size_t extra;
    if (!plan_bytes) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__encoder_plan_make(layer, B, L, opt, flags, &p, &extra), &p, &extra,
                         NULL, 0, NULL, plan_bytes);
}
MHADEF mha_status mha_encoder_plan(const mha_encoder_layer *layer, int B, int L,
                                   const mha_options *opt, unsigned flags,
                                   void *mem, size_t mem_bytes, mha_plan **plan)
{
    mha_plan p;
    size_t extra;
    if (!plan) return MHA_ERR_NULL_POINTER;
    return mha__plan_out(mha__encoder_plan_make(layer, B, L, opt, flags, &p, &extra), &p, &extra,
                         mem, mem_bytes, plan, NULL);
}

MHADEF size_t mha_plan_workspace_size(const mha_plan *plan)
{
    return plan && plan->magic == MHA__PLAN_MAGIC ? plan->ws_bytes : 0;
}

MHADEF void mha_plan_destroy(mha_plan *plan)
{
    if (plan && plan->magic == MHA__PLAN_MAGIC && plan->owned) {
        plan->magic = 0;
        MHA_FREE(plan);
    }
}

/* ------------------------------------------------------ saved forward

   A training plan's forward run leaves in the caller's workspace what its
   backward needs, so the backward does not compute the forward again:
     SDPA      the log-sum-exp of every row [B, H, Lq] and O [B, H, Lq, Dv]
     module    the projected Q, K, V (after RoPE), the context C and the lse
     encoder   the module's, and the layer's activations (a, t1, h, z, g, t2)
   The region starts with a header of MHA__SAVED_HDR floats: a magic number
   and a 64-bit key of everything the forward's results depend on (the plan,
   the lengths, the input and mask pointers and contents, sinks, ALiBi
   slopes, a sample of the weights).  A backward run keys its own arguments
   the same way and uses the saved forward only when the keys agree;
   otherwise it recomputes the forward, as a one-shot backward does.  Runs
   that write the region otherwise clear the header first.  */

/* A 64-bit hash of n bytes, continuing from h: four lanes of
   xor-multiply-xorshift over 8-byte words (a change to any bit of a word
   changes its lane), then the lanes folded with the length. */
static uint64_t mha__hash(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = MHA__CAST(const unsigned char *, p);
    uint64_t a[4], w;
    size_t i = 0;
    int l;
    for (l = 0; l < 4; ++l) a[l] = h + (uint64_t)(l + 1) * 0x9e3779b97f4a7c15ull;
    for (; i + 32 <= n; i += 32)
        for (l = 0; l < 4; ++l) {
            memcpy(&w, c + i + 8 * l, 8);
            a[l] = (a[l] ^ w) * 0xff51afd7ed558ccdull;
            a[l] ^= a[l] >> 32;
        }
    for (; i < n; ++i) a[0] = (a[0] ^ c[i]) * 0xc4ceb9fe1a85ec53ull;
    h = (uint64_t)n;
    for (l = 0; l < 4; ++l) { h = (h ^ a[l]) * 0xff51afd7ed558ccdull; h ^= h >> 29; }
    return h;
}

static size_t mha__mask_bytes(const mha_mask *m)
{
    size_t n = m->kind == MHA_MASK_FLOAT ? sizeof(float) : 1;
    int d;
    for (d = 0; d < m->ndim; ++d) n *= (size_t)m->shape[d];
    return n;
}

/* h continued by MHA__SAMPLES evenly spread values of w[0..n) (n > 0), or
   all of them when n is small; w may be NULL */
static uint64_t mha__hash_sample(uint64_t h, const float *w, size_t n)
{
    float v[MHA__SAMPLES];
    int s;
    if (!w) return h;
    if (n <= 4 * MHA__SAMPLES) return mha__hash(h, w, n * sizeof(float));
    for (s = 0; s < MHA__SAMPLES; ++s)
        v[s] = w[(size_t)((unsigned long long)s * (n - 1) / (MHA__SAMPLES - 1))];
    return mha__hash(h, v, sizeof v);
}

/* The key of a run of plan p at lengths Lq, Lk with options o (the run's
   masks) and inputs x[0..nx) of n[] floats (an input equal to the one
   before it, e.g. self-attention's x, is hashed once).  */
static uint64_t mha__saved_key(const mha_plan *p, const mha_options *o, int Lq, int Lk,
                               const float *const *x, const size_t *n, int nx)
{
    const mha__mod *r = &p->mod;
    const mha_encoder_layer *e = &p->enc;
    int iv[32];
    float fv[4];
    const void *pv[24];
    uint64_t h = MHA__SAVED_MAGIC;
    int i, ni = 0, np = 0;
    iv[ni++] = p->kind; iv[ni++] = (int)p->flags; iv[ni++] = p->B; iv[ni++] = p->H;
    iv[ni++] = p->D; iv[ni++] = p->Dv; iv[ni++] = p->by_head; iv[ni++] = Lq; iv[ni++] = Lk;
    iv[ni++] = o->causal; iv[ni++] = (int)o->causal_align; iv[ni++] = o->num_kv_heads;
    iv[ni++] = o->window; iv[ni++] = o->window_left; iv[ni++] = o->window_right;
    iv[ni++] = o->alibi; iv[ni++] = o->position_offset;
    iv[ni++] = (int)o->attn_mask.kind; iv[ni++] = (int)o->key_padding_mask.kind;
    iv[ni++] = r->E; iv[ni++] = r->kdim; iv[ni++] = r->vdim; iv[ni++] = r->Hkv; iv[ni++] = r->extra;
    iv[ni++] = (int)r->rope.kind; iv[ni++] = r->rope.rotary_dim;
    iv[ni++] = e->dim_feedforward; iv[ni++] = (int)e->activation; iv[ni++] = e->norm_first;
    iv[ni++] = p->kind == MHA__PLAN_SDPA ? 0 : (int)mha__weights_sample(r);
    fv[0] = o->scale; fv[1] = o->softcap; fv[2] = r->rope.theta; fv[3] = e->layer_norm_eps;
    pv[np++] = p; pv[np++] = o->attn_mask.data; pv[np++] = o->key_padding_mask.data;
    pv[np++] = o->alibi_slopes; pv[np++] = o->sinks;
    pv[np++] = r->wq; pv[np++] = r->wk; pv[np++] = r->wv; pv[np++] = r->wo;
    pv[np++] = r->bq; pv[np++] = r->bk; pv[np++] = r->bv; pv[np++] = r->bo;
    pv[np++] = r->bias_k; pv[np++] = r->bias_v;
    pv[np++] = e->linear1_weight; pv[np++] = e->linear1_bias; pv[np++] = e->linear2_weight;
    pv[np++] = e->linear2_bias; pv[np++] = e->norm1_weight; pv[np++] = e->norm1_bias;
    pv[np++] = e->norm2_weight; pv[np++] = e->norm2_bias;
    h = mha__hash(h, iv, (size_t)ni * sizeof iv[0]);
    h = mha__hash(h, fv, sizeof fv);
    h = mha__hash(h, pv, (size_t)np * sizeof pv[0]);
    for (i = 0; i < nx; ++i) {
        h = mha__hash(h, &x[i], sizeof x[i]);
        if (i == 0 || x[i] != x[i - 1] || n[i] != n[i - 1]) h = mha__hash(h, x[i], n[i] * sizeof(float));
    }
    if (o->attn_mask.kind != MHA_MASK_NONE) h = mha__hash(h, o->attn_mask.data, mha__mask_bytes(&o->attn_mask));
    if (o->key_padding_mask.kind != MHA_MASK_NONE)
        h = mha__hash(h, o->key_padding_mask.data, mha__mask_bytes(&o->key_padding_mask));
    if (o->sinks) h = mha__hash(h, o->sinks, (size_t)p->H * sizeof(float));
    if (o->alibi && o->alibi_slopes) h = mha__hash(h, o->alibi_slopes, (size_t)p->H * sizeof(float));
    if (p->kind == MHA__PLAN_ENCODER) {   /* the feed-forward and norm weights, sampled too */
        size_t ef = (size_t)r->E * e->dim_feedforward;
        h = mha__hash_sample(h, e->linear1_weight, ef); h = mha__hash_sample(h, e->linear2_weight, ef);
        h = mha__hash_sample(h, e->linear1_bias, (size_t)e->dim_feedforward);
        h = mha__hash_sample(h, e->linear2_bias, (size_t)r->E);
        h = mha__hash_sample(h, e->norm1_weight, (size_t)r->E); h = mha__hash_sample(h, e->norm1_bias, (size_t)r->E);
        h = mha__hash_sample(h, e->norm2_weight, (size_t)r->E); h = mha__hash_sample(h, e->norm2_bias, (size_t)r->E);
    }
    return h;
}

/* A check sum of the saved forward itself, its k regions of n[i] floats at
   ws + at[i]: per lane of 8-byte words a running sum and a sum of running
   sums (Fletcher), so a region written over since the forward (a workspace
   freed, reused by other allocations and handed out again) no longer
   matches its header.  Two adds a word: cheap next to the key's hash.  */
static uint64_t mha__saved_sum(const float *ws, const size_t *at, const size_t *n, int k)
{
    uint64_t s1[4] = {0, 0, 0, 0}, s2[4] = {0, 0, 0, 0}, w, h = 0;
    uint32_t u;
    int i, l;
    for (i = 0; i < k; ++i) {
        const void *region = ws + at[i];
        const unsigned char *c = MHA__CAST(const unsigned char *, region);
        size_t bytes = n[i] * sizeof(float), j = 0;
        for (; j + 32 <= bytes; j += 32)
            for (l = 0; l < 4; ++l) {
                memcpy(&w, c + j + 8 * l, 8);
                s1[l] += w;
                s2[l] += s1[l];
            }
        for (; j < bytes; j += 4) {
            memcpy(&u, c + j, 4);
            s1[0] += u;
            s2[0] += s1[0];
        }
    }
    for (l = 0; l < 4; ++l) {
        h = (h ^ s1[l]) * 0xff51afd7ed558ccdull;
        h = (h ^ s2[l]) * 0xff51afd7ed558ccdull;
    }
    return h;
}

/* The header at hdr: mark the saved forward as made for key (after the
   forward has written it; key combines the arguments' key and the saved
   data's sum), clear it (before anything else writes the region), or ask
   whether it holds key. */
static void mha__saved_stamp(float *hdr, uint64_t key)
{
    uint64_t m = MHA__SAVED_MAGIC;
    memcpy(hdr, &m, 8);
    memcpy(hdr + 2, &key, 8);
}
static void mha__saved_clear(float *hdr) { memset(hdr, 0, 16); }
static int mha__saved_magic(const float *hdr)   /* (checked first: keying costs O(L E)) */
{
    uint64_t m;
    memcpy(&m, hdr, 8);
    return m == MHA__SAVED_MAGIC;
}
static int mha__saved_holds(const float *hdr, uint64_t key)
{
    uint64_t m, k;
    memcpy(&m, hdr, 8);
    memcpy(&k, hdr + 2, 8);
    return m == MHA__SAVED_MAGIC && k == key;
}

/* ------------------------------------------------------------- runs */

/* The start of every run: the plan is one of this kind; the lengths fit;
   the options are the plan's with this run's mask data (NULL: the pointer
   the plan was made with) and mask shapes for its lengths; packed weights
   still match their source.  (The workspace: mha__run_ws.)  */
static mha_status mha__run_begin(const mha_plan *p, int kind, int Lq, int Lk, const void *attn_mask,
                                 const void *kpm, mha_options *o)
{
    mha_mask *am = &o->attn_mask, *kp = &o->key_padding_mask;
    if (!p) return MHA_ERR_NULL_POINTER;
    if (p->magic != MHA__PLAN_MAGIC || p->kind != kind) return MHA_ERR_INVALID_ARGUMENT;
    *o = p->opt;
    if (Lq <= 0 || Lk <= 0) return MHA_ERR_INVALID_SIZE;
    if (Lq > p->Lq || Lk > p->Lk) return MHA_ERR_EXCEEDS_PLAN;
    if ((attn_mask && am->kind == MHA_MASK_NONE) || (kpm && kp->kind == MHA_MASK_NONE))
        return MHA_ERR_EXCEEDS_PLAN;
    if (attn_mask) am->data = attn_mask;
    if (kpm) kp->data = kpm;
    if ((am->kind != MHA_MASK_NONE && !am->data) || (kp->kind != MHA_MASK_NONE && !kp->data))
        return MHA_ERR_NULL_POINTER;
    /* attn_mask ends in [Lq, Lk], key_padding_mask is [B, Lk] */
    if (am->kind != MHA_MASK_NONE) { am->shape[am->ndim - 2] = Lq; am->shape[am->ndim - 1] = Lk; }
    if (kp->kind != MHA_MASK_NONE) kp->shape[1] = Lk;
    /* packed panels are a copy of the weights: they must still be theirs */
    if (p->mod.pq && mha__weights_sample(&p->mod) != p->mod.values) return MHA_ERR_STALE;
    return MHA_OK;
}

/* The caller's workspace (at least need bytes), or an allocated one. */
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
/* A run's workspace: what this run needs (need_floats at its lengths, at
   most the plan's size), from the caller or allocated. */
static mha_status mha__run_ws(const mha_plan *p, void *workspace, size_t have, size_t need_floats,
                              void **owned, float **ws)
{
    if (need_floats > p->ws_bytes / sizeof(float)) return MHA_ERR_EXCEEDS_PLAN;   /* cannot happen */
    return mha__get_ws(workspace, have, need_floats * sizeof(float), owned, ws);
}

MHADEF mha_status mha_gemm_run(const mha_plan *p, float alpha, const float *A, int lda,
                               const float *B, int ldb, float beta, float *C, int ldc,
                               void *workspace, size_t workspace_bytes)
{
    size_t tmp;
    void *owned;
    float *ws;
    mha_status st;
    if (!p || !A || !B || !C) return MHA_ERR_NULL_POINTER;
    if (p->magic != MHA__PLAN_MAGIC || p->kind != MHA__PLAN_GEMM) return MHA_ERR_INVALID_ARGUMENT;
    if (lda < (p->ta ? p->M : p->K) || ldb < (p->tb ? p->K : p->N) || ldc < p->N) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul((size_t)(p->ta ? p->K : p->M), (size_t)lda, &tmp) || !mha__mul(tmp, sizeof(float), &tmp) ||
        !mha__mul((size_t)(p->tb ? p->N : p->K), (size_t)ldb, &tmp) || !mha__mul(tmp, sizeof(float), &tmp) ||
        !mha__mul((size_t)p->M, (size_t)ldc, &tmp) || !mha__mul(tmp, sizeof(float), &tmp))
        return MHA_ERR_OVERFLOW;
    if ((st = mha__run_ws(p, workspace, workspace_bytes, p->ws_bytes / sizeof(float), &owned, &ws)) != MHA_OK)
        return st;
    mha__gemm_mt(p->ta, p->tb, p->M, p->N, p->K, alpha, A, (size_t)lda, B, (size_t)ldb, beta, C,
                 (size_t)ldc, ws, p->nthreads);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* The attention of SDPA's dense [B, H, L, D] tensors. */
static void mha__attn_dense(mha__attn *a, const mha_options *o, int B, int H, int Lq, int Lk, int D,
                            int Dv, const float *q, const float *k, const float *v, float *out)
{
    mha__attn_common(a, o, B, H, Lq, Lk, Lk, D, Dv);
    a->q.p = q; a->q.rs = (size_t)D;  a->q.hs = (size_t)Lq * D;  a->q.bs = (size_t)H * Lq * D;
    a->k.p = k; a->k.rs = (size_t)D;  a->k.hs = (size_t)Lk * D;  a->k.bs = (size_t)a->Hkv * Lk * D;
    a->v.p = v; a->v.rs = (size_t)Dv; a->v.hs = (size_t)Lk * Dv; a->v.bs = (size_t)a->Hkv * Lk * Dv;
    a->o = out; a->o_rs = (size_t)Dv; a->o_hs = (size_t)Lq * Dv; a->o_bs = (size_t)H * Lq * Dv;
    a->weights = NULL; a->per_head = 1;
    a->shared_pack = (size_t)B * H < (size_t)a->nthreads;
}

/* The sum of an SDPA plan's saved forward at these lengths. */
static uint64_t mha__sdpa_saved_sum(const mha_plan *p, int Lq, const float *ws)
{
    size_t at[2], n[2], total;
    (void)mha__sdpa_saved_floats(p->B, p->H, Lq, p->Dv, &at[0], &at[1], &total);
    n[0] = (size_t)p->B * p->H * Lq;
    n[1] = n[0] * p->Dv;
    return mha__saved_sum(ws, at, n, 2);
}

/* The saved-forward key of an SDPA run. */
static uint64_t mha__sdpa_key(const mha_plan *p, const mha_options *o, int Lq, int Lk,
                              const float *q, const float *k, const float *v)
{
    const float *x[3];
    size_t n[3], rows = (size_t)p->B * p->H * Lq;
    size_t keys = (size_t)p->B * (o->num_kv_heads ? o->num_kv_heads : p->H) * Lk;
    x[0] = q; x[1] = k; x[2] = v;
    n[0] = rows * p->D; n[1] = keys * p->D; n[2] = keys * p->Dv;
    return mha__saved_key(p, o, Lq, Lk, x, n, 3);
}

MHADEF mha_status mha_sdpa_run(const mha_plan *p, int Lq, int Lk,
                               const float *q, const float *k, const float *v,
                               const void *attn_mask, const void *key_padding_mask,
                               float *out, float *attn_weights, void *workspace, size_t workspace_bytes)
{
    mha_options o;
    mha__attn a;
    size_t per_thread, total, at_lse = 0, at_o = 0, saved = 0;
    void *owned;
    float *ws;
    uint64_t key = 0;
    mha_status st;
    if ((st = mha__run_begin(p, MHA__PLAN_SDPA, Lq, Lk, attn_mask, key_padding_mask, &o)) != MHA_OK)
        return st;
    if (!q || !k || !v || !out) return MHA_ERR_NULL_POINTER;
    if (attn_weights && !(p->flags & MHA_PLAN_WEIGHTS)) return MHA_ERR_EXCEEDS_PLAN;
    (void)mha__sdpa_fwd_floats(p->B, p->H, Lq, Lk, p->D, p->Dv, attn_weights != NULL, p->nthreads,
                               &per_thread, &total);   /* within the plan's */
    if (p->saves) (void)mha__sdpa_saved_floats(p->B, p->H, Lq, p->Dv, &at_lse, &at_o, &saved);
    if ((st = mha__run_ws(p, workspace, workspace_bytes, saved + total, &owned, &ws)) != MHA_OK)
        return st;
    mha__attn_dense(&a, &o, p->B, p->H, Lq, Lk, p->D, p->Dv, q, k, v, out);
    a.weights = attn_weights;
    if (saved) {   /* the saved forward: lse there (and copied to o.lse), O copied after;
                      keyed before out (which may be q) is written */
        mha__saved_clear(ws);
        a.lse = ws + at_lse;
        if (!owned) key = mha__sdpa_key(p, &o, Lq, Lk, q, k, v);
    }
    mha__attend_all(&a, ws + saved, per_thread);
    if (saved) {
        size_t rows = (size_t)p->B * p->H * Lq;
        if (o.lse) memcpy(o.lse, ws + at_lse, rows * sizeof(float));
        if (!owned) {
            memcpy(ws + at_o, out, rows * p->Dv * sizeof(float));
            mha__saved_stamp(ws, key ^ mha__sdpa_saved_sum(p, Lq, ws));
        }
    }
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

MHADEF mha_status mha_sdpa_run_backward(const mha_plan *p, int Lq, int Lk,
                                        const float *q, const float *k, const float *v,
                                        const float *dout, const void *attn_mask,
                                        const void *key_padding_mask, float *dq, float *dk, float *dv,
                                        void *workspace, size_t workspace_bytes)
{
    mha_options o;
    mha__attn a;
    void *owned;
    float *ws;
    size_t f = 0, at_lse = 0, at_o = 0, saved = 0;
    int use = 0;
    mha_status st;
    if ((st = mha__run_begin(p, MHA__PLAN_SDPA, Lq, Lk, attn_mask, key_padding_mask, &o)) != MHA_OK)
        return st;
    if (!q || !k || !v || !dout) return MHA_ERR_NULL_POINTER;
    if (!(p->flags & MHA_PLAN_TRAINING)) return MHA_ERR_EXCEEDS_PLAN;
    (void)mha__sdpa_bwd_floats(p->B, p->H, o.num_kv_heads ? o.num_kv_heads : p->H, Lq, Lk, p->D,
                               p->Dv, p->nthreads, &f);   /* within the plan's */
    if (p->saves) (void)mha__sdpa_saved_floats(p->B, p->H, Lq, p->Dv, &at_lse, &at_o, &saved);
    if ((st = mha__run_ws(p, workspace, workspace_bytes, saved + f, &owned, &ws)) != MHA_OK) return st;
    mha__attn_dense(&a, &o, p->B, p->H, Lq, Lk, p->D, p->Dv, q, k, v, NULL);
    a.nthreads = p->nthreads;
    /* did the forward of these very arguments leave lse and O here? */
    if (saved && !owned && mha__saved_magic(ws))
        use = mha__saved_holds(ws, mha__sdpa_key(p, &o, Lq, Lk, q, k, v) ^ mha__sdpa_saved_sum(p, Lq, ws));
    if (use) a.o = ws + at_o;
    mha__attend_backward_fused(&a, dout, use ? ws + at_lse : NULL, dq, dk, dv, ws + saved);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* One run of a module plan, forward or backward: the one context its
   internal stages share. */
typedef struct mha__run {
    const mha_plan *p;
    const mha__mod *r;
    const mha_options *o;              /* the plan's, with this run's masks */
    int B, Lq, Lk, Lke;
    const float *query, *key, *value;  /* [B,Lq,E], [B,Lk,kdim], [B,Lk,vdim] */
    const float *dout;                 /* backward: [B,Lq,E] */
    float *out, *weights;              /* forward */
    float *dquery, *dkey, *dvalue;     /* backward, added to (each may be NULL) */
    const mha_module_grad *grad;       /* backward, added to */
    float *ws;
    int use_saved;                     /* backward: ws holds the saved forward of these inputs */
} mha__run;

/* The long-sequence forward (see MHA__BY_HEAD_FLOATS): for each head h,
   project Q_h, K_h, V_h ([B, L, D]), attend (fused), and add O_h's share of
   the output projection to out.  */
static void mha__forward_by_head(const mha__run *c, const mha__fwd_layout *L)
{
    const mha__mod *r = c->r;
    mha__attn a;
    int E = r->E, D = r->D, B = c->B, Lq = c->Lq, Lke = c->Lke, nt = c->p->nthreads, h, i;
    float *qp = c->ws + L->qp, *kp = c->ws + L->kp, *vp = c->ws + L->vp, *scratch = c->ws + L->scratch;

    /* out = bo, then each head adds O_h Wo_h^T */
    for (i = 0; i < B * Lq; ++i) {
        if (r->bo) memcpy(c->out + (size_t)i * E, r->bo, (size_t)E * sizeof(float));
        else memset(c->out + (size_t)i * E, 0, (size_t)E * sizeof(float));
    }
    mha__attn_common(&a, c->o, B, r->H, Lq, c->Lk, Lke, D, D);
    a.Hkv = r->Hkv; a.group = r->H / r->Hkv;
    a.weights = NULL; a.per_head = 0;
    a.nh = 1;
    a.shared_pack = B < a.nthreads;
    a.q.p = qp; a.q.rs = (size_t)D; a.q.hs = 0; a.q.bs = (size_t)Lq * D;
    a.k.p = kp; a.k.rs = (size_t)D; a.k.hs = 0; a.k.bs = (size_t)Lke * D;
    a.v.p = vp; a.v.rs = (size_t)D; a.v.hs = 0; a.v.bs = (size_t)Lke * D;
    a.o = qp;   a.o_rs = (size_t)D; a.o_hs = 0; a.o_bs = (size_t)Lq * D;
    for (h = 0; h < r->H; ++h) {
        size_t hd = (size_t)h * D, gd = (size_t)(h / a.group) * D;   /* gd: its KV head's columns */
        /* 1. Q_h = Xq Wq[hD:(h+1)D, :]^T + bq_h, turned by RoPE; K_g, V_g of its
              KV head g likewise (once per group), with the appended rows
              after each batch's Lk keys */
        mha__linear(B * Lq, E, D, c->query, r->wq + hd * E, r->bq ? r->bq + hd : NULL, qp, scratch, nt);
        mha__rope_apply(&r->rope, D, B, Lq, 1, (size_t)Lq * D, (size_t)D, 0,
                        mha__query_pos0(c->o, Lq, c->Lk), NULL, 1.0f, qp);
        if (h % a.group == 0) {
            mha__kv_project(B, c->Lk, r->kdim, D, c->key, r->wk + gd * r->kdim, r->bk ? r->bk + gd : NULL,
                            r->bias_k ? r->bias_k + gd : NULL, r->zero_attn, kp, scratch, nt, NULL);
            mha__kv_project(B, c->Lk, r->vdim, D, c->value, r->wv + gd * r->vdim, r->bv ? r->bv + gd : NULL,
                            r->bias_v ? r->bias_v + gd : NULL, r->zero_attn, vp, scratch, nt, NULL);
            mha__rope_apply(&r->rope, D, B, c->Lk, 1, (size_t)Lke * D, (size_t)D, 0,
                            c->o->position_offset, NULL, 1.0f, kp);
        }
        /* 2. O_h over Q_h, fused */
        a.h0 = h;
        mha__attend_all(&a, scratch, L->per_thread);
        /* 3. out += O_h Wo[:, hD:(h+1)D]^T */
        mha__gemm_mt(0, 1, B * Lq, E, D, 1.0f, qp, (size_t)D, r->wo + hd, (size_t)E, 1.0f, c->out,
                     (size_t)E, scratch, nt);
    }
}

/* The forward of every other length: K and V once, then the queries in
   chunks (all of them at once when the weights are wanted).  */
static void mha__forward_chunks(const mha__run *c, const mha__fwd_layout *L)
{
    const mha__mod *r = c->r;
    mha__attn a;
    int E = r->E, Ekv = r->Ekv, B = c->B, Lq = c->Lq, Lke = c->Lke, nt = c->p->nthreads, b;
    int saves = c->p->saves;
    float *qp = c->ws + L->qp, *kp = c->ws + L->kp, *vp = c->ws + L->vp, *scratch = c->ws + L->scratch;
    float *ctx = saves ? c->ws + L->ctx : NULL;

    /* 1. key and value projections, K = Xk Wk^T + bk, for all batches,
          Lke rows per batch (the appended keys after the Lk projected ones) */
    mha__kv_project(B, c->Lk, r->kdim, Ekv, c->key, r->wk, r->bk, r->bias_k, r->zero_attn, kp, scratch,
                    nt, r->pk);
    mha__kv_project(B, c->Lk, r->vdim, Ekv, c->value, r->wv, r->bv, r->bias_v, r->zero_attn, vp, scratch,
                    nt, r->pv);
    /* RoPE on the Lk real keys of every batch (not on appended rows), key j at
       position offset + j; the queries below at offset + i' */
    mha__rope_apply(&r->rope, r->D, B, c->Lk, r->Hkv, (size_t)Lke * Ekv, (size_t)Ekv, (size_t)r->D,
                    c->o->position_offset, NULL, 1.0f, kp);

    /* A chunk's rows are contiguous in query and out because nb > 1 only
       when nq == Lq. */
    mha__attn_common(&a, c->o, B, r->H, Lq, c->Lk, Lke, r->D, r->D);
    a.Hkv = r->Hkv; a.group = r->H / r->Hkv;
    a.weights = c->weights; a.per_head = c->o->per_head_weights != 0;
    a.shared_pack = r->H < a.nthreads;
    if (saves) a.lse = c->ws + L->lse;   /* (copied to the caller's o->lse at the end) */
    for (b = 0; b < B; b += L->chunk_b) {
        int q0;
        a.b0 = b;
        a.nb = B - b < L->chunk_b ? B - b : L->chunk_b;
        for (q0 = 0; q0 < Lq; q0 += L->chunk_q) {
            size_t first = ((size_t)b * Lq + q0) * E;   /* offset of the chunk in query/out */
            int rows;
            /* saving: Q and C of every row stay, each chunk at its rows */
            float *qc = saves ? c->ws + L->qp + first : qp, *oc = saves ? ctx + first : qc;
            a.q0 = q0;
            a.nq = Lq - q0 < L->chunk_q ? Lq - q0 : L->chunk_q;
            rows = a.nb * a.nq;

            /* 2. Q = Xq Wq^T + bq for the chunk's rows */
            mha__linear_pp(rows, E, E, c->query + first, r->wq, r->bq, qc, scratch, nt, r->pq);
            mha__rope_apply(&r->rope, r->D, a.nb, a.nq, r->H, (size_t)a.nq * E, (size_t)E, (size_t)r->D,
                            mha__query_pos0(c->o, Lq, c->Lk) + q0, NULL, 1.0f, qc);

            /* 3. attention per (batch, head) on the head-interleaved [rows, E]
               layout; each head's context overwrites that head's Q columns,
               which its tile has finished reading, so no context buffer
               (unless the forward is saved: then C has its own) */
            a.q.p = qc; a.q.rs = (size_t)E; a.q.hs = (size_t)r->D; a.q.bs = (size_t)a.nq * E;
            a.k.p = kp + (size_t)b * Lke * Ekv;
            a.k.rs = (size_t)Ekv; a.k.hs = (size_t)r->D; a.k.bs = (size_t)Lke * Ekv;
            a.v.p = vp + (size_t)b * Lke * Ekv;
            a.v.rs = (size_t)Ekv; a.v.hs = (size_t)r->D; a.v.bs = (size_t)Lke * Ekv;
            a.o = oc;   a.o_rs = (size_t)E; a.o_hs = (size_t)r->D; a.o_bs = (size_t)a.nq * E;
            mha__attend_all(&a, scratch, L->per_thread);

            /* 4. output projection: out = concat_h(O_h) Wo^T + bo */
            mha__linear_pp(rows, E, E, oc, r->wo, r->bo, c->out + first, scratch, nt, r->po);
        }
    }
    if (saves && c->o->lse) memcpy(c->o->lse, a.lse, (size_t)B * r->H * Lq * sizeof(float));
}

/* The layout of this run's lengths and path (within the plan's). */
static void mha__fwd_layout_run(const mha__run *c, mha__fwd_layout *L)
{
    (void)mha__fwd_layout_at(c->r, c->B, c->Lq, c->Lk, c->weights != NULL, c->p->by_head,
                             c->p->nthreads, c->p->saves, L);
}
static void mha__module_forward(const mha__run *c)
{
    mha__fwd_layout L;
    mha__fwd_layout_run(c, &L);
    if (c->p->by_head && !c->weights) mha__forward_by_head(c, &L);
    else mha__forward_chunks(c, &L);
}

/* Backward of the module, in the reverse order of the forward:
     forward:  Q = Xq Wq^T + bq,  K = ..,  V = ..           [B*L, E]
               C_h = softmax(scale Q_h K_h^T + mask) V_h     per head
               Y = C Wo^T + bo
     backward: dC = dY Wo;   dWo += dY^T C;   dbo += colsum dY
               dQ_h, dK_h, dV_h from the head backward
               dXq += dQ Wq;  dWq += dQ^T Xq;  dbq += colsum dQ   (and K, V)  */
static void mha__module_backward(const mha__run *c)
{
    const mha__mod *r = c->r;
    const mha_module_grad *grad = c->grad;
    mha__bwd_layout L;
    mha__attn a;
    float *ws = c->ws, *qp, *kp, *vp, *ctx, *dctx, *dqp, *dkp, *dvp, *gws;
    float *gwq, *gwk, *gwv, *gbq, *gbk, *gbv;
    size_t nq, nk;
    int E = r->E, Ekv = r->Ekv, B = c->B, Lq = c->Lq, Lk = c->Lk, Lke = c->Lke, nt = c->p->nthreads;

    (void)mha__bwd_layout_at(r, B, Lq, Lk, nt, c->p->saves, &L);
    nq = (size_t)B * Lq * E; nk = (size_t)B * Lke * Ekv;
    qp = ws + L.qp; kp = ws + L.kp; vp = ws + L.vp; ctx = ws + L.ctx; dctx = ws + L.dctx;
    dqp = ws + L.dqp; dkp = ws + L.dkp; dvp = ws + L.dvp; gws = ws + L.gws;
    /* the gradients in the layout the weights came in */
    if (r->in_proj) {
        gwq = grad->in_proj_weight;
        gwk = gwq ? gwq + (size_t)E * E : NULL;
        gwv = gwq ? gwq + (size_t)(E + Ekv) * E : NULL;
    } else {
        gwq = grad->q_proj_weight; gwk = grad->k_proj_weight; gwv = grad->v_proj_weight;
    }
    gbq = r->bq ? grad->in_proj_bias : NULL;
    gbk = gbq ? gbq + E : NULL;
    gbv = gbq ? gbq + E + Ekv : NULL;

    /* 1. the projections Q, K, V (K and V with their appended rows), RoPE:
          saved by the forward, or recomputed */
    if (!c->use_saved) {
        mha__linear_pp(B * Lq, E, E, c->query, r->wq, r->bq, qp, gws, nt, r->pq);
        mha__kv_project(B, Lk, r->kdim, Ekv, c->key, r->wk, r->bk, r->bias_k, r->zero_attn, kp, gws, nt, r->pk);
        mha__kv_project(B, Lk, r->vdim, Ekv, c->value, r->wv, r->bv, r->bias_v, r->zero_attn, vp, gws, nt, r->pv);
        mha__rope_apply(&r->rope, r->D, B, Lq, r->H, (size_t)Lq * E, (size_t)E, (size_t)r->D,
                        mha__query_pos0(c->o, Lq, Lk), NULL, 1.0f, qp);
        mha__rope_apply(&r->rope, r->D, B, Lk, r->Hkv, (size_t)Lke * Ekv, (size_t)Ekv, (size_t)r->D,
                        c->o->position_offset, NULL, 1.0f, kp);
    }

    /* 2. through the output projection: dC = dY Wo   [B*Lq, E] */
    mha__gemm_mt(0, 0, B * Lq, E, E, 1.0f, c->dout, (size_t)E, r->wo, (size_t)E, 0.0f,
                 dctx, (size_t)E, gws, nt);

    /* 3. attention, head by head: C (for step 4; saved: read) and dQ, dK, dV */
    memset(dqp, 0, nq * sizeof(float));
    memset(dkp, 0, nk * sizeof(float));
    memset(dvp, 0, nk * sizeof(float));
    mha__attn_common(&a, c->o, B, r->H, Lq, Lk, Lke, r->D, r->D);
    a.Hkv = r->Hkv; a.group = r->H / r->Hkv;
    a.q.p = qp; a.q.rs = (size_t)E; a.q.hs = (size_t)r->D; a.q.bs = (size_t)Lq * E;
    a.k.p = kp; a.k.rs = (size_t)Ekv; a.k.hs = (size_t)r->D; a.k.bs = (size_t)Lke * Ekv;
    a.v.p = vp; a.v.rs = (size_t)Ekv; a.v.hs = (size_t)r->D; a.v.bs = (size_t)Lke * Ekv;
    a.o = ctx;  a.o_rs = (size_t)E; a.o_hs = (size_t)r->D; a.o_bs = (size_t)Lq * E;
    a.weights = NULL; a.per_head = 0;
    a.nthreads = nt;
    mha__attend_backward_fused(&a, dctx, c->use_saved ? ws + L.lse : NULL, dqp, dkp, dvp, gws);

    /* RoPE backward: the rotated Q and K's gradients turn back (the transpose) */
    mha__rope_apply(&r->rope, r->D, B, Lq, r->H, (size_t)Lq * E, (size_t)E, (size_t)r->D,
                    mha__query_pos0(c->o, Lq, Lk), NULL, -1.0f, dqp);
    mha__rope_apply(&r->rope, r->D, B, Lk, r->Hkv, (size_t)Lke * Ekv, (size_t)Ekv, (size_t)r->D,
                    c->o->position_offset, NULL, -1.0f, dkp);

    /* 4. output projection weights: dWo += dY^T C,  dbo += colsum dY */
    mha__linear_backward(B * Lq, E, E, ctx, r->wo, c->dout, NULL, grad->out_proj_weight,
                         r->bo ? grad->out_proj_bias : NULL, gws, nt);

    /* 5. input projections: dX += dQ Wq,  dWq += dQ^T X,  dbq += colsum dQ (K, V alike;
          the bias_k / bias_v rows collect their own gradient) */
    mha__linear_backward(B * Lq, E, E, c->query, r->wq, dqp, c->dquery, gwq, gbq, gws, nt);
    mha__kv_project_backward(B, Lk, r->extra, r->kdim, Ekv, c->key, r->wk, dkp, c->dkey, gwk, gbk,
                             r->bias_k ? grad->bias_k : NULL, gws, nt);
    mha__kv_project_backward(B, Lk, r->extra, r->vdim, Ekv, c->value, r->wv, dvp, c->dvalue, gwv, gbv,
                             r->bias_v ? grad->bias_v : NULL, gws, nt);
}

/* Module runs start here: plan, lengths, masks, inputs (kind is MODULE or,
   inside an encoder run, ENCODER). */
static mha_status mha__module_run_begin(const mha_plan *p, int kind, int Lq, int Lk,
                                        const float *query, const float *key, const float *value,
                                        const void *attn_mask, const void *kpm, mha_options *o,
                                        mha__run *c)
{
    mha_status st;
    memset(c, 0, sizeof *c);
    if ((st = mha__run_begin(p, kind, Lq, Lk, attn_mask, kpm, o)) != MHA_OK) return st;
    if (!query || !key || !value) return MHA_ERR_NULL_POINTER;
    c->p = p; c->r = &p->mod; c->o = o;
    c->B = p->B; c->Lq = Lq; c->Lk = Lk; c->Lke = Lk + p->mod.extra;
    c->query = query; c->key = key; c->value = value;
    return MHA_OK;
}

/* The sum of a module run's saved forward (mha__mod_saved_at). */
static uint64_t mha__module_saved_sum(const mha__run *c)
{
    size_t at[5], n[5], cur = 0;
    const mha__mod *r = c->r;
    (void)mha__mod_saved_at(r, c->B, c->Lq, c->Lk, &cur, &at[0], &at[1], &at[2], &at[3], &at[4]);
    n[0] = n[3] = (size_t)c->B * c->Lq * r->E;
    n[1] = n[2] = (size_t)c->B * c->Lke * r->Ekv;
    n[4] = (size_t)c->B * r->H * c->Lq;
    return mha__saved_sum(c->ws, at, n, 5);
}

/* The saved-forward key of a module run: its plan, lengths, options, inputs. */
static uint64_t mha__module_key(const mha__run *c)
{
    const float *x[3];
    size_t n[3], rows = (size_t)c->B * c->Lq, keys = (size_t)c->B * c->Lk;
    x[0] = c->query; x[1] = c->key; x[2] = c->value;
    n[0] = rows * c->r->E; n[1] = keys * c->r->kdim; n[2] = keys * c->r->vdim;
    return mha__saved_key(c->p, c->o, c->Lq, c->Lk, x, n, 3);
}

MHADEF mha_status mha_module_forward(const mha_plan *p, int Lq, int Lk,
                                     const float *query, const float *key, const float *value,
                                     const void *attn_mask, const void *key_padding_mask,
                                     float *out, float *attn_weights,
                                     void *workspace, size_t workspace_bytes)
{
    mha_options o;
    mha__fwd_layout L;
    mha__run c;
    void *owned, *copy = NULL;
    uint64_t skey = 0;
    mha_status st;
    st = mha__module_run_begin(p, MHA__PLAN_MODULE, Lq, Lk, query, key, value, attn_mask,
                               key_padding_mask, &o, &c);
    if (st != MHA_OK) return st;
    if (!out) return MHA_ERR_NULL_POINTER;
    if (attn_weights && !(p->flags & MHA_PLAN_WEIGHTS)) return MHA_ERR_EXCEEDS_PLAN;
    c.out = out; c.weights = attn_weights;
    mha__fwd_layout_run(&c, &L);
    if ((st = mha__run_ws(p, workspace, workspace_bytes, L.total_floats, &owned, &c.ws)) != MHA_OK)
        return st;
    if (p->by_head && !attn_weights) {   /* out is written before the inputs are read */
        const float *x[3];
        size_t n[3];
        x[0] = query; x[1] = key; x[2] = value;
        n[0] = (size_t)p->B * Lq * p->mod.E;
        n[1] = (size_t)p->B * Lk * p->mod.kdim; n[2] = (size_t)p->B * Lk * p->mod.vdim;
        if ((st = mha__copy_aliased(out, n[0], x, n, &copy)) != MHA_OK) {
            if (owned) MHA_FREE(owned);
            return st;
        }
        c.query = x[0]; c.key = x[1]; c.value = x[2];
    }
    if (p->saves) {   /* keyed before out (which may be an input) is written */
        mha__saved_clear(c.ws);
        skey = owned ? 0 : mha__module_key(&c);
    }
    mha__module_forward(&c);
    if (p->saves && !owned) mha__saved_stamp(c.ws, skey ^ mha__module_saved_sum(&c));
    if (copy) MHA_FREE(copy);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

MHADEF mha_status mha_module_backward(const mha_plan *p, int Lq, int Lk,
                                      const float *query, const float *key, const float *value,
                                      const float *dout, const void *attn_mask,
                                      const void *key_padding_mask, float *dquery, float *dkey,
                                      float *dvalue, mha_module_grad *grad,
                                      void *workspace, size_t workspace_bytes)
{
    mha_options o;
    mha_module_grad nog;
    mha__bwd_layout L;
    mha__run c;
    void *owned;
    mha_status st;
    st = mha__module_run_begin(p, MHA__PLAN_MODULE, Lq, Lk, query, key, value, attn_mask,
                               key_padding_mask, &o, &c);
    if (st != MHA_OK) return st;
    if (!dout) return MHA_ERR_NULL_POINTER;
    if (!(p->flags & MHA_PLAN_TRAINING)) return MHA_ERR_EXCEEDS_PLAN;
    if (!grad) { memset(&nog, 0, sizeof nog); grad = &nog; }
    (void)mha__bwd_layout_at(&p->mod, p->B, Lq, Lk, p->nthreads, p->saves, &L);   /* within the plan's */
    if ((st = mha__run_ws(p, workspace, workspace_bytes, L.total_floats, &owned, &c.ws)) != MHA_OK)
        return st;
    c.dout = dout; c.dquery = dquery; c.dkey = dkey; c.dvalue = dvalue; c.grad = grad;
    if (p->saves && !owned) {   /* the saved forward of these inputs, or recompute over it */
        c.use_saved = mha__saved_magic(c.ws) &&
                      mha__saved_holds(c.ws, mha__module_key(&c) ^ mha__module_saved_sum(&c));
        if (!c.use_saved) mha__saved_clear(c.ws);
    }
    mha__module_backward(&c);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* ------------------------------------------------------ encoder layer */

/* The feed-forward block on rows rows: f = act(in W1^T + b1) W2^T + b2
   (z = in W1^T + b1, g = act(z); g may be z). */
static void mha__enc_ff(const mha_encoder_layer *ly, int rows, int E, const float *in, float *z,
                        float *g, float *f, float *gws, int nt)
{
    int F = ly->dim_feedforward;
    mha__linear(rows, E, F, in, ly->linear1_weight, ly->linear1_bias, z, gws, nt);
    mha__activation_forward(ly->activation, (size_t)rows * F, z, g);
    mha__linear(rows, F, E, g, ly->linear2_weight, ly->linear2_bias, f, gws, nt);
}
/* The second residual: y = LN2(h + f) (post-norm; t holds h + f, t may be
   f) or y = h + f (pre-norm; f may be y). */
static void mha__enc_residual2(const mha_encoder_layer *ly, int rows, int E, float eps,
                               const float *h, const float *f, float *t, float *y)
{
    size_t n = (size_t)rows * E, i;
    if (!ly->norm_first) {
        for (i = 0; i < n; ++i) t[i] = h[i] + f[i];
        mha__layernorm_forward(rows, E, t, ly->norm2_weight, ly->norm2_bias, eps, y);
    } else {
        for (i = 0; i < n; ++i) y[i] = h[i] + f[i];
    }
}

/* Inference: the feed-forward block runs on a few rows at a time, so no
   [N, F] buffer exists and the workspace grows with L E, as the attention's.
     post-norm:  a = SA(x);  h = LN1(x + a) (in a);  per rows:
                 f = act(h W1^T + b1) W2^T + b2;  y = LN2(h + f)
     pre-norm:   y = LN1(x) (y holds it until the rows are reached);
                 a = SA(y);  h = x + a (in a);  per rows:
                 t = LN2(h);  f = act(t W1^T + b1) W2^T + b2;  y = h + f      */
static void mha__enc_infer(const mha_plan *p, const mha__run *c0, const float *x, float *y,
                           const mha__enc_layout *P)
{
    const mha_encoder_layer *ly = &p->enc;
    mha__run c = *c0;
    int E = p->mod.E, N = c.B * c.Lq, nt = p->nthreads, r0;
    size_t ne = (size_t)N * E, i;
    float eps = ly->layer_norm_eps > 0.0f ? ly->layer_norm_eps : 1e-5f;
    float *a = c0->ws + P->a, *zc = c0->ws + P->zc, *tc = c0->ws + P->tc, *fc = c0->ws + P->fc;
    float *gws = c0->ws + P->gws;

    /* 1. self-attention block, h into a */
    c.ws = c0->ws + P->sub;
    c.out = a;
    if (!ly->norm_first) {
        c.query = c.key = c.value = x;
        mha__module_forward(&c);
        for (i = 0; i < ne; ++i) a[i] += x[i];
        mha__layernorm_forward(N, E, a, ly->norm1_weight, ly->norm1_bias, eps, a);
    } else {
        mha__layernorm_forward(N, E, x, ly->norm1_weight, ly->norm1_bias, eps, y);
        c.query = c.key = c.value = y;
        mha__module_forward(&c);
        for (i = 0; i < ne; ++i) a[i] += x[i];
    }
    /* 2. feed-forward and the second residual, rows r0.. at a time */
    for (r0 = 0; r0 < N; r0 += (int)P->rows) {
        int rows = N - r0 < (int)P->rows ? N - r0 : (int)P->rows;
        const float *h = a + (size_t)r0 * E, *ffin = h;
        if (ly->norm_first) {
            mha__layernorm_forward(rows, E, h, ly->norm2_weight, ly->norm2_bias, eps, tc);
            ffin = tc;
        }
        mha__enc_ff(ly, rows, E, ffin, zc, zc, fc, gws, nt);
        mha__enc_residual2(ly, rows, E, eps, h, fc, fc, y + (size_t)r0 * E);
    }
}

/* Training: the forward pass, leaving every intermediate in the workspace.
     post-norm:  a = SA(x);  t1 = x + a;  h = LN1(t1);  z = h W1^T + b1;  g = act(z);
                 f = g W2^T + b2;  t2 = h + f;  y = LN2(t2)
     pre-norm:   t1 = LN1(x);  a = SA(t1);  h = x + a;  t2 = LN2(h);  z = t2 W1^T + b1;
                 g = act(z);  f = g W2^T + b2;  y = h + f                          */
static void mha__enc_forward(const mha_plan *p, const mha__run *c0, const float *x, float *y,
                             const mha__enc_layout *P)
{
    const mha_encoder_layer *ly = &p->enc;
    mha__run c = *c0;
    int E = p->mod.E, N = c.B * c.Lq, nt = p->nthreads;
    size_t ne = (size_t)N * E, i;
    float eps = ly->layer_norm_eps > 0.0f ? ly->layer_norm_eps : 1e-5f;
    float *ws = c0->ws, *a = ws + P->a, *t1 = ws + P->t1, *h = ws + P->h, *z = ws + P->z;
    float *g = ws + P->g, *t2 = ws + P->t2, *gws = ws + P->gws;
    const float *ffin;

    /* 1. self-attention block (the weights when the run asks: c0's) */
    c.ws = ws + P->sub;
    c.out = a;
    if (!ly->norm_first) {
        c.query = c.key = c.value = x;
        mha__module_forward(&c);
        for (i = 0; i < ne; ++i) t1[i] = x[i] + a[i];
        mha__layernorm_forward(N, E, t1, ly->norm1_weight, ly->norm1_bias, eps, h);
        ffin = h;
    } else {
        mha__layernorm_forward(N, E, x, ly->norm1_weight, ly->norm1_bias, eps, t1);
        c.query = c.key = c.value = t1;
        mha__module_forward(&c);
        for (i = 0; i < ne; ++i) h[i] = x[i] + a[i];
        mha__layernorm_forward(N, E, h, ly->norm2_weight, ly->norm2_bias, eps, t2);
        ffin = t2;
    }

    /* 2. feed-forward block, f into y; 3. second residual (and norm) */
    mha__enc_ff(ly, N, E, ffin, z, g, y, gws, nt);
    mha__enc_residual2(ly, N, E, eps, h, y, t2, y);
}

/* The saved-forward key of an encoder run (x is every input), and the sum
   of its saved activations: t1, h, z, g, t2 and the self-attention's. */
static uint64_t mha__enc_key(const mha__run *c, const float *x)
{
    size_t n = (size_t)c->B * c->Lq * c->r->E;
    return mha__saved_key(c->p, c->o, c->Lq, c->Lk, &x, &n, 1);
}
static uint64_t mha__enc_saved_sum(const mha__run *c, const mha__enc_layout *P)
{
    mha__run sub = *c;
    size_t at[5], n[5], ne = (size_t)c->B * c->Lq * c->r->E, nf = (size_t)c->B * c->Lq * c->p->enc.dim_feedforward;
    at[0] = P->t1; at[1] = P->h; at[2] = P->z; at[3] = P->g; at[4] = P->t2;
    n[0] = n[1] = n[4] = ne; n[2] = n[3] = nf;
    sub.ws = c->ws + P->sub;
    return mha__saved_sum(c->ws, at, n, 5) ^ mha__module_saved_sum(&sub);
}

MHADEF mha_status mha_encoder_run(const mha_plan *p, int L, const float *x,
                                  const void *attn_mask, const void *key_padding_mask,
                                  float *y, float *attn_weights, void *workspace, size_t workspace_bytes)
{
    mha_options o;
    mha__enc_layout P;
    mha__run c;
    void *owned;
    mha_status st;
    if ((st = mha__module_run_begin(p, MHA__PLAN_ENCODER, L, L, x, x, x, attn_mask, key_padding_mask,
                                    &o, &c)) != MHA_OK)
        return st;
    if (!y) return MHA_ERR_NULL_POINTER;
    if (attn_weights && !(p->flags & MHA_PLAN_WEIGHTS)) return MHA_ERR_EXCEEDS_PLAN;
    (void)mha__enc_layout_at(p, L, p->saves, &P);   /* within the plan's */
    if ((st = mha__run_ws(p, workspace, workspace_bytes, P.total_floats, &owned, &c.ws)) != MHA_OK)
        return st;
    c.weights = attn_weights;
    if (p->saves && !owned) {   /* training: keep every activation for the backward */
        uint64_t key;
        mha__saved_clear(c.ws + P.hdr);
        key = mha__enc_key(&c, x);
        mha__enc_forward(p, &c, x, y, &P);
        mha__saved_stamp(c.ws + P.hdr, key ^ mha__enc_saved_sum(&c, &P));
    } else {
        if (p->saves) (void)mha__enc_layout_at(p, L, 0, &P);   /* (nothing to keep: inference's) */
        mha__enc_infer(p, &c, x, y, &P);
    }
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* Backward: recompute the forward (into the workspace), then walk it in reverse.
     post-norm:  dt2 = LN2'(dy);  dh = dt2;  df = dt2;  dg = df W2;  dz = dg act'(z);
                 dh += dz W1;  dt1 = LN1'(dh);  dx += dt1;  dx += SA'(dt1)
     pre-norm:   dh = dy;  df = dy;  dg = df W2;  dz = dg act'(z);  dt2 = dz W1;
                 dh += LN2'(dt2);  dx += dh;  dt1 = SA'(dh);  dx += LN1'(dt1)
   (LN' and SA' are the layer norm's and the self-attention's backward; the
   weight gradients are added on the way.)  */
MHADEF mha_status mha_encoder_run_backward(const mha_plan *p, int L, const float *x, const float *dy,
                                           const void *attn_mask, const void *key_padding_mask,
                                           float *dx, mha_encoder_layer_grad *grad,
                                           void *workspace, size_t workspace_bytes)
{
    const mha_encoder_layer *ly;
    mha_options o;
    mha_encoder_layer_grad nog;
    mha__enc_layout P;
    mha__run c;
    void *owned;
    float *ws, *t1, *h, *z, *g, *t2, *d1, *d2, *dg, *gws, eps;
    size_t ne, nf, i;
    int E, F, N, nt;
    mha_status st;

    if ((st = mha__module_run_begin(p, MHA__PLAN_ENCODER, L, L, x, x, x, attn_mask, key_padding_mask,
                                    &o, &c)) != MHA_OK)
        return st;
    if (!dy) return MHA_ERR_NULL_POINTER;
    if (!(p->flags & MHA_PLAN_TRAINING)) return MHA_ERR_EXCEEDS_PLAN;
    if (!grad) { memset(&nog, 0, sizeof nog); grad = &nog; }
    (void)mha__enc_layout_at(p, L, 1, &P);   /* within the plan's */
    if ((st = mha__run_ws(p, workspace, workspace_bytes, P.total_floats, &owned, &ws)) != MHA_OK)
        return st;
    ly = &p->enc;
    E = p->mod.E; F = ly->dim_feedforward; N = p->B * L; nt = p->nthreads;
    ne = (size_t)N * E; nf = (size_t)N * F;
    eps = ly->layer_norm_eps > 0.0f ? ly->layer_norm_eps : 1e-5f;
    t1 = ws + P.t1; h = ws + P.h; z = ws + P.z; g = ws + P.g; t2 = ws + P.t2;
    d1 = ws + P.d1; d2 = ws + P.d2; dg = ws + P.dg; gws = ws + P.gws;

    /* 1. the forward's activations: saved by the forward run in this
          workspace (for this x), or recomputed (y itself is not needed, d1
          holds it for now) */
    c.ws = ws;
    if (p->saves && !owned) {
        c.use_saved = mha__saved_magic(ws + P.hdr) &&
                      mha__saved_holds(ws + P.hdr, mha__enc_key(&c, x) ^ mha__enc_saved_sum(&c, &P));
        if (!c.use_saved) mha__saved_clear(ws + P.hdr);
    }
    if (!c.use_saved) mha__enc_forward(p, &c, x, d1, &P);
    memset(d2, 0, ne * sizeof(float));
    memset(dg, 0, nf * sizeof(float));
    c.ws = ws + P.sub;
    c.grad = &grad->self_attn;

    if (!ly->norm_first) {
        /* 2. dt2 = LN2'(dy) -> d1; it flows into both h and f */
        memset(d1, 0, ne * sizeof(float));
        mha__layernorm_backward(N, E, t2, ly->norm2_weight, eps, dy, d1,
                                ly->norm2_weight ? grad->norm2_weight : NULL,
                                ly->norm2_bias ? grad->norm2_bias : NULL);
        /* 3. feed-forward: dg = df W2, dz = dg act'(z), dh += dz W1 (d1 is dh now) */
        mha__linear_backward(N, F, E, g, ly->linear2_weight, d1, dg, grad->linear2_weight,
                             ly->linear2_bias ? grad->linear2_bias : NULL, gws, nt);
        mha__activation_backward(ly->activation, nf, z, dg);
        mha__linear_backward(N, E, F, h, ly->linear1_weight, dg, d1, grad->linear1_weight,
                             ly->linear1_bias ? grad->linear1_bias : NULL, gws, nt);
        /* 4. dt1 = LN1'(dh) -> d2; the residual passes it to x, the attention too */
        mha__layernorm_backward(N, E, t1, ly->norm1_weight, eps, d1, d2,
                                ly->norm1_weight ? grad->norm1_weight : NULL,
                                ly->norm1_bias ? grad->norm1_bias : NULL);
        if (dx) for (i = 0; i < ne; ++i) dx[i] += d2[i];
        c.dout = d2; c.dquery = c.dkey = c.dvalue = dx;
        mha__module_backward(&c);
    } else {
        /* 2. feed-forward on t2 = LN2(h): dg = dy W2, dz, dt2 = dz W1 -> d2 */
        mha__linear_backward(N, F, E, g, ly->linear2_weight, dy, dg, grad->linear2_weight,
                             ly->linear2_bias ? grad->linear2_bias : NULL, gws, nt);
        mha__activation_backward(ly->activation, nf, z, dg);
        mha__linear_backward(N, E, F, t2, ly->linear1_weight, dg, d2, grad->linear1_weight,
                             ly->linear1_bias ? grad->linear1_bias : NULL, gws, nt);
        /* 3. dh = dy + LN2'(dt2) -> d1 */
        memcpy(d1, dy, ne * sizeof(float));
        mha__layernorm_backward(N, E, h, ly->norm2_weight, eps, d2, d1,
                                ly->norm2_weight ? grad->norm2_weight : NULL,
                                ly->norm2_bias ? grad->norm2_bias : NULL);
        /* 4. the residual passes dh to x; the attention's input t1 = LN1(x) gets dt1 -> d2 */
        if (dx) for (i = 0; i < ne; ++i) dx[i] += d1[i];
        memset(d2, 0, ne * sizeof(float));
        c.query = c.key = c.value = t1;
        c.dout = d1; c.dquery = c.dkey = c.dvalue = d2;
        mha__module_backward(&c);
        mha__layernorm_backward(N, E, x, ly->norm1_weight, eps, d2, dx,
                                ly->norm1_weight ? grad->norm1_weight : NULL,
                                ly->norm1_bias ? grad->norm1_bias : NULL);
    }
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* --------------------------------------------------------- KV cache */

static mha_status mha__check_cache(const mha_kv_cache *c)
{
    size_t n;
    int b;
    if (!c || !c->k || !c->v || !c->len) return MHA_ERR_NULL_POINTER;
    if (c->B <= 0 || c->Hkv <= 0 || c->D <= 0 || c->capacity <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul3((size_t)c->B * (size_t)c->Hkv, (size_t)c->capacity, (size_t)c->D, &n) ||
        !mha__mul(n, sizeof(float), &n) || !mha__dim_ok(c->capacity) || !mha__dim_ok(c->D))
        return MHA_ERR_OVERFLOW;
    if (c->ring && (c->n_keep < 0 || c->n_keep >= c->capacity)) return MHA_ERR_INVALID_ARGUMENT;
    for (b = 0; b < c->B; ++b)
        if (c->len[b] < 0 || (!c->ring && c->len[b] > c->capacity)) return MHA_ERR_INVALID_ARGUMENT;
    return MHA_OK;
}

/* The slot of token t (the ring's rule; t itself without a ring) */
static int mha__cache_slot(const mha_kv_cache *c, int t)
{
    if (!c->ring || t < c->n_keep) return t;
    return c->n_keep + (t - c->n_keep) % (c->capacity - c->n_keep);
}

/* Room for n more tokens in every row? */
static mha_status mha__cache_room(const mha_kv_cache *c, int n)
{
    int b;
    for (b = 0; b < c->B; ++b) if (c->len[b] > INT_MAX - n) return MHA_ERR_OVERFLOW;
    /* a ring takes any chunk that fits, or one that wraps but is no longer
       than its rolling part (else the chunk would overwrite itself) */
    for (b = 0; b < c->B; ++b)
        if (n > c->capacity - c->len[b] && (!c->ring || n > c->capacity - c->n_keep)) return MHA_ERR_CAPACITY;
    return MHA_OK;
}

/* Copy n tokens of every row into the cache at len[b]; token t of row b, KV
   head g is at k + b*bs + g*hs + t*ts.  len += n.  */
static void mha__cache_write(mha_kv_cache *c, int n, const float *k, const float *v, size_t bs, size_t hs,
                             size_t ts)
{
    int b, g, t, D = c->D;
    for (b = 0; b < c->B; ++b) {
        for (g = 0; g < c->Hkv; ++g)
            for (t = 0; t < n; ++t) {
                size_t dst = (((size_t)b * c->Hkv + g) * c->capacity + mha__cache_slot(c, c->len[b] + t)) * D;
                size_t src = (size_t)b * bs + (size_t)g * hs + (size_t)t * ts;
                memcpy(c->k + dst, k + src, (size_t)D * sizeof(float));
                memcpy(c->v + dst, v + src, (size_t)D * sizeof(float));
            }
        c->len[b] += n;
    }
}

MHADEF mha_status mha_kv_cache_append(mha_kv_cache *c, int n, const float *k_new, const float *v_new)
{
    mha_status st;
    if ((st = mha__check_cache(c)) != MHA_OK) return st;
    if (!k_new || !v_new) return MHA_ERR_NULL_POINTER;
    if (n <= 0) return MHA_ERR_INVALID_SIZE;
    if ((st = mha__cache_room(c, n)) != MHA_OK) return st;
    mha__cache_write(c, n, k_new, v_new, (size_t)c->Hkv * n * c->D, (size_t)n * c->D, (size_t)c->D);
    return MHA_OK;
}

/* Checks and scratch of an attention over the cache: one row at a time, with
   keys up to capacity.  */
/* A ring row is attended in up to three runs of slots with consecutive
   positions, merged by their log-sum-exp: [H, Lq, D] outputs and [H, Lq]
   lse, entropy, max and first weight of each, after the attention scratch.  */
static size_t mha__ring_floats(const mha_kv_cache *c, int H, int Lq)
{
    return c->ring ? 3 * mha__round_floats((size_t)H * Lq * ((size_t)c->D + 4)) : 0;
}

static mha_status mha__cache_attend_plan(const mha_kv_cache *c, int H, int Lq, const mha_options *opt,
                                         size_t *per_thread, size_t *total_floats)
{
    mha_status st;
    int b, nt = mha__max_threads(opt);
    if ((st = mha__check_cache(c)) != MHA_OK) return st;
    if (H <= 0 || Lq <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__dim_ok(H) || !mha__dim_ok(Lq) || (size_t)H * (size_t)Lq > LONG_MAX) return MHA_ERR_OVERFLOW;
    if (opt->attn_mask.kind != MHA_MASK_NONE || opt->key_padding_mask.kind != MHA_MASK_NONE)
        return MHA_ERR_INVALID_ARGUMENT;
    if ((st = mha__check_masks(opt, c->B, H, Lq, c->capacity)) != MHA_OK) return st;
    if ((st = mha__check_decode(opt, H, c->Hkv, NULL, c->D)) != MHA_OK) return st;
    for (b = 0; b < c->B; ++b) if (c->len[b] < 1) return MHA_ERR_INVALID_ARGUMENT;   /* no key */
    for (b = 0; c->ring && b < c->B; ++b)   /* the newest Lq tokens must all be held */
        if (c->len[b] > c->capacity && Lq > c->capacity - c->n_keep) return MHA_ERR_CAPACITY;
    if (!mha__attn_scratch_floats(Lq, c->capacity, c->capacity, c->D, c->D, nt, 0, H < nt, per_thread,
                                  total_floats) ||
        !mha__add(*total_floats, mha__ring_floats(c, H, Lq), total_floats) ||
        !mha__add(*total_floats, MHA__ALIGN_FLOATS, total_floats))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

/* Attention of row b's queries against its slots s0..s0+n-1, which hold
   consecutive positions p0..p0+n-1; query i is at position qpos0 + i, so
   key j is allowed as j <= i + (qpos0 - p0) says (causal_off), and ALiBi
   and the window measure the same distance.  */
static void mha__cache_run_part(const mha_kv_cache *c, int b, int H, int Lq, const mha_options *opt,
                                const mha__view *q, float *o, size_t o_hs, size_t o_rs, float *lse,
                                const mha_row_stats *rs, int s0, int n, int p0, int qpos0, int with_sinks, float *ws, size_t per_thread)
{
    mha__attn a;
    int D = c->D;
    mha__attn_common(&a, opt, 1, H, Lq, n, n, D, D);
    a.causal_off = (ptrdiff_t)qpos0 - p0;
    a.Hkv = c->Hkv; a.group = H / c->Hkv;
    a.q.p = q->p + (size_t)b * q->bs; a.q.bs = 0; a.q.hs = q->hs; a.q.rs = q->rs;
    a.k.p = c->k + ((size_t)b * c->Hkv * c->capacity + s0) * D;
    a.v.p = c->v + ((size_t)b * c->Hkv * c->capacity + s0) * D;
    a.k.bs = a.v.bs = 0; a.k.hs = a.v.hs = (size_t)c->capacity * D; a.k.rs = a.v.rs = (size_t)D;
    a.o = o; a.o_bs = 0; a.o_hs = o_hs; a.o_rs = o_rs;
    a.weights = NULL; a.per_head = 1;
    mha__attn_stats(&a, lse, rs);
    if (!with_sinks) a.sinks = NULL;
    a.shared_pack = H < a.nthreads;
    mha__attend_all(&a, ws, per_thread);
}

/* The row statistics of np parts of a row's keys merged (the chain rule of
   entropy), with w_p = exp(lse_p - lse) the share of part p:
       H = sum_p w_p (H_p - log w_p),    max = max_p w_p max_p
       first = w_0 first_0 when part 0 starts at key 0 (has_key0), else 0
   part p's statistics are st[p][0..3][r] (lse, entropy, max, first).  */
static void mha__merge_row_stats(int np, size_t rows, float *st[3][4], int has_key0,
                                 const mha_row_stats *out, size_t off)
{
    size_t r;
    int p;
    for (r = 0; r < rows; ++r) {
        double m = -INFINITY, sum = 0.0, lse, H = 0.0, mx = 0.0, first = 0.0;
        for (p = 0; p < np; ++p) if (st[p][0][r] > m) m = st[p][0][r];
        for (p = 0; p < np; ++p) if (st[p][0][r] != -INFINITY) sum += exp(st[p][0][r] - m);
        lse = sum > 0.0 ? m + log(sum) : -INFINITY;
        for (p = 0; p < np && sum > 0.0; ++p) {
            double w = st[p][0][r] != -INFINITY ? exp(st[p][0][r] - lse) : 0.0;
            if (w == 0.0) continue;
            H += w * (st[p][1][r] - (st[p][0][r] - lse));
            if (w * st[p][2][r] > mx) mx = w * st[p][2][r];
            if (p == 0 && has_key0) first = w * st[0][3][r];
        }
        if (out->entropy) out->entropy[off + r] = H > 0.0 ? (float)H : 0.0f;
        if (out->max_weight) out->max_weight[off + r] = (float)mx;
        if (out->first_weight) out->first_weight[off + r] = (float)first;
        if (out->lse) out->lse[off + r] = sum > 0.0 ? (float)lse : -INFINITY;
    }
}

/* Run it: queries and outputs as views (b, h, i) -> p + b*bs + h*hs + i*rs.
   Each row has its own Lk = len[b] (bottom-right: query i at len[b] - Lq + i).
   A ring row that has wrapped holds its positions in up to three runs of
   slots (the kept first tokens, then the rolling part in two pieces),
   attended one by one into ring and merged by their log-sum-exp (the sink
   goes with the first).  */
static void mha__cache_attend_run(const mha_kv_cache *c, int H, int Lq, const mha_options *opt,
                                  const mha__view *q, float *o, size_t o_bs, size_t o_hs, size_t o_rs,
                                  float *ws, size_t per_thread, float *ring)
{
    int b, D = c->D;
    const mha_row_stats *rs = opt->row_stats;
    for (b = 0; b < c->B; ++b) {
        int T = c->len[b], W = c->capacity - c->n_keep, np = 0, s_old, i, h, p, x;
        size_t part = mha__round_floats((size_t)H * Lq * ((size_t)D + 4)), rows = (size_t)H * Lq;
        size_t off = (size_t)b * rows;
        float *lse = opt->lse ? opt->lse + off : NULL, *outs[3], *lses[3], *st[3][4];
        mha_row_stats row, parts[3];
        if (rs) {   /* row b's slice of the caller's statistics */
            row.lse = rs->lse ? rs->lse + off : NULL;
            row.entropy = rs->entropy ? rs->entropy + off : NULL;
            row.max_weight = rs->max_weight ? rs->max_weight + off : NULL;
            row.first_weight = rs->first_weight ? rs->first_weight + off : NULL;
        }
        if (!c->ring || T <= c->capacity) {
            mha__cache_run_part(c, b, H, Lq, opt, q, o + (size_t)b * o_bs, o_hs, o_rs, lse, rs ? &row : NULL,
                                0, T, 0, T - Lq, 1, ws, per_thread);
            continue;
        }
        for (p = 0; p < 3; ++p) {
            outs[p] = ring + (size_t)p * part;
            for (x = 0; x < 4; ++x) st[p][x] = outs[p] + rows * ((size_t)D + (size_t)x);
            lses[p] = st[p][0];
            parts[p].lse = st[p][0]; parts[p].entropy = st[p][1];
            parts[p].max_weight = st[p][2]; parts[p].first_weight = st[p][3];
        }
        if (c->n_keep > 0) {           /* the kept first tokens: slots = positions 0..n_keep-1 */
            mha__cache_run_part(c, b, H, Lq, opt, q, outs[np], (size_t)Lq * D, (size_t)D, lses[np],
                                rs ? &parts[np] : NULL, 0, c->n_keep, 0, T - Lq, 1, ws, per_thread);
            ++np;
        }
        /* the rolling part holds positions T-W..T-1, the oldest at slot s_old */
        s_old = mha__cache_slot(c, T - W);
        mha__cache_run_part(c, b, H, Lq, opt, q, outs[np], (size_t)Lq * D, (size_t)D, lses[np],
                            rs ? &parts[np] : NULL, s_old, c->capacity - s_old, T - W, T - Lq, np == 0,
                            ws, per_thread);
        ++np;
        if (s_old > c->n_keep) {
            mha__cache_run_part(c, b, H, Lq, opt, q, outs[np], (size_t)Lq * D, (size_t)D, lses[np],
                                rs ? &parts[np] : NULL, c->n_keep, s_old - c->n_keep,
                                T - W + (c->capacity - s_old), T - Lq, 0, ws, per_thread);
            ++np;
        }
        if (rs) mha__merge_row_stats(np, rows, st, c->n_keep > 0, rs, off);
        (void)mha_attn_merge(np, rows, D, (const float *const *)outs, (const float *const *)lses,
                             outs[0], lse);
        for (h = 0; h < H; ++h)
            for (i = 0; i < Lq; ++i)
                memcpy(o + (size_t)b * o_bs + (size_t)h * o_hs + (size_t)i * o_rs,
                       outs[0] + ((size_t)h * Lq + i) * D, (size_t)D * sizeof(float));
    }
}

MHADEF mha_status mha_kv_cache_attend_workspace_size(const mha_kv_cache *c, int H, int Lq,
                                                     const mha_options *opt, size_t *bytes)
{
    mha_options zero;
    size_t per_thread, total;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__cache_attend_plan(c, H, Lq, opt, &per_thread, &total)) != MHA_OK) return st;
    return mha__mul(total, sizeof(float), bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
}

MHADEF mha_status mha_kv_cache_attend(const mha_kv_cache *c, int H, int Lq, const float *q,
                                      const mha_options *opt, float *out,
                                      void *workspace, size_t workspace_bytes)
{
    mha_options zero;
    mha__view qv;
    size_t per_thread, total, need;
    void *owned;
    float *ws;
    mha_status st;
    int D;
    if (!q || !out) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__cache_attend_plan(c, H, Lq, opt, &per_thread, &total)) != MHA_OK) return st;
    if (!mha__mul(total, sizeof(float), &need)) return MHA_ERR_OVERFLOW;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;
    D = c->D;
    qv.p = q; qv.bs = (size_t)H * Lq * D; qv.hs = (size_t)Lq * D; qv.rs = (size_t)D;
    mha__cache_attend_run(c, H, Lq, opt, &qv, out, (size_t)H * Lq * D, (size_t)Lq * D, (size_t)D, ws, per_thread,
                          ws + total - MHA__ALIGN_FLOATS - mha__ring_floats(c, H, Lq));
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* Workspace of mha_forward_cached: Q (then the context) [B*Lq, E], the new
   K and V [B*Lq, Ekv], then scratch for the attention and the GEMMs.  */
typedef struct mha__cached_layout {
    mha__mod r;                        /* the module, weights resolved */
    int E, H, D, Ekv;
    size_t qp, kn, vn, ring, scratch, per_thread, total_floats;
} mha__cached_layout;

static mha_status mha__cached_plan(const mha_module *m, const mha_kv_cache *c, int Lq, const mha_options *opt,
                                   mha__cached_layout *L)
{
    int B, nt = mha__max_threads(opt);
    size_t attn, g, g2, cur = 0;
    mha_status st;
    if ((st = mha__check_cache(c)) != MHA_OK) return st;
    B = c->B;
    if ((st = mha__check_module(m, &L->r)) != MHA_OK) return st;
    if (Lq <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__dim_ok(Lq)) return MHA_ERR_OVERFLOW;
    L->E = L->r.E; L->H = L->r.H; L->D = L->r.D;
    if (L->r.kdim != L->E || L->r.vdim != L->E || L->r.extra) return MHA_ERR_INVALID_ARGUMENT;
    if (opt->attn_mask.kind != MHA_MASK_NONE || opt->key_padding_mask.kind != MHA_MASK_NONE)
        return MHA_ERR_INVALID_ARGUMENT;
    if ((st = mha__check_masks(opt, B, L->H, Lq, Lq)) != MHA_OK) return st;
    if ((st = mha__check_decode(opt, L->H, m->num_kv_heads, &m->rope, L->D)) != MHA_OK) return st;
    if ((m->num_kv_heads ? m->num_kv_heads : L->H) != c->Hkv || L->D != c->D) return MHA_ERR_INVALID_ARGUMENT;
    if ((size_t)B * (size_t)Lq > MHA__INT_LIMIT) return MHA_ERR_OVERFLOW;   /* GEMM rows (int audit) */
    L->Ekv = c->Hkv * L->D;
    if ((st = mha__cache_room(c, Lq)) != MHA_OK) return st;
    if (!mha__attn_scratch_floats(Lq, c->capacity, c->capacity, L->D, L->D, nt, 0, L->H < nt, &L->per_thread,
                                  &attn))
        return MHA_ERR_OVERFLOW;
    g = mha__gemm_ws_floats_mt(B * Lq, L->E, L->E, nt);
    g2 = mha__gemm_ws_floats_mt(B * Lq, L->Ekv, L->E, nt); if (g2 > g) g = g2;
    if (!mha__region(&cur, (size_t)B * Lq * L->E, &L->qp) ||
        !mha__region(&cur, (size_t)B * Lq * L->Ekv, &L->kn) ||
        !mha__region(&cur, (size_t)B * Lq * L->Ekv, &L->vn) ||
        !mha__region(&cur, mha__ring_floats(c, L->H, Lq), &L->ring) ||
        !mha__region(&cur, attn > g ? attn : g, &L->scratch) ||
        !mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

MHADEF mha_status mha_forward_cached_workspace_size(const mha_module *m, const mha_kv_cache *c, int Lq,
                                                    const mha_options *opt, size_t *bytes)
{
    mha_options zero;
    mha__cached_layout L;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__cached_plan(m, c, Lq, opt, &L)) != MHA_OK) return st;
    return mha__mul(L.total_floats, sizeof(float), bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
}

MHADEF mha_status mha_forward_cached(const mha_module *m, mha_kv_cache *c, int Lq, const float *x,
                                     const mha_options *opt, float *out,
                                     void *workspace, size_t workspace_bytes)
{
    mha_options zero;
    mha__cached_layout L;
    mha__view qv;
    void *owned;
    float *ws, *qp, *kn, *vn, *scratch;
    const mha__mod *r = &L.r;
    size_t need;
    int E, Ekv, B, b, nt;
    mha_status st;
    if (!x || !out) return MHA_ERR_NULL_POINTER;
    if (!opt) { memset(&zero, 0, sizeof zero); opt = &zero; }
    if ((st = mha__cached_plan(m, c, Lq, opt, &L)) != MHA_OK) return st;
    if (!mha__mul(L.total_floats, sizeof(float), &need)) return MHA_ERR_OVERFLOW;
    if ((st = mha__get_ws(workspace, workspace_bytes, need, &owned, &ws)) != MHA_OK) return st;
    E = L.E; Ekv = L.Ekv; B = c->B; nt = mha__max_threads(opt);
    qp = ws + L.qp; kn = ws + L.kn; vn = ws + L.vn; scratch = ws + L.scratch;

    /* 1. Q, K, V of the new tokens: [B*Lq, E], [B*Lq, Ekv] */
    mha__linear(B * Lq, E, E, x, r->wq, r->bq, qp, scratch, nt);
    mha__linear(B * Lq, E, Ekv, x, r->wk, r->bk, kn, scratch, nt);
    mha__linear(B * Lq, E, Ekv, x, r->wv, r->bv, vn, scratch, nt);

    /* 2. RoPE at positions offset + len[b] + i, then append K and V */
    for (b = 0; b < B; ++b) {
        int pos0 = opt->position_offset + c->len[b];
        mha__rope_apply(&m->rope, L.D, 1, Lq, L.H, 0, (size_t)E, (size_t)L.D, pos0, NULL, 1.0f,
                        qp + (size_t)b * Lq * E);
        mha__rope_apply(&m->rope, L.D, 1, Lq, c->Hkv, 0, (size_t)Ekv, (size_t)L.D, pos0, NULL, 1.0f,
                        kn + (size_t)b * Lq * Ekv);
    }
    mha__cache_write(c, Lq, kn, vn, (size_t)Lq * Ekv, (size_t)L.D, (size_t)Ekv);

    /* 3. attention over the cache; the context overwrites Q in place */
    qv.p = qp; qv.bs = (size_t)Lq * E; qv.hs = (size_t)L.D; qv.rs = (size_t)E;
    mha__cache_attend_run(c, L.H, Lq, opt, &qv, qp, (size_t)Lq * E, (size_t)L.D, (size_t)E, scratch,
                          L.per_thread, ws + L.ring);

    /* 4. out = C Wo^T + bo */
    mha__linear(B * Lq, E, E, qp, r->wo, r->bo, out, scratch, nt);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}


/* ------------------------------------------------- one-shot calls */

MHADEF mha_options mha_options_defaults(void)
{
    mha_options o;
    memset(&o, 0, sizeof o);   /* every default is the zero value */
    return o;
}

MHADEF mha_encoder_layer mha_encoder_layer_defaults(void)
{
    mha_encoder_layer ly;
    memset(&ly, 0, sizeof ly);
    ly.dim_feedforward = 2048;
    ly.activation = MHA_ACT_RELU;
    ly.norm_first = 0;
    ly.layer_norm_eps = 1e-5f;
    return ly;
}

/* Each makes the plan of its one call on the stack (no PACK, so the plan
   needs no memory beyond its struct) and runs it: the size query and the
   call share the plan's layout.

   One thing can still differ between a size query and a later one-shot call:
   with num_threads 0 each takes OpenMP's thread count at its own time, and
   that count may have grown in between.  Rather than fail, such a call runs
   on as many threads as the caller's workspace holds; the result does not
   depend on the thread count.  An explicit num_threads is kept as given, and
   a plan always runs on exactly its own count.  mha__oneshot_fewer says
   whether to plan again with one thread fewer (and fills *o for that).  */
static int mha__oneshot_fewer(const mha_options *opt, int nthreads, const void *workspace,
                              size_t have, size_t need, mha_options *o)
{
    if (!workspace || need <= have || nthreads <= 1 || (opt && opt->num_threads != 0)) return 0;
    if (opt) *o = *opt; else memset(o, 0, sizeof *o);
    o->num_threads = nthreads - 1;
    return 1;
}

MHADEF size_t mha_gemm_workspace_size(int M, int N, int K)
{
    mha_plan p;
    if (mha__gemm_plan_make(MHA_NO_TRANS, MHA_NO_TRANS, M, N, K, 0, &p) != MHA_OK) return 0;
    return mha_plan_workspace_size(&p);
}

MHADEF mha_status mha_gemm(mha_trans ta, mha_trans tb, int M, int N, int K, float alpha,
                           const float *A, int lda, const float *B, int ldb, float beta,
                           float *C, int ldc, void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    mha_status st;
    int t = 0;
    if (!A || !B || !C) return MHA_ERR_NULL_POINTER;
    while ((st = mha__gemm_plan_make(ta, tb, M, N, K, t, &p)) == MHA_OK &&
           mha__oneshot_fewer(NULL, p.nthreads, workspace, workspace_bytes, mha_plan_workspace_size(&p), &o))
        t = o.num_threads;
    if (st != MHA_OK) return st;
    return mha_gemm_run(&p, alpha, A, lda, B, ldb, beta, C, ldc, workspace, workspace_bytes);
}

/* The plan of one mha_sdpa call and the bytes that call needs. */
static mha_status mha__sdpa_need(int B, int H, int Lq, int Lk, int D, int Dv, const mha_options *opt,
                                 int need_weights, mha_plan *pp, size_t *bytes)
{
    mha_plan p;
    size_t per_thread, total;
    mha_status st;
    st = mha__sdpa_plan_make(B, H, Lq, Lk, D, Dv, opt, need_weights ? MHA_PLAN_WEIGHTS : 0, &p);
    if (st != MHA_OK) return st;
    if (!mha__sdpa_fwd_floats(B, H, Lq, Lk, D, Dv, need_weights != 0, p.nthreads, &per_thread, &total))
        return MHA_ERR_OVERFLOW;   /* (the plan checked it: kept so no path reads an unset size) */
    *bytes = total * sizeof(float);   /* what the call with (or without) weights needs */
    if (pp) *pp = p;
    return MHA_OK;
}

MHADEF mha_status mha_sdpa_workspace_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                          const mha_options *opt, int need_weights,
                                          size_t *bytes)
{
    if (!bytes) return MHA_ERR_NULL_POINTER;
    return mha__sdpa_need(B, H, Lq, Lk, D, Dv, opt, need_weights, NULL, bytes);
}

MHADEF mha_status mha_sdpa(int B, int H, int Lq, int Lk, int D, int Dv,
                           const float *q, const float *k, const float *v,
                           const mha_options *opt, float *out, float *attn_weights,
                           void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    const mha_options *use = opt;
    size_t need;
    mha_status st;
    if (!q || !k || !v || !out) return MHA_ERR_NULL_POINTER;
    while ((st = mha__sdpa_need(B, H, Lq, Lk, D, Dv, use, attn_weights != NULL, &p, &need)) == MHA_OK &&
           mha__oneshot_fewer(opt, p.nthreads, workspace, workspace_bytes, need, &o))
        use = &o;
    if (st != MHA_OK) return st;
    return mha_sdpa_run(&p, Lq, Lk, q, k, v, NULL, NULL, out, attn_weights, workspace, workspace_bytes);
}

static mha_status mha__sdpa_bwd_need(int B, int H, int Lq, int Lk, int D, int Dv, const mha_options *opt,
                                     mha_plan *pp, size_t *bytes)
{
    mha_plan p;
    mha_status st;
    size_t f = 0;
    if ((st = mha__sdpa_plan_make(B, H, Lq, Lk, D, Dv, opt, MHA_PLAN_TRAINING, &p)) != MHA_OK) return st;
    p.saves = 0;   /* a one-shot backward has no forward before it: it recomputes */
    if (!mha__sdpa_bwd_floats(B, H, p.opt.num_kv_heads ? p.opt.num_kv_heads : H, Lq, Lk, D, Dv,
                              p.nthreads, &f))
        return MHA_ERR_OVERFLOW;
    *bytes = f * sizeof(float);   /* what the backward call needs */
    if (pp) *pp = p;
    return MHA_OK;
}

/* Rows recomputed from the saved lse: the forward's scores (q.k in double,
   then the same soft-cap and mha__mask_cols as the unfused path), then
   p_ij = exp(s_ij - lse_i).  Everything is checked before a row is written. */
MHADEF mha_status mha_sdpa_weights_rows(int B, int H, int Lq, int Lk, int D,
                                        const float *q, const float *k, const float *lse,
                                        int n_rows, const int *rows, const mha_options *opt,
                                        float *weights)
{
    mha_plan p;
    mha_options o;
    mha__attn a;
    size_t n;
    long t, items;
    int r;
    mha_status st;
    if (!q || !k || !lse || !rows || !weights) return MHA_ERR_NULL_POINTER;
    if ((st = mha__sdpa_plan_make(B, H, Lq, Lk, D, D, opt, 0, &p)) != MHA_OK) return st;
    if ((st = mha__run_begin(&p, MHA__PLAN_SDPA, Lq, Lk, NULL, NULL, &o)) != MHA_OK) return st;
    if (n_rows <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__mul3((size_t)B * (size_t)H, (size_t)n_rows, (size_t)Lk, &n) || !mha__mul(n, sizeof(float), &n) ||
        (size_t)B * (size_t)H * (size_t)n_rows > LONG_MAX)
        return MHA_ERR_OVERFLOW;
    for (r = 0; r < n_rows; ++r) if (rows[r] < 0 || rows[r] >= Lq) return MHA_ERR_INVALID_ARGUMENT;
    mha__attn_dense(&a, &o, B, H, Lq, Lk, D, D, q, k, k, weights);
    items = (long)B * H * n_rows;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(a.nthreads)
#endif
    for (t = 0; t < items; ++t) {
        int b = (int)(t / ((long)H * n_rows)), h = (int)(t / n_rows % H), i = rows[t % n_rows], j;
        const float *qi = q + (((size_t)b * H + h) * Lq + i) * D;
        const float *kb = k + ((size_t)b * a.Hkv + (size_t)h / a.group) * Lk * D;
        float *w = weights + (size_t)t * Lk, li = lse[((size_t)b * H + h) * Lq + i];
        for (j = 0; j < Lk; ++j) {           /* q.k summed in double: the forward's to rounding */
            const float *kj = kb + (size_t)j * D;
            double dot = 0.0;
            int d;
            for (d = 0; d < D; ++d) dot += (double)qi[d] * kj[d];
            w[j] = (float)(a.scale * dot);
        }
        if (a.softcap > 0.0f) mha__softcap(a.softcap, w, (size_t)Lk);
        mha__mask_cols(&a, b, h, i, 0, Lk, w);
        for (j = 0; j < Lk; ++j)
            w[j] = li == -INFINITY || w[j] == -INFINITY ? 0.0f : (float)exp((double)w[j] - li);
    }
    return MHA_OK;
}

/* The module's weight rows: K of every key [B, Lk', Ekv], the chosen query
   rows [B, n, E] and their Q, then a Linear's workspace; floats of each.  */
typedef struct mha__wrows_layout { size_t kp, xq, lin, total; } mha__wrows_layout;
static int mha__wrows_lay(const mha__mod *r, int B, int Lk, int n, mha__wrows_layout *L)
{
    size_t lk, lq;
    if ((size_t)B * (size_t)n > (size_t)INT_MAX) return 0;
    lk = mha_linear_workspace_size(Lk, r->kdim, r->Ekv);
    lq = mha_linear_workspace_size(B * n, r->E, r->E);
    if (!lk || !lq || !mha__mul3((size_t)B, (size_t)Lk + (size_t)r->extra, (size_t)r->Ekv, &L->kp) ||
        !mha__mul3((size_t)B, (size_t)n, (size_t)r->E, &L->xq))
        return 0;
    L->kp = mha__round_floats(L->kp); L->xq = mha__round_floats(L->xq);
    L->lin = mha__round_floats((lk > lq ? lk : lq) / sizeof(float) + 1);
    L->total = L->kp + 2 * L->xq + L->lin + MHA__ALIGN_FLOATS;
    return 1;
}

/* The checks both module calls share: the module, options and rows; the
   plan (on the caller's stack) resolves the weights.  */
static mha_status mha__wrows_begin(const mha_module *m, int B, int Lq, int Lk, int n_rows, const int *rows,
                                   const mha_options *opt, mha_plan *p, mha_options *o, mha__wrows_layout *L)
{
    size_t extra, n;
    mha_status st;
    int r;
    if ((st = mha__module_plan_make(m, B, Lq, Lk, opt, 0, MHA__PLAN_MODULE, p, &extra)) != MHA_OK) return st;
    if ((st = mha__run_begin(p, MHA__PLAN_MODULE, Lq, Lk, NULL, NULL, o)) != MHA_OK) return st;
    if (n_rows <= 0) return MHA_ERR_INVALID_SIZE;
    for (r = 0; rows && r < n_rows; ++r) if (rows[r] < 0 || rows[r] >= Lq) return MHA_ERR_INVALID_ARGUMENT;
    if (!mha__mul3((size_t)B * (size_t)p->mod.H, (size_t)n_rows, (size_t)Lk + (size_t)p->mod.extra, &n) ||
        !mha__mul(n, sizeof(float), &n) || !mha__wrows_lay(&p->mod, B, Lk, n_rows, L))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

MHADEF mha_status mha_weights_rows_workspace_size(const mha_module *m, int B, int Lq, int Lk, int n_rows,
                                                  const mha_options *opt, size_t *bytes)
{
    mha_plan p;
    mha_options o;
    mha__wrows_layout L;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    if ((st = mha__wrows_begin(m, B, Lq, Lk, n_rows, NULL, opt, &p, &o, &L)) != MHA_OK) return st;
    return mha__mul(L.total, sizeof(float), bytes) ? MHA_OK : MHA_ERR_OVERFLOW;
}

/* 1. K = Xk Wk^T + bk per batch, the appended keys after, RoPE on the real
   ones (key j at offset + j); 2. Q of the chosen rows, RoPE at offset + i';
   3. per (b, h, row) the forward's scores and exp(s - lse), as
   mha_sdpa_weights_rows.  */
MHADEF mha_status mha_weights_rows(const mha_module *m, int B, int Lq, int Lk,
                                   const float *query, const float *key, const float *lse,
                                   int n_rows, const int *rows, const mha_options *opt,
                                   float *weights, void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    mha__wrows_layout L;
    mha__attn a;
    const mha__mod *r;
    void *owned;
    float *ws, *kp, *xq, *qp, *lin;
    size_t lin_bytes;
    long t, items;
    int b, i, Lke, E, Ekv, D, pos0;
    mha_status st;
    if (!query || !key || !lse || !rows || !weights) return MHA_ERR_NULL_POINTER;
    if ((st = mha__wrows_begin(m, B, Lq, Lk, n_rows, rows, opt, &p, &o, &L)) != MHA_OK) return st;
    if ((st = mha__get_ws(workspace, workspace_bytes, L.total * sizeof(float), &owned, &ws)) != MHA_OK) return st;
    r = &p.mod; Lke = Lk + r->extra; E = r->E; Ekv = r->Ekv; D = r->D;
    kp = ws; xq = kp + L.kp; qp = xq + L.xq; lin = qp + L.xq; lin_bytes = L.lin * sizeof(float);
    for (b = 0; b < B; ++b) {
        float *kb = kp + (size_t)b * Lke * Ekv;
        (void)mha_linear_forward(Lk, r->kdim, Ekv, key + (size_t)b * Lk * r->kdim, r->wk, r->bk, kb, lin, lin_bytes);
        if (r->bias_k) memcpy(kb + (size_t)Lk * Ekv, r->bias_k, (size_t)Ekv * sizeof(float));
        if (r->zero_attn) memset(kb + (size_t)(Lke - 1) * Ekv, 0, (size_t)Ekv * sizeof(float));
        for (i = 0; i < n_rows; ++i)
            memcpy(xq + ((size_t)b * n_rows + i) * E, query + ((size_t)b * Lq + rows[i]) * E, (size_t)E * sizeof(float));
    }
    mha__rope_apply(&r->rope, D, B, Lk, r->Hkv, (size_t)Lke * Ekv, (size_t)Ekv, (size_t)D, o.position_offset,
                    NULL, 1.0f, kp);
    (void)mha_linear_forward(B * n_rows, E, E, xq, r->wq, r->bq, qp, lin, lin_bytes);
    pos0 = mha__query_pos0(&o, Lq, Lk);
    for (b = 0; b < B; ++b)
        for (i = 0; i < n_rows; ++i)
            mha__rope_apply(&r->rope, D, 1, 1, r->H, 0, (size_t)E, (size_t)D, pos0 + rows[i], NULL, 1.0f,
                            qp + ((size_t)b * n_rows + i) * E);
    mha__attn_common(&a, &o, B, r->H, Lq, Lk, Lke, D, D);
    a.Hkv = r->Hkv; a.group = r->H / r->Hkv;
    items = (long)B * r->H * n_rows;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(a.nthreads)
#endif
    for (t = 0; t < items; ++t) {
        int bb = (int)(t / ((long)r->H * n_rows)), h = (int)(t / n_rows % r->H), row = (int)(t % n_rows), j, d;
        const float *qi = qp + ((size_t)bb * n_rows + row) * E + (size_t)h * D;
        const float *kb = kp + (size_t)bb * Lke * Ekv + (size_t)(h / a.group) * D;
        float *w = weights + (size_t)t * Lke, li = lse[((size_t)bb * r->H + h) * Lq + rows[row]];
        for (j = 0; j < Lke; ++j) {
            double dot = 0.0;
            for (d = 0; d < D; ++d) dot += (double)qi[d] * kb[(size_t)j * Ekv + d];
            w[j] = (float)(a.scale * dot);
        }
        if (a.softcap > 0.0f) mha__softcap(a.softcap, w, (size_t)Lke);
        mha__mask_cols(&a, bb, h, rows[row], 0, Lke, w);
        for (j = 0; j < Lke; ++j)
            w[j] = li == -INFINITY || w[j] == -INFINITY ? 0.0f : (float)exp((double)w[j] - li);
    }
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

MHADEF mha_status mha_sdpa_backward_workspace_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                                   const mha_options *opt, size_t *bytes)
{
    if (!bytes) return MHA_ERR_NULL_POINTER;
    return mha__sdpa_bwd_need(B, H, Lq, Lk, D, Dv, opt, NULL, bytes);
}

MHADEF mha_status mha_sdpa_backward(int B, int H, int Lq, int Lk, int D, int Dv,
                                    const float *q, const float *k, const float *v,
                                    const float *dout, const mha_options *opt,
                                    float *dq, float *dk, float *dv,
                                    void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    const mha_options *use = opt;
    size_t need;
    mha_status st;
    if (!q || !k || !v || !dout) return MHA_ERR_NULL_POINTER;
    while ((st = mha__sdpa_bwd_need(B, H, Lq, Lk, D, Dv, use, &p, &need)) == MHA_OK &&
           mha__oneshot_fewer(opt, p.nthreads, workspace, workspace_bytes, need, &o))
        use = &o;
    if (st != MHA_OK) return st;
    return mha_sdpa_run_backward(&p, Lq, Lk, q, k, v, dout, NULL, NULL, dq, dk, dv, workspace,
                                 workspace_bytes);
}

static mha_status mha__forward_need(const mha_module *m, int B, int Lq, int Lk, const mha_options *opt,
                                    int need_weights, mha_plan *pp, size_t *bytes)
{
    mha_plan p;
    mha__fwd_layout L;
    size_t extra;
    mha_status st;
    st = mha__module_plan_make(m, B, Lq, Lk, opt, need_weights ? MHA_PLAN_WEIGHTS : 0,
                               MHA__PLAN_MODULE, &p, &extra);
    if (st != MHA_OK) return st;
    /* what the call with (or without) weights needs */
    if (!mha__fwd_layout_at(&p.mod, B, Lq, Lk, need_weights != 0, p.by_head, p.nthreads, 0, &L))
        return MHA_ERR_OVERFLOW;
    *bytes = L.total_floats * sizeof(float);
    if (pp) *pp = p;
    return MHA_OK;
}

MHADEF mha_status mha_forward_workspace_size(const mha_module *m, int B, int Lq, int Lk,
                                             const mha_options *opt, int need_weights,
                                             size_t *bytes)
{
    if (!bytes) return MHA_ERR_NULL_POINTER;
    return mha__forward_need(m, B, Lq, Lk, opt, need_weights, NULL, bytes);
}

MHADEF mha_status mha_forward(const mha_module *m, int B, int Lq, int Lk,
                              const float *query, const float *key, const float *value,
                              const mha_options *opt, float *out, float *attn_weights,
                              void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    const mha_options *use = opt;
    size_t need;
    mha_status st;
    if (!query || !key || !value || !out) return MHA_ERR_NULL_POINTER;
    while ((st = mha__forward_need(m, B, Lq, Lk, use, attn_weights != NULL, &p, &need)) == MHA_OK &&
           mha__oneshot_fewer(opt, p.nthreads, workspace, workspace_bytes, need, &o))
        use = &o;
    if (st != MHA_OK) return st;
    return mha_module_forward(&p, Lq, Lk, query, key, value, NULL, NULL, out, attn_weights,
                              workspace, workspace_bytes);
}

static mha_status mha__backward_need(const mha_module *m, int B, int Lq, int Lk, const mha_options *opt,
                                     mha_plan *pp, size_t *bytes)
{
    mha_plan p;
    size_t extra;
    mha_status st;
    mha__bwd_layout L;
    st = mha__module_plan_make(m, B, Lq, Lk, opt, MHA_PLAN_TRAINING, MHA__PLAN_MODULE, &p, &extra);
    if (st != MHA_OK) return st;
    p.saves = 0;   /* a one-shot backward has no forward before it: it recomputes */
    if (!mha__bwd_layout_at(&p.mod, B, Lq, Lk, p.nthreads, 0, &L)) return MHA_ERR_OVERFLOW;
    *bytes = L.total_floats * sizeof(float);   /* what the backward call needs */
    if (pp) *pp = p;
    return MHA_OK;
}

MHADEF mha_status mha_backward_workspace_size(const mha_module *m, int B, int Lq, int Lk,
                                              const mha_options *opt, size_t *bytes)
{
    if (!bytes) return MHA_ERR_NULL_POINTER;
    return mha__backward_need(m, B, Lq, Lk, opt, NULL, bytes);
}

MHADEF mha_status mha_backward(const mha_module *m, int B, int Lq, int Lk,
                               const float *query, const float *key, const float *value,
                               const float *dout, const mha_options *opt,
                               float *dquery, float *dkey, float *dvalue, mha_module_grad *grad,
                               void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    const mha_options *use = opt;
    size_t need;
    mha_status st;
    if (!query || !key || !value || !dout) return MHA_ERR_NULL_POINTER;
    while ((st = mha__backward_need(m, B, Lq, Lk, use, &p, &need)) == MHA_OK &&
           mha__oneshot_fewer(opt, p.nthreads, workspace, workspace_bytes, need, &o))
        use = &o;
    if (st != MHA_OK) return st;
    return mha_module_backward(&p, Lq, Lk, query, key, value, dout, NULL, NULL, dquery, dkey, dvalue,
                               grad, workspace, workspace_bytes);
}

/* The one size serves both encoder calls: it is the training plan's, which
   holds the forward's. */
MHADEF mha_status mha_encoder_workspace_size(const mha_encoder_layer *layer, int B, int L,
                                             const mha_options *opt, size_t *bytes)
{
    mha_plan p;
    size_t extra;
    mha_status st;
    if (!bytes) return MHA_ERR_NULL_POINTER;
    st = mha__encoder_plan_make(layer, B, L, opt, MHA_PLAN_TRAINING | MHA_PLAN_WEIGHTS, &p, &extra);
    if (st != MHA_OK) return st;
    *bytes = mha_plan_workspace_size(&p);
    return MHA_OK;
}

MHADEF mha_status mha_encoder_forward(const mha_encoder_layer *layer, int B, int L,
                                      const float *x, const mha_options *opt, float *y,
                                      float *attn_weights, void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    const mha_options *use = opt;
    size_t extra;
    mha_status st;
    if (!x || !y) return MHA_ERR_NULL_POINTER;
    while ((st = mha__encoder_plan_make(layer, B, L, use, attn_weights ? MHA_PLAN_WEIGHTS : 0, &p,
                                        &extra)) == MHA_OK &&
           mha__oneshot_fewer(opt, p.nthreads, workspace, workspace_bytes, mha_plan_workspace_size(&p), &o))
        use = &o;
    if (st != MHA_OK) return st;
    return mha_encoder_run(&p, L, x, NULL, NULL, y, attn_weights, workspace, workspace_bytes);
}

MHADEF mha_status mha_encoder_backward(const mha_encoder_layer *layer, int B, int L,
                                       const float *x, const mha_options *opt, const float *dy,
                                       float *dx, mha_encoder_layer_grad *grad,
                                       void *workspace, size_t workspace_bytes)
{
    mha_plan p;
    mha_options o;
    const mha_options *use = opt;
    size_t extra;
    mha_status st;
    if (!x || !dy) return MHA_ERR_NULL_POINTER;
    while ((st = mha__encoder_plan_make(layer, B, L, use, MHA_PLAN_TRAINING, &p, &extra)) == MHA_OK &&
           mha__oneshot_fewer(opt, p.nthreads, workspace, workspace_bytes, mha_plan_workspace_size(&p), &o))
        use = &o;
    if (st != MHA_OK) return st;
    p.saves = 0;   /* a one-shot backward has no forward before it: it recomputes */
    return mha_encoder_run_backward(&p, L, x, dy, NULL, NULL, dx, grad, workspace, workspace_bytes);
}

/* ------------------------------------------------------ public linear */

static int mha__linear_sizes_ok(int rows, int in, int out)
{
    size_t n;
    return mha__dim_ok(rows) && mha__dim_ok(in) && mha__dim_ok(out) &&
           mha__mul3((size_t)rows, (size_t)(in > out ? in : out), sizeof(float), &n) &&
           mha__mul3((size_t)in, (size_t)out, sizeof(float), &n);
}

MHADEF size_t mha_linear_workspace_size(int rows, int in, int out)
{
    size_t f = 0;
    if (rows <= 0 || in <= 0 || out <= 0 || !mha__linear_sizes_ok(rows, in, out)) return 0;
    f = mha__linear_gws(rows, in, out, 1);
    return f ? (f + MHA__ALIGN_FLOATS) * sizeof(float) : 0;
}

/* The checks and the workspace both public Linear calls share. */
static mha_status mha__linear_begin(int rows, int in, int out, void *workspace, size_t have,
                                    void **owned, float **ws)
{
    size_t need;
    *owned = NULL; *ws = NULL;
    if (rows <= 0 || in <= 0 || out <= 0) return MHA_ERR_INVALID_SIZE;
    if (!mha__linear_sizes_ok(rows, in, out)) return MHA_ERR_OVERFLOW;
    need = mha_linear_workspace_size(rows, in, out);
    return need ? mha__get_ws(workspace, have, need, owned, ws) : MHA_OK;
}

MHADEF mha_status mha_linear_forward(int rows, int in, int out, const float *x, const float *W,
                                     const float *b, float *y, void *workspace, size_t workspace_bytes)
{
    void *owned;
    float *ws;
    mha_status st;
    if (!x || !W || !y) return MHA_ERR_NULL_POINTER;
    if ((st = mha__linear_begin(rows, in, out, workspace, workspace_bytes, &owned, &ws)) != MHA_OK)
        return st;
    mha__linear(rows, in, out, x, W, b, y, ws, 1);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

MHADEF mha_status mha_linear_backward(int rows, int in, int out, const float *x, const float *W,
                                      const float *dy, float *dx, float *dW, float *db,
                                      void *workspace, size_t workspace_bytes)
{
    void *owned;
    float *ws;
    mha_status st;
    if (!x || !W || !dy) return MHA_ERR_NULL_POINTER;
    if ((st = mha__linear_begin(rows, in, out, workspace, workspace_bytes, &owned, &ws)) != MHA_OK)
        return st;
    mha__linear_backward(rows, in, out, x, W, dy, dx, dW, db, ws, 1);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
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

/* x - x is 0 exactly for finite x (NaN for NaN and +-Inf) */
static int mha__finite(float x) { return x - x == 0.0f; }

/* p -= lr * (g + weight_decay * p) */
MHADEF mha_status mha_sgd_step(size_t n, float *p, const float *g, float lr, float weight_decay)
{
    size_t i;
    if (!p || !g) return MHA_ERR_NULL_POINTER;
    if (!mha__finite(lr) || !mha__finite(weight_decay) || lr < 0.0f || weight_decay < 0.0f)
        return MHA_ERR_INVALID_ARGUMENT;
    for (i = 0; i < n; ++i) p[i] -= lr * (g[i] + weight_decay * p[i]);
    return MHA_OK;
}

/* torch.optim.AdamW, step t = 1, 2, ...:
     p  *= 1 - lr * wd                       (decoupled weight decay)
     m   = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
     p  -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)          */
MHADEF mha_adamw mha_adamw_defaults(void)
{
    mha_adamw d;
    d.lr = 1e-3f; d.beta1 = 0.9f; d.beta2 = 0.999f; d.eps = 1e-8f; d.weight_decay = 1e-2f;
    return d;
}

MHADEF mha_status mha_adamw_step(const mha_adamw *opt, long step, size_t n, float *p,
                                 const float *g, float *m, float *v)
{
    float lr, b1, b2, eps, wd, c1, c2;
    size_t i;
    if (!opt || !p || !g || !m || !v) return MHA_ERR_NULL_POINTER;
    lr = opt->lr; b1 = opt->beta1; b2 = opt->beta2; eps = opt->eps; wd = opt->weight_decay;
    /* as torch.optim.AdamW checks them (NaN fails every comparison) */
    if (step < 1 || !mha__finite(lr) || !mha__finite(eps) || !mha__finite(wd) ||
        !(lr >= 0.0f) || !(eps >= 0.0f) || !(wd >= 0.0f) ||
        !(b1 >= 0.0f && b1 < 1.0f) || !(b2 >= 0.0f && b2 < 1.0f))
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
