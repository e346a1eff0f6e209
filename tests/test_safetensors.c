/* test_safetensors.c - the .safetensors reader (examples/safetensors.h) on
   files written from PyTorch by tests/gen_safetensors.py (tests/data/safetensors):
   a 2-layer nn.TransformerEncoder loaded by name and run with
   mha_encoder_forward against PyTorch's output, an nn.MultiheadAttention with
   kdim/vdim/add_bias_kv, F16/BF16/F64 conversion, one broken file per check
   of the reader, each refused with its own status, field and message, the
   refusals of the system (a missing file, a directory, an unreadable file:
   the path and the operating system's reason), and the tensor rules (the
   name, the rule, the expected and found shape and dtype). */
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_ST_IMPLEMENTATION
#include "../examples/safetensors.h"
#include "testutil.h"
#include "errcheck.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define DATA "tests/data/safetensors/"
#define TMP "build/tests/"

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
    mha_error err;
    const float *ref = NULL;
    const mha_st_tensor *t = mha_st_find(f, name);
    if (mha_st_floats(f, name, -1, NULL, &ref, &err) != MHA_OK || !t || t->count != n) {
        printf("NOTE %s: %s\n", name, ref ? "size" : err.message);
        return 1e30;
    }
    return tu_rel_err_ff(got, ref, n);
}

