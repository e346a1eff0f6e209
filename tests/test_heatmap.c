/* test_heatmap.c - examples/heatmap.h checked pixel by pixel: the cells, the
   labels, the colour bar, the masked triangle, the grid, and a PNG that
   comes back through stb_image.h with the size and pixels it went out with;
   every refusal with its status, field and message, outputs untouched, and
   a PNG that cannot be written named with the path and the system's reason.
   Built without MHA_IMPLEMENTATION: heatmap.h needs only mha.h's types. */
#define MHA_HEATMAP_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "../examples/heatmap.h"
#define STB_IMAGE_IMPLEMENTATION
#include "stb_image.h"
#include "testutil.h"
#include "errcheck.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef struct { unsigned char *p; int w, h; } image;

static image draw(const mha_heatmap *hm, const mha_heatmap_style *st, mha_heatmap_layout *lay)
{
    image im = {NULL, 0, 0};
    mha_error err;
    mha_status r = mha_heatmap_measure(hm, st, lay, &err);
    CHECK(r == MHA_OK, "measure: %s", err.message);
    if (r != MHA_OK) return im;
    im.w = lay->width;
    im.h = lay->height;
    im.p = (unsigned char *)malloc((size_t)im.w * im.h * 3);
    r = mha_heatmap_render(hm, st, im.p, im.w, im.h, &err);
    CHECK(r == MHA_OK && err.status == MHA_OK && err.message[0] == 0, "render: %s", err.message);
    return im;
}

static const unsigned char *px(const image *im, int x, int y) { return im->p + ((size_t)y * im->w + x) * 3; }
static int same(const unsigned char *a, const unsigned char *b) { return a[0] == b[0] && a[1] == b[1] && a[2] == b[2]; }
static int is_mask(const unsigned char *c)
{
    return (c[0] == MHA_HEATMAP_MASK_R && c[1] == MHA_HEATMAP_MASK_G && c[2] == MHA_HEATMAP_MASK_B) ||
           (c[0] == MHA_HEATMAP_HATCH_R && c[1] == MHA_HEATMAP_HATCH_G && c[2] == MHA_HEATMAP_HATCH_B);
}
static int is_white(const unsigned char *c) { return c[0] == 255 && c[1] == 255 && c[2] == 255; }
/* bounding box of every non-white pixel (x1 < x0 when there is none) */
static void ink_box(const image *im, int *x0, int *x1, int *y0, int *y1)
{
    int x, y;
    *x0 = im->w; *x1 = -1; *y0 = im->h; *y1 = -1;
    for (y = 0; y < im->h; ++y)
        for (x = 0; x < im->w; ++x)
            if (!is_white(px(im, x, y))) {
                if (x < *x0) *x0 = x;
                if (x > *x1) *x1 = x;
                if (y < *y0) *y0 = y;
                if (y > *y1) *y1 = y;
            }
}
/* text ink is dark grey; nothing else the renderer draws on white is that dark and neutral */
static int is_ink(const unsigned char *c) { return c[0] < 128 && c[0] == c[1] && c[1] == c[2]; }

/* every pixel of r has colour c */
static int rect_is(const image *im, mha_heatmap_rect r, const unsigned char c[3])
{
    int x, y;
    for (y = r.y; y < r.y + r.h; ++y)
        for (x = r.x; x < r.x + r.w; ++x)
            if (!same(px(im, x, y), c)) return 0;
    return 1;
}
static int count_ink(const image *im, int x0, int y0, int x1, int y1)
{
    int x, y, n = 0;
    for (y = y0; y < y1; ++y)
        for (x = x0; x < x1; ++x)
            if (x >= 0 && y >= 0 && x < im->w && y < im->h && is_ink(px(im, x, y))) ++n;
    return n;
}
static int inside(mha_heatmap_rect r, int x, int y) { return x >= r.x && x < r.x + r.w && y >= r.y && y < r.y + r.h; }

