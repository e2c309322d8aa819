//! virtio-net whose receive and transmit rings are served by a vhost-user
//! backend (DPDK, godwit's own `godwit net-backend`, ...): guest memory is
//! shared with the backend through its memfd, the guest's notifications
//! reach the backend through the transport's queue eventfds (KVM
//! ioeventfds, handed over as kick fds) and the backend interrupts the guest
//! through the transport's irqfd (its call fd), so packets never pass
//! through godwit.
//!
//! godwit keeps the configuration space (MAC, status, MTU) and serves the
//! control queue itself ([`crate::virtio::net::ctrl`]), as QEMU does.
//!
//! The backend may go away at any time. A monitor thread notices the
//! hang-up, sets the link down (configuration interrupt), and reconnects
//! (client: connects again; server=on: accepts the next backend). A new
//! session is checked again by the VMM's rules ([`Recheck`]): accepted, its
//! rings are restarted where the guest's used rings stand and the link comes
//! up; refused (strict=on and the backend lacks features), the link stays
//! down; degraded (strict=off), the device offers less from now on, gets a
//! migration blocker, and asks the driver to reset (DEVICE_NEEDS_RESET) so
//! that it negotiates again.
//!
//! For live migration the device exposes dirty logging
//! ([`VhostUserNet::set_dirty_log`]), stopping the rings
//! ([`VhostUserNet::stop_rings`], GET_VRING_BASE) and RARP; activation
//! restarts the rings at the positions the transport restored
//! (SET_VRING_BASE).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use vhost::vhost_user::VhostUserProtocolFeatures as P;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::conn::{
    Connection, MemRegion, VhostUserError, VringAddr, F_LOG_ALL, F_PROTOCOL_FEATURES, VRING_F_LOG,
};
use super::session::{handshake, BackendOffer, InterfaceInUse, Session};
use crate::net::TapOffloads;
use crate::virtio::net::ctrl::{CtrlJob, CtrlThread};
use crate::virtio::net::features::{self, FEATURES};
use crate::virtio::net::{
    Counters, NetInfo, NetStats, RxFilter, Shared, VirtioNetState, CONFIG_LEN, CTRL_QUEUE,
    CTRL_QUEUE_SIZE,
};
use crate::virtio::pause::{PauseError, PauseGate};
use crate::virtio::{
    feature, ActivateError, ActivateParams, InterruptKind, QueuePosition, VirtioDevice,
    VirtioInterrupt,
};
use crate::GuestMemory;

const VIRTIO_ID_NET: u32 = 1;
const DEVICE_NAME: &str = "virtio-net (vhost-user)";
/// The backend serves receive ring 0 and transmit ring 1.
const DATA_RINGS: usize = 2;
/// How often the monitor retries a lost backend.
const MONITOR_PERIOD: Duration = Duration::from_millis(100);

/// Bits a vhost-user backend must offer for the device to offer them.
pub fn backend_bits() -> u64 {
    FEATURES
        .iter()
        .filter(|f| f.vhost.vhost_user_backend_must_offer())
        .fold(0, |acc, f| acc | feature(f.bit))
}

/// What the VMM decided after a backend came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recheck {
    /// It offers everything the device offers: restart the rings.
    Accept,
    /// strict=on and it lacks features the guest was offered: keep the
    /// link down and wait for another backend. The text says why and what
    /// to do.
    Refuse(String),
    /// strict=off: the device offers `offered` from now on (the driver is
    /// asked to reset and negotiate again) and the VM gets `blocker`.
    Degrade { offered: u64, blocker: String },
}

/// Checks a returning backend: given what it offers and what the device
/// offers now.
pub type Rechecker = Box<dyn FnMut(&BackendOffer, u64) -> Recheck + Send>;

/// How godwit reaches the backend.
pub enum Endpoint {
    /// The backend listens on the socket; godwit connects.
    Client { path: PathBuf },
    /// godwit listens (server=on); the backend connects (DPDK client=1).
    Server {
        path: PathBuf,
        listener: UnixListener,
    },
}

impl Endpoint {
    pub fn client(path: &Path) -> Self {
        Endpoint::Client {
            path: path.to_path_buf(),
        }
    }

