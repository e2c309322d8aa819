#include "virtio_net.h"
#include "config.h"
#include "io.h"
#include "ioapic.h"
#include "irq.h"
#include "lapic.h"
#include "net/arp.h"
#include "netcfg.h"
#include "print.h"
#include "string.h"
#include "virtio_net_dev.h"
#include "virtio_net_features.h"

#define MAX_DEVICES   8
#define VIRTIO_ID_NET 1
#define RX_RING       128
#define TX_RING       64
#define CTRL_RING     16
#define DEFAULT_MTU   1500
#define MIN_MTU       68

static struct vnet devs[MAX_DEVICES];
static u32 ndevs;
static u64 accept_mask;

void vnet_print_prefix(const struct vnet *v)
{
	put_str("virtio-net");
	put_dec(v->index);
	put_str(": ");
}

static void say(const struct vnet *v, const char *what)
{
	print_lock();
	vnet_print_prefix(v);
	put_str(what);
	put_char('\n');
	print_unlock();
}

static void irq_handler(void *ctx)
{
	struct vnet *v = ctx;
	u32 s = vmmio_interrupt_ack(&v->mmio);

	if (s) {
		__atomic_fetch_or(&v->isr_pending, s, __ATOMIC_RELAXED);
		irq_raise(EV_NET);
	}
}

static bool route_irq(struct vnet *v)
{
	if (v->irq_routed)
		return true;
	if (v->mmio.irq >= IOAPIC_PINS ||
	    !irq_add_handler((u8)(IRQ_VECTOR_BASE + v->mmio.irq), irq_handler, v) ||
	    !ioapic_route(v->mmio.irq, (u8)(IRQ_VECTOR_BASE + v->mmio.irq), lapic_id())) {
		print_lock();
		vnet_print_prefix(v);
		put_str("irq ");
		put_dec(v->mmio.irq);
		put_str(" cannot be routed (IOAPIC pins 0-");
		put_dec(ioapic_pin_count() ? ioapic_pin_count() - 1 : 0);
		put_str("), device not used\n");
		print_unlock();
		return false;
	}
	v->irq_routed = true;
	return true;
}

static void read_link(struct vnet *v)
{
	if (v->acked & VIRTIO_NET_F_STATUS) {
		vmmio_config_read(&v->mmio, VNET_CFG_STATUS, &v->cfg_status, 2);
		v->nif.link_up = v->cfg_status & VIRTIO_NET_S_LINK_UP;
	} else {
		v->cfg_status = VIRTIO_NET_S_LINK_UP;
		v->nif.link_up = true;
	}
}

static void read_config(struct vnet *v)
{
	if (v->acked & VIRTIO_NET_F_MAC) {
		vmmio_config_read(&v->mmio, VNET_CFG_MAC, v->nif.mac, ETH_ALEN);
	} else {
		static const u8 local[ETH_ALEN] = { 0x02, 0x67, 0x77, 0x00, 0x00, 0x00 };
		memcpy(v->nif.mac, local, ETH_ALEN); /* locally administered */
		v->nif.mac[5] = (u8)v->index;
	}
	v->nif.mtu = DEFAULT_MTU;
	if (v->acked & VIRTIO_NET_F_MTU) {
		u16 mtu;
		vmmio_config_read(&v->mmio, VNET_CFG_MTU, &mtu, 2);
		v->nif.mtu = mtu < MIN_MTU ? MIN_MTU : mtu;
	}
	read_link(v);
	v->nif.tx_csum_offload = (v->acked & VIRTIO_NET_F_CSUM) != 0;
}

static void print_features(const struct vnet *v)
{
	print_lock();
	vnet_print_prefix(v);
	put_str("base=");
	put_hex(v->mmio.base);
	put_str(" irq=");
	put_dec(v->mmio.irq);
	put_str(" offered=");
	put_hex_fixed(v->offered, 16);
	put_str(" acked=");
	put_hex_fixed(v->acked, 16);
	put_char('\n');
	print_unlock();
}

static void print_link(const struct vnet *v)
{
	print_lock();
	vnet_print_prefix(v);
	put_str("mac=");
	put_mac(v->nif.mac);
	put_str(" mtu=");
	put_dec(v->nif.mtu);
	put_str(v->nif.link_up ? " link=up\n" : " link=down\n");
	print_unlock();
}

static bool fail(struct vnet *v, const char *why)
{
	say(v, why);
	vmmio_add_status(&v->mmio, VIRTIO_STATUS_FAILED);
	return false;
}

