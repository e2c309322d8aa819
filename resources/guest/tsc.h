/* Time from the TSC, for bounded waits that do not depend on how fast
 * instructions run (emulated or native). */
#ifndef GUEST_TSC_H
#define GUEST_TSC_H

#include "types.h"

void tsc_init(void);
u64 tsc_ticks_per_ms(void);
bool tsc_freq_known(void);
void udelay(u64 us);

struct deadline {
	u64 end;
};
struct deadline deadline_ms(u64 ms);
bool deadline_passed(struct deadline d);

#endif
