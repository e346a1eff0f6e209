/* test_npy.c - the .npy reader (examples/npy.h) and the viewer (examples/mha_view.c)
   on files NumPy and PyTorch wrote (tests/data/npy, made by make_fixtures.py)
   and on broken files made here: each broken one must be refused with a
   message and a non-zero status, never a crash (run under ASan too). */
#include <stdarg.h>
#define MHA_VIEW_NO_MAIN
#include "../examples/mha_view.c"
#define STB_IMAGE_IMPLEMENTATION
#include "stb_image.h"
#include "testutil.h"

#define DATA "tests/data/npy/"
#define TMP "build/tests/"

static int loads(const char *path, mha_npy *a, char *err, size_t n)
{
    int rc = mha_npy_load(path, a, err, n);
    if (rc != 0) printf("NOTE %s: %s\n", path, err);
    return rc;
}

/* The same ramp (value i/23 at flat index i, shape [2,3,4]) in every format. */
static void test_good_files(void)
{
    static const char *const files[] = {"ramp_f4.npy", "ramp_f8.npy", "ramp_v2.npy"};
    char err[256], path[256];
    size_t f, i;
    for (f = 0; f < 3; ++f) {
        mha_npy a;
        int bad = 0;
        snprintf(path, sizeof path, DATA "%s", files[f]);
        CHECK(loads(path, &a, err, sizeof err) == 0, "%s loads", files[f]);
        CHECK(a.ndim == 3 && a.shape[0] == 2 && a.shape[1] == 3 && a.shape[2] == 4 && a.count == 24,
              "%s: shape %d [%lu,%lu,%lu]", files[f], a.ndim, (unsigned long)a.shape[0],
              (unsigned long)a.shape[1], (unsigned long)a.shape[2]);
        CHECK(a.itemsize == (f == 1 ? 8 : 4), "%s: itemsize %d", files[f], a.itemsize);
        for (i = 0; a.data && i < a.count; ++i) bad += a.data[i] != (float)((double)i / 23.0);
        CHECK(a.data && bad == 0, "%s: %d values differ from i/23", files[f], bad);
        mha_npy_free(&a);
        CHECK(a.data == NULL && a.count == 0, "free zeroes");
    }
    {
        mha_npy a;
        CHECK(loads(DATA "ramp_2d.npy", &a, err, sizeof err) == 0 && a.ndim == 2 && a.shape[0] == 3 &&
              a.shape[1] == 4 && a.data[5] == (float)(5.0 / 23.0), "2-D");
        mha_npy_free(&a);
        CHECK(loads(DATA "ramp_4d.npy", &a, err, sizeof err) == 0 && a.ndim == 4 && a.shape[0] == 1 &&
              a.shape[3] == 4 && a.data[23] == 1.0f, "4-D");
        mha_npy_free(&a);
    }
}

/* Real weights from nn.MultiheadAttention (causal, per head): every row sums
   to one, the future is exactly zero, and float32 and float64 files agree. */
static void test_torch_file(void)
{
    mha_npy a, b;
    char err[256];
    size_t h, i, j;
    int L;
    CHECK(loads(DATA "torch_causal_f4.npy", &a, err, sizeof err) == 0, "torch float32 loads");
    CHECK(loads(DATA "torch_causal_f8.npy", &b, err, sizeof err) == 0, "torch float64 loads");
    if (!a.data || !b.data) { mha_npy_free(&a); mha_npy_free(&b); return; }
    CHECK(a.ndim == 4 && a.shape[0] == 1 && a.shape[1] == 2 && a.shape[2] == 5 && a.shape[3] == 5, "[1,2,5,5]");
    L = (int)a.shape[3];
    for (h = 0; h < a.shape[1]; ++h)
        for (i = 0; i < (size_t)L; ++i) {
            double s = 0;
            for (j = 0; j < (size_t)L; ++j) {
                float v = a.data[(h * L + i) * L + j];
                s += v;
                if (j > i) CHECK(v == 0.0f, "head %lu: future weight (%lu,%lu) = %g", (unsigned long)h,
                                 (unsigned long)i, (unsigned long)j, v);
            }
            CHECK(fabs(s - 1.0) < 1e-5, "head %lu row %lu sums to %.7f", (unsigned long)h, (unsigned long)i, s);
        }
    CHECK(tu_rel_err_ff(a.data, b.data, a.count) < 1e-6, "float32 and float64 files agree");
    mha_npy_free(&a);
    mha_npy_free(&b);
}

