//! An existing VM: whether it can migrate to each host, and why not. Every
//! feature the guest was offered must be carried by the host's peer (the
//! guest may take any of them at its next reset; the ones it acked it uses
//! now), and the host's godwit must run the VM's machine type.

use std::collections::BTreeMap;

use serde::Serialize;

use godwit_devices::virtio::net::features;
use godwit_migration::cpu_compat::{self, CpuidEntry};

use super::hosts::{device_peer, would_change, HostInput};
use super::{bit, bits, PlanError, EXIT_NO_COMMON_ABI, PLAN_SCHEMA};
use crate::planning::host_caps::{FeatureSet, PeerKind, Probe};

/// One network device of an existing VM.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmDevice {
    pub id: String,
    pub kind: PeerKind,
    pub offered: godwit_devices::virtio::Features,
    pub acked: godwit_devices::virtio::Features,
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
