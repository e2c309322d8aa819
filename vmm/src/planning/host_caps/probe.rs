//! Taking this host's report: KVM's capabilities, the CPUID a new vCPU
//! gets, and a probe of every network peer (a temporary TAP unless one is
//! named, each named vhost-user backend, kernel vhost-net).

use std::collections::BTreeMap;
use std::path::Path;

use godwit_devices::net::tap::{Tap, TapOffloads, VnetHdr};
use godwit_devices::vhost_user::interface::InterfaceRecord;
use godwit_devices::virtio::{feature, Features};
use godwit_migration::cpu_compat::{self, CpuidEntry, Register};

use super::encoding::hex64;
use super::types::{
    backend_offer, schema_id, vhost_user_migration_blocker, CpuidInfo, GodwitInfo, HostInfo,
    HostReport, InterfaceInfo, KvmInfo, PeerEntry, PeerKind, PeerStatus, Probe, TapProbe,
    VhostNetProbe, VhostUserProbe, VHOST_F_LOG_ALL, VHOST_NET_DEVICE,
};
use crate::abi::machine_types::{self, MACHINE_TYPES};
use crate::config::net_spec::{NetSpec, PeerSpec};

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn kvm_info() -> (KvmInfo, Option<kvm_ioctls::Kvm>) {
    use kvm_ioctls::Cap;
    let kvm = match crate::vstate::vm::open_kvm() {
        Ok(k) => k,
        Err(e) => return (KvmInfo::unavailable(e.to_string()), None),
    };
    let caps: &[(Cap, &str)] = &[
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
        (Cap::MpState, "KVM_CAP_MP_STATE"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::Xsave2, "KVM_CAP_XSAVE2"),
        (Cap::Xcrs, "KVM_CAP_XCRS"),
        (Cap::TscControl, "KVM_CAP_TSC_CONTROL"),
        (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
        (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
        (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
        (Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
        (Cap::KvmclockCtrl, "KVM_CAP_KVMCLOCK_CTRL"),
        (Cap::X2ApicApi, "KVM_CAP_X2APIC_API"),
        (Cap::DirtyLogRing, "KVM_CAP_DIRTY_LOG_RING"),
    ];
    let info = KvmInfo {
        available: true,
        error: None,
        api_version: Some(kvm.get_api_version()),
        max_vcpus: Some(kvm.get_max_vcpus() as u64),
        recommended_vcpus: Some(kvm.get_nr_vcpus() as u64),
        capabilities: caps
            .iter()
            .map(|(c, n)| (n.to_string(), kvm.check_extension(*c)))
            .collect(),
    };
    (info, Some(kvm))
}

/// The feature names a CPUID table shows (named bits only).
pub fn cpu_feature_names(entries: &[CpuidEntry]) -> Vec<String> {
    let regs: &[(u32, u32, Register)] = &[
        (1, 0, Register::Edx),
        (1, 0, Register::Ecx),
        (7, 0, Register::Ebx),
        (7, 0, Register::Ecx),
        (7, 0, Register::Edx),
        (7, 1, Register::Eax),
        (0xd, 1, Register::Eax),
        (0x8000_0001, 0, Register::Ecx),
        (0x8000_0001, 0, Register::Edx),
        (0x8000_0007, 0, Register::Edx),
        (0x8000_0008, 0, Register::Ebx),
    ];
    let mut out = Vec::new();
    for &(leaf, sub, reg) in regs {
        let Some(e) = entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0 && sub == 0))
        else {
            continue;
        };
        let value = match reg {
            Register::Eax => e.eax,
            Register::Ebx => e.ebx,
            Register::Ecx => e.ecx,
            Register::Edx => e.edx,
        };
        out.extend(
            cpu_compat::feature_names(leaf, sub, reg, value)
                .into_iter()
                .filter(|n| !n.starts_with("bit ")),
        );
    }
    out
}

/// The CPUID summary of a table.
pub fn cpuid_info(entries: Vec<CpuidEntry>) -> CpuidInfo {
    let leaf = |f: u32| entries.iter().find(|e| e.function == f).copied();
    let vendor = leaf(0).map(|e| {
        let mut bytes = Vec::with_capacity(12);
        for r in [e.ebx, e.edx, e.ecx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let (family, model, stepping) = match leaf(1) {
        Some(e) => {
            let base_family = (e.eax >> 8) & 0xf;
            let ext_family = (e.eax >> 20) & 0xff;
            let base_model = (e.eax >> 4) & 0xf;
            let ext_model = (e.eax >> 16) & 0xf;
            let family = if base_family == 0xf {
                base_family + ext_family
            } else {
                base_family
            };
            let model = if base_family == 0x6 || base_family == 0xf {
                (ext_model << 4) | base_model
            } else {
                base_model
            };
            (Some(family), Some(model), Some(e.eax & 0xf))
        }
        None => (None, None, None),
    };
    CpuidInfo {
        available: true,
        error: None,
        vendor,
        family,
        model,
        stepping,
        features: cpu_feature_names(&entries),
        entries,
    }
}

/// `TUNGETFEATURES` of /dev/net/tun.
fn tun_features() -> Option<u32> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .ok()?;
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer, which
    // points to a live local; the fd is an open /dev/net/tun file.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNGETFEATURES,
            &mut features as *mut libc::c_uint,
        )
    };
    (rc >= 0).then_some(features)
}

/// Why /dev/vhost-net could not be asked for its features (the report
/// records the message as the peer's `error`).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct VhostNetProbeError(#[from] godwit_devices::vhost_net::VhostNetError);

/// Opens /dev/vhost-net and reads its features (VHOST_GET_FEATURES, and
/// VHOST_GET_FEATURES_ARRAY for bits above 63 where the kernel has it):
/// `Ok(None)` when the device does not exist.
fn vhost_net_features() -> Result<Option<Features>, VhostNetProbeError> {
    if !Path::new(VHOST_NET_DEVICE).exists() {
        return Ok(None);
    }
    Ok(Some(godwit_devices::vhost_net::probe_features()?))
}

/// Probes a TAP: the one a spec names, or (`spec` None) a temporary one
/// host-caps creates and removes (closing the fd of a non-persistent TAP
/// deletes it).
fn probe_tap(spec: Option<&NetSpec>, tun: Option<u32>) -> (PeerEntry, Option<TapOffloads>) {
    let tun_features = tun.map(|f| format!("{f:#x}"));
    // Two queues show whether a TAP is a multi-queue TAP (a temporary one
    // is, as the TAPs godwit creates for several pairs are).
    let opened = match spec {
        Some(spec) => {
            crate::devices::net::open_tap("host-caps", spec, spec.queue_pairs().unwrap_or(2))
                .map_err(|e| e.to_string())
        }
        None => Tap::open_queues("", VnetHdr::Auto, 2)
            .map(|queues| crate::devices::net::peers::OpenedTap {
                queues,
                limit: None,
            })
            .map_err(|e| e.to_string()),
    };
    let ifname = spec.and_then(|s| match &s.peer {
        PeerSpec::Tap { ifname, .. } => ifname.clone(),
        _ => None,
    });
    let text = spec.map(|s| s.text.clone());
    match opened {
        Ok(opened) => {
            let support = opened.support();
            let tap = &opened.queues[0];
            let caps = tap.probe_offloads();
            let probe = Probe::Tap(TapProbe {
                temporary: spec.is_none(),
                ifname: Some(tap.name().to_string()),
                tun_features,
                offloads: Some(caps),
            });
            (
                PeerEntry::from_support(PeerKind::Tap, text, &support, None, probe),
                Some(caps),
            )
        }
        Err(e) => {
            let name = format!(
                "TAP {}",
                ifname.clone().unwrap_or_else(|| "(temporary)".into())
            );
            let probe = Probe::Tap(TapProbe {
                temporary: spec.is_none(),
                ifname,
                tun_features,
                offloads: None,
            });
            (
                PeerEntry::failed(PeerKind::Tap, text, name, PeerStatus::Error, e, probe),
                None,
            )
        }
    }
}

fn probe_vhost_net(
    spec: Option<&NetSpec>,
    default_tap: Option<TapOffloads>,
    tun: Option<u32>,
) -> PeerEntry {
    let text = spec.map(|s| s.text.clone());
    let name = match spec.map(|s| &s.peer) {
        Some(PeerSpec::VhostNet { ifname }) => format!("vhost-net on TAP {ifname}"),
        _ => "kernel vhost-net".to_string(),
    };
    let absent = |error: String, status: PeerStatus| {
        PeerEntry::failed(
            PeerKind::VhostNet,
            text.clone(),
            name.clone(),
            status,
            error,
            Probe::VhostNet(VhostNetProbe {
                device: VHOST_NET_DEVICE.into(),
                present: status != PeerStatus::Absent,
                features: None,
                tap: None,
            }),
        )
    };
    let features = match vhost_net_features() {
        Ok(Some(f)) => f,
        Ok(None) => {
            return absent(
                format!("{VHOST_NET_DEVICE} does not exist: the kernel has no vhost-net (CONFIG_VHOST_NET) or the vhost_net module is not loaded"),
                PeerStatus::Absent,
            )
        }
        Err(e) => return absent(e.to_string(), PeerStatus::Error),
    };
    // The packet features ride on the TAP behind vhost-net, and its queues
    // bound the queue pairs (one per pair).
    let (tap_probe, offloads, queue_limit) = match spec.map(|s| &s.peer) {
        Some(PeerSpec::VhostNet { ifname }) => {
            let tap_spec = NetSpec {
                text: format!("tap,ifname={ifname}"),
                id: None,
                peer: PeerSpec::Tap {
                    ifname: Some(ifname.clone()),
                    fds: Vec::new(),
                    vnet_hdr: Some(true),
                },
                mac: None,
                mtu: None,
                strict: None,
                queues: None,
                features: BTreeMap::new(),
            };
            let (entry, caps) = probe_tap(Some(&tap_spec), tun);
            let limit = entry.queue_why.map(|why| (entry.max_queue_pairs, why));
            match (entry.probe, caps) {
                (Probe::Tap(p), Some(c)) => (Some(p), c, limit),
                _ => {
                    return absent(
                        format!(
                            "its TAP {ifname} could not be probed: {}",
                            entry.error.unwrap_or_default()
                        ),
                        PeerStatus::Error,
                    )
                }
            }
        }
        _ => match default_tap {
            Some(c) => (
                Some(TapProbe {
                    temporary: true,
                    ifname: None,
                    tun_features: tun.map(|f| format!("{f:#x}")),
                    offloads: Some(c),
                }),
                c,
                // The temporary TAP is a multi-queue TAP.
                None,
            ),
            None => {
                return absent(
                    "no TAP could be probed for the packet features vhost-net carries on a TAP"
                        .into(),
                    PeerStatus::Error,
                )
            }
        },
    };
    let tap_name = tap_probe
        .as_ref()
        .and_then(|t| t.ifname.clone())
        .unwrap_or_else(|| "(temporary)".into());
    let mut support = crate::devices::net::vhost_net_support(
        &tap_name,
        &offloads,
        features,
        queue_limit.as_ref(),
    );
    support.name = name.clone();
    let blocker = (features & feature(VHOST_F_LOG_ALL) == 0).then(|| {
        "this kernel's vhost-net lacks LOG_ALL (bit 26): it cannot log its writes, so a VM on it cannot migrate".to_string()
    });
    PeerEntry::from_support(
        PeerKind::VhostNet,
        text,
        &support,
        blocker,
        Probe::VhostNet(VhostNetProbe {
            device: VHOST_NET_DEVICE.into(),
            present: true,
            features: Some(godwit_devices::virtio::net::features::hex(features)),
            tap: tap_probe,
        }),
    )
}

/// What a vhost-user probe found, in the terms of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserOffer {
    pub features: u64,
    pub protocol_features: u64,
    pub queue_num: Option<u64>,
    pub interface: Option<InterfaceInfo>,
}

/// The report entry of a probed vhost-user backend.
pub fn vhost_user_entry(spec: Option<String>, socket: &str, offer: &VhostUserOffer) -> PeerEntry {
    let support = crate::devices::net::vhost_user_support(
        socket,
        &backend_offer(offer.features, 0, offer.queue_num),
    );
    PeerEntry::from_support(
        PeerKind::VhostUser,
        spec,
        &support,
        vhost_user_migration_blocker(offer.features, offer.protocol_features),
        Probe::VhostUser(VhostUserProbe {
            socket: socket.to_string(),
            features: Some(hex64(offer.features)),
            protocol_features: Some(hex64(offer.protocol_features)),
            queue_num: offer.queue_num,
            interface: offer.interface.clone(),
        }),
    )
}

/// The report's view of an interface record.
fn interface_info(r: &InterfaceRecord) -> InterfaceInfo {
    InterfaceInfo {
        active: r.active.clone(),
        features: Some(hex64(r.values.features)),
        pinned: r.pinned,
        latest: r.latest.clone(),
        supported: r.supported.clone(),
        truncated: r.truncated,
    }
}

/// Probes a vhost-user backend with godwit's frontend handshake
/// ([`crate::devices::net::open_vhost_user`]; pinning the spec's `interface=` if
/// given), then closes the connection.
fn probe_vhost_user(spec: &NetSpec, socket: &Path, server: bool, pin: Option<&str>) -> PeerEntry {
    let socket_s = socket.display().to_string();
    let failed = |error: String| {
        PeerEntry::failed(
            PeerKind::VhostUser,
            Some(spec.text.clone()),
            format!("vhost-user backend {socket_s}"),
            PeerStatus::Error,
            error,
            Probe::VhostUser(VhostUserProbe {
                socket: socket_s.clone(),
                features: None,
                protocol_features: None,
                queue_num: None,
                interface: None,
            }),
        )
    };
    if !server && !socket.exists() {
        return failed(format!(
            "no socket at {socket_s}: start the vhost-user backend first (or give server=on if it connects to godwit)"
        ));
    }
    let peer = match crate::devices::net::open_vhost_user("host-caps", socket, server, pin) {
        Ok(p) => p,
        Err(e) => return failed(format!("could not be probed: {e}")),
    };
    let offer = peer.session.offer.clone();
    peer.session.conn.shutdown();
    let support = crate::devices::net::vhost_user_support(&peer.socket, &offer);
    PeerEntry::from_support(
        PeerKind::VhostUser,
        Some(spec.text.clone()),
        &support,
        vhost_user_migration_blocker(offer.features, offer.protocol),
        Probe::VhostUser(VhostUserProbe {
            socket: peer.socket.clone(),
            features: Some(hex64(offer.features)),
            protocol_features: Some(hex64(offer.protocol)),
            queue_num: offer.queue_num,
            interface: offer.record.as_ref().map(interface_info),
        }),
    )
}

/// Takes this host's report. `nets` name the peers to probe; without a
/// `tap` spec a temporary TAP is probed, and kernel vhost-net is always
/// reported (present or not). `name` overrides the hostname.
pub fn collect(nets: &[NetSpec], name: Option<&str>) -> HostReport {
    let host = HostInfo {
        name: name
            .map(str::to_string)
            .or_else(|| read_trimmed("/proc/sys/kernel/hostname"))
            .unwrap_or_else(|| "unknown".into()),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        taken_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs()),
    };
    let godwit = GodwitInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        machine_types: MACHINE_TYPES.iter().map(|m| m.name.to_string()).collect(),
        newest: machine_types::newest().name.to_string(),
    };
    let (kvm, kvm_fd) = kvm_info();
    let cpuid = match &kvm_fd {
        Some(k) => match crate::vstate::state::vcpu::host_cpuid(k, 1) {
            Ok(entries) => cpuid_info(entries),
            Err(e) => CpuidInfo::unavailable(e.to_string()),
        },
        None => CpuidInfo::unavailable("KVM is not available".into()),
    };
    drop(kvm_fd);

    let tun = tun_features();
    let mut peers = Vec::new();
    let mut first_tap: Option<TapOffloads> = None;
    let tap_specs: Vec<&NetSpec> = nets
        .iter()
        .filter(|s| matches!(s.peer, PeerSpec::Tap { .. }))
        .collect();
    if tap_specs.is_empty() {
        let (entry, caps) = probe_tap(None, tun);
        first_tap = caps;
        peers.push(entry);
    }
    for spec in &tap_specs {
        let (entry, caps) = probe_tap(Some(spec), tun);
        first_tap = first_tap.or(caps);
        peers.push(entry);
    }
    for spec in nets {
        if let PeerSpec::VhostUser {
            socket,
            server,
            interface,
        } = &spec.peer
        {
            peers.push(probe_vhost_user(
                spec,
                socket,
                *server,
                interface.as_deref(),
            ));
        }
    }
    let vhost_net_specs: Vec<&NetSpec> = nets
        .iter()
        .filter(|s| matches!(s.peer, PeerSpec::VhostNet { .. }))
        .collect();
    if vhost_net_specs.is_empty() {
        peers.push(probe_vhost_net(None, first_tap, tun));
    }
    for spec in vhost_net_specs {
        peers.push(probe_vhost_net(Some(spec), first_tap, tun));
    }
    HostReport {
        schema: schema_id(),
        host,
        godwit,
        kvm,
        cpuid,
        peers,
    }
}
