#include "cmdline.h"
#include "string.h"

static const char *boot_cmdline = "";

const char *cmdline_get(void) { return boot_cmdline; }
void cmdline_set(const char *s) { boot_cmdline = s ? s : ""; }

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* The next word `key` or `key=...` at or after *cursor; *cursor moves past it. */
static bool next_word(const char **cursor, const char *key, struct str *value)
{
	size_t klen = strlen(key);
	const char *p = *cursor;

	while (*p) {
		while (is_space(*p))
			p++;
		if (!*p)
			break;

		/* One word: up to an unquoted space. */
		const char *word = p;
		const char *eq = NULL;
		bool quoted = false;
		while (*p && (quoted || !is_space(*p))) {
			if (*p == '"')
				quoted = !quoted;
			else if (*p == '=' && !eq && !quoted)
				eq = p;
			p++;
		}
		size_t name_len = (size_t)((eq ? eq : p) - word);
		if (name_len != klen || memcmp(word, key, klen) != 0)
			continue;

		*cursor = p;
		if (!value)
			return true;
		if (!eq) {
			value->p = p;
			value->len = 0;
			return true;
		}
		const char *v = eq + 1;
		size_t vlen = (size_t)(p - v);
		if (vlen >= 2 && v[0] == '"' && v[vlen - 1] == '"') {
			v++;
			vlen -= 2;
		}
		value->p = v;
		value->len = vlen;
		return true;
	}
	*cursor = p;
	return false;
}

bool cmdline_find(const char *cmdline, const char *key, struct str *value)
{
	const char *cursor = cmdline;
	struct str v;
	bool found = false;

	while (next_word(&cursor, key, &v)) { /* the last occurrence wins */
		found = true;
		if (value)
			*value = v;
	}
	return found;
}

bool cmdline_next(const char **cursor, const char *key, struct str *value)
{
	if (!*cursor)
		*cursor = boot_cmdline;
	return next_word(cursor, key, value);
}

bool cmdline_value(const char *key, struct str *value)
{
	return cmdline_find(boot_cmdline, key, value);
}

u64 cmdline_u64(const char *key, u64 dflt)
{
	struct str v;
	u64 n = 0;

	if (!cmdline_value(key, &v) || v.len == 0 || v.len > 19)
		return dflt;
	for (size_t i = 0; i < v.len; i++) {
		if (v.p[i] < '0' || v.p[i] > '9')
			return dflt;
		n = n * 10 + (u64)(v.p[i] - '0');
	}
	return n;
}

bool str_eq(struct str s, const char *lit)
{
	return strlen(lit) == s.len && memcmp(s.p, lit, s.len) == 0;
}
