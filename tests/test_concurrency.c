/* test_concurrency.c - one plan, every per-run output, four threads at once
   (issue 18, item 2: "one plan with every output requested, run from 4
   threads at once with their own outputs, ThreadSanitizer clean and
   bit-identical to serial runs").

   A module plan (packed weights, bias_k/bias_v) and an SDPA plan, each
   made once with MHA_PLAN_WEIGHTS | MHA_PLAN_TRAINING, sinks, a causal
   mask and opt.num_threads = 1 (no OpenMP team inside a run, so the only
   threads are the four pthreads here).  Each pthread has its own inputs,
   its own mha_run (workspace, saved forward) and its own outputs, and runs
   forward then backward REPS times, all four released together:
     forward   out, the attention weights (threads 0 and 2: of chosen rows,
               1 and 3: all of them), lse, entropy, max_weight,
               first_weight, and the saved forward
     backward  from that saved forward: dq (dquery), dk, dv, the module's
               weight gradients, and sinks_grad
   Every output must equal, bit for bit, the same thread's work run
   serially beforehand.  Inputs differ by thread, so that two threads
   writing one buffer cannot produce matching results by accident.
   tests/run_all.sh also builds this file with -fsanitize=thread (config
   tsan), where any data race inside mha.h is a report, and fails. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#define MHA_IMPLEMENTATION
#include "mha.h"
#include "testutil.h"

enum { NT = 4, REPS = 3 };
enum { B = 2, LQ = 7, LK = 13, E = 12, H = 3, D = E / H, NROWS = 3 };
static const int rows[NROWS] = {0, 3, LQ - 1};

static float *falloc(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }
static float *frand(tu_rng *r, size_t n, float a)
{
    float *p = falloc(n);
    tu_fill(r, p, n, a);
    return p;
}

/* Everything one thread reads and writes. */
typedef struct work {
    int sdpa, id;                      /* which plan; the thread's number */
    const mha_plan *p;
    float *q, *k, *v, *dout;           /* inputs (module: query [B,LQ,E], key/value [B,LK,E]) */
    float *out, *w, *lse, *ent, *maxw, *first, *sg;
    float *dq, *dk, *dv, *g[6];        /* g: the module's weight gradients */
    size_t nq, nk, nw, nr, ng[6];
    void *ws, *saved;
    size_t ws_bytes, saved_bytes;
    mha_status st;
    char msg[sizeof(((mha_error *)0)->message)];
} work;

static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;

static void gate_wait(void)
{
    pthread_mutex_lock(&gate_mu);
    while (!gate_open) pthread_cond_wait(&gate_cv, &gate_mu);
    pthread_mutex_unlock(&gate_mu);
}

/* forward (every output) then backward from the saved forward, REPS times */
static void do_work(work *t)
{
    mha_run r;
    mha_error e;
    int rep, i;
    for (rep = 0; rep < REPS; ++rep) {
        memset(&r, 0, sizeof r);
        r.workspace = t->ws; r.workspace_bytes = t->ws_bytes;
        r.saved = t->saved; r.saved_bytes = t->saved_bytes;
        r.weights = t->w;
        if (t->id % 2 == 0) { r.rows = rows; r.n_rows = NROWS; }
        r.lse = t->lse; r.entropy = t->ent; r.max_weight = t->maxw; r.first_weight = t->first;
        t->st = t->sdpa ? mha_sdpa_run_forward(t->p, LQ, LK, t->q, t->k, t->v, t->out, &r, &e)
                        : mha_module_run_forward(t->p, LQ, LK, t->q, t->k, t->v, t->out, &r, &e);
        if (t->st != MHA_OK) break;
        /* the backward adds: start each repetition from zero */
        memset(t->dq, 0, t->nq * sizeof(float));
        memset(t->dk, 0, t->nk * sizeof(float));
        memset(t->dv, 0, t->nk * sizeof(float));
        memset(t->sg, 0, H * sizeof(float));
        for (i = 0; i < 6; ++i) if (t->g[i]) memset(t->g[i], 0, t->ng[i] * sizeof(float));
        memset(&r, 0, sizeof r);
        r.workspace = t->ws; r.workspace_bytes = t->ws_bytes;
        r.saved = t->saved; r.saved_bytes = t->saved_bytes;
        r.sinks_grad = t->sg;
        if (t->sdpa) {
            t->st = mha_sdpa_run_backward(t->p, LQ, LK, t->q, t->k, t->v, t->dout, t->dq, t->dk, t->dv, &r, &e);
        } else {
            mha_module_grad g;
            memset(&g, 0, sizeof g);
            g.in_proj_weight = t->g[0]; g.in_proj_bias = t->g[1]; g.out_proj_weight = t->g[2];
            g.out_proj_bias = t->g[3]; g.bias_k = t->g[4]; g.bias_v = t->g[5];
            t->st = mha_module_run_backward(t->p, LQ, LK, t->q, t->k, t->v, t->dout, t->dq, t->dk, t->dv, &g, &r,
                                            &e);
        }
        if (t->st != MHA_OK) break;
    }
    if (t->st != MHA_OK) memcpy(t->msg, e.message, sizeof t->msg);
}