/* Files numpy/torch write that are not what we read: each refused, with a
   message naming the problem. */
static void test_refused_files(void)
{
    static const struct { const char *file, *says; } bad[] = {
        {"bad_fortran.npy", "fortran_order"},
        {"bad_bigendian.npy", "big-endian"},
        {"bad_int64.npy", "unsupported dtype '<i8'"},
        {"bad_float16.npy", "unsupported dtype '<f2'"},
        {"bad_empty.npy", "empty"},
        {"bad_torch_save.pt", "zip"},
        {"no_such_file.npy", "cannot open"},
    };
    size_t k;
    for (k = 0; k < sizeof bad / sizeof bad[0]; ++k) {
        char path[256], err[256] = "";
        mha_npy a;
        snprintf(path, sizeof path, DATA "%s", bad[k].file);
        CHECK(mha_npy_load(path, &a, err, sizeof err) != 0, "%s refused", bad[k].file);
        CHECK(strstr(err, bad[k].says) != NULL, "%s: message '%s' lacks '%s'", bad[k].file, err, bad[k].says);
        CHECK(a.data == NULL, "%s: nothing left allocated", bad[k].file);
    }
}

/* ---- broken files made here */

static size_t make_npy(unsigned char *buf, int version, const char *header, const void *data, size_t n)
{
    size_t h = strlen(header), pre = version == 1 ? 10 : 12;
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (unsigned char)version;
    buf[7] = 0;
    buf[8] = (unsigned char)(h & 255);
    buf[9] = (unsigned char)(h >> 8);
    if (version != 1) { buf[10] = (unsigned char)(h >> 16); buf[11] = (unsigned char)(h >> 24); }
    memcpy(buf + pre, header, h);
    if (n) memcpy(buf + pre + h, data, n);
    return pre + h + n;
}

static void test_broken_headers(void)
{
    static const struct { const char *header; size_t data; const char *says; } cases[] = {
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", 24, NULL}, /* good */
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", 20, "truncated"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", 28, "after the data"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (), }\n", 4, "scalar"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }\n", 0, "empty"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }\n", 24, "negative"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }\n", 0, "absurd shape"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }\n", 0, "absurd shape"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }\n", 4, "dimensions"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3}\n", 24, "malformed"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }\n", 24, "non-number"},
        {"{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2, 3), }\n", 24, "fortran_order"},
        {"{'descr': '<f4', 'shape': (2, 3), }\n", 24, "missing fortran_order"},
        {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }\n", 8, "structured"},
        {"{'descr': '<c8', 'fortran_order': False, 'shape': (2, 3), }\n", 48, "unsupported dtype"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}\n", 24, "unknown key"},
        {"['descr', '<f4']\n", 24, "malformed"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", 24, "malformed"},
        {"{'descr': '<f4\n", 24, "malformed"},
    };
    static unsigned char buf[1024];
    static float zeros[16];
    size_t k;
    for (k = 0; k < sizeof cases / sizeof cases[0]; ++k) {
        char err[256] = "";
        mha_npy a;
        size_t n = make_npy(buf, 1, cases[k].header, zeros, cases[k].data);
        int rc = mha_npy_load_mem(buf, n, &a, err, sizeof err);
        if (!cases[k].says) {
            CHECK(rc == 0 && a.count == 6, "case %lu should load: %s", (unsigned long)k, err);
        } else {
            CHECK(rc != 0, "case %lu (%s) accepted", (unsigned long)k, cases[k].says);
            CHECK(strstr(err, cases[k].says) != NULL, "case %lu: message '%s' lacks '%s'", (unsigned long)k, err,
                  cases[k].says);
        }
        mha_npy_free(&a);
    }
    /* the preamble itself */
    {
        char err[256];
        mha_npy a;
        size_t n = make_npy(buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", zeros, 24);
        buf[0] = 0x92;
        CHECK(mha_npy_load_mem(buf, n, &a, err, sizeof err) != 0 && strstr(err, "not a .npy"), "wrong magic: %s", err);
        buf[0] = 0x93;
        buf[6] = 9;
        CHECK(mha_npy_load_mem(buf, n, &a, err, sizeof err) != 0 && strstr(err, "version 9"), "version 9: %s", err);
        buf[6] = 1;
        CHECK(mha_npy_load_mem(buf, 8, &a, err, sizeof err) != 0 && strstr(err, "truncated"), "8 bytes: %s", err);
        CHECK(mha_npy_load_mem(buf, 0, &a, err, sizeof err) != 0, "0 bytes");
        CHECK(mha_npy_load_mem(buf, 30, &a, err, sizeof err) != 0 && strstr(err, "truncated"), "cut header: %s", err);
        /* a version-2 header length of 4 GiB */
        n = make_npy(buf, 2, "{}", NULL, 0);
        buf[8] = buf[9] = buf[10] = buf[11] = 0xff;
        CHECK(mha_npy_load_mem(buf, n, &a, err, sizeof err) != 0 && strstr(err, "absurd"), "4 GiB header: %s", err);
    }
}

