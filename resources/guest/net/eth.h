/* Ethernet II framing. */
#ifndef GUEST_NET_ETH_H
#define GUEST_NET_ETH_H

#include "netif.h"

#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP  0x0806
#define ETH_MIN_FRAME  60 /* without FCS: short frames are padded */

extern const u8 eth_broadcast[ETH_ALEN];

/* A received frame (len bytes from the destination MAC on): frames for our
 * MAC or broadcast go to ARP / IPv4, the rest is ignored. */
void eth_input(struct netif *nif, u8 *frame, u32 len);
/* Write the header; returns where the payload goes. */
u8 *eth_build(u8 *frame, const u8 *dst, const u8 *src, u16 type);
/* Pad to ETH_MIN_FRAME and send a frame from nif->ops->tx_alloc. */
void eth_send(struct netif *nif, u32 slot, u8 *frame, u32 len, u16 csum_start, u16 csum_offset);

#endif