static void test_colormaps(void)
{
    /* matplotlib's own entries at t = 25/255, 94/255, 230/255: points between
       our samples, so they test the interpolation, not the table */
    static const struct { mha_heatmap_cmap c; int i; unsigned char rgb[3]; } ref[] = {
        {MHA_HEATMAP_VIRIDIS, 25, {72, 36, 117}}, {MHA_HEATMAP_VIRIDIS, 94, {45, 113, 142}},
        {MHA_HEATMAP_VIRIDIS, 230, {189, 223, 38}}, {MHA_HEATMAP_MAGMA, 25, {20, 14, 54}},
        {MHA_HEATMAP_MAGMA, 94, {128, 37, 130}}, {MHA_HEATMAP_MAGMA, 230, {254, 207, 146}},
        {MHA_HEATMAP_INFERNO, 25, {22, 11, 57}}, {MHA_HEATMAP_INFERNO, 94, {135, 33, 107}},
        {MHA_HEATMAP_INFERNO, 230, {246, 215, 70}}, {MHA_HEATMAP_CIVIDIS, 25, {8, 51, 112}},
        {MHA_HEATMAP_CIVIDIS, 94, {95, 99, 111}}, {MHA_HEATMAP_CIVIDIS, 230, {229, 207, 82}},
    };
    unsigned char c[3], lo[3], hi[3];
    size_t k;
    int m, i;
    for (k = 0; k < sizeof ref / sizeof ref[0]; ++k) {
        int ch, worst = 0;
        mha_heatmap_color(ref[k].c, (float)ref[k].i / 255.0f, c);
        for (ch = 0; ch < 3; ++ch) {
            int d = abs((int)c[ch] - (int)ref[k].rgb[ch]);
            if (d > worst) worst = d;
        }
        CHECK(worst <= 3, "%s at %d/255: (%d,%d,%d), matplotlib (%d,%d,%d)",
              mha_heatmap_cmap_name(ref[k].c), ref[k].i, c[0], c[1], c[2], ref[k].rgb[0],
              ref[k].rgb[1], ref[k].rgb[2]);
    }
    /* ends, clamping, NaN */
    mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 0, c);
    CHECK(c[0] == 68 && c[1] == 1 && c[2] == 84, "viridis(0) = (%d,%d,%d)", c[0], c[1], c[2]);
    mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 1, c);
    CHECK(c[0] == 253 && c[1] == 231 && c[2] == 37, "viridis(1) = (%d,%d,%d)", c[0], c[1], c[2]);
    mha_heatmap_color(MHA_HEATMAP_VIRIDIS, -5, lo);
    mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 0, c);
    CHECK(same(lo, c), "t < 0 clamps to 0");
    mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 7, hi);
    mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 1, c);
    CHECK(same(hi, c), "t > 1 clamps to 1");
    mha_heatmap_color(MHA_HEATMAP_MAGMA, (float)NAN, c);
    CHECK(is_mask(c), "NaN is the mask colour");
    /* perceptually uniform maps get lighter all the way: luma never drops
       by more than rounding between neighbouring steps */
    for (m = 0; m < MHA_HEATMAP_CMAP_COUNT; ++m) {
        double prev = -1, worst_drop = 0;
        for (i = 0; i <= 256; ++i) {
            double y;
            mha_heatmap_color((mha_heatmap_cmap)m, (float)i / 256.0f, c);
            y = 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
            if (prev - y > worst_drop) worst_drop = prev - y;
            prev = y;
        }
        CHECK(worst_drop < 1.0, "%s: luma drops by %.2f", mha_heatmap_cmap_name((mha_heatmap_cmap)m), worst_drop);
    }
    CHECK(mha_heatmap_cmap_parse("magma") == MHA_HEATMAP_MAGMA, "parse magma");
    CHECK(mha_heatmap_cmap_parse("jet") == -1, "jet is not offered");
}

/* A 2x2 map with four different values: a transpose, a flip or a wrong
   scale each put a wrong colour in some cell. */
