/* tiny_gpt.h - the model core of examples/tiny_gpt.c: a decoder-only, causal,
   byte-level Transformer (GPT) built from mha.h's pieces, with its forward,
   backward, AdamW step, KV-cache decoding and sampling.

   Include it after mha.h in the file that defines MHA_IMPLEMENTATION (it calls
   mha.h; every function here is static, as in gpt_ckpt.h).  tests/test_gpt_train.c includes it to
   run a short training in `make test`.  Every function that can fail returns
   an mha_status and takes an mha_error * last (NULL allowed), as mha.h does:
   a refusal says which call, which argument and why.

   THE MODEL  (B sequences of T bytes, N = B*T rows, d = d_model, V = 256)
     x0     = wte[tok] + wpe[pos]                       [N, d]
     x(l+1) = block_l(x(l)),  l = 0..n_layer-1          [N, d]
              block = nn.TransformerEncoderLayer(norm_first = True, ReLU, causal):
                h = x + SA(LN1(x));   y = h + FF(LN2(h))     (the GPT-2 block)
     xf     = LN_f(x(n_layer))                          [N, d]
     logits = xf wte^T                                  [N, V]  (tied LM head)
     loss   = mean cross-entropy(logits, next byte)     nats per byte
   The residual streams x(0..n_layer) are kept for the backward.  Training
   runs each block through an encoder plan made with MHA_PLAN_TRAINING: its
   forward writes the block's insides into that layer's saved region
   (mha_run.saved) and its backward reads them from there instead of
   computing the block again.  The layers run one after another, so one
   workspace serves them all.
*/
#ifndef TINY_GPT_H
#define TINY_GPT_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gpt_ckpt.h"
#include "tiny_rng.h"

#define GPT_MAX_LAYERS 64   /* the decoder keeps one KV cache per layer in a fixed array */

typedef struct gpt_model {
    gpt_config c;
    gpt_layout o;
    float *p, *g, *m, *v;    /* parameters, gradients, AdamW moments: o.total each */
    int cap;                 /* rows (B*T) the activation buffers hold */
    float *res;              /* n_layer + 1 residual streams, [cap, d] each */
    float *xf, *dxf, *dx, *dy;                   /* [cap, d] */
    float *logits, *dlogits;                     /* [cap, V] */
    void *ws;                /* the workspace of every mha.h call (one runs at a time) */
    size_t ws_bytes;
    /* training: one MHA_PLAN_TRAINING encoder plan per layer, for batches of
       exactly cap / ctx sequences, and per layer a saved region of
       saved_bytes: the layer's forward writes there what its backward needs */
    mha_plan *plan[GPT_MAX_LAYERS];
    void *saved[GPT_MAX_LAYERS];
    size_t saved_bytes;
    int saved_T;             /* T of the forward whose blocks fill saved[]; 0: none */
} gpt_model;

/* layer l of the flat array p as an nn.TransformerEncoderLayer */
GPT__FN mha_encoder_layer gpt_layer(const gpt_model *M, const float *p, int l)
{
    const gpt_layout *o = &M->o;
    const float *q = p + o->layer0 + (size_t)l * o->layer_stride;
    mha_encoder_layer ly;
    memset(&ly, 0, sizeof ly);
    ly.self_attn.embed_dim = M->c.d_model;
    ly.self_attn.num_heads = M->c.n_head;
    ly.self_attn.in_proj_weight = q + o->in_w;   ly.self_attn.in_proj_bias = q + o->in_b;
    ly.self_attn.out_proj_weight = q + o->out_w; ly.self_attn.out_proj_bias = q + o->out_b;
    ly.dim_feedforward = M->c.d_ff;
    ly.activation = MHA_ACT_RELU;
    ly.norm_first = 1;
    ly.linear1_weight = q + o->l1_w; ly.linear1_bias = q + o->l1_b;
    ly.linear2_weight = q + o->l2_w; ly.linear2_bias = q + o->l2_b;
    ly.norm1_weight = q + o->n1_w;   ly.norm1_bias = q + o->n1_b;
    ly.norm2_weight = q + o->n2_w;   ly.norm2_bias = q + o->n2_b;
    return ly;
}

GPT__FN mha_encoder_layer_grad gpt_layer_grad(const gpt_model *M, float *g, int l)
{
    const gpt_layout *o = &M->o;
    float *q = g + o->layer0 + (size_t)l * o->layer_stride;
    mha_encoder_layer_grad gr;
    memset(&gr, 0, sizeof gr);
    gr.self_attn.in_proj_weight = q + o->in_w;   gr.self_attn.in_proj_bias = q + o->in_b;
    gr.self_attn.out_proj_weight = q + o->out_w; gr.self_attn.out_proj_bias = q + o->out_b;
    gr.linear1_weight = q + o->l1_w; gr.linear1_bias = q + o->l1_b;
    gr.linear2_weight = q + o->l2_w; gr.linear2_bias = q + o->l2_b;
    gr.norm1_weight = q + o->n1_w;   gr.norm1_bias = q + o->n1_b;
    gr.norm2_weight = q + o->n2_w;   gr.norm2_bias = q + o->n2_b;
    return gr;
}

GPT__FN mha_options gpt_causal(void)
{
    mha_options opt;
    memset(&opt, 0, sizeof opt);
    opt.causal = 1;            /* square L x L: top-left and bottom-right agree */
    opt.per_head_weights = 1;  /* when weights are asked for: [B, H, L, L] */
    return opt;
}

GPT__FN void gpt_free(gpt_model *M)
{
    int l;
    for (l = 0; l < GPT_MAX_LAYERS; ++l) { mha_plan_destroy(M->plan[l]); free(M->saved[l]); }
    free(M->p); free(M->g); free(M->m); free(M->v); free(M->res); free(M->xf);
    free(M->dxf); free(M->dx); free(M->dy); free(M->logits); free(M->dlogits); free(M->ws);
    memset(M, 0, sizeof *M);
}

