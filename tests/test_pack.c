/* Packed weights (MHA_PLAN_PACK): a module plan that packs Wq, Wk, Wv and
   Wo into its own memory must give exactly the bytes of a plan that packs
   them on every GEMM.  The packed panels are copies of the values the GEMM
   would pack on every call, laid out in the same blocks, and the GEMM sums
   the same products in the same order, so every comparison here is bit for
   bit (memcmp), not a tolerance.  Covered: odd widths, kdim/vdim != E, the
   in_proj and separate layouts, bias off, bias_kv, add_zero_attn, GQA
   (num_kv_heads), masks and causal, with and without the weights output,
   1 vs 2 threads, a plan built in the caller's memory off a cache line, a
   training plan's forward and backward, an encoder layer; the contract of
   a copy (mha_plan_repack after the weights change gives the bits of a new
   plan; without it the plan keeps the matrices it packed, while the biases
   are read at every run); the GEMM on prepacked column ranges; refusals. */
#include <stdlib.h>
#include <string.h>
/* white-box: this test names the kernels of the compile-time tier (the
   kernel tiers, mha.h section 0), so it pins them */
#ifndef MHA_NO_DISPATCH
#define MHA_NO_DISPATCH
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

static float *rnd(tu_rng *r, size_t n, float amp)
{
    float *x = (float *)malloc((n ? n : 1) * sizeof(float));
    tu_fill(r, x, n, amp);
    return x;
}

typedef struct pcase {
    int B, Lq, Lk, E, H, Hkv, kdim, vdim;   /* Hkv 0: H */
    int in_proj, bias, bias_kv, zero_attn;
    int mask;    /* 0 none, 1 key padding (bool), 2 float [Lq,Lk] + causal, 3 bool [B*H,Lq,Lk] */
} pcase;

/* the module and its eight arrays: [0] in_proj or Wq, [1] Wk, [2] Wv, [3] Wo
   (the packed matrices), [4] in_proj_bias, [5] out_proj_bias, [6] bias_k,
   [7] bias_v; n[i] floats each */
typedef struct pmod {
    mha_module m;
    float *w[8];
    size_t n[8];
} pmod;

static void make_module(const pcase *c, tu_rng *r, pmod *p)
{
    int E = c->E, kd = c->kdim ? c->kdim : E, vd = c->vdim ? c->vdim : E;
    int Ekv = (c->Hkv ? c->Hkv : c->H) * (E / c->H);
    memset(p, 0, sizeof *p);
    p->m.embed_dim = E; p->m.num_heads = c->H; p->m.num_kv_heads = c->Hkv;
    p->m.kdim = c->kdim; p->m.vdim = c->vdim;
    p->m.add_zero_attn = c->zero_attn;
    if (c->in_proj) {   /* rows Wq [E, E], Wk [Ekv, E], Wv [Ekv, E] */
        p->n[0] = (size_t)(E + 2 * Ekv) * E;
        p->m.in_proj_weight = p->w[0] = rnd(r, p->n[0], 0.3f);
    } else {
        p->n[0] = (size_t)E * E; p->n[1] = (size_t)Ekv * kd; p->n[2] = (size_t)Ekv * vd;
        p->m.q_proj_weight = p->w[0] = rnd(r, p->n[0], 0.3f);
        p->m.k_proj_weight = p->w[1] = rnd(r, p->n[1], 0.3f);
        p->m.v_proj_weight = p->w[2] = rnd(r, p->n[2], 0.3f);
    }
    p->n[3] = (size_t)E * E;
    p->m.out_proj_weight = p->w[3] = rnd(r, p->n[3], 0.3f);
    if (c->bias) {
        p->n[4] = (size_t)E + 2 * Ekv; p->n[5] = (size_t)E;
        p->m.in_proj_bias = p->w[4] = rnd(r, p->n[4], 0.1f);
        p->m.out_proj_bias = p->w[5] = rnd(r, p->n[5], 0.1f);
    }
    if (c->bias_kv) {
        p->n[6] = p->n[7] = (size_t)Ekv;
        p->m.bias_k = p->w[6] = rnd(r, p->n[6], 0.5f);
        p->m.bias_v = p->w[7] = rnd(r, p->n[7], 0.5f);
    }
}
static void free_module(pmod *p)
{
    int i;
    for (i = 0; i < 8; ++i) free(p->w[i]);
}

