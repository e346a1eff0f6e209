/* gpt_ckpt.h - the tiny GPT's shape, its parameter layout, and its checkpoint file.

   Used by examples/tiny_gpt.c (and tests/test_ckpt.c, tests/test_gpt_train.c).
   It knows sizes, offsets and bytes; from mha.h it takes only the error
   convention (mha_status, mha_error: the declarations, not the
   implementation), filled with the helpers of mha_report.h.  Every
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
   inconsistent, or a checksum that does not match is refused with
   MHA_ERR_FORMAT and a message that names the field and the path (below,
   "errors"); the caller's structure is only written on success.
   Saving writes "<path>.tmp" and renames it, so an interrupted save leaves the
   previous checkpoint intact.
*/
#ifndef GPT_CKPT_H
#define GPT_CKPT_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mha.h"
#include "mha_report.h"

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

/* The first field of a config that is out of range (every size in
   1..GPT_MAX_DIM, n_layer <= 256, n_head dividing d_model), or NULL. */
GPT__FN const char *gpt__config_fault(const gpt_config *c)
{
    static const char *const names[6] = {"n_layer", "n_head", "d_model", "d_ff", "ctx", "vocab"};
    const int f[6] = {c->n_layer, c->n_head, c->d_model, c->d_ff, c->ctx, c->vocab};
    int i;
    for (i = 0; i < 6; ++i)
        if (f[i] < 1 || f[i] > GPT_MAX_DIM) return names[i];
    if (c->n_layer > 256) return names[0];
    if (c->d_model % c->n_head != 0) return names[1];
    return NULL;
}

/* 1 when every size is in range and d_model divides into heads. */
GPT__FN int gpt_config_valid(const gpt_config *c) { return gpt__config_fault(c) == NULL; }

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

/* ---------------------------------------------------------- errors

   mha.h's convention (issue 18): every call returns an mha_status and fills
   the caller's mha_error (the last argument, may be NULL) on a refusal:
     MHA_ERR_NULL_POINTER / MHA_ERR_INVALID_ARGUMENT   a bad argument
     MHA_ERR_IO          the file cannot be opened, read, written or renamed:
                         the path and the operating system's reason
     MHA_ERR_FORMAT      the bytes are not a checkpoint this code reads; the
                         field names what is wrong: "length" (truncated or
                         trailing bytes), "magic", "version", "n_layer" ..
                         "vocab", "flags", "n_params", "checksum"
     MHA_ERR_SHAPE       a valid checkpoint of another shape than `want`
     MHA_ERR_OUT_OF_MEMORY
   The message reads "function: field: detail" with the path in the detail. */

