//! Host capability reports (`godwit host-caps`, QMP `query-host-caps`): what
//! this host offers a VM, as a versioned JSON document that a planner on
//! another machine reads (see docs/host-caps-schema.md).
//!
//! A report names godwit's version and machine types, KVM's capabilities, a
//! CPUID summary (and the full table a new vCPU gets here), and for every
//! network peer the *supported feature set*: the virtio-net feature bits
//! godwit can offer a guest over that peer, computed from the one feature
//! table (`godwit_devices::virtio::net::features::FEATURES`) and the peer's
//! raw probe data, which the report carries too.
//!
//! The reader ([`parse_report`]) refuses reports of a newer schema version
//! and names the file and the JSON path of every malformed field.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use godwit_devices::net::tap::{Tap, TapOffloads, VnetHdr};
use godwit_devices::vhost_net::VHOST_NET_PATH;
use godwit_devices::vhost_user::interface::InterfaceRecord;
use godwit_devices::vhost_user::session::WANTED_PROTOCOL;
use godwit_devices::vhost_user::BackendOffer;
use godwit_devices::virtio::net::features;
use godwit_migration::cpu_compat::{self, CpuidEntry, Register};

use crate::machine_types::{self, MACHINE_TYPES};
use crate::net_abi::PeerSupport;
use crate::net_spec::{NetSpec, PeerSpec};

/// The schema's name; a report's `schema` is `NAME/VERSION`.
pub const SCHEMA_NAME: &str = "godwit-host-caps";
/// The schema version this godwit writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;
/// Where kernel vhost-net lives.
pub const VHOST_NET_DEVICE: &str = VHOST_NET_PATH;
/// VIRTIO_F_NOTIFY_ON_EMPTY's neighbour: VHOST_F_LOG_ALL, the bit a vhost
/// backend offers when it can log its writes for live migration.
pub const VHOST_F_LOG_ALL: u32 = 26;

/// `NAME/VERSION` as written into reports.
pub fn schema_id() -> String {
    format!("{SCHEMA_NAME}/{SCHEMA_VERSION}")
}

/// A network peer kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PeerKind {
    #[serde(rename = "tap")]
    Tap,
    #[serde(rename = "vhost-user")]
    VhostUser,
    #[serde(rename = "vhost-net")]
    VhostNet,
}

impl PeerKind {
    pub const ALL: [PeerKind; 3] = [PeerKind::Tap, PeerKind::VhostUser, PeerKind::VhostNet];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Tap => "tap",
            PeerKind::VhostUser => "vhost-user",
            PeerKind::VhostNet => "vhost-net",
        }
    }

    pub fn parse(s: &str) -> Option<PeerKind> {
        PeerKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for PeerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PeerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PeerKind::parse(s)
            .ok_or_else(|| format!("unknown peer kind '{s}'; use tap, vhost-user or vhost-net"))
    }
}

/// A set of feature bits, as hex and as canonical names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FeatureSet {
    pub hex: String,
    pub names: Vec<String>,
}

impl FeatureSet {
    pub fn of(bits: u64) -> Self {
        FeatureSet {
            hex: hex64(bits),
            names: name_list(bits),
        }
    }

    /// The bits (`hex` is authoritative).
    pub fn bits(&self) -> u64 {
        parse_hex(&self.hex).unwrap_or(0)
    }
}

pub fn hex64(v: u64) -> String {
    format!("{v:#018x}")
}

fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Canonical names of the bits in `bits` (`bitN` for bits the table lacks).
pub fn name_list(bits: u64) -> Vec<String> {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(features::name_of)
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    /// How planners name this host (`--name`, else the hostname).
    pub name: String,
    /// The kernel release (`uname -r`).
    pub kernel: Option<String>,
    /// When the report was taken, seconds since the Unix epoch.
    pub taken_at: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GodwitInfo {
    pub version: String,
    /// Machine types this godwit runs, oldest first.
    pub machine_types: Vec<String>,
    /// What the alias `godwit` resolves to.
    pub newest: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KvmInfo {
    pub available: bool,
    pub error: Option<String>,
    pub api_version: Option<i32>,
    pub max_vcpus: Option<u64>,
    pub recommended_vcpus: Option<u64>,
    /// `KVM_CAP_*` name -> whether this KVM offers it.
    pub capabilities: BTreeMap<String, bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuidInfo {
    pub available: bool,
    pub error: Option<String>,
    /// The vendor string of leaf 0.
    pub vendor: Option<String>,
    pub family: Option<u32>,
    pub model: Option<u32>,
    pub stepping: Option<u32>,
    /// Feature flags a new vCPU gets here (names from migration::cpu_compat).
    pub features: Vec<String>,
    /// The CPUID table a new vCPU gets here (what a VM started here is
    /// shown, and what an incoming VM is compared with), each entry as
    /// `function:index:flags:eax:ebx:ecx:edx` in hex ([`cpuid_entry_text`]).
    #[serde(serialize_with = "serialize_entries")]
    pub entries: Vec<CpuidEntry>,
}

/// A CPUID entry as a report writes it: `function:index:flags:eax:ebx:ecx:edx`,
/// each 8 hex digits (compact: a table has dozens of entries).
pub fn cpuid_entry_text(e: &CpuidEntry) -> String {
    format!(
        "{:08x}:{:08x}:{:08x}:{:08x}:{:08x}:{:08x}:{:08x}",
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
    )
}

/// Reads [`cpuid_entry_text`].
pub fn parse_cpuid_entry(s: &str) -> Option<CpuidEntry> {
    let mut v = [0u32; 7];
    let mut parts = s.split(':');
    for slot in v.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 8 {
            return None;
        }
        *slot = u32::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(CpuidEntry {
        function: v[0],
        index: v[1],
        flags: v[2],
        eax: v[3],
        ebx: v[4],
        ecx: v[5],
        edx: v[6],
    })
}

fn serialize_entries<S: serde::Serializer>(
    entries: &[CpuidEntry],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(entries.iter().map(cpuid_entry_text))
}

/// Whether a peer could be probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerStatus {
    /// Probed: `supported` says what it carries.
    Ok,
    /// It exists (or was named) but could not be probed: `error` says why.
    Error,
    /// It does not exist on this host (kernel vhost-net without /dev/vhost-net).
    Absent,
}

impl PeerStatus {
    fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Ok => "ok",
            PeerStatus::Error => "error",
            PeerStatus::Absent => "absent",
        }
    }
}

/// A feature the peer lacks, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lack {
    pub name: String,
    pub bit: u32,
    pub why: String,
}

/// Whether a machine type's default ABI fits this peer as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MachineFit {
    pub name: String,
    pub supported: bool,
    pub missing: Vec<String>,
}

/// Raw TAP probe data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TapProbe {
    /// host-caps created the TAP itself (and removed it).
    pub temporary: bool,
    pub ifname: Option<String>,
    /// `TUNGETFEATURES` of /dev/net/tun.
    pub tun_features: Option<String>,
    /// What `TUNSETOFFLOAD` accepted (all false without a vnet header).
    pub offloads: Option<TapOffloads>,
}

