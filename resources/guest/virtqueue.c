#include "virtqueue.h"
#include "io.h"
#include "mem.h"
#include "string.h"

#define AVAIL_FLAGS 0
#define AVAIL_IDX   1
#define AVAIL_RING  2           /* u16 index of ring[0] */
#define USED_FLAGS  0
#define USED_IDX    1
#define USED_RING   2           /* u16 index of ring[0]; 4 u16 per element */
#define VRING_USED_F_NO_NOTIFY 1

static volatile u16 *used_event(struct virtqueue *vq) { return &vq->avail[AVAIL_RING + vq->size]; }
static volatile u16 *avail_event(struct virtqueue *vq) { return &vq->used[USED_RING + 4 * vq->size]; }

bool vq_alloc(struct virtqueue *vq, u16 capacity)
{
	u8 *pages = mem_alloc(3 * PAGE_SIZE, PAGE_SIZE);
	u64 *token = mem_alloc(capacity * sizeof(u64), 8);
	u32 *writable = mem_alloc(capacity * sizeof(u32), 8);

	if (!pages || !token || !writable || capacity > VQ_MAX_SIZE)
		return false;
	vq->desc = (volatile struct vring_desc *)pages;
	vq->avail = (volatile u16 *)(pages + PAGE_SIZE);
	vq->used = (volatile u16 *)(pages + 2 * PAGE_SIZE);
	vq->token = token;
	vq->writable = writable;
	vq->capacity = capacity;
	return true;
}

void vq_reset(struct virtqueue *vq, u16 index, u16 size, bool event_idx, u64 notify_addr)
{
	memset((void *)vq->desc, 0, 3 * PAGE_SIZE);
	memset(vq->token, 0, vq->capacity * sizeof(u64));
	vq->index = index;
	vq->size = size;
	vq->event_idx = event_idx;
	vq->notify_addr = notify_addr;
	for (u16 i = 0; i < size; i++)
		vq->desc[i].next = (u16)(i + 1);
	vq->free_head = 0;
	vq->num_free = size;
	vq->avail_idx = vq->kicked_idx = vq->last_used = 0;
	vq->broken = false;
}

u64 vq_desc_addr(const struct virtqueue *vq) { return (u64)vq->desc; }
u64 vq_avail_addr(const struct virtqueue *vq) { return (u64)vq->avail; }
u64 vq_used_addr(const struct virtqueue *vq) { return (u64)vq->used; }
u16 vq_free_count(const struct virtqueue *vq) { return vq->num_free; }

bool vq_add(struct virtqueue *vq, const struct vq_buf *bufs, u16 n, u64 token)
{
	if (n == 0 || n > vq->num_free || token == 0 || vq->broken)
		return false;
	u16 head = vq->free_head, i = head;
	u32 writable = 0;
	for (u16 k = 0; k < n; k++) {
		volatile struct vring_desc *d = &vq->desc[i];
		d->addr = bufs[k].addr;
		d->len = bufs[k].len;
		d->flags = (u16)((bufs[k].device_writes ? VRING_DESC_F_WRITE : 0) |
				 (k + 1 < n ? VRING_DESC_F_NEXT : 0));
		if (bufs[k].device_writes)
			writable += bufs[k].len;
		if (k + 1 < n)
			i = d->next;
	}
	vq->free_head = vq->desc[i].next;
	vq->num_free = (u16)(vq->num_free - n);
	vq->token[head] = token;
	vq->writable[head] = writable;

	vq->avail[AVAIL_RING + (vq->avail_idx & (vq->size - 1))] = head;
	barrier(); /* x86 keeps stores in order: ring entry before index */
	vq->avail_idx++;
	vq->avail[AVAIL_IDX] = vq->avail_idx;
	return true;
}

static bool need_event(u16 event, u16 new_idx, u16 old_idx)
{
	return (u16)(new_idx - event - 1) < (u16)(new_idx - old_idx);
}

void vq_kick(struct virtqueue *vq)
{
	u16 old = vq->kicked_idx, new_idx = vq->avail_idx;

	if (old == new_idx)
		return;
	vq->kicked_idx = new_idx;
	mb(); /* the index store must be visible before the device's flags are read */
	bool notify = vq->event_idx ? need_event(*avail_event(vq), new_idx, old)
				    : !(vq->used[USED_FLAGS] & VRING_USED_F_NO_NOTIFY);
	if (notify)
		mmio_write32(vq->notify_addr, vq->index);
}

/* Return the chain at `head` to the free list; walks at most size entries. */
static void free_chain(struct virtqueue *vq, u16 head)
{
	u16 i = head, n = 1;

	while ((vq->desc[i].flags & VRING_DESC_F_NEXT) && n < vq->size) {
		i = vq->desc[i].next & (vq->size - 1);
		n++;
	}
	vq->desc[i].next = vq->free_head;
	vq->free_head = head;
	vq->num_free = (u16)(vq->num_free + n);
	vq->token[head] = 0;
}

bool vq_get_used(struct virtqueue *vq, u64 *token, u32 *len)
{
	while (!vq->broken) {
		u16 idx = vq->used[USED_IDX];
		if (idx == vq->last_used)
			return false;
		if ((u16)(idx - vq->last_used) > vq->size ||
		    (u16)(idx - vq->last_used) > (u16)(vq->avail_idx - vq->last_used)) {
			vq->errors++;
			vq->broken = true; /* more used than ever posted */
			return false;
		}
		barrier(); /* x86 keeps loads in order: index before entry */
		volatile u16 *e = &vq->used[USED_RING + 4 * (vq->last_used & (vq->size - 1))];
		u32 id = e[0] | ((u32)e[1] << 16);
		u32 l = e[2] | ((u32)e[3] << 16);
		vq->last_used++;
		if (id >= vq->size || vq->token[id] == 0) {
			vq->errors++; /* not a buffer in flight: skip it */
			continue;
		}
		if (l > vq->writable[id]) {
			vq->errors++;
			l = vq->writable[id];
		}
		*token = vq->token[id];
		*len = l;
		free_chain(vq, (u16)id);
		return true;
	}
	return false;
}

bool vq_arm(struct virtqueue *vq)
{
	if (vq->event_idx)
		*used_event(vq) = vq->last_used;
	mb(); /* publish used_event before looking at the used index again */
	return vq->broken || vq->used[USED_IDX] == vq->last_used;
}
