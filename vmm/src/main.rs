//! The `godwit` command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use godwit_vmm::boot::KernelImage;
use godwit_vmm::config::{parse_size, SerialSpec, VmConfig, DEFAULT_CMDLINE};
use godwit_vmm::machine::VmOutcome;
use godwit_vmm::machine_types;
use godwit_vmm::net_spec::NetSpec;
use godwit_vmm::run::{self, Start};
use godwit_vmm::test_guest::{TEST_GUEST_ELF, TEST_GUEST_NAME};

/// Exit statuses, documented in the README.
const EXIT_START_FAILED: u8 = 1;
const EXIT_GUEST_FAILED: u8 = 3;
const EXIT_STRICT_REFUSAL: u8 = 4;

#[derive(Parser)]
#[command(
    name = "godwit",
    version,
    about = "A minimal VMM on KVM whose virtio-net ABI is explicit, checked and portable"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM (the built-in test guest unless --kernel is given).
    Run(RunArgs),
    /// Send one command to a running godwit's management API and print the result.
    Ctl(CtlArgs),
    /// List the machine types, the alias, and what each version adds.
    Machines,
    /// Report what a network peer supports, without starting a VM.
    Probe(ProbeArgs),
    /// godwit's vhost-user net backend: forwards a frontend's rings to a TAP.
    NetBackend(godwit_vmm::net_backend::NetBackendArgs),
    /// Report this host's capabilities (godwit, KVM, CPUID, network peers) as versioned JSON for `godwit plan`.
    HostCaps(godwit_vmm::host_caps::HostCapsArgs),
    /// From host-caps reports: how to start a VM so it can migrate between those hosts (or, with --vm, whether an existing VM can).
    Plan(godwit_vmm::planner::PlanArgs),
}

#[derive(Args)]
struct ProbeArgs {
    /// The peer, as given to `godwit run --net`, e.g. tap,ifname=tap0.
    #[arg(long, value_name = "SPEC")]
    net: NetSpec,
}

#[derive(Args)]
struct RunArgs {
    /// Machine type (`godwit machines` lists them; `help`, or TYPE,help for one type's ABI).
    #[arg(long, value_name = "TYPE", default_value = machine_types::ALIAS)]
    machine: String,
    /// A virtio-net device and its peer: tap,ifname=NAME|fd=N[,vnet_hdr=on|off][,mac=..][,mtu=..][,strict=on|off][,FEATURE=on|off...]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<NetSpec>,
    /// Linux kernel: bzImage or ELF vmlinux. Default: the built-in test guest.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM, e.g. 512M or 2G (a bare number is MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg, default_value = "128M")]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Serial console: stdio, null, or file:PATH.
    #[arg(long, value_name = "SPEC", default_value = "stdio")]
    serial: SerialSpec,
    /// Serve the QMP-style management API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Start from a snapshot directory (written by snapshot-save) instead of
    /// booting; --net gives this host's peers, one per saved device, in order.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "vcpus", "machine"])]
    restore: Option<PathBuf>,
    /// Wait for a live migration on tcp:ADDR:PORT or unix:PATH instead of
    /// booting; --net gives this host's peers, one per device, in order.
    #[arg(long, value_name = "URI", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "vcpus", "machine", "restore"])]
    incoming: Option<String>,
    /// With --restore: `map` the memory file privately (no copy; the
    /// default) or `copy` it into shared memory (needed by vhost-user peers).
    #[arg(long, value_name = "MODE", default_value = "map", requires = "restore")]
    restore_memory: godwit_vmm::config::RestoreMemory,
}

