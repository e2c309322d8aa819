//! Interface versions of godwit's vhost-user net backend, and the wire
//! format of the protocol extension that pins one
//! (docs/vhost-user-interface-versions.md).
//!
//! An interface version is a name and a fixed list of values: the features
//! the device presents (canonical names from the one feature table,
//! [`crate::virtio::net::features::FEATURES`]), the largest ring the backend
//! accepts, the MTU, the number of queue pairs. A released version never
//! changes and the list only grows: management records the name when it
//! creates a VM and passes it on every start and migration
//! (`--net vhost-user,...,interface=NAME`), and an upgraded backend then
//! still presents the old ABI. Each released version is frozen in
//! tests/golden/net-interfaces/NAME.json.

use serde::Serialize;

use crate::virtio::net::features::{self, groups};

/// Protocol feature bit of the extension (GET/SET_PROTOCOL_FEATURES). Far
/// above the standard bits (0-22 are assigned upstream), so that no standard
/// peer offers or accepts it: a frontend sets it only when the backend
/// offered it, a backend offers it only when it implements the extension.
pub const PROTOCOL_F_GODWIT_INTERFACE: u64 = 1 << 60;

/// The extension's window in the GET_CONFIG / SET_CONFIG offset space
/// (the vhost crate accepts offsets whose end is at most 0x1000). virtio-net's
/// configuration space ends below 0x40, so a standard frontend never
/// addresses it.
pub const WINDOW_OFFSET: u32 = 0xf00;
/// The window's size: the interface record is at most this long.
pub const WINDOW_SIZE: u32 = 0x100;
/// Longest interface name.
pub const MAX_NAME_LEN: usize = 64;
/// First line of an interface record.
pub const RECORD_MAGIC: &str = "godwit-interface 1";

/// One released interface version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceVersion {
    pub name: &'static str,
    /// What this version adds over the previous one.
    pub adds: &'static str,
    /// Features the device presents, as groups of canonical names
    /// (`features::groups`; VERSION_1 included).
    pub features: &'static [&'static [&'static str]],
    /// Largest ring (queue size) the backend accepts.
    pub max_ring_size: u16,
    pub mtu: u16,
    pub queue_pairs: u16,
}

/// Every released interface version of godwit's backend, oldest first.
/// Append only; never edit a released entry (its golden file would fail).
pub static INTERFACES: &[InterfaceVersion] = &[
    InterfaceVersion {
        name: "org.godwit.net.v1",
        adds: "checksum, TSO4/6, ECN and UFO offloads both ways, mergeable rx buffers, control queue, event index, indirect descriptors; rings up to 256, MTU 1500, 1 queue pair",
        features: &[groups::BASE],
        max_ring_size: 256,
        mtu: 1500,
        queue_pairs: 1,
    },
    InterfaceVersion {
        name: "org.godwit.net.v2",
        adds: "UDP segmentation offload (guest_uso4, guest_uso6, host_uso); rings up to 1024",
        features: &[groups::BASE, groups::USO],
        max_ring_size: 1024,
        mtu: 1500,
        queue_pairs: 1,
    },
    InterfaceVersion {
        name: "org.godwit.net.v3",
        adds: "multi-queue (mq): 2 queue pairs, chosen by the driver with VQ_PAIRS_SET (served from a multi-queue TAP, net-backend --queues 2)",
        features: &[groups::BASE, groups::USO, groups::MQ],
        max_ring_size: 1024,
        mtu: 1500,
        queue_pairs: 2,
    },
];

/// The newest released version.
pub fn latest() -> &'static InterfaceVersion {
    INTERFACES
        .last()
        .expect("the interface table is never empty")
}

pub fn by_interface_name(name: &str) -> Option<&'static InterfaceVersion> {
    INTERFACES.iter().find(|i| i.name == name)
}

/// Names of every released version, oldest first.
pub fn names() -> Vec<&'static str> {
    INTERFACES.iter().map(|i| i.name).collect()
}

impl InterfaceVersion {
    /// The feature bits of [`Self::features`]: all below 64 (vhost-user's
    /// GET_FEATURES is a 64-bit word; a test keeps it so).
    pub fn feature_bits(&self) -> crate::virtio::Features {
        features::bits_of_groups(self.features)
    }

    /// The values, as `--print-versions`, query-net and the golden files show them.
    pub fn resolved(&self) -> ResolvedInterface {
        let bits = self.feature_bits();
        ResolvedInterface {
            name: self.name.to_string(),
            adds: self.adds.to_string(),
            features: features::names(bits)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            features_hex: features::hex(bits),
            max_ring_size: self.max_ring_size,
            mtu: self.mtu,
            queue_pairs: self.queue_pairs,
        }
    }

