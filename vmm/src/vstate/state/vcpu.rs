//! One vCPU's KVM state: registers, FPU/XSAVE, LAPIC, MSRs, pending events,
//! CPUID and TSC frequency.
//!
//! # Order
//!
//! Saving follows Firecracker and QEMU, for these reasons:
//! - KVM_GET_MP_STATE first: it makes the LAPIC accept pending INIT/SIPI
//!   events, which changes vCPU and LAPIC state, so everything else must be
//!   read after it.
//! - KVM_GET_VCPU_EVENTS last: other GET ioctls may move state into or out
//!   of the pending-event fields, and it is only consistent while every vCPU
//!   is paused.
//!
//! Restoring, into a vCPU that has not run since it was created:
//! 1. CPUID: KVM derives from it what the rest may hold (XCR0 bits, which
//!    MSRs exist, LAPIC features), and refuses to change it once the vCPU ran.
//! 2. TSC frequency, before any TSC value is written.
//! 3. MP state (Firecracker sets it before the registers: some SET ioctls
//!    depend on whether the vCPU is the boot processor or waiting for SIPI).
//! 4. Registers, then special registers (which also restore the APIC base
//!    and a pending interrupt).
//! 5. XSAVE (or the legacy FPU), then XCRs.
//! 6. Debug registers.
//! 7. LAPIC: after the special registers, which set the APIC base MSR, and
//!    before the MSRs, because the TSC deadline MSR only takes its value when
//!    the LAPIC timer is already in TSC-deadline mode.
//! 8. MSRs.
//! 9. vCPU events last: KVM_SET_REGS and KVM_SET_SREGS clear pending
//!    exceptions, which this puts back.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use godwit_migration::cpu_compat::{ensure_compatible, CpuidEntry};
use godwit_migration::format::{kind_ids, SectionKind};

use super::{kvm_err, Blob, HexBytes, KvmCap, KvmCaps, StateError};
use crate::vstate::cpuid::{self, HostCaps};

/// The section a vCPU's state is saved in, one per vCPU.
pub const VCPU_SECTION: SectionKind = SectionKind {
    id: kind_ids::VCPU,
    name: "vcpu",
    version: 1,
    min_version: 1,
    required: true,
    instanced: true,
};

/// One MSR and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// The legacy FPU state (KVM_GET_FPU), saved only where KVM has no XSAVE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index, which is also its APIC ID.
    pub id: u32,
    /// The CPUID entries set on the vCPU (KVM_GET_CPUID2).
    pub cpuid: Vec<CpuidEntry>,
    /// KVM_GET_TSC_KHZ; `None` where KVM cannot tell (unstable host TSC).
    pub tsc_khz: Option<u32>,
    pub mp_state: Blob<kvm_mp_state>,
    pub regs: Blob<kvm_regs>,
    pub sregs: Blob<kvm_sregs>,
    /// The XSAVE area (KVM_GET_XSAVE2, or KVM_GET_XSAVE), little-endian;
    /// `None` where KVM has no XSAVE, and then `fpu` holds the FPU.
    pub xsave: Option<HexBytes>,
    pub fpu: Option<FpuState>,
    pub xcrs: Option<Blob<kvm_xcrs>>,
    pub debugregs: Blob<kvm_debugregs>,
    pub lapic: Blob<kvm_lapic_state>,
    /// Every MSR KVM let us read, in the order they are restored.
    pub msrs: Vec<MsrEntry>,
    pub events: Blob<kvm_vcpu_events>,
}

/// MSRs that KVM_GET_MSR_INDEX_LIST does not report but that hold guest
/// state: the MTRRs (the kernel's MTRR setup depends on them) and PAT.
const EXTRA_MSRS: &[(u32, u32)] = &[
    (0x200, 0x20f), // MTRRphysBase/Mask 0-7
    (0x250, 0x250), // MTRRfix64K_00000
    (0x258, 0x259), // MTRRfix16K
    (0x268, 0x26f), // MTRRfix4K
    (0x277, 0x277), // PAT
    (0x2ff, 0x2ff), // MTRRdefType
];

