/* mha_view.c - attention weights saved by NumPy or PyTorch, drawn as heatmap PNGs.
     make view            (builds build/mha_view)
   or by hand (-I. for mha.h, whose types the companion headers use):
     cc -std=c99 -O2 -I. -isystem /usr/include/stb examples/mha_view.c -o mha_view -lm

   Save the weights from Python:
     _, w = mha(x, x, x, average_attn_weights=False)      # [B, H, L, L]
     numpy.save("attn.npy", w.detach().numpy())
   then:
     mha_view attn.npy --labels tokens.txt --causal

   Input: a .npy of float32 or float64 shaped [Lq, Lk], [H, Lq, Lk] or
   [B, H, Lq, Lk] (one batch entry is drawn, --batch picks which).
   Output, next to the input unless -o says otherwise:
     [Lq, Lk]        PREFIX.png
     [H, Lq, Lk]     PREFIX_head0.png .. PREFIX_head{H-1}.png, PREFIX_grid.png,
                     PREFIX_average.png
   Each path is printed.  A file that cannot be read gets one line on stderr
   saying why, and exit status 1; a wrong command line gets status 2.
   With --ansi nothing is written: each map is printed to the terminal as
   coloured cells (24-bit colour when COLORTERM is truecolor or 24bit, the
   xterm 256-colour palette otherwise), for a look over ssh.
*/
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_NPY_IMPLEMENTATION
#include "npy.h"
#define MHA_HEATMAP_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "heatmap.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Past these a heatmap is no longer readable; they also bound the work. */
#define MHA_VIEW_MAX_TOKENS 4096
#define MHA_VIEW_MAX_HEADS 256
#define MHA_VIEW_MAX_LABEL_FILE (4u << 20)

static const char mha_view_usage[] =
    "usage: mha_view WEIGHTS.npy [options]\n"
    "  WEIGHTS.npy       float32/float64, shape [Lq,Lk], [H,Lq,Lk] or [B,H,Lq,Lk]\n"
    "  -o PREFIX         output path prefix (default: WEIGHTS without .npy)\n"
    "  --labels FILE     tokens, one per line, for queries and keys (self-attention)\n"
    "  --qlabels FILE    query tokens (rows), one per line\n"
    "  --klabels FILE    key tokens (columns), one per line\n"
    "  --cmap NAME       viridis (default), magma, inferno, cividis\n"
    "  --range R         unit (0..1, default), data (min..max), or LO:HI\n"
    "  --batch N         which batch entry of a 4-D array (default 0)\n"
    "  --causal          hatch the cells where the key comes after the query\n"
    "  --zeros-masked    hatch cells whose weight is exactly 0 (what -inf mask entries leave)\n"
    "  --title TEXT      title (default: the file name)\n"
    "  --values          print each weight in its cell\n"
    "  --cell N          pixels per cell (default: automatic)\n"
    "  --ansi            print the maps to the terminal in colour instead of writing PNGs\n"
    "NaN weights are drawn as masked cells.\n";

typedef struct mha_view_labels {
    char *text;        /* the file, lines cut at '\n' */
    const char **line; /* n pointers into text */
    int n;
} mha_view_labels;

static void mha_view_labels_free(mha_view_labels *l)
{
    free(l->text);
    free((void *)l->line);
    memset(l, 0, sizeof *l);
}

