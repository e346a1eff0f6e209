/* test_ansi.c - mha_view --ansi: the escape sequences printed for a tiny
   known map, in 24-bit colour and in the 256-colour fallback, the COLORTERM
   rule, the nearest xterm colour, and labels that cannot drive the terminal. */
#include <stdarg.h>
#define MHA_VIEW_NO_MAIN
#include "../examples/mha_view.c"
#include "testutil.h"

#define TMP "build/tests/"

/* everything mha_view_ansi prints for hm, as one string */
static char *render(const mha_heatmap *hm, const mha_heatmap_style *st, int truecolor)
{
    FILE *f = tmpfile();
    long n;
    char *s;
    if (!f) return NULL;
    mha_view_ansi(f, hm, st, truecolor);
    n = ftell(f);
    rewind(f);
    s = (char *)calloc((size_t)n + 1, 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) { free(s); s = NULL; }
    fclose(f);
    return s;
}

/* viridis ends: 0 -> (68, 1, 84), 1 -> (253, 231, 37); 0.5 -> (33, 145, 140);
   0.25 -> (59, 82, 139); the mask grey is (222, 222, 222) */
static void test_known_map(void)
{
    static const float w[6] = {0.0f, 1.0f, 0.5f, NAN, 0.25f, 1.0f};
    static const char *const q[] = {"the", "cat"};
    static const char *const k[] = {"a", "bb", "ccc"};
    static const char want24[] =
        "two rows\n"
        "    a b c \n"
        "      b c \n"
        "        c \n"
        "the \033[48;2;68;1;84m  \033[48;2;253;231;37m  \033[48;2;33;145;140m  \033[0m\n"
        "cat \033[48;2;222;222;222m//\033[48;2;59;82;139m  \033[48;2;253;231;37m  \033[0m\n";
    static const char want256[] =
        "the \033[48;5;53m  \033[48;5;220m  \033[48;5;30m  \033[0m\n"
        "cat \033[48;5;253m//\033[48;5;60m  \033[48;5;220m  \033[0m\n";
    static const char want_idx[] =
        "  0 1 2 \n"
        "0 \033[48;2;68;1;84m  \033[48;2;253;231;37m  \033[48;2;68;1;84m  \033[0m\n";
    mha_heatmap hm;
    mha_heatmap_style st;
    char *s;
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.Lq = 2; hm.Lk = 3; hm.heads = 1;
    hm.q_labels = q; hm.k_labels = k; hm.title = "two rows";
    s = render(&hm, &st, 1);
    CHECK(s && strncmp(s, want24, sizeof want24 - 1) == 0, "24-bit output:\n%s", s ? s : "(none)");
    CHECK(s && strstr(s, "    0      \033[48;2;68;1;84m \033[48;2;72;25;107m ") != NULL &&
          strstr(s, "\033[48;2;253;231;37m \033[0m 1\n") != NULL, "24-bit colour bar from 0 to 1");
    free(s);
    s = render(&hm, &st, 0);
    CHECK(s && strstr(s, want256) != NULL, "256-colour output:\n%s", s ? s : "(none)");
    CHECK(s && strstr(s, "48;2;") == NULL, "no 24-bit sequence in the 256-colour output");
    free(s);
    /* without labels: indices; a fixed range 0.5..1 puts 0 and 0.5 both at the bottom */
    hm.q_labels = hm.k_labels = NULL;
    hm.title = NULL;
    st.range = MHA_HEATMAP_RANGE_FIXED; st.vmin = 0.5f; st.vmax = 1.0f;
    s = render(&hm, &st, 1);
    CHECK(s && strncmp(s, want_idx, sizeof want_idx - 1) == 0, "indices, fixed range 0.5..1:\n%s", s ? s : "(none)");
    free(s);
}

