//! Whether a saved vCPU's CPUID fits this host.
//!
//! A guest that saw a CPU feature may use it at any moment after restore, so
//! a vCPU can only be restored where KVM offers every feature the guest was
//! shown. The check compares the CPUID entries a vCPU had (`KVM_GET_CPUID2`)
//! with what a new vCPU would get on this host, register by register:
//!
//! - feature-flag registers: the saved bits must be a subset of the host's;
//! - vendor and family/model/stepping: equal (a guest applies model-specific
//!   workarounds it chose at boot);
//! - maximum leaves, sub-leaf counts and address widths: the saved value must
//!   not be greater.
//!
//! Registers that describe topology, caches or the current guest state are
//! not compared. Every incompatibility is reported, not just the first, with
//! the leaf, sub-leaf, register and the names of the missing features.
//!
//! The host table to compare against is what the VMM would set on a new vCPU
//! here: `KVM_GET_SUPPORTED_CPUID` after the same filter the VMM applies at
//! boot (hypervisor bit, TSC deadline timer, topology), so that bits the VMM
//! adds are on both sides.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One CPUID entry, the fields of `kvm_cpuid_entry2` that matter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// KVM_CPUID_FLAG_* (bit 0: the index is significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the leaf has sub-leaves.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Register::Eax => e.eax,
            Register::Ebx => e.ebx,
            Register::Ecx => e.ecx,
            Register::Edx => e.edx,
        }
    }
}

impl fmt::Display for Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Register::Eax => "EAX",
            Register::Ebx => "EBX",
            Register::Ecx => "ECX",
            Register::Edx => "EDX",
        })
    }
}

