/* test_npy.c - the .npy reader (examples/npy.h) and the viewer (examples/mha_view.c)
   on files NumPy and PyTorch wrote (tests/data/npy, made by make_fixtures.py)
   and on broken files made here: each broken one must be refused with its
   status, field and message, the array untouched, never a crash (run under
   ASan too); the system's refusals name the path and the reason. */
#include <stdarg.h>
#define MHA_VIEW_NO_MAIN
#include "../examples/mha_view.c"   /* defines MHA_IMPLEMENTATION: mha.h, npy.h, heatmap.h */
#define STB_IMAGE_IMPLEMENTATION
#include "stb_image.h"
#include "testutil.h"
#include "errcheck.h"

#define DATA "tests/data/npy/"
#define TMP "build/tests/"

static mha_status loads(const char *path, mha_npy *a, mha_error *err)
{
    mha_status rc;
    memset(a, 0, sizeof *a);
    rc = mha_npy_load(path, a, err);
    if (rc != MHA_OK) printf("NOTE %s: %s\n", path, err->message);
    return rc;
}

/* The same ramp (value i/23 at flat index i, shape [2,3,4]) in every format. */
static void test_good_files(void)
{
    static const char *const files[] = {"ramp_f4.npy", "ramp_f8.npy", "ramp_v2.npy"};
    char path[256];
    mha_error err;
    size_t f, i;
    for (f = 0; f < 3; ++f) {
        mha_npy a;
        int bad = 0;
        snprintf(path, sizeof path, DATA "%s", files[f]);
        CHECK(loads(path, &a, &err) == MHA_OK && err.status == MHA_OK && err.message[0] == 0, "%s loads", files[f]);
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
        CHECK(loads(DATA "ramp_2d.npy", &a, &err) == MHA_OK && a.ndim == 2 && a.shape[0] == 3 &&
              a.shape[1] == 4 && a.data[5] == (float)(5.0 / 23.0), "2-D");
        mha_npy_free(&a);
        CHECK(loads(DATA "ramp_4d.npy", &a, &err) == MHA_OK && a.ndim == 4 && a.shape[0] == 1 &&
              a.shape[3] == 4 && a.data[23] == 1.0f, "4-D");
        mha_npy_free(&a);
    }
}

/* Real weights from nn.MultiheadAttention (causal, per head): every row sums
   to one, the future is exactly zero, and float32 and float64 files agree. */
