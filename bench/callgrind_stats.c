/* bench/callgrind_stats.c - one fused causal SDPA forward (B 1, H 4, L 1024,
   D 64, one thread), with or without the row statistics, for instruction
   counts that a loaded machine does not change:
     gcc -std=c99 -O2 -mavx2 -mfma -I. bench/callgrind_stats.c -o build/cgs -lm
     valgrind --tool=callgrind ./build/cgs        (STATS=1: all four statistics)  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>
#include <stdlib.h>
int main(void)
{
    const int B = 1, H = 4, L = 1024, D = 64;
    size_t n = (size_t)B * H * L * D, rows = (size_t)B * H * L, i;
    float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *o = malloc(n * 4);
    float *st = malloc(4 * rows * sizeof(float));
    mha_run run = {0};          /* no workspace: the call allocates one, as 0.1's did */
    mha_options opt = {0};
    unsigned s = 1;
    double sum = 0;
    for (i = 0; i < n; ++i) {
        s = s * 1664525u + 1013904223u; q[i] = (float)(s >> 9) / 8388608.0f - 1.0f;
        s = s * 1664525u + 1013904223u; k[i] = (float)(s >> 9) / 8388608.0f - 1.0f;
        s = s * 1664525u + 1013904223u; v[i] = (float)(s >> 9) / 8388608.0f - 1.0f;
    }
    opt.causal = 1; opt.num_threads = 1;
    if (getenv("STATS")) {
        run.lse = st; run.entropy = st + rows; run.max_weight = st + 2 * rows; run.first_weight = st + 3 * rows;
    }
    if (mha_sdpa_forward(B, H, L, L, D, D, q, k, v, &opt, o, &run, NULL) != MHA_OK) return 1;
    for (i = 0; i < n; ++i) sum += o[i];
    printf("checksum %.6f\n", sum);
    return 0;
}