/* The bytes of the workspace every call of gpt_forward / gpt_backward fits
   in, for batches of up to B sequences of ctx bytes: the largest of a
   block's one-shot forward with its weights (the views), its one-shot
   backward, a training plan's runs (the same sizes) and the LM head's GEMMs. */
GPT__FN mha_status gpt__workspace_size(const gpt_model *M, int B, size_t *bytes, mha_error *err)
{
    const int N = B * M->c.ctx, V = M->c.vocab, d = M->c.d_model;
    const mha_trans t[3][2] = {{MHA_NO_TRANS, MHA_TRANS}, {MHA_NO_TRANS, MHA_NO_TRANS}, {MHA_TRANS, MHA_NO_TRANS}};
    const int mnk[3][3] = {{N, V, d}, {N, d, V}, {V, d, N}};   /* logits, dxf, dwte */
    const unsigned flags[2] = {MHA_PLAN_WEIGHTS, MHA_PLAN_TRAINING};
    mha_encoder_layer ly = gpt_layer(M, M->p, 0);
    mha_options opt = gpt_causal();
    mha_sizes sz;
    mha_status st;
    int i;
    *bytes = 0;
    for (i = 0; i < 2; ++i) {
        if ((st = mha_encoder_plan_size(&ly, B, M->c.ctx, &opt, flags[i], &sz, err)) != MHA_OK) return st;
        if (sz.workspace > *bytes) *bytes = sz.workspace;
    }
    for (i = 0; i < 3; ++i) {
        st = mha_gemm_plan_size(t[i][0], t[i][1], mnk[i][0], mnk[i][1], mnk[i][2], 0, &sz, err);
        if (st != MHA_OK) return st;
        if (sz.workspace > *bytes) *bytes = sz.workspace;
    }
    return MHA_OK;
}

/* Allocate a model for up to max_batch sequences of c->ctx bytes; parameters
   zero.  With training nonzero also the gradients, the AdamW moments, and per
   layer the training plan and its saved region, all here: a training step
   allocates nothing. */
GPT__FN mha_status gpt_alloc(gpt_model *M, const gpt_config *c, int max_batch, int training,
                             mha_error *err)
{
    size_t rows, nd, nv;
    mha_options opt = gpt_causal();
    mha_status st = MHA_OK;
    const char *fault;
    mha_report__clear(err);
    memset(M, 0, sizeof *M);
    if (!c) return mha_report__sign(err, "gpt_alloc", MHA_ERR_NULL_POINTER, "c", "is NULL");
    if ((fault = gpt__config_fault(c)) != NULL)
        return mha_report__sign(err, "gpt_alloc", MHA_ERR_INVALID_SIZE, "c", "%s is out of range", fault);
    if (max_batch < 1)
        return mha_report__sign(err, "gpt_alloc", MHA_ERR_INVALID_SIZE, "max_batch", "is %d, expected >= 1",
                                max_batch);
    if (training && c->n_layer > GPT_MAX_LAYERS)
        return mha_report__sign(err, "gpt_alloc", MHA_ERR_INVALID_SIZE, "c", "n_layer is %d; training keeps a plan "
                                "per layer for at most %d", c->n_layer, GPT_MAX_LAYERS);
    M->c = *c;
    M->o = gpt_layout_make(c);
    M->cap = max_batch * c->ctx;
    rows = (size_t)M->cap;
    nd = rows * (size_t)c->d_model;
    nv = rows * (size_t)c->vocab;
    M->p = (float *)calloc(M->o.total, sizeof(float));
    M->res = (float *)malloc(nd * (size_t)(c->n_layer + 1) * sizeof(float));
    M->xf = (float *)malloc(nd * sizeof(float));
    M->logits = (float *)malloc(nv * sizeof(float));
    if (training) {
        M->g = (float *)calloc(M->o.total, sizeof(float));
        M->m = (float *)calloc(M->o.total, sizeof(float));
        M->v = (float *)calloc(M->o.total, sizeof(float));
        M->dxf = (float *)malloc(nd * sizeof(float));
        M->dx = (float *)malloc(nd * sizeof(float));
        M->dy = (float *)malloc(nd * sizeof(float));
        M->dlogits = (float *)malloc(nv * sizeof(float));
    }
    if (!M->p) st = MHA_ERR_OUT_OF_MEMORY;   /* gpt_layer below points into it */
    if (st == MHA_OK) st = gpt__workspace_size(M, max_batch, &M->ws_bytes, err);
    if (st == MHA_OK) M->ws = malloc(M->ws_bytes);
    if (st == MHA_OK && (!M->res || !M->xf || !M->logits || !M->ws ||
                         (training && (!M->g || !M->m || !M->v || !M->dxf || !M->dx || !M->dy ||
                                       !M->dlogits))))
        st = MHA_ERR_OUT_OF_MEMORY;
    if (training && st == MHA_OK) {   /* the plans borrow the layers' weights inside M->p */
        int l;
        for (l = 0; l < c->n_layer && st == MHA_OK; ++l) {
            mha_encoder_layer ly = gpt_layer(M, M->p, l);
            mha_sizes sz = {0, 0, 0};
            st = mha_encoder_plan(&ly, max_batch, c->ctx, &opt, MHA_PLAN_TRAINING, NULL, 0, &M->plan[l], err);
            if (st == MHA_OK) st = mha_plan_sizes(M->plan[l], &sz, err);
            if (st == MHA_OK && sz.workspace > M->ws_bytes)   /* sized above; never expected */
                st = mha_report__sign(err, "gpt_alloc", MHA_ERR_WORKSPACE_TOO_SMALL, "M->ws",
                                      "the plan of layer %d needs %lu bytes, %lu were sized", l,
                                      (unsigned long)sz.workspace, (unsigned long)M->ws_bytes);
            /* the saved forward: one region per layer, since every layer's
               backward is pending when the last forward is done */
            if (st == MHA_OK) {
                M->saved_bytes = sz.saved;
                if (!(M->saved[l] = malloc(sz.saved))) st = MHA_ERR_OUT_OF_MEMORY;
            }
        }
    }
    if (st == MHA_ERR_OUT_OF_MEMORY && err && err->status == MHA_OK)
        mha_report__sign(err, "gpt_alloc", st, "max_batch", "the buffers of %d sequences of %d bytes do not fit "
                         "in memory", max_batch, c->ctx);
    if (st != MHA_OK) gpt_free(M);
    return st;
}

