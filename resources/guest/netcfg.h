/* ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>[:<hostname>:<device>:...]
 * (Linux's nfsroot/ipconfig form; fields after the netmask are ignored). */
#ifndef GUEST_NETCFG_H
#define GUEST_NETCFG_H

#include "types.h"

struct netcfg {
	u32 ip, gateway, netmask; /* host order */
};

/* False if ip= is absent or names no address (ip=dhcp, ip=off, ...). A bad
 * value prints "net: ignoring ip=...". The netmask defaults to 255.255.255.0. */
bool netcfg_parse(struct netcfg *c);

#endif
