//! Reading a report (a file `godwit host-caps` wrote, or an API argument):
//! the version header first, then the members through their `Deserialize`
//! types ([`super::types`]) with the JSON path of a bad member kept
//! (`serde_path_to_error`), then the checks that span members.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use godwit_devices::virtio::net::features;

use super::types::{
    schema_id, FeatureSet, HostReport, PeerEntry, PeerKind, PeerStatus, Probe, SCHEMA_NAME,
    SCHEMA_VERSION,
};
use crate::config::net_spec::{NetSpec, NetSpecError};

/// Why a report cannot be used. Each names the report (file or API
/// argument) and, when one is at fault, the JSON path of the field.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{file}: cannot read the host report: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not valid JSON (line {}, column {}): {}; a host report is what `godwit host-caps` prints", .source.line(), .source.column(), json_detail(.source))]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: field `schema`: the report has schema {found}, newer than the {SCHEMA_NAME}/{SCHEMA_VERSION} this godwit ({}) reads; plan with a godwit at least as new as the one that took the report", env!("CARGO_PKG_VERSION"))]
    Newer { file: String, found: String },
    #[error("{file}: field `{path}`: {problem}")]
    Field {
        file: String,
        /// `peers[1].supported.hex`; `(top level)` for the document itself.
        path: String,
        #[source]
        problem: Box<FieldProblem>,
    },
}

impl ReportError {
    /// The JSON path of the field at fault, if the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ReportError::Field { path, .. } => Some(path),
            ReportError::Newer { .. } => Some("schema"),
            _ => None,
        }
    }
}

