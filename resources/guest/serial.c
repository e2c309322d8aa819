#include "serial.h"
#include "io.h"

#define UART_THR 0 /* transmit holding (DLAB=0) */
#define UART_DLL 0 /* divisor latch low (DLAB=1) */
#define UART_IER 1
#define UART_DLM 1
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20

void serial_init(void)
{
	outb(COM1_BASE + UART_IER, 0x00);  /* no interrupts */
	outb(COM1_BASE + UART_LCR, 0x80);  /* DLAB on */
	outb(COM1_BASE + UART_DLL, 0x01);  /* 115200 baud */
	outb(COM1_BASE + UART_DLM, 0x00);
	outb(COM1_BASE + UART_LCR, 0x03);  /* 8N1, DLAB off */
	outb(COM1_BASE + UART_MCR, 0x03);  /* DTR | RTS, OUT2 off (no IRQ) */
}

void serial_putc(char c)
{
	/* Bounded so a UART that never reports THR empty cannot hang the guest. */
	for (u32 spins = 0; spins < 100000; spins++)
		if (inb(COM1_BASE + UART_LSR) & LSR_THRE)
			break;
	outb(COM1_BASE + UART_THR, (u8)c);
}