/* Does a batch of B sequences of T bytes run through the training plans? */
GPT__FN int gpt_planned(const gpt_model *M, int B, int T)
{
    return M->plan[0] && B * M->c.ctx == M->cap && T <= M->c.ctx;
}

/* GPT-2's initialisation with uniform draws of the same spread: weights
   std 0.02 (U(-a, a), a = 0.02 sqrt 3), the two projections that write into
   the residual stream scaled by 1/sqrt(2 n_layer), biases 0, layer norms 1 and 0. */
GPT__FN void gpt_init(gpt_model *M, tiny_rng *r)
{
    const gpt_layout *o = &M->o;
    size_t d = (size_t)M->c.d_model, F = (size_t)M->c.d_ff, i;
    float a = 0.02f * sqrtf(3.0f), ar = a / sqrtf(2.0f * (float)M->c.n_layer);
    int l;
    memset(M->p, 0, o->total * sizeof(float));
    tiny_rng_fill(r, M->p + o->wte, (size_t)M->c.vocab * d, a);
    tiny_rng_fill(r, M->p + o->wpe, (size_t)M->c.ctx * d, a);
    for (l = 0; l < M->c.n_layer; ++l) {
        float *q = M->p + o->layer0 + (size_t)l * o->layer_stride;
        tiny_rng_fill(r, q + o->in_w, 3 * d * d, a);
        tiny_rng_fill(r, q + o->out_w, d * d, ar);
        tiny_rng_fill(r, q + o->l1_w, F * d, a);
        tiny_rng_fill(r, q + o->l2_w, d * F, ar);
        for (i = 0; i < d; ++i) q[o->n1_w + i] = q[o->n2_w + i] = 1.0f;
    }
    for (i = 0; i < d; ++i) M->p[o->lnf_w + i] = 1.0f;
}

/* Redraw every layer's query and key projections (the first 2d rows of
   in_proj_weight) as U(-a, a) with a = std sqrt 3 (tiny_gpt train --qk-std).
   The attention logits are products of the two: from std 0.02 they start
   near 0 and every head attends almost uniformly.  PyTorch's own
   nn.MultiheadAttention draws in_proj_weight with Xavier's bound, std
   sqrt(2 / (d + 3d)) = 0.0625 at d = 128.  Tried against the early plateau
   at the pair-frequency loss; it did not shorten it (docs/training.md). */
GPT__FN void gpt_init_qk(gpt_model *M, tiny_rng *r, float std)
{
    size_t d = (size_t)M->c.d_model;
    int l;
    for (l = 0; l < M->c.n_layer; ++l)
        tiny_rng_fill(r, M->p + M->o.layer0 + (size_t)l * M->o.layer_stride + M->o.in_w, 2 * d * d,
                     std * sqrtf(3.0f));
}

/* Start the position table from the sinusoids of "Attention Is All You Need"
   (mha_positional_encoding), scaled to the same spread as the other tables
   (each sin/cos pair has unit norm, so sqrt 2 * 0.02 gives an RMS of 0.02);
   they stay trainable (tiny_gpt train --pos sin).  Offsets between positions
   are then linear maps of the sinusoids from the first step, which a
   previous-token head needs.  Tried against the early plateau at the
   pair-frequency loss; it did not shorten it (docs/training.md). */
GPT__FN mha_status gpt_init_positions(gpt_model *M, mha_error *err)
{
    size_t n = (size_t)M->c.ctx * M->c.d_model, i;
    float *pe = M->p + M->o.wpe;
    mha_status st = mha_positional_encoding(M->c.ctx, M->c.d_model, pe, err);
    if (st != MHA_OK) return st;
    for (i = 0; i < n; ++i) pe[i] *= 0.02f * sqrtf(2.0f);
    return MHA_OK;
}

/* Mean cross-entropy of n rows, and (dlogits not NULL) its gradient, in
   fixed chunks of GPT_CE_ROWS rows shared among the OpenMP threads: the
   exp of every logit is a good part of a step, and the chunks (not the
   thread count) fix the result.  Each chunk's mha_cross_entropy is the mean
   over its own rows; the chunk's share of the whole mean is rows / n.
   Every target must be a byte (0..V-1): no ignored rows. */
