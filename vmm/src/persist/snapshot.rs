//! Snapshot and restore. A snapshot is a directory with two files:
//! `state.gws` (the versioned container of migration::format: machine
//! configuration, VM, vCPUs, memory layout, devices) and `memory.gwm` (guest
//! RAM, sparse). Restore checks everything this host must provide (machine
//! type, KVM capabilities, CPUID, memory, and each network peer against the
//! features the guest was *offered*) before any vCPU runs, and never writes
//! to the snapshot.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use godwit_devices::serial::SerialDeviceState;
use godwit_devices::virtio::mmio::{MmioTransport, MmioTransportState};
use godwit_devices::virtio::net::features::{self, Features};
use godwit_devices::virtio::net::VirtioNetState;
use godwit_migration::format::{kind_ids, Container, ContainerWriter, FormatError, SectionKind};
use godwit_migration::memory_file::{self, MemoryFileError, MemoryFileInfo, MEMORY_SECTION};
use godwit_migration::persist::Persist;

use crate::abi::machine_types::{self, MachineType};
use crate::abi::strict::{NetAbiDecision, PeerSupport};
use crate::config::{RestoreMemory, VmConfig};
use crate::devices::net::{self, NetDevice, NetSetupError};
use crate::machine::{early, platform_devices, BuildError, BuiltVm, Machine, VmHandle};
use crate::persist::staging::{Staging, StagingError};
use crate::persist::{MEMORY_FILE, STATE_FILE};
use crate::vstate::memory::{self, GuestRam};
use crate::vstate::state::vcpu::{check_cpuid, vcpu_cpuid, VCPU_SECTION};
use crate::vstate::state::vm::{ClockRestore, VM_SECTION};
use crate::vstate::state::{StateError, VcpuState, VmState};
use crate::vstate::vcpu::{IoBuses, Vcpu};
use crate::vstate::vm::{self, Vm};

pub const MACHINE_SECTION: SectionKind = SectionKind {
    id: kind_ids::MACHINE_CONFIG,
    name: "machine",
    version: 1,
    min_version: 1,
    required: true,
    instanced: false,
};
pub const SERIAL_SECTION: SectionKind = SectionKind {
    id: kind_ids::FIRST_DEVICE,
    name: "serial",
    version: 1,
    min_version: 1,
    required: true,
    instanced: false,
};
/// Version 2: feature words (required, offered, the device's and the
/// transport's) are 128 bits wide, and the queue pairs are kept
/// (`queue_pairs` here, the pairs in use in the device state). A device of
/// one queue pair whose features all lie below bit 64 is written as
/// version 1 (the same JSON), so godwits that read only 64-bit words and
/// one pair still restore it; any other is version 2, which such a godwit
/// refuses by its header ("too new: upgrade godwit") instead of restoring
/// it wrong. Version 1 sections read as one pair.
pub const NET_SECTION: SectionKind = SectionKind {
    id: kind_ids::FIRST_DEVICE + 1,
    name: "net",
    version: 2,
    min_version: 1,
    required: true,
    instanced: true,
};

/// The section version a device's state is written with (see
/// [`NET_SECTION`]).
pub fn net_section_for(net: &NetSnapshot) -> SectionKind {
    let words = [
        net.required,
        net.offered,
        net.device.offered,
        net.device.acked,
        net.device.guest_offloads,
        net.transport.device_features,
        net.transport.driver_features,
    ];
    let one_pair = net.queue_pairs == 1 && net.device.queue_pairs == 1;
    if one_pair
        && words
            .iter()
            .all(|w| godwit_devices::virtio::high64(*w) == 0)
    {
        SectionKind {
            version: 1,
            ..NET_SECTION
        }
    } else {
        NET_SECTION
    }
}

/// Every section kind this godwit reads.
pub const KNOWN_SECTIONS: &[SectionKind] = &[
    MACHINE_SECTION,
    VM_SECTION,
    VCPU_SECTION,
    MEMORY_SECTION,
    SERIAL_SECTION,
    NET_SECTION,
];

/// The VM's configuration, as restore needs it to rebuild the VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineSnapshot {
    pub machine_type: String,
    pub memory_size: u64,
    pub vcpus: u8,
    pub nets: u32,
}

