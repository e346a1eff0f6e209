/* attn_inspect.h - what does an attention head do?  Scores from its weights.   v0.1.0

   Functions a user calls on attention weights (from mha_forward's
   attn_weights, or any [Lq, Lk] maps whose rows sum to 1), in the spirit of
   TransformerLens' detect_head and of attention rollout:
     previous-token   each query attends to the token just before it
     duplicate-token  ... to earlier copies of its own token
     induction        ... to the token after an earlier copy of its own token
     first-token      ... to position 0 (a "sink" that collects idle attention)
     entropy          how spread out each query's attention is (nats)
     rollout          attention flow through a stack of layers
                      (Abnar & Zuidema 2020: (A + I) / 2 row-renormalised,
                      multiplied across layers)

   BUILD
     In exactly one C or C++ file:
         #define MHA_INSPECT_IMPLEMENTATION
         #include "attn_inspect.h"
     (or #define MHA_INSPECT_STATIC too, for a private copy per file)

   USAGE
       // A: one head's weights [L, L] of self-attention, tokens[L] its input
       double prev = mha_inspect_prev_token(A, L);
       double ind  = mha_inspect_induction(A, L, tokens);
       mha_inspect_scores s[H];
       mha_inspect_heads(W, H, L, tokens, s);     // W [H, L, L]: all of them

   SCORES
     A detector score is the attention mass that a query puts on the keys
     the pattern names, averaged over the queries for which the pattern
     names at least one key:
         score = mean over eligible i of  sum_{j in T(i)} A[i, j]
         previous-token   T(i) = {i - 1}                          (i >= 1)
         duplicate-token  T(i) = {j < i : tok[j] = tok[i]}
         induction        T(i) = {j : 1 <= j <= i, tok[j-1] = tok[i]}
         first-token      T(i) = {0}                              (every i)
     So a head doing exactly that scores 1 and a head that ignores it
     scores near the mass that chance puts there (a uniform causal head
     scores about ln(L)/L on previous-token).  Queries with no eligible key
     are left out rather than counted as failures: row 0 of a causal
     previous-token head has nowhere to go.  A score with no eligible query
     at all is NaN (for example duplicate-token on distinct tokens), as is
     any score of a bad argument (NULL, L < 1).
     Entropy: mean over rows of -sum_j A[i,j] ln A[i,j] (0 ln 0 = 0), in
     nats: 0 for a head that looks at one key, ln n for one that spreads
     evenly over n keys.

   LICENSE  MIT or public domain, as mha.h.
*/
#ifndef MHA_INSPECT_H
#define MHA_INSPECT_H

#ifndef MHA_INSPECT_DEF
#ifdef MHA_INSPECT_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define MHA_INSPECT_DEF static __attribute__((unused))
#else
#define MHA_INSPECT_DEF static
#endif
#else
#define MHA_INSPECT_DEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* A [L, L]: one head's self-attention weights, row i = query i. */
MHA_INSPECT_DEF double mha_inspect_prev_token(const float *A, int L);
MHA_INSPECT_DEF double mha_inspect_duplicate_token(const float *A, int L, const int *tokens);
MHA_INSPECT_DEF double mha_inspect_induction(const float *A, int L, const int *tokens);
MHA_INSPECT_DEF double mha_inspect_first_token(const float *A, int L);
/* A [Lq, Lk]: mean row entropy in nats. */
MHA_INSPECT_DEF double mha_inspect_entropy(const float *A, int Lq, int Lk);

/* Every score of H heads W [H, L, L] at once; tokens may be NULL (the
   duplicate-token and induction scores are then NaN). */
typedef struct mha_inspect_scores {
    double prev_token, duplicate_token, induction, first_token, entropy;
} mha_inspect_scores;
MHA_INSPECT_DEF void mha_inspect_heads(const float *W, int H, int L, const int *tokens,
                                       mha_inspect_scores *out);

/* Attention rollout over n layers of self-attention weights
   A [n, H, L, L] (H = 1 for weights already averaged over heads):
       Abar_l = rownorm((mean_h A_l,h + I) / 2)
       R = Abar_n Abar_{n-1} ... Abar_1                       R [L, L]
   R[i, j] is how much of the input token j reaches position i after the
   last layer.  work: 2 L L floats.  Returns 0, or -1 on a bad argument
   (nothing written).  Cost n L^3: meant for the lengths one looks at. */
MHA_INSPECT_DEF int mha_inspect_rollout(int n, int H, int L, const float *A, float *R, float *work);

#ifdef __cplusplus
}
#endif
#endif /* MHA_INSPECT_H */

#ifdef MHA_INSPECT_IMPLEMENTATION
#ifndef MHA_INSPECT_IMPLEMENTATION_DONE
#define MHA_INSPECT_IMPLEMENTATION_DONE

#include <math.h>
#include <string.h>

/* Which keys a detector names for query i (see SCORES). */
typedef enum { MHA_INSPECT__PREV, MHA_INSPECT__DUP, MHA_INSPECT__IND, MHA_INSPECT__FIRST } mha_inspect__kind;

