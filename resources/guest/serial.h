/* 16550 UART at COM1 (port 0x3f8), polled, no interrupts. */
#ifndef GUEST_SERIAL_H
#define GUEST_SERIAL_H

#include "types.h"

#define COM1_BASE 0x3f8

void serial_init(void);
void serial_putc(char c);

#endif
