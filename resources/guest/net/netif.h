/* A network interface as the protocol code sees it: addresses, the
 * transmit operations of its driver, counters. */
#ifndef GUEST_NET_NETIF_H
#define GUEST_NET_NETIF_H

#include "types.h"

#define ETH_HLEN 14
#define ETH_ALEN 6

struct netif;

struct netif_ops {
	/* A transmit buffer for a frame of up to mtu + ETH_HLEN bytes; NULL if
	 * none is free. *slot identifies it for send. */
	u8 *(*tx_alloc)(struct netif *nif, u32 *slot);
	/* Queue the frame in `slot` (len bytes). csum_start != 0 asks the device
	 * to complete a partial checksum (only if nif->tx_csum_offload). */
	void (*tx_send)(struct netif *nif, u32 slot, u32 len, u16 csum_start, u16 csum_offset);
	/* Tell the device about queued frames. */
	void (*tx_flush)(struct netif *nif);
};

struct netif {
	u32 index;
	u8 mac[ETH_ALEN];
	u16 mtu;
	bool link_up;
	bool has_ip;
	u32 ip, netmask, gateway; /* host order */
	bool tx_csum_offload;     /* the device completes partial checksums */
	const struct netif_ops *ops;
	void *driver;

	u64 rx_frames, tx_frames;
	u64 rx_dropped, tx_dropped; /* malformed / no transmit buffer */
	u64 rx_large;
};

#endif