/// One virtio-net device: its ABI, its peer kind, and its state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetSnapshot {
    pub id: String,
    pub peer_kind: String,
    /// The `--net` text it was started with (for messages).
    pub spec_text: String,
    pub strict: bool,
    pub required: Features,
    /// What the guest was offered: every peer it runs on must carry all of it.
    pub offered: Features,
    /// Queue pairs offered (`max_virtqueue_pairs`): every peer it runs on
    /// must carry as many. Absent (section version 1): 1.
    #[serde(default = "one_queue_pair")]
    pub queue_pairs: u16,
    pub interface: Option<String>,
    pub mmio_base: u64,
    pub irq: u32,
    pub device: VirtioNetState,
    pub transport: MmioTransportState,
}

fn one_queue_pair() -> u16 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM cannot be snapshotted: {}", .0.join("; "))]
    Blocked(Vec<String>),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("cannot pause {what}: {detail}")]
    Pause { what: String, detail: String },
    #[error("saving {what}: {source}")]
    State { what: String, source: StateError },
    #[error("writing guest memory: {0}")]
    Memory(#[from] MemoryFileError),
    #[error("writing the state file: {0}")]
    Format(#[from] FormatError),
    #[error(transparent)]
    Busy(#[from] crate::machine::Busy),
}

/// What a save measured.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStats {
    pub dir: PathBuf,
    pub memory_bytes: u64,
    pub data_bytes: u64,
    pub zero_pages: u64,
    pub state_bytes: u64,
    pub paused_ms: f64,
    pub total_ms: f64,
}

/// Pauses vCPUs and device datapaths; resumes them on drop unless the VM
/// was paused before.
pub(crate) struct Quiesced<'a> {
    handle: &'a VmHandle,
    resume: bool,
}

impl<'a> Quiesced<'a> {
    /// Pauses a running VM (vCPUs, then device datapaths); a VM paused
    /// already stays as it is.
    pub(crate) fn new(handle: &'a VmHandle) -> Result<Self, SnapshotError> {
        let resume = handle.pause();
        if handle.vcpus.paused_fds().is_none() {
            let q = Quiesced { handle, resume };
            drop(q);
            return Err(SnapshotError::Pause {
                what: "the vCPUs".into(),
                detail: "the VM is not running".into(),
            });
        }
        Ok(Quiesced { handle, resume })
    }
}

impl Quiesced<'_> {
    /// Leaves the VM paused (its guest now runs elsewhere).
    pub(crate) fn keep_paused(mut self) {
        self.resume = false;
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if self.resume {
            self.handle.resume();
        }
    }
}

/// Captures everything but guest memory from a quiesced VM.
pub(crate) fn capture_state(handle: &VmHandle) -> Result<ContainerWriter, SnapshotError> {
    let state_err = |what: &str| {
        let what = what.to_string();
        move |source| SnapshotError::State { what, source }
    };
    let fds = handle
        .vcpus
        .paused_fds()
        .ok_or_else(|| SnapshotError::Pause {
            what: "the vCPUs".into(),
            detail: "not every vCPU is parked".into(),
        })?;
    let caps = handle
        .vm
        .kvm_caps()
        .map_err(state_err("KVM capabilities"))?;
    let mut vcpu_states = Vec::with_capacity(fds.len());
    for (id, fd) in fds.iter().enumerate() {
        vcpu_states.push(
            VcpuState::save(fd, index_u32(id), caps).map_err(state_err(&format!("vCPU {id}")))?,
        );
    }
    let mut needed: Vec<_> = vcpu_states.iter().flat_map(|v| v.needed_caps()).collect();
    needed.sort_by_key(|c| c.name());
    needed.dedup();
    let vm_state = VmState::save(&handle.vm.fd, &needed).map_err(state_err("the VM"))?;
    drop(fds);

    let mut w = ContainerWriter::new(handle.machine.name)?;
    w.add(
        &MACHINE_SECTION,
        0,
        &MachineSnapshot {
            machine_type: handle.machine.name.to_string(),
            memory_size: handle.ram.size,
            // A VM has at most 254 vCPUs (run's limit) and a few NICs.
            vcpus: u8::try_from(vcpu_states.len()).unwrap_or(u8::MAX),
            nets: index_u32(handle.nets.len()),
        },
    )?;
    w.add(&VM_SECTION, 0, &vm_state)?;
    for (id, v) in vcpu_states.iter().enumerate() {
        w.add(&VCPU_SECTION, index_u32(id), v)?;
    }
    let serial = handle
        .serial
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .save();
    w.add(&SERIAL_SECTION, 0, &serial)?;
    for (i, net) in handle.nets.iter().enumerate() {
        let snap = net_snapshot(net);
        w.add(&net_section_for(&snap), index_u32(i), &snap)?;
    }
    Ok(w)
}

