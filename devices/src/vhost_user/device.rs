//! virtio-net whose receive and transmit rings are served by a vhost-user
//! backend (DPDK, godwit's own `godwit net-backend`, ...): guest memory is
//! shared with the backend through its memfd, the guest's notifications
//! reach the backend through the transport's queue eventfds (KVM
//! ioeventfds, handed over as kick fds) and the backend interrupts the guest
//! through the transport's irqfd (its call fd), so packets never pass
//! through godwit.
//!
//! The device is the shared virtio-net frontend (configuration space,
//! control queue served by godwit itself, as QEMU does) plus the link to
//! the backend ([`super::link`]), which may go away and come back at any
//! time.
//!
//! For live migration the device logs the pages the backend writes
//! ([`DirtyTracking`], LOG_SHMFD), stops the rings
//! ([`VhostUserNet::stop_rings`], GET_VRING_BASE) and sends a RARP;
//! activation restarts the rings at the positions the transport restored
//! (SET_VRING_BASE).

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::VhostUserProtocolFeatures as P;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::conn::VhostUserError;
use super::endpoint::Endpoint;
use super::link::{lock, monitor, read_used_idx, Inner, Rechecker, RingsError};
use super::session::{BackendStatus, InterfaceInUse, Session};
use crate::dirty_log::{take_pages, DirtyLogError, DirtyTracking, SharedDirtyLog};
use crate::virtio::net::features;
use crate::virtio::net::frontend::{FrontendConfig, FrontendError, NetFrontend, PeerInfo};
use crate::virtio::net::model::virtio_frontend_methods;
use crate::virtio::net::{format_mac, NetModel, PeerStatus};
use crate::virtio::pause::PauseError;
use crate::virtio::{ActivateError, ActivateParams, QueuePosition, VirtioDevice};

const DEVICE_NAME: &str = "virtio-net (vhost-user)";

/// How the VMM configures a vhost-user net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserNetConfig {
    /// The guest-visible side (features decided by the VMM).
    pub frontend: FrontendConfig,
    /// The interface version `interface=` pinned, if any.
    pub pin: Option<String>,
    /// Deadline of every reply.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("cannot create the stop eventfd of the vhost-user monitor thread: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the vhost-user monitor thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A virtio-net device on a vhost-user backend.
pub struct VhostUserNet {
    front: NetFrontend,
    inner: Arc<Mutex<Inner>>,
    monitor: Option<(EventFd, JoinHandle<()>)>,
}

