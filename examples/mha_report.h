/* mha_report.h - mha.h's error convention for the companion headers.   v1.0.0

   Internal: safetensors.h, npy.h, heatmap.h, attn_inspect.h and gpt_ckpt.h
   include it to fill an mha_error the way mha.h's own calls do, without
   needing mha.h's implementation (mha.h gives the types mha_status and
   mha_error; nothing here calls into it).  Not an interface of its own:
   every name is mha_report__*, every function static (a copy per file,
   silent where unused), and it is installed next to the companions only
   because they include it.

   THE CONVENTION  a refused call returns its status and, when the caller
   passed an mha_error, fills it: status, function (the public call),
   field (the argument or struct field refused, or NULL) and the message
   "function: field: what was expected, what was found".

   TWO WAYS TO USE IT
     Collect, then sign (checks deep inside report the first refusal; the
     public call names itself once, at its exit):
         mha_error local, *e = mha_report__begin(err, &local);
         if (mha_report__need(e, "path", path) == 0) do_it(path, e);
         return mha_report__end(e, "mha_x_load");
     where do_it returns mha_report__fail(e, MHA_ERR_FORMAT, "magic",
     "not a .x file") (which is -1) on a refusal.  The first refusal wins:
     a later fail leaves the report alone, so a caller's cleanup may fail
     again without hiding the cause.
     Sign at once (a call that refuses where it checks, or that replaces
     a report a callee filled):
         mha_report__clear(err);
         if (n < 1) return mha_report__sign(err, "gpt_x", MHA_ERR_INVALID_SIZE, "n", "is %d", n);

   Every refusal gives a detail (the format is required, never empty):
   mha.h falls back to mha_status_string's sentence, which lives in its
   implementation, and the companions do not need that.

   LICENSE  MIT or public domain, as mha.h.
*/
#ifndef MHA_REPORT_H
#define MHA_REPORT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "mha.h"

#if defined(__GNUC__) || defined(__clang__)
#define MHA_REPORT__FN static __attribute__((unused))
#define MHA_REPORT__PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define MHA_REPORT__FN static
#define MHA_REPORT__PRINTF(fmt, args)
#endif

/* A long path in a message keeps its last this many bytes: the file name is
   at the end, and the reason after it must still fit the message. */
#define MHA_REPORT__PATH_TAIL 160

/* A clean report (status MHA_OK, no function, no field, no message);
   e may be NULL. */
MHA_REPORT__FN void mha_report__clear(mha_error *e)
{
    if (!e) return;
    e->status = MHA_OK;
    e->function = NULL;
    e->field = NULL;
    e->message[0] = '\0';
}

/* At a public call's entry: the caller's report, or the local one when the
   caller passed NULL, cleared.  Never NULL, so the checks need not ask. */
MHA_REPORT__FN mha_error *mha_report__begin(mha_error *err, mha_error *local)
{
    mha_error *e = err ? err : local;
    mha_report__clear(e);
    return e;
}

/* The status, field and detail, unsigned (the function comes at the end). */
MHA_REPORT__PRINTF(4, 0)
MHA_REPORT__FN void mha_report__set(mha_error *e, mha_status s, const char *field, const char *fmt, va_list ap)
{
    e->status = s;
    e->field = field;
    vsnprintf(e->message, sizeof e->message, fmt, ap);
}

/* A refusal: status, field and what was expected and found (printf-style).
   Only the first refusal of a call is recorded.  Returns -1, so that a
   check reads `return mha_report__fail(...)` in a function returning 0 or -1. */
MHA_REPORT__PRINTF(4, 5)
MHA_REPORT__FN int mha_report__fail(mha_error *e, mha_status s, const char *field, const char *fmt, ...)
{
    va_list ap;
    if (e->status != MHA_OK) return -1;
    va_start(ap, fmt);
    mha_report__set(e, s, field, fmt, ap);
    va_end(ap);
    return -1;
}

/* Append src to dst[cap] at *len, cutting what does not fit (a long
   message keeps its start: the function and the field). */
MHA_REPORT__FN void mha_report__cat(char *dst, size_t cap, size_t *len, const char *src)
{
    while (*src && *len + 1 < cap) dst[(*len)++] = *src++;
    dst[*len] = '\0';
}

/* At a public call's exit: the status, and on a refusal the function's
   name and the message "function: field: detail" ("function: detail"
   without a field). */
MHA_REPORT__FN mha_status mha_report__end(mha_error *e, const char *function)
{
    char detail[sizeof e->message];
    size_t n = 0;
    if (e->status == MHA_OK) return MHA_OK;
    memcpy(detail, e->message, sizeof detail);
    e->function = function;
    mha_report__cat(e->message, sizeof e->message, &n, function);
    mha_report__cat(e->message, sizeof e->message, &n, ": ");
    if (e->field) {
        mha_report__cat(e->message, sizeof e->message, &n, e->field);
        mha_report__cat(e->message, sizeof e->message, &n, ": ");
    }
    mha_report__cat(e->message, sizeof e->message, &n, detail);
    return e->status;
}

/* A refusal signed at once: fills *e (when e is not NULL) with status s,
   replacing whatever it held, and returns s. */
MHA_REPORT__PRINTF(5, 6)
MHA_REPORT__FN mha_status mha_report__sign(mha_error *e, const char *function, mha_status s, const char *field,
                                           const char *fmt, ...)
{
    va_list ap;
    if (!e) return s;
    va_start(ap, fmt);
    mha_report__set(e, s, field, fmt, ap);
    va_end(ap);
    return mha_report__end(e, function);
}

/* A pointer argument that must not be NULL, by name: 0, or -1 refused. */
MHA_REPORT__FN int mha_report__need(mha_error *e, const char *field, const void *p)
{
    return p ? 0 : mha_report__fail(e, MHA_ERR_NULL_POINTER, field, "is NULL");
}

/* A size argument that must be >= 1: 0, or -1 refused. */
MHA_REPORT__FN int mha_report__size(mha_error *e, const char *field, int v)
{
    return v >= 1 ? 0 : mha_report__fail(e, MHA_ERR_INVALID_SIZE, field, "is %d; expected >= 1", v);
}

/* A path as a message shows it: its last MHA_REPORT__PATH_TAIL bytes, with
   *ellipsis "..." when that cut something, else "".  Print "%s%s",
   ellipsis, tail. */
MHA_REPORT__FN const char *mha_report__tail(const char *path, const char **ellipsis)
{
    size_t n = strlen(path);
    *ellipsis = n > MHA_REPORT__PATH_TAIL ? "..." : "";
    return n > MHA_REPORT__PATH_TAIL ? path + n - MHA_REPORT__PATH_TAIL : path;
}

/* The operating system's reason for errno value why; otherwise when there
   is none (why <= 0: the call failed without setting errno). */
MHA_REPORT__FN const char *mha_report__reason(int why, const char *otherwise)
{
    return why > 0 ? strerror(why) : otherwise;
}

/* The system refused an operation on a file: MHA_ERR_IO on the field
   "path", with the message "what 'path': reason" (e.g. "cannot open
   'x.npy': No such file or directory").  why: errno read right after the
   call that failed; otherwise: the reason to give without one. */
MHA_REPORT__FN int mha_report__io(mha_error *e, const char *what, const char *path, int why,
                                  const char *otherwise)
{
    const char *dots, *shown = mha_report__tail(path, &dots);
    return mha_report__fail(e, MHA_ERR_IO, "path", "%s '%s%s': %s", what, dots, shown,
                            mha_report__reason(why, otherwise));
}

#endif /* MHA_REPORT_H */
