//! The migration planner (`godwit plan`, QMP `plan`): from host capability
//! reports (see [`crate::host_caps`]), how to start a VM so that it can move
//! between all those hosts, or whether an existing VM can.
//!
//! Everything is computed from the one feature model: the machine types'
//! default ABIs ([`MACHINE_TYPES`]), [`net_abi::required_features`] and
//! [`net_abi::with_dependents`], and the supported feature set each report
//! records per peer. For a new VM, per network device:
//!
//! - `common` = the features every host's peer supports (bitwise AND);
//! - the machine type is the newest one every host's godwit runs;
//! - the overrides are `with_dependents(required, required & !common)`:
//!   every required feature some host lacks, plus what depends on it. This
//!   is the smallest set of `NAME=off` properties that makes the device's
//!   ABI fit every host (see the brute-force test below);
//! - there is no common ABI when a host has no usable peer of the kind, a
//!   peer cannot take part in migration, or a feature that cannot be turned
//!   off (VERSION_1) is missing.
//!
//! For an existing VM, per host: every feature the guest was *offered* must
//! be supported by that host's peer (the guest may use any of them at any
//! moment; the ones it acked it uses now), and the host's godwit must know
//! the VM's machine type.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use godwit_devices::vhost_user::interface::{by_interface_name, INTERFACES};
use godwit_devices::virtio::net::features::{self, NetFeature, TapNeed, VhostNeed, FEATURES};
use godwit_migration::cpu_compat::{self, CpuidEntry};

use crate::api::QmpClient;
use crate::host_caps::{
    self, hex64, name_list, FeatureSet, HostCaps, PeerEntry, PeerKind, PeerStatus, Probe,
    ReportError,
};
use crate::machine_types::{MachineType, MACHINE_TYPES};
use crate::net_abi::{self, PeerSupport};
use crate::net_spec::{NetSpec, PeerSpec};

/// The plan document's schema.
pub const PLAN_SCHEMA: &str = "godwit-plan/1";
/// `godwit plan`'s exit status when no common ABI exists (or the VM cannot
/// migrate to some host).
pub const EXIT_NO_COMMON_ABI: u8 = 5;
/// Placeholders in a command line whose peer names differ between hosts.
const TAP_PLACEHOLDER: &str = "TAPNAME";
const SOCKET_PLACEHOLDER: &str = "SOCKET";

fn bit(b: u32) -> u64 {
    1u64 << b
}

fn bits(set: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |b| set & bit(*b) != 0)
}

/// Why a plan could not be made at all (bad input; exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("no host reports given: pass the files `godwit host-caps` wrote on each host, e.g. godwit plan a.json b.json")]
    NoHosts,
    #[error("cannot read the VM from {source_desc}: {detail}")]
    Vm { source_desc: String, detail: String },
}

/// One host report and where it came from.
#[derive(Clone, Debug)]
pub struct HostInput {
    /// The file (or `hosts[N]` for an API argument).
    pub file: String,
    pub report: HostCaps,
}

impl HostInput {
    pub fn label(&self) -> String {
        format!("{} ({})", self.report.host.name, self.file)
    }
}

/// Reads report files, each checked (schema version, every field).
pub fn read_hosts(paths: &[PathBuf]) -> Result<Vec<HostInput>, PlanError> {
    if paths.is_empty() {
        return Err(PlanError::NoHosts);
    }
    paths
        .iter()
        .map(|p| {
            Ok(HostInput {
                file: p.display().to_string(),
                report: host_caps::read_report_file(p)?,
            })
        })
        .collect()
}

/// Reads reports given as JSON values (the API's `hosts` argument).
pub fn hosts_from_values(values: &[Value]) -> Result<Vec<HostInput>, PlanError> {
    if values.is_empty() {
        return Err(PlanError::NoHosts);
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let file = format!("hosts[{i}]");
            Ok(HostInput {
                report: host_caps::report_from_value(v, &file)?,
                file,
            })
        })
        .collect()
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HostRef {
    pub name: String,
    pub file: String,
    pub godwit: String,
}

fn host_refs(hosts: &[HostInput]) -> Vec<HostRef> {
    hosts
        .iter()
        .map(|h| HostRef {
            name: h.report.host.name.clone(),
            file: h.file.clone(),
            godwit: h.report.godwit.version.clone(),
        })
        .collect()
}

/// Why a device (or the VM) has no common ABI on a host, and what would
/// change that.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Blocker {
    pub host: Option<String>,
    pub peer: Option<String>,
    pub problem: String,
    pub would_change: String,
}

/// A host that lacks a feature.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HostLack {
    pub host: String,
    pub peer: String,
    pub why: String,
    pub would_change: String,
}

/// A feature of the machine type that the plan turns off.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LeftOut {
    pub name: String,
    pub bit: u32,
    /// Hosts whose peer lacks it.
    pub lacking_on: Vec<HostLack>,
    /// Left-out features it needs (the virtio spec's dependencies).
    pub depends_on: Vec<String>,
}

/// The peer a device uses on one host.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DevicePeer {
    pub host: String,
    pub peer: Option<String>,
    pub spec: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DevicePlan {
    pub id: String,
    pub kind: PeerKind,
    pub ok: bool,
    /// vhost-user: the interface version to pin (every backend lists it).
    pub interface: Option<String>,
    /// The device properties of the plan: `strict=on`, the interface, and
    /// one `NAME=off` per override, canonical names, in bit order.
    pub properties: Vec<String>,
    /// Feature names turned off (the override set).
    pub overrides: Vec<String>,
    /// The ABI the guest will be offered.
    pub offered: Option<FeatureSet>,
    /// The features every host's peer supports.
    pub common: Option<FeatureSet>,
    pub left_out: Vec<LeftOut>,
    /// The newest machine type every host carries without any override.
    pub no_override_machine: Option<String>,
    pub blockers: Vec<Blocker>,
    pub peers: Vec<DevicePeer>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HostLine {
    pub host: String,
    pub command_line: String,
}

/// Which hosts a VM can start on so that its CPUID fits every other host.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CpuPlan {
    pub checked: bool,
    /// Hosts with distinct CPUID tables.
    pub distinct_cpus: usize,
    /// Hosts whose CPUID every other (reported) host offers: a VM started
    /// there can move to any of them.
    pub start_on: Vec<String>,
    pub notes: Vec<String>,
}

/// The answer for a new VM.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Plan {
    pub schema: &'static str,
    pub ok: bool,
    pub hosts: Vec<HostRef>,
    pub machine: Option<String>,
    pub machine_notes: Vec<String>,
    pub devices: Vec<DevicePlan>,
    /// `--machine ... --net ...`, ready when every host names its peers
    /// alike (else with TAPNAME / SOCKET in place of what differs).
    pub command_line: Option<String>,
    /// The line for each host whose own peer properties differ.
    pub host_command_lines: Vec<HostLine>,
    pub blockers: Vec<Blocker>,
    pub cpu: CpuPlan,
    pub notes: Vec<String>,
}

impl Plan {
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            0
        } else {
            EXIT_NO_COMMON_ABI
        }
    }
}

/// The smallest override set: every required feature not in `common`, and
/// every required feature that depends on one of those.
pub fn minimal_overrides(required: u64, common: u64) -> u64 {
    net_abi::with_dependents(required, required & !common)
}

fn tun_hint(flags: u32) -> String {
    use godwit_devices::net::tap::{TUN_F_USO4, TUN_F_USO6};
    if flags & (TUN_F_USO4 | TUN_F_USO6) != 0 {
        "a kernel whose TAP accepts USO (TUN_F_USO4|TUN_F_USO6, Linux >= 6.2)".to_string()
    } else {
        format!("a kernel whose TAP accepts the offload flags {flags:#x}")
    }
}

