//! The host capability report's types (schema: docs/host-caps-schema.md):
//! what `godwit host-caps` writes and what `godwit plan` reads.
//!
//! A report names godwit's version and machine types, KVM's capabilities, a
//! CPUID summary (and the full table a new vCPU gets here), and for every
//! network peer the *supported feature set*: the virtio-net feature bits
//! godwit can offer a guest over that peer, computed from the one feature
//! table (`godwit_devices::virtio::net::features::FEATURES`) and the peer's
//! raw probe data, which the report carries too.
//!
//! Serialization is the schema; the `Deserialize` side is only the shape of
//! each member (types, defaults). The checks across members, and the
//! version header, are [`super::read`]'s.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use godwit_devices::net::tap::TapOffloads;
use godwit_devices::vhost_net::VHOST_NET_PATH;
use godwit_devices::vhost_user::session::WANTED_PROTOCOL;
use godwit_devices::vhost_user::BackendOffer;
use godwit_devices::virtio::net::features::{self, Features};
use godwit_migration::cpu_compat::CpuidEntry;

use super::encoding::{self, name_list, nullable};
use crate::abi::machine_types::MACHINE_TYPES;
use crate::abi::strict::PeerSupport;

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

/// A peer kind this godwit does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown peer kind '{0}'; use tap, vhost-user or vhost-net")]
pub struct UnknownPeerKind(pub String);

impl std::str::FromStr for PeerKind {
    type Err = UnknownPeerKind;
    fn from_str(s: &str) -> Result<Self, UnknownPeerKind> {
        PeerKind::parse(s).ok_or_else(|| UnknownPeerKind(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for PeerKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of feature bits, as hex and as canonical names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSet {
    #[serde(deserialize_with = "encoding::hex_string")]
    pub hex: String,
    pub names: Vec<String>,
}

impl FeatureSet {
    pub fn of(bits: Features) -> Self {
        FeatureSet {
            hex: features::hex(bits),
            names: name_list(bits),
        }
    }

    /// The bits (`hex` is authoritative).
    pub fn bits(&self) -> Features {
        features::parse_hex(&self.hex).unwrap_or(0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// How planners name this host (`--name`, else the hostname).
    pub name: String,
    /// The kernel release (`uname -r`).
    pub kernel: Option<String>,
    /// When the report was taken, seconds since the Unix epoch.
    pub taken_at: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GodwitInfo {
    pub version: String,
    /// Machine types this godwit runs, oldest first.
    pub machine_types: Vec<String>,
    /// What the alias `godwit` resolves to (absent: the reader takes the
    /// last machine type).
    #[serde(default, deserialize_with = "nullable")]
    pub newest: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    pub available: bool,
    pub error: Option<String>,
    pub api_version: Option<i32>,
    pub max_vcpus: Option<u64>,
    pub recommended_vcpus: Option<u64>,
    /// `KVM_CAP_*` name -> whether this KVM offers it.
    #[serde(default, deserialize_with = "nullable")]
    pub capabilities: BTreeMap<String, bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidInfo {
    pub available: bool,
    pub error: Option<String>,
    /// The vendor string of leaf 0.
    pub vendor: Option<String>,
    pub family: Option<u32>,
    pub model: Option<u32>,
    pub stepping: Option<u32>,
    /// Feature flags a new vCPU gets here (names from migration::cpu_compat).
    #[serde(default, deserialize_with = "nullable")]
    pub features: Vec<String>,
    /// The CPUID table a new vCPU gets here (what a VM started here is
    /// shown, and what an incoming VM is compared with), each entry as
    /// `function:index:flags:eax:ebx:ecx:edx` in hex
    /// ([`encoding::cpuid_entry_text`]).
    #[serde(
        default,
        serialize_with = "encoding::serialize_entries",
        deserialize_with = "encoding::cpuid_entries"
    )]
    pub entries: Vec<CpuidEntry>,
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
    const ALL: [PeerStatus; 3] = [PeerStatus::Ok, PeerStatus::Error, PeerStatus::Absent];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Ok => "ok",
            PeerStatus::Error => "error",
            PeerStatus::Absent => "absent",
        }
    }
}

impl std::fmt::Display for PeerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PeerStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PeerStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("'{s}' is not one of ok, error, absent"))
            })
    }
}

