#include "mem.h"
#include "bootparams.h"
#include "string.h"

#define RAM_LIMIT (3ULL << 30) /* 3-4 GiB is mapped uncached (devices) */

extern char __image_end[];

static u64 next, end;

/* The usable e820 range holding the end of the image, or else the largest
 * usable range above it. */
void mem_init(void)
{
	u32 n;
	const struct e820_entry *e = e820_entries(&n);
	u64 from = ((u64)__image_end + PAGE_SIZE - 1) & ~(u64)(PAGE_SIZE - 1);

	next = end = 0;
	for (u32 i = 0; i < n; i++) {
		if (e[i].type != E820_USABLE)
			continue;
		u64 a = e[i].addr, b = e[i].addr + e[i].size;
		if (b > RAM_LIMIT)
			b = RAM_LIMIT;
		if (a < from)
			a = from;
		if (b > a && b - a > end - next) {
			next = a;
			end = b;
		}
	}
}

void *mem_alloc_raw(u64 size, u64 align)
{
	u64 a = (next + align - 1) & ~(align - 1);

	if (a < next || a > end || size > end - a)
		return NULL;
	next = a + size;
	return (void *)a;
}

void *mem_alloc(u64 size, u64 align)
{
	void *p = mem_alloc_raw(size, align);

	if (p)
		memset(p, 0, size);
	return p;
}

u64 mem_available(u64 align)
{
	u64 a = (next + align - 1) & ~(align - 1);
	return a < end ? end - a : 0;
}
