/* errcheck.h - checks of a refusal (issue 18, "errors name the field"),
   shared by the tests of statuses and fields.  Include after mha.h and
   testutil.h.  It needs only mha.h's declarations, so the tests of the
   companion headers built without MHA_IMPLEMENTATION can use it too.

   ec_refused(s, &err, want, "mha_x", "field", "says") is the one-line
   check: did a call that returned s refuse with want, naming mha_x and
   field in err, with a message "mha_x: field: ..." that holds "says"?

   EC_REFUSE(want, "mha_x", "field", call) runs call twice; call is an
   expression that passes ERR as its mha_error * argument:
     1. with ERR = NULL: the status must be want (a NULL err is accepted);
     2. with ERR = an mha_error holding stale junk: the status must be want,
        err.status want, err.function "mha_x", err.field "field" (NULL:
        the field is not checked, but must still be named) and err.message
        must start with "mha_x: field:".
   Before each run every buffer given to ec_watch() is snapshotted (the
   pure outputs among them first filled with a sentinel byte pattern), and
   after it each must be byte for byte as it was: a refusal writes nothing.
   ec_seen_fn() tells whether a function has been refused at least once
   (test_api.c checks every public function was). */
#ifndef MHA_ERRCHECK_H
#define MHA_ERRCHECK_H
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

enum { EC_MAX_WATCH = 16, EC_MAX_SEEN = 128 };
typedef struct { void *p; size_t n; int poison; unsigned char *copy; } ec_watch_t;
static ec_watch_t ec_w[EC_MAX_WATCH];
static int ec_nw;
static const char *ec_seen[EC_MAX_SEEN];
static int ec_nseen;

/* Forget every watched buffer. */
static TU_UNUSED void ec_clear(void)
{
    int i;
    for (i = 0; i < ec_nw; ++i) free(ec_w[i].copy);
    ec_nw = 0;
}
/* Watch n bytes at p.  poison: a pure output, filled with 0xA5 bytes
   before each call (the float -2.87e-16, the int -1515870811: nothing a
   refused call could compute by chance), so that any write shows. */
static TU_UNUSED void ec_watch(void *p, size_t n, int poison)
{
    if (!p || !n || ec_nw == EC_MAX_WATCH) { printf("FAIL errcheck: bad watch\n"); ++tu_fail; return; }
    ec_w[ec_nw].p = p; ec_w[ec_nw].n = n; ec_w[ec_nw].poison = poison;
    ec_w[ec_nw].copy = (unsigned char *)malloc(n);
    ++ec_nw;
}
static TU_UNUSED void ec_arm(void)
{
    int i;
    for (i = 0; i < ec_nw; ++i) {
        if (ec_w[i].poison) memset(ec_w[i].p, 0xA5, ec_w[i].n);
        memcpy(ec_w[i].copy, ec_w[i].p, ec_w[i].n);
    }
}
/* index of the first watched buffer that changed, or -1 */
static TU_UNUSED int ec_changed(void)
{
    int i;
    for (i = 0; i < ec_nw; ++i)
        if (memcmp(ec_w[i].copy, ec_w[i].p, ec_w[i].n) != 0) return i;
    return -1;
}
static TU_UNUSED void ec_saw(const char *fn)
{
    int i;
    for (i = 0; i < ec_nseen; ++i) if (strcmp(ec_seen[i], fn) == 0) return;
    if (ec_nseen < EC_MAX_SEEN) ec_seen[ec_nseen++] = fn;
}
static TU_UNUSED int ec_seen_fn(const char *fn)
{
    int i;
    for (i = 0; i < ec_nseen; ++i) if (strcmp(ec_seen[i], fn) == 0) return 1;
    return 0;
}
/* Junk in the caller's struct before the call: the report must replace it. */
static TU_UNUSED void ec_junk(mha_error *e)
{
    memset(e, 0, sizeof *e);
    e->status = MHA_ERR_IO;
    e->function = "junk_function";
    e->field = "junk_field";
    strcpy(e->message, "junk message");
}

