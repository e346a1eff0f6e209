/* npy.h - read a NumPy .npy array of float32 or float64 as floats.   v1.0.0

   Enough of the .npy format (NumPy's numpy.save, torch via t.numpy()) to
   bring attention weights into C, and strict about everything else: each
   way a file can be wrong gets its own message instead of a crash.

   BUILD
     In exactly one C or C++ file:
         #define MHA_NPY_IMPLEMENTATION
         #include "npy.h"
     It includes "mha.h" for mha_status and mha_error (compile with -I
     pointing at the directory that holds mha.h), and its implementation
     "mha_report.h" (the error helpers the companion headers share), which
     stays next to npy.h.  A program that calls mha.h's functions,
     mha_status_string among them, defines MHA_IMPLEMENTATION in one file
     as usual.

   USAGE
       mha_npy a = {0};
       mha_error err;
       if (mha_npy_load("weights.npy", &a, &err) != MHA_OK) {
           fprintf(stderr, "%s\n", err.message);   // names the file and the reason
           return 1;
       }
       // a.ndim, a.shape[0..ndim-1], a.count floats in a.data (C order)
       mha_npy_free(&a);

   ERRORS (mha.h's convention)
     Every call that can fail returns an mha_status and takes an mha_error
     last (NULL allowed), filled on a refusal: status, function
     ("mha_npy_load"), field (the argument or the part of the file refused:
     "path", "magic", "version", "header length", "header", "descr",
     "fortran_order", "shape", "data") and a message
     "mha_npy_load: descr: what was expected, what was found".
       MHA_ERR_IO          the file cannot be opened or read: the message has
                           the path and the operating system's reason
       MHA_ERR_FORMAT      not a well-formed .npy (bad magic, malformed or
                           truncated header, data shorter or longer than the
                           shape says)
       MHA_ERR_SHAPE       a well-formed array this reader does not take:
                           another dtype, big-endian, Fortran order, a scalar
                           or empty array, a shape past the limits below
       MHA_ERR_NULL_POINTER, MHA_ERR_OUT_OF_MEMORY   as in mha.h
     On a refusal nothing is written to *a (a zeroed a stays zeroed, so
     mha_npy_free on it is harmless) or *data_offset.

   WHAT IS ACCEPTED
     format versions 1.0, 2.0 and 3.0 (3.0 only differs in the header's text encoding)
     dtype '<f4' or '<f8' ('=' or '|' in place of '<' on this little-endian reading)
     fortran_order False; 1 to MHA_NPY_MAX_DIMS dimensions, every one >= 1
     exactly shape-product * itemsize bytes of data after the header, checked
     against the file's size before the data is allocated
     header strings without NUL or other control bytes
   Everything is read as little-endian whatever the machine, and float64 is
   rounded to float32.

   FORMAT (from NumPy's documentation of numpy.lib.format)
     "\x93NUMPY", major, minor, header length (uint16 LE for 1.x, uint32 LE
     for 2.x/3.x), then an ASCII Python dict literal such as
       {'descr': '<f4', 'fortran_order': False, 'shape': (4, 9, 9), }
     padded with spaces and a final '\n', then the raw array.

   LICENSE  MIT or public domain, as mha.h.
*/
#ifndef MHA_NPY_H
#define MHA_NPY_H

#include <stddef.h>
#include "mha.h"

#ifndef MHA_NPY_DEF
#ifdef MHA_NPY_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define MHA_NPY_DEF static __attribute__((unused))
#else
#define MHA_NPY_DEF static
#endif
#else
#define MHA_NPY_DEF extern
#endif
#endif

/* Limits that turn a corrupt or hostile header into an error, not an allocation. */
#define MHA_NPY_MAX_DIMS 8
#define MHA_NPY_MAX_HEADER 65536             /* header bytes (NumPy writes < 200) */
#define MHA_NPY_MAX_ELEMENTS (1u << 28)      /* 256 Mi values, 1 GiB as floats */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mha_npy {
    int ndim;
    size_t shape[MHA_NPY_MAX_DIMS];
    size_t count;        /* product of the shape */
    int itemsize;        /* 4 or 8: what the file held */
    float *data;         /* count floats, C order; MHA_NPY_MALLOC'd */
} mha_npy;

/* Parse the header at the start of buf (n bytes available): fills a (data
   NULL) and *data_offset. */
MHA_NPY_DEF mha_status mha_npy_parse_header(const unsigned char *buf, size_t n, mha_npy *a,
                                            size_t *data_offset, mha_error *err);
