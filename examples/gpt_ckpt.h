/* gpt_ckpt.h - the tiny GPT's shape, its parameter layout, and its checkpoint file.

   Used by examples/tiny_gpt.c (and tests/test_ckpt.c, tests/test_gpt_train.c).
   It does not need mha.h: it only knows sizes, offsets and bytes.  Every
   function is static, so include it in each file that wants it.

   THE PARAMETERS  one flat float array, names as a PyTorch state_dict
     wte   [V, d]     token embedding; also the LM head (tied weights)
     wpe   [T, d]     learned position embedding
     per layer l (an nn.TransformerEncoderLayer, norm_first = True):
       in_w [3d, d]  in_b [3d]  out_w [d, d]  out_b [d]
       l1_w [F, d]   l1_b [F]   l2_w [d, F]   l2_b [d]
       n1_w [d] n1_b [d] n2_w [d] n2_b [d]
     lnf_w [d]  lnf_b [d]  final layer norm

   THE FILE (every integer little-endian, floats IEEE-754 binary32 little-endian)
     offset  size
        0      8   magic "MHAGPTck"
        8      4   format version (1)
       12      4   n_layer        16  4  n_head      20  4  d_model
       24      4   d_ff           28  4  ctx         32  4  vocab
       36      4   flags: bit 0 = the AdamW moments m and v follow the parameters
       40      8   step (training steps done)
       48      8   n_params (must equal gpt_param_count of the shape above)
       56      8   FNV-1a 64 of bytes 0..55 and of the whole payload
       64          payload: n_params floats, then (flag 0) n_params m, n_params v
   The file is exactly 64 + 4 * n_params * (1 or 3) bytes.  A file that is
   shorter, longer, has another magic or version, a shape out of range or
   inconsistent, or a checksum that does not match is refused with its own
   status; the caller's structure is only written on success.
   Saving writes "<path>.tmp" and renames it, so an interrupted save leaves the
   previous checkpoint intact.
*/
#ifndef GPT_CKPT_H
#define GPT_CKPT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define GPT__FN static __attribute__((unused))
#else
#define GPT__FN static
#endif

#define GPT_CKPT_VERSION 1u
#define GPT_CKPT_HEADER 64
#define GPT_MAX_DIM 65536            /* bound on every size field: refuses absurd headers early */

typedef struct gpt_config {
    int n_layer, n_head, d_model, d_ff, ctx, vocab;
} gpt_config;

/* Offsets into the flat parameter array.  Layer l's tensors start at
   layer0 + l * layer_stride; the per-layer fields are relative to that. */
typedef struct gpt_layout {
    size_t wte, wpe, layer0, layer_stride;
    size_t in_w, in_b, out_w, out_b, l1_w, l1_b, l2_w, l2_b, n1_w, n1_b, n2_w, n2_b;
    size_t lnf_w, lnf_b, total;
} gpt_layout;

/* 1 when every size is in 1..GPT_MAX_DIM and d_model divides into heads. */
GPT__FN int gpt_config_valid(const gpt_config *c)
{
    const int f[6] = {c->n_layer, c->n_head, c->d_model, c->d_ff, c->ctx, c->vocab};
    int i;
    for (i = 0; i < 6; ++i)
        if (f[i] < 1 || f[i] > GPT_MAX_DIM) return 0;
    return c->d_model % c->n_head == 0 && c->n_layer <= 256;
}

/* The layout of a valid config (sizes stay far below 2^62 under the bounds above). */
GPT__FN gpt_layout gpt_layout_make(const gpt_config *c)
{
    gpt_layout o;
    size_t d = (size_t)c->d_model, F = (size_t)c->d_ff, n = 0, k = 0;
#define GPT__SLICE(field, count) (o.field = n, n += (count))
#define GPT__LSLICE(field, count) (o.field = k, k += (count))
    GPT__SLICE(wte, (size_t)c->vocab * d);
    GPT__SLICE(wpe, (size_t)c->ctx * d);
    GPT__LSLICE(in_w, 3 * d * d); GPT__LSLICE(in_b, 3 * d);
    GPT__LSLICE(out_w, d * d);    GPT__LSLICE(out_b, d);
    GPT__LSLICE(l1_w, F * d);     GPT__LSLICE(l1_b, F);
    GPT__LSLICE(l2_w, d * F);     GPT__LSLICE(l2_b, d);
    GPT__LSLICE(n1_w, d); GPT__LSLICE(n1_b, d); GPT__LSLICE(n2_w, d); GPT__LSLICE(n2_b, d);
    o.layer0 = n;
    o.layer_stride = k;
    n += k * (size_t)c->n_layer;
    GPT__SLICE(lnf_w, d);
    GPT__SLICE(lnf_b, d);
#undef GPT__SLICE
#undef GPT__LSLICE
    o.total = n;
    return o;
}