static void test_two_by_two(void)
{
    static const float w[4] = {0.0f, 1.0f, 0.25f, 0.75f}; /* row 0: q0->k0, q0->k1 */
    static const char *const q[2] = {"Q0", "Q1"};
    static const char *const k[2] = {"K0", "K1"};
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_heatmap_layout lay;
    image im;
    int i, j;

    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.Lq = 2; hm.Lk = 2;
    hm.q_labels = q; hm.k_labels = k;
    hm.title = "two by two";
    st.cell = 30;
    im = draw(&hm, &st, &lay);
    if (!im.p) return;
    CHECK(lay.cell == 30 && lay.rows == 1 && lay.cols == 1, "layout: cell %d grid %dx%d", lay.cell, lay.rows, lay.cols);
    CHECK(lay.cells.w == 60 && lay.cells.h == 60, "map %dx%d", lay.cells.w, lay.cells.h);
    for (i = 0; i < 2; ++i)
        for (j = 0; j < 2; ++j) {
            unsigned char c[3];
            mha_heatmap_rect r = mha_heatmap_cell(&lay, 0, i, j);
            mha_heatmap_color(MHA_HEATMAP_VIRIDIS, w[i * 2 + j], c);
            CHECK(r.x == lay.cells.x + 30 * j && r.y == lay.cells.y + 30 * i, "cell (%d,%d) rect", i, j);
            CHECK(rect_is(&im, r, c), "cell (%d,%d) is not all colour(%.2f)", i, j, w[i * 2 + j]);
        }
    /* the cell for query 0, key 1 holds the bright end; query 1, key 0 a dark blue */
    {
        mha_heatmap_rect r = mha_heatmap_cell(&lay, 0, 0, 1);
        const unsigned char *c = px(&im, r.x + 15, r.y + 15);
        CHECK(c[0] == 253 && c[1] == 231 && c[2] == 37, "q0,k1 = viridis(1), got (%d,%d,%d)", c[0], c[1], c[2]);
    }
    /* the map is framed and the frame is outside the cells */
    CHECK(!is_white(px(&im, lay.cells.x - 1, lay.cells.y + 5)), "frame left of the map");
    /* labels: ink in each row's band of the query-label column, none between */
    for (i = 0; i < 2; ++i) {
        mha_heatmap_rect r = mha_heatmap_cell(&lay, 0, i, 0);
        int n = count_ink(&im, lay.q_labels.x, r.y, lay.cells.x, r.y + r.h);
        CHECK(n > 20, "query label %d: %d ink pixels left of its row", i, n);
        CHECK(count_ink(&im, lay.q_labels.x + lay.q_labels.w - 4, r.y, lay.q_labels.x + lay.q_labels.w, r.y + r.h) > 0,
              "query label %d is right-aligned against the map", i);
    }
    for (j = 0; j < 2; ++j) {
        mha_heatmap_rect r = mha_heatmap_cell(&lay, 0, 0, j);
        int n = count_ink(&im, r.x, lay.k_labels.y, r.x + r.w, lay.k_labels.y + lay.k_labels.h);
        CHECK(n > 20, "key label %d: %d ink pixels above its column", j, n);
    }
    CHECK(!lay.rotated_keys, "two-letter keys fit a 30-pixel column level");
    CHECK(count_ink(&im, lay.title.x, lay.title.y, lay.title.x + lay.title.w, lay.title.y + lay.title.h) > 50,
          "title ink");
    CHECK(lay.title.y + lay.title.h < lay.k_labels.y, "title above the key labels");
    /* nothing is masked: no legend */
    CHECK(lay.legend.w == 0, "no masked legend without masked cells");

    /* the colour bar: right of the map, vmax at the top, vmin at the bottom,
       getting darker downwards, tick marks and tick text to its right */
    {
        mha_heatmap_rect b = lay.colorbar;
        unsigned char top[3], bot[3];
        int y, mono = 1, ticks = 0;
        CHECK(b.w > 0 && b.x >= lay.cells.x + lay.cells.w, "bar right of the map");
        CHECK(b.y == lay.cells.y, "bar starts level with the map");
        mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 1, top);
        mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 0, bot);
        CHECK(same(px(&im, b.x + b.w / 2, b.y), top), "bar top is colour(1)");
        CHECK(same(px(&im, b.x + b.w / 2, b.y + b.h - 1), bot), "bar bottom is colour(0)");
        for (y = b.y; y < b.y + b.h; ++y) {
            const unsigned char *a = px(&im, b.x + 2, y > b.y ? y - 1 : y), *c = px(&im, b.x + 2, y);
            if (0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2] > 0.2126 * a[0] + 0.7152 * a[1] + 0.0722 * a[2] + 1) mono = 0;
            if (!is_white(px(&im, b.x + b.w + 2, y))) ++ticks;
        }
        CHECK(mono, "bar darkens from top to bottom");
        CHECK(ticks >= 3, "tick marks beside the bar: %d", ticks);
        CHECK(count_ink(&im, b.x + b.w + 6, b.y - 8, im.w, b.y + b.h + 8) > 100, "tick labels");
        CHECK(b.x + b.w < im.w, "bar inside the image");
    }
    free(im.p);

    /* same map, data range 0.25..1 would be wrong: check RANGE_DATA maps min/max to the ends */
    {
        static const float v[4] = {2.0f, 4.0f, 3.0f, 2.5f};
        unsigned char c0[3], c1[3], c2[3];
        hm.weights = v;
        st.range = MHA_HEATMAP_RANGE_DATA;
        im = draw(&hm, &st, &lay);
        if (!im.p) return;
        CHECK(lay.vmin == 2.0f && lay.vmax == 4.0f, "data range %g..%g", lay.vmin, lay.vmax);
        mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 0, c0);
        mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 1, c1);
        mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 0.5f, c2);
        CHECK(rect_is(&im, mha_heatmap_cell(&lay, 0, 0, 0), c0), "min -> colour(0)");
        CHECK(rect_is(&im, mha_heatmap_cell(&lay, 0, 0, 1), c1), "max -> colour(1)");
        CHECK(rect_is(&im, mha_heatmap_cell(&lay, 0, 1, 0), c2), "middle -> colour(0.5)");
        free(im.p);
        st.range = MHA_HEATMAP_RANGE_FIXED;
        st.vmin = 2.0f; st.vmax = 3.0f;
        im = draw(&hm, &st, &lay);
        if (!im.p) return;
        CHECK(rect_is(&im, mha_heatmap_cell(&lay, 0, 0, 1), c1), "above vmax clamps to colour(1)");
        CHECK(rect_is(&im, mha_heatmap_cell(&lay, 0, 1, 0), c1), "vmax -> colour(1)");
        free(im.p);
    }
}

/* A causal 5x7 map (bottom-right aligned, as when decoding with a cache):
   the hidden cells are hatched, a zero weight that is not hidden is not. */
