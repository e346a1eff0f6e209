/* mha.h - multi-head attention in one C header.                     v1.2.1

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
       mha_error err;               // optional: which argument was refused, and why
       // x: [B, L, E] batch-first; out: [B, L, E]
       mha_status s = mha_module_forward(&m, B, L, L, x, x, x, &opt, out, NULL, &err);
       if (s != MHA_OK) fprintf(stderr, "%s\n", err.message);

   THE SHAPE OF THE API (section 3; docs/api.md has every call)
     Every object has the same verbs:
         mha_<obj>_plan_size   the bytes of the plan, its workspace and its saved forward
         mha_<obj>_plan        validate once, fix shapes, options, threads (and packed weights)
         mha_<obj>_run_forward / mha_<obj>_run_backward     run the plan on new tensors
         mha_plan_destroy      (one call for every kind of plan)
     and a one-shot call per direction, mha_<obj>_forward / mha_<obj>_backward,
     which is the plan on the caller's stack and one run.  <obj> is gemm
     (forward only: mha_gemm, mha_gemm_run), sdpa, module or encoder.
     What a run reads and writes besides its tensors is an argument of that
     run, mha_run: the workspace, the saved forward, the KV cache, this run's
     mask data and the optional outputs (attention weights, the log-sum-exp
     and statistics of each row, the sinks' gradient).  A plan holds no
     pointer a run writes through, so one plan runs from many threads at once.

   PLANS (made once, run many times)
       mha_plan *p;  mha_sizes n;   // B, the longest Lq and Lk, options, flags
       s = mha_module_plan_size(&m, B, Lmax, Lmax, &opt, MHA_PLAN_PACK, &n, &err);
       s = mha_module_plan(&m, B, Lmax, Lmax, &opt, MHA_PLAN_PACK, NULL, 0, &p, &err);
       mha_run r = {0};
       r.workspace = malloc(n.workspace);  r.workspace_bytes = n.workspace;  // one per thread
       s = mha_module_run_forward(p, L, L, x, x, x, out, &r, &err);          // L <= Lmax
       mha_plan_destroy(p);

   TRAINING (the saved forward is yours: section 3)
       // p made with MHA_PLAN_TRAINING; n.saved bytes hold what its backward needs
       r.saved = malloc(n.saved);  r.saved_bytes = n.saved;
       s = mha_module_run_forward(p, L, L, x, x, x, out, &r, &err);    // fills r.saved
       s = mha_module_run_backward(p, L, L, x, x, x, dout, dx, dx, dx, &grad, &r, &err);
     The backward reads the saved forward as it is; with r.saved = NULL it
     computes the forward again.  Nothing is hashed or guessed.

   DECODING (section 7, docs/decoding.md)
       mha_kv_cache c = {0};  ... B, Hkv, D, capacity, k, v, len (dtype: MHA_F16
                              or MHA_BF16 keeps it in half the bytes; the plan's
                              opt.kv_dtype names the same type)
       r.cache = &c;           // a plan made with MHA_PLAN_CACHE | MHA_PLAN_PACK, Lk >= capacity
       s = mha_module_run_forward(p, 1, 0, x, NULL, NULL, out, &r, &err);   // one token
     projects the new token with the plan's (packed) weights, turns Q and K
     by RoPE, appends K and V to the cache and attends to all of it.

   16-BIT STORAGE (section 2, docs/api.md "Storage types")
     Keys and values (SDPA's k, v with opt.kv_dtype; the KV cache's dtype)
     and a module's projection weights (m.weight_dtype, with MHA_PLAN_PACK)
     may be MHA_F16 or MHA_BF16; every computation stays float32 and gives
     the bits of float32 inputs holding the same values.  mha_convert
     rounds to nearest even, as PyTorch's .half() and .bfloat16().

   SECTIONS (the implementation below follows the same numbers)
     0. foundations (implementation only: sizes, the SIMD layer)
     1. status and errors             mha_status, mha_error
     2. options and masks             mha_options, mha_mask, mha_alibi_slopes,
                                      storage types (mha_dtype, mha_convert)
     3. plans and runs                mha_plan, mha_sizes, mha_run, flags
     4. matrix multiply               mha_gemm and its plan
     5. scaled dot-product attention  mha_sdpa_*
     6. the module                    mha_module, mha_module_*
     7. decoding                      mha_kv_cache, RoPE, mha_attn_merge
     8. the encoder layer             mha_encoder_layer, mha_encoder_*
     9. training pieces               linear, layer norm, embedding, loss, optimizers

   EVERY PUBLIC FUNCTION
     1  mha_status_string          a sentence for a status (cannot fail)
        mha_kernels                the kernels this process runs (cannot fail)
     2  mha_dtype_size             bytes of an element of a storage type (cannot fail)
        mha_convert                float32 <-> F16 / BF16, rounded to nearest even
        mha_alibi_slopes           the ALiBi paper's per-head slopes
     3  mha_plan_sizes             plan, workspace and saved-forward bytes of a plan
        mha_plan_repack            pack a PACK plan's weights again (after they changed)
        mha_plan_destroy           free a plan made with mem = NULL (cannot fail)
     4  mha_gemm                   C = alpha op(A) op(B) + beta C, one shot
        mha_gemm_plan_size, mha_gemm_plan, mha_gemm_run
     5  mha_sdpa_forward, mha_sdpa_backward                  one shot
        mha_sdpa_plan_size, mha_sdpa_plan, mha_sdpa_run_forward, mha_sdpa_run_backward
     6  mha_module_forward, mha_module_backward              one shot
        mha_module_plan_size, mha_module_plan, mha_module_run_forward, mha_module_run_backward
     7  mha_kv_cache_append        append projected keys and values to a cache
        mha_rope_forward, mha_rope_backward                  rotary position embedding
        mha_attn_merge             merge attention over disjoint key sets by their lse
     8  mha_encoder_forward, mha_encoder_backward            one shot
        mha_encoder_plan_size, mha_encoder_plan, mha_encoder_run_forward,
        mha_encoder_run_backward, mha_encoder_layer_defaults (cannot fail)
     9  mha_linear_workspace_size, mha_linear_forward, mha_linear_backward,
        mha_layernorm_forward, mha_layernorm_backward, mha_positional_encoding,
        mha_embedding_forward, mha_embedding_backward, mha_cross_entropy,
        mha_sgd_step, mha_adamw_step, mha_adamw_defaults (cannot fail)
     Every function returns an mha_status except the six marked "cannot
     fail"; sizes come back through out-parameters.

   CONFIGURATION (define before the implementation include)
       MHA_STATIC          make every function static (private to one file)
       MHA_NO_SIMD         use the portable scalar kernels even where AVX2/NEON exist
       MHA_NO_AVX512       never use the AVX-512 kernels (AVX2 where the CPU has it)
       MHA_NO_DISPATCH     run only the kernels the compiler flags enable (no
                           run-time choice; see below)
       MHA_MALLOC(sz) / MHA_FREE(p)   allocator for plans and workspaces made
                           for the caller (define both or neither)
       MHA_ASSERT(x)       internal invariant checks (default: assert.h)
       MHA_PROFILE_MARK(phase)  called as the fused attention core enters each
                           phase (MHA_PHASE_*; default: nothing);
                           bench/profile_attn.c times the phases with it
     Kernels: on x86-64 with GCC 12+ or clang, a build with no SIMD flags
     carries scalar, AVX2+FMA and AVX-512 kernels and runs the best the CPU
     has (checked through __builtin_cpu_supports; mha_kernels() names it), so
     `cc app.c -lm` is as fast as -march=native on that CPU.  With
     -mavx2 -mfma the AVX-512 kernels are still added; with -march=native on
     an AVX-512 CPU, with MHA_NO_DISPATCH, or on aarch64 (NEON) only the
     compiled-for kernels exist.  The header finds itself by __FILE_NAME__
     for this: if you paste it into another file, define MHA_NO_DISPATCH.
     Threads come from OpenMP when built with -fopenmp;
     on a machine shared with other jobs run with OMP_WAIT_POLICY=passive
     (a waiting thread that spins on the core of a working one stalls it).

   THE MATH  (X: [L, E]; W: [E_out, E_in] as PyTorch stores Linear weights)
       Q = X_q Wq^T + bq     K = X_k Wk^T + bk     V = X_v Wv^T + bv
       split E into H heads of D = E/H columns:  Q_h = Q[:, h*D:(h+1)*D]
       A_h = softmax(Q_h K_h^T * scale + mask)     scale = 1/sqrt(D)
       O   = concat_h(A_h V_h) Wo^T + bo

   MEMORY
     Without attention weights, attention is fused: an online softmax over
     tiles of keys, so workspaces grow with L*E, never with L^2 (a module
     forward at L = 16384, E = 512, H = 8 needs about 16 MiB).  Asking for
     the weights costs their [B, Lq, Lk] output and rows of scores per
     thread; asking for the weights of a few rows (mha_run.rows) recomputes
     just those from each row's log-sum-exp.  Both paths agree to float32
     rounding, and no result depends on the thread count.  A workspace may
     start at any byte address (each size includes 64 bytes of slack).

   MASKS (nn.MultiheadAttention semantics, see docs/api.md for the full table)
     bool masks:  nonzero = this key is NOT allowed    (MHA_MASK_BOOL)
                  nonzero = this key takes part        (MHA_MASK_BOOL_KEEP,
                                                        like F.scaled_dot_product_attention)
     float masks: added to the scores; -inf blocks the key (MHA_MASK_FLOAT)
     A query whose keys are all blocked gets zero weights and a zero context
     vector (PyTorch gives NaN there).  Blocked keys are skipped, never
     multiplied, so a NaN or Inf in a blocked key or value cannot leak; a
     NaN anywhere else comes out as NaN.

   ERRORS
     Every call returns an mha_status and, when its last argument (an
     mha_error, may be NULL) is given, says which argument or field it
     refused and why, in the caller's own struct: no global state.  On any
     status other than MHA_OK no output has been written.

   VERSION 1.2.1 (MHA_VERSION_MAJOR/MINOR/PATCH); docs/migration.md has the
   table of the names of 0.x and what replaced each, and what 1.1 and 1.2
   added.
   LICENSE  at the end of this file (MIT or public domain, your choice)
*/
#ifndef MHA_H
#define MHA_H

#include <stddef.h>

#define MHA_VERSION_MAJOR 1
#define MHA_VERSION_MINOR 2
#define MHA_VERSION_PATCH 1

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

/* ====================================================================== 1
   STATUS AND ERRORS
   ====================================================================== */

/* One list makes both the enum and the messages, so they cannot drift. */
#define MHA_STATUS_LIST(X)                                                             \
    X(MHA_OK,                      "success")                                          \
    X(MHA_ERR_NULL_POINTER,        "a required pointer argument is NULL")              \
    X(MHA_ERR_INVALID_SIZE,        "a size argument is zero or negative")              \
    X(MHA_ERR_HEADS_DIVIDE,        "embed_dim is not divisible by num_heads, or num_heads by num_kv_heads") \
    X(MHA_ERR_OVERFLOW,            "the sizes are too large: a size product or a position overflows") \
    X(MHA_ERR_MASK_SHAPE,          "a mask's shape does not fit the attention shape")  \
    X(MHA_ERR_INVALID_ARGUMENT,    "an argument has an invalid value (flag, number or weight combination)") \
    X(MHA_ERR_WORKSPACE_TOO_SMALL, "a workspace or buffer is smaller than its size query asked for") \
    X(MHA_ERR_OUT_OF_MEMORY,       "MHA_MALLOC returned NULL")                         \
    X(MHA_ERR_BAD_ENUM,            "an enum argument holds a value outside its range") \
    X(MHA_ERR_MISALIGNED,          "a buffer is not aligned as the call requires")    \
    X(MHA_ERR_EXCEEDS_PLAN,        "the run asks for more than its plan was made for (lengths, outputs, masks or a backward)") \
    X(MHA_ERR_CAPACITY,            "the KV cache has no room for the tokens being appended, or does not hold the queries") \
    X(MHA_ERR_SAVED,               "the saved forward was not written by a forward of this plan's kind and shape") \
    X(MHA_ERR_IO,                  "a file could not be opened, read or written")     \
    X(MHA_ERR_FORMAT,              "a file's contents are malformed")                 \
    X(MHA_ERR_NOT_FOUND,           "a named tensor or key is not in the file")        \
    X(MHA_ERR_SHAPE,               "a tensor's shape or type is not the one the call expects") \
    X(MHA_ERR_DTYPE,               "a tensor's element type is not the one the plan or cache was made for")

typedef enum mha_status {
#define MHA__ENUM(name, msg) name,
    MHA_STATUS_LIST(MHA__ENUM)
#undef MHA__ENUM
    MHA_STATUS_COUNT
} mha_status;

/* A readable sentence for a status; never NULL, also for unknown values. */
MHADEF const char *mha_status_string(mha_status s);

/* The kernels this process runs: "avx512", "avx2", "neon" or "scalar".  On
   x86-64 a build without SIMD flags also carries the AVX2 and AVX-512
   kernels and runs the best the CPU has (CONFIGURATION, above). */
MHADEF const char *mha_kernels(void);

/* What a refusal was about.  Pass one as the last argument of any call
   (NULL when you do not want it); a call that succeeds resets it (status
   MHA_OK, function and field NULL, message empty), a refusal fills it:
     status    the status the call returned
     function  the public call that refused, e.g. "mha_module_plan"
     field     the argument or struct field refused, as the caller wrote it:
               "Lq", "opt->window_left", "m->num_kv_heads", "run->workspace_bytes",
               "cache->Hkv", "path" (companion loaders), ...
     message   one sentence with the function, the field, what was expected
               and what was found: "mha_module_run_forward: cache->Hkv: is 4,
               the plan's module has 2 KV heads".  Loaders add the file path
               and the operating system's reason.
   The struct is the caller's, so threads never share it: no global state. */
typedef struct mha_error {
    mha_status  status;
    const char *function;
    const char *field;
    char        message[320];
} mha_error;

/* ====================================================================== 2
   OPTIONS AND MASKS: what every attention call reads (inputs only)
   ====================================================================== */

/* Storage types.  Float32 is the type of every computation; keys and
   values (SDPA's inputs and the KV cache) may be stored in 16 bits, read
   and widened to float32 as the kernels load them.
     MHA_F16   IEEE binary16: 1 sign, 5 exponent, 10 fraction bits (torch.float16)
     MHA_BF16  bfloat16: the top 16 bits of a float32 (torch.bfloat16)
   Narrowing rounds to nearest, ties to even, as PyTorch's .half() and
   .bfloat16() do: a float32 beyond the 16-bit range becomes +-inf (F16:
   |x| >= 65520), never a clamped finite value; NaN stays NaN (quiet, its
   sign and top payload bits kept); F16 subnormals are exact.  Widening is
   exact.  Every kernel tier gives the same bits (F16C, AVX-512, NEON, or
   the scalar definition).  16-bit elements are uint16_t-sized, in the
   machine's byte order. */
typedef enum mha_dtype {
    MHA_F32 = 0,   /* float (the zero default) */
    MHA_F16,       /* IEEE half */
    MHA_BF16       /* bfloat16 */
} mha_dtype;

/* Bytes of one element: 4, 2, 2; 0 for a value outside the enum (cannot fail). */
MHADEF size_t mha_dtype_size(mha_dtype t);
/* dst[i] = src[i] converted, i < n, between any two of the types (F16 to
   BF16 rounds once: widening is exact).  src and dst must not overlap
   unless they are the same pointer with the same type.  */
MHADEF mha_status mha_convert(size_t n, mha_dtype from, const void *src, mha_dtype to, void *dst,
                              mha_error *err);

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
   Any other shape is MHA_ERR_MASK_SHAPE.  Data is dense and row-major; a
   run may bring its own data for its lengths (mha_run.attn_mask).  */
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

/* Options of every attention call.  All-zero is PyTorch's default: no
   mask, scale 1/sqrt(head_dim), head-averaged weights, OpenMP's threads.
   They are inputs only: nothing a call writes is reached through them.  */
typedef struct mha_options {
    mha_mask         attn_mask;        /* see mha_mask for shapes */
    mha_mask         key_padding_mask; /* [B, Lk]; BOOL: nonzero = ignore that key */
    int              causal;           /* nonzero: apply a causal mask (combined with the masks) */
    mha_causal_align causal_align;     /* also where a window or ALiBi measures from */
    float            scale;            /* 0 = 1/sqrt(head_dim) */
    int              per_head_weights; /* weights as [B,H,Lq,Lk] instead of the head average
                                          [B,Lq,Lk] (nn.MHA average_attn_weights=False) */
    int              num_threads;      /* 0 = OpenMP's default; ignored without OpenMP */

    /* Decoder attention (docs/decoding.md).  Zero = off; i' below is the
       query's position on the key axis: i' = i (TOP_LEFT) or i + Lk - Lq
       (BOTTOM_RIGHT).  The module's appended keys (bias_k, add_zero_attn)
       get no window, ALiBi or mask.  */
    int          num_kv_heads;   /* SDPA: k, v are [B, Hkv, Lk, D]; 0 = H; H % Hkv == 0
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
    int          position_offset;/* the module's RoPE: key j is at position offset + j, query i
                                    at offset + i'; offset + max(Lq, Lk) must fit in an int */
    mha_dtype    kv_dtype;       /* how keys and values are stored: SDPA's k and v, and the KV
                                    cache a plan made with MHA_PLAN_CACHE attends to (module:
                                    the cache's type; its own K and V are float32).  16-bit
                                    types are forward only (not with MHA_PLAN_TRAINING). */
} mha_options;

/* The ALiBi slopes of the paper (Press et al.) for H heads, into slopes[H]:
   with n = the largest power of two <= H, head h < n gets 2^(-8 (h+1) / n) and
   head n + m gets 2^(-4 (2m+1) / n) (every other slope of the 2n recipe).  */
MHADEF mha_status mha_alibi_slopes(int H, float *slopes, mha_error *err);

/* ====================================================================== 3
   PLANS AND RUNS
   A plan is made once from the shapes (B exactly, Lq and Lk as maxima),
   the options (copied and validated once), the thread count
   (opt->num_threads; 0 = OpenMP's default read now) and flags.  It borrows
   the weight and mask pointers it was made with: keep them alive.
   Memory: *_plan_size gives mha_sizes.plan; pass mem (8-byte aligned, that
   many bytes) to build the plan there, or mem = NULL to have it allocated
   with MHA_MALLOC (mha_plan_destroy frees it; a plan in your memory needs
   no destroy).

   A run takes its lengths (Lq <= the plan's, Lk <= the plan's; more is
   MHA_ERR_EXCEEDS_PLAN), its tensors, and an mha_run: everything else it
   reads or writes.  A run never writes its plan, so one plan may run from
   any number of threads at once, each with its own mha_run.  Results are
   bit-identical for any thread count, and each one-shot call equals the
   run of its plan bit for bit (it is that plan, made on the stack).

   THE SAVED FORWARD.  A plan made with MHA_PLAN_TRAINING says how many
   bytes its saved forward takes (mha_sizes.saved).  A forward run given
   run->saved writes there, and only there, what its backward needs (SDPA:
   each row's log-sum-exp and the output; module: Q, K, V after RoPE, the
   context and the lse; encoder: those and the layer's activations), with
   a header that records the plan's kind and the run's shape.  A backward
   run given run->saved reads it as it is: it does not look at whether the
   inputs or weights changed since, so changing them in between is the
   caller's choice (an optimizer step belongs after the backward).  A
   backward given run->saved = NULL computes the forward again, in its
   workspace.  A region that no forward of this plan's kind and shape wrote
   is MHA_ERR_SAVED.  The region belongs to the caller: one per forward
   whose backward is pending (a stack of layers keeps one per layer), and
   it may start at any byte address.
   ====================================================================== */

typedef struct mha_plan mha_plan;        /* opaque: made by the planners of sections 4-8 */
typedef struct mha_sizes mha_sizes;
typedef struct mha_run mha_run;
typedef struct mha_kv_cache mha_kv_cache;  /* section 7 */

struct mha_sizes {
    size_t plan;        /* bytes of the plan: its struct, and packed weights with MHA_PLAN_PACK */
    size_t workspace;   /* bytes every run of the plan fits in (one per concurrent run) */
    size_t saved;       /* bytes of a saved forward (MHA_PLAN_TRAINING; else 0) */
};

#define MHA_PLAN_WEIGHTS  1u  /* runs may ask for attention weights (mha_run.weights), whole
                                 matrices or chosen rows */
#define MHA_PLAN_TRAINING 2u  /* backward runs too; a forward can save what the backward needs */
#define MHA_PLAN_PACK     4u  /* module and encoder: pack Wq, Wk, Wv, Wo into the plan's memory
                                 (a copy: mha_plan_repack after the matrices change; biases
                                 and every other weight are still read at each run) */
#define MHA_PLAN_CACHE    8u  /* SDPA and module: runs may attend to a KV cache (mha_run.cache);
                                 the plan's Lk is then the largest capacity, its Lq the
                                 longest chunk of new tokens (1 for decoding) */
#define MHA_PLAN_ROWS    16u  /* SDPA and module: runs may ask for the weights of chosen query
                                 rows only (mha_run.rows): the fused path, each row's lse and
                                 a row of scores, far less than MHA_PLAN_WEIGHTS needs */

/* Everything a run reads or writes besides its main tensors.  Zero-
   initialise it and set what you use; a run given NULL uses none of it.
   A field the call cannot honour is refused (its name in mha_error), never
   silently ignored.  Each output is NULL (not wanted) or the caller's. */
struct mha_run {
    void  *workspace;              /* the plan's workspace bytes, or NULL: the run allocates */
    size_t workspace_bytes;
    void  *saved;                  /* the saved forward (see above), or NULL */
    size_t saved_bytes;
    const void *attn_mask;         /* this run's mask data for its lengths, dense ([Lq, Lk], ...) */
    const void *key_padding_mask;  /* ([B, Lk]); NULL: the data of the plan's options */
    mha_kv_cache *cache;           /* SDPA and module forward (plan made with MHA_PLAN_CACHE):
                                      attend to this KV cache (section 7) */

    /* forward outputs */
    float *weights;                /* attention weights (plan made with MHA_PLAN_WEIGHTS, or
                                      MHA_PLAN_ROWS for rows): SDPA
                                      [B,H,Lq,Lk]; module, encoder [B,Lq,Lk'] head average or
                                      [B,H,Lq,Lk'] with opt->per_head_weights, Lk' = Lk + the
                                      appended keys; with rows, n_rows in place of Lq */
    int        n_rows;             /* > 0: the weights of these query rows only, recomputed */
    const int *rows;               /*   from each row's lse after the fused forward */
    float *lse;                    /* [B, H, Lq]: log sum_j exp(s_ij) over the allowed keys
                                      and the sink; -inf for a row with none */
    float *entropy;                /* [B, H, Lq]: -sum_j p_j log p_j (- p_s log p_s with a sink) */
    float *max_weight;             /* [B, H, Lq]: max_j p_j */
    float *first_weight;           /* [B, H, Lq]: p_0, the weight on key 0 (0 when blocked) */

    /* backward outputs */
    float *sinks_grad;             /* [H], += dLoss/dsinks (opt->sinks set) */
};

/* The sizes of a plan that exists. */
MHADEF mha_status mha_plan_sizes(const mha_plan *plan, mha_sizes *sizes, mha_error *err);
/* A plan made with MHA_PLAN_PACK computes with the copy of the weights it
   packed.  After the weights change (an optimizer step), repack: this
   reads the module's weight pointers again.  It writes the plan, so no
   run of it may be in flight.  A plan without MHA_PLAN_PACK reads the
   weights at every run and needs nothing.  */
MHADEF mha_status mha_plan_repack(mha_plan *plan, mha_error *err);
MHADEF void       mha_plan_destroy(mha_plan *plan);

/* ====================================================================== 4
   MATRIX MULTIPLY
   C = alpha * op(A) * op(B) + beta * C, row-major, op(A) is M x K, op(B) is K x N.
   A is stored M x K (lda >= K) when ta == MHA_NO_TRANS, K x M (lda >= M) when MHA_TRANS;
   B likewise K x N (ldb >= N) or N x K (ldb >= K); C is M x N (ldc >= N).
   When beta == 0, C is never read (NaN in C does not propagate).  The
   result is bit-identical for any number of threads.
   ====================================================================== */

typedef enum mha_trans { MHA_NO_TRANS = 0, MHA_TRANS = 1 } mha_trans;


/* One shot.  run: NULL, or its workspace (the bytes mha_gemm_plan_size
   gives for these sizes and num_threads 0); without one the call
   allocates it through MHA_MALLOC. */
MHADEF mha_status mha_gemm(mha_trans ta, mha_trans tb, int M, int N, int K, float alpha,
                           const float *A, int lda, const float *B, int ldb, float beta,
                           float *C, int ldc, const mha_run *run, mha_error *err);
/* The plan fixes the transposes, M, N, K and the thread count (0 = OpenMP's). */
MHADEF mha_status mha_gemm_plan_size(mha_trans ta, mha_trans tb, int M, int N, int K,
                                     int num_threads, mha_sizes *sizes, mha_error *err);
MHADEF mha_status mha_gemm_plan(mha_trans ta, mha_trans tb, int M, int N, int K, int num_threads,
                                void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err);
MHADEF mha_status mha_gemm_run(const mha_plan *plan, float alpha, const float *A, int lda,
                               const float *B, int ldb, float beta, float *C, int ldc,
                               const mha_run *run, mha_error *err);

/* ====================================================================== 5
   SCALED DOT-PRODUCT ATTENTION on heads that are already projected:
     q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv]  ->  out [B,H,Lq,Dv]
   (Hkv = opt->num_kv_heads or H.)  k and v hold opt->kv_dtype elements:
   float (the default), or MHA_F16 / MHA_BF16 (forward only; the backward
   takes float32 k and v).  out may be q when D == Dv (in place); it
   must not overlap k or v (nor, with run->rows, q).  With run->cache, k and
   v are NULL and Lk is 0: the queries, the newest Lq tokens of each row
   (appended already), attend to the cache's keys with bottom-right
   alignment (plan: MHA_PLAN_CACHE, Lk >= capacity, num_kv_heads 0 or the
   cache's Hkv; no masks).
   Backward: dout [B,H,Lq,Dv];  dq += dLoss/dq,  dk += ...,  dv += ...
   (each may be NULL; mask values get no gradient).
   ====================================================================== */

MHADEF mha_status mha_sdpa_forward(int B, int H, int Lq, int Lk, int D, int Dv,
                                   const float *q, const void *k, const void *v,
                                   const mha_options *opt, float *out,
                                   const mha_run *run, mha_error *err);
MHADEF mha_status mha_sdpa_backward(int B, int H, int Lq, int Lk, int D, int Dv,
                                    const float *q, const float *k, const float *v,
                                    const float *dout, const mha_options *opt,
                                    float *dq, float *dk, float *dv,
                                    const mha_run *run, mha_error *err);
MHADEF mha_status mha_sdpa_plan_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                     const mha_options *opt, unsigned flags,
                                     mha_sizes *sizes, mha_error *err);
MHADEF mha_status mha_sdpa_plan(int B, int H, int Lq, int Lk, int D, int Dv,
                                const mha_options *opt, unsigned flags,
                                void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err);
MHADEF mha_status mha_sdpa_run_forward(const mha_plan *plan, int Lq, int Lk,
                                       const float *q, const void *k, const void *v,
                                       float *out, const mha_run *run, mha_error *err);
MHADEF mha_status mha_sdpa_run_backward(const mha_plan *plan, int Lq, int Lk,
                                        const float *q, const float *k, const float *v,
                                        const float *dout, float *dq, float *dk, float *dv,
                                        const mha_run *run, mha_error *err);

/* ====================================================================== 6
   THE MODULE: an nn.MultiheadAttention (batch_first=True)
     query [B,Lq,E], key [B,Lk,kdim], value [B,Lk,vdim]  ->  out [B,Lq,E]
   Masks are given for the Lk real keys; the appended keys (bias_k,
   add_zero_attn) are never masked (PyTorch pads the masks the same way).
   out may be the same buffer as query, key and/or value (in place).
   Backward: dout [B,Lq,E]; dquery, dkey, dvalue (each may be NULL) and the
   weight gradients (grad, may be NULL) are added to.  For self-attention
   pass the same x three times and the same dx three times.
   With run->cache (decoding, self-attention only): query holds the next Lq
   tokens of every row, key and value are NULL (or query) and Lk is 0;
   their keys and values are projected, turned by RoPE at positions
   opt->position_offset + len[b] + i, appended, and the queries attend to
   the whole cache (bottom-right; opt->causal for a prefill chunk, Lq > 1).
   The plan needs MHA_PLAN_CACHE; the cache needs Hkv = the module's KV
   heads, D = E / H, B = the plan's, capacity <= the plan's Lk; the module
   kdim = vdim = E, no bias_k / add_zero_attn.
   A row without room: MHA_ERR_CAPACITY, nothing written.
   ====================================================================== */

/* Rotary position embedding of Q and K (functions and the math: section 7). */
typedef enum mha_rope_kind {
    MHA_ROPE_NONE = 0,       /* no rotation (the zero default) */
    MHA_ROPE_HALF,           /* pairs (x[m], x[m + R/2]): rotate_half, GPT-NeoX, llama */
    MHA_ROPE_INTERLEAVED     /* pairs (x[2m], x[2m+1]): GPT-J, RoFormer */
} mha_rope_kind;
typedef struct mha_rope {
    mha_rope_kind kind;      /* outside the enum: MHA_ERR_BAD_ENUM */
    int   rotary_dim;        /* R: 0 = D; must be even and <= D */
    float theta;             /* base: 0 = 10000; negative or not finite: invalid */
} mha_rope;

/* Pointers are borrowed, in the state_dict layout, so tensors can be copied
   in unchanged.  A NULL bias means bias=False.  Either in_proj_weight
   (kdim == vdim == embed_dim) or the three q/k/v_proj_weight must be set.
   The five weight matrices hold weight_dtype elements (float by default;
   they are void pointers since 1.2 for that, and a float * converts to
   them as before); biases and the rest are float.  */
typedef struct mha_module {
    int embed_dim;                 /* E */
    int num_heads;                 /* H, E % H == 0, head_dim D = E / H */
    int kdim, vdim;                /* 0 = E */
    int add_zero_attn;             /* append a zero key and value after the head split */
    const void  *in_proj_weight;   /* [3E, E]: rows Wq, then Wk, then Wv */
    const void  *q_proj_weight;    /* [E, E]    (used when in_proj_weight is NULL) */
    const void  *k_proj_weight;    /* [E, kdim] */
    const void  *v_proj_weight;    /* [E, vdim] */
    const float *in_proj_bias;     /* [3E] or NULL */
    const void  *out_proj_weight;  /* [E, E] */
    const float *out_proj_bias;    /* [E] or NULL */
    const float *bias_k, *bias_v;  /* [E] each (add_bias_kv=True), or both NULL */
    int num_kv_heads;              /* GQA/MQA: Hkv, 0 = H; H % Hkv == 0.  The K and V projections
                                      then have Ekv = Hkv*D rows: k_proj_weight [Ekv, kdim],
                                      v_proj_weight [Ekv, vdim], or in_proj_weight [E + 2Ekv, E]
                                      (rows Wq, Wk, Wv) with in_proj_bias [E + 2Ekv], and
                                      bias_k, bias_v [Ekv].  Query head h reads KV head
                                      h / (H / Hkv). */
    mha_rope rope;                 /* RoPE on Q and K after their projections (kind 0 = none);
                                      positions from opt->position_offset */
    mha_dtype weight_dtype;        /* the five weight matrices' elements: MHA_F32 (zero), or
                                      MHA_F16 / MHA_BF16 (a checkpoint's own tensors): widened
                                      to float32 as a plan made with MHA_PLAN_PACK packs them,
                                      so it needs that flag (a one-shot call has none) and is
                                      forward only (not MHA_PLAN_TRAINING, not in an encoder) */
} mha_module;

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

MHADEF mha_status mha_module_forward(const mha_module *m, int B, int Lq, int Lk,
                                     const float *query, const float *key, const float *value,
                                     const mha_options *opt, float *out,
                                     const mha_run *run, mha_error *err);
MHADEF mha_status mha_module_backward(const mha_module *m, int B, int Lq, int Lk,
                                      const float *query, const float *key, const float *value,
                                      const float *dout, const mha_options *opt,
                                      float *dquery, float *dkey, float *dvalue,
                                      const mha_module_grad *grad, const mha_run *run,
                                      mha_error *err);
MHADEF mha_status mha_module_plan_size(const mha_module *m, int B, int Lq, int Lk,
                                       const mha_options *opt, unsigned flags,
                                       mha_sizes *sizes, mha_error *err);
MHADEF mha_status mha_module_plan(const mha_module *m, int B, int Lq, int Lk,
                                  const mha_options *opt, unsigned flags,
                                  void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err);
MHADEF mha_status mha_module_run_forward(const mha_plan *plan, int Lq, int Lk,
                                         const float *query, const float *key, const float *value,
                                         float *out, const mha_run *run, mha_error *err);
MHADEF mha_status mha_module_run_backward(const mha_plan *plan, int Lq, int Lk,
                                          const float *query, const float *key, const float *value,
                                          const float *dout, float *dquery, float *dkey,
                                          float *dvalue, const mha_module_grad *grad,
                                          const mha_run *run, mha_error *err);

/* ====================================================================== 7
   DECODING: the KV cache, rotary positions, and merging split attention
   ====================================================================== */

/* A caller-owned cache of projected keys and values (after RoPE).  Layout,
   plain memory that another engine can fill:
       k, v   [B, Hkv, capacity, D]:  token t of batch row b, KV head g at
              k[((b * Hkv + g) * capacity + t) * D]
       len    [B]: the tokens row b holds, 0..capacity (rows may differ: ragged)
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
   Queries attend as the newest Lq tokens of each row: Lq > len[b] (no
   ring) is MHA_ERR_CAPACITY.  Zero the struct before filling it.
   Storage (dtype): float32, or MHA_F16 / MHA_BF16 at half the bytes (an
   element is then a uint16_t); appends convert float32 keys and values to
   it (rounded as mha_convert), the attention widens them as it reads, and
   a plan attends only to caches of its opt->kv_dtype (else MHA_ERR_DTYPE).
   k and v are void pointers since 1.2: cast them to read the elements.  */
struct mha_kv_cache {
    int B, Hkv, D, capacity;
    void *k, *v;       /* capacity * D elements of dtype per (b, g) */
    int *len;
    int ring;          /* nonzero: rolling buffer */
    int n_keep;        /* ring: tokens 0..n_keep-1 are never overwritten; 0 <= n_keep < capacity */
    mha_dtype dtype;   /* the elements of k and v: MHA_F32 (zero), MHA_F16 or MHA_BF16 */
};

/* Append n tokens to every row: k_new, v_new [B, Hkv, n, D] float32 (the
   SDPA layout, RoPE already applied), written at slots len[b]..len[b]+n-1
   in the cache's dtype; len += n.  (A module run with run->cache appends
   for you.)  */
MHADEF mha_status mha_kv_cache_append(mha_kv_cache *c, int n, const float *k_new,
                                      const float *v_new, mha_error *err);

/* Rotary position embedding (Su et al.).  The first R = rotary_dim features
   of each head form R/2 pairs (a_m, b_m); pair m of a token at position p
   turns by the angle p * theta^(-2m/R):
       a' = a cos - b sin,    b' = b cos + a sin
   The pairs are (x[m], x[m + R/2]) for MHA_ROPE_HALF (rotate_half: GPT-NeoX,
   llama) and (x[2m], x[2m+1]) for MHA_ROPE_INTERLEAVED (GPT-J, RoFormer).
   Features past R pass unchanged.  Angles are computed in double.
   x [B, H, L, D] (the SDPA layout) is rotated in place: token l of batch b
   sits at position pos0 + l, or positions[b*L + l] when positions is not
   NULL (ragged batches); positions must be >= 0.  The backward turns dx
   by the opposite angles (the rotation's transpose), in place.  */
MHADEF mha_status mha_rope_forward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                   const int *positions, float *x, mha_error *err);
MHADEF mha_status mha_rope_backward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                    const int *positions, float *dx, mha_error *err);

/* Merge attention results computed over disjoint sets of keys (flash-
   decoding's split-K, xformers' merge_attentions).  Part p gives out_p
   [rows, Dv] and lse_p [rows] (run->lse of its call); the result over the
   union of the keys is
       lse = log sum_p exp(lse_p),     out = sum_p exp(lse_p - lse) out_p
   A row whose parts all have lse = -inf (no key anywhere) gets zeros and
   -inf; a NaN lse in any part gives that row NaN (out and lse).  Sinks
   belong to one part only.  out may be outs[0] and lse any of lses[] (in
   place).  The parts are summed in order p = 0, 1, ..., so a fixed split
   gives a fixed result.  */
MHADEF mha_status mha_attn_merge(int nparts, size_t rows, int Dv, const float *const *outs,
                                 const float *const *lses, float *out, float *lse,
                                 mha_error *err);

/* ====================================================================== 8
   THE ENCODER LAYER: an nn.TransformerEncoderLayer(batch_first=True) in
   eval mode (no dropout).  Pointer fields follow its state_dict names:
   self_attn.* go into self_attn, linear1.weight -> linear1_weight, ...
     post-norm (norm_first = 0):  h = LN1(x + SA(x));   y = LN2(h + FF(h))
     pre-norm  (norm_first = 1):  h = x + SA(LN1(x));   y = h + FF(LN2(h))
     FF(z) = linear2(act(linear1(z)))
   x, y, dy, dx: [B, L, E]; x and y must not overlap.  opt carries src_mask
   (attn_mask), src_key_padding_mask and is_causal (causal).  An inference
   plan (no MHA_PLAN_TRAINING) runs the feed-forward block a few rows at a
   time, so its workspace grows with L*E, never L*F or L^2.
   ====================================================================== */

