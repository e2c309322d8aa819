#include "traps.h"
#include "check.h"
#include "idt.h"
#include "io.h"
#include "print.h"

extern const u64 isr_table[32]; /* isr.S */

static const char *const names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "09", "#TS", "#NP",
	"#SS", "#GP", "#PF", "15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void traps_init(void)
{
	for (int v = 0; v < 32; v++)
		idt_set_gate((u8)v, isr_table[v]);
}

void traps_load(void)
{
	idt_load();
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
