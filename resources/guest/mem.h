/* Memory for rings, packet buffers and the dirty buffer: a bump allocator
 * over the usable e820 RAM after the guest image (below 3 GiB, where the
 * guest maps RAM write-back). Nothing is ever freed. */
#ifndef GUEST_MEM_H
#define GUEST_MEM_H

#include "types.h"

#define PAGE_SIZE 4096u

void mem_init(void);
/* `size` bytes aligned to `align` (a power of two), zero-filled; NULL if the
 * RAM is used up. */
void *mem_alloc(u64 size, u64 align);
/* Same without zeroing (for the dirty buffer). */
void *mem_alloc_raw(u64 size, u64 align);
u64 mem_available(u64 align);

#endif
