/* The interrupt descriptor table: all 256 vectors, shared by every CPU.
 * Gates not set are not present (a stray vector then faults with #NP). */
#ifndef GUEST_IDT_H
#define GUEST_IDT_H

#include "types.h"

void idt_set_gate(u8 vector, u64 handler); /* 64-bit interrupt gate, DPL 0 */
void idt_load(void);                        /* lidt on this CPU */

#endif
