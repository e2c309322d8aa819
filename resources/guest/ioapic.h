/* The IOAPIC at 0xfec00000 (the address godwit's MP table names): routes
 * device interrupt pins to vectors on the BSP. */
#ifndef GUEST_IOAPIC_H
#define GUEST_IOAPIC_H

#include "types.h"

#define IOAPIC_DEFAULT_BASE 0xfec00000u

/* Mask every pin; report the IOAPIC version and pin count ("ioapic: ..."). */
void ioapic_init(void);
/* Edge-triggered, active-high (ISA IRQs in godwit's MP table), fixed
 * delivery to `apic_id`, unmasked. False if the pin does not exist. */
bool ioapic_route(u32 pin, u8 vector, u32 apic_id);
u32 ioapic_pin_count(void);

#endif
