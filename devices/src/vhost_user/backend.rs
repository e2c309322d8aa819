//! godwit's own vhost-user net backend (`godwit net-backend`), built on the
//! `vhost-user-backend` crate: it forwards frames between a frontend's
//! receive/transmit rings and a TAP, with the virtio-net header (and so the
//! offloads) passed through: the TAP's offloads follow the features the
//! driver acked (`TUNSETOFFLOAD`, [`features::tun_offloads_for_guest`]).
//!
//! What it offers: the features of its interface version (pinned by the
//! frontend through godwit's extension, else its default), plus
//! VHOST_USER_F_PROTOCOL_FEATURES and LOG_ALL; protocol features MQ,
//! LOG_SHMFD, REPLY_ACK (the crate's), CONFIG (the extension's carrier) and
//! godwit's extension bit. Dirty logging: guest memory is mapped with the
//! crate's `BitmapMmapRegion`, so every write through it (frames and used
//! ring entries alike) marks the frontend's log once SET_LOG_BASE gave one.
//!
//! Not offered, because `vhost` 0.18's backend request handler has no case
//! for their messages (it would drop the connection): protocol RARP
//! (SEND_RARP) and MTU (NET_SET_MTU). The MTU a guest sees is the interface
//! version's, in godwit's configuration space; announcements after a
//! migration use GUEST_ANNOUNCE, which every interface version has.
//!
//! Standard frontends (QEMU's `-netdev vhost-user`, DPDK's virtio-user) see
//! a plain vhost-user backend: the extension's window answers only a
//! frontend that set bit 60 in SET_PROTOCOL_FEATURES, and the connection
//! runs through [`relay`](super::relay), which fixes what the crate's
//! request handler refuses of them (SET_VRING_ENABLE before SET_FEATURES).
//! CONFIG is offered because godwit's frontend needs it as the extension's
//! carrier; a frontend that does not serve the configuration space from the
//! backend leaves it unset (QEMU says so in a warning) and nothing changes.
//!
//! One frontend at a time: [`serve`] serves a connection until the frontend
//! disconnects, then waits for the next one (a restarted godwit, a
//! migration destination) with fresh session state on the same TAP.
//!
//! Multi-queue: with N queues of a multi-queue TAP the backend has N queue
//! pairs, rings 2p (receive) and 2p + 1 (transmit) served with TAP queue p,
//! all on the crate's one vring thread. GET_QUEUE_NUM answers N (the relay
//! turns the crate's ring count into pairs, as QEMU and DPDK count them). A
//! TAP queue is attached while the frontend has its pair's receive ring
//! enabled (SET_VRING_ENABLE, which QEMU and godwit send on VQ_PAIRS_SET),
//! so that the kernel steers no flow to a pair the driver does not use; the
//! first stays attached, so the TAP always has a queue.

use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use vhost::vhost_user::{Listener, VhostUserProtocolFeatures as P};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::conn::{F_LOG_ALL, F_PROTOCOL_FEATURES};
use super::interface::{
    by_interface_name, latest, served_versions, valid_name, version_list_for, InterfaceRecord,
    InterfaceVersion, INTERFACES, PROTOCOL_F_GODWIT_INTERFACE, WINDOW_OFFSET, WINDOW_SIZE,
};
use super::relay::{Negotiated, Relay};
use crate::net::tap::VNET_HDR_LEN;
use crate::net::Tap;
use crate::virtio::net::features;
use crate::virtio::{feature, Features};

type Mem = GuestMemoryMmap<BitmapMmapRegion>;
type AtomicMem = GuestMemoryAtomic<Mem>;
type Vring = VringRwLock<AtomicMem>;

/// Event id of TAP queue `pair` in the crate's epoll loop with `pairs`
/// pairs: ids up to the ring count are the crate's (the rings' kicks and
/// its exit event).
pub fn tap_event(pairs: usize, pair: usize) -> u16 {
    u16::try_from(2 * pairs + 1 + pair).unwrap_or(u16::MAX)
}
/// A 64 KiB GSO frame, a VLAN tag and the header, with room to spare.
const FRAME_MAX: usize = 68 * 1024;