    /// The values of this version, as a backend would report them.
    pub fn values(&self) -> InterfaceValues {
        InterfaceValues {
            features: crate::virtio::low64(self.feature_bits()),
            max_ring_size: self.max_ring_size,
            mtu: self.mtu,
            queue_pairs: self.queue_pairs,
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ResolvedInterface {
    pub name: String,
    pub adds: String,
    pub features: Vec<String>,
    pub features_hex: String,
    pub max_ring_size: u16,
    pub mtu: u16,
    pub queue_pairs: u16,
}

/// `godwit net-backend --print-versions`: what management records.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VersionList {
    pub latest: String,
    pub supported: Vec<String>,
}

/// Every released version, the newest as `latest`.
pub fn version_list() -> VersionList {
    VersionList {
        latest: latest().name.to_string(),
        supported: names().iter().map(|s| s.to_string()).collect(),
    }
}

/// The versions a backend of `queue_pairs` pairs presents (those of at
/// most that many pairs), the newest of them as `latest`.
pub fn served_versions(queue_pairs: usize) -> Vec<&'static InterfaceVersion> {
    INTERFACES
        .iter()
        .filter(|i| usize::from(i.queue_pairs) <= queue_pairs)
        .collect()
}

/// [`version_list`] of a backend of `queue_pairs` pairs (see
/// [`served_versions`]).
pub fn version_list_for(queue_pairs: usize) -> VersionList {
    let served = served_versions(queue_pairs);
    VersionList {
        latest: served
            .last()
            .map_or(INTERFACES[0].name, |i| i.name)
            .to_string(),
        supported: served.iter().map(|i| i.name.to_string()).collect(),
    }
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#018x}"))
}

/// The values an interface fixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceValues {
    #[serde(serialize_with = "hex")]
    pub features: u64,
    pub max_ring_size: u16,
    pub mtu: u16,
    pub queue_pairs: u16,
}

/// What a backend with the extension reports in the window
/// (GET_CONFIG at [`WINDOW_OFFSET`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceRecord {
    /// The interface the backend presents now (pinned, or its default).
    pub active: String,
    /// Whether a frontend pinned `active` on this connection.
    pub pinned: bool,
    pub latest: String,
    pub supported: Vec<String>,
    /// The list did not fit the window: the oldest names were left out.
    pub truncated: bool,
    /// The values of `active`.
    pub values: InterfaceValues,
}

/// Why an interface record cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the record does not start with '{RECORD_MAGIC}'")]
    Magic,
    #[error("the record is not UTF-8 text")]
    NotText,
    #[error("the record's '{key}' value '{value}' is not valid")]
    BadValue { key: String, value: String },
    #[error("the record lacks '{0}'")]
    Missing(&'static str),
}

impl InterfaceRecord {
    /// The record as it travels in the window: `key=value` lines, NUL-padded
    /// to `size` bytes. Supported names that do not fit are left out, oldest
    /// first, and `truncated=1` says so.
    pub fn encode(&self, size: usize) -> Vec<u8> {
        let head = |supported: &[String], truncated: bool| {
            let mut s = format!(
                "{RECORD_MAGIC}\nactive={}\npinned={}\nlatest={}\nfeatures={:#x}\nmax_ring={}\nmtu={}\nqueue_pairs={}\n",
                self.active,
                u8::from(self.pinned),
                self.latest,
                self.values.features,
                self.values.max_ring_size,
                self.values.mtu,
                self.values.queue_pairs
            );
            if truncated {
                s.push_str("truncated=1\n");
            }
            s.push_str(&format!("supported={}\n", supported.join(",")));
            s
        };
        let mut skip = 0;
        let mut text = head(&self.supported, self.truncated);
        while text.len() > size && skip < self.supported.len() {
            skip += 1;
            text = head(&self.supported[skip..], true);
        }
        let mut out = text.into_bytes();
        out.resize(size, 0);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end]).map_err(|_| RecordError::NotText)?;
        let mut lines = text.lines();
        if lines.next() != Some(RECORD_MAGIC) {
            return Err(RecordError::Magic);
        }
        let mut r = InterfaceRecord::default();
        let (mut active, mut features) = (false, false);
        for line in lines {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let bad = || RecordError::BadValue {
                key: key.to_string(),
                value: value.to_string(),
            };
            let num = |v: &str| v.parse::<u16>().map_err(|_| bad());
            // Names are compared and shown: a backend's record may only
            // hold valid ones (a control character or a stray `\r` would
            // not survive the record's own encoding).
            match key {
                "active" => {
                    if !valid_name(value) {
                        return Err(bad());
                    }
                    r.active = value.to_string();
                    active = true;
                }
                "pinned" => r.pinned = value == "1",
                "latest" => {
                    if !value.is_empty() && !valid_name(value) {
                        return Err(bad());
                    }
                    r.latest = value.to_string()
                }
                "supported" => {
                    r.supported = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    if !r.supported.iter().all(|s| valid_name(s)) {
                        return Err(bad());
                    }
                }
                "truncated" => r.truncated = value == "1",
                "features" => {
                    r.values.features = u64::from_str_radix(value.trim_start_matches("0x"), 16)
                        .map_err(|_| bad())?;
                    features = true;
                }
                "max_ring" => r.values.max_ring_size = num(value)?,
                "mtu" => r.values.mtu = num(value)?,
                "queue_pairs" => r.values.queue_pairs = num(value)?,
                // Later versions of the record may add keys.
                _ => {}
            }
        }
        if !active {
            return Err(RecordError::Missing("active"));
        }
        if !features {
            return Err(RecordError::Missing("features"));
        }
        Ok(r)
    }
}

