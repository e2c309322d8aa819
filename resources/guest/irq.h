/* External interrupts on the BSP: 8259 PIC masked, LAPIC LINT0 masked, the
 * stubs of irq_stubs.S in the IDT, handlers per vector, and the idle loop's wait.
 *
 * Handlers run with interrupts off and should only note what happened
 * (irq_raise) for the main loop; irq_dispatch sends the EOI. */
#ifndef GUEST_IRQ_H
#define GUEST_IRQ_H

#include "types.h"

/* Event bits for irq_raise / irq_wait_events. */
#define EV_TIMER (1u << 0)
#define EV_NET   (1u << 1)

typedef void (*irq_handler_t)(void *ctx);

void irq_init(void);
/* Several handlers may share a vector (shared IOAPIC pins); up to 4. */
bool irq_add_handler(u8 vector, irq_handler_t fn, void *ctx);
void irq_raise(u32 events);
/* Sleep (sti; hlt) until an event is raised; returns and clears the events.
 * Interrupts are on when it returns. */
u32 irq_wait_events(void);

static inline void irq_disable(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void irq_enable(void) { __asm__ volatile("sti" : : : "memory"); }

/* Called from irq_stubs.S. */
void irq_dispatch(u64 vector);

#endif
