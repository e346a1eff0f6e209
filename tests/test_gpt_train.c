/* The tiny GPT of examples/tiny_gpt.c, small enough for every test configuration:
     - its hand-written backward (tied LM head, position table, residual stream)
       against central differences of its own forward;
     - a 60-step training run on synthetic sentences: the loss starts at
       ln 256 and falls;
     - resuming from a checkpoint (with the AdamW moments) continues bit for bit;
     - the chunked cross-entropy (gpt_cross_entropy) equals mha_cross_entropy;
     - the training pieces of the example: windows with a repeated stretch
       (gpt_batch_copy) hold one exactly when asked, AdamW decays the
       matrices only (gpt_adamw_step), the time-based schedule (gpt_lr_progress);
     - gpt_next_logits equals the last row of the full forward, also past the
       context length, and the KV-cache decoder (gpt_decoder_feed, one prefill
       then one byte at a time) equals gpt_next_logits to 1e-5; greedy text
       from the cache and from the recomputation is the same;
     - gpt_sample: temperature 0 and top-k 1 give the argmax, top-k never
       leaves the k largest, and the draws follow the softmax;
     - the saved forward: each layer's backward reads what its forward saved
       (mha_run.saved) and agrees with a backward that computes the block
       again; a training step and a decoding step allocate nothing. */
#include <stdlib.h>
/* every allocation mha.h makes for the caller passes here */
static long g_allocs;
#define MHA_MALLOC(sz) (++g_allocs, malloc(sz))
#define MHA_FREE(p) free(p)
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"
#include "examples/tiny_gpt.h"

static mha_error err;   /* every call below fills it; failures print err.message */

#define B 4
#define T 16

/* sentences from a small grammar: the model can learn the words and their order */
static size_t make_text(unsigned char *out, size_t cap, tiny_rng *r)
{
    static const char *const subj[] = {"the cat", "a dog", "my friend", "the old man"};
    static const char *const verb[] = {" sat", " ran", " ate", " slept"};
    static const char *const tail[] = {" on the mat. ", " in the park. ", " at home. ", " all day. "};
    size_t n = 0;
    while (n + 64 < cap) {
        const char *parts[3];
        int k;
        parts[0] = subj[tiny_rng_u32(r) % 4];
        parts[1] = verb[tiny_rng_u32(r) % 4];
        parts[2] = tail[tiny_rng_u32(r) % 4];
        for (k = 0; k < 3; ++k) {
            size_t len = strlen(parts[k]);
            memcpy(out + n, parts[k], len);
            n += len;
        }
    }
    return n;
}

static double loss_at(gpt_model *M, const int *tok, const int *tgt)
{
    float l = 0.0f;
    mha_status st = gpt_forward(M, B, T, tok, tgt, &l, NULL, &err);
    CHECK(st == MHA_OK, "forward: %s", err.message);
    return l;
}

/* 1 when w[0..n) holds a stretch of at least 8 bytes written again further on
   (w[j..j+S) == w[i..i+S), i + S <= j, S >= 8) */
static int has_repeat(const int *w, int n)
{
    int i, j, k;
    for (i = 0; i + 16 <= n; ++i)
        for (j = i + 8; j + 8 <= n; ++j) {
            for (k = 0; k < 8 && w[i + k] == w[j + k]; ++k) {}
            if (k == 8) return 1;
        }
    return 0;
}