/* The helpers are mha_report.h's: mha_report__clear(err) at a call's
   entry, and mha_report__sign(err, function, status, field, ...) where a
   check refuses (err may be NULL; the report is filled at once). */

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
GPT__FN mha_status gpt_ckpt_save(const char *path, const gpt_config *c, unsigned long long step,
                                 const float *params, const float *m, const float *v, mha_error *err)
{
    static const char fn[] = "gpt_ckpt_save";
    unsigned char hdr[GPT_CKPT_HEADER], buf[4 * GPT__CHUNK];
    const float *parts[3];
    const char *fault;
    char tmp[1024];
    size_t n, k, i;
    int nparts = (m && v) ? 3 : 1, ok = 1, p, why = 0;
    unsigned long long h;
    FILE *f;
    mha_report__clear(err);
    if (!path) return mha_report__sign(err, fn, MHA_ERR_NULL_POINTER, "path", "is NULL");
    if (!c) return mha_report__sign(err, fn, MHA_ERR_NULL_POINTER, "c", "is NULL");
    if (!params) return mha_report__sign(err, fn, MHA_ERR_NULL_POINTER, "params", "is NULL");
    if ((fault = gpt__config_fault(c)) != NULL)
        return mha_report__sign(err, fn, MHA_ERR_INVALID_ARGUMENT, "c",
                                "%s is out of range (n_layer %d, n_head %d, d_model %d, d_ff %d, ctx %d, vocab %d)",
                                fault, c->n_layer, c->n_head, c->d_model, c->d_ff, c->ctx, c->vocab);
    if (strlen(path) + 5 > sizeof tmp)
        return mha_report__sign(err, fn, MHA_ERR_INVALID_ARGUMENT, "path", "is %lu bytes long, at most %lu fit",
                                (unsigned long)strlen(path), (unsigned long)(sizeof tmp - 5));
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
    errno = 0;
    f = fopen(tmp, "wb");
    if (!f)
        return mha_report__sign(err, fn, MHA_ERR_IO, "path", "cannot create '%s': %s", tmp,
                                mha_report__reason(errno, "fopen failed"));
    ok = fwrite(hdr, 1, sizeof hdr, f) == sizeof hdr;
    for (p = 0; ok && p < nparts; ++p)
        for (i = 0; ok && i < n; i += k) {
            k = n - i < GPT__CHUNK ? n - i : GPT__CHUNK;
            gpt__floats_to_le(parts[p] + i, k, buf);
            ok = fwrite(buf, 1, 4 * k, f) == 4 * k;
        }
    if (!ok) why = errno;
    if (fclose(f) != 0 && ok) { ok = 0; why = errno; }
    if (ok && rename(tmp, path) != 0) {
        why = errno;
        remove(tmp);
        return mha_report__sign(err, fn, MHA_ERR_IO, "path", "cannot rename '%s' to '%s': %s", tmp, path,
                                mha_report__reason(why, "rename failed"));
    }
    if (!ok) {
        remove(tmp);
        return mha_report__sign(err, fn, MHA_ERR_IO, "path", "writing '%s' failed: %s", tmp,
                                mha_report__reason(why, "short write"));
    }
    return MHA_OK;
}

/* The reader behind gpt_ckpt_read and gpt_ckpt_load: name is what the
   messages call the stream (the path, or "stream"), fn the public call and
   src its argument that names the stream ("path" or "f"). */