typedef enum mha_activation {
    MHA_ACT_RELU = 0,   /* max(0, x) (the zero default, as in PyTorch) */
    MHA_ACT_GELU        /* exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) */
} mha_activation;

typedef struct mha_encoder_layer {
    mha_module     self_attn;        /* embed_dim = d_model, num_heads = nhead; kdim and vdim
                                        0 or d_model */
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

/* nn.TransformerEncoderLayer's defaults for what is not a weight:
   dim_feedforward 2048, ReLU, post-norm, layer_norm_eps 1e-5 (cannot fail). */
MHADEF mha_encoder_layer mha_encoder_layer_defaults(void);

MHADEF mha_status mha_encoder_forward(const mha_encoder_layer *layer, int B, int L,
                                      const float *x, const mha_options *opt, float *y,
                                      const mha_run *run, mha_error *err);
MHADEF mha_status mha_encoder_backward(const mha_encoder_layer *layer, int B, int L,
                                       const float *x, const float *dy, const mha_options *opt,
                                       float *dx, const mha_encoder_layer_grad *grad,
                                       const mha_run *run, mha_error *err);
MHADEF mha_status mha_encoder_plan_size(const mha_encoder_layer *layer, int B, int L,
                                        const mha_options *opt, unsigned flags,
                                        mha_sizes *sizes, mha_error *err);
MHADEF mha_status mha_encoder_plan(const mha_encoder_layer *layer, int B, int L,
                                   const mha_options *opt, unsigned flags,
                                   void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err);
MHADEF mha_status mha_encoder_run_forward(const mha_plan *plan, int L, const float *x, float *y,
                                          const mha_run *run, mha_error *err);
MHADEF mha_status mha_encoder_run_backward(const mha_plan *plan, int L, const float *x,
                                           const float *dy, float *dx,
                                           const mha_encoder_layer_grad *grad,
                                           const mha_run *run, mha_error *err);

/* ====================================================================== 9
   TRAINING PIECES (docs/theory.md has the formulas, docs/training.md a
   worked example).  Every backward ADDS its gradients into the buffers it
   is given, the way PyTorch accumulates .grad: zero them before a step.  A
   NULL gradient pointer means "not needed".
   ====================================================================== */

/* y[rows, out] = x[rows, in] W^T + b   (nn.Linear; W [out, in], b [out] or NULL).
   Backward: dx += dy W,  dW += dy^T x,  db += sum over rows of dy.
   run: NULL or its workspace, of mha_linear_workspace_size bytes.  */
MHADEF mha_status mha_linear_workspace_size(int rows, int in, int out, size_t *bytes,
                                            mha_error *err);
MHADEF mha_status mha_linear_forward(int rows, int in, int out, const float *x, const float *W,
                                     const float *b, float *y, const mha_run *run, mha_error *err);
MHADEF mha_status mha_linear_backward(int rows, int in, int out, const float *x, const float *W,
                                      const float *dy, float *dx, float *dW, float *db,
                                      const mha_run *run, mha_error *err);

/* y[rows, E] = (x - mean) / sqrt(var + eps) * w + b per row (nn.LayerNorm, biased var).
   eps 0 = 1e-5.  Backward adds into dx, dw, db (each may be NULL).  */
MHADEF mha_status mha_layernorm_forward(int rows, int E, const float *x, const float *w,
                                        const float *b, float eps, float *y, mha_error *err);
MHADEF mha_status mha_layernorm_backward(int rows, int E, const float *x, const float *w,
                                         float eps, const float *dy, float *dx, float *dw,
                                         float *db, mha_error *err);

/* Sinusoidal positional encoding, pe [L, d]:
     PE[pos, 2i] = sin(pos / 10000^(2i/d)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d))  */
MHADEF mha_status mha_positional_encoding(int L, int d, float *pe, mha_error *err);

/* Embedding lookup (nn.Embedding): out[n, d] = table[tokens[n], :], table [vocab, d].
   Backward: dtable[tokens[n], :] += dout[n, :].  A token outside [0, vocab) is
   MHA_ERR_INVALID_ARGUMENT.  */
MHADEF mha_status mha_embedding_forward(int n, int vocab, int d, const int *tokens,
                                        const float *table, float *out, mha_error *err);
MHADEF mha_status mha_embedding_backward(int n, int vocab, int d, const int *tokens,
                                         const float *dout, float *dtable, mha_error *err);

/* Mean cross-entropy of logits [n, V] against targets [n] (nn.CrossEntropyLoss):
     loss = -(1/N) sum_r log softmax(logits_r)[target_r],  N = rows with target >= 0
   Rows with a negative target are ignored (ignore_index).  dlogits (may be NULL)
   is written, not added: dlogits_r = (softmax(logits_r) - onehot(target_r)) / N.
   correct (may be NULL) receives how many counted rows have argmax == target.
   With every target ignored (N = 0) the loss is 0 and dlogits all zero, so
   such a batch changes nothing; PyTorch's mean returns NaN there.  */
MHADEF mha_status mha_cross_entropy(int n, int V, const float *logits, const int *targets,
                                    float *loss, float *dlogits, int *correct, mha_error *err);

/* Plain SGD (torch.optim.SGD without momentum): p -= lr * (g + weight_decay * p).
   lr and weight_decay must be finite and >= 0.  */
MHADEF mha_status mha_sgd_step(size_t n, float *p, const float *g, float lr, float weight_decay,
                               mha_error *err);

/* AdamW (torch.optim.AdamW).  Every field means exactly its value, zero
   included: start from mha_adamw_defaults(), PyTorch's lr 1e-3, betas
   (0.9, 0.999), eps 1e-8, weight_decay 0.01, and change what differs.
   Every field must be finite, with lr, eps, weight_decay >= 0 and beta1,
   beta2 in [0, 1).  step is the 1-based step count (for bias correction);
   m and v are the caller's moment buffers of n floats, zero before the
   first step.  */
typedef struct mha_adamw {
    float lr, beta1, beta2, eps, weight_decay;
} mha_adamw;
MHADEF mha_adamw  mha_adamw_defaults(void);
MHADEF mha_status mha_adamw_step(const mha_adamw *opt, long step, size_t n, float *p,
                                 const float *g, float *m, float *v, mha_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MHA_H */

/* ======================================================================== */
/*                              IMPLEMENTATION                              */
/* ======================================================================== */
#ifdef MHA_IMPLEMENTATION
#if !defined(MHA_IMPLEMENTATION_DONE) || defined(MHA__TIER_PASS)
#ifndef MHA__TIER_PASS   /* the main pass (a kernel tier's pass compiles only the SIMD layer and section 4-5 kernels: THE KERNEL TIERS) */
#define MHA_IMPLEMENTATION_DONE

/* The implementation follows the sections of the declarations above, by
   number (0 holds the foundations every section uses); each section's
   internals come first, then its public functions in the order they are
   declared.  */

/* THE INTERNAL TESTING HOOK.  Every test goes through the public API
   except the white-box tests of the kernels and of two layouts, which
   include the implementation and use these internals by name (renaming
   one breaks them, on purpose; nothing else may rely on them):
     SIMD layer   tests/test_simd.c, test_fused.c (and bench/, for the FMA
                  peak): mha__vf, mha__vload, mha__vstore, mha__vset1,
                  mha__vzero, mha__vadd, mha__vsub, mha__vfma, mha__vmax,
                  mha__vhsum, mha__vhmax, mha__vtranspose, mha__vexp,
                  mha__vexp_nonpos, MHA__VW, MHA__EXP_LO, MHA__EXP_HI,
                  MHA__SIMD_NAME
     softmax      test_simd.c: mha__softmax_row_lse, mha__softmax_row_ref,
                  mha__dot, mha__axpy
     GEMM         tests/test_gemm.c, test_pack.c: mha__gemm, mha__gemm_pp,
                  mha__gemm_mt, mha__gemm_mt_pp, mha__gemm_ws_floats,
                  mha__gemm_ws_floats_mt, mha__prepack_b,
                  mha__prepacked_floats, mha__linear, mha__align_ws,
                  MHA__MR, MHA__NR, MHA__MC, MHA__KC, MHA__NC,
                  MHA__ALIGN_FLOATS (bench/kernel_disasm.c: mha__kernel)
     thresholds   overridden before the include to reach a path at small
                  sizes: MHA__QCHUNK (test_fused.c), MHA__BY_HEAD_FLOATS
                  (test_by_head.c, test_memory.c, test_defects.c,
                  test_decode_module.c), MHA__FF_ROWS (test_plans.c)
     saved layout tests/test_saved.c: mha__sdpa_saved_floats (to edit a
                  saved lse and see the backward read it as it is)
     kernel tiers MHA__FORCE_TIER (an int expression) caps the tier that
                  runs (tests/tier_env.h, bench/bench_tiers.c via the
                  Makefile).  The GEMM and fused white-box tests name the
                  kernels of the compile-time tier, so they define
                  MHA_NO_DISPATCH; the SIMD layer's names (above) are always
                  tier 0's.  */

#include <math.h>
#include <string.h>
#include <stdint.h>
#include <limits.h>
#include <stdio.h>
#include <stdarg.h>

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
/* MHA__SPECIAL: a kernel body written for constant parameters (a column
   count, a storage type), inlined into each call with constants so that
   its arrays of vectors become registers */
/* MHA__UNROLL: unroll the next loop (constant trip count) completely */
#if defined(__GNUC__) || defined(__clang__)
#define MHA__SPECIAL static inline __attribute__((always_inline))
#define MHA__UNROLL _Pragma("GCC unroll 16")
#elif defined(_MSC_VER)
#define MHA__SPECIAL static __forceinline
#define MHA__UNROLL
#else
#define MHA__SPECIAL static inline
#define MHA__UNROLL
#endif

#ifdef __cplusplus
#define MHA__CAST(T, x) static_cast<T>(x)
#else
#define MHA__CAST(T, x) ((T)(x))
#endif

/* ====================================================================== 0
   FOUNDATIONS
   Size arithmetic that cannot overflow, workspace regions, the scalar
   reference of the softmax, and the SIMD layer every kernel is written in.
   ====================================================================== */

/* ------------------------------------------------- size arithmetic */

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
     (the module's decoding step too), which the encoder runs before it forms
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

/* n floats rounded up to whole 64-byte lines */
static size_t mha__round_floats(size_t n)
{
    return (n + MHA__ALIGN_FLOATS - 1) / MHA__ALIGN_FLOATS * MHA__ALIGN_FLOATS;
}

/* Whether n1 floats at a and n2 floats at b share memory. */
static int mha__overlap(const float *a, size_t n1, const float *b, size_t n2)
{
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    return pa < pb + n2 * sizeof(float) && pb < pa + n1 * sizeof(float);
}

/* ---- the scalar reference
   The readable definition of each operation.  The SIMD layer below
   computes the same thing faster; tests compare the two. */
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

/* ---- 16-bit storage: the scalar definitions (mha_dtype)
   Every vector conversion of the SIMD layer gives these bits.  */

static float mha__bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static uint32_t mha__f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

/* binary16 -> float32, exact.  h = s eeeee ffffffffff:  e = 0: (-1)^s f 2^-24
   (subnormal); e = 31: inf (f = 0) or NaN (quieted, payload kept in the top
   fraction bits, as F16C and NEON do); else (-1)^s (1 + f/1024) 2^(e-15),
   i.e. the exponent rebiased by 127 - 15 = 112 and f moved up 13 bits.  */
static float mha__f16_to_f32(uint16_t h)
{
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, f = h & 0x3ffu;
    if (e == 0x1f) return mha__bits_f32(s | 0x7f800000u | (f ? 0x00400000u : 0u) | (f << 13));
    if (e) return mha__bits_f32(s | ((e + 112u) << 23) | (f << 13));
    return mha__bits_f32(s | mha__f32_bits((float)f * 5.9604644775390625e-8f));   /* f 2^-24: exact */
}

/* float32 -> binary16, rounded to nearest, ties to even.  |x| >= 65520
   (halfway past the largest half, 65504) becomes inf; NaN a quiet NaN with
   its sign and top 9 payload bits.  Normal halves: rebias the exponent
   (subtract 112 << 23) and round away the low 13 fraction bits; below
   2^-14 the result is a subnormal q 2^-24 with q the significand m (24
   bits, value m 2^(e-150)) shifted right by 126 - e, rounded.  */
static uint16_t mha__f32_to_f16(float x)
{
    uint32_t u = mha__f32_bits(x), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu, r, m, q, rem, half;
    int sh;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00u);
    if (a >= 0x38800000u) {
        r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(s | (r >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)s;               /* |x| <= 2^-25: rounds to 0 */
    m = (a & 0x7fffffu) | 0x800000u;
    sh = 126 - (int)(a >> 23);                             /* 14..24 */
    q = m >> sh; rem = m & ((1u << sh) - 1u); half = 1u << (sh - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (uint16_t)(s | q);
}

/* bfloat16 -> float32: the 16 bits on top of 16 zero bits (exact). */
static float mha__bf16_to_f32(uint16_t h) { return mha__bits_f32((uint32_t)h << 16); }

/* float32 -> bfloat16, rounded to nearest, ties to even: add 0x7fff plus
   the lowest kept bit and drop 16 bits (a carry into the exponent is the
   rounding up; past the largest finite it gives inf).  NaN: the top bits
   with the quiet bit set, so the payload cannot round to inf.  */
static uint16_t mha__f32_to_bf16(float x)
{
    uint32_t u = mha__f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One 16-bit element of type dt (MHA_F16 or MHA_BF16), widened / narrowed. */
static float mha__h2f(uint16_t h, int dt) { return dt == MHA_F16 ? mha__f16_to_f32(h) : mha__bf16_to_f32(h); }
static uint16_t mha__f2h(float x, int dt) { return dt == MHA_F16 ? mha__f32_to_f16(x) : mha__f32_to_bf16(x); }

/* ---- the kernel tiers
   The kernels (the SIMD layer below, the GEMM of section 4 and the
   attention core of section 5) are compiled once per tier of x86 vector
   instructions, and each call runs the best tier the CPU has:
       tier 0   what the compiler flags enable: AVX-512 (-mavx512f or
                -march=native on such a CPU), AVX2+FMA (-mavx2 -mfma), NEON
                (aarch64), or the portable scalar kernels (no flags)
       tier 1   AVX2+FMA, compiled when tier 0 is scalar
       tier 2   AVX-512F, compiled when tier 0 is not AVX-512 (not with
                MHA_NO_AVX512)
   so a build with no flags runs AVX-512 or AVX2 kernels where the CPU has
   them.  How: after the main pass, the header includes itself once per
   tier (MHA__PASS_DRIVER at the end); such a pass compiles only the kernel
   regions (marked "kernels: one copy per tier"), under the tier's target
   pragma, with every kernel name given the tier's suffix (mha__gemm_avx2).
   The rest of the library calls the kernels through the table of the tier
   mha__tier() picks, via __builtin_cpu_supports (libgcc reads the CPU once,
   at start-up; nothing here is stored).  A pass finds the header by
   __FILE_NAME__, so dispatch needs GCC 12+ or clang 9+ on x86-64; elsewhere,
   with MHA_NO_DISPATCH, with MHA_NO_SIMD, or when tier 0 is already the
   best, the kernels are compiled once, in place, and run as compiled.
   mha_kernels() names the tier that runs.
   A rule for the kernel regions: the body of an OpenMP parallel region
   there only calls functions.  clang (14) does not give the outlined body
   its tier's target, so vector code written directly inside it does not
   compile in a clang dispatch build ("AVX vector return ... changes the
   ABI"); GCC does.  */
#if !defined(MHA_NO_DISPATCH) && !defined(MHA_NO_SIMD) && defined(__x86_64__) && \
    (defined(__GNUC__) || defined(__clang__)) && defined(__FILE_NAME__)
#if !defined(__AVX2__) || !defined(__FMA__)
#define MHA__TIER1_AVX2 1     /* tier 0 is scalar: compile an AVX2 tier */
#endif
#if !defined(MHA_NO_AVX512) && !defined(__AVX512F__)
#define MHA__TIER2_AVX512 1   /* tier 0 is not AVX-512: compile an AVX-512 tier */
#endif
#if defined(MHA__TIER1_AVX2) || defined(MHA__TIER2_AVX512)
#define MHA__DISPATCH 1
#include <immintrin.h>        /* before any target pragma: the intrinsics of every tier */
#endif
#endif

/* The widest register tile of any tier (AVX-512: 32 columns), for bounds
   that must hold whatever tier runs. */
#define MHA__NR_MAX 32

/* The tier this process runs: 0, 1 or 2 as above (tier 0 only, without
   dispatch).  MHA__FORCE_TIER (a testing hook) caps it. */
static int mha__tier(void)
{
    int t = 0;
#if defined(MHA__DISPATCH)
    __builtin_cpu_init();
#if defined(MHA__TIER2_AVX512)
    if (__builtin_cpu_supports("avx512f")) t = 2;
#endif
#if defined(MHA__TIER1_AVX2)
    /* F16C too (its 16-bit loads); clang 14 cannot ask, and no CPU has
       AVX2 and FMA without it */
#if defined(__clang__)
    if (!t && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) t = 1;
#else
    if (!t && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) t = 1;
#endif
#endif
#if defined(MHA__FORCE_TIER)
    if (t > MHA__FORCE_TIER) t = MHA__FORCE_TIER;
#if defined(MHA__TIER2_AVX512) && !defined(MHA__TIER1_AVX2)
    if (t == 1) t = 0;   /* no tier 1 in this build: tier 0 is AVX2 */
#endif
#endif
#endif
    return t;
}

#endif /* main pass */

/* ---- the SIMD layer
   One thin vector type so each kernel is written once (the ggml idea).
   mha__vf holds MHA__VW floats:  AVX-512 16 lanes, AVX2+FMA 8 lanes,
   NEON 4 lanes, scalar 1.
   Loads and stores are unaligned.  mha__vfma(acc, a, b) = acc + a*b.
   mha__vm is a lane mask from a comparison, used only by mha__vsel.
   mha__vtranspose(r) transposes the MHA__VW x MHA__VW block held in r[];
   mha__vrowsums(r) is the vector of the MHA__VW rows' lane sums.
   Tier 0 is chosen here from the compiler's flags (MHA_NO_SIMD wins); a
   tier's pass names its own (the kernel tiers, above). */
#undef MHA__SIMD_AVX512       /* a previous pass's choice */
#undef MHA__SIMD_AVX2
#undef MHA__SIMD_NEON
#undef MHA__SIMD_SCALAR
#undef MHA__SIMD_NAME
#undef MHA__VW
#undef MHA__ALL16
#if defined(MHA__PASS_TIER) && MHA__PASS_TIER == 2
#define MHA__SIMD_AVX512 1
#elif defined(MHA__PASS_TIER) && MHA__PASS_TIER == 1
#define MHA__SIMD_AVX2 1
#elif !defined(MHA_NO_SIMD) && !defined(MHA_NO_AVX512) && defined(__AVX512F__)
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
/* lane u := the sum of r[u]'s lanes, u < 16: pairs of rows interleaved
   and added (16 -> 8 vectors: each 128-bit lane holds 2 rows' partial sums
   twice), again (8 -> 4: 4 rows per 128-bit lane), then the four 128-bit
   lanes added across, rows 4m.. landing in lane m: 45 instructions where a
   transpose and its adds take 79 */
MHA__SPECIAL mha__vf mha__vrowsums(const mha__vf *r)
{
    __m512 x[8], y[4], s01, s23;
    int k;
    for (k = 0; k < 8; ++k)
        x[k] = _mm512_add_ps(_mm512_maskz_unpacklo_ps(MHA__ALL16, r[2 * k], r[2 * k + 1]),
                             _mm512_maskz_unpackhi_ps(MHA__ALL16, r[2 * k], r[2 * k + 1]));
    for (k = 0; k < 4; ++k)
        y[k] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0xEE));
    s01 = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(MHA__ALL16, y[0], y[1], 0x44),
                        _mm512_maskz_shuffle_f32x4(MHA__ALL16, y[0], y[1], 0xEE));
    s23 = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(MHA__ALL16, y[2], y[3], 0x44),
                        _mm512_maskz_shuffle_f32x4(MHA__ALL16, y[2], y[3], 0xEE));
    return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(MHA__ALL16, s01, s23, 0x88),
                         _mm512_maskz_shuffle_f32x4(MHA__ALL16, s01, s23, 0xDD));
}
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
/* 16-bit storage (the scalar definitions are mha__f16_to_f32 and friends):
   F16 by AVX-512F's vcvtph2ps / vcvtps2ph with round-to-nearest-even;
   BF16 by integer shifts (AVX-512 BF16's vcvtneps2bf16 flushes subnormal
   inputs to zero, so it is not used) */
static inline mha__vf mha__vload_f16(const uint16_t *p)
{
    return _mm512_maskz_cvtph_ps(MHA__ALL16, _mm256_loadu_si256((const __m256i *)(const void *)p));
}
static inline void mha__vstore_f16(uint16_t *p, mha__vf x)
{
    _mm256_storeu_si256((__m256i *)(void *)p,
                        _mm512_maskz_cvtps_ph(MHA__ALL16, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline mha__vf mha__vload_bf16(const uint16_t *p)
{
    __m512i w = _mm512_maskz_cvtepu16_epi32(MHA__ALL16, _mm256_loadu_si256((const __m256i *)(const void *)p));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(MHA__ALL16, w, 16));
}
static inline void mha__vstore_bf16(uint16_t *p, mha__vf x)
{
    __m512i u = _mm512_castps_si512(x), hi = _mm512_maskz_srli_epi32(MHA__ALL16, u, 16);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                 _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_maskz_srli_epi32(MHA__ALL16, r, 16),
                                _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)(void *)p, _mm512_maskz_cvtepi32_epi16(MHA__ALL16, r));
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
/* lane u := the sum of r[u]'s lanes, u < 8 (the AVX-512 tree, one level less) */
MHA__SPECIAL mha__vf mha__vrowsums(const mha__vf *r)
{
    __m256 x[4], y[2];
    int k;
    for (k = 0; k < 4; ++k)
        x[k] = _mm256_add_ps(_mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]), _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]));
    for (k = 0; k < 2; ++k)
        y[k] = _mm256_add_ps(_mm256_shuffle_ps(x[2 * k], x[2 * k + 1], 0x44), _mm256_shuffle_ps(x[2 * k], x[2 * k + 1], 0xEE));
    return _mm256_add_ps(_mm256_permute2f128_ps(y[0], y[1], 0x20), _mm256_permute2f128_ps(y[0], y[1], 0x31));
}
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
/* 16-bit storage: F16 by F16C (every AVX2 CPU has it; the AVX2 tier is
   compiled for it), else lane by lane through the scalar definition (an
   -mavx2 -mfma build without -mf16c); BF16 by integer shifts */
#if defined(__F16C__) || (defined(MHA__PASS_TIER) && MHA__PASS_TIER == 1)
static inline mha__vf mha__vload_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
}
static inline void mha__vstore_f16(uint16_t *p, mha__vf x)
{
    _mm_storeu_si128((__m128i *)(void *)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
static inline mha__vf mha__vload_f16(const uint16_t *p)
{
    float t[8];
    int i;
    for (i = 0; i < 8; ++i) t[i] = mha__f16_to_f32(p[i]);
    return _mm256_loadu_ps(t);
}
static inline void mha__vstore_f16(uint16_t *p, mha__vf x)
{
    float t[8];
    int i;
    _mm256_storeu_ps(t, x);
    for (i = 0; i < 8; ++i) p[i] = mha__f32_to_f16(t[i]);
}
#endif
static inline mha__vf mha__vload_bf16(const uint16_t *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline void mha__vstore_bf16(uint16_t *p, mha__vf x)
{
    __m256i u = _mm256_castps_si256(x), hi = _mm256_srli_epi32(u, 16);
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                 _mm256_and_si256(hi, _mm256_set1_epi32(1)));
    r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_or_si256(hi, _mm256_set1_epi32(0x40)),
                           _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    /* every lane is <= 0xffff, so the unsigned saturating pack is exact */
    _mm_storeu_si128((__m128i *)(void *)p,
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
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
/* lane u := the sum of r[u]'s lanes, u < 4: pairwise adds */
MHA__SPECIAL mha__vf mha__vrowsums(const mha__vf *r)
{
    return vpaddq_f32(vpaddq_f32(r[0], r[1]), vpaddq_f32(r[2], r[3]));
}
static inline void mha__vtranspose(mha__vf *r)
{
    float32x4x2_t p01 = vtrnq_f32(r[0], r[1]), p23 = vtrnq_f32(r[2], r[3]);
    r[0] = vcombine_f32(vget_low_f32(p01.val[0]), vget_low_f32(p23.val[0]));
    r[1] = vcombine_f32(vget_low_f32(p01.val[1]), vget_low_f32(p23.val[1]));
    r[2] = vcombine_f32(vget_high_f32(p01.val[0]), vget_high_f32(p23.val[0]));
    r[3] = vcombine_f32(vget_high_f32(p01.val[1]), vget_high_f32(p23.val[1]));
}
/* 16-bit storage: F16 by fcvtl / fcvtn (base AArch64; FPCR's default
   round-to-nearest-even), BF16 by integer shifts */
static inline mha__vf mha__vload_f16(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static inline void mha__vstore_f16(uint16_t *p, mha__vf x) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(x))); }
static inline mha__vf mha__vload_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
static inline void mha__vstore_bf16(uint16_t *p, mha__vf x)
{
    uint32x4_t u = vreinterpretq_u32_f32(x);
    uint32x4_t r = vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fff)), vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)));
    uint16x4_t nan = vmovn_u32(vmvnq_u32(vceqq_f32(x, x)));
    vst1_u16(p, vbsl_u16(nan, vorr_u16(vshrn_n_u32(u, 16), vdup_n_u16(0x40)), vshrn_n_u32(r, 16)));
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
MHA__SPECIAL mha__vf mha__vrowsums(const mha__vf *r) { return r[0]; }   /* 1 x 1 */
static inline void mha__vtranspose(mha__vf *r) { (void)r; }   /* 1 x 1 */
static inline mha__vf mha__vload_f16(const uint16_t *p) { return mha__f16_to_f32(*p); }
static inline void mha__vstore_f16(uint16_t *p, mha__vf x) { *p = mha__f32_to_f16(x); }
static inline mha__vf mha__vload_bf16(const uint16_t *p) { return mha__bf16_to_f32(*p); }
static inline void mha__vstore_bf16(uint16_t *p, mha__vf x) { *p = mha__f32_to_bf16(x); }
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

/* y += alpha * x over n floats */
static inline void mha__axpy(float *y, float alpha, const float *x, int n)
{
    const mha__vf va = mha__vset1(alpha);
    int i = 0;
    for (; i + MHA__VW <= n; i += MHA__VW)
        mha__vstore(y + i, mha__vfma(mha__vload(y + i), va, mha__vload(x + i)));
    for (; i < n; ++i) y[i] += alpha * x[i];
}

/* dst[i] = src[i] widened from dt (MHA_F16 or MHA_BF16), i < n: exact */
static inline void mha__cvt_from16(float *dst, const uint16_t *src, int dt, size_t n)
{
    size_t i = 0;
    if (dt == MHA_F16)
        for (; i + MHA__VW <= n; i += MHA__VW) mha__vstore(dst + i, mha__vload_f16(src + i));
    else
        for (; i + MHA__VW <= n; i += MHA__VW) mha__vstore(dst + i, mha__vload_bf16(src + i));
    for (; i < n; ++i) dst[i] = mha__h2f(src[i], dt);
}

/* dst[i] = src[i] narrowed to dt, rounded to nearest even, i < n */
static inline void mha__cvt_to16(uint16_t *dst, const float *src, int dt, size_t n)
{
    size_t i = 0;
    if (dt == MHA_F16)
        for (; i + MHA__VW <= n; i += MHA__VW) mha__vstore_f16(dst + i, mha__vload(src + i));
    else
        for (; i + MHA__VW <= n; i += MHA__VW) mha__vstore_bf16(dst + i, mha__vload(src + i));
    for (; i < n; ++i) dst[i] = mha__f2h(src[i], dt);
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
static MHA__UNUSED float mha__softmax_row_lse(float *s, int n, float sink)
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

#ifndef MHA__TIER_PASS   /* main pass */

/* ====================================================================== 1
   STATUS AND ERRORS
   mha_status_string, and the refusal helpers every check uses: mha__fail
   names the field and what was wrong, mha__sign adds the public call's name.
   ====================================================================== */

MHADEF const char *mha_status_string(mha_status s)
{
    switch (s) {
#define MHA__MSG(name, msg) case name: return msg;
        MHA_STATUS_LIST(MHA__MSG)
#undef MHA__MSG
    default: return "unknown mha_status value";
    }
}

MHADEF const char *mha_kernels(void)
{
    switch (mha__tier()) {
    case 1: return "avx2";
    case 2: return "avx512";
    default: return MHA__SIMD_NAME;   /* tier 0: the compiler's flags */
    }
}

/* Refusals.  Every check that refuses says so through mha__fail: the
   status, the field as the caller wrote it, and what was expected and
   found (printf-style).  The public call then signs the message with its
   name (mha__sign).  Internal calls of public functions pass err = NULL. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 4, 5)))
#endif

static mha_status mha__fail(mha_error *e, mha_status s, const char *field, const char *fmt, ...)
{
    va_list ap;
    if (!e || e->status != MHA_OK) return s;   /* the first refusal is the one reported */
    e->status = s;
    e->field = field;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return s;
}

/* At a public call's entry: a clean report (status MHA_OK, no field). */
static void mha__begin(mha_error *e)
{
    if (!e) return;
    e->status = MHA_OK;
    e->function = NULL;
    e->field = NULL;
    e->message[0] = '\0';
}

/* Append src to the message being built in dst[cap] (truncating: a long
   message keeps its start). */
static void mha__cat(char *dst, size_t cap, size_t *len, const char *src)
{
    while (*src && *len + 1 < cap) dst[(*len)++] = *src++;
    dst[*len] = '\0';
}

/* At its exit: a refusal's message becomes "function: field: detail" (a
   check that gave no detail still gets the status's sentence). */
static mha_status mha__sign(mha_error *e, const char *function, mha_status s)
{
    char detail[sizeof e->message];
    size_t n = 0;
    if (!e || s == MHA_OK) return s;
    if (e->status == MHA_OK) {   /* refused without mha__fail */
        e->status = s;
        e->field = NULL;
        e->message[0] = '\0';
    }
    memcpy(detail, e->message, sizeof detail);
    e->function = function;
    mha__cat(e->message, sizeof e->message, &n, function);
    mha__cat(e->message, sizeof e->message, &n, ": ");
    if (e->field) {
        mha__cat(e->message, sizeof e->message, &n, e->field);
        mha__cat(e->message, sizeof e->message, &n, ": ");
    }
    mha__cat(e->message, sizeof e->message, &n, detail[0] ? detail : mha_status_string(s));
    return s;
}

/* A NULL pointer argument, the commonest refusal, named as the caller wrote it. */
static mha_status mha__need(mha_error *e, const char *name, const void *ptr)
{
    return ptr ? MHA_OK : mha__fail(e, MHA_ERR_NULL_POINTER, name, "is NULL");
}

/* A size argument that must be >= 1. */
static mha_status mha__pos(mha_error *e, const char *name, int v)
{
    return v >= 1 ? MHA_OK : mha__fail(e, MHA_ERR_INVALID_SIZE, name, "is %d; expected >= 1", v);
}

/* ====================================================================== 2
   OPTIONS AND MASKS
   Every planner validates its options here, once, against the planned
   maxima; mask data pointers are checked by each run (a plan may be made
   before the masks exist).
   ====================================================================== */

/* Mask data pointers are checked by each run (a plan may be made before the
   masks exist); kinds, shapes and the other options here, once per plan. */
static mha_status mha__check_mask_kind(const mha_mask *m, const char *field, mha_error *e)
{
    if (m->kind == MHA_MASK_NONE || m->kind == MHA_MASK_BOOL || m->kind == MHA_MASK_BOOL_KEEP ||
        m->kind == MHA_MASK_FLOAT)
        return MHA_OK;
    return mha__fail(e, MHA_ERR_BAD_ENUM, field, "is %d, not an mha_mask_kind (0..3)", (int)m->kind);
}

/* Every planner validates its options here, against the planned maxima. */
static mha_status mha__check_masks(const mha_options *opt, int B, int H, int Lq, int Lk, mha_error *e)
{
    mha_status st;
    const mha_mask *am = &opt->attn_mask, *kp = &opt->key_padding_mask;
    if ((st = mha__check_mask_kind(am, "opt->attn_mask.kind", e)) != MHA_OK) return st;
    if ((st = mha__check_mask_kind(kp, "opt->key_padding_mask.kind", e)) != MHA_OK) return st;
    if (am->kind != MHA_MASK_NONE) {
        int ok = 0;
        if (am->ndim == 2)
            ok = am->shape[0] == Lq && am->shape[1] == Lk;
        else if (am->ndim == 3)
            ok = (size_t)am->shape[0] == (size_t)B * (size_t)H && am->shape[1] == Lq && am->shape[2] == Lk;
        else if (am->ndim == 4)
            ok = am->shape[0] == B && am->shape[1] == H && am->shape[2] == Lq && am->shape[3] == Lk;
        if (am->ndim < 2 || am->ndim > 4)
            return mha__fail(e, MHA_ERR_MASK_SHAPE, "opt->attn_mask.ndim", "is %d; expected 2, 3 or 4",
                             am->ndim);
        if (!ok)
            return mha__fail(e, MHA_ERR_MASK_SHAPE, "opt->attn_mask.shape",
                             "is [%d, %d%s%d%s%d]; expected [Lq, Lk] = [%d, %d], [B*H, Lq, Lk] or "
                             "[B, H, Lq, Lk] with B %d, H %d",
                             am->shape[0], am->shape[1], am->ndim > 2 ? ", " : "", am->ndim > 2 ? am->shape[2] : 0,
                             am->ndim > 3 ? ", " : "", am->ndim > 3 ? am->shape[3] : 0, Lq, Lk, B, H);
    }
    if (kp->kind != MHA_MASK_NONE && !(kp->ndim == 2 && kp->shape[0] == B && kp->shape[1] == Lk))
        return mha__fail(e, MHA_ERR_MASK_SHAPE, "opt->key_padding_mask.shape",
                         "is %d-D [%d, %d]; expected [B, Lk] = [%d, %d]", kp->ndim, kp->shape[0],
                         kp->shape[1], B, Lk);
    /* the alignment also places windows and ALiBi, so it is checked with causal off too */
    if (opt->causal_align != MHA_CAUSAL_TOP_LEFT && opt->causal_align != MHA_CAUSAL_BOTTOM_RIGHT)
        return mha__fail(e, MHA_ERR_BAD_ENUM, "opt->causal_align", "is %d; expected MHA_CAUSAL_TOP_LEFT (0) "
                         "or MHA_CAUSAL_BOTTOM_RIGHT (1)", (int)opt->causal_align);
    if (!(opt->scale >= 0.0f) || opt->scale == INFINITY)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->scale", "is %g; expected 0 (default) or a "
                         "positive finite number", (double)opt->scale);
    if (opt->num_threads < 0)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->num_threads", "is %d; expected >= 0",
                         opt->num_threads);
    return MHA_OK;
}

/* (defined further on, where its section is) */
static mha_status mha__check_rope(const mha_rope *r, int D, int who, mha_error *e);

/* The decoder options (checked where the masks are): the module's RoPE
   (rope NULL for SDPA); position_offset >= 0 and offset + max(Lq, Lk) within int;
   Hkv divides H; window sides >= -1; softcap >= 0 and finite; caller
   slopes finite; sink logits finite or -inf.  Hkv: the KV heads in use
   (the module's, or opt's); kv_field names where they came from. */
static mha_status mha__check_decode(const mha_options *opt, int H, int Hkv, const char *kv_field,
                                    const mha_rope *rope, int who, int D, int Lq, int Lk, mha_error *e)
{
    int h;
    mha_status st;
    if (rope && (st = mha__check_rope(rope, D, who, e)) != MHA_OK) return st;
    if (opt->position_offset < 0)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->position_offset", "is %d; expected >= 0",
                         opt->position_offset);
    /* key j sits at offset + j and query i at offset + i' with i' <= max(Lq, Lk):
       all of them ints */
    if (opt->position_offset > INT_MAX - (Lq > Lk ? Lq : Lk))
        return mha__fail(e, MHA_ERR_OVERFLOW, "opt->position_offset", "is %d; with %d queries and %d keys the "
                         "last position passes INT_MAX", opt->position_offset, Lq, Lk);
    if (Hkv < 0) return mha__fail(e, MHA_ERR_INVALID_SIZE, kv_field, "is %d; expected >= 0", Hkv);
    if (Hkv == 0) Hkv = H;
    if (Hkv > H || H % Hkv != 0)
        return mha__fail(e, MHA_ERR_HEADS_DIVIDE, kv_field, "is %d, which does not divide the %d query "
                         "heads", Hkv, H);
    if (opt->window && opt->window_left < -1)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->window_left", "is %d; expected -1 (unbounded) "
                         "or >= 0", opt->window_left);
    if (opt->window && opt->window_right < -1)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->window_right", "is %d; expected -1 (unbounded) "
                         "or >= 0", opt->window_right);
    if (!(opt->softcap >= 0.0f) || opt->softcap == INFINITY)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->softcap", "is %g; expected 0 (off) or a "
                         "positive finite cap", (double)opt->softcap);
    for (h = 0; opt->alibi && opt->alibi_slopes && h < H; ++h)
        if (!(opt->alibi_slopes[h] - opt->alibi_slopes[h] == 0.0f))
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->alibi_slopes", "[%d] is %g; expected a "
                             "finite slope", h, (double)opt->alibi_slopes[h]);
    for (h = 0; opt->sinks && h < H; ++h)
        if (!(opt->sinks[h] < INFINITY))   /* NaN, +inf */
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->sinks", "[%d] is %g; expected a finite "
                             "logit or -inf", h, (double)opt->sinks[h]);
    return MHA_OK;
}

