//! The part of the i8042 keyboard controller a guest uses to reset the
//! machine: writing 0xFE (pulse the reset line) to the command port 0x64.
//! Linux does this for `reboot=k`, and it is how the test guest powers off.

use crate::bus::BusDevice;

/// Command port offset inside the device's range, which starts at port 0x60.
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;
const COMMAND_OFFSET: u64 = 4;
const DATA_OFFSET: u64 = 0;
const CMD_RESET_CPU: u8 = 0xfe;

/// Called when the guest pulses the reset line.
pub type ResetCallback = Box<dyn Fn() + Send>;

pub struct I8042 {
    on_reset: ResetCallback,
}

impl I8042 {
    pub fn new(on_reset: ResetCallback) -> Self {
        I8042 { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, no keyboard data;
        // Linux's i8042 probe then concludes there is no controller to drive.
        let value = match offset {
            COMMAND_OFFSET | DATA_OFFSET => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            tracing::info!("guest pulsed the i8042 reset line");
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_calls_back_once() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let mut dev = I8042::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(COMMAND_OFFSET, &[0xaa]);
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let mut b = [1u8];
        dev.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b[0], 0);
    }
}
