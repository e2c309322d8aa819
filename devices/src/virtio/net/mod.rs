//! virtio-net over a TAP peer.
//!
//! Queues: 0 = receive, 1 = transmit, 2 = control (only when CTRL_VQ is
//! offered). One queue pair; with MQ the configuration space says
//! `max_virtqueue_pairs = 1`.
//!
//! The VMM builds a device with [`VirtioNet::new`] from a [`Tap`] and a
//! [`NetConfig`] (MAC, offered features, MTU, queue size), wraps it in an
//! `Arc<Mutex<_>>`, and hands a clone to
//! [`crate::virtio::mmio::MmioTransport::new`]. It keeps its own clone for
//! [`VirtioNet::set_link`], [`VirtioNet::announce`] and [`VirtioNet::info`].
//!
//! The offered features are validated against [`features::FEATURES`] at
//! construction: godwit never silently offers less than it was asked for
//! (use [`features::mask_for_peer`] first to get QEMU's lenient behaviour,
//! with the list of what was dropped).
//!
//! When the driver sets DRIVER_OK the device sets the TAP's offloads from the
//! acked guest features (`TUNSETOFFLOAD`) and starts one datapath thread
//! (see `worker.rs`); `reset` stops it and keeps the TAP for the next
//! activation.

pub(crate) mod ctrl;
pub mod features;
pub(crate) mod model;
pub use model::{NetModel, PeerTap};
mod state;
pub use state::VirtioNetState;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use serde::Serialize;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::net::{Tap, TapOffloads};
use crate::virtio::pause::{PauseError, PauseGate};
use crate::virtio::{
    feature, ActivateError, ActivateParams, InterruptKind, QueuePosition, VirtioDevice,
    VirtioInterrupt,
};
use features::FeatureProblem;

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Index of the control queue (present when CTRL_VQ is offered).
pub const CTRL_QUEUE: usize = 2;
/// Default maximum size of the rx and tx queues.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// The virtio-net configuration space godwit exposes: mac, status,
/// max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;
/// The virtio 1.0 net header (num_buffers included).
pub const NET_HDR_LEN: usize = 12;

const VIRTIO_ID_NET: u32 = 1;
/// The virtio spec's (and virtio-queue's) largest queue.
const MAX_QUEUE_SIZE: u16 = 32768;
const DEVICE_NAME: &str = "virtio-net";

/// How the VMM configures a virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (configuration space `mac`).
    pub mac: [u8; 6],
    /// The feature bits to offer (VIRTIO_F_VERSION_1 is always added). Every
    /// bit must be implemented by godwit and supported by the TAP: see
    /// [`features::validate`] and [`features::mask_for_peer`].
    pub features: u64,
    /// The MTU advertised to the guest; required when the MTU feature is on.
    pub mtu: Option<u16>,
    /// Maximum size of the rx and tx queues (a power of two).
    pub queue_size: u16,
}

