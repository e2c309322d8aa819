/* godwit.verify=<size> (K/M/G suffixes): the guest checks its own memory.
 *
 * A buffer of that size is rewritten page by page at godwit.verify_rate
 * pages/s with a pattern that encodes each sampled word's guest-physical
 * address and the page's generation, and re-read page by page at
 * godwit.verify_check_rate pages/s. Everything the check needs (buffer,
 * cursors, pass, counters) lives in guest memory, so it continues across
 * snapshot/restore and live migration and catches a page that came back
 * zero or stale. See README.md, "Memory verification". */
#ifndef GUEST_VERIFY_H
#define GUEST_VERIFY_H

#include "types.h"

/* Parse the command line words and allocate the buffer; prints
 * "serve: verify buffer=0x<gpa> pages=<n> rate=<r> check=<c> pages/s".
 * False if not asked. */
bool verify_init(void);
bool verify_active(void);
/* Rewrite and check the pages due in `elapsed_ms`. */
void verify_advance(u64 elapsed_ms);
/* Prints "verify: <pages> pages, <checked> checked, <mismatches> mismatches". */
void verify_report(void);

#endif
