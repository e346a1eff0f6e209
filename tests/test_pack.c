/* Prepacked weights (mha_module_pack): a packed forward must give exactly
   the bytes of the unpacked one.  The packed panels are copies of the values
   mha__gemm would pack on every call, laid out in the same blocks, and the
   GEMM sums the same products in the same order, so the comparison is
   bit-for-bit (memcmp), not a tolerance.  Covered: odd widths, kdim/vdim != E,
   bias off, bias_kv, add_zero_attn, masks and causal, with and without the
   weights output, 1 vs 2 threads, a copy of the buffer at another alignment,
   the GEMM on column ranges that cross a column block of NC, and every
   rejection (other module shape or layout, corrupted header, bad arguments). */
#include <stdlib.h>
#include <string.h>
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
    int B, Lq, Lk, E, H, kdim, vdim;
    int in_proj, bias, bias_kv, zero_attn;
    int mask;    /* 0 none, 1 key padding (bool), 2 float [Lq,Lk] + causal, 3 bool [B*H,Lq,Lk] */
} pcase;

typedef struct pmod {
    mha_module m;
    float *w[8];
} pmod;

static void make_module(const pcase *c, tu_rng *r, pmod *p)
{
    int E = c->E, kd = c->kdim ? c->kdim : E, vd = c->vdim ? c->vdim : E;
    memset(p, 0, sizeof *p);
    p->m.embed_dim = E; p->m.num_heads = c->H; p->m.kdim = c->kdim; p->m.vdim = c->vdim;
    p->m.add_zero_attn = c->zero_attn;
    if (c->in_proj) {
        p->m.in_proj_weight = p->w[0] = rnd(r, (size_t)3 * E * E, 0.3f);
    } else {
        p->m.q_proj_weight = p->w[0] = rnd(r, (size_t)E * E, 0.3f);
        p->m.k_proj_weight = p->w[1] = rnd(r, (size_t)E * kd, 0.3f);
        p->m.v_proj_weight = p->w[2] = rnd(r, (size_t)E * vd, 0.3f);
    }
    p->m.out_proj_weight = p->w[3] = rnd(r, (size_t)E * E, 0.3f);
    if (c->bias) {
        p->m.in_proj_bias = p->w[4] = rnd(r, (size_t)3 * E, 0.1f);
        p->m.out_proj_bias = p->w[5] = rnd(r, (size_t)E, 0.1f);
    }
    if (c->bias_kv) {
        p->m.bias_k = p->w[6] = rnd(r, (size_t)E, 0.5f);
        p->m.bias_v = p->w[7] = rnd(r, (size_t)E, 0.5f);
    }
}
static void free_module(pmod *p)
{
    int i;
    for (i = 0; i < 8; ++i) free(p->w[i]);
}

/* pack m into a fresh malloc'd buffer */
static void *pack(const mha_module *m)
{
    size_t n = 0;
    void *buf;
    if (mha_module_pack_size(m, &n) != MHA_OK) return NULL;
    buf = malloc(n);
    if (buf && mha_module_pack(m, buf, n) != MHA_OK) { free(buf); return NULL; }
    return buf;
}

