/* The Linux "zero page" (struct boot_params) handed over in RSI. Only the
 * fields the guest reads are described, by their offsets in the Linux layout. */
#ifndef GUEST_BOOTPARAMS_H
#define GUEST_BOOTPARAMS_H

#include "types.h"

#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: bits 63:32 of the command line address */
#define BP_E820_ENTRIES     0x1e8 /* u8 */
#define BP_BOOT_FLAG        0x1fe /* u16, 0xaa55 */
#define BP_HEADER           0x202 /* u32, "HdrS" */
#define BP_CMD_LINE_PTR     0x228 /* u32 */
#define BP_CMDLINE_SIZE     0x238 /* u32: max length without the NUL */
#define BP_E820_TABLE       0x2d0 /* 128 x struct e820_entry */
#define BP_SIZE             0x1000

#define BOOT_FLAG_MAGIC     0xaa55
#define HDRS_MAGIC          0x53726448 /* "HdrS" */
#define E820_MAX_ENTRIES    128

#define E820_USABLE   1
#define E820_RESERVED 2
#define E820_ACPI     3
#define E820_NVS      4
#define E820_UNUSABLE 5
#define E820_PMEM     7

struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} __attribute__((packed));

/* Validate and print the zero page, command line and e820 map (boot report
 * lines "zero-page:", "cmdline:", "e820:"). Failures go through fail_*(). */
void bootparams_check(u64 zero_page);

/* The e820 map found by bootparams_check() (count 0 if unusable). */
const struct e820_entry *e820_entries(u32 *count);
/* Whether [start, end) lies inside entries of `type` (adjacent entries join). */
bool e820_covers(u64 start, u64 end, u32 type);

#endif
