/* virtio-net transmit: fixed slots (12-byte header + frame, one readable
 * descriptor each), reclaimed from the used ring. */
#include "io.h"
#include "mem.h"
#include "string.h"
#include "virtio_net_dev.h"
#include "virtio_net_features.h"

#define TX_MEM_BUDGET  (512u * 1024)

bool vnet_tx_setup(struct vnet *v)
{
	u32 slot = (VNET_HDR_LEN + v->nif.mtu + ETH_HLEN + 4 + 63) & ~63u;
	u32 n = v->txq.size;

	if (n * slot > TX_MEM_BUDGET)
		n = TX_MEM_BUDGET / slot > 8 ? TX_MEM_BUDGET / slot : 8;
	if (n > v->txq.size)
		n = v->txq.size;
	if (!v->tx_free)
		v->tx_free = mem_alloc(VQ_MAX_SIZE * sizeof(u16), 8);
	if ((u64)n * slot > v->tx_mem_bytes) { /* first time, or a larger MTU after a reset */
		v->tx_mem = mem_alloc_raw((u64)n * slot, PAGE_SIZE);
		v->tx_mem_bytes = v->tx_mem ? (u64)n * slot : 0;
	}
	if (!v->tx_mem || !v->tx_free)
		return false;
	v->tx_slot_size = slot;
	v->tx_nslots = n;
	v->tx_nfree = v->tx_nslots;
	for (u32 i = 0; i < v->tx_nslots; i++)
		v->tx_free[i] = (u16)i;
	return true;
}

void vnet_tx_reclaim(struct vnet *v)
{
	u64 token;
	u32 len;

	do {
		while (vq_get_used(&v->txq, &token, &len))
			if (token <= v->tx_nslots && v->tx_nfree < v->tx_nslots)
				v->tx_free[v->tx_nfree++] = (u16)(token - 1);
	} while (!vq_arm(&v->txq));
}

static u8 *tx_alloc(struct netif *nif, u32 *slot)
{
	struct vnet *v = nif->driver;

	if (!v->live)
		return NULL;
	if (v->tx_nfree == 0)
		vnet_tx_reclaim(v);
	if (v->tx_nfree == 0)
		return NULL;
	*slot = v->tx_free[--v->tx_nfree];
	return v->tx_mem + (u64)*slot * v->tx_slot_size + VNET_HDR_LEN;
}

static void tx_send(struct netif *nif, u32 slot, u32 len, u16 csum_start, u16 csum_offset)
{
	struct vnet *v = nif->driver;
	u8 *buf = v->tx_mem + (u64)slot * v->tx_slot_size;
	struct virtio_net_hdr h;

	memset(&h, 0, sizeof(h));
	if (csum_start && (v->acked & VIRTIO_NET_F_CSUM)) {
		h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
		h.csum_start = csum_start;
		h.csum_offset = csum_offset;
	}
	memcpy(buf, &h, VNET_HDR_LEN);

	struct vq_buf b = { (u64)buf, VNET_HDR_LEN + len, false };
	if (!vq_add(&v->txq, &b, 1, slot + 1)) { /* cannot happen: a slot per entry */
		v->tx_free[v->tx_nfree++] = (u16)slot;
		nif->tx_dropped++;
	}
}

static void tx_flush(struct netif *nif)
{
	struct vnet *v = nif->driver;

	if (v->live)
		vq_kick(&v->txq);
}

const struct netif_ops vnet_netif_ops = { tx_alloc, tx_send, tx_flush };
