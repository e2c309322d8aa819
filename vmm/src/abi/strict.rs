//! Decides the virtio-net ABI a device shows its guest: the machine type's
//! defaults plus the user's overrides are *required*; the peer's probed
//! capabilities say what can be carried. With strict on, a gap refuses the
//! start with remedies to paste; with strict off, the gap is dropped with a
//! warning and the VM gets a migration blocker.

use std::collections::BTreeMap;
use std::fmt;

use godwit_devices::virtio::feature as bit;
use godwit_devices::virtio::net::features::{
    self, bits, by_name, check_dependencies, Features, FEATURES,
};

use crate::abi::machine_types::{MachineType, MACHINE_TYPES};

/// What a network peer can carry, and why not where it cannot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSupport {
    /// `tap`, `vhost-user`, `vhost-net`.
    pub kind: &'static str,
    /// Human description, e.g. `TAP gwt0`.
    pub name: String,
    /// Feature bits the peer carries (those needing nothing from a peer included).
    pub supported: Features,
    /// For unsupported bits that matter: why the peer lacks them.
    pub why_not: BTreeMap<u32, String>,
    /// The most queue pairs the peer carries (a TAP queue, or two
    /// vhost-user rings, each).
    pub max_queue_pairs: u16,
    /// Why it carries no more, when that limits it (a single-queue TAP).
    pub queue_why: Option<String>,
}

impl PeerSupport {
    /// A peer that carries `supported` and `max_queue_pairs` pairs.
    pub fn new(
        kind: &'static str,
        name: String,
        supported: Features,
        why_not: BTreeMap<u32, String>,
    ) -> Self {
        PeerSupport {
            kind,
            name,
            supported,
            why_not,
            max_queue_pairs: godwit_devices::virtio::net::MAX_QUEUE_PAIRS,
            queue_why: None,
        }
    }

    /// The same peer, carrying at most `pairs` queue pairs, because `why`.
    pub fn with_queue_limit(mut self, pairs: u16, why: impl Into<String>) -> Self {
        self.max_queue_pairs = pairs;
        self.queue_why = Some(why.into());
        self
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("{device}: unknown property '{name}'; feature properties are: {}", valid_feature_names().join(", "))]
    UnknownFeature { device: String, name: String },
    #[error("{device}: {name}=on is not possible: godwit's virtio-net device does not implement {name} (bit {bit})")]
    Unimplemented {
        device: String,
        name: String,
        bit: u32,
    },
    #[error("{device}: version_1=off is not possible: godwit's virtio-mmio devices are modern (virtio 1.x) only")]
    Version1Off { device: String },
    /// Two properties break a spec dependency; `detail` names both.
    #[error("{device}: {detail}")]
    Conflict { device: String, detail: String },
    #[error("{device}: queues={queues} needs multi-queue, which is off (machine type {machine} without mq, or mq=off): add mq=on, or use a machine type with mq (godwit-1.2 or newer)")]
    QueuesWithoutMq {
        device: String,
        queues: u16,
        machine: &'static str,
    },
}

pub fn valid_feature_names() -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|f| f.supported)
        .map(|f| f.name)
        .collect()
}

/// Machine type defaults with the user's `name=on|off` properties applied.
pub fn required_features(
    device: &str,
    machine: &MachineType,
    overrides: &BTreeMap<String, bool>,
) -> Result<Features, NetConfigError> {
    let mut set = machine.net_features();
    for (name, on) in overrides {
        let Some(f) = by_name(name) else {
            return Err(NetConfigError::UnknownFeature {
                device: device.into(),
                name: name.clone(),
            });
        };
        if f.always && !on {
            return Err(NetConfigError::Version1Off {
                device: device.into(),
            });
        }
        if *on && !f.supported {
            return Err(NetConfigError::Unimplemented {
                device: device.into(),
                name: name.clone(),
                bit: f.bit,
            });
        }
        if *on {
            set |= bit(f.bit);
        } else {
            set &= !bit(f.bit);
        }
    }
    check_conflicts(device, set, overrides)?;
    Ok(set)
}

