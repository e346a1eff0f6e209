/* fuzz_diff.c - differential libFuzzer harness for attention: the fused path
   of mha_sdpa_forward (run.weights NULL), the unfused path (run.weights
   set) and a float64 reference written here must agree, on shapes, masks, options and thread
   counts drawn from the input, with NaN and Inf planted in queries, keys,
   values and float masks.

   Per query row the reference decides which keys are blocked: a bool mask
   that blocks (BOOL: nonzero, BOOL_KEEP: zero, attn_mask or key_padding_mask),
   a float mask value of -inf, or causal (top-left or bottom-right).  Then
     - a row with every key blocked must be exactly zero, weights too;
     - a row whose query, allowed keys, allowed values and mask values are all
       finite must be finite and match the reference within the float32
       error bound below, whatever NaN/Inf sits in its blocked keys and values;
     - other rows (a NaN the row really attends to) are only required not to
       crash: IEEE arithmetic decides them.
   The fused path must give the same bits for 1 thread and for 2 or 3.
   The decoder options are drawn too: grouped KV heads, a sliding window,
   soft-capping, ALiBi (the paper's slopes or drawn ones) and sinks.

   Error bound for a row: scores carry |ds| <= c eps S with S = scale sum|q||k| +
   |mask|, a probability then moves by <= 2 |ds| relative, so
     |out - ref| <= (4 eps (S_max + Lk + D)) max|v| + tiny          (eps = 2^-24, x8 margin)

     clang -g -O1 -fopenmp -fsanitize=fuzzer,address,undefined -I. tests/fuzz_diff.c -lm
     ./a.out -runs=1000000                                                          */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { const uint8_t *p; size_t n; } src;
static unsigned take(src *s)
{
    unsigned v = 0;
    if (s->n) { v = *s->p++; s->n--; }
    return v;
}
static float value(src *s) { return ((float)take(s) - 127.5f) / 32.0f; }   /* (-4, 4) */
static float special(unsigned k)
{
    return k % 3 == 0 ? NAN : k % 3 == 1 ? INFINITY : -INFINITY;
}

typedef struct {
    int B, H, Hkv, Lq, Lk, D, Dv;
    mha_options o;
    const float *q, *k, *v;
    float slopes[3];   /* the ALiBi slopes in use */
} problem;

static int blocks(mha_mask_kind kind, unsigned char u) { return kind == MHA_MASK_BOOL ? u != 0 : u == 0; }

/* The reference for row (b, h, i): out[Dv], w[Lk]; returns 1 when the row
   must match (everything it attends to is finite), 0 when only no-crash is
   asked, 2 when every key is blocked.  *bound gets the row's error bound. */