/* new values, in place, for arrays first..last of the module */
static void refill(pmod *p, tu_rng *r, int first, int last)
{
    int i;
    for (i = first; i <= last; ++i) if (p->w[i]) tu_fill(r, p->w[i], p->n[i], i < 4 ? 0.3f : 0.2f);
}

/* A module plan with its own workspace. */
typedef struct pplan {
    mha_plan *p;
    void *ws;
    mha_sizes sz;
} pplan;

static int make_plan(const mha_module *m, const pcase *c, const mha_options *opt, unsigned flags,
                     pplan *pp, const char *what)
{
    mha_error err;
    mha_status st;
    memset(pp, 0, sizeof *pp);
    st = mha_module_plan(m, c->B, c->Lq, c->Lk, opt, flags, NULL, 0, &pp->p, &err);
    CHECK(st == MHA_OK, "%s: mha_module_plan (flags %u): %s", what, flags, err.message);
    if (st != MHA_OK) return 0;
    st = mha_plan_sizes(pp->p, &pp->sz, &err);
    CHECK(st == MHA_OK, "%s: mha_plan_sizes: %s", what, err.message);
    pp->ws = malloc(pp->sz.workspace);
    return st == MHA_OK;
}
static void free_plan(pplan *pp)
{
    mha_plan_destroy(pp->p);
    free(pp->ws);
    memset(pp, 0, sizeof *pp);
}

/* one forward of a plan: out (all of it written: it starts as NaN), w may be NULL */
static int fwd(const mha_plan *p, void *ws, size_t wsb, const pcase *c, const float *q, const float *k,
               const float *v, float *out, float *w, const char *what)
{
    mha_run run;
    mha_error err;
    mha_status st;
    memset(&run, 0, sizeof run);
    run.workspace = ws; run.workspace_bytes = wsb; run.weights = w;
    memset(out, 0xff, (size_t)c->B * c->Lq * c->E * sizeof(float));
    st = mha_module_run_forward(p, c->Lq, c->Lk, q, k, v, out, &run, &err);
    CHECK(st == MHA_OK, "%s: mha_module_run_forward: %s", what, err.message);
    return st == MHA_OK;
}

