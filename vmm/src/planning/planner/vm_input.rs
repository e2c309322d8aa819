//! What the planner learns of an existing VM: a snapshot directory, or the
//! answers a running VM's API gave (`query-net`, `query-migrate`), read
//! through `Deserialize` types so that an error names the bad member. The
//! caller asks the API (the planner speaks no protocol).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use godwit_migration::format::{Container, FormatError};

use super::existing_vm::{VmDevice, VmView};
use crate::persist::snapshot::{read_saved, RestoreError, KNOWN_SECTIONS};
use crate::persist::STATE_FILE;
use crate::planning::host_caps::encoding::{hex_bits, nullable};
use crate::planning::host_caps::{decode, FieldError, PeerKind, UnknownPeerKind};

/// Why the VM to judge could not be read (bad input; exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum VmInputError {
    #[error("cannot read the VM from snapshot {}: {}: {source}", dir.display(), state.display())]
    SnapshotFile {
        dir: PathBuf,
        state: PathBuf,
        #[source]
        source: Box<FormatError>,
    },
    #[error("cannot read the VM from snapshot {}: {source}", dir.display())]
    Snapshot {
        dir: PathBuf,
        #[source]
        source: Box<RestoreError>,
    },
    #[error("cannot read the VM from snapshot {}: {id}: {source}", dir.display())]
    SnapshotPeerKind {
        dir: PathBuf,
        id: String,
        #[source]
        source: UnknownPeerKind,
    },
    #[error("cannot read the VM from {source_desc}: {source}")]
    Answer {
        source_desc: String,
        #[source]
        source: FieldError,
    },
}

/// The VM saved in a snapshot directory.
pub fn vm_from_snapshot(dir: &Path) -> Result<VmView, VmInputError> {
    let state = dir.join(STATE_FILE);
    let container = Container::read_file(&state, KNOWN_SECTIONS).map_err(|source| {
        VmInputError::SnapshotFile {
            dir: dir.to_path_buf(),
            state: state.clone(),
            source: Box::new(source),
        }
    })?;
    let saved = read_saved(&container, &state).map_err(|source| VmInputError::Snapshot {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })?;
    let mut devices = Vec::new();
    for n in &saved.nets {
        let kind = n
            .peer_kind
            .parse()
            .map_err(|source| VmInputError::SnapshotPeerKind {
                dir: dir.to_path_buf(),
                id: n.id.clone(),
                source,
            })?;
        devices.push(VmDevice {
            id: n.id.clone(),
            kind,
            offered: n.offered,
            acked: n.device.acked,
            interface: n.interface.clone(),
        });
    }
    Ok(VmView {
        source: format!("snapshot {}", dir.display()),
        machine: saved.machine.name.to_string(),
        devices,
        blockers: Vec::new(),
        cpuid: saved.vcpus.first().map(|v| v.cpuid.clone()),
    })
}

/// One device of a `query-net` answer, as far as the planner reads it.
#[derive(Deserialize)]
struct NetAnswer {
    id: String,
    machine: Option<String>,
    peer: PeerAnswer,
    offered: SetAnswer,
    acked: SetAnswer,
    interface: Option<InterfaceAnswer>,
    #[serde(default, deserialize_with = "nullable")]
    blockers: Vec<String>,
}

#[derive(Deserialize)]
struct PeerAnswer {
    kind: PeerKind,
}

#[derive(Deserialize)]
struct SetAnswer {
    #[serde(deserialize_with = "hex_bits")]
    hex: godwit_devices::virtio::Features,
}

/// `interface` is `{"name": ..}` (or a plain name).
#[derive(Deserialize)]
#[serde(untagged)]
enum InterfaceAnswer {
    Record { name: String },
    Name(String),
}

impl InterfaceAnswer {
    fn name(self) -> String {
        match self {
            InterfaceAnswer::Record { name } | InterfaceAnswer::Name(name) => name,
        }
    }
}

#[derive(Deserialize)]
struct MigrateAnswer {
    #[serde(rename = "blocked-reasons", default, deserialize_with = "nullable")]
    blocked_reasons: Vec<String>,
}

/// Builds the view from `query-net` and `query-migrate` answers; `source`
/// names the VM (`API socket PATH`).
pub fn vm_from_query(source: &str, nets: &Value, migrate: &Value) -> Result<VmView, VmInputError> {
    let answer = |source_err: FieldError| VmInputError::Answer {
        source_desc: source.to_string(),
        source: source_err,
    };
    let list: Vec<NetAnswer> = decode("query-net", nets).map_err(answer)?;
    let migrate: MigrateAnswer = decode("query-migrate", migrate).map_err(answer)?;
    let machine = list.iter().find_map(|d| d.machine.clone());
    let mut blockers = migrate.blocked_reasons;
    let mut devices = Vec::new();
    for d in list {
        for b in d.blockers {
            if !blockers.contains(&b) {
                blockers.push(b);
            }
        }
        devices.push(VmDevice {
            id: d.id,
            kind: d.peer.kind,
            offered: d.offered.hex,
            acked: d.acked.hex,
            interface: d.interface.map(InterfaceAnswer::name),
        });
    }
    Ok(VmView {
        source: source.to_string(),
        machine: machine.unwrap_or_else(|| "unknown (the VM has no network device)".into()),
        devices,
        blockers,
        cpuid: None,
    })
}
