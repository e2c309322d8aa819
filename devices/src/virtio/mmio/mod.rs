//! virtio-mmio transport, version 2 (virtio 1.x "modern") only.
//!
//! One [`MmioTransport`] serves one device in a 0x1000-byte MMIO slot. The
//! VMM inserts it on the MMIO bus at the slot's base and:
//!
//! * registers each of [`MmioTransport::queue_notify_eventfds`] with KVM as
//!   an ioeventfd on `base + NOTIFY_OFFSET`, 4 bytes, datamatch = queue index,
//!   so queue notifications never exit to userspace (a write that still
//!   reaches [`BusDevice::write`] signals the same eventfd);
//! * registers [`MmioTransport::interrupt_eventfd`] with KVM as an irqfd on
//!   the device's GSI and tells the guest about the slot and the GSI (kernel
//!   command line `virtio_mmio.device=4K@<base>:<gsi>`).
//!
//! Interrupts: InterruptStatus bit 0 (used buffer) and bit 1 (configuration
//! change) latch until the driver writes them to InterruptACK. Every new
//! notification writes the irqfd once, which injects an *edge* on the GSI.
//! Linux programs virtio-mmio IOAPIC pins edge-triggered (the interrupt is
//! described as an edge-triggered ISA-style line), so this is exact: the
//! driver's handler reads InterruptStatus, ACKs what it read, and any
//! notification raised after that read writes the irqfd again and produces a
//! new edge, so nothing is lost. A level-triggered pin would need a resample
//! fd; godwit does not offer that configuration.
//!
//! Devices whose datapath runs outside godwit (vhost-user, kernel vhost-net;
//! [`VirtioDevice::interrupt_bypasses_transport`]) hand the irqfd to their
//! backend as its call fd, so the transport does not see their used-buffer
//! interrupts. For them InterruptStatus reads with the used-buffer bit set
//! whenever the device is live (DRIVER_OK), plus any pending configuration
//! bit: the driver's interrupt handler then always checks its rings.
// The guest writes these registers: no cast may silently truncate them.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::virtio::{
    feature, feature_word, status, ActivateError, ActivateParams, Features, InterruptKind,
    QueuePosition, VirtioDevice, VirtioInterrupt, FEATURE_BITS, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::GuestMemory;

/// Size of one virtio-mmio slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the ioeventfds go.
pub const NOTIFY_OFFSET: u64 = 0x50;
/// "virt" little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Only the modern interface.
pub const MMIO_VERSION: u32 = 2;
/// "GDWT" little-endian: godwit's vendor ID.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"GDWT");

const INT_VRING: u32 = 0x1;
const INT_CONFIG: u32 = 0x2;
const CONFIG_SPACE: u64 = 0x100;

/// Register offsets of the virtio-mmio window (virtio 1.2, 4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Kinds of driver misbehaviour, each logged once per transport.
#[derive(Clone, Copy, Debug)]
enum Complaint {
    BadAccessSize,
    UnknownRegister,
    StatusClearedBits,
    StatusOutOfOrder,
    FeaturesRejected,
    FeaturesAfterOk,
    QueueSelOutOfRange,
    QueueSetupWhileLive,
    QueueBadSize,
    QueueBadAddress,
    QueueReadyInvalid,
    NotifyOutOfRange,
    ActivateFailed,
    ConfigWrite,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create the {what} eventfd of the virtio-mmio transport: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "device type {device_type} declares a queue {index} of maximum size {size}; sizes must be \
         powers of two from 1 to 32768 (a device bug)"
    )]
    BadQueueMax {
        device_type: u32,
        index: usize,
        size: u16,
    },
}

/// What the transport shares with an active device: the interrupt line and
/// the status register (the device may set DEVICE_NEEDS_RESET).
struct MmioInterrupt {
    interrupt_status: AtomicU32,
    device_status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.interrupt_status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Queue(_) => self.raise(INT_VRING),
            InterruptKind::Config => {
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                self.raise(INT_CONFIG)
            }
        }
    }

    fn irqfd(&self) -> Option<&EventFd> {
        Some(&self.irq)
    }

    fn signal_needs_reset(&self) {
        let old = self
            .device_status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::SeqCst);
        if old & status::DEVICE_NEEDS_RESET == 0 {
            if let Err(e) = self.raise(INT_CONFIG) {
                tracing::error!("cannot signal DEVICE_NEEDS_RESET to the guest: {e}");
            }
        }
    }
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    device_features: Features,
    /// The device's used-buffer interrupts bypass the transport (vhost).
    interrupt_bypass: bool,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: Features,
    queue_sel: u32,
    shm_sel: u32,
    complained: u32,
}

fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A panic while holding the device lock leaves the device in whatever
    // state it reached; serving it is better than taking the VM down.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

fn valid_queue_size(size: u16, max: u16) -> bool {
    size != 0 && size <= max && size.is_power_of_two()
}

impl MmioTransport {
    /// Wraps `device`. Guest memory accesses (ring validation, the device's
    /// datapath) use `mem`.
    pub fn new(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<Self, MmioError> {
        let (device_type, device_features, maxes, interrupt_bypass) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.device_features(),
                d.queue_max_sizes().to_vec(),
                d.interrupt_bypasses_transport(),
            )
        };
        let mut queues = Vec::with_capacity(maxes.len());
        let mut queue_evts = Vec::with_capacity(maxes.len());
        for (index, &size) in maxes.iter().enumerate() {
            let q = Queue::new(size).map_err(|_| MmioError::BadQueueMax {
                device_type,
                index,
                size,
            })?;
            queues.push(q);
            queue_evts.push(
                EventFd::new(EFD_NONBLOCK).map_err(|source| MmioError::EventFd {
                    what: "queue notification",
                    source,
                })?,
            );
        }
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| MmioError::EventFd {
            what: "interrupt",
            source,
        })?;
        Ok(MmioTransport {
            mem,
            device,
            device_type,
            device_features,
            interrupt_bypass,
            queues,
            queue_evts,
            interrupt: Arc::new(MmioInterrupt {
                interrupt_status: AtomicU32::new(0),
                device_status: AtomicU32::new(0),
                config_generation: AtomicU32::new(0),
                irq,
            }),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            complained: 0,
        })
    }

    /// One eventfd per queue, in queue order: register each with KVM as an
    /// ioeventfd at `base + NOTIFY_OFFSET`, length 4, datamatch = its index.
    pub fn queue_notify_eventfds(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd the transport signals to interrupt the guest: register it
    /// with KVM as an irqfd on the device's GSI (edge; see the module docs).
    pub fn interrupt_eventfd(&self) -> &EventFd {
        &self.interrupt.irq
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status register as the driver reads it.
    pub fn device_status(&self) -> u32 {
        self.interrupt.device_status.load(Ordering::SeqCst)
    }

    /// The features the driver acked (valid from FEATURES_OK).
    pub fn acked_features(&self) -> Features {
        self.driver_features
    }

    /// Pending interrupt bits (InterruptStatus).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.interrupt_status.load(Ordering::SeqCst)
    }

    fn complain(&mut self, what: Complaint, msg: std::fmt::Arguments<'_>) {
        let bit = 1u32 << (what as u32);
        if self.complained & bit == 0 {
            self.complained |= bit;
            tracing::warn!(
                device_type = self.device_type,
                "virtio-mmio: ignoring a bad driver action ({what:?}): {msg} \
                 (further ones of this kind are not logged)"
            );
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn is_live(&self) -> bool {
        self.device_status() & status::DRIVER_OK != 0
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => feature_word(self.device_features, self.device_features_sel),
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => {
                let pending = self.interrupt_status();
                if self.interrupt_bypass && self.is_live() {
                    pending | INT_VRING
                } else {
                    pending
                }
            }
            reg::STATUS => self.device_status(),
            reg::CONFIG_GENERATION => self.interrupt.config_generation.load(Ordering::SeqCst),
            // No shared memory regions: length ~0 means "no such region".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => self.write_queue_num(v),
            reg::QUEUE_READY => self.write_queue_ready(v),
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_address(offset, v),
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => {
                self.interrupt
                    .interrupt_status
                    .fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => self.shm_sel = v,
            _ => self.complain(
                Complaint::UnknownRegister,
                format_args!("write of {v:#x} to read-only or unknown register {offset:#x}"),
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.device_status() & status::FEATURES_OK != 0 {
            self.complain(
                Complaint::FeaturesAfterOk,
                format_args!("DriverFeatures written after FEATURES_OK"),
            );
            return;
        }
        let sel = self.driver_features_sel;
        match sel.checked_mul(32).filter(|shift| *shift < FEATURE_BITS) {
            Some(shift) => {
                let word = Features::from(u32::MAX) << shift;
                self.driver_features =
                    (self.driver_features & !word) | (Features::from(v) << shift);
            }
            None => {
                if v != 0 {
                    self.complain(
                        Complaint::FeaturesRejected,
                        format_args!(
                            "features {v:#x} in word {sel}, beyond the {FEATURE_BITS} feature bits of virtio"
                        ),
                    );
                }
            }
        }
    }

    /// Queue configuration is only accepted before DRIVER_OK, on a queue the
    /// driver has not enabled yet.
    fn queue_configurable(&mut self, what: &str) -> bool {
        let live = self.is_live();
        let sel = self.queue_sel;
        match self.queues.get(sel as usize) {
            None => {
                self.complain(
                    Complaint::QueueSelOutOfRange,
                    format_args!("{what} for queue {sel}, which does not exist"),
                );
                false
            }
            Some(q) if live || q.ready() => {
                self.complain(
                    Complaint::QueueSetupWhileLive,
                    format_args!("{what} for queue {sel} after it was enabled or after DRIVER_OK"),
                );
                false
            }
            Some(_) => true,
        }
    }

    fn write_queue_num(&mut self, v: u32) {
        if !self.queue_configurable("QueueNum") {
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let max = q.max_size();
        match u16::try_from(v) {
            Ok(size) if valid_queue_size(size, max) => q.set_size(size),
            _ => self.complain(
                Complaint::QueueBadSize,
                format_args!("queue {sel} size {v} is not a power of two from 1 to {max}"),
            ),
        }
    }

    fn write_queue_address(&mut self, offset: u64, v: u32) {
        if !self.queue_configurable("a ring address") {
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let high = offset & 4 != 0;
        let current = match offset & !4 {
            reg::QUEUE_DESC_LOW => q.desc_table(),
            reg::QUEUE_DRIVER_LOW => q.avail_ring(),
            _ => q.used_ring(),
        };
        let addr = if high {
            (current & 0xffff_ffff) | (u64::from(v) << 32)
        } else {
            (current & !0xffff_ffff) | u64::from(v)
        };
        let res = match offset & !4 {
            reg::QUEUE_DESC_LOW => q.try_set_desc_table_address(GuestAddress(addr)),
            reg::QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(GuestAddress(addr)),
            _ => q.try_set_used_ring_address(GuestAddress(addr)),
        };
        if let Err(e) = res {
            self.complain(
                Complaint::QueueBadAddress,
                format_args!("queue {sel} ring address {addr:#x}: {e}"),
            );
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let sel = self.queue_sel;
        if v == 0 {
            // Disabling is allowed before DRIVER_OK (Linux does it when it
            // tears queues down); a live queue cannot be stopped without
            // VIRTIO_F_RING_RESET, which godwit does not offer.
            if self.is_live() {
                self.complain(
                    Complaint::QueueSetupWhileLive,
                    format_args!("QueueReady=0 for queue {sel} after DRIVER_OK"),
                );
            } else if let Some(q) = self.selected_queue() {
                q.set_ready(false);
            }
            return;
        }
        if !self.queue_configurable("QueueReady=1") {
            return;
        }
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else {
            return;
        };
        q.set_ready(true);
        if !q.is_valid(&mem) {
            q.set_ready(false);
            let (d, a, u, n) = (q.desc_table(), q.avail_ring(), q.used_ring(), q.size());
            self.complain(
                Complaint::QueueReadyInvalid,
                format_args!(
                    "queue {sel} enabled with rings outside guest memory or misaligned \
                     (size {n}, desc {d:#x}, driver {a:#x}, device {u:#x})"
                ),
            );
        }
    }

    fn notify(&mut self, v: u32) {
        match self.queue_evts.get(v as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::error!("cannot signal the notification eventfd of queue {v}: {e}");
                }
            }
            None => self.complain(
                Complaint::NotifyOutOfRange,
                format_args!("notification for queue {v}, which does not exist"),
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let cur = self.device_status();
        // DEVICE_NEEDS_RESET belongs to the device; a driver writing it back
        // (or not) changes nothing.
        let new = (v & 0xff) & !status::DEVICE_NEEDS_RESET;
        let cur_driver_bits = cur & !status::DEVICE_NEEDS_RESET;
        if new & cur_driver_bits != cur_driver_bits {
            self.complain(
                Complaint::StatusClearedBits,
                format_args!("status {v:#x} clears bits of {cur:#x} without a reset"),
            );
            return;
        }
        let mut added = new & !cur_driver_bits;
        let has = |bit: u32| new & bit != 0;
        let ordered = (!has(status::DRIVER) || has(status::ACKNOWLEDGE))
            && (!has(status::FEATURES_OK) || has(status::DRIVER))
            && (!has(status::DRIVER_OK) || has(status::FEATURES_OK));
        if !ordered {
            self.complain(
                Complaint::StatusOutOfOrder,
                format_args!("status {v:#x} sets a bit before the bits it must follow"),
            );
            return;
        }
        if added & status::FEATURES_OK != 0 && !self.accept_features() {
            added &= !status::FEATURES_OK;
            if added & status::DRIVER_OK != 0 {
                added &= !status::DRIVER_OK;
            }
        }
        self.interrupt
            .device_status
            .fetch_or(added, Ordering::SeqCst);
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
        if added & status::FAILED != 0 {
            tracing::warn!(
                device_type = self.device_type,
                "the guest driver gave up on the virtio device (status FAILED)"
            );
        }
    }

    fn accept_features(&mut self) -> bool {
        let extra = self.driver_features & !self.device_features;
        if extra != 0 || self.driver_features & feature(VIRTIO_F_VERSION_1) == 0 {
            let (d, o) = (self.driver_features, self.device_features);
            self.complain(
                Complaint::FeaturesRejected,
                format_args!(
                    "driver features {d:#x} are not a subset of the offered {o:#x} or lack \
                     VIRTIO_F_VERSION_1; FEATURES_OK stays clear"
                ),
            );
            return false;
        }
        lock(&self.device).ack_features(self.driver_features);
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let positions = vec![QueuePosition::default(); self.queues.len()];
        if let Err(e) = self.activate_with(event_idx, &positions) {
            self.complain(
                Complaint::ActivateFailed,
                format_args!("activation failed: {e}"),
            );
            tracing::error!(
                device_type = self.device_type,
                "virtio device activation failed: {e}"
            );
            self.interrupt.signal_needs_reset();
        }
    }

    fn activate_with(
        &mut self,
        event_idx: bool,
        positions: &[QueuePosition],
    ) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for ((q, evt), pos) in self.queues.iter().zip(&self.queue_evts).zip(positions) {
            let mut state = q.state();
            state.event_idx_enabled = event_idx;
            state.next_avail = pos.next_avail;
            state.next_used = pos.next_used;
            // The state comes from a queue whose setters validated it; a
            // failure here would be a virtio-queue change, reported as such.
            let copy = Queue::try_from(state).map_err(|source| ActivateError::QueueCopy {
                device: "virtio-mmio",
                source,
            })?;
            let evt = evt.try_clone().map_err(|source| ActivateError::Thread {
                device: "virtio-mmio",
                source,
            })?;
            queues.push((copy, evt));
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        lock(&self.device).activate(ActivateParams {
            mem: self.mem.clone(),
            interrupt,
            queues,
        })
    }

    fn reset(&mut self) {
        {
            let mut d = lock(&self.device);
            d.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.interrupt.interrupt_status.store(0, Ordering::SeqCst);
        self.interrupt.device_status.store(0, Ordering::SeqCst);
        // The device may have changed its offered features (e.g. a new
        // configuration applied while it was reset).
        self.device_features = lock(&self.device).device_features();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            if offset < MMIO_SLOT_SIZE && data.len() <= 8 {
                lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            } else {
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.complain(
                Complaint::BadAccessSize,
                format_args!("{}-byte read at register {offset:#x}", data.len()),
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if offset < MMIO_SLOT_SIZE && data.len() <= 8 {
                lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            } else {
                self.complain(
                    Complaint::ConfigWrite,
                    format_args!("{}-byte write at {offset:#x}", data.len()),
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.complain(
                Complaint::BadAccessSize,
                format_args!("{}-byte write at register {offset:#x}", data.len()),
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            self.complain(
                Complaint::BadAccessSize,
                format_args!("unaligned write at register {offset:#x}"),
            );
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

mod persist;
pub use persist::{MmioRestoreError, MmioTransportState, QueueConfigState};

#[cfg(test)]
mod tests;
