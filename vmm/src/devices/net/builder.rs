//! The one builder of network device models: boot, restore and incoming
//! migration all turn an opened peer ([`OpenedPeer`]) and a
//! [`DeviceConfig`] into a model here, for every peer kind. Boot first
//! decides the config from the machine type, the spec and what the peer
//! carries ([`decide`]); restore and migration take it from the saved
//! device.

use std::sync::{Arc, Mutex};

use godwit_devices::vhost_net::{VhostKernelNet, VhostNetPeer};
use godwit_devices::vhost_user::{VhostUserNet, VhostUserNetConfig};
use godwit_devices::virtio::net::{FrontendConfig, NetConfig, NetModel, VirtioNet};
use godwit_devices::virtio::VirtioDevice;
use godwit_devices::GuestMemory;

use super::peers::{
    interface_gaps, interface_values, rechecker, OpenedPeer, VHOST_USER_REPLY_TIMEOUT,
};
use super::{default_mac, NetSetupError};
use crate::abi::machine_types::MachineType;
use crate::abi::strict::{self, NetAbiDecision, PeerSupport};
use crate::config::net_spec::NetSpec;

/// What a device model is built with: decided at boot, saved by a
/// snapshot or sent by a migration source.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub id: String,
    pub machine: &'static MachineType,
    pub mac: [u8; 6],
    /// The features offered to the guest.
    pub features: godwit_devices::virtio::Features,
    pub mtu: u16,
    /// Maximum size of the receive and transmit rings.
    pub queue_size: u16,
    /// Queue pairs (`max_virtqueue_pairs`).
    pub queue_pairs: u16,
    /// The vhost-user interface version pinned, if any.
    pub pin: Option<String>,
    pub strict: bool,
}

impl DeviceConfig {
    /// The guest-visible side, as every model takes it.
    fn frontend(&self) -> FrontendConfig {
        FrontendConfig {
            mac: self.mac,
            features: self.features,
            mtu: self.mtu,
            queue_size: self.queue_size,
            queue_pairs: self.queue_pairs,
        }
    }
}

/// A built model, as the VMM and as the transport see it.
pub struct Model {
    pub device: Arc<Mutex<dyn NetModel>>,
    pub virtio: Arc<Mutex<dyn VirtioDevice>>,
}

fn model<D: NetModel + 'static>(dev: D) -> Model {
    let d = Arc::new(Mutex::new(dev));
    Model {
        device: d.clone(),
        virtio: d,
    }
}

/// The TAP queues a device uses: one per queue pair.
fn device_pairs(config: &DeviceConfig) -> usize {
    usize::from(config.queue_pairs.max(1))
}

/// Builds the model of `config` on `peer`. `memory` is the guest's RAM
/// (kernel vhost-net maps it when `/dev/vhost-net` is opened).
pub fn build_model(
    peer: OpenedPeer,
    config: &DeviceConfig,
    memory: &GuestMemory,
) -> Result<Model, NetSetupError> {
    let device = || config.id.clone();
    match peer {
        OpenedPeer::Tap(mut taps) => {
            // A peer opened with more queues than decided (strict=off on a
            // smaller count) keeps only those of the device's pairs.
            taps.truncate(device_pairs(config));
            let dev = VirtioNet::with_queues(
                taps,
                NetConfig {
                    mac: config.mac,
                    features: config.features,
                    mtu: Some(config.mtu),
                    queue_size: config.queue_size,
                },
            )
            .map_err(|source| NetSetupError::Device {
                device: device(),
                source,
            })?;
            Ok(model(dev))
        }
        OpenedPeer::VhostNet(mut taps) => {
            let vhost_err = |source| NetSetupError::VhostNet {
                device: device(),
                source,
            };
            // One /dev/vhost-net per pair of the device, each on its queue.
            taps.truncate(device_pairs(config));
            let peer = VhostNetPeer::open(taps, memory).map_err(vhost_err)?;
            let dev = VhostKernelNet::new(peer, config.frontend()).map_err(vhost_err)?;
            Ok(model(dev))
        }
        OpenedPeer::VhostUser(p) => {
            let recheck = rechecker(
                config.id.clone(),
                config.machine,
                p.socket.clone(),
                config.pin.clone(),
                config.strict,
                config.queue_pairs,
            );
            let dev = VhostUserNet::new(
                p.session,
                p.endpoint,
                VhostUserNetConfig {
                    frontend: config.frontend(),
                    pin: config.pin.clone(),
                    timeout: VHOST_USER_REPLY_TIMEOUT,
                },
                recheck,
            )
            .map_err(|source| NetSetupError::VhostUserDevice {
                device: device(),
                source,
            })?;
            Ok(model(dev))
        }
    }
}

