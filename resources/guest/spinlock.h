/* Test-and-set spinlock: the acquire is an xchg with memory (implicitly locked). */
#ifndef GUEST_SPINLOCK_H
#define GUEST_SPINLOCK_H

#include "io.h"

typedef struct {
	volatile u32 locked;
} spinlock_t;

static inline bool spin_trylock(spinlock_t *l)
{
	return __atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE) == 0;
}

static inline void spin_lock(spinlock_t *l)
{
	while (!spin_trylock(l))
		while (l->locked)
			cpu_relax();
}

/* Give up after `spins` attempts; used by the trap handler so a fault while
 * the lock is held cannot deadlock the report. Returns whether it was taken. */
static inline bool spin_lock_bounded(spinlock_t *l, u32 spins)
{
	while (!spin_trylock(l)) {
		if (spins-- == 0)
			return false;
		cpu_relax();
	}
	return true;
}

static inline void spin_unlock(spinlock_t *l)
{
	__atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

#endif