/// Whether `name` may be an interface name: 1 to [`MAX_NAME_LEN`]
/// characters of `A-Z a-z 0-9 . _ -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::features::by_name;

    #[test]
    fn table_is_consistent_and_only_grows() {
        let mut seen = std::collections::BTreeSet::new();
        for i in INTERFACES {
            assert!(valid_name(i.name), "{}", i.name);
            assert!(seen.insert(i.name), "{} twice", i.name);
            for n in i.features.iter().flat_map(|g| g.iter()) {
                let f = by_name(n).unwrap_or_else(|| panic!("{}: unknown feature {n}", i.name));
                assert!(f.supported, "{}: {n} is not implemented", i.name);
            }
            assert!(
                features::check_dependencies(i.feature_bits()).is_empty(),
                "{}",
                i.name
            );
            assert!(i.max_ring_size.is_power_of_two());
            assert!(i.queue_pairs >= 1 && i.mtu >= 68);
        }
        for w in INTERFACES.windows(2) {
            assert_eq!(
                w[0].feature_bits() & !w[1].feature_bits(),
                0,
                "{} drops features of {}",
                w[1].name,
                w[0].name
            );
        }
        assert_eq!(latest().name, "org.godwit.net.v3");
        assert_eq!(
            version_list().supported,
            [
                "org.godwit.net.v1",
                "org.godwit.net.v2",
                "org.godwit.net.v3"
            ]
        );
        // A backend presents the versions of at most its queue pairs.
        let one = version_list_for(1);
        assert_eq!(
            (one.latest.as_str(), one.supported.len()),
            ("org.godwit.net.v2", 2)
        );
        assert_eq!(version_list_for(2), version_list());
    }

    /// Each released version is frozen in tests/golden/net-interfaces/. A
    /// change that alters one fails here: add a new version instead.
    #[test]
    fn released_versions_match_their_golden_files() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/net-interfaces");
        for i in INTERFACES {
            let path = dir.join(format!("{}.json", i.name));
            let actual = serde_json::to_string_pretty(&i.resolved()).unwrap() + "\n";
            if std::env::var_os("GODWIT_BLESS_NEW_INTERFACE").is_some() && !path.exists() {
                std::fs::write(&path, &actual).unwrap();
            }
            let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: no golden file {} ({e}); a new interface version gets one by running the tests once with GODWIT_BLESS_NEW_INTERFACE=1",
                    i.name,
                    path.display()
                )
            });
            assert_eq!(
                actual, golden,
                "interface {} no longer matches its golden file; released interfaces are immutable: add a new version instead",
                i.name
            );
        }
    }

    #[test]
    fn record_round_trips_and_truncates() {
        let r = InterfaceRecord {
            active: "org.godwit.net.v1".into(),
            pinned: true,
            latest: "org.godwit.net.v2".into(),
            supported: names().iter().map(|s| s.to_string()).collect(),
            truncated: false,
            values: INTERFACES[0].values(),
        };
        let bytes = r.encode(WINDOW_SIZE as usize);
        assert_eq!(bytes.len(), WINDOW_SIZE as usize);
        assert_eq!(InterfaceRecord::decode(&bytes).unwrap(), r);
        let many = InterfaceRecord {
            supported: (0..40).map(|i| format!("org.example.net.v{i}")).collect(),
            ..r.clone()
        };
        let back = InterfaceRecord::decode(&many.encode(WINDOW_SIZE as usize)).unwrap();
        assert!(back.truncated);
        assert_eq!(back.supported.last().unwrap(), "org.example.net.v39");
        assert!(InterfaceRecord::decode(b"hello\nactive=x\n").is_err());
        assert!(matches!(
            InterfaceRecord::decode(format!("{RECORD_MAGIC}\nfeatures=0x1\n").as_bytes()),
            Err(RecordError::Missing("active"))
        ));
        assert!(InterfaceRecord::decode(&[0xff, 0xfe]).is_err());
        assert!(!valid_name("") && !valid_name("a b") && valid_name("org.godwit.net.v1"));
    }
}
