//! The live-migration wire protocol: typed messages, each behind a fixed
//! 16-byte header checked on receipt.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4 | magic `GWMG` |
//! | 4  | 2 | protocol version |
//! | 6  | 2 | message kind |
//! | 8  | 4 | payload length |
//! | 12 | 4 | CRC-32C of the payload |
//!
//! A session: the source sends `Hello` (what the VM is and needs); the
//! destination probes its own host and answers `HelloReply` (accept, or
//! every reason to refuse, and what it offers). Only after an accept do
//! `Pages`/`ZeroPages` flow in rounds (`RoundEnd` closes each), then the
//! source stops the guest and sends the last pages and `State` (the
//! snapshot container's bytes), then `Complete`. The destination loads
//! everything and answers `Ready` (it holds the whole VM and will run it when
//! told); the source commits and answers `Go`; only then does the
//! destination resume the guest, and it answers `Resumed`. `Abort` ends a
//! session from either side with a reason; from the destination after
//! `Ready` it means it will not run the guest.
//!
//! Multifd (version 3): when `Hello` carries [`MultifdHello`], pages travel
//! only on `channels` extra streams to the same address, never on the main
//! one. Each opens with `ChannelHello` (its index and the migration's random
//! token from `Hello`), which binds it to this migration; once all are
//! there the destination answers `ChannelsReady` on the main stream. Every
//! channel closes each round with its own `RoundEnd`, and the destination
//! lets no channel write a page of round k+1 before every channel's round k
//! is written (the same page may travel in round k on one channel and in
//! round k+1 on another). After the last round each channel sends
//! `ChannelEnd`; `State`, `Complete` and the handoff stay on the main
//! stream.

use std::io::{IoSlice, Read, Write};

use serde::{Deserialize, Serialize};

use crate::le::bounded_u32;

pub const MAGIC: [u8; 4] = *b"GWMG";
/// 2: the `Ready`/`Go` handoff before the destination resumes.
/// 3: multifd channels (`ChannelHello`, `ChannelsReady`, `ChannelEnd`).
pub const PROTOCOL_VERSION: u16 = 3;
pub const HEADER_LEN: usize = 16;
/// Large enough for a 1 MiB page batch plus its table, and for the state.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// The most a `ChannelHello` may be: read from a connection not yet known
/// to belong to the migration.
pub const MAX_CHANNEL_HELLO: u32 = 4096;
/// Most multifd channels a migration may use (QEMU allows 255; more than
/// cores gains nothing).
pub const MAX_CHANNELS: u16 = 16;
pub const PAGE_SIZE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    HelloReply = 2,
    Pages = 3,
    ZeroPages = 4,
    RoundEnd = 5,
    State = 6,
    Complete = 7,
    Resumed = 8,
    Abort = 9,
    Ready = 10,
    Go = 11,
    /// First message of a multifd channel: [`ChannelHello`].
    ChannelHello = 12,
    /// The destination holds every multifd channel (main stream).
    ChannelsReady = 13,
    /// A multifd channel carries nothing more.
    ChannelEnd = 14,
}

impl Kind {
    /// The kind a header names, if any.
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloReply,
            3 => Kind::Pages,
            4 => Kind::ZeroPages,
            5 => Kind::RoundEnd,
            6 => Kind::State,
            7 => Kind::Complete,
            8 => Kind::Resumed,
            9 => Kind::Abort,
            10 => Kind::Ready,
            11 => Kind::Go,
            12 => Kind::ChannelHello,
            13 => Kind::ChannelsReady,
            14 => Kind::ChannelEnd,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the migration connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the migration connection")]
    Closed,
    #[error(
        "not a godwit migration stream (magic {0:02x?}); is the other end a godwit --incoming?"
    )]
    Magic([u8; 4]),
    #[error("the peer speaks migration protocol version {theirs}; this godwit speaks {ours}: use the same godwit release on both hosts, or a newer one on the destination")]
    Version { theirs: u16, ours: u16 },
    #[error(
        "unknown migration message kind {0}: the stream is corrupt or from an incompatible godwit"
    )]
    UnknownKind(u16),
    #[error("a {kind:?} message of {len} bytes exceeds its size limit (at most {MAX_PAYLOAD} bytes): the stream is corrupt")]
    TooLong { kind: Kind, len: u32 },
    #[error("a {kind:?} message is corrupt: checksum {actual:#010x}, expected {expected:#010x}")]
    Checksum {
        kind: Kind,
        expected: u32,
        actual: u32,
    },
    #[error("expected a {expected} message, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("a {kind:?} message is malformed: {detail}")]
    Malformed { kind: Kind, detail: String },
    #[error("a {kind:?} message is malformed: its JSON does not decode: {source}; the peer runs a godwit whose messages this one cannot read: use the same godwit release on both hosts")]
    Decode {
        kind: Kind,
        source: serde_json::Error,
    },
    #[error("cannot encode a {kind:?} message as JSON: {source}")]
    Encode {
        kind: Kind,
        source: serde_json::Error,
    },
    #[error("the peer aborted the migration: {0}")]
    Aborted(String),
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtocolError::Decode {
            kind: self.kind,
            source,
        })
    }
}

