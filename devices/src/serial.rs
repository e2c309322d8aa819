//! 16550A UART on COM1, from vm-superio, raising IRQ 4 through an irqfd.

use std::io::{self, Write};

use godwit_migration::persist::Persist;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::console::ConsoleHandle;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by signalling an eventfd registered with KVM
/// as an irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOutput>,
    /// The console writer thread behind `uart`'s output, when it has one.
    console: Option<ConsoleHandle>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, output: SerialOutput) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger::new(interrupt), output),
            console: None,
        }
    }

    /// Names the console thread that drains this UART's output.
    pub fn with_console(mut self, console: Option<ConsoleHandle>) -> Self {
        self.console = console;
        self
    }

    /// Feeds host input (a console's stdin) to the guest. Returns how many
    /// bytes fit in the receive FIFO; the rest must be offered again later.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Writes out what the console still holds, waiting at most `timeout`
    /// for a slow reader; says how much output was lost over the run.
    pub fn drain_output(&mut self, timeout: std::time::Duration) {
        let _ = self.uart.writer_mut().flush();
        let Some(console) = &self.console else {
            return;
        };
        if !console.drain(timeout) {
            tracing::warn!(
                "the console reader did not take the last of the guest's output within {timeout:?}"
            );
        }
        let dropped = console.dropped();
        if dropped > 0 {
            tracing::warn!(
                "{dropped} bytes of console output were dropped: its reader did not keep up, failed, or its file reached max-size"
            );
        }
        console.close();
    }

    /// Console bytes dropped so far (0 without a console thread).
    pub fn dropped_output(&self) -> u64 {
        self.console.as_ref().map_or(0, ConsoleHandle::dropped)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            // The console sink failing (a closed pipe, a full disk) must not
            // stop the guest; losing console bytes is the lesser harm.
            tracing::warn!("serial output failed: {e:?}");
        }
    }
}

/// The UART's registers and receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("serial state is inconsistent: {0:?}")]
    InvalidState(vm_superio::serial::Error<io::Error>),
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = (EventFd, SerialOutput);
    type Error = SerialRestoreError;

    fn save(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    fn restore(
        (interrupt, output): Self::ConstructorArgs,
        state: &SerialDeviceState,
    ) -> Result<Self, SerialRestoreError> {
        let uart = Serial::from_state(
            &SerialState::from(state),
            EventFdTrigger::new(interrupt),
            NoEvents,
            output,
        )
        .map_err(SerialRestoreError::InvalidState)?;
        Ok(SerialDevice {
            uart,
            console: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_round_trips_state() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt.try_clone().unwrap(), Box::new(out.clone()));
        dev.write(1, &[0x02]); // enable THR-empty interrupt
        dev.write(0, b"h");
        dev.write(7, &[0x5a]); // scratch
        assert_eq!(out.0.lock().unwrap().as_slice(), b"h");
        assert!(evt.read().unwrap() >= 1);
        assert_eq!(dev.enqueue_input(b"ab"), 2);

        let state = dev.save();
        let evt2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored =
            SerialDevice::restore((evt2, Box::new(Shared::default())), &state).unwrap();
        assert_eq!(restored.save(), state);
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }
}