/// Raw kernel vhost-net probe data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VhostNetProbe {
    pub device: String,
    pub present: bool,
    /// `VHOST_GET_FEATURES`.
    pub features: Option<String>,
    /// The TAP whose offloads carry the packet features.
    pub tap: Option<TapProbe>,
}

/// A vhost-user backend's interface record (godwit's protocol extension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceInfo {
    pub active: String,
    /// The feature bits of `active` (the record's values), when known.
    pub features: Option<String>,
    pub pinned: bool,
    pub latest: String,
    pub supported: Vec<String>,
    pub truncated: bool,
}

/// Raw vhost-user probe data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VhostUserProbe {
    pub socket: String,
    /// `GET_FEATURES`, transport bits included.
    pub features: Option<String>,
    /// `GET_PROTOCOL_FEATURES`.
    pub protocol_features: Option<String>,
    /// `GET_QUEUE_NUM` (with protocol MQ).
    pub queue_num: Option<u64>,
    /// The backend's interface versions (absent: it lacks godwit's extension).
    pub interface: Option<InterfaceInfo>,
}

/// A peer's raw probe data, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Probe {
    Tap(TapProbe),
    VhostNet(VhostNetProbe),
    VhostUser(VhostUserProbe),
}

/// One network peer of the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerEntry {
    pub kind: PeerKind,
    /// The `--net` text that was probed (`null`: godwit's default probe).
    pub spec: Option<String>,
    /// Human name, e.g. `TAP gwtap0`.
    pub name: String,
    pub status: PeerStatus,
    pub error: Option<String>,
    /// Feature bits godwit can offer a guest over this peer.
    pub supported: Option<FeatureSet>,
    /// Features godwit implements that this peer cannot carry, and why.
    pub lacks: Vec<Lack>,
    /// Set when a VM on this peer could not migrate at all (a vhost backend
    /// that cannot log its writes).
    pub migration_blocker: Option<String>,
    /// Which machine types' default ABI this peer carries.
    pub machine_types: Vec<MachineFit>,
    pub probe: Probe,
}

impl PeerEntry {
    /// What the peer supports, as the ABI decision reads it; `None` when it
    /// could not be probed.
    pub fn support(&self) -> Option<PeerSupport> {
        let supported = self.supported.as_ref()?.bits();
        if self.status != PeerStatus::Ok {
            return None;
        }
        Some(PeerSupport {
            kind: self.kind.as_str(),
            name: self.name.clone(),
            supported,
            why_not: self.lacks.iter().map(|l| (l.bit, l.why.clone())).collect(),
        })
    }

    fn from_support(
        kind: PeerKind,
        spec: Option<String>,
        support: &PeerSupport,
        migration_blocker: Option<String>,
        probe: Probe,
    ) -> Self {
        PeerEntry {
            kind,
            spec,
            name: support.name.clone(),
            status: PeerStatus::Ok,
            error: None,
            supported: Some(FeatureSet::of(support.supported)),
            lacks: support
                .why_not
                .iter()
                .map(|(b, why)| Lack {
                    name: features::name_of(*b),
                    bit: *b,
                    why: why.clone(),
                })
                .collect(),
            migration_blocker,
            machine_types: machine_fits(support.supported),
            probe,
        }
    }

    fn failed(
        kind: PeerKind,
        spec: Option<String>,
        name: String,
        status: PeerStatus,
        error: String,
        probe: Probe,
    ) -> Self {
        PeerEntry {
            kind,
            spec,
            name,
            status,
            error: Some(error),
            supported: None,
            lacks: Vec::new(),
            migration_blocker: None,
            machine_types: Vec::new(),
            probe,
        }
    }
}

fn machine_fits(supported: u64) -> Vec<MachineFit> {
    MACHINE_TYPES
        .iter()
        .rev()
        .map(|m| {
            let missing = m.net_features() & !supported;
            MachineFit {
                name: m.name.to_string(),
                supported: missing == 0,
                missing: name_list(missing),
            }
        })
        .collect()
}

/// A host capability report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostCaps {
    pub schema: String,
    pub host: HostInfo,
    pub godwit: GodwitInfo,
    pub kvm: KvmInfo,
    pub cpuid: CpuidInfo,
    pub peers: Vec<PeerEntry>,
}

