//! KVM state of a paused VM as plain, serializable data: what a snapshot or
//! a live migration carries besides guest memory and device state.
//!
//! - [`vm::VmState`]: VM-wide state (PIC, IOAPIC, PIT, kvmclock) and the KVM
//!   capabilities restoring needs.
//! - [`vcpu::VcpuState`]: one vCPU (registers, XSAVE, LAPIC, MSRs, events,
//!   CPUID, TSC frequency).
//!
//! # Saving (every vCPU paused, outside KVM_RUN)
//!
//! 1. [`KvmCaps::probe`] once per VM.
//! 2. [`vcpu::VcpuState::save`] for every vCPU, while all vCPUs stay paused
//!    (KVM_GET_VCPU_EVENTS is only consistent then).
//! 3. [`vm::VmState::save`] (kvmclock last, so the clock is read after the
//!    vCPUs stopped changing anything).
//! 4. Guest memory ([`godwit_migration::memory_file::save`]) and device
//!    state, then the state container
//!    ([`godwit_migration::format::ContainerWriter`]) with the sections
//!    [`vm::VM_SECTION`] and one [`vcpu::VCPU_SECTION`] per vCPU.
//!
//! # Restoring
//!
//! 1. Read the container; [`vm::VmState::check_host`] and, with
//!    [`vcpu::host_cpuid`], [`vcpu::check_cpuid`] for every vCPU, before
//!    building anything.
//! 2. Restore guest memory, create the VM (irqchip, PIT), register memory,
//!    create the vCPUs (as at boot), then [`KvmCaps::probe`].
//! 3. [`vm::VmState::restore`]: PIT, kvmclock, PIC and IOAPIC.
//! 4. [`vcpu::VcpuState::restore`] for every vCPU, before any vCPU runs.
//! 5. Devices, then resume the vCPUs.

pub mod vcpu;
pub mod vm;

use std::fmt;

use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{Immutable, IntoBytes};

pub use vcpu::VcpuState;
pub use vm::VmState;

/// Why KVM state could not be captured or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error("this host's KVM lacks {cap}, which the saved state needs for {needed_for}: restore on a host whose kernel offers it")]
    MissingCap {
        cap: &'static str,
        needed_for: &'static str,
    },
    #[error("KVM refused to restore MSR {index:#x} ({name}) of vCPU {vcpu}: this host's KVM does not support it; restore on a host with the same KVM features as the one that saved")]
    MsrRefused { vcpu: u32, index: u32, name: String },
    #[error("vCPU {vcpu}'s XSAVE state is {saved} bytes but this host's KVM takes {host}: the guest used CPU state (e.g. AMX) this host does not offer; restore on a host with the same CPU features")]
    XsaveTooLarge {
        vcpu: u32,
        saved: usize,
        host: usize,
    },
    #[error("vCPU {vcpu} ran its TSC at {saved} kHz but this host's runs at {} and its KVM cannot scale TSCs (no KVM_CAP_TSC_CONTROL): restore on a host with the same TSC frequency or with TSC scaling", khz(.host))]
    TscFrequency {
        vcpu: u32,
        saved: u32,
        host: Option<u32>,
    },
    #[error("the saved state asks to advance kvmclock by wall-clock time, but the saving host's KVM did not record its wall-clock time (no KVM_CLOCK_REALTIME): restore with the clock continuing instead")]
    NoRealtime,
    #[error(transparent)]
    Cpuid(#[from] godwit_migration::cpu_compat::CpuCompatError),
    #[error("{what} failed: {source:?} (a KVM list godwit builds exceeded KVM's size limit)")]
    KvmList {
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
    #[error("the saved state of vCPU {vcpu} is invalid: its XSAVE area has {len} bytes, not a multiple of 4 of at least {min}; the file was altered or written by a broken godwit")]
    XsaveLength { vcpu: u32, len: usize, min: usize },
    #[error("the saved state of vCPU {vcpu} is invalid: it has {entries} CPUID entries, more than KVM's {max}")]
    TooManyCpuidEntries {
        vcpu: u32,
        entries: usize,
        max: usize,
    },
    #[error(
        "the saved state of vCPU {vcpu} is invalid: it has neither an XSAVE area nor an FPU state"
    )]
    NoFpuState { vcpu: u32 },
}

fn khz(v: &Option<u32>) -> String {
    match v {
        Some(k) => format!("{k} kHz"),
        None => "a frequency KVM cannot tell".to_string(),
    }
}

