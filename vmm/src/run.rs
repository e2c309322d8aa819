//! Starting a VM, whichever way it comes: booted fresh, restored from a
//! snapshot, or received from a migration source. The one place that knows
//! all three, so that `machine` knows none of `persist` and `migration`.

use std::path::PathBuf;

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
    /// `--incoming URI`.
    Incoming(String),
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
            StartError::Config(_) => false,
        }
    }
}

/// Builds the VM, ready for [`Machine::run`].
pub fn start(config: &VmConfig, from: &Start) -> Result<Machine, StartError> {
    config.check()?;
    Ok(match from {
        Start::Boot => Machine::build(config)?,
        Start::Restore(dir) => crate::persist::snapshot::restore(config, dir)?,
        Start::Incoming(uri) => crate::migration::incoming(config, uri)?,
    })
}
