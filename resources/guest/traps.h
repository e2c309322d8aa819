/* Exception vectors 0-31 (in the IDT of idt.c): any CPU exception is reported as a failed check
 * and the guest powers off (no exception is expected). */
#ifndef GUEST_TRAPS_H
#define GUEST_TRAPS_H

#include "types.h"

struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

void traps_init(void); /* fill the IDT (once, BSP) */
void traps_load(void); /* lidt on this CPU */
NORETURN void trap_handler(struct trap_frame *f);

#endif
