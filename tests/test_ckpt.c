/* The tiny_gpt checkpoint (examples/gpt_ckpt.h): a round trip keeps every bit,
   and each way a file can be broken (missing, truncated anywhere, longer,
   wrong magic, wrong version, sizes out of range or inconsistent, another
   shape than asked for, a flipped bit in the header or the payload) is
   refused with mha.h's error convention: its status (MHA_ERR_IO for the
   file system, MHA_ERR_FORMAT for the bytes, MHA_ERR_SHAPE for another
   shape), the field it names, and a message that carries the call, the
   field and the path (and the system's reason for I/O); never a crash, and
   the caller's structure untouched. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mkdir, rmdir */
#endif
#define MHA_IMPLEMENTATION   /* mha_status_string in the failure messages */
#include "mha.h"
#include "testutil.h"
#include "examples/gpt_ckpt.h"
#include <sys/stat.h>
#include <unistd.h>

static const char *g_path;  /* a scratch file next to the test binary */

/* The refusal in e: status, function, field, and the words its message must hold. */
static void check_err(const mha_error *e, mha_status status, const char *function, const char *field,
                      const char *word, const char *what)
{
    char head[128];
    snprintf(head, sizeof head, "%s: %s: ", function, field);
    CHECK(e->status == status, "%s: err.status is '%s', want '%s'", what, mha_status_string(e->status),
          mha_status_string(status));
    CHECK(e->function && strcmp(e->function, function) == 0, "%s: err.function %s, want %s", what,
          e->function ? e->function : "NULL", function);
    CHECK(e->field && strcmp(e->field, field) == 0, "%s: err.field %s, want %s", what,
          e->field ? e->field : "NULL", field);
    CHECK(strncmp(e->message, head, strlen(head)) == 0, "%s: the message starts with \"%s\": %s", what, head,
          e->message);
    CHECK(!word || strstr(e->message, word) != NULL, "%s: the message says \"%s\": %s", what, word ? word : "",
          e->message);
}

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long len;
    *n = 0;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = (unsigned char *)malloc((size_t)len + 1);
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) { free(b); b = NULL; }
    fclose(f);
    *n = (size_t)len;
    return b;
}

static void spit(const char *path, const unsigned char *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return;
    if (n) fwrite(b, 1, n, f);
    fclose(f);
}

/* Load g_path and check the status, the field named and a word of the
   message (the path is in every message of a file that opened); on an
   error, the output must be unchanged. */
static void expect(mha_status want, const char *field, const char *word, const gpt_config *shape,
                   const char *what)
{
    gpt_ckpt ck;
    mha_status st;
    mha_error err;
    memset(&ck, 0xAB, sizeof ck);
    memset(&err, 0xCD, sizeof err);
    st = gpt_ckpt_load(g_path, shape, &ck, &err);
    CHECK(st == want, "%s: got '%s', want '%s' (%s)", what, mha_status_string(st), mha_status_string(want),
          st == MHA_OK ? "" : err.message);
    if (st == MHA_OK) {
        CHECK(err.status == MHA_OK && err.field == NULL, "%s: a load that succeeds leaves a clean report", what);
        gpt_ckpt_free(&ck);
    } else {
        gpt_ckpt sentinel;
        memset(&sentinel, 0xAB, sizeof sentinel);
        CHECK(memcmp(&ck, &sentinel, sizeof ck) == 0, "%s: output written on error", what);
        check_err(&err, want, "gpt_ckpt_load", field, word, what);
        CHECK(strstr(err.message, g_path) != NULL, "%s: the message names the file: %s", what, err.message);
    }
}

/* Write a modified copy of the good file and load it. */
static void expect_mod(const unsigned char *good, size_t n, size_t keep, size_t at, unsigned char x,
                       mha_status want, const char *field, const char *word, const char *what)
{
    unsigned char *b = (unsigned char *)malloc(n + 1);
    memcpy(b, good, n);
    b[n] = 0;
    if (at < n + 1) b[at] ^= x;
    spit(g_path, b, keep);
    expect(want, field, word, NULL, what);
    free(b);
}

