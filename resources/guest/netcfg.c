#include "netcfg.h"
#include "cmdline.h"
#include "parse.h"
#include "print.h"

bool netcfg_parse(struct netcfg *c)
{
	struct str v, rest, f_ip, f_server, f_gw, f_mask;

	if (!cmdline_value("ip", &v))
		return false;
	rest = v;
	f_ip.p = f_server.p = f_gw.p = f_mask.p = NULL;
	f_ip.len = f_server.len = f_gw.len = f_mask.len = 0;
	str_next_field(&rest, ':', &f_ip);
	str_next_field(&rest, ':', &f_server);
	str_next_field(&rest, ':', &f_gw);
	str_next_field(&rest, ':', &f_mask);
	if (f_ip.len == 0 || (f_ip.p[0] < '0' || f_ip.p[0] > '9'))
		return false; /* ip=dhcp, ip=off, ip=::... */

	c->gateway = 0;
	c->netmask = 0xffffff00u;
	if (!parse_ipv4(f_ip, &c->ip) || (f_gw.len && !parse_ipv4(f_gw, &c->gateway)) ||
	    (f_mask.len && !parse_ipv4(f_mask, &c->netmask))) {
		print_lock();
		put_str("net: ignoring ip=");
		put_strn_printable(v.p, v.len);
		put_str(": want <ip>::<gateway>:<netmask>\n");
		print_unlock();
		return false;
	}
	return true;
}