#define GPT_CE_ROWS 128
GPT__FN mha_status gpt_cross_entropy(int n, int V, const float *logits, const int *targets, float *loss,
                                     float *dlogits, mha_error *err)
{
    int chunks = (n + GPT_CE_ROWS - 1) / GPT_CE_ROWS, c, bad = 0;
    double total = 0;
    float part[64];
    mha_status st;
    mha_report__clear(err);
    if (chunks > 64) return mha_cross_entropy(n, V, logits, targets, loss, dlogits, NULL, err);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(+ : bad)
#endif
    for (c = 0; c < chunks; ++c) {
        int r0 = c * GPT_CE_ROWS, rows = n - r0 < GPT_CE_ROWS ? n - r0 : GPT_CE_ROWS;
        size_t at = (size_t)r0 * V, k;
        float *dz = dlogits ? dlogits + at : NULL;
        /* no mha_error here: the threads would share it; a refusal is found again below */
        if (mha_cross_entropy(rows, V, logits + at, targets + r0, &part[c], dz, NULL, NULL) != MHA_OK) ++bad;
        else if (dz && rows != n)
            for (k = 0; k < (size_t)rows * V; ++k) dz[k] *= (float)rows / (float)n;
    }
    if (bad) {   /* say which target, or let one call over all rows say what it refuses */
        for (c = 0; targets && c < n; ++c)
            if (targets[c] >= V)
                return mha_report__sign(err, "gpt_cross_entropy", MHA_ERR_INVALID_ARGUMENT, "targets",
                                        "targets[%d] is %d, expected 0..%d", c, targets[c], V - 1);
        if ((st = mha_cross_entropy(n, V, logits, targets, loss, NULL, NULL, err)) != MHA_OK) return st;
        return mha_report__sign(err, "gpt_cross_entropy", MHA_ERR_INVALID_ARGUMENT, "targets", "a chunk was refused");
    }
    for (c = 0; c < chunks; ++c) {
        int rows = n - c * GPT_CE_ROWS < GPT_CE_ROWS ? n - c * GPT_CE_ROWS : GPT_CE_ROWS;
        total += (double)part[c] * rows;
    }
    *loss = (float)(total / n);
    return MHA_OK;
}

/* A step's batch: B sequences of T bytes, T within the context, B*T rows
   within what the model was allocated for. */
GPT__FN int gpt__batch_fits(const gpt_model *M, int B, int T)
{
    return B >= 1 && T >= 1 && T <= M->c.ctx && (size_t)B * T <= (size_t)M->cap;
}
GPT__FN mha_status gpt__batch_refused(const gpt_model *M, int B, int T, const char *fn, mha_error *err)
{
    return mha_report__sign(err, fn, MHA_ERR_INVALID_SIZE, B < 1 || (size_t)B * T > (size_t)M->cap ? "B" : "T",
                            "B = %d sequences of T = %d bytes; the model takes T in 1..%d and B*T <= %d", B, T,
                            M->c.ctx, M->cap);
}

/* Forward of B sequences of T <= ctx bytes.  targets (may be NULL): next bytes,
   giving *loss and, when M has training buffers, dlogits for the backward.
   attn (may be NULL): n_layer pointers, each NULL or [B, H, T, T] per-head weights.
   A batch of the trained size (gpt_planned) runs through the training plans
   and leaves each block's saved forward for gpt_backward. */
GPT__FN mha_status gpt_forward(gpt_model *M, int B, int T, const int *tokens, const int *targets,
                              float *loss, float *const *attn, mha_error *err)
{
    const gpt_layout *o = &M->o;
    int d = M->c.d_model, V = M->c.vocab, N = B * T, b, t, l, save;
    size_t nd = (size_t)N * d;
    mha_options opt = gpt_causal();
    mha_run run = {0};
    mha_status st;
    mha_report__clear(err);
    if (!gpt__batch_fits(M, B, T)) return gpt__batch_refused(M, B, T, "gpt_forward", err);
    run.workspace = M->ws;
    run.workspace_bytes = M->ws_bytes;
    /* x0 = wte[tok] + wpe[pos] */
    if ((st = mha_embedding_forward(N, V, d, tokens, M->p + o->wte, M->res, err)) != MHA_OK) return st;
    for (b = 0; b < B; ++b)
        for (t = 0; t < T; ++t) {
            float *x = M->res + ((size_t)b * T + t) * d;
            const float *pe = M->p + o->wpe + (size_t)t * d;
            int i;
            for (i = 0; i < d; ++i) x[i] += pe[i];
        }
    save = gpt_planned(M, B, T) && !attn;
    M->saved_T = 0;   /* the saved regions hold this forward's blocks only when save is set */
    for (l = 0; l < M->c.n_layer; ++l) {
        const float *x = M->res + l * nd;
        float *y = M->res + (l + 1) * nd;
        if (save) {   /* the training plan; its backward will read run.saved */
            run.saved = M->saved[l];
            run.saved_bytes = M->saved_bytes;
            st = mha_encoder_run_forward(M->plan[l], T, x, y, &run, err);
        } else {      /* another batch size, or the weights wanted: one shot */
            mha_encoder_layer ly = gpt_layer(M, M->p, l);
            run.weights = attn ? attn[l] : NULL;
            st = mha_encoder_forward(&ly, B, T, x, &opt, y, &run, err);
        }
        if (st != MHA_OK) return st;
    }
    if (save) M->saved_T = T;
    run.saved = NULL;   /* the GEMM below takes the workspace only */
    run.saved_bytes = 0;
    run.weights = NULL;
    st = mha_layernorm_forward(N, d, M->res + M->c.n_layer * nd, M->p + o->lnf_w, M->p + o->lnf_b,
                               0.0f, M->xf, err);
    if (st != MHA_OK) return st;
    /* logits = xf wte^T, on OpenMP's threads (mha_linear_forward runs on one) */
    st = mha_gemm(MHA_NO_TRANS, MHA_TRANS, N, V, d, 1.0f, M->xf, d, M->p + o->wte, d, 0.0f, M->logits, V,
                  &run, err);
    if (st != MHA_OK) return st;
    if (targets && loss) st = gpt_cross_entropy(N, V, M->logits, targets, loss, M->g ? M->dlogits : NULL, err);
    return st;
}

/* Gradients of the last gpt_forward (with targets) into M->g, zeroed first.
   Each block's backward reads what that forward saved when it ran through
   the training plans at this T; otherwise it computes the block again. */
