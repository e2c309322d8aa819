//! The transport's saved state ([`MmioTransportState`]: registers, queue
//! configuration and progress) and its restore onto a new device, which
//! checks everything it is handed before the guest can see it.

use godwit_migration::persist::Persist;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;

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
    pub device_features: Features,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// What the driver wrote to DriverFeatures (acked once FEATURES_OK).
    pub driver_features: Features,
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
        "the guest uses features {missing} that the device on this host does not offer: \
         start the destination with the same device features (and a peer that supports them)"
    )]
    /// `missing` in hex (a string: a 128-bit word would make every error
    /// that carries this one twice as large).
    FeaturesNotOffered { missing: String },
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
                return Err(MmioRestoreError::FeaturesNotOffered {
                    missing: format!("{missing:#x}"),
                });
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