/* ALiBi slope of global query head h (mha_alibi_slopes is the definition) */
static float mha__alibi_slope(int H, int h)
{
    int n = 1;
    while (n * 2 <= H) n *= 2;
    return h < n ? (float)pow(2.0, -8.0 * (h + 1) / n) : (float)pow(2.0, -4.0 * (2 * (h - n) + 1) / n);
}

MHADEF size_t mha_dtype_size(mha_dtype t)
{
    return t == MHA_F32 ? 4 : t == MHA_F16 || t == MHA_BF16 ? 2 : 0;
}

/* (defined further on, after the kernel tiers' tables: it runs the best tier's loops) */
static void mha__convert(size_t n, int from, const void *src, int to, void *dst);

MHADEF mha_status mha_convert(size_t n, mha_dtype from, const void *src, mha_dtype to, void *dst,
                              mha_error *err)
{
    static const char fn[] = "mha_convert";
    mha_status st;
    size_t sb, db;
    uintptr_t ps = (uintptr_t)src, pd = (uintptr_t)dst;
    mha__begin(err);
    if ((int)from < MHA_F32 || (int)from > MHA_BF16 || (int)to < MHA_F32 || (int)to > MHA_BF16)
        return mha__sign(err, fn, mha__fail(err, MHA_ERR_BAD_ENUM, (int)from < MHA_F32 || (int)from > MHA_BF16 ?
                         "from" : "to", "is %d; expected MHA_F32 (0), MHA_F16 (1) or MHA_BF16 (2)",
                         (int)from < MHA_F32 || (int)from > MHA_BF16 ? (int)from : (int)to));
    if (n == 0) return MHA_OK;
    if ((st = mha__need(err, "src", src)) != MHA_OK || (st = mha__need(err, "dst", dst)) != MHA_OK)
        return mha__sign(err, fn, st);
    if (n > SIZE_MAX / 4)
        return mha__sign(err, fn, mha__fail(err, MHA_ERR_OVERFLOW, "n", "is %lu; n * 4 bytes pass SIZE_MAX",
                                            (unsigned long)n));
    sb = n * mha_dtype_size(from); db = n * mha_dtype_size(to);
    /* in place only between the two 16-bit types (each element is read before it is written) */
    if (ps < pd + db && pd < ps + sb && !(ps == pd && sb == db))
        return mha__sign(err, fn, mha__fail(err, MHA_ERR_INVALID_ARGUMENT, "dst", "overlaps src; only a "
                         "conversion between types of one size may be in place (dst == src)"));
    mha__convert(n, (int)from, src, (int)to, dst);
    return MHA_OK;
}

MHADEF mha_status mha_alibi_slopes(int H, float *slopes, mha_error *err)
{
    int h;
    mha__begin(err);
    if (!slopes) return mha__sign(err, "mha_alibi_slopes", mha__need(err, "slopes", slopes));
    if (H <= 0)
        return mha__sign(err, "mha_alibi_slopes", mha__fail(err, MHA_ERR_INVALID_SIZE, "H", "is %d; expected >= 1", H));
    for (h = 0; h < H; ++h) slopes[h] = mha__alibi_slope(H, h);
    return MHA_OK;
}

/* ====================================================================== 3
   PLANS AND RUNS
   A plan fixes once what every run of it shares: the shapes (B and the
   largest Lq, Lk), the options, the thread count, what the runs may ask for
   (weights, a backward) and, for a module, its weights resolved and maybe
   packed.  Making it validates everything and computes the exact
   workspace; a run then only checks its lengths and its mha_run against the
   plan and reads the plan, so one plan may run from many threads at once.
   The one-shot calls make the plan of their arguments on the stack and run
   it once (mha__oneshot, below).
   ====================================================================== */

/* ----------------------------------------------- what a plan holds */

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
    int wdt;                            /* 16-bit weights (mha_dtype): wq.. are NULL, the */
    const uint16_t *hq, *hk, *hv, *ho;  /*   matrices are here, read only by the packing */
} mha__mod;

#define MHA__PLAN_MAGIC 0x4e4c504du   /* "MPLN" */
/* A planner's flags bit that says "a one-shot call set these flags from its
   mha_run", so a refusal names the run's field rather than "flags". */
#define MHA__FLAG_SHOT 0x80000000u

enum { MHA__PLAN_GEMM = 1, MHA__PLAN_SDPA, MHA__PLAN_MODULE, MHA__PLAN_ENCODER };

static const char *mha__dtype_name(mha_dtype t)
{
    return t == MHA_F32 ? "MHA_F32" : t == MHA_F16 ? "MHA_F16" : t == MHA_BF16 ? "MHA_BF16" : "outside mha_dtype";
}

static const char *mha__kind_name(uint32_t kind)
{
    switch (kind) {
    case MHA__PLAN_GEMM: return "a GEMM";
    case MHA__PLAN_SDPA: return "an SDPA";
    case MHA__PLAN_MODULE: return "a module";
    case MHA__PLAN_ENCODER: return "an encoder";
    default: return "an unknown";
    }
}

struct mha_plan {
    uint32_t magic;
    int kind;
    unsigned flags;             /* MHA_PLAN_* */
    int nthreads;               /* every run uses exactly this many */
    int owned;                  /* made by MHA_MALLOC: mha_plan_destroy frees it */
    size_t ws_bytes;            /* the workspace every run needs */
    size_t saved_bytes;         /* a saved forward (MHA_PLAN_TRAINING) */
    size_t plan_bytes;          /* the struct and the packed panels */
    int B, H, Lq, Lk, D, Dv;    /* the planned maxima; module: H, D of the module */
    int by_head;                /* module: long sequences go one head at a time (never training) */
    int cache_ok;               /* module: the cache path fits it (self-attention, no appended keys) */
    int oneshot;                /* made on the stack by a one-shot call (refusals name its fields) */
    mha_trans ta, tb;           /* GEMM: op(A) M x K, op(B) K x N */
    int M, N, K;
    mha_options opt;            /* the caller's, num_threads resolved */
    mha__mod mod;               /* module and encoder */
    mha_encoder_layer enc;      /* encoder (pointers borrowed) */
    size_t mod_floats;          /* encoder: the self-attention's part of the workspace */
};

static size_t mha__plan_struct_bytes(void)
{
    return (sizeof(struct mha_plan) + 63) / 64 * 64;
}

/* Copy and check the options; resolve the thread count. */
static mha_status mha__plan_begin(mha_plan *p, int kind, const mha_options *opt, unsigned flags,
                                  unsigned allowed, int B, int H, int Lq, int Lk, mha_error *e)
{
    mha_status st;
    memset(p, 0, sizeof *p);
    p->magic = MHA__PLAN_MAGIC;
    p->kind = kind;
    p->flags = flags;
    if (opt) p->opt = *opt;
    if (flags & ~allowed)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "flags", "is 0x%x; %s plan takes only 0x%x (MHA_PLAN_*)",
                         flags, mha__kind_name((uint32_t)kind), allowed);
    if ((st = mha__check_masks(&p->opt, B, H, Lq, Lk, e)) != MHA_OK) return st;
    /* 16-bit keys and values: SDPA's, or a module's KV cache; forward only */
    if ((int)p->opt.kv_dtype < MHA_F32 || (int)p->opt.kv_dtype > MHA_BF16)
        return mha__fail(e, MHA_ERR_BAD_ENUM, "opt->kv_dtype", "is %d; expected MHA_F32 (0), MHA_F16 (1) or "
                         "MHA_BF16 (2)", (int)p->opt.kv_dtype);
    if (p->opt.kv_dtype != MHA_F32) {
        if (flags & MHA_PLAN_TRAINING)
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->kv_dtype", "is %s with MHA_PLAN_TRAINING; 16-bit "
                             "keys and values are forward only (a backward takes float32 k and v)",
                             mha__dtype_name(p->opt.kv_dtype));
        if (kind == MHA__PLAN_ENCODER || (kind == MHA__PLAN_MODULE && !(flags & MHA_PLAN_CACHE)))
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->kv_dtype", "is %s; %s plan's keys and values are "
                             "its own float32 projections (a module's kv_dtype is its KV cache's, with "
                             "MHA_PLAN_CACHE)", mha__dtype_name(p->opt.kv_dtype), mha__kind_name((uint32_t)kind));
    }
    p->nthreads = mha__max_threads(&p->opt);
    p->opt.num_threads = p->nthreads;
    p->B = B; p->H = H; p->Lq = Lq; p->Lk = Lk;
    return MHA_OK;
}

/* The plan's workspace in bytes from its floats (which include the slack
   to align the start). */
static mha_status mha__plan_ws(mha_plan *p, size_t floats, size_t saved_floats, mha_error *e)
{
    if (!mha__mul(floats, sizeof(float), &p->ws_bytes) || !mha__mul(saved_floats, sizeof(float), &p->saved_bytes))
        return mha__fail(e, MHA_ERR_OVERFLOW, "Lq", "the workspace's bytes do not fit in size_t");
    return MHA_OK;
}

/* Plan memory: the caller's mem (aligned for the struct, at least need bytes),
   or MHA_MALLOC's.  The plan made on the stack is copied in; with PACK the
   panels are written after it.  */
#define MHA__PLAN_ALIGN 8

/* (defined further on, where its section is) */
static void mha__pack_write(mha__mod *r, void *buf);

static mha_status mha__plan_place(mha_plan *tmp, size_t extra, void *mem, size_t mem_bytes,
                                  mha_plan **plan, mha_error *e)
{
    size_t need;
    mha_plan *p;
    if (!mha__add(mha__plan_struct_bytes(), extra, &need))
        return mha__fail(e, MHA_ERR_OVERFLOW, "flags", "the plan's bytes do not fit in size_t");
    if (mem) {
        if (mem_bytes < need)
            return mha__fail(e, MHA_ERR_WORKSPACE_TOO_SMALL, "mem_bytes", "is %lu; the plan needs %lu "
                             "(mha_sizes.plan)", (unsigned long)mem_bytes, (unsigned long)need);
        if ((uintptr_t)mem % MHA__PLAN_ALIGN != 0)
            return mha__fail(e, MHA_ERR_MISALIGNED, "mem", "is not %d-byte aligned", MHA__PLAN_ALIGN);
        tmp->owned = 0;
    } else {
        mem = MHA_MALLOC(need);
        if (!mem) return mha__fail(e, MHA_ERR_OUT_OF_MEMORY, "mem", "MHA_MALLOC(%lu) returned NULL",
                                   (unsigned long)need);
        tmp->owned = 1;
    }
    p = MHA__CAST(mha_plan *, mem);
    tmp->plan_bytes = need;
    *p = *tmp;
    if (extra) mha__pack_write(&p->mod, MHA__CAST(char *, mem) + mha__plan_struct_bytes());
    *plan = p;
    return MHA_OK;
}

/* The end of every planner: the status of its make, then the sizes of the
   plan (the *_plan_size calls) or the plan placed in memory. */
static mha_status mha__plan_out(mha_status st, mha_plan *tmp, size_t extra, void *mem,
                                size_t mem_bytes, mha_plan **plan, mha_sizes *sizes, mha_error *e)
{
    if (st != MHA_OK) return st;
    if (sizes) {
        if (!mha__add(mha__plan_struct_bytes(), extra, &sizes->plan))
            return mha__fail(e, MHA_ERR_OVERFLOW, "flags", "the plan's bytes do not fit in size_t");
        sizes->workspace = tmp->ws_bytes;
        sizes->saved = tmp->saved_bytes;
        return MHA_OK;
    }
    return mha__plan_place(tmp, extra, mem, mem_bytes, plan, e);
}

/* Is this a plan (and, kind > 0, of that kind)? */
static mha_status mha__plan_ok(const mha_plan *p, int kind, mha_error *e)
{
    if (!p) return mha__fail(e, MHA_ERR_NULL_POINTER, "plan", "is NULL");
    if (p->magic != MHA__PLAN_MAGIC)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "plan", "is not a plan (destroyed, or never made)");
    if (kind && p->kind != kind)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "plan", "is %s plan; this call runs %s plan",
                         mha__kind_name((uint32_t)p->kind), mha__kind_name((uint32_t)kind));
    return MHA_OK;
}

/* ----------------------------------------------- the saved forward */

/* Each run lays its workspace out for its own lengths with the layout
   functions below, and its plan took the same functions at the planned
   maxima: every region grows with Lq and Lk, so a run never needs more than
   its plan said.  Offsets are in floats from the aligned start. */

/* The saved forward (section 3): the caller's region, aligned inside like a
   workspace, starts with a header of MHA__SAVED_HDR floats that records
   who wrote it (the magic, the plan's kind) and the shape of what follows
   (B, the lengths and the widths), so a backward reads only a region laid
   out as it expects.  The layouts of what follows are below (SDPA, module,
   encoder); a backward without a saved forward recomputes into the same
   layout inside its workspace.  */
#define MHA__SAVED_MAGIC 0x53415645u   /* "EVAS" in a little-endian dump: "SAVE" */

#define MHA__SAVED_HDR 16

#define MHA__SAVED_WORDS 12

static void mha__saved_header(const int *shape, uint32_t *w)
{
    int i;
    w[0] = MHA__SAVED_MAGIC;
    for (i = 1; i < MHA__SAVED_WORDS; ++i) w[i] = (uint32_t)shape[i - 1];
}

static void mha__saved_stamp(float *sv, const int *shape)
{
    uint32_t w[MHA__SAVED_WORDS];
    mha__saved_header(shape, w);
    memcpy(sv, w, sizeof w);
}

static mha_status mha__saved_check(const float *sv, const int *shape, mha_error *e)
{
    uint32_t want[MHA__SAVED_WORDS], got[MHA__SAVED_WORDS];
    static const char *const mod_words[MHA__SAVED_WORDS] = {
        "magic", "kind", "B", "H", "Lq", "Lk", "embed_dim", "KV width", "appended keys", "F",
        "norm_first + 2 activation", "layer_norm_eps (bits)"};
    static const char *const sdpa_words[MHA__SAVED_WORDS] = {
        "magic", "kind", "B", "H", "Lq", "Lk", "D", "Dv", "KV heads", "(unused)", "(unused)", "(unused)"};
    const char *const *what = shape[0] == MHA__PLAN_SDPA ? sdpa_words : mod_words;
    int i;
    mha__saved_header(shape, want);
    memcpy(got, sv, sizeof got);
    if (got[0] != want[0])
        return mha__fail(e, MHA_ERR_SAVED, "run->saved", "no forward wrote it (its header has no saved-forward "
                         "magic)");
    if (got[1] != want[1])
        return mha__fail(e, MHA_ERR_SAVED, "run->saved", "was written by the forward of %s plan; this is %s "
                         "plan's backward", mha__kind_name(got[1]), mha__kind_name(want[1]));
    for (i = 2; i < MHA__SAVED_WORDS; ++i)
        if (got[i] != want[i])
            return mha__fail(e, MHA_ERR_SAVED, "run->saved", "was written by a forward with %s %u; this "
                             "backward has %u", what[i], (unsigned)got[i], (unsigned)want[i]);
    return MHA_OK;
}

/* -------------------------------------- what a run brings: mha_run */

/* The fields of an mha_run a call may use; any other field that is set is
   refused by name (a request the call cannot honour is never dropped). */
#define MHA__RF_SAVED   1u

#define MHA__RF_MASKS   2u

#define MHA__RF_CACHE   4u

#define MHA__RF_WEIGHTS 8u    /* weights, rows, n_rows */

#define MHA__RF_STATS   16u   /* lse, entropy, max_weight, first_weight */

#define MHA__RF_SINKS   32u   /* sinks_grad */

static mha_status mha__run_fields(const mha_run *run, unsigned allowed, mha_error *e)
{
    const char *bad = NULL;
    if (!run) return MHA_OK;
    if (!(allowed & MHA__RF_SAVED) && run->saved) bad = "run->saved";
    else if (!(allowed & MHA__RF_MASKS) && run->attn_mask) bad = "run->attn_mask";
    else if (!(allowed & MHA__RF_MASKS) && run->key_padding_mask) bad = "run->key_padding_mask";
    else if (!(allowed & MHA__RF_CACHE) && run->cache) bad = "run->cache";
    else if (!(allowed & MHA__RF_WEIGHTS) && run->weights) bad = "run->weights";
    else if (!(allowed & MHA__RF_WEIGHTS) && (run->rows || run->n_rows)) bad = run->rows ? "run->rows" : "run->n_rows";
    else if (!(allowed & MHA__RF_STATS) && run->lse) bad = "run->lse";
    else if (!(allowed & MHA__RF_STATS) && run->entropy) bad = "run->entropy";
    else if (!(allowed & MHA__RF_STATS) && run->max_weight) bad = "run->max_weight";
    else if (!(allowed & MHA__RF_STATS) && run->first_weight) bad = "run->first_weight";
    else if (!(allowed & MHA__RF_SINKS) && run->sinks_grad) bad = "run->sinks_grad";
    if (bad) return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, bad, "is set, but this call does not read or write it");
    if (run->n_rows < 0 || (run->rows && run->n_rows == 0))
        return mha__fail(e, MHA_ERR_INVALID_SIZE, "run->n_rows", "is %d; expected >= 1 with run->rows", run->n_rows);
    if (run->n_rows > 0 && !run->rows) return mha__fail(e, MHA_ERR_NULL_POINTER, "run->rows", "is NULL with n_rows %d",
                                                        run->n_rows);
    if (run->n_rows > 0 && !run->weights)
        return mha__fail(e, MHA_ERR_NULL_POINTER, "run->weights", "is NULL: rows choose which weights to write");
    if (run->saved_bytes && !run->saved)
        return mha__fail(e, MHA_ERR_NULL_POINTER, "run->saved", "is NULL with saved_bytes %lu",
                         (unsigned long)run->saved_bytes);
    return MHA_OK;
}

/* The caller's workspace (at least need bytes), or an allocated one. */
static mha_status mha__get_ws(const mha_run *run, size_t need, void **owned, float **ws, mha_error *e)
{
    void *w = run ? run->workspace : NULL;
    *owned = NULL;
    if (w) {
        if (run->workspace_bytes < need)
            return mha__fail(e, MHA_ERR_WORKSPACE_TOO_SMALL, "run->workspace_bytes", "is %lu; this run needs %lu",
                             (unsigned long)run->workspace_bytes, (unsigned long)need);
    } else {
        w = *owned = MHA_MALLOC(need);
        if (!w) return mha__fail(e, MHA_ERR_OUT_OF_MEMORY, "run->workspace", "is NULL and MHA_MALLOC(%lu) "
                                 "returned NULL", (unsigned long)need);
    }
    *ws = mha__align_ws(w);
    return MHA_OK;
}

/* A run's workspace: the caller's holds the plan's bytes (what the size
   query said, whatever this run's lengths: a buffer that passes a short
   run must not fail a longer one later); one the run allocates holds what
   this run needs (need_floats at its lengths, at most the plan's). */
static mha_status mha__run_ws(const mha_plan *p, const mha_run *run, size_t need_floats, void **owned,
                              float **ws, mha_error *e)
{
    MHA_ASSERT(need_floats <= p->ws_bytes / sizeof(float));
    if (run && run->workspace && run->workspace_bytes < p->ws_bytes)
        return mha__fail(e, MHA_ERR_WORKSPACE_TOO_SMALL, "run->workspace_bytes", "is %lu; the plan's runs need "
                         "%lu (mha_sizes.workspace)", (unsigned long)run->workspace_bytes,
                         (unsigned long)p->ws_bytes);
    return mha__get_ws(run, need_floats * sizeof(float), owned, ws, e);
}

/* The caller's saved region for need_floats at these lengths (aligned inside). */
static mha_status mha__run_saved(const mha_plan *p, const mha_run *run, size_t need_floats, float **sv,
                                 mha_error *e)
{
    *sv = NULL;
    if (!run || !run->saved) return MHA_OK;
    if (!(p->flags & MHA_PLAN_TRAINING))
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "run->saved", "is set, but the plan was made without "
                         "MHA_PLAN_TRAINING");
    if (run->saved_bytes < need_floats * sizeof(float))
        return mha__fail(e, MHA_ERR_WORKSPACE_TOO_SMALL, "run->saved_bytes", "is %lu; this run saves %lu",
                         (unsigned long)run->saved_bytes, (unsigned long)(need_floats * sizeof(float)));
    *sv = mha__align_ws(run->saved);
    return MHA_OK;
}

/* The start of every run: the plan is one of this kind; the lengths fit
   (with a cache, Lk is 0: the cache says how many keys); the options are
   the plan's with this run's mask data (NULL: the plan's) and mask shapes
   for its lengths; the run's fields are ones this call can honour. */
static mha_status mha__run_begin(const mha_plan *p, int kind, int Lq, int Lk, const mha_run *run,
                                 unsigned allowed, mha_options *o, mha_error *e)
{
    mha_mask *am = &o->attn_mask, *kp = &o->key_padding_mask;
    const char *lq = kind == MHA__PLAN_ENCODER ? "L" : "Lq", *lk = kind == MHA__PLAN_ENCODER ? "L" : "Lk";
    mha_status st;
    if ((st = mha__plan_ok(p, kind, e)) != MHA_OK) return st;
    *o = p->opt;
    if ((st = mha__run_fields(run, allowed, e)) != MHA_OK) return st;
    if ((st = mha__pos(e, lq, Lq)) != MHA_OK) return st;
    if (Lq > p->Lq) return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, lq, "is %d; the plan's longest is %d", Lq, p->Lq);
    if (run && run->cache) {
        if (Lk != 0) return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "Lk", "is %d; with run->cache pass 0 (the "
                                      "cache's len says how many keys)", Lk);
    } else {
        if ((st = mha__pos(e, lk, Lk)) != MHA_OK) return st;
        if (Lk > p->Lk) return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, lk, "is %d; the plan's longest is %d", Lk, p->Lk);
    }
    if (run && run->attn_mask && am->kind == MHA_MASK_NONE)
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "run->attn_mask", "is set, but the plan's options have no "
                         "attn_mask (plan one with its kind and shape)");
    if (run && run->key_padding_mask && kp->kind == MHA_MASK_NONE)
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "run->key_padding_mask", "is set, but the plan's options have "
                         "no key_padding_mask (plan one with its kind and shape)");
    /* the plan's own mask data is dense for its maxima: a shorter run brings its own
       (a run over a KV cache refuses masks altogether, below) */
    if (am->kind != MHA_MASK_NONE && !(run && (run->attn_mask || run->cache)) &&
        (am->shape[am->ndim - 2] != Lq || am->shape[am->ndim - 1] != Lk))
        return mha__fail(e, MHA_ERR_MASK_SHAPE, "run->attn_mask", "is NULL, and the plan's opt->attn_mask.data "
                         "is for Lq %d, Lk %d: a run of Lq %d, Lk %d brings its own mask data",
                         am->shape[am->ndim - 2], am->shape[am->ndim - 1], Lq, Lk);
    if (kp->kind != MHA_MASK_NONE && !(run && (run->key_padding_mask || run->cache)) && kp->shape[1] != Lk)
        return mha__fail(e, MHA_ERR_MASK_SHAPE, "run->key_padding_mask", "is NULL, and the plan's "
                         "opt->key_padding_mask.data is for Lk %d: a run of Lk %d brings its own", kp->shape[1], Lk);
    if (run && run->attn_mask) am->data = run->attn_mask;
    if (run && run->key_padding_mask) kp->data = run->key_padding_mask;
    if (am->kind != MHA_MASK_NONE && !am->data)
        return p->oneshot ? mha__fail(e, MHA_ERR_NULL_POINTER, "opt->attn_mask.data", "is NULL with a mask kind set")
                          : mha__fail(e, MHA_ERR_NULL_POINTER, "run->attn_mask", "is NULL, and so is the plan's "
                                      "opt->attn_mask.data");
    if (kp->kind != MHA_MASK_NONE && !kp->data)
        return p->oneshot ? mha__fail(e, MHA_ERR_NULL_POINTER, "opt->key_padding_mask.data", "is NULL with a mask "
                                      "kind set")
                          : mha__fail(e, MHA_ERR_NULL_POINTER, "run->key_padding_mask", "is NULL, and so is the "
                                      "plan's opt->key_padding_mask.data");
    if (run && run->sinks_grad && !o->sinks)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "run->sinks_grad", "is set, but opt->sinks is NULL: there is "
                         "no sink to differentiate");
    /* attn_mask ends in [Lq, Lk], key_padding_mask is [B, Lk] */
    if (am->kind != MHA_MASK_NONE) { am->shape[am->ndim - 2] = Lq; am->shape[am->ndim - 1] = Lk; }
    if (kp->kind != MHA_MASK_NONE) kp->shape[1] = Lk;
    return MHA_OK;
}

/* The row outputs of a run (mha_run's lse and statistics), as views. */
typedef struct mha__rowout { float *lse, *entropy, *max_weight, *first_weight; } mha__rowout;

/* Weights a run asks for need the plan's flag: whole matrices
   MHA_PLAN_WEIGHTS, chosen rows MHA_PLAN_ROWS (or MHA_PLAN_WEIGHTS). */
static mha_status mha__run_weights_ok(const mha_plan *p, const mha_run *run, mha_error *e)
{
    if (!run || !run->weights) return MHA_OK;
    if (run->n_rows > 0 && !(p->flags & (MHA_PLAN_WEIGHTS | MHA_PLAN_ROWS)))
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "run->rows", "are set, but the plan was made without "
                         "MHA_PLAN_ROWS or MHA_PLAN_WEIGHTS");
    if (run->n_rows == 0 && !(p->flags & MHA_PLAN_WEIGHTS))
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "run->weights", "is set, but the plan was made without "
                         "MHA_PLAN_WEIGHTS%s", p->flags & MHA_PLAN_ROWS ? " (MHA_PLAN_ROWS allows chosen rows "
                         "only)" : "");
    return MHA_OK;
}

/* The row outputs a run asked for, as a view (NULL when none). */
static const mha__rowout *mha__run_rowout(const mha_run *run, mha__rowout *ro)
{
    if (!run || !(run->lse || run->entropy || run->max_weight || run->first_weight)) return NULL;
    ro->lse = run->lse; ro->entropy = run->entropy; ro->max_weight = run->max_weight;
    ro->first_weight = run->first_weight;
    return ro;
}

/* -------------- one-shot calls: the plan of one call, on the stack */

/* Each one-shot call is the plan of its arguments, made on the caller's
   stack (no MHA_PLAN_PACK, so the plan needs no memory beyond its struct),
   and one run of it: the two can never disagree.  The flags are what the
   call asks for: MHA_PLAN_WEIGHTS when run->weights is set (MHA_PLAN_ROWS
   when only chosen rows are),
   MHA_PLAN_TRAINING for a backward or a forward that saves. */
typedef struct mha__shot {
    int kind;
    unsigned flags;
    mha_trans ta, tb;
    int M, N, K;
    int B, H, Lq, Lk, D, Dv;
    const mha_module *m;
    const mha_encoder_layer *ly;
} mha__shot;

/* (defined further on, where its section is) */
static mha_status mha__gemm_plan_make(mha_trans ta, mha_trans tb, int M, int N, int K,
                                      int num_threads, mha_plan *p, mha_error *e);
static mha_status mha__sdpa_plan_make(int B, int H, int Lq, int Lk, int D, int Dv,
                                      const mha_options *opt, unsigned flags, mha_plan *p, mha_error *e);
static mha_status mha__module_plan_make(const mha_module *m, int B, int Lq, int Lk,
                                        const mha_options *opt, unsigned flags, int kind,
                                        mha_plan *p, size_t *extra_bytes, mha_error *e);
static mha_status mha__encoder_plan_make(const mha_encoder_layer *ly, int B, int L,
                                         const mha_options *opt, unsigned flags, mha_plan *p,
                                         size_t *extra_bytes, mha_error *e);

static mha_status mha__shot_make(const mha__shot *s, const mha_options *opt, mha_plan *p, mha_error *e)
{
    size_t extra;
    switch (s->kind) {
    case MHA__PLAN_GEMM:
        return mha__gemm_plan_make(s->ta, s->tb, s->M, s->N, s->K, opt ? opt->num_threads : 0, p, e);
    case MHA__PLAN_SDPA:
        return mha__sdpa_plan_make(s->B, s->H, s->Lq, s->Lk, s->D, s->Dv, opt, s->flags | MHA__FLAG_SHOT, p, e);
    case MHA__PLAN_MODULE:
        return mha__module_plan_make(s->m, s->B, s->Lq, s->Lk, opt, s->flags | MHA__FLAG_SHOT, MHA__PLAN_MODULE,
                                     p, &extra, e);
    default:
        return mha__encoder_plan_make(s->ly, s->B, s->Lq, opt, s->flags, p, &extra, e);
    }
}

/* One thing can differ between a size query and a later one-shot call:
   with num_threads 0 each takes OpenMP's thread count at its own time, and
   that count may have grown in between.  Rather than fail, such a call
   runs on as many threads as the caller's workspace holds (the result does
   not depend on the count).  An explicit num_threads is kept as given, and
   a plan always runs on exactly its own count. */
static mha_status mha__oneshot(const mha__shot *s, const mha_options *opt, const mha_run *run, mha_plan *p,
                               mha_error *e)
{
    mha_options o;
    mha_status st = mha__shot_make(s, opt, p, e);
    if (st == MHA_OK && run && run->workspace && !(opt && opt->num_threads != 0)) {
        if (opt) o = *opt; else memset(&o, 0, sizeof o);
        while (st == MHA_OK && p->ws_bytes > run->workspace_bytes && p->nthreads > 1) {
            o.num_threads = p->nthreads - 1;
            st = mha__shot_make(s, &o, p, e);
        }
    }
    p->oneshot = 1;
    return st;
}

/* The flags of a one-shot forward, and the planned Lk: with a cache the
   run's Lk is 0 and the plan's the cache's capacity. */
static unsigned mha__shot_flags(const mha_run *run)
{
    unsigned w = !run || !run->weights ? 0u : run->n_rows > 0 ? MHA_PLAN_ROWS : MHA_PLAN_WEIGHTS;
    return w | (run && run->saved ? MHA_PLAN_TRAINING : 0u) |
           (run && run->cache ? MHA_PLAN_CACHE : 0u);
}

/* (defined further on, where its section is) */
static mha_status mha__check_cache(const mha_kv_cache *c, mha_error *e);

static mha_status mha__shot_lk(const mha_run *run, int Lk, int *plan_lk, mha_error *e)
{
    mha_status st;
    *plan_lk = Lk;
    if (!run || !run->cache) return MHA_OK;
    if (Lk != 0)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "Lk", "is %d; with run->cache pass 0 (the cache's len says "
                         "how many keys)", Lk);
    if ((st = mha__check_cache(run->cache, e)) != MHA_OK) return st;
    *plan_lk = run->cache->capacity;
    return MHA_OK;
}

/* ------------------------------------- public: plans of every kind */

MHADEF mha_status mha_plan_sizes(const mha_plan *plan, mha_sizes *sizes, mha_error *err)
{
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "sizes", sizes)) != MHA_OK || (st = mha__plan_ok(plan, 0, err)) != MHA_OK)
        return mha__sign(err, "mha_plan_sizes", st);
    sizes->plan = plan->plan_bytes;
    sizes->workspace = plan->ws_bytes;
    sizes->saved = plan->saved_bytes;
    return MHA_OK;
}

MHADEF mha_status mha_plan_repack(mha_plan *plan, mha_error *err)
{
    mha_status st;
    mha__begin(err);
    if ((st = mha__plan_ok(plan, 0, err)) != MHA_OK) return mha__sign(err, "mha_plan_repack", st);
    if (!(plan->flags & MHA_PLAN_PACK))
        return mha__sign(err, "mha_plan_repack", mha__fail(err, MHA_ERR_INVALID_ARGUMENT, "plan", "was made "
                         "without MHA_PLAN_PACK: it reads the weights at every run and has nothing to repack"));
    mha__pack_write(&plan->mod, MHA__CAST(char *, (void *)plan) + mha__plan_struct_bytes());
    return MHA_OK;
}

MHADEF void mha_plan_destroy(mha_plan *plan)
{
    if (plan && plan->magic == MHA__PLAN_MAGIC && plan->owned) {
        plan->magic = 0;
        MHA_FREE(plan);
    }
}

/* ====================================================================== 4
   MATRIX MULTIPLY
   The blocked GEMM underneath everything, its threaded form, the Linear
   layer on it (y = x W^T + b and its backward), and the GEMM's plan.
   ====================================================================== */

static size_t mha__round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

static int mha__imin(int a, int b) { return a < b ? a : b; }

#if defined(MHA__DISPATCH)
/* What the rest of the library calls of a tier's GEMM: one table per tier
   (MHA__TIER_TABLES), reached through these names. */
typedef struct mha__gtab {
    void (*gemm)(int ta, int tb, int M, int N, int K, float alpha, const float *A, size_t lda,
                 const float *B, size_t ldb, float beta, float *C, size_t ldc, float *ws);
    void (*gemm_pp)(int ta, int tb, int M, int N, int K, float alpha, const float *A, size_t lda,
                    const float *B, size_t ldb, float beta, float *C, size_t ldc, float *ws,
                    const float *pp, int col0, int Ntot, int rows_a);
    void (*gemm_mt)(int ta, int tb, int M, int N, int K, float alpha, const float *A, size_t lda,
                    const float *B, size_t ldb, float beta, float *C, size_t ldc, float *ws,
                    int nthreads);
    void (*gemm_mt_pp)(int ta, int tb, int M, int N, int K, float alpha, const float *A, size_t lda,
                       const float *B, size_t ldb, float beta, float *C, size_t ldc, float *ws,
                       int nthreads, const float *pp, int rows_a);
    size_t (*gemm_ws_floats)(int M, int N, int K);
    size_t (*gemm_ws_floats_mt)(int M, int N, int K, int nthreads);
    void (*prepack_b)(const float *W, int Ntot, int K, float *dst);
    size_t (*prepacked_floats)(int Ntot, int K);
    void (*prepack_b16)(const uint16_t *W, int dt, int Ntot, int K, float *dst);
} mha__gtab;
static const mha__gtab *mha__gk(void);
#define mha__gemm (mha__gk()->gemm)
#define mha__gemm_pp (mha__gk()->gemm_pp)
#define mha__gemm_mt (mha__gk()->gemm_mt)
#define mha__gemm_mt_pp (mha__gk()->gemm_mt_pp)
#define mha__gemm_ws_floats (mha__gk()->gemm_ws_floats)
#define mha__gemm_ws_floats_mt (mha__gk()->gemm_ws_floats_mt)
#define mha__prepack_b (mha__gk()->prepack_b)
#define mha__prepack_b16 (mha__gk()->prepack_b16)
#define mha__prepacked_floats (mha__gk()->prepacked_floats)
#endif
#endif /* main pass */

#if defined(MHA__TIER_PASS) || !defined(MHA__DISPATCH)   /* kernels: one copy per tier */

/* ---- the blocked GEMM
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
   count, so the threaded GEMM gives bit-identical results. */
/* Register tile MR x NR (NR = NRV vectors) and cache blocking per ISA.
   MHA__FOR_I / MHA__FOR_J list the rows and vector columns of the tile so
   the micro-kernel below is spelled out in full, with its accumulators in
   named registers, at any optimisation level. */
#undef MHA__MR                /* a previous pass's tile and blocking */
#undef MHA__NRV
#undef MHA__FOR_I
#undef MHA__FOR_J
#undef MHA__KC
#undef MHA__MC
#undef MHA__NC
#undef MHA__NC2
#undef MHA__KU
#undef MHA__K_UNROLL
#undef MHA__NACC
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
#define MHA__NC2 256   /* KC x NC2 chunk of the panel: 512 KiB, stays in L2 */
#define MHA__NACC 16     /* narrow path: O accumulators of 32 zmm registers */
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
#define MHA__NACC 8     /* narrow path: O accumulators of 16 ymm registers */
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
#define MHA__NACC 16     /* narrow path: O accumulators of 32 q registers */
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
#define MHA__NACC 8
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

/* A prepacked B (MHA_PLAN_PACK): op(B) = W^T for a row-major W [Ntot, K],
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

/* The panels of a W of float32 (dt 0) or of 16-bit elements (mha_dtype
   dt: each widened exactly, so the panels hold the bits float32 W of the
   widened values gives; a plain loop, as weights are packed once).  */
