/* virtio-net receive: one device-writable descriptor per buffer, the ring
 * kept full (each used buffer is reposted at once).
 *
 * Buffer layouts (virtio 1.x 5.1.6.3.1):
 *  - MRG_RXBUF: 2 KiB buffers; a frame spans num_buffers of them (a 64 KiB
 *    GSO frame about 33), the header is in the first.
 *  - large receive offloads without MRG_RXBUF: 65562-byte buffers (few).
 *  - otherwise: buffers for the MTU.
 * Frames up to MTU + 18 bytes go to the protocol code (copied together first
 * if they span buffers); longer ones are only accounted ("rx-large: ..."). */
#include "mem.h"
#include "net/eth.h"
#include "print.h"
#include "string.h"
#include "virtio_net_dev.h"
#include "virtio_net_features.h"

#define MRG_BUF_SIZE    2048u
#define BIG_BUF_SIZE    65562u
#define BIG_BUFS        16u
#define RX_MEM_BUDGET   (512u * 1024)

static u32 max_frame(const struct vnet *v)
{
	return v->nif.mtu + ETH_HLEN + 4; /* room for a VLAN tag */
}

bool vnet_rx_setup(struct vnet *v, struct vnet_pair *p)
{
	u32 size, n = p->rxq.size;

	if (v->acked & VIRTIO_NET_F_MRG_RXBUF) {
		size = MRG_BUF_SIZE;
	} else if (v->acked & VIRTIO_NET_GUEST_GSO) {
		size = (BIG_BUF_SIZE + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		if (n > BIG_BUFS)
			n = BIG_BUFS;
	} else {
		size = (VNET_HDR_LEN + max_frame(v) + 63) & ~63u;
		if ((u64)n * size > RX_MEM_BUDGET)
			n = RX_MEM_BUDGET / size > 8 ? RX_MEM_BUDGET / size : 8;
		if (n > p->rxq.size)
			n = p->rxq.size;
	}
	if ((u64)n * size > p->rx_mem_bytes) {
		p->rx_mem = mem_alloc_raw((u64)n * size, PAGE_SIZE);
		p->rx_mem_bytes = p->rx_mem ? (u64)n * size : 0;
	}
	if (max_frame(v) > p->bounce_size) {
		p->bounce = mem_alloc_raw(max_frame(v), 64);
		p->bounce_size = p->bounce ? max_frame(v) : 0;
	}
	p->rx_buf_size = size;
	p->rx_nbufs = n;
	p->frame.remaining = 0;
	return p->rx_mem && p->bounce;
}

static void post(struct vnet_pair *p, u32 b)
{
	struct vq_buf buf = { (u64)(p->rx_mem + (u64)b * p->rx_buf_size), p->rx_buf_size, true };
	vq_add(&p->rxq, &buf, 1, b + 1);
}

void vnet_rx_fill(struct vnet_pair *p)
{
	for (u32 b = 0; b < p->rx_nbufs; b++)
		post(p, b);
}

static void rx_large(struct vnet *v, struct vnet_pair *p, u32 len)
{
	v->nif.rx_large++;
	print_lock();
	put_str("rx-large: len=");
	put_dec(len);
	put_str(" gso_type=");
	put_dec(p->frame.gso_type);
	put_str(" gso_size=");
	put_dec(p->frame.gso_size);
	put_str(" buffers=");
	put_dec(p->frame.nbufs);
	put_char('\n');
	print_unlock();
}

static void deliver(struct vnet *v, struct vnet_pair *p, u8 *frame, u32 len)
{
	v->nif.rx_frames++;
	p->rx_frames++;
	if (len > (u32)v->nif.mtu + ETH_HLEN)
		rx_large(v, p, len);
	if (frame && len <= max_frame(v))
		eth_input(&v->nif, frame, len);
}

/* One used buffer (len bytes written by the device, already clamped to the
 * buffer size by the virtqueue). */
static void rx_buffer(struct vnet *v, struct vnet_pair *p, u8 *buf, u32 len)
{
	if (p->frame.remaining == 0) {
		struct virtio_net_hdr h;
		if (len < VNET_HDR_LEN) {
			v->nif.rx_dropped++;
			return;
		}
		memcpy(&h, buf, VNET_HDR_LEN);
		u32 nbufs = (v->acked & VIRTIO_NET_F_MRG_RXBUF) ? h.num_buffers : 1;
		if (nbufs == 0 || nbufs > p->rx_nbufs) {
			v->nif.rx_dropped++; /* cannot be: more buffers than were posted */
			return;
		}
		p->frame.nbufs = (u16)nbufs;
		p->frame.gso_type = h.gso_type;
		p->frame.gso_size = h.gso_size;
		p->frame.len = len - VNET_HDR_LEN;
		if (nbufs == 1) {
			deliver(v, p, buf + VNET_HDR_LEN, p->frame.len);
			return;
		}
		p->frame.remaining = (u16)(nbufs - 1);
		p->frame.fits = p->frame.len <= p->bounce_size;
		if (p->frame.fits)
			memcpy(p->bounce, buf + VNET_HDR_LEN, p->frame.len);
		return;
	}

	/* A further buffer of a merged frame: data only. */
	if (p->frame.fits && p->frame.len + len <= p->bounce_size)
		memcpy(p->bounce + p->frame.len, buf, len);
	else
		p->frame.fits = false;
	p->frame.len += len;
	if (--p->frame.remaining == 0)
		deliver(v, p, p->frame.fits ? p->bounce : NULL, p->frame.len);
}

/* Replies to what pair `pair` received go out on that pair (v->cur). */
void vnet_rx_poll(struct vnet *v, u16 pair)
{
	struct vnet_pair *p = &v->pairs[pair];
	u64 token;
	u32 len;
	bool posted = false;

	v->cur = pair;
	do {
		while (vq_get_used(&p->rxq, &token, &len)) {
			u32 b = (u32)(token - 1);
			if (b >= p->rx_nbufs)
				continue; /* not one of ours (cannot be: tokens are checked) */
			rx_buffer(v, p, p->rx_mem + (u64)b * p->rx_buf_size, len);
			post(p, b);
			posted = true;
		}
	} while (!vq_arm(&p->rxq));
	if (posted)
		vq_kick(&p->rxq);
	v->cur = 0;
}
