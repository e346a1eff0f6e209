/* The small training pieces: embedding, positional encoding, cross-entropy,
   linear and layer norm through the public calls, SGD, AdamW defaults, the
   examples' RNG (examples/tiny_rng.h: the stream mha_rng_* gave in 0.1),
   and the status codes and fields of bad arguments.  Gradients are checked
   against central differences in double.  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "../examples/tiny_rng.h"
#include <stdlib.h>
#include <string.h>

/* a refusal with this status that names this field */
static void refused(mha_status st, mha_status want, const mha_error *err, const char *field, const char *what)
{
    CHECK(st == want && err->status == want && err->field && strcmp(err->field, field) == 0,
          "%s: status %d (want %d), field %s (want %s): %s", what, (int)st, (int)want,
          err->field ? err->field : "(null)", field, err->message);
}

static void test_embedding(void)
{
    enum { VOC = 5, D = 3, N = 4 };
    float table[VOC * D], out[N * D], dout[N * D], dtable[VOC * D];
    int tokens[N] = {3, 0, 3, 4}, bad[N] = {3, 0, 5, 4}, i, j;
    tu_rng r = {42};
    mha_error err;
    tu_fill(&r, table, VOC * D, 1.0f);
    tu_fill(&r, dout, N * D, 1.0f);
    CHECK(mha_embedding_forward(N, VOC, D, tokens, table, out, &err) == MHA_OK, "embedding forward: %s", err.message);
    for (i = 0; i < N; ++i)
        for (j = 0; j < D; ++j)
            CHECK(out[i * D + j] == table[tokens[i] * D + j], "row %d", i);
    for (i = 0; i < VOC * D; ++i) dtable[i] = 1.0f;   /* the backward adds */
    CHECK(mha_embedding_backward(N, VOC, D, tokens, dout, dtable, &err) == MHA_OK, "embedding backward: %s",
          err.message);
    for (j = 0; j < D; ++j) {
        CHECK(fabsf(dtable[3 * D + j] - (1.0f + dout[0 * D + j] + dout[2 * D + j])) < 1e-6f,
              "token 3 seen twice collects both rows");
        CHECK(dtable[1 * D + j] == 1.0f && dtable[2 * D + j] == 1.0f, "unseen rows untouched");
    }
    refused(mha_embedding_forward(N, VOC, D, bad, table, out, &err), MHA_ERR_INVALID_ARGUMENT, &err, "tokens",
            "token >= vocab");
    refused(mha_embedding_forward(N, VOC, D, NULL, table, out, &err), MHA_ERR_NULL_POINTER, &err, "tokens",
            "NULL tokens");
}

static void test_positional_encoding(void)
{
    enum { L = 13, D = 7 };   /* odd width: the last column is a lone sine */
    float pe[L * D];
    double worst = 0;
    int p, c;
    mha_error err;
    CHECK(mha_positional_encoding(L, D, pe, &err) == MHA_OK, "pe: %s", err.message);
    for (p = 0; p < L; ++p)
        for (c = 0; c < D; ++c) {
            int i2 = c - c % 2;   /* 2i */
            double w = 1.0 / pow(10000.0, (double)i2 / D);
            double want = c % 2 ? cos(p * w) : sin(p * w);
            double e = fabs(pe[p * D + c] - want);
            if (e > worst) worst = e;
        }
    CHECK(worst < 1e-6, "PE max abs err %.3g", worst);
    refused(mha_positional_encoding(0, D, pe, &err), MHA_ERR_INVALID_SIZE, &err, "L", "L = 0");
}

/* cross-entropy: loss against a double evaluation, dlogits against central differences */
static double xent_ref(const double *z, const int *t, int n, int V)
{
    double total = 0;
    int r, j, cnt = 0;
    for (r = 0; r < n; ++r) {
        double m = -INFINITY, s = 0;
        if (t[r] < 0) continue;
        ++cnt;
        for (j = 0; j < V; ++j) if (z[r * V + j] > m) m = z[r * V + j];
        for (j = 0; j < V; ++j) s += exp(z[r * V + j] - m);
        total += m + log(s) - z[r * V + t[r]];
    }
    return total / cnt;
}

