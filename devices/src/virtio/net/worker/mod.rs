//! The datapath of one queue pair of an active virtio-net device: a thread
//! running an epoll loop over the pair's queue notification eventfds, its
//! TAP queue's fd and a stop eventfd. The first pair's thread also serves
//! the control queue, and with it VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: it
//! attaches the TAP queues of the pairs turned on, detaches the others (the
//! kernel steers no frame to a detached queue) and tells their threads,
//! which poll their TAP queue only while their pair is in use.
//!
//! TX: available chains are drained in batches; each chain's readable
//! buffers are handed to the TAP with one `writev` straight from guest
//! memory (no copy). Used entries have length 0.
//!
//! RX: when the first available chain is large enough for any frame the TAP
//! can deliver, the TAP is read with `readv` straight into it. Otherwise the
//! frame is read into a bounce buffer and copied into as many chains as it
//! needs (MRG_RXBUF) or into the one chain. A frame that does not fit the
//! buffers the guest has posted stays in the bounce buffer, the TAP stops
//! being polled, and delivery resumes when the guest adds buffers (rx queue
//! notification): godwit never drops a frame for lack of buffers; the frames
//! behind it wait in the TAP's queue in the kernel.
//!
//! Bad guest input is contained per chain: a malformed chain is returned with
//! length 0 (and counted, and logged at a limited rate) and the next one is
//! served. A corrupt ring (an available index that jumps more than the queue
//! size, a head index outside the queue, rings outside guest memory) cannot
//! be served at all: the device sets DEVICE_NEEDS_RESET and the thread stops.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::virtio::pause::PauseGate;
use crate::virtio::Features;
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

mod rx;
mod tx;

#[cfg(test)]
pub(crate) use tx::check_tunnel_header;

use super::chain::{
    build_iovecs, mark_dirty, parse_chain, read_from_segs, seg_total, wants_interrupt,
    write_to_segs, Fatal, Seg, MAX_SEGS,
};
use super::ctrl::epoll_on;
use super::ctrl::CtrlPeer;
use super::features::{
    hdr, tun_offloads_for_guest, VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO,
    VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM,
};
use super::{Fault, Shared, CTRL_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::net::{Tap, TapError};
use crate::virtio::ratelimit::LogLimiter;
#[cfg(feature = "fuzzing")]
use crate::virtio::ActivateParams;
use crate::virtio::{feature, InterruptKind, VirtioInterrupt};
use crate::GuestMemory;

/// Largest frame (virtio-net header included) the TAP can hand us: a 64 KiB
/// GSO super-frame plus a VLAN tag and the header, with room to spare.
pub(crate) const RX_BUF_LEN: usize = 68 * 1024;
/// Largest frame (header included) accepted from the guest.
const TX_MAX_LEN: usize = RX_BUF_LEN;
/// Frames / chains handled before the loop looks at other events.
const RX_BUDGET: usize = 256;
const TX_BUDGET: usize = 256;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_CTRL: u64 = 3;
const TOKEN_TAP: u64 = 4;
const TOKEN_PAUSE: u64 = 5;
const TOKEN_PAIRS: u64 = 6;

/// Log limiter slots.
const LOG_RX: usize = 0; // + Fault
const LOG_TX: usize = Fault::COUNT; // + Fault
const LOG_CTRL: usize = 2 * Fault::COUNT;
const LOG_TAP_READ: usize = LOG_CTRL + 1;
const LOG_TAP_GONE: usize = LOG_CTRL + 2;
const LOG_IRQ: usize = LOG_CTRL + 3;
const LOG_SLOTS: usize = LOG_CTRL + 4;

fn ring_err(queue: &'static str, what: &'static str) -> impl Fn(virtio_queue::Error) -> Fatal {
    move |e| Fatal(format!("{queue} queue: {what}: {e}"))
}

/// A parsed receive chain: its head and its segments in the scratch vector.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    segs: (usize, usize),
    cap: usize,
}

