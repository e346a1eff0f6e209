/* Smoke test: the smallest forward pass has a known answer. */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

int main(void)
{
    static const float w_in[3 * 2 * 2] = {1, 0, 0, 1, 1, 0, 0, 1, 2, 0, 0, 3};
    static const float w_out[4] = {1, 0, 0, 1};
    static const float x[2] = {0.5f, -0.25f};
    float out[2] = {0, 0};
    mha_module m = {0};
    mha_error err;
    mha_status st;
    m.embed_dim = 2; m.num_heads = 2;
    m.in_proj_weight = w_in; m.out_proj_weight = w_out;
    st = mha_module_forward(&m, 1, 1, 1, x, x, x, NULL, out, NULL, &err);
    CHECK(st == MHA_OK, "mha_module_forward: %s", err.message);
    /* one key: softmax is 1, context = V = (2*0.5, 3*-0.25) */
    CHECK(out[0] == 1.0f && out[1] == -0.75f, "out = %g %g", out[0], out[1]);
    return tu_finish("smoke");
}
