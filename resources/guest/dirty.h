/* godwit.dirty=<KiB>:<pages_per_s> (KiB, or a size with a K/M/G suffix):
 * write one byte per 4 KiB page of a
 * buffer of that size, cycling through it at that rate, driven by the timer
 * tick (live migration tests use it to dirty memory at a known rate). */
#ifndef GUEST_DIRTY_H
#define GUEST_DIRTY_H

#include "types.h"

/* Parse the command line word and allocate the buffer; prints
 * "serve: dirty buffer=<KiB> KiB rate=<n> pages/s". False if not asked. */
bool dirty_init(void);
bool dirty_active(void);
void dirty_advance(u64 elapsed_ms);
u64 dirty_pages_written(void);
/* Prints "dirty: <pages written>". */
void dirty_report(void);

#endif
