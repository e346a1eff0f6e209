/* heatmap.h - attention weights as labelled heatmap images.          v1.0.0

   Draws one attention map, or every head of a layer in a grid, into an RGB
   buffer: one square cell per (query, key), a perceptually uniform colour map,
   query tokens down the left, key tokens along the top, a title per image and
   per head, and a colour bar with its scale.  Masked cells (a causal triangle,
   padding) are hatched grey so they never look like a weight of zero.
   Text comes from stb_easy_font.h, the PNG from stb_image_write.h (both in
   Debian's libstb-dev).  It takes plain float arrays; of mha.h it uses only
   the types mha_status and mha_error, for its errors.

   BUILD
     In exactly one C or C++ file:
         #define MHA_HEATMAP_IMPLEMENTATION
         #define STB_IMAGE_WRITE_IMPLEMENTATION   // unless another file has it
         #include "heatmap.h"
     and compile with -I pointing at the directory that holds mha.h (which
     heatmap.h includes) and the stb headers as system headers, so warnings
     about them do not stop a -Werror build:
         cc -std=c99 -I. -isystem /usr/include/stb -Iexamples prog.c -lm
     The implementation also includes "mha_report.h" (the error helpers
     the companion headers share), which stays next to heatmap.h.
     A program that calls mha.h's functions, mha_status_string among them,
     defines MHA_IMPLEMENTATION in one file as usual.

   USAGE
       // w: [H, Lq, Lk] as a forward writes run.weights with opt.per_head_weights = 1
       const char *tok[] = {"the", "cat", "sat"};
       mha_heatmap hm = {0};
       hm.weights = w;  hm.heads = H;  hm.Lq = 3;  hm.Lk = 3;
       hm.q_labels = tok;  hm.k_labels = tok;  hm.title = "layer 0";
       mha_heatmap_style st = {0};            // zero = viridis, range 0..1, auto size
       mha_error err;
       if (mha_heatmap_write_png("heads.png", &hm, &st, &err) != MHA_OK)
           fprintf(stderr, "%s\n", err.message);   // e.g. the path and the system's reason

       // or into memory: the layout first, then the pixels
       mha_heatmap_layout lay;
       if (mha_heatmap_measure(&hm, &st, &lay, &err) == MHA_OK) {
           unsigned char *rgb = malloc((size_t)lay.width * lay.height * 3);
           mha_heatmap_render(&hm, &st, rgb, lay.width, lay.height, &err);
       }

   ERRORS (mha.h's convention)
     Every call that can fail returns an mha_status and takes an mha_error
     last (NULL allowed), filled on a refusal: status, function
     ("mha_heatmap_measure"), field (the argument or struct field refused:
     "hm->Lq", "style->cmap", "width", "path") and a message
     "mha_heatmap_measure: hm->Lq: what was expected, what was found".
       MHA_ERR_NULL_POINTER     a NULL map, weights, output or path
       MHA_ERR_INVALID_SIZE     a size <= 0 (Lq, Lk, heads < 0, an image side)
       MHA_ERR_BAD_ENUM         style->cmap or style->range outside its enum
       MHA_ERR_INVALID_ARGUMENT style->cell or style->cols < 0; a render
                                buffer whose size is not the measured one
       MHA_ERR_OVERFLOW         the image would exceed MHA_HEATMAP_MAX_SIDE
                                pixels a side
       MHA_ERR_OUT_OF_MEMORY    the allocator returned NULL
       MHA_ERR_IO               the PNG cannot be written: the message has the
                                path and the operating system's reason
     On a refusal nothing is written to the caller's outputs (layout, rgb,
     width, height, out, mask, lo, hi); a PNG whose writing fails half-way
     is left as far as it got (the path might not name a file of ours to
     delete: a device, a pipe).
     The colour lookups, the panel and cell geometry and the text helpers
     cannot fail and return their value (the text helpers draw or measure
     nothing for NULL text).

   DATA CONVENTIONS
     weights[(h * Lq + i) * Lk + j] is head h, query i (a row), key j (a column).
     A cell is drawn as MASKED (hatched grey) when mask[i * Lk + j] is nonzero
     (one [Lq, Lk] mask shared by every head) or when its weight is NaN, so a
     per-head mask can be expressed by writing NaN into those cells.
     +-Inf are clamped to the ends of the colour range.

   LAYOUTS
     heads == 1   one map with axis captions ("keys" on top, "queries" left)
     heads  > 1   a grid of maps, one title per head ("head 0".. or your own),
                  one shared colour range and colour bar.
     The head average is mha_heatmap_average() followed by a one-head render.

   CONFIGURATION (define before the implementation include)
     MHA_HEATMAP_STATIC        make every function static
     MHA_HEATMAP_NO_PNG        leave out the PNG writers and stb_image_write.h
     MHA_HEATMAP_MALLOC(sz) / MHA_HEATMAP_FREE(p)   allocator (both or neither)

   LICENSE  MIT or public domain, as mha.h.
*/
#ifndef MHA_HEATMAP_H
#define MHA_HEATMAP_H

#include <stddef.h>
#include "mha.h"

#ifndef MHA_HEATMAP_DEF
#ifdef MHA_HEATMAP_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define MHA_HEATMAP_DEF static __attribute__((unused))
#else
#define MHA_HEATMAP_DEF static
#endif
#else
#define MHA_HEATMAP_DEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Largest image side in pixels: bounds every allocation the renderer makes. */
#define MHA_HEATMAP_MAX_SIDE 16384
/* Labels longer than this many characters are cut and end in "..". */
#define MHA_HEATMAP_MAX_LABEL 16
/* Titles likewise (the image title and each head's). */
#define MHA_HEATMAP_MAX_TITLE 100

/* Perceptually uniform colour maps (matplotlib's, sampled at 33 points and
   interpolated linearly; within 2/255 of the originals, cividis 6/255). */
typedef enum mha_heatmap_cmap {
    MHA_HEATMAP_VIRIDIS = 0,   /* dark blue -> green -> yellow (the default) */
    MHA_HEATMAP_MAGMA,         /* black -> purple -> orange -> pale yellow */
    MHA_HEATMAP_INFERNO,       /* black -> purple -> orange -> bright yellow */
    MHA_HEATMAP_CIVIDIS,       /* blue -> yellow, readable with colour-vision deficiency */
    MHA_HEATMAP_CMAP_COUNT
} mha_heatmap_cmap;

typedef enum mha_heatmap_range {
    MHA_HEATMAP_RANGE_UNIT = 0,  /* 0..1, what a softmax row holds (the default) */
    MHA_HEATMAP_RANGE_DATA,      /* min..max of the unmasked, finite weights */
    MHA_HEATMAP_RANGE_FIXED      /* style.vmin..style.vmax */
} mha_heatmap_range;

/* How to draw.  All-zero is the default: viridis, 0..1, automatic cell size. */
typedef struct mha_heatmap_style {
    mha_heatmap_cmap  cmap;
    mha_heatmap_range range;
    float vmin, vmax;      /* RANGE_FIXED only */
    int   cell;            /* pixels per cell side; 0 = automatic (map about 640x480, 4..40) */
    int   cols;            /* panels per grid row; 0 = automatic */
    int   show_values;     /* nonzero: print each weight in its cell where it fits */
    int   no_colorbar;     /* nonzero: leave the colour bar out */
} mha_heatmap_style;

/* What to draw.  Pointers are borrowed. */
typedef struct mha_heatmap {
    const float *weights;               /* [heads, Lq, Lk], row-major */
    int heads;                          /* 0 counts as 1 */
    int Lq, Lk;                         /* queries (rows), keys (columns) */
    const unsigned char *mask;          /* NULL or [Lq, Lk]: nonzero = masked cell */
    const char *const *q_labels;        /* NULL (indices) or Lq strings, down the left */
    const char *const *k_labels;        /* NULL (indices) or Lk strings, along the top */
    const char *title;                  /* NULL or one line above everything */
    const char *const *head_titles;     /* NULL ("head 0", ...) or heads strings */
} mha_heatmap;

