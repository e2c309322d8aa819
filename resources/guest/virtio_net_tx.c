/* virtio-net transmit: fixed slots (12-byte header + frame, one readable
 * descriptor each), reclaimed from the used ring. A frame goes out on pair
 * v->cur (the pair the frame it answers came in on; 0 otherwise): its slot
 * number carries the pair in the high 16 bits. */
#include "io.h"
#include "mem.h"
#include "string.h"
#include "virtio_net_dev.h"
#include "virtio_net_features.h"

#define TX_MEM_BUDGET  (512u * 1024)

bool vnet_tx_setup(struct vnet *v, struct vnet_pair *p)
{
	u32 slot = (VNET_HDR_LEN + v->nif.mtu + ETH_HLEN + 4 + 63) & ~63u;
	u32 n = p->txq.size;

	if (n * slot > TX_MEM_BUDGET)
		n = TX_MEM_BUDGET / slot > 8 ? TX_MEM_BUDGET / slot : 8;
	if (n > p->txq.size)
		n = p->txq.size;
	if (!p->tx_free)
		p->tx_free = mem_alloc(VQ_MAX_SIZE * sizeof(u16), 8);
	if ((u64)n * slot > p->tx_mem_bytes) { /* first time, or a larger MTU after a reset */
		p->tx_mem = mem_alloc_raw((u64)n * slot, PAGE_SIZE);
		p->tx_mem_bytes = p->tx_mem ? (u64)n * slot : 0;
	}
	if (!p->tx_mem || !p->tx_free)
		return false;
	p->tx_slot_size = slot;
	p->tx_nslots = n;
	p->tx_nfree = p->tx_nslots;
	for (u32 i = 0; i < p->tx_nslots; i++)
		p->tx_free[i] = (u16)i;
	return true;
}

void vnet_tx_reclaim(struct vnet_pair *p)
{
	u64 token;
	u32 len;

	do {
		while (vq_get_used(&p->txq, &token, &len))
			if (token <= p->tx_nslots && p->tx_nfree < p->tx_nslots)
				p->tx_free[p->tx_nfree++] = (u16)(token - 1);
	} while (!vq_arm(&p->txq));
}

static u8 *tx_alloc(struct netif *nif, u32 *slot)
{
	struct vnet *v = nif->driver;
	struct vnet_pair *p = &v->pairs[v->cur < v->npairs ? v->cur : 0];
	u32 i;

	if (!v->live)
		return NULL;
	if (p->tx_nfree == 0)
		vnet_tx_reclaim(p);
	if (p->tx_nfree == 0)
		return NULL;
	i = p->tx_free[--p->tx_nfree];
	*slot = ((u32)(p - v->pairs) << 16) | i;
	return p->tx_mem + (u64)i * p->tx_slot_size + VNET_HDR_LEN;
}

static void tx_send(struct netif *nif, u32 slot, u32 len, u16 csum_start, u16 csum_offset)
{
	struct vnet *v = nif->driver;
	struct vnet_pair *p = &v->pairs[(slot >> 16) < v->npairs ? (slot >> 16) : 0];
	u32 i = slot & 0xffff;
	u8 *buf = p->tx_mem + (u64)i * p->tx_slot_size;
	struct virtio_net_hdr h;

	memset(&h, 0, sizeof(h));
	if (csum_start && (v->acked & VIRTIO_NET_F_CSUM)) {
		h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
		h.csum_start = csum_start;
		h.csum_offset = csum_offset;
	}
	memcpy(buf, &h, VNET_HDR_LEN);

	struct vq_buf b = { (u64)buf, VNET_HDR_LEN + len, false };
	if (!vq_add(&p->txq, &b, 1, i + 1)) { /* cannot happen: a slot per entry */
		p->tx_free[p->tx_nfree++] = (u16)i;
		nif->tx_dropped++;
		return;
	}
	p->tx_frames++;
}

static void tx_flush(struct netif *nif)
{
	struct vnet *v = nif->driver;

	if (!v->live)
		return;
	for (u16 k = 0; k < v->npairs; k++)
		vq_kick(&v->pairs[k].txq);
}

const struct netif_ops vnet_netif_ops = { tx_alloc, tx_send, tx_flush };
