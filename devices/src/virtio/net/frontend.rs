//! What every virtio-net model shares, whatever carries its packets (a TAP
//! served by godwit's datapath, a vhost-user backend, kernel vhost-net): the
//! configuration space (MAC, status, MTU), the feature handshake, the checks
//! at activation, the control queue of vhost models, reset, the saved device
//! state, the link status and announce. Each model is a [`NetFrontend`] plus
//! its datapath, so these rules exist once and cannot drift apart.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MQ, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{CtrlJob, CtrlThread};
use super::shared::Shared;
use super::{
    ctrl_queue_index, features, format_mac, NetInfo, RxFilter, VirtioNetState, CONFIG_LEN,
    CTRL_QUEUE_SIZE, MAX_QUEUE_PAIRS,
};
use crate::net::{Tap, TapOffloads};
use crate::virtio::pause::PauseGate;
use crate::virtio::{
    feature, ActivateError, ActivateParams, InterruptKind, QueuePosition, VirtioInterrupt,
};
use crate::virtio::{AtomicFeatures, Features};
use crate::GuestMemory;

/// The virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// The virtio spec's (and virtio-queue's) largest queue.
const MAX_QUEUE_SIZE: u16 = 32768;
/// Receive ring 0 and transmit ring 1: the rings of one queue pair.
pub(crate) const DATA_RINGS: usize = 2;

/// How the VMM configures the guest-visible side of a virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConfig {
    pub mac: [u8; 6],
    /// Features to offer; VIRTIO_F_VERSION_1 (and what godwit always
    /// offers) is added.
    pub features: Features,
    pub mtu: u16,
    /// Maximum size of the receive and transmit rings (a power of two).
    pub queue_size: u16,
    /// Queue pairs (`max_virtqueue_pairs`), 1 to [`MAX_QUEUE_PAIRS`].
    pub queue_pairs: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("virtio-net queue size {0} is invalid: use a power of two from 2 to 32768")]
    QueueSize(u16),
    #[error("virtio-net queue pair count {0} is invalid: use queues= from 1 to {MAX_QUEUE_PAIRS}")]
    QueuePairs(u16),
    #[error("MAC address {} is a multicast address: a NIC needs a unicast MAC (first byte even)", format_mac(.0))]
    MulticastMac([u8; 6]),
    #[error("cannot create the pause eventfd of the {kind} device: {source}")]
    EventFd {
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What `query-net` shows about the peer, besides the frontend's state.
pub struct PeerInfo {
    name: String,
    vnet_hdr: bool,
    tap_offloads: u32,
    tap_capabilities: TapOffloads,
}

impl PeerInfo {
    /// A TAP godwit holds: its offloads now and, for godwit's own datapath,
    /// what it was probed to support.
    pub(crate) fn of_tap(tap: &Tap, capabilities: TapOffloads) -> Self {
        PeerInfo {
            name: tap.name().to_string(),
            vnet_hdr: tap.has_vnet_hdr(),
            tap_offloads: tap.offload(),
            tap_capabilities: capabilities,
        }
    }

    /// A backend godwit only knows by name (a vhost-user socket).
    pub(crate) fn of_backend(name: &str) -> Self {
        PeerInfo {
            name: name.to_string(),
            vnet_hdr: false,
            tap_offloads: 0,
            tap_capabilities: TapOffloads::default(),
        }
    }
}

/// The rings an activated vhost device hands its backend, with what the
/// backend needs to serve them and where it stands.
pub(crate) struct BackendRings {
    pub(crate) mem: GuestMemory,
    /// Receive and transmit ring as the driver configured them.
    pub(crate) queues: Vec<Queue>,
    pub(crate) kicks: Vec<EventFd>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    /// The features the driver acked.
    pub(crate) acked: Features,
    /// The backend is processing them.
    pub(crate) running: bool,
    /// Where the backend stopped (GET_VRING_BASE), for the next start.
    pub(crate) stopped_at: Option<Vec<u16>>,
}

impl BackendRings {
    /// Where the backend starts each ring on activation: the positions the
    /// transport restored (0 on a fresh start).
    pub(crate) fn bases(&self) -> Vec<u16> {
        self.queues.iter().map(|q| q.next_avail()).collect()
    }

    /// Notifies both sides once after the backend's rings were (re)started.
    ///
    /// Stopping a backend (GET_VRING_BASE, for a pause or a snapshot) can
    /// swallow a notification in either direction. The backend may have
    /// consumed a kick without serving the buffers it announced, and with
    /// VIRTIO_F_EVENT_IDX the driver has no reason to kick again. Or the
    /// backend may have published used buffers while its call fd was
    /// withdrawn, and a driver out of receive buffers then waits for an
    /// interrupt that never comes. So after every start each ring is kicked
    /// and the driver interrupted once, as spurious notifications; the
    /// virtio spec requires both sides to tolerate those, and a side with
    /// nothing to do finds its rings as it left them.
    pub(crate) fn notify_after_start(&self, backend: &str, rings: usize) {
        for (i, kick) in self.kicks.iter().take(rings).enumerate() {
            if let Err(e) = kick.write(1) {
                tracing::warn!(%backend, ring = i, "cannot notify the backend after starting its rings: {e}");
            }
        }
        for i in 0..rings.min(self.kicks.len()) {
            let queue = u16::try_from(i).unwrap_or(u16::MAX);
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(queue)) {
                tracing::warn!(%backend, ring = i, "cannot interrupt the guest after starting the backend's rings: {e}");
            }
        }
    }
}

