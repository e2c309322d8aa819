//! The state a virtio-net device shares with the threads that serve its
//! queues (the TAP datapath, the control queue of a vhost device, a
//! vhost-user device's monitor): what the driver changed (MAC, receive
//! filter, guest offloads), the status bits, counters and ring positions.

use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
use virtio_queue::{Queue, QueueT};

use super::{Counters, FaultCounts, NetStats, PairStats, RxFilter};
use crate::virtio::AtomicFeatures;
use crate::virtio::QueuePosition;

/// State shared between the device and the threads serving its queues.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) mac: Mutex<[u8; 6]>,
    pub(crate) status: AtomicU16,
    pub(crate) rx_filter: Mutex<RxFilter>,
    pub(crate) counters: Counters,
    /// Per queue (transport index): next_avail | next_used << 16, published
    /// after each batch.
    pub(crate) positions: Vec<AtomicU32>,
    /// Queue pairs the device has (`max_virtqueue_pairs`).
    pub(crate) max_pairs: u16,
    /// Queue pairs in use: 1 after a reset, then what the driver set with
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
    pub(crate) active_pairs: AtomicU16,
    /// Queue pairs whose rings the driver made ready before DRIVER_OK
    /// (the first ones, without a gap): VQ_PAIRS_SET may ask for no more.
    pub(crate) ready_pairs: AtomicU16,
    /// Frames received and sent per queue pair.
    pub(crate) pair_counters: Vec<PairCounters>,
    /// Guest offload bits currently applied to the peer.
    pub(crate) guest_offloads: AtomicFeatures,
    /// A migration logs dirty pages (between `start_dirty_log` and
    /// `stop_dirty_log`): only then does the datapath mark the pages it
    /// writes in guest memory's bitmap.
    pub(crate) dirty_log: AtomicBool,
}

/// Frames of one queue pair.
#[derive(Debug, Default)]
pub(crate) struct PairCounters {
    rx_packets: AtomicU64,
    tx_packets: AtomicU64,
}

impl Shared {
    /// The state of a device with `max_pairs` queue pairs (and a control
    /// queue after them).
    pub(crate) fn new(mac: [u8; 6], max_pairs: u16) -> Self {
        let max_pairs = max_pairs.max(1);
        let queues = 2 * usize::from(max_pairs) + 1;
        Shared {
            mac: Mutex::new(mac),
            status: AtomicU16::new(VIRTIO_NET_S_LINK_UP as u16),
            rx_filter: Mutex::new(RxFilter::default()),
            counters: Counters::default(),
            positions: (0..queues).map(|_| AtomicU32::new(0)).collect(),
            max_pairs,
            active_pairs: AtomicU16::new(1),
            ready_pairs: AtomicU16::new(1),
            pair_counters: (0..max_pairs).map(|_| PairCounters::default()).collect(),
            guest_offloads: AtomicFeatures::new(0),
            dirty_log: AtomicBool::new(false),
        }
    }

    /// Whether the datapath must mark the guest pages it writes, asked after
    /// the writes: with the fences on both sides, either this sees the log
    /// on, or the migration's later read of the page sees the data.
    pub(crate) fn tracking(&self) -> bool {
        fence(Ordering::SeqCst);
        self.dirty_log.load(Ordering::SeqCst)
    }

    /// Turns dirty marking on or off (see [`Shared::tracking`]).
    pub(crate) fn set_dirty_log(&self, on: bool) {
        self.dirty_log.store(on, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub(crate) fn mac(&self) -> [u8; 6] {
        *self.mac.lock().unwrap_or_else(PoisonError::into_inner)
    }
    pub(crate) fn set_mac(&self, mac: [u8; 6]) {
        *self.mac.lock().unwrap_or_else(PoisonError::into_inner) = mac;
    }
    pub(crate) fn with_filter<T>(&self, f: impl FnOnce(&mut RxFilter) -> T) -> T {
        f(&mut self
            .rx_filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn link_up(&self) -> bool {
        self.status.load(Ordering::SeqCst) & VIRTIO_NET_S_LINK_UP as u16 != 0
    }

    /// Sets the LINK_UP status bit; true when that changed it.
    pub(crate) fn set_link_bit(&self, up: bool) -> bool {
        let bit = VIRTIO_NET_S_LINK_UP as u16;
        let old = if up {
            self.status.fetch_or(bit, Ordering::SeqCst)
        } else {
            self.status.fetch_and(!bit, Ordering::SeqCst)
        };
        (old & bit != 0) != up
    }

    /// Records where queue `index` stands (read by `queue_positions`).
    pub(crate) fn publish_position(&self, index: usize, q: &Queue) {
        self.publish_position_holding(index, q, 0);
    }

    /// As [`Shared::publish_position`], for a queue whose last `held`
    /// popped chains are held unused by the datapath: they are published as
    /// still available, so that saved state gives them back to the device.
    pub(crate) fn publish_position_holding(&self, index: usize, q: &Queue, held: u16) {
        let avail = q.next_avail().wrapping_sub(held);
        let pack = u32::from(avail) | (u32::from(q.next_used()) << 16);
        if let Some(p) = self.positions.get(index) {
            p.store(pack, Ordering::SeqCst);
        }
    }

    /// Counts a frame received on queue pair `pair`.
    pub(crate) fn count_rx(&self, pair: usize, bytes: usize) {
        self.counters.rx(bytes);
        if let Some(p) = self.pair_counters.get(pair) {
            p.rx_packets.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a frame sent on queue pair `pair`.
    pub(crate) fn count_tx(&self, pair: usize, bytes: usize) {
        self.counters.tx(bytes);
        if let Some(p) = self.pair_counters.get(pair) {
            p.tx_packets.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queue pairs in use now.
    pub(crate) fn active_pairs(&self) -> u16 {
        self.active_pairs.load(Ordering::SeqCst)
    }

    /// Queue pairs the driver made ready (see `ready_pairs`).
    pub(crate) fn ready_pairs(&self) -> u16 {
        self.ready_pairs.load(Ordering::SeqCst)
    }

    /// Frames per queue pair, for `query-net`.
    pub(crate) fn pair_stats(&self) -> Vec<PairStats> {
        self.pair_counters
            .iter()
            .map(|p| PairStats {
                rx_packets: p.rx_packets.load(Ordering::Relaxed),
                tx_packets: p.tx_packets.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub(crate) fn position(&self, index: usize) -> QueuePosition {
        let v = self
            .positions
            .get(index)
            .map_or(0, |p| p.load(Ordering::SeqCst));
        QueuePosition {
            next_avail: v as u16,
            next_used: (v >> 16) as u16,
        }
    }

    pub(crate) fn stats(&self) -> NetStats {
        let c = &self.counters;
        NetStats {
            rx_packets: c.rx_packets.load(Ordering::Relaxed),
            rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
            tx_packets: c.tx_packets.load(Ordering::Relaxed),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            rx_faults: FaultCounts::from(&c.rx_faults),
            tx_faults: FaultCounts::from(&c.tx_faults),
            ctrl_faults: c.ctrl_faults.load(Ordering::Relaxed),
            ctrl_errors: c.ctrl_errors.load(Ordering::Relaxed),
        }
    }
}
