/* AP start-up code. Assembled here, copied to TRAMP_BASE by smp.c, entered
 * after STARTUP IPI vector TRAMP_SIPI_VECTOR in real mode at CS:IP = 0x1000:0.
 * Real mode -> protected mode (own GDT) -> PAE + BSP's CR3 + EFER.LME ->
 * paging -> long mode; take a stack slot with lock xadd and call
 * ap_start(slot) at the 64-bit address in the parameter block.
 * Lives in .rodata: it is never run in place. */
#include "config.h"

#define TR(x) (TRAMP_BASE + ((x) - trampoline_start))

	.section .rodata.trampoline, "a"
	.globl trampoline_start, trampoline_end

	.code16
trampoline_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tr_gdt_ptr - trampoline_start
	movl %cr0, %eax
	orl $1, %eax                    /* PE */
	movl %eax, %cr0
	ljmpl $0x08, $TR(tr_pm32)

	.code32
tr_pm32:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl %cr4, %eax
	orl $0x20, %eax                 /* PAE */
	movl %eax, %cr4
	movl TRAMP_PARAM_CR3, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx          /* EFER */
	rdmsr
	orl $0x100, %eax                /* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000000, %eax           /* PG */
	movl %eax, %cr0
	ljmpl $0x18, $TR(tr_lm64)

	.code64
tr_lm64:
	movl $1, %eax
	lock xaddl %eax, TRAMP_PARAM_SLOT
	cmpl $(MAX_CPUS - 1), %eax
	jae 1f                          /* no stack left for this one */
	movl %eax, %edi                 /* ap_start(slot) */
	leaq 2(%rax), %rsp
	shlq $STACK_SHIFT, %rsp
	addq TRAMP_PARAM_STACKS, %rsp   /* top of cpu_stacks[slot + 1] */
	xorl %ebp, %ebp
	movq TRAMP_PARAM_ENTRY, %rax
	callq *%rax
1:	cli
	hlt
	jmp 1b

	.balign 16
tr_gdt:
	.quad 0                         /* null */
	.quad 0x00cf9a000000ffff        /* 0x08: 32-bit code */
	.quad 0x00cf92000000ffff        /* 0x10: data */
	.quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
tr_gdt_end:
tr_gdt_ptr:
	.word tr_gdt_end - tr_gdt - 1
	.long TR(tr_gdt)
trampoline_end:

/* Its size limit (TRAMP_MAX_SIZE) is asserted in guest.ld. */

	.section .note.GNU-stack, "", @progbits
