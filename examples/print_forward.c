/* print_forward.c - one multi-head attention forward pass, printed step by step.
     cc -std=c99 -O2 -I. examples/print_forward.c -o print_forward -lm
   Three tokens, E = 4, two heads.  The weights are small integers-over-ten so
   every number can be followed by hand. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>

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
    mha_options opt = {0};
    mha_status s;

    m.embed_dim = E;
    m.num_heads = H;
    m.in_proj_weight = w_in;
    m.in_proj_bias = b_in;
    m.out_proj_weight = w_out;
    m.out_proj_bias = b_out;

    print_matrix("input x", x, L, E);
    opt.per_head_weights = 1;
    s = mha_forward(&m, 1, L, L, x, x, x, &opt, out, per_head, NULL, 0);
    if (s != MHA_OK) { fprintf(stderr, "mha_forward: %s\n", mha_status_string(s)); return 1; }
    print_matrix("head 0 weights softmax(Q0 K0^T / sqrt(2))", per_head, L, L);
    print_matrix("head 1 weights", per_head + L * L, L, L);

    opt.per_head_weights = 0;
    opt.causal = 1;
    s = mha_forward(&m, 1, L, L, x, x, x, &opt, out, avg, NULL, 0);
    if (s != MHA_OK) { fprintf(stderr, "mha_forward: %s\n", mha_status_string(s)); return 1; }
    print_matrix("causal, head-averaged weights", avg, L, L);
    print_matrix("output (causal)", out, L, E);
    return 0;
}
