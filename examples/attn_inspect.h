/* attn_inspect.h - what does an attention head do?  Scores from its weights.   v1.0.0

   Functions a user calls on attention weights (from a forward's
   run.weights, or any [Lq, Lk] maps whose rows sum to 1), in the spirit of
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
     (or #define MHA_INSPECT_STATIC too, for a private copy per file).  It
     includes "mha.h" for mha_status and mha_error (compile with -I
     pointing at the directory that holds mha.h), and its implementation
     "mha_report.h" (the error helpers the companion headers share), which
     stays next to attn_inspect.h.  A program that calls mha.h's functions
     defines MHA_IMPLEMENTATION in one file as usual.

   USAGE
       // A: one head's weights [L, L] of self-attention, tokens[L] its input
       double prev, ind;
       mha_error err;
       if (mha_inspect_prev_token(A, L, &prev, &err) != MHA_OK) fprintf(stderr, "%s\n", err.message);
       mha_inspect_induction(A, L, tokens, &ind, NULL);
       mha_inspect_scores s[H];
       mha_inspect_heads(W, H, L, tokens, s, &err);   // W [H, L, L]: all of them

   ERRORS (mha.h's convention)
     Every call returns an mha_status and takes an mha_error last (NULL
     allowed), filled on a refusal: status, function, field ("A", "L",
     "tokens", ...) and a message "mha_inspect_induction: tokens: is NULL".
     A NULL pointer is MHA_ERR_NULL_POINTER, a size < 1 MHA_ERR_INVALID_SIZE;
     on a refusal nothing is written (*score, out, R).  A score is returned
     through its out-parameter.

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
     at all is NaN, with status MHA_OK: that is a result, not an error (for
     example duplicate-token on distinct tokens, or previous-token at L = 1).
     Entropy: mean over rows of -sum_j A[i,j] ln A[i,j] (0 ln 0 = 0), in
     nats: 0 for a head that looks at one key, ln n for one that spreads
     evenly over n keys.

   LICENSE  MIT or public domain, as mha.h.
*/
#ifndef MHA_INSPECT_H
#define MHA_INSPECT_H

#include "mha.h"

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

/* A [L, L]: one head's self-attention weights, row i = query i; *score
   gets the detector's score (NaN when no query is eligible). */
MHA_INSPECT_DEF mha_status mha_inspect_prev_token(const float *A, int L, double *score, mha_error *err);
MHA_INSPECT_DEF mha_status mha_inspect_duplicate_token(const float *A, int L, const int *tokens, double *score,
                                                       mha_error *err);
MHA_INSPECT_DEF mha_status mha_inspect_induction(const float *A, int L, const int *tokens, double *score,
                                                 mha_error *err);
MHA_INSPECT_DEF mha_status mha_inspect_first_token(const float *A, int L, double *score, mha_error *err);
/* A [Lq, Lk]: *entropy = the mean row entropy in nats. */
MHA_INSPECT_DEF mha_status mha_inspect_entropy(const float *A, int Lq, int Lk, double *entropy, mha_error *err);

/* Every score of H heads W [H, L, L] at once into out[H]; tokens may be
   NULL (the duplicate-token and induction scores are then NaN: no token
   is eligible). */
typedef struct mha_inspect_scores {
    double prev_token, duplicate_token, induction, first_token, entropy;
} mha_inspect_scores;
MHA_INSPECT_DEF mha_status mha_inspect_heads(const float *W, int H, int L, const int *tokens,
                                             mha_inspect_scores *out, mha_error *err);

/* Attention rollout over n layers of self-attention weights
   A [n, H, L, L] (H = 1 for weights already averaged over heads):
       Abar_l = rownorm((mean_h A_l,h + I) / 2)
       R = Abar_n Abar_{n-1} ... Abar_1                       R [L, L]
   R[i, j] is how much of the input token j reaches position i after the
   last layer.  work: 2 L L floats of scratch.  Cost n L^3: meant for the
   lengths one looks at. */
