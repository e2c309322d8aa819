#include "print.h"
#include "serial.h"
#include "spinlock.h"

static spinlock_t print_spinlock;

void print_lock(void) { spin_lock(&print_spinlock); }
bool print_lock_bounded(void) { return spin_lock_bounded(&print_spinlock, 1000000); }
void print_unlock(void) { spin_unlock(&print_spinlock); }

void put_char(char c)
{
	if (c == '\n')
		serial_putc('\r');
	serial_putc(c);
}

void put_str(const char *s)
{
	while (*s)
		put_char(*s++);
}

void put_strn_printable(const char *s, size_t n)
{
	for (size_t i = 0; i < n && s[i]; i++) {
		char c = s[i];
		put_char(c >= 0x20 && c < 0x7f ? c : '?');
	}
}

void put_hex(u64 v)
{
	char buf[16];
	int n = 0;

	do {
		buf[n++] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v);
	put_str("0x");
	while (n)
		put_char(buf[--n]);
}

void put_dec(u64 v)
{
	char buf[20];
	int n = 0;

	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		put_char(buf[--n]);
}

void put_hex_fixed(u64 v, u32 digits)
{
	put_str("0x");
	if (digits > 16)
		digits = 16;
	while (digits--)
		put_char("0123456789abcdef"[(v >> (digits * 4)) & 0xf]);
}

void put_mac(const u8 mac[6])
{
	for (int i = 0; i < 6; i++) {
		if (i)
			put_char(':');
		put_char("0123456789abcdef"[mac[i] >> 4]);
		put_char("0123456789abcdef"[mac[i] & 0xf]);
	}
}

void put_ipv4(u32 ip)
{
	for (int i = 3; i >= 0; i--) {
		put_dec((ip >> (i * 8)) & 0xff);
		if (i)
			put_char('.');
	}
}

void println(const char *s)
{
	print_lock();
	put_str(s);
	put_char('\n');
	print_unlock();
}