static void *thread_main(void *arg)
{
    gate_wait();
    do_work((work *)arg);
    return NULL;
}

static void make_work(work *t, int sdpa, int id, const mha_plan *p, unsigned seed)
{
    tu_rng r;
    mha_sizes sz = {0, 0, 0};
    int i;
    memset(t, 0, sizeof *t);
    r.s = 0x2545F4914F6CDD1DULL * (seed + 1);
    t->sdpa = sdpa; t->id = id; t->p = p;
    t->nq = sdpa ? (size_t)B * H * LQ * D : (size_t)B * LQ * E;
    t->nk = sdpa ? (size_t)B * H * LK * D : (size_t)B * LK * E;
    /* SDPA weights per head [B,H,n,LK]; the module's head average [B,n,LK+1] (bias_k appends a key) */
    t->nw = sdpa ? (size_t)B * H * LQ * LK : (size_t)B * LQ * (LK + 1);
    t->nr = (size_t)B * H * LQ;
    t->q = frand(&r, t->nq, 1.0f); t->k = frand(&r, t->nk, 1.0f); t->v = frand(&r, t->nk, 1.0f);
    t->dout = frand(&r, t->nq, 1.0f);
    t->out = falloc(t->nq); t->w = falloc(t->nw);
    t->lse = falloc(t->nr); t->ent = falloc(t->nr); t->maxw = falloc(t->nr); t->first = falloc(t->nr);
    t->sg = falloc(H);
    t->dq = falloc(t->nq); t->dk = falloc(t->nk); t->dv = falloc(t->nk);
    if (!sdpa) {
        t->ng[0] = 3 * E * E; t->ng[1] = 3 * E; t->ng[2] = E * E; t->ng[3] = E; t->ng[4] = E; t->ng[5] = E;
        for (i = 0; i < 6; ++i) t->g[i] = falloc(t->ng[i]);
    }
    CHECK(mha_plan_sizes(p, &sz, NULL) == MHA_OK && sz.saved > 0, "plan sizes");
    t->ws_bytes = sz.workspace; t->saved_bytes = sz.saved;
    t->ws = malloc(sz.workspace); t->saved = malloc(sz.saved);
}

static void free_work(work *t)
{
    int i;
    free(t->q); free(t->k); free(t->v); free(t->dout); free(t->out); free(t->w);
    free(t->lse); free(t->ent); free(t->maxw); free(t->first); free(t->sg);
    free(t->dq); free(t->dk); free(t->dv);
    for (i = 0; i < 6; ++i) free(t->g[i]);
    free(t->ws); free(t->saved);
}

