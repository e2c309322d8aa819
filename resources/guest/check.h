/* Self-check bookkeeping and power off.
 *   fail_begin(); put_str("what "); put_hex(seen); fail_end();
 * prints "godwit-test-guest: check failed: what 0x..." as one locked line. */
#ifndef GUEST_CHECK_H
#define GUEST_CHECK_H

#include "types.h"

#define GUEST_PREFIX "godwit-test-guest: "

void fail_begin(void);
void fail_end(void);
void fail_msg(const char *what); /* a whole failure line without values */
u32 failure_count(void);

/* Print the verdict ("checks passed" / "checks FAILED"); true if passed. */
bool verdict(void);
/* Print the verdict ("checks passed" / "checks FAILED") and power off. */
NORETURN void finish(void);
/* Print "poweroff", reset through the i8042 (0x64 <- 0xfe), then hlt forever. */
NORETURN void poweroff(void);

#endif
