#include "verify.h"
#include "cmdline.h"
#include "mem.h"
#include "parse.h"
#include "print.h"

#define RESERVE (1u << 20) /* left for whatever is allocated later */
#define DEFAULT_RATE 256   /* pages/s: ~10k emulated instructions/s */
#define DEFAULT_CHECK_RATE 2000
#define WORDS (PAGE_SIZE / 8)
/* The sampled words of a page: first, middle, last, and the checksum word
 * (written last, so a page half-written is caught by it). */
#define W_FIRST 0
#define W_SUM 1
#define W_MID (WORDS / 2)
#define W_LAST (WORDS - 1)
#define SUM_SALT 0x676f647769747631ull /* "godwitv1" */

/*
 * Page i holds generation pass if i < cursor, else pass - 1. Generation 0
 * is "never written": its sampled words are zero. So the expected contents
 * follow from (pass, cursor) alone: no table that could itself be lost.
 * All of this state is in .bss, i.e. in the guest RAM that is saved.
 */
static volatile u64 *buf;
static u64 npages, rate, check_rate;
static u64 cursor, pass = 1, write_carry, written;
static u64 check_cursor, check_carry, checked, mismatches;

static u64 word_value(u64 word_gpa, u64 gen)
{
	return gen ? word_gpa | gen << 32 : 0;
}

static u64 page_sum(u64 first, u64 mid, u64 last, u64 gen)
{
	return gen ? first ^ mid ^ last ^ SUM_SALT : 0;
}

static volatile u64 *page_at(u64 i)
{
	return buf + i * WORDS;
}

static u64 gen_of(u64 i)
{
	return i < cursor ? pass : pass - 1;
}

/* The expected sampled words of page i at generation gen, in W_* order of
 * writing: first, middle, last, checksum. */
static void expected(u64 i, u64 gen, u64 out[4])
{
	u64 gpa = (u64)page_at(i);

	out[0] = word_value(gpa + W_FIRST * 8, gen);
	out[1] = word_value(gpa + W_MID * 8, gen);
	out[2] = word_value(gpa + W_LAST * 8, gen);
	out[3] = page_sum(out[0], out[1], out[2], gen);
}

/* First, middle, last, then the checksum word. */
static void write_page(u64 i, u64 gen)
{
	volatile u64 *p = page_at(i);
	u64 v[4];

	expected(i, gen, v);
	p[W_FIRST] = v[0];
	p[W_MID] = v[1];
	p[W_LAST] = v[2];
	p[W_SUM] = v[3];
}

static bool parse_rate(const char *key, u64 dflt, u64 *out)
{
	struct str v;

	*out = dflt;
	if (!cmdline_value(key, &v))
		return true;
	if (parse_u64(v, out))
		return true;
	print_lock();
	put_str("serve: ignoring ");
	put_str(key);
	put_char('=');
	put_strn_printable(v.p, v.len);
	put_str(": want pages per second\n");
	print_unlock();
	*out = dflt;
	return false;
}

bool verify_init(void)
{
	struct str v;
	u64 size;

	if (!cmdline_value("godwit.verify", &v))
		return false;
	if (!parse_size(v, &size) || size < PAGE_SIZE) {
		print_lock();
		put_str("serve: ignoring godwit.verify=");
		put_strn_printable(v.p, v.len);
		put_str(": want a size (K/M/G suffixes) of at least 4K\n");
		print_unlock();
		return false;
	}
	parse_rate("godwit.verify_rate", DEFAULT_RATE, &rate);
	parse_rate("godwit.verify_check_rate", DEFAULT_CHECK_RATE, &check_rate);
	npages = size / PAGE_SIZE;
	u64 avail = mem_available(PAGE_SIZE);
	avail = avail > RESERVE ? (avail - RESERVE) / PAGE_SIZE : 0;
	if (npages > avail)
		npages = avail; /* the line below shows the size actually used */
	buf = mem_alloc_raw(npages * PAGE_SIZE, PAGE_SIZE);
	if (!buf)
		npages = 0;
	/* Generation 0 everywhere. Only sampled words that are not zero are
	 * written, so a fresh (zero) buffer is left as it is. */
	for (u64 i = 0; i < npages; i++) {
		volatile u64 *p = page_at(i);
		if (p[W_FIRST] | p[W_SUM] | p[W_MID] | p[W_LAST])
			write_page(i, 0);
	}

	print_lock();
	put_str("serve: verify buffer=");
	put_hex((u64)buf);
	put_str(" pages=");
	put_dec(npages);
	put_str(" rate=");
	put_dec(rate);
	put_str(" check=");
	put_dec(check_rate);
	put_str(" pages/s\n");
	print_unlock();
	return npages != 0;
}

bool verify_active(void) { return npages != 0; }

static u64 due(u64 per_s, u64 elapsed_ms, u64 *carry)
{
	u64 milli = per_s * elapsed_ms + *carry;
	*carry = milli % 1000;
	return milli / 1000;
}

static void rewrite(u64 n)
{
	if (n > npages)
		n = npages; /* each page once is as good as several passes */
	while (n--) {
		write_page(cursor, pass);
		/* The page is complete before the cursor says so. */
		__asm__ volatile("" ::: "memory");
		written++;
		if (++cursor == npages) {
			cursor = 0;
			pass++;
		}
	}
}

static void report_mismatch(u64 word_gpa, u64 want, u64 got)
{
	print_lock();
	put_str("verify: mismatch at ");
	put_hex(word_gpa);
	put_str(" want ");
	put_hex(want);
	put_str(" got ");
	put_hex(got);
	put_char('\n');
	print_unlock();
}

/* Whether page i holds generation gen in every sampled word; on the first
 * mismatch ever, names the word. The page at the cursor is the next one to
 * be rewritten: should a rewrite of it ever be cut short (it runs in the same
 * loop as this check, so today it cannot be), each of its words may hold the
 * old or the new generation. */
static bool page_ok(u64 i)
{
	static const u32 idx[4] = {W_FIRST, W_MID, W_LAST, W_SUM};
	volatile u64 *p = page_at(i);
	u64 gen = gen_of(i), want[4], next[4];
	bool at_cursor = i == cursor;

	expected(i, gen, want);
	expected(i, gen + 1, next);
	for (u32 k = 0; k < 4; k++) {
		u64 got = p[idx[k]];
		if (got == want[k] || (at_cursor && got == next[k]))
			continue;
		if (mismatches == 0)
			report_mismatch((u64)&p[idx[k]], want[k], got);
		return false;
	}
	return true;
}

static void check(u64 n)
{
	if (n > npages)
		n = npages; /* a long pause: one full round is enough */
	while (n--) {
		if (!page_ok(check_cursor))
			mismatches++;
		checked++;
		if (++check_cursor == npages)
			check_cursor = 0;
	}
}

void verify_advance(u64 elapsed_ms)
{
	if (!verify_active())
		return;
	rewrite(due(rate, elapsed_ms, &write_carry));
	check(due(check_rate, elapsed_ms, &check_carry));
}

void verify_report(void)
{
	print_lock();
	put_str("verify: ");
	put_dec(npages);
	put_str(" pages, ");
	put_dec(checked);
	put_str(" checked, ");
	put_dec(mismatches);
	put_str(" mismatches\n");
	print_unlock();
}
