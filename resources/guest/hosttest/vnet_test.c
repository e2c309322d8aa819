/* Host tests of the guest's virtio-net driver and network stack against the
 * fake device of fakedev.c (make hosttest). Each scenario runs in its own
 * process, the guest code's state being global. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cmdline.h"
#include "config.h"
#include "fakedev.h"
#include "irq.h"
#include "mem.h"
#include "net/udp_echo.h"
#include "net/csum.h"
#include "tsc.h"
#include "udp_burst.h"
#include "verify.h"
#include "virtio_net.h"
#include "virtio_net_features.h"

/* ---- host stand-ins for the guest's platform code ---- */

static char console[1 << 20];
static size_t console_len;
static bool verbose;

void serial_putc(char c)
{
	if (c == '\r')
		return;
	if (console_len < sizeof(console) - 1)
		console[console_len++] = c;
	if (verbose)
		putchar(c);
}
void host_outb(u16 port, u8 v) { (void)port; (void)v; }
u8 host_inb(u16 port) { (void)port; return 0xff; }
void host_halt(void) { abort(); }

void mem_init(void) {}
void *mem_alloc_raw(u64 size, u64 align)
{
	void *p = aligned_alloc(align < 8 ? 8 : align, (size + align - 1) / align * align);
	if (p)
		memset(p, 0xa5, size); /* garbage, as RAM would be */
	return p;
}
void *mem_alloc(u64 size, u64 align)
{
	void *p = mem_alloc_raw(size, align);
	if (p)
		memset(p, 0, size);
	return p;
}
u64 mem_available(u64 align) { (void)align; return 1ULL << 30; }

static irq_handler_t handlers[256];
static void *handler_ctx[256];
static u32 raised;
bool irq_add_handler(u8 vector, irq_handler_t fn, void *ctx)
{
	handlers[vector] = fn;
	handler_ctx[vector] = ctx;
	return true;
}
void irq_raise(u32 ev) { raised |= ev; }
bool ioapic_route(u32 pin, u8 vector, u32 apic_id) { (void)pin; (void)vector; (void)apic_id; return true; }
u32 ioapic_pin_count(void) { return 24; }
u32 lapic_id(void) { return 0; }
struct deadline deadline_ms(u64 ms) { struct deadline d = { ms }; return d; }
bool deadline_passed(struct deadline d) { (void)d; return true; }

void fd_interrupt(u32 dev, u32 bits)
{
	u32 v = IRQ_VECTOR_BASE + 5 + dev;
	fdevs[dev].isr |= bits;
	if (handlers[v])
		handlers[v](handler_ctx[v]);
	if (raised & EV_NET) {
		raised = 0;
		virtio_net_poll_all();
	}
}

/* ---- checks ---- */

static int failures;
#define CHECK(cond, ...)                                                                  \
	do {                                                                              \
		if (!(cond)) {                                                            \
			failures++;                                                       \
			printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);          \
			printf(__VA_ARGS__);                                              \
			printf("\n");                                                     \
		}                                                                         \
	} while (0)

static bool console_has(const char *s)
{
	console[console_len] = 0;
	return strstr(console, s) != NULL;
}
#define CHECK_LINE(s) CHECK(console_has(s), "console lacks \"%s\"", s)

/* ---- frames ---- */

static const u8 host_mac[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };
static const u8 guest_mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
#define HOST_IP  0x0a000001u
#define GUEST_IP 0x0a000002u

static void be16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void be32(u8 *p, u32 v) { be16(p, (u16)(v >> 16)); be16(p + 2, (u16)v); }
static u16 rd16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 rd32(const u8 *p) { return (u32)rd16(p) << 16 | rd16(p + 2); }

static u32 eth(u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, host_mac, 6);
	be16(f + 12, type);
	return 14;
}

static u32 arp_request(u8 *f, u32 target)
{
	static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	u8 *p = f + eth(f, bcast, 0x0806);
	be16(p, 1);
	be16(p + 2, 0x0800);
	p[4] = 6;
	p[5] = 4;
	be16(p + 6, 1);
	memcpy(p + 8, host_mac, 6);
	be32(p + 14, HOST_IP);
	memset(p + 18, 0, 6);
	be32(p + 24, target);
	return 14 + 28;
}

static u32 arp_reply_to(u8 *f, const u8 *dst_mac, u32 dst_ip)
{
	u8 *p = f + eth(f, dst_mac, 0x0806);
	be16(p, 1);
	be16(p + 2, 0x0800);
	p[4] = 6;
	p[5] = 4;
	be16(p + 6, 2);
	memcpy(p + 8, host_mac, 6);
	be32(p + 14, HOST_IP);
	memcpy(p + 18, dst_mac, 6);
	be32(p + 24, dst_ip);
	return 14 + 28;
}

static u8 *ip_hdr(u8 *p, u8 proto, u32 payload, u32 src, u32 dst)
{
	memset(p, 0, 20);
	p[0] = 0x45;
	be16(p + 2, (u16)(20 + payload));
	p[8] = 64;
	p[9] = proto;
	be32(p + 12, src);
	be32(p + 16, dst);
	csum_store(p + 10, csum(p, 20));
	return p + 20;
}

