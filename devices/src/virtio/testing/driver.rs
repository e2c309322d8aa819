//! [`GuestDriver`]: a virtio driver played directly on guest memory
//! through an mmio transport's registers.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::virtio::mmio::{reg, MmioTransport};
use crate::virtio::net::features::hdr;
use crate::virtio::net::{NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use crate::virtio::{
    feature, feature_word, status, Features, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("guest memory access at {addr:#x} failed: {source}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the test driver ran out of guest memory ({need} more bytes needed)")]
    OutOfMemory { need: u64 },
    #[error("the device did not accept FEATURES_OK for features {0:#x}")]
    FeaturesRejected(Features),
    #[error("after DRIVER_OK the device status is {0:#x} (DEVICE_NEEDS_RESET or not live)")]
    NotLive(u32),
    #[error("queue {0} does not exist or is not set up")]
    NoQueue(usize),
    #[error("queue {0} has no free descriptors")]
    QueueFull(usize),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("the device returned descriptor head {head} on queue {queue}, which the driver did not post")]
    UnknownHead { queue: usize, head: u16 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A descriptor as written into a descriptor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    pub fn read(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: false,
        }
    }
    pub fn write(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

/// A used-ring entry reaped by the driver, with the buffers of its chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
    pub bufs: Vec<Buf>,
}

#[derive(Debug)]
struct Posted {
    descs: Vec<u16>,
    bufs: Vec<Buf>,
}

/// The driver's view of one split virtqueue.
#[derive(Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub event_idx: bool,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    inflight: HashMap<u16, Posted>,
}

/// A received frame put together from one or more used buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// The 12-byte virtio-net header.
    pub hdr: [u8; NET_HDR_LEN],
    /// With UDP tunnel GSO negotiated, the rest of the 24-byte header
    /// (hash fields, outer_th_offset, inner_nh_offset); empty otherwise.
    pub tunnel_hdr: Vec<u8>,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
    /// How many buffers the frame used (num_buffers).
    pub buffers: u16,
}

impl RxFrame {
    pub fn flags(&self) -> u8 {
        self.hdr[0]
    }
    pub fn gso_type(&self) -> u8 {
        self.hdr[1]
    }
    pub fn hdr_len(&self) -> u16 {
        u16::from_le_bytes([self.hdr[2], self.hdr[3]])
    }
    pub fn gso_size(&self) -> u16 {
        u16::from_le_bytes([self.hdr[4], self.hdr[5]])
    }
    pub fn csum_start(&self) -> u16 {
        u16::from_le_bytes([self.hdr[6], self.hdr[7]])
    }
    pub fn csum_offset(&self) -> u16 {
        u16::from_le_bytes([self.hdr[8], self.hdr[9]])
    }
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
    /// `outer_th_offset` of the tunnel header (0 without one).
    pub fn outer_th_offset(&self) -> u16 {
        self.tunnel_u16(hdr::OUTER_TH_OFFSET)
    }
    /// `inner_nh_offset` of the tunnel header (0 without one).
    pub fn inner_nh_offset(&self) -> u16 {
        self.tunnel_u16(hdr::INNER_NH_OFFSET)
    }
    fn tunnel_u16(&self, at: usize) -> u16 {
        let i = at - NET_HDR_LEN;
        match self.tunnel_hdr.get(i..i + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]),
            None => 0,
        }
    }
}

/// A 24-byte tunnel virtio-net header: `net_hdr`'s fields, no hash, and the
/// outer transport and inner network header offsets.
pub fn tunnel_net_hdr(
    base: [u8; NET_HDR_LEN],
    outer_th: u16,
    inner_nh: u16,
) -> [u8; hdr::TUNNEL_LEN] {
    let mut h = [0u8; hdr::TUNNEL_LEN];
    h[..NET_HDR_LEN].copy_from_slice(&base);
    h[hdr::OUTER_TH_OFFSET..hdr::OUTER_TH_OFFSET + 2].copy_from_slice(&outer_th.to_le_bytes());
    h[hdr::INNER_NH_OFFSET..hdr::INNER_NH_OFFSET + 2].copy_from_slice(&inner_nh.to_le_bytes());
    h
}

