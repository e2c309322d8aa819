#include "dirty.h"
#include "cmdline.h"
#include "mem.h"
#include "parse.h"
#include "print.h"

#define RESERVE (1u << 20) /* left for whatever is allocated later */

static u8 *buf;
static u64 npages, rate, cursor, written, carry_milli;
static u8 pass = 1;
/* godwit.dirty_pace=cpu: each tick dirties one tick's pages however late it
 * comes, so that a guest whose vCPU is throttled dirties less (like a busy
 * workload); by default a late tick catches up (wall-clock rate). */
static bool pace_cpu;
#define PACE_TICK_MS 10

/* A plain number is KiB; with a K/M/G suffix it is a size in bytes. */
static bool parse_kib(struct str s, u64 *kib)
{
	char last = s.len ? s.p[s.len - 1] : 0;
	bool suffix = last == 'k' || last == 'K' || last == 'm' || last == 'M' || last == 'g' ||
		      last == 'G';
	u64 v;

	if (suffix ? !parse_size(s, &v) : !parse_u64(s, &v))
		return false;
	*kib = suffix ? v >> 10 : v;
	return true;
}

bool dirty_init(void)
{
	struct str v, rest, f_kib, f_rate;
	u64 kib, r;

	if (!cmdline_value("godwit.dirty", &v))
		return false;
	rest = v;
	if (!str_next_field(&rest, ':', &f_kib) || !str_next_field(&rest, ':', &f_rate) ||
	    rest.p || !parse_kib(f_kib, &kib) || !parse_u64(f_rate, &r) || kib < 4) {
		print_lock();
		put_str("serve: ignoring godwit.dirty=");
		put_strn_printable(v.p, v.len);
		put_str(": want <KiB>:<pages per second>, at least 4 KiB\n");
		print_unlock();
		return false;
	}
	npages = kib / 4;
	u64 avail = mem_available(PAGE_SIZE);
	avail = avail > RESERVE ? (avail - RESERVE) / PAGE_SIZE : 0;
	if (npages > avail)
		npages = avail; /* the line below shows the size actually used */
	buf = mem_alloc_raw(npages * PAGE_SIZE, PAGE_SIZE);
	if (!buf)
		npages = 0;
	rate = r;
	struct str pace;
	pace_cpu = cmdline_value("godwit.dirty_pace", &pace) && str_eq(pace, "cpu");

	print_lock();
	put_str("serve: dirty buffer=");
	put_dec(npages * 4);
	put_str(" KiB rate=");
	put_dec(rate);
	put_str(" pages/s\n");
	print_unlock();
	return npages != 0;
}

bool dirty_active(void) { return npages && rate; }

void dirty_advance(u64 elapsed_ms)
{
	if (!dirty_active())
		return;
	if (pace_cpu && elapsed_ms > PACE_TICK_MS)
		elapsed_ms = PACE_TICK_MS;
	u64 milli = rate * elapsed_ms + carry_milli;
	u64 due = milli / 1000;
	carry_milli = milli % 1000;

	while (due) {
		u64 n = npages - cursor;
		if (n > due)
			n = due;
		volatile u8 *p = buf + cursor * PAGE_SIZE;
		for (u64 i = 0; i < n; i++, p += PAGE_SIZE)
			*p = pass;
		cursor += n;
		written += n;
		due -= n;
		if (cursor == npages) {
			cursor = 0;
			pass++;
		}
	}
}

u64 dirty_pages_written(void) { return written; }

void dirty_report(void)
{
	print_lock();
	put_str("dirty: ");
	put_dec(written);
	put_char('\n');
	print_unlock();
}