static void mha__prepack_b_any(const void *W, int dt, int Ntot, int K, float *dst)
{
    int kcb = mha__gemm_kc(K), jc, pc, jr, j, p;
    for (jc = 0; jc < Ntot; jc += MHA__NC) {
        int nc = mha__imin(MHA__NC, Ntot - jc);
        size_t ncr = mha__round_up((size_t)nc, MHA__NR);
        for (pc = 0; pc < K; pc += kcb) {
            int kc = mha__imin(kcb, K - pc);
            for (jr = 0; jr < nc; jr += MHA__NR) {
                int nr = mha__imin(MHA__NR, nc - jr);
                float *d = dst + (size_t)jc * K + ncr * pc + (size_t)jr * kc;
                const uint16_t *h = MHA__CAST(const uint16_t *, W);
                if (!dt) {
                    mha__pack_b(1, MHA__CAST(const float *, W), (size_t)K, pc, kc, jc + jr, nr, d);
                    continue;
                }
                for (p = 0; p < kc; ++p)   /* sliver: d[p NR + j] = W[jc + jr + j, pc + p], zero past nr */
                    for (j = 0; j < MHA__NR; ++j)
                        d[(size_t)p * MHA__NR + j] =
                            j < nr ? mha__h2f(h[(size_t)(jc + jr + j) * K + pc + p], dt) : 0.0f;
            }
        }
    }
}

static void mha__prepack_b(const float *W, int Ntot, int K, float *dst)
{
    mha__prepack_b_any(W, 0, Ntot, K, dst);
}

static void mha__prepack_b16(const uint16_t *W, int dt, int Ntot, int K, float *dst)
{
    mha__prepack_b_any(W, dt, Ntot, K, dst);
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

#endif /* kernels */
#ifndef MHA__TIER_PASS   /* main pass */

/* ------------------------------------------------ the Linear layer */

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

/* ---------------------------------------------------- public: GEMM */

static mha_status mha__gemm_plan_make(mha_trans ta, mha_trans tb, int M, int N, int K,
                                      int num_threads, mha_plan *p, mha_error *e)
{
    mha_options o;
    size_t t;
    mha_status st;
    memset(&o, 0, sizeof o);
    o.num_threads = num_threads;
    memset(p, 0, sizeof *p);
    if ((st = mha__pos(e, "M", M)) != MHA_OK || (st = mha__pos(e, "N", N)) != MHA_OK ||
        (st = mha__pos(e, "K", K)) != MHA_OK)
        return st;
    if (num_threads < 0)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "num_threads", "is %d; expected >= 0", num_threads);
    if (ta != MHA_NO_TRANS && ta != MHA_TRANS)
        return mha__fail(e, MHA_ERR_BAD_ENUM, "ta", "is %d; expected MHA_NO_TRANS (0) or MHA_TRANS (1)", (int)ta);
    if (tb != MHA_NO_TRANS && tb != MHA_TRANS)
        return mha__fail(e, MHA_ERR_BAD_ENUM, "tb", "is %d; expected MHA_NO_TRANS (0) or MHA_TRANS (1)", (int)tb);
    if (!mha__dim_ok(M) || !mha__dim_ok(N) || !mha__dim_ok(K) ||
        !mha__mul3((size_t)M, (size_t)K, sizeof(float), &t) ||
        !mha__mul3((size_t)K, (size_t)N, sizeof(float), &t) ||
        !mha__mul3((size_t)M, (size_t)N, sizeof(float), &t))
        return mha__fail(e, MHA_ERR_OVERFLOW, "M", "M %d, N %d, K %d: a matrix's bytes pass the limits", M, N, K);
    (void)mha__plan_begin(p, MHA__PLAN_GEMM, &o, 0, 0, 1, 1, 1, 1, NULL);   /* zero options: cannot fail */
    p->ta = ta; p->tb = tb; p->M = M; p->N = N; p->K = K;
    return mha__plan_ws(p, mha__gemm_ws_floats_mt(M, N, K, p->nthreads) + MHA__ALIGN_FLOATS, 0, e);
}

