//! The host reports a plan is made over, and the peer each device uses on
//! a host (or why it has none, and what would change that).

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use godwit_devices::vhost_user::interface::INTERFACES;
use godwit_devices::virtio::net::features::{self, NetFeature, TapNeed, VhostNeed};

use super::{bit, PlanError};
use crate::abi::strict::PeerSupport;
use crate::planning::host_caps::{self, HostReport, PeerEntry, PeerKind, PeerStatus, Probe};

/// One host report and where it came from.
#[derive(Clone, Debug)]
pub struct HostInput {
    /// The file (or `hosts[N]` for an API argument).
    pub file: String,
    pub report: HostReport,
}

impl HostInput {
    pub fn label(&self) -> String {
        format!("{} ({})", self.report.host.name, self.file)
    }
}

/// Reads report files, each checked (schema version, every field).
pub fn read_hosts(paths: &[PathBuf]) -> Result<Vec<HostInput>, PlanError> {
    if paths.is_empty() {
        return Err(PlanError::NoHosts);
    }
    paths
        .iter()
        .map(|p| {
            Ok(HostInput {
                file: p.display().to_string(),
                report: host_caps::read_report_file(p)?,
            })
        })
        .collect()
}

/// Reads reports given as JSON values (the API's `hosts` argument).
pub fn hosts_from_values(values: &[Value]) -> Result<Vec<HostInput>, PlanError> {
    if values.is_empty() {
        return Err(PlanError::NoHosts);
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let file = format!("hosts[{i}]");
            Ok(HostInput {
                report: host_caps::report_from_value(v, &file)?,
                file,
            })
        })
        .collect()
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HostRef {
    pub name: String,
    pub file: String,
    pub godwit: String,
}

pub(super) fn host_refs(hosts: &[HostInput]) -> Vec<HostRef> {
    hosts
        .iter()
        .map(|h| HostRef {
            name: h.report.host.name.clone(),
            file: h.file.clone(),
            godwit: h.report.godwit.version.clone(),
        })
        .collect()
}

/// Why a device (or the VM) has no common ABI on a host, and what would
/// change that.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Blocker {
    pub host: Option<String>,
    pub peer: Option<String>,
    pub problem: String,
    pub would_change: String,
}

fn tun_hint(flags: u32) -> String {
    use godwit_devices::net::tap::{
        TUN_F_UDP_TUNNEL_GSO, TUN_F_UDP_TUNNEL_GSO_CSUM, TUN_F_USO4, TUN_F_USO6,
    };
    if flags & (TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM) != 0 {
        "a kernel whose TAP accepts UDP tunnel GSO (TUN_F_UDP_TUNNEL_GSO[_CSUM], Linux >= 6.17)"
            .to_string()
    } else if flags & (TUN_F_USO4 | TUN_F_USO6) != 0 {
        "a kernel whose TAP accepts USO (TUN_F_USO4|TUN_F_USO6, Linux >= 6.2)".to_string()
    } else {
        format!("a kernel whose TAP accepts the offload flags {flags:#x}")
    }
}

