/* long_attention.c - look at attention over a 16384-token sequence without
   ever building its 16384 x 16384 weight matrix.
     cc -std=c99 -O2 -march=native -I. -isystem /usr/include/stb examples/long_attention.c -o long_attention -lm
     ./long_attention [out-folder] [L]          (L: sequence length, default 16384)

   Four causal heads of D = 16, built by hand from sinusoidal position codes
   (as in attention_heatmaps.c), so each has a known job:
     head 0  "self"            q_i = b pos(i),  k_j = pos(j): peaks at j = i
     head 1  "previous token"  q_i = b R pos(i) (each pair turned back one
                               step), so the peak moves to j = i - 1
     head 2  "sink"            q_i = b pos(0) for every i: peaks at key 0
     head 3  "uniform"         q_i = 0: the same weight on every key it sees
   pos(i) holds 8 (sin, cos) pairs at frequencies w_k = 10000^(-k/8), so
   pos(i).pos(j) = sum_k cos((i - j) w_k), largest at i = j.

   One fused mha_sdpa call with opt.row_stats gives, per query row, the
   log-sum-exp, the entropy, the largest weight and the weight on key 0;
   mha_sdpa_weights_rows then recomputes the exact weights of the last 64
   rows from the saved log-sum-exp.  The program prints per-head means,
   writes two PNGs (examples/heatmap.h) and compares the memory it used with
   what the [H, L, L] weights would take.  */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mkdir */
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_HEATMAP_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "examples/heatmap.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
#include <direct.h>
#define make_dir(p) _mkdir(p)
#else
#include <sys/stat.h>
#define make_dir(p) mkdir(p, 0777)
#endif

enum { H = 4, D = 16, NR = 64, WIN = 128, BINS = 128 };
static const char *const jobs[H] = { "self", "previous token", "sink", "uniform" };

static size_t bytes_used;   /* every buffer this program allocates, for the report */
static void *take(size_t n)
{
    void *p = malloc(n);
    if (!p) { fprintf(stderr, "out of memory (%zu bytes)\n", n); exit(1); }
    bytes_used += n;
    return p;
}