static u32 icmp_echo(u8 *f, u32 payload)
{
	u8 *ip = f + eth(f, guest_mac, 0x0800);
	u8 *m = ip_hdr(ip, 1, 8 + payload, HOST_IP, GUEST_IP);
	m[0] = 8;
	m[1] = 0;
	m[2] = m[3] = 0;
	be16(m + 4, 0x1234);
	be16(m + 6, 1);
	for (u32 i = 0; i < payload; i++)
		m[8 + i] = (u8)(i * 7);
	csum_store(m + 2, csum(m, 8 + payload));
	return 14 + 20 + 8 + payload;
}

static u32 udp_dgram(u8 *f, u32 src_ip, u16 sport, u16 dport, const u8 *data, u32 len)
{
	u8 *ip = f + eth(f, guest_mac, 0x0800);
	u8 *u = ip_hdr(ip, 17, 8 + len, src_ip, GUEST_IP);
	be16(u, sport);
	be16(u + 2, dport);
	be16(u + 4, (u16)(8 + len));
	u[6] = u[7] = 0;
	memcpy(u + 8, data, len);
	u16 c = (u16)~csum_fold(csum_add(csum_pseudo(src_ip, GUEST_IP, 17, (u16)(8 + len)), u, 8 + len));
	csum_store(u + 6, c ? c : 0xffff);
	return 14 + 20 + 8 + len;
}

/* ---- device side of rx / tx ---- */

struct hdr {
	u8 flags, gso_type;
	u16 hdr_len, gso_size, csum_start, csum_offset, num_buffers;
} __attribute__((packed));

/* Put a frame into the guest's receive buffers the way a device does: split
 * over several buffers with MRG_RXBUF (chunk bytes at most per buffer when
 * chunk != 0), else one buffer. Returns buffers used, 0 if it did not fit. */
static u32 rx_inject_hdr(u32 dev, const u8 *frame, u32 len, struct hdr h, u32 chunk)
{
	struct fdev *d = &fdevs[dev];
	struct fq *q = &d->q[0];
	bool mrg = d->drv_features & VIRTIO_NET_F_MRG_RXBUF;
	u8 *first = NULL;
	u32 off = 0, nbufs = 0, total = 12 + len;
	u16 heads[256];
	u32 lens[256];

	while (off < total) {
		u16 head, flags, next;
		u64 addr;
		u32 blen;
		if (!fq_pop(q, &head))
			return 0;
		fq_desc(q, head, &addr, &blen, &flags, &next);
		if (!(flags & 2))
			return 0;
		u32 n = total - off;
		if (n > blen)
			n = blen;
		if (chunk && n > chunk)
			n = chunk;
		if (!mrg && n < total)
			return 0; /* does not fit one buffer */
		u8 *b = (u8 *)addr;
		for (u32 i = 0; i < n; i++, off++)
			b[i] = off < 12 ? ((u8 *)&h)[off] : frame[off - 12];
		if (!first)
			first = b;
		heads[nbufs] = head;
		lens[nbufs++] = n;
	}
	h.num_buffers = (u16)nbufs;
	memcpy(first + 10, &h.num_buffers, 2);
	for (u32 i = 0; i < nbufs; i++)
		fq_push(q, heads[i], lens[i]);
	fd_interrupt(dev, 1);
	return nbufs;
}

static u32 rx_inject(u32 dev, const u8 *frame, u32 len)
{
	struct hdr h;
	memset(&h, 0, sizeof(h));
	return rx_inject_hdr(dev, frame, len, h, 0);
}

/* Take one transmitted frame (header and frame split); false if none. */
static bool tx_take(u32 dev, struct hdr *h, u8 *frame, u32 *len)
{
	struct fq *q = &fdevs[dev].q[1];
	u8 buf[70000];
	u32 n = 0;
	u16 head, i, flags, next;
	u64 addr;
	u32 blen;

	if (!fq_pop(q, &head))
		return false;
	i = head;
	for (;;) {
		fq_desc(q, i, &addr, &blen, &flags, &next);
		memcpy(buf + n, (void *)addr, blen);
		n += blen;
		if (!(flags & 1))
			break;
		i = next;
	}
	fq_push(q, head, 0);
	memcpy(h, buf, 12);
	*len = n - 12;
	memcpy(frame, buf + 12, *len);
	return true;
}

static void start(const char *cmdline)
{
	static char buf[1024];
	snprintf(buf, sizeof(buf), "%s", cmdline);
	cmdline_set(buf);
	udp_echo_init();
	virtio_net_init_all();
}

#define BASE_FEATURES (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU)
#define DEV0 "virtio_mmio.device=4K@0xd0000000:5 ip=10.0.0.2::10.0.0.1:255.255.255.0"

static void check_ip_checksums(const u8 *f, u32 len)
{
	CHECK(len >= 34, "frame too short %u", len);
	CHECK(csum(f + 14, 20) == 0, "bad IPv4 header checksum");
}

/* ---- scenarios ---- */