impl HostCaps {
    /// The `index`-th peer of `kind` (device `index` of that kind uses it).
    pub fn peer(&self, kind: PeerKind, index: usize) -> Option<&PeerEntry> {
        self.peers.iter().filter(|p| p.kind == kind).nth(index)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

// ---------------------------------------------------------------------------
// Support sets of vhost peers: the VM's own rules (crate::net), from the
// feature table's vhost column.

/// The backend offer of a report entry (what `GET_FEATURES`,
/// `GET_PROTOCOL_FEATURES` and `GET_QUEUE_NUM` said).
pub fn backend_offer(features: u64, protocol: u64, queue_num: Option<u64>) -> BackendOffer {
    BackendOffer {
        features,
        protocol,
        acked_protocol: protocol & WANTED_PROTOCOL,
        queue_num,
        record: None,
    }
}

/// What a vhost-user backend that offers `offered` (GET_FEATURES) with
/// `queue_num` queues (GET_QUEUE_NUM; `None` without protocol MQ) lets godwit
/// offer a guest ([`crate::net::vhost_user_support`]).
pub fn vhost_user_support(socket: &str, offered: u64, queue_num: Option<u64>) -> PeerSupport {
    crate::net::vhost_user_support(socket, &backend_offer(offered, 0, queue_num))
}

/// Why a vhost-user backend cannot take part in live migration (it cannot
/// log its writes to guest memory), or `None`.
pub fn vhost_user_migration_blocker(offered: u64, protocol: u64) -> Option<String> {
    backend_offer(offered, protocol, None)
        .logging()
        .err()
        .map(|lacks| {
            format!("the backend lacks {lacks}: it cannot log its writes to guest memory, so a VM on it cannot migrate")
        })
}

// ---------------------------------------------------------------------------
// Collecting a report on this host.

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn kvm_info() -> (KvmInfo, Option<kvm_ioctls::Kvm>) {
    use kvm_ioctls::Cap;
    let kvm = match crate::vm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            return (
                KvmInfo {
                    available: false,
                    error: Some(e.to_string()),
                    api_version: None,
                    max_vcpus: None,
                    recommended_vcpus: None,
                    capabilities: BTreeMap::new(),
                },
                None,
            )
        }
    };
    let caps: &[(Cap, &str)] = &[
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
        (Cap::MpState, "KVM_CAP_MP_STATE"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::Xsave2, "KVM_CAP_XSAVE2"),
        (Cap::Xcrs, "KVM_CAP_XCRS"),
        (Cap::TscControl, "KVM_CAP_TSC_CONTROL"),
        (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
        (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
        (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
        (Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
        (Cap::KvmclockCtrl, "KVM_CAP_KVMCLOCK_CTRL"),
        (Cap::X2ApicApi, "KVM_CAP_X2APIC_API"),
        (Cap::DirtyLogRing, "KVM_CAP_DIRTY_LOG_RING"),
    ];
    let info = KvmInfo {
        available: true,
        error: None,
        api_version: Some(kvm.get_api_version()),
        max_vcpus: Some(kvm.get_max_vcpus() as u64),
        recommended_vcpus: Some(kvm.get_nr_vcpus() as u64),
        capabilities: caps
            .iter()
            .map(|(c, n)| (n.to_string(), kvm.check_extension(*c)))
            .collect(),
    };
    (info, Some(kvm))
}

/// The feature names a CPUID table shows (named bits only).
pub fn cpu_feature_names(entries: &[CpuidEntry]) -> Vec<String> {
    let regs: &[(u32, u32, Register)] = &[
        (1, 0, Register::Edx),
        (1, 0, Register::Ecx),
        (7, 0, Register::Ebx),
        (7, 0, Register::Ecx),
        (7, 0, Register::Edx),
        (7, 1, Register::Eax),
        (0xd, 1, Register::Eax),
        (0x8000_0001, 0, Register::Ecx),
        (0x8000_0001, 0, Register::Edx),
        (0x8000_0007, 0, Register::Edx),
        (0x8000_0008, 0, Register::Ebx),
    ];
    let mut out = Vec::new();
    for &(leaf, sub, reg) in regs {
        let Some(e) = entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0 && sub == 0))
        else {
            continue;
        };
        let value = match reg {
            Register::Eax => e.eax,
            Register::Ebx => e.ebx,
            Register::Ecx => e.ecx,
            Register::Edx => e.edx,
        };
        out.extend(
            cpu_compat::feature_names(leaf, sub, reg, value)
                .into_iter()
                .filter(|n| !n.starts_with("bit ")),
        );
    }
    out
}

/// The CPUID summary of a table.
pub fn cpuid_info(entries: Vec<CpuidEntry>) -> CpuidInfo {
    let leaf = |f: u32| entries.iter().find(|e| e.function == f).copied();
    let vendor = leaf(0).map(|e| {
        let mut bytes = Vec::with_capacity(12);
        for r in [e.ebx, e.edx, e.ecx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let (family, model, stepping) = match leaf(1) {
        Some(e) => {
            let base_family = (e.eax >> 8) & 0xf;
            let ext_family = (e.eax >> 20) & 0xff;
            let base_model = (e.eax >> 4) & 0xf;
            let ext_model = (e.eax >> 16) & 0xf;
            let family = if base_family == 0xf {
                base_family + ext_family
            } else {
                base_family
            };
            let model = if base_family == 0x6 || base_family == 0xf {
                (ext_model << 4) | base_model
            } else {
                base_model
            };
            (Some(family), Some(model), Some(e.eax & 0xf))
        }
        None => (None, None, None),
    };
    CpuidInfo {
        available: true,
        error: None,
        vendor,
        family,
        model,
        stepping,
        features: cpu_feature_names(&entries),
        entries,
    }
}

fn cpuid_unavailable(error: String) -> CpuidInfo {
    CpuidInfo {
        available: false,
        error: Some(error),
        vendor: None,
        family: None,
        model: None,
        stepping: None,
        features: Vec::new(),
        entries: Vec::new(),
    }
}

/// `TUNGETFEATURES` of /dev/net/tun.
fn tun_features() -> Option<u32> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .ok()?;
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer, which
    // points to a live local; the fd is an open /dev/net/tun file.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNGETFEATURES,
            &mut features as *mut libc::c_uint,
        )
    };
    (rc >= 0).then_some(features)
}

/// `VHOST_GET_FEATURES` = `_IOR(0xAF, 0x00, __u64)`.
const VHOST_GET_FEATURES: libc::c_ulong = 0x8008_af00;

/// Opens /dev/vhost-net and reads its features: `Ok(None)` when the device
/// does not exist.
fn vhost_net_features() -> Result<Option<u64>, String> {
    use std::os::fd::AsRawFd;
    if !Path::new(VHOST_NET_DEVICE).exists() {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_NET_DEVICE)
        .map_err(|e| format!("cannot open {VHOST_NET_DEVICE}: {e}"))?;
    let mut features: u64 = 0;
    // SAFETY: VHOST_GET_FEATURES writes one u64 to the pointer, which points
    // to a live local; the fd is an open vhost-net device.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            VHOST_GET_FEATURES as _,
            &mut features as *mut u64,
        )
    };
    if rc < 0 {
        return Err(format!(
            "VHOST_GET_FEATURES on {VHOST_NET_DEVICE} failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Some(features))
}

/// Probes a TAP: the one a spec names, or (`spec` None) a temporary one
/// host-caps creates and removes (closing the fd of a non-persistent TAP
/// deletes it).
fn probe_tap(spec: Option<&NetSpec>, tun: Option<u32>) -> (PeerEntry, Option<TapOffloads>) {
    let tun_features = tun.map(|f| format!("{f:#x}"));
    let opened = match spec {
        Some(spec) => crate::net::open_tap("host-caps", spec).map_err(|e| e.to_string()),
        None => Tap::open("", VnetHdr::Auto).map_err(|e| e.to_string()),
    };
    let ifname = spec.and_then(|s| match &s.peer {
        PeerSpec::Tap { ifname, .. } => ifname.clone(),
        _ => None,
    });
    let text = spec.map(|s| s.text.clone());
    match opened {
        Ok(tap) => {
            let caps = tap.probe_offloads();
            let support = crate::net::tap_support(tap.name(), &caps);
            let probe = Probe::Tap(TapProbe {
                temporary: spec.is_none(),
                ifname: Some(tap.name().to_string()),
                tun_features,
                offloads: Some(caps),
            });
            (
                PeerEntry::from_support(PeerKind::Tap, text, &support, None, probe),
                Some(caps),
            )
        }
        Err(e) => {
            let name = format!(
                "TAP {}",
                ifname.clone().unwrap_or_else(|| "(temporary)".into())
            );
            let probe = Probe::Tap(TapProbe {
                temporary: spec.is_none(),
                ifname,
                tun_features,
                offloads: None,
            });
            (
                PeerEntry::failed(PeerKind::Tap, text, name, PeerStatus::Error, e, probe),
                None,
            )
        }
    }
}

fn probe_vhost_net(
    spec: Option<&NetSpec>,
    default_tap: Option<TapOffloads>,
    tun: Option<u32>,
) -> PeerEntry {
    let text = spec.map(|s| s.text.clone());
    let name = match spec.map(|s| &s.peer) {
        Some(PeerSpec::VhostNet { ifname }) => format!("vhost-net on TAP {ifname}"),
        _ => "kernel vhost-net".to_string(),
    };
    let absent = |error: String, status: PeerStatus| {
        PeerEntry::failed(
            PeerKind::VhostNet,
            text.clone(),
            name.clone(),
            status,
            error,
            Probe::VhostNet(VhostNetProbe {
                device: VHOST_NET_DEVICE.into(),
                present: status != PeerStatus::Absent,
                features: None,
                tap: None,
            }),
        )
    };
    let features = match vhost_net_features() {
        Ok(Some(f)) => f,
        Ok(None) => {
            return absent(
                format!("{VHOST_NET_DEVICE} does not exist: the kernel has no vhost-net (CONFIG_VHOST_NET) or the vhost_net module is not loaded"),
                PeerStatus::Absent,
            )
        }
        Err(e) => return absent(e, PeerStatus::Error),
    };
    // The packet features ride on the TAP behind vhost-net.
    let (tap_probe, offloads) = match spec.map(|s| &s.peer) {
        Some(PeerSpec::VhostNet { ifname }) => {
            let tap_spec = NetSpec {
                text: format!("tap,ifname={ifname}"),
                id: None,
                peer: PeerSpec::Tap {
                    ifname: Some(ifname.clone()),
                    fd: None,
                    vnet_hdr: Some(true),
                },
                mac: None,
                mtu: None,
                strict: None,
                features: BTreeMap::new(),
            };
            let (entry, caps) = probe_tap(Some(&tap_spec), tun);
            match (entry.probe, caps) {
                (Probe::Tap(p), Some(c)) => (Some(p), c),
                _ => {
                    return absent(
                        format!(
                            "its TAP {ifname} could not be probed: {}",
                            entry.error.unwrap_or_default()
                        ),
                        PeerStatus::Error,
                    )
                }
            }
        }
        _ => match default_tap {
            Some(c) => (
                Some(TapProbe {
                    temporary: true,
                    ifname: None,
                    tun_features: tun.map(|f| format!("{f:#x}")),
                    offloads: Some(c),
                }),
                c,
            ),
            None => {
                return absent(
                    "no TAP could be probed for the packet features vhost-net carries on a TAP"
                        .into(),
                    PeerStatus::Error,
                )
            }
        },
    };
    let tap_name = tap_probe
        .as_ref()
        .and_then(|t| t.ifname.clone())
        .unwrap_or_else(|| "(temporary)".into());
    let mut support = crate::net::vhost_net_support(&tap_name, &offloads, features);
    support.name = name.clone();
    let blocker = (features & (1u64 << VHOST_F_LOG_ALL) == 0).then(|| {
        "this kernel's vhost-net lacks LOG_ALL (bit 26): it cannot log its writes, so a VM on it cannot migrate".to_string()
    });
    PeerEntry::from_support(
        PeerKind::VhostNet,
        text,
        &support,
        blocker,
        Probe::VhostNet(VhostNetProbe {
            device: VHOST_NET_DEVICE.into(),
            present: true,
            features: Some(hex64(features)),
            tap: tap_probe,
        }),
    )
}

/// What a vhost-user probe found, in the terms of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserOffer {
    pub features: u64,
    pub protocol_features: u64,
    pub queue_num: Option<u64>,
    pub interface: Option<InterfaceInfo>,
}

/// The report entry of a probed vhost-user backend.
pub fn vhost_user_entry(spec: Option<String>, socket: &str, offer: &VhostUserOffer) -> PeerEntry {
    let support = vhost_user_support(socket, offer.features, offer.queue_num);
    PeerEntry::from_support(
        PeerKind::VhostUser,
        spec,
        &support,
        vhost_user_migration_blocker(offer.features, offer.protocol_features),
        Probe::VhostUser(VhostUserProbe {
            socket: socket.to_string(),
            features: Some(hex64(offer.features)),
            protocol_features: Some(hex64(offer.protocol_features)),
            queue_num: offer.queue_num,
            interface: offer.interface.clone(),
        }),
    )
}

/// The report's view of an interface record.
fn interface_info(r: &InterfaceRecord) -> InterfaceInfo {
    InterfaceInfo {
        active: r.active.clone(),
        features: Some(hex64(r.values.features)),
        pinned: r.pinned,
        latest: r.latest.clone(),
        supported: r.supported.clone(),
        truncated: r.truncated,
    }
}

/// Probes a vhost-user backend with godwit's frontend handshake
/// ([`crate::net::open_vhost_user`]; pinning the spec's `interface=` if
/// given), then closes the connection.
fn probe_vhost_user(spec: &NetSpec, socket: &Path, server: bool, pin: Option<&str>) -> PeerEntry {
    let socket_s = socket.display().to_string();
    let failed = |error: String| {
        PeerEntry::failed(
            PeerKind::VhostUser,
            Some(spec.text.clone()),
            format!("vhost-user backend {socket_s}"),
            PeerStatus::Error,
            error,
            Probe::VhostUser(VhostUserProbe {
                socket: socket_s.clone(),
                features: None,
                protocol_features: None,
                queue_num: None,
                interface: None,
            }),
        )
    };
    if !server && !socket.exists() {
        return failed(format!(
            "no socket at {socket_s}: start the vhost-user backend first (or give server=on if it connects to godwit)"
        ));
    }
    let peer = match crate::net::open_vhost_user("host-caps", socket, server, pin) {
        Ok(p) => p,
        Err(e) => return failed(format!("could not be probed: {e}")),
    };
    let offer = peer.session.offer.clone();
    peer.session.conn.shutdown();
    let support = crate::net::vhost_user_support(&peer.socket, &offer);
    PeerEntry::from_support(
        PeerKind::VhostUser,
        Some(spec.text.clone()),
        &support,
        vhost_user_migration_blocker(offer.features, offer.protocol),
        Probe::VhostUser(VhostUserProbe {
            socket: peer.socket.clone(),
            features: Some(hex64(offer.features)),
            protocol_features: Some(hex64(offer.protocol)),
            queue_num: offer.queue_num,
            interface: offer.record.as_ref().map(interface_info),
        }),
    )
}

/// Takes this host's report. `nets` name the peers to probe; without a
/// `tap` spec a temporary TAP is probed, and kernel vhost-net is always
/// reported (present or not). `name` overrides the hostname.
pub fn collect(nets: &[NetSpec], name: Option<&str>) -> HostCaps {
    let host = HostInfo {
        name: name
            .map(str::to_string)
            .or_else(|| read_trimmed("/proc/sys/kernel/hostname"))
            .unwrap_or_else(|| "unknown".into()),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        taken_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs()),
    };
    let godwit = GodwitInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        machine_types: MACHINE_TYPES.iter().map(|m| m.name.to_string()).collect(),
        newest: machine_types::newest().name.to_string(),
    };
    let (kvm, kvm_fd) = kvm_info();
    let cpuid = match &kvm_fd {
        Some(k) => match crate::state::vcpu::host_cpuid(k, 1) {
            Ok(entries) => cpuid_info(entries),
            Err(e) => cpuid_unavailable(e.to_string()),
        },
        None => cpuid_unavailable("KVM is not available".into()),
    };
    drop(kvm_fd);

