#include "timer.h"
#include "config.h"
#include "io.h"
#include "irq.h"
#include "lapic.h"
#include "print.h"
#include "tsc.h"

#define PIT_HZ          1193182u
#define CALIBRATE_MS    10u
#define DIVIDE_BY_16    0x3u
#define ASSUMED_PER_MS  62500u /* KVM's 1 GHz APIC bus, divided by 16 */

#define PORT_PIT_CH2    0x42
#define PORT_PIT_CMD    0x43
#define PORT_SPEAKER    0x61
#define SPK_GATE2       0x01
#define SPK_DATA        0x02
#define SPK_OUT2        0x20

static u32 per_ms = ASSUMED_PER_MS;
static u32 tick_ms;
static u64 now_ms;     /* advanced by the interrupt handler */
static bool handler_set;

/* One measurement: the LAPIC timer counts down from ~0 while PIT channel 2
 * (mode 0) counts CALIBRATE_MS. The PIT's start and the moment its output
 * went high are each bracketed by LAPIC reads, so a vCPU that was scheduled
 * out (or slowed by emulation) at the wrong moment shows up as a wide
 * bracket instead of a wrong rate. Returns false if the PIT did not answer. */
static bool measure(u32 *rate, u32 *uncertainty)
{
	u16 count = (u16)(PIT_HZ * CALIBRATE_MS / 1000);
	u8 spk = inb(PORT_SPEAKER);
	bool done = false;
	u32 end_hi = 0, end_lo = 0;

	outb(PORT_SPEAKER, (u8)((spk & ~SPK_DATA) | SPK_GATE2));
	outb(PORT_PIT_CMD, 0xb0); /* channel 2, lobyte/hibyte, mode 0, binary */
	outb(PORT_PIT_CH2, (u8)count);
	lapic_write(LAPIC_TIMER_INIT, 0xffffffffu);
	u32 start_hi = lapic_read(LAPIC_TIMER_CUR);
	outb(PORT_PIT_CH2, (u8)(count >> 8)); /* counting starts */
	u32 start_lo = lapic_read(LAPIC_TIMER_CUR);

	/* Output still low at the inb after the read `low_seen`; high at the
	 * inb before the read `end_lo`. */
	u32 low_seen = start_lo;
	struct deadline d = deadline_ms(20 * CALIBRATE_MS);
	while (!deadline_passed(d)) {
		u32 c = lapic_read(LAPIC_TIMER_CUR);
		if (inb(PORT_SPEAKER) & SPK_OUT2) {
			end_lo = lapic_read(LAPIC_TIMER_CUR);
			end_hi = low_seen;
			done = true;
			break;
		}
		low_seen = c;
	}
	lapic_write(LAPIC_TIMER_INIT, 0);
	outb(PORT_SPEAKER, spk);
	if (!done)
		return false;
	/* The counter counts down: *_hi was read before *_lo. */
	u32 elapsed = (start_hi / 2 + start_lo / 2) - (end_hi / 2 + end_lo / 2);
	*rate = elapsed / CALIBRATE_MS;
	*uncertainty = (start_hi - start_lo) + (end_hi - end_lo);
	return true;
}

/* The first measurement within 0.5 %, else the best of up to 16 if it is
 * within 2 %; 0 if the PIT did not answer or the host was too busy to tell
 * (the vCPU scheduled out around the PIT's edges every time). */
static u32 calibrate(void)
{
	u32 best = 0, best_err = ~0u;

	for (int i = 0; i < 16; i++) {
		u32 m, err;
		if (!measure(&m, &err))
			return 0;
		if (err < best_err) {
			best = m;
			best_err = err;
		}
		if ((u64)best_err * 200 < (u64)best * CALIBRATE_MS)
			return best;
	}
	return (u64)best_err * 50 < (u64)best * CALIBRATE_MS ? best : 0;
}

void timer_calibrate(void)
{
	lapic_write(LAPIC_TIMER_DIV, DIVIDE_BY_16);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR); /* one-shot, masked */

	u32 m = calibrate();
	/* Plausible: 10 kHz .. 1 GHz after the divider. */
	bool ok = m >= 10 && m <= 1000000;
	if (ok)
		per_ms = m;

	print_lock();
	put_str("timer: lapic ");
	put_dec(per_ms);
	put_str(ok ? " ticks/ms (pit)\n" : " ticks/ms (assumed)\n");
	print_unlock();
}

static void timer_irq(void *ctx)
{
	(void)ctx;
	now_ms += tick_ms;
	irq_raise(EV_TIMER);
}

void timer_start(u32 ms)
{
	if ((u64)per_ms * ms > 0xffffffffu)
		ms = 0xffffffffu / per_ms;
	if (!handler_set)
		handler_set = irq_add_handler(TIMER_VECTOR, timer_irq, NULL);
	lapic_write(LAPIC_TIMER_INIT, 0); /* stop */
	tick_ms = ms;
	if (ms == 0) {
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
		return;
	}
	lapic_write(LAPIC_TIMER_DIV, DIVIDE_BY_16);
	lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR | LVT_TIMER_PERIODIC);
	lapic_write(LAPIC_TIMER_INIT, per_ms * ms);
}

u64 timer_now_ms(void) { return __atomic_load_n(&now_ms, __ATOMIC_RELAXED); }
u32 timer_tick_ms(void) { return tick_ms; }