typedef struct mha_heatmap_rect { int x, y, w, h; } mha_heatmap_rect;

/* Where everything goes; filled by mha_heatmap_measure. */
typedef struct mha_heatmap_layout {
    int width, height;             /* the image, pixels */
    int cell;                      /* pixels per cell side */
    int cols, rows;                /* panel grid (1 x 1 for one head) */
    int label_scale;               /* stb_easy_font pixel scale of the token labels */
    int label_step;                /* every label_step-th token is labelled (1 = all) */
    int rotated_keys;              /* key labels run bottom-to-top */
    float vmin, vmax;              /* the colour range in use */
    mha_heatmap_rect title;        /* the image title (h = 0 without one) */
    mha_heatmap_rect colorbar;     /* the gradient itself (w = 0 when hidden) */
    mha_heatmap_rect legend;       /* the hatched "masked" swatch (w = 0 when nothing is masked) */
    /* panel 0; panel p sits at column p % cols, row p / cols, moved by
       (column * panel_dx, row * panel_dy).  mha_heatmap_panel() does it. */
    mha_heatmap_rect cells;        /* the Lk*cell x Lq*cell map */
    mha_heatmap_rect head_title;   /* h = 0 for one head */
    mha_heatmap_rect q_labels;     /* right-aligned against the map's left edge */
    mha_heatmap_rect k_labels;     /* against the map's top edge */
    int panel_dx, panel_dy;
} mha_heatmap_layout;

/* The masked-cell colours: light grey crossed by darker diagonal lines. */
#define MHA_HEATMAP_MASK_R 222
#define MHA_HEATMAP_MASK_G 222
#define MHA_HEATMAP_MASK_B 222
#define MHA_HEATMAP_HATCH_R 150
#define MHA_HEATMAP_HATCH_G 150
#define MHA_HEATMAP_HATCH_B 150

/* The colour of t in [0, 1] (clamped; NaN gives the mask colour; an
   unknown cmap is viridis). */
MHA_HEATMAP_DEF void mha_heatmap_color(mha_heatmap_cmap cmap, float t, unsigned char rgb[3]);
/* "viridis", "magma", ... and back; parse returns -1 for an unknown name. */
MHA_HEATMAP_DEF const char *mha_heatmap_cmap_name(mha_heatmap_cmap cmap);
MHA_HEATMAP_DEF int mha_heatmap_cmap_parse(const char *name);

/* The values that the two ends of the colour map stand for under st->range
   (the colour bar's scale): what a renderer of its own, a terminal one for
   instance, needs to colour the cells as the PNG does.  st may be NULL
   (the defaults); hm is checked as mha_heatmap_measure checks it. */
MHA_HEATMAP_DEF mha_status mha_heatmap_value_range(const mha_heatmap *hm, const mha_heatmap_style *st,
                                                   float *lo, float *hi, mha_error *err);

/* out[i*Lk + j] = mean over h of w[(h*Lq + i)*Lk + j]; a NaN stays NaN (masked). */
MHA_HEATMAP_DEF mha_status mha_heatmap_average(const float *w, int heads, int Lq, int Lk, float *out,
                                               mha_error *err);
/* mask[i*Lk + j] = 1 where key j is after query i (j > i + Lk - Lq when
   bottom_right, else j > i): the cells a causal model never looks at. */
MHA_HEATMAP_DEF mha_status mha_heatmap_causal_mask(int Lq, int Lk, int bottom_right, unsigned char *mask,
                                                   mha_error *err);

/* Compute the layout (and so the image size) without drawing. */
MHA_HEATMAP_DEF mha_status mha_heatmap_measure(const mha_heatmap *hm, const mha_heatmap_style *style,
                                               mha_heatmap_layout *layout, mha_error *err);
/* The parts of a panel, for mha_heatmap_panel. */
typedef enum mha_heatmap_part {
    MHA_HEATMAP_CELLS = 0,     /* the map */
    MHA_HEATMAP_HEAD_TITLE,    /* "head 3" above it (h = 0 for one head) */
    MHA_HEATMAP_Q_LABELS,      /* query tokens, left of the map */
    MHA_HEATMAP_K_LABELS       /* key tokens, above the map */
} mha_heatmap_part;
/* Where part `part` of panel `head` is; all zero for an unknown head or part. */
MHA_HEATMAP_DEF mha_heatmap_rect mha_heatmap_panel(const mha_heatmap_layout *layout, int head,
                                                   mha_heatmap_part part);
/* The pixel rectangle of cell (query i, key j) of panel `head`. */
MHA_HEATMAP_DEF mha_heatmap_rect mha_heatmap_cell(const mha_heatmap_layout *layout, int head,
                                                  int i, int j);
/* Draw into rgb [height][width][3]; width and height must be the measured ones. */
MHA_HEATMAP_DEF mha_status mha_heatmap_render(const mha_heatmap *hm, const mha_heatmap_style *style,
                                              unsigned char *rgb, int width, int height, mha_error *err);
/* Measure, allocate (MHA_HEATMAP_MALLOC) and render into *rgb; free it with
   MHA_HEATMAP_FREE (free() by default).  width, height: NULL, or they get
   the image's size. */
MHA_HEATMAP_DEF mha_status mha_heatmap_draw(const mha_heatmap *hm, const mha_heatmap_style *style,
                                            unsigned char **rgb, int *width, int *height, mha_error *err);
/* Draw text into an RGB image with stb_easy_font: (x, y) is the top-left of
   the text, each font pixel becomes scale x scale; rotated = reads bottom to
   top with (x, y) the bottom-left.  Handy for composing several maps. */
MHA_HEATMAP_DEF void mha_heatmap_text(unsigned char *rgb, int width, int height, int x, int y,
                                      const char *text, int scale, int rotated,
                                      const unsigned char color[3]);
/* Width in pixels of text at scale (unrotated). Height is 9 * scale (7 above the baseline). */
MHA_HEATMAP_DEF int mha_heatmap_text_width(const char *text, int scale);

#ifndef MHA_HEATMAP_NO_PNG
/* Render and write a PNG. */
MHA_HEATMAP_DEF mha_status mha_heatmap_write_png(const char *path, const mha_heatmap *hm,
                                                 const mha_heatmap_style *style, mha_error *err);
/* Write any RGB buffer, at most MHA_HEATMAP_MAX_SIDE pixels a side, as a
   PNG (stb_image_write's encoder). */
MHA_HEATMAP_DEF mha_status mha_heatmap_write_rgb_png(const char *path, const unsigned char *rgb,
                                                     int width, int height, mha_error *err);
#endif

#ifdef __cplusplus
}
#endif
#endif /* MHA_HEATMAP_H */

/* ======================================================================== */
/*                              IMPLEMENTATION                              */
/* ======================================================================== */
#ifdef MHA_HEATMAP_IMPLEMENTATION
#ifndef MHA_HEATMAP_IMPLEMENTATION_DONE
#define MHA_HEATMAP_IMPLEMENTATION_DONE

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "mha_report.h"
#include "stb_easy_font.h"
#ifndef MHA_HEATMAP_NO_PNG
#include "stb_image_write.h"
#endif

#if defined(MHA_HEATMAP_MALLOC) != defined(MHA_HEATMAP_FREE)
#error "heatmap.h: define both MHA_HEATMAP_MALLOC and MHA_HEATMAP_FREE, or neither"
#endif
#ifndef MHA_HEATMAP_MALLOC
#include <stdlib.h>
#define MHA_HEATMAP_MALLOC(sz) malloc(sz)
#define MHA_HEATMAP_FREE(p) free(p)
#endif

#ifdef __cplusplus
#define MHA_HM__CAST(T, x) static_cast<T>(x)
#else
#define MHA_HM__CAST(T, x) ((T)(x))
#endif

/* Refusals, in mha.h's convention (mha_report.h): inside, every function
   takes a non-NULL mha_error (the public call lends its own when the
   caller passed NULL) and returns 0 or -1; the check that refuses first
   is the one reported, and the public call signs the message with its
   name: "mha_heatmap_measure: hm->Lq: ...". */

