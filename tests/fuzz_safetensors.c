/* fuzz_safetensors.c - libFuzzer harness for examples/safetensors.h: any
   bytes must open or be refused (MHA_ERR_FORMAT, a message signed
   "mha_st_open_mem: field: ...", the file struct untouched), never crash or
   read past the buffer (allocated to its exact size).  An opened file must
   keep the reader's promises: names sorted and unique, every tensor's bytes
   inside the data section and equal to dtype x shape, lookups that find
   each tensor, conversions and the module helpers that succeed or explain.

     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz_safetensors.c -lm
     ./a.out -runs=1000000 -dict=tests/fuzz_safetensors.dict tests/data/safetensors   */
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_ST_IMPLEMENTATION
#include "../examples/safetensors.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A refusal as the convention has it: status, function, a field, and the
   message "function: field: detail" with a detail. */
static int signed_refusal(mha_status s, const mha_error *e, const char *function)
{
    size_t n = strlen(function);
    if (s == MHA_OK || e->status != s || !e->function || strcmp(e->function, function) != 0) return 0;
    if (strncmp(e->message, function, n) != 0 || strncmp(e->message + n, ": ", 2) != 0) return 0;
    if (e->field && (strncmp(e->message + n + 2, e->field, strlen(e->field)) != 0)) return 0;
    return strlen(e->message) > n + 2 + (e->field ? strlen(e->field) + 2 : 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *buf = (unsigned char *)malloc(size ? size : 1);
    mha_error err;
    mha_st_file f, before;
    int k;
    mha_status rc;
    memcpy(buf, data, size);
    memset(&f, 0x5A, sizeof f);
    before = f;
    rc = mha_st_open_mem(buf, size, &f, &err);
    if (rc != MHA_OK) {
        /* a malformed file, or out of memory; nothing written to f */
        if ((rc != MHA_ERR_FORMAT && rc != MHA_ERR_OUT_OF_MEMORY) || !signed_refusal(rc, &err, "mha_st_open_mem") ||
            (rc == MHA_ERR_FORMAT && !err.field) || memcmp(&f, &before, sizeof f) != 0)
            abort();
    } else {
        size_t covered = 0;
        for (k = 0; k < f.count; ++k) {
            const mha_st_tensor *t = &f.tensors[k];
            size_t c = 1;
            int d;
            if (k && strcmp(f.tensors[k - 1].name, t->name) >= 0) abort();   /* sorted, unique */
            if (mha_st_find(&f, t->name) != t) abort();
            for (d = 0; d < t->ndim; ++d) c *= t->shape[d];
            if (c != t->count || t->begin > t->end || t->raw < buf || t->raw + (t->end - t->begin) > buf + size)
                abort();
            covered += t->end - t->begin;
            if (t->dtype <= MHA_ST_F64 && t->count <= 4096) {
                float *x = (float *)malloc(t->count * sizeof *x + 1);
                double *y = (double *)malloc(t->count * sizeof *y + 1);
                if (mha_st_read_f32(t, x, t->count, &err) != MHA_OK) abort();
                if (mha_st_read_f64(t, y, t->count, &err) != MHA_OK) abort();
                free(x);
                free(y);
            } else if (t->dtype > MHA_ST_F64) {
                const float *p = NULL;
                rc = mha_st_floats(&f, t->name, -1, NULL, &p, &err);
                if (rc != MHA_ERR_SHAPE || p || !signed_refusal(rc, &err, "mha_st_floats"))
                    abort();   /* a dtype that is not read must be refused */
            }
        }
        /* the data section is covered exactly */
        if (covered + 8 + (size_t)(buf[0] | buf[1] << 8 | buf[2] << 16 | (size_t)buf[3] << 24) != size)
            abort();
        for (k = 0; k < f.meta_count; ++k)
            if (mha_st_metadata(&f, f.meta[2 * k]) == NULL) abort();
        {
            mha_module m, m0;
            mha_encoder_layer l, l0;
            memset(&m, 0, sizeof m);
            memset(&l, 0, sizeof l);
            m0 = m;
            l0 = l;
            rc = mha_st_module(&f, "", 1, &m, &err);
            if (rc != MHA_OK && (!signed_refusal(rc, &err, "mha_st_module") || memcmp(&m, &m0, sizeof m) != 0))
                abort();
            memset(&m, 0, sizeof m);   /* the weights kept in 16 bits */
            m.weight_dtype = (size % 2) ? MHA_BF16 : MHA_F16;
            m0 = m;
            rc = mha_st_module(&f, "", 1, &m, &err);
            if (rc != MHA_OK && (!signed_refusal(rc, &err, "mha_st_module") || memcmp(&m, &m0, sizeof m) != 0))
                abort();
            rc = mha_st_encoder_layer(&f, "", 1, &l, &err);
            if (rc != MHA_OK && (!signed_refusal(rc, &err, "mha_st_encoder_layer") || memcmp(&l, &l0, sizeof l) != 0))
                abort();
        }
        mha_st_close(&f);
    }
    free(buf);
    return 0;
}
