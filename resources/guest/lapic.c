#include "lapic.h"
#include "check.h"
#include "config.h"
#include "io.h"
#include "paging.h"
#include "print.h"
#include "tsc.h"

#define APIC_BASE_BSP    (1ULL << 8)
#define APIC_BASE_X2APIC (1ULL << 10)
#define APIC_BASE_ENABLE (1ULL << 11)
#define SVR_ENABLE       (1u << 8)

static u64 base = LAPIC_DEFAULT_BASE;

u64 lapic_base(void) { return base; }
u32 lapic_read(u32 reg) { return mmio_read32(base + reg); }
void lapic_write(u32 reg, u32 v) { mmio_write32(base + reg, v); }
u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }
void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

void lapic_init(void)
{
	u64 msr = rdmsr(MSR_IA32_APIC_BASE);
	u64 addr = msr & 0x000ffffffffff000ULL;

	if (msr & APIC_BASE_X2APIC)
		fail_msg("lapic: IA32_APIC_BASE says x2APIC mode, the guest drives the xAPIC");
	if (addr >= MAPPED_LIMIT) {
		fail_begin();
		put_str("lapic: base ");
		put_hex(addr);
		put_str(" is above 4 GiB");
		fail_end();
		return;
	}
	if (!(msr & APIC_BASE_ENABLE))
		wrmsr(MSR_IA32_APIC_BASE, msr | APIC_BASE_ENABLE);
	base = addr;
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | SVR_ENABLE | SPURIOUS_VECTOR);
}

bool lapic_send_ipi(u32 dest, u32 icr_lo)
{
	lapic_write(LAPIC_ICR_HI, dest << 24);
	lapic_write(LAPIC_ICR_LO, icr_lo);

	struct deadline d = deadline_ms(100);
	while (lapic_read(LAPIC_ICR_LO) & ICR_DELIV_PENDING) {
		if (deadline_passed(d))
			return false;
		cpu_relax();
	}
	return true;
}