/// What `godwit net-backend` serves.
pub struct BackendOptions {
    pub socket: PathBuf,
    /// The TAP's queues: one per queue pair served (several: a multi-queue
    /// TAP).
    pub taps: Vec<Arc<Tap>>,
    /// The version presented when the frontend does not pin one.
    pub default_interface: &'static InterfaceVersion,
    /// Connect to `socket` (the frontend listens: godwit `server=on`)
    /// instead of listening on it.
    pub client: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("interface {name} is not one this backend supports; it supports {} (latest {})", super::interface::names().join(", "), latest().name)]
    UnknownInterface { name: String },
    #[error("interface {name} has {needs} queue pairs, and this backend serves {queues}: start it with --queues {needs} (a multi-queue TAP), or use an interface of {queues} pair(s)")]
    TooFewQueues {
        name: &'static str,
        needs: u16,
        queues: usize,
    },
    /// vhost-user-backend's error implements only Display, so its text is
    /// kept.
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot register the TAP with the vring event loop: {0}")]
    Register(io::Error),
    /// The relay's connection to the crate's request handler, a socket in
    /// a private directory under the temporary directory.
    #[error("cannot connect the relay to the request handler through {path}: {source}; check that the temporary directory (TMPDIR) is writable")]
    Inner {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the vhost-user message relay: {0}")]
    Relay(#[source] io::Error),
}

/// Counters over the backend's life (all sessions).
#[derive(Debug, Default)]
pub struct BackendCounters {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub sessions: AtomicU64,
}

/// One queue pair's TAP queue and frame buffers.
struct Pair {
    tap: Arc<Tap>,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the TAP and not yet delivered.
    rx_pending: usize,
    tx_buf: Vec<u8>,
}

/// The state of one frontend's session.
pub struct NetBackend {
    pairs: Vec<Pair>,
    default: &'static InterfaceVersion,
    pinned: Option<&'static InterfaceVersion>,
    features_set: bool,
    acked: u64,
    event_idx: bool,
    mem: Option<AtomicMem>,
    counters: Arc<BackendCounters>,
    negotiated: Arc<Negotiated>,
    ring_limit_logged: bool,
    ring_error_logged: bool,
}

impl NetBackend {
    /// A session on `taps` (one queue each pair; at least one): every TAP
    /// queue but the first is detached until the frontend enables its pair.
    pub fn new(
        taps: Vec<Arc<Tap>>,
        default: &'static InterfaceVersion,
        counters: Arc<BackendCounters>,
        negotiated: Arc<Negotiated>,
    ) -> Self {
        for tap in taps.iter().skip(1) {
            if let Err(e) = tap.set_queue_enabled(false) {
                tracing::warn!("cannot detach a TAP queue until its pair is enabled: {e}");
            }
        }
        NetBackend {
            pairs: taps
                .into_iter()
                .map(|tap| Pair {
                    tap,
                    rx_buf: vec![0; FRAME_MAX],
                    rx_pending: 0,
                    tx_buf: vec![0; FRAME_MAX],
                })
                .collect(),
            default,
            pinned: None,
            features_set: false,
            acked: 0,
            event_idx: false,
            mem: None,
            counters,
            negotiated,
            ring_limit_logged: false,
            ring_error_logged: false,
        }
    }

    /// The interface presented now.
    pub fn interface(&self) -> &'static InterfaceVersion {
        self.pinned.unwrap_or(self.default)
    }

    fn record(&self) -> InterfaceRecord {
        let active = self.interface();
        let served = version_list_for(self.pairs.len());
        InterfaceRecord {
            active: active.name.to_string(),
            pinned: self.pinned.is_some(),
            latest: served.latest,
            supported: served.supported,
            truncated: false,
            values: active.values(),
        }
    }

    /// Whether this backend has the queue pairs of interface `i`.
    fn serves(&self, i: &InterfaceVersion) -> bool {
        usize::from(i.queue_pairs) <= self.pairs.len()
    }

    /// The frontend negotiated godwit's extension (bit 60): only then is
    /// the window there.
    fn extension(&self) -> bool {
        self.negotiated.protocol() & PROTOCOL_F_GODWIT_INTERFACE != 0
    }

    fn guest_csum(&self) -> bool {
        Features::from(self.acked) & feature(VIRTIO_NET_F_GUEST_CSUM) != 0
    }

    fn mergeable(&self) -> bool {
        Features::from(self.acked) & feature(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Rings larger than the interface allows are not served.
    fn ring_ok(&mut self, vring: &Vring) -> bool {
        let size = vring.get_ref().get_queue().size();
        let max = self.interface().max_ring_size;
        if size <= max {
            return true;
        }
        if !self.ring_limit_logged {
            self.ring_limit_logged = true;
            tracing::error!(
                "the frontend configured a ring of {size} entries; interface {} allows {max}: not serving it",
                self.interface().name
            );
        }
        false
    }

    fn signal(&self, vring: &Vring) -> io::Result<()> {
        let needed = if self.event_idx {
            vring.needs_notification().map_err(io::Error::other)?
        } else {
            true
        };
        if needed {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn process_tx(&mut self, pair: usize, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self.mem.as_ref().map(GuestAddressSpace::memory) else {
            return Ok(());
        };
        if !self.ring_ok(vring) {
            return Ok(());
        }
        let mut sent = 0;
        let mut empty_rounds = 0;
        let mut corrupt = false;
        loop {
            if self.event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let before = sent;
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let Pair { tap, tx_buf, .. } = &mut self.pairs[pair];
                match gather(chain, tx_buf) {
                    Some(len) if len > VNET_HDR_LEN => match tap.write(&tx_buf[..len]) {
                        Ok(_) => {
                            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    _ => {
                        self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                vring.add_used(head, 0).map_err(io::Error::other)?;
                sent += 1;
            }
            // A round without a chain after the ring reported more is the
            // driver adding buffers meanwhile; a second one in a row is a
            // ring that cannot be read (an available index running ahead of
            // the ring, a head outside it), which would spin here forever.
            empty_rounds = if sent == before { empty_rounds + 1 } else { 0 };
            if empty_rounds > 1 {
                corrupt = true;
                break;
            }
            if !self.event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        if sent > 0 {
            self.signal(vring)?;
        }
        if corrupt {
            return Err(io::Error::other(
                "the transmit ring reports buffers that cannot be read: its available index runs \
                 ahead of the ring or names a descriptor outside it",
            ));
        }
        Ok(())
    }

    /// Moves frames from the TAP into receive buffers until the TAP is
    /// empty or the guest has no buffers (the frame then waits, and the
    /// next receive kick resumes).
    fn process_rx(&mut self, pair: usize, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self.mem.as_ref().map(GuestAddressSpace::memory) else {
            return Ok(());
        };
        if !self.ring_ok(vring) {
            return Ok(());
        }
        let mut delivered = 0;
        let mut short = 0;
        loop {
            let Pair {
                tap,
                rx_buf,
                rx_pending,
                ..
            } = &mut self.pairs[pair];
            if *rx_pending == 0 {
                match tap.read(rx_buf) {
                    Ok(n) if n > VNET_HDR_LEN => *rx_pending = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("reading the TAP failed: {e}");
                        break;
                    }
                }
            }
            if self.deliver(pair, &mem, vring)? {
                delivered += 1;
                short = 0;
                continue;
            }
            // No room: wait for buffers (a kick), unless some arrived
            // meanwhile. Short twice in a row although the ring reports
            // buffers: too few for the frame, or a ring that cannot be read;
            // retrying would spin, and notifications are on for the kick.
            short += 1;
            if short < 2
                && self.event_idx
                && vring.enable_notification().map_err(io::Error::other)?
            {
                continue;
            }
            break;
        }
        if delivered > 0 {
            self.signal(vring)?;
        }
        Ok(())
    }

    /// Puts the pending frame into receive buffers; false when there are not
    /// enough.
    fn deliver(
        &mut self,
        pair: usize,
        mem: &GuestMemoryLoadGuard<Mem>,
        vring: &Vring,
    ) -> io::Result<bool> {
        let (guest_csum, mergeable) = (self.guest_csum(), self.mergeable());
        let Pair {
            rx_buf, rx_pending, ..
        } = &mut self.pairs[pair];
        let len = *rx_pending;
        if !guest_csum {
            // The TAP sets DATA_VALID whenever the host checked a checksum;
            // a driver without GUEST_CSUM must see flags 0.
            rx_buf[0] = 0;
        }
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let start = q.next_avail();
        let mut chains: Vec<(u16, Vec<(GuestAddress, usize)>)> = Vec::new();
        let mut cap = 0;
        let mut budget = MAX_FRAME_DESCRIPTORS;
        let mut overlong = false;
        while cap < len && (mergeable || chains.is_empty()) {
            let Some(chain) = q.pop_descriptor_chain(mem.clone()) else {
                q.set_next_avail(start);
                return Ok(false);
            };
            let head = chain.head_index();
            let Some(segs) = writable_segments(chain, &mut budget) else {
                chains.push((head, Vec::new()));
                overlong = true;
                break;
            };
            cap += segs.iter().map(|s| s.1).sum::<usize>();
            chains.push((head, segs));
        }
        if overlong || cap < len {
            // One buffer without MRG_RXBUF, and the frame does not fit it;
            // or buffers of more descriptors than a frame may take.
            *rx_pending = 0;
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            drop(state);
            for (head, _) in chains {
                vring.add_used(head, 0).map_err(io::Error::other)?;
            }
            return Ok(true);
        }
        // A frame takes at most one chain per ring entry, and rings hold at
        // most 32768: the counts below fit 16 bits.
        let count = ring_count(chains.len())?;
        rx_buf[10..12].copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        let mut used = Vec::with_capacity(chains.len());
        for (head, segs) in &chains {
            let mut written = 0;
            for (addr, seg_len) in segs {
                if offset >= len {
                    break;
                }
                let n = (*seg_len).min(len - offset);
                mem.write_slice(&rx_buf[offset..offset + n], *addr)
                    .map_err(io::Error::other)?;
                offset += n;
                written += n;
            }
            used.push((*head, u32::try_from(written).unwrap_or(u32::MAX)));
        }
        // All entries of a frame are published with one used-index update:
        // a driver that sees the first buffer of a MRG_RXBUF frame must see
        // all num_buffers of them.
        let size = q.size();
        let base = q.next_used();
        let (last, rest) = used.split_last().unwrap_or((&(0, 0), &[]));
        for (i, (head, written)) in rest.iter().enumerate() {
            let slot = base.wrapping_add(ring_count(i)?) % size;
            let addr = GuestAddress(q.used_ring())
                .checked_add(4 + 8 * u64::from(slot))
                .ok_or_else(|| io::Error::other("used ring address overflows"))?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(*head).to_le_bytes());
            elem[4..].copy_from_slice(&written.to_le_bytes());
            mem.write_slice(&elem, addr).map_err(io::Error::other)?;
        }
        q.set_next_used(base.wrapping_add(ring_count(rest.len())?));
        q.add_used(&**mem, last.0, last.1)
            .map_err(io::Error::other)?;
        *rx_pending = 0;
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

impl NetBackend {
    /// Attaches the TAP queue of each pair whose receive ring the frontend
    /// enabled and detaches the others (never the first). Checked on every
    /// event: a frontend enables a pair before the driver uses it, and the
    /// driver's first kick on it comes after.
    fn follow_enabled_pairs(&mut self, vrings: &[Vring]) {
        for (p, pair) in self.pairs.iter().enumerate().skip(1) {
            let Some(rx) = vrings.get(2 * p) else { break };
            let want = rx.get_ref().is_enabled();
            if pair.tap.queue_enabled() == want {
                continue;
            }
            match pair.tap.set_queue_enabled(want) {
                Ok(()) => tracing::info!(pair = p, attached = want, "TAP queue follows its pair"),
                Err(e) => tracing::warn!(pair = p, "cannot switch the TAP queue of a pair: {e}"),
            }
        }
    }
}

/// A number of ring entries as a ring index delta.
fn ring_count(n: usize) -> io::Result<u16> {
    u16::try_from(n)
        .map_err(|_| io::Error::other(format!("{n} buffers for one frame: more than a ring holds")))
}

/// Copies a transmit chain's readable buffers into `buf`; `None` when it is
/// malformed or larger than `buf`.
/// The most descriptors one frame may take, across all its chains: the
/// bound of godwit's own datapath (Linux's UIO_MAXIOV, which vhost-net
/// keeps too). A hostile driver's chains of tens of thousands of empty
/// descriptors would otherwise cost the backend seconds for each frame.
const MAX_FRAME_DESCRIPTORS: usize = crate::virtio::net::chain::MAX_SEGS;

/// Copies a transmit chain's readable descriptors into `buf`; None when
/// they do not fit, cannot be read, or number more than
/// [`MAX_FRAME_DESCRIPTORS`].
fn gather<M>(chain: DescriptorChain<M>, buf: &mut [u8]) -> Option<usize>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut len = 0;
    for (walked, d) in chain.clone().enumerate() {
        if walked >= MAX_FRAME_DESCRIPTORS {
            return None;
        }
        if d.is_write_only() {
            continue;
        }
        let n = d.len() as usize;
        if len + n > buf.len() {
            return None;
        }
        mem.read_slice(&mut buf[len..len + n], d.addr()).ok()?;
        len += n;
    }
    Some(len)
}

/// A receive chain's writable segments, each descriptor walked taken from
/// `budget` (what is left of [`MAX_FRAME_DESCRIPTORS`] for the frame);
/// None once the budget runs out.
fn writable_segments<M>(
    chain: DescriptorChain<M>,
    budget: &mut usize,
) -> Option<Vec<(GuestAddress, usize)>>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut segments = Vec::new();
    for d in chain {
        *budget = budget.checked_sub(1)?;
        if d.is_write_only() {
            segments.push((d.addr(), d.len() as usize));
        }
    }
    Some(segments)
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(
            INTERFACES
                .iter()
                .map(|i| i.max_ring_size)
                .max()
                .unwrap_or(256),
        )
    }

    fn features(&self) -> u64 {
        crate::virtio::low64(self.interface().feature_bits()) | F_PROTOCOL_FEATURES | F_LOG_ALL
    }

    fn acked_features(&mut self, features: u64) {
        tracing::info!(
            interface = self.interface().name,
            "the frontend acked features {features:#x} of {:#x} offered",
            self.features()
        );
        self.acked = features;
        self.features_set = true;
        let flags = features::tun_offloads_for_guest(Features::from(features));
        // The offloads are the TAP's, set through any queue; each queue's
        // handle keeps what it set.
        for pair in &self.pairs {
            if let Err(e) = pair.tap.set_offload(flags) {
                tracing::error!(
                    tap = pair.tap.name(),
                    "cannot set the TAP's offloads to {flags:#x} for the acked features: {e}"
                );
                break;
            }
        }
    }

    fn protocol_features(&self) -> P {
        P::from_bits_retain(
            P::MQ.bits()
                | P::LOG_SHMFD.bits()
                | P::REPLY_ACK.bits()
                | P::CONFIG.bits()
                | PROTOCOL_F_GODWIT_INTERFACE,
        )
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn update_memory(&mut self, mem: AtomicMem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if offset == WINDOW_OFFSET && size <= WINDOW_SIZE && self.extension() {
            return self.record().encode(size as usize);
        }
        // godwit's frontend keeps virtio-net's configuration space itself.
        Vec::new()
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset != WINDOW_OFFSET || !self.extension() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the configuration space is the frontend's",
            ));
        }
        let name = std::str::from_utf8(buf).unwrap_or("");
        if self.features_set {
            tracing::warn!("refusing to pin interface {name}: features were already set");
            return Err(io::Error::other("features already set"));
        }
        match by_interface_name(name).filter(|_| valid_name(name)) {
            Some(i) if !self.serves(i) => {
                tracing::warn!(
                    "the frontend asked for interface {} of {} queue pairs; this backend serves {}",
                    i.name,
                    i.queue_pairs,
                    self.pairs.len()
                );
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "too few queue pairs for the interface",
                ))
            }
            Some(i) => {
                tracing::info!("the frontend pinned interface {}", i.name);
                self.pinned = Some(i);
                Ok(())
            }
            None => {
                tracing::warn!(
                    "the frontend asked for interface {name:?}, which this backend does not support"
                );
                Err(io::Error::new(io::ErrorKind::NotFound, "unknown interface"))
            }
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let pairs = self.pairs.len();
        let first_tap = tap_event(pairs, 0);
        let (pair, receive) = if device_event >= first_tap {
            (usize::from(device_event - first_tap), true)
        } else {
            (
                usize::from(device_event / 2),
                device_event.is_multiple_of(2),
            )
        };
        let Some(tap_name) = self.pairs.get(pair).map(|p| p.tap.name().to_string()) else {
            return Ok(());
        };
        if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) && device_event >= first_tap {
            tracing::error!(tap = %tap_name, pair, "the TAP reports an error or hang-up");
            return Ok(());
        }
        self.follow_enabled_pairs(vrings);
        let (Some(rx), Some(tx)) = (vrings.get(2 * pair), vrings.get(2 * pair + 1)) else {
            return Ok(());
        };
        // Errors caused by the guest's rings (buffers outside memory, a
        // corrupt used ring) are logged; returning them would end the
        // crate's event loop and with it the session.
        let res = if receive {
            if rx.get_ref().get_queue().ready() && rx.get_ref().is_enabled() {
                self.process_rx(pair, rx)
            } else {
                tracing::debug!(
                    device_event,
                    "receive event while the ring is stopped: served after the next start"
                );
                Ok(())
            }
        } else {
            self.process_tx(pair, tx)
        };
        if let Err(e) = res {
            if !self.ring_error_logged {
                self.ring_error_logged = true;
                tracing::error!(
                    "serving the guest's rings failed: {e} (not logged again this session)"
                );
            }
        }
        Ok(())
    }
}

/// Serves frontends on `opts.socket` one after the other, until `stop` is
/// set. A frontend that disconnects leaves the TAP as it is; the next one
/// starts a fresh session.
pub fn serve(
    opts: &BackendOptions,
    counters: Arc<BackendCounters>,
    stop: Arc<AtomicBool>,
) -> Result<(), BackendError> {
    let listener = if opts.client {
        None
    } else {
        Some(
            Listener::new(&opts.socket, true).map_err(|source| BackendError::Listen {
                path: opts.socket.display().to_string(),
                source,
            })?,
        )
    };
    let tap = opts.taps.first().map_or("", |t| t.name());
    tracing::info!(
        socket = %opts.socket.display(),
        tap,
        queue_pairs = opts.taps.len(),
        interface = opts.default_interface.name,
        "vhost-user net backend ready"
    );
    while !stop.load(Ordering::SeqCst) {
        let frontend = match &listener {
            Some(l) => match l.accept() {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("accepting a frontend failed: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
            None => match connect_to_frontend(&opts.socket, &stop) {
                Some(s) => s,
                None => break,
            },
        };
        let negotiated = Arc::new(Negotiated::default());
        let backend = Arc::new(RwLock::new(NetBackend::new(
            opts.taps.clone(),
            opts.default_interface,
            counters.clone(),
            negotiated.clone(),
        )));
        let mut daemon = VhostUserDaemon::new(
            "gw-vu-backend".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| BackendError::Daemon(e.to_string()))?;
        for handler in daemon.get_epoll_handlers() {
            for (pair, tap) in opts.taps.iter().enumerate() {
                handler
                    .register_listener(
                        tap.as_raw_fd(),
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                        u64::from(tap_event(opts.taps.len(), pair)),
                    )
                    .map_err(BackendError::Register)?;
            }
        }
        let inner = attach(&mut daemon)?;
        let relay = Relay::spawn(frontend, inner, negotiated).map_err(BackendError::Relay)?;
        counters.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!("a frontend connected");
        match daemon.wait() {
            // The relay closes the handler's connection when the frontend
            // goes: that is the ordinary end of a session.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("the frontend disconnected; waiting for the next one"),
            Err(e) => tracing::warn!("the session ended: {e}; waiting for the next frontend"),
        }
        relay.finish();
        drop(daemon);
    }
    Ok(())
}

/// Starts the crate's request handler on a connection of its own and
/// returns the relay's end of it. The handler only takes connections from
/// a listener, so it gets one bound in a directory only this user can
/// enter, removed as soon as the relay's connection waits in its backlog.
fn attach(
    daemon: &mut VhostUserDaemon<Arc<RwLock<NetBackend>>>,
) -> Result<UnixStream, BackendError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "godwit-vu-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let path = dir.join("handler.sock");
    let err = |source| BackendError::Inner {
        path: path.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(err)?;
    let bound = UnixListener::bind(&path).and_then(|l| UnixStream::connect(&path).map(|s| (l, s)));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (listener, ours) = bound.map_err(err)?;
    daemon
        .start(&mut Listener::from(listener))
        .map_err(|e| BackendError::Daemon(e.to_string()))?;
    Ok(ours)
}

/// Client mode: connects to the frontend listening on `socket`, retrying
/// until it does; `None` when told to stop first.
fn connect_to_frontend(socket: &Path, stop: &AtomicBool) -> Option<UnixStream> {
    let mut logged = false;
    while !stop.load(Ordering::SeqCst) {
        match UnixStream::connect(socket) {
            Ok(s) => return Some(s),
            Err(e) => {
                if !logged {
                    logged = true;
                    tracing::info!(
                        "waiting for a frontend to listen on {}: {e}",
                        socket.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    None
}

/// The interface a backend of `queues` queue pairs presents by default:
/// `name`, or the latest of at most `queues` pairs.
pub fn default_interface(
    name: Option<&str>,
    queues: usize,
) -> Result<&'static InterfaceVersion, BackendError> {
    let fits = |i: &InterfaceVersion| usize::from(i.queue_pairs) <= queues;
    match name {
        None => Ok(served_versions(queues)
            .last()
            .copied()
            .unwrap_or(&INTERFACES[0])),
        Some(n) => {
            let i = by_interface_name(n).ok_or_else(|| BackendError::UnknownInterface {
                name: n.to_string(),
            })?;
            if fits(i) {
                Ok(i)
            } else {
                Err(BackendError::TooFewQueues {
                    name: i.name,
                    needs: i.queue_pairs,
                    queues,
                })
            }
        }
    }
}

#[cfg(test)]
mod frame_bounds {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// `n` descriptors of `len` bytes each (spread over one 4 KiB page).
    fn descriptors(n: usize, len: u32, flags: u16) -> Vec<RawDescriptor> {
        (0..n)
            .map(|i| {
                let addr = 0x20_0000 + (i as u64 % 16) * 0x100;
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
            })
            .collect()
    }

    /// Empty descriptors never fill a buffer, so nothing else stopped the
    /// walk: the fuzzer's `vhost_user_backend` found a frontend whose rings
    /// kept the backend 9-12 s on one input.
    #[test]
    fn chains_of_more_descriptors_than_a_frame_may_take_are_refused() {
        let mem = memory();
        let ring = MockSplitQueue::new(&mem, 2048);
        let over = MAX_FRAME_DESCRIPTORS + 1;
        let rx = ring.build_desc_chain(&descriptors(over, 0, WRITE)).unwrap();
        let mut budget = MAX_FRAME_DESCRIPTORS;
        assert_eq!(writable_segments(rx, &mut budget), None);
        let tx = ring.build_desc_chain(&descriptors(over, 0, 0)).unwrap();
        assert_eq!(gather(tx, &mut [0u8; 64]), None);
    }

    #[test]
    fn a_frame_takes_up_to_the_bound_across_its_chains() {
        let mem = memory();
        let ring = MockSplitQueue::new(&mem, 2048);
        let tx = ring
            .build_desc_chain(&descriptors(MAX_FRAME_DESCRIPTORS, 1, 0))
            .unwrap();
        assert_eq!(gather(tx, &mut [0u8; 2048]), Some(MAX_FRAME_DESCRIPTORS));
        // Receive: the bound is the frame's, shared by its chains.
        let half = MAX_FRAME_DESCRIPTORS / 2;
        let mut budget = MAX_FRAME_DESCRIPTORS;
        let first = ring.build_desc_chain(&descriptors(half, 1, WRITE)).unwrap();
        let segments = writable_segments(first, &mut budget).unwrap();
        assert_eq!(
            (segments.len(), budget),
            (half, MAX_FRAME_DESCRIPTORS - half)
        );
        let second = ring
            .build_desc_chain(&descriptors(half + 1, 1, WRITE))
            .unwrap();
        assert_eq!(writable_segments(second, &mut budget), None);
    }
}
