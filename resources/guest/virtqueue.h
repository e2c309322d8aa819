/* Split virtqueues (virtio 1.x, 2.7) in guest memory: one page each for the
 * descriptor table, the driver (avail) ring and the device (used) ring.
 * Interrupts are always enabled; with VIRTIO_F_EVENT_IDX the driver publishes
 * used_event and honours avail_event.
 *
 * Nothing the device writes is trusted: used ids outside the ring or not in
 * flight, lengths beyond the posted buffers and used indexes that run ahead
 * of what was posted are counted as errors and skipped. */
#ifndef GUEST_VIRTQUEUE_H
#define GUEST_VIRTQUEUE_H

#include "types.h"

#define VQ_MAX_SIZE 256

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

#define VRING_DESC_F_NEXT  1
#define VRING_DESC_F_WRITE 2

struct vq_buf {
	u64 addr;
	u32 len;
	bool device_writes;
};

struct virtqueue {
	u16 index;          /* queue number on the device */
	u16 size;           /* entries in use (power of two, <= capacity) */
	u16 capacity;       /* entries the memory was sized for */
	bool event_idx;
	volatile struct vring_desc *desc;
	volatile u16 *avail;   /* flags, idx, ring[size], used_event */
	volatile u16 *used;    /* flags, idx, {u32 id, u32 len}[size], avail_event */
	u16 free_head, num_free;
	u16 avail_idx;      /* next avail index to publish */
	u16 kicked_idx;     /* avail index at the last notification decision */
	u16 last_used;      /* next used index to consume */
	u64 *token;         /* per head descriptor: caller's token, 0 = free */
	u32 *writable;      /* per head: device-writable bytes in the chain */
	u64 notify_addr;    /* MMIO QueueNotify register */
	u64 errors;         /* bad used entries seen */
	bool broken;        /* the used index ran ahead: stop using the queue */
};

/* Memory for up to `capacity` entries (a power of two <= VQ_MAX_SIZE). */
bool vq_alloc(struct virtqueue *vq, u16 capacity);
/* Empty rings of `size` (<= capacity) entries for queue `index`. */
void vq_reset(struct virtqueue *vq, u16 index, u16 size, bool event_idx, u64 notify_addr);
u64 vq_desc_addr(const struct virtqueue *vq);
u64 vq_avail_addr(const struct virtqueue *vq);
u64 vq_used_addr(const struct virtqueue *vq);

/* Post a chain of n buffers with a non-zero token; false if no room. */
bool vq_add(struct virtqueue *vq, const struct vq_buf *bufs, u16 n, u64 token);
/* Notify the device of new buffers unless it asked not to be (QueueNotify). */
void vq_kick(struct virtqueue *vq);
/* Next used buffer: its token and the length the device reported (clamped
 * to what the chain can hold). False if none. */
bool vq_get_used(struct virtqueue *vq, u64 *token, u32 *len);
/* After draining: ask for an interrupt at the next used buffer. Returns false
 * if more buffers were used meanwhile (drain again). */
bool vq_arm(struct virtqueue *vq);
u16 vq_free_count(const struct virtqueue *vq);

#endif
