//! The datapath of one active virtio-net device: a thread running an epoll
//! loop over the queue notification eventfds, the TAP fd and a stop eventfd.
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
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{
    build_iovecs, mark_dirty, parse_chain, seg_total, wants_interrupt, write_to_segs, Fatal, Seg,
};
use super::ctrl::epoll_on;
use super::features::tun_offloads_for_guest;
use super::{Fault, Shared, CTRL_QUEUE, NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use crate::net::Tap;
use crate::virtio::ratelimit::LogLimiter;
use crate::virtio::{feature, ActivateParams, InterruptKind, VirtioInterrupt};
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
    acked: u64,
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
    log: LogLimiter<LOG_SLOTS>,
}

// SAFETY: the raw pointers in `iov` and `guards` are scratch space that only
// holds values during one syscall on the worker thread; between calls they
// are cleared and never dereferenced. Everything else is Send.
unsafe impl Send for Worker {}

impl Worker {
    pub(crate) fn new(
        params: ActivateParams,
        tap: Arc<Tap>,
        acked: u64,
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
        let (Some((rx, rx_evt)), Some((tx, tx_evt))) = (queues.next(), queues.next()) else {
            return Err(io::Error::other(
                "virtio-net needs a receive and a transmit queue",
            ));
        };
        let ctrl = queues
            .next()
            .filter(|_| acked & feature(VIRTIO_NET_F_CTRL_VQ) != 0);
        use std::os::fd::AsRawFd;
        let mut fds = vec![
            (stop.as_raw_fd(), TOKEN_STOP),
            (gate.wake_fd().as_raw_fd(), TOKEN_PAUSE),
            (rx_evt.as_raw_fd(), TOKEN_RX),
            (tx_evt.as_raw_fd(), TOKEN_TX),
        ];
        if let Some((_, evt)) = &ctrl {
            fds.push((evt.as_raw_fd(), TOKEN_CTRL));
        }
        let epoll = epoll_on(&fds)?;
        let w = Worker {
            vnet_hdr: tap.has_vnet_hdr(),
            mrg_rxbuf: acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: acked & feature(VIRTIO_NET_F_GUEST_CSUM) != 0,
            mem,
            tap,
            acked,
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
                    TOKEN_PAUSE => {
                        // Rings and positions are consistent between events.
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

    fn fail(&mut self, e: Fatal) {
        self.publish_positions();
        tracing::error!(
            tap = self.tap.name(),
            "virtio-net stopped serving its queues: {}; the guest driver must reset the device \
             (DEVICE_NEEDS_RESET is set)",
            e.0
        );
        self.interrupt.signal_needs_reset();
    }

    fn publish_positions(&self) {
        self.shared.publish_position(RX_QUEUE, &self.rx);
        self.shared.publish_position(TX_QUEUE, &self.tx);
        if let Some((q, _)) = &self.ctrl {
            self.shared.publish_position(CTRL_QUEUE, q);
        }
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
        if !self.tap_gone {
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
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(index as u16)) {
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

    // ---------------------------------------------------------------- TX --

    fn process_tx(&mut self) -> Result<(), Fatal> {
        if self.tx_blocked {
            return Ok(());
        }
        let mut budget = TX_BUDGET;
        loop {
            self.tx
                .disable_notification(&self.mem)
                .map_err(ring_err("transmit", "disabling notifications"))?;
            while budget > 0 {
                let Some(chain) = self
                    .tx
                    .iter(&self.mem)
                    .map_err(ring_err("transmit", "reading the available ring"))?
                    .next()
                else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                self.segs.clear();
                let parsed = parse_chain(chain, &self.mem, &mut self.segs);
                if !self.transmit(head, parsed)? {
                    // The TAP is full: the chain was put back.
                    self.signal_used(TX_QUEUE)?;
                    return Ok(());
                }
            }
            self.signal_used(TX_QUEUE)?;
            if budget == 0 {
                // Let the other events run; come back through our own eventfd.
                if let Err(e) = self.tx_evt.write(1) {
                    tracing::error!(tap = self.tap.name(), "cannot reschedule transmission: {e}");
                }
                return Ok(());
            }
            if !self
                .tx
                .enable_notification(&self.mem)
                .map_err(ring_err("transmit", "enabling notifications"))?
            {
                return Ok(());
            }
        }
    }

    /// Sends the chain parsed into `self.segs`. Ok(false) when the TAP would block (chain put back).
    fn transmit(&mut self, head: u16, parsed: Result<(), Fault>) -> Result<bool, Fatal> {
        let mut fault = parsed.err();
        let total = seg_total(&self.segs);
        if fault.is_none() {
            fault = if self.segs.iter().any(|s| s.write) {
                Some(Fault::WrongDirection)
            } else if total < NET_HDR_LEN {
                Some(Fault::TooShort)
            } else if total > TX_MAX_LEN {
                Some(Fault::TooLarge)
            } else {
                None
            };
        }
        if let Some(f) = fault {
            self.tx_drop(
                head,
                f,
                format_args!("dropping a transmit chain (head {head}): {}", f.name()),
            )?;
            return Ok(true);
        }
        let skip = if self.vnet_hdr { 0 } else { NET_HDR_LEN };
        if !build_iovecs(&self.mem, &self.segs, skip, &mut self.iov, &mut self.guards) {
            self.tx_drop(
                head,
                Fault::TooLarge,
                format_args!("transmit chain (head {head}) has too many pieces"),
            )?;
            return Ok(true);
        }
        // SAFETY: the iovecs point into guest memory mapped by `self.mem`
        // (ranges checked by parse_chain and resolved by get_slices), which
        // stays mapped for the whole call; the kernel only reads them.
        let res = unsafe { self.tap.writev(&self.iov) };
        self.iov.clear();
        self.guards.clear();
        match res {
            Ok(_) => {
                self.shared.counters.tx(total - NET_HDR_LEN);
                self.add_used(TX_QUEUE, head, 0)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.tx.go_to_previous_position();
                self.tx_blocked = true;
                self.update_tap_interest();
                Ok(false)
            }
            Err(e) => {
                self.tx_drop(
                    head,
                    Fault::Peer,
                    format_args!(
                        "the TAP refused a frame of {} bytes: {e}",
                        total - NET_HDR_LEN
                    ),
                )?;
                Ok(true)
            }
        }
    }

    fn tx_drop(&mut self, head: u16, f: Fault, msg: std::fmt::Arguments<'_>) -> Result<(), Fatal> {
        self.shared.counters.tx_fault(f);
        self.log_limited(LOG_TX + f as usize, msg);
        self.add_used(TX_QUEUE, head, 0)
    }

    // ---------------------------------------------------------------- RX --

    fn rx_kick(&mut self) -> Result<(), Fatal> {
        if self.rx_starved {
            self.rx_starved = false;
            // Buffers arrive while we read the TAP: no kicks needed for now.
            self.rx
                .disable_notification(&self.mem)
                .map_err(ring_err("receive", "disabling notifications"))?;
            self.update_tap_interest();
        }
        self.process_rx()
    }

    /// Arms the receive notification for buffers beyond available index
    /// `seen` and stops polling the TAP. Ok(true) if buffers beyond `seen`
    /// arrived meanwhile (keep going instead).
    fn starve(&mut self, seen: u16) -> Result<bool, Fatal> {
        let next = self.rx.next_avail();
        self.rx.set_next_avail(seen);
        let more = self.rx.enable_notification(&self.mem);
        self.rx.set_next_avail(next);
        if more.map_err(ring_err("receive", "enabling notifications"))? {
            return Ok(true);
        }
        self.rx_starved = true;
        self.update_tap_interest();
        Ok(false)
    }

    fn process_rx(&mut self) -> Result<(), Fatal> {
        let mut frames = 0;
        while frames < RX_BUDGET {
            if self.pending > 0 {
                match self.deliver_pending()? {
                    Delivery::Done | Delivery::Dropped => frames += 1,
                    Delivery::NoRoom(seen) => {
                        if !self.starve(seen)? {
                            break;
                        }
                    }
                }
                continue;
            }
            if self.tap_gone || self.rx_starved {
                break;
            }
            match self.read_frame()? {
                ReadStep::Delivered => frames += 1,
                ReadStep::Pending => {}
                ReadStep::NoBuffers(seen) => {
                    if !self.starve(seen)? {
                        break;
                    }
                }
                ReadStep::Empty => break,
            }
        }
        self.signal_used(RX_QUEUE)
    }

    /// Pops the next chain and parses it as a receive buffer.
    /// Ok(None): no chain available. Ok(Some(Err)): a bad chain (popped).
    fn pop_rx_chain(&mut self) -> Result<Option<PoppedRx>, Fatal> {
        let Some(chain) = self
            .rx
            .iter(&self.mem)
            .map_err(ring_err("receive", "reading the available ring"))?
            .next()
        else {
            return Ok(None);
        };
        let head = chain.head_index();
        let start = self.segs.len();
        let res = parse_chain(chain, &self.mem, &mut self.segs).and_then(|()| {
            let segs = &self.segs[start..];
            if segs.iter().any(|s| !s.write) {
                Err(Fault::WrongDirection)
            } else if seg_total(segs) < NET_HDR_LEN {
                Err(Fault::TooShort)
            } else {
                Ok(())
            }
        });
        Ok(Some(match res {
            Ok(()) => Ok(RxChain {
                head,
                segs: (start, self.segs.len()),
                cap: seg_total(&self.segs[start..]),
            }),
            Err(f) => {
                self.segs.truncate(start);
                Err((head, f))
            }
        }))
    }

    fn return_bad_rx(&mut self, head: u16, f: Fault) -> Result<(), Fatal> {
        self.shared.counters.rx_fault(f);
        self.log_limited(
            LOG_RX + f as usize,
            format_args!(
                "returning a bad receive chain (head {head}) unused: {}",
                f.name()
            ),
        );
        self.add_used(RX_QUEUE, head, 0)
    }

    /// Reads the next frame from the TAP: straight into the first chain when
    /// it can hold any frame, else into the bounce buffer.
    fn read_frame(&mut self) -> Result<ReadStep, Fatal> {
        self.segs.clear();
        let first = loop {
            match self.pop_rx_chain()? {
                None => return Ok(ReadStep::NoBuffers(self.rx.next_avail())),
                Some(Err((head, f))) => self.return_bad_rx(head, f)?,
                Some(Ok(c)) => break c,
            }
        };
        let skip = if self.vnet_hdr { 0 } else { NET_HDR_LEN };
        if first.cap >= RX_BUF_LEN {
            return self.read_direct(first, skip);
        }
        // Put the chain back: the bounce path collects chains itself.
        self.rx.go_to_previous_position();
        let res = if self.vnet_hdr {
            self.tap.read(&mut self.bounce)
        } else {
            self.bounce[..NET_HDR_LEN].fill(0);
            self.tap.read(&mut self.bounce[NET_HDR_LEN..])
        };
        match res {
            Ok(n) if n + skip > self.bounce.len() => {
                self.rx_frame_lost(Fault::Peer, format_args!("the TAP delivered a frame of {n} bytes, larger than godwit's {RX_BUF_LEN}-byte buffer; it was truncated and dropped"));
                Ok(ReadStep::Delivered)
            }
            Ok(n) if n + skip <= NET_HDR_LEN => {
                self.rx_frame_lost(
                    Fault::Peer,
                    format_args!("the TAP delivered an empty frame"),
                );
                Ok(ReadStep::Delivered)
            }
            Ok(n) => {
                self.pending = n + skip;
                Ok(ReadStep::Pending)
            }
            Err(e) => self.tap_read_error(e),
        }
    }

    fn tap_read_error(&mut self, e: io::Error) -> Result<ReadStep, Fatal> {
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(ReadStep::Empty);
        }
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(ReadStep::Pending);
        }
        self.log_limited(LOG_TAP_READ, format_args!("reading the TAP failed: {e}"));
        if e.raw_os_error() == Some(libc::EBADFD) {
            self.tap_gone = true;
            self.update_tap_interest();
        }
        Ok(ReadStep::Empty)
    }

    fn rx_frame_lost(&mut self, f: Fault, msg: std::fmt::Arguments<'_>) {
        self.shared.counters.rx_fault(f);
        self.log_limited(LOG_RX + f as usize, msg);
    }

    fn read_direct(&mut self, chain: RxChain, skip: usize) -> Result<ReadStep, Fatal> {
        let segs = &self.segs[chain.segs.0..chain.segs.1];
        if !build_iovecs(&self.mem, segs, skip, &mut self.iov, &mut self.guards) {
            self.segs.truncate(chain.segs.0);
            self.return_bad_rx(chain.head, Fault::TooLarge)?;
            return Ok(ReadStep::Delivered);
        }
        // SAFETY: the iovecs point into guest memory mapped by `self.mem`
        // (ranges checked by parse_chain, resolved by get_slices) that stays
        // mapped for the call; the chain is device-writable, so the guest
        // expects the device to write there.
        let res = unsafe { self.tap.readv(&self.iov) };
        self.iov.clear();
        self.guards.clear();
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                self.rx.go_to_previous_position();
                return self.tap_read_error(e);
            }
        };
        let segs = &self.segs[chain.segs.0..chain.segs.1];
        let written = n.min(chain.cap - skip);
        mark_dirty(&self.mem, segs, skip, written);
        if n + skip > chain.cap || n + skip <= NET_HDR_LEN {
            // Truncated (the TAP reports the full length) or empty.
            self.rx_frame_lost(
                Fault::Peer,
                format_args!(
                    "the TAP delivered a frame of {n} bytes that does not fit a {}-byte buffer",
                    chain.cap
                ),
            );
            self.add_used(RX_QUEUE, chain.head, 0)?;
            return Ok(ReadStep::Delivered);
        }
        if self.vnet_hdr {
            // The TAP wrote the header and zeroed num_buffers.
            if !self.guest_csum {
                write_to_segs(&self.mem, segs, 0, &[0]);
            }
            write_to_segs(&self.mem, segs, 10, &1u16.to_le_bytes());
        } else {
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            write_to_segs(&self.mem, segs, 0, &hdr);
        }
        let len = n + skip;
        self.shared.counters.rx(len - NET_HDR_LEN);
        self.add_used(RX_QUEUE, chain.head, len as u32)?;
        Ok(ReadStep::Delivered)
    }

    /// Places the frame in the bounce buffer into guest buffers.
    fn deliver_pending(&mut self) -> Result<Delivery, Fatal> {
        let len = self.pending;
        self.segs.clear();
        self.chains.clear();
        self.bad.clear();
        let mut cap = 0;
        // Bad chains before the first good one can be returned right away;
        // later ones wait so the frame's buffers stay consecutive in the used
        // ring (MRG_RXBUF's num_buffers counts consecutive entries).
        let mut prefix_end = self.rx.next_avail();
        while cap < len && (self.mrg_rxbuf || self.chains.is_empty()) {
            match self.pop_rx_chain()? {
                None => {
                    let seen = self.rx.next_avail();
                    let examined = seen.wrapping_sub(prefix_end);
                    return self.no_room(prefix_end, seen, examined);
                }
                Some(Err((head, f))) => {
                    if self.chains.is_empty() {
                        self.return_bad_rx(head, f)?;
                        prefix_end = self.rx.next_avail();
                    } else {
                        self.bad.push((head, f));
                    }
                }
                Some(Ok(c)) => {
                    cap += c.cap;
                    self.chains.push(c);
                }
            }
        }
        if cap < len {
            // Without MRG_RXBUF one chain must hold the frame, and this one
            // cannot: an MTU or offload mismatch, or a bad guest. Drop the
            // frame and return the chain unused; putting it back instead
            // would let it block every later frame that does not fit it.
            let small = self.chains[0];
            self.pending = 0;
            self.rx_frame_lost(
                Fault::TooLarge,
                format_args!(
                    "dropping a received frame of {} bytes: the guest's receive buffer holds {cap} \
                     (MTU or offload mismatch?)",
                    len - NET_HDR_LEN
                ),
            );
            self.add_used(RX_QUEUE, small.head, 0)?;
            for (head, f) in std::mem::take(&mut self.bad) {
                self.return_bad_rx(head, f)?;
            }
            return Ok(Delivery::Dropped);
        }
        let count = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        self.bounce[10..12].copy_from_slice(&count.to_le_bytes());
        if !self.guest_csum {
            self.bounce[0] = 0;
        }
        let mut offset = 0;
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        for c in &self.chains {
            let n = (len - offset).min(c.cap);
            let segs = &self.segs[c.segs.0..c.segs.1];
            let w = write_to_segs(&self.mem, segs, 0, &self.bounce[offset..offset + n]);
            offset += n;
            batch.push((c.head, w as u32));
        }
        let res = self.add_used_rx_batch(&batch);
        self.batch = batch;
        res?;
        for (head, f) in std::mem::take(&mut self.bad) {
            self.return_bad_rx(head, f)?;
        }
        self.pending = 0;
        self.shared.counters.rx(len - NET_HDR_LEN);
        Ok(Delivery::Done)
    }

    /// Not enough buffers for the pending frame: put back the chains taken
    /// since `rewind_to`, unless they are the whole ring, in which case the
    /// frame can never fit and is dropped.
    fn no_room(&mut self, rewind_to: u16, seen: u16, examined: u16) -> Result<Delivery, Fatal> {
        self.bad.clear();
        self.rx.set_next_avail(rewind_to);
        if examined >= self.rx.size() {
            let len = self.pending - NET_HDR_LEN;
            self.pending = 0;
            self.rx_frame_lost(Fault::TooLarge, format_args!("dropping a received frame of {len} bytes: it does not fit even the whole receive ring"));
            return Ok(Delivery::Dropped);
        }
        Ok(Delivery::NoRoom(seen))
    }

    // -------------------------------------------------------------- CTRL --

    fn process_ctrl(&mut self) -> Result<(), Fatal> {
        let Some((q, _)) = &mut self.ctrl else {
            return Ok(());
        };
        let tap = &self.tap;
        let limiter = &mut self.log;
        let mut applied = None;
        let mut set_offloads =
            |offloads: u64| match tap.set_offload(tun_offloads_for_guest(offloads)) {
                Ok(()) => {
                    applied = Some(offloads);
                    true
                }
                Err(e) => {
                    tracing::warn!(tap = tap.name(), "guest offload change refused: {e}");
                    false
                }
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
            &mut set_offloads,
            &mut log,
        )?;
        if let Some(offloads) = applied {
            self.guest_csum = offloads & feature(VIRTIO_NET_F_GUEST_CSUM) != 0;
        }
        self.added[CTRL_QUEUE] += added;
        self.signal_used(CTRL_QUEUE)
    }
}
