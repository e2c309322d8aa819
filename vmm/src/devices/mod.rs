//! The devices a godwit VM gets: virtio-net devices with their peers, built
//! the same way at boot, restore and incoming migration.

pub mod net;
