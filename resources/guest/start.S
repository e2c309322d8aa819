/* Entry from the VMM (Linux 64-bit boot protocol): long mode, interrupts off,
 * RSI = zero page, no usable stack. */
#include "config.h"

	.section .text.start, "ax"
	.code64
	.globl _start
_start:
	cli
	cld
	/* Only one CPU runs the boot path. APs are meant to wait for SIPI, but if
	 * a VMM starts them here too they park (INIT still reaches them). */
	movl $1, %eax
	xchgl %eax, boot_claimed(%rip)
	testl %eax, %eax
	jnz 9f

	movq %rsi, %r12                 /* zero page; rep stosq leaves rsi alone */
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq

	leaq cpu_stacks + STACK_SIZE(%rip), %rsp   /* cpu_stacks[0] is the BSP's */
	xorl %ebp, %ebp
	call load_gdt
	movq %r12, %rdi
	call kmain
9:	cli
	hlt
	jmp 9b

/* Load the guest's own GDT and reload every segment register. */
	.text
	.globl load_gdt
load_gdt:
	lgdt gdt_ptr(%rip)
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	popq %rax                       /* return address */
	pushq $KERNEL_CS
	pushq %rax
	lretq                           /* reloads CS and returns */

	.data
	.balign 4
boot_claimed:
	.long 0

	.balign 16
gdt:
	.quad 0                         /* null */
	.quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff        /* 0x10: data */
gdt_end:
	.balign 8
	.word 0, 0, 0                   /* so that the base below is 8-byte aligned */
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

/* Per-CPU stacks: [0] BSP, [slot + 1] the AP that took `slot` in the
 * trampoline. Not part of .bss, so start-up does not spend time clearing it. */
	.section .stacks, "aw", @nobits
	.balign 4096
	.globl cpu_stacks
cpu_stacks:
	.skip STACK_SIZE * MAX_CPUS

	.section .note.GNU-stack, "", @progbits
