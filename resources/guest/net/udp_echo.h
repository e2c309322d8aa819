/* UDP echo (RFC 862) on port 7: the payload goes back to the sender. */
#ifndef GUEST_NET_UDP_ECHO_H
#define GUEST_NET_UDP_ECHO_H

void udp_echo_init(void);

#endif