/* ---------------------------------------------------------------- colour */

/* 33 evenly spaced samples (t = k/32) of each map, 8-bit sRGB. */
static const unsigned char mha_hm__lut[MHA_HEATMAP_CMAP_COUNT][33][3] = {
    { /* viridis */
        { 68,  1, 84}, { 71, 13, 96}, { 72, 24,106}, { 72, 35,116}, { 71, 45,123},
        { 69, 55,129}, { 66, 64,134}, { 62, 73,137}, { 59, 82,139}, { 55, 91,141},
        { 51, 99,141}, { 47,107,142}, { 44,114,142}, { 41,122,142}, { 38,130,142},
        { 35,137,142}, { 33,145,140}, { 31,151,139}, { 31,159,136}, { 33,166,133},
        { 39,173,129}, { 49,181,123}, { 61,188,116}, { 76,194,108}, { 92,200, 99},
        {110,206, 88}, {129,211, 77}, {149,216, 64}, {170,220, 50}, {192,223, 37},
        {213,226, 26}, {234,229, 26}, {253,231, 37} },
    { /* magma */
        {  0,  0,  4}, {  3,  3, 18}, { 10,  8, 34}, { 19, 13, 52}, { 29, 17, 71},
        { 41, 17, 90}, { 54, 16,107}, { 68, 15,118}, { 81, 18,124}, { 93, 23,127},
        {106, 28,129}, {118, 33,129}, {131, 38,129}, {144, 42,129}, {156, 46,127},
        {170, 51,125}, {183, 55,121}, {194, 59,117}, {207, 64,112}, {219, 71,106},
        {229, 80,100}, {238, 91, 94}, {244,105, 92}, {249,120, 93}, {251,135, 97},
        {253,150,104}, {254,165,113}, {254,180,123}, {254,194,135}, {254,209,148},
        {253,224,161}, {252,238,176}, {252,253,191} },
    { /* inferno */
        {  0,  0,  4}, {  4,  3, 18}, { 11,  7, 36}, { 21, 11, 55}, { 33, 12, 74},
        { 47, 10, 91}, { 61,  9,101}, { 74, 12,107}, { 87, 16,110}, {100, 21,110},
        {113, 25,110}, {125, 30,109}, {138, 34,106}, {151, 39,102}, {163, 44, 97},
        {176, 49, 91}, {188, 55, 84}, {198, 61, 77}, {208, 69, 69}, {218, 78, 60},
        {227, 89, 51}, {235,100, 41}, {241,113, 31}, {246,126, 20}, {249,140, 10},
        {251,155,  6}, {252,170, 15}, {251,186, 31}, {249,201, 50}, {245,217, 73},
        {242,232,101}, {243,245,134}, {252,255,164} },
    { /* cividis */
        {  0, 34, 78}, {  0, 40, 91}, {  0, 46,106}, {  5, 51,113}, { 26, 56,111},
        { 39, 62,110}, { 50, 67,109}, { 59, 73,108}, { 67, 78,108}, { 75, 84,108},
        { 83, 90,109}, { 90, 95,110}, { 97,101,111}, {104,106,113}, {111,112,115},
        {118,118,118}, {125,124,120}, {131,129,121}, {139,135,120}, {146,141,120},
        {154,147,118}, {162,153,117}, {170,160,115}, {179,166,112}, {187,173,109},
        {195,179,105}, {204,186,100}, {212,193, 95}, {221,200, 88}, {230,208, 81},
        {239,215, 72}, {248,223, 60}, {254,232, 56} }
};

static const char *const mha_hm__cmap_names[MHA_HEATMAP_CMAP_COUNT] = {
    "viridis", "magma", "inferno", "cividis"
};

MHA_HEATMAP_DEF const char *mha_heatmap_cmap_name(mha_heatmap_cmap cmap)
{
    if ((int)cmap < 0 || cmap >= MHA_HEATMAP_CMAP_COUNT) return "unknown";
    return mha_hm__cmap_names[cmap];
}

MHA_HEATMAP_DEF int mha_heatmap_cmap_parse(const char *name)
{
    int k;
    if (!name) return -1;
    for (k = 0; k < MHA_HEATMAP_CMAP_COUNT; ++k)
        if (strcmp(name, mha_hm__cmap_names[k]) == 0) return k;
    return -1;
}

MHA_HEATMAP_DEF void mha_heatmap_color(mha_heatmap_cmap cmap, float t, unsigned char rgb[3])
{
    const unsigned char (*lut)[3];
    float x, f;
    int k, c;
    if ((int)cmap < 0 || cmap >= MHA_HEATMAP_CMAP_COUNT) cmap = MHA_HEATMAP_VIRIDIS;
    if (t != t) {  /* NaN: masked */
        rgb[0] = MHA_HEATMAP_MASK_R; rgb[1] = MHA_HEATMAP_MASK_G; rgb[2] = MHA_HEATMAP_MASK_B;
        return;
    }
    lut = mha_hm__lut[cmap];
    if (t < 0) t = 0;
    if (t > 1) t = 1;
    /* colour(t) = lerp(lut[k], lut[k+1], f) with t*32 = k + f */
    x = t * 32.0f;
    k = (int)x;
    if (k > 31) k = 31;
    f = x - (float)k;
    for (c = 0; c < 3; ++c) {
        float v = (float)lut[k][c] + f * ((float)lut[k + 1][c] - (float)lut[k][c]);
        rgb[c] = MHA_HM__CAST(unsigned char, (int)(v + 0.5f));
    }
}

MHA_HEATMAP_DEF mha_status mha_heatmap_average(const float *w, int heads, int Lq, int Lk, float *out,
                                               mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    size_t n, i;
    int h;
    if (mha_report__need(e, "w", w) || mha_report__need(e, "out", out) || mha_report__size(e, "heads", heads) ||
        mha_report__size(e, "Lq", Lq) || mha_report__size(e, "Lk", Lk))
        return mha_report__end(e, "mha_heatmap_average");
    /* out_ij = (1/heads) sum_h w_hij, summed in double: the mean of many
       heads stays exact to float rounding */
    n = (size_t)Lq * (size_t)Lk;
    for (i = 0; i < n; ++i) {
        double s = 0;
        for (h = 0; h < heads; ++h) s += (double)w[(size_t)h * n + i];
        out[i] = (float)(s / heads);
    }
    return MHA_OK;
}

MHA_HEATMAP_DEF mha_status mha_heatmap_causal_mask(int Lq, int Lk, int bottom_right, unsigned char *mask,
                                                   mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    int i, j, shift = bottom_right ? Lk - Lq : 0;
    if (mha_report__size(e, "Lq", Lq) || mha_report__size(e, "Lk", Lk) || mha_report__need(e, "mask", mask))
        return mha_report__end(e, "mha_heatmap_causal_mask");
    for (i = 0; i < Lq; ++i)
        for (j = 0; j < Lk; ++j) mask[(size_t)i * Lk + j] = (unsigned char)(j > i + shift);
    return MHA_OK;
}

/* ---------------------------------------------------------------- pixels */

typedef struct mha_hm__img {
    unsigned char *p;
    int w, h;
} mha_hm__img;

static void mha_hm__fill(mha_hm__img *im, int x0, int y0, int x1, int y1, const unsigned char c[3])
{
    int x, y;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > im->w) x1 = im->w;
    if (y1 > im->h) y1 = im->h;
    for (y = y0; y < y1; ++y) {
        unsigned char *row = im->p + ((size_t)y * im->w + x0) * 3;
        for (x = x0; x < x1; ++x, row += 3) { row[0] = c[0]; row[1] = c[1]; row[2] = c[2]; }
    }
}

/* A 1-pixel frame just outside the rectangle. */
static void mha_hm__frame(mha_hm__img *im, mha_heatmap_rect r, const unsigned char c[3])
{
    mha_hm__fill(im, r.x - 1, r.y - 1, r.x + r.w + 1, r.y, c);
    mha_hm__fill(im, r.x - 1, r.y + r.h, r.x + r.w + 1, r.y + r.h + 1, c);
    mha_hm__fill(im, r.x - 1, r.y, r.x, r.y + r.h, c);
    mha_hm__fill(im, r.x + r.w, r.y, r.x + r.w + 1, r.y + r.h, c);
}