GPT__FN size_t gpt_param_count(const gpt_config *c) { return gpt_layout_make(c).total; }

/* ---------------------------------------------------------- status */

#define GPT_CKPT_STATUS_LIST(X)                                                        \
    X(GPT_CKPT_OK,          "success")                                                 \
    X(GPT_CKPT_ERR_ARGUMENT, "a NULL pointer or an invalid shape was passed in")       \
    X(GPT_CKPT_ERR_OPEN,    "the file cannot be opened")                               \
    X(GPT_CKPT_ERR_WRITE,   "writing the file failed (disk full or not writable)")     \
    X(GPT_CKPT_ERR_TRUNCATED, "the file is shorter than its header says (truncated)")  \
    X(GPT_CKPT_ERR_TRAILING, "the file is longer than its header says")                \
    X(GPT_CKPT_ERR_MAGIC,   "not a tiny_gpt checkpoint (wrong magic bytes)")           \
    X(GPT_CKPT_ERR_VERSION, "a checkpoint format version this program does not read")  \
    X(GPT_CKPT_ERR_SIZES,   "the header's sizes are out of range or do not match its parameter count") \
    X(GPT_CKPT_ERR_SHAPE,   "the checkpoint is for another model shape than the one asked for") \
    X(GPT_CKPT_ERR_CHECKSUM, "checksum mismatch: the file is corrupted")               \
    X(GPT_CKPT_ERR_MEMORY,  "out of memory")

typedef enum gpt_ckpt_status {
#define GPT__ENUM(name, msg) name,
    GPT_CKPT_STATUS_LIST(GPT__ENUM)
#undef GPT__ENUM
    GPT_CKPT_STATUS_COUNT
} gpt_ckpt_status;

GPT__FN const char *gpt_ckpt_status_string(gpt_ckpt_status s)
{
    static const char *const msg[] = {
#define GPT__MSG(name, text) text,
        GPT_CKPT_STATUS_LIST(GPT__MSG)
#undef GPT__MSG
    };
    return (unsigned)s < GPT_CKPT_STATUS_COUNT ? msg[s] : "unknown checkpoint status";
}

/* What a checkpoint holds.  adam_m / adam_v are NULL when it has no moments. */
typedef struct gpt_ckpt {
    gpt_config cfg;
    unsigned long long step;
    size_t n_params;
    float *params, *adam_m, *adam_v;
} gpt_ckpt;

GPT__FN void gpt_ckpt_free(gpt_ckpt *ck)
{
    if (!ck) return;
    free(ck->params); free(ck->adam_m); free(ck->adam_v);
    ck->params = ck->adam_m = ck->adam_v = NULL;
}

/* ---------------------------------------------------------- bytes */

