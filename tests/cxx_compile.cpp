// The header compiled as C++ (C++11, -Wall -Wextra -Wpedantic -Werror) and used:
// a one-shot forward, the same through a packed plan in caller memory, and a
// refusal read back through mha_error.
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <cstdio>
#include <cstring>
#include <vector>

int main()
{
    const int E = 6, H = 3, L = 5;
    std::vector<float> w_in(3 * E * E), w_out(E * E), x(L * E), out(L * E), w(L * L);
    for (size_t i = 0; i < w_in.size(); ++i) w_in[i] = 0.05f * float(int(i % 11) - 5);
    for (size_t i = 0; i < w_out.size(); ++i) w_out[i] = (i % (E + 1) == 0) ? 1.0f : 0.0f;
    for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * float(i % 7);
    mha_module m = {};
    m.embed_dim = E;
    m.num_heads = H;
    m.in_proj_weight = w_in.data();
    m.out_proj_weight = w_out.data();
    mha_options opt = {};
    opt.causal = 1;
    mha_run run = {};
    run.weights = w.data();
    mha_error err;
    mha_status s = mha_module_forward(&m, 1, L, L, x.data(), x.data(), x.data(), &opt, out.data(), &run, &err);
    int pass = 0, fail = 0;
    (s == MHA_OK ? pass : fail)++;
    (w[0] == 1.0f && w[1] == 0.0f ? pass : fail)++;   // causal: first query sees only key 0
    // the same through a plan (caller memory for the plan, a workspace per run)
    mha_sizes sz = {};
    s = mha_module_plan_size(&m, 1, L, L, &opt, MHA_PLAN_PACK | MHA_PLAN_WEIGHTS, &sz, &err);
    (s == MHA_OK ? pass : fail)++;
    std::vector<double> mem(sz.plan / sizeof(double) + 1);
    mha_plan *p = nullptr;
    std::vector<float> out2(L * E), w2(L * L);
    s = mha_module_plan(&m, 1, L, L, &opt, MHA_PLAN_PACK | MHA_PLAN_WEIGHTS, mem.data(), sz.plan, &p, &err);
    std::vector<char> ws(sz.workspace);
    mha_run r2 = {};
    r2.workspace = ws.data();
    r2.workspace_bytes = ws.size();
    r2.weights = w2.data();
    if (s == MHA_OK) s = mha_module_run_forward(p, L, L, x.data(), x.data(), x.data(), out2.data(), &r2, &err);
    (s == MHA_OK && out2 == out && w2 == w ? pass : fail)++;   // bit for bit
    mha_plan_destroy(p);
    // a refusal names the function and the field
    m.num_heads = 4;
    s = mha_module_forward(&m, 1, L, L, x.data(), x.data(), x.data(), &opt, out.data(), nullptr, &err);
    (s == MHA_ERR_HEADS_DIVIDE && err.status == s && std::strcmp(err.function, "mha_module_forward") == 0 &&
     std::strcmp(err.field, "m->num_heads") == 0 && std::strncmp(err.message, "mha_module_forward: m->num_heads: ", 34) == 0
         ? pass : fail)++;
    std::printf("cxx: %d passed, %d failed\n", pass, fail);
    return fail != 0;
}
