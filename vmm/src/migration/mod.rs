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
//! snapshot container), and waits for the destination to say the guest runs
//! there. Only then does the source end; any failure before that resumes the
//! guest on the source with nothing lost.

mod announce;
mod destination;
mod dirty;
mod handshake;
mod source;
mod transport;

pub use announce::announce;
pub use destination::{incoming, IncomingError};
pub use source::start;
pub use transport::Conn;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use godwit_migration::protocol::ProtocolError;

use crate::vstate::state::KvmCap;

/// Pages per `Pages` message (1 MiB of data).
const BATCH_PAGES: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the other's next message.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
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
    #[error("invalid migration URI '{0}': use tcp:HOST:PORT or unix:PATH")]
    Uri(String),
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
    #[error("a migration is already running")]
    Busy,
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
    #[error("{0}")]
    Local(String),
}

/// `migrate-set-parameters`.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationParams {
    /// The longest the guest may stay stopped, in ms.
    #[serde(rename = "downtime-limit")]
    pub downtime_limit_ms: u64,
    /// Bytes per second; 0 means no limit.
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
    /// Pre-copy rounds before giving up on convergence.
    #[serde(rename = "max-rounds")]
    pub max_rounds: u32,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            max_rounds: 30,
        }
    }
}

/// `query-migrate`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationInfo {
    pub status: &'static str,
    pub rounds: u32,
    #[serde(rename = "total-bytes")]
    pub total_bytes: u64,
    #[serde(rename = "transferred-bytes")]
    pub transferred_bytes: u64,
    #[serde(rename = "remaining-bytes")]
    pub remaining_bytes: u64,
    #[serde(rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    #[serde(rename = "throughput-mbps")]
    pub throughput_mbps: f64,
    #[serde(rename = "expected-downtime-ms")]
    pub expected_downtime_ms: u64,
    #[serde(rename = "downtime-ms", skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    #[serde(rename = "total-time-ms")]
    pub total_time_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The migration side of a VM.
pub struct MigrationState {
    pub params: Mutex<MigrationParams>,
    info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    running: AtomicBool,
    conn: Mutex<Option<Conn>>,
}

impl Default for MigrationState {
    fn default() -> Self {
        MigrationState {
            params: Mutex::new(MigrationParams::default()),
            info: Mutex::new(MigrationInfo {
                status: "none",
                ..Default::default()
            }),
            cancel: AtomicBool::new(false),
            running: AtomicBool::new(false),
            conn: Mutex::new(None),
        }
    }
}

impl MigrationState {
    pub fn info(&self) -> MigrationInfo {
        self.info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// `migrate_cancel`: stops a running migration at its next step, and
    /// breaks off a transfer in progress.
    pub fn cancel(&self) -> bool {
        if !self.running.load(Ordering::SeqCst) {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            c.shutdown();
        }
        true
    }
}