/* The 2-layer encoder: the state_dict as saved, two mha_encoder_forward calls. */
static void test_encoder(int how)
{
    static const char *const hows[] = {"mmap", "read", "memory"};
    static const char *const fns[] = {"mha_st_open", "mha_st_open_read", "mha_st_open_mem"};
    mha_st_file f;
    mha_encoder_layer layer[2];
    mha_error err;
    unsigned char *buf = NULL;
    size_t n = 0;
    int l, causal;
    mha_status rc;
    const mha_st_tensor *tx;
    memset(layer, 0, sizeof layer);
    memset(&f, 0, sizeof f);
    if (how == 0) rc = mha_st_open(DATA "encoder.safetensors", &f, &err);
    else if (how == 1) rc = mha_st_open_read(DATA "encoder.safetensors", &f, &err);
    else {
        buf = slurp(DATA "encoder.safetensors", &n);
        rc = buf ? mha_st_open_mem(buf, n, &f, &err) : MHA_ERR_IO;
    }
    CHECK(rc == MHA_OK, "encoder.safetensors opens (%s): %s", hows[how], rc ? err.message : "");
    if (rc) { free(buf); return; }
    CHECK(err.status == MHA_OK && err.field == NULL && err.message[0] == 0, "%s: a success leaves a clean report",
          fns[how]);
    CHECK(how != 0 || f.map != NULL, "the file is mapped");
    CHECK(f.count == 27, "24 encoder tensors + 3 test tensors, got %d", f.count);
    CHECK(f.meta_count == 2 && mha_st_metadata(&f, "nhead") && strcmp(mha_st_metadata(&f, "nhead"), "4") == 0 &&
          strcmp(mha_st_metadata(&f, "format"), "pt") == 0 && mha_st_metadata(&f, "absent") == NULL,
          "__metadata__ read");
    for (l = 0; l < 2; ++l) {
        char prefix[32];
        snprintf(prefix, sizeof prefix, "layers.%d.", l);
        rc = mha_st_encoder_layer(&f, prefix, 4, &layer[l], &err);
        CHECK(rc == MHA_OK, "layer %d fills: %s", l, rc ? err.message : "");
        CHECK(layer[l].self_attn.embed_dim == 16 && layer[l].self_attn.num_heads == 4 &&
              layer[l].dim_feedforward == 24 && layer[l].self_attn.in_proj_weight &&
              layer[l].self_attn.in_proj_bias && layer[l].linear2_bias && layer[l].norm2_bias,
              "layer %d: E 16, H 4, F 24, every tensor present", l);
    }
    tx = mha_st_find(&f, "test.x");
    CHECK(tx && tx->ndim == 3 && tx->shape[0] == 2 && tx->shape[1] == 5 && tx->shape[2] == 16, "test.x [2,5,16]");
    for (causal = 0; tx && causal < 2 && !rc; ++causal) {
        const float *x = NULL;
        float h[160], y[160];
        mha_options o;
        mha_status s0, s1 = MHA_OK;
        double e;
        rc = mha_st_floats(&f, "test.x", 3, tx->shape, &x, &err);
        CHECK(rc == MHA_OK && x != NULL, "test.x as float32: %s", rc ? err.message : "");
        if (rc) break;
        memset(&o, 0, sizeof o);
        o.causal = causal;
        s0 = mha_encoder_forward(&layer[0], 2, 5, x, &o, h, NULL, &err);
        if (s0 == MHA_OK) s1 = mha_encoder_forward(&layer[1], 2, 5, h, &o, y, NULL, &err);
        CHECK(s0 == MHA_OK && s1 == MHA_OK, "forward: %s", err.message);
        if (s0 != MHA_OK || s1 != MHA_OK) break;
        e = err_vs(&f, causal ? "test.y_causal" : "test.y", y, 160);
        CHECK(e <= 1e-5, "2-layer encoder (%s%s) vs PyTorch: rel err %.3g", hows[how], causal ? ", causal" : "", e);
        if (how == 0) printf("worst encoder%s rel err vs PyTorch: %.3g\n", causal ? " (causal)" : "", e);
    }
    /* a prefix that is not there: the error names the first tensor looked for */
    {
        mha_encoder_layer before = layer[0];
        rc = mha_st_encoder_layer(&f, "layers.2.", 4, &layer[0], &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_NOT_FOUND, "mha_st_encoder_layer", "out_proj.weight",
                         "tensor 'layers.2.self_attn.out_proj.weight' is missing"), "missing layer: %s", err.message);
        CHECK(memcmp(&before, &layer[0], sizeof before) == 0, "layer untouched on error");
        rc = mha_st_encoder_layer(&f, "layers.0.", 3, &layer[0], &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_HEADS_DIVIDE, "mha_st_encoder_layer", "num_heads",
                         "num_heads 3 does not divide embed_dim 16"), "nhead 3: %s", err.message);
        rc = mha_st_encoder_layer(&f, "layers.0.", 0, &layer[0], &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_INVALID_SIZE, "mha_st_encoder_layer", "num_heads", "is 0; expected >= 1"),
              "nhead 0: %s", err.message);
        CHECK(memcmp(&before, &layer[0], sizeof before) == 0, "layer untouched on error");
        CHECK(mha_st_encoder_layer(&f, "layers.2.", 4, &layer[0], NULL) == MHA_ERR_NOT_FOUND,
              "err may be NULL: the status alone");
        CHECK(mha_st_module(&f, "layers.0.", 4, NULL, &err) == MHA_ERR_NULL_POINTER &&
              ec_refused(err.status, &err, MHA_ERR_NULL_POINTER, "mha_st_module", "m", "is NULL"), "NULL module: %s",
              err.message);
    }
    /* a prefix too long to make keys of is refused, not cut */
    {
        char longp[MHA_ST_MAX_PREFIX + 2];
        memset(longp, 'a', sizeof longp - 1);
        longp[sizeof longp - 1] = 0;
        rc = mha_st_encoder_layer(&f, longp, 4, &layer[0], &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_INVALID_ARGUMENT, "mha_st_encoder_layer", "prefix", "401 bytes long"),
              "long prefix: %s", err.message);
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
    mha_error err;
    float out[72];
    const float *q = NULL, *k = NULL, *v = NULL;
    mha_status rc;
    memset(&m, 0, sizeof m);
    rc = mha_st_open(DATA "mha_kv.safetensors", &f, &err);
    CHECK(rc == MHA_OK, "mha_kv.safetensors opens: %s", rc ? err.message : "");
    if (rc) return;
    rc = mha_st_module(&f, "attn.", 3, &m, &err);
    CHECK(rc == MHA_OK, "module fills: %s", rc ? err.message : "");
    CHECK(m.embed_dim == 12 && m.kdim == 5 && m.vdim == 7 && !m.in_proj_weight && m.q_proj_weight &&
          m.bias_k && m.bias_v, "E 12, kdim 5, vdim 7, bias_k/v");
    rc = mha_st_floats(&f, "test.q", -1, NULL, &q, &err);
    if (rc == MHA_OK) rc = mha_st_floats(&f, "test.k", -1, NULL, &k, &err);
    if (rc == MHA_OK) rc = mha_st_floats(&f, "test.v", -1, NULL, &v, &err);
    CHECK(rc == MHA_OK, "test.q/k/v: %s", err.message);
    if (rc == MHA_OK) rc = mha_module_forward(&m, 2, 3, 4, q, k, v, NULL, out, NULL, &err);
    CHECK(rc == MHA_OK, "forward: %s", err.message);
    if (rc == MHA_OK) {
        double e = err_vs(&f, "test.out", out, 72);
        CHECK(e <= 1e-5, "MultiheadAttention(kdim, vdim, add_bias_kv) vs PyTorch: rel err %.3g", e);
        printf("worst mha_kv rel err vs PyTorch: %.3g\n", e);
    }
    /* the weights kept in 16 bits (m.weight_dtype on entry): the bits of mha_convert, and a PACK plan of
       them runs as the float32 module of the widened values */
    {
        int ty;
        for (ty = 1; ty <= 2; ++ty) {
            mha_module m16, mw;
            mha_plan *p16 = NULL, *pw = NULL;
            float o16[72], ow[72], *wf[3];
            const void *src[3];
            size_t n[3], i;
            int j, ok = 1;
            memset(&m16, 0, sizeof m16);
            m16.weight_dtype = (mha_dtype)ty;
            rc = mha_st_module(&f, "attn.", 3, &m16, &err);
            CHECK(rc == MHA_OK && m16.weight_dtype == (mha_dtype)ty && m16.q_proj_weight != m.q_proj_weight,
                  "16-bit module fills: %s", rc ? err.message : "");
            if (rc) continue;
            src[0] = m16.q_proj_weight; src[1] = m16.k_proj_weight; src[2] = m16.v_proj_weight;
            n[0] = 12 * 12; n[1] = 12 * 5; n[2] = 12 * 7;
            mw = m;   /* the float32 module with the widened weights */
            for (j = 0; j < 3; ++j) {
                const float *f32 = j == 0 ? (const float *)m.q_proj_weight : j == 1 ? (const float *)m.k_proj_weight
                                                                                   : (const float *)m.v_proj_weight;
                uint16_t h[144];
                wf[j] = (float *)malloc(n[j] * sizeof(float));
                (void)mha_convert(n[j], MHA_F32, f32, (mha_dtype)ty, h, NULL);
                ok &= memcmp(h, src[j], n[j] * 2) == 0;
                (void)mha_convert(n[j], (mha_dtype)ty, src[j], MHA_F32, wf[j], NULL);
            }
            mw.q_proj_weight = wf[0]; mw.k_proj_weight = wf[1]; mw.v_proj_weight = wf[2];
            {
                float *wo = (float *)malloc(144 * sizeof(float));
                (void)mha_convert(144, (mha_dtype)ty, m16.out_proj_weight, MHA_F32, wo, NULL);
                mw.out_proj_weight = wo;
            }
            CHECK(ok, "16-bit weights are mha_convert's rounding of the file's float32");
            rc = mha_module_plan(&m16, 2, 3, 4, NULL, MHA_PLAN_PACK, NULL, 0, &p16, &err);
            if (rc == MHA_OK) rc = mha_module_plan(&mw, 2, 3, 4, NULL, MHA_PLAN_PACK, NULL, 0, &pw, &err);
            if (rc == MHA_OK) rc = mha_module_run_forward(p16, 3, 4, q, k, v, o16, NULL, &err);
            if (rc == MHA_OK) rc = mha_module_run_forward(pw, 3, 4, q, k, v, ow, NULL, &err);
            CHECK(rc == MHA_OK && memcmp(o16, ow, sizeof o16) == 0, "a PACK plan of the 16-bit weights: %s",
                  rc ? err.message : "same bits");
            for (i = 0; i < 3; ++i) free(wf[i]);
            free((void *)mw.out_proj_weight);
            mha_plan_destroy(p16); mha_plan_destroy(pw);
        }
        {
            mha_module mb;
            memset(&mb, 0, sizeof mb);
            mb.weight_dtype = (mha_dtype)4;
            rc = mha_st_module(&f, "attn.", 3, &mb, &err);
            CHECK(ec_refused(rc, &err, MHA_ERR_BAD_ENUM, "mha_st_module", "m->weight_dtype", "is 4") &&
                  mb.embed_dim == 0, "weight_dtype 4 refused, m untouched: %s", err.message);
        }
    }
    /* kdim and vdim come from the file; a caller's wrong guess does not matter */
    {
        mha_module m2;
        memset(&m2, 0, sizeof m2);
        m2.kdim = 99;
        m2.add_zero_attn = 1;
        rc = mha_st_module(&f, "attn.", 3, &m2, &err);
        CHECK(rc == MHA_OK && m2.kdim == 5 && m2.add_zero_attn == 1, "kdim from the file, add_zero_attn kept");
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
    mha_error err;
    mha_status rc;
    int p;
    size_t i;
    const mha_st_tensor *t;
    const float *x = NULL;
    rc = mha_st_open(DATA "dtypes.safetensors", &f, &err);
    CHECK(rc == MHA_OK, "dtypes.safetensors opens: %s", rc ? err.message : "");
    if (rc) return;
    for (p = 0; p < 3; ++p) {
        const mha_st_tensor *a = mha_st_find(&f, pairs[p][0]);
        const float *got = NULL, *want = NULL;
        int bad = 0;
        rc = mha_st_floats(&f, pairs[p][0], -1, NULL, &got, &err);
        if (rc == MHA_OK) rc = mha_st_floats(&f, pairs[p][1], -1, NULL, &want, &err);
        CHECK(rc == MHA_OK && a && got && want && a->dtype == (mha_st_dtype)(p + 1), "%s found, dtype %s: %s",
              pairs[p][0], a ? mha_st_dtype_name(a->dtype) : "-", rc ? err.message : "");
        for (i = 0; a && got && want && i < a->count; ++i) bad += !same_float(got[i], want[i]);
        CHECK(a && bad == 0, "%s -> float32 equals PyTorch's .float() bit for bit (%d differ)", pairs[p][0], bad);
    }
    {
        double d[6];
        t = mha_st_find(&f, "double");
        rc = mha_st_read_f64(t, d, 6, &err);
        CHECK(rc == MHA_OK && memcmp(d, dbl, sizeof d) == 0, "F64 read as double exactly");
        memset(d, 0, sizeof d);
        rc = mha_st_read_f64(t, d, 5, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_SHAPE, "mha_st_read_f64", "count",
                         "tensor 'double': expected 5 values (count), found F64 [2, 3], 6 values"), "wrong count: %s",
              err.message);
        CHECK(d[0] == 0, "nothing converted on a refusal");
        rc = mha_st_read_f32(t, NULL, 6, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_NULL_POINTER, "mha_st_read_f32", "dst", "is NULL"), "NULL dst: %s",
              err.message);
    }
    {   /* kept in 16 bits: the same type bit for bit, the other type and F32 rounded as mha_convert */
        uint16_t h[12], w[12];
        float fl[12];
        const mha_st_tensor *hf = mha_st_find(&f, "half"), *bf = mha_st_find(&f, "bf16");
        const mha_st_tensor *f32 = mha_st_find(&f, "half.as_f32");
        int ok = 1;
        rc = mha_st_read16(hf, MHA_F16, h, 12, &err);
        for (i = 0; rc == MHA_OK && i < 12; ++i) ok &= h[i] == (uint16_t)(hf->raw[2 * i] | hf->raw[2 * i + 1] << 8);
        CHECK(rc == MHA_OK && ok, "F16 kept as F16 bit for bit: %s", rc ? err.message : "");
        rc = mha_st_read16(bf, MHA_BF16, h, 12, &err);
        for (i = 0, ok = 1; rc == MHA_OK && i < 12; ++i) ok &= h[i] == (uint16_t)(bf->raw[2 * i] | bf->raw[2 * i + 1] << 8);
        CHECK(rc == MHA_OK && ok, "BF16 kept as BF16 bit for bit: %s", rc ? err.message : "");
        rc = mha_st_read16(hf, MHA_BF16, h, 12, &err);
        (void)mha_st_read16(hf, MHA_F16, w, 12, NULL);
        (void)mha_convert(12, MHA_F16, w, MHA_BF16, w, NULL);
        CHECK(rc == MHA_OK && memcmp(h, w, sizeof h) == 0, "F16 read as BF16 = mha_convert's rounding");
        rc = mha_st_read16(f32, MHA_F16, h, 12, &err);
        (void)mha_st_read_f32(f32, fl, 12, NULL);
        (void)mha_convert(12, MHA_F32, fl, MHA_F16, w, NULL);
        CHECK(rc == MHA_OK && memcmp(h, w, sizeof h) == 0, "F32 read as F16 = mha_convert's rounding");
        memset(h, 0, sizeof h);
        rc = mha_st_read16(mha_st_find(&f, "double"), MHA_F16, h, 6, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_SHAPE, "mha_st_read16", "t", "F64 would be rounded twice") && h[0] == 0,
              "F64 read in 16 bits refused: %s", err.message);
        rc = mha_st_read16(hf, MHA_F32, h, 12, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_INVALID_ARGUMENT, "mha_st_read16", "to", "expected MHA_F16 (1) or MHA_BF16")
              && h[0] == 0, "to F32 refused: %s", err.message);
        rc = mha_st_read16(hf, MHA_F16, h, 11, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_SHAPE, "mha_st_read16", "count", "expected 11 values") && h[0] == 0,
              "wrong count refused: %s", err.message);
    }
    t = mha_st_find(&f, "scalar");
    rc = mha_st_floats(&f, "scalar", 0, NULL, &x, &err);
    CHECK(t && t->ndim == 0 && t->count == 1 && rc == MHA_OK && x && x[0] == 7.5f, "scalar: shape [], one value");
    t = mha_st_find(&f, "empty");
    CHECK(t && t->ndim == 2 && t->count == 0 && t->begin == t->end, "empty [0, 3]");
    /* the tensor rules: name, rule, expected and found shape and dtype */
    t = mha_st_find(&f, "steps");
    CHECK(t && t->dtype == MHA_ST_I64 && t->count == 5, "I64 tensor listed");
    x = NULL;
    rc = mha_st_floats(&f, "steps", -1, NULL, &x, &err);
    CHECK(ec_refused(rc, &err, MHA_ERR_SHAPE, "mha_st_floats", "name",
                     "tensor 'steps': expected F32, F16, BF16 or F64 of any shape (the dtypes read), found I64 [5]") &&
          x == NULL, "I64 refused: %s", err.message);
    {
        int64_t raw[5];
        rc = mha_st_read_f32(t, (float *)raw, 5, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_SHAPE, "mha_st_read_f32", "t", "found I64 [5]"), "I64 read refused: %s",
              err.message);
    }
    CHECK(mha_st_find(&f, "n\xc3\xa9" "e \"quoted\"") != NULL, "a name with \\u00e9 and \\\" escapes decodes");
    CHECK(mha_st_find(&f, "nope") == NULL && mha_st_find(&f, "") == NULL, "absent names are NULL");
    rc = mha_st_floats(&f, "nope", -1, NULL, &x, &err);
    CHECK(ec_refused(rc, &err, MHA_ERR_NOT_FOUND, "mha_st_floats", "name", "tensor 'nope' is missing"), "missing: %s",
          err.message);
    CHECK(mha_st_metadata(&f, "note") && strcmp(mha_st_metadata(&f, "note"), "tab\there") == 0, "metadata escape");
    {
        size_t sh[2] = {3, 5};
        rc = mha_st_floats(&f, "half", 2, sh, &x, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_SHAPE, "mha_st_floats", "name",
                         "tensor 'half': expected F32, F16, BF16 or F64 [3, 5], found F16 [3, 4]"), "shape check: %s",
              err.message);
        rc = mha_st_floats(&f, "half", 2, NULL, &x, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_NULL_POINTER, "mha_st_floats", "shape", "is NULL"), "NULL shape: %s",
              err.message);
        rc = mha_st_floats(&f, "half", 9, sh, &x, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_INVALID_ARGUMENT, "mha_st_floats", "ndim", "is 9"), "ndim 9: %s",
              err.message);
    }
    CHECK(strcmp(mha_st_dtype_name(MHA_ST_BF16), "BF16") == 0 && strcmp(mha_st_dtype_name(MHA_ST_DTYPE_COUNT), "?") == 0,
          "dtype names");
    mha_st_close(&f);
}

