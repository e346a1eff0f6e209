/* The long-sequence forward, one head at a time (MHA__BY_HEAD_FLOATS in
   mha.h), on the module cases of test_fused.c: with the threshold at 1 every
   forward without weights goes that way, and is compared with the unfused
   path and the float64 reference as there. */
#define MHA__BY_HEAD_FLOATS 1
#define TEST_NAME "by_head"
#define MODULE_ONLY
#include "test_fused.c"
