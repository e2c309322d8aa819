//! A new VM: the machine type, and per network device the overrides that
//! make its ABI fit every host's peer (and the interface version to pin on
//! vhost-user backends), the CPUs it can start on.

use std::collections::BTreeMap;

use serde::Serialize;

use godwit_devices::vhost_user::interface::{by_interface_name, INTERFACES};
use godwit_devices::virtio::net::features::{self, Features, NetFeature, FEATURES};
use godwit_migration::cpu_compat::{self, CpuidEntry};

use super::command_line::{command_lines, HostLine};
use super::hosts::{device_peer, host_refs, would_change, Blocker, HostInput, HostRef};
use super::{bit, bits, PlanError, EXIT_NO_COMMON_ABI, PLAN_SCHEMA};
use crate::abi::machine_types::{MachineType, MACHINE_TYPES};
use crate::abi::strict::{self, PeerSupport};
use crate::planning::host_caps::{
    backend_offer, FeatureSet, PeerEntry, PeerKind, PeerStatus, Probe,
};

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
    /// The queue pairs the guest will be offered (the machine type's, or
    /// fewer with `queues=` when a host's peer carries fewer).
    pub queue_pairs: Option<u16>,
    pub blockers: Vec<Blocker>,
    pub peers: Vec<DevicePeer>,
    pub notes: Vec<String>,
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
pub fn minimal_overrides(required: Features, common: Features) -> Features {
    strict::with_dependents(required, required & !common)
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

/// Why no interface version is pinned on a vhost-user device (a note of
/// the plan, not a blocker: the device is planned on its default features).
#[derive(Debug, thiserror::Error)]
enum NoPin {
    #[error("no interface version is pinned: {host} is not a vhost-user peer")]
    NotVhostUser { host: String },
    #[error("no interface version is pinned: the backend on {host} lacks godwit's interface-version extension (it presents one fixed feature set)")]
    NoExtension { host: String },
    #[error("no interface version is pinned: no backends")]
    NoBackends,
    #[error("no interface version is pinned: no version is listed by every backend ({}); a backend supporting another interface version would change that", .lists.join("; "))]
    NoCommonVersion {
        /// `HOST: v1,v2` per backend.
        lists: Vec<String>,
    },
    #[error("interface version {name} is listed by every backend but this godwit does not know it and no backend presents it now, so its features are not in the reports; plan with a newer godwit, or take a report where a backend presents it (vhost-user,...,interface={name})")]
    UnknownVersion { name: String },
}

/// The interface version every vhost-user backend lists (the newest such),
/// and its feature bits; or why none is pinned.
fn pick_interface(peers: &[(&HostInput, &PeerEntry)]) -> Result<(String, Features), NoPin> {
    let mut lists = Vec::new();
    for (h, p) in peers {
        let Probe::VhostUser(u) = &p.probe else {
            return Err(NoPin::NotVhostUser { host: h.label() });
        };
        match &u.interface {
            Some(i) => lists.push((h, i)),
            None => return Err(NoPin::NoExtension { host: h.label() }),
        }
    }
    let Some((_, first)) = lists.first() else {
        return Err(NoPin::NoBackends);
    };
    let name = first
        .supported
        .iter()
        .rev()
        .find(|n| lists.iter().all(|(_, i)| i.supported.contains(n)))
        .cloned()
        .ok_or_else(|| NoPin::NoCommonVersion {
            lists: lists
                .iter()
                .map(|(h, i)| format!("{}: {}", h.label(), i.supported.join(",")))
                .collect(),
        })?;
    // Released versions are immutable: godwit's table, else a backend
    // that presents it now.
    let features = by_interface_name(&name)
        .map(|i| i.feature_bits())
        .or_else(|| {
            lists.iter().find_map(|(_, i)| {
                (i.active == name)
                    .then(|| i.features.as_deref().and_then(features::parse_hex))
                    .flatten()
            })
        })
        .ok_or_else(|| NoPin::UnknownVersion { name: name.clone() })?;
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
        queue_pairs: None,
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
    let mut pin_removed: Vec<Features> = vec![0; found.len()];
    if kind == PeerKind::VhostUser {
        let pairs: Vec<(&HostInput, &PeerEntry)> = found.iter().map(|(h, p, _)| (*h, *p)).collect();
        match pick_interface(&pairs) {
            Ok((name, feats)) => {
                for ((_, p, s), removed) in found.iter_mut().zip(pin_removed.iter_mut()) {
                    let Probe::VhostUser(u) = &p.probe else {
                        continue;
                    };
                    let pinned = crate::devices::net::vhost_user_support(
                        &u.socket,
                        &backend_offer(godwit_devices::virtio::low64(feats), 0, u.queue_num),
                    );
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
            Err(why) => d.notes.push(why.to_string()),
        }
    }
    let common = found
        .iter()
        .fold(Features::MAX, |acc, (_, _, s)| acc & s.supported);
    d.common = Some(FeatureSet::of(common));
    let common_pairs = found
        .iter()
        .map(|(_, _, s)| s.max_queue_pairs)
        .min()
        .unwrap_or(1);
    d.no_override_machine = machines
        .iter()
        .find(|m| m.net_features() & !common == 0 && m.net.queue_pairs <= common_pairs)
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
    match strict::required_features(id, machine, &map) {
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
    // Queue pairs: the machine type's, or as many as every host carries.
    let offered = d.offered.as_ref().map_or(0, FeatureSet::bits);
    let pairs = strict::required_queue_pairs(id, machine, offered, None).unwrap_or(1);
    if pairs > common_pairs {
        for (h, p, s) in found.iter().filter(|(_, _, s)| s.max_queue_pairs < pairs) {
            d.notes.push(format!(
                "queues={common_pairs}: {} on {} carries {} queue pair(s), machine type {} has {pairs}{}",
                p.name,
                h.label(),
                s.max_queue_pairs,
                machine.name,
                s.queue_why
                    .as_deref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            ));
        }
        d.properties.push(format!("queues={common_pairs}"));
    }
    d.queue_pairs = Some(pairs.min(common_pairs));
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
        (true, Some(m)) => {
            let devices: Vec<(PeerKind, &[String])> = plans
                .iter()
                .map(|d| (d.kind, d.properties.as_slice()))
                .collect();
            command_lines(m, &devices, hosts)
        }
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
