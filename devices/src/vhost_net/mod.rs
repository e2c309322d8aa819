//! virtio-net on kernel vhost-net: a TAP whose frames the kernel moves to
//! and from the guest's rings itself (`/dev/vhost-net`), so the datapath
//! never enters godwit. The device is the shared virtio-net frontend (which
//! keeps the configuration space and serves the control queue) plus this
//! datapath: godwit opens the vhost device (owner, features, memory table),
//! hands it the rings (size, base, addresses, kick = the transport's queue
//! eventfd, call = the transport's irqfd) and the TAP as backend, and sets
//! the TAP's offloads from what the driver acked. Every ioctl goes through
//! the `vhost` crate.
//!
//! Queue pairs: as QEMU's `-netdev tap,vhost=on,queues=N`, each pair has
//! its own `/dev/vhost-net` handle (a vhost-net device serves one receive
//! and one transmit ring, its rings 0 and 1) and its own queue of a
//! multi-queue TAP as backend. The kernel serves the rings of every pair
//! the driver made ready; VQ_PAIRS_SET attaches the TAP queues of the pairs
//! in use and detaches the others (`TUNSETQUEUE`), so the TAP steers no
//! frame to a pair the driver does not use.
//!
//! Which features need what (the feature table's vhost column): ring
//! features must be offered by `/dev/vhost-net` (VHOST_GET_FEATURES); packet
//! features (checksum, segmentation offloads) travel in the virtio-net
//! header the TAP carries, so the TAP's probed offloads decide them, as for
//! a plain TAP peer. Bits 64 and up (UDP tunnel GSO) reach the kernel only
//! through VHOST_GET/SET_FEATURES_ARRAY (Linux >= 6.17), which also sizes
//! the header it moves: the kernel must offer them there too, and the TAP
//! gets the 24-byte tunnel header.
//!
//! Migration: with LOG_ALL the kernel marks the pages it writes in a log
//! godwit maps (VHOST_SET_LOG_BASE, [`DirtyTracking`]); without it the
//! device refuses to log and registers a migration blocker naming itself.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::dirty_log::{take_pages, DirtyLogError, DirtyTracking, SharedDirtyLog};
use crate::net::Tap;
use crate::virtio::net::features::{self, VhostNeed, FEATURES};
use crate::virtio::net::frontend::{
    BackendRings, FrontendConfig, FrontendError, NetFrontend, PeerInfo, DATA_RINGS,
};
use crate::virtio::net::model::virtio_frontend_methods;
use crate::virtio::net::{set_tap_pairs, switch_tap_queues, NetModel, PeerStatus, PeerTap, Shared};
use crate::virtio::pause::PauseError;
use crate::virtio::{
    feature, low64, ActivateError, ActivateParams, Features, QueuePosition, VirtioDevice,
};
use crate::GuestMemory;

#[cfg(test)]
mod tests;

/// Where the kernel's vhost-net device lives.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";
/// VHOST_F_LOG_ALL.
const F_LOG_ALL: Features = 1 << 26;
/// VHOST_VRING_F_LOG.
const VRING_F_LOG: u32 = 1;
const DEVICE_NAME: &str = "virtio-net (vhost-net)";

/// The kernel's vhost-net handle as godwit opens it.
pub type KernelNet = Net<GuestMemoryAtomic<GuestMemory>>;

/// `VHOST_GET_FEATURES_ARRAY`: `_IOR(VHOST_VIRTIO, 0x83, __u64)` (Linux
/// include/uapi/linux/vhost.h, 6.17), on a `struct vhost_features_array {
/// __u64 count; __u64 features[]; }`.
const VHOST_GET_FEATURES_ARRAY: libc::c_ulong = 0x8008_af83;
/// `VHOST_SET_FEATURES_ARRAY`: `_IOW(VHOST_VIRTIO, 0x83, __u64)`.
const VHOST_SET_FEATURES_ARRAY: libc::c_ulong = 0x4008_af83;

