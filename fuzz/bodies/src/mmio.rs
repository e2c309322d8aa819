//! virtio-mmio register sequences from a hostile guest driver.

use std::sync::{Arc, Mutex, OnceLock};

use godwit_devices::bus::BusDevice;
use godwit_devices::virtio::mmio::MmioTransport;
use godwit_devices::virtio::testing::guest_memory;
use godwit_devices::virtio::{
    feature, ActivateError, ActivateParams, QueuePosition, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use godwit_devices::GuestMemory;
use virtio_queue::QueueT;

use crate::input::Input;

/// Small, so that ring addresses the driver picks often fall inside it and
/// sometimes straddle its end.
const MEM_SIZE: usize = 1 << 20;

/// A device with a receive, a transmit and a control queue, as virtio-net
/// has, and an 8-byte configuration space: what the transport is tested
/// against, without a datapath thread.
struct Recorder {
    active: Option<Vec<QueuePosition>>,
    config: [u8; 8],
}

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 64]
    }
    fn device_features(&self) -> godwit_devices::virtio::Features {
        feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | 0b1010_0001
    }
    fn ack_features(&mut self, _features: godwit_devices::virtio::Features) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|at| self.config.get(at)).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(c) = at.and_then(|at| self.config.get_mut(at)) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive { device: "recorder" });
        }
        self.active = Some(
            params
                .queues
                .iter()
                .map(|(q, _)| QueuePosition {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        );
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn is_active(&self) -> bool {
        self.active.is_some()
    }
    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.active.clone()
    }
}

fn memory() -> GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| guest_memory(MEM_SIZE)).clone()
}

/// Access sizes a driver may use; the transport takes 4 for registers and
/// up to 8 for the configuration space.
const SIZES: [usize; 8] = [4, 4, 1, 2, 8, 3, 16, 0];

/// A sequence of accesses, each `op u8, offset, value u64`: bit 0 of `op`
/// is write, bits 1-3 the access size, bit 4 picks the offset's form (a
/// register index `u8 × 4`, or any `u16` offset in and past the window).
pub fn mmio_registers(data: &[u8]) {
    let device = Arc::new(Mutex::new(Recorder {
        active: None,
        config: *b"\x52\x54\x00\x12\x34\x56\x01\x00",
    }));
    let Ok(mut transport) = MmioTransport::new(memory(), device) else {
        return;
    };
    let mut input = Input::new(data);
    while !input.is_empty() {
        let op = input.u8();
        let size = SIZES[usize::from((op >> 1) & 7)];
        let offset = if op & 0x10 != 0 {
            u64::from(input.u8()) * 4
        } else {
            u64::from(input.u16()) % 0x1100
        };
        let mut buf = [0u8; 16];
        if op & 1 == 1 {
            let value = input.u64().to_le_bytes();
            for (b, v) in buf.iter_mut().zip(value.iter().cycle()) {
                *b = *v;
            }
            transport.write(offset, &buf[..size]);
        } else {
            transport.read(offset, &mut buf[..size]);
        }
    }
}
