/* test_docs.c - docs/api.md covers every public name of mha.h (issue 18:
   "docs/api.md covers every public name; add a test that fails when a
   public function is missing from it").  The names are read from mha.h
   itself (tests/public_names.h): every MHADEF function, every public
   struct and enum type, every MHA_* constant, flag and configuration
   macro.  Each must appear in docs/api.md as a whole word.  One check per
   name, so the failures list exactly what is missing.  Both files are read
   from the source tree (the tests run from the repository's root).  */
#include "testutil.h"
#include "public_names.h"

int main(void)
{
    static const char *const kinds[] = {"function", "type", "macro"};
    char hpath[600], dpath[600];
    char *h = pn_read_src("mha.h", hpath, sizeof hpath);
    char *doc = pn_read_src("docs/api.md", dpath, sizeof dpath);
    pn_list l;
    int i, counts[3] = {0, 0, 0}, missing = 0;
    CHECK(h != NULL, "mha.h not found (run from the repository's root)");
    CHECK(doc != NULL, "docs/api.md not found (run from the repository's root)");
    if (!h || !doc) return tu_finish("docs");
    CHECK(pn_scan(h, &l), "%s: no '#endif /* MHA_H */' marks the end of the declarations", hpath);
    for (i = 0; i < l.n; ++i) ++counts[l.v[i].kind];
    /* a floor, so that a parser that silently finds nothing cannot pass:
       1.0.0 has 44 functions, 19 types and 48 MHA_* names */
    CHECK(counts[PN_FUNCTION] >= 40 && counts[PN_TYPE] >= 15 && counts[PN_MACRO] >= 40,
          "found only %d functions, %d types, %d macros in %s", counts[0], counts[1], counts[2], hpath);
    for (i = 0; i < l.n; ++i) {
        int ok = pn_mentions(doc, l.v[i].name);
        missing += !ok;
        CHECK(ok, "%s %s is not in %s", kinds[l.v[i].kind], l.v[i].name, dpath);
    }
    printf("NOTE %d functions, %d types, %d MHA_* names in %s; %d missing from %s\n", counts[0], counts[1],
           counts[2], hpath, missing, dpath);
    free(l.v);
    free(h);
    free(doc);
    return tu_finish("docs");
}
