/* godwit.crash=triple|sse: crash right after the boot report, on purpose. */
#ifndef GUEST_CRASH_H
#define GUEST_CRASH_H

#include "types.h"

/* If godwit.crash= asks for one: prints "crash: <kind> rip=0x<addr>" (the
 * instruction the CPU stops at) and crashes; returns otherwise. An unknown
 * value prints "crash: unknown godwit.crash=<v>, ignored". */
void crash_if_asked(void);

#endif
