/* The backward passes and training pieces against PyTorch autograd:
   tests/golden/train_golden.bin (written by tests/gen_golden_train.py, format
   described there).  Forward results must agree to a relative error of 1e-5,
   gradients and optimizer results to 1e-4.  */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

#define GOLDEN "tests/golden/train_golden.bin"
#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4
#define TOL_OPT 1e-5    /* optimizer steps: float32 arithmetic against float64 PyTorch */

typedef struct { char name[33]; unsigned dtype, count; void *data; } garray;
typedef struct { char name[33]; int p[12]; unsigned n; garray *a; } gcase;

static double worst_fwd, worst_grad, worst_opt;

static int rd(FILE *f, void *dst, size_t n) { return fread(dst, 1, n, f) == n; }
static uint32_t le32(const unsigned char *b) { return b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24; }

/* reads one case; the data are stored little-endian, as on every target we test */
static int read_case(FILE *f, gcase *c)
{
    unsigned char b[4 * 13];
    unsigned i, k;
    static const unsigned size[4] = {4, 1, 8, 4};
    memset(c, 0, sizeof *c);
    if (!rd(f, c->name, 32) || !rd(f, b, sizeof b)) return 0;
    for (k = 0; k < 12; ++k) c->p[k] = (int)le32(b + 4 * k);
    c->n = le32(b + 48);
    c->a = (garray *)calloc(c->n, sizeof(garray));
    for (i = 0; i < c->n; ++i) {
        garray *a = &c->a[i];
        unsigned char h[8];
        if (!rd(f, a->name, 32) || !rd(f, h, 8)) return 0;
        a->dtype = le32(h); a->count = le32(h + 4);
        if (a->dtype > 3) return 0;
        a->data = malloc((size_t)a->count * size[a->dtype] + 1);
        if (!rd(f, a->data, (size_t)a->count * size[a->dtype])) return 0;
    }
    return 1;
}

static void free_case(gcase *c)
{
    unsigned i;
    for (i = 0; i < c->n; ++i) free(c->a[i].data);
    free(c->a);
}

/* the array called name, or NULL; count must match when given (nonzero) */
static void *get(const gcase *c, const char *name, unsigned dtype, size_t count)
{
    unsigned i;
    for (i = 0; i < c->n; ++i)
        if (strcmp(c->a[i].name, name) == 0) {
            if (c->a[i].dtype != dtype || (count && c->a[i].count != count)) {
                CHECK(0, "%s: array %s has dtype %u count %u, expected %u %zu", c->name, name,
                      c->a[i].dtype, c->a[i].count, dtype, count);
                return NULL;
            }
            return c->a[i].data;
        }
    return NULL;
}
static float *getf(const gcase *c, const char *n, size_t count) { return (float *)get(c, n, 0, count); }
static double *getd(const gcase *c, const char *n, size_t count) { return (double *)get(c, n, 2, count); }

static void compare(const gcase *c, const char *what, const float *got, const char *ref_name,
                    size_t n, double tol, double *worst)
{
    const double *ref = getd(c, ref_name, n);
    double e;
    CHECK(ref != NULL, "%s: no %s", c->name, ref_name);
    if (!ref) return;
    e = tu_rel_err(got, ref, n);
    CHECK(e <= tol, "%s: %s rel err %.3g > %g", c->name, what, e, tol);
    if (e > *worst) *worst = e;
    if (getenv("GOLD_VERBOSE")) printf("  %-34s %-30s %.3g\n", c->name, what, e);
}

static float *zeros(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }

static void set_masks(const gcase *c, int B, int Lq, int Lk, mha_options *opt)
{
    memset(opt, 0, sizeof *opt);
    if (c->p[9]) {
        opt->attn_mask.kind = c->p[9] == 1 ? MHA_MASK_BOOL : MHA_MASK_FLOAT;
        opt->attn_mask.data = get(c, "attn_mask", c->p[9] == 1 ? 1 : 0, (size_t)Lq * Lk);
        opt->attn_mask.ndim = 2; opt->attn_mask.shape[0] = Lq; opt->attn_mask.shape[1] = Lk;
    }
    if (c->p[10]) {
        opt->key_padding_mask.kind = MHA_MASK_BOOL;
        opt->key_padding_mask.data = get(c, "key_padding_mask", 1, (size_t)B * Lk);
        opt->key_padding_mask.ndim = 2; opt->key_padding_mask.shape[0] = B;
        opt->key_padding_mask.shape[1] = Lk;
    }
}