    let tun = tun_features();
    let mut peers = Vec::new();
    let mut first_tap: Option<TapOffloads> = None;
    let tap_specs: Vec<&NetSpec> = nets
        .iter()
        .filter(|s| matches!(s.peer, PeerSpec::Tap { .. }))
        .collect();
    if tap_specs.is_empty() {
        let (entry, caps) = probe_tap(None, tun);
        first_tap = caps;
        peers.push(entry);
    }
    for spec in &tap_specs {
        let (entry, caps) = probe_tap(Some(spec), tun);
        first_tap = first_tap.or(caps);
        peers.push(entry);
    }
    for spec in nets {
        if let PeerSpec::VhostUser {
            socket,
            server,
            interface,
        } = &spec.peer
        {
            peers.push(probe_vhost_user(
                spec,
                socket,
                *server,
                interface.as_deref(),
            ));
        }
    }
    let vhost_net_specs: Vec<&NetSpec> = nets
        .iter()
        .filter(|s| matches!(s.peer, PeerSpec::VhostNet { .. }))
        .collect();
    if vhost_net_specs.is_empty() {
        peers.push(probe_vhost_net(None, first_tap, tun));
    }
    for spec in vhost_net_specs {
        peers.push(probe_vhost_net(Some(spec), first_tap, tun));
    }
    HostCaps {
        schema: schema_id(),
        host,
        godwit,
        kvm,
        cpuid,
        peers,
    }
}

