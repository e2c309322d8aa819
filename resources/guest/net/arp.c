#include "arp.h"
#include "bytes.h"
#include "eth.h"
#include "string.h"

#define ARP_LEN       28
#define ARP_REQUEST   1
#define ARP_REPLY     2
#define CACHE_ENTRIES 16

struct arp_entry {
	bool used;
	u32 nif;
	u32 ip;
	u8 mac[ETH_ALEN];
};

static struct arp_entry cache[CACHE_ENTRIES];
static u32 next_victim;

static struct arp_entry *find(const struct netif *nif, u32 ip)
{
	for (u32 i = 0; i < CACHE_ENTRIES; i++)
		if (cache[i].used && cache[i].nif == nif->index && cache[i].ip == ip)
			return &cache[i];
	return NULL;
}

static void learn(const struct netif *nif, u32 ip, const u8 *mac)
{
	struct arp_entry *e = find(nif, ip);

	if (!e) {
		e = &cache[next_victim];
		next_victim = (next_victim + 1) % CACHE_ENTRIES;
	}
	e->used = true;
	e->nif = nif->index;
	e->ip = ip;
	memcpy(e->mac, mac, ETH_ALEN);
}

bool arp_lookup(const struct netif *nif, u32 ip, u8 *mac)
{
	const struct arp_entry *e = find(nif, ip);

	if (e)
		memcpy(mac, e->mac, ETH_ALEN);
	return e != NULL;
}

static void arp_send(struct netif *nif, u16 op, const u8 *eth_dst, const u8 *tha, u32 tpa)
{
	u32 slot;
	u8 *frame = nif->ops->tx_alloc(nif, &slot);

	if (!frame) {
		nif->tx_dropped++;
		return;
	}
	u8 *p = eth_build(frame, eth_dst, nif->mac, ETHERTYPE_ARP);
	put_be16(p, 1);               /* Ethernet */
	put_be16(p + 2, ETHERTYPE_IPV4);
	p[4] = ETH_ALEN;
	p[5] = 4;
	put_be16(p + 6, op);
	memcpy(p + 8, nif->mac, ETH_ALEN);
	put_be32(p + 14, nif->ip);
	memcpy(p + 18, tha, ETH_ALEN);
	put_be32(p + 24, tpa);
	eth_send(nif, slot, frame, ETH_HLEN + ARP_LEN, 0, 0);
}

void arp_input(struct netif *nif, const u8 *p, u32 len)
{
	if (len < ARP_LEN || get_be16(p) != 1 || get_be16(p + 2) != ETHERTYPE_IPV4 ||
	    p[4] != ETH_ALEN || p[5] != 4) {
		nif->rx_dropped++;
		return;
	}
	u16 op = get_be16(p + 6);
	const u8 *sha = p + 8;
	u32 spa = get_be32(p + 14), tpa = get_be32(p + 24);

	if (!nif->has_ip)
		return;
	if (spa != 0 && spa != nif->ip && (tpa == nif->ip || find(nif, spa)))
		learn(nif, spa, sha); /* RFC 826: update known senders, add those asking us */
	if (op == ARP_REQUEST && tpa == nif->ip && spa != nif->ip)
		arp_send(nif, ARP_REPLY, sha, sha, spa);
	else if (op == ARP_REPLY && spa != 0 && spa != nif->ip)
		learn(nif, spa, sha);
}

void arp_request(struct netif *nif, u32 ip)
{
	static const u8 zero[ETH_ALEN];

	if (nif->has_ip)
		arp_send(nif, ARP_REQUEST, eth_broadcast, zero, ip);
}

void arp_gratuitous(struct netif *nif)
{
	static const u8 zero[ETH_ALEN];

	if (nif->has_ip)
		arp_send(nif, ARP_REQUEST, eth_broadcast, zero, nif->ip);
}
