/* bench/callgrind_backward.c - one SDPA backward (B 1, H 8, L 256, D 64, one thread)
   for instruction counts that a loaded machine does not change:
     gcc -std=c99 -O2 -mavx2 -mfma -fopenmp -I. bench/callgrind_backward.c -o build/cg -lm
     OMP_NUM_THREADS=1 valgrind --tool=callgrind ./build/cg      (CAUSAL=1: causal)  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>
#include <stdlib.h>
int main(void)
{
    const int B = 1, H = 8, L = 256, D = 64;
    size_t n = (size_t)B * H * L * D, i;
    float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *dout = malloc(n * 4);
    float *dq = calloc(n, 4), *dk = calloc(n, 4), *dv = calloc(n, 4);
    mha_options o = mha_options_defaults();
    unsigned s = 1;
    double sum = 0;
    for (i = 0; i < n; ++i) {
        s = s * 1664525u + 1013904223u; q[i] = (float)(s >> 9) / 8388608.0f - 1.0f;
        s = s * 1664525u + 1013904223u; k[i] = (float)(s >> 9) / 8388608.0f - 1.0f;
        s = s * 1664525u + 1013904223u; v[i] = (float)(s >> 9) / 8388608.0f - 1.0f;
        s = s * 1664525u + 1013904223u; dout[i] = (float)(s >> 9) / 8388608.0f - 1.0f;
    }
    o.num_threads = 1;
    o.causal = getenv("CAUSAL") != NULL;
    if (mha_sdpa_backward(B, H, L, L, D, D, q, k, v, dout, &o, dq, dk, dv, NULL, 0) != MHA_OK) return 1;
    for (i = 0; i < n; ++i) sum += dq[i] + dk[i] + dv[i];
    printf("checksum %.6f\n", sum);
    return 0;
}
