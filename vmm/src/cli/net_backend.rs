//! `godwit net-backend`: godwit's own vhost-user net backend as a process
//! (godwit_devices::vhost_user::backend): forwards a frontend's rings to a
//! TAP, presents a named interface version, serves one frontend after the
//! other. `--print-versions` prints the interface versions it supports, as
//! management records them. Any vhost-user frontend can use it: godwit's,
//! which may pin an interface version, or a standard one such as QEMU's
//! `-netdev vhost-user` (docs/vhost-user-interface-versions.md, "Standard
//! frontends").

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use godwit_devices::net::tap::{Tap, TapError, VnetHdr};
use godwit_devices::vhost_user::backend::{
    default_interface, serve, BackendCounters, BackendError, BackendOptions,
};
use godwit_devices::vhost_user::interface::{served_versions, version_list_for};

use crate::seccomp::{self, SeccompError, SeccompMode, ThreadKind};

#[derive(Args, Debug)]
pub struct NetBackendArgs {
    /// The vhost-user socket: listened on, or connected to with --client.
    #[arg(long, value_name = "PATH", required_unless_present = "print_versions")]
    pub socket: Option<PathBuf>,
    /// The TAP frames go to and come from (opened or created, with a
    /// virtio-net header so that offloads pass through).
    #[arg(long, value_name = "NAME", required_unless_present = "print_versions")]
    pub tap: Option<String>,
    /// Queue pairs: as many queues of the TAP (several make it a
    /// multi-queue TAP). An interface of more pairs cannot be presented.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(godwit_devices::virtio::net::MAX_QUEUE_PAIRS)))]
    pub queues: u16,
    /// The interface version presented when a frontend does not pin one
    /// (default: the latest of at most --queues pairs).
    #[arg(long, value_name = "NAME")]
    pub interface: Option<String>,
    /// Connect to the socket, where the frontend listens (godwit
    /// `--net vhost-user,...,server=on`), instead of listening on it.
    #[arg(long)]
    pub client: bool,
    /// Print the interface versions a backend of --queues pairs presents
    /// as JSON ({latest, supported}) and exit; with --verbose, each
    /// version's values too.
    #[arg(long)]
    pub print_versions: bool,
    /// With --print-versions: add each version's values.
    #[arg(long)]
    pub verbose: bool,
    /// System-call filter on the backend's threads: on, off or log (as `godwit run --seccomp`).
    #[arg(long, value_name = "MODE", value_enum, env = "GODWIT_SECCOMP", default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,
}

#[derive(Debug, thiserror::Error)]
pub enum NetBackendError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot open TAP {name}: {source}")]
    Tap {
        name: String,
        #[source]
        source: TapError,
    },
    #[error("--socket and --tap are required")]
    Usage,
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Runs the backend until killed (or prints the versions).
pub fn run(args: NetBackendArgs) -> Result<(), super::Error> {
    if args.print_versions {
        let queues = usize::from(args.queues);
        let list = version_list_for(queues);
        let out = if args.verbose {
            json!({
                "latest": list.latest,
                "supported": list.supported,
                "versions": served_versions(queues).iter().map(|i| i.resolved()).collect::<Vec<_>>(),
            })
        } else {
            json!(list)
        };
        return super::print_out(&format!("{out}\n"));
    }
    let (Some(socket), Some(tap_name)) = (args.socket, args.tap) else {
        return Err(NetBackendError::Usage.into());
    };
    let default = default_interface(args.interface.as_deref(), usize::from(args.queues))
        .map_err(NetBackendError::from)?;
    let taps = Tap::open_queues(&tap_name, VnetHdr::On, args.queues).map_err(|source| {
        NetBackendError::Tap {
            name: tap_name.clone(),
            source,
        }
    })?;
    let opts = BackendOptions {
        socket: socket.clone(),
        taps: taps.into_iter().map(Arc::new).collect(),
        default_interface: default,
        client: args.client,
    };
    // A daemon keeps serving when nobody reads its ready line.
    let _ = writeln!(
        std::io::stdout(),
        "net-backend: ready socket={} tap={} queues={} interface={} mode={}",
        socket.display(),
        tap_name,
        args.queues,
        default.name,
        if args.client { "client" } else { "server" }
    );
    let _ = std::io::stdout().flush();
    // The daemon's threads start from this one and inherit its filter.
    seccomp::init(args.seccomp).map_err(NetBackendError::from)?;
    seccomp::prime_allocator_on_a_thread();
    seccomp::install(ThreadKind::NetBackend).map_err(NetBackendError::from)?;
    serve(
        &opts,
        Arc::new(BackendCounters::default()),
        Arc::new(AtomicBool::new(false)),
    )
    .map_err(NetBackendError::from)?;
    Ok(())
}

pub fn execute(args: NetBackendArgs) -> Result<u8, super::Error> {
    run(args)?;
    Ok(super::EXIT_SUCCESS)
}
