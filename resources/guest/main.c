/* godwit test guest: boot report and self-checks, then what godwit.mode=
 * asks for (modes.c): power off, or serve the network forever. */
#include "bootparams.h"
#include "check.h"
#include "cmdline.h"
#include "io.h"
#include "lapic.h"
#include "modes.h"
#include "mptable.h"
#include "paging.h"
#include "print.h"
#include "serial.h"
#include "smp.h"
#include "traps.h"
#include "tsc.h"

#define DEFAULT_AP_TIMEOUT_MS 2000

void kmain(u64 zero_page);

void kmain(u64 zero_page)
{
	serial_init();
	println(GUEST_PREFIX "booting");
	traps_init();
	traps_load();
	paging_init();
	tsc_init();

	bootparams_check(zero_page);
	const struct mp_config *mp = mptable_scan();

	lapic_init();
	u32 bsp = lapic_id();
	print_lock();
	put_str("cpu 0: bsp apic_id=");
	put_dec(bsp);
	put_char('\n');
	print_unlock();

	smp_boot(mp, bsp, cmdline_u64("godwit.ap_timeout_ms", DEFAULT_AP_TIMEOUT_MS));
	modes_run();
}

void ap_main(u32 cpu)
{
	print_lock();
	put_str("cpu ");
	put_dec(cpu);
	put_str(": online apic_id=");
	put_dec(lapic_id());
	put_char('\n');
	print_unlock();
	smp_mark_online(cpu);
	halt_forever();
}
