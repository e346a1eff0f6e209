/* test_demo_heads.c - the heads of examples/attention_heatmaps.c do the jobs
   their titles claim (self, previous word, local window, first word), under
   every kernel configuration mha.h is built with, so `make demo` pictures
   never quietly turn into noise. */
#define ATTENTION_HEATMAPS_NO_MAIN
#include "../examples/attention_heatmaps.c"
#include "testutil.h"

static int argmax(const float *row, int n)
{
    int j, best = 0;
    for (j = 1; j < n; ++j)
        if (row[j] > row[best]) best = j;
    return best;
}

static void check_heads(const float *w, int L, int causal)
{
    const char *kind = causal ? "causal" : "bidirectional";
    int i, j;
    for (i = 0; i < L; ++i) {
        const float *self = w + (0 * L + i) * L, *prev = w + (1 * L + i) * L;
        const float *win = w + (2 * L + i) * L, *first = w + (3 * L + i) * L;
        double near = 0, sum = 0;
        CHECK(argmax(self, L) == i, "%s self head: row %d looks at %d", kind, i, argmax(self, L));
        CHECK(self[i] > 0.5f, "%s self head: row %d keeps only %.2f on itself", kind, i, self[i]);
        if (i > 0) {
            CHECK(argmax(prev, L) == i - 1, "%s previous head: row %d looks at %d", kind, i, argmax(prev, L));
            CHECK(prev[i - 1] > 0.5f, "%s previous head: row %d gives %.2f to word %d", kind, i, prev[i - 1], i - 1);
        }
        CHECK(argmax(first, L) == 0 && first[0] > 0.5f, "%s first head: row %d looks at %d (%.2f on word 0)", kind,
              i, argmax(first, L), first[0]);
        /* the window: widest of the four, centred on the word, mostly within 2 */
        for (j = 0; j < L; ++j) {
            sum += win[j];
            if (j >= i - 2 && j <= i + 2) near += win[j];
        }
        CHECK(fabs(sum - 1.0) < 1e-5, "%s window head: row %d sums to %.6f", kind, i, sum);
        CHECK(near > 0.85 * sum, "%s window head: row %d has %.2f within two words", kind, i, near);
        CHECK(argmax(win, L) == i || (causal && argmax(win, L) >= i - 1),
              "%s window head: row %d peaks at %d", kind, i, argmax(win, L));
        if (!causal && i >= 2 && i < L - 2)
            CHECK(win[i] < 0.5f && win[i - 1] > 0.1f && win[i + 1] > 0.1f,
                  "window head: row %d is not spread (%.2f %.2f %.2f)", i, win[i - 1], win[i], win[i + 1]);
        if (causal)
            for (j = i + 1; j < L; ++j) {
                int h;
                for (h = 0; h < H; ++h)
                    CHECK(w[(h * L + i) * L + j] == 0.0f, "causal: head %d row %d sees word %d", h, i, j);
            }
    }
}

int main(void)
{
    static float x[MAXL * E], out[MAXL * E], w[H * MAXL * MAXL];
    static char words[256];
    const char *tok[MAXL];
    mha_module m;
    mha_options opt;
    mha_run run;
    mha_error err;
    int L = build_demo(words, tok, x, &m);

    CHECK(L == 12 && strcmp(tok[0], "the") == 0 && strcmp(tok[11], "soft") == 0, "12 words, got %d", L);
    memset(&opt, 0, sizeof opt);
    memset(&run, 0, sizeof run);
    opt.per_head_weights = 1;
    run.weights = w;
    CHECK(mha_module_forward(&m, 1, L, L, x, x, x, &opt, out, &run, &err) == MHA_OK, "forward: %s",
          err.message);
    check_heads(w, L, 0);
    opt.causal = 1;
    CHECK(mha_module_forward(&m, 1, L, L, x, x, x, &opt, out, &run, &err) == MHA_OK, "causal forward: %s",
          err.message);
    check_heads(w, L, 1);
    return tu_finish("test_demo_heads");
}