static void t_features(void)
{
	/* DPDK testpmd's vhost-user set (no MAC, no STATUS) plus those and USO */
	u64 offered = 0x0000000d7c66e7cbULL | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_GUEST_USO4 |
		      VIRTIO_NET_F_GUEST_USO6 | (1ULL << 56);
	fd_setup(1, offered, guest_mac, 1500, 1);
	start(DEV0);
	char line[200];
	u64 want = offered & VIRTIO_NET_DRIVER_FEATURES;
	snprintf(line, sizeof(line),
		 "virtio-net0: base=0xd0000000 irq=5 offered=0x%016llx acked=0x%016llx\n",
		 (unsigned long long)offered, (unsigned long long)want);
	CHECK(console_has(line), "want %s", line);
	CHECK_LINE("virtio-net0: mac=52:54:00:12:34:56 mtu=1500 link=up\n");
	CHECK_LINE("virtio-net0: ip=10.0.0.2 netmask=255.255.255.0 gateway=10.0.0.1\n");
	CHECK(fdevs[0].status == 0x0f, "status %#x", fdevs[0].status);
	CHECK(fdevs[0].drv_features == want, "drv features %#llx", (unsigned long long)fdevs[0].drv_features);
	CHECK(fdevs[0].q[0].ready && fdevs[0].q[1].ready && fdevs[0].q[2].ready, "queues not ready");
	CHECK(fdevs[0].q[0].num == 128 && fdevs[0].q[1].num == 64 && fdevs[0].q[2].num == 16,
	      "queue sizes %u %u %u", fdevs[0].q[0].num, fdevs[0].q[1].num, fdevs[0].q[2].num);
	CHECK(fdevs[0].q[0].desc % 4096 == 0 && fdevs[0].q[0].avail % 4096 == 0 &&
	      fdevs[0].q[0].used % 4096 == 0, "rings not page aligned");
	CHECK(fdevs[0].q[0].notifies == 1, "rx notifies %u", fdevs[0].q[0].notifies);
}

static void t_dependencies(void)
{
	/* GSO without GUEST_CSUM, ECN without TSO, ANNOUNCE/CTRL_RX without CTRL_VQ. */
	u64 offered = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_UFO |
		      VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_ECN | VIRTIO_NET_F_GUEST_ANNOUNCE |
		      VIRTIO_NET_F_CTRL_RX | (1ULL << 22) | (1ULL << 34);
	CHECK(virtio_net_negotiate(offered, ~0ULL) == VIRTIO_F_VERSION_1, "got %#llx",
	      (unsigned long long)virtio_net_negotiate(offered, ~0ULL));
	offered |= VIRTIO_NET_F_GUEST_CSUM;
	u64 got = virtio_net_negotiate(offered, ~0ULL);
	CHECK(got == (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 |
		      VIRTIO_NET_F_GUEST_UFO | VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_ECN),
	      "got %#llx", (unsigned long long)got);
	/* godwit.net_accept masks, dependencies re-applied after the mask. */
	got = virtio_net_negotiate(offered, ~VIRTIO_NET_F_GUEST_CSUM);
	CHECK(got == VIRTIO_F_VERSION_1, "masked got %#llx", (unsigned long long)got);

	fd_setup(1, offered, guest_mac, 1500, 1);
	start(DEV0 " godwit.net_accept=0x100000002");
	CHECK_LINE("acked=0x0000000100000002\n");
}

static void t_no_version1(void)
{
	fd_setup(1, VIRTIO_NET_F_MAC, guest_mac, 1500, 1);
	start(DEV0);
	CHECK_LINE("virtio-net0: VERSION_1 not offered or not allowed, device not used\n");
	CHECK(fdevs[0].status & 0x80, "FAILED not set: %#x", fdevs[0].status);
}

static void t_refused(void)
{
	fd_setup(1, BASE_FEATURES, guest_mac, 1500, 1);
	fdevs[0].refuse_features = true;
	start(DEV0);
	CHECK_LINE("virtio-net0: device refused the features (FEATURES_OK not kept), device not used\n");
}

static void t_legacy_and_others(void)
{
	fd_setup(3, BASE_FEATURES, guest_mac, 1500, 1);
	fdevs[0].version = 1;
	fdevs[1].device_id = 2;
	start("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=0x1000@0xd0001000:6:7 "
	      "virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8 "
	      "virtio_mmio.device=4K@xyz:8");
	CHECK_LINE("virtio: device at 0xd0000000 has legacy version 1, skipped\n");
	CHECK_LINE("virtio: device at 0xd0001000 has device id 2, not a network device, skipped\n");
	CHECK_LINE("virtio-net0: base=0xd0002000 irq=7 ");
	CHECK_LINE("virtio: no device at 0xd0003000 (magic 0xffffffff), skipped\n");
	CHECK_LINE("virtio: bad virtio_mmio.device=4K@xyz:8, skipped\n");
}

