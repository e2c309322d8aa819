//! QEMU's ISA pvpanic device at I/O port 0x505 (ACPI `QEMU0001`): Linux's
//! pvpanic driver reads which events the host handles and, when the kernel
//! panics, writes the "panicked" bit, so a panic ends the VM as a failure
//! instead of rebooting as if all went well.

use crate::bus::BusDevice;

pub const PVPANIC_PORT: u16 = 0x505;
pub const PVPANIC_LEN: u16 = 1;
/// The ACPI hardware ID Linux's pvpanic driver matches.
pub const PVPANIC_ACPI_HID: &str = "QEMU0001";
/// The guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// A crash kernel is loaded and will run (the guest goes on: only logged).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// Called when the guest reports a panic.
pub type PanicCallback = Box<dyn Fn() + Send>;

pub struct PvPanic {
    on_panic: PanicCallback,
}

impl PvPanic {
    pub fn new(on_panic: PanicCallback) -> Self {
        PvPanic { on_panic }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The events the host handles; the driver only sends those.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&event) = data.first() else {
            return;
        };
        if event & PVPANIC_PANICKED != 0 {
            tracing::warn!("the guest reported a panic through pvpanic");
            (self.on_panic)();
        } else if event & PVPANIC_CRASH_LOADED != 0 {
            tracing::warn!("the guest panicked and is running its crash kernel (pvpanic)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_the_panicked_bit_calls_back() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let mut dev = PvPanic::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps[0], PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        dev.write(0, &[]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