/// What would give `peer` the feature `f`.
fn would_change(f: &NetFeature, peer: &PeerEntry, hosts: &[HostInput]) -> String {
    let tap_change = |tap_vnet: Option<bool>| {
        match (f.tap, tap_vnet) {
        (TapNeed::Nothing, _) => {
            format!("a godwit whose device model implements {}", f.name)
        }
        (_, Some(false)) => {
            "give the TAP virtio-net headers (vnet_hdr=on; create it with `ip tuntap add NAME mode tap vnet_hdr`)".to_string()
        }
        (TapNeed::VnetHdr, _) => "a TAP with virtio-net headers (vnet_hdr=on)".to_string(),
        (TapNeed::Offload(flags), _) => tun_hint(flags),
    }
    };
    match (&peer.probe, peer.kind) {
        (Probe::Tap(t), _) => tap_change(t.offloads.map(|o| o.vnet_hdr)),
        (Probe::VhostNet(v), _) => match f.vhost {
            VhostNeed::Ring => format!(
                "a kernel whose vhost-net offers {} ({})",
                f.name, f.spec_name
            ),
            VhostNeed::Packet => {
                tap_change(v.tap.as_ref().and_then(|t| t.offloads).map(|o| o.vnet_hdr))
            }
            _ => format!("a godwit whose device model implements {}", f.name),
        },
        (Probe::VhostUser(_), _) => match f.vhost {
            VhostNeed::QueuePairs => "a vhost-user backend with at least 2 queues".to_string(),
            VhostNeed::Frontend => format!("a godwit whose frontend implements {}", f.name),
            VhostNeed::Ring | VhostNeed::Packet => {
                // Another backend interface version that has it: godwit's
                // released versions first, then what some reported
                // backend presents.
                let with = INTERFACES
                    .iter()
                    .find(|i| i.feature_bits() & bit(f.bit) != 0)
                    .map(|i| i.name.to_string())
                    .or_else(|| {
                        hosts.iter().find_map(|h| {
                            h.report.peers.iter().find_map(|p| match &p.probe {
                                Probe::VhostUser(u) => {
                                    let i = u.interface.as_ref()?;
                                    let feats = i.features.as_deref().and_then(parse_hex)?;
                                    (feats & bit(f.bit) != 0)
                                        .then(|| format!("{} (as on host {})", i.active, h.label()))
                                }
                                _ => None,
                            })
                        })
                    });
                match with {
                    Some(v) => format!(
                        "a vhost-user backend that offers {} ({}), e.g. one presenting interface version {v} (another backend interface version)",
                        f.name, f.spec_name
                    ),
                    None => format!(
                        "a vhost-user backend that offers {} ({})",
                        f.name, f.spec_name
                    ),
                }
            }
        },
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// What would give a host a usable peer of `kind`.
fn peer_change(kind: PeerKind) -> String {
    match kind {
        PeerKind::Tap => "a working TAP (the tun driver, CAP_NET_ADMIN); take the report with `godwit host-caps --net tap,ifname=NAME`".into(),
        PeerKind::VhostUser => "a vhost-user backend on that host, named in its report: `godwit host-caps --net vhost-user,socket=PATH`".into(),
        PeerKind::VhostNet => "a kernel with vhost-net (CONFIG_VHOST_NET; modprobe vhost_net), then take the report again".into(),
    }
}

/// The peer `device` of kind `kind` (its `index`-th of that kind) uses on
/// each host, or why it has none.
fn device_peer(
    h: &HostInput,
    kind: PeerKind,
    index: usize,
) -> Result<(&PeerEntry, PeerSupport), Blocker> {
    let Some(peer) = h.report.peer(kind, index) else {
        let have = h.report.peers.iter().filter(|p| p.kind == kind).count();
        return Err(Blocker {
            host: Some(h.label()),
            peer: None,
            problem: if have == 0 {
                format!("its report has no {kind} peer")
            } else {
                format!(
                    "its report has {have} {kind} peer(s); this device needs peer number {}",
                    index + 1
                )
            },
            would_change: peer_change(kind),
        });
    };
    let Some(support) = peer.support() else {
        let why = peer
            .error
            .clone()
            .unwrap_or_else(|| "it could not be probed".into());
        return Err(Blocker {
            host: Some(h.label()),
            peer: Some(peer.name.clone()),
            problem: match peer.status {
                PeerStatus::Absent => format!("{} is absent: {why}", peer.name),
                _ => format!("{} could not be probed: {why}", peer.name),
            },
            would_change: peer_change(kind),
        });
    };
    if let Some(b) = &peer.migration_blocker {
        return Err(Blocker {
            host: Some(h.label()),
            peer: Some(peer.name.clone()),
            problem: b.clone(),
            would_change: match kind {
                PeerKind::VhostUser => {
                    "a vhost-user backend with feature LOG_ALL and protocol feature LOG_SHMFD"
                        .into()
                }
                _ => "a kernel whose vhost-net offers LOG_ALL".into(),
            },
        });
    }
    Ok((peer, support))
}

/// The peer properties of a host's spec, e.g. `[("ifname", "gwtap0")]`;
/// feature, strict and interface properties are the plan's to set.
fn peer_props(spec: Option<&str>) -> Vec<(String, String)> {
    let parsed = spec.and_then(|s| s.parse::<NetSpec>().ok());
    let onoff = |b: bool| if b { "on" } else { "off" }.to_string();
    match parsed.map(|s| s.peer) {
        Some(PeerSpec::Tap {
            ifname,
            fd,
            vnet_hdr,
        }) => {
            let mut v = Vec::new();
            if let Some(n) = ifname {
                v.push(("ifname".into(), n));
            }
            if let Some(fd) = fd {
                v.push(("fd".into(), fd.to_string()));
            }
            if let Some(h) = vnet_hdr {
                v.push(("vnet_hdr".into(), onoff(h)));
            }
            v
        }
        Some(PeerSpec::VhostUser { socket, server, .. }) => {
            let mut v = vec![("socket".to_string(), socket.display().to_string())];
            if server {
                v.push(("server".into(), "on".into()));
            }
            v
        }
        Some(PeerSpec::VhostNet { ifname }) => vec![("ifname".into(), ifname)],
        None => Vec::new(),
    }
}

fn placeholder(kind: PeerKind, key: &str) -> Option<String> {
    match (kind, key) {
        (_, "ifname") => Some(TAP_PLACEHOLDER.into()),
        (_, "socket") => Some(SOCKET_PLACEHOLDER.into()),
        (_, "fd") => Some("FD".into()),
        _ => None,
    }
}

/// The peer part common to all hosts: keys all hosts agree on, a
/// placeholder for a name that differs (or is missing), host-local options
/// (vnet_hdr, server) only when all agree.
fn common_peer_props(kind: PeerKind, per_host: &[Vec<(String, String)>]) -> Vec<(String, String)> {
    let mut keys: Vec<String> = Vec::new();
    for props in per_host {
        for (k, _) in props {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let name_key = match kind {
        PeerKind::VhostUser => "socket",
        _ => "ifname",
    };
    if !keys.iter().any(|k| k == name_key || k == "fd") {
        keys.insert(0, name_key.to_string());
    }
    let mut out = Vec::new();
    for k in keys {
        let values: Vec<Option<&String>> = per_host
            .iter()
            .map(|p| p.iter().find(|(kk, _)| *kk == k).map(|(_, v)| v))
            .collect();
        let first = values.first().copied().flatten();
        if first.is_some() && values.iter().all(|v| *v == first) {
            if let Some(v) = first {
                out.push((k, v.clone()));
            }
        } else if let Some(p) = placeholder(kind, &k) {
            out.push((k, p));
        }
    }
    out
}

fn spec_text(kind: PeerKind, peer: &[(String, String)], properties: &[String]) -> String {
    let mut parts = vec![kind.as_str().to_string()];
    parts.extend(peer.iter().map(|(k, v)| format!("{k}={v}")));
    parts.extend(properties.iter().cloned());
    parts.join(",")
}

/// What would let every backend present `f` under a common pin: the oldest
/// released interface version that has it, on the backends that do not
/// list it.
fn interface_change(f: &NetFeature, found: &[(&HostInput, &PeerEntry, PeerSupport)]) -> String {
    let Some(version) = INTERFACES
        .iter()
        .find(|i| i.feature_bits() & bit(f.bit) != 0)
    else {
        return format!(
            "backends that all list an interface version that includes {}",
            f.name
        );
    };
    let lacking: Vec<String> = found
        .iter()
        .filter(|(_, p, _)| match &p.probe {
            Probe::VhostUser(u) => !u
                .interface
                .as_ref()
                .is_some_and(|i| i.supported.iter().any(|n| n == version.name)),
            _ => false,
        })
        .map(|(h, _, _)| h.label())
        .collect();
    format!(
        "another backend interface version: a backend that lists {} (it includes {}) on {}",
        version.name,
        f.name,
        lacking.join(", ")
    )
}

/// The interface version every vhost-user backend lists (the newest such),
/// and its feature bits; or why none is pinned.
fn pick_interface(peers: &[(&HostInput, &PeerEntry)]) -> Result<(String, u64), String> {
    let mut lists = Vec::new();
    for (h, p) in peers {
        let Probe::VhostUser(u) = &p.probe else {
            return Err("not a vhost-user peer".into());
        };
        match &u.interface {
            Some(i) => lists.push((h, i)),
            None => {
                return Err(format!(
                    "no interface version is pinned: the backend on {} lacks godwit's interface-version extension (it presents one fixed feature set)",
                    h.label()
                ))
            }
        }
    }
    let Some((_, first)) = lists.first() else {
        return Err("no backends".into());
    };
    let name = first
        .supported
        .iter()
        .rev()
        .find(|n| lists.iter().all(|(_, i)| i.supported.contains(n)))
        .cloned()
        .ok_or_else(|| {
            format!(
                "no interface version is pinned: no version is listed by every backend ({}); a backend supporting another interface version would change that",
                lists
                    .iter()
                    .map(|(h, i)| format!("{}: {}", h.label(), i.supported.join(",")))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
    // Released versions are immutable: godwit's table, else a backend
    // that presents it now.
    let features = by_interface_name(&name)
        .map(|i| i.feature_bits())
        .or_else(|| {
            lists.iter().find_map(|(_, i)| {
                (i.active == name)
                    .then(|| i.features.as_deref().and_then(parse_hex))
                    .flatten()
            })
        })
        .ok_or_else(|| {
            format!(
                "interface version {name} is listed by every backend but this godwit does not know it and no backend presents it now, so its features are not in the reports; plan with a newer godwit, or take a report where a backend presents it (vhost-user,...,interface={name})"
            )
        })?;
    Ok((name, features))
}

/// Plans device `id` (kind `kind`, the `index`-th of that kind).
fn plan_device(
    id: &str,
    kind: PeerKind,
    index: usize,
    machine: Option<&'static MachineType>,
    machines: &[&'static MachineType],
    hosts: &[HostInput],
) -> DevicePlan {
    let mut d = DevicePlan {
        id: id.to_string(),
        kind,
        ok: false,
        interface: None,
        properties: Vec::new(),
        overrides: Vec::new(),
        offered: None,
        common: None,
        left_out: Vec::new(),
        no_override_machine: None,
        blockers: Vec::new(),
        peers: Vec::new(),
        notes: Vec::new(),
    };
    let mut found: Vec<(&HostInput, &PeerEntry, PeerSupport)> = Vec::new();
    for h in hosts {
        let peer = h.report.peer(kind, index);
        d.peers.push(DevicePeer {
            host: h.label(),
            peer: peer.map(|p| p.name.clone()),
            spec: peer.and_then(|p| p.spec.clone()),
        });
        match device_peer(h, kind, index) {
            Ok((p, s)) => found.push((h, p, s)),
            Err(b) => d.blockers.push(b),
        }
    }
    if !d.blockers.is_empty() {
        return d;
    }
    // vhost-user: pin the newest interface version every backend lists.
    let mut pin_removed: Vec<u64> = vec![0; found.len()];
    if kind == PeerKind::VhostUser {
        let pairs: Vec<(&HostInput, &PeerEntry)> = found.iter().map(|(h, p, _)| (*h, *p)).collect();
        match pick_interface(&pairs) {
            Ok((name, feats)) => {
                for ((_, p, s), removed) in found.iter_mut().zip(pin_removed.iter_mut()) {
                    let Probe::VhostUser(u) = &p.probe else {
                        continue;
                    };
                    let pinned = host_caps::vhost_user_support(&u.socket, feats, u.queue_num);
                    // Pinned, a backend with the extension presents exactly
                    // that version's features, whatever its default is.
                    let before = s.supported;
                    *removed = before & !pinned.supported;
                    s.supported = pinned.supported;
                    s.why_not = pinned.why_not;
                    for b in bits(*removed) {
                        s.why_not.insert(
                            b,
                            format!("interface {name} (the newest version every backend lists) does not include it"),
                        );
                    }
                }
                d.interface = Some(name);
            }
            Err(note) => d.notes.push(note),
        }
    }
    let common = found
        .iter()
        .fold(u64::MAX, |acc, (_, _, s)| acc & s.supported);
    d.common = Some(FeatureSet::of(common));
    d.no_override_machine = machines
        .iter()
        .find(|m| m.net_features() & !common == 0)
        .map(|m| m.name.to_string());
    let Some(machine) = machine else {
        return d;
    };
    let required = machine.net_features();
    let missing = required & !common;
    // Features that cannot be turned off block.
    for f in FEATURES
        .iter()
        .filter(|f| f.always && missing & bit(f.bit) != 0)
    {
        for (h, p, s) in &found {
            if s.supported & bit(f.bit) == 0 {
                d.blockers.push(Blocker {
                    host: Some(h.label()),
                    peer: Some(p.name.clone()),
                    problem: format!(
                        "{} lacks {} ({}), which every virtio 1.x device offers and cannot be turned off: {}",
                        p.name,
                        f.name,
                        f.spec_name,
                        s.why_not.get(&f.bit).cloned().unwrap_or_default()
                    ),
                    would_change: would_change(f, p, hosts),
                });
            }
        }
    }
    if !d.blockers.is_empty() {
        return d;
    }
    let overrides = minimal_overrides(required, common);
    let map: BTreeMap<String, bool> = bits(overrides)
        .map(|b| (features::name_of(b), false))
        .collect();
    match net_abi::required_features(id, machine, &map) {
        Ok(offered) if offered & !common == 0 => {
            d.offered = Some(FeatureSet::of(offered));
        }
        Ok(offered) => {
            d.blockers.push(Blocker {
                host: None,
                peer: None,
                problem: format!(
                    "the overrides leave {} that some host lacks",
                    features::names(offered & !common)
                ),
                would_change: "report this as a godwit bug".into(),
            });
            return d;
        }
        Err(e) => {
            d.blockers.push(Blocker {
                host: None,
                peer: None,
                problem: e.to_string(),
                would_change: "report this as a godwit bug".into(),
            });
            return d;
        }
    }
    for b in bits(overrides) {
        let Some(f) = features::lookup(b) else {
            continue;
        };
        let lacking_on = found
            .iter()
            .zip(&pin_removed)
            .filter(|((_, _, s), _)| s.supported & bit(b) == 0)
            .map(|((h, p, s), removed)| HostLack {
                host: h.label(),
                peer: p.name.clone(),
                why: s
                    .why_not
                    .get(&b)
                    .cloned()
                    .unwrap_or_else(|| "not supported".into()),
                would_change: if removed & bit(b) != 0 {
                    interface_change(f, &found)
                } else {
                    would_change(f, p, hosts)
                },
            })
            .collect();
        let depends_on = f
            .requires_all
            .iter()
            .chain(f.requires_any)
            .filter(|dep| overrides & bit(**dep) != 0)
            .map(|dep| features::name_of(*dep))
            .collect();
        d.left_out.push(LeftOut {
            name: f.name.to_string(),
            bit: b,
            lacking_on,
            depends_on,
        });
    }
    d.overrides = bits(overrides).map(features::name_of).collect();
    d.properties.push("strict=on".into());
    if let Some(i) = &d.interface {
        d.properties.push(format!("interface={i}"));
    }
    d.properties
        .extend(d.overrides.iter().map(|n| format!("{n}=off")));
    d.ok = true;
    d
}

/// CPU: groups hosts by identical CPUID tables and finds the groups whose
/// table every other group's hosts offer.
fn plan_cpu(hosts: &[HostInput]) -> CpuPlan {
    const MAX_GROUPS: usize = 64;
    let mut groups: Vec<(&[CpuidEntry], Vec<String>)> = Vec::new();
    let mut notes = Vec::new();
    for h in hosts {
        let e = &h.report.cpuid.entries;
        if e.is_empty() {
            notes.push(format!(
                "{}: the report has no CPUID table; CPU compatibility with it is not checked",
                h.label()
            ));
            continue;
        }
        match groups.iter_mut().find(|(t, _)| *t == e.as_slice()) {
            Some((_, names)) => names.push(h.label()),
            None => groups.push((e.as_slice(), vec![h.label()])),
        }
    }
    if groups.is_empty() {
        return CpuPlan {
            checked: false,
            distinct_cpus: 0,
            start_on: Vec::new(),
            notes,
        };
    }
    if groups.len() > MAX_GROUPS {
        notes.push(format!(
            "{} distinct CPUID tables: too many to compare pairwise here; compare fewer hosts",
            groups.len()
        ));
        return CpuPlan {
            checked: false,
            distinct_cpus: groups.len(),
            start_on: Vec::new(),
            notes,
        };
    }
    let mut start_on = Vec::new();
    for (i, (table, names)) in groups.iter().enumerate() {
        let fits_all = groups
            .iter()
            .enumerate()
            .all(|(j, (other, _))| i == j || cpu_compat::check_cpuid(table, other).is_empty());
        if fits_all {
            start_on.extend(names.iter().cloned());
        }
    }
    if start_on.is_empty() {
        notes.push("no host's CPUID is offered by every other host: a VM started on any of them could not move to all the others (godwit has no CPU models)".into());
    }
    CpuPlan {
        checked: true,
        distinct_cpus: groups.len(),
        start_on,
        notes,
    }
}

fn usable_everywhere(hosts: &[HostInput], kind: PeerKind) -> bool {
    hosts.iter().all(|h| {
        h.report
            .peer(kind, 0)
            .is_some_and(|p| p.status == PeerStatus::Ok)
    })
}

/// Plans a new VM over `hosts`. `devices` lists the network devices' peer
/// kinds; empty: one device per kind every host can probe.
pub fn plan(hosts: &[HostInput], devices: &[PeerKind]) -> Result<Plan, PlanError> {
    if hosts.is_empty() {
        return Err(PlanError::NoHosts);
    }
    let mut notes = Vec::new();
    let mut blockers = Vec::new();
    // Machine types every host's godwit runs, newest first.
    let machines: Vec<&'static MachineType> = MACHINE_TYPES
        .iter()
        .rev()
        .filter(|m| {
            hosts
                .iter()
                .all(|h| h.report.godwit.machine_types.iter().any(|n| n == m.name))
        })
        .collect();
    let machine = machines.first().copied();
    let mut machine_notes = Vec::new();
    for m in MACHINE_TYPES.iter().rev() {
        if machine.is_some_and(|c| c.name == m.name) {
            break;
        }
        let lacking: Vec<String> = hosts
            .iter()
            .filter(|h| !h.report.godwit.machine_types.iter().any(|n| n == m.name))
            .map(|h| format!("{} (godwit {})", h.label(), h.report.godwit.version))
            .collect();
        machine_notes.push(format!(
            "{} is not used: unknown to the godwit of {}",
            m.name,
            lacking.join(", ")
        ));
    }
    if machine.is_none() {
        blockers.push(Blocker {
            host: None,
            peer: None,
            problem: "no machine type is run by every host's godwit".into(),
            would_change: "upgrade godwit on the hosts whose machine type list is older".into(),
        });
    }
    let kinds: Vec<PeerKind> = if devices.is_empty() {
        let all: Vec<PeerKind> = PeerKind::ALL
            .into_iter()
            .filter(|k| usable_everywhere(hosts, *k))
            .collect();
        for k in PeerKind::ALL {
            let some = hosts
                .iter()
                .filter(|h| {
                    h.report
                        .peer(k, 0)
                        .is_some_and(|p| p.status == PeerStatus::Ok)
                })
                .count();
            if !all.contains(&k) && some > 0 {
                notes.push(format!(
                    "no {k} device planned: only {some} of {} hosts have a usable {k} peer (ask for one with --device {k} to see what blocks it)",
                    hosts.len()
                ));
            }
        }
        if all.is_empty() {
            // Show what blocks each kind some host reports.
            let reported: Vec<PeerKind> = PeerKind::ALL
                .into_iter()
                .filter(|k| hosts.iter().any(|h| h.report.peer(*k, 0).is_some()))
                .collect();
            blockers.push(Blocker {
                host: None,
                peer: None,
                problem: "no peer kind is usable on every host".into(),
                would_change: "give every host a peer of one kind (see each device's blockers)"
                    .into(),
            });
            reported
        } else {
            all
        }
    } else {
        devices.to_vec()
    };
    let mut seen: BTreeMap<PeerKind, usize> = BTreeMap::new();
    let mut plans = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let index = seen.entry(*kind).or_insert(0);
        plans.push(plan_device(
            &format!("net{i}"),
            *kind,
            *index,
            machine,
            &machines,
            hosts,
        ));
        *index += 1;
    }
    let ok = blockers.is_empty() && machine.is_some() && plans.iter().all(|d| d.ok);
    let (command_line, host_command_lines) = match (ok, machine) {
        (true, Some(m)) => command_lines(m, &plans, hosts),
        _ => (None, Vec::new()),
    };
    Ok(Plan {
        schema: PLAN_SCHEMA,
        ok,
        hosts: host_refs(hosts),
        machine: machine.map(|m| m.name.to_string()),
        machine_notes,
        devices: plans,
        command_line,
        host_command_lines,
        blockers,
        cpu: plan_cpu(hosts),
        notes,
    })
}

fn command_lines(
    machine: &MachineType,
    plans: &[DevicePlan],
    hosts: &[HostInput],
) -> (Option<String>, Vec<HostLine>) {
    let mut seen: BTreeMap<PeerKind, usize> = BTreeMap::new();
    let mut generic = vec![format!("--machine {}", machine.name)];
    let mut per_host: Vec<Vec<String>> = hosts
        .iter()
        .map(|_| vec![format!("--machine {}", machine.name)])
        .collect();
    for d in plans {
        let index = seen.entry(d.kind).or_insert(0);
        let props: Vec<Vec<(String, String)>> = hosts
            .iter()
            .map(|h| {
                peer_props(
                    h.report
                        .peer(d.kind, *index)
                        .and_then(|p| p.spec.as_deref()),
                )
            })
            .collect();
        *index += 1;
        let common = common_peer_props(d.kind, &props);
        generic.push(format!(
            "--net {}",
            spec_text(d.kind, &common, &d.properties)
        ));
        for (line, p) in per_host.iter_mut().zip(&props) {
            let own = if p
                .iter()
                .any(|(k, _)| k == "ifname" || k == "socket" || k == "fd")
            {
                p.clone()
            } else {
                common.clone()
            };
            line.push(format!("--net {}", spec_text(d.kind, &own, &d.properties)));
        }
    }
    let generic = generic.join(" ");
    let lines = hosts
        .iter()
        .zip(per_host)
        .map(|(h, l)| HostLine {
            host: h.label(),
            command_line: l.join(" "),
        })
        .filter(|l| l.command_line != generic)
        .collect();
    (Some(generic), lines)
}

fn group_left_out(d: &DevicePlan) -> Vec<String> {
    // One line per distinct set of reasons: a TAP without vnet header
    // explains a dozen features at once.
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for l in &d.left_out {
        let mut why: Vec<String> = l
            .lacking_on
            .iter()
            .map(|h| {
                format!(
                    "lacking on {}: {} ({}); would change: {}",
                    h.host, h.peer, h.why, h.would_change
                )
            })
            .collect();
        if !l.depends_on.is_empty() {
            why.push(format!("needs {}, left out", l.depends_on.join(" or ")));
        }
        let key = why.join("; ");
        let item = format!("{} (bit {})", l.name, l.bit);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, items)) => items.push(item),
            None => groups.push((key, vec![item])),
        }
    }
    groups
        .into_iter()
        .map(|(why, items)| format!("{}: {why}", items.join(", ")))
        .collect()
}

/// The plan as text: the ready line first, then `#` comments.
pub fn render_plan(p: &Plan) -> String {
    let mut out = String::new();
    let hosts: Vec<String> = p
        .hosts
        .iter()
        .map(|h| format!("{} ({})", h.name, h.file))
        .collect();
    if let Some(line) = &p.command_line {
        out.push_str(line);
        out.push('\n');
        out.push_str(&format!(
            "# plan over {} host(s): {}\n",
            p.hosts.len(),
            hosts.join(", ")
        ));
        for l in &p.host_command_lines {
            out.push_str(&format!("# on {}: {}\n", l.host, l.command_line));
        }
        if line.contains(TAP_PLACEHOLDER) || line.contains(SOCKET_PLACEHOLDER) {
            out.push_str(&format!("# replace {TAP_PLACEHOLDER} / {SOCKET_PLACEHOLDER} with each host's own TAP / socket (the reports name none, or different ones)\n"));
        }
    } else {
        out.push_str(&format!(
            "no common ABI over {} host(s): {}\n",
            p.hosts.len(),
            hosts.join(", ")
        ));
    }
    let c = if p.ok { "# " } else { "  " };
    if let Some(m) = &p.machine {
        out.push_str(&format!(
            "{c}machine type {m}: the newest every host's godwit runs\n"
        ));
    }
    for n in &p.machine_notes {
        out.push_str(&format!("{c}{n}\n"));
    }
    for b in &p.blockers {
        out.push_str(&format!(
            "{c}blocked: {}; would change: {}\n",
            b.problem, b.would_change
        ));
    }
    for d in &p.devices {
        let head = match &d.interface {
            Some(i) => format!("{} ({}, interface {i})", d.id, d.kind),
            None => format!("{} ({})", d.id, d.kind),
        };
        if !d.ok {
            out.push_str(&format!("{c}{head}: no common ABI:\n"));
            for b in &d.blockers {
                let host = b.host.clone().unwrap_or_else(|| "every host".into());
                out.push_str(&format!(
                    "{c}  - {host}: {}; would change: {}\n",
                    b.problem, b.would_change
                ));
            }
        } else {
            if let Some(o) = &d.offered {
                out.push_str(&format!(
                    "{c}{head}: the guest is offered {}\n",
                    o.names.join(",")
                ));
            }
            if d.left_out.is_empty() {
                out.push_str(&format!("{c}{head}: nothing left out\n"));
            } else {
                out.push_str(&format!("{c}{head}: left out ({}):\n", d.left_out.len()));
                for line in group_left_out(d) {
                    out.push_str(&format!("{c}  - {line}\n"));
                }
                match &d.no_override_machine {
                    Some(m) => out.push_str(&format!(
                        "{c}{head}: machine type {m} fits every host without overrides (the same ABI or less)\n"
                    )),
                    None => out.push_str(&format!(
                        "{c}{head}: no machine type fits every host without overrides\n"
                    )),
                }
            }
        }
        for n in &d.notes {
            out.push_str(&format!("{c}{}: {n}\n", d.id));
        }
    }
    if p.cpu.checked {
        out.push_str(&format!(
            "{c}CPU: {} distinct CPUID table(s); a VM started on {} can move to every other host\n",
            p.cpu.distinct_cpus,
            if p.cpu.start_on.is_empty() {
                "none of them".to_string()
            } else {
                p.cpu.start_on.join(", ")
            }
        ));
    }
    for n in p.cpu.notes.iter().chain(&p.notes) {
        out.push_str(&format!("{c}{n}\n"));
    }
    out
}

// ---------------------------------------------------------------------------
// An existing VM.

/// One network device of an existing VM.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmDevice {
    pub id: String,
    pub kind: PeerKind,
    pub offered: u64,
    pub acked: u64,
    /// vhost-user: the interface version it was started with.
    pub interface: Option<String>,
}

/// What the planner needs of an existing VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmView {
    /// `snapshot DIR`, `API socket PATH`, `this VM`.
    pub source: String,
    pub machine: String,
    pub devices: Vec<VmDevice>,
    /// The VM's migration blockers.
    pub blockers: Vec<String>,
    /// The vCPUs' CPUID, when the source reports it.
    pub cpuid: Option<Vec<CpuidEntry>>,
}

/// One reason a VM cannot move to a host.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmReason {
    pub device: Option<String>,
    pub feature: Option<String>,
    pub bit: Option<u32>,
    /// Whether the guest acked the feature (it uses it now).
    pub acked: Option<bool>,
    pub peer: Option<String>,
    pub problem: String,
    pub would_change: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HostVerdict {
    pub host: String,
    pub file: String,
    pub can_migrate: bool,
    pub reasons: Vec<VmReason>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmDeviceSummary {
    pub id: String,
    pub kind: PeerKind,
    pub offered: FeatureSet,
    pub acked: FeatureSet,
    pub interface: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmSummary {
    pub source: String,
    pub machine: String,
    pub devices: Vec<VmDeviceSummary>,
    pub blockers: Vec<String>,
    pub cpuid_checked: bool,
}

/// The answer for an existing VM.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmPlan {
    pub schema: &'static str,
    pub ok: bool,
    pub vm: VmSummary,
    pub hosts: Vec<HostVerdict>,
}

impl VmPlan {
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            0
        } else {
            EXIT_NO_COMMON_ABI
        }
    }
}

fn reason(problem: String) -> VmReason {
    VmReason {
        device: None,
        feature: None,
        bit: None,
        acked: None,
        peer: None,
        problem,
        would_change: None,
    }
}

fn verdict(vm: &VmView, h: &HostInput, hosts: &[HostInput]) -> HostVerdict {
    let mut reasons = Vec::new();
    let mut notes = Vec::new();
    for b in &vm.blockers {
        reasons.push(VmReason {
            would_change: Some(
                "restart the VM with a plan for these hosts (godwit plan HOST.json...)".into(),
            ),
            ..reason(format!("the VM has a migration blocker: {b}"))
        });
    }
    if !h.report.godwit.machine_types.contains(&vm.machine) {
        reasons.push(VmReason {
            would_change: Some(format!(
                "a godwit on {} that runs machine type {}",
                h.label(),
                vm.machine
            )),
            ..reason(format!(
                "its godwit {} does not run machine type {} (it runs {})",
                h.report.godwit.version,
                vm.machine,
                h.report.godwit.machine_types.join(", ")
            ))
        });
    }
    let mut seen: BTreeMap<PeerKind, usize> = BTreeMap::new();
    for dev in &vm.devices {
        let index = seen.entry(dev.kind).or_insert(0);
        let peer = device_peer(h, dev.kind, *index);
        *index += 1;
        let (p, s) = match peer {
            Ok(x) => x,
            Err(b) => {
                reasons.push(VmReason {
                    device: Some(dev.id.clone()),
                    peer: b.peer,
                    would_change: Some(b.would_change),
                    ..reason(b.problem)
                });
                continue;
            }
        };
        if let (Some(want), Probe::VhostUser(u)) = (&dev.interface, &p.probe) {
            if let Some(i) = &u.interface {
                if !i.supported.contains(want) {
                    reasons.push(VmReason {
                        device: Some(dev.id.clone()),
                        peer: Some(p.name.clone()),
                        would_change: Some(format!(
                            "a backend on {} that supports interface version {want} (another backend interface version)",
                            h.label()
                        )),
                        ..reason(format!(
                            "the VM's device was started with interface version {want}, which {} does not list (it lists {})",
                            p.name,
                            i.supported.join(", ")
                        ))
                    });
                }
            }
        }
        let missing = dev.offered & !s.supported;
        // Acked first: the guest uses those now.
        let mut missing_bits: Vec<u32> = bits(missing).collect();
        missing_bits.sort_by_key(|b| (dev.acked & bit(*b) == 0, *b));
        for b in missing_bits {
            let acked = dev.acked & bit(b) != 0;
            let name = features::name_of(b);
            let why = s
                .why_not
                .get(&b)
                .cloned()
                .unwrap_or_else(|| "not supported".into());
            reasons.push(VmReason {
                device: Some(dev.id.clone()),
                feature: Some(name.clone()),
                bit: Some(b),
                acked: Some(acked),
                peer: Some(p.name.clone()),
                problem: if acked {
                    format!("{name} (bit {b}) was acked by the guest, which uses it now, and {} lacks it: {why}", p.name)
                } else {
                    format!("{name} (bit {b}) was offered to the guest (not acked now, but its driver may take it at any reset), and {} lacks it: {why}", p.name)
                },
                would_change: features::lookup(b).map(|f| would_change(f, p, hosts)),
            });
        }
    }
    match &vm.cpuid {
        Some(cpuid) if !h.report.cpuid.entries.is_empty() => {
            for inc in cpu_compat::check_cpuid(cpuid, &h.report.cpuid.entries) {
                reasons.push(VmReason {
                    would_change: Some("a host whose CPU and KVM offer what the guest was shown".into()),
                    ..reason(format!("CPUID: {inc}"))
                });
            }
        }
        Some(_) => notes.push("CPUID not checked: the report has no CPUID table".into()),
        None => notes.push(format!(
            "CPUID not checked: {} does not report the vCPUs' CPUID (the migration handshake checks it)",
            vm.source
        )),
    }
    HostVerdict {
        host: h.label(),
        file: h.file.clone(),
        can_migrate: reasons.is_empty(),
        reasons,
        notes,
    }
}

/// Whether an existing VM can migrate to each host, and why not.
pub fn plan_vm(hosts: &[HostInput], vm: &VmView) -> Result<VmPlan, PlanError> {
    if hosts.is_empty() {
        return Err(PlanError::NoHosts);
    }
    let verdicts: Vec<HostVerdict> = hosts.iter().map(|h| verdict(vm, h, hosts)).collect();
    Ok(VmPlan {
        schema: PLAN_SCHEMA,
        ok: verdicts.iter().all(|v| v.can_migrate),
        vm: VmSummary {
            source: vm.source.clone(),
            machine: vm.machine.clone(),
            devices: vm
                .devices
                .iter()
                .map(|d| VmDeviceSummary {
                    id: d.id.clone(),
                    kind: d.kind,
                    offered: FeatureSet::of(d.offered),
                    acked: FeatureSet::of(d.acked),
                    interface: d.interface.clone(),
                })
                .collect(),
            blockers: vm.blockers.clone(),
            cpuid_checked: vm.cpuid.is_some(),
        },
        hosts: verdicts,
    })
}

pub fn render_vm_plan(p: &VmPlan) -> String {
    let mut out = format!(
        "VM from {}: machine type {}, {} network device(s)\n",
        p.vm.source,
        p.vm.machine,
        p.vm.devices.len()
    );
    for d in &p.vm.devices {
        out.push_str(&format!(
            "  {} ({}): offered {}; acked {}\n",
            d.id,
            d.kind,
            d.offered.names.join(","),
            if d.acked.names.is_empty() {
                "nothing (the driver has not negotiated yet)".to_string()
            } else {
                d.acked.names.join(",")
            }
        ));
    }
    for h in &p.hosts {
        if h.can_migrate {
            out.push_str(&format!("{}: can migrate\n", h.host));
        } else {
            out.push_str(&format!("{}: cannot migrate:\n", h.host));
            for r in &h.reasons {
                let dev = r
                    .device
                    .as_deref()
                    .map(|d| format!("{d}: "))
                    .unwrap_or_default();
                out.push_str(&format!("  - {dev}{}", r.problem));
                if let Some(w) = &r.would_change {
                    out.push_str(&format!("; would change: {w}"));
                }
                out.push('\n');
            }
        }
        for n in &h.notes {
            out.push_str(&format!("  ({n})\n"));
        }
    }
    out
}

fn vm_err(source_desc: &str, detail: impl Into<String>) -> PlanError {
    PlanError::Vm {
        source_desc: source_desc.to_string(),
        detail: detail.into(),
    }
}

/// The VM saved in a snapshot directory.
pub fn vm_from_snapshot(dir: &Path) -> Result<VmView, PlanError> {
    use crate::snapshot::{read_saved, KNOWN_SECTIONS, STATE_FILE};
    let source = format!("snapshot {}", dir.display());
    let state = dir.join(STATE_FILE);
    let container = godwit_migration::format::Container::read_file(&state, KNOWN_SECTIONS)
        .map_err(|e| vm_err(&source, format!("{}: {e}", state.display())))?;
    let saved = read_saved(&container, &state).map_err(|e| vm_err(&source, e.to_string()))?;
    let mut devices = Vec::new();
    for n in &saved.nets {
        let kind = PeerKind::parse(&n.peer_kind).ok_or_else(|| {
            vm_err(
                &source,
                format!("{}: unknown peer kind '{}'", n.id, n.peer_kind),
            )
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
        source,
        machine: saved.machine.name.to_string(),
        devices,
        blockers: Vec::new(),
        cpuid: saved.vcpus.first().map(|v| v.cpuid.clone()),
    })
}

fn hex_at(v: &Value, path: &str) -> Option<u64> {
    v.pointer(path).and_then(Value::as_str).and_then(parse_hex)
}

/// A running VM, through its API socket (`query-net`, `query-migrate`).
pub fn vm_from_api(socket: &Path) -> Result<VmView, PlanError> {
    let source = format!("API socket {}", socket.display());
    let mut client = QmpClient::connect(socket, Duration::from_secs(10))
        .map_err(|e| vm_err(&source, e.to_string()))?;
    let nets = client
        .execute("query-net", Value::Null)
        .map_err(|e| vm_err(&source, format!("query-net: {e}")))?;
    let migrate = client
        .execute("query-migrate", Value::Null)
        .map_err(|e| vm_err(&source, format!("query-migrate: {e}")))?;
    vm_from_query(&source, &nets, &migrate)
}

/// Builds the view from `query-net` and `query-migrate` answers.
pub fn vm_from_query(source: &str, nets: &Value, migrate: &Value) -> Result<VmView, PlanError> {
    let list = nets
        .as_array()
        .ok_or_else(|| vm_err(source, "query-net did not return a list"))?;
    let mut devices = Vec::new();
    let mut device_blockers: Vec<String> = Vec::new();
    let mut machine = None;
    for (i, d) in list.iter().enumerate() {
        let bad = |what: &str| vm_err(source, format!("query-net[{i}]: {what}"));
        let kind_s = d
            .pointer("/peer/kind")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no peer.kind"))?;
        let kind =
            PeerKind::parse(kind_s).ok_or_else(|| bad(&format!("unknown peer kind '{kind_s}'")))?;
        machine = machine.or_else(|| d["machine"].as_str().map(str::to_string));
        devices.push(VmDevice {
            id: d["id"].as_str().ok_or_else(|| bad("no id"))?.to_string(),
            kind,
            offered: hex_at(d, "/offered/hex").ok_or_else(|| bad("no offered.hex"))?,
            acked: hex_at(d, "/acked/hex").ok_or_else(|| bad("no acked.hex"))?,
            // `interface` is {"name": ..} (or a plain name).
            interface: d
                .pointer("/interface/name")
                .or_else(|| d.get("interface"))
                .and_then(Value::as_str)
                .map(str::to_string),
        });
        for b in d["blockers"].as_array().into_iter().flatten() {
            if let Some(b) = b.as_str() {
                if !device_blockers.iter().any(|x| x == b) {
                    device_blockers.push(b.to_string());
                }
            }
        }
    }
    let mut blockers: Vec<String> = migrate["blocked-reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for b in device_blockers {
        if !blockers.contains(&b) {
            blockers.push(b);
        }
    }
    Ok(VmView {
        source: source.to_string(),
        machine: machine.unwrap_or_else(|| "unknown (the VM has no network device)".into()),
        devices,
        blockers,
        cpuid: None,
    })
}

/// The VM this process runs (QMP `plan` with `vm: true`).
pub fn vm_from_handle(handle: &crate::machine::VmHandle) -> VmView {
    let devices = handle
        .nets
        .iter()
        .map(|n| {
            let interface = n.interface();
            let dev = n
                .device
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            VmDevice {
                id: n.id.clone(),
                kind: PeerKind::parse(n.peer.kind).unwrap_or(PeerKind::Tap),
                offered: dev.offered_features(),
                acked: dev.acked_features(),
                interface,
            }
        })
        .collect();
    let vcpus = handle.vcpus.count().clamp(1, 255) as u8;
    VmView {
        source: "this VM".into(),
        machine: handle.machine.name.to_string(),
        devices,
        blockers: handle.blockers(),
        cpuid: crate::state::vcpu::host_cpuid(&handle.vm.kvm, vcpus).ok(),
    }
}

// ---------------------------------------------------------------------------
// `godwit plan`.

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Host reports written by `godwit host-caps` on each host.
    #[arg(value_name = "HOST.json", required = true)]
    pub hosts: Vec<PathBuf>,
    /// Judge an existing VM instead: its API socket (a running VM) or a
    /// snapshot directory.
    #[arg(long, value_name = "API-SOCKET|SNAPSHOT-DIR")]
    pub vm: Option<PathBuf>,
    /// The new VM's network devices by peer kind (tap, vhost-user,
    /// vhost-net), in order; repeatable. Default: one per kind every host has.
    #[arg(long = "device", value_name = "KIND", conflicts_with = "vm")]
    pub devices: Vec<PeerKind>,
    /// Print the answer as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// `godwit plan`: exit status 0 when a plan exists for every device (or
/// the VM can migrate to every host), 5 when not, 1 on bad input.
pub fn main(args: PlanArgs) -> std::process::ExitCode {
    use std::io::Write;
    let result = read_hosts(&args.hosts).and_then(|hosts| match &args.vm {
        Some(path) => {
            let vm = if path.is_dir() {
                vm_from_snapshot(path)?
            } else {
                vm_from_api(path)?
            };
            let p = plan_vm(&hosts, &vm)?;
            Ok((p.exit_code(), to_json(&p), render_vm_plan(&p)))
        }
        None => {
            let p = plan(&hosts, &args.devices)?;
            Ok((p.exit_code(), to_json(&p), render_plan(&p)))
        }
    });
    match result {
        Ok((code, json, text)) => {
            if args.json {
                print_out(&format!("{json:#}\n"));
            } else {
                print_out(&text);
            }
            std::process::ExitCode::from(code)
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "godwit plan: error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// `json!` of a plan or VM plan, for the CLI.
pub fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_else(|e| json!({"error": e.to_string()}))
}

/// Hex of a feature set, for messages.
pub fn describe_set(bits: u64) -> String {
    format!("{} ({})", hex64(bits), name_list(bits).join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_caps::{InterfaceInfo, TapProbe, VhostUserOffer};
    use crate::machine_types::{bits_of, resolve};
    use godwit_devices::net::tap::TapOffloads;

    fn tap_offloads(vnet_hdr: bool, uso: bool) -> TapOffloads {
        TapOffloads {
            vnet_hdr,
            csum: vnet_hdr,
            tso4: vnet_hdr,
            tso6: vnet_hdr,
            tso_ecn: vnet_hdr,
            ufo: vnet_hdr,
            uso: vnet_hdr && uso,
        }
    }

    fn tap_peer(spec: &str, caps: TapOffloads) -> PeerEntry {
        let support = crate::net::tap_support("gwtap0", &caps);
        let v = serde_json::json!({
            "kind": "tap", "spec": spec, "name": support.name, "status": "ok",
            "supported": FeatureSet::of(support.supported),
            "lacks": support.why_not.iter().map(|(b, w)| json!({"name": features::name_of(*b), "bit": b, "why": w})).collect::<Vec<_>>(),
            "probe": TapProbe { temporary: false, ifname: Some("gwtap0".into()), tun_features: None, offloads: Some(caps) },
        });
        let wrapped = json!({"schema": "godwit-host-caps/1", "host": {"name": "x"}, "godwit": {"version": "0", "machine_types": ["godwit-1.0"]}, "peers": [v]});
        host_caps::report_from_value(&wrapped, "t")
            .unwrap()
            .peers
            .remove(0)
    }

    fn host(name: &str, machine_types: &[&str], peers: Vec<PeerEntry>) -> HostInput {
        let mut r = host_caps::report_from_value(
            &json!({"schema": "godwit-host-caps/1", "host": {"name": name}, "godwit": {"version": "0.1.0", "machine_types": machine_types}, "peers": []}),
            "t",
        )
        .unwrap();
        r.peers = peers;
        HostInput {
            file: format!("{name}.json"),
            report: r,
        }
    }

    const ALL: &[&str] = &["godwit-1.0", "godwit-1.1"];

    #[test]
    fn full_and_no_uso_hosts_plan_the_newest_type_without_uso() {
        let hosts = [
            host(
                "a",
                ALL,
                vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
            ),
            host(
                "b",
                ALL,
                vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, false))],
            ),
        ];
        let p = plan(&hosts, &[]).unwrap();
        assert!(p.ok, "{p:?}");
        assert_eq!(p.machine.as_deref(), Some("godwit-1.1"));
        let d = &p.devices[0];
        assert_eq!(d.overrides, ["guest_uso4", "guest_uso6", "host_uso"]);
        assert_eq!(
            p.command_line.as_deref(),
            Some("--machine godwit-1.1 --net tap,ifname=gwtap0,strict=on,guest_uso4=off,guest_uso6=off,host_uso=off")
        );
        assert!(p.host_command_lines.is_empty());
        assert_eq!(d.no_override_machine.as_deref(), Some("godwit-1.0"));
        for l in &d.left_out {
            assert_eq!(l.lacking_on.len(), 1, "{l:?}");
            assert_eq!(l.lacking_on[0].host, "b (b.json)");
            assert!(
                l.lacking_on[0].would_change.contains("Linux >= 6.2"),
                "{l:?}"
            );
        }
        assert_eq!(
            d.offered.as_ref().unwrap().bits(),
            resolve("godwit-1.0").unwrap().net_features()
        );
    }

    #[test]
    fn plain_tap_host_gives_an_offload_free_plan_with_its_own_line() {
        let hosts = [
            host(
                "a",
                ALL,
                vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
            ),
            host(
                "b",
                ALL,
                vec![tap_peer(
                    "tap,ifname=gwtap0,vnet_hdr=off",
                    tap_offloads(false, false),
                )],
            ),
        ];
        let p = plan(&hosts, &[PeerKind::Tap]).unwrap();
        assert!(p.ok);
        let d = &p.devices[0];
        for n in [
            "csum",
            "guest_csum",
            "guest_tso4",
            "guest_ecn",
            "host_uso",
            "host_ecn",
        ] {
            assert!(d.overrides.iter().any(|o| o == n), "{n}: {:?}", d.overrides);
        }
        let offered = d.offered.as_ref().unwrap().bits();
        assert_eq!(offered & bits_of(&["csum", "guest_csum"]), 0);
        // guest_ecn is lacking on b and depends on the TSO bits.
        let ecn = d.left_out.iter().find(|l| l.name == "guest_ecn").unwrap();
        assert_eq!(ecn.depends_on, ["guest_tso4", "guest_tso6"]);
        assert!(ecn.lacking_on[0].would_change.contains("vnet_hdr=on"));
        assert_eq!(d.no_override_machine, None);
        let line = p.command_line.clone().unwrap();
        assert!(
            line.starts_with("--machine godwit-1.1 --net tap,ifname=gwtap0,strict=on,csum=off,"),
            "{line}"
        );
        assert_eq!(p.host_command_lines.len(), 1);
        assert!(p.host_command_lines[0]
            .command_line
            .contains("tap,ifname=gwtap0,vnet_hdr=off,strict=on,csum=off"));
        let text = render_plan(&p);
        assert!(text.starts_with(&format!("{line}\n")), "{text}");
        assert!(text.contains("# on b (b.json): --machine"), "{text}");
    }

    #[test]
    fn missing_peers_and_old_godwits_block_with_remedies() {
        let hosts = [
            host(
                "a",
                ALL,
                vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
            ),
            host("old", &["godwit-1.0"], vec![]),
        ];
        let p = plan(&hosts, &[PeerKind::Tap]).unwrap();
        assert!(!p.ok);
        assert_eq!(p.exit_code(), EXIT_NO_COMMON_ABI);
        assert_eq!(p.machine.as_deref(), Some("godwit-1.0"));
        assert!(p.machine_notes[0]
            .contains("godwit-1.1 is not used: unknown to the godwit of old (old.json)"));
        let b = &p.devices[0].blockers[0];
        assert_eq!(b.host.as_deref(), Some("old (old.json)"));
        assert!(
            b.problem.contains("no tap peer") && b.would_change.contains("host-caps"),
            "{b:?}"
        );
        assert!(p.command_line.is_none());
        // Nothing common at all by default.
        let p = plan(&hosts, &[]).unwrap();
        assert!(!p.ok && !p.blockers.is_empty());
        assert!(render_plan(&p).starts_with("no common ABI over 2 host(s)"));
    }

    fn dpdk() -> PeerEntry {
        host_caps::vhost_user_entry(
            Some("vhost-user,socket=/run/vu.sock".into()),
            "/run/vu.sock",
            &VhostUserOffer {
                features: 0x0000_000d_7c66_e7cb,
                protocol_features: 0x10cbf,
                queue_num: Some(128),
                interface: None,
            },
        )
    }

    fn godwit_backend(active: &str, feats: u64, supported: &[&str]) -> PeerEntry {
        host_caps::vhost_user_entry(
            Some("vhost-user,socket=/run/vu.sock".into()),
            "/run/vu.sock",
            &VhostUserOffer {
                features: feats | (1 << 26) | (1 << 30),
                protocol_features: 0x3 | (1 << 9) | (1 << 3),
                queue_num: Some(2),
                interface: Some(InterfaceInfo {
                    active: active.into(),
                    features: Some(hex64(feats)),
                    pinned: false,
                    latest: active.into(),
                    supported: supported.iter().map(|s| s.to_string()).collect(),
                    truncated: false,
                }),
            },
        )
    }

    #[test]
    fn vhost_user_plans_pin_the_newest_common_interface_version() {
        let v1 = resolve("godwit-1.0").unwrap().net_features();
        let v2 = resolve("godwit-1.1").unwrap().net_features();
        let hosts = [
            host(
                "new",
                ALL,
                vec![godwit_backend(
                    "org.godwit.net.v3",
                    v2 | bits_of(&["ctrl_mac_addr"]),
                    &[
                        "org.godwit.net.v1",
                        "org.godwit.net.v2",
                        "org.godwit.net.v3",
                    ],
                )],
            ),
            host(
                "mid",
                ALL,
                vec![godwit_backend(
                    "org.godwit.net.v2",
                    v2,
                    &["org.godwit.net.v1", "org.godwit.net.v2"],
                )],
            ),
        ];
        let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
        assert!(p.ok, "{p:?}");
        let d = &p.devices[0];
        assert_eq!(d.interface.as_deref(), Some("org.godwit.net.v2"));
        assert!(d.overrides.is_empty(), "{:?}", d.overrides);
        assert!(p.command_line.as_deref().unwrap().ends_with(
            "--net vhost-user,socket=/run/vu.sock,strict=on,interface=org.godwit.net.v2"
        ));
        // A backend presenting v1 by default but listing v2: pinned to v2,
        // it presents v2, so nothing is left out.
        let hosts2 = [
            hosts[0].clone(),
            host(
                "v1default",
                ALL,
                vec![godwit_backend(
                    "org.godwit.net.v1",
                    v1,
                    &["org.godwit.net.v1", "org.godwit.net.v2"],
                )],
            ),
        ];
        let p = plan(&hosts2, &[PeerKind::VhostUser]).unwrap();
        assert_eq!(p.devices[0].interface.as_deref(), Some("org.godwit.net.v2"));
        assert!(p.devices[0].overrides.is_empty(), "{:?}", p.devices[0]);
        // An old backend: v1 is pinned, USO left out, and the hint names v2.
        let hosts = [
            hosts[0].clone(),
            host(
                "old",
                ALL,
                vec![godwit_backend(
                    "org.godwit.net.v1",
                    v1,
                    &["org.godwit.net.v1"],
                )],
            ),
        ];
        let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
        let d = &p.devices[0];
        assert_eq!(d.interface.as_deref(), Some("org.godwit.net.v1"));
        assert_eq!(d.overrides, ["guest_uso4", "guest_uso6", "host_uso"]);
        // DPDK: no pin, host TSO and USO left out (and host_ecn with them).
        let hosts = [hosts[0].clone(), host("dpdk", ALL, vec![dpdk()])];
        let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
        let d = &p.devices[0];
        assert!(p.ok && d.interface.is_none());
        assert!(
            d.notes[0].contains("lacks godwit's interface-version extension"),
            "{:?}",
            d.notes
        );
        assert_eq!(
            d.overrides,
            [
                "host_tso4",
                "host_tso6",
                "host_ecn",
                "guest_uso4",
                "guest_uso6",
                "host_uso"
            ]
        );
        let ecn = d.left_out.iter().find(|l| l.name == "host_ecn").unwrap();
        assert!(ecn.lacking_on.is_empty() && ecn.depends_on == ["host_tso4", "host_tso6"]);
        let tso = d.left_out.iter().find(|l| l.name == "host_tso4").unwrap();
        assert!(
            tso.lacking_on[0]
                .would_change
                .contains("one presenting interface version org.godwit.net.v1 (another backend interface version)"),
            "{tso:?}"
        );
    }

    #[test]
    fn unlogged_backends_and_missing_version_1_block() {
        let mut e = dpdk();
        e.migration_blocker = host_caps::vhost_user_migration_blocker(0, 0);
        let hosts = [host("a", ALL, vec![e])];
        let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
        assert!(!p.ok);
        assert!(p.devices[0].blockers[0].would_change.contains("LOG_SHMFD"));
        let no_v1 = host_caps::vhost_user_entry(
            None,
            "/s",
            &VhostUserOffer {
                features: 0x1 | (1 << 26),
                protocol_features: 2,
                queue_num: None,
                interface: None,
            },
        );
        let p = plan(&[host("a", ALL, vec![no_v1])], &[PeerKind::VhostUser]).unwrap();
        assert!(!p.ok);
        let b = &p.devices[0].blockers[0];
        assert!(
            b.problem.contains("version_1") && b.would_change.contains("offers version_1"),
            "{b:?}"
        );
    }

    /// Every set `o` of features to turn off such that the rest fits
    /// `common` and keeps the spec's dependencies contains the planner's
    /// set, so the planner's set is the unique smallest one.
    #[test]
    fn override_set_is_minimal_by_brute_force() {
        let universe = bits_of(&[
            "csum",
            "guest_csum",
            "guest_tso4",
            "guest_tso6",
            "guest_ecn",
            "host_tso4",
            "host_ecn",
            "ctrl_vq",
            "ctrl_rx",
            "guest_announce",
        ]);
        let ubits: Vec<u32> = bits(universe).collect();
        let subset = |mask: u32| {
            ubits
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .fold(0u64, |a, (_, b)| a | bit(*b))
        };
        let n = ubits.len() as u32;
        let requireds: Vec<u64> = (0..1u32 << n)
            .map(subset)
            .filter(|r| features::check_dependencies(*r).is_empty())
            .step_by(7)
            .collect();
        assert!(requireds.len() > 20);
        let mut checked = 0u64;
        for &required in &requireds {
            for c in (0..1u32 << n).step_by(3) {
                let common = subset(c);
                let planned = minimal_overrides(required, common);
                let rest = required & !planned;
                assert_eq!(rest & !common, 0);
                assert!(features::check_dependencies(rest).is_empty());
                let mut best = u32::MAX;
                for o in 0..1u32 << n {
                    let o = subset(o) & required;
                    let rest = required & !o;
                    if rest & !common == 0 && features::check_dependencies(rest).is_empty() {
                        assert_eq!(
                            o & planned,
                            planned,
                            "a valid set without all of the planner's"
                        );
                        best = best.min(o.count_ones());
                    }
                    checked += 1;
                }
                assert_eq!(best, planned.count_ones());
            }
        }
        assert!(checked > 100_000);
    }

    #[test]
    fn existing_vms_are_judged_by_offered_and_acked_features() {
        let m11 = resolve("godwit-1.1").unwrap().net_features();
        let vm = VmView {
            source: "test".into(),
            machine: "godwit-1.1".into(),
            devices: vec![VmDevice {
                id: "net0".into(),
                kind: PeerKind::Tap,
                offered: m11,
                acked: m11 & !bits_of(&["host_uso"]),
                interface: None,
            }],
            blockers: vec![],
            cpuid: None,
        };
        let hosts = [
            host(
                "full",
                ALL,
                vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
            ),
            host(
                "nouso",
                ALL,
                vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, false))],
            ),
            host(
                "old",
                &["godwit-1.0"],
                vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
            ),
        ];
        let p = plan_vm(&hosts, &vm).unwrap();
        assert!(!p.ok);
        assert!(p.hosts[0].can_migrate, "{:?}", p.hosts[0]);
        let r = &p.hosts[1].reasons;
        assert_eq!(r.len(), 3);
        // Acked ones first.
        assert_eq!(r[0].feature.as_deref(), Some("guest_uso4"));
        assert_eq!(r[0].acked, Some(true));
        assert!(r[0]
            .problem
            .contains("acked by the guest, which uses it now"));
        assert_eq!(r[2].feature.as_deref(), Some("host_uso"));
        assert_eq!(r[2].acked, Some(false));
        assert!(r[2].would_change.as_deref().unwrap().contains("USO"));
        assert!(p.hosts[2].reasons[0]
            .problem
            .contains("does not run machine type godwit-1.1"));
        let text = render_vm_plan(&p);
        assert!(text.contains("full (full.json): can migrate"), "{text}");
        assert!(
            text.contains("nouso (nouso.json): cannot migrate:"),
            "{text}"
        );
        // A pinned interface a backend does not list.
        let vm = VmView {
            devices: vec![VmDevice {
                id: "net0".into(),
                kind: PeerKind::VhostUser,
                offered: resolve("godwit-1.0").unwrap().net_features(),
                acked: 0,
                interface: Some("org.godwit.net.v2".into()),
            }],
            machine: "godwit-1.0".into(),
            ..vm
        };
        let v1 = resolve("godwit-1.0").unwrap().net_features();
        let hosts = [host(
            "old",
            ALL,
            vec![godwit_backend(
                "org.godwit.net.v1",
                v1,
                &["org.godwit.net.v1"],
            )],
        )];
        let p = plan_vm(&hosts, &vm).unwrap();
        let r = &p.hosts[0].reasons[0];
        assert!(
            r.problem.contains("interface version org.godwit.net.v2"),
            "{r:?}"
        );
        assert!(r
            .would_change
            .as_deref()
            .unwrap()
            .contains("another backend interface version"));
    }

    #[test]
    fn query_net_answers_become_a_vm_view() {
        let nets = json!([{"id": "net0", "machine": "godwit-1.1", "peer": {"kind": "vhost-user"}, "interface": {"name": "org.godwit.net.v1"}, "blockers": ["x", "net0: y"], "offered": {"hex": "0x0000000000000001"}, "acked": {"hex": "0x0000000000000000"}}]);
        let v = vm_from_query("s", &nets, &json!({"blocked-reasons": ["x"]})).unwrap();
        assert_eq!(v.machine, "godwit-1.1");
        assert_eq!(v.devices[0].offered, 1);
        assert_eq!(v.blockers, ["x", "net0: y"]);
        assert_eq!(v.devices[0].interface.as_deref(), Some("org.godwit.net.v1"));
        let e = vm_from_query("s", &json!([{"id": "n"}]), &json!({})).unwrap_err();
        assert!(e.to_string().contains("query-net[0]: no peer.kind"), "{e}");
    }
}