static void t_arp_icmp_udp(u64 extra, bool offload)
{
	fd_setup(1, BASE_FEATURES | extra, guest_mac, 1500, 1);
	start(DEV0);
	u8 f[2000], r[70000];
	struct hdr h;
	u32 len, rlen;

	/* ARP */
	len = arp_request(f, GUEST_IP);
	CHECK(rx_inject(0, f, len) == 1, "arp not received");
	CHECK(tx_take(0, &h, r, &rlen), "no arp reply");
	CHECK(rlen >= 42 && memcmp(r, host_mac, 6) == 0 && rd16(r + 12) == 0x0806 &&
	      rd16(r + 20) == 2 && memcmp(r + 22, guest_mac, 6) == 0 && rd32(r + 28) == GUEST_IP &&
	      memcmp(r + 32, host_mac, 6) == 0 && rd32(r + 38) == HOST_IP, "bad arp reply");
	CHECK(fdevs[0].q[1].notifies >= 1, "tx not notified");
	/* ARP for another address: no answer */
	len = arp_request(f, GUEST_IP + 5);
	rx_inject(0, f, len);
	CHECK(!tx_take(0, &h, r, &rlen), "answered an ARP for someone else");

	/* ICMP echo */
	len = icmp_echo(f, 56);
	rx_inject(0, f, len);
	CHECK(tx_take(0, &h, r, &rlen), "no echo reply");
	check_ip_checksums(r, rlen);
	CHECK(rlen == len && r[34] == 0 && csum(r + 34, rlen - 34) == 0 &&
	      memcmp(r + 38, f + 38, len - 38) == 0 && rd32(r + 26) == GUEST_IP &&
	      rd32(r + 30) == HOST_IP, "bad echo reply");

	/* UDP echo on port 7 */
	u8 data[1472];
	for (u32 i = 0; i < sizeof(data); i++)
		data[i] = (u8)(i * 13 + 1);
	for (u32 n = 0; n <= sizeof(data); n += 491) {
		len = udp_dgram(f, HOST_IP, 40000, 7, data, n);
		rx_inject(0, f, len);
		CHECK(tx_take(0, &h, r, &rlen), "no udp echo (%u bytes)", n);
		check_ip_checksums(r, rlen);
		u8 *u = r + 34;
		u16 ulen = rd16(u + 4);
		CHECK(rd16(u) == 7 && rd16(u + 2) == 40000 && ulen == 8 + n &&
		      memcmp(u + 8, data, n) == 0, "bad udp echo %u", n);
		if (offload) {
			CHECK(h.flags == 1 && h.csum_start == 34 && h.csum_offset == 6,
			      "hdr flags %u start %u off %u", h.flags, h.csum_start, h.csum_offset);
			/* complete it as the device would */
			u16 c = (u16)~csum_fold(csum_add(0, u, rlen - 34));
			csum_store(u + 6, c);
		} else {
			CHECK(h.flags == 0, "hdr flags %u", h.flags);
		}
		u64 s = csum_add(csum_pseudo(GUEST_IP, HOST_IP, 17, ulen), u, ulen);
		CHECK(csum_fold(s) == 0xffff, "udp checksum does not verify (%u bytes)", n);
	}
	/* not port 7: ignored; bad IP checksum: dropped */
	len = udp_dgram(f, HOST_IP, 40000, 8, data, 10);
	rx_inject(0, f, len);
	CHECK(!tx_take(0, &h, r, &rlen), "answered port 8");
	len = icmp_echo(f, 8);
	f[24] ^= 1;
	rx_inject(0, f, len);
	CHECK(!tx_take(0, &h, r, &rlen), "answered a bad IP checksum");
	/* all rx buffers came back */
	CHECK((u16)(((volatile u16 *)fdevs[0].q[0].avail)[1] - fdevs[0].q[0].last_avail) ==
		      fdevs[0].q[0].num, "rx ring not refilled");
}

static void t_software_csum(void) { t_arp_icmp_udp(0, false); }
static void t_csum_offload(void) { t_arp_icmp_udp(VIRTIO_NET_F_CSUM | VIRTIO_F_EVENT_IDX, true); }
static void t_mrg_rxbuf(void) { t_arp_icmp_udp(VIRTIO_NET_F_MRG_RXBUF, false); }

static void t_mrg_large_and_split(void)
{
	fd_setup(1, BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_GUEST_CSUM |
			    VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_USO4,
		 guest_mac, 1500, 1);
	start(DEV0);
	static u8 f[70000], r[70000];
	struct hdr h;
	u32 rlen;

	memset(&h, 0, sizeof(h));
	h.gso_type = 1;
	h.gso_size = 1448;
	u32 len = icmp_echo(f, 100);
	memset(f + len, 0x5a, 64000 - len);
	for (int i = 0; i < 3; i++)
		CHECK(rx_inject_hdr(0, f, 64000, h, 0) == 32, "64000-byte frame not in 32 buffers");
	CHECK_LINE("rx-large: len=64000 gso_type=1 gso_size=1448 buffers=32\n");
	CHECK(!tx_take(0, &h, r, &rlen), "answered a large frame");

	/* an echo request spread over 3 buffers is put together and answered */
	memset(&h, 0, sizeof(h));
	len = icmp_echo(f, 1000);
	CHECK(rx_inject_hdr(0, f, len, h, 400) == 3, "not split in 3");
	CHECK(tx_take(0, &h, r, &rlen), "no reply to a split frame");
	CHECK(rlen == len && csum(r + 34, rlen - 34) == 0 && memcmp(r + 42, f + 42, 1000) == 0,
	      "bad reply to a split frame");
	/* over the MTU, in small pieces that each fit the reassembly buffer */
	CHECK(rx_inject_hdr(0, f, 1600, h, 400) == 5, "1600 not in 5 buffers");
	CHECK_LINE("rx-large: len=1600 gso_type=0 gso_size=0 buffers=5\n");
	h.gso_type = 5;
	h.gso_size = 1400;
	CHECK(rx_inject_hdr(0, f, 4028, h, 0) == 2, "4028 not in 2 buffers");
	CHECK_LINE("rx-large: len=4028 gso_type=5 gso_size=1400 buffers=2\n");
}

