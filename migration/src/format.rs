//! godwit's versioned container for VM state: snapshot state files now, the
//! state part of the live-migration stream later.
//!
//! A container is a **fixed, hand-laid header** followed by typed sections.
//! The header is not part of any serialized payload, so every godwit, of any
//! later version, can read the header of any container and say what it holds
//! and what it cannot read (Firecracker puts its version inside the
//! serialized blob, so a newer binary cannot even read an old file's version).
//!
//! # Layout (all integers little-endian)
//!
//! The first 20 bytes, the *preamble*, keep this layout in every format
//! version, past and future:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8  | magic `GODWITSN` |
//! | 8  | 4  | format version |
//! | 12 | 4  | header length in bytes, up to and including the header CRC |
//! | 16 | 4  | CRC-32C of bytes 0..16 |
//!
//! Format version 1 continues:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 20 | 16 | architecture tag, NUL-padded (`x86_64`) |
//! | 36 | 32 | machine type name, NUL-padded |
//! | 68 | 4  | section count *n* |
//! | 72 | 8  | total file length |
//! | 80 | 64 × *n* | section table |
//! | 80 + 64*n* | 4 | CRC-32C of bytes 0 .. 80 + 64*n* (the header CRC) |
//!
//! Each section table entry:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4  | section kind id |
//! | 4  | 4  | section version |
//! | 8  | 4  | flags: bit 0 = required (a reader that does not know the kind must refuse the file) |
//! | 12 | 4  | instance (e.g. the vCPU index) |
//! | 16 | 8  | offset of the section bytes from the start of the file |
//! | 24 | 8  | length of the section bytes |
//! | 32 | 4  | CRC-32C of the section bytes |
//! | 36 | 4  | payload encoding: 0 = raw bytes, 1 = JSON |
//! | 40 | 24 | section name, NUL-padded (e.g. `vcpu 1`), so that any reader can name it |
//!
//! Sections follow the header in table order, back to back; the file ends
//! with the last section.
//!
//! # Versions
//!
//! The *format version* covers this header layout only. Each section carries
//! its own version, which covers its payload: a section type that changes
//! bumps its own version, and a reader states the range of versions it reads
//! for each kind it knows ([`SectionKind`]).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::atomic::{write_atomically, AtomicWriteError};
use crate::le::{bounded_u32, crc, u32_at, u64_at, usize_of};

/// The first bytes of every godwit container.
pub const MAGIC: [u8; 8] = *b"GODWITSN";
/// The header layout this godwit writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest header layout this godwit reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// The architecture tag of containers written on this host.
pub const HOST_ARCH: &str = std::env::consts::ARCH;

pub const ARCH_LEN: usize = 16;
pub const MACHINE_TYPE_LEN: usize = 32;
pub const SECTION_NAME_LEN: usize = 24;
/// The most sections one container may hold.
pub const MAX_SECTIONS: usize = 4096;
/// The largest container file read: device and vCPU state, never guest
/// RAM (which lives in the memory file), fit in far less.
pub const MAX_CONTAINER_FILE: u64 = 64 << 20;

const PREAMBLE_LEN: usize = 20;
const FIXED_LEN: usize = 80;
const ENTRY_LEN: usize = 64;
const CRC_LEN: usize = 4;
const MAX_HEADER_LEN: usize = FIXED_LEN + ENTRY_LEN * MAX_SECTIONS + CRC_LEN;

/// Section flag: a reader that does not know this section's kind must refuse
/// the whole container rather than skip the section.
pub const FLAG_REQUIRED: u32 = 1;

/// Kind ids of godwit's sections. An id is never reused for another meaning.
pub mod kind_ids {
    /// The VM's configuration (vCPU count, memory size, devices).
    pub const MACHINE_CONFIG: u32 = 1;
    /// VM-wide KVM state: irqchip, PIT, kvmclock.
    pub const VM: u32 = 2;
    /// One vCPU's KVM state; the instance is the vCPU index.
    pub const VCPU: u32 = 3;
    /// Where guest memory is and how it is laid out (the memory file).
    pub const MEMORY: u32 = 4;
    /// Device states start here; each device kind takes its own id.
    pub const FIRST_DEVICE: u32 = 256;
}

/// How a section's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Bytes whose meaning the section kind defines.
    Raw = 0,
    /// A serde payload as JSON.
    Json = 1,
}

impl Encoding {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Json),
            _ => None,
        }
    }
}

/// A kind of section as this godwit knows it: what it writes and which
/// versions it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionKind {
    /// Stable id, from [`kind_ids`].
    pub id: u32,
    /// Short name used in section names and messages, e.g. "vcpu".
    pub name: &'static str,
    /// The version this godwit writes, and the newest it reads.
    pub version: u32,
    /// The oldest version this godwit reads.
    pub min_version: u32,
    /// Whether a godwit that does not know this kind must refuse the file.
    pub required: bool,
    /// Whether there is one section per instance ("vcpu 0", "vcpu 1") rather
    /// than one in all ("vm").
    pub instanced: bool,
}

impl SectionKind {
    /// The name a section of this kind gets in the file and in messages.
    pub fn section_name(&self, instance: u32) -> String {
        if self.instanced {
            format!("{} {instance}", self.name)
        } else {
            self.name.to_string()
        }
    }
}