static int reference(const problem *P, int b, int h, int i, double *out, double *w, double *bound)
{
    const mha_options *o = &P->o;
    const mha_mask *am = o->attn_mask.kind ? &o->attn_mask : NULL;
    const mha_mask *kp = o->key_padding_mask.kind ? &o->key_padding_mask : NULL;
    int Lk = P->Lk, D = P->D, Dv = P->Dv, j, d, any = 0, clean = 1;
    double scale = o->scale > 0 ? o->scale : 1.0 / sqrt((double)D), mx = -INFINITY, sum = 0, smax = 0, vmax = 0;
    size_t qrow = (((size_t)b * P->H + h) * P->Lq + i), arow = am && am->ndim == 2 ? (size_t)i : qrow;
    size_t kvh = (size_t)b * P->Hkv + (size_t)h / (size_t)(P->H / P->Hkv);   /* grouped KV head */
    long ip = i + (o->causal_align == MHA_CAUSAL_BOTTOM_RIGHT ? (long)Lk - P->Lq : 0);   /* i' */
    const float *q = P->q + qrow * D;
    double *s = w;   /* scores first, probabilities after */
    for (d = 0; d < D; ++d) clean &= isfinite(q[d]) != 0;
    for (j = 0; j < Lk; ++j) {
        const float *k = P->k + (kvh * Lk + j) * D;
        const float *v = P->v + (kvh * Lk + j) * Dv;
        double add = 0, dot = 0, dabs = 0;
        int blocked = 0, poison = 0, limited;
        /* causal and window limits: overwrite last, like a -inf */
        limited = (o->causal && j > ip) ||
                  (o->window && ((o->window_left >= 0 && j < ip - o->window_left) ||
                                 (o->window_right >= 0 && j > ip + o->window_right)));
        blocked |= limited;
        if (am) {
            if (am->kind == MHA_MASK_FLOAT) {
                float f = ((const float *)am->data)[arow * Lk + j];
                if (f == -INFINITY) blocked = 1; else if (!isfinite(f)) poison = 1; else add += f;
            } else blocked |= blocks(am->kind, ((const unsigned char *)am->data)[arow * Lk + j]);
        }
        if (kp) {
            if (kp->kind == MHA_MASK_FLOAT) {
                float f = ((const float *)kp->data)[(size_t)b * Lk + j];
                if (f == -INFINITY) blocked = 1; else if (!isfinite(f)) poison = 1; else add += f;
            } else blocked |= blocks(kp->kind, ((const unsigned char *)kp->data)[(size_t)b * Lk + j]);
        }
        /* mha.h adds the key-padding float after the attention mask blocked a
           key, so a non-finite float there touches the score: not clean.
           Only causal overwrites last. */
        if (poison && !limited) clean = 0;
        if (blocked) { s[j] = -INFINITY; continue; }
        any = 1;
        for (d = 0; d < D; ++d) { dot += (double)q[d] * k[d]; dabs += fabs((double)q[d] * k[d]); clean &= isfinite(k[d]) != 0; }
        for (d = 0; d < Dv; ++d) { clean &= isfinite(v[d]) != 0; if (fabs(v[d]) > vmax) vmax = fabs(v[d]); }
        dot *= scale;
        dabs *= scale;
        if (o->softcap > 0) {   /* capped before masks and ALiBi; tanh's float error is 5e-7 relative */
            dot = o->softcap * tanh(dot / o->softcap);
            dabs = (dabs < o->softcap ? dabs : o->softcap) + 1e-6 * o->softcap;
        }
        if (o->alibi) add += P->slopes[h] * (double)(j - ip);
        s[j] = dot + add;
        if (dabs + fabs(add) > smax) smax = dabs + fabs(add);
        if (s[j] > mx) mx = s[j];
    }
    for (d = 0; d < Dv; ++d) out[d] = 0;
    if (!any) { for (j = 0; j < Lk; ++j) w[j] = 0; *bound = 0; return 2; }
    if (o->sinks && o->sinks[h] > mx) mx = o->sinks[h];   /* the sink joins the denominator only */
    if (o->sinks && o->sinks[h] != -INFINITY) {
        sum += exp(o->sinks[h] - mx);
        if (fabs(o->sinks[h]) > smax) smax = fabs(o->sinks[h]);
    }
    for (j = 0; j < Lk; ++j) { w[j] = s[j] == -INFINITY ? 0 : exp(s[j] - mx); sum += w[j]; }
    for (j = 0; j < Lk; ++j) {
        const float *v = P->v + (kvh * Lk + j) * Dv;
        w[j] /= sum;
        if (w[j] != 0) for (d = 0; d < Dv; ++d) out[d] += w[j] * v[d];
    }
    *bound = 8.0 * 5.96e-8 * (4.0 * smax + Lk + D + 4) * (vmax + 1.0) + 1e-6;
    return clean ? 1 : 0;
}

static void fail(const problem *P, const char *what, int b, int h, int i, int d, double got, double want)
{
    fprintf(stderr, "fuzz_diff: %s at b%d h%d i%d [%d]: got %.9g want %.9g (B%d H%d Hkv%d Lq%d Lk%d D%d Dv%d "
            "am%d/%d kp%d causal%d/%d scale %g thr %d window %d %d/%d softcap %g alibi %d sinks %d)\n",
            what, b, h, i, d, got, want, P->B, P->H, P->Hkv, P->Lq, P->Lk, P->D, P->Dv, P->o.attn_mask.kind,
            P->o.attn_mask.ndim, P->o.key_padding_mask.kind, P->o.causal, P->o.causal_align, P->o.scale,
            P->o.num_threads, P->o.window, P->o.window_left, P->o.window_right, P->o.softcap, P->o.alibi,
            P->o.sinks != NULL);
    abort();
}

static int same_bits(float a, float b) { return (isnan(a) && isnan(b)) || memcmp(&a, &b, sizeof a) == 0; }