static void t_big_buffers(void)
{
	fd_setup(1, BASE_FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6, guest_mac, 1500, 1);
	start(DEV0);
	static u8 f[70000];
	struct hdr h;
	u16 head, flags, next;
	u64 addr;
	u32 blen;

	memset(&h, 0, sizeof(h));
	/* buffers of at least 65562 bytes */
	fq_desc(&fdevs[0].q[0], 0, &addr, &blen, &flags, &next);
	CHECK(blen >= 65562, "rx buffer only %u bytes", blen);
	(void)head;
	h.gso_type = 4;
	h.gso_size = 1428;
	memset(f, 0, sizeof(f));
	CHECK(rx_inject_hdr(0, f, 65000, h, 0) == 1, "not received");
	CHECK_LINE("rx-large: len=65000 gso_type=4 gso_size=1428 buffers=1\n");
}

static void t_bad_device(void)
{
	fd_setup(1, BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF, guest_mac, 1500, 1);
	start(DEV0);
	struct fq *q = &fdevs[0].q[0];
	u8 f[200], r[2000];
	struct hdr h;
	u32 rlen;
	u16 head;

	/* id beyond the ring, id not in flight, length beyond the buffer,
	 * num_buffers beyond what was posted, a short length */
	fq_push(q, 1000, 10);
	fq_push(q, 0xffffffffu, 10);
	CHECK(fq_pop(q, &head), "no buffer");
	u64 addr;
	u32 blen;
	u16 flags, next;
	fq_desc(q, head, &addr, &blen, &flags, &next);
	memset((void *)addr, 0xff, blen);
	fq_push(q, head, 1u << 30);            /* huge len, num_buffers 0xffff */
	fq_push(q, head, 10);                  /* same id again: not in flight */
	CHECK(fq_pop(q, &head), "no buffer");
	fq_push(q, head, 3);                   /* shorter than the header */
	fd_interrupt(0, 1);
	/* the driver still works */
	u32 len = arp_request(f, GUEST_IP);
	CHECK(rx_inject(0, f, len) == 1, "arp not received after bad entries");
	CHECK(tx_take(0, &h, r, &rlen), "no arp reply after bad entries");

	/* a used index far ahead of what was posted: the queue stops, no crash */
	q->used_idx = (u16)(q->used_idx + 5000);
	((volatile u16 *)q->used)[1] = q->used_idx;
	fd_interrupt(0, 1);
	/* tx used entries that are garbage */
	fq_push(&fdevs[0].q[1], 77, 1u << 31);
	fd_interrupt(0, 1);
}

static void t_announce_and_link(void)
{
	fd_setup(1, BASE_FEATURES | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_GUEST_ANNOUNCE, guest_mac, 9000, 0);
	start(DEV0);
	CHECK_LINE("virtio-net0: mac=52:54:00:12:34:56 mtu=9000 link=down\n");
	fdevs[0].cfg[6] = 1 | 2; /* link up, announce */
	fdevs[0].gen++;
	fd_interrupt(0, 2);
	CHECK_LINE("virtio-net0: link=up\n");
	CHECK_LINE("virtio-net0: announce: gratuitous arp sent\n");
	u8 r[10000];
	struct hdr h;
	u32 rlen;
	CHECK(tx_take(0, &h, r, &rlen), "no gratuitous arp");
	CHECK(rd16(r + 12) == 0x0806 && rd16(r + 20) == 1 && rd32(r + 28) == GUEST_IP &&
	      rd32(r + 38) == GUEST_IP && memcmp(r, "\xff\xff\xff\xff\xff\xff", 6) == 0,
	      "not a gratuitous arp");
	/* the control command */
	struct fq *c = &fdevs[0].q[2];
	u16 head, flags, next;
	u64 addr, ack_addr;
	u32 blen;
	CHECK(c->notifies == 1, "ctrl not notified");
	CHECK(fq_pop(c, &head), "no ctrl command");
	fq_desc(c, head, &addr, &blen, &flags, &next);
	CHECK(blen == 2 && ((u8 *)addr)[0] == 3 && ((u8 *)addr)[1] == 0 && (flags & 1), "bad command");
	fq_desc(c, next, &ack_addr, &blen, &flags, &next);
	CHECK(blen == 1 && (flags & 2), "bad ack descriptor");
	/* a second config interrupt while the ack is pending: no second announce */
	fd_interrupt(0, 2);
	CHECK(!fq_pop(c, &head), "announced twice");
	*(u8 *)ack_addr = 0;
	fq_push(c, head, 1);
	fdevs[0].cfg[6] = 1;
	fd_interrupt(0, 1);
	CHECK_LINE("virtio-net0: ctrl announce-ack ok\n");
	/* 9000-byte MTU: a 9000-byte ping is answered */
	static u8 f[10000];
	u32 len = icmp_echo(f, 9000 - 28);
	CHECK(rx_inject(0, f, len) == 1, "jumbo frame not received");
	CHECK(tx_take(0, &h, r, &rlen) && rlen == len, "jumbo not answered");
}