/// One entry of the section table, as read from a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    pub kind: u32,
    pub version: u32,
    pub flags: u32,
    pub instance: u32,
    pub offset: u64,
    pub length: u64,
    pub crc: u32,
    pub encoding: u32,
    pub name: String,
}

impl SectionEntry {
    pub fn required(&self) -> bool {
        self.flags & FLAG_REQUIRED != 0
    }
}

/// A container header: what any godwit can tell about any container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub header_len: u32,
    pub arch: String,
    pub machine_type: String,
    pub file_len: u64,
    pub sections: Vec<SectionEntry>,
}

impl Header {
    /// What the file holds, one line per section, marking the kinds absent
    /// from `known`: what `godwit` can say about any snapshot, readable or
    /// not.
    pub fn describe(&self, known: &[SectionKind]) -> String {
        let mut out = format!(
            "godwit snapshot, format version {}, {} machine '{}', {} bytes, {} sections\n",
            self.format_version,
            self.arch,
            self.machine_type,
            self.file_len,
            self.sections.len()
        );
        for s in &self.sections {
            let status = match known.iter().find(|k| k.id == s.kind) {
                None if s.required() => "unknown to this godwit, required".to_string(),
                None => "unknown to this godwit, optional".to_string(),
                Some(k) if s.version > k.version => {
                    format!("too new: this godwit reads up to version {}", k.version)
                }
                Some(k) if s.version < k.min_version => {
                    format!("too old: this godwit reads from version {}", k.min_version)
                }
                Some(_) => "readable".to_string(),
            };
            out.push_str(&format!(
                "  '{}': kind {}, version {}, {} bytes: {status}\n",
                s.name, s.kind, s.version, s.length
            ));
        }
        out
    }
}

/// Why a container could not be written or read. Every message says which
/// part of the file failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a godwit snapshot: the file starts with {found} instead of \"GODWITSN\"; check that the path names a snapshot state file (the memory file is a separate file)")]
    NotGodwit { found: String },
    #[error("{what} is truncated: expected {expected} bytes, found {found}; the file was cut short (interrupted copy or full disk): use a complete copy")]
    Truncated {
        what: String,
        expected: u64,
        found: u64,
    },
    #[error("the snapshot header is corrupt: {detail}; the file was damaged after it was written: use an intact copy")]
    HeaderCorrupt { detail: String },
    #[error("the snapshot was written by format version {found}; this godwit reads up to {max}: upgrade godwit")]
    NewerFormat { found: u32, max: u32 },
    #[error("the snapshot was written by format version {found}, older than {min}, the oldest this godwit reads: restore it with an older godwit release and save it again")]
    OlderFormat { found: u32, min: u32 },
    #[error("snapshot is for {file}, this host is {host}: restore it on a {file} host")]
    OtherArch { file: String, host: String },
    #[error("the file has {extra} bytes after its last section (expected {expected} bytes, found {found}): it is not one intact snapshot; use the file as it was written")]
    TrailingData {
        extra: u64,
        expected: u64,
        found: u64,
    },
    #[error("section '{name}' (kind {kind}, version {version}) is required but this godwit does not know it: it was written by a newer godwit; upgrade godwit")]
    UnknownRequiredSection {
        name: String,
        kind: u32,
        version: u32,
    },
    #[error("section '{name}' is corrupt: checksum {computed:#010x} does not match the stored {stored:#010x}; the file was damaged after it was written: use an intact copy")]
    SectionCorrupt {
        name: String,
        stored: u32,
        computed: u32,
    },
    #[error("section '{name}' has version {found}; this godwit reads up to {max}: upgrade godwit")]
    SectionTooNew { name: String, found: u32, max: u32 },
    #[error("section '{name}' has version {found}, older than {min}, the oldest this godwit reads: restore it with an older godwit release")]
    SectionTooOld { name: String, found: u32, min: u32 },
    #[error("section '{name}' has payload encoding {encoding}, which this godwit does not know: upgrade godwit")]
    UnknownEncoding { name: String, encoding: u32 },
    #[error("the snapshot has no section '{name}', which restoring needs: the file was written by an incomplete or different save")]
    SectionMissing { name: String },
    #[error("section '{name}' (version {version}) cannot be decoded: {source}; the file was written by a godwit whose state this one cannot read: restore with the godwit release that saved it")]
    Payload {
        name: String,
        version: u32,
        source: serde_json::Error,
    },
    #[error("section '{name}' (version {version}) is encoded as {encoding}, not JSON; the file was written by a godwit whose state this one cannot read: restore with the godwit release that saved it")]
    NotJson {
        name: String,
        version: u32,
        encoding: u32,
    },
    #[error("cannot encode section '{name}': {source}")]
    Encode {
        name: String,
        source: serde_json::Error,
    },
    #[error("{} is not a regular file: give the state file a snapshot directory holds", path.display())]
    NotAFile { path: std::path::PathBuf },
    #[error("{} is {len} bytes, more than the {MAX_CONTAINER_FILE} bytes a state file can hold: it is not a godwit state file", path.display())]
    TooLarge { path: std::path::PathBuf, len: u64 },
    #[error(
        "cannot build the snapshot: {what} {tag:?} must be 1 to {len} printable ASCII characters"
    )]
    BadTag {
        what: &'static str,
        tag: String,
        len: usize,
    },
    #[error("cannot build the snapshot: section '{name}' was added twice")]
    DuplicateSection { name: String },
    #[error("cannot build the snapshot: more than {MAX_SECTIONS} sections")]
    TooManySections,
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
}