// ---------------------------------------------------------------------------
// `godwit host-caps`.

#[derive(clap::Args, Debug)]
pub struct HostCapsArgs {
    /// A peer to probe, as given to `godwit run --net`: tap,ifname=NAME[,vnet_hdr=off],
    /// vhost-user,socket=PATH[,server=on][,interface=NAME], vhost-net,ifname=NAME.
    /// Repeatable. Without a tap spec a temporary TAP is created, probed and removed.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<NetSpec>,
    /// The host's name in plans (default: the hostname).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Write the report to this file instead of standard output.
    #[arg(long, value_name = "PATH")]
    pub output: Option<std::path::PathBuf>,
}

/// `godwit host-caps`: prints (or writes) this host's report. Peers that
/// cannot be probed are entries with an error, not a failure; exit status 1
/// only when the report cannot be written.
pub fn main(args: HostCapsArgs) -> std::process::ExitCode {
    use std::io::Write;
    let report = collect(&args.net, args.name.as_deref());
    let text = match serde_json::to_string_pretty(&report) {
        Ok(t) => t + "\n",
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "godwit host-caps: error: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let written = match &args.output {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .map_err(|e| format!("cannot write the report: {e}")),
    };
    match written {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "godwit host-caps: error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------
// Reading a report.

/// Why a report cannot be used. Each names the report (file or API
/// argument) and the JSON path of the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("{file}: cannot read the host report: {detail}")]
    Read { file: String, detail: String },
    #[error("{file}: not valid JSON (line {line}, column {column}): {detail}; a host report is what `godwit host-caps` prints")]
    Json {
        file: String,
        line: usize,
        column: usize,
        detail: String,
    },
    #[error("{file}: field `schema`: the report has schema {found}, newer than the {SCHEMA_NAME}/{SCHEMA_VERSION} this godwit ({}) reads; plan with a godwit at least as new as the one that took the report", env!("CARGO_PKG_VERSION"))]
    Newer { file: String, found: String },
    #[error("{file}: field `{path}`: {problem}")]
    Field {
        file: String,
        path: String,
        problem: String,
    },
}

impl ReportError {
    /// The JSON path of the field at fault, if the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ReportError::Field { path, .. } => Some(path),
            ReportError::Newer { .. } => Some("schema"),
            _ => None,
        }
    }
}

/// One step of a JSON path.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

/// A position in the document being read. The path is a chain of parents,
/// spelled out only for an error.
struct At<'a, 'p> {
    v: &'a Value,
    seg: Seg<'a>,
    parent: Option<&'p At<'a, 'p>>,
    file: &'a str,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

type R<T> = Result<T, ReportError>;

impl<'a, 'p> At<'a, 'p> {
    fn root(v: &'a Value, file: &'a str) -> Self {
        At {
            v,
            seg: Seg::Root,
            parent: None,
            file,
        }
    }

    /// `peers[1].supported.hex`.
    fn path(&self) -> String {
        let mut segs = Vec::new();
        let mut at = Some(self);
        while let Some(a) = at {
            segs.push(a.seg);
            at = a.parent;
        }
        let mut out = String::new();
        for seg in segs.iter().rev() {
            match seg {
                Seg::Root => {}
                Seg::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    fn err(&self, problem: impl Into<String>) -> ReportError {
        let path = self.path();
        ReportError::Field {
            file: self.file.to_string(),
            path: if path.is_empty() {
                "(top level)".into()
            } else {
                path
            },
            problem: problem.into(),
        }
    }

    fn child<'s>(&'s self, key: &'a str, v: &'a Value) -> At<'a, 's> {
        At {
            v,
            seg: Seg::Key(key),
            parent: Some(self),
            file: self.file,
        }
    }

    fn index<'s>(&'s self, i: usize, v: &'a Value) -> At<'a, 's> {
        At {
            v,
            seg: Seg::Index(i),
            parent: Some(self),
            file: self.file,
        }
    }

    fn object(&self) -> R<&'a serde_json::Map<String, Value>> {
        self.v
            .as_object()
            .ok_or_else(|| self.err(format!("expected an object, found {}", type_name(self.v))))
    }

    /// A member that must be present (and not null).
    fn get<'s>(&'s self, key: &'a str) -> R<At<'a, 's>> {
        let o = self.object()?;
        match o.get(key) {
            Some(Value::Null) | None => Err(self.child(key, &Value::Null).err("missing")),
            Some(v) => Ok(self.child(key, v)),
        }
    }

    /// A member that may be absent or null.
    fn opt<'s>(&'s self, key: &'a str) -> R<Option<At<'a, 's>>> {
        let o = self.object()?;
        Ok(match o.get(key) {
            Some(Value::Null) | None => None,
            Some(v) => Some(self.child(key, v)),
        })
    }

    fn str(&self) -> R<&'a str> {
        self.v
            .as_str()
            .ok_or_else(|| self.err(format!("expected a string, found {}", type_name(self.v))))
    }

    fn string(&self) -> R<String> {
        self.str().map(str::to_string)
    }

    fn bool(&self) -> R<bool> {
        self.v.as_bool().ok_or_else(|| {
            self.err(format!(
                "expected true or false, found {}",
                type_name(self.v)
            ))
        })
    }

    fn u64(&self) -> R<u64> {
        self.v.as_u64().ok_or_else(|| {
            self.err(format!(
                "expected a non-negative integer, found {}",
                describe_value(self.v)
            ))
        })
    }

    fn u32(&self) -> R<u32> {
        let v = self.u64()?;
        u32::try_from(v).map_err(|_| self.err(format!("{v} does not fit 32 bits")))
    }

    fn i32(&self) -> R<i32> {
        self.v
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| {
                self.err(format!(
                    "expected an integer, found {}",
                    describe_value(self.v)
                ))
            })
    }

    fn hex(&self) -> R<u64> {
        let s = self.str()?;
        parse_hex(s).ok_or_else(|| {
            self.err(format!(
                "'{s}' is not a 64-bit hex number such as \"0x0000000000000001\""
            ))
        })
    }

    fn items<'s>(&'s self) -> R<Vec<At<'a, 's>>> {
        let a = self
            .v
            .as_array()
            .ok_or_else(|| self.err(format!("expected an array, found {}", type_name(self.v))))?;
        Ok(a.iter()
            .enumerate()
            .map(|(i, v)| self.index(i, v))
            .collect())
    }

    fn strings(&self) -> R<Vec<String>> {
        self.items()?.iter().map(At::string).collect()
    }

    fn opt_string(&self, key: &'a str) -> R<Option<String>> {
        self.opt(key)?.map(|a| a.string()).transpose()
    }

    fn opt_u64(&self, key: &'a str) -> R<Option<u64>> {
        self.opt(key)?.map(|a| a.u64()).transpose()
    }

    fn opt_u32(&self, key: &'a str) -> R<Option<u32>> {
        self.opt(key)?.map(|a| a.u32()).transpose()
    }

    fn opt_bool(&self, key: &'a str, default: bool) -> R<bool> {
        Ok(match self.opt(key)? {
            Some(a) => a.bool()?,
            None => default,
        })
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{s}\""),
        other => type_name(other).to_string(),
    }
}