/* Each broken file, the field refused and the words its message must contain. */
static void test_bad_files(void)
{
    static const char *const cases[][3] = {
        {"bad_short", "header length", "truncated: 4 bytes"},
        {"bad_header_past_end", "header length", "header length 1000 runs past the end of the file"},
        {"bad_header_huge", "header length", "is larger than the 100000000 allowed"},
        {"bad_not_json", "header", "does not start with '{'"},
        {"bad_json_unclosed", "header", "JSON syntax error in the header at byte 53: expected ',' or '}'"},
        {"bad_json_trailing_comma", "header", "JSON syntax error in the header at byte 54: expected a string"},
        {"bad_json_escape", "header", "unknown escape in a string"},
        {"bad_json_control", "header", "control character inside a string"},
        {"bad_json_after", "header", "bytes after the closing '}'"},
        {"bad_json_leading_zero", "header", "number with a leading zero"},
        {"bad_utf8", "header", "not valid UTF-8 (byte 3)"},
        {"bad_negative_dim", "shape", "tensor 'a': shape holds a negative number"},
        {"bad_float_dim", "shape", "tensor 'a': shape holds a number that is not an integer"},
        {"bad_too_many_dims", "shape", "tensor 'a': shape has more than 8 entries"},
        {"bad_dtype", "dtype", "tensor 'a': unknown dtype 'F33'"},
        {"bad_missing_field", "shape", "tensor 'a': missing shape"},
        {"bad_unknown_field", "header", "tensor 'a': unknown field 'x'"},
        {"bad_offsets_three", "data_offsets", "data_offsets has more than 2 entries"},
        {"bad_offsets_reversed", "data_offsets", "data_offsets [8, 0] end before they begin"},
        {"bad_offsets_past_end", "data_offsets", "data_offsets [0, 8] run past the data section (4 bytes)"},
        {"bad_offsets_size", "data_offsets", "data_offsets span 8 bytes, but F32 x 3 values need 12"},
        {"bad_overlap", "data_offsets", "tensor 'b' overlaps tensor 'a'"},
        {"bad_hole", "data_offsets", "a hole of 4 bytes before tensor 'a'"},
        {"bad_trailing_data", "data_offsets", "4 bytes after the last tensor's data"},
        {"bad_duplicate", "header", "duplicate name 'a'"},
        {"bad_metadata_value", "__metadata__", "__metadata__ value of 'n' is not a string"},
        {"bad_shape_overflow", "shape", "tensor 'a': the shape's"},
    };
    size_t c, n = 0;
    for (c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        char path[256];
        mha_error err, err2;
        mha_st_file f, before;
        unsigned char *buf;
        mha_status rc;
        snprintf(path, sizeof path, DATA "%s.safetensors", cases[c][0]);
        memset(&f, 0xA5, sizeof f);   /* not a file: a refusal must not write it */
        before = f;
        rc = mha_st_open(path, &f, &err);
        CHECK(ec_refused(rc, &err, MHA_ERR_FORMAT, "mha_st_open", cases[c][1], cases[c][2]),
              "%s: got %d \"%s\", want MHA_ERR_FORMAT, field %s, \"%s\"", cases[c][0], (int)rc, err.message,
              cases[c][1], cases[c][2]);
        CHECK(memcmp(&f, &before, sizeof f) == 0, "%s: the file struct is untouched on error", cases[c][0]);
        rc = mha_st_open_read(path, &f, &err2);
        CHECK(ec_refused(rc, &err2, MHA_ERR_FORMAT, "mha_st_open_read", cases[c][1], cases[c][2]) &&
              strcmp(strchr(err.message, ':'), strchr(err2.message, ':')) == 0,
              "%s: open and open_read give the same refusal: \"%s\"", cases[c][0], err2.message);
        buf = slurp(path, &n);
        rc = buf ? mha_st_open_mem(buf, n, &f, &err2) : MHA_ERR_IO;
        CHECK(ec_refused(rc, &err2, MHA_ERR_FORMAT, "mha_st_open_mem", cases[c][1], cases[c][2]) &&
              strcmp(strchr(err.message, ':'), strchr(err2.message, ':')) == 0,
              "%s: memory and file give the same refusal: \"%s\"", cases[c][0], err2.message);
        CHECK(memcmp(&f, &before, sizeof f) == 0, "%s: untouched by open_read and open_mem", cases[c][0]);
        free(buf);
    }
    {
        mha_st_file f;
        mha_error err;
        memset(&f, 0, sizeof f);
        CHECK(ec_refused(mha_st_open_mem(NULL, 0, &f, &err), &err, MHA_ERR_NULL_POINTER, "mha_st_open_mem", "buf",
                         "is NULL"), "NULL buffer: %s", err.message);
        CHECK(ec_refused(mha_st_open(DATA "encoder.safetensors", NULL, &err), &err, MHA_ERR_NULL_POINTER,
                         "mha_st_open", "f", "is NULL"), "NULL file: %s", err.message);
        CHECK(ec_refused(mha_st_open_read(NULL, &f, &err), &err, MHA_ERR_NULL_POINTER, "mha_st_open_read", "path",
                         "is NULL"), "NULL path: %s", err.message);
        CHECK(mha_st_open_mem("", 0, &f, NULL) == MHA_ERR_FORMAT, "err may be NULL");
    }
}

