/* tiny_gpt.c - a small GPT trained in C on real English text, with mha.h alone.

     make train-gpt        # train from scratch (5 wall-clock minutes on 2 threads), writes out/gpt/
     make demo             # load the committed checkpoint: val loss, a sample, the views
   or by hand:
     cc -std=c99 -O2 -march=native -fopenmp -I. -Iexamples -isystem /usr/include/stb \
        examples/tiny_gpt.c -o tiny_gpt -lm
     ./tiny_gpt train  [--minutes M] [--clock wall|cpu] [--out DIR] [--resume FILE] [--data DIR] ...
                       (./tiny_gpt without arguments lists every option)
     ./tiny_gpt demo   [--ckpt FILE] [--out DIR] [--data DIR]
     ./tiny_gpt sample [--ckpt FILE] [--prompt TEXT] [--len N] [--temp T] [--top-k K] [--seed S]

   THE DATA  the Debian package `fortunes` (/usr/share/games/fortunes): every
   plain-text file (not the .dat index files, not the .u8 links, not the
   off/ folder), sorted by name, cut into fortunes at the lines holding a
   single '%'.  Fortune number i goes to the validation split when i % 10 == 9,
   to the training split otherwise; fortunes are joined by an empty line.
   The model reads bytes: vocabulary 256, loss in nats per byte.

   THE MODEL  examples/tiny_gpt.h (4 pre-norm causal blocks, 4 heads, d = 128,
   context 128, tied LM head); the checkpoint format is in examples/gpt_ckpt.h.
   Text is generated through mha.h's KV cache (one mha_kv_cache per layer,
   mha_forward_cached), with temperature and top-k sampling.
*/
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mkdir, opendir, clock_gettime */
#endif
#define MHA_IMPLEMENTATION
#include "mha.h"
#define MHA_HEATMAP_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "heatmap.h"
#define MHA_INSPECT_IMPLEMENTATION
#include "attn_inspect.h"
#include "tiny_gpt.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define DEFAULT_DATA "/usr/share/games/fortunes"
#define DEFAULT_CKPT "examples/data/tiny_gpt.ckpt"

/* the shape trained by `make train-gpt` (and stored in the committed checkpoint) */
static const gpt_config GPT_DEFAULT = {4, 4, 128, 512, 128, 256};

