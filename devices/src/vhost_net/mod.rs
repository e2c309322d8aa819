//! virtio-net on kernel vhost-net: a TAP whose frames the kernel moves to
//! and from the guest's rings itself (`/dev/vhost-net`), so the datapath
//! never enters godwit. godwit opens the vhost device (owner, features,
//! memory table), hands it the rings (size, base, addresses, kick =
//! the transport's queue eventfd, call = the transport's irqfd) and the TAP
//! as backend, sets the TAP's offloads from what the driver acked, keeps the
//! configuration space, and serves the control queue.
//!
//! Which features need what (the feature table's vhost column): ring
//! features must be offered by `/dev/vhost-net` (VHOST_GET_FEATURES); packet
//! features (checksum, segmentation offloads) travel in the virtio-net
//! header the TAP carries, so the TAP's probed offloads decide them, as for
//! a plain TAP peer.
//!
//! Migration: with LOG_ALL the kernel marks the pages it writes in a log
//! godwit maps ([`VhostKernelNet::set_dirty_log`]); without it the device
//! registers a migration blocker.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::net::{Tap, TapOffloads};
use crate::virtio::net::ctrl::{CtrlJob, CtrlThread};
use crate::virtio::net::features::{self, VhostNeed, FEATURES};
use crate::virtio::net::{
    Counters, NetInfo, RxFilter, Shared, VirtioNetState, CONFIG_LEN, CTRL_QUEUE, CTRL_QUEUE_SIZE,
};
use crate::virtio::pause::{PauseError, PauseGate};
use crate::virtio::{
    feature, ActivateError, ActivateParams, InterruptKind, QueuePosition, VirtioDevice,
    VirtioInterrupt,
};
use crate::GuestMemory;

/// Where the kernel's vhost-net device lives.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";
/// VHOST_F_LOG_ALL.
const F_LOG_ALL: u64 = 1 << 26;
/// VHOST_VRING_F_LOG.
const VRING_F_LOG: u32 = 1;
const DEVICE_NAME: &str = "virtio-net (vhost-net)";
const DATA_RINGS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    #[error("{VHOST_NET_PATH} does not exist on this host (kernel without CONFIG_VHOST_NET, or the vhost_net module not loaded); use the userspace datapath instead: --net tap,ifname={tap}")]
    Missing { tap: String },
    #[error("cannot open {VHOST_NET_PATH}: {source}")]
    Open { source: vhost::Error },
    #[error("vhost-net {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("TAP {tap} carries no virtio-net header (vnet_hdr=off): vhost-net needs one; create it with vnet_hdr")]
    NoVnetHdr { tap: String },
    #[error("virtio-net queue size {0} is invalid: use a power of two from 2 to 32768")]
    QueueSize(u16),
    #[error("cannot create an eventfd for the vhost-net device: {0}")]
    EventFd(std::io::Error),
    #[error("guest memory region at {addr:#x}: {detail}")]
    Memory { addr: u64, detail: String },
    #[error("cannot map the dirty log: {0}")]
    Log(std::io::Error),
}

fn ioctl(what: &'static str) -> impl Fn(vhost::Error) -> VhostNetError {
    move |source| VhostNetError::Ioctl { what, source }
}

/// Bits `/dev/vhost-net` itself must offer (the table's ring features).
pub fn ring_bits() -> u64 {
    FEATURES
        .iter()
        .filter(|f| f.vhost == VhostNeed::Ring)
        .fold(0, |acc, f| acc | feature(f.bit))
}

/// An opened `/dev/vhost-net` with its TAP, before it becomes a device.
pub struct VhostNetPeer {
    net: Net<GuestMemoryAtomic<GuestMemory>>,
    tap: Arc<Tap>,
    features: u64,
}

