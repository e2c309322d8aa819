/* Local APIC in xAPIC (MMIO) mode. */
#ifndef GUEST_LAPIC_H
#define GUEST_LAPIC_H

#include "types.h"

#define LAPIC_DEFAULT_BASE 0xfee00000u

#define LAPIC_ID      0x020
#define LAPIC_VERSION 0x030
#define LAPIC_SVR     0x0f0
#define LAPIC_TPR     0x080
#define LAPIC_EOI     0x0b0
#define LAPIC_ICR_LO  0x300
#define LAPIC_ICR_HI  0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR  0x390
#define LAPIC_TIMER_DIV  0x3e0

#define LVT_MASKED         (1u << 16)
#define LVT_TIMER_PERIODIC (1u << 17)

#define ICR_DM_INIT       (5u << 8)
#define ICR_DM_STARTUP    (6u << 8)
#define ICR_DELIV_PENDING (1u << 12)
#define ICR_LEVEL_ASSERT  (1u << 14)
#define ICR_TRIGGER_LEVEL (1u << 15)

/* BSP: find the LAPIC through IA32_APIC_BASE, make sure it is enabled
 * (globally and in the SVR). Reports failures through fail_*(). */
void lapic_init(void);
u64 lapic_base(void);
u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
u32 lapic_id(void); /* this CPU's xAPIC ID */
void lapic_eoi(void);

/* Send an IPI and wait (bounded) for the delivery status to clear. */
bool lapic_send_ipi(u32 dest_apic_id, u32 icr_lo);

#endif
