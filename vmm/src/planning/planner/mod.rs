//! The migration planner (`godwit plan`, QMP `plan`): from host capability
//! reports (see [`crate::planning::host_caps`]), how to start a VM so that it
//! can move between all those hosts, or whether an existing VM can.
//!
//! Everything is computed from the one feature model: the machine types'
//! default ABIs ([`crate::abi::machine_types::MACHINE_TYPES`]),
//! [`crate::abi::strict::required_features`] and
//! [`crate::abi::strict::with_dependents`], and the supported feature set each report
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

//!
//! [`hosts`] reads the reports and finds each device's peer on a host;
//! [`new_vm`] and [`existing_vm`] answer the two questions;
//! [`command_line`] spells a plan as `godwit run` options; [`vm_input`]
//! turns what a snapshot or a running VM's API says into a [`VmView`];
//! [`render`] writes the answers as text.

pub mod command_line;
pub mod existing_vm;
pub mod hosts;
pub mod new_vm;
pub mod render;
pub mod vm_input;

pub use existing_vm::{plan_vm, HostVerdict, VmDevice, VmPlan, VmReason, VmView};
pub use hosts::{hosts_from_values, read_hosts, Blocker, HostInput, HostRef};
pub use new_vm::{minimal_overrides, plan, CpuPlan, DevicePlan, Plan};
pub use render::{render_plan, render_vm_plan};
pub use vm_input::{vm_from_query, vm_from_snapshot, VmInputError};

use super::host_caps::ReportError;

/// The plan document's schema.
pub const PLAN_SCHEMA: &str = "godwit-plan/1";
/// `godwit plan`'s exit status when no common ABI exists (or the VM cannot
/// migrate to some host).
pub const EXIT_NO_COMMON_ABI: u8 = 5;

use godwit_devices::virtio::feature as bit;
use godwit_devices::virtio::net::features::bits;

/// Why a plan could not be made at all (bad input; exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("no host reports given: pass the files `godwit host-caps` wrote on each host, e.g. godwit plan a.json b.json")]
    NoHosts,
}

#[cfg(test)]
mod tests;