/* A status by its enumerator's name, "MHA_ERR_IO" (mha_status_string's
   sentence lives in mha.h's implementation, which not every test has). */
static TU_UNUSED const char *ec_status_name(mha_status s)
{
    switch (s) {
#define EC_STATUS_NAME(name, msg) case name: return #name;
        MHA_STATUS_LIST(EC_STATUS_NAME)
#undef EC_STATUS_NAME
    default: return "(not an mha_status)";
    }
}

/* A refusal as the convention has it: the status s returned and
   e->status are want, e->function is function, e->field is field (NULL:
   the refusal names no field), and e->message starts "function: field: "
   ("function: " without a field) and holds says (NULL: anything). */
static TU_UNUSED int ec_refused(mha_status s, const mha_error *e, mha_status want, const char *function,
                                const char *field, const char *says)
{
    char head[128];
    if (s != want || e->status != want || !e->function || strcmp(e->function, function) != 0) return 0;
    if (field ? !e->field || strcmp(e->field, field) != 0 : e->field != NULL) return 0;
    if (field) snprintf(head, sizeof head, "%s: %s: ", function, field);
    else snprintf(head, sizeof head, "%s: ", function);
    return strncmp(e->message, head, strlen(head)) == 0 && (!says || strstr(e->message, says) != NULL);
}

/* Does the report say what a refusal of fn about field with status want
   must say?  why[n] gets the first difference. */
static TU_UNUSED const char *ec_name(const char *field) { return field ? field : "(any)"; }
static TU_UNUSED int ec_says(mha_status got, const mha_error *e, mha_status want, const char *fn,
                             const char *field, char *why, size_t n)
{
    char prefix[256];
    why[0] = '\0';
    if (got != want) {
        snprintf(why, n, "returned %s, want %s (message: %s)", ec_status_name(got), ec_status_name(want),
                 e->message);
        return 0;
    }
    if (e->status != want) { snprintf(why, n, "err.status %d, want %d", (int)e->status, (int)want); return 0; }
    if (!e->function || strcmp(e->function, fn) != 0) {
        snprintf(why, n, "err.function '%s', want '%s'", e->function ? e->function : "(null)", fn);
        return 0;
    }
    if (!e->field || (field && strcmp(e->field, field) != 0)) {
        snprintf(why, n, "err.field '%s', want '%s' (message: %s)", e->field ? e->field : "(null)",
                 field ? field : "(any)", e->message);
        return 0;
    }
    snprintf(prefix, sizeof prefix, "%s: %s: ", fn, e->field);
    if (strncmp(e->message, prefix, strlen(prefix)) != 0 || strlen(e->message) <= strlen(prefix)) {
        snprintf(why, n, "err.message '%s' does not start with '%s' and say more", e->message, prefix);
        return 0;
    }
    return 1;
}

#define EC_REFUSE(want, fn, field, call)                                                             \
    do {                                                                                             \
        mha_error ec_e_, *ERR = NULL;                                                                \
        mha_status ec_s_;                                                                            \
        int ec_c_;                                                                                   \
        char ec_why_[512];                                                                           \
        ec_arm();                                                                                    \
        ec_s_ = (call);                                                                              \
        ec_c_ = ec_changed();                                                                        \
        CHECK(ec_s_ == (want) && ec_c_ < 0, "%s / %s with err = NULL: returned %s, want %s%s",      \
              fn, ec_name(field), ec_status_name(ec_s_), ec_status_name(want),                       \
              ec_c_ >= 0 ? " (an output was written)" : "");                                         \
        ec_junk(&ec_e_);                                                                             \
        ERR = &ec_e_;                                                                                \
        ec_arm();                                                                                    \
        ec_s_ = (call);                                                                              \
        ec_c_ = ec_changed();                                                                        \
        CHECK(ec_says(ec_s_, &ec_e_, want, fn, field, ec_why_, sizeof ec_why_) && ec_c_ < 0,          \
              "%s / %s: %s%s", fn, ec_name(field), ec_why_,                      \
              ec_c_ >= 0 ? " (an output was written)" : "");                                         \
        ec_saw(fn);                                                                                  \
    } while (0)

#endif