static void test_causal(void)
{
    enum { Lq = 5, Lk = 7 };
    float w[Lq * Lk];
    unsigned char mask[Lq * Lk];
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_heatmap_layout lay;
    image im;
    int i, j, bad_mask = 0, bad_open = 0, lines = 0;

    CHECK(mha_heatmap_causal_mask(Lq, Lk, 1, mask, NULL) == MHA_OK, "causal mask");
    for (i = 0; i < Lq; ++i)
        for (j = 0; j < Lk; ++j) {
            /* the mask: key j hidden from query i when j > i + 2 */
            CHECK(mask[i * Lk + j] == (j > i + 2), "causal mask (%d,%d)", i, j);
            w[i * Lk + j] = mask[i * Lk + j] ? 0.0f : (j == 0 ? 0.0f : 0.5f); /* zeros both sides */
        }
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.Lq = Lq; hm.Lk = Lk; hm.mask = mask;
    st.cell = 16;
    st.cmap = MHA_HEATMAP_MAGMA;
    im = draw(&hm, &st, &lay);
    if (!im.p) return;
    for (i = 0; i < Lq; ++i)
        for (j = 0; j < Lk; ++j) {
            mha_heatmap_rect r = mha_heatmap_cell(&lay, 0, i, j);
            int x, y;
            for (y = r.y; y < r.y + r.h; ++y)
                for (x = r.x; x < r.x + r.w; ++x) {
                    const unsigned char *c = px(&im, x, y);
                    if (mask[i * Lk + j]) {
                        bad_mask += !is_mask(c);
                        lines += c[0] == MHA_HEATMAP_HATCH_R;
                    } else {
                        bad_open += is_mask(c);
                    }
                }
        }
    CHECK(bad_mask == 0, "%d pixels of masked cells are not mask colours", bad_mask);
    CHECK(bad_open == 0, "%d pixels of open cells have mask colours", bad_open);
    CHECK(lines > 0, "the masked cells are hatched");
    {
        unsigned char zero[3];
        mha_heatmap_color(MHA_HEATMAP_MAGMA, 0, zero);
        CHECK(rect_is(&im, mha_heatmap_cell(&lay, 0, 2, 0), zero), "open zero weight drawn as colour(0)");
    }
    CHECK(lay.legend.w > 0 && lay.legend.y >= lay.colorbar.y + lay.colorbar.h, "masked legend under the bar");
    CHECK(lay.legend.x + lay.legend.w < im.w && lay.legend.y + lay.legend.h < im.h, "legend inside the image");
    CHECK(is_mask(px(&im, lay.legend.x + 3, lay.legend.y + 3)), "legend swatch is hatched");
    CHECK(count_ink(&im, lay.legend.x + lay.legend.w, lay.legend.y - 2, im.w, lay.legend.y + lay.legend.h + 2) > 30,
          "legend text");
    free(im.p);

    /* NaN marks a cell masked without a mask array */
    w[0] = (float)NAN;
    hm.mask = NULL;
    im = draw(&hm, &st, &lay);
    if (!im.p) return;
    CHECK(is_mask(px(&im, lay.cells.x + 8, lay.cells.y + 8)), "a NaN weight is drawn masked");
    CHECK(!is_mask(px(&im, lay.cells.x + 16 * Lk - 8, lay.cells.y + 8)), "its neighbours are not");
    free(im.p);
}

/* Three heads in a grid: panels where the layout says, one title each, one
   colour range for all. */
