#include "serve.h"
#include "check.h"
#include "cmdline.h"
#include "dirty.h"
#include "heartbeat.h"
#include "ioapic.h"
#include "irq.h"
#include "mem.h"
#include "print.h"
#include "net/udp_echo.h"
#include "timer.h"
#include "udp_burst.h"
#include "verify.h"
#include "virtio_net.h"

#define DEFAULT_HEARTBEAT_MS 1000
#define FINE_TICK_MS 10 /* when dirtying, verifying or bursting */

static u64 poweroff_after;
static u64 heartbeat_ms;
static u32 tick_ms;

static void after_heartbeat(u64 n)
{
	if (dirty_active())
		dirty_report();
	if (verify_active())
		verify_report();
	if (n % 10 == 0)
		virtio_net_report();
	virtio_net_check_all();
	if (poweroff_after && n >= poweroff_after)
		poweroff();
}

/* The heartbeat period, or a finer tick while dirtying, verifying or bursting. */
static u32 choose_tick_ms(void)
{
	u64 tick = heartbeat_ms;

	if ((dirty_active() || verify_active() || udp_burst_active()) &&
	    (tick == 0 || tick > FINE_TICK_MS))
		tick = FINE_TICK_MS;
	return tick > 0xffffffffu ? 0xffffffffu : (u32)tick;
}

void serve_run(void)
{
	heartbeat_ms = cmdline_u64("godwit.heartbeat_ms", DEFAULT_HEARTBEAT_MS);
	poweroff_after = cmdline_u64("godwit.poweroff_after", 0);

	irq_init();
	ioapic_init();
	timer_calibrate();
	mem_init();
	udp_echo_init();
	virtio_net_init_all();
	udp_burst_init();
	verify_init();
	dirty_init(); /* last: it may take most of the free memory */
	heartbeat_init(heartbeat_ms, after_heartbeat);
	println("serve: ready");
	tick_ms = choose_tick_ms();
	timer_start(tick_ms);

	u64 last_ms = 0;
	for (;;) {
		u32 ev = irq_wait_events();
		if (ev & EV_NET)
			virtio_net_poll_all();
		if (ev & EV_TIMER) {
			u64 now = timer_now_ms(), elapsed = now - last_ms;
			last_ms = now;
			dirty_advance(elapsed);
			verify_advance(elapsed);
			heartbeat_advance(elapsed);
		}
		udp_burst_poll(timer_now_ms());
		if (choose_tick_ms() != tick_ms) { /* the burst is over */
			tick_ms = choose_tick_ms();
			timer_start(tick_ms);
		}
	}
}