impl VhostNetPeer {
    /// Opens `/dev/vhost-net` for `tap` and `mem`: SET_OWNER, GET_FEATURES.
    pub fn open(tap: Tap, mem: &GuestMemory) -> Result<Self, VhostNetError> {
        if !std::path::Path::new(VHOST_NET_PATH).exists() {
            return Err(VhostNetError::Missing {
                tap: tap.name().to_string(),
            });
        }
        if !tap.has_vnet_hdr() {
            return Err(VhostNetError::NoVnetHdr {
                tap: tap.name().to_string(),
            });
        }
        let net = Net::new(GuestMemoryAtomic::new(mem.clone()))
            .map_err(|source| VhostNetError::Open { source })?;
        net.set_owner().map_err(ioctl("VHOST_SET_OWNER"))?;
        let features = net.get_features().map_err(ioctl("VHOST_GET_FEATURES"))?;
        Ok(VhostNetPeer {
            net,
            tap: Arc::new(tap),
            features,
        })
    }

    /// VHOST_GET_FEATURES.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Whether the kernel can log its writes (LOG_ALL), else why not.
    pub fn logging(&self) -> Result<(), String> {
        if self.features & F_LOG_ALL != 0 {
            Ok(())
        } else {
            Err(format!(
                "{VHOST_NET_PATH} does not offer LOG_ALL (its features: {:#x})",
                self.features
            ))
        }
    }
}

/// A mapping of the dirty log memfd the kernel writes into.
struct LogMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only handed to the kernel and unmapped on drop; no
// Rust reference to its memory exists.
unsafe impl Send for LogMapping {}

impl Drop for LogMapping {
    fn drop(&mut self) {
        // SAFETY: addr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

struct Rings {
    mem: GuestMemory,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    running: bool,
    stopped_at: Option<Vec<u16>>,
}

struct Inner {
    peer: VhostNetPeer,
    rings: Option<Rings>,
    log: Option<LogMapping>,
}

/// A virtio-net device on kernel vhost-net.
pub struct VhostKernelNet {
    inner: Mutex<Inner>,
    tap: Arc<Tap>,
    offered: u64,
    acked: u64,
    default_mac: [u8; 6],
    mtu: u16,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    ctrl: Option<CtrlThread>,
    gate: Arc<PauseGate>,
    active: bool,
}

/// How the VMM configures a vhost-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostNetConfig {
    pub mac: [u8; 6],
    pub features: u64,
    pub mtu: u16,
    pub queue_size: u16,
}

fn tap_file(tap: &Tap) -> std::io::Result<File> {
    // SAFETY: the TAP's fd is open for as long as `tap` lives, which
    // outlives this borrow; it is only duplicated here.
    let fd = unsafe { BorrowedFd::borrow_raw(tap.as_raw_fd()) };
    Ok(File::from(fd.try_clone_to_owned()?))
}

impl Inner {
    fn backend_features(&self, acked: u64) -> u64 {
        let mut f = acked & ring_bits() & self.peer.features;
        if self.log.is_some() {
            f |= F_LOG_ALL;
        }
        f
    }

    fn vring_config(&self, q: &Queue) -> VringConfigData {
        VringConfigData {
            queue_max_size: q.max_size(),
            queue_size: q.size(),
            flags: if self.log.is_some() { VRING_F_LOG } else { 0 },
            desc_table_addr: q.desc_table(),
            used_ring_addr: q.used_ring(),
            avail_ring_addr: q.avail_ring(),
            log_addr: self.log.as_ref().map(|_| q.used_ring()),
        }
    }

