/* train_reverse.c - a tiny Transformer learns to reverse digits, from scratch.
     make demo
   or by hand:
     cc -std=c99 -O2 -I. -Iexamples -isystem /usr/include/stb examples/train_reverse.c -o train_reverse -lm
     ./train_reverse [out-folder [steps]]      (steps: 1500 by default)

   THE TASK   input  3 1 4 1 5 9 2 6   ->   output  6 2 9 5 1 4 1 3
   Each output position i must copy the digit at position L-1-i.  The digit
   itself is in the token embedding; where to look is only in the positional
   encoding, so the one attention layer has to learn "query i looks at key
   L-1-i": an anti-diagonal in its attention map.  Nothing else in the model
   can move information between positions.

   THE MODEL (every piece from mha.h; llm.c-style flat parameter array)
     x      = embed(tokens) + PE               [B, L, E]   sinusoidal PE
     h      = encoder_layer(x)                 [B, L, E]   nn.TransformerEncoderLayer
     logits = h Wout^T + bout                  [B, L, V]
     loss   = cross_entropy(logits, reversed tokens)
   trained with AdamW on fresh random sequences each step.  Sequences whose
   "held-out" hash is 0 (one in eight) are never trained on; accuracy is
   measured on 2000 of them.

   THE TRAINING STEP  the encoder layer is planned once for the training
   batch (mha_encoder_plan with MHA_PLAN_TRAINING); each step's forward is a
   run of that plan given a saved region (mha_run.saved, sizes.saved bytes):
   it writes there what the backward needs, and the backward run given the
   same region reads it instead of computing the layer again.  Evaluation
   and the pictures use the one-shot call mha_encoder_forward.

   It writes the attention maps of the first held-out sequence before and after
   training: <out>/reverse_before.png and <out>/reverse_after.png.
*/
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mkdir */
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "tiny_rng.h"
#define MHA_HEATMAP_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "heatmap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _WIN32
#include <direct.h>
#define make_dir(p) _mkdir(p)
#else
#include <sys/stat.h>
#define make_dir(p) mkdir(p, 0777)
#endif

enum {
    V = 10,        /* vocabulary: the digits */
    L = 8,         /* sequence length */
    E = 32,        /* model width */
    H = 2,         /* heads */
    F = 64,        /* feed-forward width */
    B = 32,        /* sequences per step */
    STEPS = 1500,
    EVAL_N = 2000, /* held-out sequences */
    SEED = 1234
};

/* Every mha.h call returns a status and fills this mha_error when it refuses
   (which call, which argument, why); a teaching example stops at the first error. */
static mha_error err;

static void check(mha_status s, const char *what)
{
    if (s != MHA_OK) {
        fprintf(stderr, "%s: %s\n", what, err.status == s ? err.message : mha_status_string(s));
        exit(2);
    }
}

/* ---------------------------------------------------------- parameters */

/* Every tensor is a slice of one array, so the optimizer is one call and the
   gradients have the same layout.  Names follow the PyTorch state_dict. */
typedef struct {
    size_t emb, in_w, in_b, out_w, out_b, l1_w, l1_b, l2_w, l2_b, n1_w, n1_b, n2_w, n2_b, head_w, head_b;
    size_t total;
} layout;

static layout make_layout(void)
{
    layout o;
    size_t n = 0;
#define SLICE(field, count) o.field = n; n += (count)
    SLICE(emb, V * E);
    SLICE(in_w, 3 * E * E); SLICE(in_b, 3 * E);
    SLICE(out_w, E * E);    SLICE(out_b, E);
    SLICE(l1_w, F * E);     SLICE(l1_b, F);
    SLICE(l2_w, E * F);     SLICE(l2_b, E);
    SLICE(n1_w, E); SLICE(n1_b, E); SLICE(n2_w, E); SLICE(n2_b, E);
    SLICE(head_w, V * E);   SLICE(head_b, V);
#undef SLICE
    o.total = n;
    return o;
}

