#include "udp_echo.h"
#include "string.h"
#include "udp.h"

#define ECHO_PORT 7

static void echo(struct netif *nif, const u8 *src_mac, u32 src_ip, u16 src_port, const u8 *data,
		 u32 len)
{
	struct udp_tx t;

	if (!udp_tx_begin(nif, &t, len))
		return;
	memcpy(t.payload, data, len);
	udp_tx_send(nif, &t, src_mac, src_ip, ECHO_PORT, src_port);
}

void udp_echo_init(void)
{
	udp_bind(ECHO_PORT, echo);
}
