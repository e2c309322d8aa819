#include "icmp.h"
#include "csum.h"
#include "eth.h"
#include "ipv4.h"
#include "string.h"

#define ICMP_ECHO_REPLY   0
#define ICMP_ECHO_REQUEST 8
#define ICMP_HLEN         8

void icmp_input(struct netif *nif, const u8 *src_mac, u32 src_ip, const u8 *msg, u32 len)
{
	if (len < ICMP_HLEN || msg[0] != ICMP_ECHO_REQUEST || msg[1] != 0)
		return;
	if (ETH_HLEN + IPV4_HLEN + len > (u32)nif->mtu + ETH_HLEN)
		return; /* the request came with IP options: the reply would not fit */

	u32 slot;
	u8 *frame = nif->ops->tx_alloc(nif, &slot);
	if (!frame) {
		nif->tx_dropped++;
		return;
	}
	u8 *p = eth_build(frame, src_mac, nif->mac, ETHERTYPE_IPV4);
	u8 *icmp = ipv4_build(p, nif->ip, src_ip, IP_PROTO_ICMP, len);
	memcpy(icmp, msg, len);
	icmp[0] = ICMP_ECHO_REPLY;
	icmp[2] = icmp[3] = 0;
	/* Computed over the whole message: the request's checksum may have been
	 * left for us to check (partial checksum from the host), so it is not
	 * updated incrementally. */
	csum_store(icmp + 2, csum(icmp, len));
	eth_send(nif, slot, frame, ETH_HLEN + IPV4_HLEN + len, 0, 0);
}