/// MSRs that are not saved: configuration KVM derives from CPUID or the
/// host rather than guest state, or features godwit does not give guests.
const NOT_SAVED: &[(u32, u32, &str)] = &[
    (0x0fe, 0x0fe, "MTRRcap is read-only"),
    (0x0c1, 0x0c8, "PMU counters: godwit gives guests no PMU"),
    (0x186, 0x18d, "PMU event selects"),
    (0x17b, 0x17b, "MCG_CTL exists only with KVM_X86_SETUP_MCE"),
    (0x309, 0x30c, "PMU fixed counters"),
    (0x345, 0x345, "PERF_CAPABILITIES: PMU configuration"),
    (0x38d, 0x390, "PMU global control"),
    (0x480, 0x492, "VMX capabilities: no nested virtualisation"),
    (0x4c1, 0x4c8, "PMU full-width counters"),
    (
        0x4d0,
        0x4d0,
        "MCG_EXT_CTL exists only with KVM_X86_SETUP_MCE",
    ),
    (0x4000_0000, 0x4000_01ff, "Hyper-V: not enabled"),
    (0xc000_0300, 0xc000_0303, "AMD PMU v2 global control"),
    (0xc001_0000, 0xc001_0007, "AMD PMU"),
    (0xc001_0200, 0xc001_020b, "AMD PMU"),
];