static int same(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static void run_case(const pcase *c, unsigned seed)
{
    tu_rng r;
    pmod p;
    mha_options opt;
    mha_error err;
    int E = c->E, kd = c->kdim ? c->kdim : E, vd = c->vdim ? c->vdim : E;
    int Ekv = (c->Hkv ? c->Hkv : c->H) * (E / c->H);
    int Lke = c->Lk + c->bias_kv + c->zero_attn, want_w, t, i;
    size_t no = (size_t)c->B * c->Lq * E, nw = (size_t)c->B * c->Lq * Lke;
    float *q, *k, *v, *o0, *o1, *o2, *ot, *w0, *w1, *fm = NULL;
    unsigned char *bm = NULL;
    char what[200];
    pplan pu, pk;
    r.s = 0x9e3779b97f4a7c15ULL + seed;
    make_module(c, &r, &p);
    q = rnd(&r, no, 1.0f);
    k = rnd(&r, (size_t)c->B * c->Lk * kd, 1.0f);
    v = rnd(&r, (size_t)c->B * c->Lk * vd, 1.0f);
    memset(&opt, 0, sizeof opt);
    if (c->mask == 1) {
        bm = (unsigned char *)calloc((size_t)c->B * c->Lk, 1);
        for (i = 0; i < c->B * c->Lk; ++i) bm[i] = (tu_next(&r) % 4) == 0;
        opt.key_padding_mask.kind = MHA_MASK_BOOL; opt.key_padding_mask.data = bm;
        opt.key_padding_mask.ndim = 2;
        opt.key_padding_mask.shape[0] = c->B; opt.key_padding_mask.shape[1] = c->Lk;
    } else if (c->mask == 2) {
        fm = rnd(&r, (size_t)c->Lq * c->Lk, 1.0f);
        opt.attn_mask.kind = MHA_MASK_FLOAT; opt.attn_mask.data = fm; opt.attn_mask.ndim = 2;
        opt.attn_mask.shape[0] = c->Lq; opt.attn_mask.shape[1] = c->Lk;
        opt.causal = 1;
    } else if (c->mask == 3) {
        size_t n = (size_t)c->B * c->H * c->Lq * c->Lk;
        bm = (unsigned char *)calloc(n, 1);
        for (i = 0; i < (int)n; ++i) bm[i] = (tu_next(&r) % 3) == 0;
        opt.attn_mask.kind = MHA_MASK_BOOL; opt.attn_mask.data = bm; opt.attn_mask.ndim = 3;
        opt.attn_mask.shape[0] = c->B * c->H; opt.attn_mask.shape[1] = c->Lq;
        opt.attn_mask.shape[2] = c->Lk;
    }
    snprintf(what, sizeof what, "E%d H%d Hkv%d kdim%d vdim%d B%d Lq%d Lk%d in_proj%d bias%d bias_kv%d zero%d mask%d",
             E, c->H, c->Hkv, kd, vd, c->B, c->Lq, c->Lk, c->in_proj, c->bias, c->bias_kv, c->zero_attn, c->mask);
    o0 = (float *)malloc(no * sizeof(float)); o1 = (float *)malloc(no * sizeof(float));
    o2 = (float *)malloc(no * sizeof(float)); ot = (float *)malloc(no * sizeof(float));
    w0 = (float *)malloc(nw * sizeof(float)); w1 = (float *)malloc(nw * sizeof(float));

    /* packed == unpacked, with and without the weights, on 1 and 2 threads */
    for (want_w = 0; want_w < 2; ++want_w)
        for (t = 1; t <= 2; ++t) {
            unsigned flags = want_w ? MHA_PLAN_WEIGHTS : 0u;
            double nrm = 0;
            opt.num_threads = t;
            if (!make_plan(&p.m, c, &opt, flags, &pu, what)) continue;
            if (!make_plan(&p.m, c, &opt, flags | MHA_PLAN_PACK, &pk, what)) { free_plan(&pu); continue; }
            /* the pack holds at least every weight of the four matrices */
            CHECK(pk.sz.plan >= pu.sz.plan + sizeof(float) * ((size_t)2 * E * E + (size_t)Ekv * (kd + vd)),
                  "%s: PACK plan %zu bytes, unpacked %zu: no room for the weights", what, pk.sz.plan, pu.sz.plan);
            if (fwd(pu.p, pu.ws, pu.sz.workspace, c, q, k, v, o0, want_w ? w0 : NULL, what) &&
                fwd(pk.p, pk.ws, pk.sz.workspace, c, q, k, v, o1, want_w ? w1 : NULL, what)) {
                CHECK(same(o0, o1, no), "%s weights%d threads%d: packed != unpacked (rel %.3g)", what, want_w, t,
                      tu_rel_err_ff(o1, o0, no));
                if (want_w) CHECK(same(w0, w1, nw), "%s threads%d: packed weights output differs", what, t);
                for (i = 0; i < (int)no; ++i) nrm += (double)o0[i] * o0[i];
                CHECK(nrm > 0 && nrm == nrm, "%s: output is zero or NaN", what);
                /* o2: the 1-thread output without weights, the reference of what follows */
                if (t == 1) memcpy(want_w ? ot : o2, o1, no * sizeof(float));
                else CHECK(same(o1, want_w ? ot : o2, no), "%s weights%d: packed, 1 vs 2 threads differ", what, want_w);
            }
            free_plan(&pu); free_plan(&pk);
        }

    /* a PACK plan built in the caller's memory 8 bytes past a cache line */
    {
        mha_sizes sz;
        mha_plan *pl = NULL;
        void *mem, *ws;
        char *at;
        mha_status st;
        opt.num_threads = 1;
        st = mha_module_plan_size(&p.m, c->B, c->Lq, c->Lk, &opt, MHA_PLAN_PACK, &sz, &err);
        CHECK(st == MHA_OK, "%s: mha_module_plan_size: %s", what, err.message);
        mem = malloc(sz.plan + 64);
        ws = malloc(sz.workspace);
        at = (char *)mem + (72 - (uintptr_t)mem % 64) % 64;   /* 8 mod 64 */
        st = mha_module_plan(&p.m, c->B, c->Lq, c->Lk, &opt, MHA_PLAN_PACK, at, sz.plan, &pl, &err);
        CHECK(st == MHA_OK, "%s: mha_module_plan in caller memory: %s", what, err.message);
        if (st == MHA_OK && fwd(pl, ws, sz.workspace, c, q, k, v, o1, NULL, what))
            CHECK(same(o1, o2, no), "%s: PACK plan in caller memory at 8 mod 64 differs", what);
        free(mem); free(ws);
    }

    /* training: the PACK plan's forward (saving) and backward equal the unpacked plan's */
    opt.num_threads = 2;
    if (make_plan(&p.m, c, &opt, MHA_PLAN_TRAINING, &pu, what)) {
        if (make_plan(&p.m, c, &opt, MHA_PLAN_TRAINING | MHA_PLAN_PACK, &pk, what)) {
            size_t nk = (size_t)c->B * c->Lk * kd, nv = (size_t)c->B * c->Lk * vd;
            float *dout = rnd(&r, no, 1.0f), *g[2][3];
            float *dw[2][8];
            pplan *pl[2];
            int s, a, same_grads = 1;
            pl[0] = &pu; pl[1] = &pk;
            for (s = 0; s < 2; ++s) {
                mha_module_grad gr;
                mha_run run;
                void *saved = malloc(pl[s]->sz.saved);
                mha_status st;
                g[s][0] = (float *)calloc(no, sizeof(float));
                g[s][1] = (float *)calloc(nk, sizeof(float));
                g[s][2] = (float *)calloc(nv, sizeof(float));
                for (a = 0; a < 8; ++a) dw[s][a] = (float *)calloc(p.n[a] ? p.n[a] : 1, sizeof(float));
                memset(&gr, 0, sizeof gr);
                if (c->in_proj) gr.in_proj_weight = dw[s][0];
                else { gr.q_proj_weight = dw[s][0]; gr.k_proj_weight = dw[s][1]; gr.v_proj_weight = dw[s][2]; }
                gr.out_proj_weight = dw[s][3]; gr.in_proj_bias = dw[s][4]; gr.out_proj_bias = dw[s][5];
                gr.bias_k = dw[s][6]; gr.bias_v = dw[s][7];
                memset(&run, 0, sizeof run);
                run.workspace = pl[s]->ws; run.workspace_bytes = pl[s]->sz.workspace;
                run.saved = saved; run.saved_bytes = pl[s]->sz.saved;
                memset(s ? o1 : o0, 0xff, no * sizeof(float));
                st = mha_module_run_forward(pl[s]->p, c->Lq, c->Lk, q, k, v, s ? o1 : o0, &run, &err);
                CHECK(st == MHA_OK, "%s: training forward (pack %d): %s", what, s, err.message);
                st = mha_module_run_backward(pl[s]->p, c->Lq, c->Lk, q, k, v, dout, g[s][0], g[s][1], g[s][2],
                                             &gr, &run, &err);
                CHECK(st == MHA_OK, "%s: training backward (pack %d): %s", what, s, err.message);
                free(saved);
            }
            CHECK(same(o0, o1, no), "%s: training forward, packed != unpacked", what);
            same_grads &= same(g[0][0], g[1][0], no) && same(g[0][1], g[1][1], nk) && same(g[0][2], g[1][2], nv);
            for (a = 0; a < 8; ++a) same_grads &= same(dw[0][a], dw[1][a], p.n[a]);
            CHECK(same_grads, "%s: training backward, packed != unpacked", what);
            for (s = 0; s < 2; ++s) {
                for (a = 0; a < 3; ++a) free(g[s][a]);
                for (a = 0; a < 8; ++a) free(dw[s][a]);
            }
            free(dout);
            free_plan(&pk);
        }
        free_plan(&pu);
    }

    /* the pack is a copy.  o2 holds the output with the first weights. */
    opt.num_threads = 1;
    if (make_plan(&p.m, c, &opt, MHA_PLAN_PACK, &pk, what)) {
        float *o3 = (float *)malloc(no * sizeof(float));
        mha_status st;
        /* 1. new biases (and bias_k, bias_v), no repack: they are not packed, the
              plan reads them at every run, as a new unpacked plan does */
        refill(&p, &r, 4, 7);
        if (fwd(pk.p, pk.ws, pk.sz.workspace, c, q, k, v, o1, NULL, what) &&
            make_plan(&p.m, c, &opt, 0, &pu, what)) {
            if (fwd(pu.p, pu.ws, pu.sz.workspace, c, q, k, v, o0, NULL, what))
                CHECK(same(o0, o1, no), "%s: new biases without repack: differs from a new plan", what);
            free_plan(&pu);
        }
        /* 2. new matrices, no repack: the plan still computes with the ones it
              packed (the documented contract), so its output is that of step 1 */
        memcpy(o3, o1, no * sizeof(float));
        refill(&p, &r, 0, 3);
        if (fwd(pk.p, pk.ws, pk.sz.workspace, c, q, k, v, o1, NULL, what))
            CHECK(same(o1, o3, no), "%s: a PACK plan not repacked no longer computes with its packed weights", what);
        /* 3. repack: the bits of a new plan, packed or not */
        st = mha_plan_repack(pk.p, &err);
        CHECK(st == MHA_OK, "%s: mha_plan_repack: %s", what, err.message);
        if (fwd(pk.p, pk.ws, pk.sz.workspace, c, q, k, v, o1, NULL, what)) {
            CHECK(!same(o1, o3, no), "%s: the new weights did not change the output (the test cannot see a stale pack)", what);
            if (make_plan(&p.m, c, &opt, 0, &pu, what)) {
                if (fwd(pu.p, pu.ws, pu.sz.workspace, c, q, k, v, o0, NULL, what))
                    CHECK(same(o0, o1, no), "%s: repacked plan != a new unpacked plan", what);
                free_plan(&pu);
            }
            if (make_plan(&p.m, c, &opt, MHA_PLAN_PACK, &pu, what)) {
                if (fwd(pu.p, pu.ws, pu.sz.workspace, c, q, k, v, o0, NULL, what))
                    CHECK(same(o0, o1, no), "%s: repacked plan != a new PACK plan", what);
                free_plan(&pu);
            }
        }
        free(o3);
        free_plan(&pk);
    }
    free(o0); free(o1); free(o2); free(ot); free(w0); free(w1); free(q); free(k); free(v); free(fm); free(bm);
    free_module(&p);
}

/* An encoder layer: its PACK plan (forward and backward) gives the bits of
   the unpacked one, and after new weights and mha_plan_repack, of a new plan. */
static void encoder_case(void)
{
    enum { B = 2, L = 9, E = 12, H = 3, F = 20 };
    tu_rng r;
    mha_encoder_layer ly = mha_encoder_layer_defaults();
    float *w_in, *b_in, *w_out, *b_out, *l1w, *l1b, *l2w, *l2b, *n1w, *n1b, *n2w, *n2b, *x, *dy;
    float y[2][B * L * E], dx[2][B * L * E];
    mha_error err;
    mha_status st;
    int s, i;
    mha_plan *pl[2] = {NULL, NULL};
    r.s = 4242;
    w_in = rnd(&r, 3 * E * E, 0.3f); b_in = rnd(&r, 3 * E, 0.1f);
    w_out = rnd(&r, E * E, 0.3f); b_out = rnd(&r, E, 0.1f);
    l1w = rnd(&r, F * E, 0.3f); l1b = rnd(&r, F, 0.1f); l2w = rnd(&r, E * F, 0.3f); l2b = rnd(&r, E, 0.1f);
    n1w = rnd(&r, E, 0.2f); n1b = rnd(&r, E, 0.1f); n2w = rnd(&r, E, 0.2f); n2b = rnd(&r, E, 0.1f);
    for (i = 0; i < E; ++i) { n1w[i] += 1.0f; n2w[i] += 1.0f; }
    x = rnd(&r, B * L * E, 1.0f); dy = rnd(&r, B * L * E, 1.0f);
    ly.self_attn.embed_dim = E; ly.self_attn.num_heads = H;
    ly.self_attn.in_proj_weight = w_in; ly.self_attn.in_proj_bias = b_in;
    ly.self_attn.out_proj_weight = w_out; ly.self_attn.out_proj_bias = b_out;
    ly.dim_feedforward = F; ly.activation = MHA_ACT_GELU;
    ly.linear1_weight = l1w; ly.linear1_bias = l1b; ly.linear2_weight = l2w; ly.linear2_bias = l2b;
    ly.norm1_weight = n1w; ly.norm1_bias = n1b; ly.norm2_weight = n2w; ly.norm2_bias = n2b;
    for (s = 0; s < 2; ++s) {
        unsigned flags = MHA_PLAN_TRAINING | (s ? MHA_PLAN_PACK : 0u);
        st = mha_encoder_plan(&ly, B, L, NULL, flags, NULL, 0, &pl[s], &err);
        CHECK(st == MHA_OK, "encoder plan (pack %d): %s", s, err.message);
        if (st != MHA_OK) continue;
        memset(dx[s], 0, sizeof dx[s]);
        st = mha_encoder_run_forward(pl[s], L, x, y[s], NULL, &err);
        CHECK(st == MHA_OK, "encoder forward (pack %d): %s", s, err.message);
        st = mha_encoder_run_backward(pl[s], L, x, dy, dx[s], NULL, NULL, &err);
        CHECK(st == MHA_OK, "encoder backward (pack %d): %s", s, err.message);
    }
    CHECK(memcmp(y[0], y[1], sizeof y[0]) == 0, "encoder: packed forward != unpacked");
    CHECK(memcmp(dx[0], dx[1], sizeof dx[0]) == 0, "encoder: packed backward != unpacked");
    /* new attention weights: repack, then the bits of a new unpacked plan */
    tu_fill(&r, w_in, 3 * E * E, 0.3f);
    tu_fill(&r, w_out, E * E, 0.3f);
    mha_plan_destroy(pl[0]);
    pl[0] = NULL;
    st = mha_encoder_plan(&ly, B, L, NULL, MHA_PLAN_TRAINING, NULL, 0, &pl[0], &err);
    CHECK(st == MHA_OK, "encoder plan: %s", err.message);
    st = mha_plan_repack(pl[1], &err);
    CHECK(st == MHA_OK, "encoder mha_plan_repack: %s", err.message);
    for (s = 0; s < 2 && pl[0] && pl[1]; ++s) {
        st = mha_encoder_run_forward(pl[s], L, x, y[s], NULL, &err);
        CHECK(st == MHA_OK, "encoder forward after new weights (pack %d): %s", s, err.message);
    }
    CHECK(memcmp(y[0], y[1], sizeof y[0]) == 0, "encoder: repacked forward != a new plan's");
    mha_plan_destroy(pl[0]); mha_plan_destroy(pl[1]);
    free(w_in); free(b_in); free(w_out); free(b_out); free(l1w); free(l1b); free(l2w); free(l2b);
    free(n1w); free(n1b); free(n2w); free(n2b); free(x); free(dy);
}

/* The GEMM on a prepacked W, called on column ranges the way mha__gemm_mt
   cuts them, including one across a column block of NC and two K blocks:
   bit-identical to the GEMM that packs W itself (white box: the GEMM
   internals the pack is made of). */
static void gemm_case(void)
{
    tu_rng r;
    int M = 7, N = MHA__NC + 2 * MHA__NR + 3, K = MHA__KC + 5, cut[3], i;
    float *A, *W, *C0, *C1, *pw, *ws;
    r.s = 12345;
    cut[0] = 0; cut[1] = MHA__NC - MHA__NR; cut[2] = N;
    A = rnd(&r, (size_t)M * K, 1.0f); W = rnd(&r, (size_t)N * K, 1.0f);
    C0 = rnd(&r, (size_t)M * N, 1.0f);
    C1 = (float *)malloc((size_t)M * N * sizeof(float));
    memcpy(C1, C0, (size_t)M * N * sizeof(float));
    pw = (float *)malloc(mha__prepacked_floats(N, K) * sizeof(float));
    ws = (float *)malloc((mha__gemm_ws_floats(M, N, K) + MHA__ALIGN_FLOATS) * sizeof(float));
    mha__prepack_b(W, N, K, pw);
    mha__gemm(0, 1, M, N, K, 0.5f, A, (size_t)K, W, (size_t)K, 0.25f, C0, (size_t)N, mha__align_ws(ws));
    for (i = 0; i < 2; ++i)
        mha__gemm_pp(0, 1, M, cut[i + 1] - cut[i], K, 0.5f, A, (size_t)K, W + (size_t)cut[i] * K,
                     (size_t)K, 0.25f, C1 + cut[i], (size_t)N, mha__align_ws(ws), pw, cut[i], N, i);
    CHECK(memcmp(C0, C1, (size_t)M * N * sizeof(float)) == 0,
          "prepacked GEMM differs on column ranges (N %d, K %d)", N, K);
    free(A); free(W); free(C0); free(C1); free(pw); free(ws);
}

/* What mha_plan_repack refuses: a plan that packs nothing, no plan. */
static void errors(void)
{
    tu_rng r;
    pcase c36 = {2, 5, 6, 36, 4, 0, 20, 44, 0, 1, 0, 0, 0};
    pmod p;
    mha_plan *pl = NULL;
    mha_error err;
    mha_status st;
    r.s = 777;
    make_module(&c36, &r, &p);
    st = mha_module_plan(&p.m, 2, 5, 6, NULL, 0, NULL, 0, &pl, &err);
    CHECK(st == MHA_OK, "unpacked plan: %s", err.message);
    memset(&err, 0, sizeof err);
    st = mha_plan_repack(pl, &err);
    CHECK(st == MHA_ERR_INVALID_ARGUMENT && err.status == st && err.field && strcmp(err.field, "plan") == 0 &&
          err.function && strcmp(err.function, "mha_plan_repack") == 0,
          "repack of a plan without MHA_PLAN_PACK: status %d field %s function %s (%s)", (int)st,
          err.field ? err.field : "(null)", err.function ? err.function : "(null)", err.message);
    CHECK(strstr(err.message, "mha_plan_repack") != NULL && strstr(err.message, "plan") != NULL,
          "the message names the call and the field: %s", err.message);
    mha_plan_destroy(pl);
    pl = NULL;
    /* an SDPA plan has no weights to pack */
    st = mha_sdpa_plan(1, 2, 3, 3, 4, 4, NULL, 0, NULL, 0, &pl, &err);
    CHECK(st == MHA_OK, "sdpa plan: %s", err.message);
    st = mha_plan_repack(pl, &err);
    CHECK(st == MHA_ERR_INVALID_ARGUMENT && err.field && strcmp(err.field, "plan") == 0,
          "repack of an SDPA plan: status %d (%s)", (int)st, err.message);
    mha_plan_destroy(pl);
    st = mha_plan_repack(NULL, &err);
    CHECK(st == MHA_ERR_NULL_POINTER && err.field && strcmp(err.field, "plan") == 0,
          "repack of NULL: status %d (%s)", (int)st, err.message);
    CHECK(mha_plan_repack(NULL, NULL) == MHA_ERR_NULL_POINTER, "repack of NULL, no error struct");
    free_module(&p);
}

int main(void)
{
    /*               B  Lq  Lk    E   H Hkv kdim vdim inp bias bkv zero mask */
    pcase cs[] = {{  2,  5,  7,  12,  3,  0,  0,  0,  1,  1,  0,  0,  0},
                  {  2,  9, 13,  36,  4,  0, 20, 44,  0,  0,  1,  1,  1},
                  {  1, 33, 33, 520,  8,  0,  0,  0,  1,  1,  0,  0,  2},
                  {  3, 17, 11,  36,  6,  0, 52,  7,  0,  1,  1,  0,  3},
                  {  4,160,160,  64,  2,  0,  0,  0,  1,  0,  0,  1,  1},
                  {  1,  1,  1,  12,  1,  0,  0,  0,  1,  1,  1,  1,  0},
                  /* GQA and MQA, both layouts, with the appended keys */
                  {  2,  7, 17,  24,  6,  2,  0,  0,  1,  1,  1,  0,  2},
                  {  2, 17,  3,  40,  4,  1, 13, 30,  0,  1,  1,  1,  1},
                  {  1,130, 67,  48,  8,  4,  0,  0,  1,  1,  0,  1,  3}};
    int i;
    for (i = 0; i < (int)(sizeof cs / sizeof cs[0]); ++i) run_case(&cs[i], (unsigned)i);
    encoder_case();
    gemm_case();
    errors();
    return tu_finish("test_pack");
}
