/* Link test, first translation unit: holds the implementation (or, with
   MHA_STATIC, its own private copy) and main(). */
#define MHA_IMPLEMENTATION
#include "mha.h"
#include <stdio.h>

int link_b_forward(float *out);   /* in link_b.c */

int main(void)
{
    float out[4] = {0};
    int ok_b = link_b_forward(out) == MHA_OK;
    int ok_a = mha_status_string(MHA_OK)[0] != '\0';
    int pass = ok_a + ok_b, fail = 2 - pass;
    printf("link: %d passed, %d failed\n", pass, fail);
    return fail != 0;
}