static mha_status mha__gemm_run(const mha_plan *p, float alpha, const float *A, int lda,
                                const float *B, int ldb, float beta, float *C, int ldc,
                                const mha_run *run, mha_error *err)
{
    size_t tmp;
    void *owned;
    float *ws = NULL;
    mha_status st;
    if ((st = mha__plan_ok(p, MHA__PLAN_GEMM, err)) != MHA_OK || (st = mha__need(err, "A", A)) != MHA_OK ||
        (st = mha__need(err, "B", B)) != MHA_OK || (st = mha__need(err, "C", C)) != MHA_OK ||
        (st = mha__run_fields(run, 0, err)) != MHA_OK)
        return st;
    if (lda < (p->ta ? p->M : p->K))
        return mha__fail(err, MHA_ERR_INVALID_SIZE, "lda", "is %d; expected >= %d", lda,
                                            p->ta ? p->M : p->K);
    if (ldb < (p->tb ? p->K : p->N))
        return mha__fail(err, MHA_ERR_INVALID_SIZE, "ldb", "is %d; expected >= %d", ldb,
                                            p->tb ? p->K : p->N);
    if (ldc < p->N)
        return mha__fail(err, MHA_ERR_INVALID_SIZE, "ldc", "is %d; expected >= %d", ldc, p->N);
    if (!mha__mul((size_t)(p->ta ? p->K : p->M), (size_t)lda, &tmp) || !mha__mul(tmp, sizeof(float), &tmp) ||
        !mha__mul((size_t)(p->tb ? p->N : p->K), (size_t)ldb, &tmp) || !mha__mul(tmp, sizeof(float), &tmp) ||
        !mha__mul((size_t)p->M, (size_t)ldc, &tmp) || !mha__mul(tmp, sizeof(float), &tmp))
        return mha__fail(err, MHA_ERR_OVERFLOW, "lda", "a matrix's bytes with its leading "
                                            "dimension do not fit in size_t");
    if ((st = mha__run_ws(p, run, p->ws_bytes / sizeof(float), &owned, &ws, err)) != MHA_OK)
        return st;
    mha__gemm_mt(p->ta, p->tb, p->M, p->N, p->K, alpha, A, (size_t)lda, B, (size_t)ldb, beta, C,
                 (size_t)ldc, ws, p->nthreads);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

MHADEF mha_status mha_gemm(mha_trans ta, mha_trans tb, int M, int N, int K, float alpha,
                           const float *A, int lda, const float *B, int ldb, float beta,
                           float *C, int ldc, const mha_run *run, mha_error *err)
{
    mha_plan p;
    mha__shot s;
    mha_status st;
    mha__begin(err);
    memset(&s, 0, sizeof s);
    s.kind = MHA__PLAN_GEMM; s.ta = ta; s.tb = tb; s.M = M; s.N = N; s.K = K;
    if ((st = mha__oneshot(&s, NULL, run, &p, err)) == MHA_OK)
        st = mha__gemm_run(&p, alpha, A, lda, B, ldb, beta, C, ldc, run, err);
    return mha__sign(err, "mha_gemm", st);
}

MHADEF mha_status mha_gemm_plan_size(mha_trans ta, mha_trans tb, int M, int N, int K,
                                     int num_threads, mha_sizes *sizes, mha_error *err)
{
    mha_plan p;
    mha__begin(err);
    if (!sizes) return mha__sign(err, "mha_gemm_plan_size", mha__need(err, "sizes", sizes));
    return mha__sign(err, "mha_gemm_plan_size",
                     mha__plan_out(mha__gemm_plan_make(ta, tb, M, N, K, num_threads, &p, err), &p, 0, NULL, 0,
                                   NULL, sizes, err));
}

MHADEF mha_status mha_gemm_plan(mha_trans ta, mha_trans tb, int M, int N, int K, int num_threads,
                                void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err)
{
    mha_plan p;
    mha__begin(err);
    if (!plan) return mha__sign(err, "mha_gemm_plan", mha__need(err, "plan", plan));
    return mha__sign(err, "mha_gemm_plan",
                     mha__plan_out(mha__gemm_plan_make(ta, tb, M, N, K, num_threads, &p, err), &p, 0, mem,
                                   mem_bytes, plan, NULL, err));
}

MHADEF mha_status mha_gemm_run(const mha_plan *p, float alpha, const float *A, int lda,
                               const float *B, int ldb, float beta, float *C, int ldc,
                               const mha_run *run, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_gemm_run", mha__gemm_run(p, alpha, A, lda, B, ldb, beta, C, ldc, run, err));
}

/* ====================================================================== 5
   SCALED DOT-PRODUCT ATTENTION
   The attention core every path shares: views of q, k, v and o, masks and
   decoder options applied to tiles of scores, the unfused path (weights
   kept) and the fused one (online softmax over key tiles), then the fused
   backward (FlashAttention-2), then the SDPA plan and runs.
   ====================================================================== */

/* ---------------------------------------------- the attention core */

/* A strided view of [B, H, L, D] activations: element (b,h,i,d) lives at
   p[b*bs + h*hs + i*rs + d].  SDPA inputs are dense [B,H,L,D]; the module's
   projected activations are [B, L, H*D] with heads side by side.  */
typedef struct mha__view {
    const float *p;
    size_t bs, hs, rs;
    const uint16_t *h;   /* keys and values stored in 16 bits: the elements, p NULL */
    int dt;              /* their mha_dtype (0: float32 at p) */
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
    float *lse, *lse2;                 /* [B, H, Lq] outputs or NULL (an internal lse, run->lse) */
    float *ent, *maxw, *first;         /* the other row statistics, [B, H, Lq] or NULL */
    int stats;                         /* some of ent, maxw, first is wanted */
    float *sinks_grad;                 /* backward: [H] or NULL */
} mha__attn;

/* KV head (local to the views) of local query head h */
static int mha__kvh(const mha__attn *a, int h)
{
    return (a->h0 + h) / a->group - a->h0 / a->group;
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

static int mha__mask_bool_blocks(mha_mask_kind kind, unsigned char v)
{
    return kind == MHA_MASK_BOOL ? v != 0 : v == 0;
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

/* ---- row statistics (mha_run's lse, entropy, max_weight, first_weight) */

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
   l = 0 (nothing allowed, no sink): lse = -inf and zeros.  A NaN row (a
   NaN score: m or l NaN) gets NaN in every statistic, never the zeros of
   a row with no key.  Rounding can leave H a hair below 0 for a one-hot
   row: clamped.  */
static void mha__put_row(const mha__attn *a, size_t idx, float m, float l, const mha__racc *r)
{
    double t = r->t, ld = r->ld;
    float km = r->km, s0 = r->s0;
    double lse_d, H;
    int nan = m != m || l != l;
    if (a->lse || a->lse2) {
        float lse = nan ? NAN : l != 0.0f ? m + logf(l) : -INFINITY;
        if (a->lse) a->lse[idx] = lse;
        if (a->lse2) a->lse2[idx] = lse;
    }
    if (!a->stats) return;
    lse_d = (double)m + log(ld);
    H = l != 0.0f ? log(ld) - t / ld : 0.0;
    if (a->ent) a->ent[idx] = nan ? NAN : H > 0.0 ? (float)H : 0.0f;
    if (a->maxw) a->maxw[idx] = nan ? NAN : l != 0.0f && km != -INFINITY ? (float)exp(km - lse_d) : 0.0f;
    if (a->first) a->first[idx] = nan ? NAN : l != 0.0f && s0 != -INFINITY ? (float)exp(s0 - lse_d) : 0.0f;
}

/* The same from a row of weights p[0..n) and its lse (the unfused path):
   the sink's share is p_s = exp(sink - lse), H = -sum p log p - p_s log p_s. */
static void mha__put_row_p(const mha__attn *a, size_t idx, const float *p, int n, float sink, float lse)
{
    double H = 0.0, ps = sink != -INFINITY && lse != -INFINITY ? exp((double)sink - lse) : 0.0;
    float mx = 0.0f;
    int j, nan = lse != lse;   /* a NaN row: NaN statistics, as its weights */
    if (!a->stats) return;
    for (j = 0; j < n; ++j) {
        if (p[j] != p[j]) nan = 1;
        if (p[j] > 0.0f) H -= (double)p[j] * log((double)p[j]);
        if (p[j] > mx) mx = p[j];
    }
    if (ps > 0.0) H -= ps * log(ps);
    if (a->ent) a->ent[idx] = nan ? NAN : H > 0.0 ? (float)H : 0.0f;
    if (a->maxw) a->maxw[idx] = nan ? NAN : mx;
    if (a->first) a->first[idx] = nan ? NAN : lse != -INFINITY ? p[0] : 0.0f;
}

#if defined(MHA__DISPATCH)
/* What the rest of the library calls of a tier's attention core. */
typedef struct mha__atab {
    void (*softcap)(float cap, float *s, size_t n);
    void (*attend_all)(const mha__attn *a, float *ws, size_t per_thread);
    void (*attend_backward_fused)(const mha__attn *a, const float *dout, const float *lse_saved,
                                  float *dq, float *dk, float *dv, float *ws);
    int (*attn_scratch_floats)(int Lq, int Lk, int Lk_eff, int D, int Dv, int nthreads,
                               int need_weights, int shared_pack, int kv16, size_t *per_thread,
                               size_t *total);
    size_t (*fbwd_floats)(int B, int H, int Hkv, int Lq, int Lk, int D, int Dv, int nthreads);
    void (*cvt_from16)(float *dst, const uint16_t *src, int dt, size_t n);
    void (*cvt_to16)(uint16_t *dst, const float *src, int dt, size_t n);
    int fbr;   /* MHA__FBR: query-tile columns of the fused forward */
} mha__atab;
static const mha__atab *mha__ak(void);
#define MHA__FBR_RUN (mha__ak()->fbr)
#define mha__softcap (mha__ak()->softcap)
#define mha__attend_all (mha__ak()->attend_all)
#define mha__attend_backward_fused (mha__ak()->attend_backward_fused)
#define mha__attn_scratch_floats (mha__ak()->attn_scratch_floats)
#define mha__fbwd_floats (mha__ak()->fbwd_floats)
#define mha__cvt_from16 (mha__ak()->cvt_from16)
#define mha__cvt_to16 (mha__ak()->cvt_to16)
#else
#define MHA__FBR_RUN MHA__FBR
#endif
#endif /* main pass */

#if defined(MHA__TIER_PASS) || !defined(MHA__DISPATCH)   /* kernels: one copy per tier */

/* ---- unfused path: the weights are wanted, so every score is kept */

/* Soft-capping of n scores: s = cap tanh(s / cap), before any mask (Gemma-2). */
static void mha__softcap(float cap, float *s, size_t n)
{
    const mha__vf vc = mha__vset1(cap), vi = mha__vset1(1.0f / cap);
    size_t j = 0;
    for (; j + MHA__VW <= n; j += MHA__VW)
        mha__vstore(s + j, mha__vmul(vc, mha__vtanh(mha__vmul(mha__vload(s + j), vi))));
    for (; j < n; ++j) s[j] = cap * tanhf(s[j] / cap);
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

/* Rows i0..i0+nr of batch b, every head in order h = 0..H-1:
   S = scale Q K^T; mask; softmax; O = P V; hand out the weights.
   s: nr*Lk_eff floats of scratch.  Summing the head average in this item,
   head by head, fixes its order whatever the thread count.  16-bit K and
   V (SDPA) are widened into kv (Lk (D + Dv) floats) per KV head.  */
static void mha__attend_rows(const mha__attn *a, int b, int i0, int nr, float *s, float *gws, float *kv)
{
    int Lk = a->Lk_eff, h, r, j, gb = a->b0 + b, gi = a->q0 + i0, kv_prev = -1;   /* global batch, row */
    size_t n = (size_t)nr * Lk, t;
    for (h = 0; h < a->H; ++h) {
        const float *q = a->q.p + (size_t)b * a->q.bs + (size_t)h * a->q.hs + (size_t)i0 * a->q.rs;
        int g = mha__kvh(a, h);
        size_t koff = (size_t)b * a->k.bs + (size_t)g * a->k.hs, voff = (size_t)b * a->v.bs + (size_t)g * a->v.hs;
        size_t ldk = a->k.dt ? (size_t)a->D : a->k.rs, ldv = a->v.dt ? (size_t)a->Dv : a->v.rs;
        const float *k = a->k.dt ? kv : a->k.p + koff;
        const float *v = a->v.dt ? kv + (size_t)Lk * a->D : a->v.p + voff;
        float *o = a->o + (size_t)b * a->o_bs + (size_t)h * a->o_hs + (size_t)i0 * a->o_rs;
        float sink = a->sinks ? a->sinks[h] : -INFINITY;
        if (a->k.dt && g != kv_prev) {   /* (SDPA: no appended keys, Lk_eff = Lk) */
            for (j = 0; j < Lk; ++j) {
                mha__cvt_from16(kv + (size_t)j * a->D, a->k.h + koff + (size_t)j * a->k.rs, a->k.dt, (size_t)a->D);
                mha__cvt_from16(kv + (size_t)Lk * a->D + (size_t)j * a->Dv, a->v.h + voff + (size_t)j * a->v.rs,
                                a->v.dt, (size_t)a->Dv);
            }
            kv_prev = g;
        }

        /* 1. scores S[i,j] = scale * q_i . k_j, soft-capped */
        mha__gemm(0, 1, nr, Lk, a->D, a->scale, q, a->q.rs, k, ldk, 0.0f, s, (size_t)Lk, gws);
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
        mha__pv(nr, Lk, a->Dv, s, (size_t)Lk, v, ldv, 0.0f, o, a->o_rs, gws);

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
/* Tiles with at most this many query columns (a decode step: Lq = 1 times
   the heads of a group) take the narrow path (mha__narrow_scores,
   mha__narrow_pv): vector code on K and V where they lie, so each key and
   value row is read once for all the group's heads and V is never packed;
   the GEMM micro-kernel would compute NR columns (16-48) for these few.  */
#define MHA__NARROW 8
/* the narrow path's rows of scores: a key tile in whole vectors */
#ifndef MHA__NSUB
#define MHA__NSUB 32
#endif
#define MHA__NLDS ((size_t)(MHA__FBC + MHA__VW - 1) / MHA__VW * MHA__VW)

#endif /* kernels */
#ifndef MHA__TIER_PASS   /* main pass: a type, defined once */
typedef struct mha__fused_dims {
    int ntiles;        /* key tiles: ceil(Lk / FBC) real ones, + 1 for appended keys */
    size_t dvp;        /* Dv rounded up to MR: rows of packed V^T */
    size_t v_tile;     /* floats of one packed V^T tile */
    size_t packed;     /* packed V^T of one (b, h), plus a finite flag per tile */
    size_t tiles;      /* Q^T slivers, S^T, O^T, m, l, the ragged K sliver, t, ld, km, s0,
                          and conv */
    size_t conv;       /* 16-bit K/V: a tile of keys or values widened to float32 (else 0) */
} mha__fused_dims;
#endif /* main pass */
#if defined(MHA__TIER_PASS) || !defined(MHA__DISPATCH)   /* kernels: one copy per tier */

static int mha__fused_sizes(int Lk, int Lk_eff, int D, int Dv, int kv16, mha__fused_dims *f)
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
               6 * mha__round_floats(MHA__FBR) +                    /* row statistics */
               mha__round_floats((size_t)MHA__NARROW * MHA__NLDS) + /* narrow: scores, */
               mha__round_floats((size_t)MHA__NARROW * MHA__VW * MHA__VW);   /* sums */
    f->conv = kv16 ? mha__round_floats((size_t)MHA__FBC * (size_t)(D > Dv ? D : Dv)) : 0;
    f->tiles += f->conv;
    return 1;
}

/* The conversion buffer of a thread's tile buffers sc: their last part. */
static float *mha__fused_conv(const mha__fused_dims *f, float *sc)
{
    return sc + f->tiles - f->conv;
}

/* Pack key tile t of (b, KV head kvh): V rows j0..j0+nc transposed as MR
   slivers of Dv (A of O^T), and whether every V value of the tile is
   finite.  Tile ntiles-1 holds the appended keys when there are any.
   16-bit V is widened first, into the conversion buffer of the thread's
   tile buffers sc.  */
static void mha__fused_pack(const mha__attn *a, const mha__fused_dims *f, int b, int kvh, int t,
                            float *shared, float *sc)
{
    size_t voff = (size_t)b * a->v.bs + (size_t)kvh * a->v.hs, ld = a->v.rs;
    const float *vt;   /* row 0 of the tile */
    float *pv = shared + (size_t)t * f->v_tile, *flag = shared + (size_t)f->ntiles * f->v_tile + t;
    int appended = a->Lk_eff > a->Lk && t == f->ntiles - 1;
    int j0 = appended ? a->Lk : t * MHA__FBC;
    int nc = appended ? a->Lk_eff - a->Lk : (a->Lk - j0 < MHA__FBC ? a->Lk - j0 : MHA__FBC), j;
    mha__vf acc = mha__vzero();
    MHA_PROFILE_MARK(MHA_PHASE_VPACK);
    if (a->v.dt) {   /* 16 bits: the tile's rows widened into conv, ld Dv */
        float *conv = mha__fused_conv(f, sc);
        for (j = 0; j < nc; ++j)
            mha__cvt_from16(conv + (size_t)j * a->Dv, a->v.h + voff + (size_t)(j0 + j) * a->v.rs, a->v.dt,
                            (size_t)a->Dv);
        vt = conv; ld = (size_t)a->Dv;
    } else {
        vt = a->v.p + voff + (size_t)j0 * ld;
    }
    mha__pack_a_block(1, vt, ld, 0, a->Dv, 0, nc, pv);
    /* x - x is 0 for finite x and NaN otherwise; one NaN makes the sum NaN */
    for (j = 0; j < nc; ++j) {
        const float *vr = vt + (size_t)j * ld;
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
#endif /* kernels */
#ifndef MHA__TIER_PASS   /* main pass: a type, defined once */
typedef struct mha__tileq {
    int gb, gh0, ng, gi, nr;
    int narrow;        /* at most MHA__NARROW columns: vector products, no packing (decoding) */
    int t_lo, t_hi;    /* the real key tiles of this item (split-K), t_hi = -1: all */
    float *partial;    /* split-K: NULL, or [ncol][MHA__PART_W(Dv)]: unnormalised O, m, l,
                          and the row statistics' mha__racc (6 floats' bytes) */
} mha__tileq;
#endif /* main pass */
#if defined(MHA__TIER_PASS) || !defined(MHA__DISPATCH)   /* kernels: one copy per tier */

#define MHA__PART_W(Dv) ((Dv) + 2 + sizeof(mha__racc) / sizeof(float))


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

/* ---- The narrow path: a decoding step against K and V where they lie.
   A decode step has at most MHA__NARROW query columns per KV head (Lq
   times the heads of a group), too few for the GEMM micro-kernel, so each
   key tile is met with vector code that reads every K and V row once for
   all the columns:
     scores   s_cp = scale q_c . K_p   each key row is loaded once and
              multiplied into every column's accumulator; the accumulators
              of MHA__VW keys are then summed lane-wise into one vector of
              VW scores per column (mha__vrowsums): no horizontal sum per key
     weights  the online softmax of mha__attend_fused, one column's row
              of scores at a time (VW keys per exponential)
     values   O_c += sum_p w_cp V_p  with a chunk of O's columns held in
              registers while the tile's V rows stream past, each row
              loaded once for every column
   16-bit K and V are widened as they are loaded.  The bodies are written
   for a constant column count NC and storage type DT (MHA__SPECIAL); the
   dispatchers fix both, so the accumulators are registers.  */

/* element i (and the MHA__VW from it) of a row of storage type dt, widened */
MHA__SPECIAL mha__vf mha__vload_dt(int dt, const void *base, size_t i)
{
    if (dt == MHA_F16) return mha__vload_f16(MHA__CAST(const uint16_t *, base) + i);
    if (dt == MHA_BF16) return mha__vload_bf16(MHA__CAST(const uint16_t *, base) + i);
    return mha__vload(MHA__CAST(const float *, base) + i);
}
MHA__SPECIAL float mha__load_dt(int dt, const void *base, size_t i)
{
    return dt ? mha__h2f(MHA__CAST(const uint16_t *, base)[i], dt) : MHA__CAST(const float *, base)[i];
}

/* s[c lds + p] = scale q_c . K_p for the nc keys K_p = k + p rs (type DT)
   and the NC query rows qrow[c]; s's rows hold whole vectors (lds and the
   row's end rounded up to MHA__VW), the lanes past nc get 0.  part:
   NC * VW * VW floats of scratch.  NC <= 4 (the dispatcher's groups).
   Each key row is loaded once; each column keeps two accumulators (even
   and odd vectors of D) for two FMA chains.  */
MHA__SPECIAL void mha__nscores_nc(const int NC, const int DT, int D, float scale, const void *k, size_t rs,
                                  int nc, const float *const *qrow, float *part, float *s, size_t lds)
{
    const int Dvec = D / MHA__VW * MHA__VW;
    int p0, u, c, d;
    for (p0 = 0; p0 < nc; p0 += MHA__VW) {
        const int nb = nc - p0 < MHA__VW ? nc - p0 : MHA__VW;
        float tail[4][MHA__VW];
        for (u = 0; u < MHA__VW; ++u) {
            mha__vf acc[4], acc2[4];
            MHA__UNROLL
            for (c = 0; c < NC; ++c) { acc[c] = mha__vzero(); acc2[c] = mha__vzero(); tail[c][u] = 0.0f; }
            if (u < nb) {
                const size_t row = (size_t)(p0 + u) * rs;
                for (d = 0; d + 2 * MHA__VW <= Dvec; d += 2 * MHA__VW) {
                    const mha__vf k0 = mha__vload_dt(DT, k, row + d), k1 = mha__vload_dt(DT, k, row + d + MHA__VW);
                    MHA__UNROLL
                    for (c = 0; c < NC; ++c) {
                        acc[c] = mha__vfma(acc[c], k0, mha__vload(qrow[c] + d));
                        acc2[c] = mha__vfma(acc2[c], k1, mha__vload(qrow[c] + d + MHA__VW));
                    }
                }
                for (; d < Dvec; d += MHA__VW) {
                    const mha__vf k0 = mha__vload_dt(DT, k, row + d);
                    MHA__UNROLL
                    for (c = 0; c < NC; ++c) acc[c] = mha__vfma(acc[c], k0, mha__vload(qrow[c] + d));
                }
                for (; d < D; ++d) {   /* D past the last whole vector */
                    const float kd = mha__load_dt(DT, k, row + d);
                    MHA__UNROLL
                    for (c = 0; c < NC; ++c) tail[c][u] += kd * qrow[c][d];
                }
            }
            MHA__UNROLL
            for (c = 0; c < NC; ++c)
                mha__vstore(part + ((size_t)c * MHA__VW + u) * MHA__VW, mha__vadd(acc[c], acc2[c]));
        }
        MHA__UNROLL
        for (c = 0; c < NC; ++c) {   /* lane u: key u's score */
            mha__vf r[MHA__VW], t;
            MHA__UNROLL
            for (u = 0; u < MHA__VW; ++u) r[u] = mha__vload(part + ((size_t)c * MHA__VW + u) * MHA__VW);
            t = mha__vrowsums(r);
            mha__vstore(s + (size_t)c * lds + p0, mha__vmul(mha__vset1(scale), mha__vadd(t, mha__vload(tail[c]))));
        }
    }
}

/* O_c[d0 .. d0 + CW VW) += sum_p w[c ldw + p] V_p, for the nc value rows
   V_p = v + p rs (type DT); O_c = o + c Dv.  A weight of 0 adds nothing
   (its value row may hold NaN or inf, as blocked keys' rows may).  */
MHA__SPECIAL void mha__npv_chunk(const int NC, const int DT, const int CW, int d0, int Dv, const void *v, size_t rs,
                                 int nc, const float *w, size_t ldw, float *o)
{
    mha__vf acc[4][8], x[8];
    int p, c, i;
    MHA__UNROLL
    for (c = 0; c < NC; ++c)
        MHA__UNROLL
        for (i = 0; i < CW; ++i) acc[c][i] = mha__vload(o + (size_t)c * Dv + d0 + i * MHA__VW);
    for (p = 0; p < nc; ++p) {
        const size_t row = (size_t)p * rs + (size_t)d0;
        int zero = 0;
        MHA__UNROLL
        for (c = 0; c < NC; ++c) zero |= w[(size_t)c * ldw + p] == 0.0f;
        MHA__UNROLL
        for (i = 0; i < CW; ++i) x[i] = mha__vload_dt(DT, v, row + (size_t)i * MHA__VW);
        if (!zero) {
            MHA__UNROLL
            for (c = 0; c < NC; ++c) {
                const mha__vf vw = mha__vset1(w[(size_t)c * ldw + p]);
                MHA__UNROLL
                for (i = 0; i < CW; ++i) acc[c][i] = mha__vfma(acc[c][i], vw, x[i]);
            }
        } else {
            MHA__UNROLL
            for (c = 0; c < NC; ++c) {
                const mha__vf vw = mha__vset1(w[(size_t)c * ldw + p]);
                if (w[(size_t)c * ldw + p] == 0.0f) continue;
                MHA__UNROLL
                for (i = 0; i < CW; ++i) acc[c][i] = mha__vfma(acc[c][i], vw, x[i]);
            }
        }
    }
    MHA__UNROLL
    for (c = 0; c < NC; ++c)
        MHA__UNROLL
        for (i = 0; i < CW; ++i) mha__vstore(o + (size_t)c * Dv + d0 + i * MHA__VW, acc[c][i]);
}

/* one column, one vector: the chunk every column count shares for its last vectors */
static void mha__npv_chunk1(int dt, int d0, int Dv, const void *v, size_t rs, int nc, const float *w, float *o)
{
    if (dt == MHA_F16) mha__npv_chunk(1, MHA_F16, 1, d0, Dv, v, rs, nc, w, 0, o);
    else if (dt == MHA_BF16) mha__npv_chunk(1, MHA_BF16, 1, d0, Dv, v, rs, nc, w, 0, o);
    else mha__npv_chunk(1, MHA_F32, 1, d0, Dv, v, rs, nc, w, 0, o);
}

/* O_c += sum_p w[c ldw + p] V_p over all of Dv: chunks of CW vectors,
   NC * CW <= MHA__NACC accumulators (CW <= 8), then single vectors a
   column at a time, then the features past the last whole vector */
MHA__SPECIAL void mha__npv_nc(const int NC, const int DT, int Dv, const void *v, size_t rs, int nc,
                              const float *w, size_t ldw, float *o)
{
    const int fit = MHA__NACC / NC;
    const int CW = fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
    const int Dvec = Dv / MHA__VW * MHA__VW;
    int d0 = 0, p, c;
    for (; d0 + CW * MHA__VW <= Dvec; d0 += CW * MHA__VW) mha__npv_chunk(NC, DT, CW, d0, Dv, v, rs, nc, w, ldw, o);
    for (; d0 < Dvec; d0 += MHA__VW)   /* the last vectors, a column at a time */
        for (c = 0; c < NC; ++c) mha__npv_chunk1(DT, d0, Dv, v, rs, nc, w + (size_t)c * ldw, o + (size_t)c * Dv);
    for (; d0 < Dv; ++d0)
        for (p = 0; p < nc; ++p) {
            const float x = mha__load_dt(DT, v, (size_t)p * rs + (size_t)d0);
            MHA__UNROLL
            for (c = 0; c < NC; ++c)
                if (w[(size_t)c * ldw + p] != 0.0f) o[(size_t)c * Dv + d0] += w[(size_t)c * ldw + p] * x;
        }
}

/* The dispatchers: the columns in groups of 4, 2 or 1 (the largest that
   is left: ncol = 7 is 4 + 2 + 1, 8 is 4 + 4, the later groups reading the
   block's rows again from L1), each group's size and dt constants.  Groups
   of 8 measured no faster (f16 from memory 1.2x slower, f32 in cache 1.1x
   faster) and cost a quarter more compile time.  */
#define MHA__NCASES(F, g, dt)                                                               \
    switch (g) {                                                                            \
    case 1: F(1, dt); break; case 2: F(2, dt); break;                                       \
    default: F(4, dt); break;                                                               \
    }
#define MHA__NDT(F, g)                                                                      \
    if (dt == MHA_F16) { MHA__NCASES(F, g, MHA_F16) }                                       \
    else if (dt == MHA_BF16) { MHA__NCASES(F, g, MHA_BF16) }                                \
    else { MHA__NCASES(F, g, MHA_F32) }
#define MHA__NSCORES(NC, DT) mha__nscores_nc(NC, DT, D, scale, k, rs, nc, qrow + c0, part, s + (size_t)c0 * lds, lds)
#define MHA__NPV(NC, DT) mha__npv_nc(NC, DT, Dv, v, rs, nc, w + (size_t)c0 * ldw, ldw, o + (size_t)c0 * Dv)
static int mha__ngroup(int left, int gmax)
{
    int g = left >= 4 ? 4 : left >= 2 ? 2 : 1;
    return g < gmax ? g : gmax;
}
static void mha__narrow_scores(int ncol, int dt, int D, float scale, const void *k, size_t rs, int nc,
                               const float *const *qrow, float *part, float *s, size_t lds)
{
    int c0, g;
    MHA_ASSERT(ncol >= 1 && ncol <= MHA__NARROW);
    for (c0 = 0; c0 < ncol; c0 += g) {
        g = mha__ngroup(ncol - c0, 4);
        MHA__NDT(MHA__NSCORES, g)
    }
}
static void mha__narrow_pv(int ncol, int dt, int Dv, const void *v, size_t rs, int nc,
                           const float *w, size_t ldw, float *o)
{
    /* rows of 8 vectors (D 128 with AVX-512): whole rows a pass, as many
       columns as MHA__NACC holds, rather than halves of rows for all the
       columns, so that the first pass reads each V row from memory in
       order (measured: passes over every other half row defeat the
       hardware prefetch) */
    const int gmax = Dv != 8 * MHA__VW ? 4 : MHA__NACC / 8 > 1 ? MHA__NACC / 8 : 1;
    int c0, g;
    MHA_ASSERT(ncol >= 1 && ncol <= MHA__NARROW);
    for (c0 = 0; c0 < ncol; c0 += g) {
        g = mha__ngroup(ncol - c0, gmax);
        MHA__NDT(MHA__NPV, g)
    }
}
#undef MHA__NSCORES
#undef MHA__NPV
#undef MHA__NDT
#undef MHA__NCASES

/* The columns of query tile tq of (b, local KV head kvh) against its packed
   keys, shared (not read on the narrow path); sc: the tile buffers.  With
   tq->partial the item covers key tiles t_lo..t_hi-1 only and leaves its
   unnormalised O, m and l there for mha__merge_partials.  */
static void mha__attend_fused(const mha__attn *a, const mha__fused_dims *f, int b, int kvh,
                              const mha__tileq *tq, const float *shared, float *sc)
{
    /* K and V of (b, kvh): float32 at k, v, or 16-bit at k16, v16, whose
       rows are widened into conv as they are used */
    size_t koff = (size_t)b * a->k.bs + (size_t)kvh * a->k.hs, voff = (size_t)b * a->v.bs + (size_t)kvh * a->v.hs;
    const float *k = a->k.dt ? NULL : a->k.p + koff, *v = a->v.dt ? NULL : a->v.p + voff;
    const uint16_t *k16 = a->k.dt ? a->k.h + koff : NULL, *v16 = a->v.dt ? a->v.h + voff : NULL;
    float *conv = mha__fused_conv(f, sc);
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
    float *sn = kedge + mha__round_floats((size_t)MHA__MR * D) + 6 * mha__round_floats(MHA__FBR);
    float *npart = sn + mha__round_floats((size_t)MHA__NARROW * MHA__NLDS);
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

        if (narrow) {   /* steps 1-4 of the narrow path, the same math, MHA__NSUB keys at a time */
            const size_t lds = MHA__NLDS;
            int jb;
            MHA_ASSERT(nc <= MHA__FBC);
            for (jb = j0; jb < j0 + nc; jb += MHA__NSUB) {
                const int nb = nc - jb + j0 < MHA__NSUB ? nc - jb + j0 : MHA__NSUB;
                int need_mask = !appended && (masked || (mha__limits(a) && (jb < lo_last || jb + nb - 1 > hi_first)));
                MHA_PROFILE_MARK(MHA_PHASE_SCORES);
                mha__narrow_scores(ncol, a->k.dt, D, a->scale,
                                   k16 ? (const void *)(k16 + (size_t)jb * a->k.rs) : (const void *)(k + (size_t)jb * a->k.rs),
                                   a->k.rs, nb, qrow, npart, sn, lds);
                if (a->softcap > 0.0f)
                    for (c = 0; c < ncol; ++c) mha__softcap(a->softcap, sn + (size_t)c * lds, (size_t)nb);
                MHA_PROFILE_MARK(MHA_PHASE_MASK);
                if (need_mask || a->stats) {   /* the general tile's layout, for its masks and statistics */
                    for (p = 0; p < nb; ++p)
                        for (c = 0; c < ncol; ++c) MHA__ST(st, nb, p, c) = sn[(size_t)c * lds + p];
                    if (need_mask) mha__mask_tile_t(a, tq, jb, nb, st);
                    if (a->stats) mha__fused_stats_tile(nb, nvp, jb == 0 && !appended, st, m, ra);
                    for (p = 0; need_mask && p < nb; ++p)
                        for (c = 0; c < ncol; ++c) sn[(size_t)c * lds + p] = MHA__ST(st, nb, p, c);
                }
                /* online softmax of each column's row: m' = max(m, max_p s_p),
                   w_p = exp(s_p - m'), l = exp(m - m') l + sum_p w_p, O *= exp(m - m') */
                MHA_PROFILE_MARK(MHA_PHASE_SOFTMAX);
                for (c = 0; c < ncol; ++c) {
                    float *s = sn + (size_t)c * lds, ccs[MHA__VW], mnew;
                    mha__vf vmax = mha__vset1(-INFINITY), sum = mha__vzero(), mref, cc;
                    for (p = nb; p % MHA__VW; ++p) s[p] = -INFINITY;   /* lanes past the keys: weight 0 */
                    for (p = 0; p < nb; p += MHA__VW) vmax = mha__vmax(vmax, mha__vload(s + p));
                    mnew = mha__vhmax(vmax);
                    if (m[c] > mnew) mnew = m[c];
                    mref = mha__vset1(mnew > -INFINITY ? mnew : 0.0f);     /* no allowed key yet: exp against 0 */
                    cc = mha__vexp_nonpos(mha__vsub(mha__vset1(m[c]), mref));
                    for (p = 0; p < nb; p += MHA__VW) {
                        mha__vf e = mha__vexp_nonpos(mha__vsub(mha__vload(s + p), mref));
                        mha__vstore(s + p, e);
                        sum = mha__vadd(sum, e);
                    }
                    mha__vstore(ccs, cc);
                    l[c] = mha__vhsum(sum) + l[c] * ccs[0];
                    if (ccs[0] != 1.0f)
                        for (d = 0; d < Dv; ++d) ot[(size_t)c * Dv + d] *= ccs[0];
                    m[c] = mnew;
                }
                MHA_PROFILE_MARK(MHA_PHASE_PV);
                mha__narrow_pv(ncol, a->v.dt, Dv,
                               v16 ? (const void *)(v16 + (size_t)jb * a->v.rs) : (const void *)(v + (size_t)jb * a->v.rs),
                               a->v.rs, nb, sn, lds, ot);
            }
            continue;
        }

        /* 1. S^T = scale K_t Q^T, one NR-wide sliver of queries at a time;
              K's rows are read where they are; soft-capped */
        MHA_PROFILE_MARK(MHA_PHASE_SCORES);
        {
            const float *kt = k16 ? conv : k + (size_t)j0 * a->k.rs;
            size_t ldk = k16 ? (size_t)D : a->k.rs;
            for (p = 0; k16 && p < nc; ++p)   /* the tile's keys widened, ld D */
                mha__cvt_from16(conv + (size_t)p * D, k16 + (size_t)(j0 + p) * a->k.rs, a->k.dt, (size_t)D);
            for (j = 0; j < ncol; j += MHA__NR)
                mha__macro_kernel(nc, ncol - j < MHA__NR ? ncol - j : MHA__NR, D, a->scale, 0.0f,
                                  kt, ldk, kedge, qt + (size_t)j * D, st + (size_t)j * nc, MHA__NR);
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
            if (mha__vhmax(mha__vsub(mha__vset1(1.0f), cc)) != 0.0f)
                for (d = 0; d < Dv; ++d) {
                    float *o = ot + (size_t)d * ldo + i;
                    mha__vstore(o, mha__vmul(mha__vload(o), cc));
                }
            mha__vstore(m + i, mnew);
        }

        /* 4. O^T += V_t^T P^T; a zero weight times a NaN/Inf value would be
           NaN, so a tile whose V is not finite sums nonzero weights only */
        MHA_PROFILE_MARK(MHA_PHASE_PV);
        if (flags[t] != 0.0f) {
            mha__macro_kernel(Dv, ncol, nc, 1.0f, 1.0f, pv + (size_t)t * f->v_tile, 0, NULL, st, ot, ldo);
        } else {
            for (p = 0; p < nc; ++p) {
                const float *vr = v16 ? conv : v + (size_t)(j0 + p) * a->v.rs;
                if (v16) mha__cvt_from16(conv, v16 + (size_t)(j0 + p) * a->v.rs, a->v.dt, (size_t)Dv);
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

/* floats of one part's partial result: the columns of a narrow tile (the
   only ones split), MHA__PART_W(Dv) each */
static size_t mha__part_floats(int Dv)
{
    return mha__round_floats((size_t)MHA__NARROW * MHA__PART_W((size_t)Dv));
}

/* Split-K runs the parts of up to MHA__SPLIT_BATCH / nparts head blocks
   between two barriers (then merges them, one head block per item): a
   barrier costs a wake-up of every waiting thread, tens of microseconds
   with OpenMP's passive wait, against about 40 us of work per part (2048
   keys of one KV head); one round per head block made 2 threads slower
   than 1 on H 32, Lk 4096 (3.0 against 2.4 ms).  */
#define MHA__SPLIT_BATCH 64
static size_t mha__split_buffer_parts(int nparts)
{
    return nparts <= 1 ? 1 : nparts < MHA__SPLIT_BATCH ? MHA__SPLIT_BATCH : (size_t)nparts;
}

/* Scratch floats of one attention call.  Fused: per thread the tile
   buffers and, unless shared_pack, one (b, h)'s packed K and V; with
   shared_pack one packed K and V after the threads' parts.  Unfused: per
   thread a [mha__unfused_rows(Lq), Lk_eff] score block and GEMM packing.  */
static int mha__attn_scratch_floats(int Lq, int Lk, int Lk_eff, int D, int Dv, int nthreads,
                                    int need_weights, int shared_pack, int kv16, size_t *per_thread,
                                    size_t *total)
{
    size_t s, g1, g2, g, kv = 0;
    if (need_weights) {
        int br = mha__unfused_rows(Lq);
        if (!mha__mul((size_t)br, (size_t)Lk_eff, &s)) return 0;
        s = mha__round_floats(s);
        g1 = mha__gemm_ws_floats(br, Lk_eff, D);
        g2 = mha__gemm_ws_floats(br, Dv, Lk_eff);
        g = g1 > g2 ? g1 : g2;
        if (kv16 && !mha__mul((size_t)Lk_eff, (size_t)D + (size_t)Dv, &kv)) return 0;   /* widened K, V */
        if (!mha__add(s, g, per_thread) || !mha__add(*per_thread, 2 * MHA__ALIGN_FLOATS, per_thread) ||
            !mha__add(*per_thread, mha__round_floats(kv), per_thread))
            return 0;
        *per_thread = mha__round_floats(*per_thread);
        return mha__mul(*per_thread, (size_t)nthreads, total);
    } else {
        mha__fused_dims f;
        size_t parts;
        if (!mha__fused_sizes(Lk, Lk_eff, D, Dv, kv16, &f)) return 0;
        *per_thread = shared_pack ? f.tiles : f.tiles + f.packed;
        /* split-K partial results after the shared pack (mha__split_parts) */
        if (!mha__mul(mha__split_buffer_parts(mha__split_parts(Lk, 1, 1)), mha__part_floats(Dv), &parts)) return 0;
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
        size_t kvf = a->k.dt ? mha__round_floats((size_t)a->Lk_eff * ((size_t)a->D + (size_t)a->Dv)) : 0;
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
            mha__attend_rows(a, (int)(t / nqt), i0, nr, sc, sc + mha__round_floats((size_t)nr * a->Lk_eff),
                             sc + per_thread - kvf);
        }
    } else {
        mha__fused_dims f;
        int per_group, gmax, nblk = mha__head_blocks(a, &per_group, &gmax);
        int rows = MHA__FBR / gmax;                            /* query rows per tile */
        int nqt = (a->nq + rows - 1) / rows;
        int narrow = (a->nq < rows ? a->nq : rows) * gmax <= MHA__NARROW;
        int nparts = mha__split_parts(a->Lk, narrow, nqt);
        (void)mha__fused_sizes(a->Lk, a->Lk_eff, a->D, a->Dv, a->k.dt != 0, &f);   /* checked by the plan */
        if (nparts > 1) {
            /* rounds of `per` (b, head block)s: the threads share out their
               key parts, then their merges (each in part order) */
            size_t pf = mha__part_floats(a->Dv);
            float *parts = ws + (size_t)a->nthreads * per_thread + (a->shared_pack ? f.packed : 0);
            int nreal = (a->Lk + MHA__FBC - 1) / MHA__FBC, nbk = a->nb * nblk;
            int per = nparts < MHA__SPLIT_BATCH ? MHA__SPLIT_BATCH / nparts : 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(a->nthreads)
#endif
            {
                int r0, it, tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                for (r0 = 0; r0 < nbk; r0 += per) {
                    int nr = nbk - r0 < per ? nbk - r0 : per;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                    for (it = 0; it < nr * nparts; ++it) {
                        int bk = r0 + it / nparts, pt = it % nparts, b = bk / nblk;
                        mha__tileq q;
                        mha__head_block(a, bk % nblk, per_group, gmax, &q.gh0, &q.ng);
                        q.gb = a->b0 + b; q.gi = a->q0; q.nr = a->nq; q.narrow = 1;
                        q.t_lo = pt * MHA__SPLIT_TILES;
                        q.t_hi = q.t_lo + MHA__SPLIT_TILES < nreal ? q.t_lo + MHA__SPLIT_TILES : nreal;
                        q.partial = parts + (size_t)it * pf;
                        mha__attend_fused(a, &f, b, mha__kvh(a, q.gh0 - a->h0), &q, NULL,
                                          ws + (size_t)tid * per_thread);
                    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                    for (it = 0; it < nr; ++it) {
                        int bk = r0 + it, b = bk / nblk;
                        mha__tileq tq;
                        mha__head_block(a, bk % nblk, per_group, gmax, &tq.gh0, &tq.ng);
                        tq.gb = a->b0 + b; tq.gi = a->q0; tq.nr = a->nq; tq.narrow = 1;
                        mha__merge_partials(a, b, &tq, nparts, parts + (size_t)it * nparts * pf, pf);
                    }
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
                        for (t = 0; t < f.ntiles; ++t)
                            mha__fused_pack(a, &f, b, kvh, t, shared, ws + (size_t)tid * per_thread);
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
                        for (kt = 0; kt < f.ntiles; ++kt) mha__fused_pack(a, &f, b, kvh, kt, sc, sc + f.packed);
                        packed = (long)b * a->Hkv + kvh;
                    }
                    mha__attend_fused(a, &f, b, kvh, &q, sc, sc + f.packed);
                }
            }
        }
    }
}

#endif /* kernels */
#ifndef MHA__TIER_PASS   /* main pass: no kernel here */
/* The row outputs of a call: lse (an internal buffer, e.g. a saved
   forward's, or NULL) and the caller's rs (NULL: none); rs->lse is written
   besides lse when they differ.  */
static void mha__attn_stats(mha__attn *a, float *lse, const mha__rowout *rs)
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
    a->q.h = a->k.h = a->v.h = NULL; a->q.dt = a->k.dt = a->v.dt = 0;
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
    mha__attn_stats(a, NULL, NULL);   /* the run's outputs are set by the run */
    a->sinks_grad = NULL;
}

#endif /* main pass */
#if defined(MHA__TIER_PASS) || !defined(MHA__DISPATCH)   /* kernels: one copy per tier */

/* ---------------------------------------------- the fused backward */

/* ------------------------------------------------ attention backward */


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
                /* the row's max; a NaN score (a NaN in the query, or in a key it
                   attends to) sticks, so the row comes out NaN as in the forward,
                   never as "every key blocked" */
                for (c = 0; c < bc; ++c) if (!(sr[c] <= mt) && mt == mt) mt = sr[c];
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
            float mm = m[r] != m[r] || m[r] > sink ? m[r] : sink, f, sum;   /* (a NaN max stays) */
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

#if defined(MHA__TIER_PASS)
/* this tier's tables (the names are this pass's: mha__gemm is mha__gemm_avx2 ...) */
static const mha__gtab MHA__T(gtab) = {
    mha__gemm, mha__gemm_pp, mha__gemm_mt, mha__gemm_mt_pp, mha__gemm_ws_floats, mha__gemm_ws_floats_mt, mha__prepack_b, mha__prepacked_floats,
    mha__prepack_b16
};
static const mha__atab MHA__T(atab) = {
    mha__softcap, mha__attend_all, mha__attend_backward_fused, mha__attn_scratch_floats, mha__fbwd_floats,
    mha__cvt_from16, mha__cvt_to16, MHA__FBR
};
#endif
#endif /* kernels */
#ifndef MHA__TIER_PASS   /* main pass */

/* --------------------------------------------- SDPA plans and runs */

/* SDPA forward (per-thread scratch) and backward (P and dP of one head). */
static int mha__sdpa_fwd_floats(int B, int H, int Lq, int Lk, int D, int Dv, int weights, int nt, int kv16,
                                size_t *per_thread, size_t *total)
{
    return mha__attn_scratch_floats(Lq, Lk, Lk, D, Dv, nt, weights, (size_t)B * H < (size_t)nt, kv16,
                                    per_thread, total) &&
           mha__add(*total, MHA__ALIGN_FLOATS, total);
}

static int mha__sdpa_bwd_floats(int B, int H, int Hkv, int Lq, int Lk, int D, int Dv, int nt,
                                size_t *total)
{
    return mha__add(mha__fbwd_floats(B, H, Hkv, Lq, Lk, D, Dv, nt), MHA__ALIGN_FLOATS, total);
}

/* An SDPA saved forward: header, lse [B, H, Lq], O [B, H, Lq, Dv]; total
   includes the alignment slack. */
static int mha__sdpa_saved_floats(int B, int H, int Lq, int Dv, size_t *lse, size_t *o, size_t *total)
{
    size_t rows = (size_t)B * H * Lq, no;
    if (!mha__mul(rows, (size_t)Dv, &no)) return 0;
    *lse = MHA__SAVED_HDR;
    *o = *lse + mha__round_floats(rows);
    return mha__add(*o, mha__round_floats(no), total) && mha__add(*total, MHA__ALIGN_FLOATS, total);
}

/* (defined further on, where its section is) */
static int mha__cache_attend_floats(int H, int Lq, int capacity, int D, int ring, int nt, int kv16, size_t *per_thread,
                                    size_t *total);

static mha_status mha__sdpa_plan_make(int B, int H, int Lq, int Lk, int D, int Dv,
                                      const mha_options *opt, unsigned flags, mha_plan *p, mha_error *e)
{
    size_t n, per_thread, f, f1, at_lse, at_o, saved = 0;
    int Hkv, kv16, shot = (flags & MHA__FLAG_SHOT) != 0;
    mha_status st;
    flags &= ~MHA__FLAG_SHOT;
    memset(p, 0, sizeof *p);
    if ((st = mha__pos(e, "B", B)) != MHA_OK || (st = mha__pos(e, "H", H)) != MHA_OK ||
        (st = mha__pos(e, "Lq", Lq)) != MHA_OK || (st = mha__pos(e, "Lk", Lk)) != MHA_OK ||
        (st = mha__pos(e, "D", D)) != MHA_OK || (st = mha__pos(e, "Dv", Dv)) != MHA_OK)
        return st;
    /* every tensor's byte count must fit, and the int and long counts of
       the int audit (size arithmetic, above) */
    if (!mha__mul3((size_t)B * (size_t)H, (size_t)Lq, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul3((size_t)B * (size_t)H, (size_t)Lk, (size_t)(D > Dv ? D : Dv), &n) ||
        !mha__mul3((size_t)B * (size_t)H, (size_t)Lq, (size_t)Lk, &n) ||
        !mha__mul(n, sizeof(float), &n) || !mha__mul3((size_t)Lq, (size_t)Lk, 2 * sizeof(float), &n) ||
        (size_t)B * (size_t)H > MHA__INT_LIMIT || (size_t)B * (size_t)H * (size_t)Lq > LONG_MAX ||
        !mha__dim_ok(Lq) || !mha__dim_ok(Lk) || !mha__dim_ok(D) || !mha__dim_ok(Dv))
        return mha__fail(e, MHA_ERR_OVERFLOW, "B", "B %d, H %d, Lq %d, Lk %d, D %d, Dv %d: a tensor passes the "
                         "size limits", B, H, Lq, Lk, D, Dv);
    st = mha__plan_begin(p, MHA__PLAN_SDPA, opt, flags,
                         MHA_PLAN_WEIGHTS | MHA_PLAN_ROWS | MHA_PLAN_TRAINING | MHA_PLAN_CACHE,
                         B, H, Lq, Lk, e);
    if (st != MHA_OK) return st;
    if ((st = mha__check_decode(&p->opt, H, p->opt.num_kv_heads, "opt->num_kv_heads", NULL, 0, D, Lq, Lk, e)) != MHA_OK)
        return st;
    Hkv = p->opt.num_kv_heads ? p->opt.num_kv_heads : H;
    kv16 = p->opt.kv_dtype != MHA_F32;
    p->D = D; p->Dv = Dv;
    if (!mha__sdpa_fwd_floats(B, H, Lq, Lk, D, Dv, 0, p->nthreads, kv16, &per_thread, &f)) goto overflow;
    if (flags & MHA_PLAN_CACHE) {   /* a run over a KV cache (ring buffers included) */
        if (D != Dv)
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, shot ? "run->cache" : "flags", "%s, but a KV cache "
                             "holds keys and values of one width: D %d, Dv %d",
                             shot ? "is set" : "has MHA_PLAN_CACHE", D, Dv);
        if (!mha__cache_attend_floats(H, Lq, Lk, D, 1, p->nthreads, kv16, &per_thread, &f1)) goto overflow;
        if (f1 > f) f = f1;
    }
    if (flags & MHA_PLAN_WEIGHTS) {   /* all weights: the unfused path */
        if (!mha__sdpa_fwd_floats(B, H, Lq, Lk, D, Dv, 1, p->nthreads, kv16, &per_thread, &f1)) goto overflow;
        if (f1 > f) f = f1;
    }
    if (flags & (MHA_PLAN_WEIGHTS | MHA_PLAN_ROWS)) {   /* chosen rows after the fused path (lse first) */
        if (!mha__sdpa_fwd_floats(B, H, Lq, Lk, D, Dv, 0, p->nthreads, kv16, &per_thread, &f1) ||
            !mha__add(f1, mha__round_floats((size_t)B * H * Lq), &f1))
            goto overflow;
        if (f1 > f) f = f1;
    }
    if (flags & MHA_PLAN_TRAINING) {
        if (!mha__sdpa_bwd_floats(B, H, Hkv, Lq, Lk, D, Dv, p->nthreads, &f1)) goto overflow;
        if (f1 > f) f = f1;
        if (!mha__sdpa_saved_floats(B, H, Lq, Dv, &at_lse, &at_o, &saved)) goto overflow;
    }
    return mha__plan_ws(p, f, saved, e);
overflow:
    return mha__fail(e, MHA_ERR_OVERFLOW, "Lk", "the workspace's size does not fit in size_t");
}

/* The attention of SDPA's dense [B, H, L, D] tensors. */
static void mha__attn_dense(mha__attn *a, const mha_options *o, int B, int H, int Lq, int Lk, int D,
                            int Dv, const float *q, const void *k, const void *v, float *out)
{
    mha__attn_common(a, o, B, H, Lq, Lk, Lk, D, Dv);
    a->q.p = q; a->q.rs = (size_t)D;  a->q.hs = (size_t)Lq * D;  a->q.bs = (size_t)H * Lq * D;
    a->k.rs = (size_t)D;  a->k.hs = (size_t)Lk * D;  a->k.bs = (size_t)a->Hkv * Lk * D;
    a->v.rs = (size_t)Dv; a->v.hs = (size_t)Lk * Dv; a->v.bs = (size_t)a->Hkv * Lk * Dv;
    if (o->kv_dtype != MHA_F32) {   /* 16-bit keys and values: the kernels widen them */
        a->k.p = a->v.p = NULL;
        a->k.h = MHA__CAST(const uint16_t *, k); a->v.h = MHA__CAST(const uint16_t *, v);
        a->k.dt = a->v.dt = (int)o->kv_dtype;
    } else {
        a->k.p = MHA__CAST(const float *, k); a->v.p = MHA__CAST(const float *, v);
    }
    a->o = out; a->o_rs = (size_t)Dv; a->o_hs = (size_t)Lq * Dv; a->o_bs = (size_t)H * Lq * Dv;
    a->weights = NULL; a->per_head = 1;
    a->shared_pack = (size_t)B * H < (size_t)a->nthreads;
}

/* Weights of chosen query rows, recomputed from each row's lse through the
   forward's own score path (q.k in double, the same soft-cap and
   mha__mask_cols as the unfused path):
       w[b, h, r, j] = exp(s_ij - lse[b, h, i]),   i = rows[r]
   q row (b, h, i) at q + b*qbs + i*qrs + h*qhs, key j of KV head g at
   k + b*kbs + j*krs + g*khs; out [B, H, n, Lk'] (per head) or [B, n, Lk']
   (the head average, avg: a row of Lk' per thread).  */
typedef struct mha__rows_args {
    const float *q, *k, *lse;
    const uint16_t *k16; int kdt;   /* 16-bit keys (SDPA's kv_dtype), k NULL */
    size_t qbs, qrs, qhs, kbs, krs, khs;
    int n, Lk, D;
    const int *rows;
    int qrow_of_r;      /* q holds the chosen rows only (row r at r), not all Lq */
} mha__rows_args;

static void mha__rows_weights(const mha__attn *a, const mha__rows_args *g, int per_head, float *out,
                              float *avg)
{
    long t, items = (long)a->B * g->n;
    int H = a->H;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(a->nthreads)
#endif
    for (t = 0; t < items; ++t) {
        int b = (int)(t / g->n), r = (int)(t % g->n), i = g->rows[r], h, j, d;
        float *acc = per_head ? NULL : out + (size_t)t * g->Lk;
#ifdef _OPENMP
        float *tmp = avg ? avg + (size_t)omp_get_thread_num() * g->Lk : NULL;
#else
        float *tmp = avg;
#endif
        if (acc) for (j = 0; j < g->Lk; ++j) acc[j] = 0.0f;
        for (h = 0; h < H; ++h) {
            const float *qi = g->q + (size_t)b * g->qbs + (size_t)(g->qrow_of_r ? r : i) * g->qrs + (size_t)h * g->qhs;
            float li = g->lse[((size_t)b * H + h) * a->Lq + i];
            float *w = per_head ? out + (((size_t)b * H + h) * g->n + r) * g->Lk : tmp;
            size_t ko = (size_t)b * g->kbs + (size_t)(h / a->group) * g->khs;
            for (j = 0; j < g->Lk; ++j) {   /* q.k summed in double: the forward's to rounding */
                double dot = 0.0;
                if (g->k16)
                    for (d = 0; d < g->D; ++d)
                        dot += (double)qi[d] * mha__h2f(g->k16[ko + (size_t)j * g->krs + d], g->kdt);
                else
                    for (d = 0; d < g->D; ++d) dot += (double)qi[d] * g->k[ko + (size_t)j * g->krs + d];
                w[j] = (float)(a->scale * dot);
            }
            if (a->softcap > 0.0f) mha__softcap(a->softcap, w, (size_t)g->Lk);
            mha__mask_cols(a, b, h, i, 0, g->Lk, w);
            for (j = 0; j < g->Lk; ++j)
                w[j] = li == -INFINITY || w[j] == -INFINITY ? 0.0f : (float)exp((double)w[j] - li);
            if (acc) for (j = 0; j < g->Lk; ++j) acc[j] += w[j] / (float)H;
        }
    }
}

/* The checks of rows: each in 0..Lq-1. */
static mha_status mha__rows_ok(const mha_run *run, int Lq, mha_error *e)
{
    int r;
    if (run && run->n_rows > Lq)   /* (the plan sized the rows' buffers for at most Lq) */
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "run->n_rows", "is %d; a run returns at most Lq = %d rows",
                         run->n_rows, Lq);
    for (r = 0; run && r < run->n_rows; ++r)
        if (run->rows[r] < 0 || run->rows[r] >= Lq)
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "run->rows", "[%d] is %d; expected 0..Lq-1 = 0..%d", r,
                             run->rows[r], Lq - 1);
    return MHA_OK;
}

/* (defined further on, where its section is) */
static mha_status mha__sdpa_cache_forward(const mha_plan *p, int Lq, const float *q, float *out,
                                          const mha_run *run, const mha_options *o, mha_error *e);

/* The header's shape of an SDPA saved forward. */
static void mha__sdpa_saved_shape(const mha_plan *p, int Lq, int Lk, int Hkv, int *shape)
{
    shape[0] = MHA__PLAN_SDPA; shape[1] = p->B; shape[2] = p->H; shape[3] = Lq; shape[4] = Lk;
    shape[5] = p->D; shape[6] = p->Dv; shape[7] = Hkv; shape[8] = shape[9] = shape[10] = 0;
}

static mha_status mha__sdpa_run_forward(const mha_plan *p, int Lq, int Lk,
                                        const float *q, const void *k, const void *v,
                                        float *out, const mha_run *run, mha_error *err)
{
    mha_options o;
    mha__attn a;
    mha__rowout ro;
    const mha__rowout *rs;
    size_t per_thread, total, at_lse = 0, at_o = 0, saved = 0, lse_region = 0;
    void *owned;
    float *ws = NULL, *sv = NULL, *lse = NULL;
    int rows = run && run->n_rows > 0, weights = run && run->weights && !rows;
    int shape[MHA__SAVED_WORDS - 1];
    mha_status st;
    st = mha__run_begin(p, MHA__PLAN_SDPA, Lq, Lk, run,
                        MHA__RF_SAVED | MHA__RF_MASKS | MHA__RF_CACHE | MHA__RF_WEIGHTS | MHA__RF_STATS, &o, err);
    if (st == MHA_OK) st = mha__need(err, "q", q);
    if (st == MHA_OK) st = mha__need(err, "out", out);
    if (st == MHA_OK) st = mha__run_weights_ok(p, run, err);
    if (st == MHA_OK && run && run->cache) {
        if (k || v) st = mha__fail(err, MHA_ERR_INVALID_ARGUMENT, k ? "k" : "v", "is set; with run->cache the keys "
                                   "and values are the cache's (pass NULL)");
        else if (run->saved || run->weights)
            st = mha__fail(err, MHA_ERR_INVALID_ARGUMENT, run->saved ? "run->saved" : "run->weights", "is set; a run "
                           "over a KV cache neither saves a forward nor returns weights");
        else st = mha__sdpa_cache_forward(p, Lq, q, out, run, &o, err);
        return st;
    }
    if (st == MHA_OK) st = mha__need(err, "k", k);
    if (st == MHA_OK) st = mha__need(err, "v", v);
    if (st == MHA_OK) st = mha__rows_ok(run, Lq, err);
    if (st == MHA_OK && rows) {   /* rows are recomputed from q and k after out is written */
        size_t nq = (size_t)p->B * p->H * Lq * p->D, no = (size_t)p->B * p->H * Lq * p->Dv;
        size_t nk = (size_t)p->B * (o.num_kv_heads ? o.num_kv_heads : p->H) * Lk * p->D;
        const float *kf = MHA__CAST(const float *, k);
        nk = (nk * mha_dtype_size(o.kv_dtype) + sizeof(float) - 1) / sizeof(float);   /* in floats */
        if (mha__overlap(out, no, q, nq) || mha__overlap(out, no, kf, nk))
            st = mha__fail(err, MHA_ERR_INVALID_ARGUMENT, "run->rows", "are recomputed from q and k after the "
                           "forward, but out overlaps %s", mha__overlap(out, no, q, nq) ? "q" : "k");
    }
    if (st != MHA_OK) return st;
    (void)mha__sdpa_fwd_floats(p->B, p->H, Lq, Lk, p->D, p->Dv, weights, p->nthreads, p->opt.kv_dtype != MHA_F32,
                               &per_thread, &total);   /* within the plan's */
    if (run && run->saved) {
        (void)mha__sdpa_saved_floats(p->B, p->H, Lq, p->Dv, &at_lse, &at_o, &saved);
        if ((st = mha__run_saved(p, run, saved, &sv, err)) != MHA_OK) return st;
    } else if (rows && !run->lse) {   /* the rows need each row's lse: a region of its own */
        lse_region = mha__round_floats((size_t)p->B * p->H * Lq);
    }
    if ((st = mha__run_ws(p, run, lse_region + total, &owned, &ws, err)) != MHA_OK) return st;
    mha__attn_dense(&a, &o, p->B, p->H, Lq, Lk, p->D, p->Dv, q, k, v, out);
    a.weights = weights ? run->weights : NULL;
    rs = mha__run_rowout(run, &ro);
    /* the lse a backward or the rows need: the saved forward's, or a region */
    lse = sv ? sv + at_lse : lse_region ? ws : NULL;
    mha__attn_stats(&a, lse, rs);
    mha__attend_all(&a, ws + lse_region, per_thread);
    if (sv) {   /* O after the attention (out may be q) */
        memcpy(sv + at_o, out, (size_t)p->B * p->H * Lq * p->Dv * sizeof(float));
        mha__sdpa_saved_shape(p, Lq, Lk, a.Hkv, shape);
        mha__saved_stamp(sv, shape);
    }
    if (rows) {   /* q [B, H, Lq, D], k [B, Hkv, Lk, D]; weights [B, H, n, Lk] */
        mha__rows_args g;
        g.q = q; g.k = a.k.p; g.k16 = a.k.h; g.kdt = a.k.dt; g.lse = a.lse;
        g.qbs = (size_t)p->H * Lq * p->D; g.qrs = (size_t)p->D; g.qhs = (size_t)Lq * p->D;
        g.kbs = (size_t)a.Hkv * Lk * p->D; g.krs = (size_t)p->D; g.khs = (size_t)Lk * p->D;
        g.n = run->n_rows; g.Lk = Lk; g.D = p->D; g.rows = run->rows; g.qrow_of_r = 0;
        mha__rows_weights(&a, &g, 1, run->weights, NULL);
    }
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

static mha_status mha__sdpa_run_backward(const mha_plan *p, int Lq, int Lk,
                                         const float *q, const float *k, const float *v,
                                         const float *dout, float *dq, float *dk, float *dv,
                                         const mha_run *run, mha_error *err)
{
    mha_options o;
    mha__attn a;
    void *owned;
    float *ws = NULL, *sv = NULL;
    size_t f = 0, at_lse = 0, at_o = 0, saved = 0;
    int shape[MHA__SAVED_WORDS - 1];
    mha_status st;
    st = mha__run_begin(p, MHA__PLAN_SDPA, Lq, Lk, run, MHA__RF_SAVED | MHA__RF_MASKS | MHA__RF_SINKS, &o, err);
    if (st == MHA_OK) st = mha__need(err, "q", q);
    if (st == MHA_OK) st = mha__need(err, "k", k);
    if (st == MHA_OK) st = mha__need(err, "v", v);
    if (st == MHA_OK) st = mha__need(err, "dout", dout);
    if (st == MHA_OK && !(p->flags & MHA_PLAN_TRAINING))
        st = mha__fail(err, MHA_ERR_EXCEEDS_PLAN, "plan", "was made without MHA_PLAN_TRAINING: it has no backward");
    if (st == MHA_OK && run && run->saved) {
        (void)mha__sdpa_saved_floats(p->B, p->H, Lq, p->Dv, &at_lse, &at_o, &saved);
        st = mha__run_saved(p, run, saved, &sv, err);
        mha__sdpa_saved_shape(p, Lq, Lk, o.num_kv_heads ? o.num_kv_heads : p->H, shape);
        if (st == MHA_OK) st = mha__saved_check(sv, shape, err);
    }
    if (st != MHA_OK) return st;
    (void)mha__sdpa_bwd_floats(p->B, p->H, o.num_kv_heads ? o.num_kv_heads : p->H, Lq, Lk, p->D,
                               p->Dv, p->nthreads, &f);   /* within the plan's */
    if ((st = mha__run_ws(p, run, f, &owned, &ws, err)) != MHA_OK) return st;
    mha__attn_dense(&a, &o, p->B, p->H, Lq, Lk, p->D, p->Dv, q, k, v, NULL);
    a.nthreads = p->nthreads;
    a.sinks_grad = run ? run->sinks_grad : NULL;
    if (sv) a.o = sv + at_o;
    mha__attend_backward_fused(&a, dout, sv ? sv + at_lse : NULL, dq, dk, dv, ws);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* ---------------------------------------------------- public: SDPA */

MHADEF mha_status mha_sdpa_forward(int B, int H, int Lq, int Lk, int D, int Dv,
                                   const float *q, const void *k, const void *v,
                                   const mha_options *opt, float *out,
                                   const mha_run *run, mha_error *err)
{
    mha_plan p;
    mha__shot s;
    mha_options o;
    mha_status st;
    mha__begin(err);
    memset(&s, 0, sizeof s);
    s.kind = MHA__PLAN_SDPA; s.flags = mha__shot_flags(run);
    s.B = B; s.H = H; s.Lq = Lq; s.D = D; s.Dv = Dv;
    if (opt) o = *opt; else memset(&o, 0, sizeof o);
    /* over a cache, the KV heads are the cache's unless the options say (then
       a cache whose heads do not divide H is the cache's fault, named so) */
    if (run && run->cache && !o.num_kv_heads && run->cache->Hkv > 0) {
        if (H > 0 && (run->cache->Hkv > H || H % run->cache->Hkv != 0))
            return mha__sign(err, "mha_sdpa_forward", mha__fail(err, MHA_ERR_HEADS_DIVIDE, "cache->Hkv", "is %d, "
                             "which does not divide the %d query heads", run->cache->Hkv, H));
        o.num_kv_heads = run->cache->Hkv;
    }
    /* and its storage type, unless the options name another (refused below) */
    if (run && run->cache && o.kv_dtype == MHA_F32) o.kv_dtype = run->cache->dtype;
    if ((st = mha__shot_lk(run, Lk, &s.Lk, err)) == MHA_OK && (st = mha__oneshot(&s, &o, run, &p, err)) == MHA_OK)
        st = mha__sdpa_run_forward(&p, Lq, Lk, q, k, v, out, run, err);
    return mha__sign(err, "mha_sdpa_forward", st);
}

MHADEF mha_status mha_sdpa_backward(int B, int H, int Lq, int Lk, int D, int Dv,
                                    const float *q, const float *k, const float *v,
                                    const float *dout, const mha_options *opt,
                                    float *dq, float *dk, float *dv,
                                    const mha_run *run, mha_error *err)
{
    mha_plan p;
    mha__shot s;
    mha_status st;
    mha__begin(err);
    memset(&s, 0, sizeof s);
    s.kind = MHA__PLAN_SDPA; s.flags = MHA_PLAN_TRAINING;
    s.B = B; s.H = H; s.Lq = Lq; s.Lk = Lk; s.D = D; s.Dv = Dv;
    if ((st = mha__oneshot(&s, opt, run, &p, err)) == MHA_OK)
        st = mha__sdpa_run_backward(&p, Lq, Lk, q, k, v, dout, dq, dk, dv, run, err);
    return mha__sign(err, "mha_sdpa_backward", st);
}

MHADEF mha_status mha_sdpa_plan_size(int B, int H, int Lq, int Lk, int D, int Dv,
                                     const mha_options *opt, unsigned flags, mha_sizes *sizes,
                                     mha_error *err)
{
    mha_plan p;
    mha__begin(err);
    if (!sizes) return mha__sign(err, "mha_sdpa_plan_size", mha__need(err, "sizes", sizes));
    return mha__sign(err, "mha_sdpa_plan_size",
                     mha__plan_out(mha__sdpa_plan_make(B, H, Lq, Lk, D, Dv, opt, flags, &p, err), &p, 0, NULL,
                                   0, NULL, sizes, err));
}

MHADEF mha_status mha_sdpa_plan(int B, int H, int Lq, int Lk, int D, int Dv,
                                const mha_options *opt, unsigned flags,
                                void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err)
{
    mha_plan p;
    mha__begin(err);
    if (!plan) return mha__sign(err, "mha_sdpa_plan", mha__need(err, "plan", plan));
    return mha__sign(err, "mha_sdpa_plan",
                     mha__plan_out(mha__sdpa_plan_make(B, H, Lq, Lk, D, Dv, opt, flags, &p, err), &p, 0, mem,
                                   mem_bytes, plan, NULL, err));
}

MHADEF mha_status mha_sdpa_run_forward(const mha_plan *p, int Lq, int Lk,
                                       const float *q, const void *k, const void *v,
                                       float *out, const mha_run *run, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_sdpa_run_forward", mha__sdpa_run_forward(p, Lq, Lk, q, k, v, out, run, err));
}

MHADEF mha_status mha_sdpa_run_backward(const mha_plan *p, int Lq, int Lk,
                                        const float *q, const float *k, const float *v,
                                        const float *dout, float *dq, float *dk, float *dv,
                                        const mha_run *run, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_sdpa_run_backward", mha__sdpa_run_backward(p, Lq, Lk, q, k, v, dout, dq, dk, dv, run, err));
}

/* ====================================================================== 6
   THE MODULE
   nn.MultiheadAttention: its weights resolved and checked, packed when the
   plan asks, the projections, the forward (by chunks of queries, or head
   by head for very long sequences), the backward, chosen rows of weights,
   and the module's plan and runs.
   ====================================================================== */

/* A module field as the caller wrote it: "m->x" for a module call,
   "layer->self_attn.x" inside an encoder layer's (who: 1 module, 2 encoder). */
#define MHA__MF(who, name) ((who) == 2 ? "layer->self_attn." name : "m->" name)

static mha_status mha__check_module(const mha_module *m, mha__mod *r, int who, mha_error *e)
{
    size_t n;
    int E, widest;
    if (!m) return mha__fail(e, MHA_ERR_NULL_POINTER, "m", "is NULL");
    if (m->embed_dim <= 0)
        return mha__fail(e, MHA_ERR_INVALID_SIZE, MHA__MF(who, "embed_dim"), "is %d; expected >= 1", m->embed_dim);
    if (m->num_heads <= 0)
        return mha__fail(e, MHA_ERR_INVALID_SIZE, MHA__MF(who, "num_heads"), "is %d; expected >= 1", m->num_heads);
    if (m->kdim < 0) return mha__fail(e, MHA_ERR_INVALID_SIZE, MHA__MF(who, "kdim"), "is %d; expected 0 (E) or >= 1", m->kdim);
    if (m->vdim < 0) return mha__fail(e, MHA_ERR_INVALID_SIZE, MHA__MF(who, "vdim"), "is %d; expected 0 (E) or >= 1", m->vdim);
    if (m->embed_dim % m->num_heads != 0)
        return mha__fail(e, MHA_ERR_HEADS_DIVIDE, MHA__MF(who, "num_heads"), "is %d, which does not divide embed_dim %d",
                         m->num_heads, m->embed_dim);
    memset(r, 0, sizeof *r);
    E = r->E = m->embed_dim; r->H = m->num_heads; r->D = E / r->H;
    r->kdim = m->kdim ? m->kdim : E;
    r->vdim = m->vdim ? m->vdim : E;
    if (!m->out_proj_weight) return mha__fail(e, MHA_ERR_NULL_POINTER, MHA__MF(who, "out_proj_weight"), "is NULL");
    if (m->in_proj_weight) {
        if (r->kdim != E || r->vdim != E)
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, r->kdim != E ? MHA__MF(who, "kdim") : MHA__MF(who, "vdim"),
                             "is %d; in_proj_weight needs kdim = vdim = embed_dim %d (else set q/k/v_proj_weight)",
                             r->kdim != E ? r->kdim : r->vdim, E);
    } else if (!m->q_proj_weight || !m->k_proj_weight || !m->v_proj_weight) {
        return mha__fail(e, MHA_ERR_NULL_POINTER, !m->q_proj_weight ? MHA__MF(who, "q_proj_weight") :
                         !m->k_proj_weight ? MHA__MF(who, "k_proj_weight") : MHA__MF(who, "v_proj_weight"),
                         "is NULL, and so is in_proj_weight: set one of the two layouts");
    }
    if ((m->bias_k == NULL) != (m->bias_v == NULL))
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, m->bias_k ? MHA__MF(who, "bias_v") : MHA__MF(who, "bias_k"),
                         "is NULL but the other is set: add_bias_kv needs both");
    if (m->add_zero_attn != 0 && m->add_zero_attn != 1)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, MHA__MF(who, "add_zero_attn"), "is %d; expected 0 or 1", m->add_zero_attn);
    if (!mha__dim_ok(E) || !mha__dim_ok(r->kdim) || !mha__dim_ok(r->vdim))
        return mha__fail(e, MHA_ERR_OVERFLOW, MHA__MF(who, "embed_dim"), "embed_dim %d, kdim %d, vdim %d: above %d",
                         E, r->kdim, r->vdim, MHA__INT_LIMIT);
    /* the KV heads are checked with the options (mha__check_decode); here only
       what the weight offsets need */
    if (m->num_kv_heads < 0)
        return mha__fail(e, MHA_ERR_INVALID_SIZE, MHA__MF(who, "num_kv_heads"), "is %d; expected 0 (H) or >= 1", m->num_kv_heads);
    r->Hkv = m->num_kv_heads ? m->num_kv_heads : r->H;
    if (r->Hkv > r->H || r->H % r->Hkv != 0)
        return mha__fail(e, MHA_ERR_HEADS_DIVIDE, MHA__MF(who, "num_kv_heads"), "is %d, which does not divide num_heads %d",
                         r->Hkv, r->H);
    r->Ekv = r->Hkv * r->D;
    r->rope = m->rope;
    widest = r->kdim > r->vdim ? r->kdim : r->vdim;
    if (E > widest) widest = E;
    /* every weight's bytes, and a packed matrix's (at most (E + NR) x widest) */
    if (!mha__mul3((size_t)E + MHA__NR_MAX, (size_t)widest, 4 * sizeof(float), &n))
        return mha__fail(e, MHA_ERR_OVERFLOW, MHA__MF(who, "embed_dim"), "a weight matrix's bytes do not fit in size_t");
    r->in_proj = m->in_proj_weight != NULL;
    if ((int)m->weight_dtype < MHA_F32 || (int)m->weight_dtype > MHA_BF16)
        return mha__fail(e, MHA_ERR_BAD_ENUM, MHA__MF(who, "weight_dtype"), "is %d; expected MHA_F32 (0), MHA_F16 (1) "
                         "or MHA_BF16 (2)", (int)m->weight_dtype);
    r->wdt = (int)m->weight_dtype;
    if (r->wdt) {   /* 16 bits: only mha__pack_write reads them, widening */
        if (r->in_proj) {
            r->hq = MHA__CAST(const uint16_t *, m->in_proj_weight);
            r->hk = r->hq + (size_t)E * E;
            r->hv = r->hk + (size_t)r->Ekv * E;
        } else {
            r->hq = MHA__CAST(const uint16_t *, m->q_proj_weight);
            r->hk = MHA__CAST(const uint16_t *, m->k_proj_weight);
            r->hv = MHA__CAST(const uint16_t *, m->v_proj_weight);
        }
        r->ho = MHA__CAST(const uint16_t *, m->out_proj_weight);
    } else if (r->in_proj) {
        r->wq = MHA__CAST(const float *, m->in_proj_weight);
        r->wk = r->wq + (size_t)E * E;
        r->wv = r->wk + (size_t)r->Ekv * E;
    } else {
        r->wq = MHA__CAST(const float *, m->q_proj_weight);
        r->wk = MHA__CAST(const float *, m->k_proj_weight);
        r->wv = MHA__CAST(const float *, m->v_proj_weight);
    }
    if (!r->wdt) r->wo = MHA__CAST(const float *, m->out_proj_weight);
    r->bq = m->in_proj_bias;
    r->bk = r->bq ? r->bq + E : NULL;
    r->bv = r->bq ? r->bq + E + r->Ekv : NULL;
    r->bo = m->out_proj_bias;
    r->bias_k = m->bias_k; r->bias_v = m->bias_v;
    r->zero_attn = m->add_zero_attn;
    r->extra = (m->bias_k != NULL) + m->add_zero_attn;
    return MHA_OK;
}

/* -------------------------------------------------- packed weights */

/* A plan made with MHA_PLAN_PACK keeps the four projection matrices
   prepacked as op(B) = W^T (mha__prepack_b) after its struct: Wq [E, E],
   Wk [Ekv, kdim], Wv [Ekv, vdim], Wo [E, E], each starting on a 64-byte
   line.  The panels are a copy of the weights made when the plan was
   made (or mha_plan_repack was called), in the panel order of this
   build's micro-kernel: runs read them instead of packing the weights on
   every call, with the same bits.  */
typedef struct mha__pack_layout {
    size_t wq, wk, wv, wo, floats;   /* float offsets from the (64-byte aligned) start, total */
} mha__pack_layout;

static mha_status mha__pack_lay(const mha__mod *r, mha__pack_layout *P)
{
    size_t cur = 0;
    if (!mha__region(&cur, mha__prepacked_floats(r->E, r->E), &P->wq) ||
        !mha__region(&cur, mha__prepacked_floats(r->Ekv, r->kdim), &P->wk) ||
        !mha__region(&cur, mha__prepacked_floats(r->Ekv, r->vdim), &P->wv) ||
        !mha__region(&cur, mha__prepacked_floats(r->E, r->E), &P->wo))
        return MHA_ERR_OVERFLOW;
    P->floats = cur;
    return MHA_OK;
}

/* Bytes of the panels, with room to align their start to a line. */
static mha_status mha__pack_bytes(const mha__mod *r, size_t *bytes)
{
    mha__pack_layout P;
    if (mha__pack_lay(r, &P) != MHA_OK || !mha__mul(P.floats, sizeof(float), bytes) ||
        !mha__add(*bytes, 64, bytes))
        return MHA_ERR_OVERFLOW;
    return MHA_OK;
}

/* Pack r's weights into buf (mha__pack_bytes long) and point r's panels there. */
static void mha__pack_write(mha__mod *r, void *buf)
{
    mha__pack_layout P;
    float *d = mha__align_ws(buf);
    (void)mha__pack_lay(r, &P);   /* checked when the plan was sized */
    if (r->wdt) {                 /* 16-bit weights, widened into the same panels */
        mha__prepack_b16(r->hq, r->wdt, r->E, r->E, d + P.wq);
        mha__prepack_b16(r->hk, r->wdt, r->Ekv, r->kdim, d + P.wk);
        mha__prepack_b16(r->hv, r->wdt, r->Ekv, r->vdim, d + P.wv);
        mha__prepack_b16(r->ho, r->wdt, r->E, r->E, d + P.wo);
    } else {
        mha__prepack_b(r->wq, r->E, r->E, d + P.wq);
        mha__prepack_b(r->wk, r->Ekv, r->kdim, d + P.wk);
        mha__prepack_b(r->wv, r->Ekv, r->vdim, d + P.wv);
        mha__prepack_b(r->wo, r->E, r->E, d + P.wo);
    }
    r->pq = d + P.wq; r->pk = d + P.wk; r->pv = d + P.wv; r->po = d + P.wo;
}

/* ----------------------------------------------------- projections */

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

/* ----------------------------------------------- workspace layouts */

/* Each run lays its workspace out for its own lengths with the layout
   functions below, and its plan took the same functions at the planned
   maxima: every region grows with Lq and Lk, so a run never needs more than
   its plan said.  Offsets are in floats from the aligned start. */

/* The module forward.  Queries go through chunk_b batches x chunk_q rows
   at a time (mha__fwd_chunks); qp, kp, vp hold the projections, scratch the
   attention's per-thread buffers and the projection GEMMs' packing.  A
   forward that saves keeps Q, K, V, C and the lse in the saved region
   instead (offsets into it; the workspace then holds the scratch only). */
typedef struct mha__fwd_layout {
    int chunk_b, chunk_q;
    size_t qp, kp, vp, scratch, per_thread, total_floats;
    size_t ctx, lse, saved_floats;   /* saves: the context and the lse (Q is then [B*Lq, E]) */
} mha__fwd_layout;

/* A module's saved forward: the header, Q [B*Lq, E], K and V [B*Lke, Ekv]
   (after RoPE, appended rows included), the context C [B*Lq, E] and the
   lse [B, H, Lq].  */
static int mha__mod_saved_at(const mha__mod *r, int B, int Lq, int Lk, size_t *cur, size_t *qp,
                             size_t *kp, size_t *vp, size_t *ctx, size_t *lse)
{
    size_t hdr, nq = (size_t)B * Lq * r->E, nk = (size_t)B * (Lk + r->extra) * r->Ekv;
    return mha__region(cur, MHA__SAVED_HDR, &hdr) && mha__region(cur, nq, qp) &&
           mha__region(cur, nk, kp) && mha__region(cur, nk, vp) && mha__region(cur, nq, ctx) &&
           mha__region(cur, (size_t)B * r->H * Lq, lse);
}

/* The header's shape of a module's saved forward. */
static void mha__mod_saved_shape(const mha__mod *r, int kind, int B, int Lq, int Lk, int F, int *shape)
{
    shape[0] = kind; shape[1] = B; shape[2] = r->H; shape[3] = Lq; shape[4] = Lk;
    shape[5] = r->E; shape[6] = r->Ekv; shape[7] = r->extra; shape[8] = F; shape[9] = shape[10] = 0;
}

/* Without weights, a forward whose Q, K and V would take at least this many
   floats (32 MiB) goes one head at a time: Q, K, V of one head, [B, L, D],
   and the output projection summed head by head,
       out = bo + sum_h O_h Wo[:, hD:(h+1)D]^T,
   so the workspace is about 3 B L D floats instead of 2 B L E.  The price is
   H narrower projection GEMMs (N = D), which long sequences do not notice:
   their time is in the attention, O(L^2).  A plan decides this once, from
   its maxima, so its shorter runs keep the path (and its rounding).  A
   training plan never goes head by head: its backward keeps Q, K and V of
   every head anyway.  */
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
    int rows = MHA__QCHUNK / MHA__FBR_RUN * MHA__FBR_RUN;
    if (rows < MHA__FBR_RUN) rows = MHA__FBR_RUN;
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
    L->ctx = L->lse = L->saved_floats = 0;
    if (by_head && !weights && !saves) {
        g = mha__gemm_ws_floats_mt(B * Lq, D, E, nt);
        g2 = mha__gemm_ws_floats_mt(B * Lke, D, widest, nt); if (g2 > g) g = g2;
        g2 = mha__gemm_ws_floats_mt(B * Lq, E, D, nt);       if (g2 > g) g = g2;
        return mha__region(&cur, (size_t)B * Lq * D, &L->qp) &&
               mha__region(&cur, (size_t)B * Lke * D, &L->kp) &&
               mha__region(&cur, (size_t)B * Lke * D, &L->vp) &&
               mha__attn_scratch_floats(Lq, Lk, Lke, D, D, nt, 0, B < nt, 0, &L->per_thread, &scratch) &&
               mha__region(&cur, scratch > g ? scratch : g, &L->scratch) &&
               mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
    }
    /* the projection GEMMs run on the scratch area too */
    g = mha__gemm_ws_floats_mt(B * Lq, E, E, nt);
    g2 = mha__gemm_ws_floats_mt(B * Lke, E, widest, nt); if (g2 > g) g = g2;
    if (saves) {   /* Q, K, V, C, lse: offsets into the saved region */
        size_t sc = 0;
        return mha__mod_saved_at(r, B, Lq, Lk, &sc, &L->qp, &L->kp, &L->vp, &L->ctx, &L->lse) &&
               mha__add(sc, MHA__ALIGN_FLOATS, &L->saved_floats) &&
               mha__attn_scratch_floats(Lq, Lk, Lke, D, D, nt, weights, r->H < nt, 0, &L->per_thread,
                                        &scratch) &&
               mha__region(&cur, scratch > g ? scratch : g, &L->scratch) &&
               mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
    }
    return mha__region(&cur, (size_t)L->chunk_b * L->chunk_q * E, &L->qp) &&
           mha__region(&cur, (size_t)B * Lke * r->Ekv, &L->kp) &&
           mha__region(&cur, (size_t)B * Lke * r->Ekv, &L->vp) &&
           mha__attn_scratch_floats(Lq, Lk, Lke, D, D, nt, weights, r->H < nt, 0, &L->per_thread,
                                    &scratch) &&
           mha__region(&cur, scratch > g ? scratch : g, &L->scratch) &&
           mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
}

/* The module backward.  K and V hold Lk + extra rows per batch.  qp, kp,
   vp, ctx and lse are the saved forward's: offsets into the caller's saved
   region (have_saved), or into a region at the workspace's start where the
   backward recomputes them. */
typedef struct mha__bwd_layout {
    size_t qp, kp, vp, ctx, lse, dctx, dqp, dkp, dvp, gws, total_floats;
} mha__bwd_layout;

/* gws: the projections' GEMM workspace, and the fused attention backward's
   scratch (the two are never in use at once). */
static int mha__bwd_layout_at(const mha__mod *r, int B, int Lq, int Lk, int nt, int have_saved,
                              mha__bwd_layout *L)
{
    size_t cur = 0, sc = 0, g, t, nq = (size_t)B * Lq * r->E, nk;
    int Lke = Lk + r->extra;
    nk = (size_t)B * Lke * r->Ekv;
    g = mha__linear_gws(B * Lq, r->E, r->E, nt);
    t = mha__linear_gws(B * Lk, r->kdim, r->E, nt);       if (t > g) g = t;
    t = mha__linear_gws(B * Lk, r->vdim, r->E, nt);       if (t > g) g = t;
    t = mha__fbwd_floats(B, r->H, r->Hkv, Lq, Lke, r->D, r->D, nt); if (t > g) g = t;
    return mha__mod_saved_at(r, B, Lq, Lk, have_saved ? &sc : &cur, &L->qp, &L->kp, &L->vp, &L->ctx,
                             &L->lse) &&
           mha__region(&cur, nq, &L->dctx) && mha__region(&cur, nq, &L->dqp) &&
           mha__region(&cur, nk, &L->dkp) && mha__region(&cur, nk, &L->dvp) &&
           mha__region(&cur, g, &L->gws) && mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
}

/* The module's weight rows (mha_run.rows): K of every key [B, Lk', Ekv],
   the chosen query rows [B, n, E] and their Q, a Linear's workspace, and
   a row of Lk' per thread for the head average; floats of each.  */
typedef struct mha__wrows_layout { size_t kp, xq, qp, lin, avg, total; } mha__wrows_layout;

static int mha__wrows_lay(const mha__mod *r, int B, int Lk, int n, int nt, mha__wrows_layout *L)
{
    size_t cur = 0, lk, lq;
    if ((size_t)B * (size_t)n > (size_t)MHA__INT_LIMIT) return 0;
    lk = mha__linear_gws(B * Lk, r->kdim, r->Ekv, 1);
    lq = mha__linear_gws(B * n, r->E, r->E, 1);
    return mha__region(&cur, (size_t)B * ((size_t)Lk + r->extra) * r->Ekv, &L->kp) &&
           mha__region(&cur, (size_t)B * n * r->E, &L->xq) && mha__region(&cur, (size_t)B * n * r->E, &L->qp) &&
           mha__region(&cur, lk > lq ? lk : lq, &L->lin) &&
           mha__region(&cur, (size_t)nt * ((size_t)Lk + r->extra), &L->avg) &&
           mha__add(cur, MHA__ALIGN_FLOATS, &L->total);
}

/* (defined further on, where its section is) */
static int mha__cached_floats(const mha__mod *r, int B, int Lq, int capacity, int ring, int nt, int kv16, size_t *total);

/* Floats of the module's workspace at these lengths, for what plan p
   allows: the forward (its path, the weights, chosen rows, a KV cache),
   and with MHA_PLAN_TRAINING the forward that saves and the backward. */
static int mha__module_floats(const mha_plan *p, int Lq, int Lk, size_t *floats)
{
    mha__fwd_layout F;
    mha__bwd_layout W;
    mha__wrows_layout R;
    size_t f;
    if (!mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, 0, p->by_head, p->nthreads, 0, &F)) return 0;
    *floats = F.total_floats;
    if (p->flags & MHA_PLAN_CACHE) {
        if (!mha__cached_floats(&p->mod, p->B, Lq, Lk, 1, p->nthreads, p->opt.kv_dtype != 0, &f)) return 0;
        if (f > *floats) *floats = f;
    }
    if (p->flags & MHA_PLAN_WEIGHTS) {   /* all weights: the unfused path */
        if (!mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, 1, 0, p->nthreads, 0, &F)) return 0;
        if (F.total_floats > *floats) *floats = F.total_floats;
    }
    if (p->flags & (MHA_PLAN_WEIGHTS | MHA_PLAN_ROWS)) {
        /* rows: the lse, then the fused forward or the rows' recomputation */
        if (!mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, 0, p->by_head, p->nthreads, 0, &F) ||
            !mha__wrows_lay(&p->mod, p->B, Lk, Lq, p->nthreads, &R))
            return 0;
        f = F.total_floats > R.total ? F.total_floats : R.total;
        if (!mha__add(f, mha__round_floats((size_t)p->B * p->mod.H * Lq), &f)) return 0;
        if (f > *floats) *floats = f;
    }
    if (p->flags & MHA_PLAN_TRAINING) {
        if (!mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, 0, 0, p->nthreads, 1, &F)) return 0;
        if (F.total_floats > *floats) *floats = F.total_floats;
        if (!mha__bwd_layout_at(&p->mod, p->B, Lq, Lk, p->nthreads, 0, &W)) return 0;
        if (W.total_floats > *floats) *floats = W.total_floats;
    }
    return 1;
}

