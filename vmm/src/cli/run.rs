//! `godwit run`: boot a VM, restore one from a snapshot, or receive one by
//! live migration, and run it until it ends.

use std::path::PathBuf;

use clap::Args;

use crate::abi::machine_types::{self, MachineTypeError};
use crate::boot::test_guest::{TEST_GUEST_ELF, TEST_GUEST_NAME};
use crate::boot::KernelImage;
use crate::config::net_spec::NetSpec;
use crate::config::{
    parse_duration, parse_size, RestoreMemory, SerialSpec, VmConfig, DEFAULT_CMDLINE,
};
use crate::machine::VmOutcome;
use crate::run::{prepare, start, Start, StartError};
use crate::seccomp::{self, SeccompError, SeccompMode, ThreadKind};

#[derive(Args)]
pub struct RunArgs {
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
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "128M")]
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
    /// Wait for a live migration on tls:ADDR:PORT, tcp:ADDR:PORT or unix:PATH instead of
    /// booting; --net gives this host's peers, one per device, in order.
    #[arg(long, value_name = "URI", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "vcpus", "machine", "restore"])]
    incoming: Option<String>,
    /// TLS credentials for --incoming tls:ADDR:PORT, in QEMU's tls-creds-x509
    /// layout (ca-cert.pem, server-cert.pem, server-key.pem; the source's
    /// certificate must be signed by that CA).
    #[arg(long, value_name = "DIR", requires = "incoming")]
    tls_dir: Option<PathBuf>,
    /// With --restore: `map` the memory file privately (no copy; the
    /// default) or `copy` it into shared memory (needed by vhost-user peers).
    #[arg(long, value_name = "MODE", default_value = "map", requires = "restore")]
    restore_memory: RestoreMemory,
    /// Add QEMU's isa-debug-exit device (port 0xf4): a guest write of v ends
    /// godwit with status (v << 1) | 1.
    #[arg(long)]
    debug_exit: bool,
    /// Stop the VM after it has run this long (e.g. 30s, 5m; a bare number
    /// is seconds), with its own exit status.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// System-call filters on every thread: `on` (a forbidden call stops
    /// godwit, exit status 159), `off`, or `log` (allowed and logged by the
    /// kernel, audit type=1326, to find calls missing from the lists).
    #[arg(long, value_name = "MODE", value_enum, env = "GODWIT_SECCOMP", default_value_t = SeccompMode::On)]
    seccomp: SeccompMode,
}

/// Why the VM did not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    MachineType(#[from] MachineTypeError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot start the signal thread: {0}")]
    Signals(#[source] std::io::Error),
}

impl RunError {
    /// The strict check refused a device (its own exit status).
    pub fn is_strict_refusal(&self) -> bool {
        matches!(self, RunError::Start(e) if e.is_strict_refusal())
    }
}

/// `--machine help` and `--machine TYPE,help`; None when it is a real choice.
fn machine_help(machine: &str) -> Option<Result<u8, super::Error>> {
    if machine == "help" {
        return Some(super::print_out(&machine_types::help_text()).map(|()| super::EXIT_SUCCESS));
    }
    let name = machine.strip_suffix(",help")?;
    Some(match machine_types::resolve(name) {
        Ok(m) => super::print_out(&machine_types::type_help_text(m)).map(|()| super::EXIT_SUCCESS),
        Err(e) => Err(RunError::from(e).into()),
    })
}

pub fn execute(args: RunArgs) -> Result<u8, super::Error> {
    if let Some(done) = machine_help(&args.machine) {
        return done;
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
        debug_exit: args.debug_exit,
        timeout: args.timeout,
    };
    let from = match (&args.restore, &args.incoming) {
        (Some(dir), _) => Start::Restore(dir.clone()),
        (None, Some(uri)) => Start::Incoming {
            uri: uri.clone(),
            tls_dir: args.tls_dir.clone(),
        },
        (None, None) => Start::Boot,
    };
    // Timestamps for start-up profiling (GODWIT_LOG=debug): process start
    // to vCPUs released is measured against the floor in `godwit-bench boot`.
    tracing::debug!("run: command line parsed");
    // The VM is created meanwhile, on a thread of its own that starts
    // first, so that it finds a core sooner, with the termination signals
    // already blocked; it primes the allocator too, and has ended before
    // `start` reads any input (it has no filter: see `machine::early`).
    crate::signals::block_termination().map_err(RunError::Signals)?;
    seccomp::init(args.seccomp).map_err(RunError::from)?;
    let prepared = prepare(&config, &from).map_err(RunError::from)?;
    crate::signals::start().map_err(RunError::Signals)?;
    // Before the snapshot or the migration stream is read.
    seccomp::install(ThreadKind::Main).map_err(RunError::from)?;
    tracing::debug!("run: signal thread and filters set up");
    let machine = start(&config, prepared).map_err(RunError::from)?;
    match machine.run() {
        VmOutcome::GuestPoweroff | VmOutcome::Quit | VmOutcome::Migrated => Ok(super::EXIT_SUCCESS),
        VmOutcome::GuestFailed(e) => Err(super::Error::Guest(e)),
        VmOutcome::DebugExit(value) => {
            let status = godwit_devices::debug_exit::exit_status(value);
            tracing::info!(value, status, "the guest ended the VM through debug-exit");
            Ok(status)
        }
        VmOutcome::GuestPanicked => Err(super::Error::GuestPanicked),
        VmOutcome::TimedOut(limit) => Err(super::Error::TimedOut(limit)),
        VmOutcome::Signal(signal) => {
            crate::signals::remove_temp_paths();
            Ok(crate::signals::exit_status(signal))
        }
    }
}
