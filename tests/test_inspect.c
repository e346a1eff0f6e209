/* test_inspect.c - examples/attn_inspect.h: each head detector on synthetic
   heads whose answer is known (a pure previous-token head scores 1, a
   uniform head scores what chance gives), on random heads against a brute
   force written here, attention rollout against a float64 reference, and
   every refusal with its status, field and message, nothing written.
   Built without MHA_IMPLEMENTATION: attn_inspect.h needs only mha.h's types. */
#include <stdlib.h>
#include <string.h>
#define MHA_INSPECT_IMPLEMENTATION
#include "../examples/attn_inspect.h"
#include "testutil.h"
#include "errcheck.h"

#define MAXL 40

/* The scores of well-formed arguments: each call must succeed with a clean report. */
static int clean(mha_status s, const mha_error *e) { return s == MHA_OK && e->status == MHA_OK && !e->field; }
static double score_prev(const float *A, int L)
{
    double x = -1;
    mha_error e;
    mha_status s = mha_inspect_prev_token(A, L, &x, &e);
    CHECK(clean(s, &e), "prev_token: %s", e.message);
    return x;
}
static double score_first(const float *A, int L)
{
    double x = -1;
    mha_error e;
    mha_status s = mha_inspect_first_token(A, L, &x, &e);
    CHECK(clean(s, &e), "first_token: %s", e.message);
    return x;
}
static double score_dup(const float *A, int L, const int *tok)
{
    double x = -1;
    mha_error e;
    mha_status s = mha_inspect_duplicate_token(A, L, tok, &x, &e);
    CHECK(clean(s, &e), "duplicate_token: %s", e.message);
    return x;
}
static double score_ind(const float *A, int L, const int *tok)
{
    double x = -1;
    mha_error e;
    mha_status s = mha_inspect_induction(A, L, tok, &x, &e);
    CHECK(clean(s, &e), "induction: %s", e.message);
    return x;
}
static double score_ent(const float *A, int Lq, int Lk)
{
    double x = -1;
    mha_error e;
    mha_status s = mha_inspect_entropy(A, Lq, Lk, &x, &e);
    CHECK(clean(s, &e), "entropy: %s", e.message);
    return x;
}

static void zero(float *A, int L) { memset(A, 0, sizeof(float) * (size_t)L * L); }

/* causal uniform: row i spreads 1/(i+1) over keys 0..i */
static void causal_uniform(float *A, int L)
{
    int i, j;
    zero(A, L);
    for (i = 0; i < L; ++i)
        for (j = 0; j <= i; ++j) A[i * L + j] = 1.0f / (float)(i + 1);
}

/* a random causal head: positive weights on keys 0..i, each row summing to 1 */
static void causal_random(tu_rng *r, float *A, int L)
{
    int i, j;
    zero(A, L);
    for (i = 0; i < L; ++i) {
        double s = 0;
        for (j = 0; j <= i; ++j) { A[i * L + j] = 1.1f + tu_uniform(r); s += A[i * L + j]; }
        for (j = 0; j <= i; ++j) A[i * L + j] = (float)(A[i * L + j] / s);
    }
}

static int close_to(double a, double b, double tol) { return fabs(a - b) <= tol * (fabs(b) > 1 ? fabs(b) : 1); }

static void test_previous_and_first(void)
{
    static float A[MAXL * MAXL];
    const int L = 17;
    double chance = 0, ent = 0;
    int i;
    /* pure previous-token head: row 0 has nowhere to go but itself */
    zero(A, L);
    A[0] = 1.0f;
    for (i = 1; i < L; ++i) A[i * L + i - 1] = 1.0f;
    CHECK(score_prev(A, L) == 1.0, "pure previous-token head: %g", score_prev(A, L));
    CHECK(close_to(score_first(A, L), 2.0 / L, 1e-12), "its first-token score 2/L: %g",
          score_first(A, L));
    CHECK(score_ent(A, L, L) == 0.0, "one key per row: entropy 0");
    /* uniform causal head: previous-token mass 1/(i+1) in row i */
    causal_uniform(A, L);
    for (i = 1; i < L; ++i) chance += 1.0 / (i + 1);
    chance /= L - 1;
    for (i = 0; i < L; ++i) ent += log(i + 1.0);
    ent /= L;
    CHECK(close_to(score_prev(A, L), chance, 1e-6), "uniform head: %g, chance %g",
          score_prev(A, L), chance);
    CHECK(score_prev(A, L) < 0.25, "a uniform head scores low on previous-token");
    CHECK(close_to(score_ent(A, L, L), ent, 1e-6), "uniform causal entropy %g, want %g",
          score_ent(A, L, L), ent);
    /* sink head: every row on key 0 */
    zero(A, L);
    for (i = 0; i < L; ++i) A[i * L] = 1.0f;
    CHECK(score_first(A, L) == 1.0, "sink head scores 1 on first-token");
    CHECK(close_to(score_prev(A, L), 1.0 / (L - 1), 1e-12), "sink head on previous-token: 1/(L-1)");
    /* full (non-causal) uniform head over Lk keys: entropy ln Lk */
    {
        static float U[7 * 13];
        for (i = 0; i < 7 * 13; ++i) U[i] = 1.0f / 13;
        CHECK(close_to(score_ent(U, 7, 13), log(13.0), 1e-6), "uniform over 13 keys: entropy %g",
              score_ent(U, 7, 13));
    }
    CHECK(isnan(score_prev(A, 1)), "L = 1: no query has a previous token: NaN, and MHA_OK");
}