static void run_case(const pcase *c, unsigned seed)
{
    tu_rng r;
    pmod p;
    mha_module mp;
    mha_options opt;
    int E = c->E, kd = c->kdim ? c->kdim : E, vd = c->vdim ? c->vdim : E;
    int Lke = c->Lk + c->bias_kv + c->zero_attn, want_w, t, i;
    size_t no = (size_t)c->B * c->Lq * E, nw = (size_t)c->B * c->Lq * Lke, bytes = 0;
    float *q, *k, *v, *o0, *o1, *w0, *w1, *fm = NULL;
    unsigned char *bm = NULL;
    void *buf, *moved;
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
    buf = pack(&p.m);
    CHECK(buf != NULL, "pack E%d", E);
    if (!buf) { free_module(&p); return; }
    mp = p.m;
    mp.packed = buf;
    o0 = (float *)malloc(no * sizeof(float)); o1 = (float *)malloc(no * sizeof(float));
    w0 = (float *)malloc(nw * sizeof(float)); w1 = (float *)malloc(nw * sizeof(float));
    for (want_w = 0; want_w < 2; ++want_w)
        for (t = 1; t <= 2; ++t) {
            int same;
            double nrm = 0;
            opt.num_threads = t;
            memset(o1, 0xff, no * sizeof(float));   /* NaN: every element must be written */
            CHECK(mha_forward(&p.m, c->B, c->Lq, c->Lk, q, k, v, &opt, o0, want_w ? w0 : NULL,
                              NULL, 0) == MHA_OK, "unpacked forward E%d", E);
            CHECK(mha_forward(&mp, c->B, c->Lq, c->Lk, q, k, v, &opt, o1, want_w ? w1 : NULL,
                              NULL, 0) == MHA_OK, "packed forward E%d", E);
            same = memcmp(o0, o1, no * sizeof(float)) == 0;
            CHECK(same, "packed != unpacked: E%d H%d kdim%d vdim%d B%d Lq%d Lk%d weights%d threads%d "
                  "(rel %.3g)", E, c->H, kd, vd, c->B, c->Lq, c->Lk, want_w, t, tu_rel_err_ff(o1, o0, no));
            if (want_w)
                CHECK(memcmp(w0, w1, nw * sizeof(float)) == 0, "packed weights differ E%d threads%d", E, t);
            for (i = 0; i < (int)no; ++i) nrm += (double)o0[i] * o0[i];
            CHECK(nrm > 0 && nrm == nrm, "output is zero or NaN (E%d)", E);
            if (t == 2) {   /* 2 threads, packed, against 1 thread, packed */
                float *o2 = (float *)malloc(no * sizeof(float));
                opt.num_threads = 1;
                CHECK(mha_forward(&mp, c->B, c->Lq, c->Lk, q, k, v, &opt, o2, want_w ? w0 : NULL,
                                  NULL, 0) == MHA_OK, "packed forward, 1 thread");
                CHECK(memcmp(o1, o2, no * sizeof(float)) == 0, "packed: 1 vs 2 threads differ E%d", E);
                free(o2);
            }
        }
    /* the buffer copied to an address 4 bytes off a 64-byte line still works */
    CHECK(mha_module_pack_size(&p.m, &bytes) == MHA_OK, "pack_size");
    moved = malloc(bytes + 64);
    {
        char *at = (char *)moved + (68 - (uintptr_t)moved % 64) % 64;   /* 4 mod 64 */
        memcpy(at, buf, bytes);
        mp.packed = at;
        opt.num_threads = 1;
        CHECK(mha_forward(&mp, c->B, c->Lq, c->Lk, q, k, v, &opt, o1, NULL, NULL, 0) == MHA_OK,
              "moved buffer forward");
        CHECK(mha_forward(&p.m, c->B, c->Lq, c->Lk, q, k, v, &opt, o0, NULL, NULL, 0) == MHA_OK,
              "unpacked forward");
        CHECK(memcmp(o0, o1, no * sizeof(float)) == 0, "moved packed buffer differs (E%d)", E);
    }
    free(moved); free(buf);
    free(o0); free(o1); free(w0); free(w1); free(q); free(k); free(v); free(fm); free(bm);
    free_module(&p);
}

/* The GEMM on a prepacked W, called on column ranges the way mha__gemm_mt
   cuts them, including one across a column block of NC and two K blocks:
   bit-identical to the GEMM that packs W itself. */
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