GPT__FN mha_status gpt__read(FILE *f, const char *name, const char *fn, const char *src,
                             const gpt_config *want, gpt_ckpt *out, mha_error *err)
{
    static const char *const names[6] = {"n_layer", "n_head", "d_model", "d_ff", "ctx", "vocab"};
    unsigned char hdr[GPT_CKPT_HEADER], buf[4 * GPT__CHUNK];
    gpt_ckpt ck;
    mha_status st = MHA_OK;
    unsigned long long h, flags, n64, fld[6];
    const char *fault;
    float *parts[3];
    size_t n, k, i, got;
    long start, end;
    int p, nparts;
    memset(&ck, 0, sizeof ck);
    start = ftell(f);
    errno = 0;
    if ((got = fread(hdr, 1, sizeof hdr, f)) != sizeof hdr) {
        if (ferror(f))   /* the system refused the read (a folder, a device error): not the bytes */
            return mha_report__sign(err, fn, MHA_ERR_IO, src, "%s: cannot read: %s", name,
                                    mha_report__reason(errno, "read error"));
        return mha_report__sign(err, fn, MHA_ERR_FORMAT, "length", "%s: truncated: %lu bytes, shorter than the "
                                "%d-byte header", name, (unsigned long)got, GPT_CKPT_HEADER);
    }
    if (memcmp(hdr, "MHAGPTck", 8) != 0)
        return mha_report__sign(err, fn, MHA_ERR_FORMAT, "magic", "%s: not a tiny_gpt checkpoint (its first 8 "
                                "bytes are not \"MHAGPTck\")", name);
    if (gpt__get(hdr + 8, 4) != GPT_CKPT_VERSION)
        return mha_report__sign(err, fn, MHA_ERR_FORMAT, "version", "%s: format version %llu; this code reads "
                                "version %u", name, gpt__get(hdr + 8, 4), GPT_CKPT_VERSION);
    /* read as unsigned and bound before the int conversion */
    for (i = 0; i < 6; ++i) {
        fld[i] = gpt__get(hdr + 12 + 4 * i, 4);
        if (fld[i] < 1 || fld[i] > GPT_MAX_DIM)
            return mha_report__sign(err, fn, MHA_ERR_FORMAT, names[i], "%s: %s is %llu, expected 1..%d", name,
                                    names[i], fld[i], GPT_MAX_DIM);
    }
    ck.cfg.n_layer = (int)fld[0]; ck.cfg.n_head = (int)fld[1]; ck.cfg.d_model = (int)fld[2];
    ck.cfg.d_ff = (int)fld[3];    ck.cfg.ctx = (int)fld[4];    ck.cfg.vocab = (int)fld[5];
    if ((fault = gpt__config_fault(&ck.cfg)) != NULL) {   /* in range, but inconsistent */
        if (strcmp(fault, "n_layer") == 0)
            return mha_report__sign(err, fn, MHA_ERR_FORMAT, fault, "%s: n_layer is %d, at most 256", name,
                                    ck.cfg.n_layer);
        return mha_report__sign(err, fn, MHA_ERR_FORMAT, fault, "%s: n_head %d does not divide d_model %d", name,
                                ck.cfg.n_head, ck.cfg.d_model);
    }
    flags = gpt__get(hdr + 36, 4);
    ck.step = gpt__get(hdr + 40, 8);
    n64 = gpt__get(hdr + 48, 8);
    if (flags > 1)
        return mha_report__sign(err, fn, MHA_ERR_FORMAT, "flags", "%s: flags are %llu, only bit 0 (the AdamW "
                                "moments) is defined", name, flags);
    if (n64 != (unsigned long long)gpt_param_count(&ck.cfg))
        return mha_report__sign(err, fn, MHA_ERR_FORMAT, "n_params", "%s: n_params is %llu, the shape in the "
                                "header has %llu", name, n64, (unsigned long long)gpt_param_count(&ck.cfg));
    if (want && memcmp(want, &ck.cfg, sizeof ck.cfg) != 0)
        return mha_report__sign(err, fn, MHA_ERR_SHAPE, "want", "%s holds layers %d, heads %d, d_model %d, d_ff "
                                "%d, ctx %d, vocab %d; asked for %d, %d, %d, %d, %d, %d", name, ck.cfg.n_layer,
                                ck.cfg.n_head, ck.cfg.d_model, ck.cfg.d_ff, ck.cfg.ctx, ck.cfg.vocab,
                                want->n_layer, want->n_head, want->d_model, want->d_ff, want->ctx, want->vocab);
    n = ck.n_params = (size_t)n64;
    nparts = flags ? 3 : 1;

    /* the payload is 4 * n * nparts bytes: compare with what the stream holds
       (when it can seek) before allocating that much */
    if (start >= 0 && fseek(f, 0, SEEK_END) == 0 && (end = ftell(f)) >= 0) {
        unsigned long long have = (unsigned long long)(end - start) - GPT_CKPT_HEADER;
        unsigned long long need = 4ull * n64 * (unsigned long long)nparts;
        if (have != need)
            return mha_report__sign(err, fn, MHA_ERR_FORMAT, "length", "%s: %s: the header says %llu payload "
                                    "bytes, the file has %llu", name, have < need ? "truncated" : "trailing bytes",
                                    need, have);
        if (fseek(f, start + GPT_CKPT_HEADER, SEEK_SET) != 0)
            return mha_report__sign(err, fn, MHA_ERR_IO, src, "%s: cannot seek back to the payload: %s", name,
                                    mha_report__reason(errno, "the stream cannot seek"));
    }

    ck.params = (float *)malloc(n * sizeof(float));
    if (nparts == 3) {
        ck.adam_m = (float *)malloc(n * sizeof(float));
        ck.adam_v = (float *)malloc(n * sizeof(float));
    }
    if (!ck.params || (nparts == 3 && (!ck.adam_m || !ck.adam_v)))
        st = mha_report__sign(err, fn, MHA_ERR_OUT_OF_MEMORY, "n_params", "%s: %d arrays of %lu floats do not fit "
                              "in memory", name, nparts, (unsigned long)n);
    parts[0] = ck.params; parts[1] = ck.adam_m; parts[2] = ck.adam_v;
    h = gpt_fnv1a(GPT_FNV_INIT, hdr, 56);
    for (p = 0; st == MHA_OK && p < nparts; ++p)
        for (i = 0; st == MHA_OK && i < n; i += k) {
            k = n - i < GPT__CHUNK ? n - i : GPT__CHUNK;
            errno = 0;
            if (fread(buf, 1, 4 * k, f) != 4 * k) {
                st = ferror(f) ? mha_report__sign(err, fn, MHA_ERR_IO, src, "%s: cannot read: %s", name,
                                                  mha_report__reason(errno, "read error"))
                               : mha_report__sign(err, fn, MHA_ERR_FORMAT, "length", "%s: truncated: the payload "
                                                  "ends inside float %lu of part %d", name, (unsigned long)i, p);
                break;
            }
            h = gpt_fnv1a(h, buf, 4 * k);
            gpt__le_to_floats(buf, k, parts[p] + i);
        }
    if (st == MHA_OK && fgetc(f) != EOF)
        st = mha_report__sign(err, fn, MHA_ERR_FORMAT, "length", "%s: trailing bytes after the %d-part payload",
                              name, nparts);
    if (st == MHA_OK && h != gpt__get(hdr + 56, 8))
        st = mha_report__sign(err, fn, MHA_ERR_FORMAT, "checksum", "%s: checksum mismatch (the file holds %016llx, "
                              "its bytes give %016llx): the file is corrupted", name, gpt__get(hdr + 56, 8), h);
    if (st != MHA_OK) {
        gpt_ckpt_free(&ck);
        return st;
    }
    *out = ck;
    return MHA_OK;
}

