//! A VM's migration status and tuning, as `query-migrate` and
//! `migrate-set-parameters` see them. Plain data kept with the VM; the
//! migration code in `crate::migration` drives it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

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
    /// `tls_creds` as loaded when it was set.
    #[serde(skip)]
    pub tls_client: Option<crate::migration::ClientCreds>,
    /// With auto-converge: the first throttle, in percent of vCPU time.
    #[serde(rename = "cpu-throttle-initial")]
    pub cpu_throttle_initial: u32,
    /// With auto-converge: added each round that still does not converge.
    #[serde(rename = "cpu-throttle-increment")]
    pub cpu_throttle_increment: u32,
    /// With multifd: how many extra connections carry the pages.
    #[serde(rename = "multifd-channels")]
    pub multifd_channels: u16,
    /// The `auto-converge` capability (migrate-set-capabilities).
    #[serde(skip)]
    pub auto_converge: bool,
    /// The `multifd` capability: pages on `multifd_channels` extra streams.
    #[serde(skip)]
    pub multifd: bool,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            max_rounds: 30,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_client: None,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            multifd_channels: 2,
            auto_converge: false,
            multifd: false,
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
    /// The downtime as the guest sees it: from the source's vCPUs stopping
    /// to the destination's confirmation that its vCPUs run (an upper
    /// bound: it includes that confirmation's trip back).
    #[serde(rename = "downtime-ms", skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Where the downtime went, phase by phase.
    #[serde(rename = "downtime-detail", skip_serializing_if = "Option::is_none")]
    pub downtime_detail: Option<DowntimeDetail>,
    #[serde(rename = "total-time-ms")]
    pub total_time_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How much auto-converge throttles the vCPUs now, in percent.
    #[serde(
        rename = "cpu-throttle-percentage",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_throttle_percentage: Option<u32>,
    /// Pages sent with their contents.
    #[serde(skip)]
    pub normal_pages: u64,
    /// Pages found all zero and sent as such (QEMU's "duplicate").
    #[serde(skip)]
    pub duplicate_pages: u64,
    /// When the migration started; `total-time` counts from it while it
    /// runs.
    #[serde(skip)]
    pub started: Option<Instant>,
    /// When the handshake ended and pre-copy began.
    #[serde(skip)]
    pub setup_ms: Option<f64>,
    /// QEMU's fields, derived from godwit's by [`MigrationState::info`].
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuView>,
}

/// The stop-and-copy's phases on the source, in milliseconds, in order.
/// `source_ms` is the downtime as QEMU defines it (from the vCPUs stopping
/// until the source has sent the last of the state); the destination's
/// restore and the handoff come after it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DowntimeDetail {
    /// Stopping the vCPUs and the device datapaths.
    #[serde(rename = "stop-ms")]
    pub stop_ms: f64,
    /// The last dirty-log sync (KVM and the backends' logs).
    #[serde(rename = "dirty-sync-ms")]
    pub dirty_sync_ms: f64,
    /// Sending the pages dirtied since the last round.
    #[serde(rename = "last-pages-ms")]
    pub last_pages_ms: f64,
    /// Capturing vCPU, VM and device state.
    #[serde(rename = "state-capture-ms")]
    pub state_capture_ms: f64,
    /// Sending the state and `Complete`.
    #[serde(rename = "state-send-ms")]
    pub state_send_ms: f64,
    /// The downtime as QEMU reports it: the sum of the phases above.
    #[serde(rename = "source-ms")]
    pub source_ms: f64,
    /// The destination's restore from the state (its own measure).
    #[serde(rename = "destination-restore-ms")]
    pub destination_restore_ms: f64,
    /// From the state sent to the confirmation that the destination runs,
    /// the destination's restore included.
    #[serde(rename = "handoff-ms")]
    pub handoff_ms: f64,
}

/// `query-migrate` as QEMU shapes it (times in ms).
#[derive(Clone, Debug, Serialize)]
pub struct QemuView {
    #[serde(rename = "total-time")]
    pub total_time: u64,
    #[serde(rename = "setup-time")]
    pub setup_time: u64,
    #[serde(rename = "expected-downtime")]
    pub expected_downtime: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    pub ram: RamView,
}

