//! Live migration as the tests watch it: waiting for its outcome and
//! checking the guest continues where it stopped.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::heartbeat;
use crate::{QmpClient, RunningVm};

/// Waits until query-migrate reports a final status; returns the info.
pub fn wait_migration(qmp: &mut QmpClient, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        match qmp.execute("query-migrate", Value::Null) {
            Ok(info) => {
                let status = info["status"].as_str().unwrap_or("").to_string();
                last = info;
                if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                    return last;
                }
            }
            // The source exits right after completing.
            Err(_) => return json!({"status": "completed", "source-exited": true, "last": last}),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("migration did not end within {timeout:?}: {last}");
}

/// After a completed migration from `src` (which has exited) to `dst`:
/// the heartbeat counter goes on by one on `dst`. Returns its first value
/// there.
pub fn assert_heartbeat_continues(src: &RunningVm, dst: &mut RunningVm) -> u64 {
    let last_on_a = src.last_heartbeat();
    let first_on_b = heartbeat(&dst.wait_prefix("heartbeat ", Duration::from_secs(20)));
    assert_eq!(
        first_on_b,
        last_on_a + 1,
        "heartbeat continues on the destination"
    );
    first_on_b
}
