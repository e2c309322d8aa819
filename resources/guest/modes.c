#include "modes.h"
#include "check.h"
#include "cmdline.h"
#include "crash.h"
#include "print.h"
#include "serve.h"

enum mode { MODE_REPORT, MODE_SERVE };

static enum mode parse_mode(void)
{
	struct str v;

	if (!cmdline_value("godwit.mode", &v) || str_eq(v, "report"))
		return MODE_REPORT;
	if (str_eq(v, "serve"))
		return MODE_SERVE;
	fail_begin();
	put_str("godwit.mode=");
	put_strn_printable(v.p, v.len);
	put_str(": want report or serve");
	fail_end();
	return MODE_REPORT;
}

void modes_run(void)
{
	enum mode m = parse_mode();

	if (!verdict())
		poweroff();
	crash_if_asked();
	if (m == MODE_SERVE)
		serve_run();
	poweroff();
}
