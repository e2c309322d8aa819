#include "ioapic.h"
#include "io.h"
#include "print.h"

#define IOREGSEL 0x00
#define IOWIN    0x10
#define REG_VER  0x01
#define REG_REDTBL(pin) (0x10 + 2 * (pin))

#define RTE_MASKED (1u << 16)

static u64 base = IOAPIC_DEFAULT_BASE;
static u32 pins;

static u32 ioapic_read(u32 reg)
{
	mmio_write32(base + IOREGSEL, reg);
	return mmio_read32(base + IOWIN);
}

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(base + IOREGSEL, reg);
	mmio_write32(base + IOWIN, v);
}

void ioapic_init(void)
{
	u32 ver = ioapic_read(REG_VER);

	pins = ((ver >> 16) & 0xff) + 1;
	if (ver == 0xffffffffu)
		pins = 0; /* nothing there */
	for (u32 pin = 0; pin < pins; pin++)
		ioapic_write(REG_REDTBL(pin), RTE_MASKED);

	print_lock();
	put_str("ioapic: base=");
	put_hex(base);
	put_str(" version=");
	put_hex(ver & 0xff);
	put_str(" pins=");
	put_dec(pins);
	put_char('\n');
	print_unlock();
}

u32 ioapic_pin_count(void) { return pins; }

bool ioapic_route(u32 pin, u8 vector, u32 apic_id)
{
	if (pin >= pins)
		return false;
	ioapic_write(REG_REDTBL(pin) + 1, apic_id << 24);
	ioapic_write(REG_REDTBL(pin), vector); /* fixed, physical, high, edge, unmasked */
	return true;
}
