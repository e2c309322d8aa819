//! What a VM is made of, as the CLI (and later the API) gives it, with the
//! parsers for its textual forms.
// The command line is user input: no cast may silently truncate a value read from it.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub mod net_spec;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::boot::KernelImage;

/// Used when `--cmdline` is not given: a serial console, reset through the
/// i8042 (what the test guest and `panic=1` use to end the VM). Linux finds
/// CPUs, APICs and devices in godwit's ACPI tables.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp";
pub const DEFAULT_MEMORY: u64 = 128 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size '{0}': use a number with an optional K, M, G or T suffix (a bare number means MiB, as in QEMU), e.g. 512M or 2G")]
    Size(String),
    #[error("invalid serial '{0}': use stdio, null, or file:PATH[,max-size=SIZE]")]
    Serial(String),
    #[error("invalid duration '{0}': use a number with an optional ms, s, m or h suffix (a bare number means seconds), e.g. 30s or 5m")]
    Duration(String),
    #[error("--net {first} and --net {second} both hand over fd={fd}: each TAP descriptor belongs to one device; open one TAP per device")]
    FdTwice {
        fd: i32,
        first: String,
        second: String,
    },
}

/// Parses `512`, `512M`, `512MiB`, `2G`, `64k`. A bare number is MiB.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits_end);
    let value: u64 = number.parse().map_err(|_| err())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err()),
    };
    value
        .checked_mul(1u64 << shift)
        .filter(|v| *v > 0)
        .ok_or_else(err)
}

/// Parses `30s`, `5m`, `1h`, `500ms`; a bare number is seconds. Zero is
/// refused (a VM that ends before it starts is a mistake).
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Duration(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits_end);
    let value: u64 = number.parse().map_err(|_| err())?;
    let millis_per_unit: u64 = match suffix {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(err()),
    };
    value
        .checked_mul(millis_per_unit)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(err)
}

/// A size where a bare number means bytes (K, M, G, T suffixes as usual).
fn parse_size_bytes(text: &str) -> Result<u64, ConfigError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| ConfigError::Size(text.to_string()));
    }
    parse_size(text)
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialSpec {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file (at most `max_size` bytes of it written by
    /// this run, when given); no input.
    File {
        path: PathBuf,
        max_size: Option<u64>,
    },
    /// Discarded.
    Null,
}

impl FromStr for SerialSpec {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(SerialSpec::Stdio),
            "null" => Ok(SerialSpec::Null),
            _ => {
                let Some(rest) = s.strip_prefix("file:") else {
                    return Err(ConfigError::Serial(s.to_string()));
                };
                let (path, max_size) = match rest.rsplit_once(",max-size=") {
                    Some((path, size)) => (path, Some(parse_size_bytes(size)?)),
                    None => (rest, None),
                };
                if path.is_empty() {
                    return Err(ConfigError::Serial(s.to_string()));
                }
                Ok(SerialSpec::File {
                    path: PathBuf::from(path),
                    max_size,
                })
            }
        }
    }
}

/// How `--restore` brings guest memory back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreMemory {
    /// Map the memory file privately: no copy, pages load on first touch.
    #[default]
    Map,
    /// Copy the file into a fresh shared memfd (what a peer that maps guest
    /// memory itself, vhost-user, needs).
    Copy,
}

impl FromStr for RestoreMemory {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "map" => Ok(RestoreMemory::Map),
            "copy" => Ok(RestoreMemory::Copy),
            _ => Err(format!(
                "invalid restore memory mode '{s}': use map or copy"
            )),
        }
    }
}

pub struct VmConfig {
    pub restore_memory: RestoreMemory,
    /// A machine type name or the alias; resolved when the VM is built.
    pub machine: String,
    pub nets: Vec<crate::config::net_spec::NetSpec>,
    pub kernel: KernelImage,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub vcpus: u32,
    pub serial: SerialSpec,
    pub api_socket: Option<PathBuf>,
    /// QEMU's isa-debug-exit device at port 0xf4.
    pub debug_exit: bool,
    /// The VM is stopped after running this long.
    pub timeout: Option<Duration>,
}

impl VmConfig {
    /// Checks what no single option can: a descriptor handed to two
    /// devices would be owned, and closed, twice.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut seen: Vec<(i32, &str)> = Vec::new();
        for spec in &self.nets {
            if let net_spec::PeerSpec::Tap { fds, .. } = &spec.peer {
                for fd in fds {
                    if let Some((_, first)) = seen.iter().find(|(f, _)| f == fd) {
                        return Err(ConfigError::FdTwice {
                            fd: *fd,
                            first: first.to_string(),
                            second: spec.text.clone(),
                        });
                    }
                    seen.push((*fd, &spec.text));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_descriptor_given_to_two_devices_is_refused() {
        let config = VmConfig {
            restore_memory: RestoreMemory::Map,
            machine: "godwit".into(),
            nets: vec!["tap,fd=7".parse().unwrap(), "tap,fd=7".parse().unwrap()],
            kernel: KernelImage::Embedded {
                name: "test",
                bytes: &[],
            },
            initrd: None,
            cmdline: String::new(),
            memory: 128 << 20,
            vcpus: 1,
            serial: SerialSpec::Null,
            api_socket: None,
            debug_exit: false,
            timeout: None,
        };
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("both hand over fd=7"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "M",
            "12X",
            "-1",
            "1.5G",
            "0",
            "99999999999999T",
            "1 G G",
        ] {
            assert_eq!(parse_size(bad), Err(ConfigError::Size(bad.into())), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "s", "0s", "1.5s", "-1s", "3d", "99999999999999999999h"] {
            assert_eq!(
                parse_duration(bad),
                Err(ConfigError::Duration(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn serial_specs() {
        assert_eq!("stdio".parse(), Ok(SerialSpec::Stdio));
        assert_eq!("null".parse(), Ok(SerialSpec::Null));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialSpec::File {
                path: "/tmp/x".into(),
                max_size: None
            })
        );
        assert_eq!(
            "file:/tmp/x,max-size=1M".parse(),
            Ok(SerialSpec::File {
                path: "/tmp/x".into(),
                max_size: Some(1 << 20)
            })
        );
        assert_eq!(
            "file:/tmp/x,max-size=4096".parse(),
            Ok(SerialSpec::File {
                path: "/tmp/x".into(),
                max_size: Some(4096)
            })
        );
        assert!("file:/tmp/x,max-size=lots".parse::<SerialSpec>().is_err());
        assert!("file:".parse::<SerialSpec>().is_err());
        assert!("tcp:1".parse::<SerialSpec>().is_err());
    }
}