GPT__FN mha_status gpt_backward(gpt_model *M, int B, int T, const int *tokens, mha_error *err)
{
    const gpt_layout *o = &M->o;
    int d = M->c.d_model, V = M->c.vocab, N = B * T, b, t, l;
    size_t nd = (size_t)N * d;
    mha_options opt = gpt_causal();
    mha_run run = {0};
    mha_status st;
    float *dx = M->dx, *dy = M->dy, *swap;
    mha_report__clear(err);
    if (!M->g) return mha_report__sign(err, "gpt_backward", MHA_ERR_NULL_POINTER, "M->g", "is NULL: the model "
                                       "was allocated without training buffers");
    if (!gpt__batch_fits(M, B, T)) return gpt__batch_refused(M, B, T, "gpt_backward", err);
    run.workspace = M->ws;
    run.workspace_bytes = M->ws_bytes;
    memset(M->g, 0, o->total * sizeof(float));
    memset(dy, 0, nd * sizeof(float));
    /* logits = xf wte^T:  dxf = dlogits wte,  dwte = dlogits^T xf (the first gradient into wte) */
    st = mha_gemm(MHA_NO_TRANS, MHA_NO_TRANS, N, d, V, 1.0f, M->dlogits, V, M->p + o->wte, d, 0.0f, M->dxf, d,
                  &run, err);
    if (st == MHA_OK)
        st = mha_gemm(MHA_TRANS, MHA_NO_TRANS, V, d, N, 1.0f, M->dlogits, V, M->xf, d, 0.0f, M->g + o->wte, d,
                      &run, err);
    if (st != MHA_OK) return st;
    st = mha_layernorm_backward(N, d, M->res + M->c.n_layer * nd, M->p + o->lnf_w, 0.0f, M->dxf, dy,
                                M->g + o->lnf_w, M->g + o->lnf_b, err);
    if (st != MHA_OK) return st;
    /* dy holds dLoss/dx(l+1); each block's backward adds dLoss/dx(l) into dx */
    for (l = M->c.n_layer - 1; l >= 0; --l) {
        mha_encoder_layer_grad gr = gpt_layer_grad(M, M->g, l);
        memset(dx, 0, nd * sizeof(float));
        if (gpt_planned(M, B, T)) {
            /* the block's insides as its forward saved them (or, with
               run.saved NULL, computed again from x(l)) */
            run.saved = M->saved_T == T ? M->saved[l] : NULL;
            run.saved_bytes = run.saved ? M->saved_bytes : 0;
            st = mha_encoder_run_backward(M->plan[l], T, M->res + l * nd, dy, dx, &gr, &run, err);
        } else {
            mha_encoder_layer ly = gpt_layer(M, M->p, l);
            st = mha_encoder_backward(&ly, B, T, M->res + l * nd, dy, &opt, dx, &gr, &run, err);
        }
        if (st != MHA_OK) return st;
        swap = dx; dx = dy; dy = swap;
    }
    /* x0 = wte[tok] + wpe[pos]: both tables receive dLoss/dx0 */
    if ((st = mha_embedding_backward(N, V, d, tokens, dy, M->g + o->wte, err)) != MHA_OK) return st;
    for (b = 0; b < B; ++b)
        for (t = 0; t < T; ++t) {
            const float *gx = dy + ((size_t)b * T + t) * d;
            float *gp = M->g + o->wpe + (size_t)t * d;
            int i;
            for (i = 0; i < d; ++i) gp[i] += gx[i];
        }
    return MHA_OK;
}

/* Scale the gradient so its global L2 norm is at most clip; returns the norm before. */
GPT__FN float gpt_clip_grad(gpt_model *M, float clip)
{
    double s = 0;
    size_t i;
    float norm;
    for (i = 0; i < M->o.total; ++i) s += (double)M->g[i] * M->g[i];
    norm = (float)sqrt(s);
    if (clip > 0.0f && norm > clip) {
        float k = clip / norm;
        for (i = 0; i < M->o.total; ++i) M->g[i] *= k;
    }
    return norm;
}

/* Linear warm-up over `warmup` steps, then cosine decay to lr_min at `total`. */
GPT__FN float gpt_lr(long step, long warmup, long total, float lr_max, float lr_min)
{
    double t;
    if (step <= warmup) return lr_max * (float)step / (float)warmup;
    if (step >= total) return lr_min;
    t = (double)(step - warmup) / (double)(total - warmup);
    return lr_min + (lr_max - lr_min) * 0.5f * (float)(1.0 + cos(3.14159265358979 * t));
}

/* The same shape against the fraction of the budget used, progress in 0..1
   (a run limited by time does not know its step count in advance):
     lr = min(1, step / warmup) * (lr_min + (lr_max - lr_min) (1 + cos(pi progress)) / 2) */
GPT__FN float gpt_lr_progress(long step, long warmup, double progress, float lr_max, float lr_min)
{
    double p = progress < 0 ? 0 : progress > 1 ? 1 : progress;
    float w = step < warmup ? (float)step / (float)warmup : 1.0f;
    return w * (lr_min + (lr_max - lr_min) * 0.5f * (float)(1.0 + cos(3.14159265358979 * p)));
}

/* B random windows of T + 1 bytes from text[0..n): inputs and next-byte targets.
   A fraction `copy` of them (0..1) has a stretch of its own bytes written a
   second time further on (the stretch 8..T/2 bytes long, both copies inside
   the window): real text that repeats, so that predicting the second copy
   rewards looking back at what followed the first (an induction head). */
GPT__FN void gpt_batch_copy(const unsigned char *text, size_t n, int B, int T, double copy, tiny_rng *r,
                            int *tok, int *tgt)
{
    int b, t;
    for (b = 0; b < B; ++b) {
        const unsigned char *w = text + (size_t)(((unsigned long long)tiny_rng_u32(r) << 32 | tiny_rng_u32(r)) %
                                                 (unsigned long long)(n - (size_t)T));
        int S = 0, i = 0, j = 0;
        if (copy > 0 && T >= 16 && tiny_rng_uniform(r) < copy) {
            /* bytes j..j+S-1 of the window become bytes i..i+S-1 again: i + S <= j, j + S <= T + 1 */
            S = 8 + (int)(tiny_rng_u32(r) % (unsigned)(T / 2 - 7));
            i = (int)(tiny_rng_u32(r) % (unsigned)(T + 2 - 2 * S));
            j = i + S + (int)(tiny_rng_u32(r) % (unsigned)(T + 2 - 2 * S - i));
        }
        for (t = 0; t <= T; ++t) {
            int v = t >= j && t < j + S ? w[i + t - j] : w[t];
            if (t < T) tok[b * T + t] = v;
            if (t > 0) tgt[b * T + t - 1] = v;
        }
    }
}