/* Every prefix of a good file is refused; random bytes in the header never
   crash the parser (the sanitizer builds watch the memory). */
static void test_truncation_and_noise(void)
{
    static unsigned char good[512], buf[512];
    static float vals[6] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
    tu_rng r = {12345};
    size_t n = make_npy(good, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", vals, 24);
    size_t cut;
    int it, accepted_prefix = 0, ok = 0, failed_quietly = 0;
    char err[256];
    mha_npy a;
    for (cut = 0; cut < n; ++cut) {
        err[0] = 0;
        if (mha_npy_load_mem(good, cut, &a, err, sizeof err) == 0) ++accepted_prefix;
        else if (!err[0]) ++failed_quietly;
        mha_npy_free(&a);
    }
    CHECK(accepted_prefix == 0, "%d truncated prefixes accepted", accepted_prefix);
    CHECK(mha_npy_load_mem(good, n, &a, err, sizeof err) == 0 && a.data[5] == 0.6f, "the whole file loads");
    mha_npy_free(&a);
    for (it = 0; it < 3000; ++it) {
        int flips = 1 + (int)(tu_next(&r) % 4), f;
        memcpy(buf, good, n);
        for (f = 0; f < flips; ++f) buf[tu_next(&r) % (n - 24)] = (unsigned char)tu_next(&r);
        err[0] = 0;
        if (mha_npy_load_mem(buf, n, &a, err, sizeof err) == 0) ++ok;
        else if (!err[0]) ++failed_quietly;
        mha_npy_free(&a);
    }
    CHECK(failed_quietly == 0, "%d failures without a message", failed_quietly);
    CHECK(ok < 3000, "noise is noticed (%d of 3000 still load)", ok);
}

/* ---- the viewer as a program */

/* view("file", "--option", ..., NULL): run the viewer with these arguments */
static int view(const char *first, ...)
{
    const char *args[16];
    int n = 0;
    va_list ap;
    args[n++] = "mha_view";
    va_start(ap, first);
    for (; first && n < 15; first = va_arg(ap, const char *)) args[n++] = first;
    va_end(ap);
    args[n] = NULL;
    return mha_view_main(n, (char **)args);
}

static int png_size(const char *path, int *w, int *h)
{
    int n;
    unsigned char *p = stbi_load(path, w, h, &n, 3);
    if (!p) return 0;
    stbi_image_free(p);
    return 1;
}

static void write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(data, 1, n, f);
        fclose(f);
    }
}

