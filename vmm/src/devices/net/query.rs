//! What `query-net` and `godwit probe` show about a device and its peer.

use serde_json::{json, Map, Value};

use godwit_devices::vhost_user::conn::protocol_names;
use godwit_devices::vhost_user::interface::by_interface_name;
use godwit_devices::vhost_user::session::TRANSPORT_BITS;
use godwit_devices::virtio::net::features::{self, Features};
use godwit_devices::virtio::net::PeerStatus;

use super::peers::{open_tap, open_vhost_user, vhost_user_support};
use super::{NetDevice, NetSetupError};
use crate::abi::strict;
use crate::abi::strict::PeerSupport;
use crate::config::net_spec::{NetSpec, PeerSpec};

impl NetDevice {
    pub fn query(&self) -> Value {
        let blockers = self.blockers();
        let dev = self.model();
        let info = dev.info();
        let set = |bits: Features| json!({"hex": features::hex(bits), "names": name_list(bits)});
        let mut peer = json!({
            "kind": self.peer.kind,
            "name": self.peer.name,
            "supported": set(self.peer.supported),
            "lacks": self.peer.why_not.iter().map(|(b, why)| json!({"name": features::name_of(*b), "bit": b, "why": why})).collect::<Vec<_>>(),
            "max_queue_pairs": self.peer.max_queue_pairs,
            "queue_limit": self.peer.queue_why,
        });
        let status = dev.peer_status();
        if let Value::Object(o) = &mut peer {
            peer_fields(o, &status);
        }
        let interface = match status {
            PeerStatus::VhostUser {
                interface: Some(i), ..
            } => {
                let values = by_interface_name(&i.name)
                    .map(|known| json!(known.resolved()))
                    .or_else(|| i.record.as_ref().map(|r| json!(r.values)));
                Some(json!({"name": i.name, "pinned": i.pinned, "how": i.how, "values": values}))
            }
            _ => None,
        };
        let queues: Vec<u16> = dev.queue_max_sizes().to_vec();
        json!({
            "id": self.id,
            "machine": self.machine.name,
            "strict": self.decision.strict,
            "peer": peer,
            "interface": interface,
            "required": set(self.decision.required),
            "offered": set(info.offered_features),
            "acked": set(info.acked_features),
            "dropped": set(self.decision.dropped),
            "blockers": blockers,
            "mac": info.mac,
            "link": if info.link_up { "up" } else { "down" },
            "queue_max_sizes": queues,
            "queue_pairs": {
                "required": self.decision.required_queue_pairs,
                "offered": info.queue_pairs,
                "active": info.active_queue_pairs,
                "stats": info.pair_stats,
            },
            "mmio": {"base": format!("{:#x}", self.mmio_base), "irq": self.irq},
            "stats": info.stats,
        })
    }
}

pub(super) fn name_list(bits: Features) -> Vec<String> {
    if bits == 0 {
        return Vec::new();
    }
    features::names(bits)
        .split(',')
        .map(str::to_string)
        .collect()
}

/// `dirty_log` as query-net's `migratable`: true, or why not.
fn migratable(dirty_log: &Result<(), String>) -> Value {
    dirty_log
        .as_ref()
        .err()
        .map_or_else(|| json!(true), |why| json!(why))
}

/// The fields of `peer` each kind adds.
fn peer_fields(o: &mut Map<String, Value>, status: &PeerStatus) {
    match status {
        PeerStatus::VhostUser {
            backend: status,
            dirty_log,
            ..
        } => {
            o.insert("socket".into(), json!(status.socket));
            o.insert("mode".into(), json!(status.mode));
            o.insert("connected".into(), json!(status.connected));
            o.insert("rings_running".into(), json!(status.rings_running));
            o.insert("reconnects".into(), json!(status.reconnects));
            o.insert("last_error".into(), json!(status.last_error));
            o.insert("dirty_logging".into(), json!(status.logging));
            o.insert("migratable".into(), migratable(dirty_log));
            if let Some(offer) = &status.offer {
                o.insert(
                    "backend_features".into(),
                    json!({"hex": format!("{:#018x}", offer.features), "names": name_list((offer.features & !TRANSPORT_BITS).into())}),
                );
                o.insert(
                    "protocol_features".into(),
                    json!(format!("{:#x}", offer.protocol)),
                );
                o.insert(
                    "negotiated_protocol".into(),
                    json!(protocol_names(offer.acked_protocol)),
                );
                o.insert("queue_num".into(), json!(offer.queue_num));
            }
        }
        PeerStatus::VhostNet {
            tap,
            vnet_hdr,
            kernel_features,
            dirty_log,
        } => {
            o.insert("tap".into(), json!(tap));
            o.insert("vnet_hdr".into(), json!(vnet_hdr));
            o.insert(
                "vhost_features".into(),
                json!(format!("{kernel_features:#x}")),
            );
            o.insert("migratable".into(), migratable(dirty_log));
        }
        PeerStatus::Tap { vnet_hdr, offloads } => {
            o.insert("vnet_hdr".into(), json!(vnet_hdr));
            o.insert("offloads".into(), json!(offloads));
        }
    }
}

