/* Parsing of command line values: numbers, sizes, IPv4 addresses, fields. */
#ifndef GUEST_PARSE_H
#define GUEST_PARSE_H

#include "cmdline.h"
#include "types.h"

/* Whole string as an unsigned number: "0x..." hex, else decimal. */
bool parse_u64(struct str s, u64 *out);
/* Whole string as hex, with or without "0x". */
bool parse_hex(struct str s, u64 *out);
/* Linux memparse: a number (as parse_u64) with an optional K/M/G suffix. */
bool parse_size(struct str s, u64 *out);
/* Dotted quad "a.b.c.d" -> host-order u32. */
bool parse_ipv4(struct str s, u32 *out);

/* Split off the next `sep`-separated field of *rest into *field. Returns
 * false when *rest is exhausted (after the last field). */
bool str_next_field(struct str *rest, char sep, struct str *field);

#endif
