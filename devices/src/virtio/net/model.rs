//! What the VMM asks of a virtio-net device whatever carries its packets: a
//! TAP served by godwit's own datapath ([`VirtioNet`]), a vhost-user
//! backend ([`crate::vhost_user::VhostUserNet`]) or kernel vhost-net
//! ([`crate::vhost_net::VhostKernelNet`]).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Counters, FaultCounts, NetInfo, NetStats, VirtioNet, VirtioNetState};
use crate::net::Tap;
use crate::vhost_net::VhostKernelNet;
use crate::vhost_user::VhostUserNet;
use crate::virtio::pause::PauseError;
use crate::virtio::VirtioDevice;

/// The TAP a device's frames leave through when godwit holds it (TAP and
/// vhost-net peers); a vhost-user device's frames are sent by its backend.
#[derive(Clone, Debug)]
pub struct PeerTap(Option<Arc<Tap>>);

impl PeerTap {
    pub fn get(&self) -> Option<&Arc<Tap>> {
        self.0.as_ref()
    }

    pub fn has_vnet_hdr(&self) -> bool {
        self.0.as_ref().is_some_and(|t| t.has_vnet_hdr())
    }

    /// Writes one frame to the TAP; `Unsupported` when godwit has none.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            Some(t) => t.write(buf),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this device's frames are sent by its vhost-user backend (SEND_RARP), not by godwit",
            )),
        }
    }
}

/// A virtio-net device model (its virtio side is [`VirtioDevice`]).
pub trait NetModel: VirtioDevice + Send {
    /// Everything a `query-net` shows.
    fn info(&self) -> NetInfo;

    /// The features offered to the driver.
    fn offered_features(&self) -> u64 {
        self.device_features()
    }

    /// The features the driver acked (0 before FEATURES_OK / after reset).
    fn acked_features(&self) -> u64;

    /// The TAP godwit writes frames to, if it holds one.
    fn tap(&self) -> PeerTap {
        PeerTap(None)
    }

    /// The MAC address in the configuration space now.
    fn mac(&self) -> [u8; 6];

    /// Sets the link status the guest sees (management's word; a vhost
    /// device's link is also down while its backend is away).
    fn set_link(&mut self, up: bool);

    /// Makes the guest's presence known on the network after a migration:
    /// the announce status bit when the driver acked GUEST_ANNOUNCE, else
    /// (vhost-user) the backend's RARP. False when neither is possible.
    fn announce(&mut self) -> bool;

    /// Stops the datapath with its state kept (snapshot, migration, `stop`).
    fn pause_datapath(&self) -> Result<(), PauseError>;

    fn resume_datapath(&self);

    /// The device's own guest-visible state (call with the datapath paused).
    fn device_state(&self) -> VirtioNetState;

    /// Puts saved state back into a device that is not active yet.
    fn restore_device_state(&mut self, state: &VirtioNetState);

    /// Why the VM cannot migrate because of this device, beyond the ABI
    /// decision made at start-up (e.g. a vhost backend without dirty logging,
    /// or one that came back with fewer features under strict=off).
    fn blockers(&self) -> Vec<String> {
        Vec::new()
    }

    /// The backend interface version in use (vhost-user).
    fn interface(&self) -> Option<String> {
        None
    }

    fn as_vhost_user(&self) -> Option<&VhostUserNet> {
        None
    }

    fn as_vhost_net(&self) -> Option<&VhostKernelNet> {
        None
    }
}

impl NetModel for VirtioNet {
    fn info(&self) -> NetInfo {
        VirtioNet::info(self)
    }
    fn acked_features(&self) -> u64 {
        VirtioNet::acked_features(self)
    }
    fn tap(&self) -> PeerTap {
        PeerTap(Some(VirtioNet::tap(self).clone()))
    }
    fn mac(&self) -> [u8; 6] {
        VirtioNet::mac(self)
    }
    fn set_link(&mut self, up: bool) {
        VirtioNet::set_link(self, up)
    }
    fn announce(&mut self) -> bool {
        VirtioNet::announce(self)
    }
    fn pause_datapath(&self) -> Result<(), PauseError> {
        VirtioNet::pause_datapath(self)
    }
    fn resume_datapath(&self) {
        VirtioNet::resume_datapath(self)
    }
    fn device_state(&self) -> VirtioNetState {
        VirtioNet::device_state(self)
    }
    fn restore_device_state(&mut self, state: &VirtioNetState) {
        VirtioNet::restore_device_state(self, state)
    }
}

/// The counters of a device as [`NetStats`].
pub(crate) fn counters_snapshot(c: &Counters) -> NetStats {
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

impl PeerTap {
    pub(crate) fn of(tap: &Arc<Tap>) -> Self {
        PeerTap(Some(tap.clone()))
    }
}