static void t_needs_reset(void)
{
	fd_setup(1, BASE_FEATURES | VIRTIO_F_EVENT_IDX, guest_mac, 1500, 1);
	start(DEV0);
	u8 f[200], r[2000];
	struct hdr h;
	u32 rlen, len = icmp_echo(f, 20);
	rx_inject(0, f, len);
	CHECK(tx_take(0, &h, r, &rlen), "no reply");
	fdevs[0].status |= 0x40;
	fd_interrupt(0, 2);
	CHECK_LINE("virtio-net0: device needs reset\n");
	CHECK(fdevs[0].resets == 2 && fdevs[0].status == 0x0f, "not re-initialised: resets %u status %#x",
	      fdevs[0].resets, fdevs[0].status);
	size_t first = (size_t)(strstr(console, "virtio-net0: base=") - console);
	CHECK(strstr(console + first + 1, "virtio-net0: base=") != NULL, "lines not printed again");
	rx_inject(0, f, len);
	CHECK(tx_take(0, &h, r, &rlen), "no reply after reset");
	/* found by the heartbeat check too */
	fdevs[0].status |= 0x40;
	virtio_net_check_all();
	CHECK(fdevs[0].resets == 3, "heartbeat check did not reset");
}

static void t_event_idx(void)
{
	fd_setup(1, BASE_FEATURES | VIRTIO_F_EVENT_IDX, guest_mac, 1500, 1);
	start(DEV0);
	struct fq *rx = &fdevs[0].q[0], *tx = &fdevs[0].q[1];
	u8 f[200], r[2000];
	struct hdr h;
	u32 rlen, len = icmp_echo(f, 20);

	volatile u16 *rx_used_event = (volatile u16 *)rx->avail + 2 + rx->num;
	for (int i = 0; i < 3; i++) {
		rx_inject(0, f, len);
		CHECK(*rx_used_event == rx->used_idx, "used_event %u, used %u", *rx_used_event, rx->used_idx);
		CHECK(tx_take(0, &h, r, &rlen), "no reply");
	}
	/* The device asks for no notification before avail index 1000: no kick. */
	volatile u16 *tx_avail_event = (volatile u16 *)((volatile u8 *)tx->used + 4 + 8 * tx->num);
	volatile u16 *rx_avail_event = (volatile u16 *)((volatile u8 *)rx->used + 4 + 8 * rx->num);
	*tx_avail_event = 1000;
	*rx_avail_event = 1000;
	u32 tx_kicks = tx->notifies, rx_kicks = rx->notifies;
	rx_inject(0, f, len);
	CHECK(tx->notifies == tx_kicks && rx->notifies == rx_kicks, "kicked despite avail_event");
	CHECK(tx_take(0, &h, r, &rlen), "reply not queued");
	/* asking for the next one gets it */
	*tx_avail_event = ((volatile u16 *)tx->avail)[1];
	rx_inject(0, f, len);
	CHECK(tx->notifies == tx_kicks + 1, "not kicked at avail_event");
}

static void t_two_devices(void)
{
	fd_setup(2, BASE_FEATURES, guest_mac, 1500, 1);
	start("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 "
	      "ip=10.0.0.2::10.0.0.1:255.255.255.0:guest:eth0:off");
	CHECK_LINE("virtio-net1: base=0xd0001000 irq=6 ");
	CHECK_LINE("virtio-net1: mac=52:54:00:12:34:57 mtu=1500 link=up\n");
	CHECK(!console_has("virtio-net1: ip="), "second device got the address");
	u8 f[200], r[2000];
	struct hdr h;
	u32 rlen, len = arp_request(f, GUEST_IP);
	rx_inject(1, f, len);
	CHECK(!tx_take(1, &h, r, &rlen), "second device answered ARP");
	rx_inject(0, f, len);
	CHECK(tx_take(0, &h, r, &rlen), "first device did not answer ARP");
	virtio_net_report();
	CHECK_LINE("net: rx=2 tx=1\n");
}

