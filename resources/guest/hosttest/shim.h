/* Host build of guest sources (make hosttest): force-included before every
 * file, it stands in for io.h so that port I/O, MMIO and CPU instructions go
 * to the harness (fakedev.c) instead of hardware. Guest sources are compiled
 * unchanged. */
#ifndef HOSTTEST_SHIM_H
#define HOSTTEST_SHIM_H

#define GUEST_IO_H /* io.h is replaced by this file */

#include "types.h"

u64 host_mmio_read(u64 addr, u32 size);
void host_mmio_write(u64 addr, u32 size, u64 v);
bool host_is_mmio(u64 addr);
void host_outb(u16 port, u8 v);
u8 host_inb(u16 port);
void host_halt(void) __attribute__((noreturn));

static inline void outb(u16 port, u8 v) { host_outb(port, v); }
static inline void outw(u16 port, u16 v) { (void)port; (void)v; }
static inline void outl(u16 port, u32 v) { (void)port; (void)v; }
static inline u8 inb(u16 port) { return host_inb(port); }
static inline u16 inw(u16 port) { (void)port; return 0xffff; }
static inline u32 inl(u16 port) { (void)port; return 0xffffffffu; }

#define HOST_MMIO_RW(bits)                                                            \
	static inline u##bits mmio_read##bits(u64 a)                                  \
	{                                                                             \
		if (host_is_mmio(a))                                                  \
			return (u##bits)host_mmio_read(a, bits / 8);                  \
		return *(volatile u##bits *)a;                                        \
	}                                                                             \
	static inline void mmio_write##bits(u64 a, u##bits v)                         \
	{                                                                             \
		if (host_is_mmio(a))                                                  \
			host_mmio_write(a, bits / 8, v);                              \
		else                                                                  \
			*(volatile u##bits *)a = v;                                   \
	}
HOST_MMIO_RW(8)
HOST_MMIO_RW(16)
HOST_MMIO_RW(32)
HOST_MMIO_RW(64)

static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline void mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void cpu_relax(void) { barrier(); }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	(void)leaf;
	(void)sub;
	*a = *b = *c = *d = 0;
}
static inline u64 rdmsr(u32 msr) { (void)msr; return 0; }
static inline void wrmsr(u32 msr, u64 v) { (void)msr; (void)v; }
static inline u64 rdtsc(void) { return (u64)__builtin_ia32_rdtsc(); }
static inline u64 read_cr2(void) { return 0; }
static inline u64 read_cr3(void) { return 0; }
static inline void write_cr3(u64 v) { (void)v; }
static inline NORETURN void halt_forever(void) { host_halt(); }

#define MSR_IA32_APIC_BASE 0x1b
#define MSR_EFER           0xc0000080

#endif