/* Hatching in image coordinates, so neighbouring masked cells join into one
   pattern: a line wherever (x + y) falls on a multiple of the period. */
static void mha_hm__hatch(mha_hm__img *im, int x0, int y0, int x1, int y1, int period)
{
    static const unsigned char bg[3] = {MHA_HEATMAP_MASK_R, MHA_HEATMAP_MASK_G, MHA_HEATMAP_MASK_B};
    static const unsigned char ln[3] = {MHA_HEATMAP_HATCH_R, MHA_HEATMAP_HATCH_G, MHA_HEATMAP_HATCH_B};
    int x, y;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > im->w) x1 = im->w;
    if (y1 > im->h) y1 = im->h;
    for (y = y0; y < y1; ++y)
        for (x = x0; x < x1; ++x) {
            const unsigned char *c = ((x + y) % period == 0) ? ln : bg;
            unsigned char *px = im->p + ((size_t)y * im->w + x) * 3;
            px[0] = c[0]; px[1] = c[1]; px[2] = c[2];
        }
}

/* ---------------------------------------------------------------- text */

/* stb_easy_font builds each glyph from axis-aligned quads in a 1-unit grid
   (capitals 7 units high, descenders to 9).  We ask it for one character at
   a time, so its vertex buffer stays small, and fill each quad scaled. */
static int mha_hm__char_ok(int c) { return c >= 32 && c < 127; }
/* Anything else is drawn as '?': the font has printable ASCII only. */

/* The right edge of a glyph's ink, in font units (its advance adds spacing). */
static int mha_hm__ink_right(int c)
{
    float vb[64 * 16];
    char one[2];
    int n, k, right = 0;
    one[0] = (char)c; one[1] = 0;
    n = stb_easy_font_print(0, 0, one, NULL, vb, (int)sizeof vb);
    for (k = 0; k < 4 * n; ++k)
        if ((int)vb[4 * k] > right) right = (int)vb[4 * k];
    return right;
}

MHA_HEATMAP_DEF int mha_heatmap_text_width(const char *text, int scale)
{
    int w = 0, last = 0;
    if (!text) return 0;
    for (; *text; ++text) {
        int c = (unsigned char)*text;
        if (c >= 0x80 && c < 0xC0) continue; /* UTF-8 continuation: one '?' per character */
        if (!mha_hm__char_ok(c)) c = '?';
        w += stb_easy_font_charinfo[c - 32].advance & 15;
        last = c;
    }
    if (!last) return 0;
    /* all advances but the last, then the last glyph's own ink */
    w -= stb_easy_font_charinfo[last - 32].advance & 15;
    w += last == ' ' ? 0 : mha_hm__ink_right(last);
    return w * scale;
}

MHA_HEATMAP_DEF void mha_heatmap_text(unsigned char *rgb, int width, int height, int x, int y,
                                      const char *text, int scale, int rotated,
                                      const unsigned char color[3])
{
    float vb[64 * 16]; /* 64 quads of 4 vertices x (x, y, z, rgba); one glyph needs < 20 */
    mha_hm__img im;
    int pen = 0;
    im.p = rgb; im.w = width; im.h = height;
    if (!rgb || !text || scale <= 0) return;
    for (; *text; ++text) {
        char one[2];
        int c = (unsigned char)*text, n, q;
        if (c >= 0x80 && c < 0xC0) continue; /* UTF-8 continuation: one '?' per character */
        if (!mha_hm__char_ok(c)) c = '?';
        one[0] = (char)c; one[1] = 0;
        n = stb_easy_font_print(0, 0, one, NULL, vb, (int)sizeof vb);
        for (q = 0; q < n; ++q) {
            const float *v = vb + q * 16;  /* 4 vertices, 4 floats apart */
            float ux0 = v[0], uy0 = v[1], ux1 = v[0], uy1 = v[1];
            int k;
            for (k = 1; k < 4; ++k) {
                if (v[4 * k] < ux0) ux0 = v[4 * k];
                if (v[4 * k] > ux1) ux1 = v[4 * k];
                if (v[4 * k + 1] < uy0) uy0 = v[4 * k + 1];
                if (v[4 * k + 1] > uy1) uy1 = v[4 * k + 1];
            }
            if (!rotated) {
                mha_hm__fill(&im, x + (pen + (int)ux0) * scale, y + (int)uy0 * scale,
                             x + (pen + (int)ux1) * scale, y + (int)uy1 * scale, color);
            } else {
                /* turn 90 degrees counter-clockwise: along the text is up,
                   the glyph's top faces left.  (x, y) is the bottom-left. */
                mha_hm__fill(&im, x + (int)uy0 * scale, y - (pen + (int)ux1) * scale,
                             x + (int)uy1 * scale, y - (pen + (int)ux0) * scale, color);
            }
        }
        pen += stb_easy_font_charinfo[c - 32].advance & 15;
    }
}

/* Copy a label, cut to MHA_HEATMAP_MAX_LABEL characters ending in "..". */
static void mha_hm__label(char *dst, const char *const *labels, int i)
{
    const char *s = labels ? labels[i] : NULL;
    size_t n;
    if (!s) { sprintf(dst, "%d", i); return; }
    n = strlen(s);
    if (n <= MHA_HEATMAP_MAX_LABEL) { memcpy(dst, s, n + 1); return; }
    memcpy(dst, s, MHA_HEATMAP_MAX_LABEL - 2);
    memcpy(dst + MHA_HEATMAP_MAX_LABEL - 2, "..", 3);
}

static int mha_hm__max_label_width(const char *const *labels, int n, int scale)
{
    char buf[MHA_HEATMAP_MAX_LABEL + 24];
    int i, w = 0;
    for (i = 0; i < n; ++i) {
        int t;
        mha_hm__label(buf, labels, i);
        t = mha_heatmap_text_width(buf, scale);
        if (t > w) w = t;
    }
    return w;
}

/* ---------------------------------------------------------------- scale */

/* Tick step: 1, 2, 2.5 or 5 times a power of ten, at most max_ticks intervals. */
static double mha_hm__tick_step(double range, int max_ticks)
{
    double raw = range / (max_ticks > 1 ? max_ticks : 1), mag, norm;
    if (!(raw > 0)) return 1;
    mag = pow(10.0, floor(log10(raw)));
    norm = raw / mag;
    if (norm <= 1) return mag;
    if (norm <= 2) return 2 * mag;
    if (norm <= 2.5) return 2.5 * mag;
    if (norm <= 5) return 5 * mag;
    return 10 * mag;
}

/* Fewest decimals that print every multiple of step exactly. */
static int mha_hm__decimals(double step)
{
    int d;
    for (d = 0; d < 6; ++d) {
        double s = step * pow(10.0, d);
        if (fabs(s - floor(s + 0.5)) < 1e-6 * s) return d;
    }
    return 6;
}

static void mha_hm__tick_text(char *buf, double v, int decimals)
{
    if (fabs(v) < 1e-12) v = 0;  /* never "-0.0" */
    sprintf(buf, "%.*f", decimals, v);
}

/* ---------------------------------------------------------------- layout */

static const char mha_hm__cap_keys[] = "keys";
static const char mha_hm__cap_queries[] = "queries";

enum {
    MHA_HM__MARGIN = 16,      /* image border */
    MHA_HM__GAP = 6,          /* labels to map */
    MHA_HM__PANEL_GAP_X = 28, /* between grid panels */
    MHA_HM__PANEL_GAP_Y = 20,
    MHA_HM__TITLE_SCALE = 3,  /* the image title */
    MHA_HM__HEAD_SCALE = 2,   /* head titles, colour bar */
    MHA_HM__BAR_W = 18,
    MHA_HM__BAR_GAP = 24,
    MHA_HM__TICK = 5,
    MHA_HM__FONT_H = 9        /* glyph box height in font units */
};

