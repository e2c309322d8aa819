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

/// The last heartbeat among a VM's console lines printed whole (see
/// [`RunningVm::complete_lines`]).
pub fn last_complete_heartbeat(lines: &[String]) -> u64 {
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("heartbeat "))
        .map(|l| heartbeat(l))
        .expect("a heartbeat line on the console")
}

/// Where a VM that has ended left its console: the last heartbeat it
/// printed whole, and the line its pause cut (see [`RunningVm::cut_line`]).
pub struct ConsoleEnd {
    pub last: u64,
    pub cut: String,
}

/// Waits for `vm`'s output to end (it has exited or is exiting).
pub fn console_end(vm: &mut RunningVm) -> ConsoleEnd {
    let cut = vm.cut_line(Duration::from_secs(20));
    ConsoleEnd {
        last: last_complete_heartbeat(vm.complete_lines()),
        cut,
    }
}

/// Checks that `next` (restored, or the migration destination) goes on
/// from `from`, character for character: its first line completes the cut
/// one, and the heartbeats that follow count on by one. Returns the first
/// heartbeat `next` printed whole.
pub fn assert_heartbeat_follows(from: &ConsoleEnd, next: &mut RunningVm) -> u64 {
    let ConsoleEnd { last, cut } = from;
    let last = *last;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut want = last + 1;
    let mut first_line = true;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = next.try_line(left) else {
            panic!(
                "no heartbeat after {last} within 30 s; console:\n{}",
                next.seen.join("\n")
            );
        };
        let completes_cut = first_line && !cut.is_empty();
        let line = if first_line {
            format!("{cut}{line}")
        } else {
            line
        };
        first_line = false;
        if !line.starts_with("heartbeat ") {
            continue;
        }
        let n = line
            .trim()
            .strip_prefix("heartbeat ")
            .and_then(|n| n.parse::<u64>().ok());
        assert_eq!(
            n,
            Some(want),
            "the heartbeat does not go on from {last}: {line:?}{}; console after the pause:\n{}",
            if completes_cut {
                format!(" (the cut {cut:?} completed)")
            } else {
                String::new()
            },
            next.seen.join("\n")
        );
        if !completes_cut {
            return want;
        }
        want += 1;
    }
}

/// After a completed migration from `src` (which exits) to `dst`: the
/// console goes on where the source's stopped. Returns the first heartbeat
/// `dst` printed whole.
pub fn assert_heartbeat_continues(src: &mut RunningVm, dst: &mut RunningVm) -> u64 {
    assert_heartbeat_follows(&console_end(src), dst)
}
