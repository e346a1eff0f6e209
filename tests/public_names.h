/* public_names.h - the public names of mha.h, read from its text: the
   declaration part (everything before the implementation's guard) is
   scanned for
     PN_FUNCTION  every MHADEF declaration: the identifier before its '(';
                  can_fail = it returns mha_status (the header's rule: the
                  others "cannot fail")
     PN_TYPE      every typedef'd struct and enum: "typedef struct|enum X",
                  "} X;" and "struct X {"
     PN_MACRO     every MHA_* token (enum constants, flags, configuration
                  and version macros; "MHA_PHASE_*" as the family
                  "MHA_PHASE_"), internal MHA__* and the guard MHA_H left out
   Used by test_api.c (every function that can fail is refused once) and
   test_docs.c (every name appears in docs/api.md).  Reads the file at
   run time, so a name added to mha.h joins both checks by itself. */
#ifndef MHA_PUBLIC_NAMES_H
#define MHA_PUBLIC_NAMES_H
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { PN_FUNCTION, PN_TYPE, PN_MACRO };
typedef struct pn_name { char name[64]; int kind, can_fail; } pn_name;
typedef struct pn_list { pn_name *v; int n, cap; } pn_list;

/* The whole file, NUL-terminated (NULL if it cannot be read). */
static TU_UNUSED char *pn_read(const char *path)
{
    FILE *f = fopen(path, "rb");
    long n;
    char *s;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) { fclose(f); return NULL; }
    s = (char *)malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) { free(s); s = NULL; }
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}
/* The first of a few relative paths that opens: the tests run from the
   repository's root (tests/run_all.sh), a developer may run one from tests/. */
static TU_UNUSED char *pn_read_src(const char *rel, char *used, size_t cap)
{
    static const char *const pre[] = {"", "../", "../../"};
    size_t i;
    for (i = 0; i < sizeof pre / sizeof pre[0]; ++i) {
        char path[512];
        char *s;
        snprintf(path, sizeof path, "%s%s", pre[i], rel);
        if ((s = pn_read(path)) != NULL) {
            snprintf(used, cap, "%s", path);
            return s;
        }
    }
    return NULL;
}

static TU_UNUSED int pn_ident(int c) { return isalnum((unsigned char)c) || c == '_'; }

static TU_UNUSED void pn_add(pn_list *l, const char *s, size_t len, int kind, int can_fail)
{
    int i;
    if (len == 0 || len >= sizeof l->v[0].name) return;
    for (i = 0; i < l->n; ++i)
        if (strlen(l->v[i].name) == len && strncmp(l->v[i].name, s, len) == 0) return;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->v = (pn_name *)realloc(l->v, (size_t)l->cap * sizeof *l->v);
    }
    memcpy(l->v[l->n].name, s, len);
    l->v[l->n].name[len] = '\0';
    l->v[l->n].kind = kind;
    l->v[l->n].can_fail = can_fail;
    ++l->n;
}

/* The identifier that starts at s (its length). */
static TU_UNUSED size_t pn_word(const char *s)
{
    size_t n = 0;
    while (pn_ident(s[n])) ++n;
    return n;
}

/* Scan mha.h's text.  Returns 0 when the declaration part's end marker is
   missing (the header changed shape: the caller fails). */
static TU_UNUSED int pn_scan(const char *src, pn_list *l)
{
    const char *end = strstr(src, "#endif /* MHA_H */"), *line, *p;
    memset(l, 0, sizeof *l);
    if (!end) return 0;
    for (line = src; line < end; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : end) {
        const char *eol = strchr(line, '\n');
        const char *q = line;
        if (!eol || eol > end) eol = end;
        while (q < eol && (*q == ' ' || *q == '\t')) ++q;
        if (*q != '#' && strncmp(q, "MHADEF ", 7) == 0) {
            /* the declaration runs to its '(' (maybe on this line only) */
            const char *paren = memchr(q, '(', (size_t)(eol - q));
            if (paren) {
                const char *b = paren;
                while (b > q && !pn_ident(b[-1])) --b;   /* no space before '(' here, but be kind */
                p = b;
                while (p > q && pn_ident(p[-1])) --p;
                pn_add(l, p, (size_t)(b - p), PN_FUNCTION, strstr(q, "mha_status ") == q + 7);
            }
        }
        if (strncmp(q, "typedef struct ", 15) == 0 || strncmp(q, "typedef enum ", 13) == 0) {
            p = q + (q[8] == 's' ? 15 : 13);
            pn_add(l, p, pn_word(p), PN_TYPE, 0);
        } else if (strncmp(q, "struct mha_", 11) == 0) {
            pn_add(l, q + 7, pn_word(q + 7), PN_TYPE, 0);
        } else if (q[0] == '}' && q[1] == ' ' && strncmp(q + 2, "mha_", 4) == 0) {
            pn_add(l, q + 2, pn_word(q + 2), PN_TYPE, 0);
        }
    }
    /* MHA_* tokens anywhere in the declaration part, comments included
       (the configuration macros are documented only there) */
    for (p = src; p < end; ++p) {
        size_t n;
        if (p[0] != 'M' || strncmp(p, "MHA_", 4) != 0 || (p > src && pn_ident(p[-1]))) continue;
        n = pn_word(p);
        if (p[4] == '_' || (n == 5 && p[4] == 'H') || (n == 23 && strncmp(p, "MHA_IMPLEMENTATION_DONE", n) == 0)) {
            p += n - 1;
            continue;
        }
        pn_add(l, p, n, PN_MACRO, 0);
        p += n - 1;
    }
    return 1;
}

/* Is name in text as a whole word?  A family "MHA_PHASE_" (ending in '_')
   matches any word it starts. */
static TU_UNUSED int pn_mentions(const char *text, const char *name)
{
    size_t n = strlen(name);
    const char *p = text;
    int family = n > 0 && name[n - 1] == '_';
    while ((p = strstr(p, name)) != NULL) {
        if ((p == text || !pn_ident(p[-1])) && (family || !pn_ident(p[n]))) return 1;
        p += n;
    }
    return 0;
}
#endif
