//! Opening a `--net` peer on this host and probing what it carries: a TAP
//! (its vnet header and offloads), kernel vhost-net (the kernel's ring
//! features, the TAP's packet features), a vhost-user backend (the
//! handshake, its interface version). The same for boot, restore and
//! incoming migration.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use godwit_devices::net::tap::{Tap, TapError, TapOffloads, VnetHdr};
use godwit_devices::vhost_net::VHOST_NET_PATH;
use godwit_devices::vhost_user::interface::{
    self, by_interface_name, InterfaceValues, InterfaceVersion,
};
use godwit_devices::vhost_user::{
    backend_bits, handshake, BackendOffer, Endpoint, Recheck, Rechecker, Session,
};
use godwit_devices::virtio::feature;
use godwit_devices::virtio::net::features::{self, Features, NetFeature, VhostNeed, FEATURES};
use godwit_devices::virtio::net::MAX_QUEUE_PAIRS;

use super::NetSetupError;
use crate::abi::machine_types::MachineType;
use crate::abi::strict::{self, PeerSupport};
use crate::config::net_spec::{NetSpec, PeerSpec};

/// Why a TAP lacks the features it lacks.
pub fn tap_support(tap_name: &str, caps: &TapOffloads) -> PeerSupport {
    let mut supported: Features = 0;
    let mut why_not = BTreeMap::new();
    for f in FEATURES.iter().filter(|f| f.supported) {
        if f.tap.satisfied_by(caps) {
            supported |= feature(f.bit);
            continue;
        }
        let why = if !caps.vnet_hdr {
            format!("TAP {tap_name} carries no virtio-net header (vnet_hdr=off, or its fd was opened without IFF_VNET_HDR), so no offload can pass")
        } else if f.name.contains("uso") {
            "this kernel's TAP does not accept USO offloads (TUN_F_USO4|TUN_F_USO6 need Linux >= 6.2)".to_string()
        } else if f.name.contains("tunnel") {
            "this kernel's TAP does not accept UDP tunnel GSO (TUN_F_UDP_TUNNEL_GSO|TUN_F_UDP_TUNNEL_GSO_CSUM need Linux >= 6.17)".to_string()
        } else {
            format!(
                "this kernel's TAP does not accept the offload {} needs",
                f.name
            )
        };
        why_not.insert(f.bit, why);
    }
    PeerSupport::new("tap", format!("TAP {tap_name}"), supported, why_not)
}

/// The queues of a TAP opened for a device, and what limits their number.
pub struct OpenedTap {
    pub queues: Vec<Tap>,
    /// Set when the TAP carries no more queue pairs than were opened: the
    /// count and why (a single-queue TAP, the descriptors given).
    pub limit: Option<(u16, String)>,
}

impl OpenedTap {
    /// What this TAP carries: its offloads (probed on its first queue) and
    /// its queue pairs.
    pub fn support(&self) -> PeerSupport {
        let tap = &self.queues[0];
        with_tap_limit(
            tap_support(tap.name(), &tap.probe_offloads()),
            self.limit.as_ref(),
        )
    }
}

/// `support` carrying no more queue pairs than its TAP has queues for
/// (see [`OpenedTap::limit`]): a TAP peer's, or kernel vhost-net's, which
/// serves each pair from its own TAP queue.
fn with_tap_limit(support: PeerSupport, limit: Option<&(u16, String)>) -> PeerSupport {
    match limit {
        Some((pairs, why)) => support.with_queue_limit(*pairs, why.clone()),
        None => support,
    }
}

fn vnet_hdr_mode(v: Option<bool>) -> VnetHdr {
    match v {
        Some(true) => VnetHdr::On,
        Some(false) => VnetHdr::Off,
        None => VnetHdr::Auto,
    }
}