/// A receive chain popped ahead and held for the next frames (MRG_RXBUF,
/// virtio-net header from the TAP): its iovecs are built once, and the TAP
/// is read straight into the held chains.
#[derive(Clone, Copy, Debug)]
struct HeldChain {
    head: u16,
    cap: usize,
    /// Its segments in `held_segs`, iovecs in `held_iov` and pointer
    /// guards in `held_guards` (counts; most iovecs need no guard).
    segs: usize,
    iovs: usize,
    guards: usize,
}

/// A popped receive chain: parsed, or rejected (head and why).
type PoppedRx = Result<RxChain, (u16, Fault)>;

enum Delivery {
    Done,
    /// Dropped (counted); go on with the next frame.
    Dropped,
    /// Not enough buffers; `seen` is the available index examined.
    NoRoom(u16),
}

enum ReadStep {
    Delivered,
    /// A frame is waiting in the bounce buffer.
    Pending,
    NoBuffers(u16),
    /// The TAP has nothing (or is gone).
    Empty,
}

/// The TAP queues of a device's pairs and the eventfds that tell each
/// pair's thread the pairs in use changed.
pub(crate) struct PairSwitch {
    pub(crate) taps: Vec<Arc<Tap>>,
    pub(crate) wake: Vec<EventFd>,
}

/// Attaches the TAP queues of the first `pairs` pairs and detaches the
/// others (a single-queue TAP has nothing to switch). Attaches first, so
/// that the TAP never has no queue.
pub(crate) fn switch_tap_queues(taps: &[Arc<Tap>], pairs: u16) -> Result<(), TapError> {
    let on = usize::from(pairs);
    for tap in taps.iter().take(on) {
        tap.set_queue_enabled(true)?;
    }
    for tap in taps.iter().skip(on) {
        tap.set_queue_enabled(false)?;
    }
    Ok(())
}

/// VQ_PAIRS_SET on the TAP: [`switch_tap_queues`] to `pairs`, or, when
/// that fails, back to the `previous` pairs' queues (the driver keeps
/// using those). Whether `pairs` are in use now.
pub(crate) fn set_tap_pairs(taps: &[Arc<Tap>], pairs: u16, previous: u16) -> bool {
    match switch_tap_queues(taps, pairs) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "virtio-net: cannot put {pairs} queue pair(s) in use: {e}; staying at {previous}"
            );
            if let Err(e) = switch_tap_queues(taps, previous) {
                tracing::error!("virtio-net: cannot return to {previous} queue pair(s): {e}");
            }
            false
        }
    }
}

impl PairSwitch {
    /// Puts `pairs` pairs in use: the TAP queues, the shared count, then
    /// every thread told.
    fn apply(&self, shared: &Shared, pairs: u16, previous: u16) -> bool {
        let done = set_tap_pairs(&self.taps, pairs, previous);
        if done {
            shared.active_pairs.store(pairs, Ordering::SeqCst);
        }
        for w in &self.wake {
            if let Err(e) = w.write(1) {
                tracing::error!(
                    "virtio-net: cannot tell a datapath thread of the queue pairs in use: {e}"
                );
            }
        }
        done
    }
}

/// The rings and fds one datapath thread serves.
pub(crate) struct WorkerJob {
    pub(crate) mem: GuestMemory,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    /// The queue pair: its rings are queues 2 * pair and 2 * pair + 1.
    pub(crate) pair: usize,
    pub(crate) rx: (Queue, EventFd),
    pub(crate) tx: (Queue, EventFd),
    /// The control queue (the first pair's thread, when CTRL_VQ was acked)
    /// and its index.
    pub(crate) ctrl: Option<(Queue, EventFd)>,
    pub(crate) ctrl_index: usize,
    /// This pair's TAP queue.
    pub(crate) tap: Arc<Tap>,
    pub(crate) acked: Features,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stop: EventFd,
    pub(crate) gate: Arc<PauseGate>,
    /// Written when the pairs in use change.
    pub(crate) pairs_changed: EventFd,
    /// With the control queue: what VQ_PAIRS_SET switches.
    pub(crate) switch: Option<PairSwitch>,
}

