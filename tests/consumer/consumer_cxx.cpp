// consumer_cxx.cpp - the installed headers compiled as C++ (implementations included).
#define MHA_IMPLEMENTATION
#include <mha.h>
#define MHA_ST_IMPLEMENTATION
#include <mha/safetensors.h>
#define MHA_NPY_IMPLEMENTATION
#include <mha/npy.h>
#define MHA_INSPECT_IMPLEMENTATION
#include <mha/attn_inspect.h>
#include <cstdio>
#include <cstring>

int main()
{
#define OK(c) ((c) ? ++pass : ++fail)
    int pass = 0, fail = 0;
    mha_st_file f;
    mha_error e;
    mha_sizes sz;
    OK(mha_st_open_mem("\0\0\0\0\0\0\0\0", 8, &f, &e) == MHA_ERR_FORMAT &&
       std::strcmp(e.function, "mha_st_open_mem") == 0);
    OK(mha_status_string(MHA_OK) != nullptr);
    OK(mha_gemm_plan_size(MHA_NO_TRANS, MHA_NO_TRANS, 0, 1, 1, 0, &sz, &e) == MHA_ERR_INVALID_SIZE &&
       std::strcmp(e.field, "M") == 0);
    std::printf("consumer (C++): %d passed, %d failed\n", pass, fail);
    return fail != 0;
}