static void test_viewer(void)
{
    static unsigned char buf[1024];
    static float zeros[64];
    int w, h, k;
    char path[256];

    /* [1,2,5,5] from torch with five labels: two heads, grid, average */
    CHECK(view(DATA "torch_causal_f4.npy", "--labels", DATA "tokens5.txt", "-o", TMP "view_torch", "--causal", NULL) == 0,
          "viewer on the torch file");
    for (k = 0; k < 2; ++k) {
        snprintf(path, sizeof path, TMP "view_torch_head%d.png", k);
        CHECK(png_size(path, &w, &h) && w > 100 && h > 100, "%s written", path);
        remove(path);
    }
    CHECK(png_size(TMP "view_torch_grid.png", &w, &h) && w > h, "grid written, wider than tall (%dx%d)", w, h);
    remove(TMP "view_torch_grid.png");
    CHECK(png_size(TMP "view_torch_average.png", &w, &h), "average written");
    remove(TMP "view_torch_average.png");
    /* exact zeros (the causal triangle of the torch file) drawn masked */
    CHECK(view(DATA "torch_causal_f4.npy", "--zeros-masked", "-o", TMP "view_zm", NULL) == 0, "--zeros-masked");
    {
        int n;
        unsigned char *p = stbi_load(TMP "view_zm_head0.png", &w, &h, &n, 3);
        mha_heatmap_layout lay;
        mha_heatmap hm;
        mha_npy a;
        char err[256];
        CHECK(p != NULL, "zeros-masked png");
        /* find the upper-right cell with the same layout the viewer used */
        if (p && mha_npy_load(DATA "torch_causal_f4.npy", &a, err, sizeof err) == 0) {
            memset(&hm, 0, sizeof hm);
            hm.weights = a.data; hm.Lq = 5; hm.Lk = 5; hm.title = "torch_causal_f4.npy, batch 0, head 0";
            a.data[4] = (float)NAN; /* so the legend, and so the layout, match */
            if (mha_heatmap_measure(&hm, NULL, &lay) == MHA_HEATMAP_OK && lay.width == w && lay.height == h) {
                mha_heatmap_rect c = mha_heatmap_cell(&lay, 0, 0, 4), d = mha_heatmap_cell(&lay, 0, 4, 0);
                const unsigned char *m = p + ((size_t)(c.y + 1) * w + c.x + 2) * 3;
                const unsigned char *o = p + ((size_t)(d.y + 1) * w + d.x + 2) * 3;
                CHECK(m[0] == MHA_HEATMAP_MASK_R || m[0] == MHA_HEATMAP_HATCH_R, "future cell hatched");
                CHECK(o[0] != MHA_HEATMAP_MASK_R && o[0] != MHA_HEATMAP_HATCH_R, "past cell coloured");
                /* end to end: every visible cell of the PNG has the colour of
                   the weight torch wrote (the file is read again, unmasked) */
                {
                    mha_npy b;
                    int i, j, wrong = 0;
                    if (mha_npy_load(DATA "torch_causal_f4.npy", &b, err, sizeof err) == 0) {
                        for (i = 0; i < 5; ++i)
                            for (j = 0; j <= i; ++j) {
                                unsigned char want[3];
                                mha_heatmap_rect r = mha_heatmap_cell(&lay, 0, i, j);
                                const unsigned char *got = p + ((size_t)(r.y + r.h / 2) * w + r.x + r.w / 2) * 3;
                                mha_heatmap_color(MHA_HEATMAP_VIRIDIS, b.data[i * 5 + j], want);
                                wrong += got[0] != want[0] || got[1] != want[1] || got[2] != want[2];
                            }
                        mha_npy_free(&b);
                    }
                    CHECK(wrong == 0, "%d of 15 visible cells have the wrong colour", wrong);
                }
            } else {
                CHECK(0, "layout of the viewer's image not reproduced (%dx%d)", w, h);
            }
            mha_npy_free(&a);
        }
        if (p) stbi_image_free(p);
    }
    for (k = 0; k < 2; ++k) {
        snprintf(path, sizeof path, TMP "view_zm_head%d.png", k);
        remove(path);
    }
    remove(TMP "view_zm_grid.png");
    remove(TMP "view_zm_average.png");
    /* 2-D float64 -> one PNG */
    CHECK(view(DATA "ramp_f8.npy", "-o", TMP "view_ramp", "--range", "data", "--cmap", "magma", NULL) == 0, "float64 [2,3,4]");
    CHECK(view(DATA "ramp_2d.npy", "-o", TMP "view_2d", "--values", NULL, NULL, NULL) == 0, "2-D file");
    CHECK(png_size(TMP "view_2d.png", &w, &h), "2-D png written");
    remove(TMP "view_2d.png");
    for (k = 0; k < 2; ++k) {
        snprintf(path, sizeof path, TMP "view_ramp_head%d.png", k);
        remove(path);
    }
    remove(TMP "view_ramp_grid.png");
    remove(TMP "view_ramp_average.png");

    /* refused inputs: status 1 */
    CHECK(view(DATA "bad_fortran.npy", "-o", TMP "x", NULL, NULL, NULL) == 1, "fortran order refused");
    CHECK(view(DATA "bad_int64.npy", "-o", TMP "x", NULL, NULL, NULL) == 1, "int64 refused");
    CHECK(view(DATA "bad_1d.npy", "-o", TMP "x", NULL, NULL, NULL) == 1, "1-D refused");
    CHECK(view(DATA "bad_torch_save.pt", "-o", TMP "x", NULL, NULL, NULL) == 1, "torch.save file refused");
    CHECK(view(DATA "torch_causal_f4.npy", "--labels", DATA "tokens5.txt", "--batch", "1", NULL) == 1,
          "batch out of range");
    /* labels that do not match: 5 labels for [2,3,4] (3 queries, 4 keys) */
    CHECK(view(DATA "ramp_f4.npy", "--labels", DATA "tokens5.txt", "-o", TMP "x", NULL) == 1,
          "5 labels for 3 queries refused");
    CHECK(view(DATA "ramp_f4.npy", "--klabels", DATA "tokens5.txt", "-o", TMP "x", NULL) == 1,
          "5 labels for 4 keys refused");
    CHECK(view(DATA "ramp_f4.npy", "--qlabels", "tests/data/npy/none.txt", "-o", TMP "x", NULL) == 1,
          "missing labels file refused");
    write_file(TMP "three.txt", "a\r\nb\r\nc\r\n", 9);
    CHECK(view(DATA "ramp_f4.npy", "--qlabels", TMP "three.txt", "-o", TMP "x3", NULL, NULL) == 0,
          "3 CRLF labels for 3 queries accepted");
    remove(TMP "x3_head0.png"); remove(TMP "x3_head1.png"); remove(TMP "x3_grid.png"); remove(TMP "x3_average.png");
    remove(TMP "three.txt");
    /* a 5000-token map is refused before anything is drawn */
    {
        size_t n = make_npy(buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 5000), }\n", NULL, 0);
        FILE *f = fopen(TMP "wide.npy", "wb");
        if (f) {
            fwrite(buf, 1, n, f);
            for (k = 0; k < 5000; ++k) fwrite(zeros, 4, 1, f);
            fclose(f);
        }
        CHECK(view(TMP "wide.npy", "-o", TMP "x", NULL, NULL, NULL, NULL) == 1, "5000 keys refused");
        remove(TMP "wide.npy");
    }
    /* truncated on disk */
    {
        size_t n = make_npy(buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }\n", zeros, 60);
        write_file(TMP "short.npy", buf, n);
        CHECK(view(TMP "short.npy", "-o", TMP "x", NULL, NULL, NULL, NULL) == 1, "truncated file refused");
        remove(TMP "short.npy");
    }
    /* command-line mistakes: status 2 */
    CHECK(view(NULL, NULL, NULL, NULL, NULL, NULL) == 2, "no input");
    CHECK(view(DATA "ramp_f4.npy", "--cmap", "jet", NULL, NULL, NULL) == 2, "unknown colour map");
    CHECK(view(DATA "ramp_f4.npy", "--range", "1:0", NULL, NULL, NULL) == 2, "empty range");
    CHECK(view(DATA "ramp_f4.npy", "--bogus", NULL, NULL, NULL, NULL) == 2, "unknown option");
    CHECK(view(DATA "ramp_f4.npy", "--cell", NULL, NULL, NULL, NULL) == 2, "option without value");
}

int main(void)
{
    test_good_files();
    test_torch_file();
    test_refused_files();
    test_broken_headers();
    test_truncation_and_noise();
    test_viewer();
    return tu_finish("test_npy");
}
