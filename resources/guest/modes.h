/* What the guest does after the boot checks, chosen by godwit.mode=:
 *   report (default)  verdict, power off
 *   serve             verdict, then serve.c forever (no power off)
 * In both, godwit.crash=triple|sse crashes right after the verdict. A failed
 * check always ends in power off. */
#ifndef GUEST_MODES_H
#define GUEST_MODES_H

#include "types.h"

NORETURN void modes_run(void);

#endif