impl NetConfig {
    /// A configuration with the given MAC and features, default queue size, no MTU.
    pub fn new(mac: [u8; 6], features: u64) -> Self {
        NetConfig {
            mac,
            features,
            mtu: None,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net on TAP {tap} cannot offer the requested features: {}", join_problems(.problems))]
    Features {
        tap: String,
        problems: Vec<FeatureProblem>,
    },
    #[error("virtio-net queue size {0} is invalid: use a power of two from 2 to 32768")]
    QueueSize(u16),
    #[error("the mtu feature is on but no MTU value was given: set an MTU from 68 to 65535")]
    MtuMissing,
    #[error("MTU {0} is out of range: use a value from 68 to 65535")]
    MtuRange(u16),
    #[error("MAC address {} is a multicast address: a NIC needs a unicast MAC (first byte even)", format_mac(.0))]
    MulticastMac([u8; 6]),
    #[error("cannot create the stop eventfd of the virtio-net datapath: {0}")]
    EventFd(#[source] std::io::Error),
}

fn join_problems(p: &[FeatureProblem]) -> String {
    p.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `52:54:00:12:34:56` formatting.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why the datapath dropped a packet or rejected a guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Fault {
    /// The descriptor chain loops, is longer than the queue, or links to a
    /// descriptor (or indirect table) that does not exist.
    BrokenChain = 0,
    /// A descriptor points outside guest memory.
    OutOfBounds = 1,
    /// The chain is shorter than the virtio-net header (or has no room for
    /// the control queue's ack).
    TooShort = 2,
    /// A device-writable descriptor where a readable one is needed, or the
    /// other way round.
    WrongDirection = 3,
    /// The frame is larger than godwit handles (or than all the receive
    /// buffers the guest can post), or the chain has too many segments.
    TooLarge = 4,
    /// The TAP refused the frame (tx) or failed to deliver one (rx).
    Peer = 5,
}

impl Fault {
    pub const COUNT: usize = 6;
    pub const ALL: [Fault; Fault::COUNT] = [
        Fault::BrokenChain,
        Fault::OutOfBounds,
        Fault::TooShort,
        Fault::WrongDirection,
        Fault::TooLarge,
        Fault::Peer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::BrokenChain => "broken_chain",
            Fault::OutOfBounds => "out_of_bounds",
            Fault::TooShort => "too_short",
            Fault::WrongDirection => "wrong_direction",
            Fault::TooLarge => "too_large",
            Fault::Peer => "peer",
        }
    }
}

/// Live counters, shared with the datapath thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_faults: [AtomicU64; Fault::COUNT],
    tx_faults: [AtomicU64; Fault::COUNT],
    ctrl_faults: AtomicU64,
    ctrl_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn rx_fault(&self, f: Fault) {
        self.rx_faults[f as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn tx_fault(&self, f: Fault) {
        self.tx_faults[f as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn ctrl_fault(&self) {
        self.ctrl_faults.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn ctrl_error(&self) {
        self.ctrl_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts per [`Fault`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    pub broken_chain: u64,
    pub out_of_bounds: u64,
    pub too_short: u64,
    pub wrong_direction: u64,
    pub too_large: u64,
    pub peer: u64,
}

impl FaultCounts {
    fn from(c: &[AtomicU64; Fault::COUNT]) -> Self {
        let g = |f: Fault| c[f as usize].load(Ordering::Relaxed);
        FaultCounts {
            broken_chain: g(Fault::BrokenChain),
            out_of_bounds: g(Fault::OutOfBounds),
            too_short: g(Fault::TooShort),
            wrong_direction: g(Fault::WrongDirection),
            too_large: g(Fault::TooLarge),
            peer: g(Fault::Peer),
        }
    }

    /// The count for one fault.
    pub fn get(&self, f: Fault) -> u64 {
        match f {
            Fault::BrokenChain => self.broken_chain,
            Fault::OutOfBounds => self.out_of_bounds,
            Fault::TooShort => self.too_short,
            Fault::WrongDirection => self.wrong_direction,
            Fault::TooLarge => self.too_large,
            Fault::Peer => self.peer,
        }
    }

    pub fn total(&self) -> u64 {
        Fault::ALL.iter().map(|f| self.get(*f)).sum()
    }
}

/// Traffic counters of a device (since it was created).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Receive side: guest buffers returned unused (bad chains) and frames
    /// dropped (`too_large`: bigger than every buffer the guest can post;
    /// `peer`: the TAP failed or truncated a read). A frame is never dropped
    /// for lack of buffers: the TAP is not read until the guest posts some.
    pub rx_faults: FaultCounts,
    /// Transmit side: frames dropped, by reason.
    pub tx_faults: FaultCounts,
    /// Control-queue chains returned unanswered because they were malformed.
    pub ctrl_faults: u64,
    /// Control commands answered VIRTIO_NET_ERR.
    pub ctrl_errors: u64,
}

/// The receive filter the driver asked for through the control queue.
/// godwit does not filter: the TAP delivers everything and the guest's own
/// stack drops what is not for it; these are recorded for introspection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RxFilter {
    pub promiscuous: bool,
    pub all_multicast: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
}

impl Default for RxFilter {
    /// The spec's default: promiscuous until the driver says otherwise.
    fn default() -> Self {
        RxFilter {
            promiscuous: true,
            all_multicast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

/// State shared between the device and its datapath thread.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) mac: Mutex<[u8; 6]>,
    pub(crate) status: AtomicU16,
    pub(crate) rx_filter: Mutex<RxFilter>,
    pub(crate) counters: Counters,
    /// Per queue: next_avail | next_used << 16, published after each batch.
    pub(crate) positions: [AtomicU32; 3],
    /// Guest offload bits currently applied to the TAP.
    pub(crate) guest_offloads: AtomicU64,
}

impl Shared {
    pub(crate) fn mac(&self) -> [u8; 6] {
        *self.mac.lock().unwrap_or_else(PoisonError::into_inner)
    }
    pub(crate) fn set_mac(&self, mac: [u8; 6]) {
        *self.mac.lock().unwrap_or_else(PoisonError::into_inner) = mac;
    }
    pub(crate) fn with_filter<T>(&self, f: impl FnOnce(&mut RxFilter) -> T) -> T {
        f(&mut self
            .rx_filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }
}

/// What a later `query-net` shows about a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetInfo {
    pub tap: String,
    pub vnet_hdr: bool,
    pub mac: String,
    pub link_up: bool,
    pub active: bool,
    pub offered_features: u64,
    pub acked_features: u64,
    /// Names of the acked features (canonical names from the feature table).
    pub acked_feature_names: String,
    /// `TUNSETOFFLOAD` flags currently set on the TAP.
    pub tap_offloads: u32,
    pub tap_capabilities: TapOffloads,
    pub rx_filter: RxFilter,
    pub stats: NetStats,
}

struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-net device on a TAP.
pub struct VirtioNet {
    tap: Arc<Tap>,
    tap_caps: TapOffloads,
    offered: u64,
    acked: u64,
    default_mac: [u8; 6],
    mtu: u16,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    worker: Option<WorkerHandle>,
    /// Parks the datapath while the VM's state is captured.
    gate: Arc<PauseGate>,
    config_write_logged: bool,
}

impl VirtioNet {
    /// Builds a device on `tap` offering `config.features` (plus
    /// VIRTIO_F_VERSION_1). Fails, naming every offending feature and what
    /// to change, when a bit is unknown, not implemented by godwit, not
    /// supported by the TAP (probed here), or lacks a bit it depends on.
    pub fn new(tap: Tap, config: NetConfig) -> Result<Self, NetError> {
        let caps = tap.probe_offloads();
        let offered = config.features | features::always_offered();
        let problems = features::validate(offered, &caps, tap.name());
        if !problems.is_empty() {
            return Err(NetError::Features {
                tap: tap.name().to_string(),
                problems,
            });
        }
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() || qs > MAX_QUEUE_SIZE {
            return Err(NetError::QueueSize(qs));
        }
        let mtu = match (offered & feature(VIRTIO_NET_F_MTU) != 0, config.mtu) {
            (true, None) => return Err(NetError::MtuMissing),
            (_, Some(m)) if m < 68 => return Err(NetError::MtuRange(m)),
            (_, m) => m.unwrap_or(1500),
        };
        if config.mac[0] & 1 != 0 {
            return Err(NetError::MulticastMac(config.mac));
        }
        let mut queue_sizes = vec![qs, qs];
        if offered & feature(VIRTIO_NET_F_CTRL_VQ) != 0 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        tracing::info!(
            tap = tap.name(),
            mac = %format_mac(&config.mac),
            features = %features::names(offered),
            "virtio-net device created"
        );
        Ok(VirtioNet {
            tap: Arc::new(tap),
            tap_caps: caps,
            offered,
            acked: 0,
            default_mac: config.mac,
            mtu,
            queue_sizes,
            shared: Arc::new(Shared {
                mac: Mutex::new(config.mac),
                status: AtomicU16::new(VIRTIO_NET_S_LINK_UP as u16),
                rx_filter: Mutex::new(RxFilter::default()),
                counters: Counters::default(),
                positions: Default::default(),
                guest_offloads: AtomicU64::new(0),
            }),
            interrupt: None,
            worker: None,
            gate: Arc::new(PauseGate::new().map_err(NetError::EventFd)?),
            config_write_logged: false,
        })
    }

    /// The TAP peer.
    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }

    /// What the TAP was probed to support.
    pub fn tap_capabilities(&self) -> TapOffloads {
        self.tap_caps
    }

    /// The features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The features the driver acked (0 before FEATURES_OK / after reset).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The MAC address in the configuration space now.
    pub fn mac(&self) -> [u8; 6] {
        self.shared.mac()
    }

    pub fn link_up(&self) -> bool {
        self.shared.status.load(Ordering::SeqCst) & VIRTIO_NET_S_LINK_UP as u16 != 0
    }

    fn config_interrupt(&self, why: &str) {
        if let Some(irq) = &self.interrupt {
            if let Err(e) = irq.trigger(InterruptKind::Config) {
                tracing::warn!(
                    tap = self.tap.name(),
                    "cannot raise the {why} interrupt: {e}"
                );
            }
        }
    }

    /// Sets the link status the guest sees and, when the driver acked
    /// STATUS and the device is active, raises a configuration interrupt.
    pub fn set_link(&mut self, up: bool) {
        let bit = VIRTIO_NET_S_LINK_UP as u16;
        let old = if up {
            self.shared.status.fetch_or(bit, Ordering::SeqCst)
        } else {
            self.shared.status.fetch_and(!bit, Ordering::SeqCst)
        };
        if (old & bit != 0) != up && self.acked & feature(VIRTIO_NET_F_STATUS) != 0 {
            tracing::info!(tap = self.tap.name(), up, "virtio-net link changed");
            self.config_interrupt("link change");
        }
    }

    /// Asks the guest to announce itself (gratuitous ARP / unsolicited NA),
    /// e.g. after a migration: sets the ANNOUNCE status bit and raises a
    /// configuration interrupt. Returns false when the driver did not ack
    /// GUEST_ANNOUNCE (and STATUS) or the device is not active.
    pub fn announce(&mut self) -> bool {
        let need = feature(VIRTIO_NET_F_GUEST_ANNOUNCE) | feature(VIRTIO_NET_F_STATUS);
        if self.acked & need != need || self.worker.is_none() {
            return false;
        }
        self.shared
            .status
            .fetch_or(VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
        self.config_interrupt("announce");
        true
    }

    /// Parks the datapath (if active) with everything it holds, so guest
    /// memory and rings stay still until [`VirtioNet::resume_datapath`].
    pub fn pause_datapath(&self) -> Result<(), PauseError> {
        self.gate.pause()
    }

    pub fn resume_datapath(&self) {
        self.gate.resume();
    }

    /// Counters since the device was created.
    pub fn stats(&self) -> NetStats {
        let c = &self.shared.counters;
        NetStats {
            rx_packets: c.rx_packets.load(Ordering::Relaxed),
            rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
            tx_packets: c.tx_packets.load(Ordering::Relaxed),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            rx_faults: FaultCounts::from(&c.rx_faults),
            tx_faults: FaultCounts::from(&c.tx_faults),
            ctrl_faults: c.ctrl_faults.load(Ordering::Relaxed),
            ctrl_errors: c.ctrl_errors.load(Ordering::Relaxed),
        }
    }

    /// Everything a `query-net` shows.
    pub fn info(&self) -> NetInfo {
        NetInfo {
            tap: self.tap.name().to_string(),
            vnet_hdr: self.tap.has_vnet_hdr(),
            mac: format_mac(&self.mac()),
            link_up: self.link_up(),
            active: self.worker.is_some(),
            offered_features: self.offered,
            acked_features: self.acked,
            acked_feature_names: features::names(self.acked),
            tap_offloads: self.tap.offload(),
            tap_capabilities: self.tap_caps,
            rx_filter: self.shared.with_filter(|f| f.clone()),
            stats: self.stats(),
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac());
        c[6..8].copy_from_slice(&self.shared.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn stop_worker(&mut self) {
        let Some(w) = self.worker.take() else { return };
        if let Err(e) = w.stop.write(1) {
            tracing::error!(
                tap = self.tap.name(),
                "cannot signal the datapath thread to stop: {e}"
            );
        }
        // A parked datapath must wake to see the stop.
        self.gate.release_for_stop();
        if w.thread.join().is_err() {
            tracing::error!(
                tap = self.tap.name(),
                "the virtio-net datapath thread panicked; the device was reset anyway"
            );
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self.config_write_logged {
            self.config_write_logged = true;
            tracing::warn!(
                tap = self.tap.name(),
                "the guest wrote {} bytes at offset {offset:#x} of the virtio-net configuration \
                 space, which is read-only; ignored (not logged again)",
                data.len()
            );
        }
    }

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive {
                device: DEVICE_NAME,
            });
        }
        if params.queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                device: DEVICE_NAME,
                expected: self.queue_sizes.len(),
                got: params.queues.len(),
            });
        }
        let ctrl = self.acked & feature(VIRTIO_NET_F_CTRL_VQ) != 0;
        for (index, (q, _)) in params.queues.iter().enumerate() {
            let needed = index != CTRL_QUEUE || ctrl;
            if needed && !q.ready() {
                return Err(ActivateError::QueueNotReady {
                    device: DEVICE_NAME,
                    index,
                    name: ["receiveq", "transmitq", "controlq"][index.min(2)],
                });
            }
        }
        let guest_offloads = self.acked & features::GUEST_OFFLOADS;
        let flags = features::tun_offloads_for_guest(self.acked);
        self.tap
            .set_offload(flags)
            .map_err(|e| ActivateError::Backend {
                device: DEVICE_NAME,
                reason: e.to_string(),
            })?;
        self.shared
            .guest_offloads
            .store(guest_offloads, Ordering::SeqCst);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|source| ActivateError::Thread {
            device: DEVICE_NAME,
            source,
        })?;
        let worker_stop = stop.try_clone().map_err(|source| ActivateError::Thread {
            device: DEVICE_NAME,
            source,
        })?;
        let interrupt = params.interrupt.clone();
        let worker = worker::Worker::new(
            params,
            self.tap.clone(),
            self.acked,
            self.shared.clone(),
            worker_stop,
            self.gate.clone(),
        )
        .map_err(|source| ActivateError::Thread {
            device: DEVICE_NAME,
            source,
        })?;
        let name: String = format!("gw-net-{}", self.tap.name())
            .chars()
            .take(15)
            .collect();
        self.gate.attach();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker.run())
            .map_err(|source| {
                self.gate.detach();
                ActivateError::Thread {
                    device: DEVICE_NAME,
                    source,
                }
            })?;
        self.worker = Some(WorkerHandle { stop, thread });
        self.interrupt = Some(interrupt);
        tracing::info!(
            tap = self.tap.name(),
            acked = %features::names(self.acked),
            tap_offloads = format_args!("{flags:#x}"),
            "virtio-net activated"
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.interrupt = None;
        self.acked = 0;
        self.shared.set_mac(self.default_mac);
        self.shared
            .status
            .fetch_and(!(VIRTIO_NET_S_ANNOUNCE as u16), Ordering::SeqCst);
        self.shared.with_filter(|f| *f = RxFilter::default());
        self.shared.guest_offloads.store(0, Ordering::SeqCst);
        for p in &self.shared.positions {
            p.store(0, Ordering::SeqCst);
        }
        tracing::debug!(tap = self.tap.name(), "virtio-net reset");
    }

    fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.worker.as_ref()?;
        Some(
            self.shared.positions[..self.queue_sizes.len()]
                .iter()
                .map(|p| {
                    let v = p.load(Ordering::SeqCst);
                    QueuePosition {
                        next_avail: v as u16,
                        next_used: (v >> 16) as u16,
                    }
                })
                .collect(),
        )
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
