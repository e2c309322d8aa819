/* virtio-mmio transport, version 2 (modern) only (virtio 1.x, 4.2). Devices
 * come from the command line in Linux's format, one word per device:
 *   virtio_mmio.device=<size>@<base>:<irq>[:<id>]
 * (size like 4K or 0x1000, base like 0xd0000000, irq decimal). */
#ifndef GUEST_VIRTIO_MMIO_H
#define GUEST_VIRTIO_MMIO_H

#include "types.h"
#include "virtqueue.h"

#define VIRTIO_MMIO_MAX_DEVICES 16

/* Register offsets. */
#define VMMIO_MAGIC            0x000
#define VMMIO_VERSION          0x004
#define VMMIO_DEVICE_ID        0x008
#define VMMIO_VENDOR_ID        0x00c
#define VMMIO_DEVICE_FEATURES  0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES  0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL        0x030
#define VMMIO_QUEUE_NUM_MAX    0x034
#define VMMIO_QUEUE_NUM        0x038
#define VMMIO_QUEUE_READY      0x044
#define VMMIO_QUEUE_NOTIFY     0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK    0x064
#define VMMIO_STATUS           0x070
#define VMMIO_QUEUE_DESC_LOW   0x080
#define VMMIO_QUEUE_DESC_HIGH  0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG           0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976u /* "virt" */

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE  0x01
#define VIRTIO_STATUS_DRIVER       0x02
#define VIRTIO_STATUS_DRIVER_OK    0x04
#define VIRTIO_STATUS_FEATURES_OK  0x08
#define VIRTIO_STATUS_NEEDS_RESET  0x40
#define VIRTIO_STATUS_FAILED       0x80

/* InterruptStatus bits. */
#define VIRTIO_INT_USED_BUFFER   0x1
#define VIRTIO_INT_CONFIG_CHANGE 0x2

struct vmmio_dev {
	u64 base;
	u64 size;
	u32 irq;
	u32 device_id;
};

/* Parse every virtio_mmio.device= word and look at each device: modern ones
 * with a non-zero device ID are returned in command line order. Prints
 *   virtio: device at 0x<base> has legacy version 1, skipped
 *   virtio: bad virtio_mmio.device=<value>, skipped
 *   virtio: no device at 0x<base> (magic 0x<value>), skipped  */
u32 vmmio_find_devices(struct vmmio_dev *out, u32 max);

u32 vmmio_read(const struct vmmio_dev *d, u32 reg);
void vmmio_write(const struct vmmio_dev *d, u32 reg, u32 v);

/* Write 0 to Status and wait (bounded) until it reads back 0. */
bool vmmio_reset(const struct vmmio_dev *d);
u8 vmmio_status(const struct vmmio_dev *d);
void vmmio_add_status(const struct vmmio_dev *d, u8 bits);
u64 vmmio_device_features(const struct vmmio_dev *d);
void vmmio_driver_features(const struct vmmio_dev *d, u64 features);

/* Set up queue `index` with up to `want` entries (rounded down to a power of
 * two and to QueueNumMax), allocating the ring memory on first use (sized
 * for `want`), and set QueueReady. False if the queue does not exist, is
 * already live, or memory ran out. */
bool vmmio_queue_setup(const struct vmmio_dev *d, struct virtqueue *vq, u16 index, u16 want,
		       bool event_idx);

/* Read InterruptStatus and acknowledge what it holds; returns it. */
u32 vmmio_interrupt_ack(const struct vmmio_dev *d);

/* Device config space, each field read with its own width; the generation
 * counter is checked around the whole read (retried if it changed). */
void vmmio_config_read(const struct vmmio_dev *d, u32 off, void *buf, u32 len);

#endif