/// Spec dependency rules, reported with both property names.
fn check_conflicts(
    device: &str,
    set: Features,
    overrides: &BTreeMap<String, bool>,
) -> Result<(), NetConfigError> {
    for f in FEATURES.iter().filter(|f| set & bit(f.bit) != 0) {
        for &needed in f.requires_all {
            if set & bit(needed) == 0 {
                let needed_name = features::name_of(needed);
                // The user's own word comes first in the message.
                let user_turned_off = overrides.get(&needed_name) == Some(&false);
                let (first, fv, second, sv) = if user_turned_off {
                    (needed_name.clone(), "off", f.name.to_string(), "on")
                } else {
                    (f.name.to_string(), "on", needed_name.clone(), "off")
                };
                return Err(NetConfigError::Conflict {
                    device: device.into(),
                    detail: format!(
                        "{first}={fv} conflicts with {second}={sv}: {} requires {needed_name}; set {}=off as well, or {needed_name}=on",
                        f.name, f.name
                    ),
                });
            }
        }
        if !f.requires_any.is_empty() && !f.requires_any.iter().any(|b| set & bit(*b) != 0) {
            let names: Vec<String> = f
                .requires_any
                .iter()
                .map(|b| features::name_of(*b))
                .collect();
            return Err(NetConfigError::Conflict {
                device: device.into(),
                detail: format!(
                    "{}=on conflicts with {}=off: {} requires one of {}; set {}=off as well, or one of {} on",
                    f.name,
                    names.join("/"),
                    f.name,
                    names.join(", "),
                    f.name,
                    names.join(", ")
                ),
            });
        }
    }
    debug_assert!(check_dependencies(set).is_empty());
    Ok(())
}

/// The queue pairs a device of `required` features asks for: without MQ
/// one; with MQ `queues=` or the machine type's count.
pub fn required_queue_pairs(
    device: &str,
    machine: &MachineType,
    required: Features,
    queues: Option<u16>,
) -> Result<u16, NetConfigError> {
    let mq = features::by_name("mq").is_some_and(|f| required & bit(f.bit) != 0);
    match (mq, queues) {
        (true, q) => Ok(q.unwrap_or(machine.net.queue_pairs).max(1)),
        (false, Some(q)) if q > 1 => Err(NetConfigError::QueuesWithoutMq {
            device: device.into(),
            queues: q,
            machine: machine.name,
        }),
        (false, _) => Ok(1),
    }
}

/// `missing` and every feature in `set` that depends on one of them.
pub fn with_dependents(set: Features, missing: Features) -> Features {
    let mut drop = missing;
    loop {
        let remaining = set & !drop;
        let mut more = 0;
        for f in FEATURES.iter().filter(|f| remaining & bit(f.bit) != 0) {
            let lacks_all = f.requires_all.iter().any(|b| remaining & bit(*b) == 0);
            let lacks_any = !f.requires_any.is_empty()
                && f.requires_any.iter().all(|b| remaining & bit(*b) == 0);
            if lacks_all || lacks_any {
                more |= bit(f.bit);
            }
        }
        if more == 0 {
            return drop & set;
        }
        drop |= more;
    }
}