pub(crate) fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    let what = what.into();
    move |source| StateError::Kvm { what, source }
}

/// A KVM capability the saved state relies on, named as in the KVM API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvmCap {
    #[serde(rename = "KVM_CAP_IRQCHIP")]
    Irqchip,
    #[serde(rename = "KVM_CAP_PIT2")]
    Pit2,
    #[serde(rename = "KVM_CAP_PIT_STATE2")]
    PitState2,
    #[serde(rename = "KVM_CAP_ADJUST_CLOCK")]
    AdjustClock,
    #[serde(rename = "KVM_CAP_EXT_CPUID")]
    ExtCpuid,
    #[serde(rename = "KVM_CAP_MP_STATE")]
    MpState,
    #[serde(rename = "KVM_CAP_VCPU_EVENTS")]
    VcpuEvents,
    #[serde(rename = "KVM_CAP_DEBUGREGS")]
    Debugregs,
    #[serde(rename = "KVM_CAP_XSAVE")]
    Xsave,
    #[serde(rename = "KVM_CAP_XSAVE2")]
    Xsave2,
    #[serde(rename = "KVM_CAP_XCRS")]
    Xcrs,
}

impl KvmCap {
    pub fn cap(self) -> Cap {
        match self {
            KvmCap::Irqchip => Cap::Irqchip,
            KvmCap::Pit2 => Cap::Pit2,
            KvmCap::PitState2 => Cap::PitState2,
            KvmCap::AdjustClock => Cap::AdjustClock,
            KvmCap::ExtCpuid => Cap::ExtCpuid,
            KvmCap::MpState => Cap::MpState,
            KvmCap::VcpuEvents => Cap::VcpuEvents,
            KvmCap::Debugregs => Cap::Debugregs,
            KvmCap::Xsave => Cap::Xsave,
            KvmCap::Xsave2 => Cap::Xsave2,
            KvmCap::Xcrs => Cap::Xcrs,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvmCap::Irqchip => "KVM_CAP_IRQCHIP",
            KvmCap::Pit2 => "KVM_CAP_PIT2",
            KvmCap::PitState2 => "KVM_CAP_PIT_STATE2",
            KvmCap::AdjustClock => "KVM_CAP_ADJUST_CLOCK",
            KvmCap::ExtCpuid => "KVM_CAP_EXT_CPUID",
            KvmCap::MpState => "KVM_CAP_MP_STATE",
            KvmCap::VcpuEvents => "KVM_CAP_VCPU_EVENTS",
            KvmCap::Debugregs => "KVM_CAP_DEBUGREGS",
            KvmCap::Xsave => "KVM_CAP_XSAVE",
            KvmCap::Xsave2 => "KVM_CAP_XSAVE2",
            KvmCap::Xcrs => "KVM_CAP_XCRS",
        }
    }

    /// What the capability restores.
    pub fn needed_for(self) -> &'static str {
        match self {
            KvmCap::Irqchip => "the in-kernel PIC, IOAPIC and LAPICs",
            KvmCap::Pit2 | KvmCap::PitState2 => "the in-kernel PIT",
            KvmCap::AdjustClock => "kvmclock",
            KvmCap::ExtCpuid => "the vCPUs' CPUID",
            KvmCap::MpState => "the vCPUs' run states (halted, waiting for SIPI)",
            KvmCap::VcpuEvents => "pending exceptions, NMIs and SMIs",
            KvmCap::Debugregs => "the debug registers",
            KvmCap::Xsave => "the FPU, SSE and AVX registers (XSAVE)",
            KvmCap::Xsave2 => "an XSAVE area larger than 4 KiB",
            KvmCap::Xcrs => "XCR0, the enabled XSAVE features",
        }
    }

    pub fn missing(self) -> StateError {
        StateError::MissingCap {
            cap: self.name(),
            needed_for: self.needed_for(),
        }
    }
}

/// What this host's KVM offers for saving and restoring, probed once per VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmCaps {
    /// MSRs to save: KVM_GET_MSR_INDEX_LIST plus the MTRRs and PAT, without
    /// the ones that are configuration rather than state (see
    /// [`vcpu::msrs_to_save`]).
    pub msrs_to_save: Vec<u32>,
    pub xsave: bool,
    /// KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2): the XSAVE buffer size in bytes,
    /// 0 without the capability.
    pub xsave2_size: usize,
    pub xcrs: bool,
    pub debugregs: bool,
    pub vcpu_events: bool,
    pub mp_state: bool,
    pub get_tsc_khz: bool,
    pub tsc_control: bool,
    pub adjust_clock: bool,
    pub pit2: bool,
    pub pit_state2: bool,
    pub irqchip: bool,
    pub ext_cpuid: bool,
}