/* One label per line; a final newline does not start another label; "\r\n" works. */
static int mha_view_read_labels(const char *path, mha_view_labels *l, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    size_t n = 0, cap = 4096, i;
    int lines = 0, k;
    memset(l, 0, sizeof *l);
    if (!f) { snprintf(err, errlen, "cannot open the labels file: %s", strerror(errno)); return -1; }
    l->text = (char *)malloc(cap + 1);
    while (l->text) {
        size_t got = fread(l->text + n, 1, cap - n, f);
        n += got;
        if (n < cap) break;
        if (cap >= MHA_VIEW_MAX_LABEL_FILE) {
            fclose(f);
            snprintf(err, errlen, "the labels file is larger than %u bytes", MHA_VIEW_MAX_LABEL_FILE);
            mha_view_labels_free(l);
            return -1;
        }
        cap *= 2;
        {
            char *t = (char *)realloc(l->text, cap + 1);
            if (!t) { free(l->text); l->text = NULL; }
            else l->text = t;
        }
    }
    fclose(f);
    if (!l->text) { snprintf(err, errlen, "out of memory reading the labels"); return -1; }
    l->text[n] = 0;
    if (memchr(l->text, 0, n)) {
        snprintf(err, errlen, "the labels file holds a NUL byte: not a text file");
        mha_view_labels_free(l);
        return -1;
    }
    for (i = 0; i < n; ++i) lines += l->text[i] == '\n';
    if (n > 0 && l->text[n - 1] != '\n') ++lines;
    l->line = (const char **)malloc(sizeof(char *) * (size_t)(lines + 1));
    if (!l->line) { mha_view_labels_free(l); snprintf(err, errlen, "out of memory"); return -1; }
    for (i = 0, k = 0; k < lines; ++k) {
        size_t s = i;
        while (i < n && l->text[i] != '\n') ++i;
        if (i > s && l->text[i - 1] == '\r') l->text[i - 1] = 0;
        l->text[i] = 0;
        l->line[k] = l->text + s;
        ++i;
    }
    l->n = lines;
    return 0;
}

static int mha_view_takes_value(const char *o)
{
    static const char *const with_value[] = {"-o", "--labels", "--qlabels", "--klabels", "--title",
                                             "--cmap", "--range", "--batch", "--cell"};
    size_t k;
    for (k = 0; k < sizeof with_value / sizeof with_value[0]; ++k)
        if (!strcmp(o, with_value[k])) return 1;
    return 0;
}

