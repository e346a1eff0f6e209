/* ref.h - the tests' own references, in float64, written from the
   definitions (mha.h's manual and docs/theory.md), not from the library's
   code.  They are slow and plain on purpose: every loop is the formula above
   it.  Include after mha.h (for mha_options and the mask kinds).

     ref_gemm          C = alpha op(A) op(B) + beta C0
     ref_softmax_row   p = softmax(s) over the allowed entries, with a sink
     ref_sdpa          scaled dot-product attention on [B, H, L, D]: the
                       output, each row's log-sum-exp, and the backward
                       (dq, dk, dv, the sinks' gradient), with every option
                       of mha_options an SDPA call reads
*/
#ifndef MHA_TEST_REF_H
#define MHA_TEST_REF_H
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "mha.h"

#if defined(__GNUC__) || defined(__clang__)
#define REF_UNUSED __attribute__((unused))
#else
#define REF_UNUSED
#endif

/* R[i, j] = alpha sum_p op(A)[i, p] op(B)[p, j] + beta C0[i, j]   (R is M x N, dense)
   op(A)[i, p] = A[i, p] (ta = 0) or A[p, i] (ta = 1); op(B) likewise.
   C0 is not read when beta == 0 (the library's contract: NaN there must not
   reach the result), and may then be NULL.  */
static REF_UNUSED void ref_gemm(int ta, int tb, int M, int N, int K, double alpha,
                                const float *A, size_t lda, const float *B, size_t ldb,
                                double beta, const float *C0, size_t ldc, double *R)
{
    int i, j, p;
    for (i = 0; i < M; ++i)
        for (j = 0; j < N; ++j) {
            double acc = 0.0;
            for (p = 0; p < K; ++p) {
                double a = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                double b = tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                acc += a * b;
            }
            R[(size_t)i * N + j] = alpha * acc + (beta == 0.0 ? 0.0 : beta * C0[(size_t)i * ldc + j]);
        }
}

/* Softmax of one row of n scores, -inf = blocked, with a sink logit (-inf:
   none) that joins the denominator and has no column:
       m   = max(max_{j allowed} s_j, sink)
       lse = m + log(sum_{j allowed} exp(s_j - m) + exp(sink - m))
       p_j = exp(s_j - lse)   (0 for a blocked j)
   Returns lse: -inf when nothing is allowed and there is no sink (then every
   p_j = 0); NaN when some score is NaN (then every p_j is NaN).  */
static REF_UNUSED double ref_softmax_row(const float *s, int n, double sink, double *p)
{
    double m = sink, sum, lse;
    int j, nan = 0;
    for (j = 0; j < n; ++j) {
        if (s[j] != s[j]) nan = 1;
        else if (s[j] != -INFINITY && s[j] > m) m = s[j];
    }
    if (nan) {
        for (j = 0; j < n; ++j) p[j] = NAN;
        return NAN;
    }
    if (m == -INFINITY) {
        for (j = 0; j < n; ++j) p[j] = 0.0;
        return -INFINITY;
    }
    sum = sink == -INFINITY ? 0.0 : exp(sink - m);
    for (j = 0; j < n; ++j) if (s[j] != -INFINITY) sum += exp((double)s[j] - m);
    lse = m + log(sum);
    for (j = 0; j < n; ++j) p[j] = s[j] == -INFINITY ? 0.0 : exp((double)s[j] - lse);
    return lse;
}

/* The ALiBi paper's slope of head h of H (Press et al.), in double: with n
   the largest power of two <= H, head h < n gets 2^(-8 (h+1) / n) and head
   n + m gets 2^(-4 (2m+1) / n).  */
static REF_UNUSED double ref_alibi_slope(int H, int h)
{
    int n = 1;
    while (n * 2 <= H) n *= 2;
    return h < n ? pow(2.0, -8.0 * (h + 1) / n) : pow(2.0, -4.0 * (2 * (h - n) + 1) / n);
}

/* Is key j of query i in (b, h) allowed, and what is added to its score?
   *add gets the float masks' values and the ALiBi bias.  The rules (mha.h,
   section 3), with i' = i, or i + Lk - Lq when causal_align is BOTTOM_RIGHT:
     attn_mask   [Lq, Lk], [B*H, Lq, Lk] or [B, H, Lq, Lk]; bool: nonzero
                 blocks (BOOL) or allows (BOOL_KEEP); float: -inf blocks,
                 anything else is added
     key_padding_mask [B, Lk], the same kinds
     causal      j <= i'
     window      i' - left <= j <= i' + right (-1: that side unbounded)
     ALiBi       + slope_h (j - i')  */