impl VhostUserNet {
    /// Builds the device on an established session. `recheck` decides about
    /// a backend that comes back after a disconnect.
    pub fn new(
        session: Session,
        endpoint: Endpoint,
        config: VhostUserNetConfig,
        recheck: Rechecker,
    ) -> Result<Self, VhostUserNetError> {
        let name = format!("{}", endpoint.path().display());
        let front = NetFrontend::new(name.clone(), DEVICE_NAME, &config.frontend)?;
        let mut inner = Inner {
            name: name.clone(),
            endpoint,
            pin: config.pin.clone(),
            timeout: config.timeout,
            session: Some(session),
            rings: None,
            recheck,
            log: None,
            blockers: Vec::new(),
            interface: None,
            reconnects: 0,
            last_error: None,
            offered: front.offered_cell(),
            shared: front.shared().clone(),
            mtu: config.frontend.mtu,
            admin_up: true,
            paused: false,
        };
        inner.set_interface();
        let inner = Arc::new(Mutex::new(inner));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VhostUserNetError::EventFd)?;
        let thread_stop = stop.try_clone().map_err(VhostUserNetError::EventFd)?;
        let monitor_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("gw-vhost-mon".into())
            .spawn(move || {
                crate::thread_hook::started(crate::thread_hook::DeviceThread::VhostUserMonitor);
                monitor(monitor_inner, thread_stop)
            })
            .map_err(VhostUserNetError::Thread)?;
        tracing::info!(
            backend = %name,
            mac = %format_mac(&config.frontend.mac),
            features = %features::names(front.offered()),
            "virtio-net (vhost-user) device created"
        );
        Ok(VhostUserNet {
            front,
            inner,
            monitor: Some((stop, thread)),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// The backend's socket.
    pub fn backend_name(&self) -> &str {
        self.front.name()
    }

    pub fn link_up(&self) -> bool {
        self.front.link_up()
    }

    /// What query-net shows about the backend.
    pub fn backend_status(&self) -> BackendStatus {
        let i = self.inner();
        BackendStatus {
            socket: i.name.clone(),
            mode: if i.endpoint.is_server() {
                "server"
            } else {
                "client"
            },
            connected: i.session.is_some(),
            rings_running: i.rings.as_ref().is_some_and(|r| r.running),
            offer: i.session.as_ref().map(|s| s.offer.clone()),
            interface: i.interface.clone(),
            reconnects: i.reconnects,
            last_error: i.last_error.clone(),
            logging: i.log.is_some(),
        }
    }

    /// The interface version in use, as query-net shows it.
    pub fn interface_in_use(&self) -> Option<InterfaceInUse> {
        self.inner().interface.clone()
    }

    /// Whether the backend can log its writes (LOG_ALL and LOG_SHMFD), else
    /// what it lacks. Without them the VM cannot migrate.
    pub fn logging_support(&self) -> Result<(), String> {
        match &self.inner().session {
            Some(s) => s.offer.logging(),
            None => Err("no backend is connected".into()),
        }
    }

    /// Stops the backend's rings (GET_VRING_BASE on each) and returns the
    /// positions where they stopped, for the device state of a migration.
    /// The next activation (or `resume_datapath`) starts them there.
    pub fn stop_rings(&self) -> Result<Vec<u16>, VhostUserError> {
        let mut i = self.inner();
        let res = i.stop_rings();
        if let Err(e) = &res {
            i.lose_session(&e.to_string());
        }
        res
    }

    /// Asks the backend to broadcast a RARP for the guest's MAC (after a
    /// migration, when the guest did not ack GUEST_ANNOUNCE). False when the
    /// backend lacks protocol feature RARP or is not connected.
    pub fn send_rarp(&self) -> Result<bool, VhostUserError> {
        let mac = self.front.mac();
        let mut i = self.inner();
        let Some(s) = i.session.as_mut() else {
            return Ok(false);
        };
        if !s.offer.has_protocol(P::RARP.bits()) {
            return Ok(false);
        }
        let res = s.conn.send_rarp(mac);
        i.check(res).map(|()| true)
    }

    fn log_error(&self, what: &'static str) -> impl Fn(RingsError) -> DirtyLogError + '_ {
        move |e| DirtyLogError::Backend {
            device: format!("vhost-user backend {}", self.front.name()),
            what,
            source: Box::new(e),
        }
    }
}

impl VirtioDevice for VhostUserNet {
    virtio_frontend_methods!(front);

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        self.front.check_activate(&params)?;
        if params.interrupt.irqfd().is_none() {
            return Err(ActivateError::Backend {
                device: DEVICE_NAME,
                source: Box::new(RingsError::NoIrqfd),
            });
        }
        self.front.record_acked_offloads();
        // No vhost-user message carries a guest offload change.
        let link = self.inner.clone();
        let rings = self.front.activate_backend(
            params,
            Box::new(|_| false),
            Box::new(move |pairs| lock(&link).enable_pairs(pairs)),
        )?;
        let interrupt = rings.interrupt.clone();
        let bases = rings.bases();
        let mut i = self.inner();
        i.rings = Some(rings);
        if let Err(e) = i.start_rings(&bases) {
            // The guest keeps running with the link down; the monitor
            // restarts the rings when a backend is back.
            i.lose_session(&format!("starting the rings failed: {e}"));
        }
        i.update_link();
        drop(i);
        self.front.set_active(interrupt);
        tracing::info!(
            backend = %self.front.name(),
            acked = %features::names(self.front.acked()),
            "virtio-net (vhost-user) activated"
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.front.stop_ctrl();
        {
            let mut i = self.inner();
            if let Err(e) = i.stop_rings() {
                i.lose_session(&format!("stopping the rings failed: {e}"));
            }
            i.rings = None;
            i.paused = false;
            i.update_link();
        }
        self.front.reset();
    }

    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.front.queue_positions(|| {
            let i = self.inner();
            let r = i.rings.as_ref()?;
            let mut out = Vec::new();
            for (n, q) in r.queues.iter().take(i.data_rings()).enumerate() {
                let used = read_used_idx(&r.mem, q).unwrap_or(0);
                let avail = r
                    .stopped_at
                    .as_ref()
                    .and_then(|b| b.get(n).copied())
                    .unwrap_or(used);
                out.push(QueuePosition {
                    next_avail: avail,
                    next_used: used,
                });
            }
            Some(out)
        })
    }

    fn interrupt_bypasses_transport(&self) -> bool {
        true
    }
}

impl NetModel for VhostUserNet {
    fn frontend(&self) -> &NetFrontend {
        &self.front
    }

    /// Only the control queue's counters count: the backend moves the
    /// packets.
    fn peer_info(&self) -> PeerInfo {
        PeerInfo::of_backend(self.front.name())
    }

    fn peer_status(&self) -> PeerStatus {
        PeerStatus::VhostUser {
            backend: Box::new(self.backend_status()),
            dirty_log: self.logging_support(),
            interface: self.interface_in_use(),
        }
    }

    fn set_link(&mut self, up: bool) {
        let mut i = self.inner();
        i.admin_up = up;
        i.update_link();
    }

    fn announce(&mut self) -> bool {
        if self.front.announce() {
            return true;
        }
        match self.send_rarp() {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!(backend = %self.front.name(), "SEND_RARP failed: {e}");
                false
            }
        }
    }

    fn pause_datapath(&self) -> Result<(), PauseError> {
        self.front.gate().pause()?;
        let mut i = self.inner();
        if i.rings.is_some() {
            if let Err(e) = i.stop_rings() {
                i.lose_session(&format!("stopping the rings for a pause failed: {e}"));
            }
        }
        i.paused = true;
        Ok(())
    }

    fn resume_datapath(&self) {
        {
            let mut i = self.inner();
            i.paused = false;
            let bases = i.rings.as_ref().and_then(|r| r.stopped_at.clone());
            if let Some(bases) = bases {
                if let Err(e) = i.start_rings(&bases) {
                    i.lose_session(&format!("restarting the rings after a pause failed: {e}"));
                }
            }
            i.update_link();
        }
        self.front.gate().resume();
    }

    fn restore_device_state(&mut self, state: &crate::virtio::net::VirtioNetState) {
        self.front.restore_device_state(state);
        self.inner().update_link();
    }

    fn blockers(&self) -> Vec<String> {
        let i = self.inner();
        let mut out = i.blockers.clone();
        if let Some(s) = &i.session {
            if let Err(lacks) = s.offer.logging() {
                out.push(format!(
                    "vhost-user backend {} lacks {lacks}: the pages it writes cannot be tracked, so the VM cannot be migrated (use a backend with dirty logging, e.g. godwit net-backend or DPDK)",
                    i.name
                ));
            }
        }
        out
    }

    fn interface(&self) -> Option<String> {
        self.inner().interface.as_ref().map(|i| i.name.clone())
    }
}

/// The backend marks every page it writes in a log it maps (LOG_SHMFD):
/// SET_LOG_BASE, LOG_ALL in SET_FEATURES and VHOST_VRING_F_LOG in
/// SET_VRING_ADDR on the running rings.
impl DirtyTracking for VhostUserNet {
    fn start_dirty_log(&self, memory_end: u64) -> Result<(), DirtyLogError> {
        let mut i = self.inner();
        if let Some(s) = &i.session {
            s.offer
                .logging()
                .map_err(|lacks| DirtyLogError::Unsupported {
                    device: format!("vhost-user backend {}", i.name),
                    reason: format!("it lacks {lacks}"),
                })?;
        }
        let log = SharedDirtyLog::new(&i.name, memory_end)?;
        i.log = Some(log);
        let res = i.apply_log();
        i.check_rings(res).map_err(self.log_error("SET_LOG_BASE"))
    }

    fn stop_dirty_log(&self) -> Result<(), DirtyLogError> {
        let mut i = self.inner();
        let Some(log) = i.log.take() else {
            return Ok(());
        };
        // The backend is told to stop before the log goes away.
        let res = i.apply_log();
        let res = i
            .check_rings(res)
            .map_err(self.log_error("turning LOG_ALL off"));
        drop(log);
        res
    }

    fn dirty_log(&self, pages: &mut Vec<u64>) {
        take_pages(self.inner().log.as_ref(), pages);
    }
}

impl Drop for VhostUserNet {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.monitor.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
        self.front.stop_ctrl();
        let i = self.inner();
        if let Some(s) = &i.session {
            s.conn.shutdown();
        }
    }
}
