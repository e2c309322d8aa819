/* godwit.udp_burst=<ip>:<port>:<count>:<size>: once the first device's link
 * is up (and the next hop answered ARP), send count datagrams of size payload
 * bytes from UDP port 49152 to ip:port. The payload starts with a 32-bit
 * big-endian sequence number (0, 1, ...; sizes below 4 carry none) followed
 * by bytes (i & 0xff). Replies from ip:port to port 49152 are counted, each
 * sequence number once; when all came back, or 5 s after the first datagram
 * went out (or after 5 s of unanswered ARP), prints
 *   udp-burst: sent <n> received <m>  */
#ifndef GUEST_UDP_BURST_H
#define GUEST_UDP_BURST_H

#include "types.h"

#define UDP_BURST_SRC_PORT 49152

/* Parse the word (prints "serve: udp-burst to <ip>:<port> count=<n> size=<s>"). */
void udp_burst_init(void);
/* Still waiting for the link, ARP, or replies. */
bool udp_burst_active(void);
/* Make progress (send what the transmit ring takes, time out). */
void udp_burst_poll(u64 now_ms);

#endif
