//! The virtio-net feature bits: one table with, for each bit, its canonical
//! (QEMU property) name, what it needs from a TAP peer, what it needs from a
//! vhost backend (vhost-user, kernel vhost-net), which other bits the spec
//! requires with it, and whether godwit's device model implements it.
//!
//! Everything else — validating a configured feature set, masking it by what
//! a TAP can do, computing the TAP offloads for what a guest acked — is
//! derived from [`FEATURES`], so that a later machine-type table or strict
//! check reads the same facts.
//!
//! Sources: virtio 1.2 section 5.1.3.1, QEMU hw/net/virtio-net.c, Linux
//! drivers/net/tun.c, and shared/reference/virtio-net-features.md.
//! Feature words are 128 bits wide ([`Features`]): the UDP tunnel GSO bits
//! (65-68) live above bit 63, and the transport shows them in its feature
//! select words 2 and 3.

use virtio_bindings::virtio_config::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_ANY_LAYOUT, VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET,
};
use virtio_bindings::virtio_net::*;

use crate::net::tap::{
    TapOffloads, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UDP_TUNNEL_GSO,
    TUN_F_UDP_TUNNEL_GSO_CSUM, TUN_F_UFO, TUN_F_USO4, TUN_F_USO6,
};
pub use crate::virtio::Features;
use crate::virtio::{
    feature, FEATURE_BITS, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO: the driver takes TSO/USO super-frames
/// inside a UDP tunnel (Linux include/uapi/linux/virtio_net.h; virtio 1.4).
pub const VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO: u32 = 65;
/// VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM: ... with a partial checksum in the
/// outer UDP header.
pub const VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM: u32 = 66;
/// VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO: the device takes tunnel super-frames.
pub const VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO: u32 = 67;
/// VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM.
pub const VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM: u32 = 68;
/// Where VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET's 64-bit offload word carries
/// GUEST_UDP_TUNNEL_GSO (`VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_MAPPED`).
pub const GUEST_UDP_TUNNEL_GSO_MAPPED: u32 = 46;
/// Where it carries GUEST_UDP_TUNNEL_GSO_CSUM.
pub const GUEST_UDP_TUNNEL_GSO_CSUM_MAPPED: u32 = 47;

/// The virtio-net header as godwit's datapath and its TAPs use it.
pub mod hdr {
    use super::*;

    /// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
    /// csum_offset, num_buffers.
    pub const V1_LEN: usize = 12;
    /// `virtio_net_hdr_v1_hash_tunnel`: the v1 header, the hash fields
    /// (hash_value, hash_report, padding: unused without HASH_REPORT, but
    /// present) and outer_th_offset, inner_nh_offset (both little-endian
    /// u16, offsets from the frame's start). Used when either UDP tunnel
    /// GSO bit is negotiated.
    pub const TUNNEL_LEN: usize = 24;
    /// Byte offset of `outer_th_offset`.
    pub const OUTER_TH_OFFSET: usize = 20;
    /// Byte offset of `inner_nh_offset`.
    pub const INNER_NH_OFFSET: usize = 22;
    /// `VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM`: the outer UDP checksum is partial.
    pub const F_UDP_TUNNEL_CSUM: u8 = 8;
    /// `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4`: a UDP tunnel over IPv4 (ORed
    /// into gso_type with the inner TCPV4/TCPV6/UDP_L4).
    pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
    /// `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6`.
    pub const GSO_UDP_TUNNEL_IPV6: u8 = 0x40;
    /// Both tunnel gso_type bits.
    pub const GSO_UDP_TUNNEL: u8 = GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6;

    /// Whether the negotiated features use the tunnel header.
    pub fn uses_tunnel(acked: Features) -> bool {
        acked
            & (feature(VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO)
                | feature(VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO))
            != 0
    }

    /// The size of the header in front of every frame, guest side and TAP
    /// side alike, for these negotiated features (VERSION_1 devices:
    /// num_buffers is always there).
    pub fn len_for(acked: Features) -> usize {
        if uses_tunnel(acked) {
            TUNNEL_LEN
        } else {
            V1_LEN
        }
    }
}

/// What a feature needs from a TAP peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapNeed {
    /// Nothing: the device model implements it alone.
    Nothing,
    /// The TAP must carry virtio-net headers (`IFF_VNET_HDR`).
    VnetHdr,
    /// A vnet header, and the kernel must accept `TUNSETOFFLOAD` with these
    /// `TUN_F_*` flags (probed with [`crate::net::Tap::probe_offloads`]).
    Offload(u32),
}

