//! virtio-net: the frontend every model shares ([`frontend`]), the feature
//! table ([`features`]), the control queue ([`ctrl`]) and the TAP model
//! ([`VirtioNet`], whose datapath is `worker.rs`). The vhost models live in
//! [`crate::vhost_user`] and [`crate::vhost_net`].
//!
//! Queues: receive and transmit ring of each queue pair (2k, 2k + 1), then
//! the control queue (only when CTRL_VQ is offered). A device has
//! `max_virtqueue_pairs` pairs (configuration space); a driver that does not
//! ack MQ uses one pair, and its control queue is queue 2 (virtio 1.2
//! 5.1.2). With MQ the driver turns pairs on with
//! VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; one is in use after a reset.

pub(crate) mod chain;
pub(crate) mod ctrl;
pub mod features;
pub mod frontend;
mod shared;
pub use frontend::{FrontendConfig, FrontendError, VIRTIO_ID_NET};
pub(crate) use shared::Shared;
pub(crate) mod model;
pub use model::{NetModel, PeerStatus, PeerTap};
mod state;
pub use state::VirtioNetState;
mod tap;
pub use tap::{NetConfig, NetError, VirtioNet};
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod worker;
/// The TAP queues of the pairs in use, for kernel vhost-net too.
pub(crate) use worker::{set_tap_pairs, switch_tap_queues};

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::net::TapOffloads;
use crate::virtio::Features;

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Index of the control queue when one queue pair is in use (MQ not acked,
/// or a device of one pair); see [`ctrl_queue_index`].
pub const CTRL_QUEUE: usize = 2;
/// The most queue pairs a device may have (`queues=`): a datapath thread
/// and a TAP queue each.
pub const MAX_QUEUE_PAIRS: u16 = 64;

/// The control queue's index for a device of `max_pairs` queue pairs whose
/// driver acked MQ (`mq_acked`) or not: after every ring of the pairs the
/// driver knows of.
pub fn ctrl_queue_index(max_pairs: u16, mq_acked: bool) -> usize {
    if mq_acked {
        2 * usize::from(max_pairs.max(1))
    } else {
        CTRL_QUEUE
    }
}
/// Default maximum size of the rx and tx queues.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// The virtio-net configuration space godwit exposes: mac, status,
/// max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;
/// The virtio 1.0 net header (num_buffers included).
pub const NET_HDR_LEN: usize = 12;

/// `52:54:00:12:34:56` formatting.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why the datapath dropped a packet or rejected a guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Fault {
    /// The descriptor chain loops, is longer than the queue, or links to a
    /// descriptor (or indirect table) that does not exist.
    BrokenChain = 0,
    /// A descriptor points outside guest memory.
    OutOfBounds = 1,
    /// The chain is shorter than the virtio-net header (or has no room for
    /// the control queue's ack).
    TooShort = 2,
    /// A device-writable descriptor where a readable one is needed, or the
    /// other way round.
    WrongDirection = 3,
    /// The frame is larger than godwit handles (or than all the receive
    /// buffers the guest can post), or the chain has too many segments.
    TooLarge = 4,
    /// The TAP refused the frame (tx) or failed to deliver one (rx).
    Peer = 5,
    /// The virtio-net header describes something the frame cannot be: a
    /// UDP tunnel segment without the tunnel features negotiated, or tunnel
    /// offsets beyond the frame or out of order.
    BadHeader = 6,
}

impl Fault {
    pub const COUNT: usize = 7;
    pub const ALL: [Fault; Fault::COUNT] = [
        Fault::BrokenChain,
        Fault::OutOfBounds,
        Fault::TooShort,
        Fault::WrongDirection,
        Fault::TooLarge,
        Fault::Peer,
        Fault::BadHeader,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::BrokenChain => "broken_chain",
            Fault::OutOfBounds => "out_of_bounds",
            Fault::TooShort => "too_short",
            Fault::WrongDirection => "wrong_direction",
            Fault::TooLarge => "too_large",
            Fault::Peer => "peer",
            Fault::BadHeader => "bad_header",
        }
    }
}

