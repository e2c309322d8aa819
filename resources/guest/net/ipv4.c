#include "ipv4.h"
#include "bytes.h"
#include "csum.h"
#include "icmp.h"
#include "udp.h"

#define IP_FLAG_MF     0x2000
#define IP_FRAG_OFFSET 0x1fff
#define DEFAULT_TTL    64

static u16 next_id;

void ipv4_input(struct netif *nif, const u8 *frame, const u8 *p, u32 len)
{
	if (len < IPV4_HLEN || (p[0] >> 4) != 4) {
		nif->rx_dropped++;
		return;
	}
	u32 hlen = (p[0] & 0xf) * 4u, total = get_be16(p + 2);
	if (hlen < IPV4_HLEN || total < hlen || total > len || csum(p, hlen) != 0) {
		nif->rx_dropped++;
		return;
	}
	if (get_be16(p + 6) & (IP_FLAG_MF | IP_FRAG_OFFSET))
		return; /* fragments are not reassembled */
	u32 src = get_be32(p + 12), dst = get_be32(p + 16);
	if (!nif->has_ip || dst != nif->ip)
		return;

	const u8 *src_mac = frame + ETH_ALEN;
	const u8 *payload = p + hlen;
	u32 plen = total - hlen; /* drops Ethernet padding */
	if (p[9] == IP_PROTO_ICMP)
		icmp_input(nif, src_mac, src, payload, plen);
	else if (p[9] == IP_PROTO_UDP)
		udp_input(nif, src_mac, src, payload, plen);
}

u8 *ipv4_build(u8 *p, u32 src, u32 dst, u8 proto, u32 payload_len)
{
	p[0] = 0x45;
	p[1] = 0;
	put_be16(p + 2, (u16)(IPV4_HLEN + payload_len));
	put_be16(p + 4, next_id++);
	put_be16(p + 6, 0);
	p[8] = DEFAULT_TTL;
	p[9] = proto;
	p[10] = p[11] = 0;
	put_be32(p + 12, src);
	put_be32(p + 16, dst);
	csum_store(p + 10, csum(p, IPV4_HLEN));
	return p + IPV4_HLEN;
}

u32 ipv4_next_hop(const struct netif *nif, u32 dst)
{
	if (((dst ^ nif->ip) & nif->netmask) == 0)
		return dst;
	return nif->gateway;
}
