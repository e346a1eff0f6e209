/* attention_heatmaps.c - run mha.h on a sentence and draw what each head looks at.
     make demo
   or by hand:
     cc -std=c99 -O2 -I. -isystem /usr/include/stb examples/attention_heatmaps.c -o attention_heatmaps -lm
     ./attention_heatmaps [out-folder] [viridis|magma|inferno|cividis]

   The model is built by hand so that each of the four heads has a job you
   can recognise in its picture:
     head 0  "self"            each word looks at itself
     head 1  "previous word"   each word looks one step back
     head 2  "local window"    a soft look at the few words around it
     head 3  "first word"      everyone looks at the start of the sentence
   All four read only the position part of the input, which is why they do
   not care which words are where; the words enter through the values.

   THE INPUT  x_i = [ word(t_i) ; pos(i) ]  (E = 64)
     word(t): 32 numbers drawn from a generator seeded by the word's letters,
              so the same word always gets the same vector
     pos(i):  the sinusoidal code of "Attention is all you need",
              pos(i)[2k] = sin(i w_k), pos(i)[2k+1] = cos(i w_k), w_k = 10000^(-2k/32)
     Written as one vector this is word(t) + pos(i) with the two living in
     separate halves of the 64 numbers.

   WHY THE HEADS DO THEIR JOBS
     A (sin, cos) pair of pos(i) dotted with the same pair of pos(j) is
     cos((i - j) w_k), largest when i = j.  So with q_i = b * pos(i) and
     k_j = pos(j) the score b * sum_k cos((i - j) w_k) peaks on the diagonal
     (head 0).  Rotating each pair of the query by -w_k gives pos(i - 1), and
     the peak moves one word back (head 1).  Leaving out the two fastest
     frequencies gives a wider, softer peak (head 2).  A query that ignores
     x and is the constant b * pos(0) (a bias) peaks at key 0 for every word
     (head 3).
     Each head has D = 16 dimensions: 8 (sin, cos) pairs.
*/
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mkdir */
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_HEATMAP_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "heatmap.h"

#include <math.h>
#include <stdint.h>
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

enum { E = 64, H = 4, D = E / H, HALF = E / 2, MAXL = 32 };

static const char *const sentence = "the cat sat on the mat because it was warm and soft";
static const char *const head_jobs[H] = {"self", "previous word", "local window", "first word"};

/* the 8 (sin, cos) pairs a head reads start at this frequency index: the
   fastest ones (k = 0..7) make the sharpest peaks; the local window starts
   two slower (k = 2..9), so its peak is wider */
static const int first_pair[H] = {0, 0, 2, 0};
/* sharpness b of each head's scores; with these a word gives about 0.7 of
   its weight to the word its head is after (0.8 to the first word), and
   the window spreads 0.3 / 0.2 / 0.1 over the word and two either side */
static const float sharpness[H] = {2.5f, 2.5f, 4.0f, 2.0f};

static double omega(int k) { return pow(10000.0, -2.0 * k / HALF); }

/* word(t): a xorshift stream seeded by an FNV-1a hash of the letters */
static void word_vector(const char *w, float *out)
{
    uint64_t s = 1469598103934665603ULL;
    int i;
    for (; *w; ++w) s = (s ^ (unsigned char)*w) * 1099511628211ULL;
    for (i = 0; i < HALF; ++i) {
        s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
        out[i] = (float)((double)((s * 2685821657736338717ULL) >> 40) / 16777216.0 * 2.0 - 1.0);
    }
}

static void position_vector(int i, float *out)
{
    int k;
    for (k = 0; k < HALF / 2; ++k) {
        out[2 * k] = (float)sin(i * omega(k));
        out[2 * k + 1] = (float)cos(i * omega(k));
    }
}

/* Build in_proj_weight [3E, E] (rows Wq, Wk, Wv), in_proj_bias [3E] and
   out_proj [E, E]. */
