/* test_npy_limits.c - examples/npy.h against two crafted files: a short file
   whose header claims 2 GiB must be refused as truncated before anything of
   that size is allocated, and a descr with a NUL byte inside the string must
   not pass for '<f4'.  The allocator hook records the largest request and
   refuses anything above 1 MiB (a memory limit, as under ulimit -v), which
   npy.h reports as MHA_ERR_OUT_OF_MEMORY.  Built without MHA_IMPLEMENTATION:
   npy.h needs only mha.h's types. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t largest_request;
static void *limited_malloc(size_t n)
{
    if (n > largest_request) largest_request = n;
    return n > ((size_t)1 << 20) ? NULL : malloc(n);
}
#define MHA_NPY_MALLOC(n) limited_malloc(n)
#define MHA_NPY_FREE(p) free(p)
#define MHA_NPY_IMPLEMENTATION
#include "../examples/npy.h"
#include "testutil.h"

#define TMP "build/tests/"

/* a version-1.0 file: magic, version, header padded to a multiple of 64 with '\n' last */
static size_t make_npy(unsigned char *buf, const char *header, size_t hlen, size_t data_bytes)
{
    size_t total = 10 + hlen, pad = (64 - total % 64) % 64, i;
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)((hlen + pad) & 0xff);
    buf[9] = (unsigned char)((hlen + pad) >> 8);
    memcpy(buf + 10, header, hlen);
    for (i = 0; i < pad; ++i) buf[10 + hlen + i] = ' ';
    buf[10 + hlen + pad - 1] = '\n';
    memset(buf + 10 + hlen + pad, 0x3f, data_bytes);
    return 10 + hlen + pad + data_bytes;
}

static int write_file(const char *path, const unsigned char *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    fwrite(p, 1, n, f);
    fclose(f);
    return 1;
}

/* defect 6: a header claiming shape (268435456,) '<f8' (2 GiB) in a small file */
static void test_claims_more_than_the_file(void)
{
    static const char hdr[] = "{'descr': '<f8', 'fortran_order': False, 'shape': (268435456,), }";
    unsigned char buf[512];
    size_t n = make_npy(buf, hdr, sizeof hdr - 1, 48);
    mha_error err;
    mha_npy a;
    mha_status rc;
    memset(&a, 0, sizeof a);
    CHECK(n < 200, "the crafted file is small (%lu bytes)", (unsigned long)n);
    CHECK(write_file(TMP "claims_2gib.npy", buf, n), "write " TMP "claims_2gib.npy");
    largest_request = 0;
    rc = mha_npy_load(TMP "claims_2gib.npy", &a, &err);
    CHECK(rc == MHA_ERR_FORMAT && err.field && strcmp(err.field, "data") == 0 &&
          strstr(err.message, "mha_npy_load: data: truncated") != NULL,
          "refused as truncated: rc %d, \"%s\"", (int)rc, err.message);
    CHECK(largest_request <= ((size_t)1 << 20), "largest allocation %lu bytes (the claim is 2 GiB)",
          (unsigned long)largest_request);
    CHECK(a.data == NULL && a.count == 0, "nothing kept");
    /* the in-memory loader never allocates before checking */
    largest_request = 0;
    rc = mha_npy_load_mem(buf, n, &a, &err);
    CHECK(rc == MHA_ERR_FORMAT && strstr(err.message, "mha_npy_load_mem: data: truncated") != NULL &&
          largest_request == 0, "load_mem: \"%s\"", err.message);
    {   /* the allocator's refusal is MHA_ERR_OUT_OF_MEMORY: a 1 MiB + 4 array in a file that holds it */
        static const char big[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (262145,), }";
        static unsigned char whole[256 + 4 * 262145];
        size_t m = make_npy(whole, big, sizeof big - 1, 4 * 262145);
        memset(&a, 0, sizeof a);
        rc = mha_npy_load_mem(whole, m, &a, &err);
        CHECK(rc == MHA_ERR_OUT_OF_MEMORY && err.function && strcmp(err.function, "mha_npy_load_mem") == 0 &&
              strstr(err.message, "out of memory") && a.data == NULL, "allocator refusal: %d \"%s\"", (int)rc,
              err.message);
    }
    {   /* and an honest small file still loads */
        static const char ok[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }";
        n = make_npy(buf, ok, sizeof ok - 1, 48);
        CHECK(write_file(TMP "small_ok.npy", buf, n), "write");
        rc = mha_npy_load(TMP "small_ok.npy", &a, &err);
        CHECK(rc == MHA_OK && a.count == 12 && a.data && a.data[11] == a.data[0], "small file loads: %s",
              rc ? err.message : "ok");
        mha_npy_free(&a);
    }
}

/* defect 7: '<f4\0' must not read as '<f4' */
static void test_nul_in_descr(void)
{
    static const char hdr[] = "{'descr': '<f4\0', 'fortran_order': False, 'shape': (3,), }";
    static const char key[] = "{'de\0scr': '<f4', 'fortran_order': False, 'shape': (3,), }";
    unsigned char buf[512];
    size_t n = make_npy(buf, hdr, sizeof hdr - 1, 12);
    mha_error err;
    mha_npy a;
    mha_status rc;
    memset(&a, 0, sizeof a);
    rc = mha_npy_load_mem(buf, n, &a, &err);
    CHECK(rc == MHA_ERR_FORMAT, "descr '<f4\\0' refused (%s)", rc ? err.message : "accepted");
    CHECK(rc == MHA_OK || (strstr(err.message, "mha_npy_load_mem: descr: ") && strstr(err.message, "NUL") != NULL),
          "the message names the field and the NUL: \"%s\"", err.message);
    n = make_npy(buf, key, sizeof key - 1, 12);
    rc = mha_npy_load_mem(buf, n, &a, &err);
    CHECK(rc == MHA_ERR_FORMAT, "key 'de\\0scr' refused (%s)", rc ? err.message : "accepted");
    if (rc == MHA_OK) mha_npy_free(&a);
}

int main(void)
{
    test_claims_more_than_the_file();
    test_nul_in_descr();
    return tu_finish("npy_limits");
}
