//! Network devices of a VM: opens each `--net` peer, probes what it can
//! carry, decides the device's ABI (machine type, overrides, strict), and
//! builds the virtio-net device behind a virtio-mmio transport.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde_json::{json, Value};

use godwit_devices::bus::Bus;
use godwit_devices::net::tap::{Tap, TapError, TapOffloads, VnetHdr};
use godwit_devices::virtio::mmio::{MmioTransport, MMIO_SLOT_SIZE, NOTIFY_OFFSET};
use godwit_devices::virtio::net::features::{self, FEATURES};
use godwit_devices::virtio::net::{NetConfig, NetError, VirtioNet};
use godwit_devices::virtio::VirtioDevice;
use godwit_devices::GuestMemory;

use crate::layout::{FIRST_VIRTIO_IRQ, IOAPIC_PINS, VIRTIO_MMIO_BASE};
use crate::machine_types::MachineType;
use crate::net_abi::{self, NetAbiDecision, NetAbiError, PeerSupport};
use crate::net_spec::{format_mac, NetSpec, PeerSpec};

#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    #[error(transparent)]
    Abi(Box<NetAbiError>),
    #[error("{device}: {source}")]
    Tap { device: String, source: TapError },
    #[error("{device}: {source}")]
    Device { device: String, source: NetError },
    #[error("{device}: vhost-net needs /dev/vhost-net, which this host does not have (kernel without CONFIG_VHOST_NET, or the vhost_net module not loaded); use the userspace datapath instead: --net tap,ifname={ifname}")]
    NoVhostNet { device: String, ifname: String },
    #[error("{device}: {kind} peers are not available in this godwit; use --net tap,ifname=NAME")]
    PeerUnavailable { device: String, kind: &'static str },
    #[error("too many network devices: godwit has IRQs for {max}")]
    TooMany { max: usize },
    #[error("{device}: cannot set up the virtio-mmio transport: {detail}")]
    Transport { device: String, detail: String },
    #[error("{device}: KVM refused {what}: {source}")]
    Kvm {
        device: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("two network devices are both named '{0}': give each a distinct id=")]
    DuplicateId(String),
}

impl From<NetAbiError> for NetSetupError {
    fn from(e: NetAbiError) -> Self {
        NetSetupError::Abi(Box::new(e))
    }
}

impl NetSetupError {
    /// Refusals by the strict check have their own exit status.
    pub fn is_strict_refusal(&self) -> bool {
        matches!(self, NetSetupError::Abi(e) if matches!(**e, NetAbiError::Strict(_)))
    }
}

/// Why a TAP lacks the features it lacks.
pub fn tap_support(tap_name: &str, caps: &TapOffloads) -> PeerSupport {
    let mut supported = 0u64;
    let mut why_not = BTreeMap::new();
    for f in FEATURES.iter().filter(|f| f.supported) {
        if f.tap.satisfied_by(caps) {
            supported |= 1 << f.bit;
            continue;
        }
        let why = if !caps.vnet_hdr {
            format!("TAP {tap_name} carries no virtio-net header (vnet_hdr=off, or its fd was opened without IFF_VNET_HDR), so no offload can pass")
        } else if f.name.contains("uso") {
            "this kernel's TAP does not accept USO offloads (TUN_F_USO4|TUN_F_USO6 need Linux >= 6.2)".to_string()
        } else {
            format!(
                "this kernel's TAP does not accept the offload {} needs",
                f.name
            )
        };
        why_not.insert(f.bit, why);
    }
    PeerSupport {
        kind: "tap",
        name: format!("TAP {tap_name}"),
        supported,
        why_not,
    }
}

fn vnet_hdr_mode(v: Option<bool>) -> VnetHdr {
    match v {
        Some(true) => VnetHdr::On,
        Some(false) => VnetHdr::Off,
        None => VnetHdr::Auto,
    }
}

