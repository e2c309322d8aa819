//! The planning commands of the API: QMP `plan` and `query-host-caps`.
//! Here, not in `planning`, because they tie the planner to the protocol
//! and to the running VM (the planner itself knows neither).

use serde_json::{Map, Value};

use super::{parse_args, QmpError};
use crate::config::net_spec::NetSpec;
use crate::machine::VmHandle;
use crate::planning::host_caps::{self, PeerKind};
use crate::planning::planner::{self, PlanError, VmDevice, VmView};

fn plan_error(e: PlanError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The VM this process runs (QMP `plan` with `vm: true`).
pub fn vm_view(handle: &VmHandle) -> VmView {
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
        cpuid: crate::vstate::state::vcpu::host_cpuid(&handle.vm.kvm, vcpus).ok(),
    }
}

/// QMP `plan`: `{"hosts": [REPORT...], "vm": bool, "devices": [KIND...]}`.
pub fn qmp_plan(handle: &VmHandle, args: Map<String, Value>) -> Result<Value, QmpError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Args {
        hosts: Vec<Value>,
        #[serde(default)]
        vm: bool,
        #[serde(default)]
        devices: Vec<String>,
    }
    let a: Args = parse_args(args)?;
    let hosts = planner::hosts_from_values(&a.hosts).map_err(plan_error)?;
    if a.vm {
        if !a.devices.is_empty() {
            return Err(QmpError::generic(
                "Parameter 'devices' applies to a new VM, not with 'vm': true",
            ));
        }
        let plan = planner::plan_vm(&hosts, &vm_view(handle)).map_err(plan_error)?;
        return Ok(serde_json::to_value(plan).unwrap_or(Value::Null));
    }
    let mut kinds = Vec::new();
    for (i, d) in a.devices.iter().enumerate() {
        kinds.push(PeerKind::parse(d).ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter 'devices[{i}]' does not accept value '{d}': use tap, vhost-user or vhost-net"
            ))
        })?);
    }
    let plan = planner::plan(&hosts, &kinds).map_err(plan_error)?;
    Ok(serde_json::to_value(plan).unwrap_or(Value::Null))
}

/// QMP `query-host-caps`: `{"net": [SPEC...], "name": NAME}`, both optional.
pub fn qmp_query_host_caps(args: Map<String, Value>) -> Result<Value, QmpError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Args {
        #[serde(default)]
        net: Vec<String>,
        name: Option<String>,
    }
    let a: Args = parse_args(args)?;
    let mut specs = Vec::new();
    for (i, s) in a.net.iter().enumerate() {
        specs.push(
            s.parse::<NetSpec>()
                .map_err(|e| QmpError::generic(format!("Parameter 'net[{i}]': {e}")))?,
        );
    }
    Ok(host_caps::collect(&specs, a.name.as_deref()).to_json())
}