    fn start(&mut self, acked: u64, bases: &[u16]) -> Result<(), VhostNetError> {
        let Some(r) = self.rings.as_ref() else {
            return Ok(());
        };
        let net = &self.peer.net;
        net.set_features(self.backend_features(acked))
            .map_err(ioctl("VHOST_SET_FEATURES"))?;
        let mut regions = Vec::new();
        for region in r.mem.iter() {
            let addr = region.start_addr().0;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VhostNetError::Memory {
                    addr,
                    detail: e.to_string(),
                })?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: addr,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            });
        }
        net.set_mem_table(&regions)
            .map_err(ioctl("VHOST_SET_MEM_TABLE"))?;
        if let Some(log) = &self.log {
            net.set_log_base(log.addr as u64, None)
                .map_err(ioctl("VHOST_SET_LOG_BASE"))?;
        }
        let irqfd = r.interrupt.irqfd().ok_or(VhostNetError::Ioctl {
            what: "VHOST_SET_VRING_CALL",
            source: vhost::Error::InvalidOperation,
        })?;
        let tap = tap_file(&self.peer.tap).map_err(VhostNetError::EventFd)?;
        for (i, q) in r.queues.iter().enumerate() {
            net.set_vring_num(i, q.size())
                .map_err(ioctl("VHOST_SET_VRING_NUM"))?;
            net.set_vring_base(i, bases.get(i).copied().unwrap_or(0))
                .map_err(ioctl("VHOST_SET_VRING_BASE"))?;
            net.set_vring_addr(i, &self.vring_config(q))
                .map_err(ioctl("VHOST_SET_VRING_ADDR"))?;
            net.set_vring_kick(i, &r.kicks[i])
                .map_err(ioctl("VHOST_SET_VRING_KICK"))?;
            net.set_vring_call(i, irqfd)
                .map_err(ioctl("VHOST_SET_VRING_CALL"))?;
            net.set_backend(i, Some(&tap))
                .map_err(ioctl("VHOST_NET_SET_BACKEND"))?;
        }
        if let Some(r) = self.rings.as_mut() {
            r.running = true;
            r.stopped_at = None;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<Vec<u16>, VhostNetError> {
        let Some(r) = self.rings.as_ref() else {
            return Ok(vec![0; DATA_RINGS]);
        };
        if let Some(at) = &r.stopped_at {
            return Ok(at.clone());
        }
        if !r.running {
            return Ok(r.queues.iter().map(|q| q.next_avail()).collect());
        }
        let mut bases = Vec::new();
        for i in 0..DATA_RINGS {
            self.peer
                .net
                .set_backend(i, None)
                .map_err(ioctl("VHOST_NET_SET_BACKEND"))?;
            let b = self
                .peer
                .net
                .get_vring_base(i)
                .map_err(ioctl("VHOST_GET_VRING_BASE"))?;
            bases.push(b as u16);
        }
        if let Some(r) = self.rings.as_mut() {
            r.running = false;
            r.stopped_at = Some(bases.clone());
        }
        Ok(bases)
    }
}

