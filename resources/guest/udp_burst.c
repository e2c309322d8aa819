#include "udp_burst.h"
#include "cmdline.h"
#include "mem.h"
#include "net/arp.h"
#include "net/bytes.h"
#include "net/ipv4.h"
#include "net/udp.h"
#include "parse.h"
#include "print.h"
#include "string.h"
#include "virtio_net.h"

#define TIMEOUT_MS   5000
#define ARP_RETRY_MS 500
#define SEQ_LEN      4

enum state { OFF, WAIT_LINK, RESOLVE, SEND, DONE };

static enum state state = OFF;
static struct netif *nif;
static u32 dst_ip, count, size, sent, received;
static u16 dst_port;
static u8 dst_mac[ETH_ALEN];
static u8 *seen;    /* bitmap of sequence numbers answered */
static u8 *payload; /* template */
static u64 t0, next_arp;

static void finish(void)
{
	state = DONE;
	print_lock();
	put_str("udp-burst: sent ");
	put_dec(sent);
	put_str(" received ");
	put_dec(received);
	put_char('\n');
	print_unlock();
}

static void on_reply(struct netif *n, const u8 *src_mac, u32 src_ip, u16 src_port, const u8 *data,
		     u32 len)
{
	(void)src_mac;
	if (state != SEND || n != nif || src_ip != dst_ip || src_port != dst_port)
		return;
	if (size >= SEQ_LEN) {
		if (len < SEQ_LEN)
			return;
		u32 seq = get_be32(data);
		if (seq >= sent || (seen[seq / 8] & (1u << (seq % 8))))
			return;
		seen[seq / 8] |= (u8)(1u << (seq % 8));
	} else if (received >= sent) {
		return;
	}
	if (++received == count)
		finish();
}

static bool parse(struct str v)
{
	struct str rest = v, f_ip, f_port, f_count, f_size;
	u64 port, n, sz;

	if (!str_next_field(&rest, ':', &f_ip) || !str_next_field(&rest, ':', &f_port) ||
	    !str_next_field(&rest, ':', &f_count) || !str_next_field(&rest, ':', &f_size) ||
	    rest.p)
		return false;
	if (!parse_ipv4(f_ip, &dst_ip) || !parse_u64(f_port, &port) || port == 0 ||
	    port > 65535 || !parse_u64(f_count, &n) || n > 0x1000000 ||
	    !parse_u64(f_size, &sz) || sz > 65535)
		return false;
	dst_port = (u16)port;
	count = (u32)n;
	size = (u32)sz;
	return true;
}

void udp_burst_init(void)
{
	struct str v;

	if (!cmdline_value("godwit.udp_burst", &v))
		return;
	print_lock();
	put_str("serve: udp-burst ");
	if (!parse(v)) {
		put_str("ignoring godwit.udp_burst=");
		put_strn_printable(v.p, v.len);
		put_str(": want <ip>:<port>:<count>:<size>\n");
		print_unlock();
		return;
	}
	nif = virtio_net_netif(0);
	if (!nif || !nif->has_ip) {
		put_str("not started: no network device with an ip= address\n");
		print_unlock();
		return;
	}
	if (size > udp_max_payload(nif)) {
		put_str("size ");
		put_dec(size);
		put_str(" capped to ");
		size = udp_max_payload(nif);
		put_dec(size);
		put_str(" (mtu), ");
	}
	seen = mem_alloc(count / 8 + 1, 8);
	payload = mem_alloc(size + 1, 8);
	if (!seen || !payload) {
		put_str("not started: out of memory\n");
		print_unlock();
		return;
	}
	for (u32 i = 0; i < size; i++)
		payload[i] = (u8)i;
	put_str("to ");
	put_ipv4(dst_ip);
	put_char(':');
	put_dec(dst_port);
	put_str(" count=");
	put_dec(count);
	put_str(" size=");
	put_dec(size);
	put_char('\n');
	print_unlock();
	udp_bind(UDP_BURST_SRC_PORT, on_reply);
	state = WAIT_LINK;
}

bool udp_burst_active(void)
{
	return state != OFF && state != DONE;
}

static void send_more(void)
{
	struct udp_tx t;

	while (sent < count && udp_tx_begin(nif, &t, size)) {
		memcpy(t.payload, payload, size);
		if (size >= SEQ_LEN)
			put_be32(t.payload, sent);
		udp_tx_send(nif, &t, dst_mac, dst_ip, UDP_BURST_SRC_PORT, dst_port);
		sent++;
	}
	nif->ops->tx_flush(nif);
}

void udp_burst_poll(u64 now)
{
	if (state == WAIT_LINK) {
		if (!nif->link_up)
			return;
		state = RESOLVE;
		t0 = next_arp = now;
	}
	if (state == RESOLVE) {
		u32 hop = ipv4_next_hop(nif, dst_ip);
		if (!hop || !arp_lookup(nif, hop, dst_mac)) {
			if (now - t0 >= TIMEOUT_MS) {
				finish();
			} else if (hop && now >= next_arp) {
				arp_request(nif, hop);
				nif->ops->tx_flush(nif);
				next_arp = now + ARP_RETRY_MS;
			}
			return;
		}
		state = SEND;
		t0 = now;
		if (count == 0) {
			finish();
			return;
		}
	}
	if (state == SEND) {
		send_more();
		if (state == SEND && now - t0 >= TIMEOUT_MS)
			finish();
	}
}
