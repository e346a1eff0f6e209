/* Memory of the fused path: the workspace sizes of plans (mha_*_plan_size)
   only (nothing this large is run here; bench/bench_mha.c measures the
   peak RSS of real runs).
   Without weights the forward workspace must grow like B*L*E, never L^2:
   the projected K and V, one chunk of Q, one head's packed K and V and
   per-thread tiles. */
#include <string.h>
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

/* the workspace of a module plan (causal, 2 threads) for a forward with or
   without the attention weights */
static size_t fwd_ws(int B, int L, int E, int H, int need_weights)
{
    static float dummy[1];
    mha_module m;
    mha_options opt;
    mha_sizes sz;
    mha_error err;
    mha_status st;
    memset(&m, 0, sizeof m);
    memset(&opt, 0, sizeof opt);
    m.embed_dim = E; m.num_heads = H; m.in_proj_weight = dummy; m.out_proj_weight = dummy;
    opt.causal = 1;
    opt.num_threads = 2;
    st = mha_module_plan_size(&m, B, L, L, &opt, need_weights ? MHA_PLAN_WEIGHTS : 0u, &sz, &err);
    CHECK(st == MHA_OK, "workspace size B%d L%d E%d H%d: %s", B, L, E, H, err.message);
    return st == MHA_OK ? sz.workspace : 0;
}

/* the workspace of an SDPA plan (2 threads) */
static size_t sdpa_ws(int B, int H, int Lq, int Lk, int D, int Dv, unsigned flags)
{
    mha_options opt;
    mha_sizes sz;
    mha_error err;
    mha_status st;
    memset(&opt, 0, sizeof opt);
    opt.num_threads = 2;
    st = mha_sdpa_plan_size(B, H, Lq, Lk, D, Dv, &opt, flags, &sz, &err);
    CHECK(st == MHA_OK, "sdpa size B%d H%d Lq%d Lk%d: %s", B, H, Lq, Lk, err.message);
    return st == MHA_OK ? sz.workspace : 0;
}

int main(void)
{
    /* L = 16384, E = 512, H = 8, one batch: K and V would be 2 * 32 MiB;
       going head by head the whole workspace stays under one [B, L, E] */
    {
        size_t ble = (size_t)16384 * 512 * sizeof(float);
        size_t fused = fwd_ws(1, 16384, 512, 8, 0), unfused = fwd_ws(1, 16384, 512, 8, 1);
        printf("L=16384 E=512 H=8: fused workspace %.1f MiB (%.2f x B*L*E floats), unfused %.1f MiB\n",
               fused / 1048576.0, (double)fused / ble, unfused / 1048576.0);
        CHECK(fused <= ble, "fused workspace %zu bytes > B*L*E floats (%zu)", fused, ble);
        CHECK(fused < unfused, "fused %zu not below unfused %zu", fused, unfused);
    }
    /* the fused workspace is alpha L + beta (up to a key tile of rounding),
       alpha at most: K and V rows of E floats and per thread one head's
       packed K and V (D + Dv rounded up, under 3 D floats) */
    {
        size_t a = fwd_ws(1, 8192, 512, 8, 0), b = fwd_ws(1, 16384, 512, 8, 0);
        size_t c = fwd_ws(1, 32768, 512, 8, 0), slack = 4 * 256 * 64 * sizeof(float);
        size_t per_key = (2 * 512 + 2 * 3 * 64) * sizeof(float);
        CHECK(c - b + slack >= 2 * (b - a) && c - b <= 2 * (b - a) + slack && b - a <= 8192 * per_key,
              "fused workspace not linear in L: %zu %zu %zu", a, b, c);
    }
    /* L = 65536 with one head of 64: the scores alone would be 16 GiB; the
       workspace is Q, K, V and the packed K and V (the forward goes head
       by head, see MHA__BY_HEAD_FLOATS, and with one head that is all) */
    {
        size_t ble = (size_t)65536 * 64 * sizeof(float);
        size_t fused = fwd_ws(1, 65536, 64, 1, 0);
        printf("L=65536 E=64 H=1: fused workspace %.1f MiB (%.2f x B*L*E floats)\n",
               fused / 1048576.0, (double)fused / ble);
        CHECK(fused <= 11 * ble / 2, "L=65536 H=1 fused workspace %zu > 5.5 x B*L*E floats (%zu)", fused, ble);
    }
    /* batches: the Q chunk stops growing (here at 16 batches of 256 rows),
       K and V do not */
    {
        size_t b16 = fwd_ws(16, 256, 512, 8, 0), b20 = fwd_ws(20, 256, 512, 8, 0);
        size_t kv = (size_t)2 * 256 * 512 * sizeof(float);
        CHECK(b20 - b16 <= 4 * kv + 4096, "B=20 adds %zu bytes to B=16, more than 4 K/V pairs (%zu)",
              b20 - b16, 4 * kv);
    }
    /* SDPA without weights: per thread the tiles and one head's packed K and
       V: linear in L (16x the keys: at most 16x the bytes), below 3 rows of
       D floats per key and thread */
    {
        size_t s1 = sdpa_ws(1, 8, 16384, 16384, 64, 64, 0), s2 = sdpa_ws(1, 8, 1024, 1024, 64, 64, 0);
        CHECK(s1 <= 16 * s2 && s1 < (size_t)2 * 3 * 16384 * 64 * sizeof(float),
              "sdpa fused workspace %zu (L=16384) vs %zu (L=1024)", s1, s2);
    }
    /* SDPA with the weights: score rows of Lk per thread, which outgrow the
       fused tiles and grow with Lk (4x the keys: more, at most 4x the
       bytes), never with Lq (rows are taken a block at a time) */
    {
        size_t f = sdpa_ws(1, 8, 1024, 16384, 64, 64, 0);
        size_t w4 = sdpa_ws(1, 8, 1024, 4096, 64, 64, MHA_PLAN_WEIGHTS);
        size_t w16 = sdpa_ws(1, 8, 1024, 16384, 64, 64, MHA_PLAN_WEIGHTS);
        size_t wq = sdpa_ws(1, 8, 16384, 16384, 64, 64, MHA_PLAN_WEIGHTS);
        CHECK(w16 > f && w16 > w4 && w16 <= 4 * w4, "sdpa weights workspace %zu (Lk 4096) -> %zu (Lk 16384), "
              "fused %zu", w4, w16, f);
        /* 16x the queries add at most their lse (B*H*Lq floats, for chosen rows) */
        CHECK(wq <= w16 + (size_t)8 * 16384 * sizeof(float) + 64,
              "sdpa weights workspace grows with Lq: %zu (Lq 1024) -> %zu (Lq 16384)", w16, wq);
    }
    return tu_finish("memory");
}
