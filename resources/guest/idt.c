#include "idt.h"
#include "config.h"

struct idt_entry {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off_mid;
	u32 off_hi;
	u32 zero;
} __attribute__((packed));

struct idt_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));

void idt_set_gate(u8 vector, u64 h)
{
	struct idt_entry *e = &idt[vector];

	e->off_lo = (u16)h;
	e->sel = KERNEL_CS;
	e->ist = 0;
	e->type = 0x8e; /* present, DPL 0, 64-bit interrupt gate (clears IF) */
	e->off_mid = (u16)(h >> 16);
	e->off_hi = (u32)(h >> 32);
	e->zero = 0;
}

void idt_load(void)
{
	struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(p));
}
