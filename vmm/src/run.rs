//! Starting a VM, whichever way it comes: booted fresh, restored from a
//! snapshot, or received from a migration source. The one place that knows
//! all three, so that `machine` knows none of `persist` and `migration`.

use std::path::PathBuf;

use crate::api::ApiError;
use crate::config::{ConfigError, VmConfig};
use crate::machine::{BuildError, Machine};
use crate::migration::IncomingError;
use crate::persist::snapshot::RestoreError;

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

/// Builds the VM and serves its API (with `--api-socket`), ready for
/// [`Machine::run`]: the vCPUs are still parked, so a client can connect
/// before the guest runs.
pub fn start(config: &VmConfig, from: &Start) -> Result<Machine, StartError> {
    config.check()?;
    let mut machine = match from {
        Start::Boot => Machine::build(config)?,
        Start::Restore(dir) => crate::persist::snapshot::restore(config, dir)?,
        Start::Incoming { uri, tls_dir } => {
            crate::migration::incoming(config, uri, tls_dir.as_deref())?
        }
    };
    if let Some(path) = &config.api_socket {
        crate::api::commands::serve(&mut machine, path)?;
    }
    Ok(machine)
}
