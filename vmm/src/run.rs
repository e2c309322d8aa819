//! Starting a VM, whichever way it comes: booted fresh, restored from a
//! snapshot, or received from a migration source. The one place that knows
//! all three, so that `machine` knows none of `persist` and `migration`.

use std::path::PathBuf;

use crate::api::ApiError;
use crate::config::{ConfigError, VmConfig};
use crate::machine::early::{self, Early};
use crate::machine::{BuildError, Machine};
use crate::migration::IncomingError;
use crate::persist::snapshot::RestoreError;
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::Vm;

/// Where the VM's state comes from.
#[derive(Clone, Debug)]
pub enum Start {
    /// A fresh boot of `config.kernel`.
    Boot,
    /// `--restore DIR`.
    Restore(PathBuf),
    /// `--incoming URI`, with `--tls-dir` for a `tls:` URI.
    Incoming {
        uri: String,
        tls_dir: Option<PathBuf>,
    },
}

/// Why a VM could not start. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Incoming(#[from] IncomingError),
    #[error("cannot start the API server: {0}")]
    Api(#[from] ApiError),
}

impl StartError {
    /// This host's network peer cannot carry the VM's ABI: a strict refusal
    /// at boot, or a restore / incoming migration whose peer lacks features
    /// the guest was offered (its own exit status).
    pub fn is_strict_refusal(&self) -> bool {
        match self {
            StartError::Build(e) => e.is_strict_refusal(),
            StartError::Restore(e) => e.is_peer_refusal(),
            StartError::Incoming(e) => e.is_refusal(),
            StartError::Config(_) | StartError::Api(_) => false,
        }
    }
}

/// A start whose KVM part runs already (see [`crate::machine::early`]).
pub struct Prepared {
    from: PreparedStart,
}

enum PreparedStart {
    Boot(Early<(Vm, GuestRam, u8)>),
    Restore(PathBuf, Early<Vm>),
    Incoming {
        uri: String,
        tls_dir: Option<PathBuf>,
        vm: Early<Vm>,
    },
}

/// Checks the configuration and starts creating the VM on a thread of its
/// own; [`start`] goes on from there. Call once the termination signals
/// are blocked, and before the main thread installs its filter, which then
/// overlaps the VM's creation.
pub fn prepare(config: &VmConfig, from: &Start) -> Result<Prepared, StartError> {
    config.check()?;
    let from = match from {
        Start::Boot => PreparedStart::Boot(early::boot_vm(config.memory, config.vcpus)),
        Start::Restore(dir) => PreparedStart::Restore(dir.clone(), early::bare_vm(false)),
        Start::Incoming { uri, tls_dir } => PreparedStart::Incoming {
            uri: uri.clone(),
            tls_dir: tls_dir.clone(),
            vm: early::bare_vm(true),
        },
    };
    Ok(Prepared { from })
}

/// Builds the VM and serves its API (with `--api-socket`), ready for
/// [`Machine::run`]: the vCPUs are still parked, so a client can connect
/// before the guest runs.
pub fn start(config: &VmConfig, prepared: Prepared) -> Result<Machine, StartError> {
    let mut machine = match prepared.from {
        PreparedStart::Boot(vm) => Machine::build(config, vm)?,
        PreparedStart::Restore(dir, vm) => crate::persist::snapshot::restore(config, &dir, vm)?,
        PreparedStart::Incoming { uri, tls_dir, vm } => {
            crate::migration::incoming(config, &uri, tls_dir.as_deref(), vm)?
        }
    };
    if let Some(path) = &config.api_socket {
        crate::api::commands::serve(&mut machine, path)?;
    }
    Ok(machine)
}