pub(crate) fn net_snapshot(net: &NetDevice) -> NetSnapshot {
    let device = net
        .device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .device_state();
    let transport = net
        .transport
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .save();
    NetSnapshot {
        id: net.id.clone(),
        peer_kind: net.peer.kind.to_string(),
        spec_text: net.spec.text.clone(),
        strict: net.decision.strict,
        required: net.decision.required,
        offered: device.offered,
        queue_pairs: net.decision.queue_pairs,
        interface: net
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .interface(),
        mmio_base: net.mmio_base,
        irq: net.irq,
        device,
        transport,
    }
}

/// `snapshot-save`: refuses with every blocker, else writes `dir`.
pub fn save(handle: &VmHandle, dir: &Path) -> Result<SnapshotStats, SnapshotError> {
    let blockers = handle.blockers();
    if !blockers.is_empty() {
        return Err(SnapshotError::Blocked(blockers));
    }
    let _op = handle.begin(crate::machine::Operation::Snapshot)?;
    let started = Instant::now();
    // Written aside and put in place whole once complete: an older snapshot
    // in `dir` stays restorable whatever fails.
    let staging = Staging::new(dir)?;
    let quiet = Quiesced::new(handle)?;
    let paused_at = Instant::now();
    tracing::info!("snapshot: VM paused, saving state to {}", dir.display());
    let mut writer = capture_state(handle)?;
    let stats = memory_file::save(&handle.ram.memory, &staging.path().join(MEMORY_FILE))?;
    tracing::info!(
        "snapshot: guest memory written: {} MiB of data, {} zero pages left as holes",
        stats.data_bytes >> 20,
        stats.zero_pages
    );
    writer.add(&MEMORY_SECTION, 0, &stats.info)?;
    let bytes = writer.to_bytes();
    writer.write_file(&staging.path().join(STATE_FILE))?;
    let paused_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    drop(quiet);
    staging.commit()?;
    let out = SnapshotStats {
        dir: dir.to_path_buf(),
        memory_bytes: handle.ram.size,
        data_bytes: stats.data_bytes,
        zero_pages: stats.zero_pages,
        state_bytes: bytes.len() as u64,
        paused_ms,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
    };
    tracing::info!(
        "snapshot: done in {:.1} ms (guest paused {:.1} ms)",
        out.total_ms,
        out.paused_ms
    );
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("snapshot {}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },
    #[error("snapshot {}: {source}", path.display())]
    Memory {
        path: PathBuf,
        source: MemoryFileError,
    },
    #[error("snapshot {}: section 'machine': {source}", path.display())]
    MachineType {
        path: PathBuf,
        source: machine_types::MachineTypeError,
    },
    #[error("snapshot {}: section '{section}': {detail}", path.display())]
    Invalid {
        path: PathBuf,
        section: String,
        detail: String,
    },
    #[error("this host cannot run the saved VM: {0}")]
    Host(#[from] StateError),
    #[error("the snapshot has {saved} network device(s) ({}), but {given} --net were given: give one --net per device, in the same order, with this host's peer", names.join(", "))]
    NetCount {
        saved: usize,
        given: usize,
        names: Vec<String>,
    },
    #[error("{device}: the snapshot's device is on a {saved} peer but --net gives a {given} peer: give a {saved} peer")]
    PeerKind {
        device: String,
        saved: String,
        given: String,
    },
    #[error("{device}: this host's peer ({peer}) lacks {what} the guest was offered {when}, so the VM is refused before it runs here (the guest may use them at any moment, and renegotiates them after a reboot):\n{}\n  Remedies (any one): give this VM a peer that carries them (for a TAP: vnet_hdr=on, on a kernel with the listed offloads, a multi-queue TAP for several queue pairs; check with godwit probe --net SPEC), or run it on a host whose peer does", missing.join("\n"))]
    PeerLacks {
        device: String,
        peer: String,
        /// "features", "queue pairs" or both.
        what: &'static str,
        when: String,
        missing: Vec<String>,
    },
    #[error("the saved VM has {saved} vCPU(s) but {created} were created for it")]
    VcpuCount { saved: usize, created: usize },
    #[error(transparent)]
    Build(Box<BuildError>),
}

impl RestoreError {
    /// This host's peer cannot carry the saved ABI (strict's exit status).
    pub fn is_peer_refusal(&self) -> bool {
        match self {
            RestoreError::PeerLacks { .. } => true,
            RestoreError::Build(e) => e.is_strict_refusal(),
            _ => false,
        }
    }
}

impl<E: Into<BuildError>> From<E> for RestoreError {
    fn from(e: E) -> Self {
        RestoreError::Build(Box::new(e.into()))
    }
}

fn invalid(path: &Path, section: &str, detail: impl Into<String>) -> RestoreError {
    RestoreError::Invalid {
        path: path.to_path_buf(),
        section: section.into(),
        detail: detail.into(),
    }
}

/// Checks a peer against what the guest was offered (features and
/// `queue_pairs`); `when` says where the offer was made ("when the snapshot
/// was taken", "on the source").
pub fn check_peer(
    device: &str,
    offered: Features,
    queue_pairs: u16,
    peer: &PeerSupport,
    when: &str,
) -> Result<(), RestoreError> {
    let missing = offered & !peer.supported;
    let pairs_lack = queue_pairs > peer.max_queue_pairs;
    if missing == 0 && !pairs_lack {
        return Ok(());
    }
    // One line per reason: a TAP without vnet header explains a dozen bits.
    let mut by_reason: Vec<(String, Vec<String>)> = Vec::new();
    for b in features::bits(missing) {
        let why = peer
            .why_not
            .get(&b)
            .cloned()
            .unwrap_or_else(|| "not supported".into());
        let item = format!("{} (bit {b})", features::name_of(b));
        match by_reason.iter_mut().find(|(r, _)| *r == why) {
            Some((_, items)) => items.push(item),
            None => by_reason.push((why, vec![item])),
        }
    }
    let mut lines: Vec<String> = by_reason
        .into_iter()
        .map(|(why, items)| format!("    {}: {why}", items.join(", ")))
        .collect();
    if pairs_lack {
        lines.push(format!(
            "    {queue_pairs} queue pairs, the peer carries {}{}",
            peer.max_queue_pairs,
            peer.queue_why
                .as_deref()
                .map(|w| format!(": {w}"))
                .unwrap_or_default()
        ));
    }
    let what = match (missing != 0, pairs_lack) {
        (true, true) => "features and queue pairs",
        (false, true) => "queue pairs",
        _ => "features",
    };
    Err(RestoreError::PeerLacks {
        device: device.to_string(),
        peer: peer.name.clone(),
        what,
        when: when.to_string(),
        missing: lines,
    })
}

/// The state a restore (or an incoming migration) rebuilds a VM from.
pub struct SavedVm {
    pub machine: &'static MachineType,
    pub config: MachineSnapshot,
    pub vm_state: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialDeviceState,
    pub nets: Vec<NetSnapshot>,
    pub memory: Option<MemoryFileInfo>,
}

/// Reads and checks every section of a container.
pub fn read_saved(container: &Container, path: &Path) -> Result<SavedVm, RestoreError> {
    let format = |source| RestoreError::Format {
        path: path.to_path_buf(),
        source,
    };
    let config: MachineSnapshot = container.section(&MACHINE_SECTION, 0).map_err(format)?;
    let machine = machine_types::resolve(&config.machine_type).map_err(|source| {
        RestoreError::MachineType {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let vm_state: VmState = container.section(&VM_SECTION, 0).map_err(format)?;
    let mut vcpus = Vec::new();
    for id in 0..u32::from(config.vcpus) {
        let state = container
            .section::<VcpuState>(&VCPU_SECTION, id)
            .map_err(format)?;
        // The restore creates each vCPU with the id its state names: two
        // sections naming one vCPU, or one past the machine's count, would
        // restore a different machine than was saved.
        if state.id != id {
            return Err(invalid(
                path,
                "vcpu",
                format!(
                    "section instance {id} holds the state of vCPU {}: the file was altered or damaged",
                    state.id
                ),
            ));
        }
        vcpus.push(state);
    }
    if container.instances(&VCPU_SECTION).len() != usize::from(config.vcpus) {
        return Err(invalid(
            path,
            "machine",
            format!(
                "it names {} vCPUs but the file holds {} vCPU sections",
                config.vcpus,
                container.instances(&VCPU_SECTION).len()
            ),
        ));
    }
    let serial = container.section(&SERIAL_SECTION, 0).map_err(format)?;
    let mut nets = Vec::new();
    for i in 0..config.nets {
        let net: NetSnapshot = container.section(&NET_SECTION, i).map_err(format)?;
        if !["tap", "vhost-user", "vhost-net"].contains(&net.peer_kind.as_str()) {
            return Err(invalid(
                path,
                &NET_SECTION.section_name(i),
                format!("unknown peer kind '{}'", net.peer_kind),
            ));
        }
        if let Some(why) = queue_pairs_problem(&net) {
            return Err(invalid(path, &NET_SECTION.section_name(i), why));
        }
        nets.push(net);
    }
    let memory = container
        .optional_section(&MEMORY_SECTION, 0)
        .map_err(format)?;
    Ok(SavedVm {
        machine,
        config,
        vm_state,
        vcpus,
        serial,
        nets,
        memory,
    })
}

/// Why a saved device's queue pair counts are impossible, if they are.
fn queue_pairs_problem(net: &NetSnapshot) -> Option<String> {
    let max = godwit_devices::virtio::net::MAX_QUEUE_PAIRS;
    let fine = (1..=max).contains(&net.queue_pairs)
        && (1..=net.queue_pairs).contains(&net.device.queue_pairs);
    (!fine).then(|| {
        format!(
            "{} queue pairs, {} in use: a device has 1 to {max}, and uses 1 to all of them",
            net.queue_pairs, net.device.queue_pairs
        )
    })
}

/// Opens and checks this host's peers for the saved devices.
pub fn open_peers(
    saved: &[NetSnapshot],
    config: &VmConfig,
) -> Result<Vec<(net::OpenedPeer, PeerSupport)>, RestoreError> {
    if saved.len() != config.nets.len() {
        return Err(RestoreError::NetCount {
            saved: saved.len(),
            given: config.nets.len(),
            names: saved
                .iter()
                .map(|n| format!("{} ({})", n.id, n.spec_text))
                .collect(),
        });
    }
    let mut peers = Vec::new();
    for (net, spec) in saved.iter().zip(&config.nets) {
        if spec.peer.kind() != net.peer_kind {
            return Err(RestoreError::PeerKind {
                device: net.id.clone(),
                saved: net.peer_kind.clone(),
                given: spec.peer.kind().to_string(),
            });
        }
        let (opened, peer) =
            net::open_peer(&net.id, spec, net.interface.as_deref(), net.queue_pairs)?;
        check_peer(
            &net.id,
            net.offered,
            net.queue_pairs,
            &peer,
            "when the snapshot was taken",
        )?;
        peers.push((opened, peer));
    }
    Ok(peers)
}

/// Rebuilds the saved devices on this host's peers, wired to `vm`.
pub(crate) fn rebuild_nets(
    saved: &[NetSnapshot],
    peers: Vec<(net::OpenedPeer, PeerSupport)>,
    config: &VmConfig,
    machine: &'static MachineType,
    ram: &GuestRam,
    vm: &Vm,
    buses: &mut IoBuses,
) -> Result<Vec<NetDevice>, RestoreError> {
    let mut out = Vec::new();
    for ((net, (opened, peer)), spec) in saved.iter().zip(peers).zip(&config.nets) {
        let queue_size = net
            .transport
            .queues
            .first()
            .map(|q| q.max_size)
            .unwrap_or(machine.net.queue_size);
        let device_config = net::DeviceConfig {
            id: net.id.clone(),
            machine,
            mac: net.device.mac,
            features: net.offered,
            mtu: net.device.mtu,
            queue_size,
            queue_pairs: net.queue_pairs,
            pin: net.interface.clone(),
            strict: net.strict,
        };
        let model = net::build_model(opened, &device_config, &ram.memory)?;
        model
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .restore_device_state(&net.device);
        let transport = MmioTransport::restore((ram.memory.clone(), model.virtio), &net.transport)
            .map_err(|source| NetSetupError::TransportRestore {
                device: net.id.clone(),
                source,
            })?;
        let transport = net::place(
            &net.id,
            transport,
            net.mmio_base,
            net.irq,
            &vm.fd,
            &mut buses.mmio,
        )?;
        let device = model.device;
        out.push(NetDevice {
            id: net.id.clone(),
            spec: spec.clone(),
            machine,
            decision: NetAbiDecision {
                required: net.required,
                offered: net.offered,
                // A VM that lacked pairs had a blocker: no snapshot.
                required_queue_pairs: net.queue_pairs,
                queue_pairs: net.queue_pairs,
                strict: net.strict,
                dropped: 0,
                blocker: None,
            },
            peer,
            device,
            transport,
            mmio_base: net.mmio_base,
            irq: net.irq,
        });
    }
    Ok(out)
}

/// Creates the VM's vCPUs and puts their saved state back.
pub(crate) fn restore_vm_state(
    vm: &Vm,
    saved: &SavedVm,
    vcpus: Vec<Vcpu>,
) -> Result<Vec<Vcpu>, RestoreError> {
    // read_saved checked that the saved ids count up from 0 below the
    // config's count; `vcpus` were made for that count.
    if vcpus.len() != saved.vcpus.len() {
        return Err(RestoreError::VcpuCount {
            saved: saved.vcpus.len(),
            created: vcpus.len(),
        });
    }
    let caps = vm.kvm_caps().map_err(RestoreError::Host)?;
    saved
        .vm_state
        .check_host(&vm.fd)
        .map_err(RestoreError::Host)?;
    // The CPUID check, on this VM's own first vCPU (it has the CPUID a new
    // vCPU gets here until its saved state replaces it): every saved vCPU
    // must fit before any state is put back, and long before one runs.
    if let Some(first) = vcpus.first() {
        let host = vcpu_cpuid(&first.fd).map_err(RestoreError::Host)?;
        for state in &saved.vcpus {
            check_cpuid(state, &host).map_err(RestoreError::Host)?;
        }
    }
    saved
        .vm_state
        .restore(&vm.fd, caps, ClockRestore::Continue)
        .map_err(RestoreError::Host)?;
    for (state, vcpu) in saved.vcpus.iter().zip(&vcpus) {
        state.restore(&vcpu.fd, caps).map_err(RestoreError::Host)?;
    }
    Ok(vcpus)
}

/// Builds a (paused) VM from saved state on a VM, vCPUs and memory made for
/// it: the VM's and vCPUs' KVM state, devices on this host's peers. Shared
/// by restore and incoming migration; the latter creates the vCPUs before
/// the pages arrive, out of the downtime (about half a millisecond each).
pub(crate) fn machine_from_saved(
    config: &VmConfig,
    saved: &SavedVm,
    vm: Vm,
    vcpus: Vec<Vcpu>,
    ram: GuestRam,
    peers: Vec<(net::OpenedPeer, PeerSupport)>,
) -> Result<Machine, RestoreError> {
    let vcpus = restore_vm_state(&vm, saved, vcpus)?;
    let mut buses = IoBuses::default();
    let nets = rebuild_nets(
        &saved.nets,
        peers,
        config,
        saved.machine,
        &ram,
        &vm,
        &mut buses,
    )?;
    let (event_tx, event_rx) = mpsc::channel();
    let serial = platform_devices(
        &vm,
        &mut buses,
        &config.serial,
        Some(&saved.serial),
        &event_tx,
        config.debug_exit,
    )?;
    let built = BuiltVm {
        machine: saved.machine,
        vm,
        ram,
        buses,
        nets,
        serial,
        vcpus,
        event_tx,
        event_rx,
    };
    Ok(Machine::assemble(config, built, Vec::new())?)
}

/// `godwit run --restore DIR`: every check first, then the VM, paused.
/// `early` ([`early::bare_vm`]) has created the VM while the main thread
/// installed its filter; it is joined before the state file is read (its
/// thread has no filter). The supported CPUID is asked on another thread
/// while memory is set up.
pub fn restore(
    config: &VmConfig,
    dir: &Path,
    early: early::Early<Vm>,
) -> Result<Machine, RestoreError> {
    let state_path = dir.join(STATE_FILE);
    let started = Instant::now();
    let vm = early.join()?;
    let container = Container::read_file(&state_path, KNOWN_SECTIONS).map_err(|source| {
        RestoreError::Format {
            path: state_path.clone(),
            source,
        }
    })?;
    let saved = read_saved(&container, &state_path)?;
    let mem_info = saved
        .memory
        .clone()
        .ok_or_else(|| invalid(&state_path, "memory", "the snapshot has no memory section"))?;
    if mem_info.ram_size != saved.config.memory_size {
        return Err(invalid(
            &state_path,
            "memory",
            format!(
                "the memory file holds {} bytes but the machine has {}",
                mem_info.ram_size, saved.config.memory_size
            ),
        ));
    }
    memory::check_size(saved.config.memory_size)?;
    vm::check_vcpus(&vm.kvm, u32::from(saved.config.vcpus))?;
    // CPUID is checked on the VM's own vCPUs (restore_vm_state), before any
    // saved state is put back: a scratch VM just for the check cost an SRCU
    // wait at its teardown.
    // Mapped privately unless asked otherwise: no copy, pages fault in as
    // the guest touches them. A peer that maps guest memory itself
    // (vhost-user) needs it copied into a shared memfd.
    let mem_path = dir.join(MEMORY_FILE);
    let needs_shared = saved.nets.iter().any(|n| n.peer_kind == "vhost-user");
    let mode = if needs_shared {
        RestoreMemory::Copy
    } else {
        config.restore_memory
    };
    if needs_shared && config.restore_memory == RestoreMemory::Map {
        tracing::info!("restore: a vhost-user backend maps guest memory, so it is copied into a shared memfd instead of mapped from the file");
    }
    std::thread::scope(|scope| {
        let vm = &vm;
        let mut helper = vm::CpuidAndPit::start(scope, vm);
        let res =
            restore_memory_and_peers(config, &saved, &mem_info, &mem_path, mode, vm, &mut helper);
        helper.join()?;
        res
    })
    .and_then(|(ram, peers)| {
        // After the irqchip (made with guest memory above): a vCPU created
        // before it would have no in-kernel local APIC.
        let vcpus = vm.create_vcpus(saved.config.vcpus)?;
        let mut m = machine_from_saved(config, &saved, vm, vcpus, ram, peers)?;
        // The guest may wake on another host or TAP than where it was saved:
        // it is announced as after a migration (QEMU too announces a guest
        // that acked GUEST_ANNOUNCE once its state is loaded).
        m.announce_when_running();
        tracing::info!(
            "restored {} in {:.1} ms",
            dir.display(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(m)
    })
}

/// Guest memory from the memory file (mapped or copied), registered with
/// the VM with its irqchip (`helper` then creates the PIT), and this host's
/// peers opened and checked.
fn restore_memory_and_peers(
    config: &VmConfig,
    saved: &SavedVm,
    mem_info: &MemoryFileInfo,
    mem_path: &Path,
    mode: RestoreMemory,
    vm: &Vm,
    helper: &mut vm::CpuidAndPit<'_>,
) -> Result<(GuestRam, Vec<(net::OpenedPeer, PeerSupport)>), RestoreError> {
    let mem_err = |source| RestoreError::Memory {
        path: mem_path.to_path_buf(),
        source,
    };
    let restored = match mode {
        RestoreMemory::Map => memory_file::map_private(mem_path, mem_info).map_err(mem_err)?,
        RestoreMemory::Copy => {
            memory_file::restore_to_memfd(mem_path, mem_info).map_err(mem_err)?
        }
    };
    tracing::info!(
        "restore: guest memory from {} ({:?})",
        mem_path.display(),
        mode
    );
    let ram = GuestRam {
        memory: restored.memory,
        file: restored.file,
        size: saved.config.memory_size,
    };
    vm.map_memory_and_create_irqchip(&ram.memory)?;
    // The peers are opened while the helper creates the PIT.
    helper.irqchip_created()?;
    let peers = open_peers(&saved.nets, config)?;
    Ok((ram, peers))
}
/// A vCPU's or device's index as a section instance (a VM has a few
/// hundred of each at most).
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use godwit_devices::virtio::net::RxFilter;

    use super::*;
    use crate::abi::machine_types::resolve;

    /// A device as `machine` offers it, every pair in use.
    fn snap(machine: &str) -> NetSnapshot {
        let features = resolve(machine).unwrap().net_features();
        let pairs = resolve(machine).unwrap().net.queue_pairs;
        NetSnapshot {
            id: "net0".into(),
            peer_kind: "tap".into(),
            spec_text: "tap,ifname=t0".into(),
            strict: true,
            required: features,
            offered: features,
            queue_pairs: pairs,
            interface: None,
            mmio_base: 0xd000_0000,
            irq: 5,
            device: VirtioNetState {
                mac: [0x52, 0x54, 0, 0, 0, 1],
                status: 1,
                mtu: 1500,
                offered: features,
                acked: features,
                rx_filter: RxFilter::default(),
                guest_offloads: features & features::GUEST_OFFLOADS,
                queue_pairs: pairs,
            },
            transport: MmioTransportState {
                device_features: features,
                driver_features: features,
                ..MmioTransportState::default()
            },
        }
    }

    fn net(queue_pairs: u16, in_use: u16) -> NetSnapshot {
        NetSnapshot {
            id: "net0".into(),
            peer_kind: "tap".into(),
            spec_text: "tap,ifname=t0".into(),
            strict: true,
            required: 1,
            offered: 1,
            queue_pairs,
            interface: None,
            mmio_base: 0xd000_0000,
            irq: 5,
            device: VirtioNetState {
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                status: 1,
                mtu: 1500,
                offered: 1,
                acked: 1,
                rx_filter: RxFilter::default(),
                guest_offloads: 0,
                queue_pairs: in_use,
            },
            transport: MmioTransportState::default(),
        }
    }

    /// A net section of version 1 (before multi-queue) has no queue pairs:
    /// it reads as one pair, one in use; version 2 keeps both counts.
    #[test]
    fn net_sections_before_multi_queue_read_as_one_pair() {
        let mut v = serde_json::to_value(net(2, 2)).unwrap();
        let back: NetSnapshot = serde_json::from_value(v.clone()).unwrap();
        assert_eq!((back.queue_pairs, back.device.queue_pairs), (2, 2));
        v.as_object_mut().unwrap().remove("queue_pairs");
        v["device"].as_object_mut().unwrap().remove("queue_pairs");
        let old: NetSnapshot = serde_json::from_value(v).unwrap();
        assert_eq!((old.queue_pairs, old.device.queue_pairs), (1, 1));
        const { assert!(NET_SECTION.min_version == 1 && NET_SECTION.version == 2) };
    }

    /// Counts no device can have are refused, saying why.
    #[test]
    fn impossible_queue_pair_counts_are_refused() {
        for (pairs, in_use) in [(0, 1), (2, 3), (65, 1), (2, 0)] {
            let why = queue_pairs_problem(&net(pairs, in_use)).unwrap();
            assert!(why.contains("queue pairs"), "{pairs}/{in_use}: {why}");
        }
        for (pairs, in_use) in [(1, 1), (2, 1), (2, 2), (64, 64)] {
            assert_eq!(queue_pairs_problem(&net(pairs, in_use)), None);
        }
    }

    fn round_trip(s: &NetSnapshot) -> (u32, NetSnapshot) {
        let mut w = ContainerWriter::new("m").unwrap();
        w.add(&net_section_for(s), 0, s).unwrap();
        let c = Container::from_bytes(w.to_bytes(), KNOWN_SECTIONS).unwrap();
        let version = c.header().sections[0].version;
        (version, c.section(&NET_SECTION, 0).unwrap())
    }

    /// Bits 64 and up survive a snapshot (section version 2); a device
    /// whose features fit 64 bits is still written as version 1, which
    /// godwits reading only 64-bit words restore.
    #[test]
    fn net_sections_keep_bits_above_63_and_stay_version_1_without_them() {
        let (v, back) = round_trip(&snap("godwit-1.2"));
        assert_eq!(v, 2);
        let tunnel = crate::abi::machine_types::bits_of(features::groups::UDP_TUNNEL);
        for w in [
            back.required,
            back.offered,
            back.device.offered,
            back.device.acked,
            back.transport.device_features,
            back.transport.driver_features,
        ] {
            assert_eq!(w & tunnel, tunnel);
        }
        assert_ne!(back.device.guest_offloads & tunnel, 0);
        let (v, back) = round_trip(&snap("godwit-1.1"));
        assert_eq!(v, 1);
        assert_eq!(back.offered, resolve("godwit-1.1").unwrap().net_features());
        // Two queue pairs are version 2 even without bits above 63: a
        // godwit that reads only version 1 would restore one pair.
        let mut two = snap("godwit-1.1");
        two.queue_pairs = 2;
        let (v, back) = round_trip(&two);
        assert_eq!((v, back.queue_pairs), (2, 2));
    }

    /// A version-1 section as an older godwit wrote it (64-bit numbers)
    /// still loads.
    #[test]
    fn a_version_1_net_section_of_64_bit_numbers_loads() {
        let old = snap("godwit-1.1");
        let mut json = serde_json::to_value(&old).unwrap();
        let n = u64::try_from(old.offered).unwrap();
        json["offered"] = serde_json::json!(n);
        json["transport"]["driver_features"] = serde_json::json!(n);
        let v1 = SectionKind {
            version: 1,
            ..NET_SECTION
        };
        let mut w = ContainerWriter::new("godwit-1.1").unwrap();
        w.add(&v1, 0, &json).unwrap();
        let c = Container::from_bytes(w.to_bytes(), KNOWN_SECTIONS).unwrap();
        let back: NetSnapshot = c.section(&NET_SECTION, 0).unwrap();
        assert_eq!(back.offered, old.offered);
        assert_eq!(back.transport.driver_features, old.offered);
    }
}
