//! Network devices of a VM, one job per file: [`peers`] opens each
//! `--net` peer and probes what it carries, [`builder`] decides the
//! device's ABI (machine type, overrides, strict) at boot and builds the
//! model for every peer kind (boot, restore, incoming migration),
//! [`placement`] wires its virtio-mmio transport into the VM, and
//! [`query`] answers `query-net` and `godwit probe`.

pub mod builder;
pub mod peers;
pub mod placement;
pub mod query;

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use godwit_devices::bus::{Bus, BusError};
use godwit_devices::net::tap::TapError;
use godwit_devices::vhost_net::VhostNetError;
use godwit_devices::vhost_user::{VhostUserError, VhostUserNetError};
use godwit_devices::virtio::mmio::{MmioError, MmioRestoreError, MmioTransport};
use godwit_devices::virtio::net::features;
use godwit_devices::virtio::net::{NetError, NetModel};
use godwit_devices::GuestMemory;

use crate::abi::machine_types::MachineType;
use crate::abi::strict::{self, NetAbiDecision, NetAbiError, PeerSupport};
use crate::config::net_spec::{format_mac, NetSpec};

pub use builder::{build_model, decide, DeviceConfig, Model};
pub use peers::{
    open_peer, open_tap, open_vhost_user, rechecker, tap_support, vhost_net_support,
    vhost_user_support, OpenedPeer, VhostUserPeer, VHOST_USER_ACCEPT_WAIT, VHOST_USER_CONNECT_WAIT,
    VHOST_USER_REPLY_TIMEOUT,
};
pub use placement::place;
pub use query::probe_report;

#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    #[error(transparent)]
    Abi(Box<NetAbiError>),
    #[error("{device}: {source}")]
    Tap {
        device: String,
        #[source]
        source: TapError,
    },
    #[error("{device}: {source}")]
    Device { device: String, source: NetError },
    #[error("{device}: vhost-net needs /dev/vhost-net, which this host does not have (kernel without CONFIG_VHOST_NET, or the vhost_net module not loaded); use the userspace datapath instead: --net tap,ifname={ifname}")]
    NoVhostNet { device: String, ifname: String },
    #[error("{device}: {kind} peers are not available in this godwit; use --net tap,ifname=NAME")]
    PeerUnavailable { device: String, kind: &'static str },
    #[error("too many network devices: godwit has IRQs for {max}")]
    TooMany { max: usize },
    #[error("{device}: cannot set up the virtio-mmio transport: {source}")]
    Transport {
        device: String,
        #[source]
        source: MmioError,
    },
    #[error("{device}: cannot restore the virtio-mmio transport: {source}")]
    TransportRestore {
        device: String,
        #[source]
        source: MmioRestoreError,
    },
    #[error("{device}: cannot place the virtio-mmio transport on the MMIO bus: {source}")]
    Bus {
        device: String,
        #[source]
        source: BusError,
    },
    #[error("{device}: KVM refused {what}: {source}")]
    Kvm {
        device: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("two network devices are both named '{0}': give each a distinct id=")]
    DuplicateId(String),
    #[error("{device}: {source}")]
    VhostUser {
        device: String,
        source: VhostUserError,
    },
    #[error("{device}: {source}")]
    VhostUserDevice {
        device: String,
        source: VhostUserNetError,
    },
    #[error("{device}: {source}")]
    VhostNet {
        device: String,
        source: VhostNetError,
    },
    /// The pinned interface version cannot be used (unknown to godwit and
    /// the backend).
    #[error("{device}: {source}")]
    Interface {
        device: String,
        #[source]
        source: peers::UnknownInterface,
    },
    /// The backend does not provide the pinned interface version and
    /// strict is on (a strict refusal: exit status 4).
    #[error("{device}: {detail}")]
    InterfaceStrict { device: String, detail: String },
}

impl From<NetAbiError> for NetSetupError {
    fn from(e: NetAbiError) -> Self {
        NetSetupError::Abi(Box::new(e))
    }
}