/// Checks a tag fits a NUL-padded field: printable ASCII, not empty.
fn check_tag(what: &'static str, tag: &str, len: usize) -> Result<(), FormatError> {
    if tag.is_empty() || tag.len() > len || !tag.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(FormatError::BadTag {
            what,
            tag: tag.to_string(),
            len,
        });
    }
    Ok(())
}

fn put_tag(out: &mut Vec<u8>, tag: &str, len: usize) {
    let mut field = vec![0u8; len];
    field[..tag.len()].copy_from_slice(tag.as_bytes());
    out.extend_from_slice(&field);
}

/// Reads a NUL-padded tag; `None` when it is not printable ASCII.
fn get_tag(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let (text, padding) = field.split_at(end);
    if text.is_empty()
        || padding.iter().any(|&b| b != 0)
        || !text.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
    {
        return None;
    }
    Some(String::from_utf8_lossy(text).into_owned())
}

fn escape(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

fn corrupt(detail: impl Into<String>) -> FormatError {
    FormatError::HeaderCorrupt {
        detail: detail.into(),
    }
}

/// Reads and checks the header of a container: magic, checksums, format
/// version and the section table. It does not look at the sections' bytes
/// nor at the architecture, so it can describe files this host cannot
/// restore.
pub fn read_header(bytes: &[u8]) -> Result<Header, FormatError> {
    let found = bytes.len() as u64;
    let header_truncated = |expected: usize| FormatError::Truncated {
        what: "the header".to_string(),
        expected: expected as u64,
        found,
    };
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            header_truncated(PREAMBLE_LEN)
        } else {
            FormatError::NotGodwit {
                found: escape(bytes),
            }
        });
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::NotGodwit {
            found: escape(&bytes[..8]),
        });
    }
    if bytes.len() < PREAMBLE_LEN {
        return Err(header_truncated(PREAMBLE_LEN));
    }
    let stored = u32_at(bytes, 16);
    let computed = crc(&bytes[..16]);
    if stored != computed {
        return Err(corrupt(format!(
            "the checksum of its first 16 bytes is {computed:#010x}, not the stored {stored:#010x}"
        )));
    }
    let format_version = u32_at(bytes, 8);
    if format_version > FORMAT_VERSION {
        return Err(FormatError::NewerFormat {
            found: format_version,
            max: FORMAT_VERSION,
        });
    }
    if format_version < MIN_FORMAT_VERSION {
        return Err(FormatError::OlderFormat {
            found: format_version,
            min: MIN_FORMAT_VERSION,
        });
    }
    let header_field = u32_at(bytes, 12);
    let header_len = header_field as usize;
    if !(FIXED_LEN + CRC_LEN..=MAX_HEADER_LEN).contains(&header_len) {
        return Err(corrupt(format!(
            "its length {header_len} is impossible for format version {format_version}"
        )));
    }
    if bytes.len() < header_len {
        return Err(header_truncated(header_len));
    }
    let body = header_len - CRC_LEN;
    let stored = u32_at(bytes, body);
    let computed = crc(&bytes[..body]);
    if stored != computed {
        return Err(corrupt(format!(
            "its checksum is {computed:#010x}, not the stored {stored:#010x}"
        )));
    }
    // From here the header is as its writer made it: inconsistencies are a
    // writer's bug, reported the same way.
    let arch =
        get_tag(&bytes[20..36]).ok_or_else(|| corrupt("its architecture tag is not text"))?;
    let machine_type =
        get_tag(&bytes[36..68]).ok_or_else(|| corrupt("its machine type is not text"))?;
    let count = u32_at(bytes, 68) as usize;
    if FIXED_LEN + ENTRY_LEN * count + CRC_LEN != header_len {
        return Err(corrupt(format!(
            "{count} sections do not fit its length {header_len}"
        )));
    }
    let file_len = u64_at(bytes, 72);
    let mut sections = Vec::with_capacity(count);
    let mut next = header_len as u64;
    for i in 0..count {
        let e = &bytes[FIXED_LEN + i * ENTRY_LEN..FIXED_LEN + (i + 1) * ENTRY_LEN];
        let name = get_tag(&e[40..64])
            .ok_or_else(|| corrupt(format!("the name of section {i} is not text")))?;
        let entry = SectionEntry {
            kind: u32_at(e, 0),
            version: u32_at(e, 4),
            flags: u32_at(e, 8),
            instance: u32_at(e, 12),
            offset: u64_at(e, 16),
            length: u64_at(e, 24),
            crc: u32_at(e, 32),
            encoding: u32_at(e, 36),
            name,
        };
        if entry.offset != next {
            return Err(corrupt(format!(
                "section '{}' starts at byte {}, not right after the previous one at {next}",
                entry.name, entry.offset
            )));
        }
        next = entry
            .offset
            .checked_add(entry.length)
            .ok_or_else(|| corrupt(format!("section '{}' has an impossible length", entry.name)))?;
        if sections
            .iter()
            .any(|s: &SectionEntry| s.kind == entry.kind && s.instance == entry.instance)
        {
            return Err(corrupt(format!("section '{}' appears twice", entry.name)));
        }
        sections.push(entry);
    }
    if next != file_len {
        return Err(corrupt(format!(
            "its sections end at byte {next} but it gives the file length as {file_len}"
        )));
    }
    Ok(Header {
        format_version,
        header_len: header_field,
        arch,
        machine_type,
        file_len,
        sections,
    })
}