/// What would give `peer` the feature `f`.
pub(super) fn would_change(f: &NetFeature, peer: &PeerEntry, hosts: &[HostInput]) -> String {
    let tap_change = |tap_vnet: Option<bool>| {
        match (f.tap, tap_vnet) {
        (TapNeed::Nothing, _) => {
            format!("a godwit whose device model implements {}", f.name)
        }
        (_, Some(false)) => {
            "give the TAP virtio-net headers (vnet_hdr=on; create it with `ip tuntap add NAME mode tap vnet_hdr`)".to_string()
        }
        (TapNeed::VnetHdr, _) => "a TAP with virtio-net headers (vnet_hdr=on)".to_string(),
        (TapNeed::Offload(flags), _) => tun_hint(flags),
    }
    };
    match (&peer.probe, peer.kind) {
        (Probe::Tap(t), _) => tap_change(t.offloads.map(|o| o.vnet_hdr)),
        (Probe::VhostNet(v), _) => match f.vhost {
            VhostNeed::Ring => format!(
                "a kernel whose vhost-net offers {} ({})",
                f.name, f.spec_name
            ),
            VhostNeed::Packet => {
                tap_change(v.tap.as_ref().and_then(|t| t.offloads).map(|o| o.vnet_hdr))
            }
            _ => format!("a godwit whose device model implements {}", f.name),
        },
        (Probe::VhostUser(_), _) => match f.vhost {
            VhostNeed::QueuePairs => "a vhost-user backend with at least 2 queue pairs (GET_QUEUE_NUM: DPDK queues=2, godwit net-backend --queues 2)".to_string(),
            VhostNeed::Frontend => format!("a godwit whose frontend implements {}", f.name),
            VhostNeed::Ring | VhostNeed::Packet => {
                // Another backend interface version that has it: godwit's
                // released versions first, then what some reported
                // backend presents.
                let with = INTERFACES
                    .iter()
                    .find(|i| i.feature_bits() & bit(f.bit) != 0)
                    .map(|i| i.name.to_string())
                    .or_else(|| {
                        hosts.iter().find_map(|h| {
                            h.report.peers.iter().find_map(|p| match &p.probe {
                                Probe::VhostUser(u) => {
                                    let i = u.interface.as_ref()?;
                                    let feats =
                                        i.features.as_deref().and_then(features::parse_hex)?;
                                    (feats & bit(f.bit) != 0)
                                        .then(|| format!("{} (as on host {})", i.active, h.label()))
                                }
                                _ => None,
                            })
                        })
                    });
                match with {
                    Some(v) => format!(
                        "a vhost-user backend that offers {} ({}), e.g. one presenting interface version {v} (another backend interface version)",
                        f.name, f.spec_name
                    ),
                    None => format!(
                        "a vhost-user backend that offers {} ({})",
                        f.name, f.spec_name
                    ),
                }
            }
        },
    }
}

/// What would give a host a usable peer of `kind`.
fn peer_change(kind: PeerKind) -> String {
    match kind {
        PeerKind::Tap => "a working TAP (the tun driver, CAP_NET_ADMIN); take the report with `godwit host-caps --net tap,ifname=NAME`".into(),
        PeerKind::VhostUser => "a vhost-user backend on that host, named in its report: `godwit host-caps --net vhost-user,socket=PATH`".into(),
        PeerKind::VhostNet => "a kernel with vhost-net (CONFIG_VHOST_NET; modprobe vhost_net), then take the report again".into(),
    }
}

/// The peer `device` of kind `kind` (its `index`-th of that kind) uses on
/// each host, or why it has none.
pub(super) fn device_peer(
    h: &HostInput,
    kind: PeerKind,
    index: usize,
) -> Result<(&PeerEntry, PeerSupport), Blocker> {
    let Some(peer) = h.report.peer(kind, index) else {
        let have = h.report.peers.iter().filter(|p| p.kind == kind).count();
        return Err(Blocker {
            host: Some(h.label()),
            peer: None,
            problem: if have == 0 {
                format!("its report has no {kind} peer")
            } else {
                format!(
                    "its report has {have} {kind} peer(s); this device needs peer number {}",
                    index + 1
                )
            },
            would_change: peer_change(kind),
        });
    };
    let Some(support) = peer.support() else {
        let why = peer
            .error
            .clone()
            .unwrap_or_else(|| "it could not be probed".into());
        return Err(Blocker {
            host: Some(h.label()),
            peer: Some(peer.name.clone()),
            problem: match peer.status {
                PeerStatus::Absent => format!("{} is absent: {why}", peer.name),
                _ => format!("{} could not be probed: {why}", peer.name),
            },
            would_change: peer_change(kind),
        });
    };
    if let Some(b) = &peer.migration_blocker {
        return Err(Blocker {
            host: Some(h.label()),
            peer: Some(peer.name.clone()),
            problem: b.clone(),
            would_change: match kind {
                PeerKind::VhostUser => {
                    "a vhost-user backend with feature LOG_ALL and protocol feature LOG_SHMFD"
                        .into()
                }
                _ => "a kernel whose vhost-net offers LOG_ALL".into(),
            },
        });
    }
    Ok((peer, support))
}