/* B random windows of T + 1 bytes from text[0..n), as they are. */
GPT__FN void gpt_batch(const unsigned char *text, size_t n, int B, int T, tiny_rng *r, int *tok, int *tgt)
{
    gpt_batch_copy(text, n, B, T, 0.0, r, tok, tgt);
}

/* AdamW over the whole parameter array, the weight decay applied to the
   matrices only (wte, wpe and each layer's four weight matrices), not to
   biases and layer-norm gains, as GPT training does. */
GPT__FN mha_status gpt_adamw_step(gpt_model *M, const mha_adamw *opt, long step, mha_error *err)
{
    const gpt_layout *o = &M->o;
    size_t d = (size_t)M->c.d_model, F = (size_t)M->c.d_ff, at = 0, k;
    /* per layer, in layout order: (offset, length, decayed) */
    const size_t lay[4][2] = {{o->in_w, 3 * d * d}, {o->out_w, d * d}, {o->l1_w, F * d}, {o->l2_w, d * F}};
    mha_adamw nd = *opt;
    mha_status st;
    int l, i;
    nd.weight_decay = 0.0f;
    /* one call per run of equal decay: [wte, wpe] decayed, then per layer */
    if ((st = mha_adamw_step(opt, step, o->layer0, M->p, M->g, M->m, M->v, err)) != MHA_OK) return st;
    at = o->layer0;
    for (l = 0; l < M->c.n_layer; ++l) {
        size_t base = o->layer0 + (size_t)l * o->layer_stride;
        for (i = 0; i < 4; ++i) {
            k = base + lay[i][0];
            if (k > at && (st = mha_adamw_step(&nd, step, k - at, M->p + at, M->g + at, M->m + at,
                                               M->v + at, err)) != MHA_OK)
                return st;
            if ((st = mha_adamw_step(opt, step, lay[i][1], M->p + k, M->g + k, M->m + k,
                                     M->v + k, err)) != MHA_OK)
                return st;
            at = k + lay[i][1];
        }
    }
    return mha_adamw_step(&nd, step, o->total - at, M->p + at, M->g + at, M->m + at, M->v + at, err);
}

/* One optimisation step on a batch: forward, backward, clip, AdamW (decay on
   the matrices).  *loss gets the batch loss (before the update). */
GPT__FN mha_status gpt_train_step(gpt_model *M, const mha_adamw *opt, long step, int B, int T,
                                 const int *tok, const int *tgt, float clip, float *loss, mha_error *err)
{
    mha_status st;
    if ((st = gpt_forward(M, B, T, tok, tgt, loss, NULL, err)) != MHA_OK) return st;
    if ((st = gpt_backward(M, B, T, tok, err)) != MHA_OK) return st;
    gpt_clip_grad(M, clip);
    return gpt_adamw_step(M, opt, step, err);
}

/* Mean loss over the whole of text[0..n) cut into windows of T + 1 bytes,
   at most max_windows of them (evenly spread), B windows per forward. */
GPT__FN mha_status gpt_eval(gpt_model *M, const unsigned char *text, size_t n, int B, int T,
                           int max_windows, int *tok, int *tgt, double *loss, mha_error *err)
{
    size_t windows = n > 0 && T > 0 ? (n - 1) / (size_t)T : 0, stride, w;
    double total = 0;
    int b, t, count = 0;
    mha_status st;
    mha_report__clear(err);
    if (windows == 0 || max_windows < 1)
        return mha_report__sign(err, "gpt_eval", MHA_ERR_INVALID_SIZE, windows == 0 ? "n" : "max_windows",
                                "%lu bytes of text hold %lu windows of T + 1 = %d bytes; max_windows %d",
                                (unsigned long)n, (unsigned long)windows, T + 1, max_windows);
    stride = windows > (size_t)max_windows ? windows / (size_t)max_windows : 1;
    for (w = 0; w < windows && count < max_windows;) {
        float l;
        for (b = 0; b < B && w < windows && count < max_windows; ++b, w += stride, ++count)
            for (t = 0; t < T; ++t) {
                tok[b * T + t] = text[w * T + t];
                tgt[b * T + t] = text[w * T + t + 1];
            }
        if ((st = gpt_forward(M, b, T, tok, tgt, &l, NULL, err)) != MHA_OK) return st;
        total += (double)l * b;
    }
    *loss = total / count;
    return MHA_OK;
}

/* The logits of the byte that follows ctx[0..n), by recomputing the whole
   causal forward over the last min(n, ctx) bytes: the reference that the
   KV-cache decoder below is tested against (tests/test_gpt_train.c). */
GPT__FN mha_status gpt_next_logits(gpt_model *M, const int *ctx, int n, float *logits, mha_error *err)
{
    int T = n < M->c.ctx ? n : M->c.ctx;
    mha_status st;
    mha_report__clear(err);
    if (n < 1) return mha_report__sign(err, "gpt_next_logits", MHA_ERR_INVALID_SIZE, "n", "is %d, expected >= 1", n);
    if ((st = gpt_forward(M, 1, T, ctx + (n - T), NULL, NULL, NULL, err)) != MHA_OK) return st;
    memcpy(logits, M->logits + (size_t)(T - 1) * M->c.vocab, (size_t)M->c.vocab * sizeof(float));
    return MHA_OK;
}