impl TapNeed {
    /// Whether a TAP with these probed capabilities satisfies the need.
    pub fn satisfied_by(&self, tap: &TapOffloads) -> bool {
        match self {
            TapNeed::Nothing => true,
            TapNeed::VnetHdr => tap.vnet_hdr,
            TapNeed::Offload(flags) => tap.vnet_hdr && tap.supports(*flags),
        }
    }

    fn describe(&self) -> String {
        match self {
            TapNeed::Nothing => "nothing".into(),
            TapNeed::VnetHdr => "a TAP with virtio-net headers (vnet_hdr=on)".into(),
            TapNeed::Offload(flags) => format!(
                "a TAP with virtio-net headers whose kernel accepts offload flags {flags:#x} ({})",
                tun_flag_names(*flags)
            ),
        }
    }
}

/// What a feature needs from a vhost backend: a process (vhost-user) or the
/// kernel (`/dev/vhost-net`) that serves the receive and transmit rings
/// directly, so that packets never pass through godwit. godwit's frontend
/// still owns the configuration space and serves the control queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VhostNeed {
    /// Served by godwit's frontend itself (configuration space fields, the
    /// control queue, announce): nothing from the backend. Passed on in
    /// SET_FEATURES only when the backend offers it too.
    Frontend,
    /// Served by the frontend (`max_virtqueue_pairs`), but every queue pair
    /// needs a receive and a transmit ring at the backend (vhost-user:
    /// GET_QUEUE_NUM when the backend has protocol feature MQ).
    QueuePairs,
    /// Ring layout, notification or buffer handling, done by whoever
    /// processes the rings: the backend must offer it (vhost-user:
    /// GET_FEATURES; kernel vhost-net: `/dev/vhost-net`'s VHOST_GET_FEATURES).
    Ring,
    /// Packet format and offloads. vhost-user: the backend must offer it (it
    /// reads and writes the frames). Kernel vhost-net: the TAP carries it, so
    /// the bit's [`TapNeed`] applies to the TAP behind `/dev/vhost-net`.
    Packet,
}

impl VhostNeed {
    /// Whether a vhost-user backend must offer the bit in GET_FEATURES.
    pub fn vhost_user_backend_must_offer(&self) -> bool {
        matches!(self, VhostNeed::Ring | VhostNeed::Packet)
    }

    pub fn describe(&self) -> &'static str {
        match self {
            VhostNeed::Frontend => "served by godwit's frontend (config space or control queue)",
            VhostNeed::QueuePairs => "served by godwit's frontend; the backend needs 2 rings per queue pair",
            VhostNeed::Ring => "ring feature: the backend processing the rings must offer it",
            VhostNeed::Packet => "packet format or offload: the backend (vhost-user) or the TAP (vhost-net) must carry it",
        }
    }
}

/// One feature bit.
#[derive(Clone, Copy, Debug)]
pub struct NetFeature {
    pub bit: u32,
    /// Canonical name: QEMU's virtio-net-device property where there is one.
    pub name: &'static str,
    /// Name in the virtio spec.
    pub spec_name: &'static str,
    pub tap: TapNeed,
    /// What it needs from a vhost backend (vhost-user, kernel vhost-net).
    pub vhost: VhostNeed,
    /// Bits that must all be present with this one.
    pub requires_all: &'static [u32],
    /// Of these bits at least one must be present with this one (empty: no rule).
    pub requires_any: &'static [u32],
    /// Whether godwit's device model implements it (and so may offer it).
    pub supported: bool,
    /// Offered whatever the configuration says.
    pub always: bool,
}

/// One row of [`FEATURES`], its columns in table order.
#[allow(clippy::too_many_arguments)]
const fn f(
    bit: u32,
    name: &'static str,
    spec_name: &'static str,
    tap: TapNeed,
    vhost: VhostNeed,
    requires_all: &'static [u32],
    requires_any: &'static [u32],
    supported: bool,
) -> NetFeature {
    NetFeature {
        bit,
        name,
        spec_name,
        tap,
        vhost,
        requires_all,
        requires_any,
        supported,
        always: false,
    }
}

use TapNeed::{Nothing, Offload, VnetHdr};
use VhostNeed::{Frontend, Packet, QueuePairs, Ring};

const CSUM: u32 = VIRTIO_NET_F_CSUM;
const GUEST_CSUM: u32 = VIRTIO_NET_F_GUEST_CSUM;
const CTRL_VQ: u32 = VIRTIO_NET_F_CTRL_VQ;

