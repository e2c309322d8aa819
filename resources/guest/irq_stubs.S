/* Entry stubs for external interrupts (IOAPIC pins, LAPIC timer, spurious):
 * save the caller-saved registers, call irq_dispatch(vector), iretq. */
#include "config.h"

	.text
	.code64

.macro IRQ_STUB v
irq_stub_\v:
	pushq $\v
	jmp irq_common
.endm

	.irp v, 0x30,0x31,0x32,0x33,0x34,0x35,0x36,0x37,0x38,0x39,0x3a,0x3b,0x3c,0x3d,0x3e,0x3f,0x40,0x41,0x42,0x43,0x44,0x45,0x46,0x47,0xe0,0xff
	IRQ_STUB \v
	.endr

irq_common:
	cld
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq 72(%rsp), %rdi      /* the vector pushed by the stub */
	subq $8, %rsp            /* 16-byte alignment for the call: 5 + 1 + 9 + 1 */
	call irq_dispatch
	addq $8, %rsp
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rax
	addq $8, %rsp            /* the vector */
	iretq

	.section .rodata
	.balign 8
	.globl irq_stub_table
irq_stub_table:                  /* {vector, stub} pairs, ended by {0, 0} */
	.irp v, 0x30,0x31,0x32,0x33,0x34,0x35,0x36,0x37,0x38,0x39,0x3a,0x3b,0x3c,0x3d,0x3e,0x3f,0x40,0x41,0x42,0x43,0x44,0x45,0x46,0x47,0xe0,0xff
	.quad \v, irq_stub_\v
	.endr
	.quad 0, 0

	.section .note.GNU-stack, "", @progbits