static void test_grid(void)
{
    enum { Hh = 3, L = 4 };
    float w[Hh * L * L], avg[L * L];
    static const char *const tok[L] = {"alpha", "beta", "gamma", "delta"};
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_heatmap_layout lay;
    image im;
    int h, i, j;

    for (h = 0; h < Hh; ++h)
        for (i = 0; i < L; ++i)
            for (j = 0; j < L; ++j) w[(h * L + i) * L + j] = (j == (i + h) % L) ? 0.7f : 0.1f;
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.heads = Hh; hm.Lq = L; hm.Lk = L;
    hm.q_labels = tok; hm.k_labels = tok; hm.title = "three heads";
    st.cell = 20;
    im = draw(&hm, &st, &lay);
    if (!im.p) return;
    CHECK(lay.cols * lay.rows >= Hh && lay.cols == 3 && lay.rows == 1, "grid %dx%d", lay.cols, lay.rows);
    CHECK(lay.rotated_keys, "five-letter keys do not fit 20 pixels level");
    for (h = 0; h < Hh; ++h) {
        mha_heatmap_rect t = mha_heatmap_panel(&lay, h, MHA_HEATMAP_HEAD_TITLE);
        mha_heatmap_rect c = mha_heatmap_panel(&lay, h, MHA_HEATMAP_CELLS);
        unsigned char hot[3], cold[3];
        mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 0.7f, hot);
        mha_heatmap_color(MHA_HEATMAP_VIRIDIS, 0.1f, cold);
        CHECK(t.h > 0 && count_ink(&im, t.x, t.y, t.x + t.w, t.y + t.h) > 30, "head %d title", h);
        CHECK(t.y + t.h <= c.y, "head %d title above its map", h);
        for (i = 0; i < L; ++i)
            for (j = 0; j < L; ++j)
                CHECK(rect_is(&im, mha_heatmap_cell(&lay, h, i, j), j == (i + h) % L ? hot : cold),
                      "head %d cell (%d,%d)", h, i, j);
        if (h > 0) {
            mha_heatmap_rect p = mha_heatmap_panel(&lay, h - 1, MHA_HEATMAP_CELLS);
            CHECK(c.x >= p.x + p.w + 10 && c.y == p.y, "head %d right of head %d", h, h - 1);
        }
    }
    CHECK(lay.colorbar.x > mha_heatmap_panel(&lay, Hh - 1, MHA_HEATMAP_CELLS).x, "one bar, right of the last panel");
    free(im.p);

    /* explicit columns: two per row -> the third head starts a second row */
    st.cols = 2;
    im = draw(&hm, &st, &lay);
    if (!im.p) return;
    CHECK(lay.cols == 2 && lay.rows == 2, "2 columns: grid %dx%d", lay.cols, lay.rows);
    {
        mha_heatmap_rect a = mha_heatmap_panel(&lay, 0, MHA_HEATMAP_CELLS);
        mha_heatmap_rect c = mha_heatmap_panel(&lay, 2, MHA_HEATMAP_CELLS);
        CHECK(c.x == a.x && c.y > a.y + a.h, "head 2 under head 0");
        CHECK(rect_is(&im, mha_heatmap_cell(&lay, 3, 0, 0), (const unsigned char *)"\xff\xff\xff"),
              "the empty fourth slot stays white");
    }
    free(im.p);

    /* the head average is the mean, NaN stays NaN */
    CHECK(mha_heatmap_average(w, Hh, L, L, avg, NULL) == MHA_OK, "average");
    for (i = 0; i < L * L; ++i) {
        float m = (w[i] + w[L * L + i] + w[2 * L * L + i]) / 3.0f;
        CHECK(fabsf(avg[i] - m) < 1e-6f, "average %d: %g vs %g", i, avg[i], m);
    }
    w[L * L + 5] = (float)NAN;
    CHECK(mha_heatmap_average(w, Hh, L, L, avg, NULL) == MHA_OK, "average");
    CHECK(avg[5] != avg[5], "NaN in one head stays masked in the average");
}

/* Text: the width it reports is the ink it draws; rotating swaps the box. */
static void test_text(void)
{
    enum { W = 120, Hh = 120 };
    static unsigned char rgb[W * Hh * 3];
    static const unsigned char black[3] = {0, 0, 0};
    image im = {rgb, W, Hh};
    int x0, x1, y0, y1, w2 = mha_heatmap_text_width("HH", 2);
    memset(rgb, 255, sizeof rgb);
    mha_heatmap_text(rgb, W, Hh, 10, 20, "HH", 2, 0, black);
    ink_box(&im, &x0, &x1, &y0, &y1);
    CHECK(x0 == 10 && y0 == 20, "text starts at its origin: %d,%d", x0, y0);
    CHECK(x1 + 1 - x0 == w2, "ink width %d, reported %d", x1 + 1 - x0, w2);
    CHECK(y1 + 1 - y0 == 14, "capitals are 7 units high: %d", y1 + 1 - y0);
    memset(rgb, 255, sizeof rgb);
    mha_heatmap_text(rgb, W, Hh, 10, 100, "HH", 2, 1, black);
    ink_box(&im, &x0, &x1, &y0, &y1);
    CHECK(x0 == 10 && x1 + 1 - x0 == 14, "rotated: glyph height across, x %d..%d", x0, x1);
    CHECK(y1 == 99 && y1 + 1 - y0 == w2, "rotated: text runs up from the origin, y %d..%d", y0, y1);
    /* bytes outside printable ASCII draw as '?', never read outside the font */
    CHECK(mha_heatmap_text_width("caf\xc3\xa9", 1) == mha_heatmap_text_width("caf?", 1), "a UTF-8 character is one '?'");
    CHECK(mha_heatmap_text_width("\t\x7f", 1) == mha_heatmap_text_width("??", 1), "control bytes are '?'");
    mha_heatmap_text(rgb, W, Hh, -50, -50, "clipped", 3, 0, black); /* off the image: no crash */
    mha_heatmap_text(rgb, W, Hh, W - 5, Hh - 5, "clipped", 3, 1, black);
}

typedef struct { unsigned char *p; size_t n, cap; } membuf;
static void to_mem(void *ctx, void *data, int size)
{
    membuf *m = (membuf *)ctx;
    if (m->n + (size_t)size > m->cap) {
        size_t cap = (m->n + size) * 2;
        unsigned char *p = (unsigned char *)realloc(m->p, cap);
        if (!p) return;
        m->p = p; m->cap = cap;
    }
    memcpy(m->p + m->n, data, (size_t)size);
    m->n += (size_t)size;
}