/* ---------------------------------------------------------- KV-cache decoding

   One mha_kv_cache per layer (B = 1, Hkv = H, D = d/H, capacity = ctx) holds
   the keys and values of every byte seen so far; gpt_decoder_feed runs only
   the new bytes through the blocks, their queries attending to the cache:
   a run of the layer's module plan with run.cache set.  Each plan is made
   once, with MHA_PLAN_CACHE | MHA_PLAN_PACK and Lk = the cache's capacity,
   so the projection weights are packed when the decoder is made, not at
   every byte.  (After the model's parameters change, make the decoder
   again.)  The block is the same pre-norm block as mha_encoder_forward
   computes, written out per row:
       t = LN1(x);  x = x + SA_cached(t);  t = LN2(x);  x = x + W2 relu(W1 t + b1) + b2
   The position table ends at ctx: when the cache is full, gpt_generate starts
   it again from the last ctx/2 bytes (a prefill), so each byte still sees at
   least ctx/2 bytes of context.  */
typedef struct gpt_decoder {
    gpt_model *M;
    mha_kv_cache cache[GPT_MAX_LAYERS];
    int len[GPT_MAX_LAYERS];
    mha_plan *plan[GPT_MAX_LAYERS];  /* each layer's attention, weights packed */
    float *kv;                   /* every layer's K and V: n_layer * 2 * ctx * d */
    float *x, *t, *a, *z;        /* [ctx, d] x3, [ctx, F] */
    void *ws;                    /* the workspace of every call of a step */
    size_t ws_bytes;
    int pos;                     /* bytes in the cache */
} gpt_decoder;

GPT__FN void gpt_decoder_free(gpt_decoder *D)
{
    int l;
    for (l = 0; l < GPT_MAX_LAYERS; ++l) mha_plan_destroy(D->plan[l]);
    free(D->kv); free(D->x); free(D->t); free(D->a); free(D->z); free(D->ws);
    memset(D, 0, sizeof *D);
}

GPT__FN void gpt_decoder_reset(gpt_decoder *D)
{
    int l;
    for (l = 0; l < D->M->c.n_layer; ++l) D->len[l] = 0;
    D->pos = 0;
}

GPT__FN mha_status gpt_decoder_init(gpt_decoder *D, gpt_model *M, mha_error *err)
{
    int T = M->c.ctx, d = M->c.d_model, F = M->c.d_ff, V = M->c.vocab, l, i;
    size_t per = (size_t)T * d, bytes;
    /* causal for a prefill chunk; a single byte's query sees the whole cache
       either way (bottom-right).  One thread: a step is a few rows of work. */
    mha_options opt = gpt_causal();
    const int lin[3][3] = {{T, d, F}, {T, F, d}, {1, d, V}};   /* W1, W2, the LM head */
    mha_status st = MHA_OK;
    mha_report__clear(err);
    memset(D, 0, sizeof *D);
    if (M->c.n_layer > GPT_MAX_LAYERS)
        return mha_report__sign(err, "gpt_decoder_init", MHA_ERR_INVALID_SIZE, "M->c.n_layer", "is %d; the decoder "
                                "holds at most %d caches", M->c.n_layer, GPT_MAX_LAYERS);
    opt.num_threads = 1;
    D->M = M;
    D->kv = (float *)malloc(per * 2 * (size_t)M->c.n_layer * sizeof(float));
    D->x = (float *)malloc(per * sizeof(float));
    D->t = (float *)malloc(per * sizeof(float));
    D->a = (float *)malloc(per * sizeof(float));
    D->z = (float *)malloc((size_t)T * F * sizeof(float));
    for (l = 0; l < M->c.n_layer; ++l) {
        mha_kv_cache *c = &D->cache[l];
        c->B = 1; c->Hkv = M->c.n_head; c->D = d / M->c.n_head; c->capacity = T;
        c->k = D->kv + (size_t)(2 * l) * per;
        c->v = D->kv + (size_t)(2 * l + 1) * per;
        c->len = &D->len[l];
    }
    gpt_decoder_reset(D);
    /* plans for up to ctx new bytes (a prefill) against ctx cached ones; the
       workspace fits the largest call of a step */
    for (l = 0; l < M->c.n_layer && st == MHA_OK; ++l) {
        mha_encoder_layer ly = gpt_layer(M, M->p, l);
        mha_sizes sz = {0, 0, 0};
        st = mha_module_plan(&ly.self_attn, 1, T, T, &opt, MHA_PLAN_PACK | MHA_PLAN_CACHE, NULL, 0, &D->plan[l],
                             err);
        if (st == MHA_OK) st = mha_plan_sizes(D->plan[l], &sz, err);
        if (st == MHA_OK && sz.workspace > D->ws_bytes) D->ws_bytes = sz.workspace;
    }
    for (i = 0; i < 3 && st == MHA_OK; ++i)
        if ((st = mha_linear_workspace_size(lin[i][0], lin[i][1], lin[i][2], &bytes, err)) == MHA_OK &&
            bytes > D->ws_bytes)
            D->ws_bytes = bytes;
    if (st == MHA_OK) D->ws = malloc(D->ws_bytes);
    if (st == MHA_OK && (!D->kv || !D->x || !D->t || !D->a || !D->z || !D->ws))
        st = mha_report__sign(err, "gpt_decoder_init", MHA_ERR_OUT_OF_MEMORY, "M", "the caches of %d layers of %d "
                              "bytes do not fit in memory", M->c.n_layer, T);
    if (st != MHA_OK) gpt_decoder_free(D);
    return st;
}

/* Append n bytes (a prefill when n > 1) and write the logits of the byte after
   the last one.  MHA_ERR_CAPACITY when they do not fit (pos + n > ctx). */