/* The pairs to use: with MQ, those the device has (max_virtqueue_pairs,
 * 1 to 0x8000), up to VNET_MAX_PAIRS; the control queue follows all of the
 * device's pairs. Without MQ one pair, control queue 2. */
static bool setup_queues(struct vnet *v)
{
	bool ev = (v->acked & VIRTIO_F_EVENT_IDX) != 0;
	u16 ctrl_index = 2;

	v->max_pairs = 1;
	if (v->acked & VIRTIO_NET_F_MQ) {
		vmmio_config_read(&v->mmio, VNET_CFG_MAX_PAIRS, &v->max_pairs, 2);
		if (v->max_pairs < 1 || v->max_pairs > 0x8000)
			return false;
		ctrl_index = (u16)(2 * v->max_pairs);
	}
	v->npairs = v->max_pairs < VNET_MAX_PAIRS ? v->max_pairs : VNET_MAX_PAIRS;
	v->cur = 0;
	for (u16 k = 0; k < v->npairs; k++) {
		struct vnet_pair *p = &v->pairs[k];
		if (!vmmio_queue_setup(&v->mmio, &p->rxq, VNET_RXQ(k), RX_RING, ev) ||
		    !vmmio_queue_setup(&v->mmio, &p->txq, VNET_TXQ(k), TX_RING, ev))
			return false;
	}
	v->ctrlq.size = 0;
	if ((v->acked & VIRTIO_NET_F_CTRL_VQ) &&
	    !vmmio_queue_setup(&v->mmio, &v->ctrlq, ctrl_index, CTRL_RING, ev))
		return false;
	return true;
}

static bool setup_buffers(struct vnet *v)
{
	for (u16 k = 0; k < v->npairs; k++)
		if (!vnet_rx_setup(v, &v->pairs[k]) || !vnet_tx_setup(v, &v->pairs[k]))
			return false;
	return vnet_ctrl_setup(v);
}

static void print_pairs(const struct vnet *v)
{
	print_lock();
	vnet_print_prefix(v);
	put_str("queue pairs=");
	put_dec(v->npairs);
	put_str(" of ");
	put_dec(v->max_pairs);
	put_char('\n');
	print_unlock();
}

/* The whole driver initialisation (virtio 1.x 3.1.1); also after a reset. */
static bool vnet_start(struct vnet *v)
{
	struct vmmio_dev *d = &v->mmio;

	v->live = false;
	if (!vmmio_reset(d))
		return fail(v, "reset did not complete (Status stayed non-zero), device not used");
	vmmio_add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	vmmio_add_status(d, VIRTIO_STATUS_DRIVER);
	v->offered = vmmio_device_features(d);
	v->acked = virtio_net_negotiate(v->offered, accept_mask);
	print_features(v);
	if (!(v->acked & VIRTIO_F_VERSION_1))
		return fail(v, "VERSION_1 not offered or not allowed, device not used");
	vmmio_driver_features(d, v->acked);
	vmmio_add_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(vmmio_status(d) & VIRTIO_STATUS_FEATURES_OK))
		return fail(v, "device refused the features (FEATURES_OK not kept), device not used");

	read_config(v);
	if (!setup_queues(v))
		return fail(v, "virtqueue set-up failed, device not used");
	if (!setup_buffers(v))
		return fail(v, "out of memory for buffers, device not used");
	if (!route_irq(v))
		return fail(v, "no interrupt, device not used");
	for (u16 k = 0; k < v->npairs; k++)
		vnet_rx_fill(&v->pairs[k]);
	v->isr_pending = 0;
	vmmio_add_status(d, VIRTIO_STATUS_DRIVER_OK);
	v->live = true;
	for (u16 k = 0; k < v->npairs; k++)
		vq_kick(&v->pairs[k].rxq);
	print_link(v);
	if (v->acked & VIRTIO_NET_F_MQ) {
		/* virtio 1.x 5.1.6.5.5: one pair until the driver asks for more. */
		u16 n = v->npairs;
		print_pairs(v);
		if (n > 1)
			vnet_ctrl_send(v, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &n, 2);
	}
	return true;
}

static void print_ip(const struct vnet *v)
{
	print_lock();
	vnet_print_prefix(v);
	put_str("ip=");
	put_ipv4(v->nif.ip);
	put_str(" netmask=");
	put_ipv4(v->nif.netmask);
	put_str(" gateway=");
	put_ipv4(v->nif.gateway);
	put_char('\n');
	print_unlock();
}