static void errors(void)
{
    tu_rng r;
    pcase c36 = {2, 5, 6, 36, 4, 20, 44, 0, 1, 0, 0, 0}, c;
    pmod p, o;
    mha_module mp;
    size_t n = 0;
    float q[2 * 5 * 36], k[2 * 6 * 44], out[2 * 5 * 36];
    void *buf;
    char *hdr;
    int i;
    r.s = 777;
    tu_fill(&r, q, sizeof q / sizeof q[0], 1.0f);
    tu_fill(&r, k, sizeof k / sizeof k[0], 1.0f);
    make_module(&c36, &r, &p);

    CHECK(mha_module_pack_size(NULL, &n) == MHA_ERR_NULL_POINTER, "pack_size(NULL module)");
    CHECK(mha_module_pack_size(&p.m, NULL) == MHA_ERR_NULL_POINTER, "pack_size(NULL bytes)");
    CHECK(mha_module_pack_size(&p.m, &n) == MHA_OK && n > 0, "pack_size");
    buf = malloc(n + 8);
    CHECK(mha_module_pack(NULL, buf, n) == MHA_ERR_NULL_POINTER, "pack(NULL module)");
    CHECK(mha_module_pack(&p.m, NULL, n) == MHA_ERR_NULL_POINTER, "pack(NULL buffer)");
    CHECK(mha_module_pack(&p.m, buf, n - 1) == MHA_ERR_WORKSPACE_TOO_SMALL, "pack(too small)");
    CHECK(mha_module_pack(&p.m, buf, 0) == MHA_ERR_WORKSPACE_TOO_SMALL, "pack(0 bytes)");
    CHECK(mha_module_pack(&p.m, (char *)buf + 1, n) == MHA_ERR_MISALIGNED, "pack(unaligned)");
    mp = p.m; mp.num_heads = 5;
    CHECK(mha_module_pack_size(&mp, &n) == MHA_ERR_HEADS_DIVIDE, "pack_size(E %% H != 0)");
    mp = p.m; mp.k_proj_weight = NULL;
    CHECK(mha_module_pack_size(&mp, &n) == MHA_ERR_NULL_POINTER, "pack_size(no k weight)");
    mp = p.m; mp.embed_dim = 0;
    CHECK(mha_module_pack_size(&mp, &n) == MHA_ERR_INVALID_SIZE, "pack_size(E = 0)");
    CHECK(mha_module_pack_size(&p.m, &n) == MHA_OK && mha_module_pack(&p.m, buf, n) == MHA_OK, "pack");
    mp = p.m; mp.packed = buf;
    CHECK(mha_forward(&mp, 2, 5, 6, q, k, k, NULL, out, NULL, NULL, 0) == MHA_OK, "packed forward");

    /* the same buffer on modules of another shape or layout: rejected */
    for (i = 0; i < 5; ++i) {
        mha_status st;
        c = c36;
        if (i == 0) { c.E = 12; c.H = 3; c.kdim = 20; c.vdim = 44; }   /* other E */
        if (i == 1) c.H = 6;                                         /* other H, same E */
        if (i == 2) c.kdim = 21;                                     /* other kdim */
        if (i == 3) c.vdim = 0;                                      /* vdim = E */
        if (i == 4) { c.in_proj = 1; c.kdim = c.vdim = 0; }           /* in_proj layout */
        make_module(&c, &r, &o);
        o.m.packed = buf;
        st = mha_forward(&o.m, 2, 5, 6, q, k, k, NULL, out, NULL, NULL, 0);
        CHECK(st == MHA_ERR_PACK_MISMATCH, "mismatched packed buffer (case %d) accepted: %s", i,
              mha_status_string(st));
        free_module(&o);
    }
    /* a flipped header byte (any of the 64) or a zeroed buffer: rejected */
    hdr = (char *)buf;
    for (i = 0; i < 64; ++i) {
        hdr[i] ^= 0x10;
        CHECK(mha_forward(&mp, 2, 5, 6, q, k, k, NULL, out, NULL, NULL, 0) == MHA_ERR_PACK_MISMATCH,
              "corrupted header byte %d accepted", i);
        hdr[i] ^= 0x10;
    }
    CHECK(mha_forward(&mp, 2, 5, 6, q, k, k, NULL, out, NULL, NULL, 0) == MHA_OK, "restored header");
    memset(buf, 0, n);
    CHECK(mha_forward(&mp, 2, 5, 6, q, k, k, NULL, out, NULL, NULL, 0) == MHA_ERR_PACK_MISMATCH,
          "zeroed buffer accepted");
    free(buf);
    free_module(&p);
}

int main(void)
{
    /*               B  Lq  Lk   E   H kdim vdim inp bias bkv zero mask */
    pcase cs[] = {{  2,  5,  7,  12,  3,  0,  0,  1,  1,  0,  0,  0},
                  {  2,  9, 13,  36,  4, 20, 44,  0,  0,  1,  1,  1},
                  {  1, 33, 33, 520,  8,  0,  0,  1,  1,  0,  0,  2},
                  {  3, 17, 11,  36,  6, 52,  7,  0,  1,  1,  0,  3},
                  {  4,160,160,  64,  2,  0,  0,  1,  0,  0,  1,  1},
                  {  1,  1,  1,  12,  1,  0,  0,  1,  1,  1,  1,  0}};
    int i;
    for (i = 0; i < (int)(sizeof cs / sizeof cs[0]); ++i) run_case(&cs[i], (unsigned)i);
    gemm_case();
    errors();
    return tu_finish("test_pack");
}