/* The colour bar's ticks: multiples of *step from *first up to vmax, at most
   one per 3 lines of text and never more than 8 intervals. */
static void mha_hm__ticks(float vmin, float vmax, int bar_h, double *first, double *step, int *dec)
{
    int n = bar_h / (MHA_HM__FONT_H * 2 * 3);
    if (n > 8) n = 8;
    if (n < 2) n = 2;
    *step = mha_hm__tick_step((double)vmax - vmin, n);
    *dec = mha_hm__decimals(*step);
    *first = ceil(vmin / *step - 1e-9) * *step;
}

static int mha_hm__heads(const mha_heatmap *hm) { return hm->heads > 0 ? hm->heads : 1; }

/* Copy a title into buf (MHA_HEATMAP_MAX_TITLE + 1 bytes), cut with "..". */
static void mha_hm__title(char *buf, const char *t)
{
    size_t n = strlen(t);
    if (n <= MHA_HEATMAP_MAX_TITLE) { memcpy(buf, t, n + 1); return; }
    memcpy(buf, t, MHA_HEATMAP_MAX_TITLE - 2);
    memcpy(buf + MHA_HEATMAP_MAX_TITLE - 2, "..", 3);
}

static void mha_hm__head_title(char *buf, const mha_heatmap *hm, int h)
{
    const char *t = hm->head_titles ? hm->head_titles[h] : NULL;
    if (t) mha_hm__title(buf, t);
    else sprintf(buf, "head %d", h);
}

/* Is any cell masked, by the mask or by a NaN? */
static int mha_hm__any_masked(const mha_heatmap *hm)
{
    size_t n = (size_t)hm->Lq * hm->Lk, i, total = n * (size_t)mha_hm__heads(hm);
    if (hm->mask)
        for (i = 0; i < n; ++i)
            if (hm->mask[i]) return 1;
    for (i = 0; i < total; ++i)
        if (hm->weights[i] != hm->weights[i]) return 1;
    return 0;
}

static void mha_hm__range(const mha_heatmap *hm, const mha_heatmap_style *st, float *lo, float *hi)
{
    float a = 0, b = 1;
    if (st->range == MHA_HEATMAP_RANGE_FIXED) {
        a = st->vmin; b = st->vmax;
    } else if (st->range == MHA_HEATMAP_RANGE_DATA) {
        size_t n = (size_t)hm->Lq * hm->Lk, i;
        int h, any = 0;
        for (h = 0; h < mha_hm__heads(hm); ++h)
            for (i = 0; i < n; ++i) {
                float v = hm->weights[(size_t)h * n + i];
                if ((hm->mask && hm->mask[i]) || v != v || v - v != 0) continue; /* masked, NaN, Inf */
                if (!any || v < a) a = v;
                if (!any || v > b) b = v;
                any = 1;
            }
        if (!any) { a = 0; b = 1; }
    }
    if (!(a == a) || !(b == b) || a - a != 0 || b - b != 0) { a = 0; b = 1; }
    if (!(b > a)) b = a + 1;  /* a constant map: one colour, a valid scale */
    *lo = a; *hi = b;
}

/* NULL style: the defaults (all zero). */
static const mha_heatmap_style mha_hm__default_style = {MHA_HEATMAP_VIRIDIS, MHA_HEATMAP_RANGE_UNIT, 0, 0, 0, 0,
                                                        0, 0};

/* What every drawing call checks of the map and its style: pointers, sizes,
   enums, and the limits that keep the image inside MHA_HEATMAP_MAX_SIDE. */
static int mha_hm__check(const mha_heatmap *hm, const mha_heatmap_style *st, mha_error *e)
{
    if (mha_report__need(e, "hm", hm) || mha_report__need(e, "hm->weights", hm->weights) ||
        mha_report__size(e, "hm->Lq", hm->Lq) || mha_report__size(e, "hm->Lk", hm->Lk))
        return -1;
    if (hm->heads < 0)
        return mha_report__fail(e, MHA_ERR_INVALID_SIZE, "hm->heads", "is %d; expected >= 0 (0 counts as 1)",
                                hm->heads);
    if ((int)st->cmap < 0 || st->cmap >= MHA_HEATMAP_CMAP_COUNT)
        return mha_report__fail(e, MHA_ERR_BAD_ENUM, "style->cmap", "is %d; expected 0..%d (MHA_HEATMAP_VIRIDIS.."
                                "MHA_HEATMAP_CIVIDIS)", (int)st->cmap, MHA_HEATMAP_CMAP_COUNT - 1);
    if ((int)st->range < 0 || st->range > MHA_HEATMAP_RANGE_FIXED)
        return mha_report__fail(e, MHA_ERR_BAD_ENUM, "style->range", "is %d; expected 0..%d (MHA_HEATMAP_RANGE_UNIT.."
                                "MHA_HEATMAP_RANGE_FIXED)", (int)st->range, (int)MHA_HEATMAP_RANGE_FIXED);
    if (st->cell < 0)
        return mha_report__fail(e, MHA_ERR_INVALID_ARGUMENT, "style->cell", "is %d; expected >= 0 (0 = automatic)",
                                st->cell);
    if (st->cols < 0)
        return mha_report__fail(e, MHA_ERR_INVALID_ARGUMENT, "style->cols", "is %d; expected >= 0 (0 = automatic)",
                                st->cols);
    if (hm->Lq > MHA_HEATMAP_MAX_SIDE || hm->Lk > MHA_HEATMAP_MAX_SIDE)
        return mha_report__fail(e, MHA_ERR_OVERFLOW, hm->Lq > MHA_HEATMAP_MAX_SIDE ? "hm->Lq" : "hm->Lk",
                                "is %d; a map of more than %d tokens a side does not fit an image of at most %d "
                                "pixels a side", hm->Lq > MHA_HEATMAP_MAX_SIDE ? hm->Lq : hm->Lk,
                                MHA_HEATMAP_MAX_SIDE, MHA_HEATMAP_MAX_SIDE);
    if (hm->heads > 4096)
        return mha_report__fail(e, MHA_ERR_OVERFLOW, "hm->heads", "is %d; at most 4096 panels are drawn", hm->heads);
    return 0;
}

MHA_HEATMAP_DEF mha_status mha_heatmap_value_range(const mha_heatmap *hm, const mha_heatmap_style *st,
                                                   float *lo, float *hi, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (!st) st = &mha_hm__default_style;
    if (mha_report__need(e, "lo", lo) == 0 && mha_report__need(e, "hi", hi) == 0 && mha_hm__check(hm, st, e) == 0)
        mha_hm__range(hm, st, lo, hi);
    return mha_report__end(e, "mha_heatmap_value_range");
}