static int mha_inspect__target(mha_inspect__kind k, const int *tok, int i, int j)
{
    switch (k) {
    case MHA_INSPECT__PREV:  return j == i - 1;
    case MHA_INSPECT__DUP:   return j < i && tok[j] == tok[i];
    case MHA_INSPECT__IND:   return j >= 1 && j <= i && tok[j - 1] == tok[i];
    case MHA_INSPECT__FIRST: return j == 0;
    }
    return 0;
}

/* mean over eligible rows i of sum_{j in T(i)} A[i, j] */
static double mha_inspect__score(const float *A, int L, const int *tok, mha_inspect__kind k)
{
    double total = 0;
    int i, j, rows = 0;
    if (!A || L < 1 || ((k == MHA_INSPECT__DUP || k == MHA_INSPECT__IND) && !tok)) return NAN;
    for (i = 0; i < L; ++i) {
        const float *a = A + (size_t)i * L;
        double mass = 0;
        int eligible = 0;
        for (j = 0; j < L; ++j)
            if (mha_inspect__target(k, tok, i, j)) { eligible = 1; mass += a[j]; }
        if (eligible) { total += mass; ++rows; }
    }
    return rows ? total / rows : NAN;
}

MHA_INSPECT_DEF double mha_inspect_prev_token(const float *A, int L)
{
    return mha_inspect__score(A, L, NULL, MHA_INSPECT__PREV);
}
MHA_INSPECT_DEF double mha_inspect_duplicate_token(const float *A, int L, const int *tokens)
{
    return mha_inspect__score(A, L, tokens, MHA_INSPECT__DUP);
}
MHA_INSPECT_DEF double mha_inspect_induction(const float *A, int L, const int *tokens)
{
    return mha_inspect__score(A, L, tokens, MHA_INSPECT__IND);
}
MHA_INSPECT_DEF double mha_inspect_first_token(const float *A, int L)
{
    return mha_inspect__score(A, L, NULL, MHA_INSPECT__FIRST);
}

/* mean_i  -sum_j a_ij ln a_ij   (a zero weight adds nothing: lim x ln x = 0) */
MHA_INSPECT_DEF double mha_inspect_entropy(const float *A, int Lq, int Lk)
{
    double total = 0;
    int i, j;
    if (!A || Lq < 1 || Lk < 1) return NAN;
    for (i = 0; i < Lq; ++i) {
        const float *a = A + (size_t)i * Lk;
        double h = 0;
        for (j = 0; j < Lk; ++j)
            if (a[j] > 0.0f) h -= (double)a[j] * log((double)a[j]);
        total += h;
    }
    return total / Lq;
}

MHA_INSPECT_DEF void mha_inspect_heads(const float *W, int H, int L, const int *tokens,
                                       mha_inspect_scores *out)
{
    int h;
    if (!W || !out || H < 1 || L < 1) return;
    for (h = 0; h < H; ++h) {
        const float *A = W + (size_t)h * L * L;
        out[h].prev_token = mha_inspect_prev_token(A, L);
        out[h].duplicate_token = mha_inspect_duplicate_token(A, L, tokens);
        out[h].induction = mha_inspect_induction(A, L, tokens);
        out[h].first_token = mha_inspect_first_token(A, L);
        out[h].entropy = mha_inspect_entropy(A, L, L);
    }
}

MHA_INSPECT_DEF int mha_inspect_rollout(int n, int H, int L, const float *A, float *R, float *work)
{
    size_t LL = (size_t)L * L, l, i, j, k, h;
    float *bar = work, *prod = work ? work + (size_t)L * L : NULL;
    if (!A || !R || !work || n < 1 || H < 1 || L < 1) return -1;
    for (l = 0; l < (size_t)n; ++l) {
        const float *Al = A + l * (size_t)H * LL;
        /* 1. Abar = rownorm((mean_h A_h + I) / 2); a row with no weight at all
              (a query whose keys were all masked) becomes the identity row */
        for (i = 0; i < (size_t)L; ++i) {
            double s = 0;
            for (j = 0; j < (size_t)L; ++j) {
                double m = 0;
                for (h = 0; h < (size_t)H; ++h) m += Al[h * LL + i * L + j];
                m = 0.5 * (m / H + (i == j ? 1.0 : 0.0));
                bar[i * L + j] = (float)m;
                s += m;
            }
            for (j = 0; j < (size_t)L; ++j) bar[i * L + j] = (float)(bar[i * L + j] / s);
        }
        /* 2. R = Abar R (R = Abar for the first layer) */
        if (l == 0) { memcpy(R, bar, LL * sizeof(float)); continue; }
        for (i = 0; i < (size_t)L; ++i)
            for (j = 0; j < (size_t)L; ++j) {
                double s = 0;
                for (k = 0; k < (size_t)L; ++k) s += (double)bar[i * L + k] * R[k * L + j];
                prod[i * L + j] = (float)s;
            }
        memcpy(R, prod, LL * sizeof(float));
    }
    return 0;
}

#endif /* MHA_INSPECT_IMPLEMENTATION_DONE */
#endif /* MHA_INSPECT_IMPLEMENTATION */
