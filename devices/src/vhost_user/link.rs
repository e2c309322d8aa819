//! The link between a vhost-user device and its backend: the session, the
//! rings the backend serves, the dirty log it writes, and the monitor thread
//! that notices a backend going away and adopts the next one.
//!
//! The monitor notices the hang-up, sets the link down (configuration
//! interrupt), and reconnects (client: connects again; server=on: accepts
//! the next backend). A new session is checked again by the VMM's rules
//! ([`Recheck`]): accepted, its rings are restarted where the guest's used
//! rings stand and the link comes up; refused (strict=on and the backend
//! lacks features), the link stays down; degraded (strict=off), the device
//! offers less from now on, gets a migration blocker, and asks the driver to
//! reset (DEVICE_NEEDS_RESET) so that it negotiates again.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vhost::vhost_user::VhostUserProtocolFeatures as P;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{
    Connection, MemRegion, VhostUserError, VringAddr, F_LOG_ALL, F_PROTOCOL_FEATURES, VRING_F_LOG,
};
use super::endpoint::Endpoint;
use super::session::{handshake, BackendOffer, InterfaceInUse, Session};
use crate::dirty_log::SharedDirtyLog;
use crate::virtio::net::features::{self, FEATURES};
use crate::virtio::net::frontend::{BackendRings, DATA_RINGS};
use crate::virtio::net::Shared;
use crate::virtio::{feature, InterruptKind};
use crate::virtio::{low64, AtomicFeatures, Features};
use crate::GuestMemory;

/// How often the monitor retries a lost backend.
const MONITOR_PERIOD: Duration = Duration::from_millis(100);

/// Bits a vhost-user backend must offer for the device to offer them.
pub fn backend_bits() -> Features {
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
    Degrade { offered: Features, blocker: String },
}

/// Checks a returning backend: given what it offers and what the device
/// offers now.
pub type Rechecker = Box<dyn FnMut(&BackendOffer, Features) -> Recheck + Send>;

/// Why the backend's rings could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RingsError {
    #[error("the driver uses {0} but the backend does not offer them")]
    Lacks(String),
    #[error("guest memory at {0:#x} is not backed by a file: a vhost-user backend can only map shared, fd-backed memory")]
    NotFileBacked(u64),
    #[error("guest memory region at {addr:#x} has no host mapping: {source}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::guest_memory::Error,
    },
    #[error("the {what} at {gpa:#x} is not in guest memory")]
    NotInMemory { what: &'static str, gpa: u64 },
    #[error("the transport has no irqfd for the backend's call fd")]
    NoIrqfd,
    #[error("godwit holds {got} ring positions for the {rings} rings the driver set up, so it cannot tell the backend where to start them (a godwit bug: please report it); the link stays down until the guest resets its NIC")]
    Bases { got: usize, rings: usize },
    #[error(transparent)]
    Protocol(#[from] VhostUserError),
}

/// State shared with the monitor thread.
pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) endpoint: Endpoint,
    pub(crate) pin: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) session: Option<Session>,
    pub(crate) rings: Option<BackendRings>,
    pub(crate) recheck: Rechecker,
    pub(crate) log: Option<SharedDirtyLog>,
    pub(crate) blockers: Vec<String>,
    pub(crate) interface: Option<InterfaceInUse>,
    pub(crate) reconnects: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) offered: Arc<AtomicFeatures>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) mtu: u16,
    /// Management's link setting (the guest sees up only with a backend).
    pub(crate) admin_up: bool,
    /// Paused by `pause_datapath`.
    pub(crate) paused: bool,
}