/* The layout into L (the caller's local: filled only here). */
static int mha_hm__measure(const mha_heatmap *hm, const mha_heatmap_style *st, mha_heatmap_layout *L,
                           mha_error *e)
{
    int H, cell, s, text_h, qw, kw, kh, cap_top = 0, cap_left = 0, head_h = 0, head_w = 0, h;
    int title_w = 0, title_h = 0, grid_w, grid_h, cells_w, cells_h, panel_w, panel_h, x_cells, y_cells;
    int bar_right = 0, bottom;
    char buf[MHA_HEATMAP_MAX_TITLE + 32];

    if (mha_hm__check(hm, st, e)) return -1;
    memset(L, 0, sizeof *L);
    H = mha_hm__heads(hm);

    /* 1. cell size: the map fits about 640 x 480 pixels (400 x 320 in a
          grid), 4..40 pixels a cell */
    if (st->cell > 0) {
        cell = st->cell;
    } else {
        int grid = hm->heads > 1, cw = (grid ? 400 : 640) / hm->Lk, ch = (grid ? 320 : 480) / hm->Lq;
        cell = cw < ch ? cw : ch;
        if (cell > 40) cell = 40;
        /* printed values need room: up to 24 tokens get full-size cells */
        if (st->show_values && hm->Lq <= 24 && hm->Lk <= 24) cell = 40;
        if (cell < 4) cell = 4;
    }
    if (cell > MHA_HEATMAP_MAX_SIDE)
        return mha_report__fail(e, MHA_ERR_OVERFLOW, "style->cell", "is %d; at most %d pixels (MHA_HEATMAP_MAX_SIDE)",
                                cell, MHA_HEATMAP_MAX_SIDE);
    L->cell = cell;

    /* 2. labels: twice the font size when a row is tall enough, and only
          every step-th token when rows are too thin for one line of text */
    s = cell >= 18 ? 2 : 1;
    text_h = MHA_HM__FONT_H * s;
    L->label_scale = s;
    L->label_step = (text_h + 2 + cell - 1) / cell;
    qw = mha_hm__max_label_width(hm->q_labels, hm->Lq, s);
    kw = mha_hm__max_label_width(hm->k_labels, hm->Lk, s);
    L->rotated_keys = kw > cell - 4;
    kh = L->rotated_keys ? kw : text_h;

    /* 3. one panel: [head title] [caption] key labels / query labels | cells */
    if (H == 1) {
        cap_top = text_h + 6;
        cap_left = text_h + 12;
    } else {
        for (h = 0; h < H; ++h) {
            int t;
            mha_hm__head_title(buf, hm, h);
            t = mha_heatmap_text_width(buf, MHA_HM__HEAD_SCALE);
            if (t > head_w) head_w = t;
        }
        head_h = MHA_HM__FONT_H * MHA_HM__HEAD_SCALE + 8;
    }
    if ((size_t)hm->Lk * cell > MHA_HEATMAP_MAX_SIDE || (size_t)hm->Lq * cell > MHA_HEATMAP_MAX_SIDE) {
        int wide = (size_t)hm->Lk * cell > MHA_HEATMAP_MAX_SIDE;
        return mha_report__fail(e, MHA_ERR_OVERFLOW, wide ? "hm->Lk" : "hm->Lq",
                                "%d %s x %d-pixel cells is %lu pixels; an image has at most %d a side",
                                wide ? hm->Lk : hm->Lq, wide ? "keys" : "queries", cell,
                                (unsigned long)(wide ? hm->Lk : hm->Lq) * (unsigned long)cell, MHA_HEATMAP_MAX_SIDE);
    }
    cells_w = hm->Lk * cell;
    cells_h = hm->Lq * cell;
    x_cells = cap_left + qw + MHA_HM__GAP;
    y_cells = head_h + cap_top + kh + MHA_HM__GAP;
    panel_w = x_cells + cells_w;
    if (panel_w < head_w) panel_w = head_w;
    panel_h = y_cells + cells_h;

    /* 4. the grid of panels */
    if (st->cols > 0) {
        L->cols = st->cols < H ? st->cols : H;
    } else {
        /* the column count whose grid is closest to 4:3, each empty slot
           counting as much as a 28% stretch: square maps go 2x2, 4x2, 4x3,
           wide cross-attention maps stack in one column */
        double best = 1e30;
        int c;
        for (c = 1; c <= H; ++c) {
            int rows = (H + c - 1) / c;
            double aspect = (double)(c * panel_w) / (double)(rows * panel_h);
            double score = fabs(log(aspect / (4.0 / 3.0))) + 0.25 * (c * rows - H);
            if (score < best) { best = score; L->cols = c; }
        }
    }
    L->rows = (H + L->cols - 1) / L->cols;
    L->panel_dx = panel_w + MHA_HM__PANEL_GAP_X;
    L->panel_dy = panel_h + MHA_HM__PANEL_GAP_Y;
    grid_w = L->cols * panel_w + (L->cols - 1) * MHA_HM__PANEL_GAP_X;
    grid_h = L->rows * panel_h + (L->rows - 1) * MHA_HM__PANEL_GAP_Y;
    /* every later loop over the weights is bounded by the image size:
       at least 4 x 4 pixels a cell */
    if (grid_w > MHA_HEATMAP_MAX_SIDE || grid_h > MHA_HEATMAP_MAX_SIDE)
        return mha_report__fail(e, MHA_ERR_OVERFLOW, "hm->heads", "%d panels in a %d x %d grid take %d x %d pixels; "
                                "an image has at most %d a side", H, L->cols, L->rows, grid_w, grid_h,
                                MHA_HEATMAP_MAX_SIDE);
    mha_hm__range(hm, st, &L->vmin, &L->vmax);

    /* 5. title, then everything placed from the top-left */
    if (hm->title && hm->title[0]) {
        mha_hm__title(buf, hm->title);
        title_w = mha_heatmap_text_width(buf, MHA_HM__TITLE_SCALE);
        title_h = MHA_HM__FONT_H * MHA_HM__TITLE_SCALE;
        L->title.x = MHA_HM__MARGIN;
        L->title.y = MHA_HM__MARGIN;
        L->title.w = title_w;
        L->title.h = title_h;
        title_h += 18;
    }
    {
        int ox = MHA_HM__MARGIN, oy = MHA_HM__MARGIN + title_h;
        L->cells.x = ox + x_cells;
        L->cells.y = oy + y_cells;
        L->cells.w = cells_w;
        L->cells.h = cells_h;
        L->q_labels.x = ox + cap_left;
        L->q_labels.y = L->cells.y;
        L->q_labels.w = qw;
        L->q_labels.h = cells_h;
        L->k_labels.x = L->cells.x;
        L->k_labels.y = L->cells.y - MHA_HM__GAP - kh;
        L->k_labels.w = cells_w;
        L->k_labels.h = kh;
        if (H > 1) {
            L->head_title.x = ox;
            L->head_title.y = oy;
            L->head_title.w = head_w;
            L->head_title.h = MHA_HM__FONT_H * MHA_HM__HEAD_SCALE;
        }
        bottom = oy + grid_h;
        bar_right = ox + grid_w;
    }

    /* 6. the colour bar beside the grid, from the first row's map top to the
          last row's map bottom, at least 120 pixels */
    if (!st->no_colorbar) {
        int bh = (L->rows - 1) * L->panel_dy + cells_h, tw, k, dec, bar_s = MHA_HM__HEAD_SCALE;
        double step, v, first;
        if (bh < 120) bh = 120;
        L->colorbar.x = bar_right + MHA_HM__BAR_GAP;
        L->colorbar.y = L->cells.y;
        L->colorbar.w = MHA_HM__BAR_W;
        L->colorbar.h = bh;
        mha_hm__ticks(L->vmin, L->vmax, bh, &first, &step, &dec);
        tw = 0;
        for (k = 0, v = first; v <= L->vmax + step * 1e-9 && k < 64;
             ++k, v += step) {
            int t;
            mha_hm__tick_text(buf, v, dec);
            t = mha_heatmap_text_width(buf, bar_s);
            if (t > tw) tw = t;
        }
        bar_right = L->colorbar.x + MHA_HM__BAR_W + MHA_HM__TICK + 4 + tw;
        if (L->colorbar.y + bh > bottom) bottom = L->colorbar.y + bh;
        if (mha_hm__any_masked(hm)) {
            L->legend.x = L->colorbar.x;
            L->legend.y = L->colorbar.y + bh + 18;
            L->legend.w = MHA_HM__BAR_W;
            L->legend.h = MHA_HM__BAR_W;
            tw = L->legend.x + MHA_HM__BAR_W + 6 + mha_heatmap_text_width("masked", 2);
            if (tw > bar_right) bar_right = tw;
            if (L->legend.y + L->legend.h > bottom) bottom = L->legend.y + L->legend.h;
        }
    } else if (mha_hm__any_masked(hm)) {
        /* no bar: the legend goes under the grid */
        L->legend.x = MHA_HM__MARGIN;
        L->legend.y = bottom + 14;
        L->legend.w = MHA_HM__BAR_W;
        L->legend.h = MHA_HM__BAR_W;
        bottom = L->legend.y + L->legend.h;
    }
    L->width = bar_right + MHA_HM__MARGIN;
    if (L->width < title_w + 2 * MHA_HM__MARGIN) L->width = title_w + 2 * MHA_HM__MARGIN;
    L->height = bottom + MHA_HM__MARGIN;
    if (L->width > MHA_HEATMAP_MAX_SIDE || L->height > MHA_HEATMAP_MAX_SIDE)
        return mha_report__fail(e, MHA_ERR_OVERFLOW, "hm", "the image would be %d x %d pixels; at most %d a side",
                                L->width, L->height, MHA_HEATMAP_MAX_SIDE);
    return 0;
}