pub fn write_message<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    write_message_parts(w, kind, &[payload])
}

/// [`write_message`] of the payload `parts` in order, without joining them
/// first: a page batch's run table and its megabyte of data go out as they
/// lie, in one vectored write (one system call on a plain socket).
pub fn write_message_parts<W: Write>(
    w: &mut W,
    kind: Kind,
    parts: &[&[u8]],
) -> Result<(), ProtocolError> {
    let total = parts.iter().fold(0usize, |n, p| n.saturating_add(p.len()));
    let len = u32::try_from(total)
        .ok()
        .filter(|len| *len <= MAX_PAYLOAD)
        .ok_or(ProtocolError::TooLong {
            kind,
            len: bounded_u32(total),
        })?;
    let checksum = parts
        .iter()
        .fold(0, |crc, part| crc32c::crc32c_append(crc, part));
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header[12..16].copy_from_slice(&checksum.to_le_bytes());
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(&header[..])
        .chain(parts.iter().copied())
        .filter(|part| !part.is_empty())
        .map(IoSlice::new)
        .collect();
    write_all_vectored(w, &mut slices)?;
    Ok(())
}

/// `Write::write_all_vectored`, which std has not stabilised.
fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn write_json<W: Write, T: Serialize>(
    w: &mut W,
    kind: Kind,
    value: &T,
) -> Result<(), ProtocolError> {
    let bytes =
        serde_json::to_vec(value).map_err(|source| ProtocolError::Encode { kind, source })?;
    write_message(w, kind, &bytes)
}

fn read_exact_or_closed<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            ProtocolError::Io(e)
        }
    })
}

/// Reads and checks one message; an `Abort` becomes an error.
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, ProtocolError> {
    read_message_limited(r, MAX_PAYLOAD)
}

/// [`read_message`] refusing payloads over `max` bytes (at most
/// [`MAX_PAYLOAD`]) before allocating anything for them.
pub fn read_message_limited<R: Read>(r: &mut R, max: u32) -> Result<Message, ProtocolError> {
    read_message_into(r, max, Vec::new())
}

/// [`read_message`] into `recycled`, the payload of a message read before:
/// a receiver of page batches (1 MiB each) reuses one buffer instead of
/// allocating and zeroing a new one per message.
pub fn read_message_reusing<R: Read>(
    r: &mut R,
    recycled: Vec<u8>,
) -> Result<Message, ProtocolError> {
    read_message_into(r, MAX_PAYLOAD, recycled)
}

fn read_message_into<R: Read>(
    r: &mut R,
    max: u32,
    mut payload: Vec<u8>,
) -> Result<Message, ProtocolError> {
    let max = max.min(MAX_PAYLOAD);
    let mut header = [0u8; HEADER_LEN];
    read_exact_or_closed(r, &mut header)?;
    let magic: [u8; 4] = header[0..4].try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            theirs: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let raw_kind = u16::from_le_bytes([header[6], header[7]]);
    let kind = Kind::from_u16(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
    let len = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if len > max {
        return Err(ProtocolError::TooLong { kind, len });
    }
    let expected = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
    // Only bytes beyond what the buffer held before are zeroed.
    payload.resize(len as usize, 0);
    read_exact_or_closed(r, &mut payload)?;
    let actual = crc32c::crc32c(&payload);
    if actual != expected {
        return Err(ProtocolError::Checksum {
            kind,
            expected,
            actual,
        });
    }
    if kind == Kind::Abort {
        return Err(ProtocolError::Aborted(
            String::from_utf8_lossy(&payload).into_owned(),
        ));
    }
    Ok(Message { kind, payload })
}

/// Reads a message that must be of `kind`.
pub fn expect<R: Read>(
    r: &mut R,
    kind: Kind,
    name: &'static str,
) -> Result<Message, ProtocolError> {
    let m = read_message(r)?;
    if m.kind != kind {
        return Err(ProtocolError::Unexpected {
            expected: name,
            got: m.kind,
        });
    }
    Ok(m)
}

/// A run of pages: `Pages` carries their bytes after the table, `ZeroPages`
/// only the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub gpa: u64,
    pub pages: u32,
}