/// QEMU's `ram` block of `query-migrate`.
#[derive(Clone, Debug, Serialize)]
pub struct RamView {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    #[serde(rename = "normal-bytes")]
    pub normal_bytes: u64,
    #[serde(rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    pub mbps: f64,
    #[serde(rename = "dirty-sync-count")]
    pub dirty_sync_count: u32,
    #[serde(rename = "page-size")]
    pub page_size: u64,
}

const PAGE_SIZE: u64 = 4096;

impl MigrationInfo {
    fn qemu_view(&self) -> Option<QemuView> {
        if self.status == "none" {
            return None;
        }
        let running = matches!(self.status, "setup" | "active" | "device");
        let total_ms = match (running, self.started) {
            (true, Some(t)) => t.elapsed().as_secs_f64() * 1e3,
            _ => self.total_time_ms,
        };
        Some(QemuView {
            total_time: total_ms as u64,
            setup_time: self
                .setup_ms
                .unwrap_or(if running { total_ms } else { 0.0 }) as u64,
            expected_downtime: self.expected_downtime_ms,
            // QEMU's downtime ends when its source has sent the last of
            // the state: report godwit's the same way when it is known.
            downtime: self
                .downtime_detail
                .as_ref()
                .map(|d| d.source_ms)
                .or(self.downtime_ms)
                .map(|d| d as u64),
            ram: RamView {
                transferred: self.transferred_bytes,
                remaining: self.remaining_bytes,
                total: self.total_bytes,
                duplicate: self.duplicate_pages,
                normal: self.normal_pages,
                normal_bytes: self.normal_pages * PAGE_SIZE,
                dirty_pages_rate: self.dirty_pages_rate,
                mbps: self.throughput_mbps,
                dirty_sync_count: self.rounds,
                page_size: PAGE_SIZE,
            },
        })
    }
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
    /// The status with QEMU's fields filled in.
    pub fn info(&self) -> MigrationInfo {
        let mut info = self
            .info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        info.qemu = info.qemu_view();
        info
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_carries_qemus_fields_next_to_godwits() {
        let state = MigrationState::default();
        let none = serde_json::to_value(state.info()).unwrap();
        assert_eq!(none["status"], "none");
        assert!(none.get("ram").is_none(), "{none}");
        state.update(|i| {
            *i = MigrationInfo {
                status: "completed",
                rounds: 3,
                total_bytes: 1 << 30,
                transferred_bytes: 5 << 20,
                normal_pages: 1200,
                duplicate_pages: 40,
                throughput_mbps: 800.0,
                downtime_ms: Some(12.6),
                total_time_ms: 250.4,
                setup_ms: Some(3.2),
                ..Default::default()
            }
        });
        let v = serde_json::to_value(state.info()).unwrap();
        assert_eq!(v["total-time"], 250);
        assert_eq!(v["downtime"], 12);
        assert_eq!(v["setup-time"], 3);
        // With the phases known, QEMU's field takes QEMU's definition (until
        // the source sent the state) and godwit's keeps the guest's view.
        state.update(|i| {
            i.downtime_detail = Some(DowntimeDetail {
                source_ms: 2.4,
                ..Default::default()
            })
        });
        let v = serde_json::to_value(state.info()).unwrap();
        assert_eq!(v["downtime"], 2);
        assert_eq!(v["downtime-ms"], 12.6);
        assert_eq!(v["downtime-detail"]["source-ms"], 2.4);
        assert_eq!(v["expected-downtime"], 0);
        assert_eq!(v["ram"]["transferred"], 5 << 20);
        assert_eq!(v["ram"]["total"], 1u64 << 30);
        assert_eq!(v["ram"]["normal"], 1200);
        assert_eq!(v["ram"]["duplicate"], 40);
        assert_eq!(v["ram"]["mbps"], 800.0);
        assert_eq!(v["ram"]["dirty-sync-count"], 3);
        // godwit's own stay.
        assert_eq!(v["rounds"], 3);
        assert_eq!(v["total-time-ms"], 250.4);
    }
}