/// Live counters, shared with the datapath thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_faults: [AtomicU64; Fault::COUNT],
    tx_faults: [AtomicU64; Fault::COUNT],
    ctrl_faults: AtomicU64,
    ctrl_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn rx_fault(&self, f: Fault) {
        self.rx_faults[f as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn tx_fault(&self, f: Fault) {
        self.tx_faults[f as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn ctrl_fault(&self) {
        self.ctrl_faults.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn ctrl_error(&self) {
        self.ctrl_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts per [`Fault`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    pub broken_chain: u64,
    pub out_of_bounds: u64,
    pub too_short: u64,
    pub wrong_direction: u64,
    pub too_large: u64,
    pub peer: u64,
    pub bad_header: u64,
}

impl FaultCounts {
    fn from(c: &[AtomicU64; Fault::COUNT]) -> Self {
        let g = |f: Fault| c[f as usize].load(Ordering::Relaxed);
        FaultCounts {
            broken_chain: g(Fault::BrokenChain),
            out_of_bounds: g(Fault::OutOfBounds),
            too_short: g(Fault::TooShort),
            wrong_direction: g(Fault::WrongDirection),
            too_large: g(Fault::TooLarge),
            peer: g(Fault::Peer),
            bad_header: g(Fault::BadHeader),
        }
    }

    /// The count for one fault.
    pub fn get(&self, f: Fault) -> u64 {
        match f {
            Fault::BrokenChain => self.broken_chain,
            Fault::OutOfBounds => self.out_of_bounds,
            Fault::TooShort => self.too_short,
            Fault::WrongDirection => self.wrong_direction,
            Fault::TooLarge => self.too_large,
            Fault::Peer => self.peer,
            Fault::BadHeader => self.bad_header,
        }
    }

    pub fn total(&self) -> u64 {
        Fault::ALL.iter().map(|f| self.get(*f)).sum()
    }
}

/// Traffic counters of a device (since it was created).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Receive side: guest buffers returned unused (bad chains) and frames
    /// dropped (`too_large`: bigger than every buffer the guest can post;
    /// `peer`: the TAP failed or truncated a read). A frame is never dropped
    /// for lack of buffers: the TAP is not read until the guest posts some.
    pub rx_faults: FaultCounts,
    /// Transmit side: frames dropped, by reason.
    pub tx_faults: FaultCounts,
    /// Control-queue chains returned unanswered because they were malformed.
    pub ctrl_faults: u64,
    /// Control commands answered VIRTIO_NET_ERR.
    pub ctrl_errors: u64,
}

/// The receive filter the driver asked for through the control queue.
/// godwit does not filter: the TAP delivers everything and the guest's own
/// stack drops what is not for it; these are recorded for introspection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RxFilter {
    pub promiscuous: bool,
    pub all_multicast: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
}

impl Default for RxFilter {
    /// The spec's default: promiscuous until the driver says otherwise.
    fn default() -> Self {
        RxFilter {
            promiscuous: true,
            all_multicast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

/// Frames carried by one queue pair (since the device was created).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PairStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// What a later `query-net` shows about a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetInfo {
    pub tap: String,
    pub vnet_hdr: bool,
    pub mac: String,
    pub link_up: bool,
    pub active: bool,
    pub offered_features: Features,
    pub acked_features: Features,
    /// Names of the acked features (canonical names from the feature table).
    pub acked_feature_names: String,
    /// `TUNSETOFFLOAD` flags currently set on the TAP.
    pub tap_offloads: u32,
    pub tap_capabilities: TapOffloads,
    pub rx_filter: RxFilter,
    pub stats: NetStats,
    /// Queue pairs of the device (`max_virtqueue_pairs`).
    pub queue_pairs: u16,
    /// Queue pairs in use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
    pub active_queue_pairs: u16,
    /// Frames per queue pair.
    pub pair_stats: Vec<PairStats>,
}