/* pos(i): 8 (sin, cos) pairs; turned by -w_k when back != 0 */
static void pos_code(long i, int back, float *out)
{
    int k;
    for (k = 0; k < D / 2; ++k) {
        double w = pow(10000.0, -(double)k / (D / 2)), a = (double)i * w - (back ? w : 0.0);
        out[2 * k] = (float)sin(a);
        out[2 * k + 1] = (float)cos(a);
    }
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "out";
    int L = argc > 2 ? atoi(argv[2]) : 16384, h, i, j, rows[NR], nr, c0, bin;
    size_t nq, ws_bytes, rows_floats;
    float *q, *k, *v, *out, *stats = NULL, *w = NULL, *win = NULL, *bins = NULL, b = 24.0f;
    void *ws = NULL;
    unsigned char *mask = NULL;
    char *lab = NULL;
    const char **ql = NULL, **kl = NULL, **bl = NULL;
    int rc = 1;
    mha_row_stats rs;
    mha_options opt = mha_options_defaults();
    mha_status st = MHA_OK;
    char path[512], title[160];
    if (L < 2 || L > 1 << 20) { fprintf(stderr, "L must be in 2..%d\n", 1 << 20); return 1; }
    nr = L < NR ? L : NR;
    nq = (size_t)H * L * D;

    /* 1. the heads: q [1, H, L, D]; one K and V shared by the heads (GQA, Hkv = 1) */
    q = take(nq * sizeof(float)); k = take((size_t)L * D * sizeof(float));
    v = take((size_t)L * D * sizeof(float)); out = take(nq * sizeof(float));
    for (i = 0; i < L; ++i) {
        float *q0 = q + ((size_t)0 * L + i) * D, *q1 = q + ((size_t)1 * L + i) * D;
        float *q2 = q + ((size_t)2 * L + i) * D, *q3 = q + ((size_t)3 * L + i) * D;
        pos_code(i, 0, k + (size_t)i * D);
        pos_code(i, 0, q0); pos_code(i, 1, q1); pos_code(0, 0, q2);
        for (j = 0; j < D; ++j) { q0[j] *= b; q1[j] *= b; q2[j] *= b; q3[j] = 0.0f; }
        for (j = 0; j < D; ++j) v[(size_t)i * D + j] = (float)((i * 7 + j * 3) % 11) / 11.0f;
    }
    opt.causal = 1;
    opt.num_kv_heads = 1;

    /* 2. one fused pass with the row statistics, [H, L] each */
    stats = take((size_t)4 * H * L * sizeof(float));
    rs.lse = stats; rs.entropy = stats + (size_t)H * L;
    rs.max_weight = stats + (size_t)2 * H * L; rs.first_weight = stats + (size_t)3 * H * L;
    opt.row_stats = &rs;
    if ((st = mha_sdpa_workspace_size(1, H, L, L, D, D, &opt, 0, &ws_bytes)) != MHA_OK) goto fail;
    ws = take(ws_bytes);
    if ((st = mha_sdpa(1, H, L, L, D, D, q, k, v, &opt, out, NULL, ws, ws_bytes)) != MHA_OK) goto fail;

    printf("L = %d tokens, %d causal heads of D = %d (one fused pass, row statistics on)\n", L, H, D);
    printf("%-16s %13s %15s %11s %12s\n", "head", "mean entropy", "uniform would", "mean max w", "mean sink w");
    for (h = 0; h < H; ++h) {
        double e = 0, u = 0, m = 0, f = 0;
        for (i = 0; i < L; ++i) {
            e += rs.entropy[(size_t)h * L + i];
            u += log((double)i + 1.0);          /* a uniform row over its i + 1 keys */
            m += rs.max_weight[(size_t)h * L + i];
            f += rs.first_weight[(size_t)h * L + i];
        }
        printf("%d %-14s %13.3f %15.3f %11.3f %12.3f\n", h, jobs[h], e / L, u / L, m / L, f / L);
    }

    /* 3. the exact weights of the last 64 rows, [H, 64, L], from the lse */
    for (i = 0; i < nr; ++i) rows[i] = L - nr + i;
    rows_floats = (size_t)H * nr * L;
    w = take(rows_floats * sizeof(float));
    if ((st = mha_sdpa_weights_rows(1, H, L, L, D, q, k, rs.lse, nr, rows, &opt, w)) != MHA_OK) goto fail;

    /* 4. two pictures of those rows: the last 128 keys exactly, and the whole
          key axis in 128 bins (the mass of each bin's keys) */
    {
        int nw = L < WIN ? L : WIN, nb = L < BINS ? L : BINS;
        mask = take((size_t)nr * nw);
        lab = take((size_t)(nr + nw + nb) * 12);   /* positions as labels */
        ql = take((size_t)nr * sizeof(char *)); kl = take((size_t)nw * sizeof(char *));
        bl = take((size_t)nb * sizeof(char *));
        mha_heatmap hm;
        mha_heatmap_style sty;
        mha_error herr;
        win = take((size_t)H * nr * nw * sizeof(float));
        bins = take((size_t)H * nr * nb * sizeof(float));
        c0 = L - nw;
        for (h = 0; h < H; ++h)
            for (i = 0; i < nr; ++i) {
                const float *wr = w + ((size_t)h * nr + i) * L;
                float *bo = bins + ((size_t)h * nr + i) * nb;
                memcpy(win + ((size_t)h * nr + i) * nw, wr + c0, (size_t)nw * sizeof(float));
                for (bin = 0; bin < nb; ++bin) bo[bin] = 0.0f;
                for (j = 0; j < L; ++j) bo[(long)j * nb / L] += wr[j];
            }
        mha_heatmap_causal_mask(nr, nw, 1, mask, NULL);   /* cannot fail: nr, nw >= 1, mask holds them */
        for (i = 0; i < nr; ++i) { ql[i] = lab + (size_t)i * 12; snprintf(lab + (size_t)i * 12, 12, "%d", L - nr + i); }
        for (j = 0; j < nw; ++j) { kl[j] = lab + (size_t)(nr + j) * 12; snprintf(lab + (size_t)(nr + j) * 12, 12, "%d", c0 + j); }
        for (bin = 0; bin < nb; ++bin) {
            bl[bin] = lab + (size_t)(nr + nw + bin) * 12;
            snprintf(lab + (size_t)(nr + nw + bin) * 12, 12, "%ld", (long)bin * L / nb);
        }
        (void)make_dir(dir);
        memset(&hm, 0, sizeof hm); memset(&sty, 0, sizeof sty);
        hm.weights = win; hm.heads = H; hm.Lq = nr; hm.Lk = nw; hm.mask = mask; hm.head_titles = jobs;
        hm.q_labels = ql; hm.k_labels = kl;
        snprintf(title, sizeof title, "last %d queries x last %d keys of %d (exact weights)", nr, nw, L);
        hm.title = title;
        sty.cell = 3;
        snprintf(path, sizeof path, "%s/long_last_rows.png", dir);
        if (mha_heatmap_write_png(path, &hm, &sty, &herr) != MHA_OK) {
            fprintf(stderr, "%s\n", herr.message); goto done;
        }
        printf("wrote %s\n", path);
        hm.weights = bins; hm.Lk = nb; hm.mask = NULL; hm.k_labels = bl;
        snprintf(title, sizeof title, "last %d queries x all %d keys in %d bins (weight mass per bin)", nr, L, nb);
        snprintf(path, sizeof path, "%s/long_key_bins.png", dir);
        if (mha_heatmap_write_png(path, &hm, &sty, &herr) != MHA_OK) {
            fprintf(stderr, "%s\n", herr.message); goto done;
        }
        printf("wrote %s\n", path);
    }

    /* 5. memory: everything above against the [H, L, L] weights alone */
    printf("memory: %.1f MiB allocated in all (inputs, outputs, %.1f MiB workspace, statistics, "
           "%d rows); the [%d, %d, %d] weights alone would be %.1f MiB\n",
           (double)bytes_used / 1048576.0, (double)ws_bytes / 1048576.0, nr, H, L, L,
           (double)H * L * L * sizeof(float) / 1048576.0);
    rc = 0;
fail:
    if (st != MHA_OK) fprintf(stderr, "mha: %s\n", mha_status_string(st));
done:
    free(q); free(k); free(v); free(out); free(stats); free(ws); free(w);
    free(mask); free(win); free(bins); free(lab); free((void *)ql); free((void *)kl); free((void *)bl);
    return rc;
}
