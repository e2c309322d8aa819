#include "paging.h"
#include "io.h"

#define PTE_P   (1ULL << 0)
#define PTE_RW  (1ULL << 1)
#define PTE_PWT (1ULL << 3)
#define PTE_PCD (1ULL << 4)
#define PTE_PS  (1ULL << 7)

#define PAGE_2M (2ULL << 20)
#define UNCACHED_FROM (3ULL << 30)

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[4 * 512] __attribute__((aligned(4096))); /* one page directory per GiB */

void paging_init(void)
{
	/* .bss is zeroed by start.S, so only the present entries are written. */
	for (u64 i = 0; i < ARRAY_SIZE(pd); i++) {
		u64 addr = i * PAGE_2M;
		u64 flags = PTE_P | PTE_RW | PTE_PS;
		if (addr >= UNCACHED_FROM)
			flags |= PTE_PCD | PTE_PWT;
		pd[i] = addr | flags;
	}
	for (u64 g = 0; g < 4; g++)
		pdpt[g] = (u64)&pd[g * 512] | PTE_P | PTE_RW;
	pml4[0] = (u64)pdpt | PTE_P | PTE_RW;
	write_cr3((u64)pml4);
}

u64 paging_root(void)
{
	return (u64)pml4;
}