/// A 12-byte virtio-net header.
pub fn net_hdr(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

/// Descriptor `i` of a chain over `bufs`, linked to descriptor `next`
/// unless it is the last.
fn chain_desc(bufs: &[Buf], i: usize, next: u16) -> RawDesc {
    let b = &bufs[i];
    let last = i + 1 == bufs.len();
    let mut flags = if b.write {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    if !last {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    RawDesc {
        addr: b.addr.0,
        len: b.len,
        flags,
        next: if last { 0 } else { next },
    }
}

/// Where the driver starts allocating (below stays free for crafted tests).
const ALLOC_START: u64 = 0x10000;

/// A virtio driver in a test: drives an [`MmioTransport`] like a guest would.
pub struct GuestDriver {
    mem: GuestMemory,
    transport: Arc<Mutex<MmioTransport>>,
    irq: EventFd,
    notify: Vec<EventFd>,
    queues: Vec<DriverQueue>,
    next: u64,
    end: u64,
    features: Features,
    /// Receive buffers the device returned with length 0 (bad chains).
    pub rx_rejected: usize,
}

impl GuestDriver {
    /// A driver for `transport`, allocating rings and buffers from `mem`
    /// above 64 KiB.
    pub fn new(
        mem: GuestMemory,
        transport: Arc<Mutex<MmioTransport>>,
    ) -> Result<Self, DriverError> {
        let (irq, notify) = {
            let t = transport.lock().unwrap_or_else(PoisonError::into_inner);
            let irq = t.interrupt_eventfd().try_clone()?;
            let notify = t
                .queue_notify_eventfds()
                .iter()
                .map(|e| e.try_clone())
                .collect::<io::Result<Vec<_>>>()?;
            (irq, notify)
        };
        let end = vm_memory::GuestMemoryBackend::last_addr(&mem).0 + 1;
        Ok(GuestDriver {
            mem,
            transport,
            irq,
            notify,
            queues: Vec::new(),
            next: ALLOC_START,
            end,
            features: 0,
            rx_rejected: 0,
        })
    }

    /// Continues with another transport (e.g. one restored from a
    /// snapshot of the first), keeping the rings and buffers as they are.
    pub fn rebind(&mut self, transport: Arc<Mutex<MmioTransport>>) -> Result<(), DriverError> {
        {
            let t = transport.lock().unwrap_or_else(PoisonError::into_inner);
            self.irq = t.interrupt_eventfd().try_clone()?;
            self.notify = t
                .queue_notify_eventfds()
                .iter()
                .map(|e| e.try_clone())
                .collect::<io::Result<Vec<_>>>()?;
        }
        self.transport = transport;
        Ok(())
    }

    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    pub fn queue(&self, q: usize) -> Option<&DriverQueue> {
        self.queues.get(q)
    }

    pub fn reg_read(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn reg_write(&self, offset: u64, v: u32) {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(offset, &v.to_le_bytes());
    }

    /// Reads `len` bytes of the device configuration space.
    pub fn config(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(0x100 + offset, &mut out);
        out
    }

    pub fn status(&self) -> u32 {
        self.reg_read(reg::STATUS)
    }

    /// The offered features, read through DeviceFeaturesSel words 0 to 3.
    pub fn device_features(&self) -> Features {
        (0..4u32).fold(0, |acc, sel| {
            self.reg_write(reg::DEVICE_FEATURES_SEL, sel);
            acc | (Features::from(self.reg_read(reg::DEVICE_FEATURES)) << (32 * sel))
        })
    }

    /// The virtio-net header size the negotiated features give.
    pub fn net_hdr_len(&self) -> usize {
        hdr::len_for(self.features)
    }

    /// Resets the device (status 0) and forgets the queues.
    pub fn reset(&mut self) {
        self.reg_write(reg::STATUS, 0);
        self.queues.clear();
        self.features = 0;
    }

    /// Initialises the device like a Linux driver: reset, ACKNOWLEDGE,
    /// DRIVER, features (`wanted` ∩ offered, plus VERSION_1), FEATURES_OK,
    /// every queue at up to `queue_size` entries, DRIVER_OK. Returns the
    /// negotiated features.
    pub fn init(&mut self, wanted: Features, queue_size: u16) -> Result<Features, DriverError> {
        self.reset();
        self.reg_write(reg::STATUS, status::ACKNOWLEDGE);
        self.reg_write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let features = (self.device_features() & wanted) | feature(VIRTIO_F_VERSION_1);
        for sel in 0..4u32 {
            self.reg_write(reg::DRIVER_FEATURES_SEL, sel);
            self.reg_write(reg::DRIVER_FEATURES, feature_word(features, sel));
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.reg_write(reg::STATUS, s);
        if self.status() & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRejected(features));
        }
        self.features = features;
        let event_idx = features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        for i in 0..self.notify.len() {
            self.reg_write(reg::QUEUE_SEL, i as u32);
            let max = self.reg_read(reg::QUEUE_NUM_MAX) as u16;
            if max == 0 {
                continue;
            }
            let size = queue_size.min(max);
            let desc = self.alloc(16 * u64::from(size), 16)?;
            let avail = self.alloc(6 + 2 * u64::from(size), 2)?;
            let used = self.alloc(6 + 8 * u64::from(size), 4)?;
            self.reg_write(reg::QUEUE_NUM, u32::from(size));
            self.reg_write(reg::QUEUE_DESC_LOW, desc.0 as u32);
            self.reg_write(reg::QUEUE_DESC_HIGH, (desc.0 >> 32) as u32);
            self.reg_write(reg::QUEUE_DRIVER_LOW, avail.0 as u32);
            self.reg_write(reg::QUEUE_DRIVER_HIGH, (avail.0 >> 32) as u32);
            self.reg_write(reg::QUEUE_DEVICE_LOW, used.0 as u32);
            self.reg_write(reg::QUEUE_DEVICE_HIGH, (used.0 >> 32) as u32);
            self.reg_write(reg::QUEUE_READY, 1);
            while self.queues.len() < i {
                self.queues.push(DriverQueue::absent());
            }
            self.queues.push(DriverQueue {
                size,
                desc,
                avail,
                used,
                event_idx,
                free: (0..size).rev().collect(),
                avail_idx: 0,
                last_used: 0,
                inflight: HashMap::new(),
            });
        }
        self.reg_write(reg::STATUS, s | status::DRIVER_OK);
        let st = self.status();
        if st & status::DRIVER_OK == 0 || st & status::DEVICE_NEEDS_RESET != 0 {
            return Err(DriverError::NotLive(st));
        }
        Ok(features)
    }

    /// Allocates `len` bytes of guest memory aligned to `align`.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress, DriverError> {
        let align = align.max(1);
        let start = self.next.div_ceil(align) * align;
        let end = start.saturating_add(len);
        if end > self.end {
            return Err(DriverError::OutOfMemory {
                need: end.saturating_sub(self.end),
            });
        }
        self.next = end;
        Ok(GuestAddress(start))
    }

    pub fn write_mem(&self, addr: GuestAddress, data: &[u8]) -> Result<(), DriverError> {
        self.mem
            .write_slice(data, addr)
            .map_err(|source| DriverError::Memory {
                addr: addr.0,
                source,
            })
    }

    pub fn read_mem(&self, addr: GuestAddress, len: usize) -> Result<Vec<u8>, DriverError> {
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, addr)
            .map_err(|source| DriverError::Memory {
                addr: addr.0,
                source,
            })?;
        Ok(out)
    }

    fn q(&mut self, q: usize) -> Result<&mut DriverQueue, DriverError> {
        self.queues
            .get_mut(q)
            .filter(|dq| dq.size > 0)
            .ok_or(DriverError::NoQueue(q))
    }

    /// Writes descriptor `index` of queue `q`'s table.
    pub fn write_desc(&mut self, q: usize, index: u16, d: RawDesc) -> Result<(), DriverError> {
        let base = self.q(q)?.desc;
        self.write_mem(GuestAddress(base.0 + 16 * u64::from(index)), &d.to_bytes())
    }

    /// Puts `head` in the next available-ring slot and publishes it.
    pub fn publish(&mut self, q: usize, head: u16) -> Result<(), DriverError> {
        let dq = self.q(q)?;
        let slot = dq.avail_idx % dq.size;
        let (avail, idx) = (dq.avail, dq.avail_idx.wrapping_add(1));
        dq.avail_idx = idx;
        self.write_mem(
            GuestAddress(avail.0 + 4 + 2 * u64::from(slot)),
            &head.to_le_bytes(),
        )?;
        self.mem
            .store(idx.to_le(), GuestAddress(avail.0 + 2), Ordering::Release)
            .map_err(|source| DriverError::Memory {
                addr: avail.0 + 2,
                source,
            })
    }

    /// Overwrites the available ring's index (to corrupt the ring).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) -> Result<(), DriverError> {
        let dq = self.q(q)?;
        dq.avail_idx = idx;
        let addr = GuestAddress(dq.avail.0 + 2);
        self.write_mem(addr, &idx.to_le_bytes())
    }

    /// The used ring's index as the device last published it.
    pub fn used_idx(&mut self, q: usize) -> Result<u16, DriverError> {
        let at = GuestAddress(self.q(q)?.used.0 + 2);
        let b = self.read_mem(at, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// Writes `used_event` (EVENT_IDX): the device interrupts once it
    /// publishes the used entry with this index. [`Self::reap`] sets it to
    /// the next entry; tests overwrite it to check suppression.
    pub fn set_used_event(&mut self, q: usize, v: u16) -> Result<(), DriverError> {
        let dq = self.q(q)?;
        let at = GuestAddress(dq.avail.0 + 4 + 2 * u64::from(dq.size));
        self.write_mem(at, &v.to_le_bytes())
    }

    /// Writes the available ring's flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&mut self, q: usize, flags: u16) -> Result<(), DriverError> {
        let at = self.q(q)?.avail;
        self.write_mem(at, &flags.to_le_bytes())
    }

    /// Polls until the device has published used index `idx` on queue `q`.
    pub fn wait_used_idx(
        &mut self,
        q: usize,
        idx: u16,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let deadline = Instant::now() + timeout;
        while self.used_idx(q)? != idx {
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout(timeout, "the used index"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Whether an interrupt is pending on the eventfd (consumes it, does
    /// not touch InterruptStatus).
    pub fn take_irq_signal(&self) -> bool {
        self.irq.read().is_ok()
    }

    /// Adds a chain of `bufs` using free descriptors and publishes it.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> Result<u16, DriverError> {
        let dq = self.q(q)?;
        if dq.free.len() < bufs.len() || bufs.is_empty() {
            return Err(DriverError::QueueFull(q));
        }
        let n = dq.free.len();
        let descs: Vec<u16> = dq.free.drain(n - bufs.len()..).rev().collect();
        for i in 0..bufs.len() {
            let next = descs.get(i + 1).copied().unwrap_or(0);
            self.write_desc(q, descs[i], chain_desc(bufs, i, next))?;
        }
        let head = descs[0];
        self.q(q)?.inflight.insert(
            head,
            Posted {
                descs,
                bufs: bufs.to_vec(),
            },
        );
        self.publish(q, head)?;
        Ok(head)
    }

    /// Adds `bufs` as an indirect table behind one descriptor.
    pub fn add_indirect(&mut self, q: usize, bufs: &[Buf]) -> Result<u16, DriverError> {
        let table = self.alloc(16 * bufs.len() as u64, 16)?;
        for i in 0..bufs.len() {
            let d = chain_desc(bufs, i, i as u16 + 1);
            self.write_mem(GuestAddress(table.0 + 16 * i as u64), &d.to_bytes())?;
        }
        let dq = self.q(q)?;
        let head = dq.free.pop().ok_or(DriverError::QueueFull(q))?;
        self.write_desc(
            q,
            head,
            RawDesc {
                addr: table.0,
                len: 16 * bufs.len() as u32,
                flags: VRING_DESC_F_INDIRECT as u16,
                next: 0,
            },
        )?;
        self.q(q)?.inflight.insert(
            head,
            Posted {
                descs: vec![head],
                bufs: bufs.to_vec(),
            },
        );
        self.publish(q, head)?;
        Ok(head)
    }

    /// Writes arbitrary descriptors at the given table indexes and publishes
    /// `head`: for loops, bad addresses, wrong directions. The indexes are
    /// taken from the free list (those not free are used anyway).
    pub fn add_raw(
        &mut self,
        q: usize,
        descs: &[(u16, RawDesc)],
        head: u16,
    ) -> Result<(), DriverError> {
        for (i, d) in descs {
            self.write_desc(q, *i, *d)?;
        }
        let dq = self.q(q)?;
        let idx: Vec<u16> = descs.iter().map(|(i, _)| *i).collect();
        dq.free.retain(|f| !idx.contains(f));
        dq.inflight.insert(
            head,
            Posted {
                descs: idx,
                bufs: Vec::new(),
            },
        );
        self.publish(q, head)
    }

    /// Notifies queue `q` (what the guest's QueueNotify write does through
    /// the ioeventfd).
    pub fn kick(&self, q: usize) -> Result<(), DriverError> {
        self.notify
            .get(q)
            .ok_or(DriverError::NoQueue(q))?
            .write(1)
            .map_err(DriverError::Io)
    }

    /// Waits up to `timeout` for an interrupt; reads and acknowledges
    /// InterruptStatus. Returns the status bits (0 on timeout).
    pub fn wait_irq(&self, timeout: Duration) -> Result<u32, DriverError> {
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e.into());
        }
        if r == 0 {
            return Ok(0);
        }
        let _ = self.irq.read();
        let st = self.reg_read(reg::INTERRUPT_STATUS);
        self.reg_write(reg::INTERRUPT_ACK, st);
        Ok(st)
    }

    /// Takes the used entries the device added since the last call, frees
    /// their descriptors, and (EVENT_IDX) asks for an interrupt on the next.
    pub fn reap(&mut self, q: usize) -> Result<Vec<Used>, DriverError> {
        let mem = self.mem.clone();
        let dq = self.q(q)?;
        let idx: u16 = mem
            .load(GuestAddress(dq.used.0 + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|source| DriverError::Memory {
                addr: dq.used.0 + 2,
                source,
            })?;
        let mut out = Vec::new();
        while dq.last_used != idx {
            let slot = dq.last_used % dq.size;
            let at = GuestAddress(dq.used.0 + 4 + 8 * u64::from(slot));
            let mut e = [0u8; 8];
            mem.read_slice(&mut e, at)
                .map_err(|source| DriverError::Memory { addr: at.0, source })?;
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            dq.last_used = dq.last_used.wrapping_add(1);
            let head = u16::try_from(id).map_err(|_| DriverError::UnknownHead {
                queue: q,
                head: u16::MAX,
            })?;
            let posted = dq
                .inflight
                .remove(&head)
                .ok_or(DriverError::UnknownHead { queue: q, head })?;
            dq.free.extend(posted.descs.iter().rev());
            out.push(Used {
                head,
                len,
                bufs: posted.bufs,
            });
        }
        if dq.event_idx {
            // used_event sits after the available ring.
            let at = GuestAddress(dq.avail.0 + 4 + 2 * u64::from(dq.size));
            let v = dq.last_used;
            self.write_mem(at, &v.to_le_bytes())?;
        }
        Ok(out)
    }

    /// Reaps until at least `n` used entries arrived on queue `q`.
    pub fn wait_used(
        &mut self,
        q: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Used>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut out = self.reap(q)?;
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(timeout, "used buffers"));
            }
            self.wait_irq(left.min(Duration::from_millis(50)))?;
            out.extend(self.reap(q)?);
        }
        Ok(out)
    }

    /// Sends one control command (`class`, `command`, `data`) on control
    /// queue `q` and returns the device's ack byte (VIRTIO_NET_OK or _ERR).
    pub fn ctrl_command(
        &mut self,
        q: usize,
        class: u8,
        command: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<u8, DriverError> {
        let mut bytes = vec![class, command];
        bytes.extend_from_slice(data);
        let len = bytes.len() as u32;
        let out = self.alloc(u64::from(len), 8)?;
        self.write_mem(out, &bytes)?;
        let ack = self.alloc(1, 1)?;
        self.write_mem(ack, &[0xee])?;
        self.add_chain(q, &[Buf::read(out, len), Buf::write(ack, 1)])?;
        self.kick(q)?;
        let used = self.wait_used(q, 1, timeout)?;
        if used[0].len != 1 {
            return Err(DriverError::Io(io::Error::other(format!(
                "the control queue used {} bytes of the 1-byte ack",
                used[0].len
            ))));
        }
        Ok(self.read_mem(ack, 1)?[0])
    }

    /// Posts `count` receive buffers of `len` bytes each (one descriptor
    /// each) and kicks the receive queue.
    pub fn fill_rx(&mut self, count: usize, len: u32) -> Result<(), DriverError> {
        self.fill_rx_on(RX_QUEUE, count, len)
    }

    /// As [`Self::fill_rx`], on receive queue `q` (2 * pair with MQ).
    pub fn fill_rx_on(&mut self, q: usize, count: usize, len: u32) -> Result<(), DriverError> {
        for _ in 0..count {
            let buf = self.alloc(u64::from(len), 8)?;
            self.add_chain(q, &[Buf::write(buf, len)])?;
        }
        self.kick(q)
    }

    /// Reposts the buffers of reaped receive entries.
    pub fn refill_rx(&mut self, used: &[Used]) -> Result<(), DriverError> {
        self.refill_rx_on(RX_QUEUE, used)
    }

    /// As [`Self::refill_rx`], on receive queue `q`.
    pub fn refill_rx_on(&mut self, q: usize, used: &[Used]) -> Result<(), DriverError> {
        for u in used {
            self.add_chain(q, &u.bufs)?;
        }
        self.kick(q)
    }

    /// Transmits `hdr` + `frame` as one chain (header and frame in separate
    /// descriptors when `split`) and kicks. Returns the head.
    /// `hdr` is as long as the negotiated header (12 or 24 bytes).
    pub fn send(&mut self, hdr: &[u8], frame: &[u8], split: bool) -> Result<u16, DriverError> {
        self.send_on(TX_QUEUE, hdr, frame, split)
    }

    /// As [`Self::send`], on transmit queue `q` (2 * pair + 1 with MQ).
    pub fn send_on(
        &mut self,
        q: usize,
        hdr: &[u8],
        frame: &[u8],
        split: bool,
    ) -> Result<u16, DriverError> {
        let total = (hdr.len() + frame.len()) as u64;
        let buf = self.alloc(total, 8)?;
        self.write_mem(buf, hdr)?;
        let data = GuestAddress(buf.0 + hdr.len() as u64);
        self.write_mem(data, frame)?;
        let bufs = if split {
            vec![
                Buf::read(buf, hdr.len() as u32),
                Buf::read(data, frame.len() as u32),
            ]
        } else {
            vec![Buf::read(buf, total as u32)]
        };
        let head = self.add_chain(q, &bufs)?;
        self.kick(q)?;
        Ok(head)
    }

    /// Reads the bytes a used entry covers.
    pub fn used_bytes(&self, u: &Used) -> Result<Vec<u8>, DriverError> {
        let mut out = Vec::with_capacity(u.len as usize);
        let mut left = u.len as usize;
        for b in &u.bufs {
            if left == 0 {
                break;
            }
            let n = left.min(b.len as usize);
            out.extend(self.read_mem(b.addr, n)?);
            left -= n;
        }
        Ok(out)
    }

    /// Waits for `n` received frames, assembling MRG_RXBUF frames from
    /// consecutive used entries. Zero-length entries (buffers the device
    /// rejected) are counted in `rx_rejected` and skipped.
    pub fn recv_frames(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RxFrame>, DriverError> {
        self.recv_frames_on(RX_QUEUE, n, timeout)
    }

    /// As [`Self::recv_frames`], on receive queue `q`.
    pub fn recv_frames_on(
        &mut self,
        q: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RxFrame>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut queue: std::collections::VecDeque<Used> = Default::default();
        let hdr_len = self.net_hdr_len();
        loop {
            while let Some(first) = queue.front() {
                if first.len == 0 {
                    self.rx_rejected += 1;
                    queue.pop_front();
                    continue;
                }
                let bytes = self.used_bytes(first)?;
                if bytes.len() < hdr_len {
                    queue.pop_front();
                    continue;
                }
                let nb = usize::from(u16::from_le_bytes([bytes[10], bytes[11]])).max(1);
                if queue.len() < nb {
                    break;
                }
                let mut data = Vec::new();
                for u in queue.drain(..nb) {
                    data.extend(self.used_bytes(&u)?);
                }
                let mut hdr = [0u8; NET_HDR_LEN];
                hdr.copy_from_slice(&data[..NET_HDR_LEN]);
                frames.push(RxFrame {
                    hdr,
                    tunnel_hdr: data[NET_HDR_LEN..hdr_len].to_vec(),
                    frame: data[hdr_len..].to_vec(),
                    buffers: nb as u16,
                });
            }
            if frames.len() >= n {
                return Ok(frames);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(timeout, "received frames"));
            }
            let got = self.reap(q)?;
            if got.is_empty() {
                self.wait_irq(left.min(Duration::from_millis(50)))?;
            }
            queue.extend(got);
        }
    }
}

impl DriverQueue {
    fn absent() -> Self {
        DriverQueue {
            size: 0,
            desc: GuestAddress(0),
            avail: GuestAddress(0),
            used: GuestAddress(0),
            event_idx: false,
            free: Vec::new(),
            avail_idx: 0,
            last_used: 0,
            inflight: HashMap::new(),
        }
    }

    /// Descriptors not in flight.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }
}