/* Read a checkpoint from an open stream positioned at its first byte
   (a file, or fmemopen'ed memory).  The stream's length is checked against
   the header before anything is allocated, so a short file that claims a huge
   model is "truncated", never "out of memory".  want and *out as below. */
GPT__FN mha_status gpt_ckpt_read(FILE *f, const gpt_config *want, gpt_ckpt *out, mha_error *err)
{
    mha_report__clear(err);
    if (!f) return mha_report__sign(err, "gpt_ckpt_read", MHA_ERR_NULL_POINTER, "f", "is NULL");
    if (!out) return mha_report__sign(err, "gpt_ckpt_read", MHA_ERR_NULL_POINTER, "out", "is NULL");
    return gpt__read(f, "stream", "gpt_ckpt_read", "f", want, out, err);
}

/* Load a checkpoint into *out (allocated; gpt_ckpt_free releases it).
   want: NULL, or the shape the caller needs (MHA_ERR_SHAPE otherwise).
   *out is untouched unless the status is MHA_OK. */
GPT__FN mha_status gpt_ckpt_load(const char *path, const gpt_config *want, gpt_ckpt *out,
                                 mha_error *err)
{
    mha_status st;
    FILE *f;
    mha_report__clear(err);
    if (!path) return mha_report__sign(err, "gpt_ckpt_load", MHA_ERR_NULL_POINTER, "path", "is NULL");
    if (!out) return mha_report__sign(err, "gpt_ckpt_load", MHA_ERR_NULL_POINTER, "out", "is NULL");
    errno = 0;
    f = fopen(path, "rb");
    if (!f)
        return mha_report__sign(err, "gpt_ckpt_load", MHA_ERR_IO, "path", "cannot open '%s': %s", path,
                                mha_report__reason(errno, "fopen failed"));
    st = gpt__read(f, path, "gpt_ckpt_load", "path", want, out, err);
    fclose(f);
    return st;
}

#endif /* GPT_CKPT_H */