fn describe(set: Features) -> String {
    bits(set)
        .map(|b| format!("{} (bit {b})", features::name_of(b)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The peer carries fewer queue pairs than the device requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueGap {
    pub required: u16,
    pub carried: u16,
    pub why: Option<String>,
}

/// Start-up refused: the peer lacks features (or queue pairs) the VM
/// requires, strict is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictRefusal {
    pub device: String,
    pub peer: String,
    pub machine: &'static str,
    pub missing: Vec<(u32, String, Option<String>)>,
    pub queues: Option<QueueGap>,
    /// Remedy 1: the `--net` text with overrides that make this peer work.
    pub override_spec: String,
    pub override_features: Vec<String>,
    /// Remedy 2: the newest machine type this peer supports fully.
    pub machine_remedy: Option<&'static str>,
    /// Remedy 3: the `--net` text with strict=off.
    pub strict_off_spec: String,
}

impl fmt::Display for StrictRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.missing.is_empty(), &self.queues) {
            (true, Some(_)) => "queue pairs",
            (false, Some(_)) => "features and queue pairs",
            _ => "features",
        };
        writeln!(
            f,
            "{}: the network peer ({}) lacks {what} that machine type {} requires, and strict=on:",
            self.device, self.peer, self.machine
        )?;
        if let Some(q) = &self.queues {
            write!(
                f,
                "  - {} queue pairs required, the peer carries {}",
                q.required, q.carried
            )?;
            match &q.why {
                Some(why) => writeln!(f, ": {why}")?,
                None => writeln!(f)?,
            }
        }
        // One line per reason: a TAP without vnet header explains a dozen bits at once.
        let mut by_reason: Vec<(Option<&String>, Vec<String>)> = Vec::new();
        for (b, name, why) in &self.missing {
            let item = format!("{name} (bit {b})");
            match by_reason.iter_mut().find(|(r, _)| *r == why.as_ref()) {
                Some((_, items)) => items.push(item),
                None => by_reason.push((why.as_ref(), vec![item])),
            }
        }
        for (why, items) in by_reason {
            match why {
                Some(why) => writeln!(f, "  - {}: {why}", items.join(", "))?,
                None => writeln!(f, "  - {}", items.join(", "))?,
            }
        }
        writeln!(f, "Remedies (any one):")?;
        let mut lacking = self.override_features.clone();
        if let Some(q) = &self.queues {
            lacking.push(format!("queue pairs beyond {}", q.carried));
        }
        writeln!(f, "  1. ask for what this peer carries explicitly (the guest will not see {}; start this VM with the same properties on every host it may migrate to):", lacking.join(", "))?;
        writeln!(f, "       --net {}", self.override_spec)?;
        match self.machine_remedy {
            Some(m) => writeln!(
                f,
                "  2. use the newest machine type this peer supports fully (its ABI is fixed and migratable to any host that supports it):\n       --machine {m}"
            )?,
            None => writeln!(f, "  2. (no machine type works with this peer as configured)")?,
        }
        write!(
            f,
            "  3. let godwit drop what the peer lacks (the VM boots anywhere, but gets a migration blocker: no snapshot, no migration):\n       --net {}",
            self.strict_off_spec
        )
    }
}

impl std::error::Error for StrictRefusal {}

/// The ABI a device ends up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAbiDecision {
    pub required: Features,
    pub offered: Features,
    /// Queue pairs required, and offered (`max_virtqueue_pairs`).
    pub required_queue_pairs: u16,
    pub queue_pairs: u16,
    pub strict: bool,
    /// Required features dropped because strict was off.
    pub dropped: Features,
    /// Set when strict is off: why the VM cannot migrate.
    pub blocker: Option<String>,
}

/// Appends `extra` properties to a `--net` text.
fn spec_with(spec_text: &str, extra: &[String]) -> String {
    let mut parts: Vec<String> = spec_text.split(',').map(str::to_string).collect();
    for e in extra {
        let key = e.split('=').next().unwrap_or_default();
        parts.retain(|p| p.split('=').next() != Some(key) || !p.contains('='));
        parts.push(e.clone());
    }
    parts.join(",")
}

