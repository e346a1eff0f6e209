/* fuzz_npy.c - libFuzzer harness for examples/npy.h: any bytes given to
   mha_npy_load_mem must load or be refused with a message, never crash or
   read past the buffer (which is allocated to its exact size).  A load that
   succeeds must describe exactly the bytes it was given.

     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz_npy.c
     ./a.out -runs=1000000 -dict=tests/fuzz_npy.dict tests/data/npy              */
#define MHA_NPY_IMPLEMENTATION
#include "../examples/npy.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *buf = (unsigned char *)malloc(size ? size : 1);
    char err[256];
    mha_npy a, h;
    size_t off = 0, i;
    int rc;
    memcpy(buf, data, size);
    err[0] = 0;
    rc = mha_npy_load_mem(buf, size, &a, err, sizeof err);
    if (rc != 0) {
        if (rc != -1 || err[0] == 0 || a.data != NULL) abort();   /* refused: a message, nothing kept */
    } else {
        size_t count = 1;
        if (mha_npy_parse_header(buf, size, &h, &off, err, sizeof err) != 0) abort();
        if (a.ndim < 1 || a.ndim > MHA_NPY_MAX_DIMS || (a.itemsize != 4 && a.itemsize != 8)) abort();
        for (i = 0; i < (size_t)a.ndim; ++i) count *= a.shape[i];
        if (count != a.count || off + count * (size_t)a.itemsize != size || !a.data) abort();
        for (i = 0; i < a.count; ++i) (void)(a.data[i] == a.data[i]);   /* every value readable */
    }
    mha_npy_free(&a);
    free(buf);
    return 0;
}