fn read_schema(root: &At) -> R<u32> {
    let at = root.get("schema")?;
    let s = at.str()?;
    let version = s
        .strip_prefix(SCHEMA_NAME)
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(|| {
            at.err(format!(
                "'{s}' is not a host report schema; expected \"{}\"",
                schema_id()
            ))
        })?;
    let n: u32 = version.parse().map_err(|_| {
        at.err(format!(
            "version '{version}' is not a number; expected \"{}\"",
            schema_id()
        ))
    })?;
    if n == 0 {
        return Err(at.err(format!(
            "version 0 does not exist; expected \"{}\"",
            schema_id()
        )));
    }
    if n > SCHEMA_VERSION {
        return Err(ReportError::Newer {
            file: root.file.to_string(),
            found: s.to_string(),
        });
    }
    Ok(n)
}

fn read_tap_offloads(at: &At) -> R<TapOffloads> {
    let flag = |k: &str| at.get(k).and_then(|a| a.bool());
    Ok(TapOffloads {
        vnet_hdr: flag("vnet_hdr")?,
        csum: flag("csum")?,
        tso4: flag("tso4")?,
        tso6: flag("tso6")?,
        tso_ecn: flag("tso_ecn")?,
        ufo: flag("ufo")?,
        uso: flag("uso")?,
    })
}

fn read_tap_probe(at: &At) -> R<TapProbe> {
    Ok(TapProbe {
        temporary: at.opt_bool("temporary", false)?,
        ifname: at.opt_string("ifname")?,
        tun_features: match at.opt("tun_features")? {
            Some(a) => {
                a.hex()?;
                Some(a.string()?)
            }
            None => None,
        },
        offloads: at
            .opt("offloads")?
            .map(|a| read_tap_offloads(&a))
            .transpose()?,
    })
}

fn opt_hex_string(at: &At, key: &str) -> R<Option<String>> {
    match at.opt(key)? {
        Some(a) => {
            a.hex()?;
            Some(a.string()).transpose()
        }
        None => Ok(None),
    }
}

fn read_interface(at: &At) -> R<InterfaceInfo> {
    let supported = at.get("supported")?.strings()?;
    let active = at.get("active")?.string()?;
    let latest = at.get("latest")?.string()?;
    Ok(InterfaceInfo {
        active,
        features: opt_hex_string(at, "features")?,
        pinned: at.opt_bool("pinned", false)?,
        latest,
        supported,
        truncated: at.opt_bool("truncated", false)?,
    })
}

fn read_probe(kind: PeerKind, at: &At) -> R<Probe> {
    Ok(match kind {
        PeerKind::Tap => Probe::Tap(read_tap_probe(at)?),
        PeerKind::VhostNet => Probe::VhostNet(VhostNetProbe {
            device: at
                .opt_string("device")?
                .unwrap_or_else(|| VHOST_NET_DEVICE.into()),
            present: at.get("present")?.bool()?,
            features: opt_hex_string(at, "features")?,
            tap: at.opt("tap")?.map(|a| read_tap_probe(&a)).transpose()?,
        }),
        PeerKind::VhostUser => Probe::VhostUser(VhostUserProbe {
            socket: at.get("socket")?.string()?,
            features: opt_hex_string(at, "features")?,
            protocol_features: opt_hex_string(at, "protocol_features")?,
            queue_num: at.opt_u64("queue_num")?,
            interface: at
                .opt("interface")?
                .map(|a| read_interface(&a))
                .transpose()?,
        }),
    })
}

fn read_feature_set(at: &At) -> R<FeatureSet> {
    let hex_at = at.get("hex")?;
    let bits = hex_at.hex()?;
    let names_at = at.get("names")?;
    let names = names_at.strings()?;
    // Names are for people, `hex` is authoritative: they must agree on
    // every bit this godwit knows (a newer godwit may know more).
    for (i, n) in names.iter().enumerate() {
        if let Some(f) = features::by_name(n) {
            if bits & (1u64 << f.bit) == 0 {
                return Err(names_at.index(i, &Value::Null).err(format!(
                    "names {n} (bit {}) but `hex` {} does not have that bit",
                    f.bit,
                    hex64(bits)
                )));
            }
        }
    }
    for b in (0..64).filter(|b| bits & (1u64 << b) != 0) {
        if let Some(f) = features::lookup(b) {
            if !names.iter().any(|n| n == f.name) {
                return Err(names_at.err(format!(
                    "`hex` has bit {b} ({}) but the names do not list it",
                    f.name
                )));
            }
        }
    }
    Ok(FeatureSet {
        hex: hex64(bits),
        names,
    })
}

fn read_peer(at: &At) -> R<PeerEntry> {
    let kind_at = at.get("kind")?;
    let kind_s = kind_at.str()?;
    let kind = PeerKind::parse(kind_s).ok_or_else(|| {
        kind_at.err(format!(
            "unknown peer kind '{kind_s}'; a report of this schema version has tap, vhost-user or vhost-net"
        ))
    })?;
    let status_at = at.get("status")?;
    let status_s = status_at.str()?;
    let status = [PeerStatus::Ok, PeerStatus::Error, PeerStatus::Absent]
        .into_iter()
        .find(|s| s.as_str() == status_s)
        .ok_or_else(|| status_at.err(format!("'{status_s}' is not one of ok, error, absent")))?;
    let spec = at.opt_string("spec")?;
    if let (Some(text), Some(spec_at)) = (&spec, at.opt("spec")?) {
        match text.parse::<NetSpec>() {
            Ok(s) if s.peer.kind() == kind.as_str() => {}
            Ok(s) => {
                return Err(spec_at.err(format!("a {} spec in a {kind} peer entry", s.peer.kind())))
            }
            Err(e) => return Err(spec_at.err(e.to_string())),
        }
    }
    let supported = match at.opt("supported")? {
        Some(a) => Some(read_feature_set(&a)?),
        None => None,
    };
    if status == PeerStatus::Ok && supported.is_none() {
        return Err(at
            .child("supported", &Value::Null)
            .err("missing: a peer with status \"ok\" must say what it supports"));
    }
    let error = at.opt_string("error")?;
    if status != PeerStatus::Ok && error.is_none() {
        return Err(at.child("error", &Value::Null).err(format!(
            "missing: a peer with status \"{status_s}\" must say why"
        )));
    }
    let mut lacks = Vec::new();
    if let Some(l) = at.opt("lacks")? {
        for item in l.items()? {
            let bit_at = item.get("bit")?;
            let bit = bit_at.u32()?;
            if bit >= 64 {
                return Err(bit_at.err(format!("bit {bit} is not a feature bit (0 to 63)")));
            }
            lacks.push(Lack {
                name: item.get("name")?.string()?,
                bit,
                why: item.get("why")?.string()?,
            });
        }
    }
    let mut machine_types = Vec::new();
    if let Some(l) = at.opt("machine_types")? {
        for item in l.items()? {
            machine_types.push(MachineFit {
                name: item.get("name")?.string()?,
                supported: item.get("supported")?.bool()?,
                missing: match item.opt("missing")? {
                    Some(a) => a.strings()?,
                    None => Vec::new(),
                },
            });
        }
    }
    Ok(PeerEntry {
        kind,
        spec,
        name: at.get("name")?.string()?,
        status,
        error,
        supported,
        lacks,
        migration_blocker: at.opt_string("migration_blocker")?,
        machine_types,
        probe: read_probe(kind, &at.get("probe")?)?,
    })
}

