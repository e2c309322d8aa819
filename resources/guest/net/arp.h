/* ARP for IPv4 over Ethernet: answer requests for our address, learn
 * senders into a small cache, resolve and announce. */
#ifndef GUEST_NET_ARP_H
#define GUEST_NET_ARP_H

#include "netif.h"

void arp_input(struct netif *nif, const u8 *pkt, u32 len);
/* The cached MAC of ip on nif; false if unknown. */
bool arp_lookup(const struct netif *nif, u32 ip, u8 *mac);
/* Broadcast a request for ip (the caller retries). */
void arp_request(struct netif *nif, u32 ip);
/* Gratuitous ARP: a broadcast request for our own address. */
void arp_gratuitous(struct netif *nif);

#endif
