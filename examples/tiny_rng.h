/* tiny_rng.h - the small seeded generator the examples and tests draw from.

   xorshift64* seeded through splitmix64: the same stream on every platform,
   so a training run or a test is reproducible bit for bit.  It is not part
   of mha.h (a random number generator is not attention); the examples that
   train (tiny_gpt, train_reverse) and the tests include it.  Every function
   is static: include it in each file that wants it.

       tiny_rng r;
       tiny_rng_seed(&r, 42);
       unsigned u = tiny_rng_u32(&r);          // uniform 32-bit
       float f = tiny_rng_uniform(&r);         // [0, 1)
       tiny_rng_fill(&r, x, n, 0.1f);          // x[i] ~ U(-0.1, 0.1)

   LICENSE  MIT or public domain, as mha.h.
*/
#ifndef TINY_RNG_H
#define TINY_RNG_H

#include <stddef.h>

#if defined(__GNUC__) || defined(__clang__)
#define TINY_RNG__FN static __attribute__((unused))
#else
#define TINY_RNG__FN static
#endif

typedef struct tiny_rng { unsigned long long state; } tiny_rng;

/* splitmix64 of the seed, so nearby seeds give unrelated streams */
TINY_RNG__FN void tiny_rng_seed(tiny_rng *r, unsigned long long seed)
{
    unsigned long long z = seed + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    r->state = z ? z : 1;   /* xorshift must not start at 0 */
}

/* xorshift64*: the high 32 bits of the scrambled state */
TINY_RNG__FN unsigned tiny_rng_u32(tiny_rng *r)
{
    unsigned long long s = r->state;
    s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
    r->state = s;
    return (unsigned)(((s * 2685821657736338717ULL) >> 32) & 0xFFFFFFFFu);
}

/* [0, 1) from the top 24 bits */
TINY_RNG__FN float tiny_rng_uniform(tiny_rng *r)
{
    return (float)(tiny_rng_u32(r) >> 8) * (1.0f / 16777216.0f);
}

/* x[i] ~ U(-a, a) */
TINY_RNG__FN void tiny_rng_fill(tiny_rng *r, float *x, size_t n, float a)
{
    size_t i;
    for (i = 0; i < n; ++i) x[i] = a * (2.0f * tiny_rng_uniform(r) - 1.0f);
}

#endif /* TINY_RNG_H */