/* a random sequence of n distinct tokens repeated twice: the induction prompt */
static void repeated(tu_rng *r, int n, int *tok)
{
    int i, j;
    for (i = 0; i < n; ++i) {
        int t, fresh;
        do {
            t = (int)(tu_next(r) % 1000);
            fresh = 1;
            for (j = 0; j < i; ++j) fresh &= tok[j] != t;
        } while (!fresh);
        tok[i] = tok[n + i] = t;
    }
}

static void test_induction_and_duplicate(void)
{
    static float A[MAXL * MAXL];
    const int n = 11, L = 2 * n;
    int tok[MAXL], i;
    tu_rng r = {21};
    repeated(&r, n, tok);
    /* pure induction head: in the second copy, query i (token s[i-n]) looks at
       i-n+1, the token after the earlier copy of its own; the first copy has
       no earlier copy and looks at itself */
    zero(A, L);
    for (i = 0; i < L; ++i) A[i * L + (i < n ? i : i - n + 1)] = 1.0f;
    CHECK(score_ind(A, L, tok) == 1.0, "pure induction head: %g", score_ind(A, L, tok));
    CHECK(score_dup(A, L, tok) < 0.01, "... is no duplicate-token head: %g",
          score_dup(A, L, tok));
    CHECK(score_prev(A, L) < 0.1, "... nor previous-token: %g", score_prev(A, L));
    /* pure duplicate-token head: the second copy looks at its earlier copy i-n */
    zero(A, L);
    for (i = 0; i < L; ++i) A[i * L + (i < n ? i : i - n)] = 1.0f;
    CHECK(score_dup(A, L, tok) == 1.0, "pure duplicate-token head: %g",
          score_dup(A, L, tok));
    CHECK(score_ind(A, L, tok) < 0.01, "... is no induction head: %g", score_ind(A, L, tok));
    /* a uniform head: each eligible row of the second copy has 1 target among i+1 keys */
    causal_uniform(A, L);
    {
        double want = 0;
        for (i = n; i < L; ++i) want += 1.0 / (i + 1);
        want /= n;
        CHECK(close_to(score_ind(A, L, tok), want, 1e-6), "uniform head induction %g, chance %g",
              score_ind(A, L, tok), want);
        CHECK(close_to(score_dup(A, L, tok), want, 1e-6), "uniform head duplicate %g",
              score_dup(A, L, tok));
        CHECK(score_ind(A, L, tok) < 0.1, "a uniform head scores low on induction");
    }
    /* distinct tokens: no query has a duplicate, the scores are NaN (not 0, not 1) */
    for (i = 0; i < n; ++i) tok[n + i] = 5000 + i;
    CHECK(isnan(score_dup(A, L, tok)) && isnan(score_ind(A, L, tok)),
          "no duplicates anywhere: NaN, and MHA_OK");
}

/* Random heads and token sequences with repeats against a brute force that
   walks the definitions in a different order: per earlier position p. */