/// A feature the peer lacks, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lack {
    pub name: String,
    pub bit: u32,
    pub why: String,
}

/// Whether a machine type's default ABI fits this peer as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFit {
    pub name: String,
    pub supported: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub missing: Vec<String>,
}

/// Raw TAP probe data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapProbe {
    /// host-caps created the TAP itself (and removed it).
    #[serde(default, deserialize_with = "nullable")]
    pub temporary: bool,
    pub ifname: Option<String>,
    /// `TUNGETFEATURES` of /dev/net/tun.
    #[serde(default, deserialize_with = "encoding::opt_hex_string")]
    pub tun_features: Option<String>,
    /// What `TUNSETOFFLOAD` accepted (all false without a vnet header).
    pub offloads: Option<TapOffloads>,
}

/// Raw kernel vhost-net probe data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostNetProbe {
    #[serde(default = "vhost_net_device", deserialize_with = "device_or_default")]
    pub device: String,
    pub present: bool,
    /// `VHOST_GET_FEATURES`.
    #[serde(default, deserialize_with = "encoding::opt_hex_string")]
    pub features: Option<String>,
    /// The TAP whose offloads carry the packet features.
    pub tap: Option<TapProbe>,
}

fn vhost_net_device() -> String {
    VHOST_NET_DEVICE.to_string()
}

fn device_or_default<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(vhost_net_device))
}

/// A vhost-user backend's interface record (godwit's protocol extension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    pub active: String,
    /// The feature bits of `active` (the record's values), when known.
    #[serde(default, deserialize_with = "encoding::opt_hex_string")]
    pub features: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub pinned: bool,
    pub latest: String,
    pub supported: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub truncated: bool,
}

/// Raw vhost-user probe data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserProbe {
    pub socket: String,
    /// `GET_FEATURES`, transport bits included.
    #[serde(default, deserialize_with = "encoding::opt_hex_string")]
    pub features: Option<String>,
    /// `GET_PROTOCOL_FEATURES`.
    #[serde(default, deserialize_with = "encoding::opt_hex_string")]
    pub protocol_features: Option<String>,
    /// `GET_QUEUE_NUM` (with protocol MQ).
    pub queue_num: Option<u64>,
    /// The backend's interface versions (absent: it lacks godwit's extension).
    pub interface: Option<InterfaceInfo>,
}

/// A peer's raw probe data, by kind (written without a tag: the entry's
/// `kind` says which, so the reader picks the variant by it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Probe {
    Tap(TapProbe),
    VhostNet(VhostNetProbe),
    VhostUser(VhostUserProbe),
}

/// One network peer of the host. `P` is the probe data: [`Probe`], or, while
/// a report is read, the JSON it is read from once `kind` is known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry<P = Probe> {
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
    #[serde(default, deserialize_with = "nullable")]
    pub lacks: Vec<Lack>,
    /// Set when a VM on this peer could not migrate at all (a vhost backend
    /// that cannot log its writes).
    pub migration_blocker: Option<String>,
    /// Which machine types' default ABI this peer carries.
    #[serde(default, deserialize_with = "nullable")]
    pub machine_types: Vec<MachineFit>,
    /// The most queue pairs the peer carries (reports written before
    /// multi-queue have none: 1, which is what their peers carried).
    #[serde(default = "one_queue_pair")]
    pub max_queue_pairs: u16,
    /// Why it carries no more, when that limits it (a single-queue TAP).
    #[serde(default)]
    pub queue_why: Option<String>,
    pub probe: P,
}

fn one_queue_pair() -> u16 {
    1
}

