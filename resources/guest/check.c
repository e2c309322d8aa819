#include "check.h"
#include "io.h"
#include "print.h"

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

void poweroff(void)
{
	println(GUEST_PREFIX "poweroff");
	outb(0x64, 0xfe); /* i8042 "pulse reset line": Linux reboot=k */
	halt_forever();
}
