/* fuzz_forward.c - libFuzzer harness: random sizes, flags, mask kinds and
   declared mask shapes (often wrong on purpose), random values including NaN
   and Inf.  Every buffer is allocated exactly as large as the caller's
   declared shapes say, so ASan catches any read or write past them.  The call
   must return a status, never crash; with MHA_OK the outputs must be written
   and a NaN may only appear when an input held a non-finite value.  A
   refusal must fill the mha_error as the header says: its status, the
   function "mha_module_forward", a field, and a message "function: field:
   ..." (NUL-terminated within the struct).

     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz_forward.c -lm
     ./a.out -runs=200000                                                          */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { const uint8_t *p; size_t n; } src;
static unsigned take(src *s)
{
    unsigned v = 0;
    if (s->n) { v = *s->p++; s->n--; }
    return v;
}
/* small size in [-2, 40], mostly positive */
static int take_size(src *s)
{
    unsigned v = take(s);
    return v < 16 ? (int)(v % 8) - 2 : (int)(v % 41);
}
static float take_float(src *s)
{
    unsigned v = take(s);
    switch (v % 32) {
    case 0: return NAN;
    case 1: return INFINITY;
    case 2: return -INFINITY;
    default: return ((float)v - 128.0f) / 16.0f;
    }
}
static float *floats(src *s, long n)
{
    float *p;
    long i;
    if (n <= 0 || n > (1L << 22)) return NULL;
    p = (float *)malloc((size_t)n * sizeof(float));
    for (i = 0; i < n; ++i) p[i] = take_float(s);
    return p;
}
static void *mask_data(src *s, mha_mask *m, long n)
{
    long i;
    if (n <= 0 || n > (1L << 22)) return NULL;
    if (m->kind == MHA_MASK_FLOAT) {
        float *f = (float *)malloc((size_t)n * sizeof(float));
        for (i = 0; i < n; ++i) f[i] = (take(s) & 3) ? 0.0f : take_float(s);
        return f;
    } else {
        unsigned char *u = (unsigned char *)malloc((size_t)n);
        for (i = 0; i < n; ++i) u[i] = (unsigned char)(take(s) & 1);
        return u;
    }
}
/* a declared mask shape: right most of the time, off by one sometimes */
static void declare_mask(src *s, mha_mask *m, int nd, const int *good)
{
    int d;
    m->kind = (mha_mask_kind)(take(s) % 5);   /* 4 is invalid on purpose */
    m->ndim = (take(s) % 8 == 0) ? (int)(take(s) % 6) : nd;
    for (d = 0; d < 4; ++d) m->shape[d] = good[d] + ((take(s) % 10 == 0) ? (int)(take(s) % 3) - 1 : 0);
}
static long mask_elems(const mha_mask *m)
{
    long n = 1;
    int d;
    if (m->ndim < 1 || m->ndim > 4) return 0;
    for (d = 0; d < m->ndim; ++d) {
        if (m->shape[d] <= 0) return 0;
        n *= m->shape[d];
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    src s;
    mha_module m;
    mha_options o;
    int B, Lq, Lk, E, H, kd, vd, Lk_eff, use_in_proj, want_w, i;
    float *q, *k, *v, *out, *w, *w_in, *wq, *wk, *wv, *b_in, *w_out, *b_out, *bk, *bv;
    void *am, *kpm;
    long nw;
    mha_status st;
    mha_error err;
    mha_run run;
    int good[4];

    s.p = data; s.n = size;
    memset(&m, 0, sizeof m);
    memset(&o, 0, sizeof o);
    B = take_size(&s); Lq = take_size(&s); Lk = take_size(&s);
    H = 1 + (int)(take(&s) % 4);
    E = H * (1 + (int)(take(&s) % 6)) + ((take(&s) % 10 == 0) ? 1 : 0);  /* sometimes not divisible */
    kd = (take(&s) & 1) ? 0 : take_size(&s);
    vd = (take(&s) & 1) ? 0 : take_size(&s);
    m.embed_dim = E; m.num_heads = H; m.kdim = kd; m.vdim = vd;
    m.add_zero_attn = (int)(take(&s) % 3 == 0);
    use_in_proj = (int)(take(&s) & 1);
    if (kd <= 0) kd = E;
    if (vd <= 0) vd = E;
    Lk_eff = Lk + m.add_zero_attn;

    w_in = use_in_proj ? floats(&s, 3L * E * E) : NULL;
    wq = use_in_proj ? NULL : floats(&s, (long)E * E);
    wk = use_in_proj ? NULL : floats(&s, (long)E * kd);
    wv = use_in_proj ? NULL : floats(&s, (long)E * vd);
    b_in = (take(&s) & 1) ? floats(&s, 3L * E) : NULL;
    w_out = floats(&s, (long)E * E);
    b_out = (take(&s) & 1) ? floats(&s, E) : NULL;
    bk = bv = NULL;
    if (take(&s) % 3 == 0) { bk = floats(&s, E); bv = floats(&s, E); Lk_eff += 1; }
    m.in_proj_weight = w_in; m.q_proj_weight = wq; m.k_proj_weight = wk; m.v_proj_weight = wv;
    m.in_proj_bias = b_in; m.out_proj_weight = w_out; m.out_proj_bias = b_out;
    m.bias_k = bk; m.bias_v = bv;

    q = floats(&s, (long)B * Lq * E);
    k = floats(&s, (long)B * Lk * kd);
    v = floats(&s, (long)B * Lk * vd);
    out = floats(&s, (long)B * Lq * E);

    good[0] = B * H; good[1] = Lq; good[2] = Lk; good[3] = 0;
    {
        int nd = 2 + (int)(take(&s) % 3);
        if (nd == 2) { good[0] = Lq; good[1] = Lk; }
        if (nd == 4) { good[0] = B; good[1] = H; good[2] = Lq; good[3] = Lk; }
        declare_mask(&s, &o.attn_mask, nd, good);
    }
    am = o.attn_mask.kind ? mask_data(&s, &o.attn_mask, mask_elems(&o.attn_mask)) : NULL;
    o.attn_mask.data = am;
    good[0] = B; good[1] = Lk; good[2] = good[3] = 0;
    declare_mask(&s, &o.key_padding_mask, 2, good);
    kpm = o.key_padding_mask.kind ? mask_data(&s, &o.key_padding_mask, mask_elems(&o.key_padding_mask)) : NULL;
    o.key_padding_mask.data = kpm;
    o.causal = (int)(take(&s) & 1);
    o.causal_align = (mha_causal_align)(take(&s) % 3);
    o.per_head_weights = (int)(take(&s) & 1);
    o.scale = (take(&s) % 4 == 0) ? take_float(&s) : 0.0f;
    want_w = (int)(take(&s) & 1);
    nw = (long)B * (o.per_head_weights ? H : 1) * Lq * Lk_eff;
    w = want_w ? floats(&s, nw) : NULL;

    memset(&run, 0, sizeof run);
    run.weights = w;
    memset(&err, 0x5a, sizeof err);   /* junk: the call must overwrite what it reports */
    st = mha_module_forward(&m, B, Lq, Lk, q, k, v, &o, out, &run, (take(&s) & 1) ? &err : NULL);
    if (st != MHA_OK && err.status == st) {
        /* the report: function, field, "function: field: ..." */
        size_t fl;
        if (memchr(err.message, '\0', sizeof err.message) == NULL) abort();
        if (!err.function || strcmp(err.function, "mha_module_forward") != 0 || !err.field) abort();
        fl = strlen(err.field);
        if (strncmp(err.message, "mha_module_forward: ", 20) != 0 || strncmp(err.message + 20, err.field, fl) != 0 ||
            strncmp(err.message + 20 + fl, ": ", 2) != 0)
            abort();
    } else if (st != MHA_OK && err.status != (mha_status)0x5a5a5a5a) {
        abort();   /* err given but not filled with this status */
    }
    if (st == MHA_OK && w) {
        /* weights are probabilities (or 0 for fully masked rows) unless inputs held NaN */
        for (i = 0; i < nw; ++i)
            if (!(w[i] >= 0.0f && w[i] <= 1.0f) && !isnan(w[i])) abort();
    }
    (void)mha_status_string(st);

    free(q); free(k); free(v); free(out); free(w); free(w_in); free(wq); free(wk); free(wv);
    free(b_in); free(w_out); free(b_out); free(bk); free(bv); free(am); free(kpm);
    return 0;
}
