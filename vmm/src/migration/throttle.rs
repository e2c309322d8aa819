//! Auto-converge: while pre-copy does not converge, the source's vCPUs run
//! only part of each 10 ms period, as QEMU's `auto-converge` capability
//! does, so that a guest that dirties memory faster than the link carries
//! it slows down until the rest fits the downtime limit.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::machine::migration_status::MigrationParams;
use crate::machine::VmHandle;
use crate::vstate::vcpu::{THROTTLE_MAX, THROTTLE_PERIOD};

/// The throttle of one migration; lifted when dropped.
pub(super) struct Throttle<'a> {
    handle: &'a VmHandle,
    initial: u32,
    increment: u32,
    pct: u32,
}

impl<'a> Throttle<'a> {
    /// None without the auto-converge capability.
    pub(super) fn new(handle: &'a VmHandle, params: &MigrationParams) -> Option<Self> {
        params.auto_converge.then_some(Throttle {
            handle,
            initial: params.cpu_throttle_initial,
            increment: params.cpu_throttle_increment,
            pct: 0,
        })
    }

    /// After a round whose guest dirtied more than half of what the link
    /// carried: starts the throttle, or raises it.
    pub(super) fn step_up(&mut self) {
        let next = if self.pct == 0 {
            self.initial
        } else {
            self.pct + self.increment
        };
        self.pct = next.min(THROTTLE_MAX);
        self.handle.vcpus.set_throttle(self.pct);
        let pct = self.pct;
        self.handle
            .migration
            .update(|i| i.cpu_throttle_percentage = Some(pct));
        tracing::info!("migration: auto-converge throttles the vCPUs to {pct}%");
    }
}

impl Drop for Throttle<'_> {
    fn drop(&mut self) {
        self.handle.vcpus.set_throttle(0);
        self.handle
            .migration
            .update(|i| i.cpu_throttle_percentage = None);
    }
}

/// Runs `f` with, under auto-converge, a thread that makes throttled vCPUs
/// leave KVM_RUN every period: a guest that never exits by itself would
/// otherwise never stop.
pub(super) fn with_kicker<T>(
    handle: &VmHandle,
    params: &MigrationParams,
    f: impl FnOnce() -> T,
) -> T {
    if !params.auto_converge {
        return f();
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                handle.vcpus.kick_throttled();
                std::thread::sleep(THROTTLE_PERIOD);
            }
        });
        let result = f();
        stop.store(true, Ordering::Relaxed);
        result
    })
}
