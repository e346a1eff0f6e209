/* test_safetensors.c - the .safetensors reader (examples/safetensors.h) on
   files written from PyTorch by tests/gen_safetensors.py (tests/data/safetensors):
   a 2-layer nn.TransformerEncoder loaded by name and run with
   mha_encoder_forward against PyTorch's output, an nn.MultiheadAttention with
   kdim/vdim/add_bias_kv, F16/BF16/F64 conversion, and one broken file per
   check of the reader, each refused with its own message. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_ST_IMPLEMENTATION
#include "../examples/safetensors.h"
#include "testutil.h"
#include <stdlib.h>
#include <string.h>

#define DATA "tests/data/safetensors/"

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long len;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = (unsigned char *)malloc((size_t)len + 1);
    if (fread(b, 1, (size_t)len, f) != (size_t)len) { free(b); b = NULL; }
    fclose(f);
    *n = (size_t)len;
    return b;
}

/* rel error of a float32 result against a float32 tensor of the file */
static double err_vs(mha_st_file *f, const char *name, const float *got, size_t n)
{
    char err[256];
    const float *ref = mha_st_floats(f, name, -1, NULL, err, sizeof err);
    const mha_st_tensor *t = mha_st_find(f, name);
    if (!ref || !t || t->count != n) { printf("NOTE %s: %s\n", name, ref ? "size" : err); return 1e30; }
    return tu_rel_err_ff(got, ref, n);
}

/* The 2-layer encoder: the state_dict as saved, two mha_encoder_forward calls. */
static void test_encoder(int how)
{
    static const char *const hows[] = {"mmap", "read", "memory"};
    mha_st_file f;
    mha_encoder_layer layer[2];
    char err[256];
    unsigned char *buf = NULL;
    size_t n = 0;
    int rc, l, causal;
    const mha_st_tensor *tx;
    memset(layer, 0, sizeof layer);
    if (how == 0) rc = mha_st_open(DATA "encoder.safetensors", &f, err, sizeof err);
    else if (how == 1) rc = mha_st_open_read(DATA "encoder.safetensors", &f, err, sizeof err);
    else {
        buf = slurp(DATA "encoder.safetensors", &n);
        rc = buf ? mha_st_open_mem(buf, n, &f, err, sizeof err) : -1;
    }
    CHECK(rc == 0, "encoder.safetensors opens (%s): %s", hows[how], rc ? err : "");
    if (rc) { free(buf); return; }
    CHECK(how != 0 || f.map != NULL, "the file is mapped");
    CHECK(f.count == 27, "24 encoder tensors + 3 test tensors, got %d", f.count);
    CHECK(f.meta_count == 2 && mha_st_metadata(&f, "nhead") && strcmp(mha_st_metadata(&f, "nhead"), "4") == 0 &&
          strcmp(mha_st_metadata(&f, "format"), "pt") == 0 && mha_st_metadata(&f, "absent") == NULL,
          "__metadata__ read");
    for (l = 0; l < 2; ++l) {
        char prefix[32];
        snprintf(prefix, sizeof prefix, "layers.%d.", l);
        rc = mha_st_encoder_layer(&f, prefix, 4, &layer[l], err, sizeof err);
        CHECK(rc == 0, "layer %d fills: %s", l, rc ? err : "");
        CHECK(layer[l].self_attn.embed_dim == 16 && layer[l].self_attn.num_heads == 4 &&
              layer[l].dim_feedforward == 24 && layer[l].self_attn.in_proj_weight &&
              layer[l].self_attn.in_proj_bias && layer[l].linear2_bias && layer[l].norm2_bias,
              "layer %d: E 16, H 4, F 24, every tensor present", l);
    }
    tx = mha_st_find(&f, "test.x");
    CHECK(tx && tx->ndim == 3 && tx->shape[0] == 2 && tx->shape[1] == 5 && tx->shape[2] == 16, "test.x [2,5,16]");
    for (causal = 0; tx && causal < 2 && !rc; ++causal) {
        const float *x = mha_st_floats(&f, "test.x", 3, tx->shape, err, sizeof err);
        float h[160], y[160];
        mha_options o;
        mha_status s0, s1;
        double e;
        memset(&o, 0, sizeof o);
        o.causal = causal;
        s0 = mha_encoder_forward(&layer[0], 2, 5, x, &o, h, NULL, NULL, 0);
        s1 = mha_encoder_forward(&layer[1], 2, 5, h, &o, y, NULL, NULL, 0);
        CHECK(s0 == MHA_OK && s1 == MHA_OK, "forward: %s / %s", mha_status_string(s0), mha_status_string(s1));
        e = err_vs(&f, causal ? "test.y_causal" : "test.y", y, 160);
        CHECK(e <= 1e-5, "2-layer encoder (%s%s) vs PyTorch: rel err %.3g", hows[how], causal ? ", causal" : "", e);
        if (how == 0) printf("worst encoder%s rel err vs PyTorch: %.3g\n", causal ? " (causal)" : "", e);
    }
    /* a prefix that is not there: the error names the first tensor looked for */
    {
        mha_encoder_layer before = layer[0];
        rc = mha_st_encoder_layer(&f, "layers.2.", 4, &layer[0], err, sizeof err);
        CHECK(rc == -1 && strstr(err, "'layers.2.self_attn.out_proj.weight' is missing"), "missing layer: %s", err);
        CHECK(memcmp(&before, &layer[0], sizeof before) == 0, "layer untouched on error");
        rc = mha_st_encoder_layer(&f, "layers.0.", 3, &layer[0], err, sizeof err);
        CHECK(rc == -1 && strstr(err, "num_heads 3 does not divide embed_dim 16"), "nhead 3: %s", err);
    }
    mha_st_close(&f);
    CHECK(f.count == 0 && f.tensors == NULL && f.map == NULL, "close zeroes");
    mha_st_close(&f);   /* twice is harmless */
    free(buf);
}

