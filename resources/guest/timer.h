/* The BSP's LAPIC timer in periodic mode: the serve-mode clock. Its rate is
 * measured against PIT channel 2 (gated through port 0x61); without a usable
 * PIT the KVM default (1 GHz APIC bus / 16) is assumed. */
#ifndef GUEST_TIMER_H
#define GUEST_TIMER_H

#include "types.h"

/* Measure the timer rate; prints "timer: lapic <n> ticks/ms (<pit|assumed>)". */
void timer_calibrate(void);
/* (Re)start the periodic tick (TIMER_VECTOR) every tick_ms, 0 stops it; each
 * tick raises EV_TIMER. */
void timer_start(u32 tick_ms);
/* Milliseconds of ticks so far (kept in guest memory). */
u64 timer_now_ms(void);
u32 timer_tick_ms(void);

#endif
