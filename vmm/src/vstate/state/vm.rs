//! VM-wide KVM state: the in-kernel PIC pair and IOAPIC, the PIT, kvmclock,
//! and the KVM capabilities the whole saved state needs.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use godwit_migration::format::{kind_ids, SectionKind};

use super::{kvm_err, Blob, KvmCap, KvmCaps, StateError};

/// The section the VM-wide state is saved in.
pub const VM_SECTION: SectionKind = SectionKind {
    id: kind_ids::VM,
    name: "vm",
    version: 1,
    min_version: 1,
    required: true,
    instanced: false,
};

/// How kvmclock resumes on restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockRestore {
    /// The guest's clock continues from the value it had when saved, as if
    /// no time passed while the VM was stopped (snapshots).
    #[default]
    Continue,
    /// The guest's clock also advances by the wall-clock time between save
    /// and restore (KVM_CLOCK_REALTIME), so it stays in step with the real
    /// time; for live migration between hosts whose clocks are synchronised.
    AdvanceByWallClock,
}

/// VM-wide KVM state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: Blob<kvm_irqchip>,
    pub pic_slave: Blob<kvm_irqchip>,
    pub ioapic: Blob<kvm_irqchip>,
    pub pit: Blob<kvm_pit_state2>,
    /// KVM_GET_CLOCK: kvmclock, with the host's wall-clock time of the read
    /// where KVM reports it.
    pub clock: Blob<kvm_clock_data>,
    /// Every KVM capability restoring the VM and its vCPUs needs.
    pub capabilities: Vec<KvmCap>,
}

fn irqchip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err(format!("reading the {what}")))?;
    Ok(chip)
}

impl VmState {
    /// Captures the VM-wide state. Call it after every vCPU was saved, with
    /// the vCPUs still paused; `vcpu_caps` are what the vCPU states need
    /// ([`super::VcpuState::needed_caps`]), recorded so that a host can be
    /// checked before anything is built.
    pub fn save(vm: &VmFd, vcpu_caps: &[KvmCap]) -> Result<Self, StateError> {
        let pic_master = irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "master PIC")?;
        let pic_slave = irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?;
        let ioapic = irqchip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?;
        let pit = vm.get_pit2().map_err(kvm_err("reading the PIT"))?;
        let clock = vm.get_clock().map_err(kvm_err("reading kvmclock"))?;
        let mut capabilities = vec![
            KvmCap::Irqchip,
            KvmCap::Pit2,
            KvmCap::PitState2,
            KvmCap::AdjustClock,
        ];
        for &cap in vcpu_caps {
            if !capabilities.contains(&cap) {
                capabilities.push(cap);
            }
        }
        Ok(VmState {
            pic_master: Blob(pic_master),
            pic_slave: Blob(pic_slave),
            ioapic: Blob(ioapic),
            pit: Blob(pit),
            clock: Blob(clock),
            capabilities,
        })
    }

    /// Checks this host's KVM offers every capability the state needs, and
    /// names the first one missing.
    pub fn check_host(&self, vm: &VmFd) -> Result<(), StateError> {
        for &cap in &self.capabilities {
            if !vm.check_extension(cap.cap()) {
                return Err(cap.missing());
            }
        }
        Ok(())
    }

    /// Restores the VM-wide state into a VM created with its irqchip and PIT,
    /// before the vCPUs' states are restored.
    pub fn restore(
        &self,
        vm: &VmFd,
        caps: &KvmCaps,
        clock: ClockRestore,
    ) -> Result<(), StateError> {
        for cap in [
            KvmCap::Irqchip,
            KvmCap::Pit2,
            KvmCap::PitState2,
            KvmCap::AdjustClock,
        ] {
            caps.require(cap)?;
        }
        let mut data = self.clock.0;
        // KVM_SET_CLOCK takes only KVM_CLOCK_REALTIME; with it, KVM adds the
        // wall-clock time elapsed since `realtime` to the clock.
        data.flags = match clock {
            ClockRestore::Continue => 0,
            ClockRestore::AdvanceByWallClock => {
                if self.clock.0.flags & KVM_CLOCK_REALTIME == 0 {
                    return Err(StateError::NoRealtime);
                }
                KVM_CLOCK_REALTIME
            }
        };
        vm.set_pit2(&self.pit.0)
            .map_err(kvm_err("restoring the PIT"))?;
        vm.set_clock(&data).map_err(kvm_err("restoring kvmclock"))?;
        for (chip, what) in [
            (&self.pic_master, "the master PIC"),
            (&self.pic_slave, "the slave PIC"),
            (&self.ioapic, "the IOAPIC"),
        ] {
            vm.set_irqchip(&chip.0)
                .map_err(kvm_err(format!("restoring {what}")))?;
        }
        Ok(())
    }
}
