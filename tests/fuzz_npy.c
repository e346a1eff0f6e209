/* fuzz_npy.c - libFuzzer harness for examples/npy.h: any bytes given to
   mha_npy_load_mem must load or be refused (MHA_ERR_FORMAT or MHA_ERR_SHAPE,
   a field, a message signed "mha_npy_load_mem: field: ...", the array
   untouched), never crash or read past the buffer (which is allocated to its
   exact size).  A load that succeeds must describe exactly the bytes it was
   given.  Built without MHA_IMPLEMENTATION: npy.h needs only mha.h's types.

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
    mha_error err;
    mha_npy a, h, before;
    size_t off = 0, i;
    mha_status rc;
    memcpy(buf, data, size);
    memset(&a, 0x5A, sizeof a);
    before = a;
    rc = mha_npy_load_mem(buf, size, &a, &err);
    if (rc != MHA_OK) {
        /* refused: the status of a file, a field, a signed message, nothing written */
        static const char fn[] = "mha_npy_load_mem: ";
        if ((rc != MHA_ERR_FORMAT && rc != MHA_ERR_SHAPE && rc != MHA_ERR_OUT_OF_MEMORY) || err.status != rc ||
            !err.function || strcmp(err.function, "mha_npy_load_mem") != 0 ||
            strncmp(err.message, fn, sizeof fn - 1) != 0 || (rc != MHA_ERR_OUT_OF_MEMORY && !err.field) ||
            (err.field && strncmp(err.message + sizeof fn - 1, err.field, strlen(err.field)) != 0) ||
            memcmp(&a, &before, sizeof a) != 0)
            abort();
        memset(&a, 0, sizeof a);
    } else {
        size_t count = 1;
        if (mha_npy_parse_header(buf, size, &h, &off, &err) != MHA_OK) abort();
        if (a.ndim < 1 || a.ndim > MHA_NPY_MAX_DIMS || (a.itemsize != 4 && a.itemsize != 8)) abort();
        for (i = 0; i < (size_t)a.ndim; ++i) count *= a.shape[i];
        if (count != a.count || off + count * (size_t)a.itemsize != size || !a.data) abort();
        for (i = 0; i < a.count; ++i) (void)(a.data[i] == a.data[i]);   /* every value readable */
    }
    mha_npy_free(&a);
    free(buf);
    return 0;
}
