/* IPv4: accept unfragmented packets for our address, hand ICMP and UDP on;
 * build headers for replies. */
#ifndef GUEST_NET_IPV4_H
#define GUEST_NET_IPV4_H

#include "netif.h"

#define IPV4_HLEN     20
#define IP_PROTO_ICMP 1
#define IP_PROTO_UDP  17

/* pkt: the IPv4 packet inside `frame` (len bytes up to the frame's end). */
void ipv4_input(struct netif *nif, const u8 *frame, const u8 *pkt, u32 len);
/* A 20-byte header with its checksum; returns where the payload goes. */
u8 *ipv4_build(u8 *p, u32 src, u32 dst, u8 proto, u32 payload_len);
/* Where to send a packet for dst: dst itself on our subnet, else the gateway
 * (0 if there is none). */
u32 ipv4_next_hop(const struct netif *nif, u32 dst);

#endif