static int mha_view_parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    long v;
    if (!s || !*s) return -1;
    v = strtol(s, &end, 10);
    if (*end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

static int mha_view_save(const char *path, const mha_heatmap *hm, const mha_heatmap_style *st)
{
    mha_error err;
    if (mha_heatmap_write_png(path, hm, st, &err) != MHA_OK) {
        fprintf(stderr, "mha_view: %s\n", err.message);   /* names the path and the reason */
        return 1;
    }
    printf("%s\n", path);
    return 0;
}

/* ---- the terminal view (--ansi) */

/* 24-bit colour when COLORTERM says the terminal has it, else 256 colours. */
static int mha_view_truecolor(const char *colorterm)
{
    return colorterm && (!strcmp(colorterm, "truecolor") || !strcmp(colorterm, "24bit"));
}

/* The xterm 256-colour index nearest rgb: the 6x6x6 cube (16 + 36r + 6g + b,
   channel levels 0, 95, 135, 175, 215, 255) or the grey ramp (232 + k, grey
   8 + 10k), whichever is closer in squared distance. */
static int mha_view_xterm256(const unsigned char rgb[3])
{
    static const int level[6] = {0, 95, 135, 175, 215, 255};
    int c[3], k, d_cube = 0, d_grey = 0, avg, g;
    for (k = 0; k < 3; ++k) {
        int v = rgb[k];
        c[k] = v < 48 ? 0 : v < 115 ? 1 : (v - 35) / 40;
        d_cube += (v - level[c[k]]) * (v - level[c[k]]);
    }
    avg = (rgb[0] + rgb[1] + rgb[2]) / 3;
    g = avg < 8 ? 0 : (avg - 3) / 10;
    if (g > 23) g = 23;
    for (k = 0; k < 3; ++k) d_grey += (rgb[k] - (8 + 10 * g)) * (rgb[k] - (8 + 10 * g));
    return d_grey < d_cube ? 232 + g : 16 + 36 * c[0] + 6 * c[1] + c[2];
}

static void mha_view_ansi_bg(FILE *out, const unsigned char rgb[3], int truecolor)
{
    if (truecolor) fprintf(out, "\033[48;2;%d;%d;%dm", rgb[0], rgb[1], rgb[2]);
    else fprintf(out, "\033[48;5;%dm", mha_view_xterm256(rgb));
}

/* A label byte as printed: control bytes (an escape in a token must not
   drive the terminal) become '?', and so does any non-ASCII byte when the
   label is spelled one byte per line (a cut UTF-8 sequence). */
static char mha_view_label_char(unsigned char c, int ascii_only)
{
    if (c < 0x20 || c == 0x7f || (ascii_only && c >= 0x80)) return '?';
    return (char)c;
}

/* Columns a label takes (UTF-8: continuation bytes take none), cut at
   MHA_HEATMAP_MAX_LABEL bytes. */
static int mha_view_label_width(const char *s)
{
    int w = 0, n = 0;
    for (; s[n] && n < MHA_HEATMAP_MAX_LABEL; ++n) w += ((unsigned char)s[n] & 0xC0) != 0x80;
    return w;
}

#define MHA_VIEW_ANSI_KEY_LINES 8   /* key labels are spelled downwards over at most 8 lines */

/* One map (hm->heads == 1) as text: a title line, the key labels written
   downwards above their columns, one line per query (its label, then one
   cell per key: two spaces on the colour of the weight; masked or NaN
   cells "//" on the PNG's mask grey), and a colour bar with its two ends.
   Returns the exit status: 1, with the reason on stderr, for a map that
   heatmap.h refuses. */
static int mha_view_ansi(FILE *out, const mha_heatmap *hm, const mha_heatmap_style *st, int truecolor)
{
    static const unsigned char masked[3] = {MHA_HEATMAP_MASK_R, MHA_HEATMAP_MASK_G, MHA_HEATMAP_MASK_B};
    float lo, hi;
    int i, j, r, lw = 1, kl = 1;
    char idx[16];
    unsigned char rgb[3];
    mha_error e;
    if (mha_heatmap_value_range(hm, st, &lo, &hi, &e) != MHA_OK) {
        fprintf(stderr, "mha_view: %s\n", e.message);
        return 1;
    }
    for (i = 0; i < hm->Lq; ++i) {
        int w;
        if (hm->q_labels) w = mha_view_label_width(hm->q_labels[i]);
        else w = snprintf(idx, sizeof idx, "%d", i);
        if (w > lw) lw = w;
    }
    for (j = 0; j < hm->Lk; ++j) {
        int n = hm->k_labels ? (int)strlen(hm->k_labels[j]) : snprintf(idx, sizeof idx, "%d", j);
        if (n > kl) kl = n;
    }
    if (kl > MHA_VIEW_ANSI_KEY_LINES) kl = MHA_VIEW_ANSI_KEY_LINES;
    if (hm->title) {
        for (i = 0; hm->title[i] && i < MHA_HEATMAP_MAX_TITLE; ++i)
            fputc(mha_view_label_char((unsigned char)hm->title[i], 0), out);
        fputc('\n', out);
    }
    for (r = 0; r < kl; ++r) {             /* key labels, one character per line */
        fprintf(out, "%*s ", lw, "");
        for (j = 0; j < hm->Lk; ++j) {
            const char *k = idx;
            if (hm->k_labels) k = hm->k_labels[j];
            else snprintf(idx, sizeof idx, "%d", j);
            fputc((int)strlen(k) > r ? mha_view_label_char((unsigned char)k[r], 1) : ' ', out);
            fputc(' ', out);
        }
        fputc('\n', out);
    }
    for (i = 0; i < hm->Lq; ++i) {
        const float *row = hm->weights + (size_t)i * hm->Lk;
        int w;
        if (hm->q_labels) {
            const char *q = hm->q_labels[i];
            int n;
            w = mha_view_label_width(q);
            for (n = 0; q[n] && n < MHA_HEATMAP_MAX_LABEL; ++n) fputc(mha_view_label_char((unsigned char)q[n], 0), out);
        } else {
            w = fprintf(out, "%d", i);
        }
        fprintf(out, "%*s ", lw - w, "");
        for (j = 0; j < hm->Lk; ++j) {
            float v = row[j];
            if ((hm->mask && hm->mask[(size_t)i * hm->Lk + j]) || v != v) {
                mha_view_ansi_bg(out, masked, truecolor);
                fputs("//", out);
            } else {
                mha_heatmap_color(st->cmap, (v - lo) / (hi - lo), rgb);
                mha_view_ansi_bg(out, rgb, truecolor);
                fputs("  ", out);
            }
        }
        fputs("\033[0m\n", out);
    }
    fprintf(out, "%*s %-6.3g ", lw, "", lo);   /* the colour bar: 16 steps from lo to hi */
    for (j = 0; j < 16; ++j) {
        mha_heatmap_color(st->cmap, (float)j / 15.0f, rgb);
        mha_view_ansi_bg(out, rgb, truecolor);
        fputc(' ', out);
    }
    fprintf(out, "\033[0m %.3g\n", hi);
    return 0;
}

/* The viewer as a function, so the tests can call it; returns the exit status. */
static int mha_view_main(int argc, char **argv)
{
    const char *in = NULL, *prefix_arg = NULL, *labels_path = NULL, *q_path = NULL, *k_path = NULL;
    const char *title_arg = NULL;
    int batch = 0, causal = 0, zeros_masked = 0, ansi = 0, i, status = 0;
    int B, H, Lq, Lk, h;
    char err[512], prefix[1024], path[1200], title[512];
    mha_error e;
    mha_heatmap_style st;
    mha_npy a;
    mha_view_labels ql, kl;
    mha_heatmap hm;
    unsigned char *mask = NULL;
    float *avg = NULL;
    const float *w;

    memset(&st, 0, sizeof st);
    memset(&a, 0, sizeof a);
    memset(&ql, 0, sizeof ql);
    memset(&kl, 0, sizeof kl);
    for (i = 1; i < argc; ++i) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = 1;
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) { fputs(mha_view_usage, stdout); return 0; }
        else if (!strcmp(o, "--causal")) { causal = 1; takes = 0; }
        else if (!strcmp(o, "--zeros-masked")) { zeros_masked = 1; takes = 0; }
        else if (!strcmp(o, "--values")) { st.show_values = 1; takes = 0; }
        else if (!strcmp(o, "--ansi")) { ansi = 1; takes = 0; }
        else if (mha_view_takes_value(o) && !v) {
            fprintf(stderr, "mha_view: %s needs a value\n%s", o, mha_view_usage);
            return 2;
        }
        else if (!strcmp(o, "-o")) prefix_arg = v;
        else if (!strcmp(o, "--labels")) labels_path = v;
        else if (!strcmp(o, "--qlabels")) q_path = v;
        else if (!strcmp(o, "--klabels")) k_path = v;
        else if (!strcmp(o, "--title")) title_arg = v;
        else if (!strcmp(o, "--cmap")) {
            int c = mha_heatmap_cmap_parse(v);
            if (c < 0) { fprintf(stderr, "mha_view: unknown colour map '%s' (viridis, magma, inferno, cividis)\n", v); return 2; }
            st.cmap = (mha_heatmap_cmap)c;
        } else if (!strcmp(o, "--range")) {
            float lo, hi;
            char tail;
            if (!strcmp(v, "unit")) st.range = MHA_HEATMAP_RANGE_UNIT;
            else if (!strcmp(v, "data")) st.range = MHA_HEATMAP_RANGE_DATA;
            else if (sscanf(v, "%f:%f%c", &lo, &hi, &tail) == 2 && hi > lo) {
                st.range = MHA_HEATMAP_RANGE_FIXED;
                st.vmin = lo;
                st.vmax = hi;
            } else { fprintf(stderr, "mha_view: --range is unit, data or LO:HI with LO < HI, not '%s'\n", v); return 2; }
        } else if (!strcmp(o, "--batch")) {
            if (mha_view_parse_int(v, 0, 1 << 30, &batch)) { fprintf(stderr, "mha_view: --batch needs a number >= 0\n"); return 2; }
        } else if (!strcmp(o, "--cell")) {
            if (mha_view_parse_int(v, 1, 200, &st.cell)) { fprintf(stderr, "mha_view: --cell needs a number 1..200\n"); return 2; }
        } else if (o[0] == '-' && o[1]) {
            fprintf(stderr, "mha_view: unknown option %s\n%s", o, mha_view_usage);
            return 2;
        } else if (!in) { in = o; takes = 0; }
        else { fprintf(stderr, "mha_view: one input file only (got '%s' and '%s')\n", in, o); return 2; }
        i += takes;
    }
    if (!in) { fputs(mha_view_usage, stderr); return 2; }
    if (labels_path && (q_path || k_path)) {
        fprintf(stderr, "mha_view: --labels sets both axes; use it or --qlabels/--klabels\n");
        return 2;
    }

    /* 1. the array and its shape */
    if (mha_npy_load(in, &a, &e) != MHA_OK) {
        fprintf(stderr, "mha_view: %s: %s\n", in, e.message);
        return 1;
    }
    if (a.ndim < 2 || a.ndim > 4) {
        fprintf(stderr, "mha_view: %s: a %d-dimensional array; expected [Lq,Lk], [H,Lq,Lk] or [B,H,Lq,Lk]\n",
                in, a.ndim);
        status = 1;
        goto done;
    }
    B = a.ndim == 4 ? (int)a.shape[0] : 1;
    H = a.ndim >= 3 ? (int)a.shape[a.ndim - 3] : 1;
    Lq = (int)a.shape[a.ndim - 2];
    Lk = (int)a.shape[a.ndim - 1];
    if (a.shape[a.ndim - 2] > MHA_VIEW_MAX_TOKENS || a.shape[a.ndim - 1] > MHA_VIEW_MAX_TOKENS) {
        fprintf(stderr, "mha_view: %s: a %lu x %lu map is more than %d tokens a side\n", in,
                (unsigned long)a.shape[a.ndim - 2], (unsigned long)a.shape[a.ndim - 1], MHA_VIEW_MAX_TOKENS);
        status = 1;
        goto done;
    }
    if (a.ndim >= 3 && a.shape[a.ndim - 3] > MHA_VIEW_MAX_HEADS) {
        fprintf(stderr, "mha_view: %s: %lu heads is more than %d\n", in, (unsigned long)a.shape[a.ndim - 3],
                MHA_VIEW_MAX_HEADS);
        status = 1;
        goto done;
    }
    if (batch >= B) {
        fprintf(stderr, "mha_view: %s: --batch %d, but the array has %d batch entr%s\n", in, batch, B,
                B == 1 ? "y" : "ies");
        status = 1;
        goto done;
    }

    /* 2. labels: their number must match the axis they label */
    if (labels_path || q_path) {
        const char *p = labels_path ? labels_path : q_path;
        if (mha_view_read_labels(p, &ql, err, sizeof err) != 0) {
            fprintf(stderr, "mha_view: %s: %s\n", p, err);
            status = 1;
            goto done;
        }
        if (ql.n != Lq) {
            fprintf(stderr, "mha_view: %s: %d labels, but the map has %d queries (rows)\n", p, ql.n, Lq);
            status = 1;
            goto done;
        }
    }
    if (labels_path || k_path) {
        const char *p = labels_path ? labels_path : k_path;
        if (mha_view_read_labels(p, &kl, err, sizeof err) != 0) {
            fprintf(stderr, "mha_view: %s: %s\n", p, err);
            status = 1;
            goto done;
        }
        if (kl.n != Lk) {
            fprintf(stderr, "mha_view: %s: %d labels, but the map has %d keys (columns)\n", p, kl.n, Lk);
            status = 1;
            goto done;
        }
    }

    /* 3. names */
    if (prefix_arg) {
        snprintf(prefix, sizeof prefix, "%s", prefix_arg);
    } else {
        size_t n = strlen(in);
        snprintf(prefix, sizeof prefix, "%s", in);
        if (n >= 4 && n < sizeof prefix && !strcmp(in + n - 4, ".npy")) prefix[n - 4] = 0;
    }
    if (title_arg) {
        snprintf(title, sizeof title, "%s", title_arg);
    } else {
        const char *base = strrchr(in, '/');
        base = base ? base + 1 : in;
        if (a.ndim == 4) snprintf(title, sizeof title, "%s, batch %d", base, batch);
        else snprintf(title, sizeof title, "%s", base);
    }

    /* 4. draw */
    w = a.data + (size_t)batch * H * Lq * Lk;
    if (zeros_masked) {
        /* a key blocked with -inf leaves exactly 0 after the softmax; NaN
           is how heatmap.h marks a masked cell of one head */
        size_t k, n = (size_t)H * Lq * Lk;
        for (k = 0; k < n; ++k)
            if (a.data[(size_t)batch * H * Lq * Lk + k] == 0.0f) a.data[(size_t)batch * H * Lq * Lk + k] = (float)NAN;
    }
    if (causal) {
        mask = (unsigned char *)malloc((size_t)Lq * Lk);
        if (!mask) { fprintf(stderr, "mha_view: out of memory\n"); status = 1; goto done; }
        /* PyTorch's causal mask for Lq != Lk is top-left aligned as well */
        mha_heatmap_causal_mask(Lq, Lk, 0, mask, NULL);   /* Lq, Lk >= 1 and mask checked above */
    }
    memset(&hm, 0, sizeof hm);
    hm.Lq = Lq;
    hm.Lk = Lk;
    hm.mask = mask;
    hm.q_labels = ql.n ? ql.line : NULL;
    hm.k_labels = kl.n ? kl.line : NULL;
    hm.heads = 1;
    if (ansi) {   /* the terminal: each head after the other, nothing written */
        int truecolor = mha_view_truecolor(getenv("COLORTERM"));
        char t[600];
        hm.title = t;
        for (h = 0; h < H; ++h) {
            hm.weights = w + (size_t)h * Lq * Lk;
            if (a.ndim == 2) snprintf(t, sizeof t, "%s", title);
            else snprintf(t, sizeof t, "%s, head %d", title, h);
            status |= mha_view_ansi(stdout, &hm, &st, truecolor);
        }
        goto done;
    }
    if (a.ndim == 2) {
        hm.weights = w;
        hm.title = title;
        snprintf(path, sizeof path, "%s.png", prefix);
        status |= mha_view_save(path, &hm, &st);
        goto done;
    }
    {
        char t[600];
        hm.title = t;
        for (h = 0; h < H; ++h) {
            hm.weights = w + (size_t)h * Lq * Lk;
            snprintf(t, sizeof t, "%s, head %d", title, h);
            snprintf(path, sizeof path, "%s_head%d.png", prefix, h);
            status |= mha_view_save(path, &hm, &st);
        }
        hm.weights = w;
        hm.heads = H;
        hm.title = title;
        snprintf(path, sizeof path, "%s_grid.png", prefix);
        status |= mha_view_save(path, &hm, &st);
        avg = (float *)malloc(sizeof(float) * (size_t)Lq * Lk);
        if (!avg) { fprintf(stderr, "mha_view: out of memory\n"); status = 1; goto done; }
        mha_heatmap_average(w, H, Lq, Lk, avg, NULL);   /* sizes >= 1, buffers checked */
        hm.weights = avg;
        hm.heads = 1;
        snprintf(t, sizeof t, "%s, average of %d heads", title, H);
        hm.title = t;
        snprintf(path, sizeof path, "%s_average.png", prefix);
        status |= mha_view_save(path, &hm, &st);
    }
done:
    free(avg);
    free(mask);
    mha_view_labels_free(&ql);
    mha_view_labels_free(&kl);
    mha_npy_free(&a);
    return status;
}

#ifndef MHA_VIEW_NO_MAIN
int main(int argc, char **argv) { return mha_view_main(argc, argv); }
#endif