static void test_random_heads(void)
{
    static float W[3 * MAXL * MAXL];
    static const int lens[] = {1, 3, 7, 17, 30};
    tu_rng r = {99};
    size_t c;
    int worst_ok = 1;
    for (c = 0; c < sizeof lens / sizeof lens[0]; ++c) {
        int L = lens[c], H = 3, tok[MAXL], h, i, p;
        mha_inspect_scores s[3];
        for (i = 0; i < L; ++i) tok[i] = (int)(tu_next(&r) % 4);   /* 4 symbols: many repeats */
        for (h = 0; h < H; ++h) causal_random(&r, W + (size_t)h * L * L, L);
        mha_error e;
        CHECK(clean(mha_inspect_heads(W, H, L, tok, s, &e), &e), "heads: %s", e.message);
        for (h = 0; h < H; ++h) {
            const float *A = W + (size_t)h * L * L;
            double prev = 0, dup = 0, ind = 0, first = 0, ent = 0;
            int nprev = 0, ndup = 0, nind = 0, j;
            for (i = 0; i < L; ++i) {
                double md = 0, mi = 0;
                int hd = 0, hi = 0;
                if (i >= 1) { prev += A[i * L + i - 1]; ++nprev; }
                first += A[i * L];
                for (p = 0; p < i; ++p)
                    if (tok[p] == tok[i]) { md += A[i * L + p]; mi += A[i * L + p + 1]; hd = hi = 1; }
                if (hd) { dup += md; ++ndup; }
                if (hi) { ind += mi; ++nind; }
                for (j = 0; j < L; ++j) if (A[i * L + j] > 0) ent -= A[i * L + j] * log(A[i * L + j]);
            }
            worst_ok &= nprev ? close_to(s[h].prev_token, prev / nprev, 1e-12) : isnan(s[h].prev_token);
            worst_ok &= ndup ? close_to(s[h].duplicate_token, dup / ndup, 1e-12) : isnan(s[h].duplicate_token);
            worst_ok &= nind ? close_to(s[h].induction, ind / nind, 1e-12) : isnan(s[h].induction);
            worst_ok &= close_to(s[h].first_token, first / L, 1e-12);
            worst_ok &= close_to(s[h].entropy, ent / L, 1e-12);
            CHECK(worst_ok, "L %d head %d: scores differ from the brute force", L, h);
        }
    }
}

/* rollout against float64: Abar_l = rownorm((mean_h A + I)/2), R = Abar_n ... Abar_1 */
static void rollout_ref(int n, int H, int L, const float *A, double *R)
{
    double *bar = (double *)malloc(sizeof(double) * (size_t)L * L);
    double *t = (double *)malloc(sizeof(double) * (size_t)L * L);
    int l, h, i, j, k;
    for (l = 0; l < n; ++l) {
        for (i = 0; i < L; ++i) {
            double s = 0;
            for (j = 0; j < L; ++j) {
                double m = 0;
                for (h = 0; h < H; ++h) m += A[(((size_t)l * H + h) * L + i) * L + j];
                bar[i * L + j] = (m / H + (i == j)) / 2;
                s += bar[i * L + j];
            }
            for (j = 0; j < L; ++j) bar[i * L + j] /= s;
        }
        if (l == 0) { memcpy(R, bar, sizeof(double) * (size_t)L * L); continue; }
        for (i = 0; i < L; ++i)
            for (j = 0; j < L; ++j) {
                double s = 0;
                for (k = 0; k < L; ++k) s += bar[i * L + k] * R[k * L + j];
                t[i * L + j] = s;
            }
        memcpy(R, t, sizeof(double) * (size_t)L * L);
    }
    free(bar); free(t);
}

static void test_rollout(void)
{
    static const int shapes[][3] = {{1, 1, 5}, {3, 2, 7}, {4, 3, 17}, {6, 1, 30}, {2, 4, 1}};
    tu_rng r = {3};
    size_t c;
    double worst = 0;
    for (c = 0; c < sizeof shapes / sizeof shapes[0]; ++c) {
        int n = shapes[c][0], H = shapes[c][1], L = shapes[c][2], l, i, j;
        size_t LL = (size_t)L * L;
        float *A = (float *)malloc(sizeof(float) * n * H * LL), *R = (float *)malloc(sizeof(float) * LL);
        float *work = (float *)malloc(sizeof(float) * 2 * LL);
        double *ref = (double *)malloc(sizeof(double) * LL), e, rowdev = 0;
        for (l = 0; l < n * H; ++l) causal_random(&r, A + (size_t)l * LL, L);
        CHECK(mha_inspect_rollout(n, H, L, A, R, work, NULL) == MHA_OK, "rollout call");
        rollout_ref(n, H, L, A, ref);
        e = tu_rel_err(R, ref, LL);
        if (e > worst) worst = e;
        CHECK(e < 1e-6, "rollout n %d H %d L %d: rel err %.3g", n, H, L, e);
        for (i = 0; i < L; ++i) {
            double s = 0;
            for (j = 0; j < L; ++j) s += R[i * L + j];
            if (fabs(s - 1) > rowdev) rowdev = fabs(s - 1);
        }
        CHECK(rowdev < 1e-5, "rollout rows sum to 1 (off by %.3g)", rowdev);
        free(A); free(R); free(work); free(ref);
    }
    printf("NOTE rollout worst rel err %.3g against float64\n", worst);
    {   /* one layer of the identity is the identity; a masked (all-zero) row becomes an identity row */
        float A[9] = {1, 0, 0, 0, 0, 0, 0, 0, 1}, R[9], work[18];
        CHECK(mha_inspect_rollout(1, 1, 3, A, R, work, NULL) == MHA_OK && R[0] == 1 && R[4] == 1 && R[8] == 1 &&
              R[1] == 0 && R[3] == 0 && R[5] == 0, "identity rollout");
    }
}

