/* The Internet checksum (RFC 1071). Sums are byte-order independent: data
 * is added as little-endian words and the folded result stored the same way. */
#ifndef GUEST_NET_CSUM_H
#define GUEST_NET_CSUM_H

#include "types.h"

/* Add len bytes to a running sum. Every piece but the last must have an even
 * length. */
u64 csum_add(u64 sum, const void *data, u32 len);
/* Fold to 16 bits (not complemented). */
u16 csum_fold(u64 sum);
/* Complemented checksum of data, ready to store. */
u16 csum(const void *data, u32 len);
/* Sum of the IPv4 pseudo header (addresses host order). */
u64 csum_pseudo(u32 src, u32 dst, u8 proto, u16 len);
/* Store a 16-bit checksum (as returned above) at p. */
void csum_store(u8 *p, u16 c);

#endif