static void build_weights(float *w_in, float *b_in, float *w_out)
{
    int h, p, r, c;
    uint64_t s = 42;
    memset(w_in, 0, sizeof(float) * 3 * E * E);
    memset(b_in, 0, sizeof(float) * 3 * E);
    for (h = 0; h < H; ++h) {
        /* the scores are divided by sqrt(D); fold that back in so sharpness
           means what it says */
        float b = sharpness[h] * sqrtf((float)D);
        for (p = 0; p < D / 2; ++p) {
            int k = first_pair[h] + p;               /* frequency index */
            int qs = h * D + 2 * p, qc = qs + 1;     /* rows of Wq (and Wk) for this head */
            int xs = HALF + 2 * k, xc = xs + 1;      /* sin and cos columns of pos(i) in x */
            float cw = (float)cos(omega(k)), sw = (float)sin(omega(k));
            float *Wq = w_in, *Wk = w_in + E * E, *bq = b_in;
            /* keys: the pair itself, k_j = (sin j w, cos j w) */
            Wk[qs * E + xs] = 1;
            Wk[qc * E + xc] = 1;
            switch (h) {
            case 1: /* q_i = b * pos(i - 1): rotate the pair by -w */
                Wq[qs * E + xs] = b * cw;  Wq[qs * E + xc] = -b * sw;
                Wq[qc * E + xs] = b * sw;  Wq[qc * E + xc] = b * cw;
                break;
            case 3: /* q_i = b * pos(0) = b * (0, 1), whatever x is */
                bq[qc] = b;
                break;
            default: /* q_i = b * pos(i) */
                Wq[qs * E + xs] = b;
                Wq[qc * E + xc] = b;
                break;
            }
        }
    }
    /* values: a fixed pseudo-random mix, output projection the identity;
       they shape the layer's output, not the pictures */
    for (r = 0; r < E; ++r)
        for (c = 0; c < E; ++c) {
            s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
            w_in[(2 * E + r) * E + c] = (float)((double)((s * 2685821657736338717ULL) >> 40) / 16777216.0 - 0.5) * 0.25f;
            w_out[r * E + c] = (r == c) ? 1.0f : 0.0f;
        }
}

/* The model and its input: the words of the sentence (pointers into
   `words`, 256 bytes), x [L, E] and the layer m, whose weights live in the
   static arrays here.  Returns L.  The tests build the same model. */
static int build_demo(char *words, const char **tok, float *x, mha_module *m)
{
    static float w_in[3 * E * E], b_in[3 * E], w_out[E * E], b_out[E];
    int L = 0, i;
    char *p;

    /* 1. word-level tokens: split at spaces */
    strcpy(words, sentence);
    for (p = strtok(words, " "); p && L < MAXL; p = strtok(NULL, " ")) tok[L++] = p;

    /* 2. x_i = [word(t_i) ; pos(i)] */
    for (i = 0; i < L; ++i) {
        word_vector(tok[i], x + i * E);
        position_vector(i, x + i * E + HALF);
    }

    /* 3. the hand-made layer */
    build_weights(w_in, b_in, w_out);
    memset(m, 0, sizeof *m);
    m->embed_dim = E;
    m->num_heads = H;
    m->in_proj_weight = w_in;
    m->in_proj_bias = b_in;
    m->out_proj_weight = w_out;
    m->out_proj_bias = b_out;
    return L;
}

#ifndef ATTENTION_HEATMAPS_NO_MAIN /* tests/test_demo_heads.c uses the model only */
static int save(const char *dir, const char *name, const mha_heatmap *hm, const mha_heatmap_style *st)
{
    char path[1024];
    mha_error err;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (mha_heatmap_write_png(path, hm, st, &err) != MHA_OK) {
        fprintf(stderr, "attention_heatmaps: %s\n", err.message);   /* the path and the reason */
        return 1;
    }
    printf("  %s\n", path);
    return 0;
}

