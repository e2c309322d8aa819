//! The virtio-net device's own guest-visible state, beside the transport's
//! (rings, features, status): what the driver changed through the config
//! space and the control queue.

use serde::{Deserialize, Serialize};

use super::RxFilter;
use crate::virtio::Features;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// The MAC the driver sees (it may have changed it through the control queue).
    pub mac: [u8; 6],
    /// Config `status`: link up, announce pending.
    pub status: u16,
    pub mtu: u16,
    pub offered: Features,
    pub acked: Features,
    pub rx_filter: RxFilter,
    /// Offloads the driver selected through CTRL_GUEST_OFFLOADS.
    pub guest_offloads: Features,
    /// Queue pairs in use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET); state saved
    /// before multi-queue has none and means 1.
    #[serde(default = "one_pair")]
    pub queue_pairs: u16,
}

fn one_pair() -> u16 {
    1
}