/* kdim 5, vdim 7, add_bias_kv: separate q/k/v weights and bias_k [1,1,E] */
static void test_mha_kv(void)
{
    mha_st_file f;
    mha_module m;
    char err[256];
    float out[72];
    int rc;
    mha_status s;
    memset(&m, 0, sizeof m);
    rc = mha_st_open(DATA "mha_kv.safetensors", &f, err, sizeof err);
    CHECK(rc == 0, "mha_kv.safetensors opens: %s", rc ? err : "");
    if (rc) return;
    rc = mha_st_module(&f, "attn.", 3, &m, err, sizeof err);
    CHECK(rc == 0, "module fills: %s", rc ? err : "");
    CHECK(m.embed_dim == 12 && m.kdim == 5 && m.vdim == 7 && !m.in_proj_weight && m.q_proj_weight &&
          m.bias_k && m.bias_v, "E 12, kdim 5, vdim 7, bias_k/v");
    s = mha_forward(&m, 2, 3, 4, mha_st_floats(&f, "test.q", -1, NULL, err, sizeof err),
                    mha_st_floats(&f, "test.k", -1, NULL, err, sizeof err),
                    mha_st_floats(&f, "test.v", -1, NULL, err, sizeof err), NULL, out, NULL, NULL, 0);
    CHECK(s == MHA_OK, "forward: %s", mha_status_string(s));
    {
        double e = err_vs(&f, "test.out", out, 72);
        CHECK(e <= 1e-5, "MultiheadAttention(kdim, vdim, add_bias_kv) vs PyTorch: rel err %.3g", e);
        printf("worst mha_kv rel err vs PyTorch: %.3g\n", e);
    }
    mha_st_close(&f);
}

static int same_float(float a, float b)
{
    return (isnan(a) && isnan(b)) || (a == b && signbit(a) == signbit(b));
}