static void test_colour_rules(void)
{
    static const unsigned char black[3] = {0, 0, 0}, white[3] = {255, 255, 255}, red[3] = {255, 0, 0};
    static const unsigned char grey[3] = {128, 128, 128}, teal[3] = {33, 145, 140};
    CHECK(mha_view_truecolor("truecolor") && mha_view_truecolor("24bit"), "COLORTERM truecolor / 24bit");
    CHECK(!mha_view_truecolor(NULL) && !mha_view_truecolor("") && !mha_view_truecolor("256color"),
          "COLORTERM unset or anything else: 256 colours");
    CHECK(mha_view_xterm256(black) == 16 && mha_view_xterm256(white) == 231 && mha_view_xterm256(red) == 196,
          "cube corners: %d %d %d", mha_view_xterm256(black), mha_view_xterm256(white), mha_view_xterm256(red));
    CHECK(mha_view_xterm256(grey) == 244, "mid grey on the grey ramp: %d", mha_view_xterm256(grey));
    CHECK(mha_view_xterm256(teal) == 30, "viridis 0.5 -> 30 (0, 135, 135): %d", mha_view_xterm256(teal));
}

/* a token holding an escape sequence is printed with '?' for the control byte */
static void test_hostile_labels(void)
{
    static const float w[4] = {0.5f, 0.5f, 1.0f, 0.0f};
    static const char *const lab[] = {"x\033[2J", "\033]0;pwned\007"};
    mha_heatmap hm;
    mha_heatmap_style st;
    char *s, *p;
    int escapes_ok = 1;
    memset(&hm, 0, sizeof hm);
    memset(&st, 0, sizeof st);
    hm.weights = w; hm.Lq = 2; hm.Lk = 2; hm.heads = 1;
    hm.q_labels = hm.k_labels = lab; hm.title = "t\033[31m";
    s = render(&hm, &st, 1);
    CHECK(s != NULL, "rendered");
    /* every ESC that is printed starts one of our colour or reset sequences */
    for (p = s; p && (p = strchr(p, '\033')) != NULL; ++p)
        escapes_ok &= strncmp(p, "\033[48;", 5) == 0 || strncmp(p, "\033[0m", 4) == 0;
    CHECK(escapes_ok, "no escape from a label or the title reaches the terminal");
    CHECK(s && strstr(s, "x?[2J") != NULL && strstr(s, "t?[31m") != NULL, "control bytes shown as '?'");
    free(s);
}

/* the command line: --ansi prints and writes no PNG */
static void test_command_line(void)
{
    /* a [2, 2, 3] float32 .npy: two heads */
    static const char hdr[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 3), }";
    unsigned char buf[256];
    float w[12] = {0, 1, 0.5f, 0.2f, 0.3f, 0.5f, 1, 0, 0, 0.25f, 0.25f, 0.5f};
    size_t hl = sizeof hdr - 1, pad = (64 - (10 + hl + 1) % 64) % 64, n = 0, i;
    FILE *f;
    char *argv[] = {"mha_view", TMP "ansi_two_heads.npy", "--ansi", "--causal"};
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)(hl + pad + 1);
    buf[9] = 0;
    memcpy(buf + 10, hdr, hl);
    for (i = 0; i < pad; ++i) buf[10 + hl + i] = ' ';
    buf[10 + hl + pad] = '\n';
    n = 10 + hl + pad + 1;
    memcpy(buf + n, w, sizeof w);   /* little-endian machines (x86, aarch64) */
    n += sizeof w;
    f = fopen(TMP "ansi_two_heads.npy", "wb");
    CHECK(f != NULL, "write the .npy");
    if (!f) return;
    fwrite(buf, 1, n, f);
    fclose(f);
    remove(TMP "ansi_two_heads_head0.png");
    CHECK(mha_view_main(4, argv) == 0, "mha_view --ansi exits 0");
    f = fopen(TMP "ansi_two_heads_head0.png", "rb");
    CHECK(f == NULL, "--ansi writes no PNG");
    if (f) fclose(f);
}

int main(void)
{
    test_known_map();
    test_colour_rules();
    test_hostile_labels();
    test_command_line();
    return tu_finish("ansi");
}
