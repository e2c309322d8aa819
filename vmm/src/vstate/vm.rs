//! The KVM virtual machine: /dev/kvm, guest RAM slots, the in-kernel
//! irqchip (PIC, IOAPIC, LAPICs) and PIT, and the vCPU file descriptors.

use std::sync::{mpsc, OnceLock};
use std::thread::{Scope, ScopedJoinHandle};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use godwit_devices::GuestMemory;

use crate::vstate::cpuid::{self, HostCaps};
use crate::vstate::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, MAX_VCPUS};
use crate::vstate::state::{KvmCaps, StateError};
use crate::vstate::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: this host offers no KVM. Load kvm_intel or kvm_amd, or enable nested virtualisation for this machine")]
    NoKvm,
    #[error("permission denied opening /dev/kvm: run godwit as root or add your user to the group that owns /dev/kvm (usually 'kvm')")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the stable version 12 godwit needs")]
    ApiVersion(i32),
    #[error("this host's KVM lacks {0}, which godwit needs")]
    MissingCap(&'static str),
    #[error("--vcpus {requested} is more than {limit} (this host's KVM allows {kvm_max}; godwit's MP table allows {MAX_VCPUS})")]
    TooManyVcpus {
        requested: u32,
        limit: u32,
        kvm_max: usize,
    },
    #[error("--vcpus 0: a VM needs at least one vCPU")]
    NoVcpus,
    #[error(transparent)]
    CpuReset(#[from] crate::vstate::cpu_reset::CpuResetError),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the thread that reads KVM's supported CPUID and creates the PIT panicked (a bug in godwit: please report it with the output of GODWIT_LOG=debug)")]
    HelperPanicked,
    #[error("the thread that creates the VM panicked (a bug in godwit: please report it with the output of GODWIT_LOG=debug)")]
    CreatorPanicked,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm and checks everything godwit relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::OpenKvm(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        (Cap::Pit2, "the in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID (KVM_CAP_EXT_CPUID)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// The largest --vcpus this host accepts.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    (kvm.get_max_vcpus() as u32).min(u32::from(MAX_VCPUS))
}

pub fn check_vcpus(kvm: &Kvm, requested: u32) -> Result<u8, VmError> {
    if requested == 0 {
        return Err(VmError::NoVcpus);
    }
    let limit = max_vcpus(kvm);
    if requested > limit {
        return Err(VmError::TooManyVcpus {
            requested,
            limit,
            kvm_max: kvm.get_max_vcpus(),
        });
    }
    Ok(requested as u8)
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    /// KVM_GET_SUPPORTED_CPUID, asked once per VM rather than per vCPU (a
    /// /dev/kvm ioctl of ~0.3 ms here).
    supported_cpuid: OnceLock<(CpuId, HostCaps)>,
    /// What restoring saved state may use (two dozen ioctls, about 0.1 ms
    /// here), asked once per VM.
    kvm_caps: OnceLock<KvmCaps>,
}

impl Vm {
    /// Creates the VM with its irqchip and PIT and maps guest RAM into it.
    pub fn new(kvm: Kvm, memory: &GuestMemory) -> Result<Self, VmError> {
        let vm = Self::create(kvm)?;
        vm.finish(memory)?;
        Ok(vm)
    }

    /// The first half of [`Vm::new`], which needs no guest memory yet (a
    /// restore or an incoming migration does it before it knows the memory
    /// size): the VM, its TSS and identity-map addresses.
    pub fn create(kvm: Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("creating a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("setting the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("setting the identity map address"))?;
        Ok(Vm {
            kvm,
            fd,
            supported_cpuid: OnceLock::new(),
            kvm_caps: OnceLock::new(),
        })
    }

    /// The second half of [`Vm::new`]: guest RAM, then the irqchip and PIT.
    pub fn finish(&self, memory: &GuestMemory) -> Result<(), VmError> {
        self.map_memory_and_create_irqchip(memory)?;
        self.create_pit()
    }

    /// Guest RAM, then the in-kernel irqchip. Guest RAM comes first: on a
    /// VM that has no irqchip or PIT yet, KVM_SET_USER_MEMORY_REGION's SRCU
    /// grace period ends at once; after them it waited 6-12 ms here
    /// (measured with strace -T).
    pub fn map_memory_and_create_irqchip(&self, memory: &GuestMemory) -> Result<(), VmError> {
        self.map_memory(memory, 0)?;
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("creating the in-kernel irqchip"))
    }

    /// The in-kernel PIT, once the irqchip exists. KVM starts a `kvm-pit`
    /// kernel thread for it while holding the VM's lock, which takes from
    /// 0.05 to 3 ms here depending on how soon kthreadd runs: a boot does it
    /// on a helper thread, before any vCPU is created (KVM_CREATE_VCPU needs
    /// that lock too).
    pub fn create_pit(&self) -> Result<(), VmError> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(kvm_err("creating the in-kernel PIT"))
    }

    /// Registers every RAM region as a KVM memory slot.
    pub fn map_memory(&self, memory: &GuestMemory, flags: u32) -> Result<(), VmError> {
        for (slot, region) in memory.iter().enumerate() {
            let host_addr = memory
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::MissingCap("a host mapping for guest RAM"))?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which
            // outlives the VM (the VMM drops the VM before guest memory).
            unsafe { self.fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("registering guest memory"))?;
        }
        Ok(())
    }

    /// KVM_GET_SUPPORTED_CPUID and the host capabilities the CPUID filter
    /// needs, asked once per VM. The ioctl runs the CPUID instruction for
    /// every leaf, each a trap to the hypervisor below when KVM is itself
    /// virtualised (0.5-0.8 ms here, measured with perf: `native_cpuid`
    /// under `kvm_dev_ioctl_get_cpuid`), so boot and restore ask for it on a
    /// thread of their own while they do other work.
    pub fn supported_cpuid(&self) -> Result<&(CpuId, HostCaps), VmError> {
        if let Some(s) = self.supported_cpuid.get() {
            return Ok(s);
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("reporting supported CPUID"))?;
        let host = HostCaps {
            tsc_deadline_timer: self.kvm.check_extension(Cap::TscDeadlineTimer),
        };
        Ok(self.supported_cpuid.get_or_init(|| (cpuid, host)))
    }

    /// This VM's [`KvmCaps`], probed on the first call.
    pub fn kvm_caps(&self) -> Result<&KvmCaps, StateError> {
        if let Some(caps) = self.kvm_caps.get() {
            return Ok(caps);
        }
        let caps = KvmCaps::probe(&self.kvm, &self.fd)?;
        Ok(self.kvm_caps.get_or_init(|| caps))
    }

    /// Creates vCPU `id` of `num_vcpus` with its CPUID and reset-time state.
    pub fn create_vcpu(&self, id: u8, num_vcpus: u8) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("creating a vCPU"))?;
        let (supported, host) = self.supported_cpuid()?;
        let mut cpuid = supported.clone();
        cpuid::filter(cpuid.as_mut_slice(), id, num_vcpus, *host);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("setting CPUID"))?;
        crate::vstate::cpu_reset::setup_cpu_common(&fd)?;
        Ok(Vcpu { id, fd })
    }

    /// Every vCPU of a VM of `num_vcpus`, ids counting up from 0.
    pub fn create_vcpus(&self, num_vcpus: u8) -> Result<Vec<Vcpu>, VmError> {
        (0..num_vcpus)
            .map(|id| self.create_vcpu(id, num_vcpus))
            .collect()
    }
}