/* The PNG comes back through stb_image with the measured size and the
   same pixels, from memory and from a file. */
static void test_png_roundtrip(void)
{
    static const float w[6] = {0.1f, 0.2f, 0.7f, 0.5f, 0.0f, 0.5f};
    static const char *const path = "build/tests/test_heatmap_roundtrip.png";
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_error err;
    mha_status r;
    unsigned char *rgb = NULL, *back;
    membuf mem = {NULL, 0, 0};
    int W = 0, Hh = 0, bw = 0, bh = 0, bn = 0;

    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.Lq = 2; hm.Lk = 3; hm.title = "round trip";
    st.cmap = MHA_HEATMAP_INFERNO;
    r = mha_heatmap_draw(&hm, &st, &rgb, &W, &Hh, &err);
    CHECK(rgb != NULL && r == MHA_OK, "draw: %s", err.message);
    if (!rgb) return;
    CHECK(stbi_write_png_to_func(to_mem, &mem, W, Hh, 3, rgb, W * 3) != 0 && mem.n > 8, "encode");
    back = stbi_load_from_memory(mem.p, (int)mem.n, &bw, &bh, &bn, 3);
    CHECK(back && bw == W && bh == Hh && bn == 3, "decode %dx%d (%d), drew %dx%d", bw, bh, bn, W, Hh);
    if (back) {
        CHECK(memcmp(back, rgb, (size_t)W * Hh * 3) == 0, "pixels survive the round trip");
        stbi_image_free(back);
    }
    free(mem.p);

    r = mha_heatmap_write_png(path, &hm, &st, &err);
    CHECK(r == MHA_OK, "write %s: %s", path, err.message);
    back = stbi_load(path, &bw, &bh, &bn, 3);
    CHECK(back && bw == W && bh == Hh, "file decodes to %dx%d", bw, bh);
    if (back) {
        CHECK(memcmp(back, rgb, (size_t)W * Hh * 3) == 0, "file pixels match");
        stbi_image_free(back);
    }
    /* the raw writer gives the same file */
    remove(path);
    r = mha_heatmap_write_rgb_png(path, rgb, W, Hh, &err);
    back = stbi_load(path, &bw, &bh, &bn, 3);
    CHECK(r == MHA_OK && back && bw == W && bh == Hh && memcmp(back, rgb, (size_t)W * Hh * 3) == 0,
          "write_rgb_png: %s", err.message);
    if (back) stbi_image_free(back);
    remove(path);
    /* the system's refusals: the path and its reason */
    {
        char want[256];
        r = mha_heatmap_write_png("no/such/folder/x.png", &hm, &st, &err);
        snprintf(want, sizeof want, "cannot create 'no/such/folder/x.png': %s", strerror(ENOENT));
        CHECK(ec_refused(r, &err, MHA_ERR_IO, "mha_heatmap_write_png", "path", want), "missing folder: \"%s\"",
              err.message);
        r = mha_heatmap_write_rgb_png("build/tests", rgb, W, Hh, &err);
        snprintf(want, sizeof want, "cannot create 'build/tests': %s", strerror(EISDIR));
        CHECK(ec_refused(r, &err, MHA_ERR_IO, "mha_heatmap_write_rgb_png", "path", want), "a directory: \"%s\"",
              err.message);
        {   /* a full disk: the write, not the open, fails (Linux's /dev/full) */
            FILE *full = fopen("/dev/full", "wb");
            if (full) {
                fclose(full);
                r = mha_heatmap_write_rgb_png("/dev/full", rgb, W, Hh, &err);
                snprintf(want, sizeof want, "cannot write '/dev/full': %s", strerror(ENOSPC));
                CHECK(ec_refused(r, &err, MHA_ERR_IO, "mha_heatmap_write_rgb_png", "path", want), "full disk: \"%s\"",
                      err.message);
                full = fopen("/dev/full", "wb");
                CHECK(full != NULL, "/dev/full is still there (a failed write removes nothing)");
                if (full) fclose(full);
            } else {
                printf("NOTE test_heatmap: no /dev/full: the full-disk case is skipped\n");
            }
        }
        CHECK(ec_refused(mha_heatmap_write_rgb_png(NULL, rgb, W, Hh, &err), &err, MHA_ERR_NULL_POINTER,
                         "mha_heatmap_write_rgb_png", "path", "is NULL"), "NULL path: %s", err.message);
        CHECK(ec_refused(mha_heatmap_write_rgb_png(path, rgb, 0, Hh, &err), &err, MHA_ERR_INVALID_SIZE,
                         "mha_heatmap_write_rgb_png", "width", "is 0; expected >= 1"), "width 0: %s", err.message);
        CHECK(ec_refused(mha_heatmap_write_rgb_png(path, rgb, W, MHA_HEATMAP_MAX_SIDE + 1, &err), &err,
                         MHA_ERR_OVERFLOW, "mha_heatmap_write_rgb_png", "height", "at most 16384"),
              "too tall: %s", err.message);
        CHECK(mha_heatmap_write_png(NULL, &hm, &st, NULL) == MHA_ERR_NULL_POINTER, "err may be NULL");
    }
    free(rgb);
}