/* Point an encoder layer (or its gradient) at the slices of a flat array. */
static mha_encoder_layer layer_view(const layout *o, const float *p)
{
    mha_encoder_layer ly;
    memset(&ly, 0, sizeof ly);
    ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
    ly.self_attn.in_proj_weight = p + o->in_w;   ly.self_attn.in_proj_bias = p + o->in_b;
    ly.self_attn.out_proj_weight = p + o->out_w; ly.self_attn.out_proj_bias = p + o->out_b;
    ly.dim_feedforward = F; ly.activation = MHA_ACT_RELU; ly.norm_first = 0;
    ly.linear1_weight = p + o->l1_w; ly.linear1_bias = p + o->l1_b;
    ly.linear2_weight = p + o->l2_w; ly.linear2_bias = p + o->l2_b;
    ly.norm1_weight = p + o->n1_w; ly.norm1_bias = p + o->n1_b;
    ly.norm2_weight = p + o->n2_w; ly.norm2_bias = p + o->n2_b;
    return ly;
}

static mha_encoder_layer_grad grad_view(const layout *o, float *g)
{
    mha_encoder_layer_grad gr;
    gr.self_attn.in_proj_weight = g + o->in_w;   gr.self_attn.in_proj_bias = g + o->in_b;
    gr.self_attn.out_proj_weight = g + o->out_w; gr.self_attn.out_proj_bias = g + o->out_b;
    gr.linear1_weight = g + o->l1_w; gr.linear1_bias = g + o->l1_b;
    gr.linear2_weight = g + o->l2_w; gr.linear2_bias = g + o->l2_b;
    gr.norm1_weight = g + o->n1_w; gr.norm1_bias = g + o->n1_b;
    gr.norm2_weight = g + o->n2_w; gr.norm2_bias = g + o->n2_b;
    return gr;
}

/* PyTorch's initialisation, roughly: Linear weights U(-1/sqrt(in), 1/sqrt(in)),
   the attention projections Xavier-uniform, biases zero, LayerNorm 1 and 0,
   the embedding U(-1, 1). */
static void init_params(const layout *o, float *p, tiny_rng *r)
{
    size_t i;
    memset(p, 0, o->total * sizeof(float));
    tiny_rng_fill(r, p + o->emb, V * E, 1.0f);
    tiny_rng_fill(r, p + o->in_w, 3 * E * E, sqrtf(6.0f / (E + 3 * E)));
    tiny_rng_fill(r, p + o->out_w, E * E, 1.0f / sqrtf((float)E));
    tiny_rng_fill(r, p + o->l1_w, F * E, 1.0f / sqrtf((float)E));
    tiny_rng_fill(r, p + o->l1_b, F, 1.0f / sqrtf((float)E));
    tiny_rng_fill(r, p + o->l2_w, E * F, 1.0f / sqrtf((float)F));
    tiny_rng_fill(r, p + o->l2_b, E, 1.0f / sqrtf((float)F));
    tiny_rng_fill(r, p + o->head_w, V * E, 1.0f / sqrtf((float)E));
    for (i = 0; i < E; ++i) p[o->n1_w + i] = p[o->n2_w + i] = 1.0f;
}

/* ---------------------------------------------------------------- data */

/* One sequence in eight is held out for evaluation, decided by a hash of its digits. */
static int held_out(const int *t)
{
    unsigned h = 2166136261u;
    int i;
    for (i = 0; i < L; ++i) h = (h ^ (unsigned)t[i]) * 16777619u;
    return (h >> 13) % 8 == 0;
}

static void make_batch(tiny_rng *r, int n, int want_held_out, int *tokens, int *targets)
{
    int s, i;
    for (s = 0; s < n; ++s) {
        int *t = tokens + s * L;
        do {
            for (i = 0; i < L; ++i) t[i] = (int)(tiny_rng_u32(r) % V);
        } while (held_out(t) != want_held_out);
        for (i = 0; i < L; ++i) targets[s * L + i] = t[L - 1 - i];
    }
}

