/* godwit.mode=serve: bring up the virtio-net devices, print "serve: ready",
 * then sleep in sti; hlt and handle interrupts forever: network (ARP, ICMP
 * echo, UDP echo on port 7), heartbeat, dirtying, the UDP burst. */
#ifndef GUEST_SERVE_H
#define GUEST_SERVE_H

#include "types.h"

NORETURN void serve_run(void);

#endif
