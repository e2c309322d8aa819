//! A vhost-user session: the handshake that learns what a backend offers
//! (features, protocol features, queue count, and with godwit's extension
//! its interface version), optionally pinning an interface version first.
//!
//! Order (as QEMU's): GET_FEATURES, GET_PROTOCOL_FEATURES,
//! SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, [extension: SET_CONFIG pin,
//! GET_CONFIG record], SET_OWNER, GET_FEATURES.

use serde::Serialize;
use vhost::vhost_user::VhostUserProtocolFeatures as P;

use super::conn::{protocol_names, Connection, VhostUserError, F_LOG_ALL, F_PROTOCOL_FEATURES};
use super::interface::{
    by_interface_name, valid_name, InterfaceRecord, PROTOCOL_F_GODWIT_INTERFACE, WINDOW_OFFSET,
    WINDOW_SIZE,
};
use crate::virtio::net::features;

/// The protocol features godwit's frontend uses when a backend offers them.
pub const WANTED_PROTOCOL: u64 = P::MQ.bits()
    | P::LOG_SHMFD.bits()
    | P::RARP.bits()
    | P::REPLY_ACK.bits()
    | P::MTU.bits()
    | P::CONFIG.bits()
    | PROTOCOL_F_GODWIT_INTERFACE;

/// Transport bits of GET_FEATURES that are not virtio-net features.
pub const TRANSPORT_BITS: u64 = F_PROTOCOL_FEATURES | F_LOG_ALL;

/// How the interface version in use was established.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceInUse {
    pub name: String,
    /// godwit pinned it through the extension (else: the backend's default).
    pub pinned: bool,
    /// `extension`: the backend presents it (godwit's protocol extension);
    /// `checked`: the backend lacks the extension, godwit checked the
    /// version's values against what it offers.
    pub how: &'static str,
    pub record: Option<InterfaceRecord>,
}

/// A snapshot of the backend's state for query-net.
#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub socket: String,
    pub mode: &'static str,
    pub connected: bool,
    pub rings_running: bool,
    pub offer: Option<BackendOffer>,
    pub interface: Option<InterfaceInUse>,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub logging: bool,
}

/// What a backend offers, as the handshake found it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendOffer {
    /// GET_FEATURES at the end of the handshake (after pinning).
    pub features: u64,
    /// GET_PROTOCOL_FEATURES (0 without VHOST_USER_F_PROTOCOL_FEATURES).
    pub protocol: u64,
    /// What godwit set with SET_PROTOCOL_FEATURES.
    pub acked_protocol: u64,
    /// GET_QUEUE_NUM (with protocol MQ).
    pub queue_num: Option<u64>,
    /// The backend's interface record (godwit's extension).
    pub record: Option<InterfaceRecord>,
}

impl BackendOffer {
    pub fn has_protocol(&self, bit: u64) -> bool {
        self.acked_protocol & bit != 0
    }

    /// godwit's extension was negotiated.
    pub fn extension(&self) -> bool {
        self.has_protocol(PROTOCOL_F_GODWIT_INTERFACE)
    }

    /// Whether the backend can log its writes for migration; else what it lacks.
    pub fn logging(&self) -> Result<(), String> {
        let mut lacks = Vec::new();
        if self.features & F_LOG_ALL == 0 {
            lacks.push("feature LOG_ALL (bit 26)");
        }
        if !self.has_protocol(P::LOG_SHMFD.bits()) {
            lacks.push("protocol feature LOG_SHMFD");
        }
        if lacks.is_empty() {
            Ok(())
        } else {
            Err(lacks.join(" and "))
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "GET_FEATURES = {:#x} ({}), protocol features {:#x} ({}), negotiated {}",
            self.features,
            features::names((self.features & !TRANSPORT_BITS).into()),
            self.protocol,
            protocol_names(self.protocol),
            protocol_names(self.acked_protocol)
        )
    }
}

/// A connection after the handshake.
pub struct Session {
    pub conn: Connection,
    pub offer: BackendOffer,
}

fn protocol_err(conn: &Connection, detail: String) -> VhostUserError {
    VhostUserError::Protocol {
        peer: conn.peer().to_string(),
        detail,
    }
}

fn read_record(conn: &mut Connection) -> Result<InterfaceRecord, VhostUserError> {
    let bytes = conn.get_config(WINDOW_OFFSET, WINDOW_SIZE)?;
    InterfaceRecord::decode(&bytes).map_err(|e| {
        protocol_err(
            conn,
            format!("its interface record (GET_CONFIG at {WINDOW_OFFSET:#x}) is invalid: {e}"),
        )
    })
}