static void test_dtypes(void)
{
    static const char *const pairs[3][2] = {{"half", "half.as_f32"}, {"bf16", "bf16.as_f32"},
                                            {"double", "double.as_f32"}};
    static const double dbl[6] = {0.1, -1e300, 1e-300, 3.0, INFINITY, 12345.678901234};
    mha_st_file f;
    char err[256];
    int rc, p;
    size_t i;
    const mha_st_tensor *t;
    rc = mha_st_open(DATA "dtypes.safetensors", &f, err, sizeof err);
    CHECK(rc == 0, "dtypes.safetensors opens: %s", rc ? err : "");
    if (rc) return;
    for (p = 0; p < 3; ++p) {
        const mha_st_tensor *a = mha_st_find(&f, pairs[p][0]);
        const float *got = mha_st_floats(&f, pairs[p][0], -1, NULL, err, sizeof err);
        const float *want = mha_st_floats(&f, pairs[p][1], -1, NULL, err, sizeof err);
        int bad = 0;
        CHECK(a && got && want && a->dtype == (mha_st_dtype)(p + 1), "%s found, dtype %s", pairs[p][0],
              a ? mha_st_dtype_name(a->dtype) : "-");
        for (i = 0; a && got && want && i < a->count; ++i) bad += !same_float(got[i], want[i]);
        CHECK(a && bad == 0, "%s -> float32 equals PyTorch's .float() bit for bit (%d differ)", pairs[p][0], bad);
    }
    {
        double d[6];
        t = mha_st_find(&f, "double");
        rc = mha_st_read_f64(t, d, 6, err, sizeof err);
        CHECK(rc == 0 && memcmp(d, dbl, sizeof d) == 0, "F64 read as double exactly");
        CHECK(mha_st_read_f64(t, d, 5, err, sizeof err) == -1 && strstr(err, "has 6 values, not 5"),
              "wrong count: %s", err);
    }
    t = mha_st_find(&f, "scalar");
    CHECK(t && t->ndim == 0 && t->count == 1 && mha_st_floats(&f, "scalar", 0, NULL, err, sizeof err)[0] == 7.5f,
          "scalar: shape [], one value");
    t = mha_st_find(&f, "empty");
    CHECK(t && t->ndim == 2 && t->count == 0 && t->begin == t->end, "empty [0, 3]");
    t = mha_st_find(&f, "steps");
    CHECK(t && t->dtype == MHA_ST_I64 && t->count == 5, "I64 tensor listed");
    CHECK(mha_st_floats(&f, "steps", -1, NULL, err, sizeof err) == NULL &&
          strstr(err, "'steps' has dtype I64; only F32, F16, BF16 and F64 are read"), "I64 refused: %s", err);
    CHECK(mha_st_find(&f, "n\xc3\xa9" "e \"quoted\"") != NULL, "a name with \\u00e9 and \\\" escapes decodes");
    CHECK(mha_st_find(&f, "nope") == NULL && mha_st_find(&f, "") == NULL, "absent names are NULL");
    CHECK(mha_st_metadata(&f, "note") && strcmp(mha_st_metadata(&f, "note"), "tab\there") == 0, "metadata escape");
    {
        size_t sh[2] = {3, 5};
        CHECK(mha_st_floats(&f, "half", 2, sh, err, sizeof err) == NULL &&
              strstr(err, "'half' has shape [3, 4], expected [3, 5]"), "shape check: %s", err);
    }
    mha_st_close(&f);
}