/// Encodes a page batch: `count u32`, `count × (gpa u64, pages u32)`, data.
pub fn encode_runs(runs: &[PageRun], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + runs.len() * 12 + data.len());
    put_run_table(&mut out, runs);
    out.extend_from_slice(data);
    out
}

/// The head of a page batch, [`encode_runs`] without the data: sent with
/// [`write_message_parts`] in front of data that then need not be copied.
pub fn encode_run_table(runs: &[PageRun]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + runs.len() * 12);
    put_run_table(&mut out, runs);
    out
}

fn put_run_table(out: &mut Vec<u8>, runs: &[PageRun]) {
    out.extend_from_slice(&bounded_u32(runs.len()).to_le_bytes());
    for r in runs {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
    }
}

/// Decodes a batch; `with_data` checks the data length matches the runs.
pub fn decode_runs(
    kind: Kind,
    payload: &[u8],
    with_data: bool,
) -> Result<(Vec<PageRun>, &[u8]), ProtocolError> {
    let bad = |detail: String| ProtocolError::Malformed { kind, detail };
    if payload.len() < 4 {
        return Err(bad("shorter than its run count".into()));
    }
    let count = u32::from_le_bytes(payload[0..4].try_into().unwrap_or_default()) as usize;
    let table_end = count
        .checked_mul(12)
        .and_then(|n| n.checked_add(4))
        .filter(|end| *end <= payload.len())
        .ok_or_else(|| {
            bad(format!(
                "{count} runs do not fit in {} bytes",
                payload.len()
            ))
        })?;
    let data = &payload[table_end..];
    let mut runs = Vec::with_capacity(count);
    let mut total: u64 = 0;
    for i in 0..count {
        let at = 4 + i * 12;
        let gpa = u64::from_le_bytes(payload[at..at + 8].try_into().unwrap_or_default());
        let pages = u32::from_le_bytes(payload[at + 8..at + 12].try_into().unwrap_or_default());
        if gpa % PAGE_SIZE != 0 {
            return Err(bad(format!(
                "run {i} starts at {gpa:#x}, not on a page boundary"
            )));
        }
        let run_bytes = u64::from(pages) * PAGE_SIZE;
        if gpa.checked_add(run_bytes).is_none() {
            return Err(bad(format!(
                "run {i} at {gpa:#x} of {pages} pages wraps the address space"
            )));
        }
        // Checked at every run, so that no sum can wrap back to a length
        // that matches the data.
        total = total
            .checked_add(run_bytes)
            .filter(|t| !with_data || *t <= data.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "runs 0..={i} cover more than the {} bytes of data that follow",
                    if with_data {
                        data.len() as u64
                    } else {
                        u64::MAX
                    }
                ))
            })?;
        runs.push(PageRun { gpa, pages });
    }
    if with_data && data.len() as u64 != total {
        return Err(bad(format!(
            "the runs cover {total} bytes but {} bytes of data follow",
            data.len()
        )));
    }
    if !with_data && !data.is_empty() {
        return Err(bad("zero-page runs carry data".into()));
    }
    Ok((runs, data))
}

/// One virtio-net device as the source describes it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceOffer {
    pub id: String,
    pub kind: String,
    pub peer_kind: String,
    /// Feature bits 0-127 (JSON numbers: a source that knew only 64 bits
    /// sent numbers that read the same; a value above 2^64 is refused by a
    /// destination that knows only 64 bits, in the first message).
    pub offered: u128,
    pub acked: u128,
    pub queue_sizes: Vec<u16>,
    /// Queue pairs offered (`max_virtqueue_pairs`); a godwit before
    /// multi-queue sends none: 1.
    #[serde(default = "one_queue_pair")]
    pub queue_pairs: u16,
    pub interface: Option<String>,
}