static void test_torch_file(void)
{
    mha_npy a, b;
    mha_error err;
    size_t h, i, j;
    int L;
    CHECK(loads(DATA "torch_causal_f4.npy", &a, &err) == MHA_OK, "torch float32 loads");
    CHECK(loads(DATA "torch_causal_f8.npy", &b, &err) == MHA_OK, "torch float64 loads");
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

/* Files numpy/torch write that are not what we read: each refused, with its
   status, the field and a message naming the problem; the array untouched. */
static void test_refused_files(void)
{
    static const struct { const char *file; mha_status status; const char *field, *says; } bad[] = {
        {"bad_fortran.npy", MHA_ERR_SHAPE, "fortran_order", "fortran_order is True"},
        {"bad_bigendian.npy", MHA_ERR_SHAPE, "descr", "big-endian"},
        {"bad_int64.npy", MHA_ERR_SHAPE, "descr", "unsupported dtype '<i8': expected float32 ('<f4') or float64"},
        {"bad_float16.npy", MHA_ERR_SHAPE, "descr", "unsupported dtype '<f2'"},
        {"bad_empty.npy", MHA_ERR_SHAPE, "shape", "empty"},
        {"bad_torch_save.pt", MHA_ERR_FORMAT, "magic", "zip"},
    };
    size_t k;
    for (k = 0; k < sizeof bad / sizeof bad[0]; ++k) {
        char path[256];
        mha_error err;
        mha_npy a, before;
        mha_status rc;
        snprintf(path, sizeof path, DATA "%s", bad[k].file);
        memset(&a, 0x5A, sizeof a);   /* a refusal must not write it */
        before = a;
        rc = mha_npy_load(path, &a, &err);
        CHECK(ec_refused(rc, &err, bad[k].status, "mha_npy_load", bad[k].field, bad[k].says),
              "%s: got %d \"%s\", want %d, field %s, \"%s\"", bad[k].file, (int)rc, err.message, (int)bad[k].status,
              bad[k].field, bad[k].says);
        CHECK(memcmp(&a, &before, sizeof a) == 0, "%s: the array is untouched", bad[k].file);
    }
}

/* The system's refusals: MHA_ERR_IO with the path and the reason. */
static void test_io(void)
{
    mha_npy a;
    mha_error err;
    char want[256];
    memset(&a, 0, sizeof a);
    snprintf(want, sizeof want, "cannot open '" DATA "no_such_file.npy': %s", strerror(ENOENT));
    CHECK(ec_refused(mha_npy_load(DATA "no_such_file.npy", &a, &err), &err, MHA_ERR_IO, "mha_npy_load", "path", want),
          "missing file: \"%s\", want \"%s\"", err.message, want);
    snprintf(want, sizeof want, "'" DATA "': %s", strerror(EISDIR));
    CHECK(ec_refused(mha_npy_load(DATA, &a, &err), &err, MHA_ERR_IO, "mha_npy_load", "path", want),
          "a directory: \"%s\", want \"%s\"", err.message, want);
    CHECK(a.data == NULL && a.count == 0, "nothing loaded");
    CHECK(ec_refused(mha_npy_load(NULL, &a, &err), &err, MHA_ERR_NULL_POINTER, "mha_npy_load", "path", "is NULL"),
          "NULL path: %s", err.message);
    CHECK(ec_refused(mha_npy_load_mem(NULL, 0, &a, &err), &err, MHA_ERR_NULL_POINTER, "mha_npy_load_mem", "buf",
                     "is NULL"), "NULL buffer: %s", err.message);
    CHECK(mha_npy_load(DATA "no_such_file.npy", &a, NULL) == MHA_ERR_IO, "err may be NULL");
#if defined(__unix__) || defined(__APPLE__)
    {   /* a file without read permission (root reads it anyway: then skipped) */
        const char *path = TMP "unreadable.npy";
        if (tu_unreadable_file(path, "test_npy")) {
            snprintf(want, sizeof want, "cannot open '%s': %s", path, strerror(EACCES));
            CHECK(ec_refused(mha_npy_load(path, &a, &err), &err, MHA_ERR_IO, "mha_npy_load", "path", want),
                  "unreadable: \"%s\", want \"%s\"", err.message, want);
        }
        remove(path);
    }
#endif
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
    static const struct {
        const char *header;
        size_t data;
        mha_status status;
        const char *field, *says;
    } cases[] = {
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", 24, MHA_OK, NULL, NULL}, /* good */
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", 20, MHA_ERR_FORMAT, "data", "truncated"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", 28, MHA_ERR_FORMAT, "data", "after the data"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (), }\n", 4, MHA_ERR_SHAPE, "shape", "scalar"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }\n", 0, MHA_ERR_SHAPE, "shape", "empty"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }\n", 24, MHA_ERR_FORMAT, "shape", "negative"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }\n", 0, MHA_ERR_SHAPE, "shape",
         "absurd shape"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }\n", 0, MHA_ERR_SHAPE, "shape",
         "absurd shape"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }\n", 4, MHA_ERR_SHAPE, "shape",
         "dimensions"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3}\n", 24, MHA_ERR_FORMAT, "shape", "malformed"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }\n", 24, MHA_ERR_FORMAT, "shape", "non-number"},
        {"{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2, 3), }\n", 24, MHA_ERR_FORMAT, "fortran_order",
         "fortran_order"},
        {"{'descr': '<f4', 'shape': (2, 3), }\n", 24, MHA_ERR_FORMAT, "fortran_order", "missing fortran_order"},
        {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }\n", 8, MHA_ERR_FORMAT, "descr",
         "structured"},
        {"{'descr': '<c8', 'fortran_order': False, 'shape': (2, 3), }\n", 48, MHA_ERR_SHAPE, "descr",
         "unsupported dtype"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}\n", 24, MHA_ERR_FORMAT, "header",
         "unknown key"},
        {"['descr', '<f4']\n", 24, MHA_ERR_FORMAT, "header", "malformed"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", 24, MHA_ERR_FORMAT, "header", "malformed"},
        {"{'descr': '<f4\n", 24, MHA_ERR_FORMAT, "descr", "malformed"},
    };
    static unsigned char buf[1024];
    static float zeros[16];
    size_t k;
    for (k = 0; k < sizeof cases / sizeof cases[0]; ++k) {
        mha_error err;
        mha_npy a, zero;
        size_t n = make_npy(buf, 1, cases[k].header, zeros, cases[k].data);
        mha_status rc;
        memset(&a, 0, sizeof a);
        zero = a;
        rc = mha_npy_load_mem(buf, n, &a, &err);
        if (!cases[k].says) {
            CHECK(rc == MHA_OK && a.count == 6, "case %lu should load: %s", (unsigned long)k, err.message);
        } else {
            CHECK(ec_refused(rc, &err, cases[k].status, "mha_npy_load_mem", cases[k].field, cases[k].says),
                  "case %lu: got %d '%s', want %d, field %s, '%s'", (unsigned long)k, (int)rc, err.message,
                  (int)cases[k].status, cases[k].field, cases[k].says);
            CHECK(memcmp(&a, &zero, sizeof a) == 0, "case %lu: the array is untouched", (unsigned long)k);
        }
        mha_npy_free(&a);
    }
    /* the preamble itself */
    {
        mha_error err;
        mha_npy a, h;
        size_t off = 0;
        size_t n = make_npy(buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", zeros, 24);
        memset(&a, 0, sizeof a);
        buf[0] = 0x92;
        CHECK(ec_refused(mha_npy_load_mem(buf, n, &a, &err), &err, MHA_ERR_FORMAT, "mha_npy_load_mem", "magic",
                         "not a .npy"), "wrong magic: %s", err.message);
        buf[0] = 0x93;
        buf[6] = 9;
        CHECK(ec_refused(mha_npy_load_mem(buf, n, &a, &err), &err, MHA_ERR_FORMAT, "mha_npy_load_mem", "version",
                         "version 9"), "version 9: %s", err.message);
        buf[6] = 1;
        CHECK(ec_refused(mha_npy_load_mem(buf, 8, &a, &err), &err, MHA_ERR_FORMAT, "mha_npy_load_mem", "header length",
                         "truncated"), "8 bytes: %s", err.message);
        CHECK(mha_npy_load_mem(buf, 0, &a, &err) == MHA_ERR_FORMAT, "0 bytes");
        CHECK(ec_refused(mha_npy_load_mem(buf, 30, &a, &err), &err, MHA_ERR_FORMAT, "mha_npy_load_mem",
                         "header length", "truncated"), "cut header: %s", err.message);
        /* the header alone: its offset, nothing allocated */
        memset(&h, 0, sizeof h);
        CHECK(mha_npy_parse_header(buf, n, &h, &off, &err) == MHA_OK && h.count == 6 && h.data == NULL &&
              off == n - 24, "parse_header: %s", err.message);
        CHECK(ec_refused(mha_npy_parse_header(buf, n, &h, NULL, &err), &err, MHA_ERR_NULL_POINTER,
                         "mha_npy_parse_header", "data_offset", "is NULL"), "NULL data_offset: %s", err.message);
        /* a version-2 header length of 4 GiB */
        n = make_npy(buf, 2, "{}", NULL, 0);
        buf[8] = buf[9] = buf[10] = buf[11] = 0xff;
        CHECK(ec_refused(mha_npy_load_mem(buf, n, &a, &err), &err, MHA_ERR_FORMAT, "mha_npy_load_mem", "header length",
                         "absurd"), "4 GiB header: %s", err.message);
        CHECK(a.data == NULL && a.count == 0, "nothing loaded");
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
    mha_error err;
    mha_npy a;
    memset(&a, 0, sizeof a);
    for (cut = 0; cut < n; ++cut) {
        mha_status rc = mha_npy_load_mem(good, cut, &a, &err);
        if (rc == MHA_OK) ++accepted_prefix;
        else if (rc != MHA_ERR_FORMAT || !err.field || !strstr(err.message, "mha_npy_load_mem: ")) ++failed_quietly;
        mha_npy_free(&a);
    }
    CHECK(accepted_prefix == 0, "%d truncated prefixes accepted", accepted_prefix);
    CHECK(mha_npy_load_mem(good, n, &a, &err) == MHA_OK && a.data[5] == 0.6f, "the whole file loads");
    mha_npy_free(&a);
    for (it = 0; it < 3000; ++it) {
        int flips = 1 + (int)(tu_next(&r) % 4), f;
        mha_status rc;
        memcpy(buf, good, n);
        for (f = 0; f < flips; ++f) buf[tu_next(&r) % (n - 24)] = (unsigned char)tu_next(&r);
        rc = mha_npy_load_mem(buf, n, &a, &err);
        if (rc == MHA_OK) ++ok;
        else if ((rc != MHA_ERR_FORMAT && rc != MHA_ERR_SHAPE) || !err.field || strlen(err.message) < 24) ++failed_quietly;
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
        mha_error err;
        CHECK(p != NULL, "zeros-masked png");
        /* find the upper-right cell with the same layout the viewer used */
        if (p && loads(DATA "torch_causal_f4.npy", &a, &err) == MHA_OK) {
            memset(&hm, 0, sizeof hm);
            hm.weights = a.data; hm.Lq = 5; hm.Lk = 5; hm.title = "torch_causal_f4.npy, batch 0, head 0";
            a.data[4] = (float)NAN; /* so the legend, and so the layout, match */
            if (mha_heatmap_measure(&hm, NULL, &lay, &err) == MHA_OK && lay.width == w && lay.height == h) {
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
                    if (loads(DATA "torch_causal_f4.npy", &b, &err) == MHA_OK) {
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
    test_io();
    test_broken_headers();
    test_truncation_and_noise();
    test_viewer();
    return tu_finish("test_npy");
}
