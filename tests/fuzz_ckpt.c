/* fuzz_ckpt.c - libFuzzer harness for the tiny GPT's checkpoint reader
   (examples/gpt_ckpt.h): any bytes must load or be refused with
   MHA_ERR_FORMAT (the only refusal a stream of bytes can earn: a length,
   magic, version, size, flag or checksum fault), its mha_error filled
   (status, "gpt_ckpt_read", a field, a message naming both), never crash,
   read past the buffer or leak; a load that succeeds must describe exactly
   the bytes it was given (its size and its checksum).

     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz_ckpt.c
     ./a.out -runs=1000000 -max_len=4096 tests/data/ckpt                         */
#define _GNU_SOURCE   /* fmemopen */
#include "../examples/gpt_ckpt.h"
#include <stdint.h>

/* no MHA_IMPLEMENTATION: gpt_ckpt.h needs only the declarations of mha_status and mha_error */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *buf = (unsigned char *)malloc(size ? size : 1);
    gpt_ckpt ck, sentinel;
    mha_status st;
    mha_error err;
    FILE *f;
    memcpy(buf, data, size);
    /* half of the inputs get a matching checksum, so that mutated headers and
       payloads reach the size checks and the successful loads, not only the
       checksum test */
    if (size > GPT_CKPT_HEADER && (data[size - 1] & 1))
        gpt__put(buf + 56, gpt_fnv1a(gpt_fnv1a(GPT_FNV_INIT, buf, 56), buf + GPT_CKPT_HEADER,
                                     size - GPT_CKPT_HEADER), 8);
    f = size ? fmemopen(buf, size, "rb") : NULL;
    if (!f) { free(buf); return 0; }
    memset(&ck, 0xAB, sizeof ck);
    memset(&sentinel, 0xAB, sizeof sentinel);
    memset(&err, 0xCD, sizeof err);
    st = gpt_ckpt_read(f, NULL, &ck, &err);
    fclose(f);
    if (st != MHA_OK && st != MHA_ERR_FORMAT) abort();
    if (st != MHA_OK) {
        char head[64];
        if (memcmp(&ck, &sentinel, sizeof ck) != 0) abort();   /* refused: nothing written */
        if (err.status != st || !err.function || strcmp(err.function, "gpt_ckpt_read") != 0 || !err.field)
            abort();
        snprintf(head, sizeof head, "gpt_ckpt_read: %s: stream", err.field);
        if (strncmp(err.message, head, strlen(head)) != 0) abort();
    } else {
        if (err.status != MHA_OK || err.field != NULL) abort();
        size_t parts = ck.adam_m ? 3 : 1;
        unsigned char le[4];
        size_t i;
        if (!gpt_config_valid(&ck.cfg) || ck.n_params != gpt_param_count(&ck.cfg)) abort();
        if (size != GPT_CKPT_HEADER + 4 * parts * ck.n_params) abort();
        for (i = 0; i < ck.n_params; ++i) {   /* the floats are the file's bytes */
            gpt__floats_to_le(ck.params + i, 1, le);
            if (memcmp(le, buf + GPT_CKPT_HEADER + 4 * i, 4) != 0) abort();
        }
        gpt_ckpt_free(&ck);
    }
    free(buf);
    return 0;
}
