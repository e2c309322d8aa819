//! The `godwit` command: one module per subcommand, each with its clap
//! arguments and the glue that runs it. `main.rs` parses, calls
//! [`Command::execute`] and turns the outcome into the exit status; the
//! statuses are documented in the README.

pub mod acpi_dump;
pub mod ctl;
pub mod host_caps;
pub mod machines;
pub mod net_backend;
pub mod plan;
pub mod probe;
pub mod run;

use std::io::Write;

use clap::{Parser, Subcommand};

/// Exit statuses, documented in the README.
pub const EXIT_SUCCESS: u8 = 0;
pub const EXIT_START_FAILED: u8 = 1;
pub const EXIT_GUEST_FAILED: u8 = 3;
pub const EXIT_STRICT_REFUSAL: u8 = 4;
/// The guest kernel reported a panic through pvpanic. Even, so that no
/// debug-exit status (always odd) can be taken for it.
pub const EXIT_GUEST_PANICKED: u8 = 6;
/// `--timeout` ran out; the number `timeout(1)` uses.
pub const EXIT_TIMEOUT: u8 = 124;
/// Standard output was closed before the output was written (`| head`):
/// 128 + SIGPIPE, what a shell shows for a process the signal killed.
pub const EXIT_OUTPUT_CLOSED: u8 = 141;
/// `godwit plan`: no common ABI exists (or the VM cannot migrate to some host).
pub const EXIT_NO_COMMON_ABI: u8 = crate::planning::planner::EXIT_NO_COMMON_ABI;

#[derive(Parser)]
#[command(
    name = "godwit",
    version,
    about = "A minimal VMM on KVM whose virtio-net ABI is explicit, checked and portable"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a VM (the built-in test guest unless --kernel is given).
    Run(run::RunArgs),
    /// Send one command to a running godwit's management API and print the result.
    Ctl(ctl::CtlArgs),
    /// List the machine types, the alias, and what each version adds.
    Machines,
    /// Report what a network peer supports, without starting a VM.
    Probe(probe::ProbeArgs),
    /// godwit's vhost-user net backend: forwards a frontend's rings to a TAP.
    NetBackend(net_backend::NetBackendArgs),
    /// Report this host's capabilities (godwit, KVM, CPUID, network peers) as versioned JSON for `godwit plan`.
    HostCaps(host_caps::HostCapsArgs),
    /// From host-caps reports: how to start a VM so it can migrate between those hosts (or, with --vm, whether an existing VM can).
    Plan(plan::PlanArgs),
    /// Write the ACPI tables a VM would get to a directory (for iasl).
    #[command(hide = true)]
    AcpiDump(acpi_dump::AcpiDumpArgs),
}

impl Command {
    /// Runs the subcommand: `Ok` with the exit status of a normal end (a
    /// plan without a common ABI is one), `Err` when it failed.
    pub fn execute(self) -> Result<u8, Error> {
        match self {
            Command::Run(args) => run::execute(args),
            Command::Ctl(args) => ctl::execute(&args),
            Command::Machines => machines::execute(),
            Command::Probe(args) => probe::execute(&args),
            Command::NetBackend(args) => net_backend::execute(args),
            Command::HostCaps(args) => host_caps::execute(&args),
            Command::Plan(args) => plan::execute(&args),
            Command::AcpiDump(args) => acpi_dump::execute(&args),
        }
    }
}

/// How a subcommand failed; the message is the line godwit prints on
/// standard error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("godwit: error: {0}")]
    Run(#[from] run::RunError),
    #[error("godwit: guest failed: {0}")]
    Guest(#[source] crate::vstate::events::VcpuExitError),
    #[error("godwit: guest panicked: the guest kernel reported a panic through pvpanic (its console shows why)")]
    GuestPanicked,
    #[error("godwit: timeout: the VM ran for {} (--timeout) and was stopped", humanize(*.0))]
    TimedOut(std::time::Duration),
    #[error("godwit: {0}")]
    Ctl(#[from] crate::api::ClientError),
    #[error("godwit: error: {0}")]
    Probe(#[from] crate::devices::net::NetSetupError),
    #[error("godwit net-backend: error: {0}")]
    NetBackend(#[from] net_backend::NetBackendError),
    #[error("godwit host-caps: error: {0}")]
    HostCaps(#[from] host_caps::HostCapsError),
    #[error("godwit plan: error: {0}")]
    Plan(#[from] plan::PlanCliError),
    #[error("godwit acpi-dump: error: {0}")]
    AcpiDump(#[from] acpi_dump::AcpiDumpError),
    #[error("godwit: cannot write to standard output: {0}")]
    Output(#[source] std::io::Error),
}

impl Error {
    /// The exit status this failure ends `godwit` with.
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Run(e) if e.is_strict_refusal() => EXIT_STRICT_REFUSAL,
            Error::Guest(_) => EXIT_GUEST_FAILED,
            Error::GuestPanicked => EXIT_GUEST_PANICKED,
            Error::TimedOut(_) => EXIT_TIMEOUT,
            Error::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OUTPUT_CLOSED,
            _ => EXIT_START_FAILED,
        }
    }
}

/// `30s`, `5m`, `250ms`, as `--timeout` takes them.
fn humanize(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// Standard error that never fails: a closed or full stderr must not take
/// down a thread that logs (a vCPU thread, say); the lines are lost instead.
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Prints one line on stderr, ignoring a broken stderr.
pub fn report(line: impl std::fmt::Display) {
    let _ = writeln!(LossyStderr, "{line}");
}

/// Prints how a subcommand failed, except when its reader went away
/// (`godwit machines | head -c1`): that ends the command quietly.
pub fn report_error(e: &Error) {
    if e.exit_status() != EXIT_OUTPUT_CLOSED {
        report(e);
    }
}

/// Prints on stdout and flushes, so that a closed stdout shows here as an
/// error (Rust ignores SIGPIPE: the write fails with EPIPE) and not as a
/// panic at exit.
pub(crate) fn print_out(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Error::Output)
}

/// Logs to stderr, filtered by `GODWIT_LOG` (default: warnings).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GODWIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_parse_as_before() {
        let plan = Cli::try_parse_from(["godwit", "plan", "a.json", "--device", "vhost-user"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(plan.command, Command::Plan(ref p) if p.devices.len() == 1));
        let e = Cli::try_parse_from(["godwit", "plan", "a.json", "--device", "slirp"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown peer kind 'slirp'"), "{e}");
        assert!(Cli::try_parse_from(["godwit", "net-backend", "--print-versions"]).is_ok());
        assert!(Cli::try_parse_from(["godwit", "net-backend"]).is_err());
    }
}
