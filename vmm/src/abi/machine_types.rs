//! Versioned machine types: each fixes the guest-visible ABI of a VM's
//! virtio-net devices (features offered, queues, MTU, config fields, strict
//! default). A released type never changes; new defaults come with a new
//! version. The alias `godwit` resolves to the newest, and the resolved name
//! is what gets recorded (in snapshots, migration streams, query-net).
//!
//! Feature names are the canonical property names of the one feature table,
//! `godwit_devices::virtio::net::features`.

use serde::Serialize;

use godwit_devices::virtio::net::features::{self, by_name, Features};

/// The alias users may give instead of a versioned name.
pub const ALIAS: &str = "godwit";

/// The guest-visible ABI of one virtio-net device.
#[derive(Clone, Copy, Debug)]
pub struct NetAbi {
    /// Feature property names offered by default, as groups (a version
    /// names its predecessor's groups and adds its own). VERSION_1 is
    /// always offered.
    pub features: &'static [&'static [&'static str]],
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: u16,
    /// Config-space fields the guest sees.
    pub config_fields: &'static [&'static str],
    /// Whether a peer that lacks a required feature stops the VM from starting.
    pub strict: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct MachineType {
    pub name: &'static str,
    /// What this version adds over the previous one.
    pub adds: &'static str,
    pub net: NetAbi,
}

use godwit_devices::virtio::net::features::groups::{
    BASE as BASE_FEATURES, MQ as MQ_FEATURES, UDP_TUNNEL as UDP_TUNNEL_FEATURES,
    USO as USO_FEATURES,
};

const CONFIG_FIELDS: &[&str] = &["mac", "status", "max_virtqueue_pairs", "mtu"];

/// Every released machine type, oldest first. Append only.
pub static MACHINE_TYPES: &[MachineType] = &[
    MachineType {
        name: "godwit-1.0",
        adds: "virtio-net 1.0 device: checksum, TSO4/6, ECN and UFO offloads both ways, mergeable rx buffers, control queue (rx mode, announce), event index, indirect descriptors; 1 queue pair of 256, MTU 1500",
        net: NetAbi {
            features: &[BASE_FEATURES],
            queue_pairs: 1,
            queue_size: 256,
            mtu: 1500,
            config_fields: CONFIG_FIELDS,
            strict: true,
        },
    },
    MachineType {
        name: "godwit-1.1",
        adds: "UDP segmentation offload: guest_uso4, guest_uso6, host_uso (TAP peers need Linux >= 6.2)",
        net: NetAbi {
            features: &[BASE_FEATURES, USO_FEATURES],
            queue_pairs: 1,
            queue_size: 256,
            mtu: 1500,
            config_fields: CONFIG_FIELDS,
            strict: true,
        },
    },
    // Two pairs: enough to spread a 2-vCPU guest's traffic over two
    // datapath threads; every Linux TAP can carry them (IFF_MULTI_QUEUE
    // since 3.8); few enough to keep host threads and memory modest. A
    // single-queue peer (a TAP created without multi_queue, DPDK's default
    // queues=1) is refused by strict with remedies (queues=1, godwit-1.1).
    MachineType {
        name: "godwit-1.2",
        adds: "multi-queue: mq with 2 queue pairs (TAP peers must be multi-queue TAPs); UDP tunnel GSO (feature bits 65-68): guest_tunnel, guest_tunnel_csum, host_tunnel, host_tunnel_csum (TAP peers need Linux >= 6.17); vhost-user peers carry mq with 2 queue pairs (DPDK queues=2, godwit net-backend --queues 2 with interface org.godwit.net.v3) but no bits above 63: use the pasted remedies (host_tunnel=off, ...) or godwit-1.1",
        net: NetAbi {
            features: &[BASE_FEATURES, USO_FEATURES, MQ_FEATURES, UDP_TUNNEL_FEATURES],
            queue_pairs: 2,
            queue_size: 256,
            mtu: 1500,
            config_fields: CONFIG_FIELDS,
            strict: true,
        },
    },
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineTypeError {
    #[error("unknown machine type '{given}'; valid: {}", valid_names().join(", "))]
    Unknown { given: String },
}

pub fn valid_names() -> Vec<&'static str> {
    std::iter::once(ALIAS)
        .chain(MACHINE_TYPES.iter().rev().map(|m| m.name))
        .collect()
}

pub fn newest() -> &'static MachineType {
    MACHINE_TYPES
        .last()
        .expect("the machine type table is never empty")
}

/// Resolves a name or the alias to a released machine type.
pub fn resolve(name: &str) -> Result<&'static MachineType, MachineTypeError> {
    if name == ALIAS {
        return Ok(newest());
    }
    MACHINE_TYPES
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| MachineTypeError::Unknown {
            given: name.to_string(),
        })
}

/// The feature bits of a list of property names.
pub fn bits_of(names: &[&str]) -> Features {
    features::bits_of_groups(&[names])
}

impl MachineType {
    /// Features this type offers to the guest by default.
    pub fn net_features(&self) -> Features {
        features::always_offered() | features::bits_of_groups(self.net.features)
    }

