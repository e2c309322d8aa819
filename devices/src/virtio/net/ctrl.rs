//! The virtio-net control queue, served by godwit for every peer kind: by the
//! TAP device's datapath thread, and by a small thread of its own for vhost
//! devices (vhost-user, kernel vhost-net), whose backends only get the
//! receive and transmit rings (DPDK offers CTRL_VQ but does not serve a
//! control queue; godwit answers it instead).
//!
//! Commands: rx mode (promiscuous, all-multicast) and MAC tables (recorded
//! for introspection: godwit does not filter), MAC address, announce ack,
//! queue pairs in use (1 to `max_virtqueue_pairs`, applied by the peer), guest
//! offloads (applied by the peer).
//! A malformed chain is returned unanswered (length 0) and counted; an
//! unknown or malformed command is answered VIRTIO_NET_ERR.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{
    parse_chain, read_from_segs, seg_total, wants_interrupt, write_to_segs, Fatal, Seg,
};
use super::features::GUEST_OFFLOADS;
use super::{Fault, Shared};
use crate::virtio::pause::PauseGate;
use crate::virtio::ratelimit::LogLimiter;
use crate::virtio::Features;
use crate::virtio::{feature, InterruptKind, VirtioInterrupt};
use crate::GuestMemory;

/// Largest control command (a MAC table of ~10000 entries).
const CTRL_MAX_LEN: usize = 64 * 1024;

/// Unicast and multicast MAC tables of VIRTIO_NET_CTRL_MAC_TABLE_SET.
type MacTables = (Vec<[u8; 6]>, Vec<[u8; 6]>);

/// What the control queue changes on the device's peer.
pub(crate) trait CtrlPeer {
    /// Applies VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET (only acked guest offload
    /// bits); false answers VIRTIO_NET_ERR.
    fn set_guest_offloads(&mut self, offloads: Features) -> bool;
    /// Applies VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET with a count already checked
    /// to be from 1 to `max_virtqueue_pairs`; false answers VIRTIO_NET_ERR.
    fn set_queue_pairs(&mut self, pairs: u16) -> bool;
}

/// A [`CtrlPeer`] made of two callbacks (the vhost models').
pub(crate) struct CallbackPeer<'a> {
    pub(crate) offloads: &'a mut (dyn FnMut(Features) -> bool + Send),
    pub(crate) pairs: &'a mut (dyn FnMut(u16) -> bool + Send),
}

impl CtrlPeer for CallbackPeer<'_> {
    fn set_guest_offloads(&mut self, offloads: Features) -> bool {
        (self.offloads)(offloads)
    }
    fn set_queue_pairs(&mut self, pairs: u16) -> bool {
        (self.pairs)(pairs)
    }
}