/// Every virtio-net feature bit godwit knows, in bit order.
pub static FEATURES: &[NetFeature] = &[
    f(
        CSUM,
        "csum",
        "VIRTIO_NET_F_CSUM",
        VnetHdr,
        Packet,
        &[],
        &[],
        true,
    ),
    f(
        GUEST_CSUM,
        "guest_csum",
        "VIRTIO_NET_F_GUEST_CSUM",
        Offload(TUN_F_CSUM),
        Packet,
        &[],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        "ctrl_guest_offloads",
        "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
        Nothing,
        Packet,
        &[CTRL_VQ],
        &[],
        true,
    ),
    // QEMU's property is host_mtu (it carries the value); the bit is MTU.
    f(
        VIRTIO_NET_F_MTU,
        "mtu",
        "VIRTIO_NET_F_MTU",
        Nothing,
        Frontend,
        &[],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_MAC,
        "mac",
        "VIRTIO_NET_F_MAC",
        Nothing,
        Frontend,
        &[],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_GSO,
        "gso",
        "VIRTIO_NET_F_GSO",
        VnetHdr,
        Packet,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_NET_F_GUEST_TSO4,
        "guest_tso4",
        "VIRTIO_NET_F_GUEST_TSO4",
        Offload(TUN_F_CSUM | TUN_F_TSO4),
        Packet,
        &[GUEST_CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_GUEST_TSO6,
        "guest_tso6",
        "VIRTIO_NET_F_GUEST_TSO6",
        Offload(TUN_F_CSUM | TUN_F_TSO6),
        Packet,
        &[GUEST_CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_GUEST_ECN,
        "guest_ecn",
        "VIRTIO_NET_F_GUEST_ECN",
        Offload(TUN_F_CSUM | TUN_F_TSO_ECN),
        Packet,
        &[],
        &[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6],
        true,
    ),
    f(
        VIRTIO_NET_F_GUEST_UFO,
        "guest_ufo",
        "VIRTIO_NET_F_GUEST_UFO",
        Offload(TUN_F_CSUM | TUN_F_UFO),
        Packet,
        &[GUEST_CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_HOST_TSO4,
        "host_tso4",
        "VIRTIO_NET_F_HOST_TSO4",
        VnetHdr,
        Packet,
        &[CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_HOST_TSO6,
        "host_tso6",
        "VIRTIO_NET_F_HOST_TSO6",
        VnetHdr,
        Packet,
        &[CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_HOST_ECN,
        "host_ecn",
        "VIRTIO_NET_F_HOST_ECN",
        VnetHdr,
        Packet,
        &[],
        &[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6],
        true,
    ),
    // The kernel's UFO support is probed the way QEMU does, with TUN_F_UFO.
    f(
        VIRTIO_NET_F_HOST_UFO,
        "host_ufo",
        "VIRTIO_NET_F_HOST_UFO",
        Offload(TUN_F_CSUM | TUN_F_UFO),
        Packet,
        &[CSUM],
        &[],
        true,
    ),
    // godwit writes num_buffers itself (and sets a vnet-header TAP to the
    // 12-byte header), so mergeable buffers need nothing from the TAP.
    f(
        VIRTIO_NET_F_MRG_RXBUF,
        "mrg_rxbuf",
        "VIRTIO_NET_F_MRG_RXBUF",
        Nothing,
        Ring,
        &[],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_STATUS,
        "status",
        "VIRTIO_NET_F_STATUS",
        Nothing,
        Frontend,
        &[],
        &[],
        true,
    ),
    f(
        CTRL_VQ,
        "ctrl_vq",
        "VIRTIO_NET_F_CTRL_VQ",
        Nothing,
        Frontend,
        &[],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_CTRL_RX,
        "ctrl_rx",
        "VIRTIO_NET_F_CTRL_RX",
        Nothing,
        Frontend,
        &[CTRL_VQ],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_CTRL_VLAN,
        "ctrl_vlan",
        "VIRTIO_NET_F_CTRL_VLAN",
        Nothing,
        Frontend,
        &[CTRL_VQ],
        &[],
        false,
    ),
    f(
        VIRTIO_NET_F_CTRL_RX_EXTRA,
        "ctrl_rx_extra",
        "VIRTIO_NET_F_CTRL_RX_EXTRA",
        Nothing,
        Frontend,
        &[CTRL_VQ, VIRTIO_NET_F_CTRL_RX],
        &[],
        false,
    ),
    f(
        VIRTIO_NET_F_GUEST_ANNOUNCE,
        "guest_announce",
        "VIRTIO_NET_F_GUEST_ANNOUNCE",
        Nothing,
        Frontend,
        &[CTRL_VQ],
        &[],
        true,
    ),
    // max_virtqueue_pairs is the device's queue pair count (queues=).
    f(
        VIRTIO_NET_F_MQ,
        "mq",
        "VIRTIO_NET_F_MQ",
        Nothing,
        QueuePairs,
        &[CTRL_VQ],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_CTRL_MAC_ADDR,
        "ctrl_mac_addr",
        "VIRTIO_NET_F_CTRL_MAC_ADDR",
        Nothing,
        Frontend,
        &[CTRL_VQ],
        &[],
        true,
    ),
    f(
        VIRTIO_F_NOTIFY_ON_EMPTY,
        "notify_on_empty",
        "VIRTIO_F_NOTIFY_ON_EMPTY",
        Nothing,
        Ring,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_F_ANY_LAYOUT,
        "any_layout",
        "VIRTIO_F_ANY_LAYOUT",
        Nothing,
        Ring,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_RING_F_INDIRECT_DESC,
        "indirect_desc",
        "VIRTIO_F_INDIRECT_DESC",
        Nothing,
        Ring,
        &[],
        &[],
        true,
    ),
    f(
        VIRTIO_RING_F_EVENT_IDX,
        "event_idx",
        "VIRTIO_F_EVENT_IDX",
        Nothing,
        Ring,
        &[],
        &[],
        true,
    ),
    NetFeature {
        always: true,
        ..f(
            VIRTIO_F_VERSION_1,
            "version_1",
            "VIRTIO_F_VERSION_1",
            Nothing,
            Ring,
            &[],
            &[],
            true,
        )
    },
    f(
        VIRTIO_F_ACCESS_PLATFORM,
        "iommu_platform",
        "VIRTIO_F_ACCESS_PLATFORM",
        Nothing,
        Ring,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_F_RING_PACKED,
        "packed",
        "VIRTIO_F_RING_PACKED",
        Nothing,
        Ring,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_F_IN_ORDER,
        "in_order",
        "VIRTIO_F_IN_ORDER",
        Nothing,
        Ring,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_F_NOTIFICATION_DATA,
        "notification_data",
        "VIRTIO_F_NOTIFICATION_DATA",
        Nothing,
        Ring,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_F_RING_RESET,
        "queue_reset",
        "VIRTIO_F_RING_RESET",
        Nothing,
        Ring,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_NET_F_GUEST_USO4,
        "guest_uso4",
        "VIRTIO_NET_F_GUEST_USO4",
        Offload(TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6),
        Packet,
        &[GUEST_CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_GUEST_USO6,
        "guest_uso6",
        "VIRTIO_NET_F_GUEST_USO6",
        Offload(TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6),
        Packet,
        &[GUEST_CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_HOST_USO,
        "host_uso",
        "VIRTIO_NET_F_HOST_USO",
        Offload(TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6),
        Packet,
        &[CSUM],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_HASH_REPORT,
        "hash",
        "VIRTIO_NET_F_HASH_REPORT",
        VnetHdr,
        Packet,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_NET_F_RSS,
        "rss",
        "VIRTIO_NET_F_RSS",
        Nothing,
        Packet,
        &[CTRL_VQ],
        &[],
        false,
    ),
    f(
        VIRTIO_NET_F_RSC_EXT,
        "guest_rsc_ext",
        "VIRTIO_NET_F_RSC_EXT",
        VnetHdr,
        Packet,
        &[],
        &[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6],
        false,
    ),
    f(
        VIRTIO_NET_F_STANDBY,
        "failover",
        "VIRTIO_NET_F_STANDBY",
        Nothing,
        Frontend,
        &[],
        &[],
        false,
    ),
    f(
        VIRTIO_NET_F_SPEED_DUPLEX,
        "speed_duplex",
        "VIRTIO_NET_F_SPEED_DUPLEX",
        Nothing,
        Frontend,
        &[],
        &[],
        false,
    ),
    // UDP tunnel GSO (Linux 6.17 TAPs; QEMU 10.2 properties). The kernel
    // takes TUN_F_UDP_TUNNEL_GSO only beside TSO or USO, and parses a
    // guest's tunnel header only with the 24-byte vnet header, both from
    // 6.17 on: the probed flag stands for both directions. vhost-user
    // cannot carry them (GET_FEATURES/SET_FEATURES are 64-bit); kernel
    // vhost-net needs VHOST_GET_FEATURES_ARRAY and the TAP's flags.
    f(
        VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO,
        "guest_tunnel",
        "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO",
        Offload(TUN_F_CSUM | TUN_F_UDP_TUNNEL_GSO),
        Packet,
        &[],
        &[
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_USO4,
            VIRTIO_NET_F_GUEST_USO6,
        ],
        true,
    ),
    f(
        VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM,
        "guest_tunnel_csum",
        "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM",
        Offload(TUN_F_CSUM | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM),
        Packet,
        &[VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO],
        &[],
        true,
    ),
    f(
        VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO,
        "host_tunnel",
        "VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO",
        Offload(TUN_F_CSUM | TUN_F_UDP_TUNNEL_GSO),
        Packet,
        &[],
        &[
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_USO,
        ],
        true,
    ),
    f(
        VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM,
        "host_tunnel_csum",
        "VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM",
        Offload(TUN_F_CSUM | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM),
        Packet,
        &[VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO],
        &[],
        true,
    ),
];

/// Named feature groups that versioned ABIs (machine types, backend
/// interface versions) are composed of. A released group never changes;
/// a new ABI adds a new group.
pub mod groups {
    /// The virtio-net 1.0 device godwit started with.
    pub const BASE: &[&str] = &[
        "csum",
        "guest_csum",
        "mtu",
        "mac",
        "guest_tso4",
        "guest_tso6",
        "guest_ecn",
        "guest_ufo",
        "host_tso4",
        "host_tso6",
        "host_ecn",
        "host_ufo",
        "mrg_rxbuf",
        "status",
        "ctrl_vq",
        "ctrl_rx",
        "guest_announce",
        "indirect_desc",
        "event_idx",
        "version_1",
    ];
    /// UDP segmentation offload.
    pub const USO: &[&str] = &["guest_uso4", "guest_uso6", "host_uso"];
    /// TSO/USO inside UDP tunnels (VXLAN, GENEVE), bits 65-68.
    pub const UDP_TUNNEL: &[&str] = &[
        "guest_tunnel",
        "guest_tunnel_csum",
        "host_tunnel",
        "host_tunnel_csum",
    ];
    /// Multi-queue: several receive/transmit queue pairs, chosen by the
    /// driver with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (the count is the ABI's
    /// `queue_pairs`).
    pub const MQ: &[&str] = &["mq"];
}

/// The bits of feature groups given by canonical names.
pub fn bits_of_groups(groups: &[&[&str]]) -> Features {
    groups
        .iter()
        .flat_map(|g| g.iter())
        .filter_map(|n| by_name(n))
        .fold(0, |acc, f| acc | feature(f.bit))
}

/// The table entry of a bit.
pub fn lookup(bit: u32) -> Option<&'static NetFeature> {
    FEATURES.iter().find(|f| f.bit == bit)
}

/// The table entry of a canonical name.
pub fn by_name(name: &str) -> Option<&'static NetFeature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// The name of a bit, or `bit<N>` for bits not in the table.
pub fn name_of(bit: u32) -> String {
    lookup(bit).map_or_else(|| format!("bit{bit}"), |f| f.name.to_string())
}

/// Comma-separated names of the bits set in `features`.
pub fn names(features: Features) -> String {
    bits(features).map(name_of).collect::<Vec<_>>().join(",")
}

/// The numbers of the bits set in `features`, lowest first.
pub fn bits(features: Features) -> impl Iterator<Item = u32> {
    (0..FEATURE_BITS).filter(move |b| features & feature(*b) != 0)
}

/// How feature sets are written in reports, golden files and messages: `0x`
/// and 16 hex digits while every bit is below 64 (exactly as before feature
/// words grew), 32 digits otherwise.
pub fn hex(features: Features) -> String {
    if features >> 64 == 0 {
        format!("{features:#018x}")
    } else {
        format!("{features:#034x}")
    }
}

/// Reads `0x` followed by 1 to 32 hex digits (what [`hex`] writes, and the
/// 16-digit form of older reports).
pub fn parse_hex(s: &str) -> Option<Features> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if digits.is_empty() || digits.len() > 32 {
        return None;
    }
    Features::from_str_radix(digits, 16).ok()
}

/// Bits godwit always offers.
pub fn always_offered() -> Features {
    FEATURES
        .iter()
        .filter(|f| f.always)
        .fold(0, |acc, f| acc | feature(f.bit))
}

/// Bits godwit's device model implements.
pub fn supported() -> Features {
    FEATURES
        .iter()
        .filter(|f| f.supported)
        .fold(0, |acc, f| acc | feature(f.bit))
}

/// Why a feature set cannot be offered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeatureProblem {
    #[error("feature bit {bit} is not a virtio-net feature godwit knows; remove it")]
    Unknown { bit: u32 },
    #[error("feature {name} ({spec_name}) is not implemented by godwit's virtio-net device; turn it off ({name}=off)")]
    Unsupported {
        name: &'static str,
        spec_name: &'static str,
    },
    #[error(
        "feature {name} needs {missing} as well (virtio spec); turn {missing} on or {name} off"
    )]
    MissingDependency { name: &'static str, missing: String },
    #[error("feature {name} needs {need}, which TAP {tap} does not offer; turn {name} off{hint}")]
    PeerLacks {
        name: &'static str,
        need: String,
        tap: String,
        hint: &'static str,
    },
}

/// Checks the spec's dependency rules: every bit's `requires_all` present,
/// and one of its `requires_any` if that is not empty.
pub fn check_dependencies(features: Features) -> Vec<FeatureProblem> {
    let mut problems = Vec::new();
    for bit in bits(features) {
        let Some(f) = lookup(bit) else { continue };
        let missing_all: Vec<u32> = f
            .requires_all
            .iter()
            .copied()
            .filter(|b| features & feature(*b) == 0)
            .collect();
        if !missing_all.is_empty() {
            problems.push(FeatureProblem::MissingDependency {
                name: f.name,
                missing: missing_all
                    .iter()
                    .map(|b| name_of(*b))
                    .collect::<Vec<_>>()
                    .join(" and "),
            });
        }
        if !f.requires_any.is_empty() && f.requires_any.iter().all(|b| features & feature(*b) == 0)
        {
            problems.push(FeatureProblem::MissingDependency {
                name: f.name,
                missing: f
                    .requires_any
                    .iter()
                    .map(|b| name_of(*b))
                    .collect::<Vec<_>>()
                    .join(" or "),
            });
        }
    }
    problems
}

/// Checks that godwit can offer `features` over a TAP with capabilities
/// `tap` (named `tap_name` in messages): every bit known and implemented,
/// every TAP need met, every dependency present. Empty when fine.
pub fn validate(features: Features, tap: &TapOffloads, tap_name: &str) -> Vec<FeatureProblem> {
    let mut problems = Vec::new();
    for bit in bits(features) {
        let Some(f) = lookup(bit) else {
            problems.push(FeatureProblem::Unknown { bit });
            continue;
        };
        if !f.supported {
            problems.push(FeatureProblem::Unsupported {
                name: f.name,
                spec_name: f.spec_name,
            });
            continue;
        }
        if !f.tap.satisfied_by(tap) {
            problems.push(FeatureProblem::PeerLacks {
                name: f.name,
                need: f.tap.describe(),
                tap: tap_name.to_string(),
                hint: if tap.vnet_hdr {
                    " (this host's kernel lacks the offload)"
                } else {
                    " or give the TAP virtio-net headers (vnet_hdr=on)"
                },
            });
        }
    }
    problems.extend(check_dependencies(features));
    problems
}

/// A bit dropped by [`mask_for_peer`], and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub bit: u32,
    pub name: String,
    pub reason: String,
}

/// `requested` reduced to what a TAP with capabilities `tap` supports (QEMU's
/// silent rules, made explicit): bits the TAP cannot do are dropped, then
/// bits whose spec dependencies were dropped, until the set is consistent.
/// Bits godwit does not implement are dropped too. Returns the remaining set
/// and every dropped bit with its reason, for the caller to report.
pub fn mask_for_peer(requested: Features, tap: &TapOffloads) -> (Features, Vec<Dropped>) {
    let mut set = requested;
    let mut dropped = Vec::new();
    for bit in bits(requested) {
        let reason = match lookup(bit) {
            None => Some("unknown feature bit".to_string()),
            Some(f) if !f.supported => Some("not implemented by godwit".to_string()),
            Some(f) if !f.tap.satisfied_by(tap) => Some(format!("needs {}", f.tap.describe())),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            set &= !feature(bit);
            dropped.push(Dropped {
                bit,
                name: name_of(bit),
                reason,
            });
        }
    }
    loop {
        let mut changed = false;
        for problem in check_dependencies(set) {
            if let FeatureProblem::MissingDependency { name, missing } = problem {
                if let Some(f) = by_name(name) {
                    if set & feature(f.bit) != 0 {
                        set &= !feature(f.bit);
                        dropped.push(Dropped {
                            bit: f.bit,
                            name: name.to_string(),
                            reason: format!("needs {missing}, which was dropped"),
                        });
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    (set, dropped)
}

/// The `TUNSETOFFLOAD` flags for the guest-receive offloads a driver acked,
/// following this kernel's rules: nothing without GUEST_CSUM (every flag
/// needs `TUN_F_CSUM`), ECN only with TSO4 or TSO6, USO only when the guest
/// takes both USO4 and USO6 (the kernel accepts them only together, and a
/// guest must not get UDP segments of a family it did not ack), the UDP
/// tunnel flags only beside TSO or USO (the kernel's rule) and the tunnel
/// checksum flag only with the tunnel flag.
pub fn tun_offloads_for_guest(acked: Features) -> u32 {
    let has = |bit: u32| acked & feature(bit) != 0;
    if !has(GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        flags |= TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= TUN_F_UFO;
    }
    if has(VIRTIO_NET_F_GUEST_USO4) && has(VIRTIO_NET_F_GUEST_USO6) {
        flags |= TUN_F_USO4 | TUN_F_USO6;
    }
    if has(VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO) && flags & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4) != 0
    {
        flags |= TUN_F_UDP_TUNNEL_GSO;
        if has(VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM) {
            flags |= TUN_F_UDP_TUNNEL_GSO_CSUM;
        }
    }
    flags
}

/// Guest-receive offload bits, the ones VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may
/// switch.
pub const GUEST_OFFLOADS: Features = feature(VIRTIO_NET_F_GUEST_CSUM)
    | feature(VIRTIO_NET_F_GUEST_TSO4)
    | feature(VIRTIO_NET_F_GUEST_TSO6)
    | feature(VIRTIO_NET_F_GUEST_ECN)
    | feature(VIRTIO_NET_F_GUEST_UFO)
    | feature(VIRTIO_NET_F_GUEST_USO4)
    | feature(VIRTIO_NET_F_GUEST_USO6)
    | feature(VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO)
    | feature(VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM);

/// The guest offloads in VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET's 64-bit word:
/// bits below 64 as themselves, the tunnel bits at their `_MAPPED` places.
pub fn ctrl_offloads_to_features(word: u64) -> Features {
    let mut f = Features::from(word);
    for (mapped, bit) in [
        (
            GUEST_UDP_TUNNEL_GSO_MAPPED,
            VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO,
        ),
        (
            GUEST_UDP_TUNNEL_GSO_CSUM_MAPPED,
            VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM,
        ),
    ] {
        if f & feature(mapped) != 0 {
            f = (f & !feature(mapped)) | feature(bit);
        }
    }
    f
}

/// Offloads the TAP would deliver frames with that are larger than an MTU.
pub fn tun_flags_need_big_buffers(flags: u32) -> bool {
    flags & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6) != 0
}

fn tun_flag_names(flags: u32) -> String {
    [
        (TUN_F_CSUM, "TUN_F_CSUM"),
        (TUN_F_TSO4, "TUN_F_TSO4"),
        (TUN_F_TSO6, "TUN_F_TSO6"),
        (TUN_F_TSO_ECN, "TUN_F_TSO_ECN"),
        (TUN_F_UFO, "TUN_F_UFO"),
        (TUN_F_USO4, "TUN_F_USO4"),
        (TUN_F_USO6, "TUN_F_USO6"),
        (TUN_F_UDP_TUNNEL_GSO, "TUN_F_UDP_TUNNEL_GSO"),
        (TUN_F_UDP_TUNNEL_GSO_CSUM, "TUN_F_UDP_TUNNEL_GSO_CSUM"),
    ]
    .iter()
    .filter(|(b, _)| flags & b != 0)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_tap() -> TapOffloads {
        TapOffloads::all()
    }

    #[test]
    fn table_is_sorted_unique_and_consistent() {
        for w in FEATURES.windows(2) {
            assert!(w[0].bit < w[1].bit, "{} / {}", w[0].name, w[1].name);
        }
        let mut names: Vec<_> = FEATURES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FEATURES.len());
        for f in FEATURES {
            for dep in f.requires_all.iter().chain(f.requires_any) {
                assert!(
                    lookup(*dep).is_some(),
                    "{} depends on unknown bit {dep}",
                    f.name
                );
            }
        }
        assert_eq!(by_name("host_uso").unwrap().bit, 56);
        assert_eq!(name_of(VIRTIO_F_VERSION_1), "version_1");
        assert_eq!(always_offered(), feature(VIRTIO_F_VERSION_1));
    }

    #[test]
    fn vhost_column() {
        let need = |n: &str| by_name(n).unwrap().vhost;
        // godwit keeps the configuration space and serves the control queue.
        for n in [
            "mac",
            "status",
            "mtu",
            "ctrl_vq",
            "ctrl_rx",
            "ctrl_mac_addr",
            "guest_announce",
        ] {
            assert_eq!(need(n), VhostNeed::Frontend, "{n}");
            assert!(!need(n).vhost_user_backend_must_offer(), "{n}");
        }
        assert_eq!(need("mq"), VhostNeed::QueuePairs);
        for n in [
            "mrg_rxbuf",
            "event_idx",
            "indirect_desc",
            "version_1",
            "packed",
        ] {
            assert_eq!(need(n), VhostNeed::Ring, "{n}");
        }
        for n in ["csum", "guest_csum", "host_tso4", "guest_uso4", "host_uso"] {
            assert_eq!(need(n), VhostNeed::Packet, "{n}");
            assert!(need(n).vhost_user_backend_must_offer(), "{n}");
        }
    }

    #[test]
    fn dependencies() {
        let tso4 = feature(VIRTIO_NET_F_GUEST_TSO4);
        let p = check_dependencies(tso4);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].to_string().contains("guest_tso4 needs guest_csum"),
            "{}",
            p[0]
        );
        assert!(check_dependencies(tso4 | feature(GUEST_CSUM)).is_empty());
        let ecn = feature(VIRTIO_NET_F_HOST_ECN) | feature(CSUM);
        assert!(check_dependencies(ecn)[0]
            .to_string()
            .contains("host_tso4 or host_tso6"));
        let announce = feature(VIRTIO_NET_F_GUEST_ANNOUNCE);
        assert_eq!(check_dependencies(announce).len(), 1);
    }

    #[test]
    fn validate_against_taps() {
        let plain = TapOffloads::default();
        let want = feature(CSUM) | feature(VIRTIO_NET_F_MAC) | feature(VIRTIO_NET_F_MRG_RXBUF);
        let p = validate(want, &plain, "tap7");
        assert_eq!(p.len(), 1);
        let msg = p[0].to_string();
        assert!(
            msg.contains("csum") && msg.contains("tap7") && msg.contains("vnet_hdr=on"),
            "{msg}"
        );
        assert!(validate(want, &full_tap(), "tap7").is_empty());
        let no_uso = TapOffloads {
            uso: false,
            ..full_tap()
        };
        let uso = feature(GUEST_CSUM) | feature(VIRTIO_NET_F_GUEST_USO4);
        assert!(matches!(
            validate(uso, &no_uso, "t")[0],
            FeatureProblem::PeerLacks {
                name: "guest_uso4",
                ..
            }
        ));
        assert!(matches!(
            validate(feature(VIRTIO_F_RING_PACKED), &full_tap(), "t")[0],
            FeatureProblem::Unsupported { name: "packed", .. }
        ));
        assert!(matches!(
            validate(feature(4), &full_tap(), "t")[0],
            FeatureProblem::Unknown { bit: 4 }
        ));
    }

    #[test]
    fn masking_cascades_through_dependencies() {
        let want = feature(GUEST_CSUM)
            | feature(VIRTIO_NET_F_GUEST_TSO4)
            | feature(VIRTIO_NET_F_GUEST_ECN)
            | feature(VIRTIO_NET_F_MRG_RXBUF)
            | feature(VIRTIO_F_RING_PACKED);
        let (set, dropped) = mask_for_peer(want, &TapOffloads::default());
        assert_eq!(set, feature(VIRTIO_NET_F_MRG_RXBUF));
        let names: Vec<_> = dropped.iter().map(|d| d.name.as_str()).collect();
        for n in ["guest_csum", "guest_tso4", "guest_ecn", "packed"] {
            assert!(names.contains(&n), "{names:?}");
        }
        // Dropping USO on a TAP without it keeps the rest.
        let no_uso = TapOffloads {
            uso: false,
            ..full_tap()
        };
        let want = feature(GUEST_CSUM)
            | feature(VIRTIO_NET_F_GUEST_USO4)
            | feature(VIRTIO_NET_F_HOST_USO)
            | feature(CSUM);
        let (set, dropped) = mask_for_peer(want, &no_uso);
        assert_eq!(set, feature(GUEST_CSUM) | feature(CSUM));
        assert_eq!(dropped.len(), 2);
    }

    #[test]
    fn guest_offloads_follow_kernel_rules() {
        assert_eq!(tun_offloads_for_guest(feature(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let csum = feature(GUEST_CSUM);
        assert_eq!(tun_offloads_for_guest(csum), TUN_F_CSUM);
        assert_eq!(
            tun_offloads_for_guest(csum | feature(VIRTIO_NET_F_GUEST_ECN)),
            TUN_F_CSUM
        );
        assert_eq!(
            tun_offloads_for_guest(
                csum | feature(VIRTIO_NET_F_GUEST_TSO6) | feature(VIRTIO_NET_F_GUEST_ECN)
            ),
            TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        assert_eq!(
            tun_offloads_for_guest(csum | feature(VIRTIO_NET_F_GUEST_USO4)),
            TUN_F_CSUM
        );
        assert_eq!(
            tun_offloads_for_guest(
                csum | feature(VIRTIO_NET_F_GUEST_USO4) | feature(VIRTIO_NET_F_GUEST_USO6)
            ),
            TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6
        );
        assert_eq!(
            tun_flag_names(TUN_F_CSUM | TUN_F_UFO),
            "TUN_F_CSUM|TUN_F_UFO"
        );
    }
}
