#include "mptable.h"
#include "check.h"
#include "print.h"

#define MP_FP_SIG  0x5f504d5fu /* "_MP_" */
#define MP_CFG_SIG 0x504d4350u /* "PCMP" */

/* Entry types and sizes (MP spec 1.4, 4.3). */
#define MPE_PROCESSOR 0
#define MPE_BUS       1
#define MPE_IOAPIC    2
#define MPE_IOINT     3
#define MPE_LINT      4

static struct mp_config mp;

static u8 rd8(u64 a) { return *(const volatile u8 *)a; }
static u16 rd16(u64 a) { return *(const volatile u16 *)a; }
static u32 rd32(u64 a) { return *(const volatile u32 *)a; }

static u8 checksum(u64 a, u32 len)
{
	u8 sum = 0;

	for (u32 i = 0; i < len; i++)
		sum += rd8(a + i);
	return sum;
}

/* Returns the address of a valid floating pointer in [start, end), or 0. */
static u64 scan_fp(u64 start, u64 end)
{
	for (u64 a = start; a + 16 <= end; a += 16) {
		if (rd32(a) != MP_FP_SIG)
			continue;
		u32 len = rd8(a + 8) * 16u;
		if (len == 0 || checksum(a, len) != 0) {
			fail_begin();
			put_str("mptable: floating pointer at ");
			put_hex(a);
			put_str(len ? " has a bad checksum" : " has length 0");
			fail_end();
			continue;
		}
		return a;
	}
	return 0;
}

static u64 find_fp(void)
{
	/* EBDA segment from the BIOS data area, if plausible; then the last KiB
	 * of base memory; then the BIOS ROM area. */
	u64 ebda = (u64)rd16(0x40e) << 4;
	u64 fp = 0;

	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = scan_fp(ebda, ebda + 1024);
	if (!fp)
		fp = scan_fp(0x9fc00, 0xa0000);
	if (!fp)
		fp = scan_fp(0xf0000, 0x100000);
	return fp;
}

static void cfg_fail(const char *what, u64 value)
{
	fail_begin();
	put_str("mptable: ");
	put_str(what);
	put_hex(value);
	fail_end();
}

static void parse_entries(u64 t, u32 base_len, u32 count)
{
	u64 p = t + 44, end = t + base_len;
	u32 bsps = 0;

	for (u32 i = 0; i < count; i++) {
		if (p >= end) {
			cfg_fail("entry count overruns the table, entries parsed: ", i);
			break;
		}
		u8 type = rd8(p);
		u32 size = type == MPE_PROCESSOR ? 20 : 8;
		if (type > MPE_LINT) {
			cfg_fail("unknown entry type at ", p);
			break;
		}
		if (p + size > end) {
			cfg_fail("entry overruns the table at ", p);
			break;
		}
		if (type == MPE_PROCESSOR) {
			u8 id = rd8(p + 1), flags = rd8(p + 3);
			if (flags & MP_CPU_ENABLED) {
				for (u32 j = 0; j < mp.ncpus; j++)
					if (mp.cpus[j].apic_id == id)
						cfg_fail("duplicate processor apic_id=", id);
				if (flags & MP_CPU_BSP) {
					bsps++;
					if (mp.bsp < 0)
						mp.bsp = (int)mp.ncpus;
				}
				if (mp.ncpus < MAX_CPUS) {
					mp.cpus[mp.ncpus].apic_id = id;
					mp.cpus[mp.ncpus].flags = flags;
					mp.ncpus++;
				} else {
					cfg_fail("more enabled cpus than the guest supports, dropped apic_id=", id);
				}
			}
		}
		p += size;
	}
	if (bsps != 1) {
		fail_begin();
		put_str("mptable: ");
		put_dec(bsps);
		put_str(" enabled processor entries carry the BSP flag, want exactly 1");
		fail_end();
	}
}

const struct mp_config *mptable_scan(void)
{
	mp.bsp = -1;
	u64 fp = find_fp();
	if (!fp) {
		println("mptable: not found");
		fail_msg("mptable: no valid _MP_ floating pointer in the EBDA, 0x9fc00-0x9ffff or 0xf0000-0xfffff");
		return &mp;
	}
	mp.fp_addr = fp;

	u64 t = rd32(fp + 4);
	if (rd8(fp + 11) != 0)
		cfg_fail("floating pointer asks for default configuration ", rd8(fp + 11));
	if (t == 0) {
		println("mptable: no configuration table");
		cfg_fail("floating pointer has no configuration table pointer at ", fp);
		return &mp;
	}
	if (rd32(t) != MP_CFG_SIG) {
		println("mptable: no configuration table");
		cfg_fail("no PCMP signature at ", t);
		return &mp;
	}

	u32 base_len = rd16(t + 4);
	u32 count = rd16(t + 34);
	u32 ext_len = rd16(t + 40);
	mp.table_addr = t;
	mp.lapic_addr = rd32(t + 36);

	if (base_len < 44) {
		println("mptable: configuration table too short");
		cfg_fail("configuration table length is ", base_len);
		return &mp;
	}
	if (checksum(t, base_len) != 0)
		cfg_fail("configuration table checksum is bad, table at ", t);
	if (ext_len && (u8)(checksum(t + base_len, ext_len) + rd8(t + 42)) != 0)
		cfg_fail("extended table checksum is bad, table at ", t);

	mp.found = true;
	parse_entries(t, base_len, count);

	print_lock();
	put_str("mptable: ");
	put_dec(mp.ncpus);
	put_str(" cpus\n");
	print_unlock();
	return &mp;
}