/// A container whose header and sections have been checked against what
/// this godwit knows, ready to hand out typed sections.
#[derive(Debug)]
pub struct Container {
    header: Header,
    bytes: Vec<u8>,
    skipped: Vec<SectionEntry>,
}

impl Container {
    /// Checks everything before any state is used: header, architecture,
    /// length, and for every section its kind, version, checksum and
    /// encoding. `known` lists the section kinds this godwit reads; optional
    /// sections of other kinds are skipped (see [`Container::skipped`]),
    /// required ones refuse the file.
    pub fn from_bytes(bytes: Vec<u8>, known: &[SectionKind]) -> Result<Self, FormatError> {
        let header = read_header(&bytes)?;
        if header.arch != HOST_ARCH {
            return Err(FormatError::OtherArch {
                file: header.arch,
                host: HOST_ARCH.to_string(),
            });
        }
        let found = bytes.len() as u64;
        if found < header.file_len {
            let cut = header
                .sections
                .iter()
                .find(|s| s.offset + s.length > found)
                .map(|s| format!("section '{}'", s.name))
                .unwrap_or_else(|| "the file".to_string());
            return Err(FormatError::Truncated {
                what: cut,
                expected: header.file_len,
                found,
            });
        }
        if found > header.file_len {
            return Err(FormatError::TrailingData {
                extra: found - header.file_len,
                expected: header.file_len,
                found,
            });
        }
        let mut skipped = Vec::new();
        for s in &header.sections {
            let Some(kind) = known.iter().find(|k| k.id == s.kind) else {
                if s.required() {
                    return Err(FormatError::UnknownRequiredSection {
                        name: s.name.clone(),
                        kind: s.kind,
                        version: s.version,
                    });
                }
                skipped.push(s.clone());
                continue;
            };
            if s.version > kind.version {
                return Err(FormatError::SectionTooNew {
                    name: s.name.clone(),
                    found: s.version,
                    max: kind.version,
                });
            }
            if s.version < kind.min_version {
                return Err(FormatError::SectionTooOld {
                    name: s.name.clone(),
                    found: s.version,
                    min: kind.min_version,
                });
            }
            let data = &bytes[usize_of(s.offset)..usize_of(s.offset + s.length)];
            let computed = crc(data);
            if computed != s.crc {
                return Err(FormatError::SectionCorrupt {
                    name: s.name.clone(),
                    stored: s.crc,
                    computed,
                });
            }
            if Encoding::from_u32(s.encoding).is_none() {
                return Err(FormatError::UnknownEncoding {
                    name: s.name.clone(),
                    encoding: s.encoding,
                });
            }
        }
        Ok(Container {
            header,
            bytes,
            skipped,
        })
    }

    /// Reads and checks a container file (see [`Container::from_bytes`]).
    /// Only a regular file is read, and at most [`MAX_CONTAINER_FILE`]
    /// bytes of it: a FIFO or device at the path, or a file grown without
    /// bound, is refused instead of read into memory.
    pub fn read_file(path: &Path, known: &[SectionKind]) -> Result<Self, FormatError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let read_err = |source| FormatError::Read {
            path: path.to_path_buf(),
            source,
        };
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
        // writer before the check below could refuse it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(FormatError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        if meta.len() > MAX_CONTAINER_FILE {
            return Err(FormatError::TooLarge {
                path: path.to_path_buf(),
                len: meta.len(),
            });
        }
        let mut bytes = Vec::with_capacity(usize_of(meta.len()));
        file.take(MAX_CONTAINER_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONTAINER_FILE {
            return Err(FormatError::TooLarge {
                path: path.to_path_buf(),
                len: bytes.len() as u64,
            });
        }
        Self::from_bytes(bytes, known)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Optional sections this godwit does not know and ignored.
    pub fn skipped(&self) -> &[SectionEntry] {
        &self.skipped
    }

    /// The table entry of a section, if the container has it.
    pub fn entry(&self, kind: &SectionKind, instance: u32) -> Option<&SectionEntry> {
        self.header
            .sections
            .iter()
            .find(|s| s.kind == kind.id && s.instance == instance)
    }

    /// The instances present of a kind, in file order (e.g. vCPU indices).
    pub fn instances(&self, kind: &SectionKind) -> Vec<u32> {
        self.header
            .sections
            .iter()
            .filter(|s| s.kind == kind.id)
            .map(|s| s.instance)
            .collect()
    }

    fn require(&self, kind: &SectionKind, instance: u32) -> Result<&SectionEntry, FormatError> {
        self.entry(kind, instance)
            .ok_or_else(|| FormatError::SectionMissing {
                name: kind.section_name(instance),
            })
    }

    /// The bytes of a section.
    pub fn raw_section(&self, kind: &SectionKind, instance: u32) -> Result<&[u8], FormatError> {
        let s = self.require(kind, instance)?;
        Ok(&self.bytes[usize_of(s.offset)..usize_of(s.offset + s.length)])
    }

    /// Decodes a JSON section. `T` must read every version from
    /// `kind.min_version` to `kind.version`; [`Container::entry`] tells which
    /// one the file has.
    pub fn section<T: DeserializeOwned>(
        &self,
        kind: &SectionKind,
        instance: u32,
    ) -> Result<T, FormatError> {
        let s = self.require(kind, instance)?;
        if s.encoding != Encoding::Json as u32 {
            return Err(FormatError::NotJson {
                name: s.name.clone(),
                version: s.version,
                encoding: s.encoding,
            });
        }
        let data = &self.bytes[usize_of(s.offset)..usize_of(s.offset + s.length)];
        serde_json::from_slice(data).map_err(|source| FormatError::Payload {
            name: s.name.clone(),
            version: s.version,
            source,
        })
    }

    /// Like [`Container::section`], `None` when the file has no such section.
    pub fn optional_section<T: DeserializeOwned>(
        &self,
        kind: &SectionKind,
        instance: u32,
    ) -> Result<Option<T>, FormatError> {
        if self.entry(kind, instance).is_none() {
            return Ok(None);
        }
        self.section(kind, instance).map(Some)
    }
}

