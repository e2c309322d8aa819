/* Console output. Lines from several CPUs are kept whole by a lock:
 *   print_lock(); put_str("x="); put_dec(x); put_char('\n'); print_unlock();
 * or println("whole line") which takes the lock itself. */
#ifndef GUEST_PRINT_H
#define GUEST_PRINT_H

#include "types.h"

void print_lock(void);
bool print_lock_bounded(void); /* for the trap handler */
void print_unlock(void);

void put_char(char c);
void put_str(const char *s);
void put_strn_printable(const char *s, size_t n); /* stops at NUL, '?' for non-printables */
void put_hex(u64 v);  /* 0x..., lower case, no leading zeros */
void put_dec(u64 v);
void put_hex_fixed(u64 v, u32 digits); /* 0x and exactly `digits` digits (max 16) */
void put_mac(const u8 mac[6]);          /* xx:xx:xx:xx:xx:xx */
void put_ipv4(u32 ip);                  /* dotted quad of a host-order address */

void println(const char *s);

#endif