/* The system's refusals: the path and the operating system's reason, for
   both file openers. */
static void test_io(void)
{
    static const char *const fns[2] = {"mha_st_open", "mha_st_open_read"};
    int k;
    for (k = 0; k < 2; ++k) {
        mha_st_file f;
        mha_error err;
        mha_status rc;
        char want[256];
        memset(&f, 0, sizeof f);
        /* a file that is not there */
        rc = k ? mha_st_open_read(DATA "no_such_file.safetensors", &f, &err)
               : mha_st_open(DATA "no_such_file.safetensors", &f, &err);
        snprintf(want, sizeof want, "cannot open '" DATA "no_such_file.safetensors': %s", strerror(ENOENT));
        CHECK(ec_refused(rc, &err, MHA_ERR_IO, fns[k], "path", want), "%s, missing file: \"%s\", want \"%s\"", fns[k],
              err.message, want);
        CHECK(f.count == 0 && f.tensors == NULL, "%s: nothing opened", fns[k]);
        /* a directory opens on some systems; reading it says what it is */
        rc = k ? mha_st_open_read("tests/data", &f, &err) : mha_st_open("tests/data", &f, &err);
        snprintf(want, sizeof want, "'tests/data': %s", strerror(EISDIR));
        CHECK(ec_refused(rc, &err, MHA_ERR_IO, fns[k], "path", want), "%s, a directory: \"%s\", want \"%s\"", fns[k],
              err.message, want);
    }
#if defined(__unix__) || defined(__APPLE__)
    {   /* a file without read permission (root reads it anyway: then skipped) */
        const char *path = TMP "unreadable.safetensors";
        if (tu_unreadable_file(path, "test_safetensors")) {
            mha_st_file f;
            mha_error err;
            char want[256];
            memset(&f, 0, sizeof f);
            snprintf(want, sizeof want, "cannot open '%s': %s", path, strerror(EACCES));
            CHECK(ec_refused(mha_st_open(path, &f, &err), &err, MHA_ERR_IO, "mha_st_open", "path", want),
                  "unreadable: \"%s\", want \"%s\"", err.message, want);
            CHECK(ec_refused(mha_st_open_read(path, &f, &err), &err, MHA_ERR_IO, "mha_st_open_read", "path", want),
                  "unreadable (read): \"%s\"", err.message);
        }
        remove(path);
    }
#endif
    {   /* a long path keeps its end (the file name) and the reason */
        char path[400];
        mha_st_file f;
        mha_error err;
        size_t i;
        memset(path, 'd', sizeof path);
        memcpy(path, "build/", 6);
        for (i = 100; i < sizeof path - 20; i += 100) path[i] = '/';   /* each name < NAME_MAX */
        strcpy(path + sizeof path - 21, "/missing.safetensors");
        CHECK(ec_refused(mha_st_open(path, &f, &err), &err, MHA_ERR_IO, "mha_st_open", "path", "missing.safetenso") &&
              strstr(err.message, "...") && strstr(err.message, strerror(ENOENT)) &&
              strlen(err.message) < sizeof err.message - 1, "long path: \"%s\"", err.message);
    }
}

