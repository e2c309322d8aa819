//! `--net KIND,key=value,...`: a network device and its peer, as the user
//! writes it. Feature properties (`host_uso=off`, ...) are kept by name here
//! and checked against the feature model when the device is built.

use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetSpecError {
    #[error("--net '{spec}': missing the peer kind; start with tap, vhost-user or vhost-net, e.g. --net tap,ifname=tap0")]
    MissingKind { spec: String },
    #[error("--net '{spec}': unknown peer kind '{kind}'; use tap, vhost-user or vhost-net")]
    UnknownKind { spec: String, kind: String },
    #[error("--net '{spec}': '{item}' is not key=value")]
    NotKeyValue { spec: String, item: String },
    #[error("--net '{spec}': '{key}' is given twice")]
    Duplicate { spec: String, key: String },
    #[error("--net '{spec}': {key}={value} is not valid: {why}")]
    BadValue {
        spec: String,
        key: String,
        value: String,
        why: String,
    },
    #[error("--net '{spec}': {what}")]
    Invalid { spec: String, what: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerSpec {
    /// A TAP device opened (or created) by name, or inherited fds: `fd=N`
    /// or `fds=N:M:...` (one per queue pair of a multi-queue TAP).
    Tap {
        ifname: Option<String>,
        fds: Vec<i32>,
        vnet_hdr: Option<bool>,
    },
    /// A vhost-user backend on a Unix socket.
    VhostUser {
        socket: PathBuf,
        server: bool,
        interface: Option<String>,
    },
    /// Kernel vhost-net on a TAP.
    VhostNet { ifname: String },
}

impl PeerSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            PeerSpec::Tap { .. } => "tap",
            PeerSpec::VhostUser { .. } => "vhost-user",
            PeerSpec::VhostNet { .. } => "vhost-net",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The text as given, for messages and remedies.
    pub text: String,
    pub id: Option<String>,
    pub peer: PeerSpec,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
    pub strict: Option<bool>,
    /// Queue pairs (`queues=`, QEMU's netdev property); the machine type's
    /// count when not given (or the number of `fds=`).
    pub queues: Option<u16>,
    /// Feature properties by name, in the order given.
    pub features: BTreeMap<String, bool>,
}

pub fn parse_on_off(value: &str) -> Option<bool> {
    match value {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

pub fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (slot, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Keys every peer kind accepts besides feature properties.
const COMMON_KEYS: &[&str] = &["id", "mac", "mtu", "strict", "queues"];

impl std::str::FromStr for NetSpec {
    type Err = NetSpecError;

    fn from_str(text: &str) -> Result<Self, NetSpecError> {
        let spec = text.to_string();
        let mut items = text.split(',');
        let kind = items.next().filter(|k| !k.is_empty() && !k.contains('='));
        let Some(kind) = kind else {
            return Err(NetSpecError::MissingKind { spec });
        };
        let mut pairs: BTreeMap<String, String> = BTreeMap::new();
        for item in items {
            let Some((key, value)) = item.split_once('=') else {
                return Err(NetSpecError::NotKeyValue {
                    spec,
                    item: item.to_string(),
                });
            };
            if pairs.insert(key.to_string(), value.to_string()).is_some() {
                return Err(NetSpecError::Duplicate {
                    spec,
                    key: key.to_string(),
                });
            }
        }
        let bad = |key: &str, value: &str, why: &str| NetSpecError::BadValue {
            spec: spec.clone(),
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        let on_off = |key: &str, value: &str| {
            parse_on_off(value).ok_or_else(|| bad(key, value, "use on or off"))
        };

        let mut take = |key: &str| pairs.remove(key);
        let peer = match kind {
            "tap" => {
                let ifname = take("ifname");
                let parse_fd = |key: &str, whole: &str, v: &str| {
                    v.parse::<i32>().ok().filter(|fd| *fd > 2).ok_or_else(|| {
                        bad(
                            key,
                            whole,
                            "use the number of an open TAP descriptor above 2 (0, 1 and 2 are godwit's standard input, output and error)",
                        )
                    })
                };
                let mut fds = Vec::new();
                if let Some(v) = take("fd") {
                    fds.push(parse_fd("fd", &v, &v)?);
                }
                if let Some(v) = take("fds") {
                    if !fds.is_empty() {
                        return Err(NetSpecError::Invalid {
                            spec,
                            what: "give either fd= or fds=, not both".into(),
                        });
                    }
                    for one in v.split(':') {
                        let fd = parse_fd("fds", &v, one)?;
                        if fds.contains(&fd) {
                            return Err(bad("fds", &v, "each descriptor once"));
                        }
                        fds.push(fd);
                    }
                }
                let vnet_hdr = match take("vnet_hdr") {
                    Some(v) => Some(on_off("vnet_hdr", &v)?),
                    None => None,
                };
                if let Some(name) = &ifname {
                    if name.is_empty()
                        || name.len() > 15
                        || name.contains('/')
                        || name.contains(char::is_whitespace)
                    {
                        return Err(bad(
                            "ifname",
                            name,
                            "an interface name has 1 to 15 characters, without '/' or spaces",
                        ));
                    }
                }
                match (&ifname, fds.is_empty()) {
                    (Some(_), false) => {
                        return Err(NetSpecError::Invalid {
                            spec,
                            what: "give either ifname= or fd=/fds=, not both".into(),
                        })
                    }
                    (None, true) => return Err(NetSpecError::Invalid {
                        spec,
                        what:
                            "a TAP peer needs ifname=NAME (opened or created) or fd=N (an open TAP; fds=N:M:... for the queues of a multi-queue TAP)"
                                .into(),
                    }),
                    _ => {}
                }
                PeerSpec::Tap {
                    ifname,
                    fds,
                    vnet_hdr,
                }
            }
            "vhost-user" => {
                let socket = take("socket").ok_or_else(|| NetSpecError::Invalid {
                    spec: spec.clone(),
                    what: "a vhost-user peer needs socket=PATH".into(),
                })?;
                let server = match take("server") {
                    Some(v) => on_off("server", &v)?,
                    None => false,
                };
                PeerSpec::VhostUser {
                    socket: PathBuf::from(socket),
                    server,
                    interface: take("interface"),
                }
            }
            "vhost-net" => {
                let ifname = take("ifname").ok_or_else(|| NetSpecError::Invalid {
                    spec: spec.clone(),
                    what: "a vhost-net peer needs ifname=NAME".into(),
                })?;
                PeerSpec::VhostNet { ifname }
            }
            other => {
                return Err(NetSpecError::UnknownKind {
                    spec,
                    kind: other.to_string(),
                })
            }
        };
        let id = take("id");
        let mac = match take("mac") {
            Some(v) => Some(
                parse_mac(&v)
                    .ok_or_else(|| bad("mac", &v, "use six hex bytes, e.g. 52:54:00:12:34:56"))?,
            ),
            None => None,
        };
        let mtu = match take("mtu") {
            Some(v) => Some(
                v.parse::<u16>()
                    .ok()
                    .filter(|m| (68..=65535).contains(m))
                    .ok_or_else(|| bad("mtu", &v, "use 68 to 65535"))?,
            ),
            None => None,
        };
        let strict = match take("strict") {
            Some(v) => Some(on_off("strict", &v)?),
            None => None,
        };
        let max = godwit_devices::virtio::net::MAX_QUEUE_PAIRS;
        let queues = match take("queues") {
            Some(v) => Some(
                v.parse::<u16>()
                    .ok()
                    .filter(|q| (1..=max).contains(q))
                    .ok_or_else(|| bad("queues", &v, &format!("use 1 to {max} queue pairs")))?,
            ),
            None => None,
        };
        if let (Some(q), PeerSpec::Tap { fds, .. }) = (queues, &peer) {
            if !fds.is_empty() && usize::from(q) != fds.len() {
                return Err(NetSpecError::Invalid {
                    spec,
                    what: format!(
                        "queues={q} but {} descriptor(s) in fd=/fds=: give one descriptor per queue pair",
                        fds.len()
                    ),
                });
            }
        }
        let mut features = BTreeMap::new();
        for (key, value) in pairs {
            let on = on_off(&key, &value)?;
            features.insert(key, on);
        }
        debug_assert!(COMMON_KEYS.iter().all(|k| !features.contains_key(*k)));
        Ok(NetSpec {
            text: text.to_string(),
            id,
            peer,
            mac,
            mtu,
            strict,
            queues,
            features,
        })
    }
}

impl NetSpec {
    /// The queue pairs this spec asks for: `queues=`, else one per
    /// descriptor of `fds=`, else none (the machine type's count).
    pub fn queue_pairs(&self) -> Option<u16> {
        match (&self.peer, self.queues) {
            (_, Some(q)) => Some(q),
            (PeerSpec::Tap { fds, .. }, None) if !fds.is_empty() => u16::try_from(fds.len()).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap_specs() {
        let s: NetSpec = "tap,ifname=t0,vnet_hdr=off,mac=52:54:00:aa:bb:cc,mtu=9000,host_uso=off,strict=on,id=net0".parse().unwrap();
        assert_eq!(
            s.peer,
            PeerSpec::Tap {
                ifname: Some("t0".into()),
                fds: Vec::new(),
                vnet_hdr: Some(false)
            }
        );
        assert_eq!(s.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(s.mtu, Some(9000));
        assert_eq!(s.strict, Some(true));
        assert_eq!(s.id.as_deref(), Some("net0"));
        assert_eq!(s.features.get("host_uso"), Some(&false));
        let s: NetSpec = "tap,fd=7".parse().unwrap();
        assert!(matches!(&s.peer, PeerSpec::Tap { fds, .. } if fds == &[7]));
        assert_eq!(s.queue_pairs(), Some(1));
        let s: NetSpec = "tap,fds=7:8,vnet_hdr=on".parse().unwrap();
        assert!(matches!(&s.peer, PeerSpec::Tap { fds, .. } if fds == &[7, 8]));
        assert_eq!(s.queue_pairs(), Some(2));
        let s: NetSpec = "tap,ifname=t0,queues=4".parse().unwrap();
        assert_eq!((s.queues, s.queue_pairs()), (Some(4), Some(4)));
        assert!(s.features.is_empty());
        let s: NetSpec = "tap,ifname=t0".parse().unwrap();
        assert_eq!(s.queue_pairs(), None);
    }

    #[test]
    fn parses_vhost_specs() {
        let s: NetSpec = "vhost-user,socket=/tmp/s,server=on,interface=org.godwit.net.v1"
            .parse()
            .unwrap();
        assert_eq!(
            s.peer,
            PeerSpec::VhostUser {
                socket: "/tmp/s".into(),
                server: true,
                interface: Some("org.godwit.net.v1".into())
            }
        );
        let s: NetSpec = "vhost-net,ifname=t1".parse().unwrap();
        assert_eq!(s.peer.kind(), "vhost-net");
    }

    #[test]
    fn refuses_bad_specs() {
        for (text, needle) in [
            ("", "missing the peer kind"),
            ("ifname=t0", "missing the peer kind"),
            ("slirp,ifname=t0", "unknown peer kind 'slirp'"),
            ("tap", "needs ifname=NAME"),
            ("tap,ifname=t0,fd=3", "not both"),
            ("tap,ifname", "'ifname' is not key=value"),
            ("tap,ifname=t0,ifname=t1", "'ifname' is given twice"),
            (
                "tap,ifname=t0,vnet_hdr=maybe",
                "vnet_hdr=maybe is not valid",
            ),
            ("tap,ifname=averyveryverylongname", "1 to 15 characters"),
            ("tap,fd=-1", "fd=-1"),
            ("tap,fd=0", "standard input, output and error"),
            ("tap,fd=2", "standard input, output and error"),
            ("tap,ifname=t0,mac=01:02", "mac=01:02"),
            ("tap,ifname=t0,mtu=20", "mtu=20"),
            ("tap,ifname=t0,csum=sometimes", "csum=sometimes"),
            ("vhost-user,server=on", "needs socket=PATH"),
            ("tap,ifname=t0,queues=0", "use 1 to 64 queue pairs"),
            ("tap,ifname=t0,queues=65", "use 1 to 64 queue pairs"),
            ("tap,ifname=t0,queues=two", "queues=two"),
            ("tap,fds=7:8,queues=3", "one descriptor per queue pair"),
            ("tap,fd=7,fds=8:9", "fd= or fds="),
            ("tap,fds=7:7", "each descriptor once"),
            ("tap,fds=7:x", "fds=7:x"),
            ("tap,ifname=t0,fds=7:8", "not both"),
            ("vhost-net", "needs ifname=NAME"),
        ] {
            let err = text.parse::<NetSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
