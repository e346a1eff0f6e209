/* The worked example of docs/theory.md, computed by mha.h.  Every number
   below is printed in the document to four decimals (a reader can redo them
   by hand); the library must reproduce them to within rounding (6e-5).  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

#define DOC_TOL 6e-5

static void expect(const char *what, const float *got, const double *doc, int n)
{
    int i;
    for (i = 0; i < n; ++i)
        CHECK(fabs(got[i] - doc[i]) <= DOC_TOL, "%s[%d] = %.6f, the document says %.4f", what, i, got[i], doc[i]);
}

int main(void)
{
    /* one head, two queries, three keys, D = 4 (scale 1/sqrt 4 = 0.5), Dv = 2 */
    static const float Q[2 * 4] = {1, 0, 1, 0,   0, 2, 0, 0};
    static const float K[3 * 4] = {1, 0, 1, 0,   0, 1, 0, 1,   1, 1, 0, 0};
    static const float V[3 * 2] = {1, 0,   0, 1,   1, 1};
    static const float dO[2 * 2] = {1, 0,   0, 0};        /* loss = O[0][0] */
    static const double P_doc[6] = {0.5065, 0.1863, 0.3072,   0.1554, 0.4223, 0.4223};
    static const double O_doc[4] = {0.8137, 0.4935,   0.5777, 0.8446};
    static const double dQ_doc[8] = {0.0758, -0.0472, 0.0472, -0.0758,   0, 0, 0, 0};
    static const double dK_doc[12] = {0.0472, 0, 0.0472, 0,   -0.0758, 0, -0.0758, 0,   0.0286, 0, 0.0286, 0};
    static const double dV_doc[6] = {0.5065, 0,   0.1863, 0,   0.3072, 0};
    float P[6], O[4], dQ[8] = {0}, dK[12] = {0}, dV[6] = {0};
    mha_run run = {0};
    mha_error err;

    run.weights = P;
    CHECK(mha_sdpa_forward(1, 1, 2, 3, 4, 2, Q, K, V, NULL, O, &run, &err) == MHA_OK, "sdpa: %s", err.message);
    expect("P", P, P_doc, 6);
    expect("O", O, O_doc, 4);
    CHECK(mha_sdpa_backward(1, 1, 2, 3, 4, 2, Q, K, V, dO, NULL, dQ, dK, dV, NULL, &err) == MHA_OK, "backward: %s",
          err.message);
    expect("dQ", dQ, dQ_doc, 8);
    expect("dK", dK, dK_doc, 12);
    expect("dV", dV, dV_doc, 6);

    /* layer norm of (1, 2, 3, 6): mean 3, variance 3.5 */
    {
        static const float x[4] = {1, 2, 3, 6};
        static const double y_doc[4] = {-1.0690, -0.5345, 0, 1.6036};
        float y[4];
        CHECK(mha_layernorm_forward(1, 4, x, NULL, NULL, 0, y, &err) == MHA_OK, "layernorm: %s", err.message);
        expect("layernorm", y, y_doc, 4);
    }
    /* cross-entropy of logits (2, 1, 0) with target 0 */
    {
        static const float z[3] = {2, 1, 0};
        static const int t[1] = {0};
        static const double loss_doc[1] = {0.4076}, dz_doc[3] = {-0.3348, 0.2447, 0.0900};
        float loss, dz[3];
        CHECK(mha_cross_entropy(1, 3, z, t, &loss, dz, NULL, &err) == MHA_OK, "cross-entropy: %s", err.message);
        expect("loss", &loss, loss_doc, 1);
        expect("dlogits", dz, dz_doc, 3);
    }
    /* positional encoding, d = 4: row 1 is (sin 1, cos 1, sin 0.01, cos 0.01) */
    {
        static const double pe_doc[8] = {0, 1, 0, 1,   0.8415, 0.5403, 0.0100, 1.0000};
        float pe[8];
        CHECK(mha_positional_encoding(2, 4, pe, &err) == MHA_OK, "pe: %s", err.message);
        expect("PE", pe, pe_doc, 8);
    }
    return tu_finish("theory");
}
