/* bench/kernel_disasm.c - an object file holding the GEMM micro-kernel, for
   counting its FMAs and loads in the disassembly (docs/performance.md):
     aarch64-linux-gnu-gcc -std=c99 -O2 -I. -c bench/kernel_disasm.c -o build/k_neon.o
     gcc -std=c99 -O2 -mavx2 -mfma -I. -c bench/kernel_disasm.c -o build/k_avx2.o
     aarch64-linux-gnu-objdump -d build/k_neon.o    (objdump -d for x86): <mha__kernel>  */
#define MHA_IMPLEMENTATION
#include "mha.h"
void mha_kernel_entry(int kc, const float *a, const float *b, float *c, size_t ldc);
void mha_kernel_entry(int kc, const float *a, const float *b, float *c, size_t ldc)
{
    mha__kernel(kc, a, b, c, ldc, 1.0f, 0.0f);
}
