/* virtio-net control queue: commands in fixed 64-byte slots of one page,
 * {class, command, data...} readable by the device and an ack byte it
 * writes; completions are reported when they come back. */
#include "mem.h"
#include "print.h"
#include "string.h"
#include "virtio_net_dev.h"

#define SLOT_SIZE   64u
#define SLOTS       16u
#define ACK_OFFSET  48u
#define MAX_DATA    (ACK_OFFSET - 2)
#define VIRTIO_NET_OK 0

bool vnet_ctrl_setup(struct vnet *v)
{
	if (!v->ctrl_mem)
		v->ctrl_mem = mem_alloc(PAGE_SIZE, PAGE_SIZE);
	v->ctrl_busy = 0;
	v->announce_pending = false;
	return v->ctrl_mem != NULL;
}

bool vnet_ctrl_send(struct vnet *v, u8 cls, u8 cmd, const void *data, u32 len)
{
	u32 slot = 0;

	if (!v->ctrl_mem || !v->ctrlq.size || len > MAX_DATA)
		return false;
	while (slot < SLOTS && (v->ctrl_busy & (1u << slot)))
		slot++;
	if (slot == SLOTS)
		return false;

	u8 *p = v->ctrl_mem + slot * SLOT_SIZE;
	p[0] = cls;
	p[1] = cmd;
	if (len)
		memcpy(p + 2, data, len);
	p[ACK_OFFSET] = 0xff;
	struct vq_buf bufs[2] = {
		{ (u64)p, 2 + len, false },
		{ (u64)(p + ACK_OFFSET), 1, true },
	};
	if (!vq_add(&v->ctrlq, bufs, 2, slot + 1))
		return false;
	v->ctrl_busy |= 1u << slot;
	vq_kick(&v->ctrlq);
	return true;
}

static void completed(struct vnet *v, u32 slot, u32 len)
{
	const u8 *p = v->ctrl_mem + slot * SLOT_SIZE;
	u8 ack = len >= 1 ? p[ACK_OFFSET] : 0xff;

	print_lock();
	vnet_print_prefix(v);
	if (p[0] == VIRTIO_NET_CTRL_ANNOUNCE && p[1] == VIRTIO_NET_CTRL_ANNOUNCE_ACK) {
		v->announce_pending = false;
		put_str("ctrl announce-ack");
	} else {
		put_str("ctrl class=");
		put_dec(p[0]);
		put_str(" cmd=");
		put_dec(p[1]);
	}
	put_str(ack == VIRTIO_NET_OK ? " ok\n" : " failed ack=");
	if (ack != VIRTIO_NET_OK) {
		put_dec(ack);
		put_char('\n');
	}
	print_unlock();
}

void vnet_ctrl_poll(struct vnet *v)
{
	u64 token;
	u32 len;

	if (!v->ctrlq.size)
		return;
	do {
		while (vq_get_used(&v->ctrlq, &token, &len)) {
			u32 slot = (u32)(token - 1);
			if (slot >= SLOTS || !(v->ctrl_busy & (1u << slot)))
				continue;
			v->ctrl_busy &= ~(1u << slot);
			completed(v, slot, len);
		}
	} while (!vq_arm(&v->ctrlq));
}
