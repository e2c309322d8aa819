/* Internals of the virtio-net driver shared by virtio_net*.c. */
#ifndef GUEST_VIRTIO_NET_DEV_H
#define GUEST_VIRTIO_NET_DEV_H

#include "net/netif.h"
#include "types.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

/* struct virtio_net_hdr of virtio 1.0 (always 12 bytes with VERSION_1). */
struct virtio_net_hdr {
	u8 flags;
	u8 gso_type;
	u16 hdr_len;
	u16 gso_size;
	u16 csum_start;
	u16 csum_offset;
	u16 num_buffers;
} __attribute__((packed));

#define VNET_HDR_LEN 12
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1

/* Queues: receive 2k, transmit 2k + 1 of pair k, then the control queue
 * (2 * max_virtqueue_pairs with MQ, else 2). */
#define VNET_RXQ(k)     (2 * (k))
#define VNET_TXQ(k)     (2 * (k) + 1)
#define VNET_MAX_PAIRS  4     /* pairs the driver uses at most */

/* Config space (virtio 1.x 5.1.4). */
#define VNET_CFG_MAC    0
#define VNET_CFG_STATUS 6
#define VNET_CFG_MAX_PAIRS 8
#define VNET_CFG_MTU    10
#define VIRTIO_NET_S_LINK_UP  1
#define VIRTIO_NET_S_ANNOUNCE 2

/* One receive/transmit queue pair with its buffers. */
struct vnet_pair {
	struct virtqueue rxq, txq;
	u64 rx_frames, tx_frames;

	/* Receive buffers: rx_nbufs of rx_buf_size bytes, one descriptor each. */
	u8 *rx_mem;
	u64 rx_mem_bytes;
	u32 rx_buf_size, rx_nbufs;
	u8 *bounce;           /* a frame of up to mtu + 18 spread over buffers */
	u32 bounce_size;      /* allocated */
	struct {
		u16 remaining;    /* buffers still to come (mergeable buffers) */
		u16 nbufs;
		u32 len;
		bool fits;
		u8 gso_type;
		u16 gso_size;
	} frame;

	/* Transmit slots: header + frame each, one descriptor. */
	u8 *tx_mem;
	u64 tx_mem_bytes;
	u32 tx_slot_size, tx_nslots;
	u16 *tx_free;
	u32 tx_nfree;
};

struct vnet {
	u32 index;
	struct vmmio_dev mmio;
	bool live;            /* DRIVER_OK set, queues running */
	bool irq_routed;
	u64 offered, acked;
	u16 cfg_status;
	struct netif nif;
	/* Pairs set up (all the device has, up to VNET_MAX_PAIRS; 1 without
	 * MQ), the device's max_virtqueue_pairs, and the pair frames go out
	 * on (the one the frame being answered came in on). */
	u16 npairs, max_pairs, cur;
	struct vnet_pair pairs[VNET_MAX_PAIRS];
	struct virtqueue ctrlq;

	/* Control queue commands in one page. */
	u8 *ctrl_mem;
	u32 ctrl_busy;        /* bitmap of slots in flight */
	bool announce_pending;

	u32 isr_pending;      /* InterruptStatus bits seen by the IRQ handler */
};

/* virtio_net_rx.c */
bool vnet_rx_setup(struct vnet *v, struct vnet_pair *p); /* buffers for the features/MTU */
void vnet_rx_fill(struct vnet_pair *p);                  /* post every buffer */
void vnet_rx_poll(struct vnet *v, u16 pair);

/* virtio_net_tx.c */
extern const struct netif_ops vnet_netif_ops;
bool vnet_tx_setup(struct vnet *v, struct vnet_pair *p);
void vnet_tx_reclaim(struct vnet_pair *p);

/* virtio_net_ctrl.c */
bool vnet_ctrl_setup(struct vnet *v);
bool vnet_ctrl_send(struct vnet *v, u8 cls, u8 cmd, const void *data, u32 len);
void vnet_ctrl_poll(struct vnet *v);
#define VIRTIO_NET_CTRL_ANNOUNCE     3
#define VIRTIO_NET_CTRL_ANNOUNCE_ACK 0
#define VIRTIO_NET_CTRL_MQ           4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0

/* "virtio-net<i>: " under the print lock (caller unlocks). */
void vnet_print_prefix(const struct vnet *v);

#endif
