#include "check.h"
#include "cmdline.h"
#include "io.h"
#include "print.h"
#include "tsc.h"

static u32 failures;

void fail_begin(void)
{
	print_lock();
	put_str(GUEST_PREFIX "check failed: ");
}

void fail_end(void)
{
	put_char('\n');
	__atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
	print_unlock();
}

void fail_msg(const char *what)
{
	fail_begin();
	put_str(what);
	fail_end();
}

u32 failure_count(void)
{
	return __atomic_load_n(&failures, __ATOMIC_RELAXED);
}

bool verdict(void)
{
	bool ok = failure_count() == 0;

	println(ok ? GUEST_PREFIX "checks passed" : GUEST_PREFIX "checks FAILED");
	return ok;
}

void finish(void)
{
	verdict();
	poweroff();
}

#define DEBUG_EXIT_PORT 0xf4
#define DEBUG_EXIT_GRACE_US 500000
#define PVPANIC_PORT 0x505
#define PVPANIC_PANICKED 0x01

/* godwit.panic=1: report a panic through pvpanic, as Linux's driver does
 * (read which events the host handles, then write "panicked"). */
static void pvpanic_if_asked(void)
{
	if (cmdline_u64("godwit.panic", 0) == 0)
		return;
	u8 events = inb(PVPANIC_PORT);
	print_lock();
	put_str(GUEST_PREFIX "pvpanic: host handles events ");
	put_hex(events);
	put_char('\n');
	print_unlock();
	if (events != 0xff && (events & PVPANIC_PANICKED)) { /* 0xff: no device */
		/* A panicked guest stops, as Linux does: godwit ends the VM. */
		outb(PVPANIC_PORT, PVPANIC_PANICKED);
		halt_forever();
	}
}

/* godwit.exit=N: end the VM through QEMU's isa-debug-exit (godwit --debug-exit
 * then exits with (N << 1) | 1). Without the device the write goes nowhere
 * and the i8042 reset below ends the VM as usual. */
static void debug_exit_if_asked(void)
{
	struct str v;

	if (!cmdline_value("godwit.exit", &v))
		return;
	u32 n = (u32)cmdline_u64("godwit.exit", 0);
	print_lock();
	put_str(GUEST_PREFIX "debug-exit ");
	put_dec(n);
	put_char('\n');
	print_unlock();
	outl(DEBUG_EXIT_PORT, n);
	/* godwit stops the vCPUs from another thread: give it the time, so that
	 * the fallback below only runs when there was no device. */
	udelay(DEBUG_EXIT_GRACE_US);
}

void poweroff(void)
{
	pvpanic_if_asked();
	debug_exit_if_asked();
	println(GUEST_PREFIX "poweroff");
	outb(0x64, 0xfe); /* i8042 "pulse reset line": Linux reboot=k */
	halt_forever();
}
