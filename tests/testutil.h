/* Tiny test harness shared by the test programs: counters, a deterministic
   RNG, and the relative-error measure the project's tolerance is stated in. */
#ifndef MHA_TESTUTIL_H
#define MHA_TESTUTIL_H
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stddef.h>

#if defined(__GNUC__) || defined(__clang__)
#define TU_UNUSED __attribute__((unused))
#else
#define TU_UNUSED
#endif

static int tu_pass, tu_fail;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (cond) {                                                            \
            ++tu_pass;                                                         \
        } else {                                                               \
            ++tu_fail;                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                        \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
        }                                                                      \
    } while (0)

/* Every test program ends with this line; tests/run_all.sh adds them up. */
static TU_UNUSED int tu_finish(const char *name)
{
    printf("%s: %d passed, %d failed\n", name, tu_pass, tu_fail);
    return tu_fail != 0;
}

/* xorshift64*: the same stream on every platform */
typedef struct { uint64_t s; } tu_rng;
static TU_UNUSED uint32_t tu_next(tu_rng *r)
{
    r->s ^= r->s >> 12; r->s ^= r->s << 25; r->s ^= r->s >> 27;
    return (uint32_t)((r->s * 2685821657736338717ULL) >> 32);
}
/* uniform in [-1, 1) */
static TU_UNUSED float tu_uniform(tu_rng *r) { return (float)(tu_next(r) >> 8) * (2.0f / 16777216.0f) - 1.0f; }
static TU_UNUSED void tu_fill(tu_rng *r, float *x, size_t n, float amp)
{
    size_t i;
    for (i = 0; i < n; ++i) x[i] = amp * tu_uniform(r);
}

/* ||a - b|| / ||b||, with b the reference; 0/0 counts as 0, x/0 as x. */
static TU_UNUSED double tu_rel_err(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    if (den == 0) return sqrt(num);
    return sqrt(num / den);
}
static TU_UNUSED double tu_rel_err_ff(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    if (den == 0) return sqrt(num);
    return sqrt(num / den);
}

#if defined(__unix__) || defined(__APPLE__)
#include <sys/stat.h>
/* The permission-denied case of a loader's tests: make path a one-byte file
   that no one may read (mode 0).  1: reading it is refused, run the case;
   0: this process reads it anyway (root), and a NOTE from `test` says the
   case is skipped; a file that cannot be made fails a check.  The caller
   removes path afterwards. */
static TU_UNUSED int tu_unreadable_file(const char *path, const char *test)
{
    FILE *w = fopen(path, "wb"), *r;
    if (w) { fputs("x", w); fclose(w); }
    if (!w || chmod(path, 0) != 0) {
        CHECK(0, "cannot make %s", path);
        return 0;
    }
    if ((r = fopen(path, "rb")) != NULL) {
        fclose(r);
        printf("NOTE %s: running with the right to read any file (root?): the permission-denied case is "
               "skipped\n", test);
        return 0;
    }
    return 1;
}
#endif
#endif
