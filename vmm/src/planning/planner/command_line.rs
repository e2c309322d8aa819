//! A plan as `godwit run` options: `--machine` and one `--net` per device,
//! with the peer properties every host agrees on (a placeholder where they
//! differ) and a line of its own for each host whose peer differs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::hosts::HostInput;
use crate::abi::machine_types::MachineType;
use crate::config::net_spec::{NetSpec, PeerSpec};
use crate::planning::host_caps::PeerKind;

/// Placeholders in a command line whose peer names differ between hosts.
pub const TAP_PLACEHOLDER: &str = "TAPNAME";
pub const SOCKET_PLACEHOLDER: &str = "SOCKET";

/// The peer properties of a host's spec, e.g. `[("ifname", "gwtap0")]`;
/// feature, strict and interface properties are the plan's to set.
fn peer_props(spec: Option<&str>) -> Vec<(String, String)> {
    let parsed = spec.and_then(|s| s.parse::<NetSpec>().ok());
    let onoff = |b: bool| if b { "on" } else { "off" }.to_string();
    match parsed.map(|s| s.peer) {
        Some(PeerSpec::Tap {
            ifname,
            fds,
            vnet_hdr,
        }) => {
            let mut v = Vec::new();
            if let Some(n) = ifname {
                v.push(("ifname".into(), n));
            }
            match fds.as_slice() {
                [] => {}
                [fd] => v.push(("fd".into(), fd.to_string())),
                many => v.push((
                    "fds".into(),
                    many.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(":"),
                )),
            }
            if let Some(h) = vnet_hdr {
                v.push(("vnet_hdr".into(), onoff(h)));
            }
            v
        }
        Some(PeerSpec::VhostUser { socket, server, .. }) => {
            let mut v = vec![("socket".to_string(), socket.display().to_string())];
            if server {
                v.push(("server".into(), "on".into()));
            }
            v
        }
        Some(PeerSpec::VhostNet { ifname }) => vec![("ifname".into(), ifname)],
        None => Vec::new(),
    }
}

fn placeholder(kind: PeerKind, key: &str) -> Option<String> {
    match (kind, key) {
        (_, "ifname") => Some(TAP_PLACEHOLDER.into()),
        (_, "socket") => Some(SOCKET_PLACEHOLDER.into()),
        (_, "fd") => Some("FD".into()),
        _ => None,
    }
}

/// The peer part common to all hosts: keys all hosts agree on, a
/// placeholder for a name that differs (or is missing), host-local options
/// (vnet_hdr, server) only when all agree.
fn common_peer_props(kind: PeerKind, per_host: &[Vec<(String, String)>]) -> Vec<(String, String)> {
    let mut keys: Vec<String> = Vec::new();
    for props in per_host {
        for (k, _) in props {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let name_key = match kind {
        PeerKind::VhostUser => "socket",
        _ => "ifname",
    };
    if !keys.iter().any(|k| k == name_key || k == "fd") {
        keys.insert(0, name_key.to_string());
    }
    let mut out = Vec::new();
    for k in keys {
        let values: Vec<Option<&String>> = per_host
            .iter()
            .map(|p| p.iter().find(|(kk, _)| *kk == k).map(|(_, v)| v))
            .collect();
        let first = values.first().copied().flatten();
        if first.is_some() && values.iter().all(|v| *v == first) {
            if let Some(v) = first {
                out.push((k, v.clone()));
            }
        } else if let Some(p) = placeholder(kind, &k) {
            out.push((k, p));
        }
    }
    out
}

fn spec_text(kind: PeerKind, peer: &[(String, String)], properties: &[String]) -> String {
    let mut parts = vec![kind.as_str().to_string()];
    parts.extend(peer.iter().map(|(k, v)| format!("{k}={v}")));
    parts.extend(properties.iter().cloned());
    parts.join(",")
}

/// The `godwit run` line of one host whose peer properties differ from
/// the common line's.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HostLine {
    pub host: String,
    pub command_line: String,
}

/// The common line and the lines of hosts that differ, for `devices`
/// (each its peer kind and the plan's device properties).
pub(super) fn command_lines(
    machine: &MachineType,
    devices: &[(PeerKind, &[String])],
    hosts: &[HostInput],
) -> (Option<String>, Vec<HostLine>) {
    let mut seen: BTreeMap<PeerKind, usize> = BTreeMap::new();
    let mut generic = vec![format!("--machine {}", machine.name)];
    let mut per_host: Vec<Vec<String>> = hosts
        .iter()
        .map(|_| vec![format!("--machine {}", machine.name)])
        .collect();
    for &(kind, properties) in devices {
        let index = seen.entry(kind).or_insert(0);
        let props: Vec<Vec<(String, String)>> = hosts
            .iter()
            .map(|h| peer_props(h.report.peer(kind, *index).and_then(|p| p.spec.as_deref())))
            .collect();
        *index += 1;
        let common = common_peer_props(kind, &props);
        generic.push(format!("--net {}", spec_text(kind, &common, properties)));
        for (line, p) in per_host.iter_mut().zip(&props) {
            let own = if p
                .iter()
                .any(|(k, _)| k == "ifname" || k == "socket" || k == "fd")
            {
                p.clone()
            } else {
                common.clone()
            };
            line.push(format!("--net {}", spec_text(kind, &own, properties)));
        }
    }
    let generic = generic.join(" ");
    let lines = hosts
        .iter()
        .zip(per_host)
        .map(|(h, l)| HostLine {
            host: h.label(),
            command_line: l.join(" "),
        })
        .filter(|l| l.command_line != generic)
        .collect();
    (Some(generic), lines)
}