/// Which machine types a peer carries fully (features and queue pairs),
/// with the spec's properties.
fn machine_support(device: &str, spec: &NetSpec, peer: &PeerSupport) -> Vec<Value> {
    crate::abi::machine_types::MACHINE_TYPES
        .iter()
        .rev()
        .map(|m| {
            let required = strict::required_features(device, m, &spec.features)
                .unwrap_or_else(|_| m.net_features());
            let pairs = strict::required_queue_pairs(device, m, required, spec.queue_pairs())
                .unwrap_or(m.net.queue_pairs);
            let missing = required & !peer.supported;
            let mut lacks = name_list(missing);
            if pairs > peer.max_queue_pairs {
                lacks.push(format!("queue_pairs={pairs}"));
            }
            json!({"name": m.name, "supported": lacks.is_empty(), "queue_pairs": pairs, "missing": lacks})
        })
        .collect()
}

/// Queue pairs a probe opens on a TAP by name: two show whether it is a
/// multi-queue TAP (which then carries as many as godwit allows).
const PROBE_QUEUE_PAIRS: u16 = 2;

/// `godwit probe --net SPEC`: what the peer carries, and which machine types
/// it supports fully, without starting a VM.
pub fn probe_report(spec: &NetSpec) -> Result<Value, NetSetupError> {
    let device = spec.id.clone().unwrap_or_else(|| "probe".into());
    if let PeerSpec::VhostUser {
        socket,
        server,
        interface,
    } = &spec.peer
    {
        return probe_vhost_user(&device, spec, socket, *server, interface.as_deref());
    }
    let opened = open_tap(
        &device,
        spec,
        spec.queue_pairs().unwrap_or(PROBE_QUEUE_PAIRS),
    )?;
    let peer = opened.support();
    let tap = &opened.queues[0];
    let caps = tap.probe_offloads();
    let machines = machine_support(&device, spec, &peer);
    Ok(json!({
        "kind": peer.kind,
        "name": peer.name,
        "vnet_hdr": tap.has_vnet_hdr(),
        "offloads": caps,
        "multi_queue": tap.is_multi_queue(),
        "max_queue_pairs": peer.max_queue_pairs,
        "queue_limit": peer.queue_why,
        "supported": name_list(peer.supported),
        "lacks": peer.why_not.iter().map(|(b, why)| json!({"name": features::name_of(*b), "bit": b, "why": why})).collect::<Vec<_>>(),
        "machine_types": machines,
    }))
}

/// `godwit probe --net vhost-user,...`: what the backend offers, its
/// interface version (with godwit's extension), and which machine types it
/// supports fully.
fn probe_vhost_user(
    device: &str,
    spec: &NetSpec,
    socket: &std::path::Path,
    server: bool,
    pin: Option<&str>,
) -> Result<Value, NetSetupError> {
    let p = open_vhost_user(device, socket, server, pin)?;
    let peer = vhost_user_support(&p.socket, &p.session.offer);
    let machines = machine_support(device, spec, &peer);
    let offer = &p.session.offer;
    let report = json!({
        "kind": peer.kind,
        "name": peer.name,
        "backend_features": {"hex": format!("{:#018x}", offer.features), "names": name_list((offer.features & !TRANSPORT_BITS).into())},
        "protocol_features": format!("{:#x}", offer.protocol),
        "negotiated_protocol": protocol_names(offer.acked_protocol),
        "queue_num": offer.queue_num,
        "max_queue_pairs": peer.max_queue_pairs,
        "queue_limit": peer.queue_why,
        "interface_extension": offer.extension(),
        "interface": offer.record,
        "migratable": offer.logging().err().map_or_else(|| json!(true), |why| json!(why)),
        "supported": name_list(peer.supported),
        "lacks": peer.why_not.iter().map(|(b, why)| json!({"name": features::name_of(*b), "bit": b, "why": why})).collect::<Vec<_>>(),
        "machine_types": machines,
    });
    p.session.conn.shutdown();
    Ok(report)
}