static REF_UNUSED int ref_allowed(const mha_options *o, int B, int H, int Lq, int Lk,
                                  int b, int h, int i, int j, double *add)
{
    long ip = (long)i + (o->causal_align == MHA_CAUSAL_BOTTOM_RIGHT ? (long)Lk - Lq : 0);
    (void)B;
    *add = 0.0;
    if (o->attn_mask.kind != MHA_MASK_NONE) {
        size_t row = o->attn_mask.ndim == 2 ? (size_t)i : ((size_t)b * H + h) * Lq + i;
        size_t at = row * Lk + j;
        if (o->attn_mask.kind == MHA_MASK_FLOAT) {
            float f = ((const float *)o->attn_mask.data)[at];
            if (f == -INFINITY) return 0;
            *add += f;
        } else {
            unsigned char u = ((const unsigned char *)o->attn_mask.data)[at];
            if (o->attn_mask.kind == MHA_MASK_BOOL ? u != 0 : u == 0) return 0;
        }
    }
    if (o->key_padding_mask.kind != MHA_MASK_NONE) {
        size_t at = (size_t)b * Lk + j;
        if (o->key_padding_mask.kind == MHA_MASK_FLOAT) {
            float f = ((const float *)o->key_padding_mask.data)[at];
            if (f == -INFINITY) return 0;
            *add += f;
        } else {
            unsigned char u = ((const unsigned char *)o->key_padding_mask.data)[at];
            if (o->key_padding_mask.kind == MHA_MASK_BOOL ? u != 0 : u == 0) return 0;
        }
    }
    if (o->causal && j > ip) return 0;
    if (o->window) {
        if (o->window_left >= 0 && j < ip - o->window_left) return 0;
        if (o->window_right >= 0 && j > ip + o->window_right) return 0;
    }
    if (o->alibi) {
        double slope = o->alibi_slopes ? (double)o->alibi_slopes[h] : ref_alibi_slope(H, h);
        *add += slope * (double)(j - ip);
    }
    return 1;
}

/* Scaled dot-product attention in float64 on dense tensors
     q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], dout [B, H, Lq, Dv]
   with Hkv = o->num_kv_heads (0: H); query head h reads KV head h / (H / Hkv).
   Forward, for query i of (b, h) and each allowed key j:
     r_ij = scale q_i . k_j                      scale = o->scale, or 1/sqrt(D)
     c_ij = cap tanh(r_ij / cap)                 (softcap > 0; else c = r)
     s_ij = c_ij + add_ij                        (float masks, ALiBi: ref_allowed)
     p_i  = softmax(s_i, sink_h)                 (ref_softmax_row; lse_i its log-sum-exp)
     o_i  = sum_j p_ij v_j
   Backward, given dO (dout):
     dv_j   += sum_i p_ij dO_i
     dP_ij   = dO_i . v_j
     g_i     = sum_j p_ij dP_ij
     dS_ij   = p_ij (dP_ij - g_i)                 the softmax's Jacobian
     dR_ij   = dS_ij (1 - tanh^2(r_ij / cap))     (softcap; else dR = dS)
     dq_i   += scale sum_j dR_ij k_j
     dk_j   += scale sum_i dR_ij q_i
     dsink_h = -sum_i exp(sink_h - lse_i) g_i     (the sink is a column with no value)
   A blocked key is never read (so NaN or Inf in its k or v rows cannot
   reach anything) and gets no gradient.  Each output may be NULL; the
   given ones are written (not added to): out [B,H,Lq,Dv], lse [B,H,Lq],
   dq, dk, dv like q, k, v, dsinks [H] (o->sinks set).  The backward runs
   when dout is given.  */