/* ------------------------------------------------------------ the model */

typedef struct {
    layout o;
    float *p, *g, *m, *v;       /* parameters, gradients, AdamW moments */
    float *pe;                  /* [L, E] */
    float *x, *h, *logits;      /* activations of the largest batch */
    float *dlogits, *dh, *dx;
    mha_plan *plan;             /* the encoder layer for training batches of B (MHA_PLAN_TRAINING) */
    mha_run run;                /* its workspace, which also serves the one-shot calls and the
                                   output layer's Linear */
    void *saved;                /* the training forward's saved region: sizes.saved bytes */
    size_t saved_bytes;
} model;

/* x = embed(tokens) + PE;  h = encoder(x);  logits = h Wout^T + bout.
   training (a batch of B): through the plan, saving what the backward needs;
   otherwise one shot, with the per-head weights in attn when it is not NULL. */
static void forward(model *M, int n, const int *tokens, float *attn, int training)
{
    mha_run run = M->run;       /* the workspace; this call's saved region or weights */
    int s, i;
    check(mha_embedding_forward(n * L, V, E, tokens, M->p + M->o.emb, M->x, &err), "embedding");
    for (s = 0; s < n; ++s)
        for (i = 0; i < L * E; ++i) M->x[(size_t)s * L * E + i] += M->pe[i];
    if (training) {
        run.saved = M->saved;
        run.saved_bytes = M->saved_bytes;
        check(mha_encoder_run_forward(M->plan, L, M->x, M->h, &run, &err), "encoder");
    } else {
        mha_encoder_layer ly = layer_view(&M->o, M->p);
        mha_options opt;
        memset(&opt, 0, sizeof opt);
        opt.per_head_weights = 1;
        run.weights = attn;     /* [n, H, L, L] or NULL */
        check(mha_encoder_forward(&ly, n, L, M->x, &opt, M->h, &run, &err), "encoder");
    }
    check(mha_linear_forward(n * L, E, V, M->h, M->p + M->o.head_w, M->p + M->o.head_b, M->logits,
                             &M->run, &err), "output layer");
}

/* The same path backwards, after a training forward; dlogits is already
   filled by the loss.  The encoder's backward reads the saved region. */
static void backward(model *M, const int *tokens)
{
    mha_encoder_layer_grad gr = grad_view(&M->o, M->g);
    mha_run run = M->run;
    run.saved = M->saved;
    run.saved_bytes = M->saved_bytes;
    memset(M->g, 0, M->o.total * sizeof(float));
    memset(M->dh, 0, (size_t)B * L * E * sizeof(float));
    memset(M->dx, 0, (size_t)B * L * E * sizeof(float));
    check(mha_linear_backward(B * L, E, V, M->h, M->p + M->o.head_w, M->dlogits, M->dh,
                              M->g + M->o.head_w, M->g + M->o.head_b, &M->run, &err), "output layer backward");
    check(mha_encoder_run_backward(M->plan, L, M->x, M->dh, M->dx, &gr, &run, &err), "encoder backward");
    /* PE is a constant: the gradient of x goes to the embedding rows only */
    check(mha_embedding_backward(B * L, V, E, tokens, M->dx, M->g + M->o.emb, &err), "embedding backward");
}

static float evaluate(model *M, const int *tokens, const int *targets, int n)
{
    int done, correct_total = 0;
    for (done = 0; done < n; done += B) {
        int cnt = n - done < B ? n - done : B, correct;
        float loss;
        forward(M, cnt, tokens + done * L, NULL, 0);
        check(mha_cross_entropy(cnt * L, V, M->logits, targets + done * L, &loss, NULL, &correct, &err),
              "loss");
        correct_total += correct;
    }
    return (float)correct_total / (float)(n * L);
}

