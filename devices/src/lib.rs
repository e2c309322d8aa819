//! Devices of a godwit VM: the I/O buses the vCPUs dispatch to, the legacy
//! platform devices (serial console, i8042 reset line), virtio-net on its
//! three peer kinds (TAP, vhost-user, kernel vhost-net) behind the
//! virtio-mmio transport, and the dirty tracking every device answers for
//! live migration ([`dirty_log`]).
//!
//! Every device keeps its guest-visible state in a plain state struct
//! (see [`godwit_migration::persist::Persist`]) so that it can be captured and
//! rebuilt on another host.

pub mod bus;
pub mod console;
pub mod debug_exit;
pub mod dirty_log;
pub mod i8042;
pub mod net;
pub mod pvpanic;
pub mod serial;
pub mod socket_path;
pub mod thread_hook;
pub mod vhost_net;
pub mod vhost_user;
pub mod virtio;

/// Guest memory as every device sees it: mmap'd regions with a dirty bitmap
/// that records the VMM's own writes (needed by live migration).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