/* Everything of a module plan but its memory: checks, weights, layout.
   *extra_bytes: what the plan needs after its struct (the packed panels). */
static mha_status mha__module_plan_make(const mha_module *m, int B, int Lq, int Lk,
                                        const mha_options *opt, unsigned flags, int kind,
                                        mha_plan *p, size_t *extra_bytes, mha_error *e)
{
    mha__mod r;
    mha__fwd_layout F;
    size_t n, f;
    int widest, Lke, shot = (flags & MHA__FLAG_SHOT) != 0;
    mha_status st;
    flags &= ~MHA__FLAG_SHOT;
    *extra_bytes = 0;
    memset(p, 0, sizeof *p);
    if ((st = mha__check_module(m, &r, kind == MHA__PLAN_ENCODER ? 2 : 1, e)) != MHA_OK) return st;
    if ((st = mha__pos(e, "B", B)) != MHA_OK || (st = mha__pos(e, kind == MHA__PLAN_ENCODER ? "L" : "Lq", Lq)) != MHA_OK ||
        (st = mha__pos(e, kind == MHA__PLAN_ENCODER ? "L" : "Lk", Lk)) != MHA_OK)
        return st;
    if (!mha__dim_ok(Lk)) goto overflow;
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
        goto overflow;
    st = mha__plan_begin(p, kind, opt, flags, MHA_PLAN_WEIGHTS | MHA_PLAN_TRAINING | MHA_PLAN_PACK |
                         (kind == MHA__PLAN_MODULE ? MHA_PLAN_CACHE | MHA_PLAN_ROWS : 0u), B, r.H, Lq, Lk, e);
    if (st != MHA_OK) return st;
    if ((st = mha__check_decode(&p->opt, r.H, m->num_kv_heads, MHA__MF(kind == MHA__PLAN_ENCODER ? 2 : 1, "num_kv_heads"),
                                &m->rope, kind == MHA__PLAN_ENCODER ? 2 : 1, r.D, Lq, Lk, e)) != MHA_OK)
        return st;
    if (p->opt.num_kv_heads != 0 && p->opt.num_kv_heads != r.Hkv)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "opt->num_kv_heads", "is %d; a module takes its KV heads "
                         "from m->num_kv_heads (%d): leave it 0", p->opt.num_kv_heads, r.Hkv);
    p->D = p->Dv = r.D;
    if (r.wdt) {   /* 16-bit weights are read once, widened into the packed panels */
        const char *fw = MHA__MF(kind == MHA__PLAN_ENCODER ? 2 : 1, "weight_dtype");
        if (kind == MHA__PLAN_ENCODER)
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, fw, "is %s; an encoder layer takes float32 weights",
                             mha__dtype_name((mha_dtype)r.wdt));
        if (!(flags & MHA_PLAN_PACK) || (flags & MHA_PLAN_TRAINING))
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, fw, "is %s; 16-bit weights are widened as a plan packs "
                             "them: %s", mha__dtype_name((mha_dtype)r.wdt), (flags & MHA_PLAN_TRAINING) ?
                             "forward only (not with MHA_PLAN_TRAINING)" : shot ? "a one-shot call packs nothing; "
                             "make a plan with MHA_PLAN_PACK" : "make the plan with MHA_PLAN_PACK");
    }
    if ((flags & MHA_PLAN_PACK) && mha__pack_bytes(&r, extra_bytes) != MHA_OK) goto overflow;
    p->mod = r;
    /* (head by head reads the weights unpacked: not for 16-bit ones) */
    p->by_head = !(flags & MHA_PLAN_TRAINING) && !r.wdt &&
                 (double)B * ((double)Lq + 2.0 * Lke) * r.E >= (double)MHA__BY_HEAD_FLOATS;
    p->cache_ok = r.kdim == r.E && r.vdim == r.E && r.extra == 0;
    if ((flags & MHA_PLAN_CACHE) && !p->cache_ok)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, shot ? "run->cache" : "flags", "%s, but a KV cache serves "
                         "plain self-attention only: kdim and vdim must be embed_dim, no bias_k or add_zero_attn",
                         shot ? "is set" : "has MHA_PLAN_CACHE");
    if (!mha__module_floats(p, Lq, Lk, &f)) goto overflow;
    p->mod_floats = f;
    if ((flags & MHA_PLAN_TRAINING) && !mha__fwd_layout_at(&r, B, Lq, Lk, 0, 0, p->nthreads, 1, &F)) goto overflow;
    return mha__plan_ws(p, f, (flags & MHA_PLAN_TRAINING) ? F.saved_floats : 0, e);
overflow:   /* name the length (or the batch) that takes the sizes past the limits */
    return mha__fail(e, MHA_ERR_OVERFLOW,
                     (size_t)B * (size_t)Lq > MHA__INT_LIMIT || !mha__dim_ok(Lq) ? (kind == MHA__PLAN_ENCODER ? "L" : "Lq")
                     : !mha__dim_ok(Lk) || (size_t)B * ((size_t)Lk + r.extra) > MHA__INT_LIMIT ? (kind == MHA__PLAN_ENCODER ? "L" : "Lk")
                     : "B", "B %d, Lq %d, Lk %d with embed_dim %d: a tensor or the workspace passes the size limits "
                     "(rows B*L at most %d)", B, Lq, Lk, r.E, MHA__INT_LIMIT);
}

/* The header's shape of an encoder's saved forward: the module's, F, and the
   layer's configuration (a post-norm region is not a pre-norm layer's). */
static void mha__enc_saved_shape(const mha_plan *p, int L, int *shape)
{
    float eps = p->enc.layer_norm_eps > 0.0f ? p->enc.layer_norm_eps : 1e-5f;
    mha__mod_saved_shape(&p->mod, MHA__PLAN_ENCODER, p->B, L, L, p->enc.dim_feedforward, shape);
    shape[9] = p->enc.norm_first + 2 * (int)p->enc.activation;
    memcpy(&shape[10], &eps, sizeof eps);
}

/* The floats of a module saved forward (its header included). */
static size_t mha__mod_saved_floats(const mha__mod *r, int B, int Lq, int Lk)
{
    size_t cur = 0, q, k, v, c, l;
    (void)mha__mod_saved_at(r, B, Lq, Lk, &cur, &q, &k, &v, &c, &l);   /* checked by the plan */
    return cur;
}

/* -------------------------------------------- forward and backward */

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
    const mha__rowout *rs;             /* forward: the caller's row outputs, or NULL */
    float *lse;                        /* forward: an lse buffer of its own (rows), or NULL */
    float *dquery, *dkey, *dvalue;     /* backward, added to (each may be NULL) */
    const mha_module_grad *grad;       /* backward, added to */
    float *sinks_grad;                 /* backward, added to, or NULL */
    float *ws;
    float *sv;                         /* the saved forward: the forward writes it (saves), the
                                          backward reads it (use_saved) or recomputes into it */
    int use_saved;
} mha__run;

/* (defined further on, where its section is) */
static void mha__rope_apply(const mha_rope *r, int D, int B, int L, int nh, size_t bs, size_t ts,
                            size_t hs, int pos0, const int *positions, float sign, float *x);
static int mha__query_pos0(const mha_options *opt, int Lq, int Lk);

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
    mha__attn_stats(&a, c->lse, c->rs);
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
    int saves = c->sv != NULL;
    float *base = saves ? c->sv : c->ws;   /* Q, K, V (and C, lse) live in the saved forward */
    float *qp = base + L->qp, *kp = base + L->kp, *vp = base + L->vp, *scratch = c->ws + L->scratch;
    float *ctx = saves ? c->sv + L->ctx : NULL;

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
    mha__attn_stats(&a, saves ? c->sv + L->lse : c->lse, c->rs);
    for (b = 0; b < B; b += L->chunk_b) {
        int q0;
        a.b0 = b;
        a.nb = B - b < L->chunk_b ? B - b : L->chunk_b;
        for (q0 = 0; q0 < Lq; q0 += L->chunk_q) {
            size_t first = ((size_t)b * Lq + q0) * E;   /* offset of the chunk in query/out */
            int rows;
            /* saving: Q and C of every row stay, each chunk at its rows */
            float *qc = saves ? qp + first : qp, *oc = saves ? ctx + first : qc;
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
}

/* The layout of this run's lengths and path (within the plan's). */
static void mha__fwd_layout_run(const mha__run *c, mha__fwd_layout *L)
{
    (void)mha__fwd_layout_at(c->r, c->B, c->Lq, c->Lk, c->weights != NULL, c->p->by_head,
                             c->p->nthreads, c->sv != NULL, L);
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
    float *ws = c->ws, *sv, *qp, *kp, *vp, *ctx, *dctx, *dqp, *dkp, *dvp, *gws;
    float *gwq, *gwk, *gwv, *gbq, *gbk, *gbv;
    size_t nq, nk;
    int E = r->E, Ekv = r->Ekv, B = c->B, Lq = c->Lq, Lk = c->Lk, Lke = c->Lke, nt = c->p->nthreads;

    (void)mha__bwd_layout_at(r, B, Lq, Lk, nt, c->use_saved, &L);
    nq = (size_t)B * Lq * E; nk = (size_t)B * Lke * Ekv;
    sv = c->use_saved ? c->sv : ws;   /* the saved forward, or the region it is recomputed into */
    qp = sv + L.qp; kp = sv + L.kp; vp = sv + L.vp; ctx = sv + L.ctx; dctx = ws + L.dctx;
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
    a.sinks_grad = c->sinks_grad;
    mha__attend_backward_fused(&a, dctx, c->use_saved ? sv + L.lse : NULL, dqp, dkp, dvp, gws);

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
   for an encoder run, ENCODER). */
static mha_status mha__module_run_begin(const mha_plan *p, int kind, int Lq, int Lk,
                                        const float *query, const float *key, const float *value,
                                        const mha_run *run, unsigned allowed, mha_options *o, mha__run *c,
                                        mha_error *e)
{
    mha_status st;
    memset(c, 0, sizeof *c);
    if ((st = mha__run_begin(p, kind, Lq, Lk, run, allowed, o, e)) != MHA_OK) return st;
    if (kind == MHA__PLAN_ENCODER) {
        if ((st = mha__need(e, "x", query)) != MHA_OK) return st;
    } else if ((st = mha__need(e, "query", query)) != MHA_OK) {
        return st;
    } else if (!(run && run->cache) &&
               ((st = mha__need(e, "key", key)) != MHA_OK || (st = mha__need(e, "value", value)) != MHA_OK)) {
        return st;
    }
    c->p = p; c->r = &p->mod; c->o = o;
    c->B = p->B; c->Lq = Lq; c->Lk = Lk; c->Lke = Lk + p->mod.extra;
    c->query = query; c->key = key; c->value = value;
    return MHA_OK;
}

/* The weights of the chosen rows (mha_run.rows) after a module forward
   whose lse is at lse: K projected for every key, Q for the chosen rows
   only (RoPE at their positions), then the forward's scores and
   exp(s - lse) row by row (mha__rows_weights).  ws: a mha__wrows_layout. */
static void mha__module_rows(const mha__run *c, const mha_run *run, const float *lse, float *ws)
{
    const mha__mod *r = c->r;
    mha__wrows_layout L;
    mha__attn a;
    mha__rows_args g;
    int B = c->B, n = run->n_rows, E = r->E, Ekv = r->Ekv, D = r->D, nt = c->p->nthreads, b, i, pos0;
    float *kp, *xq, *qp, *lin;
    (void)mha__wrows_lay(r, B, c->Lk, n, nt, &L);
    kp = ws + L.kp; xq = ws + L.xq; qp = ws + L.qp; lin = ws + L.lin;
    /* 1. K = Xk Wk^T + bk with the appended rows; RoPE on the real keys */
    mha__kv_project(B, c->Lk, r->kdim, Ekv, c->key, r->wk, r->bk, r->bias_k, r->zero_attn, kp, lin, 1, r->pk);
    mha__rope_apply(&r->rope, D, B, c->Lk, r->Hkv, (size_t)c->Lke * Ekv, (size_t)Ekv, (size_t)D,
                    c->o->position_offset, NULL, 1.0f, kp);
    /* 2. Q of the chosen rows, RoPE at their positions offset + i' */
    for (b = 0; b < B; ++b)
        for (i = 0; i < n; ++i)
            memcpy(xq + ((size_t)b * n + i) * E, c->query + ((size_t)b * c->Lq + run->rows[i]) * E,
                   (size_t)E * sizeof(float));
    mha__linear_pp(B * n, E, E, xq, r->wq, r->bq, qp, lin, 1, r->pq);
    pos0 = mha__query_pos0(c->o, c->Lq, c->Lk);
    for (b = 0; b < B; ++b)
        for (i = 0; i < n; ++i)
            mha__rope_apply(&r->rope, D, 1, 1, r->H, 0, (size_t)E, (size_t)D, pos0 + run->rows[i], NULL, 1.0f,
                            qp + ((size_t)b * n + i) * E);
    /* 3. the rows' weights, per head or averaged */
    mha__attn_common(&a, c->o, B, r->H, c->Lq, c->Lk, c->Lke, D, D);
    a.Hkv = r->Hkv; a.group = r->H / r->Hkv;
    g.q = qp; g.k = kp; g.k16 = NULL; g.kdt = 0; g.lse = lse;
    g.qbs = (size_t)n * E; g.qrs = (size_t)E; g.qhs = (size_t)D;
    g.kbs = (size_t)c->Lke * Ekv; g.krs = (size_t)Ekv; g.khs = (size_t)D;
    g.n = n; g.Lk = c->Lke; g.D = D; g.rows = run->rows; g.qrow_of_r = 1;
    mha__rows_weights(&a, &g, c->o->per_head_weights != 0, run->weights, ws + L.avg);
}

/* (defined further on, where its section is) */
static mha_status mha__module_cached(const mha_plan *p, int Lq, const float *x, const float *key,
                                     const float *value, float *out, const mha_run *run,
                                     const mha_options *o, mha_error *e);

static mha_status mha__module_run_forward(const mha_plan *p, int Lq, int Lk,
                                          const float *query, const float *key, const float *value,
                                          float *out, const mha_run *run, mha_error *err)
{
    mha_options o;
    mha__fwd_layout L;
    mha__wrows_layout R;
    mha__rowout ro;
    mha__run c;
    void *owned, *copy = NULL;
    size_t need, lse_region = 0, nq, nk, nv;
    int rows = run && run->n_rows > 0;
    float *ws = NULL;
    mha_status st;
    st = mha__module_run_begin(p, MHA__PLAN_MODULE, Lq, Lk, query, key, value, run,
                               MHA__RF_SAVED | MHA__RF_MASKS | MHA__RF_CACHE | MHA__RF_WEIGHTS | MHA__RF_STATS,
                               &o, &c, err);
    if (st == MHA_OK) st = mha__need(err, "out", out);
    if (st == MHA_OK) st = mha__run_weights_ok(p, run, err);
    if (st == MHA_OK && run && run->cache)
        return mha__module_cached(p, Lq, query, key, value, out, run, &o, err);
    if (st == MHA_OK) st = mha__rows_ok(run, Lq, err);
    nq = (size_t)p->B * Lq * p->mod.E; nk = (size_t)p->B * Lk * p->mod.kdim; nv = (size_t)p->B * Lk * p->mod.vdim;
    if (st == MHA_OK && rows && (mha__overlap(out, nq, query, nq) || mha__overlap(out, nq, key, nk)))
        st = mha__fail(err, MHA_ERR_INVALID_ARGUMENT, "run->rows", "are recomputed from query and key after the "
                       "forward, but out overlaps %s", mha__overlap(out, nq, query, nq) ? "query" : "key");
    if (st != MHA_OK) return st;
    c.out = out;
    c.weights = rows ? NULL : run ? run->weights : NULL;
    c.rs = mha__run_rowout(run, &ro);
    /* this run's layout: its path, and Q, K, V, C, lse in the saved forward when it saves */
    (void)mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, c.weights != NULL, p->by_head, p->nthreads,
                             run && run->saved, &L);   /* within the plan's */
    if (run && run->saved && (st = mha__run_saved(p, run, L.saved_floats, &c.sv, err)) != MHA_OK) return st;
    need = L.total_floats;
    if (rows) {
        (void)mha__wrows_lay(&p->mod, p->B, Lk, run->n_rows, p->nthreads, &R);
        if (R.total > need) need = R.total;
        if (!run->lse && !c.sv) lse_region = mha__round_floats((size_t)p->B * p->mod.H * Lq);
    }
    if ((st = mha__run_ws(p, run, lse_region + need, &owned, &ws, err)) != MHA_OK) return st;
    c.ws = ws + lse_region;
    c.lse = lse_region ? ws : NULL;
    if (p->by_head && !c.weights) {   /* out is written before the inputs are read */
        const float *x[3];
        size_t n[3];
        x[0] = query; x[1] = key; x[2] = value;
        n[0] = nq; n[1] = nk; n[2] = nv;
        if ((st = mha__copy_aliased(out, n[0], x, n, &copy)) != MHA_OK) {
            if (owned) MHA_FREE(owned);
            return mha__fail(err, st, "out", "overlaps an input and its copy could not be allocated");
        }
        c.query = x[0]; c.key = x[1]; c.value = x[2];
    }
    mha__module_forward(&c);
    if (c.sv) {
        int shape[MHA__SAVED_WORDS - 1];
        mha__mod_saved_shape(&p->mod, MHA__PLAN_MODULE, p->B, Lq, Lk, 0, shape);
        mha__saved_stamp(c.sv, shape);
    }
    if (rows) mha__module_rows(&c, run, run->lse ? run->lse : c.sv ? c.sv + L.lse : ws, c.ws);
    if (copy) MHA_FREE(copy);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

static mha_status mha__module_run_backward(const mha_plan *p, int Lq, int Lk,
                                           const float *query, const float *key, const float *value,
                                           const float *dout, float *dquery, float *dkey,
                                           float *dvalue, const mha_module_grad *grad,
                                           const mha_run *run, mha_error *err)
{
    mha_options o;
    mha_module_grad nog;
    mha__bwd_layout L;
    mha__fwd_layout F;
    mha__run c;
    void *owned;
    mha_status st;
    st = mha__module_run_begin(p, MHA__PLAN_MODULE, Lq, Lk, query, key, value, run,
                               MHA__RF_SAVED | MHA__RF_MASKS | MHA__RF_SINKS, &o, &c, err);
    if (st == MHA_OK) st = mha__need(err, "dout", dout);
    if (st == MHA_OK && !(p->flags & MHA_PLAN_TRAINING))
        st = mha__fail(err, MHA_ERR_EXCEEDS_PLAN, "plan", "was made without MHA_PLAN_TRAINING: it has no backward");
    if (st == MHA_OK && run && run->saved) {
        int shape[MHA__SAVED_WORDS - 1];
        (void)mha__fwd_layout_at(&p->mod, p->B, Lq, Lk, 0, 0, p->nthreads, 1, &F);
        mha__mod_saved_shape(&p->mod, MHA__PLAN_MODULE, p->B, Lq, Lk, 0, shape);
        if ((st = mha__run_saved(p, run, F.saved_floats, &c.sv, err)) == MHA_OK)
            st = mha__saved_check(c.sv, shape, err);
    }
    if (st != MHA_OK) return st;
    if (!grad) { memset(&nog, 0, sizeof nog); grad = &nog; }
    c.use_saved = c.sv != NULL;
    (void)mha__bwd_layout_at(&p->mod, p->B, Lq, Lk, p->nthreads, c.use_saved, &L);   /* within the plan's */
    if ((st = mha__run_ws(p, run, L.total_floats, &owned, &c.ws, err)) != MHA_OK) return st;
    c.dout = dout; c.dquery = dquery; c.dkey = dkey; c.dvalue = dvalue; c.grad = grad;
    c.sinks_grad = run ? run->sinks_grad : NULL;
    mha__module_backward(&c);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* ---------------------------------------------- public: the module */

MHADEF mha_status mha_module_forward(const mha_module *m, int B, int Lq, int Lk,
                                     const float *query, const float *key, const float *value,
                                     const mha_options *opt, float *out,
                                     const mha_run *run, mha_error *err)
{
    mha_plan p;
    mha__shot s;
    mha_status st;
    mha__begin(err);
    memset(&s, 0, sizeof s);
    s.kind = MHA__PLAN_MODULE; s.flags = mha__shot_flags(run); s.m = m; s.B = B; s.Lq = Lq;
    if ((st = mha__shot_lk(run, Lk, &s.Lk, err)) == MHA_OK && (st = mha__oneshot(&s, opt, run, &p, err)) == MHA_OK)
        st = mha__module_run_forward(&p, Lq, Lk, query, key, value, out, run, err);
    return mha__sign(err, "mha_module_forward", st);
}

MHADEF mha_status mha_module_backward(const mha_module *m, int B, int Lq, int Lk,
                                      const float *query, const float *key, const float *value,
                                      const float *dout, const mha_options *opt,
                                      float *dquery, float *dkey, float *dvalue,
                                      const mha_module_grad *grad, const mha_run *run,
                                      mha_error *err)
{
    mha_plan p;
    mha__shot s;
    mha_status st;
    mha__begin(err);
    memset(&s, 0, sizeof s);
    s.kind = MHA__PLAN_MODULE; s.flags = MHA_PLAN_TRAINING; s.m = m; s.B = B; s.Lq = Lq; s.Lk = Lk;
    if ((st = mha__oneshot(&s, opt, run, &p, err)) == MHA_OK)
        st = mha__module_run_backward(&p, Lq, Lk, query, key, value, dout, dquery, dkey, dvalue, grad, run, err);
    return mha__sign(err, "mha_module_backward", st);
}

MHADEF mha_status mha_module_plan_size(const mha_module *m, int B, int Lq, int Lk,
                                       const mha_options *opt, unsigned flags, mha_sizes *sizes,
                                       mha_error *err)
{
    mha_plan p;
    size_t extra = 0;
    mha_status st;
    mha__begin(err);
    if (!sizes) return mha__sign(err, "mha_module_plan_size", mha__need(err, "sizes", sizes));
    st = mha__module_plan_make(m, B, Lq, Lk, opt, flags, MHA__PLAN_MODULE, &p, &extra, err);
    return mha__sign(err, "mha_module_plan_size", mha__plan_out(st, &p, extra, NULL, 0, NULL, sizes, err));
}

MHADEF mha_status mha_module_plan(const mha_module *m, int B, int Lq, int Lk,
                                  const mha_options *opt, unsigned flags,
                                  void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err)
{
    mha_plan p;
    size_t extra = 0;
    mha_status st;
    mha__begin(err);
    if (!plan) return mha__sign(err, "mha_module_plan", mha__need(err, "plan", plan));
    st = mha__module_plan_make(m, B, Lq, Lk, opt, flags, MHA__PLAN_MODULE, &p, &extra, err);
    return mha__sign(err, "mha_module_plan", mha__plan_out(st, &p, extra, mem, mem_bytes, plan, NULL, err));
}

MHADEF mha_status mha_module_run_forward(const mha_plan *p, int Lq, int Lk,
                                         const float *query, const float *key, const float *value,
                                         float *out, const mha_run *run, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_module_run_forward", mha__module_run_forward(p, Lq, Lk, query, key, value, out, run, err));
}

MHADEF mha_status mha_module_run_backward(const mha_plan *p, int Lq, int Lk,
                                          const float *query, const float *key, const float *value,
                                          const float *dout, float *dquery, float *dkey,
                                          float *dvalue, const mha_module_grad *grad,
                                          const mha_run *run, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_module_run_backward", mha__module_run_backward(p, Lq, Lk, query, key, value, dout, dquery, dkey, dvalue, grad, run, err));
}

/* ====================================================================== 7
   DECODING
   Rotary position embedding, the caller's KV cache (append, rolling
   buffers, attention over it as SDPA and as the module's decoding step),
   and merging attention computed over disjoint key sets.
   ====================================================================== */

/* ------------------------------------------------------------ RoPE */

/* RoPE settings: kind in the enum, rotary_dim even and <= D, theta >= 0 finite.
   who: how the caller names the struct (0 "rope->", 1 "m->rope.",
   2 "layer->self_attn.rope."). */
static mha_status mha__check_rope(const mha_rope *r, int D, int who, mha_error *e)
{
    if (r->kind != MHA_ROPE_NONE && r->kind != MHA_ROPE_HALF && r->kind != MHA_ROPE_INTERLEAVED)
        return mha__fail(e, MHA_ERR_BAD_ENUM, who == 2 ? "layer->self_attn.rope.kind" : who ? "m->rope.kind" : "rope->kind",
                         "is %d, not an mha_rope_kind (0..2)", (int)r->kind);
    if (r->rotary_dim < 0 || r->rotary_dim % 2 != 0 || r->rotary_dim > D)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, who == 2 ? "layer->self_attn.rope.rotary_dim" : who ? "m->rope.rotary_dim" : "rope->rotary_dim",
                         "is %d; expected 0 or an even number <= the head dimension %d", r->rotary_dim, D);
    if (r->kind != MHA_ROPE_NONE && r->rotary_dim == 0 && D % 2 != 0)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, who == 2 ? "layer->self_attn.rope.rotary_dim" : who ? "m->rope.rotary_dim" : "rope->rotary_dim",
                         "is 0 (all of D) but the head dimension %d is odd", D);
    if (!(r->theta >= 0.0f) || r->theta == INFINITY)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, who == 2 ? "layer->self_attn.rope.theta" : who ? "m->rope.theta" : "rope->theta",
                         "is %g; expected 0 (10000) or a positive finite base", (double)r->theta);
    return MHA_OK;
}

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
                                   const int *positions, float *x, float sign, mha_error *e)
{
    mha_status st;
    size_t n, i;
    if (!rope || !x) return mha__fail(e, MHA_ERR_NULL_POINTER, !rope ? "rope" : sign > 0 ? "x" : "dx", "is NULL");
    if (B <= 0 || H <= 0 || L <= 0 || D <= 0)
        return mha__fail(e, MHA_ERR_INVALID_SIZE, B <= 0 ? "B" : H <= 0 ? "H" : L <= 0 ? "L" : "D",
                         "is %d; expected >= 1", B <= 0 ? B : H <= 0 ? H : L <= 0 ? L : D);
    if (!mha__mul3((size_t)B * (size_t)H, (size_t)L, (size_t)D, &n) || !mha__mul(n, sizeof(float), &n))
        return mha__fail(e, MHA_ERR_OVERFLOW, "B", "B*H*L*D floats do not fit in size_t");
    if ((st = mha__check_rope(rope, D, 0, e)) != MHA_OK) return st;
    if (pos0 < 0) return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "pos0", "is %d; expected >= 0", pos0);
    if (!positions && pos0 > INT_MAX - L)
        return mha__fail(e, MHA_ERR_OVERFLOW, "pos0", "is %d; with L %d the last position passes INT_MAX", pos0, L);
    for (i = 0; positions && i < (size_t)B * L; ++i)
        if (positions[i] < 0)
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "positions", "[%lu] is %d; expected >= 0",
                             (unsigned long)i, positions[i]);
    mha__rope_apply(rope, D, B, L, H, (size_t)H * L * D, (size_t)D, (size_t)L * D, pos0, positions, sign, x);
    return MHA_OK;
}

