//! What a device thread runs first: the VMM installs a hook here (its
//! seccomp filters) so that devices need not know how threads are confined.

use std::sync::OnceLock;

/// The kinds of thread the devices start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceThread {
    /// A virtio-net TAP datapath worker (`gw-net-*`).
    NetDatapath,
    /// A virtio-net control-queue worker (`gw-ctrl-*`).
    NetCtrl,
    /// The vhost-user frontend's monitor of its backend (`gw-vhost-mon`).
    VhostUserMonitor,
    /// The console writer (`console`).
    Console,
    /// The short-lived thread that enters a TAP's network namespace.
    TapNamespace,
}

static HOOK: OnceLock<fn(DeviceThread)> = OnceLock::new();

/// Sets the hook every device thread calls before it touches guest or peer
/// data. Only the first call counts: the hook is process-wide.
pub fn set_hook(hook: fn(DeviceThread)) {
    let _ = HOOK.set(hook);
}

/// Called by a device thread first thing.
pub(crate) fn started(kind: DeviceThread) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}