u32 virtio_net_init_all(void)
{
	struct vmmio_dev found[VIRTIO_MMIO_MAX_DEVICES];
	u32 n = vmmio_find_devices(found, VIRTIO_MMIO_MAX_DEVICES), running = 0;
	struct netcfg cfg;
	bool have_cfg = netcfg_parse(&cfg);

	accept_mask = virtio_net_accept_mask();
	for (u32 i = 0; i < n; i++) {
		if (found[i].device_id != VIRTIO_ID_NET) {
			print_lock();
			put_str("virtio: device at ");
			put_hex(found[i].base);
			put_str(" has device id ");
			put_dec(found[i].device_id);
			put_str(", not a network device, skipped\n");
			print_unlock();
			continue;
		}
		if (ndevs == MAX_DEVICES)
			break;
		struct vnet *v = &devs[ndevs];
		v->index = ndevs++;
		v->mmio = found[i];
		v->nif.index = v->index;
		v->nif.ops = &vnet_netif_ops;
		v->nif.driver = v;
		if (v->index == 0 && have_cfg) {
			v->nif.has_ip = true;
			v->nif.ip = cfg.ip;
			v->nif.netmask = cfg.netmask;
			v->nif.gateway = cfg.gateway;
		}
		if (vnet_start(v))
			running++;
		if (v->nif.has_ip)
			print_ip(v);
	}
	return running;
}

static void reset_device(struct vnet *v)
{
	say(v, "device needs reset");
	vnet_start(v);
}

static void config_changed(struct vnet *v)
{
	bool was_up = v->nif.link_up;

	read_link(v);
	if (v->nif.link_up != was_up)
		say(v, v->nif.link_up ? "link=up" : "link=down");
	if ((v->cfg_status & VIRTIO_NET_S_ANNOUNCE) && (v->acked & VIRTIO_NET_F_GUEST_ANNOUNCE) &&
	    !v->announce_pending) {
		/* virtio 1.x 5.1.6.5.4: gratuitous packets, then ANNOUNCE_ACK. */
		if (v->nif.has_ip) {
			arp_gratuitous(&v->nif);
			v->nif.ops->tx_flush(&v->nif);
		}
		v->announce_pending = vnet_ctrl_send(v, VIRTIO_NET_CTRL_ANNOUNCE,
						     VIRTIO_NET_CTRL_ANNOUNCE_ACK, NULL, 0);
		say(v, v->nif.has_ip ? "announce: gratuitous arp sent" : "announce: no address");
	}
}

void virtio_net_poll_all(void)
{
	for (u32 i = 0; i < ndevs; i++) {
		struct vnet *v = &devs[i];
		u32 s = __atomic_exchange_n(&v->isr_pending, 0, __ATOMIC_RELAXED);
		if (!v->live)
			continue;
		if (s & VIRTIO_INT_CONFIG_CHANGE) {
			if (vmmio_status(&v->mmio) & VIRTIO_STATUS_NEEDS_RESET) {
				reset_device(v);
				continue;
			}
			config_changed(v);
		}
		for (u16 k = 0; k < v->npairs; k++) {
			vnet_rx_poll(v, k);
			vnet_tx_reclaim(&v->pairs[k]);
		}
		vnet_ctrl_poll(v);
		v->nif.ops->tx_flush(&v->nif);
	}
}

void virtio_net_check_all(void)
{
	for (u32 i = 0; i < ndevs; i++)
		if (devs[i].live && (vmmio_status(&devs[i].mmio) & VIRTIO_STATUS_NEEDS_RESET))
			reset_device(&devs[i]);
}

struct netif *virtio_net_netif(u32 i)
{
	return i < ndevs ? &devs[i].nif : NULL;
}

void virtio_net_report(void)
{
	u64 rx = 0, tx = 0;

	for (u32 i = 0; i < ndevs; i++) {
		rx += devs[i].nif.rx_frames;
		tx += devs[i].nif.tx_frames;
	}
	print_lock();
	put_str("net: rx=");
	put_dec(rx);
	put_str(" tx=");
	put_dec(tx);
	put_char('\n');
	print_unlock();
	/* Frames per queue pair, for devices with several. */
	for (u32 i = 0; i < ndevs; i++) {
		const struct vnet *v = &devs[i];
		if (!v->live || v->npairs < 2)
			continue;
		print_lock();
		vnet_print_prefix(v);
		for (u16 k = 0; k < v->npairs; k++) {
			put_str(k ? " pair" : "pair");
			put_dec(k);
			put_str(" rx=");
			put_dec(v->pairs[k].rx_frames);
			put_str(" tx=");
			put_dec(v->pairs[k].tx_frames);
		}
		put_char('\n');
		print_unlock();
	}
}