static void test_errors(void)
{
    static float w[4] = {0, 0, 0, 0};
    static unsigned char buf[64];
    static const char *const fn = "mha_heatmap_measure";
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_heatmap_layout lay, before;
    mha_error err;
    mha_status r;
    unsigned char *rgb = (unsigned char *)buf;
    int W = -7, Hh = -7;
    float lo = -7, hi = -7, out4[4] = {-7, -7, -7, -7};
    unsigned char mask[4] = {9, 9, 9, 9};

    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    memset(&lay, 0x5A, sizeof lay);
    before = lay;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_NULL_POINTER, fn, "hm->weights",
                     "is NULL"), "NULL weights: %s", err.message);
    CHECK(ec_refused(mha_heatmap_measure(NULL, &st, &lay, &err), &err, MHA_ERR_NULL_POINTER, fn, "hm", "is NULL"),
          "NULL map: %s", err.message);
    hm.weights = w; hm.Lq = 2; hm.Lk = 0;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_INVALID_SIZE, fn, "hm->Lk",
                     "is 0; expected >= 1"), "Lk = 0: %s", err.message);
    hm.Lk = 2;
    hm.heads = -1;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_INVALID_SIZE, fn, "hm->heads", "is -1"),
          "heads -1: %s", err.message);
    hm.heads = 0;
    CHECK(memcmp(&lay, &before, sizeof lay) == 0, "the layout is untouched by every refusal");
    CHECK(mha_heatmap_measure(&hm, NULL, &lay, &err) == MHA_OK && err.status == MHA_OK && lay.width > 0,
          "NULL style = defaults");
    before = lay;
    st.cmap = MHA_HEATMAP_CMAP_COUNT;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_BAD_ENUM, fn, "style->cmap", "is 4"),
          "unknown colour map: %s", err.message);
    st.cmap = MHA_HEATMAP_VIRIDIS;
    st.range = (mha_heatmap_range)3;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_BAD_ENUM, fn, "style->range", "is 3"),
          "unknown range: %s", err.message);
    st.range = MHA_HEATMAP_RANGE_UNIT;
    st.cols = -2;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_INVALID_ARGUMENT, fn, "style->cols",
                     "is -2"), "cols -2: %s", err.message);
    st.cols = 0;
    CHECK(ec_refused(mha_heatmap_render(&hm, &st, buf, 4, 4, &err), &err, MHA_ERR_INVALID_ARGUMENT,
                     "mha_heatmap_render", "width", "is 4; mha_heatmap_measure gives"), "wrong buffer size: %s",
          err.message);
    CHECK(buf[0] == 0 && buf[63] == 0, "a refused render draws nothing");
    CHECK(ec_refused(mha_heatmap_render(&hm, &st, NULL, 4, 4, &err), &err, MHA_ERR_NULL_POINTER, "mha_heatmap_render",
                     "rgb", "is NULL"), "NULL rgb: %s", err.message);
    st.cell = 9000;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_OVERFLOW, fn, "hm->Lk",
                     "2 keys x 9000-pixel cells is 18000 pixels"), "18000-pixel map: %s", err.message);
    r = mha_heatmap_draw(&hm, &st, &rgb, &W, &Hh, &err);
    CHECK(ec_refused(r, &err, MHA_ERR_OVERFLOW, "mha_heatmap_draw", "hm->Lk", "18000 pixels") &&
          rgb == (unsigned char *)buf && W == -7 && Hh == -7, "draw refuses it too, writing nothing: %s", err.message);
    st.cell = 0;
    hm.Lq = 1000000;
    CHECK(ec_refused(mha_heatmap_measure(&hm, &st, &lay, &err), &err, MHA_ERR_OVERFLOW, fn, "hm->Lq", "is 1000000"),
          "a million queries: %s", err.message);
    CHECK(memcmp(&lay, &before, sizeof lay) == 0, "the layout is untouched by every refusal");
    CHECK(mha_heatmap_measure(&hm, &st, &lay, NULL) == MHA_ERR_OVERFLOW, "err may be NULL");
    CHECK(ec_refused(mha_heatmap_value_range(&hm, NULL, &lo, &hi, &err), &err, MHA_ERR_OVERFLOW,
                     "mha_heatmap_value_range", "hm->Lq", NULL) && lo == -7 && hi == -7,
          "value_range checks the map as measure does: %s", err.message);
    hm.Lq = 2;
    CHECK(mha_heatmap_value_range(&hm, NULL, &lo, &hi, &err) == MHA_OK && lo == 0 && hi == 1, "unit range");
    CHECK(ec_refused(mha_heatmap_value_range(&hm, NULL, NULL, &hi, &err), &err, MHA_ERR_NULL_POINTER,
                     "mha_heatmap_value_range", "lo", "is NULL"), "NULL lo: %s", err.message);
    CHECK(ec_refused(mha_heatmap_average(w, 0, 2, 2, out4, &err), &err, MHA_ERR_INVALID_SIZE, "mha_heatmap_average",
                     "heads", "is 0; expected >= 1") && out4[0] == -7, "average, 0 heads: %s", err.message);
    CHECK(ec_refused(mha_heatmap_average(NULL, 1, 2, 2, out4, &err), &err, MHA_ERR_NULL_POINTER, "mha_heatmap_average",
                     "w", "is NULL"), "average, NULL w: %s", err.message);
    CHECK(ec_refused(mha_heatmap_causal_mask(2, 2, 0, NULL, &err), &err, MHA_ERR_NULL_POINTER,
                     "mha_heatmap_causal_mask", "mask", "is NULL"), "mask NULL: %s", err.message);
    CHECK(ec_refused(mha_heatmap_causal_mask(2, -1, 0, mask, &err), &err, MHA_ERR_INVALID_SIZE,
                     "mha_heatmap_causal_mask", "Lk", "is -1") && mask[0] == 9, "mask Lk -1: %s", err.message);
    CHECK(mha_heatmap_causal_mask(2, 2, 0, mask, &err) == MHA_OK && mask[0] == 0 && mask[1] == 1 &&
          err.status == MHA_OK && err.field == NULL, "a success leaves a clean report");
}

