//! QEMU's `isa-debug-exit`: a write of value v to I/O port 0xf4 ends the VMM
//! with status `(v << 1) | 1`. Test runners built for QEMU (a guest that
//! writes its result there) work unchanged; the status is odd, so it never
//! looks like a clean 0.

use crate::bus::BusDevice;

pub const DEBUG_EXIT_BASE: u16 = 0xf4;
/// QEMU's default `iosize`: a byte, word or dword write at 0xf4 all count.
pub const DEBUG_EXIT_LEN: u16 = 4;

/// Called with the value the guest wrote.
pub type ExitCallback = Box<dyn Fn(u32) + Send>;

pub struct DebugExit {
    on_exit: ExitCallback,
}

impl DebugExit {
    pub fn new(on_exit: ExitCallback) -> Self {
        DebugExit { on_exit }
    }
}

/// The process exit status QEMU gives for a written `value` (the low 8 bits
/// of `(value << 1) | 1`, as `exit(3)` keeps them).
pub fn exit_status(value: u32) -> u8 {
    ((value << 1) | 1) as u8
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // QEMU's device reads as all ones (no read handler).
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // QEMU decodes a write anywhere in the window as the value written.
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        tracing::info!(
            offset,
            value,
            "guest wrote to the debug-exit port: godwit exits with status {}",
            exit_status(value)
        );
        (self.on_exit)(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn writes_report_their_value_and_map_as_qemu_does() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = DebugExit::new(Box::new(move |v| s.lock().unwrap().push(v)));
        dev.write(0, &[3]);
        dev.write(0, &[0x34, 0x12]);
        dev.write(0, &7u32.to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![3, 0x1234, 7]);
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(3), 7);
        assert_eq!(exit_status(0x7f), 0xff);
        assert_eq!(exit_status(0x80), 1);
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
