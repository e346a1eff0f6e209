/* Reader for tests/golden/golden.bin, the PyTorch reference results written by
   tests/gen_golden.py (the format is described at the top of that script).

   The whole file is decoded into memory: each array gets its own allocation
   (so float and double data are aligned) and is decoded byte by byte from
   little-endian, so the reader works on any host byte order.  A truncated or
   malformed file is reported, never read past its end.

       gold_file g;
       if (!gold_load("tests/golden/golden.bin", &g, err, sizeof err)) ...
       for (i = 0; i < g.ncases; ++i) {
           const gold_case *c = &g.cases[i];
           const gold_array *q = gold_find(c, "query");   // NULL if absent
           ... q->f32 / q->u8 / q->f64, q->count elements ...
       }
       gold_free(&g);
*/
#ifndef MHA_GOLDEN_H
#define MHA_GOLDEN_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define GOLD_UNUSED __attribute__((unused))
#else
#define GOLD_UNUSED
#endif

/* parameter slots of gold_case.p (see tests/gen_golden.py) */
enum {
    GOLD_KIND = 0, GOLD_B, GOLD_H, GOLD_LQ, GOLD_LK, GOLD_E, GOLD_KDIM, GOLD_VDIM,
    GOLD_ADD_ZERO_ATTN, GOLD_CAUSAL, GOLD_PER_HEAD, GOLD_ATTN_KIND, GOLD_KPM_KIND,
    GOLD_NAN_FIXED, GOLD_NPARAMS = 16
};
enum { GOLD_KIND_MODULE = 0, GOLD_KIND_SDPA = 1 };
enum { GOLD_F32 = 0, GOLD_U8 = 1, GOLD_F64 = 2, GOLD_U16 = 3 };
#define GOLD_D GOLD_E      /* SDPA: head dim in the E slot */
#define GOLD_DV GOLD_KDIM  /* SDPA: value head dim in the kdim slot */

typedef struct gold_array {
    char name[25];
    int dtype, ndim, shape[4];
    size_t count;
    float *f32;            /* exactly one of these is set, by dtype */
    unsigned char *u8;
    double *f64;
    uint16_t *u16;         /* the bits of F16 / BF16 elements */
} gold_array;

#define GOLD_MAX_ARRAYS 24
typedef struct gold_case {
    char name[49];
    int p[GOLD_NPARAMS];
    float scale;
    int narrays;
    gold_array arrays[GOLD_MAX_ARRAYS];
} gold_case;

typedef struct gold_file {
    int ncases;
    gold_case *cases;
} gold_file;

/* a bounds-checked cursor over the file bytes */
typedef struct gold__cur {
    const unsigned char *p;
    size_t left;
} gold__cur;

static int gold__take(gold__cur *c, void *dst, size_t n)
{
    if (n > c->left) return 0;
    if (dst) memcpy(dst, c->p, n);
    c->p += n;
    c->left -= n;
    return 1;
}
static int gold__u32(gold__cur *c, uint32_t *v)
{
    unsigned char b[4];
    if (!gold__take(c, b, 4)) return 0;
    *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return 1;
}
static int gold__u64(gold__cur *c, uint64_t *v)
{
    uint32_t lo, hi;
    if (!gold__u32(c, &lo) || !gold__u32(c, &hi)) return 0;
    *v = (uint64_t)hi << 32 | lo;
    return 1;
}

static GOLD_UNUSED void gold_free(gold_file *g)
{
    int i, j;
    for (i = 0; i < g->ncases; ++i)
        for (j = 0; j < g->cases[i].narrays; ++j) {
            gold_array *a = &g->cases[i].arrays[j];
            free(a->f32); free(a->u8); free(a->f64); free(a->u16);
        }
    free(g->cases);
    g->cases = NULL;
    g->ncases = 0;
}

