#include "bootparams.h"
#include "check.h"
#include "cmdline.h"
#include "print.h"
#include "string.h"

#define FOUR_GIB (1ULL << 32)
#define CMDLINE_SCAN_MAX (1u << 20)

extern char __image_start[], __image_end[];

static const struct e820_entry *e820;
static u32 e820_count;

static u8 bp8(u64 zp, u32 off) { return *(const volatile u8 *)(zp + off); }
static u16 bp16(u64 zp, u32 off) { return *(const volatile u16 *)(zp + off); }
static u32 bp32(u64 zp, u32 off) { return *(const volatile u32 *)(zp + off); }

static const char *e820_type_name(u32 type)
{
	switch (type) {
	case E820_USABLE: return "usable";
	case E820_RESERVED: return "reserved";
	case E820_ACPI: return "acpi-data";
	case E820_NVS: return "acpi-nvs";
	case E820_UNUSABLE: return "unusable";
	case E820_PMEM: return "pmem";
	default: return NULL;
	}
}

static void check_magic(u64 zp)
{
	u16 flag = bp16(zp, BP_BOOT_FLAG);
	u32 hdr = bp32(zp, BP_HEADER);

	if (flag == BOOT_FLAG_MAGIC && hdr == HDRS_MAGIC) {
		println("zero-page: boot_flag=0xaa55 header=HdrS ok");
		return;
	}
	print_lock();
	put_str("zero-page: boot_flag=");
	put_hex(flag);
	put_str(" header=");
	put_hex(hdr);
	put_str(" bad\n");
	print_unlock();
	if (flag != BOOT_FLAG_MAGIC) {
		fail_begin();
		put_str("zero-page boot_flag at 0x1fe is ");
		put_hex(flag);
		put_str(", want 0xaa55");
		fail_end();
	}
	if (hdr != HDRS_MAGIC) {
		fail_begin();
		put_str("zero-page header at 0x202 is ");
		put_hex(hdr);
		put_str(", want 0x53726448 (HdrS)");
		fail_end();
	}
}

static void check_cmdline(u64 zp)
{
	u64 ptr = bp32(zp, BP_CMD_LINE_PTR) | ((u64)bp32(zp, BP_EXT_CMD_LINE_PTR) << 32);
	u32 size = bp32(zp, BP_CMDLINE_SIZE);

	if (ptr == 0 || ptr >= FOUR_GIB) {
		println("cmdline: ");
		fail_begin();
		put_str("cmdline: cmd_line_ptr is ");
		put_hex(ptr);
		put_str(ptr ? ", above 4 GiB" : ", want non-zero");
		fail_end();
		return;
	}

	/* Linux: cmdline_size is the maximum length without the terminating NUL,
	 * so the NUL may sit at index cmdline_size at the latest. */
	u64 scan = (u64)size + 1;
	if (scan > CMDLINE_SCAN_MAX)
		scan = CMDLINE_SCAN_MAX;
	if (scan > FOUR_GIB - ptr)
		scan = FOUR_GIB - ptr;
	const char *s = (const char *)ptr;
	size_t len = strnlen(s, scan);

	print_lock();
	put_str("cmdline: ");
	put_strn_printable(s, len);
	put_char('\n');
	print_unlock();

	if (len > size || len == scan) {
		fail_begin();
		put_str("cmdline at ");
		put_hex(ptr);
		put_str(" not NUL-terminated within cmdline_size=");
		put_dec(size);
		fail_end();
		return;
	}
	cmdline_set(s);
}

static void print_range(u64 start, u64 end)
{
	put_char('[');
	put_hex(start);
	put_char('-');
	put_hex(end);
	put_char(')');
}

static void check_e820(u64 zp)
{
	u32 n = bp8(zp, BP_E820_ENTRIES);
	const struct e820_entry *t = (const struct e820_entry *)(zp + BP_E820_TABLE);
	u64 usable = 0, prev_end = 0;

	print_lock();
	put_str("e820: ");
	put_dec(n);
	put_str(" entries\n");
	print_unlock();

	if (n == 0 || n > E820_MAX_ENTRIES) {
		fail_begin();
		put_str("e820: e820_entries is ");
		put_dec(n);
		put_str(", want 1..128");
		fail_end();
		if (n > E820_MAX_ENTRIES)
			n = E820_MAX_ENTRIES;
	}

	for (u32 i = 0; i < n; i++) {
		u64 a = t[i].addr, sz = t[i].size, end = a + sz;
		u32 type = t[i].type;
		const char *name = e820_type_name(type);

		print_lock();
		put_str("e820: ");
		print_range(a, end);
		put_char(' ');
		if (name) {
			put_str(name);
		} else {
			put_str("type-");
			put_dec(type);
		}
		put_char('\n');
		print_unlock();

		if (sz == 0 || end < a) {
			fail_begin();
			put_str("e820: entry ");
			put_dec(i);
			put_str(sz ? " wraps around" : " is empty");
			fail_end();
		}
		if (i > 0 && a < prev_end) {
			fail_begin();
			put_str("e820: entry ");
			put_dec(i);
			put_char(' ');
			print_range(a, end);
			put_str(" overlaps or is before the previous entry ending at ");
			put_hex(prev_end);
			fail_end();
		}
		if (end > prev_end)
			prev_end = end;
		if (type == E820_USABLE && end >= a)
			usable += sz;
	}

	print_lock();
	put_str("e820: usable ");
	put_dec(usable >> 10);
	put_str(" KiB\n");
	print_unlock();

	e820 = t;
	e820_count = n;

	u64 img_start = (u64)__image_start, img_end = (u64)__image_end;
	if (!e820_covers(img_start, img_end, E820_USABLE)) {
		fail_begin();
		put_str("e820: no usable entry covers the guest image ");
		print_range(img_start, img_end);
		fail_end();
	}
	if (!e820_covers(0x10000, 0x20000, E820_USABLE))
		fail_msg("e820: no usable entry covers the AP trampoline area [0x10000-0x20000)");
}

void bootparams_check(u64 zp)
{
	if (zp == 0 || zp >= FOUR_GIB - BP_SIZE) {
		println("zero-page: missing");
		fail_begin();
		put_str("zero page pointer in rsi is ");
		put_hex(zp);
		put_str(", want a non-zero address below 4 GiB");
		fail_end();
		return;
	}
	check_magic(zp);
	check_cmdline(zp);
	check_e820(zp);
}

const struct e820_entry *e820_entries(u32 *count)
{
	*count = e820_count;
	return e820;
}

bool e820_covers(u64 start, u64 end, u32 type)
{
	u64 cur = start;

	for (u32 i = 0; i < e820_count && cur < end; i++) {
		u64 a = e820[i].addr, e = a + e820[i].size;
		if (e820[i].type == type && a <= cur && e > cur)
			cur = e;
	}
	return cur >= end;
}
