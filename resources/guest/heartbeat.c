#include "heartbeat.h"
#include "print.h"

static u64 period;
static u64 accumulated;
static u64 count;
static void (*after_beat)(u64 n);

void heartbeat_init(u64 period_ms, void (*after)(u64 n))
{
	period = period_ms;
	after_beat = after;
}

void heartbeat_advance(u64 elapsed_ms)
{
	if (!period)
		return;
	accumulated += elapsed_ms;
	while (accumulated >= period) {
		accumulated -= period;
		count++;
		print_lock();
		put_str("heartbeat ");
		put_dec(count);
		put_char('\n');
		print_unlock();
		if (after_beat)
			after_beat(count);
	}
}

u64 heartbeat_count(void) { return count; }