/// Learns what the backend offers; with `pin`, pins that interface version
/// first (backends with godwit's extension). A backend without the
/// extension is not asked: the caller checks the version's values against
/// what it offers.
pub fn handshake(mut conn: Connection, pin: Option<&str>) -> Result<Session, VhostUserError> {
    if let Some(name) = pin {
        if !valid_name(name) {
            return Err(protocol_err(
                &conn,
                format!("interface={name} is not a valid interface name (1 to 64 characters of A-Z a-z 0-9 . _ -)"),
            ));
        }
    }
    let initial = conn.get_features()?;
    let mut offer = BackendOffer {
        features: initial,
        ..BackendOffer::default()
    };
    if initial & F_PROTOCOL_FEATURES != 0 {
        offer.protocol = conn.get_protocol_features()?;
        let mut wanted = WANTED_PROTOCOL;
        // The extension needs its carrier (CONFIG) and acknowledgements.
        let carrier = P::CONFIG.bits() | P::REPLY_ACK.bits();
        if offer.protocol & PROTOCOL_F_GODWIT_INTERFACE == 0 || offer.protocol & carrier != carrier
        {
            wanted &= !(PROTOCOL_F_GODWIT_INTERFACE | P::CONFIG.bits());
        }
        offer.acked_protocol = offer.protocol & wanted;
        conn.set_protocol_features(offer.acked_protocol)?;
        conn.set_reply_ack(offer.has_protocol(P::REPLY_ACK.bits()));
        if offer.has_protocol(P::MQ.bits()) {
            let n = conn.get_queue_num()?;
            if n == 0 || n > 0x8000 {
                return Err(protocol_err(
                    &conn,
                    format!("GET_QUEUE_NUM says {n} queue pairs; a backend has 1 to 32768"),
                ));
            }
            offer.queue_num = Some(n);
        }
    }
    if offer.extension() {
        // The record first: it lists the supported versions, and a refused
        // pin may end the session (backends on vhost-user-backend 0.24 drop
        // the connection when a request fails).
        let mut record = read_record(&mut conn)?;
        if let Some(name) = pin {
            let peer = conn.peer().to_string();
            let unknown = |record: &InterfaceRecord| VhostUserError::UnknownInterface {
                peer: peer.clone(),
                name: name.to_string(),
                supported: record.supported.clone(),
                latest: record.latest.clone(),
            };
            if !record.truncated && !record.supported.iter().any(|s| s == name) {
                return Err(unknown(&record));
            }
            match conn.set_config(WINDOW_OFFSET, name.as_bytes()) {
                Ok(()) => {}
                Err(VhostUserError::Refused { .. }) => return Err(unknown(&record)),
                Err(e) => return Err(e),
            }
            record = read_record(&mut conn)?;
        }
        if let Some(name) = pin {
            if record.active != name || !record.pinned {
                return Err(protocol_err(
                    &conn,
                    format!(
                        "it accepted interface {name} but now presents {} (pinned={}): it does not implement godwit's extension correctly",
                        record.active, record.pinned
                    ),
                ));
            }
        }
        if let Some(known) = by_interface_name(&record.active) {
            if known.values() != record.values {
                return Err(protocol_err(
                    &conn,
                    format!(
                        "its interface {} has values {:?}, godwit's has {:?}: released interface versions are immutable, so one side is wrong; upgrade the backend or godwit",
                        record.active,
                        record.values,
                        known.values()
                    ),
                ));
            }
        }
        offer.record = Some(record);
    }
    conn.set_owner()?;
    let features = conn.get_features()?;
    if let Some(record) = &offer.record {
        let want = record.values.features;
        let extra = features & !want & !TRANSPORT_BITS;
        if extra != 0 {
            return Err(protocol_err(
                &conn,
                format!(
                    "it presents interface {} ({want:#x}) but GET_FEATURES offers {features:#x}, with features outside what was asked: {}; a backend with the extension must mask everything newer",
                    record.active,
                    features::names(extra.into())
                ),
            ));
        }
        let missing = want & !features;
        if missing != 0 {
            return Err(protocol_err(
                &conn,
                format!(
                    "it presents interface {} ({want:#x}) but GET_FEATURES ({features:#x}) lacks {}",
                    record.active,
                    features::names(missing.into())
                ),
            ));
        }
    } else if initial & !features & !TRANSPORT_BITS != 0 {
        return Err(protocol_err(
            &conn,
            format!("GET_FEATURES changed from {initial:#x} to {features:#x} during the handshake"),
        ));
    }
    offer.features = features;
    Ok(Session { conn, offer })
}
