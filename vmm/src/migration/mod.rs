//! Live migration between two hosts.
//!
//! The source first sends a `Hello` describing the VM (machine type, memory,
//! vCPUs and their CPUID, KVM needs, every device's peer kind and features
//! offered and acked); the destination probes its own peers and answers with
//! every reason to refuse, and the source checks what the destination
//! reports too. Any mismatch ends the migration before a single page is sent:
//! the guest on the source never paused.
//!
//! Then pre-copy: all non-zero pages, then rounds of the pages dirtied since
//! (KVM's dirty log and godwit's own writes to guest memory) until what
//! remains fits the downtime limit. The source then pauses vCPUs and device
//! datapaths, sends the last pages and the device and vCPU state (the
//! snapshot container), and hands the guest over with a commit handshake
//! that leaves at most one running copy whatever message is lost (see
//! `source`): any failure before the source commits resumes the guest on
//! the source with nothing lost; after it, the source never resumes on its
//! own unless the destination said it will not run the guest, and an
//! unknown outcome leaves the source paused in `postmigrate`.

pub mod announce;
mod destination;
mod dirty;
mod handshake;
mod multifd;
mod source;
mod status;
mod throttle;
mod tls;
mod transport;

pub use destination::{incoming, IncomingError};
pub use source::start;
pub use tls::{ClientCreds, Refusal, TlsError};
pub use transport::Conn;

use std::time::Duration;

use godwit_migration::protocol::ProtocolError;

use crate::vstate::state::KvmCap;

/// Pages per `Pages` message (1 MiB of data).
const BATCH_PAGES: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the other's next message (the
/// destination waits this long for `Go` before it gives up on running).
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a source that sent `Go` waits for `Resumed` (or the
/// destination's refusal): longer than the destination waits for `Go`, so
/// that a destination that gave up is heard before the source gives up.
const HANDOFF_WAIT: Duration = Duration::from_secs(75);
const KVM_CAPS_CHECKED: [KvmCap; 10] = [
    KvmCap::Irqchip,
    KvmCap::Pit2,
    KvmCap::PitState2,
    KvmCap::AdjustClock,
    KvmCap::ExtCpuid,
    KvmCap::MpState,
    KvmCap::VcpuEvents,
    KvmCap::Debugregs,
    KvmCap::Xsave,
    KvmCap::Xcrs,
];

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("invalid migration URI '{0}': use tls:HOST:PORT, tcp:HOST:PORT or unix:PATH")]
    Uri(String),
    #[error("{0} needs TLS credentials: set them first with migrate-set-parameters {{\"tls-creds\": DIR}} (QEMU's tls-creds-x509 layout)")]
    TlsCredsMissing(String),
    #[error("--incoming {0} needs --tls-dir DIR (QEMU's tls-creds-x509 layout)")]
    TlsDirMissing(String),
    #[error("--tls-dir is only for --incoming tls:ADDR:PORT, not {0}")]
    TlsDirUnused(String),
    #[error("the source {0} speaks TLS but this destination listens on plaintext tcp:; start it with --incoming tls:ADDR:PORT --tls-dir DIR")]
    TlsOnPlain(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot connect to {uri}: {source}; is `godwit run --incoming {uri}` running there?")]
    Connect { uri: String, source: std::io::Error },
    #[error("cannot listen on {uri}: {source}")]
    Listen { uri: String, source: std::io::Error },
    #[error(transparent)]
    ListenPath(#[from] godwit_devices::socket_path::SocketPathError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the destination refused the VM:\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    #[error("the destination cannot run this VM:\n  - {}", .0.join("\n  - "))]
    DestinationLacks(Vec<String>),
    #[error("the VM cannot migrate: {}", .0.join("; "))]
    Blocked(Vec<String>),
    #[error(transparent)]
    Busy(#[from] crate::machine::Busy),
    #[error("the VM is in postmigrate: its last migration may have left the guest running on the destination; check there, and resume it here first (cont with force) if it does not run there")]
    PostMigrate,
    #[error("the destination was told to run the guest but did not confirm ({0}): whether it runs the guest there is unknown, so it stays paused here in postmigrate. Check the destination host: if its godwit runs the guest, this one is done (quit it); if not (the process exited or never logged 'vCPUs released'), resume the guest here with cont and {{\"force\": true}}")]
    OutcomeUnknown(#[source] ProtocolError),
    #[error("the destination received the VM but will not run it ({0}); the guest resumes here")]
    Declined(#[source] ProtocolError),
    #[error("the migration was cancelled")]
    Cancelled,
    #[error("the guest dirties memory faster than the link carries it: after {rounds} rounds {remaining_mib} MiB still remained ({dirty_mib_s:.1} MiB/s dirtied, {throughput_mib_s:.1} MiB/s sent), which would stop the guest for about {expected_ms} ms against a limit of {limit_ms} ms; raise downtime-limit or max-bandwidth with migrate-set-parameters, or lower the guest's load")]
    NotConverging {
        rounds: u32,
        remaining_mib: u64,
        dirty_mib_s: f64,
        throughput_mib_s: f64,
        expected_ms: u64,
        limit_ms: u64,
    },
    #[error("multifd needs a tcp: or tls: URI, not {0}: turn the multifd capability off for unix: migrations")]
    MultifdUnix(String),
    #[error("{source} (on multifd channel {channel})")]
    Channel {
        channel: u16,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} ended unexpectedly (it panicked, or its channel closed)")]
    ThreadEnded(String),
    #[error("reading guest page {gpa:#x}: {source}")]
    GuestPage {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("reading KVM's dirty log of memory slot {slot}: {source}")]
    KvmDirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("turning KVM's dirty logging {}: {source}", if *.on { "on" } else { "off" })]
    DirtyLogging {
        on: bool,
        #[source]
        source: crate::vstate::vm::VmError,
    },
    #[error("capturing the VM's state: {0}")]
    Capture(#[source] crate::persist::snapshot::SnapshotError),
    #[error("{device}: {source}")]
    DeviceLog {
        device: String,
        #[source]
        source: godwit_devices::dirty_log::DirtyLogError,
    },
}

impl MigrateError {
    /// An I/O error of godwit's own (not the peer's), with what it was doing.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
        let what = what.into();
        move |source| MigrateError::Io { what, source }
    }
}