/* Bad arguments: refused by name, nothing written; "no eligible query" is
   not among them (a NaN result with MHA_OK). */
static void test_refusals(void)
{
    static float A[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    static const int tok[3] = {1, 2, 1};
    float R[9], work[18];
    double x = -7;
    mha_inspect_scores sc[2];
    mha_error e;
    int k;
    CHECK(ec_refused(mha_inspect_prev_token(NULL, 3, &x, &e), &e, MHA_ERR_NULL_POINTER, "mha_inspect_prev_token", "A",
                     "is NULL"), "NULL A: %s", e.message);
    CHECK(ec_refused(mha_inspect_first_token(A, 0, &x, &e), &e, MHA_ERR_INVALID_SIZE, "mha_inspect_first_token", "L",
                     "is 0; expected >= 1"), "L 0: %s", e.message);
    CHECK(ec_refused(mha_inspect_induction(A, 3, NULL, &x, &e), &e, MHA_ERR_NULL_POINTER, "mha_inspect_induction",
                     "tokens", "is NULL"), "NULL tokens: %s", e.message);
    CHECK(ec_refused(mha_inspect_duplicate_token(A, 3, tok, NULL, &e), &e, MHA_ERR_NULL_POINTER,
                     "mha_inspect_duplicate_token", "score", "is NULL"), "NULL score: %s", e.message);
    CHECK(ec_refused(mha_inspect_entropy(A, 3, -1, &x, &e), &e, MHA_ERR_INVALID_SIZE, "mha_inspect_entropy", "Lk",
                     "is -1"), "Lk -1: %s", e.message);
    CHECK(x == -7, "no score written by a refusal");
    CHECK(mha_inspect_prev_token(NULL, 3, &x, NULL) == MHA_ERR_NULL_POINTER, "err may be NULL");
    for (k = 0; k < 2; ++k) sc[k].prev_token = -7;
    CHECK(ec_refused(mha_inspect_heads(A, 0, 3, tok, sc, &e), &e, MHA_ERR_INVALID_SIZE, "mha_inspect_heads", "H",
                     "is 0") && sc[0].prev_token == -7, "heads H 0: %s", e.message);
    CHECK(ec_refused(mha_inspect_heads(A, 1, 3, tok, NULL, &e), &e, MHA_ERR_NULL_POINTER, "mha_inspect_heads", "out",
                     "is NULL"), "heads NULL out: %s", e.message);
    /* no tokens for all heads: those two scores are NaN, the rest computed */
    CHECK(clean(mha_inspect_heads(A, 1, 3, NULL, sc, &e), &e) && isnan(sc[0].duplicate_token) &&
          isnan(sc[0].induction) && sc[0].first_token == 1.0 / 3, "heads without tokens: %s", e.message);
    R[0] = -7;
    CHECK(ec_refused(mha_inspect_rollout(0, 1, 3, A, R, work, &e), &e, MHA_ERR_INVALID_SIZE, "mha_inspect_rollout",
                     "n", "is 0"), "rollout n 0: %s", e.message);
    CHECK(ec_refused(mha_inspect_rollout(1, 1, 3, A, R, NULL, &e), &e, MHA_ERR_NULL_POINTER, "mha_inspect_rollout",
                     "work", "is NULL"), "rollout NULL work: %s", e.message);
    CHECK(ec_refused(mha_inspect_rollout(1, 1, 3, NULL, R, work, &e), &e, MHA_ERR_NULL_POINTER, "mha_inspect_rollout",
                     "A", "is NULL") && R[0] == -7, "rollout NULL A: %s", e.message);
}

int main(void)
{
    test_previous_and_first();
    test_induction_and_duplicate();
    test_random_heads();
    test_rollout();
    test_refusals();
    return tu_finish("inspect");
}