/// Opens the TAP a spec names (or adopts its fd).
pub fn open_tap(device: &str, spec: &NetSpec) -> Result<Tap, NetSetupError> {
    let tap_err = |source| NetSetupError::Tap {
        device: device.to_string(),
        source,
    };
    match &spec.peer {
        PeerSpec::Tap {
            ifname: Some(name),
            vnet_hdr,
            ..
        } => Tap::open(name, vnet_hdr_mode(*vnet_hdr)).map_err(tap_err),
        PeerSpec::Tap {
            fd: Some(fd),
            vnet_hdr,
            ..
        } => {
            // SAFETY: the fd number was handed to godwit by its parent for
            // this device; validity is checked (F_GETFD) before it is owned.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(tap_err(TapError::NotATap {
                    fd: *fd,
                    detail: "no such open file descriptor".into(),
                }));
            }
            // SAFETY: checked open above; godwit takes ownership of it here,
            // as the management layer that passed it intends.
            let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
            Tap::from_fd(owned, vnet_hdr_mode(*vnet_hdr)).map_err(tap_err)
        }
        PeerSpec::Tap { .. } => Err(NetSetupError::PeerUnavailable {
            device: device.to_string(),
            kind: "tap",
        }),
        PeerSpec::VhostNet { ifname } => Err(if std::path::Path::new("/dev/vhost-net").exists() {
            NetSetupError::PeerUnavailable {
                device: device.to_string(),
                kind: "vhost-net",
            }
        } else {
            NetSetupError::NoVhostNet {
                device: device.to_string(),
                ifname: ifname.clone(),
            }
        }),
        PeerSpec::VhostUser { .. } => Err(NetSetupError::PeerUnavailable {
            device: device.to_string(),
            kind: "vhost-user",
        }),
    }
}

/// A virtio-net device of a running VM.
pub struct NetDevice {
    pub id: String,
    pub spec: NetSpec,
    pub machine: &'static MachineType,
    pub decision: NetAbiDecision,
    pub peer: PeerSupport,
    pub device: Arc<Mutex<VirtioNet>>,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub mmio_base: u64,
    pub irq: u32,
}

impl NetDevice {
    /// `virtio_mmio.device=` for the kernel command line (Linux's format).
    pub fn cmdline_fragment(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.mmio_base, self.irq)
    }

    pub fn query(&self) -> Value {
        let dev = self
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let info = dev.info();
        let set = |bits: u64| json!({"hex": format!("{bits:#018x}"), "names": name_list(bits)});
        json!({
            "id": self.id,
            "machine": self.machine.name,
            "strict": self.decision.strict,
            "peer": {
                "kind": self.peer.kind,
                "name": self.peer.name,
                "vnet_hdr": info.vnet_hdr,
                "offloads": info.tap_capabilities,
                "supported": set(self.peer.supported),
                "lacks": self.peer.why_not.iter().map(|(b, why)| json!({"name": features::name_of(*b), "bit": b, "why": why})).collect::<Vec<_>>(),
            },
            "required": set(self.decision.required),
            "offered": set(info.offered_features),
            "acked": set(info.acked_features),
            "dropped": set(self.decision.dropped),
            "blockers": self.decision.blocker.iter().collect::<Vec<_>>(),
            "mac": info.mac,
            "link": if info.link_up { "up" } else { "down" },
            "mmio": {"base": format!("{:#x}", self.mmio_base), "irq": self.irq},
            "stats": info.stats,
        })
    }
}

