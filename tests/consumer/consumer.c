/* consumer.c - a program built against an installed mha.h (pkg-config or
   CMake): the include paths a user writes, one forward pass, a refusal
   read back through mha_error, and the 2-layer encoder of
   tests/data/safetensors read through the installed companion.
     consumer [encoder.safetensors]      (or the path in $MHA_MODEL)          */
#define MHA_IMPLEMENTATION
#include <mha.h>
#define MHA_ST_IMPLEMENTATION
#include <mha/safetensors.h>
#define MHA_NPY_IMPLEMENTATION
#include <mha/npy.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
#define OK(c) ((c) ? ++pass : ++fail)
    int pass = 0, fail = 0, l;
    float w[3 * 4 * 4], wo[4 * 4], x[2 * 4], out[2 * 4];
    mha_module m = {0};
    mha_npy a;
    mha_error e;
    const char *model = argc > 1 ? argv[1] : getenv("MHA_MODEL");
    for (l = 0; l < 48; ++l) w[l] = (float)(l % 7) * 0.1f - 0.3f;
    for (l = 0; l < 16; ++l) wo[l] = l % 5 == 0 ? 1.0f : 0.0f;
    for (l = 0; l < 8; ++l) x[l] = (float)l * 0.25f;
    m.embed_dim = 4; m.num_heads = 2; m.in_proj_weight = w; m.out_proj_weight = wo;
    OK(mha_module_forward(&m, 1, 2, 2, x, x, x, NULL, out, NULL, &e) == MHA_OK);
    OK(mha_module_forward(&m, 1, 2, 2, x, NULL, x, NULL, out, NULL, &e) == MHA_ERR_NULL_POINTER &&
       strcmp(e.function, "mha_module_forward") == 0 && strcmp(e.field, "key") == 0);
    /* the companion headers refuse the same way */
    OK(mha_npy_load_mem((const unsigned char *)"x", 1, &a, &e) == MHA_ERR_FORMAT && e.field != NULL);
    if (model) {
        mha_st_file f;
        mha_encoder_layer layer[2];
        float h[160], y[160];
        const float *in = NULL, *ref = NULL;
        double num = 0, den = 0;
        int i;
        memset(layer, 0, sizeof layer);
        if (mha_st_open(model, &f, &e) != MHA_OK) { printf("FAIL %s\n", e.message); return 1; }
        for (l = 0; l < 2; ++l) {
            char prefix[32];
            snprintf(prefix, sizeof prefix, "layers.%d.", l);
            OK(mha_st_encoder_layer(&f, prefix, 4, &layer[l], &e) == MHA_OK);
        }
        OK(mha_st_floats(&f, "test.x", -1, NULL, &in, &e) == MHA_OK);
        OK(mha_st_floats(&f, "test.y", -1, NULL, &ref, &e) == MHA_OK);
        if (in && ref && mha_encoder_forward(&layer[0], 2, 5, in, NULL, h, NULL, &e) == MHA_OK &&
            mha_encoder_forward(&layer[1], 2, 5, h, NULL, y, NULL, &e) == MHA_OK) {
            for (i = 0; i < 160; ++i) { num += (y[i] - ref[i]) * (double)(y[i] - ref[i]); den += (double)ref[i] * ref[i]; }
            OK(sqrt(num / den) <= 1e-5);
        } else ++fail;
        mha_st_close(&f);
    }
    printf("consumer (%s): %d passed, %d failed\n", MHA_ST_MAX_DIMS == 8 ? "C" : "?", pass, fail);
    return fail != 0;
}
