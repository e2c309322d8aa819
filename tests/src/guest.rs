//! The built-in test guest as the tests drive it: its serve-mode command
//! line, starting it, and reading what its console and godwit print.

use std::path::Path;
use std::time::Duration;

use crate::RunningVm;

/// How long a guest may take to boot and report on a loaded machine.
pub const BOOT: Duration = Duration::from_secs(60);

/// The command line of a guest that serves UDP echo and prints
/// `heartbeat N` every `heartbeat_ms`; `params` adds more (its `ip=`, ...).
pub fn serve_cmdline(heartbeat_ms: u32, params: &str) -> String {
    format!("console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms={heartbeat_ms} {params}")
}

/// Starts `godwit run ARGS --net NET --cmdline CMDLINE`, with
/// `--api-socket API` when given, inside namespace `ns` when given, and
/// waits until the guest serves.
pub fn spawn_serving(
    ns: Option<&str>,
    args: &[&str],
    net: &str,
    cmdline: &str,
    api: Option<&Path>,
) -> RunningVm {
    spawn_serving_env(ns, args, net, cmdline, api, &[])
}

/// [`spawn_serving`] with `env` added to godwit's environment (test hooks).
pub fn spawn_serving_env(
    ns: Option<&str>,
    args: &[&str],
    net: &str,
    cmdline: &str,
    api: Option<&Path>,
    env: &[(&str, &str)],
) -> RunningVm {
    let mut argv = vec!["run"];
    argv.extend_from_slice(args);
    argv.extend(["--net", net, "--cmdline", cmdline]);
    let api = api.map(|p| p.to_str().expect("API socket path is UTF-8"));
    if let Some(api) = api {
        argv.extend(["--api-socket", api]);
    }
    let mut vm = RunningVm::spawn_env(ns, &argv, env);
    vm.wait_line("serve: ready", BOOT);
    vm
}

/// The counter of a `heartbeat N` console line.
pub fn heartbeat(line: &str) -> u64 {
    line.trim()
        .strip_prefix("heartbeat ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"))
}

/// The hexadecimal `key=0x...` field of a console line (the device's
/// `offered=`, `acked=`).
pub fn hex_field(line: &str, key: &str) -> u64 {
    let v = line
        .split(&format!("{key}=0x"))
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key}= in {line}"));
    u64::from_str_radix(v, 16).unwrap()
}

/// The `--net ...` line of remedy `n` in a strict refusal message.
pub fn remedy_line(stderr: &str, n: usize) -> Option<String> {
    let mut lines = stderr
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(&format!("{n}. ")));
    lines.next()?;
    lines.next().map(|l| l.trim().to_string())
}

impl RunningVm {
    /// The counter of the last heartbeat line printed whole so far.
    pub fn last_heartbeat(&self) -> u64 {
        crate::migrate::last_complete_heartbeat(self.complete_lines())
    }
}