/// Feature words past bit 63 on a vhost-net handle.
pub trait FeatureArray: VhostNet {
    /// VHOST_GET_FEATURES_ARRAY (two 64-bit words). `Ok(None)`: the kernel
    /// has no such ioctl (ENOTTY), so it offers nothing above bit 63.
    fn get_features_array(&self) -> std::io::Result<Option<Features>>;
    /// VHOST_SET_FEATURES_ARRAY (two 64-bit words).
    fn set_features_array(&self, features: Features) -> std::io::Result<()>;
}

impl FeatureArray for KernelNet {
    fn get_features_array(&self) -> std::io::Result<Option<Features>> {
        let mut arg = [2u64, 0, 0];
        // SAFETY: the kernel reads `count` (2) from the first word and writes
        // at most `count` words after it, all inside `arg`, which lives for
        // the call.
        let rc =
            unsafe { libc::ioctl(self.as_raw_fd(), VHOST_GET_FEATURES_ARRAY, arg.as_mut_ptr()) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTTY) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(
            Features::from(arg[1]) | (Features::from(arg[2]) << 64),
        ))
    }

    fn set_features_array(&self, features: Features) -> std::io::Result<()> {
        let arg = [2u64, low64(features), crate::virtio::high64(features)];
        // SAFETY: the kernel reads `count` (2) and then two words, all inside
        // `arg`, which lives for the call; it writes nothing.
        let rc = unsafe { libc::ioctl(self.as_raw_fd(), VHOST_SET_FEATURES_ARRAY, arg.as_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Every feature `/dev/vhost-net` offers: VHOST_GET_FEATURES, and the words
/// above bit 63 from VHOST_GET_FEATURES_ARRAY where the kernel has it.
pub fn kernel_features<K: FeatureArray>(net: &K) -> Result<Features, VhostNetError> {
    let low = net.get_features().map_err(ioctl("VHOST_GET_FEATURES"))?;
    let array = net
        .get_features_array()
        .map_err(|source| VhostNetError::FeaturesArray { source })?;
    Ok(Features::from(low) | array.map_or(0, |a| a & !Features::from(u64::MAX)))
}

/// Sets the features: VHOST_SET_FEATURES, or VHOST_SET_FEATURES_ARRAY when
/// there are bits above 63 (offered only by kernels that have it).
fn set_kernel_features<K: FeatureArray>(net: &K, features: Features) -> Result<(), VhostNetError> {
    if crate::virtio::high64(features) == 0 {
        net.set_features(low64(features))
            .map_err(ioctl("VHOST_SET_FEATURES"))
    } else {
        net.set_features_array(features)
            .map_err(|source| VhostNetError::FeaturesArray { source })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    #[error("the kernel reported ring {ring} stopped at index {base}, which does not fit a split ring's 16 bits: the vhost-net device is in a state godwit cannot save; reset the guest's NIC (or restart the VM)")]
    BadRingBase { ring: usize, base: u32 },
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
    #[error(
        "vhost-net was given no TAP queue to serve: open the TAP with one queue per queue pair"
    )]
    NoTapQueue,
    #[error("TAP {tap} was opened with {queues} queue(s) for {pairs} queue pairs: vhost-net serves each pair from its own queue of a multi-queue TAP; open one queue per pair (ip tuntap add {tap} mode tap multi_queue vnet_hdr), or use queues={queues}")]
    TooFewQueues {
        tap: String,
        queues: usize,
        pairs: u16,
    },
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("cannot duplicate the fd of TAP {tap} for vhost-net: {source}")]
    TapFd {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the transport has no irqfd to give vhost-net as its call fd")]
    NoIrqfd,
    #[error(
        "{VHOST_NET_PATH}: VHOST_GET/SET_FEATURES_ARRAY (feature bits above 63) failed: {source}"
    )]
    FeaturesArray {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size the TAP's virtio-net header for the acked features: {source}")]
    TapHeader {
        #[source]
        source: crate::net::TapError,
    },
    #[error("guest memory region at {addr:#x} has no host mapping: {source}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::guest_memory::Error,
    },
}

