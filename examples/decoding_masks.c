/* decoding_masks.c - pictures of the decoder masks and biases of mha.h
   (docs/decoding.md), drawn with examples/heatmap.h.
     cc -std=c99 -O2 -I. -isystem /usr/include/stb examples/decoding_masks.c -o decoding_masks -lm
     ./decoding_masks [out-folder]

   Every picture is the attention weights mha_sdpa returns when all scores
   are equal (q = 0), so a row spreads its weight evenly over the keys it may
   see and the mask's shape is all that shows; hatched cells are blocked.
     decode_causal_br.png   causal, bottom-right: 4 new queries after 8 cached keys
     decode_window.png      sliding window (left 3, right 0) with causal, L = 12
     decode_alibi.png       ALiBi's bias slope_h (j - i) for 4 heads (paper slopes), causal
     decode_sinks.png       a sink logit of 1.0: rows keep 1 - sink mass for the keys
*/
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_HEATMAP_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "heatmap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* weights of SDPA with all-equal scores, H heads, under opt; blocked cells NaN */
static int draw(const char *dir, const char *file, const char *title, int H, int Lq, int Lk,
                mha_options *opt)
{
    size_t nq = (size_t)H * Lq * 4, nk = (size_t)Lk * 4;
    float *q = calloc(nq, sizeof(float)), *k = calloc(nk, sizeof(float)), *v = calloc(nk, sizeof(float));
    float *out = malloc(nq * sizeof(float)), *w = malloc((size_t)H * Lq * Lk * sizeof(float));
    char path[512];
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_status s;
    size_t i;
    int rc = 0;
    opt->num_kv_heads = 1;   /* one K/V head shared by all (MQA): the mask is what differs */
    s = mha_sdpa(1, H, Lq, Lk, 4, 4, q, k, v, opt, out, w, NULL, 0);
    if (s != MHA_OK) { fprintf(stderr, "%s: %s\n", file, mha_status_string(s)); rc = 1; goto done; }
    for (i = 0; i < (size_t)H * Lq * Lk; ++i) if (w[i] == 0.0f) w[i] = NAN;   /* blocked: hatched */
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.heads = H; hm.Lq = Lq; hm.Lk = Lk; hm.title = title;
    st.show_values = 1; st.cell = 40;
    snprintf(path, sizeof path, "%s/%s", dir, file);
    {
        mha_error herr;   /* heatmap.h's refusal: the path and the system's reason */
        if (mha_heatmap_write_png(path, &hm, &st, &herr) != MHA_OK) { fprintf(stderr, "%s\n", herr.message); rc = 1; }
        else printf("%s\n", path);
    }
done:
    free(q); free(k); free(v); free(out); free(w);
    return rc;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : ".";
    mha_options o;
    float sinks[1] = { 1.0f };
    int rc = 0;

    memset(&o, 0, sizeof o);
    o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    rc |= draw(dir, "decode_causal_br.png", "causal, bottom-right: 4 queries after 8 cached keys", 1, 4, 12, &o);

    memset(&o, 0, sizeof o);
    o.causal = 1; o.window = 1; o.window_left = 3; o.window_right = 0;
    rc |= draw(dir, "decode_window.png", "sliding window (left 3, right 0), causal", 1, 12, 12, &o);

    memset(&o, 0, sizeof o);
    o.causal = 1; o.alibi = 1;
    rc |= draw(dir, "decode_alibi.png", "ALiBi, 4 heads (slopes 1/4, 1/16, 1/64, 1/256), causal", 4, 10, 10, &o);

    memset(&o, 0, sizeof o);
    o.causal = 1; o.sinks = sinks;
    rc |= draw(dir, "decode_sinks.png", "sink logit 1.0: each row keeps 1 - sink mass", 1, 8, 8, &o);
    return rc;
}
