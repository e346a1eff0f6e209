/* fuzz_safetensors.c - libFuzzer harness for examples/safetensors.h: any
   bytes must open or be refused with a message, never crash or read past the
   buffer (allocated to its exact size).  An opened file must keep the
   reader's promises: names sorted and unique, every tensor's bytes inside
   the data section and equal to dtype x shape, lookups that find each
   tensor, conversions and the module helpers that succeed or explain.

     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz_safetensors.c -lm
     ./a.out -runs=1000000 -dict=tests/fuzz_safetensors.dict tests/data/safetensors   */
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_ST_IMPLEMENTATION
#include "../examples/safetensors.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *buf = (unsigned char *)malloc(size ? size : 1);
    char err[256];
    mha_st_file f;
    int k, rc;
    memcpy(buf, data, size);
    err[0] = 0;
    rc = mha_st_open_mem(buf, size, &f, err, sizeof err);
    if (rc != 0) {
        if (rc != -1 || err[0] == 0 || f.tensors != NULL || f.count != 0) abort();
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
                if (mha_st_read_f32(t, x, t->count, err, sizeof err) != 0) abort();
                if (mha_st_read_f64(t, y, t->count, err, sizeof err) != 0) abort();
                free(x);
                free(y);
            } else if (t->dtype > MHA_ST_F64 && mha_st_floats(&f, t->name, -1, NULL, err, sizeof err)) {
                abort();   /* a dtype that is not read must be refused */
            }
        }
        /* the data section is covered exactly */
        if (covered + 8 + (size_t)(buf[0] | buf[1] << 8 | buf[2] << 16 | (size_t)buf[3] << 24) != size)
            abort();
        for (k = 0; k < f.meta_count; ++k)
            if (mha_st_metadata(&f, f.meta[2 * k]) == NULL) abort();
        {
            mha_module m;
            mha_encoder_layer l;
            memset(&m, 0, sizeof m);
            memset(&l, 0, sizeof l);
            if (mha_st_module(&f, "", 1, &m, err, sizeof err) != 0 && err[0] == 0) abort();
            if (mha_st_encoder_layer(&f, "", 1, &l, err, sizeof err) != 0 && err[0] == 0) abort();
        }
        mha_st_close(&f);
    }
    free(buf);
    return 0;
}