/// How a register of a saved vCPU is compared with the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Feature flags: every saved bit must be set on the host.
    Subset,
    /// Identification: the values must be equal. The text names the field.
    Equal(&'static str),
    /// A maximum or count: the saved value must not be greater.
    NotGreater(&'static str),
}

#[derive(Clone, Copy, Debug)]
enum Subleaves {
    Exactly(u32),
    From(u32),
}

struct RegRule {
    leaf: u32,
    subleaf: Subleaves,
    reg: Register,
    rule: Rule,
    /// Bits the CPU derives from the guest's own state (CR4.OSXSAVE,
    /// CR4.PKE): they are not host features and are not compared.
    ignore: u32,
}

const fn rule(leaf: u32, subleaf: u32, reg: Register, rule: Rule) -> RegRule {
    RegRule {
        leaf,
        subleaf: Subleaves::Exactly(subleaf),
        reg,
        rule,
        ignore: 0,
    }
}

use Register::{Eax, Ebx, Ecx, Edx};
use Rule::{Equal, NotGreater, Subset};

const OSXSAVE: u32 = 1 << 27;
const OSPKE: u32 = 1 << 4;

static RULES: &[RegRule] = &[
    rule(0x0, 0, Eax, NotGreater("the highest basic leaf")),
    rule(0x0, 0, Ebx, Equal("the CPU vendor")),
    rule(0x0, 0, Ecx, Equal("the CPU vendor")),
    rule(0x0, 0, Edx, Equal("the CPU vendor")),
    rule(0x1, 0, Eax, Equal("the CPU family, model and stepping")),
    RegRule {
        ignore: OSXSAVE,
        ..rule(0x1, 0, Ecx, Subset)
    },
    rule(0x1, 0, Edx, Subset),
    rule(0x6, 0, Eax, Subset),
    rule(0x7, 0, Eax, NotGreater("the highest leaf-7 sub-leaf")),
    rule(0x7, 0, Ebx, Subset),
    RegRule {
        ignore: OSPKE,
        ..rule(0x7, 0, Ecx, Subset)
    },
    rule(0x7, 0, Edx, Subset),
    rule(0x7, 1, Eax, Subset),
    rule(0x7, 1, Ebx, Subset),
    rule(0x7, 1, Ecx, Subset),
    rule(0x7, 1, Edx, Subset),
    rule(0x7, 2, Edx, Subset),
    rule(0xd, 0, Eax, Subset),
    rule(
        0xd,
        0,
        Ecx,
        NotGreater("the XSAVE area size for all features"),
    ),
    rule(0xd, 0, Edx, Subset),
    rule(0xd, 1, Eax, Subset),
    rule(0xd, 1, Ecx, Subset),
    rule(0xd, 1, Edx, Subset),
    RegRule {
        subleaf: Subleaves::From(2),
        ..rule(0xd, 0, Eax, Equal("the size of an XSAVE component"))
    },
    RegRule {
        subleaf: Subleaves::From(2),
        ..rule(0xd, 0, Ebx, Equal("the offset of an XSAVE component"))
    },
    rule(
        0x4000_0000,
        0,
        Eax,
        NotGreater("the highest hypervisor leaf"),
    ),
    rule(0x4000_0001, 0, Eax, Subset),
    rule(0x4000_0001, 0, Edx, Subset),
    rule(0x8000_0000, 0, Eax, NotGreater("the highest extended leaf")),
    rule(0x8000_0001, 0, Ecx, Subset),
    rule(0x8000_0001, 0, Edx, Subset),
    rule(0x8000_0007, 0, Edx, Subset),
    rule(
        0x8000_0008,
        0,
        Eax,
        NotGreater("the physical and linear address widths"),
    ),
    rule(0x8000_0008, 0, Ebx, Subset),
];

/// Names of well-known feature bits: (leaf, sub-leaf, register, bit, name).
static FEATURE_NAMES: &[(u32, u32, Register, u8, &str)] = &[
    (1, 0, Ecx, 0, "sse3"),
    (1, 0, Ecx, 1, "pclmulqdq"),
    (1, 0, Ecx, 2, "dtes64"),
    (1, 0, Ecx, 3, "monitor"),
    (1, 0, Ecx, 4, "ds_cpl"),
    (1, 0, Ecx, 5, "vmx"),
    (1, 0, Ecx, 6, "smx"),
    (1, 0, Ecx, 7, "est"),
    (1, 0, Ecx, 8, "tm2"),
    (1, 0, Ecx, 9, "ssse3"),
    (1, 0, Ecx, 10, "cnxt_id"),
    (1, 0, Ecx, 11, "sdbg"),
    (1, 0, Ecx, 12, "fma"),
    (1, 0, Ecx, 13, "cx16"),
    (1, 0, Ecx, 14, "xtpr"),
    (1, 0, Ecx, 15, "pdcm"),
    (1, 0, Ecx, 17, "pcid"),
    (1, 0, Ecx, 18, "dca"),
    (1, 0, Ecx, 19, "sse4_1"),
    (1, 0, Ecx, 20, "sse4_2"),
    (1, 0, Ecx, 21, "x2apic"),
    (1, 0, Ecx, 22, "movbe"),
    (1, 0, Ecx, 23, "popcnt"),
    (1, 0, Ecx, 24, "tsc_deadline_timer"),
    (1, 0, Ecx, 25, "aes"),
    (1, 0, Ecx, 26, "xsave"),
    (1, 0, Ecx, 27, "osxsave"),
    (1, 0, Ecx, 28, "avx"),
    (1, 0, Ecx, 29, "f16c"),
    (1, 0, Ecx, 30, "rdrand"),
    (1, 0, Ecx, 31, "hypervisor"),
    (1, 0, Edx, 0, "fpu"),
    (1, 0, Edx, 1, "vme"),
    (1, 0, Edx, 2, "de"),
    (1, 0, Edx, 3, "pse"),
    (1, 0, Edx, 4, "tsc"),
    (1, 0, Edx, 5, "msr"),
    (1, 0, Edx, 6, "pae"),
    (1, 0, Edx, 7, "mce"),
    (1, 0, Edx, 8, "cx8"),
    (1, 0, Edx, 9, "apic"),
    (1, 0, Edx, 11, "sep"),
    (1, 0, Edx, 12, "mtrr"),
    (1, 0, Edx, 13, "pge"),
    (1, 0, Edx, 14, "mca"),
    (1, 0, Edx, 15, "cmov"),
    (1, 0, Edx, 16, "pat"),
    (1, 0, Edx, 17, "pse36"),
    (1, 0, Edx, 18, "pn"),
    (1, 0, Edx, 19, "clflush"),
    (1, 0, Edx, 21, "ds"),
    (1, 0, Edx, 22, "acpi"),
    (1, 0, Edx, 23, "mmx"),
    (1, 0, Edx, 24, "fxsr"),
    (1, 0, Edx, 25, "sse"),
    (1, 0, Edx, 26, "sse2"),
    (1, 0, Edx, 27, "ss"),
    (1, 0, Edx, 28, "ht"),
    (1, 0, Edx, 29, "tm"),
    (1, 0, Edx, 30, "ia64"),
    (1, 0, Edx, 31, "pbe"),
    (6, 0, Eax, 2, "arat"),
    (7, 0, Ebx, 0, "fsgsbase"),
    (7, 0, Ebx, 1, "tsc_adjust"),
    (7, 0, Ebx, 2, "sgx"),
    (7, 0, Ebx, 3, "bmi1"),
    (7, 0, Ebx, 4, "hle"),
    (7, 0, Ebx, 5, "avx2"),
    (7, 0, Ebx, 6, "fdp_excptn_only"),
    (7, 0, Ebx, 7, "smep"),
    (7, 0, Ebx, 8, "bmi2"),
    (7, 0, Ebx, 9, "erms"),
    (7, 0, Ebx, 10, "invpcid"),
    (7, 0, Ebx, 11, "rtm"),
    (7, 0, Ebx, 12, "rdt_m"),
    (7, 0, Ebx, 13, "zero_fcs_fds"),
    (7, 0, Ebx, 14, "mpx"),
    (7, 0, Ebx, 15, "rdt_a"),
    (7, 0, Ebx, 16, "avx512f"),
    (7, 0, Ebx, 17, "avx512dq"),
    (7, 0, Ebx, 18, "rdseed"),
    (7, 0, Ebx, 19, "adx"),
    (7, 0, Ebx, 20, "smap"),
    (7, 0, Ebx, 21, "avx512ifma"),
    (7, 0, Ebx, 22, "pcommit"),
    (7, 0, Ebx, 23, "clflushopt"),
    (7, 0, Ebx, 24, "clwb"),
    (7, 0, Ebx, 25, "intel_pt"),
    (7, 0, Ebx, 26, "avx512pf"),
    (7, 0, Ebx, 27, "avx512er"),
    (7, 0, Ebx, 28, "avx512cd"),
    (7, 0, Ebx, 29, "sha_ni"),
    (7, 0, Ebx, 30, "avx512bw"),
    (7, 0, Ebx, 31, "avx512vl"),
    (7, 0, Ecx, 0, "prefetchwt1"),
    (7, 0, Ecx, 1, "avx512vbmi"),
    (7, 0, Ecx, 2, "umip"),
    (7, 0, Ecx, 3, "pku"),
    (7, 0, Ecx, 4, "ospke"),
    (7, 0, Ecx, 5, "waitpkg"),
    (7, 0, Ecx, 6, "avx512_vbmi2"),
    (7, 0, Ecx, 7, "cet_ss"),
    (7, 0, Ecx, 8, "gfni"),
    (7, 0, Ecx, 9, "vaes"),
    (7, 0, Ecx, 10, "vpclmulqdq"),
    (7, 0, Ecx, 11, "avx512_vnni"),
    (7, 0, Ecx, 12, "avx512_bitalg"),
    (7, 0, Ecx, 13, "tme"),
    (7, 0, Ecx, 14, "avx512_vpopcntdq"),
    (7, 0, Ecx, 16, "la57"),
    (7, 0, Ecx, 22, "rdpid"),
    (7, 0, Ecx, 23, "keylocker"),
    (7, 0, Ecx, 24, "bus_lock_detect"),
    (7, 0, Ecx, 25, "cldemote"),
    (7, 0, Ecx, 27, "movdiri"),
    (7, 0, Ecx, 28, "movdir64b"),
    (7, 0, Ecx, 29, "enqcmd"),
    (7, 0, Ecx, 30, "sgx_lc"),
    (7, 0, Ecx, 31, "pks"),
    (7, 0, Edx, 2, "avx512_4vnniw"),
    (7, 0, Edx, 3, "avx512_4fmaps"),
    (7, 0, Edx, 4, "fsrm"),
    (7, 0, Edx, 5, "uintr"),
    (7, 0, Edx, 8, "avx512_vp2intersect"),
    (7, 0, Edx, 9, "srbds_ctrl"),
    (7, 0, Edx, 10, "md_clear"),
    (7, 0, Edx, 11, "rtm_always_abort"),
    (7, 0, Edx, 13, "tsx_force_abort"),
    (7, 0, Edx, 14, "serialize"),
    (7, 0, Edx, 15, "hybrid"),
    (7, 0, Edx, 16, "tsxldtrk"),
    (7, 0, Edx, 18, "pconfig"),
    (7, 0, Edx, 19, "arch_lbr"),
    (7, 0, Edx, 20, "ibt"),
    (7, 0, Edx, 22, "amx_bf16"),
    (7, 0, Edx, 23, "avx512_fp16"),
    (7, 0, Edx, 24, "amx_tile"),
    (7, 0, Edx, 25, "amx_int8"),
    (7, 0, Edx, 26, "spec_ctrl"),
    (7, 0, Edx, 27, "stibp"),
    (7, 0, Edx, 28, "flush_l1d"),
    (7, 0, Edx, 29, "arch_capabilities"),
    (7, 0, Edx, 30, "core_capabilities"),
    (7, 0, Edx, 31, "ssbd"),
    (7, 1, Eax, 0, "sha512"),
    (7, 1, Eax, 1, "sm3"),
    (7, 1, Eax, 2, "sm4"),
    (7, 1, Eax, 4, "avx_vnni"),
    (7, 1, Eax, 5, "avx512_bf16"),
    (7, 1, Eax, 7, "cmpccxadd"),
    (7, 1, Eax, 10, "fzrm"),
    (7, 1, Eax, 11, "fsrs"),
    (7, 1, Eax, 12, "fsrc"),
    (7, 1, Eax, 19, "wrmsrns"),
    (7, 1, Eax, 21, "amx_fp16"),
    (7, 1, Eax, 22, "hreset"),
    (7, 1, Eax, 23, "avx_ifma"),
    (7, 1, Eax, 26, "lam"),
    (7, 1, Edx, 4, "avx_vnni_int8"),
    (7, 1, Edx, 5, "avx_ne_convert"),
    (7, 1, Edx, 10, "avx_vnni_int16"),
    (7, 1, Edx, 14, "prefetchiti"),
    (7, 1, Edx, 19, "avx10"),
    (0xd, 0, Eax, 0, "xstate_x87"),
    (0xd, 0, Eax, 1, "xstate_sse"),
    (0xd, 0, Eax, 2, "xstate_avx"),
    (0xd, 0, Eax, 3, "xstate_mpx_bndregs"),
    (0xd, 0, Eax, 4, "xstate_mpx_bndcsr"),
    (0xd, 0, Eax, 5, "xstate_avx512_opmask"),
    (0xd, 0, Eax, 6, "xstate_avx512_zmm_hi256"),
    (0xd, 0, Eax, 7, "xstate_avx512_hi16_zmm"),
    (0xd, 0, Eax, 9, "xstate_pkru"),
    (0xd, 0, Eax, 17, "xstate_amx_tilecfg"),
    (0xd, 0, Eax, 18, "xstate_amx_tiledata"),
    (0xd, 1, Eax, 0, "xsaveopt"),
    (0xd, 1, Eax, 1, "xsavec"),
    (0xd, 1, Eax, 2, "xgetbv1"),
    (0xd, 1, Eax, 3, "xsaves"),
    (0xd, 1, Eax, 4, "xfd"),
    (0x4000_0001, 0, Eax, 0, "kvmclock"),
    (0x4000_0001, 0, Eax, 1, "kvm_nop_io_delay"),
    (0x4000_0001, 0, Eax, 3, "kvmclock2"),
    (0x4000_0001, 0, Eax, 4, "kvm_async_pf"),
    (0x4000_0001, 0, Eax, 5, "kvm_steal_time"),
    (0x4000_0001, 0, Eax, 6, "kvm_pv_eoi"),
    (0x4000_0001, 0, Eax, 7, "kvm_pv_unhalt"),
    (0x4000_0001, 0, Eax, 9, "kvm_pv_tlb_flush"),
    (0x4000_0001, 0, Eax, 10, "kvm_async_pf_vmexit"),
    (0x4000_0001, 0, Eax, 11, "kvm_pv_send_ipi"),
    (0x4000_0001, 0, Eax, 12, "kvm_poll_control"),
    (0x4000_0001, 0, Eax, 13, "kvm_pv_sched_yield"),
    (0x4000_0001, 0, Eax, 14, "kvm_async_pf_int"),
    (0x4000_0001, 0, Eax, 15, "kvm_msi_ext_dest_id"),
    (0x4000_0001, 0, Eax, 16, "kvm_hc_map_gpa_range"),
    (0x4000_0001, 0, Eax, 17, "kvm_migration_control"),
    (0x4000_0001, 0, Eax, 24, "kvmclock_stable_bit"),
    (0x8000_0001, 0, Ecx, 0, "lahf_lm"),
    (0x8000_0001, 0, Ecx, 1, "cmp_legacy"),
    (0x8000_0001, 0, Ecx, 2, "svm"),
    (0x8000_0001, 0, Ecx, 3, "extapic"),
    (0x8000_0001, 0, Ecx, 4, "cr8_legacy"),
    (0x8000_0001, 0, Ecx, 5, "abm"),
    (0x8000_0001, 0, Ecx, 6, "sse4a"),
    (0x8000_0001, 0, Ecx, 7, "misalignsse"),
    (0x8000_0001, 0, Ecx, 8, "3dnowprefetch"),
    (0x8000_0001, 0, Ecx, 9, "osvw"),
    (0x8000_0001, 0, Ecx, 10, "ibs"),
    (0x8000_0001, 0, Ecx, 11, "xop"),
    (0x8000_0001, 0, Ecx, 12, "skinit"),
    (0x8000_0001, 0, Ecx, 13, "wdt"),
    (0x8000_0001, 0, Ecx, 15, "lwp"),
    (0x8000_0001, 0, Ecx, 16, "fma4"),
    (0x8000_0001, 0, Ecx, 17, "tce"),
    (0x8000_0001, 0, Ecx, 21, "tbm"),
    (0x8000_0001, 0, Ecx, 22, "topoext"),
    (0x8000_0001, 0, Ecx, 23, "perfctr_core"),
    (0x8000_0001, 0, Ecx, 24, "perfctr_nb"),
    (0x8000_0001, 0, Ecx, 29, "mwaitx"),
    (0x8000_0001, 0, Edx, 11, "syscall"),
    (0x8000_0001, 0, Edx, 19, "mp"),
    (0x8000_0001, 0, Edx, 20, "nx"),
    (0x8000_0001, 0, Edx, 22, "mmxext"),
    (0x8000_0001, 0, Edx, 25, "fxsr_opt"),
    (0x8000_0001, 0, Edx, 26, "pdpe1gb"),
    (0x8000_0001, 0, Edx, 27, "rdtscp"),
    (0x8000_0001, 0, Edx, 29, "lm"),
    (0x8000_0001, 0, Edx, 30, "3dnowext"),
    (0x8000_0001, 0, Edx, 31, "3dnow"),
    (0x8000_0007, 0, Edx, 8, "invariant_tsc"),
    (0x8000_0008, 0, Ebx, 9, "wbnoinvd"),
    (0x8000_0008, 0, Ebx, 12, "amd_ibpb"),
    (0x8000_0008, 0, Ebx, 14, "amd_ibrs"),
    (0x8000_0008, 0, Ebx, 15, "amd_stibp"),
    (0x8000_0008, 0, Ebx, 24, "amd_ssbd"),
    (0x8000_0008, 0, Ebx, 25, "virt_ssbd"),
];

/// The names of the bits in `mask` of a register; unnamed bits as "bit N".
pub fn feature_names(leaf: u32, subleaf: u32, reg: Register, mask: u32) -> Vec<String> {
    (0..32u8)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| {
            FEATURE_NAMES
                .iter()
                .find(|(l, s, r, b, _)| *l == leaf && *s == subleaf && *r == reg && *b == bit)
                .map(|(.., name)| (*name).to_string())
                .unwrap_or_else(|| format!("bit {bit}"))
        })
        .collect()
}