/// Serves every available control command of `q`; returns how many used
/// entries were added (the caller decides on the interrupt, see
/// [`wants_interrupt`]). `peer` applies offload and queue-pair changes;
/// `log` receives complaints about the guest's commands (the caller
/// rate-limits).
pub(crate) fn serve_ctrl_queue(
    q: &mut Queue,
    mem: &GuestMemory,
    shared: &Shared,
    acked: Features,
    segs: &mut Vec<Seg>,
    peer: &mut dyn CtrlPeer,
    log: &mut dyn FnMut(std::fmt::Arguments<'_>),
) -> Result<usize, Fatal> {
    let mut added = 0;
    loop {
        added += serve_available(q, mem, shared, acked, segs, peer, log)?;
        // Ask for the next kick (with EVENT_IDX: avail_event at the next
        // entry; a driver that honours it kicks only then), and serve what
        // was posted meanwhile.
        let more = q
            .enable_notification(mem)
            .map_err(|e| Fatal(format!("control queue: enabling notifications: {e}")))?;
        if !more {
            return Ok(added);
        }
    }
}

/// Serves the control commands available now; returns how many.
fn serve_available(
    q: &mut Queue,
    mem: &GuestMemory,
    shared: &Shared,
    acked: Features,
    segs: &mut Vec<Seg>,
    peer: &mut dyn CtrlPeer,
    log: &mut dyn FnMut(std::fmt::Arguments<'_>),
) -> Result<usize, Fatal> {
    let mut added = 0;
    while let Some(chain) = q
        .iter(mem)
        .map_err(|e| Fatal(format!("control queue: reading the available ring: {e}")))?
        .next()
    {
        let head = chain.head_index();
        segs.clear();
        let mut fault = parse_chain(chain, mem, segs).err();
        let split = segs.iter().position(|s| s.write).unwrap_or(segs.len());
        if fault.is_none() {
            let (out, inp) = segs.split_at(split);
            fault = if inp.iter().any(|s| !s.write) {
                Some(Fault::WrongDirection)
            } else if inp.is_empty() || seg_total(out) < 2 {
                Some(Fault::TooShort)
            } else if seg_total(out) > CTRL_MAX_LEN {
                Some(Fault::TooLarge)
            } else {
                None
            };
        }
        let len = match fault {
            Some(f) => {
                shared.counters.ctrl_fault();
                log(format_args!(
                    "returning a bad control chain (head {head}) unanswered: {}",
                    f.name()
                ));
                0
            }
            None => {
                let mut cmd = vec![0u8; seg_total(&segs[..split])];
                let got = read_from_segs(mem, &segs[..split], &mut cmd);
                cmd.truncate(got);
                let ack = handle_ctrl(&cmd, shared, acked, peer, log);
                if ack != VIRTIO_NET_OK as u8 {
                    shared.counters.ctrl_error();
                }
                write_to_segs(mem, &segs[split..], 0, &[ack], true) as u32
            }
        };
        q.add_used(mem, head, len)
            .map_err(|e| Fatal(format!("control queue: returning descriptor {head}: {e}")))?;
        added += 1;
    }
    Ok(added)
}

/// Executes one control command; returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
fn handle_ctrl(
    cmd: &[u8],
    shared: &Shared,
    acked: Features,
    peer: &mut dyn CtrlPeer,
    log: &mut dyn FnMut(std::fmt::Arguments<'_>),
) -> u8 {
    let (ok, err) = (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8);
    let has = |bit: u32| acked & feature(bit) != 0;
    let (class, command, data) = match cmd {
        [class, command, data @ ..] => (u32::from(*class), u32::from(*command), data),
        _ => return err,
    };
    let result = match (class, command) {
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI)
            if has(VIRTIO_NET_F_CTRL_RX) =>
        {
            match data {
                [on] => {
                    let on = *on != 0;
                    shared.with_filter(|f| {
                        if command == VIRTIO_NET_CTRL_RX_PROMISC {
                            f.promiscuous = on;
                        } else {
                            f.all_multicast = on;
                        }
                    });
                    true
                }
                _ => false,
            }
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) if has(VIRTIO_NET_F_CTRL_RX) => {
            match parse_mac_tables(data) {
                Some((uni, multi)) => {
                    shared.with_filter(|f| {
                        f.unicast = uni;
                        f.multicast = multi;
                    });
                    true
                }
                None => false,
            }
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) if has(VIRTIO_NET_F_CTRL_MAC_ADDR) => {
            match <[u8; 6]>::try_from(data) {
                Ok(mac) if mac[0] & 1 == 0 => {
                    shared.set_mac(mac);
                    true
                }
                _ => false,
            }
        }
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)
            if has(VIRTIO_NET_F_GUEST_ANNOUNCE) =>
        {
            shared
                .status
                .fetch_and(!(VIRTIO_NET_S_ANNOUNCE as u16), Ordering::SeqCst);
            true
        }
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if has(VIRTIO_NET_F_MQ) => {
            match <[u8; 2]>::try_from(data).map(u16::from_le_bytes) {
                Ok(pairs) if (1..=shared.ready_pairs()).contains(&pairs) => {
                    let done = peer.set_queue_pairs(pairs);
                    if done {
                        shared.active_pairs.store(pairs, Ordering::SeqCst);
                    }
                    done
                }
                Ok(pairs) => {
                    log(format_args!(
                        "the driver asked for {pairs} queue pairs (VQ_PAIRS_SET); the device has {}, of which the driver made {} ready",
                        shared.max_pairs,
                        shared.ready_pairs()
                    ));
                    false
                }
                Err(_) => false,
            }
        }
        (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET)
            if has(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) =>
        {
            // The tunnel bits (65, 66) travel at their _MAPPED places.
            match <[u8; 8]>::try_from(data)
                .map(u64::from_le_bytes)
                .map(super::features::ctrl_offloads_to_features)
            {
                Ok(offloads)
                    if offloads & !(acked & GUEST_OFFLOADS) == 0
                        && peer.set_guest_offloads(offloads) =>
                {
                    shared.guest_offloads.store(offloads);
                    true
                }
                _ => false,
            }
        }
        _ => false,
    };
    if result {
        ok
    } else {
        log(format_args!(
            "answering control command class {class} command {command} ({} bytes) with VIRTIO_NET_ERR: not supported or malformed",
            data.len()
        ));
        err
    }
}

/// Two `virtio_net_ctrl_mac` tables (le32 count + 6-byte entries), unicast
/// then multicast, filling `data` exactly.
fn parse_mac_tables(data: &[u8]) -> Option<MacTables> {
    fn table(data: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
        let (n, rest) = data.split_first_chunk::<4>()?;
        let n = usize::try_from(u32::from_le_bytes(*n)).ok()?;
        let bytes = n.checked_mul(6)?;
        if rest.len() < bytes {
            return None;
        }
        let (entries, rest) = rest.split_at(bytes);
        let macs = entries
            .chunks_exact(6)
            .filter_map(|c| <[u8; 6]>::try_from(c).ok())
            .collect();
        Some((macs, rest))
    }
    let (uni, rest) = table(data)?;
    let (multi, rest) = table(rest)?;
    rest.is_empty().then_some((uni, multi))
}

/// An epoll set watching each fd of `fds` for input, with its token.
pub(crate) fn epoll_on(fds: &[(RawFd, u64)]) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for &(fd, token) in fds {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

const TOKEN_STOP: u64 = 0;
const TOKEN_CTRL: u64 = 1;
const TOKEN_PAUSE: u64 = 2;

/// The control queue of a vhost device, served by a thread of its own while
/// the device is active (the backend serves the other rings).
pub(crate) struct CtrlThread {
    stop: EventFd,
    thread: Option<JoinHandle<Queue>>,
    gate: Arc<PauseGate>,
}

/// What the control thread of a vhost device serves.
pub(crate) struct CtrlJob {
    /// Names the device in log lines (the backend's socket or TAP).
    pub(crate) name: String,
    pub(crate) mem: GuestMemory,
    pub(crate) queue: Queue,
    /// The control queue's index (interrupts, positions).
    pub(crate) index: usize,
    pub(crate) evt: EventFd,
    pub(crate) shared: Arc<Shared>,
    pub(crate) acked: Features,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) gate: Arc<PauseGate>,
    /// Applies VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET (vhost-net: the TAP).
    pub(crate) set_guest_offloads: Box<dyn FnMut(Features) -> bool + Send>,
    /// Applies VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (vhost-user: SET_VRING_ENABLE).
    pub(crate) set_queue_pairs: Box<dyn FnMut(u16) -> bool + Send>,
}

impl CtrlThread {
    /// Starts serving `job`'s queue.
    pub(crate) fn start(job: CtrlJob) -> io::Result<CtrlThread> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = epoll_on(&[
            (stop.as_raw_fd(), TOKEN_STOP),
            (job.evt.as_raw_fd(), TOKEN_CTRL),
            (job.gate.wake_fd().as_raw_fd(), TOKEN_PAUSE),
        ])?;
        let thread_stop = stop.try_clone()?;
        let name: String = format!("gw-ctrl-{}", job.name).chars().take(15).collect();
        job.gate.attach();
        let gate = job.gate.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                crate::thread_hook::started(crate::thread_hook::DeviceThread::NetCtrl);
                let gate = job.gate.clone();
                let q = run_ctrl(job, epoll, thread_stop);
                gate.detach();
                q
            })
            .inspect_err(|_| gate.detach())?;
        Ok(CtrlThread {
            stop,
            thread: Some(thread),
            gate,
        })
    }

    /// Stops the thread; returns the queue as it stands (for its position).
    pub(crate) fn stop(mut self) -> Option<Queue> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<Queue> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            tracing::error!("cannot signal the control queue thread to stop: {e}");
        }
        // A parked thread must wake to see the stop.
        self.gate.release_for_stop();
        match thread.join() {
            Ok(q) => Some(q),
            Err(_) => {
                tracing::error!("the control queue thread panicked");
                None
            }
        }
    }
}