    /// The previous version, if any.
    pub fn previous(&self) -> Option<&'static MachineType> {
        let index = MACHINE_TYPES.iter().position(|m| m.name == self.name)?;
        index.checked_sub(1).map(|i| &MACHINE_TYPES[i])
    }

    /// The fully resolved ABI, as `--machine TYPE,help`, query-machines and
    /// the golden files show it.
    pub fn resolved(&self) -> ResolvedMachine {
        let bits = self.net_features();
        ResolvedMachine {
            name: self.name,
            adds: self.adds,
            net: ResolvedNetAbi {
                features: features::names(bits)
                    .split(',')
                    .map(str::to_string)
                    .collect(),
                features_hex: features::hex(bits),
                queue_pairs: self.net.queue_pairs,
                queue_size: self.net.queue_size,
                mtu: self.net.mtu,
                config_fields: self.net.config_fields.to_vec(),
                strict: self.net.strict,
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ResolvedNetAbi {
    pub features: Vec<String>,
    pub features_hex: String,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: u16,
    pub config_fields: Vec<&'static str>,
    pub strict: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ResolvedMachine {
    pub name: &'static str,
    pub adds: &'static str,
    #[serde(rename = "virtio-net")]
    pub net: ResolvedNetAbi,
}

/// `godwit machines` and `--machine help`.
pub fn help_text() -> String {
    let mut out = String::from("Machine types (newest first):\n");
    for m in MACHINE_TYPES.iter().rev() {
        let alias = if m.name == newest().name {
            format!(" (alias '{ALIAS}', default)")
        } else {
            String::new()
        };
        out.push_str(&format!("  {}{alias}\n      adds: {}\n", m.name, m.adds));
    }
    out.push_str("Show a type's full ABI with --machine TYPE,help.\n");
    out
}

/// `--machine TYPE,help`.
pub fn type_help_text(m: &MachineType) -> String {
    let r = m.resolved();
    let mut out = format!("{} virtio-net ABI:\n", r.name);
    out.push_str(&format!("  features ({}):\n", r.net.features_hex));
    for name in &r.net.features {
        let bit = by_name(name).map(|f| f.bit).unwrap_or(u32::MAX);
        out.push_str(&format!("    {name}=on (bit {bit})\n"));
    }
    out.push_str(&format!(
        "  queue pairs: {}\n  queue size: {}\n  mtu: {}\n  config fields: {}\n  strict: {}\n",
        r.net.queue_pairs,
        r.net.queue_size,
        r.net.mtu,
        r.net.config_fields.join(", "),
        if r.net.strict { "on" } else { "off" }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_name_is_in_the_feature_table_and_supported() {
        for m in MACHINE_TYPES {
            for name in m.net.features.iter().flat_map(|g| g.iter()) {
                let f =
                    by_name(name).unwrap_or_else(|| panic!("{}: unknown feature {name}", m.name));
                assert!(
                    f.supported,
                    "{}: {name} is not implemented by the device model",
                    m.name
                );
            }
            assert!(
                features::check_dependencies(m.net_features()).is_empty(),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn alias_resolves_to_the_newest_and_unknown_names_list_choices() {
        assert_eq!(resolve(ALIAS).unwrap().name, newest().name);
        assert_eq!(resolve("godwit-1.0").unwrap().name, "godwit-1.0");
        let err = resolve("pc-q35-8.1").unwrap_err().to_string();
        assert!(err.contains("unknown machine type 'pc-q35-8.1'"), "{err}");
        assert!(
            err.contains("godwit-1.0") && err.contains("godwit-1.1") && err.contains("godwit,"),
            "{err}"
        );
    }

    #[test]
    fn versions_only_add() {
        for pair in MACHINE_TYPES.windows(2) {
            let (old, new) = (pair[0].net_features(), pair[1].net_features());
            assert_eq!(
                old & !new,
                0,
                "{} drops features of {}",
                pair[1].name,
                pair[0].name
            );
        }
        assert_eq!(
            resolve("godwit-1.1").unwrap().previous().unwrap().name,
            "godwit-1.0"
        );
        for pair in MACHINE_TYPES.windows(2) {
            assert!(pair[1].net.queue_pairs >= pair[0].net.queue_pairs);
        }
        assert_eq!(resolve("godwit-1.2").unwrap().net.queue_pairs, 2);
    }

    /// Each released type's ABI is frozen in tests/golden/machine-types/.
    /// A change that alters one fails here: make a new version instead.
    #[test]
    fn released_types_match_their_golden_files() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/machine-types");
        for m in MACHINE_TYPES {
            let path = dir.join(format!("{}.json", m.name));
            let actual = serde_json::to_string_pretty(&m.resolved()).unwrap() + "\n";
            if std::env::var_os("GODWIT_BLESS_NEW_MACHINE_TYPE").is_some() && !path.exists() {
                std::fs::write(&path, &actual).unwrap();
            }
            let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: no golden file {} ({e}); a new machine type gets one by running the tests once with GODWIT_BLESS_NEW_MACHINE_TYPE=1",
                    m.name,
                    path.display()
                )
            });
            assert_eq!(actual, golden, "machine type {} no longer matches its golden ABI; released types are immutable: add a new version instead", m.name);
        }
    }
}
