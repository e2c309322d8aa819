//! godwit's virtual machine monitor: the KVM VM and its vCPUs, Linux boot,
//! the management API, and the pieces that tie devices to a VM.

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod cpuid;
pub mod layout;
pub mod machine;
pub mod machine_types;
pub mod memory;
pub mod migrate;
pub mod net;
pub mod net_abi;
pub mod net_spec;
pub mod planning;
pub mod snapshot;
pub mod state;
pub mod test_guest;
pub mod vcpu;
pub mod vm;
