/* safetensors.h - read PyTorch weights saved as .safetensors.      v1.0.0

   A companion of mha.h: open a .safetensors file (from memory, or a file
   that is memory-mapped where the system allows it), find tensors by their
   state_dict name, convert F32, F16, BF16 and F64 to float32 (or float64),
   and fill an mha_module or mha_encoder_layer from a state_dict prefix.
   Strict: every way a file can be wrong is refused with its own message.

   BUILD
     In exactly one C or C++ file:
         #define MHA_IMPLEMENTATION        // once in the program, for mha.h itself
         #include "mha.h"
         #define MHA_ST_IMPLEMENTATION
         #include "safetensors.h"          (installed: <mha/safetensors.h>)
     It includes "mha.h" for the module types and mha_status / mha_error;
     compile with -I pointing at the directory that holds mha.h.  Its
     implementation includes "mha_report.h" (the error helpers the
     companion headers share), which stays next to safetensors.h.

   USAGE
       mha_st_file f = {0};
       mha_encoder_layer layer = {0};
       mha_error err;
       if (mha_st_open("model.safetensors", &f, &err) != MHA_OK ||
           mha_st_encoder_layer(&f, "layers.0.", 8, &layer, &err) != MHA_OK) {
           fprintf(stderr, "%s\n", err.message);
           ...
       }
       // layer points into f: run mha_encoder_forward, then
       mha_st_close(&f);

   ERRORS (mha.h's convention)
     Every call that can fail returns an mha_status and takes an mha_error
     last (NULL allowed), filled on a refusal: status, function ("mha_st_open"),
     field (the argument, the part of the file or the state_dict key refused:
     "path", "data_offsets", "out_proj.bias", ...) and a message
     "mha_st_open: field: what was expected, what was found".
       MHA_ERR_IO             the file cannot be opened or read; the message
                              has the path and the operating system's reason
       MHA_ERR_FORMAT         the bytes are not a valid .safetensors file
       MHA_ERR_NOT_FOUND      a tensor a call needs is not in the file
       MHA_ERR_SHAPE          a tensor's shape or dtype is not the one needed;
                              the message has the tensor's name, the rule, and
                              the expected and found shape and dtype
       MHA_ERR_HEADS_DIVIDE   num_heads does not divide embed_dim
       MHA_ERR_NULL_POINTER, MHA_ERR_INVALID_SIZE, MHA_ERR_INVALID_ARGUMENT,
       MHA_ERR_OUT_OF_MEMORY  as in mha.h
     On a refusal nothing is written to the caller's structs (f, m, layer,
     *out): a zeroed f stays zeroed, and mha_st_close on it is harmless.

   THE FORMAT (as Hugging Face's safetensors defines it)
       8 bytes     N, the header length, unsigned 64-bit little-endian
       N bytes     a JSON object (UTF-8), may end with spaces:
                     {"name": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                      ..., "__metadata__": {"key": "string value", ...}}
       the rest    the data section: raw little-endian values, C order;
                   data_offsets are [begin, end) byte offsets into it
   WHAT IS CHECKED (each gets its own error message, MHA_ERR_FORMAT)
     the file is at least 8 bytes; N is at most MHA_ST_MAX_HEADER and fits
     in the file; the header is valid UTF-8 and valid JSON (a single object,
     only spaces after it); every tensor has exactly the fields dtype, shape
     and data_offsets; dtype is a safetensors dtype; shape holds at most
     MHA_ST_MAX_DIMS non-negative integers; begin <= end; end - begin =
     product(shape) * dtype size; the tensors lie inside the data section,
     do not overlap, leave no hole and cover it to its end (as the format
     requires); no name appears twice; __metadata__ maps strings to strings.
     Tensors of other dtypes (I64, BOOL, ...) are listed, their bytes checked,
     but converting them is refused (MHA_ERR_SHAPE).

   LIMITS  MHA_ST_MAX_HEADER (100 MB, as the reference reader), MHA_ST_MAX_DIMS 8.
   CONFIG  MHA_ST_MALLOC / MHA_ST_FREE (both or neither), MHA_ST_STATIC,
           MHA_ST_NO_MMAP (always read the file into memory).
   LICENSE MIT or public domain, as mha.h.
*/
#ifndef MHA_ST_H
#define MHA_ST_H

#include <stddef.h>
#include "mha.h"

#ifndef MHA_ST_DEF
#ifdef MHA_ST_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define MHA_ST_DEF static __attribute__((unused))
#else
#define MHA_ST_DEF static
#endif
#else
#define MHA_ST_DEF extern
#endif
#endif

#define MHA_ST_MAX_DIMS 8
#define MHA_ST_MAX_HEADER 100000000u
/* The longest state_dict prefix mha_st_module / mha_st_encoder_layer take. */
#define MHA_ST_MAX_PREFIX 400