static void run_mha(const gcase *c)
{
    int B = c->p[1], Lq = c->p[2], Lk = c->p[3], E = c->p[4], H = c->p[5], bias = c->p[11];
    int kdim = c->p[6], vdim = c->p[7], bias_kv = c->p[8] & 1, zero_attn = (c->p[8] >> 1) & 1;
    int packed = kdim == E && vdim == E;
    size_t nq = (size_t)B * Lq * E, nk = (size_t)B * Lk * kdim, nv = (size_t)B * Lk * vdim, EE = (size_t)E * E;
    const float *q = getf(c, "query", nq), *k = getf(c, "key", nk), *v = getf(c, "value", nv);
    const float *dout = getf(c, "dout", nq);
    float *out = zeros(nq), *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nv);
    float *dwin = zeros(3 * EE), *dbin = zeros(3 * (size_t)E), *dwout = zeros(EE), *dbout = zeros((size_t)E);
    float *dwk = zeros((size_t)E * kdim), *dwv = zeros((size_t)E * vdim);
    float *dbk = zeros((size_t)E), *dbv = zeros((size_t)E);
    mha_module m; mha_module_grad g; mha_options opt;
    int self = get(c, "grad.key", 2, 0) == NULL;   /* self-attention: one input, one gradient */
    int have;
    mha_error err;
    mha_status st;

    memset(&m, 0, sizeof m); memset(&g, 0, sizeof g);
    m.embed_dim = E; m.num_heads = H; m.add_zero_attn = zero_attn;
    if (packed) {
        m.in_proj_weight = getf(c, "in_proj_weight", 3 * EE);
        g.in_proj_weight = dwin;
    } else {
        m.kdim = kdim; m.vdim = vdim;
        m.q_proj_weight = getf(c, "q_proj_weight", EE);
        m.k_proj_weight = getf(c, "k_proj_weight", (size_t)E * kdim);
        m.v_proj_weight = getf(c, "v_proj_weight", (size_t)E * vdim);
        g.q_proj_weight = dwin; g.k_proj_weight = dwk; g.v_proj_weight = dwv;
    }
    if (bias_kv) {
        m.bias_k = getf(c, "bias_k", (size_t)E); m.bias_v = getf(c, "bias_v", (size_t)E);
        g.bias_k = dbk; g.bias_v = dbv;
    }
    m.out_proj_weight = getf(c, "out_proj.weight", EE);
    if (bias) { m.in_proj_bias = getf(c, "in_proj_bias", 3 * (size_t)E); m.out_proj_bias = getf(c, "out_proj.bias", (size_t)E); }
    g.in_proj_bias = dbin; g.out_proj_weight = dwout; g.out_proj_bias = dbout;
    set_masks(c, B, Lq, Lk, &opt);
    have = q && k && v && dout && m.out_proj_weight &&
           (packed ? m.in_proj_weight != NULL : (m.q_proj_weight && m.k_proj_weight && m.v_proj_weight)) &&
           (!bias_kv || (m.bias_k && m.bias_v));
    CHECK(have, "%s: arrays missing", c->name);
    if (!have) return;

    st = mha_module_forward(&m, B, Lq, Lk, q, k, v, &opt, out, NULL, &err);
    CHECK(st == MHA_OK, "%s: mha_module_forward: %s", c->name, err.message);
    compare(c, "out", out, "out", nq, TOL_FWD, &worst_fwd);
    /* self-attention is one input used three times: PyTorch's grad.query is the sum */
    if (self)
        st = mha_module_backward(&m, B, Lq, Lk, q, q, q, dout, &opt, dq, dq, dq, &g, NULL, &err);
    else
        st = mha_module_backward(&m, B, Lq, Lk, q, k, v, dout, &opt, dq, dk, dv, &g, NULL, &err);
    CHECK(st == MHA_OK, "%s: mha_module_backward: %s", c->name, err.message);
    compare(c, "grad.query", dq, "grad.query", nq, TOL_GRAD, &worst_grad);
    if (!self) {
        compare(c, "grad.key", dk, "grad.key", nk, TOL_GRAD, &worst_grad);
        compare(c, "grad.value", dv, "grad.value", nv, TOL_GRAD, &worst_grad);
    }
    if (packed) {
        compare(c, "grad.in_proj_weight", dwin, "grad.in_proj_weight", 3 * EE, TOL_GRAD, &worst_grad);
    } else {
        compare(c, "grad.q_proj_weight", dwin, "grad.q_proj_weight", EE, TOL_GRAD, &worst_grad);
        compare(c, "grad.k_proj_weight", dwk, "grad.k_proj_weight", (size_t)E * kdim, TOL_GRAD, &worst_grad);
        compare(c, "grad.v_proj_weight", dwv, "grad.v_proj_weight", (size_t)E * vdim, TOL_GRAD, &worst_grad);
    }
    if (bias_kv) {
        compare(c, "grad.bias_k", dbk, "grad.bias_k", (size_t)E, TOL_GRAD, &worst_grad);
        compare(c, "grad.bias_v", dbv, "grad.bias_v", (size_t)E, TOL_GRAD, &worst_grad);
    }
    compare(c, "grad.out_proj.weight", dwout, "grad.out_proj.weight", EE, TOL_GRAD, &worst_grad);
    if (bias) {
        compare(c, "grad.in_proj_bias", dbin, "grad.in_proj_bias", 3 * (size_t)E, TOL_GRAD, &worst_grad);
        compare(c, "grad.out_proj.bias", dbout, "grad.out_proj.bias", (size_t)E, TOL_GRAD, &worst_grad);
    }
    free(out); free(dq); free(dk); free(dv); free(dwin); free(dbin); free(dwout); free(dbout);
    free(dwk); free(dwv); free(dbk); free(dbv);
}

