#include "virtio_mmio.h"
#include "cmdline.h"
#include "io.h"
#include "parse.h"
#include "print.h"
#include "string.h"
#include "tsc.h"

u32 vmmio_read(const struct vmmio_dev *d, u32 reg) { return mmio_read32(d->base + reg); }
void vmmio_write(const struct vmmio_dev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

/* "<size>@<base>:<irq>[:<id>]" as Linux's virtio_mmio_cmdline_set() reads it. */
static bool parse_device(struct str v, struct vmmio_dev *d)
{
	struct str rest, f_size, f_base, f_irq, f_id;
	u64 irq;
	size_t at = 0;

	while (at < v.len && v.p[at] != '@')
		at++;
	if (at == v.len)
		return false;
	f_size.p = v.p;
	f_size.len = at;
	rest.p = v.p + at + 1;
	rest.len = v.len - at - 1;
	if (!str_next_field(&rest, ':', &f_base) || !str_next_field(&rest, ':', &f_irq))
		return false;
	if (rest.p && (!str_next_field(&rest, ':', &f_id) || rest.p))
		return false; /* at most one more field (the platform device id) */
	if (!parse_size(f_size, &d->size) || !parse_u64(f_base, &d->base) ||
	    !parse_u64(f_irq, &irq) || irq > 0xffffffffu)
		return false;
	d->irq = (u32)irq;
	return d->size >= 0x200 && d->base && !(d->base & 0xfff) && d->base < (4ULL << 30);
}

static void skip_line(const char *why, u64 base, const char *tail, u64 v, bool show_v)
{
	print_lock();
	put_str("virtio: ");
	put_str(why);
	put_hex(base);
	put_str(tail);
	if (show_v)
		put_hex(v);
	if (show_v)
		put_char(')');
	put_str(", skipped\n");
	print_unlock();
}

u32 vmmio_find_devices(struct vmmio_dev *out, u32 max)
{
	const char *cursor = NULL;
	struct str v;
	u32 n = 0;

	while (cmdline_next(&cursor, "virtio_mmio.device", &v)) {
		struct vmmio_dev d;
		memset(&d, 0, sizeof(d));
		if (!parse_device(v, &d)) {
			print_lock();
			put_str("virtio: bad virtio_mmio.device=");
			put_strn_printable(v.p, v.len);
			put_str(", skipped\n");
			print_unlock();
			continue;
		}
		u32 magic = vmmio_read(&d, VMMIO_MAGIC);
		if (magic != VIRTIO_MMIO_MAGIC_VALUE) {
			skip_line("no device at ", d.base, " (magic ", magic, true);
			continue;
		}
		u32 version = vmmio_read(&d, VMMIO_VERSION);
		if (version == 1) {
			skip_line("device at ", d.base, " has legacy version 1", 0, false);
			continue;
		}
		if (version != 2) {
			skip_line("device at ", d.base, " has unknown version (", version, true);
			continue;
		}
		d.device_id = vmmio_read(&d, VMMIO_DEVICE_ID);
		if (d.device_id == 0)
			continue; /* a placeholder slot, as in Linux */
		if (n < max)
			out[n++] = d;
	}
	return n;
}

u8 vmmio_status(const struct vmmio_dev *d) { return (u8)vmmio_read(d, VMMIO_STATUS); }

void vmmio_add_status(const struct vmmio_dev *d, u8 bits)
{
	vmmio_write(d, VMMIO_STATUS, vmmio_status(d) | bits);
}

bool vmmio_reset(const struct vmmio_dev *d)
{
	vmmio_write(d, VMMIO_STATUS, 0);
	struct deadline dl = deadline_ms(1000);
	while (vmmio_status(d) != 0) {
		if (deadline_passed(dl))
			return false;
		cpu_relax();
	}
	return true;
}

u64 vmmio_device_features(const struct vmmio_dev *d)
{
	vmmio_write(d, VMMIO_DEVICE_FEATURES_SEL, 0);
	u64 lo = vmmio_read(d, VMMIO_DEVICE_FEATURES);
	vmmio_write(d, VMMIO_DEVICE_FEATURES_SEL, 1);
	u64 hi = vmmio_read(d, VMMIO_DEVICE_FEATURES);
	return lo | hi << 32;
}

void vmmio_driver_features(const struct vmmio_dev *d, u64 features)
{
	vmmio_write(d, VMMIO_DRIVER_FEATURES_SEL, 0);
	vmmio_write(d, VMMIO_DRIVER_FEATURES, (u32)features);
	vmmio_write(d, VMMIO_DRIVER_FEATURES_SEL, 1);
	vmmio_write(d, VMMIO_DRIVER_FEATURES, (u32)(features >> 32));
}

static u16 pow2_floor(u32 n)
{
	u16 p = 1;
	while ((u32)p * 2 <= n && p < VQ_MAX_SIZE)
		p = (u16)(p * 2);
	return p;
}

bool vmmio_queue_setup(const struct vmmio_dev *d, struct virtqueue *vq, u16 index, u16 want,
		       bool event_idx)
{
	vmmio_write(d, VMMIO_QUEUE_SEL, index);
	if (vmmio_read(d, VMMIO_QUEUE_READY) != 0)
		return false;
	u32 max = vmmio_read(d, VMMIO_QUEUE_NUM_MAX);
	if (max == 0)
		return false;
	if (!vq->desc && !vq_alloc(vq, pow2_floor(want)))
		return false;
	u16 size = pow2_floor(max < vq->capacity ? max : vq->capacity);

	vq_reset(vq, index, size, event_idx, d->base + VMMIO_QUEUE_NOTIFY);
	vmmio_write(d, VMMIO_QUEUE_NUM, size);
	vmmio_write(d, VMMIO_QUEUE_DESC_LOW, (u32)vq_desc_addr(vq));
	vmmio_write(d, VMMIO_QUEUE_DESC_HIGH, (u32)(vq_desc_addr(vq) >> 32));
	vmmio_write(d, VMMIO_QUEUE_DRIVER_LOW, (u32)vq_avail_addr(vq));
	vmmio_write(d, VMMIO_QUEUE_DRIVER_HIGH, (u32)(vq_avail_addr(vq) >> 32));
	vmmio_write(d, VMMIO_QUEUE_DEVICE_LOW, (u32)vq_used_addr(vq));
	vmmio_write(d, VMMIO_QUEUE_DEVICE_HIGH, (u32)(vq_used_addr(vq) >> 32));
	vmmio_write(d, VMMIO_QUEUE_READY, 1);
	return true;
}

u32 vmmio_interrupt_ack(const struct vmmio_dev *d)
{
	u32 s = vmmio_read(d, VMMIO_INTERRUPT_STATUS);
	if (s)
		vmmio_write(d, VMMIO_INTERRUPT_ACK, s);
	return s;
}

/* Fields are read with their natural width: 1, 2 or 4 bytes (a 6-byte MAC
 * bytewise). */
void vmmio_config_read(const struct vmmio_dev *d, u32 off, void *buf, u32 len)
{
	u64 a = d->base + VMMIO_CONFIG + off;

	for (int tries = 0; tries < 16; tries++) {
		u32 gen = vmmio_read(d, VMMIO_CONFIG_GENERATION);
		if (len == 2) {
			u16 v = mmio_read16(a);
			memcpy(buf, &v, 2);
		} else if (len == 4) {
			u32 v = mmio_read32(a);
			memcpy(buf, &v, 4);
		} else {
			for (u32 i = 0; i < len; i++)
				((u8 *)buf)[i] = mmio_read8(a + i);
		}
		if (vmmio_read(d, VMMIO_CONFIG_GENERATION) == gen)
			return;
	}
}
