/* test_optim.c - SGD and AdamW: every hyperparameter means its value (zero
   included), impossible values are refused with nothing written, and
   several steps agree with a float64 reference written here; a refusal
   names the field (mha_error).  (PyTorch's own numbers are checked in
   test_train_golden.c.) */
#include <string.h>
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

enum { N = 13, STEPS = 5 };

/* torch.optim.AdamW in float64, step t = 1..steps:
     p *= 1 - lr wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
     p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)              */
static void adamw_ref(const mha_adamw *o, int steps, const float *p0, const float *g, double *p)
{
    double m[N] = {0}, v[N] = {0};
    int t, i;
    for (i = 0; i < N; ++i) p[i] = p0[i];
    for (t = 1; t <= steps; ++t) {
        double c1 = 1.0 - pow(o->beta1, t), c2 = 1.0 - pow(o->beta2, t);
        for (i = 0; i < N; ++i) {
            double gi = g[(t - 1) * N + i];
            p[i] *= 1.0 - (double)o->lr * o->weight_decay;
            m[i] = o->beta1 * m[i] + (1.0 - o->beta1) * gi;
            v[i] = o->beta2 * v[i] + (1.0 - o->beta2) * gi * gi;
            p[i] -= o->lr * (m[i] / c1) / (sqrt(v[i] / c2) + o->eps);
        }
    }
}

static double run_adamw(const mha_adamw *o, const float *p0, const float *g)
{
    float p[N], m[N] = {0}, v[N] = {0};
    double ref[N];
    int t, ok = 1;
    memcpy(p, p0, sizeof p);
    for (t = 1; t <= STEPS; ++t) ok &= mha_adamw_step(o, t, N, p, g + (t - 1) * N, m, v, NULL) == MHA_OK;
    CHECK(ok, "adamw steps return OK");
    adamw_ref(o, STEPS, p0, g, ref);
    return tu_rel_err(p, ref, N);
}

static void test_adamw(void)
{
    float p0[N], g[STEPS * N];
    tu_rng r = {9};
    mha_adamw d = mha_adamw_defaults(), o;
    double e;
    tu_fill(&r, p0, N, 1.0f);
    tu_fill(&r, g, STEPS * N, 2.0f);
    CHECK(d.lr == 1e-3f && d.beta1 == 0.9f && d.beta2 == 0.999f && d.eps == 1e-8f && d.weight_decay == 0.01f,
          "defaults are PyTorch's: lr %g betas %g %g eps %g wd %g", d.lr, d.beta1, d.beta2, d.eps,
          d.weight_decay);
    e = run_adamw(&d, p0, g);
    CHECK(e < 1e-6, "defaults, %d steps: rel err %.3g", STEPS, e);
    /* zero means zero: no momentum, no weight decay, both */
    o = d; o.lr = 0.01f; o.beta1 = 0.0f;
    e = run_adamw(&o, p0, g);
    CHECK(e < 1e-6, "beta1 = 0: rel err %.3g", e);
    o = d; o.lr = 0.01f; o.weight_decay = 0.0f;
    e = run_adamw(&o, p0, g);
    CHECK(e < 1e-6, "weight_decay = 0: rel err %.3g", e);
    o = d; o.beta1 = 0.0f; o.beta2 = 0.0f; o.eps = 0.0f; o.weight_decay = 0.0f; o.lr = 0.1f;
    e = run_adamw(&o, p0, g);   /* beta2 = 0: v = g^2, so each step moves by lr sign(g) */
    CHECK(e < 1e-6, "beta1 = beta2 = eps = weight_decay = 0: rel err %.3g", e);
    {   /* lr = 0 leaves p as it was (the moments still move) */
        float p[N], m[N] = {0}, v[N] = {0};
        memcpy(p, p0, sizeof p);
        o = d; o.lr = 0.0f;
        CHECK(mha_adamw_step(&o, 1, N, p, g, m, v, NULL) == MHA_OK && memcmp(p, p0, sizeof p) == 0, "lr = 0");
    }
}