MHA_INSPECT_DEF mha_status mha_inspect_rollout(int n, int H, int L, const float *A, float *R, float *work,
                                               mha_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MHA_INSPECT_H */

#ifdef MHA_INSPECT_IMPLEMENTATION
#ifndef MHA_INSPECT_IMPLEMENTATION_DONE
#define MHA_INSPECT_IMPLEMENTATION_DONE

#include <math.h>
#include <string.h>
#include "mha_report.h"

/* Refusals, in mha.h's convention (mha_report.h): the checks record the
   first refusal in a report that is never NULL (the public call lends its
   own when the caller passed NULL), and the public call signs it with its
   name: "mha_inspect_induction: tokens: is NULL". */

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

/* mean over eligible rows i of sum_{j in T(i)} A[i, j]; NaN when no row is
   eligible (tok NULL: no row is, for the detectors that read tokens).  The
   arguments are checked by the caller. */
static double mha_inspect__score(const float *A, int L, const int *tok, mha_inspect__kind k)
{
    double total = 0;
    int i, j, rows = 0;
    if ((k == MHA_INSPECT__DUP || k == MHA_INSPECT__IND) && !tok) return NAN;
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

/* One detector as a public call: the arguments checked, then the score. */
static mha_status mha_inspect__detector(const char *function, const float *A, int L, const int *tok, int need_tok,
                                        mha_inspect__kind k, double *score, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (mha_report__need(e, "A", A) == 0 && mha_report__need(e, "score", score) == 0 &&
        mha_report__size(e, "L", L) == 0 && (!need_tok || mha_report__need(e, "tokens", tok) == 0))
        *score = mha_inspect__score(A, L, tok, k);
    return mha_report__end(e, function);
}

MHA_INSPECT_DEF mha_status mha_inspect_prev_token(const float *A, int L, double *score, mha_error *err)
{
    return mha_inspect__detector("mha_inspect_prev_token", A, L, NULL, 0, MHA_INSPECT__PREV, score, err);
}
MHA_INSPECT_DEF mha_status mha_inspect_duplicate_token(const float *A, int L, const int *tokens, double *score,
                                                       mha_error *err)
{
    return mha_inspect__detector("mha_inspect_duplicate_token", A, L, tokens, 1, MHA_INSPECT__DUP, score, err);
}
MHA_INSPECT_DEF mha_status mha_inspect_induction(const float *A, int L, const int *tokens, double *score,
                                                 mha_error *err)
{
    return mha_inspect__detector("mha_inspect_induction", A, L, tokens, 1, MHA_INSPECT__IND, score, err);
}
MHA_INSPECT_DEF mha_status mha_inspect_first_token(const float *A, int L, double *score, mha_error *err)
{
    return mha_inspect__detector("mha_inspect_first_token", A, L, NULL, 0, MHA_INSPECT__FIRST, score, err);
}

/* mean_i  -sum_j a_ij ln a_ij   (a zero weight adds nothing: lim x ln x = 0) */
static double mha_inspect__entropy(const float *A, int Lq, int Lk)
{
    double total = 0;
    int i, j;
    for (i = 0; i < Lq; ++i) {
        const float *a = A + (size_t)i * Lk;
        double h = 0;
        for (j = 0; j < Lk; ++j)
            if (a[j] > 0.0f) h -= (double)a[j] * log((double)a[j]);
        total += h;
    }
    return total / Lq;
}

MHA_INSPECT_DEF mha_status mha_inspect_entropy(const float *A, int Lq, int Lk, double *entropy, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (mha_report__need(e, "A", A) == 0 && mha_report__need(e, "entropy", entropy) == 0 &&
        mha_report__size(e, "Lq", Lq) == 0 && mha_report__size(e, "Lk", Lk) == 0)
        *entropy = mha_inspect__entropy(A, Lq, Lk);
    return mha_report__end(e, "mha_inspect_entropy");
}

MHA_INSPECT_DEF mha_status mha_inspect_heads(const float *W, int H, int L, const int *tokens,
                                             mha_inspect_scores *out, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    int h;
    if (mha_report__need(e, "W", W) || mha_report__need(e, "out", out) || mha_report__size(e, "H", H) ||
        mha_report__size(e, "L", L))
        return mha_report__end(e, "mha_inspect_heads");
    for (h = 0; h < H; ++h) {
        const float *A = W + (size_t)h * L * L;
        out[h].prev_token = mha_inspect__score(A, L, NULL, MHA_INSPECT__PREV);
        out[h].duplicate_token = mha_inspect__score(A, L, tokens, MHA_INSPECT__DUP);
        out[h].induction = mha_inspect__score(A, L, tokens, MHA_INSPECT__IND);
        out[h].first_token = mha_inspect__score(A, L, NULL, MHA_INSPECT__FIRST);
        out[h].entropy = mha_inspect__entropy(A, L, L);
    }
    return MHA_OK;
}

MHA_INSPECT_DEF mha_status mha_inspect_rollout(int n, int H, int L, const float *A, float *R, float *work,
                                               mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    size_t LL = (size_t)L * L, l, i, j, k, h;
    float *bar = work, *prod = work ? work + (size_t)L * L : NULL;
    if (mha_report__need(e, "R", R) || mha_report__need(e, "work", work) || mha_report__size(e, "n", n) ||
        mha_report__need(e, "A", A) || mha_report__size(e, "H", H) || mha_report__size(e, "L", L))
        return mha_report__end(e, "mha_inspect_rollout");
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
    return MHA_OK;
}

#endif /* MHA_INSPECT_IMPLEMENTATION_DONE */
#endif /* MHA_INSPECT_IMPLEMENTATION */