/// What is wrong with one field of a report.
#[derive(Debug, thiserror::Error)]
pub enum FieldProblem {
    #[error("missing")]
    Missing,
    /// The member's type or spelling (serde's message, or that of the
    /// member's reader in [`super::encoding`]).
    #[error("{0}")]
    Invalid(#[source] serde_json::Error),
    #[error("expected an object, found {0}")]
    NotAnObject(&'static str),
    #[error("expected a string, found {0}")]
    NotAString(&'static str),
    #[error("'{found}' is not a host report schema; expected \"{}\"", schema_id())]
    NotASchema { found: String },
    #[error("version '{found}' is not a number; expected \"{}\"", schema_id())]
    VersionNotANumber { found: String },
    #[error("version 0 does not exist; expected \"{}\"", schema_id())]
    VersionZero,
    #[error("empty; a host needs a name")]
    EmptyHostName,
    #[error("empty; every godwit runs at least one machine type")]
    NoMachineTypes,
    #[error("names {name} (bit {bit}) but `hex` {hex} does not have that bit")]
    NameWithoutBit { name: String, bit: u32, hex: String },
    #[error("`hex` has bit {bit} ({name}) but the names do not list it")]
    BitWithoutName { bit: u32, name: &'static str },
    #[error("a {found} spec in a {kind} peer entry")]
    SpecOfAnotherKind { found: &'static str, kind: PeerKind },
    #[error(transparent)]
    Spec(#[from] NetSpecError),
    #[error("missing: a peer with status \"ok\" must say what it supports")]
    OkWithoutSupported,
    #[error("missing: a peer with status \"{0}\" must say why")]
    NoReason(PeerStatus),
    #[error("bit {0} is not a feature bit (0 to 127)")]
    NotAFeatureBit(u32),
}

/// serde_json's message without its " at line L column C" suffix.
fn json_detail(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A path as the messages write it: `peers[1].supported.hex`.
fn path_text(prefix: &str, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = prefix.to_string();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// Where a report is read from, for the messages.
struct Doc<'a> {
    file: &'a str,
}

impl Doc<'_> {
    fn err(&self, path: impl Into<String>, problem: FieldProblem) -> ReportError {
        self.field(FieldError {
            path: path.into(),
            problem: Box::new(problem),
        })
    }

    fn field(&self, FieldError { path, problem }: FieldError) -> ReportError {
        ReportError::Field {
            file: self.file.to_string(),
            path: if path.is_empty() {
                "(top level)".into()
            } else {
                path
            },
            problem,
        }
    }

    fn decode<'v, T: Deserialize<'v>>(&self, prefix: &str, v: &'v Value) -> Result<T, ReportError> {
        decode(prefix, v).map_err(|e| self.field(e))
    }

    fn schema(&self, root: &Value) -> Result<(), ReportError> {
        let Some(o) = root.as_object() else {
            return Err(self.err("", FieldProblem::NotAnObject(type_name(root))));
        };
        let s = match o.get("schema") {
            None | Some(Value::Null) => return Err(self.err("schema", FieldProblem::Missing)),
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(self.err("schema", FieldProblem::NotAString(type_name(other))))
            }
        };
        let version = s
            .strip_prefix(SCHEMA_NAME)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| self.err("schema", FieldProblem::NotASchema { found: s.clone() }))?;
        let n: u32 = version.parse().map_err(|_| {
            self.err(
                "schema",
                FieldProblem::VersionNotANumber {
                    found: version.into(),
                },
            )
        })?;
        if n == 0 {
            return Err(self.err("schema", FieldProblem::VersionZero));
        }
        if n > SCHEMA_VERSION {
            return Err(ReportError::Newer {
                file: self.file.to_string(),
                found: s.clone(),
            });
        }
        Ok(())
    }

    /// Names are for people, `hex` is authoritative: they must agree on
    /// every bit this godwit knows (a newer godwit may know more).
    fn feature_set(&self, at: &str, set: &FeatureSet) -> Result<FeatureSet, ReportError> {
        let bits = features::parse_hex(&set.hex).unwrap_or(0);
        for (i, n) in set.names.iter().enumerate() {
            if let Some(f) = features::by_name(n) {
                if bits & godwit_devices::virtio::feature(f.bit) == 0 {
                    return Err(self.err(
                        format!("{at}.names[{i}]"),
                        FieldProblem::NameWithoutBit {
                            name: n.clone(),
                            bit: f.bit,
                            hex: features::hex(bits),
                        },
                    ));
                }
            }
        }
        for b in features::bits(bits) {
            if let Some(f) = features::lookup(b) {
                if !set.names.iter().any(|n| n == f.name) {
                    return Err(self.err(
                        format!("{at}.names"),
                        FieldProblem::BitWithoutName {
                            bit: b,
                            name: f.name,
                        },
                    ));
                }
            }
        }
        Ok(FeatureSet {
            hex: features::hex(bits),
            names: set.names.clone(),
        })
    }

    fn peer(&self, i: usize, p: PeerEntry<Value>) -> Result<PeerEntry, ReportError> {
        let at = format!("peers[{i}]");
        if let Some(text) = &p.spec {
            match text.parse::<NetSpec>() {
                Ok(s) if s.peer.kind() == p.kind.as_str() => {}
                Ok(s) => {
                    return Err(self.err(
                        format!("{at}.spec"),
                        FieldProblem::SpecOfAnotherKind {
                            found: s.peer.kind(),
                            kind: p.kind,
                        },
                    ))
                }
                Err(e) => return Err(self.err(format!("{at}.spec"), e.into())),
            }
        }
        let supported = match &p.supported {
            Some(set) => Some(self.feature_set(&format!("{at}.supported"), set)?),
            None if p.status == PeerStatus::Ok => {
                return Err(self.err(format!("{at}.supported"), FieldProblem::OkWithoutSupported))
            }
            None => None,
        };
        if p.status != PeerStatus::Ok && p.error.is_none() {
            return Err(self.err(format!("{at}.error"), FieldProblem::NoReason(p.status)));
        }
        if let Some((j, l)) = p
            .lacks
            .iter()
            .enumerate()
            .find(|(_, l)| l.bit >= godwit_devices::virtio::FEATURE_BITS)
        {
            return Err(self.err(
                format!("{at}.lacks[{j}].bit"),
                FieldProblem::NotAFeatureBit(l.bit),
            ));
        }
        let probe_at = format!("{at}.probe");
        let probe = match p.kind {
            PeerKind::Tap => Probe::Tap(self.decode(&probe_at, &p.probe)?),
            PeerKind::VhostNet => Probe::VhostNet(self.decode(&probe_at, &p.probe)?),
            PeerKind::VhostUser => Probe::VhostUser(self.decode(&probe_at, &p.probe)?),
        };
        Ok(PeerEntry {
            supported,
            ..p.with_probe(probe)
        })
    }

    fn report(&self, root: &Value) -> Result<HostReport, ReportError> {
        // The version first: a report of a future version is refused for
        // its version, not for a field that changed.
        self.schema(root)?;
        let raw: HostReport<Value> = self.decode("", root)?;
        if raw.host.name.trim().is_empty() {
            return Err(self.err("host.name", FieldProblem::EmptyHostName));
        }
        let mut godwit = raw.godwit;
        let Some(last) = godwit.machine_types.last() else {
            return Err(self.err("godwit.machine_types", FieldProblem::NoMachineTypes));
        };
        if godwit.newest.is_empty() {
            godwit.newest = last.clone();
        }
        let peers = raw
            .peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.peer(i, p))
            .collect::<Result<_, _>>()?;
        Ok(HostReport {
            schema: schema_id(),
            host: raw.host,
            godwit,
            kvm: raw.kvm,
            cpuid: raw.cpuid,
            peers,
        })
    }
}

/// A bad member of a JSON document, by its path.
#[derive(Debug, thiserror::Error)]
#[error("field `{path}`: {problem}")]
pub struct FieldError {
    pub path: String,
    #[source]
    pub problem: Box<FieldProblem>,
}

/// Reads `T` from `v`, which is at `prefix` in its document (`""`: the
/// whole document). serde reports a missing member at its parent; the path
/// then names the member.
pub fn decode<'v, T: Deserialize<'v>>(prefix: &str, v: &'v Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let mut path = path_text(prefix, e.path());
        let inner = e.into_inner();
        let message = inner.to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'));
        match missing {
            Some(member) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(member);
                FieldError {
                    path,
                    problem: Box::new(FieldProblem::Missing),
                }
            }
            None => FieldError {
                path,
                problem: Box::new(FieldProblem::Invalid(inner)),
            },
        }
    })
}

/// Reads a report from a JSON value; `file` names it in errors (a path, or
/// `hosts[2]` for an API argument).
pub fn report_from_value(v: &Value, file: &str) -> Result<HostReport, ReportError> {
    Doc { file }.report(v)
}

/// Reads a report from its text.
pub fn parse_report(text: &str, file: &str) -> Result<HostReport, ReportError> {
    let v: Value = serde_json::from_str(text).map_err(|source| ReportError::Json {
        file: file.to_string(),
        source,
    })?;
    report_from_value(&v, file)
}

/// Reads a report file.
pub fn read_report_file(path: &Path) -> Result<HostReport, ReportError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        file: file.clone(),
        source,
    })?;
    parse_report(&text, &file)
}
