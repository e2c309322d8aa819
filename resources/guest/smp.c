#include "smp.h"
#include "check.h"
#include "config.h"
#include "io.h"
#include "lapic.h"
#include "paging.h"
#include "print.h"
#include "string.h"
#include "traps.h"
#include "tsc.h"

extern const char trampoline_start[], trampoline_end[];
extern char cpu_stacks[];
extern void load_gdt(void);

static u32 ncpus = 1;
static u8 cpu_apic[MAX_CPUS];
static u8 cpu_online[MAX_CPUS];
static u32 online_count = 1;

u32 smp_cpu_count(void) { return ncpus; }
u32 smp_apic_id(u32 cpu) { return cpu_apic[cpu]; }
u32 smp_online_count(void) { return __atomic_load_n(&online_count, __ATOMIC_ACQUIRE); }

void smp_mark_online(u32 cpu)
{
	__atomic_fetch_add(&online_count, 1, __ATOMIC_RELEASE); /* lock xadd */
	__atomic_store_n(&cpu_online[cpu], 1, __ATOMIC_RELEASE);
}

static void setup_trampoline(void)
{
	size_t size = (size_t)(trampoline_end - trampoline_start);
	u64 cr3 = paging_root();

	memcpy((void *)TRAMP_BASE, trampoline_start, size);
	*(volatile u32 *)TRAMP_PARAM_CR3 = (u32)cr3;
	*(volatile u32 *)TRAMP_PARAM_SLOT = 0;
	*(volatile u64 *)TRAMP_PARAM_STACKS = (u64)cpu_stacks;
	*(volatile u64 *)TRAMP_PARAM_ENTRY = (u64)ap_start;
}

static void ipi_fail(u32 cpu, const char *what)
{
	fail_begin();
	put_str("smp: cpu ");
	put_dec(cpu);
	put_str(" apic_id=");
	put_dec(cpu_apic[cpu]);
	put_str(": ");
	put_str(what);
	fail_end();
}

/* INIT, then two STARTUPs, as in the MP spec B.4 (with short delays). */
static void wake_ap(u32 cpu)
{
	u32 id = cpu_apic[cpu];

	if (!lapic_send_ipi(id, ICR_DM_INIT | ICR_LEVEL_ASSERT | ICR_TRIGGER_LEVEL))
		ipi_fail(cpu, "INIT assert stuck in delivery");
	udelay(10);
	if (!lapic_send_ipi(id, ICR_DM_INIT | ICR_TRIGGER_LEVEL))
		ipi_fail(cpu, "INIT de-assert stuck in delivery");
	udelay(10);
	for (int i = 0; i < 2; i++) {
		if (__atomic_load_n(&cpu_online[cpu], __ATOMIC_ACQUIRE))
			break;
		if (!lapic_send_ipi(id, ICR_DM_STARTUP | TRAMP_SIPI_VECTOR))
			ipi_fail(cpu, "STARTUP stuck in delivery");
		udelay(200);
	}
}

static bool build_cpu_list(const struct mp_config *mp, u32 bsp_apic_id)
{
	cpu_apic[0] = (u8)bsp_apic_id;
	ncpus = 1;
	if (!mp->found || mp->bsp < 0)
		return false;

	if (mp->cpus[mp->bsp].apic_id != bsp_apic_id) {
		fail_begin();
		put_str("smp: mptable BSP apic_id=");
		put_dec(mp->cpus[mp->bsp].apic_id);
		put_str(" but the boot cpu has apic_id=");
		put_dec(bsp_apic_id);
		fail_end();
	}
	if (mp->lapic_addr != lapic_base()) {
		fail_begin();
		put_str("smp: mptable lapic address ");
		put_hex(mp->lapic_addr);
		put_str(" differs from IA32_APIC_BASE ");
		put_hex(lapic_base());
		fail_end();
	}
	for (u32 i = 0; i < mp->ncpus; i++) {
		u8 id = mp->cpus[i].apic_id;
		if (id == bsp_apic_id)
			continue;
		if (id == 0xff) {
			fail_msg("smp: mptable lists apic_id=255 (broadcast), skipped");
			continue;
		}
		cpu_apic[ncpus++] = id;
	}
	return true;
}

void smp_boot(const struct mp_config *mp, u32 bsp_apic_id, u64 ap_timeout_ms)
{
	u32 expected = mp->found ? mp->ncpus : 1;

	if (build_cpu_list(mp, bsp_apic_id) && ncpus > 1) {
		setup_trampoline();
		for (u32 cpu = 1; cpu < ncpus; cpu++) {
			wake_ap(cpu);
			struct deadline d = deadline_ms(ap_timeout_ms);
			while (!__atomic_load_n(&cpu_online[cpu], __ATOMIC_ACQUIRE) && !deadline_passed(d))
				cpu_relax();
		}
		for (u32 cpu = 1; cpu < ncpus; cpu++) {
			if (__atomic_load_n(&cpu_online[cpu], __ATOMIC_ACQUIRE))
				continue;
			fail_begin();
			put_str("smp: cpu ");
			put_dec(cpu);
			put_str(" apic_id=");
			put_dec(cpu_apic[cpu]);
			put_str(" did not come online within ");
			put_dec(ap_timeout_ms);
			put_str(" ms");
			fail_end();
		}
	}

	u32 online = smp_online_count();
	print_lock();
	put_str("smp: ");
	put_dec(online);
	put_str(" of ");
	put_dec(expected);
	put_str(" cpus online\n");
	print_unlock();
	if (online != expected) {
		fail_begin();
		put_str("smp: ");
		put_dec(online);
		put_str(" of ");
		put_dec(expected);
		put_str(" cpus online");
		fail_end();
	}
}

static int cpu_index(u32 apic_id)
{
	for (u32 i = 1; i < ncpus; i++)
		if (cpu_apic[i] == apic_id)
			return (int)i;
	return -1;
}

void ap_start(u32 slot)
{
	(void)slot;
	load_gdt();
	traps_load();

	u32 id = lapic_id();
	int cpu = cpu_index(id);
	if (cpu < 0 || __atomic_load_n(&cpu_online[cpu], __ATOMIC_ACQUIRE)) {
		fail_begin();
		put_str("smp: unexpected cpu apic_id=");
		put_dec(id);
		put_str(cpu < 0 ? " started (not in the mptable)" : " started twice");
		fail_end();
		halt_forever();
	}
	ap_main((u32)cpu);
}