#ifdef __cplusplus
extern "C" {
#endif

/* Every dtype the format names; the first four are read. */
typedef enum mha_st_dtype {
    MHA_ST_F32 = 0, MHA_ST_F16, MHA_ST_BF16, MHA_ST_F64,
    MHA_ST_BOOL, MHA_ST_U8, MHA_ST_I8, MHA_ST_I16, MHA_ST_U16, MHA_ST_I32, MHA_ST_U32,
    MHA_ST_I64, MHA_ST_U64, MHA_ST_F8_E4M3, MHA_ST_F8_E5M2,
    MHA_ST_DTYPE_COUNT
} mha_st_dtype;

typedef struct mha_st_tensor {
    const char *name;                 /* the state_dict key, NUL-terminated */
    mha_st_dtype dtype;
    int ndim;                         /* 0 for a scalar */
    size_t shape[MHA_ST_MAX_DIMS];
    size_t count;                     /* product of the shape */
    size_t begin, end;                /* byte range in the data section */
    const unsigned char *raw;         /* its bytes (little-endian, maybe unaligned) */
} mha_st_tensor;

typedef struct mha_st_file {
    int count;                        /* tensors, sorted by name */
    mha_st_tensor *tensors;
    int meta_count;                   /* __metadata__ pairs: meta[2i] key, meta[2i+1] value */
    const char **meta;
    /* private */
    char *strings;                    /* decoded names and metadata */
    float **f32;                      /* converted copies, made on demand */
    uint16_t **h16[2];                /* F16 and BF16 copies (mha_st_module's 16-bit weights) */
    const unsigned char *bytes;       /* the whole file */
    size_t size;
    void *owned;                      /* read into memory: freed at close */
    void *map;                        /* mmap'd: unmapped at close */
} mha_st_file;

/* Open a .safetensors held in memory (buf must outlive f), or a file
   (mmap'd where possible; mha_st_open_read always reads it into memory).
   On a refusal f is left as it was. */
MHA_ST_DEF mha_status mha_st_open_mem(const void *buf, size_t n, mha_st_file *f, mha_error *err);
MHA_ST_DEF mha_status mha_st_open(const char *path, mha_st_file *f, mha_error *err);
MHA_ST_DEF mha_status mha_st_open_read(const char *path, mha_st_file *f, mha_error *err);
/* Frees everything; every pointer taken from f dies.  Safe on a zeroed f
   (cannot fail). */
MHA_ST_DEF void mha_st_close(mha_st_file *f);

/* Queries (cannot fail): the tensor of that name, or NULL (binary search);
   a __metadata__ value, or NULL; a dtype's name, "F32", "BF16", ... ("?"
   outside the enum). */
MHA_ST_DEF const mha_st_tensor *mha_st_find(const mha_st_file *f, const char *name);
MHA_ST_DEF const char *mha_st_metadata(const mha_st_file *f, const char *key);
MHA_ST_DEF const char *mha_st_dtype_name(mha_st_dtype d);

/* Convert a tensor of a read dtype into dst, which holds count values:
   count must be the tensor's (else MHA_ERR_SHAPE, as for a dtype that is
   not read). */
MHA_ST_DEF mha_status mha_st_read_f32(const mha_st_tensor *t, float *dst, size_t count, mha_error *err);
MHA_ST_DEF mha_status mha_st_read_f64(const mha_st_tensor *t, double *dst, size_t count, mha_error *err);
/* The tensor as 16-bit elements of mha.h's type `to` (MHA_F16 or MHA_BF16)
   into dst, count uint16_t in the host's byte order: a tensor of that type
   is copied bit for bit, an F32 one or one of the other 16-bit type is
   rounded as mha_convert rounds (to nearest even).  F64 tensors are
   refused (MHA_ERR_SHAPE: two roundings through float32 could differ from
   one), as is a `to` that is not a 16-bit type (MHA_ERR_INVALID_ARGUMENT). */
MHA_ST_DEF mha_status mha_st_read16(const mha_st_tensor *t, mha_dtype to, void *dst, size_t count, mha_error *err);

/* *out = the tensor `name` as float32, converted once and kept until
   mha_st_close.  ndim/shape: the expected shape (ndim < 0: any).
   MHA_ERR_NOT_FOUND when it is missing, MHA_ERR_SHAPE when its shape
   differs or its dtype is not read. */
MHA_ST_DEF mha_status mha_st_floats(mha_st_file *f, const char *name, int ndim, const size_t *shape,
                                    const float **out, mha_error *err);

/* Fill m from the state_dict of an nn.MultiheadAttention under prefix
   ("" or e.g. "layers.0.self_attn."): embed_dim from out_proj.weight,
   in_proj_weight or q/k/v_proj_weight (kdim, vdim from their shapes),
   optional in_proj_bias, out_proj.bias, bias_k/bias_v.  num_heads is not in
   a state_dict: pass it.  Everything else in m (add_zero_attn,
   num_kv_heads, rope, weight_dtype) is left as it was.  The weight
   matrices come as m->weight_dtype asks: float32, or kept in F16 / BF16
   (a checkpoint's own 16-bit tensors copied bit for bit, others rounded
   as mha_convert; F64 refused) for a plan made with MHA_PLAN_PACK.  On a refusal m is untouched and
   err names the missing or misshaped tensor (field: its key without the
   prefix, "out_proj.bias"). */
MHA_ST_DEF mha_status mha_st_module(mha_st_file *f, const char *prefix, int num_heads, mha_module *m,
                                    mha_error *err);
/* Fill an nn.TransformerEncoderLayer's tensors (self_attn.*, linear1/2, norm1/2)
   under prefix (e.g. "layers.0.").  activation, norm_first, layer_norm_eps
   and self_attn.add_zero_attn are not in the state_dict and are left as
   they were.  On a refusal layer is untouched. */
MHA_ST_DEF mha_status mha_st_encoder_layer(mha_st_file *f, const char *prefix, int nhead,
                                           mha_encoder_layer *layer, mha_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MHA_ST_H */

#ifdef MHA_ST_IMPLEMENTATION
#ifndef MHA_ST_IMPLEMENTATION_DONE
#define MHA_ST_IMPLEMENTATION_DONE

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mha_report.h"

#if defined(MHA_ST_MALLOC) != defined(MHA_ST_FREE)
#error "safetensors.h: define both MHA_ST_MALLOC and MHA_ST_FREE, or neither"
#endif
#ifndef MHA_ST_MALLOC
#define MHA_ST_MALLOC(sz) malloc(sz)
#define MHA_ST_FREE(p) free(p)
#endif

#if !defined(MHA_ST_NO_MMAP) && (defined(__unix__) || defined(__APPLE__))
#define MHA_ST__MMAP 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#ifdef __cplusplus
#define MHA_ST__CAST(T, x) static_cast<T>(x)
#else
#define MHA_ST__CAST(T, x) ((T)(x))
#endif

/* Refusals, in mha.h's convention (mha_report.h): inside, every function
   takes a non-NULL mha_error (the public call lends its own when the
   caller passed NULL) and returns 0 or -1; the check that refuses first
   is the one reported, and the public call signs the message with its
   name: "mha_st_open: data_offsets: tensor 'a': ...". */

static const char *const mha_st__dtype_names[MHA_ST_DTYPE_COUNT] = {
    "F32", "F16", "BF16", "F64", "BOOL", "U8", "I8", "I16", "U16", "I32", "U32",
    "I64", "U64", "F8_E4M3", "F8_E5M2"};
static const unsigned char mha_st__dtype_size[MHA_ST_DTYPE_COUNT] = {
    4, 2, 2, 8, 1, 1, 1, 2, 2, 4, 4, 8, 8, 1, 1};

MHA_ST_DEF const char *mha_st_dtype_name(mha_st_dtype d)
{
    return (unsigned)d < MHA_ST_DTYPE_COUNT ? mha_st__dtype_names[d] : "?";
}

/* ---- UTF-8: the header must be valid (no overlong forms, no surrogates) */
static size_t mha_st__bad_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i], need, cp, k;
        if (c < 0x80) { ++i; continue; }
        if (c >= 0xC2 && c <= 0xDF) { need = 1; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { need = 2; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { need = 3; cp = c & 0x07; }
        else return i + 1;
        if (n - i <= need) return i + 1;
        for (k = 1; k <= need; ++k) {
            if ((s[i + k] & 0xC0) != 0x80) return i + 1;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if ((need == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
            (need == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return i + 1;
        i += need + 1;
    }
    return 0;
}

/* ---- a JSON reader for exactly the shapes a header has */
typedef struct {
    const char *p, *begin, *end;
    char *out;       /* decoded strings are appended here */
    mha_error *err;
} mha_st__json;

static int mha_st__jfail(mha_st__json *j, const char *what)
{
    return mha_report__fail(j->err, MHA_ERR_FORMAT, "header", "JSON syntax error in the header at byte %lu: %s",
                            (unsigned long)(j->p - j->begin), what);
}
static void mha_st__ws(mha_st__json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) ++j->p;
}
static int mha_st__eat(mha_st__json *j, char c)
{
    mha_st__ws(j);
    if (j->p < j->end && *j->p == c) { ++j->p; return 1; }
    return 0;
}
static int mha_st__hex4(mha_st__json *j, unsigned *v)
{
    int k;
    *v = 0;
    if (j->end - j->p < 4) return 0;
    for (k = 0; k < 4; ++k) {
        char c = *j->p++;
        unsigned d;
        if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
        else return 0;
        *v = *v << 4 | d;
    }
    return 1;
}
/* A string, decoded (escapes, \u with surrogate pairs -> UTF-8) and
   NUL-terminated at j->out; *s points at it.  A JSON string is never
   shorter than its decoding plus a NUL, so out never outgrows the header. */
static int mha_st__string(mha_st__json *j, const char **s)
{
    char *o = j->out;
    mha_st__ws(j);
    if (j->p >= j->end || *j->p != '"') return mha_st__jfail(j, "expected a string");
    ++j->p;
    for (;;) {
        unsigned char c;
        if (j->p >= j->end) return mha_st__jfail(j, "unterminated string");
        c = (unsigned char)*j->p++;
        if (c == '"') break;
        if (c < 0x20) return mha_st__jfail(j, "control character inside a string");
        if (c != '\\') { *o++ = (char)c; continue; }
        if (j->p >= j->end) return mha_st__jfail(j, "unterminated string");
        c = (unsigned char)*j->p++;
        switch (c) {
        case '"': case '\\': case '/': *o++ = (char)c; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (!mha_st__hex4(j, &cp)) return mha_st__jfail(j, "bad \\u escape");
            if (cp >= 0xDC00 && cp <= 0xDFFF) return mha_st__jfail(j, "lone low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u')
                    return mha_st__jfail(j, "high surrogate without its low half");
                j->p += 2;
                if (!mha_st__hex4(j, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return mha_st__jfail(j, "high surrogate without its low half");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (cp == 0) return mha_st__jfail(j, "\\u0000 inside a string");
            if (cp < 0x80) *o++ = (char)cp;
            else if (cp < 0x800) { *o++ = (char)(0xC0 | cp >> 6); *o++ = (char)(0x80 | (cp & 0x3F)); }
            else if (cp < 0x10000) {
                *o++ = (char)(0xE0 | cp >> 12); *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *o++ = (char)(0x80 | (cp & 0x3F));
            } else {
                *o++ = (char)(0xF0 | cp >> 18); *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
                *o++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *o++ = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default: return mha_st__jfail(j, "unknown escape in a string");
        }
    }
    *o++ = 0;
    *s = j->out;
    j->out = o;
    return 0;
}
/* A non-negative JSON integer (no sign, fraction, exponent or leading zero). */
static int mha_st__uint(mha_st__json *j, size_t *v, const char *field, const char *what)
{
    size_t x = 0;
    int digits = 0;
    mha_st__ws(j);
    if (j->p < j->end && *j->p == '-')
        return mha_report__fail(j->err, MHA_ERR_FORMAT, field, "%s holds a negative number", what);
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        size_t d = (size_t)(*j->p - '0');
        if (digits == 1 && x == 0) return mha_st__jfail(j, "number with a leading zero");
        if (x > (SIZE_MAX - d) / 10)
            return mha_report__fail(j->err, MHA_ERR_FORMAT, field, "%s holds a number too large for this machine",
                                    what);
        x = x * 10 + d;
        ++digits;
        ++j->p;
    }
    if (!digits) return mha_st__jfail(j, "expected a non-negative integer");
    if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E'))
        return mha_report__fail(j->err, MHA_ERR_FORMAT, field, "%s holds a number that is not an integer", what);
    *v = x;
    return 0;
}
/* [n, n, ...] into v (at most cap values); *count gets how many */
static int mha_st__uint_array(mha_st__json *j, size_t *v, int cap, int *count, const char *field,
                              const char *what)
{
    int n = 0;
    if (!mha_st__eat(j, '[')) return mha_st__jfail(j, "expected '['");
    if (!mha_st__eat(j, ']')) {
        for (;;) {
            size_t x = 0;
            if (mha_st__uint(j, &x, field, what)) return -1;
            if (n >= cap)
                return mha_report__fail(j->err, MHA_ERR_FORMAT, field, "%s has more than %d entries", what, cap);
            v[n++] = x;
            if (mha_st__eat(j, ']')) break;
            if (!mha_st__eat(j, ',')) return mha_st__jfail(j, "expected ',' or ']'");
        }
    }
    *count = n;
    return 0;
}

/* {"dtype": "F32", "shape": [...], "data_offsets": [b, e]} */
static int mha_st__tensor_info(mha_st__json *j, mha_st_tensor *t)
{
    int have_dtype = 0, have_shape = 0, have_off = 0;
    char what[160];
    snprintf(what, sizeof what, "tensor '%.100s'", t->name);
    if (!mha_st__eat(j, '{')) return mha_st__jfail(j, "a tensor entry must be an object");
    if (mha_st__eat(j, '}')) goto done;
    for (;;) {
        const char *key, *val;
        char *mark = j->out;
        if (mha_st__string(j, &key)) return -1;
        if (!mha_st__eat(j, ':')) return mha_st__jfail(j, "expected ':'");
        if (strcmp(key, "dtype") == 0) {
            int d;
            if (have_dtype++) return mha_report__fail(j->err, MHA_ERR_FORMAT, "dtype", "%s: dtype given twice", what);
            if (mha_st__string(j, &val)) return -1;
            for (d = 0; d < MHA_ST_DTYPE_COUNT; ++d)
                if (strcmp(val, mha_st__dtype_names[d]) == 0) break;
            if (d == MHA_ST_DTYPE_COUNT)
                return mha_report__fail(j->err, MHA_ERR_FORMAT, "dtype", "%s: unknown dtype '%.20s'", what, val);
            t->dtype = (mha_st_dtype)d;
        } else if (strcmp(key, "shape") == 0) {
            char w[200];
            if (have_shape++) return mha_report__fail(j->err, MHA_ERR_FORMAT, "shape", "%s: shape given twice", what);
            snprintf(w, sizeof w, "%s: shape", what);
            if (mha_st__uint_array(j, t->shape, MHA_ST_MAX_DIMS, &t->ndim, "shape", w)) return -1;
        } else if (strcmp(key, "data_offsets") == 0) {
            size_t off[2];
            int n = 0;
            char w[200];
            if (have_off++)
                return mha_report__fail(j->err, MHA_ERR_FORMAT, "data_offsets", "%s: data_offsets given twice", what);
            snprintf(w, sizeof w, "%s: data_offsets", what);
            if (mha_st__uint_array(j, off, 2, &n, "data_offsets", w)) return -1;
            if (n != 2)
                return mha_report__fail(j->err, MHA_ERR_FORMAT, "data_offsets",
                                        "%s: data_offsets must be [begin, end]", what);
            t->begin = off[0];
            t->end = off[1];
        } else {
            return mha_report__fail(j->err, MHA_ERR_FORMAT, "header", "%s: unknown field '%.40s'", what, key);
        }
        j->out = mark;   /* keys and the dtype string are not kept */
        if (mha_st__eat(j, '}')) break;
        if (!mha_st__eat(j, ',')) return mha_st__jfail(j, "expected ',' or '}'");
    }
done:
    if (!have_dtype || !have_shape || !have_off) {
        const char *missing = !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets";
        return mha_report__fail(j->err, MHA_ERR_FORMAT, missing, "%s: missing %s", what, missing);
    }
    return 0;
}

static int mha_st__by_name(const void *a, const void *b)
{
    return strcmp(MHA_ST__CAST(const mha_st_tensor *, a)->name, MHA_ST__CAST(const mha_st_tensor *, b)->name);
}
static int mha_st__by_begin(const void *a, const void *b)
{
    const mha_st_tensor *x = *MHA_ST__CAST(const mha_st_tensor *const *, a);
    const mha_st_tensor *y = *MHA_ST__CAST(const mha_st_tensor *const *, b);
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Grow an array of `size`-byte items from cap to 2*cap (no realloc hook). */
static void *mha_st__grow(void *old, size_t used, size_t size, size_t *cap)
{
    size_t nc = *cap ? *cap * 2 : 16;
    void *p = MHA_ST_MALLOC(nc * size);
    if (!p) return NULL;
    if (used) memcpy(p, old, used * size);
    MHA_ST_FREE(old);
    *cap = nc;
    return p;
}

/* The header and the layout of the data section.  f->bytes/size are set. */
static int mha_st__parse(mha_st_file *f, mha_error *err)
{
    const unsigned char *b = f->bytes;
    size_t n = f->size, cap = 0, meta_cap = 0, i, bad, data_size;
    unsigned long long hlen = 0;
    const mha_st_tensor **order = NULL;
    int k, seen_meta = 0;
    mha_st__json j;

    if (n < 8)
        return mha_report__fail(err, MHA_ERR_FORMAT, "header length",
                                "truncated: %lu bytes, fewer than the 8 of the header length", (unsigned long)n);
    for (k = 7; k >= 0; --k) hlen = hlen << 8 | b[k];
    if (hlen > MHA_ST_MAX_HEADER)
        return mha_report__fail(err, MHA_ERR_FORMAT, "header length",
                                "header length %llu is larger than the %u allowed", hlen, (unsigned)MHA_ST_MAX_HEADER);
    if (hlen > n - 8)
        return mha_report__fail(err, MHA_ERR_FORMAT, "header length",
                                "header length %llu runs past the end of the file (%lu bytes after it)",
                                hlen, (unsigned long)(n - 8));
    if (hlen < 2 || b[8] != '{')
        return mha_report__fail(err, MHA_ERR_FORMAT, "header",
                                "the header does not start with '{': not a safetensors file");
    bad = mha_st__bad_utf8(b + 8, (size_t)hlen);
    if (bad)
        return mha_report__fail(err, MHA_ERR_FORMAT, "header", "the header is not valid UTF-8 (byte %lu)",
                                (unsigned long)(bad - 1));
    data_size = n - 8 - (size_t)hlen;

    f->strings = MHA_ST__CAST(char *, MHA_ST_MALLOC((size_t)hlen));
    if (!f->strings) return mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory for the header");
    j.begin = j.p = MHA_ST__CAST(const char *, MHA_ST__CAST(const void *, b + 8));
    j.end = j.p + hlen;
    j.out = f->strings;
    j.err = err;

    if (!mha_st__eat(&j, '{')) return mha_st__jfail(&j, "expected '{'");
    if (!mha_st__eat(&j, '}')) {
        for (;;) {
            const char *name;
            char *mark = j.out;
            if (mha_st__string(&j, &name)) return -1;
            if (!mha_st__eat(&j, ':')) return mha_st__jfail(&j, "expected ':' after a name");
            if (strcmp(name, "__metadata__") == 0) {
                j.out = mark;   /* the name itself is not kept */
                if (seen_meta++)
                    return mha_report__fail(err, MHA_ERR_FORMAT, "__metadata__", "duplicate name '__metadata__'");
                if (!mha_st__eat(&j, '{'))
                    return mha_report__fail(err, MHA_ERR_FORMAT, "__metadata__", "__metadata__ is not an object");
                if (!mha_st__eat(&j, '}')) {
                    for (;;) {
                        const char *key, *val;
                        if ((size_t)f->meta_count + 2 > meta_cap) {
                            const char **m = MHA_ST__CAST(const char **,
                                mha_st__grow((void *)f->meta, (size_t)f->meta_count, sizeof *f->meta, &meta_cap));
                            if (!m) return mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory");
                            f->meta = m;
                        }
                        if (mha_st__string(&j, &key)) return -1;
                        if (!mha_st__eat(&j, ':')) return mha_st__jfail(&j, "expected ':'");
                        mha_st__ws(&j);
                        if (j.p < j.end && *j.p != '"')
                            return mha_report__fail(err, MHA_ERR_FORMAT, "__metadata__",
                                                    "__metadata__ value of '%.60s' is not a string", key);
                        if (mha_st__string(&j, &val)) return -1;
                        f->meta[f->meta_count] = key;
                        f->meta[f->meta_count + 1] = val;
                        f->meta_count += 2;
                        if (mha_st__eat(&j, '}')) break;
                        if (!mha_st__eat(&j, ',')) return mha_st__jfail(&j, "expected ',' or '}'");
                    }
                }
                f->meta_count /= 2;   /* counted strings while parsing; now pairs */
            } else {
                mha_st_tensor *t;
                if ((size_t)f->count >= cap) {
                    mha_st_tensor *nt = MHA_ST__CAST(mha_st_tensor *,
                        mha_st__grow(f->tensors, (size_t)f->count, sizeof *nt, &cap));
                    if (!nt) return mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory");
                    f->tensors = nt;
                }
                t = &f->tensors[f->count++];
                memset(t, 0, sizeof *t);
                t->name = name;
                if (mha_st__tensor_info(&j, t)) return -1;
            }
            if (mha_st__eat(&j, '}')) break;
            if (!mha_st__eat(&j, ',')) return mha_st__jfail(&j, "expected ',' or '}'");
        }
    }
    mha_st__ws(&j);
    if (j.p != j.end) return mha_st__jfail(&j, "bytes after the closing '}'");

    /* names: sorted, so duplicates are neighbours and lookup is a bisection */
    if (f->count > 1) qsort(f->tensors, (size_t)f->count, sizeof *f->tensors, mha_st__by_name);
    for (k = 1; k < f->count; ++k)
        if (strcmp(f->tensors[k - 1].name, f->tensors[k].name) == 0)
            return mha_report__fail(err, MHA_ERR_FORMAT, "header", "duplicate name '%.100s'", f->tensors[k].name);

    /* each tensor: offsets in order, inside the data, the size its dtype and shape give */
    for (k = 0; k < f->count; ++k) {
        mha_st_tensor *t = &f->tensors[k];
        size_t count = 1, bytes;
        int d;
        for (d = 0; d < t->ndim; ++d) {
            if (t->shape[d] && count > SIZE_MAX / t->shape[d])
                return mha_report__fail(err, MHA_ERR_FORMAT, "shape",
                                        "tensor '%.100s': the shape's product overflows", t->name);
            count *= t->shape[d];
        }
        if (count > SIZE_MAX / mha_st__dtype_size[t->dtype])
            return mha_report__fail(err, MHA_ERR_FORMAT, "shape", "tensor '%.100s': the shape's byte size overflows",
                                    t->name);
        bytes = count * mha_st__dtype_size[t->dtype];
        t->count = count;
        if (t->begin > t->end)
            return mha_report__fail(err, MHA_ERR_FORMAT, "data_offsets",
                                    "tensor '%.100s': data_offsets [%lu, %lu] end before they begin",
                                    t->name, (unsigned long)t->begin, (unsigned long)t->end);
        if (t->end > data_size)
            return mha_report__fail(err, MHA_ERR_FORMAT, "data_offsets",
                                    "tensor '%.100s': data_offsets [%lu, %lu] run past the data section "
                                    "(%lu bytes)",
                                    t->name, (unsigned long)t->begin, (unsigned long)t->end, (unsigned long)data_size);
        if (t->end - t->begin != bytes)
            return mha_report__fail(err, MHA_ERR_FORMAT, "data_offsets",
                                    "tensor '%.100s': data_offsets span %lu bytes, but %s x %lu values need %lu",
                                    t->name, (unsigned long)(t->end - t->begin), mha_st__dtype_names[t->dtype],
                                    (unsigned long)count, (unsigned long)bytes);
        t->raw = b + 8 + hlen + t->begin;
    }
    /* the data section: tensors back to back from 0 to its end */
    if (f->count > 0) {
        size_t at = 0;
        order = MHA_ST__CAST(const mha_st_tensor **, MHA_ST_MALLOC((size_t)f->count * sizeof *order));
        if (!order) return mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory");
        for (k = 0; k < f->count; ++k) order[k] = &f->tensors[k];
        qsort(order, (size_t)f->count, sizeof *order, mha_st__by_begin);
        for (i = 0; i < (size_t)f->count; ++i) {
            const mha_st_tensor *t = order[i];
            if (t->begin < at) {
                mha_report__fail(err, MHA_ERR_FORMAT, "data_offsets",
                                 "tensor '%.100s' overlaps tensor '%.100s' in the data section",
                                 t->name, order[i - 1]->name);
                MHA_ST_FREE(order);
                return -1;
            }
            if (t->begin > at) {
                mha_report__fail(err, MHA_ERR_FORMAT, "data_offsets",
                                 "a hole of %lu bytes before tensor '%.100s': the data section must be covered "
                                 "without gaps", (unsigned long)(t->begin - at), t->name);
                MHA_ST_FREE(order);
                return -1;
            }
            at = t->end;
        }
        MHA_ST_FREE(order);
        if (at != data_size)
            return mha_report__fail(err, MHA_ERR_FORMAT, "data_offsets",
                                    "%lu bytes after the last tensor's data: the data section must be covered "
                                    "to its end",
                                    (unsigned long)(data_size - at));
    } else if (data_size) {
        return mha_report__fail(err, MHA_ERR_FORMAT, "data_offsets", "%lu bytes of data but no tensors",
                                (unsigned long)data_size);
    }
    f->f32 = MHA_ST__CAST(float **, MHA_ST_MALLOC((size_t)(f->count > 0 ? f->count : 1) * sizeof *f->f32));
    if (!f->f32) return mha_report__fail(err, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory");
    for (k = 0; k < f->count; ++k) f->f32[k] = NULL;
    return 0;
}
MHA_ST_DEF void mha_st_close(mha_st_file *f)
{
    int k, j;
    if (!f) return;
    if (f->f32)
        for (k = 0; k < f->count; ++k) MHA_ST_FREE(f->f32[k]);
    MHA_ST_FREE(f->f32);
    for (j = 0; j < 2; ++j) {
        if (f->h16[j])
            for (k = 0; k < f->count; ++k) MHA_ST_FREE(f->h16[j][k]);
        MHA_ST_FREE(f->h16[j]);
    }
    MHA_ST_FREE(f->tensors);
    MHA_ST_FREE((void *)f->meta);
    MHA_ST_FREE(f->strings);
    MHA_ST_FREE(f->owned);
#ifdef MHA_ST__MMAP
    if (f->map) munmap(f->map, f->size);
#endif
    memset(f, 0, sizeof *f);
}

/* ---- opening: parse into a local file, hand it over only when it is good */

static int mha_st__open_mem(const void *buf, size_t n, mha_st_file *f, mha_error *e)
{
    mha_st_file g;
    memset(&g, 0, sizeof g);
    g.bytes = MHA_ST__CAST(const unsigned char *, buf);
    g.size = n;
    if (mha_st__parse(&g, e) != 0) {
        mha_st_close(&g);
        return -1;
    }
    *f = g;
    return 0;
}

MHA_ST_DEF mha_status mha_st_open_mem(const void *buf, size_t n, mha_st_file *f, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (!f || !buf) mha_report__fail(e, MHA_ERR_NULL_POINTER, !f ? "f" : "buf", "is NULL");
    else mha_st__open_mem(buf, n, f, e);
    return mha_report__end(e, "mha_st_open_mem");
}

/* The whole file into memory.  A failure of the system says which file and
   the system's reason (errno is read right after the call that failed). */
static int mha_st__open_read(const char *path, mha_st_file *f, mha_error *e)
{
    FILE *fp;
    long len;
    size_t got;
    unsigned char *buf;
    const char *dots, *shown = mha_report__tail(path, &dots);
    int c, why;
    errno = 0;
    fp = fopen(path, "rb");
    if (!fp) return mha_report__io(e, "cannot open", path, errno, "fopen failed");
    /* one byte first: a directory opens, but only a read says what it is
       (and the size a seek gives it means nothing) */
    errno = 0;
    c = getc(fp);
    if (c == EOF && ferror(fp)) {
        why = errno;
        fclose(fp);
        return mha_report__io(e, "cannot read", path, why, "the read failed");
    }
    errno = 0;
    if (fseek(fp, 0, SEEK_END) != 0 || (len = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET) != 0) {
        why = errno;
        fclose(fp);
        return mha_report__io(e, "cannot find the size of", path, why, "the stream cannot seek");
    }
    buf = MHA_ST__CAST(unsigned char *, MHA_ST_MALLOC(len ? (size_t)len : 1));
    if (!buf) {
        fclose(fp);
        return mha_report__fail(e, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory for the %ld bytes of '%s%s'", len,
                                dots, shown);
    }
    errno = 0;
    got = fread(buf, 1, (size_t)len, fp);
    if (got != (size_t)len) {
        why = ferror(fp) ? errno : 0;
        fclose(fp);
        MHA_ST_FREE(buf);
        if (why) return mha_report__io(e, "cannot read", path, why, "the read failed");
        return mha_report__fail(e, MHA_ERR_IO, "path", "'%s%s' ended after %lu of its %ld bytes (did it change "
                                "while being read?)", dots, shown, (unsigned long)got, len);
    }
    fclose(fp);
    if (mha_st__open_mem(buf, (size_t)len, f, e) != 0) {
        MHA_ST_FREE(buf);
        return -1;
    }
    f->owned = buf;
    return 0;
}

MHA_ST_DEF mha_status mha_st_open_read(const char *path, mha_st_file *f, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (!f || !path) mha_report__fail(e, MHA_ERR_NULL_POINTER, !f ? "f" : "path", "is NULL");
    else mha_st__open_read(path, f, e);
    return mha_report__end(e, "mha_st_open_read");
}

static int mha_st__open(const char *path, mha_st_file *f, mha_error *e)
{
#ifdef MHA_ST__MMAP
    int fd;
    struct stat st;
    void *p;
    errno = 0;
    fd = open(path, O_RDONLY);
    if (fd < 0) return mha_report__io(e, "cannot open", path, errno, "open failed");
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
        close(fd);
        return mha_st__open_read(path, f, e);   /* empty, a pipe, a directory ...: read says why */
    }
    p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return mha_st__open_read(path, f, e);
    if (mha_st__open_mem(p, (size_t)st.st_size, f, e) != 0) {
        munmap(p, (size_t)st.st_size);
        return -1;
    }
    f->map = p;
    return 0;
#else
    return mha_st__open_read(path, f, e);
#endif
}

MHA_ST_DEF mha_status mha_st_open(const char *path, mha_st_file *f, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (!f || !path) mha_report__fail(e, MHA_ERR_NULL_POINTER, !f ? "f" : "path", "is NULL");
    else mha_st__open(path, f, e);
    return mha_report__end(e, "mha_st_open");
}


MHA_ST_DEF const mha_st_tensor *mha_st_find(const mha_st_file *f, const char *name)
{
    int lo = 0, hi;
    if (!f || !name) return NULL;
    hi = f->count;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(f->tensors[mid].name, name);
        if (c == 0) return &f->tensors[mid];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

MHA_ST_DEF const char *mha_st_metadata(const mha_st_file *f, const char *key)
{
    int k;
    if (!f || !key) return NULL;
    for (k = 0; k < f->meta_count; ++k)
        if (strcmp(f->meta[2 * k], key) == 0) return f->meta[2 * k + 1];
    return NULL;
}

/* ---- little-endian values to double (exact for every read dtype) */
static double mha_st__value(const mha_st_tensor *t, size_t i)
{
    const unsigned char *p = t->raw + i * mha_st__dtype_size[t->dtype];
    uint32_t u;
    uint64_t w;
    float fl;
    double db;
    int k;
    switch (t->dtype) {
    case MHA_ST_F32:
        u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        memcpy(&fl, &u, 4);
        return fl;
    case MHA_ST_BF16:   /* the upper half of a float32 */
        u = ((uint32_t)p[0] | (uint32_t)p[1] << 8) << 16;
        memcpy(&fl, &u, 4);
        return fl;
    case MHA_ST_F16: {  /* 1 sign, 5 exponent (bias 15), 10 mantissa bits */
        unsigned h = (unsigned)p[0] | (unsigned)p[1] << 8, e = (h >> 10) & 31, m = h & 1023;
        double v;
        if (e == 0) v = ldexp((double)m, -24);                        /* zero, subnormal */
        else if (e == 31) v = m ? (double)NAN : (double)INFINITY;
        else v = ldexp((double)(m | 1024), (int)e - 25);               /* 1.m * 2^(e-15) */
        return (h & 0x8000) ? -v : v;
    }
    case MHA_ST_F64:
        w = 0;
        for (k = 7; k >= 0; --k) w = w << 8 | p[k];
        memcpy(&db, &w, 8);
        return db;
    default:
        return 0;
    }
}


/* "3, 4" into buf */
static void mha_st__shape_str(char *buf, size_t cap, int ndim, const size_t *shape)
{
    size_t used = 0;
    int d;
    buf[0] = 0;
    for (d = 0; d < ndim && used + 1 < cap; ++d)
        used += (size_t)snprintf(buf + used, cap - used, "%s%lu", d ? ", " : "", (unsigned long)shape[d]);
}

/* A tensor that is not what the call needs (MHA_ERR_SHAPE): its name, what
   was expected (the dtypes read and `want`, a shape or "of any shape"), the
   rule that gave it when there is one, and the dtype and shape found. */
static int mha_st__refuse(mha_error *e, const char *field, const mha_st_tensor *t, const char *want,
                          const char *rule)
{
    char got[128];
    mha_st__shape_str(got, sizeof got, t->ndim, t->shape);
    return mha_report__fail(e, MHA_ERR_SHAPE, field, "tensor '%.100s': expected F32, F16, BF16 or F64 %s%s%s%s, "
                            "found %s [%s]", t->name, want, rule ? " (" : "", rule ? rule : "", rule ? ")" : "",
                            mha_st_dtype_name(t->dtype), got);
}

static int mha_st__check_read(const mha_st_tensor *t, const void *dst, size_t count, mha_error *e)
{
    if (!t || (!dst && count)) return mha_report__fail(e, MHA_ERR_NULL_POINTER, !t ? "t" : "dst", "is NULL");
    if ((unsigned)t->dtype > MHA_ST_F64) return mha_st__refuse(e, "t", t, "of any shape", "the dtypes read");
    if (count != t->count) {
        char got[128];
        mha_st__shape_str(got, sizeof got, t->ndim, t->shape);
        return mha_report__fail(e, MHA_ERR_SHAPE, "count", "tensor '%.100s': expected %lu values (count), found "
                                "%s [%s], %lu values", t->name, (unsigned long)count, mha_st_dtype_name(t->dtype),
                                got, (unsigned long)t->count);
    }
    return 0;
}

MHA_ST_DEF mha_status mha_st_read_f32(const mha_st_tensor *t, float *dst, size_t count, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    size_t i;
    if (mha_st__check_read(t, dst, count, e) == 0)
        for (i = 0; i < count; ++i) dst[i] = (float)mha_st__value(t, i);
    return mha_report__end(e, "mha_st_read_f32");
}

MHA_ST_DEF mha_status mha_st_read_f64(const mha_st_tensor *t, double *dst, size_t count, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    size_t i;
    if (mha_st__check_read(t, dst, count, e) == 0)
        for (i = 0; i < count; ++i) dst[i] = mha_st__value(t, i);
    return mha_report__end(e, "mha_st_read_f64");
}

/* t (F32, F16 or BF16) as t->count elements of `to` into d: a block at a
   time, read little-endian, then converted (in place between 16-bit types). */
static void mha_st__to16(const mha_st_tensor *t, mha_dtype to, uint16_t *d)
{
    float buf[256];
    size_t i, m, k;
    mha_dtype from = t->dtype == MHA_ST_F16 ? MHA_F16 : t->dtype == MHA_ST_BF16 ? MHA_BF16 : MHA_F32;
    for (i = 0; i < t->count; i += m) {
        m = t->count - i < 256 ? t->count - i : 256;
        if (from == MHA_F32) {
            for (k = 0; k < m; ++k) buf[k] = (float)mha_st__value(t, i + k);
            (void)mha_convert(m, MHA_F32, buf, to, d + i, NULL);
        } else {
            for (k = 0; k < m; ++k) {
                const unsigned char *b = t->raw + (i + k) * 2;
                d[i + k] = (uint16_t)(b[0] | b[1] << 8);
            }
            if (from != to) (void)mha_convert(m, from, d + i, to, d + i, NULL);
        }
    }
}

MHA_ST_DEF mha_status mha_st_read16(const mha_st_tensor *t, mha_dtype to, void *dst, size_t count, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (to != MHA_F16 && to != MHA_BF16)
        mha_report__fail(e, MHA_ERR_INVALID_ARGUMENT, "to", "is %d; expected MHA_F16 (1) or MHA_BF16 (2)", (int)to);
    else if (mha_st__check_read(t, dst, count, e) == 0) {
        if (t->dtype == MHA_ST_F64) mha_st__refuse(e, "t", t, "of any shape", "F64 would be rounded twice");
        else mha_st__to16(t, to, MHA_ST__CAST(uint16_t *, dst));
    }
    return mha_report__end(e, "mha_st_read16");
}

/* Tensor t of f as float32 into *out, its shape checked when ndim >= 0;
   converted once, kept in f until mha_st_close.  rule: why this shape (or
   NULL), for the message. */
static int mha_st__shape_ok(const mha_st_tensor *t, const char *field, int ndim, const size_t *shape,
                            const char *rule, mha_error *e)
{
    int d, same = 1;
    if (ndim >= 0) {
        same = t->ndim == ndim;
        for (d = 0; same && d < ndim; ++d) same = t->shape[d] == shape[d];
    }
    if (!same || (unsigned)t->dtype > MHA_ST_F64) {
        char want[132];
        if (ndim >= 0) {
            want[0] = '[';
            mha_st__shape_str(want + 1, sizeof want - 2, ndim, shape);
            strcat(want, "]");
        } else {
            strcpy(want, "of any shape");
        }
        return mha_st__refuse(e, field, t, want, rule ? rule : ndim >= 0 ? NULL : "the dtypes read");
    }
    return 0;
}

static int mha_st__floats(mha_st_file *f, const mha_st_tensor *t, const char *field, int ndim,
                          const size_t *shape, const char *rule, const float **out, mha_error *e)
{
    int k = (int)(t - f->tensors);
    if (mha_st__shape_ok(t, field, ndim, shape, rule, e) != 0) return -1;
    if (!f->f32[k]) {
        float *p = MHA_ST__CAST(float *, MHA_ST_MALLOC(t->count ? t->count * sizeof(float) : 1));
        size_t i;
        if (!p)
            return mha_report__fail(e, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory for the %lu values of '%.100s'",
                                    (unsigned long)t->count, t->name);
        for (i = 0; i < t->count; ++i) p[i] = (float)mha_st__value(t, i);
        f->f32[k] = p;
    }
    *out = f->f32[k];
    return 0;
}

MHA_ST_DEF mha_status mha_st_floats(mha_st_file *f, const char *name, int ndim, const size_t *shape,
                                    const float **out, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    const mha_st_tensor *t = NULL;
    if (!f || !name || !out || (ndim > 0 && !shape))
        mha_report__fail(e, MHA_ERR_NULL_POINTER, !f ? "f" : !name ? "name" : !out ? "out" : "shape", "is NULL");
    else if (ndim > MHA_ST_MAX_DIMS)
        mha_report__fail(e, MHA_ERR_INVALID_ARGUMENT, "ndim", "is %d; a tensor has at most %d dimensions", ndim,
                         MHA_ST_MAX_DIMS);
    else if (!(t = mha_st_find(f, name)))
        mha_report__fail(e, MHA_ERR_NOT_FOUND, "name", "tensor '%.100s' is missing", name);
    else
        mha_st__floats(f, t, "name", ndim, shape, NULL, out, e);
    return mha_report__end(e, "mha_st_floats");
}

/* prefix + name as float32 into *out, of shape [d0, d1, d2][:ndim]: NULL
   when it is absent and optional; refused when it is absent and required
   or misshaped.  The field of a refusal is name (no prefix); sym and why
   make the rule: "out_proj.bias is [E], E = 16 from out_proj.weight".
   After an earlier refusal it does nothing, so a run of them reports the
   first. */
static int mha_st__get(mha_st_file *f, const char *prefix, const char *name, int optional, int ndim,
                       size_t d0, size_t d1, size_t d2, const char *sym, const char *why,
                       const float **out, mha_error *e)
{
    char key[MHA_ST_MAX_PREFIX + 64], rule[200];
    size_t shape[3];
    const mha_st_tensor *t;
    if (e->status != MHA_OK) return -1;
    shape[0] = d0; shape[1] = d1; shape[2] = d2;
    snprintf(key, sizeof key, "%s%s", prefix, name);
    t = mha_st_find(f, key);
    if (!t) {
        *out = NULL;
        return optional ? 0 : mha_report__fail(e, MHA_ERR_NOT_FOUND, name, "tensor '%.100s' is missing", key);
    }
    snprintf(rule, sizeof rule, "%s is %s, %s", name, sym, why);
    return mha_st__floats(f, t, name, ndim, shape, rule, out, e);
}

/* A weight matrix of the module as m->weight_dtype says: float32 through
   mha_st__get, or F16 / BF16 kept in f (converted once; F64 refused). */
static int mha_st__get_w(mha_st_file *f, const char *prefix, const char *name, size_t d0, size_t d1,
                         const char *sym, const char *why, mha_dtype dt, const void **out, mha_error *e)
{
    char key[MHA_ST_MAX_PREFIX + 64], rule[200];
    size_t shape[2];
    const mha_st_tensor *t;
    int k, j = dt == MHA_BF16;
    if (dt == MHA_F32) {
        const float *p = NULL;
        int rc = mha_st__get(f, prefix, name, 0, 2, d0, d1, 0, sym, why, &p, e);
        *out = p;
        return rc;
    }
    if (e->status != MHA_OK) return -1;
    shape[0] = d0; shape[1] = d1;
    snprintf(key, sizeof key, "%s%s", prefix, name);
    if (!(t = mha_st_find(f, key))) return mha_report__fail(e, MHA_ERR_NOT_FOUND, name, "tensor '%.100s' is missing", key);
    snprintf(rule, sizeof rule, "%s is %s, %s", name, sym, why);
    if (mha_st__shape_ok(t, name, 2, shape, rule, e) != 0) return -1;
    if (t->dtype == MHA_ST_F64) return mha_st__refuse(e, name, t, sym, "F64 would be rounded twice into 16 bits");
    k = (int)(t - f->tensors);
    if (!f->h16[j]) {
        f->h16[j] = MHA_ST__CAST(uint16_t **, MHA_ST_MALLOC((size_t)f->count * sizeof *f->h16[j]));
        if (!f->h16[j]) return mha_report__fail(e, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory");
        memset(f->h16[j], 0, (size_t)f->count * sizeof *f->h16[j]);
    }
    if (!f->h16[j][k]) {
        uint16_t *p = MHA_ST__CAST(uint16_t *, MHA_ST_MALLOC(t->count ? t->count * 2 : 1));
        if (!p)
            return mha_report__fail(e, MHA_ERR_OUT_OF_MEMORY, NULL, "out of memory for the %lu values of '%.100s'",
                                    (unsigned long)t->count, t->name);
        mha_st__to16(t, dt, p);
        f->h16[j][k] = p;
    }
    *out = f->h16[j][k];
    return 0;
}

static int mha_st__module(mha_st_file *f, const char *prefix, int num_heads, mha_module *m, mha_error *e)
{
    const mha_st_tensor *t;
    char key[MHA_ST_MAX_PREFIX + 64], why[120];
    mha_module r;
    mha_dtype dt = m->weight_dtype;
    size_t E;
    if ((int)dt < MHA_F32 || (int)dt > MHA_BF16)
        return mha_report__fail(e, MHA_ERR_BAD_ENUM, "m->weight_dtype", "is %d; expected MHA_F32 (0), MHA_F16 (1) or "
                                "MHA_BF16 (2)", (int)dt);
    snprintf(key, sizeof key, "%sout_proj.weight", prefix);
    t = mha_st_find(f, key);
    if (!t) return mha_report__fail(e, MHA_ERR_NOT_FOUND, "out_proj.weight", "tensor '%.100s' is missing", key);
    if (t->ndim != 2 || t->shape[0] != t->shape[1] || t->shape[0] == 0 || t->shape[0] > INT32_MAX)
        return mha_st__refuse(e, "out_proj.weight", t, "[E, E]", "a square matrix, 1 <= E <= 2147483647");
    E = t->shape[0];
    if (num_heads <= 0)
        return mha_report__fail(e, MHA_ERR_INVALID_SIZE, "num_heads", "is %d; expected >= 1", num_heads);
    if (E % (size_t)num_heads)
        return mha_report__fail(e, MHA_ERR_HEADS_DIVIDE, "num_heads",
                                "num_heads %d does not divide embed_dim %lu (from '%.100s')", num_heads,
                                (unsigned long)E, key);
    r = *m;
    r.embed_dim = (int)E;
    r.num_heads = num_heads;
    r.kdim = r.vdim = 0;
    r.in_proj_weight = r.q_proj_weight = r.k_proj_weight = r.v_proj_weight = NULL;
    snprintf(why, sizeof why, "E = %lu from out_proj.weight", (unsigned long)E);
    mha_st__get_w(f, prefix, "out_proj.weight", E, E, "[E, E]", why, dt, &r.out_proj_weight, e);
    mha_st__get(f, prefix, "out_proj.bias", 1, 1, E, 0, 0, "[E]", why, &r.out_proj_bias, e);
    snprintf(key, sizeof key, "%sin_proj_weight", prefix);
    if (mha_st_find(f, key)) {
        mha_st__get_w(f, prefix, "in_proj_weight", 3 * E, E, "[3E, E]", why, dt, &r.in_proj_weight, e);
    } else {
        const mha_st_tensor *tk, *tv;
        char whyk[160], whyv[160];
        snprintf(key, sizeof key, "%sk_proj_weight", prefix);
        tk = mha_st_find(f, key);
        snprintf(key, sizeof key, "%sv_proj_weight", prefix);
        tv = mha_st_find(f, key);
        if (!tk || !tv) {
            snprintf(key, sizeof key, "%s%s", prefix, tk ? "v_proj_weight" : "k_proj_weight");
            return mha_report__fail(e, MHA_ERR_NOT_FOUND, "in_proj_weight",
                                    "tensor '%.100sin_proj_weight' is missing, and so is '%.100s'", prefix, key);
        }
        /* kdim and vdim are what the file says; only E is checked against them */
        if (tk->ndim == 2 && tk->shape[1] > 0 && tk->shape[1] <= INT32_MAX) r.kdim = (int)tk->shape[1];
        if (tv->ndim == 2 && tv->shape[1] > 0 && tv->shape[1] <= INT32_MAX) r.vdim = (int)tv->shape[1];
        snprintf(whyk, sizeof whyk, "%s, kdim >= 1 its second dimension", why);
        snprintf(whyv, sizeof whyv, "%s, vdim >= 1 its second dimension", why);
        mha_st__get_w(f, prefix, "q_proj_weight", E, E, "[E, E]", why, dt, &r.q_proj_weight, e);
        mha_st__get_w(f, prefix, "k_proj_weight", E, (size_t)r.kdim, "[E, kdim]", whyk, dt, &r.k_proj_weight, e);
        mha_st__get_w(f, prefix, "v_proj_weight", E, (size_t)r.vdim, "[E, vdim]", whyv, dt, &r.v_proj_weight, e);
    }
    mha_st__get(f, prefix, "in_proj_bias", 1, 1, 3 * E, 0, 0, "[3E]", why, &r.in_proj_bias, e);
    mha_st__get(f, prefix, "bias_k", 1, 3, 1, 1, E, "[1, 1, E]", why, &r.bias_k, e);
    mha_st__get(f, prefix, "bias_v", 1, 3, 1, 1, E, "[1, 1, E]", why, &r.bias_v, e);
    if (e->status != MHA_OK) return -1;
    if (!r.bias_k != !r.bias_v)
        return mha_report__fail(e, MHA_ERR_NOT_FOUND, r.bias_k ? "bias_v" : "bias_k",
                                "tensor '%.100s%s' is missing (bias_k and bias_v come together)", prefix,
                                r.bias_k ? "bias_v" : "bias_k");
    *m = r;
    return 0;
}

/* The prefix as given, or "" for NULL; refused when too long to make keys of. */
static int mha_st__prefix(const char **prefix, mha_error *e)
{
    size_t n;
    if (!*prefix) *prefix = "";
    n = strlen(*prefix);
    if (n > MHA_ST_MAX_PREFIX)
        return mha_report__fail(e, MHA_ERR_INVALID_ARGUMENT, "prefix", "is %lu bytes long; at most %d are taken",
                                (unsigned long)n, MHA_ST_MAX_PREFIX);
    return 0;
}

MHA_ST_DEF mha_status mha_st_module(mha_st_file *f, const char *prefix, int num_heads, mha_module *m,
                                    mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (!f || !m) mha_report__fail(e, MHA_ERR_NULL_POINTER, !f ? "f" : "m", "is NULL");
    else if (mha_st__prefix(&prefix, e) == 0) mha_st__module(f, prefix, num_heads, m, e);
    return mha_report__end(e, "mha_st_module");
}

static int mha_st__encoder_layer(mha_st_file *f, const char *prefix, int nhead, mha_encoder_layer *layer,
                                 mha_error *e)
{
    char sa[MHA_ST_MAX_PREFIX + 64], why[200];
    const mha_st_tensor *t;
    mha_encoder_layer r;
    size_t E, F;
    snprintf(sa, sizeof sa, "%sself_attn.", prefix);
    r = *layer;
    if (mha_st__module(f, sa, nhead, &r.self_attn, e)) return -1;
    E = (size_t)r.self_attn.embed_dim;
    snprintf(sa, sizeof sa, "%slinear1.weight", prefix);
    t = mha_st_find(f, sa);
    if (!t) return mha_report__fail(e, MHA_ERR_NOT_FOUND, "linear1.weight", "tensor '%.100s' is missing", sa);
    if (t->ndim != 2 || t->shape[1] != E || t->shape[0] == 0 || t->shape[0] > INT32_MAX) {
        snprintf(why, sizeof why, "[F, %lu]", (unsigned long)E);
        return mha_st__refuse(e, "linear1.weight", t, why, "linear1.weight is [dim_feedforward, E], "
                              "E from self_attn.out_proj.weight, 1 <= dim_feedforward <= 2147483647");
    }
    F = t->shape[0];
    r.dim_feedforward = (int)F;
    snprintf(why, sizeof why, "E = %lu from self_attn.out_proj.weight, F = %lu from linear1.weight",
             (unsigned long)E, (unsigned long)F);
    mha_st__get(f, prefix, "linear1.weight", 0, 2, F, E, 0, "[F, E]", why, &r.linear1_weight, e);
    mha_st__get(f, prefix, "linear1.bias", 1, 1, F, 0, 0, "[F]", why, &r.linear1_bias, e);
    mha_st__get(f, prefix, "linear2.weight", 0, 2, E, F, 0, "[E, F]", why, &r.linear2_weight, e);
    mha_st__get(f, prefix, "linear2.bias", 1, 1, E, 0, 0, "[E]", why, &r.linear2_bias, e);
    mha_st__get(f, prefix, "norm1.weight", 0, 1, E, 0, 0, "[E]", why, &r.norm1_weight, e);
    mha_st__get(f, prefix, "norm1.bias", 0, 1, E, 0, 0, "[E]", why, &r.norm1_bias, e);
    mha_st__get(f, prefix, "norm2.weight", 0, 1, E, 0, 0, "[E]", why, &r.norm2_weight, e);
    mha_st__get(f, prefix, "norm2.bias", 0, 1, E, 0, 0, "[E]", why, &r.norm2_bias, e);
    if (e->status != MHA_OK) return -1;
    *layer = r;
    return 0;
}

MHA_ST_DEF mha_status mha_st_encoder_layer(mha_st_file *f, const char *prefix, int nhead,
                                           mha_encoder_layer *layer, mha_error *err)
{
    mha_error local, *e = mha_report__begin(err, &local);
    if (!f || !layer) mha_report__fail(e, MHA_ERR_NULL_POINTER, !f ? "f" : "layer", "is NULL");
    else if (mha_st__prefix(&prefix, e) == 0) mha_st__encoder_layer(f, prefix, nhead, layer, e);
    return mha_report__end(e, "mha_st_encoder_layer");
}

#endif /* MHA_ST_IMPLEMENTATION_DONE */
#endif /* MHA_ST_IMPLEMENTATION */