/* FNV-1a, 64 bit: h = (h XOR byte) * 0x100000001b3, from 0xcbf29ce484222325 */
#define GPT_FNV_INIT 0xcbf29ce484222325ULL
GPT__FN unsigned long long gpt_fnv1a(unsigned long long h, const unsigned char *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

GPT__FN void gpt__put(unsigned char *p, unsigned long long v, int bytes)
{
    int i;
    for (i = 0; i < bytes; ++i) p[i] = (unsigned char)(v >> (8 * i));
}
GPT__FN unsigned long long gpt__get(const unsigned char *p, int bytes)
{
    unsigned long long v = 0;
    int i;
    for (i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

/* floats <-> little-endian bytes, in chunks so the checksum runs on the file's bytes */
GPT__FN void gpt__floats_to_le(const float *x, size_t n, unsigned char *out)
{
    size_t i;
    for (i = 0; i < n; ++i) {
        unsigned int u;
        memcpy(&u, &x[i], 4);
        gpt__put(out + 4 * i, u, 4);
    }
}
GPT__FN void gpt__le_to_floats(const unsigned char *in, size_t n, float *x)
{
    size_t i;
    for (i = 0; i < n; ++i) {
        unsigned int u = (unsigned int)gpt__get(in + 4 * i, 4);
        memcpy(&x[i], &u, 4);
    }
}

#define GPT__CHUNK 4096 /* floats per write/read */

/* ---------------------------------------------------------- save / load */

/* Save params (and the AdamW moments when m and v are both non-NULL). */
GPT__FN gpt_ckpt_status gpt_ckpt_save(const char *path, const gpt_config *c, unsigned long long step,
                                      const float *params, const float *m, const float *v)
{
    unsigned char hdr[GPT_CKPT_HEADER], buf[4 * GPT__CHUNK];
    const float *parts[3];
    char tmp[1024];
    size_t n, k, i;
    int nparts = (m && v) ? 3 : 1, ok = 1, p;
    unsigned long long h;
    FILE *f;
    if (!path || !c || !params || !gpt_config_valid(c)) return GPT_CKPT_ERR_ARGUMENT;
    if (strlen(path) + 5 > sizeof tmp) return GPT_CKPT_ERR_ARGUMENT;
    n = gpt_param_count(c);
    parts[0] = params; parts[1] = m; parts[2] = v;

    memset(hdr, 0, sizeof hdr);
    memcpy(hdr, "MHAGPTck", 8);
    gpt__put(hdr + 8, GPT_CKPT_VERSION, 4);
    gpt__put(hdr + 12, (unsigned)c->n_layer, 4); gpt__put(hdr + 16, (unsigned)c->n_head, 4);
    gpt__put(hdr + 20, (unsigned)c->d_model, 4); gpt__put(hdr + 24, (unsigned)c->d_ff, 4);
    gpt__put(hdr + 28, (unsigned)c->ctx, 4);     gpt__put(hdr + 32, (unsigned)c->vocab, 4);
    gpt__put(hdr + 36, nparts == 3 ? 1u : 0u, 4);
    gpt__put(hdr + 40, step, 8);
    gpt__put(hdr + 48, n, 8);
    /* the checksum first (one pass over the payload), then the writes */
    h = gpt_fnv1a(GPT_FNV_INIT, hdr, 56);
    for (p = 0; p < nparts; ++p)
        for (i = 0; i < n; i += k) {
            k = n - i < GPT__CHUNK ? n - i : GPT__CHUNK;
            gpt__floats_to_le(parts[p] + i, k, buf);
            h = gpt_fnv1a(h, buf, 4 * k);
        }
    gpt__put(hdr + 56, h, 8);

    memcpy(tmp, path, strlen(path));
    memcpy(tmp + strlen(path), ".tmp", 5);
    f = fopen(tmp, "wb");
    if (!f) return GPT_CKPT_ERR_OPEN;
    ok = fwrite(hdr, 1, sizeof hdr, f) == sizeof hdr;
    for (p = 0; ok && p < nparts; ++p)
        for (i = 0; ok && i < n; i += k) {
            k = n - i < GPT__CHUNK ? n - i : GPT__CHUNK;
            gpt__floats_to_le(parts[p] + i, k, buf);
            ok = fwrite(buf, 1, 4 * k, f) == 4 * k;
        }
    if (fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return GPT_CKPT_ERR_WRITE;
    }
    return GPT_CKPT_OK;
}

/* Read a checkpoint from an open stream positioned at its first byte
   (a file, or fmemopen'ed memory).  The stream's length is checked against
   the header before anything is allocated, so a short file that claims a huge
   model is "truncated", never "out of memory".  want and *out as below. */
GPT__FN gpt_ckpt_status gpt_ckpt_read(FILE *f, const gpt_config *want, gpt_ckpt *out)
{
    unsigned char hdr[GPT_CKPT_HEADER], buf[4 * GPT__CHUNK];
    gpt_ckpt ck;
    gpt_ckpt_status st = GPT_CKPT_OK;
    unsigned long long h, flags, n64;
    float *parts[3];
    size_t n, k, i;
    long start, end;
    int p, nparts;
    if (!f || !out) return GPT_CKPT_ERR_ARGUMENT;
    memset(&ck, 0, sizeof ck);
    start = ftell(f);
    if (fread(hdr, 1, sizeof hdr, f) != sizeof hdr) return GPT_CKPT_ERR_TRUNCATED;
    if (memcmp(hdr, "MHAGPTck", 8) != 0) return GPT_CKPT_ERR_MAGIC;
    if (gpt__get(hdr + 8, 4) != GPT_CKPT_VERSION) return GPT_CKPT_ERR_VERSION;
    {
        /* read as unsigned and bound before the int conversion */
        unsigned long long fld[6];
        for (i = 0; i < 6; ++i) {
            fld[i] = gpt__get(hdr + 12 + 4 * i, 4);
            if (fld[i] > GPT_MAX_DIM) return GPT_CKPT_ERR_SIZES;
        }
        ck.cfg.n_layer = (int)fld[0]; ck.cfg.n_head = (int)fld[1]; ck.cfg.d_model = (int)fld[2];
        ck.cfg.d_ff = (int)fld[3];    ck.cfg.ctx = (int)fld[4];    ck.cfg.vocab = (int)fld[5];
    }
    flags = gpt__get(hdr + 36, 4);
    ck.step = gpt__get(hdr + 40, 8);
    n64 = gpt__get(hdr + 48, 8);
    if (!gpt_config_valid(&ck.cfg) || flags > 1 || n64 != (unsigned long long)gpt_param_count(&ck.cfg))
        return GPT_CKPT_ERR_SIZES;
    if (want && memcmp(want, &ck.cfg, sizeof ck.cfg) != 0) return GPT_CKPT_ERR_SHAPE;
    n = ck.n_params = (size_t)n64;
    nparts = flags ? 3 : 1;

    /* the payload is 4 * n * nparts bytes: compare with what the stream holds
       (when it can seek) before allocating that much */
    if (start >= 0 && fseek(f, 0, SEEK_END) == 0 && (end = ftell(f)) >= 0) {
        unsigned long long have = (unsigned long long)(end - start) - GPT_CKPT_HEADER;
        unsigned long long need = 4ull * n64 * (unsigned long long)nparts;
        if (have < need) return GPT_CKPT_ERR_TRUNCATED;
        if (have > need) return GPT_CKPT_ERR_TRAILING;
        if (fseek(f, start + GPT_CKPT_HEADER, SEEK_SET) != 0) return GPT_CKPT_ERR_TRUNCATED;
    }

    ck.params = (float *)malloc(n * sizeof(float));
    if (nparts == 3) {
        ck.adam_m = (float *)malloc(n * sizeof(float));
        ck.adam_v = (float *)malloc(n * sizeof(float));
    }
    if (!ck.params || (nparts == 3 && (!ck.adam_m || !ck.adam_v))) st = GPT_CKPT_ERR_MEMORY;
    parts[0] = ck.params; parts[1] = ck.adam_m; parts[2] = ck.adam_v;
    h = gpt_fnv1a(GPT_FNV_INIT, hdr, 56);
    for (p = 0; st == GPT_CKPT_OK && p < nparts; ++p)
        for (i = 0; st == GPT_CKPT_OK && i < n; i += k) {
            k = n - i < GPT__CHUNK ? n - i : GPT__CHUNK;
            if (fread(buf, 1, 4 * k, f) != 4 * k) { st = GPT_CKPT_ERR_TRUNCATED; break; }
            h = gpt_fnv1a(h, buf, 4 * k);
            gpt__le_to_floats(buf, k, parts[p] + i);
        }
    if (st == GPT_CKPT_OK && fgetc(f) != EOF) st = GPT_CKPT_ERR_TRAILING;
    if (st == GPT_CKPT_OK && h != gpt__get(hdr + 56, 8)) st = GPT_CKPT_ERR_CHECKSUM;
    if (st != GPT_CKPT_OK) {
        gpt_ckpt_free(&ck);
        return st;
    }
    *out = ck;
    return GPT_CKPT_OK;
}

/* Load a checkpoint into *out (allocated; gpt_ckpt_free releases it).
   want: NULL, or the shape the caller needs (GPT_CKPT_ERR_SHAPE otherwise).
   *out is untouched unless the status is GPT_CKPT_OK. */
GPT__FN gpt_ckpt_status gpt_ckpt_load(const char *path, const gpt_config *want, gpt_ckpt *out)
{
    gpt_ckpt_status st;
    FILE *f;
    if (!path || !out) return GPT_CKPT_ERR_ARGUMENT;
    f = fopen(path, "rb");
    if (!f) return GPT_CKPT_ERR_OPEN;
    st = gpt_ckpt_read(f, want, out);
    fclose(f);
    return st;
}

#endif /* GPT_CKPT_H */