impl Drop for CtrlThread {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn run_ctrl(mut job: CtrlJob, epoll: Epoll, _stop: EventFd) -> Queue {
    let mut segs = Vec::with_capacity(8);
    let mut limiter: LogLimiter<1> = LogLimiter::default();
    let mut events = vec![EpollEvent::default(); 4];
    let name = job.name.clone();
    let mut serve = |job: &mut CtrlJob| -> Result<(), Fatal> {
        let _ = job.evt.read();
        let mut log = |msg: std::fmt::Arguments<'_>| {
            if let Some(suppressed) = limiter.check(0) {
                tracing::warn!(
                    device = %name,
                    suppressed,
                    "virtio-net: {msg} (similar events are logged at most every {}s)",
                    crate::virtio::ratelimit::LOG_INTERVAL.as_secs()
                );
            }
        };
        let mut peer = CallbackPeer {
            offloads: &mut *job.set_guest_offloads,
            pairs: &mut *job.set_queue_pairs,
        };
        let added = serve_ctrl_queue(
            &mut job.queue,
            &job.mem,
            &job.shared,
            job.acked,
            &mut segs,
            &mut peer,
            &mut log,
        )?;
        job.shared.publish_position(job.index, &job.queue);
        let index = u16::try_from(job.index).unwrap_or(u16::MAX);
        if added > 0 && wants_interrupt(&mut job.queue, &job.mem, "control")? {
            if let Err(e) = job.interrupt.trigger(InterruptKind::Queue(index)) {
                tracing::warn!(device = %job.name, "cannot interrupt the guest: {e}");
            }
        }
        Ok(())
    };
    // Commands posted before activation.
    if let Err(e) = serve(&mut job) {
        ctrl_failed(&job, e);
        return job.queue;
    }
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                ctrl_failed(&job, Fatal(format!("epoll_wait failed: {e}")));
                return job.queue;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return job.queue,
                TOKEN_PAUSE => job.gate.park(),
                _ => {
                    if let Err(e) = serve(&mut job) {
                        ctrl_failed(&job, e);
                        return job.queue;
                    }
                }
            }
        }
    }
}

fn ctrl_failed(job: &CtrlJob, e: Fatal) {
    tracing::error!(
        device = %job.name,
        "virtio-net stopped serving its control queue: {}; the guest driver must reset the device \
         (DEVICE_NEEDS_RESET is set)",
        e.0
    );
    job.interrupt.signal_needs_reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_tables() {
        let mut d = Vec::new();
        d.extend_from_slice(&1u32.to_le_bytes());
        d.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        d.extend_from_slice(&2u32.to_le_bytes());
        d.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1, 1, 0, 0x5e, 0, 0, 2]);
        let (u, m) = parse_mac_tables(&d).unwrap();
        assert_eq!(u, vec![[2, 0, 0, 0, 0, 1]]);
        assert_eq!(m.len(), 2);
        assert!(parse_mac_tables(&d[..d.len() - 1]).is_none());
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_mac_tables(&extra).is_none());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_mac_tables(&huge).is_none());
    }
}