/* store a little-endian u32 / u64 field, the checksum recomputed so only the field is wrong */
static void set_field(unsigned char *b, size_t n, size_t at, unsigned long long v, int bytes)
{
    gpt__put(b + at, v, bytes);
    gpt__put(b + 56, gpt_fnv1a(gpt_fnv1a(GPT_FNV_INIT, b, 56), b + 64, n - 64), 8);
}

int main(int argc, char **argv)
{
    static char path[1024];
    const gpt_config c = {2, 2, 8, 17, 5, 7};   /* odd sizes on purpose */
    gpt_config other = c;
    gpt_layout o = gpt_layout_make(&c);
    size_t n = gpt_param_count(&c), len = 0, i, cut;
    size_t d = 8, F = 17, per_layer = 3 * d * d + 3 * d + d * d + d + F * d + F + d * F + d + 4 * d;
    float *p = (float *)malloc(n * sizeof(float)), *m = (float *)malloc(n * sizeof(float));
    float *v = (float *)malloc(n * sizeof(float));
    unsigned char *good, *b;
    gpt_ckpt ck;
    mha_status st;
    mha_error err;
    tu_rng r = {12345};
    (void)argc;
    snprintf(path, sizeof path, "%s.ckpt", argv[0]);
    g_path = path;

    /* the layout, counted by hand: wte, wpe, 2 layers, final norm */
    CHECK(n == 7 * d + 5 * d + 2 * per_layer + 2 * d, "param count %zu", n);
    CHECK(o.layer0 == 12 * d && o.layer_stride == per_layer && o.lnf_b + d == n, "layout offsets");
    CHECK(gpt_param_count(&(gpt_config){4, 4, 128, 512, 128, 256}) == 842496, "default model size");
    CHECK(!gpt_config_valid(&(gpt_config){2, 3, 8, 17, 5, 7}), "heads must divide d_model");
    CHECK(!gpt_config_valid(&(gpt_config){0, 2, 8, 17, 5, 7}), "zero layers refused");

    tu_fill(&r, p, n, 3.0f); tu_fill(&r, m, n, 1.0f); tu_fill(&r, v, n, 1.0f);
    p[0] = -0.0f; p[1] = 1e-40f; /* sign of zero and a subnormal survive */

    /* round trip with and without the AdamW moments */
    st = gpt_ckpt_save(path, &c, 1234567890123ULL, p, m, v, &err);
    CHECK(st == MHA_OK, "save: %s", err.message);
    st = gpt_ckpt_load(path, &c, &ck, &err);
    CHECK(st == MHA_OK, "load: %s", err.message);
    if (st == MHA_OK) {
        CHECK(memcmp(&ck.cfg, &c, sizeof c) == 0 && ck.step == 1234567890123ULL && ck.n_params == n,
              "header fields");
        CHECK(memcmp(ck.params, p, n * 4) == 0 && ck.adam_m && ck.adam_v &&
                  memcmp(ck.adam_m, m, n * 4) == 0 && memcmp(ck.adam_v, v, n * 4) == 0,
              "every bit of params, m, v");
        gpt_ckpt_free(&ck);
    }
    good = slurp(path, &len);
    CHECK(good && len == 64 + 12 * n, "file size %zu", len);
    CHECK(good && memcmp(good, "MHAGPTck", 8) == 0 && good[8] == 1 && good[12] == 2, "little-endian header");
    st = gpt_ckpt_save(path, &c, 7, p, NULL, NULL, NULL);
    st = st == MHA_OK ? gpt_ckpt_load(path, NULL, &ck, NULL) : st;
    CHECK(st == MHA_OK && !ck.adam_m && !ck.adam_v && ck.step == 7 &&
              memcmp(ck.params, p, n * 4) == 0, "parameters-only checkpoint (err NULL)");
    if (st == MHA_OK) gpt_ckpt_free(&ck);
    if (!good) return tu_finish("test_ckpt");

    /* the shape the caller asks for */
    spit(path, good, len);
    expect(MHA_OK, NULL, NULL, &c, "matching shape");
    other.d_ff = 16;
    expect(MHA_ERR_SHAPE, "want", "d_ff 17, ctx 5, vocab 7; asked for 2, 2, 8, 16, 5, 7", &other,
           "another d_ff asked for");

    /* missing file (the system's reason in the message), and bad arguments */
    remove(path);
    expect(MHA_ERR_IO, "path", strerror(ENOENT), NULL, "missing file");
    CHECK(gpt_ckpt_load(NULL, NULL, &ck, &err) == MHA_ERR_NULL_POINTER, "NULL path");
    check_err(&err, MHA_ERR_NULL_POINTER, "gpt_ckpt_load", "path", "is NULL", "NULL path");
    CHECK(gpt_ckpt_load(path, NULL, NULL, &err) == MHA_ERR_NULL_POINTER, "NULL out");
    check_err(&err, MHA_ERR_NULL_POINTER, "gpt_ckpt_load", "out", "is NULL", "NULL out");
    CHECK(gpt_ckpt_read(NULL, NULL, &ck, &err) == MHA_ERR_NULL_POINTER, "NULL stream");
    check_err(&err, MHA_ERR_NULL_POINTER, "gpt_ckpt_read", "f", "is NULL", "NULL stream");
    CHECK(gpt_ckpt_save(path, &(gpt_config){2, 3, 8, 17, 5, 7}, 0, p, NULL, NULL, &err) ==
              MHA_ERR_INVALID_ARGUMENT, "save refuses an invalid shape");
    check_err(&err, MHA_ERR_INVALID_ARGUMENT, "gpt_ckpt_save", "c", "n_head is out of range",
              "save refuses an invalid shape");
    CHECK(gpt_ckpt_save(path, &c, 0, NULL, NULL, NULL, &err) == MHA_ERR_NULL_POINTER, "save without params");
    check_err(&err, MHA_ERR_NULL_POINTER, "gpt_ckpt_save", "params", "is NULL", "save without params");
    CHECK(gpt_ckpt_save("no/such/folder/x.ckpt", &c, 0, p, NULL, NULL, &err) == MHA_ERR_IO,
          "save into a missing folder");
    check_err(&err, MHA_ERR_IO, "gpt_ckpt_save", "path", "no/such/folder/x.ckpt.tmp", "save into a missing folder");
    CHECK(strstr(err.message, strerror(ENOENT)) != NULL, "save into a missing folder: the system's reason: %s",
          err.message);
    /* a file that cannot take the rename: the target is a folder */
    {
        static char dir[1100];
        snprintf(dir, sizeof dir, "%s.dir", path);
        if (mkdir(dir, 0777) == 0) {
            CHECK(gpt_ckpt_save(dir, &c, 0, p, NULL, NULL, &err) == MHA_ERR_IO, "save onto a folder");
            check_err(&err, MHA_ERR_IO, "gpt_ckpt_save", "path", "cannot rename", "save onto a folder");
            /* a folder opens for reading on Linux, and its read fails: the
               system's refusal, not a truncated checkpoint */
            CHECK(gpt_ckpt_load(dir, NULL, &ck, &err) == MHA_ERR_IO, "load a folder: %s", err.message);
            check_err(&err, MHA_ERR_IO, "gpt_ckpt_load", "path", dir, "load a folder");
            rmdir(dir);
        }
    }

    /* truncated: inside the header, at its end, inside each part, one byte short */
    {
        const size_t cuts[] = {0, 1, 8, 40, 63, 64, 65, 64 + 4 * n - 1, 64 + 4 * n, 64 + 8 * n + 2, 0};
        char what[64];
        for (i = 0; i < sizeof cuts / sizeof cuts[0]; ++i) {
            cut = i + 1 == sizeof cuts / sizeof cuts[0] ? len - 1 : cuts[i];
            snprintf(what, sizeof what, "truncated to %zu bytes", cut);
            expect_mod(good, len, cut, len, 0, MHA_ERR_FORMAT, "length", "truncated", what);
        }
    }
    expect_mod(good, len, len + 1, len, 0x5A, MHA_ERR_FORMAT, "length", "trailing bytes", "one byte too many");
    expect_mod(good, len, len, 0, 0x01, MHA_ERR_FORMAT, "magic", "not a tiny_gpt checkpoint", "wrong magic");
    expect_mod(good, len, len, 8, 0x02, MHA_ERR_FORMAT, "version", "format version 3", "version 3");

    /* flipped bits: the step (header), a parameter, the last byte of v */
    expect_mod(good, len, len, 41, 0x10, MHA_ERR_FORMAT, "checksum", "checksum mismatch",
               "flipped bit in the step field");
    expect_mod(good, len, len, 64 + 17, 0x04, MHA_ERR_FORMAT, "checksum", "checksum mismatch",
               "flipped bit in a parameter");
    expect_mod(good, len, len, len - 1, 0x80, MHA_ERR_FORMAT, "checksum", "checksum mismatch",
               "flipped bit in the last byte");
    expect_mod(good, len, len, 60, 0x01, MHA_ERR_FORMAT, "checksum", "checksum mismatch",
               "flipped bit in the checksum");

    /* sizes: each wrong on its own, with a checksum that matches */
    b = (unsigned char *)malloc(len);
    {
        const struct {
            size_t at; unsigned long long val; int bytes; const char *field, *word, *what;
        } bad[] = {
            {12, 0, 4, "n_layer", "n_layer is 0, expected 1..65536", "zero layers"},
            {12, 257, 4, "n_layer", "n_layer is 257, at most 256", "257 layers"},
            {16, 3, 4, "n_head", "n_head 3 does not divide d_model 8", "heads do not divide d_model"},
            {20, 0xFFFFFFFFull, 4, "d_model", "d_model is 4294967295", "d_model 2^32-1"},
            {24, GPT_MAX_DIM + 1, 4, "d_ff", "d_ff is 65537", "d_ff above the bound"},
            {28, 6, 4, "n_params", "the shape in the header has", "ctx 6 but the parameter count of ctx 5"},
            {36, 2, 4, "flags", "flags are 2", "unknown flag"},
            {48, 0, 8, "n_params", "n_params is 0", "n_params 0"},
            {48, 0xFFFFFFFFFFFFFFFFull, 8, "n_params", "n_params is 18446744073709551615", "n_params 2^64-1"},
        };
        for (i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
            memcpy(b, good, len);
            set_field(b, len, bad[i].at, bad[i].val, bad[i].bytes);
            spit(path, b, len);
            expect(MHA_ERR_FORMAT, bad[i].field, bad[i].word, NULL, bad[i].what);
        }
        /* the moments flag cleared: the header now says 4n payload bytes, the file has 12n */
        memcpy(b, good, len);
        set_field(b, len, 36, 0, 4);
        spit(path, b, len);
        expect(MHA_ERR_FORMAT, "length", "trailing bytes", NULL, "moments flag cleared");
    }
    /* a bare 64-byte header that claims a huge valid model (256 layers of
       d = 65536: about 1.3e13 parameters) is truncated, found from the file's
       length before anything is allocated (it used to say out of memory) */
    {
        gpt_config huge = {256, 1, 65536, 65536, 65536, 65536};
        unsigned char h[64];
        memcpy(h, good, 64);
        gpt__put(h + 12, 256, 4); gpt__put(h + 16, 1, 4); gpt__put(h + 20, 65536, 4);
        gpt__put(h + 24, 65536, 4); gpt__put(h + 28, 65536, 4); gpt__put(h + 32, 65536, 4);
        gpt__put(h + 36, 1, 4);
        gpt__put(h + 48, gpt_param_count(&huge), 8);
        gpt__put(h + 56, gpt_fnv1a(GPT_FNV_INIT, h, 56), 8);
        spit(path, h, 64);
        expect(MHA_ERR_FORMAT, "length", "truncated", NULL, "a header claiming 1.3e13 parameters, no payload");
    }

    /* the step is free: a changed step with a matching checksum loads */
    memcpy(b, good, len);
    set_field(b, len, 40, 99, 8);
    spit(path, b, len);
    expect(MHA_OK, NULL, NULL, NULL, "another step, checksum recomputed");

    /* a stream (gpt_ckpt_read) is called "stream" in its messages */
    {
        FILE *f = fopen(path, "rb");
        CHECK(f != NULL, "reopen");
        if (f) {
            CHECK(gpt_ckpt_read(f, &other, &ck, &err) == MHA_ERR_SHAPE, "stream of another shape");
            check_err(&err, MHA_ERR_SHAPE, "gpt_ckpt_read", "want", "stream holds layers 2", "stream of another shape");
            fclose(f);
        }
    }

    remove(path);
    free(b); free(good); free(p); free(m); free(v);
    return tu_finish("test_ckpt");
}
