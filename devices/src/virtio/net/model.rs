//! What the VMM asks of a virtio-net device whatever carries its packets: a
//! TAP served by godwit's own datapath ([`super::VirtioNet`]), a vhost-user
//! backend (`vhost_user::VhostUserNet`) or kernel vhost-net
//! (`vhost_net::VhostKernelNet`). Each model answers every question itself,
//! so the VMM never asks which kind a device is.

use std::io;
use std::sync::Arc;

use super::frontend::{NetFrontend, PeerInfo};
use super::{NetInfo, VirtioNetState};
use crate::dirty_log::DirtyTracking;
use crate::net::{Tap, TapOffloads};
use crate::vhost_user::session::{BackendStatus, InterfaceInUse};
use crate::virtio::pause::PauseError;
use crate::virtio::Features;
use crate::virtio::VirtioDevice;

/// The TAP a device's frames leave through when godwit holds it (TAP and
/// vhost-net peers); a vhost-user device's frames are sent by its backend.
#[derive(Clone, Debug)]
pub struct PeerTap(Option<Arc<Tap>>);

impl PeerTap {
    pub(crate) fn of(tap: &Arc<Tap>) -> Self {
        PeerTap(Some(tap.clone()))
    }

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

/// What `query-net` shows about a device's peer, by kind.
#[derive(Clone, Debug)]
pub enum PeerStatus {
    /// godwit's datapath on a TAP.
    Tap {
        vnet_hdr: bool,
        offloads: TapOffloads,
    },
    /// Kernel vhost-net on a TAP.
    VhostNet {
        tap: String,
        vnet_hdr: bool,
        /// VHOST_GET_FEATURES.
        kernel_features: Features,
        /// Whether the kernel can log the pages it writes, else why not.
        dirty_log: Result<(), String>,
    },
    /// A vhost-user backend.
    VhostUser {
        backend: Box<BackendStatus>,
        /// Whether the backend can log the pages it writes, else why not.
        dirty_log: Result<(), String>,
        interface: Option<InterfaceInUse>,
    },
}

/// A virtio-net device model (its virtio side is [`VirtioDevice`], its
/// migration side [`DirtyTracking`]). The defaults answer from the shared
/// frontend; a model overrides what its datapath changes.
pub trait NetModel: VirtioDevice + DirtyTracking + Send {
    /// The guest-visible side every model shares.
    #[doc(hidden)]
    fn frontend(&self) -> &NetFrontend;

    /// The peer's part of [`Self::info`].
    #[doc(hidden)]
    fn peer_info(&self) -> PeerInfo;

    /// Everything a `query-net` shows.
    fn info(&self) -> NetInfo {
        self.frontend().info(self.peer_info())
    }

    /// What `query-net` shows about the peer.
    fn peer_status(&self) -> PeerStatus;

    /// The features offered to the driver.
    fn offered_features(&self) -> Features {
        self.frontend().offered()
    }

    /// The features the driver acked (0 before FEATURES_OK / after reset).
    fn acked_features(&self) -> Features {
        self.frontend().acked()
    }

    /// The TAP godwit writes frames to, if it holds one.
    fn tap(&self) -> PeerTap {
        PeerTap(None)
    }

    /// The MAC address in the configuration space now.
    fn mac(&self) -> [u8; 6] {
        self.frontend().mac()
    }

    /// Sets the link status the guest sees (management's word; a vhost-user
    /// device's link is also down while its backend is away).
    fn set_link(&mut self, up: bool) {
        self.frontend().set_link(up)
    }

    /// Makes the guest's presence known on the network after a migration:
    /// the announce status bit when the driver acked GUEST_ANNOUNCE, else
    /// (vhost-user) the backend's RARP. False when neither is possible.
    fn announce(&mut self) -> bool {
        self.frontend().announce()
    }

    /// Stops the datapath with its state kept (snapshot, migration, `stop`).
    fn pause_datapath(&self) -> Result<(), PauseError>;

    fn resume_datapath(&self);

    /// The device's own guest-visible state (call with the datapath paused).
    fn device_state(&self) -> VirtioNetState {
        self.frontend().device_state()
    }

    /// Puts saved state back into a device that is not active yet.
    fn restore_device_state(&mut self, state: &VirtioNetState) {
        self.frontend().restore_device_state(state)
    }

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
}

/// The [`VirtioDevice`] methods every model answers from its frontend
/// (field `$front`), expanded inside each model's `impl VirtioDevice`.
macro_rules! virtio_frontend_methods {
    ($front:ident) => {
        fn device_type(&self) -> u32 {
            $crate::virtio::net::VIRTIO_ID_NET
        }

        fn queue_max_sizes(&self) -> &[u16] {
            self.$front.queue_max_sizes()
        }

        fn device_features(&self) -> $crate::virtio::Features {
            self.$front.offered()
        }

        fn ack_features(&mut self, features: $crate::virtio::Features) {
            self.$front.ack_features(features)
        }

        fn read_config(&self, offset: u64, data: &mut [u8]) {
            self.$front.read_config(offset, data)
        }

        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.$front.write_config(offset, data)
        }

        fn is_active(&self) -> bool {
            self.$front.is_active()
        }
    };
}
pub(crate) use virtio_frontend_methods;