static void test_cross_entropy(void)
{
    enum { N = 7, V = 11 };
    float z[N * V], dz[N * V], loss;
    double zd[N * V], ref[N * V];
    int t[N] = {0, 10, -100, 3, 3, 7, 1}, i, correct;
    tu_rng r = {7};
    mha_error err;
    tu_fill(&r, z, N * V, 4.0f);
    for (i = 0; i < N * V; ++i) zd[i] = z[i];
    CHECK(mha_cross_entropy(N, V, z, t, &loss, dz, &correct, &err) == MHA_OK, "xent: %s", err.message);
    CHECK(fabs(loss - xent_ref(zd, t, N, V)) <= 1e-6 * fabs(xent_ref(zd, t, N, V)), "loss %g", loss);
    for (i = 0; i < N * V; ++i) {
        double s = zd[i], lp, lm;
        zd[i] = s + 1e-6; lp = xent_ref(zd, t, N, V);
        zd[i] = s - 1e-6; lm = xent_ref(zd, t, N, V);
        zd[i] = s;
        ref[i] = (lp - lm) / 2e-6;
    }
    CHECK(tu_rel_err(dz, ref, N * V) <= 1e-5, "dlogits rel err %.3g", tu_rel_err(dz, ref, N * V));
    for (i = 0; i < V; ++i) CHECK(dz[2 * V + i] == 0.0f, "ignored row has zero gradient");
    CHECK(correct >= 0 && correct <= N - 1, "correct %d", correct);
    {
        int bad[N] = {0, 11, 0, 0, 0, 0, 0};
        refused(mha_cross_entropy(N, V, z, bad, &loss, dz, NULL, &err), MHA_ERR_INVALID_ARGUMENT, &err, "targets",
                "target >= V");
    }
    {
        /* a large logit must not overflow exp */
        float big[3] = {1000.0f, 0.0f, -1000.0f};
        int tb[1] = {1};
        CHECK(mha_cross_entropy(1, 3, big, tb, &loss, dz, NULL, &err) == MHA_OK && fabsf(loss - 1000.0f) < 1e-3f,
              "loss of a 1000-logit row %g", loss);
    }
}