fn spec_with_strict_off(text: &str) -> String {
    let mut parts: Vec<&str> = text
        .split(',')
        .filter(|p| !p.starts_with("strict="))
        .collect();
    parts.push("strict=off");
    parts.join(",")
}

/// Boot: decides device `index`'s ABI (machine type, overrides, strict)
/// against what its opened peer carries, and the config to build it with.
pub fn decide(
    id: &str,
    index: usize,
    spec: &NetSpec,
    machine: &'static MachineType,
    opened: &OpenedPeer,
    peer: &PeerSupport,
) -> Result<(NetAbiDecision, DeviceConfig), NetSetupError> {
    let strict = spec.strict.unwrap_or(machine.net.strict);
    let mut config = DeviceConfig {
        id: id.to_string(),
        machine,
        mac: spec.mac.unwrap_or_else(|| default_mac(index)),
        features: 0,
        mtu: spec.mtu.unwrap_or(machine.net.mtu),
        queue_size: machine.net.queue_size,
        queue_pairs: 1,
        pin: None,
        strict,
    };
    let decision = match opened {
        OpenedPeer::Tap(_) | OpenedPeer::VhostNet(_) => strict::decide(
            id,
            &spec.text,
            machine,
            &spec.features,
            spec.queue_pairs(),
            strict,
            peer,
        )?,
        OpenedPeer::VhostUser(p) => decide_interface(id, spec, p, peer, &mut config)?,
    };
    config.features = decision.offered;
    config.queue_pairs = decision.queue_pairs;
    Ok((decision, config))
}

/// The decision for a vhost-user backend: the strict check, then the
/// interface version the spec pins (its ring size and MTU, what the
/// backend lacks of it).
fn decide_interface(
    id: &str,
    spec: &NetSpec,
    p: &super::peers::VhostUserPeer,
    peer: &PeerSupport,
    config: &mut DeviceConfig,
) -> Result<NetAbiDecision, NetSetupError> {
    let (machine, strict, socket) = (config.machine, config.strict, &p.socket);
    let pin = match &spec.peer {
        crate::config::net_spec::PeerSpec::VhostUser { interface, .. } => interface.as_deref(),
        _ => None,
    };
    config.pin = pin.map(str::to_string);
    let offer = &p.session.offer;
    // A version neither godwit nor the backend knows is a configuration
    // error, reported before anything else.
    let checked_gaps = match (pin, &offer.record) {
        (Some(name), None) => {
            interface_gaps(name, offer, socket).map_err(|source| NetSetupError::Interface {
                device: id.to_string(),
                source,
            })?
        }
        _ => Vec::new(),
    };
    let mut decision = strict::decide(
        id,
        &spec.text,
        machine,
        &spec.features,
        spec.queue_pairs(),
        strict,
        peer,
    )?;
    let Some(name) = pin else {
        return Ok(decision);
    };
    let values = interface_values(name, offer);
    let mut gaps = checked_gaps;
    if let Some(v) = values {
        if v.max_ring_size < config.queue_size {
            gaps.push(format!(
                "interface {name} allows rings of {} entries; machine type {} has {}",
                v.max_ring_size, machine.name, config.queue_size
            ));
        }
        if spec.mtu.is_none() {
            config.mtu = v.mtu;
        }
    }
    if gaps.is_empty() {
        return Ok(decision);
    }
    if strict {
        return Err(NetSetupError::InterfaceStrict {
            device: id.to_string(),
            detail: format!(
                "vhost-user backend {socket} does not provide interface {name}, and strict=on:\n  - {}\nRemedies (any one):\n  1. pin an interface this backend provides (one whose values it offers), or run a backend that provides {name}\n  2. let godwit go on without the guarantee (the VM gets a migration blocker):\n       --net {}",
                gaps.join("\n  - "),
                spec_with_strict_off(&spec.text)
            ),
        });
    }
    let blocker = format!(
        "{id}: strict=off and vhost-user backend {socket} does not provide interface {name}: {}",
        gaps.join("; ")
    );
    tracing::warn!("{blocker}");
    decision.blocker = Some(match decision.blocker.take() {
        Some(b) => format!("{b}; {blocker}"),
        None => blocker,
    });
    if let Some(v) = values {
        config.queue_size = config.queue_size.min(v.max_ring_size);
    }
    Ok(decision)
}
