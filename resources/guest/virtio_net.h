/* virtio-net devices on virtio-mmio (modern only): bring-up, interrupts,
 * polling, device-needs-reset recovery. The first device gets the ip=
 * address. Lines printed (i counts virtio-net devices from 0):
 *   virtio-net<i>: base=0x<base> irq=<irq> offered=0x<16 hex> acked=0x<16 hex>
 *   virtio-net<i>: mac=xx:xx:xx:xx:xx:xx mtu=<n> link=<up|down>
 *   virtio-net<i>: ip=<a.b.c.d> netmask=<a.b.c.d> gateway=<a.b.c.d>
 *   virtio-net<i>: link=<up|down>                     (when it changes)
 *   virtio-net<i>: announce: gratuitous arp sent      (or: no address)
 *   virtio-net<i>: ctrl announce-ack ok
 *   virtio-net<i>: device needs reset                 (then the lines above again)
 *   rx-large: len=<n> gso_type=<t> gso_size=<s> buffers=<k> */
#ifndef GUEST_VIRTIO_NET_H
#define GUEST_VIRTIO_NET_H

#include "net/netif.h"
#include "types.h"

/* Find and start every virtio-net device; returns how many are running. */
u32 virtio_net_init_all(void);
/* After EV_NET: config changes, receive, transmit completions, control. */
void virtio_net_poll_all(void);
/* Look for DEVICE_NEEDS_RESET (also signalled by a config interrupt). */
void virtio_net_check_all(void);
/* The first device's interface (NULL if none). */
struct netif *virtio_net_netif(u32 i);
/* "net: rx=<n> tx=<n>", totals over all devices. */
void virtio_net_report(void);

#endif