impl<P> PeerEntry<P> {
    /// The same entry with other probe data.
    pub fn with_probe<Q>(self, probe: Q) -> PeerEntry<Q> {
        PeerEntry {
            kind: self.kind,
            spec: self.spec,
            name: self.name,
            status: self.status,
            error: self.error,
            supported: self.supported,
            lacks: self.lacks,
            migration_blocker: self.migration_blocker,
            machine_types: self.machine_types,
            max_queue_pairs: self.max_queue_pairs,
            queue_why: self.queue_why,
            probe,
        }
    }
}

impl PeerEntry {
    /// What the peer supports, as the ABI decision reads it; `None` when it
    /// could not be probed.
    pub fn support(&self) -> Option<PeerSupport> {
        let supported = self.supported.as_ref()?.bits();
        if self.status != PeerStatus::Ok {
            return None;
        }
        let support = PeerSupport::new(
            self.kind.as_str(),
            self.name.clone(),
            supported,
            self.lacks.iter().map(|l| (l.bit, l.why.clone())).collect(),
        );
        Some(match &self.queue_why {
            Some(why) => support.with_queue_limit(self.max_queue_pairs, why.clone()),
            None => PeerSupport {
                max_queue_pairs: self.max_queue_pairs,
                ..support
            },
        })
    }

    pub(crate) fn from_support(
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
            machine_types: machine_fits(support),
            max_queue_pairs: support.max_queue_pairs,
            queue_why: support.queue_why.clone(),
            probe,
        }
    }

    pub(crate) fn failed(
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
            max_queue_pairs: 0,
            queue_why: None,
            probe,
        }
    }
}

fn machine_fits(support: &PeerSupport) -> Vec<MachineFit> {
    MACHINE_TYPES
        .iter()
        .rev()
        .map(|m| {
            let missing = m.net_features() & !support.supported;
            let mut names = name_list(missing);
            let pairs_fit = m.net.queue_pairs <= support.max_queue_pairs;
            if !pairs_fit {
                names.push(format!("queue_pairs={}", m.net.queue_pairs));
            }
            MachineFit {
                name: m.name.to_string(),
                supported: missing == 0 && pairs_fit,
                missing: names,
            }
        })
        .collect()
}

/// A host capability report (`P` as in [`PeerEntry`]). Named apart from
/// `crate::vstate::cpuid::HostCaps`, the CPUID filter's input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport<P = Probe> {
    pub schema: String,
    pub host: HostInfo,
    pub godwit: GodwitInfo,
    #[serde(
        default = "KvmInfo::not_reported",
        deserialize_with = "kvm_or_not_reported"
    )]
    pub kvm: KvmInfo,
    #[serde(
        default = "CpuidInfo::not_reported",
        deserialize_with = "cpuid_or_not_reported"
    )]
    pub cpuid: CpuidInfo,
    pub peers: Vec<PeerEntry<P>>,
}

impl KvmInfo {
    /// What a report without `kvm` says: KVM unknown.
    pub fn not_reported() -> Self {
        KvmInfo::unavailable("not reported".into())
    }

    pub fn unavailable(error: String) -> Self {
        KvmInfo {
            available: false,
            error: Some(error),
            api_version: None,
            max_vcpus: None,
            recommended_vcpus: None,
            capabilities: BTreeMap::new(),
        }
    }
}

impl CpuidInfo {
    /// What a report without `cpuid` says: no CPUID table.
    pub fn not_reported() -> Self {
        CpuidInfo::unavailable("not reported".into())
    }

    pub fn unavailable(error: String) -> Self {
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
}

fn kvm_or_not_reported<'de, D: Deserializer<'de>>(d: D) -> Result<KvmInfo, D::Error> {
    Ok(Option::deserialize(d)?.unwrap_or_else(KvmInfo::not_reported))
}

fn cpuid_or_not_reported<'de, D: Deserializer<'de>>(d: D) -> Result<CpuidInfo, D::Error> {
    Ok(Option::deserialize(d)?.unwrap_or_else(CpuidInfo::not_reported))
}

impl HostReport {
    /// The `index`-th peer of `kind` (device `index` of that kind uses it).
    pub fn peer(&self, kind: PeerKind, index: usize) -> Option<&PeerEntry> {
        self.peers.iter().filter(|p| p.kind == kind).nth(index)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

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
