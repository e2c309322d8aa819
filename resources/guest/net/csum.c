#include "csum.h"
#include "bytes.h"

u64 csum_add(u64 sum, const void *data, u32 len)
{
	const u8 *p = data;

	/* 32 bits at a time into a 64-bit accumulator: carries cannot be lost
	 * for any packet size, and it halves the (emulated) instruction count. */
	for (; len >= 4; p += 4, len -= 4)
		sum += *(const u32 *)p;
	if (len >= 2) {
		sum += *(const u16 *)p;
		p += 2;
		len -= 2;
	}
	if (len)
		sum += *p; /* an odd last byte is the high byte of a network word */
	return sum;
}

u16 csum_fold(u64 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)sum;
}

u16 csum(const void *data, u32 len)
{
	return (u16)~csum_fold(csum_add(0, data, len));
}

u64 csum_pseudo(u32 src, u32 dst, u8 proto, u16 len)
{
	u8 ph[12];

	put_be32(ph, src);
	put_be32(ph + 4, dst);
	ph[8] = 0;
	ph[9] = proto;
	put_be16(ph + 10, len);
	return csum_add(0, ph, sizeof(ph));
}

void csum_store(u8 *p, u16 c)
{
	p[0] = (u8)c; /* the sum was taken over little-endian loads */
	p[1] = (u8)(c >> 8);
}