/* A whole .npy held in memory. */
MHA_NPY_DEF mha_status mha_npy_load_mem(const unsigned char *buf, size_t n, mha_npy *a, mha_error *err);
/* A .npy file. */
MHA_NPY_DEF mha_status mha_npy_load(const char *path, mha_npy *a, mha_error *err);
/* Frees a->data and zeroes a; safe on a zeroed a (cannot fail). */
MHA_NPY_DEF void mha_npy_free(mha_npy *a);

#ifdef __cplusplus
}
#endif
#endif /* MHA_NPY_H */

#ifdef MHA_NPY_IMPLEMENTATION
#ifndef MHA_NPY_IMPLEMENTATION_DONE
#define MHA_NPY_IMPLEMENTATION_DONE

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "mha_report.h"

#if defined(MHA_NPY_MALLOC) != defined(MHA_NPY_FREE)
#error "npy.h: define both MHA_NPY_MALLOC and MHA_NPY_FREE, or neither"
#endif
#ifndef MHA_NPY_MALLOC
#include <stdlib.h>
#define MHA_NPY_MALLOC(sz) malloc(sz)
#define MHA_NPY_FREE(p) free(p)
#endif

/* Refusals, in mha.h's convention (mha_report.h): inside, every function
   takes a non-NULL mha_error (the public call lends its own when the
   caller passed NULL) and returns 0 or -1; the check that refuses first
   is the one reported, and the public call signs the message with its
   name: "mha_npy_load: descr: ...". */

/* ---- a tiny reader for the header's dict literal */

typedef struct { const char *p, *end; } mha_npy__cur;

static void mha_npy__ws(mha_npy__cur *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) ++c->p;
}
static int mha_npy__eat(mha_npy__cur *c, char ch)
{
    mha_npy__ws(c);
    if (c->p < c->end && *c->p == ch) { ++c->p; return 1; }
    return 0;
}
/* 'text' or "text" into out (at most cap-1 chars); 0 on a malformed string,
   -1 on a NUL or other control byte inside it (as C text '<f4\0' would read
   as '<f4') */
static int mha_npy__string(mha_npy__cur *c, char *out, size_t cap)
{
    char q;
    size_t n = 0;
    mha_npy__ws(c);
    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"')) return 0;
    q = *c->p++;
    while (c->p < c->end && *c->p != q) {
        if ((unsigned char)*c->p < 0x20) return -1;
        if (n + 1 >= cap) return 0;
        out[n++] = *c->p++;
    }
    if (c->p >= c->end) return 0;
    ++c->p;
    out[n] = 0;
    return 1;
}
static int mha_npy__word(mha_npy__cur *c, const char *w)
{
    size_t n = strlen(w);
    mha_npy__ws(c);
    if ((size_t)(c->end - c->p) >= n && memcmp(c->p, w, n) == 0) { c->p += n; return 1; }
    return 0;
}

/* The header into *a and *off; a is the caller's only when this succeeds
   (the public calls pass a local). */