static void run_encoder(const gcase *c)
{
    /* state_dict name, pointer to the weight, pointer to its gradient, size */
    int B = c->p[1], L = c->p[2], E = c->p[4], H = c->p[5], Fd = c->p[6];
    size_t ne = (size_t)B * L * E, EE = (size_t)E * E, i;
    mha_encoder_layer ly; mha_encoder_layer_grad g; mha_options opt;
    struct { const char *name; const float **w; float **g; size_t n; } t[12];
    const float *w_in = NULL, *w_out = NULL;   /* the module's weight fields are const void * */
    const float *x = getf(c, "x", ne), *dout = getf(c, "dout", ne);
    float *y = zeros(ne), *dx = zeros(ne);
    int ok = x && dout;
    mha_error err;
    mha_status st;

    memset(&ly, 0, sizeof ly); memset(&g, 0, sizeof g);
    ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
    ly.dim_feedforward = Fd; ly.activation = c->p[7] ? MHA_ACT_GELU : MHA_ACT_RELU;
    ly.norm_first = c->p[8];
#define T(k, nm, field, gfield, cnt) t[k].name = nm; t[k].w = &field; t[k].g = &gfield; t[k].n = cnt
    T(0, "self_attn.in_proj_weight", w_in, g.self_attn.in_proj_weight, 3 * EE);
    T(1, "self_attn.in_proj_bias", ly.self_attn.in_proj_bias, g.self_attn.in_proj_bias, 3 * (size_t)E);
    T(2, "self_attn.out_proj.weight", w_out, g.self_attn.out_proj_weight, EE);
    T(3, "self_attn.out_proj.bias", ly.self_attn.out_proj_bias, g.self_attn.out_proj_bias, (size_t)E);
    T(4, "linear1.weight", ly.linear1_weight, g.linear1_weight, (size_t)Fd * E);
    T(5, "linear1.bias", ly.linear1_bias, g.linear1_bias, (size_t)Fd);
    T(6, "linear2.weight", ly.linear2_weight, g.linear2_weight, (size_t)E * Fd);
    T(7, "linear2.bias", ly.linear2_bias, g.linear2_bias, (size_t)E);
    T(8, "norm1.weight", ly.norm1_weight, g.norm1_weight, (size_t)E);
    T(9, "norm1.bias", ly.norm1_bias, g.norm1_bias, (size_t)E);
    T(10, "norm2.weight", ly.norm2_weight, g.norm2_weight, (size_t)E);
    T(11, "norm2.bias", ly.norm2_bias, g.norm2_bias, (size_t)E);
#undef T
    for (i = 0; i < 12; ++i) {
        *t[i].w = getf(c, t[i].name, t[i].n);
        *t[i].g = zeros(t[i].n);
        ok &= *t[i].w != NULL;
    }
    ly.self_attn.in_proj_weight = w_in; ly.self_attn.out_proj_weight = w_out;
    CHECK(ok, "%s: arrays missing", c->name);
    set_masks(c, B, L, L, &opt);
    if (ok) {
        st = mha_encoder_forward(&ly, B, L, x, &opt, y, NULL, &err);
        CHECK(st == MHA_OK, "%s: mha_encoder_forward: %s", c->name, err.message);
        compare(c, "out", y, "out", ne, TOL_FWD, &worst_fwd);
        st = mha_encoder_backward(&ly, B, L, x, dout, &opt, dx, &g, NULL, &err);
        CHECK(st == MHA_OK, "%s: mha_encoder_backward: %s", c->name, err.message);
        compare(c, "grad.x", dx, "grad.x", ne, TOL_GRAD, &worst_grad);
        for (i = 0; i < 12; ++i) {
            char nm[64];
            snprintf(nm, sizeof nm, "grad.%s", t[i].name);
            compare(c, nm, *t[i].g, nm, t[i].n, TOL_GRAD, &worst_grad);
        }
    }
    for (i = 0; i < 12; ++i) free(*t[i].g);
    free(y); free(dx);
}