GPT__FN mha_status gpt_decoder_feed(gpt_decoder *D, const int *tok, int n, float *logits, mha_error *err)
{
    gpt_model *M = D->M;
    const gpt_layout *o = &M->o;
    int d = M->c.d_model, F = M->c.d_ff, l, i;
    size_t nd = (size_t)n * d, k;
    mha_run run = {0};
    mha_status st;
    mha_report__clear(err);
    if (!tok || !logits)
        return mha_report__sign(err, "gpt_decoder_feed", MHA_ERR_NULL_POINTER, tok ? "logits" : "tok", "is NULL");
    if (n < 1) return mha_report__sign(err, "gpt_decoder_feed", MHA_ERR_INVALID_SIZE, "n", "is %d, expected >= 1", n);
    if (D->pos + n > M->c.ctx)
        return mha_report__sign(err, "gpt_decoder_feed", MHA_ERR_CAPACITY, "n", "%d more bytes do not fit: the "
                                "caches hold %d of %d", n, D->pos, M->c.ctx);
    run.workspace = D->ws;
    run.workspace_bytes = D->ws_bytes;
    if ((st = mha_embedding_forward(n, M->c.vocab, d, tok, M->p + o->wte, D->x, err)) != MHA_OK) return st;
    for (i = 0; i < n; ++i)
        for (k = 0; k < (size_t)d; ++k) D->x[(size_t)i * d + k] += M->p[o->wpe + (size_t)(D->pos + i) * d + k];
    for (l = 0; l < M->c.n_layer; ++l) {
        mha_encoder_layer ly = gpt_layer(M, M->p, l);
        if ((st = mha_layernorm_forward(n, d, D->x, ly.norm1_weight, ly.norm1_bias, 0.0f, D->t, err)) != MHA_OK)
            return st;
        /* the decode step: project the n new rows with the plan's packed
           weights, append their K and V to the cache, attend to all of it */
        run.cache = &D->cache[l];
        st = mha_module_run_forward(D->plan[l], n, 0, D->t, NULL, NULL, D->a, &run, err);
        run.cache = NULL;
        if (st != MHA_OK) return st;
        for (k = 0; k < nd; ++k) D->x[k] += D->a[k];
        if ((st = mha_layernorm_forward(n, d, D->x, ly.norm2_weight, ly.norm2_bias, 0.0f, D->t, err)) != MHA_OK)
            return st;
        st = mha_linear_forward(n, d, F, D->t, ly.linear1_weight, ly.linear1_bias, D->z, &run, err);
        if (st != MHA_OK) return st;
        for (k = 0; k < (size_t)n * F; ++k) D->z[k] = D->z[k] > 0.0f ? D->z[k] : 0.0f;
        st = mha_linear_forward(n, F, d, D->z, ly.linear2_weight, ly.linear2_bias, D->a, &run, err);
        if (st != MHA_OK) return st;
        for (k = 0; k < nd; ++k) D->x[k] += D->a[k];
    }
    D->pos += n;
    /* only the last row needs the final norm and the LM head */
    st = mha_layernorm_forward(1, d, D->x + nd - d, M->p + o->lnf_w, M->p + o->lnf_b, 0.0f, D->t, err);
    if (st != MHA_OK) return st;
    return mha_linear_forward(1, d, M->c.vocab, D->t, M->p + o->wte, NULL, logits, &run, err);
}

/* Sample from softmax(logits / temperature) restricted to the top_k largest
   (top_k <= 0 or >= V: all).  temperature <= 0 picks the argmax. */
GPT__FN int gpt_sample(const float *logits, int V, float temperature, int top_k, tiny_rng *r)
{
    double sum = 0, u;
    float thresh, mx;
    int j, best = 0;
    for (j = 1; j < V; ++j) if (logits[j] > logits[best]) best = j;
    if (temperature <= 0.0f) return best;
    mx = logits[best];
    /* the k-th largest value by repeated selection: V is small (256) */
    thresh = -INFINITY;
    if (top_k > 0 && top_k < V) {
        float prev = INFINITY;
        int k;
        for (k = 0; k < top_k; ++k) {
            float next = -INFINITY;
            for (j = 0; j < V; ++j) if (logits[j] < prev && logits[j] > next) next = logits[j];
            prev = next;
        }
        thresh = prev;
    }
    for (j = 0; j < V; ++j)
        if (logits[j] >= thresh) sum += exp((double)(logits[j] - mx) / temperature);
    u = tiny_rng_uniform(r) * sum;
    for (j = 0; j < V; ++j) {
        if (logits[j] < thresh) continue;
        u -= exp((double)(logits[j] - mx) / temperature);
        if (u <= 0) return j;
    }
    return best;
}

/* seq[0..len) is the prompt (len >= 1); append n sampled bytes at seq[len..len+n).
   logits: scratch of vocab floats.  With the cache: the prompt's last
   min(len, ctx) bytes are one prefill, then one byte per step; a full cache
   restarts from the last ctx/2 bytes. */
GPT__FN mha_status gpt_generate(gpt_decoder *D, int *seq, int len, int n, float temperature, int top_k,
                                tiny_rng *r, float *logits, mha_error *err)
{
    int ctx = D->M->c.ctx, keep, i;
    mha_status st;
    mha_report__clear(err);
    if (len < 1) return mha_report__sign(err, "gpt_generate", MHA_ERR_INVALID_SIZE, "len", "is %d: the prompt needs "
                                         "at least one byte", len);
    keep = len < ctx ? len : ctx;
    gpt_decoder_reset(D);
    if ((st = gpt_decoder_feed(D, seq + len - keep, keep, logits, err)) != MHA_OK) return st;
    for (i = 0; i < n; ++i) {
        seq[len] = gpt_sample(logits, D->M->c.vocab, temperature, top_k, r);
        ++len;
        if (i + 1 == n) break;
        if (D->pos == ctx) {
            gpt_decoder_reset(D);
            st = gpt_decoder_feed(D, seq + len - ctx / 2, ctx / 2, logits, err);
        } else {
            st = gpt_decoder_feed(D, seq + len - 1, 1, logits, err);
        }
        if (st != MHA_OK) return st;
    }
    return MHA_OK;
}

#endif /* TINY_GPT_H */
