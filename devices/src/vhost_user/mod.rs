//! vhost-user for virtio-net: godwit's frontend (a guest's device whose
//! receive and transmit rings a backend process serves), godwit's own
//! backend (`godwit net-backend`), and backend interface versions with the
//! protocol extension that pins one (docs/vhost-user-interface-versions.md).

pub mod backend;
pub mod conn;
pub mod device;
pub mod interface;
pub mod session;

pub use conn::{Connection, VhostUserError};
pub use device::{
    backend_bits, BackendStatus, Endpoint, Recheck, Rechecker, VhostUserNet, VhostUserNetConfig,
    VhostUserNetError,
};
pub use session::{handshake, BackendOffer, InterfaceInUse, Session};

#[cfg(test)]
mod tests;
