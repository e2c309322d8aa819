#include "tsc.h"
#include "io.h"

/* Without a reported frequency assume a fast TSC (4 GHz): waits then last
 * at least as long as asked, longer on slower TSCs. */
#define ASSUMED_TICKS_PER_MS 4000000ULL

static u64 ticks_per_ms = ASSUMED_TICKS_PER_MS;
static bool freq_known;

void tsc_init(void)
{
	u32 a, b, c, d, max;

	cpuid(0, 0, &max, &b, &c, &d);
	cpuid(1, 0, &a, &b, &c, &d);
	if (c & (1u << 31)) {
		/* Hypervisor leaf 0x40000010: TSC frequency in kHz (VMware/KVM convention). */
		u32 hmax;
		cpuid(0x40000000, 0, &hmax, &b, &c, &d);
		if (hmax >= 0x40000010 && hmax < 0x40010000) {
			cpuid(0x40000010, 0, &a, &b, &c, &d);
			if (a) {
				ticks_per_ms = a;
				freq_known = true;
				return;
			}
		}
	}
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d); /* TSC = crystal (ecx) * ebx / eax */
		if (a && b && c) {
			ticks_per_ms = (u64)c * b / a / 1000;
			freq_known = true;
			return;
		}
	}
	if (max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d); /* base frequency in MHz */
		if (a & 0xffff) {
			ticks_per_ms = (u64)(a & 0xffff) * 1000;
			freq_known = true;
		}
	}
}

u64 tsc_ticks_per_ms(void) { return ticks_per_ms; }
bool tsc_freq_known(void) { return freq_known; }

void udelay(u64 us)
{
	u64 start = rdtsc(), ticks = ticks_per_ms * us / 1000;

	while (rdtsc() - start < ticks)
		cpu_relax();
}

struct deadline deadline_ms(u64 ms)
{
	struct deadline d = { rdtsc() + ms * ticks_per_ms };
	return d;
}

bool deadline_passed(struct deadline d)
{
	return (s64)(rdtsc() - d.end) >= 0;
}