static int same(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

/* Thread t's outputs equal the serial run s's, bit for bit, and are real results. */
static void compare(const work *t, const work *s, const char *what)
{
    size_t nw = t->id % 2 == 0 ? t->nw / LQ * NROWS : t->nw;
    int i, grads = 1, any = 0;
    size_t j;
    CHECK(t->st == MHA_OK, "%s thread %d: %s", what, t->id, t->msg);
    CHECK(s->st == MHA_OK, "%s serial %d: %s", what, s->id, s->msg);
    CHECK(same(t->out, s->out, t->nq), "%s thread %d: out differs from the serial run", what, t->id);
    CHECK(same(t->w, s->w, nw), "%s thread %d: weights (%s) differ", what, t->id, t->id % 2 ? "all rows" : "chosen rows");
    CHECK(same(t->lse, s->lse, t->nr) && same(t->ent, s->ent, t->nr) && same(t->maxw, s->maxw, t->nr) &&
          same(t->first, s->first, t->nr), "%s thread %d: lse or row statistics differ", what, t->id);
    CHECK(same(t->dq, s->dq, t->nq) && same(t->dk, s->dk, t->nk) && same(t->dv, s->dv, t->nk),
          "%s thread %d: input gradients differ", what, t->id);
    for (i = 0; i < 6; ++i) if (t->g[i] && !same(t->g[i], s->g[i], t->ng[i])) grads = 0;
    CHECK(grads, "%s thread %d: weight gradients differ", what, t->id);
    CHECK(same(t->sg, s->sg, H), "%s thread %d: sinks_grad differs", what, t->id);
    /* the outputs were written (a run that wrote nothing would match too) */
    for (j = 0; j < t->nq; ++j) any |= t->out[j] != 0.0f && t->dq[j] != 0.0f;
    CHECK(any && t->sg[0] != 0.0f && t->lse[0] != 0.0f && t->ent[1] > 0.0f, "%s thread %d: outputs written", what,
          t->id);
}

static void run_case(int sdpa, const mha_plan *p, const char *what)
{
    work par[NT], ser[NT];
    pthread_t th[NT];
    int t;
    for (t = 0; t < NT; ++t) {
        make_work(&par[t], sdpa, t, p, 10u * t + (unsigned)sdpa);
        make_work(&ser[t], sdpa, t, p, 10u * t + (unsigned)sdpa);
    }
    for (t = 0; t < NT; ++t) do_work(&ser[t]);   /* serial first: one at a time */
    gate_open = 0;
    for (t = 0; t < NT; ++t) CHECK(pthread_create(&th[t], NULL, thread_main, &par[t]) == 0, "pthread_create");
    pthread_mutex_lock(&gate_mu);
    gate_open = 1;   /* all four start together */
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
    for (t = 0; t < NT; ++t) pthread_join(th[t], NULL);
    for (t = 0; t < NT; ++t) compare(&par[t], &ser[t], what);
    for (t = 0; t < NT; ++t) { free_work(&par[t]); free_work(&ser[t]); }
}

int main(void)
{
    tu_rng r = {97};
    float *w_in = frand(&r, 3 * E * E, 0.4f), *b_in = frand(&r, 3 * E, 0.1f);
    float *w_out = frand(&r, E * E, 0.4f), *b_out = frand(&r, E, 0.1f);
    float *bk = frand(&r, E, 0.5f), *bv = frand(&r, E, 0.5f);
    float sinks[H] = {0.3f, -1.0f, 1.5f};
    mha_module m;
    mha_options o;
    mha_plan *pm = NULL, *ps = NULL;
    mha_error e;
    memset(&m, 0, sizeof m);
    m.embed_dim = E; m.num_heads = H;
    m.in_proj_weight = w_in; m.in_proj_bias = b_in; m.out_proj_weight = w_out; m.out_proj_bias = b_out;
    m.bias_k = bk; m.bias_v = bv;
    memset(&o, 0, sizeof o);
    o.causal = 1; o.causal_align = MHA_CAUSAL_BOTTOM_RIGHT;
    o.sinks = sinks;
    o.num_threads = 1;   /* no OpenMP inside a run: the four pthreads are the only threads */
    CHECK(mha_module_plan(&m, B, LQ, LK, &o, MHA_PLAN_WEIGHTS | MHA_PLAN_TRAINING | MHA_PLAN_PACK, NULL, 0, &pm,
                          &e) == MHA_OK, "module plan: %s", e.message);
    CHECK(mha_sdpa_plan(B, H, LQ, LK, D, D, &o, MHA_PLAN_WEIGHTS | MHA_PLAN_TRAINING, NULL, 0, &ps, &e) == MHA_OK,
          "sdpa plan: %s", e.message);
    if (pm) run_case(0, pm, "module");
    if (ps) run_case(1, ps, "sdpa");
    mha_plan_destroy(pm);
    mha_plan_destroy(ps);
    free(w_in); free(b_in); free(w_out); free(b_out); free(bk); free(bv);
    return tu_finish("concurrency");
}