static void t_udp_burst(void)
{
	fd_setup(1, BASE_FEATURES | VIRTIO_NET_F_CSUM, guest_mac, 1500, 1);
	start(DEV0 " godwit.udp_burst=10.0.0.1:9000:100:1000");
	udp_burst_init();
	CHECK_LINE("serve: udp-burst to 10.0.0.1:9000 count=100 size=1000\n");
	u8 f[2000], r[2000];
	struct hdr h;
	u32 rlen;

	udp_burst_poll(0);
	CHECK(tx_take(0, &h, r, &rlen) && rd16(r + 12) == 0x0806 && rd32(r + 38) == HOST_IP,
	      "no ARP request for the target");
	udp_burst_poll(100);
	CHECK(!tx_take(0, &h, r, &rlen), "ARP retried too early");
	u32 len = arp_reply_to(f, guest_mac, GUEST_IP);
	rx_inject(0, f, len);
	u32 got = 0, seqs = 0;
	for (u64 now = 600; now < 2000 && got < 100; now += 10) {
		udp_burst_poll(now);
		while (tx_take(0, &h, r, &rlen)) {
			if (rd16(r + 12) != 0x0800 || r[23] != 17)
				continue;
			u8 *u = r + 34;
			u32 seq = rd32(u + 8);
			CHECK(rd16(u) == 49152 && rd16(u + 2) == 9000 && rd16(u + 4) == 1008 &&
			      seq == got && u[12] == 4 && u[1007] == (u8)999, "bad datagram %u", got);
			seqs += seq;
			got++;
			/* echo it back (twice: duplicates count once) */
			u32 n = udp_dgram(f, HOST_IP, 9000, 49152, u + 8, 1000);
			rx_inject(0, f, n);
			rx_inject(0, f, n);
			fd_interrupt(0, 1); /* tx completions */
		}
	}
	CHECK(got == 100, "sent %u", got);
	CHECK_LINE("udp-burst: sent 100 received 100\n");
	CHECK(!udp_burst_active(), "still active");
}

static void t_udp_burst_timeout(void)
{
	fd_setup(1, BASE_FEATURES, guest_mac, 1500, 0);
	start(DEV0 " godwit.udp_burst=10.0.9.9:9000:3:10");
	udp_burst_init();
	u8 r[2000], f[200];
	struct hdr h;
	u32 rlen;
	udp_burst_poll(0);
	CHECK(!tx_take(0, &h, r, &rlen), "sent while the link is down");
	fdevs[0].cfg[6] = 1;
	fd_interrupt(0, 2);
	udp_burst_poll(1000); /* off-link: ARP for the gateway */
	CHECK(tx_take(0, &h, r, &rlen) && rd32(r + 38) == HOST_IP, "no ARP for the gateway");
	u32 len = arp_reply_to(f, guest_mac, GUEST_IP);
	rx_inject(0, f, len);
	udp_burst_poll(1010);
	for (int i = 0; i < 3; i++)
		CHECK(tx_take(0, &h, r, &rlen) && rd32(r + 30) == 0x0a000909 && memcmp(r, host_mac, 6) == 0,
		      "datagram %d not sent via the gateway", i);
	udp_burst_poll(6009);
	CHECK(!console_has("udp-burst: sent"), "finished early");
	udp_burst_poll(6010);
	CHECK_LINE("udp-burst: sent 3 received 0\n");
}

/* ---- godwit.verify ---- */

#define VPAGE 4096
#define VWORDS (VPAGE / 8)

/* Starts the verifier of `cmdline` and returns its buffer. */
static u8 *verify_start(const char *cmdline)
{
	static char buf[256];
	snprintf(buf, sizeof(buf), "%s", cmdline);
	cmdline_set(buf);
	CHECK(verify_init(), "verify_init");
	console[console_len] = 0;
	const char *at = strstr(console, "serve: verify buffer=0x");
	CHECK(at != NULL, "no verify line");
	return at ? (u8 *)(uintptr_t)strtoull(at + strlen("serve: verify buffer=0x"), NULL, 16) : NULL;
}

static u64 *vpage(u8 *buf, u32 i) { return (u64 *)(buf + (u64)i * VPAGE); }

static u64 vword(u8 *buf, u32 i, u32 w, u64 gen)
{
	return (u64)(uintptr_t)&vpage(buf, i)[w] | gen << 32;
}

static int count(const char *needle)
{
	int n = 0;
	console[console_len] = 0;
	for (const char *p = console; (p = strstr(p, needle)); p++)
		n++;
	return n;
}

static void check_mismatch_line(u8 *buf, u32 page, u32 word, u64 want, u64 got)
{
	char line[160];
	snprintf(line, sizeof(line), "verify: mismatch at 0x%llx want 0x%llx got 0x%llx\n",
		 (unsigned long long)(uintptr_t)&vpage(buf, page)[word], (unsigned long long)want,
		 (unsigned long long)got);
	CHECK_LINE(line);
	CHECK(count("verify: mismatch at") == 1, "only the first mismatch is named");
}

/* Many passes over a buffer that starts as garbage: never a mismatch. */
static void t_verify_clean(void)
{
	u8 *buf = verify_start("godwit.verify=64K godwit.verify_rate=100 godwit.verify_check_rate=1000");
	CHECK_LINE(" pages=16 rate=100 check=1000 pages/s\n");
	for (int i = 0; i < 100; i++)
		verify_advance(37);
	verify_report();
	CHECK_LINE("verify: 16 pages, 1600 checked, 0 mismatches\n");
	CHECK(!console_has("mismatch at"), "false mismatch");
	/* 370 rewrites: 23 passes and 2 pages: page 1 holds generation 24. */
	CHECK(vpage(buf, 1)[0] == vword(buf, 1, 0, 24), "pattern %llx",
	      (unsigned long long)vpage(buf, 1)[0]);
	CHECK(vpage(buf, 2)[VWORDS - 1] == vword(buf, 2, VWORDS - 1, 23), "pattern");
}