static int gold__array(gold__cur *c, gold_array *a, char *err, size_t errlen)
{
    uint32_t v, i;
    size_t n = 1, k;
    memset(a, 0, sizeof *a);
    if (!gold__take(c, a->name, 24)) goto truncated;
    if (!gold__u32(c, &v)) goto truncated;
    a->dtype = (int)v;
    if (!gold__u32(c, &v)) goto truncated;
    a->ndim = (int)v;
    if (a->dtype < GOLD_F32 || a->dtype > GOLD_U16 || a->ndim < 1 || a->ndim > 4) {
        snprintf(err, errlen, "array '%s': bad dtype %d or ndim %d", a->name, a->dtype, a->ndim);
        return 0;
    }
    for (i = 0; i < 4; ++i) {
        if (!gold__u32(c, &v)) goto truncated;
        a->shape[i] = (int)v;
        if ((int)i < a->ndim) {
            if (v == 0 || v > (1u << 24) || n > ((size_t)1 << 28) / v) {
                snprintf(err, errlen, "array '%s': bad shape", a->name);
                return 0;
            }
            n *= v;
        }
    }
    a->count = n;
    if (a->dtype == GOLD_U16) {
        unsigned char b[2];
        if (!(a->u16 = (uint16_t *)malloc(n * sizeof(uint16_t)))) goto truncated;
        for (k = 0; k < n; ++k) {
            if (!gold__take(c, b, 2)) goto truncated;
            a->u16[k] = (uint16_t)(b[0] | b[1] << 8);
        }
    } else if (a->dtype == GOLD_U8) {
        if (!(a->u8 = (unsigned char *)malloc(n)) || !gold__take(c, a->u8, n)) goto truncated;
    } else if (a->dtype == GOLD_F32) {
        if (!(a->f32 = (float *)malloc(n * sizeof(float)))) goto truncated;
        for (k = 0; k < n; ++k) {
            if (!gold__u32(c, &v)) goto truncated;
            memcpy(&a->f32[k], &v, 4);
        }
    } else {
        uint64_t w;
        if (!(a->f64 = (double *)malloc(n * sizeof(double)))) goto truncated;
        for (k = 0; k < n; ++k) {
            if (!gold__u64(c, &w)) goto truncated;
            memcpy(&a->f64[k], &w, 8);
        }
    }
    return 1;
truncated:
    snprintf(err, errlen, "array '%s': file truncated (or out of memory)", a->name);
    return 0;
}

/* Read and decode the whole file.  Returns 1 on success; on failure 0 with a
   reason in err, and nothing left allocated. */
static GOLD_UNUSED int gold_load(const char *path, gold_file *g, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long size;
    gold__cur c;
    char magic[8];
    uint32_t version, ncases, v;
    int i, j, ok = 0;
    g->ncases = 0;
    g->cases = NULL;
    if (!f) { snprintf(err, errlen, "cannot open %s (run from the repository root)", path); return 0; }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 ||
        !(buf = (unsigned char *)malloc((size_t)size + 1)) ||
        fread(buf, 1, (size_t)size, f) != (size_t)size) {
        snprintf(err, errlen, "cannot read %s", path);
        goto done;
    }
    c.p = buf;
    c.left = (size_t)size;
    if (!gold__take(&c, magic, 8) || memcmp(magic, "MHAGOLD1", 8) != 0 ||
        !gold__u32(&c, &version) || version != 1 || !gold__u32(&c, &ncases) || ncases > 100000) {
        snprintf(err, errlen, "%s: not a version-1 golden file", path);
        goto done;
    }
    if (!(g->cases = (gold_case *)calloc(ncases ? ncases : 1, sizeof(gold_case)))) {
        snprintf(err, errlen, "out of memory");
        goto done;
    }
    for (i = 0; i < (int)ncases; ++i) {
        gold_case *k = &g->cases[i];
        g->ncases = i + 1;
        if (!gold__take(&c, k->name, 48)) { snprintf(err, errlen, "case %d: truncated", i); goto done; }
        for (j = 0; j < GOLD_NPARAMS; ++j) {
            if (!gold__u32(&c, &v)) { snprintf(err, errlen, "%s: truncated", k->name); goto done; }
            k->p[j] = (int)(int32_t)v;
        }
        if (!gold__u32(&c, &v)) { snprintf(err, errlen, "%s: truncated", k->name); goto done; }
        memcpy(&k->scale, &v, 4);
        if (!gold__u32(&c, &v) || v > GOLD_MAX_ARRAYS) {
            snprintf(err, errlen, "%s: bad array count", k->name);
            goto done;
        }
        for (j = 0; j < (int)v; ++j) {
            char why[160];
            k->narrays = j + 1;
            if (!gold__array(&c, &k->arrays[j], why, sizeof why)) {
                snprintf(err, errlen, "%s: %s", k->name, why);
                goto done;
            }
        }
    }
    if (c.left != 0) { snprintf(err, errlen, "%s: %lu trailing bytes", path, (unsigned long)c.left); goto done; }
    ok = 1;
done:
    if (f) fclose(f);
    free(buf);
    if (!ok) gold_free(g);
    return ok;
}

/* The array called name in case c, or NULL. */
static GOLD_UNUSED const gold_array *gold_find(const gold_case *c, const char *name)
{
    int i;
    for (i = 0; i < c->narrays; ++i)
        if (strcmp(c->arrays[i].name, name) == 0) return &c->arrays[i];
    return NULL;
}
#endif
