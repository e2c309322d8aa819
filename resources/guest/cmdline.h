/* Kernel command line words: `key=value`, `key="value with spaces"`, bare `key`.
 * Words are separated by spaces/tabs/newlines; the last occurrence of a key wins
 * (as in Linux). */
#ifndef GUEST_CMDLINE_H
#define GUEST_CMDLINE_H

#include "types.h"

struct str {
	const char *p;
	size_t len;
};

/* The command line found by bootparams_check(); "" if none. */
const char *cmdline_get(void);
void cmdline_set(const char *s);

/* Value of `key=...` in `cmdline`. Returns false if the key is absent. A bare
 * `key` yields true with an empty value. */
bool cmdline_find(const char *cmdline, const char *key, struct str *value);
/* Every occurrence of `key` on the boot command line, in order: start with
 * *cursor = NULL; returns false after the last one. */
bool cmdline_next(const char **cursor, const char *key, struct str *value);
/* Same as cmdline_find, on the boot command line. */
bool cmdline_value(const char *key, struct str *value);
/* Decimal value of `key=N`, or `dflt` if absent or not a number. */
u64 cmdline_u64(const char *key, u64 dflt);
bool str_eq(struct str s, const char *lit);

#endif