struct PendingSection {
    kind: u32,
    version: u32,
    flags: u32,
    instance: u32,
    encoding: Encoding,
    name: String,
    data: Vec<u8>,
}

/// Builds a container section by section.
pub struct ContainerWriter {
    arch: String,
    machine_type: String,
    format_version: u32,
    sections: Vec<PendingSection>,
}

impl ContainerWriter {
    /// A container for a VM of `machine_type` on this host's architecture.
    pub fn new(machine_type: &str) -> Result<Self, FormatError> {
        check_tag("the machine type", machine_type, MACHINE_TYPE_LEN)?;
        Ok(ContainerWriter {
            arch: HOST_ARCH.to_string(),
            machine_type: machine_type.to_string(),
            format_version: FORMAT_VERSION,
            sections: Vec::new(),
        })
    }

    /// Adds a section of `kind` with the bytes of `data`, at the version this
    /// godwit writes.
    pub fn add_raw(
        &mut self,
        kind: &SectionKind,
        instance: u32,
        encoding: Encoding,
        data: Vec<u8>,
    ) -> Result<(), FormatError> {
        let name = kind.section_name(instance);
        check_tag("the section name", &name, SECTION_NAME_LEN)?;
        if self
            .sections
            .iter()
            .any(|s| s.kind == kind.id && s.instance == instance)
        {
            return Err(FormatError::DuplicateSection { name });
        }
        if self.sections.len() >= MAX_SECTIONS {
            return Err(FormatError::TooManySections);
        }
        self.sections.push(PendingSection {
            kind: kind.id,
            version: kind.version,
            flags: if kind.required { FLAG_REQUIRED } else { 0 },
            instance,
            encoding,
            name,
            data,
        });
        Ok(())
    }

    /// Adds `payload` as a JSON section of `kind`.
    pub fn add<T: Serialize>(
        &mut self,
        kind: &SectionKind,
        instance: u32,
        payload: &T,
    ) -> Result<(), FormatError> {
        let data = serde_json::to_vec(payload).map_err(|source| FormatError::Encode {
            name: kind.section_name(instance),
            source,
        })?;
        self.add_raw(kind, instance, Encoding::Json, data)
    }