/* Each broken file and the words its error must contain. */
static void test_bad_files(void)
{
    static const char *const cases[][2] = {
        {"bad_short", "truncated: 4 bytes"},
        {"bad_header_past_end", "header length 1000 runs past the end of the file"},
        {"bad_header_huge", "is larger than the 100000000 allowed"},
        {"bad_not_json", "does not start with '{'"},
        {"bad_json_unclosed", "JSON syntax error in the header at byte 53: expected ',' or '}'"},
        {"bad_json_trailing_comma", "JSON syntax error in the header at byte 54: expected a string"},
        {"bad_json_escape", "unknown escape in a string"},
        {"bad_json_control", "control character inside a string"},
        {"bad_json_after", "bytes after the closing '}'"},
        {"bad_json_leading_zero", "number with a leading zero"},
        {"bad_utf8", "not valid UTF-8 (byte 3)"},
        {"bad_negative_dim", "tensor 'a': shape holds a negative number"},
        {"bad_float_dim", "tensor 'a': shape holds a number that is not an integer"},
        {"bad_too_many_dims", "tensor 'a': shape has more than 8 entries"},
        {"bad_dtype", "tensor 'a': unknown dtype 'F33'"},
        {"bad_missing_field", "tensor 'a': missing shape"},
        {"bad_unknown_field", "tensor 'a': unknown field 'x'"},
        {"bad_offsets_three", "data_offsets has more than 2 entries"},
        {"bad_offsets_reversed", "data_offsets [8, 0] end before they begin"},
        {"bad_offsets_past_end", "data_offsets [0, 8] run past the data section (4 bytes)"},
        {"bad_offsets_size", "data_offsets span 8 bytes, but F32 x 3 values need 12"},
        {"bad_overlap", "tensor 'b' overlaps tensor 'a'"},
        {"bad_hole", "a hole of 4 bytes before tensor 'a'"},
        {"bad_trailing_data", "4 bytes after the last tensor's data"},
        {"bad_duplicate", "duplicate name 'a'"},
        {"bad_metadata_value", "__metadata__ value of 'n' is not a string"},
        {"bad_shape_overflow", "tensor 'a': the shape's"},
    };
    size_t c, n = 0;
    for (c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        char path[256], err[256] = "", err2[256] = "";
        mha_st_file f, zero;
        unsigned char *buf;
        int rc;
        snprintf(path, sizeof path, DATA "%s.safetensors", cases[c][0]);
        rc = mha_st_open(path, &f, err, sizeof err);
        memset(&zero, 0, sizeof zero);
        CHECK(rc == -1 && strstr(err, cases[c][1]) != NULL, "%s: got \"%s\", want \"%s\"", cases[c][0], err, cases[c][1]);
        CHECK(memcmp(&f, &zero, sizeof f) == 0, "%s: the file struct is zeroed on error", cases[c][0]);
        buf = slurp(path, &n);
        rc = buf ? mha_st_open_mem(buf, n, &f, err2, sizeof err2) : 0;
        CHECK(rc == -1 && strcmp(err, err2) == 0, "%s: memory and file give the same error", cases[c][0]);
        free(buf);
    }
    {
        mha_st_file f;
        char err[256];
        CHECK(mha_st_open(DATA "no_such_file.safetensors", &f, err, sizeof err) == -1 &&
              strstr(err, "cannot open"), "missing file: %s", err);
        CHECK(mha_st_open_mem(NULL, 0, &f, err, sizeof err) == -1, "NULL buffer");
        CHECK(mha_st_open_mem("", 0, &f, NULL, 0) == -1, "err may be NULL");
    }
}

/* Files that load but whose tensors do not make a layer. */
static void test_bad_modules(void)
{
    static const char *const cases[][2] = {
        {"bad_module_shape", "tensor 'layers.0.self_attn.out_proj.bias' has shape [17], expected [16]"},
        {"bad_module_missing", "tensor 'layers.0.linear2.weight' is missing"},
        {"bad_module_dtype", "tensor 'layers.0.norm1.weight' has dtype I64"},
    };
    size_t c;
    for (c = 0; c < 3; ++c) {
        char path[256], err[256] = "";
        mha_st_file f;
        mha_encoder_layer layer, before;
        int rc;
        snprintf(path, sizeof path, DATA "%s.safetensors", cases[c][0]);
        rc = mha_st_open(path, &f, err, sizeof err);
        CHECK(rc == 0, "%s opens: %s", cases[c][0], err);
        memset(&layer, 0, sizeof layer);
        layer.activation = MHA_ACT_GELU;
        before = layer;
        rc = mha_st_encoder_layer(&f, "layers.0.", 4, &layer, err, sizeof err);
        CHECK(rc == -1 && strstr(err, cases[c][1]) != NULL, "%s: got \"%s\"", cases[c][0], err);
        CHECK(memcmp(&layer, &before, sizeof layer) == 0, "%s: layer untouched", cases[c][0]);
        mha_st_close(&f);
    }
}

/* Every prefix of a good file is refused, never read past (ASan config). */
static void test_truncations(void)
{
    size_t n = 0, len;
    unsigned char *buf = slurp(DATA "dtypes.safetensors", &n);
    int refused = 0;
    if (!buf) { CHECK(0, "dtypes.safetensors readable"); return; }
    for (len = 0; len < n; ++len) {
        mha_st_file f;
        unsigned char *cut = (unsigned char *)malloc(len ? len : 1);
        memcpy(cut, buf, len);
        refused += mha_st_open_mem(cut, len, &f, NULL, 0) == -1;
        free(cut);
    }
    CHECK(refused == (int)n, "all %d truncations refused (%d)", (int)n, refused);
    free(buf);
}

int main(void)
{
    int how;
    for (how = 0; how < 3; ++how) test_encoder(how);
    test_mha_kv();
    test_dtypes();
    test_bad_files();
    test_bad_modules();
    test_truncations();
    return tu_finish("test_safetensors");
}