    /// Listens on `path`, replacing a stale socket left there.
    pub fn listen(path: &Path) -> Result<Self, VhostUserError> {
        let err = |source| VhostUserError::Listen {
            path: path.display().to_string(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Endpoint::Server {
            path: path.to_path_buf(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Endpoint::Client { path } | Endpoint::Server { path, .. } => path,
        }
    }

    pub fn is_server(&self) -> bool {
        matches!(self, Endpoint::Server { .. })
    }

    /// One attempt without waiting: `None` when no backend is there yet.
    pub fn try_connect(&self, timeout: Duration) -> Option<Result<Connection, VhostUserError>> {
        let name = self.path().display().to_string();
        match self {
            Endpoint::Client { path } => match UnixStream::connect(path) {
                Ok(s) => Some(Ok(Connection::new(s, name, timeout))),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
                {
                    None
                }
                Err(source) => Some(Err(VhostUserError::Connect { path: name, source })),
            },
            Endpoint::Server { listener, .. } => match listener.accept() {
                Ok((s, _)) => Some(
                    s.set_nonblocking(false)
                        .map(|()| Connection::new(s, name.clone(), timeout))
                        .map_err(|source| VhostUserError::Listen { path: name, source }),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(source) => Some(Err(VhostUserError::Listen { path: name, source })),
            },
        }
    }

    /// Connects (client) or waits for the backend to connect (server=on),
    /// for up to `wait`.
    pub fn establish(
        &self,
        wait: Duration,
        timeout: Duration,
    ) -> Result<Connection, VhostUserError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(res) = self.try_connect(timeout) {
                return res;
            }
            if Instant::now() >= deadline {
                let path = self.path().display().to_string();
                return Err(match self {
                    Endpoint::Server { .. } => VhostUserError::NoBackend { path, waited: wait },
                    Endpoint::Client { path: p } => VhostUserError::Connect {
                        path,
                        source: UnixStream::connect(p).err().unwrap_or_else(|| {
                            std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
                        }),
                    },
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Endpoint::Server { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How the VMM configures a vhost-user net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserNetConfig {
    pub mac: [u8; 6],
    /// Features offered to the guest (decided by the VMM; VERSION_1 added).
    pub features: u64,
    pub mtu: u16,
    /// Maximum size of the receive and transmit rings.
    pub queue_size: u16,
    /// The interface version `interface=` pinned, if any.
    pub pin: Option<String>,
    /// Deadline of every reply.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    #[error("virtio-net queue size {0} is invalid: use a power of two from 2 to 32768")]
    QueueSize(u16),
    #[error("MAC address {0} is a multicast address: a NIC needs a unicast MAC (first byte even)")]
    MulticastMac(String),
    #[error("cannot create an eventfd for the vhost-user device: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start the vhost-user monitor thread: {0}")]
    Thread(std::io::Error),
}

/// The rings of an active device.
struct Rings {
    mem: GuestMemory,
    /// Receive and transmit ring as the driver configured them.
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    acked: u64,
    /// The backend is processing them.
    running: bool,
    /// Where the backend stopped (GET_VRING_BASE), for the next start.
    stopped_at: Option<Vec<u16>>,
}

/// The dirty log godwit gave the backend (migration).
struct DirtyLog {
    fd: OwnedFd,
    size: u64,
}

/// A snapshot of the backend's state for query-net.
#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub socket: String,
    pub mode: &'static str,
    pub connected: bool,
    pub rings_running: bool,
    pub offer: Option<BackendOffer>,
    pub interface: Option<InterfaceInUse>,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub logging: bool,
}

/// State shared with the monitor thread.
struct Inner {
    name: String,
    endpoint: Endpoint,
    pin: Option<String>,
    timeout: Duration,
    session: Option<Session>,
    rings: Option<Rings>,
    recheck: Rechecker,
    log: Option<DirtyLog>,
    blockers: Vec<String>,
    interface: Option<InterfaceInUse>,
    reconnects: u64,
    last_error: Option<String>,
    offered: Arc<AtomicU64>,
    shared: Arc<Shared>,
    mtu: u16,
    /// Management's link setting (the guest sees up only with a backend).
    admin_up: bool,
    /// Paused by `pause_datapath`.
    paused: bool,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_used_idx(mem: &GuestMemory, q: &Queue) -> Option<u16> {
    let at = GuestAddress(q.used_ring()).checked_add(2)?;
    mem.load::<u16>(at, Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

fn host_addr(mem: &GuestMemory, gpa: u64) -> Option<u64> {
    mem.get_host_address(GuestAddress(gpa))
        .ok()
        .map(|p| p as u64)
}

/// The regions of SET_MEM_TABLE: guest memory must be file-backed (memfd).
fn mem_regions(mem: &GuestMemory) -> Result<Vec<MemRegion>, String> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            return Err(format!(
                "guest memory at {:#x} is not backed by a file: a vhost-user backend can only map shared, fd-backed memory",
                r.start_addr().0
            ));
        };
        let user_addr = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| format!("guest memory region at {:#x}: {e}", r.start_addr().0))?
            as u64;
        out.push(MemRegion {
            guest_phys_addr: r.start_addr().0,
            size: r.len(),
            user_addr,
            mmap_offset: fo.start(),
            fd: fo.file().as_raw_fd(),
        });
    }
    Ok(out)
}

impl Inner {
    fn status_acked(&self) -> bool {
        self.rings
            .as_ref()
            .is_some_and(|r| r.acked & feature(VIRTIO_NET_F_STATUS) != 0)
    }

    fn config_interrupt(&self, why: &str) {
        if let Some(r) = &self.rings {
            if let Err(e) = r.interrupt.trigger(InterruptKind::Config) {
                tracing::warn!(backend = %self.name, "cannot raise the {why} interrupt: {e}");
            }
        }
    }

    /// Recomputes the link the guest sees: up with a backend serving the
    /// rings (or, before activation, with a backend connected).
    fn update_link(&self) {
        let up = self.admin_up
            && self.session.is_some()
            && match &self.rings {
                Some(r) => r.running || self.paused,
                None => true,
            };
        let bit = VIRTIO_NET_S_LINK_UP as u16;
        let old = if up {
            self.shared.status.fetch_or(bit, Ordering::SeqCst)
        } else {
            self.shared.status.fetch_and(!bit, Ordering::SeqCst)
        };
        if (old & bit != 0) != up {
            tracing::info!(backend = %self.name, up, "virtio-net (vhost-user) link changed");
            if self.status_acked() {
                self.config_interrupt("link change");
            }
        }
    }

    /// Drops the session (the backend is gone or misbehaved).
    fn lose_session(&mut self, why: &str) {
        if let Some(s) = self.session.take() {
            s.conn.shutdown();
            tracing::warn!(
                backend = %self.name,
                "vhost-user backend lost: {why}; the guest sees the link down until it comes back"
            );
            self.last_error = Some(why.to_string());
        }
        if let Some(r) = &mut self.rings {
            r.running = false;
        }
        self.update_link();
    }

    fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// The features set with SET_FEATURES for the driver's `acked`.
    fn backend_features(&self, offer: &BackendOffer, acked: u64) -> u64 {
        let mut f = acked & offer.features;
        if offer.features & F_PROTOCOL_FEATURES != 0 {
            f |= F_PROTOCOL_FEATURES;
        }
        if self.logging() && offer.features & F_LOG_ALL != 0 {
            f |= F_LOG_ALL;
        }
        f
    }

    fn vring_addr(&self, mem: &GuestMemory, q: &Queue) -> Result<VringAddr, String> {
        let hva = |gpa: u64, what: &str| {
            host_addr(mem, gpa)
                .ok_or_else(|| format!("the {what} at {gpa:#x} is not in guest memory"))
        };
        Ok(VringAddr {
            flags: if self.logging() { VRING_F_LOG } else { 0 },
            desc_user_addr: hva(q.desc_table(), "descriptor table")?,
            used_user_addr: hva(q.used_ring(), "used ring")?,
            avail_user_addr: hva(q.avail_ring(), "available ring")?,
            log_guest_addr: q.used_ring(),
        })
    }

    /// Configures and starts the backend's rings at `bases`.
    fn start_rings(&mut self, bases: &[u16]) -> Result<(), String> {
        let (Some(session), Some(rings)) = (self.session.as_ref(), self.rings.as_ref()) else {
            return Ok(());
        };
        let lacks = rings.acked & backend_bits() & !session.offer.features;
        if lacks != 0 {
            return Err(format!(
                "the driver uses {} but the backend does not offer them",
                features::names(lacks)
            ));
        }
        let features = self.backend_features(&session.offer, rings.acked);
        let regions = mem_regions(&rings.mem)?;
        let mut addrs = Vec::new();
        for q in &rings.queues {
            addrs.push(self.vring_addr(&rings.mem, q)?);
        }
        let irqfd = rings
            .interrupt
            .irqfd()
            .ok_or("the transport has no irqfd for the backend's call fd")?
            .as_raw_fd();
        let sizes: Vec<u16> = rings.queues.iter().map(|q| q.size()).collect();
        let kicks: Vec<i32> = rings.kicks.iter().map(|k| k.as_raw_fd()).collect();
        let mtu = (rings.acked & feature(VIRTIO_NET_F_MTU) != 0).then_some(self.mtu);
        let log = self.log.as_ref().map(|l| (l.size, l.fd.as_raw_fd()));
        let has_log_shmfd = session.offer.has_protocol(P::LOG_SHMFD.bits());
        let has_mtu = session.offer.has_protocol(P::MTU.bits());
        let enable = features & F_PROTOCOL_FEATURES != 0;
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let c = &mut session.conn;
        let run = |c: &mut Connection| -> Result<(), VhostUserError> {
            c.set_features(features)?;
            if let (Some(mtu), true) = (mtu, has_mtu) {
                c.net_set_mtu(mtu)?;
            }
            c.set_mem_table(&regions)?;
            if let (Some((size, fd)), true) = (log, has_log_shmfd) {
                c.set_log_base(size, 0, fd)?;
            }
            for i in 0..DATA_RINGS {
                let index = i as u32;
                c.set_vring_num(index, sizes[i])?;
                c.set_vring_base(index, bases[i])?;
                c.set_vring_addr(index, &addrs[i])?;
                c.set_vring_kick(index, kicks[i])?;
                c.set_vring_call(index, irqfd)?;
            }
            if enable {
                for i in 0..DATA_RINGS {
                    c.set_vring_enable(i as u32, true)?;
                }
            }
            Ok(())
        };
        run(c).map_err(|e| e.to_string())?;
        if let Some(r) = self.rings.as_mut() {
            r.running = true;
            r.stopped_at = None;
        }
        tracing::info!(
            backend = %self.name,
            features = %features::names(features & !(F_PROTOCOL_FEATURES | F_LOG_ALL)),
            ?bases,
            "vhost-user rings started"
        );
        Ok(())
    }

    /// Stops the backend's rings (GET_VRING_BASE) and returns where each
    /// stopped.
    fn stop_rings(&mut self) -> Result<Vec<u16>, VhostUserError> {
        let running = self.rings.as_ref().is_some_and(|r| r.running);
        if let Some(at) = self.rings.as_ref().and_then(|r| r.stopped_at.clone()) {
            return Ok(at);
        }
        let Some(session) = self.session.as_mut().filter(|_| running) else {
            return Ok(self.used_bases());
        };
        let mut bases = Vec::with_capacity(DATA_RINGS);
        for i in 0..DATA_RINGS {
            bases.push(session.conn.get_vring_base(i as u32)?);
        }
        if let Some(r) = self.rings.as_mut() {
            r.running = false;
            r.stopped_at = Some(bases.clone());
        }
        Ok(bases)
    }

    /// Ring positions from the used rings in guest memory: where a new
    /// backend restarts after the old one vanished (in-flight buffers are
    /// served again), as QEMU does.
    fn used_bases(&self) -> Vec<u16> {
        match &self.rings {
            Some(r) => r
                .queues
                .iter()
                .map(|q| read_used_idx(&r.mem, q).unwrap_or(q.next_avail()))
                .collect(),
            None => vec![0; DATA_RINGS],
        }
    }

    /// Called by the monitor: a new backend connected.
    fn adopt(&mut self, conn: Connection) {
        let session = match handshake(conn, self.pin.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                self.note_error(format!("the returning backend failed the handshake: {e}"));
                return;
            }
        };
        let offered = self.offered.load(Ordering::SeqCst);
        match (self.recheck)(&session.offer, offered) {
            Recheck::Accept => {}
            Recheck::Refuse(why) => {
                session.conn.shutdown();
                self.note_error(why);
                return;
            }
            Recheck::Degrade { offered, blocker } => {
                tracing::warn!(backend = %self.name, "{blocker}");
                self.offered.store(offered, Ordering::SeqCst);
                if !self.blockers.contains(&blocker) {
                    self.blockers.push(blocker);
                }
                let stale = self
                    .rings
                    .as_ref()
                    .filter(|r| r.acked & !offered != 0)
                    .map(|r| r.interrupt.clone());
                if let Some(interrupt) = stale {
                    // The driver uses what is gone: it must negotiate again.
                    self.session = Some(session);
                    self.reconnects += 1;
                    self.set_interface();
                    interrupt.signal_needs_reset();
                    return;
                }
            }
        }
        self.session = Some(session);
        self.reconnects += 1;
        self.set_interface();
        tracing::info!(backend = %self.name, "vhost-user backend connected again");
        if self.rings.is_some() && !self.paused {
            let bases = self.used_bases();
            if let Err(e) = self.start_rings(&bases) {
                self.lose_session(&format!("restarting the rings failed: {e}"));
                return;
            }
        }
        self.last_error = None;
        self.update_link();
    }

    fn note_error(&mut self, msg: String) {
        if self.last_error.as_deref() != Some(msg.as_str()) {
            tracing::error!(backend = %self.name, "{msg}");
        }
        self.last_error = Some(msg);
    }

    fn set_interface(&mut self) {
        let Some(s) = &self.session else { return };
        self.interface = match (&s.offer.record, &self.pin) {
            (Some(record), _) => Some(InterfaceInUse {
                name: record.active.clone(),
                pinned: record.pinned,
                how: "extension",
                record: Some(record.clone()),
            }),
            (None, Some(pin)) => Some(InterfaceInUse {
                name: pin.clone(),
                pinned: false,
                how: "checked",
                record: None,
            }),
            (None, None) => None,
        };
    }
}

/// A virtio-net device on a vhost-user backend.
pub struct VhostUserNet {
    name: String,
    offered: Arc<AtomicU64>,
    acked: u64,
    default_mac: [u8; 6],
    mtu: u16,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    inner: Arc<Mutex<Inner>>,
    ctrl: Option<CtrlThread>,
    gate: Arc<PauseGate>,
    monitor: Option<(EventFd, JoinHandle<()>)>,
    active: bool,
    config_write_logged: bool,
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
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() || qs > 32768 {
            return Err(VhostUserNetError::QueueSize(qs));
        }
        if config.mac[0] & 1 != 0 {
            return Err(VhostUserNetError::MulticastMac(
                crate::virtio::net::format_mac(&config.mac),
            ));
        }
        let offered = config.features | features::always_offered();
        let mut queue_sizes = vec![qs, qs];
        if offered & feature(VIRTIO_NET_F_CTRL_VQ) != 0 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        let name = format!("{}", endpoint.path().display());
        let shared = Arc::new(Shared {
            mac: Mutex::new(config.mac),
            status: AtomicU16::new(VIRTIO_NET_S_LINK_UP as u16),
            rx_filter: Mutex::new(RxFilter::default()),
            counters: Counters::default(),
            positions: Default::default(),
            guest_offloads: AtomicU64::new(0),
        });
        let offered_cell = Arc::new(AtomicU64::new(offered));
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
            offered: offered_cell.clone(),
            shared: shared.clone(),
            mtu: config.mtu,
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
            .spawn(move || monitor(monitor_inner, thread_stop))
            .map_err(VhostUserNetError::Thread)?;
        tracing::info!(
            backend = %name,
            mac = %crate::virtio::net::format_mac(&config.mac),
            features = %features::names(offered),
            "virtio-net (vhost-user) device created"
        );
        Ok(VhostUserNet {
            name,
            offered: offered_cell,
            acked: 0,
            default_mac: config.mac,
            mtu: config.mtu,
            queue_sizes,
            shared,
            inner,
            ctrl: None,
            gate: Arc::new(PauseGate::new().map_err(VhostUserNetError::EventFd)?),
            monitor: Some((stop, thread)),
            active: false,
            config_write_logged: false,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// The backend's socket.
    pub fn backend_name(&self) -> &str {
        &self.name
    }

    pub fn offered_features(&self) -> u64 {
        self.offered.load(Ordering::SeqCst)
    }

    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    pub fn link_up(&self) -> bool {
        self.shared.status.load(Ordering::SeqCst) & VIRTIO_NET_S_LINK_UP as u16 != 0
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

    /// Starts dirty logging (live migration): the backend marks every page
    /// it writes in `memfd` (one bit per 4 KiB page of guest memory, `size`
    /// bytes): SET_LOG_BASE, LOG_ALL in SET_FEATURES and VHOST_VRING_F_LOG
    /// in SET_VRING_ADDR on the running rings.
    pub fn set_dirty_log(&self, memfd: &File, size: u64) -> Result<(), VhostUserError> {
        let mut i = self.inner();
        let peer = i.name.clone();
        let fd = memfd
            .try_clone()
            .map(OwnedFd::from)
            .map_err(|e| VhostUserError::Protocol {
                peer: peer.clone(),
                detail: format!("cannot duplicate the dirty log fd: {e}"),
            })?;
        if let Some(s) = &i.session {
            s.offer
                .logging()
                .map_err(|lacks| VhostUserError::Protocol {
                    peer: peer.clone(),
                    detail: format!("cannot log dirty pages: the backend lacks {lacks}"),
                })?;
        }
        i.log = Some(DirtyLog { fd, size });
        let res = i.apply_log(true);
        if let Err(e) = &res {
            if e.breaks_connection() {
                i.lose_session(&e.to_string());
            }
        }
        res
    }

    /// Stops dirty logging (migration finished or cancelled).
    pub fn clear_dirty_log(&self) -> Result<(), VhostUserError> {
        let mut i = self.inner();
        i.log = None;
        let res = i.apply_log(false);
        if let Err(e) = &res {
            if e.breaks_connection() {
                i.lose_session(&e.to_string());
            }
        }
        res
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
        let mac = self.shared.mac();
        let mut i = self.inner();
        let Some(s) = i.session.as_mut() else {
            return Ok(false);
        };
        if !s.offer.has_protocol(P::RARP.bits()) {
            return Ok(false);
        }
        let res = s.conn.send_rarp(mac);
        match res {
            Ok(()) => Ok(true),
            Err(e) => {
                if e.breaks_connection() {
                    i.lose_session(&e.to_string());
                }
                Err(e)
            }
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.shared.mac());
        c[6..8].copy_from_slice(&self.shared.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Only the control queue's counters: the backend moves the packets.
    fn stats(&self) -> NetStats {
        crate::virtio::net::model::counters_snapshot(&self.shared.counters)
    }

    fn stop_ctrl(&mut self) -> Option<Queue> {
        self.ctrl.take().and_then(CtrlThread::stop)
    }
}

impl Inner {
    /// Applies the current dirty-log setting to a connected backend.
    fn apply_log(&mut self, on: bool) -> Result<(), VhostUserError> {
        let log = self.log.as_ref().map(|l| (l.size, l.fd.as_raw_fd()));
        let running = self.rings.as_ref().is_some_and(|r| r.running);
        let (features, addrs) = match (&self.session, &self.rings) {
            (Some(s), Some(r)) if running => {
                let f = self.backend_features(&s.offer, r.acked);
                let mut addrs = Vec::new();
                for q in &r.queues {
                    addrs.push(self.vring_addr(&r.mem, q).map_err(|detail| {
                        VhostUserError::Protocol {
                            peer: self.name.clone(),
                            detail,
                        }
                    })?);
                }
                (Some(f), addrs)
            }
            _ => (None, Vec::new()),
        };
        let Some(s) = self.session.as_mut() else {
            return Ok(());
        };
        if let (true, Some((size, fd))) = (on, log) {
            s.conn.set_log_base(size, 0, fd)?;
        }
        if let Some(f) = features {
            s.conn.set_features(f)?;
            for (i, a) in addrs.iter().enumerate() {
                s.conn.set_vring_addr(i as u32, a)?;
            }
        }
        Ok(())
    }
}

/// Watches the backend: while connected it sleeps until the socket hangs up
/// (its own duplicate of the socket, polled for POLLRDHUP only, so replies
/// read by other threads do not wake it: no cost while all is well); while
/// disconnected it tries to reconnect every [`MONITOR_PERIOD`].
fn monitor(inner: Arc<Mutex<Inner>>, stop: EventFd) {
    loop {
        let watched = lock(&inner)
            .session
            .as_ref()
            .and_then(|s| s.conn.try_clone_socket().ok());
        let mut pfds = [
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: watched.as_ref().map_or(-1, |w| w.as_raw_fd()),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let timeout = if watched.is_some() {
            -1
        } else {
            MONITOR_PERIOD.as_millis() as i32
        };
        // SAFETY: poll on two pollfds owned by this frame (a negative fd is
        // ignored by poll).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout) };
        if n > 0 && pfds[0].revents != 0 {
            return;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            std::thread::sleep(MONITOR_PERIOD);
        }
        drop(watched);
        let mut i = lock(&inner);
        match &i.session {
            Some(s) if s.conn.hung_up() => i.lose_session("the backend closed the connection"),
            Some(_) => {}
            None => {
                let timeout = i.timeout;
                match i.endpoint.try_connect(timeout) {
                    None => {}
                    Some(Err(e)) => i.note_error(e.to_string()),
                    Some(Ok(conn)) => i.adopt(conn),
                }
            }
        }
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.offered.load(Ordering::SeqCst)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered.load(Ordering::SeqCst);
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
                backend = %self.name,
                "the guest wrote {} bytes at offset {offset:#x} of the virtio-net configuration \
                 space, which is read-only; ignored (not logged again)",
                data.len()
            );
        }
    }

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        if self.active {
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
        let ctrl_acked = self.acked & feature(VIRTIO_NET_F_CTRL_VQ) != 0;
        for (index, (q, _)) in params.queues.iter().enumerate() {
            if (index != CTRL_QUEUE || ctrl_acked) && !q.ready() {
                return Err(ActivateError::QueueNotReady {
                    device: DEVICE_NAME,
                    index,
                    name: ["receiveq", "transmitq", "controlq"][index.min(2)],
                });
            }
        }
        if params.interrupt.irqfd().is_none() {
            return Err(ActivateError::Backend {
                device: DEVICE_NAME,
                reason: "the transport has no irqfd to give the backend as its call fd".into(),
            });
        }
        let ActivateParams {
            mem,
            interrupt,
            queues,
        } = params;
        let mut queues = queues.into_iter();
        let mut data_queues = Vec::new();
        let mut kicks = Vec::new();
        for _ in 0..DATA_RINGS {
            if let Some((q, evt)) = queues.next() {
                data_queues.push(q);
                kicks.push(evt);
            }
        }
        let bases: Vec<u16> = data_queues.iter().map(|q| q.next_avail()).collect();
        if let Some((q, evt)) = queues.next().filter(|_| ctrl_acked) {
            let job = CtrlJob {
                name: self.name.rsplit('/').next().unwrap_or("vhost").to_string(),
                mem: mem.clone(),
                queue: q,
                evt,
                shared: self.shared.clone(),
                acked: self.acked,
                interrupt: interrupt.clone(),
                gate: self.gate.clone(),
                // No vhost-user message carries a guest offload change.
                set_guest_offloads: Box::new(|_| false),
            };
            self.ctrl = Some(
                CtrlThread::start(job).map_err(|source| ActivateError::Thread {
                    device: DEVICE_NAME,
                    source,
                })?,
            );
        }
        self.shared
            .guest_offloads
            .store(self.acked & features::GUEST_OFFLOADS, Ordering::SeqCst);
        let mut i = self.inner();
        i.rings = Some(Rings {
            mem,
            queues: data_queues,
            kicks,
            interrupt,
            acked: self.acked,
            running: false,
            stopped_at: None,
        });
        if let Err(e) = i.start_rings(&bases) {
            // The guest keeps running with the link down; the monitor
            // restarts the rings when a backend is back.
            i.lose_session(&format!("starting the rings failed: {e}"));
        }
        i.update_link();
        drop(i);
        self.active = true;
        tracing::info!(
            backend = %self.name,
            acked = %features::names(self.acked),
            "virtio-net (vhost-user) activated"
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_ctrl();
        {
            let mut i = self.inner();
            if let Err(e) = i.stop_rings() {
                i.lose_session(&format!("stopping the rings failed: {e}"));
            }
            i.rings = None;
            i.paused = false;
            i.update_link();
        }
        self.active = false;
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
    }

    fn is_active(&self) -> bool {
        self.active
    }

    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        if !self.active {
            return None;
        }
        let i = self.inner();
        let r = i.rings.as_ref()?;
        let mut out = Vec::new();
        for (n, q) in r.queues.iter().enumerate() {
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
        if self.queue_sizes.len() > DATA_RINGS {
            let v = self.shared.positions[CTRL_QUEUE].load(Ordering::SeqCst);
            out.push(QueuePosition {
                next_avail: v as u16,
                next_used: (v >> 16) as u16,
            });
        }
        Some(out)
    }

    fn interrupt_bypasses_transport(&self) -> bool {
        true
    }
}

impl crate::virtio::net::NetModel for VhostUserNet {
    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn info(&self) -> NetInfo {
        let acked = self.acked;
        NetInfo {
            tap: self.name.clone(),
            vnet_hdr: false,
            mac: crate::virtio::net::format_mac(&self.shared.mac()),
            link_up: self.link_up(),
            active: self.active,
            offered_features: self.offered_features(),
            acked_features: acked,
            acked_feature_names: features::names(acked),
            tap_offloads: 0,
            tap_capabilities: TapOffloads::default(),
            rx_filter: self.shared.with_filter(|f| f.clone()),
            stats: self.stats(),
        }
    }

    fn mac(&self) -> [u8; 6] {
        self.shared.mac()
    }

    fn set_link(&mut self, up: bool) {
        let mut i = self.inner();
        i.admin_up = up;
        i.update_link();
    }

    fn announce(&mut self) -> bool {
        let need = feature(VIRTIO_NET_F_GUEST_ANNOUNCE) | feature(VIRTIO_NET_F_STATUS);
        let mut i = self.inner();
        if self.active && self.acked & need == need {
            self.shared
                .status
                .fetch_or(VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
            i.config_interrupt("announce");
            return true;
        }
        let mac = self.shared.mac();
        let Some(s) = i.session.as_mut() else {
            return false;
        };
        if !s.offer.has_protocol(P::RARP.bits()) {
            return false;
        }
        match s.conn.send_rarp(mac) {
            Ok(()) => true,
            Err(e) => {
                let broke = e.breaks_connection();
                tracing::warn!(backend = %self.name, "SEND_RARP failed: {e}");
                if broke {
                    i.lose_session(&e.to_string());
                }
                false
            }
        }
    }

    fn pause_datapath(&self) -> Result<(), PauseError> {
        self.gate.pause()?;
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
        self.gate.resume();
    }

    fn device_state(&self) -> VirtioNetState {
        VirtioNetState {
            mac: self.shared.mac(),
            status: self.shared.status.load(Ordering::SeqCst),
            mtu: self.mtu,
            offered: self.offered_features(),
            acked: self.acked,
            rx_filter: self.shared.with_filter(|f| f.clone()),
            guest_offloads: self.shared.guest_offloads.load(Ordering::SeqCst),
        }
    }

    fn restore_device_state(&mut self, state: &VirtioNetState) {
        self.shared.set_mac(state.mac);
        self.shared.status.store(state.status, Ordering::SeqCst);
        self.shared.with_filter(|f| *f = state.rx_filter.clone());
        self.shared
            .guest_offloads
            .store(state.guest_offloads, Ordering::SeqCst);
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

    fn as_vhost_user(&self) -> Option<&VhostUserNet> {
        Some(self)
    }
}

impl Drop for VhostUserNet {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.monitor.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
        self.stop_ctrl();
        let i = self.inner();
        if let Some(s) = &i.session {
            s.conn.shutdown();
        }
    }
}
