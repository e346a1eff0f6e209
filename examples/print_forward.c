/* print_forward.c - one multi-head attention forward pass, printed step by step.
     cc -std=c99 -O2 -I. examples/print_forward.c -o print_forward -lm
   Three tokens, E = 4, two heads.  The weights are small integers-over-ten so
   every number can be followed by hand. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>
#include <stdlib.h>

static void print_matrix(const char *name, const float *x, int rows, int cols)
{
    int i, j;
    printf("%s [%d x %d]\n", name, rows, cols);
    for (i = 0; i < rows; ++i) {
        printf("  ");
        for (j = 0; j < cols; ++j) printf("%8.4f", x[i * cols + j]);
        printf("\n");
    }
}

int main(void)
{
    enum { E = 4, H = 2, L = 3 };
    /* in_proj_weight [3E, E]: Wq, Wk, Wv stacked, as in a PyTorch state_dict */
    static const float w_in[3 * E * E] = {
        1, 0, 0, 0,   0, 1, 0, 0,   0, 0, 1, 0,   0, 0, 0, 1,      /* Wq = I */
        1, 0, 0, 0,   0, 1, 0, 0,   0, 0, 1, 0,   0, 0, 0, 1,      /* Wk = I */
        0.5f, 0, 0, 0, 0, 0.5f, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2,      /* Wv = diag(.5,.5,2,2) */
    };
    static const float b_in[3 * E] = {0};
    static const float w_out[E * E] = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
    static const float b_out[E] = {0.1f, 0.1f, 0.1f, 0.1f};
    static const float x[L * E] = {   /* "the", "cat", "sat" */
        1, 0, 0, 1,
        0, 1, 1, 0,
        1, 1, 0, 0,
    };
    float out[L * E], per_head[H * L * L], avg[L * L];
    mha_module m = {0};
    mha_options opt = {0};      /* zero = PyTorch's defaults */
    mha_run run = {0};          /* what a run reads and writes besides its tensors */
    mha_error err;              /* on a refusal: which argument, and why */
    mha_sizes sizes;
    mha_plan *plan;

    m.embed_dim = E;
    m.num_heads = H;
    m.in_proj_weight = w_in;
    m.in_proj_bias = b_in;
    m.out_proj_weight = w_out;
    m.out_proj_bias = b_out;

    /* which kernels this build runs on this CPU (no SIMD flags needed on x86-64) */
    printf("mha.h %d.%d.%d, %s kernels\n", MHA_VERSION_MAJOR, MHA_VERSION_MINOR, MHA_VERSION_PATCH, mha_kernels());
    print_matrix("input x", x, L, E);

    /* 1. one call: the weights of every head come back through run.weights */
    opt.per_head_weights = 1;
    run.weights = per_head;
    if (mha_module_forward(&m, 1, L, L, x, x, x, &opt, out, &run, &err) != MHA_OK) {
        fprintf(stderr, "%s\n", err.message);
        return 1;
    }
    print_matrix("head 0 weights softmax(Q0 K0^T / sqrt(2))", per_head, L, L);
    print_matrix("head 1 weights", per_head + L * L, L, L);

    /* 2. the same through a plan, made once (shapes, options, flags checked
          here) and then run; a program that runs many times does this */
    opt.per_head_weights = 0;
    opt.causal = 1;
    if (mha_module_plan_size(&m, 1, L, L, &opt, MHA_PLAN_WEIGHTS, &sizes, &err) != MHA_OK ||
        mha_module_plan(&m, 1, L, L, &opt, MHA_PLAN_WEIGHTS, NULL, 0, &plan, &err) != MHA_OK) {
        fprintf(stderr, "%s\n", err.message);
        return 1;
    }
    run.weights = avg;          /* head-averaged now: [L, L] */
    run.workspace = malloc(sizes.workspace);
    run.workspace_bytes = sizes.workspace;
    if (!run.workspace || mha_module_run_forward(plan, L, L, x, x, x, out, &run, &err) != MHA_OK) {
        fprintf(stderr, "%s\n", run.workspace ? err.message : "out of memory");
        return 1;
    }
    print_matrix("causal, head-averaged weights", avg, L, L);
    print_matrix("output (causal)", out, L, E);
    free(run.workspace);
    mha_plan_destroy(plan);
    return 0;
}
