//! vhost-user for virtio-net: godwit's frontend (a guest's device whose
//! receive and transmit rings a backend process serves), godwit's own
//! backend (`godwit net-backend`), and backend interface versions with the
//! protocol extension that pins one (docs/vhost-user-interface-versions.md).
//!
//! Everything here reads a peer's messages or a guest's rings: no cast may
//! silently truncate a value from them.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub mod backend;
pub mod conn;
pub mod device;
pub mod endpoint;
pub mod interface;
mod link;
pub mod relay;
pub mod session;

pub use conn::{Connection, VhostUserError};
pub use device::{VhostUserNet, VhostUserNetConfig, VhostUserNetError};
pub use endpoint::Endpoint;
pub use link::{backend_bits, Recheck, Rechecker};
pub use session::{handshake, BackendOffer, BackendStatus, InterfaceInUse, Session};

#[cfg(test)]
mod tests;
