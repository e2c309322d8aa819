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

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use godwit_migration::persist::Persist;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::virtio::{
    feature, status, ActivateError, ActivateParams, InterruptKind, QueuePosition, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
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

mod reg {
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
    device_features: u64,
    /// The device's used-buffer interrupts bypass the transport (vhost).
    interrupt_bypass: bool,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
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
    pub fn acked_features(&self) -> u64 {
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
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
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
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel => {
                if v != 0 {
                    self.complain(
                        Complaint::FeaturesRejected,
                        format_args!(
                            "features {v:#x} in word {sel}, beyond the 64 bits godwit offers"
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

/// One queue's configuration and progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// Everything the guest can observe of the transport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    /// What the device offered (the restoring device must offer these too).
    pub device_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// What the driver wrote to DriverFeatures (acked once FEATURES_OK).
    pub driver_features: u64,
    pub device_status: u32,
    pub queue_sel: u32,
    pub shm_sel: u32,
    pub queues: Vec<QueueConfigState>,
    pub interrupt_status: u32,
    pub config_generation: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    #[error(
        "the saved virtio-mmio state is for device type {saved} but the device given is type \
         {given}: the VM configurations of source and destination differ"
    )]
    DeviceType { saved: u32, given: u32 },
    #[error(
        "the saved state has {saved} queues but the device has {given}: the VM configurations \
         of source and destination differ"
    )]
    QueueCount { saved: usize, given: usize },
    #[error(
        "saved queue {index} has maximum size {saved} but the device's is {given}: configure \
         the same queue size on the destination"
    )]
    QueueMax {
        index: usize,
        saved: u16,
        given: u16,
    },
    #[error("saved queue {index} is invalid ({source}): the state is corrupt")]
    BadQueue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("saved queue {index} is invalid (its rings are not inside guest memory): the state is corrupt")]
    RingsOutside { index: usize },
    #[error(
        "the guest uses features {missing:#x} that the device on this host does not offer: \
         start the destination with the same device features (and a peer that supports them)"
    )]
    FeaturesNotOffered { missing: u64 },
    #[error("cannot set up the transport: {0}")]
    Transport(#[from] MmioError),
    #[error("cannot restart the restored device: {0}")]
    Activate(#[from] ActivateError),
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = (GuestMemory, Arc<Mutex<dyn VirtioDevice>>);
    type Error = MmioRestoreError;

    fn save(&self) -> MmioTransportState {
        let positions = lock(&self.device).queue_positions();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let pos = positions
                    .as_ref()
                    .and_then(|p| p.get(i).copied())
                    .unwrap_or(QueuePosition {
                        next_avail: q.next_avail(),
                        next_used: q.next_used(),
                    });
                QueueConfigState {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: pos.next_avail,
                    next_used: pos.next_used,
                }
            })
            .collect();
        MmioTransportState {
            device_type: self.device_type,
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            device_status: self.device_status(),
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            queues,
            interrupt_status: self.interrupt_status(),
            config_generation: self.interrupt.config_generation.load(Ordering::SeqCst),
        }
    }

    /// Rebuilds the transport around `device` (constructed but not active).
    /// When the saved driver had set DRIVER_OK (and the device did not need
    /// a reset), the device is given the acked features and activated with
    /// the saved ring positions; pending interrupts are raised again.
    fn restore(
        (mem, device): Self::ConstructorArgs,
        state: &MmioTransportState,
    ) -> Result<Self, MmioRestoreError> {
        let mut t = MmioTransport::new(mem, device)?;
        if t.device_type != state.device_type {
            return Err(MmioRestoreError::DeviceType {
                saved: state.device_type,
                given: t.device_type,
            });
        }
        if t.queues.len() != state.queues.len() {
            return Err(MmioRestoreError::QueueCount {
                saved: state.queues.len(),
                given: t.queues.len(),
            });
        }
        let fo = status::FEATURES_OK;
        if state.device_status & fo != 0 {
            let missing = state.driver_features & !t.device_features;
            if missing != 0 {
                return Err(MmioRestoreError::FeaturesNotOffered { missing });
            }
        }
        for (index, (q, s)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if q.max_size() != s.max_size {
                return Err(MmioRestoreError::QueueMax {
                    index,
                    saved: s.max_size,
                    given: q.max_size(),
                });
            }
            let bad = |source| MmioRestoreError::BadQueue { index, source };
            q.try_set_size(s.size).map_err(bad)?;
            q.try_set_desc_table_address(GuestAddress(s.desc_table))
                .map_err(bad)?;
            q.try_set_avail_ring_address(GuestAddress(s.avail_ring))
                .map_err(bad)?;
            q.try_set_used_ring_address(GuestAddress(s.used_ring))
                .map_err(bad)?;
            q.set_next_avail(s.next_avail);
            q.set_next_used(s.next_used);
            q.set_ready(s.ready);
            if s.ready && !q.is_valid(&t.mem) {
                return Err(MmioRestoreError::RingsOutside { index });
            }
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.shm_sel = state.shm_sel;
        t.interrupt
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        t.interrupt
            .device_status
            .store(state.device_status, Ordering::SeqCst);
        if state.device_status & fo != 0 {
            lock(&t.device).ack_features(state.driver_features);
        }
        let live = status::DRIVER_OK;
        if state.device_status & live != 0 && state.device_status & status::DEVICE_NEEDS_RESET == 0
        {
            let event_idx = state.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
            let positions: Vec<QueuePosition> = state
                .queues
                .iter()
                .map(|s| QueuePosition {
                    next_avail: s.next_avail,
                    next_used: s.next_used,
                })
                .collect();
            t.activate_with(event_idx, &positions)?;
        }
        if state.interrupt_status != 0 {
            t.interrupt
                .interrupt_status
                .store(state.interrupt_status, Ordering::SeqCst);
            // An edge that was in flight on the source is gone: raise it again.
            if let Err(e) = t.interrupt.irq.write(1) {
                tracing::warn!("cannot re-raise the restored virtio interrupt: {e}");
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::guest_memory;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Dummy {
        acked: u64,
        active: Option<Vec<(Queue, EventFd)>>,
        resets: usize,
        config: [u8; 8],
        fail_activation: bool,
        bypass: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX) | 0b101
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::Backend {
                    device: "dummy",
                    source: "told to fail".into(),
                });
            }
            self.active = Some(params.queues);
            Ok(())
        }
        fn reset(&mut self) {
            self.active = None;
            self.acked = 0;
            self.resets += 1;
        }
        fn is_active(&self) -> bool {
            self.active.is_some()
        }
        fn interrupt_bypasses_transport(&self) -> bool {
            self.bypass
        }
        fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
            self.active.as_ref().map(|qs| {
                qs.iter()
                    .map(|(q, _)| QueuePosition {
                        next_avail: q.next_avail() + 3,
                        next_used: q.next_used() + 2,
                    })
                    .collect()
            })
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = guest_memory(1 << 20);
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let t = MmioTransport::new(mem, dev.clone()).unwrap();
        (t, dev)
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        wr(t, reg::STATUS, 0);
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, sel);
        wr(t, reg::QUEUE_NUM, size);
        wr(t, reg::QUEUE_DESC_LOW, base as u32);
        wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = setup();
        assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), (1 << 29) | 0b101);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
        // Bad access sizes read zero and are ignored.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(reg::STATUS, &[1, 0]);
        assert_eq!(t.device_status(), 0);
        // Config space at 0x100 any width.
        t.write(0x102, &[0xaa, 0xbb]);
        let mut c = [0u8; 4];
        t.read(0x100, &mut c);
        assert_eq!(c, [0, 0, 0xaa, 0xbb]);
    }

    #[test]
    fn status_state_machine() {
        let (mut t, dev) = setup();
        // DRIVER before ACKNOWLEDGE is ignored.
        wr(&mut t, reg::STATUS, status::DRIVER);
        assert_eq!(t.device_status(), 0);
        // Features without VERSION_1: FEATURES_OK stays clear.
        negotiate(&mut t, 0b1);
        assert_eq!(t.device_status(), status::ACKNOWLEDGE | status::DRIVER);
        // Features not offered: FEATURES_OK stays clear.
        negotiate(&mut t, feature(VIRTIO_F_VERSION_1) | 0b10);
        assert_eq!(t.device_status() & status::FEATURES_OK, 0);
        // A proper subset with VERSION_1 is accepted and acked.
        let want = feature(VIRTIO_F_VERSION_1) | 0b100;
        negotiate(&mut t, want);
        assert_eq!(t.device_status() & status::FEATURES_OK, status::FEATURES_OK);
        assert_eq!(dev.lock().unwrap().acked, want);
        // Features cannot change after FEATURES_OK.
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features(), want);
        // Clearing a bit without reset is ignored.
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_ne!(t.device_status() & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 8, 0x20000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(dev.lock().unwrap().is_active());
        {
            let d = dev.lock().unwrap();
            let qs = d.active.as_ref().unwrap();
            assert_eq!(qs[0].0.size(), 16);
            assert!(qs[0].0.ready());
            assert_eq!(qs[1].0.desc_table(), 0x20000);
            assert!(!qs[0].0.event_idx_enabled());
        }
        // Writing 0 resets everything.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.device_status(), 0);
        assert!(!dev.lock().unwrap().is_active());
        assert_eq!(t.acked_features(), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn bad_queue_setup_is_ignored() {
        let (mut t, _) = setup();
        negotiate(&mut t, feature(VIRTIO_F_VERSION_1));
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 12); // not a power of two
        assert_eq!(t.queues[0].size(), 16);
        wr(&mut t, reg::QUEUE_NUM, 32); // above max
        assert_eq!(t.queues[0].size(), 16);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x1001); // misaligned
        assert_ne!(t.queues[0].desc_table(), 0x1001);
        // Rings outside guest memory cannot be enabled.
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        wr(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        // Valid setup; addresses are then frozen.
        setup_queue(&mut t, 0, 4, 0x10000);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x40000);
        wr(&mut t, reg::QUEUE_NUM, 2);
        assert_eq!(t.queues[0].desc_table(), 0x10000);
        assert_eq!(t.queues[0].size(), 4);
        // Before DRIVER_OK the driver may disable it again.
        wr(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        // Out-of-range queue selection.
        wr(&mut t, reg::QUEUE_SEL, 7);
        wr(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn notify_interrupts_and_needs_reset() {
        let (mut t, dev) = setup();
        let irq = t.interrupt_eventfd().try_clone().unwrap();
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_notify_eventfds()[1].read().unwrap(), 1);
        wr(&mut t, reg::QUEUE_NOTIFY, 9); // ignored
        t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(irq.read().unwrap(), 1);
        let gen = rd(&mut t, reg::CONFIG_GENERATION);
        t.interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), gen + 1);
        wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        wr(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);

        // A failing activation sets DEVICE_NEEDS_RESET with a config interrupt.
        dev.lock().unwrap().fail_activation = true;
        negotiate(&mut t, feature(VIRTIO_F_VERSION_1));
        let _ = irq.read();
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let s = rd(&mut t, reg::STATUS);
        assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_eq!(irq.read().unwrap(), 1);
        // Only a reset clears it.
        wr(&mut t, reg::STATUS, s);
        assert_ne!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.device_status(), 0);
    }

    /// A vhost device's backend writes the irqfd itself: while live, the
    /// used-buffer bit reads as set (with any pending config bit), so the
    /// driver's handler looks at its rings; before DRIVER_OK it does not.
    #[test]
    fn interrupt_bypass_reports_the_vring_bit_while_live() {
        let mem = guest_memory(1 << 20);
        let dev = Arc::new(Mutex::new(Dummy {
            bypass: true,
            ..Dummy::default()
        }));
        let mut t = MmioTransport::new(mem, dev).unwrap();
        assert!(t.interrupt.irqfd().is_some());
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        negotiate(&mut t, feature(VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 8, 0x20000);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        t.interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        wr(&mut t, reg::INTERRUPT_ACK, INT_VRING | INT_CONFIG);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // A device without the capability reports only what was raised.
        let (mut plain, _) = setup();
        negotiate(&mut plain, feature(VIRTIO_F_VERSION_1));
        setup_queue(&mut plain, 0, 16, 0x10000);
        setup_queue(&mut plain, 1, 8, 0x20000);
        wr(
            &mut plain,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(rd(&mut plain, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn state_round_trips() {
        let (mut t, dev) = setup();
        let want = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX);
        negotiate(&mut t, want);
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 4, 0x30000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        t.interrupt.trigger(InterruptKind::Config).unwrap();
        wr(&mut t, reg::QUEUE_SEL, 1);
        let state = t.save();
        assert_eq!(state.device_type, 42);
        assert_eq!(state.driver_features, want);
        assert_eq!(state.queues.len(), 2);
        assert_eq!(state.queues[0].next_avail, 3);
        assert_eq!(state.queues[0].next_used, 2);
        assert!(state.queues[1].ready);
        assert_eq!(state.queues[1].size, 4);
        assert_eq!(state.interrupt_status, INT_CONFIG);
        assert_eq!(state.config_generation, 1);
        assert_ne!(state.device_status & status::DRIVER_OK, 0);

        // serde round trip.
        let json = serde_json::to_string(&state).unwrap();
        let back: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        // Restore onto a fresh device: it is acked, activated at the saved
        // positions, and the pending interrupt is raised again.
        drop(t);
        drop(dev);
        let dev2 = Arc::new(Mutex::new(Dummy::default()));
        let t2 = MmioTransport::restore((guest_memory(1 << 20), dev2.clone()), &back).unwrap();
        assert_eq!(t2.interrupt_eventfd().read().unwrap(), 1);
        {
            let d = dev2.lock().unwrap();
            assert_eq!(d.acked, want);
            let qs = d.active.as_ref().unwrap();
            assert_eq!(qs[0].0.next_avail(), 3);
            assert!(qs[0].0.event_idx_enabled());
        }
        // The dummy reports positions +3/+2 of what it got; compare the rest.
        let mut again = t2.save();
        for q in &mut again.queues {
            q.next_avail -= 3;
            q.next_used -= 2;
        }
        assert_eq!(again, state);

        // Mismatches are refused with a clear error.
        let mut wrong = state.clone();
        wrong.device_type = 1;
        let err = MmioTransport::restore(
            (
                guest_memory(1 << 20),
                Arc::new(Mutex::new(Dummy::default())),
            ),
            &wrong,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("device type 1"), "{err}");
        let mut wrong = state.clone();
        wrong.driver_features |= 1 << 40;
        let err = MmioTransport::restore(
            (
                guest_memory(1 << 20),
                Arc::new(Mutex::new(Dummy::default())),
            ),
            &wrong,
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, MmioRestoreError::FeaturesNotOffered { .. }),
            "{err}"
        );
    }
}
