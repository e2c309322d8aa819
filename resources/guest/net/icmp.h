/* ICMP: answer echo requests. */
#ifndef GUEST_NET_ICMP_H
#define GUEST_NET_ICMP_H

#include "netif.h"

void icmp_input(struct netif *nif, const u8 *src_mac, u32 src_ip, const u8 *msg, u32 len);

#endif