/// Queue `index` of a worker and its name for errors (`None`: a control
/// queue the driver did not negotiate).
fn queue_named<'a>(
    rx: &'a mut Queue,
    tx: &'a mut Queue,
    ctrl: &'a mut Option<(Queue, EventFd)>,
    index: usize,
) -> Option<(&'a mut Queue, &'static str)> {
    match index {
        RX_QUEUE => Some((rx, "receive")),
        TX_QUEUE => Some((tx, "transmit")),
        _ => ctrl.as_mut().map(|(q, _)| (q, "control")),
    }
}

pub(crate) struct Worker {
    mem: GuestMemory,
    tap: Arc<Tap>,
    vnet_hdr: bool,
    mrg_rxbuf: bool,
    /// The guest takes checksum flags (GUEST_CSUM acked and not switched
    /// off through the control queue). Without it the header's flags must
    /// be 0, but the TAP sets DATA_VALID whenever the host verified a
    /// checksum.
    guest_csum: bool,
    acked: Features,
    /// The virtio-net header in front of every frame, guest side and TAP
    /// side: 12 bytes, or 24 with UDP tunnel GSO negotiated.
    hdr_len: usize,
    /// HOST_UDP_TUNNEL_GSO(_CSUM) negotiated: the guest may send tunnel
    /// super-frames, whose headers are checked before the TAP sees them.
    host_tunnel: bool,
    host_tunnel_csum: bool,
    /// This thread's queue pair and whether it is in use.
    pair: usize,
    enabled: bool,
    ctrl_index: usize,
    pairs_changed: EventFd,
    switch: Option<PairSwitch>,
    rx: Queue,
    rx_evt: EventFd,
    tx: Queue,
    tx_evt: EventFd,
    ctrl: Option<(Queue, EventFd)>,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Registered in `epoll`; kept open for as long as the loop runs.
    _stop: EventFd,
    /// Parks this thread while the VM's state is captured.
    gate: Arc<PauseGate>,
    epoll: Epoll,
    shared: Arc<Shared>,
    tap_interest: EventSet,
    tap_gone: bool,
    rx_starved: bool,
    tx_blocked: bool,
    /// Used entries added per queue since the last interrupt decision.
    added: [usize; 3],
    /// Of those, receive entries written by add_used_rx_batch.
    rx_batched: usize,
    batch: Vec<(u16, u32)>,
    bounce: Vec<u8>,
    pending: usize,
    segs: Vec<Seg>,
    chains: Vec<RxChain>,
    bad: Vec<(u16, Fault)>,
    iov: Vec<libc::iovec>,
    guards: Vec<vm_memory::volatile_memory::PtrGuardMut>,
    /// Receive chains popped and not yet used, in available-ring order
    /// ending at the queue's next_avail (see `rx::read_held`).
    held: Vec<HeldChain>,
    held_segs: Vec<Seg>,
    held_iov: Vec<libc::iovec>,
    held_guards: Vec<vm_memory::volatile_memory::PtrGuardMut>,
    held_cap: usize,
    log: LogLimiter<LOG_SLOTS>,
}

// SAFETY: the raw pointers in `iov` and `guards` are scratch space that only
// holds values during one syscall on the worker thread; between calls they
// are cleared and never dereferenced. Everything else is Send.
unsafe impl Send for Worker {}

