//! A VM's migration status and tuning, as `query-migrate` and
//! `migrate-set-parameters` see them. Plain data kept with the VM; the
//! migration code in `crate::migration` drives it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

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
    /// Directory of TLS credentials (QEMU's tls-creds-x509 layout) for
    /// `tls:` URIs; empty: none.
    #[serde(rename = "tls-creds")]
    pub tls_creds: String,
    /// The name the destination's certificate must carry; empty: the URI's
    /// host.
    #[serde(rename = "tls-hostname")]
    pub tls_hostname: String,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            max_rounds: 30,
            tls_creds: String::new(),
            tls_hostname: String::new(),
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
    pub(crate) cancel: AtomicBool,
    pub(crate) running: AtomicBool,
    /// Breaks off the transfer in progress (shuts its stream down).
    breaker: Mutex<Option<Box<dyn Fn() + Send>>>,
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
            breaker: Mutex::new(None),
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

    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// `migrate_cancel`: stops a running migration at its next step, and
    /// breaks off a transfer in progress.
    pub fn cancel(&self) -> bool {
        if !self.running.load(Ordering::SeqCst) {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(break_off) = self
            .breaker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            break_off();
        }
        true
    }

    /// What `cancel` calls to break off the transfer (None once it ended).
    pub(crate) fn set_breaker(&self, breaker: Option<Box<dyn Fn() + Send>>) {
        *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) = breaker;
    }
}