    /// The complete container.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header_len = FIXED_LEN + ENTRY_LEN * self.sections.len() + CRC_LEN;
        let data_len: usize = self.sections.iter().map(|s| s.data.len()).sum();
        let file_len = (header_len + data_len) as u64;
        let mut out = Vec::with_capacity(header_len + data_len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.format_version.to_le_bytes());
        out.extend_from_slice(&bounded_u32(header_len).to_le_bytes());
        let preamble_crc = crc(&out);
        out.extend_from_slice(&preamble_crc.to_le_bytes());
        put_tag(&mut out, &self.arch, ARCH_LEN);
        put_tag(&mut out, &self.machine_type, MACHINE_TYPE_LEN);
        out.extend_from_slice(&bounded_u32(self.sections.len()).to_le_bytes());
        out.extend_from_slice(&file_len.to_le_bytes());
        let mut offset = header_len as u64;
        for s in &self.sections {
            out.extend_from_slice(&s.kind.to_le_bytes());
            out.extend_from_slice(&s.version.to_le_bytes());
            out.extend_from_slice(&s.flags.to_le_bytes());
            out.extend_from_slice(&s.instance.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&(s.data.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc(&s.data).to_le_bytes());
            out.extend_from_slice(&(s.encoding as u32).to_le_bytes());
            put_tag(&mut out, &s.name, SECTION_NAME_LEN);
            offset += s.data.len() as u64;
        }
        let header_crc = crc(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        for s in &self.sections {
            out.extend_from_slice(&s.data);
        }
        out
    }

    /// Writes the container to `path` atomically: a failed save leaves the
    /// previous file, if any, in place (see [`crate::atomic`]).
    pub fn write_file(&self, path: &Path) -> Result<(), FormatError> {
        use std::io::Write;
        let bytes = self.to_bytes();
        write_atomically(path, |f| f.write_all(&bytes))?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use vmm_sys_util::tempdir::TempDir;

    const VM: SectionKind = SectionKind {
        id: kind_ids::VM,
        name: "vm",
        version: 2,
        min_version: 1,
        required: true,
        instanced: false,
    };
    const VCPU: SectionKind = SectionKind {
        id: kind_ids::VCPU,
        name: "vcpu",
        version: 1,
        min_version: 1,
        required: true,
        instanced: true,
    };
    const NOTES: SectionKind = SectionKind {
        id: 999,
        name: "notes",
        version: 1,
        min_version: 1,
        required: false,
        instanced: false,
    };
    const KNOWN: &[SectionKind] = &[VM, VCPU];

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct VmPayload {
        clock: u64,
        name: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct VcpuPayload {
        rip: u64,
        msrs: Vec<(u32, u64)>,
    }

    fn sample() -> ContainerWriter {
        let mut w = ContainerWriter::new("godwit-pc-1").unwrap();
        w.add(
            &VM,
            0,
            &VmPayload {
                clock: 123_456_789,
                name: "guest".into(),
            },
        )
        .unwrap();
        for i in 0..2u32 {
            w.add(
                &VCPU,
                i,
                &VcpuPayload {
                    rip: 0x1000 + u64::from(i),
                    msrs: vec![(0x10, 42), (0x4b56_4d01, u64::from(i))],
                },
            )
            .unwrap();
        }
        w
    }

    /// Recomputes the checksums of a hand-edited header.
    fn reseal(bytes: &mut [u8]) {
        let c = crc(&bytes[..16]);
        bytes[16..20].copy_from_slice(&c.to_le_bytes());
        let header_field = u32_at(bytes, 12);
        let header_len = header_field as usize;
        let c = crc(&bytes[..header_len - 4]);
        bytes[header_len - 4..header_len].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn round_trip() {
        let bytes = sample().to_bytes();
        let c = Container::from_bytes(bytes.clone(), KNOWN).unwrap();
        assert_eq!(c.header().machine_type, "godwit-pc-1");
        assert_eq!(c.header().arch, HOST_ARCH);
        assert_eq!(c.header().format_version, FORMAT_VERSION);
        assert_eq!(c.header().file_len, bytes.len() as u64);
        let vm: VmPayload = c.section(&VM, 0).unwrap();
        assert_eq!(vm.clock, 123_456_789);
        assert_eq!(c.instances(&VCPU), vec![0, 1]);
        let v1: VcpuPayload = c.section(&VCPU, 1).unwrap();
        assert_eq!(v1.rip, 0x1001);
        assert_eq!(c.entry(&VCPU, 1).unwrap().name, "vcpu 1");
        assert!(c.entry(&VCPU, 1).unwrap().required());
        assert!(c.skipped().is_empty());
        let missing = c.section::<VcpuPayload>(&VCPU, 7).unwrap_err();
        assert!(matches!(&missing, FormatError::SectionMissing { name } if name == "vcpu 7"));
        assert!(c
            .optional_section::<VcpuPayload>(&VCPU, 7)
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_empty_container_round_trips() {
        let w = ContainerWriter::new("m").unwrap();
        let c = Container::from_bytes(w.to_bytes(), KNOWN).unwrap();
        assert!(c.header().sections.is_empty());
    }

    /// Reads `bytes` cut to `cut` bytes; returns what the Truncated error
    /// names, expected and found, and the error itself.
    fn truncated_at(bytes: &[u8], cut: usize) -> (String, u64, u64, FormatError) {
        let err = Container::from_bytes(bytes[..cut].to_vec(), KNOWN).unwrap_err();
        match &err {
            FormatError::Truncated {
                what,
                expected,
                found,
            } => (what.clone(), *expected, *found, err),
            other => panic!("cut at {cut}: {other}"),
        }
    }

    #[test]
    fn truncation_names_the_cut_part() {
        let bytes = sample().to_bytes();
        let header = read_header(&bytes).unwrap();
        let header_len = header.header_len as usize;
        for cut in [0, 3, 8, 19, 20, 50, header_len - 1] {
            let (what, expected, found, _) = truncated_at(&bytes, cut);
            assert_eq!(what, "the header", "cut at {cut}");
            assert_eq!(found, cut as u64);
            assert!(expected > cut as u64);
        }
        for s in &header.sections {
            let (start, len) = (s.offset as usize, s.length as usize);
            for cut in [start, start + 1, start + len / 2, start + len - 1] {
                let (what, expected, found, err) = truncated_at(&bytes, cut);
                assert_eq!(what, format!("section '{}'", s.name), "cut at {cut}");
                assert_eq!(expected, bytes.len() as u64);
                assert_eq!(found, cut as u64);
                let msg = err.to_string();
                assert!(msg.contains(&s.name) && msg.contains("expected"), "{msg}");
            }
        }
    }

    #[test]
    fn every_flipped_bit_in_a_section_names_that_section() {
        let bytes = sample().to_bytes();
        let header = read_header(&bytes).unwrap();
        for s in &header.sections {
            for byte in [s.offset, s.offset + s.length / 2, s.offset + s.length - 1] {
                for bit in 0..8 {
                    let mut b = bytes.clone();
                    b[byte as usize] ^= 1 << bit;
                    let err = Container::from_bytes(b, KNOWN).unwrap_err();
                    match &err {
                        FormatError::SectionCorrupt { name, .. } => assert_eq!(name, &s.name),
                        other => panic!("byte {byte} bit {bit}: {other}"),
                    }
                    let msg = err.to_string();
                    assert!(
                        msg.starts_with(&format!("section '{}' is corrupt: checksum", s.name)),
                        "{msg}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_flipped_bit_in_the_header_is_caught() {
        let bytes = sample().to_bytes();
        let header_len = read_header(&bytes).unwrap().header_len as usize;
        for byte in 0..header_len {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[byte] ^= 1 << bit;
                let err = Container::from_bytes(b, KNOWN).unwrap_err();
                match (&err, byte) {
                    (FormatError::NotGodwit { .. }, 0..=7) => {}
                    (FormatError::HeaderCorrupt { .. }, 8..) => {}
                    other => panic!("byte {byte} bit {bit}: {}", other.0),
                }
            }
        }
    }

    #[test]
    fn wrong_magic() {
        let mut b = sample().to_bytes();
        b[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        let err = Container::from_bytes(b, KNOWN).unwrap_err();
        assert!(matches!(err, FormatError::NotGodwit { .. }));
        assert!(
            err.to_string().starts_with("not a godwit snapshot"),
            "{err}"
        );
        let err = Container::from_bytes(b"hi".to_vec(), KNOWN).unwrap_err();
        assert!(matches!(err, FormatError::NotGodwit { .. }), "{err}");
    }

    #[test]
    fn newer_and_older_format_versions() {
        let mut b = sample().to_bytes();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        // A newer layout may be anything past the preamble: only the preamble
        // checksum is valid.
        let c = crc(&b[..16]);
        b[16..20].copy_from_slice(&c.to_le_bytes());
        b.truncate(PREAMBLE_LEN + 5);
        let err = Container::from_bytes(b, KNOWN).unwrap_err();
        assert!(
            matches!(err, FormatError::NewerFormat { found, max } if found == FORMAT_VERSION + 1 && max == FORMAT_VERSION)
        );
        assert_eq!(
            err.to_string(),
            format!("the snapshot was written by format version {}; this godwit reads up to {}: upgrade godwit", FORMAT_VERSION + 1, FORMAT_VERSION)
        );
        let mut b = sample().to_bytes();
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        reseal(&mut b);
        let err = Container::from_bytes(b, KNOWN).unwrap_err();
        assert!(
            matches!(err, FormatError::OlderFormat { found: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn other_architecture() {
        let mut w = sample();
        w.arch = "aarch64".into();
        let bytes = w.to_bytes();
        // Any godwit can still read the header.
        assert_eq!(read_header(&bytes).unwrap().arch, "aarch64");
        let err = Container::from_bytes(bytes, KNOWN).unwrap_err();
        assert!(matches!(err, FormatError::OtherArch { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "snapshot is for aarch64, this host is {HOST_ARCH}: restore it on a aarch64 host"
            )
        );
    }

    #[test]
    fn unknown_sections_required_or_optional() {
        let mut w = sample();
        w.add(&NOTES, 0, &"free text").unwrap();
        let c = Container::from_bytes(w.to_bytes(), KNOWN).unwrap();
        assert_eq!(c.skipped().len(), 1);
        assert_eq!(c.skipped()[0].name, "notes");

        let balloon = SectionKind {
            id: 4242,
            name: "balloon",
            required: true,
            ..NOTES
        };
        let mut w = sample();
        w.add(&balloon, 0, &1u32).unwrap();
        let err = Container::from_bytes(w.to_bytes(), KNOWN).unwrap_err();
        assert!(
            matches!(&err, FormatError::UnknownRequiredSection { name, kind: 4242, .. } if name == "balloon")
        );
        assert!(err.to_string().contains("upgrade godwit"), "{err}");
    }

    #[test]
    fn section_versions_outside_the_readable_range() {
        let newer = SectionKind {
            version: VCPU.version + 1,
            ..VCPU
        };
        let mut w = ContainerWriter::new("m").unwrap();
        w.add(
            &VM,
            0,
            &VmPayload {
                clock: 1,
                name: "x".into(),
            },
        )
        .unwrap();
        w.add(
            &newer,
            3,
            &VcpuPayload {
                rip: 0,
                msrs: vec![],
            },
        )
        .unwrap();
        let err = Container::from_bytes(w.to_bytes(), KNOWN).unwrap_err();
        assert!(
            matches!(&err, FormatError::SectionTooNew { name, found: 2, max: 1 } if name == "vcpu 3"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "section 'vcpu 3' has version 2; this godwit reads up to 1: upgrade godwit"
        );
        let older = SectionKind { version: 0, ..VM };
        let mut w = ContainerWriter::new("m").unwrap();
        w.add(&older, 0, &1u8).unwrap();
        let err = Container::from_bytes(w.to_bytes(), KNOWN).unwrap_err();
        assert!(matches!(&err, FormatError::SectionTooOld { name, .. } if name == "vm"));
    }

    #[test]
    fn payloads_that_do_not_decode_name_the_section() {
        let mut w = ContainerWriter::new("m").unwrap();
        w.add(&VCPU, 0, &"not a vcpu").unwrap();
        w.add_raw(&VM, 0, Encoding::Raw, vec![1, 2, 3]).unwrap();
        let c = Container::from_bytes(w.to_bytes(), KNOWN).unwrap();
        let err = c.section::<VcpuPayload>(&VCPU, 0).unwrap_err();
        assert!(matches!(&err, FormatError::Payload { name, .. } if name == "vcpu 0"));
        assert!(err
            .to_string()
            .starts_with("section 'vcpu 0' (version 1) cannot be decoded"));
        assert!(c.section::<VmPayload>(&VM, 0).is_err());
        assert_eq!(c.raw_section(&VM, 0).unwrap(), &[1, 2, 3]);
    }

    #[test]
    fn unknown_encodings_and_trailing_bytes_are_refused() {
        let mut b = sample().to_bytes();
        // Encoding field of the first entry.
        b[FIXED_LEN + 36..FIXED_LEN + 40].copy_from_slice(&7u32.to_le_bytes());
        reseal(&mut b);
        let err = Container::from_bytes(b, KNOWN).unwrap_err();
        assert!(matches!(&err, FormatError::UnknownEncoding { name, encoding: 7 } if name == "vm"));

        let mut b = sample().to_bytes();
        b.extend_from_slice(b"junk");
        let err = Container::from_bytes(b, KNOWN).unwrap_err();
        assert!(matches!(err, FormatError::TrailingData { extra: 4, .. }));
    }

    #[test]
    fn writer_refuses_bad_input() {
        assert!(ContainerWriter::new("").is_err());
        assert!(ContainerWriter::new(&"x".repeat(33)).is_err());
        assert!(ContainerWriter::new("bad\0name").is_err());
        let mut w = ContainerWriter::new("m").unwrap();
        w.add(&VCPU, 0, &1u8).unwrap();
        let err = w.add(&VCPU, 0, &1u8).unwrap_err();
        assert!(
            err.to_string().contains("'vcpu 0' was added twice"),
            "{err}"
        );
        let long = SectionKind {
            name: "a-very-long-section-kind-name",
            ..VCPU
        };
        assert!(w.add(&long, 0, &1u8).is_err());
    }

    #[test]
    fn the_header_describes_sections_this_godwit_cannot_read() {
        let mut w = sample();
        w.add(&NOTES, 0, &"x").unwrap();
        let newer = SectionKind { version: 9, ..VM };
        let mut w2 = ContainerWriter::new("m").unwrap();
        w2.add(&newer, 0, &1u8).unwrap();
        let text = read_header(&w.to_bytes()).unwrap().describe(KNOWN);
        assert!(text.starts_with(&format!(
            "godwit snapshot, format version 1, {HOST_ARCH} machine 'godwit-pc-1'"
        )));
        assert!(text.contains("'vcpu 1': kind 3, version 1,"), "{text}");
        assert!(
            text.contains(
                "'notes': kind 999, version 1, 3 bytes: unknown to this godwit, optional"
            ),
            "{text}"
        );
        let text = read_header(&w2.to_bytes()).unwrap().describe(KNOWN);
        assert!(
            text.contains("'vm': kind 2, version 9, 1 bytes: too new"),
            "{text}"
        );
    }

    /// A xorshift generator: deterministic damage for the robustness tests.
    pub(crate) fn xorshift(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn random_damage_is_an_error_never_a_panic() {
        let bytes = sample().to_bytes();
        let header_len = read_header(&bytes).unwrap().header_len as usize;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut r = move || xorshift(&mut seed);
        for _ in 0..20_000 {
            let mut b = bytes.clone();
            match r() % 3 {
                0 => b.truncate(r() as usize % (b.len() + 1)),
                1 => {
                    for _ in 0..1 + r() % 4 {
                        let at = r() as usize % b.len();
                        b[at] = r() as u8;
                    }
                }
                _ => {
                    // Plausible-looking numbers in the header fields.
                    let at = 8 + 4 * (r() as usize % ((header_len - 8) / 4));
                    let v = [0, 1, u32::MAX, r() as u32 % 4096, bytes.len() as u32];
                    b[at..at + 4].copy_from_slice(&v[r() as usize % v.len()].to_le_bytes());
                }
            }
            // Often make the checksums agree, to reach the later checks.
            if r() % 2 == 0 && b.len() >= PREAMBLE_LEN {
                let c = crc(&b[..16]);
                b[16..20].copy_from_slice(&c.to_le_bytes());
                let hl = u32_at(&b, 12) as usize;
                if (PREAMBLE_LEN + CRC_LEN..=b.len()).contains(&hl) {
                    let c = crc(&b[..hl - 4]);
                    b[hl - 4..hl].copy_from_slice(&c.to_le_bytes());
                }
            }
            if let Ok(c) = Container::from_bytes(b, KNOWN) {
                let _ = c.section::<VmPayload>(&VM, 0);
                let _ = c.section::<VcpuPayload>(&VCPU, 1);
            }
        }
    }

    #[test]
    fn files_are_written_atomically() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("vm.snap");
        sample().write_file(&path).unwrap();
        let c = Container::read_file(&path, KNOWN).unwrap();
        assert_eq!(c.instances(&VCPU).len(), 2);

        // A save that fails before its rename leaves the previous file.
        let before = std::fs::read(&path).unwrap();
        let err = crate::atomic::write_atomically(&path, |f| {
            use std::io::Write;
            f.write_all(&ContainerWriter::new("other").unwrap().to_bytes()[..30])?;
            Err::<(), _>(std::io::Error::other("simulated crash before rename"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("simulated crash"));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        Container::read_file(&path, KNOWN).unwrap();

        let err = Container::read_file(&dir.as_path().join("missing"), KNOWN).unwrap_err();
        assert!(matches!(err, FormatError::Read { .. }));

        // A FIFO where the state file should be would never end: refused
        // without reading.
        let fifo = dir.as_path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo takes a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let err = Container::read_file(&fifo, KNOWN).unwrap_err();
        assert!(matches!(err, FormatError::NotAFile { .. }), "{err}");

        let big = dir.as_path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_CONTAINER_FILE + 1)
            .unwrap();
        let err = Container::read_file(&big, KNOWN).unwrap_err();
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
    }
}