fn ioctl(what: &'static str) -> impl Fn(vhost::Error) -> VhostNetError {
    move |source| VhostNetError::Ioctl { what, source }
}

/// Bits `/dev/vhost-net` itself must offer (the table's ring features).
pub fn ring_bits() -> Features {
    FEATURES
        .iter()
        .filter(|f| f.vhost == VhostNeed::Ring)
        .fold(0, |acc, f| acc | feature(f.bit))
}

/// VHOST_GET_FEATURES of this host's `/dev/vhost-net`, without a VM (host
/// capability reports).
pub fn probe_features() -> Result<Features, VhostNetError> {
    let net = KernelNet::new(GuestMemoryAtomic::new(GuestMemory::default()))
        .map_err(|source| VhostNetError::Open { source })?;
    kernel_features(&net)
}

/// One queue pair's `/dev/vhost-net` handle and the TAP queue it moves
/// the pair's frames through.
pub struct VhostNetPair<K = KernelNet> {
    net: K,
    tap: Arc<Tap>,
}

/// The opened `/dev/vhost-net` handles, one per queue of the TAP (one per
/// queue pair), before they become a device.
pub struct VhostNetPeer<K = KernelNet> {
    pairs: Vec<VhostNetPair<K>>,
    features: Features,
}

impl VhostNetPeer {
    /// Opens `/dev/vhost-net` once per queue of `taps` (the queues of one
    /// TAP, one per queue pair) for `mem`: SET_OWNER and GET_FEATURES on
    /// each handle.
    pub fn open(taps: Vec<Tap>, mem: &GuestMemory) -> Result<Self, VhostNetError> {
        let first = taps.first().ok_or(VhostNetError::NoTapQueue)?;
        if !std::path::Path::new(VHOST_NET_PATH).exists() {
            return Err(VhostNetError::Missing {
                tap: first.name().to_string(),
            });
        }
        if let Some(tap) = taps.iter().find(|t| !t.has_vnet_hdr()) {
            return Err(VhostNetError::NoVnetHdr {
                tap: tap.name().to_string(),
            });
        }
        let mut pairs = Vec::with_capacity(taps.len());
        let mut features = None;
        for tap in taps {
            let net = KernelNet::new(GuestMemoryAtomic::new(mem.clone()))
                .map_err(|source| VhostNetError::Open { source })?;
            net.set_owner().map_err(ioctl("VHOST_SET_OWNER"))?;
            // Every handle is the same kernel's: they offer the same, and
            // the first one's stand for all.
            let offered = kernel_features(&net)?;
            match features {
                None => features = Some(offered),
                Some(first) if first != offered => tracing::warn!(
                    tap = tap.name(),
                    "{VHOST_NET_PATH} offered {offered:#x} on handle {} but {first:#x} on the first; using the first's",
                    pairs.len()
                ),
                Some(_) => {}
            }
            pairs.push(VhostNetPair {
                net,
                tap: Arc::new(tap),
            });
        }
        Ok(VhostNetPeer {
            pairs,
            features: features.unwrap_or_default(),
        })
    }
}

impl<K: FeatureArray> VhostNetPeer<K> {
    /// VHOST_GET_FEATURES.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The queue pairs it serves: one handle and TAP queue each.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
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

/// How the VMM configures a vhost-net device: only its guest-visible side
/// (the kernel serves what the TAP and `/dev/vhost-net` carry).
pub type VhostNetConfig = FrontendConfig;

fn tap_file(tap: &Tap) -> Result<File, VhostNetError> {
    // SAFETY: the TAP's fd is open for as long as `tap` lives, which
    // outlives this borrow; it is only duplicated here.
    let fd = unsafe { BorrowedFd::borrow_raw(tap.as_raw_fd()) };
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|source| VhostNetError::TapFd {
            tap: tap.name().to_string(),
            source,
        })
}