/* ----------------------------------------- merging split attention */

/* The merge of one row (mha_attn_merge): a NaN lse anywhere makes the row
   NaN (a NaN query must not vanish as "no key"); all -inf is "no key". */
static void mha__merge_row(int nparts, size_t r, int Dv, const float *const *outs,
                           const float *const *lses, float *o, float *lse)
{
    /* m = max_p lse_p;  lse = m + log sum_p exp(lse_p - m);  w_p = exp(lse_p - lse) */
    double m = -INFINITY, sum = 0.0, total;
    int p, d, nan = 0;
    for (p = 0; p < nparts; ++p) {
        float l = lses[p][r];
        if (l != l) nan = 1;
        else if (l > m) m = l;
    }
    if (nan) {
        for (d = 0; d < Dv; ++d) o[d] = NAN;
        if (lse) lse[r] = NAN;
        return;
    }
    if (m == -INFINITY) {
        for (d = 0; d < Dv; ++d) o[d] = 0.0f;
        if (lse) lse[r] = -INFINITY;
        return;
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

/* ---------------------------------------------------- the KV cache */

/* mha_convert's loops: float32 <-> 16 bits by the tier's vector
   conversions; between the two 16-bit types through float32, a block at
   a time (widening is exact, so this rounds once; in place is safe, as
   each block is read whole before it is written). */
static void mha__convert(size_t n, int from, const void *src, int to, void *dst)
{
    float buf[256];
    size_t i, m;
    if (from == to) {
        if (src != dst) memcpy(dst, src, n * mha_dtype_size((mha_dtype)from));
    } else if (from == MHA_F32) {
        mha__cvt_to16(MHA__CAST(uint16_t *, dst), MHA__CAST(const float *, src), to, n);
    } else if (to == MHA_F32) {
        mha__cvt_from16(MHA__CAST(float *, dst), MHA__CAST(const uint16_t *, src), from, n);
    } else {
        for (i = 0; i < n; i += m) {
            m = n - i < 256 ? n - i : 256;
            mha__cvt_from16(buf, MHA__CAST(const uint16_t *, src) + i, from, m);
            mha__cvt_to16(MHA__CAST(uint16_t *, dst) + i, buf, to, m);
        }
    }
}

static mha_status mha__check_cache(const mha_kv_cache *c, mha_error *e)
{
    size_t n;
    int b;
    mha_status st;
    if (!c) return mha__fail(e, MHA_ERR_NULL_POINTER, "cache", "is NULL");
    if (!c->k || !c->v || !c->len)
        return mha__fail(e, MHA_ERR_NULL_POINTER, !c->k ? "cache->k" : !c->v ? "cache->v" : "cache->len", "is NULL");
    if ((st = mha__pos(e, "cache->B", c->B)) != MHA_OK || (st = mha__pos(e, "cache->Hkv", c->Hkv)) != MHA_OK ||
        (st = mha__pos(e, "cache->D", c->D)) != MHA_OK || (st = mha__pos(e, "cache->capacity", c->capacity)) != MHA_OK)
        return st;
    if ((int)c->dtype < MHA_F32 || (int)c->dtype > MHA_BF16)
        return mha__fail(e, MHA_ERR_BAD_ENUM, "cache->dtype", "is %d; expected MHA_F32 (0), MHA_F16 (1) or "
                         "MHA_BF16 (2)", (int)c->dtype);
    if (!mha__mul3((size_t)c->B * (size_t)c->Hkv, (size_t)c->capacity, (size_t)c->D, &n) ||
        !mha__mul(n, sizeof(float), &n) || !mha__dim_ok(c->capacity) || !mha__dim_ok(c->D))
        return mha__fail(e, MHA_ERR_OVERFLOW, "cache->capacity", "B*Hkv*capacity*D floats pass the size limits");
    if (c->ring && (c->n_keep < 0 || c->n_keep >= c->capacity))
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "cache->n_keep", "is %d; expected 0 <= n_keep < capacity %d",
                         c->n_keep, c->capacity);
    for (b = 0; b < c->B; ++b)
        if (c->len[b] < 0 || (!c->ring && c->len[b] > c->capacity))
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "cache->len", "[%d] is %d; expected 0..capacity %d", b,
                             c->len[b], c->capacity);
    return MHA_OK;
}

/* The slot of token t (the ring's rule; t itself without a ring) */
static int mha__cache_slot(const mha_kv_cache *c, int t)
{
    if (!c->ring || t < c->n_keep) return t;
    return c->n_keep + (t - c->n_keep) % (c->capacity - c->n_keep);
}

/* Room for n more tokens in every row? */
static mha_status mha__cache_room(const mha_kv_cache *c, int n, mha_error *e)
{
    int b;
    for (b = 0; b < c->B; ++b)
        if (c->len[b] > INT_MAX - n)
            return mha__fail(e, MHA_ERR_OVERFLOW, "cache->len", "[%d] is %d; %d more tokens pass INT_MAX", b,
                             c->len[b], n);
    /* a ring takes any chunk that fits, or one that wraps but is no longer
       than its rolling part (else the chunk would overwrite itself) */
    for (b = 0; b < c->B; ++b)
        if (n > c->capacity - c->len[b] && (!c->ring || n > c->capacity - c->n_keep))
            return mha__fail(e, MHA_ERR_CAPACITY, "cache->len", "[%d] is %d of capacity %d: no room for %d more "
                             "tokens%s", b, c->len[b], c->capacity, n,
                             c->ring ? " (a ring's chunk must fit its rolling part)" : "");
    return MHA_OK;
}

/* Copy n tokens of every row into the cache at len[b], converted to its
   dtype; token t of row b, KV head g is at k + b*bs + g*hs + t*ts.
   len += n.  */
static void mha__cache_write(mha_kv_cache *c, int n, const float *k, const float *v, size_t bs, size_t hs,
                             size_t ts)
{
    int b, g, t, D = c->D;
    for (b = 0; b < c->B; ++b) {
        for (g = 0; g < c->Hkv; ++g)
            for (t = 0; t < n; ++t) {
                size_t dst = (((size_t)b * c->Hkv + g) * c->capacity + mha__cache_slot(c, c->len[b] + t)) * D;
                size_t src = (size_t)b * bs + (size_t)g * hs + (size_t)t * ts;
                if (c->dtype != MHA_F32) {
                    mha__cvt_to16(MHA__CAST(uint16_t *, c->k) + dst, k + src, (int)c->dtype, (size_t)D);
                    mha__cvt_to16(MHA__CAST(uint16_t *, c->v) + dst, v + src, (int)c->dtype, (size_t)D);
                } else {
                    memcpy(MHA__CAST(float *, c->k) + dst, k + src, (size_t)D * sizeof(float));
                    memcpy(MHA__CAST(float *, c->v) + dst, v + src, (size_t)D * sizeof(float));
                }
            }
        c->len[b] += n;
    }
}

/* A ring row is attended in up to three runs of slots with consecutive
   positions, merged by their log-sum-exp: [H, Lq, D] outputs and [H, Lq]
   lse, entropy, max and first weight of each, after the attention scratch.  */
static size_t mha__ring_floats(int ring, int H, int Lq, int D)
{
    return ring ? 3 * mha__round_floats((size_t)H * Lq * ((size_t)D + 4)) : 0;
}

/* The scratch of an attention over a cache of capacity keys, one batch
   row at a time (the plan sizes it with ring = 1). */
static int mha__cache_attend_floats(int H, int Lq, int capacity, int D, int ring, int nt, int kv16, size_t *per_thread,
                                    size_t *total)
{
    return mha__attn_scratch_floats(Lq, capacity, capacity, D, D, nt, 0, H < nt, kv16, per_thread, total) &&
           mha__add(*total, mha__ring_floats(ring, H, Lq, D), total) &&
           mha__add(*total, MHA__ALIGN_FLOATS, total);
}

/* What a run over a cache needs of it: the plan's batch, KV heads and head
   width, a capacity within the plan's Lk, no masks, and each row holding
   the Lq queries as its newest tokens (after the append, for a module). */
static mha_status mha__cache_fits(const mha_plan *p, const mha_kv_cache *c, int Hkv, const mha_options *o,
                                  mha_error *e)
{
    mha_status st;
    if ((st = mha__check_cache(c, e)) != MHA_OK) return st;
    if (c->B != p->B) return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "cache->B", "is %d; the plan's B is %d", c->B, p->B);
    if (c->dtype != p->opt.kv_dtype)
        return mha__fail(e, MHA_ERR_DTYPE, "cache->dtype", "is %s; the plan was made for a cache of %s "
                         "(opt->kv_dtype)", mha__dtype_name(c->dtype), mha__dtype_name(p->opt.kv_dtype));
    if (c->Hkv != Hkv)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "cache->Hkv", "is %d; the plan has %d KV heads", c->Hkv, Hkv);
    if (c->D != p->D || p->D != p->Dv)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "cache->D", "is %d; the plan's head width is %d (and Dv %d)",
                         c->D, p->D, p->Dv);
    if (c->capacity > p->Lk)
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "cache->capacity", "is %d; the plan's Lk (the most keys a run "
                         "attends to) is %d", c->capacity, p->Lk);
    if (o->attn_mask.kind != MHA_MASK_NONE || o->key_padding_mask.kind != MHA_MASK_NONE)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, o->attn_mask.kind != MHA_MASK_NONE ? "opt->attn_mask" :
                         "opt->key_padding_mask", "is set; a run over a KV cache takes no masks (use causal, "
                         "a window, or the cache's len)");
    return MHA_OK;
}

/* Every row holds its Lq queries as its newest tokens: Lq <= len[b], and
   a ring that wrapped still holds them all. */
static mha_status mha__cache_holds(const mha_kv_cache *c, int Lq, mha_error *e)
{
    int b;
    for (b = 0; b < c->B; ++b) {
        if (c->len[b] < Lq)
            return mha__fail(e, MHA_ERR_CAPACITY, "cache->len", "[%d] is %d; the %d queries must be the newest "
                             "tokens of the row, appended already", b, c->len[b], Lq);
        if (c->ring && c->len[b] > c->capacity && Lq > c->capacity - c->n_keep)
            return mha__fail(e, MHA_ERR_CAPACITY, "cache->capacity", "is %d with n_keep %d; a wrapped ring holds "
                             "fewer than the %d queries", c->capacity, c->n_keep, Lq);
    }
    return MHA_OK;
}

/* Attention of row b's queries against its slots s0..s0+n-1, which hold
   consecutive positions p0..p0+n-1; query i is at position qpos0 + i, so
   key j is allowed as j <= i + (qpos0 - p0) says (causal_off), and ALiBi
   and the window measure the same distance.  */
static void mha__cache_run_part(const mha_kv_cache *c, int b, int H, int Lq, const mha_options *opt,
                                const mha__view *q, float *o, size_t o_hs, size_t o_rs, float *lse,
                                const mha__rowout *rs, int s0, int n, int p0, int qpos0, int with_sinks, float *ws, size_t per_thread)
{
    mha__attn a;
    int D = c->D;
    mha__attn_common(&a, opt, 1, H, Lq, n, n, D, D);
    a.causal_off = (ptrdiff_t)qpos0 - p0;
    a.Hkv = c->Hkv; a.group = H / c->Hkv;
    a.q.p = q->p + (size_t)b * q->bs; a.q.bs = 0; a.q.hs = q->hs; a.q.rs = q->rs;
    if (c->dtype != MHA_F32) {   /* 16 bits: the kernels widen as they read */
        a.k.h = MHA__CAST(const uint16_t *, c->k) + ((size_t)b * c->Hkv * c->capacity + s0) * D;
        a.v.h = MHA__CAST(const uint16_t *, c->v) + ((size_t)b * c->Hkv * c->capacity + s0) * D;
        a.k.p = a.v.p = NULL;
        a.k.dt = a.v.dt = (int)c->dtype;
    } else {
        a.k.p = MHA__CAST(const float *, c->k) + ((size_t)b * c->Hkv * c->capacity + s0) * D;
        a.v.p = MHA__CAST(const float *, c->v) + ((size_t)b * c->Hkv * c->capacity + s0) * D;
    }
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
                                 const mha__rowout *out, size_t off)
{
    size_t r;
    int p;
    for (r = 0; r < rows; ++r) {
        double m = -INFINITY, sum = 0.0, lse, H = 0.0, mx = 0.0, first = 0.0;
        int nan = 0;
        for (p = 0; p < np; ++p) nan |= st[p][0][r] != st[p][0][r];
        if (nan) {   /* a NaN part makes the row NaN (as mha__merge_row does its out and lse) */
            if (out->entropy) out->entropy[off + r] = NAN;
            if (out->max_weight) out->max_weight[off + r] = NAN;
            if (out->first_weight) out->first_weight[off + r] = NAN;
            if (out->lse) out->lse[off + r] = NAN;
            continue;
        }
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
                                  const mha__rowout *rs, const mha__view *q, float *o, size_t o_bs, size_t o_hs, size_t o_rs,
                                  float *ws, size_t per_thread, float *ring)
{
    int b, D = c->D;
    for (b = 0; b < c->B; ++b) {
        int T = c->len[b], W = c->capacity - c->n_keep, np = 0, s_old, i, h, p, x;
        size_t part = mha__round_floats((size_t)H * Lq * ((size_t)D + 4)), rows = (size_t)H * Lq;
        size_t off = (size_t)b * rows;
        float *lse = rs && rs->lse ? rs->lse + off : NULL, *outs[3], *lses[3], *st[3][4];
        mha__rowout row, parts[3];
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
        for (x = 0; x < (int)rows; ++x)
            mha__merge_row(np, (size_t)x, D, (const float *const *)outs, (const float *const *)lses,
                           outs[0] + (size_t)x * D, lse);
        for (h = 0; h < H; ++h)
            for (i = 0; i < Lq; ++i)
                memcpy(o + (size_t)b * o_bs + (size_t)h * o_hs + (size_t)i * o_rs,
                       outs[0] + ((size_t)h * Lq + i) * D, (size_t)D * sizeof(float));
    }
}

/* An SDPA run over a cache: q [B, H, Lq, D] -> out [B, H, Lq, D]. */
static mha_status mha__sdpa_cache_forward(const mha_plan *p, int Lq, const float *q, float *out,
                                          const mha_run *run, const mha_options *o, mha_error *e)
{
    const mha_kv_cache *c = run->cache;
    mha__view qv;
    mha__rowout ro;
    size_t per_thread, total;
    void *owned;
    float *ws = NULL;
    int D = p->D;
    mha_status st;
    if (!(p->flags & MHA_PLAN_CACHE))
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "run->cache", "is set, but the plan was made without "
                         "MHA_PLAN_CACHE");
    if ((st = mha__cache_fits(p, c, o->num_kv_heads ? o->num_kv_heads : p->H, o, e)) != MHA_OK ||
        (st = mha__cache_holds(c, Lq, e)) != MHA_OK)
        return st;
    (void)mha__cache_attend_floats(p->H, Lq, c->capacity, D, c->ring, p->nthreads, c->dtype != 0, &per_thread, &total);
    if ((st = mha__run_ws(p, run, total, &owned, &ws, e)) != MHA_OK) return st;
    qv.p = q; qv.bs = (size_t)p->H * Lq * D; qv.hs = (size_t)Lq * D; qv.rs = (size_t)D;
    mha__cache_attend_run(c, p->H, Lq, o, mha__run_rowout(run, &ro), &qv, out, (size_t)p->H * Lq * D,
                          (size_t)Lq * D, (size_t)D, ws, per_thread,
                          ws + total - MHA__ALIGN_FLOATS - mha__ring_floats(c->ring, p->H, Lq, D));
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* A module's decoding step: Q (then the context) [B*Lq, E], the new K and
   V [B*Lq, Ekv], the ring's parts, then scratch for the attention and the
   projection GEMMs.  */
typedef struct mha__cached_layout {
    size_t qp, kn, vn, ring, scratch, per_thread, total_floats;
} mha__cached_layout;

static int mha__cached_lay(const mha__mod *r, int B, int Lq, int capacity, int ring, int nt, int kv16,
                           mha__cached_layout *L)
{
    size_t attn, g, g2, cur = 0;
    if (!mha__attn_scratch_floats(Lq, capacity, capacity, r->D, r->D, nt, 0, r->H < nt, kv16, &L->per_thread, &attn))
        return 0;
    g = mha__gemm_ws_floats_mt(B * Lq, r->E, r->E, nt);
    g2 = mha__gemm_ws_floats_mt(B * Lq, r->Ekv, r->E, nt); if (g2 > g) g = g2;
    return mha__region(&cur, (size_t)B * Lq * r->E, &L->qp) &&
           mha__region(&cur, (size_t)B * Lq * r->Ekv, &L->kn) &&
           mha__region(&cur, (size_t)B * Lq * r->Ekv, &L->vn) &&
           mha__region(&cur, mha__ring_floats(ring, r->H, Lq, r->D), &L->ring) &&
           mha__region(&cur, attn > g ? attn : g, &L->scratch) &&
           mha__add(cur, MHA__ALIGN_FLOATS, &L->total_floats);
}

static int mha__cached_floats(const mha__mod *r, int B, int Lq, int capacity, int ring, int nt, int kv16, size_t *total)
{
    mha__cached_layout L;
    if (!mha__cached_lay(r, B, Lq, capacity, ring, nt, kv16, &L)) return 0;
    *total = L.total_floats;
    return 1;
}

/* One decoding step of the module (section 6): x [B, Lq, E] holds the next
   Lq tokens of every row.
     1. Q, K, V of the new tokens through the plan's (packed) weights
     2. RoPE at positions offset + len[b] + i, then K and V appended
     3. the queries attend to the whole cache (bottom-right)
     4. out = C Wo^T + bo  */
static mha_status mha__module_cached(const mha_plan *p, int Lq, const float *x, const float *key,
                                     const float *value, float *out, const mha_run *run,
                                     const mha_options *o, mha_error *e)
{
    mha_kv_cache *c = run->cache;
    const mha__mod *r = &p->mod;
    mha__cached_layout L;
    mha__view qv;
    mha__rowout ro;
    void *owned;
    float *ws, *qp, *kn, *vn, *scratch;
    int E = r->E, Ekv = r->Ekv, B = p->B, nt = p->nthreads, b;
    mha_status st;
    if (!(p->flags & MHA_PLAN_CACHE))
        return mha__fail(e, MHA_ERR_EXCEEDS_PLAN, "run->cache", "is set, but the plan was made without "
                         "MHA_PLAN_CACHE");
    if ((key && key != x) || (value && value != x))
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, key && key != x ? "key" : "value", "is not query or NULL; "
                         "with run->cache the new tokens' keys and values come from query");
    if (run->saved || run->weights)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, run->saved ? "run->saved" : "run->weights", "is set; a run "
                         "over a KV cache neither saves a forward nor returns weights");
    if ((st = mha__cache_fits(p, c, r->Hkv, o, e)) != MHA_OK || (st = mha__cache_room(c, Lq, e)) != MHA_OK)
        return st;
    for (b = 0; b < B; ++b)   /* every position offset + len[b] + i is an int */
        if (c->len[b] > INT_MAX - Lq - o->position_offset)
            return mha__fail(e, MHA_ERR_OVERFLOW, "cache->len", "[%d] is %d; with position_offset %d and %d new "
                             "tokens the last position passes INT_MAX", b, c->len[b], o->position_offset, Lq);
    if ((st = mha__need(e, "out", out)) != MHA_OK) return st;
    (void)mha__cached_lay(r, B, Lq, c->capacity, c->ring, nt, c->dtype != 0, &L);
    if ((st = mha__run_ws(p, run, L.total_floats, &owned, &ws, e)) != MHA_OK) return st;
    qp = ws + L.qp; kn = ws + L.kn; vn = ws + L.vn; scratch = ws + L.scratch;

    /* 1. Q, K, V of the new tokens: [B*Lq, E], [B*Lq, Ekv] */
    mha__linear_pp(B * Lq, E, E, x, r->wq, r->bq, qp, scratch, nt, r->pq);
    mha__linear_pp(B * Lq, E, Ekv, x, r->wk, r->bk, kn, scratch, nt, r->pk);
    mha__linear_pp(B * Lq, E, Ekv, x, r->wv, r->bv, vn, scratch, nt, r->pv);

    /* 2. RoPE at positions offset + len[b] + i, then append K and V */
    for (b = 0; b < B; ++b) {
        int pos0 = o->position_offset + c->len[b];
        mha__rope_apply(&r->rope, r->D, 1, Lq, r->H, 0, (size_t)E, (size_t)r->D, pos0, NULL, 1.0f,
                        qp + (size_t)b * Lq * E);
        mha__rope_apply(&r->rope, r->D, 1, Lq, r->Hkv, 0, (size_t)Ekv, (size_t)r->D, pos0, NULL, 1.0f,
                        kn + (size_t)b * Lq * Ekv);
    }
    mha__cache_write(c, Lq, kn, vn, (size_t)Lq * Ekv, (size_t)r->D, (size_t)Ekv);

    /* 3. attention over the cache; the context overwrites Q in place */
    qv.p = qp; qv.bs = (size_t)Lq * E; qv.hs = (size_t)r->D; qv.rs = (size_t)E;
    mha__cache_attend_run(c, r->H, Lq, o, mha__run_rowout(run, &ro), &qv, qp, (size_t)Lq * E, (size_t)r->D,
                          (size_t)E, scratch, L.per_thread, ws + L.ring);

    /* 4. out = C Wo^T + bo */
    mha__linear_pp(B * Lq, E, E, qp, r->wo, r->bo, out, scratch, nt, r->po);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

/* ------------------------------------------------ public: decoding */

MHADEF mha_status mha_kv_cache_append(mha_kv_cache *cache, int n, const float *k_new, const float *v_new,
                                      mha_error *err)
{
    mha_status st;
    mha__begin(err);
    if ((st = mha__check_cache(cache, err)) != MHA_OK || (st = mha__need(err, "k_new", k_new)) != MHA_OK ||
        (st = mha__need(err, "v_new", v_new)) != MHA_OK || (st = mha__pos(err, "n", n)) != MHA_OK ||
        (st = mha__cache_room(cache, n, err)) != MHA_OK)
        return mha__sign(err, "mha_kv_cache_append", st);
    mha__cache_write(cache, n, k_new, v_new, (size_t)cache->Hkv * n * cache->D, (size_t)n * cache->D,
                     (size_t)cache->D);
    return MHA_OK;
}

MHADEF mha_status mha_rope_forward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                   const int *positions, float *x, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_rope_forward", mha__rope_public(rope, B, H, L, D, pos0, positions, x, 1.0f, err));
}

MHADEF mha_status mha_rope_backward(const mha_rope *rope, int B, int H, int L, int D, int pos0,
                                    const int *positions, float *dx, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_rope_backward", mha__rope_public(rope, B, H, L, D, pos0, positions, dx, -1.0f, err));
}

MHADEF mha_status mha_attn_merge(int nparts, size_t rows, int Dv, const float *const *outs,
                                 const float *const *lses, float *out, float *lse, mha_error *err)
{
    static const char fn[] = "mha_attn_merge";
    size_t r;
    int p;
    mha__begin(err);
    if (!outs || !lses || !out)
        return mha__sign(err, fn, mha__fail(err, MHA_ERR_NULL_POINTER, !outs ? "outs" : !lses ? "lses" : "out",
                                            "is NULL"));
    if (nparts <= 0) return mha__sign(err, fn, mha__fail(err, MHA_ERR_INVALID_SIZE, "nparts", "is %d; expected >= 1", nparts));
    if (Dv <= 0) return mha__sign(err, fn, mha__fail(err, MHA_ERR_INVALID_SIZE, "Dv", "is %d; expected >= 1", Dv));
    for (p = 0; p < nparts; ++p)
        if (!outs[p] || !lses[p])
            return mha__sign(err, fn, mha__fail(err, MHA_ERR_NULL_POINTER, !outs[p] ? "outs[p]" : "lses[p]",
                                                "part %d is NULL", p));
    for (r = 0; r < rows; ++r) mha__merge_row(nparts, r, Dv, outs, lses, out + r * Dv, lse);
    return MHA_OK;
}

/* ====================================================================== 8
   THE ENCODER LAYER
   nn.TransformerEncoderLayer: activations and layer norm, the layer's
   layouts (inference, a forward that saves, the backward), its plan, and
   the forward and backward walks.
   ====================================================================== */

/* -------------------------------------- activations and layer norm */

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

/* ----------------------------------------------- layouts and plans */

/* The encoder layer, N = B*L rows.  Its saved forward keeps every
   intermediate for the backward, after its header and the self-
   attention's own saved forward (mod):
     a   [N,E] attention output          t1  [N,E] x + a (post) / LN1(x) (pre)
     h   [N,E] after the first residual  z   [N,F] linear1 output
     g   [N,F] act(z)                    t2  [N,E] h + f (post) / LN2(h) (pre)
   The backward's workspace adds d1, d2 [N,E], dg [N,F] (and, without a
   saved forward, the saved layout itself to recompute into).  Inference
   keeps only a (then h in place) and runs the feed-forward block on
   MHA__FF_ROWS rows at a time: zc [rows,F], tc and fc [rows,E].
   sub: the self-attention's workspace (what its plan allows). */
#ifndef MHA__FF_ROWS
#define MHA__FF_ROWS 256
#endif

typedef struct mha__enc_layout {
    /* in the saved layout (sv: the caller's saved region or the workspace) */
    size_t mod, a, t1, h, z, g, t2, saved_floats;
    /* in the workspace */
    size_t sv, d1, d2, dg, gws, sub, total_floats;
    size_t zc, tc, fc, rows;                /* inference */
} mha__enc_layout;

/* The encoder's layouts at length L: mode 0 inference, 1 a forward that
   saves, 2 a backward (have_saved: the caller gives the saved forward). */
/* The self-attention's workspace inside an encoder run of each mode: a
   forward that does not save (with the weights when the plan allows
   them), one that saves (scratch only: Q, K, V, C go to the saved
   forward), and a backward, which always has the self-attention's saved
   forward (the encoder's saved layout holds it, given or recomputed). */
static int mha__enc_sub_floats(const mha_plan *p, int L, int mode, size_t *sub)
{
    mha__fwd_layout F;
    mha__bwd_layout W;
    const mha__mod *r = &p->mod;
    if (mode == 0) {
        if (!mha__fwd_layout_at(r, p->B, L, L, 0, p->by_head, p->nthreads, 0, &F)) return 0;
        *sub = F.total_floats;
        if (p->flags & MHA_PLAN_WEIGHTS) {
            if (!mha__fwd_layout_at(r, p->B, L, L, 1, 0, p->nthreads, 0, &F)) return 0;
            if (F.total_floats > *sub) *sub = F.total_floats;
        }
        return 1;
    }
    if (mode == 1) {   /* the fused path, and the weights' path when the plan allows it */
        if (!mha__fwd_layout_at(r, p->B, L, L, 0, 0, p->nthreads, 1, &F)) return 0;
        *sub = F.total_floats;
        if (p->flags & MHA_PLAN_WEIGHTS) {
            if (!mha__fwd_layout_at(r, p->B, L, L, 1, 0, p->nthreads, 1, &F)) return 0;
            if (F.total_floats > *sub) *sub = F.total_floats;
        }
        return 1;
    }
    /* the backward: and, when no saved forward is given, the forward it
       recomputes first (into the same region) */
    if (!mha__bwd_layout_at(r, p->B, L, L, p->nthreads, 1, &W) ||
        !mha__fwd_layout_at(r, p->B, L, L, 0, 0, p->nthreads, 1, &F))
        return 0;
    *sub = W.total_floats > F.total_floats ? W.total_floats : F.total_floats;
    return 1;
}

