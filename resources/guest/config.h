/* Build-time constants shared by C and assembly. Keep this file #define-only. */
#ifndef GUEST_CONFIG_H
#define GUEST_CONFIG_H

#define KERNEL_LOAD_ADDR   0x100000      /* physical == virtual, see guest.ld */

#define MAX_CPUS           64            /* stacks are reserved for this many */
#define STACK_SHIFT        13
#define STACK_SIZE         (1 << STACK_SHIFT)   /* 8 KiB per CPU */

/* Segment selectors of the guest's own GDT (start.S). */
#define KERNEL_CS          0x08
#define KERNEL_DS          0x10

/* AP start-up trampoline: copied to TRAMP_BASE, SIPI vector TRAMP_BASE >> 12. */
#define TRAMP_BASE         0x10000
#define TRAMP_MAX_SIZE     0x800         /* code + GDT must fit below the params */
#define TRAMP_PARAMS       (TRAMP_BASE + TRAMP_MAX_SIZE)
#define TRAMP_PARAM_CR3    (TRAMP_PARAMS + 0)    /* u32: page table root (< 4 GiB) */
#define TRAMP_PARAM_SLOT   (TRAMP_PARAMS + 4)    /* u32: next free stack slot, lock xadd */
#define TRAMP_PARAM_STACKS (TRAMP_PARAMS + 8)    /* u64: address of cpu_stacks */
#define TRAMP_PARAM_ENTRY  (TRAMP_PARAMS + 16)   /* u64: 64-bit C entry, ap_start(slot) */
#define TRAMP_PARAMS_SIZE  24
#define TRAMP_SIPI_VECTOR  (TRAMP_BASE >> 12)

/* Interrupt vectors (serve mode): IOAPIC pin n -> IRQ_VECTOR_BASE + n. */
#define IRQ_VECTOR_BASE    0x30
#define IOAPIC_PINS        24
#define TIMER_VECTOR       0xe0          /* LAPIC timer */
#define SPURIOUS_VECTOR    0xff          /* LAPIC spurious (no EOI) */

#endif