static REF_UNUSED void ref_sdpa(const mha_options *o, int B, int H, int Lq, int Lk, int D, int Dv,
                                const float *q, const float *k, const float *v, const float *dout,
                                double *out, double *lse, double *dq, double *dk, double *dv,
                                double *dsinks)
{
    int Hkv = o->num_kv_heads ? o->num_kv_heads : H, group = H / Hkv, b, h, i, j, d;
    double scale = o->scale > 0 ? (double)o->scale : 1.0 / sqrt((double)D);
    double cap = o->softcap > 0 ? (double)o->softcap : 0.0;
    double *r = (double *)malloc((size_t)(Lk ? Lk : 1) * sizeof(double));
    double *p = (double *)malloc((size_t)(Lk ? Lk : 1) * sizeof(double));
    double *dp = (double *)malloc((size_t)(Lk ? Lk : 1) * sizeof(double));
    float *s = (float *)malloc((size_t)(Lk ? Lk : 1) * sizeof(float));
    double *sc = (double *)malloc((size_t)(Lk ? Lk : 1) * sizeof(double));
    if (dq) memset(dq, 0, (size_t)B * H * Lq * D * sizeof(double));
    if (dk) memset(dk, 0, (size_t)B * Hkv * Lk * D * sizeof(double));
    if (dv) memset(dv, 0, (size_t)B * Hkv * Lk * Dv * sizeof(double));
    if (dsinks) memset(dsinks, 0, (size_t)H * sizeof(double));
    for (b = 0; b < B; ++b)
        for (h = 0; h < H; ++h) {
            size_t bh = (size_t)b * H + h, bg = (size_t)b * Hkv + h / group;
            const float *qh = q + bh * Lq * D, *kh = k + bg * Lk * D, *vh = v + bg * Lk * Dv;
            double sink = o->sinks ? (double)o->sinks[h] : -INFINITY;
            for (i = 0; i < Lq; ++i) {
                const float *qi = qh + (size_t)i * D;
                double l, g = 0.0;
                /* scores: s holds the final score as a float only to mark blocked
                   keys for ref_softmax_row; the double value is in sc */
                for (j = 0; j < Lk; ++j) {
                    double add, acc = 0.0;
                    if (!ref_allowed(o, B, H, Lq, Lk, b, h, i, j, &add)) { s[j] = -INFINITY; continue; }
                    for (d = 0; d < D; ++d) acc += (double)qi[d] * kh[(size_t)j * D + d];
                    r[j] = scale * acc;
                    sc[j] = (cap > 0 ? cap * tanh(r[j] / cap) : r[j]) + add;
                    s[j] = 0.0f;   /* allowed; the value is taken from sc below */
                }
                /* the softmax in double on sc (ref_softmax_row's definition, inlined for doubles) */
                {
                    double m = sink, sum;
                    for (j = 0; j < Lk; ++j) if (s[j] != -INFINITY && sc[j] > m) m = sc[j];
                    if (m == -INFINITY) {
                        for (j = 0; j < Lk; ++j) p[j] = 0.0;
                        l = -INFINITY;
                    } else {
                        sum = sink == -INFINITY ? 0.0 : exp(sink - m);
                        for (j = 0; j < Lk; ++j) if (s[j] != -INFINITY) sum += exp(sc[j] - m);
                        l = m + log(sum);
                        for (j = 0; j < Lk; ++j) p[j] = s[j] == -INFINITY ? 0.0 : exp(sc[j] - l);
                    }
                }
                if (lse) lse[bh * Lq + i] = l;
                if (out)
                    for (d = 0; d < Dv; ++d) {
                        double acc = 0.0;
                        for (j = 0; j < Lk; ++j) if (p[j] != 0.0) acc += p[j] * vh[(size_t)j * Dv + d];
                        out[(bh * Lq + i) * Dv + d] = acc;
                    }
                if (!dout) continue;
                {
                    const float *doi = dout + (bh * Lq + i) * Dv;
                    /* dP_ij = dO_i . v_j;  g_i = sum_j p_ij dP_ij */
                    for (j = 0; j < Lk; ++j) {
                        double acc = 0.0;
                        dp[j] = 0.0;
                        if (p[j] == 0.0) continue;
                        for (d = 0; d < Dv; ++d) acc += (double)doi[d] * vh[(size_t)j * Dv + d];
                        dp[j] = acc;
                        g += p[j] * acc;
                    }
                    /* dv_j += p_ij dO_i */
                    if (dv)
                        for (j = 0; j < Lk; ++j)
                            if (p[j] != 0.0)
                                for (d = 0; d < Dv; ++d) dv[(bg * Lk + j) * Dv + d] += p[j] * doi[d];
                    /* dR_ij = p_ij (dP_ij - g_i) (1 - tanh^2(r_ij / cap)) */
                    for (j = 0; j < Lk; ++j) {
                        double t;
                        if (p[j] == 0.0) { dp[j] = 0.0; continue; }
                        dp[j] = p[j] * (dp[j] - g);
                        if (cap > 0) { t = tanh(r[j] / cap); dp[j] *= 1.0 - t * t; }
                    }
                    /* dq_i += scale sum_j dR_ij k_j;  dk_j += scale dR_ij q_i */
                    for (j = 0; j < Lk; ++j) {
                        if (dp[j] == 0.0) continue;
                        if (dq)
                            for (d = 0; d < D; ++d) dq[(bh * Lq + i) * D + d] += scale * dp[j] * kh[(size_t)j * D + d];
                        if (dk)
                            for (d = 0; d < D; ++d) dk[(bg * Lk + j) * D + d] += scale * dp[j] * qi[d];
                    }
                    /* dsink_h -= exp(sink_h - lse_i) g_i */
                    if (dsinks && sink != -INFINITY && l != -INFINITY) dsinks[h] -= exp(sink - l) * g;
                }
            }
        }
    free(r); free(p); free(dp); free(s); free(sc);
}

#endif /* MHA_TEST_REF_H */