/// What the source sends first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub godwit_version: String,
    pub format_version: u32,
    pub machine_type: String,
    pub memory_size: u64,
    pub vcpus: u8,
    /// (guest address, size) of each RAM range.
    pub memory_layout: Vec<(u64, u64)>,
    pub devices: Vec<DeviceOffer>,
    /// The CPUID the guest sees (vCPU 0), for the destination to check.
    pub cpuid: Vec<crate::cpu_compat::CpuidEntry>,
    /// KVM capabilities restoring the vCPUs needs.
    pub kvm_caps: Vec<String>,
    /// Pages travel on this many extra channels (multifd); None: on the
    /// main stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd: Option<MultifdHello>,
}

/// The multifd part of `Hello`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MultifdHello {
    /// Extra connections to expect, 1 to [`MAX_CHANNELS`].
    pub channels: u16,
    /// Random, per migration (hex): each channel's `ChannelHello` repeats
    /// it, so a connection that does not know it is not part of this
    /// migration.
    pub token: String,
}

/// First message on a multifd channel.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChannelHello {
    /// 0-based, below `MultifdHello::channels`.
    pub channel: u16,
    pub token: String,
}

/// What the destination can carry for one device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicePeer {
    pub id: String,
    pub peer_kind: String,
    pub peer: String,
    /// Feature bits 0-127, as in [`DeviceOffer`].
    pub supported: u128,
    /// The most queue pairs the destination's peer carries (a godwit
    /// before multi-queue sends none: 1).
    #[serde(default = "one_queue_pair")]
    pub max_queue_pairs: u16,
}

fn one_queue_pair() -> u16 {
    1
}

