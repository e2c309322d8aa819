//! Network devices of a VM: opens each `--net` peer, probes what it can
//! carry, decides the device's ABI (machine type, overrides, strict), and
//! builds the virtio-net device behind a virtio-mmio transport.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use serde_json::{json, Value};

use godwit_devices::bus::Bus;
use godwit_devices::net::tap::{Tap, TapError, TapOffloads, VnetHdr};
use godwit_devices::vhost_net::{VhostKernelNet, VhostNetConfig, VhostNetError, VhostNetPeer};
use godwit_devices::vhost_user::conn::protocol_names;
use godwit_devices::vhost_user::interface::{
    self, by_interface_name, InterfaceValues, InterfaceVersion,
};
use godwit_devices::vhost_user::session::TRANSPORT_BITS;
use godwit_devices::vhost_user::{
    backend_bits, handshake, BackendOffer, Endpoint, Recheck, Rechecker, Session, VhostUserError,
    VhostUserNet, VhostUserNetConfig, VhostUserNetError,
};
use godwit_devices::virtio::mmio::{MmioTransport, MMIO_SLOT_SIZE, NOTIFY_OFFSET};
use godwit_devices::virtio::net::features::{self, VhostNeed, FEATURES};
use godwit_devices::virtio::net::{NetConfig, NetError, NetModel, VirtioNet};
use godwit_devices::virtio::VirtioDevice;
use godwit_devices::GuestMemory;