static void check(mha_status s, const char *what)
{
    if (s != MHA_OK) {
        fprintf(stderr, "tiny_gpt: %s: %s\n", what, mha_status_string(s));
        exit(2);
    }
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---------------------------------------------------------------- data */

typedef struct {
    unsigned char *p;
    size_t n, cap;
} bytes;

static void bytes_add(bytes *b, const char *s, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = (b->n + n) * 2 + 4096;
        unsigned char *q = (unsigned char *)realloc(b->p, cap);
        if (!q) check(MHA_ERR_OUT_OF_MEMORY, "reading the text");
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int ends_with(const char *s, const char *tail)
{
    size_t n = strlen(s), k = strlen(tail);
    return n >= k && strcmp(s + n - k, tail) == 0;
}

/* Read every fortune file of dir into the training and validation splits. */
static int load_fortunes(const char *dir, bytes *train, bytes *val)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char **names = NULL, path[4096], line[8192];
    size_t count = 0, cap = 0, i, fortune = 0;
    bytes cur = {NULL, 0, 0};
    if (!d) {
        fprintf(stderr, "tiny_gpt: cannot open %s (the Debian package `fortunes`: apt-get install fortunes)\n", dir);
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        struct stat sb;
        if (e->d_name[0] == '.' || ends_with(e->d_name, ".dat") || ends_with(e->d_name, ".u8")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) continue;  /* off/ and other folders */
        if (count == cap) {
            cap = cap * 2 + 64;
            names = (char **)realloc(names, cap * sizeof *names);
            if (!names) check(MHA_ERR_OUT_OF_MEMORY, "listing the text files");
        }
        names[count] = (char *)malloc(strlen(e->d_name) + 1);
        if (!names[count]) check(MHA_ERR_OUT_OF_MEMORY, "listing the text files");
        strcpy(names[count++], e->d_name);
    }
    closedir(d);
    qsort(names, count, sizeof *names, cmp_str);   /* readdir's order is not stable */
    for (i = 0; i < count; ++i) {
        FILE *f;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        f = fopen(path, "rb");
        free(names[i]);
        if (!f) continue;
        for (;;) {
            int end = fgets(line, sizeof line, f) == NULL;
            if (end || strcmp(line, "%\n") == 0 || strcmp(line, "%") == 0) {
                if (cur.n > 0) {
                    bytes *to = fortune % 10 == 9 ? val : train;
                    bytes_add(to, (const char *)cur.p, cur.n);
                    bytes_add(to, "\n", 1);
                    ++fortune;
                    cur.n = 0;
                }
                if (end) break;
            } else {
                bytes_add(&cur, line, strlen(line));
            }
        }
        fclose(f);
    }
    free(names);
    free(cur.p);
    if (train->n < 10000 || val->n < 1000) {
        fprintf(stderr, "tiny_gpt: too little text under %s (%zu + %zu bytes)\n", dir, train->n, val->n);
        return -1;
    }
    printf("data: %zu fortunes from %zu files in %s: train %zu bytes, val %zu bytes\n", fortune,
           count, dir, train->n, val->n);
    return 0;
}

/* ---------------------------------------------------------- loss curve */

typedef struct {
    int n, cap;
    float *step, *train, *val;  /* val NaN where not measured */
} curve;

static void curve_add(curve *c, float step, float train, float val)
{
    if (c->n == c->cap) {
        c->cap = c->cap * 2 + 256;
        c->step = (float *)realloc(c->step, (size_t)c->cap * sizeof(float));
        c->train = (float *)realloc(c->train, (size_t)c->cap * sizeof(float));
        c->val = (float *)realloc(c->val, (size_t)c->cap * sizeof(float));
        if (!c->step || !c->train || !c->val) check(MHA_ERR_OUT_OF_MEMORY, "loss curve");
    }
    c->step[c->n] = step; c->train[c->n] = train; c->val[c->n] = val;
    ++c->n;
}

static void plot_pixel(unsigned char *rgb, int W, int H, int x, int y, const unsigned char col[3])
{
    if (x < 0 || y < 0 || x >= W || y >= H) return;
    memcpy(rgb + ((size_t)y * W + x) * 3, col, 3);
}

/* a 2-pixel-thick line from (x0,y0) to (x1,y1) */
static void plot_line(unsigned char *rgb, int W, int H, int x0, int y0, int x1, int y1,
                      const unsigned char col[3])
{
    int steps = abs(x1 - x0) > abs(y1 - y0) ? abs(x1 - x0) : abs(y1 - y0), s;
    if (steps == 0) steps = 1;
    for (s = 0; s <= steps; ++s) {
        int x = x0 + (x1 - x0) * s / steps, y = y0 + (y1 - y0) * s / steps;
        plot_pixel(rgb, W, H, x, y, col); plot_pixel(rgb, W, H, x + 1, y, col);
        plot_pixel(rgb, W, H, x, y + 1, col);
    }
}

/* Train (blue, every point) and validation (orange, where measured) loss
   against the step, y axis from 0 to the largest loss, gridlines every 0.5. */
static void write_curve_png(const char *path, const curve *c, const char *title)
{
    enum { W = 720, H = 420, X0 = 60, Y0 = 40, PW = 620, PH = 320 };
    static const unsigned char black[3] = {0, 0, 0}, grey[3] = {215, 215, 215},
                               blue[3] = {31, 119, 180}, orange[3] = {255, 127, 14};
    unsigned char *rgb = (unsigned char *)malloc((size_t)W * H * 3);
    float ymax = 0.5f, xmax = 1.0f, g;
    int i, px = -1, py = -1, vx = -1, vy = -1;
    char s[64];
    if (!rgb || c->n == 0) { free(rgb); return; }
    memset(rgb, 255, (size_t)W * H * 3);
    for (i = 0; i < c->n; ++i) {
        if (c->train[i] > ymax) ymax = c->train[i];
        if (c->step[i] > xmax) xmax = c->step[i];
    }
    ymax = ceilf(ymax * 2.0f) / 2.0f;
    for (g = 0.0f; g <= ymax + 1e-3f; g += 0.5f) {
        int y = Y0 + PH - (int)(g / ymax * PH);
        plot_line(rgb, W, H, X0, y, X0 + PW, y, grey);
        snprintf(s, sizeof s, "%.1f", g);
        mha_heatmap_text(rgb, W, H, X0 - 8 - mha_heatmap_text_width(s, 2), y - 7, s, 2, 0, black);
    }
    plot_line(rgb, W, H, X0, Y0, X0, Y0 + PH, black);
    plot_line(rgb, W, H, X0, Y0 + PH, X0 + PW, Y0 + PH, black);
    for (i = 0; i < c->n; ++i) {
        int x = X0 + (int)(c->step[i] / xmax * PW), y = Y0 + PH - (int)(c->train[i] / ymax * PH);
        if (px >= 0) plot_line(rgb, W, H, px, py, x, y, blue);
        px = x; py = y;
        if (c->val[i] == c->val[i]) {
            int v = Y0 + PH - (int)(c->val[i] / ymax * PH);
            if (vx >= 0) plot_line(rgb, W, H, vx, vy, x, v, orange);
            vx = x; vy = v;
        }
    }
    snprintf(s, sizeof s, "step %.0f", xmax);
    mha_heatmap_text(rgb, W, H, X0 + PW - mha_heatmap_text_width(s, 2), Y0 + PH + 10, s, 2, 0, black);
    mha_heatmap_text(rgb, W, H, X0, Y0 + PH + 10, "0", 2, 0, black);
    mha_heatmap_text(rgb, W, H, X0, 10, title, 2, 0, black);
    mha_heatmap_text(rgb, W, H, X0 + PW - 260, Y0 + 10, "train (batch)", 2, 0, blue);
    mha_heatmap_text(rgb, W, H, X0 + PW - 260, Y0 + 32, "validation", 2, 0, orange);
    {
        mha_error herr;   /* heatmap.h's refusal: the path and the system's reason */
        if (mha_heatmap_write_rgb_png(path, rgb, W, H, &herr) == MHA_OK) printf("wrote %s\n", path);
        else fprintf(stderr, "tiny_gpt: %s\n", herr.message);
    }
    free(rgb);
}

/* ---------------------------------------------------------- options */

typedef struct {
    const char *cmd, *data, *out, *ckpt, *resume, *prompt;
    long steps, warmup;
    double minutes, save_every, copy;
    int len, top_k, batch, cpu_clock, sin_pos, window;
    float temp, lr, beta2, wd, qk_std;
    gpt_config shape;
    unsigned long long seed;
} args;

static void usage(void)
{
    printf("usage: tiny_gpt train|demo|sample [options]\n"
           "  --data DIR      fortune files (default " DEFAULT_DATA ")\n"
           "  --out DIR       where PNGs and checkpoints go (default out/gpt)\n"
           "  --ckpt FILE     checkpoint to load for demo/sample (default " DEFAULT_CKPT ")\n"
           "  train: --minutes M (wall-clock budget, default 5)  --clock wall|cpu (what M counts)\n"
           "         --steps N (also stop at step N; default none)  --batch B (default 16)\n"
           "         --lr X (default 3e-3)  --warmup N (steps, default 200)  --beta2 X (default 0.95)\n"
           "         --wd X (weight decay on matrices, default 0.1)  --copy F (fraction of\n"
           "         windows with a repeated stretch, default 0.1)  --save-every M (minutes)\n"
           "         --pos sin|random (the position table's start)  --qk-std X (std of the\n"
           "         query and key weights at the start; default 0.02 as the others)  --resume FILE\n"
           "         --layers N --heads N --d N --ff N --ctx N (the shape)\n"
           "         --window N (train on windows of N < ctx bytes; validation uses ctx)\n"
           "  sample: --prompt TEXT  --len N (default 400)  --temp T (default 0.8)\n"
           "          --top-k K (default 40)  --seed S\n");
}

static int parse_args(int argc, char **argv, args *a)
{
    int i;
    memset(a, 0, sizeof *a);
    a->data = DEFAULT_DATA; a->out = "out/gpt"; a->ckpt = DEFAULT_CKPT;
    a->prompt = "The meaning of life is";
    a->steps = 1L << 40; a->minutes = 5.0; a->len = 400; a->top_k = 40; a->temp = 0.8f;
    a->batch = 16; a->lr = 3e-3f; a->seed = 1; a->warmup = 200; a->beta2 = 0.95f; a->wd = 0.1f;
    a->copy = 0.1;
    a->shape = GPT_DEFAULT;
    if (argc < 2) return -1;
    a->cmd = argv[1];
    if ((argc - 2) % 2 != 0) return -1;   /* options come in --name value pairs */
    for (i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--data")) a->data = v;
        else if (!strcmp(k, "--out")) a->out = v;
        else if (!strcmp(k, "--ckpt")) a->ckpt = v;
        else if (!strcmp(k, "--resume")) a->resume = v;
        else if (!strcmp(k, "--prompt")) a->prompt = v;
        else if (!strcmp(k, "--steps")) a->steps = atol(v);
        else if (!strcmp(k, "--minutes")) a->minutes = atof(v);
        else if (!strcmp(k, "--len")) a->len = atoi(v);
        else if (!strcmp(k, "--top-k")) a->top_k = atoi(v);
        else if (!strcmp(k, "--batch")) a->batch = atoi(v);
        else if (!strcmp(k, "--temp")) a->temp = (float)atof(v);
        else if (!strcmp(k, "--lr")) a->lr = (float)atof(v);
        else if (!strcmp(k, "--seed")) a->seed = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--warmup")) a->warmup = atol(v);
        else if (!strcmp(k, "--beta2")) a->beta2 = (float)atof(v);
        else if (!strcmp(k, "--wd")) a->wd = (float)atof(v);
        else if (!strcmp(k, "--copy")) a->copy = atof(v);
        else if (!strcmp(k, "--qk-std")) a->qk_std = (float)atof(v);
        else if (!strcmp(k, "--window")) a->window = atoi(v);
        else if (!strcmp(k, "--pos")) {
            if (strcmp(v, "sin") && strcmp(v, "random")) return -1;
            a->sin_pos = !strcmp(v, "sin");
        }
        else if (!strcmp(k, "--save-every")) a->save_every = atof(v);
        else if (!strcmp(k, "--clock")) {
            if (strcmp(v, "cpu") && strcmp(v, "wall")) return -1;
            a->cpu_clock = !strcmp(v, "cpu");
        }
        else if (!strcmp(k, "--layers")) a->shape.n_layer = atoi(v);
        else if (!strcmp(k, "--heads")) a->shape.n_head = atoi(v);
        else if (!strcmp(k, "--d")) a->shape.d_model = atoi(v);
        else if (!strcmp(k, "--ff")) a->shape.d_ff = atoi(v);
        else if (!strcmp(k, "--ctx")) a->shape.ctx = atoi(v);
        else return -1;
    }
    if (a->steps < 1 || a->batch < 1 || a->len < 0 || !(a->lr > 0.0f) || a->warmup < 1 ||
        !(a->minutes > 0) || !(a->copy >= 0 && a->copy <= 1) || !(a->beta2 >= 0 && a->beta2 < 1) ||
        !(a->wd >= 0) || a->save_every < 0 || !gpt_config_valid(&a->shape) || a->shape.ctx < 16 ||
        a->shape.n_layer > GPT_MAX_LAYERS)
        return -1;
    return 0;
}

static void make_dirs(const char *path)
{
    char buf[1024];
    size_t i;
    snprintf(buf, sizeof buf, "%s", path);
    for (i = 1; buf[i]; ++i)
        if (buf[i] == '/') { buf[i] = 0; mkdir(buf, 0777); buf[i] = '/'; }
    mkdir(buf, 0777);
}

/* ---------------------------------------------------------- train */

/* The training checkpoint (with the AdamW moments, for --resume) and the
   parameters alone (what demo and sample load). */
static void save_checkpoints(const args *a, const gpt_model *M, long step)
{
    char path[1024];
    gpt_ckpt_status cs;
    snprintf(path, sizeof path, "%s/tiny_gpt.ckpt", a->out);
    cs = gpt_ckpt_save(path, &M->c, (unsigned long long)step, M->p, M->m, M->v);
    if (cs != GPT_CKPT_OK) fprintf(stderr, "tiny_gpt: %s: %s\n", path, gpt_ckpt_status_string(cs));
    else printf("wrote %s (with AdamW moments, for --resume)\n", path);
    snprintf(path, sizeof path, "%s/tiny_gpt_weights.ckpt", a->out);
    cs = gpt_ckpt_save(path, &M->c, (unsigned long long)step, M->p, NULL, NULL);
    if (cs != GPT_CKPT_OK) fprintf(stderr, "tiny_gpt: %s: %s\n", path, gpt_ckpt_status_string(cs));
    else printf("wrote %s (parameters only)\n", path);
}

static int cmd_train(const args *a)
{
    bytes train = {NULL, 0, 0}, val = {NULL, 0, 0};
    gpt_config c = a->shape;
    gpt_model M;
    mha_rng rng;
    mha_adamw opt;
    curve cv;
    int B = a->batch, T = a->window > 0 && a->window < c.ctx ? a->window : c.ctx, *tok, *tgt;
    long step, first = 1;
    double t0, c0, wall = 0, cpu = 0, used = 0, budget = a->minutes * 60.0, vloss = 0, tokens = 0;
    double next_save = a->save_every > 0 ? a->save_every * 60.0 : 1e300;
    float loss = 0, smooth = -1;
    char path[1024];

    if (load_fortunes(a->data, &train, &val) != 0) return 1;
    check(gpt_alloc(&M, &c, B, 1), "allocating the model");
    tok = (int *)malloc((size_t)B * c.ctx * sizeof(int));   /* validation windows are ctx long */
    tgt = (int *)malloc((size_t)B * c.ctx * sizeof(int));
    if (!tok || !tgt) check(MHA_ERR_OUT_OF_MEMORY, "batch");
    memset(&cv, 0, sizeof cv);
    mha_rng_seed(&rng, a->seed);
    gpt_init(&M, &rng);
    if (a->sin_pos) check(gpt_init_positions(&M), "position table");
    if (a->qk_std > 0.0f) gpt_init_qk(&M, &rng, a->qk_std);
    if (a->resume) {
        gpt_ckpt ck;
        gpt_ckpt_status cs = gpt_ckpt_load(a->resume, &c, &ck);
        if (cs != GPT_CKPT_OK) {
            fprintf(stderr, "tiny_gpt: %s: %s\n", a->resume, gpt_ckpt_status_string(cs));
            return 1;
        }
        memcpy(M.p, ck.params, M.o.total * sizeof(float));
        if (ck.adam_m) {
            memcpy(M.m, ck.adam_m, M.o.total * sizeof(float));
            memcpy(M.v, ck.adam_v, M.o.total * sizeof(float));
        }
        first = (long)ck.step + 1;
        /* a different stream for the batches after a resume */
        mha_rng_seed(&rng, a->seed + ck.step);
        printf("resumed %s at step %llu%s\n", a->resume, ck.step,
               ck.adam_m ? "" : " (no AdamW moments in it: they restart at zero)");
        gpt_ckpt_free(&ck);
    }
    opt = mha_adamw_defaults();
    opt.beta2 = a->beta2;
    opt.weight_decay = a->wd;
    printf("model: %d layers, %d heads, d=%d, ff=%d, context %d, vocab %d: %zu parameters\n",
           c.n_layer, c.n_head, c.d_model, c.d_ff, c.ctx, c.vocab, M.o.total);
    printf("training: batch %d x %d bytes, AdamW lr %.1e beta2 %.2f wd %.2g (matrices), warm-up %ld "
           "steps, cosine to lr/10 over %.1f minutes of %s time; %.0f%% of windows repeat a stretch\n",
           B, T, a->lr, a->beta2, a->wd, a->warmup, a->minutes, a->cpu_clock ? "CPU" : "wall",
           100.0 * a->copy);
    make_dirs(a->out);

    t0 = now_seconds();
    c0 = (double)clock() / CLOCKS_PER_SEC;
    for (step = first; step <= a->steps; ++step) {
        int last;
        /* the schedule follows whichever budget, steps or time, is nearer its end */
        double progress = (double)(step - first) / (double)(a->steps - first + 1);
        if (used / budget > progress) progress = used / budget;
        opt.lr = gpt_lr_progress(step, a->warmup, progress, a->lr, 0.1f * a->lr);
        gpt_batch_copy(train.p, train.n, B, T, a->copy, &rng, tok, tgt);
        check(gpt_train_step(&M, &opt, step, B, T, tok, tgt, 1.0f, &loss), "training step");
        tokens += (double)B * T;
        smooth = smooth < 0 ? loss : 0.95f * smooth + 0.05f * loss;
        wall = now_seconds() - t0;
        cpu = (double)clock() / CLOCKS_PER_SEC - c0;
        used = a->cpu_clock ? cpu : wall;
        last = step == a->steps || used >= budget;
        if (step % 10 == 0 || step == first || last) {
            float v = NAN;
            if (step % 100 == 0 || last) {
                /* the same 64 windows (8 KB) of the validation split every time */
                check(gpt_eval(&M, val.p, val.n, B, c.ctx, 64, tok, tgt, &vloss), "validation");
                v = (float)vloss;
                printf("step %5ld  loss %.4f  val %.4f  lr %.2e  %6.0f tok/s  %6.1f s wall  %6.1f s CPU\n",
                       step, smooth, v, opt.lr, tokens / wall, wall, cpu);
                fflush(stdout);
            }
            curve_add(&cv, (float)step, smooth, v);
        }
        if (used >= next_save && !last) {
            save_checkpoints(a, &M, step);
            next_save += a->save_every * 60.0;
        }
        if (last) break;
    }
    if (step > a->steps) step = a->steps;
    /* the whole validation split once at the end */
    check(gpt_eval(&M, val.p, val.n, B, c.ctx, 1 << 30, tok, tgt, &vloss), "validation");
    printf("done: %ld steps, %.0f tokens in %.1f s wall (%.0f tokens/s), %.1f s CPU; validation loss "
           "%.4f nats/byte (%.3f bits/byte) on all %zu val bytes\n", step, tokens, wall, tokens / wall,
           cpu, vloss, vloss / log(2.0), val.n);
    save_checkpoints(a, &M, step);
    snprintf(path, sizeof path, "%s/gpt_loss.png", a->out);
    {
        char title[128];
        snprintf(title, sizeof title, "tiny_gpt on fortunes: loss (nats/byte), final val %.3f", vloss);
        write_curve_png(path, &cv, title);
    }
    free(cv.step); free(cv.train); free(cv.val);
    free(tok); free(tgt); free(train.p); free(val.p);
    gpt_free(&M);
    return 0;
}

/* ---------------------------------------------------------- sample */

static int load_model(const char *path, gpt_model *M, int max_batch)
{
    gpt_ckpt ck;
    gpt_ckpt_status cs = gpt_ckpt_load(path, NULL, &ck);
    if (cs != GPT_CKPT_OK) {
        fprintf(stderr, "tiny_gpt: %s: %s\n", path, gpt_ckpt_status_string(cs));
        return -1;
    }
    check(gpt_alloc(M, &ck.cfg, max_batch, 0), "allocating the model");
    memcpy(M->p, ck.params, M->o.total * sizeof(float));
    printf("loaded %s: %d layers, %d heads, d=%d, context %d, %zu parameters, step %llu\n", path,
           ck.cfg.n_layer, ck.cfg.n_head, ck.cfg.d_model, ck.cfg.ctx, ck.n_params, ck.step);
    gpt_ckpt_free(&ck);
    return 0;
}

/* Print the prompt and n bytes sampled after it (KV-cache decoding). */
static void generate(gpt_model *M, const char *prompt, int n, float temp, int top_k, unsigned long long seed)
{
    size_t np = strlen(prompt);
    int *seq = (int *)malloc((np + (size_t)n + 1) * sizeof(int)), len = 0, i;
    float *logits = (float *)malloc((size_t)M->c.vocab * sizeof(float));
    gpt_decoder D;
    mha_rng r;
    if (!seq || !logits) check(MHA_ERR_OUT_OF_MEMORY, "generation");
    check(gpt_decoder_init(&D, M), "KV caches");
    mha_rng_seed(&r, seed);
    if (np == 0) seq[len++] = '\n';
    for (i = 0; i < (int)np; ++i) seq[len++] = (unsigned char)prompt[i];
    check(gpt_generate(&D, seq, len, n, temp, top_k, &r, logits), "generation");
    fputs(prompt, stdout);
    for (i = len; i < len + n; ++i) putchar(seq[i]);
    putchar('\n');
    gpt_decoder_free(&D);
    free(seq);
    free(logits);
}

static int cmd_sample(const args *a)
{
    gpt_model M;
    if (load_model(a->ckpt, &M, 1) != 0) return 1;
    printf("--- temperature %.2f, top-k %d, seed %llu ---\n", a->temp, a->top_k, a->seed);
    generate(&M, a->prompt, a->len, a->temp, a->top_k, a->seed);
    gpt_free(&M);
    return 0;
}

/* ---------------------------------------------------------- views */

/* One byte as a short label: printable ASCII as itself, space as '_',
   newline as "\n", anything else as its hex value. */
static void byte_label(int b, char out[8])
{
    if (b == ' ') strcpy(out, "_");
    else if (b == '\n') strcpy(out, "\\n");
    else if (b > 32 && b < 127) { out[0] = (char)b; out[1] = 0; }
    else snprintf(out, 8, "x%02X", (unsigned)b & 0xFFu);
}

/* Every layer's per-head weights for one sequence: attn [n_layer, H, T, T]. */
static float *attention_of(gpt_model *M, const int *tok, int T)
{
    size_t per = (size_t)M->c.n_head * T * T;
    float *attn = (float *)malloc(per * (size_t)M->c.n_layer * sizeof(float));
    float *ptr[256];
    int l;
    if (!attn) check(MHA_ERR_OUT_OF_MEMORY, "attention weights");
    for (l = 0; l < M->c.n_layer; ++l) ptr[l] = attn + (size_t)l * per;
    check(gpt_forward(M, 1, T, tok, NULL, NULL, ptr), "forward with weights");
    return attn;
}

static void write_png(const char *path, const mha_heatmap *hm, const mha_heatmap_style *st)
{
    mha_error herr;
    if (mha_heatmap_write_png(path, hm, st, &herr) != MHA_OK) fprintf(stderr, "tiny_gpt: %s\n", herr.message);
    else printf("wrote %s\n", path);
}

/* Labels for T bytes: lab[i] holds the text, labels[i] points at it. */
typedef struct {
    char (*lab)[8];
    const char **labels;
    unsigned char *mask;     /* [T, T] causal: the cells the model never looks at */
} byte_labels;

static byte_labels make_labels(const int *tok, int T)
{
    byte_labels b;
    int i;
    b.lab = (char (*)[8])malloc((size_t)T * 8);
    b.labels = (const char **)malloc((size_t)T * sizeof(char *));
    b.mask = (unsigned char *)malloc((size_t)T * T);
    if (!b.lab || !b.labels || !b.mask) check(MHA_ERR_OUT_OF_MEMORY, "labels");
    for (i = 0; i < T; ++i) { byte_label(tok[i], b.lab[i]); b.labels[i] = b.lab[i]; }
    check(mha_heatmap_causal_mask(T, T, 0, b.mask, NULL), "causal mask");
    return b;
}

static void free_labels(byte_labels *b) { free(b->lab); free(b->labels); free(b->mask); }

/* The layers x heads grid of one sequence (bertviz's model view): panel
   (l, h) is layer l's head h, rows are queries, columns keys, the causal
   triangle hatched.  attn [n_layer, H, T, T]. */
static void draw_model_view(const gpt_model *M, const int *tok, int T, const float *attn,
                            const char *path, const char *title)
{
    int L = M->c.n_layer, H = M->c.n_head, l, h;
    char (*ht)[40] = (char (*)[40])malloc((size_t)L * H * 40);
    const char **head_titles = (const char **)malloc((size_t)L * H * sizeof(char *));
    byte_labels bl = make_labels(tok, T);
    mha_heatmap hm;
    mha_heatmap_style st;
    if (!ht || !head_titles) check(MHA_ERR_OUT_OF_MEMORY, "titles");
    for (l = 0; l < L; ++l)
        for (h = 0; h < H; ++h) {
            snprintf(ht[l * H + h], 40, "layer %d head %d", l, h);
            head_titles[l * H + h] = ht[l * H + h];
        }
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = attn; hm.heads = L * H; hm.Lq = T; hm.Lk = T; hm.mask = bl.mask;
    hm.q_labels = bl.labels; hm.k_labels = bl.labels; hm.title = title; hm.head_titles = head_titles;
    st.cols = H;   /* one row of panels per layer */
    st.cell = 5;   /* thumbnails */
    write_png(path, &hm, &st);
    free(ht); free(head_titles); free_labels(&bl);
}

/* One PNG per head, every byte labelled: <dir>/<prefix>_L<l>H<h>.png */
static void draw_heads(const gpt_model *M, const int *tok, int T, const float *attn, const char *dir,
                       const char *prefix)
{
    int l, h;
    byte_labels bl = make_labels(tok, T);
    char path[1024], title[64];
    mha_heatmap hm;
    mha_heatmap_style st;
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.heads = 1; hm.Lq = T; hm.Lk = T; hm.mask = bl.mask;
    hm.q_labels = bl.labels; hm.k_labels = bl.labels; hm.title = title;
    st.cell = 12;  /* large enough for a label on every byte */
    for (l = 0; l < M->c.n_layer; ++l)
        for (h = 0; h < M->c.n_head; ++h) {
            hm.weights = attn + ((size_t)l * M->c.n_head + h) * T * T;
            snprintf(title, sizeof title, "layer %d, head %d", l, h);
            snprintf(path, sizeof path, "%s/%s_L%dH%d.png", dir, prefix, l, h);
            write_png(path, &hm, &st);
        }
    free_labels(&bl);
}

/* The detector scores of every head (examples/attn_inspect.h) on one
   sequence: printed as a table and drawn as five layers x heads maps, the
   entropy divided by ln T so that every map reads 0..1.  Returns the index
   l * H + h of the head with the highest induction score past layer 0. */
static int detect_heads(const gpt_model *M, const int *tok, int T, const float *attn, const char *path)
{
    static const char *const names[5] = {"previous token", "duplicate token", "induction",
                                         "first token (sink)", "entropy / ln T"};
    static const char *const rows[] = {"L0", "L1", "L2", "L3", "L4", "L5", "L6", "L7"};
    static const char *const cols[] = {"H0", "H1", "H2", "H3", "H4", "H5", "H6", "H7"};
    int L = M->c.n_layer, H = M->c.n_head, n = L * H, l, h, k;
    int first = L > 1 ? H : 0, best = first;
    mha_inspect_scores *sc = (mha_inspect_scores *)malloc((size_t)n * sizeof *sc);
    float *maps = (float *)malloc((size_t)5 * n * sizeof(float));
    mha_heatmap hm;
    mha_heatmap_style st;
    if (!sc || !maps) check(MHA_ERR_OUT_OF_MEMORY, "detector scores");
    printf("head scores (attn_inspect.h) on the repeated string:\n"
           "layer head  prev-token  duplicate  induction  first-token  entropy(nats)\n");
    for (l = 0; l < L; ++l) {
        check(mha_inspect_heads(attn + (size_t)l * H * T * T, H, T, tok, sc + l * H, NULL), "head scores");
        for (h = 0; h < H; ++h) {
            const mha_inspect_scores *s = &sc[l * H + h];
            const double v[5] = {s->prev_token, s->duplicate_token, s->induction, s->first_token,
                                 s->entropy / log((double)T)};
            printf("%5d %4d  %10.3f %10.3f %10.3f %12.3f %14.3f\n", l, h, s->prev_token,
                   s->duplicate_token, s->induction, s->first_token, s->entropy);
            for (k = 0; k < 5; ++k) maps[(size_t)k * n + l * H + h] = (float)v[k];
            /* an induction head reads a previous-token head's output: layer 1 or later */
            if (l * H + h > first && s->induction > sc[best].induction) best = l * H + h;
        }
    }
    if (L <= 8 && H <= 8) {   /* the row and column names above */
        memset(&hm, 0, sizeof hm);
        memset(&st, 0, sizeof st);
        hm.weights = maps; hm.heads = 5; hm.Lq = L; hm.Lk = H;
        hm.q_labels = rows; hm.k_labels = cols; hm.head_titles = names;
        hm.title = "head detectors on 24 random letters repeated (rows: layers, columns: heads)";
        st.cell = 40; st.show_values = 1; st.cols = 5;
        write_png(path, &hm, &st);
    }
    free(sc);
    free(maps);
    return best;
}

/* Attention rollout (Abnar & Zuidema 2020) through all layers, one map [T, T]. */
static void draw_rollout(const gpt_model *M, const int *tok, int T, const float *attn, const char *path)
{
    float *R = (float *)malloc((size_t)T * T * sizeof(float));
    float *work = (float *)malloc((size_t)2 * T * T * sizeof(float));
    byte_labels bl = make_labels(tok, T);
    mha_heatmap hm;
    mha_heatmap_style st;
    if (!R || !work) check(MHA_ERR_OUT_OF_MEMORY, "rollout");
    check(mha_inspect_rollout(M->c.n_layer, M->c.n_head, T, attn, R, work, NULL), "rollout");
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = R; hm.heads = 1; hm.Lq = T; hm.Lk = T; hm.mask = bl.mask;
    hm.q_labels = bl.labels; hm.k_labels = bl.labels;
    hm.title = "attention rollout through the 4 layers: how much of byte j reaches position i";
    st.cell = 12;
    st.range = MHA_HEATMAP_RANGE_DATA;
    write_png(path, &hm, &st);
    free(R); free(work); free_labels(&bl);
}

/* ---------------------------------------------------------- demo */

static int cmd_demo(const args *a)
{
    static const char sentence[] = "Whenever you find yourself on the side of the majority, pause.";
    bytes train = {NULL, 0, 0}, val = {NULL, 0, 0};
    gpt_model M;
    mha_rng r;
    int B = 8, *tok, *tgt, T, i;
    double vloss;
    float *attn;
    char title[160], path[1024];

    if (load_fortunes(a->data, &train, &val) != 0) return 1;
    if (load_model(a->ckpt, &M, B) != 0) return 1;
    T = M.c.ctx;
    tok = (int *)malloc((size_t)B * T * sizeof(int));
    tgt = (int *)malloc((size_t)B * T * sizeof(int));
    if (!tok || !tgt) check(MHA_ERR_OUT_OF_MEMORY, "batch");
    make_dirs(a->out);

    /* 1. validation loss on a slice of the held-out fortunes */
    check(gpt_eval(&M, val.p, val.n, B, T, 64, tok, tgt, &vloss), "validation");
    printf("validation loss %.4f nats/byte (%.3f bits/byte) on %d windows of %d bytes "
           "(a uniform guess: ln 256 = 5.545)\n", vloss, vloss / log(2.0), 64, T);

    /* 2. a sample */
    printf("--- sample: temperature %.2f, top-k %d, seed %llu ---\n", a->temp, a->top_k, a->seed);
    generate(&M, a->prompt, a->len, a->temp, a->top_k, a->seed);
    printf("---\n");

    /* 3. the model view of a sentence, and one PNG per head */
    T = (int)strlen(sentence);
    for (i = 0; i < T; ++i) tok[i] = (unsigned char)sentence[i];
    attn = attention_of(&M, tok, T);
    snprintf(path, sizeof path, "%s/gpt_model_view.png", a->out);
    draw_model_view(&M, tok, T, attn, path, "every layer (rows) and head (columns)");
    draw_heads(&M, tok, T, attn, a->out, "gpt_head");
    snprintf(path, sizeof path, "%s/gpt_rollout.png", a->out);
    draw_rollout(&M, tok, T, attn, path);
    free(attn);

    /* 4. the induction prompt: 24 random letters, then the same 24 again.  On the
          second copy an induction head attends to the letter after the earlier
          copy of the current letter: a stripe 23 cells left of the diagonal. */
    mha_rng_seed(&r, 2024);
    T = 48;
    for (i = 0; i < 24; ++i) tok[i] = tok[i + 24] = 'a' + (int)(mha_rng_u32(&r) % 26);
    attn = attention_of(&M, tok, T);
    snprintf(title, sizeof title, "24 random letters twice: an induction head lights a stripe 23 left of the diagonal");
    snprintf(path, sizeof path, "%s/gpt_induction.png", a->out);
    draw_model_view(&M, tok, T, attn, path, title);
    snprintf(path, sizeof path, "%s/gpt_detectors.png", a->out);
    i = detect_heads(&M, tok, T, attn, path);
    {
        /* the best induction head alone, every letter labelled */
        int l = i / M.c.n_head, h = i % M.c.n_head;
        byte_labels bl = make_labels(tok, T);
        mha_heatmap hm;
        mha_heatmap_style st;
        double score;
        memset(&hm, 0, sizeof hm);
        memset(&st, 0, sizeof st);
        check(mha_inspect_induction(attn + (size_t)i * T * T, T, tok, &score, NULL), "induction score");
        snprintf(title, sizeof title, "layer %d head %d: the highest induction score (%.2f)", l, h, score);
        hm.weights = attn + (size_t)i * T * T; hm.heads = 1; hm.Lq = T; hm.Lk = T; hm.mask = bl.mask;
        hm.q_labels = bl.labels; hm.k_labels = bl.labels; hm.title = title;
        st.cell = 12;
        snprintf(path, sizeof path, "%s/gpt_induction_head.png", a->out);
        write_png(path, &hm, &st);
        free_labels(&bl);
    }
    free(attn);

    free(tok); free(tgt); free(train.p); free(val.p);
    gpt_free(&M);
    return 0;
}

int main(int argc, char **argv)
{
    args a;
    if (parse_args(argc, argv, &a) != 0) {
        usage();
        return 1;
    }
    if (!strcmp(a.cmd, "train")) return cmd_train(&a);
    if (!strcmp(a.cmd, "sample")) return cmd_sample(&a);
    if (!strcmp(a.cmd, "demo")) return cmd_demo(&a);
    usage();
    return 1;
}