int main(int argc, char **argv)
{
    static unsigned char text[20000];
    const gpt_config c = {2, 2, 16, 24, 16, 256};
    gpt_model M, R;
    tiny_rng rng, data;
    mha_adamw opt;
    int tok[B * T], tgt[B * T], s;
    size_t n, i;
    float first = 0.0f, last10 = 0.0f, loss;
    (void)argc;

    tiny_rng_seed(&data, 7);
    n = make_text(text, sizeof text, &data);
    CHECK(gpt_alloc(&M, &c, B, 1, &err) == MHA_OK, "alloc: %s", err.message);
    tiny_rng_seed(&rng, 1);
    gpt_init(&M, &rng);

    /* 1. the backward against central differences of the forward (double-sided, h
          along the gradient and along single coordinates), on larger weights so the
          differences stand above float32 rounding; the steps are small enough that
          the curvature error stays below a percent) */
    {
        float *g = (float *)malloc(M.o.total * sizeof(float)), *p0 = (float *)malloc(M.o.total * sizeof(float));
        double gg = 0, dd, h = 1e-3, worst = 0;
        const size_t probe[] = {M.o.wte + 'a' * 16 + 3, M.o.wpe + 2 * 16 + 7,
                                M.o.layer0 + M.o.in_w + 40, M.o.layer0 + M.o.layer_stride + M.o.l2_w + 9,
                                M.o.layer0 + M.o.n1_w + 1, M.o.lnf_b + 3, M.o.lnf_w + 11};
        for (i = 0; i < M.o.total; ++i) M.p[i] *= 3.0f;
        gpt_batch(text, n, B, T, &data, tok, tgt);
        loss_at(&M, tok, tgt);
        CHECK(gpt_backward(&M, B, T, tok, &err) == MHA_OK, "backward: %s", err.message);
        memcpy(g, M.g, M.o.total * sizeof(float));
        memcpy(p0, M.p, M.o.total * sizeof(float));
        for (i = 0; i < M.o.total; ++i) gg += (double)g[i] * g[i];
        /* directional derivative along g: (L(p + h g/|g|) - L(p - h g/|g|)) / 2h = |g| */
        for (i = 0; i < M.o.total; ++i) M.p[i] = p0[i] + (float)(h * g[i] / sqrt(gg));
        dd = loss_at(&M, tok, tgt);
        for (i = 0; i < M.o.total; ++i) M.p[i] = p0[i] - (float)(h * g[i] / sqrt(gg));
        dd = (dd - loss_at(&M, tok, tgt)) / (2 * h);
        CHECK(fabs(dd - sqrt(gg)) <= 5e-3 * sqrt(gg), "directional derivative %.6g vs |g| %.6g", dd,
              sqrt(gg));
        for (i = 0; i < sizeof probe / sizeof probe[0]; ++i) {
            double up, dn, fd, err;
            memcpy(M.p, p0, M.o.total * sizeof(float));
            M.p[probe[i]] = p0[probe[i]] + (float)(h);
            up = loss_at(&M, tok, tgt);
            M.p[probe[i]] = p0[probe[i]] - (float)(h);
            dn = loss_at(&M, tok, tgt);
            fd = (up - dn) / (2 * h);
            err = fabs(fd - g[probe[i]]) / (fabs(fd) + 1e-3);
            if (err > worst) worst = err;
            CHECK(err <= 4e-2, "d loss / d p[%zu]: backward %.6g, differences %.6g", probe[i],
                  (double)g[probe[i]], fd);
        }
        printf("worst single-coordinate gradient error vs differences %.2e\n", worst);
        free(g);
        free(p0);
        tiny_rng_seed(&rng, 1);
        gpt_init(&M, &rng);
    }

    /* 1b. the saved forward (mha_run.saved): a batch of the planned size runs
           through the training plans and fills every layer's saved region; the
           backward that reads them equals the one that computes each block
           again (saved_T = 0: run.saved NULL), to float32 rounding.  A batch of
           another size runs one shot and leaves nothing to read. */
    {
        tiny_rng other;
        float *g1 = (float *)malloc(M.o.total * sizeof(float)), l1;
        double *ref = (double *)malloc(M.o.total * sizeof(double)), e;
        tiny_rng_seed(&other, 99);   /* not the data stream: section 2's batches stay as they were */
        gpt_batch(text, n, B, T, &other, tok, tgt);
        loss_at(&M, tok, tgt);
        CHECK(M.saved_T == T, "the planned forward filled the saved regions (saved_T %d)", M.saved_T);
        CHECK(gpt_backward(&M, B, T, tok, &err) == MHA_OK, "backward from the saved forward: %s", err.message);
        memcpy(g1, M.g, M.o.total * sizeof(float));
        M.saved_T = 0;
        CHECK(gpt_backward(&M, B, T, tok, &err) == MHA_OK, "backward, blocks computed again: %s", err.message);
        for (i = 0; i < M.o.total; ++i) ref[i] = M.g[i];
        e = tu_rel_err(g1, ref, M.o.total);
        CHECK(e <= 1e-5, "saved vs recomputed backward: gradient rel err %.2e", e);
        printf("backward from the saved forward vs recomputed: gradient rel err %.2e\n", e);
        /* and it reads the regions as they are: x(0) moved after the forward
           changes layer 0's gradients when the block is computed again, not
           when its saved insides are read (the caller's choice, mha.h says) */
        loss_at(&M, tok, tgt);
        for (i = 0; i < (size_t)B * T * 16; ++i) M.res[i] += 0.5f * (float)(i % 3);   /* not a shift: LN1 removes those */
        CHECK(gpt_backward(&M, B, T, tok, &err) == MHA_OK, "backward from the saved forward: %s", err.message);
        memcpy(g1, M.g, M.o.total * sizeof(float));
        M.saved_T = 0;
        CHECK(gpt_backward(&M, B, T, tok, &err) == MHA_OK, "backward, blocks computed again: %s", err.message);
        for (i = 0; i < M.o.layer_stride; ++i) ref[i] = M.g[M.o.layer0 + i];
        e = tu_rel_err(g1 + M.o.layer0, ref, M.o.layer_stride);
        CHECK(e > 1e-3, "with x(0) moved, the saved and the recomputed layer-0 gradients differ (%.2e)", e);
        CHECK(gpt_forward(&M, 1, T, tok, tgt, &l1, NULL, &err) == MHA_OK && M.saved_T == 0,
              "a one-sequence forward runs one shot and saves nothing (saved_T %d): %s", M.saved_T,
              err.message);
        free(g1);
        free(ref);
    }

    /* 2. 60 steps of training; steps after the first allocate nothing */
    opt = mha_adamw_defaults();
    opt.lr = 1e-2f;
    opt.beta2 = 0.99f;
    {
        long before = 0;
        for (s = 1; s <= 60; ++s) {
            gpt_batch(text, n, B, T, &data, tok, tgt);
            if (s == 2) before = g_allocs;
            CHECK(gpt_train_step(&M, &opt, s, B, T, tok, tgt, 1.0f, &loss, &err) == MHA_OK, "step %d: %s", s,
                  err.message);
            if (s == 1) first = loss;
            if (s > 50) last10 += loss / 10.0f;
        }
        CHECK(g_allocs == before, "steps 2..60 made %ld allocations through MHA_MALLOC", g_allocs - before);
    }
    printf("loss: step 1 %.4f, mean of steps 51-60 %.4f (ln 256 = %.4f)\n", first, last10, log(256.0));
    CHECK(fabsf(first - logf(256.0f)) < 0.05f, "the first loss %.4f is ln 256 (small initial weights)",
          first);
    CHECK(last10 < 0.6f * first, "the loss falls: %.4f -> %.4f", first, last10);

    /* 3. save with the moments after step 60, run 5 more steps; then load into a
          fresh model and run the same 5: identical bits */
    {
        char path[1024];
        gpt_ckpt ck = {0};   /* written only on success */
        mha_status cs;
        tiny_rng again = data;
        snprintf(path, sizeof path, "%s.ckpt", argv[0]);   /* next to the test binary */
        cs = gpt_ckpt_save(path, &c, 60, M.p, M.m, M.v, &err);
        CHECK(cs == MHA_OK, "save: %s", err.message);
        for (s = 61; s <= 65; ++s) {
            gpt_batch(text, n, B, T, &data, tok, tgt);
            gpt_train_step(&M, &opt, s, B, T, tok, tgt, 1.0f, &loss, NULL);
        }
        CHECK(gpt_alloc(&R, &c, B, 1, &err) == MHA_OK, "alloc resumed: %s", err.message);
        cs = gpt_ckpt_load(path, &c, &ck, &err);
        CHECK(cs == MHA_OK && ck.step == 60 && ck.adam_m, "load: %s", err.message);
        if (cs == MHA_OK) {
            memcpy(R.p, ck.params, R.o.total * sizeof(float));
            memcpy(R.m, ck.adam_m, R.o.total * sizeof(float));
            memcpy(R.v, ck.adam_v, R.o.total * sizeof(float));
            for (s = (int)ck.step + 1; s <= 65; ++s) {
                gpt_batch(text, n, B, T, &again, tok, tgt);
                gpt_train_step(&R, &opt, s, B, T, tok, tgt, 1.0f, &loss, NULL);
            }
            CHECK(memcmp(R.p, M.p, M.o.total * sizeof(float)) == 0, "resumed run differs");
            gpt_ckpt_free(&ck);
        }
        gpt_free(&R);
        remove(path);
    }

    /* 3b. the training pieces of examples/tiny_gpt.c */
    {
        enum { W = 50, TT = 40 };
        static unsigned char noise[5000];
        static int bt[W * TT], bg[W * TT], ct[W * TT], cg[W * TT];
        int seq[TT + 1], counts[3] = {0, 0, 0}, f, t, bad = 0, same;
        const double frac[3] = {0.0, 0.5, 1.0};
        tiny_rng a, b;
        /* random bytes: a stretch of 8 equal bytes never occurs by chance (2^-64) */
        tiny_rng_seed(&a, 11);
        for (i = 0; i < sizeof noise; ++i) noise[i] = (unsigned char)(tiny_rng_u32(&a) & 255u);
        for (f = 0; f < 3; ++f) {
            tiny_rng_seed(&a, 5);
            gpt_batch_copy(noise, sizeof noise, W, TT, frac[f], &a, bt, bg);
            for (s = 0; s < W; ++s) {
                for (t = 0; t < TT; ++t) seq[t] = bt[s * TT + t];
                seq[TT] = bg[s * TT + TT - 1];
                for (t = 0; t + 1 < TT; ++t) bad += bg[s * TT + t] != bt[s * TT + t + 1];
                counts[f] += has_repeat(seq, TT + 1);
            }
        }
        CHECK(bad == 0, "targets are the next bytes of the inputs (%d differ)", bad);
        CHECK(counts[0] == 0 && counts[2] == W && counts[1] >= W / 5 && counts[1] <= 4 * W / 5,
              "windows with a repeated stretch at copy 0, 0.5, 1: %d %d %d of %d", counts[0], counts[1],
              counts[2], W);
        tiny_rng_seed(&a, 5);
        tiny_rng_seed(&b, 5);
        gpt_batch(noise, sizeof noise, W, TT, &a, bt, bg);
        gpt_batch_copy(noise, sizeof noise, W, TT, 0.0, &b, ct, cg);
        same = !memcmp(bt, ct, sizeof bt) && !memcmp(bg, cg, sizeof bg) && a.state == b.state;
        CHECK(same, "gpt_batch is gpt_batch_copy with copy 0 (same windows, same draws)");
    }
    {
        /* zero gradient and moments: AdamW's step is 0, only the decay p *= 1 - lr wd moves p */
        mha_adamw dec = mha_adamw_defaults();
        float *p0 = (float *)malloc(M.o.total * sizeof(float));
        int l, f, moved = 0, kept = 0;
        size_t k;
        unsigned char *is_mat = (unsigned char *)calloc(M.o.total, 1);
        dec.lr = 0.1f;
        dec.weight_decay = 0.5f;
        CHECK(gpt_alloc(&R, &c, B, 1, &err) == MHA_OK, "alloc: %s", err.message);
        tiny_rng_seed(&rng, 3);
        gpt_init(&R, &rng);
        for (i = 0; i < R.o.total; ++i) R.p[i] += 0.5f;   /* no zero parameters */
        memcpy(p0, R.p, R.o.total * sizeof(float));
        for (i = 0; i < R.o.layer0; ++i) is_mat[i] = 1;  /* wte, wpe */
        for (l = 0; l < c.n_layer; ++l) {
            size_t base = R.o.layer0 + (size_t)l * R.o.layer_stride, d = 16, F = 24;
            const size_t off[4] = {R.o.in_w, R.o.out_w, R.o.l1_w, R.o.l2_w}, len[4] = {3 * d * d, d * d, F * d, d * F};
            for (f = 0; f < 4; ++f)
                for (k = 0; k < len[f]; ++k) is_mat[base + off[f] + k] = 1;
        }
        CHECK(gpt_adamw_step(&R, &dec, 1, &err) == MHA_OK, "gpt_adamw_step: %s", err.message);
        for (i = 0; i < R.o.total; ++i) {
            float want = is_mat[i] ? p0[i] * (1.0f - dec.lr * dec.weight_decay) : p0[i];
            if (R.p[i] == want) { if (is_mat[i]) ++moved; else ++kept; }
        }
        CHECK(moved + kept == (int)R.o.total, "decay on the matrices only: %d decayed, %d kept, of %zu",
              moved, kept, R.o.total);
        CHECK(kept == (int)(c.n_layer * (3 * 16 + 16 + 24 + 16 + 4 * 16) + 2 * 16),
              "the biases and layer norms are %d floats", kept);
        gpt_free(&R);
        free(p0);
        free(is_mat);
    }
    {
        /* 300 rows: two full chunks of GPT_CE_ROWS and a short one */
        enum { NR = 300, NV = 37 };
        static float z[NR * NV], d1[NR * NV], d2[NR * NV];
        static int y[NR];
        double ref[NR * NV];
        float l1, l2;
        tiny_rng_seed(&rng, 9);
        for (i = 0; i < NR * NV; ++i) z[i] = 4.0f * (tiny_rng_uniform(&rng) - 0.5f);
        for (i = 0; i < NR; ++i) y[i] = (int)(tiny_rng_u32(&rng) % NV);
        CHECK(mha_cross_entropy(NR, NV, z, y, &l1, d1, NULL, &err) == MHA_OK, "cross-entropy: %s", err.message);
        CHECK(gpt_cross_entropy(NR, NV, z, y, &l2, d2, &err) == MHA_OK, "chunked cross-entropy: %s", err.message);
        for (i = 0; i < NR * NV; ++i) ref[i] = d1[i];
        CHECK(fabsf(l1 - l2) <= 1e-6f * l1 && tu_rel_err(d2, ref, NR * NV) <= 1e-6,
              "chunked loss %.7f vs %.7f, gradient rel err %.2e", l2, l1, tu_rel_err(d2, ref, NR * NV));
        y[NR - 1] = NV;
        CHECK(gpt_cross_entropy(NR, NV, z, y, &l2, d2, &err) == MHA_ERR_INVALID_ARGUMENT &&
                  err.status == MHA_ERR_INVALID_ARGUMENT && strcmp(err.field, "targets") == 0 &&
                  strstr(err.message, "targets[299] is 37") != NULL,
              "a target out of range, named: %s", err.message);
    }
    CHECK(gpt_lr_progress(5, 10, 0.0, 1.0f, 0.1f) == 0.5f && gpt_lr_progress(10, 10, 0.0, 1.0f, 0.1f) == 1.0f,
          "linear warm-up");
    CHECK(fabsf(gpt_lr_progress(50, 10, 0.5, 1.0f, 0.1f) - 0.55f) < 1e-6f &&
          fabsf(gpt_lr_progress(50, 10, 1.0, 1.0f, 0.1f) - 0.1f) < 1e-6f &&
          gpt_lr_progress(50, 10, 7.0, 1.0f, 0.1f) == gpt_lr_progress(50, 10, 1.0, 1.0f, 0.1f),
          "cosine from lr_max to lr_min over the progress 0..1");

    /* 4. next_logits = last row of the full forward; past ctx it sees the last ctx bytes */
    {
        int ctx[40];
        float a[256], *full = (float *)malloc((size_t)T * 256 * sizeof(float));
        double ref[256];
        for (i = 0; i < 40; ++i) ctx[i] = text[100 + i];
        CHECK(gpt_next_logits(&M, ctx, 9, a, &err) == MHA_OK, "next_logits: %s", err.message);
        gpt_forward(&M, 1, 9, ctx, NULL, NULL, NULL, NULL);
        for (i = 0; i < 256; ++i) ref[i] = M.logits[8 * 256 + i];
        CHECK(tu_rel_err(a, ref, 256) == 0.0, "next_logits = forward's last row");
        gpt_forward(&M, 1, T, ctx + 40 - T, NULL, NULL, NULL, NULL);
        memcpy(full, M.logits, (size_t)T * 256 * sizeof(float));
        CHECK(gpt_next_logits(&M, ctx, 40, a, &err) == MHA_OK, "next_logits past ctx: %s", err.message);
        for (i = 0; i < 256; ++i) ref[i] = full[(T - 1) * 256 + i];
        CHECK(tu_rel_err(a, ref, 256) == 0.0, "next_logits crops to the last ctx bytes");
        CHECK(gpt_next_logits(&M, ctx, 0, a, &err) == MHA_ERR_INVALID_SIZE && strcmp(err.field, "n") == 0,
              "empty context refused: %s", err.message);
        free(full);
    }

    /* 5. KV-cache decoding against the recomputed forward, within the context */
    {
        gpt_decoder D;
        int seq[64], greedy[64], k;
        float a[256], b[256];
        double ref[256], worst = 0, e;
        tiny_rng gr;
        long before;
        CHECK(gpt_decoder_init(&D, &M, &err) == MHA_OK, "decoder init: %s", err.message);
        for (i = 0; i < 64; ++i) seq[i] = text[300 + i];
        /* a prefill of 5 bytes, then one byte at a time up to ctx */
        CHECK(gpt_decoder_feed(&D, seq, 5, a, &err) == MHA_OK, "prefill: %s", err.message);
        before = g_allocs;
        for (k = 5;; ++k) {
            gpt_next_logits(&M, seq, k, b, NULL);
            for (i = 0; i < 256; ++i) ref[i] = b[i];
            e = tu_rel_err(a, ref, 256);
            if (e > worst) worst = e;
            CHECK(e <= 1e-5, "cached logits after %d bytes: rel err %.2e", k, e);
            if (k == T) break;
            CHECK(gpt_decoder_feed(&D, seq + k, 1, a, &err) == MHA_OK, "feed byte %d: %s", k, err.message);
        }
        printf("KV-cache decoding vs recomputed forward: worst rel err %.2e over %d steps\n", worst, T - 4);
        /* the recomputed forwards (one shot, weights unpacked) allocate nothing
           either: every call of this loop had its workspace */
        CHECK(g_allocs == before, "decoding steps made %ld allocations through MHA_MALLOC", g_allocs - before);
        CHECK(gpt_decoder_feed(&D, seq + T, 1, a, &err) == MHA_ERR_CAPACITY && D.pos == T &&
                  err.status == MHA_ERR_CAPACITY,
              "a full cache refuses one more byte: %s", err.message);
        /* one prefill of 12 bytes = twelve single steps */
        gpt_decoder_reset(&D);
        CHECK(gpt_decoder_feed(&D, seq, 12, a, &err) == MHA_OK, "prefill 12: %s", err.message);
        gpt_decoder_reset(&D);
        for (k = 0; k < 12; ++k) gpt_decoder_feed(&D, seq + k, 1, b, NULL);
        for (i = 0; i < 256; ++i) ref[i] = b[i];
        CHECK(tu_rel_err(a, ref, 256) <= 1e-5, "prefill vs steps: %.2e", tu_rel_err(a, ref, 256));
        /* greedy generation: the cache and the recomputation pick the same bytes */
        memcpy(greedy, seq, sizeof seq);
        tiny_rng_seed(&gr, 5);
        CHECK(gpt_generate(&D, seq, 4, T - 4, 0.0f, 0, &gr, a, &err) == MHA_OK, "generate: %s", err.message);
        for (k = 4; k < T; ++k) {
            gpt_next_logits(&M, greedy, k, b, NULL);
            greedy[k] = gpt_sample(b, 256, 0.0f, 0, &gr);
        }
        CHECK(memcmp(seq, greedy, T * sizeof(int)) == 0, "cached and recomputed greedy text differ");
        /* past the context: the cache restarts from the last ctx/2 bytes and goes on */
        CHECK(gpt_generate(&D, seq, 4, 50, 0.9f, 5, &gr, a, &err) == MHA_OK, "generate past ctx: %s", err.message);
        for (k = 0, i = 4; i < 54; ++i) k += seq[i] < 0 || seq[i] > 255;
        CHECK(k == 0, "generated bytes in range");
        gpt_decoder_free(&D);
    }

    /* 6. sampling */
    {
        float z[8] = {0.5f, 2.0f, -1.0f, 1.5f, 0.0f, 1.9f, -3.0f, 1.0f};
        int counts[8] = {0}, bad = 0;
        double p[8], zs = 0, chi = 0;
        tiny_rng sr;
        tiny_rng_seed(&sr, 3);
        CHECK(gpt_sample(z, 8, 0.0f, 0, &sr) == 1, "temperature 0 is the argmax");
        for (s = 0; s < 100; ++s) bad += gpt_sample(z, 8, 1.5f, 1, &sr) != 1;
        CHECK(bad == 0, "top-k 1 is the argmax (%d others)", bad);
        for (s = 0; s < 2000; ++s) {
            int j = gpt_sample(z, 8, 1.0f, 3, &sr);
            bad += j != 1 && j != 5 && j != 3;
        }
        CHECK(bad == 0, "top-k 3 left the three largest %d times", bad);
        for (s = 0; s < 20000; ++s) counts[gpt_sample(z, 8, 0.7f, 0, &sr)]++;
        for (i = 0; i < 8; ++i) zs += p[i] = exp(z[i] / 0.7);
        for (i = 0; i < 8; ++i) {
            double e = 20000 * p[i] / zs;
            chi += (counts[i] - e) * (counts[i] - e) / e;
        }
        /* 7 degrees of freedom: P(chi^2 > 24.3) = 0.001 */
        CHECK(chi < 24.3, "draws at temperature 0.7 follow the softmax (chi^2 %.1f)", chi);
    }

    gpt_free(&M);
    return tu_finish("test_gpt_train");
}