static int mha_npy__header(const unsigned char *buf, size_t n, mha_npy *a, size_t *off, mha_error *err)
{
    static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    size_t hlen, start, total = 1;
    int major, have_descr = 0, have_order = 0, have_shape = 0, d, str;
    mha_npy__cur c;
    char key[32], descr[16];

    memset(a, 0, sizeof *a);
    if (n >= 4 && buf[0] == 'P' && buf[1] == 'K' && buf[2] == 3 && buf[3] == 4)
        return mha_report__fail(err, MHA_ERR_FORMAT, "magic",
                                "this is a zip archive (torch.save or numpy.savez), not a .npy file; "
                                "save with numpy.save(path, tensor.numpy())");
    if (n < 6 || memcmp(buf, magic, 6) != 0)
        return mha_report__fail(err, MHA_ERR_FORMAT, "magic", "not a .npy file (it does not start with \\x93NUMPY)");
    if (n < 10)
        return mha_report__fail(err, MHA_ERR_FORMAT, "header length",
                                "truncated: the file ends inside the .npy preamble");
    major = buf[6];
    if (major == 1) {
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8;
        start = 10;
    } else if (major == 2 || major == 3) {
        if (n < 12)
            return mha_report__fail(err, MHA_ERR_FORMAT, "header length",
                                    "truncated: the file ends inside the .npy preamble");
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8 | (size_t)buf[10] << 16 | (size_t)buf[11] << 24;
        start = 12;
    } else {
        return mha_report__fail(err, MHA_ERR_FORMAT, "version",
                                "unsupported .npy format version %d.%d (1.0, 2.0 and 3.0 are read)", major, buf[7]);
    }
    if (hlen > MHA_NPY_MAX_HEADER)
        return mha_report__fail(err, MHA_ERR_FORMAT, "header length",
                                "header length %lu is absurd (more than %d bytes)", (unsigned long)hlen,
                                MHA_NPY_MAX_HEADER);
    if (n < start + hlen)
        return mha_report__fail(err, MHA_ERR_FORMAT, "header length",
                                "truncated: the header says %lu bytes, the file has %lu after the preamble",
                                (unsigned long)hlen, (unsigned long)(n - start));

    /* {'key': value, ...} */
    c.p = (const char *)buf + start;
    c.end = c.p + hlen;
    if (!mha_npy__eat(&c, '{')) return mha_report__fail(err, MHA_ERR_FORMAT, "header", "malformed header: no '{'");
    for (;;) {
        if (mha_npy__eat(&c, '}')) break;
        if ((str = mha_npy__string(&c, key, sizeof key)) < 0)
            return mha_report__fail(err, MHA_ERR_FORMAT, "header",
                                    "malformed header: a key holds a NUL or control byte");
        if (!str || !mha_npy__eat(&c, ':'))
            return mha_report__fail(err, MHA_ERR_FORMAT, "header", "malformed header: expected 'key': value");
        if (strcmp(key, "descr") == 0) {
            if ((str = mha_npy__string(&c, descr, sizeof descr)) < 0)
                return mha_report__fail(err, MHA_ERR_FORMAT, "descr",
                                        "malformed header: descr holds a NUL or control byte");
            if (!str)
                return mha_report__fail(err, MHA_ERR_FORMAT, "descr",
                                        "malformed header: descr is not a simple type string "
                                        "(structured arrays are not supported)");
            have_descr = 1;
        } else if (strcmp(key, "fortran_order") == 0) {
            if (mha_npy__word(&c, "True"))
                return mha_report__fail(err, MHA_ERR_SHAPE, "fortran_order",
                                        "fortran_order is True: save a C-ordered array "
                                        "(numpy.ascontiguousarray) instead");
            if (!mha_npy__word(&c, "False"))
                return mha_report__fail(err, MHA_ERR_FORMAT, "fortran_order",
                                        "malformed header: fortran_order is neither True nor False");
            have_order = 1;
        } else if (strcmp(key, "shape") == 0) {
            if (!mha_npy__eat(&c, '('))
                return mha_report__fail(err, MHA_ERR_FORMAT, "shape", "malformed header: shape is not a tuple");
            a->ndim = 0;
            while (!mha_npy__eat(&c, ')')) {
                size_t v = 0;
                int digits = 0;
                mha_npy__ws(&c);
                if (c.p < c.end && *c.p == '-')
                    return mha_report__fail(err, MHA_ERR_FORMAT, "shape", "malformed header: negative dimension");
                while (c.p < c.end && *c.p >= '0' && *c.p <= '9') {
                    if (v > (SIZE_MAX - 9) / 10 || ++digits > 12)
                        return mha_report__fail(err, MHA_ERR_SHAPE, "shape",
                                                "absurd shape: a dimension has more than 12 digits");
                    v = v * 10 + (size_t)(*c.p++ - '0');
                }
                if (!digits)
                    return mha_report__fail(err, MHA_ERR_FORMAT, "shape",
                                            "malformed header: shape holds a non-number");
                if (c.p < c.end && *c.p == 'L') ++c.p; /* Python 2 long */
                if (a->ndim >= MHA_NPY_MAX_DIMS)
                    return mha_report__fail(err, MHA_ERR_SHAPE, "shape", "absurd shape: more than %d dimensions",
                                            MHA_NPY_MAX_DIMS);
                a->shape[a->ndim++] = v;
                if (!mha_npy__eat(&c, ',')) {
                    if (!mha_npy__eat(&c, ')'))
                        return mha_report__fail(err, MHA_ERR_FORMAT, "shape",
                                                "malformed header: shape tuple not closed");
                    break;
                }
            }
            have_shape = 1;
        } else {
            return mha_report__fail(err, MHA_ERR_FORMAT, "header", "malformed header: unknown key '%s'", key);
        }
        if (!mha_npy__eat(&c, ',')) {
            if (!mha_npy__eat(&c, '}'))
                return mha_report__fail(err, MHA_ERR_FORMAT, "header", "malformed header: expected ',' or '}'");
            break;
        }
    }
    if (!have_descr || !have_order || !have_shape)
        return mha_report__fail(err, MHA_ERR_FORMAT, !have_descr ? "descr" : !have_order ? "fortran_order" : "shape",
                                "malformed header: missing %s",
                                !have_descr ? "descr" : !have_order ? "fortran_order" : "shape");

    /* the type: little-endian IEEE float of 4 or 8 bytes */
    if ((descr[0] == '<' || descr[0] == '=' || descr[0] == '|') && strcmp(descr + 1, "f4") == 0) {
        a->itemsize = 4;
    } else if ((descr[0] == '<' || descr[0] == '=' || descr[0] == '|') && strcmp(descr + 1, "f8") == 0) {
        a->itemsize = 8;
    } else if (descr[0] == '>' && (strcmp(descr + 1, "f4") == 0 || strcmp(descr + 1, "f8") == 0)) {
        return mha_report__fail(err, MHA_ERR_SHAPE, "descr",
                                "dtype '%s' is big-endian; expected '<f4' or '<f8' (save with arr.astype('<f4'))",
                                descr);
    } else {
        return mha_report__fail(err, MHA_ERR_SHAPE, "descr",
                                "unsupported dtype '%s': expected float32 ('<f4') or float64 ('<f8') "
                                "(convert with arr.astype('float32'))", descr);
    }

    /* the shape: no zero dimension, a product that fits */
    if (a->ndim == 0)
        return mha_report__fail(err, MHA_ERR_SHAPE, "shape", "the array is a scalar (shape ()), not a map");
    for (d = 0; d < a->ndim; ++d) {
        if (a->shape[d] == 0)
            return mha_report__fail(err, MHA_ERR_SHAPE, "shape", "the array is empty (dimension %d is 0)", d);
        if (a->shape[d] > MHA_NPY_MAX_ELEMENTS || total > MHA_NPY_MAX_ELEMENTS / a->shape[d])
            return mha_report__fail(err, MHA_ERR_SHAPE, "shape", "absurd shape: more than %lu values",
                                    (unsigned long)MHA_NPY_MAX_ELEMENTS);
        total *= a->shape[d];
    }
    a->count = total;
    *off = start + hlen;
    return 0;
}

