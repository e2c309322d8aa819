#include "crash.h"
#include "cmdline.h"
#include "print.h"

/* crash_insn.S */
NORETURN void crash_triple_fault(void);
NORETURN void crash_sse_movd_xmm0(void);
extern const char crash_triple_fault_ud2[];

static void announce(const char *kind, const void *rip)
{
	print_lock();
	put_str("crash: ");
	put_str(kind);
	put_str(" rip=");
	put_hex((u64)rip);
	put_char('\n');
	print_unlock();
}

void crash_if_asked(void)
{
	struct str v;

	if (!cmdline_value("godwit.crash", &v))
		return;
	if (str_eq(v, "triple")) {
		announce("triple-fault", crash_triple_fault_ud2);
		crash_triple_fault();
	}
	if (str_eq(v, "sse")) {
		announce("sse", (const void *)crash_sse_movd_xmm0);
		crash_sse_movd_xmm0();
	}
	print_lock();
	put_str("crash: unknown godwit.crash=");
	put_strn_printable(v.p, v.len);
	put_str(", ignored\n");
	print_unlock();
}
