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
    /// A TAP device opened (or created) by name, or an inherited fd.
    Tap {
        ifname: Option<String>,
        fd: Option<i32>,
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
const COMMON_KEYS: &[&str] = &["id", "mac", "mtu", "strict"];

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
                let fd = match take("fd") {
                    Some(v) => Some(
                        v.parse::<i32>()
                            .ok()
                            .filter(|fd| *fd > 2)
                            .ok_or_else(|| {
                                bad(
                                    "fd",
                                    &v,
                                    "use the number of an open TAP descriptor above 2 (0, 1 and 2 are godwit's standard input, output and error)",
                                )
                            })?,
                    ),
                    None => None,
                };
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
                match (&ifname, fd) {
                    (Some(_), Some(_)) => {
                        return Err(NetSpecError::Invalid {
                            spec,
                            what: "give either ifname= or fd=, not both".into(),
                        })
                    }
                    (None, None) => return Err(NetSpecError::Invalid {
                        spec,
                        what:
                            "a TAP peer needs ifname=NAME (opened or created) or fd=N (an open TAP)"
                                .into(),
                    }),
                    _ => {}
                }
                PeerSpec::Tap {
                    ifname,
                    fd,
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
            features,
        })
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
                fd: None,
                vnet_hdr: Some(false)
            }
        );
        assert_eq!(s.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(s.mtu, Some(9000));
        assert_eq!(s.strict, Some(true));
        assert_eq!(s.id.as_deref(), Some("net0"));
        assert_eq!(s.features.get("host_uso"), Some(&false));
        let s: NetSpec = "tap,fd=7".parse().unwrap();
        assert!(matches!(s.peer, PeerSpec::Tap { fd: Some(7), .. }));
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
            ("vhost-net", "needs ifname=NAME"),
        ] {
            let err = text.parse::<NetSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