/* linear and layer norm through their public entry points, against differences */
static void test_linear_layernorm(void)
{
    enum { R = 5, IN = 7, OUT = 3 };
    float x[R * IN], W[OUT * IN], b[OUT], y[R * OUT], dy[R * OUT];
    float dx[R * IN] = {0}, dW[OUT * IN] = {0}, db[OUT] = {0};
    double ref[R * IN];
    int i, o, k;
    tu_rng r = {99};
    mha_error err;
    tu_fill(&r, x, R * IN, 1.0f); tu_fill(&r, W, OUT * IN, 1.0f); tu_fill(&r, b, OUT, 1.0f);
    tu_fill(&r, dy, R * OUT, 1.0f);
    CHECK(mha_linear_forward(R, IN, OUT, x, W, b, y, NULL, &err) == MHA_OK, "linear forward: %s", err.message);
    for (i = 0; i < R; ++i)
        for (o = 0; o < OUT; ++o) {
            double s = b[o];
            for (k = 0; k < IN; ++k) s += (double)x[i * IN + k] * W[o * IN + k];
            CHECK(fabs(y[i * OUT + o] - s) < 1e-5, "y[%d,%d]", i, o);
        }
    CHECK(mha_linear_backward(R, IN, OUT, x, W, dy, dx, dW, db, NULL, &err) == MHA_OK, "linear backward: %s",
          err.message);
    /* dx = dy W exactly (a linear map): compare with the double product */
    for (i = 0; i < R; ++i)
        for (k = 0; k < IN; ++k) {
            double s = 0;
            for (o = 0; o < OUT; ++o) s += (double)dy[i * OUT + o] * W[o * IN + k];
            ref[i * IN + k] = s;
        }
    CHECK(tu_rel_err(dx, ref, R * IN) < 1e-6, "dx");
    for (o = 0; o < OUT; ++o)
        for (k = 0; k < IN; ++k) {
            double s = 0;
            for (i = 0; i < R; ++i) s += (double)dy[i * OUT + o] * x[i * IN + k];
            ref[o * IN + k] = s;
        }
    CHECK(tu_rel_err(dW, ref, OUT * IN) < 1e-6, "dW");
    refused(mha_linear_forward(R, 0, OUT, x, W, b, y, NULL, &err), MHA_ERR_INVALID_SIZE, &err, "in", "in = 0");
    /* with the caller's workspace (mha_linear_workspace_size): the same bits; one byte short: refused */
    {
        size_t bytes = 0;
        float y2[R * OUT];
        mha_run run;
        CHECK(mha_linear_workspace_size(R, IN, OUT, &bytes, &err) == MHA_OK && bytes > 0,
              "mha_linear_workspace_size: %s", err.message);
        memset(&run, 0, sizeof run);
        run.workspace = malloc(bytes ? bytes : 1);
        run.workspace_bytes = bytes;
        CHECK(mha_linear_forward(R, IN, OUT, x, W, b, y2, &run, &err) == MHA_OK && memcmp(y, y2, sizeof y) == 0,
              "linear forward with a workspace differs (%s)", err.message);
        run.workspace_bytes = bytes - 1;
        refused(mha_linear_forward(R, IN, OUT, x, W, b, y2, &run, &err), MHA_ERR_WORKSPACE_TOO_SMALL, &err,
                "run->workspace_bytes", "linear workspace one byte short");
        run.workspace_bytes = bytes;
        run.lse = y2;
        refused(mha_linear_forward(R, IN, OUT, x, W, b, y2, &run, &err), MHA_ERR_INVALID_ARGUMENT, &err,
                "run->lse", "linear with run->lse");
        free(run.workspace);
    }

    {
        float w[IN], lb[IN], ly[R * IN], ldy[R * IN], ldx[R * IN] = {0}, ldw[IN] = {0}, ldb[IN] = {0};
        double xd[R * IN], g[R * IN];
        tu_fill(&r, w, IN, 0.5f); for (k = 0; k < IN; ++k) w[k] += 1.0f;
        tu_fill(&r, lb, IN, 0.5f); tu_fill(&r, ldy, R * IN, 1.0f);
        CHECK(mha_layernorm_forward(R, IN, x, w, lb, 0, ly, &err) == MHA_OK, "ln forward: %s", err.message);
        CHECK(mha_layernorm_backward(R, IN, x, w, 0, ldy, ldx, ldw, ldb, &err) == MHA_OK, "ln backward: %s",
              err.message);
        for (i = 0; i < R * IN; ++i) xd[i] = x[i];
        /* loss = sum(LN(x) * dy), differentiated numerically per input */
        for (i = 0; i < R * IN; ++i) {
            double s = xd[i], l[2];
            int side, row = i / IN;
            for (side = 0; side < 2; ++side) {
                double m = 0, v = 0, acc = 0;
                xd[i] = s + (side ? -1e-6 : 1e-6);
                for (k = 0; k < IN; ++k) m += xd[row * IN + k];
                m /= IN;
                for (k = 0; k < IN; ++k) v += (xd[row * IN + k] - m) * (xd[row * IN + k] - m);
                v /= IN;
                for (k = 0; k < IN; ++k)
                    acc += ((xd[row * IN + k] - m) / sqrt(v + 1e-5) * w[k] + lb[k]) * ldy[row * IN + k];
                l[side] = acc;
            }
            xd[i] = s;
            g[i] = (l[0] - l[1]) / 2e-6;
        }
        CHECK(tu_rel_err(ldx, g, R * IN) < 1e-4, "layernorm dx rel err %.3g", tu_rel_err(ldx, g, R * IN));
        refused(mha_layernorm_forward(R, IN, x, w, lb, -1.0f, ly, &err), MHA_ERR_INVALID_ARGUMENT, &err, "eps",
                "eps < 0");
    }
}

