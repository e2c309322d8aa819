#include "fakedev.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fdev fdevs[FD_MAX];

void fd_setup(u32 n, u64 features, const u8 mac[6], u16 mtu, u16 status)
{
	memset(fdevs, 0, sizeof(fdevs));
	for (u32 i = 0; i < n; i++) {
		struct fdev *d = &fdevs[i];
		d->present = true;
		d->version = 2;
		d->device_id = 1;
		d->features = features;
		memcpy(d->cfg, mac, 6);
		d->cfg[5] = (u8)(d->cfg[5] + i);
		d->cfg[6] = (u8)status;
		d->cfg[7] = (u8)(status >> 8);
		d->cfg[8] = 1; /* max_virtqueue_pairs (read when MQ is offered) */
		d->cfg[10] = (u8)mtu;
		d->cfg[11] = (u8)(mtu >> 8);
		for (int q = 0; q < 3; q++)
			d->q[q].num_max = 256;
	}
}

bool host_is_mmio(u64 a) { return a >= FD_BASE && a < FD_BASE + FD_MAX * 0x1000; }

static void reset(struct fdev *d)
{
	d->status = 0;
	d->isr = 0;
	d->drv_features = 0;
	for (int q = 0; q < 3; q++) {
		u32 max = d->q[q].num_max;
		memset(&d->q[q], 0, sizeof(d->q[q]));
		d->q[q].num_max = max;
	}
	d->resets++;
}

u64 host_mmio_read(u64 a, u32 size)
{
	struct fdev *d = &fdevs[(a - FD_BASE) / 0x1000];
	u32 off = (u32)(a & 0xfff);
	struct fq *q = d->qsel < 3 ? &d->q[d->qsel] : NULL;

	if (!d->present)
		return ~0ULL;
	if (off >= 0x100) {
		u64 v = 0;
		for (u32 i = 0; i < size && off - 0x100 + i < sizeof(d->cfg); i++)
			v |= (u64)d->cfg[off - 0x100 + i] << (8 * i);
		return v;
	}
	switch (off) {
	case 0x000: return 0x74726976;
	case 0x004: return d->version;
	case 0x008: return d->device_id;
	case 0x00c: return 0x554d4551;
	case 0x010: return d->dfsel == 0 ? (u32)d->features : d->dfsel == 1 ? (u32)(d->features >> 32) : 0;
	case 0x034: return q ? q->num_max : 0;
	case 0x044: return q ? q->ready : 0;
	case 0x060: return d->isr;
	case 0x070: return d->status;
	case 0x0fc: return d->gen;
	default: return 0;
	}
}

static void set_lo(u64 *p, u64 v) { *p = (*p & ~0xffffffffULL) | (v & 0xffffffffULL); }
static void set_hi(u64 *p, u64 v) { *p = (*p & 0xffffffffULL) | (v << 32); }

void host_mmio_write(u64 a, u32 size, u64 v)
{
	struct fdev *d = &fdevs[(a - FD_BASE) / 0x1000];
	u32 off = (u32)(a & 0xfff);
	struct fq *q = d->qsel < 3 ? &d->q[d->qsel] : NULL;

	(void)size;
	switch (off) {
	case 0x014: d->dfsel = (u32)v; break;
	case 0x020:
		if (d->drvsel == 0)
			set_lo(&d->drv_features, v);
		else if (d->drvsel == 1)
			set_hi(&d->drv_features, v);
		break;
	case 0x024: d->drvsel = (u32)v; break;
	case 0x030: d->qsel = (u32)v; break;
	case 0x038: if (q) q->num = (u32)v; break;
	case 0x044: if (q) q->ready = (u32)v; break;
	case 0x050: if (v < 3) d->q[v].notifies++; break;
	case 0x064: d->isr &= ~(u32)v; break;
	case 0x070:
		if (v == 0) {
			reset(d);
			break;
		}
		if ((v & 0x08) && (d->refuse_features || (d->drv_features & ~d->features)))
			v &= ~0x08ULL;
		d->status = (u32)v;
		break;
	case 0x080: if (q) set_lo(&q->desc, v); break;
	case 0x084: if (q) set_hi(&q->desc, v); break;
	case 0x090: if (q) set_lo(&q->avail, v); break;
	case 0x094: if (q) set_hi(&q->avail, v); break;
	case 0x0a0: if (q) set_lo(&q->used, v); break;
	case 0x0a4: if (q) set_hi(&q->used, v); break;
	default: break;
	}
}

bool fq_pop(struct fq *q, u16 *head)
{
	volatile u16 *avail = (volatile u16 *)q->avail;

	if (!q->ready || q->last_avail == avail[1])
		return false;
	*head = avail[2 + q->last_avail % q->num];
	q->last_avail++;
	return true;
}

void fq_desc(struct fq *q, u16 i, u64 *addr, u32 *len, u16 *flags, u16 *next)
{
	volatile u8 *d = (volatile u8 *)q->desc + 16 * (i % q->num);
	*addr = *(volatile u64 *)d;
	*len = *(volatile u32 *)(d + 8);
	*flags = *(volatile u16 *)(d + 12);
	*next = *(volatile u16 *)(d + 14);
}

void fq_push(struct fq *q, u32 id, u32 len)
{
	volatile u32 *e = (volatile u32 *)((volatile u8 *)q->used + 4 + 8 * (q->used_idx % q->num));
	e[0] = id;
	e[1] = len;
	q->used_idx++;
	((volatile u16 *)q->used)[1] = q->used_idx;
}
