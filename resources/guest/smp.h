/* Application processor start-up: INIT, SIPI, SIPI through the xAPIC ICR,
 * trampoline at TRAMP_BASE (trampoline.S). */
#ifndef GUEST_SMP_H
#define GUEST_SMP_H

#include "mptable.h"
#include "types.h"

/* cpu 0 is the BSP; the other enabled MP-table processors get 1..n-1 in table
 * order. Starts them one at a time, waits up to `ap_timeout_ms` for each,
 * reports the ones that did not come up, then prints "smp: X of N cpus online". */
void smp_boot(const struct mp_config *mp, u32 bsp_apic_id, u64 ap_timeout_ms);

/* Called by ap_main() once the AP has announced itself. */
void smp_mark_online(u32 cpu);
u32 smp_online_count(void);
u32 smp_cpu_count(void);
u32 smp_apic_id(u32 cpu);

/* 64-bit entry from the trampoline: `slot` only picks the stack. */
NORETURN void ap_start(u32 slot);
/* In main.c: what an AP does once it runs C code on its own stack. */
NORETURN void ap_main(u32 cpu);

#endif