/// The MSRs to save from KVM's index list: the list plus [`EXTRA_MSRS`],
/// without [`NOT_SAVED`], each once, in the list's order.
pub fn msrs_to_save(index_list: &[u32]) -> Vec<u32> {
    let extra = EXTRA_MSRS.iter().flat_map(|&(lo, hi)| lo..=hi);
    let mut out: Vec<u32> = Vec::new();
    for i in index_list.iter().copied().chain(extra) {
        let skipped = NOT_SAVED.iter().any(|&(lo, hi, _)| (lo..=hi).contains(&i));
        if !skipped && !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// A name for an MSR in messages.
pub fn msr_name(index: u32) -> String {
    let name = match index {
        0x10 => "IA32_TSC",
        0x11 => "KVM_WALL_CLOCK",
        0x12 => "KVM_SYSTEM_TIME",
        0x1b => "IA32_APIC_BASE",
        0x34 => "SMI_COUNT",
        0x3a => "IA32_FEATURE_CONTROL",
        0x3b => "IA32_TSC_ADJUST",
        0x48 => "IA32_SPEC_CTRL",
        0x8b => "IA32_UCODE_REV",
        0x10a => "IA32_ARCH_CAPABILITIES",
        0x122 => "IA32_TSX_CTRL",
        0xce => "PLATFORM_INFO",
        0x140 => "MISC_FEATURES_ENABLES",
        0x174 => "IA32_SYSENTER_CS",
        0x175 => "IA32_SYSENTER_ESP",
        0x176 => "IA32_SYSENTER_EIP",
        0x17a => "IA32_MCG_STATUS",
        0x1a0 => "IA32_MISC_ENABLE",
        0x1d9 => "IA32_DEBUGCTL",
        0x1db => "LASTBRANCHFROMIP",
        0x1dc => "LASTBRANCHTOIP",
        0x1dd => "LASTINTFROMIP",
        0x1de => "LASTINTTOIP",
        0x1fc => "IA32_POWER_CTL",
        0x200..=0x20f if index.is_multiple_of(2) => {
            return format!("IA32_MTRR_PHYSBASE{}", (index - 0x200) / 2)
        }
        0x200..=0x20f => return format!("IA32_MTRR_PHYSMASK{}", (index - 0x200) / 2),
        0x250 => "IA32_MTRR_FIX64K_00000",
        0x258 => "IA32_MTRR_FIX16K_80000",
        0x259 => "IA32_MTRR_FIX16K_A0000",
        0x268..=0x26f => {
            return format!("IA32_MTRR_FIX4K_{:X}", 0xc0000 + (index - 0x268) * 0x8000)
        }
        0x277 => "IA32_PAT",
        0x2ff => "IA32_MTRR_DEF_TYPE",
        0x6e0 => "IA32_TSC_DEADLINE",
        0xc000_0080 => "EFER",
        0xc000_0081 => "STAR",
        0xc000_0082 => "LSTAR",
        0xc000_0083 => "CSTAR",
        0xc000_0084 => "SYSCALL_MASK",
        0xc000_0100 => "FS_BASE",
        0xc000_0101 => "GS_BASE",
        0xc000_0102 => "KERNEL_GS_BASE",
        0xc000_0103 => "TSC_AUX",
        0xc001_0015 => "AMD_HWCR",
        0xc001_0117 => "AMD_VM_HSAVE_PA",
        0xc001_011f => "AMD_VIRT_SPEC_CTRL",
        0x4b56_4d00 => "KVM_WALL_CLOCK_NEW",
        0x4b56_4d01 => "KVM_SYSTEM_TIME_NEW",
        0x4b56_4d02 => "KVM_ASYNC_PF_EN",
        0x4b56_4d03 => "KVM_STEAL_TIME",
        0x4b56_4d04 => "KVM_PV_EOI_EN",
        0x4b56_4d05 => "KVM_POLL_CONTROL",
        0x4b56_4d06 => "KVM_ASYNC_PF_INT",
        0x4b56_4d07 => "KVM_ASYNC_PF_ACK",
        0x4b56_4d08 => "KVM_MIGRATION_CONTROL",
        _ => return format!("MSR {index:#x}"),
    };
    name.to_string()
}

fn msr_entries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

fn fam_err(what: &'static str) -> impl FnOnce(vmm_sys_util::fam::Error) -> StateError {
    move |source| StateError::KvmList { what, source }
}

/// Reads the MSRs of `indices` that KVM lets this vCPU read. KVM_GET_MSRS
/// stops at the first MSR it refuses; that one is skipped and the rest read
/// again. Returns the values and the refused indices.
pub fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<(Vec<MsrEntry>, Vec<u32>), StateError> {
    let mut values = Vec::with_capacity(indices.len());
    let mut refused = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs =
            Msrs::from_entries(&msr_entries(chunk)).map_err(fam_err("building an MSR list"))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_err("reading MSRs"))?;
        values.extend(
            msrs.as_slice()[..read.min(chunk.len())]
                .iter()
                .map(|e| MsrEntry {
                    index: e.index,
                    data: e.data,
                }),
        );
        if read < chunk.len() {
            refused.push(chunk[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok((values, refused))
}

fn write_msrs(fd: &VcpuFd, vcpu: u32, msrs: &[MsrEntry]) -> Result<(), StateError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(fam_err("building an MSR list"))?;
        let written = fd.set_msrs(&list).map_err(kvm_err("restoring MSRs"))?;
        if written < chunk.len() {
            let index = chunk[written].index;
            return Err(StateError::MsrRefused {
                vcpu,
                index,
                name: msr_name(index),
            });
        }
    }
    Ok(())
}

const XSAVE_LEN: usize = std::mem::size_of::<kvm_xsave>();

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn read_xsave(fd: &VcpuFd, caps: &KvmCaps) -> Result<Vec<u8>, StateError> {
    if caps.xsave2_size > 0 {
        let extra = caps.xsave2_size.saturating_sub(XSAVE_LEN).div_ceil(4);
        let mut xsave = Xsave::new(extra).map_err(fam_err("allocating the XSAVE buffer"))?;
        // SAFETY: the buffer holds at least KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)
        // bytes (and never less than kvm_xsave), the most KVM_GET_XSAVE2
        // writes; godwit enables no dynamic XSTATE feature after that size
        // was read.
        unsafe { fd.get_xsave2(&mut xsave) }
            .map_err(kvm_err("reading the XSAVE area (KVM_GET_XSAVE2)"))?;
        let mut bytes = words_to_bytes(&xsave.as_fam_struct_ref().xsave.region);
        bytes.extend(words_to_bytes(xsave.as_slice()));
        Ok(bytes)
    } else {
        let xsave = fd
            .get_xsave()
            .map_err(kvm_err("reading the XSAVE area (KVM_GET_XSAVE)"))?;
        Ok(words_to_bytes(&xsave.region))
    }
}

fn write_xsave(fd: &VcpuFd, vcpu: u32, caps: &KvmCaps, bytes: &[u8]) -> Result<(), StateError> {
    if !bytes.len().is_multiple_of(4) || bytes.len() < XSAVE_LEN {
        return Err(StateError::XsaveLength {
            vcpu,
            len: bytes.len(),
            min: XSAVE_LEN,
        });
    }
    let host = caps.xsave2_size.max(XSAVE_LEN);
    // Bytes past what this host's KVM takes must be unused (zero).
    if bytes.len() > host && bytes[host..].iter().any(|&b| b != 0) {
        return Err(StateError::XsaveTooLarge {
            vcpu,
            saved: bytes.len(),
            host,
        });
    }
    let mut words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    words.resize(host.div_ceil(4), 0);
    let mut xsave = Xsave::from_entries(&words[XSAVE_LEN / 4..])
        .map_err(fam_err("building the XSAVE buffer"))?;
    // SAFETY: only the fixed-size region is written; the FAM length set by
    // from_entries stays as it is.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(&words[..XSAVE_LEN / 4]);
    // SAFETY: the buffer is at least as large as KVM_CAP_XSAVE2 reports (or
    // 4096 bytes without that capability), which is what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err("restoring the XSAVE area"))
}

fn to_cpuid_entry(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn to_kvm_cpuid_entry(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// Host TSC frequencies this close (250 ppm, as Firecracker allows) need no
/// scaling.
fn tsc_close(a: u32, b: u32) -> bool {
    u64::from(a.abs_diff(b)) * 1_000_000 <= u64::from(b) * 250
}

impl VcpuState {
    /// Captures vCPU `id`, which must be paused (outside KVM_RUN) together
    /// with every other vCPU of the VM.
    pub fn save(fd: &VcpuFd, id: u32, caps: &KvmCaps) -> Result<Self, StateError> {
        for cap in [KvmCap::MpState, KvmCap::VcpuEvents, KvmCap::Debugregs] {
            caps.require(cap)?;
        }
        let what = |w: &str| format!("reading {w} of vCPU {id}");
        let mp_state = fd.get_mp_state().map_err(kvm_err(what("the MP state")))?;
        let regs = fd.get_regs().map_err(kvm_err(what("the registers")))?;
        let sregs = fd
            .get_sregs()
            .map_err(kvm_err(what("the special registers")))?;
        let (xsave, fpu) = if caps.xsave {
            (Some(HexBytes(read_xsave(fd, caps)?)), None)
        } else {
            let fpu = fd.get_fpu().map_err(kvm_err(what("the FPU")))?;
            (None, Some(FpuState::from(&fpu)))
        };
        let xcrs = if caps.xcrs {
            Some(Blob(fd.get_xcrs().map_err(kvm_err(what("the XCRs")))?))
        } else {
            None
        };
        let debugregs = fd
            .get_debug_regs()
            .map_err(kvm_err(what("the debug registers")))?;
        let lapic = fd.get_lapic().map_err(kvm_err(what("the local APIC")))?;
        let tsc_khz = if caps.get_tsc_khz {
            fd.get_tsc_khz().ok()
        } else {
            None
        };
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(what("the CPUID")))?;
        let (msrs, refused) = read_msrs(fd, &caps.msrs_to_save)?;
        if !refused.is_empty() {
            tracing::debug!(
                vcpu = id,
                "MSRs KVM lists but does not let this vCPU read (not saved): {}",
                refused
                    .iter()
                    .map(|&i| msr_name(i))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let events = fd
            .get_vcpu_events()
            .map_err(kvm_err(what("the pending events")))?;
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().iter().map(to_cpuid_entry).collect(),
            tsc_khz,
            mp_state: Blob(mp_state),
            regs: Blob(regs),
            sregs: Blob(sregs),
            xsave,
            fpu,
            xcrs,
            debugregs: Blob(debugregs),
            lapic: Blob(lapic),
            msrs,
            events: Blob(events),
        })
    }

    /// The KVM capabilities restoring this state needs.
    pub fn needed_caps(&self) -> Vec<KvmCap> {
        let mut caps = vec![
            KvmCap::ExtCpuid,
            KvmCap::MpState,
            KvmCap::Debugregs,
            KvmCap::VcpuEvents,
        ];
        if let Some(x) = &self.xsave {
            caps.push(KvmCap::Xsave);
            if x.0.len() > XSAVE_LEN && x.0[XSAVE_LEN..].iter().any(|&b| b != 0) {
                caps.push(KvmCap::Xsave2);
            }
        }
        if self.xcrs.is_some() {
            caps.push(KvmCap::Xcrs);
        }
        caps
    }

    /// Restores this state into `fd`, a vCPU of a fresh VM that has not run
    /// (see the module documentation for the order and why). Check the CPUID
    /// first with [`check_cpuid`].
    pub fn restore(&self, fd: &VcpuFd, caps: &KvmCaps) -> Result<(), StateError> {
        let id = self.id;
        for cap in self.needed_caps() {
            caps.require(cap)?;
        }
        let what = |w: &str| format!("restoring {w} of vCPU {id}");
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(StateError::TooManyCpuidEntries {
                vcpu: id,
                entries: self.cpuid.len(),
                max: KVM_MAX_CPUID_ENTRIES,
            });
        }
        let entries: Vec<_> = self.cpuid.iter().map(to_kvm_cpuid_entry).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(fam_err("building the CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err(what("the CPUID")))?;
        self.restore_tsc_khz(fd, caps)?;
        fd.set_mp_state(self.mp_state.0)
            .map_err(kvm_err(what("the MP state")))?;
        fd.set_regs(&self.regs.0)
            .map_err(kvm_err(what("the registers")))?;
        fd.set_sregs(&self.sregs.0)
            .map_err(kvm_err(what("the special registers")))?;
        match (&self.xsave, &self.fpu) {
            (Some(xsave), _) => write_xsave(fd, id, caps, &xsave.0)?,
            (None, Some(fpu)) => fd
                .set_fpu(&kvm_fpu::from(fpu))
                .map_err(kvm_err(what("the FPU")))?,
            (None, None) => return Err(StateError::NoFpuState { vcpu: id }),
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(&xcrs.0).map_err(kvm_err(what("the XCRs")))?;
        }
        fd.set_debug_regs(&self.debugregs.0)
            .map_err(kvm_err(what("the debug registers")))?;
        fd.set_lapic(&self.lapic.0)
            .map_err(kvm_err(what("the local APIC")))?;
        write_msrs(fd, id, &self.msrs)?;
        fd.set_vcpu_events(&self.events.0)
            .map_err(kvm_err(what("the pending events")))?;
        Ok(())
    }

    fn restore_tsc_khz(&self, fd: &VcpuFd, caps: &KvmCaps) -> Result<(), StateError> {
        let Some(saved) = self.tsc_khz else {
            return Ok(());
        };
        let host = if caps.get_tsc_khz {
            fd.get_tsc_khz().ok()
        } else {
            None
        };
        if host.is_some_and(|h| tsc_close(saved, h)) {
            return Ok(());
        }
        if !caps.tsc_control {
            return Err(StateError::TscFrequency {
                vcpu: self.id,
                saved,
                host,
            });
        }
        fd.set_tsc_khz(saved).map_err(kvm_err(format!(
            "scaling vCPU {}'s TSC to {saved} kHz",
            self.id
        )))
    }
}

/// The CPUID a new vCPU of a VM of `num_vcpus` gets on this host: KVM's
/// supported CPUID after godwit's filter, as KVM reports it back once set on
/// a vCPU of a scratch VM.
///
/// Reading it back matters: some KVM implementations (PVM, on the
/// development machines) add host features on KVM_SET_CPUID2 that
/// KVM_GET_SUPPORTED_CPUID does not list, so the supported table alone would
/// call a vCPU saved on this very host incompatible.
pub fn host_cpuid(kvm: &Kvm, num_vcpus: u8) -> Result<Vec<CpuidEntry>, StateError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("reporting supported CPUID"))?;
    let caps = HostCaps {
        tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    cpuid::filter(cpuid.as_mut_slice(), 0, num_vcpus, caps);
    let vm = kvm.create_vm().map_err(kvm_err(
        "creating a scratch VM to read the CPUID a vCPU gets",
    ))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(kvm_err("creating a scratch vCPU to read the CPUID it gets"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err("setting CPUID on a scratch vCPU"))?;
    vcpu_cpuid(&vcpu)
}

/// The CPUID a vCPU has, as KVM reports it back: on a vCPU just created by
/// [`crate::vstate::vm::Vm::create_vcpu`] (godwit's filtered supported
/// CPUID, set and not yet replaced by saved state), the same table as
/// [`host_cpuid`] gives, without the scratch VM (whose teardown waits for
/// an SRCU grace period).
pub fn vcpu_cpuid(vcpu: &VcpuFd) -> Result<Vec<CpuidEntry>, StateError> {
    let effective = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("reading CPUID back from a vCPU"))?;
    Ok(effective.as_slice().iter().map(to_cpuid_entry).collect())
}

/// Checks that a saved vCPU fits this host: its CPUID against `host`, from
/// [`host_cpuid`] (topology, APIC IDs and cache descriptions are not
/// compared, so one host table serves every vCPU), with every
/// incompatibility named.
pub fn check_cpuid(state: &VcpuState, host: &[CpuidEntry]) -> Result<(), StateError> {
    ensure_compatible(state.id, &state.cpuid, host)?;
    Ok(())
}