use crate::abi::machine_types::MachineType;
use crate::abi::strict::{self, NetAbiDecision, NetAbiError, PeerSupport};
use crate::config::net_spec::{format_mac, NetSpec, PeerSpec};
use crate::vstate::layout::{FIRST_VIRTIO_IRQ, IOAPIC_PINS, VIRTIO_MMIO_BASE};

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
    #[error("{device}: {detail}")]
    Interface { device: String, detail: String },
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
    /// The device model: [`VirtioNet`] on a TAP, [`VhostUserNet`] or
    /// [`VhostKernelNet`].
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

    pub fn query(&self) -> Value {
        let blockers = self.blockers();
        let dev = self.model();
        let info = dev.info();
        let set = |bits: u64| json!({"hex": format!("{bits:#018x}"), "names": name_list(bits)});
        let mut peer = json!({
            "kind": self.peer.kind,
            "name": self.peer.name,
            "supported": set(self.peer.supported),
            "lacks": self.peer.why_not.iter().map(|(b, why)| json!({"name": features::name_of(*b), "bit": b, "why": why})).collect::<Vec<_>>(),
        });
        if let Value::Object(o) = &mut peer {
            if let Some(v) = dev.as_vhost_user() {
                let status = v.backend_status();
                o.insert("socket".into(), json!(status.socket));
                o.insert("mode".into(), json!(status.mode));
                o.insert("connected".into(), json!(status.connected));
                o.insert("rings_running".into(), json!(status.rings_running));
                o.insert("reconnects".into(), json!(status.reconnects));
                o.insert("last_error".into(), json!(status.last_error));
                o.insert("dirty_logging".into(), json!(status.logging));
                o.insert(
                    "migratable".into(),
                    json!(v
                        .logging_support()
                        .err()
                        .map_or_else(|| json!(true), |why| json!(why))),
                );
                if let Some(offer) = &status.offer {
                    o.insert(
                        "backend_features".into(),
                        json!({"hex": format!("{:#018x}", offer.features), "names": name_list(offer.features & !TRANSPORT_BITS)}),
                    );
                    o.insert(
                        "protocol_features".into(),
                        json!(format!("{:#x}", offer.protocol)),
                    );
                    o.insert(
                        "negotiated_protocol".into(),
                        json!(protocol_names(offer.acked_protocol)),
                    );
                    o.insert("queue_num".into(), json!(offer.queue_num));
                }
            } else if let Some(v) = dev.as_vhost_net() {
                o.insert("tap".into(), json!(info.tap));
                o.insert("vnet_hdr".into(), json!(info.vnet_hdr));
                o.insert(
                    "vhost_features".into(),
                    json!(format!("{:#x}", v.kernel_features())),
                );
                o.insert(
                    "migratable".into(),
                    json!(v
                        .logging_support()
                        .err()
                        .map_or_else(|| json!(true), |why| json!(why))),
                );
            } else {
                o.insert("vnet_hdr".into(), json!(info.vnet_hdr));
                o.insert("offloads".into(), json!(info.tap_capabilities));
            }
        }
        let interface = dev
            .as_vhost_user()
            .and_then(|v| v.interface_in_use())
            .map(|i| {
                let values = godwit_devices::vhost_user::interface::by_interface_name(&i.name)
                    .map(|known| json!(known.resolved()))
                    .or_else(|| i.record.as_ref().map(|r| json!(r.values)));
                json!({"name": i.name, "pinned": i.pinned, "how": i.how, "values": values})
            });
        let queues: Vec<u16> = dev.queue_max_sizes().to_vec();
        json!({
            "id": self.id,
            "machine": self.machine.name,
            "strict": self.decision.strict,
            "peer": peer,
            "interface": interface,
            "required": set(self.decision.required),
            "offered": set(info.offered_features),
            "acked": set(info.acked_features),
            "dropped": set(self.decision.dropped),
            "blockers": blockers,
            "mac": info.mac,
            "link": if info.link_up { "up" } else { "down" },
            "queue_max_sizes": queues,
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

/// How long godwit waits for each vhost-user reply.
pub const VHOST_USER_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up waits, with server=on, for the backend to connect.
pub const VHOST_USER_ACCEPT_WAIT: Duration = Duration::from_secs(30);
/// How long start-up retries connecting to a backend that is not listening
/// yet (it may be starting too).
pub const VHOST_USER_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Why a vhost-user backend lacks the features it lacks.
pub fn vhost_user_support(socket: &str, offer: &BackendOffer) -> PeerSupport {
    let mut supported = 0u64;
    let mut why_not = BTreeMap::new();
    let queues = offer.queue_num.unwrap_or(2);
    for f in FEATURES.iter().filter(|f| f.supported) {
        let lacks = match f.vhost {
            VhostNeed::Frontend => None,
            VhostNeed::QueuePairs => (queues < 2).then(|| {
                format!("vhost-user backend {socket} has {queues} queue(s) (GET_QUEUE_NUM); a queue pair needs 2")
            }),
            VhostNeed::Ring | VhostNeed::Packet => (offer.features & (1 << f.bit) == 0).then(|| {
                match &offer.record {
                    Some(r) => format!(
                        "vhost-user backend {socket} presents interface {}, which does not include {} (its GET_FEATURES = {:#x})",
                        r.active, f.name, offer.features
                    ),
                    None => format!(
                        "vhost-user backend {socket} does not offer {} (its GET_FEATURES = {:#x})",
                        f.name, offer.features
                    ),
                }
            }),
        };
        match lacks {
            None => supported |= 1 << f.bit,
            Some(why) => {
                why_not.insert(f.bit, why);
            }
        }
    }
    PeerSupport {
        kind: "vhost-user",
        name: format!("vhost-user backend {socket}"),
        supported,
        why_not,
    }
}

/// Why kernel vhost-net on a TAP lacks the features it lacks: ring features
/// come from `/dev/vhost-net`, packet features from the TAP's offloads.
pub fn vhost_net_support(tap_name: &str, caps: &TapOffloads, kernel: u64) -> PeerSupport {
    let tap = tap_support(tap_name, caps);
    let mut supported = 0u64;
    let mut why_not = BTreeMap::new();
    for f in FEATURES.iter().filter(|f| f.supported) {
        let lacks = match f.vhost {
            VhostNeed::Frontend | VhostNeed::QueuePairs => None,
            VhostNeed::Ring => (kernel & (1 << f.bit) == 0).then(|| {
                format!(
                    "{} does not offer {} (VHOST_GET_FEATURES = {kernel:#x})",
                    godwit_devices::vhost_net::VHOST_NET_PATH,
                    f.name
                )
            }),
            VhostNeed::Packet => tap.why_not.get(&f.bit).cloned(),
        };
        match lacks {
            None => supported |= 1 << f.bit,
            Some(why) => {
                why_not.insert(f.bit, why);
            }
        }
    }
    PeerSupport {
        kind: "vhost-net",
        name: format!("vhost-net on TAP {tap_name}"),
        supported,
        why_not,
    }
}

/// The values of the interface version `name` (godwit's table, else the
/// backend's record).
fn interface_values(name: &str, offer: &BackendOffer) -> Option<InterfaceValues> {
    by_interface_name(name)
        .map(InterfaceVersion::values)
        .or_else(|| offer.record.as_ref().map(|r| r.values))
}

/// Checks a pinned interface version against a backend without godwit's
/// extension (DPDK): its features and queue count against what the backend
/// offers. Returns what it lacks, one line each.
fn interface_gaps(name: &str, offer: &BackendOffer, socket: &str) -> Result<Vec<String>, String> {
    let Some(values) = interface_values(name, offer) else {
        return Err(format!(
            "interface {name} is not one godwit knows (known: {}), and vhost-user backend {socket} cannot be asked about it (it lacks godwit's interface-version extension)",
            interface::names().join(", ")
        ));
    };
    let mut gaps = Vec::new();
    let need = values.features & backend_bits();
    let missing = need & !offer.features;
    if missing != 0 {
        gaps.push(format!(
            "its GET_FEATURES ({:#x}) lacks {} of interface {name}",
            offer.features,
            features::names(missing)
        ));
    }
    if let Some(q) = offer.queue_num {
        if q < 2 * u64::from(values.queue_pairs) {
            gaps.push(format!(
                "it has {q} queues (GET_QUEUE_NUM); interface {name} has {} queue pair(s)",
                values.queue_pairs
            ));
        }
    }
    Ok(gaps)
}

/// A vhost-user backend, connected and asked what it offers.
pub struct VhostUserPeer {
    pub session: Session,
    pub endpoint: Endpoint,
    pub socket: String,
}

/// Connects to (or, with server=on, waits for) the backend of a
/// `--net vhost-user` spec, pinning its interface when one is given.
pub fn open_vhost_user(
    device: &str,
    socket: &std::path::Path,
    server: bool,
    pin: Option<&str>,
) -> Result<VhostUserPeer, NetSetupError> {
    let err = |source| NetSetupError::VhostUser {
        device: device.to_string(),
        source,
    };
    let endpoint = if server {
        Endpoint::listen(socket).map_err(err)?
    } else {
        Endpoint::client(socket)
    };
    let wait = if server {
        VHOST_USER_ACCEPT_WAIT
    } else {
        VHOST_USER_CONNECT_WAIT
    };
    let conn = endpoint
        .establish(wait, VHOST_USER_REPLY_TIMEOUT)
        .map_err(err)?;
    let session = handshake(conn, pin).map_err(err)?;
    tracing::info!(
        "{device}: vhost-user backend {}: {}",
        socket.display(),
        session.offer.describe()
    );
    Ok(VhostUserPeer {
        session,
        endpoint,
        socket: socket.display().to_string(),
    })
}

fn bits_of_set(set: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |b| set & (1u64 << b) != 0)
}

/// Decides what a returning backend may do (see [`Recheck`]).
pub(crate) fn rechecker(
    id: String,
    machine: &'static MachineType,
    socket: String,
    pin: Option<String>,
    strict: bool,
) -> Rechecker {
    Box::new(move |offer: &BackendOffer, offered: u64| {
        let peer = vhost_user_support(&socket, offer);
        let missing = offered & !peer.supported;
        let mut lines: Vec<String> = bits_of_set(missing)
            .map(|b| {
                format!(
                    "{} (bit {b}): {}",
                    features::name_of(b),
                    peer.why_not.get(&b).cloned().unwrap_or_default()
                )
            })
            .collect();
        if let (Some(name), None) = (&pin, &offer.record) {
            match interface_gaps(name, offer, &socket) {
                Ok(gaps) => lines.extend(gaps),
                Err(e) => lines.push(e),
            }
        }
        if lines.is_empty() {
            return Recheck::Accept;
        }
        if strict {
            return Recheck::Refuse(format!(
                "{id}: the vhost-user backend came back on {socket} without what the guest was offered, and strict=on: {}. The link stays down; start a backend that offers them (the same version, or interface={}), or restart the VM with --machine/feature overrides this backend supports (godwit probe --net vhost-user,socket={socket} lists them)",
                lines.join("; "),
                pin.as_deref().unwrap_or("NAME")
            ));
        }
        let dropped = strict::with_dependents(offered, missing);
        Recheck::Degrade {
            offered: offered & !dropped,
            blocker: format!(
                "{id}: strict=off and the vhost-user backend came back on {socket} with less ({}): the guest no longer sees the ABI of machine type {}",
                lines.join("; "),
                machine.name
            ),
        }
    })
}

/// A built device model and what it knows about its peer.
struct Built {
    device: Arc<Mutex<dyn NetModel>>,
    as_virtio: Arc<Mutex<dyn VirtioDevice>>,
    peer: PeerSupport,
    decision: NetAbiDecision,
    mac: [u8; 6],
}

fn build_tap(
    id: &str,
    index: usize,
    spec: &NetSpec,
    machine: &'static MachineType,
    strict: bool,
) -> Result<Built, NetSetupError> {
    let tap = open_tap(id, spec)?;
    let peer = tap_support(tap.name(), &tap.probe_offloads());
    let decision = strict::decide(id, &spec.text, machine, &spec.features, strict, &peer)?;
    let mac = spec.mac.unwrap_or_else(|| default_mac(index));
    let config = NetConfig {
        mac,
        features: decision.offered,
        mtu: Some(spec.mtu.unwrap_or(machine.net.mtu)),
        queue_size: machine.net.queue_size,
    };
    let dev = VirtioNet::new(tap, config).map_err(|source| NetSetupError::Device {
        device: id.to_string(),
        source,
    })?;
    let device = Arc::new(Mutex::new(dev));
    Ok(Built {
        as_virtio: device.clone(),
        device,
        peer,
        decision,
        mac,
    })
}

fn spec_with_strict_off(text: &str) -> String {
    let mut parts: Vec<&str> = text
        .split(',')
        .filter(|p| !p.starts_with("strict="))
        .collect();
    parts.push("strict=off");
    parts.join(",")
}

fn build_vhost_user(
    id: &str,
    index: usize,
    spec: &NetSpec,
    machine: &'static MachineType,
    strict: bool,
    (socket, server, pin): (&std::path::Path, bool, Option<&str>),
) -> Result<Built, NetSetupError> {
    let VhostUserPeer {
        session,
        endpoint,
        socket,
    } = open_vhost_user(id, socket, server, pin)?;
    // A version neither godwit nor the backend knows is a configuration
    // error, reported before anything else.
    let checked_gaps = match (pin, &session.offer.record) {
        (Some(name), None) => interface_gaps(name, &session.offer, &socket).map_err(|detail| {
            NetSetupError::Interface {
                device: id.to_string(),
                detail,
            }
        })?,
        _ => Vec::new(),
    };
    let peer = vhost_user_support(&socket, &session.offer);
    let mut decision = strict::decide(id, &spec.text, machine, &spec.features, strict, &peer)?;
    let mut queue_size = machine.net.queue_size;
    let mut mtu = spec.mtu.unwrap_or(machine.net.mtu);
    if let Some(name) = pin {
        let values = interface_values(name, &session.offer);
        let mut gaps = checked_gaps;
        if let Some(v) = values {
            if v.max_ring_size < queue_size {
                gaps.push(format!(
                    "interface {name} allows rings of {} entries; machine type {} has {queue_size}",
                    v.max_ring_size, machine.name
                ));
            }
            if spec.mtu.is_none() {
                mtu = v.mtu;
            }
        }
        if !gaps.is_empty() {
            if strict {
                return Err(NetSetupError::InterfaceStrict {
                    device: id.to_string(),
                    detail: format!(
                        "vhost-user backend {socket} does not provide interface {name}, and strict=on:\n  - {}\nRemedies (any one):\n  1. pin an interface this backend provides (one whose values it offers), or run a backend that provides {name}\n  2. let godwit go on without the guarantee (the VM gets a migration blocker):\n       --net {}",
                        gaps.join("\n  - "),
                        spec_with_strict_off(&spec.text)
                    ),
                });
            }
            let blocker = format!(
                "{id}: strict=off and vhost-user backend {socket} does not provide interface {name}: {}",
                gaps.join("; ")
            );
            tracing::warn!("{blocker}");
            decision.blocker = Some(match decision.blocker.take() {
                Some(b) => format!("{b}; {blocker}"),
                None => blocker,
            });
            if let Some(v) = values {
                queue_size = queue_size.min(v.max_ring_size);
            }
        }
    }
    let mac = spec.mac.unwrap_or_else(|| default_mac(index));
    let config = VhostUserNetConfig {
        mac,
        features: decision.offered,
        mtu,
        queue_size,
        pin: pin.map(str::to_string),
        timeout: VHOST_USER_REPLY_TIMEOUT,
    };
    let recheck = rechecker(
        id.to_string(),
        machine,
        socket.clone(),
        pin.map(str::to_string),
        strict,
    );
    let dev = VhostUserNet::new(session, endpoint, config, recheck).map_err(|source| {
        NetSetupError::VhostUserDevice {
            device: id.to_string(),
            source,
        }
    })?;
    let device = Arc::new(Mutex::new(dev));
    Ok(Built {
        as_virtio: device.clone(),
        device,
        peer,
        decision,
        mac,
    })
}

fn build_vhost_net(
    id: &str,
    index: usize,
    spec: &NetSpec,
    machine: &'static MachineType,
    strict: bool,
    ifname: &str,
    memory: &GuestMemory,
) -> Result<Built, NetSetupError> {
    if !std::path::Path::new(godwit_devices::vhost_net::VHOST_NET_PATH).exists() {
        return Err(NetSetupError::NoVhostNet {
            device: id.to_string(),
            ifname: ifname.to_string(),
        });
    }
    let tap = Tap::open(ifname, VnetHdr::On).map_err(|source| NetSetupError::Tap {
        device: id.to_string(),
        source,
    })?;
    let caps = tap.probe_offloads();
    let vhost_err = |source| NetSetupError::VhostNet {
        device: id.to_string(),
        source,
    };
    let peer_dev = VhostNetPeer::open(tap, memory).map_err(vhost_err)?;
    let peer = vhost_net_support(peer_dev.tap().name(), &caps, peer_dev.features());
    let decision = strict::decide(id, &spec.text, machine, &spec.features, strict, &peer)?;
    let mac = spec.mac.unwrap_or_else(|| default_mac(index));
    let config = VhostNetConfig {
        mac,
        features: decision.offered,
        mtu: spec.mtu.unwrap_or(machine.net.mtu),
        queue_size: machine.net.queue_size,
    };
    let dev = VhostKernelNet::new(peer_dev, config).map_err(vhost_err)?;
    let device = Arc::new(Mutex::new(dev));
    Ok(Built {
        as_virtio: device.clone(),
        device,
        peer,
        decision,
        mac,
    })
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
        strict::required_features(&id, machine, &spec.features).map_err(NetAbiError::from)?;
        let strict = spec.strict.unwrap_or(machine.net.strict);
        let built = match &spec.peer {
            PeerSpec::Tap { .. } => build_tap(&id, index, spec, machine, strict)?,
            PeerSpec::VhostUser {
                socket,
                server,
                interface,
            } => build_vhost_user(
                &id,
                index,
                spec,
                machine,
                strict,
                (socket, *server, interface.as_deref()),
            )?,
            PeerSpec::VhostNet { ifname } => {
                build_vhost_net(&id, index, spec, machine, strict, ifname, memory)?
            }
        };
        let Built {
            device,
            as_virtio,
            peer,
            decision,
            mac,
        } = built;
        if let Some(blocker) = &decision.blocker {
            tracing::warn!("migration blocker: {blocker}");
        }
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
            format_mac(&mac),
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

/// `godwit probe --net SPEC`: what the peer carries, and which machine types
/// it supports fully, without starting a VM.
pub fn probe_report(spec: &NetSpec) -> Result<Value, NetSetupError> {
    let device = spec.id.clone().unwrap_or_else(|| "probe".into());
    if let PeerSpec::VhostUser {
        socket,
        server,
        interface,
    } = &spec.peer
    {
        return probe_vhost_user(&device, spec, socket, *server, interface.as_deref());
    }
    let tap = open_tap(&device, spec)?;
    let caps = tap.probe_offloads();
    let peer = tap_support(tap.name(), &caps);
    let machines: Vec<Value> = crate::abi::machine_types::MACHINE_TYPES
        .iter()
        .rev()
        .map(|m| {
            let required = strict::required_features(&device, m, &spec.features)
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

/// `godwit probe --net vhost-user,...`: what the backend offers, its
/// interface version (with godwit's extension), and which machine types it
/// supports fully.
fn probe_vhost_user(
    device: &str,
    spec: &NetSpec,
    socket: &std::path::Path,
    server: bool,
    pin: Option<&str>,
) -> Result<Value, NetSetupError> {
    let p = open_vhost_user(device, socket, server, pin)?;
    let peer = vhost_user_support(&p.socket, &p.session.offer);
    let machines: Vec<Value> = crate::abi::machine_types::MACHINE_TYPES
        .iter()
        .rev()
        .map(|m| {
            let required = strict::required_features(device, m, &spec.features)
                .unwrap_or_else(|_| m.net_features());
            let missing = required & !peer.supported;
            json!({"name": m.name, "supported": missing == 0, "missing": name_list(missing)})
        })
        .collect();
    let offer = &p.session.offer;
    let report = json!({
        "kind": peer.kind,
        "name": peer.name,
        "backend_features": {"hex": format!("{:#018x}", offer.features), "names": name_list(offer.features & !TRANSPORT_BITS)},
        "protocol_features": format!("{:#x}", offer.protocol),
        "negotiated_protocol": protocol_names(offer.acked_protocol),
        "queue_num": offer.queue_num,
        "interface_extension": offer.extension(),
        "interface": offer.record,
        "migratable": offer.logging().err().map_or_else(|| json!(true), |why| json!(why)),
        "supported": name_list(peer.supported),
        "lacks": peer.why_not.iter().map(|(b, why)| json!({"name": features::name_of(*b), "bit": b, "why": why})).collect::<Vec<_>>(),
        "machine_types": machines,
    });
    p.session.conn.shutdown();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::machine_types::{bits_of, resolve};

    /// DPDK testpmd 22.11's GET_FEATURES.
    const DPDK: u64 = 0xd_7c66_e7cb;

    fn dpdk_offer() -> BackendOffer {
        BackendOffer {
            features: DPDK,
            protocol: 0x10cbf,
            acked_protocol: 0x1f,
            queue_num: Some(128),
            record: None,
        }
    }

    #[test]
    fn vhost_user_support_names_what_the_backend_lacks() {
        let offer = dpdk_offer();
        let p = vhost_user_support("/s", &offer);
        assert_eq!(p.kind, "vhost-user");
        for lacking in [
            "host_tso4",
            "host_tso6",
            "guest_uso4",
            "guest_uso6",
            "host_uso",
        ] {
            let bit = features::by_name(lacking).unwrap().bit;
            assert_eq!(p.supported & (1 << bit), 0, "{lacking}");
            assert_eq!(
                p.why_not[&bit],
                format!("vhost-user backend /s does not offer {lacking} (its GET_FEATURES = 0xd7c66e7cb)")
            );
        }
        // Served by godwit whatever the backend says.
        let frontend = bits_of(&[
            "mac",
            "status",
            "ctrl_vq",
            "ctrl_rx",
            "guest_announce",
            "mtu",
        ]);
        let mut without = dpdk_offer();
        without.features &= !frontend;
        assert_eq!(
            vhost_user_support("/s", &without).supported & frontend,
            frontend
        );
        // A backend with one queue cannot carry a pair (mq).
        without.queue_num = Some(1);
        let mq = features::by_name("mq").unwrap().bit;
        assert!(vhost_user_support("/s", &without).why_not[&mq].contains("GET_QUEUE_NUM"));
        // godwit-1.0 against DPDK: only host TSO (and ECN with it) missing.
        let m = resolve("godwit-1.0").unwrap();
        let d = strict::decide(
            "net0",
            "vhost-user,socket=/s",
            m,
            &BTreeMap::new(),
            false,
            &p,
        )
        .unwrap();
        assert_eq!(d.dropped, bits_of(&["host_tso4", "host_tso6", "host_ecn"]));
    }

    #[test]
    fn vhost_net_support_takes_rings_from_the_kernel_and_packets_from_the_tap() {
        let caps = TapOffloads {
            vnet_hdr: true,
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            ufo: true,
            uso: false,
        };
        let kernel = bits_of(&["mrg_rxbuf", "version_1", "event_idx"]) | (1 << 26);
        let p = vhost_net_support("t0", &caps, kernel);
        let has = |n: &str| p.supported & (1 << features::by_name(n).unwrap().bit) != 0;
        assert!(has("mrg_rxbuf") && has("event_idx") && has("csum") && has("host_tso4"));
        assert!(has("ctrl_vq") && has("mac"));
        assert!(!has("indirect_desc"), "the kernel did not offer it");
        assert!(!has("host_uso"), "the TAP lacks USO");
        let bit = features::by_name("indirect_desc").unwrap().bit;
        assert!(p.why_not[&bit].contains("/dev/vhost-net does not offer indirect_desc"));
    }

    #[test]
    fn interface_gaps_check_a_backend_without_the_extension() {
        let offer = dpdk_offer();
        let gaps = interface_gaps("org.godwit.net.v1", &offer, "/s").unwrap();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert!(gaps[0].contains("lacks host_tso4,host_tso6"), "{gaps:?}");
        let err = interface_gaps("org.example.v3", &offer, "/s").unwrap_err();
        assert!(err.contains("not one godwit knows") && err.contains("org.godwit.net.v2"));
        let mut few = dpdk_offer();
        few.features |= bits_of(&["host_tso4", "host_tso6"]);
        few.queue_num = Some(1);
        let gaps = interface_gaps("org.godwit.net.v1", &few, "/s").unwrap();
        assert!(gaps[0].contains("GET_QUEUE_NUM"), "{gaps:?}");
    }

    #[test]
    fn a_returning_backend_is_judged_by_strict() {
        let m = resolve("godwit-1.1").unwrap();
        let full = BackendOffer {
            features: m.net_features() | (1 << 30) | (1 << 26),
            ..dpdk_offer()
        };
        let offered = m.net_features();
        let mut strict = rechecker("net0".into(), m, "/s".into(), None, true);
        assert_eq!(strict(&full, offered), Recheck::Accept);
        let older = BackendOffer {
            features: full.features & !bits_of(&["guest_uso4", "guest_uso6", "host_uso"]),
            ..dpdk_offer()
        };
        match strict(&older, offered) {
            Recheck::Refuse(why) => {
                assert!(
                    why.contains("guest_uso4 (bit 54)") && why.contains("strict=on"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut lenient = rechecker("net0".into(), m, "/s".into(), None, false);
        match lenient(&older, offered) {
            Recheck::Degrade {
                offered: o,
                blocker,
            } => {
                assert_eq!(
                    o,
                    offered & !bits_of(&["guest_uso4", "guest_uso6", "host_uso"])
                );
                assert!(blocker.contains("came back") && blocker.contains("godwit-1.1"));
            }
            other => panic!("{other:?}"),
        }
    }
}