fn read_cpuid_entry(at: &At) -> R<CpuidEntry> {
    let s = at.str()?;
    parse_cpuid_entry(s).ok_or_else(|| {
        at.err(format!(
            "'{s}' is not a CPUID entry function:index:flags:eax:ebx:ecx:edx (7 hex numbers of up to 8 digits)"
        ))
    })
}

fn read_report(root: &At) -> R<HostCaps> {
    root.object()?;
    read_schema(root)?;
    let host_at = root.get("host")?;
    let name = host_at.get("name")?.string()?;
    if name.trim().is_empty() {
        return Err(host_at.get("name")?.err("empty; a host needs a name"));
    }
    let host = HostInfo {
        name,
        kernel: host_at.opt_string("kernel")?,
        taken_at: host_at.opt_u64("taken_at")?,
    };
    let g = root.get("godwit")?;
    let mt_at = g.get("machine_types")?;
    let machine_types = mt_at.strings()?;
    if machine_types.is_empty() {
        return Err(mt_at.err("empty; every godwit runs at least one machine type"));
    }
    let godwit = GodwitInfo {
        version: g.get("version")?.string()?,
        newest: g
            .opt_string("newest")?
            .unwrap_or_else(|| machine_types.last().cloned().unwrap_or_default()),
        machine_types,
    };
    let kvm = match root.opt("kvm")? {
        Some(k) => {
            let mut capabilities = BTreeMap::new();
            if let Some(c) = k.opt("capabilities")? {
                for (key, v) in c.object()? {
                    capabilities.insert(key.clone(), c.child(key, v).bool()?);
                }
            }
            KvmInfo {
                available: k.get("available")?.bool()?,
                error: k.opt_string("error")?,
                api_version: k.opt("api_version")?.map(|a| a.i32()).transpose()?,
                max_vcpus: k.opt_u64("max_vcpus")?,
                recommended_vcpus: k.opt_u64("recommended_vcpus")?,
                capabilities,
            }
        }
        None => KvmInfo {
            available: false,
            error: Some("not reported".into()),
            api_version: None,
            max_vcpus: None,
            recommended_vcpus: None,
            capabilities: BTreeMap::new(),
        },
    };
    let cpuid = match root.opt("cpuid")? {
        Some(c) => {
            let mut entries = Vec::new();
            if let Some(e) = c.opt("entries")? {
                for item in e.items()? {
                    entries.push(read_cpuid_entry(&item)?);
                }
            }
            CpuidInfo {
                available: c.get("available")?.bool()?,
                error: c.opt_string("error")?,
                vendor: c.opt_string("vendor")?,
                family: c.opt_u32("family")?,
                model: c.opt_u32("model")?,
                stepping: c.opt_u32("stepping")?,
                features: match c.opt("features")? {
                    Some(a) => a.strings()?,
                    None => Vec::new(),
                },
                entries,
            }
        }
        None => cpuid_unavailable("not reported".into()),
    };
    let mut peers = Vec::new();
    for item in root.get("peers")?.items()? {
        peers.push(read_peer(&item)?);
    }
    Ok(HostCaps {
        schema: schema_id(),
        host,
        godwit,
        kvm,
        cpuid,
        peers,
    })
}

/// Reads a report from a JSON value; `file` names it in errors (a path, or
/// `hosts[2]` for an API argument).
pub fn report_from_value(v: &Value, file: &str) -> Result<HostCaps, ReportError> {
    read_report(&At::root(v, file))
}

/// Reads a report from its text.
pub fn parse_report(text: &str, file: &str) -> Result<HostCaps, ReportError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ReportError::Json {
        file: file.to_string(),
        line: e.line(),
        column: e.column(),
        detail: crate::host_caps::json_detail(&e),
    })?;
    report_from_value(&v, file)
}

