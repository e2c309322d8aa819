#include "traps.h"
#include "check.h"
#include "config.h"
#include "io.h"
#include "print.h"

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

extern const u64 isr_table[32]; /* isr.S */

static struct idt_entry idt[32] __attribute__((aligned(16)));

static const char *const names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "09", "#TS", "#NP",
	"#SS", "#GP", "#PF", "15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void traps_init(void)
{
	for (int v = 0; v < 32; v++) {
		u64 h = isr_table[v];
		idt[v].off_lo = (u16)h;
		idt[v].sel = KERNEL_CS;
		idt[v].ist = 0;
		idt[v].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[v].off_mid = (u16)(h >> 16);
		idt[v].off_hi = (u32)(h >> 32);
		idt[v].zero = 0;
	}
}

void traps_load(void)
{
	struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(p));
}

void trap_handler(struct trap_frame *f)
{
	u32 a, b, c, d;

	cpuid(1, 0, &a, &b, &c, &d); /* initial APIC ID: works before paging/LAPIC set-up */
	/* Bounded: the fault may have happened with the print lock held. */
	print_lock_bounded();
	put_str(GUEST_PREFIX "check failed: exception ");
	put_dec(f->vector);
	if (f->vector < 32 && names[f->vector]) {
		put_char(' ');
		put_str(names[f->vector]);
	}
	put_str(" apic_id=");
	put_dec(b >> 24);
	put_str(" rip=");
	put_hex(f->rip);
	put_str(" err=");
	put_hex(f->error);
	put_str(" cr2=");
	put_hex(read_cr2());
	put_str(" rsp=");
	put_hex(f->rsp);
	put_str("\n" GUEST_PREFIX "checks FAILED\n" GUEST_PREFIX "poweroff\n");
	outb(0x64, 0xfe);
	halt_forever();
}