fn memory_regions(mem: &GuestMemory) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostNetError> {
    mem.iter()
        .map(|region| {
            let addr = region.start_addr().0;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|source| VhostNetError::Memory { addr, source })?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: addr,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
        })
        .collect()
}

struct Inner<K> {
    peer: VhostNetPeer<K>,
    shared: Arc<Shared>,
    rings: Option<BackendRings>,
    log: Option<SharedDirtyLog>,
}

impl<K: FeatureArray> Inner<K> {
    fn backend_features(&self, acked: Features) -> Features {
        // Ring features, and the bits above 63 the kernel offered: they
        // size the header it moves (the tunnel header).
        let mut f = acked & (ring_bits() | !Features::from(u64::MAX)) & self.peer.features;
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

    /// The pairs whose rings the kernel serves: those the driver made
    /// ready (with MQ it may leave later pairs unconfigured), each on its
    /// own handle.
    fn ready_pairs(&self) -> usize {
        self.rings.as_ref().map_or(0, |r| {
            usize::from(self.shared.ready_pairs())
                .min(r.queues.len() / DATA_RINGS)
                .min(self.peer.pairs.len())
        })
    }

    /// The handles of the ready pairs.
    fn ready(&self) -> impl Iterator<Item = &VhostNetPair<K>> {
        self.peer.pairs.iter().take(self.ready_pairs())
    }

    fn start(&mut self, acked: Features, bases: &[u16]) -> Result<(), VhostNetError> {
        let Some(r) = self.rings.as_ref() else {
            return Ok(());
        };
        // The TAP carries the header the kernel moves: the tunnel header
        // with a tunnel feature acked. The size is the TAP's, but every
        // queue's handle is told (each keeps what it set).
        for pair in &self.peer.pairs {
            pair.tap
                .set_vnet_hdr_len(features::hdr::len_for(acked))
                .map_err(|source| VhostNetError::TapHeader { source })?;
        }
        let regions = memory_regions(&r.mem)?;
        let irqfd = r.interrupt.irqfd().ok_or(VhostNetError::NoIrqfd)?;
        let pairs = self.ready_pairs();
        for p in 0..pairs {
            if let Err(e) = self.start_pair(r, p, acked, &regions, irqfd, bases) {
                // The kernel must not go on moving frames for a device that
                // did not start: withdraw the TAP queues from the rings
                // handed over so far (best effort: the start failed
                // already).
                for pair in self.peer.pairs.iter().take(p + 1) {
                    for j in 0..DATA_RINGS {
                        let _ = pair.net.set_backend(j, None);
                    }
                }
                return Err(e);
            }
        }
        if let Some(r) = self.rings.as_mut() {
            r.running = true;
            r.stopped_at = None;
            r.notify_after_start(DEVICE_NAME, DATA_RINGS * pairs);
        }
        Ok(())
    }

    /// Starts pair `p` on its handle: features, memory table, log, then
    /// its receive and transmit ring as the handle's rings 0 and 1 (the
    /// device's rings 2p and 2p + 1) with the pair's TAP queue as backend.
    fn start_pair(
        &self,
        r: &BackendRings,
        p: usize,
        acked: Features,
        regions: &[VhostUserMemoryRegionInfo],
        irqfd: &EventFd,
        bases: &[u16],
    ) -> Result<(), VhostNetError> {
        let pair = &self.peer.pairs[p];
        let net = &pair.net;
        set_kernel_features(net, self.backend_features(acked))?;
        net.set_mem_table(regions)
            .map_err(ioctl("VHOST_SET_MEM_TABLE"))?;
        if let Some(log) = &self.log {
            net.set_log_base(log.user_addr(), None)
                .map_err(ioctl("VHOST_SET_LOG_BASE"))?;
        }
        let tap = tap_file(&pair.tap)?;
        for j in 0..DATA_RINGS {
            let i = DATA_RINGS * p + j;
            let q = &r.queues[i];
            net.set_vring_num(j, q.size())
                .map_err(ioctl("VHOST_SET_VRING_NUM"))?;
            net.set_vring_base(j, bases.get(i).copied().unwrap_or(0))
                .map_err(ioctl("VHOST_SET_VRING_BASE"))?;
            net.set_vring_addr(j, &self.vring_config(q))
                .map_err(ioctl("VHOST_SET_VRING_ADDR"))?;
            net.set_vring_kick(j, &r.kicks[i])
                .map_err(ioctl("VHOST_SET_VRING_KICK"))?;
            net.set_vring_call(j, irqfd)
                .map_err(ioctl("VHOST_SET_VRING_CALL"))?;
            net.set_backend(j, Some(&tap))
                .map_err(ioctl("VHOST_NET_SET_BACKEND"))?;
        }
        Ok(())
    }

    /// Stops every started ring and returns where each stopped, in the
    /// device's ring order (pair 0's receive and transmit ring, pair 1's,
    /// ...).
    fn stop(&mut self) -> Result<Vec<u16>, VhostNetError> {
        let Some(r) = self.rings.as_ref() else {
            return Ok(vec![0; DATA_RINGS]);
        };
        if let Some(at) = &r.stopped_at {
            return Ok(at.clone());
        }
        let rings = DATA_RINGS * self.ready_pairs();
        if !r.running {
            return Ok(r
                .queues
                .iter()
                .take(rings)
                .map(|q| q.next_avail())
                .collect());
        }
        let mut bases = Vec::with_capacity(rings);
        for pair in self.ready() {
            for j in 0..DATA_RINGS {
                pair.net
                    .set_backend(j, None)
                    .map_err(ioctl("VHOST_NET_SET_BACKEND"))?;
                let b = pair
                    .net
                    .get_vring_base(j)
                    .map_err(ioctl("VHOST_GET_VRING_BASE"))?;
                let ring = bases.len();
                bases.push(
                    u16::try_from(b).map_err(|_| VhostNetError::BadRingBase { ring, base: b })?,
                );
            }
        }
        if let Some(r) = self.rings.as_mut() {
            r.running = false;
            r.stopped_at = Some(bases.clone());
        }
        Ok(bases)
    }

    /// Applies the current dirty-log setting to running rings: LOG_ALL in
    /// each handle's features, VHOST_VRING_F_LOG on each ring.
    fn apply_log(&mut self, acked: Features) -> Result<(), VhostNetError> {
        let Some(r) = self.rings.as_ref().filter(|r| r.running) else {
            return Ok(());
        };
        let features = self.backend_features(acked);
        for (pair, queues) in self.ready().zip(r.queues.chunks(DATA_RINGS)) {
            set_kernel_features(&pair.net, features)?;
            for (j, q) in queues.iter().enumerate() {
                pair.net
                    .set_vring_addr(j, &self.vring_config(q))
                    .map_err(ioctl("VHOST_SET_VRING_ADDR"))?;
            }
        }
        Ok(())
    }
}

/// Sets the offloads on every queue's handle of the TAP: the kernel keeps
/// one set per TAP, each handle remembers what it set.
fn set_offloads(taps: &[Arc<Tap>], acked: Features) -> Result<(), crate::net::TapError> {
    let flags = features::tun_offloads_for_guest(acked);
    taps.iter().try_for_each(|t| t.set_offload(flags))
}

/// A virtio-net device on kernel vhost-net.
pub struct VhostKernelNet<K: FeatureArray + Send = KernelNet> {
    front: NetFrontend,
    inner: Mutex<Inner<K>>,
    /// The TAP's queues, one per pair (the same as the pairs' in `inner`,
    /// for what needs no lock: the control queue's thread, query-net).
    taps: Vec<Arc<Tap>>,
}

impl<K: FeatureArray + Send> VhostKernelNet<K> {
    /// A device of `config.queue_pairs` pairs on the first as many of the
    /// peer's handles (it must have one per pair).
    pub fn new(mut peer: VhostNetPeer<K>, config: VhostNetConfig) -> Result<Self, VhostNetError> {
        let name = peer
            .pairs
            .first()
            .map(|p| p.tap.name().to_string())
            .ok_or(VhostNetError::NoTapQueue)?;
        if peer.pairs.len() < usize::from(config.queue_pairs) {
            return Err(VhostNetError::TooFewQueues {
                tap: name,
                queues: peer.pairs.len(),
                pairs: config.queue_pairs,
            });
        }
        let front = NetFrontend::new(name, DEVICE_NAME, &config)?;
        peer.pairs.truncate(usize::from(config.queue_pairs));
        Ok(VhostKernelNet {
            taps: peer.pairs.iter().map(|p| p.tap.clone()).collect(),
            inner: Mutex::new(Inner {
                peer,
                shared: front.shared().clone(),
                rings: None,
                log: None,
            }),
            front,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Names the device in errors and blockers.
    fn label(&self) -> String {
        format!("vhost-net on TAP {}", self.tap().name())
    }

    /// The TAP (its first queue).
    pub fn tap(&self) -> &Tap {
        &self.taps[0]
    }

    /// The TAP's queues, one per queue pair.
    pub fn tap_queues(&self) -> &[Arc<Tap>] {
        &self.taps
    }

    fn backend_error(&self, what: &'static str) -> impl Fn(VhostNetError) -> DirtyLogError + '_ {
        move |e| DirtyLogError::Backend {
            device: self.label(),
            what,
            source: Box::new(e),
        }
    }
}

impl<K: FeatureArray + Send> VirtioDevice for VhostKernelNet<K> {
    virtio_frontend_methods!(front);

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        self.front.check_activate(&params)?;
        let backend_err =
            |source: Box<dyn std::error::Error + Send + Sync>| ActivateError::Backend {
                device: DEVICE_NAME,
                source,
            };
        let acked = self.front.acked();
        set_offloads(&self.taps, acked).map_err(|e| backend_err(Box::new(e)))?;
        self.front.record_acked_offloads();
        // One pair after a reset; a restored device the pairs it had.
        let shared = self.front.shared().clone();
        switch_tap_queues(&self.taps, shared.active_pairs())
            .map_err(|e| backend_err(Box::new(e)))?;
        let (taps, pair_taps) = (self.taps.clone(), self.taps.clone());
        let rings = self.front.activate_backend(
            params,
            Box::new(move |offloads| set_offloads(&taps, offloads).is_ok()),
            // VQ_PAIRS_SET: the kernel serves every ready pair's rings
            // anyway; the TAP steers frames to the pairs in use only.
            Box::new(move |pairs| set_tap_pairs(&pair_taps, pairs, shared.active_pairs())),
        )?;
        let interrupt = rings.interrupt.clone();
        let bases = rings.bases();
        let mut i = self.inner();
        i.rings = Some(rings);
        if let Err(e) = i.start(acked, &bases) {
            i.rings = None;
            drop(i);
            self.front.stop_ctrl();
            return Err(backend_err(Box::new(e)));
        }
        drop(i);
        self.front.set_active(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.front.stop_ctrl();
        {
            let mut i = self.inner();
            if let Err(e) = i.stop() {
                tracing::error!(tap = self.tap().name(), "stopping vhost-net failed: {e}");
            }
            i.rings = None;
        }
        self.front.reset();
    }

    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.front.queue_positions(|| {
            let i = self.inner();
            let r = i.rings.as_ref()?;
            Some(
                r.queues
                    .iter()
                    .take(DATA_RINGS * i.ready_pairs())
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
                    .collect(),
            )
        })
    }

    fn interrupt_bypasses_transport(&self) -> bool {
        true
    }
}

impl<K: FeatureArray + Send> NetModel for VhostKernelNet<K> {
    fn frontend(&self) -> &NetFrontend {
        &self.front
    }

    /// Packet offloads are the TAP's; `/dev/vhost-net` probes nothing.
    fn peer_info(&self) -> PeerInfo {
        PeerInfo::of_tap(self.tap(), Default::default())
    }

    fn peer_status(&self) -> PeerStatus {
        let i = self.inner();
        PeerStatus::VhostNet {
            tap: self.tap().name().to_string(),
            vnet_hdr: self.tap().has_vnet_hdr(),
            kernel_features: i.peer.features,
            dirty_log: i.peer.logging(),
        }
    }

    fn tap(&self) -> PeerTap {
        PeerTap::of(&self.taps[0])
    }

    fn pause_datapath(&self) -> Result<(), PauseError> {
        self.front.gate().pause()?;
        if let Err(e) = self.inner().stop() {
            tracing::error!(tap = self.tap().name(), "pausing vhost-net failed: {e}");
        }
        Ok(())
    }

    fn resume_datapath(&self) {
        {
            let mut i = self.inner();
            if let Some(bases) = i.rings.as_ref().and_then(|r| r.stopped_at.clone()) {
                if let Err(e) = i.start(self.front.acked(), &bases) {
                    tracing::error!(tap = self.tap().name(), "resuming vhost-net failed: {e}");
                }
            }
        }
        self.front.gate().resume();
    }

    fn blockers(&self) -> Vec<String> {
        match self.inner().peer.logging() {
            Ok(()) => Vec::new(),
            Err(why) => vec![format!(
                "{}: {why}: the pages the kernel writes cannot be tracked, so the VM cannot be migrated",
                self.label()
            )],
        }
    }
}

/// The kernel marks the pages it writes in a log godwit maps: LOG_ALL in
/// the features, VHOST_SET_LOG_BASE with the mapping, VHOST_VRING_F_LOG
/// (used-ring writes) on each ring.
impl<K: FeatureArray + Send> DirtyTracking for VhostKernelNet<K> {
    fn start_dirty_log(&self, memory_end: u64) -> Result<(), DirtyLogError> {
        let mut i = self.inner();
        i.peer
            .logging()
            .map_err(|reason| DirtyLogError::Unsupported {
                device: self.label(),
                reason,
            })?;
        let log = SharedDirtyLog::new(&self.label(), memory_end)?;
        // Every handle writes the same log: each pair's rings mark the
        // pages they write.
        for pair in &i.peer.pairs {
            pair.net
                .set_log_base(log.user_addr(), None)
                .map_err(ioctl("VHOST_SET_LOG_BASE"))
                .map_err(self.backend_error("starting the kernel's dirty log"))?;
        }
        i.log = Some(log);
        i.apply_log(self.front.acked())
            .map_err(self.backend_error("starting the kernel's dirty log"))
    }

    fn dirty_log(&self, pages: &mut Vec<u64>) {
        take_pages(self.inner().log.as_ref(), pages);
    }

    fn stop_dirty_log(&self) -> Result<(), DirtyLogError> {
        let mut i = self.inner();
        if let Some(log) = i.log.take() {
            // LOG_ALL off first: the kernel writes the log until then.
            i.apply_log(self.front.acked())
                .map_err(self.backend_error("stopping the kernel's dirty log"))?;
            drop(log);
        }
        Ok(())
    }
}

impl<K: FeatureArray + Send> Drop for VhostKernelNet<K> {
    fn drop(&mut self) {
        self.front.stop_ctrl();
        let _ = self.inner().stop();
    }
}