static void run_xent(const gcase *c)
{
    int n = c->p[1], V = c->p[2];
    const float *z = getf(c, "logits", (size_t)n * V);
    const int *t = (const int *)get(c, "targets", 3, (size_t)n);
    float loss = 0, *dz = zeros((size_t)n * V);
    int correct = -1;
    mha_error err;
    if (z && t) {
        CHECK(mha_cross_entropy(n, V, z, t, &loss, dz, &correct, &err) == MHA_OK, "%s: mha_cross_entropy: %s",
              c->name, err.message);
        compare(c, "loss", &loss, "loss", 1, TOL_FWD, &worst_fwd);
        compare(c, "dlogits", dz, "dlogits", (size_t)n * V, TOL_GRAD, &worst_grad);
        CHECK(correct >= 0 && correct < n, "%s: correct = %d", c->name, correct);
    }
    free(dz);
}

static void run_adamw(const gcase *c)
{
    int n = c->p[1], steps = c->p[2], s;
    const double *hy = getd(c, "hyper", 5);
    const float *p0 = getf(c, "p0", (size_t)n), *gr = getf(c, "grads", (size_t)steps * n);
    float *p = zeros((size_t)n), *m = zeros((size_t)n), *v = zeros((size_t)n);
    mha_adamw opt = mha_adamw_defaults();
    mha_error err;
    if (hy && p0 && gr) {
        if (c->p[3])   /* PyTorch's defaults: mha_adamw_defaults() as it stands */
            CHECK(opt.lr == (float)hy[0] && opt.beta1 == (float)hy[1] && opt.beta2 == (float)hy[2] &&
                  opt.eps == (float)hy[3] && opt.weight_decay == (float)hy[4],
                  "%s: mha_adamw_defaults() differs from torch.optim.AdamW's", c->name);
        else {
            opt.lr = (float)hy[0]; opt.beta1 = (float)hy[1]; opt.beta2 = (float)hy[2];
            opt.eps = (float)hy[3]; opt.weight_decay = (float)hy[4];
        }
        memcpy(p, p0, (size_t)n * sizeof(float));
        for (s = 0; s < steps; ++s)
            CHECK(mha_adamw_step(&opt, s + 1, (size_t)n, p, gr + (size_t)s * n, m, v, &err) == MHA_OK,
                  "%s: mha_adamw_step: %s", c->name, err.message);
        compare(c, "p after AdamW", p, "p", (size_t)n, TOL_OPT, &worst_opt);
    }
    free(p); free(m); free(v);
}

static void run_sgd(const gcase *c)
{
    int n = c->p[1], steps = c->p[2], s;
    const double *hy = getd(c, "hyper", 2);
    const float *p0 = getf(c, "p0", (size_t)n), *gr = getf(c, "grads", (size_t)steps * n);
    float *p = zeros((size_t)n);
    mha_error err;
    if (hy && p0 && gr) {
        memcpy(p, p0, (size_t)n * sizeof(float));
        for (s = 0; s < steps; ++s)
            CHECK(mha_sgd_step((size_t)n, p, gr + (size_t)s * n, (float)hy[0], (float)hy[1], &err) == MHA_OK,
                  "%s: mha_sgd_step: %s", c->name, err.message);
        compare(c, "p after SGD", p, "p", (size_t)n, TOL_OPT, &worst_opt);
    }
    free(p);
}

int main(void)
{
    FILE *f = fopen(GOLDEN, "rb");
    char magic[8];
    unsigned char nb[4];
    unsigned i, ncases;
    CHECK(f != NULL, "cannot open %s (run from the repository root)", GOLDEN);
    if (!f) return tu_finish("train_golden");
    CHECK(rd(f, magic, 8) && memcmp(magic, "MHATRAIN", 8) == 0 && rd(f, nb, 4), "bad header");
    ncases = le32(nb);
    CHECK(ncases >= 20, "only %u cases", ncases);
    for (i = 0; i < ncases; ++i) {
        gcase c;
        int ok = read_case(f, &c);
        CHECK(ok, "case %u unreadable", i);
        if (!ok) { free_case(&c); break; }
        switch (c.p[0]) {
        case 0: run_mha(&c); break;
        case 1: run_encoder(&c); break;
        case 2: run_xent(&c); break;
        case 3: run_adamw(&c); break;
        case 4: run_sgd(&c); break;
        default: CHECK(0, "%s: unknown kind %d", c.name, c.p[0]);
        }
        free_case(&c);
    }
    fclose(f);
    printf("worst train golden rel err: forward %.3g (tol %g), gradients %.3g (tol %g), "
           "optimizer steps %.3g (tol %g)\n", worst_fwd, TOL_FWD, worst_grad, TOL_GRAD, worst_opt, TOL_OPT);
    return tu_finish("train_golden");
}