/// KVM's supported CPUID (see [`Vm::supported_cpuid`]), then the PIT once
/// the irqchip exists (see [`Vm::create_pit`]), on a helper thread while a
/// restore sets up guest memory and the irqchip and goes on with its
/// devices (a boot has all of it done by its VM-creating thread). Joined before the first vCPU is created. Where no thread can
/// be started, the same work happens on the caller's thread.
pub struct CpuidAndPit<'scope> {
    vm: &'scope Vm,
    helper: Option<ScopedJoinHandle<'scope, Result<(), VmError>>>,
    irqchip_made: Option<mpsc::Sender<()>>,
}

impl<'scope> CpuidAndPit<'scope> {
    pub fn start<'env>(scope: &'scope Scope<'scope, 'env>, vm: &'scope Vm) -> Self {
        let (irqchip_made, irqchip) = mpsc::channel::<()>();
        let helper = std::thread::Builder::new()
            .name("cpuid".into())
            .spawn_scoped(scope, move || {
                vm.supported_cpuid()?;
                // No message: the caller failed before its irqchip existed.
                match irqchip.recv() {
                    Ok(()) => vm.create_pit(),
                    Err(_) => Ok(()),
                }
            })
            .ok();
        CpuidAndPit {
            vm,
            helper,
            irqchip_made: Some(irqchip_made),
        }
    }

    /// Call right after [`Vm::map_memory_and_create_irqchip`].
    pub fn irqchip_created(&mut self) -> Result<(), VmError> {
        let sent = self
            .irqchip_made
            .take()
            .is_some_and(|tx| self.helper.is_some() && tx.send(()).is_ok());
        if !sent {
            self.vm.create_pit()?;
        }
        Ok(())
    }

    /// Waits for the helper; afterwards the VM has its PIT and
    /// [`Vm::supported_cpuid`] answers at once.
    pub fn join(mut self) -> Result<(), VmError> {
        // A caller that failed before its irqchip existed never signalled:
        // the helper then ends without a PIT instead of waiting.
        drop(self.irqchip_made.take());
        match self.helper.take() {
            Some(handle) => handle.join().map_err(|_| VmError::HelperPanicked)??,
            None => {
                self.vm.supported_cpuid()?;
            }
        }
        Ok(())
    }
}