/// One way a saved vCPU's CPUID does not fit the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidIncompatibility {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: Register,
    pub rule: Rule,
    pub saved: u32,
    pub host: u32,
    /// For feature flags: the saved bits the host lacks.
    pub missing_bits: u32,
    /// Their names (see [`feature_names`]).
    pub missing: Vec<String>,
}

fn vendor_text(v: u32) -> String {
    v.to_le_bytes().escape_ascii().to_string()
}

impl fmt::Display for CpuidIncompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "leaf {:#x} sub-leaf {} {}: ",
            self.leaf, self.subleaf, self.register
        )?;
        match self.rule {
            Rule::Subset => write!(
                f,
                "the guest was shown {} (bits {:#010x}), which this host lacks",
                self.missing.join(", "),
                self.missing_bits
            ),
            Rule::Equal(what) if self.leaf == 0 => write!(
                f,
                "{what} differs (saved \"{}\", host \"{}\")",
                vendor_text(self.saved),
                vendor_text(self.host)
            ),
            Rule::Equal(what) => write!(
                f,
                "{what} differs (saved {:#x}, host {:#x})",
                self.saved, self.host
            ),
            Rule::NotGreater(what) => write!(
                f,
                "{what}: {:#x} in the snapshot but only {:#x} on this host",
                self.saved, self.host
            ),
        }
    }
}