static void test_optimizers(void)
{
    float p[3] = {1, -2, 3}, g[3] = {0.5f, 0.5f, -1}, m[3] = {0}, v[3] = {0};
    mha_adamw d = mha_adamw_defaults();
    mha_error err;
    CHECK(mha_sgd_step(3, p, g, 0.1f, 0.0f, &err) == MHA_OK, "sgd: %s", err.message);
    CHECK(fabsf(p[0] - 0.95f) < 1e-6f && fabsf(p[1] + 2.05f) < 1e-6f && fabsf(p[2] - 3.1f) < 1e-6f,
          "sgd values %g %g %g", p[0], p[1], p[2]);
    /* AdamW's first step without weight decay moves every weight by lr = 1e-3
       against its gradient's sign (m/sqrt(v) = sign g after bias correction) */
    d.weight_decay = 0.0f;
    p[0] = 1; p[1] = -2; p[2] = 3;
    CHECK(mha_adamw_step(&d, 1, 3, p, g, m, v, &err) == MHA_OK, "adamw defaults, no weight decay: %s", err.message);
    CHECK(fabsf(p[0] - (1.0f - 1e-3f)) < 1e-6f && fabsf(p[2] - (3.0f + 1e-3f)) < 1e-6f,
          "adamw first step %g %g", p[0], p[2]);
    refused(mha_adamw_step(&d, 0, 3, p, g, m, v, &err), MHA_ERR_INVALID_ARGUMENT, &err, "step", "step 0");
}

/* examples/tiny_rng.h, the generator the examples and tests draw from: the
   stream of 0.1's mha_rng_* (values recorded from mha.h 0.1), so training
   runs made with 0.1 are reproduced. */
static void test_rng(void)
{
    static const unsigned u5[4] = {0x14b9e986u, 0x22af78f4u, 0x4ae848cfu, 0x7384217cu};
    static const float fill0[4] = {-0.00832593441f, 0.184569478f, 0.101121664f, 0.188382596f};
    tiny_rng a, b;
    float x[1000];
    int i, same = 1, in_range = 1, known = 1;
    double mean = 0;
    tiny_rng_seed(&a, 5);
    for (i = 0; i < 4; ++i) known &= tiny_rng_u32(&a) == u5[i];
    CHECK(known, "seed 5: not the stream of 0.1's mha_rng");
    tiny_rng_seed(&a, 0);
    tiny_rng_fill(&a, x, 4, 0.25f);
    CHECK(memcmp(x, fill0, sizeof fill0) == 0, "seed 0, fill: %.9g %.9g %.9g %.9g, not 0.1's", x[0], x[1], x[2], x[3]);
    tiny_rng_seed(&a, 0);
    CHECK(tiny_rng_uniform(&a) == 0.483348131f, "seed 0, uniform: not 0.1's");
    tiny_rng_seed(&a, 5); tiny_rng_seed(&b, 5);
    for (i = 0; i < 100; ++i) same &= tiny_rng_u32(&a) == tiny_rng_u32(&b);
    CHECK(same, "same seed, same stream");
    tiny_rng_seed(&b, 6);
    CHECK(tiny_rng_u32(&a) != tiny_rng_u32(&b), "seeds 5 and 6 differ");
    tiny_rng_seed(&a, 0);
    tiny_rng_fill(&a, x, 1000, 0.25f);
    for (i = 0; i < 1000; ++i) { in_range &= x[i] >= -0.25f && x[i] < 0.25f; mean += x[i]; }
    CHECK(in_range, "U(-a, a) in range");
    CHECK(fabs(mean / 1000) < 0.02, "mean %g near 0", mean / 1000);
}

int main(void)
{
    test_embedding();
    test_positional_encoding();
    test_cross_entropy();
    test_linear_layernorm();
    test_optimizers();
    test_rng();
    return tu_finish("train_pieces");
}
