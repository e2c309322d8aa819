//! Address-range buses for port I/O and MMIO exits.
//!
//! A vCPU thread that takes an I/O exit looks the address up here and calls
//! the device with the offset inside the device's range. Ranges never overlap:
//! inserting an overlapping one is refused.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::InvalidRange { base, len });
        };
        let overlapping = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(other_base, other)| **other_base + other.len > base);
        if let Some((other_base, other)) = overlapping {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: *other_base,
                other_len: other.len,
            });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn lookup(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, &entry.device))
    }

    /// Dispatches a read. Returns false when no device claims `addr`; the
    /// caller then answers as open bus (all ones), as real hardware does.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((offset, device)) => {
                lock_device(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((offset, device)) => {
                lock_device(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panicking thread still holds
/// consistent register state (every access is a single register update), so
/// keep serving it rather than taking the whole VM down.
fn lock_device(
    device: &Arc<Mutex<dyn BusDevice>>,
) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offsets_and_refuses_overlaps() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x3fc, 8, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x3f0, 9, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(0x10, 0, dev.clone()),
            Err(BusError::InvalidRange { base: 0x10, len: 0 })
        );
        bus.insert(0x400, 1, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f9, &[7]));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.write(0x401, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![(1, vec![7])]);
    }
}