/// The guest-visible side of a virtio-net device.
pub struct NetFrontend {
    /// Names the device in log lines (its TAP or its backend's socket).
    name: String,
    /// The model, for errors ("virtio-net (vhost-net)").
    kind: &'static str,
    /// The monitor of a vhost-user device lowers it when a backend comes
    /// back with less (strict=off).
    offered: Arc<AtomicFeatures>,
    acked: Features,
    default_mac: [u8; 6],
    mtu: u16,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    /// Parks the threads serving the queues while the VM's state is captured.
    gate: Arc<PauseGate>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// The control queue of a vhost device (a TAP device's datapath serves
    /// its own).
    ctrl: Option<CtrlThread>,
    active: bool,
    config_write_logged: bool,
}

impl NetFrontend {
    pub(crate) fn new(
        name: String,
        kind: &'static str,
        config: &FrontendConfig,
    ) -> Result<Self, FrontendError> {
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() || qs > MAX_QUEUE_SIZE {
            return Err(FrontendError::QueueSize(qs));
        }
        if config.mac[0] & 1 != 0 {
            return Err(FrontendError::MulticastMac(config.mac));
        }
        let pairs = config.queue_pairs;
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(FrontendError::QueuePairs(pairs));
        }
        let offered = config.features | features::always_offered();
        let mut queue_sizes = vec![qs; 2 * usize::from(pairs)];
        if offered & feature(VIRTIO_NET_F_CTRL_VQ) != 0 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        let gate = PauseGate::new().map_err(|source| FrontendError::EventFd { kind, source })?;
        Ok(NetFrontend {
            name,
            kind,
            offered: Arc::new(AtomicFeatures::new(offered)),
            acked: 0,
            default_mac: config.mac,
            mtu: config.mtu,
            queue_sizes,
            shared: Arc::new(Shared::new(config.mac, pairs)),
            gate: Arc::new(gate),
            interrupt: None,
            ctrl: None,
            active: false,
            config_write_logged: false,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn gate(&self) -> &Arc<PauseGate> {
        &self.gate
    }

    pub(crate) fn offered_cell(&self) -> Arc<AtomicFeatures> {
        self.offered.clone()
    }

    pub(crate) fn offered(&self) -> Features {
        self.offered.load()
    }

    pub(crate) fn acked(&self) -> Features {
        self.acked
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active
    }

    pub(crate) fn mac(&self) -> [u8; 6] {
        self.shared.mac()
    }

    pub(crate) fn link_up(&self) -> bool {
        self.shared.link_up()
    }

    pub(crate) fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Queue pairs of the device (`max_virtqueue_pairs`).
    pub(crate) fn max_pairs(&self) -> u16 {
        self.shared.max_pairs
    }

    /// The control queue's index for the features acked: after the rings
    /// of every pair with MQ, else queue 2.
    pub(crate) fn ctrl_index(&self) -> usize {
        ctrl_queue_index(self.max_pairs(), self.acked_has(VIRTIO_NET_F_MQ))
    }

    /// Queue pairs the driver set up rings for: all with MQ acked, else 1.
    pub(crate) fn pairs_in_use(&self) -> usize {
        self.ctrl_index() / DATA_RINGS
    }

    fn queue_name(&self, index: usize) -> &'static str {
        match index {
            i if i == self.ctrl_index() => "controlq",
            i if i % 2 == 0 => "receiveq",
            _ => "transmitq",
        }
    }

    pub(crate) fn ack_features(&mut self, features: Features) {
        self.acked = features & self.offered();
    }

    fn acked_has(&self, bit: u32) -> bool {
        self.acked & feature(bit) != 0
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac());
        c[6..8].copy_from_slice(&self.shared.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&self.max_pairs().to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Reads from the configuration space; bytes beyond its end read 0.
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
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

    /// The configuration space is read-only: a write is ignored (and
    /// logged once, as a sign of a confused driver).
    pub(crate) fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self.config_write_logged {
            self.config_write_logged = true;
            tracing::warn!(
                device = %self.name,
                "the guest wrote {} bytes at offset {offset:#x} of the virtio-net configuration \
                 space, which is read-only; ignored (not logged again)",
                data.len()
            );
        }
    }

    /// The checks every model makes when the driver sets DRIVER_OK: not
    /// active yet, one queue per queue size, every needed queue enabled:
    /// the rings of the first pair, the control queue when CTRL_VQ was
    /// acked. With MQ the driver may leave later pairs unconfigured (it
    /// must configure a pair before VQ_PAIRS_SET turns it on): the pairs
    /// ready, without a gap from the first, are recorded.
    pub(crate) fn check_activate(&self, params: &ActivateParams) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::AlreadyActive { device: self.kind });
        }
        if params.queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                device: self.kind,
                expected: self.queue_sizes.len(),
                got: params.queues.len(),
            });
        }
        let ctrl = self.acked_has(VIRTIO_NET_F_CTRL_VQ);
        let ctrl_index = self.ctrl_index();
        for (index, (q, _)) in params.queues.iter().enumerate() {
            let needed = index < DATA_RINGS || (index == ctrl_index && ctrl);
            if needed && !q.ready() {
                return Err(ActivateError::QueueNotReady {
                    device: self.kind,
                    index,
                    name: self.queue_name(index),
                });
            }
        }
        let ready = params.queues[..ctrl_index.min(params.queues.len())]
            .chunks(DATA_RINGS)
            .take_while(|pair| pair.iter().all(|(q, _)| q.ready()))
            .count();
        self.shared.ready_pairs.store(
            u16::try_from(ready).unwrap_or(u16::MAX).max(1),
            Ordering::SeqCst,
        );
        Ok(())
    }

    /// Activation of a vhost device after [`Self::check_activate`]: starts
    /// the control-queue thread (when CTRL_VQ was acked), which applies a
    /// guest offload change with `set_guest_offloads`, and returns the data
    /// rings for the backend.
    pub(crate) fn activate_backend(
        &mut self,
        params: ActivateParams,
        set_guest_offloads: Box<dyn FnMut(Features) -> bool + Send>,
        set_queue_pairs: Box<dyn FnMut(u16) -> bool + Send>,
    ) -> Result<BackendRings, ActivateError> {
        let (mem, interrupt) = (params.mem, params.interrupt);
        let mut queues = params.queues.into_iter();
        let (mut data, mut kicks) = (Vec::new(), Vec::new());
        for (q, kick) in queues.by_ref().take(self.ctrl_index()) {
            data.push(q);
            kicks.push(kick);
        }
        let ctrl = queues
            .next()
            .filter(|_| self.acked_has(VIRTIO_NET_F_CTRL_VQ));
        if let Some((queue, evt)) = ctrl {
            let job = CtrlJob {
                name: self.name.rsplit('/').next().unwrap_or("vhost").to_string(),
                mem: mem.clone(),
                queue,
                index: self.ctrl_index(),
                evt,
                shared: self.shared.clone(),
                acked: self.acked,
                interrupt: interrupt.clone(),
                gate: self.gate.clone(),
                set_guest_offloads,
                set_queue_pairs,
            };
            let thread = CtrlThread::start(job).map_err(|source| ActivateError::Thread {
                device: self.kind,
                source,
            })?;
            self.ctrl = Some(thread);
        }
        Ok(BackendRings {
            mem,
            queues: data,
            kicks,
            interrupt,
            acked: self.acked,
            running: false,
            stopped_at: None,
        })
    }

    /// Records the guest offloads the acked features put on the peer; call
    /// before the threads that serve the queues start (the control queue
    /// may change them).
    pub(crate) fn record_acked_offloads(&self) {
        self.shared
            .guest_offloads
            .store(self.acked & features::GUEST_OFFLOADS);
    }

    /// The datapath runs: record it, with the interrupt for configuration
    /// changes.
    pub(crate) fn set_active(&mut self, interrupt: Arc<dyn VirtioInterrupt>) {
        self.interrupt = Some(interrupt);
        self.active = true;
    }

    /// Stops the control-queue thread of a vhost device; returns its queue.
    pub(crate) fn stop_ctrl(&mut self) -> Option<Queue> {
        self.ctrl.take().and_then(CtrlThread::stop)
    }

    /// Returns the device to its state before activation, once the model
    /// stopped its datapath: nothing acked, the configured MAC, no
    /// announce pending, the default receive filter, no guest offloads and
    /// every ring at 0. The link status stays (management's word).
    pub(crate) fn reset(&mut self) {
        self.stop_ctrl();
        self.interrupt = None;
        self.active = false;
        self.acked = 0;
        self.shared.set_mac(self.default_mac);
        self.shared
            .status
            .fetch_and(!(VIRTIO_NET_S_ANNOUNCE as u16), Ordering::SeqCst);
        self.shared.with_filter(|f| *f = RxFilter::default());
        self.shared.guest_offloads.store(0);
        self.shared.active_pairs.store(1, Ordering::SeqCst);
        self.shared.ready_pairs.store(1, Ordering::SeqCst);
        for p in &self.shared.positions {
            p.store(0, Ordering::SeqCst);
        }
        tracing::debug!(device = %self.name, "{} reset", self.kind);
    }

    /// Ring positions of an active device: the data rings' as the model
    /// knows them, then the control queue's as its server published it.
    pub(crate) fn queue_positions(
        &self,
        data: impl FnOnce() -> Option<Vec<QueuePosition>>,
    ) -> Option<Vec<QueuePosition>> {
        if !self.active {
            return None;
        }
        let mut out = data()?;
        let ctrl = self.ctrl_index();
        // Rings of pairs the driver does not use (MQ not acked) stay at 0.
        while out.len() < self.queue_sizes.len().min(ctrl) {
            out.push(self.shared.position(out.len()));
        }
        if self.queue_sizes.len() > ctrl {
            out.push(self.shared.position(ctrl));
        }
        while out.len() < self.queue_sizes.len() {
            out.push(self.shared.position(usize::MAX));
        }
        Some(out)
    }

    /// Raises a configuration-change interrupt on an active device.
    pub(crate) fn config_interrupt(&self, why: &str) {
        if let Some(irq) = &self.interrupt {
            if let Err(e) = irq.trigger(InterruptKind::Config) {
                tracing::warn!(device = %self.name, "cannot raise the {why} interrupt: {e}");
            }
        }
    }

    /// Sets the link status the guest sees and, when the driver acked
    /// STATUS, tells it.
    pub(crate) fn set_link(&self, up: bool) {
        if self.shared.set_link_bit(up) && self.acked_has(VIRTIO_NET_F_STATUS) {
            tracing::info!(device = %self.name, up, "virtio-net link changed");
            self.config_interrupt("link change");
        }
    }

    /// Asks the guest to announce itself (gratuitous ARP / unsolicited NA):
    /// sets the ANNOUNCE status bit and raises a configuration interrupt.
    /// False when the driver did not ack GUEST_ANNOUNCE and STATUS or the
    /// device is not active.
    pub(crate) fn announce(&self) -> bool {
        let need = feature(VIRTIO_NET_F_GUEST_ANNOUNCE) | feature(VIRTIO_NET_F_STATUS);
        if !self.active || self.acked & need != need {
            return false;
        }
        self.shared
            .status
            .fetch_or(VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
        self.config_interrupt("announce");
        true
    }

    /// Captures the device state; call with the datapath paused.
    pub(crate) fn device_state(&self) -> VirtioNetState {
        VirtioNetState {
            mac: self.shared.mac(),
            status: self.shared.status.load(Ordering::SeqCst),
            mtu: self.mtu,
            offered: self.offered(),
            acked: self.acked,
            rx_filter: self.shared.with_filter(|f| f.clone()),
            guest_offloads: self.shared.guest_offloads.load(),
            queue_pairs: self.shared.active_pairs(),
        }
    }

    /// Puts saved driver-visible state back into a freshly built (not yet
    /// activated) device that offers the same features. The transport's
    /// restore then acks the features and activates it.
    pub(crate) fn restore_device_state(&self, state: &VirtioNetState) {
        self.shared.set_mac(state.mac);
        self.shared.status.store(state.status, Ordering::SeqCst);
        self.shared.with_filter(|f| *f = state.rx_filter.clone());
        self.shared.guest_offloads.store(state.guest_offloads);
        self.shared.active_pairs.store(
            state.queue_pairs.clamp(1, self.max_pairs()),
            Ordering::SeqCst,
        );
    }

    /// Everything a `query-net` shows, with the peer's part from the model.
    pub(crate) fn info(&self, peer: PeerInfo) -> NetInfo {
        NetInfo {
            tap: peer.name,
            vnet_hdr: peer.vnet_hdr,
            mac: format_mac(&self.mac()),
            link_up: self.link_up(),
            active: self.active,
            offered_features: self.offered(),
            acked_features: self.acked,
            acked_feature_names: features::names(self.acked),
            tap_offloads: peer.tap_offloads,
            tap_capabilities: peer.tap_capabilities,
            rx_filter: self.shared.with_filter(|f| f.clone()),
            stats: self.shared.stats(),
            queue_pairs: self.max_pairs(),
            active_queue_pairs: self.shared.active_pairs(),
            pair_stats: self.shared.pair_stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

    use super::*;

    fn config(mac: [u8; 6], queue_size: u16) -> FrontendConfig {
        FrontendConfig {
            mac,
            features: feature(VIRTIO_NET_F_CTRL_VQ) | feature(VIRTIO_NET_F_STATUS),
            mtu: 9000,
            queue_size,
            queue_pairs: 1,
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn every_model_refuses_what_a_nic_cannot_be() {
        let mut multicast = MAC;
        multicast[0] |= 1;
        assert!(matches!(
            NetFrontend::new("t".into(), "test", &config(multicast, 256)),
            Err(FrontendError::MulticastMac(m)) if m == multicast
        ));
        for bad in [0, 1, 3, 100] {
            assert!(matches!(
                NetFrontend::new("t".into(), "test", &config(MAC, bad)),
                Err(FrontendError::QueueSize(q)) if q == bad
            ));
        }
    }

    #[test]
    fn config_space_holds_mac_status_one_pair_and_mtu() {
        let f = NetFrontend::new("t".into(), "test", &config(MAC, 256)).unwrap();
        assert_eq!(f.queue_max_sizes(), &[256, 256, CTRL_QUEUE_SIZE]);
        let mut c = [0xffu8; CONFIG_LEN + 2];
        f.read_config(0, &mut c);
        assert_eq!(&c[..6], &MAC);
        assert_eq!(
            u16::from_le_bytes([c[6], c[7]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
        assert_eq!(&c[CONFIG_LEN..], &[0, 0], "beyond the end reads 0");
    }

    #[test]
    fn reset_returns_everything_the_driver_changed() {
        let mut f = NetFrontend::new("t".into(), "test", &config(MAC, 256)).unwrap();
        f.ack_features(Features::MAX);
        let shared = f.shared().clone();
        shared.set_mac([2, 0, 0, 0, 0, 1]);
        shared
            .status
            .fetch_or(VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
        shared.with_filter(|r| r.promiscuous = false);
        shared.guest_offloads.store(0x3);
        shared.positions[0].store(9 | (9 << 16), Ordering::SeqCst);
        f.set_link(false);
        f.reset();
        assert_eq!(f.acked(), 0);
        assert_eq!(shared.mac(), MAC);
        assert_eq!(
            shared.status.load(Ordering::SeqCst),
            0,
            "announce cleared, link kept down"
        );
        assert_eq!(shared.with_filter(|r| r.clone()), RxFilter::default());
        assert_eq!(shared.guest_offloads.load(), 0);
        assert!(shared
            .positions
            .iter()
            .all(|p| p.load(Ordering::SeqCst) == 0));
    }
}
