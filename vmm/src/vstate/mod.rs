//! KVM state: the VM and its vCPUs, guest RAM, CPUID, the guest-physical
//! layout, how a VM ends, and the saved form of VM and vCPU state.

pub mod cpu_reset;
pub mod cpuid;
pub mod events;
pub mod layout;
pub mod memory;
pub mod state;
pub mod vcpu;
pub mod vm;
