/* Deliberate crashes (godwit.crash=...), so the VMM's tests can check how
 * godwit reports a guest that dies. Both print nothing themselves; crash.c
 * announces the address at which the CPU will stop. */

	.text
	.code64

/* godwit.crash=triple: an IDT with limit 0, then an exception: #UD cannot be
 * delivered (#GP), neither can #GP (#DF), nor #DF: triple fault, shutdown. */
	.globl crash_triple_fault, crash_triple_fault_ud2
crash_triple_fault:
	cli
	lidt zero_idt_ptr(%rip)
crash_triple_fault_ud2:
	ud2
	jmp crash_triple_fault_ud2

/* godwit.crash=sse: the one SSE instruction in the guest, on purpose. KVM's
 * instruction emulator cannot execute it (KVM_EXIT_INTERNAL_ERROR, emulation
 * failure); on hardware KVM it is a #UD because CR4.OSFXSR is clear. This
 * symbol is the only one tests/tests/guest_safety.rs allows to contain an
 * SSE instruction, and only this one. Called with interrupts off. */
	.globl crash_sse_movd_xmm0
crash_sse_movd_xmm0:
	movd %eax, %xmm0                /* the first instruction: RIP = the symbol */
1:	ud2
	jmp 1b

	.section .rodata
	.balign 8
	.word 0, 0, 0                   /* 8-byte aligned base below */
zero_idt_ptr:
	.word 0                         /* limit 0: no vector is deliverable */
	.quad 0

	.section .note.GNU-stack, "", @progbits