impl VhostKernelNet {
    pub fn new(peer: VhostNetPeer, config: VhostNetConfig) -> Result<Self, VhostNetError> {
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() || qs > 32768 {
            return Err(VhostNetError::QueueSize(qs));
        }
        let offered = config.features | features::always_offered();
        let mut queue_sizes = vec![qs, qs];
        if offered & feature(VIRTIO_NET_F_CTRL_VQ) != 0 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        let shared = Arc::new(Shared {
            mac: Mutex::new(config.mac),
            status: AtomicU16::new(VIRTIO_NET_S_LINK_UP as u16),
            rx_filter: Mutex::new(RxFilter::default()),
            counters: Counters::default(),
            positions: Default::default(),
            guest_offloads: AtomicU64::new(0),
        });
        Ok(VhostKernelNet {
            tap: peer.tap.clone(),
            inner: Mutex::new(Inner {
                peer,
                rings: None,
                log: None,
            }),
            offered,
            acked: 0,
            default_mac: config.mac,
            mtu: config.mtu,
            queue_sizes,
            shared,
            ctrl: None,
            gate: Arc::new(PauseGate::new().map_err(VhostNetError::EventFd)?),
            active: false,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// VHOST_GET_FEATURES of the kernel.
    pub fn kernel_features(&self) -> u64 {
        self.inner().peer.features
    }

    /// Whether the kernel can log its writes, else why not.
    pub fn logging_support(&self) -> Result<(), String> {
        self.inner().peer.logging()
    }

    /// Starts dirty logging into `memfd` (`size` bytes, one bit per 4 KiB
    /// page): maps it, VHOST_SET_LOG_BASE, LOG_ALL, VHOST_VRING_F_LOG.
    pub fn set_dirty_log(&self, memfd: &File, size: u64) -> Result<(), VhostNetError> {
        let mut i = self.inner();
        i.peer
            .logging()
            .map_err(|e| VhostNetError::Log(std::io::Error::other(e)))?;
        let len = usize::try_from(size)
            .map_err(|_| VhostNetError::Log(std::io::Error::other("log too large")))?;
        // SAFETY: a fresh shared mapping of `len` bytes of the memfd; the
        // result is checked, and only the kernel writes through it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(VhostNetError::Log(std::io::Error::last_os_error()));
        }
        i.log = Some(LogMapping { addr, len });
        i.peer
            .net
            .set_log_base(addr as u64, None)
            .map_err(ioctl("VHOST_SET_LOG_BASE"))?;
        i.apply_log(self.acked)
    }

    pub fn clear_dirty_log(&self) -> Result<(), VhostNetError> {
        let mut i = self.inner();
        i.log = None;
        i.apply_log(self.acked)
    }

    /// Stops the rings (VHOST_GET_VRING_BASE) and returns where they stopped.
    pub fn stop_rings(&self) -> Result<Vec<u16>, VhostNetError> {
        self.inner().stop()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.shared.mac());
        c[6..8].copy_from_slice(&self.shared.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn config_interrupt(&self) {
        if let Some(r) = &self.inner().rings {
            let _ = r.interrupt.trigger(InterruptKind::Config);
        }
    }
}

impl Inner {
    fn apply_log(&mut self, acked: u64) -> Result<(), VhostNetError> {
        let running = self.rings.as_ref().is_some_and(|r| r.running);
        if !running {
            return Ok(());
        }
        self.peer
            .net
            .set_features(self.backend_features(acked))
            .map_err(ioctl("VHOST_SET_FEATURES"))?;
        let configs: Vec<VringConfigData> = self
            .rings
            .as_ref()
            .map(|r| r.queues.iter().map(|q| self.vring_config(q)).collect())
            .unwrap_or_default();
        for (i, c) in configs.iter().enumerate() {
            self.peer
                .net
                .set_vring_addr(i, c)
                .map_err(ioctl("VHOST_SET_VRING_ADDR"))?;
        }
        Ok(())
    }
}

impl VirtioDevice for VhostKernelNet {
    fn device_type(&self) -> u32 {
        1
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

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

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
        let backend_err = |reason: String| ActivateError::Backend {
            device: DEVICE_NAME,
            reason,
        };
        self.tap
            .set_offload(features::tun_offloads_for_guest(self.acked))
            .map_err(|e| backend_err(e.to_string()))?;
        let ActivateParams {
            mem,
            interrupt,
            queues,
        } = params;
        let mut queues = queues.into_iter();
        let (mut data, mut kicks) = (Vec::new(), Vec::new());
        for _ in 0..DATA_RINGS {
            if let Some((q, e)) = queues.next() {
                data.push(q);
                kicks.push(e);
            }
        }
        let bases: Vec<u16> = data.iter().map(|q| q.next_avail()).collect();
        if let Some((q, evt)) = queues.next().filter(|_| ctrl_acked) {
            let tap = self.tap.clone();
            let job = CtrlJob {
                name: self.tap.name().to_string(),
                mem: mem.clone(),
                queue: q,
                evt,
                shared: self.shared.clone(),
                acked: self.acked,
                interrupt: interrupt.clone(),
                gate: self.gate.clone(),
                set_guest_offloads: Box::new(move |offloads| {
                    tap.set_offload(features::tun_offloads_for_guest(offloads))
                        .is_ok()
                }),
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
        let acked = self.acked;
        let mut i = self.inner();
        i.rings = Some(Rings {
            mem,
            queues: data,
            kicks,
            interrupt,
            running: false,
            stopped_at: None,
        });
        i.start(acked, &bases)
            .map_err(|e| backend_err(e.to_string()))?;
        drop(i);
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(c) = self.ctrl.take() {
            c.stop();
        }
        {
            let mut i = self.inner();
            if let Err(e) = i.stop() {
                tracing::error!(tap = self.tap.name(), "stopping vhost-net failed: {e}");
            }
            i.rings = None;
        }
        self.active = false;
        self.acked = 0;
        self.shared.set_mac(self.default_mac);
        self.shared
            .status
            .fetch_and(!(VIRTIO_NET_S_ANNOUNCE as u16), Ordering::SeqCst);
        self.shared.with_filter(|f| *f = RxFilter::default());
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
        let mut out: Vec<QueuePosition> = r
            .queues
            .iter()
            .enumerate()
            .map(|(n, q)| {
                let at = r
                    .stopped_at
                    .as_ref()
                    .and_then(|b| b.get(n).copied())
                    .unwrap_or(q.next_avail());
                QueuePosition {
                    next_avail: at,
                    next_used: at,
                }
            })
            .collect();
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

impl crate::virtio::net::NetModel for VhostKernelNet {
    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn tap(&self) -> crate::virtio::net::PeerTap {
        crate::virtio::net::PeerTap::of(&self.tap)
    }

    fn info(&self) -> NetInfo {
        NetInfo {
            tap: self.tap.name().to_string(),
            vnet_hdr: self.tap.has_vnet_hdr(),
            mac: crate::virtio::net::format_mac(&self.shared.mac()),
            link_up: self.shared.status.load(Ordering::SeqCst) & VIRTIO_NET_S_LINK_UP as u16 != 0,
            active: self.active,
            offered_features: self.offered,
            acked_features: self.acked,
            acked_feature_names: features::names(self.acked),
            tap_offloads: self.tap.offload(),
            tap_capabilities: TapOffloads::default(),
            rx_filter: self.shared.with_filter(|f| f.clone()),
            stats: crate::virtio::net::model::counters_snapshot(&self.shared.counters),
        }
    }

    fn mac(&self) -> [u8; 6] {
        self.shared.mac()
    }

    fn set_link(&mut self, up: bool) {
        let bit = VIRTIO_NET_S_LINK_UP as u16;
        let old = if up {
            self.shared.status.fetch_or(bit, Ordering::SeqCst)
        } else {
            self.shared.status.fetch_and(!bit, Ordering::SeqCst)
        };
        if (old & bit != 0) != up && self.acked & feature(VIRTIO_NET_F_STATUS) != 0 {
            self.config_interrupt();
        }
    }

    fn announce(&mut self) -> bool {
        let need = feature(VIRTIO_NET_F_GUEST_ANNOUNCE) | feature(VIRTIO_NET_F_STATUS);
        if !self.active || self.acked & need != need {
            return false;
        }
        self.shared
            .status
            .fetch_or(VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
        self.config_interrupt();
        true
    }

    fn pause_datapath(&self) -> Result<(), PauseError> {
        self.gate.pause()?;
        if let Err(e) = self.inner().stop() {
            tracing::error!(tap = self.tap.name(), "pausing vhost-net failed: {e}");
        }
        Ok(())
    }

    fn resume_datapath(&self) {
        {
            let mut i = self.inner();
            if let Some(bases) = i.rings.as_ref().and_then(|r| r.stopped_at.clone()) {
                if let Err(e) = i.start(self.acked, &bases) {
                    tracing::error!(tap = self.tap.name(), "resuming vhost-net failed: {e}");
                }
            }
        }
        self.gate.resume();
    }

    fn device_state(&self) -> VirtioNetState {
        VirtioNetState {
            mac: self.shared.mac(),
            status: self.shared.status.load(Ordering::SeqCst),
            mtu: self.mtu,
            offered: self.offered,
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
    }

    fn blockers(&self) -> Vec<String> {
        match self.inner().peer.logging() {
            Ok(()) => Vec::new(),
            Err(why) => vec![format!(
                "vhost-net on TAP {}: {why}: the pages the kernel writes cannot be tracked, so the VM cannot be migrated",
                self.tap.name()
            )],
        }
    }

    fn as_vhost_net(&self) -> Option<&VhostKernelNet> {
        Some(self)
    }
}

impl Drop for VhostKernelNet {
    fn drop(&mut self) {
        if let Some(c) = self.ctrl.take() {
            c.stop();
        }
        let _ = self.inner().stop();
    }
}
