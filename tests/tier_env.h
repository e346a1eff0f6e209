/* Forced before mha.h (gcc -include) by the dispatch configuration of
   tests/run_all.sh, with -DMHA__FORCE_TIER=mha_test_tier(): the kernel tier
   (mha.h, "the kernel tiers") is capped at $MHA_TEST_TIER (0 scalar, 1 AVX2,
   2 AVX-512), so one build runs every test once per tier.  Unset: no cap. */
#ifndef MHA_TEST_TIER_ENV_H
#define MHA_TEST_TIER_ENV_H
/* no system header here: a test may set feature macros before its own */
char *getenv(const char *name);
#if defined(__GNUC__) || defined(__clang__)
__attribute__((unused))
#endif
static int mha_test_tier(void)
{
    const char *t = getenv("MHA_TEST_TIER");
    return t && *t >= '0' && *t <= '9' ? *t - '0' : 2;
}
#endif