impl KvmCaps {
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Result<Self, StateError> {
        let index_list = kvm.get_msr_index_list().map_err(kvm_err(
            "listing the MSRs it saves (KVM_GET_MSR_INDEX_LIST)",
        ))?;
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        Ok(KvmCaps {
            msrs_to_save: vcpu::msrs_to_save(index_list.as_slice()),
            xsave: vm.check_extension(Cap::Xsave),
            xsave2_size: usize::try_from(xsave2).unwrap_or(0),
            xcrs: vm.check_extension(Cap::Xcrs),
            debugregs: vm.check_extension(Cap::Debugregs),
            vcpu_events: vm.check_extension(Cap::VcpuEvents),
            mp_state: vm.check_extension(Cap::MpState),
            get_tsc_khz: vm.check_extension(Cap::GetTscKhz),
            tsc_control: vm.check_extension(Cap::TscControl),
            adjust_clock: vm.check_extension(Cap::AdjustClock),
            pit2: vm.check_extension(Cap::Pit2),
            pit_state2: vm.check_extension(Cap::PitState2),
            irqchip: vm.check_extension(Cap::Irqchip),
            ext_cpuid: vm.check_extension(Cap::ExtCpuid),
        })
    }

    fn has(&self, cap: KvmCap) -> bool {
        match cap {
            KvmCap::Irqchip => self.irqchip,
            KvmCap::Pit2 => self.pit2,
            KvmCap::PitState2 => self.pit_state2,
            KvmCap::AdjustClock => self.adjust_clock,
            KvmCap::ExtCpuid => self.ext_cpuid,
            KvmCap::MpState => self.mp_state,
            KvmCap::VcpuEvents => self.vcpu_events,
            KvmCap::Debugregs => self.debugregs,
            KvmCap::Xsave => self.xsave,
            KvmCap::Xsave2 => self.xsave2_size > 0,
            KvmCap::Xcrs => self.xcrs,
        }
    }

    pub(crate) fn require(&self, cap: KvmCap) -> Result<(), StateError> {
        if self.has(cap) {
            Ok(())
        } else {
            Err(cap.missing())
        }
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

// The state of every vCPU is written during a migration's downtime: one
// table lookup per digit, no formatting machinery.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
        s.push(char::from(HEX_DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let digits = s.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
        .collect()
}

/// Bytes as a hex string in the saved state.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HexBytes(pub Vec<u8>);

impl fmt::Debug for HexBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HexBytes({})", hex(&self.0))
    }
}

impl Serialize for HexBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for HexBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        unhex(&s)
            .map(HexBytes)
            .ok_or_else(|| D::Error::custom("expected an even number of hex digits"))
    }
}

/// A KVM structure saved as its exact bytes (hex in the state), as the
/// kernel defines them. Reading refuses a blob of any other size rather than
/// padding or cutting it, so a structure that changed size is caught.
#[derive(Clone, Copy)]
pub struct Blob<T>(pub T);

impl<T: IntoBytes + Immutable> Blob<T> {
    /// The structure's bytes, as kvm-bindings' serialization gives them.
    pub fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl<T: IntoBytes + Immutable> PartialEq for Blob<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl<T: IntoBytes + Immutable> fmt::Debug for Blob<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Blob<{}>({})",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or(""),
            hex(self.bytes())
        )
    }
}

impl<T: IntoBytes + Immutable> Serialize for Blob<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(self.bytes()))
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Blob<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let HexBytes(bytes) = HexBytes::deserialize(d)?;
        let want = std::mem::size_of::<T>();
        if bytes.len() != want {
            return Err(D::Error::custom(format!(
                "{} has {} bytes, expected {want}",
                std::any::type_name::<T>().rsplit("::").next().unwrap_or(""),
                bytes.len()
            )));
        }
        let de = serde::de::value::BytesDeserializer::<D::Error>::new(&bytes);
        T::deserialize(de).map(Blob)
    }
}

#[cfg(test)]
mod tests;
