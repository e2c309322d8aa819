/* "heartbeat <n>" every period, n from 1, kept in guest memory so that it
 * continues across snapshot/restore and live migration. */
#ifndef GUEST_HEARTBEAT_H
#define GUEST_HEARTBEAT_H

#include "types.h"

/* period_ms 0 disables; `after` (may be NULL) runs after each line with n. */
void heartbeat_init(u64 period_ms, void (*after)(u64 n));
/* Account elapsed time; prints the heartbeats that are due. */
void heartbeat_advance(u64 elapsed_ms);
u64 heartbeat_count(void);

#endif