MHA_NPY_DEF mha_status mha_npy_parse_header(const unsigned char *buf, size_t n, mha_npy *a,
                                            size_t *data_offset, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    mha_npy h;
    size_t off = 0;
    if (mha_report__need(e, "buf", buf) == 0 && mha_report__need(e, "a", a) == 0 &&
        mha_report__need(e, "data_offset", data_offset) == 0 && mha_npy__header(buf, n, &h, &off, e) == 0) {
        *a = h;
        *data_offset = off;
    }
    return mha_report__end(e, "mha_npy_parse_header");
}

/* Little-endian bytes to float, whatever this machine's order is. */
static float mha_npy__f4(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float mha_npy__f8(const unsigned char *p)
{
    uint64_t u = 0;
    double d;
    int k;
    for (k = 7; k >= 0; --k) u = u << 8 | p[k];
    memcpy(&d, &u, 8);
    return (float)d;
}

static int mha_npy__convert(const unsigned char *raw, mha_npy *a, mha_error *err)
{
    size_t i;
    a->data = (float *)MHA_NPY_MALLOC(a->count * sizeof(float));
    if (!a->data)
        return mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory for %lu values",
                                (unsigned long)a->count);
    for (i = 0; i < a->count; ++i)
        a->data[i] = a->itemsize == 4 ? mha_npy__f4(raw + 4 * i) : mha_npy__f8(raw + 8 * i);
    return 0;
}

MHA_NPY_DEF mha_status mha_npy_load_mem(const unsigned char *buf, size_t n, mha_npy *a, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    mha_npy h;
    size_t off = 0, need;
    if (mha_report__need(e, "buf", buf) == 0 && mha_report__need(e, "a", a) == 0 &&
        mha_npy__header(buf, n, &h, &off, e) == 0) {
        need = h.count * (size_t)h.itemsize;
        if (n - off < need)
            mha_report__fail(e, MHA_ERR_FORMAT, "data",
                             "truncated: the shape needs %lu bytes of data, the file has %lu",
                             (unsigned long)need, (unsigned long)(n - off));
        else if (n - off > need)
            mha_report__fail(e, MHA_ERR_FORMAT, "data",
                             "%lu bytes after the data the shape describes: not one .npy array",
                             (unsigned long)(n - off - need));
        else if (mha_npy__convert(buf + off, &h, e) == 0)
            *a = h;
    }
    return mha_report__end(e, "mha_npy_load_mem");
}