/* Writes <prefix>_head<h>.png for every head, <prefix>_grid.png and <prefix>_average.png. */
static int draw_all(const char *dir, const char *prefix, const char *what, const float *w, int L,
                    const char *const *tok, const unsigned char *mask, const mha_heatmap_style *st)
{
    static float avg[MAXL * MAXL];
    char name[256], title[256], head_title[H][64];
    const char *head_titles[H];
    mha_heatmap hm;
    int h, bad = 0;

    memset(&hm, 0, sizeof hm);
    hm.Lq = hm.Lk = L;
    hm.q_labels = hm.k_labels = tok;
    hm.mask = mask;
    for (h = 0; h < H; ++h) {
        snprintf(head_title[h], sizeof head_title[h], "head %d: %s", h, head_jobs[h]);
        head_titles[h] = head_title[h];
        hm.weights = w + (size_t)h * L * L;
        hm.heads = 1;
        snprintf(title, sizeof title, "%s, %s", what, head_title[h]);
        hm.title = title;
        snprintf(name, sizeof name, "%s_head%d.png", prefix, h);
        bad |= save(dir, name, &hm, st);
    }
    hm.weights = w;
    hm.heads = H;
    hm.head_titles = head_titles;
    snprintf(title, sizeof title, "%s: all %d heads", what, H);
    hm.title = title;
    snprintf(name, sizeof name, "%s_grid.png", prefix);
    bad |= save(dir, name, &hm, st);

    if (mha_heatmap_average(w, H, L, L, avg, NULL) != MHA_OK) return 1;
    hm.weights = avg;
    hm.heads = 1;
    hm.head_titles = NULL;
    snprintf(title, sizeof title, "%s: average of the %d heads", what, H);
    hm.title = title;
    snprintf(name, sizeof name, "%s_average.png", prefix);
    bad |= save(dir, name, &hm, st);
    return bad;
}

int main(int argc, char **argv)
{
    static float x[MAXL * E], out[MAXL * E], weights[H * MAXL * MAXL];
    static unsigned char causal[MAXL * MAXL];
    static char words[256];
    const char *tok[MAXL];
    const char *dir = argc > 1 ? argv[1] : "out";
    mha_heatmap_style st;
    mha_module m;
    mha_options opt;
    mha_status s;
    int L, bad = 0;

    memset(&st, 0, sizeof st);
    if (argc > 2) {
        int c = mha_heatmap_cmap_parse(argv[2]);
        if (c < 0) {
            fprintf(stderr, "attention_heatmaps: unknown colour map '%s' (viridis, magma, inferno, cividis)\n", argv[2]);
            return 2;
        }
        st.cmap = (mha_heatmap_cmap)c;
    }
    L = build_demo(words, tok, x, &m);

    make_dir(dir); /* fine if it exists; a real failure shows when writing */
    printf("sentence: \"%s\" (%d words, E = %d, %d heads)\n", sentence, L, E, H);

    /* 4. every word sees every word */
    memset(&opt, 0, sizeof opt);
    opt.per_head_weights = 1;
    s = mha_forward(&m, 1, L, L, x, x, x, &opt, out, weights, NULL, 0);
    if (s != MHA_OK) { fprintf(stderr, "mha_forward: %s\n", mha_status_string(s)); return 1; }
    printf("bidirectional attention:\n");
    bad |= draw_all(dir, "attn", "bidirectional", weights, L, tok, NULL, &st);

    /* 5. causal: word i sees words 0..i; the hidden cells are hatched */
    opt.causal = 1;
    s = mha_forward(&m, 1, L, L, x, x, x, &opt, out, weights, NULL, 0);
    if (s != MHA_OK) { fprintf(stderr, "mha_forward: %s\n", mha_status_string(s)); return 1; }
    mha_heatmap_causal_mask(L, L, 0, causal, NULL);   /* cannot fail: L >= 1, causal holds L x L */
    printf("causal attention:\n");
    bad |= draw_all(dir, "causal", "causal", weights, L, tok, causal, &st);
    return bad;
}
#endif
