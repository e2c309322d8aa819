/* A virtio-mmio (version 2) network device model for the host harness: the
 * registers, split rings read and written from the "device side", config
 * space. Up to FD_MAX devices at FD_BASE + 4 KiB * n. */
#ifndef HOSTTEST_FAKEDEV_H
#define HOSTTEST_FAKEDEV_H

#include "types.h"

#define FD_BASE 0xd0000000ULL
#define FD_MAX  4

struct fq {
	u32 num, num_max, ready;
	u64 desc, avail, used;
	u16 last_avail, used_idx;
	u32 notifies;
};

struct fdev {
	bool present;
	u32 version, device_id;
	u64 features, drv_features;
	u32 dfsel, drvsel, status, isr, qsel;
	struct fq q[3];
	u8 cfg[16];
	u32 gen;
	bool refuse_features;
	u32 resets;
};

extern struct fdev fdevs[FD_MAX];

void fd_setup(u32 n, u64 features, const u8 mac[6], u16 mtu, u16 status);
/* Device side of a queue: next available chain head. */
bool fq_pop(struct fq *q, u16 *head);
/* Descriptor i of q. */
void fq_desc(struct fq *q, u16 i, u64 *addr, u32 *len, u16 *flags, u16 *next);
void fq_push(struct fq *q, u32 id, u32 len); /* used entry, published at once */
/* Raise InterruptStatus bits and run the guest's IRQ handler and poll. */
void fd_interrupt(u32 dev, u32 bits);
/* Which IRQ handler the driver registered (vector -> fn). */
void host_irq_run(u32 vector);

#endif
