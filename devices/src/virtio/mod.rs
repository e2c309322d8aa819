//! Virtio devices and the virtio-mmio transport that exposes them.
//!
//! The split follows rust-vmm / Cloud Hypervisor: a transport
//! ([`mmio::MmioTransport`]) owns the guest-visible registers, the feature and
//! status negotiation and the queue configuration; a device
//! ([`VirtioDevice`], e.g. [`net::VirtioNet`]) owns the device-specific
//! configuration space and, once the driver sets DRIVER_OK, the queues and the
//! datapath that serves them.

pub mod mmio;
pub mod net;
pub mod pause;
pub(crate) mod ratelimit;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

/// VIRTIO_F_VERSION_1: the modern (1.0+) interface. Every godwit device
/// offers it and the mmio transport refuses drivers that do not accept it.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_F_RING_INDIRECT_DESC.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 =
    virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// VIRTIO_F_RING_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A set of virtio feature bits, 0 to 127: the transport shows them 32 at a
/// time (DeviceFeaturesSel / DriverFeaturesSel words 0 to 3). virtio-net's
/// UDP tunnel GSO bits (65-68) live above bit 63.
pub type Features = u128;

/// How many feature bits a [`Features`] word holds.
pub const FEATURE_BITS: u32 = Features::BITS;

/// `1 << bit` for a feature bit number (below [`FEATURE_BITS`]).
pub const fn feature(bit: u32) -> Features {
    1 << bit
}

/// The 32-bit word `sel` (0 to 3) of a feature set, as the transport's
/// DeviceFeatures register shows it; 0 beyond bit 127.
pub fn feature_word(features: Features, sel: u32) -> u32 {
    features
        .checked_shr(sel.saturating_mul(32))
        .map_or(0, |w| (w & Features::from(u32::MAX)) as u32)
}

/// The bits of `features` below 64: what interfaces limited to 64-bit feature
/// words (vhost-user GET/SET_FEATURES, the kernel's VHOST_GET/SET_FEATURES)
/// carry. The caller decides what the bits above mean for it.
pub fn low64(features: Features) -> u64 {
    (features & Features::from(u64::MAX)) as u64
}

/// The bits of `features` from 64 up, shifted down (the second 64-bit word).
pub fn high64(features: Features) -> u64 {
    (features >> 64) as u64
}

/// A feature set shared between threads (there is no stable 128-bit
/// atomic): a device's offered set that a vhost-user monitor lowers, the
/// guest offloads the control queue switches.
#[derive(Debug, Default)]
pub struct AtomicFeatures(std::sync::Mutex<Features>);

impl AtomicFeatures {
    pub fn new(features: Features) -> Self {
        AtomicFeatures(std::sync::Mutex::new(features))
    }

    pub fn load(&self) -> Features {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn store(&self, features: Features) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = features;
    }
}

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device put buffers into the used ring of this queue.
    Queue(u16),
    /// The device configuration space changed (or the device needs a reset).
    Config,
}

/// How an activated device reaches the driver: the transport implements it.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises a used-buffer or configuration-change notification.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;

    /// The device hit an error it cannot recover from without a reset (a
    /// corrupt ring, say): the transport sets DEVICE_NEEDS_RESET in the device
    /// status and raises a configuration-change interrupt, and the driver is
    /// expected to reset the device.
    fn signal_needs_reset(&self);

    /// The eventfd that interrupts the guest directly (the transport's irqfd),
    /// for devices whose datapath runs outside godwit
    /// ([`VirtioDevice::interrupt_bypasses_transport`]): a vhost backend
    /// writes it as its call fd, so used-buffer interrupts never pass
    /// through godwit. `None` when the transport has no such eventfd.
    fn irqfd(&self) -> Option<&EventFd> {
        None
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateParams {
    /// Guest memory; every access to rings and buffers goes through it.
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// One entry per queue of [`VirtioDevice::queue_max_sizes`], in index
    /// order, as the driver configured it (a queue the driver did not enable
    /// has `ready() == false`), with the eventfd the driver's notifications
    /// for that queue arrive on.
    pub queues: Vec<(Queue, EventFd)>,
}

/// Where a queue's processing stands: saved with the transport state so that a
/// restored device continues where this one stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the {device} device is already active; reset it before activating it again")]
    AlreadyActive { device: &'static str },
    #[error(
        "the driver did not enable queue {index} ({name}), which the {device} device needs: \
         the guest driver is broken or does not support this device's features"
    )]
    QueueNotReady {
        device: &'static str,
        index: usize,
        name: &'static str,
    },
    #[error(
        "the transport passed {got} queues but the {device} device has {expected}: \
         this is a godwit bug"
    )]
    QueueCount {
        device: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("cannot start the {device} device: {source}")]
    Backend {
        device: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{device}: the queue configuration could not be copied for the device: {source}")]
    QueueCopy {
        device: &'static str,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("cannot start the datapath thread of the {device} device: {source}")]
    Thread {
        device: &'static str,
        source: std::io::Error,
    },
}

/// A virtio device model, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 for network, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of entries is the number of
    /// queues the device has.
    fn queue_max_sizes(&self) -> &[u16];

    /// The features the device offers, VIRTIO_F_VERSION_1 included.
    fn device_features(&self) -> Features;

    /// The features the driver accepted, when it sets FEATURES_OK. The
    /// transport has checked that they are a subset of [`Self::device_features`].
    fn ack_features(&mut self, features: Features);

    /// Reads from the device configuration space. Bytes beyond its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes to the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start serving the queues.
    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError>;

    /// Stops the datapath and returns the device to its state before
    /// activation (features not acked, configuration as constructed), so that
    /// the driver can initialise it again. Never fails: a device that cannot
    /// stop cleanly logs why.
    fn reset(&mut self);

    /// Whether the device is active (between `activate` and `reset`).
    fn is_active(&self) -> bool;

    /// Ring positions of the active device's queues, in queue order, or
    /// `None` when the device is not active. Exact once the driver stopped
    /// notifying (vCPUs paused) and the device finished its current batch.
    fn queue_positions(&self) -> Option<Vec<QueuePosition>>;

    /// Whether used-buffer interrupts reach the guest without passing through
    /// the transport: a vhost backend (vhost-user, kernel vhost-net) writes
    /// the transport's irqfd ([`VirtioInterrupt::irqfd`]) itself, so the
    /// transport never learns that a queue interrupt is pending. A driver
    /// that reads InterruptStatus first (Linux's virtio_mmio ignores an
    /// interrupt whose VRING bit is clear) would then miss it; the transport
    /// therefore reports the used-buffer bit as always set while such a
    /// device is live. A spurious used-buffer indication only makes the
    /// driver look at rings with nothing new, which drivers handle.
    fn interrupt_bypasses_transport(&self) -> bool {
        false
    }
}