MHA_HEATMAP_DEF mha_status mha_heatmap_measure(const mha_heatmap *hm, const mha_heatmap_style *style,
                                               mha_heatmap_layout *layout, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    mha_heatmap_layout L;
    if (mha_report__need(e, "layout", layout) == 0 &&
        mha_hm__measure(hm, style ? style : &mha_hm__default_style, &L, e) == 0)
        *layout = L;
    return mha_report__end(e, "mha_heatmap_measure");
}

MHA_HEATMAP_DEF mha_heatmap_rect mha_heatmap_panel(const mha_heatmap_layout *L, int head,
                                                   mha_heatmap_part part)
{
    mha_heatmap_rect r = {0, 0, 0, 0};
    int c, row;
    if (!L || head < 0 || L->cols <= 0 || head >= L->cols * L->rows) return r;
    switch (part) {
    case MHA_HEATMAP_CELLS: r = L->cells; break;
    case MHA_HEATMAP_HEAD_TITLE: r = L->head_title; break;
    case MHA_HEATMAP_Q_LABELS: r = L->q_labels; break;
    case MHA_HEATMAP_K_LABELS: r = L->k_labels; break;
    default: return r;
    }
    c = head % L->cols;
    row = head / L->cols;
    r.x += c * L->panel_dx;
    r.y += row * L->panel_dy;
    return r;
}

MHA_HEATMAP_DEF mha_heatmap_rect mha_heatmap_cell(const mha_heatmap_layout *L, int head, int i, int j)
{
    mha_heatmap_rect r = mha_heatmap_panel(L, head, MHA_HEATMAP_CELLS);
    r.x += j * L->cell;
    r.y += i * L->cell;
    r.w = L->cell;
    r.h = L->cell;
    return r;
}

/* ---------------------------------------------------------------- render */

static const unsigned char mha_hm__ink[3] = {34, 34, 34};     /* text */
static const unsigned char mha_hm__soft[3] = {110, 110, 110}; /* captions */
static const unsigned char mha_hm__line[3] = {90, 90, 90};    /* frames, ticks */

static void mha_hm__panel(mha_hm__img *im, const mha_heatmap *hm, const mha_heatmap_style *st,
                          const mha_heatmap_layout *L, int h)
{
    mha_heatmap_rect cells = mha_heatmap_panel(L, h, MHA_HEATMAP_CELLS);
    mha_heatmap_rect ql = mha_heatmap_panel(L, h, MHA_HEATMAP_Q_LABELS);
    mha_heatmap_rect kl = mha_heatmap_panel(L, h, MHA_HEATMAP_K_LABELS);
    const float *w = hm->weights + (size_t)h * hm->Lq * hm->Lk;
    int s = L->label_scale, cell = L->cell, i, j, text_h = MHA_HM__FONT_H * L->label_scale;
    float span = L->vmax - L->vmin;
    char buf[MHA_HEATMAP_MAX_TITLE + 32]; /* labels, values, head titles */

    /* the cells: colour(t), t = (w - vmin) / (vmax - vmin) */
    for (i = 0; i < hm->Lq; ++i)
        for (j = 0; j < hm->Lk; ++j) {
            float v = w[(size_t)i * hm->Lk + j];
            int x0 = cells.x + j * cell, y0 = cells.y + i * cell;
            unsigned char c[3];
            if ((hm->mask && hm->mask[(size_t)i * hm->Lk + j]) || v != v) {
                mha_hm__hatch(im, x0, y0, x0 + cell, y0 + cell, cell >= 12 ? 6 : 3);
                continue;
            }
            mha_heatmap_color(st->cmap, (v - L->vmin) / span, c);
            mha_hm__fill(im, x0, y0, x0 + cell, y0 + cell, c);
            if (st->show_values) {
                /* ".42": the leading zero dropped so it fits small cells;
                   twice the size when that fits too */
                int tw, vs;
                unsigned char ink[3];
                sprintf(buf, "%.2f", (double)v);
                if (buf[0] == '0' && buf[1] == '.') memmove(buf, buf + 1, strlen(buf));
                if (strcmp(buf, "1.00") == 0) strcpy(buf, "1");
                if (strcmp(buf, ".00") == 0 && v == 0) strcpy(buf, "0");
                vs = mha_heatmap_text_width(buf, 2) + 10 <= cell && 14 + 10 <= cell ? 2 : 1;
                tw = mha_heatmap_text_width(buf, vs);
                if (tw + 2 <= cell && 7 * vs + 2 <= cell) {
                    /* dark text on light cells, light on dark (Rec. 709 luma) */
                    int luma = (2126 * c[0] + 7152 * c[1] + 722 * c[2]) / 10000;
                    ink[0] = ink[1] = ink[2] = MHA_HM__CAST(unsigned char, luma > 128 ? 20 : 240);
                    mha_heatmap_text(im->p, im->w, im->h, x0 + (cell - tw) / 2,
                                     y0 + (cell - 7 * vs) / 2, buf, vs, 0, ink);
                }
            }
        }
    mha_hm__frame(im, cells, mha_hm__line);

    /* query labels, right-aligned, centred on their row */
    for (i = 0; i < hm->Lq; i += L->label_step) {
        int tw;
        mha_hm__label(buf, hm->q_labels, i);
        tw = mha_heatmap_text_width(buf, s);
        mha_heatmap_text(im->p, im->w, im->h, ql.x + ql.w - tw,
                         cells.y + i * cell + (cell - 7 * s) / 2, buf, s, 0, mha_hm__ink);
    }
    /* key labels: bottom-to-top from just above the map, or level when they fit */
    for (j = 0; j < hm->Lk; j += L->label_step) {
        int tw;
        mha_hm__label(buf, hm->k_labels, j);
        tw = mha_heatmap_text_width(buf, s);
        if (L->rotated_keys)
            mha_heatmap_text(im->p, im->w, im->h, cells.x + j * cell + (cell - 7 * s) / 2,
                             kl.y + kl.h, buf, s, 1, mha_hm__ink);
        else
            mha_heatmap_text(im->p, im->w, im->h, cells.x + j * cell + (cell - tw) / 2,
                             kl.y + kl.h - 7 * s, buf, s, 0, mha_hm__ink);
    }
    /* head title, or the axis captions of a single map */
    if (mha_hm__heads(hm) > 1) {
        mha_heatmap_rect ht = mha_heatmap_panel(L, h, MHA_HEATMAP_HEAD_TITLE);
        mha_hm__head_title(buf, hm, h);
        mha_heatmap_text(im->p, im->w, im->h, ht.x, ht.y, buf, MHA_HM__HEAD_SCALE, 0, mha_hm__ink);
    } else {
        int tw = mha_heatmap_text_width(mha_hm__cap_keys, s);
        mha_heatmap_text(im->p, im->w, im->h, cells.x + (cells.w - tw) / 2,
                         kl.y - 6 - text_h, mha_hm__cap_keys, s, 0, mha_hm__soft);
        tw = mha_heatmap_text_width(mha_hm__cap_queries, s);
        mha_heatmap_text(im->p, im->w, im->h, ql.x - 12 - text_h,
                         cells.y + (cells.h + tw) / 2, mha_hm__cap_queries, s, 1, mha_hm__soft);
    }
}