/* A written page that comes back zero. */
static void t_verify_zero(void)
{
	u8 *buf = verify_start("godwit.verify=64K godwit.verify_rate=100 godwit.verify_check_rate=1000");
	verify_advance(100); /* pages 0-9 at generation 1 */
	memset(vpage(buf, 3), 0, VPAGE);
	verify_advance(16);
	check_mismatch_line(buf, 3, 0, vword(buf, 3, 0, 1), 0);
	verify_advance(16);
	verify_report();
	CHECK_LINE("verify: 16 pages, 48 checked, 2 mismatches\n");
}

/* A page from an older generation. */
static void t_verify_stale(void)
{
	static u64 saved[VWORDS];
	u8 *buf = verify_start("godwit.verify=64K godwit.verify_rate=100 godwit.verify_check_rate=1000");
	verify_advance(160); /* one full pass: every page at generation 1 */
	memcpy(saved, vpage(buf, 5), VPAGE);
	verify_advance(100); /* pages 0-9 at generation 2 */
	memcpy(vpage(buf, 5), saved, VPAGE);
	verify_advance(16);
	check_mismatch_line(buf, 5, 0, vword(buf, 5, 0, 2), vword(buf, 5, 0, 1));
}

static void t_verify_moved(void)
{
	u8 *buf = verify_start("godwit.verify=64K godwit.verify_rate=100 godwit.verify_check_rate=1000");
	verify_advance(100);
	memcpy(vpage(buf, 7), vpage(buf, 6), VPAGE); /* same generation, wrong place */
	verify_advance(16);
	check_mismatch_line(buf, 7, 0, vword(buf, 7, 0, 1), vword(buf, 6, 0, 1));
}

/* Only the page at the cursor may be half rewritten; elsewhere that is a
 * mismatch, and so is a damaged checksum word. */
static void t_verify_cut_rewrite(void)
{
	u8 *buf = verify_start("godwit.verify=64K godwit.verify_rate=100 godwit.verify_check_rate=16000");
	verify_advance(100); /* cursor at page 10, which is at generation 0 */
	vpage(buf, 10)[0] = vword(buf, 10, 0, 1);
	vpage(buf, 10)[VWORDS / 2] = vword(buf, 10, VWORDS / 2, 1);
	verify_advance(1); /* no rewrite due; all 16 pages checked */
	verify_report();
	CHECK_LINE("verify: 16 pages, 32 checked, 0 mismatches\n");

	vpage(buf, 12)[0] = vword(buf, 12, 0, 1);
	verify_advance(1);
	check_mismatch_line(buf, 12, 0, 0, vword(buf, 12, 0, 1));
	vpage(buf, 12)[0] = 0;
	vpage(buf, 4)[1] ^= 1;
	verify_advance(1);
	verify_report();
	CHECK_LINE("verify: 16 pages, 64 checked, 2 mismatches\n");
}

static void t_verify_bad_words(void)
{
	cmdline_set("godwit.verify=lots");
	CHECK(!verify_init(), "accepted a bad size");
	CHECK_LINE("serve: ignoring godwit.verify=lots: want a size (K/M/G suffixes) of at least 4K\n");
	CHECK(!verify_active(), "active");
}

struct scenario {
	const char *name;
	void (*fn)(void);
};

static const struct scenario scenarios[] = {
	{ "features", t_features },
	{ "dependencies", t_dependencies },
	{ "no_version1", t_no_version1 },
	{ "refused", t_refused },
	{ "legacy_and_others", t_legacy_and_others },
	{ "software_csum", t_software_csum },
	{ "csum_offload", t_csum_offload },
	{ "mrg_rxbuf", t_mrg_rxbuf },
	{ "mrg_large_and_split", t_mrg_large_and_split },
	{ "big_buffers", t_big_buffers },
	{ "bad_device", t_bad_device },
	{ "announce_and_link", t_announce_and_link },
	{ "needs_reset", t_needs_reset },
	{ "event_idx", t_event_idx },
	{ "two_devices", t_two_devices },
	{ "udp_burst", t_udp_burst },
	{ "udp_burst_timeout", t_udp_burst_timeout },
	{ "verify_clean", t_verify_clean },
	{ "verify_zero", t_verify_zero },
	{ "verify_stale", t_verify_stale },
	{ "verify_moved", t_verify_moved },
	{ "verify_cut_rewrite", t_verify_cut_rewrite },
	{ "verify_bad_words", t_verify_bad_words },
};

int main(int argc, char **argv)
{
	int failed = 0;

	verbose = getenv("VERBOSE") != NULL;
	for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
		const struct scenario *s = &scenarios[i];
		if (argc > 1 && strcmp(argv[1], s->name) != 0)
			continue;
		fflush(stdout);
		pid_t pid = fork();
		if (pid == 0) {
			s->fn();
			if (failures) {
				console[console_len] = 0;
				printf("  --- console ---\n%s", console);
			}
			fflush(stdout);
			_exit(failures ? 1 : 0);
		}
		int st;
		waitpid(pid, &st, 0);
		bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
		printf("%s %s\n", ok ? "ok  " : "FAIL", s->name);
		failed += !ok;
	}
	printf("%d scenario(s) failed\n", failed);
	return failed ? 1 : 0;
}
