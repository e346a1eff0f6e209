/* Link test, second translation unit: only the declarations (with MHA_STATIC
   every unit carries its own private implementation). */
#ifdef MHA_STATIC
#define MHA_IMPLEMENTATION
#endif
#include "mha.h"

int link_b_forward(float *out)
{
    static const float w_in[3 * 2 * 2] = {1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1};
    static const float w_out[4] = {1, 0, 0, 1};
    static const float x[2] = {0.5f, -0.25f};
    mha_module m = {0};
    m.embed_dim = 2;
    m.num_heads = 1;
    m.in_proj_weight = w_in;
    m.out_proj_weight = w_out;
    /* one token attending to itself returns its own value: out = x */
    if (mha_module_forward(&m, 1, 1, 1, x, x, x, NULL, out, NULL, NULL) != MHA_OK) return -1;
    return (out[0] == x[0] && out[1] == x[1]) ? MHA_OK : -2;
}