/* The file's size into *size, keeping the read position at pos: 1, or 0
   when the stream has no size (a pipe), -1 when the position is lost. */
static int mha_npy__file_size(FILE *f, size_t pos, size_t *size)
{
    long end;
    if (fseek(f, 0, SEEK_END) != 0) return 0;
    end = ftell(f);
    if (fseek(f, (long)pos, SEEK_SET) != 0) return -1;
    if (end < 0) return 0;
    *size = (size_t)end;
    return 1;
}

/* A file.  When a read stops short, the stream's error flag tells the two
   cases apart: the system failed (MHA_ERR_IO, with its reason), or the file
   ended early (MHA_ERR_FORMAT: its contents are short). */
static int mha_npy__load(const char *path, mha_npy *a, mha_error *err)
{
    /* First the preamble and the longest header allowed, then exactly the
       data the header describes plus one byte to notice trailing garbage:
       nothing sized by the header is allocated before the header is checked,
       and, where the file has a size, before the file is known to hold it. */
    const size_t first = 12 + MHA_NPY_MAX_HEADER;
    unsigned char *head = NULL, *data = NULL;
    size_t got, off = 0, need = 0, have, more, size = 0;
    int rc, sized;
    const char *dots, *shown = mha_report__tail(path, &dots);
    mha_npy h;
    FILE *f;
    memset(&h, 0, sizeof h);
    errno = 0;
    f = fopen(path, "rb");
    if (!f) return mha_report__io(err, "cannot open", path, errno, "fopen failed");
    head = (unsigned char *)MHA_NPY_MALLOC(first);
    if (!head) { fclose(f); return mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory"); }
    errno = 0;
    got = fread(head, 1, first, f);
    if (got < first && ferror(f))   /* a directory opens, but reading it fails */
        rc = mha_report__io(err, "cannot read", path, errno, "the read failed");
    else
        rc = mha_npy__header(head, got, &h, &off, err);
    if (rc == 0) {
        need = h.count * (size_t)h.itemsize;
        errno = 0;
        sized = mha_npy__file_size(f, got, &size);
        if (sized < 0) {
            rc = mha_report__fail(err, MHA_ERR_IO, "path", "cannot seek back in '%s%s' after measuring it: %s",
                                  dots, shown, mha_report__reason(errno, "the stream lost its position"));
        } else if (sized > 0 && size - off < need) {
            rc = mha_report__fail(err, MHA_ERR_FORMAT, "data",
                                  "truncated: the shape needs %lu bytes of data, the file has %lu",
                                  (unsigned long)need, (unsigned long)(size - off));
        }
    }
    if (rc == 0) {
        data = (unsigned char *)MHA_NPY_MALLOC(need + 1);
        if (!data)
            rc = mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory for %lu bytes",
                                  (unsigned long)need);
    }
    if (rc == 0) {
        have = got - off;               /* data bytes that came with the first read */
        if (have > need + 1) have = need + 1;
        memcpy(data, head + off, have);
        errno = 0;
        more = have <= need ? fread(data + have, 1, need + 1 - have, f) : 0;
        if (have + more <= need && ferror(f)) {
            rc = mha_report__io(err, "cannot read", path, errno, "the read failed");
        } else if (have + more < need) {
            rc = mha_report__fail(err, MHA_ERR_FORMAT, "data",
                                  "truncated: the shape needs %lu bytes of data, the file has %lu",
                                  (unsigned long)need, (unsigned long)(have + more));
        } else if (have + more > need) {
            rc = mha_report__fail(err, MHA_ERR_FORMAT, "data",
                                  "there are bytes after the data the shape describes: not a single .npy array");
        } else {
            rc = mha_npy__convert(data, &h, err);
        }
    }
    MHA_NPY_FREE(data);
    MHA_NPY_FREE(head);
    fclose(f);
    if (rc == 0) *a = h;
    else MHA_NPY_FREE(h.data);
    return rc;
}

MHA_NPY_DEF mha_status mha_npy_load(const char *path, mha_npy *a, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (mha_report__need(e, "path", path) == 0 && mha_report__need(e, "a", a) == 0) mha_npy__load(path, a, e);
    return mha_report__end(e, "mha_npy_load");
}

MHA_NPY_DEF void mha_npy_free(mha_npy *a)
{
    if (!a) return;
    MHA_NPY_FREE(a->data);
    memset(a, 0, sizeof *a);
}

#endif /* MHA_NPY_IMPLEMENTATION_DONE */
#endif /* MHA_NPY_IMPLEMENTATION */