/* Files that load but whose tensors do not make a layer: the rule and both shapes. */
static void test_bad_modules(void)
{
    static const struct { const char *file; mha_status status; const char *field, *says[3]; } cases[] = {
        {"bad_module_shape", MHA_ERR_SHAPE, "out_proj.bias",
         {"tensor 'layers.0.self_attn.out_proj.bias': expected F32, F16, BF16 or F64 [16]",
          "(out_proj.bias is [E], E = 16 from out_proj.weight)", "found F32 [17]"}},
        {"bad_module_missing", MHA_ERR_NOT_FOUND, "linear2.weight",
         {"tensor 'layers.0.linear2.weight' is missing", "", ""}},
        {"bad_module_dtype", MHA_ERR_SHAPE, "norm1.weight",
         {"tensor 'layers.0.norm1.weight': expected F32, F16, BF16 or F64 [16]",
          "(norm1.weight is [E], E = 16 from self_attn.out_proj.weight, F = 24 from linear1.weight)",
          "found I64 [16]"}},
    };
    size_t c;
    for (c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        char path[256];
        mha_error err;
        mha_st_file f;
        mha_encoder_layer layer, before;
        mha_status rc;
        snprintf(path, sizeof path, DATA "%s.safetensors", cases[c].file);
        rc = mha_st_open(path, &f, &err);
        CHECK(rc == MHA_OK, "%s opens: %s", cases[c].file, err.message);
        if (rc) continue;
        memset(&layer, 0, sizeof layer);
        layer.activation = MHA_ACT_GELU;
        before = layer;
        rc = mha_st_encoder_layer(&f, "layers.0.", 4, &layer, &err);
        CHECK(ec_refused(rc, &err, cases[c].status, "mha_st_encoder_layer", cases[c].field, cases[c].says[0]) &&
              strstr(err.message, cases[c].says[1]) && strstr(err.message, cases[c].says[2]),
              "%s: got %d \"%s\"", cases[c].file, (int)rc, err.message);
        CHECK(memcmp(&layer, &before, sizeof layer) == 0, "%s: layer untouched", cases[c].file);
        mha_st_close(&f);
    }
}

/* Every prefix of a good file is refused, never read past (ASan config). */
static void test_truncations(void)
{
    size_t n = 0, len;
    unsigned char *buf = slurp(DATA "dtypes.safetensors", &n);
    int refused_n = 0;
    if (!buf) { CHECK(0, "dtypes.safetensors readable"); return; }
    for (len = 0; len < n; ++len) {
        mha_st_file f;
        unsigned char *cut = (unsigned char *)malloc(len ? len : 1);
        memcpy(cut, buf, len);
        refused_n += mha_st_open_mem(cut, len, &f, NULL) == MHA_ERR_FORMAT;
        free(cut);
    }
    CHECK(refused_n == (int)n, "all %d truncations refused as MHA_ERR_FORMAT (%d)", (int)n, refused_n);
    free(buf);
}

int main(void)
{
    int how;
    for (how = 0; how < 3; ++how) test_encoder(how);
    test_mha_kv();
    test_dtypes();
    test_bad_files();
    test_io();
    test_bad_modules();
    test_truncations();
    return tu_finish("test_safetensors");
}