/// The destination's answer to `Hello`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloReply {
    pub accept: bool,
    /// Every reason to refuse (empty when accepted).
    pub reasons: Vec<String>,
    pub godwit_version: String,
    pub machine_types: Vec<String>,
    pub devices: Vec<DevicePeer>,
    pub host_cpuid: Vec<crate::cpu_compat::CpuidEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundEnd {
    pub round: u32,
    pub pages: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resumed {
    pub restore_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, as a socket
    /// under pressure does.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_written_in_parts_is_the_message_written_whole() {
        let runs = [
            PageRun {
                gpa: 0x1000,
                pages: 2,
            },
            PageRun {
                gpa: 0x8000,
                pages: 1,
            },
        ];
        let data: Vec<u8> = (0..3 * PAGE_SIZE as usize).map(|i| i as u8).collect();
        let mut whole = Vec::new();
        write_message(&mut whole, Kind::Pages, &encode_runs(&runs, &data)).unwrap();
        for step in [1, 7, 4096, usize::MAX] {
            let mut parts = Trickle {
                out: Vec::new(),
                step,
            };
            let table = encode_run_table(&runs);
            write_message_parts(&mut parts, Kind::Pages, &[&table, &[], &data]).unwrap();
            assert_eq!(parts.out, whole, "written {step} bytes at a time");
        }
        let m = read_message(&mut &whole[..]).unwrap();
        let (decoded, rest) = decode_runs(Kind::Pages, &m.payload, true).unwrap();
        assert_eq!((decoded, rest), (runs.to_vec(), &data[..]));
    }

    /// Runs whose byte total exceeds 2^64 once wrapped to the size of the
    /// data that follows, which let a hostile source past the length check
    /// and panicked the destination's page copy.
    #[test]
    fn run_totals_that_wrap_are_refused() {
        let mut runs = vec![
            PageRun {
                gpa: 0,
                pages: u32::MAX,
            };
            1 << 20
        ];
        runs.push(PageRun {
            gpa: 0,
            pages: (1 << 20) + 1,
        });
        let payload = encode_runs(&runs, &[0u8; PAGE_SIZE as usize]);
        let err = decode_runs(Kind::Pages, &payload, true).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn a_run_that_wraps_the_address_space_is_refused() {
        let runs = [PageRun {
            gpa: !(PAGE_SIZE - 1),
            pages: 2,
        }];
        let payload = encode_runs(&runs, &[]);
        let err = decode_runs(Kind::ZeroPages, &payload, false).unwrap_err();
        assert!(err.to_string().contains("wraps"), "{err}");
    }

    #[test]
    fn messages_round_trip_and_damage_is_named() {
        let mut buf = Vec::new();
        write_json(&mut buf, Kind::RoundEnd, &RoundEnd { round: 3, pages: 9 }).unwrap();
        let m = read_message(&mut buf.as_slice()).unwrap();
        assert_eq!(m.kind, Kind::RoundEnd);
        assert_eq!(m.json::<RoundEnd>().unwrap().round, 3);

        let mut bad = buf.clone();
        bad[HEADER_LEN + 2] ^= 1;
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(ProtocolError::Checksum {
                kind: Kind::RoundEnd,
                ..
            })
        ));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(ProtocolError::Magic(_))
        ));
        let mut bad = buf.clone();
        bad[4] = 9;
        assert!(read_message(&mut bad.as_slice())
            .unwrap_err()
            .to_string()
            .contains("protocol version 9"));
        let mut bad = buf.clone();
        bad[6] = 77;
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(ProtocolError::UnknownKind(77))
        ));
        // The first kind after this version's is unknown, clearly.
        let mut bad = buf.clone();
        bad[6] = 15;
        let err = read_message(&mut bad.as_slice()).unwrap_err();
        assert!(matches!(err, ProtocolError::UnknownKind(15)), "{err}");
        assert!(err
            .to_string()
            .contains("unknown migration message kind 15"));
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(matches!(
            read_message(&mut &buf[..10]),
            Err(ProtocolError::Closed)
        ));
        assert!(matches!(
            read_message(&mut &buf[..buf.len() - 1]),
            Err(ProtocolError::Closed)
        ));

        let mut abort = Vec::new();
        write_message(&mut abort, Kind::Abort, b"destination out of memory").unwrap();
        assert!(read_message(&mut abort.as_slice())
            .unwrap_err()
            .to_string()
            .contains("out of memory"));
        assert!(matches!(
            expect(&mut buf.as_slice(), Kind::Hello, "Hello"),
            Err(ProtocolError::Unexpected { .. })
        ));
    }

    #[test]
    fn page_runs_are_checked() {
        let runs = [
            PageRun {
                gpa: 0x1000,
                pages: 2,
            },
            PageRun {
                gpa: 0x10000,
                pages: 1,
            },
        ];
        let data = vec![7u8; 3 * 4096];
        let p = encode_runs(&runs, &data);
        let (r, d) = decode_runs(Kind::Pages, &p, true).unwrap();
        assert_eq!(r, runs);
        assert_eq!(d.len(), data.len());
        assert!(decode_runs(Kind::Pages, &p[..p.len() - 1], true).is_err());
        assert!(decode_runs(Kind::Pages, &p[..20], true).is_err());
        let unaligned = encode_runs(
            &[PageRun {
                gpa: 0x1001,
                pages: 1,
            }],
            &[0u8; 4096],
        );
        assert!(decode_runs(Kind::Pages, &unaligned, true)
            .unwrap_err()
            .to_string()
            .contains("page boundary"));
        let z = encode_runs(&runs, &[]);
        assert!(decode_runs(Kind::ZeroPages, &z, false).is_ok());
        assert!(decode_runs(Kind::ZeroPages, &p, false).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_runs(Kind::Pages, &huge, true).is_err());
    }

    #[test]
    fn a_channel_hello_is_small_and_bounded() {
        let mut buf = Vec::new();
        let hello = ChannelHello {
            channel: 1,
            token: "ab".repeat(32),
        };
        write_json(&mut buf, Kind::ChannelHello, &hello).unwrap();
        let m = read_message_limited(&mut buf.as_slice(), MAX_CHANNEL_HELLO).unwrap();
        assert_eq!(m.json::<ChannelHello>().unwrap(), hello);
        // A header that claims more than a ChannelHello is refused before
        // anything of its size is allocated.
        let mut big = Vec::new();
        write_message(&mut big, Kind::ChannelHello, &[b' '; 5000]).unwrap();
        assert!(matches!(
            read_message_limited(&mut big.as_slice(), MAX_CHANNEL_HELLO),
            Err(ProtocolError::TooLong { len: 5000, .. })
        ));
        for kind in [Kind::ChannelHello, Kind::ChannelsReady, Kind::ChannelEnd] {
            assert_eq!(Kind::from_u16(kind as u16), Some(kind));
        }
    }
}