/// Every incompatibility of one vCPU, as one error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("vCPU {vcpu}'s CPUID does not fit this host: {}; restore on a host whose CPU and KVM offer these features, or start the VM with a CPU model both hosts support", list(.problems))]
pub struct CpuCompatError {
    pub vcpu: u32,
    pub problems: Vec<CpuidIncompatibility>,
}

fn list(problems: &[CpuidIncompatibility]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn find(table: &[CpuidEntry], leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
    table.iter().find(|e| {
        e.function == leaf && (e.flags & FLAG_SIGNIFICANT_INDEX == 0 || e.index == subleaf)
    })
}

fn applies(r: &RegRule, leaf: u32, subleaf: u32) -> bool {
    r.leaf == leaf
        && match r.subleaf {
            Subleaves::Exactly(s) => s == subleaf,
            Subleaves::From(s) => subleaf >= s,
        }
}

/// Compares a saved vCPU's CPUID entries with the host's and returns every
/// incompatibility (empty when the vCPU fits). Host leaves that are absent
/// count as all-zero.
pub fn check_cpuid(saved: &[CpuidEntry], host: &[CpuidEntry]) -> Vec<CpuidIncompatibility> {
    let zero = CpuidEntry::default();
    let mut problems = Vec::new();
    for s in saved {
        let subleaf = if s.flags & FLAG_SIGNIFICANT_INDEX != 0 {
            s.index
        } else {
            0
        };
        let h = find(host, s.function, subleaf).unwrap_or(&zero);
        for r in RULES.iter().filter(|r| applies(r, s.function, subleaf)) {
            let (sv, hv) = (r.reg.of(s) & !r.ignore, r.reg.of(h) & !r.ignore);
            let (bad, missing_bits) = match r.rule {
                Rule::Subset => (sv & !hv != 0, sv & !hv),
                Rule::Equal(_) => (sv != hv, 0),
                Rule::NotGreater(_) => (sv > hv, 0),
            };
            if bad {
                problems.push(CpuidIncompatibility {
                    leaf: s.function,
                    subleaf,
                    register: r.reg,
                    rule: r.rule,
                    saved: sv,
                    host: hv,
                    missing_bits,
                    missing: feature_names(s.function, subleaf, r.reg, missing_bits),
                });
            }
        }
    }
    problems
}

/// [`check_cpuid`] as a `Result`, for vCPU `vcpu`.
pub fn ensure_compatible(
    vcpu: u32,
    saved: &[CpuidEntry],
    host: &[CpuidEntry],
) -> Result<(), CpuCompatError> {
    let problems = check_cpuid(saved, host);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CpuCompatError { vcpu, problems })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX2: u32 = 1 << 5;
    const AVX512F: u32 = 1 << 16;
    const SSE4_2: u32 = 1 << 20;
    const AVX: u32 = 1 << 28;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> CpuidEntry {
        let significant = matches!(function, 0x7 | 0xd | 0x4 | 0xb);
        CpuidEntry {
            function,
            index,
            flags: if significant {
                FLAG_SIGNIFICANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
        }
    }

    /// A plausible Intel host: vendor, family, features, leaf 7, XSAVE.
    fn host() -> Vec<CpuidEntry> {
        vec![
            // "GenuineIntel" as EBX, EDX, ECX.
            e(0x0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            e(
                0x1,
                0,
                [
                    0x0005_0657,
                    0x0001_0800,
                    0xfffa_3203 | SSE4_2 | AVX,
                    0x1f8b_fbff,
                ],
            ),
            e(0x4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),
            e(
                0x7,
                0,
                [0, 0xd19f_4fbb | AVX2 | AVX512F, 0x0000_0818, 0xbc00_0400],
            ),
            e(0xd, 0, [0x2e7, 0x440, 0xa88, 0]),
            e(0xd, 1, [0xf, 0, 0, 0]),
            e(0xd, 2, [0x100, 0x240, 0, 0]),
            e(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            e(0x4000_0001, 0, [0x0100_7afb, 0, 0, 0]),
            e(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            e(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ]
    }

    fn set(t: &mut [CpuidEntry], leaf: u32, sub: u32, f: impl FnOnce(&mut CpuidEntry)) {
        f(t.iter_mut()
            .find(|x| x.function == leaf && x.index == sub)
            .unwrap());
    }

    #[test]
    fn identical_tables_fit() {
        assert!(check_cpuid(&host(), &host()).is_empty());
        ensure_compatible(0, &host(), &host()).unwrap();
    }

    #[test]
    fn a_host_with_more_features_fits() {
        let mut saved = host();
        set(&mut saved, 7, 0, |x| x.ebx &= !(AVX2 | AVX512F));
        set(&mut saved, 0x8000_0000, 0, |x| x.eax = 0x8000_0001);
        saved.retain(|x| x.function != 0xd || x.index != 2);
        assert!(check_cpuid(&saved, &host()).is_empty());
    }

    #[test]
    fn missing_features_are_named() {
        let mut h = host();
        set(&mut h, 7, 0, |x| x.ebx &= !(AVX2 | AVX512F));
        set(&mut h, 1, 0, |x| x.ecx &= !(SSE4_2 | AVX));
        let problems = check_cpuid(&host(), &h);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let leaf1 = &problems[0];
        assert_eq!((leaf1.leaf, leaf1.subleaf, leaf1.register), (1, 0, Ecx));
        assert_eq!(leaf1.missing, vec!["sse4_2", "avx"]);
        assert_eq!(leaf1.missing_bits, SSE4_2 | AVX);
        let leaf7 = &problems[1];
        assert_eq!((leaf7.leaf, leaf7.subleaf, leaf7.register), (7, 0, Ebx));
        assert_eq!(leaf7.missing, vec!["avx2", "avx512f"]);
        let err = ensure_compatible(3, &host(), &h).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("vCPU 3's CPUID does not fit this host: leaf 0x1 sub-leaf 0 ECX: the guest was shown sse4_2, avx (bits 0x10100000), which this host lacks; leaf 0x7 sub-leaf 0 EBX: the guest was shown avx2, avx512f"), "{msg}");
    }

    #[test]
    fn vendor_and_family_must_be_equal() {
        let mut h = host();
        // "AuthenticAMD"
        set(&mut h, 0, 0, |x| {
            (x.ebx, x.edx, x.ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163)
        });
        set(&mut h, 1, 0, |x| x.eax = 0x00a2_0f12);
        let problems = check_cpuid(&host(), &h);
        let regs: Vec<_> = problems.iter().map(|p| (p.leaf, p.register)).collect();
        assert_eq!(regs, vec![(0, Ebx), (0, Ecx), (0, Edx), (1, Eax)]);
        assert_eq!(
            problems[0].to_string(),
            "leaf 0x0 sub-leaf 0 EBX: the CPU vendor differs (saved \"Genu\", host \"Auth\")"
        );
        assert!(problems[3]
            .to_string()
            .contains("the CPU family, model and stepping differs (saved 0x50657, host 0xa20f12)"));
    }

    #[test]
    fn maxima_must_not_be_greater() {
        let mut h = host();
        set(&mut h, 0, 0, |x| x.eax = 0xd);
        set(&mut h, 0x8000_0008, 0, |x| x.eax = 0x3027);
        let problems = check_cpuid(&host(), &h);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].rule, NotGreater("the highest basic leaf"));
        assert_eq!(
            problems[1].to_string(),
            "leaf 0x80000008 sub-leaf 0 EAX: the physical and linear address widths: 0x3030 in the snapshot but only 0x3027 on this host"
        );
        // Lower maxima on the saved side are fine.
        let mut saved = host();
        set(&mut saved, 0, 0, |x| x.eax = 0xd);
        assert!(check_cpuid(&saved, &host()).is_empty());
    }

    #[test]
    fn absent_host_leaves_count_as_zero() {
        let mut h = host();
        h.retain(|x| x.function != 7 && !(x.function == 0xd && x.index == 2));
        let problems = check_cpuid(&host(), &h);
        let summary: Vec<_> = problems
            .iter()
            .map(|p| (p.leaf, p.subleaf, p.register))
            .collect();
        assert_eq!(
            summary,
            vec![
                (7, 0, Ebx),
                (7, 0, Ecx),
                (7, 0, Edx),
                (0xd, 2, Eax),
                (0xd, 2, Ebx)
            ]
        );
        assert!(problems[0].missing.contains(&"avx2".to_string()));
    }

    #[test]
    fn guest_state_bits_are_not_host_features() {
        let mut saved = host();
        set(&mut saved, 1, 0, |x| x.ecx |= OSXSAVE);
        set(&mut saved, 7, 0, |x| x.ecx |= OSPKE);
        let mut h = host();
        set(&mut h, 1, 0, |x| x.ecx &= !OSXSAVE);
        set(&mut h, 7, 0, |x| x.ecx &= !OSPKE);
        assert!(check_cpuid(&saved, &h).is_empty());
        // Topology and cache leaves are the VMM's to set.
        set(&mut saved, 4, 0, |x| x.eax = 0xffff_ffff);
        set(&mut saved, 1, 0, |x| x.ebx = 0x0304_0800);
        assert!(check_cpuid(&saved, &h).is_empty());
    }

    #[test]
    fn unnamed_bits_are_numbered() {
        assert_eq!(
            feature_names(0x7, 0, Ecx, (1 << 15) | (1 << 3)),
            vec!["pku", "bit 15"]
        );
        assert_eq!(feature_names(0x1234, 0, Eax, 1), vec!["bit 0".to_string()]);
    }
}
