/* Intel MultiProcessor Specification 1.4 tables (floating pointer "_MP_" and
 * configuration table "PCMP"). */
#ifndef GUEST_MPTABLE_H
#define GUEST_MPTABLE_H

#include "config.h"
#include "types.h"

#define MP_CPU_ENABLED 0x01
#define MP_CPU_BSP     0x02

struct mp_cpu {
	u8 apic_id;
	u8 flags;
};

struct mp_config {
	bool found;
	u64 fp_addr;      /* floating pointer structure */
	u64 table_addr;   /* configuration table */
	u32 lapic_addr;
	u32 ncpus;        /* enabled processor entries kept in cpus[] */
	int bsp;          /* index in cpus[] of the (first) BSP entry, -1 if none */
	struct mp_cpu cpus[MAX_CPUS];
};

/* Find, verify and print ("mptable: N cpus") the MP table. Checks: checksums,
 * signatures, entry layout, exactly one BSP, no duplicate APIC IDs. */
const struct mp_config *mptable_scan(void);

#endif