static int mha__enc_layout_at(const mha_plan *p, int L, int mode, int have_saved, mha__enc_layout *P)
{
    size_t cur = 0, sc = 0, ne, nf, g, t, sub, hdr;
    int E = p->mod.E, F = p->enc.dim_feedforward, N = p->B * L;
    ne = (size_t)N * E; nf = (size_t)N * F;
    if (!mha__enc_sub_floats(p, L, mode, &sub)) return 0;
    /* the saved layout (the caller's region or, recomputed, the workspace's) */
    if (!(mha__region(&sc, MHA__SAVED_HDR, &hdr) &&
          mha__region(&sc, mha__mod_saved_floats(&p->mod, p->B, L, L), &P->mod) &&
          mha__region(&sc, ne, &P->a) && mha__region(&sc, ne, &P->t1) && mha__region(&sc, ne, &P->h) &&
          mha__region(&sc, nf, &P->z) && mha__region(&sc, nf, &P->g) && mha__region(&sc, ne, &P->t2) &&
          mha__add(sc, MHA__ALIGN_FLOATS, &P->saved_floats)))
        return 0;
    if (mode == 0) {
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
    if (mode == 1)
        return mha__region(&cur, g, &P->gws) && mha__region(&cur, sub, &P->sub) &&
               mha__add(cur, MHA__ALIGN_FLOATS, &P->total_floats);
    P->sv = 0;
    return (have_saved || mha__region(&cur, sc, &P->sv)) &&
           mha__region(&cur, ne, &P->d1) && mha__region(&cur, ne, &P->d2) &&
           mha__region(&cur, nf, &P->dg) && mha__region(&cur, g, &P->gws) &&
           mha__region(&cur, sub, &P->sub) && mha__add(cur, MHA__ALIGN_FLOATS, &P->total_floats);
}

static mha_status mha__encoder_plan_make(const mha_encoder_layer *ly, int B, int L,
                                         const mha_options *opt, unsigned flags, mha_plan *p,
                                         size_t *extra_bytes, mha_error *e)
{
    mha__enc_layout P;
    size_t n, f, saved = 0;
    mha_status st;
    *extra_bytes = 0;
    memset(p, 0, sizeof *p);
    if (!ly) return mha__fail(e, MHA_ERR_NULL_POINTER, "layer", "is NULL");
    if (!ly->linear1_weight) return mha__fail(e, MHA_ERR_NULL_POINTER, "layer->linear1_weight", "is NULL");
    if (!ly->linear2_weight) return mha__fail(e, MHA_ERR_NULL_POINTER, "layer->linear2_weight", "is NULL");
    if ((st = mha__pos(e, "layer->dim_feedforward", ly->dim_feedforward)) != MHA_OK) return st;
    if (ly->activation != MHA_ACT_RELU && ly->activation != MHA_ACT_GELU)
        return mha__fail(e, MHA_ERR_BAD_ENUM, "layer->activation", "is %d; expected MHA_ACT_RELU (0) or "
                         "MHA_ACT_GELU (1)", (int)ly->activation);
    if (ly->norm_first != 0 && ly->norm_first != 1)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "layer->norm_first", "is %d; expected 0 or 1", ly->norm_first);
    if (!(ly->layer_norm_eps >= 0.0f) || ly->layer_norm_eps == INFINITY)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "layer->layer_norm_eps", "is %g; expected 0 (1e-5) or a "
                         "positive finite number", (double)ly->layer_norm_eps);
    /* x [B, L, E] is the key and the value too: kdim and vdim must be E */
    if (ly->self_attn.kdim != 0 && ly->self_attn.kdim != ly->self_attn.embed_dim)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "layer->self_attn.kdim", "is %d; an encoder layer attends "
                         "to x itself: 0 or embed_dim %d", ly->self_attn.kdim, ly->self_attn.embed_dim);
    if (ly->self_attn.vdim != 0 && ly->self_attn.vdim != ly->self_attn.embed_dim)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "layer->self_attn.vdim", "is %d; an encoder layer attends "
                         "to x itself: 0 or embed_dim %d", ly->self_attn.vdim, ly->self_attn.embed_dim);
    st = mha__module_plan_make(&ly->self_attn, B, L, L, opt, flags, MHA__PLAN_ENCODER, p, extra_bytes, e);
    if (st != MHA_OK) return st;
    if (!mha__mul3((size_t)p->B * L, (size_t)ly->dim_feedforward, sizeof(float), &n) ||
        !mha__mul3((size_t)ly->dim_feedforward, (size_t)p->mod.E, sizeof(float), &n) ||
        ly->dim_feedforward > INT_MAX / 2)
        return mha__fail(e, MHA_ERR_OVERFLOW, "layer->dim_feedforward", "is %d; B*L*F passes the size limits",
                         ly->dim_feedforward);
    p->enc = *ly;
    if (!mha__enc_layout_at(p, L, 0, 0, &P)) goto overflow;
    f = P.total_floats;
    if (flags & MHA_PLAN_TRAINING) {
        if (!mha__enc_layout_at(p, L, 1, 1, &P)) goto overflow;
        if (P.total_floats > f) f = P.total_floats;
        if (!mha__enc_layout_at(p, L, 2, 0, &P)) goto overflow;
        if (P.total_floats > f) f = P.total_floats;
        saved = P.saved_floats;
    }
    return mha__plan_ws(p, f, saved, e);
overflow:
    return mha__fail(e, MHA_ERR_OVERFLOW, "L", "the workspace's size does not fit in size_t");
}

/* -------------------------------------------- forward and backward */

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

/* Training: the forward pass, leaving every intermediate in the saved
   layout at sv (the caller's saved forward, or the backward's workspace)
   and the self-attention's saved forward inside it.
     post-norm:  a = SA(x);  t1 = x + a;  h = LN1(t1);  z = h W1^T + b1;  g = act(z);
                 f = g W2^T + b2;  t2 = h + f;  y = LN2(t2)
     pre-norm:   t1 = LN1(x);  a = SA(t1);  h = x + a;  t2 = LN2(h);  z = t2 W1^T + b1;
                 g = act(z);  f = g W2^T + b2;  y = h + f                          */
static void mha__enc_forward(const mha_plan *p, const mha__run *c0, const float *x, float *y,
                             const mha__enc_layout *P, float *ws, float *sv)
{
    const mha_encoder_layer *ly = &p->enc;
    mha__run c = *c0;
    int E = p->mod.E, N = c.B * c.Lq, nt = p->nthreads;
    size_t ne = (size_t)N * E, i;
    float eps = ly->layer_norm_eps > 0.0f ? ly->layer_norm_eps : 1e-5f;
    float *a = sv + P->a, *t1 = sv + P->t1, *h = sv + P->h, *z = sv + P->z;
    float *g = sv + P->g, *t2 = sv + P->t2, *gws = ws + P->gws;
    const float *ffin;

    /* 1. self-attention block (the weights and statistics when the run asks: c0's) */
    c.ws = ws + P->sub;
    c.sv = sv + P->mod;
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

/* The mha_run fields an encoder forward takes, and no chosen rows (its
   weights come whole). */
#define MHA__RF_ENCODER_FWD (MHA__RF_SAVED | MHA__RF_MASKS | MHA__RF_WEIGHTS | MHA__RF_STATS)
static mha_status mha__enc_run_fields(const mha_run *run, mha_error *e)
{
    mha_status st = mha__run_fields(run, MHA__RF_ENCODER_FWD, e);
    if (st == MHA_OK && run && run->n_rows)
        st = mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "run->rows", "is set; an encoder run returns the whole "
                       "weights (rows: run its self-attention as a module)");
    return st;
}

static mha_status mha__encoder_run_forward(const mha_plan *p, int L, const float *x, float *y,
                                           const mha_run *run, mha_error *err)
{
    mha_options o;
    mha__enc_layout P;
    mha__rowout ro;
    mha__run c;
    void *owned;
    float *sv = NULL;
    mha_status st;
    st = mha__module_run_begin(p, MHA__PLAN_ENCODER, L, L, x, x, x, run, MHA__RF_ENCODER_FWD, &o, &c, err);
    if (st == MHA_OK) st = mha__need(err, "y", y);
    if (st == MHA_OK) st = mha__run_weights_ok(p, run, err);
    if (st == MHA_OK) st = mha__enc_run_fields(run, err);
    if (st == MHA_OK && mha__overlap(x, (size_t)p->B * L * p->mod.E, y, (size_t)p->B * L * p->mod.E))
        st = mha__fail(err, MHA_ERR_INVALID_ARGUMENT, "y", "overlaps x; an encoder layer needs x after it "
                       "writes y");
    if (st != MHA_OK) return st;
    /* inference's layout, or the one that keeps every activation in the saved forward */
    (void)mha__enc_layout_at(p, L, run && run->saved ? 1 : 0, 1, &P);   /* within the plan's */
    if (run && run->saved && (st = mha__run_saved(p, run, P.saved_floats, &sv, err)) != MHA_OK) return st;
    if ((st = mha__run_ws(p, run, P.total_floats, &owned, &c.ws, err)) != MHA_OK) return st;
    c.weights = run ? run->weights : NULL;
    c.rs = mha__run_rowout(run, &ro);
    if (sv) {   /* training: keep every activation for the backward */
        int shape[MHA__SAVED_WORDS - 1];
        mha__enc_forward(p, &c, x, y, &P, c.ws, sv);
        mha__enc_saved_shape(p, L, shape);
        mha__saved_stamp(sv, shape);
    } else {
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
static mha_status mha__encoder_run_backward(const mha_plan *p, int L, const float *x,
                                            const float *dy, float *dx,
                                            const mha_encoder_layer_grad *grad,
                                            const mha_run *run, mha_error *err)
{
    const mha_encoder_layer *ly;
    mha_options o;
    mha_encoder_layer_grad nog;
    mha__enc_layout P;
    mha__run c;
    void *owned;
    float *ws = NULL, *sv = NULL, *t1, *h, *z, *g, *t2, *d1, *d2, *dg, *gws, eps;
    size_t ne, nf, i;
    int E, F, N, nt;
    mha_status st;
    st = mha__module_run_begin(p, MHA__PLAN_ENCODER, L, L, x, x, x, run,
                               MHA__RF_SAVED | MHA__RF_MASKS | MHA__RF_SINKS, &o, &c, err);
    if (st == MHA_OK) st = mha__need(err, "dy", dy);
    if (st == MHA_OK && !(p->flags & MHA_PLAN_TRAINING))
        st = mha__fail(err, MHA_ERR_EXCEEDS_PLAN, "plan", "was made without MHA_PLAN_TRAINING: it has no backward");
    if (st != MHA_OK) return st;
    /* the backward's layout: with the caller's saved forward, or a region to recompute it into */
    (void)mha__enc_layout_at(p, L, 2, run && run->saved, &P);   /* within the plan's */
    if (run && run->saved) {
        int shape[MHA__SAVED_WORDS - 1];
        mha__enc_saved_shape(p, L, shape);
        if ((st = mha__run_saved(p, run, P.saved_floats, &sv, err)) == MHA_OK) st = mha__saved_check(sv, shape, err);
        if (st != MHA_OK) return st;
    }
    if (!grad) { memset(&nog, 0, sizeof nog); grad = &nog; }
    if ((st = mha__run_ws(p, run, P.total_floats, &owned, &ws, err)) != MHA_OK) return st;
    ly = &p->enc;
    E = p->mod.E; F = ly->dim_feedforward; N = p->B * L; nt = p->nthreads;
    ne = (size_t)N * E; nf = (size_t)N * F;
    eps = ly->layer_norm_eps > 0.0f ? ly->layer_norm_eps : 1e-5f;
    d1 = ws + P.d1; d2 = ws + P.d2; dg = ws + P.dg; gws = ws + P.gws;

    /* 1. the forward's activations: the caller's saved forward, or
          recomputed into the workspace (y itself is not needed: d1 holds
          it for now) */
    if (!sv) {
        sv = ws + P.sv;
        c.ws = ws;
        mha__enc_forward(p, &c, x, d1, &P, ws, sv);
    }
    t1 = sv + P.t1; h = sv + P.h; z = sv + P.z; g = sv + P.g; t2 = sv + P.t2;
    c.sv = sv + P.mod;        /* the self-attention's saved forward, inside */
    c.use_saved = 1;
    c.sinks_grad = run ? run->sinks_grad : NULL;
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

/* --------------------------------------- public: the encoder layer */

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

MHADEF mha_status mha_encoder_forward(const mha_encoder_layer *layer, int B, int L,
                                      const float *x, const mha_options *opt, float *y,
                                      const mha_run *run, mha_error *err)
{
    mha_plan p;
    mha__shot s;
    mha_status st;
    mha__begin(err);
    memset(&s, 0, sizeof s);
    s.kind = MHA__PLAN_ENCODER; s.flags = mha__shot_flags(run); s.ly = layer; s.B = B; s.Lq = s.Lk = L;
    /* what an encoder run cannot honour, named as the caller wrote it (not as the
       plan flags the one-shot would derive from it) */
    st = mha__enc_run_fields(run, err);
    if (st == MHA_OK && (st = mha__oneshot(&s, opt, run, &p, err)) == MHA_OK)
        st = mha__encoder_run_forward(&p, L, x, y, run, err);
    return mha__sign(err, "mha_encoder_forward", st);
}

MHADEF mha_status mha_encoder_backward(const mha_encoder_layer *layer, int B, int L,
                                       const float *x, const float *dy, const mha_options *opt,
                                       float *dx, const mha_encoder_layer_grad *grad,
                                       const mha_run *run, mha_error *err)
{
    mha_plan p;
    mha__shot s;
    mha_status st;
    mha__begin(err);
    memset(&s, 0, sizeof s);
    s.kind = MHA__PLAN_ENCODER; s.flags = MHA_PLAN_TRAINING; s.ly = layer; s.B = B; s.Lq = s.Lk = L;
    if ((st = mha__oneshot(&s, opt, run, &p, err)) == MHA_OK)
        st = mha__encoder_run_backward(&p, L, x, dy, dx, grad, run, err);
    return mha__sign(err, "mha_encoder_backward", st);
}

MHADEF mha_status mha_encoder_plan_size(const mha_encoder_layer *layer, int B, int L,
                                        const mha_options *opt, unsigned flags, mha_sizes *sizes,
                                        mha_error *err)
{
    mha_plan p;
    size_t extra = 0;
    mha_status st;
    mha__begin(err);
    if (!sizes) return mha__sign(err, "mha_encoder_plan_size", mha__need(err, "sizes", sizes));
    st = mha__encoder_plan_make(layer, B, L, opt, flags, &p, &extra, err);
    return mha__sign(err, "mha_encoder_plan_size", mha__plan_out(st, &p, extra, NULL, 0, NULL, sizes, err));
}

MHADEF mha_status mha_encoder_plan(const mha_encoder_layer *layer, int B, int L,
                                   const mha_options *opt, unsigned flags,
                                   void *mem, size_t mem_bytes, mha_plan **plan, mha_error *err)
{
    mha_plan p;
    size_t extra = 0;
    mha_status st;
    mha__begin(err);
    if (!plan) return mha__sign(err, "mha_encoder_plan", mha__need(err, "plan", plan));
    st = mha__encoder_plan_make(layer, B, L, opt, flags, &p, &extra, err);
    return mha__sign(err, "mha_encoder_plan", mha__plan_out(st, &p, extra, mem, mem_bytes, plan, NULL, err));
}

MHADEF mha_status mha_encoder_run_forward(const mha_plan *p, int L, const float *x, float *y,
                                          const mha_run *run, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_encoder_run_forward", mha__encoder_run_forward(p, L, x, y, run, err));
}

MHADEF mha_status mha_encoder_run_backward(const mha_plan *p, int L, const float *x,
                                           const float *dy, float *dx,
                                           const mha_encoder_layer_grad *grad,
                                           const mha_run *run, mha_error *err)
{
    mha__begin(err);
    return mha__sign(err, "mha_encoder_run_backward", mha__encoder_run_backward(p, L, x, dy, dx, grad, run, err));
}

/* ====================================================================== 9
   TRAINING PIECES
   The public Linear layer, layer norm, positional encoding, embedding,
   cross-entropy, SGD and AdamW.  Each refuses bad input by name.
   ====================================================================== */

static mha_status mha__linear_sizes(int rows, int in, int out, mha_error *e)
{
    size_t n;
    mha_status st;
    if ((st = mha__pos(e, "rows", rows)) != MHA_OK || (st = mha__pos(e, "in", in)) != MHA_OK ||
        (st = mha__pos(e, "out", out)) != MHA_OK)
        return st;
    if (!mha__dim_ok(rows) || !mha__dim_ok(in) || !mha__dim_ok(out) ||
        !mha__mul3((size_t)rows, (size_t)(in > out ? in : out), sizeof(float), &n) ||
        !mha__mul3((size_t)in, (size_t)out, sizeof(float), &n))
        return mha__fail(e, MHA_ERR_OVERFLOW, "rows", "rows %d, in %d, out %d: a size passes the limits",
                         rows, in, out);
    return MHA_OK;
}

static size_t mha__linear_bytes(int rows, int in, int out)
{
    return (mha__linear_gws(rows, in, out, 1) + MHA__ALIGN_FLOATS) * sizeof(float);
}

MHADEF mha_status mha_linear_workspace_size(int rows, int in, int out, size_t *bytes, mha_error *err)
{
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "bytes", bytes)) != MHA_OK || (st = mha__linear_sizes(rows, in, out, err)) != MHA_OK)
        return mha__sign(err, "mha_linear_workspace_size", st);
    *bytes = mha__linear_bytes(rows, in, out);
    return MHA_OK;
}

/* The checks and the workspace both public Linear calls share. */
static mha_status mha__linear_begin(int rows, int in, int out, const mha_run *run, void **owned,
                                    float **ws, mha_error *e)
{
    mha_status st;
    *owned = NULL; *ws = NULL;
    if ((st = mha__linear_sizes(rows, in, out, e)) != MHA_OK) return st;
    if ((st = mha__run_fields(run, 0, e)) != MHA_OK) return st;
    return mha__get_ws(run, mha__linear_bytes(rows, in, out), owned, ws, e);
}

MHADEF mha_status mha_linear_forward(int rows, int in, int out, const float *x, const float *W,
                                     const float *b, float *y, const mha_run *run, mha_error *err)
{
    void *owned;
    float *ws = NULL;
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "x", x)) != MHA_OK || (st = mha__need(err, "W", W)) != MHA_OK ||
        (st = mha__need(err, "y", y)) != MHA_OK ||
        (st = mha__linear_begin(rows, in, out, run, &owned, &ws, err)) != MHA_OK)
        return mha__sign(err, "mha_linear_forward", st);
    mha__linear(rows, in, out, x, W, b, y, ws, 1);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

MHADEF mha_status mha_linear_backward(int rows, int in, int out, const float *x, const float *W,
                                      const float *dy, float *dx, float *dW, float *db,
                                      const mha_run *run, mha_error *err)
{
    void *owned;
    float *ws = NULL;
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "x", x)) != MHA_OK || (st = mha__need(err, "W", W)) != MHA_OK ||
        (st = mha__need(err, "dy", dy)) != MHA_OK ||
        (st = mha__linear_begin(rows, in, out, run, &owned, &ws, err)) != MHA_OK)
        return mha__sign(err, "mha_linear_backward", st);
    mha__linear_backward(rows, in, out, x, W, dy, dx, dW, db, ws, 1);
    if (owned) MHA_FREE(owned);
    return MHA_OK;
}

static mha_status mha__layernorm_check(int rows, int E, float eps, mha_error *e)
{
    size_t n;
    mha_status st;
    if ((st = mha__pos(e, "rows", rows)) != MHA_OK || (st = mha__pos(e, "E", E)) != MHA_OK) return st;
    if (!(eps >= 0.0f) || eps == INFINITY)
        return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "eps", "is %g; expected 0 (1e-5) or a positive finite "
                         "number", (double)eps);
    return mha__mul3((size_t)rows, (size_t)E, sizeof(float), &n)
               ? MHA_OK : mha__fail(e, MHA_ERR_OVERFLOW, "rows", "rows*E floats do not fit in size_t");
}

MHADEF mha_status mha_layernorm_forward(int rows, int E, const float *x, const float *w,
                                        const float *b, float eps, float *y, mha_error *err)
{
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "x", x)) != MHA_OK || (st = mha__need(err, "y", y)) != MHA_OK ||
        (st = mha__layernorm_check(rows, E, eps, err)) != MHA_OK)
        return mha__sign(err, "mha_layernorm_forward", st);
    mha__layernorm_forward(rows, E, x, w, b, eps > 0.0f ? eps : 1e-5f, y);
    return MHA_OK;
}

MHADEF mha_status mha_layernorm_backward(int rows, int E, const float *x, const float *w,
                                         float eps, const float *dy, float *dx, float *dw, float *db,
                                         mha_error *err)
{
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "x", x)) != MHA_OK || (st = mha__need(err, "dy", dy)) != MHA_OK ||
        (st = mha__layernorm_check(rows, E, eps, err)) != MHA_OK)
        return mha__sign(err, "mha_layernorm_backward", st);
    mha__layernorm_backward(rows, E, x, w, eps > 0.0f ? eps : 1e-5f, dy, dx, dw, db);
    return MHA_OK;
}

/* PE[pos, 2i] = sin(pos * w_i),  PE[pos, 2i+1] = cos(pos * w_i),  w_i = 10000^(-2i/d).
   Even and odd columns share the frequency of their pair; computed in double. */
MHADEF mha_status mha_positional_encoding(int L, int d, float *pe, mha_error *err)
{
    static const char fn[] = "mha_positional_encoding";
    int pos, c;
    size_t n;
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "pe", pe)) != MHA_OK || (st = mha__pos(err, "L", L)) != MHA_OK ||
        (st = mha__pos(err, "d", d)) != MHA_OK)
        return mha__sign(err, fn, st);
    if (!mha__mul3((size_t)L, (size_t)d, sizeof(float), &n))
        return mha__sign(err, fn, mha__fail(err, MHA_ERR_OVERFLOW, "L", "L*d floats do not fit in size_t"));
    for (pos = 0; pos < L; ++pos)
        for (c = 0; c < d; ++c) {
            double w = pow(10000.0, -(double)(c - c % 2) / d);
            pe[(size_t)pos * d + c] = (float)(c % 2 == 0 ? sin(pos * w) : cos(pos * w));
        }
    return MHA_OK;
}

static mha_status mha__embedding_check(int n, int vocab, int d, const int *tokens, mha_error *e)
{
    size_t t;
    int i;
    mha_status st;
    if ((st = mha__pos(e, "n", n)) != MHA_OK || (st = mha__pos(e, "vocab", vocab)) != MHA_OK ||
        (st = mha__pos(e, "d", d)) != MHA_OK)
        return st;
    if (!mha__mul3((size_t)n, (size_t)d, sizeof(float), &t) ||
        !mha__mul3((size_t)vocab, (size_t)d, sizeof(float), &t))
        return mha__fail(e, MHA_ERR_OVERFLOW, "d", "n*d or vocab*d floats do not fit in size_t");
    for (i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= vocab)
            return mha__fail(e, MHA_ERR_INVALID_ARGUMENT, "tokens", "[%d] is %d; expected 0..%d", i, tokens[i],
                             vocab - 1);
    return MHA_OK;
}

/* out[i, :] = table[tokens[i], :] */
MHADEF mha_status mha_embedding_forward(int n, int vocab, int d, const int *tokens,
                                        const float *table, float *out, mha_error *err)
{
    mha_status st;
    int i;
    mha__begin(err);
    if ((st = mha__need(err, "tokens", tokens)) != MHA_OK || (st = mha__need(err, "table", table)) != MHA_OK ||
        (st = mha__need(err, "out", out)) != MHA_OK ||
        (st = mha__embedding_check(n, vocab, d, tokens, err)) != MHA_OK)
        return mha__sign(err, "mha_embedding_forward", st);
    for (i = 0; i < n; ++i)
        memcpy(out + (size_t)i * d, table + (size_t)tokens[i] * d, (size_t)d * sizeof(float));
    return MHA_OK;
}

/* dtable[tokens[i], :] += dout[i, :]  (a token seen twice collects both) */
MHADEF mha_status mha_embedding_backward(int n, int vocab, int d, const int *tokens,
                                         const float *dout, float *dtable, mha_error *err)
{
    mha_status st;
    int i;
    mha__begin(err);
    if ((st = mha__need(err, "tokens", tokens)) != MHA_OK || (st = mha__need(err, "dout", dout)) != MHA_OK ||
        (st = mha__need(err, "dtable", dtable)) != MHA_OK ||
        (st = mha__embedding_check(n, vocab, d, tokens, err)) != MHA_OK)
        return mha__sign(err, "mha_embedding_backward", st);
    for (i = 0; i < n; ++i) mha__axpy(dtable + (size_t)tokens[i] * d, 1.0f, dout + (size_t)i * d, d);
    return MHA_OK;
}

/* Per row r with target t:  loss_r = logsumexp(z_r) - z_r[t],
   d loss_r / d z_r = softmax(z_r) - onehot(t);  the mean divides both by N. */
MHADEF mha_status mha_cross_entropy(int n, int V, const float *logits, const int *targets,
                                    float *loss, float *dlogits, int *correct, mha_error *err)
{
    static const char fn[] = "mha_cross_entropy";
    double total = 0;
    size_t t;
    int r, j, counted = 0, right = 0;
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "logits", logits)) != MHA_OK || (st = mha__need(err, "targets", targets)) != MHA_OK ||
        (st = mha__need(err, "loss", loss)) != MHA_OK || (st = mha__pos(err, "n", n)) != MHA_OK ||
        (st = mha__pos(err, "V", V)) != MHA_OK)
        return mha__sign(err, fn, st);
    if (!mha__mul3((size_t)n, (size_t)V, sizeof(float), &t))
        return mha__sign(err, fn, mha__fail(err, MHA_ERR_OVERFLOW, "V", "n*V floats do not fit in size_t"));
    for (r = 0; r < n; ++r) {
        if (targets[r] >= V)
            return mha__sign(err, fn, mha__fail(err, MHA_ERR_INVALID_ARGUMENT, "targets", "[%d] is %d; "
                                                "expected < V = %d (negative: ignored)", r, targets[r], V));
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

/* A hyperparameter that must be finite and >= 0. */
static mha_status mha__nonneg(mha_error *e, const char *name, float v)
{
    return mha__finite(v) && v >= 0.0f
               ? MHA_OK : mha__fail(e, MHA_ERR_INVALID_ARGUMENT, name, "is %g; expected finite and >= 0", (double)v);
}

/* p -= lr * (g + weight_decay * p) */
MHADEF mha_status mha_sgd_step(size_t n, float *p, const float *g, float lr, float weight_decay,
                               mha_error *err)
{
    size_t i;
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "p", p)) != MHA_OK || (st = mha__need(err, "g", g)) != MHA_OK ||
        (st = mha__nonneg(err, "lr", lr)) != MHA_OK || (st = mha__nonneg(err, "weight_decay", weight_decay)) != MHA_OK)
        return mha__sign(err, "mha_sgd_step", st);
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

/* A beta: finite, in [0, 1). */
static mha_status mha__beta(mha_error *e, const char *name, float v)
{
    return v >= 0.0f && v < 1.0f
               ? MHA_OK : mha__fail(e, MHA_ERR_INVALID_ARGUMENT, name, "is %g; expected 0 <= beta < 1", (double)v);
}

MHADEF mha_status mha_adamw_step(const mha_adamw *opt, long step, size_t n, float *p,
                                 const float *g, float *m, float *v, mha_error *err)
{
    float lr, b1, b2, eps, wd, c1, c2;
    size_t i;
    mha_status st;
    mha__begin(err);
    if ((st = mha__need(err, "opt", opt)) != MHA_OK || (st = mha__need(err, "p", p)) != MHA_OK ||
        (st = mha__need(err, "g", g)) != MHA_OK || (st = mha__need(err, "m", m)) != MHA_OK ||
        (st = mha__need(err, "v", v)) != MHA_OK)
        return mha__sign(err, "mha_adamw_step", st);
    lr = opt->lr; b1 = opt->beta1; b2 = opt->beta2; eps = opt->eps; wd = opt->weight_decay;
    /* as torch.optim.AdamW checks them (NaN fails every comparison) */
    if (step < 1)
        st = mha__fail(err, MHA_ERR_INVALID_ARGUMENT, "step", "is %ld; expected >= 1 (1-based)", step);
    else if ((st = mha__nonneg(err, "opt->lr", lr)) == MHA_OK && (st = mha__nonneg(err, "opt->eps", eps)) == MHA_OK &&
             (st = mha__nonneg(err, "opt->weight_decay", wd)) == MHA_OK &&
             (st = mha__beta(err, "opt->beta1", b1)) == MHA_OK)
        st = mha__beta(err, "opt->beta2", b2);
    if (st != MHA_OK) return mha__sign(err, "mha_adamw_step", st);
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

#if defined(MHA__DISPATCH)
/* ---- THE KERNEL TIERS: the passes (see "the kernel tiers", section 0)
   Each pass includes this file again with MHA__TIER_PASS defined: it skips
   everything but the SIMD layer and the kernel regions, which it compiles
   under its tier's target with each name below given the tier's suffix.
   After the passes the suffix is empty, and each name means itself again
   (a macro does not expand inside its own expansion). */
#define MHA__TIER_PASS 1
#define MHA__T(name) MHA__T2(name, MHA__TIER_SFX)
#define MHA__T2(name, sfx) MHA__T3(name, sfx)
#define MHA__T3(name, sfx) mha__##name##sfx
/* a tier's target for the functions of its pass (GCC: a pragma; clang: an attribute) */
#define MHA__STR(x) #x
#if defined(__clang__)
#define MHA__TARGET_BEGIN(isa) _Pragma(MHA__STR(clang attribute push(__attribute__((target(isa))), apply_to = function)))
#define MHA__TARGET_END _Pragma("clang attribute pop")
#else
#define MHA__TARGET_BEGIN(isa) _Pragma("GCC push_options") _Pragma(MHA__STR(GCC target(isa)))
#define MHA__TARGET_END _Pragma("GCC pop_options")
#endif
#undef mha__gemm
#undef mha__gemm_pp
#undef mha__gemm_mt
#undef mha__gemm_mt_pp
#undef mha__gemm_ws_floats
#undef mha__gemm_ws_floats_mt
#undef mha__prepack_b
#undef mha__prepack_b16
#undef mha__prepacked_floats
#undef mha__softcap
#undef mha__attend_all
#undef mha__attend_backward_fused
#undef mha__attn_scratch_floats
#undef mha__fbwd_floats
#undef mha__cvt_from16
#undef mha__cvt_to16
#define mha__vf MHA__T(vf)
#define mha__vm MHA__T(vm)
#define mha__vload MHA__T(vload)
#define mha__vstore MHA__T(vstore)
#define mha__vset1 MHA__T(vset1)
#define mha__vzero MHA__T(vzero)
#define mha__vadd MHA__T(vadd)
#define mha__vsub MHA__T(vsub)
#define mha__vmul MHA__T(vmul)
#define mha__vdiv MHA__T(vdiv)
#define mha__vmax MHA__T(vmax)
#define mha__vmin MHA__T(vmin)
#define mha__vfma MHA__T(vfma)
#define mha__vhalves MHA__T(vhalves)
#define mha__vhsum MHA__T(vhsum)
#define mha__vhmax MHA__T(vhmax)
#define mha__vround MHA__T(vround)
#define mha__vpow2i MHA__T(vpow2i)
#define mha__vlt MHA__T(vlt)
#define mha__vgt MHA__T(vgt)
#define mha__visnan MHA__T(visnan)
#define mha__vsel MHA__T(vsel)
#define mha__vtranspose MHA__T(vtranspose)
#define mha__vrowsums MHA__T(vrowsums)
#define mha__vload_f16 MHA__T(vload_f16)
#define mha__vstore_f16 MHA__T(vstore_f16)
#define mha__vload_bf16 MHA__T(vload_bf16)
#define mha__vstore_bf16 MHA__T(vstore_bf16)
#define mha__vexp_core MHA__T(vexp_core)
#define mha__vexp MHA__T(vexp)
#define mha__vtanh MHA__T(vtanh)
#define mha__dot MHA__T(dot)
#define mha__axpy MHA__T(axpy)
#define mha__cvt_from16 MHA__T(cvt_from16)
#define mha__cvt_to16 MHA__T(cvt_to16)
#define mha__softmax_row_lse MHA__T(softmax_row_lse)
#define mha__gemm_kc MHA__T(gemm_kc)
#define mha__gemm_b_floats MHA__T(gemm_b_floats)
#define mha__gemm_a_floats MHA__T(gemm_a_floats)
#define mha__gemm_ws_floats MHA__T(gemm_ws_floats)
#define mha__pack_a MHA__T(pack_a)
#define mha__pack_b MHA__T(pack_b)
#define mha__kernel MHA__T(kernel)
#define mha__kernel_rows MHA__T(kernel_rows)
#define mha__macro_kernel MHA__T(macro_kernel)
#define mha__pack_a_block MHA__T(pack_a_block)
#define mha__prepacked_floats MHA__T(prepacked_floats)
#define mha__prepack_b MHA__T(prepack_b)
#define mha__prepack_b16 MHA__T(prepack_b16)
#define mha__prepack_b_any MHA__T(prepack_b_any)
#define mha__prepacked_at MHA__T(prepacked_at)
#define mha__gemm_block MHA__T(gemm_block)
#define mha__gemm_pp MHA__T(gemm_pp)
#define mha__gemm MHA__T(gemm)
#define mha__gemm_threads MHA__T(gemm_threads)
#define mha__gemm_ws_floats_mt MHA__T(gemm_ws_floats_mt)
#define mha__gemm_mt_pp MHA__T(gemm_mt_pp)
#define mha__gemm_mt MHA__T(gemm_mt)
#define mha__softcap MHA__T(softcap)
#define mha__pv MHA__T(pv)
#define mha__attend_rows MHA__T(attend_rows)
#define mha__vexp_nonpos MHA__T(vexp_nonpos)
#define mha__fused_sizes MHA__T(fused_sizes)
#define mha__fused_conv MHA__T(fused_conv)
#define mha__fused_pack MHA__T(fused_pack)
#define mha__mask_tile_t MHA__T(mask_tile_t)
#define mha__fused_stats_tile MHA__T(fused_stats_tile)
#define mha__vload_dt MHA__T(vload_dt)
#define mha__load_dt MHA__T(load_dt)
#define mha__nscores_nc MHA__T(nscores_nc)
#define mha__npv_chunk MHA__T(npv_chunk)
#define mha__npv_nc MHA__T(npv_nc)
#define mha__npv_chunk1 MHA__T(npv_chunk1)
#define mha__narrow_scores MHA__T(narrow_scores)
#define mha__narrow_pv MHA__T(narrow_pv)
#define mha__ngroup MHA__T(ngroup)
#define mha__attend_fused MHA__T(attend_fused)
#define mha__merge_partials MHA__T(merge_partials)
#define mha__split_parts MHA__T(split_parts)
#define mha__part_floats MHA__T(part_floats)
#define mha__split_buffer_parts MHA__T(split_buffer_parts)
#define mha__attn_scratch_floats MHA__T(attn_scratch_floats)
#define mha__head_blocks MHA__T(head_blocks)
#define mha__head_block MHA__T(head_block)
#define mha__attend_all MHA__T(attend_all)
#define mha__head_backward_gws MHA__T(head_backward_gws)
#define mha__exp_shift MHA__T(exp_shift)
#define mha__fbwd_thread_floats MHA__T(fbwd_thread_floats)
#define mha__fbwd_flags_at MHA__T(fbwd_flags_at)
#define mha__fbwd_floats MHA__T(fbwd_floats)
#define mha__fbwd_scores MHA__T(fbwd_scores)
#define mha__fbwd_skip MHA__T(fbwd_skip)
#define mha__fbwd_tile MHA__T(fbwd_tile)
#define mha__attend_backward_fused MHA__T(attend_backward_fused)

#if defined(MHA__TIER1_AVX2)
#define MHA__TIER_SFX _avx2
#define MHA__PASS_TIER 1
MHA__TARGET_BEGIN("avx2,fma,f16c")
#include __FILE_NAME__
MHA__TARGET_END
#undef MHA__TIER_SFX
#undef MHA__PASS_TIER
#endif

#if defined(MHA__TIER2_AVX512)
#define MHA__TIER_SFX _avx512
#define MHA__PASS_TIER 2
MHA__TARGET_BEGIN("avx512f,avx2,fma")
#include __FILE_NAME__
MHA__TARGET_END
#undef MHA__TIER_SFX
#undef MHA__PASS_TIER
#endif

/* tier 0 last, so that the SIMD layer's and the GEMM's macros (MHA__VW,
   MHA__MR, ...) end as the main pass set them */
#define MHA__TIER_SFX _t0   /* tier 0: the compiler's flags */
#define MHA__PASS_TIER 0
#include __FILE_NAME__
#undef MHA__TIER_SFX
#undef MHA__PASS_TIER

#undef MHA__TIER_PASS
#define MHA__TIER_SFX   /* empty: every renamed name means itself again */

/* The tables of the tiers, by mha__tier() (a tier not compiled runs tier 0's). */
#if defined(MHA__TIER1_AVX2)
#define MHA__TIER1_TAB(t) &mha__##t##_avx2
#else
#define MHA__TIER1_TAB(t) &mha__##t##_t0
#endif
#if defined(MHA__TIER2_AVX512)
#define MHA__TIER2_TAB(t) &mha__##t##_avx512
#else
#define MHA__TIER2_TAB(t) &mha__##t##_t0
#endif
static const mha__gtab *const mha__gtabs[3] = {&mha__gtab_t0, MHA__TIER1_TAB(gtab), MHA__TIER2_TAB(gtab)};
static const mha__atab *const mha__atabs[3] = {&mha__atab_t0, MHA__TIER1_TAB(atab), MHA__TIER2_TAB(atab)};
static const mha__gtab *mha__gk(void) { return mha__gtabs[mha__tier()]; }
static const mha__atab *mha__ak(void) { return mha__atabs[mha__tier()]; }
#endif /* MHA__DISPATCH */
#endif /* main pass */
#endif /* MHA_IMPLEMENTATION_DONE || MHA__TIER_PASS */
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