impl Worker {
    /// The datapath of a device of one queue pair (the fuzz targets').
    #[cfg(feature = "fuzzing")]
    pub(crate) fn new(
        params: ActivateParams,
        tap: Arc<Tap>,
        acked: Features,
        shared: Arc<Shared>,
        stop: EventFd,
        gate: Arc<PauseGate>,
    ) -> io::Result<Worker> {
        let ActivateParams {
            mem,
            interrupt,
            queues,
        } = params;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(io::Error::other(
                "virtio-net needs a receive and a transmit queue",
            ));
        };
        let ctrl = queues
            .next()
            .filter(|_| acked & feature(VIRTIO_NET_F_CTRL_VQ) != 0);
        Worker::start(WorkerJob {
            mem,
            interrupt,
            pair: 0,
            rx,
            tx,
            ctrl,
            ctrl_index: CTRL_QUEUE,
            switch: Some(PairSwitch {
                taps: vec![tap.clone()],
                wake: Vec::new(),
            }),
            tap,
            acked,
            shared,
            stop,
            gate,
            pairs_changed: vmm_sys_util::eventfd::EventFd::new(
                vmm_sys_util::eventfd::EFD_NONBLOCK,
            )?,
        })
    }

    /// The datapath of one queue pair.
    pub(crate) fn start(job: WorkerJob) -> io::Result<Worker> {
        let WorkerJob {
            mem,
            interrupt,
            pair,
            rx: (rx, rx_evt),
            tx: (tx, tx_evt),
            ctrl,
            ctrl_index,
            tap,
            acked,
            shared,
            stop,
            gate,
            pairs_changed,
            switch,
        } = job;
        use std::os::fd::AsRawFd;
        let mut fds = vec![
            (stop.as_raw_fd(), TOKEN_STOP),
            (gate.wake_fd().as_raw_fd(), TOKEN_PAUSE),
            (rx_evt.as_raw_fd(), TOKEN_RX),
            (tx_evt.as_raw_fd(), TOKEN_TX),
            (pairs_changed.as_raw_fd(), TOKEN_PAIRS),
        ];
        if let Some((_, evt)) = &ctrl {
            fds.push((evt.as_raw_fd(), TOKEN_CTRL));
        }
        let epoll = epoll_on(&fds)?;
        let enabled = pair < usize::from(shared.active_pairs());
        let w = Worker {
            vnet_hdr: tap.has_vnet_hdr(),
            mrg_rxbuf: acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: acked & feature(VIRTIO_NET_F_GUEST_CSUM) != 0,
            hdr_len: hdr::len_for(acked),
            host_tunnel: acked & feature(VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO) != 0,
            host_tunnel_csum: acked & feature(VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM) != 0,
            mem,
            tap,
            acked,
            pair,
            enabled,
            ctrl_index,
            pairs_changed,
            switch,
            rx,
            rx_evt,
            tx,
            tx_evt,
            ctrl,
            interrupt,
            _stop: stop,
            gate,
            epoll,
            shared,
            tap_interest: EventSet::empty(),
            tap_gone: false,
            rx_starved: false,
            tx_blocked: false,
            added: [0; 3],
            rx_batched: 0,
            batch: Vec::with_capacity(64),
            bounce: vec![0u8; RX_BUF_LEN],
            pending: 0,
            segs: Vec::with_capacity(64),
            chains: Vec::with_capacity(64),
            bad: Vec::new(),
            iov: Vec::with_capacity(64),
            guards: Vec::with_capacity(64),
            held: Vec::with_capacity(64),
            held_segs: Vec::with_capacity(64),
            held_iov: Vec::with_capacity(64),
            held_guards: Vec::with_capacity(64),
            held_cap: 0,
            log: LogLimiter::default(),
        };
        w.publish_positions();
        Ok(w)
    }

    pub(crate) fn run(mut self) {
        let gate = self.gate.clone();
        self.serve();
        gate.detach();
    }

    fn serve(&mut self) {
        tracing::debug!(tap = self.tap.name(), "virtio-net datapath started");
        self.update_tap_interest();
        // Notifications may have arrived before activation; the eventfds
        // would report them, but serving both queues once is cheap and also
        // covers buffers posted without a notification.
        let first = self.process_tx().and_then(|_| self.process_rx());
        if let Err(e) = first {
            self.fail(e);
            return;
        }
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(Fatal(format!("epoll_wait failed: {e}")));
                    return;
                }
            };
            for ev in &events[..n] {
                let res = match ev.data() {
                    TOKEN_STOP => {
                        self.release_held();
                        self.publish_positions();
                        tracing::debug!(tap = self.tap.name(), "virtio-net datapath stopped");
                        return;
                    }
                    TOKEN_RX => {
                        let _ = self.rx_evt.read();
                        self.rx_kick()
                    }
                    TOKEN_TX => {
                        let _ = self.tx_evt.read();
                        self.process_tx()
                    }
                    TOKEN_CTRL => {
                        if let Some((_, evt)) = &self.ctrl {
                            let _ = evt.read();
                        }
                        self.process_ctrl()
                    }
                    TOKEN_TAP => self.tap_event(ev.event_set()),
                    TOKEN_PAIRS => {
                        let _ = self.pairs_changed.read();
                        self.refresh_pairs()
                    }
                    TOKEN_PAUSE => {
                        // Rings and positions are consistent between events.
                        self.release_held();
                        self.publish_positions();
                        self.gate.park();
                        Ok(())
                    }
                    _ => Ok(()),
                };
                if let Err(e) = res {
                    self.fail(e);
                    return;
                }
            }
            self.publish_positions();
        }
    }

    /// Serves every queue once, as the loop does when all its events fire,
    /// on the calling thread: the fuzz targets drive the datapath this way,
    /// deterministically and without a thread.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn serve_once(&mut self) -> Result<(), Fatal> {
        self.process_tx()?;
        self.rx_kick()?;
        self.process_ctrl()?;
        self.publish_positions();
        Ok(())
    }

    fn fail(&mut self, e: Fatal) {
        self.release_held();
        self.publish_positions();
        tracing::error!(
            tap = self.tap.name(),
            "virtio-net stopped serving its queues: {}; the guest driver must reset the device \
             (DEVICE_NEEDS_RESET is set)",
            e.0
        );
        self.interrupt.signal_needs_reset();
    }

    /// The transport's index of this worker's queue `local` (RX_QUEUE,
    /// TX_QUEUE or CTRL_QUEUE).
    fn queue_index(&self, local: usize) -> usize {
        match local {
            RX_QUEUE | TX_QUEUE => 2 * self.pair + local,
            _ => self.ctrl_index,
        }
    }

    fn publish_positions(&self) {
        let held = u16::try_from(self.held.len()).unwrap_or(u16::MAX);
        self.shared
            .publish_position_holding(self.queue_index(RX_QUEUE), &self.rx, held);
        self.shared
            .publish_position(self.queue_index(TX_QUEUE), &self.tx);
        if let Some((q, _)) = &self.ctrl {
            self.shared.publish_position(self.ctrl_index, q);
        }
    }

    /// The pairs in use changed: a pair turned on polls its TAP queue and
    /// serves what waits; one turned off stops polling (its TAP queue is
    /// detached and gets no frames).
    fn refresh_pairs(&mut self) -> Result<(), Fatal> {
        let enabled = self.pair < usize::from(self.shared.active_pairs());
        if enabled == self.enabled {
            return Ok(());
        }
        self.enabled = enabled;
        tracing::debug!(
            tap = self.tap.name(),
            pair = self.pair,
            enabled,
            "virtio-net queue pair switched"
        );
        self.update_tap_interest();
        if enabled {
            self.process_tx()?;
            self.process_rx()?;
        }
        Ok(())
    }

    /// Counts a frame received into this pair's ring.
    fn count_rx(&self, bytes: usize) {
        self.shared.count_rx(self.pair, bytes);
    }

    /// Counts a frame sent from this pair's ring.
    fn count_tx(&self, bytes: usize) {
        self.shared.count_tx(self.pair, bytes);
    }

    fn log_limited(&mut self, slot: usize, msg: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.check(slot) {
            tracing::warn!(
                tap = self.tap.name(),
                suppressed,
                "virtio-net: {msg} (similar events are logged at most every {}s)",
                crate::virtio::ratelimit::LOG_INTERVAL.as_secs()
            );
        }
    }

    fn update_tap_interest(&mut self) {
        let mut want = EventSet::empty();
        if !self.tap_gone && self.enabled {
            if !self.rx_starved {
                want |= EventSet::IN;
            }
            if self.tx_blocked {
                want |= EventSet::OUT;
            }
        }
        if want == self.tap_interest {
            return;
        }
        let op = if self.tap_interest.is_empty() {
            ControlOperation::Add
        } else if want.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        match self
            .epoll
            .ctl(op, self.tap.raw_fd(), EpollEvent::new(want, TOKEN_TAP))
        {
            Ok(()) => self.tap_interest = want,
            Err(e) => tracing::error!(tap = self.tap.name(), "cannot change TAP polling: {e}"),
        }
    }

    fn tap_event(&mut self, ev: EventSet) -> Result<(), Fatal> {
        if !self.enabled {
            // A queue detached before this thread heard of it reports an error.
            self.update_tap_interest();
            return Ok(());
        }
        if ev.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            self.log_limited(
                LOG_TAP_GONE,
                format_args!("the TAP reports an error or hang-up (was the interface deleted?); no longer polling it"),
            );
            self.tap_gone = true;
            self.update_tap_interest();
            return Ok(());
        }
        if ev.contains(EventSet::OUT) && self.tx_blocked {
            self.tx_blocked = false;
            self.update_tap_interest();
            self.process_tx()?;
        }
        if ev.contains(EventSet::IN) {
            self.process_rx()?;
        }
        Ok(())
    }

    fn signal_used(&mut self, index: usize) -> Result<(), Fatal> {
        let added = std::mem::take(&mut self.added[index]);
        if added == 0 {
            return Ok(());
        }
        let mem = &self.mem;
        let Some((q, name)) = queue_named(&mut self.rx, &mut self.tx, &mut self.ctrl, index) else {
            return Ok(());
        };
        let crate_says = wants_interrupt(q, mem, name)?;
        // Entries written by add_used_rx_batch were not counted by
        // virtio-queue: decide over the whole range they published.
        let batched = index == RX_QUEUE && std::mem::take(&mut self.rx_batched) > 0;
        let notify = crate_says
            || (q.event_idx_enabled() && batched && {
                let at = GuestAddress(q.avail_ring())
                    .checked_add(4 + 2 * u64::from(q.size()))
                    .ok_or_else(|| Fatal(format!("{name} queue: used_event address overflows")))?;
                let event: u16 = mem
                    .load(at, Ordering::Acquire)
                    .map(u16::from_le)
                    .map_err(|e| Fatal(format!("{name} queue: reading used_event: {e}")))?;
                let new = q.next_used();
                let old = new.wrapping_sub(added as u16);
                // vring_need_event(event, new, old)
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
            });
        if notify {
            let vector = u16::try_from(self.queue_index(index)).unwrap_or(u16::MAX);
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(vector)) {
                self.log_limited(LOG_IRQ, format_args!("cannot interrupt the guest: {e}"));
            }
        }
        Ok(())
    }

    fn add_used(&mut self, index: usize, head: u16, len: u32) -> Result<(), Fatal> {
        let mem = &self.mem;
        let Some((q, name)) = queue_named(&mut self.rx, &mut self.tx, &mut self.ctrl, index) else {
            return Ok(());
        };
        q.add_used(mem, head, len)
            .map_err(|e| Fatal(format!("{name} queue: returning descriptor {head}: {e}")))?;
        self.added[index] += 1;
        Ok(())
    }

    /// Puts the used entries of one receive frame into the ring and
    /// publishes them with a single used-index update: a driver that sees
    /// the first buffer of a MRG_RXBUF frame must see all `num_buffers` of
    /// them (Linux drops the frame otherwise). virtio-queue publishes every
    /// `add_used`, so all but the last entry are written directly.
    fn add_used_rx_batch(&mut self, entries: &[(u16, u32)]) -> Result<(), Fatal> {
        let Some((&(last_head, last_len), rest)) = entries.split_last() else {
            return Ok(());
        };
        let size = self.rx.size();
        let base = self.rx.next_used();
        for (i, &(head, len)) in rest.iter().enumerate() {
            if head >= size {
                return Err(Fatal(format!(
                    "receive queue: descriptor head {head} is outside the queue of {size}"
                )));
            }
            let slot = base.wrapping_add(i as u16) % size;
            let addr = GuestAddress(self.rx.used_ring())
                .checked_add(4 + 8 * u64::from(slot))
                .ok_or_else(|| Fatal("receive queue: used ring address overflows".into()))?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            self.mem
                .write_slice(&elem, addr)
                .map_err(|e| Fatal(format!("receive queue: writing the used ring: {e}")))?;
        }
        self.rx.set_next_used(base.wrapping_add(rest.len() as u16));
        self.rx_batched += rest.len();
        self.added[RX_QUEUE] += rest.len();
        // Publishes the used index with release ordering, after the writes above.
        self.add_used(RX_QUEUE, last_head, last_len)
    }

    fn process_ctrl(&mut self) -> Result<(), Fatal> {
        let Some((q, _)) = &mut self.ctrl else {
            return Ok(());
        };
        let tap = &self.tap;
        let limiter = &mut self.log;
        let mut peer = TapCtrl {
            tap,
            shared: &self.shared,
            switch: self.switch.as_ref(),
            active: self.shared.active_pairs(),
            applied: None,
        };
        let mut log = |msg: std::fmt::Arguments<'_>| {
            if let Some(suppressed) = limiter.check(LOG_CTRL) {
                tracing::warn!(
                    tap = tap.name(),
                    suppressed,
                    "virtio-net: {msg} (similar events are logged at most every {}s)",
                    crate::virtio::ratelimit::LOG_INTERVAL.as_secs()
                );
            }
        };
        let added = super::ctrl::serve_ctrl_queue(
            q,
            &self.mem,
            &self.shared,
            self.acked,
            &mut self.segs,
            &mut peer,
            &mut log,
        )?;
        if let Some(offloads) = peer.applied {
            self.guest_csum = offloads & feature(VIRTIO_NET_F_GUEST_CSUM) != 0;
        }
        self.added[CTRL_QUEUE] += added;
        self.signal_used(CTRL_QUEUE)
    }
}

/// What the control queue changes on a TAP: its offloads, and the queues
/// of the pairs in use.
struct TapCtrl<'a> {
    tap: &'a Tap,
    shared: &'a Shared,
    switch: Option<&'a PairSwitch>,
    /// The pairs in use before the command.
    active: u16,
    applied: Option<Features>,
}

impl CtrlPeer for TapCtrl<'_> {
    fn set_guest_offloads(&mut self, offloads: Features) -> bool {
        match self.tap.set_offload(tun_offloads_for_guest(offloads)) {
            Ok(()) => {
                self.applied = Some(offloads);
                true
            }
            Err(e) => {
                tracing::warn!(tap = self.tap.name(), "guest offload change refused: {e}");
                false
            }
        }
    }

    fn set_queue_pairs(&mut self, pairs: u16) -> bool {
        let Some(switch) = self.switch else {
            return pairs == 1;
        };
        let previous = self.active;
        let done = switch.apply(self.shared, pairs, previous);
        if done {
            self.active = pairs;
            tracing::info!(
                tap = self.tap.name(),
                pairs,
                "virtio-net: queue pairs in use changed"
            );
        }
        done
    }
}
