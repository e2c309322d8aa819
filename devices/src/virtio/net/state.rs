//! The virtio-net device's own guest-visible state, beside the transport's
//! (rings, features, status): what the driver changed through the config
//! space and the control queue.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{RxFilter, VirtioNet};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// The MAC the driver sees (it may have changed it through the control queue).
    pub mac: [u8; 6],
    /// Config `status`: link up, announce pending.
    pub status: u16,
    pub mtu: u16,
    pub offered: u64,
    pub acked: u64,
    pub rx_filter: RxFilter,
    /// Offloads the driver selected through CTRL_GUEST_OFFLOADS.
    pub guest_offloads: u64,
}

impl VirtioNet {
    /// Captures the device state; call with the datapath paused.
    pub fn device_state(&self) -> VirtioNetState {
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

    /// Puts saved driver-visible state back into a freshly built (not yet
    /// activated) device that offers the same features. The transport's
    /// restore then acks the features and activates it.
    pub fn restore_device_state(&mut self, state: &VirtioNetState) {
        self.shared.set_mac(state.mac);
        self.shared.status.store(state.status, Ordering::SeqCst);
        self.shared.with_filter(|f| *f = state.rx_filter.clone());
        self.shared
            .guest_offloads
            .store(state.guest_offloads, Ordering::SeqCst);
    }
}
