//! `godwit ctl`: one command to a running godwit's management API, plus
//! `snapshot DIR` (snapshot-save) and `migrate URI` with progress.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::api::{ClientError, QmpClient};

#[derive(Args)]
pub struct CtlArgs {
    /// The socket given to `godwit run --api-socket`.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// A QMP command, e.g. query-status, stop, cont, quit.
    command: String,
    /// The command's arguments as a JSON object.
    json_args: Option<String>,
}

/// The one line `godwit ctl migrate` ends with, from a completed
/// query-migrate (or the info of the `completed` MIGRATION event).
fn summary(info: &serde_json::Value) -> String {
    if info.is_null() {
        return "migration completed: the guest runs on the destination".into();
    }
    let bytes = info["transferred-bytes"].as_u64().unwrap_or(0);
    let ms = info["total-time-ms"].as_f64().unwrap_or(0.0);
    let downtime = info["downtime-ms"]
        .as_f64()
        .map_or("unknown".to_string(), |d| format!("{d:.1} ms"));
    format!(
        "migration completed: total time {ms:.0} ms, downtime {downtime}, {:.1} MiB sent in {} rounds, {:.0} Mbit/s",
        bytes as f64 / f64::from(1 << 20),
        info["rounds"].as_u64().unwrap_or(0),
        bytes as f64 * 8.0 / 1e3 / ms.max(1e-3)
    )
}

/// `godwit ctl migrate URI`: starts a migration and shows its progress
/// until it ends; fails when the migration fails.
fn ctl_migrate(socket: &Path, uri: &str) -> Result<String, ClientError> {
    let mut client = QmpClient::connect(socket, Duration::from_secs(10))?;
    client.execute("migrate", serde_json::json!({ "uri": uri }))?;
    let mut last = serde_json::Value::Null;
    loop {
        let info = match client.execute("query-migrate", serde_json::Value::Null) {
            Ok(info) => info,
            // The source ends once the destination runs the guest; its
            // MIGRATION events reach us before the socket closes.
            Err(e) => {
                let mut events = client.take_events();
                while let Ok(ev) = client.wait_event("MIGRATION", Duration::from_millis(500)) {
                    events.push(ev);
                }
                let completed = events
                    .iter()
                    .find(|ev| ev["event"] == "MIGRATION" && ev["data"]["status"] == "completed");
                if let Some(ev) = completed {
                    return Ok(summary(&ev["data"]["info"]));
                }
                if last["status"] == "completed" {
                    return Ok(summary(&last));
                }
                return Err(e);
            }
        };
        let status = info["status"].as_str().unwrap_or("?").to_string();
        let line = format!(
            "{status}: round {}, {} MiB sent, {} MiB remaining, {:.0} Mbit/s, expected downtime {} ms",
            info["rounds"],
            info["transferred-bytes"].as_u64().unwrap_or(0) >> 20,
            info["remaining-bytes"].as_u64().unwrap_or(0) >> 20,
            info["throughput-mbps"].as_f64().unwrap_or(0.0),
            info["expected-downtime-ms"]
        );
        super::report(&line);
        match status.as_str() {
            "completed" => return Ok(summary(&info)),
            // postmigrate: the outcome is unknown; the error says what to do.
            "failed" | "cancelled" | "postmigrate" => {
                return Err(ClientError::Qmp {
                    class: "GenericError".into(),
                    desc: format!(
                        "migration {status}: {}",
                        info["error"].as_str().unwrap_or("")
                    ),
                })
            }
            _ => {}
        }
        last = info;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `godwit ctl`: QMP commands, plus `snapshot DIR` for snapshot-save and
/// `migrate URI` with progress.
fn ctl(args: &CtlArgs) -> Result<String, ClientError> {
    if args.command == "migrate" {
        if let Some(uri) = args
            .json_args
            .as_deref()
            .filter(|a| !a.trim_start().starts_with('{'))
        {
            return ctl_migrate(&args.api_socket, uri);
        }
    }
    if args.command == "snapshot" {
        if let Some(dir) = args
            .json_args
            .as_deref()
            .filter(|a| !a.trim_start().starts_with('{'))
        {
            let json = serde_json::json!({ "dir": dir }).to_string();
            return crate::api::run_ctl(&args.api_socket, "snapshot-save", Some(&json));
        }
    }
    crate::api::run_ctl(&args.api_socket, &args.command, args.json_args.as_deref())
}

pub fn execute(args: &CtlArgs) -> Result<u8, super::Error> {
    let out = ctl(args)?;
    super::print_out(&format!("{out}\n"))?;
    Ok(super::EXIT_SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_has_time_downtime_bytes_rounds_and_throughput() {
        let info = serde_json::json!({
            "status": "completed", "total-time-ms": 2000.0, "downtime-ms": 12.34,
            "transferred-bytes": 250u64 << 20, "rounds": 4,
        });
        assert_eq!(
            summary(&info),
            "migration completed: total time 2000 ms, downtime 12.3 ms, 250.0 MiB sent in 4 rounds, 1049 Mbit/s"
        );
    }
}
