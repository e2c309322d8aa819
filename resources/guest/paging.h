/* The guest's own page tables: 0-4 GiB identity-mapped with 2 MiB pages,
 * 3-4 GiB (LAPIC, IOAPIC, virtio-mmio) uncached. */
#ifndef GUEST_PAGING_H
#define GUEST_PAGING_H

#include "types.h"

#define MAPPED_LIMIT (4ULL << 30)

void paging_init(void); /* build the tables and load CR3 (BSP) */
u64 paging_root(void);  /* physical address of the PML4 (< 4 GiB, for the APs) */

#endif