impl NetSetupError {
    /// Refusals by the strict check have their own exit status.
    pub fn is_strict_refusal(&self) -> bool {
        match self {
            NetSetupError::Abi(e) => matches!(**e, NetAbiError::Strict(_)),
            NetSetupError::InterfaceStrict { .. } => true,
            _ => false,
        }
    }
}

/// A virtio-net device of a running VM.
pub struct NetDevice {
    pub id: String,
    pub spec: NetSpec,
    pub machine: &'static MachineType,
    pub decision: NetAbiDecision,
    pub peer: PeerSupport,
    /// The device model: `VirtioNet` on a TAP, `VhostUserNet` or
    /// `VhostKernelNet`.
    pub device: Arc<Mutex<dyn NetModel>>,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub mmio_base: u64,
    pub irq: u32,
}

impl NetDevice {
    /// `virtio_mmio.device=` for the kernel command line (Linux's format).
    pub fn cmdline_fragment(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.mmio_base, self.irq)
    }

    fn model(&self) -> std::sync::MutexGuard<'_, dyn NetModel + 'static> {
        self.device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every reason this device keeps the VM from migrating: the start-up
    /// ABI decision (strict=off) and the device's own (a vhost backend
    /// without dirty logging, one that came back with fewer features).
    pub fn blockers(&self) -> Vec<String> {
        let mut out: Vec<String> = self.decision.blocker.iter().cloned().collect();
        for b in self.model().blockers() {
            let b = format!("{}: {b}", self.id);
            if !out.contains(&b) {
                out.push(b);
            }
        }
        out
    }

    /// The backend interface version in use (vhost-user), for query-net,
    /// snapshots and migration.
    pub fn interface(&self) -> Option<String> {
        self.model().interface()
    }
}

/// The default MAC of device `index`: QEMU's 52:54:00:12:34:56, counted up.
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

/// Boot: opens, probes, decides and builds every network device, and
/// places each transport in the VM.
pub fn build_all(
    specs: &[NetSpec],
    machine: &'static MachineType,
    memory: &GuestMemory,
    vm: &VmFd,
    mmio: &mut Bus,
) -> Result<Vec<NetDevice>, NetSetupError> {
    let max = placement::max_devices();
    if specs.len() > max {
        return Err(NetSetupError::TooMany { max });
    }
    let mut devices: Vec<NetDevice> = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let id = spec.id.clone().unwrap_or_else(|| format!("net{index}"));
        if devices.iter().any(|d| d.id == id) {
            return Err(NetSetupError::DuplicateId(id));
        }
        // Configuration errors first: they need no peer.
        let required =
            strict::required_features(&id, machine, &spec.features).map_err(NetAbiError::from)?;
        let pairs = strict::required_queue_pairs(&id, machine, required, spec.queue_pairs())
            .map_err(NetAbiError::from)?;
        let (opened, peer) = open_peer(&id, spec, None, pairs)?;
        let (decision, config) = decide(&id, index, spec, machine, &opened, &peer)?;
        if let Some(blocker) = &decision.blocker {
            tracing::warn!("migration blocker: {blocker}");
        }
        let model = build_model(opened, &config, memory)?;
        let transport = MmioTransport::new(memory.clone(), model.virtio).map_err(|source| {
            NetSetupError::Transport {
                device: id.clone(),
                source,
            }
        })?;
        let (mmio_base, irq) = placement::slot(index);
        let transport = place(&id, transport, mmio_base, irq, vm, mmio)?;
        tracing::info!(
            "{id}: {} on {}, offered {}, {} queue pair(s)",
            format_mac(&config.mac),
            peer.name,
            features::names(decision.offered),
            decision.queue_pairs
        );
        devices.push(NetDevice {
            id,
            spec: spec.clone(),
            machine,
            decision,
            peer,
            device: model.device,
            transport,
            mmio_base,
            irq,
        });
    }
    Ok(devices)
}