pub(crate) fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn read_used_idx(mem: &GuestMemory, q: &Queue) -> Option<u16> {
    let at = GuestAddress(q.used_ring()).checked_add(2)?;
    mem.load::<u16>(at, Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

fn host_addr(mem: &GuestMemory, gpa: u64, what: &'static str) -> Result<u64, RingsError> {
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|_| RingsError::NotInMemory { what, gpa })
}

/// The regions of SET_MEM_TABLE: guest memory must be file-backed (memfd).
fn mem_regions(mem: &GuestMemory) -> Result<Vec<MemRegion>, RingsError> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let addr = r.start_addr().0;
        let Some(fo) = r.file_offset() else {
            return Err(RingsError::NotFileBacked(addr));
        };
        let user_addr = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|source| RingsError::Memory { addr, source })? as u64;
        out.push(MemRegion {
            guest_phys_addr: addr,
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

    pub(crate) fn config_interrupt(&self, why: &str) {
        if let Some(r) = &self.rings {
            if let Err(e) = r.interrupt.trigger(InterruptKind::Config) {
                tracing::warn!(backend = %self.name, "cannot raise the {why} interrupt: {e}");
            }
        }
    }

    /// Recomputes the link the guest sees: up with a backend serving the
    /// rings (or, before activation, with a backend connected).
    pub(crate) fn update_link(&self) {
        let up = self.admin_up
            && self.session.is_some()
            && match &self.rings {
                Some(r) => r.running || self.paused,
                None => true,
            };
        if self.shared.set_link_bit(up) {
            tracing::info!(backend = %self.name, up, "virtio-net (vhost-user) link changed");
            if self.status_acked() {
                self.config_interrupt("link change");
            }
        }
    }

    /// Drops the session (the backend is gone or misbehaved).
    pub(crate) fn lose_session(&mut self, why: &str) {
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

    /// [`Self::check`] for the errors of ring set-up.
    pub(crate) fn check_rings<T>(&mut self, res: Result<T, RingsError>) -> Result<T, RingsError> {
        match res {
            Err(RingsError::Protocol(e)) => self.check(Err(e)).map_err(RingsError::Protocol),
            other => other,
        }
    }

    /// Loses the session when `res` failed in a way that breaks it.
    pub(crate) fn check<T>(&mut self, res: Result<T, VhostUserError>) -> Result<T, VhostUserError> {
        if let Err(e) = &res {
            if e.breaks_connection() {
                self.lose_session(&e.to_string());
            }
        }
        res
    }

    fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// The features set with SET_FEATURES for the driver's `acked`.
    fn backend_features(&self, offer: &BackendOffer, acked: Features) -> u64 {
        // SET_FEATURES is 64 bits wide; a backend never offers more, so
        // `lacks` in start_rings already refused acked bits above 63.
        let mut f = low64(acked) & offer.features;
        if offer.features & F_PROTOCOL_FEATURES != 0 {
            f |= F_PROTOCOL_FEATURES;
        }
        if self.logging() && offer.features & F_LOG_ALL != 0 {
            f |= F_LOG_ALL;
        }
        f
    }

    fn vring_addr(&self, mem: &GuestMemory, q: &Queue) -> Result<VringAddr, RingsError> {
        Ok(VringAddr {
            flags: if self.logging() { VRING_F_LOG } else { 0 },
            desc_user_addr: host_addr(mem, q.desc_table(), "descriptor table")?,
            used_user_addr: host_addr(mem, q.used_ring(), "used ring")?,
            avail_user_addr: host_addr(mem, q.avail_ring(), "available ring")?,
            log_guest_addr: q.used_ring(),
        })
    }

    fn vring_addrs(&self, rings: &BackendRings) -> Result<Vec<VringAddr>, RingsError> {
        rings
            .queues
            .iter()
            .take(self.data_rings())
            .map(|q| self.vring_addr(&rings.mem, q))
            .collect()
    }

    /// The data rings the backend serves: those of the pairs the driver
    /// made ready (with MQ it may leave later pairs unconfigured), two
    /// each.
    pub(crate) fn data_rings(&self) -> usize {
        self.rings.as_ref().map_or(0, |r| {
            (DATA_RINGS * usize::from(self.shared.ready_pairs())).min(r.queues.len())
        })
    }

    /// VQ_PAIRS_SET: the rings of the first `pairs` pairs enabled, the
    /// others disabled (SET_VRING_ENABLE, as QEMU does); the backend then
    /// serves, and steers its traffic to, only those. Without a backend, or
    /// with the rings stopped, the next start applies it.
    pub(crate) fn enable_pairs(&mut self, pairs: u16) -> bool {
        let count = self.data_rings();
        let running = self.rings.as_ref().is_some_and(|r| r.running);
        let Some(session) = self.session.as_mut().filter(|_| running) else {
            return true;
        };
        if session.offer.features & F_PROTOCOL_FEATURES == 0 {
            // Without it every ring runs from its start: one pair only.
            return pairs == 1;
        }
        let mut res = Ok(());
        for i in 0..count {
            let on = i / DATA_RINGS < usize::from(pairs);
            res = session.conn.set_vring_enable(ring_index(i), on);
            if res.is_err() {
                break;
            }
        }
        match self.check(res) {
            Ok(()) => {
                tracing::info!(backend = %self.name, pairs, "vhost-user queue pairs in use");
                true
            }
            Err(e) => {
                tracing::warn!(backend = %self.name, "cannot put {pairs} queue pair(s) in use: {e}");
                false
            }
        }
    }

    /// Configures and starts the backend's rings at `bases`.
    pub(crate) fn start_rings(&mut self, bases: &[u16]) -> Result<(), RingsError> {
        let (Some(session), Some(rings)) = (self.session.as_ref(), self.rings.as_ref()) else {
            return Ok(());
        };
        let lacks = rings.acked & backend_bits() & !Features::from(session.offer.features);
        if lacks != 0 {
            return Err(RingsError::Lacks(features::names(lacks)));
        }
        let features = self.backend_features(&session.offer, rings.acked);
        let regions = mem_regions(&rings.mem)?;
        let addrs = self.vring_addrs(rings)?;
        let irqfd = rings
            .interrupt
            .irqfd()
            .ok_or(RingsError::NoIrqfd)?
            .as_raw_fd();
        let count = self.data_rings();
        let active = DATA_RINGS * usize::from(self.shared.active_pairs());
        let sizes: Vec<u16> = rings.queues.iter().map(|q| q.size()).collect();
        let kicks: Vec<i32> = rings.kicks.iter().map(|k| k.as_raw_fd()).collect();
        if bases.len() < count {
            return Err(RingsError::Bases {
                got: bases.len(),
                rings: count,
            });
        }
        let mtu = (rings.acked & feature(VIRTIO_NET_F_MTU) != 0).then_some(self.mtu);
        let log = self.log.as_ref().map(|l| (l.size(), l.file().as_raw_fd()));
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
            for i in 0..count {
                let index = ring_index(i);
                c.set_vring_num(index, sizes[i])?;
                c.set_vring_base(index, bases[i])?;
                c.set_vring_addr(index, &addrs[i])?;
                c.set_vring_kick(index, kicks[i])?;
                c.set_vring_call(index, irqfd)?;
            }
            if enable {
                for i in 0..count {
                    c.set_vring_enable(ring_index(i), i < active)?;
                }
            }
            Ok(())
        };
        run(c)?;
        if let Some(r) = self.rings.as_mut() {
            r.running = true;
            r.stopped_at = None;
            r.notify_after_start(&self.name, count);
        }
        tracing::info!(
            backend = %self.name,
            features = %features::names((features & !(F_PROTOCOL_FEATURES | F_LOG_ALL)).into()),
            ?bases,
            "vhost-user rings started"
        );
        Ok(())
    }

    /// Stops the backend's rings (GET_VRING_BASE) and returns where each
    /// stopped.
    pub(crate) fn stop_rings(&mut self) -> Result<Vec<u16>, VhostUserError> {
        let running = self.rings.as_ref().is_some_and(|r| r.running);
        if let Some(at) = self.rings.as_ref().and_then(|r| r.stopped_at.clone()) {
            return Ok(at);
        }
        let count = self.data_rings();
        let Some(session) = self.session.as_mut().filter(|_| running) else {
            return Ok(self.used_bases());
        };
        let mut bases = Vec::with_capacity(count);
        for i in 0..count {
            bases.push(session.conn.get_vring_base(ring_index(i))?);
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
                .take(self.data_rings())
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
        let offered = self.offered.load();
        match (self.recheck)(&session.offer, offered) {
            Recheck::Accept => {}
            Recheck::Refuse(why) => {
                session.conn.shutdown();
                self.note_error(why);
                return;
            }
            Recheck::Degrade { offered, blocker } => {
                tracing::warn!(backend = %self.name, "{blocker}");
                self.offered.store(offered);
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

    pub(crate) fn set_interface(&mut self) {
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

    /// Applies the current dirty-log setting to a connected backend:
    /// SET_LOG_BASE (when starting), LOG_ALL in SET_FEATURES and
    /// VHOST_VRING_F_LOG in SET_VRING_ADDR on running rings.
    pub(crate) fn apply_log(&mut self) -> Result<(), RingsError> {
        let log = self.log.as_ref().map(|l| (l.size(), l.file().as_raw_fd()));
        let (features, addrs) = match (&self.session, &self.rings) {
            (Some(s), Some(r)) if r.running => {
                let f = self.backend_features(&s.offer, r.acked);
                (Some(f), self.vring_addrs(r)?)
            }
            _ => (None, Vec::new()),
        };
        let Some(s) = self.session.as_mut() else {
            return Ok(());
        };
        if let Some((size, fd)) = log {
            s.conn.set_log_base(size, 0, fd)?;
        }
        if let Some(f) = features {
            s.conn.set_features(f)?;
            for (i, a) in addrs.iter().enumerate() {
                s.conn.set_vring_addr(ring_index(i), a)?;
            }
        }
        Ok(())
    }
}

/// Watches the backend: while connected it sleeps until the socket hangs up
/// (its own duplicate of the socket, polled for POLLRDHUP only, so replies
/// read by other threads do not wake it: no cost while all is well); while
/// disconnected it tries to reconnect every [`MONITOR_PERIOD`].
pub(crate) fn monitor(inner: Arc<Mutex<Inner>>, stop: EventFd) {
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
            i32::try_from(MONITOR_PERIOD.as_millis()).unwrap_or(i32::MAX)
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

/// A data ring's index in a vhost-user message (rings are counted in the
/// device's few queues).
fn ring_index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}