/// Opens `pairs` queues of TAP `name`, or the only one of a single-queue
/// TAP (the limit says so, and strict then refuses naming the count).
fn open_named_tap(
    device: &str,
    name: &str,
    mode: VnetHdr,
    pairs: u16,
) -> Result<OpenedTap, NetSetupError> {
    let tap_err = |source| NetSetupError::Tap {
        device: device.to_string(),
        source,
    };
    match Tap::open_queues(name, mode, pairs.max(1)) {
        Ok(queues) => Ok(OpenedTap {
            queues,
            limit: None,
        }),
        Err(TapError::SingleQueue { name, .. }) => Ok(OpenedTap {
            queues: vec![Tap::open(&name, mode).map_err(tap_err)?],
            limit: Some((
                1,
                format!(
                    "TAP {name} is a single-queue TAP (created without multi_queue); a multi-queue TAP carries one pair per queue (ip tuntap add {name} mode tap multi_queue vnet_hdr)"
                ),
            )),
        }),
        Err(e) => Err(tap_err(e)),
    }
}

/// Opens the TAP a spec names with `pairs` queues (one, the only one, of
/// a single-queue TAP: the limit says so), or adopts its descriptors.
pub fn open_tap(device: &str, spec: &NetSpec, pairs: u16) -> Result<OpenedTap, NetSetupError> {
    let tap_err = |source| NetSetupError::Tap {
        device: device.to_string(),
        source,
    };
    match &spec.peer {
        PeerSpec::Tap {
            ifname: Some(name),
            vnet_hdr,
            ..
        } => open_named_tap(device, name, vnet_hdr_mode(*vnet_hdr), pairs),
        PeerSpec::Tap { fds, vnet_hdr, .. } if !fds.is_empty() => {
            let mut owned = Vec::with_capacity(fds.len());
            for fd in fds {
                // SAFETY: the fd number was handed to godwit by its parent
                // for this device; validity is checked (F_GETFD) before it
                // is owned.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(tap_err(TapError::NotATap {
                        fd: *fd,
                        detail: "no such open file descriptor".into(),
                    }));
                }
                // SAFETY: checked open above; godwit takes ownership of it
                // here, as the management layer that passed it intends.
                owned.push(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
            let queues = Tap::from_fds(owned, vnet_hdr_mode(*vnet_hdr)).map_err(tap_err)?;
            let n = u16::try_from(queues.len()).unwrap_or(u16::MAX);
            Ok(OpenedTap {
                queues,
                limit: Some((
                    n,
                    format!("{n} TAP descriptor(s) were handed in (fd=/fds=), one per queue pair"),
                )),
            })
        }
        PeerSpec::Tap { .. } => Err(NetSetupError::PeerUnavailable {
            device: device.to_string(),
            kind: "tap",
        }),
        PeerSpec::VhostNet { ifname } => Err(if std::path::Path::new("/dev/vhost-net").exists() {
            NetSetupError::PeerUnavailable {
                device: device.to_string(),
                kind: "vhost-net",
            }
        } else {
            NetSetupError::NoVhostNet {
                device: device.to_string(),
                ifname: ifname.clone(),
            }
        }),
        PeerSpec::VhostUser { .. } => Err(NetSetupError::PeerUnavailable {
            device: device.to_string(),
            kind: "vhost-user",
        }),
    }
}