fn name_list(bits: u64) -> Vec<String> {
    if bits == 0 {
        return Vec::new();
    }
    features::names(bits)
        .split(',')
        .map(str::to_string)
        .collect()
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

/// Opens, probes, decides and builds every network device; registers each
/// transport on the MMIO bus with its ioeventfds and irqfd.
pub fn build_all(
    specs: &[NetSpec],
    machine: &'static MachineType,
    memory: &GuestMemory,
    vm: &VmFd,
    mmio: &mut Bus,
) -> Result<Vec<NetDevice>, NetSetupError> {
    let max = usize::from(IOAPIC_PINS) - FIRST_VIRTIO_IRQ as usize;
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
        net_abi::required_features(&id, machine, &spec.features).map_err(NetAbiError::from)?;
        let tap = open_tap(&id, spec)?;
        let peer = tap_support(tap.name(), &tap.probe_offloads());
        let strict = spec.strict.unwrap_or(machine.net.strict);
        let decision = net_abi::decide(&id, &spec.text, machine, &spec.features, strict, &peer)?;
        if let Some(blocker) = &decision.blocker {
            tracing::warn!("migration blocker: {blocker}");
        }
        let config = NetConfig {
            mac: spec.mac.unwrap_or_else(|| default_mac(index)),
            features: decision.offered,
            mtu: Some(spec.mtu.unwrap_or(machine.net.mtu)),
            queue_size: machine.net.queue_size,
        };
        let dev = VirtioNet::new(tap, config).map_err(|source| NetSetupError::Device {
            device: id.clone(),
            source,
        })?;
        let device = Arc::new(Mutex::new(dev));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = MmioTransport::new(memory.clone(), as_virtio).map_err(|e| {
            NetSetupError::Transport {
                device: id.clone(),
                detail: e.to_string(),
            }
        })?;
        let mmio_base = VIRTIO_MMIO_BASE + index as u64 * MMIO_SLOT_SIZE;
        let irq = FIRST_VIRTIO_IRQ + index as u32;
        let kvm_err = |what| {
            let id = id.clone();
            move |source| NetSetupError::Kvm {
                device: id,
                what,
                source,
            }
        };
        for (queue, evt) in transport.queue_notify_eventfds().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(mmio_base + NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(kvm_err("a queue notification ioeventfd"))?;
        }
        vm.register_irqfd(transport.interrupt_eventfd(), irq)
            .map_err(kvm_err("the device interrupt irqfd"))?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(mmio_base, MMIO_SLOT_SIZE, transport.clone())
            .map_err(|e| NetSetupError::Transport {
                device: id.clone(),
                detail: e.to_string(),
            })?;
        tracing::info!(
            "{id}: {} on {}, offered {}",
            format_mac(&config_mac(&device)),
            peer.name,
            features::names(decision.offered)
        );
        devices.push(NetDevice {
            id,
            spec: spec.clone(),
            machine,
            decision,
            peer,
            device,
            transport,
            mmio_base,
            irq,
        });
    }
    Ok(devices)
}

fn config_mac(device: &Arc<Mutex<VirtioNet>>) -> [u8; 6] {
    device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .mac()
}

/// `godwit probe --net SPEC`: what the peer carries, and which machine types
/// it supports fully, without starting a VM.
pub fn probe_report(spec: &NetSpec) -> Result<Value, NetSetupError> {
    let device = spec.id.clone().unwrap_or_else(|| "probe".into());
    let tap = open_tap(&device, spec)?;
    let caps = tap.probe_offloads();
    let peer = tap_support(tap.name(), &caps);
    let machines: Vec<Value> = crate::machine_types::MACHINE_TYPES
        .iter()
        .rev()
        .map(|m| {
            let required = net_abi::required_features(&device, m, &spec.features)
                .unwrap_or_else(|_| m.net_features());
            let missing = required & !peer.supported;
            json!({"name": m.name, "supported": missing == 0, "missing": name_list(missing)})
        })
        .collect();
    Ok(json!({
        "kind": peer.kind,
        "name": peer.name,
        "vnet_hdr": tap.has_vnet_hdr(),
        "offloads": caps,
        "supported": name_list(peer.supported),
        "lacks": peer.why_not.iter().map(|(b, why)| json!({"name": features::name_of(*b), "bit": b, "why": why})).collect::<Vec<_>>(),
        "machine_types": machines,
    }))
}