/* Many tokens: cells shrink, labels thin out to every n-th, still inside. */
static void test_long_sequence(void)
{
    enum { L = 200 };
    static float w[L * L];
    mha_heatmap hm;
    mha_heatmap_layout lay;
    image im;
    int i;
    for (i = 0; i < L * L; ++i) w[i] = (float)(i % 17) / 16.0f;
    memset(&hm, 0, sizeof hm);
    hm.weights = w; hm.Lq = L; hm.Lk = L;
    im = draw(&hm, NULL, &lay);
    if (!im.p) return;
    CHECK(lay.cell == 4 && lay.label_step >= 3, "200 tokens: cell %d, label every %d", lay.cell, lay.label_step);
    CHECK(lay.width < 1400 && lay.height < 1400, "image %dx%d", lay.width, lay.height);
    CHECK(inside(lay.q_labels, lay.q_labels.x, lay.cells.y), "labels start level with the map");
    free(im.p);
}

/* Layout choices: wide cross-attention maps stack in one column, square
   ones make a 2x2 grid of four; long labels are cut to MHA_HEATMAP_MAX_LABEL. */
static void test_layout_choices(void)
{
    static float w[4 * 3 * 30];
    static const char *const longk[2] = {"short", "a_label_far_longer_than_sixteen_characters"};
    static const char *const cut[2] = {"short", "a_label_far_lo.."};
    mha_heatmap hm;
    mha_heatmap_style st;
    mha_heatmap_layout lay, lay2;
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.heads = 3; hm.Lq = 3; hm.Lk = 30;
    CHECK(mha_heatmap_measure(&hm, &st, &lay, NULL) == MHA_OK && lay.cols == 1 && lay.rows == 3,
          "3 wide maps: %dx%d", lay.cols, lay.rows);
    hm.heads = 4; hm.Lq = 8; hm.Lk = 8;
    CHECK(mha_heatmap_measure(&hm, &st, &lay, NULL) == MHA_OK && lay.cols == 2 && lay.rows == 2,
          "4 square maps: %dx%d", lay.cols, lay.rows);
    hm.heads = 1; hm.Lq = 2; hm.Lk = 2;
    hm.k_labels = longk;
    CHECK(mha_heatmap_measure(&hm, &st, &lay, NULL) == MHA_OK, "long label");
    hm.k_labels = cut;
    CHECK(mha_heatmap_measure(&hm, &st, &lay2, NULL) == MHA_OK && lay.k_labels.h == lay2.k_labels.h &&
          lay.rotated_keys, "a long label takes the room of its first %d characters", MHA_HEATMAP_MAX_LABEL);
    {
        /* a 5000-character title is cut, not turned into a 90000-pixel image */
        static char title[5001], cut_title[MHA_HEATMAP_MAX_TITLE + 1];
        memset(title, 'W', 5000);
        memset(cut_title, 'W', MHA_HEATMAP_MAX_TITLE - 2);
        strcpy(cut_title + MHA_HEATMAP_MAX_TITLE - 2, "..");
        hm.title = title;
        CHECK(mha_heatmap_measure(&hm, &st, &lay, NULL) == MHA_OK && lay.width < 2500 &&
              lay.title.w == mha_heatmap_text_width(cut_title, 3),
              "long title: image %d wide, title %d", lay.width, lay.title.w);
    }
}

int main(void)
{
    test_layout_choices();
    test_colormaps();
    test_two_by_two();
    test_causal();
    test_grid();
    test_text();
    test_png_roundtrip();
    test_errors();
    test_long_sequence();
    return tu_finish("test_heatmap");
}