/// How long godwit waits for each vhost-user reply.
pub const VHOST_USER_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up waits, with server=on, for the backend to connect.
pub const VHOST_USER_ACCEPT_WAIT: Duration = Duration::from_secs(30);
/// How long start-up retries connecting to a backend that is not listening
/// yet (it may be starting too).
pub const VHOST_USER_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Queue pairs a vhost-user backend carries: GET_QUEUE_NUM (virtio-net
/// backends count pairs there: QEMU compares its `queues=` with it, DPDK
/// answers its `queues=`), 1 without protocol feature MQ, and no more than
/// its interface record has.
pub fn vhost_user_pairs(offer: &BackendOffer) -> u16 {
    let pairs = offer.queue_num.unwrap_or(1).min(u64::from(MAX_QUEUE_PAIRS));
    let pairs = u16::try_from(pairs).unwrap_or(MAX_QUEUE_PAIRS).max(1);
    match &offer.record {
        Some(r) => pairs.min(r.values.queue_pairs.max(1)),
        None => pairs,
    }
}

/// Why a vhost-user backend lacks the features it lacks, and how many
/// queue pairs it carries.
pub fn vhost_user_support(socket: &str, offer: &BackendOffer) -> PeerSupport {
    let pairs = vhost_user_pairs(offer);
    let how_many = || match (&offer.record, offer.queue_num) {
        (Some(r), Some(q)) if u64::from(r.values.queue_pairs) < q => format!(
            "its interface {} has {} queue pair(s)",
            r.active, r.values.queue_pairs
        ),
        (_, Some(q)) => format!("it has {q} queue pair(s) (GET_QUEUE_NUM)"),
        (_, None) => "it lacks protocol feature MQ: one queue pair".to_string(),
    };
    let lacks = |f: &NetFeature| {
        match f.vhost {
            VhostNeed::Frontend => None,
            VhostNeed::QueuePairs => (pairs < 2).then(|| {
                format!("vhost-user backend {socket}: {}", how_many())
            }),
            // GET_FEATURES is one 64-bit word: vhost-user has no standard
            // message for bits 64 and up, so no backend carries them.
            VhostNeed::Ring | VhostNeed::Packet if f.bit >= 64 => Some(format!(
                "vhost-user backend {socket} cannot carry {} (bit {}): vhost-user's GET_FEATURES/SET_FEATURES carry bits 0-63 only",
                f.name, f.bit
            )),
            VhostNeed::Ring | VhostNeed::Packet => (Features::from(offer.features) & feature(f.bit) == 0).then(|| {
                match &offer.record {
                    Some(r) => format!(
                        "vhost-user backend {socket} presents interface {}, which does not include {} (its GET_FEATURES = {:#x})",
                        r.active, f.name, offer.features
                    ),
                    None => format!(
                        "vhost-user backend {socket} does not offer {} (its GET_FEATURES = {:#x})",
                        f.name, offer.features
                    ),
                }
            }),
    }
    };
    support_by("vhost-user", format!("vhost-user backend {socket}"), lacks).with_queue_limit(
        pairs,
        format!("vhost-user backend {socket}: {}", how_many()),
    )
}

/// Why kernel vhost-net on a TAP lacks the features it lacks: ring features
/// come from `/dev/vhost-net`, packet features from the TAP's offloads.
/// It carries as many queue pairs as the TAP has queues (one
/// `/dev/vhost-net` per pair, each on its own TAP queue): `queue_limit` is
/// the TAP's (see [`OpenedTap::limit`]).
pub fn vhost_net_support(
    tap_name: &str,
    caps: &TapOffloads,
    kernel: Features,
    queue_limit: Option<&(u16, String)>,
) -> PeerSupport {
    let tap = tap_support(tap_name, caps);
    let lacks = |f: &NetFeature| {
        match f.vhost {
        VhostNeed::Frontend | VhostNeed::QueuePairs => None,
        // Bits 64 and up reach the kernel only through
        // VHOST_GET/SET_FEATURES_ARRAY: the kernel must offer them there
        // (and the TAP carry them).
        VhostNeed::Packet if f.bit >= 64 && kernel & feature(f.bit) == 0 => Some(format!(
            "{} does not offer {} (bit {}; VHOST_GET_FEATURES_ARRAY = {kernel:#x}: a kernel without the features array, or older than Linux 6.17)",
            godwit_devices::vhost_net::VHOST_NET_PATH,
            f.name,
            f.bit
        )),
        VhostNeed::Ring => (kernel & feature(f.bit) == 0).then(|| {
            format!(
                "{} does not offer {} (VHOST_GET_FEATURES = {kernel:#x})",
                godwit_devices::vhost_net::VHOST_NET_PATH,
                f.name
            )
        }),
        VhostNeed::Packet => tap.why_not.get(&f.bit).cloned(),
    }
    };
    with_tap_limit(
        support_by("vhost-net", format!("vhost-net on TAP {tap_name}"), lacks),
        queue_limit,
    )
}

/// A peer's support: every feature godwit implements that `lacks` finds
/// no reason against.
fn support_by(
    kind: &'static str,
    name: String,
    lacks: impl Fn(&NetFeature) -> Option<String>,
) -> PeerSupport {
    let mut supported: Features = 0;
    let mut why_not = BTreeMap::new();
    for f in FEATURES.iter().filter(|f| f.supported) {
        match lacks(f) {
            None => supported |= feature(f.bit),
            Some(why) => {
                why_not.insert(f.bit, why);
            }
        }
    }
    PeerSupport::new(kind, name, supported, why_not)
}

/// The values of the interface version `name` (godwit's table, else the
/// backend's record).
pub(super) fn interface_values(name: &str, offer: &BackendOffer) -> Option<InterfaceValues> {
    by_interface_name(name)
        .map(InterfaceVersion::values)
        .or_else(|| offer.record.as_ref().map(|r| r.values))
}

/// A pinned interface version that neither godwit nor the backend knows.
#[derive(Debug, thiserror::Error)]
#[error("interface {name} is not one godwit knows (known: {known}), and vhost-user backend {socket} cannot be asked about it (it lacks godwit's interface-version extension)")]
pub struct UnknownInterface {
    pub name: String,
    pub known: String,
    pub socket: String,
}

/// Checks a pinned interface version against a backend without godwit's
/// extension (DPDK): its features and queue count against what the backend
/// offers. Returns what it lacks, one line each.
pub(super) fn interface_gaps(
    name: &str,
    offer: &BackendOffer,
    socket: &str,
) -> Result<Vec<String>, UnknownInterface> {
    let Some(values) = interface_values(name, offer) else {
        return Err(UnknownInterface {
            name: name.to_string(),
            known: interface::names().join(", "),
            socket: socket.to_string(),
        });
    };
    let mut gaps = Vec::new();
    let need = Features::from(values.features) & backend_bits();
    let missing = need & !Features::from(offer.features);
    if missing != 0 {
        gaps.push(format!(
            "its GET_FEATURES ({:#x}) lacks {} of interface {name}",
            offer.features,
            features::names(missing)
        ));
    }
    let pairs = offer.queue_num.unwrap_or(1);
    if pairs < u64::from(values.queue_pairs) {
        gaps.push(format!(
            "it has {pairs} queue pair(s) (GET_QUEUE_NUM{}); interface {name} has {}",
            if offer.queue_num.is_none() {
                ": it lacks protocol feature MQ"
            } else {
                ""
            },
            values.queue_pairs
        ));
    }
    Ok(gaps)
}

/// A vhost-user backend, connected and asked what it offers.
pub struct VhostUserPeer {
    pub session: Session,
    pub endpoint: Endpoint,
    pub socket: String,
}

/// Connects to (or, with server=on, waits for) the backend of a
/// `--net vhost-user` spec, pinning its interface when one is given.
pub fn open_vhost_user(
    device: &str,
    socket: &std::path::Path,
    server: bool,
    pin: Option<&str>,
) -> Result<VhostUserPeer, NetSetupError> {
    let err = |source| NetSetupError::VhostUser {
        device: device.to_string(),
        source,
    };
    let endpoint = if server {
        Endpoint::listen(socket).map_err(err)?
    } else {
        Endpoint::client(socket)
    };
    let wait = if server {
        VHOST_USER_ACCEPT_WAIT
    } else {
        VHOST_USER_CONNECT_WAIT
    };
    let conn = endpoint
        .establish(wait, VHOST_USER_REPLY_TIMEOUT)
        .map_err(err)?;
    let session = handshake(conn, pin).map_err(err)?;
    tracing::info!(
        "{device}: vhost-user backend {}: {}",
        socket.display(),
        session.offer.describe()
    );
    Ok(VhostUserPeer {
        session,
        endpoint,
        socket: socket.display().to_string(),
    })
}

fn bits_of_set(set: Features) -> impl Iterator<Item = u32> {
    features::bits(set)
}

/// Decides what a returning backend may do (see [`Recheck`]) for a device
/// of `pairs` queue pairs: a backend with fewer pairs lacks `mq` as far as
/// this device is concerned (without it the driver uses one pair).
pub fn rechecker(
    id: String,
    machine: &'static MachineType,
    socket: String,
    pin: Option<String>,
    strict: bool,
    pairs: u16,
) -> Rechecker {
    Box::new(move |offer: &BackendOffer, offered: Features| {
        let mut peer = vhost_user_support(&socket, offer);
        let mq = features::by_name("mq").map(|f| f.bit);
        if let (Some(bit), true) = (mq, peer.max_queue_pairs < pairs) {
            if peer.supported & feature(bit) != 0 {
                peer.supported &= !feature(bit);
                peer.why_not.insert(
                    bit,
                    format!(
                        "the device has {pairs} queue pairs; {}",
                        peer.queue_why.clone().unwrap_or_default()
                    ),
                );
            }
        }
        let missing = offered & !peer.supported;
        let mut lines: Vec<String> = bits_of_set(missing)
            .map(|b| {
                format!(
                    "{} (bit {b}): {}",
                    features::name_of(b),
                    peer.why_not.get(&b).cloned().unwrap_or_default()
                )
            })
            .collect();
        if let (Some(name), None) = (&pin, &offer.record) {
            match interface_gaps(name, offer, &socket) {
                Ok(gaps) => lines.extend(gaps),
                Err(e) => lines.push(e.to_string()),
            }
        }
        if lines.is_empty() {
            return Recheck::Accept;
        }
        if strict {
            return Recheck::Refuse(format!(
                "{id}: the vhost-user backend came back on {socket} without what the guest was offered, and strict=on: {}. The link stays down; start a backend that offers them (the same version, or interface={}), or restart the VM with --machine/feature overrides this backend supports (godwit probe --net vhost-user,socket={socket} lists them)",
                lines.join("; "),
                pin.as_deref().unwrap_or("NAME")
            ));
        }
        let dropped = strict::with_dependents(offered, missing);
        Recheck::Degrade {
            offered: offered & !dropped,
            blocker: format!(
                "{id}: strict=off and the vhost-user backend came back on {socket} with less ({}): the guest no longer sees the ABI of machine type {}",
                lines.join("; "),
                machine.name
            ),
        }
    })
}

/// A peer opened on this host, before its device is built.
pub enum OpenedPeer {
    /// A TAP godwit's own datapath serves: one queue per queue pair.
    Tap(Vec<Tap>),
    /// A TAP (with vnet header) kernel vhost-net serves, one queue per
    /// queue pair; `/dev/vhost-net` is opened (once per queue) when the
    /// device is built, with the guest's memory.
    VhostNet(Vec<Tap>),
    /// A connected vhost-user backend (boxed: it is far larger than the
    /// TAP queues of the other kinds).
    VhostUser(Box<VhostUserPeer>),
}

/// Opens the peer a spec names, for `pairs` queue pairs, and says what it
/// carries. `interface` is the interface version to pin on a vhost-user
/// backend when the spec names none (a restored or migrating device keeps
/// the one it had).
pub fn open_peer(
    device: &str,
    spec: &NetSpec,
    interface: Option<&str>,
    pairs: u16,
) -> Result<(OpenedPeer, PeerSupport), NetSetupError> {
    match &spec.peer {
        PeerSpec::Tap { .. } => {
            let tap = open_tap(device, spec, pairs)?;
            let support = tap.support();
            Ok((OpenedPeer::Tap(tap.queues), support))
        }
        PeerSpec::VhostNet { ifname } => {
            if !std::path::Path::new(VHOST_NET_PATH).exists() {
                return Err(NetSetupError::NoVhostNet {
                    device: device.to_string(),
                    ifname: ifname.clone(),
                });
            }
            let tap = open_named_tap(device, ifname, VnetHdr::On, pairs)?;
            let kernel = godwit_devices::vhost_net::probe_features().map_err(|source| {
                NetSetupError::VhostNet {
                    device: device.to_string(),
                    source,
                }
            })?;
            let first = &tap.queues[0];
            let support = vhost_net_support(
                first.name(),
                &first.probe_offloads(),
                kernel,
                tap.limit.as_ref(),
            );
            Ok((OpenedPeer::VhostNet(tap.queues), support))
        }
        PeerSpec::VhostUser {
            socket,
            server,
            interface: given,
        } => {
            let pin = given.as_deref().or(interface);
            let peer = open_vhost_user(device, socket, *server, pin)?;
            let support = vhost_user_support(&peer.socket, &peer.session.offer);
            Ok((OpenedPeer::VhostUser(Box::new(peer)), support))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::machine_types::{bits_of, resolve};

    /// DPDK testpmd 22.11's GET_FEATURES.
    const DPDK: u64 = 0xd_7c66_e7cb;

    fn dpdk_offer() -> BackendOffer {
        BackendOffer {
            features: DPDK,
            protocol: 0x10cbf,
            acked_protocol: 0x1f,
            queue_num: Some(128),
            record: None,
        }
    }

    #[test]
    fn vhost_user_support_names_what_the_backend_lacks() {
        let offer = dpdk_offer();
        let p = vhost_user_support("/s", &offer);
        assert_eq!(p.kind, "vhost-user");
        for lacking in [
            "host_tso4",
            "host_tso6",
            "guest_uso4",
            "guest_uso6",
            "host_uso",
        ] {
            let bit = features::by_name(lacking).unwrap().bit;
            assert_eq!(p.supported & (1 << bit), 0, "{lacking}");
            assert_eq!(
                p.why_not[&bit],
                format!("vhost-user backend /s does not offer {lacking} (its GET_FEATURES = 0xd7c66e7cb)")
            );
        }
        // Served by godwit whatever the backend says.
        let frontend = bits_of(&[
            "mac",
            "status",
            "ctrl_vq",
            "ctrl_rx",
            "guest_announce",
            "mtu",
        ]);
        let mut without = dpdk_offer();
        without.features &= !godwit_devices::virtio::low64(frontend);
        assert_eq!(
            vhost_user_support("/s", &without).supported & frontend,
            frontend
        );
        // GET_QUEUE_NUM counts queue pairs: DPDK's 128 carry the most a
        // device has; one pair cannot carry mq.
        assert_eq!(p.max_queue_pairs, MAX_QUEUE_PAIRS);
        without.queue_num = Some(1);
        let mq = features::by_name("mq").unwrap().bit;
        let one = vhost_user_support("/s", &without);
        assert_eq!(one.max_queue_pairs, 1);
        assert_eq!(
            one.why_not[&mq],
            "vhost-user backend /s: it has 1 queue pair(s) (GET_QUEUE_NUM)"
        );
        without.queue_num = None;
        assert!(
            vhost_user_support("/s", &without).why_not[&mq].contains("lacks protocol feature MQ")
        );
        // godwit-1.0 against DPDK: only host TSO (and ECN with it) missing.
        let m = resolve("godwit-1.0").unwrap();
        let d = strict::decide(
            "net0",
            "vhost-user,socket=/s",
            m,
            &BTreeMap::new(),
            None,
            false,
            &p,
        )
        .unwrap();
        assert_eq!(d.dropped, bits_of(&["host_tso4", "host_tso6", "host_ecn"]));
    }

    #[test]
    fn vhost_net_support_takes_rings_from_the_kernel_and_packets_from_the_tap() {
        let caps = TapOffloads {
            uso: false,
            ..TapOffloads::all()
        };
        let kernel = bits_of(&["mrg_rxbuf", "version_1", "event_idx"]) | (1 << 26);
        let p = vhost_net_support("t0", &caps, kernel, None);
        let has = |n: &str| p.supported & feature(features::by_name(n).unwrap().bit) != 0;
        assert!(has("mrg_rxbuf") && has("event_idx") && has("csum") && has("host_tso4"));
        assert!(has("ctrl_vq") && has("mac"));
        assert!(!has("indirect_desc"), "the kernel did not offer it");
        assert!(!has("host_uso"), "the TAP lacks USO");
        let bit = features::by_name("indirect_desc").unwrap().bit;
        assert!(p.why_not[&bit].contains("/dev/vhost-net does not offer indirect_desc"));
        // The TAP takes tunnel offloads, but a kernel whose vhost-net offers
        // nothing above bit 63 (no VHOST_GET_FEATURES_ARRAY) cannot carry
        // them; one that offers them there can.
        assert!(!has("guest_tunnel") && !has("host_tunnel_csum"));
        let bit = features::by_name("host_tunnel").unwrap().bit;
        assert!(
            p.why_not[&bit].contains("VHOST_GET_FEATURES_ARRAY"),
            "{}",
            p.why_not[&bit]
        );
        let tunnel = bits_of(&[
            "guest_tunnel",
            "guest_tunnel_csum",
            "host_tunnel",
            "host_tunnel_csum",
        ]);
        let p = vhost_net_support("t0", &caps, kernel | tunnel, None);
        assert_eq!(p.supported & tunnel, tunnel);
    }

    /// vhost-net serves each pair from its own TAP queue: it carries as
    /// many pairs as the TAP (a multi-queue TAP as many as a device has, a
    /// single-queue TAP one, for the TAP's reason), and strict refuses more
    /// naming the count.
    #[test]
    fn vhost_net_support_carries_the_taps_queue_limit() {
        let kernel = bits_of(&["mrg_rxbuf", "version_1"]);
        let multi = vhost_net_support("t0", &TapOffloads::all(), kernel, None);
        assert_eq!(multi.max_queue_pairs, MAX_QUEUE_PAIRS);
        assert_eq!(multi.queue_why, None);
        let why = "TAP t0 is a single-queue TAP (created without multi_queue)".to_string();
        let single = vhost_net_support("t0", &TapOffloads::all(), kernel, Some(&(1, why.clone())));
        assert_eq!(single.max_queue_pairs, 1);
        assert_eq!(single.queue_why.as_deref(), Some(why.as_str()));
        // The same limit as the TAP peer's for the same TAP.
        let tap = with_tap_limit(
            tap_support("t0", &TapOffloads::all()),
            Some(&(1, why.clone())),
        );
        assert_eq!(
            (tap.max_queue_pairs, tap.queue_why),
            (single.max_queue_pairs, single.queue_why.clone())
        );
        let m = resolve("godwit-1.2").unwrap();
        let refusal = strict::decide(
            "net0",
            "vhost-net,ifname=t0,queues=2",
            m,
            &BTreeMap::new(),
            Some(2),
            true,
            &single,
        )
        .unwrap_err()
        .to_string();
        assert!(refusal.contains("queues=1"), "{refusal}");
        assert!(refusal.contains(&why), "{refusal}");
    }

    /// vhost-user's GET_FEATURES is 64 bits wide: no backend carries the
    /// tunnel bits, whatever it says.
    #[test]
    fn vhost_user_backends_lack_every_bit_above_63() {
        let mut offer = dpdk_offer();
        offer.features = u64::MAX;
        let p = vhost_user_support("/s", &offer);
        for name in [
            "guest_tunnel",
            "guest_tunnel_csum",
            "host_tunnel",
            "host_tunnel_csum",
        ] {
            let f = features::by_name(name).unwrap();
            assert_eq!(p.supported & feature(f.bit), 0, "{name}");
            assert!(
                p.why_not[&f.bit].contains("bits 0-63 only"),
                "{}",
                p.why_not[&f.bit]
            );
        }
    }

    #[test]
    fn interface_gaps_check_a_backend_without_the_extension() {
        let offer = dpdk_offer();
        let gaps = interface_gaps("org.godwit.net.v1", &offer, "/s").unwrap();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert!(gaps[0].contains("lacks host_tso4,host_tso6"), "{gaps:?}");
        let err = interface_gaps("org.example.v3", &offer, "/s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not one godwit knows") && err.contains("org.godwit.net.v2"));
        let mut few = dpdk_offer();
        few.features |= godwit_devices::virtio::low64(bits_of(&["host_tso4", "host_tso6"]));
        few.queue_num = Some(1);
        // GET_QUEUE_NUM counts pairs: one is v1's, and too few for v3's two.
        let gaps = interface_gaps("org.godwit.net.v1", &few, "/s").unwrap();
        assert!(gaps.is_empty(), "{gaps:?}");
        let gaps = interface_gaps("org.godwit.net.v3", &few, "/s").unwrap();
        assert!(
            gaps.iter().any(|g| g
                .contains("1 queue pair(s) (GET_QUEUE_NUM); interface org.godwit.net.v3 has 2")),
            "{gaps:?}"
        );
        few.queue_num = None;
        let gaps = interface_gaps("org.godwit.net.v3", &few, "/s").unwrap();
        assert!(
            gaps.iter().any(|g| g.contains("lacks protocol feature MQ")),
            "{gaps:?}"
        );
    }

    #[test]
    fn a_returning_backend_is_judged_by_strict() {
        let m = resolve("godwit-1.1").unwrap();
        let full = BackendOffer {
            features: godwit_devices::virtio::low64(m.net_features()) | (1 << 30) | (1 << 26),
            ..dpdk_offer()
        };
        let offered = m.net_features();
        let mut strict = rechecker("net0".into(), m, "/s".into(), None, true, 1);
        assert_eq!(strict(&full, offered), Recheck::Accept);
        let older = BackendOffer {
            features: full.features
                & !godwit_devices::virtio::low64(bits_of(&[
                    "guest_uso4",
                    "guest_uso6",
                    "host_uso",
                ])),
            ..dpdk_offer()
        };
        match strict(&older, offered) {
            Recheck::Refuse(why) => {
                assert!(
                    why.contains("guest_uso4 (bit 54)") && why.contains("strict=on"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut lenient = rechecker("net0".into(), m, "/s".into(), None, false, 1);
        match lenient(&older, offered) {
            Recheck::Degrade {
                offered: o,
                blocker,
            } => {
                assert_eq!(
                    o,
                    offered & !bits_of(&["guest_uso4", "guest_uso6", "host_uso"])
                );
                assert!(blocker.contains("came back") && blocker.contains("godwit-1.1"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A backend that comes back with fewer queue pairs than the device
    /// has: strict=on keeps the link down naming the counts; strict=off
    /// drops mq (the driver renegotiates and uses one pair).
    #[test]
    fn a_returning_backend_with_fewer_pairs_is_judged_by_strict() {
        let m = resolve("godwit-1.1").unwrap();
        let offered = m.net_features() | bits_of(&["mq"]);
        let mut back = BackendOffer {
            features: godwit_devices::virtio::low64(offered) | (1 << 30) | (1 << 26),
            ..dpdk_offer()
        };
        back.queue_num = Some(4);
        let mut strict = rechecker("net0".into(), m, "/s".into(), None, true, 4);
        assert_eq!(strict(&back, offered), Recheck::Accept);
        back.queue_num = Some(2);
        match strict(&back, offered) {
            Recheck::Refuse(why) => assert!(
                why.contains("mq (bit 22): the device has 4 queue pairs")
                    && why.contains("it has 2 queue pair(s) (GET_QUEUE_NUM)"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        let mut lenient = rechecker("net0".into(), m, "/s".into(), None, false, 4);
        match lenient(&back, offered) {
            Recheck::Degrade { offered: o, .. } => assert_eq!(o, offered & !bits_of(&["mq"])),
            other => panic!("{other:?}"),
        }
    }
}