static void *mask_fill(src *s, mha_mask *m, size_t n)
{
    size_t i;
    if (m->kind == MHA_MASK_FLOAT) {
        float *f = (float *)malloc(n * sizeof *f);
        for (i = 0; i < n; ++i) {
            unsigned c = take(s);
            f[i] = c < 160 ? 0.0f : c < 224 ? value(s) * 2.0f : c < 250 ? -INFINITY : special(c);
        }
        return f;
    } else {
        unsigned char *u = (unsigned char *)malloc(n);
        unsigned density = take(s);
        for (i = 0; i < n; ++i) u[i] = (unsigned char)(take(s) < density);
        return u;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    src s;
    problem P;
    float *q, *k, *v, *o_f, *o_f1, *o_u, *w_u, sinks[3];
    void *am = NULL, *kp = NULL;
    size_t nq, nk, nv, no, nw, n;
    int big, npoison, t, b, h, i, j, d;
    double ref[16], rw[160], bound;
    mha_status s1, s2, s3;
    mha_run run;
    mha_error e1, e2, e3;

    s.p = data; s.n = size;
    memset(&P, 0, sizeof P);
    big = take(&s) % 8 == 0;   /* more than one key and query tile of the fused path */
    P.B = big ? 1 : 1 + (int)(take(&s) % 3);
    P.H = big ? 1 : 1 + (int)(take(&s) % 3);
    P.Lq = 1 + (int)(take(&s) % (big ? 80 : 17));
    P.Lk = 1 + (int)(take(&s) % (big ? 160 : 17));
    P.D = 1 + (int)(take(&s) % 9);
    P.Dv = 1 + (int)(take(&s) % 9);
    {
        unsigned a = take(&s);
        static const float scales[5] = {0.0f, 0.1f, 0.5f, 1.0f, 2.0f};
        P.o.attn_mask.kind = (mha_mask_kind)(a % 4);
        P.o.attn_mask.ndim = 2 + (int)(a / 4 % 3);
        P.o.key_padding_mask.kind = (mha_mask_kind)(a / 12 % 4);
        P.o.causal = (int)(a / 48 % 2);
        P.o.causal_align = (mha_causal_align)(a / 96 % 2);
        P.o.scale = scales[take(&s) % 5];
        P.o.num_threads = (int)(take(&s) % 4);
    }
    {   /* decoder options: one byte says which, then their values */
        unsigned a = take(&s);
        P.Hkv = (a & 1) && P.H > 1 ? 1 : P.H;                   /* GQA: one KV head for 2 or 3 */
        P.o.num_kv_heads = P.Hkv == P.H && (a & 2) ? 0 : P.Hkv;  /* 0 means H */
        if (a & 4) {
            P.o.window = 1;
            P.o.window_left = (int)(take(&s) % 8) - 1;          /* -1: unbounded */
            P.o.window_right = (int)(take(&s) % 8) - 1;
        }
        if (a & 8) P.o.softcap = 0.5f + (float)(take(&s) % 40);
        if (a & 16) {
            P.o.alibi = 1;
            if (a & 32) {
                for (h = 0; h < P.H; ++h) P.slopes[h] = value(&s) / 4.0f;
                P.o.alibi_slopes = P.slopes;
            } else if (mha_alibi_slopes(P.H, P.slopes, NULL) != MHA_OK) abort();
        }
        if (a & 64) {
            for (h = 0; h < P.H; ++h) { unsigned c = take(&s); sinks[h] = c < 32 ? -INFINITY : value(&s) * 2.0f; }
            P.o.sinks = sinks;
        }
    }
    nq = (size_t)P.B * P.H * P.Lq * P.D;
    nk = (size_t)P.B * P.Hkv * P.Lk * P.D;
    nv = (size_t)P.B * P.Hkv * P.Lk * P.Dv;
    no = (size_t)P.B * P.H * P.Lq * P.Dv;
    nw = (size_t)P.B * P.H * P.Lq * P.Lk;
    q = (float *)malloc(nq * sizeof *q);
    k = (float *)malloc(nk * sizeof *k);
    v = (float *)malloc(nv * sizeof *v);
    for (n = 0; n < nq; ++n) q[n] = value(&s);
    for (n = 0; n < nk; ++n) k[n] = value(&s);
    for (n = 0; n < nv; ++n) v[n] = value(&s);
    /* NaN / Inf planted at drawn places: a key or value row, or a query */
    npoison = (int)(take(&s) % 6);
    for (t = 0; t < npoison; ++t) {
        unsigned where = take(&s), c = take(&s);
        size_t at = ((size_t)take(&s) << 8 | take(&s));
        if (where % 3 == 0) k[at % nk] = special(c);
        else if (where % 3 == 1) v[at % nv] = special(c);
        else if (where % 16 == 2) q[at % nq] = special(c);
    }
    if (P.o.attn_mask.kind) {
        mha_mask *m = &P.o.attn_mask;
        if (m->ndim == 2) { m->shape[0] = P.Lq; m->shape[1] = P.Lk; n = (size_t)P.Lq * P.Lk; }
        else if (m->ndim == 3) { m->shape[0] = P.B * P.H; m->shape[1] = P.Lq; m->shape[2] = P.Lk; n = nw; }
        else { m->shape[0] = P.B; m->shape[1] = P.H; m->shape[2] = P.Lq; m->shape[3] = P.Lk; n = nw; }
        m->data = am = mask_fill(&s, m, n);
    }
    if (P.o.key_padding_mask.kind) {
        mha_mask *m = &P.o.key_padding_mask;
        m->ndim = 2; m->shape[0] = P.B; m->shape[1] = P.Lk;
        m->data = kp = mask_fill(&s, m, (size_t)P.B * P.Lk);
    }
    P.q = q; P.k = k; P.v = v;
    o_f = (float *)malloc(no * sizeof *o_f);
    o_f1 = (float *)malloc(no * sizeof *o_f1);
    o_u = (float *)malloc(no * sizeof *o_u);
    w_u = (float *)malloc(nw * sizeof *w_u);

    s1 = mha_sdpa_forward(P.B, P.H, P.Lq, P.Lk, P.D, P.Dv, q, k, v, &P.o, o_f, NULL, &e1);
    memset(&run, 0, sizeof run);
    run.weights = w_u;
    s2 = mha_sdpa_forward(P.B, P.H, P.Lq, P.Lk, P.D, P.Dv, q, k, v, &P.o, o_u, &run, &e2);
    t = P.o.num_threads;
    P.o.num_threads = 1;
    s3 = mha_sdpa_forward(P.B, P.H, P.Lq, P.Lk, P.D, P.Dv, q, k, v, &P.o, o_f1, NULL, &e3);
    P.o.num_threads = t;
    if (s1 != MHA_OK || s2 != MHA_OK || s3 != MHA_OK) {
        fprintf(stderr, "fuzz_diff: refused: %s\n", s1 != MHA_OK ? e1.message : s2 != MHA_OK ? e2.message : e3.message);
        fail(&P, "status", 0, 0, 0, (int)s1, s2, s3);
    }

    for (n = 0; n < no; ++n)
        if (!same_bits(o_f[n], o_f1[n])) fail(&P, "fused: threads change the bits", 0, 0, 0, (int)n, o_f[n], o_f1[n]);
    for (b = 0; b < P.B; ++b)
        for (h = 0; h < P.H; ++h)
            for (i = 0; i < P.Lq; ++i) {
                size_t row = ((size_t)b * P.H + h) * P.Lq + i;
                const float *of = o_f + row * P.Dv, *ou = o_u + row * P.Dv, *wu = w_u + row * P.Lk;
                int kind = reference(&P, b, h, i, ref, rw, &bound);
                if (kind == 2) {
                    for (d = 0; d < P.Dv; ++d)
                        if (of[d] != 0.0f || ou[d] != 0.0f) fail(&P, "fully masked row not zero", b, h, i, d, of[d], ou[d]);
                    for (j = 0; j < P.Lk; ++j)
                        if (wu[j] != 0.0f) fail(&P, "fully masked row: weight not zero", b, h, i, j, wu[j], 0);
                } else if (kind == 1) {
                    for (d = 0; d < P.Dv; ++d) {
                        if (!(fabs(of[d] - ref[d]) <= bound)) fail(&P, "fused vs reference", b, h, i, d, of[d], ref[d]);
                        if (!(fabs(ou[d] - ref[d]) <= bound)) fail(&P, "unfused vs reference", b, h, i, d, ou[d], ref[d]);
                    }
                    for (j = 0; j < P.Lk; ++j)
                        if (!(fabs(wu[j] - rw[j]) <= bound)) fail(&P, "weights vs reference", b, h, i, j, wu[j], rw[j]);
                }
            }
    free(q); free(k); free(v); free(o_f); free(o_f1); free(o_u); free(w_u); free(am); free(kp);
    return 0;
}