#[derive(Args)]
struct CtlArgs {
    /// The socket given to `godwit run --api-socket`.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// A QMP command, e.g. query-status, stop, cont, quit.
    command: String,
    /// The command's arguments as a JSON object.
    json_args: Option<String>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Standard error that never fails: a closed or full stderr must not take
/// down a thread that logs (a vCPU thread, say); the lines are lost instead.
struct LossyStderr;

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
macro_rules! report {
    ($($arg:tt)*) => {{
        let _ = writeln!(LossyStderr, $($arg)*);
    }};
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GODWIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_target(false)
        .init();
}

/// `--machine help` and `--machine TYPE,help`; None when it is a real choice.
fn machine_help(machine: &str) -> Option<ExitCode> {
    if machine == "help" {
        print!("{}", machine_types::help_text());
        return Some(ExitCode::SUCCESS);
    }
    let name = machine.strip_suffix(",help")?;
    Some(match machine_types::resolve(name) {
        Ok(m) => {
            print!("{}", machine_types::type_help_text(m));
            ExitCode::SUCCESS
        }
        Err(e) => {
            report!("godwit: error: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    })
}

fn probe(args: ProbeArgs) -> ExitCode {
    match godwit_vmm::net::probe_report(&args.net) {
        Ok(report) => {
            let _ = writeln!(std::io::stdout(), "{report:#}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            report!("godwit: error: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    if let Some(code) = machine_help(&args.machine) {
        return code;
    }
    let kernel = match args.kernel {
        Some(path) => KernelImage::File(path),
        None => KernelImage::Embedded {
            name: TEST_GUEST_NAME,
            bytes: TEST_GUEST_ELF,
        },
    };
    let config = VmConfig {
        restore_memory: args.restore_memory,
        machine: args.machine.clone(),
        nets: args.net,
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory: args.memory,
        vcpus: args.vcpus,
        serial: args.serial,
        api_socket: args.api_socket,
    };
    let from = match (&args.restore, &args.incoming) {
        (Some(dir), _) => Start::Restore(dir.clone()),
        (None, Some(uri)) => Start::Incoming(uri.clone()),
        (None, None) => Start::Boot,
    };
    let built = run::start(&config, &from);
    let machine = match built {
        Ok(m) => m,
        Err(e) => {
            report!("godwit: error: {e}");
            let code = if e.is_strict_refusal() {
                EXIT_STRICT_REFUSAL
            } else {
                EXIT_START_FAILED
            };
            return ExitCode::from(code);
        }
    };
    match machine.run() {
        VmOutcome::GuestPoweroff | VmOutcome::Quit | VmOutcome::Migrated => ExitCode::SUCCESS,
        VmOutcome::GuestFailed(e) => {
            report!("godwit: guest failed: {e}");
            ExitCode::from(EXIT_GUEST_FAILED)
        }
    }
}

/// `godwit ctl migrate URI`: starts a migration and shows its progress
/// until it ends; fails when the migration fails.
fn ctl_migrate(
    socket: &std::path::Path,
    uri: &str,
) -> Result<String, godwit_vmm::api::ClientError> {
    use godwit_vmm::api::{ClientError, QmpClient};
    use std::time::Duration;
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
                    .any(|ev| ev["event"] == "MIGRATION" && ev["data"]["status"] == "completed");
                if completed || last["status"] == "completed" {
                    return Ok("migration completed: the guest runs on the destination".into());
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
        report!("{line}");
        match status.as_str() {
            "completed" => {
                return Ok(format!(
                    "migration completed in {:.0} ms, downtime {:.1} ms",
                    info["total-time-ms"].as_f64().unwrap_or(0.0),
                    info["downtime-ms"].as_f64().unwrap_or(0.0)
                ))
            }
            "failed" | "cancelled" => {
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
fn ctl(args: &CtlArgs) -> Result<String, godwit_vmm::api::ClientError> {
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
            return godwit_vmm::api::run_ctl(&args.api_socket, "snapshot-save", Some(&json));
        }
    }
    godwit_vmm::api::run_ctl(&args.api_socket, &args.command, args.json_args.as_deref())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Machines => {
            print!("{}", machine_types::help_text());
            ExitCode::SUCCESS
        }
        Command::Probe(args) => probe(args),
        Command::NetBackend(args) => godwit_vmm::net_backend::main(args),
        Command::HostCaps(args) => godwit_vmm::host_caps::main(args),
        Command::Plan(args) => godwit_vmm::planner::main(args),
        Command::Ctl(args) => match ctl(&args) {
            Ok(out) => {
                let _ = writeln!(std::io::stdout(), "{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report!("godwit: {e}");
                ExitCode::from(EXIT_START_FAILED)
            }
        },
    }
}
