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

/// The last complete heartbeat among a VM's console lines. A pause (stop,
/// migration) can cut the line being printed: the console then ends with
/// its start, e.g. `heartbeat 5` of `heartbeat 50`, which does not follow
/// the heartbeat before it and is passed over.
pub fn last_complete_heartbeat(seen: &[String]) -> u64 {
    let mut beats = seen
        .iter()
        .rev()
        .filter(|l| l.starts_with("heartbeat "))
        .filter_map(|l| l.trim().strip_prefix("heartbeat ")?.parse::<u64>().ok());
    let last = beats.next().expect("a heartbeat line on the console");
    match beats.next() {
        Some(before) if last != before + 1 => before,
        _ => last,
    }
}

/// Checks that `next` (restored, or the migration destination) goes on
/// from heartbeat `last`; returns its first complete heartbeat. When the
/// pause cut `heartbeat {last + 1}` in two, `next` prints the rest of it
/// first, and its first complete heartbeat is `last + 2`.
pub fn assert_heartbeat_follows(last: u64, next: &mut RunningVm) -> u64 {
    let cut = format!("heartbeat {}", last + 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first_line = true;
    let mut completed_cut = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = next.try_line(left) else {
            panic!(
                "no heartbeat after {last} within 30 s; console:\n{}",
                next.seen.join("\n")
            );
        };
        if line.starts_with("heartbeat ") {
            let n = heartbeat(&line);
            let want = if completed_cut { last + 2 } else { last + 1 };
            assert_eq!(n, want, "the heartbeat continues from {last}");
            return n;
        }
        let rest = line.trim_end();
        if first_line && !rest.is_empty() && rest.len() < cut.len() && cut.ends_with(rest) {
            completed_cut = true;
        }
        first_line = false;
    }
}

/// After a completed migration from `src` (which has exited) to `dst`:
/// the heartbeat counter goes on by one on `dst`. Returns its first value
/// there.
pub fn assert_heartbeat_continues(src: &RunningVm, dst: &mut RunningVm) -> u64 {
    assert_heartbeat_follows(last_complete_heartbeat(&src.seen), dst)
}
