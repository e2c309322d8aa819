#include "parse.h"

static int digit_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return 99;
}

/* Digits of s (all of them) in `base`; no overflow beyond 64 bits. */
static bool parse_digits(const char *p, size_t n, u32 base, u64 *out)
{
	u64 v = 0;

	if (n == 0)
		return false;
	for (size_t i = 0; i < n; i++) {
		int d = digit_value(p[i]);
		if (d >= (int)base)
			return false;
		if (v > (~0ULL - (u64)d) / base)
			return false;
		v = v * base + (u64)d;
	}
	*out = v;
	return true;
}

static bool has_hex_prefix(struct str s)
{
	return s.len > 2 && s.p[0] == '0' && (s.p[1] == 'x' || s.p[1] == 'X');
}

bool parse_u64(struct str s, u64 *out)
{
	if (has_hex_prefix(s))
		return parse_digits(s.p + 2, s.len - 2, 16, out);
	return parse_digits(s.p, s.len, 10, out);
}

bool parse_hex(struct str s, u64 *out)
{
	if (has_hex_prefix(s))
		return parse_digits(s.p + 2, s.len - 2, 16, out);
	return parse_digits(s.p, s.len, 16, out);
}

bool parse_size(struct str s, u64 *out)
{
	u32 shift = 0;

	if (s.len > 1) {
		switch (s.p[s.len - 1]) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		default: break;
		}
	}
	/* "0x...K" is not ambiguous: K is not a hex digit; but "0x1b" ends in a
	 * hex digit, so only strip a suffix that is not one. */
	if (shift && has_hex_prefix(s) && digit_value(s.p[s.len - 1]) < 16)
		shift = 0;
	if (shift)
		s.len--;
	u64 v;
	if (!parse_u64(s, &v) || (shift && v > (~0ULL >> shift)))
		return false;
	*out = v << shift;
	return true;
}

bool str_next_field(struct str *rest, char sep, struct str *field)
{
	if (!rest->p)
		return false;
	size_t i = 0;
	while (i < rest->len && rest->p[i] != sep)
		i++;
	field->p = rest->p;
	field->len = i;
	if (i < rest->len) {
		rest->p += i + 1;
		rest->len -= i + 1;
	} else {
		rest->p = NULL; /* that was the last field */
		rest->len = 0;
	}
	return true;
}

bool parse_ipv4(struct str s, u32 *out)
{
	struct str rest = s, f;
	u32 ip = 0;
	int parts = 0;

	while (str_next_field(&rest, '.', &f)) {
		u64 v;
		if (parts == 4 || f.len > 3 || !parse_digits(f.p, f.len, 10, &v) || v > 255)
			return false;
		ip = (ip << 8) | (u32)v;
		parts++;
	}
	if (parts != 4)
		return false;
	*out = ip;
	return true;
}