/// Why a device's ABI could not be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetAbiError {
    #[error(transparent)]
    Config(#[from] NetConfigError),
    #[error(transparent)]
    Strict(#[from] Box<StrictRefusal>),
}

/// Decides the offered features and queue pairs (`queues=` given in
/// `queues`), or refuses with remedies.
pub fn decide(
    device: &str,
    spec_text: &str,
    machine: &'static MachineType,
    overrides: &BTreeMap<String, bool>,
    queues: Option<u16>,
    strict: bool,
    peer: &PeerSupport,
) -> Result<NetAbiDecision, NetAbiError> {
    let required = required_features(device, machine, overrides)?;
    let required_pairs = required_queue_pairs(device, machine, required, queues)?;
    let missing = required & !peer.supported;
    let queue_gap = (required_pairs > peer.max_queue_pairs).then(|| QueueGap {
        required: required_pairs,
        carried: peer.max_queue_pairs,
        why: peer.queue_why.clone(),
    });
    if missing == 0 && queue_gap.is_none() {
        return Ok(NetAbiDecision {
            required,
            offered: required,
            required_queue_pairs: required_pairs,
            queue_pairs: required_pairs,
            strict,
            dropped: 0,
            blocker: (!strict).then(|| {
                format!(
                    "{device}: strict=off: the machine type no longer guarantees this device's ABI"
                )
            }),
        });
    }
    let dropped = with_dependents(required, missing);
    let queue_text = queue_gap.as_ref().map(|q| {
        format!(
            "{} of the {} queue pairs",
            q.required - q.carried,
            q.required
        )
    });
    if !strict {
        if let Some(q) = &queue_gap {
            tracing::warn!(
                "{device}: offering {} queue pair(s) instead of the {} machine type {} requires: the peer carries no more{}",
                q.carried,
                q.required,
                machine.name,
                q.why.as_deref().map(|w| format!(" ({w})")).unwrap_or_default()
            );
        }
        for b in bits(dropped) {
            let why = peer
                .why_not
                .get(&b)
                .cloned()
                .unwrap_or_else(|| "it depends on a dropped feature".into());
            tracing::warn!(
                "{device}: dropping {} (bit {b}), which machine type {} requires: {why}",
                features::name_of(b),
                machine.name
            );
        }
        let lacks = describe(dropped)
            .split(", ")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .chain(queue_text)
            .collect::<Vec<_>>()
            .join(", ");
        return Ok(NetAbiDecision {
            required,
            offered: required & !dropped,
            required_queue_pairs: required_pairs,
            queue_pairs: required_pairs.min(peer.max_queue_pairs),
            strict,
            dropped,
            blocker: Some(format!(
                "{device}: strict=off and the peer ({}) lacks {lacks}: the guest does not see the ABI of machine type {}",
                peer.name,
                machine.name
            )),
        });
    }
    let override_features: Vec<String> = bits(dropped).map(features::name_of).collect();
    let mut override_props: Vec<String> = override_features
        .iter()
        .map(|n| format!("{n}=off"))
        .collect();
    if let Some(q) = &queue_gap {
        override_props.push(format!("queues={}", q.carried));
    }
    let machine_remedy = MACHINE_TYPES.iter().rev().find_map(|m| {
        let req = required_features(device, m, overrides).ok()?;
        let pairs = required_queue_pairs(device, m, req, queues).ok()?;
        (req & !peer.supported == 0 && pairs <= peer.max_queue_pairs).then_some(m.name)
    });
    Err(NetAbiError::Strict(Box::new(StrictRefusal {
        device: device.into(),
        peer: peer.name.clone(),
        machine: machine.name,
        missing: bits(missing)
            .map(|b| (b, features::name_of(b), peer.why_not.get(&b).cloned()))
            .collect(),
        queues: queue_gap,
        override_spec: spec_with(spec_text, &override_props),
        override_features,
        machine_remedy,
        strict_off_spec: spec_with(spec_text, &["strict=off".to_string()]),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::machine_types::resolve;

    fn peer(supported_names: &[&str]) -> PeerSupport {
        peer_of(crate::abi::machine_types::bits_of(supported_names))
    }

    fn peer_of(bits: Features) -> PeerSupport {
        let supported = bits | features::always_offered();
        PeerSupport::new("tap", "TAP t0".into(), supported, BTreeMap::new())
    }

    fn no_overrides() -> BTreeMap<String, bool> {
        BTreeMap::new()
    }

    fn refusal(e: NetAbiError) -> StrictRefusal {
        match e {
            NetAbiError::Strict(r) => *r,
            other => panic!("expected a strict refusal, got {other}"),
        }
    }

    #[test]
    fn full_peer_gets_the_machine_abi() {
        let m = resolve("godwit-1.1").unwrap();
        let p = peer_of(m.net_features());
        let d = decide("net0", "tap,ifname=t0", m, &no_overrides(), None, true, &p).unwrap();
        assert_eq!(d.offered, m.net_features());
        assert_eq!(d.blocker, None);
    }

    #[test]
    fn strict_refusal_names_features_and_remedies_that_work() {
        let m11 = resolve("godwit-1.1").unwrap();
        let m10 = resolve("godwit-1.0").unwrap();
        let mut p = peer_of(m10.net_features()); // a kernel without USO
        p.why_not.insert(54, "kernel lacks USO".into());
        let err = refusal(
            decide(
                "net0",
                "tap,ifname=t0",
                m11,
                &no_overrides(),
                None,
                true,
                &p,
            )
            .unwrap_err(),
        );
        let text = err.to_string();
        assert!(
            text.contains("guest_uso4 (bit 54): kernel lacks USO"),
            "{text}"
        );
        assert!(text.contains("host_uso (bit 56)"), "{text}");
        assert_eq!(
            err.override_spec,
            "tap,ifname=t0,guest_uso4=off,guest_uso6=off,host_uso=off"
        );
        assert_eq!(err.machine_remedy, Some("godwit-1.0"));
        assert_eq!(err.strict_off_spec, "tap,ifname=t0,strict=off");
        // Remedy 1 pasted: the overrides make it start.
        let spec: crate::config::net_spec::NetSpec = err.override_spec.parse().unwrap();
        assert!(decide(
            "net0",
            &err.override_spec,
            m11,
            &spec.features,
            spec.queues,
            true,
            &p
        )
        .is_ok());
        // Remedy 2 pasted.
        assert!(decide(
            "net0",
            "tap,ifname=t0",
            m10,
            &no_overrides(),
            None,
            true,
            &p
        )
        .is_ok());
    }

    /// A TAP on a kernel older than 6.17 (probed: TUNSETOFFLOAD refuses
    /// TUN_F_UDP_TUNNEL_GSO, everything else accepted): godwit-1.2 is
    /// refused naming the four tunnel bits, with remedies that work; strict
    /// off drops them and blocks migration.
    #[test]
    fn a_tap_whose_kernel_lacks_tunnel_gso_refuses_godwit_1_2_with_remedies() {
        let caps = godwit_devices::net::TapOffloads {
            udp_tunnel: false,
            udp_tunnel_csum: false,
            ..godwit_devices::net::TapOffloads::all()
        };
        let p = crate::devices::net::tap_support("t0", &caps);
        let m12 = resolve("godwit-1.2").unwrap();
        let err = refusal(
            decide(
                "net0",
                "tap,ifname=t0",
                m12,
                &no_overrides(),
                None,
                true,
                &p,
            )
            .unwrap_err(),
        );
        let text = err.to_string();
        for (name, bit) in [
            ("guest_tunnel", 65),
            ("guest_tunnel_csum", 66),
            ("host_tunnel", 67),
            ("host_tunnel_csum", 68),
        ] {
            assert!(text.contains(&format!("{name} (bit {bit})")), "{text}");
        }
        assert!(text.contains("TUN_F_UDP_TUNNEL_GSO"), "{text}");
        assert_eq!(
            err.override_spec,
            "tap,ifname=t0,guest_tunnel=off,guest_tunnel_csum=off,host_tunnel=off,host_tunnel_csum=off"
        );
        assert_eq!(err.machine_remedy, Some("godwit-1.1"));
        let spec: crate::config::net_spec::NetSpec = err.override_spec.parse().unwrap();
        assert!(decide(
            "net0",
            &err.override_spec,
            m12,
            &spec.features,
            None,
            true,
            &p
        )
        .is_ok());
        let m11 = resolve("godwit-1.1").unwrap();
        assert!(decide(
            "net0",
            "tap,ifname=t0",
            m11,
            &no_overrides(),
            None,
            true,
            &p
        )
        .is_ok());
        let off = decide(
            "net0",
            "tap,ifname=t0",
            m12,
            &no_overrides(),
            None,
            false,
            &p,
        )
        .unwrap();
        assert_eq!(
            off.offered,
            m12.net_features() & !crate::abi::machine_types::bits_of(features::groups::UDP_TUNNEL)
        );
        assert!(off.blocker.is_some());
        // The kernel of this machine (6.18) takes them: nothing refused.
        let new = godwit_devices::net::TapOffloads::all();
        let p = crate::devices::net::tap_support("t0", &new);
        let d = decide(
            "net0",
            "tap,ifname=t0",
            m12,
            &no_overrides(),
            None,
            true,
            &p,
        )
        .unwrap();
        assert_eq!(d.offered, m12.net_features());
    }

    #[test]
    fn dependents_are_dropped_with_what_they_need() {
        let m = resolve("godwit-1.1").unwrap();
        // A TAP without vnet header: nothing of the offloads remains.
        let p = peer(&[
            "mtu",
            "mac",
            "mrg_rxbuf",
            "status",
            "ctrl_vq",
            "ctrl_rx",
            "guest_announce",
            "indirect_desc",
            "event_idx",
        ]);
        let err = refusal(
            decide("net0", "tap,ifname=t0", m, &no_overrides(), None, true, &p).unwrap_err(),
        );
        for name in [
            "csum",
            "guest_csum",
            "guest_tso4",
            "guest_ecn",
            "host_ecn",
            "host_uso",
        ] {
            assert!(
                err.override_features.iter().any(|n| n == name),
                "{name}: {:?}",
                err.override_features
            );
        }
        assert_eq!(err.machine_remedy, None);
        let spec: crate::config::net_spec::NetSpec = err.override_spec.parse().unwrap();
        let d = decide(
            "net0",
            &err.override_spec,
            m,
            &spec.features,
            spec.queues,
            true,
            &p,
        )
        .unwrap();
        assert_eq!(d.offered & !p.supported, 0);
    }

    #[test]
    fn strict_off_drops_warns_and_blocks() {
        let m = resolve("godwit-1.1").unwrap();
        let p = peer_of(resolve("godwit-1.0").unwrap().net_features());
        let d = decide("net0", "tap,ifname=t0", m, &no_overrides(), None, false, &p).unwrap();
        assert_eq!(
            d.dropped,
            crate::abi::machine_types::bits_of(&["guest_uso4", "guest_uso6", "host_uso"])
        );
        let blocker = d.blocker.unwrap();
        assert!(
            blocker.contains("guest_uso4 (bit 54)") && blocker.contains("net0"),
            "{blocker}"
        );
        // strict=off always blocks, even with nothing to drop.
        let full = peer_of(m.net_features());
        assert!(decide(
            "net0",
            "tap,ifname=t0",
            m,
            &no_overrides(),
            None,
            false,
            &full
        )
        .unwrap()
        .blocker
        .is_some());
    }

    /// godwit-1.2 requires 2 queue pairs: a single-queue peer is refused
    /// naming the count, with remedies that work when pasted.
    #[test]
    fn single_queue_peer_is_refused_naming_the_queue_count() {
        let m12 = resolve("godwit-1.2").unwrap();
        let p = peer_of(m12.net_features()).with_queue_limit(
            1,
            "TAP t0 is a single-queue TAP (created without multi_queue)",
        );
        let err = refusal(
            decide(
                "net0",
                "tap,ifname=t0",
                m12,
                &no_overrides(),
                None,
                true,
                &p,
            )
            .unwrap_err(),
        );
        let text = err.to_string();
        assert!(
            text.contains("lacks queue pairs that machine type godwit-1.2 requires")
                && text.contains(
                    "2 queue pairs required, the peer carries 1: TAP t0 is a single-queue TAP"
                ),
            "{text}"
        );
        assert_eq!(err.override_spec, "tap,ifname=t0,queues=1");
        assert_eq!(err.machine_remedy, Some("godwit-1.1"));
        assert!(text.contains("--net tap,ifname=t0,queues=1"), "{text}");
        assert!(text.contains("--machine godwit-1.1"), "{text}");
        assert!(text.contains("--net tap,ifname=t0,strict=off"), "{text}");
        // Each remedy pasted works.
        let spec: crate::config::net_spec::NetSpec = err.override_spec.parse().unwrap();
        let d = decide(
            "net0",
            &err.override_spec,
            m12,
            &spec.features,
            spec.queues,
            true,
            &p,
        )
        .unwrap();
        assert_eq!((d.queue_pairs, d.offered), (1, m12.net_features()));
        let m11 = resolve("godwit-1.1").unwrap();
        let d = decide(
            "net0",
            "tap,ifname=t0",
            m11,
            &no_overrides(),
            None,
            true,
            &p,
        )
        .unwrap();
        assert_eq!(d.queue_pairs, 1);
        let d = decide(
            "net0",
            "tap,ifname=t0",
            m12,
            &no_overrides(),
            None,
            false,
            &p,
        )
        .unwrap();
        assert_eq!((d.required_queue_pairs, d.queue_pairs), (2, 1));
        let blocker = d.blocker.unwrap();
        assert!(blocker.contains("1 of the 2 queue pairs"), "{blocker}");
        // A multi-queue peer gets the type's two, or what queues= asks.
        let full = peer_of(m12.net_features());
        let d = decide(
            "net0",
            "tap,ifname=t0",
            m12,
            &no_overrides(),
            None,
            true,
            &full,
        )
        .unwrap();
        assert_eq!((d.queue_pairs, d.blocker), (2, None));
        let d = decide("net0", "t", m12, &no_overrides(), Some(4), true, &full).unwrap();
        assert_eq!(d.queue_pairs, 4);
        // queues= beyond one needs mq.
        let e = decide("net0", "t", m11, &no_overrides(), Some(2), true, &full).unwrap_err();
        assert!(e.to_string().contains("queues=2 needs multi-queue"), "{e}");
        let mut mq = BTreeMap::new();
        mq.insert("mq".to_string(), true);
        let d = decide("net0", "t", m11, &mq, Some(2), true, &full).unwrap();
        assert_eq!(d.queue_pairs, 2);
        let mut off = BTreeMap::new();
        off.insert("mq".to_string(), false);
        let d = decide("net0", "t", m12, &off, None, true, &p).unwrap();
        assert_eq!(
            d.queue_pairs, 1,
            "mq=off is one pair, whatever the type says"
        );
    }

    #[test]
    fn configuration_errors_name_both_properties() {
        let m = resolve("godwit-1.1").unwrap();
        let mut o = BTreeMap::new();
        o.insert("guest_csum".to_string(), false);
        let err = required_features("net0", m, &o).unwrap_err().to_string();
        assert!(
            err.contains("guest_csum=off conflicts with guest_"),
            "{err}"
        );
        let mut o = BTreeMap::new();
        o.insert("host_tso4".to_string(), false);
        o.insert("host_tso6".to_string(), false);
        let err = required_features("net0", m, &o).unwrap_err().to_string();
        assert!(
            err.contains("host_ecn=on") && err.contains("host_tso4"),
            "{err}"
        );
        let mut o = BTreeMap::new();
        o.insert("frobnicate".to_string(), true);
        let err = required_features("net0", m, &o).unwrap_err().to_string();
        assert!(
            err.contains("unknown property 'frobnicate'") && err.contains("host_uso"),
            "{err}"
        );
        let mut o = BTreeMap::new();
        o.insert("packed".to_string(), true);
        assert!(matches!(
            required_features("net0", m, &o),
            Err(NetConfigError::Unimplemented { .. })
        ));
        let mut o = BTreeMap::new();
        o.insert("version_1".to_string(), false);
        assert!(matches!(
            required_features("net0", m, &o),
            Err(NetConfigError::Version1Off { .. })
        ));
    }
}