/* input, target and the model's answer (argmax per position) */
static void print_example(model *M, const int *tokens)
{
    int i, j;
    forward(M, 1, tokens, NULL, 0);
    printf("input ");
    for (i = 0; i < L; ++i) printf(" %d", tokens[i]);
    printf("   model ");
    for (i = 0; i < L; ++i) {
        const float *z = M->logits + i * V;
        int best = 0;
        for (j = 1; j < V; ++j) if (z[j] > z[best]) best = j;
        printf(" %d", best);
    }
    printf("\n");
}

/* ------------------------------------------------------------ pictures */

static void draw(model *M, const int *tokens, const char *dir, const char *name, const char *when)
{
    static char qbuf[L][16], kbuf[L][16];
    const char *q[L], *k[L];
    float attn[H * L * L];
    char path[512], title[128];
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_error herr;
    int i;
    float anti = 0.0f;
    forward(M, 1, tokens, attn, 0);
    /* how much of each row sits where reversal needs it: key L-1-i for query i */
    for (i = 0; i < H * L; ++i) anti += attn[i * L + (L - 1 - i % L)];
    printf("%s: attention on the anti-diagonal %.0f%% (uniform would be %.0f%%)\n", when,
           100.0f * anti / (H * L), 100.0f / L);
    for (i = 0; i < L; ++i) {
        /* rows: output position i and the digit it must produce; columns: the input digits */
        snprintf(qbuf[i], sizeof qbuf[i], "out%d=%d", i, tokens[L - 1 - i]);
        snprintf(kbuf[i], sizeof kbuf[i], "%d", tokens[i]);
        q[i] = qbuf[i]; k[i] = kbuf[i];
    }
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    snprintf(title, sizeof title, "reverse, %s", when);
    hm.weights = attn; hm.heads = H; hm.Lq = L; hm.Lk = L;
    hm.q_labels = q; hm.k_labels = k; hm.title = title;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (mha_heatmap_write_png(path, &hm, &st, &herr) != MHA_OK) fprintf(stderr, "%s\n", herr.message);
    else printf("wrote %s\n", path);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "out";
    const int steps = argc > 2 && atoi(argv[2]) > 0 ? atoi(argv[2]) : STEPS;
    static int tok[B * L], tgt[B * L], eval_tok[EVAL_N * L], eval_tgt[EVAL_N * L];
    model M;
    tiny_rng rng, eval_rng;
    mha_adamw adam;
    mha_encoder_layer ly;
    mha_options opt;
    mha_sizes sizes, shot;
    size_t head_bytes;
    clock_t t0 = clock();
    const int *pic;
    int step;
    float acc = 0.0f;

    memset(&M, 0, sizeof M);
    M.o = make_layout();
    M.p = (float *)calloc(M.o.total, sizeof(float));
    M.g = (float *)calloc(M.o.total, sizeof(float));
    M.m = (float *)calloc(M.o.total, sizeof(float));
    M.v = (float *)calloc(M.o.total, sizeof(float));
    M.pe = (float *)malloc(L * E * sizeof(float));
    M.x = (float *)malloc(B * L * E * sizeof(float));
    M.h = (float *)malloc(B * L * E * sizeof(float));
    M.dh = (float *)malloc(B * L * E * sizeof(float));
    M.dx = (float *)malloc(B * L * E * sizeof(float));
    M.logits = (float *)malloc(B * L * V * sizeof(float));
    M.dlogits = (float *)malloc(B * L * V * sizeof(float));
    check(mha_positional_encoding(L, E, M.pe, &err), "positional encoding");

    tiny_rng_seed(&rng, SEED);
    init_params(&M.o, M.p, &rng);
    /* plan the layer once for training batches (the plan borrows the weight
       pointers into M.p, which the optimizer updates in place); one workspace
       for its runs, the one-shot forwards with weights and the output layer,
       so that a step allocates nothing, and the saved region its forward
       fills and its backward reads */
    ly = layer_view(&M.o, M.p);
    memset(&opt, 0, sizeof opt);
    opt.per_head_weights = 1;
    check(mha_encoder_plan_size(&ly, B, L, &opt, MHA_PLAN_TRAINING, &sizes, &err), "plan size");
    check(mha_encoder_plan(&ly, B, L, &opt, MHA_PLAN_TRAINING, NULL, 0, &M.plan, &err), "plan");
    check(mha_encoder_plan_size(&ly, B, L, &opt, MHA_PLAN_WEIGHTS, &shot, &err), "one-shot size");
    check(mha_linear_workspace_size(B * L, E, V, &head_bytes, &err), "output layer size");
    M.run.workspace_bytes = sizes.workspace > shot.workspace ? sizes.workspace : shot.workspace;
    if (head_bytes > M.run.workspace_bytes) M.run.workspace_bytes = head_bytes;
    M.run.workspace = malloc(M.run.workspace_bytes);
    M.saved_bytes = sizes.saved;
    M.saved = malloc(M.saved_bytes);
    if (!M.p || !M.g || !M.m || !M.v || !M.pe || !M.x || !M.h || !M.dh || !M.dx || !M.logits ||
        !M.dlogits || !M.run.workspace || !M.saved)
        check(MHA_ERR_OUT_OF_MEMORY, "malloc");
    tiny_rng_seed(&eval_rng, SEED + 1);
    make_batch(&eval_rng, EVAL_N, 1, eval_tok, eval_tgt);
    make_dir(dir);

    /* the pictures use the first held-out sequence whose digits all differ,
       so every column of the map is a different digit */
    for (pic = eval_tok; pic < eval_tok + (EVAL_N - 1) * L; pic += L) {
        int i, j, distinct = 1;
        for (i = 0; i < L; ++i) for (j = 0; j < i; ++j) distinct &= pic[i] != pic[j];
        if (distinct) break;
    }

    printf("reverse %d digits: E=%d, %d heads, F=%d, %zu parameters, batch %d, AdamW\n",
           L, E, H, F, M.o.total, B);
    draw(&M, pic, dir, "reverse_before.png", "before training");

    adam = mha_adamw_defaults();
    adam.lr = 3e-3f;
    adam.weight_decay = 0.0f;
    for (step = 1; step <= steps; ++step) {
        float loss;
        int correct;
        make_batch(&rng, B, 0, tok, tgt);
        forward(&M, B, tok, NULL, 1);   /* saves what the backward needs */
        check(mha_cross_entropy(B * L, V, M.logits, tgt, &loss, M.dlogits, &correct, &err), "loss");
        backward(&M, tok);              /* reads it */
        check(mha_adamw_step(&adam, step, M.o.total, M.p, M.g, M.m, M.v, &err), "AdamW");
        if (step % 100 == 0 || step == 1) {
            acc = evaluate(&M, eval_tok, eval_tgt, EVAL_N);
            printf("step %5d  loss %.4f  batch acc %5.1f%%  held-out acc %6.2f%%  %.1fs\n", step, loss,
                   100.0f * correct / (B * L), 100.0f * acc, (double)(clock() - t0) / CLOCKS_PER_SEC);
        }
    }
    acc = evaluate(&M, eval_tok, eval_tgt, EVAL_N);
    printf("held-out token accuracy %.2f%% on %d sequences (%d tokens) after %d steps, %.1f s\n",
           100.0f * acc, EVAL_N, EVAL_N * L, steps, (double)(clock() - t0) / CLOCKS_PER_SEC);
    print_example(&M, pic);
    draw(&M, pic, dir, "reverse_after.png", "after training");

    free(M.p); free(M.g); free(M.m); free(M.v); free(M.pe); free(M.x); free(M.h);
    free(M.dh); free(M.dx); free(M.logits); free(M.dlogits); free(M.run.workspace); free(M.saved);
    mha_plan_destroy(M.plan);
    return acc >= 0.99f ? 0 : 1;
}
