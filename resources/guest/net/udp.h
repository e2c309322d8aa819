/* UDP: demultiplex to bound ports; build datagrams with the checksum done in
 * software or left to the device (partial checksum offload). */
#ifndef GUEST_NET_UDP_H
#define GUEST_NET_UDP_H

#include "netif.h"

#define UDP_HLEN 8

typedef void (*udp_rx_fn)(struct netif *nif, const u8 *src_mac, u32 src_ip, u16 src_port,
			  const u8 *data, u32 len);

bool udp_bind(u16 port, udp_rx_fn fn);
void udp_input(struct netif *nif, const u8 *src_mac, u32 src_ip, const u8 *dgram, u32 len);

/* Largest payload that fits one frame on nif. */
u32 udp_max_payload(const struct netif *nif);

struct udp_tx {
	u32 slot;
	u8 *frame;
	u8 *payload; /* fill payload_len bytes here */
	u32 payload_len;
};

/* A transmit buffer for payload_len bytes; false if too long or none free. */
bool udp_tx_begin(struct netif *nif, struct udp_tx *t, u32 payload_len);
/* Headers, checksum (offloaded when the device takes it), send. */
void udp_tx_send(struct netif *nif, struct udp_tx *t, const u8 *dst_mac, u32 dst_ip, u16 src_port,
		 u16 dst_port);

#endif
