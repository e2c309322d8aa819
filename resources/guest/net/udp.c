#include "udp.h"
#include "bytes.h"
#include "csum.h"
#include "eth.h"
#include "ipv4.h"

#define MAX_BINDINGS 8

struct binding {
	u16 port;
	udp_rx_fn fn;
};

static struct binding bindings[MAX_BINDINGS];

bool udp_bind(u16 port, udp_rx_fn fn)
{
	for (u32 i = 0; i < MAX_BINDINGS; i++) {
		if (!bindings[i].fn) {
			bindings[i].port = port;
			bindings[i].fn = fn;
			return true;
		}
	}
	return false;
}

void udp_input(struct netif *nif, const u8 *src_mac, u32 src_ip, const u8 *d, u32 len)
{
	if (len < UDP_HLEN) {
		nif->rx_dropped++;
		return;
	}
	u32 ulen = get_be16(d + 4);
	if (ulen < UDP_HLEN || ulen > len) {
		nif->rx_dropped++;
		return;
	}
	u16 sport = get_be16(d), dport = get_be16(d + 2);
	for (u32 i = 0; i < MAX_BINDINGS; i++)
		if (bindings[i].fn && bindings[i].port == dport)
			bindings[i].fn(nif, src_mac, src_ip, sport, d + UDP_HLEN, ulen - UDP_HLEN);
}

u32 udp_max_payload(const struct netif *nif)
{
	return nif->mtu > IPV4_HLEN + UDP_HLEN ? nif->mtu - IPV4_HLEN - UDP_HLEN : 0;
}

bool udp_tx_begin(struct netif *nif, struct udp_tx *t, u32 payload_len)
{
	if (payload_len > udp_max_payload(nif))
		return false;
	t->frame = nif->ops->tx_alloc(nif, &t->slot);
	if (!t->frame) {
		nif->tx_dropped++;
		return false;
	}
	t->payload = t->frame + ETH_HLEN + IPV4_HLEN + UDP_HLEN;
	t->payload_len = payload_len;
	return true;
}

void udp_tx_send(struct netif *nif, struct udp_tx *t, const u8 *dst_mac, u32 dst_ip, u16 sport,
		 u16 dport)
{
	u16 ulen = (u16)(UDP_HLEN + t->payload_len);
	u8 *ip = eth_build(t->frame, dst_mac, nif->mac, ETHERTYPE_IPV4);
	u8 *u = ipv4_build(ip, nif->ip, dst_ip, IP_PROTO_UDP, ulen);

	put_be16(u, sport);
	put_be16(u + 2, dport);
	put_be16(u + 4, ulen);
	u64 pseudo = csum_pseudo(nif->ip, dst_ip, IP_PROTO_UDP, ulen);
	if (nif->tx_csum_offload) {
		/* The device sums from csum_start to the end and stores the
		 * complement at csum_start + csum_offset; the field holds the
		 * (uncomplemented) pseudo-header sum meanwhile. */
		csum_store(u + 6, csum_fold(pseudo));
		eth_send(nif, t->slot, t->frame, ETH_HLEN + IPV4_HLEN + ulen,
			 ETH_HLEN + IPV4_HLEN, 6);
		return;
	}
	u[6] = u[7] = 0;
	u16 c = (u16)~csum_fold(csum_add(pseudo, u, ulen));
	csum_store(u + 6, c ? c : 0xffff); /* 0 means "no checksum" in UDP */
	eth_send(nif, t->slot, t->frame, ETH_HLEN + IPV4_HLEN + ulen, 0, 0);
}