/* Measure again, check the buffer against the layout, draw. */
static int mha_hm__render(const mha_heatmap *hm, const mha_heatmap_style *st, unsigned char *rgb, int width,
                          int height, mha_error *e)
{
    static const unsigned char white[3] = {255, 255, 255};
    mha_heatmap_layout L;
    mha_hm__img im;
    int h;
    char title[MHA_HEATMAP_MAX_TITLE + 1];

    if (mha_report__need(e, "rgb", rgb) || mha_hm__measure(hm, st, &L, e)) return -1;
    if (width != L.width || height != L.height)
        return mha_report__fail(e, MHA_ERR_INVALID_ARGUMENT, width != L.width ? "width" : "height",
                                "is %d; mha_heatmap_measure gives %d x %d for this map and style",
                                width != L.width ? width : height, L.width, L.height);
    im.p = rgb; im.w = width; im.h = height;
    mha_hm__fill(&im, 0, 0, width, height, white);

    if (L.title.h) {
        mha_hm__title(title, hm->title);
        mha_heatmap_text(rgb, width, height, L.title.x, L.title.y, title, MHA_HM__TITLE_SCALE, 0,
                         mha_hm__ink);
    }
    for (h = 0; h < mha_hm__heads(hm); ++h) mha_hm__panel(&im, hm, st, &L, h);

    if (L.colorbar.w) {
        /* the gradient: top row is vmax, bottom row vmin */
        mha_heatmap_rect b = L.colorbar;
        int y, k, dec, bar_s = MHA_HM__HEAD_SCALE;
        double step, v, first;
        char buf[64];
        for (y = 0; y < b.h; ++y) {
            unsigned char c[3];
            mha_heatmap_color(st->cmap, 1.0f - (float)y / (float)(b.h - 1), c);
            mha_hm__fill(&im, b.x, b.y + y, b.x + b.w, b.y + y + 1, c);
        }
        mha_hm__frame(&im, b, mha_hm__line);
        mha_hm__ticks(L.vmin, L.vmax, b.h, &first, &step, &dec);
        for (k = 0, v = first; v <= L.vmax + step * 1e-9 && k < 64;
             ++k, v += step) {
            /* the row whose colour is v */
            int ty = b.y + (int)floor((1.0 - (v - L.vmin) / ((double)L.vmax - L.vmin)) * (b.h - 1) + 0.5);
            mha_hm__fill(&im, b.x + b.w, ty, b.x + b.w + MHA_HM__TICK, ty + 1, mha_hm__line);
            mha_hm__tick_text(buf, v, dec);
            mha_heatmap_text(rgb, width, height, b.x + b.w + MHA_HM__TICK + 4, ty - (7 * bar_s) / 2,
                             buf, bar_s, 0, mha_hm__ink);
        }
    }
    if (L.legend.w) {
        mha_heatmap_rect g = L.legend;
        mha_hm__hatch(&im, g.x, g.y, g.x + g.w, g.y + g.h, 6);
        mha_hm__frame(&im, g, mha_hm__line);
        mha_heatmap_text(rgb, width, height, g.x + g.w + 6, g.y + (g.h - 14) / 2, "masked", 2, 0,
                         mha_hm__ink);
    }
    return 0;
}

MHA_HEATMAP_DEF mha_status mha_heatmap_render(const mha_heatmap *hm, const mha_heatmap_style *style,
                                              unsigned char *rgb, int width, int height, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    mha_hm__render(hm, style ? style : &mha_hm__default_style, rgb, width, height, e);
    return mha_report__end(e, "mha_heatmap_render");
}

/* Measure, allocate, render: *rgb and the size only when all went well. */
static int mha_hm__draw(const mha_heatmap *hm, const mha_heatmap_style *st, unsigned char **rgb, int *width,
                        int *height, mha_error *e)
{
    mha_heatmap_layout L;
    unsigned char *p;
    if (mha_report__need(e, "rgb", rgb) || mha_hm__measure(hm, st, &L, e)) return -1;
    p = MHA_HM__CAST(unsigned char *, MHA_HEATMAP_MALLOC((size_t)L.width * L.height * 3));
    if (!p)
        return mha_report__fail(e, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory for a %d x %d image", L.width,
                                L.height);
    if (mha_hm__render(hm, st, p, L.width, L.height, e)) {
        MHA_HEATMAP_FREE(p);
        return -1;
    }
    *rgb = p;
    if (width) *width = L.width;
    if (height) *height = L.height;
    return 0;
}

MHA_HEATMAP_DEF mha_status mha_heatmap_draw(const mha_heatmap *hm, const mha_heatmap_style *style,
                                            unsigned char **rgb, int *width, int *height, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    mha_hm__draw(hm, style ? style : &mha_hm__default_style, rgb, width, height, e);
    return mha_report__end(e, "mha_heatmap_draw");
}

#ifndef MHA_HEATMAP_NO_PNG
/* The PNG goes through our own FILE, so that a failure of the system (no
   such directory, no permission, a full disk) is told with its reason. */
typedef struct mha_hm__sink {
    FILE *fp;
    int why;   /* errno of the first failed write, -1 for a failure without one */
} mha_hm__sink;

static void mha_hm__put(void *ctx, void *data, int size)
{
    mha_hm__sink *k = MHA_HM__CAST(mha_hm__sink *, ctx);
    if (k->why || size <= 0) return;
    errno = 0;
    if (fwrite(data, 1, (size_t)size, k->fp) != (size_t)size) k->why = errno ? errno : -1;
}

static int mha_hm__write_rgb_png(const char *path, const unsigned char *rgb, int width, int height, mha_error *e)
{
    mha_hm__sink k;
    const char *dots, *shown;
    int encoded;
    if (mha_report__need(e, "path", path) || mha_report__need(e, "rgb", rgb) ||
        mha_report__size(e, "width", width) || mha_report__size(e, "height", height))
        return -1;
    /* stb_image_write counts the PNG's bytes in int: a side of at most
       MHA_HEATMAP_MAX_SIDE keeps (3 width + 1) height far below INT_MAX */
    if (width > MHA_HEATMAP_MAX_SIDE || height > MHA_HEATMAP_MAX_SIDE)
        return mha_report__fail(e, MHA_ERR_OVERFLOW, width > MHA_HEATMAP_MAX_SIDE ? "width" : "height",
                                "is %d; at most %d pixels (MHA_HEATMAP_MAX_SIDE)",
                                width > MHA_HEATMAP_MAX_SIDE ? width : height, MHA_HEATMAP_MAX_SIDE);
    errno = 0;
    k.fp = fopen(path, "wb");
    if (!k.fp) return mha_report__io(e, "cannot create", path, errno, "fopen failed");
    k.why = 0;
    encoded = stbi_write_png_to_func(mha_hm__put, &k, width, height, 3, rgb, width * 3);
    errno = 0;
    if (fclose(k.fp) != 0 && !k.why) k.why = errno ? errno : -1;
    if (encoded && !k.why) return 0;
    /* what was written stays: path may name something that is not ours to
       delete (a device, a pipe) */
    if (!encoded) {
        shown = mha_report__tail(path, &dots);
        return mha_report__fail(e, MHA_ERR_OUT_OF_MEMORY, NULL, "stb_image_write could not encode the %d x %d "
                                "PNG for '%s%s' (out of memory)", width, height, dots, shown);
    }
    return mha_report__io(e, "cannot write", path, k.why, "the write failed");
}

MHA_HEATMAP_DEF mha_status mha_heatmap_write_rgb_png(const char *path, const unsigned char *rgb, int width,
                                                     int height, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    mha_hm__write_rgb_png(path, rgb, width, height, e);
    return mha_report__end(e, "mha_heatmap_write_rgb_png");
}

MHA_HEATMAP_DEF mha_status mha_heatmap_write_png(const char *path, const mha_heatmap *hm,
                                                 const mha_heatmap_style *style, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    unsigned char *rgb = NULL;
    int w = 0, h = 0;
    if (mha_report__need(e, "path", path) == 0 &&
        mha_hm__draw(hm, style ? style : &mha_hm__default_style, &rgb, &w, &h, e) == 0) {
        mha_hm__write_rgb_png(path, rgb, w, h, e);
        MHA_HEATMAP_FREE(rgb);
    }
    return mha_report__end(e, "mha_heatmap_write_png");
}
#endif

#endif /* MHA_HEATMAP_IMPLEMENTATION_DONE */
#endif /* MHA_HEATMAP_IMPLEMENTATION */