/// serde_json's message without its " at line L column C" suffix.
pub(crate) fn json_detail(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Reads a report file.
pub fn read_report_file(path: &Path) -> Result<HostCaps, ReportError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::Read {
        file: file.clone(),
        detail: e.to_string(),
    })?;
    parse_report(&text, &file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine_types::bits_of;

    fn full_tap() -> TapOffloads {
        TapOffloads {
            vnet_hdr: true,
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            ufo: true,
            uso: true,
        }
    }

    fn sample() -> HostCaps {
        let support = crate::net::tap_support("gwtap0", &full_tap());
        let tap = PeerEntry::from_support(
            PeerKind::Tap,
            Some("tap,ifname=gwtap0".into()),
            &support,
            None,
            Probe::Tap(TapProbe {
                temporary: false,
                ifname: Some("gwtap0".into()),
                tun_features: Some("0x7173".into()),
                offloads: Some(full_tap()),
            }),
        );
        let dpdk = vhost_user_entry(
            Some("vhost-user,socket=/run/dpdk.sock".into()),
            "/run/dpdk.sock",
            &VhostUserOffer {
                features: 0x0000_000d_7c66_e7cb,
                protocol_features: 0x10cbf,
                queue_num: Some(128),
                interface: None,
            },
        );
        HostCaps {
            schema: schema_id(),
            host: HostInfo {
                name: "a".into(),
                kernel: Some("6.18.0".into()),
                taken_at: Some(1),
            },
            godwit: GodwitInfo {
                version: "0.1.0".into(),
                machine_types: vec!["godwit-1.0".into(), "godwit-1.1".into()],
                newest: "godwit-1.1".into(),
            },
            kvm: KvmInfo {
                available: true,
                error: None,
                api_version: Some(12),
                max_vcpus: Some(1024),
                recommended_vcpus: Some(2),
                capabilities: [("KVM_CAP_IRQCHIP".to_string(), true)]
                    .into_iter()
                    .collect(),
            },
            cpuid: cpuid_info(vec![CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0xd,
                ebx: u32::from_le_bytes(*b"Genu"),
                ecx: u32::from_le_bytes(*b"ntel"),
                edx: u32::from_le_bytes(*b"ineI"),
            }]),
            peers: vec![tap, dpdk],
        }
    }

    #[test]
    fn reports_round_trip_through_the_reader() {
        let r = sample();
        assert_eq!(r.cpuid.vendor.as_deref(), Some("GenuineIntel"));
        let text = serde_json::to_string_pretty(&r).unwrap();
        assert_eq!(parse_report(&text, "x.json").unwrap(), r);
    }

    #[test]
    fn dpdk_like_backend_lacks_host_tso_and_uso_but_keeps_frontend_features() {
        let s = vhost_user_support("b", 0x0000_000d_7c66_e7cb, Some(128));
        for n in ["host_tso4", "host_tso6", "guest_uso4", "host_uso"] {
            let f = features::by_name(n).unwrap();
            assert_eq!(s.supported & (1 << f.bit), 0, "{n}");
            assert!(s.why_not[&f.bit].contains("GET_FEATURES"), "{n}");
        }
        // Served by godwit's frontend, whatever the backend offers.
        for n in ["mac", "status", "ctrl_vq", "guest_announce", "mtu", "mq"] {
            assert_ne!(s.supported & bits_of(&[n]), 0, "{n}");
        }
        assert_ne!(
            s.supported & bits_of(&["csum", "guest_tso4", "host_ecn", "version_1"]),
            0
        );
        assert!(vhost_user_migration_blocker(0x0000_000d_7c66_e7cb, 0x10cbf).is_none());
        let b = vhost_user_migration_blocker(0x1, 0).unwrap();
        assert!(b.contains("LOG_ALL") && b.contains("LOG_SHMFD"), "{b}");
        // One queue: no queue pair.
        let one = vhost_user_support("b", u64::MAX, Some(1));
        assert_eq!(one.supported & bits_of(&["mq"]), 0);
    }

    #[test]
    fn vhost_net_takes_ring_bits_from_the_kernel_and_packets_from_the_tap() {
        // Linux's VHOST_NET_FEATURES: NOTIFY_ON_EMPTY, LOG_ALL, ANY_LAYOUT
        // (= VHOST_NET_F_VIRTIO_NET_HDR), INDIRECT_DESC, EVENT_IDX,
        // MRG_RXBUF, VERSION_1, ACCESS_PLATFORM, RING_RESET.
        let kernel: u64 = [15u32, 24, 26, 27, 28, 29, 32, 33, 40]
            .iter()
            .fold(0, |a, b| a | (1 << b));
        let no_uso = TapOffloads {
            uso: false,
            ..full_tap()
        };
        let s = crate::net::vhost_net_support("v", &no_uso, kernel);
        assert_ne!(
            s.supported & bits_of(&["mrg_rxbuf", "event_idx", "csum", "host_tso4"]),
            0
        );
        assert_eq!(s.supported & bits_of(&["host_uso"]), 0);
        assert!(s.why_not[&56].contains("USO"), "{}", s.why_not[&56]);
        let s = crate::net::vhost_net_support("v", &full_tap(), 0);
        assert!(s.why_not[&32].contains("VHOST_GET_FEATURES"));
    }

    fn field_error(text: &str) -> (String, String) {
        let e = parse_report(text, "h.json").unwrap_err();
        (e.field().unwrap_or("").to_string(), e.to_string())
    }

    #[test]
    fn malformed_reports_name_file_and_field() {
        let good = serde_json::to_value(sample()).unwrap();
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "schema",
                Box::new(|v| v["schema"] = Value::from("nonsense")),
                "not a host report schema",
            ),
            (
                "schema",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("schema");
                }),
                "missing",
            ),
            (
                "host.name",
                Box::new(|v| v["host"]["name"] = Value::from(7)),
                "expected a string, found a number",
            ),
            (
                "godwit.machine_types",
                Box::new(|v| v["godwit"]["machine_types"] = Value::from(Vec::<String>::new())),
                "empty",
            ),
            (
                "peers[0].kind",
                Box::new(|v| v["peers"][0]["kind"] = Value::from("slirp")),
                "unknown peer kind 'slirp'",
            ),
            (
                "peers[1].supported.hex",
                Box::new(|v| v["peers"][1]["supported"]["hex"] = Value::from("12")),
                "not a 64-bit hex number",
            ),
            (
                "peers[0].supported.names",
                Box::new(|v| {
                    v["peers"][0]["supported"]["names"]
                        .as_array_mut()
                        .unwrap()
                        .remove(0);
                }),
                "do not list it",
            ),
            (
                "peers[0].probe.offloads.uso",
                Box::new(|v| v["peers"][0]["probe"]["offloads"]["uso"] = Value::from("yes")),
                "expected true or false",
            ),
            (
                "peers[1].probe.queue_num",
                Box::new(|v| v["peers"][1]["probe"]["queue_num"] = Value::from(-1)),
                "non-negative integer",
            ),
            (
                "peers[0].lacks",
                Box::new(|v| v["peers"][0]["lacks"] = Value::from("none")),
                "expected an array",
            ),
            (
                "peers[0].supported",
                Box::new(|v| v["peers"][0]["supported"] = Value::Null),
                "must say what it supports",
            ),
            (
                "peers[1].spec",
                Box::new(|v| v["peers"][1]["spec"] = Value::from("tap,ifname=x")),
                "a tap spec in a vhost-user peer",
            ),
            (
                "cpuid.entries[0]",
                Box::new(|v| {
                    v["cpuid"]["entries"][0] = Value::from("00000000:0:0:123456789:0:0:0")
                }),
                "is not a CPUID entry function:index:flags",
            ),
            (
                "peers",
                Box::new(|v| v["peers"] = Value::from(3)),
                "expected an array",
            ),
        ];
        for (field, edit, needle) in cases {
            let mut v = good.clone();
            edit(&mut v);
            let (f, msg) = field_error(&v.to_string());
            assert_eq!(f, field, "{msg}");
            assert!(msg.starts_with("h.json: field `"), "{msg}");
            assert!(msg.contains(needle), "{field}: {msg}");
        }
        let e = parse_report("{\"schema\": ", "h.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("h.json: not valid JSON (line 1"), "{e}");
        let e = parse_report("[]", "h.json").unwrap_err().to_string();
        assert!(e.contains("expected an object, found an array"), "{e}");
    }

    #[test]
    fn newer_schema_versions_are_refused_by_name() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["schema"] = Value::from("godwit-host-caps/2");
        // Even with fields this version would not understand.
        v["peers"] = Value::from("a format of the future");
        let e = report_from_value(&v, "future.json").unwrap_err();
        assert!(matches!(e, ReportError::Newer { .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with("future.json: field `schema`") && msg.contains("godwit-host-caps/2"),
            "{msg}"
        );
        v["schema"] = Value::from("godwit-host-caps/zero");
        assert_eq!(
            report_from_value(&v, "f").unwrap_err().field(),
            Some("schema")
        );
    }
}
