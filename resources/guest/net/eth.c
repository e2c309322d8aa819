#include "eth.h"
#include "arp.h"
#include "bytes.h"
#include "ipv4.h"
#include "string.h"

const u8 eth_broadcast[ETH_ALEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

void eth_input(struct netif *nif, u8 *frame, u32 len)
{
	if (len < ETH_HLEN) {
		nif->rx_dropped++;
		return;
	}
	if (memcmp(frame, nif->mac, ETH_ALEN) != 0 && memcmp(frame, eth_broadcast, ETH_ALEN) != 0)
		return; /* not for us (multicast, or another host while promiscuous) */

	u16 type = get_be16(frame + 12);
	if (type == ETHERTYPE_ARP)
		arp_input(nif, frame + ETH_HLEN, len - ETH_HLEN);
	else if (type == ETHERTYPE_IPV4)
		ipv4_input(nif, frame, frame + ETH_HLEN, len - ETH_HLEN);
}

u8 *eth_build(u8 *frame, const u8 *dst, const u8 *src, u16 type)
{
	memcpy(frame, dst, ETH_ALEN);
	memcpy(frame + ETH_ALEN, src, ETH_ALEN);
	put_be16(frame + 12, type);
	return frame + ETH_HLEN;
}

void eth_send(struct netif *nif, u32 slot, u8 *frame, u32 len, u16 csum_start, u16 csum_offset)
{
	if (len < ETH_MIN_FRAME) {
		memset(frame + len, 0, ETH_MIN_FRAME - len);
		len = ETH_MIN_FRAME;
	}
	nif->ops->tx_send(nif, slot, len, csum_start, csum_offset);
	nif->tx_frames++;
}
