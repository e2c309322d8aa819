#include "irq.h"
#include "config.h"
#include "idt.h"
#include "io.h"
#include "lapic.h"

#define MAX_SHARED 4

struct handler {
	irq_handler_t fn;
	void *ctx;
};

extern const u64 irq_stub_table[]; /* irq_stubs.S: {vector, stub} pairs, {0, 0} */

static struct handler handlers[256][MAX_SHARED];
static u32 pending_events;

/* Re-initialise both 8259s (vectors 0x20-0x2f, never used) and mask every
 * line: the VMM's legacy devices must not reach the CPU through them. */
static void pic_mask_all(void)
{
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

void irq_init(void)
{
	pic_mask_all();
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED); /* ExtINT from the PIC */
	lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
	lapic_write(LAPIC_TPR, 0);
	for (const u64 *e = irq_stub_table; e[1]; e += 2)
		idt_set_gate((u8)e[0], e[1]);
}

bool irq_add_handler(u8 vector, irq_handler_t fn, void *ctx)
{
	for (int i = 0; i < MAX_SHARED; i++) {
		if (!handlers[vector][i].fn) {
			handlers[vector][i].ctx = ctx;
			handlers[vector][i].fn = fn;
			return true;
		}
	}
	return false;
}

void irq_dispatch(u64 vector)
{
	if (vector == SPURIOUS_VECTOR)
		return; /* no EOI for spurious interrupts */
	for (int i = 0; i < MAX_SHARED; i++) {
		struct handler *h = &handlers[vector & 0xff][i];
		if (h->fn)
			h->fn(h->ctx);
	}
	lapic_eoi();
}

void irq_raise(u32 events)
{
	__atomic_fetch_or(&pending_events, events, __ATOMIC_RELEASE);
}

u32 irq_wait_events(void)
{
	for (;;) {
		irq_disable();
		u32 ev = __atomic_exchange_n(&pending_events, 0, __ATOMIC_ACQUIRE);
		if (ev) {
			irq_enable();
			return ev;
		}
		/* sti takes effect after the next instruction: no interrupt can
		 * slip in between the check above and the hlt. */
		__asm__ volatile("sti; hlt" : : : "memory");
	}
}