/* a refused call writes nothing: p, m and v keep their bytes */
static void test_adamw_refused(void)
{
    static const float bad[] = {-0.5f, 1.0f, 1.5f, -1e-30f};
    const float qnan = NAN, inf = INFINITY;
    float p[3] = {1, -2, 3}, g[3] = {0.5f, 0.5f, -1}, m[3] = {7, 7, 7}, v[3] = {8, 8, 8};
    static const char *const names[5] = {"opt->lr", "opt->beta1", "opt->beta2", "opt->eps", "opt->weight_decay"};
    mha_adamw d = mha_adamw_defaults(), o;
    mha_error err;
    mha_status st;
    size_t i;
    int field, refused = 0, cases = 0;
    for (field = 0; field < 5; ++field) {
        float vals[8];
        int nv = 0, k;
        float *f = field == 0 ? &o.lr : field == 1 ? &o.beta1 : field == 2 ? &o.beta2 :
                   field == 3 ? &o.eps : &o.weight_decay;
        vals[nv++] = qnan; vals[nv++] = inf; vals[nv++] = -inf; vals[nv++] = -1.0f;
        if (field == 1 || field == 2)   /* betas: [0, 1) */
            for (i = 0; i < sizeof bad / sizeof bad[0]; ++i) vals[nv++] = bad[i];
        for (k = 0; k < nv; ++k) {
            o = d;
            *f = vals[k];
            ++cases;
            st = mha_adamw_step(&o, 1, 3, p, g, m, v, &err);
            if (st == MHA_ERR_INVALID_ARGUMENT && err.field && strcmp(err.field, names[field]) == 0) ++refused;
            else printf("FAIL detail: %s = %g: status %d, field %s\n", names[field], vals[k], (int)st,
                        st ? err.field : "(accepted)");
        }
    }
    CHECK(refused == cases, "adamw: %d of %d impossible values refused", refused, cases);
    CHECK(p[0] == 1 && p[1] == -2 && p[2] == 3 && m[0] == 7 && m[2] == 7 && v[0] == 8 && v[2] == 8,
          "adamw: nothing written on refusal");
    st = mha_adamw_step(&d, 0, 3, p, g, m, v, &err);
    CHECK(st == MHA_ERR_INVALID_ARGUMENT && strcmp(err.field, "step") == 0, "step 0: %s", err.message);
    st = mha_adamw_step(NULL, 1, 3, p, g, m, v, &err);
    CHECK(st == MHA_ERR_NULL_POINTER && strcmp(err.field, "opt") == 0, "NULL options: %s", err.message);
}

static void test_sgd(void)
{
    const float qnan = NAN, inf = INFINITY;
    float p[3] = {1, -2, 3}, g[3] = {0.5f, 0.5f, -1};
    double ref[3];
    int i;
    mha_error err;
    /* p -= lr (g + wd p), lr 0.1, wd 0.2 */
    for (i = 0; i < 3; ++i) ref[i] = p[i] - 0.1 * ((double)g[i] + 0.2 * p[i]);
    CHECK(mha_sgd_step(3, p, g, 0.1f, 0.2f, &err) == MHA_OK, "sgd: %s", err.message);
    CHECK(tu_rel_err(p, ref, 3) < 1e-7, "sgd with weight decay: rel err %.3g", tu_rel_err(p, ref, 3));
    for (i = 0; i < 3; ++i) ref[i] = p[i];
#define SGD_REFUSED(lr, wd, fld, what)                                                            \
    CHECK(mha_sgd_step(3, p, g, lr, wd, &err) == MHA_ERR_INVALID_ARGUMENT && strcmp(err.field, fld) == 0, \
          "%s: %s", what, err.message)
    SGD_REFUSED(qnan, 0.0f, "lr", "sgd lr NaN");
    SGD_REFUSED(-0.1f, 0.0f, "lr", "sgd lr < 0");
    SGD_REFUSED(inf, 0.0f, "lr", "sgd lr Inf");
    SGD_REFUSED(0.1f, -0.5f, "weight_decay", "sgd wd < 0");
    SGD_REFUSED(0.1f, qnan, "weight_decay", "sgd wd NaN");
#undef SGD_REFUSED
    CHECK(p[0] == (float)ref[0] && p[1] == (float)ref[1] && p[2] == (float)ref[2], "sgd: nothing written on refusal");
    CHECK(mha_sgd_step(3, p, g, 0.0f, 0.0f, NULL) == MHA_OK && p[0] == (float)ref[0], "sgd lr 0 is a no-op");
}

int main(void)
{
    test_adamw();
    test_adamw_refused();
    test_sgd();
    return tu_finish("optim");
}
